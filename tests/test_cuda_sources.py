"""Every CUDA source compiles under NVRTC (no GPU needed; skipped where CuPy's NVRTC is absent)."""

import pytest

import optim8  # noqa: F401  (imports every kernel module, which registers its sources)
from optim8.kernels import _cupy


def _nvrtc_available() -> bool:
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _nvrtc_available(), reason="needs CuPy with NVRTC (pip install 'optim8[cuda13]')")
@pytest.mark.parametrize("name", sorted(_cupy.SOURCES))
def test_source_compiles(name):
    ptx = _cupy.check_compiles(name)
    for expr in _cupy.SOURCES[name]:
        kernel = expr.split("<")[0]
        assert kernel in ptx
    # Kernels compute their references' bits: no multiply-add contracted by the compiler
    # (--fmad=false). Only the decode GEMV, whose reference is a matmul summing in another
    # order, asks for FMAs explicitly.
    for entry in ptx.split(".entry")[1:]:
        name = entry.split("(")[0]
        assert "fma." not in entry or "gemv" in name, name


def test_every_cu_file_is_registered():
    on_disk = {p.name for p in _cupy.CUDA_DIR.glob("*.cu")}
    assert on_disk <= set(_cupy.SOURCES), f"unregistered: {on_disk - set(_cupy.SOURCES)}"
