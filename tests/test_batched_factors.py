"""Layers that share a basis get their factors from one combination per basis, viewed, scaled and cast for all of
them at once: the values and gradients are those of each layer's own factors, bit for bit, in fewer ops."""
import gc
import weakref

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


def test_the_walks_kept_for_training_steps_keep_no_model_or_layer_alive():
    """A model that trained, and a layer unloaded or deleted from one, are freed as before (the walk holds them
    weakly: the model itself has a checkpointing flag, so a strong reference kept every trained model)."""
    model = _model("mlp")
    _step(model, torch.randn(2, 3, 32, 32))
    fc1 = weakref.ref(model.blocks[0].mlp.fc1)
    nv.unload(model)
    gc.collect()
    assert fc1() is None
    trained = weakref.ref(model)
    del model
    gc.collect()
    assert trained() is None
    model = _model("mlp")
    _step(model, torch.randn(2, 3, 32, 32))
    gone = weakref.ref(model.blocks[1].mlp.fc1)
    del model.blocks[1]  # deleting registers nothing: the freed layer makes the walk stale
    gc.collect()
    assert gone() is None and merge._walk(model)[0] == [model.blocks[0].mlp.fc1, model.blocks[0].mlp.fc2]


def test_a_checkpointing_flag_a_module_gets_after_a_step_is_seen():
    model = _model("mlp")
    _step(model, torch.randn(2, 3, 32, 32))
    model.blocks[0].grad_checkpointing = True  # an attribute set registers nothing
    assert merge._walk(model)[1]


def test_factors_released_without_their_pre_hook_are_released_all_the_same():
    model = _model("mlp")
    merge.combine_shared_factors(model)
    merge.release_shared_factors(model)
    merge.release_shared_factors(model)  # no walk kept for it: it walks the tree itself
    assert all(layer.batched_factors is None for layer in nv.adapted_layers(model).values())


@pytest.mark.parametrize("second", ["float32", "float16"])
def test_two_passes_in_other_precisions_before_one_checkpointed_backward_recompute_what_they_kept(second, monkeypatch):
    """The second pass replaces the batched factors (and their cast) before the first pass's blocks are recomputed:
    each layer keeps its factors in its product's dtype however they were cast, so the recomputation keeps the same
    tensors (it kept float32 factors where the forward pass had kept the bfloat16 cast: CheckpointError)."""
    import timm.layers

    monkeypatch.setattr(timm.layers, "use_reentrant_ckpt", lambda: False)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpointing in (True, False):
        model = _model("mlp")
        model.set_grad_checkpointing(checkpointing)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            first = model(images)
        with torch.autocast("cpu", dtype=torch.float16, enabled=second == "float16"):
            second_out = model(images.flip(-1))
        (first.float().sum() + second_out.float().sum()).backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for got, expected in zip(*grads):
        assert torch.equal(got, expected)


def test_a_pass_under_fake_tensors_leaves_nothing_fake_for_the_next_real_pass(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from nola_vision.core import functions

    model, images = _model("mlp"), torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = model(images).detach()
    monkeypatch.setattr(functions, "_SINKS", {})  # as in a process whose first pass is a fake one
    with FakeTensorMode(allow_non_fake_inputs=True):  # shape propagation, memory estimates
        model(torch.randn(2, 3, 32, 32))
    assert all(type(sink) is torch.Tensor for sink in functions._SINKS.values())  # no fake one kept for later
    got = model(images)
    got.sum().backward()
    assert torch.equal(got, expected)
