"""Data edge cases: non-UTF-8 file names and the locale, repeated or shared images in a split listing, symbolic links
that reach an image twice, tRNS transparency and EXIF orientation."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures_data import write_cub, write_food101, write_imagefolder
from PIL import Image, ImageOps, PngImagePlugin

import nola_vision
from nola_vision.data import FewShotDataModule, build_dataset, read_manifest, sample_kshot, write_manifest
from nola_vision.data.datasets import DatasetMetadataError, ImageDataset
from nola_vision.data.fewshot import manifest_settings

LATIN1_NAME = b"caf\xe9.png"  # "cafe" with an acute e in Latin-1 bytes, as from an old zip or Windows share


def _png(path: str | bytes, value: int = 0) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    info = PngImagePlugin.PngInfo()  # the same pixels in other files are other bytes: not copies of one image
    info.add_text("fixture", ascii(path))
    Image.new("RGB", (8, 6), (value, 60, 90)).save(os.fsdecode(path), format="PNG", pnginfo=info)


def test_a_non_utf8_file_name_is_written_to_the_manifest_and_replayed(tmp_path):
    write_imagefolder(tmp_path, classes=("a", "b"), train_per_class=2, eval_per_class=1, eval_folder="test")
    for name in (b"a", b"b"):
        _png(os.path.join(os.fsencode(tmp_path), b"train", name, LATIN1_NAME))
    dm = FewShotDataModule("imagefolder", root=str(tmp_path), shots=0, split_dir=str(tmp_path / "splits"),
                           image_size=16, augment="none")  # shots=0: every train image, so the manifest lists it
    dm.setup("fit")
    entries = read_manifest(dm.manifest_path)
    assert sorted(entries) == sorted(dm.train_manifest)
    assert "train/a/caf\udce9.png" in {key for key, _ in entries}  # the file's bytes, as Python names it
    assert manifest_settings(dm.manifest_path)["shots"] == "0"
    replay = FewShotDataModule("imagefolder", root=str(tmp_path), split_file=str(dm.manifest_path), image_size=16,
                               augment="none")
    replay.setup("fit")
    assert sorted(replay.train_manifest) == sorted(dm.train_manifest)


# The child imports the two modules alone, as bare packages (the package's __init__ loads the training stack: seconds).
_CHILD = """
import json, sys, types
for name, folder in (("nola_vision", ""), ("nola_vision.core", "core"), ("nola_vision.data", "data")):
    sys.modules[name] = types.ModuleType(name)
    sys.modules[name].__path__ = [f"{sys.argv[3]}/{folder}"]
from nola_vision.data.datasets import build_dataset
from nola_vision.data.fewshot import indices_from_manifest, read_manifest, sample_kshot
ds = build_dataset("imagefolder", sys.argv[1], "train")
replayed = indices_from_manifest(ds.samples, read_manifest(sys.argv[2]))
print(json.dumps({"encoding": sys.getfilesystemencoding(), "classes": ds.class_names,
                  "draw": [ds.samples[i][0] for i in sample_kshot(ds.samples, 3).train],
                  "size": ds.load_image(replayed[0]).size}))
