"""The host device: optim8's CUDA kernels compiled for the CPU and run on CPU tensors (test infrastructure).

No GPU has to be present for the CUDA path to be checked. Each ``kernels/cuda/<file>.cu`` is
compiled by the system C++ compiler after ``kernels/host/cuda_host.h`` (the CUDA subset the
kernels use: thread indices, ``__shared__``, ``__syncthreads``, the ``__shfl_*_sync`` family,
the ``__f*_rn`` intrinsics, vector types), together with a launch table of every registered
instantiation, into a shared library loaded with ctypes. A launch runs the grid's CTAs on a
pool of worker threads, every CUDA lane of a CTA its own fiber: barriers and shuffles really
wait for the lanes they name, lanes run in a seeded random order between synchronization
points, and a launch in which no lane can make progress (a shuffle waiting on an exited lane,
lanes at different barriers) raises ``RuntimeError`` instead of hanging.

The kernel wrappers do not change: they call ``_launch.function`` / ``_launch.launch`` as on a
GPU. While :func:`active` is in force, ``_launch`` routes CPU tensors to this backend: the
``torch.library`` ops of optim8 run their CUDA implementation for CPU tensors and
``_launch.kernel_device(cpu)`` is true. :func:`suspended` switches that off for a block (the
tests compute their references there).

``import optim8`` never imports this module. Compiled libraries are cached under
``$OPTIM8_HOST_CACHE`` (default ``~/.cache/optim8/host``), keyed by the translation unit, the
flags and the compiler's version. ``build(name, sanitize=True)`` makes an AddressSanitizer +
alignment-checking build, loadable only in a process started with libasan preloaded
(:func:`asan_env`); the tests run one such process.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import itertools
import os
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from . import _launch
from ._cpu import compiler  # the system C++ compiler ($CXX, else g++, c++ or clang++)

HEADER = Path(__file__).resolve().parent / "host" / "cuda_host.h"
FLAGS = (
    "-std=c++17",
    "-O2",
    "-fPIC",
    "-shared",
    "-pthread",
    "-ffp-contract=off",  # no fused multiply-add the reference does not do (the GPU's --fmad=false)
    "-fno-strict-aliasing",  # the kernels reinterpret_cast between float and uint4 pointers
    "-fno-fast-math",
    "-Wno-unknown-pragmas",  # #pragma unroll
)
SANITIZE_FLAGS = ("-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address", "-fsanitize=alignment", "-fno-sanitize-recover=all")
SM_COUNT = 8  # small, so that grid-stride loops stride on test-sized inputs
CTAS_PER_SM = 2


def unavailable_reason() -> str | None:
    """Why the host device cannot run here, or None when it can."""
    if compiler() is None:
        return "the host device needs a C++17 compiler (g++ or clang++; set CXX) and none was found"
    if os.name != "posix":
        return "the host device runs on Linux/macOS (ucontext fibers)"
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("OPTIM8_HOST_CACHE") or Path.home() / ".cache" / "optim8" / "host")


@functools.cache
def _compiler_version() -> str:
    return subprocess.run([compiler(), "--version"], capture_output=True, text=True).stdout


def translation_unit(name: str, text: str | None = None, exprs: tuple[str, ...] | None = None) -> str:
    """The C++ source of a host library: header, the kernels (``cuda/<name>`` unless ``text``), launch table."""
    text = _launch.source(name) if text is None else text
    exprs = _launch.SOURCES[name] if exprs is None else exprs
    entries = "\n".join(f"    &::hd::launch_entry<&{e}>," for e in exprs)
    return f"""#include "{HEADER}"
