"""The communication of Megatron tensor parallelism, as small named autograd pairs.

Each function is one ``torch.autograd.Function`` whose forward and backward are a pair of
collectives (or a collective and a no-op) over the tp ``Comm``, so that every byte is counted and
recorded like any other collective. With one tp rank every pair is the identity.

Tensor parallel (hidden dimension):

- ``copy_to_tp``: forward identity, backward all-reduce (the input of a column-parallel layer:
  every rank's partial input gradient is summed);
- ``reduce_from_tp``: forward all-reduce, backward identity (the output of a row-parallel layer
  or of the vocabulary-parallel embedding);
- ``scatter_to_tp`` / ``gather_from_tp``: keep this rank's slice / concatenate all slices along
  a dimension, and the reverse in backward.

Sequence parallel (the sequence dimension, dim 1 of ``[batch, seq, hidden]``):

- ``scatter_to_sequence``: forward keep this rank's sequence slice, backward all-gather;
- ``gather_from_sequence``: forward all-gather, backward reduce-scatter (the partial gradients
  of a column-parallel layer's input are summed and cut at once);
- ``reduce_scatter_to_sequence``: forward reduce-scatter, backward all-gather (the output of a
  row-parallel layer: the all-reduce of plain tensor parallelism, split into its two halves).
"""
from __future__ import annotations

import torch

from ...distributed.comm import Comm

__all__ = ["copy_to_tp", "reduce_from_tp", "scatter_to_tp", "gather_from_tp", "scatter_to_sequence",
           "gather_from_sequence", "reduce_scatter_to_sequence", "all_gather_dim", "reduce_scatter_dim",
           "split_dim", "all_reduce_copy", "SEQ_DIM"]

SEQ_DIM = 1  # activations are [batch, seq, hidden]


def split_dim(x: torch.Tensor, comm: Comm, dim: int) -> torch.Tensor:
    """This rank's contiguous slice of ``x`` along ``dim`` (``x.shape[dim]`` must divide)."""
    if comm.size == 1:
        return x
    n = x.shape[dim]
    if n % comm.size:
        raise ValueError(f"dimension {dim} of size {n} does not split over {comm.size} tensor-parallel ranks")
    return x.narrow(dim, comm.rank * (n // comm.size), n // comm.size).contiguous()


def all_gather_dim(x: torch.Tensor, comm: Comm, dim: int) -> torch.Tensor:
    """Every rank's ``x`` concatenated along ``dim`` in rank order."""
    if comm.size == 1:
        return x
    x = x.contiguous()
    # The flat collective wants the ranks' tensors stacked along dim 0.
    flat = torch.empty((comm.size * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    comm.all_gather(flat, x)
    dim = dim % x.dim()
    if dim == 0:
        return flat
    shape = list(x.shape)
    shape[dim] *= comm.size
    return flat.view((comm.size,) + tuple(x.shape)).movedim(0, dim).reshape(shape)


def reduce_scatter_dim(x: torch.Tensor, comm: Comm, dim: int) -> torch.Tensor:
    """The sum over ranks of ``x``, cut along ``dim``; this rank keeps its slice."""
    if comm.size == 1:
        return x
    n = x.shape[dim]
    if n % comm.size:
        raise ValueError(f"dimension {dim} of size {n} does not split over {comm.size} tensor-parallel ranks")
    dim = dim % x.dim()
    shape = list(x.shape)
    shape[dim : dim + 1] = [comm.size, n // comm.size]
    inp = x.reshape(shape).movedim(dim, 0).contiguous()  # rank-major, as the collective wants
    out = torch.empty(inp.shape[1:], dtype=x.dtype, device=x.device)
    comm.reduce_scatter(out, inp.view((-1,) + tuple(inp.shape[2:])))
    return out


def all_reduce_copy(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    """The sum of ``x`` over ``comm``, in a new tensor (``x`` itself when alone)."""
    # Out of place: the tensor handed in may be an autograd-saved value or another op's gradient.
    if comm.size == 1:
        return x
    y = x.contiguous().clone()
    comm.all_reduce(y)
    return y


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return x

    @staticmethod
    def backward(ctx, g):
        return all_reduce_copy(g, ctx.comm), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        return all_reduce_copy(x, comm)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, dim):
        ctx.comm, ctx.dim = comm, dim
        return split_dim(x, comm, dim)

    @staticmethod
    def backward(ctx, g):
        return all_gather_dim(g, ctx.comm, ctx.dim), None, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, dim):
        ctx.comm, ctx.dim = comm, dim
        return all_gather_dim(x, comm, dim)

    @staticmethod
    def backward(ctx, g):
        return split_dim(g, ctx.comm, ctx.dim), None, None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return all_gather_dim(x, comm, SEQ_DIM)

    @staticmethod
    def backward(ctx, g):
        return reduce_scatter_dim(g, ctx.comm, SEQ_DIM), None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return reduce_scatter_dim(x, comm, SEQ_DIM)

    @staticmethod
    def backward(ctx, g):
        return all_gather_dim(g, ctx.comm, SEQ_DIM), None


def copy_to_tp(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    """Forward identity; backward all-reduce over ``comm``."""
    return x if comm.size == 1 else _CopyToTP.apply(x, comm)


def reduce_from_tp(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    """Forward all-reduce over ``comm``; backward identity."""
    return x if comm.size == 1 else _ReduceFromTP.apply(x, comm)


def scatter_to_tp(x: torch.Tensor, comm: Comm, dim: int = -1) -> torch.Tensor:
    """Forward: this rank's slice along ``dim``; backward: all-gather along ``dim``."""
    return x if comm.size == 1 else _ScatterToTP.apply(x, comm, dim)


def gather_from_tp(x: torch.Tensor, comm: Comm, dim: int = -1) -> torch.Tensor:
    """Forward: all-gather along ``dim``; backward: this rank's slice."""
    return x if comm.size == 1 else _GatherFromTP.apply(x, comm, dim)


def scatter_to_sequence(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    """Forward: this rank's slice of the sequence; backward: all-gather along the sequence."""
    return scatter_to_tp(x, comm, SEQ_DIM)


def gather_from_sequence(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    """Forward: all-gather along the sequence; backward: reduce-scatter along the sequence."""
    return x if comm.size == 1 else _GatherFromSequence.apply(x, comm)


def reduce_scatter_to_sequence(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    """Forward: reduce-scatter along the sequence; backward: all-gather along the sequence."""
    return x if comm.size == 1 else _ReduceScatterToSequence.apply(x, comm)
