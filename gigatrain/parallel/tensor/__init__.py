"""Tensor parallelism (Megatron 1D) over the tp axis, with sequence parallelism.

- ``mappings``: the communication as named autograd pairs (copy to / reduce from the TP region,
  scatter / gather along the hidden dimension or the sequence, reduce-scatter / all-gather);
- ``layers``: ``ColumnParallelLinear``, ``RowParallelLinear``, ``VocabParallelEmbedding``,
  ``VocabParallelCrossEntropy``;
- ``apply``: ``apply_tensor_parallel(model, tp, policy, placements)``, the first of the
  ``apply_*`` steps, which rewrites a model in place from the plan it declares.
"""
from .apply import STYLES, apply_tensor_parallel, output_gather
from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelCrossEntropy, VocabParallelEmbedding

__all__ = ["apply_tensor_parallel", "output_gather", "STYLES", "ColumnParallelLinear", "RowParallelLinear",
           "VocabParallelEmbedding", "VocabParallelCrossEntropy"]
