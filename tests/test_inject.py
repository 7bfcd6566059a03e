"""inject, counts, init, slices, recomputation and bases on timm ViTs, beyond the method matrix's contract."""
import copy
import pickle
import warnings

import pytest
import timm
import torch
from tiny_models import as_if_trained, tiny_vit
from torch import nn

import nola_vision as nv
from nola_vision.core.inject import adapter_state


def nola_mlp(rank, k, **kwargs):
    return nv.NOLAConfig(rank=rank, num_basis_a=k, num_basis_b=k, targets=["mlp.fc1", "mlp.fc2"], seed=0, **kwargs)


def counts_on_meta(arch, config):
    with torch.device("meta"):  # exact counts need shapes only, not 300M random weights
        model = timm.create_model(arch, pretrained=False, num_classes=10)
    return nv.count_parameters(nv.inject(model, config))


@pytest.mark.parametrize(
    "arch, config, adapter, head",
    [
        ("vit_base_patch16_224", nola_mlp(4, 1024), 49_152, 7_690),
        ("vit_large_patch16_224", nola_mlp(1, 1024), 98_304, 10_250),
        ("vit_large_patch16_224", nola_mlp(1, 512), 49_152, 10_250),
        ("vit_base_patch16_224", nv.LoRAConfig(rank=4, targets=["attn.q", "attn.v"]), 147_456, 7_690),
        ("vit_large_patch16_224", nv.LoRAConfig(rank=4, targets=["attn.q", "attn.v"]), 393_216, 10_250),
        ("vit_large_patch16_224", nv.LoRAConfig(rank=1, targets=["attn.q", "attn.v"]), 98_304, 10_250),
    ],
)
def test_exact_parameter_counts_match_the_paper(arch, config, adapter, head):
    counts = counts_on_meta(arch, config)
    assert counts["adapter"] == adapter and counts["head"] == head
    assert counts["trainable"] == adapter + head


def test_linear_probe_and_full_finetuning_counts():
    linear = counts_on_meta("vit_base_patch16_224", "linear")
    assert linear == {"adapter": 0, "head": 7_690, "trainable": 7_690, "total": linear["total"]}
    full = counts_on_meta("vit_base_patch16_224", "full")
    assert full["trainable"] == full["total"] == 85_806_346


def test_inject_freezes_backbone_and_keeps_head_trainable():
    model = nv.inject(tiny_vit(), nv.NOLAConfig(num_basis_a=32, num_basis_b=32))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"} | {
        f"blocks.{i}.mlp.{fc}.nola_{c}" for i in range(2) for fc in ("fc1", "fc2") for c in ("alpha", "beta")
    }


@pytest.mark.parametrize("config", [nv.NOLAConfig(num_basis_a=32, num_basis_b=32), "linear"])
def test_the_head_keeps_its_pooled_input_not_the_whole_final_token_map(config, images):
    model = nv.inject(tiny_vit(), config)
    head_inputs, kept = [], []
    model.head.register_forward_hook(lambda module, args, output: head_inputs.append(args[0]))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        model(images)
    (pooled,) = head_inputs  # the class token, which the head keeps for its weight gradient
    assert any(t is pooled for t in kept)
    assert pooled.untyped_storage().nbytes() == pooled.numel() * pooled.element_size()
    assert not nv.unload(model).head._forward_pre_hooks  # unload takes the hook away again


def test_zero_delta_init_gives_the_frozen_base_logits(images):
    base = tiny_vit()
    with torch.no_grad():
        expected = base(images)
    model = nv.inject(copy.deepcopy(base), nv.NOLAConfig(num_basis_a=32, num_basis_b=32, init="zero_delta"))
    with torch.no_grad():
        assert torch.equal(model(images), expected)


def _backward(model, images):
    model.zero_grad()
    model(images).logsumexp(-1).sum().backward()
    return {name: layer for name, layer in nv.adapted_layers(model).items()}


