"""Settings that change every output without changing a weight name or value, found by a fault hunt: the class of
each block (post-norm against pre-norm), EVA's rotary reference grid, and a checkpoint's quantisation-aware bits."""
import copy

import pytest
import timm
import torch
from tiny_models import as_if_trained, tiny_vit

import nola_vision as nv
from nola_vision.adapters.files import AdapterLoadError

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
EVERY_LINEAR = nv.LoRAConfig(rank=2, targets=["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"])


def with_weights_of(model, source):
    model.load_state_dict(source.state_dict())  # every name and shape is the same
    return model.eval()


def test_an_adapter_is_refused_on_blocks_of_another_class_with_the_same_weights(tmp_path):
    from timm.models.vision_transformer import ResPostBlock

    post_norm = tiny_vit(block_fn=ResPostBlock)
    trained = as_if_trained(nv.inject(copy.deepcopy(post_norm), EVERY_LINEAR), 0, scale=0.2)
    directory = nv.save_adapter(trained, tmp_path / "post", bits=32)
    pre_norm = with_weights_of(tiny_vit(), post_norm)
    transferred = nv.inject(copy.deepcopy(pre_norm), EVERY_LINEAR)
    transferred.load_state_dict(trained.state_dict())  # what a silent load would serve
    assert not torch.allclose(transferred(IMAGES), trained(IMAGES), atol=1e-2)
    with pytest.raises(AdapterLoadError, match=r"blocks are ResPostBlock, this model's are Block.*block_fn"):
        nv.load_adapter(pre_norm, directory)
    with pytest.raises(AdapterLoadError, match=r"blocks are ResPostBlock"):
        nv.MultiTaskModel(with_weights_of(tiny_vit(), post_norm)).add_task("post", directory)
    loaded = nv.load_adapter(with_weights_of(tiny_vit(block_fn=ResPostBlock), post_norm), directory)
    torch.testing.assert_close(loaded(IMAGES), trained(IMAGES), rtol=0, atol=0)


def eva02(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=3, img_size=28, patch_size=14,
                             embed_dim=32, depth=1, num_heads=2, **kwargs).eval()


def test_an_adapter_is_refused_on_an_eva_whose_rotary_reference_grid_differs(tmp_path):
    trained = as_if_trained(nv.inject(eva02(ref_feat_shape=(16, 16)), nv.LoRAConfig(rank=2, targets=["mlp.fc1"])), 0,
                            scale=0.2)
    directory = nv.save_adapter(trained, tmp_path / "eva", bits=32)
    with pytest.raises(AdapterLoadError, match=r"ref_feat_shape=\[16, 16\], this model has ref_feat_shape=\[2, 2\]"):
        nv.load_adapter(eva02(ref_feat_shape=(2, 2)), directory)
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    loaded = nv.load_adapter(eva02(ref_feat_shape=[16, 16]), directory)  # a list or a tuple: the same grid
    torch.testing.assert_close(loaded(images), trained(images), rtol=0, atol=0)


def test_a_checkpoint_is_refused_by_a_model_at_other_quantisation_aware_bits():
    from nola_vision.train.module import FewShotClassifier

    tiny = dict(backbone="vit_tiny_patch16_224", pretrained=False, image_size=32, num_classes=4,
                adapter=nv.NOLAConfig(rank=2, num_basis_a=16, num_basis_b=16),
                backbone_kwargs=dict(patch_size=8, depth=2, embed_dim=64, num_heads=2))
    checkpoint = {"state_dict": FewShotClassifier(**tiny, quant_bits=4).state_dict()}
    FewShotClassifier(**tiny, quant_bits=4).on_save_checkpoint(checkpoint)
    for bits, message in ((None, "is not quantisation-aware"), (8, "at 8 bits")):
        with pytest.raises(ValueError, match=rf"trained quantisation-aware at 4 bits, this model {message}.*"
                                             r"quant_bits=4 \(--model.quant_bits\)"):
            FewShotClassifier(**tiny, quant_bits=bits).on_load_checkpoint(copy.deepcopy(checkpoint))
    FewShotClassifier(**tiny, quant_bits=4).on_load_checkpoint(copy.deepcopy(checkpoint))
    del checkpoint["nola_vision"]["quant_bits"], checkpoint["nola_vision"]["record_sha256"]  # an older one's: unchecked
    FewShotClassifier(**tiny).on_load_checkpoint(checkpoint)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_seeded_random_backbone_is_the_same_under_another_default_dtype(dtype):
    # timm drew it in torch's default dtype: a float64 notebook drew another backbone from the same backbone_seed, and
    # refused every checkpoint and adapter of a default process as trained on other frozen weights
    from nola_vision.models.backbones import build_backbone

    kwargs = dict(pretrained=False, image_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)
    default = build_backbone("vit_tiny_patch16_224", 5, **kwargs)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        other = build_backbone("vit_tiny_patch16_224", 5, **kwargs)
    finally:
        torch.set_default_dtype(previous)
    assert other.blocks[0].mlp.fc1.weight.dtype == dtype  # built in the default dtype, as before
    backbone = {key: value for key, value in default.state_dict().items() if not key.startswith("head.")}
    for key, value in backbone.items():
        assert torch.equal(other.state_dict()[key], value.to(dtype)), key
