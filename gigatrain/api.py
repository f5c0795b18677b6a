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
from .parallel.materialize import InitFn, KeyedInit, LocalValues, is_meta, materialize
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
                loss_fn: Callable | None = None, hooks: Sequence[StepHook] = (),
                init: KeyedInit | None = None) -> Engine:
    """Apply ``plan`` to ``model`` in place, in a fixed order, and return the engine.

    1. ``apply_tensor_parallel`` over ``mesh.tp`` (rewrites layers from the model's ``tp_plan``;
       a vocabulary-split model gets the vocabulary-parallel loss as ``model.loss``);
    2. ``apply_recompute`` (activation recomputation of whole blocks or attention cores);
    3. ``apply_compile`` (``torch.compile`` of each block's forward);
    4. ``apply_pipeline`` over ``mesh.pp`` (this rank's stages move to the device);
    5. a model built on the meta device is materialised: this rank's parameters (its stages, its
       tensor-parallel slices) and buffers get their keyed initial values on the device, except
       the trainable parameters under ZeRO-3, whose shards the strategy fills;
    6. ``apply_data_parallel`` over ``mesh.dp`` (data parallel or a ZeRO stage, with offload),
       which builds the optimizer with ``optimizer_factory``.

    Each step records the placements of the parameters it changes; the engine computes norms,
    overflow checks and checkpoint writers from them. ``init``: where a meta-device model's
    initial values come from (default: ``KeyedInit.of_model``, the model's own ``init_seed`` and
    ``init_module``); ignored for a materialised model.
    """
    if is_meta(model):
        init = init or KeyedInit.of_model(model)
    else:
        init = None
    precision = PrecisionPolicy.from_name(plan.precision, mesh.device, zero=plan.zero.stage)
    placements = Placements.replicated_model(model)
    model = apply_tensor_parallel(model, mesh.tp, plan.tensor, placements)
    model = apply_recompute(model, plan.recompute)
    model = apply_compile(model, plan.compile, mesh.device)
    loss_fn = loss_fn or default_loss(model)
    stages = apply_pipeline(model, mesh.pp, plan.pipeline, placements, device=mesh.device,
                            loss_fn=loss_fn, world=mesh.world)
    values = None
    if init is not None:
        d = mesh.dims
        values = LocalValues(init, stages.placements, mesh.coords, {"dp": d.dp, "pp": d.pp, "tp": d.tp})
        materialize(_rank_tensors(model, stages.owned, sharded=plan.zero.stage == 3), values, mesh.device)
    strategy = apply_data_parallel(stages.owned, mesh, plan.zero, plan.offload, precision=precision,
                                   optimizer_factory=optimizer_factory, pipeline=stages.pipeline_grads,
                                   initial=values if plan.zero.stage == 3 else None)
    return Engine(model, mesh=mesh, stages=stages, strategy=strategy, placements=stages.placements,
                  precision=precision, grad_clip=plan.grad_clip, loss_fn=loss_fn, hooks=hooks,
                  output_gather=output_gather(model))


def _rank_tensors(model: nn.Module, owned: nn.Module, *, sharded: bool) -> dict[str, torch.Tensor]:
    """The parameters this rank trains and the buffers of the modules it runs, by full-model
    name; without the trainable parameters when a ZeRO-3 strategy materialises their shards."""
    out = {n: p for n, p in owned.named_parameters() if not (sharded and p.requires_grad)}
    mine = {id(b) for b in owned.buffers()}
    out.update({n: b for n, b in model.named_buffers() if id(b) in mine})
    return out


def initialize(model: nn.Module, config: str | os.PathLike | dict | Any = None, *,
               loss_fn: Callable | None = None, optimizer_factory: OptimizerFactory | None = None,
               init_fn: InitFn | None = None, weights: str | os.PathLike | None = None) -> Engine:
    """Make ``model`` train under the layout ``config`` describes; returns the ``Engine``.

    ``config``: a config file path, a dict of the same keys (``{"parallel": {"zero": 3}}``), a
    ``gigatrain.config.Config``, or None for the defaults. Only the ``parallel``, ``train``
    (optimizer, schedule, clipping, seed), ``precision`` and ``checkpoint`` sections matter here;
    the model and data sections are the caller's business.

    Works in a plain process (one rank) and under ``torchrun``/``srun`` (the process group is
    created from the launcher's environment when none exists; ``engine.close()`` removes it).
    ``loss_fn(output, targets)`` defaults to ``model.loss`` or cross-entropy;
    ``optimizer_factory(groups)`` defaults to the optimizer the config's ``train`` section names.

    A model built under ``torch.device("meta")`` is materialised rank by rank, each rank
    computing only the part it owns: ``init_fn(name, module)`` initialises each module's own
    tensors (``gigatrain.parallel.materialize``), from a generator keyed by ``train.seed`` and
    the module's name, so every layout starts from the same values (a model that defines
    ``init_seed`` and ``init_module``, as gigatrain's do, needs no ``init_fn``). A materialised
    model is used as it is.

    ``weights``: a folder ``gigatrain export`` wrote (consolidated safetensors under the model's
    parameter names); the model starts from those values, each rank reading only its slices.
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
    init = None
    if is_meta(model):
        init = KeyedInit.capture(model, t.seed, init_fn) if init_fn is not None else KeyedInit.of_model(model)
    engine = parallelize(model, mesh, optimizer_factory, plan, loss_fn=loss_fn, init=init)
    if weights is not None:
        engine.load_weights(weights)
    engine.config = cfg
    engine.owns_process_group = created
    engine.lr_schedule = lambda step: lr_at(step, kind=t.schedule, lr=t.lr, total_steps=t.steps,
                                            warmup_steps=t.warmup_steps, min_lr_ratio=t.min_lr_ratio)
    return engine
