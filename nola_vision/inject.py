"""Put adapters into any model by module name: plan the injection, apply it, count what trains.

``plan_injection`` computes everything an injection will do (targets, slices, shapes, bases, trained
tensors) without changing the model; ``inject`` applies that plan, and ``load_adapter`` checks files
against it. Methods are looked up in the registry (``config.py``), never branched on by name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

from torch import nn

from .basis import BasisBank, BasisSpec, fingerprint
from .config import AdapterConfig, as_config, method_of
from .layers import AdaptedLinear, Slice
from .merge import adapted_layers, combine_shared_factors, has_shared_bases, merge, release_shared_factors, unmerge

Method = Union[AdapterConfig, str]
# Virtual targets: one third of a fused ``qkv`` projection, by position of its output rows.
QKV_SLICES = {"q": 0, "k": 1, "v": 2}
STATE_ATTRIBUTE = "nola_adapter"

__all__ = ["AdapterState", "InjectionPlan", "LayerPlan", "adapted_layers", "adapter_state", "count_parameters",
           "find_targets", "inject", "merge", "plan_injection", "set_quantization_aware", "unmerge"]


@dataclass
class AdapterState:
    """What ``inject`` attached to a model: its config, the adapted layer names and the basis bank."""

    config: AdapterConfig
    layers: Dict[str, Tuple[Slice, ...]]
    bank: Optional[BasisBank] = None
    plan: Optional[InjectionPlan] = None

    @property
    def method(self) -> str:
        return self.config.method

    def config_dict(self) -> Union[str, dict]:
        """The config as adapter files store it: a plain method's name, or the config's ``to_dict()``."""
        return self.config.serialize()


@dataclass(frozen=True)
class LayerPlan:
    """One target: its slices, in/out features, the bases it will use and the shapes of its trained tensors."""

    name: str
    in_features: int
    out_features: int
    slices: Tuple[Slice, ...]
    basis_specs: Tuple[BasisSpec, ...]
    tensor_shapes: Dict[str, Tuple[int, ...]]


@dataclass(frozen=True)
class InjectionPlan:
    """Everything ``inject(model, config)`` will do, computed without changing the model."""

    config: AdapterConfig
    layers: Dict[str, LayerPlan]
    # Every trained tensor by full parameter name: adapter tensors, then the head (every parameter for "full").
    trained_shapes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    head_names: Tuple[str, ...] = ()

    def basis_fingerprint(self) -> Optional[str]:
        """Fingerprint of every random basis the plan uses (None without any)."""
        specs = [spec for layer in self.layers.values() for spec in layer.basis_specs]
        return fingerprint(specs) if specs else None


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
                raise ValueError(f"targets overlap on {name}: output slices {slices}; pick either the fused layer "
                                 "or its slices")
        resolved[name] = tuple(slices)
    return resolved


def _plain_linear_forwards() -> tuple:
    """Forwards that compute exactly ``F.linear(x, weight, bias)``: nn.Linear's and timm's (a torchscript cast)."""
    from timm.layers import Linear

    return nn.Linear.forward, Linear.forward


def _require_plain_forward(name: str, linear: nn.Linear) -> None:
    """Refuse an ``nn.Linear`` subclass with its own forward (a quantised linear): the adapter would replace it."""
    if type(linear).forward not in _plain_linear_forwards():
        raise ValueError(
            f"target {name} is a {type(linear).__module__}.{type(linear).__qualname__}, an nn.Linear subclass with its "
            "own forward (e.g. a quantised linear), which an adapter would silently replace by F.linear on its "
            "weight: use a model with plain nn.Linear layers there (dequantise it first) or leave it out of targets"
        )


def plan_injection(model: nn.Module, config: Method) -> InjectionPlan:
    """The injection plan of ``config`` on ``model``; raises (naming the model's layers) when a target fits nothing."""
    config = as_config(config)
    layer_cls = method_of(config).layer_cls
    layers = {}
    if layer_cls is not None:
        for name, slices in find_targets(model, list(config.targets)).items():
            linear = model.get_submodule(name)
            _require_plain_forward(name, linear)
            width = slices[0][1] - slices[0][0]
            layers[name] = LayerPlan(
                name, linear.in_features, linear.out_features, slices,
                tuple(layer_cls.plan_basis_specs(config, name, linear.in_features, width, slices)),
                {k: tuple(v) for k, v in layer_cls.parameter_shapes(config, linear.in_features, width,
                                                                     len(slices)).items()})
    head = classifier_head(model)
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    head_names = tuple(name for name, p in model.named_parameters() if id(p) in head_ids)
    if config.train_backbone:
        trained = {name: tuple(p.shape) for name, p in model.named_parameters()}
    else:
        trained = {f"{layer}.{param}": shape
                   for layer, plan in layers.items() for param, shape in plan.tensor_shapes.items()}
        trained.update({name: tuple(p.shape) for name, p in model.named_parameters() if id(p) in head_ids})
    return InjectionPlan(config, layers, trained, head_names)


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

    ``config`` is a registered method's config (``NOLAConfig``, ``LoRAConfig``, …), ``"linear"`` (train the
    head only) or ``"full"`` (train everything). Nothing is changed when the config or a target is invalid.
    """
    if getattr(model, STATE_ATTRIBUTE, None) is not None:
        raise ValueError(f"model already has {getattr(model, STATE_ATTRIBUTE).method!r} adapters; inject into a "
                         "fresh model")
    plan = plan_injection(model, config)  # validates before anything changes
    config = plan.config
    layer_cls = method_of(config).layer_cls
    for parameter in model.parameters():
        parameter.requires_grad_(config.train_backbone)
    head = classifier_head(model)
    if head is not None:
        head.requires_grad_(True)

    context = layer_cls.injection_context(config) if layer_cls is not None else {}
    for name, layer in plan.layers.items():
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        adapted: AdaptedLinear = layer_cls(getattr(parent, child_name), config, name, layer.slices, **context)
        activation = _recomputable_activation(parent, child_name) if config.recompute_activation else None
        if activation is not None:
            adapted.input_activation = activation
            parent.act = nn.Identity()
        setattr(parent, child_name, adapted)
    if has_shared_bases(model):
        model.register_forward_pre_hook(combine_shared_factors)
        model.register_forward_hook(release_shared_factors, always_call=True)
    layers = {name: layer.slices for name, layer in plan.layers.items()}
    setattr(model, STATE_ATTRIBUTE, AdapterState(config, layers, context.get("bank"), plan))
    return model


def adapter_state(model: nn.Module) -> Optional[AdapterState]:
    """The ``AdapterState`` that ``inject`` attached, or None for a plain model."""
    return getattr(model, STATE_ATTRIBUTE, None)


def basis_fingerprint(model: nn.Module) -> Optional[str]:
    """Fingerprint of every random basis the model's NOLA layers use (None without NOLA layers)."""
    specs: List[BasisSpec] = [s for layer in adapted_layers(model).values() for s in layer.basis_specs()]
    return fingerprint(specs) if specs else None


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
