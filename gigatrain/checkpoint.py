"""Layout-independent checkpoints: save in one layout, load in any other.

The engine writes sharded checkpoints (``checkpoint_sharded``: every rank its own pieces, an
index, slice reads on load). This module holds what both formats share (atomic publication,
``latest``, resuming, RNG state, rotation, setting diverged checkpoints aside) and the older,
whole-tensor format, which ``load_checkpoint`` still reads. In that format a checkpoint is a
directory::

    step_000010/
      model*.safetensors     every parameter, full (unsharded) fp32, keyed by its module name
                             (one file, or one per pipeline stage: model-pp0, model-pp1, ...)
      optim*.safetensors     optimizer state keyed "<param name>/<state key>", split the same way
      rng_rank<R>.safetensors  each rank's RNG state
      meta.json              step, config, loss scaler, data position; written last

Tensors live in safetensors, so loading never unpickles anything: a crafted pickle cannot run
code here. A checkpoint is written into a temporary directory which is renamed into place only when
complete, so a crash mid-save leaves the previous checkpoint intact; ``latest`` names the newest.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .rundir import OWNER_FILE, write_owner

STEP_DIR = re.compile(r"^step_(\d{6,})$")
META = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why and what to do."""


class NonFiniteCheckpointError(CheckpointError):
    """The state to be saved holds NaN or inf (training diverged); nothing was written."""


@dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    meta: dict
    params: dict[str, torch.Tensor]
    optim: dict[str, dict[str, torch.Tensor]]
    rng: dict[str, torch.Tensor] | None
    reader: object = None       # a sharded checkpoint's ``ShardedReader``


