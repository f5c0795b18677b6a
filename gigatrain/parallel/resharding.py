"""Whole tensors from shards and back, as parameter placements describe them.

Checkpoints hold whole tensors under full-model names, so that any layout loads them. A rank of
a tensor-parallel layout holds slices (``Placement.shard == (axis, dim)``): ``gather_shards``
makes them whole for saving (collective over each shard axis), ``local_shards`` cuts whole
tensors down to this rank's slices for loading (no communication). Optimizer states that have
the parameter's shape (Adam's moments) are sharded like the parameter; others (a step count)
are whole everywhere.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .placement import Placements

State = tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]


def _local_shape(shape: tuple[int, ...], dim: int, n: int) -> tuple[int, ...]:
    out = list(shape)
    out[dim] //= n
    return tuple(out)


def gather_shards(params: dict[str, torch.Tensor], optim: dict[str, dict[str, torch.Tensor]] | None,
                  placements: Placements, mesh) -> State:
    """``(params, optim)`` with every sharded tensor replaced by the whole tensor.

    Collective over the shard axes (``mesh.comm(axis)``): every rank of those groups calls it
    with the same names in the same order. Tensors stay on the CPU.
    """
    optim = optim or {}
    params, optim = dict(params), {n: dict(st) for n, st in optim.items()}
    for name in sorted(params):
        pl = placements.get(name)
        if pl is None or pl.shard is None:
            continue
        axis, dim = pl.shard
        comm = mesh.comm(axis)
        local = _local_shape(pl.shape, dim, comm.size)
        params[name] = _gather(params[name], comm, dim, mesh.device)
        for key in sorted(optim.get(name, {})):
            t = optim[name][key]
            if torch.is_tensor(t) and tuple(t.shape) == local:
                optim[name][key] = _gather(t, comm, dim, mesh.device)
    return params, optim


def _gather(t: torch.Tensor, comm, dim: int, device: torch.device) -> torch.Tensor:
    if comm.size == 1:
        return t
    from .tensor.mappings import all_gather_dim

    return all_gather_dim(t.to(device), comm, dim).cpu()


def local_shards(params: Mapping[str, torch.Tensor], optim: Mapping[str, Mapping[str, torch.Tensor]] | None,
                 placements: Placements, coords: Mapping[str, int], sizes: Mapping[str, int]) -> State:
    """Whole tensors (as ``gather_shards`` returns them) cut to this rank's slices.

    ``coords``: this rank's mesh coordinates; ``sizes``: the size of each mesh axis. A tensor
    whose shape is not the placement's whole shape is left as it is, so the strategy's own shape
    check reports a checkpoint of another model.
    """
    params = dict(params)
    optim = {n: dict(st) for n, st in (optim or {}).items()} if optim is not None else None
    for name, pl in placements.items():
        if pl.shard is None or name not in params:
            continue
        axis, dim = pl.shard
        n, r = sizes[axis], coords[axis]
        if tuple(params[name].shape) != tuple(pl.shape):
            continue
        params[name] = _slice(params[name], dim, n, r)
        for key, t in (optim or {}).get(name, {}).items():
            if torch.is_tensor(t) and tuple(t.shape) == tuple(pl.shape):
                optim[name][key] = _slice(t, dim, n, r)
    return params, optim


def _slice(t: torch.Tensor, dim: int, n: int, r: int) -> torch.Tensor:
    size = t.shape[dim] // n
    return t.narrow(dim, r * size, size).clone()
