"""Process lifecycle: workers die with their launcher, SIGTERM/SIGINT stop a job with a checkpoint
that resumes exactly, a lost rank is named, and every failure is one paragraph (ladder 0 and 3).

The process tests start the real CLI (our launcher, and the srun path simulated with SLURM
variables) and signal it; tiny models, so each launch costs a few seconds of start-up.
"""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gigatrain.cli import main, nproc_warning
from gigatrain.distributed.launch import EXIT_FAILED, EXIT_STOPPED, free_port


ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.seq_len=32", "data.name=pystdlib",
        "data.max_chars=200000", "train.sample_tokens=0", "precision=fp32", "--quiet"]
LONG = ["train.steps=100000", "checkpoint.every=0"]  # runs until it is signalled


def _tiny(tmp):
    return [*TINY, f"data.cache_dir={tmp}/cache"]


def _one(tmp):
    """One process, in this one (the default config asks for more)."""
    return [*_tiny(tmp), "--nproc", "1"]


def _start(args, log: Path, env=None) -> subprocess.Popen:
    """``python -m gigatrain train <args>`` in a new session, output to ``log``."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "gigatrain", "train", *args], cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})})


def _steps(out: Path) -> list[float]:
    """Losses in metrics.jsonl, in step order (checked to be 1, 2, 3, ...)."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    assert [r["step"] for r in recs] == list(range(1, len(recs) + 1))
    return [r["loss"] for r in recs]


def _wait_for_steps(out: Path, n: int, procs, timeout=90.0) -> None:
    deadline = time.monotonic() + timeout
    while len(_steps(out)) < n:
        assert all(p.poll() is None for p in procs), "the run ended before it was signalled"
        assert time.monotonic() < deadline, "the run did not start"
        time.sleep(0.2)


def _children(pid: int) -> list[int]:
    kids = []
    for f in Path(f"/proc/{pid}/task").glob("*/children"):
        kids += [int(x) for x in f.read_text().split()]
    return kids


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def _wait(procs, timeout: float) -> float:
    t0 = time.monotonic()
    for p in procs:
        p.wait(timeout=max(0.1, timeout - (time.monotonic() - t0)))
    return time.monotonic() - t0


def _srun(args, tmp: Path, name: str, n=2) -> list[subprocess.Popen]:
    """What ``srun -n 2 python -m gigatrain train ...`` starts: one task per rank, SLURM variables."""
    port = str(free_port())
    return [_start(args, tmp / f"{name}{r}.log", env={
        "SLURM_PROCID": str(r), "SLURM_NTASKS": str(n), "SLURM_STEP_ID": "0", "SLURM_LOCALID": str(r),
        "SLURM_NTASKS_PER_NODE": str(n), "SLURM_JOB_NODELIST": "127.0.0.1", "MASTER_PORT": port})
        for r in range(n)]


def _no_traceback(*logs: Path) -> str:
    text = "".join(p.read_text() for p in logs)
    assert "Traceback" not in text, text
    return text


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lifecycle")
    from gigatrain.config import load_config
    from gigatrain.data import prepare_dataset
    cfg = load_config(None, [a for a in _tiny(tmp) if "=" in a])
    prepare_dataset(cfg.data, cfg.model.seq_len)
    return tmp


