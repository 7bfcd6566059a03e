"""timm families whose code an adapter could silently miss: attentions that read ``qkv.weight`` themselves, per-head
qkv layouts, distilled models with two heads, re-entrant checkpointing, in-place ops after an adapted layer."""
import pytest
import timm
import torch
import torch.nn.functional as F
from tiny_models import as_if_trained, tiny_vit
from torch import nn

import nola_vision as nv

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
LORA_QKV = nv.LoRAConfig(rank=2, targets=["attn.qkv"])


def eva02(**kwargs):
    return timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=3, img_size=28, patch_size=14,
                             embed_dim=32, depth=1, num_heads=2, **kwargs).eval()


def test_an_adapter_that_the_attention_never_calls_is_refused_on_the_first_forward_pass():
    model = nv.inject(eva02(), LORA_QKV)  # EVA with a qkv bias: F.linear(x, self.qkv.weight, bias)
    with pytest.raises(ValueError, match="blocks.0.attn.qkv was never called although its parent EvaAttention ran"):
        model(torch.randn(1, 3, 28, 28))
    nv.unload(model)
    model = nv.inject(model, nv.LoRAConfig(rank=2, targets=["mlp.fc1", "attn.proj"]))
    as_if_trained(model, 1, scale=0.3)
    hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())  # noqa: E731
    before = hooks()
    assert model(torch.randn(1, 3, 28, 28)).shape == (1, 3)
    assert hooks() == before - 6  # the check is done: its hooks (2 per parent, 1 per layer) are gone


def test_slicing_a_per_head_qkv_layout_is_refused():
    model = timm.create_model("maxxvit_rmlp_nano_rw_256", pretrained=False, num_classes=3, img_size=64)
    with pytest.raises(ValueError, match="cannot tell that AttentionCl splits the output of .* into q, k and v blocks"):
        nv.plan_injection(model, nv.LoRAConfig(rank=2, targets=["attn.q", "attn.v"]))
    nv.plan_injection(tiny_vit(), nv.LoRAConfig(rank=2, targets=["attn.q", "attn.v"]))  # timm's Attention: q, k, v


def test_a_distilled_model_with_two_heads_is_refused():
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=3, img_size=32,
                              patch_size=8, embed_dim=64, depth=1, num_heads=2)
    for config in (nv.NOLAConfig(rank=2, num_basis_a=8, num_basis_b=8), "linear"):
        with pytest.raises(ValueError, match=r"2 classifier heads \(head, head_dist: a distilled model\)"):
            nv.inject(model, config)
    assert not nv.adapted_layers(model)
    # LeViT has no model name without distillation: the hint named only DeiT's
    levit = timm.create_model("levit_128s", pretrained=False, num_classes=3)
    with pytest.raises(ValueError, match=r"LeViT: timm.create_model\(name, distilled=False\)\), or build it without "
                                         r"heads \(num_classes=0\)"):
        nv.inject(levit, "linear")
    nv.inject(timm.create_model("levit_128s", pretrained=False, num_classes=3, distilled=False), "linear")


def test_a_distilled_model_is_refused_as_a_served_backbone_naming_its_two_heads_and_adapts_without_heads(tmp_path):
    kwargs = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2)
    distilled = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=3, **kwargs)
    with pytest.raises(ValueError, match=r"2 classifier heads \(head, head_dist: a distilled model\)") as refused:
        nv.MultiTaskModel(distilled)  # said it needed num_classes > 0
    assert "num_classes=0" not in str(refused.value)  # which MultiTaskModel refuses in turn
    headless = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=0, **kwargs).eval()
    config = nv.NOLAConfig(rank=2, num_basis_a=8, num_basis_b=8)
    as_if_trained(nv.inject(headless, config), 0, scale=0.3)  # two identities: no head stays frozen
    nv.save_adapter(headless, tmp_path / "features")
    fresh = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=0, **kwargs).eval()
    fresh.load_state_dict({k: v for k, v in headless.state_dict().items() if k in fresh.state_dict()}, strict=False)
    nv.load_adapter(fresh, tmp_path / "features")
    torch.testing.assert_close(fresh(X), headless(X), rtol=1e-4, atol=1e-4)


