"""Flat shards shared by every gradient strategy: layout, optimizer pieces, name-keyed state.

A *segment* is a group of parameters laid out one after another in one flat buffer of ``padded``
elements (a ZeRO-1/2 bucket, a ZeRO-3 unit, or a single whole parameter for plain data
parallel); this rank owns ``[lo, hi)`` of it. Decaying parameters come first in a segment, so the
owned range splits into at most two *pieces*, one per weight-decay setting, and each piece is one
fp32 tensor the optimizer sees: the optimizer then applies exactly the hyper-parameters one
process would.

``StateCodec`` maps between the full, name-keyed state a checkpoint holds (``model
.named_parameters()`` names; optimizer states by parameter name and torch's key) and whatever
segments a strategy keeps, so any layout loads what any other saved.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import torch
import torch.nn as nn

from ...optim import decays

if TYPE_CHECKING:
    from ...distributed.comm import Comm
    from ..strategy import FullState, OptimizerFactory


@dataclass
class Piece:
    """``[start, end)`` of a segment's owned range (0 = ``lo``) with one weight-decay setting."""

    start: int
    end: int
    decay: bool
    param: nn.Parameter | None = None   # the optimizer's tensor for this range
    # (start, end, key) sub-ranges of this piece, relative to ``start``, by the parameter they
    # belong to (``key``: its index in the model's parameter order); set by ``layer_spans``.
    spans: list[tuple[int, int, int]] | None = None

    @property
    def numel(self) -> int:
        return self.end - self.start


@dataclass
class Segment:
    """Parameters packed into one flat buffer of ``padded`` elements; this rank owns ``[lo, hi)``,
    which starts at ``offset`` in the rank's flat shard buffers (when it keeps any)."""

    params: list[nn.Parameter]
    names: list[str]
    offsets: list[int]
    padded: int
    lo: int
    hi: int
    offset: int
    pieces: list[Piece]

    @property
    def shard_numel(self) -> int:
        return self.hi - self.lo

    @property
    def shard(self) -> slice:
        """This segment's owned range inside the rank's flat shard buffers."""
        return slice(self.offset, self.offset + self.shard_numel)


def decay_pieces(params: Sequence[nn.Parameter], names: Sequence[str], offsets: Sequence[int],
                 padded: int, lo: int, hi: int) -> list[Piece]:
    """The decay / no-decay pieces of ``[lo, hi)`` (decaying parameters must come first).

    Padding at the end of the segment joins the last piece (it stays zero either way), so every
    rank has at least one piece in every segment and issues the same state gathers."""
    flags = [decays(n, p) for n, p in zip(names, params)]
    decay_ends = [o + p.numel() for p, o, d in zip(params, offsets, flags) if d]
    other_starts = [o for o, d in zip(offsets, flags) if not d]
    split = min(other_starts) if other_starts else padded
    if decay_ends and max(decay_ends) > split:
        raise AssertionError("segment does not hold its decaying parameters first")
    pieces = []
    if lo < min(hi, split):
        pieces.append(Piece(0, min(hi, split) - lo, True))
    if max(lo, split) < hi:
        pieces.append(Piece(max(lo, split) - lo, hi - lo, False))
    return pieces


def kept_ranges(seg: Segment, skip: set[int]) -> list[tuple[int, int]]:
    """Ranges of ``seg``'s owned part (relative to ``lo``) that hold no parameter whose id is in
    ``skip``."""
    if not skip:
        return [(0, seg.shard_numel)]
    out, pos = [], 0
    for p, o in zip(seg.params, seg.offsets):
        if id(p) not in skip:
            continue
        a, b = max(o, seg.lo) - seg.lo, min(o + p.numel(), seg.hi) - seg.lo
        if a < b:
            if pos < a:
                out.append((pos, a))
            pos = b
    if pos < seg.shard_numel:
        out.append((pos, seg.shard_numel))
    return out


