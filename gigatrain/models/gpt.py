"""A GPT language model: pre-LayerNorm transformer decoder with learned positions.

The model follows the protocol every gigatrain model follows (``stem``, ``blocks``, ``head``,
``loss``, ``train_flops_per_sample``, ``tokens_per_sample``, ``tp_plan``, ``example_batch``).
It holds no process groups: tensor parallelism replaces the Linear layers named in ``tp_plan``
from outside, and pipelines split ``blocks``.

The attention and MLP layers here are shared with the ViT (``gigatrain.models.vit``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..parallel.materialize import is_meta, keyed_init_

__all__ = ["SelfAttention", "MLP", "Block", "GPT", "GPTStem", "GPTHead", "GPT_TP_PLAN"]

# Module-name patterns (fnmatch) -> how tensor parallelism splits them (styles: see
# gigatrain.parallel.tensor.apply). The LM head shares the token embedding, so it follows "vocab".
GPT_TP_PLAN = {
    "blocks.*.attn.qkv": "colwise",
    "blocks.*.attn.proj": "rowwise",
    "blocks.*.mlp.fc": "colwise",
    "blocks.*.mlp.proj": "rowwise",
    "stem.wte": "vocab",
    # Sequence parallelism: the residual stream is cut along the sequence after the stem, and the
    # LayerNorms between the tensor-parallel regions run on those shards.
    "stem": "sequence_scatter",
    "blocks.*.ln1": "sequence_norm",
    "blocks.*.ln2": "sequence_norm",
    "head.ln_f": "sequence_norm",
}


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    The qkv output features are laid out head-major, ``[n_head, 3, head_dim]`` (as Megatron
    does), so that cutting ``qkv`` into contiguous column blocks gives each tensor-parallel rank
    whole heads with their own q, k and v, and ``proj``'s matching row block. The number of
    heads is therefore read from the qkv output at run time, never from ``n_head``.

    Input and output: ``[B, T, d_model]``.
    """

    def __init__(self, d_model: int, n_head: int, *, causal: bool, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if d_model % n_head != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_head ({n_head})")
        self.head_dim = d_model // n_head
        self.causal = causal
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        # Shapes from the qkv output: under tensor parallelism it holds this rank's heads, and
        # under sequence parallelism the whole sequence while ``x`` holds a slice of it.
        B, T = qkv.shape[:2]
        qkv = qkv.view(B, T, -1, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [B, H, T, hd]
        y = self.attention_core(q, k, v)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.resid_drop(self.proj(y))


    def attention_core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Scores, softmax, dropout and the weighted sum: what selective recomputation redoes
        (``gigatrain.parallel.recompute``). ``[B, H, T, hd]`` each -> ``[B, H, T, hd]``."""
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=self.causal, dropout_p=self.dropout if self.training else 0.0
        )


class MLP(nn.Module):
    """Two-layer feed-forward network ``proj(gelu(fc(x)))`` with a 4x hidden width."""

    def __init__(self, d_model: int, *, dropout: float = 0.0, bias: bool = True, hidden_mult: int = 4):
        super().__init__()
        self.fc = nn.Linear(d_model, hidden_mult * d_model, bias=bias)
        self.act = nn.GELU()
        self.proj = nn.Linear(hidden_mult * d_model, d_model, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, d_model: int, n_head: int, *, causal: bool, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model, bias=bias)
        self.attn = SelfAttention(d_model, n_head, causal=causal, dropout=dropout, bias=bias)
        self.ln2 = nn.LayerNorm(d_model, bias=bias)
        self.mlp = MLP(d_model, dropout=dropout, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def init_transformer_module(name: str, m: nn.Module, init_std: float, n_layer: int) -> None:
    """GPT-2 initialisation of one module: normal(0, init_std) weights, zero biases, and the two
    residual projections of every block (``attn.proj``, ``mlp.proj``) scaled by 1/sqrt(2*n_layer)
    so the residual stream's variance does not grow with depth. Other modules keep the values
    they were constructed with."""
    if isinstance(m, nn.Linear):
        is_resid = name.endswith("attn.proj") or name.endswith("mlp.proj")
        nn.init.normal_(m.weight, mean=0.0, std=init_std / math.sqrt(2 * n_layer) if is_resid else init_std)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, mean=0.0, std=init_std)


def init_transformer_weights(module: nn.Module, init_std: float, n_layer: int) -> None:
    """``init_transformer_module`` over every module of ``module``, from the global RNG."""
    for name, m in module.named_modules():
        init_transformer_module(name, m, init_std, n_layer)


class GPTStem(nn.Module):
    """Token ids ``[B, T]`` -> token + learned position embeddings ``[B, T, d_model]``."""

    def __init__(self, vocab_size: int, seq_len: int, d_model: int, dropout: float = 0.0):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(seq_len, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.wpe.num_embeddings:
            raise ValueError(f"sequence length {T} exceeds the model's seq_len {self.wpe.num_embeddings}")
        pos = torch.arange(T, device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos))


class GPTHead(nn.Module):
    """Final LayerNorm + LM head ``[B, T, d_model]`` -> logits ``[B, T, vocab]``.

    ``lm_head.weight`` is set by ``GPT`` to the stem's token embedding Parameter (weight tying).
    """

    def __init__(self, vocab_size: int, d_model: int, bias: bool = True):
        super().__init__()
        self.ln_f = nn.LayerNorm(d_model, bias=bias)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))


class GPT(nn.Module):
    """GPT decoder-only language model.

    Args:
        vocab_size: number of token ids the data uses.
        seq_len: context length (number of learned positions).
        n_layer, n_head, d_model: transformer shape.
        dropout: dropout on embeddings, attention probabilities and residual branches.
        init_std: std of the normal initialisation (residual projections are scaled down).
        bias: whether Linear and LayerNorm layers have biases.
        vocab_multiple: the embedding table is padded up to a multiple of this, so that it
            divides evenly among tensor-parallel ranks and matmuls get friendly shapes. The
            padded ids never occur in data; ``generate`` never samples them.

    ``forward(idx)`` returns logits ``[B, T, padded_vocab_size]``.

    Initial values are keyed by module name (``gigatrain.parallel.materialize``): a seed is drawn
    from the global RNG first (``init_seed``), then every module is initialised by
    ``init_module`` with a generator keyed by that seed and its name. Built under
    ``torch.device("meta")`` the model stays empty, and each rank of a layout materialises the
    same values for the parts it owns.
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        n_layer: int,
        n_head: int,
        d_model: int,
        dropout: float = 0.0,
        init_std: float = 0.02,
        bias: bool = True,
        vocab_multiple: int = 64,
    ):
        super().__init__()
        if vocab_size < 1 or vocab_size > 2**31:
            raise ValueError(f"bad vocab_size {vocab_size}")
        # Drawn before any module is built: a meta build consumes no random numbers constructing
        # its modules, a materialised one does, and both must get the same seed.
        self.init_seed = int(torch.randint(0, 2**62, (1,), device="cpu"))
        self.init_std = init_std
        vocab_multiple = max(1, int(vocab_multiple))
        self.vocab_size = vocab_size
        self.padded_vocab_size = -(-vocab_size // vocab_multiple) * vocab_multiple
        self.seq_len = seq_len
        self.n_layer = n_layer
        self.n_head = n_head
        self.d_model = d_model
        self.stem = GPTStem(self.padded_vocab_size, seq_len, d_model, dropout)
        self.blocks = nn.ModuleList(
            Block(d_model, n_head, causal=True, dropout=dropout, bias=bias) for _ in range(n_layer)
        )
        self.head = GPTHead(self.padded_vocab_size, d_model, bias=bias)
        # Tied before initialisation: the embedding (the first module owning it) gives its values.
        self.head.lm_head.weight = self.stem.wte.weight
        if not is_meta(self):
            keyed_init_(self, self.init_seed, self.init_module)

    def init_module(self, name: str, module: nn.Module) -> None:
        """The model's ``init_fn`` (see ``gigatrain.parallel.materialize``): GPT-2's
        initialisation of one module (``init_transformer_module``)."""
        init_transformer_module(name, module, self.init_std, self.n_layer)

    # ---- protocol -------------------------------------------------------------------------
    @property
    def tp_plan(self) -> dict[str, str]:
        """Module-name patterns -> "colwise" | "rowwise" | "vocab" for tensor parallelism."""
        return dict(GPT_TP_PLAN)


    @property
    def tokens_per_sample(self) -> int:
        return self.seq_len

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.stem(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over all B*T target tokens."""
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))

    def num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters (the tied embedding counted once).

        With ``non_embedding=True`` the position embeddings are left out. The token embedding
        stays in: being tied to the LM head, its weights take part in a matmul for every
        token, which is what FLOP counts built on this number need.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.stem.wpe.weight.numel()
        return n

    def train_flops_per_sample(self) -> float:
        """Forward + backward FLOPs for one sequence of ``seq_len`` tokens:
        ``6 * N * T + 12 * n_layer * d_model * T * T`` with ``N = num_params(non_embedding=True)``
        (matmuls: 2 FLOPs per weight per token forward, twice that backward; the attention
        scores and weighted sum counted over the full T x T, as kernels compute them)."""
        T = self.seq_len
        return 6.0 * self.num_params(non_embedding=True) * T + 12.0 * self.n_layer * self.d_model * T * T

    def example_batch(self, batch_size: int, generator: torch.Generator | None = None):
        """Random token batch ``(inputs, targets)``, both int64 ``[batch_size, seq_len]``,
        where targets are the inputs shifted by one."""
        seq = torch.randint(0, self.vocab_size, (batch_size, self.seq_len + 1), generator=generator)
        return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()

    # ---- sampling -------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        next_logits=None,
    ) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` ``[B, T0]`` and return ``[B, T0+n]``.

        The context is cropped to the last ``seq_len`` tokens. ``temperature <= 0`` means greedy
        decoding; ``top_k`` keeps only the k most likely tokens. Padded vocabulary ids are never
        produced. The caller chooses train/eval mode (use eval to disable dropout).
        ``next_logits(context) -> [B, vocab]`` replaces the forward pass when the model is run
        elsewhere (for example collectively by every process holding a part of it); it returns
        the logits of the last position.
        """
        if next_logits is None:
            def next_logits(ctx):
                return self(ctx)[:, -1]
        for _ in range(max_new_tokens):
            ctx = idx[:, -self.seq_len :]
            logits = next_logits(ctx)[:, : self.vocab_size].float()
            if temperature <= 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.shape[-1]:
                    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                # Sample where the generator lives (a CPU generator with CUDA logits is common).
                dev = generator.device if generator is not None else probs.device
                nxt = torch.multinomial(probs.to(dev), 1, generator=generator).to(idx.device)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
