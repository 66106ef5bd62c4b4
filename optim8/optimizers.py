"""Lion, SGD (momentum), RMSprop, Adagrad and AdEMAMix with 8-bit (blockwise-quantized) or 32-bit state.

Each optimizer is an update rule of ``optim8.kernels.update`` (its per-element fp32 math,
written once in PyTorch, and the same math as the CUDA kernel's template parameter) and a
subclass of :class:`RuleOptimizer` that overrides one hook, :meth:`RuleOptimizer._scalars`:
the step's scalars, computed in float64 and rounded to fp32 once. State, 8-bit quantization,
state dicts, all-or-nothing steps and the torch.optim keywords are the base class's
(:class:`optim8.Optimizer8bit`).

Per element (``g`` the gradient, negated first with ``maximize=True``; ``t`` the step, 1-based):

* Lion (Chen et al. 2023; bitsandbytes' order, decoupled weight decay)::

      u = sign(beta1 * m + (1 - beta1) * g);  p = p * (1 - lr * wd) - lr * u;  m = beta2 * m + (1 - beta2) * g

* SGD (``torch.optim.SGD``)::

      g = g + wd * p;  buf = momentum * buf + (1 - dampening) * g   (t = 1: buf = g)
      d = g + momentum * buf if nesterov else buf;  p = p - lr * d

* RMSprop (``torch.optim.RMSprop``, ``centered=False``)::

      g = g + wd * p;  sq = alpha * sq + (1 - alpha) * g * g;  p = p - lr * g / (sqrt(sq) + eps)
      momentum > 0:    buf = momentum * buf + g / (sqrt(sq) + eps);  p = p - lr * buf

  ``centered=True`` is refused: its variance ``sq - grad_avg**2`` is the difference of two
  separately quantized 8-bit states, which cancels to zero or below wherever the gradient is
  steady (a denominator of ``eps``, or a NaN), so optim8 does not offer it.

* Adagrad (``torch.optim.Adagrad``)::

      g = g + wd * p;  sum = sum + g * g;  p = p - lr / (1 + (t - 1) * lr_decay) * g / (sqrt(sum) + eps)

* AdEMAMix (Pagliardini et al. 2024; bitsandbytes' ``AdEMAMix``)::

      m1 = beta1 * m1 + (1 - beta1) * g;  m2 = beta3_t * m2 + (1 - beta3_t) * g;  nu = beta2 * nu + (1 - beta2) * g * g
      p = p * (1 - lr * wd) - lr * (m1 / (1 - beta1**t) + alpha_t * m2) / (sqrt(nu) / sqrt(1 - beta2**t) + eps)

  with the paper's warm-ups: ``alpha_t = min(t * alpha / t_alpha, alpha)`` and
  ``beta3_t = min(exp(ln(beta1) ln(beta3) / ((1 - t / t_beta3) ln(beta3) + (t / t_beta3) ln(beta1))), beta3)``
  (each only when ``t_alpha`` / ``t_beta3`` is given).

8-bit state: momenta (Lion's ``exp_avg``, SGD's ``momentum_buffer``, AdEMAMix's ``exp_avg`` and
``exp_avg_slow``) use the signed dynamic map, non-negative state (RMSprop's ``square_avg``,
Adagrad's ``sum``, AdEMAMix's ``exp_avg_sq``) the unsigned one. State names are torch.optim's
where torch has the optimizer, so its 32-bit state dicts load into torch's optimizer and back.

A tensor ``lr`` on the GPU is never read by the host: the step's scalars that involve it are
computed on the device. (Its value is then not checked for being >= 0 either.)
"""

from __future__ import annotations

import math

import torch

from .kernels import _launch, update as _update
from .optimizer import Optimizer8bit
from .state import StateSlot

__all__ = [
    "RuleOptimizer", "Lion8bit", "Lion32bit", "SGD8bit", "SGD32bit", "RMSprop8bit", "RMSprop32bit",
    "Adagrad8bit", "Adagrad32bit", "AdEMAMix8bit", "AdEMAMix32bit",
]


def _check_lr(lr) -> None:
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"Tensor lr must be a 1-element float tensor, got {lr.numel()} elements of {lr.dtype}")
        if lr.device.type != "cpu":
            return  # reading a GPU tensor would synchronize with the device on every step
        lr = float(lr)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0.0 <= lr < math.inf:
        raise ValueError(f"Invalid learning rate: {lr!r} (must be >= 0 and finite)")


