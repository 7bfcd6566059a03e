"""MultiTaskModel: caching, registration, dtype and errors. That a mixed-task batch equals each task's own model,
for every registered method, is checked by the method matrix (test_methods.py)."""
import copy
import json

import pytest
import timm
import torch
from tiny_models import TINY_VIT, as_if_trained, tiny_vit

import nola_vision as nv
from nola_vision.adapters import files as adapter_io
from nola_vision.adapters.files import read_adapter

# The served tasks of the tests below, name: (config, class count): NOLA-MLP, NOLA on q/v slices, LoRA on q/v with
# another class count, per-layer NOLA bases on the k slice and attn.proj, and a linear probe; the tests name them
# (which layers each hooks, which are cached). NOLA's scale makes each update move the logits well above 1e-4.
TASKS = {
    "nola_mlp": (nv.NOLAConfig(rank=4, num_basis_a=32, num_basis_b=32, targets=["mlp.fc1", "mlp.fc2"],
                               scale=40.0), 5),
    "nola_qv": (nv.NOLAConfig(rank=2, num_basis_a=16, num_basis_b=24, targets=["attn.q", "attn.v"], seed=3,
                              scale=40.0), 5),
    "lora_qv": (nv.LoRAConfig(rank=4, targets=["attn.q", "attn.v"]), 7),
    "nola_per_layer": (nv.NOLAConfig(rank=2, num_basis_a=8, num_basis_b=8, basis="per_layer",
                                     targets=["attn.k", "attn.proj"], scale=40.0), 3),
    "head_only": ("linear", 4),
}


def trained(config, num_classes: int, seed: int, model=None) -> torch.nn.Module:
    """An injected tiny ViT whose adapter tensors and head hold random values, as after training."""
    return as_if_trained(nv.inject(model if model is not None else tiny_vit(num_classes=num_classes), config), seed,
                         scale=0.2)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    return {name: nv.save_adapter(trained(config, classes, seed), root / name)
            for seed, (name, (config, classes)) in enumerate(TASKS.items())}


def served(adapters, **kwargs) -> nv.MultiTaskModel:
    model = nv.MultiTaskModel(tiny_vit(), **kwargs)
    for name, directory in adapters.items():
        model.add_task(name, directory)
    return model


def merged_logits(directory, num_classes: int, images: torch.Tensor) -> torch.Tensor:
    """What the task's own model gives: its adapter loaded onto a fresh backbone and merged."""
    with torch.no_grad():
        return nv.merge(nv.load_adapter(tiny_vit(num_classes=num_classes), directory))(images)


def test_a_single_task_batch_and_an_uncached_model_give_the_same_logits(adapters, images):
    reference = merged_logits(adapters["lora_qv"], 7, images)
    for cache_mb in (256, 0):
        model = served(adapters, cache_mb=cache_mb)
        logits = torch.stack(model(images, "lora_qv"))
        assert (logits - reference).abs().max() <= 1e-4
        assert model.cached_tasks == ([] if cache_mb == 0 else ["lora_qv"])


def test_cache_keeps_the_most_recently_used_tasks_within_its_budget(adapters, images):
    model = served(adapters)
    model(images, "nola_mlp")
    model(images, "lora_qv")
    both = model.memory_bytes()["cache"]
    model(images, "nola_mlp")
    assert model.cached_tasks == ["lora_qv", "nola_mlp"]
    model.cache_mb = (both - 1) / 2**20
    model(images[:1], "nola_mlp")
    assert model.cached_tasks == ["nola_mlp"]
    held = model.memory_bytes()
    assert 0 < held["cache"] < both and held["cache"] + held["bases"] <= model.cache_mb * 2**20


