"""Data layer: layout-independent sampling, exact resume, tokenizers, memmap windows, IDX files."""

import gzip
import json
import struct
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gigatrain.data import BatchLoader, GlobalBatchSampler, open_dataset, prepare_dataset, read_idx
from gigatrain.data.images import DEFAULT_FASHION_MNIST_DIR, FashionMNIST
from gigatrain.data.text import (
    BPETokenizer,
    CharTokenizer,
    kjv_text_from_jsonl,
    pystdlib_text,
    stdlib_files,
)

pytestmark = pytest.mark.rung0

# ------------------------------------------------------------------------------------------
# Sampler and loader
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_samples,gb", [(40, 8), (37, 8), (5, 16)])
def test_sampler_independent_of_layout(num_samples, gb):
    s = GlobalBatchSampler(num_samples, gb, seed=7)
    for step in range(6):
        full = s.indices_for_step(step)
        assert full.shape == (gb,) and full.dtype == torch.int64
        for dp in (1, 2, 4):
            for micro in (1, 2, gb // dp):
                got = torch.cat([torch.cat(s.local_microbatches(step, r, dp, micro)) for r in range(dp)])
                assert torch.equal(got, full), (step, dp, micro)
                assert all(len(m) == micro for m in s.local_microbatches(step, 0, dp, micro))


def test_sampler_epochs_are_permutations_and_resume_is_exact():
    n, gb = 37, 8
    s = GlobalBatchSampler(n, gb, seed=3)
    stream = torch.cat([s.indices_for_step(k) for k in range(20)])  # 160 positions, 4+ epochs
    for e in range(4):
        assert torch.equal(stream[e * n : (e + 1) * n].sort().values, torch.arange(n))
    assert not torch.equal(stream[:n], stream[n : 2 * n])  # epochs are reshuffled
    # A fresh sampler computes any step directly (resume), in any order.
    fresh = GlobalBatchSampler(n, gb, seed=3)
    for k in (13, 0, 19, 4):
        assert torch.equal(fresh.indices_for_step(k), stream[k * gb : (k + 1) * gb])
    # The seed matters.
    assert not torch.equal(GlobalBatchSampler(n, gb, seed=4).indices_for_step(0), s.indices_for_step(0))


def test_sampler_rejects_bad_layouts():
    s = GlobalBatchSampler(100, 12, seed=0)
    with pytest.raises(ValueError, match="data-parallel"):
        s.local_microbatches(0, 0, 5, 1)
    with pytest.raises(ValueError, match="micro_batch"):
        s.local_microbatches(0, 0, 2, 4)  # 6 per rank
    with pytest.raises(ValueError):
        s.local_microbatches(0, 2, 2, 3)
    with pytest.raises(ValueError):
        GlobalBatchSampler(0, 4)


class ToyDataset:
    """Sample i is the row [i, i+1, i+2]; targets are i."""

    def __len__(self):
        return 23

    def get_batch(self, indices):
        idx = torch.as_tensor(indices)
        return idx[:, None] + torch.arange(3), idx.clone()


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resume_matches_uninterrupted_run(workers):
    ds = ToyDataset()
    sampler = GlobalBatchSampler(len(ds), 8, seed=11)
    full = list(BatchLoader(ds, sampler, 1, 2, 2, start_step=0, end_step=9, num_workers=workers))
    assert len(full) == 9 and all(len(step) == 2 for step in full)
    for step, micro in enumerate(full):
        expect = sampler.local_microbatches(step, 1, 2, 2)
        for (x, y), idx in zip(micro, expect):
            assert torch.equal(y, idx) and torch.equal(x[:, 0], idx)
    resumed = list(BatchLoader(ds, GlobalBatchSampler(len(ds), 8, seed=11), 1, 2, 2, start_step=5, end_step=9,
                               num_workers=workers))  # fmt: skip
    assert len(resumed) == 4
    for a, b in zip(resumed, full[5:]):
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # Leaving an endless loader early must not hang.
    it = iter(BatchLoader(ds, sampler, 0, 1, 4, num_workers=workers))
    next(it)
    it.close()


# ------------------------------------------------------------------------------------------
# Tokenizers and text corpora
# ------------------------------------------------------------------------------------------


def test_char_tokenizer_round_trip():
    text = "Hello, wörld!\nÉtoile 🌟 ~"
    tok = CharTokenizer.train(text)
    assert tok.chars == sorted(set(text)) and tok.vocab_size == len(set(text))
    ids = tok.encode(text)
    assert ids == [tok.chars.index(c) for c in text]
    assert tok.decode(ids) == text
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.encode("xyz")
    again = CharTokenizer(json.loads(tok.to_json())["chars"])
    assert again.encode(text) == ids


def test_bpe_tokenizer_round_trip():
    text = "the cat sat on the mat. the dog sat on the log.\n" * 50 + "naïve café ✓\n"
    tok = BPETokenizer.train([text], vocab_size=300)
    assert 256 < tok.vocab_size <= 300
    ids = tok.encode(text)
    assert len(ids) < len(text.encode()) and tok.decode(ids) == text
    assert tok.decode(tok.encode_array(text).tolist()) == text


def text_cfg(tmp_path, **kw):
    base = dict(name="textfile", path=None, tokenizer="char", vocab_size=None, cache_dir=str(tmp_path / "cache"),
                max_chars=None, split="train")  # fmt: skip
    base.update(kw)
    return SimpleNamespace(**base)


def test_textfile_memmap_windows_and_split(tmp_path):
    text = "".join(chr(ord("a") + (i * 7) % 26) for i in range(1000))
    src = tmp_path / "corpus.txt"
    src.write_text(text, encoding="utf-8")
    cfg = text_cfg(tmp_path, path=str(src))
    with pytest.raises(FileNotFoundError, match="prepare_dataset"):
        open_dataset(cfg, 16)
    train = prepare_dataset(cfg, 16)
    assert train.kind == "text" and train.vocab_size == 26
    assert len(train) == (900 - 1) // 16
    tokens = np.array(train.encode(text))
    x, y = train.get_batch(torch.tensor([0, 3, len(train) - 1]))
    assert x.shape == y.shape == (3, 16) and x.dtype == y.dtype == torch.int64
    for row, i in enumerate([0, 3, len(train) - 1]):
        assert x[row].tolist() == tokens[i * 16 : i * 16 + 16].tolist()
        assert y[row].tolist() == tokens[i * 16 + 1 : i * 16 + 17].tolist()
    assert train.decode(x[1]) == text[48:64]
    val = open_dataset(text_cfg(tmp_path, path=str(src), split="val"), 16)
    assert len(val) == (100 - 1) // 16
    vx, vy = val.get_batch([0])
    assert vx[0].tolist() == tokens[900:916].tolist()  # val starts where train's tokens end
    with pytest.raises(IndexError):
        train.get_batch([len(train)])
    # Preparing again reuses the cache.
    stamp = (Path(cfg.cache_dir)).glob("*/tokens.bin")
    before = {p: p.stat().st_mtime_ns for p in stamp}
    prepare_dataset(cfg, 16)
    assert {p: p.stat().st_mtime_ns for p in before} == before and len(before) == 1


def test_prepare_race_is_safe(tmp_path):
    rng = np.random.default_rng(1)
    text = "".join(rng.choice(list("abcdefgh \n"), size=4000))
    src = tmp_path / "c.txt"
    src.write_text(text, encoding="utf-8")
    cfg = text_cfg(tmp_path, path=str(src), tokenizer="bpe", vocab_size=280)
    errors, results = [], []

    def work():
        try:
            results.append(prepare_dataset(cfg, 8))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    entries = sorted(p.name for p in Path(cfg.cache_dir).iterdir())
    assert len(entries) == 1 and not entries[0].startswith(".")  # no temporary directories left
    ds = open_dataset(cfg, 8)
    assert len(ds) > 10 and len(results) == 3
    for r in results:
        assert r.tokens_path == ds.tokens_path and np.array_equal(r.tokens, ds.tokens)
    assert text.startswith(ds.decode(ds.get_batch([0, 1])[0].flatten().tolist()))


def test_kjv_jsonl_parsing(tmp_path):
    rows = [
        {"citation": "Genesis 1:1", "text": "In the beginning God created the heaven and the earth.",
         "book": "Genesis", "chapter": 1, "verse": 1},
        {"book": "Genesis", "chapter": 1, "verse": 2, "text": "And the earth was without form, and void."},
    ]  # fmt: skip
    lines = [json.dumps(r) for r in rows]
    text = kjv_text_from_jsonl(lines)
    assert text == (
        "Genesis 1:1 In the beginning God created the heaven and the earth.\n"
        "Genesis 1:2 And the earth was without form, and void.\n"
    )
    with pytest.raises(ValueError, match="line 2"):
        kjv_text_from_jsonl([lines[0], "not json"])
    src = tmp_path / "kjv.jsonl"
    src.write_text("\n".join(lines * 20) + "\n", encoding="utf-8")
    ds = prepare_dataset(text_cfg(tmp_path, name="kjv", path=str(src)), 32)
    assert ds.decode(ds.get_batch([0])[0][0]) == text[:32]


def test_pystdlib_corpus(tmp_path):
    files = stdlib_files()
    assert files and all(not {"test", "tests", "site-packages"} & set(f.parts) for f in files)
    text = pystdlib_text(max_chars=20_000)
    assert len(text) == 20_000 and text.startswith("# ---- ")
    ds = prepare_dataset(text_cfg(tmp_path, name="pystdlib", max_chars=20_000), 64)
    assert len(ds) == (18_000 - 1) // 64
    assert ds.decode(ds.get_batch([0])[0][0]) == text[:64]


# ------------------------------------------------------------------------------------------
# IDX files and Fashion-MNIST
# ------------------------------------------------------------------------------------------


def write_idx_bytes(code, shape, payload):
    return bytes([0, 0, code, len(shape)]) + b"".join(struct.pack(">I", d) for d in shape) + payload


def test_idx_reader(tmp_path):
    imgs = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = tmp_path / "imgs-idx3-ubyte"
    raw.write_bytes(write_idx_bytes(0x08, imgs.shape, imgs.tobytes()))
    gz = tmp_path / "imgs-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(raw.read_bytes()))
    for p in (raw, gz):
        out = read_idx(p)
        assert out.dtype == np.uint8 and np.array_equal(out, imgs)
    vals = np.array([1.5, -2.25, 3.0], dtype=np.float32)
    (tmp_path / "f").write_bytes(write_idx_bytes(0x0D, (3,), vals.astype(">f4").tobytes()))
    assert np.array_equal(read_idx(tmp_path / "f"), vals)
    ints = np.array([[1, -70000], [5, 2**30]], dtype=np.int32)
    (tmp_path / "i").write_bytes(write_idx_bytes(0x0C, (2, 2), ints.astype(">i4").tobytes()))
    assert np.array_equal(read_idx(tmp_path / "i"), ints)

    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(write_idx_bytes(0x08, (10,), b"\x00" * 9))
    with pytest.raises(ValueError, match="bytes"):
        read_idx(tmp_path / "short")
    (tmp_path / "code").write_bytes(write_idx_bytes(0x07, (1,), b"\x00"))
    with pytest.raises(ValueError, match="type code"):
        read_idx(tmp_path / "code")
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "missing")


