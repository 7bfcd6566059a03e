"""Serving faults: a served backbone shared with other forward passes, model-level hooks, graphs
with external data, and weights changed under registered tasks."""
import copy
import os
import pickle
import re
import threading

import numpy as np
import pytest
import torch
from tiny_models import as_if_trained, tiny_vit
from torch import nn

import nola_vision as nv

LORA = nv.LoRAConfig(rank=4, targets=["mlp.fc1"])
NOLA = nv.NOLAConfig(rank=4, num_basis_a=32, num_basis_b=32, targets=["mlp.fc1", "mlp.fc2"], scale=40.0)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    return {name: nv.save_adapter(as_if_trained(nv.inject(tiny_vit(), LORA), seed, scale=0.2), root / name)
            for seed, name in enumerate(["a", "b"])}


def served(backbone, **tasks) -> nv.MultiTaskModel:
    model = nv.MultiTaskModel(backbone)
    for name, directory in tasks.items():
        model.add_task(name, directory)
    return model


def during_a_call(module: torch.nn.Module, action):
    """Run ``action`` once in another thread while the calling thread is inside ``module``'s forward, and return what
    it returned: any per-call state of the calling thread's forward pass is set then."""
    caller, results = threading.get_ident(), []

    def hook(*_):
        if threading.get_ident() == caller and not results:
            thread = threading.Thread(target=lambda: results.append(action()))
            thread.start()
            thread.join()

    module.register_forward_pre_hook(hook)
    return results


# ---- the per-call state belongs to the call -------------------------------------------------------------------
def test_two_models_serving_one_backbone_answer_calls_from_two_threads_with_their_own_tasks(tasks, images):
    backbone = tiny_vit()
    first, second = served(backbone, a=tasks["a"]), served(backbone, b=tasks["b"])
    expected = {"a": torch.stack(first(images, "a")), "b": torch.stack(second(images, "b"))}
    results = during_a_call(backbone.blocks[1].norm1, lambda: torch.stack(second(images, "b")))
    torch.testing.assert_close(torch.stack(first(images, "a")), expected["a"], rtol=0, atol=0)
    torch.testing.assert_close(results[0], expected["b"], rtol=0, atol=0)


@pytest.mark.parametrize("inside", ["blocks.1.norm1", "head"])  # the adapted layers, and the head of each task
def test_the_backbone_called_directly_from_another_thread_during_a_call_gives_its_own_outputs(tasks, images, inside):
    backbone = tiny_vit()
    with torch.no_grad():
        plain = backbone(images)
    model = served(backbone, a=tasks["a"])
    expected = torch.stack(model(images, "a"))
    with torch.no_grad():
        results = during_a_call(backbone.get_submodule(inside), lambda: backbone(images))
        torch.testing.assert_close(torch.stack(model(images, "a")), expected, rtol=0, atol=0)
    torch.testing.assert_close(results[0], plain, rtol=0, atol=0)


