"""nola_vision: few-shot transfer of timm Vision Transformers with NOLA adapters.

Importing the package registers the ``*_nola`` ViT variants with timm. The Lightning pieces
(``FewShotClassifier``, ``FewShotDataModule``) load on first use, so the core stays quick to import.
"""
from typing import Any

__version__ = "0.1.0"

from .config import LoRAConfig, NOLAConfig
from .inject import adapted_layers, count_parameters, inject, merge, set_quantization_aware, unmerge
from .io import AdapterLoadError, adapter_size_bytes, load_adapter, save_adapter
from .layers import LoRALinear, NOLALinear
from .zoo import create_model  # importing registers the *_nola models with timm

_LAZY = {"FewShotClassifier": "nola_vision.module", "FewShotDataModule": "nola_vision.data"}

__all__ = [
    "AdapterLoadError",
    "FewShotClassifier",
    "FewShotDataModule",
    "LoRAConfig",
    "LoRALinear",
    "NOLAConfig",
    "NOLALinear",
    "adapted_layers",
    "adapter_size_bytes",
    "count_parameters",
    "create_model",
    "inject",
    "load_adapter",
    "merge",
    "save_adapter",
    "set_quantization_aware",
    "unmerge",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nola_vision' has no attribute {name!r}")
