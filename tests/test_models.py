"""Reference models: protocol, numerics against PyTorch, FLOP counts, tensor-parallel layouts."""

import fnmatch
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from gigatrain.models import MODEL_NAMES, CoAtNet, build_model
from gigatrain.models.coatnet import MBConv, RelativeAttention, RelTransformerBlock, relative_position_index
from gigatrain.models.gpt import SelfAttention

pytestmark = pytest.mark.rung0

VOCAB = 50  # padded to 64 inside GPT


def tiny_cfg(name, **kw):
    base = dict(
        name=name, n_layer=2, n_head=4, d_model=32, seq_len=16, dropout=0.0, init_std=0.02,
        image_size=28, in_chans=1, num_classes=10, patch_size=4,
        coatnet_depths=[1, 1, 1, 1], coatnet_dims=[32, 64, 96, 128],
    )  # fmt: skip
    base.update(kw)
    return SimpleNamespace(**base)


def make(name, **kw):
    torch.manual_seed(0)
    return build_model(tiny_cfg(name, **kw), vocab_size=VOCAB)


def run_protocol(model, x):
    h = model.stem(x)
    for block in model.blocks:
        h = block(h)
    return model.head(h)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_protocol_shapes_forward_and_loss(name):
    model = make(name).eval()
    x, y = model.example_batch(3, generator=torch.Generator().manual_seed(1))
    logits = model(x)
    if name == "gpt":
        assert x.shape == y.shape == (3, 16) and x.dtype == y.dtype == torch.int64
        assert logits.shape == (3, 16, model.padded_vocab_size) and model.padded_vocab_size == 64
        assert model.tokens_per_sample == 16
        expected = F.cross_entropy(logits.reshape(-1, 64), y.reshape(-1))
    else:
        assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32
        assert y.shape == (3,) and y.dtype == torch.int64
        assert logits.shape == (3, 10) and model.tokens_per_sample == 1
        expected = F.cross_entropy(logits, y)
    assert isinstance(model.blocks, nn.ModuleList) and len(model.blocks) > 0
    assert torch.equal(logits, run_protocol(model, x))
    torch.testing.assert_close(model.loss(logits, y), expected, rtol=0, atol=0)
    assert model.train_flops_per_sample() > 0


def test_build_model_errors_and_defaults():
    with pytest.raises(ValueError, match="unknown model"):
        build_model(SimpleNamespace(name="lstm"))
    with pytest.raises(ValueError, match="vocab"):
        build_model(SimpleNamespace(name="gpt"))
    # Only a name: every other attribute takes its default.
    m = build_model(SimpleNamespace(name="vit"))
    assert m(m.example_batch(2)[0]).shape == (2, 10)


def test_gpt_tied_weights_and_param_count():
    model = make("gpt")
    assert model.head.lm_head.weight is model.stem.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "stem.wte.weight" in names and "head.lm_head.weight" not in names
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - model.stem.wpe.weight.numel()


def test_gpt_init():
    model = make("gpt", n_layer=8, d_model=64)
    w = model.blocks[0].mlp.proj.weight
    assert abs(w.std().item() - 0.02 / math.sqrt(16)) < 0.001
    assert abs(model.blocks[0].mlp.fc.weight.std().item() - 0.02) < 0.002
    assert all(torch.count_nonzero(m.bias) == 0 for m in model.modules() if isinstance(m, nn.Linear) and m.bias is not None)


