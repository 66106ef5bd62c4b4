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
    # Hugging Face's ``kernels`` package (``import transformers`` does; transformers >= 5.25
    # depends on it). Running the submodules again under that second name would re-define the
    # ``optim8::`` torch.library ops, which frees the first definitions while callers still hold
    # them: later calls crash or corrupt the heap. So this module steps aside: where Hugging
    # Face's ``kernels`` is installed it is loaded in this module's place (the import system
    # returns what ``sys.modules`` holds after this module ran), otherwise this module stays
    # empty and transformers reports its ``kernels`` as unavailable.
    # optim8's kernels are ``optim8.kernels``.
    def _step_aside() -> None:
        import importlib.machinery
        import importlib.util
        import os
        import sys

        checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        others = [p for p in sys.path if os.path.abspath(p or os.curdir) != checkout]
        spec = importlib.machinery.PathFinder.find_spec(__name__, others)
        if spec is None or spec.loader is None:
            return
        stub, module = sys.modules[__name__], importlib.util.module_from_spec(spec)
        sys.modules[__name__] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules[__name__] = stub  # a broken install: keep the empty stub, as without one
            raise

    __all__ = []
    _step_aside()
