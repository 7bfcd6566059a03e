"""Layers that share a basis get their factors from one combination per basis, viewed, scaled and cast for all of
them at once: the values and gradients are those of each layer's own factors, bit for bit, in fewer ops."""
import pytest
import torch
from counted_ops import CountedOps
from tiny_models import tiny_vit

import nola_vision as nv
from nola_vision.core import layer as layer_module
from nola_vision.core import merge
from nola_vision.core.layer import as_factors
from nola_vision.core.merge import shared_delta_factors

CONFIGS = {
    "mlp": lambda: nv.NOLAConfig(rank=2, num_basis_a=16, num_basis_b=8, scale=3.0),
    "mixed_widths": lambda: nv.NOLAConfig(rank=2, num_basis_a=16, num_basis_b=8,
                                          targets=["attn.q", "attn.v", "attn.proj", "mlp.fc1", "mlp.fc2"]),
}


def _model(key, depth=2):
    generator = torch.Generator().manual_seed(0)
    model = nv.inject(tiny_vit(num_classes=3, depth=depth), CONFIGS[key]()).train()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def _another_scaling(layers):
    layers[2].scaling = 2.5  # its A goes apart from the other layers' (B still with theirs)


def _another_dtype(layers):
    layers[1].nola_alpha.data = layers[1].nola_alpha.data.double()  # every layer then goes through its own rows


@pytest.mark.parametrize("change", [None, _another_scaling, _another_dtype])
@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_shared_delta_factors_are_each_layers_delta_factors_of_the_combined_rows_bit_for_bit(key, change):
    layers = list(nv.adapted_layers(_model(key)).values())
    if change is not None:
        change(layers)
    with torch.no_grad():
        rows = iter(merge.combine_shared([(layer, spec, layer.trained(name)) for layer in layers
                                          for spec, name in layer.shared_coefficients()]))
        for layer, ((a, b), _) in zip(layers, shared_delta_factors(layers)):
            own_a, own_b = layer.delta_factors_of(as_factors(layer, next(rows), next(rows)))
            assert torch.equal(a, own_a) and torch.equal(b, own_b)


def _step(model, images, autocast=True):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(images)
    out.float().square().mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def _without_batched_casts(monkeypatch):
    """Each layer casts its own factors (as before they were cast once per basis)."""
    original = merge.shared_delta_factors
    monkeypatch.setattr(merge, "shared_delta_factors",
                        lambda *args, **kwargs: [(pair, None) for pair, _ in original(*args, **kwargs)])


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_factors_cast_once_per_basis_give_the_outputs_and_gradients_of_casts_per_layer(key, monkeypatch):
    model, images = _model(key), torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    seen = []
    original = layer_module.low_rank_linear
    monkeypatch.setattr(layer_module, "low_rank_linear",
                        lambda x, weight, bias, a, b, activation: seen.append((a, b)) or original(
                            x, weight, bias, a, b, activation))
    out, grads = _step(model, images)
    names = list(nv.adapted_layers(model))
    # Every layer of the MLP-only config; fc1 in the other, whose other layers share B's basis with q and v's slices
    cast = [(a, b) for (a, b), name in zip(seen, names) if key == "mlp" or name.endswith("fc1")]
    assert cast and all(a.dtype == b.dtype == torch.bfloat16 for a, b in cast)
    fc1 = [a for (a, _), name in zip(seen, names) if name.endswith("fc1")]
    assert len({a.untyped_storage().data_ptr() for a in fc1}) == 1  # one cast for every fc1's A
    _without_batched_casts(monkeypatch)
    expected_out, expected_grads = _step(model, images)
    assert torch.equal(out, expected_out)
    for got, expected in zip(grads, expected_grads):
        assert torch.equal(got, expected)


def test_a_block_run_without_autocast_inside_an_autocast_pass_takes_the_float32_factors(monkeypatch):
    model, images = _model("mlp"), torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    block = model.blocks[1]
    full = block.forward

    def without_autocast(x):
        with torch.autocast("cpu", enabled=False):
            return full(x.float())

    block.forward = without_autocast
    out, grads = _step(model, images)
    _without_batched_casts(monkeypatch)
    expected_out, expected_grads = _step(model, images)
    assert torch.equal(out, expected_out)
    for got, expected in zip(grads, expected_grads):
        assert torch.equal(got, expected)


def test_a_training_step_scales_the_factors_once_per_basis_whatever_the_depth():
    """A's scaling is one multiply per basis forward and one backward, not one per layer: on a GPU each is a launch."""
    counts = []
    for depth in (2, 4):
        model = _model("mlp", depth=depth)
        with CountedOps() as ops:
            _step(model, torch.randn(2, 3, 32, 32), autocast=False)
        counts.append(ops.calls["mul"])
    assert counts[0] == counts[1]


def test_training_steps_walk_the_models_tree_once_until_a_module_is_assigned(monkeypatch):
    """The hooks before and after each forward pass need the adapted layers and whether the model checkpoints: the
    tree is walked once (each walk of a ViT-B's tree costs the host ~0.3 ms a step), and again only after a module
    was assigned into one; a checkpointing flag set meanwhile is seen without a walk."""
    model, walks = _model("mlp"), []
    original = merge._walk_tree
    monkeypatch.setattr(merge, "_walk_tree", lambda module: walks.append(module) or original(module))
    images = torch.randn(2, 3, 32, 32)
    for _ in range(2):
        with monkeypatch.context() as inside_the_step:
            inside_the_step.setattr(torch.nn.Module, "named_modules", lambda *_, **__: pytest.fail("walked again"))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(images).float().square().mean()
            loss.backward()
    assert walks == [model]
    model.set_grad_checkpointing(True)
    assert merge._walk(model)[1] and walks == [model]
    model.blocks[1] = model.blocks[0]  # the second block's layers are gone
    assert merge._walk(model)[0] == [model.blocks[0].mlp.fc1, model.blocks[0].mlp.fc2] and len(walks) == 2


def test_factors_released_without_their_pre_hook_are_released_all_the_same():
    model = _model("mlp")
    merge.combine_shared_factors(model)
    merge.release_shared_factors(model)
    merge.release_shared_factors(model)  # no walk kept for it: it walks the tree itself
    assert all(layer.batched_factors is None for layer in nv.adapted_layers(model).values())
