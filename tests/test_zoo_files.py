"""Weights files given to create_model and the *_nola zoo models: overlay files checked like pretrained_file, adapted
models' files loaded whole or refused, and errors that name the file and the fix."""
import json
import re
import warnings

import pytest
import timm
import torch
from safetensors.torch import save_file

import nola_vision as nv

NOLA = "vit_tiny_patch16_224_nola"
PLAIN = "vit_tiny_patch16_224"
SMALL = dict(depth=2, embed_dim=64, num_heads=2, img_size=32, num_classes=5)
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _trained(**kwargs):
    """A *_nola model whose adapters and head moved away from their init, as after training."""
    model = nv.create_model(NOLA, pretrained=False, **{**SMALL, **kwargs})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model.eval()


def _overlay(path, name=NOLA, **kwargs):
    return nv.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **{**SMALL, **kwargs})


def test_a_nola_file_adapted_at_other_targets_is_refused_naming_both(tmp_path):
    # was: loaded silently, the file's trained adapters and head dropped as unexpected keys
    torch.save(_trained().state_dict(), tmp_path / "nola.pth")  # mlp.fc1 and mlp.fc2
    with pytest.raises(ValueError, match=r"nola.pth holds adapter tensors this model does not have \(blocks.0.mlp.fc1."
                                         r"nola_alpha.*adapted at mlp.fc1, mlp.fc2 \(4 layers\), this one at attn.qkv "
                                         r"\(2 layers\).*Build vit_tiny_patch16_224_nola with the nola_\* settings"):
        _overlay(tmp_path / "nola.pth", nola_targets=["attn.qkv"])
    with pytest.raises(ValueError, match=r"this one at no layer \(it has no adapters\).*Pass adapter= with the "
                                         r"settings"):
        _overlay(tmp_path / "nola.pth", PLAIN)


def test_a_quantisation_aware_file_is_refused_with_what_create_model_users_can_do(tmp_path):
    # the refusal said to call nv.set_quantization_aware(model, 8) before loading, but create_model builds and loads
    # in one call: there was no model to call it on
    trained = _trained()
    nv.set_quantization_aware(trained, 8)
    torch.save(trained.state_dict(), tmp_path / "qat.pth")
    how = r"create_model builds and loads in one call, so build the model without {}, call " \
          r"nv.set_quantization_aware\(model, 8\), then model.load_state_dict\(torch.load\(file\)\)"
    with pytest.raises(ValueError, match=r"trained quantisation-aware at 8 bits.*" + how.format("checkpoint_path")):
        nv.create_model(NOLA, checkpoint_path=str(tmp_path / "qat.pth"), **SMALL)
    with pytest.raises(ValueError, match=how.format("pretrained_cfg_overlay")):
        _overlay(tmp_path / "qat.pth")
    model = nv.create_model(NOLA, **SMALL)  # as it says
    nv.set_quantization_aware(model, 8)
    model.load_state_dict(torch.load(tmp_path / "qat.pth"))
    torch.testing.assert_close(model.eval()(X), trained(X), atol=0, rtol=0)


def test_a_nola_file_through_create_model_with_an_adapter_loads_its_adapters_or_names_the_seed(tmp_path):
    trained = _trained()
    torch.save(trained.state_dict(), tmp_path / "nola.pth")
    loaded = _overlay(tmp_path / "nola.pth", PLAIN, adapter="nola").eval()  # was: fresh adapters and head
    torch.testing.assert_close(loaded(X), trained(X))
    with pytest.raises(ValueError, match=r"does not load into vit_tiny_patch16_224 as built: blocks.0.mlp.fc1: .*seed "
                                         r"\[0, 0\] \(this model: \[3, 3\]\)"):
        _overlay(tmp_path / "nola.pth", PLAIN, adapter=dict(method="nola", seed=3))


