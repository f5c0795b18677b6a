"""1-bit Adam (Tang et al. 2021, "1-bit Adam: Communication Efficient Large-Scale Training with
Adam's Convergence Speed"; DeepSpeed's ``OnebitAdam``).

Adam's variance becomes stable early in training. So:

1. **Warm-up** (``warmup`` steps): plain AdamW on gradients averaged over the data-parallel
   group, with bias correction, as ``torch.optim.AdamW`` computes it.
2. **Compression**: the variance is frozen (with its bias correction at the end of warm-up).
   Each rank updates the momentum with its *own* gradient, ``m_i = b1 m + (1 - b1) g_i``, and the
   ranks average the ``m_i`` with ``CompressedAllReduce``: one bit per element plus one scale per
   chunk, with error feedback on the worker and on the server side. Every rank then holds the
   same ``m`` and takes the same step ``lr (m_hat / (sqrt(v_hat) + eps) + wd x)``.

During compression the gradient strategy must not average gradients (``local_gradients``
says when): the momentum is what travels, at ~1/32 of the bytes of an fp32 all-reduce.
``local_gradients_after`` (the warm-up) tells a sharded strategy when that starts: ZeRO-1 runs
the warm-up over its shards (this optimizer over flat shard pieces, without ``dp_comm``, is then
plain AdamW) and hands over to data parallel at its end (``parallel.handover``), so the
compressed steps are the same code, and the same numbers, under zero=0 and zero=1.

``CompressedAllReduce`` (the two phases of DeepSpeed's compressed all-reduce, on our ``Comm``):
the vector is padded to ``N`` chunks (a multiple of 8 elements each); worker ``i`` adds its error
``e_i`` to its vector, sends chunk ``j``'s signs (packed 8 to a byte) and scale
``||chunk||_2 / sqrt(len)`` to rank ``j`` (all-to-all) and keeps the compression error in
``e_i``. Rank ``j``, the server of chunk ``j``, averages the decompressed chunks, adds its own
error, compresses the result the same way (keeping the new error) and all-gathers it. Sent per
rank: ``2 (N-1)/N (n/8 + 4 N)`` bytes instead of ``2 (N-1)/N 4 n``.
"""
from __future__ import annotations

import math

import torch

