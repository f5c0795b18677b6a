"""``apply_tensor_parallel``: rewrite a model in place from the tensor-parallel plan it declares.

A model declares its plan as data (``model.tp_plan``): module-name patterns (``fnmatch``) mapped
to a style.

- ``"colwise"``: an ``nn.Linear`` whose output features are split (``ColumnParallelLinear``);
- ``"rowwise"``: an ``nn.Linear`` whose input features are split (``RowParallelLinear``);
- ``"vocab"``: an ``nn.Embedding`` whose rows are split (``VocabParallelEmbedding``). Every
  ``nn.Linear`` that shares its weight (a tied LM head) becomes column-parallel over the same
  slice, the model's output is then split over the vocabulary, and ``model.loss`` becomes the
  vocabulary-parallel cross-entropy;
- ``"sequence_scatter"`` (sequence parallelism only): the module's output is cut along the
  sequence; from there to the LM head the residual stream lives in sequence shards;
- ``"sequence_norm"`` (sequence parallelism only): a module (LayerNorm) that runs on sequence
  shards; its weights stay whole on every rank and their gradients are summed over tp.

Attention heads follow from the column split of a head-major ``qkv`` (and the row split of the
projection after it): each rank gets whole heads, and the attention reads its head count from
the ``qkv`` output. Every rank keeps its slice of the full weights it was built with, so with the
same seed the split model computes what the one-process model computes.
"""
from __future__ import annotations

import fnmatch
from typing import Callable

import torch
import torch.nn as nn

from ...distributed.comm import Comm
from ...distributed.mesh import LayoutError
from ..placement import Placements
from ..policies import TensorParallelPolicy
from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelCrossEntropy, VocabParallelEmbedding
from .mappings import SEQ_DIM, all_gather_dim, all_reduce_copy, scatter_to_sequence

__all__ = ["apply_tensor_parallel", "output_gather", "STYLES"]

STYLES = ("colwise", "rowwise", "vocab", "sequence_scatter", "sequence_norm")


def apply_tensor_parallel(model: nn.Module, tp: Comm, policy: TensorParallelPolicy,
                          placements: Placements) -> nn.Module:
    """Split ``model`` over ``tp`` in place as its ``tp_plan`` says; returns the model.

    Each split parameter's placement records its full shape and ``shard=("tp", dim)`` and is no
    longer replicated over tp. With ``policy.sequence_parallel`` the regions between the
    ``sequence_scatter`` module and the LM head run on sequence shards: column-parallel layers
    gather the sequence (and re-gather it in backward instead of storing it), row-parallel
    layers reduce-scatter it, and the gradients of the whole weights computed there (the
    ``sequence_norm`` modules' and the row-parallel biases) are all-reduced over tp as backward
    produces them. Forward-only passes run without sequence sharding (evaluation and sampling
    keep no activations, and contexts of any length then work).

    With one tp rank nothing changes. Raises ``LayoutError`` when the model has no plan, a split
    dimension does not divide by tp, or a weight would be left with a partial gradient.
    """
    if tp.size != policy.size:
        raise LayoutError(f"the tp group has {tp.size} ranks but the policy says parallel.tp={policy.size}")
    if tp.size == 1:
        return model
    plan = getattr(model, "tp_plan", None)
    if not plan:
        raise LayoutError(f"{type(model).__name__} declares no tensor-parallel plan (tp_plan): "
                          "it cannot be split over parallel.tp > 1; use data or pipeline parallelism.")
    bad = sorted({s for s in plan.values() if s not in STYLES})
    if bad:
        raise LayoutError(f"unknown tensor-parallel styles {bad} in {type(model).__name__}.tp_plan (known: {STYLES})")
    sp = policy.sequence_parallel
    if sp and "sequence_scatter" not in plan.values():
        raise LayoutError(f"{type(model).__name__} does not declare where its sequence is cut (a "
                          "'sequence_scatter' entry in tp_plan): set parallel.sequence_parallel=false.")
    modules = dict(model.named_modules())
    styled = {name: style for name in modules for pattern, style in plan.items()
              if name and fnmatch.fnmatchcase(name, pattern)}

    split: dict[int, tuple[tuple[int, ...], int]] = {}  # id(new param) -> (full shape, dim)
    row_biases: list[nn.Parameter] = []
    vocab: VocabParallelEmbedding | None = None
    for name, style in styled.items():
        old = modules[name]
        if style == "colwise":
            _expect(old, nn.Linear, name, style)
            _check_heads(modules, name, old, tp.size)
            _divisible(name, "output features", old.out_features, tp.size)
            new = ColumnParallelLinear.from_full(old, tp, sequence_parallel=sp)
            split[id(new.weight)] = (tuple(old.weight.shape), 0)
            if new.bias is not None:
                split[id(new.bias)] = (tuple(old.bias.shape), 0)
        elif style == "rowwise":
            _expect(old, nn.Linear, name, style)
            _divisible(name, "input features", old.in_features, tp.size)
            new = RowParallelLinear.from_full(old, tp, sequence_parallel=sp)
            split[id(new.weight)] = (tuple(old.weight.shape), 1)
            if new.bias is not None:
                row_biases.append(new.bias)
        elif style == "vocab":
            _expect(old, nn.Embedding, name, style)
            if vocab is not None:
                raise LayoutError(f"{type(model).__name__}.tp_plan marks more than one vocabulary embedding")
            _divisible(name, "vocabulary rows", old.num_embeddings, tp.size)
            new = vocab = VocabParallelEmbedding.from_full(old, tp)
            split[id(new.weight)] = (tuple(old.weight.shape), 0)
            for lname, lm in list(model.named_modules()):
                if isinstance(lm, nn.Linear) and lm.weight is old.weight:
                    head = ColumnParallelLinear.from_full(lm, tp, sequence_parallel=sp, weight=new.weight)
                    if head.bias is not None:
                        split[id(head.bias)] = (tuple(lm.bias.shape), 0)
                    _replace(model, lname, head)
        else:
            continue
        _replace(model, name, new)

    gathers_output = vocab is not None and any(
        isinstance(m, ColumnParallelLinear) and m.weight is vocab.weight for m in model.modules())
    if gathers_output:
        model.loss = VocabParallelCrossEntropy(tp, vocab.vocab_start)
        model.gather_output = lambda y: all_gather_dim(y.contiguous(), tp, -1)

    if sp:
        summed = _sequence_parallel_hooks(model, tp, styled, row_biases)
        _check_sequence_parallel(model, styled, split, summed)

    for pname, p in model.named_parameters():
        if id(p) in split:
            shape, dim = split[id(p)]
            old = placements[pname]
            placements.update(pname, shape=shape, shard=("tp", dim),
                              replicated=tuple(a for a in old.replicated if a != "tp"))
    return model


