"""Parameter placements: where each parameter of the model lives on the mesh.

Every ``apply_*`` step records, for each parameter name this rank holds, how the rank's tensor
relates to the full one:

- ``shape``: the full (global) shape;
- ``shard``: ``(axis, dim)`` when the tensor is cut along ``dim`` over a mesh axis (tensor
  parallel), else ``None``;
- ``replicated``: the mesh axes along which every rank holds an identical copy;
- ``copies``: for a tied parameter that lives on several pipeline ranks (GPT's embedding and LM
  head), the pp coordinates that hold a copy; the first one is the canonical copy.

From these alone follow the rules that used to be special cases: which rank counts a parameter
in the global gradient norm ("the tied embedding only on the first stage"), and which rank writes
it to a checkpoint ("dp == 0 and tp == 0"). Nothing here communicates.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Iterator, Mapping

import torch.nn as nn

AXES = ("dp", "pp", "tp")


@dataclass(frozen=True)
class Placement:
    shape: tuple[int, ...]
    replicated: tuple[str, ...] = ()
    shard: tuple[str, int] | None = None
    copies: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for ax in self.replicated:
            if ax not in AXES:
                raise ValueError(f"unknown mesh axis {ax!r} (axes: {AXES})")
        if self.shard is not None and self.shard[0] in self.replicated:
            raise ValueError(f"a tensor cannot be both sharded and replicated over {self.shard[0]!r}")

    def canonical(self, coords: Mapping[str, int], axes: Iterable[str] = AXES) -> bool:
        """Whether the copy at ``coords`` is the one that stands for all identical copies along
        ``axes``: coordinate 0 on every replicated axis, and the first of the tied ``copies``."""
        axes = set(axes)
        if "pp" in axes and self.copies and coords["pp"] != self.copies[0]:
            return False
        return all(coords[ax] == 0 for ax in self.replicated if ax in axes)


class Placements(Mapping[str, Placement]):
    """The placements of the parameters this rank holds, by full-model parameter name."""

    def __init__(self, items: Mapping[str, Placement] | None = None):
        self._items: dict[str, Placement] = dict(items or {})

    @classmethod
    def replicated_model(cls, module: nn.Module, axes: Iterable[str] = ("dp", "tp")) -> "Placements":
        """Every parameter of ``module`` whole and identical along ``axes``: the starting point
        before any parallelism is applied. The pp axis is not among them: pipeline ranks hold
        different stages, and the only copies across pp are tied weights (``copies``)."""
        axes = tuple(axes)
        return cls({n: Placement(tuple(p.shape), replicated=axes) for n, p in module.named_parameters()})

    def __getitem__(self, name: str) -> Placement:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Placements({len(self)} parameters)"

    def restrict(self, names: Iterable[str]) -> "Placements":
        """Only the given names (a pipeline rank keeps those of its own stages)."""
        return Placements({n: self._items[n] for n in names})

    def update(self, name: str, **changes) -> None:
        self._items[name] = replace(self._items[name], **changes)

    def not_counted_here(self, coords: Mapping[str, int], axes: Iterable[str]) -> frozenset[str]:
        """Names held here whose contribution to a sum over ``axes`` another rank already makes.

        The global gradient norm is the sum of local squares over every rank: a parameter
        replicated along one of ``axes`` (or a tied copy) must be counted once, on its canonical
        rank. The data-parallel axis is left to the gradient strategy, which owns dp sharding.
        """
        axes = tuple(axes)
        return frozenset(n for n, p in self._items.items() if not p.canonical(coords, axes))

    def gathered(self) -> "Placements":
        """The placements of the whole tensors once every shard is gathered (as checkpoints hold
        them): each shard axis becomes an axis of identical copies."""
        return Placements({n: p if p.shard is None else replace(p, shard=None, replicated=p.replicated + (p.shard[0],))
                           for n, p in self._items.items()})

    def writes_here(self, name: str, coords: Mapping[str, int]) -> bool:
        """Whether this rank writes ``name`` to a checkpoint: the canonical copy along every
        axis, so each parameter (each tensor-parallel slice) is written exactly once."""
        return self._items[name].canonical(coords)
