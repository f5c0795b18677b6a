"""Time of one training step for a layout: FLOPs, device rates, collectives, the pipeline.

- FLOPs per block are analytic (``block_flops``); each matmul runs at the device's rate for its
  size (``Device.matmul_rate``: a calibrated table, or a preset efficiency curve), elementwise
  work (LayerNorms, GELU, residual adds, the loss) at the memory bandwidth.
- Collectives follow the alpha-beta model of a bandwidth-optimal ring over the link class the
  group spans (``collective_time``): inside a node while the group's ranks fit in one (tensor
  parallel is innermost in the rank order, then pipeline, then data parallel), across nodes
  otherwise.
- Tensor parallel (Megatron): per block, two all-reduces of ``b s h`` in forward and two in
  backward (sequence parallel: an all-gather and a reduce-scatter for each, the same bytes, and
  in backward two more all-gathers, of the inputs the column-parallel layers did not save, and
  six small all-reduces of the gradients of parameters that saw a sequence shard); they sit on
  the critical path. Full recomputation repeats the forward, its all-reduces included; selective
  recomputation repeats the attention core.
- Ranks that share cores (``Device.core_share`` < 1, a CPU calibrated with more ranks than
  cores): a pipeline's waiting ranks lend their cores to the busy ones, which the replay
  follows (``pipeline._replay_shared``: while ``n`` of ``pp`` ranks compute, each runs
  ``min(1 / core_share, pp / n)`` times its all-busy rate), so the fill and drain cost less.
- Fixed costs (``Device.block_fixed_f``/``_b``, ``Device.action_overhead``, calibrated on a
  real block): each block pays its forward and backward fixed cost once per micro-batch (its
  forward again under full recomputation), the embedding and head together one block's, and
  every call of a chunk (a pipeline compute action; without a pipeline, each micro-batch's
  forward and backward) the per-action overhead. So small micro-batches and many small
  pipeline chunks cost what they cost on a device where operators are short.
- Pipeline: ``pipeline.makespan_units`` replays the schedule with the predicted chunk costs and
  hand-off time; the first and last stages also run the embedding and the head, which the other
  stages wait for once per micro-batch.
- Data parallel, as the engine does it: without a pipeline, gradient reduction overlaps the
  last micro-batch's backward (ZeRO-2 and -3 overlap every micro-batch's; ZeRO-3 gathers each
  unit while the previous one computes) and only what does not fit under it, or at least one
  bucket, is exposed (all of it on a device without ``Device.comm_overlap``: gloo on a CPU
  reduces and copies on the cores the compute uses); with a pipeline the reduction starts after
  the flush and is exposed whole, as are ZeRO-1's parameter all-gather and the tied-embedding
  reduction between the first and last stage. The optimizer step runs at memory bandwidth on
  the device, or at ``Device.cpu_adam_rate`` plus the copies over PCIe when offloaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .memory import Job, Layout, rank_params, stage_sizes
from .pipeline import free_makespan_units, makespan_lower_bound, makespan_units

__all__ = ["collective_time", "block_flops", "narayanan_flops", "counted_flops", "StepTime", "step_time",
           "block_times"]


def collective_time(kind: str, nbytes: float, n: int, device, inter: bool) -> float:
    """Seconds for a collective over ``n`` ranks on one link class. ``nbytes`` is the full
    tensor (the all-reduced buffer, the gathered result, the reduce-scattered input, or the
    message): ring all-reduce ``2(n-1) alpha + 2 (n-1)/n bytes / bw``; all-gather and
    reduce-scatter half of that; point-to-point ``alpha + bytes / bw``. Inside a node a
    calibrated device's own fit for the op (``Device.collective_fit``) replaces alpha and bw."""
    fit = None if inter else device.collective_fit(kind)
    bw = (device.inter_bw if inter else device.intra_bw) * device.link_eff
    alpha = device.inter_alpha if inter else device.intra_alpha
    if fit is not None:
        alpha, bw = fit[0], fit[1] * device.link_eff
    if kind == "p2p":
        return alpha + nbytes / bw
    if n <= 1 or nbytes <= 0:
        return 0.0
    steps = 2 * (n - 1) if kind == "all_reduce" else n - 1
    if kind not in ("all_reduce", "all_gather", "reduce_scatter"):
        raise ValueError(f"unknown collective {kind!r}")
    return steps * alpha + steps / n * nbytes / bw


