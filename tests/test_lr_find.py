"""The LR range test: the sweep, the smoothing, the suggestion rule, and ``gigatrain lr-find``."""
import json
import math

import pytest

from gigatrain.cli import main
from gigatrain.optim.lr_find import LRSweep, smooth, suggest_lr, sweep_lr

pytestmark = pytest.mark.rung0


def test_sweep_is_exponential_between_the_ends():
    lrs = [sweep_lr(i, min_lr=1e-5, max_lr=1.0, steps=101) for i in range(101)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[-1] == pytest.approx(1.0)
    ratios = {round(b / a, 9) for a, b in zip(lrs, lrs[1:])}
    assert len(ratios) == 1 and ratios.pop() == pytest.approx(10 ** 0.05)


def test_smoothing_is_bias_corrected_and_stops_at_nan():
    assert smooth([4.0, 4.0, 4.0]) == pytest.approx([4.0, 4.0, 4.0])   # no pull towards 0
    s = smooth([1.0, float("nan"), 1.0])
    assert s[0] == 1.0 and math.isinf(s[1]) and math.isinf(s[2])


def _synthetic(lr: float) -> float:
    """Flat, then falling fastest at lr = 1e-3, then exploding past 3e-2."""
    x = math.log10(lr)
    return 3.0 - math.tanh(2.0 * (x + 3.0)) + (50.0 * (x + 1.5) ** 2 if x > -1.5 else 0.0)


def test_suggestion_is_the_middle_of_steepest_descent_and_minimum_and_the_sweep_stops_on_explosion():
    sweep = LRSweep(min_lr=1e-6, max_lr=10.0, steps=200)
    for step in range(sweep.steps):
        lr = sweep.lr(step)
        if sweep.record(step, lr, _synthetic(lr)):
            break
    assert sweep.stopped_early and sweep.lrs[-1] < 1.0
    s = smooth(sweep.losses, sweep.beta)
    assert s[-1] > 4 * min(s) and all(v <= 4 * min(s[:i + 1]) for i, v in enumerate(s[:-1]))
    # The EMA lags by ~1/20 of the sweep (0.35 decades here): the true steepest point is 1e-3.
    steep, low = sweep.steepest_lr(), sweep.min_loss_lr()
    assert 1e-3 <= steep <= 1e-3 * 10 ** 0.5
    # The smoothed minimum: the loss is lowest just before the explosion past 3e-2.
    assert 1e-2 <= low <= 10 ** -1.5 * 10 ** 0.5
    assert sweep.suggestion() == pytest.approx(math.sqrt(steep * low), rel=1e-12)
    assert steep < sweep.suggestion() < low
    # Too short to tell: no suggestion rather than a guess.
    assert suggest_lr([1e-4, 1e-3, 1e-2], [3.0, 2.0, 5.0]) is None
    with pytest.raises(ValueError):
        LRSweep(min_lr=1.0, max_lr=0.1)


BASE = ["model.n_layer=1", "model.d_model=16", "model.n_head=2", "model.seq_len=16",
        "data.name=pystdlib", "data.max_chars=50000", "train.global_batch=8", "train.micro_batch=8", "nproc=1"]


def test_lr_find_command_writes_plot_record_and_suggestion(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["lr-find", *BASE, "--steps", "40", "--min-lr", "1e-4", "--max-lr", "1e3", "--quiet",
                 "--out", str(out)]) == 0
    said = capsys.readouterr().out
    rec = json.loads((out / "lr_find.json").read_text())
    assert (out / "lr_find.png").stat().st_size > 10_000
    assert len(rec["lrs"]) == len(rec["losses"]) and rec["lrs"][0] == pytest.approx(1e-4)
    # Adam at lr 1e3 blows the model up: the sweep ends early, on the 4x rule.
    assert rec["stopped_early"] and len(rec["lrs"]) < 40
    assert rec["suggested_lr"] is not None and 1e-4 < rec["suggested_lr"] < rec["lrs"][-1]
    assert "steepest descent" in rec["rule"] and "geometric mean" in rec["rule"]
    assert rec["suggested_lr"] == pytest.approx(math.sqrt(rec["steepest_lr"] * rec["min_loss_lr"])) and f"train.lr={rec['suggested_lr']:.3g}" in said
    assert not (out / "checkpoints").exists()      # an experiment: nothing to resume from
    assert main(["lr-find", *BASE, "--steps", "5", "--out", str(tmp_path / "x")]) == 2
