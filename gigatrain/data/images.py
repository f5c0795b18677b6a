"""Image data: an IDX file reader and the Fashion-MNIST dataset.

IDX (the MNIST format): two zero bytes, a type byte, a byte giving the number of dimensions,
one big-endian uint32 per dimension, then the values in row-major order, big-endian.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["read_idx", "FashionMNIST", "DEFAULT_FASHION_MNIST_DIR"]

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

_IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, gzip-compressed or raw (detected from its first bytes), into an array
    of its native dtype (multi-byte types converted to native byte order).

    Raises FileNotFoundError if missing and ValueError on a bad magic number, an unknown type
    code, or a size that does not match the header.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"IDX file not found: {p}")
    raw = p.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{p}: corrupt gzip data ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{p}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_TYPES:
        raise ValueError(f"{p}: unknown IDX type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{p}: truncated IDX header ({ndim} dimensions announced)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_TYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{p}: IDX header says shape {shape} of {dtype} ({expected} bytes) but {len(raw) - header} bytes follow"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}. Install it with "
        f"`apt-get install dataset-fashion-mnist` (files go to {DEFAULT_FASHION_MNIST_DIR}) "
        f"or set data.path to a directory holding the four IDX files."
    )


class FashionMNIST:
    """Fashion-MNIST (Xiao et al. 2017): 28x28 grey images of 10 clothing classes.

    Args:
        root: directory with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``
            (default ``/usr/share/datasets/fashion-mnist``, from the Debian package
            ``dataset-fashion-mnist``).
        split: "train" (60,000 images) or "val"/"test" (the 10,000 test images).

    ``get_batch(indices)`` returns images float32 ``[B, 1, 28, 28]`` normalised with the training
    set's mean and std, and labels int64 ``[B]``.
    """

    kind = "image"
    num_classes = 10
    image_shape = (1, 28, 28)
    MEAN = 0.2860  # of the training images scaled to [0, 1]
    STD = 0.3530
    classes = (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    )  # fmt: skip

    def __init__(self, root: str | os.PathLike | None = None, split: str = "train"):
        self.root = Path(root or DEFAULT_FASHION_MNIST_DIR).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"Fashion-MNIST directory {self.root} not found. Install the data with "
                f"`apt-get install dataset-fashion-mnist` or set data.path to a directory holding the IDX files."
            )
        if split == "train":
            prefix = "train"
        elif split in ("val", "test"):
            prefix = "t10k"
        else:
            raise ValueError(f"unknown split {split!r}; choose 'train' or 'val'")
        self.split = split
        images = read_idx(_find(self.root, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(self.root, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
            raise ValueError(f"{self.root}: expected uint8 images [N, 28, 28], got {images.dtype} {images.shape}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"{self.root}: {images.shape[0]} images but labels of shape {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"{self.root}: labels outside 0..{self.num_classes - 1}")
        self.images = torch.from_numpy(images)  # uint8: normalised per batch to keep memory low
        self.labels = torch.from_numpy(labels.astype(np.int64))

    def __len__(self) -> int:
        return self.images.shape[0]

    def get_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        x = self.images[idx].unsqueeze(1).to(torch.float32).div_(255.0)
        x = x.sub_(self.MEAN).div_(self.STD)
        return x, self.labels[idx]
