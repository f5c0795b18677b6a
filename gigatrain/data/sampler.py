"""Distributed sampling that depends only on the seed and the global batch, and a prefetching loader.

The sample stream is the concatenation of per-epoch permutations of the dataset; optimizer step
``s`` consumes stream positions ``[s*GB, (s+1)*GB)`` (with a ``BatchRamp``, the positions after
the samples of the steps before it, which the ramp gives in closed form). Data parallel rank ``r`` of ``dp`` takes the
contiguous slice ``[r*GB/dp, (r+1)*GB/dp)`` of that global batch and cuts it into micro-batches in
order. So every layout sees the same global batch at every step, and any step can be computed
directly, which makes resuming exact.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import torch

__all__ = ["BatchRamp", "GlobalBatchSampler", "BatchLoader", "epoch_seed"]


class BatchRamp:
    """Megatron's batch-size ramp-up: the global batch starts at ``start`` and grows by
    ``increment`` in equal steps of samples until it reaches ``global_batch`` once ``samples``
    samples have been consumed: while fewer than ``samples`` are consumed, the batch of a step is
    ``start + increment * floor(consumed / (samples / n))``, ``n = (global_batch - start) /
    increment``. Everything is a function of the step, so a resumed run computes it directly."""

    def __init__(self, start: int, increment: int, samples: int, global_batch: int):
        if not (1 <= start <= global_batch and increment >= 1 and samples >= 0):
            raise ValueError(f"batch ramp {start},{increment},{samples} must have 1 <= START <= global_batch "
                             f"({global_batch}), INCREMENT >= 1 and SAMPLES >= 0")
        if (global_batch - start) % increment:
            raise ValueError(f"batch ramp: global_batch - START ({global_batch} - {start}) must be a multiple of "
                             f"INCREMENT ({increment})")
        self.start, self.increment, self.samples, self.global_batch = start, increment, samples, global_batch
        n = (global_batch - start) // increment
        self._per_increment = samples / n if n else 0.0
        # (first step, first sample) of every ramp step, until the full batch is reached.
        self._sizes: list[int] = []
        consumed = 0
        while n and consumed < samples:
            size = min(global_batch, start + increment * int(consumed // self._per_increment))
            if size == global_batch:
                break
            self._sizes.append(size)
            consumed += size
        self._ramp_samples = consumed

    @property
    def ramp_steps(self) -> int:
        """Steps taken before the batch is full."""
        return len(self._sizes)

    def size(self, step: int) -> int:
        """Global batch of optimizer ``step`` (0-based)."""
        return self._sizes[step] if step < len(self._sizes) else self.global_batch

    def offset(self, step: int) -> int:
        """Samples consumed before ``step``."""
        if step <= len(self._sizes):
            return sum(self._sizes[:step])
        return self._ramp_samples + (step - len(self._sizes)) * self.global_batch


def epoch_seed(seed: int, epoch: int) -> int:
    """64-bit generator seed for ``epoch`` of a run seeded with ``seed`` (first 8 bytes of
    SHA-256 of "seed:epoch"), so neighbouring seeds and epochs give unrelated permutations."""
    digest = hashlib.sha256(f"{int(seed)}:{int(epoch)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # keep it within int64 for manual_seed


class GlobalBatchSampler:
    """Sample indices for every optimizer step, independent of the parallel layout.

    Args:
        num_samples: dataset length (>= 1).
        global_batch: samples per optimizer step, summed over all data-parallel ranks and
            micro-batches (>= 1). It may exceed ``num_samples``; a step then spans epochs.
        seed: run seed. Epoch ``e`` is ``torch.randperm(num_samples)`` drawn from a
            ``torch.Generator`` seeded with ``epoch_seed(seed, e)``.
    """

    def __init__(self, num_samples: int, global_batch: int, seed: int = 0, *, cache_epochs: int = 2,
                 ramp: BatchRamp | None = None):
        if num_samples < 1:
            raise ValueError(f"the dataset is empty (num_samples={num_samples}); nothing to sample")
        if global_batch < 1:
            raise ValueError(f"global_batch must be >= 1, got {global_batch}")
        self.num_samples = int(num_samples)
        self.global_batch = int(global_batch)
        self.seed = int(seed)
        self.ramp = ramp
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._cache_epochs = max(1, cache_epochs)
        self._lock = threading.Lock()  # loader threads share the permutation cache

    @property
    def steps_per_epoch(self) -> float:
        """Optimizer steps per pass over the data (may be fractional)."""
        return self.num_samples / self.global_batch

    def epoch_permutation(self, epoch: int) -> torch.Tensor:
        """The permutation of ``range(num_samples)`` used in ``epoch`` (int64)."""
        with self._lock:
            perm = self._cache.get(epoch)
            if perm is None:
                g = torch.Generator(device="cpu")
                g.manual_seed(epoch_seed(self.seed, epoch))
                perm = torch.randperm(self.num_samples, generator=g)
                self._cache[epoch] = perm
                while len(self._cache) > self._cache_epochs:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(epoch)
            return perm

    def batch_size(self, step: int) -> int:
        """Global batch of ``step``: ``global_batch``, or the ramp's size."""
        return self.ramp.size(step) if self.ramp is not None else self.global_batch

    def batch_offset(self, step: int) -> int:
        """Samples consumed before ``step`` (its first position in the sample stream)."""
        return self.ramp.offset(step) if self.ramp is not None else step * self.global_batch

    def indices_for_step(self, step: int) -> torch.Tensor:
        """Dataset indices of the global batch of optimizer ``step`` (int64 ``[batch_size(step)]``)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        n, start = self.num_samples, self.batch_offset(step)
        end = start + self.batch_size(step)
        parts = []
        pos = start
        while pos < end:
            epoch, offset = divmod(pos, n)
            take = min(n - offset, end - pos)
            parts.append(self.epoch_permutation(epoch)[offset : offset + take])
            pos += take
        return parts[0].clone() if len(parts) == 1 else torch.cat(parts)

    def local_indices(self, step: int, dp_rank: int, dp_size: int) -> torch.Tensor:
        """This data-parallel rank's contiguous share of ``indices_for_step(step)``."""
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad data-parallel rank {dp_rank} of {dp_size}")
        batch = self.batch_size(step)
        if batch % dp_size != 0:
            raise ValueError(
                f"the global batch of step {step} ({batch}) must be divisible by the data-parallel size ({dp_size})"
            )
        per_rank = batch // dp_size
        return self.indices_for_step(step)[dp_rank * per_rank : (dp_rank + 1) * per_rank]

    def local_microbatches(self, step: int, dp_rank: int, dp_size: int, micro_batch: int) -> list[torch.Tensor]:
        """This rank's share of step ``step`` cut, in order, into micro-batches of ``micro_batch``.

        Raises ValueError unless ``global_batch`` divides by ``dp_size`` and the per-rank batch by
        ``micro_batch``.
        """
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        local = self.local_indices(step, dp_rank, dp_size)
        if local.numel() % micro_batch != 0:
            raise ValueError(
                f"the per-rank batch (global batch {self.batch_size(step)} / dp {dp_size} = {local.numel()}) "
                f"must be divisible by micro_batch ({micro_batch})"
            )
        return list(local.split(micro_batch))


