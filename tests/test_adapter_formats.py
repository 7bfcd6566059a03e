"""Older adapter formats: format 2 loads, checked by what it records; format 1 (no checksums) loads only on request;
editing a current file's format skips no check."""
import json
import warnings

import pytest
import torch
from tiny_models import as_if_trained, tiny_vit

import nola_vision as nv
from nola_vision.adapters import files as adapter_io
from nola_vision.adapters.files import CONFIG_NAME, WEIGHTS_NAME, AdapterLoadError

CONFIG = nv.NOLAConfig(rank=2, num_basis_a=16, num_basis_b=16, targets=["mlp.fc1", "attn.v"])
LEGACY = "nola_vision.adapter/1"


def saved(directory, seed=1):
    model = as_if_trained(nv.inject(tiny_vit(), CONFIG), seed, scale=0.1)
    return model, nv.save_adapter(model, directory, bits=32)


def rewrite(directory, change):
    document = json.loads((directory / CONFIG_NAME).read_text())
    change(document)
    (directory / CONFIG_NAME).write_text(json.dumps(document))


def as_format_1(document):
    """What a file written before checksums and fingerprints holds."""
    for key in ("weights_sha256", "config_sha256", "frozen_weights"):
        del document[key]
    document["format"] = LEGACY


def as_format_2(document):
    """What a file written before frozen-weights fingerprints holds (its checksum taken again)."""
    del document["frozen_weights"]
    document["format"] = "nola_vision.adapter/2"
    document["config_sha256"] = adapter_io._document_digest(document)


def edit_scale(document):
    document["config"]["scale"] = 3.0


def flip_a_weight_byte(directory):
    raw = bytearray((directory / WEIGHTS_NAME).read_bytes())
    raw[-3] ^= 0x40
    (directory / WEIGHTS_NAME).write_bytes(bytes(raw))


def test_a_format_1_file_loads_only_when_its_contents_may_go_unchecked(tmp_path):
    saved(tmp_path)
    rewrite(tmp_path, lambda d: (as_format_1(d), edit_scale(d)))
    model = tiny_vit()
    with pytest.raises(AdapterLoadError, match=r"legacy format 'nola_vision.adapter/1', which carries no checksums.*"
                                               r"allow_unchecked_legacy=True"):
        nv.load_adapter(model, tmp_path)
    assert not nv.adapted_layers(model)
    nv.load_adapter(model, tmp_path, allow_unchecked_legacy=True)  # loads as it says: the edited scale included
    assert nv.adapted_layers(model)["blocks.0.mlp.fc1"].scaling == 3.0 / CONFIG.rank


def test_flipped_bytes_in_a_format_1_file_load_only_when_asked(tmp_path):
    model, _ = saved(tmp_path)
    rewrite(tmp_path, as_format_1)
    flip_a_weight_byte(tmp_path)
    with pytest.raises(AdapterLoadError, match="allow_unchecked_legacy"):
        nv.load_adapter(tiny_vit(), tmp_path)
    loaded = nv.load_adapter(tiny_vit(), tmp_path, allow_unchecked_legacy=True)
    assert not all(torch.equal(p, model.get_parameter(n)) for n, p in loaded.named_parameters() if p.requires_grad)
    with pytest.raises(AdapterLoadError, match="allow_unchecked_legacy"):
        nv.MultiTaskModel(tiny_vit()).add_task("legacy", tmp_path)


def test_onnx_task_inputs_takes_the_format_1_option_its_error_names(tmp_path):
    """The error said "pass allow_unchecked_legacy=True", which onnx_task_inputs did not take (a TypeError)."""
    pytest.importorskip("onnx")
    saved(tmp_path)
    rewrite(tmp_path, as_format_1)
    with pytest.raises(AdapterLoadError, match="allow_unchecked_legacy=True"):
        nv.onnx_task_inputs(tmp_path)
    current = nv.onnx_task_inputs(saved(tmp_path / "current")[1])
    legacy = nv.onnx_task_inputs(tmp_path, allow_unchecked_legacy=True)
    assert legacy.keys() == current.keys()


