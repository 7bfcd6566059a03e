"""Settings that change outputs without changing a weight name (constructor options, norm classes, activations layer
by layer) are recorded in adapter files and refused when they differ; math-identical classes and older files load."""
import copy
import dataclasses
import json
from functools import partial

import pytest
import timm
import torch
from timm.layers import GELUTanh, RmsNorm, SimpleNorm
from tiny_models import as_if_trained, tiny_vit
from torch import nn

import nola_vision as nv
from nola_vision.adapters import files as adapter_io
from nola_vision.adapters.files import CONFIG_NAME, AdapterLoadError
from nola_vision.train.module import FewShotClassifier

CONFIG = nv.NOLAConfig(rank=2, num_basis_a=16, num_basis_b=16, targets=["mlp.fc1", "attn.v"])
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
NEW_KEYS = ("activation_layers", "activation_slots", "norm_layers", "constructor_options")


def logits(model):
    with torch.no_grad():
        return model.eval()(IMAGES)


def with_weights_of(source, model):
    """``model`` holding ``source``'s weights wherever names and shapes match, as the same checkpoint would give."""
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in source.state_dict().items() if k in own and v.shape == own[k].shape},
                          strict=False)
    return model


def set_activations(model, *activations):
    for block, activation in zip(model.blocks, activations):
        block.mlp.act = activation
    return model


def save_trained(model, directory):
    nv.save_adapter(as_if_trained(nv.inject(model, CONFIG), 1, scale=0.1), directory, bits=32)
    return model


def edit_settings(directory, change):
    """Edit the file's settings record and take its checksum again, as a file written so would hold it."""
    document = json.loads((directory / CONFIG_NAME).read_text())
    change(document["settings"])
    document["config_sha256"] = adapter_io._document_digest(document)
    (directory / CONFIG_NAME).write_text(json.dumps(document))


def as_older_file(directory):
    """The file as nola_vision wrote it before activations were recorded per layer and norms by class."""
    def drop_new_keys(settings):
        for key in NEW_KEYS:
            del settings[key]

    edit_settings(directory, drop_new_keys)


@pytest.mark.parametrize("trained_with, other, message", [
    (dict(global_pool="avg"), dict(global_pool="avg", pool_include_prefix=True),
     r"pool_include_prefix=False, this model has pool_include_prefix=True"),
    (dict(), dict(no_embed_class=True), r"no_embed_class=False, this model has no_embed_class=True"),
], ids=["pool_include_prefix", "no_embed_class"])
def test_a_constructor_option_that_changes_no_weight_name_is_refused_naming_it(tmp_path, trained_with, other,
                                                                               message):
    # logits off by 0.004 (pool_include_prefix) and 0.05 (no_embed_class: only pos_embed's length changes), loaded
    base = tiny_vit(**trained_with)
    model = with_weights_of(base, tiny_vit(**other))
    assert not torch.allclose(logits(base), logits(model), atol=1e-4)  # the option alone changes the outputs
    save_trained(tiny_vit(**trained_with), tmp_path)
    with pytest.raises(AdapterLoadError, match=message):
        nv.load_adapter(model, tmp_path)
    assert not nv.adapted_layers(model)


def test_a_swin_built_to_partition_its_windows_otherwise_is_refused_naming_the_option(tmp_path):
    """always_partition cuts the windows and shifts otherwise with the same weights (12% off with pretrained-like
    norms): the adapter loaded silently."""
    kwargs = dict(pretrained=False, num_classes=5, img_size=32, embed_dim=32, depths=(2, 2), num_heads=(1, 2),
                  window_size=4)
    trained = timm.create_model("swin_tiny_patch4_window7_224", **kwargs)
    nv.save_adapter(as_if_trained(nv.inject(copy.deepcopy(trained), nv.NOLAConfig(num_basis_a=16, num_basis_b=16)),
                                  1, scale=0.1), tmp_path, bits=32)
    other = timm.create_model("swin_tiny_patch4_window7_224", always_partition=True, **kwargs)
    other.load_state_dict(trained.state_dict())
    with pytest.raises(AdapterLoadError, match="trained on a model with always_partition=False, this model has "
                                               "always_partition=True"):
        nv.load_adapter(other, tmp_path)
    nv.load_adapter(trained, tmp_path)


