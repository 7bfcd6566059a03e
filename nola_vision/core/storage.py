"""Atomic file writes: readers see the old or the new content, never half of it, and failures leave no temp files.

One file is written to a temporary sibling and renamed over the target. A set of files that must stay consistent
(an adapter's config and weights, a peft export) is written by ``atomic_directory``: the one routine for every
directory the library writes, whose docstring says what writers, readers and killed saves see.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import itertools
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack, contextmanager, suppress
from functools import cache, partial
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, FrozenSet, Iterator, List, Optional, Sequence, Set, Tuple, Union

from .interrupts import interrupts_deferred
from .warn import warn_user

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = ["NOT_ALLOWED", "FileTooLargeError", "NotARegularFileError", "atomic_directory", "atomic_path",
           "check_writable_file", "check_writer_lock", "copy_directory", "file_in_the_way", "file_sha256",
           "nearest_folder", "out_of_room_hint", "previous_path", "protected", "read_file", "read_files",
           "resolve_directory_target", "set_aside_copy", "spreadsheet_safe", "try_lock", "write_bytes_atomic",
           "write_json_atomic", "write_set_atomic", "write_text_atomic", "writer_lock"]

PathLike = Union[str, "os.PathLike[str]"]
# The first characters by which a spreadsheet (Excel, LibreOffice, Google Sheets) reads a CSV cell as a formula.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_READ_ATTEMPTS = 8  # a reader re-reads only when a save swapped the directory under it; 8 saves in a row is plenty
_AT_FDCWD, _RENAME_EXCHANGE, _RENAME_SWAP = -100, 2, 2  # from <fcntl.h>, <linux/fs.h> and macOS <stdio.h>
# Why a write can fail for want of room, and what frees it, by errno: a save then says so instead of a bare OSError.
_NO_ROOM = {
    errno.ENOSPC: ("no space is left on its filesystem",
                   "Free space (or inodes, df -i) there, or save to another filesystem"),
    errno.EDQUOT: ("the disk quota is used up", "Free space within the quota, or save elsewhere"),
    errno.EFBIG: ("a file would exceed the file size limit (ulimit -f) or the filesystem's largest file",
                  "Raise the limit (e.g. ulimit -f unlimited), or save to another filesystem"),
}


# A directory fsync that the file system does not offer (vboxsf, some FUSE, 9p and CIFS mounts) or this process may
# not do: the rename before it has happened, so the write stands; only its durability after a crash is not promised.
_NO_DIRECTORY_SYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EACCES, errno.EPERM,
                      errno.EISDIR, errno.EROFS}


def out_of_room_hint(error: OSError) -> Optional[str]:
    """For a write that failed for want of room (a full disk, a quota, a file size limit): its cause and fix."""
    if error.errno not in _NO_ROOM:
        return None
    cause, fix = _NO_ROOM[error.errno]
    return f"{cause}. {fix}"


def check_writable_file(path: PathLike, what: str) -> None:
    """Refuse, with a ValueError that starts with ``what`` and names the fix, a file that a write at the end of a run
    could not create: a directory, a path under a file or through a symlink into a missing folder, a name over the
    file system's limit, or a place this process may not write (the run would otherwise lose its output)."""
    try:
        target = _file_target(path)  # where the write goes: atomic writes follow symlinks
    except OSError as error:  # its own text, without the errno and path that str() adds
        raise ValueError(f"{what}: {error.strerror if error.errno is not None else error}") from None
    folder = nearest_folder(target)  # where the write makes its first entry (_file_target refused a file above)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: this process may not create files in {folder} (its permissions, or a read-only "
                         "file system): choose another path, or make that folder writable")
    _try_creating_in(folder, what, file=folder == target.parent)


def _try_creating_in(folder: Path, what: str, file: bool) -> None:
    """Create and remove in ``folder`` what the write will (a ``file``, else the folders above it): ``os.access`` says
    yes to root where the file system still refuses (``/proc``, a read-only mount, NFS's root squash), and the run's
    output was then lost after its pass."""
    try:
        if file:
            fd, made = tempfile.mkstemp(prefix=".nv-check-", dir=folder)
            os.close(fd)
        else:
            made = tempfile.mkdtemp(prefix=".nv-check-", dir=folder)
    except OSError as error:
        raise ValueError(f"{what}: {'files' if file else 'folders'} cannot be created in {folder} "
                         f"({error.strerror or error}): choose another path") from None
    try:
        (os.unlink if file else os.rmdir)(made)
    except OSError as error:  # an atomic write replaces its temporary by renaming it, which needs the same right
        raise ValueError(f"{what}: entries made in {folder} cannot be removed or replaced ({error.strerror or error}; "
                         f"{made} is left there): choose another path") from None


def _name_too_long(target: Path, folder: Path) -> Optional[str]:
    """Which name of ``target`` below its existing ``folder`` is longer than that file system takes, or None."""
    limit = _name_limit(folder)
    long = next((n for n in target.relative_to(folder).parts if _name_length(n) > limit), None)
    if long is None:
        return None
    unit = "bytes" if os.name == "posix" else "characters"
    return (f"the name {long[:20]}... is {_name_length(long)} {unit} long, over the {limit} {unit} a file name may "
            f"have on the file system of {folder}: choose a shorter name")


def _path_too_long(target: Path, names: Sequence[str] = ()) -> Optional[str]:
    """Why a save of the directory ``target`` cannot make the longest path it writes (its staged copy beside it, with
    ``names`` inside, or its lock file), where that is longer than the system takes; else None."""
    folder = nearest_folder(target)
    limit = _path_limit(folder) if folder is not None else None
    if limit is None:
        return None
    token = "0" * 2 * _TOKEN_BYTES
    staged = _sibling(target, "staged", token)
    longest = max([_lock_path(target), staged, *(staged / name for name in names)], key=_path_length)
    over = _path_length(longest) - limit
    if over <= 0:
        return None
    shown, amount = str(longest.relative_to(target.parent)).replace(token, "<random>"), f"{over} byte{'s' * (over > 1)}"
    return (f"its path is {amount} too long: while it runs, a save writes {shown} beside it, a path of "
            f"{_path_length(longest)} bytes, over the {limit} this system takes. Choose a path at least {amount} "
            "shorter (fewer or shorter folder names)")


def _path_limit(folder: Path) -> Optional[int]:
    """The longest path ``folder``'s system takes, in bytes (``PATH_MAX`` less the final NUL it counts), or None where
    it does not say (Windows has no ``pathconf``)."""
    try:
        return os.pathconf(folder, "PC_PATH_MAX") - 1
    except (AttributeError, OSError, ValueError):
        return None


def _path_length(path: PathLike) -> int:
    """A path's length as the system's path limit counts it: bytes."""
    return len(os.fsencode(path))


def _ends_in_separator(text: str) -> bool:
    """Whether a path names a directory by its form (``out/``), whatever exists there."""
    return text.endswith(tuple(sep for sep in (os.sep, os.altsep) if sep))


def _name_limit(folder: Path) -> int:
    """The longest file name ``folder``'s file system takes, in ``_name_length`` units (255 where it does not say:
    Windows has no ``pathconf``, and NTFS takes 255 UTF-16 units; none where it reports no limit, -1, or 0 as some
    FUSE mounts do: every name would be refused)."""
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):
        return 255
    return limit if limit > 0 else sys.maxsize


def _name_length(name: str) -> int:
    """A file name's length as its file system counts it: bytes on POSIX, UTF-16 units on Windows."""
    return len(os.fsencode(name)) if os.name == "posix" else len(name.encode("utf-16-le")) // 2


_TEMPORARY_MARK = "nv-"  # in atomic_path's temporary names, so that stale ones are told from a user's files


