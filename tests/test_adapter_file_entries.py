"""Adapter directories whose entries are not what save_adapter wrote, or cannot be looked at (a FIFO, an unreadable
file, a name too long), and tensors a dtype cannot hold: each refused with what is wrong, never a hang, a raw OSError
or values silently turned into zeros."""
import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_models import as_if_trained, tiny_vit

import nola_vision as nv
from nola_vision.adapters.files import CONFIG_NAME, WEIGHTS_NAME, AdapterLoadError
from nola_vision.core import storage

LORA = nv.LoRAConfig(rank=2, targets=["attn.q", "attn.v"])


def saved(tmp_path, name="adapter", model=None):
    model = model if model is not None else as_if_trained(nv.inject(tiny_vit(), LORA), 1, scale=0.3)
    return nv.save_adapter(model, tmp_path / name), model


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
@pytest.mark.parametrize("entry", [CONFIG_NAME, WEIGHTS_NAME])
def test_a_fifo_in_an_adapter_directory_is_refused_by_load_save_and_size_without_blocking(tmp_path, entry):
    # Run apart, so that a read that blocks on the FIFO fails the test by its timeout instead of hanging the suite.
    directory, _ = saved(tmp_path)
    os.remove(directory / entry)
    os.mkfifo(directory / entry)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import nola_vision as nv
        from tiny_models import tiny_vit
        directory = {str(directory)!r}
        for call in (lambda: nv.load_adapter(tiny_vit(), directory), lambda: nv.adapter_size_bytes(directory),
                     lambda: nv.save_adapter(nv.inject(tiny_vit(), nv.LoRAConfig(rank=2)), directory)):
            try:
                call()
            except ValueError as error:
                print(type(error).__name__, error)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    lines = done.stdout.splitlines()
    assert len(lines) == 3, done.stdout + done.stderr
    assert lines[0].startswith("AdapterLoadError") and "FIFO, socket or device" in lines[0]
    assert lines[1].startswith("AdapterLoadError") and "is not a file" in lines[1]
    assert lines[2].startswith("ValueError") and "neither nv.save_adapter nor nv.export_peft wrote" in lines[2]


def test_an_unreadable_file_is_named_in_full_with_what_to_check(tmp_path, monkeypatch):
    directory, _ = saved(tmp_path)
    opened = os.open

    def refuse_the_config(path, flags, *args, **kwargs):
        if path == CONFIG_NAME:  # as for a file without read permission (root reads any file, so none is made)
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return opened(path, flags, *args, **kwargs)

    monkeypatch.setattr(storage.os, "open", refuse_the_config)
    monkeypatch.setattr(storage.os, "supports_dir_fd", os.supports_dir_fd | {refuse_the_config})
    with pytest.raises(AdapterLoadError, match=f"^{directory / CONFIG_NAME} cannot be read .*check its permissions"):
        nv.load_adapter(tiny_vit(), directory)


def test_save_and_export_to_a_name_too_long_say_so_instead_of_claiming_foreign_files(tmp_path):
    model = as_if_trained(nv.inject(tiny_vit(), LORA), 1)
    long = tmp_path / ("n" * 300)
    for call in (lambda: nv.save_adapter(model, long), lambda: nv.export_peft(model, long)):
        with pytest.raises(ValueError, match="is 300 bytes long, over the 255 bytes.*choose a shorter name"):
            call()
    assert os.listdir(tmp_path) == []


def test_a_config_with_an_integer_of_thousands_of_digits_is_named_as_not_valid_json(tmp_path):
    directory, _ = saved(tmp_path)
    text = (directory / CONFIG_NAME).read_text()
    (directory / CONFIG_NAME).write_text(text.replace('"rank":2', '"rank":' + "9" * 5000, 1))
    assert "9" * 5000 in (directory / CONFIG_NAME).read_text()
    with pytest.raises(AdapterLoadError, match=f"^{directory / CONFIG_NAME} is not valid JSON"):
        nv.load_adapter(tiny_vit(), directory)


def test_a_head_below_float16s_range_is_refused_by_a_float16_model_not_loaded_as_zeros(tmp_path):
    model = as_if_trained(nv.inject(tiny_vit(), LORA), 1)
    with torch.no_grad():
        model.head.weight.mul_(1e-6)  # |w| ~ 1e-8: saved as float32, since float16 would zero it
    directory, _ = saved(tmp_path, model=model)
    with pytest.raises(AdapterLoadError, match="head.weight holds values up to .* only, below the normal range of "
                                               "the torch.float16 of this model"):
        nv.load_adapter(tiny_vit().half(), directory)
    loaded = nv.load_adapter(tiny_vit(), directory)  # float32 holds them
    assert torch.equal(loaded.head.weight, model.head.weight)