class BatchLoader:
    """Iterate over optimizer steps, yielding this rank's micro-batches for each step.

    Each item is a list of ``(inputs, targets)`` tuples, one per micro-batch, on ``device``.
    Iteration starts at ``start_step`` and yields exactly what an uninterrupted run would have
    yielded from that step on; it stops before ``end_step`` (None: never stops).

    Batches are read by ``num_workers`` background threads (0: read in the caller's thread),
    ``prefetch`` steps ahead. For CUDA devices host tensors are pinned and copied with
    ``non_blocking=True`` on the current stream.

    Args:
        dataset: object with ``get_batch(indices) -> (inputs, targets)`` CPU tensors.
        sampler: a ``GlobalBatchSampler``.
        dp_rank, dp_size: this rank's place among data-parallel ranks.
        micro_batch: samples per micro-batch.
        start_step: first optimizer step to produce.
        device: where to put the tensors.
    """

    def __init__(
        self,
        dataset: Any,
        sampler: GlobalBatchSampler,
        dp_rank: int,
        dp_size: int,
        micro_batch: int,
        start_step: int = 0,
        device: torch.device | str = "cpu",
        num_workers: int = 1,
        prefetch: int = 2,
        end_step: int | None = None,
    ):
        self.dataset = dataset
        self.sampler = sampler
        self.dp_rank, self.dp_size, self.micro_batch = dp_rank, dp_size, micro_batch
        self.start_step = int(start_step)
        self.end_step = end_step
        self.device = torch.device(device)
        self.num_workers = max(0, int(num_workers))
        self.prefetch = max(1, int(prefetch), self.num_workers)
        self.pin = self.device.type == "cuda" and torch.cuda.is_available()
        # Fail now, not in a worker thread, if the batch does not divide.
        sampler.local_microbatches(self.start_step, dp_rank, dp_size, micro_batch)

    def load_step(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Host (CPU) micro-batches of ``step`` for this rank, pinned when the device is CUDA."""
        out = []
        for idx in self.sampler.local_microbatches(step, self.dp_rank, self.dp_size, self.micro_batch):
            x, y = self.dataset.get_batch(idx)
            if self.pin:
                x, y = x.pin_memory(), y.pin_memory()
            out.append((x, y))
        return out

    def _to_device(self, host: list[tuple[torch.Tensor, torch.Tensor]]):
        if self.device.type == "cpu":
            return host
        return [(x.to(self.device, non_blocking=self.pin), y.to(self.device, non_blocking=self.pin)) for x, y in host]

    def _steps(self) -> Iterator[int]:
        step = self.start_step
        while self.end_step is None or step < self.end_step:
            yield step
            step += 1

    def __iter__(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        if self.num_workers == 0:
            for step in self._steps():
                yield self._to_device(self.load_step(step))
            return
        steps = self._steps()
        with ThreadPoolExecutor(max_workers=self.num_workers, thread_name_prefix="gigatrain-data") as pool:
            pending: deque = deque()
            try:
                for step in steps:
                    pending.append(pool.submit(self.load_step, step))
                    if len(pending) >= self.prefetch:
                        break
                while pending:
                    host = pending.popleft().result()
                    nxt = next(steps, None)
                    if nxt is not None:
                        pending.append(pool.submit(self.load_step, nxt))
                    yield self._to_device(host)
            finally:
                for fut in pending:
                    fut.cancel()
