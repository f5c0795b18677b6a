"""Timelines of pipeline steps: records, the measured bubble, and a paper-style picture.

A ``Record`` is one action executed by one rank with its start and end time; the simulator and
the runtime (``record=True``) both produce them, so the same plot and bubble measure serve a
prediction and a measurement.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .schedules import Action

__all__ = ["Record", "measured_bubble", "plot_timeline"]

_COLORS = {"F": "#4C8BF5", "B": "#F5A623", "W": "#7ED321"}


@dataclass(frozen=True)
class Record:
    rank: int
    action: Action
    start: float
    end: float


def measured_bubble(records: Sequence[Record], n_ranks: int | None = None) -> float:
    """Fraction of compute capacity left idle during the step:
    ``1 - sum(compute durations) / (n_ranks * (last end - first start))``.

    Only F/B/W records count as compute; the span runs from the earliest start to the latest
    end over all ranks (perf_counter is one clock for all processes of a machine).
    """
    comp = [r for r in records if r.action.is_compute]
    if not comp:
        raise ValueError("no compute records")
    n = n_ranks if n_ranks is not None else len({r.rank for r in records})
    span = max(r.end for r in comp) - min(r.start for r in comp)
    if span <= 0:
        return 0.0
    busy = sum(r.end - r.start for r in comp)
    return 1.0 - busy / (n * span)


def plot_timeline(records: Sequence[Record], path, title: str = "", n_ranks: int | None = None) -> None:
    """Write a PNG: one row per rank (rank 0 on top), time to the right, a box per compute action
    coloured by kind (F blue, B orange, W green) and labelled with its micro-batch; with several
    chunks per rank, later chunks are drawn in a darker shade and labelled ``mb.chunk``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Patch

    comp = [r for r in records if r.action.is_compute]
    if not comp:
        raise ValueError("no compute records to plot")
    n = n_ranks if n_ranks is not None else 1 + max(r.rank for r in comp)
    t0 = min(r.start for r in comp)
    span = max(r.end for r in comp) - t0
    # Stage -> chunk needs pp: stages on rank r are r, r + n, r + 2n, ...
    n_chunks = 1 + max(r.action.stage // n for r in comp)
    fig_w = min(28.0, max(8.0, 0.32 * len(comp) / n + 2))
    fig, ax = plt.subplots(figsize=(fig_w, 0.6 * n + 1.3))
    for rec in comp:
        a = rec.action
        chunk = a.stage // n
        base = to_rgb(_COLORS.get(a.kind, "#999999"))
        shade = 1.0 - 0.35 * chunk / max(1, n_chunks - 1) if n_chunks > 1 else 1.0
        color = tuple(c * shade for c in base)
        y = n - 1 - rec.rank
        ax.broken_barh([(rec.start - t0, rec.end - rec.start)], (y + 0.1, 0.8),
                       facecolors=color, edgecolors="black", linewidth=0.5)
        width = (rec.end - rec.start) / span if span > 0 else 0
        if width > 0.012:
            label = f"{a.mb}" if n_chunks == 1 else f"{a.mb}.{chunk}"
            ax.text(rec.start - t0 + (rec.end - rec.start) / 2, y + 0.5, label,
                    ha="center", va="center", fontsize=7, color="white" if shade < 0.8 else "black")
    ax.set_yticks([n - 1 - r + 0.5 for r in range(n)])
    ax.set_yticklabels([f"rank {r}" for r in range(n)])
    ax.set_ylim(0, n)
    ax.set_xlim(0, span * 1.01 if span > 0 else 1)
    ax.set_xlabel("seconds")
    bubble = measured_bubble(records, n)
    ax.set_title(f"{title}  (bubble {bubble:.1%})" if title else f"bubble {bubble:.1%}", loc="left")
    kinds = sorted({r.action.kind for r in comp}, key="FBW".index)
    ax.legend(handles=[Patch(facecolor=_COLORS[k], edgecolor="black", label=k) for k in kinds],
              loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=7, ncol=len(kinds),
              frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
