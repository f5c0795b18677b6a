"""Vision Transformer (Dosovitskiy et al. 2020) for small images such as Fashion-MNIST.

Patch embedding (a Conv2d with stride = patch size), a class token and learned position
embeddings, pre-LayerNorm transformer blocks with non-causal attention, and a head that
normalises, takes the class token and classifies. The blocks reuse GPT's layers, with the
same Linear names, so the tensor-parallel plan is GPT's without the vocabulary entry.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..parallel.materialize import is_meta, keyed_init_
from .gpt import Block, init_transformer_module
from .image import ImageClassifier

__all__ = ["ViT", "ViTStem", "ViTHead", "VIT_TP_PLAN"]

VIT_TP_PLAN = {
    "blocks.*.attn.qkv": "colwise",
    "blocks.*.attn.proj": "rowwise",
    "blocks.*.mlp.fc": "colwise",
    "blocks.*.mlp.proj": "rowwise",
}


class ViTStem(nn.Module):
    """Images ``[B, C, H, W]`` -> tokens ``[B, 1 + (H/p)*(W/p), d_model]`` (class token first)."""

    def __init__(self, image_size: int, patch_size: int, in_chans: int, d_model: int, dropout: float = 0.0):
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(f"image_size ({image_size}) must be divisible by patch_size ({patch_size})")
        self.num_patches = (image_size // patch_size) ** 2
        self.patch = nn.Conv2d(in_chans, d_model, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos = nn.Parameter(torch.zeros(1, 1 + self.num_patches, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)  # [B, N, d]
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return self.drop(torch.cat([cls, x], dim=1) + self.pos)


class ViTHead(nn.Module):
    """Tokens ``[B, S, d_model]`` -> class logits ``[B, num_classes]`` from the class token."""

    def __init__(self, d_model: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x)[:, 0])


class ViT(ImageClassifier):
    """Vision Transformer classifier.

    Args:
        image_size: side of the square input image (28 for Fashion-MNIST).
        patch_size: side of a square patch; must divide image_size.
        in_chans: input channels (1 for Fashion-MNIST).
        num_classes: number of output classes.
        n_layer, n_head, d_model: transformer shape.
        dropout: dropout on embeddings, attention probabilities and residual branches.
        init_std: std of the normal initialisation.

    ``forward(images)`` returns logits ``[B, num_classes]``.
    """

    @property
    def tp_plan(self) -> dict[str, str]:
        """Module-name patterns -> "colwise" | "rowwise" | "vocab" for tensor parallelism."""
        return dict(VIT_TP_PLAN)

    def __init__(
        self,
        image_size: int = 28,
        patch_size: int = 4,
        in_chans: int = 1,
        num_classes: int = 10,
        n_layer: int = 4,
        n_head: int = 4,
        d_model: int = 128,
        dropout: float = 0.0,
        init_std: float = 0.02,
    ):
        super().__init__()
        # Keyed initialisation, as GPT's (drawn before any module consumes random numbers).
        self.init_seed = int(torch.randint(0, 2**62, (1,), device="cpu"))
        self.init_std = init_std
        self.image_size, self.patch_size, self.in_chans = image_size, patch_size, in_chans
        self.num_classes, self.n_layer, self.d_model = num_classes, n_layer, d_model
        self.stem = ViTStem(image_size, patch_size, in_chans, d_model, dropout)
        self.blocks = nn.ModuleList(
            Block(d_model, n_head, causal=False, dropout=dropout) for _ in range(n_layer)
        )
        self.head = ViTHead(d_model, num_classes)
        if not is_meta(self):
            keyed_init_(self, self.init_seed, self.init_module)

    def init_module(self, name: str, module: nn.Module) -> None:
        """The model's ``init_fn``: GPT-2's initialisation of Linear layers, normal(0, init_std)
        class token and positions, a zero patch-embedding bias (its weight keeps Conv2d's)."""
        init_transformer_module(name, module, self.init_std, self.n_layer)
        if isinstance(module, ViTStem):
            nn.init.normal_(module.cls_token, std=self.init_std)
            nn.init.normal_(module.pos, std=self.init_std)
            nn.init.zeros_(module.patch.bias)

    def forward_flops_per_sample(self) -> float:
        """Matmul/conv FLOPs of one forward pass on one image, counted analytically
        (2 FLOPs per multiply-add; norms, softmax and elementwise ops not counted)."""
        p, C, d = self.patch_size, self.in_chans, self.d_model
        n = self.stem.num_patches
        s = n + 1
        patch = 2.0 * n * C * p * p * d
        per_block = 24.0 * s * d * d + 4.0 * s * s * d  # qkv+proj+fc+proj, then scores and weighted sum
        head = 2.0 * d * self.num_classes
        return patch + self.n_layer * per_block + head