@pytest.mark.parametrize("bits", [16, 32])
def test_a_float64_tensor_below_float32s_range_is_refused_at_save_not_stored_as_zeros(tmp_path, bits):
    model = as_if_trained(nv.inject(tiny_vit().double(), LORA), 1)
    with torch.no_grad():
        model.head.weight.mul_(1e-50)
    with pytest.raises(ValueError, match="head.weight holds values up to .* only, below float32's normal range"):
        nv.save_adapter(model, tmp_path / "adapter", bits=bits)
    assert not (tmp_path / "adapter").exists()
    with torch.no_grad():
        model.head.weight.mul_(1e50)  # a float64 tensor in float32's range is stored to float32's precision
    nv.save_adapter(model, tmp_path / "adapter", bits=bits)
    config = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert config["format"].startswith("nola_vision.adapter/")


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("scale, refusal", [(1e-300, "below float32's normal range"),
                                            (1e300, "beyond float32's range")])
def test_a_float64_tensor_float32_cannot_hold_is_refused_at_low_bits_too(tmp_path, bits, scale, refusal):
    # Codes are made from float32 values: at 8/4 bits such a tensor was stored as all zeros (or refused with advice to
    # save it at bits=32, which refused it too).
    model = as_if_trained(nv.inject(tiny_vit().double(), LORA), 1)
    name = next(name for name, _ in model.named_parameters() if name.endswith("lora_A"))
    with torch.no_grad():
        model.get_parameter(name).mul_(scale)
    with pytest.raises(ValueError, match=f"{name} holds .*{refusal}"):
        nv.save_adapter(model, tmp_path / "adapter", bits=bits)
    assert not (tmp_path / "adapter").exists()


def test_a_tensor_just_below_float16s_normal_range_still_switches_into_a_float16_model(tmp_path):
    # A LoRA B of |b| ~ 3e-5 (stored as float32: float16 would round it by 0.1%) was refused by a float16 model
    # whose adapters are injected already, as if it would lose most of its digits.
    model = as_if_trained(nv.inject(tiny_vit(), LORA), 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("lora_B"):
                parameter.mul_(3e-5 / parameter.abs().max())
    directory, _ = saved(tmp_path, model=model)
    serving = nv.inject(tiny_vit(), LORA).half()
    nv.load_adapter(serving, directory)
    loaded = dict(serving.named_parameters())["blocks.0.attn.qkv.lora_B"].float()
    expected = dict(model.named_parameters())["blocks.0.attn.qkv.lora_B"]
    torch.testing.assert_close(loaded, expected, rtol=0, atol=2**-25)  # half float16's subnormal step


def test_a_config_too_large_to_be_one_is_refused_unread_by_load_and_save(tmp_path):
    directory, _ = saved(tmp_path)
    with open(directory / CONFIG_NAME, "r+b") as file:  # sparse: 65 MiB that takes no disk and, unread, no memory
        file.truncate(65 << 20)
    with pytest.raises(AdapterLoadError, match=r"is 68,157,440 bytes, more than the 67,108,864 an adapter_config"):
        nv.load_adapter(tiny_vit(), directory)
    with pytest.raises(ValueError, match="neither nv.save_adapter nor nv.export_peft wrote"):
        nv.save_adapter(nv.inject(tiny_vit(), LORA), directory)


@pytest.mark.skipif(not hasattr(os, "truncate") or sys.platform != "linux", reason="address-space limit of Linux")
def test_weights_too_large_for_memory_are_named_with_their_size_not_a_bare_memory_error(tmp_path):
    # Run apart under a 4 GiB address-space limit, with a sparse 6 GiB weights file: reading it cannot fit.
    directory, _ = saved(tmp_path)
    with open(directory / WEIGHTS_NAME, "r+b") as file:
        file.truncate(6 << 30)
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import nola_vision as nv
        from tiny_models import tiny_vit
        model = nv.inject(tiny_vit(), nv.LoRAConfig(rank=2, targets=["attn.q", "attn.v"]))
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
        try:
            nv.load_adapter(model, {str(directory)!r})
        except nv.AdapterLoadError as error:
            print(error)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "is 6,442,450,944 bytes, too large to read into this process's memory" in done.stdout, done.stderr