def test_settings_that_follow_the_input_size_are_not_recorded_so_such_models_load(tmp_path):
    trained = save_trained(tiny_vit(), tmp_path)
    dynamic = nv.load_adapter(tiny_vit(dynamic_img_size=True), tmp_path)  # the same outputs at the same size
    torch.testing.assert_close(logits(dynamic), logits(trained), rtol=0, atol=1e-5)
    nv.load_adapter(tiny_vit(img_size=48), tmp_path, check_frozen_weights=False)  # another pos_embed length


def test_normalisation_layers_of_another_function_at_the_same_eps_are_refused(tmp_path):
    # RmsNorm and SimpleNorm hold the same weights and eps: logits off by 0.001, loaded
    save_trained(tiny_vit(norm_layer=RmsNorm), tmp_path)
    with pytest.raises(AdapterLoadError, match="normalisation layers are RMSNorm, this model's are SimpleNorm"):
        nv.load_adapter(tiny_vit(norm_layer=SimpleNorm), tmp_path)


def test_timm_and_torch_classes_of_one_norm_function_load_with_the_same_outputs(tmp_path):
    trained = save_trained(tiny_vit(norm_layer=RmsNorm), tmp_path)
    torch_norm = nv.load_adapter(tiny_vit(norm_layer=partial(nn.RMSNorm, eps=1e-6)), tmp_path)
    torch.testing.assert_close(logits(torch_norm), logits(trained), rtol=0, atol=1e-5)


def test_activations_swapped_between_blocks_are_refused(tmp_path):
    # block 0 GELU and block 1 ReLU against the reverse: the same set of classes, logits off by 0.01, loaded
    save_trained(set_activations(tiny_vit(), nn.GELU(), nn.ReLU()), tmp_path)
    with pytest.raises(AdapterLoadError, match=r"activation layers compute, in order, \['GELU', 'ReLU'\], this "
                                               r"model's compute \['ReLU', 'GELU'\]"):
        nv.load_adapter(set_activations(tiny_vit(), nn.ReLU(), nn.GELU()), tmp_path)


def test_an_activation_with_other_arguments_is_refused_naming_them(tmp_path):
    save_trained(set_activations(tiny_vit(), nn.LeakyReLU(0.2), nn.LeakyReLU(0.2)), tmp_path)
    with pytest.raises(AdapterLoadError, match=r"LeakyReLU\(negative_slope=0\.2\).*LeakyReLU\(negative_slope=0\.01\)"):
        nv.load_adapter(set_activations(tiny_vit(), nn.LeakyReLU(), nn.LeakyReLU()), tmp_path)


class OwnActivation(nn.Module):
    """An activation of the user's own, of no known activation module."""

    def forward(self, x):
        return x * torch.sigmoid(2 * x)


@pytest.mark.parametrize("trained_act, model_act, recorded", [
    ("hard_mish", nn.Identity, "HardMish"),  # timm's activations_me class: HardMishMe
    (OwnActivation, nn.Identity, "OwnActivation"),
    ("hard_mish", OwnActivation, "HardMish"),
], ids=["activations_me_onto_none", "own_onto_none", "activations_me_onto_own"])
def test_activations_of_no_known_activation_module_are_recorded_by_their_slot_and_refused(tmp_path, trained_act,
                                                                                          model_act, recorded):
    # neither side recorded such a class: the file loaded with logits off by 0.05-0.26, no warning
    save_trained(tiny_vit(act_layer=trained_act), tmp_path)
    with pytest.raises(AdapterLoadError, match=rf"blocks' activations .* are, in order, {recorded}, this model's are "
                                               rf"{model_act if isinstance(model_act, str) else model_act.__name__}"):
        nv.load_adapter(tiny_vit(act_layer=model_act), tmp_path)
    trained = save_trained(tiny_vit(act_layer=trained_act), tmp_path / "again")
    torch.testing.assert_close(logits(nv.load_adapter(tiny_vit(act_layer=trained_act), tmp_path / "again")),
                               logits(trained), rtol=0, atol=1e-6)


