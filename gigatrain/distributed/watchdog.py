"""Hang diagnosis: name the rank that never arrived, and where it is, instead of timing out.

Every collective and message goes through ``Comm``, which records it in the rank's ``OpLog``
(channel, sequence number, op, shapes, start, completion). A ``Watchdog`` thread per rank looks
at that log about once a second. When this rank has been inside one op for longer than
``parallel.hang_timeout_s`` it raises an alarm in the c10d store (the store needs no collective,
and a collective is exactly what is stuck); every rank's watchdog sees the alarm at its next
poll, publishes its log and the Python stack of its main thread, and one rank (the first to
raise the alarm) compares them with ``diagnose`` and prints one paragraph: who waits in which
op (op, group, sequence number), who never entered it, that rank's last completed op and its
stack. Then every rank exits with ``HANG_EXIT_CODE``.

A hung rank is usually blocked in Python or in another group's collective, so the thread only
does cheap things: a scan of the few pending ops, one non-blocking ``check`` on the store, and
sleeps. Nothing touches the store per op.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import sysconfig
import threading
import time
import traceback
from pathlib import Path

from .comm import OpLog

__all__ = ["HANG_EXIT_CODE", "Watchdog", "diagnose", "main_thread_stack", "inject_hang"]

#: Exit status of every rank after a diagnosed hang (the convention of ``timeout(1)``).
HANG_EXIT_CODE = 124

_KEY = "gigatrain/watchdog/"
_ALARM, _DONE, _EXITED = _KEY + "alarm", _KEY + "done", _KEY + "exited"


def _rec_key(rank: int) -> str:
    return f"{_KEY}rank{rank}"


# ---- the diagnosis (pure) ---------------------------------------------------------------------

def _ranks_text(ranks) -> str:
    ranks = sorted(ranks)
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def _shapes_text(shapes) -> str:
    if not shapes:
        return ""
    return ", shape " + " ".join("[" + ", ".join(map(str, s)) + "]" for s in shapes)


def _op_text(op: dict) -> str:
    """``all_reduce #14 on group dp (ranks 0, 1), shape [1024]``; a message names its peer."""
    name, seq, group = op["op"], op["seq"], op["group"]
    if name in ("send", "recv"):
        src, dst = op["ranks"]
        peer = f"to rank {dst}" if name == "send" else f"from rank {src}"
        where = f"{name} #{seq} {peer} on group {group} (message {src}->{dst})"
    else:
        where = f"{name} #{seq} on group {group} ({_ranks_text(op['ranks'])})"
    return where + _shapes_text(op.get("shapes"))


def _seconds(x: float) -> str:
    return f"{x:.0f} s" if x >= 10 else f"{x:.1f} s"


def _where(rank: int, snap: dict) -> tuple[str, list[str]]:
    """Where a rank is (its step, its current wait if any, its last completed op) and the stack
    of its main thread."""
    who = f"Rank {rank}"
    if snap.get("host"):
        who += f" ({snap['host']}, pid {snap.get('pid')})"
    step = snap.get("step")
    text = who + (f" is at step {step}" if step is not None else " has not started a step") + ", "
    if snap.get("pending"):
        p = snap["pending"][0]
        text += f"waiting in {_op_text(p)}, for {_seconds(p['age_s'])}"
    else:
        text += "in no collective"
    last = snap.get("last_done")
    if last:
        text += (f"; its last completed collective was {_op_text(last)}"
                 + (f" at step {last['step']}" if last.get("step") is not None else "")
                 + (f", {_seconds(last['done_ago_s'])} ago" if "done_ago_s" in last else ""))
    else:
        text += "; it has completed no collective yet"
    stack = list(snap.get("stack") or [])
    text += ". Its main thread is at (innermost last):" if stack else "."
    return text, stack


