"""LLM.int8() linear layers: frozen row-wise int8 weights, mixed int8/float forward, straight-through backward.

``Linear8bitLt`` is an ``nn.Linear`` whose ``weight`` becomes an int8 ``nn.Parameter``
(``requires_grad=False``) with one fp32 scale per output row in the buffer ``SCB``::

    W ~= weight.float() * SCB[:, None]        SCB = row absmax / 127

(bitsandbytes stores the absmax itself; optim8 stores the scale.) The numerics of the
forward and backward are those of :mod:`optim8.kernels.int8`; in short, for ``M`` token rows:

* ``M <= 16`` (decoding): weight-only int8, ``x @ (q * SCB)^T + bias`` with fp32 accumulation;
* otherwise the mixed decomposition: input columns with any ``|x| >= threshold`` (at most 256,
  the first in column order) multiply the matching weight columns in fp32, the rest is
  quantized row-wise to int8 and multiplied int8 x int8 -> int32, and the two parts are summed
  after dequantization, plus the bias, in fp32, then rounded once to x's dtype.
  ``threshold=0`` turns the decomposition off.

Inputs may be fp32, fp16 or bf16 with any number of leading dimensions; the layer computes in
the input's dtype (under ``torch.autocast``, in the autocast dtype). The backward is
straight-through: ``grad_x = grad_out @ dequantize(W)``, with the dequantized weight a
temporary of the backward call; the int8 weight and ``SCB`` take no gradient, the bias may
train. Nothing but the (already resident) weight and scales is saved for the backward.

When the weight is quantized (exactly once; later moves never re-quantize):

* explicitly, by :meth:`Linear8bitLt.quantize`, :meth:`Linear8bitLt.from_linear` or
  :func:`quantize_model`;
* when the layer is first converted with its weight ending on a CUDA device (``.cuda()``,
  ``.to("cuda")``, ...); the weight is moved in its own dtype and quantized there;
* loading a floating-point (``nn.Linear``) state dict;
* at the first forward of a layer still holding its float weight.

``.half()``, ``.to(torch.bfloat16)`` etc. never touch the int8 weight or ``SCB`` (which stays
fp32); they cast the bias and set :attr:`compute_dtype`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..kernels.int8 import dequantize_rowwise, int8_linear, quantize_rowwise

__all__ = ["Linear8bitLt", "quantize_model"]

_FLOAT_INPUTS = (torch.float32, torch.float16, torch.bfloat16)


class Linear8bitLt(nn.Linear):
    """``nn.Linear`` with an int8 weight (LLM.int8()); see the module docstring for the numerics.

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``; ``dtype`` is the
            float dtype of the weight before quantization and of the bias.
        threshold: activation magnitude at and above which an input column is kept in float
            (default 6.0, LLM.int8()'s); 0 disables the decomposition.

    Attributes:
        weight: ``nn.Parameter`` (never trainable): float before quantization, int8 ``[out, in]`` after.
        SCB: fp32 buffer ``[out]``, the row scales (meaningless before quantization).
        compute_dtype: the float dtype the layer was built in or last cast to (``.half()`` etc.).
        layer_name: the module's qualified name when :func:`quantize_model` made it (for errors).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        threshold: float = 6.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.threshold = _check_threshold(threshold)
        self.weight.requires_grad_(False)
        self.register_buffer("SCB", torch.zeros(out_features, dtype=torch.float32, device=self.weight.device))
        self.compute_dtype: torch.dtype = self.weight.dtype
        self.layer_name: str | None = None

    # ------------------------------------------------------------------ quantization

    @property
    def is_quantized(self) -> bool:
        return self.weight.dtype == torch.int8

    def _describe(self) -> str:
        name = f" {self.layer_name!r}" if self.layer_name else ""
        return f"Linear8bitLt{name} (in_features={self.in_features}, out_features={self.out_features})"

    def _quantized(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return quantize_rowwise(weight.detach())
        except ValueError as error:
            raise ValueError(
                f"{self._describe()}: cannot quantize its weight: {error}. Check the checkpoint or the "
                "training run that produced it."
            ) from None

    def _set_quantized(self, q: torch.Tensor, scb: torch.Tensor) -> None:
        self.weight = nn.Parameter(q, requires_grad=False)
        self.SCB = scb

    @torch.no_grad()
    def quantize(self) -> "Linear8bitLt":
        """Quantize the float weight in place on its device (no-op when already int8); returns self."""
        if not self.is_quantized:
            if self.weight.is_floating_point():
                self.compute_dtype = self.weight.dtype
            self._set_quantized(*self._quantized(self.weight))
        return self

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The floating weight ``[out, in]``: ``weight * SCB[:, None]`` in fp32, rounded once to ``dtype``.

        ``dtype`` defaults to :attr:`compute_dtype`. Returns a new tensor (a copy of the float
        weight when the layer is not quantized yet).
        """
        dtype = dtype or self.compute_dtype
        if not self.is_quantized:
            return self.weight.detach().to(dtype, copy=True)
        return dequantize_rowwise(self.weight, self.SCB, dtype=dtype)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, *, threshold: float = 6.0) -> "Linear8bitLt":
        """A quantized ``Linear8bitLt`` on ``linear``'s device with its weight quantized and its bias copied.

        Works on meta tensors (the result holds meta int8 weights and scales, to be filled by
        ``load_state_dict``). A ``Linear8bitLt`` is returned as a quantized copy with the new threshold.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear takes an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight
        has_bias = linear.bias is not None
        dtype = linear.compute_dtype if isinstance(linear, Linear8bitLt) else weight.dtype
        layer = cls(
            linear.in_features, linear.out_features, bias=has_bias, threshold=threshold, device="meta", dtype=dtype
        )
        if isinstance(linear, Linear8bitLt):
            layer.compute_dtype = linear.compute_dtype
            layer.layer_name = linear.layer_name
            if linear.is_quantized:
                layer._set_quantized(weight.detach().clone(), linear.SCB.clone())
            else:
                layer._set_quantized(*layer._quantized(weight))
        else:
            layer._set_quantized(*layer._quantized(weight))
        if has_bias:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return layer

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prepare_forward(self, x)
        device_type = x.device.type
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            x = x.to(torch.get_autocast_dtype(device_type))
        # explicit row count: reshape(-1, 0) cannot infer it (in_features=0 works as in nn.Linear)
        rows = math.prod(x.shape[:-1])
        out = int8_linear(x.reshape(rows, self.in_features), self.weight, self.SCB, self.bias, threshold=self.threshold)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        state = "int8" if self.is_quantized else f"{self.weight.dtype}, not quantized yet"
        return f"{super().extra_repr()}, threshold={self.threshold}, weight={state}"

    # ------------------------------------------------------------------ moves and casts

    def _target(self, fn) -> tuple[torch.device, torch.dtype] | None:
        """Where ``fn`` (an ``_apply`` conversion) sends a float tensor: (device, dtype), or None if unknown."""
        device = self.weight.device if self.weight.device.type != "meta" else torch.device("cpu")
        try:
            probe = fn(torch.empty(0, dtype=self.compute_dtype, device=device))
        except Exception:  # a conversion we cannot model: leave quantization to the caller
            return None
        if not isinstance(probe, torch.Tensor):
            return None
        return probe.device, probe.dtype

    def _apply(self, fn, recurse: bool = True):
        target = self._target(fn)
        if target is not None and not self.is_quantized and target[0].type == "cuda":
            # First arrival on a GPU: quantize there, from the weight in its own dtype (a
            # simultaneous cast such as .to("cuda", torch.float16) must not round it first).
            with torch.no_grad():
                weight = self.weight
                if weight.device.type == "meta":
                    # Only to_empty() may take a meta tensor to a device (storage, no values);
                    # .cuda() / .to("cuda") must fail as for nn.Linear, not install garbage.
                    try:
                        fn(torch.empty(0, device="meta"))
                    except NotImplementedError:
                        raise NotImplementedError(
                            f"{self._describe()} is on the meta device and holds no values to move: use "
                            "to_empty(device=...) and then load its weights"
                        ) from None
                    q = torch.empty(weight.shape, dtype=torch.int8, device=target[0])
                    scb = torch.empty(self.out_features, dtype=torch.float32, device=target[0])
                else:
                    q, scb = self._quantized(weight.detach().to(target[0]))
                self._set_quantized(q, scb)
        if target is not None and target[1].is_floating_point:
            self.compute_dtype = target[1]
        # SCB must stay fp32 through .half() / .to(dtype): it is moved, never cast. (The int8
        # weight is safe already: module casts touch floating-point tensors only.)
        scb = self._buffers.pop("SCB", None)
        try:
            super()._apply(fn, recurse)
        finally:
            if scb is not None:
                device = self.weight.device
                if scb.device != device:
                    scb = torch.empty_like(scb, device=device) if scb.is_meta else scb.to(device)
                self._buffers["SCB"] = scb
        return self

    # ------------------------------------------------------------------ state dict

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        wkey, skey = prefix + "weight", prefix + "SCB"
        name = prefix[:-1] if prefix else (self.layer_name or "")
        where = f"Linear8bitLt {name!r}" if name else "Linear8bitLt"
        expected = (self.out_features, self.in_features)
        weight = state_dict.get(wkey)
        if weight is not None:
            if tuple(weight.shape) != expected:
                error_msgs.append(
                    f"size mismatch for {wkey}: the checkpoint holds shape {tuple(weight.shape)} but {where} "
                    f"(in_features={self.in_features}, out_features={self.out_features}) expects {expected}"
                )
                return
            bias = state_dict.get(prefix + "bias")
            if bias is not None and self.bias is not None and tuple(bias.shape) != (self.out_features,):
                # refused before the weight loads: a layer never holds half of a checkpoint
                error_msgs.append(
                    f"size mismatch for {prefix}bias: the checkpoint holds shape {tuple(bias.shape)} but {where} "
                    f"expects ({self.out_features},)"
                )
                return
            if weight.is_floating_point():
                # An nn.Linear (float) checkpoint: quantize it, on this layer's device unless
                # the layer is still on the meta device.
                device = weight.device if self.weight.device.type == "meta" else self.weight.device
                try:
                    q, scb = quantize_rowwise(weight.detach().to(device))
                except ValueError as error:
                    error_msgs.append(f"{where}: cannot quantize {wkey}: {error}")
                    return
                if weight.dtype in _FLOAT_INPUTS:
                    self.compute_dtype = weight.dtype
                state_dict[wkey], state_dict[skey] = q, scb
            elif weight.dtype == torch.int8:
                scb = state_dict.get(skey)
                if scb is None:
                    error_msgs.append(f"{where}: {wkey} is int8 but the checkpoint has no {skey} (its row scales)")
                    return
                if tuple(scb.shape) != (self.out_features,) or scb.dtype != torch.float32:
                    error_msgs.append(
                        f"{where}: {skey} must be float32 of shape ({self.out_features},), got {scb.dtype} "
                        f"of shape {tuple(scb.shape)}"
                    )
                    return
                bad = _bad_scales(scb)
                if bad:
                    error_msgs.append(
                        f"{where}: {skey} holds {bad} row scales that are NaN, infinite or negative: the checkpoint "
                        "is damaged (scales are finite and >= 0; 0 for an all-zero row)"
                    )
                    return
            else:
                error_msgs.append(f"{where}: {wkey} must be int8 or floating point, got {weight.dtype}")
                return
            if not self.is_quantized:
                # Receive the codes in an int8 parameter: copy_ into a float one would cast them.
                self.weight = nn.Parameter(
                    torch.empty(expected, dtype=torch.int8, device=self.weight.device), requires_grad=False
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def prepare_forward(layer: nn.Module, x) -> None:
    """The input checks of a quantized layer's forward (Linear8bitLt, Linear4bit); quantizes a layer not quantized yet."""
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_INPUTS:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(
            f"{layer._describe()} takes float32, float16 or bfloat16 input, got {got}; "
            "convert it first (e.g. x.to(torch.bfloat16))"
        )
    if x.dim() == 0 or x.shape[-1] != layer.in_features:
        raise ValueError(
            f"{layer._describe()} got input of shape {tuple(x.shape)}: its last dimension must be "
            f"in_features={layer.in_features}"
        )
    if not layer.is_quantized:
        if layer.weight.device.type == "meta":
            raise RuntimeError(f"{layer._describe()} is on the meta device: load its weights first")
        layer.quantize()
    if x.device != layer.weight.device:
        raise RuntimeError(
            f"{layer._describe()} holds its weight on {layer.weight.device} but got input on {x.device}; "
            "move the model or the input"
        )


def _bad_scales(scb: torch.Tensor) -> int:
    """How many row scales are NaN, infinite or negative (0 on the meta device: nothing to read)."""
    if scb.is_meta or not scb.numel():
        return 0
    return int((~(torch.isfinite(scb) & (scb >= 0))).sum())


def check_scales(layer: "Linear8bitLt", name: str = "") -> None:
    """Raise ``ValueError`` unless a quantized layer's ``SCB`` is fp32 ``[out_features]``, finite and >= 0."""
    if not layer.is_quantized:
        return
    where = f"Linear8bitLt {name or layer.layer_name or ''!r}"
    scb = layer.SCB
    if scb.dtype != torch.float32 or tuple(scb.shape) != (layer.out_features,):
        raise ValueError(f"{where}: SCB must be float32 of shape ({layer.out_features},), got {scb.dtype} {tuple(scb.shape)}")
    bad = _bad_scales(scb)
    if bad:
        raise ValueError(
            f"{where}: SCB holds {bad} row scales that are NaN, infinite or negative: the checkpoint is damaged"
        )


def _check_threshold(threshold) -> float:
    threshold = float(threshold)
    if math.isnan(threshold) or threshold < 0:
        raise ValueError(f"threshold must be >= 0 (0 or inf turn outlier columns off), got {threshold}")
    return threshold


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    """``name`` matches an entry of ``skip`` when the entry's dotted components occur contiguously in it."""
    parts = name.split(".")
    for entry in skip:
        want = entry.split(".")
        if any(parts[i : i + len(want)] == want for i in range(len(parts) - len(want) + 1)):
            return True
    return False


@torch.no_grad()
def quantize_model(
    model: nn.Module, *, bits: int = 8, threshold: float = 6.0, skip=("lm_head",), **four_bit
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` by a quantized :class:`Linear8bitLt`, in place; returns ``model``.

    ``bits=4`` makes :class:`~optim8.layers.Linear4bit` layers instead (QLoRA), with the keywords
    ``quant_type`` ("nf4"/"fp4"), ``blocksize``, ``double_quant`` and ``compute_dtype``; ``threshold``
    does not apply to them.

    Layers are swapped one at a time and each float weight is released as soon as its int8
    copy exists, so peak memory is the model plus one layer's fp32 temporary. A module reached
    under several names is converted once. Meta-device models get meta int8 weights and scales,
    to be filled by ``load_state_dict`` (int8 or float checkpoints) or ``to_empty``.

    Args:
        threshold: outlier threshold of every new layer (see :class:`Linear8bitLt`).
        skip: module names to keep in float; an entry matches a module whose dotted name
            contains the entry's components contiguously ("lm_head" matches "lm_head" and
            "model.lm_head"; "mlp.down_proj" matches "layers.3.mlp.down_proj").

    ``nn.MultiheadAttention``'s output projection is kept in float: the attention reads its
    weight directly instead of calling it.
    """
    if bits == 4:
        from .linear4bit import quantize_model_4bit

        return quantize_model_4bit(model, skip=skip, **four_bit)
    if bits != 8:
        raise ValueError(f"quantize_model: bits must be 8 (LLM.int8()) or 4 (NF4/FP4), got {bits!r}")
    if four_bit:
        raise TypeError(f"quantize_model: {sorted(four_bit)} apply to bits=4 only")
    if isinstance(skip, str):
        skip = (skip,)
    skip = tuple(skip)
    threshold = _check_threshold(threshold)
    # Names only: a list of (name, module) pairs would keep every float layer alive to the end.
    names = [
        name
        for name, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, nn.Linear) and not isinstance(module, Linear8bitLt)
    ]
    converted: dict[int, Linear8bitLt] = {}
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear) or isinstance(module, Linear8bitLt):
            continue
        if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear) or _skipped(name, skip):
            continue
        if not name:
            raise TypeError("quantize_model got an nn.Linear itself; use Linear8bitLt.from_linear(linear) instead")
        # A module reached under several names is converted once (ids stay valid: it is alive
        # until its last parent has been switched over).
        layer = converted.get(id(module))
        if layer is None:
            try:
                layer = Linear8bitLt.from_linear(module, threshold=threshold)
            except ValueError as error:
                raise ValueError(f"quantize_model: layer {name!r}: {error}") from None
            layer.layer_name = name
            layer.train(module.training)
            converted[id(module)] = layer
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
        # The parent held the only reference to the float layer (as a rule): it is freed here,
        # before the next layer is quantized.
        del module
    return model
