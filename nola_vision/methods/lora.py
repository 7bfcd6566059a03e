"""LoRA baseline on the same machinery (layers, slices, merge, files) as NOLA."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from ..config import AdapterConfig, as_target_list, register_method, require_positive
from ..layers import LoRALinear

DEFAULT_LORA_TARGETS = ("attn.q", "attn.v")


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA baseline on the same machinery: A kaiming-uniform, B zero, ΔW = (alpha/rank)·A·B.

    Args:
        rank: rank r.
        alpha: scaling numerator; ``None`` means alpha = rank (scale 1, as in the NOLA paper's baseline).
        targets: module-name suffixes or regexes; ``attn.q``/``attn.k``/``attn.v`` adapt one third of ``attn.qkv``.
        seed: seed of A's initialisation (portable generator, never the global RNG).
        recompute_activation: as in ``NOLAConfig``.
    """

    rank: int = 4
    alpha: Optional[float] = None
    targets: List[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    seed: int = 0
    recompute_activation: bool = True

    method = "lora"

    def __post_init__(self) -> None:
        self.targets = as_target_list(self.targets)
        require_positive(self, "rank")

    @property
    def scaling(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def describe(self) -> str:
        return f"LoRA r={self.rank} on {'+'.join(self.targets)}"


# Recipe chosen on validation (benchmarks/RESULTS.md): the paper's 5e-3 with the head at 3e-3 and no warm-up; 1e-2
# with a warm-up scored best at 5 shots but diverged on a split at 10.
register_method("lora", LoRAConfig, LoRALinear, default_lr=5e-3, default_head_lr=3e-3)
