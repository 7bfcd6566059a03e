"""An adapter belongs to the frozen weights it was trained on: other weights are refused naming the layer, a
bfloat16/float16 copy is accepted, merged adapters and a reset classifier are reported, and transfer is opt-in."""
import copy
import json
import warnings

import pytest
import timm
import torch
from tiny_models import TINY_VIT, as_if_trained, tiny_vit

import nola_vision as nv
from nola_vision.adapters.files import AdapterLoadError
from nola_vision.core.fingerprint import frozen_fingerprint
from nola_vision.core.inject import adapter_state

CONFIG = nv.NOLAConfig(rank=2, num_basis_a=16, num_basis_b=16, targets=["mlp.fc1", "attn.v"])
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def trained(seed=1, model=None, config=CONFIG):
    return as_if_trained(nv.inject(tiny_vit() if model is None else model, config), seed, scale=0.1)


def changed(model, relative, names=None, seed=0):
    """The model with its weights (or those of the modules ``names``) moved by ``relative`` of their size, as a
    fine-tune moves them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if names is None or name.rpartition(".")[0] in names:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * parameter.std() * relative)
    return model


def adapter_values(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def saved(tmp_path):
    model = trained()
    return model, nv.save_adapter(model, tmp_path / "adapter", bits=32)


@pytest.mark.parametrize("other", [
    lambda: changed(tiny_vit(), 0.1),  # a fine-tune of the same weights
    lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, **TINY_VIT),  # random init
])
def test_an_adapter_is_refused_on_other_frozen_weights_naming_the_first_layer_and_the_fix(saved, other):
    model = other()
    with pytest.raises(AdapterLoadError, match=r"frozen weights are not those the adapter was trained on: the weights "
                                               r"of blocks\.0\.mlp\.fc1 differ by about .*check_frozen_weights=False"):
        nv.load_adapter(model, saved[1])
    assert not nv.adapted_layers(model)


def test_a_random_backbone_a_run_trained_on_is_rebuilt_as_the_error_says(tmp_path):
    # an adapter of a pretrained: false run (the README's first command) named no way to rebuild its backbone: the error
    # spoke of pretrained tags and files, and create_model draws other random weights
    from nola_vision import FewShotClassifier
    from nola_vision.models import build_backbone

    kwargs = dict(patch_size=8, embed_dim=64, depth=2, num_heads=2)
    run = FewShotClassifier("vit_tiny_patch16_224", 5, nv.NOLAConfig(num_basis_a=16, num_basis_b=16),
                            pretrained=False, image_size=32, backbone_kwargs=kwargs)
    saved = nv.save_adapter(run.model, tmp_path / "adapter", bits=32)
    with pytest.raises(AdapterLoadError, match=r"nola_vision\.models\.build_backbone\(backbone, num_classes, "
                                               r"pretrained=False, backbone_seed="):
        nv.load_adapter(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32,
                                          **kwargs), saved)
    rebuilt = nv.load_adapter(build_backbone("vit_tiny_patch16_224", 5, pretrained=False, image_size=32, **kwargs),
                              saved)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(images), run.model.eval()(images))


def fine_tuned(model, steps=10, lr=1e-5):
    """The model after a few steps of full fine-tuning with Adam: each weight moves by up to ``lr`` a step, about
    0.3% of a layer's norm after 10 steps at 1e-5."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        images, labels = torch.randn(4, 3, 32, 32, generator=generator), torch.randint(5, (4,), generator=generator)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return model.requires_grad_(False)


@pytest.mark.parametrize("other", [lambda: fine_tuned(tiny_vit()), lambda: changed(tiny_vit(), 0.003),
                                   lambda: changed(tiny_vit(), 0.003, names={"norm"})],
                         ids=["adam-steps", "moved-0.3%", "head-norm-moved-0.3%"])
def test_float32_weights_a_few_fine_tuning_steps_moved_are_refused(saved, tmp_path, other):
    """Under bfloat16's tolerance (1.6% of a layer's norm), which float32 weights were held to as well, these loaded
    with outputs tens of % of the adapter's update off: float32 weights on both sides now match within 0.05%."""
    model = other()
    with pytest.raises(AdapterLoadError, match=r"differ by about 0\.\d\d% of their norm \(at the precision both "
                                               r"sides' weights are held at, rounding alone stays under 0\.05%\)"):
        nv.load_adapter(model, saved[1])
    assert not nv.adapted_layers(model)
    nv.load_adapter(copy.deepcopy(model).to(torch.bfloat16), saved[1])  # a bfloat16 copy cannot tell them from rounding
    nv.load_adapter(tiny_vit().to(torch.bfloat16).float(), saved[1])  # a bfloat16 copy of the same weights, loaded back


def bfloat16_values(model, modules=None, parameters=("weight", "bias")):
    """The model with the ``parameters`` of ``modules`` (default: all) rounded to bfloat16's values, in their dtype."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            owner, _, own = name.rpartition(".")
            if (modules is None or owner in modules) and (own in parameters or owner == ""):
                parameter.copy_(parameter.to(torch.bfloat16))
    return model


def test_copies_holding_bfloat16_values_in_any_dtype_or_in_some_modules_load(saved, tmp_path):
    """Precision is told from the values a module holds, not its dtype alone: a float64 copy of bfloat16 weights was
    held to float32's 0.05%, and refused."""
    model, directory = saved
    for copy_of_the_weights in (bfloat16_values(tiny_vit()).double(), bfloat16_values(tiny_vit(), {"blocks.0.mlp.fc1"}),
                                tiny_vit().bfloat16().half()):
        nv.load_adapter(copy_of_the_weights, directory)
    on_bfloat16_values = nv.save_adapter(trained(model=bfloat16_values(tiny_vit()).double()), tmp_path / "b")
    nv.load_adapter(tiny_vit(), on_bfloat16_values)
    with pytest.raises(AdapterLoadError, match=r"the weights of blocks\.1\.mlp\.fc1 differ"):  # the others still count
        nv.load_adapter(changed(bfloat16_values(tiny_vit(), {"blocks.0.mlp.fc1"}), 0.01, {"blocks.1.mlp.fc1"}),
                        directory)
    nv.load_adapter(bfloat16_values(tiny_vit(), parameters=("weight",)), directory)  # float32 biases beside them
    with_a_nan = tiny_vit()
    with torch.no_grad():
        with_a_nan.blocks[1].mlp.fc2.weight[0, 0] = float("nan")
    nan_saved = nv.save_adapter(trained(model=copy.deepcopy(with_a_nan)), tmp_path / "nan")
    nv.load_adapter(bfloat16_values(with_a_nan), nan_saved)  # a NaN equals nothing: it made every module float64


