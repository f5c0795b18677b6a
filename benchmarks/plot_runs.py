"""Loss curves of several runs from their metrics.jsonl, in one picture.

    python benchmarks/plot_runs.py RUN_DIR[=LABEL] ... --out curves.png [--smooth 20]

Training loss (moving average over ``--smooth`` steps) as lines, validation loss (when the runs
evaluated) as markers; prints each run's last validation loss.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run folders, optionally =LABEL")
    ap.add_argument("--out", required=True)
    ap.add_argument("--smooth", type=int, default=20)
    ap.add_argument("--title", default="")
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, spec in enumerate(args.runs):
        run, _, label = spec.partition("=")
        recs = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in recs]
        loss = [r["loss"] for r in recs]
        k = max(1, args.smooth)
        avg = [sum(loss[max(0, j - k + 1):j + 1]) / len(loss[max(0, j - k + 1):j + 1]) for j in range(len(loss))]
        name = label or Path(run).name
        ax.plot(steps, avg, color=f"C{i}", lw=1.5, label=f"{name}: train loss (mean of {k})")
        val = [(r["step"], r["val_loss"]) for r in recs if r.get("val_loss") is not None]
        if val:
            ax.plot(*zip(*val), "o--", color=f"C{i}", ms=3, lw=0.8, label=f"{name}: val loss")
            print(f"{name}: last val loss {val[-1][1]:.4f} at step {val[-1][0]}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(args.title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
