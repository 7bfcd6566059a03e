"""save_adapter / load_adapter beyond the method matrix's round trips: quantised files, file sizes, clear errors."""
import json

import pytest
import timm
import torch
from tiny_models import as_if_trained, tiny_vit

import nola_vision as nv
from nola_vision.adapters import files as adapter_io
from nola_vision.adapters.files import CONFIG_NAME, WEIGHTS_NAME, AdapterLoadError
from nola_vision.core.basis import BasisSpec
from nola_vision.core.quantize import dequantize, pack4, quantize, unpack4

CONFIG = nv.NOLAConfig(rank=4, num_basis_a=64, num_basis_b=64, targets=["mlp.fc1", "mlp.fc2", "attn.q", "attn.v"])


def trained(config=CONFIG, num_classes=5, seed=3):
    """A tiny adapted ViT whose adapter and head hold non-trivial values."""
    return as_if_trained(nv.inject(tiny_vit(num_classes), config), seed, scale=0.1)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_round_trip_error_is_bounded_by_half_a_step(tmp_path, bits):
    model = trained()
    nv.save_adapter(model, tmp_path, bits=bits)
    fresh = nv.load_adapter(tiny_vit(), tmp_path)
    for name, layer in nv.adapted_layers(model).items():
        for param_name, value in layer.adapter_parameters().items():
            step = (value.max() - value.min()).item() / (2**bits - 1)
            error = (fresh.get_parameter(f"{name}.{param_name}") - value).abs().max().item()
            assert error <= step / 2 + 1e-7


def test_quantisation_helpers():
    values = torch.linspace(-1, 2, 101)
    codes, minimum, step = quantize(values, 4)
    assert codes.max() == 15 and (dequantize(codes, minimum, step) - values).abs().max() <= step / 2 + 1e-7
    assert torch.equal(unpack4(pack4(codes), 101), codes)
    constant, minimum, step = quantize(torch.full((10,), 1 / 1024), 4)
    assert step == 0 and torch.equal(dequantize(constant, minimum, step), torch.full((10,), 1 / 1024))


def test_vit_b_nola_file_sizes_fit_the_budget(tmp_path):
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)
    model = nv.inject(model.to_empty(device="cpu"), nv.NOLAConfig(rank=4, num_basis_a=1024, num_basis_b=1024))
    with torch.no_grad():  # to_empty leaves the head uninitialised (possibly NaN, which save_adapter refuses)
        model.head.weight.zero_(), model.head.bias.zero_()
    assert nv.count_parameters(model)["adapter"] == 49_152
    sizes = {}
    for bits in (16, 4):
        sizes[bits] = nv.adapter_size_bytes(nv.save_adapter(model, tmp_path / str(bits), bits=bits))
    assert sizes[16] <= 128 * 1024
    assert sizes[4] <= 48 * 1024
    saved = json.loads((tmp_path / "16" / CONFIG_NAME).read_text())
    assert saved["backbone"] == "vit_base_patch16_224" and saved["num_classes"] == 10
    assert saved["generator_version"] and len(saved["basis_fingerprint"]) == 16


def test_adapter_file_holds_coefficients_and_head_but_no_bases(tmp_path):
    from safetensors.torch import load_file

    nv.save_adapter(trained(), tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    assert {"head.weight", "head.bias", "blocks.0.mlp.fc1.nola_alpha", "blocks.1.attn.qkv.nola_beta"} <= set(tensors)
    assert sum(t.numel() for t in tensors.values()) == nv.count_parameters(trained())["trainable"]


def test_files_record_the_version_the_package_is_installed_as(tmp_path):
    """The version was written twice (pyproject.toml and version.py); the package metadata now reads version.py."""
    from importlib.metadata import version

    nv.save_adapter(trained(), tmp_path)
    recorded = json.loads((tmp_path / CONFIG_NAME).read_text())["library_version"]
    assert recorded == nv.__version__ == version("nola_vision")


def test_loading_onto_another_architecture_says_which(tmp_path):
    nv.save_adapter(trained(), tmp_path)
    other = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8,
                              depth=2)
    with pytest.raises(AdapterLoadError, match="vit_tiny_patch16_224.*deit_tiny_patch16_224"):
        nv.load_adapter(other, tmp_path)
    assert not nv.adapted_layers(other)