def test_the_activation_record_is_the_plain_models_while_an_adapted_fc2_computes_the_activation(tmp_path):
    plain = tiny_vit(act_layer="hard_mish")
    recorded = adapter_io.output_settings(plain)["activation_slots"]
    adapted = nv.inject(tiny_vit(act_layer="hard_mish"), nv.NOLAConfig(num_basis_a=16, num_basis_b=16))
    assert isinstance(adapted.blocks[0].mlp.act, nv.core.inject.MovedActivation)  # fc2 took the activation over
    assert adapter_io.output_settings(adapted)["activation_slots"] == recorded == ["HardMish", "HardMish"]
    nv.save_adapter(as_if_trained(adapted, 1, scale=0.1), tmp_path, bits=32)
    as_older_file(tmp_path)  # written before the slots were recorded: loads onto the same model, unchecked
    torch.testing.assert_close(logits(nv.load_adapter(plain, tmp_path)), logits(adapted), rtol=0, atol=1e-6)


@pytest.mark.parametrize("older", [False, True], ids=["file", "older_file"])
@pytest.mark.parametrize("trained_act, model_act", [(GELUTanh, partial(nn.GELU, approximate="tanh")),
                                                    (partial(nn.GELU, approximate="tanh"), GELUTanh),
                                                    (timm.layers.GELU, nn.GELU)],
                         ids=["timm_tanh_onto_torch", "torch_tanh_onto_timm", "timm_gelu_onto_torch"])
def test_timm_and_torch_classes_of_one_activation_load_with_the_same_outputs(tmp_path, trained_act, model_act,
                                                                             older):
    # GELUTanh computes F.gelu(x, approximate="tanh") as nn.GELU(approximate="tanh") does: it was refused
    trained = save_trained(set_activations(tiny_vit(), trained_act(), trained_act()), tmp_path)
    if older:
        as_older_file(tmp_path)
    model = nv.load_adapter(set_activations(tiny_vit(), model_act(), model_act()), tmp_path)
    torch.testing.assert_close(logits(model), logits(trained), rtol=0, atol=0)


def test_a_file_written_before_the_new_settings_loads_onto_the_same_model_and_is_checked_on_what_it_holds(tmp_path):
    trained = save_trained(tiny_vit(), tmp_path)
    as_older_file(tmp_path)
    torch.testing.assert_close(logits(nv.load_adapter(tiny_vit(), tmp_path)), logits(trained), rtol=0, atol=1e-5)
    with pytest.raises(AdapterLoadError, match=r"activations \['GELU'\], this model has \['QuickGELU'\]"):
        nv.load_adapter(tiny_vit(act_layer="quick_gelu"), tmp_path)


@pytest.mark.parametrize("change", [
    lambda s: s.update(norm_layers="LayerNorm"),
    lambda s: s.update(activation_layers=["GELU", 1]),
    lambda s: s.update(constructor_options=["pool_include_prefix"]),
    lambda s: s.update(constructor_options={"pool_include_prefix": []}),
    lambda s: s.update(constructor_options={"rope": [{"class": "RotaryEmbeddingCat"}]}),
], ids=["norm_layers", "activation_layers", "options_list", "option_without_values", "option_object"])
def test_a_malformed_new_setting_is_rejected_before_the_model_changes(tmp_path, change):
    save_trained(tiny_vit(), tmp_path)
    edit_settings(tmp_path, change)
    model = tiny_vit()
    with pytest.raises(AdapterLoadError, match=r"field 'settings' must be .*\"constructor_options\""):
        nv.load_adapter(model, tmp_path)
    assert not nv.adapted_layers(model)


