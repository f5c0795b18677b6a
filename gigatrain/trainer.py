"""The training loop behind ``gigatrain train``: config -> model, data, engine -> steps.

This is where a model and a dataset are chosen from the config; the engine below it stays
generic. ``train`` runs inside one process of the job (the launcher has already started the others)
and returns the per-step losses, which the tests compare across layouts.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .config import Config, resolve_for_world
from .data import open_dataset
from .data.sampler import BatchLoader, BatchRamp, GlobalBatchSampler
from .distributed.launch import DistEnv, distributed, read_env
from .distributed.comm import OpLog
from .distributed.mesh import Mesh, ParallelDims
from .distributed.watchdog import Watchdog, inject_hang
from .api import parallelize
from .engine import Engine, StepHook
from .metrics import MetricsLogger, Progress, Timer, format_peaks, peak_memory, step_metrics
from .models import build_model
from .optim import build_optimizer, lr_at
from .parallel.policies import plan_from_config
from .profiling import TraceWindow


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    nonfinite_steps: list[int] = field(default_factory=list)  # skipped for NaN/inf (a subset)
    start_step: int = 0
    last_step: int = 0
    sample: str | None = None
    comm_sent: dict = field(default_factory=dict)
    stopped_by: int = 0                 # the signal that stopped the run early (see ``stop``)
    stop_checkpoint: str | None = None  # the checkpoint written when it stopped
    # peak_host_bytes and peak_mem_bytes at the end of the run, largest over the ranks
    peak_memory: dict = field(default_factory=dict)
    # train.target: when it was first met (step, seconds of training, samples), None if never
    target: dict | None = None


# Models whose initial values are keyed by module name (``init_seed``, ``init_module``), which
# therefore build on the meta device.
META_MODELS = ("gpt", "vit")


class InjectOverflow(StepHook):
    """Fault injection (``debug.inject_overflow_step``): an inf in this rank's first gradient
    tensor at one step, to exercise the fp16 loss scaler's skip on every rank."""

    def __init__(self, step: int):
        self.step = step

    def after_backward(self, engine: Engine, step: int) -> None:
        if step == self.step:
            engine.strategy.grads()[0].view(-1)[0] = float("inf")


class TrainingDiverged(RuntimeError):
    """Training produced NaN or inf that skipping steps did not cure; every rank raises it at the
    same step, and the message (one paragraph) says where to continue from."""


def train(cfg: Config, *, env: DistEnv | None = None, quiet: bool = False, stop=None,
          probe=None) -> TrainResult:
    """Train according to ``cfg`` in this process; creates the process group if none exists.

    ``stop`` (a ``distributed.launch.StopRequest``, or anything with ``signum``, ``step_done(step)``
    and ``checkpoint_saved(step)``) lets a signal end the run early: after every step the ranks
    agree whether any of them has a ``signum`` (one all-reduce of a scalar), and if so all save a
    checkpoint of that step (whatever ``checkpoint.every``) and return with ``stopped_by`` set.

    Raises ``TrainingDiverged`` after ``train.max_skipped_steps`` steps in a row were skipped for
    a NaN/inf loss or gradient norm; no checkpoint with NaN or inf is ever written.

    ``probe`` (e.g. ``gigatrain.optim.lr_find.LRSweep``) turns the run into a short experiment:
    ``probe.lr(step)`` replaces the schedule, ``probe.record(step, lr, loss)`` sees every step's
    global loss and returns True to stop (every rank sees the same loss, so all stop together);
    nothing is checkpointed, evaluated or sampled, and a NaN loss ends the probe instead of the run.
    """
    if cfg.out is None:
        from .config import ConfigError
        raise ConfigError("out is null: give the output folder (out=DIR); only the command line "
                          "picks a fresh runs/<job>-<timestamp> folder by itself.")
    env = env or read_env()
    if dist.is_initialized():
        from .distributed.launch import pick_device
        return _train(cfg, pick_device(env), quiet, stop, probe)
    with distributed(env, backend=cfg.parallel.backend, timeout_s=cfg.parallel.timeout_s) as device:
        return _train(cfg, device, quiet, stop, probe)