def test_one_module_holding_bfloat16_values_loosens_no_other_modules_check(tmp_path):
    """The file kept the coarsest precision of any module: one norm loaded from bfloat16 values let every other
    layer (and a checkpoint's every frozen module) move by 1.6%."""
    from nola_vision.train.module import FewShotClassifier

    model = bfloat16_values(tiny_vit(), {"norm"})
    directory = nv.save_adapter(trained(model=copy.deepcopy(model)), tmp_path / "a", bits=32)
    nv.load_adapter(copy.deepcopy(model), directory)
    with pytest.raises(AdapterLoadError, match=r"the weights of blocks\.0\.mlp\.fc1 differ .*under 0\.05%"):
        nv.load_adapter(changed(copy.deepcopy(model), 0.01, {"blocks.0.mlp.fc1"}), directory)
    tiny = dict(backbone="vit_tiny_patch16_224", pretrained=False, image_size=32, num_classes=4, adapter=CONFIG,
                backbone_kwargs=dict(patch_size=8, depth=2, embed_dim=64, num_heads=2))
    run = FewShotClassifier(**tiny)
    bfloat16_values(run.model, {"norm"})
    checkpoint = {"state_dict": run.state_dict()}
    run.on_save_checkpoint(checkpoint)
    moved = FewShotClassifier(**tiny)
    changed(bfloat16_values(moved.model, {"norm"}), 0.01, {"blocks.0.mlp.fc1"})
    with pytest.raises(ValueError, match=r"different frozen backbone \(the weights of blocks\.0\.mlp\.fc1 differ"):
        moved.on_load_checkpoint(copy.deepcopy(checkpoint))


def test_each_record_is_matched_at_the_precision_both_sides_hold_its_values_at(tmp_path):
    """Files kept one precision, the model's majority: a bfloat16 minority on the saving side was lost (refused on the
    float32 original), a bfloat16 majority loosened float32 layers, and the root's precision came from its position
    embedding, which its record does not hold."""
    base = tiny_vit()
    qkv = {f"blocks.{i}.attn.qkv" for i in range(2)}
    minority = nv.save_adapter(trained(model=bfloat16_values(copy.deepcopy(base), qkv)), tmp_path / "minority")
    nv.load_adapter(copy.deepcopy(base), minority)  # its qkv, a bfloat16 copy of the float32 original's
    mostly = {"patch_embed.proj", *(f"blocks.{i}.mlp.{fc}" for i in range(2) for fc in ("fc1", "fc2"))}
    majority = bfloat16_values(copy.deepcopy(base), mostly)
    saved = nv.save_adapter(trained(model=copy.deepcopy(majority)), tmp_path / "majority")
    with pytest.raises(AdapterLoadError, match=r"the weights of blocks\.0\.attn\.qkv differ .*under 0\.05%"):
        nv.load_adapter(changed(copy.deepcopy(majority), 0.01, qkv), saved)  # float32 on both sides
    positions = copy.deepcopy(base)
    with torch.no_grad():
        positions.pos_embed.copy_(positions.pos_embed.to(torch.bfloat16))
    for model, other in ((positions, base), (base, positions)):  # a position embedding loaded from bfloat16 values
        nv.load_adapter(copy.deepcopy(model), saved_at(other, tmp_path / str(id(other))))
    moved = copy.deepcopy(positions)
    with torch.no_grad():
        moved.cls_token.mul_(1.01)  # float32 on both sides: the root's record holds it, not the position embedding
    with pytest.raises(AdapterLoadError, match=r"VisionTransformer itself|frozen module \d+ of the"):
        nv.load_adapter(moved, saved_at(positions, tmp_path / str(id(positions))))


def test_a_merged_model_holding_bfloat16_values_switches_tasks_trained_on_the_float32_original(tmp_path):
    """A merged layer's precision was read from W + ΔW, plain float32: the model refused the sibling task of the one it
    had just accepted (and the same task after an unmerge, whose W + ΔW - ΔW is bfloat16 values within a rounding)."""
    base = tiny_vit()
    with torch.no_grad():  # a sampled weight far smaller than the update folded into it
        base.blocks[0].mlp.fc1.weight[0, 0] = 3e-6
    first = nv.save_adapter(trained(seed=1, model=copy.deepcopy(base)), tmp_path / "first", bits=32)
    second = nv.save_adapter(trained(seed=2, model=copy.deepcopy(base)), tmp_path / "second", bits=32)
    tasks = [first, second, *(nv.save_adapter(trained(seed=seed, model=copy.deepcopy(base)), tmp_path / str(seed),
                                              bits=32) for seed in range(3, 8))]
    served = nv.load_adapter(bfloat16_values(copy.deepcopy(base)), first)
    nv.merge(served)
    for switch in range(40):  # each switch rounds W + ΔW again: 20 of them pushed a small weight past an allowance
        nv.load_adapter(served, tasks[switch % len(tasks)])  # relative to its own size
    nv.verify_adapter(served, first)
    nv.unmerge(served)
    nv.load_adapter(served, first)
    with pytest.raises(AdapterLoadError, match=r"the weights of blocks\.0\.mlp\.fc1 differ"):  # still told apart
        nv.load_adapter(nv.merge(nv.load_adapter(changed(bfloat16_values(copy.deepcopy(base)), 0.03,
                                                         {"blocks.0.mlp.fc1"}), first, check_frozen_weights=False)),
                        second)


@pytest.mark.parametrize("unmerged", [True, False], ids=["unmerged", "merged"])
def test_a_file_saved_after_a_bfloat16_round_trip_while_merged_loads_on_the_float32_original(tmp_path, unmerged):
    # merge, bfloat16(), float(), unmerge: the weight held bfloat16's rounding off its grid (by ΔW), was fingerprinted
    # as float32 and held to float32's tolerance: the original backbone was refused as "another tag, a fine-tune"
    base = tiny_vit()
    model = nv.merge(trained(model=copy.deepcopy(base), config=nv.LoRAConfig(rank=2, targets=["attn.qkv"])))
    model.bfloat16().float()
    if unmerged:
        nv.unmerge(model)
        assert model.blocks[0].attn.qkv.cast_rounding == torch.bfloat16
    nv.save_adapter(model, tmp_path / "task", bits=32)
    nv.load_adapter(copy.deepcopy(base), tmp_path / "task")
    with pytest.raises(AdapterLoadError, match=r"the weights of blocks\.0\.attn\.qkv differ"):  # still told apart
        nv.load_adapter(changed(copy.deepcopy(base), 0.05, {"blocks.0.attn.qkv"}), tmp_path / "task")
    if unmerged:
        with torch.no_grad():
            model.blocks[0].attn.qkv.weight.copy_(base.blocks[0].attn.qkv.weight)  # other weights: no such rounding
        assert model.blocks[0].attn.qkv.cast_rounding is None
        untouched = nv.unmerge(nv.merge(trained(model=copy.deepcopy(base),
                                                config=nv.LoRAConfig(rank=2, targets=["attn.qkv"]))))
        assert untouched.blocks[0].attn.qkv.cast_rounding is None  # a float32 merge and unmerge rounds to no grid
        assert copy.deepcopy(nv.unmerge(nv.merge(model).bfloat16().float())).blocks[0].attn.qkv.cast_rounding \
            == torch.bfloat16


