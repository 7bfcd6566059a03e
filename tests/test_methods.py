"""The contract every registered adapter method honours, run on each variant of the method matrix.

A method registered with ``nv.register_method`` is tested here without editing this file (``method_matrix.py``
says which variants run): inject and train, config round trips, save and load, merge, unload, peft export,
serving many tasks, dtype moves and torch.compile.
"""
import copy
import functools
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from method_matrix import assert_compiled_training_is_eager_training, method_variants, trained
from tiny_models import tiny_vit

import nola_vision as nv
from nola_vision.core.config import adapter_to_hparam, config_from_dict, resolve_adapter
from nola_vision.core.quantize import fake_quantize
from nola_vision.core.targets import head_parameter_names

# Two computations of the same logits (merged or not, peft, compiled, served) agree to float32 rounding; the
# trained tensors move the logits by over 100 times this (checked first).
TOLERANCE = 1e-5
LABELS = torch.arange(4)


def logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images)


def trained_names(model: torch.nn.Module):
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def with_timm_linears(model: torch.nn.Module) -> torch.nn.Module:
    """Block 0's linear layers as ``timm.layers.Linear`` with the same weights: unload must give that class back."""
    for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
        old = model.blocks[0].get_submodule(name)
        new = timm.layers.Linear(old.in_features, old.out_features)
        new.load_state_dict(old.state_dict())
        parent, _, child = name.rpartition(".")
        setattr(model.blocks[0].get_submodule(parent), child, new)
    return model


def test_the_matrix_covers_every_registered_method():
    assert {variant.method for variant in method_variants()} == set(nv.available_methods())
    assert {"nola", "lora", "linear", "full", "frozen_a"} <= set(nv.available_methods())


def test_trained_tensors_move_the_logits_well_above_the_tolerance(variant, images):
    # The premise of every equality below: a lost or doubled update would show.
    plain = logits(tiny_vit(), images)
    assert (logits(trained(variant), images) - plain).abs().max() > 100 * TOLERANCE
    if variant.has_layers:
        assert (logits(trained(variant, adapters_only=True), images) - plain).abs().max() > 100 * TOLERANCE


# ---- inject and train ----------------------------------------------------------------------------------------
def test_inject_trains_the_adapters_and_the_head_and_every_trained_tensor_gets_a_gradient(variant, images):
    model = trained(variant)
    layers = nv.adapted_layers(model)
    assert bool(layers) == variant.has_layers
    assert all(type(layer) is nv.get_method(variant.method).layer_cls for layer in layers.values())
    adapter = {f"{name}.{p}" for name, layer in layers.items() for p in layer.adapter_parameter_names}
    everything = {name for name, _ in model.named_parameters()}
    assert trained_names(model) == (everything if variant.trains_backbone else adapter | {"head.weight", "head.bias"})
    counts = nv.count_parameters(model)
    assert counts["adapter"] == sum(model.get_parameter(name).numel() for name in adapter)
    assert counts["trainable"] == sum(model.get_parameter(name).numel() for name in trained_names(model))
    assert counts["trainable"] == (counts["total"] if variant.trains_backbone else counts["adapter"] + counts["head"])
    F.cross_entropy(model.train()(images), LABELS).backward()
    assert [name for name in sorted(trained_names(model)) if not model.get_parameter(name).grad.any()] == []


def test_config_round_trips_through_json_and_the_hyper_parameter_form(variant):
    config = variant.config()
    assert config_from_dict(json.loads(json.dumps(config.serialize()))) == config
    assert resolve_adapter(adapter_to_hparam(config)) == config


# ---- adapter files -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [32, 16])
def test_a_loaded_adapter_gives_the_logits_of_the_stored_values(variant, bits, images, tmp_path):
    model = trained(variant)
    nv.save_adapter(model, tmp_path, bits=bits)
    loaded = nv.load_adapter(tiny_vit(), tmp_path)
    assert {name: type(m) for name, m in nv.adapted_layers(loaded).items()} == {
        name: type(m) for name, m in nv.adapted_layers(model).items()}
    assert trained_names(loaded) == trained_names(model)
    stored_dtype = torch.float32 if bits == 32 else torch.float16
    with torch.no_grad():  # the source model rounded to what the file stores
        for name in trained_names(model):
            model.get_parameter(name).copy_(model.get_parameter(name).to(stored_dtype))
    assert torch.equal(logits(loaded, images), logits(model, images))


# ---- merge and unload ----------------------------------------------------------------------------------------
def test_merged_logits_equal_unmerged_and_unmerge_restores_the_frozen_weights(variant, images):
    model = trained(variant)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    unmerged = logits(model, images)
    nv.merge(model)
    assert all(layer.merged for layer in nv.adapted_layers(model).values())
    merged = logits(model, images)
    changed = {name for name, value in frozen.items() if not torch.equal(model.get_parameter(name), value)}
    assert changed == {f"{name}.weight" for name in nv.adapted_layers(model)}  # ΔW went there and nowhere else
    nv.unmerge(model)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(logits(model, images), unmerged, rtol=0, atol=TOLERANCE)
    for name, value in frozen.items():
        torch.testing.assert_close(model.get_parameter(name), value, rtol=0, atol=1e-6, msg=name)


