"""AdamW on the CPU for optimizer offload (ZeRO-Offload).

The offload engine keeps fp32 master weights and both Adam moments in host memory as flat
buffers and updates them there while gradients stream in from the GPU in bf16/fp16 buckets.
`adamw_step_` does that update in one pass over memory:

- it reads fp32, bf16 or fp16 gradients directly (no fp32 copy of the gradients on the host),
- divides them by a loss scale and multiplies them by a clip coefficient on the fly,
- optionally writes the new parameters in bf16/fp16 into a second buffer in the same pass (what
  is copied back to the GPU),
- works on any sub-range, so buckets can be updated as they arrive, from several threads (the
  kernel releases the GIL).

Results are bit-identical to ``torch.optim.AdamW(fused=True)``, whose arithmetic the kernel
mirrors operation by operation (see csrc/cpu_adam.cpp), and agree with the default
``torch.optim.AdamW`` to fp32 rounding.

The kernel is C++ (AVX-512 / AVX2 / scalar, chosen at run time; OpenMP threads), compiled on
first use with the system C++ compiler into a cache directory (about a second, no torch headers
involved). If that is impossible, a warning says why and the same update runs with torch ops.

`CPUAdamW` wraps the kernel as a ``torch.optim.Optimizer`` with the same state layout as
``torch.optim.AdamW``, so checkpoints of one load into the other.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch.optim import Optimizer

__all__ = ["CPUAdam", "CPUAdamW", "adamw_step_", "backend", "build_info"]

_SOURCE = Path(__file__).with_name("csrc") / "cpu_adam.cpp"
# -ffp-contract=off: the kernel places every FMA itself (where torch's fused kernel has one);
# an FMA the compiler adds on its own would change rounding. No -march=native: the source picks
# AVX-512/AVX2 at run time, so one cached library serves every x86-64 machine sharing a home.
_CXXFLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno", "-w"]
_BACKEND_ENV = "GIGATRAIN_CPU_ADAM_BACKEND"  # auto (default) | cpp | torch
_ISA_ENV = "GIGATRAIN_CPU_ADAM_ISA"  # cap the SIMD level: avx512 | avx2 | scalar
_CACHE_ENV = "GIGATRAIN_EXT_DIR"  # where compiled kernels are cached
_ISA_NAMES = {0: "scalar", 1: "avx2", 2: "avx512"}
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# Gradients are converted to fp32 in blocks of this many elements on the torch path: a bounded
# temporary (16 MB), yet few enough torch calls that thread start-up stays negligible.
_TORCH_BLOCK = 1 << 22


# --------------------------------------------------------------------------- building


@dataclass
class _Loaded:
    fn: Any = None  # the ctypes step function, or None when the torch path is used
    isa_fn: Any = None
    reason: str = ""  # why the C++ kernel is not used
    info: dict | None = None


_lock = threading.Lock()
_loaded: _Loaded | None = None
_isa_cap = -1  # highest SIMD level the kernel may use (-1: best available)


def _cache_dir() -> Path:
    if os.environ.get(_CACHE_ENV):
        return Path(os.environ[_CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gigatrain" / "ext"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@contextmanager
def _file_lock(path: Path):
    """Exclusive lock across processes; the OS drops it if the holder dies, so it never goes stale."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename below still keeps readers safe
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _build() -> tuple[Path, float]:
    """Compile the kernel once per (source, flags, compiler); returns (library, compile seconds).

    Concurrent processes serialise on a lock file and each re-checks for the finished library,
    so only one compiles; the library appears under its final name by an atomic rename, so no
    process can load a half-written file.
    """
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    source = _SOURCE.read_bytes()
    key_parts = [source, " ".join(_CXXFLAGS).encode(), cxx.encode(), platform.machine().encode()]
    key = hashlib.sha256(b"\0".join(key_parts)).hexdigest()[:16]
    directory = _cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK):
            raise PermissionError(f"{directory} is not writable")
    except OSError:  # e.g. a read-only home: build per user under the temp directory instead
        uid = os.getuid() if hasattr(os, "getuid") else "user"
        directory = Path(tempfile.gettempdir()) / f"gigatrain-ext-{uid}"
        directory.mkdir(parents=True, exist_ok=True)
    lib = directory / f"cpu_adam_{key}.so"
    if lib.exists():
        return lib, 0.0
    with _file_lock(directory / f"cpu_adam_{key}.lock"):
        if lib.exists():
            return lib, 0.0
        start = time.perf_counter()
        tmp = directory / f".cpu_adam_{key}.{os.getpid()}.{threading.get_ident()}.so"
        errors = []
        # Linking libgomp by its soname means the process reuses the OpenMP runtime torch has
        # already loaded instead of starting a second thread pool. Without OpenMP (e.g. Apple
        # clang) the kernel still builds and runs on one thread.
        for extra in (["-fopenmp"], []):
            cmd = [cxx, *_CXXFLAGS, *extra, str(_SOURCE), "-o", str(tmp)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode == 0:
                os.replace(tmp, lib)
                return lib, time.perf_counter() - start
            lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
            errors.append(next((ln for ln in lines if "error" in ln), lines[-1]))
        try:
            tmp.unlink()
        except OSError:
            pass
        raise RuntimeError(f"compile failed: {errors[0].strip()}")


def _load() -> _Loaded:
    global _loaded, _isa_cap
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        _isa_cap = _max_isa()
        choice = os.environ.get(_BACKEND_ENV, "auto").strip().lower() or "auto"
        if choice not in ("auto", "cpp", "torch"):
            raise ValueError(f"{_BACKEND_ENV} must be auto, cpp or torch, not {choice!r}")
        result = _Loaded(info={"build_seconds": 0.0, "library": None, "openmp": False})
        if choice == "torch":
            result.reason = f"{_BACKEND_ENV}=torch"
        else:
            try:
                lib_path, seconds = _build()
                lib = ctypes.CDLL(str(lib_path))
                fn = lib.gt_cpu_adamw_step
                fn.restype = ctypes.c_int
                fn.argtypes = (
                    [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
                    + [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
                    + [ctypes.c_double] * 8
                    + [ctypes.c_int, ctypes.c_int]
                )
                lib.gt_cpu_adam_isa.restype = ctypes.c_int
                lib.gt_cpu_adam_isa.argtypes = [ctypes.c_int]
                openmp = bool(lib.gt_cpu_adam_has_openmp())
                result.fn, result.isa_fn = fn, lib.gt_cpu_adam_isa
                result.info.update(build_seconds=seconds, library=str(lib_path), openmp=openmp)
            except Exception as exc:  # any failure here must only cost speed, never the run
                result.reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                if choice == "cpp":
                    raise RuntimeError(f"C++ CPU Adam requested but unavailable: {result.reason}") from exc
                warnings.warn(
                    f"gigatrain CPU Adam: C++ kernel unavailable ({result.reason}); using the torch path",
                    RuntimeWarning,
                    stacklevel=3,
                )
        _loaded = result
        return result


def _max_isa() -> int:
    """SIMD cap from GIGATRAIN_CPU_ADAM_ISA (-1: none); read when the kernel is loaded."""
    name = os.environ.get(_ISA_ENV, "").strip().lower()
    if not name:
        return -1
    for code, isa in _ISA_NAMES.items():
        if isa == name:
            return code
    raise ValueError(f"{_ISA_ENV} must be one of {sorted(_ISA_NAMES.values())}, not {name!r}")


def backend() -> str:
    """"cpp" if the compiled kernel is in use, else "torch" (compiles on first call)."""
    return "cpp" if _load().fn is not None else "torch"


def build_info() -> dict:
    """Backend, SIMD level, OpenMP, compile seconds (0 when cached), library path, fallback reason."""
    loaded = _load()
    info = dict(loaded.info or {})
    info["backend"] = "cpp" if loaded.fn is not None else "torch"
    info["isa"] = _ISA_NAMES[loaded.isa_fn(_isa_cap)] if loaded.isa_fn is not None else None
    info["reason"] = loaded.reason
    return info


# --------------------------------------------------------------------------- the step


def _check(param, grad, exp_avg, exp_avg_sq, out_lowp, start, end) -> None:
    n = param.numel()
    for name, t in (("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != torch.float32 or not t.is_cpu or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous fp32 CPU tensor, got {t.dtype} on {t.device}")
        if t.numel() != n:
            raise ValueError(f"{name} has {t.numel()} elements, param has {n}")
    if not 0 <= start <= end <= n:
        raise ValueError(f"range [{start}, {end}) is outside [0, {n}]")
    if grad is None:
        raise ValueError("grad is required")
    for name, t in (("grad", grad), ("out_lowp", out_lowp)):
        if t is None:
            continue
        if t.dtype not in _DTYPE_CODES or not t.is_cpu or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous fp32/bf16/fp16 CPU tensor, got {t.dtype} on {t.device}")
        if t.numel() not in (n, end - start):
            raise ValueError(f"{name} has {t.numel()} elements; expected {n} (whole) or {end - start} (the range)")


def _range(t: torch.Tensor | None, n: int, start: int, end: int) -> torch.Tensor | None:
    """The [start, end) part of a flat view; a tensor that already has end - start elements is the range."""
    if t is None:
        return None
    flat = t.view(-1)
    return flat[start:end] if flat.numel() == n and (start, end) != (0, n) else flat


def _ptr(t: torch.Tensor, n: int, start: int) -> int:
    """Address of element `start` of a contiguous tensor (of element 0 if it holds only the range)."""
    return t.data_ptr() + (start * t.element_size() if t.numel() == n else 0)


def _scalar(x) -> float:
    return float(x.item() if isinstance(x, torch.Tensor) else x)


def adamw_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int | float,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    grad_scale: float = 1.0,
    out_lowp: torch.Tensor | None = None,
    *,
    clip_coef: float = 1.0,
    maximize: bool = False,
    start: int = 0,
    end: int | None = None,
    num_threads: int | None = None,
    backend: str | None = None,
) -> None:
    """One AdamW update, in place, of ``param``, ``exp_avg`` and ``exp_avg_sq`` over ``[start, end)``.

    ``param``, ``exp_avg``, ``exp_avg_sq``: contiguous fp32 CPU tensors with the same number of
    elements (any shape; treated as flat). ``grad``: contiguous fp32, bf16 or fp16 CPU tensor,
    read and upcast inside the kernel, never written. ``out_lowp``: optional contiguous bf16,
    fp16 (or fp32) tensor that receives the updated parameters, rounded to nearest even, in the
    same pass. ``grad`` and ``out_lowp`` hold either as many elements as ``param`` (indexed by
    the same range) or exactly ``end - start`` (the range only, e.g. one bucket).

    ``step`` is the step count including this update (1 on the first call), as torch's
    ``state["step"]`` after its increment. The update is torch.optim.AdamW's::

        g = grad / grad_scale * clip_coef     (negated if maximize)
        param *= 1 - lr * weight_decay
        exp_avg = lerp(exp_avg, g, 1 - beta1)
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
        param -= lr / (1 - beta1**step) * exp_avg / (sqrt(exp_avg_sq) / sqrt(1 - beta2**step) + eps)

    with the rounding of ``torch.optim.AdamW(fused=True)``. ``grad_scale`` is a loss scale the
    gradients are divided by (exactly, not multiplied by its reciprocal); ``clip_coef`` multiplies
    them afterwards, as ``clip_grad_norm_`` would. ``lr``, ``step``, ``grad_scale`` and
    ``clip_coef`` may be Python numbers or one-element tensors (read once on the host).

    ``num_threads`` (default ``torch.get_num_threads()``) threads split the range; pass 1 when
    the caller runs several updates at once on its own threads. The GIL is released while the
    C++ kernel runs. ``backend``: "cpp" or "torch" to force one (default: cpp when available;
    the environment variable GIGATRAIN_CPU_ADAM_BACKEND=torch forces the torch path).
    """
    n = param.numel()
    end = n if end is None else end
    _check(param, grad, exp_avg, exp_avg_sq, out_lowp, start, end)
    if end == start:
        return
    lr, step = _scalar(lr), _scalar(step)
    grad_scale, clip_coef = _scalar(grad_scale), _scalar(clip_coef)
    if maximize:  # exact: negation commutes with every rounding step
        clip_coef = -clip_coef

    loaded = _load()
    if backend not in (None, "cpp", "torch"):
        raise ValueError(f"backend must be 'cpp' or 'torch', not {backend!r}")
    if backend == "cpp" and loaded.fn is None:
        raise RuntimeError(f"C++ CPU Adam unavailable: {loaded.reason}")
    if loaded.fn is None or backend == "torch":
        p, g, m, v, o = (_range(t, n, start, end) for t in (param, grad, exp_avg, exp_avg_sq, out_lowp))
        _torch_step(p, g, m, v, o, step, lr, beta1, beta2, eps, weight_decay, grad_scale, clip_coef)
        return
    threads = torch.get_num_threads() if num_threads is None else max(1, int(num_threads))
    rc = loaded.fn(
        _ptr(param, n, start), _ptr(grad, n, start), _DTYPE_CODES[grad.dtype],
        _ptr(exp_avg, n, start), _ptr(exp_avg_sq, n, start),
        None if out_lowp is None else _ptr(out_lowp, n, start),
        -1 if out_lowp is None else _DTYPE_CODES[out_lowp.dtype], end - start,
        lr, float(beta1), float(beta2), float(eps), float(weight_decay), step,
        grad_scale, clip_coef, threads, _isa_cap,
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"cpu adam kernel rejected its arguments (code {rc})")


# --------------------------------------------------------------------------- torch path


def _torch_ops_update(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
    """The AdamW update written with plain tensor ops (same order as torch's for-loop AdamW)."""
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-lr / bias_correction1)


_use_fused_op = hasattr(torch, "_fused_adamw_")


def _torch_step(p, g, m, v, out, step, lr, beta1, beta2, eps, weight_decay, grad_scale, clip_coef, *, ops=False):
    """Same update with torch's own fused CPU AdamW kernel (or plain ops where it is missing)."""
    global _use_fused_op
    n = p.numel()
    step_t = torch.tensor(step, dtype=torch.float32)
    # Gradients that need converting or scaling go through one reused fp32 block buffer (the
    # caller's gradient is never written); fp32 gradients are used as they are.
    convert = g.dtype != torch.float32 or grad_scale != 1.0 or clip_coef != 1.0
    block = _TORCH_BLOCK if convert else n
    buf = torch.empty(min(block, n)) if convert else None
    for s in range(0, n, block):
        e = min(n, s + block)
        pb, mb, vb, gb = p[s:e], m[s:e], v[s:e], g[s:e]
        if convert:
            gb = buf[: e - s].copy_(gb)
            if grad_scale != 1.0:
                gb.div_(grad_scale)  # exact division, as in the kernel
            if clip_coef != 1.0:
                gb.mul_(clip_coef)
        done = False
        if _use_fused_op and not ops:
            try:
                torch._fused_adamw_(
                    [pb], [gb], [mb], [vb], [], [step_t], lr=lr, beta1=beta1, beta2=beta2,
                    weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False,
                )  # fmt: skip
                done = True
            except (RuntimeError, NotImplementedError, TypeError):
                _use_fused_op = False  # this torch has no CPU kernel for it
        if not done:
            _torch_ops_update(pb, gb, mb, vb, step, lr, beta1, beta2, eps, weight_decay)
        if out is not None:
            out[s:e].copy_(pb)


# --------------------------------------------------------------------------- front ends


@dataclass(frozen=True)
class CPUAdam:
    """AdamW hyperparameters bound to the flat-buffer step, for the offload engine.

    ``CPUAdam(lr=3e-4, weight_decay=0.1).step_(param, grad, exp_avg, exp_avg_sq, step=7,
    out_lowp=bf16_copy, start=a, end=b)``; keyword arguments given to ``step_`` override the
    stored ones (e.g. ``lr`` from a schedule). See `adamw_step_` for the arguments.
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    num_threads: int | None = None

    def step_(self, param, grad, exp_avg, exp_avg_sq, step, **overrides) -> None:
        kwargs: dict[str, Any] = dict(
            lr=self.lr, beta1=self.betas[0], beta2=self.betas[1], eps=self.eps,
            weight_decay=self.weight_decay, num_threads=self.num_threads,
        )  # fmt: skip
        kwargs.update(overrides)
        adamw_step_(param, grad, exp_avg, exp_avg_sq, step, **kwargs)

    @staticmethod
    def backend() -> str:
        return backend()


def _scalar_dtype() -> torch.dtype:
    # torch.optim keeps "step" as a float tensor of this dtype on the CPU.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class CPUAdamW(Optimizer):
    """``torch.optim.AdamW`` for fp32 CPU parameters, running the one-pass C++ kernel.

    Same arguments and defaults as torch's AdamW (amsgrad is not supported), same state keys
    (``step`` as a float tensor, ``exp_avg``, ``exp_avg_sq``) and param-group keys, so state
    dicts load into each other. Parameters and gradients must be contiguous fp32 CPU tensors.
    ``num_threads`` bounds the kernel's threads (default: ``torch.get_num_threads()``).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        num_threads: int | None = None,
    ):
        if amsgrad:
            raise ValueError("CPUAdamW does not implement amsgrad")
        if not 0.0 <= float(lr):
            raise ValueError(f"invalid learning rate {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"invalid eps {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=False, maximize=maximize,
            foreach=None, capturable=False, differentiable=False, fused=None, decoupled_weight_decay=True,
        )  # fmt: skip
        super().__init__(params, defaults)
        self.num_threads = num_threads

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group.get("amsgrad", False):
                raise ValueError("CPUAdamW does not implement amsgrad")
            if group["weight_decay"] != 0 and not group.get("decoupled_weight_decay", True):
                raise ValueError("CPUAdamW implements decoupled (AdamW) weight decay only, not Adam's L2 penalty")
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("CPUAdamW does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                adamw_step_(
                    p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"].item(),
                    lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"], maximize=group.get("maximize", False),
                    num_threads=self.num_threads,
                )  # fmt: skip
        return loss
