"""Point-to-point messages between processes of one host, through shared memory.

gloo moves every message through a TCP socket and a transport thread of its own. On a CPU host
that thread competes with the training processes for the cores, and a pipeline step pays for
it on every message: 0.2-0.5 ms of host time per 128-512 KB message on a 2-core machine while
both ranks compute, against 0.03-0.05 ms when the machine is idle (``docs/benchmarks.md``).
``LocalP2P`` carries the same messages with no thread and no socket:

- each ordered pair of neighbouring group members (src -> dst) has a ring of shared memory (a
  file under ``/dev/shm``, reserved at set-up so that a full ``/dev/shm`` fails there, not with
  SIGBUS in the middle of a step) and a named pipe;
- a send copies the tensor into the sender's ring and writes a 24-byte record (offset, size,
  kind) to the pipe; it is complete when posted, so the sender never waits;
- a receive reads the next record (blocking in ``poll`` until it arrives), copies the bytes
  into its buffer and publishes how far it has consumed, which frees ring space for the sender;
  once everything is read, the sender starts again at the ring's beginning, so only the pages
  that the messages in flight need are touched;
- a message that does not fit in the ring's free space goes through a file of its own, which
  the receiver deletes after reading.

Messages of a pair arrive in the order they were sent, as with gloo. A receive whose peer has
exited (the pipe's write end closed) fails at once with the peer's rank instead of waiting for
the collective timeout; a receive that waits longer than ``timeout_s`` fails too. The files are
unlinked as soon as both sides have opened them, so nothing is left behind, even after a crash
(except an overflow file that its receiver never read: ``close`` removes those; a crash does not).

Set up collectively by ``Comm.use_local_p2p`` (``LocalP2P.open``); used only for CPU tensors,
when every member of the group runs on the same host (same hostname and boot id).
"""
from __future__ import annotations

import array
import ctypes
import fcntl
import glob
import mmap
import os
import select
import socket
import struct
import termios
import threading
import time
import uuid

import torch
import torch.distributed as dist

__all__ = ["LocalP2P", "host_id", "shm_dir"]

_REC = struct.Struct("<qqq")     # absolute ring position (or overflow file number), nbytes, kind
_IN_RING, _IN_FILE = 0, 1
_CTRL = 64                       # bytes at the start of a ring: the receiver's consumed position
_ALIGN = 64


