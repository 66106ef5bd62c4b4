"""peft LoRA over ``optim8.Linear8bitLt``.

``LoraLinear8bitLt`` is peft's own ``lora.Linear`` (forward, adapter bookkeeping, mixed-batch
inference, save/load) with the three things an int8 base needs changed:

* merge / unmerge: ``W8 <- quantize(dequantize(W8) +/- sum_a scale_a * B_a @ A_a)``, computed in
  fp32 and re-quantized once per call with ``Linear8bitLt``'s own row-wise quantization, so a merged
  layer is an ordinary ``Linear8bitLt`` again (``merge_and_unload`` leaves an int8 model). The merge
  is lossy by one int8 rounding (``|error| <= SCB / 2`` per element); unmerge does not restore the
  original codes exactly.
* adapter dtype: peft puts new adapters in the base weight's dtype unless that is not a float;
  here the "base dtype" is the layer's compute dtype (the dtype it was built or loaded in),
  so adapters on an int8 bf16-model start in bf16 (peft's ``autocast_adapter_dtype=True``, its
  default, then keeps trainable adapters in fp32 as it does for any half-precision model).
* LoRA variants that need the float base weight at every step (DoRA, aLoRA, ...) are refused
  with a clear error instead of silently reading int8 codes as weights.

peft finds the layer through ``LoraConfig._register_custom_module``; ``optim8.integrations``
makes every ``LoraConfig`` carry the mapping, so ``get_peft_model`` and
``PeftModel.from_pretrained`` need nothing from the user.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ..layers import Linear4bit, Linear8bitLt

__all__ = ["LoraLinear4bit", "LoraLinear8bitLt", "register_lora_layer"]


class LoraLinear8bitLt(LoraLinear):
    """LoRA adapters (trainable, float) on a frozen ``Linear8bitLt`` base.

    ``forward(x) = base(x) + sum_a scale_a * B_a(A_a(dropout(x)))``, the adapter path run in the
    adapters' dtype and added in the base output's dtype (peft's ``lora.Linear`` forward).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs):
        if config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out=True does not apply to Linear8bitLt ([out, in] weights); using False.")
            config.fan_in_fan_out = False
        super().__init__(base_layer, adapter_name, config, r=r, lora_alpha=lora_alpha, **kwargs)

    @property
    def lora_variants(self):
        return {(): None}

    def resolve_lora_variant(self, *, config, **kwargs):
        try:
            return super().resolve_lora_variant(config=config, **kwargs)
        except ValueError as error:
            raise ValueError(
                "optim8's Linear8bitLt supports plain LoRA adapters only (no DoRA, aLoRA, Arrow, ... variants, "
                f"which need the float base weight): {error}. Turn the variant off in LoraConfig, or "
                "exclude these layers from target_modules."
            ) from error

    def _get_base_layer_device_and_dtype(self, base_layer):
        return base_layer.weight.device, _compute_dtype(base_layer)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold the adapters into the base: dequantize, add ``scale * B @ A`` in fp32, quantize once.

        ``safe_merge`` checks the merged weight for non-finite values before anything is written.
        """
        adapter_names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.lora_A]
        if not adapter_names:
            return
        self._fold(adapter_names, sign=1.0, check_finite=safe_merge)
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """Take the merged adapters out again (one more int8 rounding: not bit-exact)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        adapter_names = [name for name in self.merged_adapters if name in self.lora_A]
        self._fold(adapter_names, sign=-1.0, check_finite=False)
        self.merged_adapters.clear()

    @torch.no_grad()
    def _fold(self, adapter_names: list[str], *, sign: float, check_finite: bool) -> None:
        base = self.get_base_layer()
        weight = base.dequantize(torch.float32)
        bias = None if base.bias is None else base.bias.detach().float()
        for name in adapter_names:
            weight += sign * self.get_delta_weight(name).to(weight.device, torch.float32)
            if self.lora_bias[name]:
                if bias is None:
                    raise RuntimeError(
                        f"adapter {name!r} has lora_bias=True but the base layer has no bias to merge it into"
                    )
                bias += sign * self.scaling[name] * self.lora_B[name].bias.detach().float()
        if check_finite and not (torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())):
            raise ValueError(f"NaNs detected in the merged weights. The adapter(s) {adapter_names} seem to be broken")
        requantize_(base, weight)
        if bias is not None:
            base.bias.data = bias.to(base.bias.dtype)


class LoraLinear4bit(LoraLinear8bitLt):
    """LoRA adapters on a frozen ``Linear4bit`` base (QLoRA).

    The same layer as :class:`LoraLinear8bitLt`; merge / unmerge dequantize the 4-bit weight, add or
    subtract ``scale * B @ A`` in fp32 and quantize again with the layer's own quant_type,
    blocksize and double quantization (lossy by one 4-bit rounding). Adapters start in the
    layer's ``compute_dtype``, or the float dtype it was built in.
    """

    def _get_base_layer_device_and_dtype(self, base_layer):
        return base_layer.weight.device, base_layer.compute_dtype or base_layer.float_dtype


def _compute_dtype(layer: Linear8bitLt) -> torch.dtype | None:
    """The float dtype a Linear8bitLt computes in; ``None`` where it cannot be told."""
    dtype = getattr(layer, "compute_dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    if layer.weight.is_floating_point():
        return layer.weight.dtype
    if layer.bias is not None:
        return layer.bias.dtype
    return None


@torch.no_grad()
def requantize_(layer: Linear8bitLt, weight: torch.Tensor) -> None:
    """Replace ``layer``'s int8 weight and ``SCB`` with the row-wise quantization of float ``weight``."""
    if isinstance(layer, Linear4bit):  # the 4-bit weight and its state, quantized as the layer was
        layer._set_quantized(*layer._quantized(weight))
        return
    shell = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
    shell.weight = nn.Parameter(weight, requires_grad=False)
    quantized = Linear8bitLt.from_linear(shell, threshold=layer.threshold)
    layer.weight = quantized.weight
    layer.SCB = quantized.SCB


def register_lora_layer(config) -> None:
    """Map ``Linear8bitLt`` to ``LoraLinear8bitLt`` in this ``LoraConfig``, unless the user mapped it already."""
    if Linear8bitLt not in (getattr(config, "_custom_modules", None) or {}):
        config._register_custom_module({Linear8bitLt: LoraLinear8bitLt})
    if Linear4bit not in (getattr(config, "_custom_modules", None) or {}):
        config._register_custom_module({Linear4bit: LoraLinear4bit})
