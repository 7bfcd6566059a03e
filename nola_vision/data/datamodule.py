"""``FewShotDataModule``: a seeded k-shot train split, an optional validation subset, the full test split.

Where the split is drawn, the drawn images of an ImageFolder are checked for byte-identical copies that would mislead
training or testing (:func:`_copies_of_drawn`): only files of a drawn image's size are read, so the cost is that of the
drawn images and their size-mates, not of the dataset.
"""

from __future__ import annotations

import hashlib
import os
import random
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import lightning as L
import torch
from lightning.fabric.utilities.data import AttributeDict
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from ..core.checks import (
    check_bool,
    check_callable,
    check_choice,
    check_image_size,
    check_int,
    check_number,
    check_path,
    shown,
)
from ..core.warn import warn_user
from .datasets import (
    ArrayImageDataset,
    CorruptImageError,
    ImageDataset,
    available_datasets,
    build_dataset,
    dataset_class_names,
    dataset_key,
    dataset_num_classes,
    download_dataset,
    expand_root,
    local_root,
    unreadable_named,
)
from .fewshot import (
    FewShotSplit,
    NotEnoughImagesError,
    composed_name,
    in_draw_order,
    indices_from_manifest,
    manifest_settings,
    order_digest,
    read_manifest,
    sample_kshot,
    write_manifest,
)
from .fewshot import split_digest as digest_of  # the property of the same name below returns it for this split
from .transforms import (
    AUGMENTS,
    NORMALIZATIONS,
    Augment,
    DataConfig,
    Normalize,
    build_transforms,
    evaluation_settings,
    resolve_data_config,
)

__all__ = ["FewShotDataModule", "FewShotSubset", "check_datamodule_arguments", "require_share_per_process"]

# Copies of the drawn images (_copies_of_drawn): a file's first COPY_HEAD_BYTES are hashed, then the rest in chunks;
# a size shared by more than COPY_GROUP_LIMIT files does not tell them apart, and is not read.
COPY_HEAD_BYTES = 4096
COPY_CHUNK_BYTES = 1 << 20
COPY_GROUP_LIMIT = 64
COPY_PAIRS_SHOWN = 3  # copies a warning names as examples


# The stages setup() takes (Lightning's TrainerFn values; None: all).
_STAGES = (None, "fit", "validate", "test", "predict")