"""


def _latin1_locale(folder: Path) -> dict[str, str]:
    """Environment variables selecting a Latin-1 locale, built into ``folder`` (skips the test where it cannot be)."""
    if shutil.which("localedef") is None:
        pytest.skip("localedef is not installed: no Latin-1 locale can be built")
    done = subprocess.run(["localedef", "-i", "en_US", "-f", "ISO-8859-1", str(folder / "en_US.ISO-8859-1")],
                          capture_output=True, text=True)
    if not (folder / "en_US.ISO-8859-1").is_dir():
        pytest.skip(f"localedef cannot build en_US.ISO-8859-1 (locale sources missing?): {done.stderr.strip()}")
    return {"LOCPATH": str(folder), "LC_ALL": "en_US.ISO-8859-1", "LANG": "en_US.ISO-8859-1", "PYTHONUTF8": "0"}


def test_the_kshot_draw_and_its_manifest_do_not_depend_on_the_locale(tmp_path):
    root = tmp_path / "data"
    for label, name in enumerate(("\u00e9t\u00e9", "hiver")):  # a UTF-8 class folder name, "ete" with accents
        for i in range(8):
            _png(str(root / "train" / name / f"photo_{i}_\u00e9t\u00e9.png"), label)
        _png(str(root / "test" / name / "x.png"), label)
    ds = build_dataset("imagefolder", root, "train")
    split = sample_kshot(ds.samples, 3)
    manifest = write_manifest(tmp_path / "m.txt", ds.samples, split.train)
    (tmp_path / "locales").mkdir()
    env = {**os.environ, **_latin1_locale(tmp_path / "locales")}
    package = os.path.dirname(nola_vision.__file__)
    done = subprocess.run([sys.executable, "-c", _CHILD, str(root), str(manifest), package], env=env,
                          capture_output=True, text=True, check=True)
    child = json.loads(done.stdout)  # ASCII: json escapes every other character
    if child["encoding"] != "iso8859-1":
        pytest.skip(f"the Latin-1 locale was not applied (file system encoding {child['encoding']})")
    assert child["draw"] == [ds.samples[i][0] for i in split.train]
    assert child["classes"] == ds.class_names == ["hiver", "\u00e9t\u00e9"]
    assert child["size"] == [8, 6]  # a key's file opens under the Latin-1 locale too


def _food(tmp_path: Path, edit) -> Path:
    folder = write_food101(tmp_path, train_per_class=2, test_per_class=1)["folder"]
    meta = {split: json.loads((folder / "meta" / f"{split}.json").read_text()) for split in ("train", "test")}
    edit(meta)
    for split, listed in meta.items():
        (folder / "meta" / f"{split}.json").write_text(json.dumps(listed))
    return folder


@pytest.mark.parametrize("split", ["train", "test"])
def test_food101_refuses_an_image_listed_twice_in_one_split(tmp_path, split):
    folder = _food(tmp_path, lambda meta: meta["train"]["food_000"].append(meta["train"]["food_000"][0]))
    with pytest.raises(DatasetMetadataError, match=rf"{folder / 'meta' / 'train.json'}: 'food_000/\d+' is listed "
                                                   "twice"):
        build_dataset("food101", tmp_path, split)


def test_food101_refuses_an_image_in_both_train_and_test(tmp_path):
    folder = _food(tmp_path, lambda meta: meta["test"]["food_001"].append(meta["train"]["food_001"][0]))
    with pytest.raises(DatasetMetadataError, match=rf"train.json: '(food_001/\d+)' and {folder}/meta/test.json: '\1' "
                                                   "are the same image"):
        build_dataset("food101", tmp_path, "train")


def test_cub_refuses_one_file_named_by_two_image_ids(tmp_path):
    folder = write_cub(tmp_path, train_per_class=1, test_per_class=1)["folder"]
    lines = (folder / "images.txt").read_text().splitlines()
    first = lines[0].split(" ", 1)[1]
    n = len(lines) + 1
    for name, line in (("images.txt", f"{n} {first}"), ("image_class_labels.txt", f"{n} 1"),
                       ("train_test_split.txt", f"{n} 0")):  # a train image again, as a test image
        with open(folder / name, "a") as f:
            f.write(line + "\n")
    with pytest.raises(DatasetMetadataError, match=rf"image id 1 '{first}' \(train\) and .*images.txt: image id {n} "
                                                   rf"'{first}' \(test\) are the same image"):
        build_dataset("cub200", tmp_path, "test")


@pytest.mark.parametrize("link, target, split", [
    ("train/cat/more", "../dog", "train"),  # dog's images would come back labelled cat
    ("train/cat/extra", "../../test/cat", "test"),  # test images would be trained on
], ids=["into-another-class", "into-the-test-split"])
def test_imagefolder_refuses_a_symlink_that_reaches_an_image_twice(tmp_path, link, target, split):
    write_imagefolder(tmp_path, classes=("cat", "dog"), train_per_class=2, eval_per_class=1, eval_folder="test")
    os.symlink(target, tmp_path / link)
    with pytest.raises(DatasetMetadataError, match=rf"{tmp_path / link}/\w+ 00.png and {tmp_path}/\S+/\w+ 00.png are "
                                                   "the same image.*Remove the symbolic link"):
        build_dataset("imagefolder", tmp_path, split)


@pytest.mark.parametrize("mode, key", [("RGB", (0, 0, 0)), ("L", 0), ("I;16", 0)])
def test_a_transparent_colour_key_is_composited_over_white(tmp_path, mode, key):
    pixels = np.zeros((8, 8), np.uint16 if mode == "I;16" else np.uint8)
    pixels[2:6, 2:6] = 40000 if mode == "I;16" else 200
    image = Image.fromarray(np.stack([pixels] * 3, -1) if mode == "RGB" else pixels)
    image.save(tmp_path / "key.png", transparency=key)
    loaded = ImageDataset("t", tmp_path, "train", [("key.png", 0)], ["x"]).load_image(0)
    assert loaded.getpixel((0, 0)) == (255, 255, 255) and loaded.getpixel((3, 3)) != (255, 255, 255)


def test_the_colour_key_of_a_16_bit_rgb_png_is_composited_over_white(tmp_path):
    # Pillow reads the pixels' high bytes but keeps the key's 16 bits, so no pixel matched it: the key colour stayed
    import struct
    import zlib

    pixels = np.full((4, 4, 3), 30000, ">u2")
    pixels[1:3, 1:3] = 60000
    rows = b"".join(b"\x00" + row.tobytes() for row in pixels)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 4, 4, 16, 2, 0, 0, 0)  # 4x4, 16 bits per channel, RGB
    (tmp_path / "key.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                                       + chunk(b"tRNS", struct.pack(">HHH", 30000, 30000, 30000))
                                       + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    loaded = ImageDataset("t", tmp_path, "train", [("key.png", 0)], ["x"]).load_image(0)
    assert loaded.getpixel((0, 0)) == (255, 255, 255) and loaded.getpixel((1, 1)) == (60000 >> 8,) * 3


def test_the_exif_orientation_turns_an_image_upright(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)  # stored landscape, as a phone's sensor records a portrait photo
    pixels[:, :4] = 255  # a white band on the stored left edge: the top once turned 90 degrees clockwise
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    loaded = ImageDataset("t", tmp_path, "train", [("phone.jpg", 0)], ["x"]).load_image(0)
    assert loaded.size == (20, 40)
    assert min(loaded.getpixel((10, 1))) > 200 and max(loaded.getpixel((10, 38))) < 50


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_turns_the_image_as_pillows_transpose_does(tmp_path, orientation):
    pixels = np.random.default_rng(orientation).integers(0, 255, (6, 10, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(tmp_path / "x.png", exif=exif)
    with Image.open(tmp_path / "x.png") as stored:
        expected = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"))
    loaded = ImageDataset("t", tmp_path, "train", [("x.png", 0)], ["x"]).load_image(0)
    assert np.array_equal(np.asarray(loaded), expected)


def test_an_image_whose_exif_block_pillow_cannot_write_back_loads_turned_upright(tmp_path):
    """exif_transpose rewrites the EXIF block after turning the image, which failed with a bare struct.error on a
    camera's malformed tag (an unknown TIFF type), though the pixels decode: the image (and the split) failed."""
    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, "Cam"  # orientation 6 and the camera's make
    raw = bytearray(exif.tobytes())
    raw[17] = 32  # the make's TIFF type: ASCII (2) -> an unknown type
    Image.new("RGB", (8, 6), (200, 10, 10)).save(tmp_path / "x.jpg", exif=bytes(raw))
    with Image.open(tmp_path / "x.jpg") as stored, pytest.raises(struct.error):
        ImageOps.exif_transpose(stored)
    loaded = ImageDataset("t", tmp_path, "train", [("x.jpg", 0)], ["x"]).load_image(0)
    assert loaded.size == (6, 8) and loaded.mode == "RGB"
