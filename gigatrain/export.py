"""``gigatrain export``: a checkpoint as a plain consolidated safetensors model, and back.

The output folder has HuggingFace's layout for sharded weights::

    model-00001-of-00003.safetensors   whole tensors under their parameter names, fp32
    ...
    model.safetensors.index.json       {"metadata": {"total_size": ...}, "weight_map": {name: file}}

(one ``model.safetensors`` and no index when everything fits in one file). Parameters and
persistent buffers only: no optimizer state, no RNG. The writer streams tensor by tensor: each is
assembled from the checkpoint's pieces (``ShardedReader.whole``) when its turn comes and written
straight from its storage, so the memory needed is that of one tensor, whatever the model size.

``ConsolidatedReader`` reads such a folder back one slice at a time, so ``gigatrain.initialize(...,
weights=DIR)`` starts a model of any layout from it without any rank holding the whole model.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch

from .checkpoint_sharded import Box, overlap_runs, write_safetensors

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

__all__ = ["ConsolidatedReader", "export_checkpoint"]


def _plan_files(sizes: Sequence[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    files: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if files[-1] and used + nbytes > max_bytes:
            files.append([])
            used = 0
        files[-1].append(name)
        used += nbytes
    return files


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, max_shard_bytes: int = 2 * 2**30) -> dict:
    """Write the parameters (and persistent buffers) of ``checkpoint`` (a checkpoint folder,
    sharded or whole-tensor) into ``out`` as consolidated safetensors files of at most
    ``max_shard_bytes`` each (a tensor larger than that gets a file of its own) plus
    ``model.safetensors.index.json``. Returns the index (``weight_map``, ``metadata``)."""
    from .checkpoint import CheckpointError, load_checkpoint

    loaded = load_checkpoint(checkpoint, tensors=False)
    reader = loaded.reader
    if reader is None:     # the older format holds whole tensors already
        tensors = loaded.params
        shapes = {n: tuple(t.shape) for n, t in tensors.items()}

        def whole(name: str) -> torch.Tensor:
            return tensors[name]
    else:
        shapes = {tid[len("param/"):]: reader.shape(tid) for tid in reader.tensor_ids() if tid.startswith("param/")}

        def whole(name: str) -> torch.Tensor:
            return reader.whole(f"param/{name}")
    if not shapes:
        raise CheckpointError(f"{checkpoint}: no parameters to export")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(shapes)
    files = _plan_files([(n, 4 * math.prod(shapes[n])) for n in names], max_shard_bytes)
    weight_map: dict[str, str] = {}
    for i, group in enumerate(files):
        fname = SINGLE_NAME if len(files) == 1 else f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        items = [(n, torch.float32, shapes[n], lambda n=n: whole(n)) for n in group]
        write_safetensors(out / fname, items, check_finite=False, metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
    index = {"metadata": {"total_size": sum(4 * math.prod(s) for s in shapes.values()), "step": loaded.step},
             "weight_map": weight_map}
    if len(files) > 1:
        (out / INDEX_NAME).write_text(json.dumps(index, indent=1))
    return index


class ConsolidatedReader:
    """Slices of an exported folder's tensors (the ``PieceSource`` reads of ``Engine.load_weights``):
    only the rows a slice touches are read from the file."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        idx = self.folder / INDEX_NAME
        if idx.is_file():
            weight_map = json.loads(idx.read_text())["weight_map"]
        elif (self.folder / SINGLE_NAME).is_file():
            with safe_open(str(self.folder / SINGLE_NAME), framework="pt") as f:
                weight_map = {k: SINGLE_NAME for k in f.keys()}
        else:
            raise FileNotFoundError(f"{folder}: neither {INDEX_NAME} nor {SINGLE_NAME}")
        self.weight_map = weight_map
        self._files: dict = {}
        self.bytes_read = 0

    def _slice(self, name: str):
        from safetensors import safe_open

        fname = self.weight_map[name]
        if fname not in self._files:
            self._files[fname] = safe_open(str(self.folder / fname), framework="pt")
        return self._files[fname].get_slice(name)

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, box: Box, start: int, end: int) -> torch.Tensor:
        """Elements ``[start, end)`` of ``box`` of tensor ``name``, 1-D fp32."""
        sl = self._slice(name)
        shape = tuple(sl.get_shape())
        n = math.prod(shape)
        row = n // shape[0] if shape else 1
        out = torch.empty(end - start, dtype=torch.float32)
        for d_off, s_off, k in overlap_runs(shape, box, (start, end), None, (0, n)):
            if not shape:
                part = sl[:].reshape(-1)
            else:
                r0, r1 = s_off // row, (s_off + k - 1) // row
                part = sl[r0:r1 + 1].reshape(-1)[s_off - r0 * row:s_off - r0 * row + k]
            out[d_off:d_off + k] = part
            self.bytes_read += 4 * k
        return out
