"""Optimizer state in one home: its layout, the per-parameter precision marks, parsing saved state.

Every optim8 optimizer keeps, per parameter, a ``step`` (a Python int) and the state tensors its
update rule names (:class:`StateSlot`: Adam's ``exp_avg`` / ``exp_avg_sq``, SGD's
``momentum_buffer``, Adagrad's ``sum``, ...; torch.optim's names where torch has the optimizer).
A slot holds values of either sign (a momentum: the signed dynamic map) or non-negative values
(a second moment, a sum of squares: the unsigned map, whose positive values never encode to 0).

* 8-bit: ``state[name]`` are uint8 codes shaped like the parameter and ``state[name + "_absmax"]``
  fp32 ``[ceil(numel / blocksize)]`` (a signed slot's absmax is its block's signed extreme).
  Saved by ``state_dict()`` as ``name + "_codes"`` so a torch optimizer never trains on codes.
* 32-bit: ``state[name]`` fp32 shaped like the parameter, whatever the parameter's dtype.

:func:`set_optim_bits` marks parameters for a precision; :func:`mark_embeddings` (and the
parameter-registration hook that ``import optim8`` installs, see :func:`install_embedding_hook`)
marks ``nn.Embedding`` weights, which optimizers give 32-bit state while their
``embedding_bits`` option is 32 (the default).

This module imports neither :mod:`optim8.optimizer` nor :mod:`optim8.distributed`: both import
from it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .kernels.blockwise import dequantize_blockwise

__all__ = [
    "StateSlot", "set_optim_bits", "optim_bits_override", "mark_embeddings", "is_embedding_weight",
    "install_embedding_hook", "is_state8", "gathered_shard_values",
]

_OVERRIDE_ATTR = "_optim8_bits"
_EMBEDDING_ATTR = "_optim8_embedding"
ABSMAX_SUFFIX = "_absmax"
CODES_SUFFIX = "_codes"


@dataclass(frozen=True)
class StateSlot:
    """One state tensor of an update rule: its name and whether its values take either sign."""

    name: str
    signed: bool

    @property
    def absmax(self) -> str:
        return self.name + ABSMAX_SUFFIX

    @property
    def codes(self) -> str:
        return self.name + CODES_SUFFIX


def is_state8(state: dict) -> bool:
    """Whether a parameter's state (in memory or saved) is 8-bit."""
    return any(isinstance(k, str) and k.endswith(ABSMAX_SUFFIX) for k in state)


# ------------------------------------------------------------------ precision marks


def set_optim_bits(target: torch.nn.Module | torch.Tensor | Iterable[torch.Tensor], bits: int | None, *, names: Iterable[str] | None = None) -> None:
    """Fix the optimizer-state precision of chosen parameters, whatever their group says.

    ``target`` is a parameter, an iterable of parameters, or a module (all its parameters,
    or only those whose names, as in ``module.named_parameters()``, are in ``names``).
    ``bits`` is 32 (keep fp32 state), 8 (8-bit state even below ``min_8bit_size``, and for an
    embedding even when the optimizer's ``embedding_bits`` is 32), or ``None`` to remove the
    override. The mark lives on the parameter object and is read when the optimizer creates
    its state (its first step): call it after loading the model and before the first step.
    Example::

        optim8.set_optim_bits(model.get_input_embeddings(), 32)
        opt = optim8.AdamW8bit(model.parameters(), lr=1e-4)
    """
    if bits not in (8, 32, None):
        raise ValueError(f"bits must be 8, 32 or None (remove the override), got {bits!r}")
    if isinstance(target, torch.nn.Module):
        named = dict(target.named_parameters())
        if names is not None:
            names = list(names)
            missing = [n for n in names if n not in named]
            if missing:
                raise ValueError(f"{type(target).__name__} has no parameters named {missing}; it has {sorted(named)}")
            params = [named[n] for n in names]
        else:
            params = list(named.values())
    elif isinstance(target, torch.Tensor):
        params = [target]
    else:
        params = list(target)
    if names is not None and not isinstance(target, torch.nn.Module):
        raise TypeError("names= selects parameters of a module; pass the module as target")
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"set_optim_bits expects parameters (tensors), got {type(p).__name__}")
        if bits is None:
            if hasattr(p, _OVERRIDE_ATTR):
                delattr(p, _OVERRIDE_ATTR)
        else:
            setattr(p, _OVERRIDE_ATTR, bits)