def _train(cfg: Config, device: torch.device, quiet: bool, stop=None, probe=None) -> TrainResult:
    log = OpLog()
    with _watchdog(cfg, log):
        return _run(cfg, device, quiet, log, stop, probe)


def _watchdog(cfg: Config, log: OpLog):
    """This rank's hang watchdog over ``log`` (none alone, nor on the fake test backend)."""
    import contextlib

    if dist.get_world_size() == 1 or dist.get_backend() == "fake":
        return contextlib.nullcontext()
    return Watchdog(log, hang_timeout_s=cfg.parallel.hang_timeout_s, out=cfg.out)


def _run(cfg: Config, device: torch.device, quiet: bool, log: OpLog, stop=None, probe=None) -> TrainResult:
    world, rank = dist.get_world_size(), dist.get_rank()
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Share the cores among the local processes instead of oversubscribing them.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
    cfg = resolve_for_world(cfg, world)
    p, t = cfg.parallel, cfg.train
    dims = ParallelDims(dp=p.dp, pp=p.pp, tp=p.tp)
    mesh = Mesh(dims, device, log=log)
    is_main = rank == 0
    out = Path(cfg.out)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml())

    dataset = open_dataset(cfg.data, cfg.model.seq_len)
    torch.manual_seed(t.seed)
    # Built on the meta device where the model supports it: each rank then materialises only
    # what it owns (a time-balanced pipeline must run the blocks to measure them).
    meta = cfg.model.name in META_MODELS and not (p.pp > 1 and p.pp_balance == "time")
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = build_model(cfg.model, vocab_size=getattr(dataset, "vocab_size", None))
    example = (model.example_batch(t.micro_batch, generator=torch.Generator().manual_seed(0))
               if p.pp > 1 and p.pp_balance == "time" else None)
    d = cfg.debug
    hooks = ([InjectOverflow(d.inject_overflow_step)]
             if d.inject_overflow_step is not None and rank == d.inject_overflow_rank else [])
    # The whole model's FLOPs, counted before tensor parallelism leaves only this rank's slices.
    flops = float(model.train_flops_per_sample())
    engine = parallelize(model, mesh, lambda groups: build_optimizer(t, groups, device),
                         plan_from_config(cfg, example), hooks=hooks)
    policy = engine.precision
    if engine.partition_text and is_main and not quiet:
        print(engine.partition_text, flush=True)

    ckpt_root = Path(cfg.checkpoint.dir or out / "checkpoints")
    start = _resume(cfg, engine, ckpt_root, rank, mesh, device)
    if start and is_main and not quiet:
        print(f"resuming from step {start} ({ckpt_root})", flush=True)

    dp_rank = mesh.coords["dp"]
    ramp = BatchRamp(*t.batch_ramp, t.global_batch) if t.batch_ramp else None
    sampler = GlobalBatchSampler(len(dataset), t.global_batch, t.seed, ramp=ramp)
    # Under a ramp the schedule runs on samples (in full-batch steps), so small early batches
    # do not eat the warm-up or the decay.
    sched_step = (lambda s: sampler.batch_offset(s) / t.global_batch) if ramp else (lambda s: s)
    sched_total = sched_step(t.steps)
    end = t.stop_after if t.stop_after is not None else t.steps
    logger = MetricsLogger(out, enabled=is_main, resume_step=start)
    show = is_main and not quiet
    unit = "tok/s" if model.tokens_per_sample > 1 else "samples/s"
    bar = Progress(end, start, enabled=show, unit=unit, log_every=t.log_every)
    result = TrainResult(start_step=start, last_step=start)

    evaluate = _make_eval(cfg, engine, dp_rank, device) if t.eval_every > 0 and probe is None else None
    loader = BatchLoader(dataset, sampler, dp_rank, p.dp, t.micro_batch, start_step=start,
                         device=device, num_workers=cfg.data.num_workers, end_step=end)

    in_a_row = 0  # consecutive steps skipped for NaN/inf
    trace = TraceWindow(t.profile_steps, out, rank, device)
    batch_iter = iter(loader)
    target = parse_target(t.target) if t.target else None
    t_start = time.perf_counter()
    try:
        for step in range(start, end):
            t_wait = time.perf_counter()
            batches = next(batch_iter, None)
            if batches is None:
                break
            loader_wait = time.perf_counter() - t_wait
            lr = probe.lr(step) if probe is not None else lr_at(
                sched_step(step), kind=t.schedule, lr=t.lr, total_steps=sched_total,
                warmup_steps=t.warmup_steps, min_lr_ratio=t.min_lr_ratio)
            log.step = step + 1
            if cfg.debug.inject_hang_step == step + 1 and rank == cfg.debug.inject_hang_rank:
                inject_hang()
            trace.before(step + 1)
            with Timer(device) as tm:
                res = engine.train_step(batches, lr)
            done = step + 1
            trace.after(done)
            if stop is not None:
                stop.step_done(done)
            result.losses.append(res.loss)
            result.grad_norms.append(res.grad_norm)
            if res.skipped:
                result.skipped_steps.append(done)
            if res.nonfinite:
                result.nonfinite_steps.append(done)
            in_a_row = in_a_row + 1 if res.nonfinite else (in_a_row if res.skipped else 0)
            rec = step_metrics(step=done, loss=res.loss, lr=lr, grad_norm=res.grad_norm,
                               elapsed_s=time.perf_counter() - t_start,
                               seconds=tm.seconds, samples=sampler.batch_size(step),
                               tokens_per_sample=model.tokens_per_sample, flops_per_sample=flops,
                               world_size=world, device=device, precision=policy.name,
                               skipped=res.skipped, nonfinite=res.nonfinite, loss_scale=res.loss_scale,
                               **(res.times or {}), loader_wait_s=loader_wait,
                               **peak_memory(mesh.world, device))
            if res.bubble is not None:
                rec["pipeline_bubble"] = res.bubble
            if evaluate is not None and (done % t.eval_every == 0 or done == end):
                rec["val_loss"], acc = evaluate()
                if acc is not None:
                    rec["val_accuracy"] = acc
                if show:
                    bar.print(f"step {done}: val loss {rec['val_loss']:.4f}"
                              + (f", val accuracy {acc:.2%}" if acc is not None else ""))
                if target is not None and result.target is None and target_met(target, rec):
                    # Every rank evaluated the same global batches: all stop together.
                    result.target = {"step": done, "seconds": time.perf_counter() - t_start,
                                     "samples": sampler.batch_offset(done)}
                    rec.update(target_reached=t.target, time_to_target_s=result.target["seconds"],
                               samples_to_target=result.target["samples"])
                    if show:
                        bar.print(f"step {done}: reached {t.target} after {result.target['seconds']:.1f} s of "
                                  f"training and {result.target['samples']:,} samples; stopping")
            logger.log(rec)
            rate = rec["tokens_per_s"] if rec["tokens_per_s"] is not None else rec["samples_per_s"]
            bar.update(done, res.loss, rate)
            if probe is not None:
                result.last_step = done
                if probe.record(step, lr, res.loss):
                    break
                if stop is not None and done < end and (sig := _agreed_stop_signal(stop, mesh, device)):
                    result.stopped_by = sig
                    break
                continue
            if res.nonfinite and show:
                bar.print(f"step {done}: loss {res.loss:.4g}, gradient norm {res.grad_norm:.4g}: not finite, "
                          f"step skipped on all ranks ({in_a_row} in a row; the run stops at "
                          f"train.max_skipped_steps={t.max_skipped_steps})")
            elif res.skipped and show:
                bar.print(f"step {done}: fp16 overflow on some rank, step skipped on all ranks; "
                          f"loss scale now {engine.scaler.scale:g}")
            if in_a_row >= t.max_skipped_steps or not (res.skipped or math.isfinite(res.grad_norm)):
                raise TrainingDiverged(_diverged(cfg, ckpt_root, done, in_a_row, res.skipped, is_main))
            every = cfg.checkpoint.every
            if ((every and done % every == 0) or done == end) and in_a_row:
                # These weights just gave NaN/inf; saving them would also rotate good ones away.
                if show:
                    bar.print(f"step {done}: no checkpoint while steps are being skipped for NaN/inf")
            elif (every and done % every == 0) or done == end:
                _save(cfg, engine, ckpt_root, done, rank, mesh, device)
            result.last_step = done
            if result.target is not None:
                if not ((every and done % every == 0) or done == end):
                    _save(cfg, engine, ckpt_root, done, rank, mesh, device)
                break
            if stop is not None and done < end and (sig := _agreed_stop_signal(stop, mesh, device)):
                result.stopped_by = sig
                if not in_a_row:  # else the newest checkpoint stays the last good one
                    if not (every and done % every == 0):
                        _save(cfg, engine, ckpt_root, done, rank, mesh, device)
                    result.stop_checkpoint = str(ckpt_root / f"step_{done:06d}")
                    stop.checkpoint_saved(done)
                break
    finally:
        trace.close()
        bar.close()
        logger.close()

    if result.stopped_by or probe is not None:
        engine.close()
        return result  # asked to stop, or an experiment: no timeline or sample
    if p.pp > 1:
        title = (f"{p.pp_schedule}, pp={p.pp}" + (f", V={p.pp_virtual}" if p.pp_virtual > 1 else "")
                 + f", {p.pp_microbatches or cfg.grad_accum} micro-batches (last step)")
        engine.stages.write_timeline(out / "pipeline_timeline.png", title, is_main)
    # Every rank samples: no rank holds the whole model under ZeRO-3 or a pipeline.
    if model.tokens_per_sample > 1 and t.sample_tokens > 0 and hasattr(model, "generate"):
        result.sample = _sample_text(engine, model, dataset, device, t.sample_tokens, t.seed)
        if show:
            print("\n--- sample ---\n" + result.sample + "\n--------------", flush=True)
    result.comm_sent = mesh.stats.summary()
    result.peak_memory = peak_memory(mesh.world, device)
    if show:
        print(format_peaks(result.peak_memory), flush=True)
    engine.close()
    return result


