"""Faults of the exports found by a fault hunt: what a task-input graph accepts, quantisation-aware models, compiled
models, half-precision models, a many-task model, and the paths a single-file export writes to."""
import copy
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from tiny_models import as_if_trained, tiny_vit

import nola_vision as nv
from nola_vision.core.inject import adapter_state
from nola_vision.core.storage import atomic_path

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

CONFIG = nv.NOLAConfig(rank=4, num_basis_a=96, num_basis_b=96, targets=["mlp.fc1", "mlp.fc2", "attn.q", "attn.v"])


def session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images)


def trained(seed: int, model: Optional[torch.nn.Module] = None) -> torch.nn.Module:
    return as_if_trained(nv.inject(model if model is not None else tiny_vit(), CONFIG), seed=seed, scale=0.5)


def other_frozen_weights() -> torch.nn.Module:
    """The tiny ViT's architecture with every weight 1.3 times as large: another pretrained checkpoint."""
    model = tiny_vit()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1.3)
    return model


# ---- which tasks fit a task-input graph ----------------------------------------------------------------------
def test_a_task_trained_on_other_frozen_weights_does_not_fit_the_graph(tmp_path):
    graph = nv.export_onnx(nv.inject(tiny_vit(), CONFIG), tmp_path / "tasks.onnx", tasks_as_inputs=True)
    task = nv.save_adapter(trained(0, other_frozen_weights()), tmp_path / "other")
    with pytest.raises(nv.AdapterLoadError, match="frozen weights are not those"):
        nv.load_adapter(tiny_vit(), task)  # what the graph's check must agree with
    for fed in (graph, session(graph)):
        with pytest.raises(nv.AdapterLoadError, match="does not fit the graph: the graph's frozen weights are not "
                                                       "those the task was trained on: the weights of blocks.0"):
            nv.onnx_task_inputs(task, fed)
    same = nv.save_adapter(trained(1), tmp_path / "same")
    assert set(nv.onnx_task_inputs(same, graph)) == {i.name for i in session(graph).get_inputs()} - {"images"}


def test_a_task_does_not_fit_a_graph_whose_unadapted_frozen_modules_differ(tmp_path):
    other = tiny_vit()
    with torch.no_grad():
        other.patch_embed.proj.weight.mul_(1.3)  # no adapted layer and no head norm changes
    graph = nv.export_onnx(nv.inject(other, CONFIG), tmp_path / "tasks.onnx", tasks_as_inputs=True)
    task = nv.save_adapter(trained(0), tmp_path / "task")
    with pytest.raises(nv.AdapterLoadError, match=r"does not fit the graph: .*the weights of frozen module \d+ of the "
                                                   r"\d+ outside the adapted layers and the head differ by about 23%"):
        nv.onnx_task_inputs(task, graph)


def test_a_task_does_not_fit_a_graph_exported_with_other_running_statistics(tmp_path):
    def with_batch_norm(statistics_changed):
        model = tiny_vit()
        model.patch_embed.proj = torch.nn.Sequential(model.patch_embed.proj, torch.nn.BatchNorm2d(64).eval())
        if statistics_changed:
            with torch.no_grad():
                model.train()(torch.randn(2, 3, 32, 32) * 3 + 1)
        return model.eval()

    graph = nv.export_onnx(nv.inject(with_batch_norm(True), CONFIG), tmp_path / "tasks.onnx", tasks_as_inputs=True)
    task = nv.save_adapter(trained(0, with_batch_norm(False)), tmp_path / "task")
    with pytest.raises(nv.AdapterLoadError, match=r"does not fit the graph: .*running statistics of "
                                                   r"patch_embed\.proj\.1 differ"):
        nv.onnx_task_inputs(task, graph)
    same = nv.export_onnx(nv.inject(with_batch_norm(False), CONFIG), tmp_path / "same.onnx", tasks_as_inputs=True)
    assert set(nv.onnx_task_inputs(task, same)) == {i.name for i in session(same).get_inputs()} - {"images"}


