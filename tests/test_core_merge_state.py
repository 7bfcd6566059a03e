"""Merged state and state dicts of adapted layers: unmerge is the exact inverse of merge whatever happens to the
trained tensors meanwhile, a state dict refuses a layer with another update, and two forward passes under gradient
checkpointing share one backward."""
import copy
import io
import json
import warnings

import pytest
import torch
import torch.nn.utils.prune
from safetensors.torch import load_file, save_file
from tiny_models import as_if_trained, tiny_vit

import nola_vision as nv
from nola_vision.core.fingerprint import frozen_records
from nola_vision.core.merge import switch_merged

CONFIGS = {
    "nola_shared": lambda: nv.NOLAConfig(rank=2, num_basis_a=6, num_basis_b=4, targets=["mlp.fc1", "attn.v"], seed=1),
    "nola_per_layer": lambda: nv.NOLAConfig(rank=2, num_basis_a=6, num_basis_b=4, targets=["mlp.fc1", "attn.q"],
                                            seed=1, basis="per_layer"),
    "lora_qv": lambda: nv.LoRAConfig(rank=2, targets=["attn.q", "attn.v"]),
}


def _images(n=2, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _weights(model):
    return {name: layer.weight.detach().clone() for name, layer in nv.adapted_layers(model).items()}


def _assert_restored(model, before):
    for name, layer in nv.adapted_layers(model).items():
        error = (layer.weight - before[name]).norm() / before[name].norm()
        assert error < 1e-6, f"{name}: frozen weight off by {error:.2e} (relative)"


def _adapted(key, seed=0):
    model = tiny_vit()
    nv.inject(model, CONFIGS[key]())
    return as_if_trained(model, seed=seed, adapters_only=True)


def _step_adapters(model, seed=7):
    """Change every adapter tensor in place, as an optimizer step does."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in nv.adapted_layers(model).values():
            for parameter in layer.adapter_parameters().values():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)


@pytest.mark.parametrize("key", list(CONFIGS))
def test_unmerge_after_an_optimizer_step_while_merged_restores_the_frozen_weights(key):
    model = tiny_vit()
    before = {name: model.get_submodule(name).weight.detach().clone()
              for name in nv.plan_injection(model, CONFIGS[key]()).layers}
    nv.inject(model, CONFIGS[key]())
    as_if_trained(model, adapters_only=True)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    model(_images()).square().sum().backward()  # gradients pending (gradient accumulation)
    nv.merge(model)
    optimizer.step()  # taken while merged
    nv.unmerge(model)
    _assert_restored(model, before)
    nv.merge(model)
    _step_adapters(model)
    nv.unload(model)
    for name, weight in before.items():
        assert torch.allclose(model.get_submodule(name).weight, weight, rtol=0, atol=1e-6 * weight.norm())


def test_unmerge_subtracts_what_was_merged_at_quantisation_aware_bits():
    model = _adapted("nola_shared")
    nv.set_quantization_aware(model, 4)
    before = _weights(model)
    nv.merge(model)
    _step_adapters(model)
    nv.unmerge(model)
    _assert_restored(model, before)


@pytest.mark.parametrize("key", list(CONFIGS))
def test_task_switch_on_a_merged_model_after_an_in_place_change_gives_the_new_task(key):
    model = _adapted(key, seed=0)
    task_b = {name: p.detach().clone() for name, p in as_if_trained(copy.deepcopy(model), seed=3).named_parameters()
              if p.requires_grad}
    expected_model = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in expected_model.named_parameters():
            if name in task_b:
                parameter.copy_(task_b[name])
        expected = expected_model(_images())
    before = _weights(model)
    nv.merge(model)
    _step_adapters(model)  # the merged weight now holds another update than the parameters give
    switch_merged(model, task_b)
    with torch.no_grad():
        assert torch.allclose(model(_images()), expected, atol=1e-5)
    nv.unmerge(model)
    _assert_restored(model, before)


def test_deepcopy_and_pickle_of_a_merged_model_keep_what_was_merged():
    model = _adapted("nola_shared")
    before = _weights(model)
    nv.merge(model)
    _step_adapters(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        nv.unmerge(copied)
        _assert_restored(copied, before)


def test_a_merged_state_dict_loaded_into_a_merged_model_unmerges_to_the_frozen_weights():
    source = _adapted("nola_shared", seed=0)
    before = _weights(source)
    nv.merge(source)
    state = source.state_dict()
    target = _adapted("nola_shared", seed=4)
    nv.merge(target)
    _step_adapters(target)
    target.load_state_dict(state, strict=True)  # the loaded weight holds the source's ΔW, of the loaded tensors
    _step_adapters(target, seed=8)
    nv.unmerge(target)
    _assert_restored(target, before)


@pytest.mark.parametrize("change", [dict(seed=0), dict(rank=1), dict(scale=3.0), dict(basis="per_layer"),
                                    dict(targets=["attn.v"]), dict(targets=["attn.k"])])
def test_state_dict_refuses_a_model_injected_with_another_config(change):
    config = dict(rank=2, num_basis_a=6, num_basis_b=4, targets=["attn.q"], seed=1)
    source = tiny_vit()
    nv.inject(source, nv.NOLAConfig(**config))
    state = as_if_trained(source).state_dict()
    target = tiny_vit()
    as_if_trained(nv.inject(target, nv.NOLAConfig(**{**config, **change})), seed=5)
    before = copy.deepcopy(target.state_dict())
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r"blocks\.0\.attn\.qkv: the state dict's adapter tensors belong to "
                                               r"another"):
            target.load_state_dict(state, strict=strict)
        # refused before anything loaded: the head (and every other module) kept its values
        assert all(torch.equal(value, before[key]) for key, value in target.state_dict().items())


def test_state_dict_refuses_another_method_with_the_same_shapes():
    source = tiny_vit()
    nv.inject(source, nv.LoRAConfig(rank=2, targets=["attn.q"]))
    state = source.state_dict()
    target = tiny_vit()
    nv.inject(target, nv.LoRAConfig(rank=2, targets=["attn.v"]))
    with pytest.raises(RuntimeError, match=r"slices \[\[0, 64\]\] \(this model: \[\[128, 192\]\]\)"):
        target.load_state_dict(state, strict=True)


def test_state_dicts_of_the_same_config_without_the_identity_and_through_safetensors_load(tmp_path):
    config = CONFIGS["nola_shared"]
    source = tiny_vit()
    nv.inject(source, config())
    as_if_trained(source)
    with torch.no_grad():
        expected = source(_images())
    state = source.state_dict()
    assert any(key.endswith("._extra_state") for key in state)
    older = {key: value for key, value in state.items() if not key.endswith("._extra_state")}
    save_file(state, str(tmp_path / "model.safetensors"))
    for loaded in (state, older, load_file(str(tmp_path / "model.safetensors"))):
        target = tiny_vit()
        nv.inject(target, config())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            target.load_state_dict(loaded, strict=True)
        unchecked = [str(w.message) for w in caught if "without their identity entries" in str(w.message)]
        assert len(unchecked) == (loaded is older)  # loaded, but with one warning that nothing checked it
        with torch.no_grad():
            assert torch.equal(target(_images()), expected)


@pytest.mark.parametrize("partial", [False, True])
def test_adapter_tensors_without_their_identity_load_into_another_config_only_with_a_warning(partial):
    """A dict of the trainable tensors only (strict=False), or one without '_extra_state', cannot be checked against
    the model's adapter config: another seed's tensors load and give other outputs, so the load says so, once."""
    config = dict(rank=2, num_basis_a=6, num_basis_b=4, targets=["mlp.fc1", "mlp.fc2"])
    source = as_if_trained(nv.inject(tiny_vit(), nv.NOLAConfig(**config, seed=7)))
    state = {key: value for key, value in source.state_dict().items() if not key.endswith("._extra_state")}
    if partial:
        state = {name: p for name, p in source.named_parameters() if p.requires_grad}
    target = nv.inject(tiny_vit(), nv.NOLAConfig(**config, seed=0))
    with pytest.warns(UserWarning, match=r"gave 4 adapted layer\(s\) \(e\.g\. blocks\.0\.mlp\.fc1\) their adapter "
                                         r"tensors without their identity entries.*nv\.save_adapter") as caught:
        target.load_state_dict(state, strict=not partial)
    unchecked = [w for w in caught if "identity entries" in str(w.message)]
    assert len(unchecked) == 1 and unchecked[0].filename == __file__  # names the caller's load_state_dict line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        target.load_state_dict(target.state_dict())  # a full state dict: checked, no warning


def test_merge_and_unload_leaves_a_plain_timm_state_dict():
    plain = tiny_vit()
    model = _adapted("nola_shared")
    nv.merge_and_unload(model)
    assert set(model.state_dict()) == set(plain.state_dict())


def _gradients(checkpointing, views, backward):
    model = tiny_vit()
    nv.inject(model, nv.NOLAConfig(rank=2, num_basis_a=6, num_basis_b=4, targets=["mlp.fc1", "mlp.fc2"], seed=1))
    as_if_trained(model)
    model.train()
    model.set_grad_checkpointing(checkpointing)
    losses = [model(view).square().sum() for view in views]
    backward(losses)
    layers = nv.adapted_layers(model).values()
    assert all(layer.pending_passes == 0 for layer in layers), "a pass still counts as pending after its backward"
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("order", ["summed", "last_first", "first_last"])
def test_two_forward_passes_then_backward_with_gradient_checkpointing_match_without(order):
    views = [_images(seed=1), _images(seed=2) * 0.5]
    backward = {"summed": lambda losses: sum(losses).backward(),
                "last_first": lambda losses: [loss.backward() for loss in reversed(losses)],
                "first_last": lambda losses: [loss.backward() for loss in losses]}[order]
    expected = _gradients(False, views, backward)
    got = _gradients(True, views, backward)
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, rtol=1e-4, atol=1e-6), name


def _second_order_gradients(checkpointing):
    model = tiny_vit()
    for block in model.blocks:
        block.attn.fused_attn = False  # scaled_dot_product_attention has no double backward on the CPU
    nv.inject(model, nv.NOLAConfig(rank=2, num_basis_a=6, num_basis_b=4, targets=["mlp.fc1", "mlp.fc2"], seed=1))
    as_if_trained(model)
    model.train()
    model.set_grad_checkpointing(checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(model(_images()).square().sum(), params, create_graph=True)
    return torch.autograd.grad(sum(g.square().sum() for g in grads), params)


def _two_losses_on_one_pass(checkpointing):
    model = tiny_vit()
    nv.inject(model, nv.NOLAConfig(rank=2, num_basis_a=6, num_basis_b=4, targets=["mlp.fc1", "mlp.fc2"], seed=1))
    as_if_trained(model)
    model.train()
    model.set_grad_checkpointing(checkpointing)
    logits = model(_images())
    logits[:, 0].sum().backward(retain_graph=True)
    logits[:, 1].square().sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    # a new graph through the blocks, called outside the model's forward, combines its own factors: those kept
    # for the graph above have had their buffers freed by its last backward
    model.forward_head(model.forward_features(_images())).sum().backward()
    return grads


def test_two_backward_passes_through_one_kept_graph_with_gradient_checkpointing_match_without():
    """The first backward dropped the shared-basis factors, so the second one's recomputation combined its own
    and torch refused what it saved (CheckpointError: recomputed values have different metadata)."""
    expected = _two_losses_on_one_pass(False)
    for name, grad in _two_losses_on_one_pass(True).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_second_order_gradients_with_gradient_checkpointing_match_without():
    """A double backward (a gradient penalty, MAML) recomputes the blocks again after the first backward, which had
    dropped the shared-basis factors: the recomputation combined its own, and torch refused what it saved
    (CheckpointError: recomputed values have different metadata)."""
    for got, expected in zip(_second_order_gradients(True), _second_order_gradients(False)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_a_merged_model_pickled_before_snapshots_unmerges_to_the_frozen_weights():
    """A pickle of a merged layer without ``_merged_values`` (written before they were kept) unmerges as it used to,
    from its trained tensors (was: a TypeError / 'not merged' RuntimeError)."""
    import pickle

    from nola_vision.core.layer import adapted_layers

    for key in CONFIGS:
        model = _adapted(key)
        before = _weights(model)
        nv.merge(model)
        for layer in adapted_layers(model).values():
            del layer.__dict__["_merged_values"]
        restored = pickle.loads(pickle.dumps(model))
        nv.unmerge(restored)
        _assert_restored(restored, before)


@pytest.mark.parametrize("change", ["data", "bits"])
def test_factors_kept_for_a_backward_that_never_came_are_not_reused_after_data_or_bits_change(change):
    """Under gradient checkpointing a pass's factors are kept for its backward; a later no-grad pass after ``.data``
    was replaced (no version bump) or quantisation-aware bits were set must combine its own (was: the stale ones)."""
    from nola_vision.core.layer import adapted_layers

    model = tiny_vit()
    nv.inject(model, nv.NOLAConfig(rank=2, num_basis_a=8, num_basis_b=8, basis="shared"))
    as_if_trained(model, adapters_only=True, scale=2.0)
    model.set_grad_checkpointing(True)
    model.train()
    model(_images())  # its backward never comes
    if change == "data":
        for layer in adapted_layers(model).values():
            for parameter in layer.adapter_parameters().values():
                parameter.data = torch.zeros_like(parameter)
    else:
        nv.set_quantization_aware(model, 4)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(_images()), copy.deepcopy(model)(_images()), rtol=0, atol=0)


def test_factors_kept_past_their_backward_are_not_read_by_a_later_call_without_grad():
    """After a checkpointed step's backward, its factors stay for another backward through the kept graph; a write
    through ``.data`` (a hand-written update: no version bump, same storage) then ``forward_features`` without grad
    read the factors of the old coefficients (features off by 1.9)."""
    model = as_if_trained(nv.inject(tiny_vit(), CONFIGS["nola_shared"]()), adapters_only=True, scale=2.0)
    model.set_grad_checkpointing(True)
    model.train()
    model(_images()).square().sum().backward()
    with torch.no_grad():
        for layer in nv.adapted_layers(model).values():
            layer.nola_alpha.data.mul_(100.0)
    model.eval()
    with torch.no_grad():
        features = model.forward_features(_images())
        torch.testing.assert_close(features, copy.deepcopy(model).forward_features(_images()), rtol=0, atol=0)


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_files_of_a_merged_model_whose_adapter_changed_since_the_merge_are_refused(key, tmp_path):
    """An EMA or in-place edit while merged: the model computes with the values merged then, and save_adapter wrote
    the new ones, so the file loaded back with other outputs than the model gave."""
    model = _adapted(key)
    nv.merge(model)
    nv.save_adapter(model, tmp_path / "unchanged", bits=32)  # merged, unchanged: the file is what the model computes
    stepped = copy.deepcopy(model)
    with torch.no_grad():  # an EMA-sized step: within one bfloat16 step of the merged values, which a tolerance passed
        for name, parameter in stepped.named_parameters():
            if name.endswith(("nola_alpha", "nola_beta", "lora_A", "lora_B")):
                parameter.mul_(1.005)
    with pytest.raises(ValueError, match="changed since nv.merge"):
        nv.save_adapter(stepped, tmp_path / "stepped", bits=32)
    model.half()
    nv.save_adapter(model, tmp_path / "unchanged_half", bits=32)  # cast after the merge: the same values
    model.bfloat16().float()  # and back: rounded, not changed
    nv.save_adapter(model, tmp_path / "unchanged_bfloat16_float", bits=32)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith(("nola_beta", "lora_B")))[0, 0].mul_(1.01)
    for save in (lambda d: nv.save_adapter(model, d, bits=32), lambda d: nv.export_peft(model, d)):
        with pytest.raises(ValueError, match="changed since nv.merge") as error:
            save(tmp_path / "changed")
        assert "nv.unmerge(model)" in str(error.value) and not (tmp_path / "changed").exists()
    nv.unmerge(model)
    nv.save_adapter(model, tmp_path / "changed", bits=32)


def test_a_quantisation_aware_merged_model_cast_after_its_merge_is_refused_saying_why(tmp_path):
    # quantised anew on the range the cast gives them, its tensors no longer decode to the merged values, and the
    # refusal said they had changed and to "undo the change", which the user never made
    model = nv.set_quantization_aware(_adapted("lora_qv"), 8)
    nv.merge(model)
    nv.save_adapter(model, tmp_path / "as_merged", bits=8)
    model.half()
    with pytest.raises(ValueError, match=r"changed since nv.merge \(under quantisation-aware training at 8 bits a cast "
                                         r"of the model moves them too"):
        nv.save_adapter(model, tmp_path / "cast", bits=8)
    nv.unmerge(model)
    nv.save_adapter(model, tmp_path / "cast", bits=8)


def _overflowing(model, layer_name, value=300.0):
    """Set one layer's LoRA factors so large that its ΔW (rank 2 × value²) leaves float16's range."""
    layer = nv.adapted_layers(model)[layer_name]
    with torch.no_grad():
        layer.lora_A.fill_(value)
        layer.lora_B.fill_(value)


OVERFLOWING = {torch.float16: 300.0, torch.bfloat16: 1e20, torch.float32: 1e20, torch.float64: 1e160}


@pytest.mark.parametrize("dtype", OVERFLOWING, ids=str)
def test_a_merge_that_would_overflow_is_refused_and_every_weight_kept(dtype):
    # merge wrote inf into the frozen weight, and unmerge/unload could not give it back (float32, bfloat16 and
    # float64 too: finite factors whose product leaves the range, which only float16's merges were checked for)
    model = _adapted("lora_qv").to(dtype)
    _overflowing(model, "blocks.1.attn.qkv", OVERFLOWING[dtype])
    before = _weights(model)
    with pytest.raises(OverflowError, match=rf"nv.merge: blocks.1.attn.qkv: .*would leave {dtype}'s range .*; "
                                            r"no weight was changed"):
        nv.merge(model)
    assert not any(layer.merged for layer in nv.adapted_layers(model).values())
    for name, layer in nv.adapted_layers(model).items():  # blocks.0 included: checked before anything was written
        assert torch.equal(layer.weight, before[name]), name
    nv.unload(model)
    assert torch.isfinite(model.blocks[1].attn.qkv.weight).all()


@pytest.mark.parametrize("dtype", OVERFLOWING, ids=str)
def test_a_task_switch_that_would_overflow_is_refused_and_the_model_keeps_its_task(dtype):
    model = _adapted("lora_qv").to(dtype)
    nv.merge(model)
    before = _weights(model)
    parameters = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    overflowing = copy.deepcopy(model)
    nv.unmerge(overflowing)
    _overflowing(overflowing, "blocks.1.attn.qkv", OVERFLOWING[dtype])
    task = {name: p.detach().clone() for name, p in overflowing.named_parameters() if p.requires_grad}
    fix = "Switch tasks on an unmerged model" if dtype == torch.float16 else "far beyond a trained adapter's"
    with pytest.raises(OverflowError, match=r"blocks.1.attn.qkv: merging the new task's update: .* still serves its "
                                            rf"previous task, unchanged. .*{fix}"):
        switch_merged(model, task)
    assert all(torch.equal(layer.weight, before[name]) for name, layer in nv.adapted_layers(model).items())
    assert all(torch.equal(p, parameters[name]) for name, p in model.named_parameters() if p.requires_grad)
    assert all(layer.merged for layer in nv.adapted_layers(model).values())


def test_a_float16_merge_whose_scaled_factor_leaves_float16_but_whose_update_fits_is_exact(tmp_path):
    # scaling 200 makes the scaled A 2e5 (inf in float16) for a ΔW of 40: the factors cast to float16 before the
    # product wrote inf into the frozen weights, which neither unmerge nor a switch could give back
    model = nv.inject(tiny_vit(), nv.LoRAConfig(rank=2, alpha=400.0, targets=["attn.qkv"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("lora_A", "lora_B")):
                parameter.fill_(1000.0 if name.endswith("lora_A") else 1e-4)
    task = nv.save_adapter(model, tmp_path / "task")
    before, expected = _weights(model.half()), {}
    for name, layer in nv.adapted_layers(model).items():
        expected[name] = (before[name].float() + layer.get_delta_weight().float()).half()  # formed in float32
    nv.merge(model)
    for name, layer in nv.adapted_layers(model).items():
        assert torch.equal(layer.weight, expected[name]), name
    nv.load_adapter(model, task)  # a switch to the same task: the weights of a fresh merge
    nv.unmerge(model)
    assert all(torch.equal(layer.weight, before[name]) for name, layer in nv.adapted_layers(model).items())
    merged = nv.merge_and_unload(model)
    assert all(torch.isfinite(p).all() for p in merged.parameters())


def _float16_weight_near_its_largest_value():
    """A float16 LoRA model whose fc2 weight has 60000 at [0, 0] and whose ΔW adds 15 there."""
    model = nv.inject(tiny_vit(), nv.LoRAConfig(rank=1, targets=["mlp.fc2"])).half()
    layer = model.blocks[0].mlp.fc2
    with torch.no_grad():
        layer.weight[0, 0] = 60000.0
        layer.lora_A.zero_()
        layer.lora_A[0, 0, 0] = 1.0
        layer.lora_B.zero_()
        layer.lora_B[0, 0, 0] = 15.0
    return model, layer


def test_a_float16_switch_is_checked_against_the_weight_unmerge_gives_back():
    """A 16-bit switch unmerges (restoring the rounding the merge lost), then merges: near float16's largest value
    the checked one-step sum W + ΔW_new − ΔW_old (60000 + 5520 − 15 rounds to 65504) passed while the written one
    (60000 + 5520 = 65520) was inf."""
    model, layer = _float16_weight_near_its_largest_value()
    nv.merge(model)
    before = layer.weight.detach().clone()
    task = {f"{name}.lora_B": value.detach().clone() for name, layer_ in [("blocks.0.mlp.fc2", layer)]
            for value in [layer_.lora_B]}
    task["blocks.0.mlp.fc2.lora_B"][0, 0, 0] = 5520.0
    with pytest.raises(OverflowError, match=r"blocks.0.mlp.fc2: merging the new task's update"):
        switch_merged(model, task)
    assert torch.equal(layer.weight, before) and bool(torch.isfinite(layer.weight).all())


def test_a_large_16_bit_update_keeps_at_most_a_copy_of_the_weight_and_small_ones_int32_positions():
    """Each kept entry cost 10 bytes (an int64 position and its value) against the weight's 2: an update about as
    large as the weight kept three times the weight's memory."""
    model = _adapted("lora_qv").to(torch.bfloat16)
    small = copy.deepcopy(model)
    with torch.no_grad():
        for layer in nv.adapted_layers(model).values():
            for parameter in layer.adapter_parameters().values():
                parameter.mul_(30)
    before = _weights(model)
    nv.merge(model)
    nv.merge(small)
    for layer in nv.adapted_layers(model).values():
        kept = layer._rounding
        assert kept.positions is None or kept.positions.numel() * 3 <= layer.weight.numel()
        assert (0 if kept.positions is None else kept.positions.nbytes) + kept.values.nbytes <= layer.weight.nbytes
    assert any(layer._rounding.positions is None for layer in nv.adapted_layers(model).values())
    assert all(layer._rounding.positions.dtype == torch.int32 for layer in nv.adapted_layers(small).values())
    nv.unmerge(model)
    assert all(torch.equal(layer.weight, before[name]) for name, layer in nv.adapted_layers(model).items())


def test_a_float16_model_whose_weight_is_infinite_already_still_unmerges_and_unloads():
    # the overflow check blamed ΔW for an infinite weight (one an earlier version's merge wrote) and stopped
    # unmerge and unload halfway, leaving the model part-merged
    model = nv.merge(_adapted("lora_qv").half())
    with torch.no_grad():
        nv.adapted_layers(model)["blocks.0.attn.qkv"].weight[0, 0] = float("inf")
    nv.unload(model)
    assert not nv.adapted_layers(model) and torch.isfinite(model.blocks[1].attn.qkv.weight).all()


@pytest.mark.parametrize("trained_bits, model_bits", [(4, None), (4, 8), (None, 8)])
def test_a_state_dict_refuses_a_model_set_to_other_quantisation_aware_bits(trained_bits, model_bits):
    # an unmerged QAT model's state loaded into a model with other bits, silently giving other outputs
    source = _adapted("lora_qv")
    nv.set_quantization_aware(source, trained_bits)
    target = _adapted("lora_qv", seed=5)
    nv.set_quantization_aware(target, model_bits)
    trained = f"at {trained_bits} bits" if trained_bits else "at full precision"
    setting = f"{model_bits} bits" if model_bits else "full precision"
    with pytest.raises(RuntimeError, match=rf"trained .*{trained}.* this model is set to {setting}.*"
                                           rf"set_quantization_aware\(model, {trained_bits}\)"):
        target.load_state_dict(source.state_dict())
    nv.set_quantization_aware(target, trained_bits)
    target.load_state_dict(source.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(target(_images()), source(_images()), rtol=0, atol=0)


def test_a_state_dict_saved_before_the_bits_were_recorded_loads_into_a_quantisation_aware_model():
    source = _adapted("lora_qv")
    nv.set_quantization_aware(source, 8)
    state = source.state_dict()
    for key in [k for k in state if k.endswith("._extra_state")]:
        older = json.loads(bytes(state[key].tolist()).decode())
        del older["quant_bits"]
        state[key] = torch.tensor(list(json.dumps(older).encode()), dtype=torch.uint8)
    target = _adapted("lora_qv", seed=5)
    nv.set_quantization_aware(target, 8)
    target.load_state_dict(state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_model_on_the_meta_device_merges_for_its_shapes_but_its_files_are_refused_clearly(dtype, tmp_path):
    model = _adapted("nola_shared")
    nv.save_adapter(model, tmp_path / "adapter")
    model.to(device="meta", dtype=dtype)
    nv.merge(model)  # no values to fingerprint or overflow: merging only tracks state, as a meta model's shapes do
    assert all(layer.merged and layer.weight.is_meta for layer in nv.adapted_layers(model).values())
    assert model(_images().to(device="meta", dtype=dtype)).shape == (2, 5)
    nv.unmerge(model)
    with pytest.raises(ValueError, match="meta device, which holds no values"):
        nv.save_adapter(model, tmp_path / "meta")
    with pytest.raises(nv.AdapterLoadError, match="meta device.*materialize the model first") as refused:
        nv.load_adapter(model, tmp_path / "adapter")
    assert "build that wrote the adapter" not in str(refused.value)  # the fingerprint is comparable: not advised
    assert "check_frozen_weights=False" not in str(refused.value)  # which copied nothing: the values were lost
    with pytest.raises(nv.AdapterLoadError, match="meta device.*would be lost"):
        nv.load_adapter(model, tmp_path / "adapter", check_frozen_weights=False)
    with pytest.raises(nv.AdapterLoadError, match="meta device"):  # verifying only: the fingerprint cannot be read
        nv.verify_adapter(model, tmp_path / "adapter")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_merging_an_update_that_is_not_finite_is_refused_before_any_weight_changes(key, dtype):
    """A NaN coefficient (a diverged step) merged turned the whole frozen weight into NaN, which unmerge cannot undo
    (float16 blamed its range instead)."""
    model = _adapted(key).to(dtype)
    before = _weights(model)
    name, layer = list(nv.adapted_layers(model).items())[-1]
    with torch.no_grad():
        next(iter(layer.adapter_parameters().values())).view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=rf"nv.merge: {name}'s update is not finite .*no weight was changed"):
        nv.merge(model)
    assert not any(layer.merged for layer in nv.adapted_layers(model).values())
    assert all(torch.equal(layer.weight, before[n]) for n, layer in nv.adapted_layers(model).items())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_merge_and_unmerge_cycles_do_not_drift_the_frozen_weights(dtype):
    """float64's addmm_ rounded an update added then subtracted unevenly: 100 cycles moved the weights by 70 of
    their rounding steps. Now every dtype stays within about one step, however many cycles (20 here)."""
    model = _adapted("nola_shared").to(dtype)
    before = _weights(model)
    for _ in range(20):
        nv.unmerge(nv.merge(model))
    for name, layer in nv.adapted_layers(model).items():
        steps = (layer.weight - before[name]).abs().max() / (before[name].abs().max() * torch.finfo(dtype).eps)
        assert steps <= 2, f"{name}: {steps:.1f} rounding steps after 20 cycles"


class _FlagAsProperty(torch.nn.Module):
    @property
    def grad_checkpointing(self):
        return True


def test_checkpointing_modules_reads_flags_as_attributes_class_attributes_and_properties():
    from nola_vision.core.merge import checkpointing_modules

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), _FlagAsProperty(), torch.nn.Linear(2, 2))
    model[0].grad_checkpointing = True
    model[1].grad_checkpointing = 1  # timm's contract is the bool True
    type(model[3]).grad_checkpointing = False
    try:
        assert checkpointing_modules(model) == [model[0], model[2]]
    finally:
        del type(model[3]).grad_checkpointing