@pytest.mark.parametrize("allow_unchecked_legacy", [False, True])
def test_a_current_file_relabelled_as_format_1_keeps_every_check(tmp_path, allow_unchecked_legacy):
    saved(tmp_path / "edited")
    rewrite(tmp_path / "edited", lambda d: (d.update(format=LEGACY), edit_scale(d)))
    with pytest.raises(AdapterLoadError, match="edited or damaged"):
        nv.load_adapter(tiny_vit(), tmp_path / "edited", allow_unchecked_legacy=allow_unchecked_legacy)
    saved(tmp_path / "flipped")
    rewrite(tmp_path / "flipped", lambda d: (d.update(format=LEGACY),
                                             d.update(config_sha256=adapter_io._document_digest(d))))
    flip_a_weight_byte(tmp_path / "flipped")
    with pytest.raises(AdapterLoadError, match="corrupt"):
        nv.load_adapter(tiny_vit(), tmp_path / "flipped", allow_unchecked_legacy=allow_unchecked_legacy)


def test_a_current_file_relabelled_as_format_2_is_refused_as_edited(tmp_path):
    saved(tmp_path)
    rewrite(tmp_path, lambda d: d.update(format="nola_vision.adapter/2"))
    with pytest.raises(AdapterLoadError, match="edited or damaged"):
        nv.load_adapter(tiny_vit(), tmp_path)


def test_format_2_files_load_checked_by_their_checksums_but_not_for_frozen_weights(tmp_path):
    model, _ = saved(tmp_path / "a")
    rewrite(tmp_path / "a", as_format_2)
    unchecked = r"\(nola_vision\.adapter/2, written by nola_vision .*\) records no fingerprint of the frozen weights"
    with pytest.warns(UserWarning, match=unchecked):
        loaded = nv.load_adapter(tiny_vit(), tmp_path / "a")
    assert all(torch.equal(p, model.get_parameter(n)) for n, p in loaded.named_parameters() if p.requires_grad)
    other_weights = tiny_vit()
    with torch.no_grad():
        other_weights.blocks[0].mlp.fc1.weight.mul_(2.0)
    with pytest.warns(UserWarning, match=unchecked):  # format 2 records no fingerprint: unchecked, as it says
        nv.load_adapter(other_weights, tmp_path / "a")
    with pytest.raises(AdapterLoadError, match="merge_and_unload"):
        nv.load_adapter(nv.merge_and_unload(model), tmp_path / "a")
    saved(tmp_path / "b")
    rewrite(tmp_path / "b", lambda d: (as_format_2(d), edit_scale(d)))
    with pytest.raises(AdapterLoadError, match="edited or damaged"):
        nv.load_adapter(tiny_vit(), tmp_path / "b")