def _check_range(name: str, value, lo: float, hi: float, *, hi_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value and (value < hi if hi_open else value <= hi)
    if not ok:
        bound = f"[{lo}, {hi})" if hi_open else f"[{lo}, {hi}]"
        raise ValueError(f"Invalid {name}: {value!r} (must be in {bound})")


def _check_betas(betas, count: int) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != count:
        raise ValueError(f"betas must be a tuple of {count} floats, got {betas!r}")
    for i, beta in enumerate(betas):
        _check_range(f"beta parameter at index {i}", float(beta) if isinstance(beta, torch.Tensor) else beta, 0.0, 1.0, hi_open=True)


class RuleOptimizer(Optimizer8bit):
    """An optimizer made of one update rule of ``optim8.kernels.update`` (see the module docstring).

    Subclasses set :attr:`rule` and :attr:`slot_names` (the state names, one per rule slot) and
    override :meth:`_scalars`; :meth:`_rule` picks among rules when the group decides.
    """

    rule: _update.Rule
    slot_names: tuple[str, ...] = ()
    torch_counterpart = None

    def _rule(self, group: dict) -> _update.Rule:
        return self.rule

    def _state_slots(self, group: dict) -> tuple[StateSlot, ...]:
        rule = self._rule(group)
        return tuple(StateSlot(name, signed) for name, signed in zip(self.slot_names, rule.slots))

    @staticmethod
    def _lr(group: dict, device: torch.device):
        """The group's lr as a Python float, or (a tensor on a GPU) a float64 tensor on ``device``."""
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and _launch.kernel_device(device):
            return lr.detach().to(device=device, dtype=torch.float64, non_blocking=True).reshape(())
        return float(lr)

    def _scalars(self, group: dict, step: int, lr) -> dict:
        """The rule's scalars for a step (``rule.scalars``), float64 (``lr`` may be a float64 tensor)."""
        raise NotImplementedError

    def _update_batch(self, group: dict, batch: list, *, state8: bool, step: int) -> None:
        rule = self._rule(group)
        slots = self._state_slots(group)
        device = batch[0][0].device
        scalars = self._scalars(group, step, self._lr(group, device))
        scalars["gsign"] = -1.0 if group["maximize"] else 1.0
        _update.rule_step(
            rule,
            [p for p, _, _ in batch],
            [g for _, g, _ in batch],
            [[s[slot.name] for slot in slots] for _, _, s in batch],
            [[s[slot.absmax] for slot in slots] for _, _, s in batch] if state8 else None,
            scalars=scalars,
            blocksize=group["blocksize"],
        )


# ---------------------------------------------------------------------------- Lion


class Lion8bit(RuleOptimizer):
    """Lion (sign of an interpolated momentum) with 8-bit state; bitsandbytes' ``Lion8bit`` semantics.

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer.
        lr: learning rate (default 1e-4; Lion wants 3-10x less than AdamW).
        betas: ``(beta1, beta2)``: interpolation for the update's sign, and the momentum's decay.
        weight_decay: decoupled weight decay, ``p *= 1 - lr * weight_decay``.
        maximize: ascend instead of descend.
        optim_bits: 8 (default) or 32 (fp32 state, the same code path).
        min_8bit_size: parameters with fewer elements keep fp32 state (default 4096).
        blocksize: elements per absmax block of 8-bit state: 64, 128 or 256 (default).
        embedding_bits: 32 (default): ``nn.Embedding`` weights keep fp32 state; None: they follow ``optim_bits``.
        foreach, fused: None or True (what optim8 does); capturable, differentiable: False.
    """

    rule = _update.LION
    slot_names = ("exp_avg",)

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
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
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, weight_decay=weight_decay)
        super().__init__(
            params, defaults, optim_bits=optim_bits, min_8bit_size=min_8bit_size, blocksize=blocksize,
            embedding_bits=embedding_bits, maximize=maximize, foreach=foreach, fused=fused, capturable=capturable,
            differentiable=differentiable,
        )

    def _check_hyperparameters(self, group: dict) -> None:
        _check_lr(group["lr"])
        _check_betas(group["betas"], 2)
        _check_range("weight_decay value", group["weight_decay"], 0.0, math.inf, hi_open=True)

    def _scalars(self, group, step, lr):
        beta1, beta2 = (float(b) for b in group["betas"])
        return dict(
            beta1=beta1, one_minus_beta1=1.0 - beta1, beta2=beta2, one_minus_beta2=1.0 - beta2,
            lr=lr, decay=1.0 - lr * group["weight_decay"],
        )