@contextmanager
def atomic_path(path: PathLike, mode: Optional[int] = None,
                check: Optional[Callable[[], None]] = None, follow_links: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds, rename it onto ``path``.

    On any failure the temporary file is removed and ``path`` keeps its old content. A symlink is written through (its
    target gets the new content; the link stays), or with ``follow_links=False`` replaced by the new file, as Lightning
    writes a checkpoint (a ``last.ckpt`` linked to the best one must not overwrite it). A path ending in a separator, an
    existing directory or a path under a file is refused before the block runs, with an OSError naming the fix. The
    temporary file, ``.<name>.nv-<8 characters>.tmp``, is locked (``fcntl.flock``) while its writer runs: those of
    killed writers of the same path, which nothing locks, are removed first, with any folder they staged beside them
    (``<temporary name>.<8 characters>``, removed by a live writer before its file). The new file is fsynced before the
    rename and its folder after it, so a power loss keeps the old or the new content; a full disk or file size limit
    raises an OSError (same errno) that says so. A new file gets ``mode`` (default: 0666 less the process's umask, as
    ``open`` would give it: a private umask keeps checkpoints private); a replaced one keeps its mode, its extended
    attributes (POSIX ACLs), its group (where this user may set it) and, for root, its owner, as ``cp -p`` would, so a
    file of a shared folder stays shared and a private one private.
    ``check``, when given, runs just before the rename: it raises to refuse replacing what appeared at ``path`` since
    the caller's own checks (a user's file of that name, hours into a run), and ``path`` then stays as it is.
    A file with no write bit for anyone is refused before the block runs (a PermissionError naming the fix).
    """
    target = _file_target(path, follow_links)
    unchanged = f"{target} was not changed: its previous content, if any, is intact."
    tmp: Optional[Path] = None
    fd: Optional[int] = None
    try:
        with _explained_write_failure(target, unchanged):  # a disk out of inodes fails here, at the first new entry
            target.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_temporaries(target)
            # a Ctrl-C while the temporary was made, or before its clean-up was in place, left its descriptor open
            # (holding the lock, so no later write removed the file) and the file behind
            with interrupts_deferred():
                tmp, fd = _locked_temporary(target)
        with _explained_write_failure(target, unchanged):
            yield tmp
        # put in place and cleaned up as one step: a Ctrl-C between the two left the descriptor open
        with interrupts_deferred():
            try:
                with _explained_write_failure(target, unchanged):
                    replaced = None if os.path.islink(target) else _stat_or_none(target)  # a link: a new file
                    if replaced is None:
                        os.chmod(tmp, _new_file_mode() if mode is None else mode)  # mkstemp makes 0600
                    else:
                        _copy_access(target, replaced, tmp)
                    _fsync_file(tmp)
                if check is not None:
                    check()
                with _explained_write_failure(target, unchanged):  # a rename too can fail for want of room
                    os.replace(tmp, target)
                _flush_saved(target)
            finally:
                _release_temporary(tmp, fd)
                tmp = fd = None
    finally:  # the block or the set-up failed
        with interrupts_deferred():
            _release_temporary(tmp, fd)


def _release_temporary(tmp: Optional[Path], fd: Optional[int]) -> None:
    """Remove ``atomic_path``'s temporary file (gone already once renamed) and close its lock's descriptor."""
    if tmp is not None:
        tmp.unlink(missing_ok=True)
    if fd is not None:
        _close_lock_file(fd)  # releases the lock, after the file has left the temporary name


def _new_file_mode() -> int:
    """0666 less the process's umask: the mode ``open`` gives a new file. Read from /proc where it is there, since
    setting the umask to read it back would change it for the process's other threads meanwhile."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def _file_target(path: PathLike, follow_links: bool = True) -> Path:
    """The real file a write to ``path`` replaces (symlinks resolved; a symlink ``path`` itself only when
    ``follow_links``), or an OSError naming the fix, before anything is written, for a path ending in a separator, a
    loop of symbolic links, a name longer than its file system takes, an existing directory, a write-protected file,
    or a path under an existing file."""
    text = os.fspath(path)
    if _ends_in_separator(text):
        raise IsADirectoryError(f"{text} ends in a path separator, so it names a directory, but a file is written "
                                f"there: pass a file path (e.g. {Path(text) / 'name'}, or {Path(text)})")
    if not follow_links and os.path.islink(text):  # the link goes, whatever it pointed at: none of it is written
        absolute = os.path.abspath(text)
        return Path(os.path.realpath(os.path.dirname(absolute))) / os.path.basename(absolute)
    try:
        os.stat(text)
    except OSError as error:  # realpath leaves a loop as it is: the link itself would be replaced by a file
        if error.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, f"{text} leads into a loop of symbolic links, which no write can go through: "
                                       "remove or fix the link (nothing was written)") from error
    missing = _missing_before_parent_step(text)
    if missing is not None:  # realpath drops "missing/.." as text; reading the path back would fail there
        raise FileNotFoundError(_unreadable_back(text, missing, "file"))
    target = Path(os.path.realpath(text))
    folder = nearest_folder(target)
    too_long = _name_too_long(target, folder) if folder is not None else None
    if too_long is not None:  # else found only at the final rename, after the whole content was written
        raise OSError(errno.ENAMETOOLONG, f"{too_long} (nothing was written)", text)
    if os.path.islink(text) and not os.path.isdir(target.parent):
        raise FileNotFoundError(f"{text} is a symlink to {os.readlink(text)}, whose folder does not exist: create "
                                "that folder, or remove the link to write a plain file there")
    if os.path.isdir(target):  # os.path's: False, not an OSError, for a name over the file system's limit
        raise IsADirectoryError(f"{text} is an existing directory, but a file is written there: remove it, or choose "
                                "another file path (the directory was left untouched)")
    protected = _protected_file_message(target, "a write")
    if protected is not None:
        raise PermissionError(errno.EACCES, protected, text)
    kind = _special_file_kind(target)
    if kind is not None:  # the write renames a new file over it: /dev/null itself became a file
        raise OSError(errno.EINVAL, f"{text} is a {kind}, not a regular file: a write here puts a new file in its "
                                    "place, which would replace it. Choose a regular file path (nothing was written)",
                      text)
    blocking = file_in_the_way(target.parent)
    if blocking is not None:
        raise NotADirectoryError(f"{text} lies under {blocking}, an existing file, so no file can be written there: "
                                 "choose another path (the file was left untouched)")
    return target


def _protected_file_message(path: Path, writer: str) -> Optional[str]:
    """Why ``writer`` must not replace ``path``, a regular file with no write bit for anyone (``chmod a-w``, or
    Windows' read-only attribute): a deliberate "do not overwrite", which a rename over it would undo without ever
    opening it, for root too. None for any other path."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode):
        return None
    if _immutable(path, info):
        return _immutable_message(path, writer)
    if info.st_mode & 0o222:
        return None
    return (f"{path} is write-protected (mode {stat.S_IMODE(info.st_mode):04o}), and {writer} would replace it: make "
            f"it writable (e.g. chmod u+w {path}) to replace it, or choose another path (it was left untouched)")


_FS_IOC_GETFLAGS, _FS_IMMUTABLE_OR_APPEND = 0x80086601, 0x10 | 0x20  # Linux's inode flags (chattr +i, +a)


def _immutable(path: Path, info: os.stat_result) -> bool:
    """Whether ``path`` is flagged immutable or append-only (Linux's ``chattr +i``/``+a``, BSD's and macOS's
    ``chflags uchg``/``sappnd``): a deliberate "do not change", for root too, which a save that swaps the folder
    around the file would step past (the file left in a folder set aside that no save can remove)."""
    flags = getattr(info, "st_flags", None)
    if flags is not None:
        return bool(flags & (stat.UF_IMMUTABLE | stat.SF_IMMUTABLE | stat.UF_APPEND | stat.SF_APPEND))
    if fcntl is None or not sys.platform.startswith("linux"):
        return False
    with interrupts_deferred():  # a Ctrl-C between the open and the close left the descriptor open
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return False
        try:
            raw = fcntl.ioctl(fd, _FS_IOC_GETFLAGS, bytes(8))
        except OSError:  # a file system without such flags (tmpfs, NFS)
            return False
        finally:
            os.close(fd)
    return bool(int.from_bytes(raw[:4], sys.byteorder) & _FS_IMMUTABLE_OR_APPEND)


def _flagged_entry(folder: Path) -> Optional[Path]:
    """The first entry under ``folder`` (symlinks not followed) flagged immutable or append-only (``_immutable``)."""
    for parent, folders, files in os.walk(folder):
        for name in [*folders, *files]:
            path = Path(parent) / name
            try:
                info = os.lstat(path)
            except OSError:
                continue
            if not stat.S_ISLNK(info.st_mode) and _immutable(path, info):
                return path
    return None


def _immutable_message(path: Path, writer: str) -> str:
    return (f"{path} is flagged immutable or append-only (chattr +i or +a; chflags uchg on macOS), and {writer} would "
            f"replace it: remove the flag (chattr -i -a {path}, as root) to replace it, or choose another path (it was "
            "left untouched)")


def _special_file_kind(path: PathLike) -> Optional[str]:
    """What an existing ``path`` is when it is neither a regular file nor a directory (a device, a FIFO, a socket), or
    None."""
    try:
        return _special_kind(os.stat(path).st_mode)
    except OSError:
        return None


def _special_kind(mode: int) -> Optional[str]:
    """The kind of special file (a device, a FIFO, a socket) a file ``mode`` gives, or None."""
    kinds = ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "named pipe (FIFO)"),
             (stat.S_ISSOCK, "socket"))
    return next((name for test, name in kinds if test(mode)), None)


def _locked_temporary(target: Path) -> Tuple[Path, Optional[int]]:
    """A new temporary sibling of ``target``, with its descriptor holding the lock (None on Windows: no flock, and an
    open file could not be renamed there; nor where nothing can be locked, NFS without a lock daemon: no other writer
    can lock it either, so none removes it as stale)."""
    while True:
        prefix = f".{_sibling_stem(target)}.{_TEMPORARY_MARK}"
        fd, name = _open_lock_file(partial(tempfile.mkstemp, dir=target.parent, prefix=prefix, suffix=".tmp"),
                                   lambda opened: opened[0])
        if fcntl is None:
            _close_lock_file(fd)
            return Path(name), None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as error:
                if error.errno != errno.ENOLCK:
                    raise
                _close_lock_file(fd)
                return Path(name), None
            if _names_open_file(name, fd):  # its stat may fail too (ESTALE, EIO on a network mount)
                return Path(name), fd
        except BaseException:  # neither the descriptor nor the file may outlive a failed write
            _close_lock_file(fd)
            with suppress(OSError):
                os.unlink(name)
            raise
        _close_lock_file(fd)  # another write removed it as stale before it was locked: take a new one


def _remove_stale_temporaries(target: Path) -> None:
    """Remove ``target``'s temporary files that no live writer locks: a killed writer's lock went with it.

    Windows has no flock, so a live writer's file could not be told apart: there nothing is removed.
    """
    if fcntl is None:
        return
    # Only names this function makes (tempfile.mkstemp's 8 characters after the mark): never a user's own file.
    pattern = re.compile(rf"\.{re.escape(_sibling_stem(target))}\.{_TEMPORARY_MARK}[a-z0-9_]{{8}}\.tmp")
    with os.scandir(target.parent) as entries:
        stale, companions = [], []
        for entry in entries:
            if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                stale.append(entry.path)
            elif _is_companion(entry, pattern):
                companions.append(entry.path)
    for name in stale:
        with interrupts_deferred():  # a Ctrl-C before the close left it open, and locked: never taken for stale again
            try:
                fd = os.open(name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            except OSError:  # renamed or removed meanwhile
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if _names_open_file(name, fd):
                    os.unlink(name)
            except OSError:  # locked by a live writer (or gone meanwhile): not stale
                pass
            finally:
                os.close(fd)
    for folder in companions:  # a live writer's temporary file outlives its folder: one without it is a killed one's
        if not os.path.lexists(folder.rpartition(".")[0]):
            shutil.rmtree(folder, ignore_errors=True)


def _is_companion(entry: os.DirEntry, pattern: re.Pattern) -> bool:
    """Whether ``entry`` is a folder a writer staged beside its temporary file ``<tmp>``, named
    ``<tmp>.<8 characters>`` (``tempfile.mkdtemp(dir=..., prefix=f"{tmp.name}.")``), e.g. an ONNX export's."""
    stem, dot, suffix = entry.name.rpartition(".")
    return (bool(dot) and re.fullmatch(r"[a-z0-9_]{8}", suffix) is not None and pattern.fullmatch(stem) is not None
            and entry.is_dir(follow_symlinks=False))