def test_a_hybrid_vit_exports_at_its_images_channels(tmp_path):
    """The image channels were read from patch_embed.proj, which in a hybrid ViT reads the CNN's 2048-channel
    features: both exports traced 2048-channel images and failed, and input_size=(3, H, W) was refused."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_resnet26d_224", pretrained=False, depth=2, embed_dim=64, num_heads=2,
                              img_size=64, num_classes=5)
    model = as_if_trained(nv.inject(model, CONFIG), seed=0).eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    merged = nv.export_onnx(model, tmp_path / "merged.onnx", input_size=(3, 64, 64))
    out = session(merged).run(None, {"images": images.numpy()})[0]
    np.testing.assert_allclose(out, logits(model, images).numpy(), rtol=0, atol=1e-4)
    graph = nv.export_onnx(model, tmp_path / "tasks.onnx", tasks_as_inputs=True)
    task = nv.save_adapter(model, tmp_path / "task", bits=32)
    out = session(graph).run(None, {"images": images.numpy(), **nv.onnx_task_inputs(task, graph)})[0]
    np.testing.assert_allclose(out, logits(model, images).numpy(), rtol=0, atol=1e-4)


def test_a_task_does_not_fit_a_graph_exported_behind_other_constant_buffers(tmp_path):
    def normalized(mean):
        model = torch.nn.Sequential(torch.nn.Identity(), tiny_vit())
        model[0].register_buffer("mean", torch.full((1, 3, 1, 1), mean))
        model[0].forward = lambda images: images - model[0].mean
        return model

    graph = nv.export_onnx(nv.inject(normalized(0.5), CONFIG), tmp_path / "tasks.onnx", tasks_as_inputs=True,
                           input_size=(3, 32, 32))
    task = nv.save_adapter(trained(0, normalized(0.4)), tmp_path / "task")
    with pytest.raises(nv.AdapterLoadError, match=r"does not fit the graph: .*the buffers of module 1 of the 1 "
                                                   r"holding them differ"):
        nv.onnx_task_inputs(task, graph)
    same = nv.export_onnx(nv.inject(normalized(0.4), CONFIG), tmp_path / "same.onnx", tasks_as_inputs=True,
                          input_size=(3, 32, 32))
    assert set(nv.onnx_task_inputs(task, same)) == {i.name for i in session(same).get_inputs()} - {"images"}


def test_a_task_saved_from_a_float16_copy_fits_the_graph_as_it_loads_onto_the_model(tmp_path):
    """Weights near zero (timm inits the class token at 1e-6) become float16 subnormals, a few % off: load_adapter
    allows them an absolute tolerance per sampled value, and the graph's check must too (it refused such a task,
    naming a 1.7% difference as more than a float16 copy's)."""
    model = tiny_vit()
    with torch.no_grad():
        model.cls_token.mul_(2e-5)  # about 1e-6, as timm's init
    graph = nv.export_onnx(nv.inject(copy.deepcopy(model), CONFIG), tmp_path / "tasks.onnx", tasks_as_inputs=True)
    task = nv.save_adapter(trained(0, copy.deepcopy(model)).half(), tmp_path / "half")
    nv.load_adapter(copy.deepcopy(model), task)  # what the graph's check must agree with
    for fed in (graph, session(graph)):
        assert set(nv.onnx_task_inputs(task, fed)) == {i.name for i in session(graph).get_inputs()} - {"images"}
    with torch.no_grad():
        model.cls_token.mul_(3.0)  # another such init is still told apart
    other = nv.save_adapter(trained(0, model), tmp_path / "other")
    with pytest.raises(nv.AdapterLoadError, match="frozen weights are not those the task was trained on"):
        nv.onnx_task_inputs(other, graph)


def test_a_graph_whose_position_embedding_moved_beyond_float32_rounding_does_not_fit_a_task(tmp_path):
    """The graph's check of position embeddings (and batch-norm statistics) kept bfloat16's 1.6% where load_adapter
    holds float32 weights to 0.05%: a graph with them 1% off served the task."""
    moved = tiny_vit()
    with torch.no_grad():
        moved.pos_embed.add_(torch.randn(moved.pos_embed.shape, generator=torch.Generator().manual_seed(0))
                             * moved.pos_embed.std() * 0.01)
    graph = nv.export_onnx(nv.inject(moved, CONFIG), tmp_path / "tasks.onnx", tasks_as_inputs=True)
    task = nv.save_adapter(trained(0), tmp_path / "task")
    with pytest.raises(nv.AdapterLoadError, match=r"the weights of pos_embed differ by about .*under 0\.05%"):
        nv.onnx_task_inputs(task, graph)


def test_a_task_recording_no_frozen_weights_warns_as_load_adapter_does(tmp_path):
    """A format 2 task was accepted by a graph of other weights without the word load_adapter gives."""
    from test_adapter_formats import as_format_2, rewrite

    graph = nv.export_onnx(nv.inject(other_frozen_weights(), CONFIG), tmp_path / "tasks.onnx", tasks_as_inputs=True)
    task = nv.save_adapter(trained(0), tmp_path / "task")
    rewrite(task, as_format_2)
    with pytest.warns(UserWarning, match=r"\(nola_vision\.adapter/2, .*\) records no fingerprint of the frozen"):
        nv.onnx_task_inputs(task, graph)