def test_paper_init_gives_nonzero_gradients_to_alpha_and_beta(images):
    model = nv.inject(tiny_vit(), nv.NOLAConfig(num_basis_a=32, num_basis_b=32))
    for layer in _backward(model, images).values():
        assert layer.nola_alpha.grad.abs().sum() > 0 and layer.nola_beta.grad.abs().sum() > 0


def test_zero_delta_init_trains_beta_first_then_alpha(images):
    # With β = 0, B = 0 so ∂L/∂A = 0 at step 0 (it is proportional to B); after one step both flow.
    model = nv.inject(tiny_vit(), nv.NOLAConfig(num_basis_a=32, num_basis_b=32, init="zero_delta"))
    layers = _backward(model, images)
    for layer in layers.values():
        assert layer.nola_beta.grad.abs().sum() > 0
        assert layer.nola_alpha.grad.abs().sum() == 0
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    for layer in _backward(model, images).values():
        assert layer.nola_alpha.grad.abs().sum() > 0 and layer.nola_beta.grad.abs().sum() > 0


def test_qv_slices_change_only_query_and_value_rows():
    model = nv.inject(tiny_vit(), nv.LoRAConfig(rank=2, targets=["attn.q", "attn.v"]))
    qkv = model.blocks[0].attn.qkv
    assert qkv.slices == ((0, 64), (128, 192))
    with torch.no_grad():
        qkv.lora_B.fill_(0.1)
    delta = qkv.get_delta_weight()
    assert not delta[64:128].any()  # key rows unchanged; every query and value row changed
    assert delta[:64].any(dim=1).all() and delta[128:].any(dim=1).all()


def test_lora_starts_at_zero_delta_with_scale_one(images):
    base = tiny_vit()
    model = nv.inject(copy.deepcopy(base), nv.LoRAConfig(rank=4))
    assert model.blocks[0].attn.qkv.scaling == 1.0
    with torch.no_grad():
        assert torch.equal(model(images), base(images))


@pytest.mark.parametrize("method", ["nola", "lora"])
def test_recomputed_fc2_input_gives_the_same_gradients(images, method):
    def config(recompute):
        if method == "nola":
            return nv.NOLAConfig(num_basis_a=16, num_basis_b=16, recompute_activation=recompute)
        return nv.LoRAConfig(targets=["mlp.fc1", "mlp.fc2"], recompute_activation=recompute)

    # LoRA's B made non-zero so every gradient path is exercised
    fused, plain = (as_if_trained(nv.inject(tiny_vit(), config(recompute)), 1, scale=0.1, adapters_only=True)
                    for recompute in (True, False))
    assert fused.blocks[0].mlp.fc2.input_activation is not None and plain.blocks[0].mlp.fc2.input_activation is None
    outputs = [m(images) for m in (fused, plain)]
    torch.testing.assert_close(outputs[0], outputs[1])
    for out in outputs:
        out.logsumexp(-1).sum().backward()
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (fused, plain)]
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7)


def test_an_mlp_with_dropout_before_fc2_keeps_its_activation_and_trains_as_without_recompute(images):
    # Moving the activation into fc2 would compute act(dropout(h)) instead of dropout(act(h)).
    def dropout_model(recompute):
        config = nv.NOLAConfig(num_basis_a=16, num_basis_b=16, scale=10.0, recompute_activation=recompute)
        model = nv.inject(tiny_vit(proj_drop_rate=0.25), config)
        return as_if_trained(model, 1, scale=1.0, adapters_only=True).train()

    guarded, plain = dropout_model(True), dropout_model(False)
    assert guarded.blocks[0].mlp.drop1.p == 0.25
    assert isinstance(guarded.blocks[0].mlp.act, nn.GELU) and guarded.blocks[0].mlp.fc2.input_activation is None
    outputs, grads = [], []
    for model in (guarded, plain):
        with torch.random.fork_rng():
            torch.manual_seed(0)  # the same dropout masks in both models
            outputs.append(model(images))
        outputs[-1].logsumexp(-1).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_per_layer_bases_differ_by_layer_and_train(images):
    model = nv.inject(tiny_vit(), nv.NOLAConfig(num_basis_a=40, num_basis_b=40, basis="per_layer"))
    a0, _ = model.blocks[0].mlp.fc1.factors()
    a1, _ = model.blocks[1].mlp.fc1.factors()
    assert not torch.allclose(a0, a1)
    for layer in _backward(model, images).values():
        assert layer.nola_alpha.grad.abs().sum() > 0


def test_shared_bases_hold_one_copy_per_distinct_shape():
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)
    model = nv.inject(model.to_empty(device="cpu"), nola_mlp(4, 64))
    with torch.no_grad():  # a CPU pass that records gradients holds no codes (test_basis)
        model(torch.zeros(1, 3, 224, 224))
    bank = adapter_state(model).bank
    shapes = {(s.stream.split("/")[0], s.shape) for s in bank.tensors()}
    # fc1 (768→3072) and fc2 (3072→768): A and B of each shape, once for all 12 blocks.
    assert shapes == {("A", (768, 4)), ("B", (4, 3072)), ("A", (3072, 4)), ("B", (4, 768))}
    assert len(bank.tensors()) == 4
    assert bank.nbytes() == 2 * 64 * 4 * (768 + 3072 + 3072 + 768)  # int16 codes · k · r · (in + out) per shape


def test_a_cpu_training_step_holds_no_shared_bases_under_its_activations_and_gives_the_same_gradients(images):
    # Held codes would sit under the step's activation peak; the forward pass releases them, backward regenerates.
    model = nv.inject(tiny_vit(), nola_mlp(4, 64))
    bank = adapter_state(model).bank
    during_forward = []
    model.blocks[-1].register_forward_hook(lambda *_: during_forward.append(bank.nbytes()))
    grads = {}
    for keep in (True, None, None):
        nv.set_basis_holding(model, keep)
        model.zero_grad(set_to_none=True)
        model(images).square().sum().backward()
        grads.setdefault(keep, []).append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    codes = 2 * 64 * 4 * (64 + 256 + 256 + 64)
    assert during_forward == [codes, 0, 0] and bank.nbytes() == codes  # held again from backward on
    assert all(torch.equal(grads[True][0][name], other[name]) for other in grads[None] for name in other)


def test_set_basis_holding_releases_codes_when_off_and_refuses_models_without_shared_bases(images):
    model = nv.inject(tiny_vit(), nola_mlp(4, 64))
    with torch.no_grad():
        model(images)  # evaluation holds the codes by default
    bank = adapter_state(model).bank
    assert bank.nbytes() > 0
    nv.set_basis_holding(model, False)
    assert bank.nbytes() == 0
    with torch.no_grad():
        model(images)
    assert bank.nbytes() == 0  # never held, not even for evaluation
    with pytest.raises(ValueError, match="hold must be true, false or None, got 'yes'"):
        nv.set_basis_holding(model, "yes")
    for other in (nv.inject(tiny_vit(), nv.LoRAConfig()), nv.inject(tiny_vit(), nola_mlp(4, 64, basis="per_layer")),
                  tiny_vit()):
        with pytest.raises(ValueError, match="no shared basis codes"):
            nv.set_basis_holding(other, True)


def test_inject_does_not_change_global_rng_state():
    model = tiny_vit()
    state = torch.get_rng_state()
    nv.inject(model, nv.LoRAConfig())
    assert torch.equal(torch.get_rng_state(), state)


def test_unknown_target_lists_linear_layers_and_changes_nothing():
    model = tiny_vit()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError) as error:
        nv.inject(model, nv.NOLAConfig(targets=["mlp.fc1", "mlp.fc3"]))
    message = str(error.value)
    assert "'mlp.fc3'" in message and "blocks.*.mlp.fc1" in message and "blocks.*.attn.qkv" in message
    assert adapter_state(model) is None and all(p.requires_grad for p in model.parameters())
    assert not nv.adapted_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_overlapping_targets_and_double_injection_are_rejected():
    with pytest.raises(ValueError, match="overlap"):
        nv.inject(tiny_vit(), nv.LoRAConfig(targets=["attn.qkv", "attn.q"]))
    model = nv.inject(tiny_vit(), "linear")
    with pytest.raises(ValueError, match="already has"):
        nv.inject(model, nv.LoRAConfig())


