"""Typed configuration for gigatrain.

One `Config` describes a whole training job: the model, the data, the optimisation, how the
work is split over processes (data, pipeline and tensor parallel, ZeRO, offload), checkpoints
and precision. It is read from YAML, JSON or TOML, adjusted by dotted command-line overrides
(`train.lr=3e-4`), validated strictly (a string is never silently turned into a number), and
completed for a given world size by `resolve_for_world`, which needs no process group.

Every problem is reported as a `ConfigError` whose message is one readable paragraph naming
the key, the value given and what to change.

Typical use::

    cfg = load_config("configs/gpt_small.yaml", ["train.lr=3e-4", "parallel.pp=2"])
    cfg = resolve_for_world(cfg, world_size=4)   # fills parallel.dp, checkpoint.dir, ...
    check_supported(cfg)                         # refuses what is not implemented yet
    cfg.grad_accum                               # micro-batches per step per dp rank
"""

from __future__ import annotations

import difflib
import importlib.resources
import json
import os
import re
import types
import typing
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

try:  # Python 3.11+
    import tomllib as _toml
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 without tomllib
    try:
        import tomli as _toml  # type: ignore[no-redef]
    except ModuleNotFoundError:
        _toml = None

__all__ = [
    "ConfigError",
    "ModelConfig",
    "DataConfig",
    "TrainConfig",
    "ParallelConfig",
    "CheckpointConfig",
    "DebugConfig",
    "Config",
    "SUPPORTED",
    "load_config",
    "config_from_dict",
    "parse_value",
    "resolve_for_world",
    "check_supported",
    "config_reference",
    "config_keys",
]


class ConfigError(ValueError):
    """A configuration problem. `str(err)` is one paragraph saying what is wrong and what to
    change; `err.problems` holds the individual sentences."""

    def __init__(self, problems: str | list[str], source: str | None = None):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = [_one_line(p) for p in problems]
        self.source = source
        head = f"Invalid configuration ({source}): " if source else "Invalid configuration: "
        super().__init__(head + " ".join(self.problems))


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if text.endswith((".", "?", "!")) else text + "."


