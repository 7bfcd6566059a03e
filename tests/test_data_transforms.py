"""Transforms: the paper's augmentation exactly, timm's, none; normalisation from the backbone's config."""

from __future__ import annotations

import math
import re

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from nola_vision.data import DataConfig, build_transforms, resolve_data_config
from nola_vision.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RandomGaussianBlur,
    eval_transform,
    paper_train_transform,
)

MEAN = (0.5, 0.5, 0.5)


def _steps(compose):
    return list(compose.transforms)


def test_paper_train_augmentation_is_the_papers_recipe():
    train, _ = build_transforms("paper", "imagenet", DataConfig(input_size=224))
    rrc, jitter, gray, blur, flip, to_tensor, norm = _steps(train)
    assert isinstance(rrc, T.RandomResizedCrop) and rrc.size == (224, 224) and rrc.scale == (0.2, 1.0)
    assert isinstance(jitter, T.RandomApply) and jitter.p == 0.8
    cj = jitter.transforms[0]
    assert (cj.brightness, cj.contrast, cj.saturation, cj.hue) == ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1))
    assert isinstance(gray, T.RandomGrayscale) and gray.p == 0.2
    assert isinstance(blur, T.RandomApply) and blur.p == 0.5 and blur.transforms[0].sigma == (0.1, 2.0)
    assert isinstance(flip, T.RandomHorizontalFlip) and flip.p == 0.5
    assert isinstance(to_tensor, T.ToTensor)
    assert tuple(norm.mean) == IMAGENET_MEAN and tuple(norm.std) == IMAGENET_STD


def test_paper_eval_is_resize_256_then_center_crop_224():
    _, ev = build_transforms("paper", "imagenet", DataConfig(input_size=224, crop_pct=0.9))
    resize, crop = _steps(ev)[:2]
    assert resize.size == 256 and resize.interpolation == T.InterpolationMode.BILINEAR
    assert crop.size == (224, 224)


def test_model_eval_uses_the_backbone_crop_pct_and_interpolation():
    cfg = resolve_data_config("vit_base_patch16_224")
    _, ev = build_transforms("none", "model", cfg)
    resize, crop = _steps(ev)[:2]
    assert resize.size == int(224 / 0.9) and resize.interpolation == T.InterpolationMode.BICUBIC
    out = ev(Image.new("RGB", (300, 200), (10, 20, 30)))
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32


def test_backbone_config_comes_from_its_pretrained_cfg():
    vit = resolve_data_config("vit_base_patch16_224.augreg2_in21k_ft_in1k")
    assert vit == DataConfig(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 0.9, "bicubic")
    mae = resolve_data_config("vit_base_patch16_224.mae")
    assert mae.mean == IMAGENET_MEAN and mae.std == IMAGENET_STD


def test_image_size_overrides_the_backbone_input_size():
    cfg = resolve_data_config("vit_small_patch14_dinov2", image_size=224)
    assert cfg.input_size == 224 and cfg.mean == IMAGENET_MEAN and cfg.crop_pct == 1.0
    assert resolve_data_config(None, 96) == DataConfig(input_size=96)


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown timm backbone 'no_such_vit'"):
        resolve_data_config("no_such_vit")


@pytest.mark.parametrize("normalize, mean, std", [("model", (0.5,) * 3, (0.5,) * 3),
                                                  ("imagenet", IMAGENET_MEAN, IMAGENET_STD)])
def test_normalisation_uses_model_or_imagenet_statistics(normalize, mean, std):
    cfg = resolve_data_config("vit_base_patch16_224", image_size=32)
    _, ev = build_transforms("none", normalize, cfg)
    rgb = (51, 102, 204)
    out = ev(Image.new("RGB", (40, 40), rgb))
    expected = torch.tensor([(v / 255 - m) / s for v, m, s in zip(rgb, mean, std)])
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-5)


def test_timm_augment_uses_timm_create_transform_with_the_model_config():
    cfg = resolve_data_config("vit_base_patch16_224", image_size=64)
    train, _ = build_transforms("timm", "model", cfg)
    names = [type(t).__name__ for t in _steps(train)]
    assert names[0] == "RandomResizedCropAndInterpolation" and "RandomHorizontalFlip" in names
    assert tuple(_steps(train)[-1].mean.tolist()) == (0.5, 0.5, 0.5)
    assert train(Image.new("RGB", (80, 70), (1, 2, 3))).shape == (3, 64, 64)


def test_grayscale_sources_become_three_channels():
    train, ev = build_transforms("paper", "model", DataConfig(input_size=32))
    for tf in (train, ev):
        assert tf(Image.new("L", (8, 8), 77).convert("RGB")).shape == (3, 32, 32)


def test_gaussian_blur_draws_sigma_from_torch_rng_in_range():
    blur = RandomGaussianBlur((0.1, 2.0))
    img = Image.new("RGB", (16, 16), (0, 0, 0))
    img.paste((255, 255, 255), (8, 0, 16, 16))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        a = blur(img)
        torch.manual_seed(0)
        b = blur(img)
    assert a.tobytes() == b.tobytes() and a.tobytes() != img.tobytes()


def test_unknown_augment_or_normalize_is_rejected():
    with pytest.raises(ValueError, match="augment must be"):
        build_transforms("randaugment")
    with pytest.raises(ValueError, match="normalize must be"):
        build_transforms("paper", "cifar")


