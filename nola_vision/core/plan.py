"""The injection plan: everything ``inject`` will do (targets, slices, shapes, bases, trained tensors), computed
without changing the model, so injection and adapter files are validated before anything is built."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

from torch import nn
from torch.nn.utils import parametrize

from .basis import BasisSpec, fingerprint
from .checks import check_bool
from .config import AdapterConfig, as_config, require_storable, resolve_adapter
from .layer import STATE_ATTRIBUTE, Slice, adapted_layers
from .registry import method_of
from .targets import (
    blocks_regex,
    classifier_head,
    find_targets,
    head_parameter_names,
    nested_suffix_matches,
    require_module,
    require_one_head,
    unwrap_model,
)
from .warn import warn_user

__all__ = ["InjectionPlan", "LayerPlan", "plan_injection"]


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
    # The config's fields as planned: the layers were computed from them (see ``require_planned_config``).
    planned_config: Dict[str, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "planned_config", self.config.to_dict())

    def require_planned_config(self) -> None:
        """Raise when ``config`` was changed after planning (``plan.config.rank = 8``): the planned layers, shapes and
        bases no longer match it, and files would record a config whose bases differ from the model's."""
        current = self.config.to_dict()
        changed = sorted(k for k in {**current, **self.planned_config}
                         if current.get(k) != self.planned_config.get(k))
        if changed:
            shown = ", ".join(f"{k}: {self.planned_config.get(k)!r} → {current.get(k)!r}" for k in changed)
            raise ValueError(f"the injection plan's config changed after plan_injection ({shown}), so its planned "
                             "layers no longer match it: make a new plan, nv.plan_injection(model, config), or inject "
                             "the config itself")

    def basis_fingerprint(self) -> Optional[str]:
        """Fingerprint of every random basis the plan uses (None without any)."""
        specs = [spec for layer in self.layers.values() for spec in layer.basis_specs]
        return fingerprint(specs) if specs else None

    def require_fits(self, model: nn.Module) -> None:
        """Raise unless every planned layer is, in ``model``, an ``nn.Linear`` of the planned size, the config's targets
        select exactly the planned layers and slices there, the classifier head has the planned parameters, and the
        model holds no adapter layers yet."""
        _require_no_adapters(model)
        for name, layer in self.layers.items():
            try:
                linear = model.get_submodule(name)
            except AttributeError:
                linear = None
            if not (isinstance(linear, nn.Linear) and (linear.in_features, linear.out_features)
                    == (layer.in_features, layer.out_features)):
                raise ValueError(f"the injection plan adapts {name} as a {layer.in_features}→{layer.out_features} "
                                 f"nn.Linear, which this model does not have: plan_injection(model, config) on this "
                                 "model")
        self._require_same_selection(model)
        current, planned = self._heads(model)
        if current != planned:
            raise ValueError(f"the injection plan was made for a model whose classifier head has {planned}, this "
                             f"model's has {current}: plan_injection(model, config) on this model")

    def _require_same_selection(self, model: nn.Module) -> None:
        """Raise unless the config's targets select, on ``model``, exactly the planned layers and slices: a plan made
        on another model (fewer blocks) would leave layers the config names unadapted, and its files would then not
        load onto this architecture."""
        if method_of(self.config).layer_cls is None:
            return
        fix = ("make the plan from this model, nv.plan_injection(model, config), or pass the config to inject "
               "itself")
        try:
            selected = find_targets(model, list(self.config.targets))
        except ValueError as error:
            raise ValueError(f"the injection plan's targets do not fit this model ({error}): {fix}") from error
        planned = {name: layer.slices for name, layer in self.layers.items()}
        if selected == planned:
            return
        extra = [name for name in selected if name not in planned]
        missing = [name for name in planned if name not in selected]
        other = [name for name in selected if name in planned and selected[name] != planned[name]]
        parts = [f"{what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                 for what, names in ((f"select {len(extra)} layer(s) the plan leaves out", extra),
                                     (f"do not select {len(missing)} planned layer(s)", missing),
                                     (f"select other slices of {len(other)} layer(s)", other)) if names]
        raise ValueError(f"the injection plan was made on another model: on this {type(model).__name__} its config's "
                         f"targets {list(self.config.targets)} {'; '.join(parts)}, so inject would adapt other layers "
                         "than the config records and its adapter files would not load onto this architecture: "
                         f"{fix}")

    def _heads(self, model: nn.Module) -> Tuple[Dict[str, Tuple[int, ...]], Dict[str, Tuple[int, ...]]]:
        """(the model's classifier head parameters, the plan's): names and shapes."""
        names = set(head_parameter_names(model))
        current = {name: tuple(p.shape) for name, p in model.named_parameters() if name in names}
        return current, {name: self.trained_shapes[name] for name in self.head_names}

    def require_same_trained(self, model: nn.Module) -> None:
        """``require_same_head``, and raise unless every other trained tensor still has its planned shape: a parameter
        replaced after inject (``layer.nola_beta = nn.Parameter(...)``) would be saved in a file no model loads, or
        fail a load halfway through copying a file's tensors into the model."""
        self.require_own_adapters(model)
        for name, layer in adapted_layers(model).items():
            layer.require_injected_identity(name)
        self.require_same_head(model)
        shapes = {name: tuple(parameter.shape) for name, parameter in model.named_parameters()}
        changed = [f"{name} has {shapes.get(name, 'no parameter')}, injected as {shape}"
                   for name, shape in self.trained_shapes.items()
                   if name not in self.head_names and shapes.get(name) != shape]
        if changed:
            raise ValueError(f"{len(changed)} trained tensor(s) changed after inject ({'; '.join(changed[:3])}"
                             f"{'; ...' if len(changed) > 3 else ''}): give them back their shapes, or re-inject "
                             "(nv.unload(model), then nv.inject(model, config))")

    def require_own_adapters(self, model: nn.Module) -> None:
        """Raise if ``model`` holds adapters this plan did not make: a submodule injected on its own after the model
        was (a linear probe or full fine-tuning adapts no layer there to refuse it). Files, counts and unload would
        take its layers for this injection's, in a file no model loads."""
        nested = next((name for name, module in model.named_modules() if name and hasattr(module, STATE_ATTRIBUTE)),
                      None)
        foreign = sorted(set(adapted_layers(model)) - set(self.layers))
        if nested is None and not foreign:
            return
        listed = f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}"
        where = (f"its submodule {nested} was injected on its own" if nested is not None else
                 f"layer(s) {listed} are adapted, which it did not adapt")
        fix = f"nv.unload(model.get_submodule({nested!r})) first" if nested is not None else "re-inject a fresh model"
        raise ValueError(f"the model holds adapters its {self.config.method!r} injection did not make ({where}): "
                         f"one model carries one injection; {fix}")

    def require_same_head(self, model: nn.Module) -> None:
        """Raise unless the model's classifier head has the parameters (names, shapes) this plan was made for:
        ``model.reset_classifier(n)`` after ``inject`` replaces the head that adapters, files and counts describe."""
        current, planned = self._heads(model)
        if current != planned:
            raise ValueError(
                "the classifier head changed after inject (model.reset_classifier? or weight_norm, spectral_norm, "
                "prune or quantize_dynamic applied to it, which rename or replace its parameters): it has "
                f"{current or 'no parameters'}, the adapters were injected with {planned}. Re-inject for the new "
                "head (nv.unload(model), then nv.inject(model, "
                "config)), or save the adapter from the adapted model before resetting its classifier"
            )


