"""4-bit loading (``Int4Config``) and bitsandbytes-format checkpoints, read and written without bitsandbytes.

**The layout on disk is bitsandbytes'**, for optim8's own int8 and 4-bit models as well:

* 8-bit, per quantized linear layer: ``weight`` int8 ``[out, in]``, ``SCB`` fp32 ``[out]`` = the
  row absmax (``W ~= weight * SCB / 127``), ``weight_format`` uint8 (0: row-major). optim8's
  ``Linear8bitLt`` keeps the row *scale* ``absmax / 127`` in memory; saving writes, for each
  scale ``s``, the fp32 absmax ``a`` nearest to ``127 s`` with ``fp32(a / 127) == s`` (one exists:
  the absmax it was computed from), so a save -> load round trip is bit-identical.
* 4-bit: ``weight`` uint8 ``[ceil(n / 2), 1]``, ``weight.absmax``, ``weight.quant_map``,
  ``weight.nested_absmax``, ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``
  (JSON bytes), as ``Linear4bit``'s state dict already is.
* ``config.json``: bitsandbytes' ``quantization_config`` (``quant_method: "bitsandbytes"``,
  ``load_in_8bit`` / ``load_in_4bit``, ...) plus an ``"optim8"`` entry with optim8's own options.

Why: transformers routes every ``load_in_8bit`` / ``load_in_4bit`` config to its bitsandbytes
quantizer, so a process that never imported optim8 either loads the checkpoint correctly through
bitsandbytes or refuses it (bitsandbytes not installed) - it never reads int8 codes as float
weights. With optim8 imported, ``AutoQuantizationConfig.from_dict`` is wrapped so that a config
carrying the ``"optim8"`` entry becomes ``Int8Config`` / ``Int4Config`` again; configs without it
(genuine bitsandbytes checkpoints) are left to transformers, and :func:`from_bitsandbytes` loads
them into optim8 layers. Older optim8 checkpoints (``quant_method: "optim8"``, ``SCB`` = the
scale) still load as before.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps, _IdentityOp
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..kernels.nf4 import BLOCKSIZES_4BIT, QUANT_TYPES
from ..layers import Linear4bit, Linear8bitLt

__all__ = ["QUANT_METHOD_4BIT", "Int4Config", "Int4HfQuantizer", "from_bitsandbytes", "register"]

QUANT_METHOD_4BIT = "optim8_4bit"
MARKER = "optim8"  # the config.json entry that says optim8 wrote this bitsandbytes-layout checkpoint
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _dtype_from(value) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if name not in _DTYPE_NAMES:
        raise ValueError(f"compute_dtype must be float32, float16 or bfloat16, got {value!r}")
    return _DTYPE_NAMES[name]


def bnb_dict(*, bits: int, skip_modules, threshold: float = 6.0, quant_type: str = "nf4",
             double_quant: bool = True, compute_dtype: torch.dtype | None = None, optim8: dict) -> dict[str, Any]:  # fmt: skip
    """A ``BitsAndBytesConfig.to_dict()``-shaped quantization config, with optim8's options under ``"optim8"``."""
    return {
        "quant_method": "bitsandbytes",
        "_load_in_8bit": bits == 8,
        "_load_in_4bit": bits == 4,
        "load_in_8bit": bits == 8,
        "load_in_4bit": bits == 4,
        "llm_int8_threshold": float(threshold),
        "llm_int8_skip_modules": list(skip_modules),
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": bool(double_quant),
        "bnb_4bit_compute_dtype": _dtype_name(compute_dtype) or "float32",
        "bnb_4bit_quant_storage": "uint8",
        MARKER: dict(optim8),
    }


# ------------------------------------------------------------------------------ int8 layout


def absmax_from_scale(scale: torch.Tensor) -> torch.Tensor:
    """The fp32 row absmax ``a`` nearest to ``127 * scale`` with ``fp32(a / 127) == scale`` (bitsandbytes' SCB)."""
    a = scale.float() * 127.0
    for _ in range(8):
        back = a / torch.full_like(a, 127.0)
        low, high = back < scale, back > scale
        if not bool((low | high).any()):
            break
        a = torch.where(low, torch.nextafter(a, torch.full_like(a, float("inf"))), a)
        a = torch.where(high, torch.nextafter(a, torch.full_like(a, -float("inf"))), a)
    return a


def scale_from_absmax(absmax: torch.Tensor) -> torch.Tensor:
    """optim8's row scale from bitsandbytes' SCB: ``fp32(absmax / 127)``, as ``quantize_rowwise`` computes it."""
    return absmax.float() / torch.full_like(absmax.float(), 127.0)


