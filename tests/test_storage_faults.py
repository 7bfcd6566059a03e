"""Storage faults beyond the protocol of test_storage.py: single files written out of room and flushed before their
rename, a writers' lock path that is no file, and save_adapter and export_peft overtaking each other."""
import errno
import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch
from ctrl_c_at_lines import body_lines, interrupted_at
from storage_workers import trained
from tiny_models import tiny_vit

import nola_vision as nv
from nola_vision.adapters import files, peft
from nola_vision.adapters.files import require_adapter_directory
from nola_vision.core import storage

posix_only = pytest.mark.skipif(os.name != "posix", reason="file size limits, flock and symlinks")


def files_of(directory):
    return {p.name: p.read_bytes() for p in Path(directory).iterdir()}


def test_a_file_size_limit_names_the_file_the_cause_and_the_fix_and_keeps_the_old_content(tmp_path):
    resource = pytest.importorskip("resource")
    target = storage.write_text_atomic(tmp_path / "result.json", "old")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))  # Python ignores SIGXFSZ: the write fails with EFBIG
    try:
        with pytest.raises(OSError, match=rf"cannot save to {re.escape(str(target))}: a file would exceed the file "
                                          r"size limit \(ulimit -f\).*was not changed.*Raise the limit") as error:
            storage.write_bytes_atomic(target, b"x" * 4096)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert error.value.errno == errno.EFBIG and error.value.__cause__.errno == errno.EFBIG
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["result.json"]


def test_a_full_disk_found_when_the_file_is_flushed_names_the_file_and_keeps_the_old_content(tmp_path, monkeypatch):
    target = storage.write_text_atomic(tmp_path / "results.csv", "old")

    def full(fd):  # delayed allocation: a full disk may show only when the data is flushed
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=rf"cannot save to {re.escape(str(target))}: no space is left on its "
                                      "filesystem.*was not changed: its previous content, if any, is intact") as error:
        storage.write_text_atomic(target, "new")
    monkeypatch.undo()
    assert error.value.errno == errno.ENOSPC
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["results.csv"]


@pytest.mark.parametrize("step", ["_locked_temporary", "_make_staging_directory", "writer_lock"])
def test_a_disk_out_of_inodes_at_the_first_new_entry_names_the_target_and_that_nothing_changed(tmp_path, monkeypatch,
                                                                                               step):
    # The lock file, the temporary file and the staging folder are the first new entries: out of inodes, their
    # bare ENOSPC named a hidden sibling (.a1.staged-…) and said nothing of the old content.
    target = tmp_path / ("result.json" if step == "_locked_temporary" else "adapter")
    nv.save_adapter(trained(1), target) if target.name == "adapter" else storage.write_text_atomic(target, "old")
    before = files_of(target) if target.is_dir() else target.read_text()

    def no_inode(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / f".{target.name}.staged-0"))

    monkeypatch.setattr(storage, step, no_inode)
    with pytest.raises(OSError, match=rf"cannot save to {re.escape(str(target))}: no space is left on its filesystem.*"
                                      r"(was not changed|Nothing in .* was changed)") as error:
        nv.save_adapter(trained(2), target) if target.name == "adapter" else storage.write_text_atomic(target, "new")
    monkeypatch.undo()
    assert error.value.errno == errno.ENOSPC
    assert (files_of(target) if target.is_dir() else target.read_text()) == before


def test_a_file_is_flushed_before_it_replaces_the_old_one_and_its_folder_after(tmp_path, monkeypatch):
    target = storage.write_json_atomic(tmp_path / "result.json", {"acc": 0.9})
    calls, fsync, replace = [], os.fsync, os.replace

    def recording_fsync(fd):
        calls.append(("fsync", os.fstat(fd).st_ino))
        fsync(fd)

    def recording_replace(source, destination, **kwargs):
        calls.append(("replace", os.stat(source).st_ino))
        replace(source, destination, **kwargs)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    storage.write_json_atomic(target, {"acc": 0.8})
    monkeypatch.undo()
    new = target.stat().st_ino
    expected = [("fsync", new), ("replace", new)] + ([("fsync", tmp_path.stat().st_ino)] if os.name == "posix" else [])
    assert calls == expected and json.loads(target.read_text()) == {"acc": 0.8}


@posix_only
@pytest.mark.parametrize("kind", ["directory", "dangling symlink"])
def test_a_lock_path_that_is_no_file_is_refused_before_training_naming_it_and_the_fix(tmp_path, kind):
    target, lock = tmp_path / "adapter", tmp_path / ".adapter.lock"
    if kind == "directory":
        lock.mkdir()
    else:
        lock.symlink_to(tmp_path / "missing" / "lock")
    refused = rf"{re.escape(str(lock))}, the lock file that writers of it take turns on, is .*Move it away or remove it"
    with pytest.raises(ValueError, match=refused):
        require_adapter_directory(target)  # what fit checks before it trains
    with pytest.raises(ValueError, match=refused):
        nv.save_adapter(trained(1), target)
    with pytest.raises(ValueError, match=refused), storage.writer_lock(target):
        pass
    assert os.listdir(tmp_path) == [".adapter.lock"]


def overtaken(monkeypatch, module, other_save):
    """Make ``module``'s saves meet a directory that ``other_save`` filled after their own checks ran, just before
    they took the writer lock (as when two processes save at once)."""
    atomic_directory = module.atomic_directory

    def other_save_first(path, **kwargs):
        other_save()
        return atomic_directory(path, **kwargs)

    monkeypatch.setattr(module, "atomic_directory", other_save_first)


@pytest.mark.parametrize("first, second, module, refusal", [
    ("export_peft", "save_adapter", files, "holds a peft LoRA export"),
    ("save_adapter", "export_peft", peft, "holds a nola_vision adapter.*Export into another directory"),
], ids=["save_adapter overtaken", "export_peft overtaken"])
def test_a_save_overtaken_by_the_other_kind_of_export_is_refused_and_that_export_kept(tmp_path, monkeypatch, first,
                                                                                      second, module, refusal):
    target, model = tmp_path / "adapter", trained(1)
    overtaken(monkeypatch, module, lambda: getattr(nv, first)(model, target))
    with pytest.raises(ValueError, match=refusal):
        getattr(nv, second)(model, target)
    monkeypatch.undo()
    kept = files_of(target)
    getattr(nv, first)(model, tmp_path / "alone")
    assert kept == files_of(tmp_path / "alone")  # the first export, whole


@posix_only
def test_a_file_system_without_directory_sync_keeps_the_write_standing(tmp_path, monkeypatch):
    # vboxsf, some FUSE, 9p and CIFS mounts refuse fsync of a directory: the renamed file is written all the same
    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    target = storage.write_text_atomic(tmp_path / "result.json", "new")
    assert target.read_text() == "new"
    nv.save_adapter(trained(0), tmp_path / "adapter")  # the directory swap too
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):  # a real disk error still surfaces
        storage.write_text_atomic(tmp_path / "other.json", "x")


def test_a_writable_file_check_works_where_the_system_gives_no_name_limit(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "pathconf", raising=False)  # Windows has none: 255 is assumed
    storage.check_writable_file(tmp_path / ("a" * 200), "--result_file")
    with pytest.raises(ValueError, match=r"the name a{20}\.\.\. is 300 (bytes|characters) long, over the 255"):
        storage.check_writable_file(tmp_path / "new" / ("a" * 300), "--result_file")


@posix_only
def test_a_lock_file_this_process_may_not_read_is_refused_before_training(tmp_path, monkeypatch):
    lock = tmp_path / ".adapter.lock"
    lock.write_text("")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == lock else real_access(p, mode, **kw))
    with pytest.raises(ValueError, match=r"\.adapter\.lock, the lock file .* is a file this process may not read"):
        require_adapter_directory(tmp_path / "adapter")


def test_a_result_path_ending_in_a_separator_is_refused_before_the_run(tmp_path):
    # realpath drops the separator, so only the write at the end of the run used to refuse it
    with pytest.raises(ValueError, match=r"--result_file: .*out/ ends in a path separator"):
        storage.check_writable_file(f"{tmp_path}/out/", "--result_file")
    with pytest.raises(IsADirectoryError, match="ends in a path separator"):
        storage.write_text_atomic(f"{tmp_path}/out/", "{}")  # what the run's end would have met


def test_a_result_file_whose_folder_refuses_new_files_despite_its_permissions_is_refused_before_the_run(
        tmp_path, monkeypatch):
    # os.access says yes to root on /proc, a read-only mount or NFS's root squash: the test pass ran, then the result
    # was lost with a bare error naming a hidden temporary file
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(storage.tempfile, "mkstemp", read_only)
    monkeypatch.setattr(storage.tempfile, "mkdtemp", read_only)
    with pytest.raises(ValueError, match=rf"--result_file: files cannot be created in {tmp_path} \(Read-only file "
                                         r"system\): choose another path"):
        storage.check_writable_file(tmp_path / "result.json", "--result_file")
    with pytest.raises(ValueError, match=rf"--result_file: folders cannot be created in {tmp_path} "):
        storage.check_writable_file(tmp_path / "more" / "result.json", "--result_file")  # the folders come first
    monkeypatch.undo()
    storage.check_writable_file(tmp_path / "more" / "result.json", "--result_file")
    assert not list(tmp_path.iterdir())  # the check leaves nothing behind

    def append_only(path):  # chattr +a: entries are made, never removed (nor is a temporary renamed over a file)
        raise PermissionError(errno.EPERM, "Operation not permitted", str(path))

    monkeypatch.setattr(storage.os, "unlink", append_only)
    try:
        with pytest.raises(ValueError, match=rf"--result_file: entries made in {tmp_path} cannot be removed or "
                                             r"replaced \(Operation not permitted; .*nv-check-"):
            storage.check_writable_file(tmp_path / "result.json", "--result_file")
    finally:
        monkeypatch.undo()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="/proc takes no new files (Linux)")
def test_a_result_file_in_proc_is_refused_before_the_run():
    # root passes os.access and is refused by the file system; any other user by os.access
    with pytest.raises(ValueError, match=r"--result_file: (files cannot be created in|this process may not create "
                                         r"files in) /proc"):
        storage.check_writable_file("/proc/nope.json", "--result_file")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="/proc takes no new files (Linux)")
@posix_only
def test_a_target_whose_folder_takes_no_files_is_named_not_its_lock_file(tmp_path):
    """save_adapter(model, "/proc/x") said "No such file or directory: '/proc/.x.lock'", a file nobody named."""
    with pytest.raises(OSError, match=r"cannot write /proc/adapter_x: no file can be made in its folder /proc"):
        with storage.writer_lock(Path("/proc/adapter_x")):
            pass


def deep_folder(root, length):
    """A folder under ``root`` whose path is ``length`` bytes long, made of names of 1 to 201 bytes."""
    folder = Path(root)
    while len(os.fsencode(folder)) < length - 202:
        folder /= "d" * 200
    folder /= "e" * (length - len(os.fsencode(folder)) - 1)
    folder.mkdir(parents=True)
    return folder


@pytest.mark.skipif(not hasattr(os, "pathconf"), reason="a system that says its path limit")
@pytest.mark.parametrize("write", ["save_adapter", "export_peft"])
def test_a_target_whose_staged_files_would_pass_the_path_limit_is_refused_before_anything_is_written(tmp_path, write):
    """Each name under the file system's limit, the path near the system's: the staged copy's files, 47 bytes longer,
    failed midway with a bare 'File name too long' naming a hidden staging path."""
    limit = os.pathconf(tmp_path, "PC_PATH_MAX") - 1
    folder = deep_folder(tmp_path, limit - 250)
    model, save = trained(1), getattr(nv, write)
    for over in (1, 12):
        target = folder / ("a" * (limit - len(os.fsencode(folder)) - 48 + over))
        with pytest.raises(ValueError, match=rf"cannot save to .*: its path is {over} bytes? too long: .*\.staged-"
                                             rf"<random>/adapter_\w+\.\w+ beside it, a path of {limit + over} bytes, "
                                             rf"over the {limit} this system takes. Choose a path at least {over} "
                                             r"bytes? shorter .*\(nothing was written\)"):
            save(model, target)
        assert os.listdir(folder) == []
    save(model, folder / ("a" * (limit - len(os.fsencode(folder)) - 48)))  # at the limit: saved


@pytest.mark.skipif(not hasattr(os, "pathconf"), reason="a system that says its path limit")
def test_a_kept_folder_too_deep_for_the_staged_copy_is_named_with_the_fix_and_the_old_adapter_stays(tmp_path):
    """The user's folder kept in an adapter directory is re-created in the staged copy, 21 bytes deeper: a folder near
    the path limit failed with a bare 'File name too long' naming the hidden staging path."""
    limit = os.pathconf(tmp_path, "PC_PATH_MAX") - 1
    target = nv.save_adapter(trained(1), tmp_path / "adapter")
    before = files_of(target)
    deep = deep_folder(target, limit - 10)
    (deep / "notes").write_text("kept")
    with pytest.raises(OSError, match=rf"cannot save to {re.escape(str(target))}: a save keeps every other entry .* "
                                      rf"{re.escape(str(target))}/d+/.* is too long for that on this system\. Move it "
                                      r"out .*a previous adapter there, if any, is intact") as error:
        nv.save_adapter(trained(2), target)
    assert error.value.errno == errno.ENAMETOOLONG and ".staged-" not in str(error.value)
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()} == before
    assert (deep / "notes").read_text() == "kept" and sorted(os.listdir(tmp_path)) == [".adapter.lock", "adapter"]


@pytest.mark.skipif(not hasattr(os, "pathconf"), reason="a system that says its path limit")
@posix_only
def test_a_lock_file_whose_path_is_too_long_is_named_as_such_not_as_a_permission_problem(tmp_path):
    limit = os.pathconf(tmp_path, "PC_PATH_MAX") - 1
    folder = deep_folder(tmp_path, limit - 230)  # a target name of 227 bytes: its siblings' names hold it whole
    target = folder / ("a" * (limit - len(os.fsencode(folder)) - 3))  # its lock file, 6 bytes longer, is not
    with pytest.raises(OSError, match=r"lock file beside it, \.a+\.lock, is \d+ bytes long, too long for this system "
                                      r"\(File name too long\): choose a shorter path") as error:
        with storage.writer_lock(target):
            pass
    assert error.value.errno == errno.ENAMETOOLONG and "this user can write" not in str(error.value)


def test_an_adapter_saved_into_a_folder_named_fit_inside_a_running_fits_folder_does_not_wait_on_its_lock(tmp_path,
                                                                                                       monkeypatch):
    """A fit's lock was ".fit.lock", the writer lock of a folder named fit beside it: a fit exporting into
    <run folder>/fit waited on its own lock forever (and into <run folder>/fit/... for the ancestor wait)."""
    import threading

    from nola_vision.train.cli import FIT_LOCK

    monkeypatch.setattr(storage, "_ANCESTOR_WAIT_S", 1.0)
    fd = storage.try_lock(tmp_path / FIT_LOCK)  # the running fit's
    try:
        model = trained(0)
        nv.save_adapter(model, tmp_path / "fit" / "adapter")
        saving = threading.Thread(target=nv.save_adapter, args=(model, tmp_path / "fit"), daemon=True)
        saving.start()
        saving.join(20)
        assert not saving.is_alive()
        assert nv.verify_adapter(trained(0), tmp_path / "fit") is not None
    finally:
        os.close(fd)


def test_a_file_system_without_locks_saves_unlocked_as_the_fit_lock_does(tmp_path, monkeypatch):
    def no_locks(fd, operation):  # NFS without a lock daemon
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(storage.fcntl, "flock", no_locks)
    nv.save_adapter(trained(0), tmp_path / "adapter")
    nv.verify_adapter(trained(0), tmp_path / "adapter")
    # a single file too (a result, a manifest, a graph): it failed with "No locks available", leaving its temporary
    # file and its open descriptor behind
    storage.write_json_atomic(tmp_path / "result.json", {"acc": 1.0})
    assert json.loads((tmp_path / "result.json").read_text()) == {"acc": 1.0}
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_a_lock_that_fails_otherwise_leaves_neither_a_temporary_file_nor_an_open_descriptor(tmp_path, monkeypatch):
    def failing(fd, operation):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    open_before = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(storage.fcntl, "flock", failing)
    with pytest.raises(OSError, match="Input/output error"):
        storage.write_json_atomic(tmp_path / "result.json", {"acc": 1.0})
    assert os.listdir(tmp_path) == [] and len(os.listdir("/proc/self/fd")) == open_before


def test_a_copy_into_the_directory_it_copies_is_refused(tmp_path):
    nv.save_adapter(trained(0), tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"lies inside it: the copy would hold itself"):
        storage.copy_directory(tmp_path / "adapter", tmp_path / "adapter" / "backup")
    assert sorted(os.listdir(tmp_path / "adapter")) == sorted(["adapter_config.json", "adapter_model.safetensors"])


@pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM, errno.EROFS])
def test_a_file_write_into_a_folder_it_may_not_create_files_in_names_the_folder_not_the_hidden_temporary(
        tmp_path, monkeypatch, code):
    """export_onnx and the split manifests into an immutable folder (or a read-only mount) failed with a bare
    'Operation not permitted: .../.x.onnx.nv-izn9jave.tmp', a file nobody named, and no fix."""
    target = storage.write_bytes_atomic(tmp_path / "graph.onnx", b"old")

    def refused(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / ".graph.onnx.nv-abcdefgh.tmp"))

    monkeypatch.setattr(storage.tempfile, "mkstemp", refused)
    message = (rf"cannot save to {re.escape(str(target))}: this process may not create files in "
               rf"{re.escape(str(tmp_path))} .*make that folder writable.*was not changed")
    with pytest.raises(OSError, match=message) as error:
        storage.write_bytes_atomic(target, b"new")
    assert error.value.errno == code and ".nv-" not in str(error.value) and target.read_bytes() == b"old"


def test_a_missing_folder_that_cannot_be_made_names_the_folder_that_refused_it(tmp_path, monkeypatch):
    # the message named the target's own folder, which did not exist, not the one that refused the new folder
    def refused(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "new"))

    monkeypatch.setattr(Path, "mkdir", refused)
    with pytest.raises(PermissionError, match=rf"may not create files in {re.escape(str(tmp_path))} \(Permission"):
        storage.write_bytes_atomic(tmp_path / "new" / "sub" / "graph.onnx", b"graph")


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_a_file_or_link_put_at_the_adapter_path_while_it_saves_is_left_there_and_the_save_refused(tmp_path,
                                                                                                  monkeypatch, kind):
    # the exchange swapped it out to a hidden .task.staged-* name, left there for good (a file) or, for a link, made
    # the folder it points to mode 0700; the save returned as if nothing happened
    target, shared = tmp_path / "task", tmp_path / "shared"
    nv.save_adapter(trained(0), target)
    shared.mkdir(mode=0o755)
    swap_in = storage._swap_in

    def another_process_first(staged, at):
        monkeypatch.setattr(storage, "_swap_in", swap_in)
        for entry in at.iterdir():
            entry.unlink()
        at.rmdir()
        if kind == "file":
            at.write_text("notes\n")
        else:
            at.symlink_to(shared)
        return swap_in(staged, at)

    monkeypatch.setattr(storage, "_swap_in", another_process_first)
    with pytest.raises(ValueError, match=rf"task became a {'file' if kind == 'file' else 'symbolic link'} while the "
                                         "save ran .*nothing was saved: it was left in place"):
        nv.save_adapter(trained(1), target)
    assert (target.read_text() == "notes\n") if kind == "file" else (target.readlink() == shared)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755 and not any(shared.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == [".task.lock", "shared", "task"]


def _failing_directory_fsync(armed):
    real_fsync = os.fsync

    def fsync(fd):
        if armed[0] and stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)
    return fsync


@posix_only
def test_a_disk_error_before_the_swap_names_the_target_and_that_nothing_changed(tmp_path, monkeypatch):
    # a bare "[Errno 5] Input/output error", naming no path
    nv.save_adapter(trained(1), tmp_path / "adapter")
    json_target = storage.write_text_atomic(tmp_path / "result.json", "old")
    before = files_of(tmp_path / "adapter")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, os.strerror(errno.EIO))))
    adapter = tmp_path / "adapter"
    for save, target, unchanged in (
            (lambda: nv.save_adapter(trained(2), adapter), adapter, "Nothing in .* was changed"),
            (lambda: storage.write_text_atomic(json_target, "new"), json_target, "was not changed")):
        with pytest.raises(OSError, match=rf"cannot save to {re.escape(str(target))}: Input/output error .*"
                                          rf"{unchanged}.*Check the disk") as error:
            save()
        assert error.value.errno == errno.EIO
    monkeypatch.undo()
    assert files_of(tmp_path / "adapter") == before and json_target.read_text() == "old"


@posix_only
def test_a_disk_error_flushing_the_folder_after_the_swap_warns_that_the_save_took_place(tmp_path, monkeypatch):
    # it raised a bare EIO after the new adapter had replaced the old one: the caller believed the old one kept
    nv.save_adapter(trained(1), tmp_path / "adapter")
    armed = [False]
    real_swap = storage._swap_in

    def swap(staged, target):
        old_set = real_swap(staged, target)
        armed[0] = True
        return old_set

    monkeypatch.setattr(os, "fsync", _failing_directory_fsync(armed))
    monkeypatch.setattr(storage, "_swap_in", swap)
    with pytest.warns(RuntimeWarning, match=r"adapter was saved \(the new content is in place\), but flushing its "
                                            r"folder to disk failed \(Input/output error\)"):
        nv.save_adapter(trained(2), tmp_path / "adapter")
    monkeypatch.undo()
    nv.save_adapter(trained(2), tmp_path / "reference")  # the new adapter is the one in place
    loaded, expected = nv.load_adapter(tiny_vit(), tmp_path / "adapter"), nv.load_adapter(tiny_vit(),
                                                                                          tmp_path / "reference")
    assert all(torch.equal(loaded.get_parameter(name), parameter)
               for name, parameter in expected.named_parameters() if parameter.requires_grad)


def _holds_adapter(directory, seed):
    """Whether ``directory`` loads as the adapter ``trained(seed)`` saves (at 16 bits: within their rounding)."""
    model, expected = nv.load_adapter(tiny_vit(), directory), trained(seed)
    return all(torch.allclose(model.get_parameter(name), parameter, rtol=0, atol=1e-3)
               for name, parameter in expected.named_parameters() if parameter.requires_grad)


@posix_only
def test_a_failure_moving_the_old_set_aside_after_a_two_rename_swap_warns_of_nothing_and_removes_it(tmp_path,
                                                                                                   monkeypatch):
    """Where no atomic exchange exists, the third rename (the old set, from its .old- name to the staged one) failing
    raised "Nothing in ... was changed: a previous adapter there is intact" with the new adapter in place."""
    target = tmp_path / "task"
    nv.save_adapter(trained(1), target)
    (target / "notes.txt").write_text("mine")
    real_rename = os.rename

    def rename(source, destination, *args, **kwargs):
        if ".task.old-" in os.fspath(source):
            raise OSError(errno.EIO, os.strerror(errno.EIO), os.fspath(source))
        return real_rename(source, destination, *args, **kwargs)

    monkeypatch.setattr(storage, "_native_exchange", lambda: None)
    monkeypatch.setattr(os, "rename", rename)
    nv.save_adapter(trained(2), target)
    monkeypatch.undo()
    assert _holds_adapter(target, 2) and (target / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".task.lock", "task"]  # the old set removed


@posix_only
def test_a_disk_error_reading_the_old_set_after_the_swap_warns_that_the_save_took_place_and_keeps_it(tmp_path,
                                                                                                   monkeypatch):
    """A bare EIO from listing the old set (for entries made in it meanwhile) escaped with the new adapter in place:
    the caller took the save for failed."""
    target = tmp_path / "task"
    nv.save_adapter(trained(1), target)
    real_listdir, real_swap, swapped = os.listdir, storage._swap_in, []

    def swap(staged, at):
        swapped.append(real_swap(staged, at))
        return swapped[-1]

    def listdir(path="."):
        if swapped and Path(os.fspath(path)) == swapped[-1]:
            raise OSError(errno.EIO, os.strerror(errno.EIO), os.fspath(path))
        return real_listdir(path)

    monkeypatch.setattr(storage, "_swap_in", swap)
    monkeypatch.setattr(os, "listdir", listdir)
    with pytest.warns(RuntimeWarning, match=r"task was saved, but what another writer made in it meanwhile could not "
                                            r"all be moved into the new set \(its list of entries \(Input/output "
                                            r"error\)\): the old set is kept as .*task\.late-"):
        nv.save_adapter(trained(2), target)
    monkeypatch.undo()
    assert _holds_adapter(target, 2)
    late = next(tmp_path.glob("task.late-*"))
    assert _holds_adapter(late, 1)


def test_a_disk_error_removing_the_old_set_warns_and_the_next_save_removes_it(tmp_path, monkeypatch):
    target = tmp_path / "task"
    nv.save_adapter(trained(1), target)
    monkeypatch.setattr(storage, "_remove_copy", lambda path: (_ for _ in ()).throw(
        OSError(errno.EIO, os.strerror(errno.EIO), os.fspath(path))))
    with pytest.warns(RuntimeWarning, match=r"\.task\.staged-\w+, a hidden copy that a save in .* replaced or left, "
                                            r"could not be removed \(Input/output error\)\. The next save there "
                                            r"removes it"):
        nv.save_adapter(trained(2), target)
    monkeypatch.undo()
    assert _holds_adapter(target, 2) and len(list(tmp_path.iterdir())) == 3  # task, its lock, the old set
    nv.save_adapter(trained(2), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".task.lock", "task"]


def test_a_full_disk_at_the_final_rename_is_explained_and_the_old_file_kept(tmp_path, monkeypatch):
    target = storage.write_text_atomic(tmp_path / "result.json", "old")

    def full(source, destination, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(source), str(destination))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError, match=rf"cannot save to {re.escape(str(target))}: no space is left on its filesystem"
                                      r".*was not changed.*then save again"):
        storage.write_text_atomic(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["result.json"]


@posix_only
def test_a_file_write_through_a_loop_of_links_or_to_a_name_too_long_is_refused_before_writing(tmp_path):
    # the loop replaced the link with a file; the long name failed at the final rename, after the whole content
    loop = tmp_path / "loop.json"
    os.symlink(loop.name, loop)
    with pytest.raises(OSError, match=r"loop\.json leads into a loop of symbolic links.*nothing was written"):
        storage.write_text_atomic(loop, "x")
    assert loop.is_symlink()
    long = tmp_path / ("n" * 300 + ".ckpt")
    written = []
    with pytest.raises(OSError, match=r"the name nnnn.* is 305 bytes long, over the 255 .*nothing was written"):
        with storage.atomic_path(long) as tmp:
            written.append(tmp)
    assert not written and sorted(os.listdir(tmp_path)) == ["loop.json"]


@pytest.mark.parametrize("stop", [OSError(errno.EIO, os.strerror(errno.EIO)), KeyboardInterrupt()])
def test_a_set_of_files_written_together_is_put_back_whole_when_one_fails(tmp_path, monkeypatch, stop):
    old, new, third = tmp_path / "best.json", tmp_path / "created.txt", tmp_path / "best.yaml"
    storage.write_text_atomic(old, "old json")
    storage.write_text_atomic(third, "old yaml")
    write = storage.write_text_atomic

    def failing(path, text, check=None):
        if Path(path) == third:
            raise stop
        return write(path, text, check)

    monkeypatch.setattr(storage, "write_text_atomic", failing)
    with pytest.raises(type(stop)):
        storage.write_set_atomic([(old, "new json", None), (new, "new file", None), (third, "new yaml", None)])
    monkeypatch.undo()
    assert old.read_text() == "old json" and not new.exists() and third.read_text() == "old yaml"
    storage.write_set_atomic([(old, "new json", None), (new, "new file", None), (third, "new yaml", None)])
    assert [p.read_text() for p in (old, new, third)] == ["new json", "new file", "new yaml"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
def test_a_special_file_at_an_output_path_is_refused_not_replaced(tmp_path):
    # --result_file /dev/null (run as root) renamed the result over the device: /dev/null became a regular file
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match=r"pipe is a named pipe \(FIFO\), not a regular file: .*nothing was written"):
        storage.write_text_atomic(fifo, "x")
    with pytest.raises(ValueError, match=r"--result_file .*pipe is a named pipe \(FIFO\), not a regular file"):
        storage.check_writable_file(fifo, f"--result_file {fifo}")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and os.listdir(tmp_path) == ["pipe"]
    link = tmp_path / "to_pipe"
    link.symlink_to(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        storage.write_text_atomic(link, "x")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_an_error_reading_what_a_save_copies_names_that_path_not_the_save(tmp_path):
    # wrapped as a failure writing beside the target ("check the disk"), which named neither the source nor the cause
    with pytest.raises(FileNotFoundError) as error:
        storage.copy_directory(tmp_path / "missing", tmp_path / "copy")
    assert error.value.filename == str(tmp_path / "missing") and "cannot save" not in str(error.value)
    assert not (tmp_path / "copy").exists()


@pytest.mark.parametrize("reported", [-1, 0])
def test_a_file_system_that_reports_no_name_limit_takes_every_name(tmp_path, monkeypatch, reported):
    # some FUSE mounts report 0 (and "no limit" is -1): every name was over the limit, so every write was refused
    real = os.pathconf
    monkeypatch.setattr(os, "pathconf", lambda path, name: reported if name == "PC_NAME_MAX" else real(path, name))
    assert storage.write_text_atomic(tmp_path / "result.json", "x").read_text() == "x"
    storage.check_writable_file(tmp_path / "other.json", "--result_file")


def test_a_ctrl_c_at_any_line_of_a_held_lock_count_leaves_no_count_behind(tmp_path):
    """Between the count and its try (or its decrement and the key's removal), a Ctrl-C left this thread counted as
    holding the folder's lock: every later save of that folder in the process was refused as "from within a write
    of it"."""
    model = trained(0)
    code = storage._registered.__wrapped__.__code__
    for line in body_lines(code):
        assert interrupted_at(code, line, lambda: nv.save_adapter(model, tmp_path / "adapter")), line
        nv.save_adapter(model, tmp_path / "adapter")  # the retry (a count left behind is dropped: no lock is held)
        assert not storage._held_locks(), line


def test_a_ctrl_c_at_any_line_of_the_writers_lock_leaves_no_lock_file_open(tmp_path):
    """Between the count's release and the lock file's close, a Ctrl-C kept the file open and locked: every later save
    of that folder, in this process (a notebook's kernel) or another, waited for it for ever."""
    model = trained(0)
    for code in (storage.writer_lock.__wrapped__.__code__, storage._registered.__wrapped__.__code__):
        for line in body_lines(code):
            interrupted_at(code, line, lambda: nv.save_adapter(model, tmp_path / "adapter"))
            assert not storage._LOCK_FDS, (code.co_name, line)  # else the retry would wait for ever
            nv.save_adapter(model, tmp_path / "adapter")


def test_a_nested_write_below_a_folder_this_thread_holds_shared_keeps_counting_it(tmp_path):
    """Checked with a shared probe, the count of a folder this thread held shared was taken as stale and dropped by a
    second write below it: a write of the folder itself then waited on this thread's own lock, for ever."""
    import threading

    nv.save_adapter(trained(0), tmp_path / "a")  # the folder has a lock file now
    outcome = []

    def nested():
        with storage._ancestor_locks(tmp_path / "a" / "x"):
            with storage._ancestor_locks(tmp_path / "a" / "y"):
                pass
            try:
                with storage.writer_lock(tmp_path / "a"):
                    outcome.append("written")
            except RuntimeError as error:
                outcome.append(str(error))

    thread = threading.Thread(target=nested, daemon=True)
    thread.start()
    thread.join(20)
    assert outcome and "from within a write of it" in outcome[0]


def test_the_adapter_an_export_replaces_is_kept_beside_a_name_too_long_for_the_previous_suffix(tmp_path):
    """An adapter folder named with 247-255 bytes trained, then failed to export: <name>.previous was too long."""
    from nola_vision.train.module import _keep_previous_adapter

    target = tmp_path / ("a" * 250)
    nv.save_adapter(trained(1), target)
    with pytest.warns(UserWarning, match="already held an adapter"):
        _keep_previous_adapter(target)
    kept = [p for p in tmp_path.iterdir() if p.name.endswith(".previous")]
    assert len(kept) == 1 and len(os.fsencode(kept[0].name)) <= 255
    assert (kept[0] / "adapter_model.safetensors").read_bytes() == (target / "adapter_model.safetensors").read_bytes()


@pytest.fixture
def flag_immutable():
    """``flag(path)``: ``chattr +i`` on ``path``, undone at teardown (skips where the file system or user cannot)."""
    import shutil
    import subprocess

    flagged = []

    def flag(path):
        if shutil.which("chattr") is None:
            pytest.skip("no chattr")
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("this file system or user cannot flag files immutable")
        flagged.append(path)

    yield flag
    for path in flagged:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)


@pytest.mark.parametrize("flagged", ["adapter_model.safetensors", "notes.txt", "."])
def test_an_immutable_file_or_folder_is_refused_before_a_save_steps_past_it(tmp_path, flag_immutable, flagged):
    """chattr +i stopped nothing: the save swapped the folder around the flagged file, which stayed for good in a
    hidden folder set aside (a warning said so), and an immutable folder was told to chmod u+w."""
    target = tmp_path / "adapter"
    nv.save_adapter(trained(1), target)
    (target / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    flag_immutable(target / flagged)
    with pytest.raises(PermissionError, match=r"is flagged immutable or append-only .*chattr -i -a"):
        nv.save_adapter(trained(2), target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".adapter.lock", "adapter"]
    if flagged != ".":  # a single-file write over an immutable file is refused alike
        with pytest.raises(PermissionError, match="is flagged immutable"):
            storage.write_text_atomic(target / flagged, "new")


def test_a_previous_copy_steps_past_a_protected_earlier_copy_and_fits_a_smaller_name_limit(tmp_path, monkeypatch):
    """An earlier adapter kept at <name>.previous and write-protected (chmod 555) failed the export after training
    instead of being stepped past; on a file system of 143-byte names (eCryptfs) the shortened name was 152 bytes."""
    from nola_vision.train.module import _previous_adapter_path

    target = tmp_path / "adapter"
    nv.save_adapter(trained(1), target)
    nv.save_adapter(trained(2), tmp_path / "adapter.previous")
    assert _previous_adapter_path(target) == tmp_path / "adapter.previous"  # an earlier copy: replaced
    (tmp_path / "adapter.previous").chmod(0o555)
    try:
        assert _previous_adapter_path(target) == tmp_path / "adapter.previous.1"
    finally:
        (tmp_path / "adapter.previous").chmod(0o755)
    monkeypatch.setattr(storage, "_name_limit", lambda folder: 143)
    aside = storage.previous_path(tmp_path / ("b" * 140), lambda path: True)
    assert len(os.fsencode(aside.name)) <= 143 and aside.name.endswith(".previous")
