"""nola_vision: few-shot transfer of timm Vision Transformers with NOLA adapters."""

__version__ = "0.1.0"
