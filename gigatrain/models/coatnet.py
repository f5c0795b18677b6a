"""CoAtNet (Dai et al. 2021, "CoAtNet: Marrying Convolution and Attention for All Data Sizes").

Layout C-C-T-T by default: a convolutional stem (S0), two stages of MBConv blocks (S1, S2) and
two stages of transformer blocks with relative attention (S3, S4), then global average pooling
and a classifier. Every stage halves the grid in its first block. For small images the stem
keeps the resolution (stride 1), so 28x28 inputs give grids 28 -> 14 -> 7 -> 4 -> 2.

All blocks of all stages sit in one ``blocks`` ModuleList, in order, and every block takes and
returns ``[B, C, H, W]`` (transformer blocks flatten to tokens inside), so a pipeline can cut
between any two blocks. Channels and grid change at stage boundaries.

Transformer blocks use the same Linear names as GPT (``attn.qkv``, ``attn.proj``, ``mlp.fc``,
``mlp.proj``) with a head-major qkv layout, and compute the relative position bias table with a
bias-free Linear ``attn.rel_bias`` (relative offset -> one value per head), so that tensor
parallelism can split it by heads like ``qkv``: the plan marks it column-parallel.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gpt import MLP, init_transformer_weights
from .image import ImageClassifier

__all__ = ["CoAtNet", "MBConv", "RelativeAttention", "RelTransformerBlock", "COATNET_TP_PLAN"]

COATNET_TP_PLAN = {
    "blocks.*.attn.qkv": "colwise",
    "blocks.*.attn.rel_bias": "colwise",
    "blocks.*.attn.proj": "rowwise",
    "blocks.*.mlp.fc": "colwise",
    "blocks.*.mlp.proj": "rowwise",
}


def _downsample_pool() -> nn.Module:
    # 2x2 max pool; ceil_mode keeps odd grids (7x7 -> 4x4) in step with a stride-2 3x3 conv.
    return nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)


class SqueezeExcite(nn.Module):
    """Channel gating: ``x * sigmoid(expand(act(reduce(mean_hw(x)))))``."""

    def __init__(self, chans: int, se_chans: int):
        super().__init__()
        self.reduce = nn.Conv2d(chans, se_chans, 1)
        self.act = nn.SiLU()
        self.expand = nn.Conv2d(se_chans, chans, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(self.act(self.reduce(s))))


class MBConv(nn.Module):
    """Inverted-bottleneck block with pre-normalisation (BatchNorm) and a residual:

    ``shortcut(x) + project(SE(dwconv3x3(expand1x1(BN(x)))))``, the 1x1 expansion widening to
    ``expand_ratio * out_chans``. With ``stride=2`` the depthwise conv downsamples and the
    shortcut is a 2x2 max pool followed by a 1x1 projection.
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        stride: int = 1,
        expand_ratio: int = 4,
        se_ratio: float = 0.25,
        dropout: float = 0.0,
    ):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"MBConv stride must be 1 or 2, got {stride}")
        hidden = out_chans * expand_ratio
        self.norm = nn.BatchNorm2d(in_chans)
        self.expand = nn.Conv2d(in_chans, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.act = nn.GELU()
        self.se = SqueezeExcite(hidden, max(1, int(in_chans * se_ratio)))
        self.project = nn.Conv2d(hidden, out_chans, 1)
        self.drop = nn.Dropout(dropout)
        if stride == 1 and in_chans == out_chans:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                _downsample_pool() if stride == 2 else nn.Identity(), nn.Conv2d(in_chans, out_chans, 1)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn1(self.expand(self.norm(x))))
        h = self.act(self.bn2(self.dwconv(h)))
        h = self.project(self.se(h))
        return self.shortcut(x) + self.drop(h)


