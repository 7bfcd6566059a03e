"""LoRA baseline on the same machinery (layers, slices, merge, files) as NOLA."""
from ...core.registry import register_method
from .config import LoRAConfig
from .layer import LoRALinear

__all__ = ["LoRAConfig", "LoRALinear"]

# Recipe chosen on validation (benchmarks/RESULTS.md): the paper's 5e-3 with the head at 3e-3 and no warm-up; 1e-2
# with a warm-up scored best at 5 shots but diverged on a split at 10.
register_method("lora", LoRAConfig, LoRALinear, default_lr=5e-3, default_head_lr=3e-3)
