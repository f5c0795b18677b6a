"""Composition of the parallel techniques into one training step.

The engine takes a model, an optimizer factory and batches; it never imports a model or a dataset,
so any ``nn.Module`` with a loss works. Choices are made once, at construction:

- a *gradient strategy* (data parallel / ZeRO stage) that owns how gradients are reduced, which
  parameters the optimizer sees, and how full state is gathered for checkpoints;
- a *precision policy* (autocast dtype, loss scaling);

and ``train_step`` only runs them: forward/backward over the micro-batches, reduce, check for
overflow, clip by the global norm, step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from .dist.mesh import Mesh
from .parallel.data_parallel import DataParallel
from .optim import param_groups
from .precision import DynamicLossScaler, PrecisionPolicy

Batch = tuple[torch.Tensor, torch.Tensor]
OptimizerFactory = Callable[[list[dict]], torch.optim.Optimizer]  # groups: {"params", "decay"}


@dataclass
class StepResult:
    loss: float            # mean loss over the global batch (unscaled)
    grad_norm: float       # global gradient norm before clipping (nan when the step was skipped)
    skipped: bool          # fp16 overflow: no update happened on any rank
    loss_scale: float | None = None


def _default_loss(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if hasattr(model, "loss"):
        return model.loss
    return nn.functional.cross_entropy


class Engine:
    """Train ``model`` over ``mesh`` with data parallelism over the ``dp`` axis.

    ``grad_strategy`` is built from ``zero`` (0 = plain data parallel); the optimizer is created
    by ``optimizer_factory`` over the parameter groups (``{"params": [...], "decay": bool}``, see
    ``gigatrain.optim.param_groups``) that the strategy exposes.
    """

    def __init__(self, model: nn.Module, mesh: Mesh, optimizer_factory: OptimizerFactory, *,
                 precision: PrecisionPolicy, grad_clip: float | None = None, zero: int = 0,
                 bucket_mb: float = 25.0, loss_fn=None, strategy_options: dict | None = None):
        self.mesh = mesh
        self.device = mesh.device
        self.model = model.to(self.device)
        self.precision = precision
        self.grad_clip = grad_clip if grad_clip and grad_clip > 0 else None
        self.loss_fn = loss_fn or _default_loss(model)
        self.strategy = build_grad_strategy(zero, self.model, mesh, bucket_mb=bucket_mb,
                                            precision=precision, **(strategy_options or {}))
        self.optimizer = self.strategy.build_optimizer(optimizer_factory)
        self.scaler = DynamicLossScaler() if precision.loss_scaling else None

    # -- one optimizer step -------------------------------------------------------------------
    def train_step(self, micro_batches: Sequence[Batch], lr: float,
                   inject_overflow: bool = False) -> StepResult:
        """Forward and backward over this rank's micro-batches, then one optimizer step.

        Gradients are averaged over all micro-batches of all data-parallel ranks, i.e. over the
        global batch, exactly as one process with gradient accumulation would compute them.
        """
        self.model.train()
        n = len(micro_batches)
        scale = self.scaler.scale if self.scaler else 1.0
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, (x, y) in enumerate(micro_batches):
            self.strategy.set_sync(i == n - 1)
            with self.precision.autocast(self.device):
                out = self.model(x)
                loss = self.loss_fn(out, y)
            loss_sum += loss.detach().double()
            (loss * (scale / n)).backward()
            self.strategy.after_backward()
        mean_loss = self._mean_over_dp(loss_sum / n)

        if inject_overflow:
            self.strategy.grads()[0].view(-1)[0] = float("inf")
        skipped = False
        if self.scaler is not None:
            skipped = self.scaler.found_overflow(self.strategy.grads(), group=self.mesh.world.group)
            self.scaler.update(skipped)
        if skipped:
            self.strategy.zero_grad()
            return StepResult(mean_loss, float("nan"), True, scale)

        inv_scale = 1.0 / scale
        norm = math.sqrt(self.strategy.grad_sq_norm()) * inv_scale
        coef = inv_scale
        if self.grad_clip is not None and norm > self.grad_clip:
            coef *= self.grad_clip / (norm + 1e-6)
        self.strategy.step(self.optimizer, lr, coef)
        self.strategy.zero_grad()
        return StepResult(mean_loss, norm, False, self.scaler.scale if self.scaler else None)

    @torch.no_grad()
    def eval_step(self, micro_batches: Sequence[Batch]) -> tuple[float, float | None]:
        """Mean loss (and accuracy for classifiers) over the global batch, without updating."""
        self.model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        for x, y in micro_batches:
            with self.precision.autocast(self.device):
                out = self.model(x)
                loss_sum += self.loss_fn(out, y).double()
            if out.dim() == 2 and y.dim() == 1:
                correct += (out.argmax(-1) == y).sum().double()
                count += y.numel()
        n = max(1, len(micro_batches))
        mean = self._mean_over_dp(loss_sum / n)
        acc = self._mean_over_dp(correct / count) if count else None
        self.model.train()
        return mean, acc

    def _mean_over_dp(self, value: torch.Tensor) -> float:
        dp = self.mesh.dp
        if dp.size > 1:
            value = value.clone()
            dp.all_reduce(value)
            value /= dp.size
        return float(value.item())

    # -- state for checkpoints ------------------------------------------------------------------
    def full_state(self) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
        """(parameters by name, optimizer state by parameter name), full and unsharded, on CPU."""
        return self.strategy.full_state(self.optimizer)

    def load_full_state(self, params: dict[str, torch.Tensor],
                        optim: dict[str, dict[str, torch.Tensor]] | None) -> None:
        self.strategy.load_full_state(self.optimizer, params, optim)


class Stage0Strategy:
    """Plain data parallel: full gradients, full optimizer on every rank."""

    def __init__(self, model: nn.Module, mesh: Mesh, *, bucket_mb: float, precision: PrecisionPolicy):
        self.model = model
        self.mesh = mesh
        self.dp = DataParallel(model, mesh.dp, bucket_mb)

    def build_optimizer(self, factory: OptimizerFactory) -> torch.optim.Optimizer:
        return factory(param_groups(self.model.named_parameters()))

    def set_sync(self, sync: bool) -> None:
        self.dp.set_sync(sync)

    def after_backward(self) -> None:
        self.dp.after_backward()

    def grads(self) -> list[torch.Tensor]:
        return self.dp.grads()

    def grad_sq_norm(self) -> float:
        return float(self.dp.grad_sq_norm())

    def zero_grad(self) -> None:
        self.dp.zero_grad()

    def step(self, optimizer: torch.optim.Optimizer, lr: float, grad_coef: float) -> None:
        if grad_coef != 1.0:
            for b in self.dp.buckets.buckets:
                b.buffer.mul_(grad_coef)
        for g in optimizer.param_groups:
            g["lr"] = lr
        optimizer.step()

    def full_state(self, optimizer):
        return params_by_name(self.model), optimizer_state_by_name(self.model, optimizer)

    def load_full_state(self, optimizer, params, optim) -> None:
        load_params_by_name(self.model, params)
        if optim is not None:
            load_optimizer_state_by_name(self.model, optimizer, optim)


def build_grad_strategy(zero: int, model: nn.Module, mesh: Mesh, **kwargs):
    """The gradient strategy for a ZeRO stage (0 = plain data parallel)."""
    if zero == 0:
        return Stage0Strategy(model, mesh, **kwargs)
    try:
        from .parallel.zero import build_zero_strategy
    except ImportError as e:  # pragma: no cover - depends on what is installed
        raise NotImplementedError(f"ZeRO stage {zero} is not available: {e}") from e
    return build_zero_strategy(zero, model, mesh, **kwargs)


# -- name-keyed state, shared by every strategy -------------------------------------------------
def unique_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters by their first name (a tied weight appears once)."""
    return list(model.named_parameters())


