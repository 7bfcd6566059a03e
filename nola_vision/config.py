"""Adapter configurations and the method registry: each method is declared once, everything else looks it up.

A method is a config dataclass (what a user sets; round-trips through JSON) plus the layer class that
wraps an ``nn.Linear`` (None for the plain methods ``linear`` and ``full``). ``register_method`` adds
one; injection, adapter files, the LightningModule, the timm zoo and the demo find it by name here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Union

# The paper's learning rate; a method registers its own recipe (benchmarks/RESULTS.md, "What NOLA needs").
DEFAULT_LR = 5e-3


class AdapterConfig:
    """Base of every method's config: a dataclass whose ``method`` class attribute is its registry name."""

    method: ClassVar[str] = ""
    # Plain methods: every backbone parameter trains (``full``) or none does (``linear``).
    train_backbone: ClassVar[bool] = False
    targets: Sequence[str] = ()
    recompute_activation: bool = False

    def to_dict(self) -> Dict[str, Any]:
        return {"method": self.method, **asdict(self)}  # type: ignore[call-overload]

    def serialize(self) -> Union[str, Dict[str, Any]]:
        """The config as adapter files and hyper-parameters store it."""
        return self.to_dict()

    def describe(self) -> str:
        """A short human description (tables, logs)."""
        return self.method


@dataclass(frozen=True)
class Method:
    """A registered adapter method: its name, config class, layer class (None: no adapter layers) and its recipe:
    the default learning rates (adapter, and head; a head lr of None means the adapter's) and the share of the
    epochs spent warming up (rounded to whole epochs)."""

    name: str
    config_cls: type
    layer_cls: Optional[type]
    default_lr: float = DEFAULT_LR
    default_head_lr: Optional[float] = None
    default_warmup_fraction: float = 0.0


METHODS: Dict[str, Method] = {}


def register_method(name: str, config_cls: type, layer_cls: Optional[type] = None,
                    default_lr: float = DEFAULT_LR, default_head_lr: Optional[float] = None,
                    default_warmup_fraction: float = 0.0) -> Method:
    """Declare an adapter method once: ``name`` (as in files and CLI), its config class and its layer class.

    The layer class subclasses ``nola_vision.layers.AdaptedLinear``; see the README's "Adding a method".
    """
    if name in METHODS and METHODS[name].config_cls is not config_cls:
        raise ValueError(f"adapter method {name!r} is already registered by {METHODS[name].config_cls.__name__}")
    if getattr(config_cls, "method", None) != name:
        raise ValueError(f"{config_cls.__name__}.method must be {name!r} to register it under that name")
    if not 0.0 <= default_warmup_fraction < 1.0:
        raise ValueError(f"default_warmup_fraction must be in [0, 1), got {default_warmup_fraction}")
    METHODS[name] = Method(name, config_cls, layer_cls, default_lr, default_head_lr, default_warmup_fraction)
    return METHODS[name]


def available_methods() -> List[str]:
    """Names of every registered adapter method."""
    return list(METHODS)


def get_method(name: str) -> Method:
    """The registered method called ``name``; a ValueError lists the valid names."""
    if name not in METHODS:
        raise ValueError(f"unknown adapter method {name!r}; expected one of {available_methods()}")
    return METHODS[name]


def method_of(config: Any) -> Method:
    """The registered method of a config object (or a method name)."""
    name = config if isinstance(config, str) else getattr(config, "method", None)
    if not isinstance(name, str) or name not in METHODS or not isinstance(config, (str, METHODS[name].config_cls)):
        raise TypeError(f"expected a config of one of {available_methods()} (e.g. NOLAConfig, LoRAConfig) or "
                        f"'linear'/'full', got {type(config).__name__}")
    return METHODS[name]


def as_config(config: Union[AdapterConfig, str]) -> AdapterConfig:
    """A config object for ``config``; a plain method name ("linear", "full") becomes its config."""
    if isinstance(config, str):
        method = METHODS.get(config)
        if method is None or method.layer_cls is not None:
            plain = [m.name for m in METHODS.values() if m.layer_cls is None]
            raise ValueError(f"unknown adapter {config!r}; use a config object ({', '.join(_config_names())}) or "
                             f"one of {plain}")
        return method.config_cls()
    method_of(config)
    return config