def test_loading_onto_a_wrapper_of_the_backbone_names_the_module_to_pass(tmp_path):
    nv.save_adapter(trained(), tmp_path)

    class Wrapper(torch.nn.Module):  # a FewShotClassifier, or a notebook's own module
        def __init__(self):
            super().__init__()
            self.model = tiny_vit()

    for read in (nv.load_adapter, nv.verify_adapter):
        with pytest.raises(AdapterLoadError, match=r"holds as its submodule 'model': pass that module, "
                                                   r"model.get_submodule\('model'\)"):
            read(Wrapper(), tmp_path)


def test_loading_onto_another_class_count_says_which(tmp_path):
    nv.save_adapter(trained(), tmp_path)
    model = tiny_vit(num_classes=7)
    with pytest.raises(AdapterLoadError, match="5-class head.*7 classes.*num_classes=5"):
        nv.load_adapter(model, tmp_path)
    assert not nv.adapted_layers(model)


@pytest.mark.parametrize("depth", [1, 3])
def test_loading_onto_a_model_of_another_depth_names_both_depths_not_the_heads(tmp_path, depth):
    nv.save_adapter(trained(), tmp_path)  # tiny_vit: depth 2
    model = tiny_vit(depth=depth)
    with pytest.raises(AdapterLoadError, match=rf"saved from a model with 2 attention layers, this model has {depth} "
                                               r"\(another depth, or another features_only out_indices.*"
                                               r"'vit_tiny_patch16_224', \.\.\., depth=2\) for a ViT; depths= per "
                                               r"stage, 2 in all, for Swin; a features_only model"):
        nv.load_adapter(model, tmp_path)
    assert not nv.adapted_layers(model)


def test_a_features_model_built_with_other_out_indices_is_told_so_not_only_of_another_depth(tmp_path):
    """timm's features_only ViT keeps the blocks up to its last out_indices: one built with out_indices=(0,) was
    told to create the model with depth=2, which it had."""
    def features(out_indices):
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, embed_dim=64, num_heads=2,
                                 img_size=32, features_only=True, out_indices=out_indices)

    nv.save_adapter(nv.inject(features((0, 1)), nv.NOLAConfig(rank=2, num_basis_a=16, num_basis_b=16)), tmp_path)
    with pytest.raises(AdapterLoadError, match=r"2 attention layers, this model has 1 \(another depth, or another "
                                               r"features_only out_indices, which keeps the blocks up to the last"):
        nv.load_adapter(features((0,)), tmp_path)


def test_a_headless_adapter_onto_a_model_with_a_head_says_so_and_only_a_file_lacking_tensors_is_incomplete(
        tmp_path):
    from safetensors.torch import load_file
    from safetensors.torch import save as save_bytes

    nv.save_adapter(trained(num_classes=0), tmp_path)
    with pytest.raises(AdapterLoadError, match=r"saved from a model without a classifier head.*this model's head "
                                               r"\['head.weight', 'head.bias'\].*num_classes=0") as refused:
        nv.verify_adapter(tiny_vit(5), tmp_path, match_num_classes=False)  # as a server of many tasks checks
    assert "incomplete" not in str(refused.value)
    nv.save_adapter(trained(), tmp_path)  # a file that lost its head tensors is still reported incomplete
    tensors = {name: t for name, t in load_file(tmp_path / WEIGHTS_NAME).items() if name != "head.weight"}
    weights = save_bytes(tensors)
    (tmp_path / WEIGHTS_NAME).write_bytes(weights)
    document = json.loads((tmp_path / CONFIG_NAME).read_text())
    document["weights_sha256"] = adapter_io._sha256(weights)  # a crafted file: its checksums taken again
    document["config_sha256"] = adapter_io._document_digest(document)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(document))
    with pytest.raises(AdapterLoadError, match=r"lacks tensors \['head.weight'\]; the file is incomplete"):
        nv.verify_adapter(tiny_vit(), tmp_path, match_num_classes=False)