def test_a_wrappers_own_head_after_a_headless_timm_model_is_named_when_inject_freezes_it():
    """Without a get_classifier() the wrapper's classifier stayed frozen at its random init, without a word."""
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.fc = tiny_vit(num_classes=0), torch.nn.Linear(64, 5)

        def forward(self, x):
            return self.fc(self.backbone(x))

    with pytest.warns(UserWarning, match=r"Wrapper has no classifier head .* froze its own nn.Linear layer\(s\) "
                                         r"outside the timm model .*: fc\. .*get_classifier\(\) method"):
        model = nv.inject(Wrapper(), nv.NOLAConfig())
    assert not model.fc.weight.requires_grad
    Wrapper.get_classifier = lambda self: self.fc
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = nv.inject(Wrapper(), nv.NOLAConfig())  # its head named: trained, nothing to warn of
        nv.inject(tiny_vit(num_classes=0), nv.NOLAConfig())  # a headless timm model alone: an encoder
    assert model.fc.weight.requires_grad


def test_a_target_that_is_no_valid_regex_says_so_beside_the_layers_there_are():
    with pytest.raises(ValueError, match=r"'mlp\.fc\[' matches no nn.Linear.*It is no valid regex either \("
                                         r"unterminated character set.*Its Linear layers are: .*mlp\.fc1"):
        nv.inject(tiny_vit(), nv.NOLAConfig(targets=["mlp.fc["]))


