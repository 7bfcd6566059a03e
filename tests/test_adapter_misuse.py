"""Misuse that used to lose a trained adapter or load it silently wrong: QAT changed while merged, peft exports and
adapter files in one directory, trained tensors a file does not hold, edited fields read before the checksum."""
import concurrent.futures
import copy
import json
import pickle
import re
import subprocess
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file
from tiny_models import as_if_trained, tiny_vit

import nola_vision as nv
from nola_vision.adapters.files import CONFIG_NAME, WEIGHTS_NAME, AdapterLoadError
from nola_vision.core.inject import adapter_state
from nola_vision.core.quantize import fake_quantize, head_bits

NOLA = nv.NOLAConfig(rank=2, num_basis_a=16, num_basis_b=16, targets=["mlp.fc1", "attn.v"])
LORA = nv.LoRAConfig(rank=4, targets=["attn.q", "attn.v"])
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def trained(config=NOLA, seed=1, **kwargs):
    return as_if_trained(nv.inject(tiny_vit(**kwargs), config), seed, scale=0.3)


def files_of(directory):
    return {name: (directory / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}


@pytest.mark.parametrize("config", [NOLA, LORA], ids=["nola", "lora"])
def test_quantisation_aware_bits_cannot_change_while_merged_so_unload_gives_back_the_frozen_weights(config):
    model = tiny_vit()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    nv.inject(model, config)
    nv.set_quantization_aware(model, 4)
    as_if_trained(model, 1, scale=0.3)
    nv.merge(model)
    nv.set_quantization_aware(model, 4)  # the same setting: nothing changes
    with pytest.raises(ValueError, match="is merged.*nv.unmerge"):
        nv.set_quantization_aware(model, None)
    with pytest.raises(ValueError, match="is merged"):
        nv.set_quantization_aware(model, 8)
    nv.unload(model)
    head = {name for name in original if name.startswith("head.")}
    for name, value in model.state_dict().items():
        if name not in head:
            torch.testing.assert_close(value, original[name], rtol=0, atol=1e-6, msg=name)


def sequential_head(model):
    model.head = torch.nn.Sequential(torch.nn.Identity(), model.head)
    return model


@pytest.mark.parametrize("build", ["sequential", "normed", "crossvit"])
def test_quantisation_aware_training_sees_every_head_layer_as_the_file_stores_it(tmp_path, build):
    """Only a head that is one Linear was shown at the file's 8-bit width: timm's CrossViT (a Linear per branch in
    a ModuleList) and a Sequential head trained on full-precision values, and the saved adapter gave other outputs."""
    def base():
        torch.manual_seed(0)
        if build == "sequential":
            return sequential_head(tiny_vit())
        if build == "normed":  # a head whose norm holds parameters too (timm's LeViT: batch norm, then Linear)
            model = tiny_vit()
            model.head = torch.nn.Sequential(torch.nn.LayerNorm(64), model.head)
            return model
        return timm.create_model("crossvit_tiny_240", pretrained=False, num_classes=5).eval()

    generator = torch.Generator().manual_seed(0)
    images = IMAGES if build != "crossvit" else torch.randn(1, 3, 240, 240, generator=generator)
    config = NOLA if build != "crossvit" else nv.NOLAConfig(num_basis_a=16, num_basis_b=16)
    model = as_if_trained(nv.inject(base(), config), 1, scale=0.3)
    nv.set_quantization_aware(model, 4)
    model.eval()
    with torch.no_grad():
        trained_outputs = model(images)
    nv.save_adapter(model, tmp_path / "adapter", bits=4)
    loaded = nv.load_adapter(base(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), trained_outputs, rtol=0, atol=0)
        torch.testing.assert_close(nv.merge_and_unload(model)(images), trained_outputs, rtol=1e-5, atol=1e-5)


def test_quantisation_aware_training_runs_each_head_layer_once():
    """Running a head layer a second time with quantised parameters updated a batch norm's statistics twice per
    step and applied the layer's own hooks twice."""
    model = tiny_vit()
    model.head = torch.nn.Sequential(torch.nn.BatchNorm1d(64), model.head)
    calls = []
    counting = model.head[0].register_forward_pre_hook(lambda module, args: calls.append(1))
    nv.set_quantization_aware(nv.inject(model, NOLA), 8)
    model.train()
    model(IMAGES).sum().backward()
    assert model.head[0].num_batches_tracked.item() == 1 and calls == [1]
    assert model.head[0].weight.grad is not None and model.head[1].weight.grad is not None  # straight through
    assert isinstance(model.head[0].weight, torch.nn.Parameter)  # the trained parameter back in place
    norm = model.head[0]
    trained = norm.weight
    interrupt = norm.register_forward_pre_hook(lambda module, args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # an interrupt inside the head (Ctrl-C in a notebook)
        model(IMAGES)
    interrupt.remove()
    counting.remove()
    assert norm.weight is trained and all(isinstance(p, torch.nn.Parameter) for p in model.parameters())
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        nv.set_quantization_aware(copied, None)  # the copy's layers run their own forward again, the original's not
        assert "forward" not in copied.head[0].__dict__ and "forward" in model.head[0].__dict__
    nv.unload(model)
    assert "forward" not in norm.__dict__


class SlowNorm(torch.nn.LayerNorm):
    """A head norm that takes a while: a second thread's call arrives while the first's quantised values are in."""

    def forward(self, x):
        time.sleep(0.005)
        return super().forward(x)


def test_a_quantisation_aware_head_serves_several_threads_and_keeps_its_trained_parameters():
    """A call that started while another thread's quantised tensors were swapped in took them for the trained
    parameters and put them back for good: the trained values were lost, and the optimizer's no longer in the model."""
    model = tiny_vit()
    model.head = torch.nn.Sequential(SlowNorm(64), model.head)
    nv.set_quantization_aware(nv.inject(model, NOLA), 4)
    model.eval()
    norm = model.head[0]
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        expected = model(IMAGES)
    trained = dict(norm.named_parameters())

    def serve(_):
        with torch.no_grad():
            return [model(IMAGES) for _ in range(6)]

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        outputs = [out for outs in pool.map(serve, range(3)) for out in outs]
    assert all(norm._parameters[name] is parameter for name, parameter in trained.items())  # the very Parameters
    assert all(torch.equal(out, expected) for out in outputs)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with torch.no_grad():
            assert torch.equal(copied(IMAGES), expected)


def test_merge_and_unmerge_of_a_model_without_adapters_say_to_inject_first():
    """A never-injected or unloaded model is refused, not returned unchanged as if merged; a linear probe (an
    injected model without adapter layers) merges as the no-op it is."""
    model = tiny_vit()
    for action in (nv.merge, nv.unmerge, nv.unload, nv.merge_and_unload):  # merge_and_unload's said "to unload"
        with pytest.raises(ValueError, match=f"nv.{action.__name__}: VisionTransformer has no nola_vision adapters.*"
                                             "call nv.inject"):
            action(model)
    nv.unload(nv.merge(nv.inject(model, NOLA)))
    with pytest.raises(ValueError, match="nothing to merge"):
        nv.merge(model)
    probe = nv.inject(tiny_vit(), "linear")
    assert nv.unmerge(nv.merge(probe)) is probe


def test_quantisation_aware_full_fine_tuning_is_refused_as_no_file_would_reproduce_it():
    """It was accepted (the classifier refuses it): saving then refused 4 and 8 bits, and 16 bits gave other outputs."""
    model = nv.inject(tiny_vit(), "full")
    with pytest.raises(ValueError, match=r"full fine-tuning .* 16 or 32 bits only .* quantisation-aware training at 4 "
                                         r"bits would train a model no file reproduces"):
        nv.set_quantization_aware(model, 4)
    assert nv.set_quantization_aware(model, None) is model  # off is what it is


def test_quantisation_aware_training_of_a_model_without_adapters_says_to_inject_first():
    model = tiny_vit()
    with pytest.raises(ValueError, match="has no nola_vision adapters.*call nv.inject"):
        nv.set_quantization_aware(model, 4)
    nv.set_quantization_aware(model, None)  # off is what a plain model already is
    nv.set_quantization_aware(nv.inject(model, NOLA), 4)
    assert {layer.quant_bits for layer in nv.adapted_layers(model).values()} == {4}


def test_export_peft_and_save_adapter_never_replace_each_others_files(tmp_path):
    model = trained(LORA)
    nv.save_adapter(model, tmp_path / "ours")
    before = files_of(tmp_path / "ours")
    with pytest.raises(ValueError, match="holds a nola_vision adapter.*another directory"):
        nv.export_peft(model, tmp_path / "ours")
    assert files_of(tmp_path / "ours") == before
    nv.load_adapter(tiny_vit(), tmp_path / "ours")

    nv.export_peft(model, tmp_path / "peft")
    exported = files_of(tmp_path / "peft")
    with pytest.raises(ValueError, match="holds a peft LoRA export"):
        nv.save_adapter(model, tmp_path / "peft")
    assert files_of(tmp_path / "peft") == exported
    with pytest.raises(AdapterLoadError, match=r"peft adapter .*peft.PeftModel.from_pretrained"):
        nv.load_adapter(tiny_vit(), tmp_path / "peft")


def test_a_quantisation_aware_model_exports_its_head_to_peft_as_it_sees_it(tmp_path):
    model = trained(LORA)
    nv.set_quantization_aware(model, 4)
    nv.export_peft(model, tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    for key in ("weight", "bias"):
        expected = fake_quantize(getattr(model.head, key).detach(), head_bits(4))
        assert not torch.equal(expected, getattr(model.head, key).detach())  # the test can tell the two apart
        torch.testing.assert_close(tensors[f"base_model.model.head.{key}"], expected, rtol=0, atol=0)


def test_save_refuses_trainable_parameters_the_file_would_not_hold(tmp_path):
    model = trained()
    model.pos_embed.requires_grad_(True)
    with pytest.raises(ValueError, match=r"1 trainable parameter\(s\) are not part of an adapter file: \['pos_embed"):
        nv.save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    model.pos_embed.requires_grad_(False)
    nv.save_adapter(model, tmp_path / "a")


def test_full_fine_tuning_refuses_integer_codes_for_its_weights(tmp_path):
    model = nv.inject(tiny_vit(), "full")
    for bits in (8, 4):
        with pytest.raises(ValueError, match=f"bits={bits} .*full fine-tuning.*bits=16 or 32"):
            nv.save_adapter(model, tmp_path, bits=bits)
    nv.save_adapter(model, tmp_path, bits=16)
    with torch.no_grad():
        torch.testing.assert_close(nv.load_adapter(tiny_vit(), tmp_path)(IMAGES), model(IMAGES), rtol=0, atol=1e-2)


def test_saving_at_other_bits_than_quantisation_aware_training_warns(tmp_path):
    model = trained()
    nv.set_quantization_aware(model, 4)
    with pytest.warns(UserWarning, match="trains against 4-bit .* saved at bits=16"):
        nv.save_adapter(model, tmp_path / "16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nv.save_adapter(model, tmp_path / "4", bits=4)


def test_a_linear_probe_saved_at_other_bits_than_its_quantisation_aware_head_warns(tmp_path):
    probe = nv.inject(tiny_vit(), "linear")
    nv.set_quantization_aware(probe, 4)  # no adapted layers: only the head is seen at its stored width
    with pytest.warns(UserWarning, match="trains against 4-bit .*head at 8 bits.* saved at bits=16"):
        nv.save_adapter(probe, tmp_path / "16")


def test_export_peft_refuses_trainable_parameters_it_would_not_carry(tmp_path):
    model = trained(LORA)
    model.norm.bias.requires_grad_(True)  # unfrozen by hand and trained: a peft export holds factors and head only
    with pytest.raises(ValueError, match=r"1 trainable parameter\(s\) are not part of a peft export: \['norm.bias"):
        nv.export_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    model.norm.bias.requires_grad_(False)
    nv.export_peft(model, tmp_path / "peft")


@pytest.mark.parametrize("config", [NOLA, LORA, "linear"], ids=["nola", "lora", "linear"])
def test_loading_onto_a_quantisation_aware_model_gives_the_saved_outputs_or_is_refused(tmp_path, config):
    saved = trained(config)
    nv.set_quantization_aware(saved, 4)
    nv.save_adapter(saved, tmp_path / "4", bits=4)
    nv.set_quantization_aware(saved, None)
    nv.save_adapter(saved, tmp_path / "16", bits=16)
    model = nv.set_quantization_aware(trained(config, seed=2), 4)  # the model that trained another task at 4 bits
    nv.merge(model)
    with torch.no_grad():
        before = model(IMAGES)
        with pytest.raises(ValueError, match="quantisation-aware at 4 bits .*16-bit adapter .*set_quantization_aware"):
            nv.load_adapter(model, tmp_path / "16")
        torch.testing.assert_close(model(IMAGES), before, rtol=0, atol=0)  # refused before anything changed
        nv.load_adapter(model, tmp_path / "4")  # at its own bits: the model sees the file's values as they are
        expected = nv.load_adapter(tiny_vit(), tmp_path / "4")(IMAGES)
        torch.testing.assert_close(model(IMAGES), expected, rtol=0, atol=1e-5)
        nv.unmerge(model)
        nv.set_quantization_aware(model, None)
        nv.load_adapter(model, tmp_path / "16")
        torch.testing.assert_close(model(IMAGES), nv.load_adapter(tiny_vit(), tmp_path / "16")(IMAGES),
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("config", [NOLA, LORA], ids=["nola", "lora"])
def test_a_file_loaded_into_a_model_training_at_its_bits_shows_exactly_the_values_training_saw(tmp_path, config, bits):
    """Fake quantisation of values decoded from a file recomputed the step from their decoded maximum, which moved
    some by one float32 step: the loaded model's outputs were not those of the model that trained."""
    saved = nv.set_quantization_aware(trained(config), bits)
    nv.save_adapter(saved, tmp_path / "a", bits=bits)
    loaded = nv.set_quantization_aware(nv.inject(tiny_vit(), config), bits)
    nv.load_adapter(loaded, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(loaded(IMAGES), saved(IMAGES))
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):  # quantising decoded values again gives them back: the same grid
        values = torch.randn(37, generator=generator) * torch.rand(1, generator=generator) * 3
        decoded = fake_quantize(values, bits)
        assert torch.equal(fake_quantize(decoded, bits), decoded)


def test_values_on_a_grid_several_float32_steps_off_the_recomputed_step_are_shown_as_the_file_stores_them(tmp_path):
    """A head bias a few float32 steps off a grid (a small optimizer update) lies on a grid whose step is 7 float32
    steps from the recomputed one: quantisation-aware training looked 4 steps either side and decoded it with the
    recomputed step, while the file (which looks 32 either side) stored it as it was. A plain load then differed from
    the training-time forward pass by a float32 step."""
    from nola_vision.core.quantize import dequantize, grid_step, quantize

    model = nv.set_quantization_aware(nv.inject(tiny_vit(num_classes=3), "linear"), 8)
    bias = torch.tensor([10.057745933532715, 9.377175331115723, 9.740145683288574])
    codes, minimum, step = quantize(bias, 8)
    found = grid_step(bias, codes, minimum, step)
    assert found != step and torch.equal(dequantize(codes, minimum, found), bias)  # on a grid, not the recomputed one
    with torch.no_grad():
        model.head.bias.copy_(bias)
        seen = model(IMAGES)
    assert torch.equal(fake_quantize(bias, 8), bias)
    nv.save_adapter(model, tmp_path / "a", bits=8)
    with torch.no_grad():
        assert torch.equal(nv.load_adapter(tiny_vit(num_classes=3), tmp_path / "a")(IMAGES), seen)


@pytest.mark.parametrize("config", [NOLA, "linear"], ids=["nola", "linear"])
def test_merge_and_unload_of_a_quantisation_aware_model_keeps_its_outputs(config):
    model = nv.set_quantization_aware(trained(config), 4)
    with torch.no_grad():
        seen = model(IMAGES)
        assert not torch.allclose(nv.set_quantization_aware(trained(config), None)(IMAGES), seen, rtol=0, atol=1e-4)
        plain = nv.merge_and_unload(model)
        assert nv.adapted_layers(plain) == {} and not plain.head._forward_hooks
        torch.testing.assert_close(plain(IMAGES), seen, rtol=0, atol=1e-5)


@pytest.mark.parametrize("field, value", [("num_classes", 6), ("backbone", "vit_small_patch16_224"),
                                          ("seed", 7), ("rank", 3)])
def test_an_edited_field_is_reported_as_an_edit_before_any_advice_drawn_from_it(tmp_path, field, value):
    nv.save_adapter(trained(), tmp_path)
    document = json.loads((tmp_path / CONFIG_NAME).read_text())
    (document["config"] if field in ("seed", "rank") else document)[field] = value
    (tmp_path / CONFIG_NAME).write_text(json.dumps(document))
    with pytest.raises(AdapterLoadError, match="edited or damaged after it was saved"):
        nv.load_adapter(tiny_vit(), tmp_path)
    with pytest.raises(AdapterLoadError, match="edited or damaged after it was saved"):
        nv.onnx_task_inputs(tmp_path)


def test_a_directory_in_place_of_an_adapter_file_is_named(tmp_path):
    nv.save_adapter(trained(), tmp_path)
    (tmp_path / CONFIG_NAME).unlink()
    (tmp_path / CONFIG_NAME).mkdir()
    with pytest.raises(AdapterLoadError, match=f"{CONFIG_NAME} is a directory where save_adapter writes a file"):
        nv.load_adapter(tiny_vit(), tmp_path)
    with pytest.raises(AdapterLoadError, match="is a directory"):
        nv.MultiTaskModel(tiny_vit()).add_task("a", tmp_path)


def test_inject_refuses_a_plan_made_for_another_head():
    plan = nv.plan_injection(tiny_vit(num_classes=10), NOLA)
    model = tiny_vit(num_classes=5)
    with pytest.raises(ValueError, match="plan was made for a model whose classifier head has"):
        nv.inject(model, plan)
    assert not nv.adapted_layers(model)


def test_a_file_from_a_newer_nola_vision_asks_for_an_upgrade(tmp_path):
    nv.save_adapter(trained(), tmp_path)
    document = json.loads((tmp_path / CONFIG_NAME).read_text())
    document["format"] = "nola_vision.adapter/99"
    (tmp_path / CONFIG_NAME).write_text(json.dumps(document))
    with pytest.raises(AdapterLoadError, match="newer nola_vision.*upgrade"):
        nv.load_adapter(tiny_vit(), tmp_path)


def test_paths_that_cannot_hold_an_adapter_give_clear_errors(tmp_path):
    model = trained()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="lies under .*afile, an existing file"):
        nv.save_adapter(model, tmp_path / "afile" / "sub")
    assert (tmp_path / "afile").read_text() == "x"
    for path, what in ((tmp_path / "missing", "missing"), (tmp_path / "afile", "a file")):
        with pytest.raises(AdapterLoadError, match=f"is {what}, not an adapter directory"):
            nv.adapter_size_bytes(path)
    with pytest.raises(TypeError, match="task name is a non-empty str"):
        nv.MultiTaskModel(tiny_vit()).add_task(7, tmp_path)


def test_the_size_of_an_adapter_behind_a_symbolic_link_loop_says_it_cannot_be_read(tmp_path):
    """A weights file that is a link loop raised a bare OSError (ELOOP); a looping directory was called missing."""
    directory = nv.save_adapter(trained(), tmp_path / "task")
    weights = directory / WEIGHTS_NAME
    weights.unlink()
    weights.symlink_to(weights)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for path, named in ((directory, weights), (tmp_path / "loop", tmp_path / "loop")):
        with pytest.raises(AdapterLoadError, match=rf"{re.escape(str(named))} cannot be read \(Too many levels of "
                                                   r"symbolic links\): a symbolic link on its path leads back"):
            nv.adapter_size_bytes(path)


def test_a_name_too_long_for_the_staging_siblings_still_saves_and_resaves(tmp_path):
    target = tmp_path / ("a" * 250)
    model = trained()
    nv.save_adapter(model, target, bits=32)
    nv.save_adapter(trained(seed=2), target, bits=32)
    with torch.no_grad():
        torch.testing.assert_close(nv.load_adapter(tiny_vit(), target)(IMAGES), trained(seed=2)(IMAGES))
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [target.name]


def test_a_file_that_is_not_an_onnx_graph_is_named(tmp_path):
    pytest.importorskip("onnx")
    nv.save_adapter(trained(), tmp_path / "task")
    (tmp_path / "junk.onnx").write_bytes(b"\x08\xff\xff not a graph")
    with pytest.raises(AdapterLoadError, match="junk.onnx cannot be read as an ONNX graph"):
        nv.onnx_task_inputs(tmp_path / "task", tmp_path / "junk.onnx")


@pytest.mark.parametrize("name, text", [("graph.json", "{not json"), ("graph.json", '{"graph": 3}'),
                                        ("graph.textproto", "not: [a graph"), ("graph.onnxtxt", "<not a graph"),
                                        ("graph.json", b"\xff\xfe binary")])
def test_a_text_file_that_is_not_an_onnx_graph_is_named_whatever_its_extension(tmp_path, name, text):
    # onnx.load picks its parser from the extension: a .json or .textproto raised protobuf's own ParseError
    pytest.importorskip("onnx")
    nv.save_adapter(trained(), tmp_path / "task")
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # onnx calls its .onnxtxt reader experimental
        with pytest.raises(AdapterLoadError, match=rf"{name} cannot be read as an ONNX graph"):
            nv.onnx_task_inputs(tmp_path / "task", path)


def test_two_saves_of_the_same_values_in_two_processes_are_the_same_bytes(tmp_path):
    """safetensors writes its metadata in a per-process hash order: the files (and weights_sha256) must not."""
    script = ("import sys; sys.path.insert(0, sys.argv[2]); import nola_vision as nv; "
              "from tiny_models import as_if_trained, tiny_vit; "
              "m = as_if_trained(nv.inject(tiny_vit(), nv.LoRAConfig(rank=2)), 1, scale=0.3); "
              "nv.save_adapter(m, sys.argv[1], bits=4)")
    tests = str(Path(__file__).resolve().parent)
    for name in ("a", "b", "c"):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / name), tests], check=True)
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b") == files_of(tmp_path / "c")
    nv.load_adapter(tiny_vit(), tmp_path / "a")


def test_the_weights_header_is_rewritten_with_sorted_metadata_and_the_same_length():
    from safetensors.torch import load, save

    from nola_vision.adapters.files import canonical_safetensors

    raw = save({"x": torch.arange(3.0)}, metadata={"format": "f", "quantization": "{}"})
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    header["__metadata__"] = {"quantization": "{}", "format": "f"}  # the other hash order
    text = json.dumps(header, separators=(",", ":")).encode()
    other = raw[:8] + text.ljust(size) + raw[8 + size :]
    assert canonical_safetensors(raw) == canonical_safetensors(other)
    assert torch.equal(load(canonical_safetensors(other))["x"], torch.arange(3.0))


def test_a_byte_order_mark_added_by_an_editor_is_tolerated(tmp_path):
    nv.save_adapter(trained(), tmp_path, bits=32)
    (tmp_path / CONFIG_NAME).write_bytes(b"\xef\xbb\xbf" + (tmp_path / CONFIG_NAME).read_bytes())
    with torch.no_grad():
        torch.testing.assert_close(nv.load_adapter(tiny_vit(), tmp_path)(IMAGES), trained()(IMAGES))


def test_a_config_rewritten_by_a_json_tool_that_drops_whole_floats_decimal_point_says_so(tmp_path):
    # jq and JSON.stringify write scale 1.0 as 1: refused as "edited or damaged ... save the adapter again", which
    # whoever only has the downloaded files cannot do, without a word of the cause
    def whole_floats_as_ints(value):
        if isinstance(value, dict):
            return {key: whole_floats_as_ints(item) for key, item in value.items()}
        if isinstance(value, list):
            return [whole_floats_as_ints(item) for item in value]
        return int(value) if isinstance(value, float) and value.is_integer() else value

    nv.save_adapter(trained(), tmp_path / "a")
    path = tmp_path / "a" / CONFIG_NAME
    saved = path.read_text()
    path.write_text(json.dumps(whole_floats_as_ints(json.loads(saved)), indent=2))  # what `jq .` writes
    with pytest.raises(AdapterLoadError, match=r"does not match; its layout is not the one nola_vision writes, so a "
                                               r"program rewrote it: where no value was edited, JSON tools "
                                               r"such as jq .* Restore the file"):
        nv.verify_adapter(tiny_vit(), tmp_path / "a")
    assert '"scale":1.0' in saved
    path.write_text(saved.replace('"scale":1.0', '"scale":2.0'))  # edited in place: no word of tools
    with pytest.raises(AdapterLoadError, match=r"does not match; save the adapter again$"):
        nv.verify_adapter(tiny_vit(), tmp_path / "a")
    path.write_text(json.dumps(json.loads(saved), indent=2))  # reformatted with the values kept: loads
    nv.verify_adapter(tiny_vit(), tmp_path / "a")


def test_class_names_are_recorded_for_whoever_serves_the_file_and_checked(tmp_path):
    model, names = trained(), ("cat", "dog", "owl", "emu", "yak")
    with pytest.raises(ValueError, match="got 2 class_names for a head of 5 classes"):
        nv.save_adapter(model, tmp_path / "a", class_names=["cat", "dog"])
    with pytest.raises(TypeError, match="sequence of non-empty strings"):
        nv.save_adapter(model, tmp_path / "a", class_names="cat dog owl")
    assert not (tmp_path / "a").exists()
    nv.save_adapter(model, tmp_path / "a", class_names=names)
    nv.save_adapter(model, tmp_path / "b")
    assert nv.verify_adapter(tiny_vit(), tmp_path / "a").class_names == list(names)
    assert nv.verify_adapter(tiny_vit(), tmp_path / "b").class_names is None
    served = nv.MultiTaskModel(tiny_vit())
    served.add_task("a", tmp_path / "a")
    served.add_task("b", tmp_path / "b")
    assert served.class_names("a") == list(names) and served.class_names("b") is None
    document = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    document["class_names"] = ["cat", "dog"]  # edited: refused as edited, however the checksum came out
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps(document))
    with pytest.raises(AdapterLoadError, match="'class_names' holds 2 names for a 5-class head"):
        nv.verify_adapter(tiny_vit(), tmp_path / "a")


