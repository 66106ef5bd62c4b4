"""NVRTC through its C API (ctypes): the compile step of the CUDA backend, with no GPU needed.

optim8 drives NVRTC itself rather than through ``cupy.RawModule`` because CuPy appends
``-ftz=true`` to every compile it does (``cupy/cuda/compiler.py``), after the caller's
options, and flush-to-zero changes the kernels' results for subnormal values (a block of
subnormals gets the wrong absmax, a block above 2**126 flushes its reciprocal to zero, bf16
and Adam state lose their subnormals). Here the options are exactly
``_launch.NVRTC_OPTIONS`` plus the target architecture: :func:`compile` is the production
compile, and the CPU tests call it to check what production builds (no ``.ftz`` in the PTX).

The library is found, in order: ``$OPTIM8_NVRTC`` (a path), an ``libnvrtc`` already loaded in
this process (CuPy loads one), the ``nvidia-cuda-nvrtc`` wheels (``nvidia/cu13/lib``,
``nvidia/cuda_nvrtc/lib``), ``$CUDA_HOME`` / ``$CUDA_PATH`` / ``/usr/local/cuda``, and the
dynamic linker's search path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import os
import sys
from dataclasses import dataclass

from . import _launch


@dataclass(frozen=True)
class Compiled:
    binary: bytes  # a cubin (arch "sm_XY") or NUL-free PTX text as bytes (arch "compute_XY")
    kind: str  # "cubin" or "ptx"
    lowered: dict  # name expression -> mangled symbol
    options: tuple  # every option passed to nvrtcCompileProgram
    log: str


def _candidates() -> list[str]:
    found = []
    if os.environ.get("OPTIM8_NVRTC"):
        found.append(os.environ["OPTIM8_NVRTC"])
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "libnvrtc.so" in path and "builtins" not in path and path not in found:
                    found.append(path)
    except OSError:
        pass
    for entry in sys.path:
        for sub in ("nvidia/cu13/lib", "nvidia/cu12/lib", "nvidia/cuda_nvrtc/lib"):
            found += sorted(glob.glob(os.path.join(entry, sub, "libnvrtc.so*")), reverse=True)
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            found += sorted(glob.glob(os.path.join(os.environ[env], "lib*", "libnvrtc.so*")), reverse=True)
    found += sorted(glob.glob("/usr/local/cuda*/lib*/libnvrtc.so*"), reverse=True)
    name = ctypes.util.find_library("nvrtc")
    if name:
        found.append(name)
    return [p for p in found if "builtins" not in os.path.basename(p) and "alt" not in os.path.basename(p)]


@functools.cache
def library() -> ctypes.CDLL:
    """The NVRTC shared library; ``RuntimeError`` naming what to install when none is found."""
    errors = []
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
            lib.nvrtcVersion  # noqa: B018 - a real NVRTC
        except (OSError, AttributeError) as exc:
            errors.append(f"{path}: {exc}")
            continue
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        lib.nvrtcGetLoweredName.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p)]
        return lib
    raise RuntimeError(
        "NVRTC (libnvrtc.so) was not found; install the NVRTC of your CUDA major version, e.g. "
        "pip install 'nvidia-cuda-nvrtc>=13,<14' (CuPy's CUDA 13 wheel brings it), or set "
        "OPTIM8_NVRTC to its path." + (" Tried: " + "; ".join(errors) if errors else "")
    )


def available() -> bool:
    try:
        library()
    except RuntimeError:
        return False
    return True


def version() -> tuple[int, int]:
    lib = library()
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(lib, lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)))
    return major.value, minor.value


def supported_archs() -> list[int]:
    lib = library()
    n = ctypes.c_int()
    if not hasattr(lib, "nvrtcGetNumSupportedArchs"):
        return []
    _check(lib, lib.nvrtcGetNumSupportedArchs(ctypes.byref(n)))
    archs = (ctypes.c_int * n.value)()
    _check(lib, lib.nvrtcGetSupportedArchs(archs))
    return list(archs)


def _check(lib, status: int, prog=None) -> None:
    if status != 0:
        msg = lib.nvrtcGetErrorString(status).decode()
        log = _log(lib, prog) if prog is not None else ""
        raise RuntimeError(f"NVRTC error {status} ({msg})" + (f":\n{log}" if log else ""))


def _log(lib, prog) -> str:
    size = ctypes.c_size_t()
    if lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)) != 0 or size.value <= 1:
        return ""
    buf = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, buf)
    return buf.value.decode(errors="replace")


def options_for(arch: str) -> tuple[str, ...]:
    """Every option of a production compile for ``arch`` (``sm_90`` gives a cubin, ``compute_90`` PTX)."""
    return (*_launch.NVRTC_OPTIONS, f"-arch={arch}")


def compile(source: str, name: str, name_expressions: tuple[str, ...], arch: str) -> Compiled:
    """Compile ``source`` for ``arch`` with the production options; ``RuntimeError`` with the log on failure."""
    lib = library()
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None))
    try:
        for expr in name_expressions:
            _check(lib, lib.nvrtcAddNameExpression(prog, expr.encode()))
        opts = options_for(arch)
        argv = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        status = lib.nvrtcCompileProgram(prog, len(opts), argv)
        if status != 0:
            raise RuntimeError(f"{name} failed to compile for {arch} ({' '.join(opts)}):\n{_log(lib, prog)}")
        lowered = {}
        for expr in name_expressions:
            out = ctypes.c_char_p()
            _check(lib, lib.nvrtcGetLoweredName(prog, expr.encode(), ctypes.byref(out)))
            lowered[expr] = out.value.decode()
        size = ctypes.c_size_t()
        if arch.startswith("sm_"):
            kind, get_size, get = "cubin", lib.nvrtcGetCUBINSize, lib.nvrtcGetCUBIN
        else:
            kind, get_size, get = "ptx", lib.nvrtcGetPTXSize, lib.nvrtcGetPTX
        _check(lib, get_size(prog, ctypes.byref(size)))
        buf = ctypes.create_string_buffer(size.value)
        _check(lib, get(prog, buf))
        binary = buf.raw[: size.value]
        if kind == "ptx":
            binary = binary.rstrip(b"\0")
        return Compiled(binary, kind, lowered, opts, _log(lib, prog))
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
