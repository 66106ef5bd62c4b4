"""Every CUDA source compiles under NVRTC with the production options (no GPU needed).

Skipped where no NVRTC library is found (``pip install 'nvidia-cuda-nvrtc>=13,<14'``, part of the
``dev`` extra on Linux).
"""

import re

import pytest

import optim8  # noqa: F401  (imports every kernel module, which registers its sources)
from optim8.kernels import _cupy, _launch, _nvrtc

needs_nvrtc = pytest.mark.skipif(not _nvrtc.available(), reason="needs NVRTC: pip install 'nvidia-cuda-nvrtc>=13,<14'")


@needs_nvrtc
@pytest.mark.parametrize("name", sorted(_launch.SOURCES))
def test_source_compiles_without_ftz(name, tmp_path, monkeypatch):
    """What production compiles: the options in force, every kernel present, no flush-to-zero."""
    monkeypatch.setenv("OPTIM8_CACHE_DIR", str(tmp_path))
    result = _cupy.compiled(name, _launch.SOURCES[name], "compute_90")  # the backend's own compile step
    assert result.options == (*_launch.NVRTC_OPTIONS, "-arch=compute_90")
    assert not any("ftz" in o for o in result.options), result.options
    ptx = result.binary.decode()
    # CuPy's RawModule would append -ftz=true: FMUL.FTZ, rcp.approx.ftz and setp.*.ftz everywhere.
    assert ".ftz" not in ptx, re.findall(r"\S*\.ftz\S*", ptx)[:5]
    for expr in _launch.SOURCES[name]:
        assert result.lowered[expr] in ptx, expr
    # Kernels compute their references' bits: no multiply-add contracted by the compiler
    # (--fmad=false). Only the decode GEMV, whose reference is a matmul summing in another
    # order, asks for FMAs explicitly.
    for entry in ptx.split(".entry")[1:]:
        kname = entry.split("(")[0]
        assert "fma." not in entry or "gemv" in kname, kname
    # the disk cache gives the same module back
    again = _cupy.compiled(name, _launch.SOURCES[name], "compute_90")
    assert again.binary == result.binary and again.lowered == result.lowered


@needs_nvrtc
def test_cubin_for_the_gpu_architecture():
    result = _nvrtc.compile(_launch.source("blockwise.cu"), "blockwise.cu", _launch.SOURCES["blockwise.cu"], "sm_90")
    assert result.kind == "cubin" and result.binary[:4] == b"\x7fELF"


def test_every_cu_file_is_registered():
    on_disk = {p.name for p in _launch.CUDA_DIR.glob("*.cu")}
    assert on_disk <= set(_launch.SOURCES), f"unregistered: {on_disk - set(_launch.SOURCES)}"
