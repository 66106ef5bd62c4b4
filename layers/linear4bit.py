"""QLoRA's 4-bit linear layer: frozen NF4/FP4 blockwise weights with double quantization.

``Linear4bit`` is an ``nn.Linear`` whose ``weight`` becomes a uint8 ``nn.Parameter``
(``requires_grad=False``) of packed 4-bit codes, ``[ceil(out * in / 2), 1]`` as bitsandbytes
stores it, with its scales and maps in plain tensor attributes (not buffers: transformers'
loader replaces every non-persistent buffer with an empty tensor; these move with the layer in
``_apply`` and are saved by ``_save_to_state_dict``)::

    absmax            fp32 [blocks], or uint8 [blocks] with double quantization
    quant_map         fp32 [16]      the NF4 or FP4 values
    nested_absmax     fp32 [ceil(blocks / 256)]  (double quantization only)
    nested_quant_map  fp32 [256]     the signed dynamic map (double quantization only)

and the mean offset of the double quantization as the attribute ``offset``. The numerics are
those of :mod:`optim8.kernels.nf4`: ``W = code[c] * absmax`` per block of ``blocksize``
elements (64 by default), about 4.127 bits per weight at blocksize 64 with double quantization.

Forward in ``compute_dtype`` (default: the input's dtype, or the autocast dtype), returned in
the input's dtype: up to 16 tokens an fp32-accumulating GEMV that reads the packed weight
(CUDA), more tokens a matmul against the weight dequantized a tile of rows at a time. Backward
straight-through, ``grad_x = grad @ W``, double backward included; the 4-bit weight takes no
gradient, the bias may train.

The weight is quantized exactly once: by :meth:`Linear4bit.quantize` or
:meth:`Linear4bit.from_linear` (``quantize_model(model, bits=4)``), on the first move of a
float layer to a CUDA device, when a float (``nn.Linear``) state dict is loaded, or at the
first forward.

State dict: bitsandbytes' layout, so checkpoints go both ways without conversion: ``weight``
(the packed codes), ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
``weight.nested_quant_map`` and ``weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``: the
UTF-8 bytes of a JSON object with quant_type, blocksize, dtype, shape, nested_blocksize,
nested_dtype, nested_offset), plus ``bias``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.nf4 import (
    NESTED_BLOCKSIZE,
    QuantState4bit,
    dequantize_4bit,
    linear_4bit,
    pack_json,
    quantize_4bit,
    unpack_json,
    _check_blocksize,
    _check_quant_type,
)
from .linear8bit import prepare_forward

__all__ = ["Linear4bit", "quantize_model_4bit"]

_FLOAT_INPUTS = (torch.float32, torch.float16, torch.bfloat16)
_STATE_BUFFERS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_QS_PREFIX = "quant_state.bitsandbytes__"


class Linear4bit(nn.Linear):
    """``nn.Linear`` with a frozen 4-bit (NF4 or FP4) weight; see the module docstring.

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``; ``dtype`` is the
            float dtype of the weight before quantization and of the bias.
        quant_type: ``"nf4"`` (default) or ``"fp4"``.
        blocksize: weights per absmax (default 64).
        double_quant: quantize the absmaxes to 8 bits as well (default True).
        compute_dtype: dtype of the matmul; ``None`` (default) computes in the input's dtype.

    Attributes:
        weight: float ``[out, in]`` before quantization, packed uint8 ``[ceil(out * in / 2), 1]`` after.
        float_dtype: the float dtype the layer was built in or last cast to (``.half()`` etc.).
        layer_name: the qualified name given by :func:`quantize_model` (for errors).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        _check_quant_type(quant_type)
        _check_blocksize(blocksize)
        if compute_dtype is not None and compute_dtype not in _FLOAT_INPUTS:
            raise TypeError(f"compute_dtype must be float32, float16, bfloat16 or None, got {compute_dtype}")
        self.quant_type = quant_type
        self.blocksize = int(blocksize)
        self.double_quant = bool(double_quant)
        self.compute_dtype = compute_dtype
        self.float_dtype: torch.dtype = self.weight.dtype
        self.offset = 0.0
        self.layer_name: str | None = None
        self.weight.requires_grad_(False)
        for name in _STATE_BUFFERS:
            setattr(self, name, None)

    # ------------------------------------------------------------------ quantization

    @property
    def is_quantized(self) -> bool:
        return self.weight.dtype == torch.uint8

    @property
    def quant_state(self) -> QuantState4bit | None:
        """The scales and maps of the quantized weight (None before quantization)."""
        if not self.is_quantized:
            return None
        return QuantState4bit(
            self.absmax, self.quant_map, self.blocksize, self.quant_type, (self.out_features, self.in_features),
            self.float_dtype, self.nested_absmax, self.nested_quant_map, self.offset,
        )  # fmt: skip

    def _describe(self) -> str:
        name = f" {self.layer_name!r}" if self.layer_name else ""
        return f"Linear4bit{name} (in_features={self.in_features}, out_features={self.out_features})"

    def _set_quantized(self, packed: torch.Tensor, state: QuantState4bit) -> None:
        self.weight = nn.Parameter(packed.reshape(-1, 1), requires_grad=False)
        self.quant_type, self.blocksize, self.offset = state.quant_type, state.blocksize, float(state.offset)
        self.double_quant = state.double_quant
        self.absmax, self.quant_map = state.absmax, state.quant_map.float()
        self.nested_absmax, self.nested_quant_map = state.nested_absmax, state.nested_quant_map

    def _quantized(self, weight: torch.Tensor) -> tuple[torch.Tensor, QuantState4bit]:
        try:
            return quantize_4bit(
                weight.detach(), blocksize=self.blocksize, quant_type=self.quant_type, double_quant=self.double_quant
            )
        except ValueError as error:
            raise ValueError(f"{self._describe()}: cannot quantize its weight: {error}") from None

    @torch.no_grad()
    def quantize(self) -> "Linear4bit":
        """Quantize the float weight in place on its device (no-op when already 4-bit); returns self."""
        if not self.is_quantized:
            self.float_dtype = self.weight.dtype
            self._set_quantized(*self._quantized(self.weight))
        return self

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight ``[out, in]`` (a new tensor), in ``dtype`` (default :attr:`float_dtype`)."""
        dtype = dtype or self.float_dtype
        if not self.is_quantized:
            return self.weight.detach().to(dtype, copy=True)
        return dequantize_4bit(self.weight, self.quant_state, dtype=dtype)

    def nbytes(self) -> int:
        """Bytes of the quantized weight: packed codes, scales and maps (bias not included)."""
        if not self.is_quantized:
            return self.weight.numel() * self.weight.element_size()
        return self.weight.numel() + self.quant_state.nbytes()

    def bits_per_parameter(self) -> float:
        """Storage of the weight per weight element, in bits (scales and maps included)."""
        return 8 * self.nbytes() / max(1, self.in_features * self.out_features)

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> "Linear4bit":
        """A quantized ``Linear4bit`` on ``linear``'s device, its weight quantized, its bias copied."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear takes an nn.Linear, got {type(linear).__name__}")
        has_bias = linear.bias is not None
        source_dtype = linear.float_dtype if isinstance(linear, Linear4bit) else linear.weight.dtype
        layer = cls(
            linear.in_features, linear.out_features, bias=has_bias, quant_type=quant_type, blocksize=blocksize,
            double_quant=double_quant, compute_dtype=compute_dtype, device="meta", dtype=source_dtype,
        )  # fmt: skip
        weight = linear.dequantize(torch.float32) if isinstance(linear, Linear4bit) else linear.weight
        layer.float_dtype = source_dtype
        layer._set_quantized(*layer._quantized(weight))
        if has_bias:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return layer

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prepare_forward(self, x)
        dtype = self.compute_dtype
        if dtype is None:
            device_type = x.device.type
            autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
            dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
        out = linear_4bit(x.reshape(-1, self.in_features).to(dtype), self.weight, self.quant_state, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        state = f"{self.quant_type}" if self.is_quantized else f"{self.weight.dtype}, not quantized yet"
        dq = ", double_quant" if self.double_quant else ""
        return f"{super().extra_repr()}, blocksize={self.blocksize}{dq}, weight={state}"

    # ------------------------------------------------------------------ moves and casts

    def _apply(self, fn, recurse: bool = True):
        device = self.weight.device if self.weight.device.type != "meta" else torch.device("cpu")
        try:
            probe = fn(torch.empty(0, dtype=self.float_dtype, device=device))
        except Exception:  # a conversion we cannot model
            probe = None
        if isinstance(probe, torch.Tensor):
            if not self.is_quantized and probe.device.type == "cuda" and self.weight.device.type != "meta":
                # First arrival on a GPU: quantize there, from the weight in its own dtype.
                with torch.no_grad():
                    self.float_dtype = self.weight.dtype
                    self._set_quantized(*self._quantized(self.weight.detach().to(probe.device)))
            if probe.dtype.is_floating_point:
                self.float_dtype = probe.dtype
        super()._apply(fn, recurse)
        # Scales and maps follow the weight's device and stay fp32 through .half() / .to(dtype).
        target = self.weight.device
        for name in _STATE_BUFFERS:
            t = getattr(self, name)
            if t is not None and t.device != target:
                setattr(self, name, torch.empty_like(t, device=target) if t.is_meta else t.to(target))
        return self

    # ------------------------------------------------------------------ state dict (bitsandbytes' layout)

    def serialized_state(self) -> dict[str, torch.Tensor]:
        """The quantized weight's tensors under bitsandbytes' names (relative to the layer)."""
        state = self.quant_state
        out = {
            "weight": self.weight.detach(),
            "weight.absmax": state.absmax,
            "weight.quant_map": state.quant_map,
        }
        if state.double_quant:
            out["weight.nested_absmax"] = state.nested_absmax
            out["weight.nested_quant_map"] = state.nested_quant_map
        out["weight." + _QS_PREFIX + self.quant_type] = pack_json(state.json_dict())
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.is_quantized:
            for key, value in self.serialized_state().items():
                if key != "weight":
                    destination[prefix + key] = value

    @torch.no_grad()
    def load_serialized(self, weight: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        """Install a bitsandbytes-layout 4-bit weight (``stats``: the ``weight.*`` companions, any prefix).

        Raises ``ValueError`` when they do not describe this layer's ``[out, in]`` weight.
        """
        stats = {key.split("weight.", 1)[-1] if "weight." in key else key: v for key, v in stats.items()}
        qs_keys = [k for k in stats if k.startswith(_QS_PREFIX)]
        if len(qs_keys) != 1:
            raise ValueError(f"expected one weight.{_QS_PREFIX}<nf4|fp4> entry, found {qs_keys or 'none'}")
        meta = unpack_json(stats[qs_keys[0]])
        quant_type = meta.get("quant_type", qs_keys[0][len(_QS_PREFIX) :])
        _check_quant_type(quant_type)
        shape = tuple(meta.get("shape") or ())
        if shape != (self.out_features, self.in_features):
            raise ValueError(f"the checkpoint's 4-bit weight has shape {list(shape)}, the layer {self._describe()}")
        blocksize = int(meta["blocksize"])
        _check_blocksize(blocksize)
        if weight.dtype != torch.uint8:
            raise ValueError(
                f"packed 4-bit weights must be stored as uint8 (bnb_4bit_quant_storage=uint8), got {weight.dtype}"
            )
        n = shape[0] * shape[1]
        nb = (n + blocksize - 1) // blocksize
        if weight.numel() != (n + 1) // 2:
            raise ValueError(f"the packed weight holds {weight.numel()} bytes; shape {list(shape)} needs {(n + 1) // 2}")
        absmax, quant_map = stats.get("absmax"), stats.get("quant_map")
        if absmax is None or quant_map is None or quant_map.numel() != 16:
            raise ValueError("the checkpoint lacks weight.absmax or a 16-entry weight.quant_map")
        if absmax.numel() != nb:
            raise ValueError(f"weight.absmax has {absmax.numel()} entries, blocksize {blocksize} needs {nb}")
        nested = "nested_absmax" in stats
        if nested:
            if int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)) != NESTED_BLOCKSIZE or absmax.dtype != torch.uint8:
                raise ValueError(
                    f"double quantization is read with nested_blocksize {NESTED_BLOCKSIZE} and uint8 absmax codes, got "
                    f"{meta.get('nested_blocksize')} and {absmax.dtype}"
                )
            nmap = stats.get("nested_quant_map")
            if nmap is None or nmap.numel() != 256:
                raise ValueError("the checkpoint lacks a 256-entry weight.nested_quant_map")
        elif absmax.dtype != torch.float32:
            raise ValueError(f"weight.absmax without double quantization must be float32, got {absmax.dtype}")
        device = self.weight.device if self.weight.device.type != "meta" else weight.device
        dtype_name = meta.get("dtype", "float32")
        float_dtype = getattr(torch, dtype_name, None)
        state = QuantState4bit(
            absmax.to(device).contiguous(),
            quant_map.to(device, torch.float32).contiguous(),
            blocksize,
            quant_type,
            shape,
            float_dtype if isinstance(float_dtype, torch.dtype) else torch.float32,
            stats["nested_absmax"].to(device, torch.float32).reshape(-1).contiguous() if nested else None,
            stats["nested_quant_map"].to(device, torch.float32).contiguous() if nested else None,
            float(meta.get("nested_offset", 0.0)) if nested else 0.0,
        )
        self._set_quantized(weight.to(device).reshape(-1, 1).contiguous(), state)
        if state.dtype in _FLOAT_INPUTS:
            self.float_dtype = state.dtype

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        wkey = prefix + "weight"
        where = f"Linear4bit {prefix[:-1]!r}" if prefix else "Linear4bit"
        stats = {k[len(prefix) :]: state_dict.pop(k) for k in list(state_dict) if k.startswith(wkey + ".")}
        weight = state_dict.get(wkey)
        if weight is not None:
            if weight.is_floating_point():
                if tuple(weight.shape) != (self.out_features, self.in_features):
                    error_msgs.append(
                        f"size mismatch for {wkey}: the checkpoint holds shape {tuple(weight.shape)} but {where} "
                        f"expects {(self.out_features, self.in_features)}"
                    )
                    return
                device = weight.device if self.weight.device.type == "meta" else self.weight.device
                try:
                    self.float_dtype = weight.dtype
                    packed, state = self._quantized(weight.detach().to(device))
                except ValueError as error:
                    error_msgs.append(f"{where}: cannot quantize {wkey}: {error}")
                    return
                self._set_quantized(packed, state)
            else:
                try:
                    self.load_serialized(weight, stats)
                except (ValueError, KeyError, TypeError) as error:
                    error_msgs.append(f"{where}: cannot load the 4-bit {wkey}: {error}")
                    return
            state_dict[wkey] = self.weight.detach()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


