"""Faults of the adapter layers: merged state dicts, training a merged model, gradient checkpointing, and
``nn.Linear`` subclasses with their own forward."""
import pytest
import timm
import timm.layers
import torch
import torch.nn.functional as F
from method_matrix import trained
from tiny_models import as_if_trained, tiny_vit
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import nola_vision as nv
from nola_vision.core import basis

NOLA = dict(rank=2, num_basis_a=16, num_basis_b=16, targets=["mlp.fc1", "mlp.fc2", "attn.q", "attn.v"])


def trained_nola(seed: int = 0, **kwargs) -> nn.Module:
    """A tiny NOLA model whose coefficients differ from their initial values (so ΔW is not trivial)."""
    return as_if_trained(nv.inject(tiny_vit(), nv.NOLAConfig(**{**NOLA, **kwargs})), seed, scale=0.5,
                         adapters_only=True)


# ---- 9. merged state -------------------------------------------------------------------------------------
@pytest.mark.parametrize("source_merged, target_merged", [(True, False), (False, True), (True, True)])
def test_state_dict_round_trip_keeps_outputs_whatever_either_side_merged(source_merged, target_merged, images):
    source = trained_nola()
    with torch.no_grad():
        expected = source(images)
    if source_merged:
        nv.merge(source)
    target = nv.inject(tiny_vit(), nv.NOLAConfig(**NOLA))
    if target_merged:
        nv.merge(target)
    target.load_state_dict(source.state_dict())
    assert all(layer.merged == source_merged for layer in nv.adapted_layers(target).values())
    with torch.no_grad():
        torch.testing.assert_close(target(images), expected, rtol=0, atol=1e-5)
        nv.unmerge(target)
        torch.testing.assert_close(target(images), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("source_bits, target_bits", [(4, None), (None, 8), (4, 8)])
def test_a_merged_state_dict_loads_only_into_a_model_set_to_the_bits_it_was_merged_at(source_bits, target_bits):
    # unmerge subtracts ΔW at the model's bits: another setting than the merge's would leave the frozen weights off
    def model(bits):
        return nv.set_quantization_aware(trained_nola(), bits)

    source = nv.merge(model(source_bits))
    target = model(target_bits)
    with pytest.raises(RuntimeError, match=rf"ΔW merged .*set_quantization_aware\(model, {source_bits}\)"):
        target.load_state_dict(source.state_dict())
    matching = model(source_bits)
    matching.load_state_dict(source.state_dict())  # the same bits: exact, and unmerge gives the base weights back
    nv.unload(nv.unmerge(matching))
    fresh = tiny_vit().state_dict()
    for key, value in matching.state_dict().items():
        if key in fresh and not key.startswith("head"):
            torch.testing.assert_close(value, fresh[key], rtol=0, atol=1e-5, msg=key)


def test_merged_flag_without_weights_is_refused():
    source = nv.merge(trained_nola())
    target = nv.inject(tiny_vit(), nv.NOLAConfig(**NOLA))
    partial = {k: v for k, v in source.state_dict().items() if not k.endswith(".weight")}
    with pytest.raises(RuntimeError, match="unmerge"):
        target.load_state_dict(partial, strict=False)


def test_plain_state_dict_loads_as_unmerged_weights(images):
    """Pretrained weights of a never-injected model (no flag) load into an adapted model as they are."""
    plain = tiny_vit()
    model = nv.merge(trained_nola())
    result = model.load_state_dict(plain.state_dict(), strict=False)
    assert not any(key.endswith("merged") for key in result.missing_keys)
    assert not any(layer.merged for layer in nv.adapted_layers(model).values())
    nv.unload(model)
    with torch.no_grad():
        torch.testing.assert_close(model(images), plain(images), rtol=0, atol=0)


def test_backward_through_a_merged_adapter_raises(adapter_variant, images):
    model = nv.merge(nv.inject(tiny_vit(), adapter_variant.config())).train()
    with torch.no_grad():
        model(images)  # inference on a merged model is fine, in any mode
    loss = model(images).sum()  # so is a forward with gradients enabled, as long as no backward follows
    with pytest.raises(RuntimeError, match="unmerge"):
        loss.backward()
    nv.unmerge(model)
    model(images).sum().backward()
    assert all(p.grad is not None for layer in nv.adapted_layers(model).values()
               for p in layer.adapter_parameters().values())


# ---- 10. gradient checkpointing --------------------------------------------------------------------------
def test_gradient_checkpointing_gives_the_same_gradients(variant, images):
    grads = []
    for checkpointing in (False, True):
        model = trained(variant).train()  # LoRA's B no longer zero: every factor gets a gradient
        model.set_grad_checkpointing(checkpointing)
        for _ in range(2):  # twice: nothing of the first step may leak into the second
            model.zero_grad()
            F.cross_entropy(model(images), torch.arange(4)).backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) >= 2
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_nola_combines_each_shared_basis_once_per_pass_unless_reentrant(reentrant, images, monkeypatch):
    # Non-reentrant checkpointing (timm's default) recomputes a block's layers from the factors of the forward
    # pass, kept until backward has their gradients; re-entrant checkpointing runs a backward per block, which
    # must not go through a combination shared by every block, so there each layer combines its own factors.
    monkeypatch.setattr(timm.layers, "use_reentrant_ckpt", lambda: reentrant)
    calls = []
    monkeypatch.setattr(basis._CombineBases, "forward", _counting(basis._CombineBases.forward, calls))
    model = nv.inject(tiny_vit(), nv.NOLAConfig(num_basis_a=16, num_basis_b=16)).train()
    model.set_grad_checkpointing(True)
    plain = nv.inject(tiny_vit(), nv.NOLAConfig(num_basis_a=16, num_basis_b=16)).train()
    layers = nv.adapted_layers(model).values()
    for _ in range(2):
        calls.clear()
        F.cross_entropy(model(images), torch.arange(4)).backward()
        shapes = {spec for layer in layers for spec, _ in layer.shared_coefficients()}
        # re-entrant: A and B of every layer, in forward and in the recomputation; else one per basis per step
        assert len(calls) == (2 * len(layers) * 2 if reentrant else len(shapes))
        assert all(layer.pending_passes == 0 for layer in layers)  # no longer pending once backward is done
    for _ in range(2):
        F.cross_entropy(plain(images), torch.arange(4)).backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_reentrant_checkpointing_trains_the_adapters_through_forward_features(variant, images):
    # The images are made to require grad in the model's forward pre-hook, which forward_features skips: re-entrant
    # checkpointing then differentiated no block, and every adapter silently got no gradient.
    previous = timm.layers.use_reentrant_ckpt()
    timm.layers.set_reentrant_ckpt(True)  # timm's own setting: patching our check alone leaves timm non-reentrant
    try:
        grads = []
        for checkpointing in (False, True):
            model = trained(variant).train()
            model.set_grad_checkpointing(checkpointing)
            F.cross_entropy(model.forward_head(model.forward_features(images)), torch.arange(4)).backward()
            grads.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    finally:
        timm.layers.set_reentrant_ckpt(previous)
    assert all(grad is not None for grad in grads[1].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)
    assert not images.requires_grad