def test_thirds_of_a_projection_of_other_than_q_k_and_v_are_refused():
    # GCViT's global attention projects k and v only (2 x dim): with dim a multiple of 3 its "q third" was two thirds
    # of k, adapted silently
    from timm.models.gcvit import GlobalContextVit

    model = GlobalContextVit(num_classes=3, embed_dim=48, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), img_size=64)
    with pytest.raises(ValueError, match=r"stages.0.blocks.1.attn.qkv has 96 outputs, 2 x 1 heads x 48 of "
                                         r"WindowAttentionGlobal: k and v only .*Target the fused layer"):
        nv.plan_injection(model, nv.LoRAConfig(rank=2, targets=["attn.q", "attn.v"]))
    plan = nv.plan_injection(model, nv.LoRAConfig(rank=2, targets=["attn.qkv"]))
    assert all(layer.slices == ((0, model.get_submodule(name).out_features),) for name, layer in plan.layers.items())


def test_q_or_v_inside_a_fused_pair_of_some_blocks_is_refused_unless_the_pair_is_targeted_too():
    """ConViT's gated attention fuses q with k ("qk"), Twins' sub-sampled attention k with v ("kv"): 'attn.q' and
    'attn.v' (LoRA's default) matched the other blocks only, and those attentions were left without the update."""
    convit = dict(num_classes=3, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, local_up_to_layer=1)
    with pytest.raises(ValueError, match=r"target 'attn.q' names q of blocks.0.attn, where q lies inside the fused "
                                         r"layer blocks.0.attn.qk .*add 'attn.qk' to the targets"):
        nv.plan_injection(timm.create_model("convit_tiny", **convit), nv.LoRAConfig(rank=2))
    plan = nv.plan_injection(timm.create_model("convit_tiny", **convit),
                             nv.LoRAConfig(rank=2, targets=["attn.q", "attn.qk", "attn.v"]))
    assert {name: layer.slices for name, layer in plan.layers.items()} == {
        "blocks.0.attn.qk": ((0, 128),), "blocks.0.attn.v": ((0, 64),), "blocks.1.attn.qkv": ((0, 64), (128, 192))}
    twins = timm.create_model("twins_svt_small", num_classes=3, img_size=64, embed_dims=(16, 32, 32, 32),
                              depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 2))
    with pytest.raises(ValueError, match=r"target 'attn.v' names v of blocks.0.1.attn, where v lies inside the fused "
                                         r"layer blocks.0.1.attn.kv \(k and v together\)"):
        nv.plan_injection(twins, nv.LoRAConfig(rank=2))


VOLO_TINY = dict(layers=[1, 1, 1, 1], embed_dims=[32, 64, 64, 64], num_heads=[1, 2, 2, 2], img_size=64,
                 stem_hidden_dim=16, num_classes=3)


def test_a_classifier_layer_beside_the_head_is_refused_and_a_model_without_it_adapts():
    # VOLO's logits add aux_head's, which get_classifier() leaves out: it stayed frozen at its random init, was not
    # saved, and a reload with a new random aux_head gave other predictions. timm's config lists it as a classifier;
    # a VOLO built without the factory is known by a Linear child named like a head with the head's class count.
    from timm.models.volo import VOLO, _create_volo

    for model in (_create_volo("volo_d1_224", pretrained=False, **VOLO_TINY), VOLO(**VOLO_TINY)):
        for config in (nv.NOLAConfig(rank=2, num_basis_a=8, num_basis_b=8), "linear"):
            with pytest.raises(ValueError, match=r"beside the head get_classifier\(\) returns: aux_head .*"
                                                 r"use_aux_head=False"):
                nv.inject(model, config)
        assert not nv.adapted_layers(model) and not any(p.requires_grad is False for p in model.parameters())
    model = nv.inject(_create_volo("volo_d1_224", pretrained=False, use_aux_head=False, **VOLO_TINY), "linear")
    assert nv.count_parameters(model)["head"] == 64 * 3 + 3


@pytest.mark.parametrize("config", [nv.NOLAConfig(rank=2, num_basis_a=8, num_basis_b=8), nv.LoRAConfig(rank=2)],
                         ids=["nola", "lora"])