def _names_open_file(name: str, fd: int) -> bool:
    """Whether ``name`` is still the file open as ``fd`` (not removed, nor replaced by another file)."""
    try:
        now = os.stat(name, follow_symlinks=False)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino)


def write_bytes_atomic(path: PathLike, data: bytes, check: Optional[Callable[[], None]] = None,
                       follow_links: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (``check`` and ``follow_links`` as ``atomic_path``'s); returns the path."""
    with atomic_path(path, check=check, follow_links=follow_links) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def spreadsheet_safe(cell: Any) -> Any:
    """A CSV cell as text that a spreadsheet shows instead of running: a string that starts as a formula does (``=``,
    ``+``, ``-``, ``@``, a tab or carriage return: a class folder named ``=HYPERLINK(...)``) gets a leading ``'``, as
    OWASP advises for CSV files; numbers and other strings as they are."""
    return "'" + cell if isinstance(cell, str) and cell.startswith(_FORMULA_STARTS) else cell


def write_text_atomic(path: PathLike, text: str, check: Optional[Callable[[], None]] = None) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path. A file name that is not UTF-8 (held in a str
    as surrogate escapes, as Python decodes it) is written as its original bytes, so it reads back as the same str."""
    return write_bytes_atomic(path, text.encode("utf-8", "surrogateescape"), check)


def write_json_atomic(path: PathLike, obj: Any, indent: int = 1, sort_keys: bool = True,
                      check: Optional[Callable[[], None]] = None) -> Path:
    """Write ``obj`` as JSON (plus a final newline) to ``path`` atomically; returns the path."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n", check)


def write_set_atomic(files: Sequence[Tuple[PathLike, str, Optional[Callable[[], None]]]]) -> None:
    """Write ``(path, text, check)`` files that belong together (a table and its summary, a choice as JSON and YAML),
    each atomically (``write_text_atomic``); a failure on one puts back those written before it (removed where they
    were new), so the set is never half old, half new."""
    written: List[Tuple[Path, Optional[bytes]]] = []
    try:
        for path, text, check in files:
            previous = Path(path).read_bytes() if os.path.isfile(path) else None
            write_text_atomic(path, text, check)
            written.append((Path(path), previous))
    except BaseException:
        for path, previous in reversed(written):
            with suppress(OSError):  # a disk that refused the new file may refuse the old one too
                path.unlink() if previous is None else write_bytes_atomic(path, previous)
        raise


def file_sha256(path: PathLike) -> str:
    """The sha256 hex digest of a file's bytes, read in 1 MiB chunks (a backbone-sized file is never held whole)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def nearest_folder(path: PathLike) -> Optional[Path]:
    """The nearest existing folder above ``path`` (where a write to ``path`` creates its first entry), or None."""
    return next((p for p in Path(path).parents if os.path.isdir(p)), None)  # os.path's: never raises


def file_in_the_way(path: PathLike) -> Optional[Path]:
    """The first of ``path`` and its parents that exists and is not a directory (no directory can be made at or
    under it), or None."""
    path = Path(path)
    return next((p for p in (path, *path.parents) if _is_no_directory(p)), None)


def _is_no_directory(path: Path) -> bool:
    """Whether ``path`` exists and is no directory, by one stat: two (exists, then isdir) took a directory deleted
    between them for a file. False, not an OSError, for a name over the file system's limit."""
    try:
        return not stat.S_ISDIR(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def resolve_directory_target(path: PathLike, names: Sequence[str] = ()) -> Path:
    """The real directory a save to ``path`` replaces (symlinks resolved, so a linked directory is written through).

    A ValueError, before anything moves, for a path that exists and is not a directory, that is or contains the
    current working directory, or that is or holds a mount point: none of them can be swapped for a new directory; for
    a writers' lock path beside it that is no file (see ``writer_lock``), on which the save would fail at its end; and
    for a path too long for the system once the save's staged copy (with the files ``names`` in it) and lock file are
    named beside it, on which the save would fail midway naming a hidden path. A PermissionError, as early, for a
    write-protected directory or file of ``names``, or a parent the save cannot write (see ``_refuse_unwritable``).
    """
    try:
        os.stat(path)
    except OSError as error:  # realpath would leave a loop as it is, and the save would swap out the link itself
        if error.errno == errno.ELOOP:
            raise ValueError(f"{path} leads into a loop of symbolic links, which no save can write through: remove or "
                             "fix the link (nothing was written)") from error
        if error.errno not in (errno.ENOENT, errno.ENOTDIR):  # a name too long, a parent it may not look into
            target = Path(os.path.abspath(path))
            folder = nearest_folder(target)
            too_long = (_name_too_long(target, folder) if folder is not None else None) or _path_too_long(target, names)
            raise ValueError(f"cannot save to {path}: {too_long or error.strerror} (nothing was written)") from error
        missing = _missing_before_parent_step(path)
        if missing is not None:  # realpath drops "missing/.." as text; reading the path back would fail there
            raise ValueError(_unreadable_back(path, missing, "files")) from error
    target = Path(os.path.realpath(path))
    if target.exists() and not target.is_dir():
        raise ValueError(f"{path} is an existing file, not a directory: a save writes a directory of files there. "
                         "Choose a directory path (the file was left untouched)")
    blocking = file_in_the_way(target)
    if blocking is not None:
        raise ValueError(f"{path} lies under {blocking}, an existing file, so no directory can be made there: choose "
                         "another path (the file was left untouched)")
    try:
        cwd = Path(os.path.realpath(os.getcwd()))
    except FileNotFoundError:  # the working directory was deleted: it cannot be the target
        cwd = None
    if cwd is not None and (cwd == target or target in cwd.parents):
        raise ValueError(f"{path} is {'' if cwd == target else 'above '}the current working directory, which a save "
                         "cannot replace: save into a subdirectory (e.g. ./adapter) instead")
    mounted = _mount_point_within(target)
    if mounted == target:
        raise ValueError(f"{path} is a mount point, which a save cannot replace: save into a subdirectory of it")
    if mounted is not None:
        raise ValueError(f"{path} holds a mount point, {mounted}: a save replaces the whole directory, so it would "
                         "copy that filesystem's files into the new set and then delete them from it with the old "
                         f"one. Unmount it (umount {mounted}) or move it out of {path}, or save to another directory "
                         "(nothing was written)")
    too_long = _path_too_long(target, names)
    if too_long is not None:
        raise ValueError(f"cannot save to {path}: {too_long} (nothing was written)")
    check_writer_lock(target)
    _refuse_unwritable(target, names)
    return target


def _unreadable_back(path: PathLike, missing: str, written: str) -> str:
    """Why a save to ``path``, which steps up out of the ``missing`` folder, is refused (``written``: what it saves)."""
    return (f"{os.fspath(path)} steps up ('..') out of {missing}, which does not exist, so the saved {written} could "
            f"not be read back through this path: create {missing} first, or give the path without '..' "
            f"({os.path.normpath(path)}) (nothing was written)")


def _missing_before_parent_step(path: PathLike) -> Optional[str]:
    """The first folder of ``path`` that a ``..`` right after it steps out of but that does not exist, or None: the
    system cannot pass through it, where ``os.path.realpath`` removes both as text."""
    parts = os.fspath(path).split(os.sep)
    for index in range(1, len(parts)):
        if parts[index] == ".." and parts[index - 1] not in ("", ".", ".."):
            folder = os.sep.join(parts[:index])
            if not os.path.isdir(folder):
                return folder
    return None


def _mount_point_within(directory: Path) -> Optional[Path]:
    """The first mount point at or under ``directory`` (a folder or a bind-mounted file; symlinks are not followed),
    or None. Where the system lists its mount points (Linux), they are compared by path, whatever the directory
    holds; elsewhere its tree is walked."""
    if directory.is_symlink() or not directory.is_dir():
        return None
    if os.path.ismount(directory):
        return directory
    listed = _listed_mount_points()
    if listed:
        top = os.fspath(directory)
        inside = sorted(path for path in listed if path == top or path.startswith(top + os.sep))
        return Path(inside[0]) if inside else None
    for root, folders, files in os.walk(directory):  # os.walk does not follow symlinks
        for name in (*folders, *files):
            path = os.path.join(root, name)
            if os.path.ismount(path):
                return Path(path)
    return None


def _listed_mount_points() -> FrozenSet[str]:
    """Every mount point that /proc/self/mountinfo lists (Linux; empty elsewhere): it names the bind mounts of a
    folder of the same filesystem too, which os.path.ismount cannot tell from a plain folder."""
    try:
        with open("/proc/self/mountinfo", "rb") as file:
            lines = file.read().splitlines()
    except OSError:
        return frozenset()
    # The fifth field; spaces, tabs, newlines and backslashes in it are written as octal escapes (\040, ...).
    return frozenset(os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4]))
                     for fields in map(bytes.split, lines) if len(fields) > 4)


