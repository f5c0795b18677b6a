"""Process start-up: who am I, where is the rendezvous, which device, and a clean teardown.

Ranks come from the environment that the launcher set: torchrun (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), SLURM's ``srun`` (``SLURM_PROCID``,
``SLURM_NTASKS``, ``SLURM_LOCALID``, ``SLURM_JOB_NODELIST``), or nothing (one process).
``gigatrain train --nproc N`` starts N local workers through torch's own elastic launcher, which
sets the torchrun variables, so every path ends in the same ``read_env``.

Lifecycle of a job (exit codes in the README's "Exit codes"):

- workers die with their launcher (``die_with_parent``), so a killed launcher leaves nothing
  training behind it;
- SIGTERM/SIGINT stop a job gracefully (``StopRequest``): every rank finishes its step, they agree,
  save a checkpoint and exit with ``EXIT_STOPPED``; a second signal aborts;
- ``launch_local`` forwards the first signal to its workers instead of killing them, and when a
  worker dies it says which rank, on which host, how and after which step (``RankStatus``).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, read from the launcher's environment."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # "torchrun" | "slurm" | "single"

    @property
    def is_distributed_launch(self) -> bool:
        return self.source != "single"


_RANGE = re.compile(r"^(\d+)-(\d+)$")


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM compressed host list, e.g. ``"gpu[01-03,07],login1"``.

    Zero padding is kept (``gpu[08-10]`` -> gpu08, gpu09, gpu10). ``scontrol show hostnames`` does
    the same, but it is not installed inside every container, so we parse it ourselves.
    """
    hosts: list[str] = []
    # Split on commas that are not inside brackets.
    parts, depth, cur = [], 0, ""
    for ch in nodelist.strip():
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        parts.append(cur)
    for part in parts:
        m = re.match(r"^([^\[]*)\[([^\]]+)\](.*)$", part)
        if not m:
            hosts.append(part)
            continue
        prefix, body, suffix = m.groups()
        for item in body.split(","):
            r = _RANGE.match(item)
            if r:
                lo, hi = r.groups()
                width = len(lo)
                for i in range(int(lo), int(hi) + 1):
                    hosts.append(f"{prefix}{i:0{width}d}{suffix}")
            else:
                hosts.append(f"{prefix}{item}{suffix}")
    return hosts


