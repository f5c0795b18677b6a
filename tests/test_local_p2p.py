"""Shared-memory point-to-point messages (ladder 3: real processes), against gloo's as the oracle."""
import glob
import os

import pytest
import torch
import torch.distributed as dist

from gigatrain.distributed.comm import Comm
from gigatrain.distributed.local_p2p import shm_dir
from gigatrain.distributed.spawn import spawn

pytestmark = pytest.mark.skipif(shm_dir() is None, reason="no /dev/shm")


def _messages(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.float64]
    out = []
    for i in range(n):
        shape = tuple(int(s) for s in torch.randint(1, 40, (1 + i % 3,), generator=g))
        dt = dtypes[i % len(dtypes)]
        t = torch.randn(shape, generator=g).to(dt) if dt is not torch.bool else torch.rand(shape, generator=g) > 0.5
        out.append(t)
    return out


def _in_thread(fn):
    import threading
    t = threading.Thread(target=fn)
    t.start()
    t.join()


def _exchange(rank, world, ring_bytes):
    """Every rank streams messages to every other, receives posted ahead and waited for out of
    order; every message must arrive intact and in order. Neighbours (cyclically) talk through
    shared memory, through a ring small enough that messages wrap, restart at its beginning and
    take the overflow path; the others (0 <-> 2 at 4 ranks) through gloo. Returns what the
    transport left on disk and the bytes counted as sent."""
    comm = Comm(dist.group.WORLD, "pp")
    assert comm.use_local_p2p(ring_bytes=ring_bytes)
    local = comm._local
    assert {p for p in range(world) if local.connects(p)} == {(rank - 1) % world, (rank + 1) % world}
    token_files = glob.glob(os.path.join(shm_dir(), "gigatrain-p2p-*"))
    comm.barrier()                             # every rank has looked before anyone sends
    peers = [p for p in range(world) if p != rank]
    mine = {p: _messages(100 * rank + p, 30) for p in peers}
    theirs = {p: _messages(100 * p + rank, 30) for p in peers}
    got = {p: [] for p in peers}
    for lo in range(0, 30, 5):
        bufs = [(torch.empty_like(t), p) for p in peers for t in theirs[p][lo:lo + 5]]
        works = comm.p2p_ops([(t, p) for p in peers for t in mine[p][lo:lo + 5]], bufs)
        for w in reversed(works):            # waiting out of order must still fill in order
            w.wait()
        for b, p in bufs:
            got[p].append(b)
    for p in peers:
        assert len(got[p]) == len(theirs[p])
        for a, b in zip(got[p], theirs[p]):
            assert a.dtype == b.dtype and torch.equal(a, b)
    assert comm.log.pending == {}
    sent = comm.stats.sent[("pp", "send")]
    # Another thread (the hang watchdog's) asking is_completed() learns that a message arrived
    # but does not take it: the posting thread's wait() still finds it.
    if rank in (0, 1):
        peer = 1 - rank
        buf = torch.zeros(3)
        w = comm.p2p_ops([], [(buf, peer)], count=False)[0]
        seen = []
        ask = lambda: seen.append(w.is_completed())   # noqa: E731
        _in_thread(ask)
        dist.barrier()
        comm.p2p_ops([(torch.full((3,), float(rank + 1)), peer)], [], count=False)[0].wait()
        dist.barrier()
        _in_thread(ask)
        assert seen == [False, True] and torch.equal(buf, torch.zeros(3))
        w.wait()
        assert torch.equal(buf, torch.full((3,), float(peer + 1)))
    else:
        dist.barrier()
        dist.barrier()
    comm.barrier()
    comm.close_local_p2p()
    return token_files, sent


@pytest.mark.parametrize("world", [2, 4])
def test_local_p2p_delivers_in_order(world):
    # A 4 KB ring: the larger messages (up to 40^3 x 8 bytes) go through overflow files.
    for rank, (files, sent) in enumerate(spawn(_exchange, world, 4096)):
        assert files == []                     # unlinked once both sides had opened them
        assert sent == sum(t.numel() * t.element_size() for p in range(world) if p != rank
                           for t in _messages(100 * rank + p, 30))
    assert glob.glob(os.path.join(shm_dir(), "gigatrain-p2p-*")) == []


def _peer_exits(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    comm = Comm(dist.group.WORLD, "pp")
    assert comm.use_local_p2p()
    if rank == 1:
        os._exit(0)                            # dies without sending
    try:
        comm.p2p_ops([], [(torch.empty(4), 1)])[0].wait()
        msg = "no error"
    except RuntimeError as e:
        msg = str(e)
    with open(out, "w") as f:
        f.write(msg)
    os._exit(0)                                # no teardown: the group has lost a member


def test_local_p2p_reports_a_dead_peer(tmp_path):
    import torch.multiprocessing as mp
    from gigatrain.distributed.launch import free_port
    out = str(tmp_path / "msg")
    mp.spawn(_peer_exits, args=(2, free_port(), out), nprocs=2, join=True)
    assert open(out).read() == ("rank 1 exited while this rank waited for its message "
                                "(shared-memory point-to-point)")