# ---- model-level hooks --------------------------------------------------------------------------------------
def normalising(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with a model-level pre-hook (normalisation) and hook (a temperature), as a user might add them."""
    model.register_forward_pre_hook(lambda module, args: ((args[0] - 0.5) / 0.25,))
    model.register_forward_hook(lambda module, args, output: output / 2.0)
    return model


def test_a_backbone_with_model_level_hooks_is_refused_when_wrapped_and_when_called(tasks, images):
    with pytest.raises(ValueError, match=r"forward hooks of its own \(normalising.<locals>.<lambda>, normalising"
                                         r".*preprocess the images before calling it"):
        nv.MultiTaskModel(normalising(tiny_vit()))
    backbone = tiny_vit()
    model = served(backbone, a=tasks["a"])
    handle = backbone.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    with pytest.raises(ValueError, match="forward hooks of its own since it was wrapped"):
        model(images, "a")
    handle.remove()
    model(images, "a")
    compiled = torch.compile(model, backend="eager")
    compiled(images, "a")
    handle = backbone.register_forward_hook(lambda module, args, output: output * 2)
    with pytest.raises(ValueError, match=r"forward hooks of its own since it was wrapped \(.*<lambda>\)"):
        compiled(images, "a")  # named, not an internal compiler error
    handle.remove()


def test_an_empty_batch_names_a_registered_task_too(tasks, images):
    model = served(tiny_vit(), a=tasks["a"])
    assert model(images[:0], "a") == [] and model(images[:0], []) == []
    with pytest.raises(ValueError, match="unknown task 'b'"):
        model(images[:0], "b")


def test_a_task_input_graph_runs_the_models_own_forward_hooks(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    task = nv.save_adapter(as_if_trained(nv.inject(tiny_vit(), NOLA), 0), tmp_path / "task")
    model = normalising(nv.load_adapter(tiny_vit(), task))
    with torch.no_grad():
        eager = model(images).numpy()
    session = ort.InferenceSession(str(nv.export_onnx(model, tmp_path / "tasks.onnx", tasks_as_inputs=True)))
    outputs = session.run(None, {"images": images.numpy(), **nv.onnx_task_inputs(task, session)})[0]
    assert np.abs(outputs - eager).max() < 1e-4
    other = nv.save_adapter(as_if_trained(nv.inject(tiny_vit(), NOLA), 1), tmp_path / "other")
    with torch.no_grad():
        expected = normalising(nv.load_adapter(tiny_vit(), other))(images).numpy()
    outputs = session.run(None, {"images": images.numpy(), **nv.onnx_task_inputs(other, session)})[0]
    assert np.abs(outputs - expected).max() < 1e-4  # the bases are combined from the inputs, not the parameters


# ---- graphs with external data (those over 2 GB) ---------------------------------------------------------------
@pytest.fixture
def exporting_external_data(monkeypatch):
    """torch's exporter writing every tensor to a file named after it beside the graph, as it does over 2 GB."""
    onnx = pytest.importorskip("onnx")
    export = torch.onnx.export

    def exported(module, args, path, **kwargs):
        export(module, args, path, **kwargs)
        onnx.save_model(onnx.load(path), path, save_as_external_data=True, all_tensors_to_one_file=False,
                        size_threshold=0)

    monkeypatch.setattr(torch.onnx, "export", exported)


def run(graph, images, **inputs) -> np.ndarray:
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(str(graph)).run(None, {"images": images.numpy(), **inputs})[0]


def test_graphs_with_external_data_each_get_one_data_file_of_their_own(exporting_external_data, images, tmp_path):
    folder = tmp_path / "graphs"
    merged = as_if_trained(nv.inject(tiny_vit(), NOLA), 0)
    tasks = as_if_trained(nv.inject(tiny_vit(), NOLA), 1)
    nv.export_onnx(merged, folder / "merged.onnx")
    nv.export_onnx(tasks, folder / "tasks.onnx", tasks_as_inputs=True)
    files = sorted(p.name for p in folder.iterdir())
    assert len(files) == 4 and re.fullmatch(r"merged\.onnx merged\.onnx\.[0-9a-f]{8}\.data tasks\.onnx "
                                            r"tasks\.onnx\.[0-9a-f]{8}\.data", " ".join(files)), files
    with torch.no_grad():
        assert np.abs(run(folder / "merged.onnx", images) - merged(images).numpy()).max() < 1e-4
        task = nv.save_adapter(tasks, tmp_path / "task")
        inputs = nv.onnx_task_inputs(task, folder / "tasks.onnx")  # the metadata is there
        assert np.abs(run(folder / "tasks.onnx", images, **inputs) - tasks(images).numpy()).max() < 1e-4
        replacement = as_if_trained(nv.inject(tiny_vit(), NOLA), 2)
        nv.export_onnx(replacement, folder / "merged.onnx")  # the data of the graph it replaces goes with it
        assert len(list(folder.iterdir())) == 4 and not (folder / files[1]).exists()
        assert np.abs(run(folder / "merged.onnx", images) - replacement(images).numpy()).max() < 1e-4


def test_the_task_inputs_of_a_graph_are_read_without_its_external_data(exporting_external_data, tmp_path):
    # only the metadata and input shapes are read: a data file not copied along left a raw onnx ValidationError
    tasks = as_if_trained(nv.inject(tiny_vit(), NOLA), 1)
    graph = nv.export_onnx(tasks, tmp_path / "graphs" / "tasks.onnx", tasks_as_inputs=True)
    task = nv.save_adapter(tasks, tmp_path / "task")
    expected = nv.onnx_task_inputs(task, graph)
    for data in graph.parent.glob("*.data"):
        data.unlink()
    found = nv.onnx_task_inputs(task, graph)
    assert found.keys() == expected.keys() and all(np.array_equal(found[k], expected[k]) for k in expected)


def test_a_failed_export_with_external_data_leaves_the_folder_as_it_was(exporting_external_data, monkeypatch, images,
                                                                       tmp_path):
    model = as_if_trained(nv.inject(tiny_vit(), NOLA), 0)
    nv.export_onnx(model, tmp_path / "model.onnx")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        nv.export_onnx(as_if_trained(nv.inject(tiny_vit(), NOLA), 1), tmp_path / "model.onnx")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    with torch.no_grad():
        assert np.abs(run(tmp_path / "model.onnx", images) - model(images).numpy()).max() < 1e-4


# ---- weights changed under registered tasks -------------------------------------------------------------------
def test_weights_written_or_replaced_after_the_tasks_were_registered_are_refused(tasks, images):
    backbone = tiny_vit()
    model = served(backbone, a=tasks["a"])
    expected = torch.stack(model(images, "a"))
    other = as_if_trained(tiny_vit(), 9, scale=0.05).state_dict()
    backbone.load_state_dict(other)
    with pytest.raises(RuntimeError, match=r"changed since its tasks were registered: cls_token was written or "
                                           r"replaced.*new nv.MultiTaskModel and add the tasks again"):
        model(images, "a")
    backbone.load_state_dict(tiny_vit().state_dict())  # the weights the task was trained on, written again
    with pytest.raises(RuntimeError, match="changed since its tasks were registered"):
        model(images, "a")
    model.remove_task("a")
    model.add_task("a", tasks["a"])  # checked against the weights it has now
    torch.testing.assert_close(torch.stack(model(images, "a")), expected, rtol=0, atol=0)
    backbone.blocks[1].mlp.fc2.bias = torch.nn.Parameter(backbone.blocks[1].mlp.fc2.bias.detach().clone())
    with pytest.raises(RuntimeError, match="registered: blocks.1.mlp.fc2.bias was written or replaced"):
        model(images, "a")
    fresh = served(backbone, a=tasks["a"])
    activation, backbone.blocks[0].mlp.act = backbone.blocks[0].mlp.act, torch.nn.GELU(approximate="tanh")
    with pytest.raises(RuntimeError, match="registered: a module was replaced, added or removed"):
        fresh(images, "a")
    backbone.blocks[0].mlp.act = activation  # the recorded module again
    torch.testing.assert_close(torch.stack(fresh(images, "a")), expected, rtol=0, atol=0)
    copied = copy.deepcopy(fresh)  # a copy records its own weights
    torch.testing.assert_close(torch.stack(copied(images, "a")), expected, rtol=0, atol=0)


def vit_with_batch_norm():
    """A tiny ViT whose patch embedding ends in a batch norm, as the convolutional stems of hybrid ViTs do."""
    model = tiny_vit()
    model.patch_embed.proj = nn.Sequential(model.patch_embed.proj, nn.BatchNorm2d(64).eval())
    return model


def test_running_statistics_written_after_the_tasks_were_registered_are_refused(tmp_path, images):
    """add_task checks a task against the batch norms' statistics, but calls compared only the parameters: statistics
    changed since (a train-mode pass by another user of the backbone, a buffers-only load_state_dict) were served."""
    directory = nv.save_adapter(as_if_trained(nv.inject(vit_with_batch_norm(), LORA), 1, scale=0.2), tmp_path / "a")
    backbone = vit_with_batch_norm()
    model = served(backbone, a=directory)
    expected = torch.stack(model(images, "a"))
    with torch.no_grad():
        backbone.train()(images * 3 + 1)
    backbone.eval()
    for _ in range(2):  # and stays refused
        with pytest.raises(RuntimeError, match=r"registered: buffer patch_embed\.proj\.1\.\w+ was written"):
            model(images, "a")
    fresh = served(vit_with_batch_norm(), a=directory)
    statistics = {key: value * 1.5 for key, value in fresh.model.state_dict().items() if "running_var" in key}
    fresh.model.load_state_dict(statistics, strict=False)
    with pytest.raises(RuntimeError, match="buffer patch_embed.proj.1.running_var was written"):
        fresh(images, "a")
    moved = served(vit_with_batch_norm(), a=directory).double()  # a move makes new buffers of the same values
    torch.testing.assert_close(torch.stack(moved(images.double(), "a")).float(), expected, rtol=1e-5, atol=1e-5)
    twin = copy.deepcopy(served(vit_with_batch_norm(), a=directory))
    twin.model.patch_embed.proj[1].running_mean.add_(1.0)  # before the copy's first call
    with pytest.raises(RuntimeError, match="running_mean was written or replaced"):
        twin(images, "a")


def test_a_pickle_from_before_buffers_were_recorded_serves_its_tasks(tmp_path, images, monkeypatch):
    """A pickle's record of its original's weights held parameters alone: compared with the buffers' record too, its
    first call was refused ('a module was replaced, added or removed')."""
    directory = nv.save_adapter(as_if_trained(nv.inject(vit_with_batch_norm(), LORA), 1, scale=0.2), tmp_path / "a")
    model = served(vit_with_batch_norm(), a=directory)
    expected = torch.stack(model(images, "a"))
    buffers, pickled = {name for name, _ in model.model.named_buffers()}, nv.MultiTaskModel.__getstate__

    def as_before(self):
        state = pickled(self)
        state["_copied_weights"] = {k: v for k, v in state["_copied_weights"].items() if k not in buffers}
        return state

    monkeypatch.setattr(nv.MultiTaskModel, "__getstate__", as_before)
    older = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(torch.stack(older(images, "a")), expected, rtol=0, atol=0)


def test_a_pickled_server_holds_each_task_in_one_buffer_and_older_pickles_serve(tasks, images, monkeypatch):
    """A task's tensors are views of one buffer, which pickle wrote once per view: a pickled server held each task
    about as many times as it has tensors (50 on a 12-block ViT), while memory_bytes() counted it once."""
    model = served(tiny_vit(), a=tasks["a"], b=tasks["b"])
    expected = {name: torch.stack(model(images, name)) for name in ("a", "b")}

    def buffers(server):
        tensors = [t for task in server._tasks.values() for t in task.stored.values()]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return len(storages), sum(storages.values())

    assert len(model._tasks["a"].stored) > 2 and buffers(model)[0] == 2
    twin = pickle.loads(pickle.dumps(model))
    assert buffers(twin) == buffers(model) and twin.memory_bytes()["tasks"] == model.memory_bytes()["tasks"]
    for name in ("a", "b"):
        torch.testing.assert_close(torch.stack(twin(images, name)), expected[name], rtol=0, atol=0)
    task_type = type(model._tasks["a"])
    monkeypatch.setattr(task_type, "__getstate__", lambda self: dict(self.__dict__))  # as pickles of earlier versions
    older = pickle.loads(pickle.dumps(model))
    monkeypatch.undo()
    torch.testing.assert_close(torch.stack(older(images, "b")), expected["b"], rtol=0, atol=0)


def test_a_wrong_task_name_among_many_names_the_closest_not_every_task(tasks, images):
    """The error listed every registered task: one typo in a server of 2,000 tasks logged 58 KB."""
    model = nv.MultiTaskModel(tiny_vit())
    for index in range(40):
        model.add_task(f"customer-{index:05d}-classifier", tasks["a"])
    with pytest.raises(ValueError) as refused:
        model(images, "customer-00017-clasifier")
    said = str(refused.value)
    assert said.startswith("unknown task 'customer-00017-clasifier'; 40 tasks are registered (closest: "
                           "['customer-00017-classifier'") and "MultiTaskModel.tasks lists them all" in said
    assert len(said) < 600 and "customer-00039-classifier" not in said
    for call in (lambda: model(images, [0, 1, 0, 1]), lambda: model.remove_task(17)):
        with pytest.raises((ValueError, TypeError), match="40 tasks are registered") as refused:
            call()
        assert len(str(refused.value)) < 600


def test_a_server_of_images_of_many_sizes_keeps_a_bounded_record_of_them(tasks):
    """The rows each image shape gives per adapted layer were kept for every shape ever served: a server taking
    images of any size (dynamic_img_size) grew without bound."""
    from nola_vision.serve import multitask

    model = served(tiny_vit(dynamic_img_size=True), a=tasks["a"], b=tasks["b"])
    for width in range(16, 16 + 8 * (multitask._SHAPES_KEPT + 6), 8):
        model(torch.randn(2, 3, 16, width), ["a", "b"])
    assert len(model._rows_per_image) == multitask._SHAPES_KEPT
    assert (3, 16, 16) not in model._rows_per_image and (3, 16, width) in model._rows_per_image


def test_the_class_names_a_caller_gets_are_its_own_copy(tmp_path, images):
    """class_names(task) returned the task's own list: a caller that sorted it relabelled the task's outputs for
    every later caller."""
    names = ["zebra", "cat", "dog"]
    directory = nv.save_adapter(as_if_trained(nv.inject(tiny_vit(num_classes=3), LORA), 1, scale=0.2),
                                tmp_path / "a", class_names=names)
    model = served(tiny_vit(num_classes=3), a=directory)
    model.class_names("a").sort()
    assert model.class_names("a") == names


def test_a_backbone_put_in_train_mode_after_wrapping_is_refused_until_it_is_in_eval_mode_again(tmp_path, images):
    """Only the served model's own train() kept the backbone in eval mode: the backbone's train() was served, each
    image's logits then depending on its batch (batch norm) and the statistics changed for good."""
    directory = nv.save_adapter(as_if_trained(nv.inject(vit_with_batch_norm(), LORA), 1, scale=0.2), tmp_path / "a")
    model = served(vit_with_batch_norm(), a=directory)
    expected = torch.stack(model(images, "a"))
    model.model.blocks[1].train()
    with pytest.raises(RuntimeError, match=r"is in train mode \(blocks\.1;.*Call served\.eval\(\)"):
        model(images, "a")
    model.eval()
    torch.testing.assert_close(torch.stack(model(images, "a")), expected, rtol=0, atol=0)


def test_a_setting_add_task_checked_changed_after_registering_is_refused_and_others_serve_on(tasks, images):
    """add_task refuses a task trained with another global_pool, but a change after registering it was served."""
    backbone = tiny_vit()
    model = served(backbone, a=tasks["a"])
    expected = torch.stack(model(images, "a"))
    for block in backbone.blocks:  # a choice of kernel, which add_task does not check: served on
        block.attn.fused_attn = not block.attn.fused_attn
    torch.testing.assert_close(torch.stack(model(images, "a")), expected, rtol=1e-5, atol=1e-5)
    backbone.global_pool = "avg"
    with pytest.raises(RuntimeError, match=r"registered: global_pool was set to 'avg' \(was 'token'\), which "
                                           r"changes every output"):
        model(images, "a")
    backbone.global_pool = "token"
    torch.testing.assert_close(torch.stack(model(images, "a")), expected, rtol=1e-5, atol=1e-5)
    backbone.blocks[0].norm1.eps = 1e-3
    with pytest.raises(RuntimeError, match=r"blocks\.0\.norm1\.eps was set to 0\.001"):
        model(images, "a")


def test_the_cache_budget_set_after_construction_is_checked_as_at_construction_and_lookups_take_str_names(tasks):
    """A NaN budget set later turned eviction off for good, a string failed inside every call; a list as a task name
    failed on hashing."""
    model = served(tiny_vit(), a=tasks["a"])
    for budget in (float("nan"), -1, "64", None):
        with pytest.raises(ValueError, match="cache_mb must be a finite number"):
            model.cache_mb = budget
    model.cache_mb = 0
    assert model.cache_mb == 0.0
    for lookup in (model.num_classes, model.class_names, model.remove_task):
        with pytest.raises(TypeError, match=r"a task is named by a str, got .*; registered tasks are \['a'\]"):
            lookup(["a"])


@pytest.mark.parametrize("copied", ["deepcopy", "pickle"])
def test_weights_written_into_a_copy_before_its_first_call_are_refused(tasks, images, copied):
    """A copy's weights have new version counters, recorded at its first call: a write before it went unseen, and
    the copy served tasks checked against other weights."""
    model = served(tiny_vit(), a=tasks["a"])
    expected = torch.stack(model(images, "a"))
    copy_of = copy.deepcopy if copied == "deepcopy" else lambda m: pickle.loads(pickle.dumps(m))
    twin = copy_of(model)
    twin.model.load_state_dict(as_if_trained(tiny_vit(), 9, scale=0.05).state_dict())
    for _ in range(2):  # and stays refused
        with pytest.raises(RuntimeError, match="changed since its tasks were registered: cls_token was written"):
            twin(images, "a")
    again = copy_of(copy_of(model))  # copies of copies serve, and the checked weights written again change nothing
    again.model.load_state_dict(tiny_vit().state_dict())
    torch.testing.assert_close(torch.stack(again(images, "a")), expected, rtol=0, atol=0)


@pytest.mark.parametrize("copied", ["deepcopy", "pickle"])
def test_a_copy_of_a_server_moved_to_float16_and_back_serves_as_its_original_does(tasks, images, copied):
    """A move to float16 and back rounds the weights but keeps their version counters: the original served on, and
    its copy compared the rounded values with the first samples and refused every call."""
    model = served(tiny_vit(), a=tasks["a"])
    model(images, "a")
    model.half()
    model(images.half(), "a")
    model.float()
    expected = torch.stack(model(images, "a"))
    copy_of = copy.deepcopy if copied == "deepcopy" else lambda m: pickle.loads(pickle.dumps(m))
    torch.testing.assert_close(torch.stack(copy_of(model)(images, "a")), expected, rtol=0, atol=0)
    with torch.no_grad():
        model.model.blocks[0].attn.qkv.weight.add_(1.0)  # a write the original refuses: its copies refuse it too
    with pytest.raises(RuntimeError, match="changed since its tasks were registered"):
        copy_of(model)(images, "a")


def test_a_backbone_built_or_moved_under_inference_mode_serves_and_a_later_write_is_refused(tasks, images):
    # inference tensors keep no version counter: they are compared by identity, and never refused for it
    expected = torch.stack(served(tiny_vit(), a=tasks["a"])(images, "a")).double()
    with torch.inference_mode():
        model = served(tiny_vit().double(), a=tasks["a"])
        torch.testing.assert_close(torch.stack(model(images.double(), "a")), expected, rtol=1e-6, atol=1e-6)
    backbone = tiny_vit()
    model = served(backbone, a=tasks["a"])
    with torch.inference_mode():
        model.double()  # a move made there
        torch.testing.assert_close(torch.stack(model(images.double(), "a")), expected, rtol=1e-6, atol=1e-6)
    model.float()
    with torch.no_grad():
        backbone.blocks[0].attn.qkv.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="blocks.0.attn.qkv.weight was written or replaced"):
        model(images, "a")


