"""Pieces shared by the benchmark scripts: the GPT under test, its arguments, the statistics."""
from __future__ import annotations

import statistics
from types import SimpleNamespace


def add_gpt_args(ap, *, bucket_mb: float, rounds: int, steps_per_round: int, warmup: int) -> None:
    """Arguments every data-parallel benchmark takes (model shape, ranks, timing rounds)."""
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--bucket-mb", type=float, default=bucket_mb)
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--steps-per-round", type=int, default=steps_per_round)
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)


def gpt_factory(args: dict):
    """A function that builds the benchmark GPT, identically (seed 0) on every call."""
    import torch

    from gigatrain.models import build_model

    mcfg = SimpleNamespace(name="gpt", n_layer=args["n_layer"], n_head=args["n_head"],
                           d_model=args["d_model"], seq_len=args["seq_len"], dropout=0.0)

    def make():
        torch.manual_seed(0)
        return build_model(mcfg, vocab_size=args["vocab"])
    return make


def median_step(results: list[dict], name: str) -> float:
    """A step is as slow as its slowest rank: max over ranks per step, then the median."""
    times = [r["times"][name] for r in results]
    return statistics.median(max(t[i] for t in times) for i in range(len(times[0])))


def alternate_steps(models: dict, batch, *, rounds: int, steps_per_round: int, lr: float = 1e-4):
    """Train each of ``models`` (name -> GPT) with its own AdamW on the same ``(x, y)``, the models
    taking turns, ``steps_per_round`` steps each per round, so load drifts hit all alike.
    Returns ``(step, run)``: ``step(name)`` runs one untimed step (warm-up) and returns its
    loss; ``run()`` does the timed rounds and returns ``(times, losses)`` by name."""
    import time

    import torch

    x, y = batch
    opts = {k: torch.optim.AdamW(m.parameters(), lr=lr, foreach=True) for k, m in models.items()}

    def step(k):
        m = models[k]
        loss = m.loss(m(x), y)
        loss.backward()
        opts[k].step()
        opts[k].zero_grad(set_to_none=True)
        return float(loss.detach())

    def run():
        times = {k: [] for k in models}
        losses = {k: [] for k in models}
        for _ in range(rounds):
            for k in models:
                for _ in range(steps_per_round):
                    t0 = time.perf_counter()
                    losses[k].append(step(k))
                    times[k].append(time.perf_counter() - t0)
        return times, losses
    return step, run