def int8_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every quantized ``Linear8bitLt`` in bitsandbytes' layout (SCB = absmax)."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, Linear8bitLt) and module.is_quantized:
            prefix = f"{name}." if name else ""
            if prefix + "SCB" in state:
                state[prefix + "SCB"] = absmax_from_scale(module.SCB.detach())
                state[prefix + "weight_format"] = torch.tensor(0, dtype=torch.uint8)
    return state


def convert_loaded_scales(model: nn.Module) -> None:
    """After a pre-quantized load of a bitsandbytes-layout checkpoint: SCB (absmax) -> optim8's scale."""
    for module in model.modules():
        if isinstance(module, Linear8bitLt) and module.is_quantized and not module.SCB.is_meta:
            module.SCB = scale_from_absmax(module.SCB)


def ignore_weight_format(model: nn.Module) -> None:
    """bitsandbytes' ``weight_format`` entries carry nothing optim8 reads: no 'unexpected keys' report."""
    ignore = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    model._keys_to_ignore_on_load_unexpected = ignore | {r"\.weight_format$"}


# ------------------------------------------------------------------------------ Int4Config



def dequantize_layers(model: nn.Module, layer_cls: type, dtype=None) -> nn.Module:
    """Replace every ``layer_cls`` module (Linear8bitLt, Linear4bit) by an ``nn.Linear`` holding its dequantized weight."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, layer_cls):
            continue
        weight = module.dequantize(dtype)
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().to(weight.dtype), requires_grad=False)
        parent, child = get_module_from_name(model, name)
        setattr(parent, child, linear)
    return model

class Int4Config(QuantizationConfigMixin):
    """Load a model's linear layers as QLoRA 4-bit ``optim8.Linear4bit`` layers.

    Args (keyword-only):
        quant_type: ``"nf4"`` (default) or ``"fp4"``.
        blocksize: weights per absmax (default 64).
        double_quant: 8-bit absmaxes (default True).
        compute_dtype: the layers' matmul dtype; ``None`` (default) computes in the input's dtype.
        skip_modules: module names kept in float, matched as for ``Int8Config``.

    Saved as bitsandbytes' ``load_in_4bit`` config plus ``{"optim8": {"bits": 4, ...}}``; see
    :mod:`optim8.integrations.bnb`.
    """

    def __init__(
        self,
        *,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | str | None = None,
        skip_modules: list[str] | tuple[str, ...] | None = ("lm_head",),
        quant_method: str = QUANT_METHOD_4BIT,
        **unexpected: Any,
    ):
        if unexpected:
            raise TypeError(
                f"Int4Config got unknown options {sorted(unexpected)}; it takes quant_type, blocksize, "
                "double_quant, compute_dtype and skip_modules."
            )
        if quant_method != QUANT_METHOD_4BIT:
            raise ValueError(f"Int4Config is the config of quant_method {QUANT_METHOD_4BIT!r}, got {quant_method!r}.")
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"Int4Config quant_type must be 'nf4' or 'fp4', got {quant_type!r}.")
        if blocksize not in BLOCKSIZES_4BIT:
            raise ValueError(f"Int4Config blocksize must be one of {BLOCKSIZES_4BIT}, got {blocksize!r}.")
        if isinstance(skip_modules, str):
            raise TypeError(f"Int4Config skip_modules must be a list of module names, got the string {skip_modules!r}.")
        wrong = [entry for entry in skip_modules or () if not isinstance(entry, str)]
        if wrong:
            raise TypeError(f"Int4Config skip_modules must hold module names (strings), got {wrong!r}.")
        self.quant_method = QUANT_METHOD_4BIT
        self.quant_type = quant_type
        self.blocksize = int(blocksize)
        self.double_quant = bool(double_quant)
        self.compute_dtype = _dtype_from(compute_dtype)
        self.skip_modules = list(skip_modules or [])

    def to_dict(self) -> dict[str, Any]:
        return bnb_dict(
            bits=4, skip_modules=self.skip_modules, quant_type=self.quant_type, double_quant=self.double_quant,
            compute_dtype=self.compute_dtype,
            optim8={"bits": 4, "blocksize": self.blocksize, "compute_dtype": _dtype_name(self.compute_dtype)},
        )  # fmt: skip

    @classmethod
    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs):
        d = dict(config_dict)
        if d.get("quant_method") == "bitsandbytes" or d.get("load_in_4bit"):
            ours = d.get(MARKER) or {}
            config = cls(
                quant_type=d.get("bnb_4bit_quant_type", "nf4"),
                blocksize=int(ours.get("blocksize", 64)),
                double_quant=bool(d.get("bnb_4bit_use_double_quant", False)),
                compute_dtype=ours.get("compute_dtype", d.get("bnb_4bit_compute_dtype")) if ours else None,
                skip_modules=d.get("llm_int8_skip_modules") or [],
            )
        else:
            config = cls(**d)
        return (config, kwargs) if return_unused_kwargs else config


class Int4Quantize(ConversionOps):
    """Loading op for a float checkpoint: one float ``weight`` in -> its packed 4-bit weight out (state on the layer)."""

    def __init__(self, hf_quantizer: "Int4HfQuantizer"):
        self.hf_quantizer = hf_quantizer

    @torch.no_grad()
    def convert(self, input_dict: dict[str, Any], *, model: nn.Module | None = None, **kwargs) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            module, tensor_name = get_module_from_name(model, name)
            if not isinstance(module, Linear4bit) or tensor_name != "weight":
                result[name] = value
                continue
            if tuple(value.shape) != (module.out_features, module.in_features):
                raise ValueError(
                    f"checkpoint tensor {name} has shape {tuple(value.shape)}, but the layer expects "
                    f"{(module.out_features, module.in_features)}"
                )
            module.float_dtype = value.dtype
            module._set_quantized(*module._quantized(value))
            result[name] = module.weight
        return result


class Int4Deserialize(ConversionOps):
    """Loading op for a pre-quantized (bitsandbytes-layout) checkpoint: the six ``weight*`` tensors -> the layer."""

    def __init__(self, hf_quantizer: "Int4HfQuantizer"):
        self.hf_quantizer = hf_quantizer

    @torch.no_grad()
    def convert(self, input_dict, model: nn.Module | None = None, full_layer_name: str | None = None, **kwargs):
        if len(input_dict) == 1:
            return input_dict
        tensors = {key: value[0] if isinstance(value, list) else value for key, value in input_dict.items()}
        weight = tensors.pop("weight")
        module, _ = get_module_from_name(model, full_layer_name)
        try:
            module.load_serialized(weight, tensors)
        except ValueError as error:
            raise ValueError(f"{full_layer_name}: {error}") from None
        module._is_hf_initialized = True
        return {"weight": module.weight}

    @property
    def reverse_op(self) -> ConversionOps:
        # Saving: the layer's state dict is already the serialized layout; nothing to undo.
        return _IdentityOp()


class Int4HfQuantizer(HfQuantizer):
    """transformers' side of ``Int4Config``: module swap before loading, per-weight quantization while loading."""

    requires_calibration = False
    quantization_config: Int4Config
    serialized_names = {
        "weight": [
            "weight",
            "weight.nested_absmax",
            "weight.nested_quant_map",
            "weight.quant_map",
            "weight.absmax",
            "weight.quant_state.bitsandbytes__nf4",
            "weight.quant_state.bitsandbytes__fp4",
        ]
    }

    @property
    def quantized_element_size(self) -> float:
        return 0.5

    def validate_environment(self, *args, device_map=None, **kwargs) -> None:
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("optim8 4-bit models cannot be offloaded to disk; give device_map only devices.")

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs) -> bool:
        module, tensor_name = get_module_from_name(model, param_name)
        return isinstance(module, Linear4bit) and tensor_name == "weight"

    def _process_model_before_weight_loading(self, model, **kwargs) -> None:
        config = self.quantization_config
        skip = self.get_modules_to_not_convert(
            model, config.skip_modules, model._keep_in_fp32_modules, add_default_skips=True
        )
        self.modules_to_not_convert = sorted({name.removesuffix(".bias") for name in skip})
        replaced = 0
        for name, module in list(model.named_modules()):
            if type(module) is not nn.Linear or not should_convert_module(name, self.modules_to_not_convert):
                continue
            layer = Linear4bit(
                module.in_features, module.out_features, bias=module.bias is not None, quant_type=config.quant_type,
                blocksize=config.blocksize, double_quant=config.double_quant, compute_dtype=config.compute_dtype,
                device="meta", dtype=module.weight.dtype,
            )  # fmt: skip
            layer.requires_grad_(False)
            layer.layer_name = name
            parent, child = get_module_from_name(model, name)
            setattr(parent, child, layer)
            replaced += 1
        if replaced == 0:
            raise ValueError(
                f"Int4Config found no nn.Linear to quantize in {type(model).__name__} "
                f"(kept in float: {sorted(self.modules_to_not_convert)}); check skip_modules."
            )

    def _process_model_after_weight_loading(self, model, **kwargs):
        for name, module in model.named_modules():
            if isinstance(module, Linear4bit):
                module.quantize()  # a weight missing from the checkpoint was initialized in float
            elif isinstance(module, nn.Linear) and module.weight.dtype == torch.uint8:
                raise ValueError(
                    f"the checkpoint holds packed 4-bit weights for {name!r}, but its config keeps that module in "
                    f"float (skip_modules {self.quantization_config.skip_modules})"
                )
        # Not `is_loaded_in_4bit`: transformers and peft read that flag as "bitsandbytes' Params4bit
        # inside" and import bitsandbytes (num_parameters, dispatch); is_quantized is set by transformers.
        return model

    def get_quantize_ops(self) -> Int4Quantize:
        return Int4Quantize(self)

    def get_load_operations(self):
        return {"deserialize": Int4Deserialize}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        """``model.dequantize()``: every ``Linear4bit`` back to an ``nn.Linear`` holding its dequantized weight."""
        return dequantize_layers(model, Linear4bit, dtype)


