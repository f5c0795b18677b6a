"""The config schema: typed sections, defaults, descriptions, and cross-field checks."""
from __future__ import annotations

import difflib
import types
import typing
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import ConfigError, _Problems
from .yamlio import _Dumper


class _Section(BaseModel):
    # strict: YAML/JSON/TOML already give typed scalars, so any coercion would hide a mistake
    # (an int field never accepts "3", 3.0 or true; float fields accept ints).
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


# --------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------

TEXT_DATASETS = ("kjv", "pystdlib", "textfile")
IMAGE_DATASETS = ("fashion_mnist",)
IMAGE_MODELS = ("vit", "coatnet", "resnet")


class ModelConfig(_Section):
    """The network to train."""

    name: Literal["gpt", "vit", "coatnet", "resnet"] = Field("gpt", description="Model family: `gpt` (causal language model), `vit` (vision transformer), `coatnet` (convolution + attention hybrid) or `resnet` (a small residual CNN).")
    n_layer: int = Field(4, ge=1, description="Number of transformer blocks (gpt, vit).")
    n_head: int = Field(4, ge=1, description="Attention heads per block; must divide `model.d_model` and be divisible by `parallel.tp`.")
    d_model: int = Field(128, ge=1, description="Hidden width (gpt, vit).")
    seq_len: int = Field(128, ge=1, description="Context length in tokens (gpt).")
    vocab_size: Optional[int] = Field(None, ge=2, description="Vocabulary size (gpt) for planning without a dataset (`gigatrain plan`); null = from the dataset's tokenizer, which training always uses.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability (0 keeps runs deterministic across layouts).")
    image_size: int = Field(28, ge=1, description="Input image side in pixels (vit, coatnet).")
    in_chans: int = Field(1, ge=1, description="Input image channels (vit, coatnet).")
    num_classes: int = Field(10, ge=2, description="Number of classes (vit, coatnet).")
    patch_size: int = Field(4, ge=1, description="ViT patch side in pixels; must divide `model.image_size`.")
    coatnet_depths: list[int] = Field(default_factory=lambda: [1, 1, 2, 1], description="CoAtNet: blocks in each stage.")
    coatnet_dims: list[int] = Field(default_factory=lambda: [32, 64, 96, 128], description="CoAtNet: channels of each stage (same length as `coatnet_depths`).")
    init_std: float = Field(0.02, gt=0.0, description="Standard deviation of the normal weight initialisation.")
    resnet_widths: list[int] = Field(default_factory=lambda: [32, 64, 128], description="ResNet: channels of each stage (stages after the first halve the grid).")
    resnet_depths: list[int] = Field(default_factory=lambda: [1, 1, 1], description="ResNet: basic residual blocks in each stage (same length as `resnet_widths`).")


class DataConfig(_Section):
    """Where training samples come from."""

    name: Literal["kjv", "pystdlib", "textfile", "fashion_mnist"] = Field("kjv", description="Dataset: `kjv` (King James Bible), `pystdlib` (Python standard library sources), `textfile` (any UTF-8 file at `data.path`) for gpt; `fashion_mnist` for vit and coatnet.")
    path: Optional[str] = Field(None, description="Input file or folder; required for `textfile`, otherwise overrides where the dataset is looked for.")
    tokenizer: Literal["char", "bpe"] = Field("char", description="Text tokenizer: `char` (one token per character) or `bpe` (byte-level BPE trained on the corpus).")
    vocab_size: int = Field(2048, ge=2, description="BPE vocabulary size (bpe only).")
    cache_dir: Optional[str] = Field(None, description="Where tokenized data is cached (null = a folder next to the data).")
    max_chars: Optional[int] = Field(None, ge=1, description="Use only the first N characters of a text corpus (null = all).")
    num_workers: int = Field(1, ge=0, description="Data loading worker processes per rank (0 = load in the training process).")