def test_a_task_trained_with_another_pooling_does_not_fit_the_graph(tmp_path):
    graph = nv.export_onnx(nv.inject(tiny_vit(), CONFIG), tmp_path / "tasks.onnx", tasks_as_inputs=True)
    task = nv.save_adapter(as_if_trained(nv.inject(tiny_vit(global_pool="avg", fc_norm=False), CONFIG), seed=0),
                           tmp_path / "avg")
    with pytest.raises(nv.AdapterLoadError, match=r"trained with global_pool='avg', the graph pools with 'token'"):
        nv.onnx_task_inputs(task, graph)


def test_a_task_trained_without_the_adapter_merged_into_the_graphs_weights_does_not_fit_it(tmp_path):
    lora = nv.inject(tiny_vit(), nv.LoRAConfig(rank=2, targets=["mlp.fc1"]))
    backbone = nv.merge_and_unload(as_if_trained(lora, seed=0, adapters_only=True))
    graph = nv.export_onnx(nv.inject(backbone, CONFIG), tmp_path / "tasks.onnx", tasks_as_inputs=True)
    task = nv.save_adapter(trained(1), tmp_path / "plain")
    with pytest.raises(nv.AdapterLoadError, match=r"adapters folded into the frozen weights by nv.merge_and_unload "
                                                   r"differ \(1 in the graph's, 0 in the task's"):
        nv.onnx_task_inputs(task, graph)


def test_a_graph_exported_before_it_recorded_frozen_weights_still_takes_tasks(tmp_path):
    graph = nv.export_onnx(nv.inject(tiny_vit(), CONFIG), tmp_path / "tasks.onnx", tasks_as_inputs=True)
    proto = onnx.load(str(graph))
    kept = [entry for entry in proto.metadata_props if entry.key != "nola_vision.frozen_weights"]
    assert len(kept) < len(proto.metadata_props)  # the new graph records them
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    onnx.save(proto, str(graph))
    task = nv.save_adapter(trained(0, other_frozen_weights()), tmp_path / "other")
    assert nv.onnx_task_inputs(task, graph)


# ---- quantisation-aware models -------------------------------------------------------------------------------
def test_the_task_input_graph_of_a_quantisation_aware_model_applies_each_task_exactly(images, tmp_path):
    model = trained(1).eval()
    nv.set_quantization_aware(model, 8)
    before = logits(model, images)
    graph = nv.export_onnx(model, tmp_path / "tasks.onnx", tasks_as_inputs=True)
    task = nv.save_adapter(trained(2), tmp_path / "task", bits=16)
    outputs = session(graph).run(None, {"images": images.numpy(), **nv.onnx_task_inputs(task, graph)})[0]
    expected = logits(nv.load_adapter(tiny_vit(), task), images)
    assert np.abs(outputs - expected.numpy()).max() <= 1e-4
    assert adapter_state(model).quantized_head is not None  # the model still trains against the stored head
    assert torch.equal(logits(model, images), before)


@pytest.mark.parametrize("head", ["linear", "normed"])
def test_the_merged_export_of_a_quantisation_aware_model_gives_the_models_outputs(images, tmp_path, head):
    """A head with a norm before its Linear (timm's LeViT) is seen quantised through its own parameters too: the
    merged export traces it."""
    backbone = tiny_vit()
    if head == "normed":
        backbone.head = torch.nn.Sequential(torch.nn.LayerNorm(64), backbone.head)
    model = trained(3, backbone).eval()
    nv.set_quantization_aware(model, 8)
    expected = logits(model, images)
    graph = nv.export_onnx(model, tmp_path / "merged.onnx")
    outputs = session(graph).run(None, {"images": images.numpy()})[0]
    assert np.abs(outputs - expected.numpy()).max() <= 1e-4
    assert torch.equal(logits(model, images), expected)


