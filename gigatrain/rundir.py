"""Output folders of runs: fresh names, one live run per folder, no silent overwrite, no leftovers.

- ``fresh_run_dir``: ``runs/<job>-<timestamp>`` for a run started without ``--out``, so the same
  command can be run again and again without touching earlier results.
- ``RunLock``: ``<out>/gigatrain.lock`` names the host, PID and start time of the run that holds
  the folder. A second run on a held folder is refused; a lock whose process is gone (same host,
  PID no longer running) is stale and taken over with a note.
- ``check_fresh``: a fresh start (no ``resume``) into a folder that already holds a run
  (checkpoints or ``metrics.jsonl``) is refused unless ``overwrite`` is set; ``clear_previous_run``
  then removes the old run's checkpoints and metrics so that nothing of it mixes with the new one.
- ``write_owner`` / ``sweep_stale``: temporary folders (partial ``.tmp_step_*`` checkpoints, NVMe
  offload files) record their owner process; at start, those whose owner is dead on this host are
  removed, so that killed runs do not pile up leftovers that count against free-space checks.

Only the host that wrote an owner record can tell whether its process is alive: records of other
hosts are always left alone.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
from pathlib import Path

LOCK_FILE = "gigatrain.lock"
OWNER_FILE = "owner.json"
_STEP_PREFIX = "step_"


class RunDirError(ValueError):
    """An output folder that this run may not use; the message says why and what to do."""


# -- processes ------------------------------------------------------------------------------------
def _proc_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), to tell a reused PID apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its last ')'.
    fields = stat[stat.rfind(")") + 2:].split()
    try:
        return int(fields[19])  # field 22 of the full line
    except (IndexError, ValueError):
        return None


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].startswith("Z")


def owner_record() -> dict:
    """This process as an owner: host, PID, its start time (ticks, for PID reuse) and wall time."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "proc_start": _proc_start(pid),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def owner_is_dead(owner: dict) -> bool:
    """True only when ``owner`` ran on this host and its process no longer exists (or its PID now
    belongs to another process). Owners on other hosts are never declared dead."""
    if owner.get("host") != socket.gethostname():
        return False
    try:
        pid = int(owner["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    if _is_zombie(pid):
        return True
    recorded, now = owner.get("proc_start"), _proc_start(pid)
    return recorded is not None and now is not None and recorded != now


def _describe(owner: dict) -> str:
    return (f"PID {owner.get('pid', '?')} on host {owner.get('host', '?')}"
            + (f", started {owner['started']}" if owner.get("started") else ""))


# -- owner records of temporary folders -----------------------------------------------------------
def write_owner(folder: str | os.PathLike) -> None:
    """Record this process as the owner of ``folder`` (a temporary folder it is filling)."""
    (Path(folder) / OWNER_FILE).write_text(json.dumps(owner_record()))


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def sweep_stale(root: str | os.PathLike | None, pattern: str) -> list[Path]:
    """Remove the folders under ``root`` matching ``pattern`` whose recorded owner is dead on this
    host; returns what was removed. Folders without an owner record are kept (their owner is
    unknown, and the next save of the same step replaces a partial checkpoint anyway)."""
    if root is None or not Path(root).is_dir():
        return []
    removed = []
    for d in sorted(Path(root).glob(pattern)):
        owner = _read_json(d / OWNER_FILE) if d.is_dir() else None
        if owner is not None and owner_is_dead(owner):
            shutil.rmtree(d, ignore_errors=True)
            if not d.exists():
                removed.append(d)
    return removed


# -- fresh folders ------------------------------------------------------------------------------
def fresh_run_dir(job: str, root: str | os.PathLike = "runs", launch_id: str | None = None) -> Path:
    """The output folder of a run started without one: ``<root>/<job>-<launch_id>`` when every
    rank must derive the same name on its own (torchrun, srun), else ``<root>/<job>-<timestamp>``,
    created here (with ``-2``, ``-3``... when two runs start within the same second)."""
    root = Path(root)
    if launch_id:
        return root / f"{job}-{launch_id}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    for i in range(1, 10_000):
        path = root / (f"{job}-{stamp}" + (f"-{i}" if i > 1 else ""))
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RunDirError(f"cannot create a fresh folder for {job} under {root}: give one with --out.")


def newest_run_dir(job: str, root: str | os.PathLike = "runs") -> Path | None:
    """The most recently modified ``<root>/<job>-*`` folder, if any."""
    root = Path(root)
    if not root.is_dir():
        return None
    runs = [d for d in root.glob(f"{job}-*") if d.is_dir()]
    return max(runs, key=lambda d: d.stat().st_mtime) if runs else None


# -- what a folder holds --------------------------------------------------------------------------
def _checkpoints(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(d for d in ckpt_dir.iterdir()
                  if d.name.startswith(_STEP_PREFIX) and d.name[len(_STEP_PREFIX):].isdigit())


def previous_run(out: str | os.PathLike, ckpt_dir: str | os.PathLike) -> str | None:
    """A description of the run ``out`` already holds (checkpoints, metrics), or None."""
    out, ckpt_dir = Path(out), Path(ckpt_dir)
    held = []
    ckpts = _checkpoints(ckpt_dir)
    if ckpts:
        held.append(f"{len(ckpts)} checkpoint(s) in {ckpt_dir} (newest {ckpts[-1].name})")
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        with open(metrics, "rb") as f:
            lines = sum(1 for _ in f)
        held.append(f"{metrics} with {lines} step record(s)")
    return " and ".join(held) or None


def check_fresh(out: str | os.PathLike, ckpt_dir: str | os.PathLike, *, resume: str | None,
                overwrite: bool) -> None:
    """Refuse (``RunDirError``) to start a fresh run in a folder that holds a run, unless the run
    resumes (``resume`` set) or ``overwrite`` is given."""
    if resume is not None or overwrite:
        return
    held = previous_run(out, ckpt_dir)
    if held:
        raise RunDirError(
            f"--out {out} already holds a run ({held}); starting afresh there would overwrite its "
            f"checkpoints and metrics. Continue it with resume=auto, choose a new --out (or leave "
            f"--out out for a fresh runs/<job>-<time> folder), or pass --overwrite (overwrite=true) "
            f"to replace it.")


def clear_previous_run(out: str | os.PathLike, ckpt_dir: str | os.PathLike) -> str | None:
    """Remove the checkpoints (``step_*``, ``latest``), ``metrics.jsonl`` and TensorBoard logs of
    the run in ``out``; returns a description of what was removed, or None if there was nothing."""
    out, ckpt_dir = Path(out), Path(ckpt_dir)
    held = previous_run(out, ckpt_dir)
    for d in _checkpoints(ckpt_dir):
        shutil.rmtree(d, ignore_errors=True)
    for f in (ckpt_dir / "latest", out / "metrics.jsonl"):
        try:
            f.unlink()
        except FileNotFoundError:
            pass
    shutil.rmtree(out / "tensorboard", ignore_errors=True)
    return held


# -- the lock -----------------------------------------------------------------------------------
class RunLock:
    """``<out>/gigatrain.lock``, held by one live run at a time.

    ``RunLock.acquire(out)`` creates the file (atomically) naming this process, or raises
    ``RunDirError`` naming the live run that holds it. A lock left by a process that is no longer
    running on this host is taken over; ``note`` then says so. ``release()`` removes the file if it
    is still this process's. A lock from another host cannot be checked and is never taken over.
    """

    def __init__(self, path: Path, note: str | None = None):
        self.path = path
        self.note = note
        self.notes: list[str] = []
        self._owner = _read_json(path)

    @classmethod
    def acquire(cls, out: str | os.PathLike) -> "RunLock":
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / LOCK_FILE
        for _ in range(5):
            if _create(path):
                return cls(path)
            owner = _read_json(path)
            if owner is None:
                if not path.exists():
                    continue
                # Damaged (the file system had no hard links and a writer died mid-write).
                if time.time() - path.stat().st_mtime < 5:
                    time.sleep(0.2)
                    continue
                owner = {}
            elif not owner_is_dead(owner):
                raise RunDirError(
                    f"--out {out} is in use by another run ({_describe(owner)}; lock file {path}). "
                    f"Wait for it to finish or stop it, or use another --out. If that run is gone "
                    f"(e.g. it ran on another host that was shut down), delete {path}.")
            if _replace_stale(path, owner):
                return cls(path, note=(
                    f"note: took over the stale lock of a run that is no longer running "
                    f"({_describe(owner) if owner else 'unreadable lock file'}) in {out}."))
        raise RunDirError(f"cannot take the lock {path}: other runs keep starting in --out {out}.")

    def release(self) -> None:
        """Remove the lock file if this process still holds it."""
        now = _read_json(self.path)
        if now is not None and self._owner is not None and now.get("pid") == self._owner.get("pid") \
                and now.get("host") == self._owner.get("host"):
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _create(path: Path) -> bool:
    """Create the lock ``path`` naming this process, complete or not at all; False if it exists."""
    rec = json.dumps(owner_record())
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}")
    tmp.write_text(rec)
    try:
        os.link(tmp, path)  # atomic, and never leaves a half-written lock behind
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV):
            raise
        try:  # file systems without hard links
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(rec)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _replace_stale(path: Path, stale: dict) -> bool:
    """Replace the stale lock ``path`` by ours if it still holds ``stale``. Two runs taking over at
    once serialise on an flock of the folder, so neither removes the other's fresh lock (where the
    file system has no flock the window is a few microseconds)."""
    import fcntl

    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        try:
            fcntl.flock(dfd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        if (_read_json(path) or {}) != stale:
            return False
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return _create(path)
    finally:
        os.close(dfd)  # also drops the flock


# -- all of it, before launch ---------------------------------------------------------------------
def claim(out: str | os.PathLike, ckpt_dir: str | os.PathLike, offload_dir: str | os.PathLike | None, *,
          resume: str | None, overwrite: bool, owner: bool) -> RunLock | None:
    """Make ``out`` this run's output folder, before anything is launched or written.

    Every process that calls this checks that a fresh start does not overwrite a run
    (``check_fresh``). The one ``owner`` process of the job (the launcher, or rank 0 under
    torchrun/srun) also takes the lock (returned; release it at the end), clears the previous run
    when ``overwrite`` is set, and sweeps the leftovers of dead runs: partial ``.tmp_step_*``
    checkpoints under ``ckpt_dir`` and NVMe offload folders under ``offload_dir``. What it did
    besides is listed, one note a line, in the lock's ``notes``.
    """
    lock = RunLock.acquire(out) if owner else None
    try:
        check_fresh(out, ckpt_dir, resume=resume, overwrite=overwrite)
        if lock is None:
            return None
        lock.notes = [lock.note] if lock.note else []
        if overwrite and resume is None:
            held = clear_previous_run(out, ckpt_dir)
            if held:
                lock.notes.append(f"note: overwrite=true: removed the previous run in {out} ({held}).")
        removed = sweep_stale(ckpt_dir, ".tmp_step_*") + sweep_stale(offload_dir, "gigatrain-nvme-*")
        if removed:
            lock.notes.append(f"note: removed {len(removed)} leftover folder(s) of runs that are no longer "
                              f"running: {', '.join(str(d) for d in removed)}.")
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock
