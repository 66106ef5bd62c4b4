"""The one launcher interface between optim8's kernel wrappers and a device that runs CUDA code.

Every wrapper (``blockwise.py``, ``adam.py``, ``int8.py``) talks to a device only through the
functions here: :func:`function` (a compiled ``__global__`` of ``cuda/<file>.cu``),
:func:`launch`, :func:`ptr`, and the few device queries a launch configuration needs
(:func:`sm_count`, :func:`ctas_per_sm`, :func:`upload`, :func:`record_stream`,
:func:`int_mm`). Two backends implement them:

* CuPy (``_cupy.py``): NVRTC-compiled modules launched on PyTorch's current stream of a CUDA
  device. This is the production path, used for every ``cuda`` tensor.
* The host device (``hostdev.py``, test infrastructure): the same ``.cu`` sources compiled by
  the system C++ compiler, every CUDA lane its own fiber, launched on CPU tensors. It is only
  ever active inside ``hostdev.active()``; ``import optim8`` never imports it.

:func:`kernel_device` is the one question the rest of optim8 asks ("do tensors on this device
run the CUDA kernels?") instead of ``x.is_cuda``; with no host device active it is exactly
``device.type == "cuda"``.

Kernel sources are declared here with :func:`register` (file name and every template
instantiation the wrapper launches), so tools (tests, ``benchmarks/kernel_report.py``, the
host device) can enumerate what production compiles.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import torch

CUDA_DIR = Path(__file__).resolve().parent / "cuda"

# Every .cu file a kernel module uses, with the template instantiations it launches.
SOURCES: dict[str, tuple[str, ...]] = {}

# Custom ops with a CUDA kernel: name -> (op, CUDA implementation). The host device routes
# them to the CUDA implementation for CPU tensors while it is active.
KERNEL_OPS: dict[str, tuple[object, object]] = {}

# The options of every NVRTC compile (the CuPy backend, tests/test_cuda_sources.py,
# benchmarks/kernel_report.py). --fmad=false: the kernels compute the PyTorch references'
# bits, and a contracted multiply-add rounds once where the reference rounds twice.
# Flush-to-zero stays off (NVRTC's default; CuPy's own compile would append -ftz=true, which is
# why _cupy.py drives NVRTC itself): subnormal state, gradients and bf16 values must keep
# the bits the reference computes.
NVRTC_OPTIONS = ("-std=c++17", "--fmad=false")


def register(name: str, name_expressions: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Declare that ``cuda/<name>`` is compiled with these name expressions."""
    SOURCES[name] = tuple(name_expressions)
    return SOURCES[name]


def cuda_kernel(op):
    """Decorator: register ``fn`` as ``op``'s CUDA kernel (and record it for the host device)."""

    def deco(fn):
        op.register_kernel("cuda")(fn)
        KERNEL_OPS[op._qualname] = (op, fn)
        return fn

    return deco


_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"\s*$', re.MULTILINE)


@functools.cache
def source(name: str) -> str:
    """The text of ``cuda/<name>`` with our own ``#include "x.cuh"`` lines inlined.

    Inlining (rather than passing ``-I``) makes the headers part of the text that the module
    caches hash, so editing a header recompiles its users.
    """
    text = (CUDA_DIR / name).read_text()

    def inline(match: re.Match) -> str:
        return source(match.group(1))

    return _INCLUDE.sub(inline, text)


# ------------------------------------------------------------------------- backends

_host = None  # the host device backend while hostdev.active() is in force


def _set_host(backend) -> object:
    """Install (or, with None, remove) the host device; returns the previous one (hostdev.py)."""
    global _host
    previous, _host = _host, backend
    return previous


def host_active() -> bool:
    return _host is not None


def kernel_device(device: torch.device) -> bool:
    """Whether tensors on ``device`` run the CUDA kernels (CUDA, or the CPU under the host device)."""
    return device.type == "cuda" or (_host is not None and device.type == "cpu")


def _backend(device: torch.device):
    if device.type == "cuda":
        from . import _cupy

        return _cupy
    if _host is not None:
        return _host
    raise RuntimeError(f"no CUDA kernel backend for tensors on {device}")


def device_index(t: torch.Tensor) -> int:
    """The device index a kernel for ``t`` is compiled and launched for."""
    if t.device.type != "cuda":
        return 0
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def function(name: str, kernel: str, device: torch.device, name_expressions: tuple[str, ...] = ()):
    """The ``__global__`` function ``kernel`` of ``cuda/<name>``, compiled for ``device``.

    ``name_expressions`` lists every template instantiation the module holds; pass the same
    tuple from every call site of one file so it compiles once.
    """
    device = torch.device(device)
    return _backend(device).function(name, kernel, device, name_expressions)


def launch(fn, grid: int | tuple, block: int | tuple, args: tuple, device: torch.device, shared_mem: int = 0) -> None:
    """Launch ``fn`` (from :func:`function`) with typed scalar ``args`` on ``device``.

    On CUDA it runs on PyTorch's current stream; scalars must be ``numpy.int32`` /
    ``numpy.int64`` / ``numpy.float32`` / ``numpy.uint64`` (pointers) as the kernel declares them.
    """
    grid = grid if isinstance(grid, tuple) else (grid,)
    block = block if isinstance(block, tuple) else (block,)
    _backend(device).launch(fn, grid, block, args, device, shared_mem)


def ptr(t: torch.Tensor) -> np.uint64:
    """A tensor's address, passed by value as a kernel pointer argument."""
    return np.uint64(t.data_ptr())


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (the host device reports a small fixed count)."""
    return _backend(device).sm_count(device)


def ctas_per_sm(fn, block: int, device: torch.device) -> int:
    """Resident CTAs of ``fn`` per SM at ``block`` threads (occupancy), at least 1."""
    return _backend(device).ctas_per_sm(fn, block, device)


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` (a CPU tensor) on ``device`` without a host synchronization."""
    return _backend(device).upload(host, device)


def record_stream(t: torch.Tensor, device: torch.device) -> None:
    """Keep ``t``'s memory alive until the current stream's queued work is done."""
    _backend(device).record_stream(t, device)


def int_mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """``a[M, K] @ b_t[K, N]`` of int8 matrices in int32 (cuBLASLt on CUDA), exactly."""
    return _backend(a.device).int_mm(a, b_t)