def relative_position_index(h: int, w: int) -> torch.Tensor:
    """``[h*w, h*w]`` long tensor: for query cell i and key cell j of an h x w grid, the index of
    their offset (dy, dx) in a ``(2h-1) x (2w-1)`` table, row-major."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + (h - 1)
    dx = xs[:, None] - xs[None, :] + (w - 1)
    return dy * (2 * w - 1) + dx


class RelativeAttention(nn.Module):
    """Multi-head self-attention over an h x w grid with a learned relative position bias:
    ``softmax(q k^T / sqrt(d) + B[i - j]) v``, one bias table per head (CoAtNet eq. 3, pre-norm).

    Tokens ``[B, h*w, in_dim]`` -> ``[B, h*w, out_dim]``. The qkv output is laid out head-major
    like GPT's, and the bias table is produced by ``rel_bias`` (a Linear applied to an identity
    matrix), so tensor-parallel replacements of ``qkv``/``rel_bias`` yield matching local heads.
    """

    def __init__(self, in_dim: int, out_dim: int, n_head: int, grid: tuple[int, int], dropout: float = 0.0):
        super().__init__()
        if out_dim % n_head != 0:
            raise ValueError(f"CoAtNet attention width {out_dim} must be divisible by n_head ({n_head})")
        h, w = grid
        self.grid = (h, w)
        self.head_dim = out_dim // n_head
        self.dropout = dropout
        self.qkv = nn.Linear(in_dim, 3 * out_dim)
        self.proj = nn.Linear(out_dim, out_dim)
        num_rel = (2 * h - 1) * (2 * w - 1)
        self.rel_bias = nn.Linear(num_rel, n_head, bias=False)
        self.register_buffer("rel_index", relative_position_index(h, w), persistent=False)
        self.register_buffer("rel_eye", torch.eye(num_rel), persistent=False)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        if N != self.rel_index.shape[0]:
            raise ValueError(f"attention built for a {self.grid} grid got {N} tokens")
        qkv = self.qkv(x).view(B, N, -1, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [B, H, N, hd]
        table = self.rel_bias(self.rel_eye.to(x.dtype))  # [num_rel, H]
        bias = table[self.rel_index].permute(2, 0, 1).unsqueeze(0).to(q.dtype)  # [1, H, N, N]
        y = self.attention_core(q, k, v, bias)
        y = y.transpose(1, 2).reshape(B, N, -1)
        return self.resid_drop(self.proj(y))

    def attention_core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       bias: torch.Tensor) -> torch.Tensor:
        """Scores plus relative bias, softmax, dropout and the weighted sum: what selective
        recomputation redoes (``gigatrain.parallel.recompute``)."""
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0
        )


class RelTransformerBlock(nn.Module):
    """CoAtNet transformer block on ``[B, C, H, W]`` maps (flattened to tokens inside).

    Without downsampling: ``x + attn(LN(x))`` then ``x + mlp(LN(x))``. The first block of a
    stage downsamples: ``proj(pool(x)) + attn(pool(LN(x)))``, pool a 2x2 max pool and proj a 1x1
    conv to the new width.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        n_head: int,
        in_grid: tuple[int, int],
        downsample: bool,
        dropout: float = 0.0,
    ):
        super().__init__()
        h, w = in_grid
        self.out_grid = (-(-h // 2), -(-w // 2)) if downsample else (h, w)
        self.ln1 = nn.LayerNorm(in_dim)
        self.pool = _downsample_pool() if downsample else nn.Identity()
        self.shortcut = nn.Conv2d(in_dim, out_dim, 1) if (downsample or in_dim != out_dim) else nn.Identity()
        self.attn = RelativeAttention(in_dim, out_dim, n_head, self.out_grid, dropout)
        self.ln2 = nn.LayerNorm(out_dim)
        self.mlp = MLP(out_dim, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        h = self.ln1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # LayerNorm over channels
        h = self.pool(h)
        Hp, Wp = h.shape[-2:]
        tokens = h.flatten(2).transpose(1, 2)  # [B, N, C_in]
        skip = self.shortcut(self.pool(x)).flatten(2).transpose(1, 2)  # [B, N, C_out]
        t = skip + self.attn(tokens)
        t = t + self.mlp(self.ln2(t))
        return t.transpose(1, 2).reshape(B, -1, Hp, Wp)


class CoAtNetStem(nn.Module):
    """S0: two 3x3 convolutions, the first with stride ``stride``."""

    def __init__(self, in_chans: int, dim: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(dim)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.bn(self.conv1(x))))


class CoAtNetHead(nn.Module):
    """``[B, C, H, W]`` -> global average pool -> LayerNorm -> Linear -> ``[B, num_classes]``."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x.mean(dim=(2, 3))))


class CoAtNet(ImageClassifier):
    """CoAtNet image classifier.

    Args:
        image_size, in_chans, num_classes: input and output.
        depths: blocks per stage S1..S4.
        dims: channels per stage S1..S4.
        n_head: attention heads in every transformer stage (each T stage's width must divide).
        stem_dim: channels of the stem S0 (default ``dims[0]``).
        stem_stride: stride of the stem (default 1 for images under 64 pixels, else 2).
        layout: stage types, "C" (MBConv) or "T" (relative-attention transformer), e.g. "CCTT".
        expand_ratio: MBConv expansion.
        dropout: dropout on residual branches and attention probabilities.
        init_std: std of the normal initialisation of transformer Linear layers.

    ``train_flops_per_sample()`` is measured once at construction: a 1-image forward pass in eval
    mode under ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions; the math
    attention kernel so attention is counted), times 3 for forward + backward.
    """

    @property
    def tp_plan(self) -> dict[str, str]:
        """Module-name patterns -> "colwise" | "rowwise" | "vocab" for tensor parallelism."""
        return dict(COATNET_TP_PLAN)

    count_attention_flops = True

    def __init__(
        self,
        image_size: int = 28,
        in_chans: int = 1,
        num_classes: int = 10,
        depths: Sequence[int] = (1, 2, 2, 1),
        dims: Sequence[int] = (32, 64, 128, 256),
        n_head: int = 4,
        stem_dim: int | None = None,
        stem_stride: int | None = None,
        layout: str = "CCTT",
        expand_ratio: int = 4,
        dropout: float = 0.0,
        init_std: float = 0.02,
    ):
        super().__init__()
        depths, dims, layout = list(depths), list(dims), layout.upper()
        if not (len(depths) == len(dims) == len(layout)):
            raise ValueError(
                f"CoAtNet needs one depth, one width and one layout letter per stage; got depths={depths}, "
                f"dims={dims}, layout={layout!r}"
            )
        if set(layout) - {"C", "T"} or any(d < 1 for d in depths):
            raise ValueError(f"layout must use only 'C' and 'T' and every depth must be >= 1 (got {layout!r}, {depths})")
        self.image_size, self.in_chans, self.num_classes = image_size, in_chans, num_classes
        self.depths, self.dims, self.layout = depths, dims, layout
        stem_dim = dims[0] if stem_dim is None else stem_dim
        stem_stride = (1 if image_size < 64 else 2) if stem_stride is None else stem_stride

        self.stem = CoAtNetStem(in_chans, stem_dim, stem_stride)
        grid = (-(-image_size // stem_stride),) * 2
        blocks: list[nn.Module] = []
        self.stage_of_block: list[int] = []  # stage index (0..3 for S1..S4) of each block
        in_dim = stem_dim
        for s, (kind, depth, dim) in enumerate(zip(layout, depths, dims)):
            for i in range(depth):
                first = i == 0
                if kind == "C":
                    blocks.append(MBConv(in_dim, dim, stride=2 if first else 1, expand_ratio=expand_ratio, dropout=dropout))
                    if first:
                        grid = (-(-grid[0] // 2), -(-grid[1] // 2))
                else:
                    blk = RelTransformerBlock(in_dim, dim, n_head, grid, downsample=first, dropout=dropout)
                    grid = blk.out_grid
                    blocks.append(blk)
                self.stage_of_block.append(s)
                in_dim = dim
        self.blocks = nn.ModuleList(blocks)
        self.head = CoAtNetHead(in_dim, num_classes)
        self.final_grid = grid

        n_attn = sum(depths[s] for s, k in enumerate(layout) if k == "T")
        for blk in self.blocks:
            if isinstance(blk, RelTransformerBlock):
                init_transformer_weights(blk, init_std, max(1, n_attn))
        nn.init.normal_(self.head.fc.weight, std=init_std)
        nn.init.zeros_(self.head.fc.bias)

        self._forward_flops = self.count_forward_flops()
