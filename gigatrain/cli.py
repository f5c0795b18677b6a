"""``gigatrain`` command line.

    gigatrain train [CONFIG] [--nproc N] [--out DIR] [key=value ...]
    gigatrain lr-find [CONFIG] [--nproc N] [--out DIR] [key=value ...]   LR range test
    gigatrain config [CONFIG] [key=value ...]      print the resolved config
    gigatrain config --reference                   print every key as a Markdown table
    gigatrain data [CONFIG] [key=value ...]         download/tokenize the dataset once
    gigatrain plan [CONFIG] [key=value ...] --gpus N --gpu NAME   best layout, before launch

Bad input (config, layout, checkpoint) ends with one readable paragraph and exit code 2, before
any training starts, never with a traceback. So does every failure during training: one
paragraph from the rank that failed (its traceback in ``<out>/error-rank<R>.log``). SIGTERM and
SIGINT stop a run with a checkpoint (exit code 75). All exit codes: README, "Exit codes".
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
    lf = sub.add_parser("lr-find", help="LR range test: an exponential learning-rate sweep under the "
                                        "configured layout; writes lr_find.png and lr_find.json")
    for a in tr._actions[1:]:   # the same options as train
        lf._add_action(a)
    lf.add_argument("--min-lr", type=float, default=1e-5, help="first learning rate of the sweep")
    lf.add_argument("--max-lr", type=float, default=1.0, help="last learning rate of the sweep")
    lf.add_argument("--steps", type=int, default=200, help="steps of the sweep (it stops early when the "
                                                           "smoothed loss exceeds 4x its best)")
    cf = sub.add_parser("config", help="print the resolved config, or the reference of all keys")
    cf.add_argument("items", nargs="*")
    cf.add_argument("--reference", action="store_true")
    da = sub.add_parser("data", help="prepare (download and tokenize) the configured dataset")
    da.add_argument("items", nargs="*")
    ex = sub.add_parser("export", help="write a checkpoint's weights as consolidated safetensors files "
                                       "(HuggingFace's sharded layout), one tensor in memory at a time")
    ex.add_argument("checkpoint", help="a step_NNNNNN checkpoint folder (or a folder of them: the latest)")
    ex.add_argument("--out", required=True, help="output folder")
    ex.add_argument("--max-shard-mb", type=float, default=2048.0, help="largest file written (default 2048)")
    from .planner.cli import add_plan_parser
    add_plan_parser(sub)
    return ap


def _export(args) -> int:
    from .checkpoint import resolve_resume
    from .export import export_checkpoint

    path = resolve_resume(args.checkpoint, args.checkpoint)
    index = export_checkpoint(path, args.out, max_shard_bytes=int(args.max_shard_mb * 2**20))
    files = sorted(set(index["weight_map"].values()))
    print(f"exported {len(index['weight_map'])} tensors ({index['metadata']['total_size'] / 2**20:,.1f} MB, "
          f"step {index['metadata']['step']}) from {path} to {args.out} in {len(files)} file(s)")
    return 0


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
        if args.cmd == "plan":
            from .planner.cli import run_plan
            return run_plan(args, _split_args)
        if args.cmd == "export":
            return _export(args)
        path, overrides = _split_args(args.items)
        if args.cmd == "config" and args.reference:
            from .config import config_reference
            print(config_reference())
            return 0
        if getattr(args, "out", None):
            overrides.append(f"out={args.out}")
        if getattr(args, "overwrite", False):
            overrides.append("overwrite=true")
        if args.cmd == "lr-find":
            _lr_sweep(args)   # bad sweep options fail here, before anything starts
            # The sweep replaces the schedule; it writes no checkpoint, evaluation or sample.
            overrides += [f"train.steps={args.steps}", "train.stop_after=null", "train.eval_every=0",
                          "train.sample_tokens=0", "resume=null"]
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
    from .checkpoint import resolve_resume
    from .config import ConfigError, check_supported, resolve_for_world
    from .data import prepare_dataset
    from .distributed.launch import LAUNCHER_PID_ENV, die_with_parent, launch_local, read_env
    from .rundir import claim
    from pathlib import Path

    env = read_env()
    worker = os.environ.get(WORKER_ENV) == "1"
    if worker or "TORCHELASTIC_RUN_ID" in os.environ:
        # A launcher killed with SIGKILL must not leave its workers training on their own.
        launcher = os.environ.get(LAUNCHER_PID_ENV)
        die_with_parent(int(launcher) if worker and launcher else None)
    # A rank of a launched job takes SIGTERM/SIGINT as a stop request from now on, start-up included.
    stop = _stop_request(env, worker) if env.is_distributed_launch else None
    if args.nproc is not None and args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc}: the number of processes must be at least 1.")
    if env.is_distributed_launch:
        world = env.world_size
    else:
        world = args.nproc if args.nproc is not None else (cfg.nproc or 1)
        world = _fit_to_gpus(cfg, world, explicit=args.nproc is not None)
    auto_args: list[str] = []
    if cfg.parallel.auto and not worker:
        cfg, auto_args = _auto_layout(cfg, args, env, world)
    resolved = resolve_for_world(cfg, world)
    check_supported(resolved)
    _check_compile(resolved)
    if not worker:
        _memory_check(resolved, env, world)
    if not worker and cfg.out is None:
        # Only now that the config is known to be good, so a typo leaves no empty folder behind.
        cfg = _choose_out(cfg, args.config, env)
        resolved = resolve_for_world(cfg, world)
    resolve_resume(resolved.resume, Path(resolved.checkpoint.dir or Path(resolved.out) / "checkpoints"))
    if not worker:
        _check_writable(resolved)
        # Workers of our own launcher run under its lock; under torchrun/srun rank 0 takes it.
        args.lock = claim(resolved.out, resolved.checkpoint.dir, resolved.parallel.offload_dir,
                          resume=resolved.resume, overwrite=resolved.overwrite,
                          owner=not env.is_distributed_launch or env.rank == 0)
        for note in args.lock.notes if args.lock else ():
            print(note, flush=True)
    try:
        dataset = None if worker else prepare_dataset(resolved.data, resolved.model.seq_len)
    except (OSError, RuntimeError, ValueError) as e:
        # Missing or unreadable data: the message says how to get it.
        return _fail(str(e))
    if not worker:
        _check_space(resolved, dataset, world)

    if env.is_distributed_launch or world == 1:
        return _run_training(cfg, env, args, worker, stop or _stop_request(env, worker))
    # Start the workers through torch's launcher; they re-enter here with the torchrun variables.
    worker_argv = [a for a in argv if not a.startswith("--nproc")]
    if "--nproc" in argv:
        i = argv.index("--nproc")
        worker_argv = argv[:i] + argv[i + 2:]
    worker_argv.append(f"out={resolved.out}")  # the folder this launcher holds, fresh or given
    worker_argv += auto_args  # the layout chosen here, so that no worker plans on its own
    warning = nproc_warning(world, os.cpu_count() or 1, _mem_available(), gpus=_gpu_count())
    if warning:
        print(warning, file=sys.stderr, flush=True)
    # The workers, or the launcher for a worker that could not speak, have said what went wrong.
    return launch_local(world, worker_argv, extra_env={WORKER_ENV: "1"})


def _planner_device(env, world: int):
    """The device the planner predicts for, and processes per node: all local under our own
    launcher; under torchrun/srun each rank decides alone, so from what every rank sees alike."""
    from .planner.auto import training_device

    local = env.local_world_size if env.is_distributed_launch else world
    return training_device(local, same_on_every_rank=env.is_distributed_launch), local


def _auto_layout(cfg, args, env, world: int):
    """``parallel.auto``: the planner's layout for this world and device, keys the user gave
    (config file, command line) kept; returns the config and the overrides that make it."""
    from .planner.auto import choose_layout, given_keys

    device, local = _planner_device(env, world)
    given = given_keys(args.config, _split_args(args.items)[1])
    choice = choose_layout(cfg, world, device, given, gpus_per_node=local)
    if env.rank == 0:
        shown = " ".join(a for a in choice.argv() if not a.startswith("parallel.auto="))
        print(f"gigatrain: parallel.auto chose {choice.describe()} ({shown or 'the configured layout'})", flush=True)
    return choice.cfg, choice.argv()


def _memory_check(resolved, env, world: int) -> None:
    """Print the predicted peak memory per rank; refuse (ConfigError) a layout predicted not to fit."""
    from .planner.auto import check_memory

    device, local = _planner_device(env, world)
    line = check_memory(resolved, world, device, gpus_per_node=local)
    if line and env.rank == 0:
        print(f"gigatrain: {line}", flush=True)


def _check_compile(cfg) -> None:
    """Before launch: ``train.compile`` on a machine that cannot compile is a ``ConfigError``
    (on the CPU inductor needs a C++ compiler), not a failure of every rank at its first step."""
    if cfg.train.compile == "none":
        return
    import torch

    from .config import ConfigError
    from .parallel.compile import compile_problem

    problem = compile_problem(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if problem:
        raise ConfigError(problem)


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


def _stop_request(env, worker: bool):
    from .distributed.launch import STATUS_DIR_ENV, RankStatus, StopRequest

    status = RankStatus(os.environ.get(STATUS_DIR_ENV) if worker else None, env.rank)
    # Under our launcher the launcher announces a stop; elsewhere rank 0 does.
    return StopRequest(announce=env.rank == 0 and not worker, status=status).install()


def _run_training(cfg, env, args, worker: bool, stop) -> int:
    """Train in this process (one rank of the job) and return its exit code.

    Whatever happens ends in at most one paragraph on the terminal: bad input and divergence
    from rank 0 alone (every rank hits them together), a runtime failure from the rank that failed,
    with its rank, host and step, its traceback in ``<out>/error-rank<R>.log``. SIGTERM/SIGINT stop
    the job at a step boundary with a checkpoint (``StopRequest``); rank 0 says how to resume.
    """
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .distributed.launch import EXIT_STOPPED, signal_name
    from .distributed.mesh import LayoutError
    from .parallel.pipeline.schedules import ScheduleError
    from .trainer import TrainingDiverged, train

    status = stop.status
    try:
        probe = _lr_sweep(args) if args.cmd == "lr-find" else None
        result = train(cfg, env=env, quiet=args.quiet, stop=stop, probe=probe)
        code = 0
        if probe is not None and env.rank == 0 and not result.stopped_by:
            _report_sweep(probe, cfg.out)
        if result.stopped_by:
            code = EXIT_STOPPED
            if env.rank == 0:
                where = (f"checkpoint {result.stop_checkpoint}" if result.stop_checkpoint
                         else "no new checkpoint (the last steps were being skipped)")
                print(f"gigatrain: stopped by {signal_name(result.stopped_by)} after step {result.last_step}; "
                      f"{where}. To continue, run the same command with resume=auto --out {cfg.out}",
                      file=sys.stderr, flush=True)
    except (ConfigError, LayoutError, CheckpointError, ScheduleError) as e:
        # Every rank hits the same problem: one paragraph from the first rank is enough.
        if env.rank == 0:
            _fail(str(e))
        code = 2
    except TrainingDiverged as e:
        if env.rank == 0:
            _fail(str(e))
        code = EXIT_DIVERGED
    except Exception as e:
        code = _runtime_failure(e, cfg, env, stop.step, status, worker)
    finally:
        if env.is_distributed_launch:
            # The work is done. A launcher stops the other workers as soon as one has exited, and
            # its signal must not kill (and so relabel) a rank still shutting down.
            stop.ignore_further()
        else:
            stop.restore()
    if status.fields["outcome"] == "running":
        status.update(outcome="exited", code=code)
    status.close()
    return code


def _lr_sweep(args):
    """The LR range test the ``lr-find`` options describe (``ConfigError`` when they are bad)."""
    from .config import ConfigError
    from .optim.lr_find import LRSweep

    try:
        return LRSweep(min_lr=args.min_lr, max_lr=args.max_lr, steps=args.steps)
    except ValueError as e:
        raise ConfigError(f"lr-find: {e}.") from None


def _report_sweep(sweep, out) -> None:
    """Write the sweep's plot and record into ``out`` and say what it suggests."""
    result = sweep.write(out)
    lr = result["suggested_lr"]
    how = f"stopped early at lr {sweep.lrs[-1]:.3g}: the loss exploded" if sweep.stopped_early else \
        f"{len(sweep.lrs)} steps up to lr {sweep.lrs[-1]:.3g}"
    print(f"lr-find: {how}. Plot {out}/lr_find.png, record {out}/lr_find.json.", flush=True)
    if lr is None:
        print("lr-find: no suggestion: the loss never fell clearly; widen the range (--min-lr, --max-lr) "
              "or add --steps.", flush=True)
    else:
        print(f"lr-find: suggested train.lr={lr:.3g} ({sweep.rule}).", flush=True)


