"""The CUDA side of optim8's kernels: CuPy, imported on first use.

Every kernel's CUDA path goes through three helpers here:

* :func:`function` compiles ``kernels/cuda/<file>.cu`` with NVRTC (through
  ``cupy.RawModule``) and returns one ``__global__`` function from it. Modules are
  memoized per (source hash, device) in this process; across processes CuPy's
  on-disk kernel cache (``~/.cupy/kernel_cache``, or ``$CUPY_CACHE_DIR``) keeps the
  compiled binary, keyed by the source text and the options. CuPy writes that cache
  through a temporary file and an atomic rename, so two processes compiling the same
  kernel at once each end with a complete file.
* :func:`launch` runs a function on PyTorch's *current* stream of the tensors'
  device, looked up at each call, so our kernels order correctly with PyTorch's work
  and can be captured in CUDA graphs.
* :func:`ptr` passes a tensor zero-copy as a device pointer.

Scalars are passed typed (``numpy.int32``, ``numpy.int64``, ``numpy.float32``): CuPy
turns a Python ``float`` into a ``double`` and does not check it against the
kernel's signature.
"""

from __future__ import annotations

import functools
import hashlib
import re
import threading
from pathlib import Path

import numpy as np
import torch

CUDA_DIR = Path(__file__).resolve().parent / "cuda"

_INSTALL_HINT = (
    "optim8 runs its CUDA kernels through CuPy, which is not installed. Install the "
    "extra that matches your CUDA version: pip install 'optim8[cuda12]' or "
    "pip install 'optim8[cuda13]' (this torch was built for CUDA {cuda})."
)

_lock = threading.Lock()
_modules: dict[tuple[str, int], object] = {}

# Every .cu file a kernel module uses, with the template instantiations it needs.
# tests/test_cuda_sources.py compiles each with NVRTC (no GPU needed).
SOURCES: dict[str, tuple[str, ...]] = {}


def register(name: str, name_expressions: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Declare that ``cuda/<name>`` is compiled with these name expressions."""
    SOURCES[name] = tuple(name_expressions)
    return SOURCES[name]


# --fmad=false: the kernels must compute the PyTorch references' bits, and a contracted
# multiply-add rounds once where the reference rounds twice.
NVRTC_OPTIONS = ("-std=c++17", "--fmad=false")


def check_compiles(name: str, arch: str = "compute_90") -> str:
    """Compile ``cuda/<name>`` to PTX with NVRTC without touching a GPU; return the PTX.

    Raises ``RuntimeError`` with NVRTC's log on a compile error.
    """
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(source(name), name, [], [])
    try:
        for expr in SOURCES.get(name, ()):
            nvrtc.addNameExpression(prog, expr)
        try:
            nvrtc.compileProgram(prog, [*NVRTC_OPTIONS, f"-arch={arch}"])
        except Exception as exc:
            raise RuntimeError(f"{name} failed to compile:\n{nvrtc.getProgramLog(prog)}") from exc
        ptx = nvrtc.getPTX(prog)
        return ptx.decode() if isinstance(ptx, bytes) else ptx
    finally:
        nvrtc.destroyProgram(prog)


@functools.cache
def cupy():
    """Import CuPy, or raise one clear error naming the extra to install."""
    try:
        import cupy as cp
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError(_INSTALL_HINT.format(cuda=torch.version.cuda)) from exc
    return cp


_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"\s*$', re.MULTILINE)


@functools.cache
def source(name: str) -> str:
    """The text of ``cuda/<name>`` with our own ``#include "x.cuh"`` lines inlined.

    Inlining (rather than passing ``-I``) makes the headers part of the text that
    CuPy hashes for its disk cache, so editing a header recompiles its users.
    """
    text = (CUDA_DIR / name).read_text()

    def inline(match: re.Match) -> str:
        return source(match.group(1))

    return _INCLUDE.sub(inline, text)


def _module(name: str, name_expressions: tuple[str, ...], device: int):
    text = source(name)
    key = (hashlib.sha256(text.encode() + repr(name_expressions).encode()).hexdigest(), device)
    mod = _modules.get(key)
    if mod is None:
        with _lock:
            mod = _modules.get(key)
            if mod is None:
                cp = cupy()
                with cp.cuda.Device(device):
                    mod = cp.RawModule(
                        code=text,
                        options=NVRTC_OPTIONS,
                        name_expressions=name_expressions or None,
                    )
                    mod.compile()
                _modules[key] = mod
    return mod


def function(name: str, kernel: str, device: int, name_expressions: tuple[str, ...] = ()):
    """The ``__global__`` function ``kernel`` of ``cuda/<name>`` compiled for ``device``.

    ``name_expressions`` lists every template instantiation the module holds; pass
    the same tuple from every call site of one file so it compiles once.
    """
    mod = _module(name, name_expressions, device)
    with cupy().cuda.Device(device):
        return mod.get_function(kernel)


_streams: dict[tuple[int, int], object] = {}


def _stream(device: torch.device):
    """CuPy's view of PyTorch's current stream on ``device`` (memoized by handle)."""
    torch_stream = torch.cuda.current_stream(device)
    key = (torch_stream.device_index, torch_stream.cuda_stream)
    stream = _streams.get(key)
    if stream is None:
        cp = cupy()
        from_external = getattr(cp.cuda.Stream, "from_external", None)
        if from_external is not None:  # CuPy >= 14
            stream = from_external(torch_stream)
        else:
            stream = cp.cuda.ExternalStream(torch_stream.cuda_stream, torch_stream.device_index)
        _streams[key] = stream
    return stream


def launch(fn, grid: int | tuple, block: int | tuple, args: tuple, device: torch.device, shared_mem: int = 0) -> None:
    """Launch ``fn`` on PyTorch's current stream of ``device``."""
    cp = cupy()
    grid = grid if isinstance(grid, tuple) else (grid,)
    block = block if isinstance(block, tuple) else (block,)
    with cp.cuda.Device(device.index), _stream(device):
        fn(grid, block, args, shared_mem=shared_mem)


def ptr(t: torch.Tensor) -> np.uint64:
    """A tensor's device address, passed by value as a kernel pointer argument."""
    return np.uint64(t.data_ptr())


def device_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()
