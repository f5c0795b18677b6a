"""Hang diagnosis: the op log that Comm keeps, the diagnosis paragraph (rung 0, no process),
the watchdog protocol over a store (threads in this process), op records of real gloo
traffic (one spawn), and the CLI with an injected hang (one launch)."""
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gigatrain.distributed.comm import OpLog, _TrackedWork
from gigatrain.distributed.watchdog import HANG_EXIT_CODE, Watchdog, diagnose

from dist_utils import spawn

REPO = Path(__file__).resolve().parents[1]


def _op(op, group, channel, seq, ranks, shapes=((17888,),), age=21.0, step=3, done_ago=None):
    d = {"op": op, "group": group, "channel": channel, "seq": seq, "ranks": list(ranks),
         "shapes": [list(s) for s in shapes], "step": step, "age_s": age}
    if done_ago is not None:
        d["done_ago_s"] = done_ago
    return d


def _snap(step, entered, pending=(), last=None, stack=(), host="node7", pid=4242):
    return {"step": step, "entered": dict(entered), "pending": list(pending), "last_done": last,
            "host": host, "pid": pid, "stack": list(stack)}


STACK = ["gigatrain/trainer.py:142 in _run: inject_hang()",
         "gigatrain/distributed/watchdog.py:185 in inject_hang: threading.Event().wait()"]


# ---- rung 0: the diagnosis ---------------------------------------------------------------------

def test_diagnosis_names_the_rank_that_never_entered():
    records = {
        0: _snap(3, {"dp[0,1]": 21, "world[0,1]": 2},
                 pending=[_op("all_reduce", "dp", "dp[0,1]", 20, (0, 1))],
                 last=_op("all_reduce", "dp", "dp[0,1]", 19, (0, 1), shapes=((),), step=2, done_ago=21.5)),
        1: _snap(3, {"dp[0,1]": 20, "world[0,1]": 2},
                 last=_op("all_reduce", "dp", "dp[0,1]", 19, (0, 1), shapes=((),), step=2, done_ago=22.0),
                 stack=STACK, pid=99),
    }
    msg = diagnose(records, world_size=2, hang_timeout_s=20)
    assert "Rank 0 waits in all_reduce #20 on group dp (ranks 0, 1), shape [17888], for 21 s (step 3)" in msg
    assert "rank 1 never entered it" in msg
    assert "Rank 1 (node7, pid 99) is at step 3, in no collective" in msg
    assert "its last completed collective was all_reduce #19 on group dp (ranks 0, 1), shape [] at step 2, 22 s ago" in msg
    assert "\n    gigatrain/trainer.py:142 in _run: inject_hang()\n" in msg
    assert msg.rstrip().endswith("raise parallel.hang_timeout_s.")
    assert f"exits with code {HANG_EXIT_CODE}" in msg
    assert "rank 0 never" not in msg and "Rank 0 (" not in msg  # the waiting rank is not a suspect
    assert "\n\n" not in msg  # one paragraph


def test_diagnosis_follows_a_chain_through_a_pipeline():
    """dp x pp = 2 x 2 (pp groups [0,1] and [2,3], dp groups [0,2] and [1,3]): rank 3 hangs;
    rank 1 waits for its activation gradient, rank 2 for rank 3's and 0 for rank 2 in dp."""
    recv = _op("recv", "pp", "pp[3>2]", 7, (3, 2), shapes=((2, 32, 32),), age=30)
    records = {
        0: _snap(5, {"dp[0,2]": 9}, pending=[_op("all_reduce", "dp", "dp[0,2]", 8, (0, 2), age=25)]),
        1: _snap(5, {"pp[3>1]": 4}, pending=[_op("recv", "pp", "pp[3>1]", 3, (3, 1), shapes=((2, 32, 32),), age=31)]),
        2: _snap(5, {"dp[0,2]": 8, "pp[3>2]": 8}, pending=[recv], stack=["a.py:1 in f"]),
        3: _snap(5, {"pp[3>2]": 7, "pp[3>1]": 3}, stack=["b.py:2 in g: time.sleep(1e9)"]),
    }
    msg = diagnose(records, world_size=4, hang_timeout_s=20)
    assert "Rank 2 waits in recv #7 from rank 3 on group pp (message 3->2), shape [2, 32, 32], for 30 s" in msg
    assert "Rank 0 waits in all_reduce #8 on group dp (ranks 0, 2)" in msg and "rank 2 never entered it" in msg
    assert "Rank 1 waits in recv #3 from rank 3" in msg
    assert msg.count("rank 3 never entered it") == 2
    # Rank 2 is itself waiting: its own wait is named where it is described.
    assert "Rank 2 (node7, pid 4242) is at step 5, waiting in recv #7 from rank 3" in msg
    assert "Rank 3 (node7, pid 4242) is at step 5, in no collective; it has completed no collective yet" in msg
    assert "    b.py:2 in g: time.sleep(1e9)" in msg
    assert msg.index("Rank 1 waits") < msg.index("Rank 2 waits") < msg.index("Rank 0 waits")  # longest wait first