def test_a_merged_nola_file_and_one_with_a_1000_class_head_load_through_the_overlay(tmp_path):
    # were refused: the merged weights were loaded apart from their flag; timm loaded a 1000-class file strictly
    for num_classes in (5, 1000):
        trained = _trained(num_classes=num_classes)
        nv.merge(trained)
        torch.save(trained.state_dict(), tmp_path / "merged.pth")
        loaded = _overlay(tmp_path / "merged.pth", num_classes=num_classes).eval()
        torch.testing.assert_close(loaded(X), trained(X))


def test_an_overlay_file_that_does_not_cover_the_model_is_refused(tmp_path):
    # was: random weights left in place for what the file lacks, the extra blocks of a deeper model's file dropped
    deeper = timm.create_model(PLAIN, pretrained=False, **{**SMALL, "depth": 3}).state_dict()
    save_file({k: v for k, v in deeper.items() if not k.startswith(("blocks.1.", "blocks.2."))},
              str(tmp_path / "part.safetensors"))
    torch.save(deeper, tmp_path / "deeper.pth")
    for name, adapter in ((PLAIN, "nola"), (PLAIN, None), (NOLA, None)):
        with pytest.raises(ValueError, match=r"overlay file .*part.safetensors does not fit vit_tiny_patch16_224: 12 "
                                             r"backbone weights missing \(e.g. blocks.1.attn.proj.bias"):
            _overlay(tmp_path / "part.safetensors", name, adapter=adapter)
        with pytest.raises(ValueError, match=r"deeper.pth does not fit .*12 unexpected keys \(e.g. blocks.2.*depth"):
            _overlay(tmp_path / "deeper.pth", name, adapter=adapter)
    base = {k: v for k, v in deeper.items() if not k.startswith("blocks.2.")}
    torch.save(base, tmp_path / "base.pth")  # the whole backbone, with another head: loads
    model = _overlay(tmp_path / "base.pth", PLAIN, adapter="nola", num_classes=3)
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight, base["blocks.1.attn.qkv.weight"], rtol=0, atol=0)


def _cut_short(path, source):
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name", [PLAIN, NOLA])
def test_an_overlay_file_that_is_missing_a_folder_or_cut_short_is_named(tmp_path, name):
    # was: FileNotFoundError('') for a missing file or a folder, EOFError('') for an empty one (plain names)
    with pytest.raises(FileNotFoundError, match=r"overlay file .*nope.safetensors does not exist: point it at"):
        _overlay(tmp_path / "nope.safetensors", name)
    with pytest.raises(ValueError, match=r"overlay file .* is a directory.*nv.load_adapter\(model, directory\)"):
        _overlay(tmp_path, name)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=rf"empty.pth does not load into {name} \(EOFError: the file ends early\)"):
        _overlay(tmp_path / "empty.pth", name)
    state = timm.create_model(PLAIN, pretrained=False, **SMALL).state_dict()
    save_file(state, str(tmp_path / "full.safetensors"))
    torch.save(state, tmp_path / "full.pth")
    for suffix in (".safetensors", ".pth"):
        _cut_short(tmp_path / f"short{suffix}", tmp_path / f"full{suffix}")
        with pytest.raises(ValueError, match=rf"short{suffix} does not load into {name} \(.*intact"):
            _overlay(tmp_path / f"short{suffix}", name)


@pytest.mark.parametrize("name, adapter", [(PLAIN, "nola"), (PLAIN, None), (NOLA, None)])
def test_weights_that_cannot_be_downloaded_are_named_with_offline_mode_and_what_instead(monkeypatch, name, adapter):
    # was: Hugging Face's raw LocalEntryNotFoundError for plain names; no word of HF_HUB_OFFLINE for any
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"pretrained weights of vit_tiny_patch16_224 \(timm downloads them "
                                                r"from the Hugging Face Hub.*HF_HUB_OFFLINE is set, so only the cache "
                                                r"folder \(.*, under HF_HOME\).*pretrained_cfg_overlay=dict\(file="):
        nv.create_model(name, adapter, pretrained=True, **SMALL)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(FileNotFoundError, match=r"local cache\. Connect to the internet once"):
        nv.create_model(name, adapter, pretrained=True, **SMALL)