def test_unload_gives_back_the_original_modules_flags_weights_and_outputs(variant, images):
    model = with_timm_linears(tiny_vit())
    model.pos_embed.requires_grad_(False)  # a user's own choices, which inject overrides and unload restores
    model.blocks[1].norm1.requires_grad_(False)
    never_injected = copy.deepcopy(model)
    modules = dict(model.named_modules())
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    modes = {name: module.training for name, module in model.named_modules()}  # eval, block 0's new linears train
    assert len(set(modes.values())) == 2
    for merged in (False, True):  # the second round also shows that nothing left over blocks a new injection
        trained(variant, model=model, adapters_only=True)  # the head keeps its values: only the adapters go
        assert {name: layer.training for name, layer in nv.adapted_layers(model).items()} == {
            name: modes[name] for name in nv.adapted_layers(model)}  # an adapted layer runs in its base's mode
        if merged:
            nv.merge(model)
        assert nv.unload(model) is model
        assert dict(model.named_modules()).keys() == modules.keys()
        assert [name for name, module in model.named_modules() if module is not modules[name]] == []
        assert type(model.blocks[0].mlp.fc1) is timm.layers.Linear
        assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
        assert {name: module.training for name, module in model.named_modules()} == modes
        assert nv.adapted_layers(model) == {} and not hasattr(model, "nola_adapter")
        assert not model._forward_pre_hooks and not model._forward_hooks
        assert list(model.state_dict()) == list(never_injected.state_dict())
        tolerance = 1e-6 if merged else 0.0
        for key, value in never_injected.state_dict().items():
            torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=tolerance, msg=key)
        torch.testing.assert_close(logits(model, images), logits(never_injected, images), rtol=0,
                                   atol=TOLERANCE if merged else 0.0)


def test_merge_and_unload_folds_the_update_into_the_original_modules(variant, images):
    model = with_timm_linears(tiny_vit())
    modules = dict(model.named_modules())
    adapted = logits(trained(variant, model=model), images)
    assert nv.merge_and_unload(model) is model
    assert [name for name, module in model.named_modules() if module is not modules.get(name)] == []
    assert nv.adapted_layers(model) == {} and not hasattr(model, "nola_adapter")
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(logits(model, images), adapted, rtol=0, atol=TOLERANCE)


def test_unload_refuses_a_model_without_adapters():
    with pytest.raises(ValueError, match="no nola_vision adapters"):
        nv.unload(tiny_vit())


# ---- quantisation-aware training -----------------------------------------------------------------------------
def test_a_quantisation_aware_model_gives_the_logits_of_its_reloaded_4bit_file(adapter_variant, images, tmp_path):
    model = nv.set_quantization_aware(trained(adapter_variant), 4)
    nv.save_adapter(model, tmp_path, bits=4)
    loaded = nv.load_adapter(tiny_vit(), tmp_path)
    for name, layer in nv.adapted_layers(model).items():  # the forward uses exactly what the file stores
        for param_name in layer.adapter_parameter_names:
            assert torch.equal(loaded.get_parameter(f"{name}.{param_name}"), layer.trained(param_name))
    # the head is seen as the file keeps it (8-bit codes), so the logits are those of the reloaded file
    assert torch.equal(logits(model, images), logits(loaded, images))
    # ... and they are not those of the float coefficients: the 4-bit rounding is visible in the logits.
    assert (logits(nv.set_quantization_aware(model, None), images) - logits(loaded, images)).abs().max() > 1e-3
    assert not model.head._forward_hooks  # turning it off removes the head's hook (and so does unload)
    nv.set_quantization_aware(model, 4)
    assert model.head._forward_hooks and not nv.unload(model).head._forward_hooks


def test_the_straight_through_gradient_is_the_gradient_at_the_quantised_values(adapter_variant, images):
    model = nv.set_quantization_aware(trained(adapter_variant), 4)
    at_codes = trained(adapter_variant)  # the same model, not quantisation-aware, its tensors set to the stored values
    stored = {f"{name}.{param_name}": (parameter, 4) for name, layer in nv.adapted_layers(model).items()
              for param_name, parameter in layer.adapter_parameters().items()}
    stored.update({name: (model.get_parameter(name), 8) for name in head_parameter_names(model)})  # 8-bit head codes
    with torch.no_grad():
        for name, (parameter, bits) in stored.items():
            at_codes.get_parameter(name).copy_(fake_quantize(parameter, bits))
    for m in (model, at_codes):
        F.cross_entropy(m(images), LABELS).backward()
    for name, (parameter, _) in stored.items():
        expected = at_codes.get_parameter(name).grad
        assert expected.any(), name
        torch.testing.assert_close(parameter.grad, expected, rtol=1e-5, atol=1e-7, msg=name)


