"""Runs never lose or corrupt work: divergence, leftovers of killed runs, overwrites, locks.

A diverging run stops with one paragraph and leaves only finite checkpoints that resume=auto can
continue from; a fresh start never overwrites a run; a folder held by a live run is refused; the
leftovers of dead runs are swept at start. Ladder 0 and 3 (tiny models, one or two processes).
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gigatrain import checkpoint as ckpt
from gigatrain.cli import main
from gigatrain.rundir import LOCK_FILE, OWNER_FILE

pytestmark = pytest.mark.rung3

BASE = ["model.n_layer=1", "model.d_model=16", "model.n_head=2", "model.seq_len=16",
        "data.name=pystdlib", "data.max_chars=50000", "train.steps=2", "train.sample_tokens=0",
        "--quiet"]
ONE = [*BASE, "--nproc", "1"]
DIVERGE = [*BASE, "train.steps=12", "checkpoint.every=1"]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _owner(pid: int, host: str | None = None) -> str:
    return json.dumps({"host": host or socket.gethostname(), "pid": pid, "started": "earlier"})


def _all_finite(root: Path) -> bool:
    files = list(root.rglob("*.safetensors"))
    assert files
    return all(bool(torch.isfinite(t).all()) for f in files for t in load_file(str(f)).values()
               if t.is_floating_point())


def test_divergence_stops_with_one_paragraph_and_keeps_good_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *DIVERGE, "--nproc", "1", "train.stop_after=3", f"--out={out}"]) == 0
    # lr=1e6 on two processes: a finite loss with a NaN gradient norm from the next step on.
    r = subprocess.run([sys.executable, "-m", "gigatrain", "train", *DIVERGE, "--nproc", "2", "train.lr=1e6",
                        "resume=auto", f"--out={out}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert r.stderr.count("gigatrain: error:") == 1 and "training diverged" in r.stderr
    assert _all_finite(out / "checkpoints")
    # The step after the resume took a finite but ruinous update; its weights gave the NaN, so
    # that checkpoint is set aside and `latest` goes back to the last good one.
    assert ckpt.find_latest(out / "checkpoints").name == "step_000003"
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r.get("nonfinite")] == [5, 6, 7, 8, 9]
    assert not (out / LOCK_FILE).exists()
    capsys.readouterr()
    assert main(["train", *DIVERGE, "--nproc", "1", "train.steps=6", "resume=auto", f"--out={out}"]) == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] < 6 and not r["skipped"] for r in recs)


def test_nonfinite_checkpoint_is_never_written(tmp_path):
    class OneRank:
        def barrier(self):
            pass

        def all_reduce_scalar(self, value, op=None, device=None):
            return value

    def save(step, value):
        return ckpt.save_checkpoint(tmp_path, step, rank=0, world_comm=OneRank(),
                                    params={"w": torch.full((2,), value)}, optim={}, meta={},
                                    device=torch.device("cpu"))
    save(1, 1.0)
    with pytest.raises(ckpt.NonFiniteCheckpointError, match="parameter w"):
        save(2, float("nan"))
    assert ckpt.list_checkpoints(tmp_path) == [1] and (tmp_path / "latest").read_text().strip() == "step_000001"
    assert not list(tmp_path.glob(".tmp*"))


def test_partial_checkpoint_records_its_owner(tmp_path, monkeypatch):
    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ckpt, "save_file", disk_full)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 4, rank=0, world_comm=type("C", (), {
            "barrier": lambda s: None, "all_reduce_scalar": lambda s, v, **k: v})(),
            params={"w": torch.ones(2)}, optim={}, meta={}, device=torch.device("cpu"))
    owner = json.loads((tmp_path / ".tmp_step_000004" / OWNER_FILE).read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()


def test_leftovers_of_dead_runs_are_swept_at_start(tmp_path, capsys):
    out = tmp_path / "run"
    dead, alive = _dead_pid(), os.getpid()
    left = {}
    for name, owner in (("dead", _owner(dead)), ("alive", _owner(alive)), ("elsewhere", _owner(dead, "other-host"))):
        for parent, prefix in ((out / "checkpoints", f".tmp_step_00000{len(left) + 1}"),
                               (out / "offload", f"gigatrain-nvme-rank0-{name}")):
            d = parent / prefix
            d.mkdir(parents=True)
            (d / OWNER_FILE).write_text(owner)
            (d / "data.f32").write_bytes(b"\0" * 64)
            left[d] = name
    assert main(["train", *ONE, f"--out={out}", f"parallel.offload_dir={out / 'offload'}"]) == 0
    assert "leftover" in capsys.readouterr().out
    assert {left[d] for d in left if d.exists()} == {"alive", "elsewhere"}


def test_nvme_offload_sweeps_dead_folders_before_its_space_check(tmp_path):
    from gigatrain.parallel.zero.nvme import NVMeOptimizer, OptimizerSpec
    stale = tmp_path / "gigatrain-nvme-rank1-abc"
    stale.mkdir()
    (stale / OWNER_FILE).write_text(_owner(_dead_pid()))
    (stale / "master.f32").write_bytes(b"\0" * 1024)
    spec = OptimizerSpec.from_factory(lambda groups: torch.optim.SGD(groups, lr=0.1))
    opt = NVMeOptimizer(16, spec, tmp_path, name="rank0")
    assert not stale.exists()
    assert json.loads((opt.folder / OWNER_FILE).read_text())["pid"] == os.getpid()
    opt.close()
    assert not opt.folder.exists()


def test_fresh_start_never_overwrites_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *ONE, f"--out={out}"]) == 0
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", *ONE, "train.seed=7", f"--out={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gigatrain: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert "resume=auto" in err and "--overwrite" in err
    assert (out / "metrics.jsonl").read_text() == before
    assert ckpt.list_checkpoints(out / "checkpoints") == [2]
    # Continuing is fine; an explicit overwrite starts afresh with nothing of the old run left.
    assert main(["train", *ONE, "train.steps=3", "resume=auto", f"--out={out}"]) == 0
    assert main(["train", *ONE, "train.steps=1", "--overwrite", f"--out={out}"]) == 0
    assert ckpt.list_checkpoints(out / "checkpoints") == [1]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_without_out_every_run_gets_a_fresh_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *ONE]) == 0
    assert main(["train", *ONE]) == 0
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(r.name.startswith("gpt-pystdlib-") for r in runs)
    assert all((r / "metrics.jsonl").is_file() for r in runs)
    printed = capsys.readouterr().out
    assert all(f"writing to {Path('runs') / r.name}" in printed for r in runs)
    # resume=auto needs to know which run: the message names the newest one.
    assert main(["train", *ONE, "resume=auto"]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "runs/gpt-pystdlib-" in err


def test_out_held_by_a_live_run_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_FILE).write_text(_owner(holder.pid))
        assert main(["train", *ONE, f"--out={out}"]) == 2
        err = capsys.readouterr().err
        assert f"PID {holder.pid} on host {socket.gethostname()}" in err and err.count("\n") == 1
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(["train", *ONE, f"--out={out}"]) == 0
    assert "took over the stale lock" in capsys.readouterr().out
    assert not (out / LOCK_FILE).exists()
    # A lock from another host cannot be checked: refused, saying how to clear it.
    (out / LOCK_FILE).write_text(_owner(1, "node-17"))
    assert main(["train", *ONE, "resume=auto", f"--out={out}"]) == 2
    err = capsys.readouterr().err
    assert "node-17" in err and "delete" in err