def test_a_checkpoint_of_another_seed_or_width_says_which_in_the_error(tmp_path):
    # was: "(Error(s) in loading state_dict for VisionTransformer: ...)", the cause cut off
    torch.save(_trained(nola_seed=3).state_dict(), tmp_path / "seed3.pth")
    with pytest.raises(ValueError, match=r"checkpoint_path .*seed3.pth does not load into vit_tiny_patch16_224_nola as "
                                         r"built: blocks.0.mlp.fc1: .*seed \[3, 3\] \(this model: \[0, 0\]\).*\(and 3 "
                                         r"more layers like it\)"):
        nv.create_model(NOLA, checkpoint_path=str(tmp_path / "seed3.pth"), **SMALL)
    torch.save(timm.create_model(PLAIN, pretrained=False, **{**SMALL, "embed_dim": 32}).state_dict(),
               tmp_path / "narrow.pth")
    with pytest.raises(ValueError, match=r"narrow.pth holds weights of other names or shapes than .*\(size mismatch "
                                         r"for cls_token: copying a param with shape torch.Size\(\[1, 1, 32\]\)"):
        nv.create_model(NOLA, checkpoint_path=str(tmp_path / "narrow.pth"), **SMALL)


def _big_vision_npz(model, path):
    """``model`` (one block) in big_vision's .npz layout, which timm's ``load_pretrained`` reads."""
    import numpy as np

    s = {k: v.numpy() for k, v in model.state_dict().items()}
    heads, width = model.blocks[0].attn.num_heads, s["cls_token"].shape[-1]
    block, attn = "Transformer/encoderblock_0/", "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/"
    arrays = {"embedding/kernel": s["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
              "embedding/bias": s["patch_embed.proj.bias"], "cls": s["cls_token"],
              "Transformer/posembed_input/pos_embedding": s["pos_embed"], "head/kernel": s["head.weight"].T,
              "head/bias": s["head.bias"], "Transformer/encoder_norm/scale": s["norm.weight"],
              "Transformer/encoder_norm/bias": s["norm.bias"],
              attn + "out/kernel": s["blocks.0.attn.proj.weight"].reshape(width, heads, -1).transpose(1, 2, 0),
              attn + "out/bias": s["blocks.0.attn.proj.bias"]}
    for norm, ours in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
        arrays[f"{block}{norm}/scale"], arrays[f"{block}{norm}/bias"] = s[f"blocks.0.{ours}.weight"], s[
            f"blocks.0.{ours}.bias"]
    weights, biases = np.split(s["blocks.0.attn.qkv.weight"], 3), np.split(s["blocks.0.attn.qkv.bias"], 3)
    for name, weight, bias in zip(("query", "key", "value"), weights, biases):
        arrays[f"{attn}{name}/kernel"], arrays[f"{attn}{name}/bias"] = weight.T.reshape(width, heads, -1), bias.reshape(
            heads, -1)
    for i in range(2):
        arrays[f"{block}MlpBlock_3/Dense_{i}/kernel"] = s[f"blocks.0.mlp.fc{i + 1}.weight"].T
        arrays[f"{block}MlpBlock_3/Dense_{i}/bias"] = s[f"blocks.0.mlp.fc{i + 1}.bias"]
    np.savez(path, **arrays)


def test_a_big_vision_npz_overlay_loads_as_timm_loads_it(tmp_path):
    """The coverage check read every overlay file as a torch state dict, and refused timm's own .npz route
    (custom_load) as a file cut short."""
    kwargs = dict(SMALL, depth=1, num_classes=1000)
    source = timm.create_model(PLAIN, pretrained=False, **kwargs).eval()
    _big_vision_npz(source, tmp_path / "vit.npz")
    for adapter in (None, "nola"):
        model = nv.create_model(PLAIN, adapter, pretrained=True, **kwargs,
                                pretrained_cfg_overlay=dict(file=str(tmp_path / "vit.npz"), custom_load=True)).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(X), source(X), rtol=1e-4, atol=1e-4)


