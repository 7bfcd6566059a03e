"""Adapter files: save, verify and load the 50-130 KB a ViT-B task trains; export them as a peft LoRA adapter."""
from .files import (
    AdapterLoadError,
    VerifiedAdapter,
    adapter_size_bytes,
    decode_tensors,
    load_adapter,
    read_adapter,
    save_adapter,
    verify_adapter,
)
from .peft import export_peft

__all__ = ["AdapterLoadError", "VerifiedAdapter", "adapter_size_bytes", "decode_tensors", "export_peft",
           "load_adapter", "read_adapter", "save_adapter", "verify_adapter"]