@pytest.mark.parametrize("config", [nv.NOLAConfig(num_basis_a=16, num_basis_b=16),
                                    nv.LoRAConfig(targets=["mlp.fc1", "mlp.fc2"]), nv.LoRAConfig()],
                         ids=["nola_mlp", "lora_mlp", "lora_qv"])
def test_checkpointed_recomputation_stops_before_an_adapted_fc2s_frozen_product(config, images):
    # torch stops recomputing a checkpointed block once every tensor backward needs is back: a frozen fc2's product
    # is never recomputed (its backward needs only the weight), and an adapted fc2's must not be either.
    model = nv.inject(tiny_vit(), config).train()
    model.set_grad_checkpointing(True)
    loss = F.cross_entropy(model(images), torch.arange(4))
    with ProductsOf([block.mlp.fc2.weight for block in model.blocks]) as products:
        loss.backward()
    assert products.count == 0
    assert all(p.grad is not None for layer in nv.adapted_layers(model).values()
               for p in layer.adapter_parameters().values())


class ProductsOf(TorchDispatchMode):
    """Counts the forward products ``x Wᵀ`` (addmm, mm) of the given weights; their backward's ``grad W`` is not one."""

    def __init__(self, weights) -> None:
        super().__init__()
        self.weights = {w.untyped_storage().data_ptr(): w.shape[1] for w in weights}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default):
            first, second = args[1:3] if func is torch.ops.aten.addmm.default else args[:2]
            in_features = self.weights.get(second.untyped_storage().data_ptr())
            self.count += in_features is not None and first.shape[-1] == in_features
        return func(*args, **(kwargs or {}))


def _counting(function, calls):
    def counted(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)
    return staticmethod(counted)


# ---- 11. nn.Linear subclasses ----------------------------------------------------------------------------
class PlusOneLinear(nn.Linear):
    """Stands in for a quantised linear: its own forward is not ``F.linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1


def test_linear_subclass_with_its_own_forward_is_refused():
    model = tiny_vit()
    fc1 = model.blocks[0].mlp.fc1
    model.blocks[0].mlp.fc1 = PlusOneLinear(fc1.in_features, fc1.out_features)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1.*PlusOneLinear"):
        nv.inject(model, nv.NOLAConfig(**NOLA))
    assert not nv.adapted_layers(model)  # nothing changed
    nv.inject(model, nv.NOLAConfig(**{**NOLA, "targets": ["attn.q", "attn.v"]}))  # untargeted: fine


def test_timm_linear_and_subclasses_without_a_forward_are_adapted(images):
    model = tiny_vit()
    timm_linear = timm.layers.Linear(64, 256)
    plain = type("NoForwardLinear", (nn.Linear,), {})(256, 64)
    with torch.no_grad():
        timm_linear.weight.copy_(model.blocks[0].mlp.fc1.weight)
        timm_linear.bias.copy_(model.blocks[0].mlp.fc1.bias)
        plain.weight.copy_(model.blocks[0].mlp.fc2.weight)
        plain.bias.copy_(model.blocks[0].mlp.fc2.bias)
        expected = model(images)
    model.blocks[0].mlp.fc1, model.blocks[0].mlp.fc2 = timm_linear, plain
    nv.inject(model, nv.NOLAConfig(**NOLA, init="zero_delta"))
    assert "blocks.0.mlp.fc1" in nv.adapted_layers(model) and "blocks.0.mlp.fc2" in nv.adapted_layers(model)
    with torch.no_grad():
        torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-6)