@pytest.mark.parametrize("key", ["lora_qv", "nola_shared"])
def test_a_training_step_without_reentrant_checkpointing_reads_only_the_checkpointing_flags_there_are(key,
                                                                                                     monkeypatch):
    import nola_vision.core.merge as merge_module

    model = _adapted(key).train()
    calls = []
    original = merge_module._checkpoints
    monkeypatch.setattr(merge_module, "_checkpoints", lambda module: calls.append(module) or original(module))
    model(_images()).sum().backward()
    # The re-entrant hooks of the model and its stem ask nothing while timm checkpoints non-reentrantly; a shared
    # basis reads the flags before and after the forward pass (its factors are kept for a checkpointed backward):
    # instance flags (timm's) from the modules' dicts, through _checkpoints only those of classes that define one.
    assert all(hasattr(type(module), "grad_checkpointing") for module in calls)
    assert key == "nola_shared" or calls == []


def _trained_values(model):
    return {f"{prefix}.{name}": value.detach().clone() for prefix, layer in nv.adapted_layers(model).items()
            for name, value in layer.adapter_parameters().items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("key", ["nola_shared", "lora_qv"])
def test_a_16_bit_merged_model_switched_many_times_holds_a_fresh_merges_weights(key, dtype):
    """Each switch was one rank-2r update rounded in the weight's dtype, and the roundings stayed: 300 switches among
    three bfloat16 tasks moved the logits by 14%, 30 by 1.5%. Now the weights are those of a fresh merge of the
    task served, bit for bit, and unmerge gives back the weights before the first merge."""
    tasks = [_trained_values(_adapted(key, seed=seed)) for seed in range(3)]
    served = _adapted(key).to(dtype)
    original = _weights(served)
    switch_merged(served, tasks[0])
    nv.merge(served)
    for i in range(1, 31):
        switch_merged(served, tasks[i % 3])  # back on task 0 after the last
    fresh = _adapted(key).to(dtype)
    switch_merged(fresh, tasks[0])
    nv.merge(fresh)
    for name, weight in _weights(fresh).items():
        assert torch.equal(nv.adapted_layers(served)[name].weight, weight), name
    nv.unmerge(served)
    for name, weight in original.items():
        assert torch.equal(nv.adapted_layers(served)[name].weight, weight), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_merge_and_unmerge_cycles_give_the_weights_back_bit_for_bit(dtype):
    model = _adapted("nola_shared").to(dtype)
    before = _weights(model)
    layer = nv.adapted_layers(model)["blocks.0.mlp.fc1"]
    with torch.no_grad():  # a ΔW larger than the weight in places, whose rounding unmerge cannot undo alone
        layer.weight[0, :4] = torch.tensor([1e-4, -3e-3, 2.0, 0.0], dtype=dtype)
    before["blocks.0.mlp.fc1"] = layer.weight.detach().clone()
    for _ in range(5):
        nv.unmerge(nv.merge(model))
    for name, layer in nv.adapted_layers(model).items():
        assert torch.equal(layer.weight, before[name]), name


def test_a_16_bit_merged_model_cast_to_float32_still_unloads_to_its_weights_bit_for_bit():
    """After a cast that lost nothing, unmerge ignored the entries the merge kept (320 entries off after unload)."""
    model = _adapted("nola_shared").to(torch.bfloat16)
    before = _weights(model)
    nv.merge(model)
    model.float()
    nv.unmerge(model)
    for name, layer in nv.adapted_layers(model).items():
        assert layer.weight.dtype == torch.float32 and torch.equal(layer.weight, before[name].float()), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("key", ["nola_shared", "lora_qv"])
def test_switches_of_a_16_bit_merge_cast_to_float32_hold_a_fresh_merges_weights(key, dtype):
    """A float32 weight took a switch as one rank-2r update and dropped the entries its 16-bit merge kept: two switches
    left every adapted weight off after unload (2.4e-4 in bfloat16). Switches now run in the merge's dtype."""
    tasks = [_trained_values(_adapted(key, seed=seed)) for seed in range(2)]
    served = _adapted(key).to(dtype)
    original = _weights(served)
    nv.merge(served)
    served.float()
    for task in (tasks[1], tasks[0], tasks[1]):
        switch_merged(served, task)
    fresh = _adapted(key).to(dtype)  # frozen weights in 16 bits, trained tensors in float32 as the served model's
    for layer in nv.adapted_layers(fresh).values():
        for parameter in layer.adapter_parameters().values():
            parameter.data = parameter.data.float()
    switch_merged(fresh, tasks[1])
    nv.merge(fresh)
    for name, weight in _weights(fresh).items():
        assert torch.equal(nv.adapted_layers(served)[name].weight, weight.float()), name
    nv.unload(served)
    for name, weight in original.items():
        layer = served.get_submodule(name)
        assert layer.weight.dtype == torch.float32 and torch.equal(layer.weight, weight.float()), name


def test_a_float16_merge_cast_to_bfloat16_switches_in_bfloat16_without_drift():
    """bfloat16 -> float16 -> bfloat16 always round-trips, so such a weight switched in float16 and was rounded back to
    bfloat16 at every switch: 200 switches moved 47 entries by up to 0.017."""
    tasks = [_trained_values(_adapted("lora_qv", seed=seed)) for seed in range(2)]
    served = _adapted("lora_qv").half()
    nv.merge(served)
    served.to(torch.bfloat16)
    switch_merged(served, tasks[1])
    reference = _weights(served)
    for i in range(20):
        switch_merged(served, tasks[i % 2])  # back on task 1 after the last
    for name, weight in reference.items():
        assert torch.equal(nv.adapted_layers(served)[name].weight, weight), name


def test_a_float16_merge_cast_to_float32_takes_a_switch_beyond_float16s_range_in_float32():
    """A switch on a float32 weight merged in float16 runs in float16, save for an update that float16 cannot hold:
    that one the float32 weight takes (nothing infinite, nothing refused)."""
    model, layer = _float16_weight_near_its_largest_value()
    original = layer.weight.detach().float()
    nv.merge(model)
    model.float()
    task = {"blocks.0.mlp.fc2.lora_B": layer.lora_B.detach().clone()}
    task["blocks.0.mlp.fc2.lora_B"][0, 0, 0] = 9000.0
    switch_merged(model, task)
    assert layer.weight.dtype == torch.float32 and bool(torch.isfinite(layer.weight).all())
    assert layer.weight[0, 0].item() == 69000.0
    nv.unload(model)
    assert torch.allclose(model.blocks[0].mlp.fc2.weight, original, rtol=0, atol=1e-6)


def test_a_16_bit_merged_model_given_its_own_state_dict_back_still_unloads_bit_for_bit():
    """Loading a merged model's own state dict dropped the entries its merge kept (177 entries off after unload)."""
    model = _adapted("nola_shared").to(torch.bfloat16)
    before = _weights(model)
    nv.merge(model)
    model.load_state_dict(model.state_dict())
    nv.unmerge(model)
    assert all(torch.equal(layer.weight, before[name]) for name, layer in nv.adapted_layers(model).items())


def test_another_merged_models_state_dict_with_the_same_adapter_values_unmerges_to_its_own_weights():
    """The same update loaded with other frozen weights kept this model's rounding entries, and unmerge wrote this
    model's old weights back over the loaded ones."""
    ours, theirs = (_adapted("lora_qv").to(torch.bfloat16) for _ in range(2))
    with torch.no_grad():
        for model in (ours, theirs):  # an update as large as the weight: the merge keeps all of it
            for layer in nv.adapted_layers(model).values():
                for parameter in layer.adapter_parameters().values():
                    parameter.mul_(30)
        for layer in nv.adapted_layers(theirs).values():  # moved by 2% of W + ΔW: four of its rounding steps
            merged_value = (layer.weight.float() + layer.get_delta_weight().float()).abs()
            layer.weight.add_((0.02 * merged_value).to(layer.weight.dtype))
    expected = _weights(theirs)
    nv.merge(ours)
    nv.merge(theirs)
    merged = _weights(theirs)
    ours.load_state_dict(theirs.state_dict())
    nv.unmerge(ours)
    for name, layer in nv.adapted_layers(ours).items():  # theirs, within a rounding step of the merged values
        error = (layer.weight.float() - expected[name].float()).abs()
        assert bool((error <= 2**-7 * merged[name].float().abs() + 1e-6).all()), name


@pytest.mark.parametrize("key", ["nola_shared", "lora_qv"])
def test_a_merged_16_bit_state_dict_loaded_into_a_fresh_model_unmerges_within_a_step(key):
    # unmerge without the merge's record subtracted in float32 what the bfloat16 merge had added with factors rounded
    # to bfloat16: NOLA entries whose rank terms cancel came back 16 steps off (a weight cast to 16 bits after a float32
    # merge still subtracts in float32: test_a_weight_cast_to_16_bits_after_a_float32_merge...)
    source = as_if_trained(nv.inject(tiny_vit(), CONFIGS[key]()), seed=0, scale=0.5, adapters_only=True)
    source = source.to(torch.bfloat16)
    before = _weights(source)
    nv.merge(source)
    merged = _weights(source)
    fresh = nv.inject(tiny_vit(), CONFIGS[key]()).to(torch.bfloat16)
    fresh.load_state_dict(source.state_dict())
    nv.unmerge(fresh)
    for name, layer in nv.adapted_layers(fresh).items():
        error = (layer.weight.float() - before[name].float()).abs()
        assert bool((error <= 2**-7 * merged[name].float().abs() + 1e-6).all()), name  # a step of the merged value


def test_a_16_bit_merged_weight_replaced_in_place_is_unmerged_without_the_kept_entries():
    """The entries a merge keeps belong to its weight: after other values were copied into the merged weight, unmerge
    subtracts ΔW from those and puts none of the old entries back."""
    model = _adapted("nola_shared").to(torch.bfloat16)
    nv.merge(model)
    name, layer = next((n, m) for n, m in nv.adapted_layers(model).items() if m._rounding.positions.numel())
    a, b = layer.merged_delta_factors()
    other = torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(other)
    nv.unmerge(model)
    expected = other.clone().addmm_(b.t().to(torch.bfloat16), -a.t().to(torch.bfloat16))
    assert torch.equal(layer.weight, expected), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_a_weight_cast_to_16_bits_after_a_float32_merge_unmerges_to_the_casts_rounding(key, dtype):
    """The kept float32 factors were rounded to 16 bits before their product was subtracted: where the rank terms
    cancel, entries ended tens to hundreds of the dtype's steps from the cast base weight (the guide: one at most)."""
    model = _adapted(key)
    with torch.no_grad():  # updates as large as the weights: the rank terms' rounding shows
        for layer in nv.adapted_layers(model).values():
            for parameter in layer.parameters():
                if parameter.requires_grad:
                    parameter.mul_(5.0)
    base = {name: layer.weight.detach().clone() for name, layer in nv.adapted_layers(model).items()}
    nv.merge(model)
    merged = {name: layer.weight.detach().clone() for name, layer in nv.adapted_layers(model).items()}
    nv.unmerge(model.to(dtype))
    for name, layer in nv.adapted_layers(model).items():
        largest = torch.maximum(base[name].abs(), merged[name].abs()).double().clamp_min(torch.finfo(dtype).tiny)
        step = torch.finfo(dtype).eps * 2 ** torch.floor(torch.log2(largest))  # the dtype's step there
        off = (layer.weight.double() - base[name].double()).abs() / step
        assert off.max() <= 1.0, f"{name}: {off.max():.1f} steps"


def test_a_merged_copy_averaged_with_an_unmerged_model_refuses_every_use():
    # timm's ModelEmaV3 copies the unmerged model's merged flag into a merged EMA and averages its weights: the EMA then
    # held part of ΔW in a state dict that said "unmerged", which loaded and unmerged without a word
    from timm.utils import ModelEmaV3

    model = _adapted("nola_shared")
    ema = ModelEmaV3(model, decay=0.5)
    nv.merge(ema.module)
    ema.module(_images())  # merged and untouched: fine
    ema.update(model)
    written = _weights(ema.module)
    for use in (lambda: ema.module(_images()), lambda: nv.unmerge(ema.module), ema.module.state_dict,
                lambda: nv.save_adapter(ema.module, "unused"), lambda: ema.update(model)):
        with pytest.raises(RuntimeError, match=r"is merged, but its adapter_merged flag was overwritten since "
                                               r"nv\.merge \(it now says unmerged\).*copy\.deepcopy\(ema\.module\)"):
            use()
    # the refused unmerge changed nothing
    assert all(layer.merged for layer in nv.adapted_layers(ema.module).values())
    assert all(torch.equal(layer.weight, written[name]) for name, layer in nv.adapted_layers(ema.module).items())

    fresh = copy.deepcopy(model)  # a merged copy of the EMA, as advised: fine, and so is the model it tracks
    ema = ModelEmaV3(model, decay=0.5)
    evaluated = nv.merge(copy.deepcopy(ema.module))
    ema.update(model)
    torch.testing.assert_close(evaluated(_images()), fresh(_images()))
    nv.unmerge(evaluated)


@pytest.mark.parametrize("copy_in", ["set", "update"])
def test_an_unmerged_copy_given_a_merged_models_buffers_refuses_every_use(copy_in):
    """timm's ModelEmaV3.set (and update) copies a merged model's flag and merged weights into the unmerged EMA: each of
    its passes added ΔW again (the flag was watched on merged layers only), and unload gave back W + ΔW as the base."""
    from timm.utils import ModelEmaV3

    model = _adapted("nola_shared")
    ema = ModelEmaV3(model, decay=0.5)
    nv.merge(model)
    getattr(ema, copy_in)(model)
    written = _weights(ema.module)
    for use in (lambda: ema.module(_images()), lambda: nv.merge(ema.module), lambda: nv.unload(ema.module),
                lambda: nv.merge_and_unload(ema.module), ema.module.state_dict,
                lambda: nv.save_adapter(ema.module, "unused")):
        with pytest.raises(RuntimeError, match=r"is unmerged, but its adapter_merged flag was overwritten since \(it "
                                               r"now says merged at full precision\).*ModelEmaV3.*add again"):
            use()
    assert nv.adapted_layers(ema.module) and not any(layer.merged for layer in nv.adapted_layers(ema.module).values())
    assert all(torch.equal(layer.weight, written[name]) for name, layer in nv.adapted_layers(ema.module).items())
    for copied in (copy.deepcopy(ema.module), pickle_round_trip(ema.module), ema.module.float()):  # noted afresh
        with pytest.raises(RuntimeError, match=r"is unmerged, but its adapter_merged flag was overwritten"):
            copied(_images())
    for layer in nv.adapted_layers(ema.module).values():  # a hand-written EMA's .data copy keeps the version:
        layer.adapter_merged.data.copy_(torch.ones_like(layer.adapter_merged))  # its value is read where it matters
    for use in (lambda: nv.unload(ema.module), lambda: nv.merge(ema.module),
                lambda: nv.save_adapter(ema.module, "unused")):
        with pytest.raises(RuntimeError, match=r"is unmerged, but its adapter_merged flag was overwritten"):
            use()

    nv.unmerge(model)  # tracking an unmerged model, as advised: the EMA gives the model's outputs
    ema = ModelEmaV3(model, decay=0.5)
    for _ in range(3):
        ema.update(model)
    torch.testing.assert_close(ema.module(_images()), model(_images()))


@pytest.mark.parametrize("key", ["lora_qv", "nola_shared"])
def test_a_state_dict_of_a_merged_layer_whose_tensors_changed_since_the_merge_is_refused(key):
    """model.load_state_dict(model.state_dict()) after an edit while merged took the new tensors as what the weight
    held: unmerge then left their difference in the frozen weights, and save_adapter accepted what it refused before."""
    model = _adapted(key)
    before = _weights(model)
    nv.merge(model)
    layer = next(iter(nv.adapted_layers(model).values()))
    with torch.no_grad():
        getattr(layer, layer.adapter_parameter_names[-1]).add_(0.5)
    with pytest.raises(ValueError, match=r"is merged, and its \w+ changed since nv\.merge.*Call nv\.unmerge\(model\) "
                                         r"first"):
        model.state_dict()
    nv.unmerge(model)  # exact: the update of the values merged
    _assert_restored(model, before)
    model.load_state_dict(model.state_dict())
    _assert_restored(model, before)


def test_a_merged_layer_keeps_working_after_moves_copies_and_loads():
    # the merged flag's version is noted afresh wherever it is a new tensor or written by the library itself
    model = nv.merge(_adapted("lora_qv"))
    out = model(_images())
    for moved in (copy.deepcopy(model), model.double().float(), pickle_round_trip(model)):
        torch.testing.assert_close(moved(_images()), out)
    other = copy.deepcopy(model)
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(other(_images()), out)
    doubled = {n: p.detach() * 2 for n, p in other.named_parameters() if p.requires_grad and "head" not in n}
    switch_merged(other, doubled)
    other(_images())
    nv.unmerge(other)


def pickle_round_trip(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_merge_refuses_a_weight_a_parametrization_computes():
    # registered after inject: ΔW was written into the computed tensor, lost, and the layer counted as merged
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, weight):
            return weight * 2

    model = _adapted("lora_qv")
    parametrize.register_parametrization(model.blocks[0].attn.qkv, "weight", Double())
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"nv\.merge: the weight of blocks\.0\.attn\.qkv is computed by a "
                                         r"parametrization .* nothing was changed"):
        nv.merge(model)
    assert not any(layer.merged for layer in nv.adapted_layers(model).values())
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def _prune(layer):
    torch.nn.utils.prune.l1_unstructured(layer, "weight", amount=0.5)


