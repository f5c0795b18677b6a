"""Typed configuration for gigatrain.

One `Config` describes a whole training job: the model, the data, the optimisation, how the
work is split over processes (data, pipeline and tensor parallel, ZeRO, offload), checkpoints
and precision. It is read from YAML, JSON or TOML, adjusted by dotted command-line overrides
(`train.lr=3e-4`), validated strictly (a string is never silently turned into a number), and
completed for a given world size by `resolve_for_world`, which needs no process group.

Every problem is reported as a `ConfigError` whose message is one readable paragraph naming
the key, the value given and what to change.

The package is split by concern: ``schema`` (the typed sections and cross-field checks),
``loading`` (files, the built-in default, dotted overrides), ``explain`` (pydantic errors as
sentences, the generated key reference), ``world`` (completing a config for a world size, and
what is implemented), plus ``errors`` and ``yamlio``.

Typical use::

    cfg = load_config("configs/gpt_small.yaml", ["train.lr=3e-4", "parallel.pp=2"])
    cfg = resolve_for_world(cfg, world_size=4)   # fills parallel.dp, checkpoint.dir, ...
    check_supported(cfg)                         # refuses what is not implemented yet
    cfg.grad_accum                               # micro-batches per step per dp rank
"""
from .errors import ConfigError
from .explain import config_reference
from .loading import config_from_dict, load_config
from .schema import (CheckpointConfig, Config, DataConfig, DebugConfig, ModelConfig, ParallelConfig,
                     TrainConfig, config_keys)
from .world import SUPPORTED, check_supported, resolve_for_world
from .yamlio import parse_value

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