def test_diagnosis_when_everyone_entered_or_someone_is_silent():
    both = {r: _snap(2, {"world[0,1]": 4}, pending=[_op("broadcast", "world", "world[0,1]", 3, (0, 1), age=21 + r)])
            for r in (0, 1)}
    msg = diagnose(both, world_size=2, hang_timeout_s=20)
    assert "Ranks 0, 1 wait in broadcast #3 on group world (ranks 0, 1)" in msg
    assert "every member entered it" in msg and "never entered" not in msg

    one = {0: both[0], 1: None}
    msg = diagnose(one, world_size=3, hang_timeout_s=20)
    assert "rank 1 did not answer" in msg
    assert "Ranks 1, 2 did not answer: their process is gone" in msg

    idle = {0: _snap(2, {}), 1: _snap(2, {})}
    assert "no rank is waiting in a collective any more" in diagnose(idle, world_size=2, hang_timeout_s=5)


# ---- rung 0: the op log ------------------------------------------------------------------------

class _FakeWork:
    def __init__(self):
        self.done = False
        self.waited = 0

    def wait(self):
        self.waited += 1
        return True

    def is_completed(self):
        return self.done


def test_op_log_sequences_and_completion():
    log = OpLog()
    log.step = 4
    a = log.begin("all_reduce", "dp", "dp[0,1]", (0, 1), [(8,)])
    log.end(a)
    b = log.begin("all_reduce", "dp", "dp[0,1]", (0, 1), [(8,)])
    c = log.begin("send", "pp", "pp[0>1]", (0, 1), [(2, 3)])
    assert (a.seq, b.seq, c.seq) == (0, 1, 0)
    assert log.entered == {"dp[0,1]": 2, "pp[0>1]": 1}
    assert log.last_done is a and len(log.pending) == 2

    w = _TrackedWork(_FakeWork(), b, log)
    assert log.stuck(0.0) is b  # the oldest unfinished
    w.wait()
    w.wait()  # idempotent
    assert log.last_done is b and log.stuck(0.0) is c
    assert log.stuck(3600.0) is None  # nothing that old

    # An asynchronous op that finished without anyone waiting on it is not a hang.
    d = log.begin("all_gather", "dp", "dp[0,1]", (0, 1), [(4,)])
    work = _FakeWork()
    _TrackedWork(work, d, log)
    log.end(c)
    assert log.stuck(0.0) is d
    work.done = True
    assert log.stuck(0.0) is None and log.last_done is d

    snap = log.snapshot()
    assert snap["step"] == 4 and snap["pending"] == [] and snap["entered"]["dp[0,1]"] == 3
    assert snap["last_done"]["op"] == "all_gather" and snap["last_done"]["seq"] == 2


def test_recording_costs_microseconds():
    """What Comm adds per op (begin + end) must be negligible next to any collective."""
    log = OpLog()
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        log.end(log.begin("all_reduce", "dp", "dp[0,1]", (0, 1), [(1024,)]))
    per_op = (time.perf_counter() - t0) / n
    assert per_op < 20e-6, per_op


# ---- rung 2: the protocol, two watchdogs in this process ---------------------------------------

