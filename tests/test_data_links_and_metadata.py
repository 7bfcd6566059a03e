"""What a dataset is made of: one file is one image however it is linked, broken links and foreign files are named,
not skipped or mistaken for the dataset, and the messages of the k-shot tools say what is wrong."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from fixtures_data import write_caltech101, write_cub, write_food101, write_imagefolder
from PIL import Image

from nola_vision.data import FewShotDataModule, build_dataset, sample_kshot, write_manifest
from nola_vision.data.datasets import (
    CALTECH101_CLASSES,
    FASHION_MNIST_SYSTEM_DIR,
    CorruptImageError,
    DatasetMetadataError,
    DatasetNotFoundError,
    ImageDataset,
)


def _caltech_with_its_own_names(root: Path, per_class: int = 5) -> Path:
    """The Caltech-101 fixture with the archive's folder names (the fixture's stand-ins renamed); its images folder."""
    info = write_caltech101(root, per_class=per_class)
    cats = info["folder"] / "101_ObjectCategories"
    stand_ins = [name for name in info["class_names"] if name not in CALTECH101_CLASSES]
    for stand_in, name in zip(stand_ins, sorted(CALTECH101_CLASSES - set(info["class_names"]))):
        (cats / stand_in).rename(cats / name)
    return cats


def _idx(array: np.ndarray) -> bytes:
    return struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_idx_set(folder: Path, train: np.ndarray, test: np.ndarray) -> None:
    """Uncompressed IDX files under Fashion-MNIST's names (labels 0..9 cycling)."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, images in (("train", train), ("t10k", test)):
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(images))
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx((np.arange(len(images)) % 10).astype(np.uint8)))


# ---------------------------------------------------------------- one file, one image

def test_a_training_image_hard_linked_into_the_test_split_is_refused_naming_both_paths(tmp_path):
    write_imagefolder(tmp_path, eval_folder="test")
    os.link(tmp_path / "train" / "cat" / "cat 00.png", tmp_path / "test" / "cat" / "leaked.png")
    for split in ("train", "test"):
        with pytest.raises(DatasetMetadataError, match=rf"{tmp_path}/train/cat/cat 00.png and {tmp_path}/test/cat/"
                                                       r"leaked.png are the same image.*hard link"):
            build_dataset("imagefolder", tmp_path, split)


def test_hard_links_within_a_class_are_refused_all_named_in_one_error(tmp_path):
    # a tree deduplicated with hard links (jdupes, rdfind) was refused one pair a run; within a class a link is drawn
    # as two shots of one image
    write_imagefolder(tmp_path, eval_folder="test")
    cats = tmp_path / "train" / "cat"
    for i in range(5):
        os.link(cats / "cat 00.png", cats / f"copy {i}.png")
    with pytest.raises(DatasetMetadataError, match=r"^5 image\(s\) listed twice: .*cat 00.png and .*copy 0.png are "
                                                   r"the same image; .* \(and 2 more\)\. Each image may be used once"):
        build_dataset("imagefolder", tmp_path, "train")


def test_a_symlink_and_a_hard_link_into_another_class_are_both_refused(tmp_path):
    write_imagefolder(tmp_path, eval_folder="test")
    os.symlink(tmp_path / "train" / "cat" / "cat 00.png", tmp_path / "train" / "dog" / "soft.png")
    with pytest.raises(DatasetMetadataError, match=r"are the same image"):
        build_dataset("imagefolder", tmp_path, "train")
    (tmp_path / "train" / "dog" / "soft.png").unlink()
    os.link(tmp_path / "train" / "cat" / "cat 00.png", tmp_path / "train" / "dog" / "hard.png")
    with pytest.raises(DatasetMetadataError, match=r"cat 00.png and .*dog/hard.png are the same image"):
        build_dataset("imagefolder", tmp_path, "train")


def test_a_caltech101_image_hard_linked_into_another_class_is_refused(tmp_path):
    cats = _caltech_with_its_own_names(tmp_path)
    os.link(cats / "Faces" / "image_0001.jpg", cats / "Leopards" / "image_0099.jpg")
    with pytest.raises(DatasetMetadataError, match=r"Faces/image_0001.jpg and .*Leopards/image_0099.jpg are the same"):
        build_dataset("caltech101", tmp_path, "train")