def test_a_copy_or_a_model_moved_to_float16_serves_weights_below_its_normal_range(tasks, images):
    """timm draws cls_token with std 1e-6, below float16's normal range: a move there changes those values by far more
    than float16's relative rounding, and was taken for a write."""
    backbone = tiny_vit()
    with torch.no_grad():
        backbone.cls_token.normal_(std=1e-6, generator=torch.Generator().manual_seed(0))
    model = nv.MultiTaskModel(backbone)
    model.add_task("a", tasks["a"], check_frozen_weights=False)
    expected = torch.stack(model(images, "a"))
    for twin in (copy.deepcopy(model).half(), pickle.loads(pickle.dumps(model)).half()):
        torch.testing.assert_close(torch.stack(twin(images.half(), "a")).float(), expected, rtol=0.05, atol=0.05)
    with torch.inference_mode():
        model.half()
        torch.testing.assert_close(torch.stack(model(images.half(), "a")).float(), expected, rtol=0.05, atol=0.05)


def test_a_task_beyond_float16_is_refused_once_the_served_model_moves_there(tmp_path, images):
    """add_task checks a task's values against the backbone's dtype then; after a later .half() of the served model
    its head became infinite, and the logits with it, without a word."""
    model = as_if_trained(nv.inject(tiny_vit(), nv.NOLAConfig(num_basis_a=16, num_basis_b=16)), 1)
    with torch.no_grad():
        model.head.weight[0, 0] = 1e5
    directory = nv.save_adapter(model, tmp_path / "large", bits=16)  # float32 in the file: beyond float16
    served = nv.MultiTaskModel(tiny_vit())
    served.add_task("large", directory)
    assert all(torch.isfinite(logits).all() for logits in served(images, "large"))
    served.half()
    with pytest.raises(nv.AdapterLoadError, match=r"task 'large': head weight holds values up to 1e\+05, beyond the "
                                                  r"torch\.float16 the model is served in now.*remove_task"):
        served(images.half(), "large")
    served.float()  # back in float32, it serves again
    assert all(torch.isfinite(logits).all() for logits in served(images, "large"))


