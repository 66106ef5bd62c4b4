"""Adam and AdamW with 8-bit (blockwise-quantized) or 32-bit state.

Algorithm (per element, ``t`` the parameter's step count; the exact fp32 operation
order is in ``optim8.kernels.adam``)::

    g  = g + weight_decay * p                     # Adam only (L2 penalty)
    m  = beta1 * m + (1 - beta1) * g
    v  = beta2 * v + (1 - beta2) * g**2
    p  = p * (1 - lr * weight_decay)              # AdamW only (decoupled weight decay)
    p  = p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

8-bit state: ``m`` and ``v`` are stored blockwise (one fp32 absmax per ``blocksize``
elements, a signed / unsigned 256-entry dynamic map), dequantized before the update and
requantized with the new block absmax after it, in the same pass. Two rules of the quantizer
(``optim8.kernels.blockwise``) keep that state bounded and exact:

* a positive second moment never encodes to zero: it takes at least the unsigned map's
  smallest positive entry (3.25e-7 of its block's absmax), so the denominator
  ``sqrt(v) + eps`` is never smaller than the exact one's rounding allows. Without it an
  element whose ``v`` rounded to zero under a first moment with a non-zero code stepped by
  ``lr * m / eps``: with gradient scales spanning 1e-4..1 inside a block (outlier feature
  columns), parameters reached 14 where torch's AdamW moves 0.001 per step. With it the
  largest single-element step there stays within 1.3-2.1x torch AdamW's (s = 1e-2..1e-4,
  blocksizes 64-256; tests/test_state_numerics.py asserts <= 3x).
* the first moment's absmax is the block's extreme value with its sign, so requantizing
  dequantized state gives the same bytes (the signed map has +1 but not -1): a step whose
  gradients are all non-finite leaves the state byte-identical, and no block shrinks by
  0.7% on each ordinary step.

Parameters with fewer
than ``min_8bit_size`` elements, or marked with :func:`optim8.set_optim_bits`, keep fp32
state. fp16/bf16 parameters are updated in fp32 and rounded once (to nearest even).

Non-finite gradients: an element whose gradient is NaN or infinite (or whose squared
gradient overflows) is skipped, its parameter and moments left as they were; the other
elements of the tensor, and their 8-bit blocks, are updated normally. (With fp16 mixed
precision, ``torch.amp.GradScaler`` skips the whole step before this matters.)

``maximize=True`` negates the gradients in place for the step and back after it (an exact sign
flip, so the step is the one on ``-g``; no copy of the gradients is made).

Not supported (clear errors): sparse gradients, ``amsgrad=True``, ``eps=0`` with 8-bit state
(torch accepts it; an 8-bit second moment can round to zero under a non-zero first moment, and
the step would be infinite; 32-bit state takes ``eps=0`` as torch does). A tensor ``lr`` is
accepted but read with ``float()`` every step (a host sync if it lives on a GPU; the Adam
kernel takes its scalars by value): pass a Python float to keep ``step()`` free of
synchronization. (The optimizers of :mod:`optim8.optimizers` read a GPU ``lr`` on the GPU.)
"""

from __future__ import annotations

import math

import torch

from .kernels.adam import adam_scalars, adam_step
from .optimizer import Optimizer8bit
from .state import StateSlot

__all__ = ["Adam8bit", "AdamW8bit", "Adam32bit", "AdamW32bit"]

_EPS_ZERO_8BIT = (
    "eps=0 is not supported with 8-bit state: a second moment that rounds to zero in 8 bits while its first "
    "moment does not makes the step m / 0, infinite. Use eps > 0 (torch's default is 1e-8) or optim_bits=32"
)


