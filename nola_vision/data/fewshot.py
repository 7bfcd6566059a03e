"""Seeded k-shot splits and their manifests (``relative/path label`` per line).

The draw is a counter-based generator: within each class, train images are ordered by
``blake2b(split_seed, image key)`` and the first ``shots`` are taken, the next ``val_shots`` form the
validation subset. It depends only on the seed and the image keys (paths relative to the dataset root, class
folder included), so it is identical in every process,
on every DDP rank, on every platform and torch version, and never touches a global RNG. A 5-shot draw is
the prefix of the 10-shot draw with the same seed.
"""

from __future__ import annotations

import hashlib
import numbers
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

from ..core.checks import as_integer, check_bool, check_path, shown
from ..core.warn import warn_user

__all__ = ["FewShotSplit", "NotEnoughImagesError", "composed_name", "draw_order", "in_draw_order",
           "indices_from_manifest", "manifest_settings", "order_digest", "read_manifest", "sample_kshot",
           "split_digest", "write_manifest"]


class NotEnoughImagesError(ValueError):
    """A class has fewer train images than the split asks for; ``shortage`` says which, without the advice."""

    def __init__(self, message: str, shortage: str = "") -> None:
        super().__init__(message)
        self.shortage = shortage or message


@dataclass(frozen=True)
class FewShotSplit:
    """Indices into the train split: the k-shot training set and the disjoint validation subset."""

    train: list[int]
    val: list[int] = field(default_factory=list)


def composed_name(name: str) -> str:
    """``name`` in Unicode's composed form (NFC), as draws, digests and checks compare names: macOS's HFS+ stores
    ``é`` decomposed (NFD), so a copy of a folder there names the same images and classes with other code points.
    Surrogate escapes (bytes that are no UTF-8) are left as they are."""
    return unicodedata.normalize("NFC", name)


