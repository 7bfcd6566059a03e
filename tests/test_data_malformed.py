"""Malformed dataset metadata, manifests and images: each fails naming the file (and line) and the fix, or is read as
the file means it (16-bit and transparent images); nothing is silently misread."""

from __future__ import annotations

import gzip
import json
import re

import lightning as L
import numpy as np
import pytest
import torch
from fixtures_data import write_caltech101, write_cub, write_fashion_mnist, write_food101, write_imagefolder
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from nola_vision.data import (
    DATASETS,
    CorruptImageError,
    DatasetMetadataError,
    DatasetNotFoundError,
    FewShotDataModule,
    build_dataset,
    dataset_class_names,
)
from nola_vision.train.module import FewShotClassifier, NonFiniteLossError


def replace_line(path, number: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- CUB-200-2011 lists

@pytest.mark.parametrize("file, line, text, message", [
    ("images.txt", 3, "3", r"images\.txt:3: expected '<id> <value>'"),
    ("images.txt", 2, "two 001.Bird_001/x.jpg", r"images\.txt:2: expected"),
    ("images.txt", 4, "1 001.Bird_001/again.jpg", r"images\.txt:4: .* not repeated"),
    ("classes.txt", 1, "1", r"classes\.txt:1: expected"),
    ("image_class_labels.txt", 5, "5 two", r"image_class_labels\.txt:5: expected '<id> <integer>'"),
    ("image_class_labels.txt", 1, "1 0", r"image_class_labels\.txt: image id 1 has 0, expected a class id"),
    ("image_class_labels.txt", 1, "1 3", r"image_class_labels\.txt: image id 1 has 3, expected a class id from 1 "
                                         r"to \d+: the labels count classes\.txt's lines in order"),
    ("train_test_split.txt", 2, "2 2", r"train_test_split\.txt: image id 2 has 2, expected 1 \(train\) or 0"),
    ("train_test_split.txt", 2, "", r"train_test_split\.txt has no line for image ids \[2\]"),
])
def test_malformed_cub_lists_name_the_file_and_line(tmp_path, file, line, text, message):
    info = write_cub(tmp_path, num_classes=2, train_per_class=2, test_per_class=1)
    replace_line(info["folder"] / file, line, text)
    with pytest.raises(DatasetMetadataError, match=message) as error:
        build_dataset("cub200", tmp_path, "train")
    assert "CUB_200_2011.tgz" in str(error.value)  # and says how to fix it


def test_an_empty_cub_classes_txt_is_named(tmp_path):
    """An empty classes.txt was blamed on image_class_labels.txt (image id 1 expected a class id from 1 to 0)."""
    info = write_cub(tmp_path, num_classes=2, train_per_class=1, test_per_class=1)
    (info["folder"] / "classes.txt").write_bytes(b"")
    with pytest.raises(DatasetMetadataError, match=r"classes\.txt lists no class \(it is empty\)\. Extract .*again"):
        build_dataset("cub200", tmp_path, "train")


@pytest.mark.parametrize("line, text, ident", [(3, "0 003.Bird_003", 0), (3, "4 003.Bird_003", 4)])
def test_cub_class_ids_with_a_gap_are_refused_naming_classes_txt_and_the_line(tmp_path, line, text, ident):
    # an id 0 (or a gap) sorted the class names into other places: every label got another class's name, and the
    # error blamed image_class_labels.txt
    info = write_cub(tmp_path, num_classes=3, train_per_class=1, test_per_class=1)
    replace_line(info["folder"] / "classes.txt", line, text)
    said = rf"classes\.txt:{line}: class id {ident} lies outside 1 to 3 \(the ids of the 3 classes in classes\.txt\)"
    for read in (lambda: build_dataset("cub200", tmp_path, "train"), lambda: dataset_class_names("cub200", tmp_path)):
        with pytest.raises(DatasetMetadataError, match=said + rf", in '{text}'.*Fix that line") as error:
            read()
        assert "image_class_labels" not in str(error.value)


def test_cub_classes_listed_in_another_line_order_keep_their_names(tmp_path):
    # classes are named in the order of their ids: a sorted or shuffled classes.txt was refused by a line-order check
    info = write_cub(tmp_path, num_classes=3, train_per_class=1, test_per_class=1)
    path = info["folder"] / "classes.txt"
    names = dataset_class_names("cub200", tmp_path)
    path.write_text("".join(reversed(path.read_text().splitlines(keepends=True))))
    assert dataset_class_names("cub200", tmp_path) == names


def test_a_cub_list_that_is_not_text_is_named(tmp_path):
    info = write_cub(tmp_path, num_classes=2, train_per_class=1, test_per_class=1)
    (info["folder"] / "images.txt").write_bytes(b"1 \xff\xfe\x00bird.jpg\n")
    with pytest.raises(DatasetMetadataError, match=r"images\.txt is not a text file"):
        build_dataset("cub200", tmp_path, "train")


# ---------------------------------------------------------------- Caltech-101 split file

@pytest.mark.parametrize("text", [
    "101_ObjectCategories/accordion/image_0001.jpg",  # no split
    "101_ObjectCategories/accordion/image_0001.jpg valid",
    "101_ObjectCategories/no_such_class/image_0001.jpg train",
    "image_0001.jpg train",
    "101_ObjectCategories/Faces/image_0001.jpg train",  # line 2 lists it already
])
def test_a_malformed_caltech_split_file_names_the_line_and_how_to_regenerate_it(tmp_path, text):
    write_caltech101(tmp_path, per_class=2)  # every category: an incomplete extraction writes no split file
    DATASETS["caltech101"].reader.split_assignment(tmp_path)  # writes the default split file
    split_file = tmp_path / "caltech101" / "nola_vision_split.txt"
    replace_line(split_file, 3, text)
    with pytest.raises(DatasetMetadataError, match=r"nola_vision_split\.txt:3: expected .*delete .*regenerate"):
        build_dataset("caltech101", tmp_path, "train")


@pytest.mark.parametrize("cut", ["folder", "images"])
def test_a_caltech_category_missing_beside_its_split_file_is_an_incomplete_extraction_not_a_bad_line(tmp_path, cut):
    # the split file's line of the missing category was blamed ("Fix the line, or delete it to regenerate"): the line
    # is fine, the extraction is not, and a regenerated split would move images between train and test
    import shutil

    write_caltech101(tmp_path, per_class=2)
    build_dataset("caltech101", tmp_path, "train")  # writes the split file
    split_file = tmp_path / "caltech101" / "nola_vision_split.txt"
    kept = split_file.read_bytes()
    wrench = tmp_path / "caltech101" / "101_ObjectCategories" / "wrench"
    if cut == "folder":
        shutil.rmtree(wrench)
    else:
        for image in wrench.iterdir():
            image.unlink()
    said = (r"1 of its 101 categories are missing \(e\.g\. 'wrench'\)" if cut == "folder" else
            r"category 'wrench' has no images")
    said += r", so the extraction looks incomplete; extract .* again\. The split file nola_vision_split\.txt .* kept"
    with pytest.raises(DatasetNotFoundError, match=said) as error:
        build_dataset("caltech101", tmp_path, "train")
    assert "Fix the line" not in str(error.value) and split_file.read_bytes() == kept


# ---------------------------------------------------------------- Food-101 meta JSON

@pytest.mark.parametrize("content, message", [
    ('{"food_000": ["food_000/1"],\n "food_001": [', r"train\.json:2: not valid JSON"),
    ('["food_000/1"]', r"train\.json: expected an object of class name"),
    ('{"food_000": "food_000/1", "food_001": []}', r"train\.json: class 'food_000' must list"),
    ('{"food_000": [1], "food_001": []}', r"train\.json: class 'food_000' must list"),
    ('{"food_000": ["food_000/1"], "food_002": ["food_002/2"]}',
     r"train\.json and test\.json list other classes \(only train\.json lists \['food_002'\]; only test\.json lists "
     r"\['food_001'\]\)"),
    ("[" * 100_000 + "]" * 100_000, r"train\.json: not a Food-101 JSON file"),
])
def test_malformed_food101_json_names_the_file(tmp_path, content, message):
    info = write_food101(tmp_path, num_classes=2, train_per_class=1, test_per_class=1)
    (info["folder"] / "meta" / "train.json").write_text(content)
    with pytest.raises(DatasetMetadataError, match=message):
        build_dataset("food101", tmp_path, "train")


def test_a_class_missing_from_food101_test_json_is_blamed_on_test_json(tmp_path):
    """It said train.json lists other classes than test.json, naming the file that was complete."""
    info = write_food101(tmp_path, num_classes=3, train_per_class=1, test_per_class=1)
    test_json = info["folder"] / "meta" / "test.json"
    test_json.write_text(json.dumps({k: v for k, v in json.loads(test_json.read_text()).items() if k != "food_002"}))
    with pytest.raises(DatasetMetadataError, match=r"\(only train\.json lists \['food_002'\]\)"):
        build_dataset("food101", tmp_path, "train")


# ---------------------------------------------------------------- Fashion-MNIST IDX files

@pytest.mark.parametrize("damage, message", [
    (lambda data: b"", r"is not a complete gzip file|is not a 3-dimensional uint8 IDX file"),
    (lambda data: gzip.compress(b""), r"is not a 3-dimensional uint8 IDX file \(it is 0 bytes"),
    (lambda data: b"not gzip at all", r"is not a complete gzip file"),
    (lambda data: data[: len(data) // 2], r"is not a complete gzip file"),
    (lambda data: gzip.compress(gzip.decompress(data)[:3]), r"is not a 3-dimensional uint8 IDX file"),
    (lambda data: gzip.compress(b"\x00\x00\x08\x01" + gzip.decompress(data)[4:]), r"is not a 3-dimensional uint8 IDX"),
])
def test_a_damaged_fashion_mnist_file_is_named(tmp_path, damage, message):
    write_fashion_mnist(tmp_path / "fashion-mnist", gz=True)
    path = tmp_path / "fashion-mnist" / "train-images-idx3-ubyte.gz"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CorruptImageError, match=rf"train-images-idx3-ubyte\.gz {message}") as error:
        build_dataset("fashion_mnist", tmp_path, "train")
    assert "--data.download true" in str(error.value)


def test_an_empty_uncompressed_idx_file_is_named(tmp_path):
    write_fashion_mnist(tmp_path / "fashion-mnist", gz=False)
    (tmp_path / "fashion-mnist" / "t10k-labels-idx1-ubyte").write_bytes(b"")
    with pytest.raises(CorruptImageError, match=r"t10k-labels-idx1-ubyte is not a 1-dimensional uint8 IDX file"):
        build_dataset("fashion_mnist", tmp_path, "test")


def test_a_fashion_mnist_label_beyond_the_ten_classes_is_refused(tmp_path):
    write_fashion_mnist(tmp_path / "fashion-mnist", gz=False)
    path = tmp_path / "fashion-mnist" / "train-labels-idx1-ubyte"
    data = bytearray(path.read_bytes())
    data[-1] = 10
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptImageError, match="label 10 is not a Fashion-MNIST class"):
        build_dataset("fashion_mnist", tmp_path, "train")


# ---------------------------------------------------------------- split files (manifests)

@pytest.fixture
def folder_root(tmp_path):
    write_imagefolder(tmp_path / "pets", train_per_class=6, eval_per_class=2, eval_folder="test")
    return tmp_path / "pets"


def test_an_empty_split_file_is_refused_by_name(folder_root, tmp_path):
    manifest = tmp_path / "empty.txt"
    manifest.write_text("# nothing here\n")
    dm = FewShotDataModule("imagefolder", root=str(folder_root), split_file=str(manifest), image_size=8)
    with pytest.raises(ValueError, match=rf"{re.escape(str(manifest))} lists no images"):
        dm.setup("fit")


def test_a_split_file_records_the_shot_count_it_holds(folder_root, tmp_path):
    drawn = FewShotDataModule("imagefolder", root=str(folder_root), shots=1, image_size=8,
                              split_dir=str(tmp_path / "one"))
    drawn.setup("fit")
    again = FewShotDataModule("imagefolder", root=str(folder_root), shots=5, image_size=8,
                              split_file=str(drawn.manifest_path), split_dir=str(tmp_path / "again"))
    again.setup("fit")
    assert len(again.train_manifest) == 3 and (again.shots, again.val_shots) == (1, 0)
    assert "shots=1 " in again.manifest_path.read_text().splitlines()[0]  # the re-saved manifest says so too


def test_a_split_file_replayed_after_a_class_was_added_before_its_classes_says_they_were_renumbered(folder_root,
                                                                                                     tmp_path):
    # "'train/dog/dog 03.png' has label 1, but the dataset says 2", without a word of why
    drawn = FewShotDataModule("imagefolder", root=str(folder_root), shots=2, image_size=8,
                              split_dir=str(tmp_path / "one"))
    drawn.setup("fit")
    (folder_root / "train" / "cow").mkdir()  # sorts between cat and dog: dog and owl move up one
    for i in range(2):
        (folder_root / "train" / "cow" / f"cow {i}.png").write_bytes((folder_root / "train" / "cat" /
                                                                     f"cat 0{i}.png").read_bytes())
    again = FewShotDataModule("imagefolder", root=str(folder_root), image_size=8,
                              split_file=str(drawn.manifest_path), split_dir=str(tmp_path / "again"))
    with pytest.raises(ValueError, match=r"has label 1, but the dataset says 2\. The dataset numbers the manifest's "
                                         r"classes otherwise now \(1 is 2, 2 is 3\): a class was added, removed or "
                                         r"renamed since the manifest was written"):
        again.setup("fit")
    manifest = tmp_path / "from_one.txt"  # written by hand with classes counted from 1
    manifest.write_text("train/cat/cat 00.png 1\ntrain/cow/cow 0.png 2\ntrain/dog/dog 00.png 3\n"
                        "train/owl/owl 00.png 4\n")
    counted = FewShotDataModule("imagefolder", root=str(folder_root), image_size=8, split_file=str(manifest))
    with pytest.raises(ValueError, match=r"says 0\. The manifest's labels look counted from 1 \(1 is 0, 2 is 1, 3 is "
                                         r"2, 4 is 3\): labels count from 0"):
        counted.setup("fit")
    manifest = tmp_path / "edited.txt"  # labels edited by hand: no renumbering to tell of
    manifest.write_text("train/cat/cat 00.png 1\ntrain/cat/cat 01.png 0\n")
    edited = FewShotDataModule("imagefolder", root=str(folder_root), image_size=8, split_file=str(manifest))
    with pytest.raises(ValueError, match=r"has label 1, but the dataset says 0$"):
        edited.setup("fit")


def test_a_split_file_with_uneven_classes_warns_naming_them(folder_root, tmp_path):
    manifest = tmp_path / "uneven.txt"
    manifest.write_text("train/cat/cat 00.png 0\ntrain/cat/cat 01.png 0\ntrain/dog/dog 00.png 1\n")
    dm = FewShotDataModule("imagefolder", root=str(folder_root), split_file=str(manifest), image_size=8)
    with pytest.raises(ValueError, match=r"lists no training image of 1 of the 3 classes there now \('owl'\)"):
        dm.setup("fit")  # the head's owl output would never train, and the test split scores it
    with manifest.open("a") as listed:
        listed.write("train/owl/owl 00.png 2\n")
    dm = FewShotDataModule("imagefolder", root=str(folder_root), split_file=str(manifest), image_size=8)
    with pytest.warns(UserWarning, match=r"2 images per class, but fewer for 2 classes \('dog' 1, 'owl' 1\); "
                                         r"recorded as shots=2"):
        dm.setup("fit")
    assert dm.shots == 2
    full = tmp_path / "full.txt"
    full.write_text("".join(f"train/{name}/{name} 0{i}.png {label}\n"
                            for label, name in enumerate(["cat", "dog", "owl"]) for i in (2, 3)))
    dm = FewShotDataModule("imagefolder", root=str(folder_root), split_file=str(full), val_split_file=str(manifest),
                           image_size=8)
    with pytest.warns(UserWarning, match=r"uneven.txt lists 2 images per class.*; recorded as val_shots=2"):
        dm.setup("fit")
    assert dm.val_shots == 2


# ---------------------------------------------------------------- images of every mode

def saved(path, image: Image.Image):
    image.save(path)
    return path


def decode(tmp_path, image: Image.Image, name: str) -> np.ndarray:
    """The pixels the dataset gives for ``image`` saved as train/cat/<name> (RGB uint8)."""
    write_imagefolder(tmp_path, classes=("cat",), train_per_class=1, eval_per_class=1)
    for old in (tmp_path / "train" / "cat").iterdir():
        old.unlink()
    saved(tmp_path / "train" / "cat" / name, image)
    ds = build_dataset("imagefolder", tmp_path)
    rgb = ds.load_image(0)
    assert rgb.mode == "RGB"
    return np.asarray(rgb)


@pytest.mark.parametrize("name, image, expected", [
    ("grey16.png", Image.fromarray(np.full((6, 5), 32768, np.uint16)), 128),
    ("grey16.tif", Image.fromarray(np.full((6, 5), 65535, np.uint16)), 255),
    ("grey16.pgm", Image.fromarray(np.full((6, 5), 16448, np.uint16)), 64),  # PIL reads it as mode I
    ("float.tif", Image.fromarray(np.full((6, 5), 0.25, np.float32)), 64),
    ("float255.tif", Image.fromarray(np.full((6, 5), 200.0, np.float32)), 200),
    ("cmyk.jpg", Image.new("CMYK", (6, 5), (0, 0, 0, 0)), 255),
])
def test_non_8bit_greys_and_other_modes_keep_their_brightness(tmp_path, name, image, expected):
    pixels = decode(tmp_path, image, name)
    assert np.abs(pixels.astype(int) - expected).max() <= 2


def test_transparent_pixels_are_composited_over_white(tmp_path):
    la = Image.new("LA", (6, 5), (40, 0))
    la.putpixel((0, 0), (40, 255))
    pixels = decode(tmp_path / "la", la, "la.png")
    assert pixels[0, 1].tolist() == [255, 255, 255] and pixels[0, 0].tolist() == [40, 40, 40]
    palette = Image.new("P", (6, 5), 0)
    palette.putpalette([10, 20, 30] + [200, 0, 0] * 255)
    palette.putpixel((0, 0), 1)
    palette.info["transparency"] = 0
    pixels = decode(tmp_path / "p", palette, "p.png")
    assert pixels[0, 1].tolist() == [255, 255, 255] and pixels[0, 0].tolist() == [200, 0, 0]


def test_a_float_image_with_nan_pixels_is_refused_by_name(tmp_path):
    values = np.full((6, 5), 0.5, np.float32)
    values[2, 3] = np.nan
    with pytest.raises(CorruptImageError, match=r"nan\.tif .*1 of its 30 pixels are NaN or infinite"):
        decode(tmp_path, Image.fromarray(values), "nan.tif")


def test_a_nan_input_batch_stops_training_blaming_the_images_not_the_learning_rate(tmp_path):
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    images[5, 1, 2, 3] = float("nan")
    model = FewShotClassifier(backbone="vit_tiny_patch16_224", pretrained=False, image_size=32, num_classes=2,
                              backbone_kwargs=dict(patch_size=8, depth=1, embed_dim=32, num_heads=2))
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"input images \[5\] of batch 0 .* NaN/Inf pixel") as error:
        trainer.fit(model, DataLoader(TensorDataset(images, torch.arange(8) % 2), batch_size=8))
    assert "learning rate is not the cause" in str(error.value)
    assert not (tmp_path / "adapter").exists()