class _Problems(ValueError):
    """Raised by the cross-field validators: carries every problem found, so that pydantic's
    error (which keeps the original exception in `ctx`) can be turned back into a list."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(" ".join(problems))


class _Section(BaseModel):
    # strict: YAML/JSON/TOML already give typed scalars, so any coercion would hide a mistake
    # (an int field never accepts "3", 3.0 or true; float fields accept ints).
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


# --------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------

TEXT_DATASETS = ("kjv", "pystdlib", "textfile")
IMAGE_DATASETS = ("fashion_mnist",)
IMAGE_MODELS = ("vit", "coatnet")


class ModelConfig(_Section):
    """The network to train."""

    name: Literal["gpt", "vit", "coatnet"] = Field("gpt", description="Model family: `gpt` (causal language model), `vit` (vision transformer) or `coatnet` (convolution + attention hybrid).")
    n_layer: int = Field(4, ge=1, description="Number of transformer blocks (gpt, vit).")
    n_head: int = Field(4, ge=1, description="Attention heads per block; must divide `model.d_model` and be divisible by `parallel.tp`.")
    d_model: int = Field(128, ge=1, description="Hidden width (gpt, vit).")
    seq_len: int = Field(128, ge=1, description="Context length in tokens (gpt).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability (0 keeps runs deterministic across layouts).")
    image_size: int = Field(28, ge=1, description="Input image side in pixels (vit, coatnet).")
    in_chans: int = Field(1, ge=1, description="Input image channels (vit, coatnet).")
    num_classes: int = Field(10, ge=2, description="Number of classes (vit, coatnet).")
    patch_size: int = Field(4, ge=1, description="ViT patch side in pixels; must divide `model.image_size`.")
    coatnet_depths: list[int] = Field(default_factory=lambda: [1, 1, 2, 1], description="CoAtNet: blocks in each stage.")
    coatnet_dims: list[int] = Field(default_factory=lambda: [32, 64, 96, 128], description="CoAtNet: channels of each stage (same length as `coatnet_depths`).")
    init_std: float = Field(0.02, gt=0.0, description="Standard deviation of the normal weight initialisation.")


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
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="Optimizer: `adamw` or `sgd`.")
    lr: float = Field(1e-3, gt=0.0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Final learning rate of the decay as a fraction of `train.lr`.")
    weight_decay: float = Field(0.1, ge=0.0, description="Decoupled weight decay (applied to matrices, not to biases and norms).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW moment decay rates, each in [0, 1).")
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="SGD momentum (sgd only).")
    schedule: Literal["cosine", "onecycle", "constant"] = Field("cosine", description="Learning-rate schedule after warmup: `cosine` decay to `lr * min_lr_ratio`, `onecycle`, or `constant`.")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps from 0 to `train.lr`.")
    grad_clip: Optional[float] = Field(1.0, ge=0.0, description="Clip the global gradient norm to this value (null or 0 = no clipping).")
    stop_after: Optional[int] = Field(None, ge=1, description="Stop after this step while keeping the schedule of `train.steps` (null = run all steps).")
    log_every: int = Field(10, ge=1, description="Print a progress line every N steps when the output is not a terminal (logs, SLURM); `metrics.jsonl` gets every step.")
    eval_every: int = Field(0, ge=0, description="Evaluate on held-out data every N steps (0 = never).")
    sample_tokens: int = Field(200, ge=0, description="Tokens of text sampled from a gpt at the end of training (0 = none).")
    max_skipped_steps: int = Field(5, ge=1, description="Stop (training diverged) after this many steps in a row are skipped for a NaN/inf loss or gradient norm; such a step never updates the weights.")

    @field_validator("betas", mode="before")
    @classmethod
    def _betas_from_list(cls, value: Any) -> Any:
        # YAML, JSON and TOML have lists, not tuples.
        return tuple(value) if isinstance(value, list) else value

    @property
    def min_lr(self) -> float:
        """Final learning rate of the decay: `lr * min_lr_ratio`."""
        return self.lr * self.min_lr_ratio

    @property
    def clip_enabled(self) -> bool:
        """Whether gradient clipping is on (`grad_clip` neither null nor 0)."""
        return bool(self.grad_clip)


class ParallelConfig(_Section):
    """How the work is split over processes."""

    dp: Optional[int] = Field(None, ge=1, description="Data-parallel degree (null = world size / (pp x tp)).")
    pp: int = Field(1, ge=1, description="Pipeline-parallel degree (stages).")
    tp: int = Field(1, ge=1, description="Tensor-parallel degree.")
    zero: int = Field(0, ge=0, le=3, description="ZeRO stage: 0 (replicated), 1 (optimizer state sharded), 2 (+ gradients), 3 (+ parameters).")
    offload: Literal["none", "cpu", "nvme"] = Field("none", description="Where ZeRO keeps optimizer state: `none` (device), `cpu` or `nvme`; needs `parallel.zero` >= 1.")
    offload_dir: Optional[str] = Field(None, description="Folder for nvme offload (null = `<out>/offload`).")
    pp_schedule: Literal["naive", "gpipe", "1f1b", "interleaved", "zb"] = Field("1f1b", description="Pipeline schedule: `naive`, `gpipe`, `1f1b`, `interleaved` (needs `parallel.pp_virtual` >= 2) or `zb` (zero bubble).")
    pp_microbatches: Optional[int] = Field(None, ge=1, description="Micro-batches per step per dp rank through the pipeline (null = `grad_accum`); when set it must equal global_batch / (micro_batch x dp).")
    pp_virtual: int = Field(1, ge=1, description="Model chunks per pipeline rank (interleaved schedule).")
    pp_balance: Union[Literal["params", "time", "uniform"], list[int]] = Field("params", description="How blocks are split into stages: by `params`, by measured `time`, `uniform`, or an explicit list of blocks per stage (length pp x pp_virtual).")
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
    return model.n_layer


def _blocks_key(model: ModelConfig) -> str:
    return "sum of model.coatnet_depths" if model.name == "coatnet" else "model.n_layer"


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
    if par.hang_timeout_s >= par.timeout_s:
        p.append(f"parallel.hang_timeout_s ({par.hang_timeout_s:g}) must be below parallel.timeout_s "
                 f"({par.timeout_s:g}): the hang diagnosis has to run before the collective timeout ends "
                 "the job; lower hang_timeout_s or raise timeout_s.")
    if par.pp > 1 and par.zero >= 2:
        p.append(f"parallel.zero={par.zero} with parallel.pp={par.pp}: a pipeline accumulates full gradients over its "
                 "micro-batches, which stages 2-3 do not keep; use parallel.zero=1 (sharded optimizer) with pipelines.")
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
    if par.tp > 1 and m.name in ("gpt", "vit") and m.n_head % par.tp:
        p.append(f"model.n_head ({m.n_head}) is not divisible by parallel.tp ({par.tp}): tensor parallel splits "
                 "attention heads, so choose a tp that divides n_head.")

    # debug
    if cfg.debug.inject_overflow_step is not None and cfg.debug.inject_overflow_step > t.steps:
        p.append(f"debug.inject_overflow_step ({cfg.debug.inject_overflow_step}) is after the last step "
                 f"({t.steps}): choose a step between 1 and {t.steps}.")
    if cfg.debug.inject_hang_step is not None and cfg.debug.inject_hang_step > t.steps:
        p.append(f"debug.inject_hang_step ({cfg.debug.inject_hang_step}) is after the last step "
                 f"({t.steps}): choose a step between 1 and {t.steps}.")
    return p


# --------------------------------------------------------------------------------------
# What is implemented: the single place to edit when a feature lands.
# --------------------------------------------------------------------------------------

#: Values implemented so far, by dotted key. A key that is not listed accepts everything the
#: schema accepts; `None` as a value also means "any".
SUPPORTED: dict[str, Optional[set]] = {
    "parallel.zero": {0, 1, 2, 3},
    "parallel.pp": None,
    "parallel.tp": {1},
    "parallel.offload": {"none", "cpu", "nvme"},
}


def check_supported(cfg: Config) -> None:
    """Raise ConfigError if `cfg` asks for something the schema allows but gigatrain does not
    implement yet (see `SUPPORTED`). Pure; the planner may reason about unsupported layouts,
    the trainer calls this before launching."""
    problems = []
    for key, allowed in SUPPORTED.items():
        if allowed is None:
            continue
        value = _get_dotted(cfg, key)
        if value not in allowed:
            shown = ", ".join(str(v) for v in sorted(allowed, key=str))
            problems.append(f"{key}={value} is not implemented yet (supported: {shown}): "
                            f"choose a supported value.")
    if problems:
        raise ConfigError(problems)


def _get_dotted(cfg: BaseModel, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------------------
# Reading files and overrides
# --------------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """YAML loader with YAML 1.2 scalars: `3e-4` is a float (PyYAML's YAML 1.1 reads it as a
    string), only true/false are booleans (not yes/no/on/off), `010` is ten, and dates stay
    strings."""


_REPLACED_TAGS = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:float", "tag:yaml.org,2002:int",
                  "tag:yaml.org,2002:timestamp"}
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _REPLACED_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9][0-9_]*|0x[0-9a-fA-F][0-9a-fA-F_]*|0o[0-7][0-7_]*)$"),
                              list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    if text.startswith(("0x", "0o")):
        return int(text, 0)
    return int(text, 10)


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


class _Dumper(yaml.SafeDumper):
    """Block mappings, one key a line, but short lists on one line: `betas: [0.9, 0.95]`."""


# Quote exactly the strings that _Loader would read as something else ("3e-4", "2024").
_Dumper.yaml_implicit_resolvers = _Loader.yaml_implicit_resolvers
_Dumper.add_representer(list, lambda dumper, value: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", value, flow_style=True))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def parse_value(text: str) -> Any:
    """Parse one override value as a YAML scalar or flow list/mapping: `3e-4` -> 0.0003,
    `[2,2]` -> [2, 2], `null` -> None, `true` -> True, `auto` -> "auto". Text that is not
    valid YAML is returned as the string itself."""
    try:
        return _yaml_load(text)
    except (yaml.YAMLError, ValueError):
        return text


_DEFAULT_SOURCE = "built-in default config"


def _read_default_text() -> str:
    return importlib.resources.files("gigatrain").joinpath("configs").joinpath("default.yaml").read_text("utf-8")


def _read_file(path: str) -> dict:
    """Load a YAML, JSON or TOML file (chosen by extension) into a dict."""
    if os.path.isdir(path):
        raise ConfigError(f"{path} is a folder, not a config file: give a .yaml, .json or .toml file "
                          "(put key=value overrides after it)", source=path)
    if not os.path.isfile(path):
        raise ConfigError(f"the config file {path} does not exist: check the path", source=path)
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext in (".yaml", ".yml"):
            with open(path, encoding="utf-8") as f:
                data = _yaml_load(f.read())
        elif ext == ".json":
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        elif ext == ".toml":
            if _toml is None:  # pragma: no cover
                raise ConfigError("reading TOML needs Python 3.11+ or the tomli package: install tomli or use YAML",
                                  source=path)
            with open(path, "rb") as f:
                data = _toml.load(f)
        else:
            raise ConfigError(f"cannot tell the format of {path} from its extension {ext or '(none)'}: "
                              "name it .yaml, .yml, .json or .toml", source=path)
    except (yaml.YAMLError, json.JSONDecodeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"the file is not valid {ext.lstrip('.').upper()}: {exc}; fix the syntax", source=path) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"the file must hold a mapping of keys (model:, train:, ...) but holds a "
                          f"{type(data).__name__}", source=path)
    return data


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


def _apply_override(data: dict, item: str) -> None:
    """Apply one `a.b=value` override to the raw nested dict, checking the key against the
    schema first so a typo is reported with suggestions."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value, e.g. train.lr=3e-4")
    key, text = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"override {item!r} has an empty key: write it as section.key=value, e.g. train.lr=3e-4")
    cls: type[BaseModel] = Config
    for i, part in enumerate(parts):
        info = _field_info(cls, part)
        if info is None:
            raise ConfigError(_unknown_key_message(parts[:i], part))
        last = i == len(parts) - 1
        if _is_section(info.annotation):
            cls = info.annotation
            if last:  # a whole section as a flow mapping, merged: `train={steps: 5, lr: 0.01}`
                value = parse_value(text)
                if isinstance(value, dict) and isinstance(data.get(part), dict):
                    data[part].update(value)
                else:
                    data[part] = value
                return
            node = data.get(part)
            if not isinstance(node, dict):
                node = data[part] = {}
            data = node
        elif not last:
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is a value, not a section, so it has no "
                              f"key {parts[i + 1]}; write {'.'.join(parts[:i + 1])}=value")
        else:
            value = parse_value(text)
            if value is not None and not isinstance(value, (str, list, dict)) and _accepts_text_only(info.annotation):
                value = text
            data[part] = value


