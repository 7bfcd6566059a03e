"""Ctrl-C during a merge, unmerge or task switch is held until the model is wholly in its new state: interrupted
after a layer's weight was written but before its merged flag was, the cell run again added ΔW twice, for good; a
switch interrupted between two layers' copies served (and saved) a mix of two tasks."""
import copy
import importlib.abc
import os
import signal
import sys
import threading
from importlib import import_module

import pytest
import torch
from tiny_models import as_if_trained, tiny_vit

import nola_vision as nv
from nola_vision.core.interrupts import interrupts_deferred
from nola_vision.core.layer import AdaptedLinear, adapted_layers

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def python_interrupts():
    """Python's own SIGINT handler (KeyboardInterrupt), whatever the test runner installed."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def trained(seed=0, bits=None):
    model = as_if_trained(nv.inject(tiny_vit(), nv.NOLAConfig(rank=2, num_basis_a=16, num_basis_b=16)), seed=seed)
    return model.to(torch.float16) if bits == 16 else model.eval()


def logits(model):
    with torch.no_grad():
        return model(IMAGES.to(next(model.parameters()).dtype))


def ctrl_c_after(monkeypatch, method, call=3):
    """Send this process SIGINT right after the ``call``-th call of ``AdaptedLinear.<method>`` returns: a Ctrl-C that
    lands once a layer's weight is written, before its flag or record is."""
    original, calls = getattr(AdaptedLinear, method), []

    def interrupted(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(AdaptedLinear, method, interrupted)


def ctrl_c_at_the_second_parameter_copy(monkeypatch):
    """Send this process SIGINT once a second parameter took its new value: a Ctrl-C between a switch's copies."""
    original, calls = torch.Tensor.copy_, []

    def interrupted(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if isinstance(self, torch.nn.Parameter):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(torch.Tensor, "copy_", interrupted)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_an_interrupted_merge_or_unmerge_finishes_first_so_running_it_again_changes_nothing(monkeypatch, dtype):
    model = trained(bits=16 if dtype == torch.float16 else None)
    plain, reference = logits(model), copy.deepcopy(model)
    merged = logits(nv.merge(reference))
    ctrl_c_after(monkeypatch, "_merge_update")
    with pytest.raises(KeyboardInterrupt):
        nv.merge(model)
    assert all(layer.merged for layer in adapted_layers(model).values())
    nv.merge(model)  # the cell again: nothing left to merge
    assert torch.equal(logits(model), merged)
    ctrl_c_after(monkeypatch, "_unmerge_update")
    with pytest.raises(KeyboardInterrupt):
        nv.unmerge(model)
    assert not any(layer.merged for layer in adapted_layers(model).values())
    nv.unmerge(model)
    torch.testing.assert_close(logits(model), plain, rtol=0, atol=1e-2 if dtype == torch.float16 else 1e-6)


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_an_interrupted_task_switch_serves_the_whole_new_task_never_a_mix(tmp_path, monkeypatch, merged):
    nv.save_adapter(trained(seed=1), tmp_path / "b", bits=32)
    expected = nv.load_adapter(trained(seed=0), tmp_path / "b")
    model = trained(seed=0)
    if merged:
        nv.merge(model)
        nv.merge(expected)
    if merged:
        ctrl_c_after(monkeypatch, "_add_low_rank", call=2)
    else:
        ctrl_c_at_the_second_parameter_copy(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        nv.load_adapter(model, tmp_path / "b")
    monkeypatch.undo()
    torch.testing.assert_close(logits(model), logits(expected), rtol=0, atol=1e-6)
    nv.load_adapter(model, tmp_path / "b")  # the cell again: the frozen weights are those it was trained on
    nv.save_adapter(model, tmp_path / "again", bits=32)
    assert (tmp_path / "again" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "b" / "adapter_model.safetensors").read_bytes()


def test_a_deferred_interrupt_reaches_the_handler_in_place_and_other_threads_are_left_alone():
    received = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    with interrupts_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        with interrupts_deferred():  # nested: held to the outer block's end
            os.kill(os.getpid(), signal.SIGINT)
        assert received == []
    assert received == [signal.SIGINT]  # once: a second Ctrl-C while held is the same request
    errors = []

    def elsewhere():
        try:
            with interrupts_deferred():  # signal.signal refuses other threads: the block just runs
                pass
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert errors == []


class _InterruptedImport(importlib.abc.MetaPathFinder):
    """Raises KeyboardInterrupt when ``name`` is imported: a Ctrl-C during the seconds the CLI spends importing."""

    def __init__(self, name):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name:
            raise KeyboardInterrupt
        return None


@pytest.mark.parametrize("args, module", [(["fit", "--help"], "nola_vision.train.cli"),
                                          (["tune", "--help"], "nola_vision.runs.tune"),
                                          (["protocol", "--help"], "nola_vision.runs.protocol")])
def test_a_ctrl_c_while_the_cli_imports_says_nothing_ran_instead_of_a_traceback(monkeypatch, capsys, args, module):
    from nola_vision.cli import main

    import_module(module)  # loaded, so that its removal below is undone afterwards
    monkeypatch.delitem(sys.modules, module)
    monkeypatch.setattr(sys, "meta_path", [_InterruptedImport(module), *sys.meta_path])
    assert main(args) == 130
    assert capsys.readouterr().err == "nola-vision: interrupted (Ctrl-C, SIGINT) while starting: nothing was run\n"
