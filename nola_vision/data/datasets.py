"""Datasets by name, each read from its official on-disk layout.

Every dataset is an :class:`ImageDataset`: ``samples`` lists ``(key, label)`` pairs, where ``key`` is the
image path relative to the dataset folder (or ``train/00042`` for array-backed sets such as CIFAR), so
k-shot sampling and split manifests work on labels without decoding a single image. A key read from the file
system is its bytes as UTF-8 (undecodable bytes as surrogate escapes), so it is the same under every locale. Names are
never renormalized (a key must open the real file): class folders whose names differ only in Unicode normalization
(NFC/NFD) are refused instead, since they would be two classes that look alike.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import json
import math
import os
import pickle
import reprlib
import struct
import zlib
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from stat import S_ISREG
from typing import Any, Callable, Hashable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..core.checks import check_bool, check_callable, check_path, shown
from ..core.storage import try_lock, write_text_atomic
from ..core.warn import warn_user
from .fewshot import composed_name

__all__ = [
    "DATASETS",
    "CorruptImageError",
    "DatasetMetadataError",
    "DatasetNotFoundError",
    "DatasetSpec",
    "ImageDataset",
    "available_datasets",
    "build_dataset",
    "dataset_class_names",
    "dataset_key",
    "dataset_num_classes",
    "download_dataset",
    "expand_root",
    "local_root",
    "unreadable_named",
    "unreadable_reason",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Image formats a user may have among their images that are not read (not in IMG_EXTENSIONS): named, never skipped
# silently.
UNREAD_IMAGE_EXTENSIONS = (".gif", ".jfif", ".jpe", ".avif", ".heic", ".heif", ".jp2", ".j2k", ".jxl", ".svg", ".ico",
                           ".tga", ".dng", ".cr2", ".nef", ".arw", ".raw")
# Folders that tools write among the images, never data: Synology NAS thumbnails, macOS zip resource forks.
METADATA_FOLDERS = frozenset(("@eaDir", "__MACOSX"))
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_URL = "https://github.com/zalandoresearch/fashion-mnist"
FASHION_MNIST_SIZES = {"train": 60000, "t10k": 10000}  # images per file; fewer (a subset) cannot be verified
FASHION_MNIST_IMAGE_SHAPE = (28, 28)
_IDX_NAMESAKES = frozenset({"MNIST", "KMNIST", "EMNIST", "QMNIST"})  # torchvision folders of files named as its
# sha256 of the DECOMPRESSED bytes of Fashion-MNIST's four IDX files, so that .gz and raw copies verify alike:
# computed once (`zcat <file> | sha256sum`) from Debian's dataset-fashion-mnist 0.0~git20200523.55506a9-1
# (/usr/share/datasets/fashion-mnist/*.gz, the files of github.com/zalandoresearch/fashion-mnist). MNIST and KMNIST
# use the same file names, so only the content tells them apart.
FASHION_MNIST_SHA256 = {
    "train-images-idx3": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# scikit-learn's digits come in a fixed order; as in its "Recognizing hand-written digits" example the
# first half (images 0..897) is the train split and the second half (898..1796) the test split.
DIGITS_TRAIN_SIZE = 898
# Caltech-101 has no official split. Ours: within each class, images sorted by file name, every fifth
# one (positions 0, 5, 10, ...) is test, the rest train (80/20; the smallest class, 31 images, keeps 24
# for training). It is written to caltech101/nola_vision_split.txt, and an existing file is read back.
CALTECH_SPLIT_FILE = "nola_vision_split.txt"
CALTECH_IMAGES = "101_ObjectCategories"
CALTECH_TEST_EVERY = 5
# The class folders of the archive's 101_ObjectCategories (BACKGROUND_Google aside), to name a folder that is not one.
# Images per category in the archive (8,677 in all, BACKGROUND_Google aside): a category with fewer was cut short
CALTECH101_IMAGES = {
    "Faces": 435, "Faces_easy": 435, "Leopards": 200, "Motorbikes": 798, "accordion": 55, "airplanes": 800,
    "anchor": 42, "ant": 42, "barrel": 47, "bass": 54, "beaver": 46, "binocular": 33, "bonsai": 128, "brain": 98,
    "brontosaurus": 43, "buddha": 85, "butterfly": 91, "camera": 50, "cannon": 43, "car_side": 123,
    "ceiling_fan": 47, "cellphone": 59, "chair": 62, "chandelier": 107, "cougar_body": 47, "cougar_face": 69,
    "crab": 73, "crayfish": 70, "crocodile": 50, "crocodile_head": 51, "cup": 57, "dalmatian": 67,
    "dollar_bill": 52, "dolphin": 65, "dragonfly": 68, "electric_guitar": 75, "elephant": 64, "emu": 53,
    "euphonium": 64, "ewer": 85, "ferry": 67, "flamingo": 67, "flamingo_head": 45, "garfield": 34, "gerenuk": 34,
    "gramophone": 51, "grand_piano": 99, "hawksbill": 100, "headphone": 42, "hedgehog": 54, "helicopter": 88,
    "ibis": 80, "inline_skate": 31, "joshua_tree": 64, "kangaroo": 86, "ketch": 114, "lamp": 61, "laptop": 81,
    "llama": 78, "lobster": 41, "lotus": 66, "mandolin": 43, "mayfly": 40, "menorah": 87, "metronome": 32,
    "minaret": 76, "nautilus": 55, "octopus": 35, "okapi": 39, "pagoda": 47, "panda": 38, "pigeon": 45, "pizza": 53,
    "platypus": 34, "pyramid": 57, "revolver": 82, "rhino": 59, "rooster": 49, "saxophone": 40, "schooner": 63,
    "scissors": 39, "scorpion": 84, "sea_horse": 57, "snoopy": 35, "soccer_ball": 64, "stapler": 45, "starfish": 86,
    "stegosaurus": 59, "stop_sign": 64, "strawberry": 35, "sunflower": 85, "tick": 49, "trilobite": 86,
    "umbrella": 75, "watch": 239, "water_lilly": 37, "wheelchair": 59, "wild_cat": 34, "windsor_chair": 56,
    "wrench": 39, "yin_yang": 60}
CALTECH101_CLASSES = frozenset(CALTECH101_IMAGES)
CUB_CLASSES = 200  # ids 1..200 in classes.txt
FOOD101_CLASSES = 101


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where they must be; the message says where and how to get them."""


class CorruptImageError(OSError):
    """An image file could not be read or decoded; the message names the file and why."""


class DatasetMetadataError(ValueError):
    """A dataset's metadata (split lists, labels, class names) is malformed; the message names the file and line."""


def _key(name: str) -> str:
    """A name read from the file system as a sample key: its bytes as UTF-8, undecodable bytes as surrogate escapes
    (what Python itself gives under a UTF-8 locale), so keys and the k-shot draw do not depend on the locale."""
    return os.fsencode(name).decode("utf-8", "surrogateescape")


def _fs_name(key: str) -> str:
    """The file-system name of a key or class name (the inverse of :func:`_key`), to open it under this locale."""
    return os.fsdecode(key.encode("utf-8", "surrogateescape"))