def local_sq_norm(segments: Sequence[Segment], grad_of: Callable[[Segment], torch.Tensor],
                  skip: set[int]) -> float:
    """Sum of the squared gradient entries this rank owns (``grad_of(seg)``: the segment's owned
    range), leaving out the parameters whose id is in ``skip``; summed in fp64 range by range."""
    acc = torch.zeros((), dtype=torch.float64, device=grad_of(segments[0]).device)
    for seg in segments:
        g = grad_of(seg)
        for a, b in kept_ranges(seg, skip):
            acc += g[a:b].float().pow(2).sum()
    return float(acc)


def attach_pieces(segments: Sequence[Segment], base: Callable[[Segment], torch.Tensor]) -> list[Piece]:
    """Make every piece's optimizer tensor a flat view of ``base(segment)`` (the segment's owned
    range of whatever the optimizer updates in place); all pieces, in segment order."""
    pieces = []
    for seg in segments:
        flat = base(seg)
        for pc in seg.pieces:
            pc.param = nn.Parameter(flat[pc.start:pc.end])
            pieces.append(pc)
    return pieces


@dataclass(frozen=True)
class ShardLayout:
    """What a layer-wise optimizer (LAMB) needs to know about sharded pieces: the group the
    other parts of each parameter live on, and how many parameters the keys of ``Piece.spans``
    count (the same on every rank of ``comm``)."""

    comm: Comm | None
    n_keys: int


def layer_spans(segments: Sequence[Segment], order: Sequence[str], comm: Comm | None) -> ShardLayout:
    """Record on every piece of ``segments`` which parameter each of its ranges belongs to
    (``Piece.spans``, keys = indices in ``order``, the model's parameter names), so that norms of
    whole parameters can be summed over ranges and over the ranks of ``comm``."""
    key = {n: i for i, n in enumerate(order)}
    for seg in segments:
        for pc in seg.pieces:
            a0, b0 = seg.lo + pc.start, seg.lo + pc.end
            pc.spans = [(max(a0, o) - a0, min(b0, o + p.numel()) - a0, key[n])
                        for p, n, o in zip(seg.params, seg.names, seg.offsets)
                        if max(a0, o) < min(b0, o + p.numel())]
    return ShardLayout(comm, len(order))


def optimizer_over(factory: OptimizerFactory, pieces: Sequence[Piece],
                   layout: ShardLayout | None = None) -> torch.optim.Optimizer:
    """``factory`` over the pieces' tensors, one group per decay setting (decaying first).

    With ``layout`` the groups also carry ``spans`` (each tensor's ``Piece.spans``),
    ``shard_keys`` and ``shard_comm``, which layer-wise optimizers need and others ignore."""
    groups = []
    for d in (True, False):
        mine = [pc for pc in pieces if pc.decay == d]
        g = {"params": [pc.param for pc in mine], "decay": d}
        if layout is not None:
            g.update(spans=[pc.spans for pc in mine], shard_keys=layout.n_keys, shard_comm=layout.comm)
        groups.append(g)
    groups = [g for g in groups if g["params"]]
    if not groups:   # nothing trainable here: torch refuses an optimizer without parameters
        groups = [{"params": [nn.Parameter(torch.zeros(0))], "decay": False}]
    return factory(groups)


def torch_step(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter],
               grads: Sequence[torch.Tensor], coef: float) -> None:
    """One ``optimizer.step()`` of ``params`` (fp32) on ``grads`` (their gradients, any float
    dtype) times ``coef``; only these parameters move (torch skips those without a gradient).

    fp32 gradients are scaled in place (callers zero them after the step); lower-precision ones
    are copied into one fp32 buffer, the only fp32 copy alive.
    """
    if all(g.dtype == torch.float32 for g in grads):
        g32 = list(grads)
        if coef != 1.0:
            for g in g32:
                g.mul_(coef)
    else:
        scratch = torch.empty(sum(g.numel() for g in grads), dtype=torch.float32, device=grads[0].device)
        g32, off = [], 0
        for g in grads:
            g32.append(scratch[off:off + g.numel()].view_as(g))
            g32[-1].copy_(g)
            off += g.numel()
        if coef != 1.0:
            scratch.mul_(coef)
    for p, g in zip(params, g32):
        p.grad = g.view_as(p)
    try:
        optimizer.step()
    finally:
        for p in params:
            p.grad = None


