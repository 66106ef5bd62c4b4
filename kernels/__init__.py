"""optim8's numeric kernels.

Every kernel exists twice: a CUDA C++ source under ``cuda/`` (compiled by NVRTC and
launched through CuPy on PyTorch's current stream) and a pure-PyTorch reference of
the same function, which runs on the CPU and is the oracle in the tests. Dispatch is
by device through ``torch.library`` custom ops; callers only ever see torch tensors.
CuPy is imported the first time a CUDA tensor reaches a kernel.
"""

if __name__ == "optim8.kernels":
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
else:
    # This directory was found as a top-level ``kernels``: the root of an optim8 checkout is on
    # sys.path (``python -m pytest`` or a Python shell started there) and something looked for
    # Hugging Face's ``kernels`` package (``import transformers`` does). Running the submodules
    # again under that second name would re-define the ``optim8::`` torch.library ops, which frees
    # the first definitions while callers still hold them: later calls crash or corrupt the heap.
    # So this module stays empty (transformers then reports its ``kernels`` as unavailable).
    # optim8's kernels are ``optim8.kernels``.
    __all__ = []
