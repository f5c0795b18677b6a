"""What ``gigatrain plan`` shows and writes: the ranked table, the JSON, the chart and the ready
config file."""
from __future__ import annotations

import json

from .search import PlanResult

__all__ = ["format_table", "to_json", "write_json", "write_chart", "ready_config"]

GiB = 2**30


def format_table(res: PlanResult, top: int = 10) -> str:
    """The ``top`` fastest fitting layouts, one row each: predicted step time, TFLOP/s per GPU
    (Narayanan et al.'s count), peak memory per rank, bubble and communication shares."""
    head = (f"{'#':>3} {'dp':>5} {'pp':>4} {'tp':>3} {'sp':>3} {'zero':>6} {'mb':>4} {'M':>5} {'schedule':>14} "
            f"{'recompute':>9} {'step s':>9} {'TFLOP/s':>8} {'mem GiB':>8} {'bubble':>7} {'comm':>6}")
    rows = [head, "-" * len(head)]
    for i, c in enumerate(res.fitting[:top], 1):
        lay = c.layout
        zero = f"{lay.zero}" + ("+" + lay.offload if lay.offload != "none" else "")
        sched = "-" if lay.pp == 1 else lay.schedule + (f" x{lay.virtual}" if lay.virtual > 1 else "")
        rows.append(f"{i:>3} {lay.dp:>5} {lay.pp:>4} {lay.tp:>3} {'y' if lay.sp else 'n':>3} {zero:>6} "
                    f"{lay.micro_batch:>4} {lay.microbatches(res.job.global_batch):>5} {sched:>14} {lay.recompute:>9} "
                    f"{c.step_s:>9.4g} {c.tflops_per_gpu:>8.3g} {c.mem.peak / GiB:>8.2f} "
                    f"{c.time.bubble_fraction * 100:>6.1f}% {c.time.comm_share * 100:>5.1f}%")
    return "\n".join(rows)


def to_json(res: PlanResult) -> dict:
    """``{"search_s", "device", "n_gpus", "pruned", "candidates": [...]}`` with the candidates
    sorted by predicted step time (see ``Candidate.to_json`` for their keys)."""
    return {"search_s": res.search_s, "device": res.device.name, "n_gpus": res.n_gpus, "pruned": res.pruned,
            "candidates": [c.to_json() for c in res.candidates]}


def write_json(res: PlanResult, path: str) -> None:
    with open(path, "w") as f:
        json.dump(to_json(res), f, indent=1)


def write_chart(res: PlanResult, path: str) -> None:
    """Predicted step time against peak memory per rank for every predicted candidate (those
    that fit and those that do not), the device's memory as a line, the pick marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for fits, colour, label in ((True, "tab:blue", "fits"), (False, "tab:gray", "does not fit")):
        pts = [c for c in res.candidates if c.fits == fits]
        if pts:
            ax.scatter([c.mem.peak / GiB for c in pts], [c.step_s for c in pts], s=10, c=colour,
                       alpha=0.6 if fits else 0.35, label=f"{label} ({len(pts)})")
    ax.axvline(res.device.mem_bytes / GiB, color="tab:red", lw=1, ls="--", label=f"{res.device.name} memory")
    best = res.best
    if best is not None:
        ax.scatter([best.mem.peak / GiB], [best.step_s], marker="*", s=220, c="tab:orange", edgecolors="black",
                   zorder=5, label="chosen: " + best.layout.describe())
    ax.set_xlabel("predicted peak memory per rank (GiB)")
    ax.set_ylabel("predicted step time (s)")
    times = [c.step_s for c in res.candidates]
    if max(times) > 10 * min(times):
        ax.set_yscale("log")
    m = res.job.model
    ax.set_title(f"{m.name} {m.n_layer}x{m.d_model}, batch {res.job.global_batch}, {res.n_gpus} x {res.device.name}",
                 fontsize=10)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def ready_config(cfg, overrides: dict) -> str:
    """``cfg`` with the layout ``overrides`` applied, as YAML that ``gigatrain train`` reads.
    Choices the installed config schema has no key for are written as comments."""
    from ..config import config_from_dict, config_keys

    known = set(config_keys())
    data = cfg.to_dict()
    missing = []
    for key, value in overrides.items():
        if key not in known:
            missing.append(f"{key}={json.dumps(value)}")
            continue
        section, _, name = key.rpartition(".")
        data[section][name] = value
    text = config_from_dict(data).to_yaml()
    if missing:
        text = ("# The plan also chose " + ", ".join(missing) + ", which this version's config has no key\n"
                "# for yet; the time and memory predicted assume them.\n") + text
    return text