# -- optimizer state of a piece, whatever holds it -----------------------------------------------
class PieceStates(Protocol):
    """Read and replace the optimizer state of one piece (keys as torch's optimizers name them)."""

    def get(self, seg: Segment, pc: Piece) -> dict[str, torch.Tensor | float]: ...

    def put(self, seg: Segment, pc: Piece, per_element: dict[str, torch.Tensor], step: float | None) -> None: ...


class TorchStates:
    """The states of a torch optimizer whose parameters are the pieces' tensors."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def get(self, seg: Segment, pc: Piece) -> dict:
        return self.optimizer.state.get(pc.param, {})

    def put(self, seg: Segment, pc: Piece, per_element: dict[str, torch.Tensor], step: float | None) -> None:
        p = pc.param
        old = self.optimizer.state.get(p, {})
        st = {}
        for k, v in per_element.items():
            v = v.view(p.shape)
            if torch.is_tensor(old.get(k)) and old[k].shape == p.shape:
                st[k] = old[k].copy_(v)     # keep preallocated (e.g. page-locked host) buffers
            else:
                st[k] = v.to(device=p.device, dtype=p.dtype).clone()
        if step is not None:
            # torch keeps ``step`` as a CPU float tensor unless the optimizer is fused/capturable.
            st["step"] = torch.tensor(float(step), dtype=torch.float32)
            if self.optimizer.defaults.get("fused") or self.optimizer.defaults.get("capturable"):
                st["step"] = st["step"].to(p.device)
        self.optimizer.state[p] = st


class FlatFileStates:
    """The states of an ``NVMeOptimizer``: flat files indexed by the rank's shard offsets."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def get(self, seg: Segment, pc: Piece) -> dict:
        opt = self.optimizer
        if not opt.steps:
            return {}
        st: dict = {k: opt.read(k, seg.offset + pc.start, pc.numel) for k in opt.state_keys}
        if opt.spec.kind in ("adamw", "adam"):
            st["step"] = float(opt.steps)
        return st

    def put(self, seg: Segment, pc: Piece, per_element: dict[str, torch.Tensor], step: float | None) -> None:
        opt = self.optimizer
        for k in opt.state_keys:
            v = per_element.get(k)
            opt.write(k, v if v is not None else torch.zeros(pc.numel), seg.offset + pc.start)
        # SGD saves no step; its momentum buffers exist once a first step has been taken.
        opt.steps = int(step) if step is not None else (1 if per_element else 0)


# -- this rank's pieces of the name-keyed state (sharded checkpoints) ------------------------------
@dataclass
class StatePiece:
    """A range of one parameter's values, or of one of its optimizer states, that a strategy
    holds: ``[start, end)`` of the parameter's flattened (local) tensor. ``data()`` produces the
    values (1-D fp32 on the CPU, possibly a view of live storage: write it before the next
    update); ``replicated`` pieces are identical on every dp rank (dp rank 0 writes them)."""

    name: str
    key: str | None                     # None: the parameter's values; else torch's state key
    start: int
    end: int
    data: Callable[[], torch.Tensor]
    replicated: bool = False


class PieceSource(Protocol):
    """Where ``StateCodec.load_pieces`` reads this rank's pieces of a saved state (a sharded
    checkpoint, seen through this rank's tensor-parallel slices)."""

    def read(self, name: str, key: str | None, start: int, end: int) -> torch.Tensor:
        """``[start, end)`` of the flattened (local) parameter ``name`` or of its state ``key``."""

    def state_keys(self, name: str) -> list[str]:
        """The per-element optimizer state keys saved for ``name`` (none: no state)."""

    def scalar(self, name: str, key: str) -> float | None:
        """A scalar optimizer state of ``name`` (Adam's ``step``), or None."""


