"""optim8: 8-bit optimizers and LLM.int8() layers for PyTorch."""

from . import kernels, layers

__version__ = "0.1.0"

__all__ = ["kernels", "layers", "__version__"]