def test_float32_norms_near_one_do_not_pass_for_bfloat16_values(tmp_path):
    """Norm weights a few Adam steps from timm's 1.0 all lie within a bfloat16 rounding of 1.0 while held in float32: a
    rule allowing values near the bfloat16 grid matched their module at bfloat16's 1.6%, and a 1% bias change loaded."""
    model = tiny_vit()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + (torch.rand(module.weight.shape, generator=generator) - 0.5) * 2e-5)
    directory = nv.save_adapter(trained(model=copy.deepcopy(model)), tmp_path / "a", bits=32)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.norm.bias.add_(moved.norm.bias.std() * 0.3 * torch.randn(moved.norm.bias.shape, generator=generator))
    with pytest.raises(AdapterLoadError, match=r"the weights of norm differ by about .*under 0\.05%"):
        nv.load_adapter(moved, directory)


def test_one_large_weight_on_the_bfloat16_grid_does_not_make_a_float32_layer_count_as_bfloat16(tmp_path):
    """The allowance near bfloat16's values was scaled by a sample's largest value: one outlier on the grid, 1000
    times the others, let every other float32 weight of its layer move by 8%."""
    model = tiny_vit()
    with torch.no_grad():
        weight = model.blocks[0].mlp.fc1.weight
        weight.view(-1)[0] = (weight.std() * 1000).to(torch.bfloat16)  # flat position 0: always sampled
    directory = nv.save_adapter(trained(model=copy.deepcopy(model)), tmp_path / "a", bits=32)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        outlier = moved.blocks[0].mlp.fc1.weight.view(-1)[0].clone()
        changed(moved, 0.08, {"blocks.0.mlp.fc1"}).blocks[0].mlp.fc1.weight.view(-1)[0] = outlier
    with pytest.raises(AdapterLoadError, match=r"the weights of blocks\.0\.mlp\.fc1 differ .*under 0\.05%"):
        nv.load_adapter(moved, directory)


def saved_at(model, directory):
    """An adapter trained on ``model`` (a copy), saved at 32 bits into ``directory`` once."""
    return directory if directory.exists() else nv.save_adapter(trained(model=copy.deepcopy(model)), directory, bits=32)


@pytest.mark.parametrize("adapter", [CONFIG, "full"], ids=["nola", "full"])
def test_a_checkpoint_refuses_a_backbone_with_other_batch_norm_statistics(adapter):
    """Checkpoints recorded the weights only: a hybrid ViT whose batch norms ran in train mode loaded silently (a full
    fine-tune's recorded nothing, its buffers neither)."""
    from nola_vision.train.module import FewShotClassifier

    tiny = dict(backbone="vit_small_resnet26d_224", pretrained=False, image_size=32, num_classes=4, adapter=adapter,
                backbone_kwargs=dict(depth=1, embed_dim=64, num_heads=2))
    checkpoint = {"state_dict": FewShotClassifier(**tiny).state_dict()}
    FewShotClassifier(**tiny).on_save_checkpoint(checkpoint)
    FewShotClassifier(**tiny).on_load_checkpoint(copy.deepcopy(checkpoint))
    recalibrated = FewShotClassifier(**tiny)
    with torch.no_grad():
        recalibrated.model.train()(IMAGES * 3 + 1)
    recalibrated.model.eval()
    with pytest.raises(ValueError, match=r"different frozen backbone \(the running statistics of .* differ by about"):
        recalibrated.on_load_checkpoint(copy.deepcopy(checkpoint))
    del checkpoint["nola_vision"]["backbone_fingerprint"]["statistics"]  # written before statistics were recorded
    del checkpoint["nola_vision"]["record_sha256"]  # and before the record's hash
    recalibrated.on_load_checkpoint(copy.deepcopy(checkpoint))


def test_a_checkpoint_refuses_a_backbone_whose_buffers_hold_other_constants():
    """Checkpoints hold the trained tensors alone: a backbone with other constants in its persistent buffers (as a
    wrapper's normalisation) loaded silently; and a buffer edited in place since the last fingerprint is seen."""
    from nola_vision.train.module import FewShotClassifier

    def with_buffer(value):
        run = FewShotClassifier(backbone="vit_tiny_patch16_224", pretrained=False, image_size=32, num_classes=4,
                                adapter=CONFIG, backbone_kwargs=dict(depth=1, embed_dim=64, num_heads=2))
        run.model.patch_embed.register_buffer("scale", torch.full((3,), value))
        return run

    saved = with_buffer(1.0)
    checkpoint = {"state_dict": saved.state_dict()}
    saved.on_save_checkpoint(checkpoint)
    assert checkpoint["nola_vision"]["backbone_fingerprint"]["buffers"]["modules"] == 1
    with_buffer(1.0).on_load_checkpoint(copy.deepcopy(checkpoint))
    with pytest.raises(ValueError, match=r"different frozen backbone \(the buffers of patch_embed differ by"):
        with_buffer(2.0).on_load_checkpoint(copy.deepcopy(checkpoint))
    plain = FewShotClassifier(backbone="vit_tiny_patch16_224", pretrained=False, image_size=32, num_classes=4,
                              adapter=CONFIG, backbone_kwargs=dict(depth=1, embed_dim=64, num_heads=2))
    without = {"state_dict": plain.state_dict()}
    plain.on_save_checkpoint(without)  # records that its backbone held no buffers
    with pytest.raises(ValueError, match=r"0 module\(s\) of the adapter's backbone held .* and 1 here"):
        with_buffer(1.0).on_load_checkpoint(copy.deepcopy(without))
    edited = with_buffer(1.0)
    edited.on_load_checkpoint(copy.deepcopy(checkpoint))
    edited.model.patch_embed.scale.fill_(2.0)
    with pytest.raises(ValueError, match=r"the buffers of patch_embed differ by"):
        edited.on_load_checkpoint(copy.deepcopy(checkpoint))


def test_a_float16_model_is_held_to_float16s_tolerance_though_its_tiniest_values_fit_bfloat16(saved, tmp_path):
    """timm draws the class token at std 1e-6: float16 subnormals, which bfloat16 holds too, made the whole model count
    as bfloat16 (1.6% instead of 0.4%)."""
    from nola_vision.core.fingerprint import held_precision

    model = tiny_vit().half()
    with torch.no_grad():
        model.cls_token.normal_(std=1e-6)
    assert held_precision(model, [""]) == torch.finfo(torch.float16).eps
    half = nv.save_adapter(trained(model=copy.deepcopy(model)), tmp_path / "half")
    with pytest.raises(AdapterLoadError, match=r"rounding alone stays under 0\.39%"):
        nv.load_adapter(changed(copy.deepcopy(model).float(), 0.02, {"blocks.0.mlp.fc1"}), half)


def test_a_file_without_a_recorded_precision_matches_within_the_bfloat16_tolerance_as_before(saved, tmp_path):
    """Files from before 2026-12-06 record no precision: they load as they did, within 1.6% of a layer's norm."""
    from nola_vision.adapters.files import CONFIG_NAME, _document_digest

    document = json.loads((saved[1] / CONFIG_NAME).read_text())
    assert document["frozen_weights"]["precision"] == torch.finfo(torch.float32).eps
    assert set(document["frozen_weights"]["precisions"]["modules"]) == {23}  # float32's epsilon, 2⁻²³, per record
    del document["frozen_weights"]["precision"], document["frozen_weights"]["precisions"]
    document["config_sha256"] = _document_digest(document)
    (saved[1] / CONFIG_NAME).write_text(json.dumps(document))
    nv.load_adapter(changed(tiny_vit(), 0.003), saved[1])
    with pytest.raises(AdapterLoadError, match=r"differ by about .*\(a bfloat16 or float16 copy of the same weights "
                                               r"differs by under 0\.5%\)"):
        nv.load_adapter(changed(tiny_vit(), 0.1), saved[1])


