"""Bad input ends with one clear paragraph and exit code 2, before training (ladder 0)."""
import os
import pickle
import subprocess
import sys

import pytest

from gigatrain.cli import main

BASE = ["model.n_layer=1", "model.d_model=16", "model.n_head=2", "model.seq_len=16",
        "data.name=pystdlib", "data.max_chars=50000", "train.steps=2", "train.sample_tokens=0"]


@pytest.mark.parametrize("args,needle", [
    (["train.global_batch=10", "train.micro_batch=4", "--nproc", "2"], "train.global_batch"),
    (["parallel.dp=2", "parallel.pp=2", "--nproc", "2"], "parallel"),
    (["train.stepz=3"], "train.steps"),                      # unknown key, with a suggestion
    (["train.lr=fast"], "train.lr"),                         # wrong type
    (["train.optimizer=lion"], "train.optimizer"),           # bad choice
    (["train.stop_after=50"], "train.stop_after"),
    (["parallel.zero=7"], "parallel.zero"),
    (["parallel.zero=2", "parallel.offload=nvme"], "nvme"),
    (["parallel.tp=4", "--nproc", "4"], "model.n_head (2) is not divisible by parallel.tp (4)"),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "model.seq_len=15", "--nproc", "2"], "model.seq_len (15)"),
    (["parallel.tp=2", "--nproc", "3"], "parallel.tp"),          # world not dp x pp x tp
    (["model.name=vit"], "data"),                            # image model on a text corpus
    (["resume=/nonexistent/ckpt"], "resume"),
])
def test_bad_input_is_one_clear_error(args, needle, capsys, tmp_path):
    code = main(["train", *BASE, f"out={tmp_path}", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("gigatrain: error: ") and needle in err
    assert "Traceback" not in err and err.count("\n") <= 2


def test_unreadable_config_file(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text("train: [unclosed\n")
    assert main(["train", str(bad)]) == 2
    assert "c.yaml" in capsys.readouterr().err


def test_pickle_checkpoint_is_never_unpickled(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    # A .pt file given as resume, and a pickle disguised inside a checkpoint directory.
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Exploit()))
    assert main(["train", *BASE, f"out={tmp_path}/o", f"resume={evil}"]) == 2
    assert "pickle" in capsys.readouterr().err
    ck = tmp_path / "ck" / "step_000001"
    ck.mkdir(parents=True)
    (ck / "meta.json").write_text('{"format": "gigatrain-checkpoint-v1", "step": 1}')
    (ck / "model.safetensors").write_bytes(pickle.dumps(Exploit()))
    (ck / "optim.safetensors").write_bytes(pickle.dumps(Exploit()))
    from gigatrain.checkpoint import CheckpointError, load_checkpoint
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(ck)
    assert not marker.exists()


@pytest.mark.rung3
def test_cli_subprocess_clean_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "gigatrain", "train", "train.global_batch=7", "--nproc", "2",
                        f"out={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback (most recent" not in r.stderr and "global_batch" in r.stderr


@pytest.mark.parametrize("args,needle", [
    (["train.global_batch=24", "train.micro_batch=8", "parallel.pp=2", "parallel.pp_schedule=interleaved",
      "parallel.pp_virtual=2", "model.n_layer=4", "--nproc", "2"], "multiple of parallel.pp"),
    (["model.name=coatnet", "data.name=fashion_mnist", "parallel.pp=2", "parallel.pp_balance=[1,1]",
      "--nproc", "2"], "coatnet_depths"),
    (["model.name=vit", "data.name=fashion_mnist", "model.image_size=32"], "image_size"),
    (["--nproc", "0"], "nproc"),
])
def test_more_bad_layouts(args, needle, capsys, tmp_path):
    code = main(["train", *BASE, f"out={tmp_path}", *args])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err
