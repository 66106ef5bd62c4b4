"""``StableEmbedding``: an embedding meant for training with 8-bit optimizers.

Embedding rows get sparse, rare, very unevenly sized gradients: exactly the statistics
that blockwise 8-bit state represents worst (a rare token's small moments share a block
absmax with frequent tokens' large ones and round to zero). Following Dettmers et al.,
"8-bit Optimizers via Block-wise Quantization" (2022), the stable embedding

* is initialized with Xavier-uniform (instead of N(0, 1)),
* applies a LayerNorm to its output (computed in fp32, returned in the weight's dtype),
* marks its weight for 32-bit optimizer state (:func:`optim8.set_optim_bits`), so
  ``AdamW8bit(model.parameters())`` keeps fp32 moments for it automatically.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["StableEmbedding"]


def _mark_32bit(param: torch.Tensor) -> None:
    from optim8.optimizer import set_optim_bits  # optim8.optimizer imports the kernels; keep layers light

    set_optim_bits(param, 32)


class StableEmbedding(nn.Embedding):
    """``nn.Embedding`` + LayerNorm, Xavier-uniform init, 32-bit optimizer state for the weight.

    Arguments are ``nn.Embedding``'s (``sparse=True`` is refused: optim8's optimizers take
    dense gradients). The LayerNorm's parameters are ``self.norm.weight`` / ``.bias``.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        _weight: torch.Tensor | None = None,
        device=None,
        dtype=None,
    ):
        if sparse:
            raise ValueError("StableEmbedding does not support sparse=True: optim8's optimizers need dense gradients")
        super().__init__(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq, False, _weight, device=device, dtype=dtype)
        self.norm = nn.LayerNorm(embedding_dim, device=device, dtype=dtype)
        _mark_32bit(self.weight)
        # load_state_dict(assign=True) or a weight swap replaces the Parameter object: re-mark it.
        self.register_load_state_dict_post_hook(lambda module, _keys: _mark_32bit(module.weight))

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)
        self._fill_padding_idx_with_zero()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        emb = F.embedding(input, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, False)
        # the norm in fp32 (fp16/bf16 variance of wide rows is imprecise), output in the weight's dtype
        out = F.layer_norm(emb.float(), self.norm.normalized_shape, self.norm.weight.float(), self.norm.bias.float(), self.norm.eps)
        return out.to(self.weight.dtype)
