"""Tiny timm ViTs built offline with random weights from a fixed local generator."""
import copy

import timm
import torch

import nola_vision  # (importing registers the *_nola models)

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
_BUILT = {}


def tiny_vit(num_classes: int = 5, **kwargs) -> torch.nn.Module:
    """A 2-block ViT on 32-px images whose weights come from a fixed local generator.

    Each call gives a new copy of a model built once per set of arguments: building one (timm's init, then ours)
    costs ten times a copy, and the tests build hundreds.
    """
    kwargs = {**TINY_VIT, **kwargs}
    key = repr((num_classes, sorted(kwargs.items())))
    if key not in _BUILT:
        _BUILT[key] = _build(num_classes, kwargs)
    return copy.deepcopy(_BUILT[key])


def _build(num_classes: int, kwargs: dict) -> torch.nn.Module:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **kwargs)
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.eval()


def as_if_trained(model: torch.nn.Module, seed: int = 0, scale: float = 0.2, *,
                  adapters_only: bool = False) -> torch.nn.Module:
    """Fill every trainable tensor with seeded random values, as after training (LoRA's B is no longer zero).

    With ``adapters_only`` only the adapter layers' tensors change: the head (and full fine-tuning's backbone)
    keep their values, so a model without its adapters must equal the one they were injected into.
    """
    generator = torch.Generator().manual_seed(seed)
    if adapters_only:
        parameters = [p for layer in nola_vision.adapted_layers(model).values()
                      for p in layer.adapter_parameters().values()]
    else:
        parameters = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for parameter in parameters:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return model