def _plain_linear_forwards() -> tuple:
    """Forwards that compute exactly ``F.linear(x, weight, bias)``: nn.Linear's and timm's (a torchscript cast)."""
    from timm.layers import Linear

    return nn.Linear.forward, Linear.forward


def _require_plain_forward(name: str, linear: nn.Linear) -> None:
    """Refuse an ``nn.Linear`` subclass with its own forward (a quantised linear), or one whose weight is parametrized
    or computed by a pre-hook (pruning, weight norm): the adapter would replace its forward, or freeze the weight."""
    if parametrize.is_parametrized(linear):
        raise ValueError(
            f"target {name} has parametrized tensors ({', '.join(linear.parametrizations)}; torch.nn.utils."
            "parametrize: weight_norm, spectral_norm, ...), which an adapter would freeze as a snapshot: remove the "
            "parametrization first (parametrize.remove_parametrizations(module, 'weight')) or leave the layer out of "
            "targets")
    if "weight" in linear._parameters and linear._parameters["weight"] is None:
        raise ValueError(f"target {name} has no weight (set to None), so it computes nothing an adapter could add to: "
                         "give it its weight back or leave it out of targets")
    computed = [key for key in ("weight", "bias") if key not in linear._parameters]
    if computed:
        owned = ", ".join(linear._parameters) or "none"
        raise ValueError(
            f"target {name}'s {' and '.join(computed)} is no parameter but computed before each call (torch.nn.utils."
            f"prune or the legacy torch.nn.utils.weight_norm; its parameters: {owned}), which an adapter would freeze "
            "as a snapshot: make it permanent first (prune.remove(module, 'weight'), "
            "torch.nn.utils.remove_weight_norm(module)) or leave the layer out of targets")
    if type(linear).forward not in _plain_linear_forwards():
        raise ValueError(
            f"target {name} is a {type(linear).__module__}.{type(linear).__qualname__}, an nn.Linear subclass with its "
            "own forward (e.g. a quantised linear), which an adapter would silently replace by F.linear on its "
            "weight: use a model with plain nn.Linear layers there (dequantise it first) or leave it out of targets"
        )


