"""`gigatrain train` with pipeline parallelism matches one process (ladder 3, one spawn).

Schedules and the runtime are tested in depth in test_pipeline_*.py; this checks the engine's
composition: pp with every schedule, dp x pp, pipeline checkpoints loading into one process, the
timeline picture and the bubble in the metrics.
"""
import json

import pytest

from dist_utils import spawn
from test_train import tiny

pytestmark = pytest.mark.rung3


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def pp_cfg(tmp, name, *extra):
    # No evaluation: test_pipeline_traffic_is_counted counts a training step's messages exactly.
    # Evaluation through pipelines runs in test_cli_defaults (the default job evaluates at the end).
    return tiny(tmp, "model.n_layer=4", "train.optimizer=sgd", "train.lr=0.5", "train.grad_clip=0.5",
                "train.eval_every=0", f"out={tmp}/{name}", *extra)


def _four_rank_cases(rank, world, tmp):
    from gigatrain.trainer import train
    out, sent = {}, {}
    # global batch 8, micro 2 -> 4 micro-batches per step on a single pipeline
    # (schedules x pp sizes are covered in depth by test_pipeline_runtime.py)
    for sched, v, pp in (("1f1b", 1, 2), ("gpipe", 1, 4), ("interleaved", 2, 2), ("zb", 2, 2), ("zb", 1, 4),
                         ("naive", 1, 4)):
        key = f"{sched}-pp{pp}-v{v}"
        r = train(pp_cfg(tmp, key, f"parallel.pp={pp}", f"parallel.dp={4 // pp}", "train.micro_batch=2",
                         f"parallel.pp_schedule={sched}", f"parallel.pp_virtual={v}"), quiet=True)
        out[key] = r.losses
        sent[key] = r.comm_sent.get("pp", {})
    # dp x pp with the optimizer sharded over dp (DeepSpeed cannot combine its pipeline with ZeRO)
    out["1f1b-pp2-zero1"] = train(pp_cfg(tmp, "z1", "parallel.pp=2", "parallel.dp=2", "train.micro_batch=2",
                                         "parallel.zero=1"), quiet=True).losses
    return out, sent


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pp")
    from gigatrain.data import prepare_dataset
    from gigatrain.trainer import train
    cfg = tiny(tmp)
    prepare_dataset(cfg.data, cfg.model.seq_len)
    one = train(pp_cfg(tmp, "one", "train.micro_batch=2"), quiet=True).losses
    results = spawn(_four_rank_cases, 4, str(tmp), timeout_s=180)
    four = [losses for losses, _ in results]
    sent = [s for _, s in results]
    return tmp, one, four, sent


def test_every_schedule_matches_one_process(runs):
    _, one, four, _ = runs
    assert one[-1] < one[0]
    keys = four[0].keys()
    assert {"gpipe-pp4-v1", "1f1b-pp2-v1", "interleaved-pp2-v2", "zb-pp4-v1", "zb-pp2-v2",
            "naive-pp4-v1", "1f1b-pp2-zero1"} <= set(keys)
    for r in four:
        for k in keys:
            assert len(r[k]) == 10
            for a, b in zip(r[k], one):
                assert _rel(a, b) < 1e-5, (k, r[k], one)


def test_pipeline_outputs_and_checkpoint_load_in_one_process(runs):
    tmp, one, _, _ = runs
    run = tmp / "1f1b-pp2-v1"
    assert (run / "pipeline_timeline.png").stat().st_size > 10_000
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 < rec["pipeline_bubble"] < 1.0
    ck = run / "checkpoints" / "step_000010"
    # Every rank wrote its own pieces (dp 2 x pp 2, ZeRO 0: dp rank 0 of each stage holds them).
    assert sorted(p.name for p in (ck / "shards").glob("*.safetensors")) == [f"rank{r}.safetensors" for r in range(4)]
    written = {pc["file"] for t in json.loads((ck / "index.json").read_text())["tensors"].values() for pc in t["pieces"]}
    assert written == {"shards/rank0.safetensors", "shards/rank1.safetensors"}
    # The pipeline checkpoint (2 stages x dp 2) continues in one process with the same numbers as
    # a one-process checkpoint of the same step.
    from gigatrain.checkpoint import load_checkpoint
    a, b = load_checkpoint(ck), load_checkpoint(tmp / "one" / "checkpoints" / "step_000010")
    assert a.params.keys() == b.params.keys()
    for k in a.params:
        assert (a.params[k] - b.params[k]).abs().max().item() < 1e-5, k


def test_pipeline_traffic_is_counted(runs):
    """dp=2 x pp=2 1F1B, 10 steps of 2 micro-batches [2, 32] of width 32 per pipeline (global
    batch 8 = 2 x 2 x dp 2): the first stage sends each
    activation (plus the shape header once) and the tied embedding gradient; the last stage
    sends each activation gradient, the tied gradient, and broadcasts the loss."""
    tmp, _, _, sent = runs
    from gigatrain.checkpoint import load_checkpoint
    wte = load_checkpoint(tmp / "1f1b-pp2-v1" / "checkpoints" / "step_000010").params["stem.wte.weight"]
    act, tied, steps, m = 2 * 32 * 32 * 4, wte.numel() * 4, 10, 2
    first, last = sent[0]["1f1b-pp2-v1"], sent[1]["1f1b-pp2-v1"]   # global ranks 0 and 1: pp 0 and pp 1
    assert first["send"] == steps * (m * act + tied) + 10 * 8
    assert last["send"] == steps * (m * act + tied)
    assert last["broadcast"] == steps * 4 and "broadcast" not in first