def _refuse_unwritable(target: Path, names: Sequence[str] = ()) -> None:
    """A PermissionError naming the fix when a save must not replace ``target`` or its files ``names``, or cannot
    write beside it.

    The swap works in the parent (lock file, staged copy, renames), so it needs the parent writable, and it would
    replace a write-protected directory, or a write-protected file of it, without ever writing into it, undoing that
    protection.
    """
    if target.is_dir():
        # os.access tells what the bits cannot (owner, ACLs, read-only mounts) but says "writable" to root, so no
        # write bit for anyone also refuses: a chmod 555 directory is a deliberate "do not overwrite", for root too.
        # Not on Windows, whose directories' read-only attribute (mode 0o555 there) often just marks custom folders.
        info = os.stat(target)
        if _immutable(target, info):
            raise PermissionError(f"cannot save over {target}: {_immutable_message(target, 'a save')}")
        no_write_bit = os.name == "posix" and stat.S_IMODE(info.st_mode) & 0o222 == 0
        if no_write_bit or not os.access(target, os.W_OK):
            why = _unwritable_cause(target)
            if why is not None:
                raise PermissionError(f"cannot save over {target}: {why}. Save to another directory (it was left "
                                      "untouched)")
            raise PermissionError(f"{target} is write-protected, and a save would replace the whole directory: make "
                                  f"it writable (e.g. chmod u+w {target}) to save over it, or save to another "
                                  "directory (it was left untouched)")
        for name in names:
            protected = _protected_file_message(target / name, "a save")
            if protected is not None:
                raise PermissionError(f"{protected}; nothing in {target} was changed")
        flagged = _flagged_entry(target)
        if flagged is not None:
            raise PermissionError(
                f"{flagged} is flagged immutable or append-only (chattr +i or +a; chflags uchg on macOS), and a save "
                f"swaps the whole of {target} in, your other files copied into it, so the old folder holding it could "
                f"never be removed: remove the flag (chattr -i -a {flagged}, as root) or move it out of {target} "
                "(nothing was changed)")
    # Root may write a parent whose bits say read-only, and then the save works: only a parent it cannot write fails.
    parent = target.parent
    if parent.is_dir() and not os.access(parent, os.W_OK):
        why = _unwritable_cause(parent)
        fix = (f"{why}, so save to a directory inside a writable folder" if why is not None else
               f"Make {parent} writable, or save to a directory inside a writable folder")
        raise PermissionError(f"cannot save to {target}: a save swaps the whole directory in atomically (a lock file, "
                              f"a staged copy and a rename beside it), so the parent directory {parent} must be "
                              f"writable. {fix} (nothing was written)")


def _unwritable_cause(folder: Path) -> Optional[str]:
    """Why ``folder`` is not writable where no chmod of this user's can help: a read-only file system, or a folder of
    another user (its owner may chmod it, this user may not); None where its mode is the cause."""
    rdonly = getattr(os, "ST_RDONLY", None)
    try:
        if rdonly is not None and os.statvfs(folder).f_flag & rdonly:
            return f"{folder} is on a read-only file system (mounted read-only)"
        owner = os.stat(folder).st_uid
    except (OSError, AttributeError):
        return None
    euid = os.geteuid() if hasattr(os, "geteuid") else None
    if euid is not None and owner != euid and not _may_chmod_any():
        return f"{folder} belongs to another user (uid {owner}), who alone may make it writable"
    return None


_CAP_FOWNER = 3  # the capability to chmod files of other users (root has it, unless dropped: a container's root)


def _may_chmod_any() -> bool:
    """Whether this process may change the mode of other users' files: root with CAP_FOWNER (read from /proc; where
    it is not there, root is taken to have it)."""
    if os.geteuid() != 0:
        return False
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            line = next(line for line in status if line.startswith("CapEff:"))
    except (OSError, StopIteration):
        return True
    return bool(int(line.split()[1], 16) >> _CAP_FOWNER & 1)


@contextmanager
def atomic_directory(path: PathLike, check: Optional[Callable[[], None]] = None, keep_others: bool = True,
                     names: Sequence[str] = ()) -> Iterator[Path]:
    """Yield an empty staging directory; when the block succeeds, it replaces the directory ``path`` in one step.

    Writers of one directory are serialised by ``fcntl.flock`` on a ``.<name>.lock`` file beside it (left there;
    Windows has no lock, so concurrent writers there must be avoided by the caller). A writer also takes a shared lock
    on the lock file of each folder above it that has one (``_ancestor_locks``), so a save into a subfolder of a saved
    directory (an adapter per task inside another) and a save of that directory take turns. Under the lock, leftovers of
    a killed save of this directory (``.<name>.staged-*``, ``.<name>.old-*`` siblings) are removed first. Files and
    folders of the old directory that the block did not write are hard-linked (copied where links are refused)
    into the staging directory, so the user's other files are never moved and a reader sees them in both sets
    (``keep_others=False``: the block's files alone make the new set, an exact copy of something else); the
    staged directory and the folders re-created in it get the old ones' mode, group and (for root) owner.
    The staged set then replaces the old one: on Linux with ``renameat2(RENAME_EXCHANGE)`` and on macOS with
    ``renamex_np(RENAME_SWAP)``, one atomic step, so ``path`` always names a complete set and a reader (see
    ``read_files``) gets the whole old or the whole new one; elsewhere, or on filesystems without an atomic
    exchange, by two renames, between which ``path`` is briefly missing (a kill there is undone by the next
    save). Written files are fsynced before the swap. A symlink keeps pointing at its (updated) target. An entry
    that appears in the old directory after its entries were linked (a writer that takes no turns with this one: a
    save into a subfolder of a directory never saved before, a file of the user's) is moved into the new set after
    the swap (unless ``keep_others`` is False), never removed with the old set, and so is one replaced there meanwhile
    (a subfolder saved again, a file written by rename), over the version this save linked; a file created inside a
    kept subfolder meanwhile may still be lost with the old set.
    ``names``: the files the block writes, so that a path too long for them is refused before anything is written.
    A failure of the block, or any check of ``resolve_directory_target``, leaves the old set untouched; a full
    disk or file size limit while the new set is staged raises an OSError (same errno) that says so. ``check``, when
    given, runs under the lock just before the swap: it raises to refuse replacing what another writer put at
    ``path`` after the caller's own checks ran, and the old set then stays.
    """
    target = resolve_directory_target(path, names)
    unchanged = f"Nothing in {target} was changed: a previous adapter there, if any, is intact."
    with ExitStack() as held:
        held.enter_context(_ancestor_locks(target))
        with _explained_write_failure(target, unchanged):  # a disk out of inodes fails here, at the first new entry
            target.parent.mkdir(parents=True, exist_ok=True)
            held.enter_context(writer_lock(target))
            _remove_leftovers(target)
            staged = _make_staging_directory(target)
        old_set = staged  # where the old set lies once swapped out
        try:
            _inherit_access(target, staged)
            with _explained_write_failure(target, unchanged):
                yield staged
                written = os.listdir(staged)
                old, copied, linked = (_keep_unwritten_entries(target, staged) if keep_others else
                                       (_stat_or_none(target), [], {}))
                _fsync_entries(staged, written)
            if check is not None:
                check()
            if old is not None:
                _copy_access(target, old, staged)
                _keep_files_access(target, staged, written)
            new_set = set(os.listdir(staged))
            with _explained_write_failure(target, unchanged):  # a failed swap leaves the old set in place
                old_set = _swap_in(staged, target)
            # saved from here on: what follows warns of a failure, never raises one (but for a file swapped out)
            _refuse_swapped_out_non_directory(old_set, target)
            if keep_others:
                _carry_over_late_entries(old_set, target, new_set, linked)
            _flush_saved(target)
        finally:
            _remove_tree(staged)
            if old_set != staged:
                _remove_tree(old_set)
    if copied:
        names = [os.path.relpath(path, target) for path in copied]
        warn_user(f"{target} was saved, and the other files it holds are kept, but {len(names)} of them belong to "
                  f"another user and this file system would not link them ({', '.join(names[:3])}"
                  f"{', ...' if len(names) > 3 else ''}): they are copies now, owned by you, with their mode and "
                  "group. Their owner may want them back as theirs; keep other users' files out of adapter folders "
                  "you re-save", RuntimeWarning)


def copy_directory(source: PathLike, destination: PathLike) -> Path:
    """Replace the directory ``destination`` by an exact copy of ``source`` (files hard-linked where the filesystem
    allows), as ``atomic_directory`` writes: it names the old copy or the new one, and a killed copy's staging folder
    is removed by the next one. A ``destination`` inside ``source`` is refused: the copy would hold its own staging
    folder."""
    real_source, real_destination = Path(os.path.realpath(source)), Path(os.path.realpath(destination))
    if real_destination == real_source or real_source in real_destination.parents:
        raise ValueError(f"cannot copy {source} into {destination}, which lies inside it: the copy would hold "
                         "itself (its staging folder). Copy it beside the directory instead (nothing was written)")
    with atomic_directory(destination, keep_others=False) as staged:
        shutil.copytree(source, staged, copy_function=_link_or_copy, dirs_exist_ok=True)
    return Path(destination)


@contextmanager
def _explained_write_failure(target: Path, unchanged: str) -> Iterator[None]:
    """Re-raise an operating system error of writing the new content beside ``target`` (or of putting it in place)
    as an OSError of the same errno naming ``target``, the cause and that ``target`` is ``unchanged``; for want of
    room (``_NO_ROOM``), what frees it. The bare error named a hidden temporary path, or no path (an fsync's EIO).
    Errors that explain themselves already (not the system's own text) pass as they are."""
    try:
        yield
    except OSError as error:
        if error.errno is None or error.strerror != os.strerror(error.errno) or not _own_path(target, error.filename):
            raise
        if error.errno in NOT_ALLOWED:
            raise type(error)(error.errno, f"cannot save to {target}: {_not_allowed(target, error)}. {unchanged}"
                              ) from error
        if error.errno in _NO_ROOM:
            cause, fix = _NO_ROOM[error.errno]
            raise OSError(error.errno, f"cannot save to {target}: {cause} ({error.strerror}) while the new content "
                                       f"was written beside it. {unchanged} {fix}, then save again") from error
        if error.errno == errno.EXDEV:
            raise OSError(error.errno, (
                f"cannot save to {target}: its file system would not move it within its folder to put the new content "
                f"in its place ({error.strerror}): overlayfs (a container whose image holds the folder) moves a "
                f"folder of a lower layer only with redirect_dir on. {unchanged} Move it once with a tool that copies "
                f"across layers (mv {target} {target}.moved && mv {target}.moved {target}), then save again, or save "
                "to another path")) from error
        raise OSError(error.errno, f"cannot save to {target}: {error.strerror} while the new content was written "
                                   f"beside it. {unchanged} Check the disk and its file system (a failing disk, a "
                                   "network mount gone), then save again") from error


# The errors of a write this process may not make: its permissions, an immutable folder, a read-only file system.
NOT_ALLOWED = (errno.EACCES, errno.EPERM, errno.EROFS)


def _not_allowed(target: Path, error: OSError) -> str:
    """Which folder refused a save of ``target`` (``error``: EACCES, EPERM, EROFS) and the fix: the nearest existing
    folder of the path it named, or ``target``'s own in a folder with the sticky bit (``/tmp``), where only its
    owner may replace it."""
    named = Path(os.path.abspath(os.fsdecode(error.filename))) if error.filename is not None else target
    folder = nearest_folder(named) or target.parent
    info = _stat_or_none(target)
    euid = os.geteuid() if hasattr(os, "geteuid") else None  # POSIX only
    if info is not None and euid is not None and info.st_uid != euid and os.stat(target.parent).st_mode & stat.S_ISVTX:
        return (f"{target} belongs to another user, in {target.parent}, a folder with the sticky bit set (as /tmp), "
                f"where only its owner may replace it ({error.strerror}). Save to another path, or ask its owner to")
    return (f"this process may not create files in {folder} ({error.strerror}: its permissions, an "
            "immutable folder or a read-only file system). Choose another path, or make that folder writable")


def _own_path(target: Path, filename: Any) -> bool:
    """Whether an error's ``filename`` is one the save of ``target`` writes: no name (an fsync's), ``target``, a folder
    above it, or one of its siblings (``.<stem>.``: temporary file, staged set, lock) or what lies in them. A source
    the caller reads (``copy_directory``'s) is not: its error names it as it is."""
    if filename is None:
        return True
    path = Path(os.path.abspath(os.fsdecode(filename)))
    mark = f".{_sibling_stem(target)}."
    return path == target or path in target.parents or any(
        part.parent == target.parent and part.name.startswith(mark) for part in (path, *path.parents))


def _flush_saved(target: Path) -> None:
    """Flush the folder of ``target``, just put in place, to its disk; a failure there warns instead of raising: the
    save took place (the new content is what ``target`` names), only its survival of a power loss is not sure."""
    try:
        _fsync_directory(target.parent)
    except OSError as error:
        warn_user(f"{target} was saved (the new content is in place), but flushing its folder to disk failed "
                  f"({error.strerror}): a power loss before the system writes it out may lose the save. Check the "
                  "disk and its file system", RuntimeWarning)


@contextmanager
def writer_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``.<name>.lock`` beside ``target`` (released when its file is closed), so
    that writers of ``target`` take turns; Windows has no lock, so nothing is held there. A lock path that is no
    file (a directory, a dangling symlink) raises a ValueError naming it and the fix; a lock this thread holds already
    (a write of ``target``, or of a directory inside it, asked for from within one of ``target``) a RuntimeError, as
    waiting for it would never end."""
    if fcntl is None:
        yield
        return
    check_writer_lock(target)
    opened: List[int] = []

    def release() -> None:  # closes the lock file once, whichever of _registered and the finally below calls first
        with _LOCK_FDS_GUARD:
            if opened:
                _close_lock_file(opened.pop())

    try:
        with interrupts_deferred():  # open only with its release in place
            try:
                opened.append(_open_lock_file(lambda: os.open(_lock_path(target), os.O_RDONLY | os.O_CREAT, 0o644)))
            except OSError as error:  # say so of the target, not of the lock
                raise type(error)(error.errno, f"cannot write {target}: {_no_lock_file(target, error)}") from error
        fd = opened[0]
        key = _file_key(fd)
        if _held_by_this_thread(key, fd):
            raise RuntimeError(f"cannot write {target} from within a write of it, or of a directory inside it, in this "
                               "thread: that write holds its lock, which this one would wait for forever. Write it "
                               "after that write returns (nothing was written)")
        _lock_exclusive(fd)
        with _registered(key, release=release):
            yield
    finally:
        release()


def _lock_exclusive(fd: int) -> None:
    """Wait for an exclusive lock on the open file ``fd``; where nothing can be locked (NFS without a lock daemon:
    ENOLCK), go on unlocked, as ``try_lock`` does."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as error:
        if error.errno != errno.ENOLCK:
            raise


def _no_lock_file(target: Path, error: OSError) -> str:
    """Why ``target``'s lock file could not be made (``error``), and the fix that errno calls for."""
    if error.errno == errno.ENAMETOOLONG:
        lock = _lock_path(target)
        return (f"the path of its lock file beside it, {lock.name}, is {_path_length(lock)} bytes long, too long for "
                f"this system ({error.strerror}): choose a shorter path (nothing was written)")
    fix = ("write it to a folder this user can write" if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else
           "write it to another folder")
    return f"no file can be made in its folder {target.parent} ({error.strerror}): {fix}"


# The lock files this thread holds, by (device, inode), with how many times (``_held_locks``).
_THREAD = threading.local()
# How long a save waits for a folder above its target that another writer is saving (``_ancestor_locks``).
_ANCESTOR_WAIT_S = 600.0
# The descriptors of the lock files this process has open (writer, ancestor and temporary-file locks). A forked child
# (a DataLoader worker started while a thread saves) gets copies, which held each lock until the child exited: saves
# waited on it, and a child saving that folder itself waited for ever. The child lets go of them at the fork
# (``_let_go_of_inherited_locks``); opening and closing such a descriptor and a fork take turns on ``_LOCK_FDS_GUARD``,
# re-entrant: a signal handler that saves runs in the thread it interrupted, which may hold it.
_LOCK_FDS: Set[int] = set()
_LOCK_FDS_GUARD = threading.RLock()


def _open_lock_file(opener: Callable[[], Any], fd_of: Callable[[Any], Optional[int]] = lambda fd: fd) -> Any:
    """``opener()`` (which opens a lock file), its descriptor (``fd_of`` its result; None for none) recorded in
    ``_LOCK_FDS`` with no fork in between."""
    with _LOCK_FDS_GUARD:
        opened = opener()
        fd = fd_of(opened)
        if fd is not None:
            _LOCK_FDS.add(fd)
    return opened


def _close_lock_file(fd: int) -> None:
    """Close a descriptor ``_open_lock_file`` recorded (releasing its lock), with no fork in between."""
    with _LOCK_FDS_GUARD:
        _LOCK_FDS.discard(fd)
        os.close(fd)


def _let_go_of_inherited_locks() -> None:
    """In a forked child: point the copies of the parent's lock descriptors at /dev/null, so that the child holds
    none of those locks (closing them could close a file that later takes the number), and count none as held."""
    global _LOCK_FDS_GUARD
    _LOCK_FDS_GUARD = threading.RLock()  # held by the forking thread itself (``os.register_at_fork`` below)
    if _LOCK_FDS:
        null = os.open(os.devnull, os.O_RDONLY)
        for fd in _LOCK_FDS:
            os.dup2(null, fd, inheritable=False)
        os.close(null)
        _LOCK_FDS.clear()
    _THREAD.locks = Counter()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=lambda: _LOCK_FDS_GUARD.acquire(), after_in_parent=lambda: _LOCK_FDS_GUARD.release(),
                        after_in_child=_let_go_of_inherited_locks)


def _held_locks() -> Counter:
    """How many locks this thread holds on each lock file, by (device, inode): flock locks each open file apart, so
    asking for one of them again on another descriptor would wait for this thread itself."""
    if not hasattr(_THREAD, "locks"):
        _THREAD.locks = Counter()
    return _THREAD.locks