def test_regex_targets_select_blocks():
    model = nv.inject(tiny_vit(), nv.LoRAConfig(targets=[r"blocks\.1\.mlp\.fc\d"]))
    assert sorted(nv.adapted_layers(model)) == ["blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]


@pytest.mark.parametrize("targets, expected", [
    (["blocks.0.attn.q|blocks.1.attn.v"], {"blocks.0.attn.qkv": ((0, 64),), "blocks.1.attn.qkv": ((128, 192),)}),
    ([r".*attn\.v|.*mlp\.fc1"], {**{f"blocks.{i}.attn.qkv": ((128, 192),) for i in (0, 1)},
                                 **{f"blocks.{i}.mlp.fc1": ((0, 256),) for i in (0, 1)}}),
    ([r".*mlp\.fc1|.*attn\.v"], {**{f"blocks.{i}.attn.qkv": ((128, 192),) for i in (0, 1)},
                                 **{f"blocks.{i}.mlp.fc1": ((0, 256),) for i in (0, 1)}}),
    ([r"blocks\.1\.attn\.[qv]"], {"blocks.1.attn.qkv": ((0, 64), (128, 192))}),
    ([".*"], None),  # every Linear whole, the fused qkv too: never its thirds beside it
])
def test_a_regex_selects_a_fused_qkv_third_by_its_virtual_name_like_any_module_name(targets, expected):
    """A regex alternating a third with other names selected the third only where it came last (its last dotted part
    was read as the slice), and dropped or refused the rest without a word."""
    model = nv.inject(tiny_vit(), nv.LoRAConfig(rank=2, targets=targets))
    layers = {name: layer.slices for name, layer in nv.adapted_layers(model).items()}
    if expected is None:
        expected = {name: ((0, module.out_features),) for name, module in tiny_vit().named_modules()
                    if isinstance(module, torch.nn.Linear) and name != "head"}
    assert layers == expected


def test_invalid_configs_name_the_valid_choices():
    with pytest.raises(ValueError, match="shared"):
        nv.NOLAConfig(basis="global")
    with pytest.raises(ValueError, match="paper"):
        nv.NOLAConfig(init="zeros")
    with pytest.raises(ValueError, match="linear"):
        nv.inject(tiny_vit(), "prefix")


def test_configs_round_trip_through_json():
    import json

    from nola_vision.core.config import config_from_dict

    for config in (nv.NOLAConfig(rank=2, targets=["attn.q"], basis="per_layer"), nv.LoRAConfig(alpha=8)):
        assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_model_to_device_and_dtype_keeps_shared_bases_and_works(images):
    model = nv.inject(tiny_vit(), nv.NOLAConfig(num_basis_a=16, num_basis_b=16))
    with torch.no_grad():
        reference = model(images)
        half = copy.deepcopy(model).to(torch.bfloat16)
        assert half(images.bfloat16()).dtype == torch.bfloat16
        torch.testing.assert_close(half(images.bfloat16()).float(), reference, atol=0.1, rtol=0.1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(model(images).float(), reference, atol=0.1, rtol=0.1)


def trained_nola_shared() -> nn.Module:
    config = nv.NOLAConfig(num_basis_a=16, num_basis_b=16, scale=10.0, targets=["mlp.fc1", "mlp.fc2", "attn.q"])
    return as_if_trained(nv.inject(tiny_vit(), config), 1, scale=1.0, adapters_only=True)


def bank_devices(model: nn.Module):
    return {codes.device.type for codes in adapter_state(model).bank.tensors().values()}


def test_a_model_moved_through_meta_releases_and_regenerates_its_bases_and_unloads_to_its_live_weights(images):
    # How large models are materialised: to("meta"), to_empty(device=...), load_state_dict. Each step replaces the
    # parameter objects; the bases follow the device, and unload gives back the weights the model has now.
    model = trained_nola_shared()
    with torch.no_grad():
        expected = model(images)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    with torch.no_grad():
        assert model.to("meta")(images.to("meta")).is_meta
    assert bank_devices(model) == {"meta"}
    model.to_empty(device="cpu")
    assert bank_devices(model) == set()  # moving released the codes held where the model was
    model.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(model(images), expected)
    assert bank_devices(model) == {"cpu"}
    model.to("meta")
    assert bank_devices(model) == set()
    model.to_empty(device="cpu").load_state_dict(state)
    model.double().float()  # a dtype cast keeps the codes where the model stays
    with torch.no_grad():
        assert torch.equal(model(images), expected)
        assert bank_devices(model) == {"cpu"}
        model.float()
    assert bank_devices(model) == {"cpu"}
    nv.merge_and_unload(model)
    with torch.no_grad():
        torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-5)
    assert {p.device.type for p in model.parameters()} == {"cpu"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the bases regenerate there)")
def test_a_model_moved_to_cuda_regenerates_bit_identical_bases_and_gives_the_cpu_logits(images):
    model = trained_nola_shared()
    with torch.no_grad():
        expected = model(images)
    cpu_codes = adapter_state(model).bank.tensors()
    with torch.no_grad():
        logits = model.cuda()(images.cuda())
    assert bank_devices(model) == {"cuda"}
    assert all(torch.equal(codes.cpu(), cpu_codes[spec]) for spec, codes in adapter_state(model).bank.tensors().items())
    torch.testing.assert_close(logits.cpu(), expected, rtol=1e-4, atol=1e-5)


def test_batched_shared_factors_equal_per_layer_factors(images):
    # model(x) combines all layers' coefficients per shared basis at once; calling the parts directly
    # bypasses that hook and combines layer by layer. Outputs and gradients must agree.
    targets = ["mlp.fc1", "mlp.fc2", "attn.q", "attn.v"]
    model = nv.inject(tiny_vit(), nv.NOLAConfig(num_basis_a=48, num_basis_b=48, targets=targets))
    trainable = [p for p in model.parameters() if p.requires_grad]
    batched = model(images)
    batched_grads = torch.autograd.grad(batched.logsumexp(-1).sum(), trainable)
    assert all(layer.batched_factors is None for layer in nv.adapted_layers(model).values())
    per_layer = model.forward_head(model.forward_features(images))
    per_layer_grads = torch.autograd.grad(per_layer.logsumexp(-1).sum(), trainable)
    torch.testing.assert_close(batched, per_layer)
    for a, b in zip(batched_grads, per_layer_grads):
        torch.testing.assert_close(a, b)


def test_hooks_on_a_layer_inject_replaces_are_named_in_a_warning_and_come_back_with_unload():
    model = tiny_vit()
    calls = []
    model.blocks[0].mlp.fc1.register_forward_hook(lambda *args: calls.append(1))
    with pytest.warns(UserWarning, match=r"blocks\.0\.mlp\.fc1 carry forward or backward hooks, which do not run"):
        nv.inject(model, nv.NOLAConfig(rank=2, num_basis_a=8, num_basis_b=8))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert calls == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inject's own hooks on the layers are no concern of the user's
        nv.unload(model)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert calls == [1]


@pytest.mark.parametrize("unload", [nv.unload, nv.merge_and_unload])
def test_unload_warns_of_the_hooks_registered_on_adapted_layers_which_it_drops(unload):
    # inject's warning says to register hooks on the adapted layer; unload dropped those without a word
    model = nv.inject(tiny_vit(), nv.NOLAConfig(rank=2, num_basis_a=8, num_basis_b=8))
    model.blocks[1].mlp.fc2.register_forward_pre_hook(lambda *args: None)
    with pytest.warns(UserWarning, match=r"unload drops the hooks registered on blocks\.1\.mlp\.fc2 after inject: "
                                         r"they were on the adapted layers.*Register them again on "
                                         r"model.get_submodule\(name\)"):
        unload(model)


def test_inject_into_a_compiled_model_adapts_the_module_it_runs(tmp_path):
    model = tiny_vit()
    compiled = torch.compile(model, backend="eager")
    assert nv.inject(compiled, nv.LoRAConfig(rank=2, targets=["mlp.fc1"])) is compiled
    assert list(adapter_state(model).plan.layers) == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]  # no _orig_mod.
    as_if_trained(model, 1, scale=0.3)
    directory = nv.save_adapter(compiled, tmp_path / "adapter", bits=32)  # was refused: "the head changed"
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(nv.load_adapter(tiny_vit(), directory)(images), compiled(images))
    nv.unload(compiled)
    assert nv.adapted_layers(model) == {}


