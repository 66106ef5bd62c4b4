"""optim8: 8-bit optimizers and LLM.int8() layers for PyTorch."""

from . import kernels, layers
from .adam import Adam8bit, Adam32bit, AdamW8bit, AdamW32bit
from .optimizer import Optimizer8bit, set_optim_bits, to_torch_state_dict
from .optimizers import (
    AdEMAMix8bit, AdEMAMix32bit, Adagrad8bit, Adagrad32bit, Lion8bit, Lion32bit, RMSprop8bit, RMSprop32bit, SGD8bit,
    SGD32bit,
)
from .state import install_embedding_hook as _install_embedding_hook, mark_embeddings
from .layers import Linear4bit, Linear8bitLt, quantize_model

__version__ = "0.1.0"

__all__ = ["kernels", "layers", "__version__"]
__all__ += ["Adam8bit", "AdamW8bit", "Adam32bit", "AdamW32bit", "Optimizer8bit", "set_optim_bits", "to_torch_state_dict"]
__all__ += [
    "Lion8bit", "Lion32bit", "SGD8bit", "SGD32bit", "RMSprop8bit", "RMSprop32bit", "Adagrad8bit", "Adagrad32bit",
    "AdEMAMix8bit", "AdEMAMix32bit", "mark_embeddings",
]
__all__ += ["Linear8bitLt", "Linear4bit", "quantize_model"]
from . import distributed  # noqa: E402  (DTensor/FSDP2 helpers; never imports torch.distributed.tensor)

__all__ += ["distributed"]

# nn.Embedding weights registered from now on are marked, so optimizers with embedding_bits=32 (the
# default) give them fp32 state whoever builds the optimizer (transformers' Trainer included)
_install_embedding_hook()

# Hugging Face: prepare_for_lora is plain PyTorch; Int8Config needs transformers and is imported on
# first access. Registration with transformers and peft happens when they are imported (never here).
from .integrations import install as _install_hf_integration, prepare_for_lora  # noqa: E402

_install_hf_integration()
__all__ += ["Int8Config", "Int4Config", "from_bitsandbytes", "prepare_for_lora"]


def __getattr__(name):
    if name == "Int8Config":
        try:
            from .integrations.transformers import Int8Config
        except ImportError as error:
            raise ImportError(f"optim8.Int8Config needs transformers 5.x: pip install 'optim8[hf]' ({error})") from error
        return Int8Config
    if name in ("Int4Config", "from_bitsandbytes"):
        try:
            from .integrations import bnb
        except ImportError as error:
            raise ImportError(f"optim8.{name} needs transformers 5.x: pip install 'optim8[hf]' ({error})") from error
        return getattr(bnb, name)
    raise AttributeError(f"module 'optim8' has no attribute {name!r}")