def _held_by_this_thread(key: Tuple[int, int], fd: int) -> bool:
    """Whether this thread holds the lock file ``key`` (``_held_locks``), checked against the lock itself: a count
    that a Ctrl-C left behind (at the first line of ``_registered``'s ``finally``, which nothing can hold it off)
    refused every later write of that folder in the process. Where ``fd`` takes the lock exclusively at once, nobody
    holds it, shared or not: the count is dropped, and ``fd`` keeps the lock (a shared one held by this thread would
    let a shared probe through, and the count go while the lock stays)."""
    held = _held_locks()
    if held[key] <= 0:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held (by this thread's write, as counted), or nothing can be locked there: the count stands
        return True
    del held[key]
    return False


@contextmanager
def _registered(key: Tuple[int, int], release: Optional[Callable[[], None]] = None) -> Iterator[None]:
    """Count a lock on the lock file ``key`` as held by this thread while the block runs. The count changes with
    Ctrl-C held: a count left behind by an interrupt refused every later write of that folder in the process.
    ``release`` (which lets go of the lock) runs in the same held step as the count goes: a Ctrl-C between the two
    kept the lock with nothing counting it, and every later write of that folder waited for it for ever."""
    held, counted = _held_locks(), False
    try:
        with interrupts_deferred():
            held[key] += 1
            counted = True
        yield
    finally:
        with interrupts_deferred():
            if counted:
                held[key] -= 1
                if held[key] <= 0:
                    del held[key]
            if release is not None:
                release()


def _file_key(fd: int) -> Tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


@contextmanager
def _ancestor_locks(target: Path) -> Iterator[None]:
    """Hold a shared lock on the lock file of each folder above ``target`` that has one (a directory saved before),
    outermost first, so that a save into a saved directory and a save of that directory take turns: the latter's swap
    would remove what the former wrote into the old set. No lock file is made here; one this thread holds already (a
    save asked for from within a save of that folder) is not waited for. A lock held longer than ``_ANCESTOR_WAIT_S``
    raises a TimeoutError instead of waiting on forever."""
    if fcntl is None:
        yield
        return
    with ExitStack() as held:
        for folder in reversed([p for p in target.parents if p.parent != p]):
            fd = _open_lock_file(partial(_open_existing, _lock_path(folder)))
            if fd is None:
                continue
            held.callback(_close_lock_file, fd)
            key = _file_key(fd)
            if not _held_by_this_thread(key, fd) and _lock_shared(fd, folder, target):
                held.enter_context(_registered(key))
        yield


def _open_existing(path: Path) -> Optional[int]:
    """A read-only descriptor of the regular file ``path``, or None where there is none (the usual case for a
    folder never saved) or it cannot be opened; without blocking (a FIFO of that name would wait for a writer)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    if stat.S_ISREG(os.fstat(fd).st_mode):
        return fd
    os.close(fd)
    return None


def _lock_shared(fd: int, folder: Path, target: Path) -> bool:
    """Take a shared lock on ``fd`` (the lock file of ``folder``, above ``target``), waiting at most
    ``_ANCESTOR_WAIT_S``; False where the file system locks nothing (NFS without a lock daemon)."""
    deadline = time.monotonic() + _ANCESTOR_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"cannot save to {target}: {_lock_path(folder)}, the lock of {folder} above it, has been held for "
                    f"{_ANCESTOR_WAIT_S:g} s (by another process saving that directory, or holding that file for "
                    "another purpose). Nothing was written: save again once it is free, or save elsewhere") from None
            time.sleep(0.05)
        except OSError:
            return False


def try_lock(path: PathLike, wait: bool = False) -> Optional[int]:
    """A descriptor holding an exclusive lock on the file ``path`` (created) until it is closed, or None when another
    process holds it (``wait``: once it lets go instead). Where no lock can be taken (Windows, a file system without
    locks), the descriptor holds none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError as error:
        if error.errno not in NOT_ALLOWED:
            raise
        why = ("it is a file this process may not read (another user's?): remove it, or run as its owner"
               if os.path.lexists(path) else f"this process may not create files in {Path(path).parent} "
               f"({error.strerror}): make that folder writable, or choose another")
        raise type(error)(error.errno, f"cannot take the lock {path}: {why}") from error
    if fcntl is None:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as error:  # ENOLCK (NFS without a lock daemon): nothing can be locked there
        if error.errno != errno.ENOLCK:
            os.close(fd)
            raise
    return fd


def _lock_path(target: Path) -> Path:
    """``.<name>.lock`` beside ``target``: the file its writers lock (``writer_lock``)."""
    return target.parent / f".{_sibling_stem(target)}.lock"


def check_writer_lock(target: PathLike) -> None:
    """A ValueError naming the fix when ``target``'s lock path exists as no (link to a) regular file, which
    ``writer_lock`` could not open, or (a FIFO) would wait on forever; called early by writers that lock only after
    hours of work. Nothing to refuse on Windows: no lock there."""
    lock = _lock_path(Path(target))
    if fcntl is None or not os.path.lexists(lock) or (os.path.isfile(lock) and os.access(lock, os.R_OK)):
        return
    if os.path.isfile(lock):
        what = "a file this process may not read (another user's?)"
    elif os.path.isdir(lock):
        what = "a directory"
    elif not os.path.exists(lock):
        what = f"a symlink to {os.readlink(lock)}, which does not exist"
    else:
        what = "not a regular file"
    raise ValueError(f"cannot write {target}: {lock}, the lock file that writers of it take turns on, is {what}. "
                     "Move it away or remove it (a write makes a new lock file there), or write to another path "
                     "(nothing was written)")


def set_aside_copy(target: PathLike) -> Optional[Path]:
    """The previous content of a missing ``target`` that a save killed between its two renames left aside
    (``.<name>.old-<hex>``, on file systems without an atomic exchange), or None: a load can name it."""
    target = Path(target)
    if os.path.lexists(target) or not target.parent.is_dir():
        return None
    pattern = _leftover_pattern(target, "old")
    try:
        return next((Path(entry.path) for entry in os.scandir(target.parent)
                     if pattern.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)), None)
    except OSError:
        return None


def _remove_leftovers(target: Path) -> None:
    """Remove what a killed save of ``target`` left; an old set that a killed two-rename swap left aside goes back.

    Safe under the writer lock: no live save of ``target`` owns these, and every file of the user's that they hold
    is also linked from ``target``.
    """
    # Exactly the token length saves make, and directories only: a user's ``.task.old-2024`` backup is not ours.
    pattern = _leftover_pattern(target, "staged|old")
    for entry in target.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match is None or not entry.is_dir() or entry.is_symlink():
            continue
        if match.group(1) == "old" and not os.path.lexists(target):
            os.rename(entry, target)
        else:
            _remove_tree(entry)


_TOKEN_BYTES = 6  # random bytes in a staged or set-aside sibling's name (12 hex digits)


def _leftover_pattern(target: Path, kinds: str) -> re.Pattern:
    """The names of ``target``'s siblings of ``kinds`` (``"old"``, ``"staged|old"``) that a save makes
    (``_sibling``): exactly its token length, so a user's ``.task.old-2024`` backup does not match."""
    return re.compile(rf"\.{re.escape(_sibling_stem(target))}\.({kinds})-[0-9a-f]{{{2 * _TOKEN_BYTES}}}")


def _sibling_stem(target: Path) -> str:
    """``target``'s name in its siblings' names: the name itself, or for a name too long to take the 26 more bytes
    of the longest (an ONNX export's folder beside its temporary file, ``.<name>.nv-<8>.tmp.<8>``; file names stop at
    255 bytes), its first 200 bytes and a hash of the whole, so only it matches."""
    if len(os.fsencode(target.name)) <= 229:
        return target.name
    return _hashed_stem(target.name, lambda stem: len(os.fsencode(stem)) <= 200 + _HASHED)


def previous_path(target: PathLike, replaceable: Callable[[Path], bool]) -> Path:
    """Where to keep what ``target`` holds before a write replaces it: ``<name>.previous``, or ``.previous.1``,
    ``.2``, ... where that holds something ``replaceable`` refuses (a user's file or folder of that name, which
    replacing would lose) or something ``protected``. A name too long to take the suffix keeps what fits of it and a
    hash of the whole."""
    target = Path(target)
    limit = _name_limit(nearest_folder(target) or target.parent)
    for index in itertools.count():
        path = target.with_name(_fitting_name(target.name, ".previous" + (f".{index}" if index else ""), limit))
        if not os.path.lexists(path) or (replaceable(path) and protected(path) is None):
            return path
    raise AssertionError("unreachable")


def _fitting_name(name: str, suffix: str, limit: int) -> str:
    """``name + suffix``, or where that is longer than ``limit``, as much of ``name`` as fits with a hash of it."""
    if _name_length(name + suffix) <= limit:
        return name + suffix
    return _hashed_stem(name, lambda stem: _name_length(stem + suffix) <= limit) + suffix


_HASHED = 17  # the bytes ``_hashed_stem`` adds: "~" and 16 hex digits


def _hashed_stem(name: str, fits: Callable[[str], bool]) -> str:
    """The longest start of ``name`` (whole characters) that ``fits`` with "~" and a hash of the whole name after it,
    so that only this name gives it."""
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    stem = name
    while stem and not fits(f"{stem}~{digest}"):
        stem = stem[:-1]
    return f"{stem}~{digest}"


def protected(path: PathLike) -> Optional[str]:
    """Why a write must not replace ``path``, or None: a write-protected file or folder (no write bit for anyone), or
    one flagged immutable or append-only, or a folder holding such an entry."""
    path = Path(path)
    try:
        info = os.lstat(path)
    except OSError:
        return None
    if stat.S_ISREG(info.st_mode):
        return _protected_file_message(path, "a write")
    if not stat.S_ISDIR(info.st_mode):
        return None
    if _immutable(path, info):
        return _immutable_message(path, "a write")
    if os.name == "posix" and stat.S_IMODE(info.st_mode) & 0o222 == 0:
        return f"{path} is write-protected (mode {stat.S_IMODE(info.st_mode):04o})"
    flagged = _flagged_entry(path)
    return None if flagged is None else _immutable_message(flagged, "a write")


def _sibling(target: Path, kind: str, token: str) -> Path:
    """``.<stem>.<kind>-<token>``: the staged new set or the old set aside, named so only this target matches it."""
    return target.with_name(f".{_sibling_stem(target)}.{kind}-{token}")


def _make_staging_directory(target: Path) -> Path:
    """A new empty ``.<name>.staged-<hex>`` sibling of ``target`` (mode 0777 less the umask)."""
    while True:
        staged = _sibling(target, "staged", os.urandom(_TOKEN_BYTES).hex())
        try:
            os.mkdir(staged, 0o777)
            return staged
        except FileExistsError:
            continue


