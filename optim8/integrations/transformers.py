"""``from_pretrained(..., quantization_config=optim8.Int8Config())`` through transformers' quantizer registry.

transformers 5.x builds a model on the meta device, lets a registered ``HfQuantizer`` rewrite the
empty skeleton, then streams the checkpoint in tensor by tensor. optim8 plugs into that as follows:

* ``Int8Config`` (``quant_method == "optim8"``) is the serializable half: ``save_pretrained``
  writes it to ``config.json`` and ``from_pretrained`` rebuilds it through
  ``AUTO_QUANTIZATION_CONFIG_MAPPING["optim8"]``.
* ``Int8HfQuantizer`` (``AUTO_QUANTIZER_MAPPING["optim8"]``), before any weight exists, swaps every
  ``nn.Linear`` not skipped for an empty ``Linear8bitLt`` on the meta device.
* Loading a float checkpoint (``pre_quantized=False``): each such layer's ``weight`` goes through
  ``Int8Quantize`` as it arrives, on the device it is placed on, and only its int8 codes and fp32
  ``SCB`` row scales are kept. At most one float weight matrix exists at a time; the float model
  is never materialized.
* Loading an optim8 checkpoint (``pre_quantized=True``): the stored int8 ``weight`` and fp32
  ``SCB`` load as they are (transformers does not cast non-float tensors), so a
  save -> load round trip reproduces the model bit for bit.

Modules kept in float: ``skip_modules`` (transformers' matching rules: a prefix up to a module
boundary, a regex, or a name suffix), the model's ``_keep_in_fp32_modules``, and what transformers
itself never quantizes: tied weights, the output embeddings and the last module (usually a head).

Registration happens when ``transformers.quantizers.auto`` is imported (or at once, if it already
is), see ``optim8.integrations``; this module imports transformers and is imported lazily.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..layers import Linear8bitLt
from ..layers.linear8bit import check_scales

QUANT_METHOD = "optim8"

__all__ = ["QUANT_METHOD", "Int8Config", "Int8HfQuantizer", "register"]


_DEFAULT_SKIP = ("lm_head",)


class Int8Config(QuantizationConfigMixin):
    """Load a model's linear layers as LLM.int8() ``optim8.Linear8bitLt`` layers.

    Args (keyword-only):
        threshold: activation magnitude at and above which an input column goes through the
            float (outlier) path instead of int8; ``0`` or ``inf`` disable the decomposition
            exactly as for ``Linear8bitLt``.
        skip_modules: module names kept in float, matched as transformers matches
            ``modules_to_not_convert`` (prefix at a module boundary, regex, or suffix). Tied
            weights, the output embeddings and the model's ``_keep_in_fp32_modules`` are kept in
            float in any case. Quantizing a float checkpoint, an entry that matches no module of
            the model is an error (a misspelt name would leave that layer quantized); ``"lm_head"``
            (the default) is exempt, for models without one.

    Serialized as ``{"quant_method": "optim8", "threshold": ..., "skip_modules": [...]}``.
    """

    def __init__(
        self,
        *,
        threshold: float = 6.0,
        skip_modules: list[str] | tuple[str, ...] | None = _DEFAULT_SKIP,
        quant_method: str = QUANT_METHOD,
        **unexpected: Any,
    ):
        if unexpected:
            raise TypeError(
                f"Int8Config got unknown options {sorted(unexpected)}; it takes threshold and skip_modules "
                "(a config.json written by another optim8 version may need that version)."
            )
        if quant_method != QUANT_METHOD:
            raise ValueError(f"Int8Config is the config of quant_method {QUANT_METHOD!r}, got {quant_method!r}.")
        threshold = float(threshold)
        if threshold != threshold or threshold < 0:
            raise ValueError(f"Int8Config threshold must be >= 0 (inf or 0 turn outlier columns off), got {threshold}.")
        if isinstance(skip_modules, str):
            raise TypeError(f"Int8Config skip_modules must be a list of module names, got the string {skip_modules!r}.")
        wrong = [entry for entry in skip_modules or () if not isinstance(entry, str)]
        if wrong:
            raise TypeError(f"Int8Config skip_modules must hold module names (strings), got {wrong!r}.")
        self.quant_method = QUANT_METHOD
        self.threshold = threshold
        self.skip_modules = list(skip_modules or [])

    def to_dict(self) -> dict[str, Any]:
        # bitsandbytes' config with optim8's entry: a process without optim8 then loads the int8
        # checkpoint through bitsandbytes or refuses it, never as float weights (see .bnb).
        from .bnb import bnb_dict

        options = {"bits": 8, "threshold": self.threshold, "skip_modules": list(self.skip_modules)}
        return bnb_dict(bits=8, skip_modules=self.skip_modules, threshold=self.threshold, optim8=options)

    @classmethod
    def from_bnb_dict(cls, config_dict: dict) -> "Int8Config":
        """The config of a bitsandbytes-layout 8-bit checkpoint (optim8's or bitsandbytes'): SCB is the row absmax."""
        ours = config_dict.get("optim8") or {}
        skip = ours.get("skip_modules", config_dict.get("llm_int8_skip_modules") or [])
        config = cls(threshold=ours.get("threshold", config_dict.get("llm_int8_threshold", 6.0)), skip_modules=skip)
        config.scb_absmax = True
        return config

    @classmethod
    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs):
        if config_dict.get("load_in_8bit") or config_dict.get("quant_method") == "bitsandbytes":
            config = cls.from_bnb_dict(config_dict)
            return (config, kwargs) if return_unused_kwargs else config
        return super().from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)


class Int8Quantize(ConversionOps):
    """Loading op for a float checkpoint: one float ``weight`` in -> its int8 ``weight`` and fp32 ``SCB`` out.

    Runs on the device the weight was placed on (so on the GPU when ``device_map`` says so); the
    float tensor is dropped as soon as its codes exist.
    """

    def __init__(self, hf_quantizer: "Int8HfQuantizer"):
        self.hf_quantizer = hf_quantizer

    @torch.no_grad()
    def convert(
        self, input_dict: dict[str, Any], *, model: nn.Module | None = None, **kwargs
    ) -> dict[str, torch.Tensor]:
        result: dict[str, torch.Tensor] = {}
        for name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            module, tensor_name = get_module_from_name(model, name)
            if not isinstance(module, Linear8bitLt) or tensor_name != "weight":
                result[name] = value
                continue
            if tuple(value.shape) != (module.out_features, module.in_features):
                raise ValueError(
                    f"checkpoint tensor {name} has shape {tuple(value.shape)}, but the layer expects "
                    f"{(module.out_features, module.in_features)}"
                )
            # `from_linear` is the one quantization routine for Linear8bitLt; a bias-free shell
            # around this one tensor reuses it without touching the (still meta) layer.
            shell = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
            shell.weight = nn.Parameter(value, requires_grad=False)
            quantized = Linear8bitLt.from_linear(shell, threshold=module.threshold)
            result[name] = quantized.weight
            result[name[: -len("weight")] + "SCB"] = quantized.SCB
        return result


class Int8HfQuantizer(HfQuantizer):
    """transformers' side of ``Int8Config``: module swap before loading, per-weight quantization while loading."""

    requires_calibration = False
    quantization_config: Int8Config

    @property
    def quantized_element_size(self) -> float:
        return 1.0

    def validate_environment(self, *args, device_map=None, **kwargs) -> None:
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError(
                "optim8 int8 models cannot be offloaded to disk; give device_map only devices (cpu and/or GPUs)."
            )

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs) -> bool:
        module, tensor_name = get_module_from_name(model, param_name)
        return isinstance(module, Linear8bitLt) and tensor_name == "weight"

    def _check_skip_modules(self, model) -> None:
        names = [name for name, _ in model.named_modules() if name]
        unmatched = [
            entry
            for entry in self.quantization_config.skip_modules
            if entry not in _DEFAULT_SKIP and all(should_convert_module(name, [entry]) for name in names)
        ]
        if unmatched:
            linears = [name for name, module in model.named_modules() if type(module) is nn.Linear]
            raise ValueError(
                f"Int8Config skip_modules {unmatched} match no module of {type(model).__name__}, so nothing would be "
                f"kept in float for them; its nn.Linear modules are {linears[:8]}{' ...' if len(linears) > 8 else ''}"
            )

    def _process_model_before_weight_loading(self, model, **kwargs) -> None:
        if not self.pre_quantized:  # a saved config.json is checked when its checkpoint loads (int8 weights)
            self._check_skip_modules(model)
        skip = self.get_modules_to_not_convert(
            model, self.quantization_config.skip_modules, model._keep_in_fp32_modules, add_default_skips=True
        )
        # transformers names the last module by its last parameter and strips only ".weight"; a
        # head with a bias (e.g. BERT's classifier) would otherwise be quantized.
        self.modules_to_not_convert = sorted({name.removesuffix(".bias") for name in skip})
        from .bnb import ignore_weight_format

        ignore_weight_format(model)
        replaced = 0
        for name, module in list(model.named_modules()):
            if type(module) is not nn.Linear or not should_convert_module(name, self.modules_to_not_convert):
                continue
            layer = Linear8bitLt(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                threshold=self.quantization_config.threshold,
                device="meta",
                dtype=module.weight.dtype,
            )
            layer.requires_grad_(False)
            parent, child = get_module_from_name(model, name)
            setattr(parent, child, layer)
            replaced += 1
        if replaced == 0:
            raise ValueError(
                f"Int8Config found no nn.Linear to quantize in {type(model).__name__} "
                f"(kept in float: {sorted(self.modules_to_not_convert)}); check skip_modules."
            )

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized and getattr(self.quantization_config, "scb_absmax", False):
            from .bnb import convert_loaded_scales

            convert_loaded_scales(model)  # bitsandbytes' layout: SCB was the row absmax
        for name, module in model.named_modules():
            if isinstance(module, Linear8bitLt):
                # A layer whose weight was missing from the checkpoint was initialized in float by
                # transformers; quantize it so that every Linear8bitLt holds int8 codes from here on.
                module.quantize()
                check_scales(module, name)  # pre-quantized scales arrive without _load_from_state_dict
            elif isinstance(module, nn.Linear) and module.weight.dtype == torch.int8:
                raise ValueError(
                    f"the checkpoint holds int8 (quantized) weights for {name!r}, but its config.json keeps that module "
                    f"in float (quantization_config skip_modules {self.quantization_config.skip_modules}, or "
                    "transformers' own defaults); remove it from skip_modules in config.json, or load the float "
                    "checkpoint it was quantized from"
                )
        # The flag peft and Trainer look for on 8-bit models (peft: prepare_model_for_kbit_training;
        # Trainer: no nn.DataParallel). It does not make transformers treat the model as bitsandbytes'.
        model.is_loaded_in_8bit = True
        return model

    def get_state_dict_and_metadata(self, model):
        """What ``save_pretrained`` writes: bitsandbytes' layout (``SCB`` = row absmax, ``weight_format``)."""
        from .bnb import int8_state_dict

        return int8_state_dict(model), {}

    def get_quantize_ops(self) -> Int8Quantize:
        return Int8Quantize(self)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        """``model.dequantize()``: every ``Linear8bitLt`` back to an ``nn.Linear`` holding its dequantized weight."""
        from .bnb import dequantize_layers

        dequantize_layers(model, Linear8bitLt, dtype)
        if hasattr(model, "is_loaded_in_8bit"):
            del model.is_loaded_in_8bit
        return model