def test_a_lower_cache_budget_frees_at_once_not_at_the_next_call(adapters, images):
    model = served(adapters)
    model(images, "lora_qv")
    model(images, "nola_mlp")
    held = model.memory_bytes()
    assert held["bases"] > 0 and model.cached_tasks == ["lora_qv", "nola_mlp"]
    model.cache_mb = (held["cache"] + held["bases"] - 1) / 2**20  # the bases go first
    assert model.memory_bytes() == {**held, "bases": 0} and model.cached_tasks == ["lora_qv", "nola_mlp"]
    model.cache_mb = (held["cache"] - 1) / 2**20  # then the least recently used task
    assert model.cached_tasks == ["nola_mlp"]
    model.cache_mb = 0
    assert model.cached_tasks == [] and model.memory_bytes()["cache"] == 0


def test_the_bases_held_count_towards_cache_mb_and_go_before_the_tasks_factors(adapters, images):
    # four NOLA tasks of four seeds at rank 32 held 1.9 GB of bases beside a 45 MB cache of factors
    model = served(adapters)
    model(images, "lora_qv")
    reference = torch.stack(model(images, "nola_mlp"))
    held = model.memory_bytes()
    assert held["bases"] > 0 and held["cache"] > 0
    model.cache_mb = (held["cache"] + held["bases"] - 1) / 2**20  # room for both tasks' factors, not the bases too
    model(images, "lora_qv")
    assert model.memory_bytes() == {**held, "bases": 0} and model.cached_tasks == ["nola_mlp", "lora_qv"]
    model.cache_mb = 0  # combined again from bases generated again
    torch.testing.assert_close(torch.stack(model(images, "nola_mlp")), reference)
    assert model.memory_bytes()["bases"] == 0


def test_tasks_are_held_as_their_stored_numbers_until_used(adapters, images):
    model = served(adapters)
    assert model.tasks == list(TASKS) and model.num_classes("lora_qv") == 7
    stored = [t for d in adapters.values() for t in read_adapter(d)[1].values()]
    assert model.memory_bytes() == {"tasks": sum(t.numel() * t.element_size() for t in stored), "cache": 0, "bases": 0}
    model(images, "nola_mlp")  # the shared bases are generated on first use
    assert model.memory_bytes()["bases"] > 0


def test_tasks_of_one_config_share_their_plan_and_each_task_is_one_allocation(adapters, images, tmp_path):
    """What keeps 1,000 registered tasks small (benchmarks/multitask.py measures the RSS): no per-task copy of an
    equal plan, and no heap block per tensor."""
    config, classes = TASKS["nola_mlp"]
    again = nv.save_adapter(trained(config, classes, seed=99), tmp_path / "again")
    model = served(adapters)
    model.add_task("again", again)
    tasks = model._tasks
    assert tasks["again"].plan is tasks["nola_mlp"].plan and tasks["again"].shapes is tasks["nola_mlp"].shapes
    assert tasks["lora_qv"].plan is not tasks["nola_mlp"].plan
    for task in tasks.values():
        assert len({t.untyped_storage().data_ptr() for t in task.stored.values()}) == 1
    # the packed numbers are the stored ones, and serve the same logits as the task's own merged model
    assert all(torch.equal(tasks["again"].stored[k], v) for k, v in read_adapter(again)[1].items())
    assert torch.allclose(torch.stack(model(images, "again")), merged_logits(again, classes, images), atol=1e-5)


def test_every_adaptable_layer_is_hooked_from_the_start_so_a_compiled_model_serves_tasks_added_later(adapters,
                                                                                                     images):
    """Hooks were added per task; torch.compile does not guard on hooks, so a compiled served model refused a task
    added after its first call ("adapted layer blocks.0.mlp.fc1 was never called")."""
    model = nv.MultiTaskModel(tiny_vit())
    linears = sorted(n for n, m in model.model.named_modules() if isinstance(m, torch.nn.Linear) and n != "head")
    hooked = lambda: sorted(n for n, m in model.model.named_modules() if m._forward_hooks)  # noqa: E731
    assert hooked() == []  # without tasks the backbone carries no hook
    model.add_task("nola_qv", adapters["nola_qv"])
    assert hooked() == linears  # not only the qkv layers this task adapts
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(images, "nola_qv")
        for name in ("nola_mlp", "nola_per_layer", "lora_qv"):  # the first two adapt layers no earlier task did
            model.add_task(name, adapters[name])
            expected = merged_logits(adapters[name], TASKS[name][1], images)
            assert (torch.stack(compiled(images, name)) - expected).abs().max() <= 1e-4
    model.remove_task("nola_mlp")
    assert hooked() == linears
    for name in ("nola_qv", "nola_per_layer", "lora_qv"):
        model.remove_task(name)
    assert hooked() == []
    assert list(model.model.state_dict()) == list(tiny_vit().state_dict())