@pytest.mark.parametrize("switch", [False, True], ids=["fresh", "switched"])
def test_a_save_after_loading_an_adapter_with_class_names_says_they_are_not_carried_over(tmp_path, switch):
    # the names were dropped without a word: a load and save (to change bits, say) lost them. The model cannot tell
    # whether it still holds that task (a fused optimiser step changes its tensors unseen), so it says how to keep them
    names = ["cat", "dog", "owl", "emu", "yak"]
    nv.save_adapter(trained(), tmp_path / "a", bits=8, class_names=names)
    nv.save_adapter(trained(), tmp_path / "plain", bits=8)
    model = nv.load_adapter(tiny_vit(), tmp_path / ("plain" if switch else "a"))
    if switch:
        nv.load_adapter(model, tmp_path / "a")  # a task switch copies in place
    for saved in (model, copy.deepcopy(model)):
        with pytest.warns(UserWarning, match=rf"loaded into this model from {re.escape(str(tmp_path / 'a'))} records "
                                             r"class names \(cat, dog, owl, \.\.\.\); this save records none\. Pass "
                                             r"class_names="):
            nv.save_adapter(saved, tmp_path / "b", bits=8)
        assert nv.verify_adapter(tiny_vit(), tmp_path / "b").class_names is None
    kept = nv.verify_adapter(model, tmp_path / "a").class_names  # what the warning says to pass
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nv.save_adapter(model, tmp_path / "c", bits=8, class_names=kept)
    assert files_of(tmp_path / "c") == files_of(tmp_path / "a")  # its own bytes back
    nv.load_adapter(model, tmp_path / "plain")  # a file without names: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nv.save_adapter(model, tmp_path / "d")