def parse_target(text: str) -> tuple[str, str, float]:
    """``"val_accuracy>=0.93"`` -> ``("val_accuracy", ">=", 0.93)`` (``val_loss<=X`` likewise)."""
    import re

    m = re.fullmatch(r"\s*(val_accuracy|val_loss)\s*(>=|<=)\s*([-+0-9.eE]+)\s*", text)
    if m is None:
        raise ValueError(f"target {text!r}: expected val_accuracy>=X or val_loss<=X")
    return m.group(1), m.group(2), float(m.group(3))


def target_met(target: tuple[str, str, float], rec: dict) -> bool:
    """Whether the metrics record ``rec`` meets ``target`` (False when it lacks the metric)."""
    key, op, value = target
    got = rec.get(key)
    if got is None:
        return False
    return got >= value if op == ">=" else got <= value


def _agreed_stop_signal(stop, mesh: Mesh, device) -> int:
    """The stop signal any rank has received (0: none), the same on every rank."""
    return int(mesh.world.all_reduce_scalar(float(stop.signum), op=dist.ReduceOp.MAX, device=device))


def _resume(cfg, engine: Engine, root: Path, rank: int, mesh: Mesh, device) -> int:
    """Load the checkpoint named by ``cfg.resume`` on every rank; returns the step to start from.

    All ranks must agree on the checkpoint and all must load it: a rank that cannot would
    otherwise leave the others waiting in a collective, so failures are shared and every rank
    raises the same ``CheckpointError``.
    """
    path = ckpt.resolve_resume(cfg.resume, root)
    step = ckpt.checkpoint_step(path) if path is not None else 0
    seen = torch.tensor([step, -step], dtype=torch.float64, device=device)
    mesh.world.all_reduce(seen, op=dist.ReduceOp.MAX)
    if seen[0].item() != -seen[1].item():
        raise ckpt.CheckpointError(
            f"ranks see different checkpoints to resume from (steps {int(-seen[1].item())} to "
            f"{int(seen[0].item())}) under {root}: checkpoint.dir must be on a filesystem every node shares.")
    if path is None:
        return 0
    error = ""
    try:
        engine.load(path)
    except (ckpt.CheckpointError, ValueError, KeyError, OSError) as e:
        error = f"cannot resume from {path}: {e}"
    ok = torch.tensor([0.0 if error else 1.0], device=device)
    mesh.world.all_reduce(ok, op=dist.ReduceOp.MIN)
    if ok.item() < 1:
        # Rank 0 speaks for the job, so it must show the failing rank's own words (they name the file).
        errors = mesh.world.all_gather_object(error)
        first = next(r for r, e in enumerate(errors) if e)
        raise ckpt.CheckpointError(errors[first] if first == rank else f"rank {first}: {errors[first]}")
    return step