def test_a_wrong_basis_fingerprint_is_rejected_before_anything_changes(tmp_path):
    nv.save_adapter(trained(), tmp_path)
    document = json.loads((tmp_path / CONFIG_NAME).read_text())
    document["basis_fingerprint"] = "0123456789abcdef"
    document["config_sha256"] = adapter_io._document_digest(document)  # a crafted file: its checksum taken again
    (tmp_path / CONFIG_NAME).write_text(json.dumps(document))
    model = tiny_vit()
    with pytest.raises(AdapterLoadError, match="fingerprint mismatch"):
        nv.load_adapter(model, tmp_path)
    assert not nv.adapted_layers(model) and all(p.requires_grad for p in model.parameters())


def test_a_different_basis_seed_in_the_config_is_caught_by_the_fingerprint(tmp_path):
    nv.save_adapter(trained(), tmp_path)
    document = json.loads((tmp_path / CONFIG_NAME).read_text())
    document["config"]["seed"] = 1
    document["config_sha256"] = adapter_io._document_digest(document)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(document))
    with pytest.raises(AdapterLoadError, match="fingerprint"):
        nv.load_adapter(tiny_vit(), tmp_path)


def test_missing_and_truncated_files_are_reported(tmp_path):
    with pytest.raises(AdapterLoadError, match="missing"):
        nv.load_adapter(tiny_vit(), tmp_path)
    nv.save_adapter(trained(), tmp_path)
    weights = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(weights[: len(weights) // 2])
    model = tiny_vit()
    with pytest.raises(AdapterLoadError, match="truncated or corrupt"):
        nv.load_adapter(model, tmp_path)
    assert not nv.adapted_layers(model)
    (tmp_path / CONFIG_NAME).write_text("{\"format\": ")
    with pytest.raises(AdapterLoadError, match="not valid JSON"):
        nv.load_adapter(model, tmp_path)


@pytest.mark.parametrize("name", [WEIGHTS_NAME, CONFIG_NAME])
def test_a_git_lfs_pointer_or_a_web_page_in_place_of_a_file_is_named_as_such(tmp_path, name):
    # "truncated or corrupt ... save the adapter again" (or "not valid JSON") to a user who cloned or downloaded it
    nv.save_adapter(trained(), tmp_path)
    pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{'0' * 64}\n"
               f"size {(tmp_path / name).stat().st_size}\n")
    for text, said in ((pointer, r"is a Git LFS pointer \(\d+ bytes\), not the file itself: .*Run `git lfs pull`"),
                       ("\ufeff<!DOCTYPE html>\n<html><body>404</body></html>\n", r"is a web page or an XML error"),
                       ('<?xml version="1.0"?><Error><Code>NoSuchKey</Code></Error>', "is a web page or an XML")):
        (tmp_path / name).write_text(text)
        with pytest.raises(AdapterLoadError, match=rf"{name} {said}"):
            nv.load_adapter(tiny_vit(), tmp_path)


def test_loading_from_a_file_or_a_missing_path_says_which(tmp_path):
    (tmp_path / "notes.txt").write_text("not an adapter")
    with pytest.raises(AdapterLoadError, match=r"notes.txt is a file, not an adapter directory"):
        nv.load_adapter(tiny_vit(), tmp_path / "notes.txt")
    with pytest.raises(AdapterLoadError, match=r"notes.txt/task lies under .*notes.txt, a file, not an adapter"):
        nv.load_adapter(tiny_vit(), tmp_path / "notes.txt" / "task")  # named notes.txt/task itself a file
    with pytest.raises(AdapterLoadError, match=r"nowhere is missing"):
        nv.load_adapter(tiny_vit(), tmp_path / "nowhere")


def test_saving_a_model_without_adapters_or_with_bad_bits_fails(tmp_path):
    with pytest.raises(ValueError, match="inject"):
        nv.save_adapter(tiny_vit(), tmp_path)
    with pytest.raises(ValueError, match="bits"):
        nv.save_adapter(trained(), tmp_path, bits=2)


def test_loading_onto_an_already_adapted_model_with_the_same_config(tmp_path, images):
    model = trained()
    nv.save_adapter(model, tmp_path, bits=32)
    target = nv.inject(tiny_vit(), CONFIG)
    nv.load_adapter(target, tmp_path)
    with torch.no_grad():
        assert torch.equal(target(images), model(images))
    # another method: that difference alone (its settings' differ by construction: LoRA has no seed in its update)
    with pytest.raises(AdapterLoadError, match=r"already has adapters .*\(method 'lora' in the model, 'nola' in the "
                                               r"file\): a task switch"):
        nv.load_adapter(nv.inject(tiny_vit(), nv.LoRAConfig()), tmp_path)


@pytest.mark.parametrize("config", [
    CONFIG,
    nv.NOLAConfig(rank=2, num_basis_a=16, num_basis_b=16, basis="per_layer"),
    nv.LoRAConfig(rank=4, targets=["mlp.fc1", "mlp.fc2"]),  # full width: B is the parameter that the load overwrites
    nv.LoRAConfig(rank=4),
], ids=["nola_shared", "nola_per_layer", "lora_full_width", "lora_qv"])
def test_loading_onto_a_merged_model_switches_tasks_in_place(tmp_path, images, config):
    task_a, task_b = trained(config, seed=3), trained(config, seed=4)
    nv.save_adapter(task_a, tmp_path / "a", bits=32)
    nv.save_adapter(task_b, tmp_path / "b", bits=32)
    live = nv.merge(task_a)
    for _ in range(3):  # an error would add up with every switch
        nv.load_adapter(live, tmp_path / "a")
        nv.load_adapter(live, tmp_path / "b")
    assert all(layer.merged for layer in nv.adapted_layers(live).values())
    with torch.no_grad():
        torch.testing.assert_close(live(images), task_b(images), rtol=0, atol=1e-5)
        nv.unmerge(live)
        torch.testing.assert_close(live(images), task_b(images), rtol=0, atol=1e-5)
    fresh = dict(tiny_vit().named_parameters())  # and the frozen weights are the base model's again
    for name, parameter in live.named_parameters():
        if not parameter.requires_grad:
            torch.testing.assert_close(parameter, fresh[name], rtol=0, atol=1e-5)


def test_a_model_merged_in_grad_mode_keeps_its_shared_bases_so_a_task_switch_does_not_regenerate_them(
        tmp_path, monkeypatch):
    nv.save_adapter(trained(seed=4), tmp_path / "b")
    live = nv.merge(trained(seed=3))  # as users call it, without torch.no_grad()
    generated, original = [], BasisSpec.codes

    def counted(spec, *args, **kwargs):
        generated.append(spec)
        return original(spec, *args, **kwargs)

    monkeypatch.setattr(BasisSpec, "codes", counted)
    nv.load_adapter(live, tmp_path / "b")
    assert generated == []


@pytest.mark.parametrize("scale", [1e-7, 1e-40])
def test_at_16_bits_a_tensor_too_small_for_float16_is_stored_in_float32_not_lost(scale, tmp_path):
    # A LoRA B a few steps from its zero init: float16 made 16% of 1e-7-sized values zero (17% error), and every
    # 1e-40-sized value, so the adapter loaded as if untrained.
    model = nv.inject(tiny_vit(), nv.LoRAConfig(rank=2))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("lora_B"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    nv.save_adapter(model, tmp_path / "small")
    loaded = nv.load_adapter(tiny_vit(), tmp_path / "small")
    for name, parameter in model.named_parameters():
        if name.endswith("lora_B"):
            assert torch.equal(loaded.get_parameter(name), parameter)
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "small" / WEIGHTS_NAME)
    assert {t.dtype for n, t in stored.items() if n.endswith("lora_B")} == {torch.float32}
    assert {t.dtype for n, t in stored.items() if n.endswith("lora_A")} == {torch.float16}  # normal range: float16


def test_an_adapter_onto_a_model_with_other_norm_epsilons_is_refused(tmp_path):
    # the same weights with LayerNorm(eps=1e-2) changed outputs by ~14% and loaded without a word
    from functools import partial

    nv.save_adapter(trained(), tmp_path)
    other = tiny_vit(norm_layer=partial(torch.nn.LayerNorm, eps=1e-2))
    with pytest.raises(AdapterLoadError, match=r"normalisation layers use eps 1e-06, this model's use 0\.01"):
        nv.load_adapter(other, tmp_path)
    one_layer = tiny_vit()
    one_layer.blocks[0].norm1.eps = 1e-2  # per layer: a set of the distinct values would not see this
    with pytest.raises(AdapterLoadError, match=r"use eps 1e-06, this model's use \[0\.01, 1e-06, 1e-06"):
        nv.load_adapter(one_layer, tmp_path)
    nv.load_adapter(tiny_vit(), tmp_path)


@pytest.mark.parametrize("setting", [{"init_values": 1e-5}, {"reg_tokens": 2}, {"qkv_bias": False}])
def test_an_adapter_onto_a_model_with_other_parameters_is_refused_and_another_input_size_loads(tmp_path, setting):
    # the same weights where the names match, plus LayerScale or register tokens: logits off by 0.08-0.12, loaded
    nv.save_adapter(trained(), tmp_path)
    other = tiny_vit(**setting)
    own = other.state_dict()
    other.load_state_dict({k: v for k, v in tiny_vit().state_dict().items() if k in own and v.shape == own[k].shape},
                          strict=False)
    with pytest.raises(AdapterLoadError, match=r"other parameters \(by name, head aside\).*init_values \(LayerScale\)"):
        nv.load_adapter(other, tmp_path)
    nv.load_adapter(tiny_vit(img_size=48), tmp_path, check_frozen_weights=False)  # pos_embed of another size: names


def test_a_bfloat16_model_saved_at_16_bits_keeps_its_values_exactly(tmp_path):
    # float16 turns the small values a bfloat16 tensor holds into subnormals, and float32 doubles its bytes
    from safetensors.torch import load_file

    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).bfloat16()
    for config in (nv.LoRAConfig(rank=2), nv.NOLAConfig(rank=2, num_basis_a=16, num_basis_b=16)):
        model = as_if_trained(nv.inject(tiny_vit().to(torch.bfloat16), config), 0, scale=1e-5)
        directory = nv.save_adapter(model, tmp_path / type(config).__name__)
        stored = load_file(directory / "adapter_model.safetensors")
        assert {stored[name].dtype for name in ("head.weight", "head.bias")} == {torch.bfloat16}  # 16 bits, as is
        loaded = nv.load_adapter(tiny_vit().to(torch.bfloat16), directory)
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                assert torch.equal(loaded.get_parameter(name), parameter), name
        with torch.no_grad():
            assert torch.equal(loaded(images), model(images))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("config", [nv.NOLAConfig(rank=2, num_basis_a=16, num_basis_b=16), nv.LoRAConfig(rank=2)],
                         ids=["nola", "lora"])