def _validated_copy(config: Union[AdapterConfig, str, Dict[str, Any]]) -> AdapterConfig:
    """A deep copy of the config, checked again as its constructor checks it: fields set after construction (a sweep
    reusing one object, ``cfg.rank = 0``) are refused as ``NOLAConfig(rank=0)`` is. A copy, so that changing the
    caller's config afterwards changes neither the plan, the injected model nor what its files record."""
    # a method name or dict as create_model and FewShotClassifier take it ("nola", "lora": their defaults; "linear",
    # "full"; a config's to_dict() or {class_path, init_args} form)
    config = copy.deepcopy(resolve_adapter(config) if isinstance(config, (str, dict)) else as_config(config))
    validate = getattr(config, "__post_init__", None)
    if validate is not None:
        validate()
    require_storable(config)
    return config


def _require_no_adapters(model: nn.Module) -> None:
    """Refuse a model that holds adapter layers (in a submodule: a wrapper of an injected model): the new injection
    would freeze them, and neither unload nor adapter files would handle both."""
    nested = next(iter(adapted_layers(model)), None)
    if nested is not None:
        raise ValueError(f"{type(model).__name__} already holds nola_vision adapter layers (first: {nested}): "
                         "nv.unload the module they were injected into first, or, to adapt a wrapper of an injected "
                         "model, inject into the injected model itself")


