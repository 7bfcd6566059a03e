"""The adapter config base and the one parser that turns any stored or typed form back into a config object.

Every method's config subclasses ``AdapterConfig``: a dataclass (what a user sets) that round-trips through
JSON, adapter files, Lightning hyper-parameters and the CLI. Methods are found in the registry, never named here.
"""
from __future__ import annotations

import importlib
import json
import os
import reprlib
from dataclasses import asdict, fields
from typing import Any, ClassVar, Dict, List, Sequence, Tuple, Union

from .checks import FLOAT32_MAX, FLOAT32_TINY, check_bool, check_choice, check_int, check_number, shown
from .registry import METHODS, available_methods, find_method, get_method, method_of

__all__ = ["AdapterConfig", "adapter_to_hparam", "as_config", "as_target_list", "config_from_dict",
           "require_bool", "require_choice", "require_finite", "require_integer", "require_nonzero", "require_positive",
           "require_storable", "resolve_adapter"]


class AdapterConfig:
    """Base of every method's config: a dataclass whose ``method`` class attribute is its registry name."""

    method: ClassVar[str] = ""
    # Plain methods: every backbone parameter trains (``full``) or none does (``linear``).
    train_backbone: ClassVar[bool] = False
    targets: Sequence[str] = ()
    recompute_activation: bool = False
    # Fields that shape training alone (initial values, memory), never the update that trained tensors give: a task
    # trained with other values of them loads into, and is served by, a model injected with these. Read from the
    # config's own class only: a variant that subclasses a config (its seed drawing a frozen tensor) inherits none.
    training_only: ClassVar[Tuple[str, ...]] = ("recompute_activation",)

    def to_dict(self) -> Dict[str, Any]:
        return {"method": self.method, **asdict(self)}  # type: ignore[call-overload]

    def same_update(self, other: AdapterConfig) -> bool:
        """Whether trained tensors give the same update under ``other`` as under this config: the same method and
        ``update_settings()``."""
        return self.update_settings() == other.update_settings()

    def update_settings(self) -> Dict[str, Any]:
        """The settings that decide the update trained tensors give: ``to_dict()`` less the class's own
        ``training_only`` fields, with the targets sorted (their order selects nothing: each layer's slices are
        sorted); ``1`` equals ``1.0`` in it. A method whose settings can spell one update two ways overrides it."""
        own = type(self).__dict__.get("training_only", AdapterConfig.training_only)
        # as a file stores them: a tuple field read back as a list is the same setting
        settings = {key: json.loads(json.dumps(value)) for key, value in self.to_dict().items() if key not in own}
        return {**settings, "targets": sorted(settings.get("targets") or ())}

    def serialize(self) -> Union[str, Dict[str, Any]]:
        """The config as adapter files and hyper-parameters store it."""
        return self.to_dict()

    def describe(self) -> str:
        """A short human description (tables, logs)."""
        return self.method


def as_config(config: Union[AdapterConfig, str]) -> AdapterConfig:
    """A config object for ``config``; a plain method name ("linear", "full") becomes its config."""
    if isinstance(config, str):
        method = find_method(config)
        if method is None or method.layer_cls is not None:
            plain = [m.name for m in METHODS.values() if m.layer_cls is None]
            raise ValueError(f"unknown adapter {config!r}; use a config object ({', '.join(_config_names())}) or "
                             f"one of {plain}")
        return method.config_cls()
    method_of(config)
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"{type(config).__qualname__} (method {config.method!r}) is not a subclass of "
                        "nola_vision.AdapterConfig, which every method's config is (a dataclass: see the guide "
                        "'Adding a method')")
    return config


def config_from_dict(data: Union[str, Dict[str, Any]]) -> AdapterConfig:
    """Inverse of ``serialize``: rebuilds a registered config, rejecting unknown methods and keys."""
    if isinstance(data, str):
        return as_config(data)
    if not isinstance(data, dict):
        raise ValueError(f"an adapter config is a dict with a 'method' key or a method name, got {type(data).__name__}")
    data = dict(data)
    if "method" not in data:
        raise ValueError(f"an adapter config dict needs a 'method' key, one of {available_methods()}")
    return _build(get_method(data.pop("method")).config_cls, data)


