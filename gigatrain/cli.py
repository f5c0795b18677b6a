"""``gigatrain`` command line.

    gigatrain train [CONFIG] [--nproc N] [--out DIR] [key=value ...]
    gigatrain config [CONFIG] [key=value ...]      print the resolved config
    gigatrain config --reference                   print every key as a Markdown table
    gigatrain data [CONFIG] [key=value ...]         download/tokenize the dataset once

Bad input (config, layout, checkpoint) ends with one readable paragraph and exit code 2, before
any training starts, never with a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

WORKER_ENV = "GIGATRAIN_WORKER"
EXIT_DIVERGED = 3  # training diverged (NaN/inf that skipping steps did not cure); already explained


def _split_args(items: list[str]) -> tuple[str | None, list[str]]:
    path, overrides = None, []
    for it in items:
        if "=" in it:
            overrides.append(it)
        elif path is None:
            path = it
        else:
            raise SystemExit(_fail(f"unexpected argument {it!r}: give at most one config file, "
                                   "then key=value overrides."))
    return path, overrides


def _fail(msg: str) -> int:
    print(f"gigatrain: error: {msg}", file=sys.stderr, flush=True)
    return 2


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gigatrain", description="Train models too big or too slow for one GPU.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train a model (default: small GPT on the King James Bible)")
    tr.add_argument("items", nargs="*", metavar="[CONFIG] key=value",
                    help="a YAML/JSON/TOML config file and dotted overrides such as train.steps=100")
    tr.add_argument("--nproc", type=int, default=None, help="start N local processes (torch's launcher)")
    tr.add_argument("--out", default=None, help="output directory (config.yaml, metrics.jsonl, checkpoints); "
                                                "default: a fresh runs/<job>-<timestamp>")
    tr.add_argument("--overwrite", action="store_true",
                    help="start afresh in an --out that holds a run, removing its checkpoints and metrics")
    tr.add_argument("--quiet", action="store_true", help="no progress bar or sample text")
    cf = sub.add_parser("config", help="print the resolved config, or the reference of all keys")
    cf.add_argument("items", nargs="*")
    cf.add_argument("--reference", action="store_true")
    da = sub.add_parser("data", help="prepare (download and tokenize) the configured dataset")
    da.add_argument("items", nargs="*")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    # Options may come after overrides (``train.steps=9 --nproc 2``): collect what is left over.
    args, rest = parser.parse_known_args(argv)
    unknown = [r for r in rest if r.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.items = list(getattr(args, "items", [])) + rest
    from .checkpoint import CheckpointError
    from .config import ConfigError, load_config
    from .distributed.mesh import LayoutError
    from .rundir import RunDirError

    try:
        path, overrides = _split_args(args.items)
        if args.cmd == "config" and args.reference:
            from .config import config_reference
            print(config_reference())
            return 0
        if getattr(args, "out", None):
            overrides.append(f"out={args.out}")
        if getattr(args, "overwrite", False):
            overrides.append("overwrite=true")
        cfg = load_config(path, overrides)
        if args.cmd == "config":
            print(cfg.to_yaml())
            return 0
        if args.cmd == "data":
            from .data import prepare_dataset
            ds = prepare_dataset(cfg.data, cfg.model.seq_len)
            print(f"{cfg.data.name}: {len(ds)} samples ready")
            return 0
        args.config, args.lock = path, None
        try:
            return _train(cfg, args, argv)
        finally:
            if args.lock is not None:
                args.lock.release()
    except (ConfigError, LayoutError, CheckpointError, RunDirError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return 130


def _train(cfg, args, argv: list[str]) -> int:
    from .checkpoint import CheckpointError, resolve_resume
    from .config import ConfigError, check_supported, resolve_for_world
    from .distributed.mesh import LayoutError
    from .parallel.pipeline.schedules import ScheduleError
    from .data import prepare_dataset
    from .distributed.launch import launch_local, read_env
    from .distributed.watchdog import HANG_EXIT_CODE
    from .rundir import claim
    from .trainer import TrainingDiverged, train
    from pathlib import Path

    env = read_env()
    worker = os.environ.get(WORKER_ENV) == "1"
    if args.nproc is not None and args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc}: the number of processes must be at least 1.")
    if env.is_distributed_launch:
        world = env.world_size
    else:
        world = args.nproc if args.nproc is not None else (cfg.nproc or 1)
        world = _fit_to_gpus(cfg, world, explicit=args.nproc is not None)
    resolved = resolve_for_world(cfg, world)
    check_supported(resolved)
    if not worker and cfg.out is None:
        # Only now that the config is known to be good, so a typo leaves no empty folder behind.
        cfg = _choose_out(cfg, args.config, env)
        resolved = resolve_for_world(cfg, world)
    resolve_resume(resolved.resume, Path(resolved.checkpoint.dir or Path(resolved.out) / "checkpoints"))
    if not worker:
        # Workers of our own launcher run under its lock; under torchrun/srun rank 0 takes it.
        args.lock = claim(resolved.out, resolved.checkpoint.dir, resolved.parallel.offload_dir,
                          resume=resolved.resume, overwrite=resolved.overwrite,
                          owner=not env.is_distributed_launch or env.rank == 0)
        for note in args.lock.notes if args.lock else ():
            print(note, flush=True)
    try:
        if not worker:
            prepare_dataset(resolved.data, resolved.model.seq_len)
    except (OSError, RuntimeError, ValueError) as e:
        # Missing or unreadable data: the message says how to get it.
        return _fail(str(e))

    if env.is_distributed_launch or world == 1:
        try:
            train(cfg, env=env, quiet=args.quiet)
        except (ConfigError, LayoutError, CheckpointError, ScheduleError) as e:
            # Every rank hits the same problem: one paragraph from the first rank is enough.
            if env.rank == 0:
                _fail(str(e))
            return 2
        except TrainingDiverged as e:
            if env.rank == 0:
                _fail(str(e))
            return EXIT_DIVERGED
        return 0
    # Start the workers through torch's launcher; they re-enter here with the torchrun variables.
    worker_argv = [a for a in argv if not a.startswith("--nproc")]
    if "--nproc" in argv:
        i = argv.index("--nproc")
        worker_argv = argv[:i] + argv[i + 2:]
    worker_argv.append(f"out={resolved.out}")  # the folder this launcher holds, fresh or given
    code = launch_local(world, worker_argv, extra_env={WORKER_ENV: "1"})
    if code == HANG_EXIT_CODE:
        return code  # a worker has printed the hang diagnosis
    if code == EXIT_DIVERGED:
        return code  # rank 0 has said why
    if code:
        return _fail(f"a worker process failed (exit code {code}); its error is printed above.")
    return 0


def _choose_out(cfg, config_path: str | None, env):
    """``cfg`` with ``out`` filled in when neither --out nor the config names one: a fresh
    ``runs/<job>-<timestamp>`` (the job is the config file's name, else ``<model>-<data>``).

    Under torchrun/srun every rank derives the same name from the launch's id. ``resume=auto``
    continues the run of a folder, so it needs --out; the message names the newest run of the job.
    """
    if cfg.out is not None:
        return cfg
    from pathlib import Path

    from .rundir import RunDirError, fresh_run_dir, newest_run_dir

    job = Path(config_path).stem if config_path else f"{cfg.model.name}-{cfg.data.name}"
    if cfg.resume == "auto":
        newest = newest_run_dir(job)
        raise RunDirError("resume=auto continues the run in an output folder: name that folder with --out DIR"
                          + (f" (the newest run of this job is --out {newest})." if newest else "."))
    launch_id = None
    if env.is_distributed_launch:
        launch_id = (os.environ.get("SLURM_JOB_ID") if env.source == "slurm"
                     else os.environ.get("TORCHELASTIC_RUN_ID"))
        if not launch_id or launch_id == "none":
            raise RunDirError("every rank must write to the same folder, and this launch has no id to "
                              "name one by: give --out DIR (or torchrun --rdzv-id).")
    out = fresh_run_dir(job, launch_id=launch_id)
    if env.rank == 0:
        print(f"gigatrain: writing to {out}", flush=True)
    return cfg.model_copy(update={"out": str(out)})


def _fit_to_gpus(cfg, world: int, explicit: bool) -> int:
    """One process per GPU: with fewer GPUs than processes, shrink a pure data-parallel job
    started from the config's default, and refuse anything else with the fix."""
    import torch

    if not torch.cuda.is_available() or world <= torch.cuda.device_count():
        return world
    from .config import ConfigError

    n = torch.cuda.device_count()
    p = cfg.parallel
    if not explicit and p.pp == 1 and p.tp == 1 and p.dp is None:
        print(f"gigatrain: {world} processes asked for but {n} GPU(s) visible: running {n} "
              f"(one per GPU).", flush=True)
        return n
    raise ConfigError(f"{world} processes need {world} GPUs (one per process) but {n} are visible: use "
                      f"--nproc {n} (and a layout with dp x pp x tp = {n}), or run on a machine with more GPUs.")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