class TrainConfig(_Section):
    """Optimisation: steps, batch sizes, optimizer and learning-rate schedule."""

    steps: int = Field(200, ge=1, description="Optimizer steps; the learning-rate schedule spans them.")
    global_batch: int = Field(16, ge=1, description="Samples per optimizer step over all data-parallel ranks; must be a multiple of `train.micro_batch` x `parallel.dp`.")
    micro_batch: int = Field(8, ge=1, description="Samples per forward/backward on one rank; gradients are accumulated over `grad_accum` micro-batches.")
    seed: int = Field(1234, description="Seed for initialisation and data order (which never depend on the layout).")
    optimizer: Literal["adamw", "sgd", "lamb", "onebit_adam"] = Field("adamw", description="Optimizer: `adamw`, `sgd`, `lamb` (You et al.: Adam with bias correction and decoupled weight decay, each parameter's step scaled by the trust ratio ||w|| / ||update||; exact under every ZeRO stage and CPU offload), or `onebit_adam` (Tang et al.: AdamW for `train.onebit_warmup` steps, then the variance frozen and the momentum averaged as one bit per element with error feedback, ~1/32 of the gradient all-reduce's bytes; parallel.zero=0, or 1: ZeRO-1 holds only its shard of the optimizer states during the warm-up and hands over to data parallel when compression starts, taking the same steps as zero=0).")
    onebit_warmup: int = Field(100, ge=1, description="1-bit Adam: steps of plain AdamW (gradients all-reduced) before the variance is frozen and communication is compressed.")
    lr: float = Field(1e-3, gt=0.0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Final learning rate of the decay as a fraction of `train.lr`.")
    weight_decay: float = Field(0.1, ge=0.0, description="Decoupled weight decay (applied to matrices, not to biases and norms).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW and LAMB moment decay rates, each in [0, 1).")
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="SGD momentum (sgd only).")
    schedule: Literal["cosine", "onecycle", "constant"] = Field("cosine", description="Learning-rate schedule after warmup: `cosine` decay to `lr * min_lr_ratio`, `onecycle`, or `constant`.")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps from 0 to `train.lr`.")
    grad_clip: Optional[float] = Field(1.0, ge=0.0, description="Clip the global gradient norm to this value (null or 0 = no clipping).")
    stop_after: Optional[int] = Field(None, ge=1, description="Stop after this step while keeping the schedule of `train.steps` (null = run all steps).")
    log_every: int = Field(10, ge=1, description="Print a progress line every N steps when the output is not a terminal (logs, SLURM); `metrics.jsonl` gets every step.")
    eval_every: int = Field(0, ge=0, description="Evaluate on held-out data every N steps (0 = never).")
    eval_batches: int = Field(4, ge=0, description="Global batches of held-out data per evaluation, always the same ones (0 = every whole global batch of the split: a test accuracy).")
    sample_tokens: int = Field(200, ge=0, description="Tokens of text sampled from a gpt at the end of training (0 = none).")
    max_skipped_steps: int = Field(5, ge=1, description="Stop (training diverged) after this many steps in a row are skipped for a NaN/inf loss or gradient norm; such a step never updates the weights.")
    compile: Literal["none", "default", "reduce-overhead", "max-autotune"] = Field("none", description="`torch.compile` each transformer block's forward with this mode (`none` = eager). Blocks are compiled one by one, so ZeRO-3's gathers and pipeline cuts work unchanged; the first steps are slow while the blocks compile (on the CPU inductor needs a C++ compiler).")
    batch_ramp: Optional[tuple[int, int, int]] = Field(None, description="Batch-size ramp-up `START,INCREMENT,SAMPLES` (Megatron's): the global batch starts at START and grows by INCREMENT in equal shares of the first SAMPLES samples up to `train.global_batch`; START and INCREMENT must be multiples of `train.micro_batch` x `parallel.dp`. Data order stays exact and resumable, and the learning-rate schedule runs on samples (null = no ramp; needs parallel.pp=1).")
    target: Optional[str] = Field(None, description="Stop when an evaluation reaches this target, `val_accuracy>=X` or `val_loss<=X`, and report the training time and samples it took (needs `train.eval_every`; null = run all steps).")
    profile_steps: Optional[tuple[int, int]] = Field(None, description="Write a torch.profiler trace of steps A to B (1-based, inclusive; `A,B` on the command line) to `<out>/profile/rank<R>.pt.trace.json`, which Perfetto and TensorBoard open (null = none). Every step's forward, backward, exposed communication, optimizer and data-wait seconds are in `metrics.jsonl` anyway.")
    recompute: Literal["none", "selective", "full"] = Field("none", description="Activation recomputation in backward: `none`, `selective` (only the attention core: scores, softmax, dropout; the activations that grow with the square of the sequence) or `full` (each block keeps only its input and runs forward again in backward). Losses are bit-identical; it trades compute for activation memory.")

    @field_validator("betas", mode="before")
    @classmethod
    def _betas_from_list(cls, value: Any) -> Any:
        # YAML, JSON and TOML have lists, not tuples.
        return tuple(value) if isinstance(value, list) else value

    @field_validator("batch_ramp", mode="before")
    @classmethod
    def _ramp_from_text(cls, value: Any) -> Any:
        return _int_tuple(value)

    @field_validator("target")
    @classmethod
    def _target_form(cls, value: Any) -> Any:
        import re

        if value is not None and not re.fullmatch(r"\s*(val_accuracy\s*>=|val_loss\s*<=)\s*[-+0-9.eE]+\s*", value):
            raise ValueError(f"train.target={value!r} is not a target: write val_accuracy>=X or val_loss<=X, "
                             "e.g. val_accuracy>=0.93")
        return value

    @field_validator("profile_steps", mode="before")
    @classmethod
    def _steps_from_text(cls, value: Any) -> Any:
        # `train.profile_steps=3,5` arrives as the text "3,5".
        return _int_tuple(value)

    @property
    def min_lr(self) -> float:
        """Final learning rate of the decay: `lr * min_lr_ratio`."""
        return self.lr * self.min_lr_ratio

    @property
    def clip_enabled(self) -> bool:
        """Whether gradient clipping is on (`grad_clip` neither null nor 0)."""
        return bool(self.grad_clip)


