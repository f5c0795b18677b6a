"""Meta-device initialisation: build the model on ``meta``, materialise on each rank only its part.

A model built under ``torch.device("meta")`` holds shapes, no values. Its initial values are a
function of a seed and of module names only, never of the layout, so every rank can compute the
part it owns (its ZeRO-3 shard, its pipeline stages, its tensor-parallel slices) and gets exactly
what one process would hold:

- each module initialises the tensors it registers itself, with the global RNG seeded from
  ``module_key(seed, module name)``: ``reset_parameters()`` where the module defines it (the
  defaults torch modules construct with), then the model's ``init_fn(name, module)``;
- modules run in post-order (children before their parent, as ``nn.Module.apply``), one *unit*
  at a time: each block of ``model.blocks`` (else of the largest ``nn.ModuleList``) is a unit,
  everything outside the blocks is the root unit. A parent may therefore refine its children's
  values inside its unit (HuggingFace's ``_init_weights`` does), never across units;
- a tensor registered by several modules (a tied embedding) keeps the values its first module
  (in that order) gave it.

``keyed_init_`` applies this to a materialised model in place (a one-process build, which
therefore has the same values as any layout). ``KeyedInit`` keeps a meta copy of the model as
built, before any ``apply_*`` step rewrites it, and computes the whole values of one unit at a
time on the CPU from it; ``LocalValues`` cuts them to this rank's tensor-parallel slices, and
``materialize`` swaps them into meta parameters in place (identities kept: optimizers, hooks and
placements refer to the Parameter objects). A rank thus holds at most one unit's full values
beyond what it keeps.
"""
from __future__ import annotations

import copy
import hashlib
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from .placement import Placements

InitFn = Callable[[str, nn.Module], None]
"""``init_fn(name, module)``: initialise the tensors ``module`` registers itself (parameters and
buffers, in place, from the global RNG), optionally refining those of its children inside the
same unit. ``name`` is the module's full name (``""`` for the model)."""

__all__ = ["InitFn", "KeyedInit", "LocalValues", "block_units", "is_meta", "keyed_init_", "materialize", "module_key",
           "swap_in", "to_device", "unit_names"]


