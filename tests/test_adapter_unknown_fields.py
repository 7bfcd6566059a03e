"""Fields and tensor types this version does not know are refused, not ignored: a newer nola_vision records what
changes the outputs within one format, and an integer tensor without its quantisation entry is no float. Files a
script rewrote with fresh checksums are refused where they no longer say what save_adapter wrote: a tensor in
another shape, malformed quantisation entries, an empty frozen-weights record."""
import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_adapter_formats import rewrite, saved
from tiny_models import as_if_trained, tiny_vit

import nola_vision as nv
from nola_vision.adapters import files as adapter_io
from nola_vision.adapters.files import CONFIG_NAME, WEIGHTS_NAME, AdapterLoadError


def resealed(change):
    """``change`` applied to the document, its checksum taken again, as a newer writer would."""
    def edit(document):
        change(document)
        document["config_sha256"] = adapter_io._document_digest(document)
    return edit


@pytest.mark.parametrize("change, field", [
    (lambda d: d.update(output_transform="softmax"), "output_transform"),
    (lambda d: d["settings"].update(attention_scale=0.5), "settings.attention_scale"),
    # a newer check of the frozen weights, skipped, let other weights load (older readers skipped pos_embed's so)
    (lambda d: d["frozen_weights"].update(exact_sha256="0" * 64), "frozen_weights.exact_sha256"),
    (lambda d: d["frozen_weights"]["context"].update(folded="AAAA"), "frozen_weights.context.folded"),
])
def test_a_field_this_version_does_not_know_is_refused(tmp_path, change, field):
    saved(tmp_path)
    rewrite(tmp_path, resealed(change))
    with pytest.raises(AdapterLoadError, match=rf"holds the field {field}, which this nola_vision .* does not know.*"
                                               "Upgrade"):
        nv.load_adapter(tiny_vit(), tmp_path)


@pytest.mark.parametrize("change, said", [
    (lambda d: d["config"].update(dropout=0.1), r"unknown NOLAConfig fields \['dropout'\]"),
    (lambda d: d.update(generator_version="nola-lowbias32x2-int16-v9"), r"from generator 'nola-lowbias32x2-int16-v9'"),
    (lambda d: d["frozen_weights"].update(version="sample32768-sign16-float64-v9"), "fingerprinted by"),
])
def test_a_file_a_newer_nola_vision_wrote_says_to_upgrade(tmp_path, change, said):
    # a newer config field was "not valid", a newer generator "an early build", a newer fingerprint "load it with
    # the build that wrote it": none said that upgrading reads the file
    saved(tmp_path)
    rewrite(tmp_path, resealed(lambda d: (change(d), d.update(library_version="9.1.0"))))
    upgrade = r"upgrade nola_vision \(pip install -U nola_vision\) to load it"
    with pytest.raises(AdapterLoadError, match=rf"{said}.* by nola_vision 9\.1\.0, newer .*: {upgrade}") as error:
        nv.load_adapter(tiny_vit(), tmp_path)
    assert "early build" not in str(error.value) and "build that wrote" not in str(error.value)


