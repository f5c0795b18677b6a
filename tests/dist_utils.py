"""Test-side helpers for process groups: ``spawn`` (ladder 3: real gloo processes) and
``one_process`` (the one-process oracle inside the test process)."""
import torch

from gigatrain.distributed.launch import DistEnv, distributed
from gigatrain.distributed.spawn import spawn


def one_process():
    """A world of one gloo process in this process, torn down on exit (a context manager)."""
    return distributed(DistEnv(), backend="gloo", device=torch.device("cpu"))


__all__ = ["one_process", "spawn"]