def config_from_dict(data: dict, source: str | None = None) -> Config:
    """Validate a nested dict into a Config, turning every pydantic error into one ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of keys, not a {type(data).__name__}", source=source)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, data), source=source) from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a config and apply dotted overrides.

    `path` is a .yaml/.yml, .json or .toml file, or None for the built-in default job
    (gigatrain/configs/default.yaml). Each override is `dotted.key=value`, the value parsed as
    YAML (`train.lr=3e-4`, `parallel.pp_balance=[2,2]`, `resume=auto`, `train.grad_clip=null`);
    an override sets a key whether or not the file mentions it. Raises ConfigError (one
    paragraph) for unknown keys (with the valid keys and a suggestion), wrong types (key, value
    given, expected type), values out of range and inconsistent combinations.
    """
    if path is None:
        source = _DEFAULT_SOURCE
        data = _yaml_load(_read_default_text()) or {}
    else:
        source = os.fspath(path)
        data = _read_file(source)
    if overrides:
        source += " with overrides"
    problems: list[str] = []
    for item in overrides:
        try:
            _apply_override(data, item)
        except ConfigError as exc:  # keep going so that every problem is reported at once
            problems += exc.problems
    try:
        cfg = config_from_dict(data, source)
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        raise ConfigError(problems, source=source)
    return cfg