@pytest.mark.parametrize("bits", [8, 4])
def test_integer_codes_that_lose_most_of_a_tensor_warn_naming_it(tmp_path, bits):
    """Per-tensor codes span a tensor's range: one coefficient far larger than the rest left all others on one code
    (their values gone), without a word."""
    model = as_if_trained(nv.inject(tiny_vit(), nv.NOLAConfig(num_basis_a=64, num_basis_b=64)), 1, scale=0.2,
                          adapters_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ordinary trained tensors: their coding error is no news
        nv.save_adapter(model, tmp_path / "plain", bits=bits)
    name, alpha = next((n, p) for n, p in model.named_parameters() if n.endswith("nola_alpha"))
    with torch.no_grad():
        alpha[0, 0] = 1e4
    with pytest.warns(UserWarning, match=rf"tensor {name} loses most of its values at {bits} bits.*up to 1e\+04.*"
                                         r"Save with bits=16"):
        nv.save_adapter(model, tmp_path / "outlier", bits=bits)


def test_the_advice_for_a_head_that_loses_its_values_names_the_bits_the_file_is_saved_at(tmp_path):
    """The head is stored as 8-bit codes in a 4-bit file: its warning advised training quantisation-aware at 8 bits,
    which then warned that the 4-bit file holds values training never saw."""
    model = as_if_trained(nv.inject(tiny_vit(), nv.LoRAConfig(rank=2)), 1, scale=0.2)
    with torch.no_grad():
        model.head.weight[0, 0] = 1e4
    with pytest.warns(UserWarning, match=r"tensor head\.weight loses most of its values at 8 bits.*train "
                                         r"quantisation-aware at 4 bits \(set_quantization_aware, which sees the head "
                                         r"at its 8-bit codes\)"):
        nv.save_adapter(model, tmp_path / "four", bits=4)
    nv.set_quantization_aware(model, 4)  # the advice, followed: no warning of either kind
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nv.save_adapter(model, tmp_path / "aware", bits=4)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_negative_zero_minimum_is_recorded_as_the_zero_it_loads_as(tmp_path, bits):
    """quantize recorded a -0.0 minimum, which decodes as +0.0: a file and the one saved from its load gave back the
    same values with other bytes (and another weights_sha256)."""
    model = nv.inject(tiny_vit(), nv.NOLAConfig(num_basis_a=16, num_basis_b=16))
    name, alpha = next((n, p) for n, p in model.named_parameters() if n.endswith("nola_alpha"))
    with torch.no_grad():
        alpha.fill_(-0.0)
        alpha.view(-1)[1] = 0.5
    nv.save_adapter(model, tmp_path / "first", bits=bits)
    nv.save_adapter(nv.load_adapter(tiny_vit(), tmp_path / "first"), tmp_path / "again", bits=bits)
    assert (tmp_path / "first" / WEIGHTS_NAME).read_bytes() == (tmp_path / "again" / WEIGHTS_NAME).read_bytes()


@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantisation_aware_model_saved_at_its_bits_is_not_warned_about_its_codes(tmp_path, bits):
    # it was told to save with bits=16 or to train quantisation-aware at the bits it trained at: its file reproduces
    # the trained model exactly, and bits=16 would not
    model = as_if_trained(nv.inject(tiny_vit(), nv.NOLAConfig(num_basis_a=64, num_basis_b=64)), 1, scale=0.2,
                          adapters_only=True)
    nv.set_quantization_aware(model, bits)
    name, alpha = next((n, p) for n, p in model.named_parameters() if n.endswith("nola_alpha"))
    with torch.no_grad():
        alpha[0, 0] = 1e4  # what left the other values one or two codes
    images = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nv.save_adapter(model, tmp_path / "aware", bits=bits)
    loaded = nv.set_quantization_aware(nv.load_adapter(tiny_vit(), tmp_path / "aware"), bits)
    torch.testing.assert_close(loaded.eval()(images), model.eval()(images), rtol=0, atol=0)


@pytest.mark.parametrize("aware, bits", [(4, 8), (8, 4)])
def test_a_linear_probe_sees_its_head_at_8_bits_at_either_width_so_either_file_holds_it(tmp_path, aware, bits):
    """Its head alone trains, at 8-bit codes for both widths: saving at the other width warned of other outputs, and
    loading onto a model set to it was refused, where the outputs were the same."""
    model = nv.set_quantization_aware(as_if_trained(nv.inject(tiny_vit(), "linear"), 1, scale=0.2), aware)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nv.save_adapter(model, tmp_path, bits=bits)
    images = torch.randn(2, 3, 32, 32)
    for loaded in (nv.load_adapter(nv.set_quantization_aware(nv.inject(tiny_vit(), "linear"), aware), tmp_path),
                   nv.load_adapter(tiny_vit(), tmp_path)):
        torch.testing.assert_close(loaded.eval()(images), model.eval()(images), rtol=0, atol=0)
    with pytest.warns(UserWarning, match="saved at bits=16: the file holds the latent values"):
        nv.save_adapter(model, tmp_path / "latent", bits=16)  # floats: not what training saw


def test_a_linear_probe_trains_quantisation_aware_from_the_classifier():
    """Refused ("quant_bits applies to adapter tensors"), though nv.set_quantization_aware takes a linear probe."""
    from nola_vision.core.inject import quantization_aware_bits
    from nola_vision.train.module import FewShotClassifier

    tiny = dict(backbone="vit_tiny_patch16_224", pretrained=False, image_size=32, num_classes=4,
                backbone_kwargs=dict(patch_size=8, depth=2, embed_dim=64, num_heads=2))
    assert quantization_aware_bits(FewShotClassifier(adapter="linear", quant_bits=4, **tiny).model) == 4
    # a checkpoint and a state dict of one width load at the other: the head is seen at 8 bits at both
    checkpoint = {"state_dict": FewShotClassifier(adapter="linear", quant_bits=8, **tiny).state_dict()}
    FewShotClassifier(adapter="linear", quant_bits=8, **tiny).on_save_checkpoint(checkpoint)
    FewShotClassifier(adapter="linear", quant_bits=4, **tiny).on_load_checkpoint(checkpoint)
    probe = nv.set_quantization_aware(as_if_trained(nv.inject(tiny_vit(), "linear"), 1, scale=0.2), 8)
    other = nv.set_quantization_aware(nv.inject(tiny_vit(), "linear"), 4)
    other.load_state_dict(probe.state_dict())
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(other.eval()(images), probe.eval()(images), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"head was trained at full precision \(it records no nola_quant_bits, or "
                                           r"that entry was left out\)"):
        other.load_state_dict({k: v for k, v in probe.state_dict().items() if k.startswith("head.")}, strict=False)
    with pytest.raises(ValueError, match=r"full fine-tuning trains every weight, which adapter files store at 16 or "
                                         r"32 bits only: set quant_bits: null"):
        FewShotClassifier(adapter="full", quant_bits=8, **tiny)


@pytest.mark.parametrize("config", [nv.NOLAConfig(num_basis_a=16, num_basis_b=16),
                                    nv.LoRAConfig(rank=2, alpha=3.0, targets=["attn.q", "attn.v"])],
                         ids=["nola", "lora_alpha3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_trained_quantisation_aware_loads_back_its_exact_outputs(tmp_path, config, dtype):
    # Training rounded the decoded codes to the parameters' 16-bit dtype before combining them in float32; a model
    # loading the file holds float32 adapter tensors and combined the exact decode (logits off by half the codes'
    # own effect).
    model = as_if_trained(nv.inject(tiny_vit(), config), 1, scale=1.0).to(dtype)
    nv.set_quantization_aware(model, 4)
    nv.save_adapter(model, tmp_path / "aware", bits=4)
    loaded = nv.load_adapter(tiny_vit().to(dtype), tmp_path / "aware")
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5)).to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images), model.eval()(images), rtol=0, atol=0)
    trained = next(p for n, p in model.named_parameters() if n.endswith(("nola_alpha", "lora_A")))
    (model.eval()(images).float().square().sum()).backward()  # the straight-through gradient keeps its dtype
    assert trained.grad.dtype == dtype and bool(trained.grad.abs().sum() > 0)


