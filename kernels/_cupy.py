"""The CUDA backend of the launcher interface (``_launch.py``): NVRTC modules run through CuPy.

* :func:`function` compiles ``kernels/cuda/<file>.cu`` with NVRTC (``_nvrtc.compile``: the
  production options, flush-to-zero off) to a cubin for the device's architecture (PTX for
  the newest architecture NVRTC knows, when the device is newer), loads it with
  ``cupy.cuda.function.Module`` and returns one ``__global__`` function. Modules are memoized
  per (source hash, device) in this process; across processes the compiled binary is kept on
  disk under ``$OPTIM8_CACHE_DIR`` (default ``~/.cache/optim8/kernels``), keyed by the source
  text, the options, the architecture and the NVRTC version, written through a temporary file
  and an atomic rename so that two processes compiling at once each end with a whole file.
* :func:`launch` runs a function on PyTorch's *current* stream of the tensors' device, looked
  up at each call, so our kernels order correctly with PyTorch's work.

Scalars are passed typed (``numpy.int32``, ``numpy.int64``, ``numpy.float32``): CuPy turns a
Python ``float`` into a ``double`` and does not check it against the kernel's signature.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path

import torch

from . import _launch, _nvrtc

_INSTALL_HINT = (
    "optim8 runs its CUDA kernels through CuPy, which is not installed. Install the "
    "extra that matches your CUDA version: pip install 'optim8[cuda12]' or "
    "pip install 'optim8[cuda13]' (this torch was built for CUDA {cuda})."
)

_lock = threading.Lock()
_modules: dict[tuple[str, int], tuple[object, dict]] = {}


@functools.cache
def cupy():
    """Import CuPy, or raise one clear error naming the extra to install."""
    try:
        import cupy as cp
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError(_INSTALL_HINT.format(cuda=torch.version.cuda)) from exc
    return cp


def cache_dir() -> Path:
    return Path(os.environ.get("OPTIM8_CACHE_DIR") or Path.home() / ".cache" / "optim8" / "kernels")


@functools.cache
def _arch(device: int) -> str:
    """``sm_XY`` of the device, or ``compute_XY`` of NVRTC's newest architecture if it predates the device."""
    major, minor = torch.cuda.get_device_capability(device)
    cc = 10 * major + minor
    archs = _nvrtc.supported_archs()
    if not archs or cc in archs:
        return f"sm_{cc}"
    return f"compute_{max(a for a in archs if a <= cc)}"


def compiled(name: str, name_expressions: tuple[str, ...], arch: str) -> _nvrtc.Compiled:
    """``cuda/<name>`` compiled for ``arch`` with the production options, through the disk cache."""
    text = _launch.source(name)
    key = hashlib.sha256(
        json.dumps([text, list(name_expressions), _nvrtc.options_for(arch), _nvrtc.version()]).encode()
    ).hexdigest()
    root = cache_dir()
    binary_path, meta_path = root / f"{key}.bin", root / f"{key}.json"
    try:
        meta = json.loads(meta_path.read_text())
        return _nvrtc.Compiled(binary_path.read_bytes(), meta["kind"], meta["lowered"], tuple(meta["options"]), "")
    except (OSError, ValueError, KeyError):
        pass
    result = _nvrtc.compile(text, name, name_expressions, arch)
    try:
        root.mkdir(parents=True, exist_ok=True)
        for path, data in (
            (binary_path, result.binary),
            (meta_path, json.dumps({"kind": result.kind, "lowered": result.lowered, "options": result.options}).encode()),
        ):
            fd, tmp = tempfile.mkstemp(dir=root, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # the binary lands before the metadata that makes it a hit
    except OSError:  # a read-only home: compile again next process
        pass
    return result


def _module(name: str, name_expressions: tuple[str, ...], device: int):
    key = (hashlib.sha256(_launch.source(name).encode() + repr(name_expressions).encode()).hexdigest(), device)
    entry = _modules.get(key)
    if entry is None:
        with _lock:
            entry = _modules.get(key)
            if entry is None:
                cp = cupy()
                result = compiled(name, name_expressions, _arch(device))
                with cp.cuda.Device(device):
                    mod = cp.cuda.function.Module()
                    mod.load(result.binary)
                entry = _modules[key] = (mod, result.lowered)
    return entry


def function(name: str, kernel: str, device: torch.device, name_expressions: tuple[str, ...] = ()):
    index = device.index if device.index is not None else torch.cuda.current_device()
    mod, lowered = _module(name, name_expressions, index)
    symbol = lowered.get(kernel, kernel)  # a non-template kernel is found by its plain name
    with cupy().cuda.Device(index):
        return mod.get_function(symbol)


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


def launch(fn, grid: tuple, block: tuple, args: tuple, device: torch.device, shared_mem: int = 0) -> None:
    cp = cupy()
    index = device.index if device.index is not None else torch.cuda.current_device()
    with cp.cuda.Device(index):
        fn(grid, block, args, shared_mem=shared_mem, stream=_stream(torch.device("cuda", index)))


@functools.cache
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _ctas_per_sm(fn_ptr: int, block: int, index: int) -> int:
    try:
        from cupy.cuda import driver

        with cupy().cuda.Device(index):  # the function belongs to this device's context
            return max(1, driver.occupancyMaxActiveBlocksPerMultiprocessor(fn_ptr, block, 0))
    except Exception:  # older CuPy without the occupancy API: a safe default
        return 4


def ctas_per_sm(fn, block: int, device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _ctas_per_sm(fn.ptr, block, index)


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A non-blocking copy from pinned memory: never synchronizes."""
    return host.pin_memory().to(device, non_blocking=True)


def record_stream(t: torch.Tensor, device: torch.device) -> None:
    t.record_stream(torch.cuda.current_stream(device))


def int_mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    return torch._int_mm(a, b_t)