def test_the_config_checksum_covers_the_new_settings(tmp_path):
    save_trained(tiny_vit(), tmp_path)
    document = json.loads((tmp_path / CONFIG_NAME).read_text())
    document["settings"]["constructor_options"]["pool_include_prefix"] = [True]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(document))
    with pytest.raises(AdapterLoadError, match="was edited or damaged after it was saved"):
        nv.load_adapter(tiny_vit(pool_include_prefix=True), tmp_path)


def test_an_eva_without_its_rotary_embedding_is_refused(tmp_path):
    # EVA's rope holds no parameters: without it the same weights load by name
    kwargs = dict(pretrained=False, num_classes=3, img_size=28, patch_size=14, embed_dim=32, depth=1, num_heads=2)
    base = timm.create_model("eva02_tiny_patch14_224", **kwargs)
    without = timm.create_model("eva02_tiny_patch14_224", use_rot_pos_emb=False, **kwargs)
    without.load_state_dict(base.state_dict())
    nv.save_adapter(nv.inject(copy.deepcopy(base), nv.LoRAConfig(rank=2, targets=["attn.proj"])), tmp_path)
    with pytest.raises(AdapterLoadError, match="rope=RotaryEmbeddingCat, this model has rope=None"):
        nv.load_adapter(without, tmp_path)
    nv.load_adapter(base, tmp_path)


TINY = dict(backbone="vit_tiny_patch16_224", pretrained=False, image_size=32,
            backbone_kwargs=dict(patch_size=8, depth=2, embed_dim=64, num_heads=2, global_pool="avg"))


def checkpoint_of(model):
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)  # what Lightning writes
    return checkpoint


def test_a_checkpoint_of_a_backbone_with_another_constructor_option_is_refused_and_an_older_one_loads():
    checkpoint = checkpoint_of(FewShotClassifier(num_classes=4, adapter=CONFIG, **TINY))
    other = {**TINY, "backbone_kwargs": {**TINY["backbone_kwargs"], "pool_include_prefix": True}}
    with pytest.raises(ValueError, match=r"constructor_options .*'pool_include_prefix': \[True\].*\(checkpoint: "):
        FewShotClassifier(num_classes=4, adapter=CONFIG, **other).on_load_checkpoint(checkpoint)
    for key in NEW_KEYS:  # as written before they were recorded (and before the record's own hash)
        del checkpoint["nola_vision"]["settings"][key]
    del checkpoint["nola_vision"]["record_sha256"]
    FewShotClassifier(num_classes=4, adapter=CONFIG, **TINY).on_load_checkpoint(checkpoint)


def test_the_record_names_each_layers_function_and_the_constructor_options():
    settings = adapter_io.output_settings(tiny_vit(act_layer="gelu_tanh", norm_layer=RmsNorm))
    assert settings["activations"] == ["GELUTanh"]  # as older files recorded it: older nola_vision reads it so
    assert settings["activation_layers"] == ["GELU(approximate='tanh')"] * 2
    assert settings["norm_layers"] == ["RMSNorm"] * 5 and len(settings["norm_eps"]) == 5  # 2 per block, the final
    assert settings["constructor_options"] == {"no_embed_class": [False], "pool_include_prefix": [False]}


def test_records_of_checkpoints_and_graphs_compare_activations_by_function_and_on_the_settings_both_hold():
    own = adapter_io.output_settings(set_activations(tiny_vit(), nn.GELU(approximate="tanh"), nn.GELU("tanh")))
    older = {"attention_heads": [2, 2], "activations": ["GELUTanh"], "norm_eps": own["norm_eps"]}
    assert adapter_io.changed_settings(older, own) == {}
    newer_timm = {**own, "constructor_options": {**own["constructor_options"], "an_option_timm_added": [True]}}
    assert adapter_io.changed_settings(newer_timm, own) == {}
    other = adapter_io.output_settings(tiny_vit(no_embed_class=True))
    assert set(adapter_io.changed_settings(other, adapter_io.output_settings(tiny_vit()))) == {"constructor_options"}