def test_a_write_under_inference_mode_into_weights_moved_there_is_refused(tasks, images):
    """Inference tensors keep no version counter: a load_state_dict under inference_mode went unseen, and the
    tasks were served on other weights. Their sampled values tell it, while a move to another dtype serves on."""
    model = served(tiny_vit(), a=tasks["a"])
    expected = torch.stack(model(images, "a"))
    with torch.inference_mode():
        model.double()  # moves made there serve on
        torch.testing.assert_close(torch.stack(model(images.double(), "a")).float(), expected, rtol=1e-5, atol=1e-5)
        model.half()
        torch.testing.assert_close(torch.stack(model(images.half(), "a")).float(), expected, rtol=0.05, atol=0.05)
        model.bfloat16()
        torch.testing.assert_close(torch.stack(model(images.bfloat16(), "a")).float(), expected, rtol=0.1, atol=0.1)
        model.model.load_state_dict(as_if_trained(tiny_vit(), 9, scale=0.05).state_dict())
        with pytest.raises(RuntimeError, match="cls_token was written or replaced"):
            model(images.bfloat16(), "a")


def test_adapter_calls_on_a_served_model_are_refused_and_leave_it_serving(tasks, images):
    """nv.inject on a MultiTaskModel injected into the shared backbone, after which every call was refused even once
    unloaded: the served model was lost. load_adapter blamed the architecture ('MultiTaskModel')."""
    model = served(tiny_vit(), **tasks)
    before = model(images, ["a", "b", "a", "b"])
    for call in (lambda: nv.inject(model, NOLA), lambda: nv.load_adapter(model, tasks["a"]),
                 lambda: nv.verify_adapter(model, tasks["a"]), lambda: nv.merge(model), lambda: nv.unmerge(model),
                 lambda: nv.unload(model), lambda: nv.merge_and_unload(model), lambda: nv.save_adapter(model, "x")):
        with pytest.raises(ValueError, match=r"add_task\(name, adapter_dir\)"):
            call()
    assert not nv.adapted_layers(model)
    torch.testing.assert_close(model(images, ["a", "b", "a", "b"]), before, rtol=0, atol=0)
    assert nv.count_parameters(model)["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("wrap, where", [
    (torch.compile, ""),  # the refusal used to name plan_injection, and merge did nothing
    (lambda m: nn.Sequential(nn.Identity(), m), r"the model holds a MultiTaskModel \(1\): "),  # was injected into
])
def test_adapter_calls_are_refused_on_a_compiled_served_model_and_on_a_module_holding_one(tasks, images, wrap, where):
    model = wrap(served(tiny_vit(), **tasks))
    for call in (lambda: nv.inject(model, NOLA), lambda: nv.load_adapter(model, tasks["a"]), lambda: nv.merge(model),
                 lambda: nv.unload(model), lambda: nv.save_adapter(model, "x")):
        with pytest.raises(ValueError, match=where + r"a MultiTaskModel serves the tasks added with served.add_task"):
            call()
    assert not nv.adapted_layers(model)


