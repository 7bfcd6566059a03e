"""Byte-identical copies of one image in two classes, or in both train/ and test/, are named in a warning (a wrong
label, or a test image trained on), never refused, and never change what is read; copies within one class are not."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
from PIL import Image

from nola_vision.data import build_dataset


def _png(path: Path, seed: int, size: tuple[int, int] = (12, 10)) -> None:
    """A PNG whose pixels differ from those of every other ``seed``: images written here are distinct unless copied."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = bytes((seed * 31 + i * 7) % 256 for i in range(size[0] * size[1] * 3))
    Image.frombytes("RGB", size, pixels).save(path)


def _folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 3) -> None:
    """``root/train/<class>/`` and ``root/test/<class>/`` of distinct images."""
    seed = 0
    for split in ("train", "test"):
        for name in classes:
            for j in range(per_class):
                seed += 1
                _png(root / split / name / f"{name} {j:02d}.png", seed)


def _build_without_warnings(root: Path, split: str):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return build_dataset("imagefolder", root, split)


def _copy_warning(record: pytest.WarningsRecorder) -> str:
    messages = [str(w.message) for w in record if "byte-identical" in str(w.message)]
    assert len(messages) == 1, messages  # one warning per build, however many copies
    return messages[0]


def test_distinct_images_build_without_a_warning(tmp_path):
    _folder(tmp_path)
    for split in ("train", "test"):
        _build_without_warnings(tmp_path, split)


@pytest.mark.parametrize("split", ["train", "test"])
def test_an_image_copied_into_another_class_warns_naming_both_paths(tmp_path, split):
    _folder(tmp_path)
    shutil.copyfile(tmp_path / "train" / "cat" / "cat 01.png", tmp_path / "train" / "dog" / "stray.png")
    with pytest.warns(UserWarning, match=r"byte-identical") as record:
        build_dataset("imagefolder", tmp_path, split)  # either split's build: the copy is a wrong training label
    message = _copy_warning(record)
    assert "1 group" in message and "train/cat/cat 01.png = train/dog/stray.png" in message
    assert "wrong label" in message and "Remove the copies" in message


@pytest.mark.parametrize("held_out", ["test", "val"])
def test_a_train_image_copied_into_the_held_out_folder_warns(tmp_path, held_out):
    _folder(tmp_path)
    if held_out == "val":
        (tmp_path / "test").rename(tmp_path / "val")
    shutil.copyfile(tmp_path / "train" / "dog" / "dog 02.png", tmp_path / held_out / "dog" / "dog 99.png")
    with pytest.warns(UserWarning, match=r"byte-identical") as record:
        build_dataset("imagefolder", tmp_path, "test")
    message = _copy_warning(record)
    assert f"train/dog/dog 02.png = {held_out}/dog/dog 99.png" in message
    assert "inflates test accuracy" in message


def test_many_copies_are_counted_in_one_warning_that_names_a_few(tmp_path):
    _folder(tmp_path, per_class=6)
    for j in range(6):
        shutil.copyfile(tmp_path / "train" / "cat" / f"cat {j:02d}.png", tmp_path / "test" / "dog" / f"copy {j}.png")
    with pytest.warns(UserWarning, match=r"byte-identical") as record:
        build_dataset("imagefolder", tmp_path, "train")
    message = _copy_warning(record)
    assert message.count(" = ") == 3 and "6 groups" in message and "; ...)" in message


def test_copies_within_one_class_of_one_split_do_not_warn(tmp_path):
    _folder(tmp_path)
    for split in ("train", "test"):
        shutil.copyfile(tmp_path / split / "cat" / "cat 00.png", tmp_path / split / "cat" / "again.png")
        (tmp_path / split / "cat" / "nested").mkdir()
        shutil.copyfile(tmp_path / split / "cat" / "cat 00.png", tmp_path / split / "cat" / "nested" / "third.png")
    for split in ("train", "test"):
        assert len(_build_without_warnings(tmp_path, split)) == 8


def test_distinct_images_of_equal_size_do_not_warn(tmp_path):
    # uncompressed BMPs of one resolution are all the same size: equal sizes alone are no copies
    for split in ("train", "test"):
        for label, name in enumerate(("cat", "dog")):
            for j in range(3):
                path = tmp_path / split / name / f"{j}.bmp"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (16, 16), (label * 100, j * 40, 200 if split == "test" else 10)).save(path)
    sizes = {path.stat().st_size for path in tmp_path.rglob("*.bmp")}
    assert len(sizes) == 1
    for split in ("train", "test"):
        _build_without_warnings(tmp_path, split)


def test_empty_files_are_not_named_as_copies(tmp_path):
    # a 0-byte file is an interrupted copy (missing_or_empty_files names it), not an image copied between classes
    _folder(tmp_path)
    (tmp_path / "train" / "cat" / "empty.png").write_bytes(b"")
    (tmp_path / "test" / "dog" / "empty.png").write_bytes(b"")
    _build_without_warnings(tmp_path, "train")


def test_the_check_leaves_samples_labels_and_classes_unchanged(tmp_path):
    _folder(tmp_path)
    before = {split: build_dataset("imagefolder", tmp_path, split) for split in ("train", "test")}
    assert [key for key, _ in before["train"].samples][:2] == ["train/cat/cat 00.png", "train/cat/cat 01.png"]
    shutil.copyfile(tmp_path / "train" / "cat" / "cat 00.png", tmp_path / "test" / "dog" / "leak.png")
    shutil.copyfile(tmp_path / "train" / "cat" / "cat 01.png", tmp_path / "train" / "dog" / "stray.png")
    for split in ("train", "test"):
        with pytest.warns(UserWarning, match=r"2 groups of byte-identical"):
            after = build_dataset("imagefolder", tmp_path, split)
        added = {"train": [("train/dog/stray.png", 1)], "test": [("test/dog/leak.png", 1)]}[split]
        assert after.samples == sorted(before[split].samples + added, key=lambda s: (s[1], s[0]))
        assert after.targets == [label for _, label in after.samples]
        assert after.class_names == before[split].class_names == ["cat", "dog"]