@pytest.mark.parametrize("arguments, message", [
    (dict(mean=(0.5, 0.5)), r"DataConfig.mean is one number per RGB channel \(3\)"),  # torch's broadcast error later
    (dict(std=(0.0, 0.0, 0.0)), r"DataConfig.std must be a finite number > 0.0"),
    (dict(crop_pct=float("nan")), r"DataConfig.crop_pct must be a finite number > 0.0"),
    (dict(input_size=0), r"DataConfig.input_size must be a positive integer"),
    (dict(input_size="224"), r"DataConfig.input_size must be a positive integer"),
    (dict(interpolation="bicubc"), r"DataConfig.interpolation must be one of \['bicubic', 'bilinear', 'nearest'\]"),
])
def test_a_data_config_that_no_transform_can_apply_is_refused_where_it_is_made(arguments, message):
    """These were accepted and failed at the first image inside torchvision, or (a misspelt interpolation) silently
    resized bilinearly."""
    with pytest.raises(ValueError, match=message):
        DataConfig(**arguments)


def test_transform_helpers_name_an_argument_of_the_wrong_kind():
    with pytest.raises(TypeError, match="build_transforms: config is a DataConfig"):
        build_transforms("paper", "model", 5)
    with pytest.raises(TypeError, match="resolve_data_config: backbone is a timm model name"):
        resolve_data_config(5)
    with pytest.raises(ValueError, match="image_size must be a positive integer or null, got -5"):
        resolve_data_config(image_size=-5)


def test_an_unknown_interpolation_or_augment_is_refused_not_taken_for_another():
    """eval_transform took an unknown interpolation for bilinear, evaluation_settings any augment for timm's."""
    from nola_vision.data.transforms import eval_transform, evaluation_settings

    with pytest.raises(ValueError, match=r"interpolation must be one of \['bicubic', 'bilinear', 'nearest'\], got "
                                         r"'bicubc'"):
        eval_transform(32, IMAGENET_MEAN, IMAGENET_STD, interpolation="bicubc")
    with pytest.raises(ValueError, match=r"augment must be one of \['paper', 'timm', 'none'\], got 'papr'"):
        evaluation_settings("papr")
    assert evaluation_settings("paper")["interpolation"] == "bilinear"


@pytest.mark.parametrize("build, message", [
    (lambda: eval_transform(0, MEAN, MEAN), "eval_transform: size must be a positive integer, got 0"),
    (lambda: eval_transform("32", MEAN, MEAN), "eval_transform: size must be a positive integer, got '32'"),
    (lambda: eval_transform(32, MEAN, (0.0, 0.5, 0.5)), "eval_transform: std must be a finite number > 0.0"),
    (lambda: eval_transform(32, MEAN, MEAN, crop_pct=0.0), "eval_transform: crop_pct must be a finite number > 0"),
    (lambda: paper_train_transform(0, MEAN, MEAN), "paper_train_transform: size must be a positive integer"),
    (lambda: RandomGaussianBlur((2.0, 0.1)), "sigma's max must be a finite number >= 2.0, got 0.1"),
    (lambda: RandomGaussianBlur((math.nan, 1.0)), "sigma's min must be a finite number >= 0.0, got nan"),
    (lambda: RandomGaussianBlur((-1.0, 2.0)), "sigma's min must be a finite number >= 0.0, got -1.0"),
    (lambda: RandomGaussianBlur("ab"), "sigma is a (min, max) pair of blur radii, got 'ab'"),
])
def test_settings_a_transform_would_fail_on_when_called_are_refused_when_it_is_built(build, message):
    # they were built, then failed at the first image (PIL's "height and width must be > 0", torchvision's "std
    # evaluated to zero", a ZeroDivisionError, torch's uniform_ error), or blurred with a negative radius
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


def test_mean_and_std_may_be_tensors_or_arrays_as_torchvision_takes_them():
    # the check took them, but the border crop's fill then failed on round() of a tensor element
    import numpy as np

    image = Image.new("RGB", (20, 10))
    for mean, std in ((torch.tensor(MEAN), torch.tensor(MEAN)), (np.array(MEAN), np.array(MEAN))):
        assert eval_transform(16, mean, std, crop_mode="border")(image).shape == (3, 16, 16)
        assert paper_train_transform(16, mean, std)(image).shape == (3, 16, 16)


def test_center_eval_of_a_long_strip_resizes_only_the_middle_part_its_crop_can_reach(monkeypatch):
    # a 30000x3 px strip (a few hundred bytes) was resized whole to 2,560,000x256 px: 3 GB at every evaluation pass
    ev = eval_transform(224, MEAN, MEAN, crop_pct=0.875)
    whole = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(MEAN, MEAN)])
    generator = torch.Generator().manual_seed(0)
    for size in [(300, 200), (480, 30), (30, 480), (2000, 3), (3, 2001), (1001, 7)]:
        pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
        image = Image.fromarray(pixels.numpy())
        difference = (ev(image) - whole(image)).abs().max().item()
        if max(size) <= 16 * min(size):
            assert difference == 0.0, size  # within the aspect limit: exactly torchvision's Resize
        else:  # the same centre; at most a few grey levels apart where the resized pixel grids differ
            assert difference <= 5 / 255 / 0.5, (size, difference)
    resized = []
    resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, size, *a, **k: resized.append(size) or
                        resize(self, size, *a, **k))
    assert ev(Image.new("RGB", (30000, 3), (200, 10, 10))).shape == (3, 224, 224)
    assert max(w * h for w, h in resized) <= 16 * 256 * 256 + 256  # the strip's middle, 16:1, not 2,560,000x256
