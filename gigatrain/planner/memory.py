"""Memory per rank of one layout: the model, the layout, and the bytes each part holds.

The model is described by ``ModelSpec`` (from the config; no dataset, no tensors), a layout by
``Layout``. ``memory_breakdown`` adds up, for the rank that holds the most:

- model states: ``gigatrain.parallel.zero.memory.model_state_bytes`` (the ZeRO formulas the
  engine is tested against) applied to the parameters this rank owns after tensor and pipeline
  splitting;
- activations saved for backward: per block and micro-batch (``block_activation_bytes``), times
  the blocks the schedule keeps in flight at its peak on this rank (``pipeline.live_profile``),
  plus the embedding input on the first stage and the loss's saved log-probabilities on the last;
  with full recomputation, what backward rebuilds of one block besides the input it kept;
- communication buckets being reduced, the ZeRO-3 units gathered at once, the largest temporary
  (gradients of the MLP hidden layer, the logits and their gradient);
- ``Device.runtime_bytes`` and an allocator margin of ``Device.alloc_margin`` of the tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from ..parallel.zero.memory import model_state_bytes

__all__ = ["ModelSpec", "Job", "Layout", "korthikanti_activation_bytes", "block_activation_bytes",
           "memory_breakdown", "stage_sizes", "RECOMPUTE"]

RECOMPUTE = ("none", "selective", "full")
MiB = 2**20


@dataclass(frozen=True)
class ModelSpec:
    """A transformer stack: ``n_layer`` pre-LN blocks (attention + 4x MLP, with biases) between a
    stem and a head, as gigatrain's GPT and ViT build them.

    ``seq`` tokens per sample; ``vocab`` the padded vocabulary for a GPT (its embedding is tied to
    the LM head), or the number of classes for a ViT (whose stem is a patch convolution);
    ``stem_extra`` counts the stem's parameters besides a ``vocab x d_model`` table (positions;
    the ViT's patch projection and class token). ``flash``: attention runs as one fused kernel
    that never materialises the scores (``scaled_dot_product_attention``); ``False`` describes
    an implementation that writes and softmaxes them in memory (Megatron-LM before 2022).
    """

    name: str
    n_layer: int
    d_model: int
    n_head: int
    seq: int
    vocab: int
    tied: bool = True
    dropout: float = 0.0
    stem_extra: int = 0
    flash: bool = True
    notes: tuple = ()

    # -- parameters ------------------------------------------------------------------------
    def block_params(self, tp: int = 1) -> float:
        """Parameters of one block on one tensor-parallel rank: the column-parallel qkv and fc
        (weights and biases) and the row-parallel proj weights are split; LayerNorms and the
        row-parallel biases are replicated."""
        h = self.d_model
        return (12 * h * h + 7 * h) / tp + 6 * h

    def stem_params(self, tp: int = 1) -> float:
        if self.name == "vit":
            return float(self.stem_extra)
        return self.vocab * self.d_model / tp + self.stem_extra

    def head_params(self, tp: int = 1, with_tied_copy: bool = False) -> float:
        """LayerNorm plus the output layer; a GPT's LM head is the stem's embedding, counted
        here only when it is a separate copy (last pipeline stage)."""
        h = self.d_model
        if self.name == "vit":
            return 2 * h + h * self.vocab + self.vocab
        return 2 * h + (self.vocab * h / tp if with_tied_copy else 0.0)

    def total_params(self) -> float:
        return self.n_layer * self.block_params(1) + self.stem_params(1) + self.head_params(1)

    @classmethod
    def from_config(cls, mcfg, dcfg=None) -> "ModelSpec":
        """From a ``ModelConfig`` (and ``DataConfig`` for the vocabulary when
        ``model.vocab_size`` is null: the BPE size, or 256 symbols assumed for the char
        tokenizer, padded to a multiple of 64 as the GPT pads it). ``ValueError`` for models
        the planner does not describe (coatnet)."""
        name = mcfg.name
        h, L, a = mcfg.d_model, mcfg.n_layer, mcfg.n_head
        notes = []
        if name == "gpt":
            vocab = getattr(mcfg, "vocab_size", None)
            if vocab is None:
                if dcfg is not None and getattr(dcfg, "tokenizer", "char") == "bpe":
                    vocab = dcfg.vocab_size
                    notes.append(f"vocabulary {vocab} from data.vocab_size (bpe)")
                else:
                    vocab = 256
                    notes.append("vocabulary of the char tokenizer assumed <= 256; set model.vocab_size to be exact")
            padded = -(-int(vocab) // 64) * 64
            return cls("gpt", L, h, a, mcfg.seq_len, padded, tied=True, dropout=mcfg.dropout,
                       stem_extra=mcfg.seq_len * h, notes=tuple(notes))
        if name == "vit":
            n = (mcfg.image_size // mcfg.patch_size) ** 2
            stem = mcfg.in_chans * mcfg.patch_size ** 2 * h + h + h + (1 + n) * h
            return cls("vit", L, h, a, 1 + n, mcfg.num_classes, tied=False, dropout=mcfg.dropout,
                       stem_extra=stem)
        raise ValueError(f"the planner models transformer stacks (model.name=gpt or vit); {name} is not "
                         "modelled yet")


@dataclass(frozen=True)
class Job:
    """What the layout does not change: the model, the batch, the precision and the optimizer."""

    model: ModelSpec
    global_batch: int
    param_bytes: int = 2          # 2: bf16/fp16 parameters with an fp32 master; 4: fp32
    adam: bool = True
    momentum: bool = True
    bucket_mb: float = 25.0

    @property
    def elem_bytes(self) -> int:
        return self.param_bytes


@dataclass(frozen=True, order=True)
class Layout:
    """One way to run the job. ``micro_batch`` samples per forward; ``schedule`` and ``virtual``
    matter only with ``pp > 1``; ``offload`` is "none", "cpu" or "nvme" (ZeRO >= 1)."""

    dp: int
    pp: int
    tp: int
    sp: bool = False
    zero: int = 0
    offload: str = "none"
    micro_batch: int = 1
    schedule: str = "1f1b"
    virtual: int = 1
    recompute: str = "none"

    @property
    def world(self) -> int:
        return self.dp * self.pp * self.tp

    def microbatches(self, global_batch: int) -> int:
        return global_batch // (self.micro_batch * self.dp)

    def describe(self) -> str:
        parts = [f"dp{self.dp}", f"pp{self.pp}", f"tp{self.tp}" + ("+sp" if self.sp else "")]
        parts.append(f"zero{self.zero}" + (f"+{self.offload}" if self.offload != "none" else ""))
        parts.append(f"mb{self.micro_batch}")
        if self.pp > 1:
            parts.append(self.schedule + (f"x{self.virtual}" if self.virtual > 1 else ""))
        if self.recompute != "none":
            parts.append(f"rc-{self.recompute}")
        return " ".join(parts)


# -- activations ----------------------------------------------------------------------------
def korthikanti_activation_bytes(s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False,
                                 recompute: str = "none") -> float:
    """Activation bytes per transformer layer at 16-bit with dropout, as Korthikanti et al. 2022
    ("Reducing Activation Recomputation in Large Transformer Models") give them:

    - none: ``s b h (10 + 24/t + 5 a s / (h t))``; with sequence parallel ``s b h (34 + 5 a s / h) / t``
    - selective (attention core recomputed): ``s b h (10 + 24/t)``; with sequence parallel ``34 s b h / t``
    - full (only the layer input kept): ``2 s b h``; with sequence parallel ``2 s b h / t``
    """
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh / (t if sp else 1)
    attn = 5 * a * s / h if recompute == "none" else 0.0
    if sp:
        return sbh * (34 + attn) / t
    return sbh * (10 + (24 + attn) / t)


def block_activation_bytes(spec: ModelSpec, b: int, t: int = 1, sp: bool = False, recompute: str = "none",
                           elem_bytes: int = 2, paper: bool = False) -> float:
    """Bytes one block saves for backward for one micro-batch of ``b`` samples, on one rank.

    ``paper=True`` counts as Korthikanti et al. do (attention scores materialised, dropout masks
    of one byte) and equals ``korthikanti_activation_bytes`` at ``elem_bytes=2``. Otherwise it
    counts gigatrain's block: ``scaled_dot_product_attention`` with a fused kernel keeps no
    score matrix, only a log-sum-exp (a fp32 per head and token) besides q, k, v and its output
    (which is the projection's input: the kernel writes it token-major, so the reshape is a
    view); LayerNorms keep mean and inverse deviation (2 fp32 per token each); with dropout 0
    there are no masks (a dropout above 0 falls back to the unfused attention, which keeps the
    probabilities).

    Per token, with ``e`` bytes per element: the LayerNorm inputs and the inputs of qkv and fc
    (``4 h e``) are replicated over tensor-parallel ranks unless sequence parallel shards them;
    q, k, v, the projection input, the GELU input and output (``12 h e``) are split by ``t``.
    Selective recomputation drops what the attention core alone keeps; full recomputation keeps
    only the block input (sequence-sharded with sequence parallel).
    """
    s, h, a = spec.seq, spec.d_model, spec.n_head
    tokens = s * b
    e = elem_bytes
    rep_div = t if sp else 1
    if recompute == "full":
        return tokens * h * e / rep_div
    dropout = paper or spec.dropout > 0
    fused = spec.flash and not dropout and not paper
    masks = 2 * h if dropout else 0                   # two residual-branch dropout masks, 1 byte
    ln_stats = 0 if paper else 16                     # 2 LayerNorms x (mean, rstd) in fp32
    replicated = 4 * h * e + masks + ln_stats
    split = 12 * h * e
    if fused:
        split_core = 4 * a                            # fp32 log-sum-exp per head
    else:
        split_core = a * s * (e + (1 + e if dropout else 0))  # probabilities (+ mask, dropped copy)
    split_total = split if recompute == "selective" else split + split_core
    return tokens * (replicated / rep_div + split_total / t)


# -- pipeline stages ------------------------------------------------------------------------
@lru_cache(maxsize=4096)
def stage_sizes(n_layer: int, n_stages: int) -> tuple[int, ...]:
    """Blocks per stage under the uniform partition (``parallel.pp_balance=uniform``)."""
    from ..parallel.pipeline.partition import uniform

    return uniform(n_layer, n_stages).sizes


def _rank_stages(pp: int, V: int, rank: int) -> list[int]:
    return [rank + c * pp for c in range(V)]


def rank_params(job: Job, lay: Layout, rank: int, sizes=None) -> float:
    """Parameters a rank of pipeline position ``rank`` owns (one tensor-parallel shard)."""
    spec, t = job.model, lay.tp
    n_stages = lay.pp * lay.virtual
    sizes = sizes or stage_sizes(spec.n_layer, n_stages)
    p = 0.0
    for st in _rank_stages(lay.pp, lay.virtual, rank):
        p += sizes[st] * spec.block_params(t)
        if st == 0:
            p += spec.stem_params(t)
        if st == n_stages - 1:
            p += spec.head_params(t, with_tied_copy=spec.tied and n_stages > 1 and lay.pp > 1)
    return p


@dataclass
class Memory:
    """Bytes on the device of the rank that needs the most (``rank`` is its pipeline position),
    by term; ``host`` is the CPU memory that rank's offloaded states take."""

    rank: int
    states: float
    activations: float
    buckets: float
    gathered: float
    temporaries: float
    runtime: float
    margin: float
    host: float
    in_flight: int = 1
    terms: dict = field(default_factory=dict)

    @property
    def tensors(self) -> float:
        """Everything tensors hold at the peak (what a measurement of tensors sees)."""
        return self.states + self.activations + self.buckets + self.gathered + self.temporaries

    @property
    def peak(self) -> float:
        return self.tensors + self.margin + self.runtime