def _keep_unwritten_entries(target: Path, staged: Path) -> Tuple[Optional[os.stat_result], List[str],
                                                                 Dict[str, Tuple[Tuple[int, int], Tuple[int, int]]]]:
    """Link each entry of the old ``target`` that ``staged`` lacks into ``staged``; returns the old directory's stat,
    the files kept as copies that this user owns instead of their owner (``_link_or_copy``) and, by name, the
    identity of each entry linked and of its copy (``_carry_over_late_entries`` tells an entry replaced since by it).
    The staged set of a save into the directory that is still running (``.<name>.staged-<hex>``) is not linked: that
    save goes on writing into it by path, and it moves into the new set after the swap. An entry this user cannot
    read (another user's private folder) raises a PermissionError naming it and the fix: the new set cannot hold it,
    and the old set stays."""
    if not target.is_dir():
        return None, [], {}
    copied: List[str] = []
    linked: Dict[str, Tuple[Tuple[int, int], Tuple[int, int]]] = {}
    with os.scandir(target) as entries:
        for entry in entries:
            destination = staged / entry.name
            if os.path.lexists(destination) or _STAGED_SET.fullmatch(entry.name):
                continue
            try:
                identity = _identity(Path(entry.path))
                copied += _link_entry(entry, str(destination))
                linked[entry.name] = (identity, _identity(destination))
            except PermissionError as error:
                unreadable = error.filename or entry.path
                raise PermissionError(error.errno, (
                    f"cannot save to {target}: {unreadable}, kept in it, cannot be read by this user, and a save "
                    "keeps every other entry of the folder (linked or copied into the new set). Make it readable to "
                    f"you, move it out of {target}, or save elsewhere. Nothing in {target} was changed: a previous "
                    "adapter there, if any, is intact")) from error
            except shutil.SpecialFileError as error:
                raise OSError(error.errno, (
                    f"cannot save to {target}: {error.strerror}, and a save keeps every other entry of the folder. "
                    f"Move it out of {target}, or save elsewhere. Nothing in {target} was changed: a previous adapter "
                    "there, if any, is intact")) from error
            except OSError as error:
                if error.errno != errno.ENAMETOOLONG:
                    raise
                longer = _path_length(staged) - _path_length(target)
                deep = os.fspath(error.filename or destination).replace(os.fspath(staged), os.fspath(target), 1)
                raise OSError(error.errno, (
                    f"cannot save to {target}: a save keeps every other entry of the folder by re-creating it in a "
                    f"staged copy beside it, whose path is {longer} bytes longer, and {deep} is too long for that on "
                    f"this system. Move it out of {target}, shorten its folder names, or save elsewhere. Nothing in "
                    f"{target} was changed: a previous adapter there, if any, is intact")) from error
    return os.stat(target), copied, linked


# The staged set of a running (or killed) save of an entry of a directory: ``.<name>.staged-<12 hex digits>``.
_STAGED_SET = re.compile(rf"\..+\.staged-[0-9a-f]{{{2 * _TOKEN_BYTES}}}")


def _relink_folder(source: str, destination: str) -> List[str]:
    """A new folder at ``destination`` with ``source``'s owner, group, mode and times, its files hard-linked: a save
    re-creates a user's subfolder of an adapter directory with its access unchanged (``shutil.copytree`` would give
    it this user's group, so a shared setgid folder would lose its group's access). Returns the files kept as copies
    this user owns instead of their owner."""
    os.mkdir(destination)
    copied: List[str] = []
    with os.scandir(source) as entries:
        for entry in entries:
            copied += _link_entry(entry, os.path.join(destination, entry.name))
    _copy_ownership(os.stat(source), destination)
    shutil.copystat(source, destination)  # last: after chown, which may clear set-id bits, and after filling it
    return copied


def _link_entry(entry: os.DirEntry, destination: str) -> List[str]:
    """``entry`` at ``destination``: a folder re-created with its files linked, a file linked (or copied); returns the
    files kept as copies this user owns instead of their owner."""
    if entry.is_dir(follow_symlinks=False):
        return _relink_folder(entry.path, destination)
    return [] if _link_or_copy(entry.path, destination) else [entry.path]


def _link_or_copy(source: str, destination: str) -> bool:
    """A hard link (a symlink is linked itself, not followed); where the filesystem refuses links (or Linux's
    ``protected_hardlinks`` another user's file), a copy with the source's owner, group, mode and times. Returns False
    for a copy that could not keep its owner (one this user now owns; only root gives files away)."""
    try:
        os.link(source, destination, follow_symlinks=False)
        return True
    except (OSError, NotImplementedError):
        info = os.stat(source, follow_symlinks=False)
        kind = _special_kind(info.st_mode)
        if kind:
            _recreate_special_file(source, destination, info, kind)
        else:
            shutil.copy2(source, destination, follow_symlinks=False)
        _copy_ownership(info, destination)
        shutil.copystat(source, destination, follow_symlinks=False)
        return os.stat(destination, follow_symlinks=False).st_uid == info.st_uid


def _recreate_special_file(source: str, destination: str, info: os.stat_result, kind: str) -> None:
    """A new node like ``source`` (a FIFO or socket holds no data; a device is its numbers): a special file has no
    content to copy where links are refused (``shutil.copy2`` fails on it, or a FIFO blocks its read). A node this
    user may not make (a device) raises ``shutil.SpecialFileError`` naming it."""
    try:
        os.mknod(destination, info.st_mode, info.st_rdev)
    except OSError as error:
        raise shutil.SpecialFileError(error.errno, (
            f"{source} is a {kind}, which this file system refuses to hard-link and this user may not re-create "
            f"({error.strerror})")) from error


def _copy_ownership(reference: os.stat_result, path: PathLike) -> None:
    """Give ``path`` the group of ``reference`` where this user may (a member of it) and, for root, its owner too;
    otherwise ``path`` keeps this user's. Symlinks are changed themselves, not followed."""
    if not hasattr(os, "chown"):  # Windows
        return
    owner = reference.st_uid if os.geteuid() == 0 else -1
    try:
        os.chown(path, owner, reference.st_gid, follow_symlinks=False)
    except (OSError, NotImplementedError):
        pass


def _inherit_access(target: Path, staged: Path) -> None:
    """Give ``staged`` the group, set-group-ID bit and extended attributes (a default ACL) of an existing ``target``
    before files are written into it, so the new files get what they would in ``target`` itself (a shared folder).
    It stays writable for this user until ``_copy_access`` gives it ``target``'s exact mode."""
    old = _stat_or_none(target)
    if old is None or not stat.S_ISDIR(old.st_mode):
        return
    _copy_access(target, old, staged)
    os.chmod(staged, stat.S_IMODE(old.st_mode) | stat.S_IRWXU)


def _copy_access(source: Path, info: os.stat_result, path: PathLike) -> None:
    """Give ``path`` the owner (for root), group (where this user may), mode and extended attributes (POSIX ACLs)
    of ``source`` (whose stat is ``info``); not its times."""
    _copy_ownership(info, path)
    times = os.stat(path)
    try:
        shutil.copystat(source, path)  # after chown, which may clear set-id bits; ACLs where the platform has them
    except OSError:  # an attribute this user may not read (another user's private file): its mode, as before
        os.chmod(path, stat.S_IMODE(info.st_mode))
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))


def _keep_files_access(target: Path, staged: Path, written: Sequence[str]) -> None:
    """Give each file the block wrote in ``staged`` the mode of the file of that name it replaces in ``target``: a
    private adapter file (0600) came back with the writer's umask (0644) at every save. Its group stays the one the
    folder gives new files (a shared setgid folder's). A file linked in (``copy_directory``'s hard links) keeps its
    own: its mode is the source's, which a chmod would change."""
    for name in written:
        with suppress(OSError):  # a file that cannot be looked at, or a mode this user may not give: as written
            old, new = os.lstat(target / name), os.lstat(staged / name)
            if stat.S_ISREG(old.st_mode) and stat.S_ISREG(new.st_mode) and new.st_nlink == 1:
                os.chmod(staged / name, stat.S_IMODE(old.st_mode))


def _stat_or_none(path: Path) -> Optional[os.stat_result]:
    try:
        return os.stat(path)
    except OSError:
        return None


def _fsync_entries(directory: Path, names: Sequence[str]) -> None:
    """Flush the regular files ``names`` of ``directory`` and the directory itself, so a swap never publishes files
    whose data is still only in memory (a power loss after the swap then keeps the old or the new set)."""
    for name in names:
        path = directory / name
        if path.is_file() and not path.is_symlink():
            _fsync_file(path)
    _fsync_directory(directory)


def _fsync_file(path: Path) -> None:
    """Flush the data of the regular file ``path`` to its disk (with Ctrl-C held: one between the open and the close
    left the descriptor open)."""
    with interrupts_deferred():
        fd = os.open(path, os.O_RDONLY if os.name == "posix" else os.O_RDWR)  # Windows flushes only a writable handle
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_directory(directory: Path) -> None:
    """Flush ``directory``'s entries (a rename into it) to its disk, where the platform and file system offer it
    (``_NO_DIRECTORY_SYNC``)."""
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    try:
        with interrupts_deferred():  # as in _fsync_file
            fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except OSError as error:
        if error.errno not in _NO_DIRECTORY_SYNC:
            raise


def _swap_in(staged: Path, target: Path) -> Path:
    """Put ``staged`` at ``target``; returns where an existing ``target`` now lies, for removal: ``staged``'s name, or
    the ``.old-`` sibling the two-rename swap moved it to, where moving it on failed (the save took place)."""
    if not os.path.lexists(target):
        os.rename(staged, target)
        return staged
    if _exchange(staged, target):
        return staged
    old = _sibling(target, "old", staged.name.rsplit("-", 1)[1])
    os.rename(target, old)
    try:
        os.rename(staged, target)
    except BaseException:
        os.rename(old, target)
        raise
    try:
        os.rename(old, staged)
    except OSError:  # the new set is in place already: a failure here is no failed save
        return old
    return staged


def _refuse_swapped_out_non_directory(old: Path, target: Path) -> None:
    """Put back, and refuse, a file or symlink that another process put at ``target`` after this save checked it (the
    exchange swapped it out to ``old``, where it was hidden and then removed with the old set)."""
    if os.path.lexists(old) and (os.path.islink(old) or not os.path.isdir(old)):
        _swap_in(old, target)  # the new set back at ``old`` (removed with it), the entry back at ``target``
        kind = "a symbolic link" if os.path.islink(target) else "a file"
        raise ValueError(f"{target} became {kind} while the save ran (another process put it there), so nothing was "
                         "saved: it was left in place. Save to another path, or move it away and save again")