#line 1 "{name}"
{text}
typedef int (*optim8_entry)(const unsigned int*, void**, int, const int*, uint64_t, char*, int);
static const optim8_entry optim8_entries[] = {{
{entries}
}};
extern "C" int optim8_host_kernels() {{ return {len(exprs)}; }}
extern "C" int optim8_host_launch(int k, const unsigned int* dims, void** args, int nargs, const int* sizes,
                                  uint64_t seed, char* err, int errlen) {{
    return optim8_entries[k](dims, args, nargs, sizes, seed, err, errlen);
}}
"""


_build_lock = threading.Lock()


def _flags(sanitize: bool) -> tuple[str, ...]:
    return FLAGS + (SANITIZE_FLAGS if sanitize else ())


def _target(tu: str, sanitize: bool) -> Path:
    key = hashlib.sha256("\0".join([tu, HEADER.read_text(), *_flags(sanitize), _compiler_version()]).encode()).hexdigest()
    return cache_dir() / f"{key[:32]}{'-asan' if sanitize else ''}.so"


def _compile_cmd(src: Path, out: Path, sanitize: bool) -> list[str]:
    return [compiler(), *_flags(sanitize), "-o", str(out), str(src)]


def build_many(names, sanitize: bool = False, sources: dict | None = None) -> dict[str, Path]:
    """Compile (in parallel) the host libraries of ``names`` that are not cached; return their paths.

    ``sources`` maps a name to ``(text, name_expressions)`` for a kernel that is not one of
    optim8's registered files (the tests' deliberately broken kernels).
    """
    sources = sources or {}
    with _build_lock:
        todo, paths = [], {}
        for name in names:
            tu = translation_unit(name, *sources.get(name, (None, None)))
            target = _target(tu, sanitize)
            paths[name] = target
            if not target.exists():
                todo.append((name, tu, target))
        if not todo:
            return paths
        cache_dir().mkdir(parents=True, exist_ok=True)
        procs = []
        with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".build-") as tmp:
            for name, tu, target in todo:
                src = Path(tmp) / (name.replace(".cu", "") + ".cpp")
                src.write_text(tu)
                out = Path(tmp) / target.name
                procs.append((name, target, out, subprocess.Popen(_compile_cmd(src, out, sanitize), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
            errors = []
            for name, target, out, proc in procs:
                log = proc.communicate()[0]
                if proc.returncode != 0:
                    errors.append(f"{name}:\n{log}")
                else:
                    os.replace(out, target)  # atomic: another process sees a whole library or none
        if errors:
            raise RuntimeError("the host device could not compile:\n" + "\n".join(errors))
        return paths


def build(name: str, sanitize: bool = False) -> Path:
    return build_many([name], sanitize)[name]


def load_source(name: str, text: str, exprs: tuple[str, ...], sanitize: bool = False) -> "Library":
    """Compile and load kernels from ``text`` (C++ with CUDA syntax), outside optim8's registry."""
    path = build_many([name], sanitize, {name: (text, tuple(exprs))})[name]
    return Library(name, path, tuple(exprs))


class Library:
    """A loaded host library: its kernels by name expression."""

    def __init__(self, name: str, path: Path, exprs: tuple[str, ...] | None = None):
        self.name = name
        self.lib = ctypes.CDLL(str(path))
        self.lib.optim8_host_launch.restype = ctypes.c_int
        self.lib.optim8_host_launch.argtypes = [
            ctypes.c_int, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
            ctypes.POINTER(ctypes.c_int), ctypes.c_uint64, ctypes.c_char_p, ctypes.c_int,
        ]
        self.index = {e: i for i, e in enumerate(_launch.SOURCES[name] if exprs is None else exprs)}
        assert self.lib.optim8_host_kernels() == len(self.index)


class Function:
    """One kernel instantiation of a host library (what ``_launch.function`` returns here)."""

    def __init__(self, library: Library, kernel: str):
        self.library, self.kernel = library, kernel
        self.index = library.index[kernel]
        self.ptr = 0


_CTYPES = {np.uint64: ctypes.c_uint64, np.int64: ctypes.c_int64, np.int32: ctypes.c_int32, np.float32: ctypes.c_float}


