"""An ``mlp.act`` replaced after an adapted ``mlp.fc2`` took its activation over (``recompute_activation``): refused at
forward (fc2 would apply the old activation on top of the new one), kept by unload, and checked in copies and compiled
models; an ``mlp.fc2`` replaced after inject (the activation would be skipped) is refused too; and a merged model's
state dict that loses the merged record is refused by load_adapter."""
import copy
import pickle

import pytest
import torch
from tiny_models import as_if_trained, tiny_vit
from torch import nn

import nola_vision as nv

SMALL_NOLA = dict(rank=2, num_basis_a=6, num_basis_b=4, seed=1, targets=["mlp.fc1", "mlp.fc2"])
REPLACED = (r"blocks\.0\.mlp\.act was replaced after inject \(it is now a {0}\).*compute GELU\({0}\(h\)\)"
            r".*nv\.unload\(model\), which keeps the new blocks\.0\.mlp\.act, then inject again")


def adapted(recompute: bool = True) -> nn.Module:
    """A tiny ViT with trained-looking NOLA adapters on fc1 and fc2 (fc2 takes ``mlp.act`` over if ``recompute``)."""
    model = nv.inject(tiny_vit(), nv.NOLAConfig(**SMALL_NOLA, recompute_activation=recompute))
    return as_if_trained(model, 1, adapters_only=True)


def relu_reference(images: torch.Tensor) -> torch.Tensor:
    """What the adapted model with a ReLU at blocks.0.mlp.act computes: fc2 keeps act in place, so it may change."""
    model = adapted(recompute=False)
    model.blocks[0].mlp.act = nn.ReLU()
    with torch.no_grad():
        return model.eval()(images)


def test_an_fc2_replaced_after_inject_is_refused_rather_than_skipping_the_activation(images):
    model = adapted()
    model.blocks[0].mlp.fc2 = nn.Linear(model.blocks[0].mlp.fc2.in_features, model.blocks[0].mlp.fc2.out_features)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc2 was replaced after inject \(it is now a Linear\).*"
                                         r"skip the activation.*nv\.unload\(model\) before replacing layers"):
        with torch.no_grad():
            model.eval()(images)


@pytest.mark.parametrize("unload", ["unload", "merge_and_unload"])
def test_unload_after_an_adapted_fc2_was_replaced_puts_the_activation_back(images, unload):
    """The error above says to unload; unload left the placeholder at mlp.act (the replaced fc2 held the only
    reference to the GELU), so the plain model kept failing and a second unload said it was never injected."""
    model = adapted()
    plain = copy.deepcopy(model.blocks[0].mlp.fc2.base_layer)
    model.blocks[0].mlp.fc2 = plain
    getattr(nv, unload)(model)
    assert type(model.blocks[0].mlp.act) is nn.GELU and model.blocks[0].mlp.fc2 is plain
    with torch.no_grad():
        out = model.eval()(images)
        if unload == "unload":  # the backbone as it was
            torch.testing.assert_close(out, tiny_vit().eval()(images), rtol=0, atol=0)


@pytest.mark.parametrize("new", [nn.ReLU, nn.Identity, nn.GELU])
def test_an_activation_replaced_after_inject_is_refused_in_training_eval_and_merged(images, new):
    model = adapted()
    model.blocks[0].mlp.act = new()
    message = REPLACED.format(new.__name__)
    with pytest.raises(ValueError, match=message):
        model.train()(images).sum().backward()
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model.eval()(images)
    nv.merge(model)
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model(images)


def test_unload_and_merge_and_unload_keep_the_new_activation_and_inject_works_again(images):
    expected = relu_reference(images)
    merged = adapted()
    merged.blocks[0].mlp.act = nn.ReLU()
    nv.merge_and_unload(merged)
    assert isinstance(merged.blocks[0].mlp.act, nn.ReLU)
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(images), expected)

    model = adapted()
    model.blocks[0].mlp.act = nn.ReLU()
    nv.unload(model)
    plain = tiny_vit()
    plain.blocks[0].mlp.act = nn.ReLU()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), plain.eval()(images))
    nv.inject(model, nv.NOLAConfig(**SMALL_NOLA))  # fc2 now takes the ReLU over
    assert isinstance(model.blocks[0].mlp.fc2.input_activation, nn.ReLU)
    model.train()(images).sum().backward()


