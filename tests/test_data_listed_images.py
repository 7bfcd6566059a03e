"""Datasets whose metadata lists their images (CUB-200-2011, Food-101) and Caltech-101's split: images the metadata
lists but the extraction lacks, paths that step out of their class folder, a class listed twice and a test split
without some class are named when the dataset is built, not silently trained on or found at the first batch."""
import json
import shutil
import warnings

import pytest
from fixtures_data import write_caltech101, write_cub, write_food101

from nola_vision.data import build_dataset
from nola_vision.data.datasets import DatasetMetadataError, DatasetNotFoundError


def test_food101_images_its_metadata_lists_but_the_folder_lacks_are_refused_at_build(tmp_path):
    write_food101(tmp_path, 101, 3, 1)
    shutil.rmtree(tmp_path / "food-101" / "images" / "food_007")  # a partial extraction
    with pytest.raises(DatasetNotFoundError, match=r"3 of the 303 images .*train.json lists are not under .*"
                                                   r"'images/food_007/.*the extraction is incomplete. Extract"):
        build_dataset("food101", tmp_path, "train")


def test_cub_images_its_metadata_lists_but_the_folder_lacks_are_refused_at_build(tmp_path):
    write_cub(tmp_path, 200, 2, 1)
    images = tmp_path / "CUB_200_2011" / "images"
    next(next(images.iterdir()).iterdir()).unlink()
    with pytest.raises(DatasetNotFoundError, match=r"of the \d+ images .*images.txt lists are not under"):
        for split in ("train", "test"):
            build_dataset("cub200", tmp_path, split)


def test_a_food101_path_that_steps_into_another_class_is_refused(tmp_path):
    # food_000/../food_001/<id> passed the "starts with its class" check and read a test image of food_001,
    # trained as food_000 while it was tested as food_001.
    write_food101(tmp_path, 101, 3, 1)
    meta = tmp_path / "food-101" / "meta"
    train, test = (json.loads((meta / f"{s}.json").read_text()) for s in ("train", "test"))
    train["food_000"].append("food_000/../" + test["food_001"][0])
    (meta / "train.json").write_text(json.dumps(train))
    with pytest.raises(DatasetMetadataError, match=r"train.json: class 'food_000': 'food_000/\.\./food_001/.*' is "
                                                   r"not a plain relative path"):
        build_dataset("food101", tmp_path, "train")


def test_a_cub_path_that_steps_into_another_class_is_refused(tmp_path):
    write_cub(tmp_path, 200, 2, 1)
    listing = tmp_path / "CUB_200_2011" / "images.txt"
    lines = listing.read_text().splitlines()
    first_id, first = lines[0].split(" ", 1)
    other = next(line.split(" ", 1)[1] for line in lines if not line.split(" ", 1)[1].startswith(first.split("/")[0]))
    lines[0] = f"{first_id} {first.split('/')[0]}/../{other}"
    listing.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetMetadataError, match=r"images.txt: image id 1: .* is not a plain relative path"):
        build_dataset("cub200", tmp_path, "train")


def test_a_food101_class_listed_twice_is_refused_not_half_dropped(tmp_path):
    # JSON keeps the last of two equal keys: the first list's images were in no split, without a word.
    write_food101(tmp_path, 101, 3, 1)
    path = tmp_path / "food-101" / "meta" / "train.json"
    meta = json.loads(path.read_text())
    first = meta.pop("food_100")
    body = ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in meta.items())
    path.write_text(f'{{"food_100": {json.dumps(first[:1])}, {body}, "food_100": {json.dumps(first[1:])}}}')
    with pytest.raises(DatasetMetadataError, match=r"train.json: class 'food_100' is listed twice"):
        build_dataset("food101", tmp_path, "train")


def test_a_caltech101_test_split_without_a_class_is_named(tmp_path):
    write_caltech101(tmp_path, 101, 6)
    build_dataset("caltech101", tmp_path, "train")  # writes the split file
    split = tmp_path / "caltech101" / "nola_vision_split.txt"
    text = split.read_text().splitlines()
    split.write_text("\n".join(line.replace(" test", " train") if "/wrench/" in line else line for line in text) + "\n")
    with pytest.warns(UserWarning, match=r"has no images of classes \['wrench'\]"):
        build_dataset("caltech101", tmp_path, "test")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_dataset("caltech101", tmp_path, "train")


def test_a_fashion_mnist_folder_missing_one_of_its_files_is_refused_not_swapped_for_another_copy(tmp_path):
    # An interrupted copy under root was passed over for the next candidate (the system's full set): another
    # dataset than the user's, trained on without a word.
    from fixtures_data import write_fashion_mnist

    raw = tmp_path / "FashionMNIST" / "raw"
    write_fashion_mnist(raw, 40, 20, gz=True)
    assert len(build_dataset("fashion_mnist", tmp_path, "train")) == 40
    (raw / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"holds 3 of Fashion-MNIST's 4 files; missing: "
                                                   r"t10k-labels-idx1-ubyte"):
        build_dataset("fashion_mnist", tmp_path, "train")
