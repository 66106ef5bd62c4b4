"""optim8 under torch.distributed: DTensor (FSDP2) parameters and distributed checkpoints.

DDP needs nothing from here: every rank holds whole parameters, gradients are averaged
before ``step()``, and the replicated 8-bit state stays identical on every rank.

FSDP2 (``torch.distributed.fsdp.fully_shard``) turns parameters into ``DTensor`` shards.
The optimizer then works on each rank's LOCAL shard only:

* The 8-bit/32-bit decision (``min_8bit_size``) uses the parameter's GLOBAL size, so every
  rank, and a single-process run, decide the same.
* State tensors are shaped like the local shard, and the quantization blocks are blocks of
  the local shard's elements: a block never straddles two ranks, so ``step()`` needs no
  communication. When each shard holds a multiple of ``blocksize`` elements the blocks are
  exactly those of a single-process run.
* The update itself is the ordinary one on ``p.to_local()`` and ``p.grad.to_local()``.

Checkpoints (``Optimizer8bit.state_dict()`` calls :func:`checkpoint_state`): for a DTensor
parameter, tensors shaped like the shard (uint8 codes, fp32 moments) are returned as
DTensors with the parameter's mesh and placements, so ``torch.distributed.checkpoint``
(DCP) writes each shard once at its global offset. The per-block absmax cannot be laid out
like the parameter (its blocks follow the local shard's flat order, and uneven shards have
different block counts), so it is returned as a DTensor of global shape
``[mesh sizes of the sharded mesh dims..., max_blocks]``: one row per shard, sharded over
those leading dims (replicated over replicated mesh dims, as HSDP replicas hold equal
state), each row zero-padded to ``max_blocks``, the block count of the largest shard
(shard 0). :func:`restore_state` undoes all of this on load. Because the absmax rows belong
to shards, a sharded checkpoint resumes on the same mesh shape (and sharding); loading it with
another world size fails in DCP with "Size mismatch" on an ``*_absmax`` entry, and a state
dict distributed onto another layout by ``set_optimizer_state_dict`` is refused by
:func:`restore_state`, rather than misread.

The gathered state (``get_optimizer_state_dict(..., options=StateDictOptions(full_state_dict=True))``)
holds whole-parameter codes and the ``[shards, max_blocks]`` absmax. Loaded into an optimizer
of unsharded parameters (a single process, or DDP) it is re-blocked:
:func:`gathered_shard_values` dequantizes each shard's blocks, assuming FSDP2's default
layout (``Shard(0)``: shard ``i`` holds ``torch.chunk(p, shards, dim=0)[i]``; checked where the
absmax allows), and the optimizer quantizes the whole parameter again onto its own blocks:
every value within one quantization step of what the shards held.

Usage (all collective; see the README)::

    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"]); set_optimizer_state_dict(model, opt, sd["optim"])

``torch.distributed.tensor`` is never imported here: a DTensor can only exist once its
module is loaded, so :func:`local_tensor` looks the class up in ``sys.modules`` and
``import optim8`` stays as fast as before.
"""

from __future__ import annotations

import math
import sys

import torch

from .state import ABSMAX_SUFFIX as _ABSMAX_SUFFIX, gathered_shard_values, optim_bits_override, set_optim_bits

__all__ = [
    "local_tensor", "is_dtensor", "checkpoint_state", "restore_state", "checkpoint_state_dict", "gathered_shard_values",
    "fully_shard",
]

def _dtensor_class():
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (without importing that module)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view sharing its storage: in-place updates reach it), else ``t``."""
    return t._local_tensor if is_dtensor(t) else t


def _absmax_layout(p) -> tuple[tuple[int, ...], list, int]:
    """Global leading shape, placements and per-shard block capacity of ``p``'s absmax DTensors."""
    from torch.distributed.tensor import Replicate, Shard

    mesh = p.device_mesh
    lead: list[int] = []
    placements = []
    for mesh_dim, placement in enumerate(p.placements):
        if placement.is_replicate():
            placements.append(Replicate())
        elif placement.is_partial():
            raise ValueError(
                f"optim8 cannot hold optimizer state for a parameter with a Partial placement ({p.placements}); "
                "parameters must be sharded or replicated"
            )
        else:  # Shard or _StridedShard: one absmax row per shard along this mesh dim
            placements.append(Shard(len(lead)))
            lead.append(mesh.size(mesh_dim))
    return tuple(lead), placements, _largest_shard_numel(p)


def _largest_shard_numel(p) -> int:
    """Elements of the shard at mesh coordinate 0: chunked sharding gives it the largest shard."""
    try:
        from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

        shape, _ = _compute_local_shape_and_global_offset(p.shape, p.device_mesh.shape, [0] * p.device_mesh.ndim, p.placements)
    except (ImportError, TypeError):  # private helper moved: torch.chunk semantics, per sharded mesh dim
        shape = list(p.shape)
        for mesh_dim, placement in enumerate(p.placements):
            if not (placement.is_replicate() or placement.is_partial()):
                shape[placement.dim] = math.ceil(shape[placement.dim] / p.device_mesh.size(mesh_dim))
    return math.prod(shape)