@pytest.mark.parametrize("path", [None, 5, ""])
def test_every_file_entry_point_refuses_a_path_that_is_not_one_by_its_name(path):
    model = trained(LORA)
    calls = {
        "the adapter directory": [lambda: nv.save_adapter(model, path), lambda: nv.load_adapter(model, path),
                                  lambda: nv.verify_adapter(model, path), lambda: nv.adapter_size_bytes(path),
                                  lambda: nv.onnx_task_inputs(path),
                                  lambda: nv.MultiTaskModel(tiny_vit()).add_task("task", path)],
        "the export directory": [lambda: nv.export_peft(model, path)],
        "export_onnx's path": [lambda: nv.export_onnx(model, path)],
    }
    for argument, entry_points in calls.items():
        for call in entry_points:
            with pytest.raises(ValueError, match=f"^{argument} must be a path, got {path!r}"):
                call()


def test_a_head_replaced_by_hand_is_saved_and_checked_by_its_own_class_count(tmp_path):
    """``model.head = nn.Linear(d, 7)`` leaves timm's ``num_classes`` at 5: the file records the head's 7 classes
    (with 7 names), loads onto the same model, and a 7-class file loads onto such a model."""
    def hand_headed():
        model = tiny_vit(num_classes=5)
        model.head = torch.nn.Linear(64, 7)
        with torch.no_grad():
            model.head.weight.copy_(torch.randn(7, 64, generator=torch.Generator().manual_seed(3)))
        return model

    model = as_if_trained(nv.inject(hand_headed(), NOLA), 1, scale=0.3)
    nv.save_adapter(model, tmp_path / "a", bits=32, class_names=list("abcdefg"))
    assert json.loads((tmp_path / "a" / CONFIG_NAME).read_text())["num_classes"] == 7
    fresh = hand_headed()
    assert nv.verify_adapter(fresh, tmp_path / "a").class_names == list("abcdefg")
    nv.load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(fresh.eval()(IMAGES), model.eval()(IMAGES))
    with pytest.raises(AdapterLoadError, match="adapter has a 7-class head but the model has 5 classes"):
        nv.load_adapter(tiny_vit(num_classes=5), tmp_path / "a")


