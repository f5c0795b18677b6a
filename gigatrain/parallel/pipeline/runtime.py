"""Execute one rank's pipeline action list for a training step.

``PipelineRuntime`` takes a model that follows the gigatrain protocol (``stem``, ``blocks``,
``head``, ``loss``), a ``Partition`` of its blocks into ``pp * virtual`` stages and a schedule
from ``schedules.build_schedule``; it builds this rank's stage modules and runs its action list
once per ``step``. The runtime decides nothing: order, batching and placement of messages come
from the schedule (see ``schedules`` for the semantics it implements).

- Messages: consecutive SEND/RECV actions are posted as one batch of non-blocking messages
  through the pp group's ``Comm`` (passed explicitly), which counts and records them. On the
  CPU, messages between ranks of one host go through shared memory (``transport="auto"``,
  ``distributed.local_p2p``) rather than gloo's sockets. A received
  tensor is waited for by the compute action that reads it. Receives are posted ahead of their
  place in the schedule (the next ``RECV_AHEAD`` not yet consumed, in the schedule's order, so
  matching is unchanged): a receive posted only when the schedule reaches it, after the compute
  before it, lets the transfer start late, which on gloo puts it on the critical path. Sends are
  released as they complete (their buffers with them) and waited for at the end of the step.
- Shapes: the first message across each stage boundary is preceded by a small header (ndim,
  dtype, shape); both sides cache it, later steps send the tensor alone. Every step must
  therefore use the same micro-batch shapes (``reset_shapes`` renegotiates on all ranks).
- Loss: the last stage computes ``loss_fn(logits, targets) / M`` per micro-batch, so gradients
  accumulated in ``.grad`` over the M micro-batches are those of the mean loss; ``step`` returns
  that mean loss on every pp rank.
- Zero-bubble: ``B`` computes the gradient w.r.t. the stage input with ``torch.autograd.grad``
  (graph retained), ``W`` the parameter gradients with ``torch.autograd.backward(...,
  inputs=params)``; the result in ``.grad`` is bit-identical to a full backward. To keep W from
  repeating B's work, B also collects the gradients at the outputs of the modules that own
  parameters and W goes from each of those to its own weights only (``SplitBackward``). The
  first stage hands no gradient upstream: its B is empty and its W one whole backward.
- Tied weights: a Parameter shared by ``stem`` and ``head`` (GPT's embedding / LM head) exists
  on the first and on the last pp rank. The runtime copies rank 0's value to the last rank at
  construction and, after every step, adds the two ranks' gradients so both copies receive the
  same update (Megatron's approach). With pp == 1 the one Parameter simply accumulates both.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch.autograd.graph import get_gradient_edge

from ...distributed.comm import Comm
from .partition import Partition
from .schedules import B, F, RECV_B, RECV_F, SEND_B, SEND_F, W, Action, stage_rank
from .simulate import validate_schedule
from .timeline import Record

__all__ = ["StageModule", "build_stage_modules", "PipelineRuntime", "SplitBackward", "split_microbatches",
           "tied_parameters"]

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool]
_HEADER = 10  # ndim, dtype code, up to 8 dims


class StageModule(nn.Module):
    """One pipeline stage: the stem (first stage only), a contiguous slice of blocks, and the
    head (last stage only). The submodules are the model's own objects, not copies."""

    def __init__(self, stage: int, n_stages: int, blocks: Sequence[nn.Module],
                 stem: nn.Module | None = None, head: nn.Module | None = None):
        super().__init__()
        self.stage, self.n_stages = stage, n_stages
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.n_stages - 1

    def forward(self, x):
        if self.stem is not None:
            x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        if self.head is not None:
            x = self.head(x)
        return x


