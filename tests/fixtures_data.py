"""Writers of tiny datasets in each dataset's real on-disk format (used at test time, into tmp_path).

No binary data is committed: every fixture is generated here, byte for byte in the official layout,
and read back through the same code users run.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _jpeg(path: Path, color: tuple[int, int, int] | int, mode: str = "RGB", size: tuple[int, int] = (12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format="JPEG", quality=95)


def class_color(label: int) -> tuple[int, int, int]:
    """A distinct, JPEG-stable flat colour per class, so tests can check labels from pixels."""
    return (20 + (label * 37) % 200, 20 + (label * 71) % 200, 20 + (label * 113) % 200)


# ---------------------------------------------------------------- CIFAR (python pickle batches)

def _cifar_images(labels: list[int], offset: int) -> np.ndarray:
    """Rows of 3072 bytes, channel-planar (1024 R, 1024 G, 1024 B) as in the official pickles."""
    n = len(labels)
    data = np.empty((n, 3, 32, 32), dtype=np.uint8)
    for i, y in enumerate(labels):
        data[i, 0], data[i, 1], data[i, 2] = y, 100 + (offset + i) % 100, 250  # R = label, B = 250
    return data.reshape(n, 3072)


def write_cifar10(root: Path, train_per_class: int = 6, test_per_class: int = 2) -> dict:
    """Write ``root/cifar-10-batches-py`` (data_batch_1..5, test_batch, batches.meta); return md5s and labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    train = [y for _ in range(train_per_class) for y in range(10)]
    test = [y for _ in range(test_per_class) for y in range(10)]
    chunks = np.array_split(np.arange(len(train)), 5)
    for b, chunk in enumerate(chunks, 1):
        labels = [train[i] for i in chunk]
        entry = {"batch_label": f"training batch {b} of 5", "labels": labels,
                 "data": _cifar_images(labels, int(chunk[0]) if len(chunk) else 0),
                 "filenames": [f"img_{i}.png" for i in chunk]}
        (folder / f"data_batch_{b}").write_bytes(pickle.dumps(entry, protocol=2))
    entry = {"batch_label": "testing batch 1 of 1", "labels": test, "data": _cifar_images(test, 0),
             "filenames": [f"test_{i}.png" for i in range(len(test))]}
    (folder / "test_batch").write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"num_cases_per_batch": 10000, "label_names": names, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    md5 = {p.name: _md5(p) for p in folder.iterdir()}
    return {"md5": md5, "train_labels": train, "test_labels": test, "class_names": names}


