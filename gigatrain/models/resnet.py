"""A small residual CNN (He et al. 2016, the basic block) for small images such as Fashion-MNIST.

The fast DAWNBench-style recipes for small images use such networks: a 3x3 convolution stem, a
few stages of basic residual blocks (the first block of every stage after the first halves the
grid with a strided convolution and a 1x1 projection on the skip path), global average pooling
and one Linear. All blocks sit in one ``blocks`` ModuleList, so pipelines, ZeRO-3 units and
recomputation treat them like transformer blocks. No tensor-parallel plan: convolutions are
not split.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .image import ImageClassifier

__all__ = ["ResNet", "BasicBlock"]


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + skip(x))``; ``stride`` 2 halves the grid."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.skip(x))


class ResNetStem(nn.Module):
    def __init__(self, in_chans: int, width: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class ResNetHead(nn.Module):
    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class ResNet(ImageClassifier):
    """Residual CNN classifier.

    Args:
        image_size, in_chans, num_classes: the images (28, 1, 10 for Fashion-MNIST).
        widths: channels of each stage; stages after the first start by halving the grid.
        depths: basic blocks per stage (same length as ``widths``).

    ``forward(images [B, C, H, W])`` returns logits ``[B, num_classes]``.
    """

    def __init__(self, image_size: int = 28, in_chans: int = 1, num_classes: int = 10,
                 widths=(32, 64, 128), depths=(1, 1, 1)):
        super().__init__()
        if len(widths) != len(depths) or not widths or min(depths) < 1:
            raise ValueError(f"widths {list(widths)} and depths {list(depths)} must be non-empty, of equal "
                             f"length, with at least one block per stage")
        self.image_size, self.in_chans, self.num_classes = image_size, in_chans, num_classes
        self.stem = ResNetStem(in_chans, widths[0])
        blocks, c = [], widths[0]
        for i, (w, d) in enumerate(zip(widths, depths)):
            for j in range(d):
                blocks.append(BasicBlock(c, w, stride=2 if i > 0 and j == 0 else 1))
                c = w
        self.blocks = nn.ModuleList(blocks)
        self.head = ResNetHead(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for b in self.blocks:      # each residual branch starts as the identity (Goyal et al.)
            nn.init.zeros_(b.bn2.weight)
        self._forward_flops = self.count_forward_flops()

    @property
    def tp_plan(self) -> dict[str, str]:
        """Nothing is split by tensor parallelism."""
        return {}