@pytest.mark.parametrize("config", [
    nv.LoRAConfig(rank=2, targets=["attn.v", "mlp.fc1", "attn.q"]),
    nv.NOLAConfig(rank=2, num_basis_a=16, num_basis_b=16, targets=["attn.v", "mlp.fc1", "attn.q"]),
], ids=["lora", "nola"])
def test_a_file_loads_onto_a_model_injected_with_the_same_targets_in_another_order(config, tmp_path):
    # was refused as "model already has adapters with config ..." though the same layers and slices are adapted
    trained = as_if_trained(nv.inject(tiny_vit(), config), 1, scale=0.3)
    nv.save_adapter(trained, tmp_path, bits=32)
    reordered = nv.inject(tiny_vit(), dataclasses.replace(config, targets=["mlp.fc1", "attn.q", "attn.v"]))
    assert torch.equal(logits(nv.load_adapter(reordered, tmp_path)), logits(trained))
    with pytest.raises(AdapterLoadError, match=r"model already has adapters with config .* \(in effect: targets "
                                               r"\['attn\.q', 'mlp\.fc1'\] in the model, \['attn\.q', 'attn\.v', "
                                               r"'mlp\.fc1'\] in the file\).*or nv\.unload\(model\) first"):
        nv.load_adapter(nv.inject(tiny_vit(), dataclasses.replace(config, targets=["mlp.fc1", "attn.q"])), tmp_path)


@pytest.mark.parametrize("config, same", [
    (nv.NOLAConfig(rank=2, num_basis_a=16, num_basis_b=16, scale=2.0),
     dict(scale=2, init="zero_delta", recompute_activation=False)),
    (nv.LoRAConfig(rank=2, alpha=4.0), dict(alpha=4, seed=7, recompute_activation=False)),
], ids=["nola", "lora"])
def test_a_file_loads_onto_a_model_whose_config_differs_only_in_what_shapes_training(config, same, tmp_path):
    # a task switch was refused for init, recompute_activation or LoRA's seed, which give the same update
    trained = as_if_trained(nv.inject(tiny_vit(), config), 1, scale=0.3)
    nv.save_adapter(trained, tmp_path, bits=32)
    injected = nv.inject(tiny_vit(), dataclasses.replace(config, **same))
    assert torch.equal(logits(nv.load_adapter(injected, tmp_path)), logits(trained))
    assert config.same_update(dataclasses.replace(config, **same))
    for other in (dict(seed=3) if isinstance(config, nv.NOLAConfig) else dict(alpha=2.0), dict(rank=4)):
        assert not config.same_update(dataclasses.replace(config, **other))
        with pytest.raises(AdapterLoadError, match="model already has adapters with config"):
            nv.load_adapter(nv.inject(tiny_vit(), dataclasses.replace(config, **other)), tmp_path)


def test_a_file_whose_head_had_no_bias_names_the_head_not_a_file_cut_short(tmp_path):
    # was "adapter_model.safetensors lacks tensors ['head.bias']; the file is incomplete"
    model = tiny_vit()
    model.head = nn.Linear(64, 5, bias=False)
    nv.save_adapter(as_if_trained(nv.inject(model, "lora"), 1, scale=0.3), tmp_path)
    message = r"the adapter's head holds \['head.weight'\], this model's head also has \['head.bias'\]"
    with pytest.raises(AdapterLoadError, match=message):
        nv.load_adapter(tiny_vit(), tmp_path)
    with pytest.raises(AdapterLoadError, match=message):
        nv.MultiTaskModel(tiny_vit()).add_task("t", tmp_path)


@pytest.mark.parametrize("config", [nv.LoRAConfig(rank=2), nv.NOLAConfig(rank=2, num_basis_a=16, num_basis_b=16)],
                         ids=["lora", "nola"])
