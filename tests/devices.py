"""Where the ``cuda`` tests run: a real GPU with CuPy, or the host device on a CPU machine.

A ``cuda`` test writes its kernel-side tensors on ``DEV`` and computes its CPU references
inside ``with reference():``::

    from devices import DEV, reference

    @pytest.mark.cuda
    def test_kernel_matches_reference():
        x = torch.randn(4097)
        with reference():
            expected = quantize_blockwise(x)          # the PyTorch reference, on the CPU
        got = quantize_blockwise(x.to(DEV))           # the CUDA kernel (GPU or host device)

On a GPU, ``DEV`` is ``"cuda"`` and ``reference()`` does nothing (CPU tensors take the reference
anyway). On the host device (no GPU; a C++ compiler), ``DEV`` is ``"cpu"``: while a ``cuda``
test runs, CPU tensors reaching optim8's kernels run the CUDA sources compiled for the CPU,
and ``reference()`` switches that off for its body. Move tensors with ``.to(DEV)`` (never
``.cuda()``) and compare results after ``.cpu()``.

Tests that need real GPU hardware (streams, CUDA graphs, memory statistics, several devices,
timing) are marked ``gpu`` as well: they run on a GPU and skip on the host device.
"""

from __future__ import annotations

import contextlib

import torch


def _gpu() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


GPU = _gpu()
HOST = not GPU
DEV = "cuda" if GPU else "cpu"


@contextlib.contextmanager
def reference():
    """Inside: CPU tensors take optim8's PyTorch references (a no-op on a real GPU)."""
    if GPU:
        yield
        return
    from optim8.kernels import hostdev

    with hostdev.suspended():
        yield