# ------------------------------------------------------------------------------ routing


def config_from_dict(d: dict):
    """``Int8Config`` / ``Int4Config`` of a bitsandbytes-layout quantization config (optim8's or bitsandbytes')."""
    from .transformers import Int8Config

    if d.get("load_in_4bit"):
        return Int4Config.from_dict(d)
    if d.get("load_in_8bit"):
        return Int8Config.from_bnb_dict(d)
    raise ValueError(f"not a bitsandbytes quantization config (no load_in_8bit / load_in_4bit): {sorted(d)}")


def _wrap_from_dict(auto) -> None:
    cls = auto.AutoQuantizationConfig
    original = cls.__dict__["from_dict"].__func__
    if getattr(original, "_optim8_routes", False):
        return

    def from_dict(klass, quantization_config_dict: dict):
        if isinstance(quantization_config_dict, dict) and isinstance(quantization_config_dict.get(MARKER), dict):
            return config_from_dict(quantization_config_dict)
        return original(klass, quantization_config_dict)

    from_dict._optim8_routes = True
    from_dict.__wrapped__ = original
    from_dict.__doc__ = original.__doc__
    cls.from_dict = classmethod(from_dict)


def register() -> None:
    """``Int4Config`` / ``Int4HfQuantizer`` in transformers' registries, and the config routing (idempotent)."""
    auto = importlib.import_module("transformers.quantizers.auto")
    for mapping, cls, decorator in (
        (auto.AUTO_QUANTIZATION_CONFIG_MAPPING, Int4Config, auto.register_quantization_config),
        (auto.AUTO_QUANTIZER_MAPPING, Int4HfQuantizer, auto.register_quantizer),
    ):
        current = mapping.get(QUANT_METHOD_4BIT)
        if current is cls:
            continue
        if current is not None and current.__module__ != cls.__module__:
            raise RuntimeError(f"transformers already has quant_method {QUANT_METHOD_4BIT!r} registered to {current}")
        if current is None:
            decorator(QUANT_METHOD_4BIT)(cls)
        else:
            mapping[QUANT_METHOD_4BIT] = cls
    _wrap_from_dict(auto)