@pytest.mark.parametrize("bits", [8, 4])
def test_codes_that_move_a_tensor_of_mostly_zeros_warn(tmp_path, bits):
    """No code holds 0 exactly next to -1 and 100: every zero moved (to -1 at 4 bits), silently, as the typical spread
    (and the fallback, the typical magnitude) was 0."""
    model = nv.inject(tiny_vit(), nv.NOLAConfig(num_basis_a=64, num_basis_b=64))
    name, alpha = next((n, p) for n, p in model.named_parameters() if n.endswith("nola_alpha"))
    with torch.no_grad():
        alpha.zero_()
        alpha.view(-1)[:2] = torch.tensor([-1.0, 100.0])
    with pytest.warns(UserWarning, match=rf"tensor {name} loses most of its values at {bits} bits: storing moves a "
                                         r"typical value by .*where most of them are 0"):
        nv.save_adapter(model, tmp_path, bits=bits)


@pytest.mark.parametrize("bits", [8, 4])
def test_integer_codes_that_collapse_values_far_from_zero_warn_too(tmp_path, bits):
    """Values around 1 that differ by hundredths, and one at 100: every other value got one code, so their
    differences (what the tensor holds) were gone, while their magnitude, which an earlier check compared the
    coding error with, barely moved."""
    model = nv.inject(tiny_vit(), nv.NOLAConfig(num_basis_a=64, num_basis_b=64))
    name, alpha = next((n, p) for n, p in model.named_parameters() if n.endswith("nola_alpha"))
    with torch.no_grad():
        alpha.copy_(1 + 0.01 * torch.randn(alpha.shape, generator=torch.Generator().manual_seed(0)))
        alpha[0, 0] = 100.0
    with pytest.warns(UserWarning, match=rf"tensor {name} loses most of its values at {bits} bits.*up to 100\b"):
        nv.save_adapter(model, tmp_path / "offset", bits=bits)
    with torch.no_grad():
        alpha[0, 0] = 1.05  # the same values without the outlier keep their differences: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nv.save_adapter(model, tmp_path / "plain", bits=bits)


