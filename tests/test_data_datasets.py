"""Every dataset reads its official on-disk layout (written by tests/fixtures_data.py) with the right
classes, counts and labels; bad input fails with an error that names the fix."""

from __future__ import annotations

import os
import re
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets as tvd
from fixtures_data import (
    cifar_class_with_checksums,
    class_color,
    write_caltech101,
    write_cifar10,
    write_cifar100,
    write_cub,
    write_fashion_mnist,
    write_food101,
    write_imagefolder,
)
from PIL import Image

from nola_vision.data import (
    DATASETS,
    CorruptImageError,
    DatasetNotFoundError,
    available_datasets,
    build_dataset,
    dataset_class_names,
    dataset_num_classes,
    download_dataset,
)
from nola_vision.data.datasets import CALTECH101_CLASSES, FASHION_MNIST_SYSTEM_DIR, DatasetMetadataError

ALL = ["cifar10", "cifar100", "cub200", "caltech101", "food101", "fashion_mnist", "digits", "imagefolder"]


def _close(a, b, tol=6):  # JPEG keeps flat colours within a few levels
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b))


@pytest.fixture
def cifar_fixture_checksums(monkeypatch):
    """Register the fixture's MD5s the way torchvision registers the official ones.

    We do not bypass torchvision's integrity check: we hand torchvision a subclass of its own CIFAR class
    whose checksum table lists the fixture files, so the very code path users run (``check_integrity``
    on every pickle, then unpickling, then the HWC transpose) runs on real-format files. That the
    official table rejects foreign files is tested separately below.
    """
    def install(name: str, md5: dict[str, str]) -> None:
        reader = DATASETS[name].reader
        monkeypatch.setattr(reader, "torchvision_class",
                            cifar_class_with_checksums(getattr(tvd, reader.torchvision_name), md5))
    return install


def test_registry_lists_every_dataset_name():
    assert available_datasets() == ALL
    assert set(DATASETS) == set(ALL)


def test_num_classes_is_known_without_any_files(tmp_path):
    expected = {"cifar10": 10, "cifar100": 100, "cub200": 200, "caltech101": 101, "food101": 101,
                "fashion_mnist": 10, "digits": 10}
    assert {n: dataset_num_classes(n, tmp_path / "nothing") for n in expected} == expected


def test_unknown_dataset_error_lists_valid_names():
    with pytest.raises(ValueError) as err:
        build_dataset("imagenet", "data")
    assert "unknown dataset 'imagenet'" in str(err.value)
    for name in ALL:
        assert name in str(err.value)


@pytest.mark.parametrize("call", [lambda: build_dataset(None), lambda: dataset_num_classes(3),
                                  lambda: dataset_class_names(["digits"])])
def test_a_dataset_name_that_is_not_a_string_is_refused_listing_the_valid_names(call):
    # None or 3 gave a bare AttributeError: 'NoneType' object has no attribute 'lower'
    with pytest.raises(ValueError, match=r"dataset must be a name, one of cifar10, .*digits.*; got") as err:
        call()
    assert all(name in str(err.value) for name in ALL)


@pytest.mark.parametrize("download", ["no", "false", 0, None])
def test_download_must_be_true_or_false_not_a_string_that_counts_as_true(tmp_path, monkeypatch, download):
    # download="no" is truthy: it ran torchvision's downloader
    fetched = []
    monkeypatch.setattr(DATASETS["cifar10"].reader, "download", fetched.append)
    with pytest.raises(ValueError, match=r"download must be true or false, got"):
        build_dataset("cifar10", tmp_path, download=download)
    assert not fetched


def test_cifar10_reads_official_pickles_through_torchvision(tmp_path, cifar_fixture_checksums):
    info = write_cifar10(tmp_path)
    cifar_fixture_checksums("cifar10", info["md5"])
    train, test = build_dataset("cifar10", tmp_path, "train"), build_dataset("cifar10", tmp_path, "test")
    assert train.class_names == info["class_names"] and train.num_classes == 10
    assert (len(train), len(test)) == (60, 20)
    assert train.targets == info["train_labels"] and test.targets == info["test_labels"]
    assert train.samples[7] == ("train/00007", info["train_labels"][7])
    img = train.load_image(13)
    assert img.mode == "RGB" and img.size == (32, 32)
    # channel-planar rows became HWC pixels: (R, G, B) = (label, 100 + i, 250)
    assert img.getpixel((5, 9)) == (info["train_labels"][13], 113, 250)
    assert dataset_class_names("cifar10", tmp_path) == info["class_names"]


def test_cifar_official_checksums_reject_files_that_are_not_the_official_ones(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="MD5") as err:
        build_dataset("cifar10", tmp_path)
    assert str(tmp_path / "cifar-10-batches-py") in str(err.value) and "download=True" in str(err.value)


def test_cifar_fixture_checksum_still_catches_a_flipped_byte(tmp_path, cifar_fixture_checksums):
    info = write_cifar10(tmp_path)
    cifar_fixture_checksums("cifar10", info["md5"])
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetNotFoundError, match="MD5"):
        build_dataset("cifar10", tmp_path)


