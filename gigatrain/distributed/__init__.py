"""Processes, device mesh and counted collectives."""
from .comm import Comm, CommStats
from .launch import DistEnv, distributed, expand_nodelist, launch_local, read_env
from .mesh import LayoutError, Mesh, ParallelDims

__all__ = ["Comm", "CommStats", "DistEnv", "distributed", "expand_nodelist", "launch_local",
           "read_env", "LayoutError", "Mesh", "ParallelDims"]
