"""The eval geometry follows the backbone's timm crop_mode ('center', 'squash', 'border') exactly as timm's own eval
transform does; a non-square pretrained size needs ``image_size``; records of 'center' runs are unchanged."""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
from fixtures_data import write_imagefolder
from PIL import Image
from test_module import NOLA, TINY, trainer
from timm.data import create_transform
from timm.data import resolve_data_config as timm_resolve_data_config

from nola_vision.data import DataConfig, FewShotDataModule, build_transforms, resolve_data_config
from nola_vision.data.transforms import evaluation_settings
from nola_vision.train.module import FewShotClassifier

SQUASH_TAG = "vit_base_patch16_clip_384.openai_ft_in1k"
NON_SQUARE_TAG = "vit_base_patch16_sapiens2.fb"  # pretrained at (1024, 768)


def _images() -> list[Image.Image]:
    """Non-square RGB images, wide and tall, with content everywhere so that a wrong crop or pad shows."""
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
            for h, w in ((61, 97), (120, 50), (40, 41))]


def _timm_eval(config: DataConfig):
    """timm's own eval transform for ``config``."""
    return create_transform(input_size=(3, config.input_size, config.input_size), is_training=False,
                            mean=config.mean, std=config.std, crop_pct=config.crop_pct,
                            interpolation=config.interpolation, crop_mode=config.crop_mode)


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
@pytest.mark.parametrize("crop_pct, interpolation", [(0.875, "bicubic"), (1.0, "bilinear"), (0.95, "bicubic")])
@pytest.mark.parametrize("augment", ["none", "timm"])
def test_eval_transform_equals_timms_for_each_crop_mode(crop_mode, crop_pct, interpolation, augment):
    config = DataConfig(48, (0.48, 0.45, 0.41), (0.27, 0.26, 0.28), crop_pct, interpolation, crop_mode)
    _, ours = build_transforms(augment, "model", config)
    theirs = _timm_eval(config)
    for img in _images():
        assert torch.equal(ours(img), theirs(img)), (crop_mode, img.size)


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
@pytest.mark.parametrize("height, width", [(3, 2000), (2000, 3), (1, 1), (1, 500)])
def test_images_of_extreme_aspect_come_out_at_the_model_size_in_each_crop_mode(crop_mode, height, width):
    """'border' (timm's ResizeKeepRatio) rounded the short side of a 2000x3 image to 0 px, and PIL refused it
    ("height and width must be > 0", an error naming no file, after training had finished)."""
    _, ours = build_transforms("none", "model", DataConfig(48, crop_pct=0.875, crop_mode=crop_mode))
    image = Image.fromarray(torch.randint(0, 256, (height, width, 3), dtype=torch.uint8).numpy())
    assert ours(image).shape == (3, 48, 48)


def test_a_squash_backbone_is_preprocessed_as_timm_preprocesses_it():
    timm_cfg = timm_resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(SQUASH_TAG).to_dict())
    train, ours = build_transforms("none", "model", resolve_data_config(SQUASH_TAG))
    theirs = create_transform(**timm_cfg)
    for img in _images():
        expected = theirs(img)
        assert torch.equal(ours(img), expected) and torch.equal(train(img), expected), img.size
    assert resolve_data_config(SQUASH_TAG).crop_mode == "squash"


def test_image_size_keeps_the_backbones_crop_mode():
    assert resolve_data_config(SQUASH_TAG, image_size=64).crop_mode == "squash"
    assert resolve_data_config("vit_base_patch16_224.augreg2_in21k_ft_in1k", 64).crop_mode == "center"
    assert resolve_data_config(None, 64).crop_mode == "center"


def test_timm_training_augmentation_is_timms_whatever_the_crop_mode():
    config = DataConfig(48, crop_mode="squash")
    train, _ = build_transforms("timm", "model", config)
    expected = create_transform(input_size=(3, 48, 48), is_training=True, mean=config.mean, std=config.std,
                                interpolation=config.interpolation, crop_pct=config.crop_pct)
    assert repr(train) == repr(expected)


def test_the_papers_eval_stays_resize_then_center_crop_for_any_backbone():
    config = DataConfig(224, crop_pct=1.0, crop_mode="squash")
    _, ev = build_transforms("paper", "model", config)
    resize, crop = list(ev.transforms)[:2]
    assert resize.size == 256 and crop.size == (224, 224)
    assert "crop_mode" not in evaluation_settings("paper", "model", config)


def test_a_center_record_is_exactly_as_before_and_only_other_modes_add_the_field():
    center = DataConfig(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 0.9, "bicubic")
    assert evaluation_settings("none", "model", center) == {
        "size": 224, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": 0.9, "interpolation": "bicubic"}
    assert DataConfig(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 0.9, "bicubic", "center") == center
    squash = evaluation_settings("timm", "model", dataclasses.replace(center, crop_mode="squash"))
    assert squash == {**evaluation_settings("timm", "model", center), "crop_mode": "squash"}


def test_a_non_square_pretrained_size_needs_image_size():
    with pytest.raises(ValueError, match=r"\(1024, 768\).*square images: pass image_size"):
        resolve_data_config(NON_SQUARE_TAG)
    assert resolve_data_config(NON_SQUARE_TAG, image_size=64).input_size == 64


def test_an_unknown_crop_mode_is_refused():
    with pytest.raises(ValueError, match="crop_mode must be one of"):
        DataConfig(crop_mode="letterbox")


def test_data_for_a_squash_backbone_is_refused_by_a_center_model(tmp_path):
    root = tmp_path / "pets"
    write_imagefolder(root, train_per_class=4, eval_per_class=1, eval_folder="test")
    datamodule = FewShotDataModule("imagefolder", root=str(root), shots=2, batch_size=2, image_size=32,
                                   backbone=TINY["backbone"])
    datamodule.data_config = dataclasses.replace(datamodule.data_config, crop_mode="squash")  # only this differs
    model = FewShotClassifier(num_classes=3, adapter=NOLA, warmup_epochs=0, **TINY)
    run = trainer(tmp_path)
    with pytest.raises(ValueError, match=r"crop_mode squash \(the model's: center\)"):
        run.fit(model, datamodule=datamodule)
    assert run.global_step == 0


def test_an_unknown_pretrained_tag_is_a_value_error_listing_the_architectures_tags():
    """Was timm's bare RuntimeError from the data config's lookup."""
    from nola_vision.data.transforms import resolve_data_config

    with pytest.raises(ValueError, match=r"unknown timm backbone tag 'vit_tiny_patch16_224.bogus'.*augreg_in21k"):
        resolve_data_config("vit_tiny_patch16_224.bogus")
