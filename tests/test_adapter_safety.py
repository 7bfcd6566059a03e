"""Adapter files fail loudly: atomic re-saves, checksums, finite values, malformed fields, clear shape messages."""
import copy
import errno
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from tiny_models import as_if_trained, tiny_vit

import nola_vision as nv
from nola_vision.adapters import files as adapter_io
from nola_vision.adapters.files import CONFIG_NAME, WEIGHTS_NAME, AdapterLoadError

CONFIG = nv.NOLAConfig(rank=2, num_basis_a=16, num_basis_b=16, targets=["mlp.fc1", "attn.v"])
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def trained(seed, config=CONFIG, **kwargs):
    return as_if_trained(nv.inject(tiny_vit(**kwargs), config), seed, scale=0.1)


def logits(model):
    with torch.no_grad():
        return model(IMAGES)


def edit_document(directory, change):
    document = json.loads((directory / CONFIG_NAME).read_text())
    change(document)
    (directory / CONFIG_NAME).write_text(json.dumps(document))


def test_a_resave_that_fails_midway_keeps_the_old_adapter_whole_and_leaves_no_temp_files(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    old = trained(seed=1)
    nv.save_adapter(old, target)
    (target / "notes.txt").write_text("mine")
    real_dumps = json.dumps

    def dumps_failing_on_layers(obj, *args, **kwargs):  # the second file's content, after the first is written
        if isinstance(obj, dict) and any(isinstance(v, dict) and "slices" in v for v in obj.values()):
            raise OSError("disk full")
        return real_dumps(obj, *args, **kwargs)

    monkeypatch.setattr(json, "dumps", dumps_failing_on_layers)
    with pytest.raises(OSError, match="disk full"):
        nv.save_adapter(trained(seed=2), target)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".adapter.lock", "adapter"]  # the writers' lock stays
    assert sorted(p.name for p in target.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME, "notes.txt"]
    torch.testing.assert_close(logits(nv.load_adapter(tiny_vit(), target)), logits(old), rtol=0, atol=1e-3)
    new = trained(seed=2)
    nv.save_adapter(new, target)  # a successful re-save replaces both files and keeps the others
    assert (target / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".adapter.lock", "adapter"]
    torch.testing.assert_close(logits(nv.load_adapter(tiny_vit(), target)), logits(new), rtol=0, atol=1e-3)


