"""Batch-size ramp (exact data order, schedule in samples, resume across a ramp boundary, dp2
parity) and time-to-accuracy targets."""
import json

import pytest

from dist_utils import assert_curves_close, spawn
from gigatrain.data.sampler import BatchRamp, GlobalBatchSampler
from test_train import tiny

RAMP = ["train.global_batch=16", "train.micro_batch=2", "train.batch_ramp=4,4,40", "train.optimizer=sgd",
        "train.lr=0.3", "train.warmup_steps=0"]


@pytest.mark.rung0
def test_ramp_sizes_offsets_and_stream():
    r = BatchRamp(4, 4, 40, 16)
    sizes = [r.size(s) for s in range(10)]
    # n = 3 increments of 40/3 samples: 4 below 13.3 consumed, 8 below 26.7, 12 below 40.
    assert sizes == [4, 4, 4, 4, 8, 8, 12, 16, 16, 16] and r.ramp_steps == 7
    assert [r.offset(s) for s in range(10)] == [0, 4, 8, 12, 16, 24, 32, 44, 60, 76]
    s = GlobalBatchSampler(100, 16, seed=3, ramp=r)
    flat = GlobalBatchSampler(100, 1, seed=3)
    # The ramp reads the same sample stream, only cut differently.
    stream = [int(i) for k in range(80) for i in flat.indices_for_step(k)]
    got = [int(i) for k in range(8) for i in s.indices_for_step(k)]
    assert got == stream[:len(got)] and len(got) == 60
    assert [len(x) for x in s.local_microbatches(5, 1, 2, 2)] == [2, 2]
    with pytest.raises(ValueError):
        BatchRamp(4, 5, 40, 16)


def _two_ranks(rank, world, tmp):
    from gigatrain.trainer import train
    full = train(tiny(tmp, *RAMP, f"out={tmp}/dp2"), quiet=True).losses
    # Stop inside the ramp (after step 3 of its 7) and resume: the same curve.
    first = train(tiny(tmp, *RAMP, "train.stop_after=3", "checkpoint.every=3", f"out={tmp}/res"), quiet=True).losses
    second = train(tiny(tmp, *RAMP, "resume=auto", f"out={tmp}/res"), quiet=True).losses
    return full, first + second


@pytest.mark.rung3
def test_ramp_matches_one_process_and_resumes_exactly(tmp_path):
    from gigatrain.data import prepare_dataset
    from gigatrain.trainer import train
    prepare_dataset(tiny(tmp_path).data, 32)
    one = train(tiny(tmp_path, *RAMP, f"out={tmp_path}/one"), quiet=True).losses
    recs = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    # Samples per step follow the ramp; the schedule runs on samples (cosine over 124 samples).
    assert [round(r["samples_per_s"] * r["step_time_s"]) for r in recs] == [4, 4, 4, 4, 8, 8, 12, 16, 16, 16]
    assert recs[0]["lr"] == pytest.approx(0.3) and recs[4]["lr"] > recs[8]["lr"]
    for full, resumed in spawn(_two_ranks, 2, str(tmp_path), timeout_s=180):
        assert_curves_close(full, one, rtol=1e-5, what="dp2 with a ramp")
        assert resumed == full


@pytest.mark.rung0
def test_target_stops_training_and_reports(tmp_path):
    from gigatrain.data import prepare_dataset
    from gigatrain.trainer import train
    prepare_dataset(tiny(tmp_path).data, 32)
    r = train(tiny(tmp_path, "train.eval_every=2", "train.target=val_loss<=100", f"out={tmp_path}/t"), quiet=True)
    assert r.target["step"] == 2 and r.target["samples"] == 16 and r.target["seconds"] > 0
    assert len(r.losses) == 2 and (tmp_path / "t" / "checkpoints" / "step_000002").is_dir()
    last = json.loads((tmp_path / "t" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["target_reached"] == "val_loss<=100" and last["samples_to_target"] == 16
    never = train(tiny(tmp_path, "train.eval_every=5", "train.target=val_accuracy>=0.99", f"out={tmp_path}/n"),
                  quiet=True)
    assert never.target is None and len(never.losses) == 10     # a text model has no accuracy