def register() -> None:
    """Add ``Int8Config`` / ``Int8HfQuantizer`` to transformers' registries (idempotent)."""
    # By module path: this runs while the `transformers.quantizers` package is still importing.
    auto = importlib.import_module("transformers.quantizers.auto")

    for mapping, cls in (
        (auto.AUTO_QUANTIZATION_CONFIG_MAPPING, Int8Config),
        (auto.AUTO_QUANTIZER_MAPPING, Int8HfQuantizer),
    ):
        current = mapping.get(QUANT_METHOD)
        if current is cls:
            continue
        if current is not None and current.__module__ != cls.__module__:
            raise RuntimeError(
                f"transformers already has quant_method {QUANT_METHOD!r} registered to {current.__module__}."
                f"{current.__qualname__}; optim8 cannot register its own."
            )
        # Re-registration after a reload of this module replaces the stale class; the public
        # decorators refuse any existing name.
        if current is None:
            (auto.register_quantization_config if cls is Int8Config else auto.register_quantizer)(QUANT_METHOD)(cls)
        else:
            mapping[QUANT_METHOD] = cls
    # Int4Config, and the routing of bitsandbytes-layout configs. When .bnb is what is importing
    # transformers right now, it registers itself once its own body has run.
    bnb = sys.modules.get(f"{__package__}.bnb")
    if bnb is None or hasattr(bnb, "register"):
        from .bnb import register as register_4bit

        register_4bit()


register()