def test_gpt_causal():
    model = make("gpt").eval()
    x, _ = model.example_batch(2, generator=torch.Generator().manual_seed(2))
    x2 = x.clone()
    t = 9
    x2[:, t] = (x2[:, t] + 1) % VOCAB
    a, b = model(x), model(x2)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_sgd_step_reduces_loss(name):
    model = make(name).train()
    x, y = model.example_batch(8, generator=torch.Generator().manual_seed(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1 if name == "gpt" else 0.05)
    losses = []
    for _ in range(3):
        loss = model.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[2] < losses[0], losses


def count_flops(fn):
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_gpt_flops_match_flop_counter():
    model = make("gpt", n_layer=2, d_model=64, seq_len=32)
    x, y = model.example_batch(1)
    measured = count_flops(lambda: model.loss(model(x), y).backward())
    predicted = model.train_flops_per_sample()
    assert abs(predicted - measured) / measured < 0.03, (predicted, measured)


def test_vit_flops_match_flop_counter():
    model = make("vit").eval()
    x, _ = model.example_batch(1)
    with torch.no_grad():
        fwd = count_flops(lambda: model(x))
    assert abs(model.forward_flops_per_sample() - fwd) / fwd < 0.01
    assert model.train_flops_per_sample() == 3 * model.forward_flops_per_sample()


def test_coatnet_structure_and_flops():
    model = make("coatnet")
    # The construction-time FLOP count ran a forward pass: training mode and BatchNorm
    # statistics must be as PyTorch initialises them.
    assert model.training
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
            assert torch.equal(m.running_var, torch.ones_like(m.running_var))
            assert int(m.num_batches_tracked) == 0
    kinds = [type(b) for b in model.blocks]
    assert kinds == [MBConv, MBConv, RelTransformerBlock, RelTransformerBlock]
    assert any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.blocks[0].modules())  # depthwise
    assert isinstance(model.blocks[2].attn, RelativeAttention)
    # Every block maps [B, C, H, W] -> [B, C', H', W']; each stage halves the grid.
    h = model.stem(torch.zeros(2, 1, 28, 28))
    shapes = [tuple(h.shape)]
    for b in model.blocks:
        h = b(h)
        shapes.append(tuple(h.shape))
    assert shapes == [(2, 32, 28, 28), (2, 32, 14, 14), (2, 64, 7, 7), (2, 96, 4, 4), (2, 128, 2, 2)]
    model.eval()
    with torch.no_grad():
        fwd = count_flops(lambda: model(torch.zeros(1, 1, 28, 28)))
    assert model.train_flops_per_sample() == 3 * fwd


def test_relative_position_index_and_attention_oracle():
    idx = relative_position_index(2, 3)
    assert idx.shape == (6, 6) and idx.max() < 3 * 5
    # Same offset -> same index; different offsets -> different indices.
    cells = [(i, j) for i in range(2) for j in range(3)]
    seen = {}
    for a, (i1, j1) in enumerate(cells):
        for b, (i2, j2) in enumerate(cells):
            off = (i1 - i2, j1 - j2)
            assert seen.setdefault(off, idx[a, b].item()) == idx[a, b].item()
    assert len(set(seen.values())) == len(seen)

    torch.manual_seed(0)
    attn = RelativeAttention(12, 16, n_head=2, grid=(2, 3)).eval()
    nn.init.normal_(attn.rel_bias.weight)
    x = torch.randn(3, 6, 12)
    qkv = attn.qkv(x).view(3, 6, 2, 3, 8)
    q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
    bias = torch.empty(2, 6, 6)
    for a, (i1, j1) in enumerate(cells):
        for b, (i2, j2) in enumerate(cells):
            r = (i1 - i2 + 1) * 5 + (j1 - j2 + 2)
            bias[:, a, b] = attn.rel_bias.weight[:, r]
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8) + bias, dim=-1)
    ref = attn.proj((probs @ v).transpose(1, 2).reshape(3, 6, 16))
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-6)


def split_linear(lin, parts, dim):
    """Copies of ``lin`` holding one contiguous slice of its weight along ``dim`` (0: columns of
    the output, 1: rows of the input); the bias goes with column slices and with the first row slice."""
    out = []
    for r, w in enumerate(lin.weight.detach().chunk(parts, dim=dim)):
        has_bias = lin.bias is not None and (dim == 0 or r == 0)
        new = nn.Linear(w.shape[1], w.shape[0], bias=has_bias)
        new.weight.data.copy_(w)
        if has_bias:
            new.bias.data.copy_(lin.bias.detach().chunk(parts)[r] if dim == 0 else lin.bias.detach())
        out.append(new)
    return out