@pytest.mark.parametrize("default", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("config", [nv.NOLAConfig(num_basis_a=300, num_basis_b=300), nv.LoRAConfig(rank=2)],
                         ids=["nola", "lora"])
def test_adapter_tensors_of_a_float32_model_are_float32_whatever_torchs_default_dtype(default, config, tmp_path,
                                                                                      images):
    # were made in the default dtype: a bits=32 file loaded rounded to bfloat16 (NOLA's init 1/300 too), LoRA mixed
    trained = as_if_trained(nv.inject(tiny_vit(), config), 1, scale=0.2, adapters_only=True)
    nv.save_adapter(trained, tmp_path, bits=32)
    expected = {name: value.clone() for name, value in trained.state_dict().items()}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        fresh, loaded = nv.inject(tiny_vit(), config), nv.load_adapter(tiny_vit(), tmp_path)
    finally:
        torch.set_default_dtype(previous)
    for layer in nv.adapted_layers(fresh).values():
        assert {p.dtype for p in layer.adapter_parameters().values()} == {torch.float32}
    if isinstance(config, nv.NOLAConfig):
        assert torch.equal(fresh.blocks[0].mlp.fc1.nola_alpha, torch.full((1, 300), 1 / 300))
    state = loaded.state_dict()
    for name in nv.adapted_layers(loaded):
        for key in config_tensor_names(config):
            assert torch.equal(state[f"{name}.{key}"], expected[f"{name}.{key}"])
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images), trained.eval()(images))


