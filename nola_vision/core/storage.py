"""Atomic file writes: readers see the old or the new content, never half of it, and failures leave no temp files.

One file is written to a temporary sibling and renamed over the target. A set of files that must stay
consistent (an adapter's config and weights) is written into a sibling temporary directory that is then
swapped in, so the old set stays whole until the new one is complete.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]


@contextmanager
def atomic_path(path: PathLike, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds, rename it onto ``path``.

    On any failure the temporary file is removed and ``path`` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode)  # mkstemp makes 0600; shared caches and run folders stay readable by others
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: PathLike, obj: Any, indent: int = 1, sort_keys: bool = True) -> Path:
    """Write ``obj`` as JSON (plus a final newline) to ``path`` atomically; returns the path."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


@contextmanager
def atomic_directory(path: PathLike) -> Iterator[Path]:
    """Yield an empty sibling temporary directory; when the block succeeds, swap it in as ``path``.

    Files of an existing ``path`` that the block did not write are moved over, so only the written set is
    replaced. The old directory is renamed away before the new one is renamed in and deleted only after,
    so a failure at any point leaves the old set whole (or, between the two renames, beside it under a
    ``.<name>.old.*`` sibling). No temporary directory survives a failure of the block.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700
        if not path.exists():
            os.rename(tmp, path)
            return
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old.", suffix=".tmp"))
        os.rename(path, old / "content")
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(old / "content", path)
            old.rmdir()
            raise
        for entry in (old / "content").iterdir():
            if not (path / entry.name).exists():
                os.rename(entry, path / entry.name)
        shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_files(directory: PathLike, names: Sequence[str]) -> Dict[str, bytes]:
    """The bytes of each of ``names`` in ``directory``, all read from one and the same directory.

    The directory is opened once and its files relative to it (where the platform allows), so a reader never
    mixes the files of two saves when a writer swaps a new set in meanwhile. A missing file raises
    FileNotFoundError naming its path.
    """
    directory = Path(directory)
    if os.open not in os.supports_dir_fd:
        return {name: (directory / name).read_bytes() for name in names}
    try:
        dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (FileNotFoundError, NotADirectoryError) as error:
        raise FileNotFoundError(f"{directory} is not a directory") from error
    try:
        contents = {}
        for name in names:
            try:
                fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
            except (FileNotFoundError, IsADirectoryError) as error:
                raise FileNotFoundError(str(directory / name)) from error
            with os.fdopen(fd, "rb") as file:
                contents[name] = file.read()
        return contents
    finally:
        os.close(dir_fd)