# ---- compiled, half-precision and many-task models -----------------------------------------------------------
def test_export_peft_of_a_compiled_model_loads_in_peft_with_the_same_logits(images, tmp_path):
    peft = pytest.importorskip("peft")
    model = trained(4).eval()
    nv.export_peft(torch.compile(model, backend="eager"), tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["head"] and not any("_orig_mod" in n for n in config["target_modules"])
    served = peft.PeftModel.from_pretrained(tiny_vit(), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(logits(served, images), logits(model, images), rtol=0, atol=1e-5)


def crossvit() -> torch.nn.Module:
    """A tiny CrossViT (two branches, its head a ModuleList of one Linear per branch) built for 32×32 images."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("crossvit_tiny_240", pretrained=False, num_classes=5, img_size=[32, 32],
                             patch_size=[8, 16], embed_dim=[32, 64], depth=[[1, 1, 0]], num_heads=[2, 2],
                             mlp_ratio=[2, 2, 1]).eval()


def test_a_crossvit_exports_to_peft_and_onnx_at_the_size_it_was_built_for(tmp_path):
    # peft refused the export ("modules_to_save cannot be applied to modules of type ModuleList"), and the graph took
    # 240×240 images (its pretrained size) where the model was built for 32×32
    peft = pytest.importorskip("peft")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = as_if_trained(nv.inject(crossvit(), nv.LoRAConfig(rank=2, targets=["attn.q", "attn.v"])), 1, scale=0.5)
    nv.export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["head.0", "head.1"]
    served = peft.PeftModel.from_pretrained(crossvit(), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(logits(served, images), logits(model, images), rtol=0, atol=1e-5)
    graph = nv.export_onnx(model, tmp_path / "merged.onnx")
    assert np.abs(session(graph).run(None, {"images": images.numpy()})[0] - logits(model, images).numpy()).max() < 1e-4


def test_a_pvt_with_overlapping_patches_exports_at_sizes_it_runs_at(tmp_path):
    # every size but 224 was refused as "not a multiple of the model's 7×7 patches" (its patches overlap: stride 4)
    import timm

    torch.manual_seed(0)
    model = timm.create_model("pvt_v2_b0", pretrained=False, num_classes=3, embed_dims=[8, 16, 24, 32],
                              depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1]).eval()
    model = as_if_trained(nv.inject(model, nv.NOLAConfig(rank=2, num_basis_a=8, num_basis_b=8)), 1, scale=0.5)
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    graph = nv.export_onnx(model, tmp_path / "pvt.onnx", input_size=(3, 64, 64))
    assert np.abs(session(graph).run(None, {"images": images.numpy()})[0] - logits(model, images).numpy()).max() < 1e-4


def test_a_task_input_graph_of_a_model_with_blocks_compiled_in_place_traces_them_eagerly(images, tmp_path):
    # torch.jit.trace refused the compiled block deep inside torch, where the merged graph exported
    model = trained(5).eval()
    model.blocks[0].compile(backend="eager")
    expected = logits(model, images)
    graph = nv.export_onnx(model, tmp_path / "tasks.onnx", tasks_as_inputs=True)
    task = nv.save_adapter(model, tmp_path / "task", bits=32)
    feeds = {"images": images.numpy(), **nv.onnx_task_inputs(task, graph)}
    assert np.abs(session(graph).run(None, feeds)[0] - expected.numpy()).max() <= 1e-4
    assert model.blocks[0].__dict__.get("_compiled_call_impl") is not None  # the model itself is left compiled


def test_a_peft_model_is_refused_by_the_calls_that_adapt_or_serve_it_naming_the_plain_model(tmp_path):
    """A peft model's parameter names differ from the plain model's: load_adapter blamed timm constructor settings
    (init_values, reg_tokens), and MultiTaskModel took the peft model, to refuse each task the same way later."""
    peft = pytest.importorskip("peft")
    model = trained(4)
    directory = nv.save_adapter(model, tmp_path / "adapter")
    nv.export_peft(model, tmp_path / "peft")
    message = r"the model is a peft PeftModel, and nola_vision adapts and loads into the plain timm model.*unload\(\)"
    for call in (lambda served: nv.load_adapter(served, directory), nv.MultiTaskModel,
                 lambda served: nv.inject(served, nv.LoRAConfig()), nv.count_parameters):  # counts: adapter 0, head 2x
        with pytest.raises(ValueError, match=message):
            call(peft.PeftModel.from_pretrained(tiny_vit(), str(tmp_path / "peft")))
    served = peft.PeftModel.from_pretrained(tiny_vit(), str(tmp_path / "peft"))
    nv.load_adapter(served.unload(), directory)  # the plain model the message names takes the adapter


def test_a_float16_model_exports_and_runs_in_onnx_runtime(images, tmp_path):
    model = trained(5).eval().half()
    graph = nv.export_onnx(model, tmp_path / "half.onnx")
    outputs = session(graph).run(None, {"images": images.half().numpy()})[0]
    assert outputs.dtype == np.float16
    expected = logits(model.float(), images)
    assert np.abs(outputs.astype(np.float32) - expected.numpy()).max() <= 2e-2


def test_what_a_graph_cannot_hold_in_half_precision_is_refused_naming_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"no bfloat16 Conv.*export a float16 or float32 copy"):
        nv.export_onnx(trained(5).to(torch.bfloat16), tmp_path / "bfloat16.onnx")
    with pytest.raises(ValueError, match=r"takes the float32 arrays of nv.onnx_task_inputs.*model.float\(\)"):
        nv.export_onnx(trained(5).half(), tmp_path / "tasks.onnx", tasks_as_inputs=True)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def reentrant_checkpointing():
    """timm's re-entrant gradient checkpointing (``set_reentrant_ckpt``), its previous setting restored after."""
    import timm.layers

    previous = timm.layers.use_reentrant_ckpt()
    timm.layers.set_reentrant_ckpt(True)
    yield
    timm.layers.set_reentrant_ckpt(previous)


@pytest.mark.parametrize("tasks_as_inputs", [False, True])
def test_a_model_training_with_reentrant_checkpointing_exports_and_keeps_checkpointing(
        images, tmp_path, reentrant_checkpointing, tasks_as_inputs):
    model = trained(6).train()
    model.set_grad_checkpointing(True)
    graph = nv.export_onnx(model, tmp_path / "checkpointed.onnx", tasks_as_inputs=tasks_as_inputs)
    assert model.grad_checkpointing and model.training  # the model trains on as it was
    feeds = {"images": images.numpy()}
    if tasks_as_inputs:
        feeds.update(nv.onnx_task_inputs(nv.save_adapter(model, tmp_path / "task", bits=32), graph))
    outputs = session(graph).run(None, feeds)[0]
    assert np.abs(outputs - logits(model.eval(), images).numpy()).max() <= 1e-4


def test_a_multitask_model_is_refused_naming_what_to_export_instead(tmp_path):
    served = nv.MultiTaskModel(tiny_vit())
    for size in (None, (3, 32, 32)):
        with pytest.raises(TypeError, match=r"tasks_as_inputs=True.*nv.onnx_task_inputs"):
            nv.export_onnx(served, tmp_path / "served.onnx", input_size=size)
    assert list(tmp_path.iterdir()) == []


# ---- the path a single-file export writes to -----------------------------------------------------------------
def test_an_existing_directory_at_the_path_is_refused_before_the_export_runs(tmp_path, monkeypatch):
    target = tmp_path / "model.onnx"
    target.mkdir()
    (target / "notes.txt").write_text("mine")

    def traced(*args, **kwargs):
        raise AssertionError("the export ran")

    monkeypatch.setattr(torch.onnx, "export", traced)
    with pytest.raises(IsADirectoryError, match=f"{target} is an existing directory"):
        nv.export_onnx(trained(0), target)
    assert (target / "notes.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_a_path_ending_in_a_separator_is_refused(tmp_path):
    for path in (f"{tmp_path / 'exports'}/", f"{tmp_path / 'exports'}{os.sep}"):
        with pytest.raises(IsADirectoryError, match="ends in a path separator"):
            nv.export_onnx(trained(0), path)
    assert list(tmp_path.iterdir()) == []


def test_a_path_under_a_file_is_refused_naming_the_file(tmp_path):
    (tmp_path / "exports").write_text("mine")
    with pytest.raises(NotADirectoryError, match=f"lies under {tmp_path / 'exports'}, an existing file"):
        nv.export_onnx(trained(0), tmp_path / "exports" / "model.onnx")
    assert (tmp_path / "exports").read_text() == "mine"


def test_an_existing_file_that_is_not_a_graph_is_refused_and_an_earlier_graph_replaced(images, tmp_path, monkeypatch):
    """A checkpoint or an adapter's config named by mistake was overwritten by the graph."""
    checkpoint, config = tmp_path / "last.ckpt", tmp_path / "adapter_config.json"
    checkpoint.write_bytes(b"PK\x03\x04" + bytes(64))
    config.write_text('{"format": "nola_vision.adapter/3"}')
    # a safetensors file starts with its header's length: 0x08 first where it is 8 modulo 256 (1 in 32 adapters)
    tensors = tmp_path / "adapter_model.safetensors"
    header = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'.ljust(0x1008)
    tensors.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    garbage = tmp_path / "notes.bin"  # ONNX-like first bytes, but no graph
    garbage.write_bytes(b"\x08\x07\x12\x03abc" + bytes(16))
    with monkeypatch.context() as patched:
        patched.setattr(torch.onnx, "export", lambda *a, **k: pytest.fail("the export ran"))
        for victim in (checkpoint, config, tensors, garbage):
            before = victim.read_bytes()
            for tasks_as_inputs in (False, True):
                with pytest.raises(ValueError, match="exists and is not an ONNX graph"):
                    nv.export_onnx(trained(0), victim, tasks_as_inputs=tasks_as_inputs)
            assert victim.read_bytes() == before
    graph = tmp_path / "model.onnx"
    nv.export_onnx(trained(0).eval(), graph)
    model = trained(1).eval()
    nv.export_onnx(model, graph)  # the earlier export is replaced
    assert np.abs(session(graph).run(None, {"images": images.numpy()})[0] - logits(model, images).numpy()).max() <= 1e-4


def test_a_symlinked_file_is_written_through_and_stays_a_link(images, tmp_path):
    real = tmp_path / "store" / "v1.onnx"
    real.parent.mkdir()
    nv.export_onnx(trained(5).eval(), real)  # an earlier export, replaced through the link
    link = tmp_path / "current.onnx"
    link.symlink_to(real)
    model = trained(6).eval()
    nv.export_onnx(model, link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    outputs = session(real).run(None, {"images": images.numpy()})[0]
    assert np.abs(outputs - logits(model, images).numpy()).max() <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current.onnx", "store"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["v1.onnx"]


@pytest.mark.skipif(os.name != "posix", reason="a live writer's temporary file is told by its flock")
def test_temporary_files_a_killed_export_left_are_removed_and_live_ones_kept(tmp_path):
    import fcntl

    target = tmp_path / "model.onnx"
    stale, live = tmp_path / ".model.onnx.nv-k1ll3d_x.tmp", tmp_path / ".model.onnx.nv-wr1t1ng_.tmp"
    # a user's own files, including one shaped like mkstemp's names but without the library's mark
    others = [tmp_path / name for name in (".model.onnx.nv-short.tmp", ".model.onnx.nv-abcdefgh.tmp.keep",
                                           ".other.onnx.nv-abcdefgh.tmp", ".model.onnx.abcdefgh.staged-00",
                                           ".model.onnx.abcd1234.tmp")]
    for path in (stale, live, *others):
        path.write_bytes(b"partial")
    with open(live, "rb") as writer:  # another writer of the same path, still writing
        fcntl.flock(writer, fcntl.LOCK_EX)
        nv.export_onnx(trained(0), target)
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"second write")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (target, live, *others))
    assert target.read_bytes() == b"second write"


@pytest.mark.skipif(os.name != "posix", reason="symlinks")
def test_a_symlink_to_a_missing_folder_is_refused_without_creating_it(tmp_path):
    link = tmp_path / "model.onnx"
    link.symlink_to(tmp_path / "missing" / "model.onnx")
    with pytest.raises(FileNotFoundError, match="symlink to .*missing.*whose folder does not exist"):
        with atomic_path(link) as tmp:
            tmp.write_bytes(b"graph")
    assert not (tmp_path / "missing").exists() and link.is_symlink()


def test_a_graph_of_a_model_without_pooling_refuses_a_task_that_pools(tmp_path):
    graph = nv.export_onnx(nv.inject(tiny_vit(global_pool=""), CONFIG), tmp_path / "tasks.onnx", tasks_as_inputs=True)
    task = nv.save_adapter(trained(0), tmp_path / "token")
    with pytest.raises(nv.AdapterLoadError, match=r"trained with global_pool='token', the graph pools with ''"):
        nv.onnx_task_inputs(task, graph)


def test_a_target_whose_name_is_too_long_for_a_suffix_is_still_written(tmp_path):
    target = tmp_path / ("m" * 250)
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"graph")
    assert target.read_bytes() == b"graph" and list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("length", [229, 230])
def test_a_graph_name_long_enough_to_fill_its_private_folders_name_exports(tmp_path, length):
    """At exactly 230 bytes, the folder the exporter works in beside its temporary file (``.<name>.nv-<8>.tmp.<8>``)
    took 256 bytes, and the export failed as if the disk had."""
    path = tmp_path / ("g" * (length - 5) + ".onnx")
    nv.export_onnx(trained(0), path)
    assert path.is_file() and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