@torch.no_grad()
def quantize_model_4bit(
    model: nn.Module,
    *,
    skip=("lm_head",),
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """``quantize_model(model, bits=4, ...)``: every ``nn.Linear`` not skipped becomes a :class:`Linear4bit`.

    Same rules as the int8 :func:`~optim8.layers.quantize_model` (skip matching, one layer at a
    time, a module reached under several names converted once).
    """
    from .linear8bit import Linear8bitLt, _skipped

    if isinstance(skip, str):
        skip = (skip,)
    skip = tuple(skip)
    _check_quant_type(quant_type)
    _check_blocksize(blocksize)
    names = [
        name
        for name, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, nn.Linear) and not isinstance(module, (Linear4bit, Linear8bitLt))
    ]
    converted: dict[int, Linear4bit] = {}
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear) or isinstance(module, (Linear4bit, Linear8bitLt)):
            continue
        if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear) or _skipped(name, skip):
            continue
        if not name:
            raise TypeError("quantize_model got an nn.Linear itself; use Linear4bit.from_linear(linear) instead")
        layer = converted.get(id(module))
        if layer is None:
            try:
                layer = Linear4bit.from_linear(
                    module, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                    compute_dtype=compute_dtype,
                )  # fmt: skip
            except ValueError as error:
                raise ValueError(f"quantize_model: layer {name!r}: {error}") from None
            layer.layer_name = name
            layer.train(module.training)
            converted[id(module)] = layer
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
        del module
    return model