class Lion32bit(Lion8bit):
    """:class:`Lion8bit` with ``optim_bits=32``: fp32 state, same code path (and CUDA kernel)."""

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
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
            params, lr, betas, weight_decay, maximize=maximize, optim_bits=optim_bits, min_8bit_size=min_8bit_size,
            blocksize=blocksize, embedding_bits=embedding_bits, foreach=foreach, fused=fused, capturable=capturable,
            differentiable=differentiable,
        )


# ---------------------------------------------------------------------------- SGD


class SGD8bit(RuleOptimizer):
    """SGD with momentum, the momentum buffer in 8 bits; a drop-in for ``torch.optim.SGD(momentum>0)``.

    Args:
        params: parameters or param groups.
        lr, momentum, dampening, weight_decay, nesterov, maximize: as in ``torch.optim.SGD``
            (8-bit state needs ``momentum > 0``: plain SGD has no state to quantize).
        optim_bits, min_8bit_size, blocksize, embedding_bits, foreach, fused, capturable,
        differentiable: as for :class:`Lion8bit`.
    """

    rule = _update.SGD
    slot_names = ("momentum_buffer",)
    torch_counterpart = torch.optim.SGD
    _step_optional = True

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
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
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
        super().__init__(
            params, defaults, optim_bits=optim_bits, min_8bit_size=min_8bit_size, blocksize=blocksize,
            embedding_bits=embedding_bits, maximize=maximize, foreach=foreach, fused=fused, capturable=capturable,
            differentiable=differentiable,
        )

    def _check_hyperparameters(self, group: dict) -> None:
        _check_lr(group["lr"])
        _check_range("momentum value", group["momentum"], 0.0, math.inf, hi_open=True)
        _check_range("dampening value", group["dampening"], -math.inf, math.inf, hi_open=True)
        _check_range("weight_decay value", group["weight_decay"], 0.0, math.inf, hi_open=True)
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if group.get("optim_bits") == 8 and group["momentum"] == 0:
            raise ValueError(
                f"{type(self).__name__} with momentum=0 has no state to keep in 8 bits; use momentum > 0, "
                "optim_bits=32 (SGD32bit) or torch.optim.SGD"
            )

    def _rule(self, group):
        return _update.SGD if group["momentum"] != 0 else _update.SGD_PLAIN

    def _scalars(self, group, step, lr):
        wd = group["weight_decay"]
        if group["momentum"] == 0:
            return dict(weight_decay=wd, lr=lr)
        momentum, first = group["momentum"], step == 1
        return dict(
            weight_decay=wd,
            momentum=0.0 if first else momentum,
            dampened=1.0 if first else 1.0 - group["dampening"],
            nesterov_g=1.0 if group["nesterov"] else 0.0,
            nesterov_b=momentum if group["nesterov"] else 1.0,
            lr=lr,
        )


class SGD32bit(SGD8bit):
    """:class:`SGD8bit` with ``optim_bits=32`` (and torch's default ``momentum=0``: then no state at all)."""

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
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
            params, lr, momentum, dampening, weight_decay, nesterov, maximize=maximize, optim_bits=optim_bits,
            min_8bit_size=min_8bit_size, blocksize=blocksize, embedding_bits=embedding_bits, foreach=foreach,
            fused=fused, capturable=capturable, differentiable=differentiable,
        )


# ---------------------------------------------------------------------------- RMSprop


