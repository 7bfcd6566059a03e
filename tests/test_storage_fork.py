"""Locks across a fork, and saves that take no turns with a save of the folder above them."""
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from nola_vision.core import storage

fcntl = pytest.importorskip("fcntl")
FORK = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None
pytestmark = pytest.mark.skipif(FORK is None or not hasattr(os, "register_at_fork"), reason="needs fork")


def _free(lock: Path) -> bool:
    """Whether nobody holds ``lock``: an exclusive lock on a descriptor of its own is granted at once."""
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _save_and_report(target: str, done: str) -> None:
    with storage.atomic_directory(target) as staged:
        (staged / "child.txt").write_text("child")
    Path(done).touch()


@pytest.mark.parametrize("kind", ["writer", "ancestor", "temporary"])
def test_a_child_forked_while_a_lock_is_held_holds_none_of_it(kind, tmp_path):
    # a DataLoader worker forked while a thread saved kept a copy of the lock's descriptor, and with it the lock, for
    # as long as it lived: the next save waited on it, and a child saving that folder itself waited for ever
    target = tmp_path / "adapter"
    with storage.atomic_directory(target) as staged:  # a saved directory: its lock file exists
        (staged / "a.txt").write_text("a")
    done = tmp_path / "done"
    if kind == "writer":
        holding, lock = storage.writer_lock(target), tmp_path / ".adapter.lock"
    elif kind == "ancestor":
        holding, lock = storage.atomic_directory(target / "inner"), tmp_path / ".adapter.lock"
    else:  # the temporary file, locked while its writer runs, then renamed to file.txt
        holding, lock = storage.atomic_path(tmp_path / "file.txt"), tmp_path / "file.txt"
    with holding as held:
        sleeper = FORK.Process(target=time.sleep, args=(30,))
        saver = FORK.Process(target=_save_and_report, args=(str(target), str(done)))
        sleeper.start()
        saver.start()
        if kind == "temporary":
            Path(held).write_text("parent")
    try:
        saver.join(timeout=60)
        assert done.exists(), "the child's save of the folder waited on a lock it inherited"
        assert _free(lock)  # while the sleeping child lives
        assert (target / "child.txt").read_text() == "child"
        if kind == "temporary":
            assert (tmp_path / "file.txt").read_text() == "parent"
    finally:
        for process in (sleeper, saver):
            process.kill()
            process.join()


def test_an_entry_replaced_after_a_save_of_its_folder_linked_it_is_kept_not_the_linked_one(tmp_path):
    # a save into P/sub that took no turns with P's first save (P had no lock file yet) swapped in its new set after
    # P's save had linked the old one: P's swap then put back the old sub, and the new one went with the old set
    parent = tmp_path / "P"
    (parent / "sub").mkdir(parents=True)
    (parent / "sub" / "task.txt").write_text("old")
    (parent / "user.txt").write_text("user")

    def save_sub_meanwhile() -> None:  # as such a save does: a new set renamed over the old one
        new = parent / ".sub.new"
        new.mkdir()
        (new / "task.txt").write_text("new")
        os.rename(parent / "sub", parent / ".sub.gone")
        os.rename(new, parent / "sub")

    with storage.atomic_directory(parent, check=save_sub_meanwhile) as staged:
        (staged / "adapter.txt").write_text("adapter")
    assert (parent / "sub" / "task.txt").read_text() == "new"
    assert sorted(os.listdir(parent)) == [".sub.gone", "adapter.txt", "sub", "user.txt"]


def test_a_folder_deleted_while_its_path_is_checked_is_not_named_a_file_in_the_way(tmp_path, monkeypatch):
    # exists() and then isdir() on a folder another process deleted between them named it "an existing file"
    folder = tmp_path / "par"
    folder.mkdir()
    monkeypatch.setattr(os.path, "isdir", lambda path: False)  # the folder gone between the two looks
    assert storage.file_in_the_way(folder / "a") is None
    monkeypatch.undo()
    (tmp_path / "file").write_text("x")
    assert storage.file_in_the_way(tmp_path / "file" / "a") == tmp_path / "file"


def test_a_lock_file_opened_from_within_the_opening_of_another_in_one_thread_does_not_wait_for_itself(tmp_path):
    # a signal handler that saves runs in the thread it interrupted, which may be inside _open_lock_file: a plain lock
    # there made such a handler (a save on SIGTERM, Lightning's SIGUSR1 checkpoint) wait for ever
    import threading

    inner = tmp_path / "inner.lock"

    def open_inside() -> int:
        fd = storage._open_lock_file(lambda: os.open(inner, os.O_RDONLY | os.O_CREAT, 0o644))
        storage._close_lock_file(fd)
        return os.open(tmp_path / "outer.lock", os.O_RDONLY | os.O_CREAT, 0o644)

    opened = []
    worker = threading.Thread(target=lambda: opened.append(storage._open_lock_file(open_inside)), daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert opened, "the nested opening waited for the outer one, in the same thread"
    storage._close_lock_file(opened[0])


def test_a_running_save_s_staged_set_inside_a_folder_moves_into_its_new_set_with_what_it_wrote_later(tmp_path):
    # the staged set of a save of P/sub (which took no turns with P's first save) was linked into P's new set as a
    # copy; what that save wrote into it afterwards, by path, went into the old copy, and its swap published a mix
    parent = tmp_path / "P"
    staged_sub = parent / ".sub.staged-0123456789ab"
    staged_sub.mkdir(parents=True)
    (staged_sub / "weights.txt").write_text("v2")

    def write_later() -> None:  # after P's entries were linked, before its swap
        (staged_sub / "config.txt").write_text("v2")

    with storage.atomic_directory(parent, check=write_later) as staged:
        (staged / "adapter.txt").write_text("adapter")
    assert sorted(os.listdir(staged_sub)) == ["config.txt", "weights.txt"]


def test_an_entry_replaced_again_in_the_new_set_after_the_swap_is_not_put_back(tmp_path, monkeypatch):
    # a file saved editor-style (a temporary renamed over it) after the links were made and again just after the swap:
    # the carry-over put the first edit over the second
    parent = tmp_path / "P"
    parent.mkdir()
    (parent / "notes.txt").write_text("v0")

    def editor_save(text: str) -> None:
        (parent / ".notes.tmp").write_text(text)
        os.rename(parent / ".notes.tmp", parent / "notes.txt")

    swapped = storage._refuse_swapped_out_non_directory

    def then_edit_again(old, target):
        swapped(old, target)
        editor_save("v2")

    monkeypatch.setattr(storage, "_refuse_swapped_out_non_directory", then_edit_again)
    with storage.atomic_directory(parent, check=lambda: editor_save("v1")) as staged:
        (staged / "adapter.txt").write_text("adapter")
    assert (parent / "notes.txt").read_text() == "v2"
