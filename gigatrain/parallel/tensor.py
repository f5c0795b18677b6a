"""Tensor parallelism (Megatron 1D) over the tp axis.

``apply_tensor_parallel`` is the first of the ``apply_*`` steps: it rewrites the model in place
from the plan the model declares (``model.tp_plan``) and records the placements of the parameters
it splits. Only tp = 1 is implemented so far: every parameter stays whole, replicated over tp.
"""
from __future__ import annotations

import torch.nn as nn

from ..distributed.comm import Comm
from ..distributed.mesh import LayoutError
from .placement import Placements
from .policies import TensorParallelPolicy


def apply_tensor_parallel(model: nn.Module, tp: Comm, policy: TensorParallelPolicy,
                          placements: Placements) -> nn.Module:
    """Split ``model`` over ``tp`` in place as its ``tp_plan`` says; returns the model.

    With one tp rank nothing changes (every parameter is replicated over tp, as ``placements``
    already says). Larger tp groups are refused with a ``LayoutError``.
    """
    if tp.size != 1 or policy.size != 1:
        raise LayoutError(f"tensor parallelism (parallel.tp={max(tp.size, policy.size)}) is not "
                          "implemented yet: use parallel.tp=1 with data or pipeline parallelism.")
    return model
