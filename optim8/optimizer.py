"""The base class of optim8's optimizers.

State layout of one parameter ``p`` (what ``state_dict()`` saves; :mod:`optim8.state` has the
slots, the precision marks and the parsing): every optimizer names its state tensors (its
``state_slots``: Adam's ``exp_avg`` / ``exp_avg_sq``, SGD's ``momentum_buffer``, ...).

* 8-bit: ``state[name]`` are uint8 codes shaped like ``p`` (the signed dynamic map for a
  momentum, the unsigned one for non-negative state), ``state[name + "_absmax"]`` fp32
  ``[ceil(numel / blocksize)]`` (a signed slot's absmax is each block's signed extreme, see
  ``kernels/blockwise.py``): ``1 + 4 / blocksize`` bytes per parameter per slot (Adam: 2.03 at 256).
* 32-bit: ``state[name]`` fp32 shaped like ``p``, whatever ``p``'s dtype
  (bf16 moments would lose most of Adam's second-moment precision).
* ``step``: a Python int (kept on the host, so ``step()`` never reads a device tensor).

A parameter gets 32-bit state when its group (or :func:`set_optim_bits`) says
``optim_bits=32``, when it has fewer than ``min_8bit_size`` elements (norms and biases:
tiny, and they gain nothing from 8 bits), or when it is an ``nn.Embedding`` weight and the
group's ``embedding_bits`` is 32 (the default; :func:`optim8.state.install_embedding_hook`).

State dicts (``state_dict()`` / ``load_state_dict()``):

* 8-bit state is saved under its own names, ``name + "_codes"`` (uint8; Adam: ``exp_avg_codes`` /
  ``exp_avg_sq_codes``) beside the absmax, so ``torch.optim.AdamW.load_state_dict``
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

from .distributed import checkpoint_state_dict, is_dtensor, local_tensor, restore_state
from .kernels.adam import STATE_BLOCKSIZES
from .kernels.blockwise import quantize_blockwise
from .kernels.quant_map import zero_code
from .state import (
    StateSlot, copy_to, is_embedding_weight, is_state8, optim_bits_override, parse_state, saved_names, set_optim_bits,
    slot_values,
)

__all__ = ["Optimizer8bit", "set_optim_bits", "to_torch_state_dict", "optim_bits_override"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# group options that describe this optimizer's state layout or its implementation: a loaded state
# dict never changes them (a torch checkpoint's foreach=False describes torch's loop, not ours)
_OWN_OPTIONS = ("optim_bits", "min_8bit_size", "blocksize", "embedding_bits", "foreach", "fused", "capturable", "differentiable")
# torch.optim group flags that no optim8 optimizer keeps (amsgrad is refused when set)
_TORCH_FLAGS = ("amsgrad", "decoupled_weight_decay")
# torch.optim's implementation keywords: what is true of optim8 (the value accepted besides None)
_IMPLEMENTATION = {
    "foreach": (True, "optim8 always updates a group's tensors together (one multi-tensor kernel launch on CUDA)"),
    "fused": (True, "optim8's step is one fused pass over memory per group (one kernel launch on CUDA)"),
    "capturable": (False, "optim8 keeps the step count on the host and passes its scalars to the kernel, so a "
                          "captured CUDA graph would replay stale bias corrections"),
    "differentiable": (False, "optim8's update runs under torch.no_grad() and cannot be differentiated through"),
}


class Optimizer8bit(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose per-parameter state is 8-bit or 32-bit (see module doc).

    Subclasses name their state (:attr:`state_slots`, or :meth:`_state_slots` when it depends
    on the group) and implement :meth:`_update_batch`, which receives every parameter of one
    group that shares device, dtype, state precision and step count, so a CUDA implementation
    can update them in one kernel launch.

    Group options common to all optim8 optimizers: ``optim_bits`` (8 or 32),
    ``min_8bit_size`` (tensors with fewer elements keep 32-bit state), ``blocksize``
    (elements per absmax block: 64, 128 or 256), ``embedding_bits`` (32: ``nn.Embedding``
    weights keep 32-bit state, as transformers' Trainer arranges for bitsandbytes; None: they
    follow ``optim_bits``), ``maximize``, and torch.optim's implementation keywords
    ``foreach`` / ``fused`` (None or True), ``capturable`` / ``differentiable`` (False).
    """

    state_slots: tuple[StateSlot, ...] = ()
    # torch.optim's counterpart keeps no "step" in its state (torch.optim.SGD)
    _step_optional = False

    def __init__(
        self,
        params,
        defaults: dict,
        *,
        optim_bits: int = 8,
        min_8bit_size: int = 4096,
        blocksize: int = 256,
        embedding_bits: int | None = 32,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ):
        defaults = dict(
            defaults, optim_bits=optim_bits, min_8bit_size=min_8bit_size, blocksize=blocksize,
            embedding_bits=embedding_bits, maximize=maximize, foreach=foreach, fused=fused, capturable=capturable,
            differentiable=differentiable,
        )
        self._check_group_options(defaults)
        self._check_hyperparameters(defaults)
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
        if group.get("embedding_bits", 32) not in (32, None):
            raise ValueError(
                f"embedding_bits must be 32 (nn.Embedding weights keep 32-bit state) or None (they follow "
                f"optim_bits), got {group['embedding_bits']!r}; use optim8.set_optim_bits(emb, 8) for one embedding"
            )
        if not isinstance(group.get("maximize", False), bool):
            raise ValueError(f"maximize must be True or False, got {group['maximize']!r}")
        for key, (true, why) in _IMPLEMENTATION.items():
            value = group.get(key)
            if value is not None and value is not true:
                raise ValueError(f"{key}={value!r} is not available: {why}. Pass {key}=None or {key}={true}")

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

    def _state_slots(self, group: dict) -> tuple[StateSlot, ...]:
        """The state tensors of a parameter in ``group`` (``state_slots`` unless a subclass says otherwise)."""
        return self.state_slots

    def _initial_value(self, slot: StateSlot, group: dict) -> float:
        """The value a new state tensor starts from (0; Adagrad: ``initial_accumulator_value``)."""
        return 0.0

    def _wants_8bit(self, p: torch.Tensor, group: dict) -> bool:
        bits = optim_bits_override(p)
        if bits is not None:
            return bits == 8
        if group.get("embedding_bits", 32) == 32 and is_embedding_weight(p):
            return False
        return group["optim_bits"] == 8 and p.numel() >= group["min_8bit_size"] and bool(self._state_slots(group))

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        state["step"] = 0
        wants_8bit = self._wants_8bit(p, group)  # by the global size, so every rank decides alike
        p = local_tensor(p)  # a DTensor (FSDP2) parameter: state covers this rank's shard only
        for slot in self._state_slots(group):
            value = self._initial_value(slot, group)
            if not wants_8bit:
                state[slot.name] = torch.full(p.shape, value, dtype=torch.float32, device=p.device)
            elif value == 0:
                nb = (p.numel() + group["blocksize"] - 1) // group["blocksize"]
                state[slot.name] = torch.full(p.shape, zero_code(slot.signed), dtype=torch.uint8, device=p.device)
                state[slot.absmax] = torch.zeros(nb, dtype=torch.float32, device=p.device)
            else:
                full = torch.full(p.shape, value, dtype=torch.float32, device=p.device)
                codes, absmax = quantize_blockwise(full, blocksize=group["blocksize"], signed=slot.signed)
                state[slot.name], state[slot.absmax] = codes.contiguous(), absmax.contiguous()
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
        slots = {}
        index = 0
        for group in self.param_groups:
            for _ in group["params"]:
                slots[index] = self._state_slots(group)
                index += 1
        state_dict["state"] = {index: saved_names(state, slots[index]) for index, state in state_dict["state"].items()}
        for hook in hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load optim8 or torch.optim state (the counterpart's), converted to this optimizer's layout (module docstring).

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
        if saved.get("amsgrad"):
            raise ValueError(
                f"loaded state dict's parameter group {index} has amsgrad=True, which {type(self).__name__} "
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
        slots = self._state_slots(group)
        step, values, state8 = parse_state(
            saved, slots, tuple(local.shape), blocksize, sharded=is_dtensor(p), step_optional=self._step_optional
        )
        device = local.device
        new = {"step": step}
        if self._wants_8bit(p, group):
            if state8 and all(values[s.name][1].dim() == 1 for s in slots) and blocksize == group["blocksize"]:
                # this optimizer's own layout: the bytes as saved (bit-exact resume)
                for slot in slots:
                    codes, absmax = values[slot.name]
                    new[slot.name] = copy_to(codes, device)
                    new[slot.absmax] = copy_to(absmax, device)
            else:
                for slot in slots:
                    fp = slot_values(values[slot.name], slot, blocksize, state8, device)
                    codes, absmax = quantize_blockwise(fp, blocksize=group["blocksize"], signed=slot.signed)
                    new[slot.name] = codes.contiguous()
                    new[slot.absmax] = absmax.contiguous()
        else:
            for slot in slots:
                new[slot.name] = slot_values(values[slot.name], slot, blocksize, state8, device)
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
                    key = (p.device, p.dtype, is_state8(state), state["step"] + 1)
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


_TORCH_GROUP_DEFAULTS = {"maximize": False, "foreach": None, "capturable": False, "differentiable": False, "fused": None}
# the signed-ness of every state name optim8's optimizers use (a state dict names its slots)
_SLOT_SIGNED = {
    "exp_avg": True, "exp_avg_sq": False, "exp_avg_slow": True, "momentum_buffer": True, "sum": False, "square_avg": False,
}


def _slots_of(saved: dict) -> tuple[StateSlot, ...]:
    names = []
    for key in saved:
        if key == "step":
            continue
        name = key.removesuffix("_codes").removesuffix("_absmax")
        if name not in _SLOT_SIGNED:
            raise ValueError(f"optimizer state entry {key!r} is none of optim8's ({sorted(_SLOT_SIGNED)})")
        if name not in names:
            names.append(name)
    return tuple(StateSlot(n, _SLOT_SIGNED[n]) for n in names)


def to_torch_state_dict(source, *, decoupled_weight_decay: bool | None = None) -> dict:
    """An optim8 optimizer's state (the optimizer or its ``state_dict()``) in torch.optim's format.

    For Adam/AdamW (``torch.optim.Adam``/``AdamW``), SGD, RMSprop and Adagrad (their torch
    namesakes: the state names are torch's). 8-bit state is dequantized to fp32
    (``map[code] * absmax``, what the next optim8 step would read), 32-bit state copied, ``step``
    becomes torch's float32 tensor (SGD keeps none); the groups lose optim8's own options and get
    torch's flags. The gathered ``full_state_dict`` of an FSDP2 run converts too. Example::

        torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        torch_opt.load_state_dict(optim8.to_torch_state_dict(opt))

    Adam state: ``decoupled_weight_decay`` is taken from the optimizer (True for the AdamW
    classes); for a state dict pass it (True: AdamW): torch's loader would otherwise set a missing
    flag to False and train an AdamW state as Adam with an L2 penalty. Lion and AdEMAMix have no
    torch counterpart (TypeError).
    """
    drop_step = False
    if isinstance(source, Optimizer8bit):
        if getattr(source, "torch_counterpart", None) is None:
            raise TypeError(f"{type(source).__name__} has no torch.optim counterpart to convert its state to")
        if decoupled_weight_decay is None:
            decoupled_weight_decay = getattr(source, "decoupled_weight_decay", None)
        drop_step = source._step_optional
        source = source.state_dict()
    if not isinstance(source, dict) or not {"state", "param_groups"} <= source.keys():
        raise TypeError("to_torch_state_dict takes an optim8 optimizer or its state_dict()")
    adam = any("exp_avg_sq" in k for saved in source["state"].values() for k in saved)
    blocksize_of, groups = {}, []
    for group in source["param_groups"]:
        new = {k: copy.deepcopy(v) for k, v in group.items() if k not in _OWN_OPTIONS}
        for key, value in _TORCH_GROUP_DEFAULTS.items():
            new.setdefault(key, value)
        if adam:
            new.setdefault("amsgrad", False)
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
        first = next((t for k, t in saved.items() if k != "step" and isinstance(t, torch.Tensor)), None)
        shape = tuple(first.shape) if first is not None else ()
        try:
            slots = _slots_of(saved)
            step, values, state8 = parse_state(saved, slots, shape, blocksize_of.get(pid, 256), sharded=False)
        except (ValueError, TypeError) as error:
            raise type(error)(f"optimizer state of parameter {pid!r}: {error}") from None
        new = {} if drop_step else {"step": torch.tensor(float(step), dtype=torch.float32)}
        for slot in slots:
            new[slot.name] = slot_values(values[slot.name], slot, blocksize_of.get(pid, 256), state8, first.device)
        state[pid] = new
    return {"state": state, "param_groups": groups}
