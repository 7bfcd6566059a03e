"""Byte-identical copies of a drawn k-shot image, in another class or in the held-out split, are named in one warning
where the split is drawn (a wrong label, or a test image trained on), never refused, and never change the split;
copies among undrawn images or within one class are not (unless one is a training and the other a validation
image), and building a dataset reads no image content at all."""

from __future__ import annotations

import builtins
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest
from PIL import Image

from nola_vision.data import CorruptImageError, FewShotDataModule, build_dataset

CLASSES = ("cat", "dog")


def _png(path: Path, seed: int, size: tuple[int, int] = (12, 10)) -> None:
    """A PNG whose pixels differ from those of every other ``seed``: images written here are distinct unless copied."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = bytes((seed * 31 + i * 7) % 256 for i in range(size[0] * size[1] * 3))
    Image.frombytes("RGB", size, pixels).save(path)


def _folder(root: Path, per_class: int = 4) -> None:
    """``root/train/<class>/`` and ``root/test/<class>/`` of distinct images."""
    seed = 0
    for split in ("train", "test"):
        for name in CLASSES:
            for j in range(per_class):
                seed += 1
                _png(root / split / name / f"{name} {j:02d}.png", seed)


def _module(root: Path, shots: int = 1, val_shots: int = 0) -> FewShotDataModule:
    return FewShotDataModule("imagefolder", root=str(root), shots=shots, val_shots=val_shots, image_size=8,
                             cache_images=False)


def _drawn_and_undrawn(root: Path, name: str, shots: int = 1) -> tuple[str, str]:
    """A drawn and an undrawn train key of class ``name`` (the draw depends on the file names alone)."""
    dm = _module(root, shots)
    dm.setup("fit")
    drawn = [key for key, _ in dm.train_manifest if key.startswith(f"train/{name}/")]
    undrawn = [key for key, _ in dm.train_set.dataset.samples if key.startswith(f"train/{name}/") and key not in drawn]
    return drawn[0], undrawn[0]


def _setup_without_warnings(dm: FewShotDataModule) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm.setup("fit")


def _copy_warning(record: pytest.WarningsRecorder) -> str:
    messages = [str(w.message) for w in record if "byte-identical" in str(w.message)]
    assert len(messages) == 1, messages  # one warning per setup, however many copies
    return messages[0]


def test_distinct_images_set_up_without_a_warning(tmp_path):
    _folder(tmp_path)
    _setup_without_warnings(_module(tmp_path, shots=2, val_shots=1))


@pytest.mark.parametrize("held_out", ["test", "val"])
def test_a_drawn_shot_copied_into_the_held_out_split_warns_naming_both(tmp_path, held_out):
    _folder(tmp_path)
    if held_out == "val":
        (tmp_path / "test").rename(tmp_path / "val")
    drawn, _ = _drawn_and_undrawn(tmp_path, "dog")
    shutil.copyfile(tmp_path / drawn, tmp_path / held_out / "cat" / "leak.png")  # in any class of the held-out split
    with pytest.warns(UserWarning, match=r"byte-identical") as record:
        _module(tmp_path).setup("fit")
    message = _copy_warning(record)
    assert f"{drawn} = {held_out}/cat/leak.png" in message and "1 image of the drawn" in message
    assert "inflates its accuracy" in message and "Remove the copies" in message


def test_a_drawn_shot_copied_into_another_class_warns(tmp_path):
    _folder(tmp_path)
    drawn, _ = _drawn_and_undrawn(tmp_path, "cat")
    shutil.copyfile(tmp_path / drawn, tmp_path / "train" / "dog" / "stray.png")  # undrawn there, or drawn: both warn
    for shots in (1, 0):  # stray undrawn (c), or drawn too (b: shots=0 draws every image)
        with pytest.warns(UserWarning, match=r"byte-identical") as record:
            _module(tmp_path, shots).setup("fit")
        message = _copy_warning(record)
        assert f"{drawn} = train/dog/stray.png" in message and "wrong label" in message


def test_a_drawn_validation_image_copied_into_the_test_split_warns(tmp_path):
    _folder(tmp_path)
    dm = _module(tmp_path, shots=1, val_shots=1)
    dm.setup("fit")
    val = dm.val_manifest[0][0]
    shutil.copyfile(tmp_path / val, tmp_path / "test" / "dog" / "leak.png")
    with pytest.warns(UserWarning, match=r"byte-identical") as record:
        _module(tmp_path, shots=1, val_shots=1).setup("fit")
    assert f"{val} = test/dog/leak.png" in _copy_warning(record)


def test_many_copies_are_counted_in_one_warning_that_names_a_few(tmp_path):
    _folder(tmp_path, per_class=6)
    dm = _module(tmp_path, shots=0)  # every train image drawn
    dm.setup("fit")
    for j in range(6):
        shutil.copyfile(tmp_path / "train" / "cat" / f"cat {j:02d}.png", tmp_path / "test" / "dog" / f"copy {j}.png")
    with pytest.warns(UserWarning, match=r"byte-identical") as record:
        _module(tmp_path, shots=0).setup("fit")
    message = _copy_warning(record)
    assert message.count(" = ") == 3 and "6 images of the drawn" in message and "; ...)" in message


def test_copies_among_undrawn_images_do_not_warn(tmp_path):
    _folder(tmp_path)
    _, undrawn = _drawn_and_undrawn(tmp_path, "cat")
    shutil.copyfile(tmp_path / undrawn, tmp_path / "test" / "dog" / "leak.png")
    shutil.copyfile(tmp_path / undrawn, tmp_path / "train" / "dog" / "stray.png")
    dm = _module(tmp_path)
    _setup_without_warnings(dm)
    assert all(key != undrawn and key != "train/dog/stray.png" for key, _ in dm.train_manifest)


def test_copies_within_one_class_do_not_warn(tmp_path):
    _folder(tmp_path)
    drawn, _ = _drawn_and_undrawn(tmp_path, "cat")
    shutil.copyfile(tmp_path / drawn, tmp_path / "train" / "cat" / "again.png")
    (tmp_path / "train" / "cat" / "nested").mkdir()
    shutil.copyfile(tmp_path / drawn, tmp_path / "train" / "cat" / "nested" / "third.png")
    _setup_without_warnings(_module(tmp_path, shots=0))  # all three drawn, in one class


def test_a_validation_image_copied_from_a_training_shot_of_its_class_warns(tmp_path):
    """Within one class a copy is harmless unless one is trained on and the other validated on: then validation
    scores an image the model trained on."""
    _folder(tmp_path)
    for path in sorted((tmp_path / "train" / "cat").iterdir()):
        shutil.copyfile(path, path.with_name(f"{path.stem} copy.png"))
    dm = _module(tmp_path, shots=0, val_shots=1)  # every cat image but the validation one trains: its copy too
    with pytest.warns(UserWarning) as record:
        dm.setup("fit")
    message = _copy_warning(record)
    (validation,) = [key for key, _ in dm.val_manifest if key.startswith("train/cat/")]
    assert "among the validation images" in message and Path(validation).stem.removesuffix(" copy") in message


def test_distinct_images_of_equal_size_do_not_warn(tmp_path):
    # uncompressed BMPs of one resolution are all the same size: equal sizes alone are no copies
    for split in ("train", "test"):
        for label, name in enumerate(CLASSES):
            for j in range(3):
                path = tmp_path / split / name / f"{j}.bmp"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (16, 16), (label * 100, j * 40, 200 if split == "test" else 10)).save(path)
    assert len({path.stat().st_size for path in tmp_path.rglob("*.bmp")}) == 1
    _setup_without_warnings(_module(tmp_path, shots=2))


def test_empty_files_are_not_named_as_copies(tmp_path):
    # a 0-byte file is an interrupted copy (unreadable_files names it), not an image copied between classes
    _folder(tmp_path)
    drawn, undrawn = _drawn_and_undrawn(tmp_path, "cat")
    (tmp_path / undrawn).write_bytes(b"")
    (tmp_path / "test" / "dog" / "empty.png").write_bytes(b"")
    _setup_without_warnings(_module(tmp_path, shots=1))  # not drawn, or in the held-out split
    (tmp_path / drawn).write_bytes(b"")
    with pytest.raises(CorruptImageError, match=rf"{re.escape(drawn)} is empty") as error:  # drawn: refused by its
        _setup_without_warnings(_module(tmp_path, shots=1))  # stat at setup, before copies are looked for
    assert "byte-identical" not in str(error.value)


def test_building_a_dataset_reads_no_image_content(tmp_path, monkeypatch):
    _folder(tmp_path)
    # copies in two classes and in both splits: the build must not even look at them
    shutil.copyfile(tmp_path / "train" / "cat" / "cat 00.png", tmp_path / "train" / "dog" / "stray.png")
    shutil.copyfile(tmp_path / "train" / "cat" / "cat 01.png", tmp_path / "test" / "dog" / "leak.png")
    for path in (tmp_path / "train" / "cat").glob("*.png"):  # sidecar files: never opened to look for an image
        path.with_suffix(".json").write_text("{}")
    os.mkfifo(tmp_path / "train" / "dog" / "capture")  # a named pipe: opening it would wait for a writer
    opened = []
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        if not str(file).endswith(".py"):
            opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    for split in ("train", "test"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            build_dataset("imagefolder", tmp_path, split)
    assert opened == []


def test_the_check_leaves_the_split_labels_and_manifests_unchanged(tmp_path):
    _folder(tmp_path, per_class=6)
    before = _module(tmp_path, shots=2, val_shots=1)
    before.setup("fit")
    before.save_split(str(tmp_path / "before"))
    drawn = before.train_manifest[0][0]
    shutil.copyfile(tmp_path / drawn, tmp_path / "test" / "dog" / "leak.png")
    with pytest.warns(UserWarning, match=r"byte-identical"):
        after = _module(tmp_path, shots=2, val_shots=1)
        after.setup("fit")
    after.save_split(str(tmp_path / "after"))
    assert after.train_manifest == before.train_manifest and after.val_manifest == before.val_manifest
    assert after.split == before.split and after.split_digest == before.split_digest
    assert after.train_set.dataset.samples == before.train_set.dataset.samples
    for name in ("imagefolder_2shot_seed0_train.txt", "imagefolder_2shot_seed0_val1.txt"):
        assert (tmp_path / "after" / name).read_text() == (tmp_path / "before" / name).read_text()


def test_a_size_shared_by_many_files_is_not_read_and_the_sizes_are_not_kept(tmp_path, monkeypatch):
    """Uncompressed images of one resolution all have one size: reading every size-mate of the drawn images would read
    the dataset at every setup. Such a group is skipped; and the sizes, used once, do not travel to loader workers."""
    from nola_vision.data import datamodule

    for split, per in (("train", 40), ("test", 10)):
        for label, name in enumerate(CLASSES):
            for j in range(per):  # a PPM's size is its resolution's: 100 files of one size
                path = tmp_path / split / name / f"{j:02d}.ppm"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.frombytes("RGB", (6, 6), bytes((label * 97 + j * 13 + i) % 256 for i in range(108))).save(path)
    read = []
    digest = datamodule._file_digest
    monkeypatch.setattr(datamodule, "_file_digest", lambda path, *a: read.append(path) or digest(path, *a))
    dm = _module(tmp_path)
    _setup_without_warnings(dm)
    assert read == [] and len(dm.train_set.dataset.samples) == 80
    assert dm.train_set.dataset.sizes == {} and dm.train_set.dataset.other_split_sizes is None
    dm.setup("test")
    assert dm.test_set.dataset.sizes == {} and dm.test_set.dataset.other_split_sizes is None