@pytest.mark.parametrize("kind", ["gpt", "coatnet"])
def test_head_major_qkv_splits_into_whole_heads(kind):
    """Contiguous column blocks of qkv (and rel_bias), with matching row blocks of proj, compute
    whole heads: the partial outputs of 2 'ranks' sum to the full attention output. This is the
    layout the tensor-parallel plan relies on."""
    torch.manual_seed(0)
    tp = 2
    if kind == "gpt":
        full = SelfAttention(32, 4, causal=True).eval()
        local = SelfAttention(16, 2, causal=True).eval()  # 2 of the 4 heads, same head_dim
        x = torch.randn(2, 5, 32)
    else:
        full = RelativeAttention(24, 32, n_head=4, grid=(2, 2)).eval()
        local = RelativeAttention(24, 16, n_head=2, grid=(2, 2)).eval()
        nn.init.normal_(full.rel_bias.weight)
        x = torch.randn(2, 4, 24)
    qkvs, projs = split_linear(full.qkv, tp, 0), split_linear(full.proj, tp, 1)
    rels = split_linear(full.rel_bias, tp, 0) if kind == "coatnet" else [None] * tp
    total = 0
    for r in range(tp):
        local.qkv, local.proj = qkvs[r], projs[r]
        if rels[r] is not None:
            local.rel_bias = rels[r]
        total = total + local(x)
    torch.testing.assert_close(total, full(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n != "resnet"])   # convolutions are not split
def test_tp_plan_names_real_modules(name):
    model = make(name)
    modules = dict(model.named_modules())
    for pattern, style in model.tp_plan.items():
        hits = [n for n in modules if fnmatch.fnmatchcase(n, pattern)]
        assert hits, f"{pattern} matches no module"
        for n in hits:
            want = {"vocab": nn.Embedding, "colwise": nn.Linear, "rowwise": nn.Linear,
                    "sequence_norm": nn.LayerNorm, "sequence_scatter": nn.Module}[style]
            assert isinstance(modules[n], want), (n, style)
    n_attn = sum(hasattr(b, "attn") for b in model.blocks)
    assert n_attn > 0 and sum(fnmatch.fnmatchcase(n, "blocks.*.attn.qkv") for n in modules) == n_attn


def test_generate():
    model = make("gpt").eval()
    # Bias the padded logits upward: generation must still never emit a padded id.
    with torch.no_grad():
        model.stem.wte.weight[VOCAB:] = 0.5
    prompt = torch.zeros(2, 3, dtype=torch.long)
    a = model.generate(prompt, 20, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(5))
    b = model.generate(prompt, 20, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(5))
    assert a.shape == (2, 23) and torch.equal(a, b) and torch.equal(a[:, :3], prompt)
    assert int(a.max()) < VOCAB
    greedy = model.generate(prompt, 20, temperature=0)  # longer than seq_len: context is cropped
    expect = model(greedy[:, -17:-1])[:, -1, :VOCAB].argmax(-1)
    assert torch.equal(greedy[:, -1], expect)


def test_coatnet_rejects_bad_layout():
    with pytest.raises(ValueError):
        CoAtNet(depths=[1, 1, 1], dims=[8, 16, 32, 64])
    with pytest.raises(ValueError):
        CoAtNet(layout="CCXT")


def test_resnet_blocks_flops_and_shapes():
    m = build_model(SimpleNamespace(name="resnet", resnet_widths=[8, 16], resnet_depths=[1, 2]))
    x, y = m.example_batch(3)
    assert m(x).shape == (3, 10) and m.tp_plan == {} and len(m.blocks) == 3
    # The second stage halves the grid: its first block projects the skip path.
    assert isinstance(m.blocks[0].skip, nn.Identity) and not isinstance(m.blocks[1].skip, nn.Identity)
    conv = sum(2 * c.in_channels * c.out_channels * c.kernel_size[0] ** 2 for c in m.modules()
               if isinstance(c, nn.Conv2d))
    assert conv * 14 * 14 < m.train_flops_per_sample() / 3 < conv * 28 * 28 * 1.1
    assert float(m.loss(m(x), y)) > 0
