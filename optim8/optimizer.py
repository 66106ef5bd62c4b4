"""The base class of optim8's optimizers and the per-parameter state-precision override.

State layout of one parameter ``p`` (what ``state_dict()`` saves):

* 8-bit: ``exp_avg`` / ``exp_avg_sq`` are uint8 codes shaped like ``p`` (signed / unsigned
  dynamic map), ``exp_avg_absmax`` / ``exp_avg_sq_absmax`` fp32 ``[ceil(numel / blocksize)]``
  (``exp_avg_absmax`` is signed: each block's extreme first moment, see ``kernels/blockwise.py``):
  ``2 + 8 / blocksize`` bytes per parameter (2.03 at the default 256).
* 32-bit: ``exp_avg`` / ``exp_avg_sq`` fp32 shaped like ``p``, whatever ``p``'s dtype
  (bf16 moments would lose most of Adam's second-moment precision).
* ``step``: a Python int (kept on the host, so ``step()`` never reads a device tensor).

A parameter gets 32-bit state when its group (or :func:`set_optim_bits`) says
``optim_bits=32`` or when it has fewer than ``min_8bit_size`` elements (norms and biases:
tiny, and they gain nothing from 8 bits).

State dicts (``state_dict()`` / ``load_state_dict()``):

* 8-bit state is saved under its own names, ``exp_avg_codes`` / ``exp_avg_sq_codes`` (uint8)
  beside ``exp_avg_absmax`` / ``exp_avg_sq_absmax``, so ``torch.optim.AdamW.load_state_dict``
  can never take the codes for moments (its first step then fails with ``KeyError:
  'exp_avg'``). :func:`to_torch_state_dict` converts an optim8 state dict to torch's format.
  In memory (``opt.state[p]``) the codes keep the names ``exp_avg`` / ``exp_avg_sq``.
* :meth:`Optimizer8bit.load_state_dict` checks everything before it changes anything (each
  parameter's keys, dtypes, shapes, absmax length, finite values, ``step`` an integer >= 0,
  the group options); on any error the optimizer is exactly as before. Load pre-hooks and
  post-hooks run as in ``torch.optim``.
* It accepts optim8 state (8-bit or 32-bit, also with the old names ``exp_avg`` /
  ``exp_avg_sq`` for codes) and ``torch.optim.Adam`` / ``AdamW`` state. The checkpoint's
  hyper-parameters (lr, betas, eps, weight_decay, scheduler entries) are loaded; this
  optimizer's own ``optim_bits``, ``min_8bit_size`` and ``blocksize`` are kept, and each
  parameter's state is converted to the precision and block size this optimizer gives it:
  8-bit codes with the same block size are kept byte for byte (so save -> load -> continue
  is bit-identical to the uninterrupted run, across devices), fp32 moments are quantized,
  codes are dequantized to fp32 for 32-bit state or requantized for another block size.
  torch's casts of state to the parameter dtype do not happen: codes stay uint8, absmax
  and 32-bit moments fp32.
* The gathered (``full_state_dict``) state of an FSDP2 run, whose absmax is one row per
  shard, is re-blocked onto this optimizer's layout (see :mod:`optim8.distributed`).
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict, defaultdict
from collections.abc import Iterable
from itertools import chain

import torch

from .distributed import checkpoint_state_dict, gathered_shard_values, is_dtensor, local_tensor, restore_state
from .kernels.adam import STATE_BLOCKSIZES
from .kernels.blockwise import dequantize_blockwise, quantize_blockwise
from .kernels.quant_map import zero_code

__all__ = ["Optimizer8bit", "set_optim_bits", "to_torch_state_dict"]

_OVERRIDE_ATTR = "_optim8_bits"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MOMENTS = ("exp_avg", "exp_avg_sq")  # first moment: signed map; second: unsigned
# state-dict name of each 8-bit code tensor (in memory the codes keep the moment's name)
_CODE_NAMES = {"exp_avg": "exp_avg_codes", "exp_avg_sq": "exp_avg_sq_codes"}
_ABSMAX_NAMES = {"exp_avg": "exp_avg_absmax", "exp_avg_sq": "exp_avg_sq_absmax"}
# group options that describe this optimizer's state layout: a loaded state dict never changes them
_OWN_OPTIONS = ("optim_bits", "min_8bit_size", "blocksize")
# torch.optim.Adam(W) group flags with no meaning here (amsgrad and maximize are refused when set)
_TORCH_FLAGS = ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay")


def set_optim_bits(target: torch.nn.Module | torch.Tensor | Iterable[torch.Tensor], bits: int | None, *, names: Iterable[str] | None = None) -> None:
    """Fix the optimizer-state precision of chosen parameters, whatever their group says.

    ``target`` is a parameter, an iterable of parameters, or a module (all its parameters,
    or only those whose names, as in ``module.named_parameters()``, are in ``names``).
    ``bits`` is 32 (the usual use: keep embeddings at 32-bit state), 8 (8-bit state even
    below ``min_8bit_size``), or ``None`` to remove the override. The mark lives on the
    parameter object and is read when the optimizer creates its state (its first step):
    call it after loading the model and before the first step. Example::

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