def test_an_adapter_loaded_and_saved_again_at_its_bits_keeps_its_bytes(tmp_path, bits, config):
    # the step was computed anew from the decoded values, one float32 digit off each time: a re-saved 8- or 4-bit
    # file got a new sha256 every cycle (and NOLA's head values drifted)
    model = as_if_trained(nv.inject(tiny_vit(), config), 5, scale=0.1)
    nv.save_adapter(model, tmp_path / "0", bits=bits)
    for cycle in (1, 2):
        loaded = nv.load_adapter(tiny_vit(), tmp_path / str(cycle - 1))
        nv.save_adapter(loaded, tmp_path / str(cycle), bits=bits)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            assert (tmp_path / str(cycle) / name).read_bytes() == (tmp_path / "0" / name).read_bytes()


def test_an_adapter_saved_from_a_wrapper_is_not_pointed_at_a_submodule_of_the_same_class(tmp_path):
    """Saved from nn.Sequential(vit) and loaded onto the bare ViT, the refusal advised passing the ViT's own blocks
    (an nn.Sequential too), which fails on other grounds. It names the wrapper the file loads onto."""
    wrapper = torch.nn.Sequential(tiny_vit())
    nv.inject(wrapper, nv.NOLAConfig(rank=2, num_basis_a=8, num_basis_b=8))
    nv.save_adapter(wrapper, tmp_path)
    refusal = r"trained on a 'Sequential' module .* load it onto a 'Sequential'"
    with pytest.raises(AdapterLoadError, match=refusal) as err:
        nv.load_adapter(tiny_vit(), tmp_path)
    assert "blocks" not in str(err.value)
    loaded = torch.nn.Sequential(tiny_vit())
    nv.load_adapter(loaded, tmp_path)
    assert nv.adapted_layers(loaded)