def _carry_over_late_entries(old: Path, target: Path, new_set: Set[str],
                             linked: Dict[str, Tuple[Tuple[int, int], Tuple[int, int]]]) -> None:
    """Move into the new set ``target`` each entry of the old set ``old`` (after the swap) that is not one of the
    ``new_set`` names it was made with, or that is no longer the entry this save linked (put over the copy it made, if
    that is still there; ``linked``: their identities by name). Created or replaced in the old directory after its
    entries were linked (by a writer that does not take turns with this save: a save into a subfolder of a directory
    saved for the first time), it would otherwise be removed with the old set. Where one cannot be moved, the old set
    is kept beside ``target`` (``<name>.late-<hex>``) with a warning, rather than removed."""
    if not os.path.isdir(old) or os.path.islink(old):  # no old set: the save made the directory
        return
    failed = []
    try:
        names = sorted(os.listdir(old))
    except OSError as error:  # unread: every entry may be a late one
        names, failed = [], [f"its list of entries ({error.strerror or error})"]
    for name in names:
        try:
            if name not in new_set:
                if not os.path.lexists(target / name):  # else made in the new set meanwhile: that one is the newer
                    _move_entry(old / name, target / name)
            elif name in linked and _identity(old / name) not in (None, linked[name][0]) and _identity(
                    target / name) == linked[name][1]:
                _replace_entry(old / name, target / name)
        except OSError as error:
            failed.append(f"{name} ({error.strerror or error})")
    if failed:
        kept = target.with_name(f"{target.name}.late-{old.name.rsplit('-', 1)[1]}")
        try:
            os.rename(old, kept)
        except OSError as error:
            warn_user(f"{target} was saved, but what another writer may have made in it meanwhile could not be moved "
                      f"into the new set ({', '.join(failed[:3])}), nor the old set kept beside it ({error.strerror}):"
                      " it is removed. Check the disk and its file system", RuntimeWarning)
            return
        warn_user(f"{target} was saved, but what another writer made in it meanwhile could not all be moved into the "
                  f"new set ({', '.join(failed[:3])}): the old set is kept as {kept}. Move those entries into {target} "
                  "yourself, then remove it", RuntimeWarning)


def _identity(path: Path) -> Optional[Tuple[int, int]]:
    """The device and inode of ``path`` itself (a symlink's own), by ``lstat`` (a directory listing's inode differs on
    overlayfs), or None where it is gone."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


def _replace_entry(newer: Path, linked: Path) -> None:
    """Put the entry ``newer`` (of the old set) in place of ``linked``, the version of it this save linked into the
    new set, which goes to the old set (and is removed with it): in one step where the platform exchanges paths."""
    if _exchange(newer, linked):
        return
    aside = newer.with_name(f".{newer.name}.linked-{os.urandom(_TOKEN_BYTES).hex()}")
    os.rename(linked, aside)
    os.rename(newer, linked)


def _move_entry(source: Path, destination: Path) -> None:
    """Rename ``source`` to ``destination``; a folder this user may not move (renaming one to another folder needs
    write permission on it) is re-created there with its files linked. Gone meanwhile: nothing to move."""
    try:
        os.rename(source, destination)
    except FileNotFoundError:
        return
    except OSError:
        if not source.is_dir() or source.is_symlink():
            raise
        _relink_folder(str(source), str(destination))


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one atomic step; False where the platform or the filesystem cannot."""
    exchange = _native_exchange()
    if exchange is None:
        return False
    if exchange(os.fsencode(first), os.fsencode(second)) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # old kernel, or e.g. some FUSE/NFS
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


@cache
def _native_exchange() -> Optional[Callable[[bytes, bytes], int]]:
    """libc's swap of two paths (0 on success, errno set otherwise): Linux renameat2, macOS renamex_np; or None."""
    if sys.platform.startswith("linux"):
        renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc 2.28+, musl 1.2.2+
        if renameat2 is None:
            return None
        renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        return lambda first, second: renameat2(_AT_FDCWD, first, _AT_FDCWD, second, _RENAME_EXCHANGE)
    if sys.platform == "darwin":
        renamex_np = ctypes.CDLL(None, use_errno=True).renamex_np  # macOS 10.12+
        renamex_np.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        return lambda first, second: renamex_np(first, second, _RENAME_SWAP)
    return None


def _remove_tree(path: Path) -> None:
    """Remove a leftover or replaced directory (``_remove_copy``); a system error doing so warns, naming it: the save
    it follows took place (or raises its own error), and the next save removes it."""
    try:
        _remove_copy(path)
    except OSError as error:
        warn_user(f"{path}, a hidden copy that a save in {path.parent} replaced or left, could not be removed "
                  f"({error.strerror or error}). The next save there removes it; saves are not affected",
                  RuntimeWarning)


def _remove_copy(path: Path) -> None:
    """Remove a leftover or replaced directory, even one whose copied mode is read-only; one holding a mount point
    is left whole (with a warning), since removing it would delete the mounted filesystem's files."""
    if not os.path.lexists(path):
        return
    mounted = _mount_point_within(path)
    if mounted is not None:
        warn_user(f"{path} was left in place: {mounted} in it is a mount point, whose files a removal would "
                  f"delete. Unmount it (umount {mounted}), then remove {path}", RuntimeWarning)
        return
    if os.path.islink(path):  # chmod would change the mode of the link's target; removing the link keeps its data
        os.unlink(path)
        return
    if not os.path.isdir(path):  # another process's file, swapped out where putting it back failed: never removed
        return
    _make_folders_writable(path)
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        stuck = next((os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names), path)
        warn_user(f"{path}, a hidden copy that a save in {path.parent} replaced or left, could not be removed ({stuck} "
                  "stays: another user's files, or an immutable folder). Remove it by hand (as its owner); saves "
                  "are not affected", RuntimeWarning)


def _make_folders_writable(path: Path) -> None:
    """Give this user write and search rights on every folder of ``path`` it owns (a copied read-only folder of the
    user's), top-down, so that its entries can be removed: only the top folder's were given, and a read-only
    sub-folder left the whole copy behind at every save. Its files are hard links shared with the saved set: their
    modes are left alone."""
    with suppress(OSError):
        os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) | 0o700)
    for folder, subfolders, _ in os.walk(path):
        for name in subfolders:
            sub = os.path.join(folder, name)
            with suppress(OSError):
                if not os.path.islink(sub):
                    os.chmod(sub, stat.S_IMODE(os.lstat(sub).st_mode) | 0o700)


class NotARegularFileError(OSError):
    """An entry ``read_files`` reads (named by the message) is a FIFO, socket or device: reading it could block or
    never end."""


class FileTooLargeError(OSError):
    """A file ``read_files`` reads is larger than its limit, or than this process can hold in memory: ``filename``
    names it, ``size`` gives its bytes and ``limit`` the limit it passed (``None`` where memory ran out)."""

    def __init__(self, filename: str, size: int, limit: Optional[int]) -> None:
        super().__init__(errno.EFBIG, "file too large", filename)
        self.size, self.limit = size, limit


def read_files(directory: PathLike, names: Sequence[str],
               max_bytes: Optional[Dict[str, int]] = None) -> Dict[str, bytes]:
    """The bytes of each of ``names`` in ``directory``, all read from one and the same directory.

    The directory is opened once and its files relative to it (where the platform allows), so a reader never
    mixes the files of two saves. When a save swaps a new set in and removes the old one while it reads, it
    reads again from the new set. A missing file or directory raises FileNotFoundError naming its path, a
    ``directory`` that is not one NotADirectoryError, a directory in place of a file IsADirectoryError, any other
    entry that is not a regular file ``NotARegularFileError``; other OSErrors name the file's full path. A file
    over its ``max_bytes`` entry, or one that does not fit in memory, raises ``FileTooLargeError`` (the limit is
    checked before reading, so a crafted huge file costs no memory).
    """
    directory = Path(directory)
    if os.open not in os.supports_dir_fd:
        return {name: read_file(directory / name, (max_bytes or {}).get(name)) for name in names}
    attempts_left = _READ_ATTEMPTS
    while True:
        try:
            dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError as error:
            raise FileNotFoundError(str(directory)) from error
        except NotADirectoryError as error:
            raise NotADirectoryError(str(directory)) from error
        try:
            return _read_relative(dir_fd, directory, names, max_bytes or {})
        except FileNotFoundError:
            attempts_left -= 1
            if attempts_left == 0 or not _was_replaced(directory, dir_fd):
                raise
        finally:
            os.close(dir_fd)


def _read_relative(dir_fd: int, directory: Path, names: Sequence[str], max_bytes: Dict[str, int]
                   ) -> Dict[str, bytes]:
    contents = {}
    for name in names:
        try:  # not blocking: a FIFO of that name would wait for a writer forever (a regular file never blocks)
            fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0), dir_fd=dir_fd)
        except FileNotFoundError as error:
            raise FileNotFoundError(str(directory / name)) from error
        except IsADirectoryError as error:
            raise IsADirectoryError(str(directory / name)) from error
        except OSError as error:  # named in full: relative to the directory, it would be named by its name alone
            raise type(error)(error.errno, error.strerror, str(directory / name)) from error
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            if stat.S_ISDIR(mode):  # Linux opens a directory read-only, and only reading it fails
                raise IsADirectoryError(str(directory / name))
            raise NotARegularFileError(str(directory / name))
        with os.fdopen(fd, "rb") as file:
            contents[name] = _read_open(file, str(directory / name), max_bytes.get(name))
    return contents


def read_file(path: Path, limit: Optional[int] = None) -> bytes:
    """The bytes of the file ``path``; ``FileTooLargeError`` for one over ``limit`` bytes (refused unread) or one
    that does not fit in memory."""
    with path.open("rb") as file:
        return _read_open(file, str(path), limit)


def _read_open(file: BinaryIO, filename: str, limit: Optional[int]) -> bytes:
    """The whole of the open ``file``, refused before reading when it is over ``limit`` bytes and named when it does
    not fit in memory (a bare MemoryError names nothing)."""
    size = os.fstat(file.fileno()).st_size
    if limit is not None and size > limit:
        raise FileTooLargeError(filename, size, limit)
    try:
        return file.read()
    except MemoryError:
        raise FileTooLargeError(filename, size, None) from None



def _was_replaced(directory: Path, dir_fd: int) -> bool:
    """Whether ``directory`` now names another directory than the open ``dir_fd`` (a save swapped it meanwhile)."""
    try:
        now = os.stat(directory)
    except OSError:
        return False
    opened = os.fstat(dir_fd)
    return (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino)
