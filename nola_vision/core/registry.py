"""The method registry: each adapter method is declared once, and everything else looks it up by name.

A method is a config dataclass (what a user sets) plus the layer class that wraps an ``nn.Linear`` (None for
the plain methods ``linear`` and ``full``) and its training recipe. The registry imports no method: each
method registers itself where it is defined (``nola_vision/methods/<name>/``).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Dict, List, Optional

from .checks import check_number
from .layer import AdaptedLinear

__all__ = ["DEFAULT_LR", "METHODS", "Method", "available_methods", "find_method", "get_method", "method_of",
           "register_method"]

# The paper's learning rate; a method registers its own recipe (benchmarks/RESULTS.md, "What NOLA needs").
DEFAULT_LR = 5e-3


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


def register_method(name: str, config_cls: type, layer_cls: Optional[type] = None, *,
                    default_lr: float = DEFAULT_LR, default_head_lr: Optional[float] = None,
                    default_warmup_fraction: float = 0.0) -> Method:
    """Declare an adapter method once: ``name`` (as in files and CLI), its config class and its layer class.

    The layer class subclasses ``nola_vision.AdaptedLinear`` and defines ``parameter_shapes`` and ``factors``; see
    the guide "Adding a method" (docs/guides). A name keeps its classes: another layer class under a registered name
    would silently load that method's files into it, so a variant takes a name of its own (a config subclass with
    another ``method``). A built-in method (lora, nola, linear, full) keeps its recipe too.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_method: name is a non-empty str (as files and the CLI name it), got {name!r}")
    for argument, value in (("config_cls", config_cls), ("layer_cls", layer_cls)):
        if not isinstance(value, type) and not (argument == "layer_cls" and value is None):
            raise TypeError(f"register_method: {argument} is a class{' or None' if argument == 'layer_cls' else ''}, "
                            f"got a {type(value).__name__}")
    _require_config_contract(name, config_cls, layer_cls is not None)
    if layer_cls is not None:
        _require_layer_contract(name, layer_cls)
    spelled = [other for other in METHODS if other != name and other.casefold() == name.casefold()]
    if spelled:  # names are looked up in any letter case: "Nola" would then find neither
        raise ValueError(f"adapter method {name!r} differs from the registered {spelled[0]!r} only in letter case, "
                         "which lookups ignore: choose another name")
    registered = METHODS[name].config_cls if name in METHODS else config_cls
    # The same class defined again (a notebook cell run twice) replaces its registration; any other class is refused.
    if _path(registered) != _path(config_cls):
        raise ValueError(f"adapter method {name!r} is already registered by {_path(registered)}: choose another name "
                         f"for {config_cls.__qualname__}")
    if getattr(config_cls, "method", None) != name:
        raise ValueError(f"{config_cls.__name__}.method must be {name!r} to register it under that name")
    # the recipe's rates, as FewShotClassifier checks a given lr (NaN, True or "0.1" trained or failed deep inside)
    default_warmup_fraction = check_number(default_warmup_fraction, "register_method: default_warmup_fraction",
                                           at_least=0, below=1)
    default_lr = check_number(default_lr, "register_method: default_lr", above=0, below=1e6)
    default_head_lr = check_number(default_head_lr, "register_method: default_head_lr", above=0, below=1e6,
                                   optional=True)
    method = Method(name, config_cls, layer_cls, default_lr, default_head_lr, default_warmup_fraction)
    if name in METHODS:
        _require_same_method(METHODS[name], method)
    METHODS[name] = method
    return method


# The class every config subclasses, by path: it lives in ``config``, which imports this module.
_ADAPTER_CONFIG = "nola_vision.core.config.AdapterConfig"


def _require_config_contract(name: str, config_cls: type, adapts_layers: bool) -> None:
    """Refuse a config class that is not a dataclass subclassing ``nola_vision.AdapterConfig`` (inject then failed on
    a missing field, or saving on ``dataclasses.asdict``), or, for a method that adapts layers, has no ``targets``
    field (the base's empty default adapted none: a linear probe under the method's name)."""
    if not any(_path(base) == _ADAPTER_CONFIG for base in config_cls.__mro__):
        raise TypeError(f"register_method({name!r}): {config_cls.__qualname__} is not a subclass of "
                        "nola_vision.AdapterConfig, which every method's config class is (see the guide 'Adding a "
                        "method')")
    if not is_dataclass(config_cls):
        raise TypeError(f"register_method({name!r}): {config_cls.__qualname__} is not a dataclass (decorate it with "
                        "@dataclasses.dataclass): its fields are what files and the CLI record")
    if adapts_layers and "targets" not in {f.name for f in fields(config_cls)}:
        raise TypeError(f"register_method({name!r}): {config_cls.__qualname__} has no targets field, the layers the "
                        "method adapts (without it, none): declare one, e.g. targets: List[str] = "
                        "field(default_factory=lambda: ['mlp.fc1', 'mlp.fc2'])")


