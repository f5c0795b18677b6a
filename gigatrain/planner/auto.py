"""The planner inside ``gigatrain train``, before launch: ``parallel.auto`` and the memory check.

- ``training_device``: the device the job will train on, as the planner describes it (a GPU's
  preset with its real memory, or this machine's CPU with the host memory each process can use).
- ``choose_layout``: with ``parallel.auto=true``, the predicted fastest layout that fits and that
  the config accepts, keys given explicitly (``given_keys``) kept as given.
- ``check_memory``: the predicted peak memory per rank of the layout about to run, as one line,
  or a ``ConfigError`` with the planner's suggestion when it is predicted not to fit.

Every rank of a torchrun/srun launch runs these without communicating, so everything they
depend on must be the same on every rank: the config, the world, and a device description that
does not change between ranks (see ``training_device``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .memory import Layout
from .plan import GiB, job_from_config, layout_from_config, layout_overrides, memory_why, plan_config
from .presets import PRESETS, Device
from .search import FIXABLE

__all__ = ["Choice", "given_keys", "training_device", "choose_layout", "check_memory"]


@dataclass(frozen=True)
class Choice:
    """A layout the planner chose: the config that runs it, the overrides that differ from the
    config it started from, and its prediction (seconds per step, peak bytes per rank)."""

    cfg: object
    overrides: dict
    layout: Layout
    step_s: float
    peak_bytes: float

    def describe(self) -> str:
        return f"{self.layout.describe()}: predicted {self.step_s:.3g} s/step, {_gib(self.peak_bytes)} per rank"

    def argv(self) -> list[str]:
        """The overrides as ``key=value`` command-line arguments."""
        return [f"{k}={_text(v)}" for k, v in self.overrides.items()]


def _text(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ",".join(str(x) for x in v) + "]"
    return str(v)


def _flatten(data: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in data.items():
        if isinstance(v, dict):
            keys |= _flatten(v, f"{prefix}{k}.")
        else:
            keys.add(prefix + str(k))
    return keys


def given_keys(path: str | None, overrides) -> set[str]:
    """Dotted keys the user gave: those in the config file at ``path`` (the built-in default job
    gives none) and those of the ``key=value`` overrides (a section given as a mapping,
    ``parallel={zero: 1}``, gives its keys)."""
    from ..config.loading import _read_file
    from ..config.yamlio import parse_value

    keys = _flatten(_read_file(path)) if path else set()
    for item in overrides:
        key, _, text = item.partition("=")
        key = key.strip()
        value = parse_value(text)
        keys |= _flatten(value, key + ".") if isinstance(value, dict) else {key}
    return keys


def _meminfo(field: str) -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def training_device(local_procs: int, *, same_on_every_rank: bool = False) -> Device:
    """The device one process of the job trains on, for the planner.

    On a GPU: its preset (A100/H100/H200 by name) with its real memory. On a CPU: the ``cpu``
    preset whose memory is the host memory available to each of the ``local_procs`` processes
    of this machine (``MemAvailable``; ``MemTotal`` with ``same_on_every_rank``, for ranks that
    each decide alone and must decide alike), and whose ``runtime_bytes`` is 0: the interpreter
    and torch are already running when ``MemAvailable`` is read, and a CPU job is refused only
    when its tensors alone exceed what is free, so a small job is never refused on a busy machine.
    """
    import torch

    from .plan import resolve_device

    if torch.cuda.is_available():
        return resolve_device(None)
    cpu = PRESETS["cpu"]
    free = _meminfo("MemTotal" if same_on_every_rank else "MemAvailable") or cpu.host_mem_bytes * cpu.gpus_per_node
    per = free / max(1, local_procs)
    return replace(cpu, mem_bytes=per, host_mem_bytes=per, runtime_bytes=0.0, gpus_per_node=max(1, local_procs))


def _apply(cfg, overrides: dict):
    from ..config import config_from_dict

    data = cfg.to_dict()
    for key, value in overrides.items():
        node = data
        *sections, leaf = key.split(".")
        for s in sections:
            node = node.setdefault(s, {})
        node[leaf] = value
    return config_from_dict(data)


def _runnable(cfg, world: int) -> bool:
    from ..config import ConfigError, check_supported, resolve_for_world

    try:
        check_supported(resolve_for_world(cfg, world))
        return True
    except ConfigError:
        return False


def choose_layout(cfg, world: int, device: Device, given=(), *, gpus_per_node: int | None = None) -> Choice:
    """The predicted fastest layout of ``cfg``'s job on ``world`` processes of ``device`` that
    fits and that the config accepts (its cross-checks, ``resolve_for_world`` and
    ``check_supported``). Layout keys in ``given`` keep ``cfg``'s values (a null leaves the key
    to the search); every other layout key is searched, other ``given`` keys are never changed.
    The returned config has ``parallel.auto`` off: it is the concrete layout. Raises
    ``ConfigError`` when no layout fits or the given keys admit none, saying why."""
    from ..config import ConfigError, config_keys
    from .plan import no_fit_message

    given = set(given)
    fixed = {}
    for key, field_name in FIXABLE.items():
        if key in given:
            value = _get(cfg, key)
            if value is not None:
                fixed[field_name] = value
    try:
        res = plan_config(cfg, world, device, fixed, gpus_per_node=gpus_per_node or world, supported_only=True)
    except ValueError as e:  # PlanError, or a model the planner does not describe
        raise ConfigError(f"parallel.auto: {str(e).rstrip('.')}") from None
    known = set(config_keys())
    for c in res.fitting:
        ov = {k: v for k, v in layout_overrides(c.layout, known).items() if k in known and k not in given}
        ov["parallel.auto"] = False
        try:
            new = _apply(cfg, ov)
        except ConfigError:
            continue
        if _runnable(new, world):
            changed = {k: v for k, v in ov.items() if _get(cfg, k) != v or k == "parallel.auto"}
            return Choice(new, changed, c.layout, c.step_s, c.mem.peak)
    if res.best is None:
        raise ConfigError(f"parallel.auto: {no_fit_message(res)}")
    raise ConfigError(f"parallel.auto: none of the {len(res.fitting)} layouts that fit {world} x {device.name} "
                      "passes the config's checks with the keys given; give fewer parallel.* keys.")


def _get(cfg, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def check_memory(resolved, world: int, device: Device, *, gpus_per_node: int | None = None) -> str | None:
    """One line with the predicted peak memory per rank of ``resolved`` (a config completed by
    ``resolve_for_world``) on ``device``, or None for a model the planner does not describe.
    Raises ``ConfigError`` when the prediction exceeds the device (or, offloaded, the host),
    with the layout the planner suggests instead, or why no layout fits."""
    from types import SimpleNamespace

    from ..config import ConfigError
    from .memory import memory_breakdown

    try:
        job = job_from_config(resolved, device)
    except ValueError:
        return None
    lay = layout_from_config(resolved)
    m = memory_breakdown(job, lay, device)
    avail = " available" if device.runtime_bytes == 0 else ""  # training_device's CPU: what is free
    where = f"{world} x {device.name} ({_gib(device.mem_bytes)}{avail} each)"
    parts = f"model states {_gib(m.states)}, activations {_gib(m.activations)}"
    if m.runtime:
        parts += f", runtime {_gib(m.runtime)}"
    if m.host:
        parts += f"; {_gib(m.host)} offloaded to the host"
    line = f"predicted peak memory per rank {_gib(m.peak)} ({parts}) for {lay.describe()} on {where}"
    if m.peak <= device.mem_bytes and m.host <= device.host_mem_bytes:
        return line
    why = memory_why(SimpleNamespace(mem=m), device)
    try:
        alt = choose_layout(resolved, world, device, gpus_per_node=gpus_per_node)
        shown = " ".join(a for a in alt.argv() if not a.startswith("parallel.auto="))
        suggestion = f"The planner suggests {shown} ({alt.describe()}), or parallel.auto=true to let it choose."
    except ConfigError as e:
        suggestion = e.problems[-1].replace("parallel.auto: ", "")
        suggestion = "The planner finds no way out: " + suggestion[0].lower() + suggestion[1:]
    raise ConfigError(f"the layout {lay.describe()} is predicted to run out of memory on {where}: it {why}. "
                      f"{suggestion}")


def _gib(x: float) -> str:
    return f"{x / GiB:,.2f} GiB" if x >= GiB / 10 else f"{x / 2**20:.1f} MiB"
