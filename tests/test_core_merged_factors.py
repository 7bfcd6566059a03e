"""A merged layer keeps the factors of the ΔW it added: unmerge and task switches subtract exactly those, and a
switch combines the bases for the new task only. Layers merged from a state dict or an old pickle recompute them."""
import copy
import io

import pytest
import torch
from tiny_models import as_if_trained, tiny_vit

import nola_vision as nv
from nola_vision.core import merge as merge_module
from nola_vision.core.merge import switch_merged

CONFIGS = {
    "nola_shared": lambda: nv.NOLAConfig(rank=2, num_basis_a=6, num_basis_b=4, targets=["mlp.fc1", "mlp.fc2"], seed=1),
    "nola_per_layer": lambda: nv.NOLAConfig(rank=2, num_basis_a=6, num_basis_b=4, targets=["mlp.fc1", "attn.q"],
                                            seed=1, basis="per_layer"),
    "lora_qv": lambda: nv.LoRAConfig(rank=2, targets=["attn.q", "attn.v"]),
}


def _adapted(key, seed=0):
    torch.manual_seed(0)
    model = tiny_vit()
    nv.inject(model, CONFIGS[key]())
    return as_if_trained(model, seed=seed, adapters_only=True)


def _values(model):
    return {f"{name}.{p}": getattr(layer, p).detach().clone()
            for name, layer in nv.adapted_layers(model).items() for p in layer.adapter_parameter_names}


def _weights(model):
    return {name: layer.weight.detach().clone() for name, layer in nv.adapted_layers(model).items()}


def _combined_rows(monkeypatch):
    """Count the coefficient rows the shared bases are combined with (merge's one combination per basis)."""
    calls = []
    original = merge_module._combined_groups

    def counting(entries):
        calls.append(len(entries))
        return original(entries)

    monkeypatch.setattr(merge_module, "_combined_groups", counting)
    return calls


def test_a_switch_combines_the_bases_for_the_new_task_only(monkeypatch):
    live, task_b = _adapted("nola_shared", seed=0), _values(_adapted("nola_shared", seed=1))
    nv.merge(live)
    calls = _combined_rows(monkeypatch)
    switch_merged(live, task_b)
    layers = nv.adapted_layers(live).values()
    new_rows = sum(len(layer.shared_coefficients()) for layer in layers)
    assert sum(calls) == new_rows  # the old task's ΔW is the one each layer added, not combined again
    calls.clear()
    nv.unmerge(live)
    assert sum(calls) == 0


@pytest.mark.parametrize("key", list(CONFIGS))
def test_unmerge_subtracts_the_factors_merge_added_even_where_the_bases_would_now_combine_otherwise(key, monkeypatch):
    model = _adapted(key)
    before = _weights(model)
    nv.merge(model)
    # were the update combined again, from other bases or other arithmetic, the weights would come back off
    monkeypatch.setattr(merge_module, "combine_shared", lambda entries: [r * 2 for r in _original(entries)])
    for layer in nv.adapted_layers(model).values():
        monkeypatch.setattr(layer, "delta_factors", lambda *a, **k: pytest.fail("ΔW combined again"))
    nv.unmerge(model)
    for name, layer in nv.adapted_layers(model).items():
        torch.testing.assert_close(layer.weight, before[name], rtol=0, atol=1e-7)


_original = merge_module.combine_shared


@pytest.mark.parametrize("key", list(CONFIGS))
def test_switching_there_and_back_restores_the_first_tasks_weights_and_outputs(key):
    live, other = _adapted(key, seed=0), _adapted(key, seed=1)
    first, second = _values(live), _values(other)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected_b = other.eval()(images)
        nv.merge(live.eval())
        merged_a, out_a = _weights(live), live(images)
        switch_merged(live, second)
        torch.testing.assert_close(live(images), expected_b, rtol=1e-5, atol=1e-5)
        switch_merged(live, first)
        torch.testing.assert_close(live(images), out_a, rtol=1e-5, atol=1e-5)
    for name, weight in _weights(live).items():
        torch.testing.assert_close(weight, merged_a[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("copy_kind", ["deepcopy", "state_dict"])
def test_kept_factors_own_their_storage_and_copies_or_loaded_state_dicts_unmerge_exactly(copy_kind):
    model = _adapted("nola_shared")
    before = _weights(model)
    nv.merge(model)
    for layer in nv.adapted_layers(model).values():
        assert layer.keeps_merged_factors
        a, b = layer.merged_delta_factors()
        assert a.untyped_storage().nbytes() == a.numel() * a.element_size()  # not a view of every layer's rows
        assert b.untyped_storage().nbytes() == b.numel() * b.element_size()
    if copy_kind == "deepcopy":
        copied = copy.deepcopy(model)
        assert all(layer.keeps_merged_factors for layer in nv.adapted_layers(copied).values())
    else:
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        copied = _adapted("nola_shared", seed=5)
        copied.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
        # merged from a state dict: the factors are computed from the loaded trained tensors
        assert not any(layer.keeps_merged_factors for layer in nv.adapted_layers(copied).values())
    nv.unmerge(copied)
    for name, weight in _weights(copied).items():
        torch.testing.assert_close(weight, before[name], rtol=1e-6, atol=1e-7)


def test_an_optimizer_step_while_merged_leaves_the_kept_factors_alone():
    model = _adapted("lora_qv")  # LoRA's B over the whole width may be the parameter itself
    before = _weights(model)
    nv.merge(model)
    with torch.no_grad():
        for layer in nv.adapted_layers(model).values():
            for name in layer.adapter_parameter_names:
                getattr(layer, name).add_(1.0)
    nv.unmerge(model)
    for name, weight in _weights(model).items():
        torch.testing.assert_close(weight, before[name], rtol=1e-6, atol=1e-7)