@pytest.mark.rung3
def test_sigkill_to_the_launcher_takes_the_workers_with_it(data, tmp_path):
    out = tmp_path / "run"
    launcher = _start([*_tiny(data), *LONG, "--nproc", "2", f"--out={out}"], tmp_path / "log")
    try:
        _wait_for_steps(out, 3, [launcher])
        workers = _children(launcher.pid)
        assert len(workers) == 2 and all(map(_alive, workers))
        os.killpg(launcher.pid, signal.SIGKILL)  # the launcher's whole process group
        launcher.wait(timeout=10)
        t0 = time.monotonic()
        while any(map(_alive, workers)) and time.monotonic() - t0 < 10:
            time.sleep(0.1)
        assert not any(map(_alive, workers)), "workers outlived their launcher by 10 s"
    finally:
        for pid in _children(launcher.pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.rung3
def test_sigterm_stops_with_a_checkpoint_that_resumes_exactly_and_a_killed_rank_is_named(data, tmp_path):
    out, ref = tmp_path / "run", tmp_path / "ref"
    # 1. Our launcher, SIGTERM at step k >= 3 with checkpoint.every=0.
    launcher = _start([*_tiny(data), *LONG, "--nproc", "2", f"--out={out}"], tmp_path / "a.log")
    _wait_for_steps(out, 3, [launcher])
    workers = _children(launcher.pid)
    launcher.send_signal(signal.SIGTERM)
    took = _wait([launcher], 60)
    assert launcher.returncode == EXIT_STOPPED, (tmp_path / "a.log").read_text()
    assert not any(map(_alive, workers))
    k = len(_steps(out))
    assert (out / "checkpoints" / f"step_{k:06d}" / "meta.json").is_file()
    text = _no_traceback(tmp_path / "a.log")
    assert text.count("resume=auto") == 1 and f"--out {out}" in text
    print(f"launcher stopped {took:.1f} s after SIGTERM at step {k}")

    # 2. resume=auto through the srun path; SIGTERM to every task (what srun does) at step k2 > k.
    tasks = _srun([*_tiny(data), *LONG, "resume=auto", f"--out={out}"], tmp_path, "b")
    _wait_for_steps(out, k + 3, tasks)
    for p in tasks:
        p.send_signal(signal.SIGTERM)
    took = _wait(tasks, 60)
    assert [p.returncode for p in tasks] == [EXIT_STOPPED] * 2, (tmp_path / "b0.log").read_text()
    resumed = _steps(out)
    k2 = len(resumed)
    assert (out / "checkpoints" / f"step_{k2:06d}").is_dir() and k2 > k
    _no_traceback(tmp_path / "b0.log", tmp_path / "b1.log")
    print(f"srun tasks stopped {took:.1f} s after SIGTERM at step {k2}")

    # 3. Uninterrupted reference: identical losses; then SIGKILL one of its workers.
    launcher = _start([*_tiny(data), *LONG, "--nproc", "2", f"--out={ref}"], tmp_path / "c.log")
    _wait_for_steps(ref, k2 + 1, [launcher])
    assert _steps(ref)[:k2] == resumed
    victim = _children(launcher.pid)[1]
    os.kill(victim, signal.SIGKILL)
    launcher.wait(timeout=60)
    assert launcher.returncode == EXIT_FAILED
    text = _no_traceback(tmp_path / "c.log")
    assert text.count("gigatrain: error:") == 1, text
    line = next(x for x in text.splitlines() if "gigatrain: error:" in x)
    assert f"pid {victim}" in line and "SIGKILL" in line and "out-of-memory" in line and "after step" in line
    assert "rank 0" in line or "rank 1" in line


def _resume_error(rank, world, args):
    from gigatrain.checkpoint import CheckpointError
    from gigatrain.config import load_config
    from gigatrain.trainer import train
    try:
        train(load_config(None, args), quiet=True)
    except CheckpointError as e:
        return str(e)
    return None


@pytest.mark.rung3
def test_a_damaged_file_of_another_rank_is_named(data, tmp_path):
    from dist_utils import spawn

    out = tmp_path / "run"
    assert main(["train", *_one(data), "train.steps=2", f"--out={out}"]) == 0
    # Rank 1's RNG file is damaged: rank 0, which speaks for the job, must show rank 1's words.
    (out / "checkpoints" / "step_000002" / "rng_rank1.safetensors").write_bytes(b"\x00garbage")
    args = [a for a in _tiny(data) if "=" in a] + ["train.steps=4", "resume=auto", f"out={out}"]
    errors = spawn(_resume_error, 2, args, timeout_s=60)
    assert errors[1] and errors[0] == "rank 1: " + errors[1]
    assert errors[0].startswith("rank 1: ") and "rng_rank1.safetensors" in errors[0]


# ---- in one process ---------------------------------------------------------------------------

class _StopAt:
    """A stop request that arrives during step ``at`` (on every rank)."""

    def __init__(self, at: int):
        self.at, self.signum, self.saved = at, 0, None

    def step_done(self, step):
        if step == self.at:
            self.signum = signal.SIGTERM

    def checkpoint_saved(self, step):
        self.saved = step


@pytest.mark.rung3
def test_stop_saves_at_the_step_reached_and_resumes_bit_identically(data, tmp_path):
    from gigatrain.config import load_config
    from gigatrain.trainer import train

    def cfg(out, *extra):
        return load_config(None, [a for a in _tiny(data) if "=" in a]
                           + ["train.steps=8", "checkpoint.every=0", f"out={out}", *extra])

    stop = _StopAt(3)
    first = train(cfg(tmp_path / "a"), stop=stop, quiet=True)
    assert first.stopped_by == signal.SIGTERM and first.last_step == 3 and stop.saved == 3
    assert first.stop_checkpoint == str(tmp_path / "a" / "checkpoints" / "step_000003")
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").glob("step_*")) == ["step_000003"]
    rest = train(cfg(tmp_path / "a", "resume=auto"), quiet=True)
    whole = train(cfg(tmp_path / "b"), quiet=True)
    assert len(first.losses) == 3 and len(rest.losses) == 5
    assert first.losses + rest.losses == whole.losses


def test_sigint_in_a_single_process_run_stops_with_a_checkpoint(data, tmp_path, capsys):
    import threading

    out = tmp_path / "run"
    # SIGINT (Ctrl-C) once training runs; the handler runs in the main thread.
    def interrupt():
        while len(_steps(out)) < 2:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    before = signal.getsignal(signal.SIGINT)
    code = main(["train", *_one(data), *LONG, f"--out={out}"])
    err = capsys.readouterr().err
    assert code == EXIT_STOPPED, err
    k = len(_steps(out))
    assert (out / "checkpoints" / f"step_{k:06d}").is_dir()
    assert f"stopped by SIGINT after step {k}" in err and "resume=auto" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_a_full_disk_during_a_save_is_one_paragraph_and_a_log(data, tmp_path, capsys, monkeypatch):
    import gigatrain.checkpoint_sharded as ckpt

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "shards" / "rank0.safetensors"))

    monkeypatch.setattr(ckpt, "write_safetensors", full)
    out = tmp_path / "run"
    code = main(["train", *_one(data), "train.steps=3", "checkpoint.every=2", f"--out={out}"])
    err = capsys.readouterr().err
    assert code == EXIT_FAILED
    assert err.count("gigatrain: error:") == 1 and "Traceback" not in err
    assert "rank 0" in err and "after step 2" in err and "disk is full" in err
    log = out / "error-rank0.log"
    assert str(log) in err and "Traceback" in log.read_text() and "No space left" in log.read_text()


