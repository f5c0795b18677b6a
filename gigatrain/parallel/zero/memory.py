"""Model-state memory per rank: the ZeRO formulas, and a measurement to hold them against.

``model_state_bytes`` is the one formula the planner uses. ``measure_model_state_bytes`` walks the
tensors a strategy, its optimizer and its model actually hold, counting each storage once, so
tests can compare what the code owns with what the formula promises.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
import torch.nn as nn


def model_state_bytes(P: float, N: int, stage: int, offload: str = "none", param_bytes: int = 2,
                      adam: bool = True, *, momentum: bool = True) -> dict[str, float]:
    """Bytes of model state (parameters, gradients, optimizer) per data-parallel rank.

    ``P`` parameters, ``N`` data-parallel ranks, ZeRO ``stage`` 0-3, ``param_bytes`` 2 (bf16/fp16
    parameters and gradients, plus an fp32 master) or 4 (fp32: the parameters are the master).
    Optimizer states: Adam 8 bytes/param (two fp32 moments), SGD 4 with ``momentum`` else 0.
    With K = master + optimizer states (bf16 + Adam: K = 12, the ZeRO paper's figure) and
    G = param_bytes (gradients kept in the parameter dtype):

    - stage 0: (param_bytes + G + K) P            -> 16P for bf16 + Adam
    - stage 1: (param_bytes + G) P + K P / N       -> 2P + 2P + 12P/N
    - stage 2: param_bytes P + (G + K) P / N       -> 2P + 14P/N
    - stage 3: (param_bytes + G + K) P / N         -> 16P/N

    ``offload="cpu"`` moves the fp32 master (always kept then, 4 bytes even for fp32 parameters)
    and the optimizer states to the host, with the gradient shard the host update reads, in the
    parameter dtype (the updated low-precision shard is written over it): host = (4 + states + G)
    P/N. The device keeps only the low-precision parts: stage 1 its parameters and gradients, stage
    2 its parameters (gradients stream out bucket by bucket), stage 3 its parameter shard.
    Returns ``{"device": bytes, "host": bytes}``; buckets in flight and activations are not
    model state and are not counted.
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0-3, got {stage}")
    if N < 1:
        raise ValueError(f"N must be >= 1, got {N}")
    offload = offload or "none"
    states = 8 if adam else (4 if momentum else 0)
    grad = param_bytes
    if offload == "cpu":
        if stage == 0:
            raise ValueError("optimizer offload needs ZeRO stage 1 or more")
        device = {1: (param_bytes + grad) * P, 2: param_bytes * P, 3: param_bytes * P / N}[stage]
        return {"device": float(device), "host": float((4 + states + grad) * P / N)}
    if offload != "none":
        raise ValueError(f"offload must be 'none' or 'cpu' here, got {offload!r}")
    k = (4 if param_bytes < 4 else 0) + states
    device = {
        0: (param_bytes + grad + k) * P,
        1: (param_bytes + grad) * P + k * P / N,
        2: param_bytes * P + (grad + k) * P / N,
        3: (param_bytes + grad + k) * P / N,
    }[stage]
    return {"device": float(device), "host": 0.0}


# -- measurement ---------------------------------------------------------------------------------
def _storage_key(t: torch.Tensor):
    st = t.untyped_storage()
    return (t.device.type, t.device.index, st.data_ptr()), st.nbytes()


def _walk(obj, out: list[torch.Tensor], seen: set[int]) -> None:
    """Collect tensors reachable from ``obj`` through containers, optimizers, modules and
    gigatrain objects (not through process groups, threads or other foreign objects)."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out.append(obj)
        if obj.grad is not None:
            out.append(obj.grad)
        return
    if isinstance(obj, nn.Module):
        for p in obj.parameters():
            _walk(p, out, seen)
        for b in obj.buffers():
            _walk(b, out, seen)
        return
    if isinstance(obj, torch.optim.Optimizer):
        for g in obj.param_groups:
            for p in g["params"]:
                _walk(p, out, seen)
        for st in obj.state.values():
            _walk(st, out, seen)
        return
    if isinstance(obj, dict):
        for v in obj.values():
            _walk(v, out, seen)
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            _walk(v, out, seen)
        return
    module = type(obj).__module__ or ""
    if module.startswith("gigatrain.") and not module.startswith("gigatrain.distributed"):
        fields = vars(obj) if hasattr(obj, "__dict__") else {
            f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else {}
        for v in fields.values():
            _walk(v, out, seen)


def measure_model_state_bytes(*roots, host: Iterable[torch.Tensor] = ()) -> dict[str, int]:
    """Bytes held by the tensors reachable from ``roots`` (a strategy, its optimizer, the model...),
    each storage counted once, split into ``device`` and ``host``.

    A storage is host memory when it belongs to one of the ``host`` tensors (the strategy's own
    accounting of its offloaded buffers, ``strategy.host_tensors()``; needed when the "device" is
    the CPU itself) or, when some root tensor lives on an accelerator, when it is in CPU memory.
    Meta tensors (placeholders) hold nothing.
    """
    tensors: list[torch.Tensor] = []
    seen: set[int] = set()
    for r in roots:
        _walk(r, tensors, seen)
    host_keys = {_storage_key(t)[0] for t in host}
    accel = any(t.device.type not in ("cpu", "meta") for t in tensors)
    sizes: dict[tuple, tuple[int, bool]] = {}
    for t in tensors:
        if t.device.type == "meta":
            continue
        key, nbytes = _storage_key(t)
        is_host = key in host_keys or (accel and t.device.type == "cpu")
        sizes[key] = (nbytes, is_host)
    out = {"device": 0, "host": 0}
    for nbytes, is_host in sizes.values():
        out["host" if is_host else "device"] += nbytes
    return out