def write_cifar100(root: Path, train_per_class: int = 2, test_per_class: int = 1) -> dict:
    """Write ``root/cifar-100-python`` (train, test, meta with fine and coarse label names)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    fine = [f"fine_{i:02d}" for i in range(100)]
    for split, per in (("train", train_per_class), ("test", test_per_class)):
        labels = [y for _ in range(per) for y in range(100)]
        entry = {"filenames": [f"{split}_{i}.png" for i in range(len(labels))], "batch_label": split,
                 "fine_labels": labels, "coarse_labels": [y // 5 for y in labels], "data": _cifar_images(labels, 0)}
        (folder / split).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"fine_label_names": fine, "coarse_label_names": [f"coarse_{i:02d}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return {"md5": {p.name: _md5(p) for p in folder.iterdir()}, "class_names": fine}


def cifar_class_with_checksums(tv_class: type, md5: dict[str, str]) -> type:
    """A subclass of torchvision's CIFAR class whose checksum table lists the fixture's files.

    torchvision's own ``check_integrity`` still runs on every file (a flipped byte fails); only the
    expected digests are the fixture's instead of the official archive's.
    """
    return type(f"Fixture{tv_class.__name__}", (tv_class,), {
        "train_list": [[name, md5[name]] for name, _ in tv_class.train_list],
        "test_list": [[name, md5[name]] for name, _ in tv_class.test_list],
        "meta": {**tv_class.meta, "md5": md5[tv_class.meta["filename"]]},
    })


# ---------------------------------------------------------------- CUB-200-2011

def write_cub(root: Path, num_classes: int = 200, train_per_class: int = 3, test_per_class: int = 2) -> dict:
    """Write ``root/CUB_200_2011`` with its text files (1-based ids and labels) and ``images/``."""
    folder = root / "CUB_200_2011"
    classes, images, labels, split = [], [], [], []
    img_id = 0
    for c in range(num_classes):
        cname = f"{c + 1:03d}.Bird_{c + 1:03d}"
        classes.append(f"{c + 1} {cname}")
        # train/test interleaved as in the real file (1 0 1 0 1 ...), not grouped by split
        flags, t, s = [], train_per_class, test_per_class
        while t or s:
            flags += [1] * bool(t) + [0] * bool(s)
            t, s = max(t - 1, 0), max(s - 1, 0)
        for j, flag in enumerate(flags):
            img_id += 1
            rel = f"{cname}/Bird_{c + 1:03d}_{j:04d}_{img_id}.jpg"
            _jpeg(folder / "images" / rel, class_color(c))
            images.append(f"{img_id} {rel}")
            labels.append(f"{img_id} {c + 1}")
            split.append(f"{img_id} {flag}")
    for name, lines in (("classes.txt", classes), ("images.txt", images),
                        ("image_class_labels.txt", labels), ("train_test_split.txt", split)):
        (folder / name).write_text("\n".join(lines) + "\n")
    n_train = sum(line.endswith(" 1") for line in split)
    return {"folder": folder, "n_train": n_train, "n_test": len(split) - n_train}


# ---------------------------------------------------------------- Caltech-101

def write_caltech101(root: Path, num_classes: int = 101, per_class: int = 6) -> dict:
    """Write ``root/caltech101/101_ObjectCategories/<class>/image_0001.jpg`` incl. BACKGROUND_Google.

    The full set (101 classes) has the archive's own folder names; fewer have stand-ins (``cat_000``, ...) and
    ``Faces_easy``. The first image of ``Faces_easy`` is a grayscale (mode "L") JPEG, as some real ones are.
    """
    from nola_vision.data.datasets import CALTECH101_CLASSES

    cats = root / "caltech101" / "101_ObjectCategories"
    names = sorted(CALTECH101_CLASSES) if num_classes == len(CALTECH101_CLASSES) else \
        sorted([f"cat_{c:03d}" for c in range(num_classes - 1)] + ["Faces_easy"])
    for label, name in enumerate(names):
        for j in range(1, per_class + 1):
            if name == "Faces_easy" and j == 1:
                _jpeg(cats / name / f"image_{j:04d}.jpg", 128, mode="L")
            else:
                _jpeg(cats / name / f"image_{j:04d}.jpg", class_color(label))
    for j in range(1, 4):
        _jpeg(cats / "BACKGROUND_Google" / f"image_{j:04d}.jpg", (0, 0, 0))
    return {"folder": root / "caltech101", "class_names": names}


# ---------------------------------------------------------------- Food-101

def write_food101(root: Path, num_classes: int = 101, train_per_class: int = 3, test_per_class: int = 1) -> dict:
    """Write ``root/food-101/meta/{train,test}.json, classes.txt`` and ``images/<class>/<id>.jpg``."""
    folder = root / "food-101"
    names = [f"food_{c:03d}" for c in range(num_classes)]
    meta = {"train": {}, "test": {}}
    n = 0
    for label, name in enumerate(names):
        for split, per in (("train", train_per_class), ("test", test_per_class)):
            for _ in range(per):
                n += 1
                meta[split].setdefault(name, []).append(f"{name}/{100000 + n}")
                _jpeg(folder / "images" / name / f"{100000 + n}.jpg", class_color(label))
    (folder / "meta").mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        # the real json does not list classes in sorted order; readers must sort the keys
        (folder / "meta" / f"{split}.json").write_text(json.dumps(dict(reversed(meta[split].items()))))
    (folder / "meta" / "classes.txt").write_text("\n".join(names) + "\n")
    return {"folder": folder, "class_names": names}


# ---------------------------------------------------------------- Fashion-MNIST (IDX)

def _idx(array: np.ndarray) -> bytes:
    return struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_fashion_mnist(folder: Path, n_train: int = 40, n_test: int = 20, gz: bool = True) -> dict:
    """Write ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``: pixel (0, 0) of image i is i % 256; pixel (27, 27)
    is white in the t10k images only."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n) % 256
        images[:, 10:18, 10:18] = (labels * 20 + 30)[:, None, None]
        images[:, 27, 27] = 255 if prefix == "t10k" else 0  # held-out images differ from every train image
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            data = _idx(arr)
            path = folder / f"{prefix}-{kind}-ubyte{'.gz' if gz else ''}"
            path.write_bytes(gzip.compress(data) if gz else data)
        out[prefix] = labels.tolist()
    return out


# ---------------------------------------------------------------- ImageFolder

def write_imagefolder(root: Path, classes: tuple[str, ...] = ("cat", "dog", "owl"), train_per_class: int = 4,
                      eval_per_class: int = 2, eval_folder: str = "val") -> dict:
    """Write ``root/train/<class>/*.png`` and ``root/<eval_folder>/<class>/*.png``, flat colour per class; each file
    its own bytes (a text chunk naming it), so that no image is a copy of another in another class or split."""
    for split, per in (("train", train_per_class), (eval_folder, eval_per_class)):
        for label, name in enumerate(classes):
            for j in range(per):
                path = root / split / name / f"{name} {j:02d}.png"  # a space in the name, on purpose
                path.parent.mkdir(parents=True, exist_ok=True)
                info = PngImagePlugin.PngInfo()
                info.add_text("fixture", f"{split}/{name}/{j}")
                Image.new("RGB", (20, 16), class_color(label)).save(path, pnginfo=info)
    return {"class_names": list(classes)}