@pytest.mark.parametrize("bits", [16, 4])
def test_a_file_of_an_earlier_version_recording_a_hand_replaced_heads_stale_class_count_still_loads(tmp_path, bits):
    """Earlier versions recorded timm's num_classes (1000) for ``model.head = nn.Linear(d, 7)``, with 7-row head
    tensors: such files load and serve by their head's 7 rows, not the count they record."""
    def hand_headed():
        model = tiny_vit(num_classes=1000)
        model.head = torch.nn.Linear(64, 7)
        return model

    model = as_if_trained(nv.inject(hand_headed(), nv.NOLAConfig(rank=2, num_basis_a=8, num_basis_b=8)), 1)
    directory = nv.save_adapter(model, tmp_path / "a", bits=bits)

    def as_recorded_then(document):
        document["num_classes"] = 1000
        document["config_sha256"] = adapter_io._document_digest(document)

    rewrite(directory, as_recorded_then)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    loaded = nv.load_adapter(hand_headed(), directory)
    assert nv.verify_adapter(loaded, directory).num_classes == 7
    served = nv.MultiTaskModel(hand_headed())
    served.add_task("a", directory)
    with torch.no_grad():
        expected = loaded.eval()(images)
        assert served.num_classes("a") == 7
        torch.testing.assert_close(torch.stack(served(images, "a")), expected, rtol=1e-5, atol=1e-5)


def test_the_class_count_of_a_file_comes_from_the_heads_linear_not_a_norm_of_as_many_features(tmp_path):
    """A head of LayerNorm(64) then Linear(64, 5), loaded onto a 64-class one: the norm's 64 features were taken for
    the file's class count (the refusal lost its fix, and a served task was refused)."""
    def normed(classes):
        model = tiny_vit(num_classes=classes)
        model.head = torch.nn.Sequential(torch.nn.LayerNorm(64), model.head)
        return model

    directory = nv.save_adapter(as_if_trained(nv.inject(normed(5), "linear"), 1), tmp_path / "a")
    with pytest.raises(AdapterLoadError, match="adapter has a 5-class head but the model has 64 classes"):
        nv.load_adapter(normed(64), directory)
    served = nv.MultiTaskModel(normed(64))
    served.add_task("t", directory)
    assert served.num_classes("t") == 5
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(torch.stack(served(images, "t")), nv.load_adapter(normed(5), directory)(images),
                                   rtol=1e-5, atol=1e-5)


