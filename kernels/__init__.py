"""optim8's numeric kernels.

Every kernel exists twice: a CUDA C++ source under ``cuda/`` (compiled by NVRTC and
launched through CuPy on PyTorch's current stream) and a pure-PyTorch reference of
the same function, which runs on the CPU and is the oracle in the tests. Dispatch is
by device through ``torch.library`` custom ops; callers only ever see torch tensors.
CuPy is imported the first time a CUDA tensor reaches a kernel.
"""

from .adam import adam_step, adam_update_reference
from .blockwise import BLOCKSIZES, DEFAULT_BLOCKSIZE, dequantize_blockwise, quantize_blockwise
from .quant_map import dynamic_map
from .int8 import dequantize_rowwise, int8_linear, quantize_activations, quantize_rowwise

__all__ = [
    "BLOCKSIZES",
    "adam_step",
    "adam_update_reference",
    "DEFAULT_BLOCKSIZE",
    "dequantize_blockwise",
    "dynamic_map",
    "dequantize_rowwise",
    "int8_linear",
    "quantize_activations",
    "quantize_rowwise",
    "quantize_blockwise",
]
