"""The test ladder as structure (see DESIGN.md): one marker per rung, and fixtures for each
rung's kind of process group.

- rung0: no process group (config, arithmetic, planner, schedules, placements);
- rung1: a fake process group of N ranks (construction and shapes; collectives do nothing);
- rung2: threads;
- rung3: real gloo processes (``spawn``), batched: a spawn costs seconds.

``pytest -m rung0`` runs the fast part alone. A module declares its rung with
``pytestmark = pytest.mark.rungN``; modules that mix rungs mark tests one by one.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("OMP_NUM_THREADS", "1")

RUNGS = {
    "rung0": "no process group: pure functions, arithmetic, formulas",
    "rung1": "fake process group of N ranks: construction and shapes only",
    "rung2": "threads standing in for ranks",
    "rung3": "real gloo processes (spawned), world size 1-8",
}


def pytest_configure(config):
    for name, text in RUNGS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def pytest_collection_modifyitems(config, items):
    """A test without a rung marker is rung 1 when it uses ``fake_group``, else rung 0: the
    marker then selects every test (``-m rung0``, ``-m "not rung3"``)."""
    for item in items:
        if not any(item.get_closest_marker(r) for r in RUNGS):
            item.add_marker(pytest.mark.rung1 if "fake_group" in item.fixturenames else pytest.mark.rung0)


@pytest.fixture
def fake_group():
    """``fake_group(world, rank=0)``: a fake default process group in this process (torch's
    ``FakeStore``), so meshes and groups of any size can be built; collectives do nothing and
    return garbage, so no numbers may be checked. Torn down after the test."""
    from dist_utils import fake_process_group

    stack = []

    def make(world: int, rank: int = 0):
        ctx = fake_process_group(world, rank)
        ctx.__enter__()
        stack.append(ctx)

    yield make
    while stack:
        stack.pop().__exit__(None, None, None)


@pytest.fixture
def oracle():
    """A one-process gloo world in this process (the oracle's process group)."""
    from dist_utils import one_process

    with one_process():
        yield


@pytest.fixture
def gloo():
    """``gloo(fn, world, *args, timeout_s=60)``: run ``fn(rank, world, *args)`` on real gloo
    processes and return each rank's result; batch many checks into one call."""
    from dist_utils import spawn

    return spawn