def block_flops(s: int, b: int, h: int) -> dict:
    """Forward FLOPs of one transformer block: the four matmuls (qkv ``6 b s h^2``, projection
    ``2 b s h^2``, MLP ``8 + 8 b s h^2``) and the attention scores and weighted sum
    (``2 b s^2 h`` each). Backward is twice the forward."""
    return {"qkv": 6 * b * s * h * h, "proj": 2 * b * s * h * h, "fc": 8 * b * s * h * h,
            "fc2": 8 * b * s * h * h, "scores": 2 * b * s * s * h, "context": 2 * b * s * s * h}


def narayanan_flops(B: int, s: int, l: int, h: int, V: int, full_recompute: bool) -> float:
    """FLOPs per step as Narayanan et al. 2021 count them for a GPT: with full recomputation
    ``96 B s l h^2 (1 + s/(6h) + V/(16 l h))``; without, ``72 B s l h^2 (1 + s/(6h) +
    V/(12 l h))`` (the logit layer, ``6 B s h V``, is not recomputed, so its term is the same in
    both)."""
    if full_recompute:
        return 96.0 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))
    return 72.0 * B * s * l * h * h * (1 + s / (6 * h) + V / (12 * l * h))


def counted_flops(job: Job, recompute: str) -> float:
    """FLOPs per step credited to a layout: ``narayanan_flops`` for a GPT; for a ViT the same
    block terms and its classifier on the class token. Selective recomputation is counted as
    none (its extra attention work is not credited, as Korthikanti et al. do for model FLOPs)."""
    m = job.model
    full = recompute == "full"
    if m.name == "gpt":
        return narayanan_flops(job.global_batch, m.seq, m.n_layer, m.d_model, m.vocab, full)
    k = 96.0 if full else 72.0
    B, s, l, h = job.global_batch, m.seq, m.n_layer, m.d_model
    return k * B * s * l * h * h * (1 + s / (6 * h)) + 6.0 * B * h * m.vocab


def _gemm_time(device, flops: float) -> float:
    return flops / device.matmul_rate(flops) if flops > 0 else 0.0


def _inter(group_span: int, device) -> bool:
    return group_span > device.gpus_per_node


@dataclass(frozen=True)
class BlockTimes:
    """Seconds per block and micro-batch on one rank: forward, backward input-gradient part
    (recomputation included), weight-gradient part, and the tensor-parallel communication inside
    those (forward and backward together)."""

    f: float
    b: float
    w: float
    tp_comm: float


def block_times(job: Job, lay: Layout, device) -> BlockTimes:
    """Time of one block for one micro-batch (see ``BlockTimes``)."""
    m, t, e = job.model, lay.tp, job.elem_bytes
    s, h, bsz = m.seq, m.d_model, lay.micro_batch
    fl = block_flops(s, bsz, h)
    gemm = sum(_gemm_time(device, fl[k] / t) for k in ("qkv", "proj", "fc", "fc2"))
    attn = sum(_gemm_time(device, fl[k] / t) for k in ("scores", "context"))
    tokens = s * bsz
    # LayerNorms and residual adds (10 h per token) run replicated unless sequence parallel
    # shards them; GELU (8 h) is split with the MLP.
    elem = tokens * e * (10 * h / (t if lay.sp else 1) + 8 * h / t) / device.mem_bw
    if not m.flash:
        # Scores written, scaled, masked, softmaxed, dropped out and read back: ~6 passes over
        # a s / t elements per token, plus a one-byte mask.
        attn += tokens * m.n_head * s / t * (6 * e + 1) / device.mem_bw
    tp_f = tp_b = 0.0
    if t > 1:
        inter, nbytes = _inter(t, device), tokens * h * e
        if lay.sp:
            ag = collective_time("all_gather", nbytes, t, device, inter)
            rs = collective_time("reduce_scatter", nbytes, t, device, inter)
            # A column-parallel layer saves only its sequence shard, so backward gathers its
            # input again for the weight gradient: two more all-gathers than forward. The six
            # parameters that see only a sequence shard (LayerNorm weights and biases, the
            # row-parallel biases) have their gradients summed over tp as backward produces
            # them, one small all-reduce each: latency that counts where a call is slow (gloo).
            small = 6 * collective_time("all_reduce", h * e, t, device, inter)
            tp_f, tp_b = 2 * (ag + rs), 2 * (ag + rs) + 2 * ag + small
        else:
            tp_f = tp_b = 2 * collective_time("all_reduce", nbytes, t, device, inter)
    # Fixed costs per block and micro-batch (operator dispatch, kernel launches): the backward's
    # is split between the input- and weight-gradient parts as their work is.
    b_var, w_var = gemm + 2 * attn + 2 * elem, gemm
    fixed_b = device.block_fixed_b
    f = gemm + attn + elem + tp_f + device.block_fixed_f
    b = b_var + tp_b + fixed_b * b_var / (b_var + w_var)
    w = w_var + fixed_b * w_var / (b_var + w_var)
    if lay.recompute == "full":
        b += f
    elif lay.recompute == "selective":
        b += attn
    tp_total = tp_f + tp_b + (tp_f if lay.recompute == "full" else 0.0)
    return BlockTimes(f=f, b=b, w=w, tp_comm=tp_total)


