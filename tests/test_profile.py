"""Step profile: forward, backward, exposed communication, optimizer and data-wait seconds in every
line of metrics.jsonl, and a torch.profiler trace of chosen steps."""
import json
import time
from types import SimpleNamespace

import pytest
import torch

from dist_utils import spawn
from gigatrain.profiling import StepProfile
from test_train import tiny

KEYS = ("forward_s", "backward_s", "comm_exposed_s", "optimizer_s", "loader_wait_s")


@pytest.mark.rung0
def test_blocked_time_moves_from_its_phase_to_comm():
    stats = SimpleNamespace(blocked_s=0.0)
    prof = StepProfile(stats, torch.device("cpu"))
    prof.begin()
    with prof.phase("backward"):
        time.sleep(0.03)
        stats.blocked_s += 0.02          # a wait on a collective inside backward
    prof.add("forward", 0.5)
    rec = prof.record()
    assert rec["comm_exposed_s"] == pytest.approx(0.02)
    assert 0.005 < rec["backward_s"] < 0.03 and rec["forward_s"] == 0.5 and rec["optimizer_s"] == 0.0
    prof.begin()
    assert set(prof.record().values()) == {0.0}


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _check(recs: list[dict], comm: bool) -> None:
    assert recs
    for r in recs:
        assert all(r[k] is not None and r[k] >= 0 for k in KEYS), r
        assert r["forward_s"] > 0 and r["backward_s"] > 0 and r["optimizer_s"] > 0
        # Disjoint phases: together at most the step's wall time.
        assert sum(r[k] for k in KEYS[:4]) <= r["step_time_s"] * 1.02 + 1e-3
    assert (max(r["comm_exposed_s"] for r in recs) > 0) == comm


@pytest.mark.rung0
def test_every_metrics_line_has_the_step_profile_and_the_trace_is_written(tmp_path):
    from gigatrain.data import prepare_dataset
    from gigatrain.trainer import train
    prepare_dataset(tiny(tmp_path).data, 32)
    train(tiny(tmp_path, "train.steps=5", "train.profile_steps=2,3", f"out={tmp_path}/one"), quiet=True)
    _check(_records(tmp_path / "one"), comm=False)        # one process: nothing to wait for
    trace = json.loads((tmp_path / "one" / "profile" / "rank0.pt.trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"forward", "backward", "optimizer"} <= names


def _two_ranks(rank, world, tmp):
    from pathlib import Path

    from gigatrain.trainer import train
    train(tiny(tmp, "train.steps=4", "parallel.zero=2", f"out={tmp}/dp"), quiet=True)
    train(tiny(tmp, "train.steps=4", "parallel.pp=2", "train.micro_batch=2", f"out={tmp}/pp"), quiet=True)
    return rank == 0 and (_records(Path(tmp) / "dp"), _records(Path(tmp) / "pp"))


@pytest.mark.rung3
def test_two_ranks_expose_communication(tmp_path):
    from gigatrain.data import prepare_dataset
    prepare_dataset(tiny(tmp_path).data, 32)
    dp, pp = spawn(_two_ranks, 2, str(tmp_path), timeout_s=120)[0]
    _check(dp, comm=True)
    _check(pp, comm=True)