@pytest.mark.parametrize("setting", ["out", "offload"])
def test_unwritable_outputs_are_refused_before_launch(data, tmp_path, capsys, setting):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    args = ([f"--out={blocker}/run"] if setting == "out" else
            [f"--out={tmp_path}/run", "parallel.zero=3", "parallel.offload=nvme",
             f"parallel.offload_dir={blocker}/nvme"])
    code = main(["train", *_one(data), "train.steps=1", *args])
    err = capsys.readouterr().err
    assert code == 2 and "cannot be written" in err and "Traceback" not in err
    assert ("--out" if setting == "out" else "parallel.offload_dir") in err
    assert not (tmp_path / "run").exists() or setting == "offload"


def test_offload_dir_without_room_is_refused_before_launch(data, tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    code = main(["train", *_one(data), "train.steps=1", f"--out={tmp_path}/run", "parallel.zero=3",
                 "parallel.offload=nvme", f"parallel.offload_dir={tmp_path}/nvme"])
    err = capsys.readouterr().err
    assert code == 2 and "parallel.offload_dir" in err and "free" in err and "Traceback" not in err


@pytest.mark.rung0
@pytest.mark.parametrize("text,needle", [
    ("{not json", "not valid JSON"),
    ("\xff\xfe garbage", "not valid JSON"),
    ("[1, 2]", "holds a JSON list"),
    ('"step"', "holds a JSON str"),
    ('{"format": "gigatrain-checkpoint-v1"}', "has no integer step"),
])
def test_a_damaged_meta_json_is_named(tmp_path, text, needle):
    from gigatrain.checkpoint import CheckpointError, load_checkpoint

    d = tmp_path / "step_000001"
    d.mkdir()
    (d / "meta.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d)
    assert str(d / "meta.json") in str(e.value) and needle in str(e.value) and "damaged" in str(e.value)


@pytest.mark.rung0
def test_a_folder_given_as_the_config_file(tmp_path, capsys):
    assert main(["train", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a folder, not a config file" in err and "does not exist" not in err


@pytest.mark.rung0
def test_nproc_far_above_the_machine_is_warned_about():
    assert nproc_warning(2, cores=2, mem_available=8 * 2**30) is None
    assert nproc_warning(4, cores=2, mem_available=8 * 2**30) is None
    cores = nproc_warning(64, cores=2, mem_available=64 * 2**30)
    assert cores and "64" in cores and "2 CPU core" in cores and "\n" not in cores
    assert nproc_warning(64, cores=2, mem_available=64 * 2**30, gpus=8) is None
    memory = nproc_warning(8, cores=16, mem_available=2**30)
    assert memory and "memory" in memory


@pytest.mark.rung0
def test_the_launcher_names_what_no_worker_could_say(tmp_path, capfd):
    from types import SimpleNamespace

    from gigatrain.distributed import launch

    def failure(code, t=0):
        return SimpleNamespace(exitcode=code, pid=4242, timestamp=t)

    (tmp_path / "rank1.json").write_text(json.dumps({"rank": 1, "pid": 77, "host": "node7", "step": 12}))
    quiet = launch._Forwarder(60, str(tmp_path))
    # A rank killed by a signal is the cause, whatever the survivors said.
    assert launch._failure_code({0: failure(1), 1: failure(-9)}, str(tmp_path), quiet) == EXIT_FAILED
    err = capfd.readouterr().err
    assert "rank 1 (pid 77 on node7) was killed by SIGKILL after step 12" in err and "out-of-memory" in err
    # Workers that explained themselves (bad input, a stop, a reported failure): nothing to add.
    assert launch._failure_code({0: failure(EXIT_STOPPED), 1: failure(EXIT_STOPPED)}, str(tmp_path),
                                quiet) == EXIT_STOPPED
    assert launch._failure_code({1: failure(2)}, str(tmp_path), quiet) == 2
    assert capfd.readouterr().err == ""
    # Only ranks that lost a peer: the launcher shows what the first one saw.
    (tmp_path / "rank0.json").write_text(json.dumps({"outcome": "silent", "message": "rank 0 lost contact"}))
    assert launch._failure_code({0: failure(1)}, str(tmp_path), quiet) == EXIT_FAILED
    assert "gigatrain: error: rank 0 lost contact" in capfd.readouterr().err
    # Workers that outlived the grace period after a forwarded SIGTERM were killed by the launcher.
    late = launch._Forwarder(60, str(tmp_path))
    late.signum, late.expired = signal.SIGTERM, True
    assert launch._failure_code({0: failure(-9)}, str(tmp_path), late) == 128 + signal.SIGTERM
    assert "did not stop within 60 s of SIGTERM" in capfd.readouterr().err
    # A forwarded SIGTERM that reached workers still starting up (before they listen for it).
    early = launch._Forwarder(60, str(tmp_path))
    early.signum = signal.SIGTERM
    assert launch._failure_code({0: failure(-15), 1: failure(-15)}, str(tmp_path), early) == 128 + signal.SIGTERM
    assert "while the workers were starting" in capfd.readouterr().err
