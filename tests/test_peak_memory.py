"""Peak memory in the metrics: the host's high-water mark, the device's peak, the largest over
ranks (ladder 0: a stand-in for the one all-reduce)."""
import torch
import torch.distributed as dist

from gigatrain.metrics import format_peaks, peak_host_bytes, peak_memory


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_host_peak_is_at_least_the_resident_set_and_follows_an_allocation():
    before = peak_host_bytes()
    assert before >= _rss() > 0
    big = torch.ones(2 * before // 4 + 2**24, dtype=torch.float32)   # touched: resident now
    assert peak_host_bytes() >= before + big.numel() * 4 // 2
    del big


class _MaxWith:
    """A one-op Comm stand-in: all-reduce(MAX) with another rank's values."""

    def __init__(self, other):
        self.other = torch.tensor(other, dtype=torch.float64)
        self.calls = 0

    def all_reduce(self, t, op=dist.ReduceOp.SUM):
        assert op == dist.ReduceOp.MAX
        self.calls += 1
        torch.maximum(t, self.other, out=t)


def test_peaks_are_the_largest_over_ranks_in_one_all_reduce():
    cpu = torch.device("cpu")
    mine = peak_memory(None, cpu)
    assert mine["peak_mem_bytes"] is None and mine["peak_host_bytes"] >= _rss()
    comm = _MaxWith([float(2**40), -1.0])
    got = peak_memory(comm, cpu)
    assert comm.calls == 1
    assert got == {"peak_host_bytes": 2**40, "peak_mem_bytes": None}
    comm = _MaxWith([1.0, float(3 * 2**30)])      # another rank has a device peak
    got = peak_memory(comm, cpu)
    assert got["peak_host_bytes"] >= mine["peak_host_bytes"]
    assert got["peak_mem_bytes"] == 3 * 2**30
    assert format_peaks(got).endswith("device 3.00 GiB")