def output_gather(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function that makes a tensor-parallel model's output whole: an all-gather over tp of
    the last dimension when ``apply_tensor_parallel`` split it (vocabulary-parallel logits),
    else the identity. Collective over tp; it keeps the last dimension of the output, so apply
    it after reductions that keep that dimension (``logits[:, -1]``)."""
    return getattr(model, "gather_output", _identity)


def _identity(y: torch.Tensor) -> torch.Tensor:
    return y


def _sequence_parallel_hooks(model, tp: Comm, styled: dict[str, str], row_biases) -> set[int]:
    """Install the sequence scatter and the gradient all-reduces; returns the ids of the
    parameters whose gradients are summed over tp."""
    for name, style in styled.items():
        if style == "sequence_scatter":
            model.get_submodule(name).register_forward_hook(_scatter_hook(tp, name))
    summed = list(row_biases)
    for name, style in styled.items():
        if style == "sequence_norm":
            summed += [p for p in model.get_submodule(name).parameters() if p.requires_grad]
    for p in summed:
        # A tensor hook sees each backward's own contribution before it is accumulated into .grad,
        # so gradient accumulation and every gradient strategy downstream see the summed value.
        p.register_hook(lambda g, tp=tp: all_reduce_copy(g, tp))
    return {id(p) for p in summed}


def _scatter_hook(tp: Comm, name: str):
    def hook(module, args, out):
        if not torch.is_grad_enabled():
            return out
        if out.shape[SEQ_DIM] % tp.size:
            raise LayoutError(f"sequence parallelism cuts the sequence after {name}: its length "
                              f"{out.shape[SEQ_DIM]} is not divisible by parallel.tp={tp.size}")
        return scatter_to_sequence(out, tp)
    return hook


def _check_sequence_parallel(model, styled, split, summed) -> None:
    """Every whole (replicated) weight used on sequence shards must have its gradient summed."""
    before = [n for n, s in styled.items() if s == "sequence_scatter"]
    missing = []
    for pname, p in model.named_parameters():
        if id(p) in split or id(p) in summed or any(pname.startswith(b + ".") for b in before):
            continue
        missing.append(pname)
    if missing:
        raise LayoutError(f"with sequence parallelism the gradients of {', '.join(missing[:4])}"
                          f"{' ...' if len(missing) > 4 else ''} would be partial sums: "
                          f"{type(model).__name__}.tp_plan must mark their modules 'sequence_norm' "
                          "(or set parallel.sequence_parallel=false).")


def _check_heads(modules, name: str, layer: nn.Linear, tp: int) -> None:
    """A head-major qkv must give each rank whole heads."""
    parent = modules.get(name.rpartition(".")[0])
    head_dim = getattr(parent, "head_dim", None)
    if head_dim and name.endswith(".qkv"):
        heads = layer.out_features // (3 * head_dim)
        if heads % tp:
            raise LayoutError(f"{name}: {heads} attention heads do not split over parallel.tp={tp}; "
                              "choose a tp that divides the number of heads.")


def _divisible(name: str, what: str, n: int, tp: int) -> None:
    if n % tp:
        raise LayoutError(f"{name}: {n} {what} do not split over parallel.tp={tp}; choose a tp that divides {n}.")


def _expect(module: nn.Module, cls: type, name: str, style: str) -> None:
    if not isinstance(module, cls):
        raise LayoutError(f"tp_plan marks {name} as {style!r}, which needs an {cls.__name__}, "
                          f"but it is a {type(module).__name__}")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
