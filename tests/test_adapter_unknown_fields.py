"""Fields and tensor types this version does not know are refused, not ignored: a newer nola_vision records what
changes the outputs within one format, and an integer tensor without its quantisation entry is no float."""
import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_adapter_formats import rewrite, saved
from tiny_models import tiny_vit

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
])
def test_a_field_this_version_does_not_know_is_refused(tmp_path, change, field):
    saved(tmp_path)
    rewrite(tmp_path, resealed(change))
    with pytest.raises(AdapterLoadError, match=rf"holds the field {field}, which this nola_vision .* does not know.*"
                                               "Upgrade"):
        nv.load_adapter(tiny_vit(), tmp_path)


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
