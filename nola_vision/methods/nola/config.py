"""NOLA's config: rank, numbers of bases, targets, basis seed, scale, basis mode and init."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from ...core.config import (
    AdapterConfig,
    as_target_list,
    require_bool,
    require_choice,
    require_integer,
    require_nonzero,
    require_positive,
)

BASIS_MODES = ("shared", "per_layer")
NOLA_INITS = ("paper", "zero_delta")
DEFAULT_NOLA_TARGETS = ("mlp.fc1", "mlp.fc2")


@dataclass
class NOLAConfig(AdapterConfig):
    """NOLA: A = Σ αᵢAᵢ, B = Σ βⱼBⱼ over frozen random bases; ΔW = (scale/rank)·A·B; only α, β train.

    Args:
        rank: rank r of A (in×r) and B (r×out).
        num_basis_a: k, the number of random bases (and trained coefficients α) for A.
        num_basis_b: l, the number of random bases (and trained coefficients β) for B.
        targets: module-name suffixes or regexes; ``attn.q``/``attn.k``/``attn.v`` adapt one third of ``attn.qkv``.
        seed: generator seed of the random bases (an integer in torch's int64 range).
        scale: c in ΔW = (c/r)·A·B.
        basis: ``"shared"`` (one basis set per shape, shared by all layers) or ``"per_layer"``
            (distinct bases per layer, regenerated in chunks in forward and backward).
        init: ``"paper"`` (α=1/k, β=1/l) or ``"zero_delta"`` (α=1/k, β=0, so ΔW=0 at step 0).
        recompute_activation: for an adapted ``mlp.fc2``, recompute its input (the activation output) in
            backward from the pre-activation the model keeps anyway, instead of storing it.
    """

    rank: int = 4
    num_basis_a: int = 1024
    num_basis_b: int = 1024
    targets: List[str] = field(default_factory=lambda: list(DEFAULT_NOLA_TARGETS))
    seed: int = 0
    scale: float = 1.0
    basis: str = "shared"
    init: str = "paper"
    recompute_activation: bool = True

    method = "nola"
    training_only = ("init", "recompute_activation")

    def __post_init__(self) -> None:
        self.targets = as_target_list(self.targets)
        require_positive(self, "rank", "num_basis_a", "num_basis_b")
        require_integer(self, "seed")
        require_nonzero(self, "scale", per=self.rank)
        require_choice(self, "basis", BASIS_MODES)
        require_choice(self, "init", NOLA_INITS)
        require_bool(self, "recompute_activation")

    @property
    def scaling(self) -> float:
        return self.scale / self.rank

    def describe(self) -> str:
        bases = (f"k=l={self.num_basis_a}" if self.num_basis_a == self.num_basis_b
                 else f"k={self.num_basis_a} l={self.num_basis_b}")
        return f"NOLA r={self.rank} {bases} on {'+'.join(self.targets)}"