def _local_dir(folder, state, num_classes=5, architecture=PLAIN):
    """A ``local-dir:`` model folder as timm reads it: config.json and model.safetensors."""
    folder.mkdir()
    config = {"architecture": architecture, "num_classes": num_classes,
              "model_args": {k: v for k, v in SMALL.items() if k != "num_classes"},
              "pretrained_cfg": {"input_size": [3, 32, 32], "classifier": "head", "num_classes": num_classes}}
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, str(folder / "model.safetensors"))
    return f"local-dir:{folder}"


def test_weights_given_in_memory_or_as_a_local_folder_are_checked_like_an_overlay_file(tmp_path):
    """A partial state dict in the overlay, or in a local-dir: folder, loaded without a word where the head size
    differed (timm then loads non-strictly): blocks it lacked kept their random init."""
    whole = timm.create_model(PLAIN, pretrained=False, **SMALL).state_dict()
    part = {k: v for k, v in whole.items() if not k.startswith("blocks.0.")}
    missing = r"does not fit vit_tiny_patch16_224: 12 backbone weights missing \(e.g. blocks.0.attn.proj.bias"
    for name, adapter in ((PLAIN, "nola"), (PLAIN, None), (NOLA, None)):
        with pytest.raises(ValueError, match=rf"pretrained_cfg_overlay state_dict {missing}"):
            nv.create_model(name, adapter=adapter, pretrained=True, pretrained_cfg_overlay=dict(state_dict=part),
                            **{**SMALL, "num_classes": 3})
    model = nv.create_model(PLAIN, pretrained=True, pretrained_cfg_overlay=dict(state_dict=whole),
                            **{**SMALL, "num_classes": 3})
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, whole["blocks.0.attn.qkv.weight"], rtol=0, atol=0)
    local = _local_dir(tmp_path / "part", part)
    with pytest.raises(ValueError, match=rf"{local}'s weights file .*model.safetensors {missing}"):
        nv.create_model(local, pretrained=True, num_classes=3)
    with pytest.raises(ValueError, match=rf"{local}'s weights file .*model.safetensors {missing}"):
        nv.models.build_backbone(local, 3)
    local = _local_dir(tmp_path / "whole", whole)
    for model in (nv.create_model(local, pretrained=True, num_classes=3), nv.models.build_backbone(local, 3)):
        torch.testing.assert_close(model.blocks[0].attn.qkv.weight, whole["blocks.0.attn.qkv.weight"], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"pretrained_cfg_overlay names a weights source \(\['state_dict'\]\)"):
        nv.models.build_backbone(PLAIN, 3, pretrained_cfg_overlay=dict(state_dict=whole), depth=2, embed_dim=64)


@pytest.mark.parametrize("name", [PLAIN, NOLA])
def test_weights_named_in_the_overlay_without_pretrained_are_refused(tmp_path, name):
    """timm ignores the overlay's weights with pretrained=False: the model came back random without a word."""
    torch.save(timm.create_model(PLAIN, pretrained=False, **SMALL).state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"pretrained_cfg_overlay names weights \(file\), but pretrained=False builds "
                                         r"random weights"):
        nv.create_model(name, pretrained_cfg_overlay=dict(file=str(tmp_path / "w.pth")), **SMALL)
    with pytest.raises(ValueError, match=r"names weights \(file\), but pretrained=False"):
        timm.create_model(NOLA, pretrained_cfg_overlay=dict(file=str(tmp_path / "w.pth")), **SMALL)