def test_a_hook_on_fc2_after_a_replacement_sees_the_new_activation_and_its_removal_takes_nothing_over(images):
    model = adapted()
    model.blocks[0].mlp.act = nn.ReLU()
    seen = []
    handle = model.blocks[0].mlp.fc2.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    assert isinstance(model.blocks[0].mlp.act, nn.ReLU)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), relu_reference(images))
    assert seen[0].min() >= 0  # the ReLU's output
    handle.remove()
    assert model.blocks[0].mlp.fc2.input_activation is None
    with torch.no_grad():
        torch.testing.assert_close(model(images), relu_reference(images))


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "state_dict"])
def test_copies_run_unchanged_and_keep_refusing_a_replacement(images, how):
    model = adapted().eval()
    if how == "deepcopy":
        twin = copy.deepcopy(model)
    elif how == "pickle":
        twin = pickle.loads(pickle.dumps(model))
    else:
        twin = nv.inject(tiny_vit(), nv.NOLAConfig(**SMALL_NOLA)).eval()
        twin.load_state_dict(model.state_dict())
    fc2 = twin.blocks[0].mlp.fc2
    assert fc2.activation_placeholder is twin.blocks[0].mlp.act  # the copy's own, not the original's
    assert [name for name, _ in twin.named_modules()] == [name for name, _ in model.named_modules()]
    with torch.no_grad():
        torch.testing.assert_close(twin(images), model(images))
    twin.blocks[0].mlp.act = nn.ReLU()
    with pytest.raises(ValueError, match=REPLACED.format("ReLU")), torch.no_grad():
        twin(images)
    with torch.no_grad():
        model(images)  # the original is untouched
    nv.unload(twin)
    assert isinstance(twin.blocks[0].mlp.act, nn.ReLU) and isinstance(twin.blocks[1].mlp.act, nn.GELU)


def test_a_layer_pickled_before_placeholders_were_kept_still_runs_and_unloads(images):
    model = adapted().eval()
    for block in model.blocks:
        block.mlp.fc2.__dict__.pop("activation_placeholder", None)  # as such a pickle loads: the class default
    with torch.no_grad():
        torch.testing.assert_close(model(images), adapted().eval()(images))
    model.blocks[0].mlp.fc2.register_forward_hook(lambda *args: None).remove()  # gives back, then takes over again
    assert model.blocks[0].mlp.fc2.input_activation is not None
    nv.unload(model)
    assert all(isinstance(block.mlp.act, nn.GELU) for block in model.blocks)


def test_a_compiled_model_trains_without_breaks_or_recompiles_and_a_replacement_is_refused(images):
    torch._dynamo.reset()
    model = adapted().train()
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fullgraph: a graph break would raise
    compiled(images).sum().backward()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(images).sum().backward()
    model.blocks[0].mlp.act = nn.ReLU()  # dynamo guards on mlp.act: the next call retraces and meets the check
    with pytest.raises(Exception, match=REPLACED.format("ReLU")):
        compiled(images)
    torch._dynamo.reset()


def test_an_adapter_loaded_again_onto_a_merge_and_unload_state_dict_is_refused(images, tmp_path):
    model = adapted()
    nv.save_adapter(model, tmp_path / "a")
    nv.merge_and_unload(model)
    with pytest.raises(nv.AdapterLoadError, match="merge"):
        nv.load_adapter(copy.deepcopy(model), tmp_path / "a")  # the record travels with a copy: refused
    fresh = tiny_vit()
    fresh.load_state_dict(model.state_dict())
    with pytest.raises(nv.AdapterLoadError):
        nv.load_adapter(fresh, tmp_path / "a")