_BITS = None


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """One bit per element of ``x`` (1 where ``x >= 0``), 8 to a byte; ``x.numel()`` must be a
    multiple of 8."""
    global _BITS
    if _BITS is None or _BITS.device != x.device:
        _BITS = (2 ** torch.arange(8, dtype=torch.int32, device=x.device)).to(torch.uint8)
    bits = (x >= 0).view(-1, 8).to(torch.uint8)
    return (bits * _BITS).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_signs(packed: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """The +1 / -1 values ``pack_signs`` packed."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(-1).to(dtype) * 2 - 1


def _compress(x: torch.Tensor, chunks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed signs, one scale per chunk, the decompressed value) of ``x`` cut into ``chunks``."""
    rows = x.view(chunks, -1)
    scale = rows.norm(dim=1) / math.sqrt(rows.shape[1])
    signs = torch.where(rows >= 0, 1.0, -1.0).to(x.dtype)
    return pack_signs(x), scale, (signs * scale.unsqueeze(1)).view(-1)


class CompressedAllReduce:
    """The average over ``comm`` of a vector of ``numel`` elements, sent as signs and scales with
    error feedback (see the module docstring). Stateful: the errors carry over between calls, so
    one instance serves one vector for the whole run."""

    def __init__(self, comm, numel: int, device: torch.device, dtype=torch.float32):
        self.comm, self.numel = comm, int(numel)
        n = comm.size
        per = -(-self.numel // (8 * n)) * 8          # chunk length: a multiple of 8 elements
        self.chunk, self.padded = per, per * n
        self.worker_error = torch.zeros(self.padded, dtype=dtype, device=device)
        self.server_error = torch.zeros(per, dtype=dtype, device=device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, comm = self.comm.size, self.comm
        buf = torch.zeros(self.padded, dtype=self.worker_error.dtype, device=x.device)
        buf[:self.numel] = x.reshape(-1)
        buf += self.worker_error
        signs, scales, sent = _compress(buf, n)
        self.worker_error = buf - sent
        # Worker -> server: chunk j of every rank to rank j.
        got_signs = torch.empty_like(signs)
        got_scales = torch.empty_like(scales)
        comm.all_to_all(got_signs, signs)
        comm.all_to_all(got_scales, scales)
        mine = (unpack_signs(got_signs, buf.dtype).view(n, -1) * got_scales.unsqueeze(1)).mean(dim=0)
        mine += self.server_error
        s_signs, s_scale, s_sent = _compress(mine, 1)
        self.server_error = mine - s_sent
        # Server -> everyone.
        all_signs = torch.empty(n * s_signs.numel(), dtype=torch.uint8, device=x.device)
        all_scales = torch.empty(n, dtype=s_scale.dtype, device=x.device)
        comm.all_gather(all_signs, s_signs)
        comm.all_gather(all_scales, s_scale)
        out = unpack_signs(all_signs, buf.dtype).view(n, -1) * all_scales.unsqueeze(1)
        return out.view(-1)[:self.numel]


class OneBitAdam(torch.optim.Optimizer):
    """1-bit Adam over the given parameters (see the module docstring).

    Param groups may carry ``dp_comm``, the data-parallel group whose ranks hold the same
    parameters (the strategy passes it); without one (one process) compression is skipped and
    the update is Adam with the variance frozen after ``warmup`` steps. ``local_gradients`` is
    True once the next step compresses: the strategy then leaves gradients unreduced.
    """

    step_communicates = True

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, warmup: int = 100):
        if lr <= 0 or eps <= 0 or not all(0.0 <= b < 1.0 for b in betas) or warmup < 0:
            raise ValueError(f"bad 1-bit Adam hyper-parameters lr={lr} betas={betas} eps={eps} warmup={warmup}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      dp_comm=None))
        self.warmup = int(warmup)
        self._allreduce: CompressedAllReduce | None = None

    @property
    def steps_done(self) -> int:
        """Steps taken, from the state (so a loaded checkpoint continues in the right stage)."""
        return max((int(st["step"]) for st in self.state.values() if "step" in st), default=0)

    @property
    def local_gradients_after(self) -> int:
        """Steps after which every step wants each rank's own gradient of the whole parameters on
        every rank of dp (the warm-up), for strategies that shard until then."""
        return self.warmup

    @property
    def local_gradients(self) -> bool:
        """Whether the next ``step`` wants this rank's own gradients (the compression stage)."""
        return self.steps_done >= self.warmup and self._comm() is not None

    def _comm(self):
        comm = next((g["dp_comm"] for g in self.param_groups if g["dp_comm"] is not None), None)
        return comm if comm is not None and comm.size > 1 else None

    def _params(self):
        return [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        compress = self.local_gradients
        todo = self._params()
        for g, p in todo:
            st = self.state[p]
            if not st:
                st["step"] = torch.tensor(0.0, dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            b1, b2 = g["betas"]
            st["step"] += 1
            if st["step"] <= self.warmup:
                st["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            st["exp_avg"].mul_(b1).add_(p.grad, alpha=1 - b1)
        if compress and todo:
            self._average_momentum(todo)
        for g, p in todo:
            st = self.state[p]
            b1, b2 = g["betas"]
            t = float(st["step"])
            bc1 = 1 - b1 ** t
            # The variance stopped at step ``warmup``, and so did its bias correction.
            v_hat = st["exp_avg_sq"] / (1 - b2 ** min(t, max(self.warmup, 1)))
            if g["weight_decay"]:
                p.mul_(1 - g["lr"] * g["weight_decay"])
            p.addcdiv_(st["exp_avg"], v_hat.sqrt_().add_(g["eps"]), value=-g["lr"] / bc1)
        return loss

    def _average_momentum(self, todo) -> None:
        """Replace every rank's momentum (updated with its own gradient) by the compressed average."""
        flat = torch.cat([self.state[p]["exp_avg"].reshape(-1) for _, p in todo])
        if self._allreduce is None or self._allreduce.numel != flat.numel():
            self._allreduce = CompressedAllReduce(self._comm(), flat.numel(), flat.device)
        avg = self._allreduce(flat)
        off = 0
        for _, p in todo:
            m = self.state[p]["exp_avg"]
            m.view(-1).copy_(avg[off:off + m.numel()])
            off += m.numel()