@pytest.mark.parametrize("adapter", ["linear", "full", None])
def test_a_trained_head_of_the_models_size_loads_through_the_overlay(tmp_path, adapter):
    """timm drops a file's head for another num_classes than its config's 1000, even where it fits the model: a
    linear probe's or a fine-tune's head came back at its random init."""
    trained = nv.create_model(PLAIN, adapter=adapter, pretrained=False, **SMALL)
    with torch.no_grad():
        trained.head.weight.normal_(generator=torch.Generator().manual_seed(1))
    torch.save(trained.state_dict(), tmp_path / "trained.pth")
    loaded = _overlay(tmp_path / "trained.pth", PLAIN, adapter=adapter)
    torch.testing.assert_close(loaded.eval()(X), trained.eval()(X), rtol=0, atol=0)
    fresh = _overlay(tmp_path / "trained.pth", PLAIN, adapter=adapter, num_classes=3)  # another head size: a new head
    assert fresh.head.weight.shape == (3, 64)


def test_a_big_vision_npz_overlay_without_custom_load_and_an_adapter_folder_are_named(tmp_path):
    import numpy as np

    np.savez(tmp_path / "w.npz", cls_token=np.zeros((1, 1, 64), dtype=np.float32))
    for name in (PLAIN, NOLA):  # torch failed on it as on a damaged zip: "file in archive is not in a subdirectory"
        with pytest.raises(ValueError, match=r"w.npz is a big_vision .npz file, which timm reads only with "
                                             r"custom_load=True"):
            _overlay(tmp_path / "w.npz", name)
    model = nv.inject(timm.create_model(PLAIN, pretrained=False, **SMALL), nv.NOLAConfig(rank=2, num_basis_a=4,
                                                                                      num_basis_b=4))
    folder = nv.save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match=r"is a folder: an adapter saved by nv.save_adapter loads .* "
                                         r"nv.load_adapter\(model, folder\)"):
        nv.create_model(PLAIN, adapter=str(folder), pretrained=False, **SMALL)


def test_an_overlay_files_head_is_not_read_again_where_timm_loaded_it(tmp_path, monkeypatch):
    """The whole file was read a second time for a head timm had loaded itself (1000 classes, as its config's)."""
    state = timm.create_model(PLAIN, pretrained=False, **{**SMALL, "num_classes": 1000}).state_dict()
    save_file(state, str(tmp_path / "in1k.safetensors"))  # read by timm, and by nola_vision for its keys only
    monkeypatch.setattr(timm.models, "load_state_dict", lambda *a, **k: pytest.fail("the file was read again"))
    model = _overlay(tmp_path / "in1k.safetensors", PLAIN, num_classes=1000)
    torch.testing.assert_close(model.head.weight, state["head.weight"], rtol=0, atol=0)


@pytest.mark.parametrize("create", [timm.create_model, nv.create_model], ids=["timm", "nv"])
def test_an_overlay_file_with_a_head_of_another_size_says_which_num_classes_to_pass(tmp_path, create):
    # was: torch's bare "size mismatch for head.weight" through timm.create_model of a *_nola name at 1000 classes
    torch.save(_trained().state_dict(), tmp_path / "nola.pth")
    with pytest.raises(ValueError, match=r"nola.pth holds a head of 5 outputs, vit_tiny_patch16_224_nola as built has "
                                         r"1000: pass the num_classes it was trained with \(5\)"):
        create(NOLA, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "nola.pth")),
               **{**SMALL, "num_classes": 1000})
    torch.save(timm.create_model(PLAIN, pretrained=False, **SMALL).state_dict(), tmp_path / "plain.pth")
    with pytest.raises(ValueError, match=r"plain.pth holds a head of 5 outputs"):
        _overlay(tmp_path / "plain.pth", PLAIN, num_classes=1000)


