"""Datasets and distributed sampling.

``prepare_dataset`` does the one-time work (download, tokenize, write the cache) and runs once in
the launching process; ``open_dataset`` is cheap and is what every worker calls. A dataset has
``__len__``, ``get_batch(indices) -> (inputs, targets)`` (CPU tensors) and ``kind`` ("text" or
"image"); text datasets also have ``vocab_size``, ``encode(str)`` and ``decode(ids)``.
"""

from __future__ import annotations

from typing import Any

from .images import FashionMNIST, read_idx
from .sampler import BatchLoader, GlobalBatchSampler
from .text import TextDataset, open_text_dataset, prepare_text_corpus

__all__ = [
    "DATASET_NAMES",
    "TEXT_DATASETS",
    "IMAGE_DATASETS",
    "prepare_dataset",
    "open_dataset",
    "GlobalBatchSampler",
    "BatchLoader",
    "TextDataset",
    "FashionMNIST",
    "read_idx",
]

TEXT_DATASETS = ("kjv", "pystdlib", "textfile")
IMAGE_DATASETS = ("fashion_mnist",)
DATASET_NAMES = TEXT_DATASETS + IMAGE_DATASETS


def _name(dcfg: Any) -> str:
    name = str(getattr(dcfg, "name", "")).lower().replace("-", "_")
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {getattr(dcfg, 'name', None)!r}; choose one of {', '.join(DATASET_NAMES)}")
    return name


class _Cfg:
    """``dcfg`` with a normalised name, leaving the caller's object untouched."""

    def __init__(self, dcfg: Any, name: str):
        self._dcfg, self.name = dcfg, name

    def __getattr__(self, key: str):
        if key.startswith("_"):
            raise AttributeError(key)
        return getattr(self._dcfg, key, None)


def prepare_dataset(dcfg: Any, seq_len: int):
    """Do the one-time preparation of the dataset described by ``dcfg`` and return it opened.

    ``dcfg`` attributes: name ("kjv" | "pystdlib" | "textfile" | "fashion_mnist"), path
    (optional source file or directory), tokenizer ("char" | "bpe"), vocab_size (bpe),
    cache_dir (optional; default ``$GIGATRAIN_DATA`` or ``~/.cache/gigatrain``), max_chars
    (pystdlib), split ("train" | "val"). Safe to run from several processes at once.
    """
    cfg = _Cfg(dcfg, _name(dcfg))
    if cfg.name in TEXT_DATASETS:
        prepare_text_corpus(cfg)
    return open_dataset(dcfg, seq_len)


def open_dataset(dcfg: Any, seq_len: int):
    """Open a prepared dataset (cheap). Text corpora must have been prepared by
    ``prepare_dataset``; ``seq_len`` is the window length (ignored for images)."""
    cfg = _Cfg(dcfg, _name(dcfg))
    if cfg.name in TEXT_DATASETS:
        return open_text_dataset(cfg, seq_len)
    return FashionMNIST(cfg.path, split=cfg.split or "train")