class _WritesMarker:
    """A pickle payload that creates a file when unpickled: what a crafted batches.meta could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _craft_cifar10_meta(root: Path, marker: Path) -> tuple[Path, dict]:
    import pickle

    info = write_cifar10(root)
    meta = root / "cifar-10-batches-py" / "batches.meta"
    meta.write_bytes(pickle.dumps({"label_names": _WritesMarker(marker)}, protocol=2))
    return meta, info


def test_crafted_cifar_metadata_is_never_unpickled(tmp_path):
    from nola_vision.data import FewShotDataModule

    marker = tmp_path / "pwned"
    meta, _ = _craft_cifar10_meta(tmp_path / "data", marker)
    with pytest.raises(DatasetNotFoundError, match="MD5") as err:
        FewShotDataModule("cifar10", root=str(tmp_path / "data")).class_names
    assert str(meta) in str(err.value) and "download" in str(err.value)
    assert not marker.exists()


def test_cifar_metadata_with_a_matching_checksum_still_loads_no_code(tmp_path, cifar_fixture_checksums):
    import hashlib

    marker = tmp_path / "pwned"
    meta, info = _craft_cifar10_meta(tmp_path, marker)
    cifar_fixture_checksums("cifar10", {**info["md5"], "batches.meta": hashlib.md5(meta.read_bytes()).hexdigest()})
    with pytest.raises(DatasetNotFoundError, match=r"refusing to load _?io\.open") as err:  # _io on Python 3.13
        dataset_class_names("cifar10", tmp_path)
    assert str(meta) in str(err.value)
    assert not marker.exists()


def test_cifar100_uses_fine_labels_and_names(tmp_path, cifar_fixture_checksums):
    info = write_cifar100(tmp_path)
    cifar_fixture_checksums("cifar100", info["md5"])
    train = build_dataset("cifar100", tmp_path, "train")
    assert train.class_names == info["class_names"] and len(train) == 200
    assert train.targets[:3] == [0, 1, 2] and max(train.targets) == 99
    assert dataset_class_names("cifar100", tmp_path) == info["class_names"]


def test_cub_reads_official_split_with_one_based_labels(tmp_path):
    info = write_cub(tmp_path, train_per_class=3, test_per_class=2)
    train, test = build_dataset("cub200", tmp_path, "train"), build_dataset("cub200", tmp_path, "test")
    assert (len(train), len(test)) == (info["n_train"], info["n_test"]) == (600, 400)
    assert train.num_classes == 200 and train.class_names[0] == "Bird_001" and train.class_names[-1] == "Bird_200"
    assert train.targets[:3] == [0, 0, 0] and test.targets[-1] == 199
    key, label = train.samples[5]
    assert key.startswith("images/002.Bird_002/") and label == 1
    assert _close(train.load_image(5).getpixel((3, 3)), class_color(1))
    # root may also be the CUB_200_2011 folder itself
    assert len(build_dataset("cub200", info["folder"], "train")) == 600


def test_caltech101_drops_background_converts_grayscale_and_splits_every_fifth_image(tmp_path):
    info = write_caltech101(tmp_path, per_class=6)
    train, test = build_dataset("caltech101", tmp_path, "train"), build_dataset("caltech101", tmp_path, "test")
    assert train.num_classes == 101 and "BACKGROUND_Google" not in train.class_names
    assert train.class_names == info["class_names"]
    assert (len(train), len(test)) == (101 * 4, 101 * 2)  # positions 0 and 5 of six are test
    test_names = {k.rsplit("/", 1)[1] for k, _ in test.samples}
    assert test_names == {"image_0001.jpg", "image_0006.jpg"}
    faces_easy = train.class_names.index("Faces_easy")
    gray = test.load_image(test.samples.index(("101_ObjectCategories/Faces_easy/image_0001.jpg", faces_easy)))
    assert gray.mode == "RGB" and gray.getpixel((0, 0))[0] == gray.getpixel((0, 0))[2]


def test_caltech101_split_file_is_written_and_read_back(tmp_path):
    write_caltech101(tmp_path, per_class=6)
    build_dataset("caltech101", tmp_path, "train")
    split_file = tmp_path / "caltech101" / "nola_vision_split.txt"
    lines = [line for line in split_file.read_text().splitlines() if not line.startswith("#")]
    assert len(lines) == 101 * 6 and "101_ObjectCategories/Faces_easy/image_0001.jpg test" in lines
    # the file is the split: editing it moves an image
    split_file.write_text(split_file.read_text().replace("Faces_easy/image_0001.jpg test",
                                                         "Faces_easy/image_0001.jpg train"))
    assert len(build_dataset("caltech101", tmp_path, "train")) == 101 * 4 + 1


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_cub_metadata_saved_with_a_byte_order_mark_reads_as_without(tmp_path, encoding):
    # Refused at line 1 ("got '\\ufeff1 001...'") without a word about the mark an editor had added; re-saved as
    # Notepad's "Unicode" (UTF-16, CRLF), "not a text file" where Food-101's lists were read.
    info = write_cub(tmp_path, train_per_class=1, test_per_class=1)
    expected = build_dataset("cub200", tmp_path, "train").samples
    for name in ("images.txt", "classes.txt", "image_class_labels.txt", "train_test_split.txt"):
        path = info["folder"] / name
        path.write_text(path.read_text().replace("\n", "\r\n"), encoding=encoding, newline="")
    assert build_dataset("cub200", tmp_path, "train").samples == expected


@pytest.mark.parametrize("left_out", ["classes.txt", "train_test_split.txt", "image_class_labels.txt"])
def test_a_cub_extraction_without_a_metadata_file_says_so_and_where_to_get_it(tmp_path, left_out):
    info = write_cub(tmp_path, num_classes=200, train_per_class=1, test_per_class=1)
    (info["folder"] / left_out).unlink()  # a bare FileNotFoundError
    with pytest.raises(DatasetNotFoundError, match=rf"{left_out} is missing, so the extraction looks incomplete\. "
                                                   r"Extract https://\S+ \(CUB_200_2011.tgz\) under .* again"):
        build_dataset("cub200", tmp_path, "train")


def test_a_cut_short_cub_images_txt_is_refused_instead_of_scoring_half_the_test_split(tmp_path):
    info = write_cub(tmp_path, num_classes=200, train_per_class=1, test_per_class=1)
    images = info["folder"] / "images.txt"
    images.write_text("".join(images.read_text().splitlines(keepends=True)[:200]))
    with pytest.raises(DatasetMetadataError, match=r"image_class_labels.txt lists 200 image ids that images.txt does "
                                                   r"not \(e.g. \[201, 202, 203, 204, 205\]\): images.txt looks cut"):
        build_dataset("cub200", tmp_path, "test")


@pytest.mark.parametrize("cut", ["categories", "images"])
def test_an_incomplete_caltech101_extraction_writes_no_split_file_that_would_refuse_the_complete_one(tmp_path, cut):
    import shutil

    info = write_caltech101(tmp_path, per_class=2)
    cats = info["folder"] / "101_ObjectCategories"
    if cut == "categories":  # the archive's end never extracted
        for name in info["class_names"][60:]:
            shutil.rmtree(cats / name)
    else:  # the last category's folder made, its images not
        for image in (cats / "yin_yang").iterdir():
            image.unlink()
    said = r"41 of its 101 categories are missing \(e.g. .*\)" if cut == "categories" else r"category 'yin_yang' has no images"
    with pytest.raises(DatasetNotFoundError, match=said + r", so the extraction looks incomplete; extract .* again"):
        build_dataset("caltech101", tmp_path, "train")
    assert not (info["folder"] / "nola_vision_split.txt").exists()  # was written, and refused the full extraction
    write_caltech101(tmp_path, per_class=2)
    assert len(build_dataset("caltech101", tmp_path, "train")) == 101


def test_the_caltech101_image_counts_are_the_archives(monkeypatch):
    from nola_vision.data import datasets

    monkeypatch.undo()  # the conftest fixture's counts for small fixtures, through this same monkeypatch
    table = datasets.CALTECH101_IMAGES
    assert set(table) == datasets.CALTECH101_CLASSES and len(table) == 101
    assert sum(table.values()) == 8677 and (table["airplanes"], table["Motorbikes"], table["yin_yang"]) == (800, 798, 60)


def test_a_caltech101_category_cut_short_writes_no_split_file(tmp_path, monkeypatch):
    """An extraction or copy cut short inside a category trained on a subset and wrote a split file that refused the
    complete dataset extracted again: fewer images in all than the archive, some category short, is refused."""
    from nola_vision.data import datasets

    monkeypatch.setattr(datasets, "CALTECH101_IMAGES", dict.fromkeys(datasets.CALTECH101_IMAGES, 4))
    info = write_caltech101(tmp_path, per_class=4)
    images = sorted((info["folder"] / "101_ObjectCategories" / "yin_yang").iterdir())
    for image in images[1:]:
        image.unlink()
    with pytest.raises(DatasetNotFoundError, match=r"1 category holds fewer images than the archive's \('yin_yang' "
                                                   r"holds 1 of its 4\), so the extraction looks cut short; extract .* "
                                                   r"again. Nothing was written"):
        build_dataset("caltech101", tmp_path, "train")
    assert not (info["folder"] / "nola_vision_split.txt").exists()
    write_caltech101(tmp_path, per_class=4)  # extracted again: read whole, and its split file written
    assert len(build_dataset("caltech101", tmp_path, "test")) == 101
    assert (info["folder"] / "nola_vision_split.txt").exists()


def test_food101_reads_meta_json_with_sorted_classes(tmp_path):
    info = write_food101(tmp_path, train_per_class=3, test_per_class=1)
    train, test = build_dataset("food101", tmp_path, "train"), build_dataset("food101", tmp_path, "test")
    assert train.class_names == info["class_names"] and train.num_classes == 101
    assert (len(train), len(test)) == (303, 101)
    assert train.samples[3][0].startswith("images/food_001/") and train.targets[3] == 1
    assert _close(train.load_image(3).getpixel((2, 2)), class_color(1))


def test_fashion_mnist_reads_debian_style_idx_gz_files(tmp_path):
    labels = write_fashion_mnist(tmp_path / "fashion-mnist", n_train=40, n_test=20, gz=True)
    train, test = build_dataset("fashion_mnist", tmp_path, "train"), build_dataset("fashion_mnist", tmp_path, "test")
    assert (len(train), len(test)) == (40, 20) and train.targets == labels["train"]
    assert train.class_names[0] == "T-shirt/top" and train.class_names[9] == "Ankle boot"
    img = train.load_image(17)
    assert img.mode == "RGB" and img.size == (28, 28) and img.getpixel((0, 0)) == (17, 17, 17)


def test_fashion_mnist_subset_whose_test_images_are_the_train_images_is_refused(tmp_path):
    """A subset's files are not verified by digest: the train file copied under the t10k name was read as the test
    split, so the model was tested on its training images."""
    import gzip

    folder = tmp_path / "fashion-mnist"
    write_fashion_mnist(folder, n_train=40, n_test=20, gz=True)
    for kind in ("images-idx3", "labels-idx1"):
        shutil.copyfile(folder / f"train-{kind}-ubyte.gz", folder / f"t10k-{kind}-ubyte.gz")
    for split in ("train", "test"):
        with pytest.raises(DatasetMetadataError, match="40 of the 40 t10k .test. images are also train images"):
            build_dataset("fashion_mnist", tmp_path, split)
    train = gzip.decompress((folder / "train-images-idx3-ubyte.gz").read_bytes())
    header, pixels = train[:16], np.frombuffer(train[16:], np.uint8).reshape(40, 28 * 28)
    for rows, shared in ((pixels[::-1], 40), (pixels[:10], 10)):  # shuffled, and a part of them
        count = (len(rows)).to_bytes(4, "big")
        (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(header[:4] + count + header[8:] +
                                                                         rows.tobytes()))
        labels = gzip.decompress((folder / "train-labels-idx1-ubyte.gz").read_bytes())
        (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels[:4] + count + labels[8:8 + len(rows)]))
        with pytest.raises(DatasetMetadataError, match=f"{shared} of the {len(rows)} t10k"):
            build_dataset("fashion_mnist", tmp_path, "test")


def test_fashion_mnist_reads_a_folder_with_one_file_still_gzipped(tmp_path):
    # "holds 4 of Fashion-MNIST's 4 files; missing: " (nothing) when the four were not all raw or all .gz
    import gzip

    folder = tmp_path / "fashion-mnist"
    labels = write_fashion_mnist(folder, n_train=40, n_test=20, gz=False)
    raw = folder / "t10k-labels-idx1-ubyte"
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(raw.read_bytes()))
    raw.unlink()
    test = build_dataset("fashion_mnist", tmp_path, "test")
    assert len(test) == 20 and test.targets == labels["t10k"]


def test_fashion_mnist_reads_torchvision_raw_layout_first(tmp_path):
    write_fashion_mnist(tmp_path / "FashionMNIST" / "raw", n_train=30, n_test=10, gz=False)
    write_fashion_mnist(tmp_path / "fashion-mnist", n_train=50, n_test=10, gz=True)
    train = build_dataset("fashion_mnist", tmp_path, "train")
    assert len(train) == 30 and train.root == tmp_path / "FashionMNIST" / "raw"
    # torchvision's own reader agrees with ours on the same files
    tv = tvd.FashionMNIST(str(tmp_path), train=True)
    assert tv.targets.tolist() == train.targets
    assert np.array_equal(np.asarray(train.load_image(3))[..., 0], tv.data[3].numpy())


def test_truncated_idx_file_names_the_file(tmp_path):
    folder = tmp_path / "fashion-mnist"
    write_fashion_mnist(folder, gz=False)
    path = folder / "train-images-idx3-ubyte"
    whole = path.read_bytes()
    path.write_bytes(whole[:-100])
    with pytest.raises(CorruptImageError, match="train-images-idx3-ubyte is truncated"):
        build_dataset("fashion_mnist", tmp_path, "train")
    path.write_bytes(whole + bytes(100))  # it said "truncated" of a file with bytes appended
    with pytest.raises(CorruptImageError, match="train-images-idx3-ubyte is longer than its header says"):
        build_dataset("fashion_mnist", tmp_path, "train")
    # a header whose sizes multiply past int64: numpy's product wrapped, so it read as "longer than its header says",
    # or, wrapped to the file's size, passed on to a bare reshape error
    for count, data in ((3, bytes(16)), (4, b"")):
        path.write_bytes(b"\0\0\x08\x03" + struct.pack(">3I", count, 2**31, 2**31) + data)
        with pytest.raises(CorruptImageError, match=r"train-images-idx3-ubyte is truncated: header says \(%d, " % count):
            build_dataset("fashion_mnist", tmp_path, "train")


@pytest.mark.skipif(not Path(FASHION_MNIST_SYSTEM_DIR, "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="apt-get install dataset-fashion-mnist to run this")
def test_fashion_mnist_reads_the_real_debian_files(tmp_path):
    # a root that does not exist (mistyped?) is named: the system's copy was read without a word
    for download in (False, True):  # with download=True, the download lock made the root and hid the mistake
        with pytest.warns(UserWarning, match=r"dataset 'fashion_mnist': .*empty does not exist, so the system's copy "):
            build_dataset("fashion_mnist", tmp_path / "empty", "test", download=download)
        assert not (tmp_path / "empty").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        test = build_dataset("fashion_mnist", tmp_path, "test")  # an existing root without it: the documented fallback
    assert len(test) == 10_000 and np.bincount(test.targets).tolist() == [1000] * 10
    assert test.load_image(0).size == (28, 28)


@pytest.mark.skipif(not Path(FASHION_MNIST_SYSTEM_DIR, "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="apt-get install dataset-fashion-mnist to run this")
@pytest.mark.parametrize("layout", ["swapped", "test_twice"])
def test_fashion_mnist_files_of_the_other_split_are_refused(tmp_path, layout):
    # Both loaded: the model trained on the official test set (and was tested on it), or on 10,000 images only.
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for kind in ("images-idx3", "labels-idx1"):
        official = {prefix: Path(FASHION_MNIST_SYSTEM_DIR, f"{prefix}-{kind}-ubyte.gz") for prefix in ("train", "t10k")}
        sources = ({"train": official["t10k"], "t10k": official["train"]} if layout == "swapped" else
                   {"train": official["t10k"], "t10k": official["t10k"]})
        for prefix, source in sources.items():
            shutil.copyfile(source, folder / f"{prefix}-{kind}-ubyte.gz")
    with pytest.raises(DatasetMetadataError, match="is Fashion-MNIST's t10k-images-idx3 file under the train name"):
        build_dataset("fashion_mnist", tmp_path, "train")
    if layout == "swapped":
        with pytest.raises(DatasetMetadataError, match="is Fashion-MNIST's train-images-idx3 file under the t10k name"):
            build_dataset("fashion_mnist", tmp_path, "test")
    else:
        assert len(build_dataset("fashion_mnist", tmp_path, "test")) == 10_000


def test_a_fashion_mnist_file_with_more_items_than_the_official_one_is_refused(tmp_path):
    write_fashion_mnist(tmp_path / "fashion-mnist", n_train=20, n_test=10_001, gz=False)
    with pytest.raises(DatasetMetadataError, match="holds 10001 items, more than Fashion-MNIST's t10k-images-idx3"):
        build_dataset("fashion_mnist", tmp_path, "test")
    assert len(build_dataset("fashion_mnist", tmp_path, "train")) == 20  # fewer: a subset, which cannot be checked


def test_digits_has_a_fixed_split_and_needs_no_root():
    train, test = build_dataset("digits", "/nonexistent", "train"), build_dataset("digits", split="test")
    assert (len(train), len(test)) == (898, 899) and train.num_classes == 10
    assert train.targets[:10] == list(range(10))  # scikit-learn's fixed order
    img = train.load_image(0)
    from sklearn.datasets import load_digits
    ink = np.round(load_digits().images[0] * 255 / 16)  # 0..16 ink levels scaled to 0..255, gray -> RGB
    assert img.mode == "RGB" and img.size == (8, 8)
    assert np.array_equal(np.asarray(img), np.repeat(ink[..., None], 3, axis=2))
    assert build_dataset("digits", split="train").samples == train.samples


def test_imagefolder_reads_class_folders_and_falls_back_to_val(tmp_path):
    write_imagefolder(tmp_path, eval_folder="val")
    train, test = build_dataset("imagefolder", tmp_path, "train"), build_dataset("imagefolder", tmp_path, "test")
    assert train.class_names == ["cat", "dog", "owl"] and dataset_num_classes("imagefolder", tmp_path) == 3
    assert (len(train), len(test)) == (12, 6)
    assert test.samples[0] == ("val/cat/cat 00.png", 0)
    assert test.load_image(5).getpixel((0, 0)) == class_color(2)


def test_imagefolder_reads_the_images_in_a_class_folders_sub_folders_as_torchvision_does(tmp_path):
    write_imagefolder(tmp_path, eval_folder="test")
    before = len(build_dataset("imagefolder", tmp_path, "test"))
    dog = tmp_path / "test" / "dog"
    image = next(dog.glob("*.png")).read_bytes()
    for folder in (dog / "batch2", dog / ".cache"):  # a hidden folder is tool metadata, never data
        folder.mkdir()
        for name in ("a.png", ".b.png"):
            (folder / name).write_bytes(image)
    test = build_dataset("imagefolder", tmp_path, "test")
    assert ("test/dog/batch2/a.png", 1) in test.samples  # "testing uses every image of test/": these were skipped
    assert len(test) == before + 1 and not any(".b.png" in key or ".cache" in key for key, _ in test.samples)


def test_a_symlink_loop_in_a_class_folder_counts_each_image_once(tmp_path):
    write_imagefolder(tmp_path, eval_folder="test")
    before = build_dataset("imagefolder", tmp_path, "test").samples
    (tmp_path / "test" / "cat" / "again").symlink_to(".", target_is_directory=True)  # os.walk would follow it 40 deep
    (tmp_path / "test" / "dog" / "up").symlink_to("..", target_is_directory=True)  # cat's images would come back as dog
    assert build_dataset("imagefolder", tmp_path, "test").samples == before


def test_image_files_an_imagefolder_does_not_read_are_named_and_a_class_left_without_images_is_refused(tmp_path):
    write_imagefolder(tmp_path, eval_folder="test")
    image = Image.new("RGB", (8, 8), class_color(0))
    image.save(tmp_path / "test" / "cat" / "cat 10.gif")
    image.save(tmp_path / "test" / "unsorted.png")  # loose, not in a class folder
    (tmp_path / "test" / "cat" / "notes.txt").write_text("not an image: never named")
    (tmp_path / "test" / "cat" / ".thumbs").mkdir()  # hidden: tool metadata, neither read nor named
    image.save(tmp_path / "test" / "cat" / ".thumbs" / "t.gif")
    with pytest.warns(UserWarning, match=r"2 image file\(s\) under .*test are not read \(unsorted.png, cat/cat 10.gif\)"):
        assert len(build_dataset("imagefolder", tmp_path, "test")) == 6
    for png in (tmp_path / "train" / "owl").glob("*.png"):  # a class whose images are all in a format not read
        Image.open(png).save(png.with_suffix(".gif"))
        png.unlink()
    with pytest.raises(DatasetNotFoundError, match=r"4 image file\(s\) under .*train are not read \(owl/owl 00.gif"):
        build_dataset("imagefolder", tmp_path, "train")
    for name in ("cat", "dog", "owl"):  # only loose images in test/: nothing to evaluate, and the message says why
        for path in (tmp_path / "test" / name).iterdir():
            if path.is_file():
                path.rename(tmp_path / "test" / f"{name}-{path.name}")
    with pytest.raises(DatasetNotFoundError, match=r"not read .*Move loose images into their class folder"):
        build_dataset("imagefolder", tmp_path, "test")


def test_images_without_their_formats_extension_are_named_not_skipped_silently(tmp_path):
    write_imagefolder(tmp_path, eval_folder="test")
    image = Image.new("RGB", (8, 8), class_color(0))
    image.save(tmp_path / "test" / "cat" / "3f9a2c0", format="JPEG")  # as a browser or a hash-named store saves it
    image.save(tmp_path / "test" / "dog" / "dog.jpg_large", format="JPEG")
    image.save(tmp_path / "test" / "dog" / "scan", format="PNG")
    (tmp_path / "test" / "dog" / "labels").write_text("BM not an image, though it starts as a bitmap would")
    with pytest.warns(UserWarning, match=r"3 image file\(s\) under .*test are not read \(cat/3f9a2c0, dog/dog.jpg_large, "
                                         r"dog/scan\).*give images without their format's extension one"):
        assert len(build_dataset("imagefolder", tmp_path, "test")) == 6


def test_a_folder_that_cannot_be_listed_is_refused_not_left_out(tmp_path, monkeypatch):
    """os.walk skips a folder it may not list (no read permission): its images were left out of the split without a
    word, and accuracy computed on the rest."""
    write_imagefolder(tmp_path, eval_folder="test")
    locked = tmp_path / "test" / "cat" / "batch2"
    locked.mkdir()
    Image.new("RGB", (8, 8), class_color(0)).save(locked / "b.png")
    listing = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return listing(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DatasetNotFoundError, match=r"cannot list folder .*batch2 \(Permission denied\): the images in it "
                                                   r"would be left out. Make it readable"):
        build_dataset("imagefolder", tmp_path, "test")


def test_an_image_that_may_not_be_read_says_so_rather_than_calling_it_corrupt(tmp_path, monkeypatch):
    write_imagefolder(tmp_path, eval_folder="test")
    dataset = build_dataset("imagefolder", tmp_path, "test")
    opening = Image.open

    def open_image(path, *args, **kwargs):
        if "cat 00" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return opening(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", open_image)
    with pytest.raises(CorruptImageError, match=r"cannot read image .*cat 00.png .*Permission denied. Make it readable"):
        dataset.load_image(0)


def test_imagefolder_rejects_test_classes_unknown_to_train(tmp_path):
    write_imagefolder(tmp_path, eval_folder="test")
    (tmp_path / "test" / "zebra").mkdir()
    with pytest.raises(ValueError, match="zebra"):
        build_dataset("imagefolder", tmp_path, "test")


@pytest.mark.parametrize("name, expected, hint", [
    ("cifar10", "cifar-10-batches-py", "download=True"),
    ("cifar100", "cifar-100-python", "cifar-100-python.tar.gz"),
    ("cub200", "CUB_200_2011/images.txt", "data.caltech.edu"),
    ("caltech101", "caltech101/101_ObjectCategories", "download=True"),
    ("food101", "food-101/meta/train.json", "food-101.tar.gz"),
    ("imagefolder", "train", "one folder per class"),
])
def test_missing_dataset_error_names_path_source_and_root_flag(tmp_path, name, expected, hint):
    root = tmp_path / "missing"
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset(name, root, "train")
    msg = str(err.value)
    assert str(root / expected) in msg and hint in msg and "--data.root" in msg
    assert not root.exists()  # reading never creates folders in the user's tree


@pytest.mark.parametrize("name", ["imagefolder", "cifar10"])
def test_a_url_root_is_named_as_a_url_to_mount_or_copy(name, tmp_path, monkeypatch):
    # Path('s3://bucket/imgs') is 's3:/bucket/imgs': the error named that folder as not found
    from nola_vision.data import FewShotDataModule

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tvd, "CIFAR10", lambda *a, **k: pytest.fail("nothing is downloaded to a URL"))
    for read in (lambda: build_dataset(name, "s3://bucket/imgs", "train"),
                 lambda: download_dataset(name, "s3://bucket/imgs"),
                 lambda: FewShotDataModule(name, root="s3://bucket/imgs", shots=1)):
        with pytest.raises(DatasetNotFoundError, match=r"the dataset root s3://bucket/imgs is a URL.*mount it"):
            read()
    assert not any(tmp_path.iterdir())


def test_missing_fashion_mnist_mentions_download_and_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr("nola_vision.data.datasets.FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "no-system"))
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset("fashion_mnist", tmp_path, "train")
    assert "download=True" in str(err.value) and "dataset-fashion-mnist" in str(err.value)


def test_fashion_mnist_download_completes_a_partial_download_under_root_though_a_system_copy_exists(tmp_path,
                                                                                                     monkeypatch):
    # the system copy counted as found, so download=True fetched nothing and the error asked for download=True again
    system = tmp_path / "system"
    write_fashion_mnist(system, n_train=40, n_test=20, gz=True)
    monkeypatch.setattr("nola_vision.data.datasets.FASHION_MNIST_SYSTEM_DIR", str(system))
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    write_fashion_mnist(raw, n_train=30, n_test=10, gz=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (raw / name).unlink()
    calls = []

    def fetch(root, train, download):  # what torchvision's download leaves: the missing files, next to the others
        calls.append((root, download))
        write_fashion_mnist(raw, n_train=30, n_test=10, gz=True)

    monkeypatch.setattr(tvd, "FashionMNIST", fetch)
    download_dataset("fashion_mnist", tmp_path / "root")
    assert calls == [(str(tmp_path / "root"), True)]
    assert len(build_dataset("fashion_mnist", tmp_path / "root", "test")) == 10  # root's, not the system's 20
    download_dataset("fashion_mnist", tmp_path / "root")  # whole now: nothing fetched
    assert len(calls) == 1


def test_incomplete_extraction_is_reported(tmp_path):
    write_cub(tmp_path, num_classes=3)
    with pytest.raises(DatasetNotFoundError, match="3 classes, expected 200"):
        build_dataset("cub200", tmp_path)


def test_an_extra_caltech101_class_folder_is_named_and_no_split_file_lists_it(tmp_path):
    info = write_caltech101(tmp_path, per_class=2)
    cats = info["folder"] / "101_ObjectCategories"
    stand_ins = [name for name in info["class_names"] if name not in CALTECH101_CLASSES]
    for stand_in, name in zip(stand_ins, sorted(CALTECH101_CLASSES - set(info["class_names"]))):
        (cats / stand_in).rename(cats / name)  # the archive's own folder names
    (cats / "zz_extra").mkdir()
    (cats / "zz_extra" / "image_0001.jpg").write_bytes((cats / "Faces_easy" / "image_0001.jpg").read_bytes())
    with pytest.raises(DatasetMetadataError, match=r"holds 102 classes, expected 101: 'zz_extra' is not among its "
                                                   r"classes\. Remove the folders"):
        build_dataset("caltech101", tmp_path, "train")
    assert not (info["folder"] / "nola_vision_split.txt").exists()  # it would list the extra folder's images
    (cats / "zz_extra" / "image_0001.jpg").unlink()
    (cats / "zz_extra").rmdir()
    assert build_dataset("caltech101", tmp_path, "train").num_classes == 101


def test_an_extra_cub_or_food101_class_is_named(tmp_path):
    info = write_cub(tmp_path / "cub", train_per_class=1, test_per_class=1)
    with open(info["folder"] / "classes.txt", "a") as classes:
        classes.write("201 201.Extra_bird\n")
    with pytest.raises(DatasetMetadataError, match=r"classes\.txt holds 201 classes, expected 200: '201 "
                                                   r"201\.Extra_bird' is not among its classes\. Remove those lines"):
        build_dataset("cub200", tmp_path / "cub", "train")
    info = write_food101(tmp_path / "food", train_per_class=1, test_per_class=1)
    for split in ("train", "test"):
        meta = info["folder"] / "meta" / f"{split}.json"
        meta.write_text(meta.read_text()[:-1] + ', "extra_dish": ["extra_dish/1"]}')
    with pytest.raises(DatasetMetadataError, match=r"test\.json holds 102 classes, expected 101: 'extra_dish' is not "
                                                   r"among its classes\. Remove the classes"):
        build_dataset("food101", tmp_path / "food", "train")


def test_a_food101_class_under_a_name_its_classes_txt_does_not_list_is_refused(tmp_path):
    # 101 classes, one of them another dish standing in for a Food-101 class: trained and tested under its name.
    info = write_food101(tmp_path, train_per_class=1, test_per_class=1)
    for split in ("train", "test"):
        meta = info["folder"] / "meta" / f"{split}.json"
        meta.write_text(meta.read_text().replace("food_050", "my_pizza"))
    (info["folder"] / "images" / "food_050").rename(info["folder"] / "images" / "my_pizza")
    with pytest.raises(DatasetMetadataError, match=r"test\.json holds 1 class that .*classes\.txt does not list "
                                                   r"\('my_pizza'\)"):
        build_dataset("food101", tmp_path, "train")


def test_corrupt_image_error_names_the_file(tmp_path):
    write_imagefolder(tmp_path)
    bad = tmp_path / "train" / "dog" / "dog 01.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    ds = build_dataset("imagefolder", tmp_path)
    with pytest.raises(CorruptImageError) as err:
        ds.load_image(ds.samples.index(("train/dog/dog 01.png", 1)))
    assert str(bad) in str(err.value)


def test_getitem_applies_the_transform_and_returns_the_label(tmp_path):
    write_imagefolder(tmp_path)
    ds = build_dataset("imagefolder", tmp_path, transform=lambda img: np.asarray(img).shape)
    assert ds[4] == ((16, 20, 3), 1)
    assert isinstance(ds.load_image(0), Image.Image) and os.fspath(ds.root) == os.fspath(tmp_path)


def test_a_caltech101_split_file_that_no_longer_matches_the_images_is_named(tmp_path):
    write_caltech101(tmp_path, per_class=6)
    train = build_dataset("caltech101", tmp_path, "train").samples  # writes the split file
    split_file = tmp_path / "caltech101" / "nola_vision_split.txt"
    cats = tmp_path / "caltech101" / "101_ObjectCategories"
    added = cats / "Faces_easy" / "image_0099.jpg"
    added.write_bytes((cats / "Faces_easy" / "image_0002.jpg").read_bytes())  # extracted after the split was made
    with pytest.raises(DatasetMetadataError, match=r"1 image\(s\) on disk are not listed .*image_0099.jpg.*adding a "
                                                   r"'<path> train' or '<path> test' line.*Deleting it makes a new "
                                                   r"split by position, in which images move between train and test"):
        build_dataset("caltech101", tmp_path, "train")
    with open(split_file, "a") as f:  # the edit the message asks for: every other image stays in its split
        f.write("101_ObjectCategories/Faces_easy/image_0099.jpg test\n")
    assert build_dataset("caltech101", tmp_path, "train").samples == train
    assert any(key.endswith("Faces_easy/image_0099.jpg") for key, _ in build_dataset("caltech101", tmp_path, "test").samples)
    split_file.write_text("".join(line for line in split_file.read_text().splitlines(True) if "0099" not in line))
    added.unlink()
    (cats / "Faces_easy" / "image_0003.jpg").unlink()
    with pytest.raises(DatasetMetadataError, match=r"1 listed image\(s\) are not on disk .*image_0003.jpg"):
        build_dataset("caltech101", tmp_path, "test")
    split_file.unlink()
    assert len(build_dataset("caltech101", tmp_path, "train")) + len(build_dataset("caltech101", tmp_path, "test")) \
        == 101 * 6 - 1


@pytest.mark.parametrize("extra", ["ds_store", "no_background"])
def test_caltech101_download_reads_an_extraction_the_reader_accepts(tmp_path, monkeypatch, extra):
    """download=True (the paper config's) on a copy with a .DS_Store beside the class folders, or without the
    BACKGROUND_Google clutter class, failed inside torchvision, which takes every entry for a category."""
    write_caltech101(tmp_path)
    cats = tmp_path / "caltech101" / "101_ObjectCategories"
    if extra == "ds_store":
        (cats / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    else:
        shutil.rmtree(cats / "BACKGROUND_Google")
    monkeypatch.setattr(tvd, "Caltech101", lambda *a, **k: pytest.fail("nothing to download"))
    assert build_dataset("caltech101", tmp_path, "train", download=True).num_classes == 101


def test_food101_download_onto_a_partial_extraction_names_what_is_missing(tmp_path, monkeypatch):
    """The advice 'Pass download=True' led to a bare FileNotFoundError: torchvision downloads only into a root
    without meta/ and images/, then opens meta/train.json."""
    folder = write_food101(tmp_path)["folder"]
    (folder / "meta" / "train.json").unlink()
    monkeypatch.setattr(tvd, "Food101", lambda *a, **k: pytest.fail("torchvision would not complete it"))
    for download in (False, True):
        with pytest.raises(DatasetNotFoundError, match=rf"{folder} lacks meta/train.json .*delete {folder} and pass "
                                                       r"download=True"):
            build_dataset("food101", tmp_path, "train", download=download)
    write_food101(tmp_path)  # whole again: nothing to download, read as it is
    assert build_dataset("food101", tmp_path, "train", download=True).num_classes == 101


def test_food101_download_onto_an_extraction_without_meta_fetches_it_again(tmp_path, monkeypatch):
    """torchvision downloads where meta/ or images/ is missing: such a folder is handed to it, not refused."""
    (tmp_path / "food-101" / "images" / "apple_pie").mkdir(parents=True)  # stopped before meta/
    calls = []
    monkeypatch.setattr(tvd, "Food101", lambda root, download: calls.append((root, download)))
    download_dataset("food101", tmp_path)
    assert calls == [(str(tmp_path), True)]


@pytest.mark.parametrize("name, inner", [("imagefolder", "train"), ("cifar10", "cifar-10-batches-py")])
def test_a_root_one_level_too_deep_is_told_the_folder_above(tmp_path, name, inner):
    """--data.root pointed at the dataset's own folder (an image folder's train/, CIFAR's cifar-10-batches-py/) was
    told only that <root>/<folder>/<folder> is missing."""
    write_imagefolder(tmp_path) if name == "imagefolder" else write_cifar10(tmp_path)
    with pytest.raises(DatasetNotFoundError, match=rf"is itself the '{inner}' folder the dataset expects inside "
                                                   rf"--data.root: did you mean --data.root {tmp_path}\?"):
        dataset_class_names(name, tmp_path / inner)
    (tmp_path / "data" / "data").mkdir(parents=True)  # a folder named as its parent, not the dataset's folder
    with pytest.raises(DatasetNotFoundError) as elsewhere:
        dataset_class_names(name, tmp_path / "data" / "data")
    assert "did you mean" not in str(elsewhere.value)


@pytest.mark.parametrize("name", ["food101", "cub200", "caltech101", "cifar10"])
def test_an_archive_extracted_into_a_folder_of_its_name_is_told_the_root_that_reads_it(tmp_path, name,
                                                                                       cifar_fixture_checksums):
    """``mkdir food-101 && tar xzf food-101.tar.gz -C food-101`` leaves food-101/food-101/: Food-101 said to delete
    the folder that held the whole dataset and download it again; the others said only that it was not found."""
    writer = {"food101": write_food101, "cub200": write_cub, "caltech101": write_caltech101, "cifar10": write_cifar10}
    folder = {"food101": "food-101", "cub200": "CUB_200_2011", "caltech101": "caltech101",
              "cifar10": "cifar-10-batches-py"}[name]
    info = writer[name](tmp_path / "extracted")
    if name == "cifar10":
        cifar_fixture_checksums("cifar10", info["md5"])
    (tmp_path / folder).mkdir()
    (tmp_path / "extracted" / folder).rename(tmp_path / folder / folder)
    for download in (False, True):
        with pytest.raises(DatasetNotFoundError) as err:
            build_dataset(name, tmp_path, "train", download=download)
        assert f"holds a '{folder}' folder of its own, as an archive extracted into a folder of its name does: did " \
               f"you mean --data.root {tmp_path / folder}?" in str(err.value)
        assert "delete" not in str(err.value)
    assert len(build_dataset(name, tmp_path / folder, "train")) > 0


def test_cubs_archive_extracted_into_a_folder_of_its_name_beside_its_attributes_txt_is_told_the_root(tmp_path):
    """CUB_200_2011.tgz holds attributes.txt beside CUB_200_2011/: extracted into a folder of that name, the hint
    (which wanted the inner folder alone there) never came, and the user was told to download 1.1 GB again."""
    write_cub(tmp_path / "extracted")
    (tmp_path / "CUB_200_2011").mkdir()
    (tmp_path / "extracted" / "CUB_200_2011").rename(tmp_path / "CUB_200_2011" / "CUB_200_2011")
    (tmp_path / "CUB_200_2011" / "attributes.txt").write_text("1 has_bill_shape::curved\n")
    with pytest.raises(DatasetNotFoundError, match=rf"did you mean --data.root {re.escape(str(tmp_path))}/CUB_200_2011"):
        build_dataset("cub200", tmp_path, "train")


def test_caltechs_categories_extracted_into_a_folder_of_their_name_are_told_how_to_move_them(tmp_path):
    """101_ObjectCategories/101_ObjectCategories/<classes> read as one class, and then failed as 8,000 unread images
    with advice to convert GIFs."""
    write_caltech101(tmp_path, num_classes=3)
    cats = tmp_path / "caltech101" / "101_ObjectCategories"
    cats.rename(tmp_path / "inner")
    cats.mkdir()
    (tmp_path / "inner").rename(cats / "101_ObjectCategories")
    for read in (lambda: dataset_class_names("caltech101", tmp_path),
                 lambda: build_dataset("caltech101", tmp_path, "train")):
        with pytest.raises(DatasetNotFoundError, match=r"holds a '101_ObjectCategories' folder of its own, with the "
                                                       r"categories in it .*move that folder's contents up one level"):
            read()


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_food101s_classes_txt_saved_with_a_byte_order_mark_is_read(tmp_path, encoding):
    """Re-saved by Notepad (UTF-8 with a BOM, or "Unicode"), classes.txt made the archive's own names "classes under
    other names"; a train.json with a BOM was "not valid JSON"."""
    write_food101(tmp_path)
    meta = tmp_path / "food-101" / "meta"
    listed = meta / "classes.txt"
    listed.write_text(listed.read_text().replace("\n", "\r\n"), encoding=encoding)
    (meta / "train.json").write_text((meta / "train.json").read_text(), encoding="utf-8-sig")
    assert build_dataset("food101", tmp_path, "train").num_classes == 101


def test_a_dataset_folder_that_also_holds_an_empty_folder_of_its_name_is_read_and_downloads_nothing_new(
        tmp_path, monkeypatch):
    write_food101(tmp_path)
    (tmp_path / "food-101" / "food-101").mkdir()
    monkeypatch.setattr(tvd, "Food101", lambda *args, **kwargs: pytest.fail("downloaded"))
    for download in (False, True):  # was "not downloaded into ...: it is there already (did you mean ...)"
        assert build_dataset("food101", tmp_path, "train", download=download).num_classes == 101


def test_fashion_mnist_files_one_folder_below_the_root_are_not_passed_over_for_the_systems_copy(tmp_path,
                                                                                              monkeypatch):
    """root=.../FashionMNIST (its raw/ below) read the system's 10,000 test images instead of the user's, silently."""
    system = tmp_path / "system"
    write_fashion_mnist(system, n_train=40, n_test=20)
    monkeypatch.setattr("nola_vision.data.datasets.FASHION_MNIST_SYSTEM_DIR", str(system))
    write_fashion_mnist(tmp_path / "mine" / "FashionMNIST" / "raw", n_train=30, n_test=10)
    with pytest.raises(DatasetNotFoundError, match=r"FashionMNIST holds Fashion-MNIST files in .*FashionMNIST/raw, "
                                                   r"where they are not read .* would read the system's copy under "
                                                   rf".*: did you mean --data.root {tmp_path / 'mine'}\?"):
        build_dataset("fashion_mnist", tmp_path / "mine" / "FashionMNIST", "test")
    assert len(build_dataset("fashion_mnist", tmp_path / "mine", "test")) == 10
    (tmp_path / "other").mkdir()  # a root without any: the system's copy, as documented
    assert len(build_dataset("fashion_mnist", tmp_path / "other", "test")) == 20
    write_fashion_mnist(tmp_path / "other" / "MNIST" / "raw", n_train=30, n_test=10)  # torchvision's MNIST: its names
    assert len(build_dataset("fashion_mnist", tmp_path / "other", "test")) == 20


def test_a_download_that_fails_names_the_dataset_its_source_and_the_offline_way_and_leaves_no_empty_folder(
        tmp_path, monkeypatch):
    # no network gave "nola-vision: error: <urlopen error [Errno -2] Name or service not known>" and an empty folder
    from urllib.error import URLError

    class Offline:
        def __init__(self, root, train, download):
            (Path(root) / "cifar-10-batches-py" / "part").mkdir(parents=True)
            raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(DATASETS["cifar10"].reader, "torchvision_class", Offline)
    with pytest.raises(DatasetNotFoundError, match=r"cannot download dataset 'cifar10' from https://www\.cs\.toronto"
                                                   r".*\(URLError: <urlopen error .*Name or service not known>\)\. "
                                                   r"Without a network here: .*--data.download false"):
        build_dataset("cifar10", tmp_path, download=True)
    assert [p.name for p in tmp_path.iterdir()] == [".cifar10.download.lock"]  # a root that was there stays
    with pytest.raises(DatasetNotFoundError, match="cannot download dataset 'cifar10'"):
        build_dataset("cifar10", tmp_path / "new" / "root", download=True)
    assert not (tmp_path / "new").exists()  # one it made goes: nothing was downloaded


def test_two_downloads_of_a_dataset_into_one_root_take_turns(tmp_path, monkeypatch):
    # the fits of a protocol row each downloaded at their start: the second truncated the archive the first checked
    import threading
    import time

    events = []

    class Slow:
        def __init__(self, root, train, download):
            events.append(("start", threading.current_thread().name))
            time.sleep(0.2)
            events.append(("end", threading.current_thread().name))

    monkeypatch.setattr(DATASETS["cifar10"].reader, "torchvision_class", Slow)
    threads = [threading.Thread(target=download_dataset, args=("cifar10", tmp_path), name=str(i)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    names = [name for _, name in events]
    assert len(events) == 8 and names[:4] == [names[0]] * 4 and names[4:] == [names[4]] * 4
