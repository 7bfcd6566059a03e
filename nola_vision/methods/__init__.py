"""The built-in adapter methods, one module each; importing them registers them (see ``config.register_method``)."""
from .lora import LoRAConfig
from .nola import NOLAConfig
from .plain import FullFineTuneConfig, LinearProbeConfig, PlainConfig

__all__ = ["FullFineTuneConfig", "LinearProbeConfig", "LoRAConfig", "NOLAConfig", "PlainConfig"]