@pytest.mark.parametrize("module", ["blocks.1.attn.qkv", "norm"])
def test_the_error_names_the_one_layer_whose_weights_differ(saved, module):
    with pytest.raises(AdapterLoadError, match=rf"the weights of {module} differ"):
        nv.verify_adapter(changed(tiny_vit(), 0.05, names={module}), saved[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bfloat16_and_float16_copies_of_the_same_weights_are_accepted(saved, tmp_path, dtype):
    model, directory = saved
    for copy_of_the_weights in (tiny_vit().to(dtype), tiny_vit().to(dtype).float()):
        loaded = nv.load_adapter(copy_of_the_weights, directory)
        for name, value in adapter_values(model).items():  # head values rounded to the model's dtype
            torch.testing.assert_close(loaded.get_parameter(name).float(), value, rtol=2**-8, atol=0)
    low_precision = trained(model=tiny_vit().to(dtype))  # trained on the copy, loaded onto the float32 weights
    nv.load_adapter(tiny_vit(), nv.save_adapter(low_precision, tmp_path / "low"))


def test_check_frozen_weights_false_transfers_an_adapter_on_purpose(saved):
    model, directory = saved
    other = nv.load_adapter(changed(tiny_vit(), 0.1), directory, check_frozen_weights=False)
    for name, value in adapter_values(model).items():
        assert torch.equal(other.get_parameter(name), value)
    nv.verify_adapter(changed(tiny_vit(), 0.1), directory, check_frozen_weights=False)


def test_a_task_switch_samples_each_frozen_module_once(saved, tmp_path, monkeypatch):
    """The check that the weights match and the check that the file's update is not merged in already share the
    model's records: a switch, also onto a bfloat16 copy (whose layers lie beyond the records' own rounding), samples
    no module twice."""
    from nola_vision.core import fingerprint

    model, directory = saved
    other = nv.save_adapter(trained(seed=2), tmp_path / "other", bits=32)
    sampled = []
    sample = fingerprint._module_vector
    monkeypatch.setattr(fingerprint, "_module_vector", lambda module, *args, **kwargs: (
        sampled.append((id(module), len(args), tuple(kwargs))), sample(module, *args, **kwargs))[1])
    for copy_of in (model, copy.deepcopy(model).to(torch.bfloat16)):
        for task in (other, directory):
            sampled.clear()
            nv.load_adapter(copy_of, task)
            assert sampled and len(sampled) == len(set(sampled)), "a module was sampled twice in one load"


def test_multitask_add_task_refuses_other_frozen_weights_unless_told(saved):
    server = nv.MultiTaskModel(changed(tiny_vit(), 0.1))
    with pytest.raises(AdapterLoadError, match=r"task 'a' .*weights of blocks\.0\.mlp\.fc1 differ"):
        server.add_task("a", saved[1])
    assert server.tasks == []
    server.add_task("a", saved[1], check_frozen_weights=False)
    assert server.tasks == ["a"]


def test_loading_an_adapter_again_after_merge_and_unload_is_refused_instead_of_applied_twice(saved):
    model, directory = saved
    merged = nv.merge_and_unload(model)
    weights = {name: p.detach().clone() for name, p in merged.named_parameters()}
    with pytest.raises(AdapterLoadError, match=r"weights hold 1 adapter\(s\) folded in by nv\.merge_and_unload \(a "
                                               r"'nola' adapter on blocks\.0\.attn\.qkv.*unmerged base.*nv\.unload"):
        nv.load_adapter(merged, directory)
    assert not nv.adapted_layers(merged)
    assert all(torch.equal(p, weights[name]) for name, p in merged.named_parameters())
    with pytest.raises(AdapterLoadError, match="merge_and_unload"):
        nv.MultiTaskModel(copy.deepcopy(merged)).add_task("again", directory)
    nv.load_adapter(merged, directory, check_frozen_weights=False)  # stacking it on purpose


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_merge_record_follows_the_weights_loaded_back_into_a_merged_model(saved, tmp_path, images, dtype):
    """merge_and_unload's record outlived the weights: with the base weights loaded back (load_state_dict), the
    adapter merged before was still refused as folded in, and an adapter trained then recorded a merge its weights did
    not hold. The record now holds while the weights are the merged ones, and is dropped once they are the base's."""
    model, directory = saved
    model = model.to(dtype)
    base = {name: value.clone() for name, value in nv.unload(copy.deepcopy(model)).state_dict().items()}
    merged = nv.merge_and_unload(model)
    merged_state = {name: value.clone() for name, value in merged.state_dict().items()}
    copied = copy.deepcopy(merged)
    merged.load_state_dict(base)
    assert nv.core.fingerprint.merged_adapters(merged) == []
    expected = nv.load_adapter(tiny_vit().to(dtype), directory)(images.to(dtype))
    torch.testing.assert_close(nv.load_adapter(merged, directory)(images.to(dtype)), expected, rtol=0, atol=0)
    nv.unload(merged)
    merged.load_state_dict(merged_state)  # the merged weights again: the record holds again
    for holding in (merged, copied):
        with pytest.raises(AdapterLoadError, match=r"weights hold 1 adapter\(s\) folded in by nv\.merge_and_unload"):
            nv.load_adapter(holding, directory)
    merged.load_state_dict(base)
    second = nv.save_adapter(trained(seed=2, model=merged, config=nv.LoRAConfig(rank=2)), tmp_path / "second")
    nv.load_adapter(tiny_vit().to(dtype), second)  # trained on the base weights: it records no merge
    merged = nv.merge_and_unload(merged)  # a merge after the undone one records itself alone
    assert [entry["method"] for entry in nv.core.fingerprint.merged_adapters(merged)] == ["lora"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_loaded_back_from_between_two_merges_keep_the_first_merges_record_alone(saved, tmp_path, dtype):
    """The record was dropped only for the weights from before the first merge: weights saved between two merges and
    loaded back kept both entries, so an adapter trained on them was refused as trained on other weights."""
    model, directory = saved
    first = nv.merge_and_unload(model.to(dtype))
    between = {name: value.clone() for name, value in first.state_dict().items()}
    second = nv.merge_and_unload(trained(seed=2, model=first, config=nv.LoRAConfig(rank=2)))
    after = {name: value.clone() for name, value in second.state_dict().items()}
    assert [entry["method"] for entry in nv.core.fingerprint.merged_adapters(second)] == ["nola", "lora"]
    second.load_state_dict(between)
    assert [entry["method"] for entry in nv.core.fingerprint.merged_adapters(second)] == ["nola"]
    third = nv.save_adapter(trained(seed=3, model=second, config=nv.LoRAConfig(rank=2)), tmp_path / "third")
    holder = tiny_vit().to(dtype)
    holder.load_state_dict(between)  # no record: the weights alone
    with pytest.raises(AdapterLoadError, match=r"trained on weights with 1 adapter\(s\) folded in"):
        nv.load_adapter(holder, third)  # the file records the first merge, as its weights hold it
    nv.unload(second)
    second.load_state_dict(after)  # the weights after both merges: both are held again
    assert [entry["method"] for entry in nv.core.fingerprint.merged_adapters(second)] == ["nola", "lora"]
    merged = nv.merge_and_unload(trained(seed=4, model=second, config=nv.LoRAConfig(rank=2)))
    merged.load_state_dict(between)  # three merges recorded, the weights from after the first
    assert [entry["method"] for entry in nv.core.fingerprint.merged_adapters(merged)] == ["nola"]


@pytest.mark.parametrize("owner", ["blocks.0.attn.proj", "blocks.0.mlp.fc1"])
def test_a_checkpoint_checks_the_buffers_of_modules_with_weights_of_their_own_but_adapted_layers(owner):
    """Checkpoints left out the buffers of every module recorded by name, every one with a frozen weight: a run
    loaded silently onto a frozen projection with another gain. An adapted layer's are left out (inject drops them)."""
    from nola_vision.train.module import FewShotClassifier

    def with_buffer(value):
        run = FewShotClassifier(backbone="vit_tiny_patch16_224", pretrained=False, image_size=32, num_classes=4,
                                adapter=CONFIG, backbone_kwargs=dict(depth=1, embed_dim=64, num_heads=2))
        run.model.get_submodule(owner).register_buffer("gain", torch.full((3,), value))
        return run

    saved = with_buffer(1.0)
    checkpoint = {"state_dict": saved.state_dict()}
    saved.on_save_checkpoint(checkpoint)
    adapted = owner == "blocks.0.mlp.fc1"
    assert checkpoint["nola_vision"]["backbone_fingerprint"]["buffers"]["modules"] == (0 if adapted else 1)
    with_buffer(1.0).on_load_checkpoint(copy.deepcopy(checkpoint))
    if adapted:
        with_buffer(3.0).on_load_checkpoint(copy.deepcopy(checkpoint))
    else:
        with pytest.raises(ValueError, match=rf"the buffers of {owner} differ by"):
            with_buffer(3.0).on_load_checkpoint(copy.deepcopy(checkpoint))


def test_merges_recorded_by_an_earlier_version_without_probes_of_their_own_are_held(saved, tmp_path):
    """A model merged twice by an earlier version kept one dict of probes for both merges: merged again, and given
    its own weights from after the second merge, it was judged back before the second (no probes said so)."""
    from nola_vision.core.fingerprint import MERGED_PROBES_ATTRIBUTE, merged_adapters

    first = nv.merge_and_unload(saved[0])
    second = nv.merge_and_unload(trained(seed=2, model=first, config=nv.LoRAConfig(rank=2)))
    after = {name: value.clone() for name, value in second.state_dict().items()}
    earlier = {}  # as such a version kept them: each layer's values before its first merge and after its last
    for probes in getattr(second, MERGED_PROBES_ATTRIBUTE):
        for name, (positions, before, merged) in probes.items():
            earlier[name] = (positions, earlier[name][1] if name in earlier else before, merged)
    setattr(second, MERGED_PROBES_ATTRIBUTE, earlier)
    third = nv.merge_and_unload(trained(seed=3, model=second, config=nv.LoRAConfig(rank=2)))
    third.load_state_dict(after)
    assert [entry["method"] for entry in merged_adapters(third)] == ["nola", "lora"]


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_the_merge_record_is_dropped_for_base_weights_loaded_back_from_a_half_precision_copy(saved, half):
    """The base weights loaded from a bfloat16 checkpoint lie a rounding of that type off those recorded: the record
    was kept, and the adapter refused as folded in, while a fresh model given the same state dict took it."""
    model, directory = saved
    base = {name: value.to(half) for name, value in nv.unload(copy.deepcopy(model)).state_dict().items()}
    merged = nv.merge_and_unload(model)
    merged.load_state_dict(base)
    assert nv.core.fingerprint.merged_adapters(merged) == []
    nv.load_adapter(merged, directory)


def test_an_adapter_trained_on_merged_weights_loads_onto_them_and_not_onto_the_base(saved, tmp_path):
    merged = nv.merge_and_unload(saved[0])
    base = copy.deepcopy(merged)
    second = nv.save_adapter(trained(seed=2, model=merged, config=nv.LoRAConfig(rank=2)), tmp_path / "second")
    nv.load_adapter(base, second)
    with pytest.raises(AdapterLoadError, match=r"trained on weights with 1 adapter\(s\) folded in .*records none"):
        nv.load_adapter(tiny_vit(), second)  # the base, whose weights the first adapter's small update hardly moved
    nv.load_adapter(tiny_vit(), second, check_frozen_weights=False)


def test_a_live_merged_model_switching_tasks_is_checked_against_its_unmerged_weights(saved, tmp_path):
    other = nv.save_adapter(trained(seed=2), tmp_path / "other")
    live = nv.merge(trained(seed=3))
    nv.load_adapter(live, other)
    nv.load_adapter(live, saved[1])
    assert all(layer.merged for layer in nv.adapted_layers(live).values())
    state = live.state_dict()  # merged weights: a fresh model loading them has no record of the unmerged weights
    restored = nv.inject(tiny_vit(), CONFIG)
    restored.load_state_dict(state)
    nv.load_adapter(restored, other)
    elsewhere = nv.inject(changed(tiny_vit(), 0.1), CONFIG)
    elsewhere.load_state_dict({k: v for k, v in nv.merge(changed(trained(seed=3), 0.1)).state_dict().items()})
    with pytest.raises(AdapterLoadError, match=r"blocks\.0\.mlp\.fc1 differ"):
        nv.load_adapter(elsewhere, other)


def test_reset_classifier_after_inject_is_reported_at_save_and_load(saved, tmp_path):
    model = nv.inject(tiny_vit(), CONFIG)
    model.reset_classifier(10)
    with pytest.raises(ValueError, match=r"classifier head changed after inject \(model\.reset_classifier\? .*"
                                         r"Re-inject.*save the adapter from the adapted model"):
        nv.save_adapter(model, tmp_path / "reset")
    ten_classes = nv.save_adapter(trained(model=tiny_vit(num_classes=10)), tmp_path / "ten")
    for directory in (saved[1], ten_classes):
        with pytest.raises(AdapterLoadError, match=r"classifier head changed after inject.*Re-inject"):
            nv.load_adapter(model, directory)


@pytest.mark.parametrize("config", ["linear", CONFIG, nv.LoRAConfig(rank=2, targets=["attn.qkv"])],
                         ids=["linear", "nola", "lora"])
def test_a_head_reset_to_the_same_size_after_quantisation_aware_training_is_refused_until_set_again(tmp_path,
                                                                                                     config, images):
    # set_quantization_aware hooks the head module: reset_classifier(n) put in a new one, which trained and ran at
    # full precision, while the file, a peft export and merge_and_unload kept it at 8 bits (0.005 off the model)
    model = as_if_trained(nv.inject(tiny_vit(), config), 0, 1.0)
    nv.set_quantization_aware(model, 4)
    model.reset_classifier(model.num_classes)
    actions = {"save_adapter": lambda: nv.save_adapter(model, tmp_path / "a", bits=4),
               "merge_and_unload": lambda: nv.merge_and_unload(model)}
    if config != "linear":
        actions["export_peft"] = lambda: nv.export_peft(model, tmp_path / "peft")
    for action, call in actions.items():
        with pytest.raises(ValueError, match=rf"nv\.{action}: the classifier head was replaced after "
                                             r"nv\.set_quantization_aware\(model, 4\) .*at full precision.* Call "
                                             r"nv\.set_quantization_aware\(model, 4\) again after replacing the "
                                             r"head, before training it"):
            call()
    assert not (tmp_path / "a").exists() and adapter_state(model) is not None
    nv.set_quantization_aware(model, 4)  # as the message says: the new head at the stored width
    nv.save_adapter(model, tmp_path / "a", bits=4)
    loaded = nv.load_adapter(tiny_vit(), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images), model.eval()(images), atol=1e-5, rtol=0)
    model.reset_classifier(model.num_classes)
    for check in (nv.load_adapter, nv.verify_adapter):
        with pytest.raises(AdapterLoadError, match=r"^the classifier head was replaced .*before training it"):
            check(model, tmp_path / "a")


def test_a_quantisation_aware_model_pickled_with_the_earlier_head_hook_is_not_taken_for_a_replaced_head(tmp_path,
                                                                                                         images):
    # models pickled from 2026-11-30 to 12-03 carry partial(_quantized_head, bits), registered without kwargs
    import functools
    import pickle

    from nola_vision.core import inject

    model = as_if_trained(nv.inject(tiny_vit(), CONFIG), 0, 1.0)
    nv.set_quantization_aware(model, 4)
    state = adapter_state(model)
    for hook in state.quantized_head:
        hook.remove()
    state.quantized_head = [model.head.register_forward_hook(functools.partial(inject._quantized_head, 8))]
    old = pickle.loads(pickle.dumps(model))
    nv.save_adapter(old, tmp_path / "a", bits=4)  # refused as "the classifier head was replaced"
    loaded = nv.load_adapter(tiny_vit(), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images), old.eval()(images), atol=1e-5, rtol=0)


def test_a_head_quantised_or_normalised_after_inject_is_named_as_a_possible_cause(tmp_path):
    # its message named only reset_classifier, and showed a quantised head's parameters as "{}"
    model = nv.inject(tiny_vit(), CONFIG)
    quantised = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, inplace=False)
    with pytest.raises(ValueError, match=r"weight_norm, spectral_norm, prune or quantize_dynamic applied to it.*"
                                         r"it has no parameters, the adapters were injected with \{'head\.weight'"):
        nv.save_adapter(quantised, tmp_path / "quantised")


