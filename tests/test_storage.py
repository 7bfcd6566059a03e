"""The storage protocol of every directory the library writes: serialised writers, one atomic swap that readers never
see half of, the user's other files kept, odd paths refused before anything moves, and killed saves cleaned up."""
import errno
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from storage_workers import CONFIG, USER_FILE, USER_TEXT, trained
from tiny_models import tiny_vit

import nola_vision as nv
from nola_vision.adapters.files import CONFIG_NAME, WEIGHTS_NAME, AdapterLoadError
from nola_vision.core import storage

WORKERS = Path(__file__).with_name("storage_workers.py")
SAVES_EACH = 150
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(IMAGES)


def loaded_logits(directory):
    return logits(nv.load_adapter(tiny_vit(), directory))


def worker(*arguments):
    return subprocess.Popen([sys.executable, str(WORKERS), *map(str, arguments)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(process, timeout=300):
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def wait_for(path, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def saved_adapter(directory, seed, bits=16):
    nv.save_adapter(trained(seed), directory, bits=bits)
    (directory / USER_FILE).write_text(USER_TEXT)
    return directory


def siblings(directory):
    return sorted(p.name for p in directory.parent.iterdir())


def leftovers(directory):
    """Hidden siblings of ``directory`` other than its writers' lock file: what a save left behind."""
    return [name for name in siblings(directory) if name.startswith(f".{directory.name}.")
            and name != f".{directory.name}.lock"]


def trained_values(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_two_writer_processes_and_a_reader_never_fail_nor_lose_a_file_and_loads_are_whole(tmp_path):
    target = saved_adapter(tmp_path / "shared" / "adapter", seed=1)
    model, expected = nv.inject(tiny_vit(), CONFIG), {}
    for seed, bits in [(1, 16), (2, 16), (3, 8)]:  # what the directory can hold: the first save and each writer's
        nv.load_adapter(model, nv.save_adapter(trained(seed), tmp_path / "references" / f"{seed}", bits=bits))
        expected[seed] = trained_values(model)
    go = tmp_path / "go"
    writers = [worker("write", target, 2, 16, SAVES_EACH, go), worker("write", target, 3, 8, SAVES_EACH, go)]
    for seed, process in zip((2, 3), writers):
        wait_for(tmp_path / f"writer{seed}.ready", process)
    go.touch()
    loads, seen, failures = 0, Counter(), []
    while any(process.poll() is None for process in writers):  # this process reads while the two others write
        loads += 1
        try:
            nv.load_adapter(model, target)
            values = trained_values(model)
            matches = [seed for seed, want in expected.items() if all(torch.equal(values[k], want[k]) for k in want)]
            seen.update(matches)
            if len(matches) != 1 or (target / USER_FILE).read_text() != USER_TEXT:
                failures.append(f"load {loads} equals the adapters {matches} and has {os.listdir(target)}")
        except Exception as error:  # counted, so that the assertion reports every failure
            failures.append(f"load {loads}: {error!r}")
    written = [finish(process) for process in writers]
    assert [w["failures"] for w in written] == [[], []] and [w["saves"] for w in written] == [SAVES_EACH] * 2
    assert failures == [] and loads > 0
    assert len(seen) >= 2, seen  # the loads did overlap the saves
    assert sorted(p.name for p in target.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME, USER_FILE]
    assert (target / USER_FILE).read_text() == USER_TEXT and siblings(target) == [".adapter.lock", "adapter"]


@pytest.mark.parametrize("where", ["write", "remove", "fsize"])
def test_a_save_killed_midway_is_cleaned_up_by_the_next_save_of_that_directory(tmp_path, where):
    target = saved_adapter(tmp_path / "saves" / "adapter", seed=1)
    ready = tmp_path / "ready"
    process = worker("die", target, 2, where, ready)
    if where == "fsize":  # the file size limit kills it while it writes the staged weights
        process.communicate(timeout=120)
        assert process.returncode == -signal.SIGXFSZ
    else:
        wait_for(ready, process)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    assert leftovers(target) != []  # what the killed save left
    assert (target / USER_FILE).read_text() == USER_TEXT
    old_or_new = loaded_logits(target)
    assert any(torch.allclose(old_or_new, logits(trained(seed)), atol=1e-3) for seed in (1, 2))
    survivor = trained(3)
    nv.save_adapter(survivor, target)
    assert leftovers(target) == [] and siblings(target) == [".adapter.lock", "adapter"]
    assert (target / USER_FILE).read_text() == USER_TEXT
    torch.testing.assert_close(loaded_logits(target), logits(survivor), rtol=0, atol=1e-3)


def test_a_save_onto_a_regular_file_is_refused_and_the_file_left_untouched(tmp_path):
    target = tmp_path / "adapter"
    target.write_text("my results")
    for save in (nv.save_adapter, nv.export_peft):
        with pytest.raises(ValueError, match="is an existing file, not a directory"):
            save(trained(1), target)
    assert target.read_text() == "my results" and siblings(target) == ["adapter"]


def test_the_working_directory_and_the_directories_above_it_are_refused(tmp_path, monkeypatch):
    target = saved_adapter(tmp_path / "adapter", seed=1)
    before = {p: p.read_bytes() for p in target.iterdir()}
    monkeypatch.chdir(target)
    with pytest.raises(ValueError, match="is the current working directory"):
        nv.save_adapter(trained(2), ".")
    with pytest.raises(ValueError, match="is above the current working directory"):
        nv.save_adapter(trained(2), tmp_path)
    assert {p: p.read_bytes() for p in target.iterdir()} == before
    assert siblings(target) == [".adapter.lock", "adapter"]


def test_a_symlinked_directory_is_written_through_and_stays_a_link(tmp_path):
    real = saved_adapter(tmp_path / "store" / "v1", seed=1)
    link = tmp_path / "current"
    link.symlink_to(real, target_is_directory=True)
    new = trained(2)
    nv.save_adapter(new, link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert (real / USER_FILE).read_text() == USER_TEXT
    torch.testing.assert_close(loaded_logits(real), logits(new), rtol=0, atol=1e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "store"]
    assert siblings(real) == [".v1.lock", "v1"]


@pytest.mark.parametrize("follow_links", [True, False])
def test_a_file_write_through_a_symlink_goes_to_its_target_or_replaces_the_link(tmp_path, follow_links):
    from nola_vision.core.storage import write_bytes_atomic

    target, link, loop = tmp_path / "best.ckpt", tmp_path / "last.ckpt", tmp_path / "loop.ckpt"
    target.write_bytes(b"best")
    link.symlink_to(target.name)
    if not follow_links:
        target.chmod(0o444)  # a write-protected best checkpoint: the file replacing the link is a new one, writable
    write_bytes_atomic(link, b"newer", follow_links=follow_links)
    assert link.is_symlink() == follow_links and link.read_bytes() == b"newer"
    assert target.read_bytes() == (b"newer" if follow_links else b"best")
    if not follow_links:
        assert stat.S_IMODE(link.stat().st_mode) == storage._new_file_mode()
    loop.symlink_to(loop.name)
    if follow_links:
        with pytest.raises(OSError, match="loop of symbolic links"):
            write_bytes_atomic(loop, b"x")
    else:  # the link itself goes, whatever it points at
        write_bytes_atomic(loop, b"x", follow_links=False)
        assert not loop.is_symlink() and loop.read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt", "loop.ckpt"]


@pytest.mark.parametrize("where", ["loop", "loop/adapter"])
def test_a_save_into_a_loop_of_symlinks_is_refused_and_leaves_the_links(tmp_path, where):
    """realpath leaves a loop as it is: the save swapped out the link itself, left it behind as a staged sibling
    that no later save removed, and made the new folder owner-only."""
    (tmp_path / "loop").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop")
    with pytest.raises(ValueError, match=r"leads into a loop of symbolic links.*nothing was written"):
        nv.save_adapter(trained(1), tmp_path / where)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop", "loop2"]
    assert all((tmp_path / name).is_symlink() for name in ("loop", "loop2"))


def test_a_path_stepping_up_out_of_a_missing_folder_is_refused_as_it_could_not_be_read_back(tmp_path):
    """realpath removes "missing/.." as text, so such a save wrote beside it, at a path the system cannot reach
    through the one given: the load of the returned path failed."""
    for path in (tmp_path / "missing" / ".." / "adapter", tmp_path / "missing" / ".." / "graph.onnx"):
        with pytest.raises((ValueError, OSError), match=r"steps up \('\.\.'\) out of .*missing, which does not exist"):
            if path.suffix:
                storage.write_bytes_atomic(path, b"graph")
            else:
                nv.save_adapter(trained(1), path)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "there").mkdir()  # a folder that exists can be stepped out of, as the system does
    directory = nv.save_adapter(trained(1), tmp_path / "there" / ".." / "adapter")
    torch.testing.assert_close(loaded_logits(directory), logits(trained(1)), rtol=0, atol=1e-3)


def test_other_files_and_folders_are_kept_as_the_same_files(tmp_path):
    target = saved_adapter(tmp_path / "adapter", seed=1)
    (target / "plots").mkdir()
    (target / "plots" / "loss.png").write_bytes(b"png")
    (target / "latest").symlink_to("plots")
    inodes = {name: (target / name).stat().st_ino for name in (USER_FILE, "plots/loss.png")}
    nv.save_adapter(trained(2), target)
    assert {name: (target / name).stat().st_ino for name in inodes} == inodes  # hard links: nothing copied or moved
    assert (target / "latest").is_symlink() and (target / "latest" / "loss.png").read_bytes() == b"png"


@pytest.mark.parametrize("subfolder", ["new", "saved_before"])
def test_a_save_into_a_subfolder_and_a_save_of_its_directory_take_turns_and_both_are_kept(tmp_path, subfolder):
    """A save of tasks/task1 while another process saved tasks/ (after tasks/ was listed, before its swap) was lost: the
    swap removed the old set with it, or put back the task1 the listing had linked."""
    target = saved_adapter(tmp_path / "tasks", seed=1)
    if subfolder == "saved_before":
        nv.save_adapter(trained(4), target / "task1")
    ready, go, inner = tmp_path / "ready", tmp_path / "go", trained(3)
    process = worker("hold", target, 2, ready, go)
    wait_for(ready, process)  # the other process saves tasks/: its entries are linked, its swap is still to come
    errors = []
    saving = threading.Thread(target=lambda: errors.extend(_failure(nv.save_adapter, inner, target / "task1")))
    saving.start()
    saving.join(timeout=2)  # as long as the inner save needs to finish, unless it waits for the other
    go.touch()
    finish(process)
    saving.join(timeout=120)
    assert not saving.is_alive() and errors == []
    assert sorted(os.listdir(target)) == [".task1.lock", CONFIG_NAME, WEIGHTS_NAME, USER_FILE, "task1"]
    torch.testing.assert_close(loaded_logits(target / "task1"), logits(inner), rtol=0, atol=1e-3)
    torch.testing.assert_close(loaded_logits(target), logits(trained(2)), rtol=0, atol=1e-3)


def _failure(call, *arguments):
    """[the exception ``call(*arguments)`` raised], or [] when it returned."""
    try:
        call(*arguments)
    except Exception as error:  # reported by the test, from the thread it ran in
        return [error]
    return []


def test_a_save_into_a_subfolder_from_within_a_save_of_its_directory_is_kept_and_never_waits(tmp_path, monkeypatch):
    """In one thread the save of tasks/ holds the lock the inner save takes turns on: it must neither wait for itself
    forever nor lose the inner save, which comes after tasks/ was listed."""
    target = saved_adapter(tmp_path / "tasks", seed=1)
    inner, fsync_entries, saves = trained(3), storage._fsync_entries, []

    def saving_inside(staged, names):
        if not saves:  # the first call is the save of tasks/; the inner save's own comes after this mark
            saves.append(target / "task1")
            nv.save_adapter(inner, target / "task1")
        return fsync_entries(staged, names)

    monkeypatch.setattr(storage, "_fsync_entries", saving_inside)
    nv.save_adapter(trained(2), target)
    monkeypatch.undo()
    assert sorted(os.listdir(target)) == [".task1.lock", CONFIG_NAME, WEIGHTS_NAME, USER_FILE, "task1"]
    torch.testing.assert_close(loaded_logits(target / "task1"), logits(inner), rtol=0, atol=1e-3)
    torch.testing.assert_close(loaded_logits(target), logits(trained(2)), rtol=0, atol=1e-3)


def test_an_entry_made_during_a_save_that_cannot_be_moved_into_the_new_set_is_kept_aside_not_removed(tmp_path,
                                                                                                     monkeypatch):
    target = saved_adapter(tmp_path / "tasks", seed=1)
    fsync_entries = storage._fsync_entries

    def writing_inside(staged, names):
        (target / "late.txt").write_text("mine")  # in the old set, after its entries were linked into the new one
        return fsync_entries(staged, names)

    def refused(source, destination):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(storage, "_fsync_entries", writing_inside)
    monkeypatch.setattr(storage, "_move_entry", refused)
    with pytest.warns(RuntimeWarning, match=r"could not all be moved into the new set \(late\.txt \(Permission denied"
                                            r"\)\): the old set is kept as .*tasks\.late-[0-9a-f]{12}"):
        nv.save_adapter(trained(2), target)
    monkeypatch.undo()
    [kept] = [path for path in tmp_path.iterdir() if path.name.startswith("tasks.late-")]
    assert (kept / "late.txt").read_text() == "mine" and not (target / "late.txt").exists()
    torch.testing.assert_close(loaded_logits(target), logits(trained(2)), rtol=0, atol=1e-3)
    nv.save_adapter(trained(3), target)  # the next save's clean-up leaves it
    assert (kept / "late.txt").read_text() == "mine"


def test_a_save_of_a_directory_from_within_a_save_into_it_is_refused_instead_of_waiting_for_itself(tmp_path,
                                                                                                   monkeypatch):
    target = saved_adapter(tmp_path / "tasks", seed=1)
    nv.save_adapter(trained(4), target / "task1")
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    fsync_entries, saves = storage._fsync_entries, []

    def saving_outside(staged, names):
        if not saves:  # the first call is the save of task1, and the save of tasks/ is refused before its own
            saves.append(target)
            nv.save_adapter(trained(2), target)
        return fsync_entries(staged, names)

    monkeypatch.setattr(storage, "_fsync_entries", saving_outside)
    with pytest.raises(RuntimeError, match=r"cannot write .*tasks from within a write of it, or of a directory inside "
                                           r"it, in this thread.*nothing was written"):
        nv.save_adapter(trained(3), target / "task1")
    monkeypatch.undo()
    assert {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()} == before


@pytest.mark.skipif(os.name != "posix", reason="flock")
def test_a_save_into_a_directory_whose_lock_stays_held_is_refused_after_a_while_not_hung(tmp_path, monkeypatch):
    import fcntl

    target = saved_adapter(tmp_path / "tasks", seed=1)
    fd = os.open(tmp_path / ".tasks.lock", os.O_RDONLY)  # held as another process would: not by this save's thread
    fcntl.flock(fd, fcntl.LOCK_EX)
    monkeypatch.setattr(storage, "_ANCESTOR_WAIT_S", 0.3)
    try:
        with pytest.raises(TimeoutError, match=r"tasks/task1: .*\.tasks\.lock, the lock of .*tasks above it, has been "
                                               r"held for 0\.3 s .*Nothing was written"):
            nv.save_adapter(trained(3), target / "task1")
    finally:
        os.close(fd)
    assert not (target / "task1").exists() and not (target / ".task1.lock").exists()


def test_a_save_failing_at_its_last_step_keeps_the_old_set_whole(tmp_path, monkeypatch):
    target = saved_adapter(tmp_path / "adapter", seed=1)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def failing_fsync(fd):
        raise OSError("I/O error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="I/O error"):
        nv.save_adapter(trained(2), target)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert siblings(target) == [".adapter.lock", "adapter"]


def test_without_an_atomic_exchange_a_save_still_keeps_every_file(tmp_path, monkeypatch):
    target = saved_adapter(tmp_path / "adapter", seed=1)
    monkeypatch.setattr(storage, "_exchange", lambda first, second: False)  # as on Windows or an old kernel
    new = trained(2)
    nv.save_adapter(new, target)
    assert (target / USER_FILE).read_text() == USER_TEXT and siblings(target) == [".adapter.lock", "adapter"]
    torch.testing.assert_close(loaded_logits(target), logits(new), rtol=0, atol=1e-3)


def test_an_old_set_that_a_killed_two_rename_save_left_aside_is_put_back(tmp_path):
    target = saved_adapter(tmp_path / "adapter", seed=1)
    target.rename(tmp_path / ".adapter.old-0123456789ab")  # killed between its two renames: the path is missing
    with pytest.raises(AdapterLoadError, match=r"adapter is missing: .*; .*\.adapter\.old-0123456789ab holds the "
                                               r"adapter that was there, set aside by a save killed before it "
                                               r"finished: rename it back to adapter to load it"):
        nv.load_adapter(tiny_vit(), target)  # said only "is missing"
    new = trained(2)
    nv.save_adapter(new, target)
    assert (target / USER_FILE).read_text() == USER_TEXT and siblings(target) == [".adapter.lock", "adapter"]
    torch.testing.assert_close(loaded_logits(target), logits(new), rtol=0, atol=1e-3)


def test_leftovers_of_a_sibling_with_a_longer_name_are_not_touched(tmp_path):
    target = saved_adapter(tmp_path / "a", seed=1)
    other = tmp_path / ".a.b.staged-0123456789ab"  # a killed save of the directory "a.b", not of "a"
    other.mkdir()
    nv.save_adapter(trained(2), target)
    assert other.is_dir()


def test_user_folders_and_files_that_only_resemble_leftovers_are_kept(tmp_path):
    target = saved_adapter(tmp_path / "adapter", seed=1)
    backups = [tmp_path / ".adapter.old-2024", tmp_path / ".adapter.staged-1"]  # a user's hidden backups
    for backup in backups:
        backup.mkdir()
        (backup / "backup.txt").write_text("precious")
    lookalike = tmp_path / ".adapter.old-0123456789ab"  # a leftover's name, but a file: not what a save leaves
    lookalike.write_text("precious")
    nv.save_adapter(trained(2), target)
    assert all((backup / "backup.txt").read_text() == "precious" for backup in backups)
    assert lookalike.read_text() == "precious" and not (target / "backup.txt").exists()
    shutil.rmtree(target)  # with the target gone, a user's backup is not taken for a set a killed save left aside
    nv.save_adapter(trained(2), target)
    assert (backups[0] / "backup.txt").read_text() == "precious" and not (target / "backup.txt").exists()


def test_a_reader_whose_directory_is_swapped_and_removed_while_it_reads_reads_the_new_set(tmp_path, monkeypatch):
    target = saved_adapter(tmp_path / "adapter", seed=1)
    new, read_relative, saves = trained(2), storage._read_relative, []

    def save_then_read(dir_fd, directory, names, *limits):  # a save completes after the directory opens
        if not saves:
            saves.append(nv.save_adapter(new, target))
        return read_relative(dir_fd, directory, names, *limits)

    monkeypatch.setattr(storage, "_read_relative", save_then_read)
    torch.testing.assert_close(loaded_logits(target), logits(new), rtol=0, atol=1e-3)
    assert len(saves) == 1


@pytest.fixture
def restore_modes():
    """Paths a test write-protects; made writable again afterwards, so that tmp_path can be removed."""
    protected = []
    yield protected
    for path in protected:
        os.chmod(path, 0o755)


def test_a_write_protected_directory_is_refused_and_left_untouched(tmp_path, restore_modes):
    target = saved_adapter(tmp_path / "adapter", seed=1)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    for file in target.iterdir():
        file.chmod(0o444)
    restore_modes.append(target)
    os.chmod(target, 0o555)  # no write bit for anyone: refused even for root, whom permissions do not stop
    with pytest.raises(PermissionError, match=f"{re.escape(str(target))} is write-protected.*make it writable"):
        nv.save_adapter(trained(2), target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert (target.stat().st_mode & 0o777) == 0o555 and siblings(target) == [".adapter.lock", "adapter"]


@pytest.mark.parametrize("save", [nv.save_adapter, nv.export_peft], ids=["save_adapter", "export_peft"])
def test_a_write_protected_file_in_a_writable_directory_is_refused_and_nothing_changes(tmp_path, restore_modes, save):
    target = tmp_path / "adapter"
    save(trained(1), target)
    (target / USER_FILE).write_text(USER_TEXT)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    protected = target / WEIGHTS_NAME  # peft's file name too
    protected.chmod(0o444)  # the folder stays writable: a rename would replace the file without opening it
    restore_modes.append(protected)
    with pytest.raises(PermissionError, match=f"{re.escape(str(protected))} is write-protected \\(mode 0444\\).*"
                                              f"chmod u\\+w.*nothing in {re.escape(str(target))} was changed"):
        save(trained(2), target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert protected.stat().st_mode & 0o777 == 0o444 and siblings(target) == [".adapter.lock", "adapter"]
    protected.chmod(0o644)  # the fix the message names
    save(trained(2), target)
    assert protected.read_bytes() != before[protected.name]


def test_a_write_protected_file_is_refused_by_atomic_writes_and_by_the_check_before_a_run(tmp_path, restore_modes):
    path = tmp_path / "result.json"
    path.write_text("kept")
    path.chmod(0o444)
    restore_modes.append(path)
    with pytest.raises(PermissionError, match="result.json is write-protected \\(mode 0444\\).*chmod u\\+w"):
        storage.write_text_atomic(path, "new")
    with pytest.raises(ValueError, match="^--result_file: .*result.json is write-protected"):
        storage.check_writable_file(path, "--result_file")
    assert path.read_text() == "kept" and os.listdir(tmp_path) == ["result.json"]
    path.chmod(0o600)
    storage.write_text_atomic(path, "new")
    assert path.read_text() == "new" and path.stat().st_mode & 0o777 == 0o600


def test_a_save_whose_parent_is_not_writable_is_refused_before_anything_is_written(tmp_path, restore_modes,
                                                                                     monkeypatch):
    parent = tmp_path / "shared"
    target = parent / "mine"
    target.mkdir(parents=True)
    (target / USER_FILE).write_text(USER_TEXT)
    restore_modes.append(parent)
    os.chmod(parent, 0o555)
    access = os.access  # root may write the parent anyway: answer as for a user whom its mode stops

    def as_a_user(path, mode, **kwargs):
        return not (Path(path) == parent and mode & os.W_OK) and access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", as_a_user)
    for save in (nv.save_adapter, nv.export_peft):
        with pytest.raises(PermissionError, match=f"the parent directory {re.escape(str(parent))} must be writable"
                                                  ".*save to a directory inside a writable folder"):
            save(trained(2), target)
    assert os.listdir(parent) == ["mine"] and os.listdir(target) == [USER_FILE]


@pytest.mark.parametrize("code, cause", [(errno.ENOSPC, "no space is left on its filesystem"),
                                         (errno.EFBIG, r"a file would exceed the file size limit \(ulimit -f\)")],
                         ids=["ENOSPC", "EFBIG"])
def test_a_full_disk_while_staging_names_the_directory_the_cause_and_that_nothing_changed(tmp_path, monkeypatch,
                                                                                          code, cause):
    target = saved_adapter(tmp_path / "adapter", seed=1)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def full(path, data):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(Path, "write_bytes", full)
    named = re.escape(str(target))
    with pytest.raises(OSError, match=rf"cannot save to {named}: {cause}.*Nothing in {named} was changed: a "
                                      r"previous adapter there, if any, is intact") as error:
        nv.save_adapter(trained(2), target)
    monkeypatch.undo()
    assert error.value.errno == code and error.value.__cause__.errno == code
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert siblings(target) == [".adapter.lock", "adapter"]


@pytest.fixture
def mount(tmp_path):
    """Mount a filesystem at a folder: ``mount(path)`` a 1 MiB tmpfs, ``mount(path, source)`` a bind mount of
    ``source``; every mount under tmp_path is unmounted afterwards (where a save moved it too). Skips the test where
    mounting is not allowed (not root, or no right to mount)."""

    def mount_at(path, source=None):
        path.mkdir(parents=True, exist_ok=True)
        command = ["mount", "--bind", str(source), str(path)] if source else [
            "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)]
        if os.name != "posix" or os.geteuid() != 0 or subprocess.run(command, capture_output=True).returncode != 0:
            pytest.skip("mounting a filesystem needs root (and the right to mount)")
        return path

    yield mount_at
    if os.path.exists("/proc/self/mountinfo"):
        with open("/proc/self/mountinfo") as file:
            points = [line.split()[4] for line in file]
        for point in sorted((p for p in points if p.startswith(f"{tmp_path}{os.sep}")), reverse=True):
            subprocess.run(["umount", point], check=True)


@pytest.mark.parametrize("kind", ["tmpfs", "bind"])
def test_a_directory_holding_a_mount_point_is_refused_and_the_mounted_files_kept(tmp_path, mount, kind):
    target = saved_adapter(tmp_path / "adapter", seed=1)
    source = tmp_path / "elsewhere"  # a bind mount of the same filesystem, which os.path.ismount cannot tell
    source.mkdir()
    mounted = mount(target / "data" / "mnt", source if kind == "bind" else None)
    (mounted / "precious.txt").write_text("data on another filesystem")
    before = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match=f"{re.escape(str(target))} holds a mount point, {re.escape(str(mounted))}"
                                         ".*Unmount it"):
        nv.save_adapter(trained(2), target)
    assert (mounted / "precious.txt").read_text() == "data on another filesystem"
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()} == before
    assert siblings(target) == [".adapter.lock", "adapter", "elsewhere"]


def test_a_leftover_holding_a_mount_point_is_left_whole_not_emptied(tmp_path, mount):
    target = saved_adapter(tmp_path / "adapter", seed=1)
    leftover = tmp_path / ".adapter.staged-0123456789ab"  # as a killed save leaves it
    mounted = mount(leftover / "mnt")
    (mounted / "precious.txt").write_text("data on another filesystem")
    new = trained(2)
    with pytest.warns(RuntimeWarning, match=f"{re.escape(str(leftover))} was left in place: .*mnt in it is a mount"):
        nv.save_adapter(new, target)
    assert (mounted / "precious.txt").read_text() == "data on another filesystem"
    torch.testing.assert_close(loaded_logits(target), logits(new), rtol=0, atol=1e-3)


def test_a_killed_writers_staging_folder_goes_with_its_temporary_file_and_a_live_writers_stays(tmp_path):
    import fcntl

    from nola_vision.core.storage import atomic_path

    target = tmp_path / "graph.onnx"
    killed = tmp_path / ".graph.onnx.nv-abcd1234.tmp.x1y2z3w4"  # its temporary file is gone already
    (killed / "sub").mkdir(parents=True)
    (killed / "sub" / "weights").write_bytes(b"0" * 100)
    live_file = tmp_path / ".graph.onnx.nv-live5678.tmp"
    live_file.write_bytes(b"")
    live = tmp_path / ".graph.onnx.nv-live5678.tmp.a1b2c3d4"
    live.mkdir()
    mine = tmp_path / ".graph.onnx.nv-abcd1234.tmp.notmine"  # not a name a writer makes: never touched
    mine.mkdir()
    with open(live_file, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # a writer of the same path that is still running
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"graph")
    assert target.read_bytes() == b"graph"
    assert not killed.exists() and live.is_dir() and live_file.exists() and mine.is_dir()


OTHER_ID = 4321  # a user and group id that is not this process's (root may give files any)


def ownership(path):
    info = os.stat(path, follow_symlinks=False)
    return info.st_uid, info.st_gid, stat_mode(info)


def stat_mode(info):
    return info.st_mode & 0o7777


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to give files other owners")
def test_a_save_keeps_owner_group_and_mode_of_the_directory_its_subfolders_and_a_replaced_file(tmp_path,
                                                                                               monkeypatch):
    # A shared (setgid, group-writable) adapter directory with a user's subfolder: re-created by the save, they keep
    # their owner, group and mode (copytree gave them the saver's group, so the group lost its access).
    target = saved_adapter(tmp_path / "adapter", seed=1)
    notes = target / "notes"
    (notes / "inner").mkdir(parents=True)
    (notes / "inner" / "plot.txt").write_text("kept")
    os.symlink("inner/plot.txt", notes / "link")
    for path, mode in ((target, 0o2770), (notes, 0o2750), (notes / "inner", 0o700)):
        os.chown(path, OTHER_ID, OTHER_ID)
        os.chmod(path, mode)
    before = {path: ownership(path) for path in (target, notes, notes / "inner", notes / "link")}
    nv.save_adapter(trained(2), target)
    assert {path: ownership(path) for path in before} == before
    # The adapter's own new files get the folder's group, as files created in a setgid folder do.
    assert {os.stat(target / name).st_gid for name in (CONFIG_NAME, WEIGHTS_NAME)} == {OTHER_ID}
    assert (notes / "inner" / "plot.txt").read_text() == "kept" and os.readlink(notes / "link") == "inner/plot.txt"

    # Where hard links are refused, the copied file keeps its owner, group and mode too.
    def refuse_links(*args, **kwargs):
        raise PermissionError(errno.EPERM, "links refused")

    plot = notes / "inner" / "plot.txt"
    os.chown(plot, OTHER_ID, OTHER_ID)
    os.chmod(plot, 0o640)
    monkeypatch.setattr(os, "link", refuse_links)
    nv.save_adapter(trained(3), target)
    assert ownership(plot) == (OTHER_ID, OTHER_ID, 0o640) and plot.read_text() == "kept"


def _as_other_user(action):
    """Run ``action()`` in a forked child as user and group OTHER_ID; its warnings, or its error, as one string."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child runs filesystem calls only, then leaves without running the parent's exit handlers
        try:
            os.setgroups([])
            os.setgid(OTHER_ID)
            os.setuid(OTHER_ID)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                action()
            message = "saved|" + "|".join(str(warning.message) for warning in caught)
        except BaseException as error:  # noqa: BLE001 - handed to the parent, which asserts on it
            message = f"{type(error).__name__}|{error}"
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        text = pipe.read().decode()
    os.waitpid(pid, 0)
    return text


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to act as two users")
def test_a_user_resaving_a_folder_that_holds_another_users_entries_is_told_what_cannot_be_kept():
    """Another user's private folder in the adapter folder failed the save on a bare PermissionError; their readable
    files, which Linux's protected_hardlinks keeps from being linked, silently became copies the saver owns."""
    base = Path(tempfile.mkdtemp(dir="/tmp"))  # tmp_path lies under root's private folders, which OTHER_ID cannot enter
    try:
        target = base / "task"
        private = target / "private"
        private.mkdir(parents=True)
        os.chmod(private, 0o700)
        (target / "adapter.txt").write_text("old")
        (target / "notes.txt").write_text("root's")
        for path in (base, target, target / "adapter.txt"):
            os.chown(path, OTHER_ID, OTHER_ID)

        def save():
            with storage.atomic_directory(target) as staged:
                (staged / "adapter.txt").write_text("new")

        refused = _as_other_user(save)
        assert refused.startswith("PermissionError|")
        assert f"{private}, kept in it, cannot be read by this user" in refused
        assert "move it out of" in refused and (target / "adapter.txt").read_text() == "old"
        assert sorted(p.name for p in base.iterdir()) == [".task.lock", "task"]  # no staged folder left
        shutil.rmtree(private)
        saved = _as_other_user(save)
        assert saved.startswith("saved|") and (target / "adapter.txt").read_text() == "new"
        assert (target / "notes.txt").read_text() == "root's"
        copied = os.stat(target / "notes.txt").st_uid != 0  # protected_hardlinks=1 (the default) refuses the link
        assert ("notes.txt): they are copies now, owned by you" in saved) == copied, saved
    finally:
        shutil.rmtree(base)


def _other_group():
    """A group this process may give its files other than its own: any for root, else a supplementary one."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return OTHER_ID
    others = [group for group in os.getgroups() if group != os.getegid()] if hasattr(os, "getgroups") else []
    return others[0] if others else None


def test_a_replaced_file_keeps_its_mode_group_and_attributes_and_a_new_file_gets_the_default_mode(tmp_path):
    private = tmp_path / "results.md"
    private.write_text("old")
    os.chmod(private, 0o600)  # the user made it private: a new version must not become world-readable
    group = _other_group()
    if group is not None:
        os.chown(private, -1, group)
    xattrs = hasattr(os, "setxattr")
    if xattrs:
        os.setxattr(private, "user.note", b"mine")  # what cp -p keeps, and where Linux holds POSIX ACLs
    os.utime(private, (1_000_000, 1_000_000))
    storage.write_text_atomic(private, "new")
    info = private.stat()
    assert private.read_text() == "new" and stat_mode(info) == 0o600 and info.st_mtime > 1_000_000
    assert group is None or info.st_gid == group
    assert not xattrs or os.getxattr(private, "user.note") == b"mine"
    fresh = storage.write_text_atomic(tmp_path / "fresh.md", "x")
    assert stat_mode(fresh.stat()) == 0o644


def test_the_files_of_an_adapter_saved_again_keep_their_mode(tmp_path):
    # the user made the adapter's files private: each save again gave them the umask's 0644, world-readable
    target = saved_adapter(tmp_path / "adapter", seed=1)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        os.chmod(target / name, 0o600)
    nv.save_adapter(trained(2), target)
    assert {stat_mode((target / name).stat()) for name in (CONFIG_NAME, WEIGHTS_NAME)} == {0o600}
    assert nv.load_adapter(tiny_vit(), target) is not None
    fresh = nv.save_adapter(trained(3), tmp_path / "fresh")  # a new adapter: the umask's mode
    assert {stat_mode((fresh / name).stat()) for name in (CONFIG_NAME, WEIGHTS_NAME)} == {0o644}
    # a copy links the source's files in: given the mode of the copy it replaced, the source's went with them
    storage.copy_directory(target, fresh)
    assert {stat_mode((path / name).stat()) for path in (target, fresh) for name in (CONFIG_NAME, WEIGHTS_NAME)} \
        == {0o600}


@pytest.mark.skipif(not hasattr(os, "setxattr"), reason="extended attributes are a Linux call here")
def test_a_saved_adapter_directory_keeps_its_extended_attributes(tmp_path):
    target = saved_adapter(tmp_path / "adapter", seed=1)
    os.setxattr(target, "user.project", b"shared")  # e.g. a default ACL that new files inherit
    nv.save_adapter(trained(2), target)
    assert os.getxattr(target, "user.project") == b"shared"


def test_a_replaced_file_whose_attributes_cannot_be_read_is_still_replaced_keeping_its_mode(tmp_path, monkeypatch):
    # Another user's private file with a user.* attribute: reading the attribute needs read permission, so copystat
    # failed and the save with it, where it had worked before attributes were copied.
    target = tmp_path / "results.md"
    target.write_text("old")
    os.chmod(target, 0o640)

    def unreadable(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(shutil, "copystat", unreadable)
    storage.write_text_atomic(target, "new")
    assert target.read_text() == "new" and stat_mode(target.stat()) == 0o640


@pytest.mark.parametrize("umask, expected", [(0o077, 0o600), (0o002, 0o664), (0o022, 0o644)])
def test_a_new_file_gets_the_mode_the_umask_gives(tmp_path, umask, expected):
    # a fixed 0644 made a private run's checkpoints world-readable (umask 077) and a shared group's read-only (002)
    before = os.umask(umask)
    try:
        fresh = storage.write_bytes_atomic(tmp_path / "last.ckpt", b"x")
    finally:
        os.umask(before)
    assert stat_mode(fresh.stat()) == expected


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_save_where_links_are_refused_keeps_a_named_pipe_and_a_socket_in_the_folder(tmp_path, monkeypatch):
    """Where hard links are refused, the save copies each entry into the new set: shutil's copy failed on a named
    pipe (SpecialFileError, nothing saved). A pipe or socket holds no data, so the save makes a new one like it."""
    import socket

    target = saved_adapter(tmp_path / "adapter", seed=1)
    os.mkfifo(target / "progress.fifo", 0o640)
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(target / "serve.sock"))

    def refuse_links(*args, **kwargs):
        raise PermissionError(errno.EPERM, "links refused")

    monkeypatch.setattr(os, "link", refuse_links)
    nv.save_adapter(trained(2), target)
    assert nv.load_adapter(trained(5), target) is not None
    assert os.path.getsize(target / WEIGHTS_NAME) > 0
    info = os.stat(target / "progress.fifo")
    assert info.st_mode & 0o7777 == 0o640 and os.path.exists(target / "serve.sock")
    assert [os.path.isfile(target / name) for name in ("progress.fifo", "serve.sock")] == [False, False]


def test_a_special_file_the_save_cannot_re_create_fails_it_with_what_to_do(tmp_path, monkeypatch):
    """A device node in a folder where links are refused cannot be re-created without privileges: the save says which
    entry stops it and what to do, and the adapter saved before stays whole."""
    target = saved_adapter(tmp_path / "adapter", seed=1)
    before = (target / WEIGHTS_NAME).read_bytes()
    os.symlink("/dev/null", target / "sink")  # stands in for the node: os.stat(follow_symlinks=False) is patched below
    real_stat = os.stat

    def node_stat(path, *args, **kwargs):
        info = real_stat(path, *args, **kwargs)
        if str(path).endswith("sink") and not kwargs.get("follow_symlinks", True):
            return os.stat_result((0o20666,) + tuple(info)[1:])  # a character device
        return info

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EPERM, "not permitted")

    monkeypatch.setattr(os, "link", refuse)
    monkeypatch.setattr(os, "mknod", refuse)
    monkeypatch.setattr(os, "stat", node_stat)
    refusal = r"sink is a character device, which this file system refuses to hard-link.*Move it out.*intact"
    with pytest.raises(OSError, match=refusal):
        nv.save_adapter(trained(2), target)
    monkeypatch.undo()
    assert (target / WEIGHTS_NAME).read_bytes() == before


def test_a_folder_its_file_system_will_not_move_fails_the_save_with_the_way_out(tmp_path, monkeypatch):
    """overlayfs without redirect_dir refuses to rename a folder of an image's lower layer (EXDEV): the save said to
    check for a failing disk. It now names the cause and a way out, and the adapter saved before stays whole."""
    target = saved_adapter(tmp_path / "adapter", seed=1)
    before = (target / WEIGHTS_NAME).read_bytes()
    real_rename = os.rename

    def lower_layer_rename(source, destination, *args, **kwargs):
        if Path(source) == target:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(source), None, str(destination))
        return real_rename(source, destination, *args, **kwargs)

    monkeypatch.setattr(storage, "_exchange", lambda first, second: False)
    monkeypatch.setattr(os, "rename", lower_layer_rename)
    with pytest.raises(OSError, match=r"overlayfs .* redirect_dir on\. Nothing in .* was changed.*mv .*adapter\.moved"):
        nv.save_adapter(trained(2), target)
    monkeypatch.undo()
    assert (target / WEIGHTS_NAME).read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [".adapter.lock", "adapter"]


def _open_descriptors() -> set:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir() or not hasattr(signal, "setitimer"),
                    reason="counts descriptors in /proc and times a real SIGINT")
def test_a_ctrl_c_at_any_moment_of_a_single_file_write_leaves_no_descriptor_nor_temporary(tmp_path):
    # a Ctrl-C while the temporary was made, between its rename and its clean-up, or inside an fsync left descriptors
    # open (332 over 3000 writes of a checkpoint: on deleted files, holding their disk space) and hidden .tmp files
    # their own leaked locks kept any later write from removing
    import random

    target, data = tmp_path / "last.ckpt", b"x" * (256 << 10)
    storage.write_bytes_atomic(target, data)
    start = time.perf_counter()
    storage.write_bytes_atomic(target, data)
    duration = time.perf_counter() - start
    armed = [False]

    def ctrl_c(*_):
        if armed[0]:
            armed[0] = False
            os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGALRM, ctrl_c)
    before, draw, interrupted = _open_descriptors(), random.Random(0), 0
    try:
        for _ in range(400):
            try:  # one SIGINT at most per write (the handler disarms itself), wherever it lands
                armed[0] = True
                signal.setitimer(signal.ITIMER_REAL, draw.uniform(1e-6, duration))
                storage.write_bytes_atomic(target, data)
                armed[0] = False
            except KeyboardInterrupt:
                interrupted += 1
            signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert interrupted > 100
    assert _open_descriptors() == before and not storage._LOCK_FDS
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"] and target.read_bytes() == data


def test_a_failed_stat_of_the_new_temporary_leaves_no_descriptor_nor_file(tmp_path, monkeypatch):
    # an ESTALE or EIO from the stat that checks the locked temporary (a network mount) left both behind, for good
    def stale(name, fd):
        raise OSError(errno.ESTALE, os.strerror(errno.ESTALE), name)

    monkeypatch.setattr(storage, "_names_open_file", stale)
    before = _open_descriptors()
    for _ in range(5):
        with pytest.raises(OSError):
            storage.write_bytes_atomic(tmp_path / "result.json", b"{}")
    assert _open_descriptors() == before and not storage._LOCK_FDS and not list(tmp_path.iterdir())