def test_a_head_of_several_layers_is_counted_by_its_last_layers_outputs(tmp_path):
    """``model.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(d, 7))`` was counted by timm's stale num_classes: its
    7 class names refused ("a head of 1000 classes"), the file recording 1000, a MultiTaskModel saying 1000 for
    7-value logits and refusing a 3-class task of the same head form."""
    def sequential_headed(classes):
        model = tiny_vit(num_classes=1000)
        torch.manual_seed(3)
        model.head = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(64, classes))
        return model

    for classes in (7, 3):
        model = as_if_trained(nv.inject(sequential_headed(classes), NOLA), classes, scale=0.3)
        nv.save_adapter(model, tmp_path / f"c{classes}", bits=32, class_names=[f"c{i}" for i in range(classes)])
        assert json.loads((tmp_path / f"c{classes}" / CONFIG_NAME).read_text())["num_classes"] == classes
    served = nv.MultiTaskModel(sequential_headed(7))
    served.add_task("seven", tmp_path / "c7")
    served.add_task("three", tmp_path / "c3")
    assert (served.num_classes("seven"), served.num_classes("three")) == (7, 3)
    logits = served(IMAGES[:2], ["seven", "three"])
    assert [len(row) for row in logits] == [7, 3]
    with torch.no_grad():
        expected = nv.load_adapter(sequential_headed(3).eval(), tmp_path / "c3")(IMAGES[:2])
    torch.testing.assert_close(logits[1], expected[1], rtol=1e-5, atol=1e-5)