def test_a_local_folder_of_a_nola_model_loads_its_trained_adapters_or_names_the_head_size(tmp_path):
    # was: loaded the backbone and head but left the adapters at their init, without a word (timm's local-dir:
    # weights reach the *_nola entrypoint through its pretrained_cfg)
    trained = _trained()
    local = _local_dir(tmp_path / "nola", trained.state_dict(), architecture=NOLA)
    for create in (nv.create_model, timm.create_model):
        torch.testing.assert_close(create(local, pretrained=True).eval()(X), trained(X), rtol=0, atol=0)
        with pytest.raises(ValueError, match=r"model.safetensors holds a trained head head.weight of shape \(5, 64\), "
                                             r"this model's is \(3, 64\): pass the num_classes it was trained with"):
            create(local, pretrained=True, num_classes=3)
    with pytest.raises(ValueError, match=r"comes with NOLA adapters .*plain model \('vit_tiny_patch16_224'\)"):
        nv.create_model(local, adapter="lora", pretrained=True)


def test_an_adapted_models_checkpoint_path_loads_after_create_models_injection(tmp_path):
    # was refused as "weights of other names or shapes": timm loaded it into the model before inject
    trained = _trained()
    torch.save(trained.state_dict(), tmp_path / "nola.pth")
    loaded = nv.create_model(PLAIN, adapter="nola", checkpoint_path=str(tmp_path / "nola.pth"), **SMALL).eval()
    torch.testing.assert_close(loaded(X), trained(X), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"checkpoint_path .*nola.pth does not load into vit_tiny_patch16_224 as "
                                         r"built: blocks.0.mlp.fc1: .*seed \[0, 0\] \(this model: \[3, 3\]\)"):
        nv.create_model(PLAIN, adapter=dict(method="nola", seed=3), checkpoint_path=str(tmp_path / "nola.pth"),
                        **SMALL)


@pytest.mark.parametrize("value", [-1, "3", 2.5])
def test_the_zoo_entrypoint_checks_num_classes_like_create_model(value):
    # -1 built a headless model without a word, "3" failed deep in timm
    with pytest.raises(ValueError, match=rf"num_classes must be an integer >= 0 or null, got {value!r}"):
        timm.create_model(NOLA, num_classes=value, **{k: v for k, v in SMALL.items() if k != "num_classes"})


@pytest.mark.parametrize("name, adapter", [(NOLA, None), (PLAIN, "lora"), (PLAIN, None)])
def test_features_only_models_load_a_local_file_checked_against_the_layers_they_keep(tmp_path, name, adapter):
    # was refused: the check compared the file with the features wrapper's names (model. prefix, pruned blocks)
    plain = timm.create_model(PLAIN, pretrained=False, **SMALL)
    torch.save(plain.state_dict(), tmp_path / "plain.pth")
    overlay = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "plain.pth")), features_only=True,
                   **SMALL)
    reference = timm.create_model(PLAIN, out_indices=(0,), **overlay).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "froze its own nn.Linear layers" warning for a features wrapper
        model = nv.create_model(name, adapter=adapter, out_indices=(0,), **overlay).eval()  # block 1 pruned
    torch.testing.assert_close(model(X)[0], reference(X)[0], rtol=0, atol=1e-5)
    state = plain.state_dict()
    del state["blocks.0.attn.qkv.weight"]
    torch.save(state, tmp_path / "part.pth")
    with pytest.raises(ValueError, match=r"part.pth does not fit vit_tiny_patch16_224: 1 backbone weights missing "
                                         r"\(e.g. blocks.0.attn.qkv.weight\)"):
        nv.create_model(name, adapter=adapter, out_indices=(0,), **{**overlay, "pretrained_cfg_overlay": dict(
            file=str(tmp_path / "part.pth"))})


