"""Parallel dimensions and the device mesh (axes dp, pp, tp; tp innermost).

``ParallelDims`` is plain arithmetic, checked without any communication, so a wrong layout is
reported before a single process starts. ``build_mesh`` turns it into a
``torch.distributed.device_mesh.DeviceMesh`` whose named sub-groups every communicating function
receives explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .comm import Comm, CommStats, OpLog

AXES = ("dp", "pp", "tp")


class LayoutError(ValueError):
    """A parallel layout that cannot work; the message says what to change."""


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    pp: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        for axis in AXES:
            value = getattr(self, axis)
            if not isinstance(value, int) or value < 1:
                raise LayoutError(f"parallel.{axis} must be a positive integer, got {value!r}.")

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

    @classmethod
    def infer(cls, world_size: int, dp: int | None = None, pp: int = 1, tp: int = 1) -> "ParallelDims":
        """Fill in ``dp`` from the world size when it is not given, and check the product."""
        if world_size % (pp * tp):
            raise LayoutError(
                f"The world size {world_size} is not divisible by parallel.pp ({pp}) x parallel.tp "
                f"({tp}) = {pp * tp}: start a multiple of {pp * tp} processes or change pp/tp.")
        dims = cls(dp=dp if dp is not None else world_size // (pp * tp), pp=pp, tp=tp)
        dims.validate(world_size)
        return dims

    def validate(self, world_size: int) -> None:
        if self.world_size != world_size:
            raise LayoutError(
                f"parallel.dp x pp x tp = {self.dp} x {self.pp} x {self.tp} = {self.world_size}, but "
                f"{world_size} processes were started: start {self.world_size} processes "
                f"(--nproc {self.world_size}) or set parallel.dp so that dp x pp x tp = {world_size}.")

    def coords(self, rank: int) -> dict[str, int]:
        """Mesh coordinates of a global rank (row-major over dp, pp, tp: tp varies fastest)."""
        tp = rank % self.tp
        pp = (rank // self.tp) % self.pp
        dp = rank // (self.tp * self.pp)
        return {"dp": dp, "pp": pp, "tp": tp}

    def rank_of(self, dp: int, pp: int, tp: int) -> int:
        return (dp * self.pp + pp) * self.tp + tp

    def group_ranks(self, axis: str) -> list[list[int]]:
        """All groups along ``axis``: each is the list of global ranks that differ only on it."""
        others = [a for a in AXES if a != axis]
        sizes = {"dp": self.dp, "pp": self.pp, "tp": self.tp}
        groups = []
        for i in range(sizes[others[0]]):
            for j in range(sizes[others[1]]):
                ranks = []
                for k in range(sizes[axis]):
                    c = {others[0]: i, others[1]: j, axis: k}
                    ranks.append(self.rank_of(c["dp"], c["pp"], c["tp"]))
                groups.append(ranks)
        return groups


class Mesh:
    """A DeviceMesh plus one counting ``Comm`` per axis (and one for the whole world).

    All of them count into ``stats`` and record into ``log``, the one op log of this rank that
    the hang watchdog reads.
    """

    def __init__(self, dims: ParallelDims, device: torch.device, stats: CommStats | None = None,
                 log: OpLog | None = None):
        import torch.distributed as dist

        self.dims = dims
        self.device = device
        self.stats = stats or CommStats()
        self.log = log if log is not None else OpLog()
        world = dist.get_world_size()
        dims.validate(world)
        self.rank = dist.get_rank()
        self.coords = dims.coords(self.rank)
        self.device_mesh: DeviceMesh = init_device_mesh(
            device.type, (dims.dp, dims.pp, dims.tp), mesh_dim_names=AXES)
        self.world = Comm(dist.group.WORLD, "world", self.stats, self.log)
        self._axes = {axis: Comm(self.device_mesh.get_group(axis), axis, self.stats, self.log) for axis in AXES}

    def comm(self, axis: str) -> Comm:
        return self._axes[axis]

    @property
    def dp(self) -> Comm:
        return self._axes["dp"]

    @property
    def pp(self) -> Comm:
        return self._axes["pp"]

    @property
    def tp(self) -> Comm:
        return self._axes["tp"]
