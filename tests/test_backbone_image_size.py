"""An image size the backbone's patch size does not divide is refused where the backbone is built: the patch embedding
reads whole patches, so the last rows and columns of every image silently never reached the model."""
import sys
from pathlib import Path

import pytest
import torch

from nola_vision.cli import main
from nola_vision.models.backbones import build_backbone

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_offline.yaml"
SMALL = dict(patch_size=8, depth=1, embed_dim=32, num_heads=2)


def test_a_size_the_patch_does_not_divide_is_refused_naming_the_sizes_to_use():
    with pytest.raises(ValueError, match=r"image_size 30 is not a multiple of vit_tiny_patch16_224's patch size 8: .*"
                                         r"the last 6 rows and columns .* Use image_size 24 or 32"):
        build_backbone("vit_tiny_patch16_224", 3, pretrained=False, image_size=30, **SMALL)
    with pytest.raises(ValueError, match=r"Use image_size 8$"):
        build_backbone("vit_tiny_patch16_224", 3, pretrained=False, image_size=5, **SMALL)


def test_the_border_really_was_ignored_and_sizes_that_fit_or_pad_are_built():
    import timm

    ignoring = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=30, **SMALL).eval()
    images = torch.randn(1, 3, 30, 30)
    changed = images.clone()
    changed[..., 24:, :] = 100.0
    changed[..., :, 24:] = -100.0
    with torch.no_grad():  # what the refusal prevents: 36% of the pixels change nothing
        torch.testing.assert_close(ignoring(images), ignoring(changed))
    build_backbone("vit_tiny_patch16_224", 3, pretrained=False, image_size=32, **SMALL)
    padded = build_backbone("vit_tiny_patch16_224", 3, pretrained=False, image_size=30, dynamic_img_pad=True,
                            dynamic_img_size=True, **SMALL)
    with torch.no_grad():
        assert not torch.allclose(padded(images), padded(changed))


def test_the_cli_refuses_it_before_anything_is_written(tmp_path, capsys):
    code = main(["fit", "-c", str(TINY), "--trainer.default_root_dir", str(tmp_path / "run"), "--model.image_size",
                 "30", "--trainer.enable_progress_bar", "false"])
    err = capsys.readouterr().err
    assert code == 2 and "image_size 30 is not a multiple" in err and "Use image_size 24 or 32" in err
    assert not (tmp_path / "run").exists() and sys.exc_info() == (None, None, None)


def test_a_model_pretrained_at_a_size_its_patch_does_not_divide_is_built_at_that_size():
    # SigLIP so400m/14 was pretrained at 384 px (27 patches, the last 6 px dropped, as big_vision does): its own size
    # is accepted; another size that drops a border is not.
    with torch.device("meta"):
        build_backbone("vit_so400m_patch14_siglip_384", 5, pretrained=False)
        with pytest.raises(ValueError, match="Use image_size 378 or 392"):
            build_backbone("vit_so400m_patch14_siglip_384", 5, pretrained=False, image_size=380)


def test_an_image_size_for_a_backbone_built_without_one_is_refused_naming_the_fix():
    # timm's "ResNet.__init__() got an unexpected keyword argument 'img_size'" named neither option nor fix
    with pytest.raises(ValueError, match=r"timm builds resnet18 without an image size .* image_size=32 cannot be "
                                         r"applied: leave image_size unset"):
        build_backbone("resnet18", 3, pretrained=False, image_size=32)
    assert build_backbone("resnet18", 3, pretrained=False).num_classes == 3