def config_tensor_names(config):
    return ("nola_alpha", "nola_beta") if isinstance(config, nv.NOLAConfig) else ("lora_A", "lora_B")


@pytest.mark.parametrize("on_meta", ["built there", "moved there"])
def test_adapters_made_or_moved_on_the_meta_device_are_not_taken_for_values_after_to_empty(on_meta, tmp_path, images):
    # after to_empty() they held uninitialised memory, which a strict plain load reported as "all keys matched",
    # and the forward pass, save_adapter and merge used
    trained = trained_nola_shared()
    nv.save_adapter(trained, tmp_path, bits=32)
    plain = {key: value for key, value in tiny_vit().state_dict().items()}
    config = adapter_state(trained).config
    if on_meta == "built there":
        with torch.device("meta"):
            model = tiny_vit().to("meta")
        model = nv.inject(model, config)
    else:
        model = nv.inject(tiny_vit(), config).to("meta")
    model.to_empty(device="cpu")
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"blocks.0.attn.qkv.nola_alpha\""):
        model.load_state_dict(plain)
    assert "blocks.0.attn.qkv.nola_alpha" in model.load_state_dict(plain, strict=False).missing_keys
    with pytest.raises(ValueError, match=r"nola_alpha was on the meta device .* uninitialised memory: load an "
                                         r"adapter"):
        model(images)
    with pytest.raises(ValueError, match=r"save_adapter: the adapter tensors of blocks.0.attn.qkv and 5 more layers "
                                         r"were on the meta device"):
        nv.save_adapter(model, tmp_path / "garbage")
    with pytest.raises(ValueError, match=r"blocks.0.attn.qkv: its adapter tensors .* which a state dict would pass "
                                         r"on as trained tensors"):
        model.state_dict()  # loaded elsewhere, it passed for trained tensors
    nv.load_adapter(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(model.eval()(images), trained.eval()(images))
    model.to("meta").to_empty(device="cpu")
    model.load_state_dict(trained.state_dict())  # the adapter tensors with the weights: values again
    with torch.no_grad():
        assert torch.equal(model(images), trained(images))


@pytest.mark.parametrize("method", ["nola", "lora"])
def test_tensors_passed_to_a_meta_copy_or_written_after_to_empty_are_values_but_to_empty_s_own_are_not(method,
                                                                                                        images):
    # torch.func's ensembling recipe runs a meta copy of the model over each model's tensors; the copy's "unset"
    # mark refused those passed-in values, and values copied by hand into to_empty()'s tensors
    from torch.func import functional_call, stack_module_state, vmap

    config = nv.NOLAConfig(num_basis_a=8, num_basis_b=8) if method == "nola" else nv.LoRAConfig(rank=2)
    models = [as_if_trained(nv.inject(tiny_vit(), config), seed=seed).eval() for seed in (0, 1)]
    parameters, buffers = stack_module_state(models)
    meta_copy = copy.deepcopy(models[0]).to("meta")
    with torch.no_grad():
        outputs = vmap(lambda p, b, x: functional_call(meta_copy, (p, b), (x,)), in_dims=(0, 0, None))(
            parameters, buffers, images)
        for model, output in zip(models, outputs):
            torch.testing.assert_close(output, model(images), rtol=1e-5, atol=1e-5)
    emptied = copy.deepcopy(meta_copy).to_empty(device="cpu")
    copies = (copy.deepcopy, lambda model: pickle.loads(pickle.dumps(model)))  # a copy's versions count afresh
    for unset in (emptied, *(make(emptied) for make in copies), copy.deepcopy(emptied).to(torch.float64).float()):
        with pytest.raises(ValueError, match="was on the meta device"):
            unset(images)
    with torch.no_grad():
        for target, source in zip([*emptied.parameters(), *emptied.buffers()],
                                  [*models[1].parameters(), *models[1].buffers()]):
            target.copy_(source)
        for written in (emptied, *(make(emptied) for make in copies)):
            assert torch.equal(written(images), models[1](images))