def _to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB image of any PIL mode, with the brightness the file means (PIL's own ``convert`` clips 16-bit
    greys to white): integer greys (``I;16``, ``I``) are scaled from 0..65535, float greys (``F``) from [0, 1] (from
    0..255 when brighter), and transparency (``LA``, ``RGBA``, or a transparent colour in any mode, as PNG's tRNS)
    is composited over white. A float image with NaN or infinite pixels is refused (ValueError)."""
    trns = img.info.get("transparency")
    if img.mode == "RGB" and isinstance(trns, tuple) and max(trns) > 255:
        # a 16-bit colour key, which Pillow keeps while it reads the pixels' high bytes: no pixel would match it
        trns = img.info["transparency"] = tuple(value >> 8 for value in trns)
    if img.mode.startswith("I") or img.mode == "F":
        pixels = np.asarray(img)
        grey = Image.fromarray(_grey_to_uint8(pixels, img.mode))
        if trns is None:
            return grey.convert("RGB")
        grey.putalpha(Image.fromarray(np.where(pixels == trns, 0, 255).astype(np.uint8)))
        img = grey
    if img.mode == "RGB" and trns is None:
        return img
    if img.mode in ("LA", "PA", "RGBA", "La", "RGBa") or trns is not None:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def _too_large_message(path: Path, where: str, err: Exception) -> str:
    """Why an image over PIL's pixel limit is not read, and how to read it: it is not corrupt, just large."""
    reason = str(err).rstrip(".")
    return (f"image {path} ({where}) is larger than PIL's limit ({reason}; PIL refuses twice Image.MAX_IMAGE_PIXELS="
            f"{Image.MAX_IMAGE_PIXELS}, a guard against decompression bombs). It is not corrupt: resize the image (the "
            "only way from the command line), or, from Python, raise the limit before the data is read "
            "(`PIL.Image.MAX_IMAGE_PIXELS = <pixels>`, or None for none; in each DataLoader worker too, by its "
            "worker_init_fn, where workers are spawned rather than forked).")


def _grey_to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    if mode == "F":
        bad = int(np.count_nonzero(~np.isfinite(pixels)))
        if bad:
            raise ValueError(f"{bad} of its {pixels.size} pixels are NaN or infinite (a float image), so it cannot be "
                             "an input")
        top = 1.0 if pixels.size == 0 or pixels.max() <= 1.0 else 255.0
    else:
        top = 65535.0
    return np.round(np.clip(pixels.astype(np.float64) / top, 0.0, 1.0) * 255.0).astype(np.uint8)


class ImageDataset(Dataset):
    """A labelled image dataset: ``samples`` of ``(key, label)``, ``load_image(i)`` gives a PIL RGB image."""

    def __init__(self, name: str, root: Path, split: str, samples: list[tuple[str, int]],
                 class_names: list[str], transform: Optional[Callable] = None, *,
                 sizes: Optional[dict[str, int]] = None, other_split_sizes: Optional[dict[str, int]] = None) -> None:
        self.name = name
        self.root = Path(root)  # the dataset folder; manifest keys are relative to it
        self.split = split
        self.samples = samples
        self.class_names = list(class_names)
        self.transform = transform
        # A train split's file sizes by key from the stat of the reader's own listing, and the held-out split's (key:
        # size), where the reader listed both (imagefolder does, to refuse links between them): what finding copies of
        # the drawn images (FewShotDataModule, which then drops them) needs, without a second stat or listing
        self.sizes = dict(sizes or {})
        self.other_split_sizes = other_split_sizes

    @property
    def targets(self) -> list[int]:
        """Labels of all samples, in order."""
        return [label for _, label in self.samples]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def path_of(self, key: str) -> Path:
        """The file of sample key ``key``, named as this process's file system names it."""
        return self.root / _fs_name(key)

    def load_image(self, index: int) -> Image.Image:
        """Decode sample ``index`` as a PIL RGB image, turned upright as its EXIF orientation says (as viewers do)."""
        path = self.path_of(self.samples[index][0])
        _refuse_opening_special(path, f"{self.name} {self.split} split")
        try:
            with Image.open(path) as img:
                img.load()  # decode now, while the file is open (and so that errors surface here)
                return _to_rgb(_upright(img))
        except FileNotFoundError:
            raise
        except PermissionError as err:  # a valid image: downloading it again is no cure
            raise CorruptImageError(f"cannot read image {path} ({self.name} {self.split} split): {err.strerror}. Make "
                                    "it readable (chmod a+r), or remove it") from err
        except Image.DecompressionBombError as err:
            raise CorruptImageError(_too_large_message(path, f"{self.name} {self.split} split", err)) from err
        except (OSError, SyntaxError, ValueError) as err:
            raise CorruptImageError(f"cannot decode image {path} ({self.name} {self.split} split): {err}. Replace it "
                                    "with a valid image (extract or download the dataset again).") from err

    def unreadable_files(self, indices: Optional[Iterable[int]] = None) -> list[Path]:
        """Sample files (of ``indices``, or all) that are missing, hold 0 bytes or are cut short (an interrupted copy),
        are no regular file (a named pipe) or that this process may not read (:func:`unreadable_reason`)."""
        keys = (self.samples[i][0] for i in (range(len(self.samples)) if indices is None else indices))
        return [path for path in map(self.path_of, keys) if unreadable_reason(path) is not None]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = self.load_image(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.samples[index][1]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, root={str(self.root)!r}, "
                f"samples={len(self)}, classes={self.num_classes})")


# EXIF orientations (tag 0x0112) and the transposition that turns such an image upright, as viewers (and
# ``ImageOps.exif_transpose``) do.
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def _upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation says. Only the pixels are turned: ``exif_transpose`` also rewrites the
    EXIF block, which failed (struct.error) on a camera's malformed tag of no use here. Metadata too damaged to read
    leaves the image as stored."""
    try:
        orientation = img.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - Pillow raises many kinds on damaged metadata; the pixels decoded fine
        return img
    method = _UPRIGHT.get(orientation) if isinstance(orientation, int) else None
    return img if method is None else img.transpose(method)


class ArrayImageDataset(ImageDataset):
    """Images held in one uint8 array (N, H, W) or (N, H, W, 3); keys are ``<split>/<index>``."""

    def __init__(self, name: str, root: Path, split: str, images: np.ndarray, labels: Sequence[int],
                 class_names: list[str], transform: Optional[Callable] = None) -> None:
        width = max(5, len(str(len(images))))
        samples = [(f"{split}/{i:0{width}d}", int(y)) for i, y in enumerate(labels)]
        super().__init__(name, root, split, samples, class_names, transform)
        self.images = images

    def load_image(self, index: int) -> Image.Image:
        return _to_rgb(Image.fromarray(self.images[index]))

    def unreadable_files(self, indices: Optional[Iterable[int]] = None) -> list[Path]:
        return []  # in memory


# --------------------------------------------------------------------------------------------------
# Readers, one per layout
# --------------------------------------------------------------------------------------------------

def _not_found(name: str, expected: Path, how: str, root: Path) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"dataset '{name}' not found: expected {expected}. {how} "
        f"Or point --data.root (root=...) at the folder that holds it.{_one_level_too_deep(expected, root)}"
        f"{_extracted_into_its_name(expected, root)}")


def _one_level_too_deep(expected: Path, root: Path) -> str:
    """A hint where ``root`` is itself the folder the dataset expects inside it (``root=.../train`` for an image
    folder expected at ``<root>/train/...``, a CIFAR root at its ``cifar-10-batches-py``)."""
    try:
        inner = expected.relative_to(root).parts[0]
    except (ValueError, IndexError):
        return ""
    if inner != root.name or not root.is_dir():
        return ""
    return (f" ({root} is itself the {inner!r} folder the dataset expects inside --data.root: did you mean "
            f"--data.root {root.parent}?)")


def _extracted_into_its_name(expected: Path, root: Path) -> str:
    """A hint where the dataset's folder holds no folder but the dataset's folder again, with content
    (``food-101/food-101/meta``: the archive extracted into a folder named as it, perhaps beside loose files of the
    archive, as CUB's ``attributes.txt``), so that --data.root is that outer folder. A dataset's folder that holds its
    own folders and also a folder of its name is read as it is."""
    try:
        inside = expected.relative_to(root)
    except ValueError:
        return ""
    if not inside.parts:
        return ""
    outer = root / inside.parts[0]
    inner = outer / inside.parts[0]
    folders = [entry for entry in _visible_entries(outer) if entry.is_dir()]
    if folders != [inner] or not _visible_entries(inner) or not (outer / inside).exists():
        return ""
    return (f" ({outer} holds a {inside.parts[0]!r} folder of its own, as an archive extracted into a folder of its "
            f"name does: did you mean --data.root {outer}?)")


def _visible_entries(folder: Path) -> list[Path]:
    """The entries of ``folder`` whose names do not start with a dot (none when it cannot be listed), sorted."""
    try:
        with os.scandir(folder) as entries:
            return sorted(Path(e.path) for e in entries if not e.name.startswith("."))
    except OSError:
        return []


def _subfolders(folder: Path) -> list[Path]:
    """The visible folders directly in ``folder`` (:func:`_visible_entries`), sorted."""
    return [entry for entry in _visible_entries(folder) if entry.is_dir()]


def _refuse_extra_classes(name: str, source: Path, found: int, expected: int, extra: Sequence[str],
                          fix: str) -> None:
    """Refuse more classes than the dataset has, naming those that are not its own (``extra``): an added folder or
    entry is not an incomplete extraction, and extracting again would not remove it."""
    if found <= expected:
        return
    which = ""
    if len(extra) == found - expected:
        which = f": {', '.join(map(repr, extra))} {'is' if len(extra) == 1 else 'are'} not among its classes"
    elif extra:  # more than the surplus are foreign (renamed, or another dataset): which ones to drop is unclear
        which = f", and {len(extra)} of them are not among its classes (e.g. {', '.join(map(repr, extra[:3]))})"
    raise DatasetMetadataError(f"dataset '{name}': {source} holds {found} classes, expected {expected}{which}. {fix}")


class _CIFAR:
    """CIFAR-10/100 through torchvision, which verifies the MD5 of every pickle."""

    def __init__(self, name: str, folder: str, url: str, torchvision_name: str) -> None:
        self.name, self.folder, self.url, self.torchvision_name = name, folder, url, torchvision_name
        self.torchvision_class: Optional[type] = None  # resolved lazily; tests may substitute a subclass

    def _tv(self) -> type:
        if self.torchvision_class is None:
            import torchvision.datasets as tvd
            return getattr(tvd, self.torchvision_name)
        return self.torchvision_class

    def expected(self, root: Path) -> Path:
        return root / self.folder

    def download(self, root: Path) -> None:
        for train in (True, False):
            self._tv()(str(root), train=train, download=True)

    def __call__(self, root: Path, split: str) -> ImageDataset:
        folder = self.expected(root)
        try:
            tv = self._tv()(str(root), train=split == "train", download=False)
        except RuntimeError as err:
            nested = _extracted_into_its_name(folder, root)
            if nested:  # the whole dataset one folder down: nothing to delete or download
                raise DatasetNotFoundError(f"dataset '{self.name}': {folder} lacks its files{nested}") from err
            if folder.is_dir():
                raise DatasetNotFoundError(
                    f"dataset '{self.name}': files under {folder} are incomplete or fail torchvision's MD5 "
                    f"check ({err}). Delete the folder and pass download=True (--data.download true), or "
                    f"extract {self.url} there again.") from err
            raise _not_found(self.name, folder, f"Pass download=True (--data.download true) to fetch {self.url}, "
                             f"or extract it under {root}.", root=root) from err
        return ArrayImageDataset(self.name, folder, split, tv.data, tv.targets, list(tv.classes))

    def class_names(self, root: Path) -> list[str]:
        """Read from the metadata pickle alone, after checking its MD5 (unpickling runs code from the file)."""
        from torchvision.datasets.utils import check_integrity

        tv = self._tv()
        path = self.expected(root) / tv.meta["filename"]
        if not path.is_file():
            raise _not_found(self.name, path, f"Pass download=True (--data.download true) to fetch {self.url}, "
                             f"or extract it under {root}.", root=root)
        if not check_integrity(str(path), tv.meta["md5"]):
            raise DatasetNotFoundError(
                f"dataset '{self.name}': {path} fails the MD5 check of the official archive, so it is not read "
                f"(unpickling a foreign file can run code). Delete {path.parent} and download it again "
                f"(--data.download true), or extract {self.url} there again.")
        try:
            with open(path, "rb") as f:
                return list(_NoGlobalsUnpickler(f, encoding="latin1").load()[tv.meta["key"]])
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError) as err:
            raise DatasetNotFoundError(f"dataset '{self.name}': {path} is not CIFAR metadata ({err}); delete "
                                       f"{path.parent} and download it again (--data.download true).") from err


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Unpickles plain containers only: the CIFAR metadata holds str lists and ints, never a class or function."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset metadata file")


def _refuse_repeats(entries: Iterable[tuple[Hashable, str]], fix: str) -> None:
    """Refuse an image listed twice, in one split or in both: ``entries`` are ``(identity, where it is listed)``
    over both splits. A repeat would be drawn twice as a shot, or be tested on after training on it."""
    seen: dict[Hashable, str] = {}
    repeats = []  # all of them: a tree of hard-linked copies (jdupes, rdfind) is named whole, not a pair a run
    for identity, where in entries:
        if identity in seen:
            first = seen[identity]
            repeats.append(f"{where} is listed twice" if first == where else f"{first} and {where} are the same image")
        else:
            seen[identity] = where
    if repeats:
        more = f" (and {len(repeats) - 3} more)" if len(repeats) > 3 else ""
        raise DatasetMetadataError(f"{len(repeats)} image(s) listed twice: {'; '.join(repeats[:3])}{more}. Each image "
                                   f"may be used once, in one class of one split. {fix}")


def _listing_text(path: Path, errors: str = "replace") -> str:
    """A list file's text, as an editor may have saved it: UTF-8 with or without a byte-order mark, or UTF-16 with
    one (Notepad's "Unicode"); bytes that decode to nothing handled as ``errors`` says (U+FFFD by default)."""
    raw = path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return raw.decode("utf-16", errors=errors)
    return raw.decode("utf-8-sig", errors=errors)


def _text_lines(path: Path, fix: str, errors: str = "strict") -> list[tuple[int, str]]:
    """``(line number, stripped line)`` of a metadata text file (read as :func:`_listing_text` reads one; lines end
    at ``\\n``, ``\\r\\n`` or ``\\r``), blank lines left out."""
    try:
        lines = io.StringIO(_listing_text(path, errors), newline=None)
        return [(lineno, line.strip()) for lineno, line in enumerate(lines, 1) if line.strip()]
    except UnicodeDecodeError as err:
        raise DatasetMetadataError(f"{path} is not a text file ({err}). {fix}") from err
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:  # an extraction cut short
        raise DatasetNotFoundError(f"{path} is missing{' (a folder)' if path.is_dir() else ''}, so the extraction "
                                   f"looks incomplete. {fix}") from err


def _read_pairs(path: Path, fix: str, integer_values: bool = False, numbered: bool = False) -> dict[int, Any]:
    """Lines ``<id> <value>`` of a CUB metadata file as ``{id: value}``; a malformed line names the file and line.
    ``numbered``: the ids must be 1 to the number of lines, in any order (:func:`_refuse_misnumbered`)."""
    pairs: dict[int, Any] = {}
    lines = _text_lines(path, fix)
    for lineno, line in lines:
        key, _, value = line.partition(" ")
        value = value.strip()
        try:
            ident, parsed = int(key), int(value) if integer_values else value
        except ValueError:
            ident = parsed = None
        if ident is None or not value or ident in pairs:
            expected = "<id> <integer>" if integer_values else "<id> <value>"
            raise DatasetMetadataError(f"{path}:{lineno}: expected '{expected}' with an integer id that is not "
                                       f"repeated, got {line!r}. {fix}")
        if numbered:
            _refuse_misnumbered(path, lineno, line, ident, len(lines), fix)
        pairs[ident] = parsed
    return pairs


def _refuse_misnumbered(path: Path, lineno: int, line: str, ident: int, count: int, fix: str) -> None:
    """Refuse a line of ``classes.txt`` whose id ``ident`` lies outside 1 to ``count`` (its number of lines): labels
    are ids, and classes are named in the order of their ids, so an id 0, or a gap, shifts every later class's name
    (the order of the lines does not matter)."""
    if not 1 <= ident <= count:
        raise DatasetMetadataError(f"{path}:{lineno}: class id {ident} lies outside 1 to {count} (the ids of the "
                                   f"{count} classes in {path.name}), in {line!r}: a gap in the ids would give the "
                                   f"classes other names than their images' labels. Fix that line. {fix}")


def _refuse_unplain_path(rel: str, where: str, fix: str) -> None:
    """Refuse a metadata path with an empty, ``.`` or ``..`` part, or an absolute one: ``a/../b/x.jpg`` passes a
    check of its first folder but reads an image of another class (trained under the wrong label, and a test image
    could be trained on), and the repeat check compares paths as text."""
    if rel.startswith("/") or any(part in ("", ".", "..") for part in rel.split("/")):
        raise DatasetMetadataError(f"{where}: {rel!r} is not a plain relative path ('..', '.' or empty parts, or a "
                                   f"leading '/', would read an image outside its class folder). {fix}")


def _refuse_missing_images(folder: Path, keys: Sequence[str], listing: Path, fix: str) -> None:
    """Refuse images the dataset's metadata lists that are not under ``folder`` (an incomplete extraction), before
    anything trains: each image folder is listed once, no image is opened."""
    by_folder: dict[str, list[str]] = {}
    for key in keys:
        parent, _, name = key.rpartition("/")
        by_folder.setdefault(parent, []).append(name)
    missing = []
    for parent, names in by_folder.items():
        try:
            present = set(os.listdir(folder / parent))
        except OSError:
            present = set()
        missing += [f"{parent}/{name}" for name in names if name not in present]
    if missing:
        raise DatasetNotFoundError(f"{len(missing)} of the {len(keys)} images {listing} lists are not under {folder} "
                                   f"(e.g. {', '.join(map(repr, missing[:3]))}): the extraction is incomplete. {fix}")


class _CUB:
    name = "cub200"
    url = "https://data.caltech.edu/records/65de6-vp158 (CUB_200_2011.tgz)"

    def expected(self, root: Path) -> Path:
        # accept both root/CUB_200_2011 and root itself being the CUB_200_2011 folder
        return root if (root / "images.txt").is_file() else root / "CUB_200_2011"

    def _folder(self, root: Path) -> Path:
        folder = self.expected(root)
        if not (folder / "images.txt").is_file():
            raise _not_found(self.name, folder / "images.txt",
                             f"torchvision has no CUB downloader: download {self.url} and extract it under {root}.",
                             root=root)
        return folder

    def _fix(self, root: Path) -> str:
        return f"Extract {self.url} under {root} again."

    def _class_folders(self, root: Path) -> list[str]:
        """The class folder names of ``classes.txt`` (``001.Black_footed_Albatross``) in label order."""
        folder = self._folder(root)
        classes = _read_pairs(folder / "classes.txt", self._fix(root), numbered=True)
        if not classes:  # else every label of image_class_labels.txt is blamed instead
            raise DatasetMetadataError(f"{folder / 'classes.txt'} lists no class (it is empty). {self._fix(root)}")
        extra = [f"{key} {value}" for key, value in sorted(classes.items()) if not 1 <= key <= CUB_CLASSES]
        _refuse_extra_classes(self.name, folder / "classes.txt", len(classes), CUB_CLASSES, extra,
                              f"Remove those lines (CUB-200-2011 numbers its classes 1 to {CUB_CLASSES}), or extract "
                              f"{self.url} under {root} again.")
        return [classes[key] for key in sorted(classes)]

    def class_names(self, root: Path) -> list[str]:
        # "001.Black_footed_Albatross" -> "Black_footed_Albatross"
        return [name.split(".", 1)[-1] for name in self._class_folders(root)]

    def _refuse_other_folders(self, root: Path, images: dict[int, str], labels: dict[int, int],
                              class_folders: list[str]) -> None:
        """Refuse an image whose label (``image_class_labels.txt``) is not the class of the folder ``images.txt``
        puts it in: it would be trained on as another bird."""
        for img_id, rel in images.items():
            folder, label = rel.split("/", 1)[0], labels[img_id]
            if folder != class_folders[label - 1]:
                raise DatasetMetadataError(
                    f"{self._folder(root) / 'image_class_labels.txt'}: image id {img_id} ({rel!r}) has class {label} "
                    f"({class_folders[label - 1]!r}), but images.txt puts it in the folder of class {folder!r}: an "
                    f"image's label and its class folder must agree. Fix that line, or extract {self.url} under {root} "
                    "again.")

    def __call__(self, root: Path, split: str) -> ImageDataset:
        folder, fix = self._folder(root), self._fix(root)
        class_folders = self._class_folders(root)
        names = [name.split(".", 1)[-1] for name in class_folders]
        images = _read_pairs(folder / "images.txt", fix)
        labels = _read_pairs(folder / "image_class_labels.txt", fix, integer_values=True)
        is_train = _read_pairs(folder / "train_test_split.txt", fix, integer_values=True)
        for path, values, valid, what in (
                (folder / "image_class_labels.txt", labels, range(1, len(names) + 1),
                 f"a class id from 1 to {len(names)}: the labels count classes.txt's lines in order"),
                (folder / "train_test_split.txt", is_train, (0, 1), "1 (train) or 0 (test)")):
            missing, unknown = sorted(set(images) - set(values)), sorted(set(values) - set(images))
            if missing:
                raise DatasetMetadataError(f"{path} has no line for image ids {missing[:5]} of images.txt. {fix}")
            if unknown:  # images.txt cut short: its images would be left out of train and test alike, silently
                raise DatasetMetadataError(f"{path} lists {len(unknown)} image ids that images.txt does not (e.g. "
                                           f"{unknown[:5]}): images.txt looks cut short. {fix}")
            wrong = next((key for key, value in values.items() if value not in valid), None)
            if wrong is not None:
                raise DatasetMetadataError(f"{path}: image id {wrong} has {values[wrong]}, expected {what}. {fix}")
        for img_id, rel in images.items():
            _refuse_unplain_path(rel, f"{folder / 'images.txt'}: image id {img_id}", fix)
        self._refuse_other_folders(root, images, labels, class_folders)
        _refuse_repeats(((rel, f"{folder / 'images.txt'}: image id {img_id} {rel!r} "
                                f"({'train' if is_train[img_id] else 'test'})") for img_id, rel in images.items()),
                        f"Remove one of those lines, or extract {self.url} under {root} again.")
        want = 1 if split == "train" else 0
        samples = [(f"images/{images[img_id]}", labels[img_id] - 1)  # labels are 1-based on disk
                   for img_id in sorted(images) if is_train[img_id] == want]
        _refuse_missing_images(folder, [key for key, _ in samples], folder / "images.txt", fix)
        if split != "train":
            tested = {names[label] for _, label in samples}
            _warn_classes_without_images(folder / "train_test_split.txt",
                                         [name for name in names if name not in tested])
        return ImageDataset(self.name, folder, split, samples, names)


def _hidden_name(name: str) -> bool:
    """A dot-file or dot-folder (macOS ``._*`` resource forks, ``.ipynb_checkpoints``, ``.DS_Store``) or a folder
    that tools write among images (``METADATA_FOLDERS``: Synology ``@eaDir`` thumbnails, ``__MACOSX``): never data."""
    return name.startswith(".") or name in METADATA_FOLDERS


def _hidden(path: Path) -> bool:
    """Whether ``path`` is tool metadata (:func:`_hidden_name`), never a class or an image."""
    return _hidden_name(path.name)


def _broken_link_error(path: Union[str, Path]) -> DatasetNotFoundError:
    """The error for a symbolic link whose target cannot be reached: skipping it would silently drop a class (and
    shift every later label) or an image."""
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return DatasetNotFoundError(
        f"{path} is a symbolic link to {target}, which cannot be reached (missing, e.g. an unmounted share or a moved "
        "folder, or a loop of links). Mount or restore its target, fix the link, or remove it: a broken link is not "
        "skipped, since the class or image it stands for would be left out without a word.")


def _refuse_broken_link(path: Union[str, Path]) -> None:
    """Refuse ``path`` when it is a symbolic link whose target cannot be reached (:func:`_broken_link_error`)."""
    if os.path.islink(path) and not os.path.exists(path):
        raise _broken_link_error(path)


def _refuse_line_break(key: str, path: Union[str, Path]) -> None:
    """Refuse a sample key with a line break: a split manifest holds one image per line, so it could not be read
    back."""
    if "\n" in key or "\r" in key:
        raise DatasetMetadataError(f"{os.fspath(path)!r}: a file or folder name with a line break ('\\n' or '\\r') "
                                   "cannot be written to a split manifest (one image per line). Rename it.")


@dataclass(frozen=True)
class _FileIdentity:
    """What makes two paths one file (``file``: device and inode, or the real path), and the file's size from the same
    stat: carried to :attr:`ImageDataset.sizes` (no second stat), never compared."""

    file: Hashable
    size: int = field(compare=False)
    regular: bool = field(default=True, compare=False)  # a regular file, not a named pipe, socket or device


def _file_identity(path: str) -> _FileIdentity:
    """What makes two paths one file: device and inode (``os.stat`` follows symbolic links), so that a hard link and a
    symbolic link to an image are both caught as its repeats; the real path where the file system numbers no inodes."""
    try:
        stat = os.stat(path)
    except OSError as err:
        if os.path.islink(path):
            raise _broken_link_error(path) from err
        if isinstance(err, PermissionError):  # a folder listed but not searchable (mode 0644): a bare [Errno 13]
            raise DatasetNotFoundError(f"cannot open {path} ({err.strerror}): its folder can be listed but not "
                                       f"searched. Make it readable (chmod -R u+rX {os.path.dirname(path)}), or move "
                                       "it out of the dataset") from err
        raise
    return _FileIdentity((stat.st_dev, stat.st_ino) if stat.st_ino else os.path.realpath(path), stat.st_size,
                         S_ISREG(stat.st_mode))


def _visible_files(folder: Path) -> dict[str, _FileIdentity]:
    """Every visible file under ``folder``: ``{path relative to it, as a key: its identity (:func:`_file_identity`)}``,
    sorted, following symbolic links once: a link back to a folder already read, to ``folder`` or to one of its
    parents (whose other class folders' images would come back under this class) is not followed. A broken link, an
    image whose path has a line break, and an image name that is no regular file (a named pipe), are refused."""
    root = os.path.realpath(folder)
    files: dict[str, _FileIdentity] = {}
    visited: set[str] = set()
    for directory, subfolders, names in os.walk(folder, followlinks=True, onerror=_unlistable_folder):
        real = os.path.realpath(directory)
        encloses_root = real == root or root.startswith(real.rstrip(os.sep) + os.sep)
        if real in visited or (encloses_root and visited):  # the walk's start is the one enclosing folder it reads
            subfolders[:] = []
            continue
        visited.add(real)
        subfolders[:] = sorted(name for name in subfolders if not _hidden_name(name))
        for name in names:
            if _hidden_name(name):
                continue
            path = os.path.join(directory, name)
            key = _key(Path(path).relative_to(folder).as_posix())
            identity = _file_identity(path)
            if Path(name).suffix.lower() in IMG_EXTENSIONS:
                _refuse_line_break(key, path)
                _refuse_special_file(path, identity)
            files[key] = identity
    return dict(sorted(files.items()))


def _refuse_special_file(path: str, identity: _FileIdentity) -> None:
    """Refuse an image name that is no regular file (a named pipe, socket or device): opening a named pipe waits for a
    writer forever, so it is named here, from the listing's stat, before anything opens it."""
    if not identity.regular:
        raise DatasetMetadataError(f"{path} is not a regular file (a named pipe, socket or device named as an "
                                   "image): reading it would wait forever or read no image. Remove it, or put the "
                                   "image file there")


def _unlistable_folder(err: OSError) -> None:
    """``os.walk``'s error handler: a folder that cannot be listed (no read permission, an I/O error) would be
    skipped, and its images with it, without a word. A folder gone meanwhile is simply not there."""
    if isinstance(err, (FileNotFoundError, NotADirectoryError)):
        return
    raise DatasetNotFoundError(f"cannot list folder {err.filename} ({err.strerror or err}): the images in it would be "
                               "left out. Make it readable (chmod -R u+rX on it), or move it out of the dataset"
                               ) from err


def _reads_nested(key: str) -> bool:
    """Whether torchvision's ImageFolder (and ours) reads the file ``key`` of a class folder: an image in a read format,
    in the class folder or any of its sub-folders."""
    return Path(key).suffix.lower() in IMG_EXTENSIONS


def _reads_flat(key: str) -> bool:
    """Whether Caltech-101's reader reads the file ``key`` of a class folder: an image in a read format, in the class
    folder itself (the archive has no sub-folders; torchvision's reader lists the class folder alone)."""
    return "/" not in key and _reads_nested(key)


def _unread_images(folder: Path, class_files: dict[str, dict[str, _FileIdentity]],
                   reads: Callable[[str], bool] = _reads_nested) -> list[str]:
    """Image files under ``folder`` that a split leaves out: loose in it rather than in a class folder, or in a class
    folder (``class_files``: its :func:`_visible_files`) but not read (``reads``: in a format that is not read, or
    in a sub-folder that is not), or an image of a read format without its extension (a JPEG named ``3f9a2c0`` or
    ``x.jpg_large``, told by its first bytes); paths relative to ``folder``."""
    known = (*IMG_EXTENSIONS, *UNREAD_IMAGE_EXTENSIONS)

    def is_image(path: Path, name: str) -> bool:
        suffix = Path(name).suffix.lower()
        # only a name without a suffix, or with a read format's and more (".jpg_large"), is opened to look
        looks = not suffix or suffix.startswith(IMG_EXTENSIONS)
        return suffix in known or (looks and _has_image_signature(path))

    loose = [p.name for p in folder.iterdir() if p.is_file() and not _hidden(p) and is_image(p, p.name)]
    unread = [f"{name}/{path}" for name, files in class_files.items() for path in files
              if not reads(path) and is_image(folder / _fs_name(name) / _fs_name(path), path)]
    return sorted(loose) + unread


# The first bytes of the common read formats: JPEG, PNG, TIFF (both byte orders); WebP's follow RIFF and a length.
# BMP's and PPM's two letters would also start a text file.
_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"II*\x00", b"MM\x00*")


def _has_image_signature(path: Path) -> bool:
    """Whether the file at ``path`` starts as an image of a read format does; False when it cannot be read, and for
    anything but a regular file (opening a named pipe would wait for a writer)."""
    try:
        if not path.is_file():  # a regular file (or a link to one)
            return False
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return False
    return head.startswith(_IMAGE_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _report_unread_images(folder: Path, unread: list[str], refuse: bool, layout: str = "") -> None:
    """Name the image files a split leaves out (:func:`_unread_images`): refused (``refuse``: nothing read at all, or
    a training class left with none of its images), else a warning. ``layout`` says where images are read from."""
    if not unread:
        return
    message = (f"{len(unread)} image file(s) under {folder} are not read ({', '.join(unread[:3])}"
               f"{', ...' if len(unread) > 3 else ''}): images are read from {folder}/<class>/{layout} in the formats "
               f"{', '.join(IMG_EXTENSIONS)}. Move loose images into their class folder, convert others "
               "(e.g. GIF, AVIF, HEIC) to PNG or JPEG, and give images without their format's extension one")
    if refuse:
        raise DatasetNotFoundError(message)
    warn_user(message)


def _warn_classes_without_images(where: Union[str, Path], empty: Sequence[str]) -> None:
    """Warn that the held-out split ``where`` has no images of classes ``empty``: its accuracy leaves them out."""
    if empty:
        warn_user(f"{where} has no images of classes {list(empty)}: its accuracy covers the other classes only")


def _class_folders(folder: Path) -> list[str]:
    """Names (as keys, :func:`_key`) of the visible sub-folders of ``folder`` (hidden ones are tool metadata, not
    classes), sorted by their composed form (NFC): a macOS copy (NFD) gives its classes the same labels, as the draw
    gives it the same images. A broken link among them is refused: dropping it would shift every later class's
    label; so are two names that differ only in Unicode normalization (:func:`_refuse_names_alike`)."""
    names = []
    for path in folder.iterdir():
        if _hidden(path):
            continue
        _refuse_broken_link(path)
        if path.is_dir():
            _refuse_line_break(_key(path.name), path)
            names.append(_key(path.name))
    _refuse_names_alike(folder, names)
    return sorted(names, key=composed_name)


def _refuse_names_alike(folder: Path, names: Sequence[str]) -> None:
    """Refuse class folders of ``folder`` whose names look alike (``_look_alike_form``): they differ only in Unicode
    normalization (a macOS copy, NFD, merged into a tree written elsewhere, NFC) or in surrounding whitespace
    (``'cat '`` beside ``cat``), so one real class would be split in two labels. Not merged here: each folder's key
    must keep opening its own files, so the user merges them."""
    seen: dict[str, str] = {}
    for name in sorted(names):
        form = _look_alike_form(name)
        if form in seen:
            how = ("in Unicode normalization (NFC/NFD: macOS writes an accented letter as the letter and a combining "
                   "accent, most other systems as one code point), e.g. a macOS copy merged into this tree"
                   if composed_name(name) == composed_name(seen[form]) else
                   "in surrounding whitespace, which a listing does not show")
            raise DatasetMetadataError(
                f"{folder} holds class folders {ascii(seen[form])} and {ascii(name)}, whose names differ only {how}. "
                "They look alike but would be read as two classes: merge one folder's images into the other and "
                "remove it (or rename one, if they are two classes).")
        seen[form] = name


def _look_alike_form(name: str) -> str:
    """``name`` as it looks: in Unicode's NFC form (:func:`composed_name`) without surrounding whitespace, which a
    listing does not show either (``'cat '`` prints as ``cat``). Only compared, never used as a key."""
    return composed_name(name).strip()


def _refuse_unknown_held_out_classes(folder: Path, train: Path, extra: Sequence[str], names: Sequence[str]) -> None:
    """Refuse held-out class folders (``extra``) that ``train`` lacks; one spelled as a training class in another
    Unicode normalization, or with other surrounding whitespace, is shown with ``ascii`` (it would print like the
    training class) and said so."""
    own = {_look_alike_form(name): name for name in names}
    alike = {name: own[_look_alike_form(name)] for name in extra if _look_alike_form(name) in own}
    listed = "[" + ", ".join(ascii(name) if name in alike else repr(name) for name in extra) + "]"
    message = f"{folder} has class folders that {train} lacks: {listed}"
    if alike:
        pairs = ", ".join(f"{ascii(name)} (train/ has {ascii(ours)})" for name, ours in alike.items())
        message += (f". {pairs}: the names differ only in {_how_alike(alike)}, so they look alike but are other "
                    f"folders: rename the folder under {folder} as train/'s is spelled (or the other way round)")
    raise DatasetMetadataError(message)


def _how_alike(alike: dict[str, str]) -> str:
    """How look-alike folder names (held-out name: training name) differ: in Unicode normalization, in surrounding
    whitespace (a space typed after the name), or both."""
    spaces = any(name.strip() != name or ours.strip() != ours for name, ours in alike.items())
    forms = any(name.strip() != ours.strip() for name, ours in alike.items())  # the same once composed (NFC)
    ways = [way for way, found in (("Unicode normalization (NFC/NFD, as macOS writes names)", forms),
                                   ("surrounding whitespace (e.g. a trailing space, which listings do not show)",
                                    spaces)) if found]
    return " and ".join(ways)


def _warn_val_not_read(root: Path) -> None:
    """Warn that ``root/val`` is not read when ``root/test`` exists: test/ is the held-out split, and validation images
    are drawn from train/."""
    warn_user(
        f"{root} holds both test/ and val/, and {root / 'val'} is not read: test/ is the held-out split, and "
        f"validation images are drawn from {root / 'train'} (--data.val_shots, or replayed from "
        "--data.val_split_file). To test on val/ instead, rename test/ (e.g. to test_unused/) or move it out of "
        f"{root}: val/ is the held-out split when there is no test/. To train or validate on val/'s images, move them "
        "into train/'s class folders.")


def _require_same_images(split_path: Path, listed: set, on_disk: set) -> None:
    """The split file lists exactly the images on disk: one made from a partial extraction would otherwise ignore
    the images added since, and one listing deleted images would fail only when they are read (after training)."""
    missing, unlisted = sorted(listed - on_disk), sorted(on_disk - listed)
    if missing or unlisted:
        problems = [f"{len(missing)} listed image(s) are not on disk (e.g. {missing[0]})" if missing else "",
                    f"{len(unlisted)} image(s) on disk are not listed (e.g. {unlisted[0]})" if unlisted else ""]
        raise DatasetMetadataError(
            f"{split_path} does not match the images under {split_path.parent}: "
            f"{'; '.join(p for p in problems if p)}. The split was made from another set of files (a partial "
            f"extraction?): edit it, adding a '<path> train' or '<path> test' line for each image not listed and "
            "removing the lines of images not on disk, which keeps every other image in its split. Deleting it "
            "makes a new split by position, in which images move between train and test: a model trained on the "
            "old split would be tested on some of its own training images. If no model trained on it (its runs were "
            "refused, say for too few images of a class cut short by the extraction), delete it instead")


class _Caltech101:
    name = "caltech101"
    url = "https://data.caltech.edu/records/mzrjq-6wc02 (caltech-101.zip)"

    def expected(self, root: Path) -> Path:
        return root / "caltech101" / CALTECH_IMAGES

    def download(self, root: Path) -> None:
        # An extraction that is there is read as it is: torchvision would take each entry (a .DS_Store, a folder
        # without BACKGROUND_Google) for its category list and fail
        if self.expected(root).is_dir():
            return
        import torchvision.datasets as tvd
        tvd.Caltech101(str(root), download=True)

    def class_names(self, root: Path) -> list[str]:
        cats = self.expected(root)
        for folder in (cats.parent, cats):
            _refuse_broken_link(folder)
        if not cats.is_dir():
            raise _not_found(self.name, cats, f"Pass download=True (--data.download true) to fetch {self.url} "
                             f"with torchvision, or extract it so that {cats} exists.", root=root)
        # as torchvision: sorted folder names without the BACKGROUND_Google clutter class
        names = [name for name in _class_folders(cats) if name != "BACKGROUND_Google"]
        if names == [CALTECH_IMAGES] and _class_folders(cats / CALTECH_IMAGES):
            raise DatasetNotFoundError(
                f"dataset '{self.name}': {cats} holds a {CALTECH_IMAGES!r} folder of its own, with the categories "
                f"in it ({CALTECH_IMAGES}.tar.gz extracted into a folder of its name): move that folder's contents "
                f"up one level, into {cats} (e.g. mv {cats / CALTECH_IMAGES}/* {cats}/ && rmdir "
                f"{cats / CALTECH_IMAGES})")
        # refused here, before split_assignment writes a split file that would list the extra folder's images
        _refuse_extra_classes(self.name, cats, len(names), len(CALTECH101_CLASSES),
                              [name for name in names if name not in CALTECH101_CLASSES],
                              f"Remove the folders that are not Caltech-101 categories from {cats} (each of its "
                              "folders but BACKGROUND_Google is a class)")
        self._refuse_other_names(cats, names)
        return names

    def _refuse_other_names(self, cats: Path, names: list[str]) -> None:
        """Refuse Caltech-101's class count under other folder names: a foreign folder standing in for a missing
        category would be trained on under a name that is not Caltech-101's."""
        if len(names) != len(CALTECH101_CLASSES) or set(names) == CALTECH101_CLASSES:
            return
        unexpected, missing = sorted(set(names) - CALTECH101_CLASSES), sorted(CALTECH101_CLASSES - set(names))

        def few(items: list[str]) -> str:
            return ", ".join(map(repr, items[:3])) + (", ..." if len(items) > 3 else "")

        raise DatasetMetadataError(
            f"dataset '{self.name}': {cats} holds {len(names)} class folders, as Caltech-101 has, but "
            f"{len(unexpected)} are not its categories ({few(unexpected)}) and {len(missing)} of its categories are "
            f"missing ({few(missing)}). Give the folders the archive's own names, or extract {self.url} there again.")

    def _listing(self, root: Path) -> dict[str, dict[str, _FileIdentity]]:
        """Every visible file of each class folder (:func:`_visible_files`), after refusing a file that a link
        (symbolic or hard) brings in twice: it could be a training and a test image at once."""
        cats = self.expected(root)
        listing = {name: _visible_files(cats / _fs_name(name)) for name in self.class_names(root)}
        _refuse_repeats(((identity, f"{cats}/{name}/{fname}") for name, files in listing.items()
                         for fname, identity in files.items() if _reads_flat(fname)),
                        "Remove the symbolic link or hard link that reaches it a second time.")
        return listing

    def split_assignment(self, root: Path, listing: Optional[dict[str, dict[str, _FileIdentity]]] = None
                         ) -> dict[str, str]:
        """``{relative path: "train"|"test"}``, read from the split file or made (and written) by our rule;
        ``listing``: :meth:`_listing`, when the caller has it already."""
        folder = root / "caltech101"
        split_path = folder / CALTECH_SPLIT_FILE
        listing = self._listing(root) if listing is None else listing
        on_disk = {name: [fname for fname in files if _reads_flat(fname)] for name, files in listing.items()}
        if split_path.is_file():
            # a category missing or emptied is an incomplete extraction, not a malformed line of the split file
            self._refuse_incomplete(folder, on_disk, split_written=True)
            assignment = self._read_split(split_path, set(on_disk))
            images = {f"{CALTECH_IMAGES}/{name}/{fname}" for name, files in on_disk.items() for fname in files}
            _require_same_images(split_path, set(assignment), images)
            return assignment
        self._refuse_incomplete(folder, on_disk)  # before the split file fixes an incomplete extraction's split
        assignment = {}
        for name, files in on_disk.items():
            for pos, fname in enumerate(files):
                rel = f"{CALTECH_IMAGES}/{name}/{fname}"
                assignment[rel] = "test" if pos % CALTECH_TEST_EVERY == 0 else "train"
        lines = ["# nola_vision Caltech-101 split: per class, sorted by file name, every 5th image "
                 "(positions 0, 5, ...) is test\n"] + [f"{rel} {s}\n" for rel, s in assignment.items()]
        _write_text_atomic(split_path, "".join(lines), missing_ok=True)
        return assignment

    def _refuse_incomplete(self, folder: Path, on_disk: dict[str, list[str]], split_written: bool = False) -> None:
        """Refuse an extraction without every category, or with a category folder without images (the archive cut
        short): the split file made from it would stand, and refuse the complete dataset extracted again. With the
        split file there already (``split_written``), it is kept: the images it lists are to be extracted again."""
        missing = sorted(CALTECH101_CLASSES - set(on_disk))
        empty = [name for name, files in on_disk.items() if not files]
        if not missing and not empty:
            if not split_written:
                self._refuse_cut_short(folder, on_disk)
            return
        what = (f"{len(missing)} of its {len(CALTECH101_CLASSES)} categories are missing (e.g. "
                f"{', '.join(map(repr, missing[:3]))})" if missing else
                f"category {empty[0]!r} has no images{f' (and {len(empty) - 1} more)' if len(empty) > 1 else ''}")
        kept = (f"The split file {CALTECH_SPLIT_FILE} there is kept: it lists those images, which keep their split "
                "once extracted again." if split_written else
                f"Nothing was written (the split file {CALTECH_SPLIT_FILE} is made from the complete dataset).")
        raise DatasetNotFoundError(f"dataset '{self.name}' under {folder}: {what}, so the extraction looks "
                                   f"incomplete; extract {self.url} there again. {kept}")

    def _refuse_cut_short(self, folder: Path, on_disk: dict[str, list[str]]) -> None:
        """Refuse, before the split file is written, fewer images in all than the archive holds when some category
        holds fewer than the archive's: an extraction or copy cut short inside a category would train on a subset,
        and the split file made from it would refuse the complete dataset later. Only a total below the archive's is
        refused: a copy whose counts differ per category but not in all is not taken for a cut one."""
        if sum(map(len, on_disk.values())) >= sum(CALTECH101_IMAGES.values()):
            return
        short = [f"{name!r} holds {len(files)} of its {CALTECH101_IMAGES[name]}" for name, files in on_disk.items()
                 if len(files) < CALTECH101_IMAGES[name]]
        raise DatasetNotFoundError(
            f"dataset '{self.name}' under {folder}: {len(short)} "
            f"{'category holds' if len(short) == 1 else 'categories hold'} fewer images than the archive's "
            f"({'; '.join(short[:3])}{'; ...' if len(short) > 3 else ''}), so the extraction looks cut short; "
            f"extract {self.url} there again. Nothing was written (the split file {CALTECH_SPLIT_FILE} is made from "
            "the complete dataset).")

    def _read_split(self, path: Path, names: set[str]) -> dict[str, str]:
        """The split file ``<101_ObjectCategories/class/file> <train|test>`` per line; a malformed line is named."""
        assignment = {}
        for lineno, line in _text_lines(path, f"Delete {path} to regenerate it.", errors="surrogateescape"):
            if line.startswith("#"):
                continue
            rel, _, split = line.rpartition(" ")
            parts = rel.split("/")
            if split not in ("train", "test") or len(parts) != 3 or parts[0] != CALTECH_IMAGES \
                    or parts[1] not in names or rel in assignment:
                raise DatasetMetadataError(
                    f"{path}:{lineno}: expected '101_ObjectCategories/<class>/<image> train|test' (each image once, "
                    f"a class folder of 101_ObjectCategories), got {line!r}. Fix the line, or delete {path} to "
                    "regenerate the default split.")
            assignment[rel] = split
        return assignment

    def __call__(self, root: Path, split: str) -> ImageDataset:
        names = self.class_names(root)
        index = {n: i for i, n in enumerate(names)}
        listing = self._listing(root)
        unread = _unread_images(self.expected(root), listing, _reads_flat)
        emptied = {name for name, files in listing.items() if not any(_reads_flat(f) for f in files)}
        _report_unread_images(self.expected(root), unread, any(f.split("/", 1)[0] in emptied for f in unread),
                              " (not its sub-folders)")
        samples = [(rel, index[rel.split("/")[1]]) for rel, s in self.split_assignment(root, listing).items()
                   if s == split]
        if split != "train":
            tested = {names[label] for _, label in samples}
            _warn_classes_without_images(self.expected(root), [name for name in names if name not in tested])
        return ImageDataset(self.name, root / "caltech101", split, samples, names)


def _unique_keys(path: Path, fix: str, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict, refusing a repeated key: ``json.load`` keeps the last one, so the images an
    earlier repeat lists would silently be in no split."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise DatasetMetadataError(f"{path}: class {key!r} is listed twice (JSON keeps only the last list, so the "
                                       f"other's images would be in no split). {fix}")
        seen[key] = value
    return seen


class _Food101:
    name = "food101"
    url = "http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz"

    def expected(self, root: Path) -> Path:
        return root / "food-101"

    def download(self, root: Path) -> None:
        folder = self.expected(root)
        if (folder / "meta").is_dir() and (folder / "images").is_dir():  # torchvision would download nothing here
            self._require_whole(root)
            return
        import torchvision.datasets as tvd
        tvd.Food101(str(root), download=True)

    def _require_whole(self, root: Path) -> None:
        """Refuse an extraction that lacks one of the files or folders read, which a download would not complete."""
        folder = self.expected(root)
        parts = [folder / "meta" / "train.json", folder / "meta" / "test.json", folder / "images"]
        missing = [str(part.relative_to(folder)) for part in parts if not part.exists()]
        nested = _extracted_into_its_name(folder, root) if missing else ""
        if nested:  # the whole dataset is there, one folder down: nothing to delete or download
            raise DatasetNotFoundError(f"dataset '{self.name}': {folder} lacks {', '.join(missing)}{nested}")
        if missing:
            raise DatasetNotFoundError(
                f"dataset '{self.name}': {folder} lacks {', '.join(missing)} (an interrupted extraction?), which "
                "download=True does not complete (torchvision downloads only where meta/ or images/ is missing): "
                f"delete {folder} and pass download=True (--data.download true) again, or extract {self.url} under "
                f"{root} again.")

    def _meta(self, root: Path, split: str) -> dict[str, list[str]]:
        path = self.expected(root) / "meta" / f"{split}.json"
        if not path.is_file():
            if self.expected(root).exists():
                self._require_whole(root)
            raise _not_found(self.name, path, f"Pass download=True (--data.download true) to fetch {self.url} "
                             f"with torchvision, or extract it under {root}.", root=root)
        fix = f"Extract {self.url} under {root} again."
        try:
            with open(path, encoding="utf-8-sig") as f:  # a byte-order mark, as an editor may save
                meta = json.load(f, object_pairs_hook=partial(_unique_keys, path, fix))
        except json.JSONDecodeError as err:
            raise DatasetMetadataError(f"{path}:{err.lineno}: not valid JSON ({err.msg}). {fix}") from err
        except (UnicodeDecodeError, RecursionError) as err:
            raise DatasetMetadataError(f"{path}: not a Food-101 JSON file ({type(err).__name__}). {fix}") from err
        if not isinstance(meta, dict) or not meta:
            raise DatasetMetadataError(f"{path}: expected an object of class name -> list of '<class>/<id>' image "
                                       f"names, got {type(meta).__name__}. {fix}")
        for name, images in meta.items():
            if not isinstance(images, list) or not all(isinstance(i, str) and i.startswith(f"{name}/") for i in images):
                raise DatasetMetadataError(f"{path}: class {name!r} must list '{name}/<id>' image names, got "
                                           f"{reprlib.repr(images)}. {fix}")
            for image in images:
                _refuse_line_break(image, f"{path}: {image}")
                _refuse_unplain_path(image, f"{path}: class {name!r}", fix)
        return meta

    def class_names(self, root: Path) -> list[str]:
        names = sorted(self._meta(root, "test"))  # as torchvision: sorted keys of the split json
        meta = self.expected(root) / "meta"
        listed = meta / "classes.txt"  # the archive's list of its classes, one per line
        official = set(_listing_text(listed).split()) if listed.is_file() else set()
        _refuse_extra_classes(self.name, meta / "test.json", len(names), FOOD101_CLASSES,
                              [name for name in names if name not in official] if official else [],
                              f"Remove the classes that are not Food-101's from {meta / 'train.json'} and "
                              f"{meta / 'test.json'}, or extract {self.url} under {root} again.")
        foreign = sorted(set(names) - official) if official else []
        if foreign and len(names) <= FOOD101_CLASSES:  # one standing in for a class of its own would train under it
            classes = f"{len(foreign)} class{'es' if len(foreign) > 1 else ''}"
            raise DatasetMetadataError(
                f"dataset '{self.name}': {meta / 'test.json'} holds {classes} that {listed} does not list "
                f"({', '.join(map(repr, foreign[:3]))}{', ...' if len(foreign) > 3 else ''}): Food-101's classes "
                f"under other names. Give them the archive's own names, or extract {self.url} under {root} again.")
        return names

    def __call__(self, root: Path, split: str) -> ImageDataset:
        meta = self._meta(root, split)
        names = self.class_names(root)
        other = "test" if split == "train" else "train"
        _refuse_repeats(((rel, f"{self.expected(root) / 'meta' / f'{s}.json'}: {rel!r}")
                         for s, listed in ((split, meta), (other, self._meta(root, other)))
                         for images in listed.values() for rel in images),
                        f"Remove the repeats, or extract {self.url} under {root} again.")
        if sorted(meta) != names:  # labels are positions in the sorted class list: both splits must share it
            only = {f"{split}.json": sorted(set(meta) - set(names)), "test.json": sorted(set(names) - set(meta))}
            which = "; ".join(f"only {file} lists {listed[:5]}" for file, listed in only.items() if listed)
            raise DatasetMetadataError(f"{self.expected(root) / 'meta'}: train.json and test.json list other classes "
                                       f"({which}); extract {self.url} again.")
        samples = [(f"images/{rel}.jpg", label) for label, name in enumerate(names) for rel in meta[name]]
        listing = self.expected(root) / "meta" / f"{split}.json"
        _refuse_missing_images(self.expected(root), [key for key, _ in samples], listing,
                               f"Extract {self.url} under {root} again.")
        if split != "train":
            _warn_classes_without_images(self.expected(root) / "meta" / f"{split}.json",
                                         [name for name in names if not meta[name]])
        return ImageDataset(self.name, self.expected(root), split, samples, names)


def _read_idx(path: Path, ndim: int) -> tuple[np.ndarray, bytes]:
    """Read an ``ndim``-dimensional uint8 IDX file (MNIST format), gzip-compressed or not; returns the array and the
    decompressed bytes it views (to verify them without reading the file again)."""
    opener = gzip.open if path.suffix == ".gz" else open
    fix = "Delete it and download Fashion-MNIST again (--data.download true)."
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise CorruptImageError(f"{path} is not a complete gzip file ({err}). {fix}") from err
    if len(data) < 4 + 4 * ndim or data[:4] != bytes([0, 0, 0x08, ndim]):
        raise CorruptImageError(f"{path} is not a {ndim}-dimensional uint8 IDX file (it is {len(data)} bytes and "
                                f"does not start with that IDX header). {fix}")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != math.prod(shape):  # Python's product: numpy's wraps around int64 for a byte-swapped header
        state = "truncated" if array.size < math.prod(shape) else "longer than its header says (bytes appended)"
        raise CorruptImageError(f"{path} is {state}: header says {shape}, found {array.size} bytes. {fix}")
    return array.reshape(shape), data


class _FashionMNIST:
    name = "fashion_mnist"

    def candidates(self, root: Path) -> list[Path]:
        """Folders holding ``{train,t10k}-*-ubyte[.gz]``: torchvision's layout first, then Debian's."""
        return [root / "FashionMNIST" / "raw", root / "fashion-mnist", root, Path(FASHION_MNIST_SYSTEM_DIR)]

    def expected(self, root: Path) -> Path:
        return root / "FashionMNIST" / "raw"

    def download(self, root: Path) -> None:
        """Fetch the files into ``root`` with torchvision unless a full set is found: a folder under ``root`` holding
        some of them (an interrupted download) is completed, not passed over for the system's copy."""
        try:
            found = self._find(root)
        except DatasetNotFoundError:  # a partial set under root: torchvision fetches what is missing
            found = None
        if found is None:
            import torchvision.datasets as tvd
            tvd.FashionMNIST(str(root), train=True, download=True)

    def _find(self, root: Path) -> Optional[Path]:
        """The first candidate folder with all four files (each raw or ``.gz``). A folder under ``root`` holding only
        some of them (an interrupted download or copy) is refused, naming the missing ones, rather than passed over
        for the next candidate: that may be the system's full set, another dataset than the user's."""
        bases = [f"{p}-{kind}-ubyte" for p in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]
        for folder in self.candidates(root):
            for base in bases:  # not skipped for the next folder: that may hold other files
                for suffix in ("", ".gz"):
                    _refuse_broken_link(folder / f"{base}{suffix}")
            present = [base for base in bases if any((folder / f"{base}{suffix}").is_file() for suffix in ("", ".gz"))]
            if len(present) == len(bases):
                return folder
            if present and folder != Path(FASHION_MNIST_SYSTEM_DIR):
                missing = [base for base in bases if base not in present]
                raise DatasetNotFoundError(
                    f"dataset '{self.name}': {folder} holds {len(present)} of Fashion-MNIST's 4 files; missing: "
                    f"{', '.join(missing)} (raw or .gz). Complete them (download=True, --data.download true, "
                    f"fetches them with torchvision), or remove the folder to read another copy")
        return None

    def _read(self, folder: Path, prefix: str, kind: str, ndim: int) -> np.ndarray:
        """One IDX file of ``folder`` (raw, else ``.gz``), refused when it is not Fashion-MNIST's: images other than
        28x28, the other split's official file, more items than the official file, or a full-size file (all 60,000 or
        10,000 items) whose content is not the official file's."""
        path = folder / f"{prefix}-{kind}-ubyte"
        path = path if path.is_file() else path.with_name(f"{path.name}.gz")
        array, data = _read_idx(path, ndim)
        get = (f"Put Fashion-MNIST's own files there: download=True (--data.download true) fetches them with "
               f"torchvision, `apt-get install dataset-fashion-mnist` puts them under {FASHION_MNIST_SYSTEM_DIR}, "
               f"or get them from {FASHION_MNIST_URL}.")
        if ndim == 3 and array.shape[1:] != FASHION_MNIST_IMAGE_SHAPE:
            raise DatasetMetadataError(f"{path} holds {array.shape[1]}x{array.shape[2]} images, but Fashion-MNIST's "
                                       "are 28x28: these are another dataset's files under Fashion-MNIST's names. "
                                       f"{get}")
        other = "t10k" if prefix == "train" else "train"
        digest = hashlib.sha256(data).hexdigest()
        if digest == FASHION_MNIST_SHA256[f"{other}-{kind}"]:
            raise DatasetMetadataError(f"{path} is Fashion-MNIST's {other}-{kind} file under the {prefix} name: the "
                                       f"{'train' if prefix == 'train' else 'test'} split would read the other "
                                       f"split's images (train and test swapped, or the same). {get}")
        if len(array) > FASHION_MNIST_SIZES[prefix]:
            raise DatasetMetadataError(f"{path} holds {len(array)} items, more than Fashion-MNIST's {prefix}-{kind} "
                                       f"file ({FASHION_MNIST_SIZES[prefix]}): it is another file under that name "
                                       f"(the other split's, or another dataset's). {get}")
        if len(array) == FASHION_MNIST_SIZES[prefix] and digest != FASHION_MNIST_SHA256[f"{prefix}-{kind}"]:
            raise DatasetMetadataError(f"{path} is not Fashion-MNIST's {prefix}-{kind} file (its content differs from "
                                       f"the official file's; MNIST and KMNIST use the same file names). {get}")
        return array

    def _refuse_same_as_other_split(self, folder: Path, prefix: str, images: np.ndarray) -> None:
        """Refuse a subset whose test images are mostly train images (a copy of the train file, part of it, or it
        shuffled): the model would be tested on what it trained on. A few shared images are warned of."""
        other = "t10k" if prefix == "train" else "train"
        path = folder / f"{other}-images-idx3-ubyte"
        path = path if path.is_file() else path.with_name(f"{path.name}.gz")
        if not path.is_file():
            return
        train, test = (images, _read_idx(path, 3)[0]) if prefix == "train" else (_read_idx(path, 3)[0], images)
        seen = {hash(image.tobytes()) for image in train}
        shared = sum(hash(image.tobytes()) in seen for image in test)
        if not shared:
            return
        message = (f"{folder}: {shared} of the {len(test)} t10k (test) images are also train images, so the model "
                   "would be tested on images it trained on")
        if 2 * shared >= len(test):
            raise DatasetMetadataError(f"{message}: put held-out images in the t10k files (or use Fashion-MNIST's own "
                                       "files: download=True, --data.download true)")
        if 100 * shared > len(test):  # the official files share a few duplicates
            warn_user(f"{message}; remove them from one of the two files")

    def _refuse_copy_elsewhere(self, root: Path) -> None:
        """Refuse to read the system's copy when ``root`` holds Fashion-MNIST's files one or two folders down where
        they are not read (``root=.../FashionMNIST``, its ``raw/`` below): the user's own files, maybe a subset or
        another version, would silently give way to the system's."""
        name = "train-images-idx3-ubyte"
        top = _subfolders(root)
        below = [*top, *(inner for entry in top for inner in _subfolders(entry))]
        found = next((folder for folder in below if folder not in self.candidates(root)
                      and not _IDX_NAMESAKES & set(folder.relative_to(root).parts)
                      and any((folder / f"{name}{suffix}").is_file() for suffix in ("", ".gz"))), None)
        if found is None:
            return
        meant = found.parent.parent if (found.name, found.parent.name) == ("raw", "FashionMNIST") else found
        raise DatasetNotFoundError(
            f"dataset '{self.name}': {root} holds Fashion-MNIST files in {found}, where they are not read (it reads "
            f"{self.expected(root)}, {root / 'fashion-mnist'} or {root} itself), and would read the system's copy "
            f"under {FASHION_MNIST_SYSTEM_DIR} instead: did you mean --data.root {meant}?")

    def class_names(self, root: Path) -> list[str]:
        return list(FASHION_MNIST_CLASSES)

    def __call__(self, root: Path, split: str) -> ImageDataset:
        folder = self._find(root)
        if folder is None:
            raise _not_found(self.name, self.expected(root) / "train-images-idx3-ubyte",
                             "Pass download=True (--data.download true) to fetch it with torchvision, or "
                             f"`apt-get install dataset-fashion-mnist` (files under {FASHION_MNIST_SYSTEM_DIR}).",
                             root=root)
        if folder == Path(FASHION_MNIST_SYSTEM_DIR) and root.exists():
            self._refuse_copy_elsewhere(root)
        if folder == Path(FASHION_MNIST_SYSTEM_DIR) and not root.exists():
            warn_user(f"dataset '{self.name}': {root} does not exist, so the system's copy under "
                      f"{FASHION_MNIST_SYSTEM_DIR} is read (a mistyped --data.root?). Put Fashion-MNIST's files under "
                      f"{self.expected(root)} to read another copy")
        prefix = "train" if split == "train" else "t10k"
        images = self._read(folder, prefix, "images-idx3", ndim=3)
        if len(images) < FASHION_MNIST_SIZES[prefix]:  # a subset, which no digest verifies
            self._refuse_same_as_other_split(folder, prefix, images)
        labels = self._read(folder, prefix, "labels-idx1", ndim=1)
        if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise CorruptImageError(f"{folder}: {prefix} label {labels.max()} is not a Fashion-MNIST class "
                                    "(0..9); download the dataset again (--data.download true)")
        if len(images) != len(labels):
            raise CorruptImageError(f"{folder}: {len(images)} {prefix} images but {len(labels)} labels")
        return ArrayImageDataset(self.name, folder, split, images, labels.tolist(), self.class_names(root))


class _Digits:
    name = "digits"

    def class_names(self, root: Path) -> list[str]:
        return [str(d) for d in range(10)]

    def __call__(self, root: Path, split: str) -> ImageDataset:
        from sklearn.datasets import load_digits  # bundled with scikit-learn: no root, no download

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 ink levels -> 0..255
        sl = slice(0, DIGITS_TRAIN_SIZE) if split == "train" else slice(DIGITS_TRAIN_SIZE, None)
        return ArrayImageDataset(self.name, Path("sklearn-digits"), split, images[sl],
                                 digits.target[sl].tolist(), self.class_names(root))


class _ImageFolder:
    """User data: ``root/train/<class>/*.jpg`` and ``root/test/...`` (or ``root/val/...``)."""

    name = "imagefolder"

    def expected(self, root: Path) -> Path:
        return root / "train"

    def class_names(self, root: Path) -> list[str]:
        train = self.expected(root)
        _refuse_broken_link(train)
        names = _class_folders(train) if train.is_dir() else []
        if not names:
            raise _not_found(self.name, train / "<class>" / "<image>.jpg",
                             f"Put one folder per class under {train} and the held-out images under "
                             f"{root / 'test'} (or {root / 'val'}).", root=root)
        return names

    def __call__(self, root: Path, split: str) -> ImageDataset:
        names = self.class_names(root)
        for name in ("test", "val"):  # a broken link must not pass for a missing folder (and let "val" stand in)
            _refuse_broken_link(root / name)
        held_out = next((root / s for s in ("test", "val") if (root / s).is_dir()), root / "test")
        folder = root / "train" if split == "train" else held_out
        if split != "train":
            if not folder.is_dir():
                raise _not_found(self.name, folder, f"Put the held-out images under {root / 'test'}/<class>/ "
                                 f"(or {root / 'val'}/<class>/), with the class folders of {root / 'train'}.",
                                 root=root)
            extra = [name for name in _class_folders(folder) if name not in names]
            if extra:
                _refuse_unknown_held_out_classes(folder, root / "train", extra, names)
        if split == "train" and (root / "test").is_dir() and (root / "val").is_dir():  # once for a fit's builds
            _warn_val_not_read(root)
        # each class folder's sub-folders too, as torchvision's ImageFolder reads them; every folder is walked once.
        # Both splits, to refuse a file that a link (symbolic or hard) brings into a second class or split. Stat only:
        # byte-identical copies are looked for where the k-shot split is drawn, among the drawn images' size-mates.
        listed = {split_folder: {name: _visible_files(split_folder / _fs_name(name)) for name in names
                                 if (split_folder / _fs_name(name)).is_dir()}
                  for split_folder in (root / "train", held_out) if split_folder.is_dir()}
        images = [(split_folder, name, fname, identity) for split_folder, classes in listed.items()
                  for name, files in classes.items() for fname, identity in files.items() if _reads_nested(fname)]
        _refuse_repeats(((identity, f"{split_dir}/{name}/{fname}") for split_dir, name, fname, identity in images),
                        "Remove the symbolic link or hard link that reaches it a second time.")
        class_files = listed[folder]
        samples = [(f"{folder.name}/{name}/{fname}", label) for label, name in enumerate(names)
                   for fname in class_files.get(name, []) if _reads_nested(fname)]
        empty = sorted(set(names) - {names[label] for _, label in samples})
        unread = _unread_images(folder, class_files)
        # Nothing read at all, or a training class left with none of its images: refused, not trained without
        _report_unread_images(folder, unread, not samples or (split == "train" and
                                                              any(f.split("/", 1)[0] in empty for f in unread)))
        if split != "train" and samples:
            _warn_classes_without_images(folder, empty)
        if split != "train":
            return ImageDataset(self.name, root, split, samples, names)
        sizes = {f"{split_dir.name}/{name}/{fname}": identity.size for split_dir, name, fname, identity in images}
        own = {key for key, _ in samples}
        return ImageDataset(self.name, root, split, samples, names,
                            sizes={key: size for key, size in sizes.items() if key in own},
                            other_split_sizes={key: size for key, size in sizes.items() if key not in own})


def _write_text_atomic(path: Path, text: str, missing_ok: bool = False) -> bool:
    """Write ``text`` as UTF-8 (keys of non-UTF-8 file names as their bytes) via a temporary file and rename, so
    concurrent processes never see half a file."""
    try:
        write_text_atomic(path, text)
        return True
    except OSError:
        if not missing_ok:
            raise
        return False  # a read-only dataset folder: the split is still deterministic, just not cached


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetSpec:
    """A dataset name: its class count (known without touching disk, None for ``imagefolder``) and reader."""

    name: str
    num_classes: Optional[int]
    reader: Any
    downloadable: bool
    description: str


DATASETS: dict[str, DatasetSpec] = {s.name: s for s in [
    DatasetSpec("cifar10", 10, _CIFAR("cifar10", "cifar-10-batches-py",
                                      "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "CIFAR10"),
                True, "CIFAR-10, official 50,000/10,000 split (torchvision)"),
    DatasetSpec("cifar100", 100, _CIFAR("cifar100", "cifar-100-python",
                                        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "CIFAR100"),
                True, "CIFAR-100 fine labels, official 50,000/10,000 split (torchvision)"),
    DatasetSpec("cub200", CUB_CLASSES, _CUB(), False, "CUB-200-2011, official 5,994/5,794 split"),
    DatasetSpec("caltech101", len(CALTECH101_CLASSES), _Caltech101(), True,
                "Caltech-101 without BACKGROUND_Google; every 5th image per class is test"),
    DatasetSpec("food101", FOOD101_CLASSES, _Food101(), True, "Food-101, official 750/250 per class"),
    DatasetSpec("fashion_mnist", 10, _FashionMNIST(), True, "Fashion-MNIST, official 60,000/10,000 split"),
    DatasetSpec("digits", 10, _Digits(), False, "scikit-learn's 8x8 digits, first 898 train, last 899 test"),
    DatasetSpec("imagefolder", None, _ImageFolder(), False, "root/train/<class>/ and root/test|val/<class>/"),
]}


def available_datasets() -> list[str]:
    """Names accepted by :func:`build_dataset` and ``FewShotDataModule(dataset=...)``."""
    return list(DATASETS)


def dataset_key(name: str) -> str:
    """A dataset name as the registry looks it up: ``Fashion-MNIST`` and ``fashion_mnist`` are one dataset, and are
    recorded and named (manifests, results) as one."""
    return name.lower().replace("-", "_")


def _spec(name: str) -> DatasetSpec:
    """The spec of dataset ``name`` (any case, ``-`` or ``_``)."""
    if not isinstance(name, str):
        raise ValueError(f"dataset must be a name, one of {', '.join(DATASETS)}; got {shown(name)}")
    key = dataset_key(name)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset '{name}'; valid names: {', '.join(DATASETS)}")
    return DATASETS[key]


def expand_root(root: str | os.PathLike) -> str:
    """``root`` with a leading ``~`` expanded to the home folder (as a shell would), so that every entry point reads
    the same folder; a URL (``s3://...``) is left as it is."""
    text = check_path(root, "the dataset root")  # None or 5 failed deep inside os.fspath
    return text if "://" in text else os.path.expanduser(text)


UNREADABLE_SHOWN = 3  # unreadable images an error names


def unreadable_named(paths: Sequence[Path]) -> str:
    """The first unreadable images of ``paths`` with why each cannot be read, for an error message."""
    named = "; ".join(f"{path} is {unreadable_reason(path) or 'unreadable'}" for path in paths[:UNREADABLE_SHOWN])
    return named + ("; ..." if len(paths) > UNREADABLE_SHOWN else "")


def unreadable_reason(path: Path) -> Optional[str]:
    """Why ``path`` cannot be an image (missing, empty, no regular file, not readable, no image at all, a JPEG or
    PNG cut short), or None: a ``stat``, an ``access`` and the first and last bytes of a regular file, cheap enough
    for a whole split (a named pipe, which would block, is never opened)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "missing"
    except OSError as err:
        return f"cannot be looked at ({err.strerror or err})"
    if not S_ISREG(info.st_mode):
        return "not a regular file (a named pipe, socket, device or folder)"
    if not info.st_size:
        return "empty (0 bytes: an interrupted copy?)"
    if not os.access(path, os.R_OK):
        return "not readable by this user"
    return _content_reason(path, info.st_size)


_JPEG_START = b"\xff\xd8\xff"
# How the formats of IMG_EXTENSIONS (and GIF, named when read) begin: a file that begins otherwise is identified by PIL
_IMAGE_STARTS = (_JPEG_START, b"\x89PNG", b"BM", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+", b"GIF8",
                 *(b"P" + bytes([c]) for c in b"1234567fF"))
_IMAGE_ENDS = {_JPEG_START: b"\xff\xd9", b"\x89PNG\r\n\x1a\n": b"IEND\xaeB`\x82"}  # JPEG's EOI, PNG's IEND chunk
_TAIL_BYTES = 64  # where an end marker is looked for: a few bytes of padding may follow it


def _unidentified_reason(path: Path, head: bytes) -> Optional[str]:
    """Why a file with an image's name holds no image PIL can identify (a web page a scraper saved as ``.jpg``),
    which stopped a fit mid-epoch, or after training for a test image; None otherwise. ``head``: its first 12 bytes;
    PIL's header parsers read it only where it begins as no image format of ``IMG_EXTENSIONS`` does."""
    if head.startswith(_IMAGE_STARTS) or (head.startswith(b"RIFF") and head[8:12] == b"WEBP"):
        return None
    try:
        with Image.open(path):
            return None
    except UnidentifiedImageError:
        return (f"not an image: no image format begins as it does ({head[:8]!r}...: a web page or text saved under "
                "an image's name, say)")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):  # identified: named when decoded
        return None


def _jpeg_scan_start(data: bytes) -> int:
    """The offset of a JPEG's first start-of-scan marker, found by stepping over its header segments (APP1's EXIF
    with its thumbnail among them); a value past the data where the segments do not lead to one."""
    at = 2  # past the start-of-image marker
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker == 0xDA:
            return at
        if marker == 0xFF:  # a fill byte
            at += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            at += 2
        else:
            at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return len(data)


def _content_reason(path: Path, size: int) -> Optional[str]:
    """Why a file is no image PIL identifies (``_unidentified_reason``), or why a JPEG or PNG whose end marker is
    not among its last bytes is cut short (a copy or extraction stopped mid-file, which stopped a fit mid-epoch), or
    None. Data may follow the marker (a phone's motion photo appends a video, a camera a trailer): such a file is
    read whole and passes where the marker is in it (for a JPEG, past its first scan's start: an EXIF thumbnail's end
    marker lies before); only a file without one is decoded before it is named."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            unidentified = _unidentified_reason(path, head)
            if unidentified is not None:
                return unidentified
            f.seek(max(0, size - _TAIL_BYTES))
            tail = f.read()
            end = next((end for start, end in _IMAGE_ENDS.items() if head.startswith(start)), None)
            if end is None or end in tail:
                return None
            f.seek(0)
            data = f.read()
            if data.find(end, _jpeg_scan_start(data) if head.startswith(_JPEG_START) else 0) >= 0:
                return None
    except OSError as err:
        return f"not readable ({err.strerror or err})"
    try:
        with Image.open(path) as img:
            img.load()
    except Image.DecompressionBombError:  # whole, but too large: named as such when it is read
        return None
    except (OSError, SyntaxError, ValueError):  # PIL's "image file is truncated" and its kin
        return f"cut short (its {size} bytes end before the image does: an interrupted copy or extraction?)"
    return None


def _refuse_opening_special(path: Path, where: str) -> None:
    """Refuse to open ``path`` when it is no regular file: ``Image.open`` on a named pipe waits for a writer forever.
    A missing file is left to ``open`` (its FileNotFoundError)."""
    try:
        regular = S_ISREG(os.stat(path).st_mode)
    except OSError:
        return
    if not regular:
        raise CorruptImageError(f"cannot read image {path} ({where}): it is not a regular file (a named pipe, socket, "
                                "device or folder), and opening it could wait forever. Remove it, or put the image "
                                "file there")


def local_root(root: str | os.PathLike) -> Path:
    """``root`` expanded (``expand_root``), refused when it is a URL: datasets are read from local folders, and a
    ``Path`` of ``s3://bucket`` named a folder ``s3:/bucket`` that was not found."""
    text = expand_root(root)
    if "://" in text:
        raise DatasetNotFoundError(f"the dataset root {text} is a URL, and datasets are read from a local folder (or a "
                                   "mounted one): mount it (s3fs, gcsfuse, rclone mount) or copy it to this machine, "
                                   "and pass that folder as --data.root (root=)")
    return Path(text)


def _readable_root(root: str | os.PathLike) -> Path:
    """``root`` as a local folder (``local_root``), refused when this process may not open what it holds (no search
    right): ``Path.is_dir`` of its folders then raised a bare ``[Errno 13] Permission denied``. A root it may search
    but not list (a shared 0711 folder) is read: the readers open its folders by name."""
    folder = local_root(root)
    if os.path.isdir(folder) and not os.access(folder, os.X_OK):
        raise DatasetNotFoundError(f"cannot open the dataset folder {folder} (Permission denied): make it readable "
                                   f"(chmod -R u+rX {folder}), or ask its owner to")
    return folder


def dataset_num_classes(name: str, root: str | os.PathLike = "data") -> int:
    """Number of classes, from a static table (only ``imagefolder`` reads its class folders)."""
    spec = _spec(name)
    return spec.num_classes if spec.num_classes is not None else len(spec.reader.class_names(_readable_root(root)))


def dataset_class_names(name: str, root: str | os.PathLike = "data") -> list[str]:
    """Class names, read cheaply from the dataset's metadata (no image is decoded)."""
    return _spec(name).reader.class_names(_readable_root(root))


def download_dataset(name: str, root: str | os.PathLike = "data") -> None:
    """Fetch a dataset with torchvision's own download code; a no-op for data that needs no download."""
    spec, folder = _spec(name), local_root(root)
    if spec.downloadable:
        blocking = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if blocking is not None and not blocking.is_dir():  # os.makedirs' bare FileExistsError/NotADirectoryError
            raise ValueError(f"cannot download {spec.name} into {folder}: {blocking} is a file, not a folder. Pass "
                             "--data.root (root=) a folder, or move the file away")
        with _download_lock(spec.name, folder):
            _download(spec, folder)


@contextmanager
def _download_lock(name: str, folder: Path) -> Iterator[None]:
    """Hold ``<folder>/.<name>.download.lock`` while dataset ``name`` is fetched there: the fits of a protocol row or
    a tuning study each download it at their start, and torchvision writes its archive straight to its final name,
    so a second download truncated the archive the first was checking ("File not found or corrupted"). A later one
    waits, then finds the data there. Where no lock file can be made (a read-only shared copy), none is held. A root
    this made that holds nothing else afterwards (no download was needed: Fashion-MNIST's system copy, or it failed)
    goes again, so a mistyped root is still told as one."""
    made = [path for path in (folder, *folder.parents) if not path.exists()]
    path = folder / f".{name}.download.lock"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = try_lock(path)
        if lock is None:
            print(f"nola_vision: another process is downloading {name} into {folder}: waiting for it", flush=True)
            lock = try_lock(path, wait=True)
    except OSError:
        lock = None
    try:
        yield
    finally:
        if lock is not None:
            os.close(lock)
        if made and [entry.name for entry in folder.iterdir()] == [path.name]:
            with suppress(OSError):
                path.unlink()
                for created in made:  # innermost first; one another process wrote into stays
                    created.rmdir()


def _download(spec: DatasetSpec, folder: Path) -> None:
    """``spec.reader.download(folder)``, its failures (no network, a proxy, a full disk, an archive cut short) named
    with the dataset, where it comes from and how to do without a download; folders it made and left empty go."""
    nested = _extracted_into_its_name(spec.reader.expected(folder), folder)
    if nested:  # a download would fetch the whole archive again beside the copy one folder down
        raise DatasetNotFoundError(f"dataset '{spec.name}' is not downloaded into {folder}: it is there already"
                                   f"{nested}")
    before = {path for path in folder.iterdir()} if folder.is_dir() else set()
    try:
        spec.reader.download(folder)
    except (OSError, RuntimeError) as error:
        for path in set(folder.iterdir()) - before if folder.is_dir() else ():
            _remove_empty_folders(path)
        source = getattr(spec.reader, "url", "torchvision's mirrors")
        raise DatasetNotFoundError(
            f"cannot download dataset '{spec.name}' from {source} into {folder} ({type(error).__name__}: "
            f"{str(error).rstrip('.')}). Without a network here: download it on a machine with one and copy it under "
            f"{folder} (it is read at {spec.reader.expected(folder)}), then pass download=False "
            "(--data.download false)") from error


def _remove_empty_folders(path: Path) -> None:
    """Remove ``path`` and the folders under it if they hold no file."""
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            _remove_empty_folders(child)
        with suppress(OSError):
            path.rmdir()


def _check_class_count(spec: DatasetSpec, dataset: ImageDataset) -> None:
    """Refuse a class count other than the dataset's: fewer is an incomplete extraction; more (which each reader
    refuses first, naming the extra classes) needs them removed."""
    if spec.num_classes is None or dataset.num_classes == spec.num_classes:
        return
    where = f"dataset '{spec.name}' under {dataset.root} has {dataset.num_classes} classes, expected {spec.num_classes}"
    if dataset.num_classes < spec.num_classes:
        raise DatasetNotFoundError(f"{where}: the extraction looks incomplete; extract the full archive again.")
    raise DatasetMetadataError(f"{where}: remove the classes that are not {spec.name}'s.")


def build_dataset(name: str, root: str | os.PathLike = "data", split: str = "train", download: bool = False,
                  transform: Optional[Callable] = None) -> ImageDataset:
    """Read split ``"train"`` or ``"test"`` of dataset ``name`` under ``root``.

    ``download=True`` runs torchvision's downloader where one exists; otherwise missing files raise a
    :class:`DatasetNotFoundError` that says where they must be and where to get them.
    """
    spec = _spec(name)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    check_callable(transform, "build_dataset: transform")
    root = _readable_root(root)
    if check_bool(download, "download"):  # a string such as "no" would count as true
        download_dataset(spec.name, root)
    dataset = spec.reader(root, split)
    _check_class_count(spec, dataset)
    if not len(dataset):
        raise DatasetNotFoundError(f"dataset '{spec.name}' has no {split} images under {dataset.root}")
    dataset.transform = transform
    return dataset
