"""ONNX export: one graph with the task as inputs serves every task of a backbone; the default export is merged."""
import copy
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import as_if_trained, tiny_vit

import nola_vision as nv

ort = pytest.importorskip("onnxruntime")

CONFIGS = {
    "nola_mlp_qv": lambda: nv.NOLAConfig(rank=4, num_basis_a=96, num_basis_b=96,
                                         targets=["mlp.fc1", "mlp.fc2", "attn.q", "attn.v"]),
    "lora_qv_fc1": lambda: nv.LoRAConfig(rank=4, alpha=8, targets=["attn.q", "attn.v", "mlp.fc1"]),
    "linear": lambda: "linear",
}


def _task(config, directory: Path, seed: int, bits: int = 16, **model_kwargs) -> Path:
    """A saved task whose adapter and head hold distinct trained values."""
    return nv.save_adapter(as_if_trained(nv.inject(tiny_vit(**model_kwargs), config), seed=seed, scale=0.5), directory,
                           bits=bits)


def _session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _merged_logits(task: Path, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return nv.merge(nv.load_adapter(tiny_vit(), task))(images)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_one_task_input_graph_gives_each_tasks_merged_logits(method, images, tmp_path):
    # The three tasks are stored at 16, 8 and 4 bits: float, integer and packed codes all feed the graph.
    tasks = [_task(CONFIGS[method](), tmp_path / f"task{seed}", seed, bits) for seed, bits in ((0, 16), (1, 8), (2, 4))]
    path = nv.export_onnx(nv.load_adapter(tiny_vit(), tasks[0]), tmp_path / "tasks.onnx", tasks_as_inputs=True)
    session = _session(path)
    outputs = []
    for task, graph in zip(tasks, (None, path, session)):  # checked against the graph by path or by session
        inputs = nv.onnx_task_inputs(task, graph)
        assert all(value.dtype == np.float32 for value in inputs.values())
        logits = torch.from_numpy(session.run(None, {"images": images[:3].numpy(), **inputs})[0])
        assert (logits - _merged_logits(task, images[:3])).abs().max() <= 1e-4  # 3 images: the batch axis is dynamic
        outputs.append(logits)
    assert min((a - b).abs().max() for a, b in [(outputs[0], outputs[1]), (outputs[1], outputs[2])]) > 1e-2


@pytest.mark.parametrize("name", ["tasks.json", "tasks.textproto", "tasks.onnxtxt"])
def test_a_graph_written_under_a_text_formats_suffix_is_read_back_and_replaced(name, images, tmp_path):
    # export_onnx writes binary protobuf whatever the suffix; onnx.load chose a JSON or text parser from it
    task = _task(CONFIGS["lora_qv_fc1"](), tmp_path / "task", 1)
    path = nv.export_onnx(nv.inject(tiny_vit(), CONFIGS["lora_qv_fc1"]()), tmp_path / name, tasks_as_inputs=True)
    inputs = nv.onnx_task_inputs(task, path)
    path = nv.export_onnx(nv.inject(tiny_vit(), CONFIGS["lora_qv_fc1"]()), path, tasks_as_inputs=True)  # replaced
    logits = torch.from_numpy(_session(path).run(None, {"images": images[:2].numpy(), **inputs})[0])
    assert (logits - _merged_logits(task, images[:2])).abs().max() <= 1e-4


def test_the_graph_holds_the_frozen_weights_and_bases_and_takes_only_what_a_task_trains(tmp_path):
    model = nv.inject(tiny_vit(), CONFIGS["nola_mlp_qv"]())
    session = _session(nv.export_onnx(model, tmp_path / "tasks.onnx", tasks_as_inputs=True))
    inputs = {i.name: i.shape for i in session.get_inputs()}
    assert inputs.pop("images") == ["batch", 3, 32, 32]
    assert inputs == {name: list(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    metadata = session.get_modelmeta().custom_metadata_map
    assert metadata["nola_vision.num_classes"] == "5" and metadata["nola_vision.backbone"] == "vit_tiny_patch16_224"


def test_default_export_is_the_merged_model_and_leaves_the_model_as_it_was(images, tmp_path):
    model = as_if_trained(nv.inject(tiny_vit(), CONFIGS["nola_mlp_qv"]()), seed=3, scale=0.5)
    with torch.no_grad():
        expected = model(images)
    session = _session(nv.export_onnx(torch.compile(model, backend="eager"), tmp_path / "merged.onnx"))
    assert [i.name for i in session.get_inputs()] == ["images"]
    logits = session.run(None, {"images": images.numpy()})[0]
    assert np.abs(logits - expected.numpy()).max() <= 1e-4
    assert not any(layer.merged for layer in nv.adapted_layers(model).values())
    with torch.no_grad():
        assert torch.equal(model(images), expected)


def test_task_input_export_restores_the_models_mode_and_parameters(images, tmp_path):
    model = as_if_trained(nv.inject(tiny_vit(), CONFIGS["lora_qv_fc1"]()), seed=4, scale=0.5).train()
    nv.set_quantization_aware(model, 8)
    parameters = dict(model.named_parameters())
    nv.export_onnx(model, tmp_path / "tasks.onnx", tasks_as_inputs=True)
    assert model.training and all(layer.quant_bits == 8 for layer in nv.adapted_layers(model).values())
    assert all(parameter is parameters[name] for name, parameter in model.named_parameters())


def interrupt_on_call(owner, name, call, caller=None):
    """``owner.name`` raising KeyboardInterrupt (a Ctrl-C at that moment) on its ``call``-th call (from a function
    named ``caller``, if given)."""
    original, calls = getattr(owner, name), [0]

    def interrupted(*args, **kwargs):
        calls[0] += caller is None or sys._getframe(1).f_code.co_name == caller
        if calls[0] == call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    return interrupted


@pytest.mark.parametrize("owner, name, call, caller", [
    (torch.nn.Module, "train", 5, None), (torch.nn.Module, "get_submodule", 3, "_substituted"),
    (nv.AdaptedLinear, "delta_factors_of", 2, None)])
def test_a_task_input_export_stopped_by_ctrl_c_leaves_the_model_as_it_was(owner, name, call, caller, images,
                                                                         monkeypatch, tmp_path):
    """Set before their restoring blocks began, a Ctrl-C left part of a training model in eval mode, trained
    coefficients swapped for the graph's plain inputs (which no longer trained), or a pass's factors on a layer,
    which its next pass used though an optimizer step had changed the coefficients since."""
    model = as_if_trained(nv.inject(tiny_vit(), CONFIGS["nola_mlp_qv"]()), seed=4, scale=0.5).train()
    parameters = dict(model.named_parameters())
    monkeypatch.setattr(owner, name, interrupt_on_call(owner, name, call, caller))
    with pytest.raises(KeyboardInterrupt):
        nv.export_onnx(model, tmp_path / "tasks.onnx", tasks_as_inputs=True)
    monkeypatch.undo()
    assert all(module.training for module in model.modules())
    assert all(parameter is parameters[name] for name, parameter in model.named_parameters())
    assert all(layer.batched_factors is None for layer in nv.adapted_layers(model).values())
    assert not (tmp_path / "tasks.onnx").exists()


def test_a_task_that_does_not_fit_the_graph_is_refused_naming_the_fix(tmp_path):
    config = CONFIGS["nola_mlp_qv"]
    path = nv.export_onnx(nv.inject(tiny_vit(), config()), tmp_path / "tasks.onnx", tasks_as_inputs=True)
    other_seed, other_size = replace(config(), seed=1), replace(config(), num_basis_a=64)
    # at 8 and 4 bits too (their head codes were decoded to the graph's shape first: "holds 50 bytes of 8-bit codes");
    # a wider backbone of the same name names the layer (not its bases)
    cases = [(_task(config(), tmp_path / f"ten{bits}", 0, bits, num_classes=10),
              "one graph serves one head size.*num_classes=10") for bits in (16, 8, 4)]
    cases += [(_task(config(), tmp_path / f"wide{bits}", 0, bits, embed_dim=96),
               r"its layer blocks\.0\.attn\.qkv is 96→288, the graph's 64→192; export a graph from a model of the "
               "architecture and sizes") for bits in (16, 8)]
    cases += [(_task(config(), tmp_path / "ten", 0, num_classes=10), "one graph serves one head size.*num_classes=10"),
             (_task(other_seed, tmp_path / "seed", 0), "config"),
             (_task(other_size, tmp_path / "size", 0), "config"),
             (_task(CONFIGS["lora_qv_fc1"](), tmp_path / "lora", 0), "config"),
             (_task(config(), tmp_path / "heads", 0, num_heads=4), r"'attention_heads': \[4, 4\].*\[2, 2\]")]
    for task, message in cases:
        for graph in (path, _session(path)):
            with pytest.raises(nv.AdapterLoadError, match=message):
                nv.onnx_task_inputs(task, graph)
    merged = nv.export_onnx(nv.inject(tiny_vit(), config()), tmp_path / "merged.onnx")
    with pytest.raises(nv.AdapterLoadError, match="tasks_as_inputs=True"):
        nv.onnx_task_inputs(_task(config(), tmp_path / "fits", 0), merged)


@pytest.mark.parametrize("graph_config, task_config", [
    (nv.NOLAConfig(rank=2, num_basis_a=16, num_basis_b=16, scale=1.0, targets=["attn.q", "mlp.fc1"]),
     nv.NOLAConfig(rank=2, num_basis_a=16, num_basis_b=16, scale=1, targets=["mlp.fc1", "attn.q"], init="zero_delta",
                   recompute_activation=False)),
    (nv.LoRAConfig(rank=2, alpha=8.0), nv.LoRAConfig(rank=2, alpha=8, seed=7)),
], ids=["nola", "lora"])
def test_a_task_whose_config_gives_the_same_update_fits_the_graph(graph_config, task_config, images, tmp_path):
    # the configs were compared as JSON text: scale 1 against 1.0, targets in another order, and fields that shape
    # training alone (init, recompute_activation, LoRA's seed) refused the task ("export a graph from a model with that
    # config")
    path = nv.export_onnx(nv.inject(tiny_vit(), graph_config), tmp_path / "tasks.onnx", tasks_as_inputs=True)
    task = _task(task_config, tmp_path / "task", 1, bits=32)
    logits = _session(path).run(None, {"images": images[:2].numpy(), **nv.onnx_task_inputs(task, path)})[0]
    assert (torch.from_numpy(logits) - _merged_logits(task, images[:2])).abs().max() <= 1e-4
    with pytest.raises(nv.AdapterLoadError, match="its config is .*export a graph from a model with that config"):
        nv.onnx_task_inputs(_task(replace(task_config, rank=4), tmp_path / "rank", 1), path)


def test_a_task_input_export_of_a_model_holding_a_submodule_s_own_injection_is_refused(tmp_path):
    # the graph took the inner layers' tensors as inputs under the outer config ("linear"): no task fitted it
    model = nv.inject(tiny_vit(), "linear")
    nv.inject(model.blocks[0], CONFIGS["nola_mlp_qv"]())
    with pytest.raises(ValueError, match=r"its submodule blocks.0 was injected on its own"):
        nv.export_onnx(model, tmp_path / "tasks.onnx", tasks_as_inputs=True)
    assert not (tmp_path / "tasks.onnx").exists()


def test_task_input_export_refuses_what_one_graph_cannot_serve(tmp_path):
    per_layer = nv.NOLAConfig(rank=2, num_basis_a=16, num_basis_b=16, basis="per_layer", targets=["mlp.fc1"])
    cases = [(nv.inject(tiny_vit(), per_layer), "basis='shared'"),
             (nv.merge(nv.inject(tiny_vit(), CONFIGS["lora_qv_fc1"]())), r"nv.unmerge\(model\)"),
             (nv.inject(tiny_vit(), "full"), "full fine-tuning"),
             (tiny_vit(), "no adapters")]
    for model, message in cases:
        with pytest.raises(ValueError, match=message):
            nv.export_onnx(model, tmp_path / "tasks.onnx", tasks_as_inputs=True)
    assert not (tmp_path / "tasks.onnx").exists()


def test_task_input_export_refuses_a_model_that_trains_a_weight_the_graph_would_hold_as_a_constant(tmp_path):
    # a trained norm (changed by 1%, under the frozen-weight check's tolerance) became a constant that every other
    # task then ran with, silently
    model = nv.inject(tiny_vit(), CONFIGS["nola_mlp_qv"]())
    model.norm.weight.requires_grad_(True)
    with torch.no_grad():
        model.norm.weight.mul_(1.01)
    with pytest.raises(ValueError, match=r"1 trainable parameter\(s\) are not part of a task-input graph's inputs: "
                                         r"\['norm.weight'\]"):
        nv.export_onnx(model, tmp_path / "tasks.onnx", tasks_as_inputs=True)
    assert not (tmp_path / "tasks.onnx").exists()


def test_an_8_bit_task_with_a_head_of_several_layers_takes_its_shapes_from_the_graph(images, tmp_path):
    # onnx_task_inputs guessed (classes, numel // classes) for every integer-coded head tensor: a valid task was
    # refused naming the wrong fix, and without a graph it came back in the wrong shapes
    base = tiny_vit()
    base.head = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.GELU(), torch.nn.Linear(32, 10))
    model = as_if_trained(nv.inject(copy.deepcopy(base), CONFIGS["lora_qv_fc1"]()), seed=1, scale=0.5)
    graph = _session(nv.export_onnx(model, tmp_path / "tasks.onnx", tasks_as_inputs=True))
    task = nv.save_adapter(model, tmp_path / "task", bits=8)
    inputs = nv.onnx_task_inputs(task, graph)
    assert inputs["head.0.weight"].shape == (32, 64) and inputs["head.2.bias"].shape == (10,)
    with torch.no_grad():
        expected = nv.load_adapter(copy.deepcopy(base), task)(images)
    got = graph.run(None, {"images": images.numpy(), **inputs})[0]
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-4)
    with pytest.raises(nv.AdapterLoadError, match=r"head is not one Linear layer .* pass the graph"):
        nv.onnx_task_inputs(task)


def test_a_graph_is_checked_as_an_onnx_model_proto_and_another_type_is_named(tmp_path):
    onnx = pytest.importorskip("onnx")
    config = CONFIGS["nola_mlp_qv"]
    path = nv.export_onnx(nv.inject(tiny_vit(), config()), tmp_path / "tasks.onnx", tasks_as_inputs=True)
    fits, ten = _task(config(), tmp_path / "fits", 0), _task(config(), tmp_path / "ten", 0, num_classes=10)
    by_proto = nv.onnx_task_inputs(fits, onnx.load(str(path)))
    assert {k: v.tolist() for k, v in by_proto.items()} == {k: v.tolist() for k, v in nv.onnx_task_inputs(fits).items()}
    with pytest.raises(nv.AdapterLoadError, match="num_classes=10"):
        nv.onnx_task_inputs(ten, onnx.load(str(path)))
    with pytest.raises(TypeError, match="path, an onnx.ModelProto .* or an onnxruntime.InferenceSession"):
        nv.onnx_task_inputs(fits, path.read_bytes())


@pytest.mark.parametrize("bits", [16, 4])
def test_a_file_recording_a_hand_replaced_heads_stale_class_count_feeds_its_graph(images, tmp_path, bits):
    """Earlier versions recorded timm's num_classes (1000) for ``model.head = nn.Linear(d, 7)``: such files load
    (verify_adapter counts their head's rows), and their task inputs were refused by the graph of their 7 classes."""
    import json

    from nola_vision.adapters import files as adapter_io

    def hand_headed():
        model = tiny_vit(num_classes=1000)
        model.head = torch.nn.Linear(64, 7)
        return model

    directory = nv.save_adapter(as_if_trained(nv.inject(hand_headed(), CONFIGS["nola_mlp_qv"]()), 1, scale=0.5),
                                tmp_path / "a", bits=bits)
    document = json.loads((directory / adapter_io.CONFIG_NAME).read_text())
    document["num_classes"] = 1000
    document["config_sha256"] = adapter_io._document_digest(document)
    (directory / adapter_io.CONFIG_NAME).write_text(json.dumps(document))
    loaded = nv.load_adapter(hand_headed(), directory)
    path = nv.export_onnx(loaded, tmp_path / "tasks.onnx", tasks_as_inputs=True)
    for graph in (None, path):
        inputs = nv.onnx_task_inputs(directory, graph)
        logits = torch.from_numpy(_session(path).run(None, {"images": images[:2].numpy(), **inputs})[0])
        with torch.no_grad():
            assert (logits - loaded.eval()(images[:2])).abs().max() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tasks_as_inputs", [False, True])
def test_an_export_inside_autocast_traces_no_16_bit_casts(dtype, tasks_as_inputs, images, tmp_path):
    # autocast was traced into the graph: float16 products in a float32 graph, bfloat16 ones ONNX Runtime refused
    task = _task(CONFIGS["nola_mlp_qv"](), tmp_path / "task", 1)
    model = nv.load_adapter(tiny_vit(), task)
    with torch.autocast("cpu", dtype=dtype):
        path = nv.export_onnx(model, tmp_path / "graph.onnx", tasks_as_inputs=tasks_as_inputs)
    import onnx

    casts = [node for node in onnx.load(str(path)).graph.node if node.op_type == "Cast"
             and any(attr.name == "to" and attr.i in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
                     for attr in node.attribute)]
    assert not casts
    inputs = nv.onnx_task_inputs(task, path) if tasks_as_inputs else {}
    logits = torch.from_numpy(_session(path).run(None, {"images": images.numpy(), **inputs})[0])
    assert (logits - _merged_logits(task, images)).abs().max() <= 1e-5