def _legacy_weight_norm(layer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated for the parametrization, still in use
        torch.nn.utils.weight_norm(layer, "weight")


@pytest.mark.parametrize("compute", [_prune, _legacy_weight_norm], ids=["prune", "legacy_weight_norm"])
@pytest.mark.parametrize("action, merged_first", [("merge", False), ("unmerge", True), ("unload", False),
                                                  ("unload", True), ("merge_and_unload", False)])
def test_a_weight_computed_before_each_call_after_inject_is_refused_before_anything_changes(compute, action,
                                                                                            merged_first):
    # prune and the legacy weight_norm keep the weight's parameter under another name and compute `weight` before each
    # call: merge wrote ΔW into the throw-away tensor (the layer counted as merged, its output the base model's),
    # unmerge left ΔW in (counted twice), and unload failed with torch's TypeError halfway, some layers given back
    model = _adapted("lora_qv")
    if merged_first:
        nv.merge(model)
    compute(model.blocks[1].attn.qkv)
    before = copy.deepcopy(model.state_dict())
    out = model(_images())
    with pytest.raises(ValueError, match=rf"nv\.{action}: the (weight|weight or bias) of blocks\.1\.attn\.qkv is no "
                                         r"parameter but computed before each call \(torch\.nn\.utils\.prune .* "
                                         r"nothing was changed\. Make it permanent first"):
        getattr(nv, action)(model)
    assert nv.adapted_layers(model) and all(layer.merged == merged_first
                                            for layer in nv.adapted_layers(model).values())
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    torch.testing.assert_close(model(_images()), out, rtol=0, atol=0)


@pytest.mark.parametrize("action", ["unload", "merge_and_unload"])
def test_a_layer_without_a_bias_unloads(action):
    # a Linear(bias=False) holds no bias parameter, which the check took for one computed before each call
    model = nv.inject(tiny_vit(qkv_bias=False), nv.LoRAConfig(rank=2, targets=["attn.qkv"]))
    out = model(_images())
    plain = getattr(nv, action)(model)
    assert not nv.adapted_layers(plain) and plain.blocks[0].attn.qkv.bias is None
    torch.testing.assert_close(plain(_images()), out)
    pruned = nv.inject(tiny_vit(qkv_bias=False), nv.LoRAConfig(rank=2, targets=["attn.qkv"]))
    _prune(pruned.blocks[0].attn.qkv)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv is no parameter but computed"):
        getattr(nv, action)(pruned)


def test_a_pruned_layer_made_permanent_merges_and_unloads():
    model = _adapted("lora_qv")
    _prune(model.blocks[1].attn.qkv)
    out = model(_images())
    torch.nn.utils.prune.remove(model.blocks[1].attn.qkv, "weight")
    torch.testing.assert_close(nv.merge(model)(_images()), out)
    plain = nv.unload(model)
    assert not nv.adapted_layers(plain) and isinstance(plain.blocks[1].attn.qkv.weight, torch.nn.Parameter)


def test_torch_jit_script_of_an_adapted_model_names_what_works():
    model = _adapted("nola_shared").eval()
    with pytest.raises(TypeError, match=r"torch\.jit\.script cannot compile NOLALinear .* nv\.merge_and_unload"):
        torch.jit.script(model)
    scripted = torch.jit.script(nv.merge_and_unload(copy.deepcopy(model)))
    torch.testing.assert_close(scripted(_images()), model(_images()))


@pytest.mark.parametrize("kind", ["nola_shared", "lora_qv"])
def test_torch_fx_tracing_of_an_adapted_model_names_what_works(kind):
    # torch.fx.symbolic_trace and timm's create_feature_extractor failed inside torch ("unpackString: expected bytes",
    # "symbolically traced variables cannot be used as inputs to control flow")
    from timm.models import create_feature_extractor

    model = _adapted(kind).eval()
    for trace in (lambda m: torch.fx.symbolic_trace(m), lambda m: create_feature_extractor(m, ["blocks.1"])):
        with pytest.raises(TypeError, match=r"torch\.fx cannot trace (NOLA|LoRA)Linear .* nv\.merge_and_unload"):
            trace(model)
    traced = torch.fx.symbolic_trace(nv.merge_and_unload(copy.deepcopy(model)))
    torch.testing.assert_close(traced(_images()), model(_images()))


def test_a_state_dict_of_adapter_tensors_and_weights_without_a_merged_flag_warns_it_is_taken_as_unmerged():
    # the earliest builds wrote no adapter_merged flag: their merged model's state dict gave ΔW twice, and the warning
    # spoke only of the identity entries
    merged = nv.merge(_adapted("lora_qv"))
    earliest = {key: value for key, value in merged.state_dict().items()
                if not key.endswith(("._extra_state", ".adapter_merged"))}
    with pytest.warns(UserWarning, match=r"without the 'adapter_merged' flag, so they were taken as unmerged: a "
                                         r"merged model's state dict of the earliest builds"):
        nv.inject(tiny_vit(), CONFIGS["lora_qv"]()).load_state_dict(earliest)
    unmerged = {key: value for key, value in _adapted("lora_qv").state_dict().items()
                if not key.endswith("._extra_state")}  # with its flag: no such warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nv.inject(tiny_vit(), CONFIGS["lora_qv"]()).load_state_dict(unmerged)
    assert not any("adapter_merged" in str(w.message) for w in caught)


@pytest.mark.parametrize("copied", [copy.deepcopy, pickle_round_trip], ids=["deepcopy", "torch_save"])
def test_a_copy_of_a_merged_model_saves_the_same_adapter_file(tmp_path, copied):
    # the record of the weights without ΔW named the original's storage: a copy fingerprinted weight − ΔW instead,
    # which rounds, and its file recorded other frozen weights (another config_sha256) than the original's
    model = _adapted("lora_qv")
    with torch.no_grad():
        for parameter in (p for p in model.parameters() if p.requires_grad):
            parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(3)))
    nv.merge(model)
    nv.save_adapter(model, tmp_path / "original")
    copy_of_it = copied(model)
    nv.save_adapter(copy_of_it, tmp_path / "copy")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "copy" / name).read_bytes() == (tmp_path / "original" / name).read_bytes()
    with torch.no_grad():  # a copy whose weight is written afterwards fingerprints weight − ΔW again
        copy_of_it.blocks[0].attn.qkv.weight.add_(1.0)
    assert copy_of_it.blocks[0].attn.qkv.unmerged_record is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("key", ["nola_shared", "lora_qv"])