def params_by_name(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", torch.float32).clone() for n, p in unique_named_parameters(model)}


def load_params_by_name(model: nn.Module, params: dict[str, torch.Tensor]) -> None:
    named = dict(unique_named_parameters(model))
    missing = sorted(set(named) - set(params))
    if missing:
        raise KeyError(f"checkpoint lacks parameters: {missing[:5]}{'...' if len(missing) > 5 else ''}")
    with torch.no_grad():
        for n, p in named.items():
            src = params[n]
            if tuple(src.shape) != tuple(p.shape):
                raise ValueError(f"parameter {n}: checkpoint shape {tuple(src.shape)} != model {tuple(p.shape)}")
            p.copy_(src.to(p.dtype))


def optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer):
    out: dict[str, dict[str, torch.Tensor]] = {}
    for n, p in unique_named_parameters(model):
        st = optimizer.state.get(p)
        if not st:
            continue
        out[n] = {k: (v.detach().to("cpu").clone() if torch.is_tensor(v) else torch.tensor(float(v)))
                  for k, v in st.items()}
    return out


def load_optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer, state) -> None:
    for n, p in unique_named_parameters(model):
        if n not in state:
            continue
        st = {}
        for k, v in state[n].items():
            # torch keeps AdamW's ``step`` as a CPU float tensor unless fused/capturable.
            if k == "step":
                st[k] = v.to(torch.float32).reshape(()).clone()
                if optimizer.defaults.get("fused") or optimizer.defaults.get("capturable"):
                    st[k] = st[k].to(p.device)
            else:
                st[k] = v.to(device=p.device, dtype=p.dtype).clone()
        optimizer.state[p] = st