def test_a_dropped_served_model_is_collected_and_leaves_the_backbone_unhooked(adapters, images):
    import gc
    import weakref

    backbone = tiny_vit()
    reference = backbone(images)
    dropped = []
    for _ in range(3):  # the serving guide re-wraps a backbone whose weights changed
        model = nv.MultiTaskModel(backbone)
        model.add_task("nola_mlp", adapters["nola_mlp"])
        model(images, "nola_mlp")
        dropped.append(weakref.ref(model))
        del model
    gc.collect()
    assert [ref() for ref in dropped] == [None] * 3  # the backbone's hooks kept them, their caches and bases alive
    assert not any(module._forward_hooks for module in backbone.modules())
    torch.testing.assert_close(backbone(images), reference, rtol=0, atol=0)
    kept = nv.MultiTaskModel(backbone)
    kept.add_task("nola_mlp", adapters["nola_mlp"])
    twin = copy.deepcopy(kept)  # a copy's hooks belong to the copy
    expected = merged_logits(adapters["nola_mlp"], 5, images)
    # a shallow copy shared the backbone's hooks: it served nothing, and once collected the original neither
    with pytest.raises(TypeError, match=r"copy.copy of a MultiTaskModel would share its backbone's hooks .* "
                                        r"copy.deepcopy\(server\) gives a second server"):
        copy.copy(kept)
    gc.collect()
    torch.testing.assert_close(torch.stack(kept(images, "nola_mlp")), expected, rtol=1e-5, atol=1e-5)
    del kept
    gc.collect()
    torch.testing.assert_close(torch.stack(twin(images, "nola_mlp")), expected, rtol=1e-5, atol=1e-5)


def test_bad_task_names_and_lengths_get_errors_naming_the_fix(adapters, images):
    model = served(adapters)
    with pytest.raises(ValueError, match=r"unknown task 'cifar'; registered tasks are \['head_only', 'lora_qv'"):
        model(images, ["nola_mlp", "cifar", "nola_mlp", "nola_mlp"])
    with pytest.raises(ValueError, match="got 2 task names for 4 images: pass one task name per image"):
        model(images, ["nola_mlp", "lora_qv"])
    with pytest.raises(ValueError, match=r"got \[0, 1, 0, 1\] \(list\); registered tasks are \['head_only'"):
        model(images, [0, 1, 0, 1])  # tasks by position: the names to pass instead
    with pytest.raises(ValueError, match=r"already registered: call remove_task\('lora_qv'\)"):
        model.add_task("lora_qv", adapters["lora_qv"])
    with pytest.raises(ValueError, match="no task is registered"):
        nv.MultiTaskModel(tiny_vit())(images, "nola_mlp")
    with pytest.raises(ValueError, match=r"images are 64x64, and the backbone takes 32x32 \(timm's img_size\)"):
        model(torch.randn(4, 3, 64, 64), "nola_mlp")  # timm's bare assertion said neither what to do nor who
    with pytest.raises(ValueError, match=r"images have 1 channels, and the backbone reads 3-channel images"):
        model(torch.randn(4, 1, 32, 32), "nola_mlp")  # the convolution's own RuntimeError
    with pytest.raises(ValueError, match="has adapters injected"):
        nv.MultiTaskModel(nv.inject(tiny_vit(), TASKS["nola_mlp"][0]))


