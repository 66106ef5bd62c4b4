"""optim8's layers: int8 linear layers and the embedding meant for 8-bit optimizers."""

__all__: list[str] = []

from .linear8bit import Linear8bitLt, quantize_model  # noqa: E402

__all__ += ["Linear8bitLt", "quantize_model"]

from .linear4bit import Linear4bit  # noqa: E402

__all__ += ["Linear4bit"]

from .embedding import StableEmbedding  # noqa: E402

__all__ += ["StableEmbedding"]