def _int_tuple(value: Any) -> Any:
    """A list, or comma-separated text of integers, as a tuple (anything else unchanged, so the
    type check reports it)."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        if parts and all(p.lstrip("-").isdigit() for p in parts):
            return tuple(int(p) for p in parts)
    return tuple(value) if isinstance(value, list) else value


class ParallelConfig(_Section):
    """How the work is split over processes."""

    auto: bool = Field(False, description="Let the planner choose the layout before launch: the predicted fastest that fits the job's world size and device (`parallel.*` degrees, sequence parallel, ZeRO stage, offload, schedule, `train.micro_batch`, `train.recompute`); layout keys given in the config file or on the command line stay as given. The choice is printed in one line.")
    dp: Optional[int] = Field(None, ge=1, description="Data-parallel degree (null = world size / (pp x tp)).")
    pp: int = Field(1, ge=1, description="Pipeline-parallel degree (stages).")
    tp: int = Field(1, ge=1, description="Tensor-parallel degree: attention heads, MLP width and vocabulary split over tp ranks (innermost in the rank order, so a tp group stays inside a node). Must divide `model.n_head`, `model.d_model` and the padded vocabulary.")
    sequence_parallel: bool = Field(False, description="With tp > 1 (gpt): LayerNorms and the residual stream between the tensor-parallel regions are cut along the sequence, their all-reduces become reduce-scatter + all-gather, and their activation memory is divided by tp; `model.seq_len` must be divisible by `parallel.tp`.")
    zero: int = Field(0, ge=0, le=3, description="ZeRO stage: 0 (replicated), 1 (optimizer state sharded), 2 (+ gradients), 3 (+ parameters).")
    offload: Literal["none", "cpu", "nvme"] = Field("none", description="Where ZeRO keeps optimizer state: `none` (device), `cpu` or `nvme`; needs `parallel.zero` >= 1.")
    offload_dir: Optional[str] = Field(None, description="Folder for nvme offload (null = `<out>/offload`).")
    pp_schedule: Literal["naive", "gpipe", "1f1b", "interleaved", "zb"] = Field("1f1b", description="Pipeline schedule: `naive`, `gpipe`, `1f1b`, `interleaved` (needs `parallel.pp_virtual` >= 2) or `zb` (zero bubble).")
    pp_microbatches: Optional[int] = Field(None, ge=1, description="Micro-batches per step per dp rank through the pipeline (null = `grad_accum`); when set it must equal global_batch / (micro_batch x dp).")
    pp_virtual: int = Field(1, ge=1, description="Model chunks per pipeline rank (interleaved schedule).")
    pp_balance: Union[Literal["params", "time", "uniform"], list[int]] = Field("params", description="How blocks are split into stages: by `params`, by measured `time`, `uniform`, or an explicit list of blocks per stage (length pp x pp_virtual).")
    pp_transport: Literal["auto", "backend"] = Field("auto", description="How pipeline messages travel between pp ranks: `auto` = through shared memory when the ranks run on the CPU of one host (no socket and no transport thread per message, which on a CPU host take cores from training), through the backend otherwise; `backend` = always through the process group (gloo or nccl).")
    bucket_mb: float = Field(25.0, gt=0.0, description="Gradient bucket size in MiB for overlapping communication with backward.")
    timeout_s: float = Field(600.0, gt=0.0, description="Collective timeout in seconds (a hang fails after this long).")
    hang_timeout_s: float = Field(120.0, gt=0.0, description="After this many seconds in one collective, the ranks compare what they are doing and one paragraph names the rank that never arrived and where it is, then every rank exits (code 124). Must be below `timeout_s` and above any legitimate wait (a slow checkpoint save).")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="torch.distributed backend (`auto` = nccl on CUDA, gloo on CPU).")

    @property
    def world_size(self) -> int:
        """dp x pp x tp; needs `dp` resolved (see `resolve_for_world`)."""
        if self.dp is None:
            raise ConfigError("parallel.dp is not resolved yet: call resolve_for_world(cfg, world_size) first")
        return self.dp * self.pp * self.tp


class CheckpointConfig(_Section):
    """When and where checkpoints are written."""

    every: int = Field(0, ge=0, description="Save a checkpoint every N steps (0 = only at the end).")
    dir: Optional[str] = Field(None, description="Checkpoint folder (null = `<out>/checkpoints`).")
    keep: int = Field(3, ge=0, description="Keep the newest N checkpoints (0 = keep all).")
    async_save: bool = Field(False, description="Write checkpoints from a background thread: each rank copies its pieces to host memory (the only pause, plus one all-reduce), training goes on while the files are written, and the next save (or the end of the run) waits for them. Costs host memory for one copy of the rank's part of the state.")


class DebugConfig(_Section):
    """Fault injection used to demonstrate and test recovery paths."""

    inject_overflow_step: Optional[int] = Field(None, ge=1, description="Force an inf gradient at this step to exercise the fp16 loss scaler (null = never).")
    inject_overflow_rank: int = Field(0, ge=0, description="Rank that receives the injected inf gradient.")
    inject_hang_step: Optional[int] = Field(None, ge=1, description="Make one rank block forever at the start of this step, to exercise the hang diagnosis (null = never).")
    inject_hang_rank: int = Field(0, ge=0, description="Rank that blocks at `inject_hang_step`.")


class Config(_Section):
    """A complete training job. Build it with `load_config`; complete it with `resolve_for_world`."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="The network.")
    data: DataConfig = Field(default_factory=DataConfig, description="The training data.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation.")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="Parallel layout.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoints.")
    debug: DebugConfig = Field(default_factory=DebugConfig, description="Fault injection.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="Compute precision: `auto` (bf16 on CUDA, fp32 on CPU), `fp32`, `bf16`, or `fp16` (with dynamic loss scaling).")
    resume: Optional[str] = Field(None, description="Resume from a checkpoint folder, `auto` (the newest in `checkpoint.dir` if any), or null (start fresh).")
    out: Optional[str] = Field(None, description="Output folder for the resolved config, logs, metrics and checkpoints (null = a fresh `runs/<job>-<timestamp>` per run). A run refuses a folder that another live run holds, and a fresh start into a folder that holds a run unless `overwrite` is true.")
    overwrite: bool = Field(False, description="Let a fresh start (no `resume`) replace the run already in `out`: its checkpoints and metrics are removed first (also `--overwrite`).")
    nproc: Optional[int] = Field(None, ge=1, description="Processes the CLI launches on this machine (null = 1, or what torchrun/SLURM says).")

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        problems = _cross_problems(self)
        if problems:
            raise _Problems(problems)
        return self

    # -- derived quantities ------------------------------------------------------------

    @property
    def world_size(self) -> int:
        """dp x pp x tp of a resolved config."""
        return self.parallel.world_size

    @property
    def grad_accum(self) -> int:
        """Micro-batches each data-parallel rank runs per optimizer step:
        `global_batch // (micro_batch * dp)`. Needs a resolved config (`parallel.dp` set);
        with pp > 1 this is also the number of micro-batches through the pipeline."""
        if self.parallel.dp is None:
            raise ConfigError("parallel.dp is not resolved yet: call resolve_for_world(cfg, world_size) first")
        return self.train.global_batch // (self.train.micro_batch * self.parallel.dp)

    def precision_for(self, device_type: str) -> str:
        """The concrete precision on a device type ("cuda" or "cpu"): resolves `auto`."""
        if self.precision != "auto":
            return self.precision
        return "bf16" if device_type == "cuda" else "fp32"

    def backend_for(self, device_type: str) -> str:
        """The concrete torch.distributed backend on a device type: resolves `auto`."""
        if self.parallel.backend != "auto":
            return self.parallel.backend
        return "nccl" if device_type == "cuda" else "gloo"

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of builtins (lists, not tuples), as written to YAML/JSON."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        """The config as YAML, every key written, in schema order; `load_config` reads it back
        to an equal Config."""
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def _n_blocks(model: ModelConfig) -> int | None:
    """Blocks in `model.blocks` for models where the config alone determines it."""
    if model.name == "coatnet":
        return sum(model.coatnet_depths)
    if model.name == "resnet":
        return sum(model.resnet_depths)
    return model.n_layer


def _blocks_key(model: ModelConfig) -> str:
    if model.name in ("coatnet", "resnet"):
        return f"sum of model.{model.name}_depths"
    return "model.n_layer"


def _cross_problems(cfg: Config) -> list[str]:
    """Every inconsistency between keys that does not depend on the world size."""
    p: list[str] = []
    m, d, t, par = cfg.model, cfg.data, cfg.train, cfg.parallel

    # model
    if m.name in ("gpt", "vit") and m.d_model % m.n_head:
        p.append(f"model.d_model ({m.d_model}) is not divisible by model.n_head ({m.n_head}): choose a d_model "
                 f"that is a multiple of {m.n_head} (e.g. {m.n_head * max(1, round(m.d_model / m.n_head))}) or change n_head.")
    if m.name == "vit" and m.image_size % m.patch_size:
        p.append(f"model.image_size ({m.image_size}) is not divisible by model.patch_size ({m.patch_size}): "
                 f"choose a patch size that divides {m.image_size}.")
    if m.name == "coatnet":
        if len(m.coatnet_depths) != len(m.coatnet_dims) or not m.coatnet_depths:
            p.append(f"model.coatnet_depths ({m.coatnet_depths}) and model.coatnet_dims ({m.coatnet_dims}) must be "
                     "non-empty lists of the same length (one entry per stage).")
        if any(x < 1 for x in m.coatnet_depths + m.coatnet_dims):
            p.append("model.coatnet_depths and model.coatnet_dims must contain only positive integers.")
    if m.name == "resnet" and (len(m.resnet_depths) != len(m.resnet_widths) or not m.resnet_depths
                               or any(x < 1 for x in m.resnet_depths + m.resnet_widths)):
        p.append(f"model.resnet_depths ({m.resnet_depths}) and model.resnet_widths ({m.resnet_widths}) must be "
                 "non-empty lists of positive integers of the same length (one entry per stage).")

    # model <-> data
    if m.name in IMAGE_MODELS and d.name not in IMAGE_DATASETS:
        p.append(f"model.name={m.name} is an image model but data.name={d.name} is a text corpus: "
                 f"set data.name=fashion_mnist, or use model.name=gpt for text.")
    if m.name == "gpt" and d.name not in TEXT_DATASETS:
        p.append(f"model.name=gpt needs a text corpus but data.name={d.name} is an image dataset: set data.name to "
                 f"one of {', '.join(TEXT_DATASETS)}, or use model.name=vit or coatnet for images.")
    if d.name == "textfile" and not d.path:
        p.append("data.name=textfile needs data.path: set it to a UTF-8 text file.")
    if d.name == "fashion_mnist" and m.name in IMAGE_MODELS and m.image_size != 28:
        p.append(f"data.name=fashion_mnist has 28x28 images but model.image_size={m.image_size}: set "
                 f"model.image_size=28.")
    if d.name == "fashion_mnist" and m.name in IMAGE_MODELS and (m.in_chans != 1 or m.num_classes != 10):
        p.append(f"data.name=fashion_mnist has 1-channel images in 10 classes but model.in_chans={m.in_chans} and "
                 f"model.num_classes={m.num_classes}: set model.in_chans=1 and model.num_classes=10.")

    # train
    if t.stop_after is not None and t.stop_after > t.steps:
        p.append(f"train.stop_after ({t.stop_after}) is greater than train.steps ({t.steps}): set stop_after to at "
                 f"most {t.steps}, or raise steps.")
    if t.target is not None and t.eval_every == 0:
        p.append(f"train.target={t.target} is checked at evaluations, and train.eval_every=0 never evaluates: "
                 "set train.eval_every (e.g. 50).")
    if t.batch_ramp is not None:
        start, inc, samples = t.batch_ramp
        if not (1 <= start <= t.global_batch and inc >= 1 and samples >= 0) or (t.global_batch - start) % inc:
            p.append(f"train.batch_ramp={start},{inc},{samples} must have 1 <= START <= train.global_batch "
                     f"({t.global_batch}), INCREMENT >= 1 dividing global_batch - START, and SAMPLES >= 0.")
        if par.pp > 1:
            p.append("train.batch_ramp with parallel.pp > 1: a pipeline schedule is built for a fixed number of "
                     "micro-batches; use the ramp with pp=1.")
    if t.profile_steps is not None and not 1 <= t.profile_steps[0] <= t.profile_steps[1]:
        p.append(f"train.profile_steps ({t.profile_steps[0]},{t.profile_steps[1]}) must be two steps A,B with "
                 f"1 <= A <= B, e.g. train.profile_steps=5,7.")
    if not all(0.0 <= b < 1.0 for b in t.betas):
        p.append(f"train.betas ({list(t.betas)}) must both lie in [0, 1), e.g. [0.9, 0.95].")
    if t.micro_batch > t.global_batch:
        p.append(f"train.micro_batch ({t.micro_batch}) is larger than train.global_batch ({t.global_batch}): lower "
                 "micro_batch or raise global_batch.")

    # parallel
    if par.offload != "none" and par.zero == 0:
        p.append(f"parallel.offload={par.offload} needs ZeRO: set parallel.zero to 1, 2 or 3, or parallel.offload=none.")
    if par.offload == "nvme" and par.zero in (1, 2):
        p.append("parallel.offload=nvme is implemented for parallel.zero=3: set zero=3, or offload=cpu for stages 1-2.")
    if t.optimizer == "lamb" and par.offload == "nvme":
        p.append("train.optimizer=lamb with parallel.offload=nvme: the NVMe optimizer streams AdamW and SGD "
                 "updates only; use offload=cpu (or none) with lamb.")
    if t.optimizer == "onebit_adam" and par.zero > 1:
        p.append(f"train.optimizer=onebit_adam with parallel.zero={par.zero}: after its warm-up 1-bit Adam updates "
                 "every parameter on every rank from each rank's own whole gradient and the compressed momentum "
                 "(all-gathering fp32 parameters instead would undo the compression), and ZeRO stages 2 and 3 "
                 "exist not to hold whole gradients or parameters; use parallel.zero=1 (sharded optimizer "
                 "states during the warm-up) or 0.")
    if t.optimizer == "onebit_adam" and par.zero == 1 and par.offload != "none":
        p.append(f"train.optimizer=onebit_adam with parallel.offload={par.offload}: after its warm-up 1-bit Adam "
                 "updates every parameter on every rank's device, so nothing stays offloaded; use "
                 "parallel.offload=none with it.")
    if t.optimizer == "onebit_adam" and par.tp > 1:
        p.append(f"train.optimizer=onebit_adam with parallel.tp={par.tp}: 1-bit Adam compresses the data-parallel "
                 "momentum of parameters every dp rank holds whole, not yet of tensor-parallel shards; use tp=1 "
                 "with it, or adamw.")
    if t.optimizer == "lamb" and par.tp > 1:
        p.append(f"train.optimizer=lamb with parallel.tp={par.tp}: LAMB's trust ratio needs the norm of each whole "
                 "parameter, which is not yet summed over tensor-parallel shards; use adamw or sgd with tp > 1.")
    if par.hang_timeout_s >= par.timeout_s:
        p.append(f"parallel.hang_timeout_s ({par.hang_timeout_s:g}) must be below parallel.timeout_s "
                 f"({par.timeout_s:g}): the hang diagnosis has to run before the collective timeout ends "
                 "the job; lower hang_timeout_s or raise timeout_s.")
    if par.pp_virtual > 1 and par.pp_schedule not in ("interleaved", "zb"):
        p.append(f"parallel.pp_virtual={par.pp_virtual} needs parallel.pp_schedule=interleaved or zb "
                 f"(got {par.pp_schedule}): change the schedule or set pp_virtual=1.")
    if par.pp > 1 and par.pp_schedule == "interleaved" and par.pp_virtual < 2:
        p.append("parallel.pp_schedule=interleaved needs parallel.pp_virtual >= 2 (with 1 it is plain 1f1b): "
                 "set pp_virtual=2 or pp_schedule=1f1b.")
    n_stages = par.pp * par.pp_virtual
    n_blocks = _n_blocks(m)
    if isinstance(par.pp_balance, list):
        if len(par.pp_balance) != n_stages:
            p.append(f"parallel.pp_balance has {len(par.pp_balance)} entries but there are parallel.pp x "
                     f"parallel.pp_virtual = {n_stages} stages: give one block count per stage.")
        if any(x < 1 for x in par.pp_balance):
            p.append(f"parallel.pp_balance ({par.pp_balance}) must give every stage at least one block.")
        if n_blocks is not None and sum(par.pp_balance) != n_blocks:
            p.append(f"parallel.pp_balance ({par.pp_balance}) sums to {sum(par.pp_balance)} but the model has "
                     f"{n_blocks} blocks ({_blocks_key(m)}): make the counts add up to {n_blocks}.")
    if n_blocks is not None and n_stages > n_blocks:
        p.append(f"parallel.pp x parallel.pp_virtual = {n_stages} stages but the model has only {n_blocks} blocks "
                 f"({_blocks_key(m)}): use a deeper model or lower pp/pp_virtual.")
    p += _tensor_parallel_problems(m, par)

    # debug
    if cfg.debug.inject_overflow_step is not None and cfg.debug.inject_overflow_step > t.steps:
        p.append(f"debug.inject_overflow_step ({cfg.debug.inject_overflow_step}) is after the last step "
                 f"({t.steps}): choose a step between 1 and {t.steps}.")
    if cfg.debug.inject_hang_step is not None and cfg.debug.inject_hang_step > t.steps:
        p.append(f"debug.inject_hang_step ({cfg.debug.inject_hang_step}) is after the last step "
                 f"({t.steps}): choose a step between 1 and {t.steps}.")
    return p


# Layers tensor parallelism splits: GPT pads its vocabulary to a multiple of this, and CoAtNet's
# stages are convolutional except for the last two (layout "CCTT").
GPT_VOCAB_MULTIPLE = 64
COATNET_LAYOUT = "CCTT"


def _tensor_parallel_problems(m: ModelConfig, par: ParallelConfig) -> list[str]:
    """What parallel.tp (and sequence_parallel) cannot split in this model."""
    tp, p = par.tp, []
    if tp == 1:
        return p
    if m.n_head % tp:
        p.append(f"model.n_head ({m.n_head}) is not divisible by parallel.tp ({tp}): tensor parallel splits "
                 "attention heads, so choose a tp that divides n_head.")
    if m.name in ("gpt", "vit"):
        widths = {"model.d_model": m.d_model, "the MLP width (4 x model.d_model)": 4 * m.d_model}
    else:
        widths = {f"model.coatnet_dims[{i}] (a transformer stage)": d
                  for i, (d, kind) in enumerate(zip(m.coatnet_dims, COATNET_LAYOUT)) if kind == "T"}
    for what, n in widths.items():
        if n % tp:
            p.append(f"{what} ({n}) is not divisible by parallel.tp ({tp}): tensor parallel splits it, so "
                     "choose a tp that divides it.")
    if m.name == "gpt" and GPT_VOCAB_MULTIPLE % tp:
        p.append(f"parallel.tp ({tp}) does not divide the padded vocabulary (a multiple of {GPT_VOCAB_MULTIPLE}): "
                 "tensor parallel splits the vocabulary, so choose tp among 1, 2, 4, 8, 16, 32, 64.")
    if par.sequence_parallel:
        if m.name != "gpt":
            p.append(f"parallel.sequence_parallel=true is implemented for model.name=gpt, not {m.name}: "
                     "set parallel.sequence_parallel=false.")
        elif m.seq_len % tp:
            p.append(f"model.seq_len ({m.seq_len}) is not divisible by parallel.tp ({tp}): sequence parallel cuts "
                     "the sequence into tp equal parts; choose a seq_len that is a multiple of tp or set "
                     "parallel.sequence_parallel=false.")
    return p


def _get_dotted(cfg: BaseModel, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


# Introspection of the schema (used to read overrides and to explain errors).

def _field_info(cls: type[BaseModel], name: str):
    return cls.model_fields.get(name)


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def config_keys(cls: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema (`model.name`, ..., `nproc`), in schema order."""
    cls = cls or Config
    keys = []
    for name, info in cls.model_fields.items():
        if _is_section(info.annotation):
            keys += config_keys(info.annotation, prefix + name + ".")
        else:
            keys.append(prefix + name)
    return keys


def _unknown_key_message(section: list[str], name: str) -> str:
    """Sentence for an unknown key `name` under the dotted `section`, listing valid keys and a
    likely intended one."""
    cls: type[BaseModel] = Config
    for part in section:
        cls = cls.model_fields[part].annotation
    full = ".".join(section + [name])
    valid = list(cls.model_fields)
    hint = ""
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    if close:
        hint = f" Did you mean {'.'.join(section + [close[0]])}?"
    else:  # the right name in the wrong section ("train.zero" for "parallel.zero")
        elsewhere = [k for k in config_keys() if k.rsplit(".", 1)[-1] == name]
        if elsewhere:
            hint = f" Did you mean {elsewhere[0]}?"
    where = f"under {'.'.join(section)}" if section else "at the top level"
    return f"{full} is not a known key.{hint} Valid keys {where}: {', '.join(valid)}."


def _accepts_text_only(annotation: Any) -> bool:
    """True when a field takes strings but no numbers/booleans (paths, names): an override
    like `out=2024` is then meant as the text "2024"."""
    args = set(_union_args(annotation))
    return str in args and not args & {int, float, bool}


def _union_args(annotation: Any) -> tuple:
    origin = typing.get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        return typing.get_args(annotation)
    return (annotation,)