def test_adapters_for_another_backbone_or_basis_are_refused(adapters, tmp_path):
    model = served({})
    config = TASKS["nola_mlp"][0]
    other_arch = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=5, **TINY_VIT)
    nv.save_adapter(trained(config, 5, 0, model=other_arch), tmp_path / "arch")
    with pytest.raises(nv.AdapterLoadError, match=r"task 'a' .*trained on 'vit_small_patch16_224' but the "
                                                  r"model is 'vit_tiny_patch16_224'.*timm.create_model"):
        model.add_task("a", tmp_path / "arch")
    nv.save_adapter(trained(config, 5, 0, model=tiny_vit(embed_dim=32)), tmp_path / "width")
    with pytest.raises(nv.AdapterLoadError, match=r"layer blocks.0.mlp.fc1 is 64→256 .* in the model but 32→128"):
        model.add_task("b", tmp_path / "width")
    (tmp_path / "basis").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / "basis" / name).write_bytes((adapters["nola_mlp"] / name).read_bytes())
    document = json.loads((tmp_path / "basis" / "adapter_config.json").read_text())
    document["basis_fingerprint"] = "0" * 16
    document["config_sha256"] = adapter_io._document_digest(document)  # a crafted file: its checksum taken again
    (tmp_path / "basis" / "adapter_config.json").write_text(json.dumps(document))
    with pytest.raises(nv.AdapterLoadError, match="basis fingerprint mismatch"):
        model.add_task("c", tmp_path / "basis")
    nv.save_adapter(nv.inject(tiny_vit(), "full"), tmp_path / "full")
    with pytest.raises(nv.AdapterLoadError, match="changes the backbone itself"):
        model.add_task("d", tmp_path / "full")
    # on a backbone of another input size: that cause still, not the position table's shape it leads to
    with pytest.raises(nv.AdapterLoadError, match="changes the backbone itself"):
        nv.MultiTaskModel(tiny_vit(img_size=48)).add_task("d", tmp_path / "full")
    with pytest.raises(nv.AdapterLoadError, match=r"tensor pos_embed has shape \(1, 17, 64\) in the file but "
                                                  r"\(1, 37, 64\) in the model \(a position table: a full fine-tune "
                                                  r"holds it at the input size it trained at"):
        nv.load_adapter(tiny_vit(img_size=48), tmp_path / "full")
    assert model.tasks == []


def test_a_head_of_several_layers_is_served_as_its_own_model_gives_it(images, tmp_path):
    """A head that is not one Linear (a norm, then the Linear) failed with an AttributeError on its weight."""
    def normed():
        model = tiny_vit()
        model.head = torch.nn.Sequential(torch.nn.LayerNorm(64), model.head)
        return model

    trained = as_if_trained(nv.inject(normed(), nv.LoRAConfig(rank=2, targets=["mlp.fc1"])), 1, scale=0.3)
    task = nv.save_adapter(trained, tmp_path / "normed")
    served = nv.MultiTaskModel(normed())
    served.add_task("normed", task)
    with torch.no_grad():
        expected = nv.load_adapter(normed(), task).eval()(images)
    torch.testing.assert_close(torch.stack(served(images, "normed")), expected, rtol=0, atol=1e-6)


def test_a_backbone_moved_to_another_dtype_gets_its_tasks_in_that_dtype(adapters, images):
    model = served(adapters)
    tasks = ["nola_mlp", "lora_qv", "nola_qv", "nola_per_layer"]
    reference = model(images, tasks)
    model.model.to(torch.bfloat16)
    logits = model(images.bfloat16(), tasks)
    for value, expected in zip(logits, reference):
        assert value.dtype == torch.bfloat16 and (value.float() - expected).abs().max() < 0.05


