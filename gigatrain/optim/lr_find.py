"""The learning-rate range test (Smith 2015; the fast.ai ``lr_find``).

Train for a few hundred steps while the learning rate grows exponentially from ``min_lr`` to
``max_lr``, one value per step, and record the loss of every step. The loss first barely moves
(the rate is too small), then falls, then explodes. ``LRSweep`` is the experiment the trainer
runs (``gigatrain.trainer.train(..., probe=sweep)``); the rest are pure functions of the record.

Two points of the smoothed curve bound the useful range: the *steepest descent*, where the
smoothed loss falls fastest against log(lr) (``argmin d smooth(loss) / d log(lr)``, taken between
the first ``skip_start`` points, where the average has not settled yet, and the minimum), and the
*minimum* of the smoothed loss, past which the rate is too high to keep descending. The
suggestion is their geometric mean, the middle of the range in log(lr). The steepest descent
alone is a lower bound: in a sweep of a few hundred steps the loss falls fastest during the
first, easy part of learning, whatever the rate (on the default text job its rate trained 300
steps clearly worse than 10x it), and the minimum is already at the edge of instability. The
smoothing is an exponential moving average with bias correction over a window of 1/20 of the
sweep (``beta = 1 - 20 / steps``: fast.ai's fixed 0.98 lags by 50 steps, 1.5 decades of a
200-step sweep, which shifts the steepest point to the right); the sweep stops early once the
smoothed loss exceeds ``STOP_FACTOR`` times its best value.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

STOP_FACTOR = 4.0
RULE = ("suggested lr = sqrt(steepest * minimum): the geometric mean of the steepest descent of the "
        "EMA-smoothed loss (argmin of d(smoothed loss)/d(log lr), between the first {skip} points and the "
        "minimum) and the lr at the minimum of the smoothed loss")


def sweep_lr(step: int, *, min_lr: float, max_lr: float, steps: int) -> float:
    """The learning rate of sweep step ``step`` (0-based): ``min_lr`` at step 0, ``max_lr`` at
    step ``steps - 1``, equal ratios in between."""
    if steps <= 1:
        return min_lr
    return min_lr * (max_lr / min_lr) ** (step / (steps - 1))


def smooth(losses: list[float], beta: float = 0.98) -> list[float]:
    """Exponential moving average of ``losses`` with bias correction (the first values are not
    pulled towards zero). A non-finite loss makes every later value infinite."""
    out, avg = [], 0.0
    for i, x in enumerate(losses):
        if not math.isfinite(x):
            out.extend([math.inf] * (len(losses) - i))
            break
        avg = beta * avg + (1 - beta) * x
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def steepest_lr(lrs: list[float], losses: list[float], *, beta: float = 0.98,
                skip_start: int = 10) -> float | None:
    """The steepest descent of the smoothed loss against log(lr) (see the module docstring);
    None when the record is too short to tell (fewer than ``skip_start + 3`` points before the
    minimum)."""
    s = smooth(losses, beta)
    finite = [i for i, v in enumerate(s) if math.isfinite(v)]
    if not finite:
        return None
    low = min(finite, key=lambda i: s[i])
    if low - skip_start < 2:
        return None
    best, best_slope = None, math.inf
    for i in range(skip_start, low + 1):
        # Central differences in log(lr); one-sided at the ends of the range.
        a, b = max(i - 1, skip_start), min(i + 1, low)
        slope = (s[b] - s[a]) / (math.log(lrs[b]) - math.log(lrs[a]))
        if slope < best_slope:
            best, best_slope = i, slope
    return lrs[best]


def min_loss_lr(lrs: list[float], losses: list[float], *, beta: float = 0.98) -> float | None:
    """The learning rate at the minimum of the smoothed loss (Smith's upper bound)."""
    s = smooth(losses, beta)
    finite = [i for i, v in enumerate(s) if math.isfinite(v)]
    return lrs[min(finite, key=lambda i: s[i])] if finite else None


def suggest_lr(lrs: list[float], losses: list[float], *, beta: float = 0.98,
               skip_start: int = 10) -> float | None:
    """The suggestion: the geometric mean of ``steepest_lr`` and ``min_loss_lr`` (see the module
    docstring); None when the record is too short to tell."""
    steep = steepest_lr(lrs, losses, beta=beta, skip_start=skip_start)
    if steep is None:
        return None
    return math.sqrt(steep * min_loss_lr(lrs, losses, beta=beta))


@dataclass
class LRSweep:
    """The range test as the trainer runs it: ``lr(step)`` replaces the schedule, ``record``
    sees each step's global loss and says when to stop (the same on every rank, since the loss
    is the mean over the global batch)."""

    min_lr: float = 1e-5
    max_lr: float = 1.0
    steps: int = 200
    beta: float | None = None         # None: 1 - 20 / steps (a window of 1/20 of the sweep)
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    stopped_early: bool = False

    def __post_init__(self) -> None:
        if not (0 < self.min_lr < self.max_lr):
            raise ValueError(f"the sweep needs 0 < min_lr < max_lr, got {self.min_lr:g} and {self.max_lr:g}")
        if self.steps < 20:
            raise ValueError(f"the sweep needs at least 20 steps to show a curve, got {self.steps}")
        if self.beta is None:
            self.beta = 1.0 - 1.0 / max(2, self.steps // 20)

    def lr(self, step: int) -> float:
        return sweep_lr(step, min_lr=self.min_lr, max_lr=self.max_lr, steps=self.steps)

    def record(self, step: int, lr: float, loss: float) -> bool:
        """Keep one step's (lr, loss); True when the sweep is over: the last step, a non-finite
        loss, or a smoothed loss above ``STOP_FACTOR`` x the best so far."""
        self.lrs.append(lr)
        self.losses.append(loss)
        s = smooth(self.losses, self.beta)
        if not math.isfinite(s[-1]) or s[-1] > STOP_FACTOR * min(s):
            self.stopped_early = len(self.losses) < self.steps
            return True
        return len(self.losses) >= self.steps

    def suggestion(self) -> float | None:
        return suggest_lr(self.lrs, self.losses, beta=self.beta, skip_start=self.skip_start)

    def steepest_lr(self) -> float | None:
        return steepest_lr(self.lrs, self.losses, beta=self.beta, skip_start=self.skip_start)

    def min_loss_lr(self) -> float | None:
        """The learning rate at the minimum of the smoothed loss: Smith's upper bound, past which
        the loss stops falling."""
        return min_loss_lr(self.lrs, self.losses, beta=self.beta)

    @property
    def skip_start(self) -> int:
        return max(3, self.steps // 20)

    @property
    def rule(self) -> str:
        return RULE.format(skip=self.skip_start)

    def write(self, out: str | Path) -> dict:
        """Write ``lr_find.json`` and ``lr_find.png`` into ``out``; returns what the JSON holds."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        result = {"lrs": self.lrs, "losses": [x if math.isfinite(x) else None for x in self.losses],
                  "smoothed": [x if math.isfinite(x) else None for x in smooth(self.losses, self.beta)],
                  "suggested_lr": self.suggestion(), "rule": self.rule, "steepest_lr": self.steepest_lr(),
                  "min_loss_lr": self.min_loss_lr(),
                  "stopped_early": self.stopped_early, "min_lr": self.min_lr, "max_lr": self.max_lr}
        (out / "lr_find.json").write_text(json.dumps(result, indent=1) + "\n")
        plot_sweep(self.lrs, self.losses, result["suggested_lr"], out / "lr_find.png", beta=self.beta,
                   bounds=(result["steepest_lr"], result["min_loss_lr"]))
        return result


def plot_sweep(lrs: list[float], losses: list[float], suggested: float | None, path: str | Path, *,
               beta: float = 0.98, bounds: tuple[float | None, float | None] = (None, None)) -> None:
    """Loss (raw and smoothed) against the learning rate on a log axis, the suggestion marked
    and the range it is taken from (steepest descent, minimum) shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = smooth(losses, beta)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(lrs, losses, color="0.75", lw=1, label="loss")
    fin = [(x, y) for x, y in zip(lrs, s) if math.isfinite(y)]
    if fin:
        ax.plot(*zip(*fin), color="C0", lw=2, label="smoothed loss")
        ys = [y for _, y in fin] + [y for y in losses if math.isfinite(y)]
        ax.set_ylim(min(ys) - 0.05 * (max(ys) - min(ys) + 1e-9), min(max(ys), STOP_FACTOR * min(ys)) * 1.05)
    if None not in bounds:
        ax.axvspan(*bounds, color="C2", alpha=0.12, label=f"steepest descent {bounds[0]:.2e} .. minimum {bounds[1]:.2e}")
    if suggested is not None:
        ax.axvline(suggested, color="C3", ls="--", label=f"suggested lr {suggested:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("LR range test (suggestion: middle of steepest descent .. minimum, log scale)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
