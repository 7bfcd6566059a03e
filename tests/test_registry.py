"""Adding a method is one module plus one registration line: a toy method injects, trains, saves and loads."""
import math
from dataclasses import dataclass, field
from typing import List

import pytest
import torch
from tiny_models import tiny_vit
from torch import nn

import nola_vision as nv
from nola_vision.core.basis import portable_uniform
from nola_vision.core.config import adapter_to_hparam, resolve_adapter
from nola_vision.core.registry import METHODS


# ---- the whole example method (LoRA with a frozen random A: only B trains) ------------------------
@dataclass
class FrozenAConfig(nv.AdapterConfig):
    rank: int = 2
    targets: List[str] = field(default_factory=lambda: ["mlp.fc1"])
    seed: int = 0

    method = "frozen_a"
    scaling = 1.0


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
        return self.fa_A, self.trained("fa_B").float()
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def frozen_a():
    nv.register_method("frozen_a", FrozenAConfig, FrozenALinear)
    yield FrozenAConfig(targets=["mlp.fc1", "attn.v"])
    METHODS.pop("frozen_a")


def test_a_registered_method_trains_saves_and_loads_like_the_built_in_ones(tmp_path, frozen_a):
    assert "frozen_a" in nv.available_methods()
    model = nv.inject(tiny_vit(), frozen_a)
    assert nv.count_parameters(model)["adapter"] == 2 * (2 * 256 + 2 * 64)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(images).logsumexp(-1).mean().backward()
    optimizer.step()
    assert model.blocks[0].mlp.fc1.fa_B.abs().sum() > 0
    nv.save_adapter(model, tmp_path)
    loaded = nv.load_adapter(tiny_vit(), tmp_path)
    assert isinstance(loaded.blocks[1].attn.qkv, FrozenALinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=1e-3)
        nv.merge(loaded)
        torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=1e-3)
    assert resolve_adapter(adapter_to_hparam(frozen_a)) == frozen_a
    assert resolve_adapter(frozen_a.to_dict()) == frozen_a


def test_built_in_methods_and_plain_configs_come_from_the_registry():
    assert nv.available_methods()[:4] == ["lora", "nola", "linear", "full"]
    assert nv.get_method("nola").layer_cls is nv.NOLALinear and nv.get_method("linear").layer_cls is None
    assert nv.get_method("full").default_lr == 5e-5 and nv.get_method("nola").default_lr == 3e-2
    assert nv.get_method("nola").default_head_lr == 1e-2 and nv.get_method("lora").default_lr == 5e-3
    assert resolve_adapter("linear") == "linear" and resolve_adapter("linear").describe() == "head only"
    with pytest.raises(ValueError, match="already registered"):
        nv.register_method("nola", nv.LoRAConfig, nv.LoRALinear)