def test_a_checkpoint_refuses_other_frozen_weights_naming_them_and_accepts_a_bfloat16_copy():
    from nola_vision.train.module import FewShotClassifier

    tiny = dict(backbone="vit_tiny_patch16_224", pretrained=False, image_size=32, num_classes=4, adapter=CONFIG,
                backbone_kwargs=dict(patch_size=8, depth=2, embed_dim=64, num_heads=2))
    checkpoint = {"state_dict": FewShotClassifier(**tiny).state_dict()}
    FewShotClassifier(**tiny).on_save_checkpoint(checkpoint)
    with pytest.raises(ValueError, match=r"different frozen backbone \(the weights of VisionTransformer itself differ "
                                         r"by about .*backbone_seed"):
        FewShotClassifier(**tiny, backbone_seed=1).on_load_checkpoint(copy.deepcopy(checkpoint))
    in_bfloat16 = FewShotClassifier(**tiny)
    in_bfloat16.model.to(torch.bfloat16)
    in_bfloat16.on_load_checkpoint(copy.deepcopy(checkpoint))
    moved = FewShotClassifier(**tiny)
    changed(moved.model, 0.003, names={"blocks.1.mlp.fc2"})  # float32 on both sides: 0.3% is no rounding
    with pytest.raises(ValueError, match=r"different frozen backbone \(the weights of blocks\.1\.mlp\.fc2 differ"):
        moved.on_load_checkpoint(copy.deepcopy(checkpoint))
    # Checkpoints before 2026-11-30 record an exact hash: checked where it matches, told where it does not
    from nola_vision.train.module import _exact_backbone_hash

    run = FewShotClassifier(**tiny)
    checkpoint["nola_vision"]["backbone_fingerprint"] = _exact_backbone_hash(run.model)
    checkpoint["nola_vision"].pop("record_sha256")  # nor was the record's hash
    assert checkpoint["nola_vision"]["backbone_fingerprint"] == _exact_backbone_hash(FewShotClassifier(**tiny).model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run.on_load_checkpoint(copy.deepcopy(checkpoint))
    with pytest.warns(UserWarning, match=r"records its frozen backbone as an exact hash .*which this backbone does "
                                         "not give"):
        FewShotClassifier(**tiny, backbone_seed=1).on_load_checkpoint(copy.deepcopy(checkpoint))


def test_the_fingerprint_of_fixed_weights_is_the_same_in_every_release_of_its_version():
    """Saved adapters hold these numbers: another sample, other signs or other rounding needs a new version."""
    layer = torch.nn.Linear(300, 200)  # 60,000 weights: sampled; 200 biases: all of them
    with torch.no_grad():
        layer.weight.copy_((torch.arange(60000) % 7 - 3).view(200, 300) / 4)
        layer.bias.copy_((torch.arange(200) % 5 - 2) / 8)
    assert frozen_fingerprint(torch.nn.Sequential(layer), ["0"]) == {
        "version": "sample16384-sign8-float64-v1",
        "modules": {"0": [64.062, -30.5, 21.25, 9.5, -82.25, -78.5, -36.0, 31.25, 47.25]},
        "merged": [],
        "precision": 2**-7,  # quarters and eighths: values bfloat16 holds exactly, so matched as a bfloat16 copy's
        "precisions": {"modules": [7]},  # the same, per record: 2⁻⁷
    }


def test_an_adapter_is_refused_on_a_model_that_pools_its_tokens_otherwise(tmp_path):
    # Pooling changes every output without changing a weight (avg pooling without fc_norm adds none), so only the
    # recorded setting tells the two models apart: served under token pooling, the logits moved by more than their size.
    trained = as_if_trained(nv.inject(tiny_vit(global_pool="avg", fc_norm=False), nv.LoRAConfig()), 0, scale=0.2)
    directory = nv.save_adapter(trained, tmp_path / "avg")
    with pytest.raises(AdapterLoadError, match=r"global_pool='avg'.*global_pool='token'"):
        nv.load_adapter(tiny_vit(), directory)
    with pytest.raises(AdapterLoadError, match=r"global_pool='avg'"):
        nv.MultiTaskModel(tiny_vit()).add_task("avg", directory)
    nv.load_adapter(tiny_vit(global_pool="avg", fc_norm=False), directory)


def test_a_linear_probe_is_refused_on_another_random_init_whose_norms_are_the_same(tmp_path):
    # timm sets every norm of a random init to ones and zeros: the head's input norm alone cannot tell two inits apart
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, **TINY_VIT)
    trained = as_if_trained(nv.inject(copy.deepcopy(model), "linear"), 0, scale=0.2)
    directory = nv.save_adapter(trained, tmp_path / "probe")
    torch.manual_seed(1)
    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, **TINY_VIT)
    with pytest.raises(AdapterLoadError, match=r"the weights of patch_embed\.proj differ"):
        nv.load_adapter(other, directory)
    nv.load_adapter(model, directory)