def memory_breakdown(job: Job, lay: Layout, device, live=None, rank: int | None = None) -> Memory:
    """Peak device memory per rank for ``lay``: of pipeline rank ``rank`` (0 or pp - 1), or by
    default the larger of those two, which hold the embedding and the head. ``live`` is
    ``pipeline.live_profile`` for the layout's schedule (computed when omitted)."""
    from .pipeline import live_profile

    spec, t, e = job.model, lay.tp, job.elem_bytes
    b = lay.micro_batch
    M = lay.microbatches(job.global_batch)
    n_stages = lay.pp * lay.virtual
    sizes = stage_sizes(spec.n_layer, n_stages)
    if live is None:
        live = live_profile(lay.schedule if lay.pp > 1 else "none", lay.pp, M, lay.virtual)
    block_act = block_activation_bytes(spec, b, t, lay.sp, lay.recompute, e)
    full_act = block_activation_bytes(spec, b, t, lay.sp, "none", e)
    tokens = b * spec.seq
    chunk = max(sizes)
    # Loss on the last stage: the fp32 log-probabilities are saved; while the loss runs, the
    # logits, their fp32 copy (low precision only) and the gradient coexist with them.
    if spec.name == "gpt":
        logits = tokens * spec.vocab / t
        loss_saved = 4 * logits
        head_saved = loss_saved + tokens * spec.d_model * e * 2 / (t if lay.sp else 1)
        head_temp = logits * (e + (4 if e < 4 else 0) + 4)
        stem_saved = 8 * tokens
    else:
        loss_saved = b * spec.vocab * 4
        head_saved = b * spec.d_model * e * 2 + loss_saved
        head_temp = b * spec.vocab * 8
        stem_saved = tokens * spec.d_model * e
    mlp_temp = 2 * tokens * 4 * spec.d_model * e / t
    # Zero bubble splits backward: B keeps the stage's graph (retain_graph) for W, so nothing a
    # micro-batch saved is freed before W, except the loss's log-probabilities on the last stage
    # when W goes module by module (the loss's graph hangs on the loss alone, dropped after B);
    # with whole blocks recomputed, W runs from the loss again and keeps it (pipeline/runtime.py).
    split = lay.pp > 1 and lay.schedule == "zb"
    keeps_loss = not split or lay.recompute == "full"
    # Full recomputation rebuilds one block's saved tensors at a time in backward, around the input
    # it kept (so that input is not new). The first block recomputed is the chunk's last; on the
    # last stage the head's saved tensors of that micro-batch are freed by then, unless B keeps them.
    recompute_extra = full_act - block_act if lay.recompute == "full" else 0.0
    recompute_freed = 0.0 if split else head_saved
    # Selective recomputation of a fused attention core stores its output and log-sum-exp again;
    # after backward has passed the block's MLP and freed more (10 h per token), unless B keeps
    # that too. An unfused core (dropout) rebuilds its probabilities, counted as a temporary.
    if lay.recompute == "selective" and split and spec.flash and spec.dropout == 0:
        recompute_extra = tokens * (spec.d_model * e + 4 * spec.n_head) / t
    recompute_temp = (tokens * spec.n_head * spec.seq * e / t
                      if lay.recompute == "selective" and spec.dropout > 0 else 0.0)
    optimizer_offload = "cpu" if lay.offload in ("cpu", "nvme") else "none"
    best = None
    if rank is not None and rank not in (0, lay.pp - 1):
        raise ValueError(f"memory is modelled for the first and last pipeline ranks, not {rank}")
    for rank in [rank] if rank is not None else sorted({0, lay.pp - 1}):
        P = rank_params(job, lay, rank, sizes)
        st = model_state_bytes(P, lay.dp, lay.zero, optimizer_offload, job.param_bytes, job.adam,
                               momentum=job.momentum)
        host = st["host"] if lay.offload == "cpu" else 0.0  # nvme: the states live on disk
        live_chunks = live.rank_peak[0 if rank == 0 else -1]
        acts = live_chunks * chunk * block_act
        if rank == 0:
            acts += live.first_stage * stem_saved
        if rank == lay.pp - 1:
            if keeps_loss:
                acts += live.last_stage * head_saved
            else:  # log-probabilities only from F to B: one micro-batch at a time
                acts += live.last_stage * (head_saved - loss_saved) + min(1, live.last_stage) * loss_saved
        acts += max(0.0, recompute_extra - (recompute_freed if rank == lay.pp - 1 else 0.0))
        temps = max(mlp_temp, head_temp if rank == lay.pp - 1 else 0.0) + recompute_temp
        bucket = job.bucket_mb * MiB
        buckets = 0.0 if lay.zero == 0 else 2 * min(bucket, P * e)
        gathered = 0.0
        if lay.zero == 3:
            unit = max(spec.block_params(t), spec.stem_params(t) + spec.head_params(t))
            gathered = 2 * unit * e + unit * e
        runtime = device.runtime_bytes
        tensors = st["device"] + acts + buckets + gathered + temps
        m = Memory(rank=rank, states=st["device"], activations=acts, buckets=buckets, gathered=gathered,
                   temporaries=temps, runtime=runtime, margin=tensors * device.alloc_margin, host=host,
                   in_flight=live_chunks,
                   terms={"params": P, "block_act": block_act, "chunk_blocks": chunk, "microbatches": M})
        if best is None or m.peak > best.peak:
            best = m
    return best