def module_key(seed: int, name: str) -> int:
    """The RNG seed of module ``name``'s initialisation: a 63-bit hash of (seed, name)."""
    digest = hashlib.blake2b(f"{int(seed)}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def is_meta(model: nn.Module) -> bool:
    """Whether any parameter or buffer of ``model`` is on the meta device."""
    return any(t.is_meta for t in model.parameters()) or any(t.is_meta for t in model.buffers())


def block_units(model: nn.Module) -> list[nn.Module]:
    """The blocks of ``model``: ``model.blocks``, else the members of its largest ``nn.ModuleList``
    (by parameter count), else none. The units of meta initialisation and of ZeRO-3."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) > 0:
        return list(blocks)
    best, best_n = None, 0
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 1:
            n = sum(p.numel() for p in m.parameters())
            if n > best_n:
                best, best_n = m, n
    return list(best) if best is not None else []


def unit_names(model: nn.Module) -> list[list[str]]:
    """The modules of each initialisation unit, by full name, in post-order: one list per block,
    then the root unit (every module outside the blocks)."""
    name_of: dict[int, str] = {}
    for n, m in model.named_modules():
        name_of.setdefault(id(m), n)
    units: list[list[str]] = []
    in_block: set[int] = set()
    for b in block_units(model):
        units.append(_post_order(b, name_of, in_block))
        in_block.update(id(m) for m in b.modules())
    units.append(_post_order(model, name_of, in_block))
    return units


def _post_order(module: nn.Module, name_of: Mapping[int, str], skip: set[int]) -> list[str]:
    """Names of ``module``'s subtree, children before parents, not entering ``skip``."""
    out: list[str] = []
    seen: set[int] = set(skip)

    def visit(m: nn.Module) -> None:
        seen.add(id(m))
        for c in m.children():
            if id(c) not in seen:
                visit(c)
        out.append(name_of[id(m)])
    visit(module)
    return out


def _own_tensors(m: nn.Module) -> list[torch.Tensor]:
    return [t for t in list(m._parameters.values()) + list(m._buffers.values()) if t is not None]


def _init_unit(modules: Sequence[tuple[str, nn.Module]], seed: int, init_fn: InitFn | None) -> None:
    """Initialise materialised ``modules`` (one unit, post-order) in place; see the module docstring."""
    done: set[int] = set()
    with torch.no_grad():
        for name, m in modules:
            own = _own_tensors(m)
            kept = [(t, t.detach().clone()) for t in own if id(t) in done]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(module_key(seed, name))
                if own and callable(getattr(m, "reset_parameters", None)):
                    m.reset_parameters()
                if init_fn is not None:
                    init_fn(name, m)
            for t, v in kept:
                t.detach().copy_(v)
            done.update(id(t) for t in own)


def keyed_init_(model: nn.Module, seed: int, init_fn: InitFn | None) -> nn.Module:
    """Give a materialised ``model`` its keyed initial values in place (the values ``KeyedInit``
    computes for the same seed, whatever the layout); returns ``model``."""
    mods = dict(model.named_modules())
    for unit in unit_names(model):
        _init_unit([(n, mods[n]) for n in unit], seed, init_fn)
    return model


class KeyedInit:
    """The initial values of a model built on the meta device, computed a unit at a time.

    ``capture`` copies the model's meta module tree (no memory: nothing is allocated) before
    tensor parallelism or a pipeline rewrites it, so values always come from the modules as
    built, under the names ``named_parameters``/``named_buffers`` gave them.
    """

    def __init__(self, template: nn.Module, seed: int, init_fn: InitFn | None):
        self.template, self.seed, self.init_fn = template, int(seed), init_fn
        self._mods = dict(template.named_modules())
        self._units = unit_names(template)
        # Materialising a module gives it new tensors: a tensor two modules share (a tied
        # embedding) must be shared again each time, or the unit would hold two copies.
        slots: dict[int, list[tuple[str, str]]] = {}
        for mname, m in self._mods.items():
            for tname, t in m._parameters.items():
                if t is not None:
                    slots.setdefault(id(t), []).append((mname, tname))
        self._ties = [s for s in slots.values() if len(s) > 1]
        self._unit_of: dict[str, int] = {}
        for i, unit in enumerate(self._units):
            for mname in unit:
                m = self._mods[mname]
                for kind in ("_parameters", "_buffers"):
                    for tname, t in getattr(m, kind).items():
                        if t is not None:
                            self._unit_of.setdefault(f"{mname}.{tname}" if mname else tname, i)

    @classmethod
    def capture(cls, model: nn.Module, seed: int, init_fn: InitFn | None) -> "KeyedInit":
        """A ``KeyedInit`` of ``model`` (on the meta device) for ``seed``."""
        if not all(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
            raise ValueError("KeyedInit.capture needs a model built entirely on the meta device "
                             "(under `with torch.device('meta'):`)")
        return cls(copy.deepcopy(model), seed, init_fn)

    @classmethod
    def of_model(cls, model: nn.Module) -> "KeyedInit":
        """From the model's own ``init_seed`` and ``init_module`` (gigatrain's models define them)."""
        if not (hasattr(model, "init_seed") and callable(getattr(model, "init_module", None))):
            raise ValueError(f"{type(model).__name__} is on the meta device but defines no init_seed and "
                             "init_module: pass an init function (gigatrain.initialize(model, config, "
                             "init_fn=...)), or build it materialised")
        return cls.capture(model, model.init_seed, model.init_module)

    def unit_of(self, name: str) -> int:
        """The unit whose initialisation produces tensor ``name``."""
        try:
            return self._unit_of[name]
        except KeyError:
            raise KeyError(f"the model as built has no parameter or buffer {name!r}") from None

    def values(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, whole initial value)`` for every name, on the CPU, grouped unit by unit; a
        value is valid until the iteration moves past its unit (the unit is then released)."""
        by_unit: dict[int, list[str]] = {}
        for n in names:
            by_unit.setdefault(self.unit_of(n), []).append(n)
        for i in sorted(by_unit):
            mods = [(mname, self._mods[mname]) for mname in self._units[i]]
            for _, m in mods:
                m.to_empty(device="cpu", recurse=False)
            unit = set(self._units[i])
            for tie in self._ties:
                first = getattr(self._mods[tie[0][0]], tie[0][1])
                for mname, tname in tie[1:]:
                    if mname in unit:
                        setattr(self._mods[mname], tname, first)
            try:
                _init_unit(mods, self.seed, self.init_fn)
                lookup = {}
                for mname, m in mods:
                    for kind in ("_parameters", "_buffers"):
                        for tname, t in getattr(m, kind).items():
                            if t is not None:
                                lookup[f"{mname}.{tname}" if mname else tname] = t.detach()
                for n in by_unit[i]:
                    yield n, lookup[n]
            finally:
                for _, m in mods:
                    m.to_empty(device="meta", recurse=False)


class LocalValues:
    """This rank's initial values: ``KeyedInit``'s whole tensors cut to the tensor-parallel
    slice each placement records (``shard=(axis, dim)``: the contiguous block ``coords[axis]`` of
    ``sizes[axis]`` along ``dim``, as ``resharding.local_shards`` cuts checkpoints)."""

    def __init__(self, init: KeyedInit, placements: Placements, coords: Mapping[str, int],
                 sizes: Mapping[str, int]):
        self.init, self.placements, self.coords, self.sizes = init, placements, coords, sizes

    def values(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, local initial value)`` on the CPU, grouped unit by unit (see ``KeyedInit``)."""
        for n, full in self.init.values(names):
            pl = self.placements.get(n)
            if pl is not None and pl.shard is not None:
                axis, dim = pl.shard
                size = full.shape[dim] // self.sizes[axis]
                full = full.narrow(dim, self.coords[axis] * size, size)
            yield n, full


def materialize(tensors: Mapping[str, torch.Tensor], values: LocalValues, device: torch.device) -> None:
    """Give each meta tensor of ``tensors`` (parameters and buffers by full-model name) its
    initial value on ``device``, in place: the Parameter objects stay the same (optimizers,
    hooks and placements refer to them). Tensors already materialised are left alone."""
    targets = {n: t for n, t in tensors.items() if t.is_meta}
    for n, v in values.values(list(targets)):
        t = targets[n]
        if tuple(v.shape) != tuple(t.shape):
            raise ValueError(f"{n}: initial value of shape {tuple(v.shape)} for a tensor of shape {tuple(t.shape)}")
        new = v.to(device=device, dtype=t.dtype, copy=True)
        if isinstance(t, nn.Parameter):
            new = nn.Parameter(new, requires_grad=t.requires_grad)
        swap_in(t, new)


def swap_in(t: torch.Tensor, new: torch.Tensor) -> None:
    """Make the tensor object ``t`` hold ``new``'s data, device and shape (``.data`` cannot move a
    meta tensor), keeping the gradient hooks registered on ``t`` (tensor parallelism's)."""
    hooks = {k: getattr(t, k) for k in ("_backward_hooks", "_post_accumulate_grad_hooks")
             if getattr(t, k, None)}
    torch.utils.swap_tensors(t, new)
    for k, v in hooks.items():
        setattr(t, k, v)


def to_device(module: nn.Module, device: torch.device) -> nn.Module:
    """``module.to(device)``, leaving meta tensors where they are (they are materialised later,
    on the device, only where this rank owns them)."""
    if not is_meta(module):
        return module.to(device)
    return module._apply(lambda t: t if t.is_meta else t.to(device))
