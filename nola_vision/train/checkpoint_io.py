"""Checkpoints written the way the library writes its own files: to a temporary name beside the final one, then
renamed into place (``core.storage.atomic_path``), so a checkpoint under its final name is always whole."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

import numpy as np
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..core.fingerprint import tensors_sha256
from ..core.storage import write_bytes_atomic

__all__ = ["HYPER_PARAMETER_ENTRIES", "LocalAtomicCheckpointIO", "UnsafeCheckpointError", "changed_resume_state",
           "load_checkpoint", "nested_sha256", "newest_checkpoint", "require_readable_file", "require_whole_checkpoint",
           "resume_state_sha256", "use_atomic_checkpoints"]

# Entries left out of ``resume_state_sha256``: the Lightning version (a load sets it to the running one's), the trained
# tensors (hashed apart, as ``trained_sha256``) and the library's record (hashed apart, holding the digests).
_HASHED_APART = frozenset({"pytorch-lightning_version", "legacy_pytorch-lightning_version", "state_dict",
                           "nola_vision"})
# Entries ``load_from_checkpoint`` updates in place with its keyword arguments: compared only where a trainer read the
# file (a resume through ``ckpt_path``), which reads them as written.
HYPER_PARAMETER_ENTRIES = frozenset({"hyper_parameters", "hparams_name", "hparams_type", "datamodule_hyper_parameters",
                                     "datamodule_hparams_name", "datamodule_hparams_type"})


class LocalAtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local checkpoints are renamed into place from beside their final name.

    Lightning's own writer stages a checkpoint in the system's temporary folder and moves it: where the run folder
    lies on another file system (a local ``/tmp``, runs on NFS or Lustre) the move is a copy onto the final name, so a
    full disk or a kill during it left a checkpoint cut short there, over the previous ``last.ckpt``. A symbolic link
    at the path is replaced, as Lightning's writer does: ``save_last="link"`` links ``last.ckpt`` to the best
    checkpoint, which a resumed run's next save would otherwise overwrite. Remote paths (``s3://``) keep Lightning's
    writer."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        buffer = io.BytesIO()  # as Lightning's: torch's own file writer reports a full disk with no errno
        torch.save(checkpoint, buffer)
        write_bytes_atomic(path, buffer.getbuffer(), follow_links=False)  # a link to the best checkpoint stays it

    def load_checkpoint(self, path: _PATH, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        require_whole_checkpoint(path)
        return super().load_checkpoint(path, *args, **kwargs)


def use_atomic_checkpoints(trainer: Any) -> None:
    """Give ``trainer`` a ``LocalAtomicCheckpointIO`` where it has Lightning's default writer (not a plugin of the
    user's): its checkpoints are then whole under their final names, and a cut-short one it is given is named."""
    strategy = getattr(trainer, "strategy", None)
    if strategy is not None and type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = LocalAtomicCheckpointIO()


def resume_state_sha256(checkpoint: Mapping[str, Any]) -> Dict[str, str]:
    """sha256 of each entry of a Lightning checkpoint that a resume restores as it is (the optimiser's moments, the
    schedules, the loops' counters, callbacks', the precision plugin's and the data module's states), by entry: a
    damaged one (``torch.load`` does not check the zip's CRCs) would resume silently elsewhere than the run was. The
    hyper-parameters too: a resume builds its model from them (the CLI, ``load_from_checkpoint``)."""
    return {key: nested_sha256(value) for key, value in checkpoint.items() if key not in _HASHED_APART}


def changed_resume_state(checkpoint: Mapping[str, Any], recorded: Mapping[str, str],
                         skip: Iterable[str] = ()) -> List[str]:
    """The entries of ``checkpoint`` whose sha256 is not ``recorded``'s (``resume_state_sha256`` at its save), or
    that are gone, but for those in ``skip``; entries added since (none are, but by a later Lightning's migration) are
    no damage."""
    skip = set(skip)
    return sorted(key for key, digest in recorded.items()
                  if key not in skip and (key not in checkpoint or nested_sha256(checkpoint[key]) != digest))


def nested_sha256(value: Any) -> str:
    """sha256 of a checkpoint entry: nested mappings (in key order), sequences, tensors, arrays, paths and scalars,
    each with its type; other objects count as one and the same (no stable bytes to read, and their classes' modules
    move between versions: ``pathlib._local`` in Python 3.13)."""
    digest = hashlib.sha256()
    _feed(digest, value)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    """Add ``value`` to ``digest`` (see ``nested_sha256``). Scalars by their builtin ``repr``: numpy's own (which
    changed in numpy 2) would tell a version apart from damage."""
    if isinstance(value, torch.Tensor):
        digest.update(tensors_sha256([("tensor", value)]).encode())
    elif isinstance(value, np.ndarray):
        digest.update(f"array|{value.dtype.str}|{value.shape}|".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, np.generic):
        _feed(digest, value.item())
    elif isinstance(value, Mapping):
        items = sorted(value.items(), key=lambda item: (type(item[0]).__name__, repr(item[0])))
        digest.update(f"mapping|{len(items)}|".encode())
        for key, item in items:
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__}|{len(value)}|".encode())
        for item in value:
            _feed(digest, item)
    elif isinstance(value, (set, frozenset)):
        _feed(digest, sorted(value, key=repr))
    elif isinstance(value, bool) or value is None:
        digest.update(f"{value}|".encode())
    elif isinstance(value, int):
        digest.update(f"int|{int.__repr__(value)}|".encode())
    elif isinstance(value, float):
        digest.update(f"float|{float.__repr__(value)}|".encode())
    elif isinstance(value, (str, bytes)):
        digest.update(f"{type(value).__name__}|{len(value)}|".encode())
        digest.update(value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value)
    elif isinstance(value, os.PathLike):
        _feed(digest, ("path", os.fspath(value)))
    else:
        digest.update(b"object|")