def _ends(job: Job, lay: Layout, device) -> tuple[float, float, float]:
    """(stem forward+backward, head forward+backward, their tensor-parallel communication) per
    micro-batch."""
    m, t, e = job.model, lay.tp, job.elem_bytes
    tokens = m.seq * lay.micro_batch
    inter = _inter(t, device)
    comm = 0.0
    if m.name == "gpt":
        stem = 3 * tokens * m.d_model * e / device.mem_bw
        logits = tokens * m.vocab / t
        head_gemm = _gemm_time(device, 2 * tokens * m.d_model * m.vocab / t)
        head = 3 * head_gemm + logits * (e + 3 * 4) * 2 / device.mem_bw
        if t > 1:
            # vocab-parallel embedding output and the three small loss reductions
            comm = (collective_time("all_reduce", tokens * m.d_model * e, t, device, inter)
                    + 3 * collective_time("all_reduce", tokens * 4, t, device, inter))
    else:
        patch_flops = 2 * tokens * m.stem_extra
        stem = 3 * _gemm_time(device, patch_flops)
        head = 3 * _gemm_time(device, 2 * lay.micro_batch * m.d_model * m.vocab)
    # The embedding and the head with its loss run about as many operators as one block: one
    # block's fixed cost, a quarter of it the stem's.
    fixed = device.block_fixed_f + device.block_fixed_b
    return stem + fixed / 4 + comm / 2, head + 3 * fixed / 4 + comm / 2, comm


@dataclass
class StepTime:
    """Predicted seconds per optimizer step and their parts. ``compute`` is the busy time of
    the slowest rank, ``bubble`` the pipeline's idle time on it, ``tp_comm`` the tensor-parallel
    collectives inside compute, ``p2p`` the exposed hand-offs, ``dp_comm`` the exposed
    data-parallel communication (tied embedding included), ``optimizer`` the update."""

    total: float
    compute: float
    bubble: float
    tp_comm: float
    p2p: float
    dp_comm: float
    optimizer: float
    flops: float
    terms: dict = field(default_factory=dict)

    @property
    def bubble_fraction(self) -> float:
        span = self.compute + self.bubble
        return self.bubble / span if span > 0 else 0.0

    @property
    def comm_share(self) -> float:
        return (self.tp_comm + self.p2p + self.dp_comm) / self.total if self.total > 0 else 0.0