@pytest.mark.parametrize("other, message", [
    (dict(num_heads=4), r"attention layers have 2 heads, this model's have 4.*num_heads=2"),
    (dict(act_layer="gelu_tanh"), r"activations \['GELU'\], this model has \['GELUTanh'\]"),
])
def test_an_adapter_is_refused_on_a_model_with_other_heads_or_activations_and_the_same_weights(tmp_path, other,
                                                                                               message):
    # Neither setting changes a weight: only the recorded settings tell the models apart
    directory = nv.save_adapter(trained(), tmp_path / "adapter")
    model = tiny_vit(**other)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny_vit().state_dict().values()))
    with pytest.raises(AdapterLoadError, match=message):
        nv.load_adapter(model, directory)
    with pytest.raises(AdapterLoadError, match=message):
        nv.MultiTaskModel(tiny_vit(**other)).add_task("other", directory)


# ---- frozen modules outside the adapted layers (the context records) ------------------------------------------
@pytest.mark.parametrize("module", ["patch_embed.proj", "blocks.0.attn.proj", "blocks.1.norm1"])
def test_other_frozen_modules_than_the_adapted_ones_are_refused_naming_them(saved, module):
    # CONFIG adapts mlp.fc1 and attn.v only: these modules are recorded as context, not by name
    assert module not in nv.adapted_layers(saved[0])
    other = changed(tiny_vit(), 0.05, names={module})
    with pytest.raises(AdapterLoadError, match=rf"the weights of {module} differ by about"):
        nv.load_adapter(other, saved[1])
    assert not nv.adapted_layers(other)
    with pytest.raises(AdapterLoadError, match=rf"the weights of {module} differ"):
        nv.MultiTaskModel(changed(tiny_vit(), 0.05, names={module})).add_task("other", saved[1])
    nv.load_adapter(changed(tiny_vit(), 0.05, names={module}), saved[1], check_frozen_weights=False)


def test_a_changed_class_token_is_refused_while_the_position_embedding_is_left_to_the_input_size(saved):
    other = tiny_vit()
    with torch.no_grad():
        other.cls_token.mul_(1.5)
    with pytest.raises(AdapterLoadError, match=r"the weights of VisionTransformer itself differ"):
        nv.load_adapter(other, saved[1])