class Adam8bit(Optimizer8bit):
    """Adam with 8-bit state; a drop-in for ``torch.optim.Adam`` (see the module docstring).

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer.
        lr, betas, eps, weight_decay: as in ``torch.optim.Adam``.
        amsgrad: must be False (8-bit AMSGrad is not implemented).
        maximize: ascend instead of descend.
        optim_bits: 8 (default) or 32 (the same optimizer with fp32 state).
        min_8bit_size: parameters with fewer elements keep fp32 state (default 4096).
        blocksize: elements per absmax block of the 8-bit state: 64, 128 or 256 (default).
        embedding_bits: 32 (default): ``nn.Embedding`` weights keep fp32 state; None: they follow ``optim_bits``.
        foreach, fused: None or True (what optim8 does); capturable, differentiable: False.
    """

    decoupled_weight_decay = False
    state_slots = (StateSlot("exp_avg", True), StateSlot("exp_avg_sq", False))
    torch_counterpart = torch.optim.Adam

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        optim_bits: int = 8,
        min_8bit_size: int = 4096,
        blocksize: int = 256,
        embedding_bits: int | None = 32,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ):
        if amsgrad:
            raise ValueError(f"{type(self).__name__} does not implement amsgrad=True; use torch.optim.AdamW(amsgrad=True)")
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps, weight_decay=weight_decay)
        super().__init__(
            params, defaults, optim_bits=optim_bits, min_8bit_size=min_8bit_size, blocksize=blocksize,
            embedding_bits=embedding_bits, maximize=maximize, foreach=foreach, fused=fused, capturable=capturable,
            differentiable=differentiable,
        )

    def _check_hyperparameters(self, group: dict) -> None:
        lr, betas, eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got {lr.numel()} elements")
        if not 0.0 <= float(lr) < math.inf:
            raise ValueError(f"Invalid learning rate: {float(lr)} (must be >= 0 and finite)")
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        if isinstance(betas[0], torch.Tensor) != isinstance(betas[1], torch.Tensor):
            raise ValueError(f"betas must be either both floats or both Tensors, got {betas!r}")
        for i, beta in enumerate(betas):
            if isinstance(beta, torch.Tensor) and beta.numel() != 1:
                raise ValueError(f"Tensor beta at index {i} must be 1-element, got {beta.numel()} elements")
            if not 0.0 <= float(beta) < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {float(beta)} (must be in [0, 1))")
        if not 0.0 <= eps < math.inf:
            raise ValueError(f"Invalid epsilon value: {eps} (must be >= 0 and finite)")
        if eps == 0 and group.get("optim_bits") == 8:
            raise ValueError(_EPS_ZERO_8BIT)
        if not 0.0 <= wd < math.inf:
            raise ValueError(f"Invalid weight_decay value: {wd} (must be >= 0 and finite)")

    def _check_step(self, group: dict, params: list) -> None:
        # eps=0 in a 32-bit group is torch's behaviour, except for parameters set_optim_bits made 8-bit
        if group["eps"] == 0 and any("exp_avg_absmax" in self.state.get(p, ()) or self._wants_8bit(p, group) for p in params):
            raise ValueError(_EPS_ZERO_8BIT)

    def _update_batch(self, group: dict, batch: list, *, state8: bool, step: int) -> None:
        beta1, beta2 = (float(beta) for beta in group["betas"])
        scalars = adam_scalars(
            lr=float(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            step=step,
            decoupled=self.decoupled_weight_decay,
        )
        states = [s for _, _, s in batch]
        grads = [g for _, g, _ in batch]
        if group["maximize"]:
            torch._foreach_neg_(grads)  # exact; undone below, so the caller's gradients are unchanged
        try:
            adam_step(
                [p for p, _, _ in batch],
                grads,
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [s["exp_avg_absmax"] for s in states] if state8 else None,
                [s["exp_avg_sq_absmax"] for s in states] if state8 else None,
                scalars=scalars,
                blocksize=group["blocksize"],
            )
        finally:
            if group["maximize"]:
                torch._foreach_neg_(grads)


class AdamW8bit(Adam8bit):
    """AdamW (decoupled weight decay) with 8-bit state; a drop-in for ``torch.optim.AdamW``.

    Same arguments as :class:`Adam8bit`; ``weight_decay`` defaults to 1e-2 like torch's.
    """

    decoupled_weight_decay = True
    torch_counterpart = torch.optim.AdamW

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        optim_bits: int = 8,
        min_8bit_size: int = 4096,
        blocksize: int = 256,
        embedding_bits: int | None = 32,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ):
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, optim_bits=optim_bits,
            min_8bit_size=min_8bit_size, blocksize=blocksize, embedding_bits=embedding_bits, foreach=foreach,
            fused=fused, capturable=capturable, differentiable=differentiable,
        )


class Adam32bit(Adam8bit):
    """:class:`Adam8bit` with ``optim_bits=32``: fp32 state, same code path (and CUDA kernel)."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        optim_bits: int = 32,
        min_8bit_size: int = 4096,
        blocksize: int = 256,
        embedding_bits: int | None = 32,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ):
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, optim_bits=optim_bits,
            min_8bit_size=min_8bit_size, blocksize=blocksize, embedding_bits=embedding_bits, foreach=foreach,
            fused=fused, capturable=capturable, differentiable=differentiable,
        )


class AdamW32bit(AdamW8bit):
    """:class:`AdamW8bit` with ``optim_bits=32``: fp32 state, same code path (and CUDA kernel)."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        optim_bits: int = 32,
        min_8bit_size: int = 4096,
        blocksize: int = 256,
        embedding_bits: int | None = 32,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ):
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, optim_bits=optim_bits,
            min_8bit_size=min_8bit_size, blocksize=blocksize, embedding_bits=embedding_bits, foreach=foreach,
            fused=fused, capturable=capturable, differentiable=differentiable,
        )