def host_id() -> str:
    """Hostname and boot id: equal for two processes exactly when they share memory."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def shm_dir() -> str | None:
    """Where the rings live: ``/dev/shm`` (memory-backed), or None where it does not exist."""
    d = "/dev/shm"
    return d if os.path.isdir(d) and os.access(d, os.W_OK) else None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Done:
    """A send: complete when posted."""

    __slots__ = ()

    def wait(self, *args, **kwargs):
        return True

    def is_completed(self) -> bool:
        return True


_DONE = _Done()


class _RecvWork:
    """A posted receive. Only the thread that posted it fills it (in ``wait``, or in
    ``is_completed`` when that thread asks); another thread asking ``is_completed`` (the hang
    watchdog's) learns whether the message has arrived without taking it."""

    __slots__ = ("chan", "buf", "done", "owner")

    def __init__(self, chan: "_InChannel", buf: torch.Tensor):
        self.chan, self.buf, self.done = chan, buf, False
        self.owner = threading.get_ident()

    def wait(self, *args, **kwargs):
        while not self.done:
            self.chan.progress(block=True)
        return True

    def is_completed(self) -> bool:
        if self.done:
            return True
        if threading.get_ident() != self.owner:
            return self.chan.arrived(self)
        self.chan.progress(block=False)
        return self.done


class _Ring:
    def __init__(self, path: str, nbytes: int, create: bool):
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                # Reserve the pages now: a write into a sparse file on a full /dev/shm would kill
                # the process with SIGBUS, where this fails cleanly (and the group stays on gloo).
                os.posix_fallocate(fd, 0, _CTRL + nbytes)
            self.mm = mmap.mmap(fd, _CTRL + nbytes)
        finally:
            os.close(fd)
        # Raw addresses: a message is one memmove, without the cost of slicing tensors. The
        # consumed position is one aligned 8-byte word, written by the receiver only.
        self.consumed = ctypes.c_int64.from_buffer(self.mm, 0)
        self.data = ctypes.addressof(ctypes.c_char.from_buffer(self.mm, _CTRL))
        self.cap = nbytes


class _OutChannel:
    """This rank's sends to one peer."""

    def __init__(self, ring: _Ring, fd: int, prefix: str):
        self.ring, self.fd, self.prefix = ring, fd, prefix
        self.head = 0            # absolute position after the last message placed in the ring
        self.floor = 0           # below it everything is consumed, or padding
        self.overflow = 0

    def __del__(self):          # a runtime dropped without close(): its pipe is closed all the same
        self.close()

    def send(self, t: torch.Tensor) -> None:
        if not t.is_contiguous():
            t = t.contiguous()
        n = _nbytes(t)
        ring = self.ring
        size = (n + _ALIGN - 1) // _ALIGN * _ALIGN
        consumed = max(ring.consumed.value, self.floor)
        if consumed == self.head and self.head % ring.cap:
            # All read: start again at the ring's beginning, so that only as many pages as the
            # messages in flight ever need are touched.
            self.head = self.floor = consumed = self.head + ring.cap - self.head % ring.cap
        pos = self.head
        if pos % ring.cap + size > ring.cap:           # no wrapping inside a message
            pos += ring.cap - pos % ring.cap
        if size <= ring.cap and pos + size - consumed <= ring.cap:
            ctypes.memmove(ring.data + pos % ring.cap, t.data_ptr(), n)
            self.head = pos + size
            rec = _REC.pack(pos, n, _IN_RING)
        else:
            self.overflow += 1
            path = f"{self.prefix}.{self.overflow}"
            with open(path, "wb") as f:
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            rec = _REC.pack(self.overflow, n, _IN_FILE)
        os.write(self.fd, rec)                         # < PIPE_BUF: atomic, in order

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            os.close(self.fd)
        except OSError:
            pass
        self.fd = -1
        if self.overflow:                              # files the receiver never read
            _unlink(glob.glob(glob.escape(self.prefix) + ".*"))


class _InChannel:
    """This rank's receives from one peer: posted receives are filled in order."""

    def __init__(self, ring: _Ring, fd: int, prefix: str, peer: int, timeout_s: float):
        self.ring, self.fd, self.prefix, self.peer, self.timeout_s = ring, fd, prefix, peer, timeout_s
        self.posted: list[_RecvWork] = []
        self.poller = select.poll()
        self.poller.register(fd, select.POLLIN)

    def __del__(self):
        self.close()

    def post(self, buf: torch.Tensor) -> _RecvWork:
        if not buf.is_contiguous():
            raise ValueError("a receive buffer must be contiguous")
        w = _RecvWork(self, buf)
        self.posted.append(w)
        return w

    def progress(self, block: bool) -> None:
        """Deliver the next message, if one has arrived (waiting for it when ``block``)."""
        if block:
            deadline = time.monotonic() + self.timeout_s
            while not self.poller.poll(1000):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no message from rank {self.peer} in {self.timeout_s:g} s "
                                       "(shared-memory point-to-point)")
        try:
            rec = os.read(self.fd, _REC.size)
        except BlockingIOError:
            return                      # nothing yet
        if not rec:
            raise RuntimeError(f"rank {self.peer} exited while this rank waited for its message "
                               "(shared-memory point-to-point)")
        if len(rec) != _REC.size:
            raise RuntimeError(f"corrupt message record from rank {self.peer}")
        pos, n, kind = _REC.unpack(rec)
        if not self.posted:
            raise RuntimeError(f"message from rank {self.peer} arrived with no receive posted")
        w = self.posted.pop(0)
        want = _nbytes(w.buf)
        if want != n:
            raise RuntimeError(f"message from rank {self.peer} has {n} bytes, the posted receive "
                               f"{want} (shape {tuple(w.buf.shape)}, {w.buf.dtype})")
        if kind == _IN_RING:
            ctypes.memmove(w.buf.data_ptr(), self.ring.data + pos % self.ring.cap, n)
            self.ring.consumed.value = pos + (n + _ALIGN - 1) // _ALIGN * _ALIGN
        else:
            path = f"{self.prefix}.{pos}"
            with open(path, "rb") as f:
                f.readinto(memoryview(w.buf.reshape(-1).view(torch.uint8).numpy()))
            os.unlink(path)
        w.done = True

    def arrived(self, w: _RecvWork) -> bool:
        """Whether ``w``'s message is here (filled or not), without taking anything: the records
        waiting in the pipe belong to the posted receives in order."""
        try:
            k = self.posted.index(w)
        except ValueError:
            return w.done
        n = array.array("i", [0])
        try:
            fcntl.ioctl(self.fd, termios.FIONREAD, n, True)
        except OSError:
            return False
        return k < n[0] // _REC.size

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            os.close(self.fd)
        except OSError:
            pass
        self.fd = -1


