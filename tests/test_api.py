"""``gigatrain.initialize`` on modules that are not ours (ladder 3), and the README's example as a
user runs it: as one plain process and under torchrun."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from dist_utils import assert_curves_close, one_process, spawn

pytestmark = pytest.mark.rung3

ROOT = Path(__file__).resolve().parents[1]
STEPS = 5
CONFIG = {"parallel": {"zero": 3}, "precision": "fp32",
          "train": {"optimizer": "sgd", "lr": 0.2, "momentum": 0.9, "schedule": "constant", "grad_clip": None}}


class UserNet(nn.Module):
    """A user's module: no stem/blocks/head, no loss method, a ModuleList of its own."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 24)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(24, 24), nn.Tanh()) for _ in range(3))
        self.out = nn.Linear(24, 3)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = h + layer(h)
        return self.out(h)


def _data():
    g = torch.Generator().manual_seed(7)
    return torch.randn(STEPS, 8, 6, generator=g), torch.randint(0, 3, (STEPS, 8), generator=g)


def _train(rank, world, config):
    import gigatrain

    torch.manual_seed(0)
    xs, ys = _data()
    with gigatrain.initialize(UserNet(), config) as engine:
        assert engine.dp_size == world and engine.rank == rank
        n = 8 // engine.dp_size
        share = slice(engine.dp_rank * n, (engine.dp_rank + 1) * n)
        losses = [engine.train_step([(xs[s, share], ys[s, share])]).loss for s in range(STEPS)]
        zero = type(engine.strategy).__name__
    return losses, zero


def test_user_module_zero3_on_two_ranks_equals_one_process():
    with one_process():
        ref, _ = _train(0, 1, {**CONFIG, "parallel": {"zero": 0}})
    results = spawn(_train, 2, CONFIG, timeout_s=120)
    for losses, strategy in results:
        assert strategy == "Stage3Strategy"
        assert_curves_close(losses, ref, rtol=1e-5)
    assert ref[-1] < ref[0]


def test_initialize_without_a_launcher_creates_and_removes_the_process_group():
    import torch.distributed as dist

    import gigatrain

    assert not dist.is_initialized()
    engine = gigatrain.initialize(UserNet(), {"precision": "fp32", "train": {"optimizer": "sgd", "lr": 0.1}})
    assert dist.is_initialized() and engine.dp_size == 1
    xs, ys = _data()
    r = engine.train_step([(xs[0], ys[0])])
    assert r.loss > 0 and not r.skipped
    engine.close()
    assert not dist.is_initialized()


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- example:initialize:start -->\s*```python\n(.*?)```\s*<!-- example:initialize:end -->",
                  text, re.S)
    assert m, "README lost its initialize example"
    return m.group(1)


@pytest.mark.parametrize("launcher", ["plain", "torchrun"])
def test_readme_example_runs_as_written(launcher, tmp_path):
    pytest.importorskip("transformers")
    script = tmp_path / "train.py"
    code = _readme_example()
    assert len(code.strip().splitlines()) <= 20, "the README promises a complete example in under 20 lines"
    script.write_text(code)
    cmd = [sys.executable, str(script)] if launcher == "plain" else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    losses = [float(v) for v in re.findall(r"step \d+: loss ([0-9.]+)", r.stdout)]
    assert len(losses) == 4 and losses[-1] < losses[0], r.stdout
    assert (tmp_path / "gpt2-checkpoints" / "step_000020" / "meta.json").is_file()