def test_an_integer_tensor_without_a_quantisation_entry_is_refused(tmp_path):
    saved(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    name = next(iter(tensors))
    tensors[name] = (tensors[name] * 100).round().to(torch.int8)  # its values as integers, 100 times too large
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    digest = hashlib.sha256((tmp_path / WEIGHTS_NAME).read_bytes()).hexdigest()
    rewrite(tmp_path, resealed(lambda d: d.update(weights_sha256=digest)))
    document = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert document["bits"] == 32
    with pytest.raises(AdapterLoadError, match=rf"tensor {name} is stored as torch.int8 without a quantisation entry"):
        nv.load_adapter(tiny_vit(), tmp_path)


def resealed_weights(directory, change, metadata_change=None, metadata_update=None):
    """The weights file rewritten by ``change`` (its quantisation table by ``metadata_change``, its metadata by
    ``metadata_update``), both checksums taken again, as a script or another tool rewriting the pair would."""
    with safe_open(str(directory / WEIGHTS_NAME), "pt") as opened:
        metadata = {**opened.metadata(), **(metadata_update or {})}
    tensors = load_file(directory / WEIGHTS_NAME)
    change(tensors)
    if metadata_change is not None:
        quantization = json.loads(metadata["quantization"])
        metadata_change(quantization)
        metadata["quantization"] = json.dumps(quantization)
    save_file(tensors, directory / WEIGHTS_NAME, metadata=metadata)
    digest = hashlib.sha256((directory / WEIGHTS_NAME).read_bytes()).hexdigest()
    rewrite(directory, resealed(lambda d: d.update(weights_sha256=digest)))


@pytest.mark.parametrize("name", ["head.weight", "blocks.0.mlp.fc1.nola_alpha"])
def test_a_tensor_stored_in_another_shape_of_as_many_values_is_refused(tmp_path, name):
    # It was reshaped to the model's shape: a transposed head loaded and moved the logits by up to 8.
    saved(tmp_path)
    shape = tuple(load_file(tmp_path / WEIGHTS_NAME)[name].shape)

    def transpose(tensors):
        tensors[name] = tensors[name].reshape(shape[::-1]) if name.endswith("alpha") else tensors[name].t().contiguous()
    resealed_weights(tmp_path, transpose)
    with pytest.raises(AdapterLoadError, match=rf"tensor {name} has shape \({shape[1]}, {shape[0]}\) in the file but "
                                               rf"\({shape[0]}, {shape[1]}\) in the model"):
        nv.load_adapter(tiny_vit(), tmp_path)


def saved_at_8_bits(directory):
    model = as_if_trained(nv.inject(tiny_vit(), nv.NOLAConfig(rank=2, num_basis_a=16, num_basis_b=16)), 1, scale=0.1)
    nv.save_adapter(model, directory, bits=8)


@pytest.mark.parametrize("change, message", [
    (lambda q: q["head.bias"].__setitem__(0, "0.1"), r"quantisation entry \['0.1', .* is not \[minimum, step, bits\] "
                                                      r"with a finite minimum"),
    (lambda q: q["head.bias"].__setitem__(1, None), r"quantisation entry \[.*, None, 8\] is not"),
    (lambda q: q["head.bias"].__setitem__(1, -0.5), r"quantisation entry \[.*, -0.5, 8\] is not .* a finite step ≥ 0"),
    (lambda q: q["head.bias"].__setitem__(2, 4), r"tensor head.bias holds 5 bytes of 4-bit codes, but the model's 5 "
                                                  r"values of shape \(5,\) take two 4-bit codes a byte: 3 bytes"),
])
def test_malformed_quantisation_entries_are_refused_naming_what_is_wrong(tmp_path, change, message):
    saved_at_8_bits(tmp_path)
    resealed_weights(tmp_path, lambda tensors: None, change)
    with pytest.raises(AdapterLoadError, match=message):
        nv.load_adapter(tiny_vit(), tmp_path)


def test_codes_stored_in_another_integer_dtype_are_refused_as_such(tmp_path):
    saved_at_8_bits(tmp_path)
    resealed_weights(tmp_path, lambda tensors: tensors.update({"head.bias": tensors["head.bias"].to(torch.int8)}))
    with pytest.raises(AdapterLoadError, match=r"tensor head.bias is stored as torch.int8, but its quantisation entry "
                                               r"says 8-bit codes, which are stored as uint8"):
        nv.load_adapter(tiny_vit(), tmp_path)


def test_an_empty_frozen_weights_record_is_refused_as_malformed(tmp_path):
    saved(tmp_path)
    rewrite(tmp_path, resealed(lambda d: d["frozen_weights"].update(modules={})))
    with pytest.raises(AdapterLoadError, match="frozen_weights"):
        nv.load_adapter(tiny_vit(), tmp_path)


@pytest.mark.parametrize("table", ["5", "[]", '"entries"'])
def test_a_quantisation_table_that_is_no_object_is_refused_by_name(tmp_path, table):
    saved(tmp_path)
    resealed_weights(tmp_path, lambda tensors: None, metadata_update={"quantization": table})
    with pytest.raises(AdapterLoadError, match="quantisation table is a JSON (int|list|str), not an object"):
        nv.load_adapter(tiny_vit(), tmp_path)


@pytest.mark.parametrize("bits", [8, 4])
def test_codes_stored_in_more_than_one_dimension_are_refused(tmp_path, bits):
    # 4-bit codes re-packed as a (2, n) tensor unpacked in another order and loaded silently wrong
    model = as_if_trained(nv.inject(tiny_vit(), nv.LoRAConfig(rank=2)), 1, scale=0.1)
    nv.save_adapter(model, tmp_path, bits=bits)
    name = "blocks.0.attn.qkv.lora_A"
    resealed_weights(tmp_path, lambda tensors: tensors.update({name: tensors[name].reshape(2, -1)}))
    with pytest.raises(AdapterLoadError, match=rf"tensor {name}'s {bits}-bit codes have shape \(2, \d+\), but codes "
                                               r"are stored flat"):
        nv.load_adapter(tiny_vit(), tmp_path)


@pytest.mark.parametrize("edit", [
    lambda p: p["modules"].pop(),  # a record without its precision fell back to the file's scalar
    lambda p: p["context"].append(23),  # one more than the records: ignored
    lambda p: p["modules"].__setitem__(0, 1),  # an exponent no writer gives: 1.6% everywhere, as 1 meant
    lambda p: p["positions"].update(other_embed=23),  # a name the records lack
], ids=["short", "long", "unknown-exponent", "unknown-name"])
def test_precisions_that_do_not_match_the_records_are_refused_as_edited(tmp_path, edit):
    saved(tmp_path)
    rewrite(tmp_path, resealed(lambda d: edit(d["frozen_weights"]["precisions"])))
    with pytest.raises(AdapterLoadError, match=r"field 'frozen_weights' must be .*the file was edited or damaged"):
        nv.load_adapter(tiny_vit(), tmp_path)


def test_a_linear_probe_file_fingerprinting_only_the_head_norm_warns_that_random_inits_pass(tmp_path):
    """Linear-probe files of 2026-11-30 recorded only the norm the head reads, which timm sets to ones and zeros in
    every random init: they loaded onto any random backbone as if checked."""
    nv.save_adapter(as_if_trained(nv.inject(tiny_vit(), "linear"), 0, scale=0.1), tmp_path)

    def head_norm_only(document):
        record = document["frozen_weights"]
        record["modules"] = {"norm": record["modules"]["norm"]}
        for later in ("context", "positions", "precision", "precisions"):  # records added since
            del record[later]
        document["library_version"] = "0.1.0"
    rewrite(tmp_path, resealed(head_norm_only))
    with pytest.warns(UserWarning, match=r"records only the frozen weights of the norm its head reads \(norm\), which "
                                         "every random init of the backbone has too"):
        nv.load_adapter(tiny_vit(), tmp_path)


def saved_with_buffers(directory):
    model = tiny_vit()
    model.patch_embed.register_buffer("scale", torch.ones(3))
    nv.save_adapter(as_if_trained(nv.inject(model, nv.NOLAConfig(rank=2, num_basis_a=16, num_basis_b=16)), 1,
                                  scale=0.1), directory)
    return model


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["buffers"].update(folded="AAAA"), r"holds the field frozen_weights\.buffers\.folded, which this"),
    (lambda r: r["buffers"].update(modules=2), r"field 'frozen_weights' must be .*edited or damaged"),
    (lambda r: r["precisions"]["buffers"].append(23), r"field 'frozen_weights' must be .*edited or damaged"),
], ids=["unknown-field", "count", "precisions"])
def test_a_buffers_record_edited_or_of_a_newer_layout_is_refused(tmp_path, edit, message):
    model = saved_with_buffers(tmp_path)
    rewrite(tmp_path, resealed(lambda d: edit(d["frozen_weights"])))
    with pytest.raises(AdapterLoadError, match=message):
        nv.load_adapter(model, tmp_path)