def test_a_resave_whose_swap_fails_keeps_the_old_adapter_whole_with_the_users_files(tmp_path, monkeypatch):
    # The new set is staged completely; then the rename that would put it in place fails (once). A save that
    # raises must leave the old set whole and in place. Where the platform swaps both sets in one atomic
    # exchange, no such rename happens and the save succeeds: then the new set must be whole.
    target = tmp_path / "adapter"
    old, new = trained(seed=1), trained(seed=2)
    nv.save_adapter(old, target)
    (target / "notes.txt").write_text("mine")
    refused = []

    def failing_once_onto_target(rename):
        def wrapper(source, destination, *args, **kwargs):
            if Path(destination) == target and not refused:
                refused.append(source)
                raise OSError(errno.EIO, "simulated failure while swapping the adapter in")
            return rename(source, destination, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(os, "rename", failing_once_onto_target(os.rename))
    monkeypatch.setattr(os, "replace", failing_once_onto_target(os.replace))
    try:
        nv.save_adapter(new, target)
        saved = new
    except OSError as error:
        assert refused and "simulated failure" in str(error)
        saved = old
    monkeypatch.undo()
    assert (target / "notes.txt").read_text() == "mine"
    torch.testing.assert_close(logits(nv.load_adapter(tiny_vit(), target)), logits(saved), rtol=0, atol=1e-3)
    assert (logits(new) - logits(old)).abs().max() > 1e-2  # the two adapters are told apart
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["adapter"]  # no staged or old set left beside it


def test_flipped_bytes_in_the_weights_are_rejected(tmp_path):
    nv.save_adapter(trained(seed=1), tmp_path)
    raw = bytearray((tmp_path / WEIGHTS_NAME).read_bytes())
    raw[-3] ^= 0x40
    (tmp_path / WEIGHTS_NAME).write_bytes(bytes(raw))
    model = tiny_vit()
    with pytest.raises(AdapterLoadError, match="corrupt.*sha256"):
        nv.load_adapter(model, tmp_path)
    assert not nv.adapted_layers(model)


@pytest.mark.parametrize("field, value", [("scale", 2.0), ("init", "zero_delta"), ("recompute_activation", False)])
def test_an_edited_config_field_is_rejected(tmp_path, field, value):
    nv.save_adapter(trained(seed=1), tmp_path)
    edit_document(tmp_path, lambda d: d["config"].update({field: value}))
    with pytest.raises(AdapterLoadError, match="edited or damaged"):
        nv.load_adapter(tiny_vit(), tmp_path)


def test_saving_non_finite_values_is_refused_naming_the_tensor(tmp_path):
    model = trained(seed=1)
    with torch.no_grad():
        model.blocks[1].mlp.fc1.nola_beta[0, 3] = float("nan")
    with pytest.raises(ValueError, match="blocks.1.mlp.fc1.nola_beta.*NaN"):
        nv.save_adapter(model, tmp_path)
    assert not (tmp_path / CONFIG_NAME).exists()


def vit_with_batch_norm():
    """A tiny ViT whose patch embedding ends in a batch norm, as the convolutional stems of hybrid ViTs do."""
    model = tiny_vit()
    model.patch_embed.proj = torch.nn.Sequential(model.patch_embed.proj, torch.nn.BatchNorm2d(64).eval())
    return model


@pytest.mark.parametrize("config", [CONFIG, "linear", "full"], ids=["nola", "linear", "full"])
def test_batch_norm_statistics_changed_by_training_are_refused_as_files_hold_no_buffers(tmp_path, config):
    model = nv.inject(vit_with_batch_norm(), config)
    nv.save_adapter(model, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    model.train()(IMAGES)  # a forward pass in train mode updates the running statistics
    with pytest.raises(ValueError, match=r"running statistics of 1 norm layer\(s\) changed since inject \(first: "
                                         r"patch_embed\.proj\.1\).*_NormBase\): m\.eval\(\)\).*nv\.unload"):
        nv.save_adapter(model, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    if config == CONFIG:  # a peft export holds no buffers either
        with pytest.raises(ValueError, match="running statistics of 1 norm layer"):
            nv.export_peft(model, tmp_path / "peft")
    frozen = nv.inject(vit_with_batch_norm(), config)
    frozen.train()(IMAGES)
    frozen.patch_embed.proj[1].track_running_stats = False  # no longer a statistics layer, its changed values kept
    with pytest.raises(ValueError, match="running statistics of 1 norm layer"):
        nv.save_adapter(frozen, tmp_path / "frozen")
    nv.save_adapter(nv.inject(vit_with_batch_norm(), config).half().float(), tmp_path / "round_trip")  # same values
    nv.save_adapter(nv.inject(vit_with_batch_norm().bfloat16(), config), tmp_path / "bf16")  # statistics kept in bf16
    model = as_if_trained(nv.inject(vit_with_batch_norm(), config), 1, scale=0.1).train()
    for module in model.modules():  # what the message advises: train with the batch norms in eval mode
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    model(IMAGES)
    nv.save_adapter(model, tmp_path, bits=32)
    torch.testing.assert_close(logits(nv.load_adapter(vit_with_batch_norm(), tmp_path)), logits(model.eval()),
                               rtol=0, atol=1e-5)


def with_other_statistics(model):
    """``model`` with the running statistics a forward pass in train mode leaves (as a recalibrated copy has)."""
    with torch.no_grad():
        model.train()(IMAGES * 3 + 1)
    return model.eval()


def test_an_adapter_is_refused_on_a_backbone_with_other_running_statistics(tmp_path):
    """The weights alone matched: an adapter trained on a hybrid ViT loaded silently onto the same weights with other
    batch-norm statistics (which its outputs depend on as on weights)."""
    model = as_if_trained(nv.inject(vit_with_batch_norm(), CONFIG), 1, scale=0.1)
    nv.save_adapter(model, tmp_path, bits=32)
    other = with_other_statistics(vit_with_batch_norm())
    assert torch.equal(other.patch_embed.proj[0].weight, vit_with_batch_norm().patch_embed.proj[0].weight)
    message = r"running statistics of patch_embed\.proj\.1 differ by about \d+% of their norm.*eval mode"
    with pytest.raises(AdapterLoadError, match=message):
        nv.load_adapter(other, tmp_path)
    with pytest.raises(AdapterLoadError, match=message):
        nv.verify_adapter(other, tmp_path)
    stopped = vit_with_batch_norm()
    stopped.patch_embed.proj[1].track_running_stats = False  # normalises by each batch's statistics instead
    with pytest.raises(AdapterLoadError, match="patch_embed.proj.1 keeps no running statistics"):
        nv.load_adapter(stopped, tmp_path)
    for same in (vit_with_batch_norm(), vit_with_batch_norm().bfloat16().float()):  # a bfloat16 copy's rounding loads
        torch.testing.assert_close(logits(nv.load_adapter(same, tmp_path)), logits(model.eval()), rtol=0, atol=1e-2)
    # Files from before statistics were recorded load as they did
    edit_document(tmp_path, lambda d: (d["frozen_weights"].pop("statistics"),
                                       d.update(config_sha256=adapter_io._document_digest(d))))
    nv.load_adapter(with_other_statistics(vit_with_batch_norm()), tmp_path)


def test_a_full_fine_tune_is_refused_on_a_backbone_with_other_running_statistics(tmp_path):
    """A full fine-tune's file holds every weight but no buffers, and recorded nothing of the backbone: loaded onto
    other batch-norm statistics it gave other outputs without a word. It records the statistics alone now."""
    model = as_if_trained(nv.inject(vit_with_batch_norm(), "full"), 1, scale=0.1)
    nv.save_adapter(model, tmp_path, bits=32)
    record = json.loads((tmp_path / CONFIG_NAME).read_text())["frozen_weights"]
    assert record["modules"] == {} and set(record["statistics"]) == {"patch_embed.proj.1"} and "context" not in record
    message = r"running statistics of patch_embed\.proj\.1 differ by about \d+% of their norm"
    for load in (nv.load_adapter, nv.verify_adapter):
        with pytest.raises(AdapterLoadError, match=message):
            load(with_other_statistics(vit_with_batch_norm()), tmp_path)
    other_weights = vit_with_batch_norm()
    with torch.no_grad():
        other_weights.blocks[0].mlp.fc1.weight.mul_(2)  # replaced by the file's: no record of them, no refusal
    for base in (vit_with_batch_norm(), other_weights):
        torch.testing.assert_close(logits(nv.load_adapter(base, tmp_path)), logits(model.eval()), rtol=0, atol=1e-5)
    nv.load_adapter(with_other_statistics(vit_with_batch_norm()), tmp_path, check_frozen_weights=False)
    nv.save_adapter(as_if_trained(nv.inject(tiny_vit(), "full"), 1, scale=0.1), tmp_path / "plain")
    record = json.loads((tmp_path / "plain" / CONFIG_NAME).read_text())["frozen_weights"]
    assert record["modules"] == {} and record["buffers"] == {"modules": 0, "records": ""}  # no buffers, recorded


@pytest.mark.parametrize("write", ["copy_", "optimizer step", ".data"])
def test_a_merged_model_whose_adapted_weights_were_overwritten_is_refused_as_an_unmerged_one_is(tmp_path, write):
    """The check of a merged model read the record its merge took: weights written since (in place) passed it."""
    nv.save_adapter(trained(seed=1), tmp_path, bits=32)
    for merged in (False, True):
        served = nv.load_adapter(tiny_vit(), tmp_path)
        if merged:
            nv.merge(served)
            nv.load_adapter(served, tmp_path)  # a switch to the same task keeps the merge's record valid
        weights = [served.get_submodule(name).weight for name in nv.adapted_layers(served)]
        with torch.no_grad():
            if write in ("copy_", ".data"):  # .data has a version counter of its own
                for weight in weights:
                    other = torch.randn_like(weight) * weight.std()  # another backbone's weights
                    (weight.data if write == ".data" else weight).copy_(other)
            else:
                for weight in weights:
                    weight.grad = torch.ones_like(weight)
                torch.optim.SGD(weights, lr=0.5).step()
        with pytest.raises(AdapterLoadError, match=r"the weights of blocks\.0\.mlp\.fc1 differ"):
            nv.verify_adapter(served, tmp_path)
        with pytest.raises(AdapterLoadError, match=r"the weights of blocks\.0\.mlp\.fc1 differ"):
            nv.load_adapter(served, tmp_path)


def test_a_merged_model_built_in_inference_mode_or_moved_after_its_merge_switches_and_keeps_its_records(tmp_path):
    """Inference tensors keep no version, which the record's stamp read (merge crashed); a model moved or copied after
    its merge lost its records and fingerprinted every layer again at each switch."""
    nv.save_adapter(trained(seed=1), tmp_path / "a", bits=32)
    nv.save_adapter(trained(seed=2), tmp_path / "b", bits=32)
    with torch.inference_mode():
        served = nv.merge(nv.load_adapter(tiny_vit(), tmp_path / "a"))
        nv.load_adapter(served, tmp_path / "b")
        nv.verify_adapter(served, tmp_path / "b")
    moved = copy.deepcopy(nv.merge(nv.load_adapter(tiny_vit(), tmp_path / "a")))
    layers = list(nv.adapted_layers(moved).values())
    # another storage of the same values: the copy stamps the merge's records afresh (it fingerprinted weight - ΔW)
    assert all(layer.unmerged_record is not None for layer in layers)
    nv.load_adapter(moved, tmp_path / "b")  # keeps the weights' record through the switch
    records = [layer.unmerged_record for layer in layers]
    assert None not in records
    nv.load_adapter(moved, tmp_path / "a")
    assert [layer.unmerged_record for layer in layers] == records
    torch.testing.assert_close(logits(moved), logits(nv.load_adapter(tiny_vit(), tmp_path / "a")), rtol=0, atol=1e-5)


def test_task_switches_from_two_threads_take_turns_and_leave_the_weights_whole(tmp_path):
    """Two switches of one merged model at once interleaved their read-modify-writes of the weights: they stayed off
    for good (a later switch and unload did not give them back)."""
    import threading

    for seed in (1, 2):
        nv.save_adapter(trained(seed=seed), tmp_path / str(seed), bits=32)
    model = nv.merge(nv.load_adapter(tiny_vit(), tmp_path / "1"))
    failures = []

    def switches(task):
        try:
            for _ in range(10):
                nv.load_adapter(model, tmp_path / task)
        except Exception as err:  # noqa: BLE001 - reported below
            failures.append(repr(err)[:300])

    threads = [threading.Thread(target=switches, args=(task,)) for task in ("2", "1")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    nv.load_adapter(model, tmp_path / "1")
    fresh = nv.merge(nv.load_adapter(tiny_vit(), tmp_path / "1"))
    torch.testing.assert_close(logits(model), logits(fresh), rtol=0, atol=2e-6)
    nv.unload(model)
    for name, value in tiny_vit().state_dict().items():
        if not name.startswith("head"):
            torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=1e-6, msg=name)


def test_plain_vit_files_hold_no_statistics_record(tmp_path):
    nv.save_adapter(trained(seed=1), tmp_path)
    record = json.loads((tmp_path / CONFIG_NAME).read_text())["frozen_weights"]
    assert "statistics" not in record and "buffers" not in record["precisions"]
    assert record["buffers"] == {"modules": 0, "records": ""}  # none, told from no record (an older file)


class Normalize(torch.nn.Module):
    """Preprocessing held as buffers, as a wrapper around a timm backbone often holds it."""

    def __init__(self, mean):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.full((1, 3, 1, 1), 0.25))
        self.register_buffer("scratch", torch.zeros(3), persistent=False)  # not in a state dict: rebuilt, not loaded

    def forward(self, images):
        return (images - self.mean) / self.std


def normalized_vit(mean=(0.485, 0.456, 0.406)):
    return torch.nn.Sequential(Normalize(mean), tiny_vit())


@pytest.mark.parametrize("config", [CONFIG, "full"])
def test_an_adapter_is_refused_on_a_wrapper_whose_buffers_hold_other_constants(tmp_path, config):
    """The weights alone matched: an adapter trained behind one normalisation loaded silently behind another (its
    buffers are not in the file), with outputs off. Persistent floating-point buffers are recorded like statistics."""
    model = as_if_trained(nv.inject(normalized_vit(), config), 1, scale=0.1)
    nv.save_adapter(model, tmp_path, bits=32)
    record = json.loads((tmp_path / CONFIG_NAME).read_text())["frozen_weights"]
    assert record["buffers"]["modules"] == 1 and record["precisions"]["buffers"] == [23]  # packed, as context is
    other = normalized_vit(mean=(0.5, 0.5, 0.5))
    for load in (nv.load_adapter, nv.verify_adapter):
        with pytest.raises(AdapterLoadError, match=r"the buffers of 0 differ by about \d+% of their norm"):
            load(other, tmp_path)
    for same in (normalized_vit(), normalized_vit().bfloat16().float()):  # a bfloat16 copy's rounding loads
        torch.testing.assert_close(logits(nv.load_adapter(same, tmp_path)), logits(model.eval()), rtol=0, atol=1e-2)
    wrapped = torch.nn.Sequential(torch.nn.Identity(), tiny_vit())  # same weights, the constants gone
    with pytest.raises(AdapterLoadError, match=r"1 module\(s\) of the adapter's backbone held persistent .* and 0 "):
        nv.load_adapter(wrapped, tmp_path)
    nv.load_adapter(other, tmp_path, check_frozen_weights=False)
    if config == "full":  # recorded nothing before
        return
    # Files from before buffers were recorded load as they did
    edit_document(tmp_path, lambda d: (d["frozen_weights"].pop("buffers"), d["frozen_weights"]["precisions"].pop(
        "buffers"), d.update(config_sha256=adapter_io._document_digest(d))))
    nv.load_adapter(normalized_vit(mean=(0.5, 0.5, 0.5)), tmp_path)


def test_an_adapter_trained_without_buffers_is_refused_on_a_model_with_them_and_a_graph_too(tmp_path):
    """A file records its buffers even where there are none: without a record it read as a file from before they
    were recorded, and loaded (or fed a task-input graph) onto a model whose normalisation it never saw."""
    plain = lambda: torch.nn.Sequential(torch.nn.Identity(), tiny_vit())  # noqa: E731  the same names, no buffers
    model = as_if_trained(nv.inject(plain(), CONFIG), 1, scale=0.1)
    nv.save_adapter(model, tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / CONFIG_NAME).read_text())["frozen_weights"]["buffers"]["modules"] == 0
    with pytest.raises(AdapterLoadError, match=r"0 module\(s\) of the adapter's backbone held persistent .* and 1 "
                                               r"here \(0\)"):
        nv.load_adapter(normalized_vit(), tmp_path / "plain")
    nv.load_adapter(plain(), tmp_path / "plain")
    nv.save_adapter(as_if_trained(nv.inject(normalized_vit(), CONFIG), 1, scale=0.1), tmp_path / "normalized")
    for graph_model, task in ((normalized_vit(), "plain"), (plain(), "normalized")):
        graph = nv.export_onnx(nv.inject(graph_model, CONFIG), tmp_path / f"{task}.onnx", tasks_as_inputs=True,
                               input_size=(3, 32, 32))
        with pytest.raises(AdapterLoadError, match=r"does not fit the graph: .*module\(s\) of the adapter's backbone"):
            nv.onnx_task_inputs(tmp_path / task, graph)


def test_a_buffer_of_an_adapted_layer_is_not_taken_for_a_buffer_of_the_backbone(tmp_path):
    """inject replaces a target Linear, and its buffers with it: the fresh backbone had one module with buffers more
    than the record, and the adapter was refused on the very backbone it was trained on."""
    def with_buffer():
        model = tiny_vit()
        model.blocks[0].mlp.fc1.register_buffer("calibration", torch.ones(3))
        return model

    nv.save_adapter(as_if_trained(nv.inject(with_buffer(), CONFIG), 1, scale=0.1), tmp_path)
    nv.load_adapter(with_buffer(), tmp_path)
    nv.verify_adapter(with_buffer(), tmp_path)


def test_a_buffer_holding_nan_saves_and_one_of_another_shape_is_refused_as_changed(tmp_path):
    model = normalized_vit()
    model[0].register_buffer("unset", torch.tensor([float("nan"), 1.0]))
    model = as_if_trained(nv.inject(model, CONFIG), 1, scale=0.1)
    nv.save_adapter(model, tmp_path / "nan")  # unchanged since inject: NaN is NaN
    model[0].unset = torch.zeros(3)
    with pytest.raises(ValueError, match=r"the buffer 0\.unset changed since inject"):
        nv.save_adapter(model, tmp_path / "reshaped")


def test_a_buffer_changed_after_inject_is_refused_at_save_as_files_hold_no_buffers(tmp_path):
    model = as_if_trained(nv.inject(normalized_vit(), CONFIG), 1, scale=0.1)
    model[0].mean.fill_(0.5)
    with pytest.raises(ValueError, match=r"the buffer 0\.mean changed since inject .*hold no buffers"):
        nv.save_adapter(model, tmp_path / "changed")
    assert not (tmp_path / "changed").exists()
    model[0].mean.copy_(torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1))
    nv.save_adapter(model.bfloat16().float(), tmp_path / "restored")  # a dtype round trip passes