# ---------------------------------------------------------------- broken links are named, not skipped

def test_a_class_folder_that_is_a_broken_link_is_refused_naming_it_and_its_target(tmp_path):
    write_imagefolder(tmp_path, classes=("ant", "cat", "dog"), eval_folder="test")
    shutil.rmtree(tmp_path / "train" / "ant")
    os.symlink("/mnt/not_mounted/ant", tmp_path / "train" / "ant")  # an unmounted share: ant would vanish
    with pytest.raises(DatasetNotFoundError, match=rf"{tmp_path}/train/ant is a symbolic link to /mnt/not_mounted/ant"
                                                   r", which cannot be reached.*fix the link, or remove it"):
        build_dataset("imagefolder", tmp_path, "train")
    with pytest.raises(DatasetNotFoundError, match=r"train/ant is a symbolic link"):
        FewShotDataModule("imagefolder", root=str(tmp_path), shots=1)  # the class count, known at construction


def test_a_broken_link_among_the_images_is_refused_in_imagefolder_and_caltech101(tmp_path):
    write_imagefolder(tmp_path / "folder", eval_folder="test")
    os.symlink("/nonexistent/img.png", tmp_path / "folder" / "test" / "dog" / "gone.png")
    with pytest.raises(DatasetNotFoundError, match=r"test/dog/gone.png is a symbolic link to /nonexistent/img.png"):
        build_dataset("imagefolder", tmp_path / "folder", "test")
    cats = _caltech_with_its_own_names(tmp_path / "caltech")
    os.symlink("/nonexistent/img.jpg", cats / "Faces" / "image_9999.jpg")
    with pytest.raises(DatasetNotFoundError, match=r"Faces/image_9999.jpg is a symbolic link to /nonexistent/img.jpg"):
        build_dataset("caltech101", tmp_path / "caltech", "train")


def test_a_held_out_folder_that_is_a_broken_link_is_not_replaced_by_val(tmp_path):
    write_imagefolder(tmp_path, eval_folder="val")
    os.symlink("/mnt/not_mounted/test", tmp_path / "test")
    with pytest.raises(DatasetNotFoundError, match=rf"{tmp_path}/test is a symbolic link"):
        build_dataset("imagefolder", tmp_path, "test")


# ---------------------------------------------------------------- Fashion-MNIST is Fashion-MNIST

def test_idx_files_of_other_than_28x28_images_are_not_read_as_fashion_mnist(tmp_path):
    _write_idx_set(tmp_path, np.zeros((20, 8, 8), np.uint8), np.zeros((10, 8, 8), np.uint8))
    with pytest.raises(DatasetMetadataError, match=r"train-images-idx3-ubyte holds 8x8 images, but Fashion-MNIST's are "
                                                   r"28x28.*dataset-fashion-mnist"):
        build_dataset("fashion_mnist", tmp_path, "train")


@pytest.mark.parametrize("gz", [False, True])
def test_a_full_size_test_set_that_is_not_fashion_mnist_is_refused(tmp_path, gz):
    _write_idx_set(tmp_path, np.zeros((20, 28, 28), np.uint8), np.ones((10000, 28, 28), np.uint8))
    if gz:  # the digest is of the decompressed bytes: a .gz copy is judged alike
        for path in list(tmp_path.iterdir()):
            path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes(), compresslevel=1))
            path.unlink()
    with pytest.raises(DatasetMetadataError, match=r"t10k-images-idx3-ubyte(.gz)? is not Fashion-MNIST's "
                                                   r"t10k-images-idx3 file.*MNIST and KMNIST.*"
                                                   r"github.com/zalandoresearch/fashion-mnist"):
        build_dataset("fashion_mnist", tmp_path, "test")
    assert len(build_dataset("fashion_mnist", tmp_path, "train")) == 20  # a subset cannot be verified: read as before