def _unlink(paths: list[str]) -> None:
    while paths:
        try:
            os.unlink(paths.pop())
        except OSError:
            pass


class LocalP2P:
    """Shared-memory channels between neighbours of a group (see the module doc).

    Each member is connected both ways to the members before and after it in the group's order,
    cyclically: the pairs a pipeline uses (stage to stage, the last rank back to the first for
    interleaved schedules and tied weights). ``connects(peer)`` says whether a peer is one of
    them; messages to others stay on the backend. Build it with ``LocalP2P.open``.
    """

    def __init__(self, out: dict, inc: dict):
        self._out: dict[int, _OutChannel] = out
        self._in: dict[int, _InChannel] = inc

    @classmethod
    def open(cls, group, ranks, me: int, *, ring_bytes: int = 16 << 20,
             timeout_s: float = 600.0) -> "LocalP2P | None":
        """Collective over ``group`` (``ranks``: its global ranks; ``me``: this process's). Returns
        None on every member when they do not all run on one host, or when any of them could not
        set its channels up (no /dev/shm, or no room there for the rings: ``ring_bytes`` per
        channel), so all stay on the backend."""
        n = len(ranks)
        i = ranks.index(me)
        peers = sorted({ranks[(i - 1) % n], ranks[(i + 1) % n]} - {me})
        # One exchange: every member's host (shared memory needs one host), and the first
        # member's name for this group's files.
        seen = [None] * n
        dist.all_gather_object(seen, (host_id(), uuid.uuid4().hex[:16]), group=group)
        if len({h for h, _ in seen}) != 1:
            return None
        d = shm_dir()
        base = os.path.join(d or "", f"gigatrain-p2p-{seen[0][1]}")
        out: dict[int, _OutChannel] = {}
        inc: dict[int, _InChannel] = {}
        made: list[str] = []
        error = None
        try:
            if d is None:
                raise OSError("no writable /dev/shm")
            for src in peers:                          # this rank receives: it creates
                name = f"{base}-{src}-{me}"
                made += [name + ".pipe", name + ".ring"]
                os.mkfifo(name + ".pipe", 0o600)
                fd = os.open(name + ".pipe", os.O_RDONLY | os.O_NONBLOCK)
                inc[src] = _InChannel(_Ring(name + ".ring", ring_bytes, create=True), fd, name + ".msg",
                                      src, timeout_s)
        except OSError as e:
            error = f"{type(e).__name__}: {e}"
        errors = [None] * n
        dist.all_gather_object(errors, error, group=group)
        try:
            if any(errors):
                for c in list(inc.values()):
                    c.close()
                return None
            for dst in peers:                          # this rank sends: it opens
                name = f"{base}-{me}-{dst}"
                fd = os.open(name + ".pipe", os.O_WRONLY)
                out[dst] = _OutChannel(_Ring(name + ".ring", ring_bytes, create=False), fd, name + ".msg")
            dist.barrier(group=group)
            _unlink(made)                              # both sides hold them open: unlink now
            dist.barrier(group=group)                  # so none is left when any rank returns
        finally:
            _unlink(made)
        return cls(out, inc)

    def connects(self, peer: int) -> bool:
        return peer in self._out

    def send(self, t: torch.Tensor, peer: int):
        self._out[peer].send(t)
        return _DONE

    def recv(self, buf: torch.Tensor, peer: int):
        return self._in[peer].post(buf)

    def close(self) -> None:
        for c in list(self._out.values()) + list(self._in.values()):
            c.close()
        self._out.clear()
        self._in.clear()
