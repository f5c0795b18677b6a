"""Sharded checkpoints: every rank writes its own pieces; a rank loading reads only its slices.

A checkpoint directory (format ``gigatrain-checkpoint-v2``)::

    step_000010/
      shards/rank<R>.safetensors   rank R's pieces, one 1-D fp32 tensor each
      shards/rank<R>.json          their descriptions (merged into index.json, kept for inspection)
      index.json                   every tensor: global shape, dtype, and its pieces
      rng_rank<R>.safetensors      each rank's RNG state
      meta.json                    step, config, loss scaler; written last

A *tensor* is ``param/<name>`` (a parameter or a persistent buffer, fp32) or
``optim/<name>/<key>`` (a per-element optimizer state of parameter ``<name>``); scalar optimizer
states (Adam's ``step``) are numbers in the index. A *piece* is what one rank holds of a tensor:
its tensor-parallel slice (``box``: ``[dim, start, length]`` of the global tensor, or null for the
whole tensor) and a range ``[a, b)`` of that slice's flattened elements (a ZeRO shard, or the
whole slice). No rank ever assembles a whole tensor to save it, and a rank loading into any
layout reads, with safetensors' slice reads, only the elements it will hold.

The files are written by a streaming writer (header, then each tensor's bytes straight from its
storage): safetensors' own ``save_file`` first copies every tensor into Python bytes, which
would double a rank's memory at the moment it is largest. Nothing is ever unpickled.

Atomicity is the checkpoint's as a whole: everything is written into a temporary folder that
rank 0 renames into place once every rank's pieces are on disk and finite, and only then points
``latest`` at it. With ``async_save`` the pieces are copied to host memory (checked finite
there, with one all-reduce) and the files are written by a background thread while training
goes on; ranks signal completion through marker files, and rank 0's thread publishes.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist

FORMAT = "gigatrain-checkpoint-v2"
INDEX = "index.json"
SHARDS = "shards"
_DT = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
       torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}

Box = tuple[int, int, int] | None     # (dim, start, length) of the global tensor; None: all of it


@dataclass
class SavedPiece:
    """One tensor piece a rank writes: ``tid`` (``param/<name>`` or ``optim/<name>/<key>``), the
    global shape, the tensor-parallel ``box``, the range ``[start, end)`` of the box's flattened
    elements, and ``data()`` producing those elements (1-D, CPU)."""

    tid: str
    shape: tuple[int, ...]
    box: Box
    start: int
    end: int
    data: Callable[[], torch.Tensor]


# -- the streaming safetensors writer ----------------------------------------------------------------
def write_safetensors(path: Path, items: Sequence[tuple[str, torch.dtype, Sequence[int], Callable[[], torch.Tensor]]],
                      check_finite: bool = True, metadata: dict[str, str] | None = None) -> str | None:
    """Write tensors ``(key, dtype, shape, data)`` to ``path`` in the safetensors format, one at
    a time from their storage (``data()`` is called when its turn comes); returns the key of the
    first tensor holding NaN or inf (when ``check_finite``), else None."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    off = 0
    for key, dtype, shape, _ in items:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": _DT[dtype], "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    bad = None
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, dtype, shape, data in items:
            t = data().detach().reshape(-1).to("cpu", dtype).contiguous()
            n = math.prod(shape)
            if t.numel() != n:
                raise ValueError(f"{key}: {t.numel()} elements, {n} announced")
            if check_finite and bad is None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = key
            if n:
                f.write(memoryview(t.view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
    return bad


# -- geometry: which elements of a saved piece a loading rank needs -------------------------------------
def _rows(shape: Sequence[int], box: Box, other: Box) -> tuple[int, int, int, int, int]:
    """(outer rows, dim size, inner, box start, box length) of ``box`` over ``shape``; a whole
    tensor is seen along ``other``'s dimension (or as one row)."""
    dim = box[0] if box is not None else other[0] if other is not None else None
    if dim is None or len(shape) == 0:
        n = math.prod(shape)
        return 1, n, 1, 0, n
    outer, inner = math.prod(shape[:dim]), math.prod(shape[dim + 1:])
    size = shape[dim]
    start, length = (box[1], box[2]) if box is not None else (0, size)
    return outer, size, inner, start, length


def overlap_runs(shape: Sequence[int], dst_box: Box, dst: tuple[int, int], src_box: Box,
                 src: tuple[int, int]) -> list[tuple[int, int, int]]:
    """Where a saved piece (``src_box``, elements ``src`` of its flattened box) meets a wanted
    one (``dst_box``, ``dst``): ``(offset in the wanted range, offset in the saved range,
    length)`` runs, merged where both sides are contiguous. Boxes cut the same dimension (a
    tensor's parallel plan fixes it), or one of them is the whole tensor."""
    if dst_box is not None and src_box is not None and dst_box[0] != src_box[0]:
        raise ValueError(f"slices along different dimensions ({dst_box[0]} and {src_box[0]}) of one tensor")
    o_d, size, inner, s_d, l_d = _rows(shape, dst_box, src_box)
    _, _, _, s_s, l_s = _rows(shape, src_box, dst_box)
    c0, c1 = max(s_d, s_s) * inner, min(s_d + l_d, s_s + l_s) * inner
    (a, b), (e, f) = dst, src
    if c0 >= c1 or a >= b or e >= f:
        return []
    row_d, row_s = l_d * inner, l_s * inner
    first = max(a // row_d, e // row_s)
    last = min((b - 1) // row_d, (f - 1) // row_s, o_d - 1)
    runs: list[list[int]] = []
    for i in range(first, last + 1):
        lo = max(c0, a - i * row_d + s_d * inner, e - i * row_s + s_s * inner)
        hi = min(c1, b - i * row_d + s_d * inner, f - i * row_s + s_s * inner)
        if lo >= hi:
            continue
        d_off, s_off, n = i * row_d + lo - s_d * inner - a, i * row_s + lo - s_s * inner - e, hi - lo
        if runs and runs[-1][0] + runs[-1][2] == d_off and runs[-1][1] + runs[-1][2] == s_off:
            runs[-1][2] += n
        else:
            runs.append([d_off, s_off, n])
    return [tuple(r) for r in runs]


# -- saving ------------------------------------------------------------------------------------------
@dataclass
class _Job:
    """One rank's part of a save: what to write, and (rank 0) how to publish."""

    tmp: Path
    final: Path
    root: Path
    rank: int
    world: int
    pieces: list[SavedPiece]
    scalars: dict[str, dict[str, float]]
    meta: dict
    keep: int
    rng: dict[str, torch.Tensor]
    error: BaseException | None = None
    bad: str | None = None


def _piece_key(p: SavedPiece) -> str:
    box = "" if p.box is None else f"@{p.box[0]}:{p.box[1]}+{p.box[2]}"
    return f"{p.tid}{box}[{p.start}:{p.end}]"


def _write_rank(job: _Job) -> str | None:
    from safetensors.torch import save_file

    shards = job.tmp / SHARDS
    name = f"rank{job.rank}"
    items = [(_piece_key(p), torch.float32, (p.end - p.start,), p.data) for p in job.pieces]
    bad = write_safetensors(shards / f"{name}.safetensors", items)
    desc = {"file": f"{SHARDS}/{name}.safetensors",
            "pieces": [{"tid": p.tid, "key": _piece_key(p), "shape": list(p.shape),
                        "box": None if p.box is None else list(p.box), "range": [p.start, p.end]}
                       for p in job.pieces],
            "scalars": job.scalars}
    _write_json(shards / f"{name}.json", desc)
    save_file(job.rng, str(job.tmp / f"rng_rank{job.rank}.safetensors"))
    return bad


def _publish(job: _Job) -> None:
    """Rank 0, once every rank's files are complete: the index, meta.json, the rename, ``latest``."""
    from .checkpoint import META, _write_atomic, list_checkpoints
    from .rundir import OWNER_FILE

    tensors: dict[str, dict] = {}
    scalars: dict[str, dict[str, float]] = {}
    for r in range(job.world):
        desc = json.loads((job.tmp / SHARDS / f"rank{r}.json").read_text())
        for pc in desc["pieces"]:
            t = tensors.setdefault(pc["tid"], {"shape": pc["shape"], "dtype": "float32", "pieces": []})
            t["pieces"].append({"file": desc["file"], "key": pc["key"], "box": pc["box"], "range": pc["range"]})
        for n, st in desc["scalars"].items():
            scalars.setdefault(n, {}).update(st)
    _write_json(job.tmp / INDEX, {"format": FORMAT, "tensors": tensors, "scalars": scalars})
    meta = dict(job.meta, step=int(job.final.name.split("_")[1]), time=time.time(), format=FORMAT, index=INDEX)
    (job.tmp / OWNER_FILE).unlink(missing_ok=True)
    _write_atomic(job.tmp / META, json.dumps(meta, indent=1, sort_keys=True))
    if job.final.exists():
        shutil.rmtree(job.final)
    os.replace(job.tmp, job.final)
    _write_atomic(job.root / "latest", job.final.name + "\n")
    step = meta["step"]
    if job.keep and job.keep > 0:
        older = [s for s in list_checkpoints(job.root) if s < step]
        for old in older[:max(0, len(older) - (job.keep - 1))]:
            shutil.rmtree(job.root / f"step_{old:06d}", ignore_errors=True)


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())


class AsyncSave:
    """A save whose files a background thread is writing (``checkpoint.async_save``)."""

    POLL_S = 0.05

    def __init__(self, job: _Job, timeout_s: float):
        self.job, self.timeout_s = job, timeout_s
        self.thread = threading.Thread(target=self._run, name=f"checkpoint-{job.final.name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        job = self.job
        try:
            _write_rank(job)
            (job.tmp / SHARDS / f"rank{job.rank}.done").touch()
            if job.rank == 0:
                deadline = time.monotonic() + self.timeout_s
                while not all((job.tmp / SHARDS / f"rank{r}.done").exists() for r in range(job.world)):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"checkpoint {job.final.name}: not every rank finished writing within "
                                           f"{self.timeout_s:.0f} s; the previous checkpoint stays the latest")
                    time.sleep(self.POLL_S)
                _publish(job)
        except BaseException as e:  # reported by wait(), on the training thread
            job.error = e

    def wait(self) -> Path:
        """Block until the files are written (and, on rank 0, published); re-raise a failure."""
        self.thread.join()
        if self.job.error is not None:
            raise RuntimeError(f"asynchronous save of {self.job.final.name} failed: {self.job.error}") from self.job.error
        return self.job.final


def save_sharded(root: str | Path, step: int, *, rank: int, world_comm, pieces: list[SavedPiece],
                 scalars: dict[str, dict[str, float]], meta: dict, device: torch.device, rng: dict,
                 keep: int = 0, async_save: bool = False, timeout_s: float = 600.0) -> Path | AsyncSave:
    """Write checkpoint ``step`` under ``root``; collective over ``world_comm``.

    Each rank writes ``pieces`` (its own, as decided by the caller: no two ranks write the same
    elements) and its scalar optimizer states, plus its RNG state. A checkpoint holding NaN or
    inf is never published: the ranks agree that every piece is finite, and otherwise all raise
    ``NonFiniteCheckpointError`` and the temporary folder is removed. Returns the checkpoint's
    path, or with ``async_save`` an ``AsyncSave`` to ``wait()`` on (before the next save, and
    before the process ends) once the pieces are safely copied to host memory.
    """
    from .checkpoint import NonFiniteCheckpointError
    from .rundir import write_owner

    root = Path(root)
    final, tmp = root / f"step_{step:06d}", root / f".tmp_step_{step:06d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / SHARDS).mkdir(parents=True)
        write_owner(tmp)
    world_comm.barrier()
    job = _Job(tmp, final, root, rank, world_comm.size, pieces, scalars, meta, keep, rng)
    if async_save:
        # A snapshot in host memory: training changes the live tensors from the next step on.
        job.pieces = [SavedPiece(p.tid, p.shape, p.box, p.start, p.end,
                                 lambda t=p.data().detach().to("cpu", torch.float32, copy=True): t) for p in pieces]
        bad = next((p.tid for p in job.pieces if not bool(torch.isfinite(p.data()).all())), None)
    else:
        bad = _write_rank(job)
    first_bad = world_comm.all_reduce_scalar(float(rank if bad else 2**31), op=dist.ReduceOp.MIN, device=device)
    if first_bad < 2**31:
        world_comm.barrier()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        where = f"{bad} on rank {rank}" if bad else f"the state saved by rank {int(first_bad)}"
        raise NonFiniteCheckpointError(
            f"checkpoint step {step} not written: {where} holds NaN or inf values, so training has "
            f"diverged; the previous checkpoints in {root} are untouched. Continue from the last good "
            f"one with resume=auto and a lower train.lr (or train.grad_clip set).")
    if async_save:
        return AsyncSave(job, timeout_s)
    if rank == 0:
        _publish(job)
    world_comm.barrier()
    return final


# -- loading -----------------------------------------------------------------------------------------
@dataclass
class ShardedReader:
    """Reads pieces of a v2 checkpoint: slices of its safetensors files, nothing more.
    ``bytes_read`` counts the tensor bytes requested (for tests and benchmarks)."""

    path: Path
    index: dict
    bytes_read: int = 0
    _files: dict = field(default_factory=dict)
    _keys: dict | None = None

    @classmethod
    def open(cls, path: str | Path) -> "ShardedReader":
        path = Path(path)
        index = json.loads((path / INDEX).read_text())
        if index.get("format") != FORMAT:
            raise ValueError(f"{path / INDEX}: unknown index format {index.get('format')!r}")
        return cls(path, index)

    def _file(self, name: str):
        from safetensors import safe_open

        if name not in self._files:
            self._files[name] = safe_open(str(self.path / name), framework="pt")
        return self._files[name]

    def has(self, tid: str) -> bool:
        return tid in self.index["tensors"]

    def shape(self, tid: str) -> tuple[int, ...]:
        return tuple(self.index["tensors"][tid]["shape"])

    def tensor_ids(self) -> list[str]:
        return list(self.index["tensors"])

    def scalar(self, name: str, key: str) -> float | None:
        return self.index["scalars"].get(name, {}).get(key)

    def state_keys(self, name: str) -> list[str]:
        """The per-element optimizer state keys saved for parameter ``name``."""
        if self._keys is None:
            self._keys = {}
            for tid in self.index["tensors"]:
                if tid.startswith("optim/"):
                    n, k = tid[len("optim/"):].rsplit("/", 1)
                    self._keys.setdefault(n, []).append(k)
        return sorted(self._keys.get(name, []))

    def read(self, tid: str, box: Box, start: int, end: int) -> torch.Tensor:
        """Elements ``[start, end)`` of ``box`` of tensor ``tid``, 1-D fp32; every element must
        be in some saved piece (``ValueError`` otherwise)."""
        entry = self.index["tensors"][tid]
        shape = entry["shape"]
        out = torch.empty(end - start, dtype=torch.float32)
        covered = 0
        for pc in entry["pieces"]:
            src_box = tuple(pc["box"]) if pc["box"] is not None else None
            runs = overlap_runs(shape, box, (start, end), src_box, tuple(pc["range"]))
            if not runs:
                continue
            sl = self._file(pc["file"]).get_slice(pc["key"])
            for d_off, s_off, n in runs:
                out[d_off:d_off + n] = sl[s_off:s_off + n]
                covered += n
                self.bytes_read += 4 * n
        if covered != end - start:
            raise ValueError(f"{self.path.name}: tensor {tid} is missing elements {start}..{end} of "
                             f"{'the whole tensor' if box is None else f'slice {box}'} (an incomplete checkpoint)")
        return out

    def whole(self, tid: str) -> torch.Tensor:
        """The whole tensor (tools and tests; the engine reads only its slices)."""
        shape = self.shape(tid)
        return self.read(tid, None, 0, math.prod(shape)).view(shape)

    def close(self) -> None:
        self._files.clear()


def is_sharded(path: str | Path) -> bool:
    """Whether the checkpoint folder holds the sharded format (its meta.json says so)."""
    from .checkpoint import META

    try:
        return json.loads((Path(path) / META).read_text()).get("format") == FORMAT
    except (OSError, json.JSONDecodeError):
        return False


def param_tid(name: str) -> str:
    return f"param/{name}"


def optim_tid(name: str, key: str) -> str:
    return f"optim/{name}/{key}"
