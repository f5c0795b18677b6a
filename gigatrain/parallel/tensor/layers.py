"""Tensor-parallel layers: each holds this rank's slice of a full layer's weights.

Built from a full layer with ``from_full`` (the slice of the same full tensors every rank
initialised from the same seed), so a tensor-parallel model starts exactly where the
one-process model starts. Parameter names stay those of ``nn.Linear`` / ``nn.Embedding``
(``weight``, ``bias``), so checkpoints and optimizers see the model's own names.

- ``ColumnParallelLinear``: output features split; with sequence parallelism it gathers its
  sequence-sharded input itself and keeps only the shard for backward (Korthikanti et al.:
  the gathered input is not stored, it is gathered again in backward).
- ``RowParallelLinear``: input features split; the partial outputs are all-reduced (or, with
  sequence parallelism, reduce-scattered along the sequence) before the bias is added once.
- ``VocabParallelEmbedding``: rows (vocabulary) split; each rank looks up the ids it owns and
  the partial embeddings are all-reduced.
- ``VocabParallelCrossEntropy``: the loss over vocabulary-parallel logits; only per-token
  values (the maximum, the sum of exponentials, the target logit) cross ranks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ...distributed.comm import Comm
from .mappings import (SEQ_DIM, all_gather_dim, copy_to_tp, reduce_from_tp, reduce_scatter_dim,
                       reduce_scatter_to_sequence, split_dim)

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "VocabParallelCrossEntropy"]


def _slice_param(p: torch.Tensor | None, comm: Comm, dim: int) -> nn.Parameter | None:
    if p is None:
        return None
    return nn.Parameter(split_dim(p.detach(), comm, dim).clone(), requires_grad=p.requires_grad)


class _SequenceGatherLinear(torch.autograd.Function):
    """``linear(all_gather_seq(x), w, b)`` that saves only the local sequence shard of ``x``.

    Backward gathers the input again for the weight gradient and reduce-scatters the input
    gradient along the sequence. Dtypes follow what autocast chose in forward (the gradient's
    dtype); gradients are returned in the dtypes of the tensors they belong to.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, comm):
        ctx.comm = comm
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return F.linear(all_gather_dim(x, comm, SEQ_DIM), weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        comm = ctx.comm
        g = g.contiguous()
        grad_in = g.matmul(weight.to(g.dtype))
        total = all_gather_dim(x, comm, SEQ_DIM).to(g.dtype)
        g2 = g.reshape(-1, g.shape[-1])
        grad_w = g2.t().matmul(total.reshape(-1, total.shape[-1])).to(weight.dtype)
        grad_b = g2.sum(0) if ctx.has_bias else None
        grad_x = reduce_scatter_dim(grad_in, comm, SEQ_DIM).to(x.dtype)
        return grad_x, grad_w, grad_b, None


class ColumnParallelLinear(nn.Module):
    """``y_local = x W_local^T + b_local``: this rank computes ``out_features / tp`` outputs.

    The input is whole on every rank (forward identity, backward all-reduce), or, when
    ``sequence_parallel`` and gradients are recorded, cut along the sequence and gathered here.
    Forward-only passes (evaluation, sampling) always take whole inputs: sequence parallelism
    only saves activation memory, which a pass without backward does not keep.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, comm: Comm, *, in_features: int,
                 out_features: int, sequence_parallel: bool = False):
        super().__init__()
        self.comm = comm
        self.in_features, self.out_features = in_features, out_features
        self.sequence_parallel = sequence_parallel
        self.weight = weight
        self.bias = bias

    @classmethod
    def from_full(cls, full: nn.Linear, comm: Comm, *, sequence_parallel: bool = False,
                  weight: nn.Parameter | None = None) -> "ColumnParallelLinear":
        """This rank's block of ``full``'s output features. ``weight`` (already sliced) is used
        instead of slicing ``full.weight`` when the weight is shared (a tied LM head)."""
        w = weight if weight is not None else _slice_param(full.weight, comm, 0)
        return cls(w, _slice_param(full.bias, comm, 0), comm, in_features=full.in_features,
                   out_features=full.out_features, sequence_parallel=sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel and torch.is_grad_enabled() and self.comm.size > 1:
            return _SequenceGatherLinear.apply(x, self.weight, self.bias, self.comm)
        return F.linear(copy_to_tp(x, self.comm), self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} (local "
                f"{self.weight.shape[0]}), tp={self.comm.size}, sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """``y = sum_ranks(x_local W_local^T) + b``: this rank holds ``in_features / tp`` inputs.

    The bias is whole on every rank and added after the reduction. With ``sequence_parallel``
    (and gradients recorded) the reduction is a reduce-scatter along the sequence, so the output
    is this rank's sequence shard.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, comm: Comm, *, in_features: int,
                 out_features: int, sequence_parallel: bool = False):
        super().__init__()
        self.comm = comm
        self.in_features, self.out_features = in_features, out_features
        self.sequence_parallel = sequence_parallel
        self.weight = weight
        self.bias = bias

    @classmethod
    def from_full(cls, full: nn.Linear, comm: Comm, *, sequence_parallel: bool = False) -> "RowParallelLinear":
        """This rank's block of ``full``'s input features (the bias stays whole)."""
        bias = None if full.bias is None else nn.Parameter(full.bias.detach().clone(),
                                                          requires_grad=full.bias.requires_grad)
        return cls(_slice_param(full.weight, comm, 1), bias, comm, in_features=full.in_features,
                   out_features=full.out_features, sequence_parallel=sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.sequence_parallel and torch.is_grad_enabled():
            y = reduce_scatter_to_sequence(y, self.comm)
        else:
            y = reduce_from_tp(y, self.comm)
        # Under autocast the bias must not promote the low-precision output to fp32.
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (local {self.weight.shape[1]}), out_features={self.out_features}, "
                f"tp={self.comm.size}, sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows are split over tp: rank r owns ids ``[r*V/tp, (r+1)*V/tp)``.

    Each rank embeds the ids it owns (zeros elsewhere); an all-reduce sums the partial
    embeddings, so every rank gets the whole ``[..., embedding_dim]`` output.
    """

    def __init__(self, weight: nn.Parameter, comm: Comm, num_embeddings: int):
        super().__init__()
        self.comm = comm
        self.num_embeddings = num_embeddings
        self.embedding_dim = weight.shape[1]
        per = num_embeddings // comm.size
        self.vocab_start, self.vocab_end = comm.rank * per, (comm.rank + 1) * per
        self.weight = weight

    @classmethod
    def from_full(cls, full: nn.Embedding, comm: Comm) -> "VocabParallelEmbedding":
        if full.num_embeddings % comm.size:
            raise ValueError(f"vocabulary of {full.num_embeddings} rows does not split over {comm.size} ranks")
        return cls(_slice_param(full.weight, comm, 0), comm, full.num_embeddings)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.comm.size == 1:
            return F.embedding(idx, self.weight)
        outside = (idx < self.vocab_start) | (idx >= self.vocab_end)
        local = (idx - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.comm)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim} (local rows {self.vocab_start}:{self.vocab_end}), "
                f"tp={self.comm.size}")


class _VocabParallelCE(torch.autograd.Function):
    """Per-token cross-entropy of logits whose last dimension is split over tp.

    Forward sends two all-reduces of per-token values: the maximum (for a stable softmax), then
    the target logit and the sum of exponentials together. Backward is local:
    ``softmax - onehot`` on this rank's columns.
    """

    @staticmethod
    def forward(ctx, logits, targets, comm, vocab_start):
        n_local = logits.shape[-1]
        m = logits.max(dim=-1).values
        comm.all_reduce(m, op=dist.ReduceOp.MAX)
        z = logits - m.unsqueeze(-1)
        outside = (targets < vocab_start) | (targets >= vocab_start + n_local)
        local_t = (targets - vocab_start).masked_fill(outside, 0)
        target_logit = z.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        e = z.exp()
        stats = torch.stack([target_logit, e.sum(dim=-1)])
        comm.all_reduce(stats)
        target_logit, sum_exp = stats[0], stats[1]
        e.div_(sum_exp.unsqueeze(-1))  # softmax, kept for backward
        ctx.save_for_backward(e, local_t, outside)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, g):
        softmax, local_t, outside = ctx.saved_tensors
        grad = softmax.clone()
        hit = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local_t.unsqueeze(-1), -hit.unsqueeze(-1))
        return grad * g.unsqueeze(-1), None, None, None


class VocabParallelCrossEntropy:
    """``loss(logits_local, targets)``: mean cross-entropy over all tokens, equal to
    ``F.cross_entropy`` of the full logits, from this rank's vocabulary columns only.

    ``logits_local``: ``[..., vocab / tp]`` (columns ``[vocab_start, vocab_start + vocab / tp)``),
    ``targets``: ``[...]`` token ids of the full vocabulary. Computed in fp32.
    """

    def __init__(self, comm: Comm, vocab_start: int):
        self.comm = comm
        self.vocab_start = vocab_start

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.reshape(-1, logits.shape[-1]).float()
        targets = targets.reshape(-1)
        if self.comm.size == 1:
            return F.cross_entropy(logits, targets)
        return _VocabParallelCE.apply(logits, targets, self.comm, self.vocab_start).mean()

    def __repr__(self) -> str:
        return f"VocabParallelCrossEntropy(tp={self.comm.size}, vocab_start={self.vocab_start})"