def draw_order(key: str, seed: int) -> int:
    """The position-free sort key of one image for split seed ``seed`` (64 bits of blake2b). A file name that is not
    UTF-8 (Python's surrogate escapes) hashes as its bytes; any other key as its UTF-8 encoding, in Unicode's composed
    form (NFC): a folder copied to macOS's HFS+ names ``é`` decomposed, and drew other images from the same files."""
    digest = hashlib.blake2b(f"{seed}\0{composed_name(key)}".encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def in_draw_order(samples: Sequence[tuple[str, int]], indices: Iterable[int], seed: int) -> list[int]:
    """``indices`` in the order ``sample_kshot`` gives its draw of split seed ``seed`` (by label, then ``draw_order``):
    a manifest's images train in this order whatever the order of its lines, so a re-ordered copy of it replays (and
    resumes) the run it records, and not another."""
    return sorted(indices, key=lambda i: (samples[i][1], draw_order(samples[i][0], seed), i))


def _integer(value: object, name: str) -> int:
    """``value`` as an int, refusing a bool or a float: the draw hashes the seed's text, so ``3.0`` or ``True`` would
    silently draw another split than ``3`` or ``1``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        # int() of a number is the fix the user may mean; of anything else (None, text, a list) it fails in turn
        hint = f"; pass int({value!r}) if that is the number you mean" if isinstance(value, numbers.Real) else ""
        raise TypeError(f"sample_kshot: {name} must be an integer, got {value!r} ({type(value).__name__}){hint}")
    return int(value)


def _is_label(value: object) -> bool:
    """Whether ``value`` is an integer label (a bool is not one)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _refuse_unknown_labels(by_class: dict[int, list[int]], num_classes: int, named: bool) -> None:
    """Refuse labels outside ``0 .. num_classes - 1`` (``named``: that count is ``len(class_names)``): their images
    would silently never be drawn."""
    unknown = sorted((label for label in by_class
                      if not (_is_label(label) and 0 <= label < num_classes)), key=str)
    if not unknown:
        return
    shown_labels = f"{unknown[:10]}{' ...' if len(unknown) > 10 else ''}"
    if named:
        raise ValueError(f"sample_kshot: labels {shown_labels} are not classes 0..{num_classes - 1} "
                         f"(len(class_names)={num_classes}): pass the class_names of these samples, or fix their "
                         "labels")
    raise ValueError(f"sample_kshot: labels {shown_labels} are not class numbers: a label is an integer 0, 1, ... "
                     "(a bool, float or string is not one): fix the samples' labels")


def sample_kshot(samples: Sequence[tuple[str, int]], shots: int, seed: int = 0, val_shots: int = 0,
                 class_names: Optional[Sequence[str]] = None, allow_fewer: bool = False) -> FewShotSplit:
    """Draw ``shots`` train and ``val_shots`` validation images per class; ``shots=0`` keeps all the rest.

    A class with too few images raises :class:`NotEnoughImagesError` naming it and its count, unless
    ``allow_fewer`` (then it keeps what it has, training images first). ``seed``, ``shots`` and ``val_shots`` must
    be integers (a bool or float is refused), and every label one of ``class_names``.
    """
    seed, shots, val_shots = (_integer(v, n) for v, n in ((seed, "seed"), (shots, "shots"), (val_shots, "val_shots")))
    if shots < 0 or val_shots < 0:
        raise ValueError(f"shots and val_shots must be >= 0, got {shots} and {val_shots}")
    allow_fewer = check_bool(allow_fewer, "sample_kshot: allow_fewer")
    if isinstance(class_names, (str, bytes)):  # its characters would be taken as the names
        raise TypeError(f"sample_kshot: class_names is a list of names, one per label, got {shown(class_names)}: "
                        f"pass [{class_names!r}] for one class")
    if not isinstance(samples, Sequence) or isinstance(samples, (str, bytes)):
        raise TypeError(f"sample_kshot: samples are a sequence of (image path, integer label) pairs, got a "
                        f"{type(samples).__name__}")
    if not samples and class_names is None:  # no class to draw from (with class_names, each is named short below)
        raise ValueError("sample_kshot: samples is empty: there are no images to draw a split from (check the "
                         "dataset's root and its files)")
    by_class: dict[int, list[int]] = {}
    first: dict[str, int] = {}  # each key's index: an image listed twice would count twice among a class's shots
    for index, sample in enumerate(samples):
        if not isinstance(sample, (tuple, list)) or len(sample) != 2:
            raise TypeError(f"sample_kshot: samples are (image path, integer label) pairs, got {sample!r} at index "
                            f"{index}")
        key = sample[0]
        if not isinstance(key, str):
            raise TypeError(f"sample_kshot: an image key is a str (its path relative to the dataset's root), got "
                            f"{shown(key)} at index {index}: pass str(key)")
        if key in first:  # (or in two classes): the split would hold fewer distinct images than it says
            raise ValueError(f"sample_kshot: {_shown_key(key)} is listed twice (at indices {first[key]} and {index}): "
                             "each image is one sample, or the split would hold fewer distinct images than it says")
        first[key] = index
        by_class.setdefault(sample[1], []).append(index)
    num_classes = len(class_names) if class_names is not None else max(filter(_is_label, by_class), default=-1) + 1
    _refuse_unknown_labels(by_class, num_classes, named=class_names is not None)
    train: list[int] = []
    val: list[int] = []
    short = []
    for label in range(num_classes):
        members = in_draw_order(samples, by_class.get(label, []), seed)
        need = (shots if shots else 1) + val_shots
        if len(members) < need:
            name = class_names[label] if class_names is not None else str(label)
            short.append(f"class '{name}' (label {label}) has {len(members)} train images")
        k = shots if shots else max(len(members) - val_shots, min(len(members), 1))  # training images first
        train.extend(members[:k])
        val.extend(members[k:k + val_shots])
    if short:
        msg = (f"{'; '.join(short[:10])}{' ...' if len(short) > 10 else ''}; a {shots}-shot split"
               f"{f' with {val_shots} validation images' if val_shots else ''} needs "
               f"{(shots or 1) + val_shots} per class")
        if not allow_fewer:
            raise NotEnoughImagesError(f"{msg}. Pass allow_fewer=True (--data.allow_fewer true) to keep what "
                                       "there is, or lower shots/val_shots.", shortage=msg)
        warn_user(f"{msg}; allow_fewer=True keeps what there is")
    if not train and not val:  # no images (or no classes): allow_fewer kept an empty split, which trains nothing
        raise NotEnoughImagesError(f"sample_kshot: there are no images of any of the {num_classes} classes to draw "
                                   "a split from (check the dataset's root and its files)", shortage="no images")
    return FewShotSplit(train, val)


def split_digest(samples: Sequence[tuple[str, int]], split: FewShotSplit) -> str:
    """sha256 of the split's training and validation images (sorted ``key label`` lines, so not of their order).

    Keys, not indices: an image added to a class folder shifts the indices of others without changing their draw.
    Keys in their composed form (:func:`composed_name`), so that a macOS copy of the folder gives the same digest.
    """
    digest = hashlib.sha256()
    for part, indices in (("train", split.train), ("val", split.val)):
        lines = sorted(f"{composed_name(samples[i][0])} {samples[i][1]}" for i in indices)
        digest.update("\n".join([f"{part} {len(lines)}", *lines, ""]).encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def order_digest(pairs: Sequence[tuple[str, int]]) -> str:
    """sha256 of ``(key, label)`` pairs in their order: the order a split's training images are indexed in, which a
    seeded sampler's shuffle indexes into (the same images in another order train in other batches). Keys in their
    composed form, as :func:`split_digest` takes them."""
    lines = "".join(f"{composed_name(key)} {label}\n" for key, label in pairs)
    return hashlib.sha256(lines.encode("utf-8", "surrogateescape")).hexdigest()


def write_manifest(path: str | os.PathLike, samples: Sequence[tuple[str, int]], indices: Sequence[int],
                   header: Optional[str] = None) -> Path:
    """Write ``key label`` for each chosen sample, atomically; ``header`` becomes ``#`` comment lines. UTF-8, with a
    non-UTF-8 file name (a key with surrogate escapes) written as its bytes, so it reads back as the same key."""
    path = Path(check_path(path, "the manifest"))
    if header is not None and not isinstance(header, str):
        raise TypeError(f"write_manifest: header is a str of comment lines or None, got {shown(header)}")
    if indices is None or isinstance(indices, (str, bytes)):
        raise TypeError(f"write_manifest: indices are the chosen samples' positions, got {shown(indices)}")
    lines = [f"# {line}\n" for line in (header.splitlines() if header else [])]
    lines += [f"{_escaped(samples[i][0])} {samples[i][1]}\n" for i in _manifest_indices(samples, indices)]
    from ..core.storage import write_text_atomic  # here, so the split logic above imports alone (tests load it by path)

    return write_text_atomic(path, "".join(lines))


# A key that would read as a comment (``#1/img.png``, a class folder named "#1") is written after this mark, as is a
# key that begins with it; read_manifest drops the mark before those alone, so older files read as they did.
_ESCAPE = "\\"


def _needs_escape(key: str) -> bool:
    return key.lstrip().startswith("#") or key.startswith(_ESCAPE)


def _escaped(key: str) -> str:
    """``key`` as a manifest line holds it (``_ESCAPE``)."""
    return _ESCAPE + key if _needs_escape(key) else key


def _unescaped(key: str) -> str:
    """A manifest line's key as written to it (``_escaped``'s inverse)."""
    return key[len(_ESCAPE):] if key.startswith(_ESCAPE) and _needs_escape(key[len(_ESCAPE):]) else key


def _manifest_indices(samples: Sequence[tuple[str, int]], indices: Sequence[int]) -> list[int]:
    """``indices`` as ints, each the position of a sample ``read_manifest`` reads back as written: a negative index
    would wrap to another sample, ``True`` count as 1, and a repeated index, a label that is not an integer or a key
    with a line break would write a manifest that ``indices_from_manifest`` refuses."""
    checked: list[int] = []
    seen: set[int] = set()  # a set: a full-split manifest lists tens of thousands of images
    for index in indices:
        number = as_integer(index)
        if number is None or not 0 <= number < len(samples):
            raise ValueError(f"write_manifest: indices must be positions in samples, integers 0..{len(samples) - 1}, "
                             f"got {shown(index)}")
        if number in seen:
            raise ValueError(f"write_manifest: index {number} is listed twice: a manifest lists each image once (a "
                             "repeated line would not read back)")
        key, label = samples[number]
        if not isinstance(key, str) or "\n" in key or "\r" in key:
            raise ValueError(f"write_manifest: sample {number} has key {shown(key)}: a key is a path without line "
                             "breaks (its manifest line would not read back)")
        if not _is_label(label):
            raise ValueError(f"write_manifest: sample {number} ({key!r}) has label {shown(label)}: a label is an "
                             "integer (a bool, float or string would not read back)")
        checked.append(number)
        seen.add(number)
    return checked


def read_manifest(path: str | os.PathLike) -> list[tuple[str, int]]:
    """Read a manifest back as ``(key, label)`` pairs (``#`` lines and blank lines are skipped, a key's ``\\`` escape
    dropped); UTF-8 whatever the locale, bytes that are not UTF-8 as surrogate escapes (as ``write_manifest`` wrote
    them)."""
    entries = []
    path = check_path(path, "the manifest")  # an int would be read (and closed) as an open file descriptor
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:  # -sig: a byte-order mark is not a key
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                key, label = line.rsplit(" ", 1)  # keys may contain spaces; the label never does
                if not _is_class_number(label):  # int() also takes "+1", "00", "1_0" and "١"
                    raise ValueError
                entries.append((_unescaped(key), int(label)))
            except ValueError:
                raise ValueError(f"{path}:{lineno}: expected 'relative/path label' with the label a class number "
                                 f"(0, 1, 2, ...), got {line!r}") from None
    return entries


def _is_class_number(text: str) -> bool:
    """Whether ``text`` is a class number as ``write_manifest`` writes it: ASCII digits, no sign or leading zero."""
    return text.isascii() and text.isdigit() and (text == "0" or not text.startswith("0"))


def manifest_settings(path: str | os.PathLike) -> dict[str, str]:
    """The ``key=value`` settings of a manifest's header (``write_manifest``'s first comment line), {} without."""
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        first = f.readline()
    return dict(t.split("=", 1) for t in first.lstrip("#").split() if "=" in t) if first.startswith("#") else {}


def _shown_key(key: str) -> str:
    """A key as an error shows it: quoted, with invisible or look-alike characters escaped."""
    return repr(key) if key.isprintable() and key.isascii() else ascii(key)


def _near_key(key: str, position: dict) -> str:
    """Why ``key`` may be missing: a dataset key that differs only in Unicode normalization or surrounding spaces."""
    wanted = composed_name(key).strip()
    near = next((k for k in position if composed_name(k).strip() == wanted), None)
    if near is None:
        return " (wrong dataset or root, or the image was moved or deleted since the manifest was written?)"
    return (f": the dataset has {ascii(near)}, the same name written with other code points or spaces (the file was "
            "renamed or copied by a tool that normalizes names, e.g. on macOS). Write the manifest's key as the file "
            "is named, or rename the file")


def _renumbered(samples: Sequence[tuple[str, int]], entries: Sequence[tuple[str, int]], position: dict) -> str:
    """Why labels differ where the manifest's classes map one to one, in order, onto other numbers: the dataset's
    classes changed since it was written (a class folder added, removed or renamed sorts before them)."""
    moved: dict[int, set[int]] = {}
    for key, label in entries:
        if key in position and isinstance(label, int):
            moved.setdefault(label, set()).add(samples[position[key]][1])
    if any(len(now) != 1 for now in moved.values()):
        return ""  # not one renumbering: the manifest's labels were edited, or it is another dataset's
    old = sorted(moved)
    new = [next(iter(moved[label])) for label in old]
    if any(a >= b for a, b in zip(new, new[1:])):  # classes keep their sorted order when one is added or removed
        return ""
    changes = [(label, now) for label, now in zip(old, new) if now != label]
    shown = ", ".join(f"{label} is {now}" for label, now in changes[:4]) + ", ..." * (len(changes) > 4)
    if old[0] == 1 and all(now == label - 1 for label, now in zip(old, new)):
        return (f". The manifest's labels look counted from 1 ({shown}): labels count from 0, the classes in sorted "
                "order (a class folder removed before them since it was written does the same: restore it)")
    return (f". The dataset numbers the manifest's classes otherwise now ({shown}): a class was added, removed or "
            "renamed since the manifest was written, sorting before them, or the manifest was written with other "
            "numbers. Restore the class folders as they were, or drop split_file to draw a new split")


def indices_from_manifest(samples: Sequence[tuple[str, int]], entries: Sequence[tuple[str, int]],
                          source: str = "manifest") -> list[int]:
    """Map manifest entries onto dataset indices, checking that every key exists with the same label, once. A key
    found only in another Unicode normalization (a manifest written on Linux, replayed on a macOS copy) is that image
    where no other name of the dataset has the same composed form."""
    position = {key: i for i, (key, _) in enumerate(samples)}
    composed: Optional[dict[str, Optional[int]]] = None  # made at the first key not found as it is
    indices: list[int] = []
    listed: set[int] = set()  # a set: a full-split manifest lists tens of thousands of images
    if entries is None or isinstance(entries, (str, bytes)):
        raise TypeError(f"{source}: entries are (key, label) pairs as read_manifest gives them, got {shown(entries)}")
    for entry in entries:
        try:
            key, label = entry
        except (TypeError, ValueError):
            raise TypeError(f"{source}: each entry is a (key, label) pair as read_manifest gives it, got "
                            f"{shown(entry)}") from None
        if not isinstance(key, str):
            raise TypeError(f"{source}: a key is a str (the image's path relative to the dataset's root, as "
                            f"read_manifest gives it), got {shown(key)}")
        if not _is_label(label):
            raise TypeError(f"{source}: {_shown_key(key)} has label {shown(label)}: a label "
                            "is an integer, as read_manifest gives it")
        if key not in position and composed is None:
            composed = {}
            for name, index in position.items():  # None: two names of that form, which only the name itself tells
                form = composed_name(name)
                composed[form] = None if form in composed else index
        i = position[key] if key in position else composed.get(composed_name(key))
        if i is None:
            raise ValueError(f"{source}: {_shown_key(key)} is not in the dataset's train split"
                             f"{_near_key(key, position)}")
        if i in listed:
            raise ValueError(f"{source}: '{key}' is listed twice: a manifest lists each image once (a repeated line "
                             "would train on fewer distinct images than it records)")
        if samples[i][1] != label:
            raise ValueError(f"{source}: '{key}' has label {label}, but the dataset says {samples[i][1]}"
                             f"{_renumbered(samples, entries, position)}")
        indices.append(i)
        listed.add(i)
    return indices