class FewShotSubset(Dataset):
    """Chosen samples of an :class:`ImageDataset`; with ``cache``, images are decoded once and kept in memory."""

    def __init__(self, dataset: ImageDataset, indices: list[int], transform: Optional[Callable] = None,
                 cache: bool = False, cache_mb: float = 2048) -> None:
        self.dataset, self.transform = dataset, check_callable(transform, "FewShotSubset transform")
        self.indices = [check_int(i, "FewShotSubset index", at_least=0) for i in indices]
        outside = [i for i in self.indices if i >= len(dataset.samples)]
        if outside:  # -1 served the last image without a word
            raise ValueError(f"FewShotSubset indices must select the dataset's {len(dataset.samples)} images (0 to "
                             f"{len(dataset.samples) - 1}), got {outside[:3]}")
        cache = check_bool(cache, "FewShotSubset cache")
        cache_mb = check_number(cache_mb, "FewShotSubset cache_mb", at_least=0)
        self.cache: dict[int, Any] = {}
        self.cached_bytes = 0  # decoded RGB pixels held, 3 bytes each
        if cache and cache_mb > 0:  # cache_mb=0: no cache (not a cache that is full at once)
            budget = cache_mb * 2**20
            for pos, index in enumerate(self.indices):  # also surfaces a corrupt file now, by name
                img = dataset.load_image(index)
                size = img.width * img.height * 3
                if self.cached_bytes + size > budget:
                    warn_user(f"image cache full after {pos} of {len(self.indices)} images (cache_mb="
                              f"{cache_mb:g} left for them); the rest are read from disk each epoch")
                    break
                self.cache[pos] = img
                self.cached_bytes += size

    @property
    def samples(self) -> list[tuple[str, int]]:
        return [self.dataset.samples[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, pos: int) -> tuple[Any, int]:
        img = self.cache.get(pos)
        if img is None:
            img = self.dataset.load_image(self.indices[pos])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.dataset.samples[self.indices[pos]][1]


class _Transformed(Dataset):
    """A whole dataset seen through a transform (the dataset object itself stays transform-free)."""

    def __init__(self, dataset: ImageDataset, transform: Callable) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.transform(self.dataset.load_image(index)), self.dataset.samples[index][1]


# What a FewShotDataModule's split and images depend on: fixed once it is made (FewShotDataModule.__setattr__).
FIXED_SETTINGS = frozenset({"dataset_name", "root", "shots", "split_seed", "val_shots", "augment", "normalize",
                            "download", "split_file", "val_split_file", "split_dir", "allow_fewer", "shuffle_seed",
                            "cache_images", "cache_mb"})
# Loader settings, which may change (Lightning's batch-size finder sets batch_size).
LOADER_SETTINGS = frozenset({"batch_size", "eval_batch_size", "num_workers", "pin_memory"})


def _checked_loader_setting(name: str, value: Any) -> Any:
    label = f"FewShotDataModule.{name}"
    if name == "pin_memory":
        return check_bool(value, label)
    if name == "num_workers":
        return _checked_workers(value, label)
    return check_int(value, label, at_least=1)


def _checked_workers(value: Any, label: str) -> int:
    """A worker count this machine can start: a million workers hung the first loader, forking until it died."""
    workers = check_int(value, label, at_least=0)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if workers > 16 * cpus:
        raise ValueError(f"{label}={workers} would start that many loader processes on {cpus} CPUs: use at most "
                         f"{16 * cpus} (a few per CPU is plenty)")
    return workers


def _check_arguments(hp: Any) -> Any:
    """Refuse any ``FewShotDataModule`` argument of the wrong type or range, naming it, before anything is read;
    returns ``hp`` with the checked values (numpy integers as ints, paths as str with a leading ``~`` expanded, as
    ``build_dataset`` reads them, so that every path is read where it is recorded)."""
    name = "FewShotDataModule.{}".format
    if not isinstance(hp.dataset, str):
        raise ValueError(f"{name('dataset')} must be a dataset name ({', '.join(available_datasets())}), got "
                         f"{shown(hp.dataset)}")
    key = dataset_key(hp.dataset)
    if key in available_datasets():  # one spelling: manifests, records and results name it alike
        hp.dataset = key
    hp.root = expand_root(check_path(hp.root, name("root")))
    local_root(hp.root)  # a URL is refused before anything is read
    for field in ("shots", "val_shots"):  # shots=0: every train image
        hp[field] = check_int(hp[field], name(field), at_least=0)
    hp.num_workers = _checked_workers(hp.num_workers, name("num_workers"))
    hp.split_seed = check_int(hp.split_seed, name("split_seed"))
    hp.shuffle_seed = check_int(hp.shuffle_seed, name("shuffle_seed"), optional=True)
    hp.batch_size = check_int(hp.batch_size, name("batch_size"), at_least=1, int64=True)
    hp.eval_batch_size = check_int(hp.eval_batch_size, name("eval_batch_size"), at_least=1, optional=True, int64=True)
    hp.image_size = check_image_size(hp.image_size, name("image_size"), optional=True)
    if hp.backbone is not None and not isinstance(hp.backbone, str):
        raise ValueError(f"{name('backbone')} must be a timm model name or null, got {shown(hp.backbone)}")
    check_choice(hp.augment, name("augment"), AUGMENTS)
    check_choice(hp.normalize, name("normalize"), NORMALIZATIONS)
    for field in ("download", "allow_fewer", "cache_images", "pin_memory"):  # numpy's as bool: hparams go to YAML
        hp[field] = check_bool(hp[field], name(field))
    for field in ("split_file", "val_split_file", "split_dir"):
        path = check_path(hp[field], name(field), optional=True)
        hp[field] = expand_root(path) if path is not None else None
    if hp.val_split_file and not hp.split_file:
        raise ValueError(f"{name('val_split_file')} is read only with a split_file: pass the train manifest as "
                         "split_file too (or drop val_split_file to draw the split)")
    if hp.split_file and hp.val_shots and not hp.val_split_file:
        raise ValueError(f"{name('val_shots')}={hp.val_shots} with a split_file but no val_split_file: a replayed "
                         "split takes its validation images from the run's validation manifest, not from a new draw. "
                         "Pass it with --data.val_split_file (<split_dir>/<dataset>_<k>shot_seed<s>_val<v>.txt), or "
                         "set --data.val_shots 0 to replay without validation")
    hp.cache_mb = check_number(hp.cache_mb, name("cache_mb"), at_least=0)
    return hp


def check_datamodule_arguments(arguments: Dict[str, Any]) -> None:
    """Raise the ``ValueError`` ``FewShotDataModule(**arguments)`` would for a value of the wrong type or range (a
    batch size of 0), reading nothing: what tune and protocol check before their first run."""
    _check_arguments(AttributeDict(arguments))


def _file_digest(path: Path, start: int = 0, length: Optional[int] = None) -> Optional[bytes]:
    """blake2b of ``length`` bytes of ``path`` from ``start`` (the rest of the file when None, read in
    COPY_CHUNK_BYTES chunks); None when it cannot be read (reading the image reports that: this check only warns)."""
    digest = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as f:
            f.seek(start)
            if length is not None:
                digest.update(f.read(length))
            for chunk in iter(lambda: f.read(COPY_CHUNK_BYTES), b"") if length is None else ():
                digest.update(chunk)
    except OSError:
        return None
    return digest.digest()


def _header_numbers(recorded: Dict[str, str]) -> Dict[str, int]:
    """The ``shots``, ``split_seed`` and ``val_shots`` a manifest's header records (``manifest_settings``), as ints."""
    return {key: int(value) for key, value in recorded.items()
            if key in ("shots", "split_seed", "val_shots") and value.lstrip("-").isdigit()}


def _in_recorded_order(samples: list[tuple[str, int]], indices: list[int], seed: Optional[int]) -> list[int]:
    """``indices`` in the draw order of the split seed a manifest's header records (``in_draw_order``), or as listed
    where it records none (written by hand, or by early builds)."""
    return in_draw_order(samples, indices, seed) if seed is not None else indices


class _File(NamedTuple):
    key: str  # relative to the dataset root
    place: Optional[int]  # the train class, or None: the held-out split
    drawn: bool
    validation: bool = False  # drawn as a validation image


def _copies_of_drawn(path_of: Callable[[str], Path], train: list[_File], held_out: list[_File],
                     sizes: dict[str, int]) -> list[list[str]]:
    """Groups of byte-identical files (keys, a drawn image first) in which a drawn image (a train or validation shot)
    has a copy that training must not see: in the held-out split (any class), or in another class of the train split,
    drawn or not (one image taught as two classes), or a training shot has one among the validation shots (validated
    on after training on it). ``sizes``: every file's size, from the listing's stat; ``path_of``: a key's file.

    Only a file of a drawn image's size can be its copy, and only such size groups that span two places (a train class,
    or the held-out split) are read: the first COPY_HEAD_BYTES of each file, then the rest only where sizes and heads
    agree across places. A size group of more than COPY_GROUP_LIMIT files is not read: sizes then do not tell files
    apart (uncompressed images of one resolution), and reading the group would read the dataset at every setup. So the
    cost is bounded by the drawn images and their size-mates, never the whole dataset. Copies among undrawn images only,
    and other copies within one class, are not looked for: training never sees the first, and the second are harmless.
    """
    files = train + held_out
    drawn_sizes = {sizes.get(f.key) for f in train if f.drawn} - {None, 0}  # an empty file is no image

    def spans_places(group: list[int]) -> bool:
        validation = {files[i].validation for i in group if files[i].drawn}
        return len({files[i].place for i in group}) > 1 or len(validation) > 1

    def regroup(groups, digest):
        out: dict[tuple, list[int]] = defaultdict(list)
        for key, group in groups.items():
            if spans_places(group) and any(files[i].drawn for i in group):
                for i in group:
                    value = digest(i, key)
                    if value is not None:
                        out[(*key, value)].append(i)
        return out

    by_size: dict[tuple, list[int]] = defaultdict(list)
    for i, file in enumerate(files):
        if sizes.get(file.key) in drawn_sizes:
            by_size[(sizes[file.key],)].append(i)
    by_size = {key: group for key, group in by_size.items() if len(group) <= COPY_GROUP_LIMIT}
    by_head = regroup(by_size, lambda i, key: _file_digest(path_of(files[i].key), 0, COPY_HEAD_BYTES))
    by_content = regroup(by_head, lambda i, key: (_file_digest(path_of(files[i].key), COPY_HEAD_BYTES)
                                                  if key[0] > COPY_HEAD_BYTES else b""))
    copies = [sorted(group, key=lambda i: (not files[i].drawn, files[i].key)) for group in by_content.values()
              if spans_places(group) and any(files[i].drawn for i in group)]
    return sorted([files[i].key for i in group] for group in copies)


def _warn_copied_shots(copies: list[list[str]], root: Path) -> None:
    """Warn, once for a split, of the drawn images that have byte-identical copies (:func:`_copies_of_drawn`), naming a
    few (keys relative to ``root``); never refused: real datasets hold a few copies."""
    if not copies:
        return
    pairs = [f"{first} = {others[0]}" + (f" (+{len(others) - 1} more)" if len(others) > 1 else "")
             for first, *others in copies[:COPY_PAIRS_SHOWN]]
    many = len(copies) > 1
    warn_user(
        f"{len(copies)} {'images' if many else 'image'} of the drawn k-shot split {'have' if many else 'has'} "
        f"byte-identical copies in another class, among the validation images or in the held-out (test) split under "
        f"{root} ({'; '.join(pairs)}{'; ...' if len(copies) > len(pairs) else ''}). A copy in another class is a wrong "
        "label (one image taught as two classes), and a training image copied into the validation images or the "
        "held-out split is validated or tested on after training on it, which inflates its accuracy. Remove the "
        "copies: keep each image once, in its one class of one split.")


def _images_per_class(dataset: ImageDataset, indices: list[int], manifest: str, field: str = "shots") -> int:
    """The shot count of a manifest (recorded as ``field``): its images per class (the most any class has, with a
    warning naming the classes that have fewer); a manifest that lists no image is refused."""
    if not indices:
        raise ValueError(f"{manifest} lists no images: expected 'relative/path label' lines (write one with "
                         "--data.split_dir, or drop split_file to draw the split)")
    counts = Counter(dataset.samples[i][1] for i in indices)
    shots = max(counts.values())
    fewer = [f"'{name}' {counts[label]}" for label, name in enumerate(dataset.class_names) if counts[label] < shots]
    if fewer:
        warn_user(f"{manifest} lists {shots} images per class, but fewer for {len(fewer)} classes "
                  f"({', '.join(fewer[:10])}{' ...' if len(fewer) > 10 else ''}); recorded as {field}={shots}")
    return shots


def _refuse_unlisted_classes(dataset: ImageDataset, indices: list[int], manifest: str) -> None:
    """Refuse a training manifest that lists no image of a class with training images: the head would have an output
    never trained (a class folder added after the manifest was written), which the test split still scores. A class
    without any (a draw with ``allow_fewer`` took none) is not the manifest's doing."""
    listed = {dataset.samples[i][1] for i in indices}
    present = {label for _, label in dataset.samples}
    unlisted = [name for label, name in enumerate(dataset.class_names) if label in present and label not in listed]
    if indices and unlisted:
        raise ValueError(f"{manifest} lists no training image of {len(unlisted)} of the {len(dataset.class_names)} "
                         f"classes there now ({', '.join(repr(n) for n in unlisted[:10])}"
                         f"{' ...' if len(unlisted) > 10 else ''}): added after it was written, or left out of it. "
                         "Drop split_file to draw a split of every class, or move those classes' folders away")


def _refuse_unreadable_drawn(dataset: ImageDataset, indices: list[int]) -> None:
    """Refuse drawn training or validation images that are missing, empty (0 bytes), cut short, no regular file (a
    named pipe) or unreadable (``unreadable_reason``: a stat and a file's first and last bytes, no decoding), before
    anything trains or caches: a full train split is read from disk during training, and such a file stopped a fit
    mid-epoch with nothing saved."""
    bad = dataset.unreadable_files(indices)
    if not bad:
        return
    error = CorruptImageError(
        f"{len(bad)} of the {len(indices)} training and validation images of {dataset.name} ({dataset.split} split) "
        f"cannot be read: {unreadable_named(bad)}. Copy them again (extract or "
        "download the dataset again), make them readable, or remove them, before training")
    error.before_run = True  # the CLI's exit code of a refusal before the run: every run of the split would fail
    raise error


def _header_digest(settings: str, listed: str) -> str:
    """The digest a manifest's header records of its settings (``key=value`` text) and its images' digest
    (``header=``): 16 hex digits of their sha256."""
    return hashlib.sha256(f"{settings} images={listed}".encode()).hexdigest()[:16]


def _listed_digest(samples: list[tuple[str, int]], indices: list[int]) -> str:
    """The digest a manifest's header records of the images it lists (``images=``): 16 hex digits of their sha256."""
    return digest_of(samples, FewShotSplit(indices, []))[:16]


# What each part of a draw is passed as to replay it (FewShotDataModule's argument), and what it holds.
PART_OPTIONS = {"train": "split_file", "val": "val_split_file"}
PART_NAMES = {"train": "training", "val": "validation"}


def _unedited(recorded: Dict[str, str], listed: str) -> bool:
    """Whether a manifest is as this module wrote it: its header's ``images=`` digest is of the images it lists
    (``listed``), and its ``header=`` digest of the settings written with them (an edited ``shots=`` does not count);
    a manifest written before the header digest has its images' alone."""
    written = " ".join(f"{key}={value}" for key, value in recorded.items() if key not in ("images", "header"))
    settings_digest = _header_digest(written, listed)
    return recorded.get("images") == listed and recorded.get("header", settings_digest) == settings_digest


def _refuse_other_part(manifest: str, role: str) -> None:
    """Refuse a manifest whose header says it holds the other part of its draw (``part=train`` or ``part=val``) than
    the ``role`` it is passed for: a run would train on the draw's validation images (or validate on its training
    images) and record them as the draw's shots. Manifests without ``part=`` (older, by hand) are checked by counts."""
    part = manifest_settings(manifest).get("part")
    if part is None or part == role:
        return
    if part not in PART_NAMES:
        raise ValueError(f"{manifest}: its header says part={part}, which is no part of a draw (part=train or "
                         "part=val): pass a manifest a run wrote under its split_dir, or remove the header line")
    ending = "_train.txt" if role == "train" else "_val<v>.txt"
    raise ValueError(f"{manifest} holds the {PART_NAMES[part]} images of its draw (its header says part={part}), but "
                     f"it is passed as {PART_OPTIONS[role]}, for {PART_NAMES[role]} images: the run would record "
                     f"them as that draw's {PART_NAMES[role]} images. Pass it as --data.{PART_OPTIONS[part]} "
                     f"({PART_OPTIONS[part]}=), and the draw's {PART_NAMES[role]} manifest (its name ends in {ending}) "
                     f"as --data.{PART_OPTIONS[role]}")


def _most_per_class(dataset: ImageDataset, indices: list[int]) -> int:
    """The most images any class has among ``indices`` (not empty)."""
    return max(Counter(dataset.samples[i][1] for i in indices).values())


def _fits_part(dataset: ImageDataset, indices: list[int], header: Dict[str, int], role: str) -> bool:
    """Whether a manifest without ``part=`` holds as many images per class as the ``role`` part of the draw its header
    records: for the training part ``shots`` in its largest class, or fewer (every class short: ``allow_fewer``) where
    the draw's validation part could not hold as many (``val_shots`` 0, or below that count), and for shots=0 more than
    ``val_shots``; at most ``val_shots`` for the validation part. A count the header does not record fits."""
    if not indices:
        return True
    most = _most_per_class(dataset, indices)
    val_shots = header.get("val_shots")
    if role == "val":
        return val_shots is None or most <= val_shots
    shots = header.get("shots")
    not_validation = not val_shots or most > val_shots
    if shots:
        return most == shots or (most < shots and not_validation)
    return shots is None or not_validation


def _warn_other_part(manifest: str, dataset: ImageDataset, indices: list[int], header: Dict[str, int],
                     role: str) -> None:
    """Warn that a manifest without ``part=`` holds other counts per class than its header's draw gives the part it is
    passed as (``_fits_part``), so it is replayed as a manifest written by hand: it may be the draw's other part."""
    most = _most_per_class(dataset, indices)
    settings = ", ".join(f"{key}={value}" for key, value in header.items())
    other = PART_NAMES["val" if role == "train" else "train"]
    records = ("shots recorded as its images per class, no split_seed" if role == "train" else
               "validated on in the order of its lines")
    warn_user(f"{manifest} is passed as {PART_OPTIONS[role]} ({PART_NAMES[role]} images), but it lists up to {most} "
              f"images per class, which the {PART_NAMES[role]} part of the draw its header records ({settings}) does "
              f"not hold: it may be that draw's {other} manifest. It is replayed as a manifest written by hand "
              f"({records}). To replay the draw, pass its training manifest (_train.txt) as --data.split_file and its "
              "validation manifest (_val<v>.txt) as --data.val_split_file")


def _is_draw(dataset: ImageDataset, indices: list[int], shots: int, seed: int, val_shots: int) -> bool:
    """Whether ``indices`` are the training images that ``split_seed`` ``seed`` draws at ``shots`` (and
    ``val_shots``, which decide the rest for shots=0) from the images there now."""
    if shots < 0 or val_shots < 0:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a class short of images: the draw keeps what there is, as its run did
        drawn = sample_kshot(dataset.samples, shots, seed, val_shots, dataset.class_names, allow_fewer=True)
    return sorted(drawn.train) == sorted(indices)


def _lists_already(path: Path, drawn: list[tuple[str, int]], root: Path, settings: dict[str, str]) -> bool:
    """Whether the manifest ``path`` exists and lists exactly the ``drawn`` images; one that lists others is refused,
    naming the file: it is the record of what an earlier run trained on. Its header's settings are compared with this
    run's (``settings``) first, so that a run with another ``val_shots`` is told so, not that the images changed."""
    if not path.is_file():
        return False
    listed, drawn = _composed(read_manifest(path)), _composed(drawn)
    if listed == drawn:  # a manifest written on Linux, kept with a macOS copy (NFD names), lists the same images
        return True
    recorded = manifest_settings(path)
    other = {key: value for key, value in settings.items() if recorded.get(key, value) != value}
    if other:
        raise ValueError(_other_settings_message(path, recorded, other))
    raise ValueError(_changed_images_message(path, listed, drawn, root))


def _composed(pairs: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """``(key, label)`` pairs sorted, their keys in Unicode's composed form (``composed_name``)."""
    return sorted((composed_name(key), label) for key, label in pairs)


def _other_settings_message(path: Path, recorded: dict[str, str], other: dict[str, str]) -> str:
    """Why a manifest written with other settings (``other``: this run's values of them) is kept, and what to do."""
    theirs = ", ".join(f"{key}={recorded[key]}" for key in other)
    ours = ", ".join(f"{key}={value}" for key, value in other.items())
    options = " ".join(f"--data.{key} {recorded[key]}" for key in other)
    return (f"{path} was written by a run with {theirs}, but this run has {ours}, so it draws other images. It "
            "records what that run trained on, so it is not replaced: pass another --data.split_dir for this run, "
            f"or run with that run's settings ({options})")


def _changed_images_message(path: Path, listed: list[tuple[str, int]], drawn: list[tuple[str, int]],
                            root: Path) -> str:
    """Why a manifest of the same settings that lists other images than this run draws is kept, and what to do
    (``listed`` and ``drawn`` as ``_composed`` gives them)."""
    labels = dict(drawn)
    relabelled = sorted((key, label) for key, label in set(listed) - set(drawn) if key in labels)
    gone = sorted((key, label) for key, label in set(listed) - set(drawn) if key not in labels)
    new = sorted(set(drawn) - set(listed) - {(key, labels[key]) for key, _ in relabelled})
    differences = [f"it lists {len(gone)} image(s) this run does not draw, e.g. '{gone[0][0]}'" if gone else "",
                   f"this run draws {len(new)} image(s) it does not list, e.g. '{new[0][0]}'" if new else "",
                   f"{len(relabelled)} image(s) it lists are drawn with another label, e.g. '{relabelled[0][0]}' "
                   f"(label {relabelled[0][1]} there, {labels[relabelled[0][0]]} now)" if relabelled else ""]
    differ = "; ".join(difference for difference in differences if difference)
    cause = (f"the classes under {root} changed since it was written (a class folder added, removed or renamed "
             "renumbers the classes that sort after it)" if relabelled else
             f"the images under {root} changed since it was written (an image added, removed or renamed changes the "
             "draw)")
    return (f"{path} lists another k-shot split than this run draws ({differ}): {cause}, or it belongs to another "
            "dataset folder. It records what an earlier run "
            "trained on, so it is not replaced: restore the images, replay that split with "
            "--data.split_file (and --data.val_split_file) naming its manifests, or pass another "
            "--data.split_dir")


def require_share_per_process(images: int, processes: int, split: str) -> None:
    """Refuse an evaluation set smaller than the processes that share it: a process with no image fails in
    Lightning ("DataLoader within local rank has zero length") while the others wait on it."""
    if images < processes:
        raise ValueError(f"the {split} set holds {images} image(s), fewer than the {processes} processes that share "
                         f"it (each evaluates its own images, at least one): evaluate on at most {images} (e.g. "
                         f"nola-vision test --trainer.devices {max(images, 1)}), or with more {split} images")


class _UnpaddedDistributedSampler(DistributedSampler):
    """Rank ``rank``'s images of an evaluation set (every ``num_replicas``-th, in order), without the padding of
    ``DistributedSampler``: ranks may get one image fewer, and metrics sum their counts over the ranks."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self):
        return iter(range(self.rank, self.total_size, self.num_replicas))


class FewShotDataModule(L.LightningDataModule):
    """Few-shot image classification data: k images per class for training, the full test split for testing.

    The k-shot split depends only on ``split_seed`` and the image file names (identical on every DDP
    rank), and is saved as a manifest (``relative/path label`` per line) under ``split_dir``.
    """

    def __init__(
        self,
        dataset: str = "cifar10",
        root: str = "data",
        shots: int = 5,
        split_seed: int = 0,
        val_shots: int = 0,
        batch_size: int = 16,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        image_size: Optional[int] = None,
        backbone: Optional[str] = None,
        augment: Augment = "paper",
        normalize: Normalize = "model",
        download: bool = False,
        split_file: Optional[str] = None,
        val_split_file: Optional[str] = None,
        split_dir: Optional[str] = None,
        allow_fewer: bool = False,
        shuffle_seed: Optional[int] = None,
        cache_images: bool = True,
        cache_mb: float = 2048,
        pin_memory: bool = False,
    ) -> None:
        """
        Args:
            dataset: one of ``nola_vision.data.available_datasets()`` (cifar10, cifar100, cub200,
                caltech101, food101, fashion_mnist, digits, imagefolder).
            root: folder that holds the dataset (e.g. ``data`` for ``data/cifar-10-batches-py``); a leading ``~`` is
                the home folder, here as in ``split_file``, ``val_split_file`` and ``split_dir``.
            shots: training images per class (k); 0 uses every training image.
            split_seed: seed of the k-shot draw (the paper uses 4 split seeds).
            val_shots: validation images per class, drawn disjointly from the remaining train images;
                0 means no validation loader.
            batch_size: training batch size (the paper: 16, with drop_last).
            eval_batch_size: batch size for validation/test/predict; defaults to ``batch_size``.
            num_workers: DataLoader worker processes.
            image_size: square input size; defaults to the backbone's input size, else 224.
            backbone: timm model name whose pretrained config gives mean/std/size/crop_pct/interpolation.
            augment: ``paper`` (the NOLA paper's augmentation), ``timm`` (timm's create_transform) or ``none``.
            normalize: ``model`` (the backbone's own mean/std) or ``imagenet``.
            download: download with torchvision's downloader in ``prepare_data`` where one exists.
            split_file: a train manifest to load instead of drawing (reproduces a run exactly); ``shots`` (and
                ``val_shots``) then become the images per class the manifests hold, and are recorded as such.
                Validation images then come only from ``val_split_file``: ``val_shots`` > 0 without it is refused.
            val_split_file: a validation manifest to load instead of drawing (only with ``split_file``).
            split_dir: folder to write the drawn manifests to (rank 0 writes them); None writes nothing. A manifest
                already there that lists other images is refused on every rank, never replaced (see ``save_split``).
            allow_fewer: keep classes with fewer than ``shots + val_shots`` train images instead of failing.
            shuffle_seed: seed of the train loader's shuffling (under DDP: of its ``DistributedSampler``);
                None takes ``torch.initial_seed()`` (under DDP Lightning's sampler, seeded by ``seed_everything``).
            cache_images: decode the k-shot train (and validation) images once and keep them in memory.
            cache_mb: memory budget of that cache in MiB of decoded RGB pixels (train and validation images together).
            pin_memory: DataLoader ``pin_memory``.
        """
        super().__init__()
        self.save_hyperparameters()
        hp = _check_arguments(self.hparams)
        self.dataset_name, self.root = hp.dataset, hp.root
        self.shots, self.split_seed, self.val_shots = hp.shots, hp.split_seed, hp.val_shots
        self.batch_size, self.eval_batch_size = hp.batch_size, hp.eval_batch_size or hp.batch_size
        self.num_workers, self.pin_memory = hp.num_workers, hp.pin_memory
        self.augment, self.normalize, self.download = hp.augment, hp.normalize, hp.download
        self.split_file, self.val_split_file, self.split_dir = hp.split_file, hp.val_split_file, hp.split_dir
        self.allow_fewer, self.shuffle_seed = hp.allow_fewer, hp.shuffle_seed
        self.cache_images, self.cache_mb = hp.cache_images, hp.cache_mb
        # known now, from a static table (imagefolder: its class folders), so the CLI can link it
        self.num_classes: int = dataset_num_classes(hp.dataset, hp.root)
        if self.num_classes < 2:
            only = dataset_class_names(hp.dataset, hp.root)[0]
            raise ValueError(f"dataset {hp.dataset!r} under {hp.root} has one class ({only!r}): a classifier needs at "
                             "least two. Put one folder per class under its train folder (hidden "
                             "folders do not count)")
        self.data_config: DataConfig = resolve_data_config(hp.backbone, hp.image_size)
        self.train_transform, self.eval_transform = build_transforms(hp.augment, hp.normalize, self.data_config)
        self.evaluation = evaluation_settings(hp.augment, hp.normalize, self.data_config)
        self._class_names: Optional[list[str]] = None
        self.train_set: Optional[FewShotSubset] = None
        self.val_set: Optional[FewShotSubset] = None
        self.test_set: Optional[_Transformed] = None
        self._train_generator: Optional[torch.Generator] = None
        # the order each epoch of the fit drew, shared by its loaders (with the shuffle's state before the draw, and
        # the training batches the fit had read then)
        self._epoch_orders: Dict[int, _EpochOrder] = {}
        self._trains = False  # a train loader was built: checkpoints keep the random states its run draws from
        self._generator_fit: Optional[tuple] = None  # (id of the trainer, epoch) that made _train_generator
        self._resumed_generator_state: Optional[torch.Tensor] = None
        self.split: Optional[FewShotSplit] = None
        self.manifest_path: Optional[Path] = None
        self.val_manifest_path: Optional[Path] = None
        self._settings_fixed = True

    def __setattr__(self, name: str, value: Any) -> None:
        """The split's and the images' settings are fixed once made: set after, they would be trained on (or ignored,
        after ``setup``) while the hyper-parameters that checkpoints and resumes compare kept the old value. Loader
        settings (``batch_size``, which Lightning's batch-size finder sets) may change, and update them too."""
        if self.__dict__.get("_settings_fixed"):
            if name in FIXED_SETTINGS:
                raise AttributeError(
                    f"FewShotDataModule.{name} is fixed when the module is made (the k-shot split, the images and "
                    f"the records of every run it trains depend on it): create FewShotDataModule(..., {name}="
                    f"{value!r}) instead")
            if name in LOADER_SETTINGS:
                value = _checked_loader_setting(name, value)
                self.hparams[name] = value
        super().__setattr__(name, value)

    def _record_drawn(self, **settings: Any) -> None:
        """Record the ``shots``, ``split_seed`` or ``val_shots`` the split holds (a replayed manifest's)."""
        for name, value in settings.items():
            super().__setattr__(name, value)

    @property
    def class_names(self) -> list[str]:
        """Class names in label order (read from the dataset's metadata before ``setup``); a copy, as the manifests
        are: an edit of it by the caller relabels nothing."""
        if self._class_names is None:
            self._class_names = dataset_class_names(self.dataset_name, self.root)
        return list(self._class_names)

    @property
    def train_manifest(self) -> list[tuple[str, int]]:
        """The k-shot training set as ``(relative path, label)`` pairs, in manifest order."""
        self._require_setup()
        return list(self.train_set.samples)

    @property
    def val_manifest(self) -> list[tuple[str, int]]:
        """The validation images as ``(relative path, label)`` pairs, in manifest order (none without ``val_shots``)."""
        self._require_setup()
        return list(self.val_set.samples) if self.val_set is not None else []

    @property
    def split_digest(self) -> Optional[str]:
        """sha256 of the drawn training and validation images (``fewshot.split_digest``), None before ``setup`` draws
        them: checkpoints record it, so that validating or resuming a run on another draw is refused."""
        if self.split is None:
            return None
        return digest_of(self.train_set.dataset.samples, self.split)

    @property
    def train_order_digest(self) -> Optional[str]:
        """sha256 of the training images in the order they are indexed (``fewshot.order_digest``), None before
        ``setup``: the same images drawn by another split seed train in other batches, which a resume refuses."""
        return order_digest(self.train_set.samples) if self.split is not None else None

    def _require_setup(self) -> None:
        if self.train_set is None:
            raise RuntimeError("call setup() first: the split is drawn there")

    def prepare_data(self) -> None:
        """Download (Lightning calls this on rank 0 only)."""
        if self.download:
            download_dataset(self.dataset_name, self.root)

    def setup(self, stage: Optional[str] = None) -> None:
        """Draw (or load) the k-shot split and build the datasets; every rank draws the same split."""
        if stage not in _STAGES:  # another name would draw nothing, and the loaders then ask for setup()
            raise ValueError(f"setup(stage={stage!r}): not a stage; use one of {', '.join(map(repr, _STAGES))}")
        if self.train_set is None and stage in (None, "fit", "validate"):
            self._setup_train()
        if self.test_set is None and stage in (None, "test", "predict", "validate"):
            test = build_dataset(self.dataset_name, self.root, "test")
            self._check_classes(test)
            self.test_set = _Transformed(test, self.eval_transform)

    def _check_classes(self, ds: ImageDataset) -> None:
        if ds.num_classes != self.num_classes:
            raise ValueError(f"{ds.name} has {ds.num_classes} classes, but num_classes={self.num_classes}")
        self._class_names = ds.class_names

    def _setup_train(self) -> None:
        """``_draw_train``, all or nothing: a setup that fails (a refused manifest, an image that cannot be read)
        leaves no split behind, so a retried setup makes every check again rather than training on the refused one."""
        settings = self.shots, self.val_shots, self.split_seed
        try:
            self._draw_train()
        except BaseException:
            self.split = self.train_set = self.val_set = self.manifest_path = self.val_manifest_path = None
            self._record_drawn(shots=settings[0], val_shots=settings[1], split_seed=settings[2])
            raise

    def _draw_train(self) -> None:
        train = build_dataset(self.dataset_name, self.root, "train")
        self._check_classes(train)
        if self.split_file:
            self.split = self._split_from_files(train)
        else:
            self.split = sample_kshot(train.samples, self.shots, self.split_seed, self.val_shots,
                                      train.class_names, self.allow_fewer)
            if self.val_shots and not self.split.val:  # its validation passes would read no image, and record none
                raise NotEnoughImagesError(
                    f"val_shots={self.val_shots} drew no validation image: with allow_fewer, a class short of images "
                    f"gives them to training first, and every class of {self.dataset_name} has {self.shots or 1} "
                    "training image(s) or fewer. Lower shots (or add images), or drop val_shots",
                    shortage="no validation image")
        _refuse_unreadable_drawn(train, [*self.split.train, *self.split.val])
        self._check_copies(train)
        # decode a small k-shot set once; array-backed sets (CIFAR, ...) are in memory already, and a
        # full train split (shots=0) is read from disk as usual
        cache = self.cache_images and self.shots > 0 and not isinstance(train, ArrayImageDataset)
        self.train_set = FewShotSubset(train, self.split.train, self.train_transform, cache, self.cache_mb)
        if self.split.val:  # cache_mb is the budget of both sets' images: the validation images take what is left
            left = self.cache_mb - self.train_set.cached_bytes / 2**20
            self.val_set = FewShotSubset(train, self.split.val, self.eval_transform, cache and left > 0, left)
        if self.split_dir:
            # every rank checks, so that all raise the same error: one raised on rank 0 alone would leave the others
            # waiting at the barrier that ends Lightning's setup until the process group times out
            unwritten = self._unwritten_manifests(self.split_dir)
            if self.trainer is None or self.trainer.is_global_zero:
                self._write_manifests(unwritten)

    def _check_copies(self, train: ImageDataset) -> None:
        """Warn of byte-identical copies of the drawn images (:func:`_copies_of_drawn`) in a dataset whose reader
        listed both splits with their file sizes (an ImageFolder: the user's own images, which the user can clean;
        the benchmark sets are as published); on one rank only, as every rank draws the same split."""
        sizes, held_out = train.sizes, train.other_split_sizes
        train.sizes, train.other_split_sizes = {}, None  # used once: not carried to the data loaders' workers
        if held_out is None or (self.trainer is not None and not self.trainer.is_global_zero):
            return
        drawn, validation = {*self.split.train, *self.split.val}, set(self.split.val)
        files = [_File(key, label, index in drawn, index in validation)
                 for index, (key, label) in enumerate(train.samples)]
        copies = _copies_of_drawn(train.path_of, files, [_File(key, None, False) for key in held_out],
                                  {**sizes, **held_out})
        _warn_copied_shots(copies, train.root)

    def _split_from_files(self, train: ImageDataset) -> FewShotSplit:
        """The split the manifests list, so what a run records is what it trained on: a manifest as this module wrote
        it (its header's ``images=`` digest), or whose header names settings that draw exactly its images, keeps them
        (``shots``, ``split_seed``); any other (written by hand, edited) records the images per class it holds as
        ``shots``, and no ``split_seed`` (None). ``val_shots`` becomes the validation manifest's images per class."""
        for field, manifest in (("split_file", self.split_file), ("val_split_file", self.val_split_file)):
            if manifest and not Path(manifest).is_file():
                what = "a directory" if Path(manifest).is_dir() else "missing"
                raise FileNotFoundError(f"FewShotDataModule.{field} {manifest} is {what}: pass a manifest file a run "
                                        "wrote under its split_dir (<dataset>_<k>shot_seed<s>_train.txt), or drop it "
                                        "to draw the split")
            if manifest:
                self._refuse_other_dataset(manifest)
                _refuse_other_part(manifest, "train" if field == "split_file" else "val")
        indices = indices_from_manifest(train.samples, read_manifest(self.split_file), self.split_file)
        val = (indices_from_manifest(train.samples, read_manifest(self.val_split_file), self.val_split_file)
               if self.val_split_file else [])
        if set(indices) & set(val):
            raise ValueError(f"{self.split_file} and {self.val_split_file} share images")
        _refuse_unlisted_classes(train, indices, self.split_file)
        self._record_drawn(val_shots=_images_per_class(train, val, self.val_split_file, "val_shots") if val else 0)
        header = _header_numbers(manifest_settings(self.split_file))
        if self._records_its_draw(train, indices, header, val_shots=self.val_shots if val else None):
            # a manifest of the whole train split (shots=0) lists every image: its counts per class are no shot count
            self._record_drawn(shots=header["shots"], split_seed=header["split_seed"])
        else:  # written by hand, edited, or another part of its draw: no seed drew it as training images
            self._record_drawn(shots=_images_per_class(train, indices, self.split_file), split_seed=None)
        # the draw's own order, whatever the order of the lines, for a manifest whose header names the seed that drew
        # it (the order the module writes it in); one without keeps its lines' order, as it always trained
        return FewShotSplit(_in_recorded_order(train.samples, indices, header.get("split_seed")),
                            _in_recorded_order(train.samples, val, self._validation_seed(train, val)))

    def _records_its_draw(self, train: ImageDataset, indices: list[int], header: Dict[str, int],
                          val_shots: Optional[int]) -> bool:
        """Whether the training manifest is the draw its header names: as this module wrote it (its ``images=`` and
        ``header=`` digests; a file without ``part=``, written before it, must also hold the header's ``shots`` per
        class, else it may be the draw's validation manifest), or as its header's settings draw exactly its images
        from the images there now. ``val_shots``: the replay's validation images per class, None without."""
        if not {"shots", "split_seed"} <= set(header):
            return False
        recorded = manifest_settings(self.split_file)
        fits = "part" in recorded or _fits_part(train, indices, header, "train")
        if fits and _unedited(recorded, _listed_digest(train.samples, indices)):
            return True
        drawn_val = val_shots if val_shots is not None else header.get("val_shots", 0)
        if _is_draw(train, indices, header["shots"], header["split_seed"], drawn_val):
            return True
        if not fits:
            _warn_other_part(self.split_file, train, indices, header, "train")
        return False

    def _validation_seed(self, train: ImageDataset, val: list[int]) -> Optional[int]:
        """The split seed whose draw order the validation images take: the one the validation manifest's header
        records, unless it names no part and holds more images per class than a validation manifest of its header's
        settings (another part of its draw, which is then replayed in the order of its lines, as one by hand)."""
        if not val:
            return None
        recorded = manifest_settings(self.val_split_file)
        header = _header_numbers(recorded)
        if "part" not in recorded and not _fits_part(train, val, header, "val"):
            _warn_other_part(self.val_split_file, train, val, header, "val")
            return None
        return header.get("split_seed")

    def _refuse_other_dataset(self, manifest: str) -> None:
        """Refuse a manifest whose header names another dataset (``dataset=``) than this module's: its keys and labels
        are another dataset's. A manifest without that header (older, or written by hand) is checked line by line."""
        recorded = manifest_settings(manifest).get("dataset")
        if recorded is not None and dataset_key(recorded) != dataset_key(self.dataset_name):
            raise ValueError(f"{manifest} is a manifest of dataset {recorded!r} (its header says dataset={recorded}), "
                             f"but this data module reads {self.dataset_name!r}: replay it with --data.dataset "
                             f"{recorded} (and that dataset's --data.root), or drop split_file to draw a split of "
                             f"{self.dataset_name!r}")

    def save_split(self, split_dir: str) -> Path:
        """Write the train (and validation) manifests under ``split_dir``; returns the train manifest path.

        A manifest already there records what an earlier run drew: one that lists the same images is kept as it is,
        one that lists others is refused before either file is written, never replaced.
        """
        self._write_manifests(self._unwritten_manifests(split_dir))
        return self.manifest_path

    def _unwritten_manifests(self, split_dir: str) -> dict[Path, list[int]]:
        """The manifests of this split that ``split_dir`` does not hold yet (path: train-set indices), after refusing
        one there that lists other images; it only reads, so every DDP rank runs it."""
        self._require_setup()
        # a listed split no seed drew is named by its images, so that it never takes a draw's name
        drawn_by = f"seed{self.split_seed}" if self.split_seed is not None else f"listed-{self.split_digest[:12]}"
        stem = Path(split_dir) / f"{self.dataset_name}_{self.shots}shot_{drawn_by}"
        # val_shots in the validation manifest's name: with shots > 0, runs that differ only in it share the training
        # draw (and its manifest, whose header then records the first run's val_shots: not compared)
        train_path, val_path = Path(f"{stem}_train.txt"), Path(f"{stem}_val{self.val_shots}.txt")
        manifests = {train_path: self.split.train, **({val_path: self.split.val} if self.split.val else {})}
        samples, root = self.train_set.dataset.samples, self.train_set.dataset.root
        settings = self._manifest_settings()
        train_settings = {k: v for k, v in settings.items() if not (self.shots and k == "val_shots")}
        unwritten = {path: indices for path, indices in manifests.items()
                     if not _lists_already(path, [samples[i] for i in indices], root,
                                           train_settings if path == train_path else settings)}
        self.manifest_path, self.val_manifest_path = train_path, val_path if self.split.val else None
        return unwritten

    def _write_manifests(self, manifests: dict[Path, list[int]]) -> None:
        """Write each manifest (path: train-set indices) under a header of the settings that drew it and the part of
        the draw it holds (``part=train`` or ``part=val``: a replay refuses it passed for the other)."""
        dataset = self.train_set.dataset
        for path, indices in manifests.items():
            part = "val" if path == self.val_manifest_path else "train"
            settings = " ".join(f"{key}={value}" for key, value in {**self._manifest_settings(), "part": part}.items())
            listed = _listed_digest(dataset.samples, indices)  # tells a replay whether the file was edited since
            header = (f"nola_vision k-shot manifest: {settings} images={listed} "
                      f"header={_header_digest(settings, listed)}\npaths are relative to {dataset.root}")
            write_manifest(path, dataset.samples, indices, header)

    def _manifest_settings(self) -> dict[str, str]:
        """The settings a manifest header records (``manifest_settings`` reads them back): those that drew it."""
        seed = {} if self.split_seed is None else {"split_seed": str(self.split_seed)}  # None: listed, not drawn
        return {"dataset": self.dataset_name, "shots": str(self.shots), **seed, "val_shots": str(self.val_shots)}

    def _loader(self, dataset: Dataset, batch_size: int, **kwargs: Any) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0, **kwargs)

    def train_dataloader(self) -> DataLoader:
        """Shuffled with a seeded generator, whose state checkpoints keep (``state_dict``): a resumed run sees the
        orders of an uninterrupted one. drop_last only when at least one full batch remains on each process.

        Under DDP Lightning replaces a shuffling loader's sampler with one seeded by ``seed_everything``, so a set
        ``shuffle_seed`` comes with its own ``DistributedSampler``, which Lightning keeps.
        """
        self._require_setup()
        ddp = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        # Under DDP each process batches its share (DistributedSampler pads the shares to equal length).
        per_process = -(-len(self.train_set) // (ddp or {}).get("num_replicas", 1))
        drop_last = per_process >= self.batch_size
        self._trains = True
        if ddp and self.shuffle_seed is not None:
            sampler = DistributedSampler(self.train_set, shuffle=True, seed=self.shuffle_seed, **ddp)
            return self._loader(self.train_set, self.batch_size, sampler=sampler, drop_last=drop_last)
        if ddp:  # Lightning swaps a shuffling loader's sampler for its DistributedSampler (ordered by epoch too)
            return self._loader(self.train_set, self.batch_size, shuffle=True, drop_last=drop_last)
        generator = self._shuffle_generator()
        if generator is not self._train_generator:  # a new fit's: no epoch's order drawn from it yet
            self._epoch_orders = {}
        self._train_generator = generator
        # The loader's own generator seeds its workers only (the orders are the sampler's alone), from where the
        # shuffle stands: a resumed run's workers draw on, not the first epoch's numbers again.
        workers = torch.Generator()
        workers.set_state(self._train_generator.get_state())
        sampler = _EpochShuffle(self.train_set, generator=self._train_generator, runs_to_its_end=not drop_last,
                                epoch=self._fit_epoch, orders=self._epoch_orders)
        return self._loader(self.train_set, self.batch_size, sampler=sampler, generator=workers, drop_last=drop_last)

    def _fit_epoch(self) -> Optional[tuple[int, int]]:
        """The epoch a running fit trains next (the one Lightning hands samplers' ``set_epoch``) and the training
        batches it has read so far; None outside a fit (a loader iterated by hand). Not ``current_epoch``: a run
        resumed from a checkpoint saved at an epoch's end starts its loader (and its workers draw) while
        ``current_epoch`` still names the finished epoch."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit" or trainer.state.status != "running":
            return None
        loop = trainer.fit_loop
        return loop.epoch_progress.current.processed, loop.epoch_loop.batch_progress.total.ready

    def _shuffle_generator(self) -> torch.Generator:
        """A fit's shuffling generator: seeded at the fit's first loader (or set where a resumed run's stood), then
        kept for the loaders Lightning builds again later in the same fit (``reload_dataloaders_every_n_epochs``), so
        their epochs go on drawing new orders as one loader's do, instead of repeating the first epoch's. Loaders
        built by hand (no trainer: a loop that calls ``train_dataloader()`` each epoch) go on from the first's too:
        each started again from the seed, so every epoch had the same order and drop_last left out the same images."""
        trainer, generator = self.trainer, self._train_generator
        if generator is not None and self._resumed_generator_state is None and (
                (trainer is None and self._generator_fit is None)
                or (trainer is not None and self._generator_fit is not None and self._generator_fit[0] == id(trainer)
                    and trainer.current_epoch > self._generator_fit[1])):
            return generator
        seed = self.shuffle_seed if self.shuffle_seed is not None else torch.initial_seed()
        generator = torch.Generator().manual_seed(seed % 2**63)
        if self._resumed_generator_state is not None:  # where the checkpointed run's order stood
            generator.set_state(self._resumed_generator_state)
            self._resumed_generator_state = None
        self._generator_fit = (id(trainer), trainer.current_epoch) if trainer is not None else None
        return generator

    def state_dict(self) -> Dict[str, Any]:
        """What a checkpoint keeps of the data: the train loader's shuffling state, and the global random states
        the augmentations (in this process) and dropout draw from, so that a run resumed from it draws what the
        uninterrupted run draws (Lightning restores them before the loader is built). Under DDP the shuffle is the
        distributed sampler's (set by epoch), and only the random states are kept."""
        if not self._trains:
            return {}
        state = {"torch_rng": torch.random.get_rng_state(), "python_rng": random.getstate()}
        # Under DDP each process's states, which drift apart (a RandomResizedCrop draws as often as an image's size
        # asks): rank 0 writes the checkpoint, and every rank resumed from its states alone drew other crops.
        state["rank_rngs"] = self._each_process(dict(state))  # a copy: the state must not hold itself
        if self._train_generator is not None:
            state["train_generator"] = self._train_generator.get_state()
        return state

    def _each_process(self, state: Dict[str, Any]) -> List[Dict[str, Any]]:
        """``state`` of every process of the run, by global rank (a collective under DDP: Lightning asks every rank
        for the checkpoint's state together)."""
        world = getattr(self.trainer, "world_size", 1)
        if world <= 1 or not torch.distributed.is_initialized():
            return [state]
        gathered: List[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, state)
        return gathered

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Take up a checkpointed run's shuffling and random states, for a resumed fit only: a trainer evaluating a
        checkpoint (``test``/``validate``/``predict`` with ``ckpt_path``) restores the data module too, and the next
        fresh fit on it must shuffle from its own seed, with the user's random states untouched."""
        trainer = self.trainer
        if trainer is not None and trainer.state.fn is not None and trainer.state.fn != "fit":
            return
        self._resumed_generator_state = state_dict.get("train_generator")
        if "torch_rng" in state_dict:  # checkpoints written before it was kept resume with the current states
            processes = state_dict.get("rank_rngs") or [state_dict]  # one for all before each process's was kept
            rank, world = getattr(trainer, "global_rank", 0), getattr(trainer, "world_size", 1)
            if "rank_rngs" in state_dict and len(processes) != world:
                warn_user(f"this fit resumes a run of {len(processes)} processes on {world}: each process's data order "
                          "and random draws differ from the run's, which went on as it would have only on as many "
                          "processes", RuntimeWarning)
            own = processes[rank] if len(processes) == world else processes[0]
            torch.random.set_rng_state(own["torch_rng"])
            random.setstate(own["python_rng"])

    def val_dataloader(self) -> Any:
        """The validation subset; an empty list (Lightning then skips validation) when ``val_shots=0``."""
        self._require_setup()  # before it, no validation images are drawn yet, whatever val_shots says
        if self.val_set is None:
            # Lightning skips validation on an empty list, and warns that its length is zero as if by mistake.
            warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero")
            return []
        return self._evaluation_loader(self.val_set, "validation")

    def test_dataloader(self) -> DataLoader:
        """The full official test split."""
        if self.test_set is None:
            self.setup("test")
        return self._evaluation_loader(self.test_set, "test")

    def _evaluation_loader(self, dataset: Dataset, split: str) -> DataLoader:
        """In order; under DDP each rank takes its share of the images, every image exactly once (Lightning's own
        sampler repeats some to even out the ranks, which would count them twice in the accuracy).

        With a generator of its own: a loader without one draws its workers' seed from the global random state at
        every pass, so each validation pass would shift the augmentations and dropout of every later training step,
        and the trained weights would depend on how often the run validates."""
        trainer, generator = self.trainer, torch.Generator().manual_seed(0)
        if trainer is not None and trainer.world_size > 1:
            require_share_per_process(len(dataset), trainer.world_size, split)
            sampler = _UnpaddedDistributedSampler(dataset, trainer.world_size, trainer.global_rank)
            return self._loader(dataset, self.eval_batch_size, sampler=sampler, generator=generator)
        return self._loader(dataset, self.eval_batch_size, shuffle=False, generator=generator)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()


class _EpochOrder(NamedTuple):
    """An epoch's order, the shuffle's state before it was drawn, and the training batches the fit had read then."""

    order: list
    state_before: torch.Tensor
    batches_read: int


class _EpochShuffle(RandomSampler):
    """A seeded shuffle whose orders do not depend on ``num_workers``: each epoch it draws the number a DataLoader
    iterator draws from a shuffling loader's generator (its workers' base seed), then the order. A loader without
    workers makes one iterator per epoch and persistent workers one per run (one more after a resume), so drawing
    it here keeps every epoch's order that of a plain ``DataLoader(shuffle=True, generator=g)`` without workers, as
    Lightning runs it. RandomSampler draws one more permutation when its iterator is run to its end: Lightning without
    workers does so only for a loader that yields a partial last batch (``runs_to_its_end``), workers' prefetching
    always. This sampler draws it exactly when Lightning without workers would, whatever the workers do.

    Within a fit (``epoch`` gives its epoch) an epoch draws once: a loader with workers starts them (and draws its
    first batches) whenever it is iterated, and Lightning iterates a loader rebuilt by
    ``reload_dataloaders_every_n_epochs`` twice, which drew an order for nothing at every reload. ``orders`` holds the
    epoch's order, shared by the fit's loaders. An order no batch was read from before the next epoch's was drawn for
    nothing too, and is taken back: a resumed fit starts its loader before Lightning settles which epoch it resumes
    (a checkpoint saved at validation within the last batch names the finished epoch), and workers draw at once.

    ``epoch`` gives (the epoch a running fit trains next, the training batches it has read), or None."""

    def __init__(self, data_source: Dataset, generator: torch.Generator, runs_to_its_end: bool,
                 epoch: Optional[Callable[[], Optional[tuple[int, int]]]] = None,
                 orders: Optional[Dict[int, _EpochOrder]] = None) -> None:
        super().__init__(data_source, generator=generator)
        self.runs_to_its_end = runs_to_its_end
        self.epoch = epoch
        self.orders = {} if orders is None else orders

    def __iter__(self):
        where = self.epoch() if self.epoch is not None else None
        epoch, read = where if where is not None else (None, None)
        if epoch is not None and epoch in self.orders:
            return iter(self.orders[epoch].order)
        if epoch is not None:
            for earlier, drawn in self.orders.items():
                if earlier < epoch and drawn.batches_read == read:  # nothing was trained on it: drawn for nothing
                    self.generator.set_state(drawn.state_before)
        state_before = self.generator.get_state() if epoch is not None else None
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        order = torch.randperm(len(self.data_source), generator=self.generator).tolist()
        if self.runs_to_its_end:
            torch.randperm(len(self.data_source), generator=self.generator)
        if epoch is not None:
            self.orders.clear()  # only the epoch running now can be started again
            self.orders[epoch] = _EpochOrder(order, state_before, read)
        return iter(order)
