"""An adapter loaded onto the state dict of a model it was merged into (``merge_and_unload``, whose record a state
dict loses) is refused, also where its update is under the fingerprint tolerance: LoRA and NOLA, shared and
per-layer bases, 4-bit files, bfloat16 copies. Clean copies, other tasks' updates and live task switches are not."""
import copy

import pytest
import torch
from tiny_models import as_if_trained, tiny_vit
from torch import nn

import nola_vision as nv

NOLA = dict(rank=2, num_basis_a=6, num_basis_b=4, seed=1, targets=["mlp.fc1", "mlp.fc2"])
CONFIGS = {  # with the scale of as_if_trained that keeps ΔW under the 1.6% tolerance (0.6-1.2% of each weight)
    "nola": (nv.NOLAConfig(**NOLA), 0.2),
    "nola per-layer": (nv.NOLAConfig(**NOLA, basis="per_layer"), 0.2),
    "lora": (nv.LoRAConfig(rank=2, seed=1, targets=["mlp.fc1", "mlp.fc2", "attn.qkv"]), 0.02),
}
MERGED = "already merged into the model's weights"


def saved(path, kind: str = "nola", seed: int = 1, bits: int = 16, scale: float = 0.0) -> nn.Module:
    """A tiny ViT with trained-looking adapters of ``kind`` (its own scale unless given), saved to ``path``."""
    config, default = CONFIGS[kind]
    model = as_if_trained(nv.inject(tiny_vit(), config), seed, scale or default, adapters_only=True)
    nv.save_adapter(model, path, bits=bits)
    return model


def as_state_dict(model: nn.Module) -> nn.Module:
    """A plain tiny ViT holding ``model``'s weights with its adapters folded in, as a saved state dict gives them."""
    nv.merge_and_unload(model)
    fresh = tiny_vit()
    fresh.load_state_dict(model.state_dict())
    return fresh


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("inject_first", [False, True])
def test_an_adapter_loaded_onto_the_state_dict_it_was_merged_into_is_refused(tmp_path, kind, inject_first):
    model = as_state_dict(saved(tmp_path / "a", kind))
    if inject_first:
        nv.inject(model, CONFIGS[kind][0])
    with pytest.raises(nv.AdapterLoadError, match=f"{MERGED}.*nv.merge_and_unload.*check_frozen_weights=False"):
        nv.load_adapter(model, tmp_path / "a")


def test_a_4_bit_file_and_a_bfloat16_copy_of_the_merged_weights_are_refused(tmp_path):
    merged = as_state_dict(saved(tmp_path / "a", bits=4))  # merged at full precision, saved at 4 bits
    with pytest.raises(nv.AdapterLoadError, match=MERGED):
        nv.load_adapter(copy.deepcopy(merged), tmp_path / "a")
    with pytest.raises(nv.AdapterLoadError, match=MERGED):  # ΔW (1%) beyond bfloat16's rounding (0.1%)
        nv.load_adapter(merged.to(torch.bfloat16), tmp_path / "a")


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_base_model_and_its_half_precision_copies_still_load(tmp_path, kind, dtype):
    trained = saved(tmp_path / "a", kind)
    model = nv.load_adapter(tiny_vit().to(dtype), tmp_path / "a")
    for name, layer in nv.adapted_layers(model).items():
        torch.testing.assert_close(layer.trained_values(), nv.adapted_layers(trained)[name].trained_values(),
                                   atol=1e-3, rtol=0)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_a_float32_copy_of_half_precision_weights_and_another_backbone_compute_no_update(tmp_path, monkeypatch, half):
    """A half-precision copy loaded back into float32 differs from the record by rounding only, and weights beyond the
    tolerance are refused as other weights: neither needs the file's update (on ViT-B, seconds of basis work)."""
    saved(tmp_path / "a")
    monkeypatch.setattr(nv.adapters.files, "_file_updates", lambda *a: pytest.fail("the file's update computed"))
    nv.load_adapter(tiny_vit().to(half).float(), tmp_path / "a")
    other = tiny_vit()
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(torch.randn_like(parameter))
    with pytest.raises(nv.AdapterLoadError, match="frozen weights are not those"):
        nv.load_adapter(other, tmp_path / "a")


