"""nola_vision: few-shot transfer of timm Vision Transformers with NOLA adapters."""

__version__ = "0.1.0"

from .config import LoRAConfig, NOLAConfig
from .inject import adapted_layers, count_parameters, inject, merge, set_quantization_aware, unmerge
from .layers import LoRALinear, NOLALinear
from .io import AdapterLoadError, adapter_size_bytes, load_adapter, save_adapter
from .zoo import create_model  # importing registers the *_nola models with timm