def test_a_float64_backbone_serves_each_task_as_its_float64_merged_model(adapters, images):
    # the served updates were computed in float32 (7e-8 off) where load_adapter computes them in float64
    tasks = ["nola_mlp", "lora_qv", "nola_qv", "nola_per_layer"]
    model = nv.MultiTaskModel(tiny_vit().double())
    for name in tasks:
        model.add_task(name, adapters[name])
    with torch.no_grad():
        for name in tasks:
            reference = nv.merge(nv.load_adapter(tiny_vit(num_classes=TASKS[name][1]).double(), adapters[name]))
            logits = torch.stack(model(images.double(), name))
            assert (logits - reference(images.double())).abs().max() < 1e-12


def test_calls_from_several_threads_each_get_their_own_tasks_logits(adapters, images):
    # The layers' per-call task state belongs to one call at a time: without that, a thread's images were answered
    # with another thread's task factors (a quarter to nine tenths of the calls, no error).
    import threading

    model = served(adapters)
    names = ["nola_mlp", "lora_qv"]
    expected = {name: model(images, name) for name in names}
    wrong, errors = {name: 0 for name in names}, []

    def serve(name):
        try:
            for _ in range(15):
                wrong[name] += any(not torch.equal(a, b) for a, b in zip(model(images, name), expected[name]))
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    threads = [threading.Thread(target=serve, args=(name,)) for name in names]
    threads.append(threading.Thread(target=lambda: [model.remove_task("head_only"),
                                                     model.add_task("head_only", adapters["head_only"])]))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and wrong == {name: 0 for name in names}
    copied = __import__("copy").deepcopy(model)  # each copy gets its own lock
    assert all(torch.equal(a, b) for a, b in zip(copied(images, "lora_qv"), expected["lora_qv"]))