def test_a_features_only_adapter_and_a_classifiers_are_refused_on_each_other_naming_the_wrapper(tmp_path):
    """timm's features_only=True model holds the backbone as 'model': its adapter loaded onto the classifier (and the
    reverse) was refused as "a constructor setting that adds or removes parameters differs", naming none of them."""
    config = nv.NOLAConfig(rank=2, num_basis_a=8, num_basis_b=8)
    features, classifier = tiny_vit(features_only=True, out_indices=(1,)), tiny_vit()
    for model, folder in ((features, tmp_path / "features"), (classifier, tmp_path / "classifier")):
        nv.inject(model, config)
        nv.save_adapter(model, folder)
    with pytest.raises(AdapterLoadError, match=r"saved from timm's features_only=True model, which holds the backbone "
                                               r"as 'model' .*\(features_only=True with the same out_indices\)"):
        nv.load_adapter(tiny_vit(), tmp_path / "features")
    with pytest.raises(AdapterLoadError, match=r"saved from the backbone alone, and this model is timm's features_only="
                                               r"True model.*\(without features_only\)"):
        nv.load_adapter(tiny_vit(features_only=True, out_indices=(1,)), tmp_path / "classifier")
    nv.load_adapter(tiny_vit(features_only=True, out_indices=(1,)), tmp_path / "features")


