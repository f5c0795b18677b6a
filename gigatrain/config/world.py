"""Completing a config for a world size, and what is implemented (no process group needed)."""
from __future__ import annotations

import os
from typing import Optional


from .errors import ConfigError
from .schema import Config, _get_dotted
from .loading import config_from_dict


# --------------------------------------------------------------------------------------
# What is implemented: the single place to edit when a feature lands.
# --------------------------------------------------------------------------------------

#: Values implemented so far, by dotted key. A key that is not listed accepts everything the
#: schema accepts; `None` as a value also means "any".
SUPPORTED: dict[str, Optional[set]] = {
    "parallel.zero": {0, 1, 2, 3},
    "parallel.pp": None,
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
            if t.batch_ramp is not None and (t.batch_ramp[0] % per_step or t.batch_ramp[1] % per_step):
                problems.append(f"train.batch_ramp={','.join(map(str, t.batch_ramp))}: START and INCREMENT must be "
                                f"multiples of train.micro_batch ({t.micro_batch}) x parallel.dp ({dp}) = {per_step}, "
                                "so that every step's batch splits into whole micro-batches on every rank.")
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