def _runtime_failure(e: BaseException, cfg, env, step: int, status, worker: bool) -> int:
    """Report a failure during training in one paragraph; the traceback goes to a log file.

    A rank that only lost contact with a peer is not the cause: under our own launcher it stays
    silent (the launcher names the rank that died), elsewhere it says so.
    """
    import socket

    from .distributed.launch import EXIT_FAILED

    log = _write_error_log(cfg.out, env.rank, e)
    host = socket.gethostname()
    when = f"after step {step}" if step else "before finishing the first step"
    if _lost_peer(e):
        msg = (f"rank {env.rank} on {host} lost contact with another rank {when}: that rank failed, was "
               f"killed or hung (its own message says why). The details are in {log}.")
        if worker:
            status.update(outcome="silent", message=msg)
            return EXIT_FAILED
    else:
        msg = f"rank {env.rank} on {host} failed {when}: {_describe_error(e)} The full traceback is in {log}."
    print(f"gigatrain: error: {msg}", file=sys.stderr, flush=True)
    status.update(outcome="reported")
    return EXIT_FAILED


def _lost_peer(e: BaseException) -> bool:
    """Does ``e`` say that a collective failed because another rank went away or stalled?"""
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo/", "timed out",
        "Timed out"))


def _describe_error(e: BaseException) -> str:
    import errno

    text = str(e)
    path = getattr(e, "filename", None)
    code = getattr(e, "errno", None)
    if code == errno.ENOSPC or "No space left on device" in text or "StorageFull" in text:
        return (f"the disk is full{f' (writing {path})' if path else ''}: free some space, or point --out, "
                f"checkpoint.dir or parallel.offload_dir at a disk with room ({text}).")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"{path or 'a file'} cannot be written ({e.strerror}): choose a writable --out, checkpoint.dir "
                f"or parallel.offload_dir.")
    if isinstance(e, OSError):
        return f"{e.strerror or text}{f': {path}' if path else ''}."
    return f"{type(e).__name__}: {text}".rstrip(".") + "."


