"""LoRA's config: rank, alpha, targets and the seed of A's initialisation."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ...core.config import (
    AdapterConfig,
    as_target_list,
    require_bool,
    require_integer,
    require_nonzero,
    require_positive,
)

DEFAULT_LORA_TARGETS = ("attn.q", "attn.v")


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA baseline on the same machinery: A kaiming-uniform, B zero, ΔW = (alpha/rank)·A·B.

    Args:
        rank: rank r.
        alpha: scaling numerator; ``None`` means alpha = rank (scale 1, as in the NOLA paper's baseline).
        targets: module-name suffixes or regexes; ``attn.q``/``attn.k``/``attn.v`` adapt one third of ``attn.qkv``.
        seed: seed of A's initialisation (portable generator, never the global RNG; an int64).
        recompute_activation: as in ``NOLAConfig``.
    """

    rank: int = 4
    alpha: Optional[float] = None
    targets: List[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    seed: int = 0
    recompute_activation: bool = True

    method = "lora"
    training_only = ("seed", "recompute_activation")  # the seed draws A's initial values only

    def __post_init__(self) -> None:
        self.targets = as_target_list(self.targets)
        require_positive(self, "rank")
        require_integer(self, "seed")
        if self.alpha is not None:
            require_nonzero(self, "alpha", per=self.rank)
        require_bool(self, "recompute_activation")

    def update_settings(self) -> Dict[str, Any]:
        """As every config's, with ``alpha`` as the scaling gives it: ``None`` is ``alpha = rank``."""
        return {**super().update_settings(), "alpha": self.rank if self.alpha is None else self.alpha}

    @property
    def scaling(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def describe(self) -> str:
        return f"LoRA r={self.rank} on {'+'.join(self.targets)}"