def test_a_features_only_nola_model_loads_the_trained_adapters_of_its_file(tmp_path):
    trained = _trained()
    torch.save(trained.state_dict(), tmp_path / "nola.pth")
    model = timm.create_model(NOLA, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "nola.pth")),
                              features_only=True, out_indices=(0, 1), **SMALL).eval()
    expected = trained.forward_intermediates(X, indices=[0, 1], intermediates_only=True)
    for got, want in zip(model(X), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_a_flattening_features_wrapper_is_checked_under_its_own_names(tmp_path):
    swin = dict(depths=(1, 1), embed_dim=32, num_heads=(1, 1), img_size=32, window_size=4)
    state = timm.create_model("swin_tiny_patch4_window7_224", **swin).state_dict()
    torch.save(state, tmp_path / "swin.pth")
    overlay = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "swin.pth")), features_only=True,
                   **swin)
    images = torch.randn(1, 3, 32, 32)
    reference = timm.create_model("swin_tiny_patch4_window7_224", **overlay).eval()
    for got, want in zip(nv.create_model("swin_tiny_patch4_window7_224", adapter="lora", **overlay).eval()(images),
                         reference(images)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    del state["layers.1.blocks.0.attn.qkv.weight"]
    torch.save(state, tmp_path / "part.pth")
    with pytest.raises(ValueError, match=r"1 backbone weights missing \(e.g. layers_1.blocks.0.attn.qkv.weight\)"):
        nv.create_model("swin_tiny_patch4_window7_224", **{**overlay, "pretrained_cfg_overlay": dict(
            file=str(tmp_path / "part.pth"))})


def test_a_features_only_nola_model_keeping_fewer_blocks_loads_the_adapters_it_keeps(tmp_path):
    # the pruned block's adapter tensors were taken for another model's: "holds adapter tensors this model does not
    # have (blocks.1.mlp.fc1.nola_alpha ...)"
    trained = _trained()
    torch.save(trained.state_dict(), tmp_path / "nola.pth")
    model = timm.create_model(NOLA, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "nola.pth")),
                              features_only=True, out_indices=(0,), **SMALL).eval()
    expected = trained.forward_intermediates(X, indices=[0], intermediates_only=True)
    torch.testing.assert_close(model(X)[0], expected[0], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"holds adapter tensors this model does not have"):  # other targets: refused
        timm.create_model(NOLA, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "nola.pth")),
                          features_only=True, out_indices=(0,), nola_targets=["attn.qkv"], **SMALL)


@pytest.mark.parametrize("settings", [dict(nola_num_basis_a=32, nola_seed=3), dict(nola_config={"rank": 2})])
def test_save_for_hf_of_a_nola_model_writes_a_folder_that_builds_it_again_with_its_settings(tmp_path, settings):
    """The folder named the base architecture beside the nola_* arguments timm records, which the base does not take:
    it built nothing (TypeError). Its adapter files still name the base architecture they were trained on."""
    trained = _trained(**settings)
    timm.models.save_for_hf(trained, tmp_path / "hf")
    local = f"local-dir:{tmp_path / 'hf'}"
    for create in (nv.create_model, timm.create_model):
        rebuilt = create(local, pretrained=True).eval()
        torch.testing.assert_close(rebuilt(X), trained(X), rtol=0, atol=0)
    nv.save_adapter(rebuilt, tmp_path / "adapter", bits=32)
    plain = timm.create_model(PLAIN, pretrained=False, **SMALL)
    plain.load_state_dict(trained.state_dict(), strict=False)  # the same backbone and head, without adapters
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["backbone"] == PLAIN
    loaded = nv.load_adapter(plain, tmp_path / "adapter").eval()
    torch.testing.assert_close(loaded(X), trained(X), rtol=0, atol=0)


def test_a_folder_save_for_hf_wrote_under_the_base_name_says_which_architecture_to_name(tmp_path):
    timm.models.save_for_hf(_trained(nola_num_basis_a=32), tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "architecture": PLAIN}))  # as written before
    with pytest.raises(TypeError, match=rf"config.json gives {PLAIN} NOLA arguments \(nola_num_basis_a\): .* Name "
                                        rf"\"{NOLA}\" as the \"architecture\""):
        nv.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True)