# --------------------------------------------------------------------------------------
# Turning pydantic errors into sentences
# --------------------------------------------------------------------------------------

_CONSTRAINTS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of",
                "too_short", "too_long", "finite_number"}


def _fmt(value: Any) -> str:
    """A value as a user would type it (YAML flavoured), shortened."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = repr(value)
    elif isinstance(value, tuple):
        text = repr(list(value))
    else:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _describe(annotation: Any) -> str:
    """An annotation in words, for error messages: "an integer or null"."""
    if annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if origin is Literal:
        values = [_fmt(v) for v in typing.get_args(annotation)]
        return "one of " + ", ".join(values)
    if origin is list:
        (inner,) = typing.get_args(annotation)
        return f"a list of {_plural(inner)}"
    if origin is tuple:
        args = typing.get_args(annotation)
        return f"a list of {len(args)} {_plural(args[0])}"
    if _is_section(annotation):
        return "a mapping of keys"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(annotation, str(annotation))


def _plural(annotation: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings"}.get(annotation, _describe(annotation))


def _literals(annotation: Any) -> list[str]:
    if typing.get_origin(annotation) is Literal:
        return [v for v in typing.get_args(annotation) if isinstance(v, str)]
    return [v for a in _union_args(annotation) if a is not annotation for v in _literals(a)]


def _locate(loc: tuple) -> tuple[list[str], Any, bool]:
    """Split a pydantic error location into (schema key path, its annotation, unknown?).
    The rest of the location (union branch tags, list indices) is dropped: messages talk
    about the whole key."""
    cls: Any = Config
    path: list[str] = []
    for item in loc:
        if not (isinstance(item, str) and _is_section(cls)):
            break
        info = cls.model_fields.get(item)
        if info is None:
            return path + [item], None, True
        path.append(item)
        cls = info.annotation
    return path, cls, False


def _raw_value(data: Any, path: list[str]) -> Any:
    for part in path:
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _explain(exc: ValidationError, data: dict) -> list[str]:
    """One sentence per problem in a pydantic ValidationError (union branches of one key are
    merged into one sentence)."""
    problems: list[str] = []
    grouped: dict[tuple, list[dict]] = {}
    for err in exc.errors(include_url=False):
        path, annotation, unknown = _locate(err["loc"])
        if unknown:
            problems.append(_unknown_key_message(path[:-1], path[-1]))
            continue
        if err["type"] in ("value_error", "assertion_error"):
            original = (err.get("ctx") or {}).get("error")
            if isinstance(original, _Problems):
                problems += original.problems
            else:
                problems.append(str(original) if original is not None else err["msg"])
            continue
        grouped.setdefault(tuple(path), []).append(dict(err, annotation=annotation))

    for path, errs in grouped.items():
        key = ".".join(path) or "the config"
        annotation = errs[0]["annotation"]
        value = _raw_value(data, list(path))
        if len(errs) == 1 and errs[0]["type"] in _CONSTRAINTS:
            must = errs[0]["msg"].replace("Input should be", "must be")
            problems.append(f"{key}={_fmt(value)} is out of range: it {must}")
            continue
        if _is_section(annotation):
            keys = ", ".join(annotation.model_fields)
            problems.append(f"{key} must be a mapping of keys ({keys}) but is {_fmt(value)}.")
            continue
        sentence = f"{key}={_fmt(value)} is not valid: expected {_describe(annotation)}"
        options = _literals(annotation)
        if options and isinstance(value, str):
            close = difflib.get_close_matches(value, options, n=1, cutoff=0.5)
            if close:
                sentence += f". Did you mean {close[0]!r}?"
        elif isinstance(value, str) and any(a in (int, float) for a in _union_args(annotation)):
            sentence += " (write numbers without quotes)"
        problems.append(sentence)
    return problems


# --------------------------------------------------------------------------------------
# Completing a config for a world size
# --------------------------------------------------------------------------------------

def resolve_for_world(cfg: Config, world_size: int) -> Config:
    """Return a copy of `cfg` completed for `world_size` processes; needs no process group.

    Fills `parallel.dp` (world_size / (pp x tp) when null), `parallel.pp_microbatches`
    (= `cfg.grad_accum` when pp > 1), `checkpoint.dir` (<out>/checkpoints) and, for nvme
    offload, `parallel.offload_dir` (<out>/offload), these two only when `out` is set. Checks
    that dp x pp x tp equals the world size, that global_batch is a multiple of micro_batch x
    dp, that an explicit pp_microbatches matches, that the overflow- and hang-injection ranks
    exist and that a resume path exists. Every failure is reported together in one ConfigError
    that says what to change. After this, `cfg.grad_accum` and `cfg.world_size` are defined.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"the world size must be a positive integer, got {world_size!r}")
    par, t = cfg.parallel, cfg.train
    problems: list[str] = []
    model_par = par.pp * par.tp
    dp = par.dp
    if dp is None:
        if world_size % model_par:
            problems.append(f"the world size {world_size} is not divisible by parallel.pp ({par.pp}) x parallel.tp "
                            f"({par.tp}) = {model_par}: launch a multiple of {model_par} processes (nproc), or "
                            "change pp/tp.")
        else:
            dp = world_size // model_par
    elif dp * model_par != world_size:
        problems.append(f"parallel.dp ({dp}) x parallel.pp ({par.pp}) x parallel.tp ({par.tp}) = {dp * model_par} "
                        f"does not match the world size {world_size}: launch {dp * model_par} processes (nproc), "
                        "or set parallel.dp=null to derive dp from the world size.")

    data = cfg.to_dict()
    if dp is not None:
        per_step = t.micro_batch * dp
        if t.global_batch % per_step:
            problems.append(f"train.global_batch={t.global_batch} is not divisible by train.micro_batch "
                            f"({t.micro_batch}) x parallel.dp ({dp}) = {per_step}: choose a global batch that is a "
                            f"multiple of {per_step}, or change micro_batch/dp.")
        else:
            accum = t.global_batch // per_step
            if par.pp > 1:
                if par.pp_microbatches is None:
                    data["parallel"]["pp_microbatches"] = accum
                elif par.pp_microbatches != accum:
                    problems.append(
                        f"parallel.pp_microbatches={par.pp_microbatches} does not match train.global_batch "
                        f"({t.global_batch}) / (train.micro_batch ({t.micro_batch}) x parallel.dp ({dp})) = {accum} "
                        f"micro-batches per step: set pp_microbatches=null (it then becomes {accum}), or change "
                        "train.micro_batch so that global_batch = micro_batch x dp x pp_microbatches.")
                if par.pp_virtual > 1 and accum % par.pp:
                    problems.append(
                        f"parallel.pp_schedule={par.pp_schedule} with parallel.pp_virtual={par.pp_virtual} needs the "
                        f"micro-batches per step ({accum} = global_batch / (micro_batch x dp)) to be a multiple of "
                        f"parallel.pp ({par.pp}): change train.micro_batch or train.global_batch.")
        data["parallel"]["dp"] = dp

    if cfg.debug.inject_overflow_step is not None and cfg.debug.inject_overflow_rank >= world_size:
        problems.append(f"debug.inject_overflow_rank ({cfg.debug.inject_overflow_rank}) does not exist in a world of "
                        f"{world_size} processes: choose a rank below {world_size}.")
    if cfg.debug.inject_hang_step is not None and cfg.debug.inject_hang_rank >= world_size:
        problems.append(f"debug.inject_hang_rank ({cfg.debug.inject_hang_rank}) does not exist in a world of "
                        f"{world_size} processes: choose a rank below {world_size}.")
    if cfg.resume not in (None, "auto") and not os.path.exists(cfg.resume):
        problems.append(f"resume={cfg.resume!r} does not exist: give an existing checkpoint folder, 'auto' to resume "
                        "from the newest checkpoint in checkpoint.dir if there is one, or null to start fresh.")
    if problems:
        raise ConfigError(problems)

    # Without `out` (the CLI picks a fresh folder later) these stay null.
    if cfg.checkpoint.dir is None and cfg.out is not None:
        data["checkpoint"]["dir"] = os.path.join(cfg.out, "checkpoints")
    if par.offload == "nvme" and par.offload_dir is None and cfg.out is not None:
        data["parallel"]["offload_dir"] = os.path.join(cfg.out, "offload")
    return config_from_dict(data)


