"""The base class of optim8's optimizers and the per-parameter state-precision override.

State layout of one parameter ``p`` (what ``state_dict()`` saves):

* 8-bit: ``exp_avg`` / ``exp_avg_sq`` are uint8 codes shaped like ``p`` (signed / unsigned
  dynamic map), ``exp_avg_absmax`` / ``exp_avg_sq_absmax`` fp32 ``[ceil(numel / blocksize)]``:
  ``2 + 8 / blocksize`` bytes per parameter (2.03 at the default 256).
* 32-bit: ``exp_avg`` / ``exp_avg_sq`` fp32 shaped like ``p``, whatever ``p``'s dtype
  (bf16 moments would lose most of Adam's second-moment precision).
* ``step``: a Python int (kept on the host, so ``step()`` never reads a device tensor).

A parameter gets 32-bit state when its group (or :func:`set_optim_bits`) says
``optim_bits=32`` or when it has fewer than ``min_8bit_size`` elements (norms and biases:
tiny, and they gain nothing from 8 bits).

``torch.optim.Optimizer.load_state_dict`` casts floating state to the parameter's dtype;
:meth:`Optimizer8bit.load_state_dict` puts the saved tensors back with their own dtypes
(uint8 codes, fp32 absmax and fp32 moments), moved to the parameter's device, so a
save -> load -> continue run is bit-identical to the uninterrupted one, across devices.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain

import torch

from .distributed import checkpoint_state_dict, local_tensor, restore_state
from .kernels.adam import STATE_BLOCKSIZES
from .kernels.quant_map import zero_code

__all__ = ["Optimizer8bit", "set_optim_bits"]

_OVERRIDE_ATTR = "_optim8_bits"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._check_group_options(group)
        self._check_hyperparameters(group)
        for p in group["params"]:
            if p.dtype not in _FLOAT_DTYPES:
                raise TypeError(
                    f"{type(self).__name__} updates float32, float16 or bfloat16 parameters; got one of dtype "
                    f"{p.dtype} and shape {tuple(p.shape)}. Leave it out of the optimizer or convert it."
                )

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
        # DTensor (FSDP2) parameters: shard-shaped state as DTensors for torch.distributed.checkpoint
        return checkpoint_state_dict(self, super().state_dict())

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        # Undo torch's cast of floating state to the parameter dtype: put the saved tensors
        # back with their own dtype, copied (never aliased) onto the parameter's device.
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for pid, p in zip(saved_ids, params):
            if pid not in saved:
                continue
            group = group_of[id(p)]
            restored = {}
            # restore_state: DTensor state of an FSDP2 parameter -> this rank's local shard
            for key, value in restore_state(p, saved[pid], blocksize=group.get("blocksize", self.defaults["blocksize"])).items():
                if isinstance(value, torch.Tensor):
                    # contiguous: the CUDA kernel reads state as flat arrays
                    value = value.to(device=local_tensor(p).device, memory_format=torch.contiguous_format, copy=True)
                restored[key] = value
            self._check_loaded_state(p, group, restored)
            self.state[p] = restored

    def _check_loaded_state(self, p: torch.Tensor, group: dict, state: dict) -> None:
        p = local_tensor(p)
        step = state.get("step")
        if isinstance(step, torch.Tensor):  # a state dict written by torch.optim.Adam(W)
            state["step"] = int(step.item())
        elif not isinstance(step, int):
            raise ValueError(f"optimizer state of a parameter of shape {tuple(p.shape)} has no integer 'step'")
        for key in ("exp_avg", "exp_avg_sq"):
            t = state.get(key)
            if t is None or t.shape != p.shape:
                raise ValueError(
                    f"optimizer state '{key}' does not match the parameter of shape {tuple(p.shape)} "
                    f"(got {None if t is None else tuple(t.shape)}); was the state dict saved for another model?"
                )
        if "exp_avg_absmax" in state:
            nb = (p.numel() + group["blocksize"] - 1) // group["blocksize"]
            for key in ("exp_avg_absmax", "exp_avg_sq_absmax"):
                t = state.get(key)
                if t is None or t.dtype != torch.float32 or t.numel() != nb:
                    raise ValueError(
                        f"8-bit state '{key}' of a parameter of shape {tuple(p.shape)} should be float32 with {nb} "
                        f"entries for blocksize {group['blocksize']}; got "
                        f"{None if t is None else (t.dtype, t.numel())}"
                    )
            if state["exp_avg"].dtype != torch.uint8 or state["exp_avg_sq"].dtype != torch.uint8:
                raise ValueError("8-bit state codes must be uint8")
        else:
            # 32-bit state written elsewhere (e.g. by torch.optim.AdamW in a lower dtype): keep fp32
            state["exp_avg"] = state["exp_avg"].float()
            state["exp_avg_sq"] = state["exp_avg_sq"].float()

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            batches: dict[tuple, list] = {}
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients (parameter of shape "
                        f"{tuple(p.shape)}); use nn.Embedding(sparse=False) or torch.optim.SparseAdam"
                    )
                if g.dtype != p.dtype:
                    raise TypeError(f"gradient dtype {g.dtype} differs from its parameter's dtype {p.dtype}")
                state = self.state[p]
                if not state:
                    state = self._init_state(p, group)
                state["step"] += 1
                key = (p.device, p.dtype, "exp_avg_absmax" in state, state["step"])
                batches.setdefault(key, []).append((local_tensor(p), local_tensor(g), state))
            for (_, _, state8, step), batch in batches.items():
                self._update_batch(group, batch, state8=state8, step=step)
        return loss

    def _update_batch(self, group: dict, batch: list, *, state8: bool, step: int) -> None:
        """Update ``batch`` (``(param, grad, state)`` triples) in place; see the class docstring."""
        raise NotImplementedError