# ---- export and serving --------------------------------------------------------------------------------------
def test_peft_loads_the_export_with_the_same_logits(variant, images, tmp_path):
    peft = pytest.importorskip("peft")
    model = trained(variant)
    if not variant.has_layers:
        with pytest.raises(ValueError, match=f"method {variant.method!r} has no adapter layers"):
            nv.export_peft(model, tmp_path / "peft")
        assert not (tmp_path / "peft").exists()
        return
    nv.export_peft(model, tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["modules_to_save"] == ["head"]
    served = peft.PeftModel.from_pretrained(tiny_vit(), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(logits(served, images), logits(model, images), rtol=0, atol=TOLERANCE)


def test_a_mixed_batch_equals_each_tasks_own_model(variant, images, tmp_path):
    tasks = {"a": (1, 5), "b": (2, 3)}  # seed, class count
    for name, (seed, classes) in tasks.items():
        nv.save_adapter(trained(variant, seed, num_classes=classes), tmp_path / name)
    served = nv.MultiTaskModel(tiny_vit())
    if variant.trains_backbone:
        with pytest.raises(nv.AdapterLoadError, match="changes the backbone itself"):
            served.add_task("a", tmp_path / "a")
        assert served.tasks == []
        return
    for name in tasks:
        served.add_task(name, tmp_path / name)
    order = ["a", "b", "b", "a"]
    rows = served(images, order)
    for name, (_, classes) in tasks.items():
        own = logits(nv.load_adapter(tiny_vit(classes), tmp_path / name), images)
        for row in (i for i, task in enumerate(order) if task == name):
            torch.testing.assert_close(rows[row], own[row], rtol=0, atol=TOLERANCE)


def test_one_batch_mixing_every_servable_variant_equals_each_tasks_own_model(tmp_path):
    # Targets of different methods overlap (q, k and v slices of one qkv); each task has its own class count.
    variants = [variant for variant in method_variants() if not variant.trains_backbone]
    classes = {variant.id: 3 + i for i, variant in enumerate(variants)}
    served = nv.MultiTaskModel(tiny_vit())
    for seed, variant in enumerate(variants):
        served.add_task(variant.id, nv.save_adapter(trained(variant, seed, num_classes=classes[variant.id]),
                                                    tmp_path / variant.id))
    order = [variants[i % len(variants)].id for i in range(2 * len(variants) + 1)]
    images = torch.randn(len(order), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    rows = served(images, order)
    for variant in variants:
        own = logits(nv.load_adapter(tiny_vit(classes[variant.id]), tmp_path / variant.id), images)
        for row in (i for i, task in enumerate(order) if task == variant.id):
            torch.testing.assert_close(rows[row], own[row], rtol=0, atol=TOLERANCE)


# ---- dtype and torch.compile ---------------------------------------------------------------------------------
def test_a_float64_copy_gives_the_float32_logits(variant, images):
    model = trained(variant)
    double = copy.deepcopy(model).to(torch.float64)
    assert {p.dtype for p in double.parameters()} == {torch.float64}
    torch.testing.assert_close(logits(double, images.double()).float(), logits(model, images), rtol=1e-5, atol=1e-5)


def test_inject_into_a_float64_model_gives_float64_adapters_as_a_cast_after_inject(adapter_variant):
    before = nv.inject(tiny_vit().double(), adapter_variant.config())
    after = nv.inject(tiny_vit(), adapter_variant.config()).double()
    for name, layer in nv.adapted_layers(before).items():
        assert {n: p.dtype for n, p in layer.adapter_parameters().items()} == {
            n: p.dtype for n, p in nv.adapted_layers(after)[name].adapter_parameters().items()}, name
    torch.testing.assert_close(before.state_dict(), after.state_dict(), rtol=0, atol=0)


def test_a_float64_models_adapter_gradients_pass_gradcheck(adapter_variant):
    # Factors computed in float32 would round every float64 step: the numerical Jacobian would disagree.
    model = trained(adapter_variant).double()
    for name, layer in nv.adapted_layers(model).items():
        names = [n for n, p in layer.adapter_parameters().items() if p.requires_grad]
        x = torch.randn(2, 3, layer.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        output = functools.partial(_layer_output, layer, names, x)
        values = tuple(layer.adapter_parameters()[n].detach().clone().requires_grad_() for n in names)
        assert torch.autograd.gradcheck(output, values, fast_mode=True), name


def _layer_output(layer: torch.nn.Module, names, x: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
    return torch.func.functional_call(layer, dict(zip(names, values)), (x,))


@pytest.fixture
def fresh_dynamo():
    """Compile from scratch: no cached frames or recompile limits carried over from other models."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_training_steps_give_the_eager_logits_and_gradients(variant, images, fresh_dynamo):
    # fullgraph: no graph break anywhere, in adapter code or its hooks.
    assert_compiled_training_is_eager_training(variant, images, backend="aot_eager", fullgraph=True)