def test_loading_non_finite_values_is_refused_even_with_matching_checksums(tmp_path):
    nv.save_adapter(trained(seed=1), tmp_path)
    tensors = load_bytes((tmp_path / WEIGHTS_NAME).read_bytes())
    tensors["head.bias"][0] = float("inf")
    weights = save_bytes(tensors, metadata={"format": adapter_io.FORMAT, "quantization": "{}"})
    (tmp_path / WEIGHTS_NAME).write_bytes(weights)

    def rechecksum(document):
        document["weights_sha256"] = adapter_io._sha256(weights)
        document["config_sha256"] = adapter_io._document_digest(document)

    edit_document(tmp_path, rechecksum)
    with pytest.raises(AdapterLoadError, match="head.bias.*NaN or Inf"):
        nv.load_adapter(tiny_vit(), tmp_path)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("layers"), "lacks the field 'layers'"),
    (lambda d: d.update(layers=["blocks.0.mlp.fc1"]), "field 'layers' must be"),
    (lambda d: d.update(num_classes="5"), r"field 'num_classes' must be a non-negative integer, got '5' \(str\)"),
    (lambda d: d.update(bits="16"), "field 'bits'"),
    (lambda d: d["config"].update(targets=5), "config .* is not valid"),
    (lambda d: d["config"].update(rank="4"), "rank must be a positive integer"),
])
def test_malformed_config_fields_give_a_clear_error(tmp_path, change, message):
    """Each field is checked for what it must be, even in a file whose checksum was taken again after the edit."""
    nv.save_adapter(trained(seed=1), tmp_path)
    edit_document(tmp_path, lambda d: (change(d), d.update(config_sha256=adapter_io._document_digest(d))))
    model = tiny_vit()
    with pytest.raises(AdapterLoadError, match=message):
        nv.load_adapter(model, tmp_path)
    assert not nv.adapted_layers(model)