def checkpoint_state(p: torch.Tensor, state: dict, *, blocksize: int) -> dict:
    """``p``'s optimizer state as ``state_dict()`` returns it: DTensors for a DTensor ``p`` (see module doc).

    Returns ``state`` itself for an ordinary parameter, else a new dict (``state`` untouched).
    """
    if not is_dtensor(p):
        return state
    from torch.distributed.tensor import DTensor

    local = p._local_tensor
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            out[key] = value
        elif key.endswith(_ABSMAX_SUFFIX):
            lead, placements, largest = _absmax_layout(p)
            capacity = math.ceil(largest / blocksize)
            if value.numel() > capacity:
                raise RuntimeError(
                    f"optimizer state '{key}' of a parameter sharded as {p.placements} on mesh {tuple(p.device_mesh.shape)} "
                    f"has {value.numel()} blocks on this rank, more than the {capacity} of shard 0; "
                    "optim8 assumes torch.chunk-style sharding where shard 0 is the largest"
                )
            row = torch.zeros((1,) * len(lead) + (capacity,), dtype=value.dtype, device=value.device)
            row.view(-1)[: value.numel()] = value.view(-1)
            shape = lead + (capacity,)
            out[key] = DTensor.from_local(row, p.device_mesh, placements, shape=torch.Size(shape), stride=_contiguous_stride(shape))
        elif value.shape == local.shape:
            out[key] = DTensor.from_local(value, p.device_mesh, p.placements, shape=p.shape, stride=_contiguous_stride(p.shape))
        else:
            raise RuntimeError(f"optimizer state '{key}' of shape {tuple(value.shape)} matches neither the local shard {tuple(local.shape)} nor an absmax")
    return out


def restore_state(p: torch.Tensor, state: dict, *, blocksize: int) -> dict:
    """Inverse of :func:`checkpoint_state`: local tensors again (absmax un-padded).

    For a DTensor ``p``, DTensor entries must have ``p``'s mesh; plain tensors are taken as
    already local (and checked by the optimizer against the local shard).
    """
    if not is_dtensor(p):
        for key, value in state.items():
            if is_dtensor(value):
                raise ValueError(
                    f"optimizer state '{key}' is a DTensor but its parameter (shape {tuple(p.shape)}) is not: "
                    "a checkpoint of a sharded (FSDP2) run must be loaded into the same sharded model"
                )
        return state
    local = p._local_tensor
    out = {}
    for key, value in state.items():
        if not is_dtensor(value):
            out[key] = value
            continue
        if value.device_mesh != p.device_mesh:
            raise ValueError(f"optimizer state '{key}' lives on mesh {value.device_mesh}, its parameter on {p.device_mesh}")
        shard = value._local_tensor
        if key.endswith(_ABSMAX_SUFFIX):
            lead, _, largest = _absmax_layout(p)
            expected = lead + (math.ceil(largest / blocksize),)
            if tuple(value.shape) != expected:
                raise ValueError(
                    f"optimizer state '{key}' has the global shape {tuple(value.shape)}, but this parameter "
                    f"(shape {tuple(p.shape)}, sharded {p.placements} on mesh {tuple(p.device_mesh.shape)}) keeps "
                    f"{expected}: the state was saved on another world size or mesh. Resume on the mesh it was "
                    "saved on, or load its gathered (full_state_dict) form into an unsharded model and optimizer"
                )
            n = math.ceil(local.numel() / blocksize)
            if shard.numel() < n:
                raise ValueError(f"optimizer state '{key}' holds {shard.numel()} blocks on this rank; the local shard needs {n}")
            out[key] = shard.reshape(-1)[:n]
        else:
            if tuple(value.placements) != tuple(p.placements):
                raise ValueError(f"optimizer state '{key}' is placed {value.placements}, its parameter {p.placements}")
            out[key] = shard
    return out


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(tuple(shape)):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


def fully_shard(module: torch.nn.Module, **kwargs):
    """``torch.distributed.fsdp.fully_shard`` that keeps :func:`optim8.set_optim_bits` marks.

    FSDP2 replaces every parameter by a new DTensor parameter, which drops attributes set on
    the old one (the 32-bit mark of ``StableEmbedding``, or your own ``set_optim_bits``).
    This re-applies each mark to the new parameter of the same name. Arguments and return
    value are ``fully_shard``'s.
    """
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    marks = {name: bits for name, q in module.named_parameters() if (bits := optim_bits_override(q)) is not None}
    result = torch_fully_shard(module, **kwargs)
    params = dict(module.named_parameters())
    for name, bits in marks.items():
        set_optim_bits(params[name], bits)
    return result


def checkpoint_state_dict(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """Apply :func:`checkpoint_state` to every entry of ``torch.optim.Optimizer.state_dict()``'s output.

    torch numbers parameters in ``param_groups`` order; each group's ``blocksize`` is used.
    """
    packed = state_dict["state"]
    index = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if index in packed:
                packed[index] = checkpoint_state(p, packed[index], blocksize=group.get("blocksize", optimizer.defaults["blocksize"]))
            index += 1
    return state_dict
