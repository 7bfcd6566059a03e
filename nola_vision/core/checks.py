"""Argument checks at the boundary: a value of the wrong type or range is refused with its name, before it reaches
deep code (a NaN scale, a string seed, a float batch size).

Configs, ``FewShotClassifier`` and ``FewShotDataModule`` check every argument with these; each returns the value
as the code below expects it (a numpy integer as ``int``, a path as ``str``). Messages show the value through
``reprlib``, so a pathological value (a config nested 10,000 deep) still gives a short message.
"""
from __future__ import annotations

import math
import numbers
import operator
import os
import reprlib
from typing import Any, Optional, Sequence

__all__ = ["FLOAT32_MAX", "FLOAT32_TINY", "INT64_RANGE", "MAX_CLASSES", "MAX_IMAGE_SIZE", "as_integer", "check_bool",
           "check_callable", "check_choice", "check_image_size", "check_int", "check_num_classes", "check_number",
           "check_path", "is_finite_number", "shown"]

# The integers torch's integer ops and sizes take: a Python int beyond them fails deep inside an op.
INT64_RANGE = (-(2**63), 2**63 - 1)
# float32's largest and smallest normal numbers (torch.finfo(torch.float32).max and .tiny), without importing torch.
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 2.0**-126


def shown(value: Any) -> str:
    """A short repr with the type, for messages: ``'abc' (str)``."""
    return f"{reprlib.repr(value)} ({type(value).__name__})"


def as_integer(value: Any) -> Optional[int]:
    """``value`` as an ``int`` if it is an integer of any type (``numpy.int64``, a 0-d integer tensor too), else None:
    a bool, float or string is not an integer here, so ``16.0`` or ``"4"`` is refused by the caller, not rounded or
    parsed."""
    if isinstance(value, bool) or _is_array_or_bool_array(value):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _is_array_or_bool_array(value: Any) -> bool:
    """Whether ``value`` is an array (numpy, torch) with dimensions or of bools: torch's ``__index__`` takes
    ``tensor(True)`` as 1 and ``tensor([[3]])`` as 3, where numpy refuses both."""
    ndim = getattr(value, "ndim", None)
    return ndim is not None and (ndim != 0 or str(getattr(value, "dtype", "")) in ("bool", "torch.bool"))


def check_int(value: Any, name: str, *, at_least: Optional[int] = None, optional: bool = False,
              int64: bool = False) -> Optional[int]:
    """``value`` as an ``int`` (any integer type; a bool, float or string is refused, not rounded or parsed).

    ``int64``: also within ``INT64_RANGE``, for a value that reaches torch ops (a seed, a size)."""
    if value is None and optional:
        return None
    number = as_integer(value)
    if number is None or (at_least is not None and number < at_least):
        kind = ("a positive integer" if at_least == 1 else
                f"an integer >= {at_least}" if at_least is not None else "an integer")
        raise ValueError(f"{name} must be {kind}{' or null' if optional else ''}, got {shown(value)}")
    low, high = INT64_RANGE
    if int64 and not low <= number <= high:
        low = low if at_least is None else max(low, at_least)  # at_least=0 is a bound too
        raise ValueError(f"{name} must be an integer in torch's int64 range [{low}, {high}] (it reaches torch's "
                         f"integer ops), got {shown(value)}")
    return number


# More classes than any labelled set holds (ImageNet-21k has 21,841; face-identity sets a few million): a head of
# 2**40 classes failed in torch's allocator, asking for 256 TiB.
MAX_CLASSES = 2**24


def check_num_classes(value: Any, name: str = "num_classes", optional: bool = False) -> Optional[int]:
    """``value`` as a class count: an integer from 0 (a headless encoder) to ``MAX_CLASSES``."""
    number = check_int(value, name, at_least=0, optional=optional)
    if number is not None and number > MAX_CLASSES:
        raise ValueError(f"{name} must be at most {MAX_CLASSES:,} classes (the head would hold that many rows of "
                         f"weights), got {shown(value)}")
    return number


# Four times the largest input of any timm model (SAM's ViTs take 1,024 px): a batch of 32 images of 100,000 px
# asked for terabytes, and the process was killed at its first batch without a word.
MAX_IMAGE_SIZE = 4096


def check_image_size(value: Any, name: str = "image_size", optional: bool = False) -> Optional[int]:
    """``value`` as a square input size in pixels: an integer from 1 to ``MAX_IMAGE_SIZE``."""
    number = check_int(value, name, at_least=1, optional=optional)
    if number is not None and number > MAX_IMAGE_SIZE:
        raise ValueError(f"{name} must be at most {MAX_IMAGE_SIZE:,} pixels (four times the largest input of any timm "
                         f"model; one 3-channel float image of {number:,} px holds {12 * number**2 / 2**20:,.0f} MiB, "
                         "a batch of 32 as many times that), "
                         f"got {shown(value)}")
    return number


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is an int or float a float holds finite: not a bool, NaN, an infinity, nor an integer beyond
    float's range (JSON reads ``1e400`` as inf but ``10**400`` as an int, on which ``math.isfinite`` overflows)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_number(value: Any, name: str, *, above: Optional[float] = None, at_least: Optional[float] = None,
                 below: Optional[float] = None, optional: bool = False) -> Optional[float]:
    """``value`` if it is a finite real number in range (NaN and inf are refused); a numpy scalar becomes a float."""
    if value is None and optional:
        return None
    try:
        number = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an int beyond float's range
        number = math.inf
    bounds = [(bound, op, ok) for bound, op, ok in ((above, ">", operator.gt), (at_least, ">=", operator.ge),
                                                     (below, "<", operator.lt)) if bound is not None]
    if not math.isfinite(number) or not all(ok(number, bound) for bound, _, ok in bounds):
        limits = " and ".join(f"{op} {bound}" for bound, op, _ in bounds)
        raise ValueError(f"{name} must be a finite number{' ' + limits if limits else ''}"
                         f"{' or null' if optional else ''}, got {shown(value)}")
    return value if type(value) in (int, float) else number


def check_bool(value: Any, name: str, *, optional: bool = False) -> Optional[bool]:
    """``value`` if it is ``True`` or ``False`` (or, ``optional``, None), a numpy bool as a ``bool`` (a string such as
    ``"no"`` would count as true)."""
    if value is None and optional:
        return None
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):
        return bool(value)
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true{', false or None' if optional else ' or false'}, got {shown(value)}")
    return value


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {shown(value)}")
    return value


def check_callable(value: Any, name: str) -> Any:
    """``value`` if it is callable or None (a transform): else refused now, not at the first image it is given."""
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a callable (e.g. a torchvision transform) or None, got {shown(value)}")
    return value


def check_path(value: Any, name: str, *, optional: bool = False, expand_user: bool = False) -> Optional[str]:
    """``value`` as a ``str`` path (a ``str`` or ``os.PathLike``, not empty); ``expand_user``: with a leading ``~``
    expanded to the home folder, as a shell would, so that the API and the CLI name the same folder."""
    if value is None and optional:
        return None
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ValueError(f"{name} must be a path{' or null' if optional else ''}, got {shown(value)}")
    return os.path.expanduser(os.fspath(value)) if expand_user else os.fspath(value)