@pytest.mark.parametrize("inject_first", [False, True])
def test_the_files_update_combines_each_shared_basis_once_for_all_layers(tmp_path, monkeypatch, inject_first):
    import nola_vision.core.merge as merge_module
    import nola_vision.methods.nola.layer as nola_layer

    merged = as_state_dict(saved(tmp_path / "a"))
    merged = nv.inject(merged, CONFIGS["nola"][0]) if inject_first else merged
    calls = []
    for module in (merge_module, nola_layer):
        original = module.combine_bases
        monkeypatch.setattr(module, "combine_bases", lambda *a, _original=original, **k: calls.append(1) or
                            _original(*a, **k))
    with pytest.raises(nv.AdapterLoadError, match=MERGED):
        nv.load_adapter(merged, tmp_path / "a")
    # once per shared basis (A and B of fc1's shape and of fc2's), not per layer and factor (8 here; ViT-B: 48, 14 s)
    assert len(calls) == 4


def test_another_tasks_merged_update_is_not_taken_for_this_one(tmp_path):
    """Another task folded into the float32 weights (a state dict, which carries no record of it) is refused as other
    weights, not as this adapter merged twice; under bfloat16's tolerance it loaded, with other outputs."""
    saved(tmp_path / "a")
    for scale in (1.0, 2.0):
        with pytest.raises(nv.AdapterLoadError, match=r"frozen weights are not those.*differ by about") as error:
            nv.load_adapter(as_state_dict(saved(tmp_path / "b", seed=2, scale=scale)), tmp_path / "a")
        assert MERGED not in str(error.value)


def test_a_live_merged_model_still_switches_tasks_in_place_and_the_check_can_be_skipped(tmp_path, images):
    trained = saved(tmp_path / "a")
    saved(tmp_path / "b", seed=2)
    live = nv.merge(nv.load_adapter(tiny_vit(), tmp_path / "b"))
    nv.load_adapter(live, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(live(images), nv.load_adapter(tiny_vit(), tmp_path / "a")(images), atol=1e-5,
                                   rtol=1e-4)
    merged = as_state_dict(copy.deepcopy(trained))
    weight = merged.blocks[0].mlp.fc1.weight.detach().clone()
    stacked = nv.load_adapter(merged, tmp_path / "a", check_frozen_weights=False)  # a deliberate opt-out
    delta = nv.adapted_layers(stacked)["blocks.0.mlp.fc1"].get_delta_weight()
    nv.merge_and_unload(stacked)
    torch.testing.assert_close(stacked.blocks[0].mlp.fc1.weight, weight + delta)


def test_an_adapter_close_to_the_merged_one_is_refused_naming_that_case(tmp_path):
    """The weights hold nearly this adapter's update when an earlier checkpoint of its run was merged: loading it would
    add almost the same update twice, and the message must not claim it is this very adapter."""
    model = as_state_dict(saved(tmp_path / "a"))
    near = saved(tmp_path / "tmp")  # the same as_if_trained values ...
    with torch.no_grad():
        for layer in nv.adapted_layers(near).values():
            for parameter in layer.adapter_parameters().values():
                parameter.mul_(1.05)  # ... 5% further along
    nv.save_adapter(near, tmp_path / "near")
    with pytest.raises(nv.AdapterLoadError, match=rf"or one whose update is close to its own.*{MERGED}"):
        nv.load_adapter(model, tmp_path / "near")


def test_an_adapter_trained_on_one_merge_is_refused_where_a_second_adapter_of_that_config_was_merged_too(tmp_path):
    """The merge records were compared by membership: weights holding two merges of one config (base + X1 + X2)
    passed for those holding one of them (base + X1), which an adapter trained on base + X1 was loaded onto."""
    config, scale = CONFIGS["lora"]

    def merged_onto(model, seed):
        return nv.merge_and_unload(as_if_trained(nv.inject(model, config), seed, scale, adapters_only=True))

    base_x1 = merged_onto(tiny_vit(), 1)
    trained = as_if_trained(nv.inject(copy.deepcopy(base_x1), nv.NOLAConfig(**{**NOLA, "targets": ["attn.qkv"]})), 3)
    nv.save_adapter(trained, tmp_path / "y")
    with pytest.raises(nv.AdapterLoadError, match=r"hold 1 adapter\(s\) folded in by nv.merge_and_unload"):
        nv.load_adapter(merged_onto(copy.deepcopy(base_x1), 2), tmp_path / "y")
    nv.load_adapter(copy.deepcopy(base_x1), tmp_path / "y")
