"""NVMe offload: master weights and optimizer states of a flat fp32 shard, kept in files.

A ZeRO rank owns a flat shard of the model (``numel`` fp32 values). With ``offload="nvme"`` the
fp32 master copy of that shard and every optimizer state (Adam's two moments, SGD's momentum)
live in one file each under ``offload_dir``; host memory holds only a few chunk-sized staging
buffers. One optimizer step streams the files through those buffers:

    read chunk k+1   (I/O threads)
    update chunk k   (this thread: the optimizer's arithmetic, then the new weights go to
                      ``params_out``, e.g. the device copy of the shard in low precision)
    write chunk k-1  (I/O threads)

so disk reads and writes overlap the arithmetic. The update itself is the exact arithmetic of
torch's AdamW / Adam / SGD (the probe optimizer built by the configured factory tells which one
and with what hyper-parameters), so losses match a run whose optimizer state sits in memory.

Nothing here knows about ZeRO stages: a stage 1, 2 or 3 strategy hands ``step`` its flat gradient
shard and a flat output for the updated weights. Disk space is checked (and reserved) before
training starts; the files are removed by ``close()``, or when the object is garbage collected or
the interpreter exits. A killed process cannot remove them: each folder records its owner process,
and the next ``NVMeOptimizer`` on the same ``offload_dir`` removes the folders of dead owners on its
host before checking the free space. The page cache is not bypassed (no O_DIRECT), so on a host
with free memory the kernel may keep recently used chunks in RAM; that changes speed, not what the
process holds.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn

from ...rundir import OWNER_FILE, sweep_stale, write_owner

__all__ = ["GroupHyper", "OptimizerSpec", "NVMeOptimizer", "required_bytes"]

_F32 = 4  # bytes per stored value: everything in the files is fp32


@dataclass(frozen=True)
class GroupHyper:
    """Hyper-parameters of one parameter group, as the configured torch optimizer holds them."""

    lr: float
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False


@dataclass(frozen=True)
class OptimizerSpec:
    """Which update rule to run ("adamw", "adam" or "sgd") and each group's hyper-parameters."""

    kind: str
    groups: tuple[GroupHyper, ...]

    @property
    def state_keys(self) -> tuple[str, ...]:
        """Per-element state arrays, named as torch's optimizers name them."""
        if self.kind in ("adamw", "adam"):
            return ("exp_avg", "exp_avg_sq")
        if any(g.momentum != 0 for g in self.groups):
            return ("momentum_buffer",)
        return ()

    @classmethod
    def from_optimizer(cls, opt: torch.optim.Optimizer) -> "OptimizerSpec":
        """Read the update rule and hyper-parameters from a built torch optimizer."""
        d = opt.defaults
        if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
            if d.get("amsgrad") or d.get("maximize"):
                raise ValueError("nvme offload does not support Adam(W) with amsgrad or maximize; "
                                 "turn them off or use offload=cpu/none.")
            kind = "adamw" if (isinstance(opt, torch.optim.AdamW)
                               or d.get("decoupled_weight_decay")) else "adam"
            groups = tuple(GroupHyper(lr=float(g["lr"]), weight_decay=float(g["weight_decay"]),
                                      betas=(float(g["betas"][0]), float(g["betas"][1])),
                                      eps=float(g["eps"])) for g in opt.param_groups)
        elif isinstance(opt, torch.optim.SGD):
            if d.get("maximize"):
                raise ValueError("nvme offload does not support SGD(maximize=True).")
            kind = "sgd"
            groups = tuple(GroupHyper(lr=float(g["lr"]), weight_decay=float(g["weight_decay"]),
                                      momentum=float(g["momentum"]), dampening=float(g["dampening"]),
                                      nesterov=bool(g["nesterov"])) for g in opt.param_groups)
        else:
            raise ValueError(f"nvme offload runs AdamW, Adam and SGD updates from files; the configured "
                             f"optimizer is {type(opt).__name__}. Use offload=cpu or none for it.")
        return cls(kind, groups)

    @classmethod
    def from_factory(cls, factory: Callable[[list[dict]], torch.optim.Optimizer],
                     decay_flags: Sequence[bool] = (True, False)) -> "OptimizerSpec":
        """Build the configured optimizer over tiny placeholder groups (one per entry of
        ``decay_flags``) and read its rule and hyper-parameters, so group ``i`` of the spec has
        exactly the settings the factory gives a group with ``decay=decay_flags[i]``."""
        probe = factory([{"params": [nn.Parameter(torch.zeros(1))], "decay": bool(f)}
                         for f in decay_flags])
        if len(probe.param_groups) != len(decay_flags):
            raise ValueError("the optimizer factory must keep one param group per group it is given")
        return cls.from_optimizer(probe)