def config_from_dict(data: Union[str, Dict[str, Any]]) -> AdapterConfig:
    """Inverse of ``serialize``: rebuilds a registered config, rejecting unknown methods and keys."""
    if isinstance(data, str):
        return as_config(data)
    if not isinstance(data, dict):
        raise ValueError(f"an adapter config is a dict with a 'method' key or a method name, got {type(data).__name__}")
    data = dict(data)
    cls = get_method(data.pop("method", None)).config_cls
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; valid fields are {sorted(known)}")
    return cls(**data)


def resolve_adapter(adapter: Union[AdapterConfig, str, Dict[str, Any]]) -> AdapterConfig:
    """An adapter argument as ``inject`` takes it: a config object, from any form the CLI or a checkpoint gives.

    Accepts a config, a method name ("linear", "full", or "nola"/"lora" for their defaults), the ``to_dict()``
    form, ``{class_path, init_args}``, and the flat form LightningCLI writes to config.yaml/hparams.yaml.
    """
    if isinstance(adapter, AdapterConfig):
        method_of(adapter)
        return adapter
    if isinstance(adapter, str):
        if adapter.lower() in METHODS:
            return get_method(adapter.lower()).config_cls()
        raise ValueError(f"unknown adapter {adapter!r}: use {', '.join(repr(m) for m in METHODS)}, or a config "
                         "{class_path: nola_vision.NOLAConfig, init_args: {...}}")
    if isinstance(adapter, dict):
        if "class_path" in adapter:
            name = str(adapter["class_path"]).rsplit(".", 1)[-1]
            matches = [m.config_cls for m in METHODS.values() if m.config_cls.__name__ == name]
            if not matches:
                raise ValueError(f"adapter class_path {adapter['class_path']!r}: use one of "
                                 f"{[f'nola_vision.{n}' for n in _config_names()]}")
            return matches[0](**adapter.get("init_args", {}))
        if "method" in adapter:
            return config_from_dict(adapter)
        return _from_flat(adapter)
    raise TypeError(f"adapter must be a config ({', '.join(_config_names())}) or a method name, "
                    f"got {type(adapter).__name__}")


def _from_flat(values: Dict[str, Any]) -> AdapterConfig:
    """The smallest registered adapter config whose fields take every key (LoRA's {rank, alpha} before NOLA's)."""
    candidates = [m.config_cls for m in METHODS.values() if m.layer_cls is not None
                  and set(values) <= {f.name for f in fields(m.config_cls)}]
    if not candidates:
        raise ValueError(f"no adapter config has all the fields {sorted(values)}; add method: <name> "
                         f"(one of {available_methods()})")
    return min(candidates, key=lambda cls: len(fields(cls)))(**values)


def adapter_to_hparam(config: AdapterConfig) -> Union[str, Dict[str, Any]]:
    """``{class_path, init_args}`` for an adapter config (what LightningCLI and ``resolve_adapter`` parse), a plain
    method's name otherwise."""
    stored = config.serialize()
    if isinstance(stored, str):
        return stored
    init_args = {k: v for k, v in stored.items() if k != "method"}
    cls = type(config)
    module = "nola_vision" if cls.__module__.startswith("nola_vision.") else cls.__module__
    return {"class_path": f"{module}.{cls.__qualname__}", "init_args": init_args}


def _config_names() -> List[str]:
    return [m.config_cls.__name__ for m in METHODS.values() if m.layer_cls is not None]


def as_target_list(targets: Any) -> List[str]:
    """Targets as a non-empty list of strings (a single string is one target)."""
    if isinstance(targets, str):
        targets = [targets]
    targets = [str(t) for t in targets]
    if not targets:
        raise ValueError("targets must name at least one module, e.g. ['mlp.fc1', 'mlp.fc2']")
    return targets


def require_positive(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive integer, got {value!r}")


def require_choice(name: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {list(choices)}")


# The built-in methods register themselves on import (after the base classes above exist).
from .methods import LoRAConfig, NOLAConfig, PlainConfig  # noqa: E402

PLAIN_METHODS = tuple(m.name for m in METHODS.values() if m.layer_cls is None)

__all__ = ["AdapterConfig", "LoRAConfig", "METHODS", "Method", "NOLAConfig", "PLAIN_METHODS", "PlainConfig",
           "adapter_to_hparam", "as_config", "available_methods", "config_from_dict", "get_method", "method_of",
           "register_method", "resolve_adapter"]
