"""Image transforms: the NOLA paper's augmentation, timm's, or none; normalisation by the backbone's config.

``augment="paper"`` reproduces the paper (MoCo-v2 style): RandomResizedCrop(scale 0.2-1),
ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8, RandomGrayscale p=0.2, Gaussian blur sigma~U[0.1, 2] with
p=0.5, horizontal flip; eval Resize(256) -> CenterCrop(224) (scaled by image size / 224).
``augment="timm"`` is ``timm.data.create_transform`` with the backbone's data config, ``augment="none"``
uses the eval transform for training too. With "timm" and "none" the eval transform is timm's for the backbone:
its crop_pct, interpolation and crop_mode ('center' resizes the short side and crops, 'squash' resizes both sides
ignoring the aspect ratio, 'border' fits the long side and pads with the mean colour).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence, get_args

import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

from ..core.checks import check_choice, check_int, check_number

__all__ = ["AUGMENTS", "CROP_MODES", "IMAGENET_MEAN", "IMAGENET_STD", "NORMALIZATIONS", "DataConfig",
           "RandomGaussianBlur", "build_transforms", "eval_transform", "evaluation_settings", "paper_train_transform",
           "resolve_data_config"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Augment = Literal["paper", "timm", "none"]
Normalize = Literal["model", "imagenet"]
CropMode = Literal["center", "squash", "border"]
AUGMENTS: tuple = get_args(Augment)
NORMALIZATIONS: tuple = get_args(Normalize)
CROP_MODES: tuple = get_args(CropMode)


_INTERPOLATION = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
                  "nearest": T.InterpolationMode.NEAREST}


@dataclass(frozen=True)
class DataConfig:
    """Preprocessing a backbone expects (timm's pretrained cfg), with a square input size."""

    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    crop_mode: CropMode = "center"  # timm's eval geometry; last, so positional construction keeps its meaning

    def __post_init__(self) -> None:
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {CROP_MODES} (timm's eval geometries), got {self.crop_mode!r}")
        check_int(self.input_size, "DataConfig.input_size", at_least=1)
        for name in ("mean", "std"):
            values = getattr(self, name)
            if not isinstance(values, (tuple, list)) or len(values) != 3:
                raise ValueError(f"DataConfig.{name} is one number per RGB channel (3), got {values!r}")
            for value in values:
                check_number(value, f"DataConfig.{name}", above=0.0 if name == "std" else None)
        check_number(self.crop_pct, "DataConfig.crop_pct", above=0.0)
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(f"DataConfig.interpolation must be one of {sorted(_INTERPOLATION)}, got "
                             f"{self.interpolation!r}")


def resolve_data_config(backbone: Optional[str] = None, image_size: Optional[int] = None) -> DataConfig:
    """The backbone's mean/std/input size/crop_pct/interpolation/crop_mode from timm; ``image_size`` overrides the size.

    Read from the model's pretrained cfg without building it; a model registered without one (or with
    an unknown tag) is built on the meta device, which allocates no weights. A non-square pretrained input size
    needs ``image_size``: nola_vision preprocesses square images and will not pick a side silently.
    """
    image_size = check_int(image_size, "image_size", at_least=1, optional=True)
    if backbone is not None and (not isinstance(backbone, str) or not backbone):
        raise TypeError(f"resolve_data_config: backbone is a timm model name (str) or None, got {backbone!r}")
    if backbone is None:
        return DataConfig(input_size=image_size or 224)
    import timm
    from timm.data import resolve_data_config as timm_resolve
    from timm.data import resolve_model_data_config

    try:
        pretrained_cfg = timm.models.get_pretrained_cfg(backbone)
    except RuntimeError as err:  # timm: "Invalid pretrained tag (...) for ..."
        architecture = backbone.split(".", 1)[0]
        tags = [name.split(".", 1)[1] for name in timm.list_pretrained(f"{architecture}.*")]
        raise ValueError(f"unknown timm backbone tag '{backbone}' ({err}); {architecture} has the tags "
                         f"{', '.join(tags[:10]) or 'none'}{' ...' if len(tags) > 10 else ''}") from err
    if pretrained_cfg is not None:
        cfg = timm_resolve(pretrained_cfg=pretrained_cfg.to_dict())
    else:
        try:
            with torch.device("meta"):
                model = timm.create_model(backbone, pretrained=False)
        except RuntimeError as err:  # timm: "Unknown model (...)"
            raise ValueError(f"unknown timm backbone '{backbone}' ({err}); see timm.list_models()") from err
        cfg = resolve_model_data_config(model)
    return DataConfig(input_size=int(image_size or _square_side(backbone, cfg["input_size"])), mean=tuple(cfg["mean"]),
                      std=tuple(cfg["std"]), crop_pct=float(cfg.get("crop_pct") or 0.875),
                      interpolation=str(cfg.get("interpolation") or "bicubic"),
                      crop_mode=cfg.get("crop_mode") or "center")


def _square_side(backbone: str, input_size: tuple) -> int:
    """The side of a square pretrained ``input_size`` (C, H, W); a non-square one is refused, not squared."""
    height, width = int(input_size[-2]), int(input_size[-1])
    if height != width:
        raise ValueError(f"backbone {backbone!r} was pretrained on non-square images, (h, w) = ({height}, {width}), "
                         "but nola_vision preprocesses square images: pass image_size (the CLI's --model.image_size, "
                         "which it links to the data) to choose the square side the backbone is built and fed at")
    return width


class RandomGaussianBlur:
    """PIL Gaussian blur with radius sigma ~ U[sigma_min, sigma_max], as in MoCo v2 and the NOLA paper."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        if not isinstance(sigma, (tuple, list)) or len(sigma) != 2:
            raise ValueError(f"RandomGaussianBlur: sigma is a (min, max) pair of blur radii, got {sigma!r}")
        low = check_number(sigma[0], "RandomGaussianBlur: sigma's min", at_least=0.0)
        high = check_number(sigma[1], "RandomGaussianBlur: sigma's max", at_least=low)
        self.sigma = (low, high)

    def __call__(self, img: Image.Image) -> Image.Image:
        sigma = torch.empty(1).uniform_(self.sigma[0], self.sigma[1]).item()  # torch RNG, seeded per worker
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


def paper_train_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> T.Compose:
    """The NOLA paper's training augmentation."""
    mean, std = _check_image_settings("paper_train_transform", size, mean, std)
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([RandomGaussianBlur((0.1, 2.0))], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def eval_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...], crop_pct: float = 0.875,
                   interpolation: str = "bilinear", crop_mode: CropMode = "center") -> T.Compose:
    """timm's eval geometry at ``scale = floor(size / crop_pct)``, then ``size`` x ``size`` (0.875: 256 -> 224).

    'center' resizes the short side to ``scale`` and center-crops; 'squash' resizes to ``scale`` x ``scale`` and
    center-crops; 'border' fits the long side to ``scale`` and center-crops or pads with the mean colour. Its
    ``interpolation`` default is the paper's evaluation (bilinear); a backbone's own is in its ``DataConfig``.
    """
    check_choice(interpolation, "eval_transform: interpolation", sorted(_INTERPOLATION))
    mean, std = _check_image_settings("eval_transform", size, mean, std)
    check_number(crop_pct, "eval_transform: crop_pct", above=0.0)
    return T.Compose([*_geometry(size, mean, crop_pct, interpolation, crop_mode), T.ToTensor(), T.Normalize(mean, std)])


def _check_image_settings(where: str, size: int, mean: Sequence[float], std: Sequence[float]
                          ) -> tuple[list[float], list[float]]:
    """``mean`` and ``std`` as lists of floats (a numpy array or tensor too, as torchvision takes them); a size or
    normalisation a transform would fail on only when called (PIL's "height and width must be > 0", torchvision's
    "std evaluated to zero") refused, naming the argument."""
    check_int(size, f"{where}: size", at_least=1)
    checked = []
    for name, values in (("mean", mean), ("std", std)):
        values = values.tolist() if hasattr(values, "tolist") else values
        if not isinstance(values, (tuple, list)) or not values:
            raise ValueError(f"{where}: {name} is one number per image channel, got {values!r}")
        checked.append([check_number(value, f"{where}: {name}", above=0.0 if name == "std" else None)
                        for value in values])
    return checked[0], checked[1]


def _geometry(size: int, mean: tuple[float, ...], crop_pct: float, interpolation: str, crop_mode: str) -> list:
    """The resize and crop steps of ``timm.data.transforms_imagenet_eval`` for a square ``size``."""
    scale = int(size / crop_pct)
    mode = _INTERPOLATION[interpolation]
    if crop_mode == "center":
        return [_ResizeShortSide(scale, interpolation=mode), T.CenterCrop(size)]
    if crop_mode == "squash":
        return [T.Resize((scale, scale), interpolation=mode), T.CenterCrop(size)]
    if crop_mode == "border":
        from timm.data.transforms import CenterCropOrPad

        return [_FitLongSide(scale, interpolation), CenterCropOrPad(size, fill=[round(255 * v) for v in mean])]
    raise ValueError(f"crop_mode must be one of {CROP_MODES} (timm's eval geometries), got {crop_mode!r}")


class _ResizeShortSide(T.Resize):
    """``T.Resize(size)`` of an int: the short side to ``size``, keeping the aspect ratio. An image longer than
    ``MOST_ASPECT`` times its short side is first cut to its middle part of that aspect, which holds the centre crop:
    resized whole, a strip of 30000×3 px (a file of a few hundred bytes) became 2,560,000×256 px, 3 GB, at every
    evaluation pass and in every loader worker. Images within that aspect are resized exactly as before."""

    MOST_ASPECT = 16

    def forward(self, image: Image.Image) -> Image.Image:
        width, height = image.size if isinstance(image, Image.Image) else (1, 1)  # a tensor: resized as it is
        short, long = min(width, height), max(width, height)
        if long > self.MOST_ASPECT * short:
            keep = self.MOST_ASPECT * short + (long - self.MOST_ASPECT * short) % 2  # symmetric: the same centre
            start = (long - keep) // 2
            image = image.crop((start, 0, start + keep, height) if width > height else (0, start, width, start + keep))
        return super().forward(image)


class _FitLongSide:
    """Resize so that the long side is ``scale``, keeping the aspect ratio (timm's ``ResizeKeepRatio`` with
    ``longest=1``), with at least one pixel on the short side: timm rounds it to 0 past an aspect of about 2·scale:1
    (an image of 2000×3 px), which PIL refuses."""

    def __init__(self, scale: int, interpolation: str = "bilinear") -> None:
        check_choice(interpolation, "_FitLongSide: interpolation", sorted(_INTERPOLATION))
        self.scale, self.interpolation = check_int(scale, "_FitLongSide: scale", at_least=1), interpolation

    def __call__(self, image: Image.Image) -> Image.Image:
        from timm.data.transforms import ResizeKeepRatio

        size = ResizeKeepRatio.get_params(image, (self.scale, self.scale), longest=1.0)
        return T.functional.resize(image, [max(1, side) for side in size],
                                   interpolation=_INTERPOLATION[self.interpolation])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale}, interpolation={self.interpolation})"