def required_bytes(numel: int, spec: OptimizerSpec) -> int:
    """Disk bytes one shard of ``numel`` values needs: fp32 master + each state array."""
    return int(numel) * _F32 * (1 + len(spec.state_keys))


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _space_error(need: int, free: int, where: Path, numel: int, keys: Sequence[str]) -> ValueError:
    arrays = ", ".join(("master weights",) + tuple(keys))
    return ValueError(
        f"NVMe offload needs {_fmt(need)} of disk in {where} for this rank ({numel:,} fp32 values x "
        f"{1 + len(keys)} arrays: {arrays}), but only {_fmt(free)} is free there. Point "
        f"parallel.offload_dir at a disk with more free space, spread the shard over more ranks "
        f"(a larger parallel.dp makes each shard smaller), or use parallel.offload=cpu.")


def _pread_into(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, f"short read from offload file at byte {offset + done}")
        done += n


def _pwrite_from(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        n = os.pwritev(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, f"short write to offload file at byte {offset + done}")
        done += n


def _cleanup(fds: list[int], files: list[Path], folder: Path, pool: ThreadPoolExecutor) -> None:
    pool.shutdown(wait=True)
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()
    for f in files:
        try:
            f.unlink()
        except FileNotFoundError:
            pass
    try:
        (folder / OWNER_FILE).unlink()
    except FileNotFoundError:
        pass
    try:
        folder.rmdir()
    except OSError:
        pass


class NVMeOptimizer:
    """The optimizer of one flat fp32 shard whose master weights and states live on disk.

    Args:
        numel: number of values in the shard.
        spec: update rule and per-group hyper-parameters (``OptimizerSpec.from_factory``).
        offload_dir: folder for the files (created if needed); each instance makes its own
            sub-folder, removed again by ``close()``.
        segments: ``(start, end, group)`` ranges of the shard and the spec group they belong to
            (e.g. decay / no-decay); values outside every segment use group 0.
        chunk_mb: size of one chunk of one array; the host holds about 3 x (1 + #states) + 1 of
            them while stepping.
        io_workers: threads doing the reads and writes.
        pin_memory: stage through pinned host buffers (speeds up copies to and from a GPU).
        name: a label for the sub-folder (e.g. "rank3").

    ``param_groups`` mirrors torch's (a list of dicts with "lr", "weight_decay"): set ``lr`` there
    before ``step`` exactly as with a torch optimizer. ``steps`` counts the updates taken (Adam's
    bias correction uses it, and SGD starts its momentum from the first gradient); set it when
    loading saved states. Raises ``ValueError`` before writing anything when the disk lacks
    the space (see ``required_bytes``).
    """

    def __init__(self, numel: int, spec: OptimizerSpec, offload_dir: str | os.PathLike, *,
                 segments: Sequence[tuple[int, int, int]] | None = None, chunk_mb: float = 32.0,
                 io_workers: int = 4, pin_memory: bool = False, name: str = "shard"):
        if offload_dir is None:
            raise ValueError("offload='nvme' needs offload_dir: a folder on a fast local disk "
                             "(parallel.offload_dir).")
        self.numel = int(numel)
        self.spec = spec
        self.state_keys = spec.state_keys
        self.keys = ("master",) + self.state_keys
        self.steps = 0
        self.param_groups = [{"lr": g.lr, "weight_decay": g.weight_decay} for g in spec.groups]
        segs = sorted((int(a), int(b), int(g)) for a, b, g in (segments or [(0, self.numel, 0)]) if b > a)
        self.segments = segs

        root = Path(offload_dir)
        root.mkdir(parents=True, exist_ok=True)
        # Folders of killed runs would otherwise count against the space check below.
        sweep_stale(root, "gigatrain-nvme-*")
        need = required_bytes(self.numel, spec)
        free = shutil.disk_usage(root).free
        if need > free:
            raise _space_error(need, free, root, self.numel, self.state_keys)
        self.folder = Path(tempfile.mkdtemp(prefix=f"gigatrain-nvme-{name}-", dir=root))
        write_owner(self.folder)
        self.files = [self.folder / f"{k}.f32" for k in self.keys]
        self._fds: list[int] = []
        self._pool = ThreadPoolExecutor(max_workers=max(1, io_workers), thread_name_prefix="nvme-io")
        self._finalizer = weakref.finalize(self, _cleanup, self._fds, self.files, self.folder, self._pool)
        try:
            for f in self.files:
                fd = os.open(f, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                self._fds.append(fd)
                self._reserve(fd, self.numel * _F32)
        except OSError as e:
            self.close()
            if e.errno == errno.ENOSPC:
                raise _space_error(need, shutil.disk_usage(root).free, root, self.numel,
                                   self.state_keys) from e
            raise

        self.chunk = max(1, min(self.numel, int(chunk_mb * 2**20) // _F32))
        pin = pin_memory and torch.cuda.is_available()
        # Three slots (reading k+1, updating k, writing k-1), each with one buffer per file.
        self._slots = [[torch.empty(self.chunk, dtype=torch.float32, pin_memory=pin) for _ in self.keys]
                       for _ in range(3)]
        self._grad_buf = torch.empty(self.chunk, dtype=torch.float32, pin_memory=pin)

    @staticmethod
    def _reserve(fd: int, nbytes: int) -> None:
        if nbytes == 0:
            return
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            os.ftruncate(fd, nbytes)  # file systems without fallocate: a sparse file
        except AttributeError:  # pragma: no cover - platforms without posix_fallocate
            os.ftruncate(fd, nbytes)

    # -- whole-array access (initialisation and checkpoints) --------------------------------------
    def _fd(self, key: str) -> int:
        if not self._fds:
            raise RuntimeError("this NVMeOptimizer is closed")
        try:
            return self._fds[self.keys.index(key)]
        except ValueError:
            raise KeyError(f"no offloaded array {key!r}; have {self.keys}") from None

    def write(self, key: str, values: torch.Tensor, offset: int = 0) -> None:
        """Store ``values`` (any dtype/device, flattened) into array ``key`` from ``offset``."""
        src = values.detach().reshape(-1).to("cpu", torch.float32).contiguous()
        if offset < 0 or offset + src.numel() > self.numel:
            raise ValueError(f"write of {src.numel()} values at {offset} exceeds the shard ({self.numel})")
        _pwrite_from(self._fd(key), memoryview(src.numpy()).cast("B"), offset * _F32)

    def read(self, key: str, offset: int = 0, numel: int | None = None) -> torch.Tensor:
        """Array ``key`` (or ``numel`` values of it from ``offset``) as a new fp32 CPU tensor."""
        numel = self.numel - offset if numel is None else int(numel)
        out = torch.empty(numel, dtype=torch.float32)
        _pread_into(self._fd(key), memoryview(out.numpy()).cast("B"), offset * _F32)
        return out

    # -- the streamed update ------------------------------------------------------------------
    def _io(self, write: bool, slot: int, start: int, n: int) -> list[Future]:
        fn = _pwrite_from if write else _pread_into
        futs = []
        for fd, buf in zip(self._fds, self._slots[slot]):
            mv = memoryview(buf[:n].numpy()).cast("B")
            futs.append(self._pool.submit(fn, fd, mv, start * _F32))
        return futs

    @torch.no_grad()
    def step(self, grads: torch.Tensor, params_out: torch.Tensor | None = None, *,
             grad_coef: float = 1.0) -> None:
        """One optimizer update of the whole shard.

        ``grads``: flat gradient shard (``numel`` values, any dtype and device), multiplied by
        ``grad_coef`` (loss-scale removal and clipping) in fp32 before use. ``params_out``: flat
        tensor (any dtype and device) that receives the updated weights, or None.
        """
        if grads.numel() != self.numel or (params_out is not None and params_out.numel() != self.numel):
            raise ValueError(f"step needs flat tensors of {self.numel} values")
        grads = grads.reshape(-1)
        out = params_out.reshape(-1) if params_out is not None else None
        self.steps += 1
        starts = list(range(0, self.numel, self.chunk))
        reads: dict[int, list[Future]] = {}
        writes: dict[int, list[Future]] = {}

        def launch_read(k: int) -> None:
            if k - 3 in writes:  # the slot's previous chunk must be on disk before reuse
                for f in writes.pop(k - 3):
                    f.result()
            s = starts[k]
            reads[k] = self._io(False, k % 3, s, min(self.chunk, self.numel - s))

        try:
            if starts:
                launch_read(0)
            for k, s in enumerate(starts):
                n = min(self.chunk, self.numel - s)
                if k + 1 < len(starts):
                    launch_read(k + 1)
                for f in reads.pop(k):
                    f.result()
                bufs = [b[:n] for b in self._slots[k % 3]]
                g = self._grad_buf[:n]
                g.copy_(grads[s:s + n])
                if grad_coef != 1.0:
                    g.mul_(grad_coef)
                self._update(s, n, bufs, g)
                if out is not None:
                    out[s:s + n].copy_(bufs[0])
                writes[k] = self._io(True, k % 3, s, n)
            for futs in writes.values():
                for f in futs:
                    f.result()
        finally:
            for futs in list(reads.values()) + list(writes.values()):
                for f in futs:
                    f.exception()  # wait: never leave I/O running into buffers we reuse

    def _pieces(self, start: int, n: int):
        """(local start, local end, group) pieces of chunk [start, start+n) by segment."""
        end = start + n
        pos = start
        for a, b, grp in self.segments:
            if b <= pos or a >= end:
                continue
            if a > pos:
                yield pos - start, a - start, 0
            lo, hi = max(a, pos), min(b, end)
            yield lo - start, hi - start, grp
            pos = hi
        if pos < end:
            yield pos - start, end - start, 0

    def _update(self, start: int, n: int, bufs: list[torch.Tensor], g: torch.Tensor) -> None:
        kind = self.spec.kind
        for lo, hi, grp in self._pieces(start, n):
            h = self.spec.groups[grp]
            lr = float(self.param_groups[grp]["lr"])
            wd = float(self.param_groups[grp].get("weight_decay", h.weight_decay))
            p = bufs[0][lo:hi]
            gr = g[lo:hi]
            if kind in ("adamw", "adam"):
                self._adam(p, gr, bufs[1][lo:hi], bufs[2][lo:hi], h, lr, wd, kind == "adamw")
            else:
                buf = bufs[1][lo:hi] if self.state_keys else None
                self._sgd(p, gr, buf, h, lr, wd)

    def _adam(self, p, g, m, v, h: GroupHyper, lr: float, wd: float, decoupled: bool) -> None:
        # The same operations, in the same order, as torch's multi-tensor Adam/AdamW.
        b1, b2 = h.betas
        if wd != 0:
            if decoupled:
                p.mul_(1 - lr * wd)
            else:
                g = g.add(p, alpha=wd)
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        bc1 = 1 - b1 ** self.steps
        bc2 = 1 - b2 ** self.steps
        step_size = (lr / bc1) * -1
        denom = v.sqrt().div_(bc2 ** 0.5).add_(h.eps)
        p.addcdiv_(m, denom, value=step_size)

    def _sgd(self, p, g, buf, h: GroupHyper, lr: float, wd: float) -> None:
        # torch's single-tensor SGD, step for step.
        if wd != 0:
            g = g.add(p, alpha=wd)
        if h.momentum != 0:
            if self.steps == 1:  # torch starts the buffer from the first gradient
                buf.copy_(g)
            else:
                buf.mul_(h.momentum).add_(g, alpha=1 - h.dampening)
            g = g.add(buf, alpha=h.momentum) if h.nesterov else buf
        p.add_(g, alpha=-lr)

    def close(self) -> None:
        """Close and delete the files (idempotent)."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive
