"""Saves, locks, checkpoints and datasets where file permissions refuse: found by running as an ordinary user (every
other test runs as root in CI, which no permission binds). Each case runs in a child bound by permissions."""
import os
import stat

import pytest
from bound_by_permissions import OTHER_USER, ROOT, give_away, run_bound
from fake_fit import fake_python

from nola_vision.runs.protocol import run_protocol

SAVE = """
import warnings
import nola_vision as nv
from tiny_models import tiny_vit
model = nv.inject(tiny_vit(), nv.NOLAConfig(rank=2, num_basis_a=8, num_basis_b=8))
"""


def _saved(tmp_path):
    done = run_bound(SAVE + "nv.save_adapter(model, 'root/task')", tmp_path)
    assert done.returncode == 0, done.stderr
    return tmp_path / "root" / "task"


def _hidden_copies(folder):
    return sorted(name for name in os.listdir(folder) if ".staged-" in name or ".old-" in name)


def test_a_read_only_folder_of_the_users_in_an_adapter_folder_leaves_no_hidden_copy_behind(tmp_path):
    # only the replaced copy's top folder was made writable: its read-only sub-folder stopped the removal, ignored,
    # and every save left one more hidden copy of the whole adapter beside it
    task = _saved(tmp_path)
    (task / "notes").mkdir()
    (task / "notes" / "mine.txt").write_text("mine\n")
    (task / "notes").chmod(0o555)
    done = run_bound(SAVE + "for _ in range(3):\n    nv.save_adapter(model, 'root/task')\n", tmp_path)
    assert done.returncode == 0 and "could not be removed" not in done.stderr, done.stderr
    assert _hidden_copies(tmp_path / "root") == []
    assert (task / "notes" / "mine.txt").read_text() == "mine\n"
    assert stat.S_IMODE((task / "notes").stat().st_mode) == 0o555  # the user's folder keeps its mode


def test_a_hidden_copy_that_cannot_be_removed_is_named(tmp_path):
    task = _saved(tmp_path)
    (task / "theirs").mkdir()
    (task / "theirs" / "file.txt").write_text("theirs\n")
    give_away(task / "theirs")
    done = run_bound(SAVE + "nv.save_adapter(model, 'root/task')", tmp_path)
    assert done.returncode == 0, done.stderr
    left = _hidden_copies(tmp_path / "root")
    assert len(left) == 1 and f"{tmp_path / 'root' / left[0]}, a hidden copy that a save in" in done.stderr
    assert "could not be removed" in done.stderr and "Remove it by hand" in done.stderr


def test_a_save_below_a_read_only_folder_names_that_folder(tmp_path):
    # it was explained as a failing disk: "Check the disk and its file system"
    (tmp_path / "ro").mkdir(mode=0o555)
    done = run_bound(SAVE + "nv.save_adapter(model, 'ro/x/y/task')", tmp_path)
    assert done.returncode == 1 and "PermissionError" in done.stderr
    assert f"this process may not create files in {tmp_path / 'ro'} (Permission denied" in done.stderr
    assert "Check the disk" not in done.stderr and not (tmp_path / "ro" / "x").exists()


def test_a_save_into_another_users_folder_says_whose_it_is_rather_than_to_chmod_it(tmp_path):
    # "Make .../theirs writable": a chmod this user may not run
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    give_away(theirs, OTHER_USER - 1)
    done = run_bound(SAVE + "nv.save_adapter(model, 'theirs/task')", tmp_path)
    assert done.returncode == 1 and f"{theirs} belongs to another user (uid {OTHER_USER - 1}), who alone may " \
                                    "make it writable" in done.stderr, done.stderr
    assert "Make" not in done.stderr and os.listdir(theirs) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="root's own view of another user's folder")
