"""Adapter files another tool (or the user) wrote under the names save_adapter and export_peft write are refused, never
replaced; and a re-fit keeps a user's own ``<adapter_dir>.previous`` folder, keeping the earlier adapter beside it."""
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import safetensors.torch
from tiny_models import as_if_trained, tiny_vit

import nola_vision as nv
from nola_vision.adapters.files import existing_adapter_kind
from nola_vision.train.module import _keep_previous_adapter

CONFIG = nv.NOLAConfig(rank=2, num_basis_a=6, num_basis_b=4, targets=["mlp.fc1", "mlp.fc2"])


def _model():
    return as_if_trained(nv.inject(tiny_vit(), CONFIG))


@pytest.mark.parametrize("files", [
    {"adapter_config.json": json.dumps({"config": {"architecture": "lora"}, "model_name": "bert"})},  # AdapterHub
    {"adapter_config.json": "my notes, not JSON"},
    {"adapter_model.safetensors": "my weights"},  # weights without any config
])
@pytest.mark.parametrize("write", ["save_adapter", "export_peft"])
def test_adapter_files_another_tool_wrote_are_refused_not_replaced(tmp_path, files, write):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=f"neither nv.save_adapter nor nv.export_peft wrote.*{write} would replace"):
        getattr(nv, write)(_model(), tmp_path)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == files


@pytest.mark.parametrize("write", ["save_adapter", "export_peft"])
def test_a_config_this_process_cannot_read_is_named_as_such_not_as_another_tools(tmp_path, monkeypatch, write):
    # Re-saving over one's own adapter with an unreadable config said it was "another library's adapter".
    nv.save_adapter(_model(), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    config, opened = tmp_path / "adapter_config.json", Path.open

    def refuse_config(path, *args, **kwargs):  # as chmod 000 does to a user other than root
        if path == config:
            raise PermissionError(13, "Permission denied", str(path))
        return opened(path, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse_config)
    with pytest.raises(ValueError, match=rf"holds adapter_config.json, which this process cannot read \(Permission "
                                         rf"denied\), so {write} cannot tell .*make it readable \(chmod u\+r\)"):
        getattr(nv, write)(_model(), tmp_path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors"])
@pytest.mark.parametrize("write", ["save_adapter", "export_peft"])
def test_a_folder_named_like_an_adapter_file_is_refused_not_deleted(tmp_path, name, write):
    # A folder was no file to the check: the save replaced the directory and deleted the folder with it.
    (tmp_path / name).mkdir()
    (tmp_path / name / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=f"neither nv.save_adapter nor nv.export_peft wrote.*{write} would replace"):
        getattr(nv, write)(_model(), tmp_path)
    assert (tmp_path / name / "notes.txt").read_text() == "mine"


def test_a_peft_adapter_no_export_wrote_is_refused_not_replaced(tmp_path):
    # A peft adapter trained elsewhere has a peft config too: only the mark export_peft puts in its weights' metadata
    # tells an export of ours (replaced by a new export) from it.
    nv.export_peft(_model(), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    weights = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    safetensors.torch.save_file(weights, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for write in ("export_peft", "save_adapter"):
        with pytest.raises(ValueError, match=f"a peft adapter trained elsewhere.*{write} would replace"):
            getattr(nv, write)(_model(), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before and config["peft_type"] == "LORA"


def test_each_writer_still_replaces_its_own_earlier_files(tmp_path):
    for write, folder, kind in (("save_adapter", tmp_path / "nola", "nola_vision"),
                                ("export_peft", tmp_path / "peft", "peft")):
        getattr(nv, write)(_model(), folder)
        first = (folder / "adapter_model.safetensors").stat().st_ino
        getattr(nv, write)(_model(), folder)
        assert (folder / "adapter_model.safetensors").stat().st_ino != first  # a new file replaced it
        assert existing_adapter_kind(folder) == kind


def test_a_user_folder_named_previous_is_kept_and_the_earlier_adapter_goes_beside_it(tmp_path):
    target = nv.save_adapter(_model(), tmp_path / "task")
    mine = tmp_path / "task.previous"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.warns(UserWarning, match=r"kept as .*task\.previous\.1$"):  # nothing older: nothing deleted
        _keep_previous_adapter(Path(target))
    assert (mine / "notes.txt").read_text() == "mine" and not (mine / "adapter_model.safetensors").exists()
    assert nv.verify_adapter(tiny_vit(), tmp_path / "task.previous.1", check_frozen_weights=False)
    # an earlier kept adapter is replaced, and the warning says it is deleted
    with pytest.warns(UserWarning, match=r"kept as .*task\.previous\.1, and the older adapter .*task\.previous\.1 "
                                         r"held is deleted"):
        _keep_previous_adapter(Path(target))


@pytest.mark.parametrize("write", ["save_adapter", "export_peft"])
def test_an_adapter_config_that_cannot_be_read_is_refused_not_replaced(tmp_path, monkeypatch, write):
    # Unreadable (no read permission for this user, an I/O error), it was taken for no file at all and replaced.
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    read_bytes = Path.read_bytes

    def unreadable(path):
        if path.name == "adapter_config.json":
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", unreadable)
    assert existing_adapter_kind(tmp_path) == "other"
    with pytest.raises(ValueError, match=f"{write} would replace"):
        getattr(nv, write)(_model(), tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "adapter_config.json").read_text() == '{"peft_type": "LORA"}'


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="names that are not UTF-8 are a POSIX-bytes matter")
def test_an_export_into_a_folder_whose_name_is_not_utf8_replaces_itself(tmp_path):
    # safetensors' safe_open refuses such a path, so the mark was not read and the second export refused the first.
    folder = os.path.join(os.fsdecode(bytes(tmp_path)), os.fsdecode(b"export_\xe9"))
    nv.export_peft(_model(), folder)
    nv.export_peft(_model(), folder)
    assert existing_adapter_kind(folder) == "peft"


def test_keeping_the_earlier_adapter_leaves_no_staging_folder_even_after_a_killed_copy(tmp_path, monkeypatch):
    # It staged into a .task.previous-XXXX folder of its own, which a kill left behind for good (a full adapter copy).
    target = nv.save_adapter(_model(), tmp_path / "task")
    killed = tmp_path / ".task.previous.staged-0123456789ab"  # what a copy killed before its swap leaves
    killed.mkdir()
    (killed / "adapter_model.safetensors").write_bytes(b"half")
    with pytest.warns(UserWarning, match="kept as"):
        _keep_previous_adapter(Path(target))
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["task", "task.previous"]
    monkeypatch.setattr(shutil, "copytree", lambda *args, **kwargs: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        _keep_previous_adapter(Path(target))
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["task", "task.previous"]
    assert nv.verify_adapter(tiny_vit(), tmp_path / "task.previous", check_frozen_weights=False)


def test_the_kept_earlier_adapter_is_an_exact_copy_without_files_of_older_ones(tmp_path):
    # Kept through a save that keeps the other files of the folder it replaces: .previous mixed the new earlier
    # adapter with an older one's extra files (and the warning said the older one was deleted).
    target = nv.save_adapter(_model(), tmp_path / "task")
    (target / "notes_v1.txt").write_text("v1")
    with pytest.warns(UserWarning, match="kept as"):
        _keep_previous_adapter(Path(target))
    (target / "notes_v1.txt").unlink()
    nv.save_adapter(_model(), target)
    with pytest.warns(UserWarning, match="is deleted"):
        _keep_previous_adapter(Path(target))
    assert sorted(os.listdir(tmp_path / "task.previous")) == sorted(os.listdir(target))
