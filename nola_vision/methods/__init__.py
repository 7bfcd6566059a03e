"""The built-in adapter methods, one folder each; importing a method registers it (``core.registry``).

A new method is a folder like ``nola/``: ``config.py`` (its dataclass), ``layer.py`` (its ``AdaptedLinear``) and
an ``__init__.py`` that registers them with one ``register_method`` call.
"""
from .lora import LoRAConfig, LoRALinear
from .nola import NOLAConfig, NOLALinear
from .plain import FullFineTuneConfig, LinearProbeConfig, PlainConfig

__all__ = ["FullFineTuneConfig", "LinearProbeConfig", "LoRAConfig", "LoRALinear", "NOLAConfig", "NOLALinear",
           "PlainConfig"]