@pytest.mark.parametrize("call", [nv.count_parameters, nv.merge, nv.unmerge, nv.MultiTaskModel,
                                  lambda m: nv.save_adapter(m, "x"), lambda m: nv.load_adapter(m, "x"),
                                  lambda m: nv.export_peft(m, "x"), lambda m: nv.export_onnx(m, "x.onnx")])
def test_calls_given_no_model_name_what_they_take(call):
    with pytest.raises(TypeError, match=r"takes a model \(a torch.nn.Module\), got a NoneType"):
        call(None)


# ---- a failed add_task or remove_task leaves every task served whole --------------------------------------------
class Injected(RuntimeError):
    pass


def fail_on_call(owner, name, call, raise_=None):
    """Make ``owner.name`` raise ``raise_`` (default: an injected out-of-memory error) on its ``call``-th call."""
    raise_ = Injected("out of memory (injected)") if raise_ is None else raise_
    original, calls = getattr(owner, name), [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise raise_
        return original(*args, **kwargs)

    return failing


def hook_count(model):
    return sum(len(module._forward_hooks) for module in model.modules())


@pytest.mark.parametrize("fault", [Injected("out of memory (injected)"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
@pytest.mark.parametrize("call", [1, 3, 6])
def test_an_add_task_stopped_while_hooking_the_backbone_registers_nothing_and_can_be_retried(
        tasks, images, monkeypatch, fault, call):
    """A fault at the Nth hook left the task registered with some layers unhooked: it served without their update
    (0.5 off in logits), and add_task again was refused as "already registered"."""
    model = served(tiny_vit(), a=tasks["a"])
    hooks, expected = hook_count(model.model), model(images, "a")
    monkeypatch.setattr(nn.Module, "register_forward_hook", fail_on_call(nn.Module, "register_forward_hook", call,
                                                                          fault))  # a KeyboardInterrupt: Ctrl-C's
    backbone = served(tiny_vit())
    with pytest.raises(type(fault)):
        backbone.add_task("a", tasks["a"])
    monkeypatch.undo()
    assert backbone.tasks == [] and hook_count(backbone.model) == 0
    backbone.add_task("a", tasks["a"])
    assert hook_count(backbone.model) == hooks
    torch.testing.assert_close(torch.stack(backbone(images, "a")), torch.stack(expected), rtol=0, atol=0)


@pytest.mark.parametrize("call", [1, 4])
def test_a_remove_task_stopped_while_unhooking_leaves_no_hook_to_apply_an_update_twice(tasks, images, monkeypatch,
                                                                                        call):
    """A hook whose removal failed was forgotten but stayed on its layer: the task added again got its update
    there twice."""
    model = served(tiny_vit(), a=tasks["a"])
    hooks, expected = hook_count(model.model), model(images, "a")
    handle = type(next(iter(model._hooks.values())))
    monkeypatch.setattr(handle, "remove", fail_on_call(handle, "remove", call))
    with pytest.raises(Injected):
        model.remove_task("a")
    monkeypatch.undo()
    assert model.tasks == []
    model.add_task("a", tasks["a"])
    assert hook_count(model.model) == hooks
    torch.testing.assert_close(torch.stack(model(images, "a")), torch.stack(expected), rtol=0, atol=0)
