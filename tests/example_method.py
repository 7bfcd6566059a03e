"""The example of the guide "Adding a method" (docs/guides/adding-a-method.md): LoRA with a frozen random A, where
only B trains.

The whole method is this module: a config, a layer and one registration line. ``conftest.py`` imports it, so
it is registered for the whole test session and the method matrix (``method_matrix.py``) runs the full
contract on it like on the built-in methods, without any test naming it.
"""
import math
from dataclasses import dataclass, field
from typing import List

import torch
from torch import nn

import nola_vision as nv
from nola_vision.core.basis import portable_uniform
from nola_vision.core.config import as_target_list, require_integer, require_positive


@dataclass
class FrozenAConfig(nv.AdapterConfig):
    rank: int = 2
    targets: List[str] = field(default_factory=lambda: ["mlp.fc1"])
    seed: int = 0

    method = "frozen_a"
    scaling = 1.0

    def __post_init__(self):                      # refuse a wrong value by name, at construction
        self.targets = as_target_list(self.targets)
        require_positive(self, "rank")
        require_integer(self, "seed")


class FrozenALinear(nv.AdaptedLinear):
    adapter_parameter_names = ("fa_B",)

    def __init__(self, base, config, name, slices):
        super().__init__(base, slices, config.rank, config.scaling)
        n = len(self.slices) * self.in_features * self.rank
        a = portable_uniform(config.seed, f"{name}/A", n, 1 / math.sqrt(self.in_features))
        self.register_buffer("fa_A", a.view(len(self.slices), self.in_features, self.rank), persistent=False)
        shape = self.parameter_shapes(config, self.in_features, self.width, len(self.slices))["fa_B"]
        self.fa_B = nn.Parameter(torch.zeros(shape, device=base.weight.device))

    @classmethod
    def parameter_shapes(cls, config, in_features, width, num_slices):
        return {"fa_B": (num_slices, config.rank, width)}

    def factors(self):
        return self.fa_A, self.trained("fa_B")


nv.register_method("frozen_a", FrozenAConfig, FrozenALinear)
