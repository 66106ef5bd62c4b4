"""Hugging Face integrations: transformers quantizer, peft LoRA layer, training helpers.

``import optim8`` must stay fast and must work without transformers or peft, yet a user who
never touches optim8's HF API still needs transformers to recognize ``quant_method: "optim8"``
in a saved ``config.json`` and peft to wrap ``Linear8bitLt`` in optim8's LoRA layer. Importing
transformers' quantizer registry costs about 2 s and peft about 3 s, so optim8 does not import
them; ``install()`` registers when they are imported:

* a module already in ``sys.modules`` is handled at once;
* otherwise a ``sys.meta_path`` finder, consulted only for the two watched module names,
  lets the normal finders locate the module and wraps that spec's loader so the registration
  runs right after the module body has executed.

Watched modules and what happens:

* ``transformers.quantizers.auto`` -> ``optim8.integrations.transformers.register()``:
  ``Int8Config`` / ``Int8HfQuantizer`` under ``quant_method "optim8"``.
* ``peft.tuners.lora.config`` -> ``LoraConfig.__post_init__`` is wrapped so every ``LoraConfig``
  (built by the user or read back by ``PeftModel.from_pretrained``) carries
  ``_register_custom_module({Linear8bitLt: LoraLinear8bitLt})``, peft's custom-layer mechanism.
  The LoRA layer module itself is imported at the first ``LoraConfig``, when peft is complete.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import threading
import warnings
from collections.abc import Callable
from types import ModuleType

from .training import prepare_for_lora

__all__ = ["install", "prepare_for_lora"]

_lock = threading.Lock()


def _on_transformers_quantizers(module: ModuleType) -> None:
    ours = sys.modules.get(f"{__name__}.transformers")
    if ours is not None and not hasattr(ours, "register"):
        # optim8.integrations.transformers is what is importing transformers right now; it
        # registers itself once its own body has run.
        return
    from .transformers import register

    register()


def _on_peft_lora_config(module: ModuleType) -> None:
    config_cls = module.LoraConfig
    original = config_cls.__post_init__
    if getattr(original, "_optim8_registers_lora", False):
        return

    def __post_init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        from .peft import register_lora_layer

        register_lora_layer(self)

    __post_init__._optim8_registers_lora = True
    __post_init__.__wrapped__ = original
    __post_init__.__doc__ = original.__doc__
    config_cls.__post_init__ = __post_init__


# module name -> callback run once that module has been executed
_pending: dict[str, Callable[[ModuleType], None]] = {}


def _run(name: str, module: ModuleType) -> None:
    with _lock:
        callback = _pending.pop(name, None)
        if not _pending and _finder in sys.meta_path:
            sys.meta_path.remove(_finder)
    if callback is None:
        return
    try:
        callback(module)
    except Exception as error:  # never break the user's import of transformers/peft
        warnings.warn(
            f"optim8 could not register with {name} ({type(error).__name__}: {error}); "
            "optim8 int8 models will not load or take LoRA adapters through it.",
            RuntimeWarning,
            stacklevel=2,
        )


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps the loader other finders return for a watched module."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        # An instance attribute on this spec's own loader object: other modules are untouched.
        def exec_then_register(module):
            exec_module(module)
            _run(fullname, module)

        loader.exec_module = exec_then_register
        return spec


_finder = _PostImportFinder()
_installed: list[bool] = []


def install() -> None:
    """Register with transformers and peft now if they are imported, else when they are (idempotent)."""
    with _lock:
        if _installed:
            return
        _installed.append(True)
        _pending["transformers.quantizers.auto"] = _on_transformers_quantizers
        _pending["peft.tuners.lora.config"] = _on_peft_lora_config
        sys.meta_path.insert(0, _finder)
    for name in list(_pending):
        module = sys.modules.get(name)
        if module is not None:
            _run(name, module)