class RMSprop8bit(RuleOptimizer):
    """RMSprop with its square average in 8 bits; a drop-in for ``torch.optim.RMSprop``.

    Args:
        params: parameters or param groups.
        lr, alpha, eps, weight_decay, momentum, maximize: as in ``torch.optim.RMSprop``
            (``momentum > 0`` adds an 8-bit ``momentum_buffer``).
        centered: must be False (see the module docstring; torch.optim.RMSprop has it).
        optim_bits, min_8bit_size, blocksize, embedding_bits, foreach, fused, capturable,
        differentiable: as for :class:`Lion8bit`.
    """

    rule = _update.RMSPROP
    slot_names = ("square_avg", "momentum_buffer")
    torch_counterpart = torch.optim.RMSprop

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
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
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered)
        super().__init__(
            params, defaults, optim_bits=optim_bits, min_8bit_size=min_8bit_size, blocksize=blocksize,
            embedding_bits=embedding_bits, maximize=maximize, foreach=foreach, fused=fused, capturable=capturable,
            differentiable=differentiable,
        )

    def _check_hyperparameters(self, group: dict) -> None:
        _check_lr(group["lr"])
        _check_range("alpha value", group["alpha"], 0.0, 1.0)
        _check_range("epsilon value", group["eps"], 0.0, math.inf, hi_open=True)
        _check_range("weight_decay value", group["weight_decay"], 0.0, math.inf, hi_open=True)
        _check_range("momentum value", group["momentum"], 0.0, math.inf, hi_open=True)
        if group["centered"]:
            raise ValueError(
                f"{type(self).__name__} implements RMSprop with centered=False: the centered variance, the difference "
                "of two quantized states, cancels to zero or below wherever gradients are steady; use "
                "torch.optim.RMSprop(centered=True)"
            )

    def _rule(self, group):
        return _update.RMSPROP_MOMENTUM if group["momentum"] != 0 else _update.RMSPROP

    def _scalars(self, group, step, lr):
        alpha = group["alpha"]
        out = dict(weight_decay=group["weight_decay"], alpha=alpha, one_minus_alpha=1.0 - alpha, eps=group["eps"], lr=lr)
        if group["momentum"] != 0:
            out["momentum"] = group["momentum"]
        return out


class RMSprop32bit(RMSprop8bit):
    """:class:`RMSprop8bit` with ``optim_bits=32``: fp32 state, same code path (and CUDA kernel)."""

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
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
            params, lr, alpha, eps, weight_decay, momentum, centered, maximize=maximize, optim_bits=optim_bits,
            min_8bit_size=min_8bit_size, blocksize=blocksize, embedding_bits=embedding_bits, foreach=foreach,
            fused=fused, capturable=capturable, differentiable=differentiable,
        )


# ---------------------------------------------------------------------------- Adagrad


class Adagrad8bit(RuleOptimizer):
    """Adagrad with its sum of squared gradients in 8 bits; a drop-in for ``torch.optim.Adagrad``.

    Args:
        params: parameters or param groups.
        lr, lr_decay, weight_decay, initial_accumulator_value, eps, maximize: as in ``torch.optim.Adagrad``.
        optim_bits, min_8bit_size, blocksize, embedding_bits, foreach, fused, capturable,
        differentiable: as for :class:`Lion8bit`.
    """

    rule = _update.ADAGRAD
    slot_names = ("sum",)
    torch_counterpart = torch.optim.Adagrad

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
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
        defaults = dict(
            lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, initial_accumulator_value=initial_accumulator_value, eps=eps
        )
        super().__init__(
            params, defaults, optim_bits=optim_bits, min_8bit_size=min_8bit_size, blocksize=blocksize,
            embedding_bits=embedding_bits, maximize=maximize, foreach=foreach, fused=fused, capturable=capturable,
            differentiable=differentiable,
        )

    def _check_hyperparameters(self, group: dict) -> None:
        _check_lr(group["lr"])
        _check_range("lr_decay value", group["lr_decay"], 0.0, math.inf, hi_open=True)
        _check_range("weight_decay value", group["weight_decay"], 0.0, math.inf, hi_open=True)
        _check_range("initial_accumulator_value", group["initial_accumulator_value"], 0.0, math.inf, hi_open=True)
        _check_range("epsilon value", group["eps"], 0.0, math.inf, hi_open=True)

    def _initial_value(self, slot, group):
        return float(group["initial_accumulator_value"])

    def _scalars(self, group, step, lr):
        return dict(weight_decay=group["weight_decay"], eps=group["eps"], clr=lr / (1.0 + (step - 1) * group["lr_decay"]))


class Adagrad32bit(Adagrad8bit):
    """:class:`Adagrad8bit` with ``optim_bits=32``: fp32 state, same code path (and CUDA kernel)."""

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
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
            params, lr, lr_decay, weight_decay, initial_accumulator_value, eps, maximize=maximize,
            optim_bits=optim_bits, min_8bit_size=min_8bit_size, blocksize=blocksize, embedding_bits=embedding_bits,
            foreach=foreach, fused=fused, capturable=capturable, differentiable=differentiable,
        )