def _write_error_log(out, rank: int, e: BaseException) -> str:
    """Append ``e``'s traceback to ``<out>/error-rank<R>.log`` (a temporary file if ``out`` is not
    writable); returns the path written."""
    import socket
    import tempfile
    import time
    import traceback

    text = (f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} rank {rank} on {socket.gethostname()} "
            f"(pid {os.getpid()})\n" + "".join(traceback.format_exception(type(e), e, e.__traceback__)))
    candidates = [os.path.join(out, f"error-rank{rank}.log")] if out else []
    candidates.append(os.path.join(tempfile.gettempdir(), f"gigatrain-error-rank{rank}-{os.getpid()}.log"))
    for path in candidates:
        try:
            with open(path, "a") as f:
                f.write(text)
            return path
        except OSError:
            continue
    return "(no writable place for the log)"


def _output_folders(cfg) -> dict[str, str]:
    folders = {"--out": cfg.out, "checkpoint.dir": cfg.checkpoint.dir or os.path.join(cfg.out, "checkpoints")}
    if cfg.parallel.offload == "nvme" and cfg.parallel.offload_dir:
        folders["parallel.offload_dir"] = cfg.parallel.offload_dir
    return folders


def _nearest_existing(folder: str):
    from pathlib import Path

    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_writable(cfg) -> None:
    """Before launch: refuse output folders (--out, checkpoint.dir, an NVMe offload_dir) that this
    run could not write, probing the nearest existing folder so that nothing is created yet."""
    import tempfile

    from .config import ConfigError

    for key, folder in _output_folders(cfg).items():
        p = _nearest_existing(folder)
        why = None
        if not p.is_dir():
            why = f"{p} is not a folder"
        else:
            try:
                with tempfile.TemporaryFile(dir=p):
                    pass
            except OSError as e:
                why = e.strerror or str(e)
        if why:
            raise ConfigError(f"{key} {folder} cannot be written ({why}): choose a folder this user can "
                              f"write to.")