def test_each_call_applies_its_tasks_heads_under_the_lock(adapters, images, monkeypatch):
    # functional_call swaps the tensors of the one head module every call shares: outside the lock, concurrent calls
    # got another task's head (and could leave one in the backbone).
    from nola_vision.serve import multitask

    model, owned = served(adapters), []

    def checked(*args, **kwargs):
        owned.append(model._lock._is_owned())
        return functional_call(*args, **kwargs)

    functional_call = multitask.functional_call
    monkeypatch.setattr(multitask, "functional_call", checked)
    model(images, ["nola_mlp", "lora_qv"] * (len(images) // 2) + ["nola_mlp"] * (len(images) % 2))
    assert len(owned) == 2 and all(owned)


def test_removing_every_nola_task_releases_the_random_bases(adapters, images):
    model = served(adapters)
    model(images, "nola_mlp")
    held = model.memory_bytes()["bases"]
    assert held > 0
    # a task without bases removed: the remaining NOLA task's stay held (they were dropped, generated again on use)
    model.remove_task("lora_qv")
    assert model.memory_bytes()["bases"] == held
    for name in model.tasks:
        model.remove_task(name)
    assert model.memory_bytes() == {"tasks": 0, "cache": 0, "bases": 0}


def test_a_compiled_backbone_and_unbatched_images_get_errors_naming_the_fix(adapters, images):
    with pytest.raises(ValueError, match=r"torch.compile\(nv.MultiTaskModel\(model\)\)"):
        nv.MultiTaskModel(torch.compile(tiny_vit()))
    model = served(adapters)
    with pytest.raises(ValueError, match=r"image\[None\]"):
        model(images[0], "nola_mlp")
    with pytest.raises(ValueError, match="torch.stack"):
        model(list(images), "nola_mlp")
    assert not model.train().model.training  # inference only: train mode would change the shared backbone
    for wrong in (images.double(), (images * 255).to(torch.uint8)):
        with pytest.raises(ValueError, match=rf"images are {wrong.dtype} and the backbone's weights torch.float32"):
            model(wrong, "nola_mlp")


# ---- serving faults found by a probe ----------------------------------------------------------------------------
def test_a_task_update_on_a_layer_the_backbone_never_calls_is_refused_instead_of_left_out(tmp_path):
    # timm's BEiT reads attn.qkv's weight with F.linear: a q/v adapter saved without a forward pass has no effect
    torch.manual_seed(0)
    beit = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8,
                             embed_dim=64, depth=2, num_heads=2).eval()
    trained = as_if_trained(nv.inject(copy.deepcopy(beit), nv.LoRAConfig(rank=2)), 0)
    directory = nv.save_adapter(trained, tmp_path / "qv")
    served = nv.MultiTaskModel(copy.deepcopy(beit))
    served.add_task("qv", directory)
    with pytest.raises(ValueError, match=r"adapted layer blocks\.0\.attn\.qkv was never called .*silently left out"):
        served(torch.randn(2, 3, 32, 32), "qv")


@pytest.mark.parametrize("change", ["load_adapter", "merge_and_unload"])
def test_a_backbone_adapted_in_place_after_wrapping_is_refused(tmp_path, change):
    images = torch.randn(2, 3, 32, 32)
    task = nv.save_adapter(as_if_trained(nv.inject(tiny_vit(), nv.LoRAConfig(rank=2)), 0), tmp_path / "task")
    other = nv.save_adapter(as_if_trained(nv.inject(tiny_vit(), nv.LoRAConfig(rank=2)), 1), tmp_path / "other")
    model = tiny_vit()
    served = nv.MultiTaskModel(model)
    served.add_task("task", task)
    served(images, "task")
    nv.load_adapter(model, other)  # the served backbone itself now holds another task
    if change == "merge_and_unload":
        nv.merge_and_unload(model)
    with pytest.raises(RuntimeError, match="since it was wrapped"):
        served(images, "task")


def test_a_mixed_batch_over_swins_window_attention_says_to_serve_its_tasks_one_per_batch(tmp_path):
    def swin():
        torch.manual_seed(0)
        return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=5, img_size=32,
                                 patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2)).eval()

    for name, targets in (("a", ["attn.qkv"]), ("b", ["mlp.fc1"])):
        nv.save_adapter(as_if_trained(nv.inject(swin(), nv.LoRAConfig(rank=2, targets=targets)), 1), tmp_path / name)
    model = nv.MultiTaskModel(swin())
    model.add_task("a", tmp_path / "a")
    model.add_task("b", tmp_path / "b")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = nv.load_adapter(swin(), tmp_path / "a")(images)
        torch.testing.assert_close(torch.stack(model(images, "a")), expected, rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match=r"attn.qkv's input is not one row per image \(it has 4 rows for one "
                                               r"image: windows or tokens first.*Serve the tasks that adapt it one "
                                               r"task per batch"):
            model(images, ["a", "b"])


