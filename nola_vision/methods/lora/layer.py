"""LoRA's layer: trained factors A and B, on the same slices, merge and files as NOLA."""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ...core.basis import portable_uniform
from ...core.layer import AdaptedLinear, Slice
from .config import LoRAConfig

__all__ = ["LoRALinear"]


class LoRALinear(AdaptedLinear):
    """LoRA: trained A (kaiming-uniform, portable seed) and B (zero), ΔW = (alpha/r)·A·B."""

    adapter_parameter_names = ("lora_A", "lora_B")

    def __init__(
        self, base: nn.Linear, config: LoRAConfig, name: str, slices: Optional[Sequence[Slice]] = None
    ) -> None:
        self.require_config(config, LoRAConfig)
        super().__init__(base, slices, config.rank, config.scaling)
        num_slices, rank = len(self.slices), config.rank
        shapes = self.parameter_shapes(config, self.in_features, self.width, num_slices)
        # kaiming_uniform_(a=√5) of a (rank, in) weight has bound 1/√in; drawn from the portable generator.
        bound = 1 / math.sqrt(self.in_features)
        a = portable_uniform(config.seed, f"{name}/lora_A", num_slices * rank * self.in_features, bound)
        a = a.view(num_slices, rank, self.in_features).transpose(1, 2).contiguous()
        self.lora_A = nn.Parameter(a.to(base.weight.device))
        # float32 whatever torch's default dtype, as lora_A (inject gives a float64 layer's float64)
        self.lora_B = nn.Parameter(torch.zeros(shapes["lora_B"], dtype=torch.float32, device=base.weight.device))

    @classmethod
    def parameter_shapes(cls, config: LoRAConfig, in_features: int, width: int, num_slices: int
                         ) -> Dict[str, Tuple[int, ...]]:
        return {"lora_A": (num_slices, in_features, config.rank), "lora_B": (num_slices, config.rank, width)}

    def factors(self) -> Tuple[Tensor, Tensor]:
        return self.trained("lora_A"), self.trained("lora_B")
