"""``prepare_for_lora``: get a (typically int8) model ready for adapter training.

What peft's ``prepare_model_for_kbit_training`` does, fitted to optim8's layers: it casts every
fp16/bf16 parameter (embeddings and head included) to fp32, which for an int8 model brings back
much of the memory the int8 base saved. Here only normalization layers go to fp32, and they also
compute in fp32 while handing the next layer the activation dtype they were given, so the rest of
the model keeps its dtype. Pure PyTorch: works on any ``nn.Module`` with transformers' optional
methods (``enable_input_require_grads``, activation checkpointing) used where present.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["prepare_for_lora"]

_TORCH_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)


def prepare_for_lora(
    model: nn.Module,
    *,
    gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Prepare ``model`` in place for LoRA training on a frozen base, and return it.

    1. Freeze every parameter (adapters added afterwards, e.g. by ``peft.get_peft_model``, are the
       only trainable ones).
    2. Normalization layers (torch's norms, and leaf modules whose class name ends in ``Norm``,
       e.g. ``LlamaRMSNorm``): parameters and buffers to fp32, inputs cast to fp32 before the
       layer, output cast back to the input's dtype. Half-precision statistics are the usual
       source of fp16 overflow and bf16 drift; the layers are tiny, so fp32 costs nothing.
    3. The input embeddings' output requires grad, so gradients reach adapters inside
       checkpointed blocks whose inputs would otherwise all be frozen.
    4. ``gradient_checkpointing=True``: activation checkpointing with
       ``gradient_checkpointing_kwargs`` (default ``{"use_reentrant": False}``) and
       ``config.use_cache = False``.

    Calling it twice is harmless (hooks are installed once).
    """
    for param in model.parameters():
        param.requires_grad_(False)

    for module in model.modules():
        if _is_norm(module) and not hasattr(module, "_optim8_fp32_norm"):
            _compute_in_fp32(module)

    _enable_input_grads(model)

    if gradient_checkpointing:
        kwargs = dict(gradient_checkpointing_kwargs or {"use_reentrant": False})
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            raise ValueError(
                f"{type(model).__name__} has no gradient checkpointing switch (a transformers model has); "
                "pass gradient_checkpointing=False."
            )
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "use_cache", None):
            config.use_cache = False
    return model


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, _TORCH_NORMS):
        return True
    return type(module).__name__.endswith("Norm") and next(module.children(), None) is None


def _compute_in_fp32(module: nn.Module) -> None:
    for name, param in module.named_parameters(recurse=False):
        if param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
    for name, buffer in module.named_buffers(recurse=False):
        if buffer.is_floating_point() and buffer.dtype != torch.float32:
            setattr(module, name, buffer.float())

    def to_fp32(module, args, kwargs):
        dtype = next((a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
        module._optim8_fp32_norm = dtype
        if dtype is None or dtype == torch.float32:
            return None
        cast = lambda a: a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a  # noqa: E731
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}

    def back_to_input_dtype(module, args, kwargs, output):
        dtype = module._optim8_fp32_norm
        if dtype is None or not isinstance(output, torch.Tensor) or output.dtype == dtype:
            return None
        return output.to(dtype)

    module._optim8_fp32_norm = None
    module.register_forward_pre_hook(to_fp32, with_kwargs=True)
    module.register_forward_hook(back_to_input_dtype, with_kwargs=True)


def _enable_input_grads(model: nn.Module) -> None:
    if getattr(model, "_require_grads_hooks", None) or getattr(model, "_optim8_input_grads", None):
        return
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
        return
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if get_embeddings is not None else None
    if embeddings is None:
        # Not a transformers-style model: nothing to hook; non-reentrant checkpointing does not need it.
        return
    model._optim8_input_grads = embeddings.register_forward_hook(lambda m, i, output: output.requires_grad_(True))