def test_a_mixed_batch_as_large_as_a_relative_position_table_is_refused_not_served_wrong(tmp_path):
    """vit_relpos's position MLP (rel_pos.mlp.fc1/fc2, which the default mlp.fc1/fc2 targets match) reads a table of
    2g-1 rows, the same for every image: a batch of 2g-1 images passed the row count check and each table row got
    another task's update, so every image's logits mixed tasks, silently."""
    def relpos():
        torch.manual_seed(0)
        return timm.create_model("vit_relpos_small_patch16_224", pretrained=False, num_classes=3, img_size=32,
                                 patch_size=8, depth=1, embed_dim=32, num_heads=2).eval()

    for seed, name in enumerate("ab"):
        config = nv.LoRAConfig(rank=2, targets=["mlp.fc1", "mlp.fc2"])
        nv.save_adapter(as_if_trained(nv.inject(relpos(), config), seed + 1), tmp_path / name)
    model = nv.MultiTaskModel(relpos())
    model.add_task("a", tmp_path / "a")
    model.add_task("b", tmp_path / "b")
    table = relpos().blocks[0].attn.rel_pos.rel_coords_log.shape[0]  # 2 * 4 - 1 rows for a 4x4 grid
    images = torch.randn(table, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match=r"blocks.0.attn.rel_pos.mlp.fc1's input is not one row per image \(it has "
                                           rf"{table} rows for one image: .*relative-position MLP's"):
        model(images, ["a", "b"] * (table // 2) + ["a"])
    with torch.no_grad():
        expected = nv.load_adapter(relpos(), tmp_path / "b")(images)
    torch.testing.assert_close(torch.stack(model(images, "b")), expected, rtol=1e-5, atol=1e-5)  # one task: served


def test_a_backbone_that_replaces_a_cache_buffer_at_its_first_call_is_served_at_every_call(tmp_path):
    """ConViT's attention makes its non-persistent rel_indices buffer for the token count at its first call: every
    call after the first was refused as a buffer "written or replaced (by load_state_dict, an optimizer step...)"."""
    def convit():
        torch.manual_seed(0)
        return timm.create_model("convit_tiny", pretrained=False, num_classes=3, img_size=32, depth=2,
                                 local_up_to_layer=1).eval()

    nv.save_adapter(as_if_trained(nv.inject(convit(), nv.LoRAConfig(rank=2, targets=["mlp.fc1"])), 1), tmp_path / "a")
    model = nv.MultiTaskModel(convit())
    model.add_task("a", tmp_path / "a")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = nv.load_adapter(convit(), tmp_path / "a")(images)
    for _ in range(3):
        torch.testing.assert_close(torch.stack(model(images, "a")), expected, rtol=1e-5, atol=1e-5)


def test_a_backbone_whose_head_pools_the_features_itself_is_refused_naming_what_to_do():
    # SAM ViT's head is timm's ClassifierHead (pool, dropout, fc): a call ran it on features pooled already, which
    # failed deep in timm ("mat1 and mat2 shapes cannot be multiplied")
    sam = timm.create_model("samvit_base_patch16", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2,
                            num_heads=2, num_classes=3, global_attn_indexes=(1,), window_size=2, neck_chans=16)
    with pytest.raises(ValueError, match=r"VisionTransformerSAM's classifier head \(ClassifierHead\) pools the "
                                         r"features itself .* serve its tasks one at a time with nv.load_adapter"):
        nv.MultiTaskModel(sam)
    crossvit = timm.create_model("crossvit_tiny_240", pretrained=False, num_classes=3, img_size=32, patch_size=(8, 16),
                                 embed_dim=(16, 32), depth=((1, 1, 0),), num_heads=(2, 2), mlp_ratio=(2, 2, 1))
    with pytest.raises(ValueError, match=r"CrossVit.s classifier head is a ModuleList of 2 heads, whose logits the "
                                         r"model combines itself, .* serve its tasks one at a time"):
        nv.MultiTaskModel(crossvit)  # accepted, then a bare "ModuleList is missing the required forward" at each call
    for name in ("vit_base_patch16_siglip_224", "vit_medium_patch16_gap_256"):  # pooled before a Linear head: served
        nv.MultiTaskModel(timm.create_model(name, pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=1,
                                            num_heads=2, num_classes=3))


def test_the_bases_held_are_those_of_the_tasks_combined_last_not_of_every_task_served(tmp_path, images):
    """Tasks of other seeds (or basis counts) each kept their bases held until remove_task, outside cache_mb: 50
    seeds served once held 50 banks (60 MiB each on ViT-B)."""
    model = nv.MultiTaskModel(tiny_vit(num_classes=3))
    held = []
    for seed in range(4):
        config = nv.NOLAConfig(rank=2, num_basis_a=16, num_basis_b=8, seed=seed)
        nv.save_adapter(trained(config, 3, seed), tmp_path / f"t{seed}")
        model.add_task(f"t{seed}", tmp_path / f"t{seed}")
        with torch.no_grad():
            torch.testing.assert_close(torch.stack(model(images, f"t{seed}")),
                                       merged_logits(tmp_path / f"t{seed}", 3, images), rtol=1e-4, atol=1e-5)
        held.append(model.memory_bytes()["bases"])
    assert held[0] > 0 and held == [held[0]] * 4