def _require_not_shared(model: nn.Module, names: List[str]) -> None:
    """Refuse a target reachable under a second module name, or whose weight another module shares (tied weights):
    inject replaces it under one name only, and merge folds ΔW into the weight the other module uses too."""
    module_names: Dict[int, List[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        module_names.setdefault(id(module), []).append(name)
    parameter_names: Dict[int, List[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        parameter_names.setdefault(id(parameter), []).append(name)
    for name in names:
        linear = model.get_submodule(name)
        aliases = [other for other in module_names[id(linear)] if other != name]
        if aliases:
            raise ValueError(f"target {name} is the same module as {aliases[0]}: an adapter would replace it under "
                             f"{name} only, and merge would change {aliases[0]} too. Use a separate layer for each "
                             "name (copy.deepcopy), or leave it out of targets")
        tied = [other for other in parameter_names[id(linear.weight)] if other != f"{name}.weight"]
        if tied:
            raise ValueError(f"target {name} shares its weight with {tied[0]} (tied weights): merge would fold ΔW into "
                             f"{tied[0]} too. Untie them first ({tied[0]} = nn.Parameter({tied[0]}.detach().clone())), "
                             "or leave it out of targets")


def _require_own_head(model: nn.Module) -> None:
    """Refuse a classifier head whose parameter a module outside it uses too (tied weights): training the head would
    change that module, which adapter files record as frozen, so the file would load onto no model built as this one
    is."""
    head = classifier_head(model)
    if head is None:
        return
    prefix = next(name for name, module in model.named_modules() if module is head)
    own = {id(p): f"{prefix}.{name}" for name, p in head.named_parameters()}
    outside = next(((own[id(p)], name) for name, p in model.named_parameters(remove_duplicate=False)
                    if id(p) in own and not name.startswith(f"{prefix}.")), None)
    if outside is not None:
        head_name, other = outside
        raise ValueError(f"the classifier head's {head_name} is the same tensor as {other} (tied weights): training "
                         f"the head would change {other}, which the adapter records as frozen. Untie them first "
                         f"({head_name} = nn.Parameter({head_name}.detach().clone())), or build the head apart")


# The most adapter values one injection allocates: 2**31 float32 values are 8 GiB before their gradients and optimiser
# state, over 30 times a rank-64 LoRA on every linear layer of ViT-g (6·10**7). A size beyond it is a slip (k=10**9),
# which would otherwise get the process killed for memory while inject allocates it.
MAX_ADAPTER_VALUES = 2**31
# The most int16 codes one set of random bases may have (4 GiB): a pass generates a set whole, so a slip in a basis
# count or rank (num_basis_a=10**6 on ViT-B is a 57 GiB bank) ended in an out-of-memory kill at the first pass.
MAX_BASIS_CODES = 2**31


def _require_allocatable(config: AdapterConfig, layers: Dict[str, LayerPlan]) -> None:
    """Refuse a config whose trained adapter tensors would hold more than ``MAX_ADAPTER_VALUES`` values, or one of
    whose sets of random bases more than ``MAX_BASIS_CODES`` codes, before any is allocated."""
    sizes = {(name, param): math.prod(shape) for name, layer in layers.items()
             for param, shape in layer.tensor_shapes.items()}
    total = sum(sizes.values())
    if total > MAX_ADAPTER_VALUES:
        name, param = max(sizes, key=sizes.get)
        shape = layers[name].tensor_shapes[param]
        # the fields whose value is the tensor's largest size (k, l or a rank): what a slip made huge
        fields = [f"{type(config).__name__}.{key}={value}" for key, value in config.to_dict().items()
                  if type(value) is int and value == max(shape)]
        raise ValueError(f"{config.describe()} would train {total:,} adapter values ({total * 4 / 2**30:,.0f} GiB as "
                         f"float32; {param} of {name} alone has shape {shape}), more than the {MAX_ADAPTER_VALUES:,} "
                         f"inject allocates: lower {' or '.join(fields) or 'the config field that sets its shape'}")
    _require_allocatable_bases(config, layers)


def _require_allocatable_bases(config: AdapterConfig, layers: Dict[str, LayerPlan]) -> None:
    specs = sorted({spec for layer in layers.values() for spec in layer.basis_specs}, key=lambda spec: spec.stream)
    if not specs:
        return
    largest = max(specs, key=lambda spec: spec.numel * spec.count)  # the first of equals: the message is stable
    codes = largest.numel * largest.count
    if codes > MAX_BASIS_CODES:
        # the config's sizes behind it: its count, and its shape's sides other than the layers' own widths (the rank)
        widths = {size for layer in layers.values() if largest in layer.basis_specs
                  for size in (layer.in_features, layer.slices[0][1] - layer.slices[0][0])}
        chosen = {largest.count, *(side for side in largest.shape if side not in widths)}
        sizes = {key: value for key, value in config.to_dict().items()
                 if type(value) is int and value > 1 and value in chosen}
        fields = [f"{type(config).__name__}.{key}={sizes[key]}" for key in sorted(sizes, key=sizes.get, reverse=True)]
        raise ValueError(f"{config.describe()} would generate {largest.count:,} random bases of shape "
                         f"{largest.shape} for {largest.stream} ({codes * 2 / 2**30:,.1f} GiB of int16 codes, "
                         f"generated for every pass), more than the {MAX_BASIS_CODES:,} codes inject allows for one "
                         f"set: lower {' or '.join(fields) or 'the number of bases or the rank'}")


def _warn_pointless_sizes(plan: InjectionPlan) -> None:
    """Warn once per reason the plan's sizes are pointless (``pointless_sizes``), naming the first layer of the
    sizes it holds for and how many more there are."""
    config, layer_cls = plan.config, method_of(plan.config).layer_cls
    found: Dict[str, List[LayerPlan]] = {}
    for layer in plan.layers.values():
        width = layer.slices[0][1] - layer.slices[0][0]
        for reason in layer_cls.pointless_sizes(config, layer.in_features, width):
            found.setdefault(reason, []).append(layer)
    for reason, planned in found.items():
        first, more = planned[0], len(planned) - 1
        width = first.slices[0][1] - first.slices[0][0]
        warn_user(f"{type(config).__name__} on {first.name} ({first.in_features}→{width})"
                  f"{f' and {more} more layer(s)' if more else ''}: {reason}")


def _warn_nested_matches(config: AdapterConfig, layers: List[str]) -> None:
    """Warn where a suffix target also adapts layers nested in a module whose own such layer it adapts (the
    relative-position MLP in the attention of ``vit_relpos_*``/MaxViT-rmlp blocks), naming a regex of the outer ones."""
    for pattern in config.targets:
        nested = nested_suffix_matches(pattern, layers)
        if nested:
            outer = [name for name in layers if name.endswith("." + pattern) and name not in nested]
            warn_user(f"target {pattern!r} also selects {len(nested)} layer(s) inside modules whose own {pattern} it "
                      f"adapts ({nested[0]}, ...: a relative-position MLP, say): they are adapted too, with their "
                      f"own coefficients. To adapt only the outer ones, target the regex r\"{blocks_regex(outer)}\" "
                      "instead")


def plan_injection(model: nn.Module, config: Union[AdapterConfig, str, Dict[str, Any]], *,
                   warn: bool = True) -> InjectionPlan:
    """The injection plan of ``config`` on ``model``; raises (naming the model's layers) when a target fits nothing.
    ``warn``: of sizes the config chose in vain (a rank above a layer's min(in, out)), for whoever chooses them; a
    file's plan is checked without (``load_adapter``)."""
    require_module(model, "plan_injection")
    check_bool(warn, "plan_injection: warn")
    config = _validated_copy(config)
    model = unwrap_model(model)  # the plan names the layers of the module a wrapper (torch.compile, DDP) runs
    require_one_head(model)
    _require_no_adapters(model)
    layer_cls = method_of(config).layer_cls
    layers = {}
    repeats: List[Tuple[str, str, str]] = []
    if layer_cls is not None:
        for name, slices in find_targets(model, list(config.targets), repeats).items():
            linear = model.get_submodule(name)
            _require_plain_forward(name, linear)
            width = slices[0][1] - slices[0][0]
            layers[name] = LayerPlan(
                name, linear.in_features, linear.out_features, slices,
                tuple(layer_cls.plan_basis_specs(config, name, linear.in_features, width, slices)),
                {k: tuple(v) for k, v in layer_cls.parameter_shapes(config, linear.in_features, width,
                                                                     len(slices)).items()})
        _require_not_shared(model, list(layers))
        _require_allocatable(config, layers)
    if not config.train_backbone:
        _require_own_head(model)
    head_names = head_parameter_names(model)
    if not (layers or head_names or config.train_backbone):
        raise ValueError(f"{config.method!r} would train nothing: {type(model).__name__} has no classifier head with "
                         "parameters (timm's get_classifier()). Create the model with num_classes > 0, or give a "
                         "wrapper module a get_classifier() method that returns its head")
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    if config.train_backbone:
        trained = shapes
    else:
        trained = {f"{layer}.{param}": shape
                   for layer, plan in layers.items() for param, shape in plan.tensor_shapes.items()}
        trained.update({name: shapes[name] for name in head_names})
    plan = InjectionPlan(config, layers, trained, head_names)
    if warn:
        _warn_pointless_sizes(plan)
        _warn_nested_matches(config, list(layers))
        if repeats:
            first, second, layer = repeats[0]
            warn_user(f"targets {first!r} and {second!r} both select {layer} (adapted once): the config records the "
                      "adapter spelled both ways, and a model injected with one spelling takes its files only as a "
                      "fresh model does, not by a task switch (nor a task-input ONNX graph of it); keep one of them")
    return plan