def test_a_16_bit_merge_cast_to_float32_is_fingerprinted_as_its_base_weights(tmp_path, key, dtype):
    """After the cast, weight − ΔW in float64 missed the 16-bit merge's rounding and was judged at float32's tolerance:
    a switch to another task of the backbone, and the file the model saved, were refused as other frozen weights."""
    for seed in range(2):
        nv.save_adapter(_adapted(key, seed=seed), tmp_path / str(seed), bits=32)
    served = nv.load_adapter(tiny_vit().to(dtype), tmp_path / "0")
    names = list(nv.adapted_layers(served))
    base = frozen_records(served, names)
    nv.merge(served)
    served.float()
    assert frozen_records(served, names) == base
    nv.save_adapter(served, tmp_path / "again", bits=32)
    nv.load_adapter(tiny_vit(), tmp_path / "again")  # onto the float32 backbone the adapter was trained on
    nv.load_adapter(served, tmp_path / "1")  # a switch
    assert nv.adapted_layers(served)[names[0]].merged


def test_merge_and_unload_of_an_unmerged_16_bit_model_reads_its_probes_without_rebuilding_a_weight(monkeypatch,
                                                                                                     tmp_path):
    """The merge record's "before" values were read after the merge, through a copy of each whole 16-bit weight with
    ΔW taken out again; an unmerged layer's are read before it, as they are."""
    from nola_vision.core.layer import AdaptedLinear

    model = as_if_trained(nv.inject(tiny_vit().bfloat16(), CONFIGS["nola_shared"]()), 1, scale=0.1)
    base = {name: value.clone() for name, value in tiny_vit().bfloat16().state_dict().items()}
    rebuilt = []
    real = AdaptedLinear.exact_unmerged_weight
    monkeypatch.setattr(AdaptedLinear, "exact_unmerged_weight", lambda self: rebuilt.append(self) or real(self))
    nv.merge_and_unload(model)
    assert rebuilt == []
    model.load_state_dict(base)  # the base weights back: the record is dropped, as the exact values show
    monkeypatch.undo()
    nv.save_adapter(as_if_trained(nv.inject(model, CONFIGS["lora_qv"]()), 2, scale=0.1), tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["frozen_weights"]["merged"] == []