def read_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read rank, world size and rendezvous address from torchrun's or SLURM's variables."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            source="torchrun",
        )
    # Only tasks started by srun have a step id; a batch script or salloc shell inside the
    # allocation also has SLURM_PROCID/NTASKS but is not one of the job's ranks.
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and (
            "SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        world = int(env["SLURM_NTASKS"])
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        master = env.get("MASTER_ADDR") or expand_nodelist(nodelist)[0]
        # A port derived from the job id lets two jobs share a node without colliding.
        port = int(env.get("MASTER_PORT") or 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        # SLURM_TASKS_PER_NODE looks like "4(x2),3": take this node's count when it is uniform.
        first = re.match(r"\d+", env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1")
        local_world = int(first.group()) if first else 1
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=world,
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=local_world,
            master_addr=master,
            master_port=port,
            source="slurm",
        )
    return DistEnv()


def pick_device(env: DistEnv) -> torch.device:
    """One GPU per process (``cuda:local_rank``) when CUDA exists, else the CPU."""
    if torch.cuda.is_available():
        idx = env.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(idx)
        return torch.device("cuda", idx)
    return torch.device("cpu")


def pick_backend(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def distributed(env: DistEnv, backend: str = "auto", timeout_s: float = 600.0,
                device: torch.device | None = None) -> Iterator[torch.device]:
    """Initialise the default process group and always tear it down, also on errors.

    Yields the device this process should use. With one process a local store is used, so no
    port is opened. ``timeout_s`` bounds every collective: a peer that died or diverged makes
    the others fail with a timeout instead of hanging forever.
    """
    device, created = init_distributed(env, backend, timeout_s, device)
    ok = False
    try:
        yield device
        ok = True
    finally:
        if created and dist.is_initialized():
            quiesce(ok)
            dist.destroy_process_group()


def init_distributed(env: DistEnv, backend: str = "auto", timeout_s: float = 600.0,
                     device: torch.device | None = None) -> tuple[torch.device, bool]:
    """Create the default process group unless one exists; returns (device, created).

    The caller that created it tears it down (``quiesce`` then ``destroy_process_group``);
    ``distributed`` does both around a block.
    """
    device = device or pick_device(env)
    if dist.is_initialized():
        return device, False
    backend = pick_backend(backend, device)
    timeout = datetime.timedelta(seconds=timeout_s)
    if env.world_size == 1 and not env.is_distributed_launch:
        store = dist.HashStore()
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
    else:
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    return device, True


def quiesce(all_ranks_alive: bool) -> None:
    """Let in-flight gloo work finish before the process group goes away.

    Reference cycles (optimizer, hooks) can keep finished gloo work objects alive until
    interpreter shutdown, and a gloo thread releasing one then aborts the process. Collecting
    them, and a last barrier when every rank got here normally, avoids that.
    """
    import gc
    import time

    gc.collect()
    if all_ranks_alive and dist.get_world_size() > 1:
        dist.barrier()
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Exit status of a job stopped by SIGTERM/SIGINT after saving a checkpoint: continue it with
#: ``resume=auto`` (sysexits' EX_TEMPFAIL, "try again later").
EXIT_STOPPED = 75
#: Exit status of a job in which a rank failed at run time (one paragraph names it).
EXIT_FAILED = 1

STATUS_DIR_ENV = "GIGATRAIN_STATUS_DIR"
LAUNCHER_PID_ENV = "GIGATRAIN_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def die_with_parent(expected_parent: int | None = None) -> None:
    """Have this process killed (SIGKILL) as soon as its parent process dies.

    A launcher killed with SIGKILL cannot stop its workers; orphaned, they would go on training and
    writing checkpoints into a folder that a new run may be using. On Linux the kernel does it
    (``prctl(PR_SET_PDEATHSIG)``), elsewhere a daemon thread polls the parent's PID. A parent that
    died before this call (``os.getppid() != expected_parent``) ends this process at once.
    """
    parent = os.getppid()
    armed = False
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if not armed:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=watch, name="gigatrain-parent-watch", daemon=True).start()
    # The parent may have died between starting us and the prctl above: then no signal will come.
    if expected_parent is not None and os.getppid() != expected_parent:
        os.kill(os.getpid(), signal.SIGKILL)


class RankStatus:
    """This rank's record in the launcher's status folder: PID, host, last step, outcome.

    A worker killed with SIGKILL cannot explain itself, so the launcher reads this record to say
    which rank died, where, and after which step. The step is rewritten in place after every step
    (one ``pwrite`` of a few hundred bytes). ``folder=None`` (torchrun, srun, one process) records
    nothing. Outcomes: ``running``; ``reported`` (the rank printed its own paragraph); ``silent``
    (it lost a peer and left the explanation to the launcher; ``message`` holds its text);
    ``exited`` (it returned normally with ``code``).
    """

    _PAD = 256

    def __init__(self, folder: str | os.PathLike | None, rank: int):
        self.path = Path(folder) / f"rank{rank}.json" if folder else None
        self.fields: dict = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(),
                             "step": None, "outcome": "running"}
        self._fd: int | None = None
        self._size = 0
        self.update()

    def update(self, **fields) -> None:
        self.fields.update(fields)
        if self.path is None:
            return
        data = json.dumps(self.fields).encode()
        # Pad to the longest record written so far, so a shorter one leaves no stale tail.
        self._size = max(self._size, len(data), self._PAD)
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
            os.pwrite(self._fd, data.ljust(self._size), 0)
        except OSError:
            self.path = None  # best effort: the launcher then says less

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def read(folder: str | os.PathLike, rank: int) -> dict:
        try:
            data = json.loads((Path(folder) / f"rank{rank}.json").read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}


class StopRequest:
    """SIGTERM and SIGINT in a training process: finish the step, save, stop; a second one aborts.

    ``install`` replaces the handlers of SIGTERM and SIGINT. The first signal only sets ``signum``;
    the training loop agrees on it with the other ranks at the next step boundary, saves a
    checkpoint and returns (``trainer.train(stop=...)``), and the process exits with
    ``EXIT_STOPPED``. One request often arrives more than once (SLURM signals every process of a
    job while torchrun or our launcher forwards its own copy), so further signals within
    ``duplicate_window_s`` of the first count as the same request. A later signal ends the process
    at once: with ``EXIT_STOPPED`` if the stop checkpoint is already written, else ``128 + signal``.
    """

    def __init__(self, *, announce: bool = False, status: RankStatus | None = None,
                 duplicate_window_s: float = 2.0):
        self.signum = 0
        self.step = 0           # the last completed step
        self.saved = False      # the stop checkpoint is on disk
        self.announce = announce
        self.status = status
        self.duplicate_window_s = duplicate_window_s
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def ignore_further(self) -> None:
        """Ignore SIGTERM and SIGINT from now on (the process is about to exit anyway)."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_IGN)
        self._previous.clear()

    def step_done(self, step: int) -> None:
        """Called by the training loop after every step."""
        self.step = step
        if self.status is not None:
            self.status.update(step=step)

    def checkpoint_saved(self, step: int) -> None:
        """Called once the checkpoint of a stop is written: an abort from now on loses nothing."""
        self.saved = True

    def _on_signal(self, signum, frame) -> None:
        now = time.monotonic()
        name = signal_name(signum)
        if not self.signum:
            self.signum, self._first_at = signum, now
            if self.announce:
                # os.write: a print() here could re-enter a print the main thread is in.
                _say(f"gigatrain: {name}: finishing the current step, saving a checkpoint and stopping; "
                     f"send it again to stop at once without saving.")
            return
        if now - self._first_at < self.duplicate_window_s:
            return
        if self.announce:
            _say(f"gigatrain: second {name}: stopping now"
                 + (" (the checkpoint is saved)." if self.saved else ", without a checkpoint of the last steps."))
        os._exit(EXIT_STOPPED if self.saved else 128 + signum)


def _say(line: str) -> None:
    try:
        os.write(2, ("\n" + line + "\n").encode())
    except OSError:
        pass


class Aborted(Exception):
    """The launcher got a second SIGTERM/SIGINT and killed its workers; ``code`` = 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(f"aborted by a second {signal_name(signum)}")
        self.signum = signum
        self.code = 128 + signum


class _Forwarder:
    """The launcher's SIGTERM/SIGINT handler: forward the first signal to the workers, give them
    ``grace_s`` to save and stop, then kill them; a second signal kills them at once."""

    def __init__(self, grace_s: float, status_dir: str):
        self.grace_s = grace_s
        self.status_dir = status_dir
        self.signum = 0
        self.expired = False
        self._timer: threading.Timer | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._timer is not None:
            self._timer.cancel()

    def __call__(self, signum, frame) -> None:
        name = signal_name(signum)
        if self.signum:
            _say(f"gigatrain: second {name}: killing the workers now.")
            self._send(signal.SIGKILL)
            raise Aborted(signum)
        self.signum = signum
        if not self._workers():
            raise Aborted(signum)  # nothing started yet, so nothing to save
        _say(f"gigatrain: {name}: the workers finish their current step, save a checkpoint and stop "
             f"(waiting up to {self.grace_s:g} s); send it again to stop at once without saving.")
        self._send(signum)
        self._timer = threading.Timer(self.grace_s, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        self.expired = True
        self._send(signal.SIGKILL)

    def _workers(self) -> list[int]:
        """PIDs of the workers: this process's children (Linux), else what they recorded."""
        pids: set[int] = set()
        tasks = Path(f"/proc/{os.getpid()}/task")
        if tasks.is_dir():
            for children in tasks.glob("*/children"):
                with contextlib.suppress(OSError, ValueError):
                    pids.update(int(p) for p in children.read_text().split())
            return sorted(pids)
        for f in Path(self.status_dir).glob("rank*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                pids.add(int(json.loads(f.read_text())["pid"]))
        return sorted(pids)

    def _send(self, signum: int) -> None:
        for pid in self._workers():
            with contextlib.suppress(OSError):
                if signum == signal.SIGKILL:
                    # Each worker leads its own process group (torch starts it in a new session):
                    # take whatever it started with it.
                    os.killpg(pid, signum)
                else:
                    os.kill(pid, signum)


_SIGNAL_HINTS = {
    signal.SIGKILL: "SIGKILL is often the kernel's out-of-memory killer: check `dmesg` or the job's "
                    "memory limit, and lower train.micro_batch or use more processes or offload",
    signal.SIGSEGV: "a crash in native code (a library, a driver or the hardware)",
    signal.SIGBUS: "often a full /dev/shm or a memory-mapped file that was truncated",
    signal.SIGABRT: "an abort in native code; its message, if any, is above",
    signal.SIGTERM: "another process or the scheduler terminated it",
}


def describe_lost_rank(rank: int, exitcode: int, status: Mapping, pid: int | None = None) -> str:
    """One sentence on a worker that died from a signal: rank, PID, host, signal, last step.

    ``status`` is the worker's ``RankStatus`` record (empty if it wrote none); ``pid`` and this
    host stand in for what it lacks.
    """
    signum = -exitcode
    name = signal_name(signum)
    who = f"rank {rank} (pid {status.get('pid') or pid or '?'} on {status.get('host') or socket.gethostname()})"
    step = status.get("step")
    when = f"after step {step}" if step else "before finishing its first step"
    hint = _SIGNAL_HINTS.get(signum)
    return f"{who} was killed by {name} {when}" + (f"; {hint}." if hint else ".")


def _failure_code(failures: Mapping, status_dir: str, forward: _Forwarder) -> int:
    """The job's exit code from torch's failure records, printing what no worker could say."""
    if forward.expired:
        _say(f"gigatrain: error: the workers did not stop within {forward.grace_s:g} s of "
             f"{signal_name(forward.signum)} and were killed; no checkpoint of the last steps.")
        return 128 + forward.signum
    records = {r: RankStatus.read(status_dir, r) for r in failures}
    dead = sorted(r for r, f in failures.items() if f.exitcode < 0)
    if dead and forward.signum and all(failures[r].exitcode == -forward.signum for r in dead):
        # The forwarded signal reached a worker still starting up, before it listens for it.
        _say(f"gigatrain: stopped by {signal_name(forward.signum)} while the workers were starting; "
             f"nothing was trained since the last checkpoint.")
        return 128 + forward.signum
    if dead:
        text = " ".join(describe_lost_rank(r, failures[r].exitcode, records[r], failures[r].pid) for r in dead)
        _say(f"gigatrain: error: {text} The other ranks were stopped.")
        return EXIT_FAILED
    order = sorted(failures, key=lambda r: (failures[r].timestamp, r))
    spoken = [r for r in order if records[r].get("outcome") != "silent"]
    if not spoken:
        # Only ranks that lost a peer: nobody named the cause, so say what the first one saw.
        r = order[0]
        _say("gigatrain: error: " + (records[r].get("message") or
                                     f"rank {r} exited with code {failures[r].exitcode}."))
        return failures[r].exitcode
    return failures[spoken[0]].exitcode


def launch_local(nproc: int, argv: Sequence[str], extra_env: Mapping[str, str] | None = None,
                 max_restarts: int = 0, grace_s: float = 60.0) -> int:
    """Start ``nproc`` workers on this machine through torch's elastic launcher and wait for them.

    Each worker runs ``python -m gigatrain <argv>`` with the torchrun variables set, which is the
    code path a cluster uses, plus ``LAUNCHER_PID_ENV`` (workers die with this process, see
    ``die_with_parent``) and ``STATUS_DIR_ENV`` (a private folder for their ``RankStatus``).

    The first SIGTERM or SIGINT is forwarded to the workers, which save a checkpoint and stop; they
    get ``grace_s`` seconds before being killed. A second signal kills them at once and raises
    ``Aborted``. Returns 0 when every worker finished, else the job's exit code: that of the first
    worker to fail (it has printed why), or ``EXIT_FAILED`` after printing which rank was killed by
    which signal, on which host, after which step.
    """
    import tempfile

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    status_dir = tempfile.mkdtemp(prefix="gigatrain-status-")
    env = {**(extra_env or {}), LAUNCHER_PID_ENV: str(os.getpid()), STATUS_DIR_ENV: status_dir}
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"gigatrain-{os.getpid()}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=max_restarts,
        monitor_interval=0.1,
        start_method="spawn",
        # SIGTERM and SIGINT are ours (forwarded, see _Forwarder); torch's handler would raise
        # SignalException here and tear the workers down without a checkpoint.
        signals_to_handle="SIGHUP,SIGQUIT",
    )
    forward = _Forwarder(grace_s, status_dir)
    # torch's agent logs every worker exit; we say once what happened, in our words (LOGLEVEL
    # is torch's own switch for seeing them).
    quiet = "LOGLEVEL" not in os.environ
    previous_disable = logging.root.manager.disable
    if quiet:
        logging.disable(logging.CRITICAL)
    try:
        forward.install()
        elastic_launch(config, sys.executable)("-m", "gigatrain", *argv)
        return 0
    except ChildFailedError as e:
        return _failure_code(e.failures, status_dir, forward)
    except Aborted as e:
        return e.code
    except Exception as e:
        from torch.distributed.elastic.multiprocessing.api import SignalException

        if isinstance(e, SignalException):  # SIGHUP/SIGQUIT: torch stopped the workers
            return 128 + int(e.sigval)
        raise
    finally:
        forward.restore()
        logging.disable(previous_disable)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        import shutil

        shutil.rmtree(status_dir, ignore_errors=True)
