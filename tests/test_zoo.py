"""NOLA variants in timm's registry and create_model for other timm families."""
import re

import numpy as np
import pytest
import timm
import torch
from tiny_models import TINY_VIT

import nola_vision as nv


def test_registered_vit_b_nola_has_the_paper_count():
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224_nola", pretrained=False, num_classes=10)
    counts = nv.count_parameters(model)
    assert counts["adapter"] == 49_152 and counts["head"] == 7_690


def test_a_zoo_name_with_an_unknown_tag_names_the_nola_model_and_its_tags():
    # timm's own error named the base model (vit_base_patch16_224) and no tag
    with pytest.raises(ValueError, match=r"unknown pretrained tag 'nosuchtag' for timm model "
                                         r"'vit_base_patch16_224_nola'. Available: vit_base_patch16_224_nola\."):
        timm.create_model("vit_base_patch16_224_nola.nosuchtag", pretrained=False)


def test_a_zoo_model_whose_weights_cannot_be_downloaded_says_where_from_and_what_instead(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    from nola_vision.models import zoo

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(zoo, "model_entrypoint", lambda name: offline)
    with pytest.raises(FileNotFoundError, match=r"pretrained weights of vit_base_patch16_224.augreg2_in21k_ft_in1k "
                                                r"\(timm downloads them from the Hugging Face Hub, .*pretrained_cfg_"
                                                r"overlay=dict\(file=.*pretrained=False"):
        timm.create_model("vit_base_patch16_224_nola.augreg2_in21k_ft_in1k", pretrained=True)


def test_registered_variants_keep_the_base_pretrained_tags():
    assert "vit_base_patch16_224_nola.augreg2_in21k_ft_in1k" in timm.list_pretrained("vit_base_patch16_224_nola*")
    assert timm.is_model("vit_small_patch14_dinov2_nola") and timm.is_model("vit_large_patch16_224_nola")
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224_nola.augreg2_in21k_ft_in1k", pretrained=False, num_classes=10,
                                  nola_num_basis_a=512)
    assert model.pretrained_cfg["tag"] == "augreg2_in21k_ft_in1k"
    assert nv.count_parameters(model)["adapter"] == 24 * (512 + 1024)


def test_nola_kwargs_are_validated():
    with pytest.raises(TypeError, match="nola_rnk"):
        timm.create_model("vit_tiny_patch16_224_nola", nola_rnk=2)


@pytest.mark.parametrize("num_classes", [-1, "3", 2.5, True])
def test_create_model_refuses_a_num_classes_that_is_not_an_integer_of_at_least_0(num_classes):
    # -1 built a headless model silently; "3", 2.5 and True failed deep inside timm or torch
    shown = re.escape(repr(num_classes))
    with pytest.raises(ValueError, match=rf"num_classes must be an integer >= 0 or null, got {shown}"):
        nv.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **TINY_VIT)


def test_create_model_takes_num_classes_0_as_a_headless_encoder():
    model = nv.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=np.int64(0), **TINY_VIT)
    assert model.num_classes == 0 and model(torch.randn(1, 3, 32, 32)).shape == (1, 64)


@pytest.mark.parametrize("arch", ["swin_tiny_patch4_window7_224", "deit_tiny_patch16_224"])
def test_create_model_adapts_other_timm_families(arch):
    config = nv.NOLAConfig(num_basis_a=32, num_basis_b=32)
    model = nv.create_model(arch, adapter=config, pretrained=False, num_classes=3)
    layers = nv.adapted_layers(model)
    assert layers and all(name.endswith(("mlp.fc1", "mlp.fc2")) for name in layers)
    assert nv.count_parameters(model)["adapter"] == 64 * len(layers)
    out = model(torch.randn(1, 3, 224, 224))
    out.sum().backward()
    assert out.shape == (1, 3)
    assert all(layer.nola_alpha.grad is not None for layer in layers.values())


def test_unknown_model_names_suggest_close_matches():
    with pytest.raises(ValueError, match="vit_base_patch16_224"):
        nv.create_model("vit_bse_patch16_224")


def test_nola_variants_download_the_base_weights():
    from timm.models import get_pretrained_cfg

    for tag in ("", ".augreg2_in21k_ft_in1k", ".mae"):
        nola = get_pretrained_cfg(f"vit_base_patch16_224_nola{tag}")
        base = get_pretrained_cfg(f"vit_base_patch16_224{tag}")
        assert nola.hf_hub_id == base.hf_hub_id and nola.url == base.url
        assert nola.architecture == "vit_base_patch16_224_nola"


def test_nola_config_takes_a_nola_config_or_its_dict_and_refuses_another_method(tmp_path):
    small = dict(depth=2, embed_dim=64, num_heads=2, img_size=32, num_classes=5)
    model = timm.create_model("vit_base_patch16_224_nola", nola_config=nv.NOLAConfig(num_basis_a=16).to_dict(),
                              **small)
    assert nv.count_parameters(model)["adapter"] == nv.count_parameters(
        timm.create_model("vit_base_patch16_224_nola", nola_config=nv.NOLAConfig(num_basis_a=16), **small))["adapter"]
    with pytest.raises(TypeError, match=r"must be a NOLAConfig.*got a LoRAConfig.*nv.create_model"):
        timm.create_model("vit_base_patch16_224_nola", nola_config=nv.LoRAConfig(rank=2), **small)
    directory = nv.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"is a directory.*nv.load_adapter\(model, directory\)"):
        nv.create_model("vit_base_patch16_224", checkpoint_path=str(directory), **small)


