"""The Python API: ``initialize`` for any ``nn.Module``, and ``parallelize``, the ordered
composition of the parallel techniques that both it and the ``gigatrain train`` command use.

    import gigatrain
    engine = gigatrain.initialize(model, {"parallel": {"zero": 3}, "train": {"lr": 1e-3}},
                                  loss_fn=my_loss)
    for step, (x, y) in enumerate(batches):
        result = engine.train_step([(x, y)])        # learning rate from the config's schedule
    engine.save("ckpt")

Under ``torchrun`` or ``srun`` every process runs the same script; without a launcher it is one
process. The process group is created when none exists, and torn down by ``engine.close()``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from .distributed.mesh import Mesh
from .engine import Engine, OptimizerFactory, StepHook, default_loss
from .parallel.pipeline.stages import apply_pipeline
from .parallel.placement import Placements
from .parallel.policies import ParallelPlan, plan_from_config
from .parallel.compile import apply_compile
from .parallel.recompute import apply_recompute
from .parallel.strategy import apply_data_parallel
from .parallel.tensor import apply_tensor_parallel, output_gather
from .precision import PrecisionPolicy

__all__ = ["initialize", "parallelize"]


def parallelize(model: nn.Module, mesh: Mesh, optimizer_factory: OptimizerFactory, plan: ParallelPlan, *,
                loss_fn: Callable | None = None, hooks: Sequence[StepHook] = ()) -> Engine:
    """Apply ``plan`` to ``model`` in place, in a fixed order, and return the engine.

    1. ``apply_tensor_parallel`` over ``mesh.tp`` (rewrites layers from the model's ``tp_plan``;
       a vocabulary-split model gets the vocabulary-parallel loss as ``model.loss``);
    2. ``apply_recompute`` (activation recomputation of whole blocks or attention cores);
    3. ``apply_compile`` (``torch.compile`` of each block's forward);
    4. ``apply_pipeline`` over ``mesh.pp`` (this rank's stages move to the device);
    5. ``apply_data_parallel`` over ``mesh.dp`` (data parallel or a ZeRO stage, with offload),
       which builds the optimizer with ``optimizer_factory``.

    Each step records the placements of the parameters it changes; the engine computes norms,
    overflow checks and checkpoint writers from them.
    """
    precision = PrecisionPolicy.from_name(plan.precision, mesh.device, zero=plan.zero.stage)
    placements = Placements.replicated_model(model)
    model = apply_tensor_parallel(model, mesh.tp, plan.tensor, placements)
    model = apply_recompute(model, plan.recompute)
    model = apply_compile(model, plan.compile, mesh.device)
    loss_fn = loss_fn or default_loss(model)
    stages = apply_pipeline(model, mesh.pp, plan.pipeline, placements, device=mesh.device,
                            loss_fn=loss_fn, world=mesh.world)
    strategy = apply_data_parallel(stages.owned, mesh, plan.zero, plan.offload, precision=precision,
                                   optimizer_factory=optimizer_factory, pipeline=stages.pipeline_grads)
    return Engine(model, mesh=mesh, stages=stages, strategy=strategy, placements=stages.placements,
                  precision=precision, grad_clip=plan.grad_clip, loss_fn=loss_fn, hooks=hooks,
                  output_gather=output_gather(model))


def initialize(model: nn.Module, config: str | os.PathLike | dict | Any = None, *,
               loss_fn: Callable | None = None, optimizer_factory: OptimizerFactory | None = None) -> Engine:
    """Make ``model`` train under the layout ``config`` describes; returns the ``Engine``.

    ``config``: a config file path, a dict of the same keys (``{"parallel": {"zero": 3}}``), a
    ``gigatrain.config.Config``, or None for the defaults. Only the ``parallel``, ``train``
    (optimizer, schedule, clipping, seed), ``precision`` and ``checkpoint`` sections matter here;
    the model and data sections are the caller's business.

    Works in a plain process (one rank) and under ``torchrun``/``srun`` (the process group is
    created from the launcher's environment when none exists; ``engine.close()`` removes it).
    ``loss_fn(output, targets)`` defaults to ``model.loss`` or cross-entropy;
    ``optimizer_factory(groups)`` defaults to the optimizer the config's ``train`` section names.
    """
    from .config import Config, config_from_dict, load_config, resolve_for_world
    from .distributed.launch import init_distributed, read_env
    from .optim import build_optimizer, lr_at

    if config is None:
        cfg = config_from_dict({})
    elif isinstance(config, Config):
        cfg = config
    elif isinstance(config, dict):
        cfg = config_from_dict(config)
    else:
        cfg = load_config(str(Path(config)), [])
    env = read_env()
    device, created = init_distributed(env, cfg.parallel.backend, cfg.parallel.timeout_s)
    import torch.distributed as dist

    cfg = resolve_for_world(cfg, dist.get_world_size())
    plan = plan_from_config(cfg)
    mesh = Mesh(plan.dims, device)
    t = cfg.train
    if optimizer_factory is None:
        def optimizer_factory(groups):
            return build_optimizer(t, groups, device)
    torch.manual_seed(t.seed)
    engine = parallelize(model, mesh, optimizer_factory, plan, loss_fn=loss_fn)
    engine.config = cfg
    engine.owns_process_group = created
    engine.lr_schedule = lambda step: lr_at(step, kind=t.schedule, lr=t.lr, total_steps=t.steps,
                                            warmup_steps=t.warmup_steps, min_lr_ratio=t.min_lr_ratio)
    return engine