def _require_layer_contract(name: str, layer_cls: type) -> None:
    """Refuse a layer class that is not an ``AdaptedLinear`` defining what every method must (else inject or the
    first forward pass fails later with a bare error)."""
    if not issubclass(layer_cls, AdaptedLinear):
        raise TypeError(f"register_method({name!r}): {layer_cls.__qualname__} is not a subclass of "
                        "nola_vision.AdaptedLinear, which every method's layer class is (see the guide 'Adding a "
                        "method')")
    missing = [member for member in ("parameter_shapes", "factors")
               if _function(layer_cls, member) is _function(AdaptedLinear, member)]
    if missing:
        raise TypeError(f"register_method({name!r}): {layer_cls.__qualname__} does not define "
                        f"{' and '.join(missing)}, which every method's layer class does (the shapes of its trained "
                        "tensors by name, and its factors A and B; see the guide 'Adding a method')")


def _function(cls: type, member: str) -> Any:
    """The function behind ``cls.member``, a method or a classmethod (bound to ``cls``, so compared by function)."""
    attribute = getattr(cls, member)
    return getattr(attribute, "__func__", attribute)


def _require_same_method(registered: Method, method: Method) -> None:
    """A name registered again keeps its layer class (a class defined again, as a notebook cell run twice does, has the
    same path); a built-in method keeps all of its registration."""
    if _path(registered.layer_cls) != _path(method.layer_cls):
        raise ValueError(f"adapter method {method.name!r} is registered with layer class "
                         f"{_path(registered.layer_cls)}: {_path(method.layer_cls)} under that name would load every "
                         f"{method.name!r} adapter file into it. Register it under a name of its own: a subclass of "
                         f"{method.config_cls.__qualname__} with method = 'my_{method.name}'")
    recipe = ("default_lr", "default_head_lr", "default_warmup_fraction")
    same = (_path(registered.config_cls) == _path(method.config_cls)  # its module reloaded: new classes, same paths
            and all(getattr(registered, field) == getattr(method, field) for field in recipe))
    if registered.config_cls.__module__.startswith("nola_vision.") and not same:
        raise ValueError(f"adapter method {method.name!r} is built in and keeps its registration (its recipe: lr "
                         f"{registered.default_lr}, head lr {registered.default_head_lr}, warm-up fraction "
                         f"{registered.default_warmup_fraction}); set the learning rates of a run where it trains "
                         "(FewShotClassifier, the CLI), or register a variant under a name of its own")


def available_methods() -> List[str]:
    """Names of every registered adapter method."""
    return list(METHODS)


def get_method(name: str) -> Method:
    """The registered method called ``name``, in any letter case (``find_method``); a ValueError lists the valid
    names."""
    method = find_method(name)
    if method is None:
        shown = repr(name) if isinstance(name, str) else f"of type {type(name).__name__}"
        raise ValueError(f"unknown adapter method {shown}; expected one of {available_methods()} (a method of your "
                         "own is known once the module that registers it, with nv.register_method, is imported)")
    return method


def find_method(name: Any) -> Optional[Method]:
    """The registered method called ``name`` in any letter case ("LoRA" is "lora"; ``register_method`` refuses
    names that differ only in case); None for any other."""
    if not isinstance(name, str):
        return None
    if name in METHODS:
        return METHODS[name]
    same_letters = [m for m in METHODS if m.casefold() == name.casefold()]
    return METHODS[same_letters[0]] if len(same_letters) == 1 else None


def method_of(config: Any) -> Method:
    """The registered method of a config object (or a method name)."""
    if isinstance(config, str):  # a name, in any letter case as get_method takes it
        config = getattr(find_method(config), "name", config)
    name = config if isinstance(config, str) else getattr(config, "method", None)
    if not isinstance(name, str) or name not in METHODS:
        raise TypeError(f"expected a config of one of {available_methods()} (e.g. NOLAConfig, LoRAConfig) or "
                        f"'linear'/'full', got {type(config).__name__}")
    registered, kind = METHODS[name].config_cls, type(config)
    if not isinstance(config, (str, registered)) and _path(kind) != _path(registered):
        raise TypeError(f"{_path(kind)} says method {name!r}, which is registered by {_path(registered)}: make the "
                        f"config with {registered.__qualname__}(...), or register {kind.__qualname__} under its own "
                        "name")
    return METHODS[name]


def _path(cls: Optional[type]) -> str:
    """``module.qualname``: a class defined again (a notebook cell run twice) has the same path as the one it replaced,
    so configs made before still count as the method's."""
    return "None" if cls is None else f"{cls.__module__}.{cls.__qualname__}"
