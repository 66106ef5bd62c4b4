"""Compiled CPU kernels: C++ sources under ``kernels/cpu/`` built at first use by the system compiler.

The CPU twin of the NVRTC path. ``library()`` compiles ``cpu/adam_cpu.cpp`` (the Adam step)
and ``cpu/int8_cpu.cpp`` (the int8 linear's passes around its GEMM) into one library, once per
(sources, flags, compiler, CPU) into ``$OPTIM8_CPU_CACHE`` (default ``~/.cache/optim8/cpu``)
and loads it with ctypes; later processes load the cached library. Where no compiler exists,
compilation fails, or ``OPTIM8_CPU_KERNELS=0`` is set, ``library()`` returns None and callers
take the PyTorch path, which computes the same bits (tests/test_cpu_kernels.py,
tests/test_int8_kernels.py).

Flags: ``-O3 -march=native`` for the vector units of the machine it runs on (the CPU's model
and flags are part of the cache key), ``-ffp-contract=off`` (no fused multiply-add: every
operation stays one correctly rounded fp32 operation, as in the reference) and
``-fno-math-errno`` (lets ``sqrt`` vectorize; it changes no value). No fast-math.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

SOURCES = (
    Path(__file__).resolve().parent / "cpu" / "adam_cpu.cpp",  # the Adam step
    Path(__file__).resolve().parent / "cpu" / "int8_cpu.cpp",  # the passes around the int8 GEMM
)
FLAGS = (
    "-std=c++17", "-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno",
    "-fPIC", "-shared", "-pthread", "-Wall", "-Wno-unknown-pragmas",
)


def compiler() -> str | None:
    """The system C++ compiler (``$CXX``, else g++, c++ or clang++), or None."""
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx) or cxx
    for name in ("g++", "c++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("OPTIM8_CPU_CACHE") or Path.home() / ".cache" / "optim8" / "cpu")


def _cpu_id() -> str:
    """The CPU's model and feature flags (the library is built for this CPU's vector units)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() + platform.machine()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(sorted(set(keep)))


_lock = threading.Lock()
_state: dict = {}


def disabled() -> bool:
    return os.environ.get("OPTIM8_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off")


def unavailable_reason() -> str | None:
    """Why the compiled CPU kernels are not in use here (None when they are)."""
    if library() is not None:
        return None
    return _state.get("reason")


def library() -> ctypes.CDLL | None:
    """The compiled CPU library, built on first use; None where it cannot be (see the module docstring)."""
    if disabled():
        _state["reason"] = "OPTIM8_CPU_KERNELS=0"
        return None
    key = compiler()
    if key in _state:
        return _state[key]
    with _lock:
        if key not in _state:
            _state[key] = _load(key)
    return _state[key]


def _load(cxx: str | None) -> ctypes.CDLL | None:
    if cxx is None:
        _state["reason"] = "no C++ compiler found (g++, c++ or clang++; set CXX)"
        return None
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
        srcs = [path.read_text() for path in SOURCES]
        digest = hashlib.sha256("\0".join([*srcs, *FLAGS, version, _cpu_id()]).encode()).hexdigest()[:32]
        target = cache_dir() / f"adam_cpu-{digest}.so"
        if not target.exists():
            cache_dir().mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".build-") as tmp:
                out = Path(tmp) / target.name
                proc = subprocess.run([cxx, *FLAGS, "-o", str(out), *map(str, SOURCES)], capture_output=True, text=True, timeout=600)
                if proc.returncode != 0:
                    raise RuntimeError(f"{cxx} failed:\n{proc.stderr[-4000:]}")
                os.replace(out, target)  # atomic: a concurrent process sees the old state or the whole file
        lib = ctypes.CDLL(str(target))
    except Exception as exc:  # noqa: BLE001 - any failure means: use the reference
        _state["reason"] = f"building the CPU kernels failed ({type(exc).__name__}: {exc})"
        warnings.warn(
            f"optim8: {_state['reason']}; the optimizer step takes the (slower) PyTorch reference on the CPU. "
            "Set OPTIM8_CPU_KERNELS=0 to skip the build.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    fn = lib.optim8_adam_step
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int] * 5 + [ctypes.c_void_p] * 5 + [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for name, args in (
        ("optim8_int8_scan", [ptr, i64, i64, ctypes.c_float, ptr, ptr, i32]),
        ("optim8_int8_rowmax", [ptr, i64, i64, ptr, ptr, i32]),
        ("optim8_int8_quantize_rows", [ptr, i64, i64, ptr, ptr, ptr, ptr, i32]),
        ("optim8_int8_epilogue", [ptr, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, i32]),
    ):
        getattr(lib, name).restype = None
        getattr(lib, name).argtypes = args
    return lib


@functools.cache
def _dtype_codes():
    import torch

    return {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def reset() -> None:
    """Forget the loaded library (tests: a changed ``CXX`` or ``OPTIM8_CPU_KERNELS`` takes effect)."""
    with _lock:
        _state.clear()