def _build(cls: type, values: Dict[str, Any]) -> AdapterConfig:
    """``cls(**values)``, refusing keys that are not fields of ``cls`` by name."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(map(str, set(values) - known))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; valid fields are {sorted(known)}")
    return cls(**values)


def resolve_adapter(adapter: Union[AdapterConfig, str, Dict[str, Any]]) -> AdapterConfig:
    """An adapter argument as ``inject`` takes it: a config object, from any form the CLI or a checkpoint gives.

    Accepts a config, a method name ("linear", "full", or "nola"/"lora" for their defaults), the ``to_dict()``
    form, ``{class_path, init_args}``, and the flat form LightningCLI writes to config.yaml/hparams.yaml.
    """
    if isinstance(adapter, AdapterConfig):
        method_of(adapter)
        return adapter
    if isinstance(adapter, str):
        method = find_method(adapter)
        if method is not None:
            return method.config_cls()
        folder = (f" ({adapter} is a folder: an adapter saved by nv.save_adapter loads onto a model created without "
                  "it with nv.load_adapter(model, folder))") if os.path.isdir(adapter) else ""
        raise ValueError(f"unknown adapter {adapter!r}{folder}: use {', '.join(repr(m) for m in METHODS)}, or a "
                         "config {class_path: nola_vision.NOLAConfig, init_args: {...}}")
    if isinstance(adapter, dict):
        if "class_path" in adapter:
            class_path, init_args = adapter["class_path"], adapter.get("init_args", {})
            config_cls = _config_class(class_path)
            if not isinstance(init_args, dict):
                raise ValueError(f"adapter init_args must be a mapping of {config_cls.__name__} fields, got "
                                 f"{shown(init_args)}")
            return _build(config_cls, init_args)
        if "method" in adapter:
            return config_from_dict(adapter)
        return _from_flat(adapter)
    raise TypeError(f"adapter must be a config ({', '.join(_config_names())}) or a method name, "
                    f"got {type(adapter).__name__}")


def _from_flat(values: Dict[str, Any]) -> AdapterConfig:
    """The first registered adapter config whose fields take every key: the built-in methods come first, so a
    method registered later never changes what a flat built-in config parses to. Keys that two built-in configs take
    (``rank`` and ``targets`` alone: LoRA or NOLA?) name no method, nor does an empty one (it built LoRA's defaults);
    the flat form LightningCLI writes holds every field, which tells them apart."""
    if not values:
        raise ValueError(f"an empty adapter config names no method: give a method name (one of "
                         f"{available_methods()}) or its fields with method: <name>")
    taking = [method for method in METHODS.values()
              if method.layer_cls is not None and set(values) <= {f.name for f in fields(method.config_cls)}]
    built_in = [method for method in taking if method.config_cls.__module__.startswith("nola_vision.")]
    if len(built_in) > 1:
        names = " and ".join(method.config_cls.__name__ for method in built_in)
        raise ValueError(f"the adapter config {sorted(values)} fits {names} alike: add method: <name> (one of "
                         f"{[method.name for method in built_in]}) to say which")
    for method in taking:
        return method.config_cls(**values)
    raise ValueError(f"no adapter config has all the fields {sorted(values)}; add method: <name> "
                     f"(one of {available_methods()})")


def require_storable(config: AdapterConfig) -> None:
    """Refuse a config field whose value an adapter file (JSON) cannot hold: a set, a tensor, a path, NaN (a method's
    own config class may declare fields of any type); found at inject, not when the trained adapter is saved."""
    for key, value in config.to_dict().items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise ValueError(f"{type(config).__name__}.{key}={reprlib.repr(value)} cannot be stored in an adapter "
                             "file (JSON) as it is: give it as a str, int, finite float, bool, None, or a list or dict "
                             "of them") from None


def _config_class(class_path: Any) -> type:
    """The registered config class ``class_path`` names: by its whole path (``_class_path``, the module that defines
    it, or one that re-exports it, imported as the CLI would), or a bare name that one registered class alone has;
    two classes of one name (``pkg_a.Config``, ``pkg_b.Config``) are never taken for each other."""
    configs = [m.config_cls for m in METHODS.values()]  # the plain methods' too: the CLI lists them as subclasses
    module, _, name = class_path.rpartition(".") if isinstance(class_path, str) else ("", "", None)
    exact = [cls for cls in configs if class_path in (_class_path(cls), f"{cls.__module__}.{cls.__qualname__}")]
    if exact:
        return exact[0]
    if module:  # a path: the class it names (importing its module registers its method), never one of its name only
        try:
            named_class = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            named_class = None
        found = [m.config_cls for m in METHODS.values() if m.config_cls is named_class]
        if found:
            return found[0]
        raise ValueError(f"adapter class_path {reprlib.repr(class_path)} names no registered config class "
                         f"({'its module cannot be imported, or lacks it' if named_class is None else 'not registered'}"
                         f"): use one of {[_class_path(cls) for cls in configs]} (a method of your own is known once "
                         "the module that registers it, with nv.register_method, is imported)")
    named = [cls for cls in configs if cls.__name__ == name]
    if len(named) == 1:
        return named[0]
    if named:
        raise ValueError(f"adapter class_path {reprlib.repr(class_path)}: {len(named)} registered configs are named "
                         f"{name} ({', '.join(_class_path(cls) for cls in named)}): give the whole path of one")
    raise ValueError(f"adapter class_path {reprlib.repr(class_path)}: use one of "
                     f"{[_class_path(cls) for cls in configs]} (a method of your own is known once the module that "
                     "registers it, with nv.register_method, is imported)")


def _class_path(cls: type) -> str:
    """The path a config class is named by in configs and checkpoints: ``nola_vision.<name>`` for the built-in
    ones, which the package exports, else its own module's."""
    module = "nola_vision" if cls.__module__.startswith("nola_vision.") else cls.__module__
    return f"{module}.{cls.__qualname__}"


def adapter_to_hparam(config: AdapterConfig) -> Union[str, Dict[str, Any]]:
    """``{class_path, init_args}`` for an adapter config (what LightningCLI and ``resolve_adapter`` parse), a plain
    method's name otherwise."""
    stored = config.serialize()
    if isinstance(stored, str):
        return stored
    init_args = {k: v for k, v in stored.items() if k != "method"}
    return {"class_path": _class_path(type(config)), "init_args": init_args}


def _config_names() -> List[str]:
    return [m.config_cls.__name__ for m in METHODS.values() if m.layer_cls is not None]


def as_target_list(targets: Any) -> List[str]:
    """Targets as a non-empty list of strings (a single string is one target), each once: a repeated target would
    be stored, counted in descriptions and compared as a different config, though it adapts the same layers."""
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"targets must be a module-name suffix or regex, or a list of them (e.g. ['mlp.fc1', "
                         f"'mlp.fc2']), got {shown(targets)}")
    if not targets:
        raise ValueError("targets must name at least one module, e.g. ['mlp.fc1', 'mlp.fc2']")
    return list(dict.fromkeys(targets))