def _make_eval(cfg, engine: Engine, dp_rank: int, device):
    """A function returning (val loss, val accuracy or None) on fixed validation batches."""
    from types import SimpleNamespace
    val = open_dataset(SimpleNamespace(**cfg.data.model_dump(), split="val"), cfg.model.seq_len)
    t, p = cfg.train, cfg.parallel
    sampler = GlobalBatchSampler(len(val), t.global_batch, t.seed)
    batches = []
    # 0: every whole global batch of the split, i.e. (nearly) all of it: a test accuracy.
    n = t.eval_batches or max(1, len(val) // t.global_batch)
    for step in range(n):
        for idx in sampler.local_microbatches(step, dp_rank, p.dp, t.micro_batch):
            x, y = val.get_batch(idx)
            batches.append((x.to(device), y.to(device)))
    return lambda: engine.eval_step(batches)


def _save(cfg, engine: Engine, root: Path, step: int, rank: int, mesh: Mesh, device) -> None:
    if step != engine.step_count:
        raise RuntimeError(f"saving step {step} but the engine is at step {engine.step_count}")
    try:
        engine.save(root, meta={"config": cfg.model_dump(mode="json")}, keep=cfg.checkpoint.keep,
                    async_save=cfg.checkpoint.async_save)
    except ckpt.NonFiniteCheckpointError as e:
        raise TrainingDiverged(str(e)) from None


def _diverged(cfg, root: Path, step: int, in_a_row: int, skipped: bool, is_main: bool) -> str:
    """Set aside the checkpoints whose weights already produced NaN/inf gradients (the one just
    before the first non-finite step, and any after it) so that resume=auto continues from a good
    one; returns the one paragraph the run ends with."""
    t = cfg.train
    first_bad = step - in_a_row + 1 if skipped else step
    moved = ckpt.set_aside(root, first_bad - 1, step) if is_main else []
    if skipped:
        what = (f"training diverged: {in_a_row} steps in a row, up to step {step}, had a NaN or inf loss "
                f"or gradient norm (train.max_skipped_steps={t.max_skipped_steps}); they were skipped on "
                f"every rank, so the weights never took those updates.")
    else:
        what = (f"training diverged: the gradient norm of step {step} is NaN or inf, and its update had "
                f"already run during backward (CPU offload without train.grad_clip or loss scaling "
                f"cannot skip a step).")
    if moved:
        what += (f" The checkpoint(s) made from weights that then gave NaN/inf were renamed "
                 f"({', '.join(d.name for d in moved)}) so that resume=auto skips them.")
    last = ckpt.find_latest(root)
    where = (f"Continue from the last good checkpoint, {last} (resume=auto),"
             if last is not None else "No good checkpoint was written: start again")
    return (f"{what} {where} with a lower train.lr (now {t.lr:g}), train.grad_clip set, or, with fp16, "
            f"precision=bf16 or fp32.")


@torch.no_grad()
def _sample_text(engine: Engine, model, dataset, device, n_tokens: int, seed: int) -> str:
    """Sample text collectively: every rank runs each forward with the engine (which gathers
    ZeRO-3 shards or passes through the pipeline stages) and draws the same token from the same
    logits with the same generator, so all ranks build the same text."""
    model.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    start = dataset.encode("\n") or [0]
    idx = torch.tensor([start], dtype=torch.long, device=device)
    out = model.generate(idx, n_tokens, temperature=0.8, top_k=None, generator=g,
                         next_logits=lambda ctx: engine.predict(ctx, post=lambda y: y[:, -1]))
    model.train()
    return dataset.decode(out[0].tolist())