def every_reader(directory, build=tiny_vit):
    """verify_adapter, load_adapter and MultiTaskModel.add_task of ``directory``, each on a fresh model ``build()``."""
    return [lambda: nv.verify_adapter(build(), directory), lambda: nv.load_adapter(build(), directory),
            lambda: nv.MultiTaskModel(build()).add_task("task", directory)]


def frozen_record(document, name="blocks.0.mlp.fc1"):
    return document["frozen_weights"]["modules"][name]


def position_record(document):
    return document["frozen_weights"]["positions"]["pos_embed"]["record"]


@pytest.mark.parametrize("change, field", [
    (lambda d: d["layers"].update({"blocks.0.mlp.fc1": None}), "layers"),
    (lambda d: d["layers"].update({"blocks.0.mlp.fc1": [64, 256]}), "layers"),
    (lambda d: frozen_record(d).__setitem__(1, 10**400), "frozen_weights"),  # JSON reads it as an int, not inf
    (lambda d: position_record(d).__setitem__(1, 10**400), "frozen_weights"),
    (lambda d: d["frozen_weights"]["merged"].append({"method": "nola", "layers": 5}), "frozen_weights"),
], ids=["null_layer", "list_layer", "huge_record", "huge_position_record", "merged_layers_not_a_list"])
@pytest.mark.parametrize("checksum", ["stale", "taken_again"])
def test_a_damaged_layer_entry_or_an_integer_beyond_float_is_refused_by_every_reader_naming_the_field(
        tmp_path, change, field, checksum):
    """Fields are checked before the checksum: these raised AttributeError, OverflowError or TypeError."""
    nv.save_adapter(trained(seed=1), tmp_path)
    edit_document(tmp_path, lambda d: (change(d), checksum == "taken_again"
                                       and d.update(config_sha256=adapter_io._document_digest(d))))
    for read in every_reader(tmp_path):
        with pytest.raises(AdapterLoadError, match=f"field '{field}' must be .*the file was edited or damaged"):
            read()


