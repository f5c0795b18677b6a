"""What the image classifiers (ViT, CoAtNet, ResNet) share: ``stem -> blocks -> head``, the loss,
random example batches and the FLOPs per image."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["ImageClassifier"]


class ImageClassifier(nn.Module):
    """Base of the image classifiers. A subclass sets ``image_size``, ``in_chans``,
    ``num_classes`` and the modules ``stem``, ``blocks`` (a ModuleList: the units of pipelines,
    ZeRO-3 and recomputation) and ``head``; ``forward(images [B, C, H, W])`` returns logits
    ``[B, num_classes]``. Its FLOPs are counted once by ``count_forward_flops()`` into
    ``_forward_flops``, unless it overrides ``forward_flops_per_sample``."""

    tokens_per_sample = 1
    # Count attention under the math kernel, whose matmuls FlopCounterMode sees.
    count_attention_flops = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the batch."""
        return F.cross_entropy(logits.float(), targets)

    def count_forward_flops(self) -> float:
        """FLOPs of a 1-image forward pass in eval mode (BatchNorm must not update its running
        statistics here), counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and
        convolutions)."""
        was_training = self.training
        p = next(self.parameters())
        x = torch.zeros(1, self.in_chans, self.image_size, self.image_size, device=p.device, dtype=p.dtype)
        kernel = sdpa_kernel(SDPBackend.MATH) if self.count_attention_flops else contextlib.nullcontext()
        self.eval()
        try:
            with torch.no_grad(), kernel, FlopCounterMode(display=False) as counter:
                self(x)
        finally:
            self.train(was_training)
        return float(counter.get_total_flops())

    def forward_flops_per_sample(self) -> float:
        """FLOPs of one forward pass on one image (counted at construction)."""
        return self._forward_flops

    def train_flops_per_sample(self) -> float:
        """Forward + backward FLOPs for one image: 3x the forward FLOPs."""
        return 3.0 * self.forward_flops_per_sample()

    def example_batch(self, batch_size: int, generator: torch.Generator | None = None):
        """Random ``(images float32 [B, C, H, W], labels int64 [B])``."""
        x = torch.randn(batch_size, self.in_chans, self.image_size, self.image_size, generator=generator)
        y = torch.randint(0, self.num_classes, (batch_size,), generator=generator)
        return x, y