@pytest.mark.parametrize("name, kwargs", [
    ("vit_tiny_patch16_224", dict(depth=3, embed_dim=64, num_heads=2, img_size=32)),
    ("swin_tiny_patch4_window7_224", dict(depths=(1, 1), num_heads=(2, 4), embed_dim=32, img_size=56, window_size=7)),
])
def test_a_classifiers_adapter_on_a_features_model_that_pruned_blocks_or_renamed_stages_names_the_wrapper(
        tmp_path, name, kwargs):
    # was: "another depth? ... depth=3" on a model of depth 3 whose wrapper dropped its last block, and Swin's
    # (layers.0 renamed layers_0) a generic "other parameters" refusal
    classifier = nv.create_model(name, adapter=nv.NOLAConfig(rank=2, num_basis_a=8, num_basis_b=8), num_classes=3,
                                 **kwargs)
    nv.save_adapter(classifier, tmp_path / "classifier")
    features = timm.create_model(name, features_only=True, out_indices=(0,), **kwargs)
    nv.inject(features, nv.NOLAConfig(rank=2, num_basis_a=8, num_basis_b=8))
    nv.save_adapter(features, tmp_path / "features")
    features = timm.create_model(name, features_only=True, out_indices=(0,), **kwargs)
    with pytest.raises(AdapterLoadError, match=r"saved from the backbone alone, and this model is timm's features_"):
        nv.load_adapter(features, tmp_path / "classifier")
    with pytest.raises(AdapterLoadError, match=r"saved from timm's features_only=True model"):
        nv.load_adapter(timm.create_model(name, num_classes=3, **kwargs), tmp_path / "features")


@pytest.mark.parametrize("method, bits", [("full", 16), ("full", 32), ("linear", 32), ("linear", 8)])
def test_tensors_held_in_another_memory_layout_save_and_load_the_same_outputs(tmp_path, method, bits):
    # safetensors refuses non-contiguous tensors: a channels_last model's patch embedding, or a head assigned a
    # transposed matrix, failed to save with its raw error
    model = as_if_trained(nv.inject(tiny_vit(), method), 1, scale=0.1)
    if method == "full":
        model = model.to(memory_format=torch.channels_last)
        assert not model.patch_embed.proj.weight.is_contiguous()
    else:
        model.head.weight = torch.nn.Parameter(model.head.weight.detach().t().contiguous().t())
        assert not model.head.weight.is_contiguous()
    nv.save_adapter(model, tmp_path, bits=bits)
    images = torch.randn(2, 3, 32, 32)
    loaded = nv.load_adapter(tiny_vit(), tmp_path)
    with torch.no_grad():
        expected, got = model.eval()(images), loaded.eval()(images)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 if bits == 32 else 0.05)


def test_a_url_is_refused_as_an_adapter_directory(tmp_path, monkeypatch):
    # s3://bucket/x was written to a local folder s3:/bucket/x, and the CLI said "adapter saved to s3:/bucket/x"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"s3://bucket/x is a URL, and an adapter is saved to a local folder"):
        nv.save_adapter(nv.inject(tiny_vit(), "linear"), "s3://bucket/x")
    assert not (tmp_path / "s3:").exists()
