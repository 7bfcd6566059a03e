"""Put adapters into any model by module name: inject, merge, unmerge, count_parameters."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

from torch import nn

from .basis import BasisBank, BasisSpec, fingerprint
from .config import PLAIN_METHODS, AdapterConfig, LoRAConfig, NOLAConfig
from .layers import (
    AdaptedLinear,
    LoRALinear,
    NOLALinear,
    Slice,
    batched_factors,
    combine_shared_factors,
    release_shared_factors,
)

Method = Union[NOLAConfig, LoRAConfig, str]
# Virtual targets: one third of a fused ``qkv`` projection, by position of its output rows.
QKV_SLICES = {"q": 0, "k": 1, "v": 2}
STATE_ATTRIBUTE = "nola_adapter"


@dataclass
class AdapterState:
    """What ``inject`` attached to a model: its method/config, the adapted layer names and the basis bank."""

    config: Union[AdapterConfig, str]
    layers: Dict[str, Tuple[Slice, ...]]
    bank: Optional[BasisBank] = None

    @property
    def method(self) -> str:
        return self.config if isinstance(self.config, str) else self.config.method

    def config_dict(self) -> Union[str, dict]:
        """The config as adapter files store it: the method string, or the config's ``to_dict()``."""
        return self.config if isinstance(self.config, str) else self.config.to_dict()


def _matches(name: str, pattern: str) -> bool:
    """A target matches a module name as an exact name, a dotted suffix, or a full regex match."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _summarise_names(names: List[str]) -> List[str]:
    """Module names with block indices folded (``blocks.*.mlp.fc1``), for readable error messages."""
    return sorted({re.sub(r"\.\d+\.", ".*.", name) for name in names})


def classifier_head(model: nn.Module) -> Optional[nn.Module]:
    """The classifier head by timm's ``get_classifier()`` contract; None for a model without one."""
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else None
    return head if isinstance(head, nn.Module) and any(True for _ in head.parameters()) else None


def find_targets(model: nn.Module, targets: List[str]) -> Dict[str, Tuple[Slice, ...]]:
    """Resolve target patterns to ``{linear module name: output slices}``; raise if any pattern matches nothing."""
    head = classifier_head(model)
    head_modules = {id(m) for m in head.modules()} if head is not None else set()
    linears = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and id(module) not in head_modules
    }
    found: Dict[str, List[Slice]] = {}
    for pattern in targets:
        matched = False
        prefix, _, last = pattern.rpartition(".")
        for name, module in linears.items():
            if last in QKV_SLICES and _matches(name, f"{prefix}.qkv" if prefix else "qkv"):
                if module.out_features % 3:
                    raise ValueError(f"target {pattern!r}: {name} has {module.out_features} outputs, not a fused qkv")
                width = module.out_features // 3
                start = QKV_SLICES[last] * width
                found.setdefault(name, []).append((start, start + width))
                matched = True
            elif _matches(name, pattern):
                found.setdefault(name, []).append((0, module.out_features))
                matched = True
        if not matched:
            raise ValueError(
                f"target {pattern!r} matches no nn.Linear of {type(model).__name__}. Its Linear layers are: "
                f"{', '.join(_summarise_names(list(linears)))} (targets are name suffixes or regexes; "
                "'attn.q', 'attn.k', 'attn.v' select one third of a fused 'attn.qkv')"
            )
    resolved = {}
    for name, slices in found.items():
        slices = sorted(set(slices))
        for (_, end), (start, _) in zip(slices, slices[1:]):
            if start < end:
                raise ValueError(f"targets overlap on {name}: output slices {slices}; pick either the fused layer or its slices")
        resolved[name] = tuple(slices)
    return resolved


def _recomputable_activation(parent: nn.Module, child_name: str) -> Optional[nn.Module]:
    """The activation of a timm-style Mlp whose fc2 may recompute its input (nothing between act and fc2)."""
    if child_name != "fc2" or not all(hasattr(parent, a) for a in ("fc1", "act", "drop1", "norm", "fc2")):
        return None
    if type(parent).forward is not _timm_mlp_forward():
        return None
    no_dropout = isinstance(parent.drop1, nn.Identity) or getattr(parent.drop1, "p", 1.0) == 0.0
    return parent.act if no_dropout and isinstance(parent.norm, nn.Identity) else None


