"""Undo ``inject``: give back plain timm modules, the original state-dict keys and no hooks or adapter state.

``unload`` drops the adapters (the frozen weights are the original ones again); ``merge_and_unload`` folds
them into the weights first, for serving and export (ONNX, torch.compile) at the base model's cost.
"""
from __future__ import annotations

from torch import nn

from .inject import STATE_ATTRIBUTE, adapter_state
from .layers import AdaptedLinear
from .merge import adapted_layers, combine_shared_factors, merge, release_shared_factors, unmerge

__all__ = ["merge_and_unload", "unload"]


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without keeping its update: the model equals one that was never injected.

    A merged model is unmerged first, so the weights are the original ones. Returns the model (changed in place).
    """
    return _remove_injection(unmerge(_require_injected(model)))


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter's update into its weight, then remove the injection: a plain model, the adapted outputs."""
    return _remove_injection(merge(_require_injected(model)))


def _require_injected(model: nn.Module) -> nn.Module:
    if adapter_state(model) is None and not adapted_layers(model):
        raise ValueError(f"{type(model).__name__} has no nola_vision adapters to unload (never injected, or already "
                         "unloaded); call nv.inject or nv.load_adapter first")
    return model


def _plain_linear(layer: AdaptedLinear) -> nn.Linear:
    """An ``nn.Linear`` holding the layer's own weight and bias tensors (built on meta: no allocation, no RNG)."""
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = layer.weight
    linear.bias = layer.bias
    return linear.train(layer.training)


def _remove_injection(model: nn.Module) -> nn.Module:
    """Swap adapted layers for plain ones, put moved activations back, drop the hooks and the adapter state."""
    for name, layer in adapted_layers(model).items():
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if layer.input_activation is not None:  # inject moved the Mlp's activation into fc2 (recomputed input)
            parent.act = layer.input_activation
        setattr(parent, child_name, _plain_linear(layer))
    installed = ((model._forward_pre_hooks, combine_shared_factors), (model._forward_hooks, release_shared_factors))
    for hooks, hook in installed:
        for key in [key for key, value in hooks.items() if value is hook]:
            del hooks[key]
            model._forward_hooks_always_called.pop(key, None)
    if hasattr(model, STATE_ATTRIBUTE):
        delattr(model, STATE_ATTRIBUTE)
    # inject froze the backbone; a never-injected timm model trains every parameter.
    model.requires_grad_(True)
    return model
