"""Warnings that name the user's line: the first frame outside nola_vision, torch and Lightning, however deep the
library was called from there (one rule for every warning, instead of a stack depth counted at each call)."""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import warnings
from typing import Tuple, Type

__all__ = ["warn_user"]

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Frameworks that call back into the library (nn.Module's __call__ and load_state_dict, timm's blocks, a Trainer's
# hooks, the CLI's parser): their frames lie between the user's line and the warning too. Only those already imported
# are looked for.
_FRAMEWORKS = ("torch", "torchvision", "timm", "lightning", "pytorch_lightning", "jsonargparse")


def warn_user(message: str, category: Type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the first frame outside the library and the frameworks
    that call it: the user's line (a script's, a notebook cell's, a test's), where the warning filters match it."""
    warnings.warn(message, category, stacklevel=_user_stacklevel(_internal_folders()))


def _user_stacklevel(internal: Tuple[str, ...]) -> int:
    """The ``stacklevel`` for a ``warnings.warn`` inside ``warn_user`` that names the first frame whose file is in none
    of ``internal``; the outermost frame when every frame is (a console script's)."""
    frame, level = sys._getframe(2), 2  # warn_user's caller
    while frame.f_back is not None and (os.path.abspath(frame.f_code.co_filename).startswith(internal)
                                        or _is_import_machinery(frame)):
        frame = frame.f_back
        level += not _is_import_machinery(frame)  # warnings.warn does not count these frames in a stacklevel
    return level


def _is_import_machinery(frame) -> bool:
    """Whether ``frame`` runs importlib's bootstrap code, which ``warnings.warn`` skips (a warning during an import)."""
    name = frame.f_code.co_filename
    return "importlib" in name and "_bootstrap" in name


# Standard-library code that runs library code on its behalf: a context manager's exit (atomic_directory's cleanup),
# an import. (A warning in a worker thread names the thread's outermost frame: the user's line is in another thread.)
_PLUMBING = (os.path.abspath(contextlib.__file__),
             os.path.join(os.path.dirname(os.path.abspath(importlib.__file__)), ""))


def _internal_folders() -> Tuple[str, ...]:
    """The prefixes of frames that are not the user's: the folders (with a trailing separator) of this package and of
    the imported frameworks, and the standard library's plumbing (``_PLUMBING``)."""
    folders = [_PACKAGE]
    for name in _FRAMEWORKS:
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if path:
            folders.append(os.path.dirname(os.path.abspath(path)))
    return tuple(os.path.join(folder, "") for folder in folders) + _PLUMBING