def optim_bits_override(p: torch.Tensor) -> int | None:
    """The bits :func:`set_optim_bits` chose for ``p``, or ``None``."""
    return getattr(p, _OVERRIDE_ATTR, None)


def mark_embeddings(model: torch.nn.Module) -> int:
    """Mark the weight of every ``nn.Embedding`` in ``model`` as an embedding; returns how many.

    ``import optim8`` marks embeddings registered after it by itself (see
    :func:`install_embedding_hook`); call this for a model built before ``import optim8``.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and isinstance(module.weight, torch.Tensor):
            setattr(module.weight, _EMBEDDING_ATTR, True)
            count += 1
    return count


def is_embedding_weight(p: torch.Tensor) -> bool:
    return getattr(p, _EMBEDDING_ATTR, False)


def _on_parameter_registered(module, name, param):
    if param is not None and name == "weight" and isinstance(module, torch.nn.Embedding):
        setattr(param, _EMBEDDING_ATTR, True)
    return None


_hook_handle = None


def install_embedding_hook() -> None:
    """Mark every parameter registered as an ``nn.Embedding``'s ``weight`` from now on (idempotent).

    A global ``torch.nn`` parameter-registration hook: it only sets an attribute on the new
    parameter (``nn.Embedding.__init__``, ``module.weight = Parameter(...)``, and so the
    parameters transformers materializes when it loads a checkpoint). transformers' Trainer
    gives bitsandbytes optimizers 32-bit embedding state by the optimizer class's module name;
    this is how optim8's optimizers get the same without the model in hand.
    """
    global _hook_handle
    if _hook_handle is None:
        _hook_handle = torch.nn.modules.module.register_module_parameter_registration_hook(_on_parameter_registered)


# ------------------------------------------------------------------ saved state


def parse_step(step) -> int:
    if isinstance(step, torch.Tensor):  # torch.optim keeps it as a float tensor
        if step.numel() != 1 or step.is_meta:
            raise ValueError(f"'step' must be a number, got a tensor of shape {tuple(step.shape)} on {step.device}")
        value = step.item()
    elif isinstance(step, (int, float)) and not isinstance(step, bool):
        value = step
    else:
        raise TypeError(f"'step' must be an integer, got {type(step).__name__}")
    if not (math.isfinite(value) and value == int(value) and value >= 0):
        raise ValueError(f"'step' must be an integer >= 0 (the number of steps taken), got {value!r}")
    return int(value)


def check_tensor(t, key: str, dtypes: tuple, shape: tuple | None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"'{key}' must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"'{key}' must be {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(
            f"'{key}' of shape {tuple(t.shape)} does not match the parameter of shape {shape}; was the state dict "
            "saved for another model?"
        )


def check_values(t: torch.Tensor, key: str, *, nonnegative: bool) -> None:
    if t.is_meta or not t.numel():
        return
    bad = ~torch.isfinite(t)
    if nonnegative:
        bad |= t < 0
    if bool(bad.any()):
        what = "finite and >= 0" if nonnegative else "finite"
        raise ValueError(f"'{key}' holds {int(bad.sum())} values that are not {what}: the checkpoint is damaged")


def saved_names(state: dict, slots: tuple[StateSlot, ...]) -> dict:
    """``state`` as saved: 8-bit codes under their own names (torch must never read them as moments)."""
    if not is_state8(state):
        return state
    rename = {s.name: s.codes for s in slots}
    return {rename.get(key, key): value for key, value in state.items()}


def parse_state(
    saved: dict, slots: tuple[StateSlot, ...], shape: tuple, blocksize: int, *, sharded: bool, step_optional: bool = False
) -> tuple[int, dict, bool]:
    """``(step, values, state8)`` of one parameter's saved state, every entry checked.

    ``values[name]`` is ``(codes, absmax)`` for 8-bit state, else the fp tensor. 8-bit codes are
    read under ``name_codes`` (and, optim8 0.1, under ``name`` itself). ``step_optional``: a state
    without ``step`` (torch.optim.SGD keeps none) counts as 1 step taken.
    """
    keys = set(saved)
    names8 = {"step"} | {s.codes for s in slots} | {s.absmax for s in slots}
    names8_old = {"step"} | {s.name for s in slots} | {s.absmax for s in slots}
    names32 = {"step"} | {s.name for s in slots}
    if step_optional and "step" not in keys and keys:
        keys = keys | {"step"}
        saved = dict(saved, step=1)
    if slots and (keys == names8 or keys == names8_old):
        state8 = True
    elif keys == names32:
        state8 = False
    else:
        raise ValueError(
            f"has the entries {sorted(keys)}; this optimizer reads {sorted(names8)} (8-bit state) or {sorted(names32)} "
            "(32-bit state, also torch.optim's)"
        )
    step = parse_step(saved["step"])
    values = {}
    for slot in slots:
        if not state8:
            t = saved[slot.name]
            check_tensor(t, slot.name, (torch.float32, torch.float16, torch.bfloat16, torch.float64), shape)
            check_values(t, slot.name, nonnegative=not slot.signed)
            values[slot.name] = t
            continue
        code_key = slot.codes if keys == names8 else slot.name
        codes, absmax = saved[code_key], saved[slot.absmax]
        check_tensor(codes, code_key, (torch.uint8,), shape)
        check_tensor(absmax, slot.absmax, (torch.float32,), None)
        blocks = (math.prod(shape) + blocksize - 1) // blocksize
        if absmax.dim() != 1 and sharded:
            raise ValueError(f"'{slot.absmax}' has shape {tuple(absmax.shape)}; this rank's shard needs {blocks} blocks")
        if absmax.dim() == 1 and absmax.numel() != blocks:
            raise ValueError(
                f"'{slot.absmax}' has {absmax.numel()} entries; {math.prod(shape)} elements in blocks of "
                f"{blocksize} need {blocks} (was it saved with another blocksize?)"
            )
        check_values(absmax, slot.absmax, nonnegative=not slot.signed)  # a signed slot's absmax is signed
        values[slot.name] = (codes, absmax)
    return step, values, state8


def copy_to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # a copy (never aliased with the caller's dict), contiguous: the CUDA kernels read state as flat arrays
    return t.to(device=device, memory_format=torch.contiguous_format, copy=True)


def slot_values(value, slot: StateSlot, blocksize: int, state8: bool, device: torch.device) -> torch.Tensor:
    """A saved state tensor as a new fp32 tensor on ``device`` (8-bit state dequantized)."""
    if not state8:
        return value.to(device=device, dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)
    codes, absmax = (t.to(device) for t in value)
    if absmax.dim() == 1:
        return dequantize_blockwise(codes, absmax, blocksize=blocksize, signed=slot.signed).contiguous()
    # the gathered (full_state_dict) state of an FSDP2 run: one absmax row per shard
    return gathered_shard_values(codes, absmax, blocksize=blocksize, signed=slot.signed)


def gathered_shard_values(codes: torch.Tensor, absmax: torch.Tensor, *, blocksize: int, signed: bool) -> torch.Tensor:
    """The fp32 values of gathered FSDP2 8-bit state: whole-parameter ``codes``, ``absmax`` one row per shard.

    Shard ``i`` is taken to be ``torch.chunk(p, shards, dim=0)[i]`` (FSDP2's default ``Shard(0)``)
    and its flat elements to be quantized in blocks of ``blocksize`` of their own, its row
    zero-padded past its block count (see :mod:`optim8.distributed`). Raises ``ValueError`` when the
    absmax cannot be that layout (another sharding: resume it on its own mesh instead).
    """
    if absmax.dim() != 2 or codes.dim() == 0:
        raise ValueError(
            f"absmax of shape {tuple(absmax.shape)} for a parameter of shape {tuple(codes.shape)}: only state "
            "sharded over one mesh dimension (FSDP2's Shard(0), HSDP) can be re-blocked; resume it on the mesh it "
            "was saved on"
        )
    shards, capacity = absmax.shape
    rows = codes.shape[0]
    per_row = codes.numel() // rows if rows else 0
    chunk = math.ceil(rows / shards) if rows else 0
    flat = codes.reshape(-1)
    values = torch.empty(codes.numel(), dtype=torch.float32, device=codes.device)
    for i in range(shards):
        start, end = min(i * chunk, rows) * per_row, min((i + 1) * chunk, rows) * per_row
        blocks = math.ceil((end - start) / blocksize)
        if (i == 0 and blocks != capacity) or blocks > capacity or bool((absmax[i, blocks:] != 0).any()):
            raise ValueError(
                f"absmax of shape {tuple(absmax.shape)} does not fit a parameter of shape {tuple(codes.shape)} "
                f"chunked along dim 0 into {shards} shards with blocks of {blocksize}: it was sharded otherwise; "
                "resume it on the mesh it was saved on"
            )
        if end > start:
            values[start:end] = dequantize_blockwise(
                flat[start:end], absmax[i, :blocks].contiguous(), blocksize=blocksize, signed=signed
            )
    return values.view(codes.shape)
