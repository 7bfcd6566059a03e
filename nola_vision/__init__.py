"""nola_vision: few-shot transfer of timm Vision Transformers with NOLA adapters.

Importing the package registers the built-in methods and the ``*_nola`` ViT variants with timm. The Lightning
pieces (``FewShotClassifier``, ``FewShotDataModule``) load on first use, so the core stays quick to import.
The floors, bottom up: ``core`` (adapter machinery), ``methods``, ``adapters`` (files), ``serve``, ``models``,
``data``, ``train``, ``runs``; ``cli`` and ``demo`` on top.
"""
from typing import Any, List

from .adapters import (
    AdapterLoadError,
    VerifiedAdapter,
    adapter_size_bytes,
    export_peft,
    load_adapter,
    save_adapter,
    verify_adapter,
)
from .core.config import AdapterConfig
from .core.counts import count_parameters
from .core.inject import inject, merge_and_unload, set_basis_holding, set_quantization_aware, unload
from .core.layer import AdaptedLinear, adapted_layers
from .core.merge import merge, unmerge
from .core.plan import InjectionPlan, plan_injection
from .core.registry import available_methods, get_method, register_method
from .methods import LoRAConfig, LoRALinear, NOLAConfig, NOLALinear, PlainConfig
from .models import create_model  # importing registers the *_nola models with timm
from .serve import MultiTaskModel, export_onnx, onnx_task_inputs
from .version import __version__

_LAZY = {"FewShotClassifier": "nola_vision.train.module", "FewShotDataModule": "nola_vision.data"}

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
    "VerifiedAdapter",
    "__version__",
    "adapted_layers",
    "adapter_size_bytes",
    "available_methods",
    "count_parameters",
    "create_model",
    "export_onnx",
    "export_peft",
    "get_method",
    "inject",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "onnx_task_inputs",
    "plan_injection",
    "register_method",
    "save_adapter",
    "set_basis_holding",
    "set_quantization_aware",
    "unload",
    "unmerge",
    "verify_adapter",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nola_vision' has no attribute {name!r}")


def __dir__() -> List[str]:
    """The module's names and the lazily imported ones, so tab completion offers ``FewShotClassifier`` too."""
    return sorted(set(globals()) | set(__all__))