# --------------------------------------------------------------------------------------
# Reference documentation
# --------------------------------------------------------------------------------------

def _type_name(annotation: Any) -> str:
    """A short type for the reference table: `int | null`, `"a" | "b"`, `list[int]`."""
    if annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is Literal:
        return " | ".join(json.dumps(v) for v in typing.get_args(annotation))
    if origin is list:
        return f"list[{_type_name(typing.get_args(annotation)[0])}]"
    if origin is tuple:
        return "[" + ", ".join(_type_name(a) for a in typing.get_args(annotation)) + "]"
    return getattr(annotation, "__name__", str(annotation))


def config_reference() -> str:
    """Markdown table of every config key (dotted), its type, default and description,
    generated from the schema."""
    lines = ["| Key | Type | Default | Description |", "|---|---|---|---|"]

    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    for key in config_keys():
        section, _, name = key.rpartition(".")
        cls = Config.model_fields[section].annotation if section else Config
        info = cls.model_fields[name]
        default = info.get_default(call_default_factory=True)
        shown = json.dumps(list(default) if isinstance(default, tuple) else default)
        lines.append(f"| `{key}` | `{esc(_type_name(info.annotation))}` | `{esc(shown)}` | "
                     f"{esc(info.description or '')} |")
    return "\n".join(lines) + "\n"