def with_complex_filter(imaginary: float) -> torch.nn.Module:
    """A tiny ViT with a frozen complex parameter (a spectral filter, as in FFT-mixing backbones)."""
    model = tiny_vit()
    model.spectral = torch.nn.Module()
    values = torch.complex(torch.ones(8, 5), torch.full((8, 5), imaginary))
    model.spectral.weight = torch.nn.Parameter(values, requires_grad=False)
    return model


def test_frozen_complex_weights_that_differ_in_their_imaginary_parts_are_refused(tmp_path):
    """A complex weight's imaginary parts were dropped from its fingerprint (with a cast warning), so weights that
    differ there matched."""
    directory = nv.save_adapter(trained(model=with_complex_filter(1.0)), tmp_path / "adapter", bits=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same weights load, without a warning
        nv.load_adapter(with_complex_filter(1.0), directory)
    with pytest.raises(AdapterLoadError, match=r"the weights of spectral differ by about"):
        nv.load_adapter(with_complex_filter(-1.0), directory)


def resized(model, **kwargs):
    """``model``'s weights in a tiny ViT built with ``kwargs``: the patch embedding and position embedding resampled
    as timm does for pretrained weights at another patch or input size."""
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    other = tiny_vit(**kwargs)
    state = model.state_dict()
    state["patch_embed.proj.weight"] = resample_patch_embed(state["patch_embed.proj.weight"],
                                                            list(other.patch_embed.patch_size))
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(other.patch_embed.grid_size),
                                                num_prefix_tokens=1)
    other.load_state_dict(state)
    return other


def test_a_model_resampled_to_another_patch_size_is_refused_and_another_input_size_loads(tmp_path):
    base = tiny_vit(dynamic_img_size=True)
    model = trained(model=copy.deepcopy(base))
    directory = nv.save_adapter(model, tmp_path / "adapter", bits=32)
    other_patch = resized(base, dynamic_img_size=True, patch_size=4)
    assert not torch.allclose(nv.load_adapter(copy.deepcopy(other_patch), directory, check_frozen_weights=False)(
        IMAGES), model(IMAGES), atol=1e-3)  # what the refusal prevents: other outputs
    with pytest.raises(AdapterLoadError, match=r"the weights of patch_embed\.proj differ"):
        nv.load_adapter(other_patch, directory)
    larger = nv.load_adapter(resized(base, dynamic_img_size=True, img_size=48), directory)  # pos_embed resized
    for name, value in adapter_values(model).items():
        assert torch.equal(larger.get_parameter(name), value)


def test_files_record_the_other_frozen_modules_compactly_and_older_files_without_them_load(tmp_path):
    import json

    from nola_vision.adapters import files as adapter_io
    from nola_vision.core.fingerprint import context_modules

    model = trained()
    directory = nv.save_adapter(model, tmp_path / "adapter", bits=32)
    path = directory / "adapter_config.json"
    document = json.loads(path.read_text())
    context = document["frozen_weights"]["context"]
    names = context_modules(tiny_vit(), list(document["frozen_weights"]["modules"]))
    assert context["modules"] == len(names) and {"patch_embed.proj", ""} <= set(names)  # "": the class token
    assert len(context["records"]) == -(-context["modules"] * 24 // 3) * 4  # base64 of 24 bytes a module
    del document["frozen_weights"]["context"]  # as written before the context records
    document["config_sha256"] = adapter_io._document_digest(document)
    path.write_text(json.dumps(document))
    nv.load_adapter(changed(tiny_vit(), 0.05, names={"blocks.0.attn.proj"}), directory)  # checked on what it holds
    for records in ("not base64!", context["records"][:-8]):
        document["frozen_weights"]["context"] = {**context, "records": records}
        document["config_sha256"] = adapter_io._document_digest(document)
        path.write_text(json.dumps(document))
        with pytest.raises(AdapterLoadError, match=r"field 'frozen_weights' must be .*\"context\""):
            nv.load_adapter(tiny_vit(), directory)


@pytest.mark.parametrize("edit", [lambda p: p.mul_(10), lambda p: p.add_(0.05 * torch.randn_like(p))])
def test_other_position_embeddings_at_the_same_size_are_refused_and_older_files_load(tmp_path, edit):
    # position embeddings were left out to let another input size load: at the same size a changed pos_embed loaded
    # silently (logits moved by up to 2)
    import json

    from nola_vision.adapters import files as adapter_io

    model = trained()
    directory = nv.save_adapter(model, tmp_path / "adapter", bits=32)
    other = tiny_vit()
    torch.manual_seed(0)
    with torch.no_grad():
        edit(other.pos_embed)
    with pytest.raises(AdapterLoadError, match=r"the weights of pos_embed differ by about"):
        nv.load_adapter(copy.deepcopy(other), directory)
    with pytest.raises(AdapterLoadError, match=r"the weights of pos_embed differ"):
        nv.MultiTaskModel(copy.deepcopy(other)).add_task("a", directory)
    document = json.loads((directory / "adapter_config.json").read_text())
    assert list(document["frozen_weights"]["positions"]) == ["pos_embed"]
    assert document["frozen_weights"]["positions"]["pos_embed"]["shape"] == list(other.pos_embed.shape)
    del document["frozen_weights"]["positions"]  # as written before 2026-12-04: not recorded, not checked
    document["config_sha256"] = adapter_io._document_digest(document)
    (directory / "adapter_config.json").write_text(json.dumps(document))
    nv.load_adapter(copy.deepcopy(other), directory)
    document["frozen_weights"]["positions"] = {"pos_embed": {"shape": [1, 17, 64], "record": [1.0]}}
    document["config_sha256"] = adapter_io._document_digest(document)
    (directory / "adapter_config.json").write_text(json.dumps(document))
    with pytest.raises(AdapterLoadError, match=r"field 'frozen_weights' must be .*\"positions\""):
        nv.load_adapter(tiny_vit(), directory)


def test_a_task_input_graph_of_other_position_embeddings_is_refused(tmp_path):
    pytest.importorskip("onnxruntime")
    task = nv.save_adapter(trained(), tmp_path / "task", bits=32)
    other = nv.load_adapter(tiny_vit(), task)
    with torch.no_grad():
        other.pos_embed.mul_(10)
    graph = nv.export_onnx(other, tmp_path / "tasks.onnx", tasks_as_inputs=True)
    with pytest.raises(AdapterLoadError, match=r"the graph's frozen weights are not those the task was trained on: "
                                               r"the weights of pos_embed differ"):
        nv.onnx_task_inputs(task, graph)