def test_an_adapter_tensor_replaced_with_another_shape_is_refused_before_a_load_copies_anything(tmp_path):
    model = trained()
    nv.save_adapter(model, tmp_path / "a", bits=32)
    target = nv.inject(tiny_vit(), NOLA)
    before = {name: p.detach().clone() for name, p in target.named_parameters() if p.requires_grad}
    target.blocks[1].mlp.fc1.nola_beta = torch.nn.Parameter(torch.zeros(3))  # the user's, of another shape
    for action in (nv.verify_adapter, nv.load_adapter):
        with pytest.raises(AdapterLoadError, match=r"blocks\.1\.mlp\.fc1\.nola_beta has \(3,\), injected as "):
            action(target, tmp_path / "a")
    assert all(torch.equal(p, before[name]) for name, p in target.named_parameters() if name in before
               and p.shape == before[name].shape)  # nothing copied
    with pytest.raises(ValueError, match="changed after inject"):
        nv.save_adapter(target, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_class_names_without_an_order_are_refused(tmp_path):
    """A set was stored in hash order (another per process): outputs were labelled with other classes' names.
    Ordered forms keep their order: a generator, names repeated (ImageNet's descriptions name two classes 'crane');
    a dict (ImageFolder's class_to_idx) is ordered by its indices, not by its keys' order."""
    model = trained()
    with pytest.raises(TypeError, match="got a set, which has no such order"):
        nv.save_adapter(model, tmp_path / "a", class_names={"a", "b", "c", "d", "e"})
    assert not (tmp_path / "a").exists()
    with pytest.raises(TypeError, match="class_names as a dict maps each name to its output index"):
        nv.save_adapter(model, tmp_path / "a", class_names=dict.fromkeys("abcde"))
    for names, expected in (((name for name in "edcba"), list("edcba")),
                            (dict(zip("abcde", [4, 3, 2, 1, 0])), list("edcba")),  # ordered by the indices
                            (dict(zip("abcde", np.arange(5))), list("abcde")),  # numpy's indices too (were refused)
                            (["crane", "crane", "b", "c", "d"], ["crane", "crane", "b", "c", "d"])):
        nv.save_adapter(model, tmp_path / "a", class_names=names)
        assert nv.verify_adapter(model, tmp_path / "a").class_names == expected


@pytest.mark.parametrize("value", [None, "no", 0, 1])
def test_safety_flags_take_true_or_false_only(tmp_path, value):
    """check_frozen_weights=None skipped the frozen-weight check; tasks_as_inputs=1 exported a task-input graph."""
    nv.save_adapter(trained(), tmp_path / "a")
    other = nv.inject(tiny_vit(), NOLA)
    for call, flag in ((partial(nv.load_adapter, other, tmp_path / "a"), "load_adapter: check_frozen_weights"),
                       (partial(nv.load_adapter, other, tmp_path / "a", check_frozen_weights=True),
                        "load_adapter: allow_unchecked_legacy"),
                       (partial(nv.verify_adapter, other, tmp_path / "a"), "verify_adapter: match_num_classes"),
                       (partial(nv.MultiTaskModel(tiny_vit()).add_task, "t", tmp_path / "a"),
                        "add_task: check_frozen_weights"),
                       (partial(nv.export_onnx, other, tmp_path / "g.onnx"), "export_onnx: tasks_as_inputs")):
        keyword = flag.split(": ")[1]
        with pytest.raises(ValueError, match=f"{flag} must be true or false"):
            call(**{keyword: value})
    assert not (tmp_path / "g.onnx").exists()


def test_exports_of_a_model_on_the_meta_device_say_it_holds_no_values(tmp_path):
    with torch.device("meta"):
        model = nv.inject(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32,
                                            patch_size=8, embed_dim=64, depth=2, num_heads=2), NOLA)
    for export, path in ((nv.export_peft, tmp_path / "p"), (nv.export_onnx, tmp_path / "g.onnx")):
        with pytest.raises(ValueError, match=f"{export.__name__}: the model's weights are on the meta device"):
            export(model, path)
        assert not path.exists()