class _SegmentCache:
    """The last segment's owned range of its values (``key`` None) or of one state key, on the
    CPU, computed once for all the pieces cut from it."""

    def __init__(self, codec: "StateCodec", master: Callable[[Segment], torch.Tensor], states: PieceStates):
        self.codec, self.master, self.states, self.key, self.value = codec, master, states, None, None

    def get(self, seg: Segment, key: str | None) -> torch.Tensor:
        if self.key != (id(seg), key):
            self.value = None
            if key is None:
                m = self.master(seg).detach().reshape(-1)
                if m.numel() == seg.padded and seg.hi - seg.lo != seg.padded:
                    m = m[seg.lo:seg.hi]
                self.value = m.to("cpu", torch.float32)
            else:
                self.value = self.codec._local(seg, self.states, key).to("cpu")
            self.key = (id(seg), key)
        return self.value


# -- the name-keyed codec ------------------------------------------------------------------------
class StateCodec:
    """Full, name-keyed state <-> this rank's part of ``segments``.

    ``frozen`` are the (name, parameter) pairs no segment holds (not trained, not sharded);
    ``order`` is the name order of the result (``model.named_parameters()``). ``comm`` is the
    group the segments are sharded over; it is only used for segments this rank does not hold
    whole, and then every rank of it must make the same calls.
    """

    def __init__(self, segments: Sequence[Segment], *, comm: Comm | None, device: torch.device,
                 frozen: Sequence[tuple[str, nn.Parameter]] = (), order: Sequence[str] = ()):
        self.segments = list(segments)
        self.comm = comm
        self.device = device
        self.frozen = list(frozen)
        self.order = list(order)

    def _full(self, seg: Segment, values: torch.Tensor) -> torch.Tensor:
        """The whole segment, fp32 on the CPU, from this rank's owned range (or the whole)."""
        if values.numel() == seg.padded:
            return values.detach().reshape(-1).to("cpu", torch.float32)
        local = values.detach().reshape(-1).to(self.device, torch.float32)
        out = torch.empty(seg.padded, dtype=torch.float32, device=self.device)
        self.comm.all_gather(out, local)
        return out.cpu()

    def _state_kinds(self, states: PieceStates) -> tuple[set[str], dict[str, float]]:
        """The per-element optimizer state keys (tensors as long as their piece, ``step``
        excepted) and the scalar states (the last value seen for each other key)."""
        keys: set[str] = set()
        scalars: dict[str, float] = {}
        for seg in self.segments:
            for pc in seg.pieces:
                for k, v in states.get(seg, pc).items():
                    if torch.is_tensor(v) and k != "step" and v.numel() == pc.numel:
                        keys.add(k)
                    else:
                        scalars[k] = float(v)
        return keys, scalars

    def export(self, master: Callable[[Segment], torch.Tensor], states: PieceStates) -> FullState:
        """(parameters by name, optimizer state by name): full fp32 tensors on the CPU.

        ``master(seg)`` gives the fp32 values of the segment's owned range (or of the whole
        segment, when this rank has all of it). Collective over ``comm``."""
        keys, scalars = self._state_kinds(states)
        params: dict[str, torch.Tensor] = {}
        optim: dict[str, dict[str, torch.Tensor]] = {}
        for seg in self.segments:
            full = self._full(seg, master(seg))
            per_element = {k: self._full(seg, self._local(seg, states, k)) for k in sorted(keys)}
            for p, n, o in zip(seg.params, seg.names, seg.offsets):
                params[n] = full[o:o + p.numel()].view(p.shape).clone()
                if per_element or scalars:
                    st = {k: torch.tensor(v, dtype=torch.float32) for k, v in scalars.items()}
                    st.update({k: f[o:o + p.numel()].view(p.shape).clone() for k, f in per_element.items()})
                    optim[n] = st
        for n, p in self.frozen:
            params[n] = p.detach().to("cpu", torch.float32).clone()
        rank = {n: i for i, n in enumerate(self.order)}
        return dict(sorted(params.items(), key=lambda kv: rank.get(kv[0], len(rank)))), optim

    def _local(self, seg: Segment, states: PieceStates, key: str) -> torch.Tensor:
        out = torch.zeros(seg.shard_numel, dtype=torch.float32, device=self.device)
        for pc in seg.pieces:
            v = states.get(seg, pc).get(key)
            if v is not None:
                out[pc.start:pc.end].copy_(v.reshape(-1))
        return out

    def load(self, params: dict[str, torch.Tensor], optim: dict[str, dict[str, torch.Tensor]] | None,
             master: Callable[[Segment, torch.Tensor], None], states: PieceStates) -> None:
        """Take this rank's part of a full state (as ``export`` returns; any layout saved it).

        ``master(seg, full)`` stores the whole segment's fp32 values (CPU) wherever the strategy
        keeps them. The optimizer state of a segment none of whose parameters has state in
        ``optim`` is left as it is. Raises ``KeyError`` for missing parameters and
        ``ValueError`` for shape mismatches, before changing anything.
        """
        wanted = [(n, p) for seg in self.segments for n, p in zip(seg.names, seg.params)] + self.frozen
        missing = sorted(n for n, _ in wanted if n not in params)
        if missing:
            raise KeyError(f"checkpoint lacks parameters: {missing[:5]}{'...' if len(missing) > 5 else ''}")
        for n, p in wanted:
            if tuple(params[n].shape) != tuple(p.shape):
                raise ValueError(f"parameter {n}: checkpoint shape {tuple(params[n].shape)} != model {tuple(p.shape)}")
        with torch.no_grad():
            for n, p in self.frozen:
                p.data.copy_(params[n])
            for seg in self.segments:
                master(seg, self._flat(seg, params.get))
                if optim:
                    self._load_states(seg, optim, states)

    def pieces(self, master: Callable[[Segment], torch.Tensor], states: PieceStates, *,
               replicated: bool = False) -> tuple[list[StatePiece], dict[tuple[str, str], float]]:
        """This rank's pieces of the state (no communication): for every parameter a segment's
        owned range overlaps, its values and per-element optimizer states on that range; frozen
        parameters whole and ``replicated``. Also the scalar states (by parameter name and key),
        recorded with the piece that holds a parameter's first element. ``replicated``: the
        segments are the same on every dp rank (plain data parallel)."""
        keys, scalars = self._state_kinds(states)
        cache = _SegmentCache(self, master, states)
        out: list[StatePiece] = []
        held: dict[tuple[str, str], float] = {}
        for seg in self.segments:
            for p, n, o in zip(seg.params, seg.names, seg.offsets):
                a, b = max(o, seg.lo), min(o + p.numel(), seg.hi)
                if a >= b:
                    continue
                lo, hi = a - seg.lo, b - seg.lo
                out.append(StatePiece(n, None, a - o, b - o,
                                      lambda seg=seg, lo=lo, hi=hi: cache.get(seg, None)[lo:hi], replicated))
                for k in sorted(keys):
                    out.append(StatePiece(n, k, a - o, b - o,
                                          lambda seg=seg, k=k, lo=lo, hi=hi: cache.get(seg, k)[lo:hi], replicated))
                if a == o:
                    held.update({(n, k): v for k, v in scalars.items()})
        for n, p in self.frozen:
            out.append(StatePiece(n, None, 0, p.numel(),
                                  lambda p=p: p.detach().reshape(-1).to("cpu", torch.float32), True))
        return out, held

    def load_pieces(self, source: PieceSource, master: Callable[[Segment, torch.Tensor], None],
                    states: PieceStates, *, whole_values: bool) -> None:
        """Take this rank's part of a saved state from ``source``, reading only what the rank
        holds: the owned range of every segment (or, with ``whole_values``, every segment's whole
        values, when the rank keeps full parameters: stages 0-2) and the optimizer states of the
        owned ranges. ``master(seg, full)`` as for ``load``; the caller has checked names and
        shapes. A segment none of whose parameters has saved state keeps its optimizer state."""
        with torch.no_grad():
            for n, p in self.frozen:
                p.data.copy_(source.read(n, None, 0, p.numel()).view(p.shape))
            for seg in self.segments:
                lo, hi = (0, seg.padded) if whole_values else (seg.lo, seg.hi)
                full = torch.zeros(seg.padded, dtype=torch.float32)
                self._read_range(seg, source, None, lo, hi, full[lo:hi])
                master(seg, full)
                del full
                keys = sorted({k for n in seg.names for k in source.state_keys(n)})
                if not keys:
                    continue
                step = next((v for n in seg.names if (v := source.scalar(n, "step")) is not None), None)
                per_element = {}
                for k in keys:
                    own = torch.zeros(seg.shard_numel, dtype=torch.float32)
                    self._read_range(seg, source, k, seg.lo, seg.hi, own)
                    per_element[k] = own
                for pc in seg.pieces:
                    states.put(seg, pc, {k: f[pc.start:pc.end] for k, f in per_element.items()}, step)

    @staticmethod
    def _read_range(seg: Segment, source: PieceSource, key: str | None, lo: int, hi: int, out: torch.Tensor) -> None:
        """Fill ``out`` (the segment's ``[lo, hi)``) from ``source``; padding stays zero."""
        for p, n, o in zip(seg.params, seg.names, seg.offsets):
            a, b = max(o, lo), min(o + p.numel(), hi)
            if a < b and (key is None or key in source.state_keys(n)):
                out[a - lo:b - lo] = source.read(n, key, a - o, b - o)

    def _load_states(self, seg: Segment, optim: dict, states: PieceStates) -> None:
        present = [optim[n] for n in seg.names if n in optim]
        if not present:
            return
        step = next((float(st["step"]) for st in present if "step" in st), None)
        keys = sorted({k for st in present for k in st} - {"step"})
        per_element = {k: self._flat(seg, lambda n, k=k: optim.get(n, {}).get(k)) for k in keys}
        for pc in seg.pieces:
            a, b = seg.lo + pc.start, seg.lo + pc.end
            states.put(seg, pc, {k: f[a:b] for k, f in per_element.items()}, step)

    @staticmethod
    def _flat(seg: Segment, get: Callable[[str], torch.Tensor | None]) -> torch.Tensor:
        """The whole segment as one fp32 CPU tensor (zero where ``get`` has nothing)."""
        out = torch.zeros(seg.padded, dtype=torch.float32)
        for p, n, o in zip(seg.params, seg.names, seg.offsets):
            src = get(n)
            if src is not None:
                if tuple(src.shape) != tuple(p.shape):
                    raise ValueError(f"parameter {n}: checkpoint shape {tuple(src.shape)} != model {tuple(p.shape)}")
                out[o:o + p.numel()] = src.reshape(-1).float()
        return out