@pytest.mark.parametrize("edit", [lambda d: frozen_record(d).__setitem__(1, 1e308),
                                  lambda d: position_record(d).__setitem__(2, -1e308)], ids=["module", "position"])
def test_a_frozen_weights_record_edited_to_near_floats_largest_value_is_refused_as_edited(tmp_path, edit):
    """A finite 1e308 passes the field checks; comparing it squared the difference, an OverflowError."""
    nv.save_adapter(trained(seed=1), tmp_path)
    edit_document(tmp_path, lambda d: (edit(d), d.update(config_sha256=adapter_io._document_digest(d))))
    for read in every_reader(tmp_path):
        with pytest.raises(AdapterLoadError, match="frozen weights are not those .* record of the weights of "
                                                   r"(blocks\.0\.mlp\.fc1|pos_embed) .*the record was edited"):
            read()


def test_a_crafted_huge_rank_is_rejected_before_anything_is_allocated(tmp_path):
    nv.save_adapter(trained(seed=1), tmp_path)
    edit_document(tmp_path, lambda d: d["config"].update(rank=2**40))  # bases of 2**40 x in values: 100s of TB
    with pytest.raises(AdapterLoadError):
        nv.load_adapter(tiny_vit(), tmp_path)


def test_a_width_mismatch_names_the_layer_and_both_shapes(tmp_path):
    nv.save_adapter(trained(seed=1, mlp_ratio=2.0), tmp_path)
    with pytest.raises(AdapterLoadError, match=r"layer blocks.0.mlp.fc1 is 64→256 .* in the model but 64→128"):
        nv.load_adapter(tiny_vit(), tmp_path)