def diagnose(records: dict[int, dict | None], *, world_size: int, hang_timeout_s: float) -> str:
    """One paragraph explaining a hang from the ranks' published records.

    ``records`` maps a rank to what its watchdog published (``OpLog.snapshot()`` plus ``host``,
    ``pid`` and ``stack``, a list of ``file:line in function: code`` lines of its main thread),
    or to None / nothing when the rank did not answer. The paragraph says which ranks wait in
    which op (op, group, sequence number), which members of that op never entered it (their
    count of ops entered on the op's channel does not reach its sequence number), where each of
    those ranks is (its own wait if it has one, its last completed op, and its stack, as
    indented lines), which ranks did not answer, and that every rank exits with
    ``HANG_EXIT_CODE``.
    """
    answered = {r: s for r, s in records.items() if s is not None}
    silent = [r for r in range(world_size) if r not in answered]
    waits: dict[tuple[str, int], list[int]] = {}
    for r, snap in sorted(answered.items()):
        if snap.get("pending"):
            op = snap["pending"][0]  # the oldest: anything later waits behind it
            waits.setdefault((op["channel"], op["seq"]), []).append(r)

    def age(ranks):
        return max(answered[r]["pending"][0]["age_s"] for r in ranks)

    sentences, missing_all = [], []
    for (channel, seq), ranks in sorted(waits.items(), key=lambda kv: -age(kv[1])):  # where it stopped first
        op = answered[ranks[0]]["pending"][0]
        step = op.get("step")
        s = (f"{_ranks_text(ranks).capitalize()} {'waits' if len(ranks) == 1 else 'wait'} in {_op_text(op)},"
             f" for {_seconds(age(ranks))}" + (f" (step {step})" if step is not None else ""))
        members = [m for m in op["ranks"] if m not in ranks]
        missing = [m for m in members if m in answered and answered[m]["entered"].get(channel, 0) <= seq]
        unknown = [m for m in members if m not in answered]
        if missing:
            s += f"; {_ranks_text(missing)} never entered it"
            missing_all += [m for m in missing if m not in missing_all]
        elif not unknown:
            s += ("; every member entered it, so the transport itself is stuck or the members "
                  "disagree on the op (compare their ops and shapes)")
        if unknown:
            s += f"; {_ranks_text(unknown)} did not answer"
        sentences.append(s + ".")

    text = f"collective hang (parallel.hang_timeout_s={hang_timeout_s:g}): "
    text += " ".join(sentences) if sentences else "no rank is waiting in a collective any more."
    for m in missing_all:
        where, stack = _where(m, answered[m])
        text += " " + where
        if stack:
            # The paragraph goes on after the stack on a line of its own.
            text += "\n" + "\n".join("    " + line for line in stack) + "\n"
    if silent:
        text += ("" if text.endswith("\n") else " ") + (
            f"{_ranks_text(silent).capitalize()} did not answer: {'its' if len(silent) == 1 else 'their'} "
            "process is gone or blocked without releasing the Python interpreter.")
    text += ("" if text.endswith("\n") else " ") + (
        f"Every rank now exits with code {HANG_EXIT_CODE}. If this wait was legitimate (a slow "
        "checkpoint save, a long compilation), raise parallel.hang_timeout_s.")
    return text


# ---- what a rank publishes --------------------------------------------------------------------

def _short_path(path: str) -> str:
    root = str(Path(__file__).resolve().parents[2]) + os.sep
    if path.startswith(root):
        return path[len(root):]
    for lib in {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]}:
        if path.startswith(lib + os.sep):
            return path[len(lib) + 1:]
    return path