def step_time(job: Job, lay: Layout, device, bt: BlockTimes | None = None, bound: bool = False) -> StepTime:
    """Predicted step time of ``lay`` (see the module docstring for what is modelled). With
    ``bound=True`` the pipeline is not replayed and the result is a lower bound of the
    prediction (``pipeline.makespan_lower_bound``), for pruning."""
    m, e = job.model, job.elem_bytes
    M = lay.microbatches(job.global_batch)
    bt = bt or block_times(job, lay, device)
    stem, head, ends_comm = _ends(job, lay, device)
    n_stages = lay.pp * lay.virtual
    sizes = stage_sizes(m.n_layer, n_stages)
    chunk = max(sizes)
    p2p = 0.0
    act = device.action_overhead
    if lay.pp == 1:
        # Without a pipeline each micro-batch is one forward and one backward call.
        busy = M * (m.n_layer * (bt.f + bt.b + bt.w) + stem + head + 2 * act)
        span = busy
        tp_comm = M * (m.n_layer * bt.tp_comm + ends_comm)
        # What data-parallel communication can hide behind (nothing where it needs the cores).
        last_bwd = m.n_layer * (bt.b + bt.w) if device.comm_overlap else 0.0
    else:
        # Every compute action (F, B, and W where the schedule splits it off) pays the per-call
        # overhead once, whatever the chunk's size.
        fc, bc = chunk * bt.f + act, chunk * bt.b + act
        wc = chunk * bt.w + (act if lay.schedule == "zb" else 0.0)
        tokens = m.seq * lay.micro_batch
        hop_inter = _inter(lay.tp * lay.pp, device)
        hop = collective_time("p2p", tokens * m.d_model * e / (lay.tp if lay.sp else 1), 2, device, hop_inter)
        span_of = makespan_lower_bound if bound else makespan_units
        share = device.core_share
        units = span_of(lay.schedule, lay.pp, M, lay.virtual, bc / fc, wc / fc, hop / fc, share)
        extra = max(stem, head)
        span = units * fc + M * extra
        busy = M * lay.virtual * (fc + bc + wc) + M * extra
        # Hand-offs exposed: what the same schedule loses against free hand-offs.
        if not bound:
            free = free_makespan_units(lay.schedule, lay.pp, M, lay.virtual, bc / fc, wc / fc, share)
            p2p = max(0.0, (units - free) * fc)
        tp_comm = M * (lay.virtual * chunk * bt.tp_comm + ends_comm)
        last_bwd = 0.0
    bubble = max(0.0, span - busy - p2p)

    # Data parallel and the optimizer, on the rank with the most parameters.
    P = max(rank_params(job, lay, r, sizes) for r in {0, lay.pp - 1})
    dp = lay.dp
    dp_inter = _inter(lay.world, device)
    grads, params = P * e, P * e
    bucket = min(job.bucket_mb * 2**20, grads)

    def coll(kind, nbytes):
        return collective_time(kind, nbytes, dp, device, dp_inter)

    dp_comm = 0.0
    if dp > 1:
        if lay.zero == 0:
            c = coll("all_reduce", grads)
            dp_comm = c if lay.pp > 1 else max(c - last_bwd, coll("all_reduce", bucket))
        elif lay.zero == 1:
            c = coll("reduce_scatter", grads)
            dp_comm = (c if lay.pp > 1 else max(c - last_bwd, coll("reduce_scatter", bucket))) \
                + coll("all_gather", params)
        elif lay.zero == 2:
            c = coll("reduce_scatter", grads)
            dp_comm = M * max(c - last_bwd, coll("reduce_scatter", bucket)) + coll("all_gather", params)
        else:
            unit = max(m.block_params(lay.tp), m.stem_params(lay.tp) + m.head_params(lay.tp)) * e
            ag = coll("all_gather", params)
            fwd = m.n_layer * bt.f if device.comm_overlap else 0.0
            dp_comm = M * (max(ag - fwd, coll("all_gather", unit))
                           + max(ag + coll("reduce_scatter", grads) - last_bwd, coll("reduce_scatter", unit)))
    if m.tied and lay.pp > 1:
        emb = m.vocab * m.d_model / lay.tp * e
        dp_comm += collective_time("all_reduce", emb, 2, device, _inter(lay.tp * lay.pp, device))

    shard = P / dp if lay.zero >= 1 else P
    states = 8 if job.adam else (4 if job.momentum else 0)
    if lay.offload == "none":
        master = 4 if e < 4 else 0
        traffic = 3 * e + 2 * master + 2 * states  # read p, g, master, states; write p, master, states
        optimizer = shard * traffic / device.mem_bw
    else:
        optimizer = shard / device.cpu_adam_rate + shard * 2 * e / device.pcie_bw
        if lay.offload == "nvme":
            optimizer += shard * 2 * (4 + states) / device.nvme_bw

    total = span + dp_comm + optimizer
    return StepTime(total=total, compute=busy, bubble=bubble, tp_comm=tp_comm, p2p=p2p, dp_comm=dp_comm,
                    optimizer=optimizer, flops=counted_flops(job, lay.recompute),
                    terms={"block_f": bt.f, "block_b": bt.b, "block_w": bt.w, "stem": stem, "head": head,
                           "microbatches": M, "params_per_rank": P})