@pytest.mark.parametrize("config", [CONFIG, "linear"], ids=["nola", "linear_probe"])
@pytest.mark.parametrize("bits", [16, 4])
@pytest.mark.parametrize("classes", [5, 10])  # 10: what the old message advised
def test_an_adapter_of_another_width_is_refused_naming_the_width_not_another_class_count(tmp_path, config, bits,
                                                                                         classes):
    """A 64-wide model's 5-class head read on a 32-wide model was taken for a 10-class one (320 values / 32): "create
    the model with num_classes=10", after which the layers' shapes were refused."""
    nv.save_adapter(as_if_trained(nv.inject(tiny_vit(), config), 1, scale=0.1), tmp_path, bits=bits)
    says = (r"layer blocks\.0\.\S+ is 32→\d+ .* in the model but 64→\d+" if config == CONFIG else
            r"head head\.weight takes 64 input features for each of its 5 classes, and the model's head takes 32: "
            r".*another width \(embed_dim\)")
    for read in every_reader(tmp_path, lambda: tiny_vit(classes, embed_dim=32)):
        with pytest.raises(AdapterLoadError, match=says) as error:
            read()
        assert "num_classes" not in str(error.value)


@pytest.mark.parametrize("spectral_norm", [torch.nn.utils.parametrizations.spectral_norm,
                                           torch.nn.utils.spectral_norm], ids=["parametrization", "legacy"])