def test_watchdogs_diagnose_through_the_store(tmp_path, capsys):
    import torch.distributed as dist

    store = dist.HashStore()
    logs = [OpLog(), OpLog()]
    for log in logs:
        log.step = 3
        log.end(log.begin("all_reduce", "dp", "dp[0,1]", (0, 1), [()]))
    logs[0].begin("all_reduce", "dp", "dp[0,1]", (0, 1), [(16,)])  # rank 0 waits; rank 1 never comes
    codes = {}
    done = threading.Event()

    def exiter(rank):
        def f(code):
            codes[rank] = code
            if len(codes) == 2:
                done.set()
        return f

    dogs = [Watchdog(logs[r], hang_timeout_s=0.3, store=store, rank=r, world_size=2, out=tmp_path,
                     poll_s=0.05, answer_timeout_s=5, exit=exiter(r)) for r in (0, 1)]
    for d in dogs:
        d.start()
    try:
        assert done.wait(20), codes
    finally:
        for d in dogs:
            d.stop()
    assert codes == {0: HANG_EXIT_CODE, 1: HANG_EXIT_CODE}
    err = capsys.readouterr().err
    assert err.count("gigatrain: error: collective hang") == 1  # printed by one rank only
    assert "Rank 0 waits in all_reduce #1 on group dp (ranks 0, 1), shape [16]" in err
    assert "rank 1 never entered it" in err and "Rank 1 (" in err
    assert "in test_watchdogs_diagnose_through_the_store" in err  # the main thread's stack
    for r in (0, 1):
        assert dogs[r].message and "rank 1 never entered it" in (tmp_path / f"error-rank{r}.log").read_text()


def test_watchdog_stays_quiet_without_a_hang():
    import torch.distributed as dist

    store = dist.HashStore()
    log = OpLog()
    log.begin("barrier", "world", "world[0,1]", (0, 1), [])  # in flight, but not for long
    codes = []
    with Watchdog(log, hang_timeout_s=60, store=store, rank=0, world_size=2, poll_s=0.02, exit=codes.append):
        time.sleep(0.3)
    assert codes == [] and not store.check(["gigatrain/watchdog/alarm"])
    assert log.pending == {}  # stop() drops unfinished works


# ---- rung 3: records of real gloo traffic -----------------------------------------------------

def _records(rank, world):
    import torch
    import torch.distributed as dist

    from gigatrain.distributed.comm import Comm, OpLog
    from gigatrain.precision import DynamicLossScaler

    log = OpLog()
    comm = Comm(dist.group.WORLD, "world", log=log)
    t = torch.ones(4)
    comm.all_reduce(t)
    comm.all_reduce(t, async_op=True).wait()
    comm.broadcast(t, src=1)
    comm.barrier()
    peer = 1 - rank
    works = comm.p2p_ops([(torch.full((3,), float(rank)), peer)], [(torch.empty(3), peer)])
    for w in works:
        w.wait()
    overflow = DynamicLossScaler().found_overflow([torch.tensor([float("inf") if rank else 1.0])], comm=comm)
    return {"entered": dict(log.entered), "pending": len(log.pending), "last": log.last_done.op,
            "overflow": overflow, "sent": dict(comm.stats.sent)}


@pytest.mark.rung3
def test_comm_records_real_collectives_and_messages():
    r0, r1 = spawn(_records, 2, timeout_s=30)
    assert r0["entered"] == {"world[0,1]": 5, "world[0>1]": 1, "world[1>0]": 1}
    assert r0["entered"] == r1["entered"]  # the same sequence numbers on both sides
    assert r0["pending"] == r1["pending"] == 0 and r0["last"] == "all_reduce"
    assert r0["overflow"] and r1["overflow"]  # the fp16 overflow flag goes through Comm too
    assert ("world", "broadcast") in r1["sent"] and ("world", "broadcast") not in r0["sent"]


# ---- rung 3: the CLI with an injected hang ----------------------------------------------------

@pytest.mark.rung3
def test_cli_names_the_hung_rank_and_exits(tmp_path):
    cmd = [sys.executable, "-m", "gigatrain", "train", "--nproc", "2", "--out", str(tmp_path / "run"),
           "train.steps=20", "train.sample_tokens=0", "debug.inject_hang_rank=1", "debug.inject_hang_step=3",
           "parallel.hang_timeout_s=5", "model.n_layer=1", "model.d_model=32", "model.n_head=2",
           "model.seq_len=32", "data.name=pystdlib", "data.max_chars=200000",
           f"data.cache_dir={tmp_path / 'cache'}"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    elapsed = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == HANG_EXIT_CODE, out
    assert "Rank 0 waits in all_reduce #" in out and "on group dp (ranks 0, 1)" in out, out
    assert "(step 3); rank 1 never entered it" in out, out
    assert "Rank 1 (" in out and "is at step 3, in no collective" in out, out
    assert "in inject_hang" in out, out  # rank 1's own stack
    assert out.count("gigatrain: error: collective hang") == 1, out
    assert "Traceback" not in out, out
    assert elapsed < 60, elapsed  # start-up, two steps, 5 s of waiting and the diagnosis
    assert "rank 1 never entered it" in (tmp_path / "run" / "error-rank1.log").read_text()