def test_a_full_fine_tuning_file_of_early_versions_with_its_head_in_4_bit_codes_loads(tmp_path):
    # format 2 stored every tensor of a "full" file at the bits asked, the head too: its 4-bit bias of 6 values is 3
    # bytes, taken for a 3-class head (and the weight's codes for another width), so such files were refused
    from safetensors.torch import load_file, save_file

    model = as_if_trained(nv.inject(tiny_vit(num_classes=6), "full"), 1, scale=0.1)
    directory = nv.save_adapter(model, tmp_path / "full", bits=16)
    stored = load_file(str(directory / WEIGHTS_NAME))
    with open(directory / WEIGHTS_NAME, "rb") as file:
        header = json.loads(file.read(int.from_bytes(file.read(8), "little")))["__metadata__"]
    table = json.loads(header["quantization"])
    for name in ("head.weight", "head.bias"):  # as format 2 stored them
        stored[name], table[name] = adapter_io._stored_codes(name, model.get_parameter(name).detach(), 4)
    save_file(stored, str(directory / WEIGHTS_NAME), metadata={**header, "quantization": json.dumps(table)})

    def as_written_then(document):
        as_format_2(document)
        document["weights_sha256"] = adapter_io._sha256((directory / WEIGHTS_NAME).read_bytes())
        document["config_sha256"] = adapter_io._document_digest(document)

    rewrite(directory, as_written_then)
    loaded = nv.load_adapter(tiny_vit(num_classes=6), directory)
    assert nv.verify_adapter(loaded, directory).num_classes == 6
    step = table["head.weight"][1]  # a 4-bit step of the head's values
    assert (loaded.head.weight - model.head.weight).abs().max() <= step


def test_a_file_of_another_basis_generator_names_the_generator_not_a_version_to_install(tmp_path):
    # it said "install the nola_vision version 0.1.0 that wrote it", the version installed
    saved(tmp_path / "a")

    def of_the_earliest_builds(document):
        document["generator_version"] = "nola-triple32-v1"
        document["config_sha256"] = adapter_io._document_digest(document)

    rewrite(tmp_path / "a", of_the_earliest_builds)
    with pytest.raises(AdapterLoadError, match=r"generator 'nola-triple32-v1', this nola_vision has "
                                               r"'nola-lowbias32x2-int16-v1', whose bases differ: load it with a "
                                               r"nola_vision whose generator is 'nola-triple32-v1'.*train the task "
                                               r"again") as refused:
        nv.load_adapter(nv.inject(tiny_vit(), CONFIG), tmp_path / "a")
    assert "install" not in str(refused.value)


def test_class_names_that_do_not_name_the_stored_heads_outputs_are_refused(tmp_path):
    """A file recording 5 names (and num_classes 5, its checksum taken again) over head tensors of 3 rows loaded, and
    a server labelled its 3 outputs with 5 names."""
    model = as_if_trained(nv.inject(tiny_vit(num_classes=3), CONFIG), 1, scale=0.1)
    nv.save_adapter(model, tmp_path, bits=32, class_names=["cat", "dog", "fox"])

    def five_names(document):
        document["num_classes"], document["class_names"] = 5, ["cat", "dog", "fox", "owl", "yak"]
        document["config_sha256"] = adapter_io._document_digest(document)

    rewrite(tmp_path, five_names)
    with pytest.raises(AdapterLoadError, match=r"'class_names' holds 5 names, but the file's head has 3 outputs"):
        nv.verify_adapter(tiny_vit(num_classes=3), tmp_path, match_num_classes=False)
    server = nv.MultiTaskModel(tiny_vit(num_classes=3))
    with pytest.raises(AdapterLoadError, match=r"'class_names' holds 5 names"):
        server.add_task("forged", tmp_path)


def test_a_symbolic_link_loop_in_place_of_an_adapter_is_named_as_one(tmp_path):
    """It was blamed on the permissions or the disk."""
    loop = tmp_path / "task"
    loop.symlink_to(loop)
    with pytest.raises(AdapterLoadError, match=r"task cannot be read \(Too many levels of symbolic links\): a "
                                               r"symbolic link on its path leads back to itself"):
        nv.verify_adapter(tiny_vit(), loop)