# -- a whole model on every rank (plain data parallel, one-process references) --------------------
def whole_segments(model: nn.Module) -> list[Segment]:
    """One segment per trainable parameter, held whole (the first name of a tied weight);
    the piece's tensor is the parameter itself."""
    out = []
    for n, p in model.named_parameters():
        if p.requires_grad:
            out.append(Segment([p], [n], [0], p.numel(), 0, p.numel(), 0,
                               [Piece(0, p.numel(), decays(n, p), p)]))
    return out


def whole_model_codec(model: nn.Module, device: torch.device | None = None) -> StateCodec:
    """The codec of a model every rank holds whole, optimized by a torch optimizer over its own
    parameters (nothing is communicated)."""
    dev = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    return StateCodec(whole_segments(model), comm=None, device=dev, frozen=frozen,
                      order=[n for n, _ in model.named_parameters()])


def whole_master(seg: Segment) -> torch.Tensor:
    """The values of a segment of ``whole_segments``: its parameter, flat."""
    return seg.params[0].detach().reshape(-1)


def load_whole_master(seg: Segment, full: torch.Tensor) -> None:
    """Store a segment of ``whole_segments`` into its parameter."""
    p = seg.params[0]
    p.copy_(full[:p.numel()].view(p.shape))


class NoStates:
    """No optimizer: no states to export, none to load."""

    def get(self, seg: Segment, pc: Piece) -> dict:
        return {}

    def put(self, seg: Segment, pc: Piece, per_element, step) -> None:
        raise RuntimeError("there is no optimizer to load states into")