def evaluation_settings(augment: Augment = "paper", normalize: Normalize = "model",
                        config: Optional[DataConfig] = None) -> dict:
    """What the evaluation transform does, as plain values (size, mean, std, crop fraction, interpolation, and a
    crop_mode other than 'center'): a checkpoint records them, so that testing it preprocesses as its run did."""
    config = config or DataConfig()
    check_choice(augment, "augment", AUGMENTS)  # any other value was taken for timm's geometry
    check_choice(normalize, "normalize", NORMALIZATIONS)
    mean, std = (config.mean, config.std) if normalize == "model" else (IMAGENET_MEAN, IMAGENET_STD)
    # the paper's eval is exactly Resize(256) -> CenterCrop(224), torchvision's default bilinear
    crop, interpolation = (224 / 256, "bilinear") if augment == "paper" else (config.crop_pct, config.interpolation)
    settings = {"size": config.input_size, "mean": list(mean), "std": list(std), "crop_pct": crop,
                "interpolation": interpolation}
    if augment != "paper" and config.crop_mode != "center":
        # only a non-default mode adds the key, so records of 'center' runs stay as they were written
        settings["crop_mode"] = config.crop_mode
    return settings


def build_transforms(augment: Augment = "paper", normalize: Normalize = "model",
                     config: Optional[DataConfig] = None) -> tuple[Callable, Callable]:
    """``(train_transform, eval_transform)`` for PIL RGB images, producing normalised float32 CHW tensors."""
    config = DataConfig() if config is None else config
    if not isinstance(config, DataConfig):
        raise TypeError(f"build_transforms: config is a DataConfig (resolve_data_config(backbone)), got a "
                        f"{type(config).__name__}")
    evaluation = evaluation_settings(augment, normalize, config)
    size, mean, std = config.input_size, evaluation["mean"], evaluation["std"]
    model_eval = eval_transform(size, mean, std, evaluation["crop_pct"], evaluation["interpolation"],
                                evaluation.get("crop_mode", "center"))
    if augment == "paper":
        return paper_train_transform(size, mean, std), model_eval
    if augment == "none":
        return model_eval, model_eval
    if augment == "timm":
        from timm.data import create_transform

        train = create_transform(input_size=(3, size, size), is_training=True, mean=mean, std=std,
                                 interpolation=config.interpolation, crop_pct=config.crop_pct)
        return train, model_eval
    raise ValueError(f"augment must be 'paper', 'timm' or 'none', got {augment!r}")