def main_thread_stack(limit: int = 12) -> list[str]:
    """The Python stack of the main thread, innermost last, as ``file:line in function: code``
    lines (the last ``limit`` frames). Called from another thread: the main thread may be
    blocked anywhere, which is the point."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return []
    out = []
    frames = [f for f in traceback.extract_stack(frame) if not f.filename.startswith("<frozen")]
    for f in frames[-limit:]:
        line = f"{_short_path(f.filename)}:{f.lineno} in {f.name}"
        if f.line:
            line += f": {f.line.strip()}"
        out.append(line)
    return out


def inject_hang() -> None:
    """Block this thread forever (``debug.inject_hang_step``): the hang the watchdog must name.

    Waiting on an event releases the interpreter, as a rank stuck in I/O or a lock would."""
    threading.Event().wait()


# ---- the thread -------------------------------------------------------------------------------

class Watchdog:
    """Watches ``log`` and, on a hang, diagnoses it with the other ranks through ``store``.

    Args:
        log: this rank's ``OpLog`` (``Mesh.log``).
        hang_timeout_s: an op running longer than this on this rank raises the alarm.
        store: a c10d store shared by all ranks (default: the default group's).
        rank, world_size: this rank and the number of ranks (default: the default group's).
        out: a folder where the paragraph is also written to ``error-rank<R>.log`` (optional).
        poll_s: how often the log and the store are looked at.
        answer_timeout_s: how long the diagnosing rank waits for the others' records.
        exit: called with ``HANG_EXIT_CODE`` at the end (default ``os._exit``: the main thread
            is blocked, so nothing short of ending the process gets it out).

    Use as a context manager, or ``start()`` / ``stop()``.
    """

    def __init__(self, log: OpLog, *, hang_timeout_s: float, store=None, rank: int | None = None,
                 world_size: int | None = None, out: str | os.PathLike | None = None,
                 poll_s: float = 1.0, answer_timeout_s: float = 10.0, exit=os._exit):
        if store is None or rank is None or world_size is None:
            import torch.distributed as dist
            from torch.distributed.distributed_c10d import _get_default_store

            store = store if store is not None else _get_default_store()
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
        self.log, self.store, self.rank, self.world_size = log, store, rank, world_size
        self.hang_timeout_s, self.poll_s, self.answer_timeout_s = hang_timeout_s, poll_s, answer_timeout_s
        self.out = Path(out) if out is not None else None
        self._exit = exit
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.message: str | None = None  # the diagnosis, once there is one

    def start(self) -> "Watchdog":
        self._thread = threading.Thread(target=self._run, name=f"gigatrain-watchdog-{self.rank}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5 * self.poll_s + 1)
        self._thread = None
        # Works never waited on stay referenced here; gloo must not release them at shutdown.
        self.log.clear_pending()

    def __enter__(self) -> "Watchdog":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                stuck = self.log.stuck(self.hang_timeout_s)
                if stuck is not None:
                    leader = int(self.store.add(_ALARM, 1)) == 1
                elif self.store.check([_ALARM]):
                    leader = False
                else:
                    continue
            except Exception:
                # The store went away (the job is ending): nothing left to diagnose with.
                return
            if self._stop.is_set():
                return
            self._handle(leader)
            return

    def _publish(self) -> None:
        snap = self.log.snapshot()
        snap.update(host=socket.gethostname(), pid=os.getpid(), stack=main_thread_stack())
        self.store.set(_rec_key(self.rank), json.dumps(snap))

    def _collect(self) -> dict[int, dict | None]:
        records: dict[int, dict | None] = {}
        deadline = time.monotonic() + self.answer_timeout_s
        while True:
            for r in range(self.world_size):
                if r not in records and self.store.check([_rec_key(r)]):
                    records[r] = json.loads(self.store.get(_rec_key(r)))
            if len(records) == self.world_size or time.monotonic() > deadline:
                return records
            time.sleep(0.05)

    def _handle(self, leader: bool) -> None:
        msg = None
        try:
            self._publish()
            if leader:
                msg = diagnose(self._collect(), world_size=self.world_size, hang_timeout_s=self.hang_timeout_s)
                self._say(msg)
                self.store.set(_DONE, msg)
            else:
                deadline = time.monotonic() + self.answer_timeout_s + 5
                while time.monotonic() < deadline and not self.store.check([_DONE]):
                    time.sleep(0.05)
                if self.store.check([_DONE]):
                    msg = self.store.get(_DONE).decode()
        except Exception as e:  # the store failed mid-way: say what this rank knows, then go
            if leader or msg is None:
                msg = self._local_message(e)
                if leader:
                    self._say(msg)
        self.message = msg
        self._write_error_log(msg)
        self._exit_together()

    def _local_message(self, error: Exception) -> str:
        snap = self.log.snapshot()
        snap.update(stack=main_thread_stack())
        mine = diagnose({self.rank: snap}, world_size=1, hang_timeout_s=self.hang_timeout_s)
        return f"{mine} (Rank {self.rank} could not reach the other ranks through the store: {error}.)"

    def _say(self, msg: str) -> None:
        print(f"\ngigatrain: error: {msg}", file=sys.stderr, flush=True)

    def _write_error_log(self, msg: str | None) -> None:
        if self.out is None or msg is None:
            return
        try:
            with open(self.out / f"error-rank{self.rank}.log", "a") as f:
                f.write(msg + "\n")
        except OSError:
            pass

    def _exit_together(self) -> None:
        # Leave at (nearly) the same moment: a launcher that sees one worker exit stops the
        # others with a signal, which would replace their exit code.
        try:
            self.store.add(_EXITED, 1)
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline and int(self.store.add(_EXITED, 0)) < self.world_size:
                time.sleep(0.02)
        except Exception:
            pass
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        self._exit(HANG_EXIT_CODE)