def build_stage_modules(model, partition: Partition, rank: int, pp: int, virtual: int = 1) -> list[StageModule]:
    """This rank's chunks, in chunk order: stages ``rank, rank + pp, ..., rank + (virtual-1)*pp``.
    Stage 0 includes ``model.stem``; the last stage includes ``model.head`` (the runtime applies
    ``model.loss`` after it)."""
    n_stages = pp * virtual
    if partition.n_stages != n_stages:
        raise ValueError(f"partition has {partition.n_stages} stages, pp={pp} x virtual={virtual} needs {n_stages}")
    if partition.n_blocks != len(model.blocks):
        raise ValueError(f"partition covers {partition.n_blocks} blocks, the model has {len(model.blocks)}")
    if not 0 <= rank < pp:
        raise ValueError(f"rank {rank} outside pp={pp}")
    chunks = []
    for c in range(virtual):
        s = c * pp + rank
        chunks.append(StageModule(
            s, n_stages, [model.blocks[i] for i in partition.blocks(s)],
            stem=model.stem if s == 0 else None,
            head=model.head if s == n_stages - 1 else None))
    return chunks


def tied_parameters(model) -> list[nn.Parameter]:
    """Parameters that are the same object in ``model.stem`` and ``model.head``."""
    stem_ids = {id(p): p for p in model.stem.parameters()}
    return [p for p in model.head.parameters() if id(p) in stem_ids]


def split_microbatches(batch, n: int) -> list:
    """Cut a batch (a tensor, or a tuple/list of tensors split alike) into ``n`` equal
    micro-batches along dim 0."""
    if isinstance(batch, torch.Tensor):
        if batch.shape[0] % n:
            raise ValueError(f"batch of {batch.shape[0]} does not split into {n} equal micro-batches")
        return list(batch.chunk(n))
    parts = [split_microbatches(t, n) for t in batch]
    return [tuple(p[i] for p in parts) for i in range(n)]


class SplitBackward:
    """Backward split into an input-gradient part (B) and a weight-gradient part (W).

    Forward hooks on every module that owns parameters record that module's output (its
    gradient edge: the graph node it comes from) while ``capture()`` is active.
    ``backward_input`` then asks autograd for the gradients of the stage input *and* of those
    recorded outputs in one pass: the engine follows only the activation chain and skips every
    weight-gradient product (their leaves are not requested).
    ``backward_weight`` finishes each module on its own, from its output gradient to its own
    parameters, accumulating into ``.grad``; each of those graphs reaches nothing but the
    module's weights, so nothing is computed twice and the sum equals a full backward.

    That reasoning needs every parameter to be used by one module call per forward. When a
    module runs twice, or a Parameter is shared by two modules of the stage (a tied embedding
    with the head in the same stage), ``exact`` turns False and W falls back to one backward
    from the stage output into all parameters (correct, but it repeats the activation chain).
    So does a stage whose blocks are recomputed whole (``recompute=full``).

    A stage whose input needs no gradient (the first stage) has nothing to hand upstream, so its
    B does nothing and its W is one ordinary backward: splitting would only add the cost of two
    passes (on CPU, 12-14% more than one for the first stage of a GPT) for no stage to gain
    from.
    """

    def __init__(self, module: nn.Module):
        self.mods: list[list[nn.Parameter]] = []
        owner: dict[int, int] = {}
        self.exact = True
        self._hooks = []
        self._active: list | None = None
        for m in module.modules():
            if getattr(m.forward, "recomputed", False):
                # A block recomputed in backward (recompute=full) would be recomputed by every
                # module's own W pass (each is a graph task of its own), holding all those copies
                # until W ends: one W from the stage output recomputes each block once.
                self.exact = False
            own = [p for p in m.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            idx = len(self.mods)
            for p in own:
                if id(p) in owner:
                    self.exact = False
                owner[id(p)] = idx
            self.mods.append(own)
            self._hooks.append(m.register_forward_hook(self._hook(idx)))
        self.params = [p for p in module.parameters() if p.requires_grad]

    def _hook(self, idx: int):
        def hook(module, args, out):
            if self._active is not None:
                # The output's place in the graph, not the tensor: holding the tensor until W
                # would keep alive outputs that the graph itself does not save (a projection
                # feeding a residual add: 2 of a GPT block's 6, +9% activation memory).
                usable = isinstance(out, torch.Tensor) and out.requires_grad
                self._active.append((idx, get_gradient_edge(out) if usable else None))
        return hook

    def capture(self, fn, *args):
        """Run ``fn(*args)`` recording where parameter-owning modules' outputs enter the graph;
        returns (out, record)."""
        rec: list = []
        self._active = rec
        try:
            out = fn(*args)
        finally:
            self._active = None
        return out, rec

    def _usable(self, rec) -> bool:
        idx = [i for i, _ in rec]
        return (self.exact and len(idx) == len(set(idx)) == len(self.mods)
                and all(edge is not None for _, edge in rec))

    def backward_input(self, y, grad, x, rec):
        """Gradient w.r.t. ``x`` (None when ``x`` needs none); returns (grad_x, weight_work)."""
        want_x = isinstance(x, torch.Tensor) and x.requires_grad
        if not want_x:
            # Nothing upstream waits for this stage's B (the first stage: its input is token
            # ids): the whole backward runs as W, in one pass, with no split to pay for.
            return None, ("full", y, grad)
        if not self._usable(rec):
            gx = torch.autograd.grad(y, [x], grad_outputs=grad, retain_graph=True)[0]
            return gx, ("full", y, grad)
        outs = [o for _, o in rec]
        grads = torch.autograd.grad(y, [x] + outs, grad_outputs=grad, retain_graph=True,
                                    allow_unused=True)
        gx = grads[0]
        per_module = [(self.mods[i], o, g) for (i, o), g in zip(rec, grads[1:])]
        return gx, ("modules", per_module)

    def backward_weight(self, work) -> None:
        if work[0] == "full":
            _, y, grad = work
            if self.params:
                torch.autograd.backward(y, grad_tensors=grad, inputs=self.params)
            return
        for params, edge, g in work[1]:
            if g is not None:  # an output that did not reach the loss has no gradient
                torch.autograd.backward(edge, grad_tensors=g, inputs=params)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


class _Pending:
    """A posted receive: the buffer and, once the batch is issued, its Work."""

    __slots__ = ("buf", "work", "action")

    def __init__(self, buf: torch.Tensor, action: Action):
        self.buf, self.work, self.action = buf, None, action


class PipelineRuntime:
    """Runs this rank's part of a pipeline schedule.

    Args:
        model: protocol model (stem / blocks / head / loss); every pp rank builds the full
            model (same seed) and keeps only its stages' modules in use.
        partition: blocks per stage, ``pp * virtual`` stages.
        schedule: ``build_schedule(kind, pp, M, virtual)`` (all ranks' lists; this rank's is used).
        pp_group: the pipeline group's ``Comm`` (its size is pp, its group rank is the pp rank),
            through which every message is sent, counted and recorded; a bare process group is
            wrapped in a ``Comm`` named "pp" with its own counters. ``None`` runs all stages in
            this process (pp = 1).
        virtual: chunks per rank.
        loss_fn: ``loss_fn(logits, targets) -> scalar``, default ``model.loss``.
        record: keep a ``Record`` per action of the last step in ``self.records``.
        device: where this rank's stages run (default: where their first parameter is).
        transport: ``"auto"``: on the CPU, messages between pp ranks of one host go through
            shared memory (``distributed.local_p2p``: no socket, no transport thread), others
            through the group's backend; ``"backend"``: always the backend.
        timeout_s: how long a receive through shared memory may wait before it fails.
    """

    def __init__(self, model, partition: Partition, schedule: Sequence[Sequence[Action]], *,
                 pp_group, virtual: int = 1, loss_fn: Callable | None = None, record: bool = False,
                 device: torch.device | None = None, transport: str = "auto", timeout_s: float = 600.0):
        if transport not in ("auto", "backend"):
            raise ValueError(f"transport must be 'auto' or 'backend', got {transport!r}")
        self._own_comm = pp_group is not None and not isinstance(pp_group, Comm)
        if self._own_comm:
            pp_group = Comm(pp_group, "pp")
        self.comm = pp_group
        if pp_group is None:  # one stage owner, nothing to send (also without a process group)
            self.pp, self.rank = 1, 0
        else:
            self.pp, self.rank = self.comm.size, self.comm.rank
        if len(schedule) != self.pp:
            raise ValueError(f"schedule has {len(schedule)} rank lists, the pp group has {self.pp} ranks")
        n_stages, _, _ = validate_schedule(schedule)  # static checks only: cheap, and every rank agrees
        if n_stages != self.pp * virtual:
            raise ValueError(f"schedule has {n_stages} stages, pp={self.pp} x virtual={virtual} needs {self.pp * virtual}")
        self.virtual = virtual
        self.n_stages = self.pp * virtual
        self.chunks = build_stage_modules(model, partition, self.rank, self.pp, virtual)
        self.by_stage = {c.stage: c for c in self.chunks}
        self.actions = list(schedule[self.rank])
        all_actions = [a for lst in schedule for a in lst]
        self.microbatches = 1 + max(a.mb for a in all_actions)
        self.split_backward = any(isinstance(a, W) for a in all_actions)
        self.loss_fn = loss_fn if loss_fn is not None else model.loss
        self.record = record
        self.records: list[Record] = []
        self._split = {s: SplitBackward(c) for s, c in self.by_stage.items()} if self.split_backward else {}
        self._in_meta: dict[int, tuple] = {}   # stage -> (shape, dtype) of its input
        self._sent_meta: dict[int, tuple] = {}  # stage -> (shape, dtype) announced for its output
        self._out_meta: dict[int, tuple] = {}   # stage -> (shape, dtype) of its output (its gradient's)
        self._recvs = [a for a in schedule[self.rank] if isinstance(a, (RECV_F, RECV_B))]
        self._recv_index = {a: k for k, a in enumerate(self._recvs)}
        # The device of this rank's own stages (other stages of the model may stay on the CPU).
        p0 = next(iter(self.parameters()), None)
        self.device = device if device is not None else p0.device if p0 is not None else torch.device("cpu")
        # Accurate per-action times on a GPU need a sync at each boundary; only when recording.
        self._sync_times = record and self.device.type == "cuda"
        # Collective over the pp group: every pp rank has the same device type and transport.
        self.shared_memory = (self.pp > 1 and transport == "auto" and self.device.type == "cpu"
                              and self.comm.use_local_p2p(timeout_s=timeout_s))
        self._tied = tied_parameters(model) if self.pp > 1 else []
        self._tie_peer = None
        if self._tied and self.pp > 1:
            # With NCCL the first operation on a group must involve all its ranks; the tied
            # weight exchange below is between the first and last stage only.
            self.comm.barrier()
        if self._tied and self.rank in (0, self.pp - 1):
            self._tie_peer = self.pp - 1 if self.rank == 0 else 0  # a pp (group) rank
            # A meta-device model gets the same keyed initial values on both ranks.
            if not any(p.is_meta for p in self._tied):
                self._sync_tied_values()

    # ---- public -------------------------------------------------------------------------
    def parameters(self):
        """Unique parameters of this rank's stages (what its optimizer should own)."""
        seen, out = set(), []
        for c in self.chunks:
            for p in c.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def reset_shapes(self) -> None:
        """Forget negotiated activation shapes; the next step exchanges headers again. Call on
        every pp rank at the same step."""
        self._in_meta.clear()
        self._sent_meta.clear()
        self._out_meta.clear()

    def step(self, microbatches: Sequence) -> float:
        """Run forward and backward of ``M`` micro-batches ``[(inputs, targets), ...]`` through
        the pipeline, accumulating gradients into ``.grad``. The first stage reads the inputs and
        the last stage the targets (other ranks may pass anything of length M, e.g. the same
        list). Returns the mean loss over the micro-batches on every pp rank."""
        if len(microbatches) != self.microbatches:
            raise ValueError(f"schedule is for {self.microbatches} micro-batches, got {len(microbatches)}")
        self.records = []
        self._mbs = microbatches
        self._fwd_in: dict[tuple[int, int], object] = {}
        self._bwd_in: dict[tuple[int, int], object] = {}
        self._saved: dict[tuple[int, int], tuple] = {}
        self._outbox: dict[tuple[str, int, int], torch.Tensor] = {}
        self._sends: list = []
        self._loss = torch.zeros((), dtype=torch.float32, device=self.device)
        self._next_recv = 0
        acts, i = self.actions, 0
        while i < len(acts):
            if acts[i].is_compute:
                self._post_ahead()
                self._compute(acts[i])
                i += 1
                continue
            j = i
            while j < len(acts) and not acts[j].is_compute:
                j += 1
            self._post(acts[i:j])
            i = j
        for work in self._sends:
            work.wait()
        self._sends = []
        if self._fwd_in or self._bwd_in or self._saved or self._outbox:
            raise RuntimeError("pipeline step ended with unconsumed tensors: the schedule is incomplete")
        if self._tie_peer is not None:
            self._reduce_tied_grads()
        loss = self._loss
        if self.pp > 1:
            self._broadcast(loss, self.pp - 1)
        return float(loss)

    @torch.no_grad()
    def forward_only(self, inputs, post: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Run one batch forward through every stage, without gradients, and return
        ``post(last stage output)`` on every pp rank.

        Every pp rank must call it with the same batch shape (only stage 0 reads ``inputs``).
        The stages run one after the other (no micro-batching): this serves evaluation and
        sampling, where the whole model must see one input while each rank holds only its own
        stages. Shapes are sent with every message, so they may change from call to call (a
        growing context while sampling). ``post`` runs on the last stage (say, the logits of the
        last position, or a loss) and its result is what is broadcast, so the full output never
        travels. The training schedule's state (negotiated shapes, records) is left alone.
        """
        h, out = None, None
        for s in range(self.n_stages):
            if stage_rank(s, self.pp) != self.rank:
                continue
            if s == 0:
                h = inputs.to(self.device) if isinstance(inputs, torch.Tensor) else inputs
            elif stage_rank(s - 1, self.pp) != self.rank:
                h = self._recv_any(stage_rank(s - 1, self.pp))
            h = self.by_stage[s](h)
            if s == self.n_stages - 1:
                out = post(h).contiguous()
            elif stage_rank(s + 1, self.pp) != self.rank:
                self._send_any(h.contiguous(), stage_rank(s + 1, self.pp))
        if self.pp == 1:
            return out
        last = self.pp - 1  # the rank of the last stage (stage_rank(n_stages - 1) == pp - 1)
        hdr = self._header(out) if self.rank == last else torch.empty(_HEADER, dtype=torch.int64,
                                                                      device=self.device)
        self._broadcast(hdr, last)
        shape, dtype = self._parse_header(hdr)
        if self.rank != last:
            out = torch.empty(shape, dtype=dtype, device=self.device)
        self._broadcast(out, last)
        return out

    def _send_any(self, t: torch.Tensor, peer: int) -> None:
        """Send a tensor of any shape: header first, then the data (blocking)."""
        for buf in (self._header(t), t):
            self.comm.p2p_ops([(buf, peer)], [])[0].wait()

    def _recv_any(self, peer: int) -> torch.Tensor:
        hdr = torch.empty(_HEADER, dtype=torch.int64, device=self.device)
        self.comm.p2p_ops([], [(hdr, peer)])[0].wait()
        shape, dtype = self._parse_header(hdr)
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        self.comm.p2p_ops([], [(buf, peer)])[0].wait()
        return buf

    def _broadcast(self, t: torch.Tensor, src: int) -> None:
        self.comm.broadcast(t, src=src)

    # ---- compute ------------------------------------------------------------------------
    def _take(self, table: dict, key) -> torch.Tensor:
        item = table.pop(key)
        if isinstance(item, _Pending):
            t0 = time.perf_counter()
            item.work.wait()
            if self.record:
                self.records.append(Record(self.rank, item.action, t0, time.perf_counter()))
            return item.buf
        return item

    def _compute(self, a: Action) -> None:
        s, m = a.stage, a.mb
        if s not in self.by_stage:
            raise RuntimeError(f"{a!r} is not on pp rank {self.rank}")
        if isinstance(a, F):
            if s == 0:
                x = self._mbs[m][0]
                x = x.to(self.device) if isinstance(x, torch.Tensor) else x
            else:
                x = self._take(self._fwd_in, (s, m))
                if x.is_floating_point():
                    x.requires_grad_(True)
        elif isinstance(a, B):
            grad = None if s == self.n_stages - 1 else self._take(self._bwd_in, (s, m))
        if self._sync_times:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        if isinstance(a, F):
            self._forward(s, m, x)
        elif isinstance(a, B):
            self._backward(s, m, grad)
        elif isinstance(a, W):
            self._weight_grad(s, m)
        else:
            raise TypeError(a)
        if self.record:
            if self._sync_times:
                torch.cuda.synchronize(self.device)
            self.records.append(Record(self.rank, a, t0, time.perf_counter()))

    def _forward(self, s: int, m: int, x) -> None:
        if self.split_backward and s > 0:  # stage 0's W is a whole backward: nothing to record
            y, rec = self._split[s].capture(self.by_stage[s], x)
        else:
            y, rec = self.by_stage[s](x), None
        if s == self.n_stages - 1:
            targets = self._mbs[m][1]
            targets = targets.to(self.device) if isinstance(targets, torch.Tensor) else targets
            y = self.loss_fn(y, targets) / self.microbatches
            self._loss += y.detach().float()
        else:
            out = y.detach()
            self._out_meta.setdefault(s, (out.shape, out.dtype))
            self._hand_over("F", s, m, out)
        self._saved[(s, m)] = (x, y, rec)

    def _backward(self, s: int, m: int, grad) -> None:
        x, y, rec = self._saved[(s, m)]
        if self.split_backward:
            gx, work = self._split[s].backward_input(y, grad, x if s > 0 else None, rec)
            self._saved[(s, m)] = work  # W finishes from here
        else:
            torch.autograd.backward(y, grad_tensors=grad)
            gx = x.grad if s > 0 and isinstance(x, torch.Tensor) else None
            del self._saved[(s, m)]
        if s > 0:
            if gx is None:
                raise RuntimeError(f"stage {s} input got no gradient; cannot send it to stage {s - 1}")
            self._hand_over("B", s, m, gx)

    def _weight_grad(self, s: int, m: int) -> None:
        self._split[s].backward_weight(self._saved.pop((s, m)))

    def close(self) -> None:
        """Remove the forward hooks that the split backward installed, and close the shared-memory
        channels of a ``Comm`` this runtime made itself."""
        for sb in self._split.values():
            sb.close()
        if self._own_comm:
            self.comm.close_local_p2p()

    def _hand_over(self, kind: str, s: int, m: int, t: torch.Tensor) -> None:
        """Give a produced tensor to the neighbouring stage: in memory when it is local (pp==1),
        else to the outbox that the schedule's SEND action empties."""
        dst = s + 1 if kind == "F" else s - 1
        if stage_rank(dst, self.pp) == self.rank:
            (self._fwd_in if kind == "F" else self._bwd_in)[(dst, m)] = t.detach()
        else:
            self._outbox[(kind, s, m)] = t.contiguous()

    # ---- communication ------------------------------------------------------------------
    def _issue(self, sends: list, recvs: list, pendings: list) -> None:
        """Post ``sends`` and ``recvs`` ((tensor, pp rank) pairs) as one batch; ``pendings`` are
        (index into ``recvs``, _Pending) pairs that receive their work."""
        if not sends and not recvs:
            return
        works = self.comm.p2p_ops(sends, recvs)
        self._sends.extend(works[:len(sends)])
        for idx, pend in pendings:
            pend.work = works[len(sends) + idx]

    RECV_AHEAD = 2   # receives posted and not yet consumed, at most, before the schedule needs them

    def _post_ahead(self) -> None:
        """Release completed sends; post the next receives early, in the schedule's order, while
        fewer than ``RECV_AHEAD`` are waiting to be consumed and their shapes are known (after
        the first step). Stops at the first it cannot post, so the order never changes."""
        if self._sends:
            pending = []
            for w in self._sends:
                if w.is_completed():
                    w.wait()
                else:
                    pending.append(w)
            self._sends = pending
        batch = []
        waiting = len(self._fwd_in) + len(self._bwd_in)
        k = self._next_recv
        while k < len(self._recvs) and waiting + len(batch) < self.RECV_AHEAD:
            a = self._recvs[k]
            if (a.stage not in self._in_meta) if isinstance(a, RECV_F) else (a.stage not in self._out_meta):
                break
            batch.append(a)
            k += 1
        if batch:
            self._post(batch)

    def _post(self, batch: Sequence[Action]) -> None:
        sends: list = []
        recvs: list = []
        pendings: list = []
        for a in batch:
            peer = stage_rank(a.peer, self.pp)
            if isinstance(a, (RECV_F, RECV_B)):
                if self._recv_index[a] < self._next_recv:
                    continue                    # posted ahead already
                self._next_recv = self._recv_index[a] + 1
            if isinstance(a, (SEND_F, SEND_B)):
                t = self._outbox.pop((a.direction, a.stage, a.mb))
                if isinstance(a, SEND_F):
                    meta = (tuple(t.shape), t.dtype)
                    if a.stage not in self._sent_meta:
                        sends.append((self._header(t), peer))
                        self._sent_meta[a.stage] = meta
                    elif self._sent_meta[a.stage] != meta:
                        raise RuntimeError(
                            f"stage {a.stage} output changed to {meta} after {self._sent_meta[a.stage]} "
                            "was agreed; micro-batch shapes must stay fixed (or call reset_shapes() "
                            "on every rank)")
                sends.append((t, peer))
            elif isinstance(a, RECV_F):
                if a.stage not in self._in_meta:
                    # The header decides the buffer: issue what we have, then read it.
                    self._issue(sends, recvs, pendings)
                    sends, recvs, pendings = [], [], []
                    hdr = torch.empty(_HEADER, dtype=torch.int64, device=self.device)
                    self.comm.p2p_ops([], [(hdr, peer)])[0].wait()
                    self._in_meta[a.stage] = self._parse_header(hdr)
                shape, dtype = self._in_meta[a.stage]
                pend = _Pending(torch.empty(shape, dtype=dtype, device=self.device), a)
                pendings.append((len(recvs), pend))
                recvs.append((pend.buf, peer))
                self._fwd_in[(a.stage, a.mb)] = pend
            elif isinstance(a, RECV_B):
                if (a.stage, a.mb) in self._saved:
                    y = self._saved[(a.stage, a.mb)][1]  # (x, y, record) until B runs
                    shape, dtype = y.shape, y.dtype
                elif a.stage in self._out_meta:
                    shape, dtype = self._out_meta[a.stage]
                else:
                    raise RuntimeError(f"{a!r} is posted before stage {a.stage} produced any output, "
                                       "so the gradient's shape is unknown")
                pend = _Pending(torch.empty(shape, dtype=dtype, device=self.device), a)
                pendings.append((len(recvs), pend))
                recvs.append((pend.buf, peer))
                self._bwd_in[(a.stage, a.mb)] = pend
            else:
                raise TypeError(a)
        self._issue(sends, recvs, pendings)

    def _header(self, t: torch.Tensor) -> torch.Tensor:
        if t.dim() > _HEADER - 2:
            raise ValueError(f"activations with {t.dim()} dims exceed the header's {_HEADER - 2}")
        h = [t.dim(), _DTYPES.index(t.dtype)] + list(t.shape)
        h += [0] * (_HEADER - len(h))
        return torch.tensor(h, dtype=torch.int64, device=self.device)

    @staticmethod
    def _parse_header(h: torch.Tensor) -> tuple:
        v = h.tolist()
        ndim, code = v[0], v[1]
        return tuple(v[2:2 + ndim]), _DTYPES[code]

    # ---- tied weights -------------------------------------------------------------------
    def _sync_tied_values(self) -> None:
        """Make the last rank's copies equal rank 0's before training starts."""
        with torch.no_grad():
            for p in self._tied:
                buf = p.data if self.rank == 0 else torch.empty_like(p.data)
                msg = [(buf, self._tie_peer)]
                # Set-up, not step traffic: kept out of the byte counts.
                self.comm.p2p_ops(msg if self.rank == 0 else [], [] if self.rank == 0 else msg,
                                  count=False)[0].wait()
                if self.rank != 0:
                    p.data.copy_(buf)

    def _reduce_tied_grads(self) -> None:
        """Sum the tied parameters' gradients of rank 0 (embedding use) and the last rank (head
        use). Both compute own + other; float addition commutes, so the copies stay identical."""
        for p in self._tied:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            other = torch.empty_like(p.grad)
            works = self.comm.p2p_ops([(p.grad, self._tie_peer)], [(other, self._tie_peer)])
            for w in works:
                w.wait()
            p.grad.add_(other)
