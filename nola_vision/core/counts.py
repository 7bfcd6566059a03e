"""Exact parameter counts of an adapted model: adapter and head separately, as the paper reports them."""
from __future__ import annotations

from typing import Dict

from torch import nn

from .layer import adapted_layers
from .targets import classifier_head, require_module, require_no_peft_model

__all__ = ["count_parameters"]


def count_parameters(model: nn.Module) -> Dict[str, int]:
    """Exact parameter counts: adapter coefficients/factors and classifier head separately, trainable, total."""
    require_module(model, "count_parameters", adaptable=False)
    require_no_peft_model(model, "count_parameters")  # its adapters are no nola_vision layers, its head counted twice
    adapter = {
        id(p): p.numel() for layer in adapted_layers(model).values() for p in layer.adapter_parameters().values()
    }
    head = classifier_head(model)
    unique = {id(p): p for p in model.parameters()}
    return {
        "adapter": sum(adapter.values()),
        "head": sum(p.numel() for p in head.parameters()) if head is not None else 0,
        "trainable": sum(p.numel() for p in unique.values() if p.requires_grad),
        "total": sum(p.numel() for p in unique.values()),
    }