class Optimizer8bit(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose per-parameter state is 8-bit or 32-bit (see module doc).

    Subclasses implement :meth:`_update_batch`, which receives every parameter of one group
    that shares device, dtype, state precision and step count, so a CUDA implementation
    can update them in one kernel launch.

    Group options common to all optim8 optimizers: ``optim_bits`` (8 or 32),
    ``min_8bit_size`` (tensors with fewer elements keep 32-bit state) and ``blocksize``
    (elements per absmax block: 64, 128 or 256).
    """

    def __init__(self, params, defaults: dict, *, optim_bits: int = 8, min_8bit_size: int = 4096, blocksize: int = 256):
        defaults = dict(defaults, optim_bits=optim_bits, min_8bit_size=min_8bit_size, blocksize=blocksize)
        self._check_group_options(defaults)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ validation

    @staticmethod
    def _check_group_options(group: dict) -> None:
        if group["optim_bits"] not in (8, 32):
            raise ValueError(f"optim_bits must be 8 or 32, got {group['optim_bits']!r}")
        size = group["min_8bit_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"min_8bit_size must be an int >= 0, got {size!r}")
        if group["blocksize"] not in STATE_BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {STATE_BLOCKSIZES}, got {group['blocksize']!r}")

    def add_param_group(self, param_group: dict) -> None:
        # All or nothing: a group refused here must not stay behind (torch appends it first).
        count = len(self.param_groups)
        super().add_param_group(param_group)
        try:
            group = self.param_groups[-1]
            self._check_group_options(group)
            self._check_hyperparameters(group)
            for p in group["params"]:
                if p.dtype not in _FLOAT_DTYPES:
                    raise TypeError(
                        f"{type(self).__name__} updates float32, float16 or bfloat16 parameters; got one of dtype "
                        f"{p.dtype} and shape {tuple(p.shape)}. Leave it out of the optimizer or convert it."
                    )
        except BaseException:
            del self.param_groups[count:]
            raise

    def _check_hyperparameters(self, group: dict) -> None:
        """Validate a group's hyper-parameters (subclasses); raise ValueError naming the bad one."""

    # ------------------------------------------------------------------ state

    def _wants_8bit(self, p: torch.Tensor, group: dict) -> bool:
        bits = optim_bits_override(p)
        if bits is not None:
            return bits == 8
        return group["optim_bits"] == 8 and p.numel() >= group["min_8bit_size"]

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        state["step"] = 0
        wants_8bit = self._wants_8bit(p, group)  # by the global size, so every rank decides alike
        p = local_tensor(p)  # a DTensor (FSDP2) parameter: state covers this rank's shard only
        if wants_8bit:
            nb = (p.numel() + group["blocksize"] - 1) // group["blocksize"]
            state["exp_avg"] = torch.full(p.shape, zero_code(True), dtype=torch.uint8, device=p.device)
            state["exp_avg_absmax"] = torch.zeros(nb, dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.full(p.shape, zero_code(False), dtype=torch.uint8, device=p.device)
            state["exp_avg_sq_absmax"] = torch.zeros(nb, dtype=torch.float32, device=p.device)
        else:
            state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        return state

    def state_bytes(self) -> int:
        """Bytes of optimizer state held now (moments and absmax; the step counters not counted)."""
        return sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values() if isinstance(t, torch.Tensor))

    def state_dict(self) -> dict:
        """The state dict in optim8's format (see the module docstring); state_dict post-hooks see that format."""
        hooks = self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_post_hooks = OrderedDict()
        try:
            state_dict = super().state_dict()
        finally:
            self._optimizer_state_dict_post_hooks = hooks
        # DTensor (FSDP2) parameters: shard-shaped state as DTensors for torch.distributed.checkpoint
        state_dict = checkpoint_state_dict(self, state_dict)
        state_dict["state"] = {index: _saved_names(state) for index, state in state_dict["state"].items()}
        for hook in hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load optim8 or ``torch.optim.Adam(W)`` state, converted to this optimizer's layout (module docstring).

        Everything is checked before anything changes: on an error the optimizer is as before.
        """
        state_dict = state_dict.copy()  # shallow, as torch does; pre-hooks may edit or replace it
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        state, param_groups = self._loaded(state_dict)
        self.__setstate__({"state": state, "param_groups": param_groups})
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _loaded(self, state_dict) -> tuple[defaultdict, list]:
        """The state and param groups ``state_dict`` gives this optimizer; raises before anything is changed."""
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            got = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"an optimizer state dict has the keys 'state' and 'param_groups'; got {got}")
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, this optimizer {len(self.param_groups)}"
            )
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"loaded state dict's parameter group {i} has {len(saved['params'])} parameters, this "
                    f"optimizer's {len(group['params'])}; was it saved for another model or another grouping?"
                )
        param_groups = [
            self._loaded_group(i, group, saved) for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups))
        ]
        where = {}  # saved parameter id -> (parameter, its new group, its saved group)
        for new, saved in zip(param_groups, saved_groups):
            for pid, p in zip(saved["params"], new["params"]):
                where[pid] = (p, new, saved)
        state = defaultdict(dict)
        for pid, saved in saved_state.items():
            if pid not in where:
                raise ValueError(f"loaded state dict has state for parameter {pid!r}, which none of its param_groups lists")
            p, group, saved_group = where[pid]
            try:
                state[p] = self._loaded_state(p, group, saved_group, saved)
            except (ValueError, TypeError) as error:
                raise type(error)(f"optimizer state of parameter {pid!r} (shape {tuple(p.shape)}): {error}") from None
        return state, param_groups

    def _loaded_group(self, index: int, group: dict, saved: dict) -> dict:
        """A new group: ``saved``'s hyper-parameters, this optimizer's own layout options, ``group``'s params."""
        for flag in ("amsgrad", "maximize"):
            if saved.get(flag):
                raise ValueError(
                    f"loaded state dict's parameter group {index} has {flag}=True, which {type(self).__name__} "
                    "does not implement; keep training it with torch.optim"
                )
        new = copy.deepcopy({k: v for k, v in saved.items() if k != "params" and k not in _TORCH_FLAGS})
        for key, value in group.items():
            if key in _OWN_OPTIONS or key not in new:
                new[key] = value  # this optimizer's layout; options the checkpoint lacks keep their value
        new["params"] = group["params"]
        if isinstance(new.get("betas"), list):
            new["betas"] = tuple(new["betas"])
        try:
            self._check_group_options(new)
            self._check_hyperparameters(new)
        except (ValueError, TypeError) as error:
            raise type(error)(f"loaded state dict's parameter group {index}: {error}") from None
        return new

    def _loaded_state(self, p: torch.Tensor, group: dict, saved_group: dict, saved: dict) -> dict:
        """``p``'s new state from its saved state, in the precision and block size this optimizer gives ``p``."""
        if not isinstance(saved, dict):
            raise TypeError(f"expected a dict of state tensors, got {type(saved).__name__}")
        local = local_tensor(p)
        blocksize = saved_group.get("blocksize", group["blocksize"])
        if blocksize not in STATE_BLOCKSIZES:
            raise ValueError(f"its group's blocksize is {blocksize!r}; optim8 writes one of {STATE_BLOCKSIZES}")
        saved = restore_state(p, saved, blocksize=blocksize)  # DTensor state (FSDP2) -> this rank's shard
        step, moments, state8 = _parse_state(saved, tuple(local.shape), blocksize, sharded=is_dtensor(p))
        device = local.device
        new = {"step": step}
        if self._wants_8bit(p, group):
            if state8 and moments["exp_avg"][1].dim() == 1 and blocksize == group["blocksize"]:
                # this optimizer's own layout: the bytes as saved (bit-exact resume)
                for name, (codes, absmax) in moments.items():
                    new[name] = _copy_to(codes, device)
                    new[_ABSMAX_NAMES[name]] = _copy_to(absmax, device)
            else:
                for name in _MOMENTS:
                    values = _moment_values(moments[name], name, blocksize, state8, device)
                    codes, absmax = quantize_blockwise(values, blocksize=group["blocksize"], signed=name == "exp_avg")
                    new[name] = codes.contiguous()
                    new[_ABSMAX_NAMES[name]] = absmax.contiguous()
        else:
            for name in _MOMENTS:
                new[name] = _moment_values(moments[name], name, blocksize, state8, device)
        return new

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss.

        All or nothing: gradients and hyper-parameters of every group are checked before any
        parameter, moment or step counter changes, so a step that raises leaves no trace.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for group in self.param_groups:
            # LR schedulers may set a new lr (or betas) between steps: re-check what the update gets.
            self._check_hyperparameters(group)
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                self._check_grad(p)
            self._check_step(group, params)
            work.append((group, params))
        created = []
        try:
            for group, params in work:
                batches: dict[tuple, list] = {}
                for p in params:
                    state = self.state[p]
                    if not state:
                        state = self._init_state(p, group)
                        created.append(p)
                    key = (p.device, p.dtype, "exp_avg_absmax" in state, state["step"] + 1)
                    batches.setdefault(key, []).append((local_tensor(p), local_tensor(p.grad), state))
                for (device, _, state8, step), batch in batches.items():
                    if device.type != "meta":  # meta tensors hold no values: only the count advances, as in torch
                        self._update_batch(group, batch, state8=state8, step=step)
                    for _, _, state in batch:
                        state["step"] = step
        except BaseException:
            for p in created:  # state created for a step that did not happen
                if self.state[p].get("step") == 0:
                    del self.state[p]
            raise
        return loss

    def _check_grad(self, p: torch.Tensor) -> None:
        g = p.grad
        if g.is_sparse:
            raise RuntimeError(
                f"{type(self).__name__} does not support sparse gradients (parameter of shape "
                f"{tuple(p.shape)}); use nn.Embedding(sparse=False) or torch.optim.SparseAdam"
            )
        if g.dtype != p.dtype:
            raise TypeError(f"gradient dtype {g.dtype} differs from its parameter's dtype {p.dtype}")
        if g.shape != p.shape:
            raise ValueError(f"gradient of shape {tuple(g.shape)} does not match its parameter's shape {tuple(p.shape)}")

    def _check_step(self, group: dict, params: list) -> None:
        """Checks of one group before a step that need its parameters (subclasses); raise to refuse the step."""

    def _update_batch(self, group: dict, batch: list, *, state8: bool, step: int) -> None:
        """Update ``batch`` (``(param, grad, state)`` triples) in place; see the class docstring."""
        raise NotImplementedError


# ---------------------------------------------------------------------- state-dict formats


def _saved_names(state: dict) -> dict:
    """``state`` as saved: 8-bit codes under their own names (torch must never read them as moments)."""
    if "exp_avg_absmax" not in state:
        return state
    return {_CODE_NAMES.get(key, key): value for key, value in state.items()}


def _parse_step(step) -> int:
    if isinstance(step, torch.Tensor):  # torch.optim.Adam(W) keeps it as a float tensor
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


def _check_tensor(t, key: str, dtypes: tuple, shape: tuple | None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"'{key}' must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"'{key}' must be {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(
            f"'{key}' of shape {tuple(t.shape)} does not match the parameter of shape {shape}; was the state dict "
            "saved for another model?"
        )


def _check_values(t: torch.Tensor, key: str, *, nonnegative: bool) -> None:
    if t.is_meta or not t.numel():
        return
    bad = ~torch.isfinite(t)
    if nonnegative:
        bad |= t < 0
    if bool(bad.any()):
        what = "finite and >= 0" if nonnegative else "finite"
        raise ValueError(f"'{key}' holds {int(bad.sum())} values that are not {what}: the checkpoint is damaged")


def _parse_state(saved: dict, shape: tuple, blocksize: int, *, sharded: bool) -> tuple[int, dict, bool]:
    """``(step, moments, state8)`` of one parameter's saved state, every entry checked.

    ``moments[name]`` is ``(codes, absmax)`` for 8-bit state, else the moment tensor.
    """
    keys = set(saved)
    names8 = {"step"} | set(_CODE_NAMES.values()) | set(_ABSMAX_NAMES.values())
    names8_old = {"step"} | set(_MOMENTS) | set(_ABSMAX_NAMES.values())  # optim8 0.1: codes under the moment names
    names32 = {"step"} | set(_MOMENTS)
    if keys == names8 or keys == names8_old:
        state8 = True
    elif keys == names32:
        state8 = False
    else:
        raise ValueError(
            f"has the entries {sorted(keys)}; optim8 reads {sorted(names8)} (8-bit state) or {sorted(names32)} "
            "(32-bit state, also torch.optim.Adam/AdamW's)"
        )
    step = _parse_step(saved["step"])
    moments = {}
    for name in _MOMENTS:
        if not state8:
            t = saved[name]
            _check_tensor(t, name, (torch.float32, torch.float16, torch.bfloat16, torch.float64), shape)
            _check_values(t, name, nonnegative=name == "exp_avg_sq")
            moments[name] = t
            continue
        code_key = _CODE_NAMES[name] if keys == names8 else name
        codes, absmax = saved[code_key], saved[_ABSMAX_NAMES[name]]
        _check_tensor(codes, code_key, (torch.uint8,), shape)
        _check_tensor(absmax, _ABSMAX_NAMES[name], (torch.float32,), None)
        blocks = (math.prod(shape) + blocksize - 1) // blocksize
        if absmax.dim() != 1 and sharded:
            raise ValueError(f"'{_ABSMAX_NAMES[name]}' has shape {tuple(absmax.shape)}; this rank's shard needs {blocks} blocks")
        if absmax.dim() == 1 and absmax.numel() != blocks:
            raise ValueError(
                f"'{_ABSMAX_NAMES[name]}' has {absmax.numel()} entries; {math.prod(shape)} elements in blocks of "
                f"{blocksize} need {blocks} (was it saved with another blocksize?)"
            )
        _check_values(absmax, _ABSMAX_NAMES[name], nonnegative=name == "exp_avg_sq")  # exp_avg_absmax is signed
        moments[name] = (codes, absmax)
    return step, moments, state8


def _copy_to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # a copy (never aliased with the caller's dict), contiguous: the CUDA kernel reads state as flat arrays
    return t.to(device=device, memory_format=torch.contiguous_format, copy=True)


def _moment_values(moment, name: str, blocksize: int, state8: bool, device: torch.device) -> torch.Tensor:
    """A saved moment as a new fp32 tensor on ``device`` (8-bit state dequantized)."""
    if not state8:
        return moment.to(device=device, dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)
    codes, absmax = (t.to(device) for t in moment)
    signed = name == "exp_avg"
    if absmax.dim() == 1:
        return dequantize_blockwise(codes, absmax, blocksize=blocksize, signed=signed).contiguous()
    # the gathered (full_state_dict) state of an FSDP2 run: one absmax row per shard
    return gathered_shard_values(codes, absmax, blocksize=blocksize, signed=signed)


_TORCH_GROUP_DEFAULTS = {
    "amsgrad": False, "maximize": False, "foreach": None, "capturable": False, "differentiable": False, "fused": None,
}


def to_torch_state_dict(source, *, decoupled_weight_decay: bool | None = None) -> dict:
    """An optim8 optimizer's state (the optimizer or its ``state_dict()``) in ``torch.optim.Adam``/``AdamW``'s format.

    8-bit moments are dequantized to fp32 (``map[code] * absmax``, what the next optim8 step
    would read), 32-bit moments copied, ``step`` becomes torch's float32 tensor; the groups
    lose ``optim_bits``, ``min_8bit_size`` and ``blocksize`` and get torch's flags. The gathered
    ``full_state_dict`` of an FSDP2 run converts too. Example::

        torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        torch_opt.load_state_dict(optim8.to_torch_state_dict(opt))

    ``decoupled_weight_decay`` is taken from the optimizer (True for the AdamW classes); for a
    state dict pass it (True: AdamW): torch's loader would otherwise set a missing flag to False
    and train an AdamW state as Adam with an L2 penalty.
    """
    if isinstance(source, Optimizer8bit):
        if decoupled_weight_decay is None:
            decoupled_weight_decay = getattr(source, "decoupled_weight_decay", None)
        source = source.state_dict()
    if not isinstance(source, dict) or not {"state", "param_groups"} <= source.keys():
        raise TypeError("to_torch_state_dict takes an optim8 optimizer or its state_dict()")
    blocksize_of, groups = {}, []
    for group in source["param_groups"]:
        new = {k: copy.deepcopy(v) for k, v in group.items() if k not in _OWN_OPTIONS}
        for key, value in _TORCH_GROUP_DEFAULTS.items():
            new.setdefault(key, value)
        if decoupled_weight_decay is not None:
            new["decoupled_weight_decay"] = bool(decoupled_weight_decay)
        elif "decoupled_weight_decay" not in new:
            raise TypeError(
                "to_torch_state_dict of a state dict needs decoupled_weight_decay= (True for AdamW8bit/AdamW32bit "
                "state, False for Adam8bit/Adam32bit)"
            )
        groups.append(new)
        for pid in group["params"]:
            blocksize_of[pid] = group.get("blocksize", 256)
    state = {}
    for pid, saved in source["state"].items():
        if any(is_dtensor(t) for t in saved.values()):
            raise ValueError(
                "to_torch_state_dict got DTensor (sharded) state: gather it first with "
                "get_optimizer_state_dict(..., options=StateDictOptions(full_state_dict=True))"
            )
        codes = next((t for k, t in saved.items() if k != "step" and isinstance(t, torch.Tensor)), None)
        shape = tuple(codes.shape) if codes is not None else ()
        try:
            step, moments, state8 = _parse_state(saved, shape, blocksize_of.get(pid, 256), sharded=False)
        except (ValueError, TypeError) as error:
            raise type(error)(f"optimizer state of parameter {pid!r}: {error}") from None
        new = {"step": torch.tensor(float(step), dtype=torch.float32)}
        for name in _MOMENTS:
            new[name] = _moment_values(moments[name], name, blocksize_of.get(pid, 256), state8, codes.device)
        state[pid] = new
    return {"state": state, "param_groups": groups}