@pytest.mark.parametrize("where", ["head", "blocks.0.attn.proj"])
def test_a_spectral_norm_whose_power_iteration_trained_on_is_refused_as_files_hold_no_buffers(tmp_path, spectral_norm,
                                                                                              where):
    """A train-mode pass updates a spectral norm's power-iteration vectors, which set the norm its weight is divided
    by: on the head, the file's logits came back 21 times off, silently (batch-norm statistics were refused)."""
    def built():
        model = tiny_vit()
        parent, _, child = where.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        torch.manual_seed(0)  # the vectors' random start
        setattr(owner, child, spectral_norm(getattr(owner, child)))
        return model

    model = nv.inject(built(), CONFIG)
    model.eval()(IMAGES)  # eval mode: the vectors stay
    nv.save_adapter(model, tmp_path / "eval", bits=32)
    torch.testing.assert_close(logits(nv.load_adapter(built(), tmp_path / "eval")), logits(model), rtol=0, atol=1e-6)
    model.train()(IMAGES)
    with pytest.raises(ValueError, match=r"power-iteration vectors of a spectral norm changed since inject \("
                                         + re.escape(where) + r"\..*eval mode"):
        nv.save_adapter(model, tmp_path / "train")
    assert not (tmp_path / "train").exists()


def test_a_head_beyond_the_float16_range_is_stored_in_float32_and_loads_exactly(tmp_path):
    model = trained(seed=1)
    with torch.no_grad():
        model.head.weight[0, 0] = 1e5  # float16 ends at 65,504: cast, this would be written as inf
    nv.save_adapter(model, tmp_path)  # the default 16 bits
    stored = load_bytes((tmp_path / WEIGHTS_NAME).read_bytes())
    assert stored["head.weight"].dtype == torch.float32 and stored["head.bias"].dtype == torch.float16
    loaded = nv.load_adapter(tiny_vit(), tmp_path)
    assert torch.equal(loaded.head.weight, model.head.weight)
    # a float16 model cannot hold it: refused before anything is injected, instead of a head of inf
    half = tiny_vit().half()
    with pytest.raises(AdapterLoadError, match=r"head.weight holds values up to 1e\+05, beyond the torch.float16"):
        nv.load_adapter(half, tmp_path)
    assert not nv.adapted_layers(half) and torch.isfinite(half.head.weight).all()
    with pytest.raises(AdapterLoadError, match="beyond the torch.float16"):
        nv.MultiTaskModel(tiny_vit().half()).add_task("large", tmp_path)
    nv.load_adapter(tiny_vit().bfloat16(), tmp_path)


@pytest.mark.parametrize("value", [65_519.0, -65_510.0])
def test_a_value_just_beyond_the_float16_range_is_stored_in_float32_and_loads_exactly(tmp_path, value):
    """Between 65,504 and 65,520 float16 rounds to 65,504 instead of overflowing: such a tensor was stored as float16
    and loaded as ±65,504, though the docs say a value beyond ±65,504 is kept in float32 and loads exactly."""
    model = trained(seed=1)
    with torch.no_grad():
        model.head.bias[0] = value
    nv.save_adapter(model, tmp_path)
    assert load_bytes((tmp_path / WEIGHTS_NAME).read_bytes())["head.bias"].dtype == torch.float32
    assert torch.equal(nv.load_adapter(tiny_vit(), tmp_path).head.bias, model.head.bias)


def test_a_float16_model_is_judged_by_the_factors_its_unmerged_pass_casts_whether_injected_or_not(tmp_path):
    # coefficients beyond 65,504 stay float32 parameters and give float16 factors that fit: a float16 model refused its
    # own adapter when loaded fresh (judged as float16 tensors) and took it injected; LoRA factors beyond float16 were
    # taken by an injected model (float32 parameters) whose unmerged outputs were then NaN
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).half()
    coefficients = nv.inject(tiny_vit().half(), CONFIG)
    with torch.no_grad():
        coefficients.blocks[0].mlp.fc1.nola_alpha[0, 0] = 1e5
        coefficients.blocks[0].mlp.fc1.nola_beta.mul_(1e-5)
        assert torch.isfinite(coefficients(images)).all()
    nv.save_adapter(coefficients, tmp_path / "nola")
    for model in (tiny_vit().half(), nv.inject(tiny_vit().half(), CONFIG)):
        with torch.no_grad():
            assert torch.isfinite(nv.load_adapter(model, tmp_path / "nola")(images)).all()
    lora = nv.LoRAConfig(rank=2, targets=["attn.qkv"])
    factors = nv.inject(tiny_vit(), lora)
    with torch.no_grad():
        factors.blocks[0].attn.qkv.lora_A.view(-1)[0] = 1e5
        factors.blocks[0].attn.qkv.lora_B.fill_(1e-6)
    nv.save_adapter(factors, tmp_path / "lora", bits=32)
    for model in (tiny_vit().half(), nv.inject(tiny_vit().half(), lora)):
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(AdapterLoadError, match=r"layer blocks\.0\.attn\.qkv has factors .* up to 1e\+05, beyond "
                                                   r"the torch.float16 .* inf or NaN outputs"):
            nv.load_adapter(model, tmp_path / "lora")
        assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    with torch.no_grad():  # as the error says: ΔW fits float16
        assert torch.isfinite(nv.merge_and_unload(nv.load_adapter(tiny_vit(), tmp_path / "lora")).half()(images)).all()