def test_root_is_told_to_chmod_another_users_write_protected_adapter_not_that_it_cannot(tmp_path):
    # "belongs to another user (uid 1000), who alone may make it writable": root may, and the save then works
    from tiny_models import tiny_vit

    import nola_vision as nv
    from nola_vision.core.storage import _may_chmod_any

    if not _may_chmod_any():
        pytest.skip("this root has no CAP_FOWNER")
    model = nv.inject(tiny_vit(), nv.NOLAConfig(rank=2, num_basis_a=8, num_basis_b=8))
    task = tmp_path / "task"
    nv.save_adapter(model, task)
    give_away(task, OTHER_USER - 1)
    task.chmod(0o555)
    with pytest.raises(PermissionError, match=r"is write-protected, .*chmod u\+w") as error:
        nv.save_adapter(model, task)
    assert "belongs to another user" not in str(error.value)


def test_a_save_on_a_read_only_file_system_says_so_rather_than_to_chmod(tmp_path, monkeypatch):
    # "make it writable (e.g. chmod u+w ...)" for a folder whose mode was 0755 on a read-only mount
    from tiny_models import tiny_vit

    import nola_vision as nv
    from nola_vision.core import storage

    model = nv.inject(tiny_vit(), nv.NOLAConfig(rank=2, num_basis_a=8, num_basis_b=8))
    nv.save_adapter(model, tmp_path / "mount" / "task")
    before = {p.name: p.read_bytes() for p in (tmp_path / "mount" / "task").iterdir()}
    mounted = str(tmp_path / "mount")

    class ReadOnly:
        f_flag = os.ST_RDONLY

    real_statvfs, real_access = os.statvfs, os.access
    monkeypatch.setattr(storage.os, "statvfs", lambda p: ReadOnly() if str(p).startswith(mounted) else real_statvfs(p))
    monkeypatch.setattr(storage.os, "access", lambda p, mode, **kw: False if str(p).startswith(mounted) and
                        mode & os.W_OK else real_access(p, mode, **kw))
    for target, said in (("task", "cannot save over"), ("new", "cannot save to")):
        with pytest.raises(PermissionError, match=rf"{said} .*{target}: .*mount(/task)? is on a read-only file system "
                                                  r"\(mounted read-only\)") as error:
            nv.save_adapter(model, tmp_path / "mount" / target)
        assert "chmod" not in str(error.value) and "Make" not in str(error.value)
    assert {p.name: p.read_bytes() for p in (tmp_path / "mount" / "task").iterdir()} == before


def test_another_users_adapter_in_a_sticky_folder_is_named_as_theirs(tmp_path):
    sticky = tmp_path / "shared"
    sticky.mkdir()
    sticky.chmod(0o1777)
    task = sticky / "task"
    task.mkdir()
    (task / "theirs.txt").write_text("theirs\n")
    task.chmod(0o777)
    give_away(task, OTHER_USER - 1)
    os.chown(sticky, OTHER_USER, OTHER_USER)  # neither the folder's owner nor the adapter's may replace it
    done = run_bound(SAVE + "nv.save_adapter(model, 'shared/task')", tmp_path)
    assert done.returncode == 1 and f"{task} belongs to another user" in done.stderr
    assert "only its owner may replace it" in done.stderr and "Check the disk" not in done.stderr
    assert os.listdir(task) == ["theirs.txt"] and _hidden_copies(sticky) == []


def test_an_unreadable_checkpoint_is_named_as_such_not_as_a_damaged_one(tmp_path):
    # it was taken for a checkpoint cut short, and an older one beside it advised: a resume from an earlier epoch
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("epoch=0.ckpt", "last.ckpt"):
        (folder / name).write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip archive
    (folder / "last.ckpt").chmod(0o000)
    done = run_bound("""
        from nola_vision.train.cli import check_checkpoint_file
        check_checkpoint_file('checkpoints/last.ckpt')
    """, tmp_path)
    assert "--ckpt_path checkpoints/last.ckpt cannot be read (Permission denied): make it" in done.stderr
    assert "epoch=0" not in done.stderr and "cut short" not in done.stderr


