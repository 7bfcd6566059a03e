"""The registry: built-in methods and recipes, and a method added in one module (``example_method.py``).

That the example method (like every registered one) injects, trains, saves, loads, merges, unloads, exports and
serves is checked by the method matrix (``test_methods.py``); here only what is particular to it.
"""
import pytest
from example_method import FrozenAConfig, FrozenALinear
from tiny_models import tiny_vit

import nola_vision as nv
from nola_vision.core.config import adapter_to_hparam, resolve_adapter
from nola_vision.core.registry import METHODS


def test_a_method_registered_by_its_own_module_is_found_by_name_and_counted_exactly(tmp_path):
    assert "frozen_a" in nv.available_methods() and nv.get_method("frozen_a").layer_cls is FrozenALinear
    config = FrozenAConfig(targets=["mlp.fc1", "attn.v"])
    model = nv.inject(tiny_vit(), config)
    assert nv.count_parameters(model)["adapter"] == 2 * (2 * 256 + 2 * 64)  # 2 blocks x B of fc1 (2x256), v (2x64)
    nv.save_adapter(model, tmp_path)
    loaded = nv.load_adapter(tiny_vit(), tmp_path)
    assert isinstance(loaded.blocks[1].attn.qkv, FrozenALinear) and loaded.blocks[1].attn.qkv.slices == ((128, 192),)
    assert resolve_adapter(adapter_to_hparam(config)) == config
    assert resolve_adapter(config.to_dict()) == config


def test_built_in_methods_and_plain_configs_come_from_the_registry():
    assert nv.available_methods()[:4] == ["lora", "nola", "linear", "full"]
    assert nv.get_method("nola").layer_cls is nv.NOLALinear and nv.get_method("linear").layer_cls is None
    assert nv.get_method("full").default_lr == 5e-5 and nv.get_method("nola").default_lr == 3e-2
    assert nv.get_method("nola").default_head_lr == 1e-2 and nv.get_method("lora").default_lr == 5e-3
    assert resolve_adapter("linear") == "linear" and resolve_adapter("linear").describe() == "head only"
    with pytest.raises(ValueError, match="already registered"):
        nv.register_method("nola", nv.LoRAConfig, nv.LoRALinear)
    with pytest.raises(ValueError, match="FrozenAConfig.method must be 'other'"):
        nv.register_method("other", FrozenAConfig, FrozenALinear)
    assert "other" not in nv.available_methods()


def test_a_method_class_defined_again_in_a_rerun_cell_replaces_its_registration():
    namespace: dict = {}
    cell = ("from dataclasses import dataclass\nimport nola_vision as nv\n"
            "@dataclass\nclass RerunConfig(nv.LoRAConfig):\n    method: str = 'rerun_lora'\n"
            "nv.register_method('rerun_lora', RerunConfig, nv.LoRALinear)\n")
    for _ in range(2):  # the same cell, twice: a new class object with the same module and name
        exec(compile(cell, "<notebook cell>", "exec"), namespace)
    assert nv.get_method("rerun_lora").config_cls is namespace["RerunConfig"]
    with pytest.raises(ValueError, match="already registered by .*RerunConfig: choose another name for LoRAConfig"):
        nv.register_method("rerun_lora", nv.LoRAConfig, nv.LoRALinear)
    del METHODS["rerun_lora"]