@pytest.mark.parametrize("name, kwargs, how", [
    (PLAIN, dict(depth=2, embed_dim=64, num_heads=2, img_size=32), "holds the backbone as 'model'"),
    ("swin_tiny_patch4_window7_224", dict(depths=(1, 1), num_heads=(2, 4), embed_dim=32, img_size=56, window_size=7),
     "renames layers.0 as layers_0"),
])
def test_a_features_only_models_state_dict_as_the_overlay_is_named(tmp_path, name, kwargs, how):
    # Swin's gave timm's raw "SwinTransformer has no attribute `layers_0`", a ViT's "28 backbone weights missing"
    features = timm.create_model(name, pretrained=False, features_only=True, out_indices=(0,), **kwargs)
    torch.save(features.state_dict(), tmp_path / "features.pth")
    for extra in (dict(features_only=True, out_indices=(0,)), dict(num_classes=3)):
        with pytest.raises(ValueError, match=rf"features.pth holds the state dict of timm's features_only=True model "
                                             rf"\(which {re.escape(how)}\)"):
            nv.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "features.pth")),
                            **kwargs, **extra)


def test_an_adapted_checkpoint_path_of_other_layers_names_where_each_is_adapted(tmp_path):
    # torch's "Unexpected key(s)" listed every adapter tensor, naming neither model's layout
    trained = _trained()
    torch.save(trained.state_dict(), tmp_path / "nola.pth")
    checkpoint = str(tmp_path / "nola.pth")
    layouts = r"the file's model is adapted at mlp.fc1, mlp.fc2 \(4 layers\), this one at attn.qkv \(2 layers\)"
    with pytest.raises(ValueError, match=rf"holds adapter tensors of another adapted model: {layouts}\. Pass adapter="):
        nv.create_model(PLAIN, adapter=nv.LoRAConfig(targets=["attn.qkv"]), checkpoint_path=checkpoint, **SMALL)
    with pytest.raises(ValueError, match=rf"{layouts}\. Build {NOLA} with the nola_\* settings"):
        nv.create_model(NOLA, nola_targets=["attn.qkv"], checkpoint_path=checkpoint, **SMALL)
    with pytest.raises(ValueError, match=r"holds an adapted model's state dict \(adapted at mlp.fc1, mlp.fc2 \(4 layers"
                                         r"\)\): pass adapter="):
        nv.create_model(PLAIN, checkpoint_path=checkpoint, **SMALL)
    loaded = nv.create_model(NOLA, checkpoint_path=checkpoint, **SMALL).eval()
    torch.testing.assert_close(loaded(X), trained(X), rtol=0, atol=0)


def test_a_wrappers_state_dict_is_named_by_its_prefix_not_as_a_features_only_models(tmp_path):
    # a FewShotClassifier-like wrapper's state dict (every key under 'model.', its head too) was called a
    # features_only model's; as a checkpoint_path, "adapted at mlp.fc1, mlp.fc2 (4 layers), this one at mlp.fc1, ..."
    trained = _trained()
    torch.save({f"model.{key}": value for key, value in trained.state_dict().items()}, tmp_path / "wrapped.pth")
    with pytest.raises(ValueError, match=r"its keys carry a 'model.' prefix \(a Lightning checkpoint, a wrapper's"):
        nv.create_model(PLAIN, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "wrapped.pth")),
                        **SMALL)
    with pytest.raises(ValueError, match=r"names its adapted layers otherwise \(model.blocks.0.mlp.fc1, this model's "
                                         r"blocks.0.mlp.fc1\): a wrapper's state dict"):
        nv.create_model(PLAIN, adapter="nola", checkpoint_path=str(tmp_path / "wrapped.pth"), **SMALL)


@pytest.mark.parametrize("remove", [nv.unload, nv.merge_and_unload])
def test_a_nola_model_whose_adapters_were_removed_saves_for_hf_as_its_plain_model(tmp_path, remove):
    # it still named <base>_nola: its folder built fresh adapters around the plain weights (4e-5 off)
    model = remove(_trained(nola_num_basis_a=32))
    timm.models.save_for_hf(model, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architecture"] == PLAIN and not any(key.startswith("nola_") for key in config["model_args"])
    rebuilt = nv.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True).eval()
    assert not nv.adapted_layers(rebuilt)
    torch.testing.assert_close(rebuilt(X), model(X), rtol=0, atol=0)