@pytest.mark.skipif(not Path(FASHION_MNIST_SYSTEM_DIR, "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="apt-get install dataset-fashion-mnist to run this")
def test_decompressed_copies_of_the_real_fashion_mnist_files_verify(tmp_path):
    system = Path(FASHION_MNIST_SYSTEM_DIR)
    for kind in ("images-idx3", "labels-idx1"):
        (tmp_path / f"t10k-{kind}-ubyte").write_bytes(gzip.decompress((system / f"t10k-{kind}-ubyte.gz").read_bytes()))
        (tmp_path / f"train-{kind}-ubyte").write_bytes(_idx(np.zeros((3,) + (28, 28) * (kind[0] == "i"), np.uint8)))
    assert len(build_dataset("fashion_mnist", tmp_path, "test")) == 10000


# ---------------------------------------------------------------- tool metadata is not data

@pytest.mark.parametrize("folder", ["@eaDir", "__MACOSX"])
def test_nas_thumbnails_and_zip_resource_forks_are_not_images_or_classes(tmp_path, folder):
    write_imagefolder(tmp_path, classes=("cat", "dog"), train_per_class=4, eval_folder="test")
    for name in ("cat", "dog"):
        thumbs = tmp_path / "train" / name / folder / f"{name} 00.png"
        thumbs.mkdir(parents=True)
        Image.new("RGB", (8, 6)).save(thumbs / "SYNOPHOTO_THUMB_M.jpg")
    (tmp_path / "train" / folder).mkdir()  # at the class level too: not a class
    Image.new("RGB", (8, 6)).save(tmp_path / "train" / folder / "x.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even named as unread images
        train = build_dataset("imagefolder", tmp_path, "train")
    assert train.class_names == ["cat", "dog"] and len(train) == 8
    assert not any(folder in key for key, _ in train.samples)


# ---------------------------------------------------------------- names a manifest can hold

@pytest.mark.parametrize("line_break", ["\n", "\r"])
def test_an_image_name_with_a_line_break_is_refused_when_the_dataset_is_listed(tmp_path, line_break):
    write_imagefolder(tmp_path, classes=("cat", "dog"), train_per_class=2, eval_folder="test")
    (tmp_path / "train" / "cat" / "cat 00.png").rename(tmp_path / "train" / "cat" / f"cat{line_break}00.png")
    with pytest.raises(DatasetMetadataError, match=r"'.*cat\\[nr]00.png': a file or folder name with a line break.*"
                                                   r"Rename it"):
        build_dataset("imagefolder", tmp_path, "train")


def test_a_food101_image_name_with_a_line_break_is_refused(tmp_path):
    folder = write_food101(tmp_path, train_per_class=1, test_per_class=1)["folder"]
    meta = json.loads((folder / "meta" / "train.json").read_text())
    meta["food_000"] = ["food_000/1\n2"]
    (folder / "meta" / "train.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetMetadataError, match=r"line break"):
        build_dataset("food101", tmp_path, "train")


# ---------------------------------------------------------------- each dataset's own consistency

def test_a_cub_label_that_is_not_its_image_folders_class_is_refused_naming_both(tmp_path):
    folder = write_cub(tmp_path, train_per_class=1, test_per_class=1)["folder"]
    lines = (folder / "image_class_labels.txt").read_text().splitlines()
    lines[0] = "1 2"  # image 1 lies under 001.Bird_001
    (folder / "image_class_labels.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetMetadataError, match=r"image id 1 \('001.Bird_001/.*'\) has class 2 \('002.Bird_002'\), "
                                                   r"but images.txt puts it in the folder of class '001.Bird_001'"):
        build_dataset("cub200", tmp_path, "train")


def test_caltech101_with_its_class_count_but_other_folder_names_is_refused(tmp_path):
    cats = _caltech_with_its_own_names(tmp_path, per_class=2)
    assert build_dataset("caltech101", tmp_path, "train").num_classes == 101  # its own names: read
    (tmp_path / "caltech101" / "nola_vision_split.txt").unlink()
    (cats / "Leopards").rename(cats / "leopards_2")
    with pytest.raises(DatasetMetadataError, match=r"holds 101 class folders, as Caltech-101 has, but 1 are not its "
                                                   r"categories \('leopards_2'\) and 1 of its categories are missing "
                                                   r"\('Leopards'\)"):
        build_dataset("caltech101", tmp_path, "train")


def test_caltech101_names_the_images_it_does_not_read(tmp_path):
    cats = _caltech_with_its_own_names(tmp_path)
    Image.new("RGB", (8, 8)).save(cats / "Faces" / "extra.gif")
    (cats / "Faces" / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(cats / "Faces" / "sub" / "x.jpg")
    with pytest.warns(UserWarning, match=r"2 image file\(s\) under .*101_ObjectCategories are not read \(Faces/"
                                         r"extra.gif, Faces/sub/x.jpg\).*<class>/ \(not its sub-folders\)"):
        train = build_dataset("caltech101", tmp_path, "train")
    assert len(train) == 101 * 4  # the same split as without them
    for image in (cats / "Leopards").glob("*.jpg"):  # a class left with no image it reads: refused
        Image.open(image).save(image.with_suffix(".gif"))
        image.unlink()
    (tmp_path / "caltech101" / "nola_vision_split.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"Leopards/image_0001.gif"):
        build_dataset("caltech101", tmp_path, "train")


def test_a_food101_class_without_test_images_is_named_in_a_warning(tmp_path):
    folder = write_food101(tmp_path)["folder"]
    meta = json.loads((folder / "meta" / "test.json").read_text())
    meta["food_000"] = []
    (folder / "meta" / "test.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=r"test.json has no images of classes \['food_000'\]: its accuracy covers"):
        assert len(build_dataset("food101", tmp_path, "test")) == 100


# ---------------------------------------------------------------- messages that say what is wrong

def test_an_image_over_pils_size_limit_is_called_large_not_corrupt(tmp_path):
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", 20000, 10000)  # a 200-megapixel header, as of a large scan
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    (tmp_path / "big.png").write_bytes(bytes(data))
    with pytest.raises(CorruptImageError, match=r"big.png .* is larger than PIL's limit .*Image.MAX_IMAGE_PIXELS.*"
                                                r"resize the image \(the only way from the command line\), or, from "
                                                r"Python, raise the limit") as err:
        ImageDataset("t", tmp_path, "train", [("big.png", 0)], ["a"]).load_image(0)
    assert "download" not in str(err.value)


def test_a_manifest_of_another_dataset_is_refused_naming_both(tmp_path):
    digits = FewShotDataModule("digits", shots=1, split_dir=str(tmp_path / "splits"), image_size=8)
    digits.setup("fit")
    write_imagefolder(tmp_path / "folder", classes=("cat", "dog"), eval_folder="test")
    mine = FewShotDataModule("imagefolder", root=str(tmp_path / "folder"), split_file=str(digits.manifest_path),
                             image_size=8)
    with pytest.raises(ValueError, match=r"is a manifest of dataset 'digits' .*but this data module reads "
                                         r"'imagefolder'"):
        mine.setup("fit")


def test_a_manifest_without_a_dataset_header_is_still_replayed(tmp_path):
    write_imagefolder(tmp_path, classes=("cat", "dog"), eval_folder="test")
    samples = build_dataset("imagefolder", tmp_path, "train").samples
    write_manifest(tmp_path / "old.txt", samples, [0, 4], header="k-shot manifest: shots=1 split_seed=0")
    replay = FewShotDataModule("imagefolder", root=str(tmp_path), split_file=str(tmp_path / "old.txt"), image_size=8)
    replay.setup("fit")
    assert replay.train_manifest == [samples[0], samples[4]]


@pytest.mark.parametrize("seed", [3.0, np.float64(3), True, "3"])
def test_sample_kshot_refuses_a_seed_that_is_not_an_integer(seed):
    samples = [(f"train/{i:05d}", i % 3) for i in range(30)]
    with pytest.raises(TypeError, match=r"seed must be an integer"):
        sample_kshot(samples, 2, seed=seed)
    assert sample_kshot(samples, 2, seed=np.int64(3)) == sample_kshot(samples, 2, seed=3)


def test_sample_kshot_refuses_labels_beyond_its_class_names():
    samples = [(f"train/{i:05d}", i % 3) for i in range(30)]
    with pytest.raises(ValueError, match=r"labels \[2\] are not classes 0..1"):
        sample_kshot(samples, 0, class_names=["a", "b"])


def test_cache_mb_zero_means_no_cache_and_no_warning(tmp_path, monkeypatch):
    write_imagefolder(tmp_path, classes=("cat", "dog"), eval_folder="test")
    dm = FewShotDataModule("imagefolder", root=str(tmp_path), shots=2, cache_mb=0, image_size=8)
    monkeypatch.setattr(ImageDataset, "load_image", lambda self, i: pytest.fail("decoded for a cache of 0 MB"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm.setup("fit")
    assert dm.train_set.cache == {}
