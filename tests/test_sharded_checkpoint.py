"""Sharded checkpoints (ladder 0 and 3).

Ladder 0: the slice geometry against a brute-force map of every element, and a checkpoint
written by 4 simulated ranks read back by the ranks of other layouts, each reading exactly the
elements it holds. Ladder 3 (one spawn of 4 gloo ranks): saved at dp 4 with ZeRO-3 and continued
at dp 1 (ZeRO 0), dp 2 (ZeRO-1) and dp 2 x pp 2 (ZeRO-1); saved at dp 2 x pp 2 and continued at
dp 4 with ZeRO-3 (asynchronously saved, with CPU offload); every continuation equals one process
training straight through (fp32, SGD with momentum, relative 1e-5).
"""
import functools
import itertools
import json
import math
import random

import pytest
import torch

from dist_utils import assert_curves_close, spawn


# ---------------------------------------------------------------- ladder 0: geometry and reads

def _elements(shape, box, rng):
    """Global flat indices of elements ``rng`` of ``box`` (brute force)."""
    idx = torch.arange(math.prod(shape)).view(shape)
    if box is not None:
        idx = idx.narrow(box[0], box[1], box[2])
    return idx.reshape(-1)[rng[0]:rng[1]].tolist()


def test_overlap_runs_match_a_brute_force_map():
    from gigatrain.checkpoint_sharded import overlap_runs

    r = random.Random(0)
    for _ in range(400):
        shape = tuple(r.randint(1, 5) for _ in range(r.randint(1, 3)))
        dim = r.randrange(len(shape))

        def box():
            if r.random() < 0.3:
                return None
            s = r.randrange(shape[dim])
            return dim, s, r.randint(1, shape[dim] - s)

        def rng(b):
            n = math.prod(shape) if b is None else math.prod(shape) // shape[dim] * b[2]
            a = r.randrange(n)
            return a, r.randint(a + 1, n)

        db, sb = box(), box()
        dr, sr = rng(db), rng(sb)
        want = {g: i for i, g in enumerate(_elements(shape, db, dr))}
        src = _elements(shape, sb, sr)
        expect = sorted((want[g], j) for j, g in enumerate(src) if g in want)
        got = sorted((d + k, s + k) for d, s, n in overlap_runs(shape, db, dr, sb, sr) for k in range(n))
        assert got == expect, (shape, db, dr, sb, sr)