@pytest.mark.parametrize("where", ["root", "lock"])
def test_a_run_folder_or_lock_this_user_may_not_make_or_open_is_named(tmp_path, where):
    (tmp_path / "ro").mkdir(mode=0o555 if where == "root" else 0o755)
    if where == "lock":
        lock = tmp_path / "ro" / "lightning_logs" / ".version.lock"
        lock.parent.mkdir()
        lock.touch(mode=0o600)
        give_away(lock)
    done = run_bound("""
        from lightning.pytorch import Trainer
        from lightning.pytorch.loggers import CSVLogger
        from nola_vision.train.cli import claim_log_dir
        claim_log_dir(Trainer(logger=CSVLogger('ro'), enable_progress_bar=False))
    """, tmp_path)
    if where == "root":
        assert ("cannot make the run's log folder ro/lightning_logs: this process may not create files in ro "
                "(Permission denied). Pass a writable --trainer.default_root_dir" in done.stderr), done.stderr
    else:
        assert ("cannot take the lock ro/lightning_logs/.version.lock: it is a file this process may not read "
                "(another user's?)" in done.stderr), done.stderr


def test_a_dataset_folder_this_user_may_not_list_is_named(tmp_path):
    (tmp_path / "data" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "data").chmod(0o000)
    try:
        done = run_bound("""
            from nola_vision.data.datasets import build_dataset
            build_dataset('imagefolder', 'data')
        """, tmp_path)
    finally:
        (tmp_path / "data").chmod(0o755)
    assert "cannot open the dataset folder data (Permission denied): make it readable" in done.stderr


def test_a_class_folder_this_user_may_list_but_not_search_is_named(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        (tmp_path / "data" / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / split / "cat" / "0.png")
    (tmp_path / "data" / "train" / "cat").chmod(0o644)
    try:
        done = run_bound("""
            from nola_vision.data.datasets import build_dataset
            build_dataset('imagefolder', 'data')
        """, tmp_path)
    finally:
        (tmp_path / "data" / "train" / "cat").chmod(0o755)
    assert "DatasetNotFoundError: cannot open data/train/cat/0.png (Permission denied): its folder can be listed but " \
           "not searched" in done.stderr, done.stderr


def test_a_dataset_folder_this_user_may_search_but_not_list_is_read(tmp_path):
    # a shared dataset of another user's, mode 0711: the readers open its folders by name
    from PIL import Image

    for split in ("train", "test"):
        (tmp_path / "data" / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / split / "cat" / "0.png")
    (tmp_path / "data").chmod(0o711)
    give_away(tmp_path / "data")
    done = run_bound("""
        from nola_vision.data.datasets import build_dataset
        print(len(build_dataset('imagefolder', 'data')))
    """, tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "1", done.stderr


def test_a_test_image_this_user_may_not_read_is_named_before_the_run(tmp_path):
    # it was found only by the test pass after training (kept, with the command to test it)
    from PIL import Image

    for split in ("train", "test"):
        for label in ("cat", "dog"):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "data" / split / label / "0.png")
    (tmp_path / "data" / "test" / "dog" / "0.png").chmod(0o000)
    done = run_bound("""
        from nola_vision.data.datasets import build_dataset
        print(build_dataset('imagefolder', 'data', split='test').unreadable_files())
    """, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[PosixPath('data/test/dog/0.png')]"


def test_a_protocol_row_with_another_users_finished_run_runs_the_rest_and_tables_them_all(tmp_path):
    # the check that run folders can be written probed split0-init0 itself, a finished run this command only reads
    out, tiny, python = tmp_path / "out", str(ROOT / "configs" / "tiny_offline.yaml"), fake_python(tmp_path)
    run_protocol([tiny], name="row", out=str(out), split_seeds=[0], init_seeds=[0], python=python, echo=False)
    give_away(out / "row" / "split0-init0")
    for shared in [out, *out.iterdir(), *(out / "row").iterdir()]:  # a group folder: all but that run writable
        if shared.name != "split0-init0":
            shared.chmod(0o777 if shared.is_dir() else 0o666)
    done = run_bound(f"""
        from nola_vision.runs.protocol import run_protocol
        run_protocol([{tiny!r}], name="row", out={str(out)!r}, split_seeds=[0, 1], init_seeds=[0], python={python!r})
        """, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "split 0 init 0: done already, skipped" in done.stdout and "split 1 init 0: test acc 50.00%" in done.stdout
    table = (out / "results.md").read_text()
    assert "| row | fake |" in table and "| 2 | 50.0 (0.0) |" in table