def from_bitsandbytes(path_or_hub_id, *, auto_class=None, **kwargs):
    """Load a bitsandbytes checkpoint (``load_in_8bit`` or ``load_in_4bit``) into optim8 layers, without bitsandbytes.

    8-bit layers become ``Linear8bitLt`` (``SCB`` absmax converted to optim8's row scale), 4-bit
    ones ``Linear4bit`` with the checkpoint's own codes, scales and maps, so the dequantized
    weights are bitsandbytes'. ``auto_class`` defaults to ``AutoModelForCausalLM``; other
    ``kwargs`` go to ``from_pretrained`` (``dtype``, ``device_map``, ``revision``, ...).
    """
    import transformers

    auto_class = auto_class or transformers.AutoModelForCausalLM
    hub = {k: kwargs[k] for k in ("revision", "cache_dir", "local_files_only", "token", "trust_remote_code") if k in kwargs}
    config = kwargs.pop("config", None) or transformers.AutoConfig.from_pretrained(path_or_hub_id, **hub)
    qc = getattr(config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict()
    if not qc or not (qc.get("load_in_8bit") or qc.get("load_in_4bit")):
        raise ValueError(
            f"{path_or_hub_id}: config.json has no bitsandbytes quantization_config (load_in_8bit / load_in_4bit); "
            "for a float checkpoint use from_pretrained(..., quantization_config=optim8.Int8Config() or Int4Config())"
        )
    # Rewritten as optim8's bitsandbytes-layout config: the wrapped from_dict makes it ours.
    config.quantization_config = config_from_dict(qc).to_dict()
    return auto_class.from_pretrained(path_or_hub_id, config=config, **kwargs)


register()