def require_positive(config: Any, *names: str) -> None:
    """Each field an integer in [1, 2**63 - 1] (a size that reaches torch; a numpy integer is stored as ``int``)."""
    for name in names:
        object.__setattr__(config, name, check_int(getattr(config, name), _field(config, name), at_least=1,
                                                   int64=True))


def require_integer(config: Any, *names: str) -> None:
    """Each field an integer in torch's int64 range (a seed reaches its integer ops): a float, bool or string is
    refused, not rounded or parsed."""
    for name in names:
        object.__setattr__(config, name, check_int(getattr(config, name), _field(config, name), int64=True))


def require_finite(config: Any, *names: str) -> None:
    """Each field a finite real number: a NaN or inf scale would make every logit NaN at step 0."""
    for name in names:
        object.__setattr__(config, name, check_number(getattr(config, name), _field(config, name)))


def require_nonzero(config: Any, *names: str, per: int = 1) -> None:
    """Each field a finite, non-zero real number: a zero scale makes ΔW and every adapter gradient zero for good, and
    one that scales them below float32's smallest normal number leaves them subnormal or zero (nothing trains either).
    ``per``: what the field is divided by where it applies (the rank: ΔW is scaled by scale / rank)."""
    require_finite(config, *names)
    for name in names:
        value = getattr(config, name)
        if value == 0:
            raise ValueError(f"{_field(config, name)} is 0: ΔW and every adapter gradient would stay zero, so the "
                             "adapter could never train; use a non-zero value")
        if abs(value) / per < FLOAT32_TINY:
            applied = f", over rank {per} {value / per:g}," if per != 1 else ""
            raise ValueError(f"{_field(config, name)} is {value:g}{applied} below float32's smallest normal number "
                             f"({FLOAT32_TINY:.3g}): scaled by it, the factors, ΔW and every adapter gradient are "
                             "subnormal or zero in float32, so the adapter could never train; use a larger value")
        if abs(value) > FLOAT32_MAX:
            raise ValueError(f"{_field(config, name)} is {value:g}, beyond float32's largest number "
                             f"({FLOAT32_MAX:.4g}): the scaled factors would be infinite, and every output NaN; use a "
                             "smaller value")


def require_bool(config: Any, *names: str) -> None:
    """Each field ``True`` or ``False`` (a numpy bool is stored as ``bool``: it reaches the saved JSON)."""
    for name in names:
        object.__setattr__(config, name, check_bool(getattr(config, name), _field(config, name)))


def require_choice(config: Any, name: str, choices: Sequence[str]) -> None:
    """The field one of ``choices``."""
    check_choice(getattr(config, name), _field(config, name), choices)


def _field(config: Any, name: str) -> str:
    return f"{type(config).__name__}.{name}"