class UnsafeCheckpointError(ValueError):
    """A checkpoint holding objects that ``weights_only`` loading refuses (as Lightning's does): a full unpickling of
    it would run the code it names."""


def load_checkpoint(path: _PATH) -> Any:
    """``torch.load`` of a local checkpoint file on the CPU, its tensors memory-mapped from a zip file where torch can
    open the path itself. Torch's own file opening encodes the path as UTF-8: under another file-system encoding (a
    Latin-1 locale's ``dépôt``) or with a byte UTF-8 cannot decode, it found no such file, so such a path is read
    through a Python file object.

    Always ``weights_only`` (tensors and plain values, as Lightning loads a fit's checkpoint): a run folder may be
    someone else's, and a full unpickling of its ``last.ckpt`` would run whatever code the file names."""
    path = os.fspath(path)
    try:
        if _torch_opens(path) and zipfile.is_zipfile(path):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        with open(path, "rb") as file:
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f"{found.group(1)}, " if found else ""
        raise UnsafeCheckpointError(
            f"{path} holds objects that safe loading refuses ({what}see torch.load's weights_only), so Lightning "
            "cannot read it (nor is it unpickled in full, which would run the code it names): a checkpoint of other "
            "code, or of a callback that stores such objects. Pass a checkpoint that nola-vision fit wrote") from err


def _torch_opens(path: Any) -> bool:
    """Whether torch's C++ file opening finds ``path``: its UTF-8 bytes are the ones the file system uses."""
    try:
        return isinstance(path, str) and path.encode("utf-8") == os.fsencode(path)
    except UnicodeError:
        return False


def newest_checkpoint(paths: Iterable[_PATH], accept: Callable[[Path], bool] = lambda path: True) -> Optional[Path]:
    """The most recently modified file of ``paths`` that ``accept`` takes, or None: the checkpoint that names a run
    where its ``last.ckpt`` is not the one (missing, cut short, or not of the kind asked)."""
    for path in sorted(map(Path, paths), key=_modified, reverse=True):
        if path.is_file() and accept(path):
            return path
    return None


def require_whole_checkpoint(path: _PATH, option: str = "ckpt_path") -> None:
    """Refuse a local file that is no torch archive (another file, or a checkpoint cut short by a full disk or an
    interrupted copy), naming the newest whole checkpoint beside it: torch's own error is a bare ``OSError: [Errno
    22] Invalid argument`` that names no file."""
    if not isinstance(path, (str, os.PathLike)) or "://" in str(path):
        return
    require_readable_file(path, option)
    if not os.path.isfile(path) or zipfile.is_zipfile(path) or _is_legacy_torch_file(path):
        return
    file = Path(path)
    whole = newest_checkpoint((p for p in file.parent.glob("*.ckpt") if p != file), zipfile.is_zipfile)
    named = f"{option} {whole}" if option.startswith("--") else f"{option}={str(whole)!r}"
    beside = f" (the newest whole one beside it: {named})" if whole else ""
    raise ValueError(f"{option} {path} is not a checkpoint written by fit (a torch archive), or it was cut short (a "
                     f"full disk, an interrupted copy): pass another checkpoint of the run{beside}")


def require_readable_file(path: _PATH, option: str = "ckpt_path") -> None:
    """Refuse a file this process may not read, or reach (a folder above it without search rights), saying so: it
    was taken for a checkpoint cut short, with an older one beside it advised, or failed with a bare ``[Errno 13]``."""
    if os.path.isdir(path):  # the callers name it (Windows opens no directory: it would read as unreadable)
        return
    try:
        os.close(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)))  # not blocking on a named pipe
    except PermissionError as err:
        raise PermissionError(err.errno, f"{option} {path} cannot be read ({err.strerror}): make it, and the folders "
                                         "above it, readable by this user (chmod u+r, chmod u+x on the folders), or "
                                         "run as its owner") from err
    except OSError:  # missing, a directory: the callers' checks name those
        pass


def _is_legacy_torch_file(path: _PATH) -> bool:
    """Whether ``path`` begins as torch's format before zip archives does (a pickle, ``_use_new_zipfile_serialization=
    False``): torch reads it, so it is not taken for a checkpoint cut short."""
    try:
        with open(path, "rb") as file:
            return file.read(2) == b"\x80\x02"  # pickle protocol 2, which that format's first record uses
    except OSError:
        return False


def _modified(path: Path) -> float:
    """``path``'s modification time; 0 for a file gone since it was listed."""
    with contextlib.suppress(OSError):
        return path.stat().st_mtime
    return 0.0