def test_reentrant_checkpointing_gives_the_adapters_the_gradients_of_no_checkpointing(config):
    import timm.layers

    def gradients(checkpointing: bool):
        model = as_if_trained(nv.inject(tiny_vit(), config), 1, scale=0.3).train()
        model.set_grad_checkpointing(checkpointing)
        F.cross_entropy(model(X), torch.tensor([0, 1])).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    reference = gradients(False)
    timm.layers.set_reentrant_ckpt(True)
    try:
        checkpointed = gradients(True)
    finally:
        timm.layers.set_reentrant_ckpt(False)
    assert reference.keys() == checkpointed.keys()
    for name, grad in reference.items():
        assert checkpointed[name] is not None, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert not X.requires_grad  # the caller's images are left as they were


def test_an_inplace_op_after_an_adapted_layer_trains():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.act = nn.ReLU(inplace=True)
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            return self.head(self.act(self.fc(x)))

        def get_classifier(self):
            return self.head

    model = nv.inject(Block(), nv.LoRAConfig(rank=2, targets=["fc"]))
    as_if_trained(model, 1, scale=0.3)
    model(torch.randn(3, 5, 4)).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_changing_a_config_after_inject_changes_neither_the_model_nor_its_file(tmp_path):
    config = nv.LoRAConfig(rank=4)
    first = nv.inject(tiny_vit(), config)
    config.rank = 8
    config.alpha = 1.0
    as_if_trained(first, 1, scale=0.3)
    nv.save_adapter(first, tmp_path, bits=32)
    loaded = nv.load_adapter(tiny_vit(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), first(X))
    assert nv.adapted_layers(loaded)["blocks.0.attn.qkv"].rank == 4


def test_a_plain_checkpoint_loads_into_a_nola_zoo_model_and_an_injected_one(tmp_path):
    kwargs = dict(pretrained=False, num_classes=5, img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
    base = timm.create_model("vit_tiny_patch16_224", **kwargs)
    torch.save(base.state_dict(), tmp_path / "base.pth")
    zoo = timm.create_model("vit_tiny_patch16_224_nola", checkpoint_path=str(tmp_path / "base.pth"),
                            nola_init="zero_delta", **kwargs).eval()
    with torch.no_grad():
        torch.testing.assert_close(zoo(X), base.eval()(X), rtol=0, atol=0)
    injected = as_if_trained(nv.inject(tiny_vit(), nv.LoRAConfig(rank=2)), 1, scale=0.3)
    before = {k: v.clone() for k, v in injected.state_dict().items() if "lora_" in k}
    injected.load_state_dict(tiny_vit().state_dict())  # strict: the adapters keep their values
    assert all(torch.equal(injected.state_dict()[k], v) for k, v in before.items())
    partial = {k: v for k, v in injected.state_dict().items() if k != "blocks.0.attn.qkv.lora_A"}
    with pytest.raises(RuntimeError, match="Missing key.*blocks.0.attn.qkv.lora_A"):
        injected.load_state_dict(partial)


def test_create_model_takes_the_adapter_forms_the_classifier_takes():
    kwargs = dict(pretrained=False, num_classes=5, img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2)
    for adapter in ("nola", {"method": "lora", "rank": 2}, nv.LoRAConfig(rank=2)):
        assert nv.adapted_layers(nv.create_model("vit_tiny_patch16_224", adapter=adapter, **kwargs))
    with pytest.raises(ValueError, match="unknown adapter 'nolla'"):
        nv.create_model("vit_tiny_patch16_224", adapter="nolla", **kwargs)


@pytest.mark.parametrize("name, kwargs", [
    ("hiera_tiny_224", dict(img_size=64, embed_dim=16, num_heads=1, stages=(1, 1, 1, 1))),  # 3, self.heads
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                                  attn_layer="diff")),  # qkv(x).chunk(3, dim=2)
])
def test_q_k_v_block_layouts_written_otherwise_keep_their_slices(name, kwargs):
    model = nv.create_model(name, adapter=nv.LoRAConfig(rank=2), pretrained=False, num_classes=5, **kwargs)
    assert nv.adapted_layers(model)
