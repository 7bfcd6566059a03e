"""Misuse that core used to accept silently or refuse with a confusing error: hooks on an adapted fc2 whose
activation inject took over, tied or aliased targets, injecting around an injected model, configs and plans changed
after they were made, a method registered again, and a model name passed where a model is expected."""
import dataclasses

import lightning as L
import pytest
import torch
from tiny_models import as_if_trained, tiny_vit
from torch import nn

import nola_vision as nv
from nola_vision.core.registry import METHODS

SMALL_NOLA = dict(rank=2, num_basis_a=8, num_basis_b=8)


def test_a_hook_on_an_adapted_fc2_sees_its_real_input_and_unload_still_restores_the_model(images, tmp_path):
    plain = tiny_vit()
    model = nv.inject(tiny_vit(), nv.NOLAConfig(**SMALL_NOLA, init="zero_delta"))  # ΔW = 0: the plain outputs
    assert model.blocks[0].mlp.fc2.input_activation is not None  # inject took mlp.act over
    seen = {}
    for name, m in (("plain", plain), ("adapted", model)):
        m.blocks[0].mlp.fc2.register_forward_pre_hook(lambda module, args, name=name: seen.setdefault(name, args[0]))
        m.blocks[1].mlp.fc2.register_forward_hook(lambda module, args, output: output * 0.5)
        m.blocks[1].mlp.fc2.register_forward_pre_hook(lambda module, args: (args[0].clamp(min=0.0),))  # edits it
        m(images)
    torch.testing.assert_close(seen["adapted"], seen["plain"], rtol=0, atol=0)
    torch.testing.assert_close(model(images), plain(images))
    assert isinstance(model.blocks[0].mlp.act, nn.GELU) and model.blocks[0].mlp.fc2.input_activation is None
    # the unhooked layers keep recomputing their activation; unload gives back the plain modules either way
    reference = tiny_vit()
    nv.unload(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    assert model.state_dict().keys() == reference.state_dict().keys()


def test_an_adapted_fc2_that_gave_its_activation_back_trains_saves_and_loads_as_before(images, tmp_path):
    config = nv.LoRAConfig(rank=2, targets=["mlp.fc2"])
    hooked = as_if_trained(nv.inject(tiny_vit(), config), 1, adapters_only=True)
    reference = as_if_trained(nv.inject(tiny_vit(), dataclasses.replace(config, recompute_activation=False)), 1,
                              adapters_only=True)
    grad_inputs = []
    for m in (hooked, reference):
        m.blocks[1].mlp.fc2.register_full_backward_hook(lambda module, grad_input, grad_output:
                                                        grad_inputs.append(grad_input[0]))
        m(images).square().sum().backward()
    torch.testing.assert_close(grad_inputs[0], grad_inputs[1])  # the gradient of fc2's real input
    torch.testing.assert_close(hooked.blocks[0].mlp.fc2.lora_A.grad, reference.blocks[0].mlp.fc2.lora_A.grad)
    nv.save_adapter(hooked, tmp_path, bits=32)
    torch.testing.assert_close(nv.load_adapter(tiny_vit(), tmp_path)(images), hooked(images))


def test_removing_the_last_hook_takes_the_activation_over_again(images):
    """A model summary registers a hook on every layer and removes it: the recompute stayed off for the whole fit,
    keeping every fc2's activation output in memory."""
    from lightning.pytorch.utilities.model_summary import ModelSummary

    model = nv.inject(tiny_vit(), nv.NOLAConfig(**SMALL_NOLA))
    fc2 = model.blocks[0].mlp.fc2
    first = fc2.register_forward_hook(lambda *args: None)
    second = fc2.register_forward_pre_hook(lambda *args: None)
    first.remove()
    assert fc2.input_activation is None and isinstance(model.blocks[0].mlp.act, nn.GELU)  # one hook is left
    with second:
        pass
    assert isinstance(fc2.input_activation, nn.GELU) and not isinstance(model.blocks[0].mlp.act, nn.GELU)

    class Wrapped(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

    ModelSummary(Wrapped(), max_depth=-1)
    assert all(block.mlp.fc2.input_activation is not None for block in model.blocks)
    torch.testing.assert_close(model(images), nv.inject(tiny_vit(), nv.NOLAConfig(**SMALL_NOLA))(images))


def test_a_hook_removed_after_unload_leaves_the_plain_model_alone():
    model = nv.inject(tiny_vit(), nv.NOLAConfig(**SMALL_NOLA))
    handle = model.blocks[0].mlp.fc2.register_forward_hook(lambda *args: None)
    nv.unload(model)
    handle.remove()
    assert isinstance(model.blocks[0].mlp.act, nn.GELU) and type(model.blocks[0].mlp.fc2) is nn.Linear


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc, self.dec, self.fc = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.dec.weight = self.enc.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dec(torch.relu(self.enc(x))))

    def get_classifier(self) -> nn.Module:
        return self.fc


class _Aliased(_Tied):
    def __init__(self) -> None:
        super().__init__()
        self.dec = self.enc  # one module under two names


@pytest.mark.parametrize("model, match", [(_Tied(), "target enc shares its weight with dec.weight"),
                                          (_Aliased(), "target enc is the same module as dec")])
def test_a_target_whose_weight_or_module_another_name_shares_is_refused(model, match):
    for call in (nv.plan_injection, nv.inject):
        with pytest.raises(ValueError, match=match):
            call(model, nv.LoRAConfig(rank=2, targets=["enc"]))
    assert not nv.adapted_layers(model)


@pytest.mark.parametrize("config", ["linear", nv.LoRAConfig(rank=2, targets=["enc"])])
def test_a_head_whose_weight_a_backbone_layer_shares_is_refused_naming_both(config):
    """Training the head changed the tied layer, which the file recorded as frozen: no model built as the trained one
    took the file (refused as "other frozen weights")."""
    model = _Tied()
    model.fc.weight = nn.Parameter(torch.zeros(3, 8))
    model.dec = nn.Linear(8, 3)
    model.dec.weight = model.fc.weight
    with pytest.raises(ValueError, match=r"the classifier head's fc\.weight is the same tensor as dec\.weight \(tied "
                                         r"weights\).*Untie them first"):
        nv.inject(model, config)
    assert not nv.adapted_layers(model)
    nv.inject(model, "full")  # every weight trains: the tie holds as in the model


class _Wrapper(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


@pytest.mark.parametrize("inner_config", [nv.LoRAConfig(rank=2, targets=["mlp.fc1"]), "linear"])
def test_injecting_around_an_injected_model_is_refused_and_leaves_it_training(inner_config):
    inner = nv.inject(tiny_vit(), inner_config)
    trainable = {name for name, p in inner.named_parameters() if p.requires_grad}
    wrapper = _Wrapper(inner)
    with pytest.raises(ValueError, match=r"submodule inner .*nv.unload\(model.inner\) first"):
        nv.inject(wrapper, nv.LoRAConfig(rank=2, targets=["mlp.fc2"]))
    if inner_config != "linear":
        with pytest.raises(ValueError, match=r"already holds nola_vision adapter layers \(first: inner.blocks.0"):
            nv.plan_injection(wrapper, nv.LoRAConfig(rank=2, targets=["mlp.fc2"]))
    assert {name for name, p in inner.named_parameters() if p.requires_grad} == trainable


@pytest.mark.parametrize("cls, field, value", [
    (nv.NOLAConfig, "rank", 0), (nv.NOLAConfig, "rank", -2), (nv.NOLAConfig, "num_basis_a", 0),
    (nv.NOLAConfig, "scale", float("nan")), (nv.NOLAConfig, "basis", "per-layer"), (nv.NOLAConfig, "init", "zero"),
    (nv.LoRAConfig, "alpha", 0.0), (nv.LoRAConfig, "rank", 0)])
def test_a_config_changed_after_construction_is_validated_again(cls, field, value):
    config = cls(rank=2, **({"num_basis_a": 4, "num_basis_b": 4} if cls is nv.NOLAConfig else {}))
    setattr(config, field, value)
    model = tiny_vit()
    for call in (nv.plan_injection, nv.inject):
        with pytest.raises(ValueError, match=f"{cls.__name__}.{field}"):
            call(model, config)
    assert not nv.adapted_layers(model)


def test_a_plan_whose_config_changed_after_planning_is_refused():
    model = tiny_vit()
    plan = nv.plan_injection(model, nv.NOLAConfig(**SMALL_NOLA))
    plan.config.rank = 3
    with pytest.raises(ValueError, match="config changed after plan_injection \\(rank: 2 → 3\\)"):
        nv.inject(model, plan)
    assert not nv.adapted_layers(model)


def _define_config() -> type:
    """A notebook cell that defines and registers a method; running it twice redefines the class."""
    @dataclasses.dataclass
    class ProbeFConfig(nv.LoRAConfig):
        method = "probe_f_lora"

    ProbeFConfig.__qualname__ = "ProbeFConfig"
    nv.register_method("probe_f_lora", ProbeFConfig, nv.LoRALinear)
    return ProbeFConfig


def test_a_config_made_before_its_method_was_registered_again_still_injects():
    try:
        config = _define_config()(rank=2)
        _define_config()  # the cell run again
        model = nv.inject(tiny_vit(), config)
        assert nv.adapted_layers(model) and nv.get_method("probe_f_lora").config_cls is not type(config)
    finally:
        METHODS.pop("probe_f_lora", None)


@pytest.mark.parametrize("call", [nv.inject, nv.plan_injection])
def test_a_model_name_or_none_instead_of_a_model_is_a_type_error_that_says_what_to_pass(call):
    with pytest.raises(TypeError, match=r"got the string 'vit_tiny_patch16_224'.*nv.create_model\("):
        call("vit_tiny_patch16_224", nv.LoRAConfig())
    with pytest.raises(TypeError, match="takes a model .*got a NoneType"):
        call(None, nv.LoRAConfig())
    with pytest.raises(TypeError, match="nv.unload takes a model"):
        nv.unload(None)


def test_a_global_module_hook_is_warned_that_it_sees_the_pre_activation(images):
    """Hooks registered for every module cannot be handed the activation back: they are told, as hooks on mlp.act
    are, instead of silently reading fc2's pre-activation as its input."""
    from torch.nn.modules.module import register_module_forward_hook

    model = nv.inject(tiny_vit(), nv.NOLAConfig(**SMALL_NOLA))
    handle = register_module_forward_hook(lambda module, args, output: None)
    try:
        with pytest.warns(UserWarning, match="a global module hook .* sees mlp.act's output and mlp.fc2's input"):
            model(images)
    finally:
        handle.remove()


@pytest.mark.parametrize("config", [nv.NOLAConfig(**SMALL_NOLA, targets=["mlp.fc1", "attn.v"]),
                                    nv.LoRAConfig(rank=2, targets=["mlp.fc1"])], ids=["nola", "lora"])
@pytest.mark.parametrize("how", ["inject", "load_adapter"])
def test_adapters_added_under_inference_mode_train(config, how, tmp_path):
    # their parameters were inference tensors: a later training pass gave every adapter no gradient, silently
    task = nv.save_adapter(as_if_trained(nv.inject(tiny_vit(), config), seed=1), tmp_path / "task")
    model = tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        nv.inject(model, config) if how == "inject" else nv.load_adapter(model, task)
        model(images)
    model(images).sum().backward()
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert len(trained) > 2 and all(p.grad is not None for p in trained.values())  # (a fresh LoRA A: zeros)
