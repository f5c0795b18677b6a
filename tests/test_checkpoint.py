"""Checkpoint files, rotation, the latest pointer, buffers, and metrics on resume (ladder 0)."""
import json

import pytest
import torch

from gigatrain import checkpoint as ckpt
from gigatrain.metrics import MetricsLogger


class _NoComm:
    def barrier(self):
        pass

    def all_reduce_scalar(self, value, op=None, device=None):
        return value


def _save(root, step, keep=2):
    p = {"w": torch.full((2, 2), float(step))}
    o = {"w": {"exp_avg": torch.zeros(2, 2), "step": torch.tensor(float(step))}}
    return ckpt.save_checkpoint(root, step, rank=0, world_comm=_NoComm(), params=p, optim=o,
                                meta={"note": "t"}, device=torch.device("cpu"), keep=keep)


def test_rotation_latest_and_roundtrip(tmp_path):
    for s in (1, 2, 3, 4):
        _save(tmp_path, s)
    assert ckpt.list_checkpoints(tmp_path) == [3, 4]
    assert ckpt.find_latest(tmp_path).name == "step_000004"
    got = ckpt.load_checkpoint(tmp_path / "step_000004")
    assert got.step == 4 and torch.equal(got.params["w"], torch.full((2, 2), 4.0))
    assert torch.equal(got.optim["w"]["exp_avg"], torch.zeros(2, 2)) and got.meta["note"] == "t"
    assert not list(tmp_path.glob(".tmp*"))
    # A run resumed from step 3 writes a new step 4 and continues: 'latest' follows it, and the
    # abandoned run's later checkpoints never replace what it just wrote.
    _save(tmp_path, 5)          # abandoned run's future
    _save(tmp_path, 4, keep=1)  # resumed run rewrites 4 and keeps only it among steps <= 4
    assert ckpt.find_latest(tmp_path).name == "step_000004"
    assert (tmp_path / "step_000004" / "meta.json").is_file()
    assert ckpt.resolve_resume("auto", tmp_path).name == "step_000004"


def test_half_written_checkpoint_is_ignored(tmp_path):
    _save(tmp_path, 1)
    broken = tmp_path / "step_000002"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"partial")
    (tmp_path / "latest").unlink()
    assert ckpt.find_latest(tmp_path).name == "step_000001"


def test_metrics_resume_drops_steps_after_the_checkpoint(tmp_path):
    log = MetricsLogger(tmp_path)
    for s in range(1, 7):
        log.log({"step": s, "loss": float("nan") if s == 6 else 1.0 / s})
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["loss"] is None          # NaN is written as null, valid JSON
    log = MetricsLogger(tmp_path, resume_step=4)
    log.log({"step": 5, "loss": 0.5})
    log.close()
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


@pytest.mark.rung3
def test_engine_state_has_batchnorm_buffers():
    from types import SimpleNamespace

    from dist_utils import one_process

    from gigatrain.distributed.mesh import Mesh, ParallelDims
    from gigatrain.models import build_model
    from gigatrain.optim import build_optimizer
    from dist_utils import engine_for

    with one_process():
        cpu = torch.device("cpu")
        mesh = Mesh(ParallelDims(dp=1), cpu)
        tcfg = SimpleNamespace(optimizer="adamw", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), momentum=0.0)
        mcfg = SimpleNamespace(name="coatnet", coatnet_depths=[1, 1, 1, 1], coatnet_dims=[8, 8, 16, 16], n_head=2)

        def make():
            torch.manual_seed(0)
            return engine_for(build_model(mcfg), mesh, lambda g: build_optimizer(tcfg, g, cpu))
        a = make()
        a.train_step([a.model.example_batch(4)], lr=1e-3)
        params, optim = a.full_state()
        bn = [k for k in params if k.endswith("running_mean")]
        assert bn, "BatchNorm statistics must be saved"
        b = make()
        b.load_full_state(params, optim)
        for k, v in b.full_state()[0].items():
            assert torch.equal(v, params[k]), k