def _flatten_optim(optim: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{name}/{key}": t.contiguous() for name, st in optim.items() for key, t in st.items()}


def _unflatten_optim(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in flat.items():
        name, key = k.rsplit("/", 1)
        out.setdefault(name, {})[key] = t
    return out


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    st = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(st["cpu"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def save_checkpoint(root: str | Path, step: int, *, rank: int, world_comm, params, optim,
                    meta: dict, device: torch.device, writer_rank: int = 0, keep: int = 0,
                    writes_tensors: bool | None = None, part: str = "") -> Path | None:
    """Write checkpoint ``step`` under ``root`` collectively; returns its path on every rank.

    ``params``/``optim`` are full (unsharded) tensors keyed by global parameter name. Ranks for
    which ``writes_tensors`` is true (default: ``writer_rank`` only) write them to
    ``model{part}.safetensors`` / ``optim{part}.safetensors`` -- e.g. one writer per pipeline
    stage with ``part="-pp1"``. Every rank writes its RNG state; ``writer_rank`` then writes the
    metadata and the rename that publishes the checkpoint.

    A checkpoint holding NaN or inf is never written: the ranks first agree that every tensor to
    be saved is finite, and otherwise all raise ``NonFiniteCheckpointError`` before anything
    touches the disk. The temporary folder records its owner process (``rundir.write_owner``), so
    that a later run can remove it if this process dies mid-save.
    """
    if writes_tensors is None:
        writes_tensors = rank == writer_rank
    bad = _first_nonfinite(params, optim) if writes_tensors else None
    first_bad = world_comm.all_reduce_scalar(float(rank if bad else 2**31), op=dist.ReduceOp.MIN,
                                             device=device)
    if first_bad < 2**31:
        where = f"{bad} on rank {rank}" if bad else f"the state saved by rank {int(first_bad)}"
        raise NonFiniteCheckpointError(
            f"checkpoint step {step} not written: {where} holds NaN or inf values, so training has "
            f"diverged; the previous checkpoints in {root} are untouched. Continue from the last good "
            f"one with resume=auto and a lower train.lr (or train.grad_clip set).")
    root = Path(root)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    if rank == writer_rank:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        write_owner(tmp)
    world_comm.barrier()
    save_file(rng_state(device), str(tmp / f"rng_rank{rank}.safetensors"))
    if writes_tensors:
        save_file({k: v.contiguous() for k, v in params.items()}, str(tmp / f"model{part}.safetensors"))
        save_file(_flatten_optim(optim), str(tmp / f"optim{part}.safetensors"))
    world_comm.barrier()
    if rank == writer_rank:
        meta = dict(meta, step=step, time=time.time(), format="gigatrain-checkpoint-v1")
        (tmp / OWNER_FILE).unlink(missing_ok=True)
        _write_atomic(tmp / META, json.dumps(meta, indent=1, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / "latest", final.name + "\n")
        if keep and keep > 0:
            # Rotate among this run's history (steps up to this one); never the one just written.
            older = [s for s in list_checkpoints(root) if s < step]
            for old in older[:max(0, len(older) - (keep - 1))]:
                shutil.rmtree(root / f"step_{old:06d}", ignore_errors=True)
    world_comm.barrier()
    return final


def _first_nonfinite(params, optim) -> str | None:
    """Name of the first tensor holding NaN or inf among those to be saved, or None."""
    for name, t in params.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"parameter {name}"
    for name, st in optim.items():
        for key, t in st.items():
            if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"optimizer state {name}/{key}"
    return None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def set_aside(root: str | Path, first: int, last: int) -> list[Path]:
    """Rename the checkpoints of steps ``first``..``last`` to ``diverged_step_NNNNNN`` and point
    ``latest`` at the newest checkpoint before ``first`` (removing it when there is none).

    For a run that diverged: weights that produced NaN or inf gradients are finite and so were
    saved, but resuming from them diverges again. Renamed, they are kept for inspection and never
    picked by ``resume=auto``. Returns the new paths.
    """
    root = Path(root)
    moved = []
    for s in list_checkpoints(root):
        if first <= s <= last:
            dst = root / f"diverged_step_{s:06d}"
            if dst.exists():
                shutil.rmtree(dst)
            os.replace(root / f"step_{s:06d}", dst)
            moved.append(dst)
    if moved:
        before = [s for s in list_checkpoints(root) if s < first]
        if before:
            _write_atomic(root / "latest", f"step_{before[-1]:06d}\n")
        else:
            (root / "latest").unlink(missing_ok=True)
    return moved


def list_checkpoints(root: str | Path) -> list[int]:
    """Steps of the complete checkpoints under ``root`` (a directory counts once meta.json exists)."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = []
    for d in root.iterdir():
        m = STEP_DIR.match(d.name)
        if m and (d / META).is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def find_latest(root: str | Path) -> Path | None:
    """The checkpoint ``latest`` names (the last one written), else the highest complete step.

    After resuming from an older checkpoint, higher-numbered ones from the abandoned run may
    still exist; ``latest`` points at what this run wrote last, so those are not picked up.
    """
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if STEP_DIR.match(cand.name) and (cand / META).is_file():
            return cand
    steps = list_checkpoints(root)
    return root / f"step_{steps[-1]:06d}" if steps else None


def checkpoint_step(path: str | Path) -> int:
    m = STEP_DIR.match(Path(path).name)
    if not m:
        raise CheckpointError(f"{path} is not a step_NNNNNN checkpoint directory.")
    return int(m.group(1))


def resolve_resume(resume: str | None, default_root: str | Path) -> Path | None:
    """Turn ``resume`` (None, "auto", or a path) into a checkpoint directory, or explain why not.

    "auto" continues the latest complete checkpoint under ``default_root`` and starts fresh if
    there is none. A path may name a checkpoint directory or a root holding several.
    """
    if resume is None:
        return None
    if resume == "auto":
        return find_latest(default_root)
    p = Path(resume)
    if p.is_file():
        raise CheckpointError(
            f"resume={resume} is a file. gigatrain resumes only from checkpoint directories "
            f"(safetensors tensors + {META}); pickle files (.pt, .bin, .pkl) are never loaded because "
            f"unpickling can run arbitrary code. Point resume at a step_NNNNNN directory or its parent.")
    if not p.is_dir():
        raise CheckpointError(f"resume={resume}: no such checkpoint directory.")
    if (p / META).is_file():
        return p
    latest = find_latest(p)
    if latest is None:
        raise CheckpointError(f"resume={resume}: no complete checkpoint (step_NNNNNN/{META}) in this directory.")
    return latest


def load_checkpoint(path: str | Path, rank: int = 0, *, tensors: bool = True) -> LoadedCheckpoint:
    """Read a checkpoint directory; only JSON and safetensors are parsed, never pickle.

    A sharded checkpoint comes with its ``reader``; ``params``/``optim`` are then assembled
    whole only when ``tensors`` (tools and tests: the engine reads its own slices instead)."""
    path = Path(path)
    meta_path = path / META
    if not meta_path.is_file():
        raise CheckpointError(f"{path} is not a complete gigatrain checkpoint (no {META}).")
    damaged = "the checkpoint is damaged: resume from another one (resume=<a step_NNNNNN folder>)"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path} is not valid JSON ({e}); {damaged}.") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        what = "has no integer step" if isinstance(meta, dict) else f"holds a JSON {type(meta).__name__}"
        raise CheckpointError(f"{meta_path} {what}, not the checkpoint's step and config; {damaged}.")
    from .checkpoint_sharded import FORMAT as SHARDED, ShardedReader

    if meta.get("format") not in ("gigatrain-checkpoint-v1", SHARDED):
        raise CheckpointError(f"{path}: unknown checkpoint format {meta.get('format')!r}.")
    reader = None
    try:
        if meta["format"] == SHARDED:
            reader = ShardedReader.open(path)
            params, optim = _assemble(reader) if tensors else ({}, {})
            return LoadedCheckpoint(path, int(meta["step"]), meta, params, optim, _read_rng(path, rank), reader)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the sharded checkpoint ({e}); {damaged}.") from e
    try:
        params: dict[str, torch.Tensor] = {}
        flat_optim: dict[str, torch.Tensor] = {}
        for f in sorted(path.glob("model*.safetensors")):
            params.update(load_file(str(f)))
        for f in sorted(path.glob("optim*.safetensors")):
            flat_optim.update(load_file(str(f)))
        if not params:
            raise CheckpointError(f"{path}: no model*.safetensors file.")
        optim = _unflatten_optim(flat_optim)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: cannot read tensors ({e}). Only safetensors files are loaded.") from e
    return LoadedCheckpoint(path, int(meta["step"]), meta, params, optim, _read_rng(path, rank))


def _read_rng(path: Path, rank: int) -> dict[str, torch.Tensor] | None:
    rng_file = path / f"rng_rank{rank}.safetensors"
    try:
        return load_file(str(rng_file)) if rng_file.is_file() else None
    except Exception as e:
        raise CheckpointError(f"{rng_file}: cannot read the RNG state ({e}).") from e


def _assemble(reader) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Whole tensors of a sharded checkpoint, with scalar states, as the older format held them."""
    params: dict[str, torch.Tensor] = {}
    optim: dict[str, dict[str, torch.Tensor]] = {}
    for tid in reader.tensor_ids():
        kind, rest = tid.split("/", 1)
        if kind == "param":
            params[rest] = reader.whole(tid)
        else:
            name, key = rest.rsplit("/", 1)
            optim.setdefault(name, {})[key] = reader.whole(tid)
    for name, st in reader.index["scalars"].items():
        for key, v in st.items():
            optim.setdefault(name, {})[key] = torch.tensor(float(v), dtype=torch.float32)
    return params, optim