@pytest.mark.parametrize("action", ["unload", "merge_and_unload"])
def test_unloading_a_wrapper_of_an_injected_model_names_the_submodule(action):
    """merge and count_parameters reach the adapters through nn.Sequential(model); unload said the model was never
    injected or already unloaded, so a user could take it for a plain model and export it, adapters and all."""
    model = nv.inject(tiny_vit(), NOLA)
    with pytest.raises(ValueError, match=rf"its submodule '0' does \(injected before wrapping\): call "
                                         rf"nv.{action}\(model.get_submodule\('0'\)\)"):
        getattr(nv, action)(torch.nn.Sequential(model))
    assert nv.adapted_layers(model) and not any(layer.merged for layer in nv.adapted_layers(model).values())


def test_a_peft_export_of_a_wrapper_of_an_injected_model_names_the_submodule_as_saving_it_does(tmp_path):
    # it wrote module names prefixed with the wrapper's ('0.blocks.0...'), which peft found on no base model
    model = nv.inject(tiny_vit(), NOLA)
    with pytest.raises(ValueError, match=r"its submodule '0' does \(injected before wrapping\): export that module, "
                                         r"nv.export_peft\(model.get_submodule\('0'\), "):
        nv.export_peft(torch.nn.Sequential(model).eval(), tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_an_onnx_export_of_a_wrapper_of_an_injected_model_merges_the_whole_wrapper(tmp_path):
    # unmerged NOLA inside a wrapper was traced as it was and failed inside torch's exporter (an IndexError after an
    # IR dump); the wrapper's own computation (here a scaling of the input) belongs in the graph
    import onnxruntime as ort

    model = as_if_trained(nv.inject(tiny_vit(), NOLA), adapters_only=True)
    wrapped = torch.nn.Sequential(Scale(), model).eval()
    path = nv.export_onnx(wrapped, tmp_path / "model.onnx", input_size=(3, 32, 32))
    images = torch.randn(2, 3, 32, 32)
    served = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": images.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(served[0]), wrapped(images), atol=1e-4, rtol=1e-4)
    assert not any(layer.merged for layer in nv.adapted_layers(model).values())  # the model itself is left as it was


class Scale(torch.nn.Module):
    """A wrapper's own preprocessing."""

    def forward(self, x):
        return 2 * x - 1


def test_a_model_inside_an_injected_wrapper_is_told_its_adapters_belong_to_that_wrapper(tmp_path):
    """save_adapter, unload and merge_and_unload of the inner model said it was never injected and to call inject,
    which then refused it as already holding adapter layers."""
    wrapper = nv.inject(torch.nn.Sequential(torch.nn.Identity(), tiny_vit()), NOLA)
    inner = wrapper[1]
    calls = [lambda: nv.save_adapter(inner, tmp_path / "a"), lambda: nv.unload(inner),
             lambda: nv.merge_and_unload(inner)]
    for call in calls:
        with pytest.raises(ValueError, match=r"the model holds \d+ adapted layer\(s\) \(blocks\.0\.[\w.]+, \.\.\.\) "
                                             r"but no adapters of its own: nv\.inject was given a module that contains "
                                             r"it.*Call this on the module nv\.inject was given"):
            call()
    assert not (tmp_path / "a").exists() and not any(layer.merged for layer in nv.adapted_layers(wrapper).values())
    nv.save_adapter(wrapper, tmp_path / "b")  # where the state is


def test_basis_holding_reaches_adapters_through_wrappers_and_names_an_injected_submodule():
    # a Sequential around an injected NOLA model was told it has "no shared basis codes to hold (adapters: None)"
    model = nv.inject(tiny_vit(), NOLA)
    wrapped = torch.nn.DataParallel(model)
    assert nv.set_basis_holding(wrapped, True) is wrapped and adapter_state(model).bank.keep is True
    with pytest.raises(ValueError, match=r"its submodule '1' does \(injected before wrapping\): call "
                                         r"nv.set_basis_holding\(model.get_submodule\('1'\), hold\)"):
        nv.set_basis_holding(torch.nn.Sequential(torch.nn.Identity(), model), False)
    assert adapter_state(model).bank.keep is True


def test_quantisation_aware_training_reaches_adapters_through_wrappers_and_names_what_is_not_a_model():
    """set_quantization_aware(DataParallel(model), 8) said the model had no adapters; None gave an AttributeError."""
    model = nv.inject(tiny_vit(), NOLA)
    wrapped = torch.nn.DataParallel(model)
    assert nv.set_quantization_aware(wrapped, 8) is wrapped
    assert {layer.quant_bits for layer in nv.adapted_layers(model).values()} == {8}
    with pytest.raises(ValueError, match=r"its submodule '0' does \(injected before wrapping\): call "
                                         r"set_quantization_aware\(model.get_submodule\('0'\), bits\)"):
        nv.set_quantization_aware(torch.nn.Sequential(model), 4)
    for call in (lambda: nv.set_quantization_aware(None, None), lambda: nv.set_quantization_aware(8, model),
                 lambda: nv.adapted_layers(None)):
        with pytest.raises(TypeError, match=r"takes a model \(a torch.nn.Module\)"):
            call()
    with pytest.raises(TypeError, match="register_method: config_cls is a class, got a NoneType"):
        nv.register_method("mine", None, None)


def test_a_linear_probes_state_dict_records_its_quantisation_aware_bits():
    """Adapted layers record the bits in their identity; a linear probe has none, so its state dict trained at 4 bits
    loaded into a full-precision probe with other outputs and without a word."""
    trained = nv.set_quantization_aware(nv.inject(tiny_vit(), "linear"), 4)
    with torch.no_grad():
        trained.head.weight.add_(torch.randn(trained.head.weight.shape, generator=torch.Generator().manual_seed(0)))
    state = trained.state_dict()
    for strict in (True, False):
        other = nv.inject(tiny_vit(), "linear")
        head = other.head.weight.detach().clone()
        with pytest.raises(RuntimeError, match=r"head was trained quantisation-aware at 4 bits, and this model shows "
                                               r"it at full precision"):
            other.load_state_dict(state, strict=strict)
        assert torch.equal(other.head.weight, head)  # refused before the head loaded
    for bits in (4, 8):  # a head alone is seen at 8 bits at either width
        same = nv.set_quantization_aware(nv.inject(tiny_vit(), "linear"), bits)
        same.load_state_dict(state)
        with torch.no_grad():
            assert torch.equal(same(IMAGES), trained(IMAGES))
    with pytest.raises(RuntimeError, match=r"trained at full precision \(it records no nola_quant_bits, or that entry "
                                           r"was left out\), and this model shows it at 8 bits"):
        same.load_state_dict(nv.inject(tiny_vit(), "linear").state_dict())
    copied = copy.deepcopy(trained)
    assert "nola_quant_bits" in copied.state_dict()
    nv.unload(trained)
    assert "nola_quant_bits" not in trained.state_dict()
    tiny_vit().load_state_dict(trained.state_dict())  # a plain model's state dict again