def _layout_pieces(shape, dp, tp, dim):
    """Pieces of one tensor at tp x dp ranks: tp slices along ``dim``, each cut in dp ranges."""
    out = []
    for t in range(tp):
        n = shape[dim] // tp
        box = None if tp == 1 else (dim, t * n, n)
        size = math.prod(shape) // tp
        for d in range(dp):
            out.append((box, (d * size // dp, (d + 1) * size // dp)))
    return out


@pytest.mark.parametrize("saved, loaded", [((4, 1), (1, 1)), ((4, 1), (2, 1)), ((2, 2), (4, 1)), ((1, 2), (1, 4)),
                                           ((1, 4), (2, 1)), ((3, 1), (1, 2))])
def test_each_rank_reads_exactly_its_part(tmp_path, saved, loaded):
    from gigatrain.checkpoint_sharded import SavedPiece, ShardedReader, _Job, _publish, _write_rank

    tensors = {"param/w": ((8, 12), 0), "param/v": ((12, 8), 1), "optim/w/exp_avg": ((8, 12), 0)}
    values = {tid: torch.randn(shape) for tid, (shape, _) in tensors.items()}
    dp, tp = saved
    tmp, ck = tmp_path / ".tmp_step_000001", tmp_path / "step_000001"
    (tmp / "shards").mkdir(parents=True)
    for rank in range(dp * tp):
        pieces = []
        for tid, (shape, dim) in tensors.items():
            box, (a, b) = _layout_pieces(shape, dp, tp, dim)[rank]
            local = values[tid] if box is None else values[tid].narrow(*box)
            pieces.append(SavedPiece(tid, shape, box, a, b, lambda t=local.reshape(-1)[a:b].clone(): t))
        job = _Job(tmp, ck, tmp_path, rank, dp * tp, pieces,
                   {"w": {"step": 3.0}} if rank == 0 else {}, {}, 0, {"cpu": torch.get_rng_state()})
        assert _write_rank(job) is None
    _publish(job)
    assert json.loads((ck / "index.json").read_text())["scalars"] == {"w": {"step": 3.0}}
    dp2, tp2 = loaded
    for rank in range(dp2 * tp2):
        reader = ShardedReader.open(ck)
        need = 0
        for tid, (shape, dim) in tensors.items():
            box, (a, b) = _layout_pieces(shape, dp2, tp2, dim)[rank]
            got = reader.read(tid, box, a, b)
            local = values[tid] if box is None else values[tid].narrow(*box)
            assert torch.equal(got, local.reshape(-1)[a:b]), (tid, rank)
            need += 4 * (b - a)
        assert reader.bytes_read == need, (rank, reader.bytes_read, need)


def test_an_incomplete_checkpoint_is_refused(tmp_path):
    from gigatrain.checkpoint_sharded import SavedPiece, ShardedReader, _Job, _publish, _write_rank

    (tmp_path / ".tmp" / "shards").mkdir(parents=True)
    t = torch.arange(10.0)
    job = _Job(tmp_path / ".tmp", tmp_path / "step_000002", tmp_path, 0, 1,
               [SavedPiece("param/x", (10,), None, 0, 6, lambda: t[:6])], {}, {}, 0, {"cpu": torch.get_rng_state()})
    _write_rank(job)
    _publish(job)
    reader = ShardedReader.open(tmp_path / "step_000002")
    assert torch.equal(reader.read("param/x", None, 1, 5), t[1:5])
    with pytest.raises(ValueError, match="missing elements"):
        reader.read("param/x", None, 0, 10)


def test_files_are_safetensors_that_never_unpickle(tmp_path):
    from safetensors.torch import load_file

    from gigatrain.checkpoint_sharded import write_safetensors

    a, b = torch.randn(5), torch.tensor([1.0, float("nan")])
    bad = write_safetensors(tmp_path / "x.safetensors", [("a", torch.float32, (5,), lambda: a),
                                                         ("b", torch.float32, (2,), lambda: b)])
    assert bad == "b"
    got = load_file(str(tmp_path / "x.safetensors"))
    assert torch.equal(got["a"], a) and got["b"][0] == 1.0


# ---------------------------------------------------------------- ladder 3: layouts

STEPS, MORE = 3, 3


def _continue(dims, zero, *, load=None, save=None, steps, offload="none", async_save=False):
    from test_tensor_parallel import _engine, _micro_batches

    eng, mesh = _engine("gpt_nobias", "sgd", dims, zero=zero, offload=offload)
    start = eng.load(load) if load else 0
    losses = []
    with eng:
        for step in range(start, start + steps):
            losses.append(eng.train_step(_micro_batches("gpt_nobias", step, mesh, 2), 0.5).loss)
        if save:
            eng.save(save, async_save=async_save)
            losses.append(None)     # training would go on here while the files are written
            eng.wait_for_save()
    return [x for x in losses if x is not None]


def _ranks(rank, world, root):
    out = {}
    out["first"] = _continue((4, 1, 1), 3, save=f"{root}/a", steps=STEPS)
    ck = f"{root}/a/step_{STEPS:06d}"
    out["dp4z3->dp2z1"] = _continue((2, 2, 1), 1, load=ck, steps=MORE)   # dp2 x pp2, ZeRO-1
    out["dp4z3->dp2-z1"] = _continue((4, 1, 1), 1, load=ck, steps=MORE)
    out["pp-first"] = _continue((2, 2, 1), 1, save=f"{root}/b", steps=STEPS, async_save=True)
    out["dp2pp2->dp4z3-offload"] = _continue((4, 1, 1), 3, load=f"{root}/b/step_{STEPS:06d}", steps=MORE,
                                             offload="cpu")
    return out


def _dp2_zero1(rank, world, ck):
    return _continue((2, 1, 1), 1, load=ck, steps=MORE)


@functools.lru_cache(maxsize=None)
def results():
    import tempfile

    from dist_utils import one_process

    root = tempfile.mkdtemp(prefix="gigatrain-sharded-")
    four = spawn(_ranks, 4, root, timeout_s=240)
    two = spawn(_dp2_zero1, 2, f"{root}/a/step_{STEPS:06d}", timeout_s=120)
    with one_process():
        one = _continue((1, 1, 1), 0, load=f"{root}/a/step_{STEPS:06d}", steps=MORE)
    return root, four, two, one


def _straight():
    from test_tensor_parallel import oracle

    return oracle("gpt_nobias", "sgd", STEPS + MORE)["losses"]


@pytest.mark.rung3
def test_saved_at_dp4_zero3_continues_in_other_layouts():
    root, four, two, one = results()
    ref = _straight()
    for r in four:
        assert_curves_close(r["first"], ref[:STEPS], 1e-5, "dp4 zero3")
        assert_curves_close(r["dp4z3->dp2z1"], ref[STEPS:], 1e-5, "dp2 x pp2 zero1")
        assert_curves_close(r["dp4z3->dp2-z1"], ref[STEPS:], 1e-5, "dp4 zero1")
    for r in two:
        assert_curves_close(r, ref[STEPS:], 1e-5, "dp2 zero1")
    assert_curves_close(one, ref[STEPS:], 1e-5, "one process, zero 0")


@pytest.mark.rung3
def test_saved_at_dp2_pp2_continues_at_dp4_zero3_with_offload():
    root, four, _, _ = results()
    ref = _straight()
    for r in four:
        assert_curves_close(r["pp-first"], ref[:STEPS], 1e-5, "dp2 x pp2")
        assert_curves_close(r["dp2pp2->dp4z3-offload"], ref[STEPS:], 1e-5, "dp4 zero3 cpu offload")


@pytest.mark.rung3
def test_every_rank_wrote_its_own_pieces_once():
    from pathlib import Path

    root, _, _, _ = results()
    for name, writers in (("a", 4), ("b", 4)):
        ck = Path(root) / name / f"step_{STEPS:06d}"
        index = json.loads((ck / "index.json").read_text())
        files = {pc["file"] for t in index["tensors"].values() for pc in t["pieces"]}
        assert len(files) == writers and (Path(root) / name / "latest").read_text().strip() == ck.name
        for tid, t in index["tensors"].items():
            # The pieces tile the tensor exactly: no element written twice or left out.
            n = sum(pc["range"][1] - pc["range"][0] for pc in t["pieces"])
            assert n == math.prod(t["shape"]), tid
        assert not any(p.name.startswith(".tmp") for p in (Path(root) / name).iterdir())