def test_a_layer_whose_scaling_changed_after_inject_is_neither_saved_nor_switched(config, tmp_path):
    # save_adapter recorded the config's scaling, so the file loaded as another update (0.2 off in the logits), and
    # a load onto such a model kept the edited scaling; a state dict load refused it already
    trained = as_if_trained(nv.inject(tiny_vit(), config), 1, scale=0.3)
    nv.save_adapter(trained, tmp_path / "good", bits=32)
    name, layer = next(iter(nv.adapted_layers(trained).items()))
    layer.scaling *= 3
    message = rf"adapted layer {name} changed after inject \(scaling is {layer.scaling!r}, injected as " \
              rf"{layer.scaling / 3!r}\): adapter files record the config's values"
    with pytest.raises(ValueError, match=message):
        nv.save_adapter(trained, tmp_path / "edited")
    assert not (tmp_path / "edited").exists()
    with pytest.raises(AdapterLoadError, match=message):
        nv.load_adapter(trained, tmp_path / "good")
    layer.scaling /= 3
    assert torch.equal(logits(nv.load_adapter(trained, tmp_path / "good")), logits(trained))


def test_lora_alpha_none_is_alpha_rank_and_a_subclass_variant_inherits_no_training_only_fields(tmp_path):
    # alpha=None and alpha=rank were two updates; a variant subclassing LoRAConfig whose seed draws a frozen tensor
    # inherited LoRA's training-only seed, and a file of another seed loaded onto it with other outputs
    assert nv.LoRAConfig(rank=2).same_update(nv.LoRAConfig(rank=2, alpha=2))
    assert not nv.LoRAConfig(rank=2).same_update(nv.LoRAConfig(rank=2, alpha=4))

    @dataclasses.dataclass
    class SeededVariant(nv.LoRAConfig):
        method = "lora"  # compared as configs only: the seed of a subclass counts unless it lists it itself

    assert not SeededVariant(rank=2, seed=7).same_update(SeededVariant(rank=2, seed=0))
    assert SeededVariant(rank=2, recompute_activation=False).same_update(SeededVariant(rank=2))
    trained = as_if_trained(nv.inject(tiny_vit(), nv.LoRAConfig(rank=2)), 1, scale=0.3)
    nv.save_adapter(trained, tmp_path, bits=32)
    assert torch.equal(logits(nv.load_adapter(nv.inject(tiny_vit(), nv.LoRAConfig(rank=2, alpha=2.0)), tmp_path)),
                       logits(trained))


def test_a_plan_s_config_changed_after_inject_changes_nothing_the_model_or_its_files_hold(tmp_path):
    # inject kept the plan's config itself: plan.config.scale = 3 after inject was recorded by save_adapter while the
    # layers computed with the scale they were made with, and the file loaded as another update
    model = tiny_vit()
    plan = nv.plan_injection(model, nv.NOLAConfig(rank=2, num_basis_a=16, num_basis_b=16))
    trained = as_if_trained(nv.inject(model, plan), 1, scale=0.3)
    plan.config.scale = 3.0
    nv.save_adapter(trained, tmp_path, bits=32)
    assert torch.equal(logits(nv.load_adapter(tiny_vit(), tmp_path)), logits(trained))


@pytest.mark.parametrize("dropped, named", [
    (("settings", "pooling"), r"backbone's pooling \(global_pool\), attention heads \(num_heads\), activations "
                              r"\(act_layer\)"),
    (("norm_eps", "parameter_names"), r"backbone's normalisation epsilons .*parameter names"),
], ids=["format_3_without_settings", "without_norm_records"])
def test_a_file_of_an_earlier_build_warns_of_the_settings_it_does_not_record(tmp_path, dropped, named):
    # such files loaded onto other heads, an other activation or eps without a word (logits off by up to 4.3)
    save_trained(tiny_vit(), tmp_path)
    document = json.loads((tmp_path / CONFIG_NAME).read_text())
    for key in dropped:
        (document if key in document else document["settings"]).pop(key)
    document["config_sha256"] = adapter_io._document_digest(document)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(document))
    with pytest.warns(UserWarning, match=rf"saved by an earlier nola_vision that did not record the {named}.*, so "
                                         r"nothing checks them"):
        nv.load_adapter(tiny_vit(), tmp_path)