def test_timm_hub_and_local_folder_names_pass_the_name_check_and_a_flat_nola_config_is_nola():
    from nola_vision.models.zoo import check_model_name

    for name in ("local-dir:/models/my_vit", "hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"):
        check_model_name(name)  # timm resolves these sources itself
    model = timm.create_model("vit_tiny_patch16_224_nola", pretrained=False, **TINY_VIT,
                              nola_config={"rank": 2, "num_basis_a": 8, "num_basis_b": 8})  # no "method" key
    assert nv.adapted_layers(model)["blocks.0.mlp.fc1"].rank == 2


ZOO_KW = dict(depth=2, embed_dim=64, num_heads=2, img_size=32, num_classes=3)


def _trained_zoo_model():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224_nola", pretrained=False, **ZOO_KW)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_zoo_models_own_state_dict_as_pretrained_file_keeps_its_adapter_and_head(tmp_path, suffix, caplog):
    from safetensors.torch import save_file

    model = _trained_zoo_model()
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    path = tmp_path / f"full{suffix}"
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    x = torch.randn(2, 3, 32, 32)
    # timm loaded the base weights and dropped the adapter tensors (unexpected keys) and the head (num_classes=3)
    with caplog.at_level("INFO", logger="timm"):
        loaded = timm.create_model("vit_tiny_patch16_224_nola", pretrained=True,
                                   pretrained_cfg_overlay=dict(file=str(path)), **ZOO_KW).eval()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    # timm's "Unexpected keys (...nola_alpha...)" warning told of adapters dropped that the model then loads
    assert "Unexpected keys" not in caplog.text
    with caplog.at_level("INFO", logger="timm"):
        timm.create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          pretrained_strict=False, **ZOO_KW)
    assert "Unexpected keys (blocks.0.mlp.fc1._extra_state" in caplog.text  # outside the _nola load: timm's own


def test_a_pretrained_file_of_another_nola_model_is_refused(tmp_path):
    model = _trained_zoo_model()
    torch.save(model.state_dict(), tmp_path / "full.pth")
    with pytest.raises(ValueError, match=r"adapter tensors of another adapted model: it has no blocks.0.attn.qkv.*"
                                         r"adapted at mlp.fc1, mlp.fc2 \(4 layers\), this one at attn.qkv, mlp.fc1, "
                                         r"mlp.fc2 \(6 layers\)"):
        timm.create_model("vit_tiny_patch16_224_nola", pretrained=True, nola_targets=["attn.qkv", "mlp.fc1", "mlp.fc2"],
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "full.pth")), **ZOO_KW)
    with pytest.raises(ValueError, match=r"trained head head.weight of shape \(3, 64\), this model's is \(5, 64\)"):
        timm.create_model("vit_tiny_patch16_224_nola", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "full.pth")), **{**ZOO_KW, "num_classes": 5})


def test_a_base_models_pretrained_file_loads_with_fresh_adapters(tmp_path):
    base = timm.create_model("vit_tiny_patch16_224", pretrained=False, **ZOO_KW)
    torch.save(base.state_dict(), tmp_path / "base.pth")
    model = timm.create_model("vit_tiny_patch16_224_nola", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "base.pth")), **ZOO_KW)
    torch.testing.assert_close(model.blocks[0].mlp.fc1.weight, base.blocks[0].mlp.fc1.weight, rtol=0, atol=0)
    fresh = timm.create_model("vit_tiny_patch16_224_nola", pretrained=False, **ZOO_KW)
    for (name, value), (_, initial) in zip(model.named_parameters(), fresh.named_parameters()):
        if "nola_" in name:  # the adapters keep their init
            torch.testing.assert_close(value, initial, rtol=0, atol=0)


def test_an_unknown_tag_lists_every_tag_and_the_close_ones_and_pretrained_must_be_a_bool():
    # ViT-B/16 has 10 tags and 8 were listed, without a word of the others (sam_in1k among them)
    with pytest.raises(ValueError, match=r"tag 'sam' for timm model 'vit_base_patch16_224'. Close matches: "
                                         r"vit_base_patch16_224.sam_in1k. Available: .*, "
                                         r"vit_base_patch16_224.sam_in1k\. "):
        nv.create_model("vit_base_patch16_224.sam")
    with pytest.raises(ValueError, match=r"pretrained must be true or false, got 'no'"):  # "no" downloaded the weights
        timm.create_model("vit_tiny_patch16_224_nola", pretrained="no")


def test_a_nola_name_without_a_registered_variant_says_how_to_adapt_its_base():
    # only the close matches were listed, without a word that any timm model adapts through adapter="nola"
    with pytest.raises(ValueError, match=r"unknown timm model 'deit_small_patch16_224_nola': only "
                                         r"vit_tiny_patch16_224_nola, .* are registered with NOLA built in\. Adapt "
                                         r"deit_small_patch16_224 with nv\.create_model\('deit_small_patch16_224', "
                                         r"adapter='nola'\)"):
        nv.create_model("deit_small_patch16_224_nola")
    with pytest.raises(ValueError, match=r"unknown timm model 'bogus_nola'\. See timm"):  # no such base either
        nv.create_model("bogus_nola")


def test_a_checkpoint_path_cut_short_is_named_whatever_torch_raises(tmp_path):
    # cut at some lengths, torch.load raised a bare OSError (EINVAL) that named no file
    kwargs = dict(depth=2, embed_dim=64, num_heads=2, img_size=32, num_classes=3)
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).state_dict(), tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    for length in (100, 5000, len(data) // 2):
        (tmp_path / "cut.pth").write_bytes(data[:length])
        with pytest.raises(ValueError, match=r"checkpoint_path .*cut.pth does not load into vit_tiny_patch16_224"):
            nv.create_model("vit_tiny_patch16_224", checkpoint_path=str(tmp_path / "cut.pth"), **kwargs)
