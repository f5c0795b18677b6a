"""ZeRO-1 until the optimizer wants each rank's own gradients, plain data parallel afterwards.

An optimizer that averages over dp itself after a warm-up (1-bit Adam: ``local_gradients_after``
steps of AdamW, then the momentum averaged compressed from each rank's own gradient) needs, from
then on, exactly what data parallel gives: every rank holds the whole parameters and its own whole
gradient, and every rank updates every element from the averaged momentum. A ZeRO-1 update of a
shard followed by an all-gather of the fp32 parameters would send half the bytes of the warm-up
step again, which is what the compression exists to remove. Updating every element on every rank
needs the frozen variance of every element there: sharding it and sending no parameters are
exclusive (per element, a rank either holds the frozen variance or receives the updated value).

So ``HandOver`` runs ZeRO-1 (``first``) during the warm-up, with the optimizer states of its own
shard only (the ZeRO-1 saving, while the optimizer is plain AdamW), and at the end of the step
after which the optimizer wants local gradients (or when a checkpoint past that point is loaded)
it gathers the full state once and hands the model and that state over to ``Stage0Strategy``
built by the same optimizer factory. The compressed phase is then the data-parallel code path
itself, so ZeRO-1 and zero=0 take the same steps (the same momentum chunks, the same errors).
The gather happens inside the last warm-up step, so every compressed step sends only the
compressed momentum. The interface is ``strategy.GradStrategy``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from .strategy import GradStrategy


def wants_local_gradients(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` (one with ``local_gradients_after``) has taken the steps after which
    it averages over dp itself from each rank's own gradients."""
    return optimizer.steps_done >= optimizer.local_gradients_after


class HandOver:
    """``first`` (a ZeRO-1 ``ZeroStrategy``) until ``wants_local_gradients(optimizer)``, then the
    ``GradStrategy`` that ``then()`` builds (``Stage0Strategy`` over the same model and the same
    optimizer factory), loaded with ``first``'s full state."""

    def __init__(self, first: GradStrategy, then: Callable[[], GradStrategy]):
        self.current = first
        self._then = then
        self.handed_over = False
        self._maybe_hand_over()

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.current.optimizer

    def _maybe_hand_over(self) -> None:
        """Collective over dp (every rank's optimizer has taken the same steps)."""
        if self.handed_over or not wants_local_gradients(self.current.optimizer):
            return
        params, optim = self.current.full_state()
        low = [p for p in self.current.model.parameters() if p.requires_grad and p.dtype != torch.float32]
        self.current.close()
        for p in self.current.model.parameters():
            p.grad = None           # views into the ZeRO buckets; data parallel attaches its own
        # ZeRO keeps low-precision parameters and an fp32 master of its shard; data parallel
        # keeps fp32 parameters (autocast computes in the low precision): re-home them in fp32.
        for p in low:
            p.data = torch.empty(p.shape, dtype=torch.float32, device=p.device)
        self.current = self._then()
        self.current.load_full_state(params, optim)
        self.handed_over = True

    # -- the step: delegated ------------------------------------------------------------------------
    def set_sync(self, sync: bool) -> None:
        self.current.set_sync(sync)

    def begin_step(self, lr: float, *, overlap: bool = False) -> bool:
        return self.current.begin_step(lr, overlap=overlap)

    def after_backward(self) -> None:
        self.current.after_backward()

    def reduce_accumulated(self) -> None:
        self.current.reduce_accumulated()

    def grads(self) -> list[torch.Tensor]:
        return self.current.grads()

    def grad_sq_norm(self, skip=()) -> float:
        return self.current.grad_sq_norm(skip=skip)

    def zero_grad(self) -> None:
        self.current.zero_grad()

    def step(self, lr: float, grad_coef: float) -> None:
        self.current.step(lr, grad_coef)
        self._maybe_hand_over()

    # -- state: delegated, handing over when a loaded state is past the warm-up -----------------------
    def full_state(self):
        return self.current.full_state()

    def load_full_state(self, params, optim) -> None:
        self.current.load_full_state(params, optim)
        self._maybe_hand_over()

    def state_pieces(self):
        return self.current.state_pieces()

    def load_pieces(self, source) -> None:
        self.current.load_pieces(source)
        self._maybe_hand_over()

    def host_tensors(self) -> list[torch.Tensor]:
        return self.current.host_tensors()

    def close(self) -> None:
        self.current.close()
