"""unload / merge_and_unload: back to plain timm modules, keys and outputs."""
import copy

import pytest
import torch
from tiny_models import tiny_vit

import nola_vision as nv

CONFIGS = {
    "nola_shared": nv.NOLAConfig(rank=4, num_basis_a=32, num_basis_b=32, targets=["mlp.fc1", "mlp.fc2", "attn.q",
                                                                                   "attn.v"]),
    "nola_per_layer": nv.NOLAConfig(rank=2, num_basis_a=16, num_basis_b=16, basis="per_layer",
                                    targets=["mlp.fc2", "attn.proj"]),
    "lora_qv": nv.LoRAConfig(rank=4, targets=["attn.q", "attn.v", "mlp.fc2"]),
    "linear": "linear",
    "full": "full",
}


def trained_model(config):
    """An injected tiny ViT whose adapters hold random values (LoRA's B starts at zero), head untouched."""
    model = nv.inject(tiny_vit(), copy.deepcopy(config))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in nv.adapted_layers(model).values():
            for parameter in layer.adapter_parameters().values():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def assert_plain(model):
    fresh = tiny_vit()
    assert [type(m) for m in model.modules()] == [type(m) for m in fresh.modules()]
    assert list(model.state_dict()) == list(fresh.state_dict())
    assert not hasattr(model, "nola_adapter") and nv.adapted_layers(model) == {}
    assert not model._forward_pre_hooks and not model._forward_hooks and not model._forward_hooks_always_called
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_unload_gives_back_the_never_injected_model(name, merged, images):
    model = trained_model(CONFIGS[name])
    if merged:
        nv.merge(model)
    assert nv.unload(model) is model
    assert_plain(model)
    fresh = tiny_vit()
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-6 if merged else 0)
    with torch.no_grad():
        torch.testing.assert_close(model(images), fresh(images), rtol=0, atol=1e-5)
    nv.inject(model, CONFIGS[name])  # nothing left over that would block a new injection


@pytest.mark.parametrize("name", list(CONFIGS))
def test_merge_and_unload_keeps_the_adapted_outputs(name, images):
    model = trained_model(CONFIGS[name])
    with torch.no_grad():
        adapted = model(images)
    assert nv.merge_and_unload(model) is model
    assert_plain(model)
    with torch.no_grad():
        torch.testing.assert_close(model(images), adapted, rtol=0, atol=1e-5)


def test_unload_puts_the_recomputed_activation_back():
    model = trained_model(CONFIGS["nola_shared"])
    activations = [layer.input_activation for layer in nv.adapted_layers(model).values()
                   if layer.input_activation is not None]
    assert len(activations) == 2  # both blocks' fc2 recompute their input
    nv.unload(model)
    assert [block.mlp.act for block in model.blocks] == activations


def test_unload_refuses_a_model_without_adapters():
    with pytest.raises(ValueError, match="no nola_vision adapters"):
        nv.unload(tiny_vit())