# ---------------------------------------------------------------------------- AdEMAMix


class AdEMAMix8bit(RuleOptimizer):
    """AdEMAMix (Adam with a second, slow first moment) with 8-bit state; bitsandbytes' ``AdEMAMix8bit`` semantics.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-3).
        betas: ``(beta1, beta2, beta3)``: fast first moment, second moment, slow first moment.
        alpha: weight of the slow moment in the update (default 5).
        t_alpha, t_beta3: steps of the paper's warm-ups of ``alpha`` and ``beta3`` (None: none).
        eps: added to the bias-corrected ``sqrt(nu)``.
        weight_decay: decoupled weight decay, ``p *= 1 - lr * weight_decay`` (default 1e-2).
        maximize, optim_bits, min_8bit_size, blocksize, embedding_bits, foreach, fused, capturable,
        differentiable: as for :class:`Lion8bit`.
    """

    rule = _update.ADEMAMIX
    slot_names = ("exp_avg", "exp_avg_slow", "exp_avg_sq")

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        alpha: float = 5.0,
        t_alpha: int | None = None,
        t_beta3: int | None = None,
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
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
        defaults = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, alpha=alpha, t_alpha=t_alpha,
            t_beta3=t_beta3, eps=eps, weight_decay=weight_decay,
        )
        super().__init__(
            params, defaults, optim_bits=optim_bits, min_8bit_size=min_8bit_size, blocksize=blocksize,
            embedding_bits=embedding_bits, maximize=maximize, foreach=foreach, fused=fused, capturable=capturable,
            differentiable=differentiable,
        )

    def _check_hyperparameters(self, group: dict) -> None:
        _check_lr(group["lr"])
        _check_betas(group["betas"], 3)
        _check_range("alpha value", group["alpha"], 0.0, math.inf, hi_open=True)
        _check_range("epsilon value", group["eps"], 0.0, math.inf, hi_open=True)
        _check_range("weight_decay value", group["weight_decay"], 0.0, math.inf, hi_open=True)
        for key in ("t_alpha", "t_beta3"):
            t = group[key]
            if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t <= 0):
                raise ValueError(f"{key} must be None (no warm-up) or a number of steps > 0, got {t!r}")
        if group["t_beta3"] is not None and not (float(group["betas"][0]) > 0 and float(group["betas"][2]) > 0):
            raise ValueError("the beta3 warm-up (t_beta3) needs beta1 > 0 and beta3 > 0 (it interpolates their logs)")

    def _scalars(self, group, step, lr):
        beta1, beta2, beta3 = (float(b) for b in group["betas"])
        alpha, t_alpha, t_beta3 = group["alpha"], group["t_alpha"], group["t_beta3"]
        if t_alpha is not None:
            alpha = min(step * alpha / t_alpha, alpha)
        if t_beta3 is not None:
            ln1, ln3 = math.log(beta1), math.log(beta3)
            frac = step / t_beta3
            beta3 = min(math.exp(ln1 * ln3 / ((1.0 - frac) * ln3 + frac * ln1)), beta3)
        return dict(
            beta1=beta1, one_minus_beta1=1.0 - beta1, beta2=beta2, one_minus_beta2=1.0 - beta2,
            beta3=beta3, one_minus_beta3=1.0 - beta3, inv_bc1=1.0 / (1.0 - beta1**step), alpha=alpha,
            inv_bc2_sqrt=1.0 / math.sqrt(1.0 - beta2**step), eps=group["eps"], lr=lr,
            decay=1.0 - lr * group["weight_decay"],
        )


class AdEMAMix32bit(AdEMAMix8bit):
    """:class:`AdEMAMix8bit` with ``optim_bits=32``: fp32 state, same code path (and CUDA kernel)."""

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        alpha: float = 5.0,
        t_alpha: int | None = None,
        t_beta3: int | None = None,
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
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
            params, lr, betas, alpha, t_alpha, t_beta3, eps, weight_decay, maximize=maximize, optim_bits=optim_bits,
            min_8bit_size=min_8bit_size, blocksize=blocksize, embedding_bits=embedding_bits, foreach=foreach,
            fused=fused, capturable=capturable, differentiable=differentiable,
        )
