"""Every warning names the user's line, however deep the library and the frameworks around it (nn.Module calls,
a Lightning Trainer) were called from there: one rule in ``core.warn`` instead of stack depths counted per call."""
import inspect
import os
import shutil
import warnings

import lightning as L
import pytest
import torch
from test_data_duplicate_images import _drawn_and_undrawn, _folder, _module
from tiny_models import tiny_vit

import nola_vision as nv
from nola_vision.core import warn
from nola_vision.core.warn import warn_user


def _line_after(frame) -> int:
    """The line below ``frame``'s current one: the statement a test expects a warning to name."""
    return frame.f_lineno + 1


def _only(record, text):
    found = [w for w in record if text in str(w.message)]
    assert len(found) == 1, [str(w.message) for w in record]
    return found[0]


def test_a_warning_from_a_forward_pass_names_the_line_that_called_the_model():
    model = nv.inject(tiny_vit(), nv.NOLAConfig(rank=2, num_basis_a=4, num_basis_b=4, targets=["mlp.fc1", "mlp.fc2"]))
    model.blocks[0].mlp.act.register_forward_hook(lambda *args: None)
    with pytest.warns(UserWarning, match="a hook on mlp.act") as record:
        line = _line_after(inspect.currentframe())
        model(torch.randn(1, 3, 32, 32))
    warning = _only(record, "a hook on mlp.act")
    assert (warning.filename, warning.lineno) == (__file__, line)  # not torch's Module.__call__, nor the library's


class _Probe(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(3, 2)

    def training_step(self, batch, _):
        return torch.nn.functional.cross_entropy(self.head(batch[0].mean(dim=(2, 3))), batch[1])

    def validation_step(self, batch, _):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_warning_from_a_data_module_run_by_a_trainer_names_the_fit_line(tmp_path):
    _folder(tmp_path)
    drawn, _ = _drawn_and_undrawn(tmp_path, "dog")
    shutil.copyfile(tmp_path / drawn, tmp_path / "test" / "cat" / "leak.png")
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    with pytest.warns(UserWarning, match="byte-identical") as record:
        line = _line_after(inspect.currentframe())
        trainer.fit(_Probe(), datamodule=_module(tmp_path))
    warning = _only(record, "byte-identical")
    assert (warning.filename, warning.lineno) == (__file__, line)  # not Lightning's setup hook, nor the library's


def test_a_warning_raised_by_this_file_itself_names_its_line():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        line = _line_after(inspect.currentframe())
        warn_user("from a test", RuntimeWarning)
    assert (record[0].filename, record[0].lineno, record[0].category) == (__file__, line, RuntimeWarning)


def test_frames_of_context_managers_and_imports_between_the_library_and_the_user_are_skipped(tmp_path,
                                                                                                      monkeypatch):
    # A library module imported by library code warns at import: between the two lie importlib's frames, which
    # warnings.warn does not count in a stacklevel (the frozen bootstrap) or which are plumbing (import_module), and a
    # context manager's exit, as in atomic_directory's cleanup.
    library = tmp_path / "fake_library"
    library.mkdir()
    (library / "lazy.py").write_text("from nola_vision.core.warn import warn_user\nwarn_user('at import')\n")
    (library / "entry.py").write_text(
        "import contextlib, importlib\n"
        "@contextlib.contextmanager\n"
        "def cleanup():\n"
        "    try:\n"
        "        yield\n"
        "    finally:\n"
        "        importlib.import_module('lazy')\n"
        "def run():\n"
        "    with cleanup():\n"
        "        pass\n")
    monkeypatch.syspath_prepend(str(library))
    internal = warn._internal_folders()
    monkeypatch.setattr(warn, "_internal_folders", lambda: (os.path.join(str(library), ""), *internal))
    import entry

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        line = _line_after(inspect.currentframe())
        entry.run()
    assert [(w.filename, w.lineno) for w in record if str(w.message) == "at import"] == [(__file__, line)]