class HostBackend:
    """The launcher interface of ``_launch`` on CPU tensors."""

    def __init__(self, sanitize: bool = False):
        self.sanitize = sanitize
        self._libraries: dict[str, Library] = {}
        self._seed = itertools.count(int(os.environ.get("OPTIM8_HOST_SEED", "0")) * 1_000_003)
        self.launches = 0

    def library(self, name: str) -> Library:
        lib = self._libraries.get(name)
        if lib is None:
            lib = self._libraries[name] = Library(name, build(name, self.sanitize))
        return lib

    def function(self, name, kernel, device, name_expressions=()):
        lib = self.library(name)
        if kernel not in lib.index:
            raise KeyError(f"{kernel} is launched but not registered for {name}")
        return Function(lib, kernel)

    def launch(self, fn: Function, grid, block, args, device, shared_mem=0):
        if shared_mem:
            raise NotImplementedError("the host device has no dynamic shared memory")
        holders = []
        for i, a in enumerate(args):
            ctype = _CTYPES.get(type(a))
            if ctype is None:
                raise TypeError(f"{fn.kernel} argument {i}: {type(a).__name__}; pass numpy.int32/int64/float32/uint64")
            holders.append(ctype(a.item()))
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        dims = (ctypes.c_uint * 6)(*[int(d) for d in grid + block])
        argv = (ctypes.c_void_p * max(1, len(holders)))(*[ctypes.addressof(h) for h in holders])
        sizes = (ctypes.c_int * max(1, len(holders)))(*[ctypes.sizeof(h) for h in holders])
        err = ctypes.create_string_buffer(2048)
        self.launches += 1
        rc = fn.library.lib.optim8_host_launch(fn.index, dims, argv, len(holders), sizes, next(self._seed), err, len(err))
        if rc != 0:
            raise RuntimeError(f"host device: {fn.kernel} <<<{grid}, {block}>>>: {err.value.decode(errors='replace')}")

    def sm_count(self, device) -> int:
        return SM_COUNT

    def ctas_per_sm(self, fn, block, device) -> int:
        return CTAS_PER_SM

    def upload(self, host: torch.Tensor, device) -> torch.Tensor:
        return host.clone()

    def record_stream(self, t, device) -> None:
        pass

    def int_mm(self, a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
        from .int8 import _int_mm_exact

        return _int_mm_exact(a, b_t.t())


_backend: HostBackend | None = None
_routed: set[str] = set()


def _route_ops() -> None:
    """Give every optim8 op with a CUDA kernel a CPU kernel that runs it while the host device is active."""
    for qualname, (op, cuda_fn) in _launch.KERNEL_OPS.items():
        if qualname in _routed:
            continue
        reference = op._init_fn

        def cpu_kernel(*args, _cuda=cuda_fn, _ref=reference, **kwargs):
            if _launch.host_active():
                return _cuda(*args, **kwargs)
            return _ref(*args, **kwargs)

        op.register_kernel("cpu")(cpu_kernel)
        _routed.add(qualname)


def backend() -> HostBackend:
    global _backend
    if _backend is None:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        import optim8  # noqa: F401  (registers every kernel source and op)

        build_many(sorted(_launch.SOURCES))
        _backend = HostBackend(sanitize=os.environ.get("OPTIM8_HOST_SANITIZE") == "1")
    return _backend


@contextlib.contextmanager
def active():
    """Inside: CPU tensors run optim8's CUDA kernels on the host device."""
    be = backend()
    _route_ops()
    previous = _launch._set_host(be)
    try:
        yield be
    finally:
        _launch._set_host(previous)


@contextlib.contextmanager
def suspended():
    """Inside: CPU tensors take the PyTorch references again (no-op when the host device is off)."""
    previous = _launch._set_host(None)
    try:
        yield
    finally:
        _launch._set_host(previous)


def asan_env() -> dict[str, str]:
    """Environment for a Python process that loads sanitized host libraries (libasan preloaded)."""
    lib = subprocess.run([compiler(), "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    env = dict(os.environ)
    env.update(
        LD_PRELOAD=lib,
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1:exitcode=86:allocator_may_return_null=1:detect_stack_use_after_return=0",
        OPTIM8_HOST_SANITIZE="1",
    )
    return env
