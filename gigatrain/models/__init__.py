"""Reference models. Each follows the model protocol: ``stem``, ``blocks`` (an nn.ModuleList),
``head``, ``forward == head(blocks(stem(x)))``, ``loss``, ``train_flops_per_sample``,
``tokens_per_sample``, ``tp_plan`` and ``example_batch``. None of them knows about processes."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from .coatnet import CoAtNet
from .gpt import GPT
from .resnet import ResNet
from .vit import ViT

__all__ = ["MODEL_NAMES", "build_model", "GPT", "ViT", "CoAtNet", "ResNet"]

MODEL_NAMES = ("gpt", "vit", "coatnet", "resnet")


def build_model(mcfg: Any, vocab_size: int | None = None) -> nn.Module:
    """Build the model named by ``mcfg.name`` ("gpt" | "vit" | "coatnet" | "resnet").

    ``mcfg`` is any object with the attributes below (missing ones take the default shown):
    n_layer=4, n_head=4, d_model=128, seq_len=128, dropout=0.0, init_std=0.02, bias=True,
    vocab_multiple=64 (GPT); image_size=28, in_chans=1, num_classes=10, patch_size=4 (ViT);
    coatnet_depths=[1,2,2,1], coatnet_dims=[32,64,128,256], coatnet_layout="CCTT",
    coatnet_stem_dim=None, coatnet_stem_stride=None (CoAtNet); resnet_widths=[32,64,128],
    resnet_depths=[1,1,1] (ResNet).

    ``vocab_size`` is required for GPT (from the dataset's tokenizer); when None, ``mcfg.vocab_size``
    is used if present.
    """
    name = str(getattr(mcfg, "name", "gpt")).lower()
    g = lambda key, default: default if getattr(mcfg, key, None) is None else getattr(mcfg, key)  # noqa: E731
    n_layer, n_head, d_model = int(g("n_layer", 4)), int(g("n_head", 4)), int(g("d_model", 128))
    dropout, init_std = float(g("dropout", 0.0)), float(g("init_std", 0.02))
    if name == "gpt":
        vocab = vocab_size if vocab_size is not None else getattr(mcfg, "vocab_size", None)
        if vocab is None:
            raise ValueError("GPT needs a vocabulary size: pass vocab_size (the dataset's tokenizer knows it)")
        return GPT(
            vocab_size=int(vocab),
            seq_len=int(g("seq_len", 128)),
            n_layer=n_layer,
            n_head=n_head,
            d_model=d_model,
            dropout=dropout,
            init_std=init_std,
            bias=bool(g("bias", True)),
            vocab_multiple=int(g("vocab_multiple", 64)),
        )
    if name == "vit":
        return ViT(
            image_size=int(g("image_size", 28)),
            patch_size=int(g("patch_size", 4)),
            in_chans=int(g("in_chans", 1)),
            num_classes=int(g("num_classes", 10)),
            n_layer=n_layer,
            n_head=n_head,
            d_model=d_model,
            dropout=dropout,
            init_std=init_std,
        )
    if name == "coatnet":
        return CoAtNet(
            image_size=int(g("image_size", 28)),
            in_chans=int(g("in_chans", 1)),
            num_classes=int(g("num_classes", 10)),
            depths=list(g("coatnet_depths", [1, 2, 2, 1])),
            dims=list(g("coatnet_dims", [32, 64, 128, 256])),
            n_head=n_head,
            stem_dim=getattr(mcfg, "coatnet_stem_dim", None),
            stem_stride=getattr(mcfg, "coatnet_stem_stride", None),
            layout=str(g("coatnet_layout", "CCTT")),
            dropout=dropout,
            init_std=init_std,
        )
    if name == "resnet":
        return ResNet(
            image_size=int(g("image_size", 28)),
            in_chans=int(g("in_chans", 1)),
            num_classes=int(g("num_classes", 10)),
            widths=list(g("resnet_widths", [32, 64, 128])),
            depths=list(g("resnet_depths", [1, 1, 1])),
        )
    raise ValueError(f"unknown model name {name!r}; choose one of {', '.join(MODEL_NAMES)}")