def test_a_float16_load_computes_each_layers_update_once_for_both_checks_that_need_it(tmp_path, monkeypatch):
    # the frozen-weight check (a layer whose weights moved beyond rounding) and the unmerged-range check (every float16
    # layer) each computed the layer's update: seconds of work per check on ViT-B
    nv.save_adapter(trained(seed=1), tmp_path)
    model = tiny_vit().half()
    with torch.no_grad():  # fine-tuned a little: within the tolerance, beyond rounding, and no update of this adapter
        model.blocks[0].mlp.fc1.weight.mul_(1.002)
    computed = []
    compute = adapter_io._file_updates
    monkeypatch.setattr(adapter_io, "_file_updates", lambda *args: computed.extend(args[-1]) or compute(*args))
    nv.load_adapter(model, tmp_path)
    assert "blocks.0.mlp.fc1" in computed and sorted(computed) == sorted(set(computed))


@pytest.mark.parametrize("bits", [16.0, "16", True, 12])
def test_a_bit_width_that_is_not_a_supported_integer_is_refused_before_the_old_adapter_is_touched(tmp_path, bits):
    nv.save_adapter(trained(seed=1), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match=r"bits must be one of 32, 16, 8, 4 \(an integer\)"):
        nv.save_adapter(trained(seed=2), tmp_path, bits=bits)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("bits", [4, 8])
def test_coefficients_near_the_float32_limit_quantise_to_finite_values(tmp_path, bits):
    model = trained(seed=1)
    alpha = dict(model.named_parameters())["blocks.0.mlp.fc1.nola_alpha"]
    with torch.no_grad():
        alpha.copy_(torch.linspace(-3e38, 3e38, alpha.numel(), dtype=torch.float64).reshape(alpha.shape))
    nv.save_adapter(model, tmp_path, bits=bits)
    loaded = dict(nv.load_adapter(tiny_vit(), tmp_path).named_parameters())["blocks.0.mlp.fc1.nola_alpha"]
    half_step = 6e38 / (2**bits - 1) / 2
    assert bool(torch.isfinite(loaded).all()) and (loaded.double() - alpha.double()).abs().max() <= half_step * 1.001


@pytest.mark.parametrize("bits", [4, 8])
def test_coefficients_near_the_smallest_float32_quantise_within_half_a_step(tmp_path, bits):
    """A range so narrow that float32 cannot hold its step (values near 1e-44) is coded in float64."""
    model = trained(seed=1)
    alpha = dict(model.named_parameters())["blocks.0.mlp.fc1.nola_alpha"]
    with torch.no_grad():
        alpha.copy_(torch.linspace(1e-44, 4e-44, alpha.numel()).reshape(alpha.shape))
    nv.save_adapter(model, tmp_path, bits=bits)
    loaded = dict(nv.load_adapter(tiny_vit(), tmp_path).named_parameters())["blocks.0.mlp.fc1.nola_alpha"]
    subnormal = torch.finfo(torch.float32).smallest_normal * 2.0**-23  # float32's resolution there
    half_step = (alpha.double().max() - alpha.double().min()) / (2**bits - 1) / 2
    assert (loaded.double() - alpha.double()).abs().max() <= half_step + subnormal / 2


@pytest.mark.parametrize("bits", [16, 4])
def test_a_value_beyond_float32_is_refused_naming_the_tensor_before_the_old_adapter_is_touched(tmp_path, bits):
    nv.save_adapter(trained(seed=1), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    model = trained(seed=2).double()
    with torch.no_grad():
        model.head.weight[0, 0] = 1e39
    with pytest.raises(ValueError, match="head.weight (holds 1e\\+39, beyond float32|spans .* too wide for 8-bit)"):
        nv.save_adapter(model, tmp_path, bits=bits)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_config_nested_too_deeply_is_refused_by_name(tmp_path):
    nv.save_adapter(nv.inject(tiny_vit(), nv.LoRAConfig(rank=2)), tmp_path)
    (tmp_path / CONFIG_NAME).write_text('{"format": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(AdapterLoadError, match="nests its JSON too deeply"):
        nv.load_adapter(tiny_vit(), tmp_path)