def _timm_mlp_forward():
    from timm.layers import Mlp

    return Mlp.forward


def inject(model: nn.Module, config: Method) -> nn.Module:
    """Add adapters in place; freeze everything but the adapters and the classifier head.

    ``config`` is a ``NOLAConfig``, a ``LoRAConfig``, ``"linear"`` (train the head only) or ``"full"``
    (train everything). Nothing is changed when the config or a target is invalid.
    """
    if getattr(model, STATE_ATTRIBUTE, None) is not None:
        raise ValueError(f"model already has {getattr(model, STATE_ATTRIBUTE).method!r} adapters; inject into a fresh model")
    if isinstance(config, str):
        if config not in PLAIN_METHODS:
            raise ValueError(f"unknown adapter {config!r}; use NOLAConfig, LoRAConfig, or one of {list(PLAIN_METHODS)}")
        layers: Dict[str, Tuple[Slice, ...]] = {}
    elif isinstance(config, (NOLAConfig, LoRAConfig)):
        layers = find_targets(model, config.targets)  # validates before anything changes
    else:
        raise TypeError(f"expected NOLAConfig, LoRAConfig, 'linear' or 'full', got {type(config).__name__}")

    full = config == "full"
    for parameter in model.parameters():
        parameter.requires_grad_(full)
    head = classifier_head(model)
    if head is not None:
        head.requires_grad_(True)

    bank = BasisBank() if isinstance(config, NOLAConfig) else None
    for name, slices in layers.items():
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child_name)
        if isinstance(config, NOLAConfig):
            adapted: AdaptedLinear = NOLALinear(base, config, name, slices, bank)
        else:
            adapted = LoRALinear(base, config, name, slices)
        activation = _recomputable_activation(parent, child_name) if config.recompute_activation else None
        if activation is not None:
            adapted.input_activation = activation
            parent.act = nn.Identity()
        setattr(parent, child_name, adapted)
    if isinstance(config, NOLAConfig) and config.basis == "shared" and layers:
        model.register_forward_pre_hook(combine_shared_factors)
        model.register_forward_hook(release_shared_factors, always_call=True)
    setattr(model, STATE_ATTRIBUTE, AdapterState(config, layers, bank))
    return model


def adapter_state(model: nn.Module) -> Optional[AdapterState]:
    """The ``AdapterState`` that ``inject`` attached, or None for a plain model."""
    return getattr(model, STATE_ATTRIBUTE, None)


def adapted_layers(model: nn.Module) -> Dict[str, AdaptedLinear]:
    """Every adapter layer of the model by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def basis_fingerprint(model: nn.Module) -> Optional[str]:
    """Fingerprint of every random basis the model's NOLA layers use (None without NOLA layers)."""
    specs: List[BasisSpec] = [s for layer in adapted_layers(model).values() for s in layer.basis_specs()]
    return fingerprint(specs) if specs else None


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter's ΔW into its frozen weight: inference then costs what the base model costs."""
    with batched_factors(model):
        for layer in adapted_layers(model).values():
            layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo ``merge`` so the adapters can train again."""
    with batched_factors(model):
        for layer in adapted_layers(model).values():
            layer.unmerge()
    return model



def set_quantization_aware(model: nn.Module, bits: Optional[int]) -> nn.Module:
    """Train against ``bits``-bit coefficients (straight-through estimator); ``None`` turns it off."""
    if bits not in (None, 8, 4):
        raise ValueError(f"quantisation-aware training supports 8 or 4 bits (or None), got {bits}")
    for layer in adapted_layers(model).values():
        layer.quant_bits = bits
    return model


def count_parameters(model: nn.Module) -> Dict[str, int]:
    """Exact parameter counts: adapter coefficients/factors and classifier head separately, trainable, total."""
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