def test_a_checkpoint_of_an_earlier_build_warns_of_the_settings_it_does_not_record():
    checkpoint = checkpoint_of(FewShotClassifier(num_classes=4, adapter=CONFIG, **TINY))
    del checkpoint["nola_vision"]["settings"]  # as written before checkpoints recorded them
    del checkpoint["nola_vision"]["record_sha256"]
    other = {**TINY, "backbone_kwargs": {**TINY["backbone_kwargs"], "act_layer": "relu"}}
    with pytest.warns(UserWarning, match=r"checkpoint was written by an earlier nola_vision that did not record the "
                                         r"backbone's pooling \(global_pool\), attention heads .*nothing checks them"):
        FewShotClassifier(num_classes=4, adapter=CONFIG, **other).on_load_checkpoint(checkpoint)


def test_a_quantisation_aware_checkpoint_that_records_no_bits_warns_its_head_may_have_trained_at_full_precision():
    """Runs before 2026-11-30 trained the head at full precision under quant_bits, which this version sees as 8-bit
    codes: their checkpoints (which record no bits) loaded with other outputs and nothing said so."""
    import warnings

    def built():
        return FewShotClassifier(num_classes=4, adapter=CONFIG, quant_bits=4, **TINY)

    checkpoint = checkpoint_of(built())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checkpoint that records its bits loads without it
        built().on_load_checkpoint(copy.deepcopy(checkpoint))
    del checkpoint["nola_vision"]["quant_bits"]  # as written before checkpoints recorded them
    del checkpoint["nola_vision"]["record_sha256"]
    with pytest.warns(UserWarning, match=r"trained quantisation-aware \(quant_bits=4\) by an earlier nola_vision "
                                         r"that did not record the bits\. Versions before 2026-11-30 trained .*head"):
        built().on_load_checkpoint(checkpoint)


def test_timms_default_and_export_builds_of_hard_mish_load_each_others_files(tmp_path):
    # hard_mish is HardMishMe (activations_me) by default and HardMish in an export build: the same function, refused
    # as "activations [], this model has ['HardMish']" by the records that read only timm's activations module
    from timm.layers import get_act_layer, set_layer_config

    default = tiny_vit(act_layer="hard_mish")
    assert type(default.blocks[0].mlp.act).__name__ == "HardMishMe"
    with set_layer_config(exportable=True):
        export_class = get_act_layer("hard_mish")
    assert export_class.__name__ == "HardMish"
    exportable = set_activations(copy.deepcopy(default), export_class(), export_class())  # as its export build
    for saved, loaded, folder in ((default, exportable, "a"), (exportable, default, "b")):
        trained = save_trained(copy.deepcopy(saved), tmp_path / folder)
        torch.testing.assert_close(logits(nv.load_adapter(copy.deepcopy(loaded), tmp_path / folder)),
                                   logits(trained), rtol=0, atol=1e-5)


def test_an_activation_argument_given_as_an_integer_is_the_same_setting(tmp_path):
    trained = save_trained(set_activations(tiny_vit(), nn.ELU(alpha=1), nn.ELU(alpha=1)), tmp_path)
    model = nv.load_adapter(set_activations(tiny_vit(), nn.ELU(), nn.ELU()), tmp_path)  # alpha=1.0
    torch.testing.assert_close(logits(model), logits(trained), rtol=0, atol=0)
    with pytest.raises(AdapterLoadError, match=r"ELU\(alpha=1\).*ELU\(alpha=2\.0\)"):
        nv.load_adapter(set_activations(tiny_vit(), nn.ELU(alpha=2.0), nn.ELU(alpha=2.0)), tmp_path)