def _check_space(cfg, dataset, world: int) -> None:
    """Before launch: the disk of checkpoint.dir must hold one checkpoint and that of an NVMe
    offload_dir this machine's share of the optimizer state (both on one disk: their sum)."""
    import shutil

    from .config import ConfigError

    folders = _output_folders(cfg)
    existing = {k: _nearest_existing(v) for k, v in folders.items()}
    nvme = "parallel.offload_dir" in folders
    n_params = _count_params(cfg, dataset)
    if not n_params:
        return
    # fp32 weights + two Adam moments: a checkpoint, and the NVMe-offloaded state of this machine.
    need = {"checkpoint.dir": 12 * n_params}
    if nvme:
        local = min(world, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        need["parallel.offload_dir"] = 12 * n_params * local // world
    by_disk: dict[int, list[str]] = {}
    for key in need:
        by_disk.setdefault(os.stat(existing[key]).st_dev, []).append(key)
    for keys in by_disk.values():
        total = sum(need[k] for k in keys)
        free = shutil.disk_usage(existing[keys[0]]).free
        if total > free:
            names = " and ".join(keys)
            raise ConfigError(f"{names} need about {_gib(total)} of disk ({n_params:,} parameters x 12 bytes: "
                              f"fp32 weights and two Adam moments) but {existing[keys[0]]} has {_gib(free)} free: "
                              f"free some space or point {names} at a bigger disk.")


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**26 else f"{n / 2**20:.1f} MiB"


def _count_params(cfg, dataset) -> int:
    """Parameters of the configured model, built on the meta device (no memory); 0 if unknown."""
    try:
        import torch

        from .models import build_model

        with torch.device("meta"):
            model = build_model(cfg.model, vocab_size=getattr(dataset, "vocab_size", None))
        return sum(p.numel() for p in model.parameters())
    except Exception:
        return 0


def nproc_warning(nproc: int, cores: int, mem_available: int | None, gpus: int = 0) -> str | None:
    """A one-line warning when ``nproc`` local processes far exceed this machine: more than twice
    the CPU cores (CPU training), or more than its free memory at ~0.5 GiB per process."""
    per_process = 2**29  # the interpreter, torch and a small model, measured on CPU
    if gpus == 0 and nproc > 2 * cores:
        return (f"gigatrain: warning: --nproc {nproc} starts {nproc} processes on {cores} CPU core(s): "
                f"they will share the cores and run slower than fewer processes would.")
    if mem_available is not None and nproc * per_process > mem_available:
        return (f"gigatrain: warning: --nproc {nproc} needs at least {_gib(nproc * per_process)} of memory but "
                f"{_gib(mem_available)} is available: processes may be killed by the out-of-memory killer.")
    return None


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
