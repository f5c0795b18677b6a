"""Test-side name for gigatrain.dist.spawn (ladder 3: real gloo processes)."""
from gigatrain.dist.spawn import spawn

__all__ = ["spawn"]
