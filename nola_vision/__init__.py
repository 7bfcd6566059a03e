"""nola_vision: few-shot transfer of timm Vision Transformers with NOLA adapters.

Importing the package registers the ``*_nola`` ViT variants with timm. The Lightning pieces
(``FewShotClassifier``, ``FewShotDataModule``) load on first use, so the core stays quick to import.
"""
from typing import Any

__version__ = "0.1.0"

from .config import AdapterConfig, LoRAConfig, NOLAConfig, PlainConfig, available_methods, get_method, register_method
from .export import export_peft
from .inject import InjectionPlan, adapted_layers, count_parameters, inject, plan_injection, set_quantization_aware
from .io import AdapterLoadError, adapter_size_bytes, load_adapter, save_adapter
from .layers import AdaptedLinear, LoRALinear, NOLALinear
from .merge import merge, unmerge
from .multitask import MultiTaskModel
from .unload import merge_and_unload, unload
from .zoo import create_model  # importing registers the *_nola models with timm

_LAZY = {"FewShotClassifier": "nola_vision.module", "FewShotDataModule": "nola_vision.data"}

__all__ = [
    "AdaptedLinear",
    "AdapterConfig",
    "AdapterLoadError",
    "FewShotClassifier",
    "FewShotDataModule",
    "InjectionPlan",
    "LoRAConfig",
    "LoRALinear",
    "MultiTaskModel",
    "NOLAConfig",
    "NOLALinear",
    "PlainConfig",
    "adapted_layers",
    "adapter_size_bytes",
    "available_methods",
    "count_parameters",
    "create_model",
    "export_peft",
    "get_method",
    "inject",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "plan_injection",
    "register_method",
    "save_adapter",
    "set_quantization_aware",
    "unload",
    "unmerge",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nola_vision' has no attribute {name!r}")
