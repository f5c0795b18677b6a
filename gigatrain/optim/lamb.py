"""LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning", Algorithm 2).

Per parameter x with gradient g, at step t:

    m = b1 m + (1 - b1) g              v = b2 v + (1 - b2) g^2
    r = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    u = r + wd x
    x = x - lr * phi(||x||) / ||u|| * u       (phi = identity; the ratio is 1 when a norm is 0)

The trust ratio needs the norms of *whole* parameters, but a sharded strategy hands the optimizer
flat pieces that can hold several parameters, or a part of one whose other parts live on other
ranks. So each optimizer tensor may come with ``spans`` (in its param group): ``(start, end, key)``
ranges saying which parameter (``key``: its index in the strategy's parameter order, below the
group's ``shard_keys``, the same on every rank) each range belongs to, and ``shard_comm``: the
group over which the other ranges of the same parameters are spread. A step sums ``||x||^2`` and ``||u||^2`` range by range per key
and all-reduces the sums over ``shard_comm`` once, so every rank applies exactly the trust ratio
one process would (up to the order of the fp32 partial sums). Without spans, each tensor is one
parameter (one process, plain data parallel).

Because that all-reduce runs inside ``step``, every rank of ``shard_comm`` must call ``step`` in
the same order with gradients on the same parameters, from the thread that issues the strategy's
other collectives: ``step_communicates`` says so to the strategies.
"""
from __future__ import annotations

import torch


class Lamb(torch.optim.Optimizer):
    """LAMB with bias correction and decoupled weight decay inside the trust ratio (see the
    module docstring). State per tensor: ``exp_avg``, ``exp_avg_sq`` and ``step`` (torch's names,
    so checkpoints of any layout carry it)."""

    step_communicates = True

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0):
        if lr <= 0 or eps <= 0 or not all(0.0 <= b < 1.0 for b in betas) or weight_decay < 0:
            raise ValueError(f"bad LAMB hyper-parameters lr={lr} betas={betas} eps={eps} "
                             f"weight_decay={weight_decay}")
        # ``spans``/``shard_keys``/``shard_comm``: see the module docstring (None: whole tensors).
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      spans=None, shard_keys=0, shard_comm=None))
        for g in self.param_groups:
            if g["shard_comm"] is not None and g["spans"] is None:
                raise ValueError("LAMB: shard_comm needs spans (which parameter each range belongs to)")

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        todo = []                   # (lr, flat parameter, flat update, spans)
        n_shared = max((g["shard_keys"] for g in self.param_groups), default=0)
        private = n_shared          # keys of unspanned tensors follow the shared ones
        comm = next((g["shard_comm"] for g in self.param_groups if g["shard_comm"] is not None), None)
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for i, p in enumerate(group["params"]):
                if group["spans"] is None:
                    spans, private = [(0, p.numel(), private)], private + 1
                else:
                    spans = group["spans"][i]
                if p.grad is None:
                    continue
                g = p.grad.reshape(-1).float()
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0, dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                st["step"] += 1
                t = float(st["step"])
                m, v = st["exp_avg"].view(-1), st["exp_avg_sq"].view(-1)
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v / (1 - b2 ** t)).sqrt_().add_(group["eps"])
                u = (m / (1 - b1 ** t)).div_(denom)
                x = p.view(-1)
                if group["weight_decay"]:
                    u.add_(x, alpha=group["weight_decay"])
                todo.append((group["lr"], x, u, spans))
        if not todo and comm is None:
            return loss
        device = todo[0][1].device if todo else torch.device("cpu")
        # Squared norms per key, [||x||^2 | ||u||^2], summed range by range (fp32 sums, fp64 total).
        sq = torch.zeros(2, private, dtype=torch.float64, device=device)
        for _, x, u, spans in todo:
            for a, b, key in spans:
                sq[0, key] += x[a:b].float().square().sum()
                sq[1, key] += u[a:b].square().sum()
        if comm is not None and comm.size > 1:
            # Only the shared keys: every rank of the group has the same n_shared of them.
            shared = sq[:, :n_shared].contiguous()
            comm.all_reduce(shared)
            sq[:, :n_shared] = shared
        w, n = sq.sqrt()
        ratio = torch.where((w > 0) & (n > 0), w / n.clamp_min(1e-300), torch.ones_like(w)).float()
        for lr, x, u, spans in todo:
            for a, b, key in spans:
                x[a:b].add_(u[a:b].mul_(ratio[key] * -lr).to(x.dtype))
        return loss