def test_fashion_mnist_from_small_files(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        (tmp_path / f"{prefix}-images-idx3-ubyte").write_bytes(write_idx_bytes(0x08, imgs.shape, imgs.tobytes()))
        (tmp_path / f"{prefix}-labels-idx1-ubyte").write_bytes(write_idx_bytes(0x08, labels.shape, labels.tobytes()))
    ds = open_dataset(SimpleNamespace(name="fashion_mnist", path=str(tmp_path), split="val"), 0)
    assert ds.kind == "image" and len(ds) == 4
    x, y = ds.get_batch([3, 0])
    assert x.shape == (2, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    expect = (torch.from_numpy(imgs[[3, 0]]).float() / 255 - FashionMNIST.MEAN) / FashionMNIST.STD
    torch.testing.assert_close(x[:, 0], expect)
    assert y.tolist() == labels[[3, 0]].tolist()
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST(tmp_path / "nowhere")


@pytest.mark.skipif(not Path(DEFAULT_FASHION_MNIST_DIR).is_dir(), reason="Fashion-MNIST not installed")
def test_real_fashion_mnist():
    train = prepare_dataset(SimpleNamespace(name="fashion_mnist", path=None, split="train"), 0)
    val = open_dataset(SimpleNamespace(name="fashion-mnist", split="val"), 0)
    assert len(train) == 60_000 and len(val) == 10_000
    x, y = train.get_batch(torch.arange(0, 60_000, 30))
    assert x.shape == (2000, 1, 28, 28)
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05
    assert torch.bincount(train.labels, minlength=10).tolist() == [6000] * 10
