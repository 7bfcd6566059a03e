"""Training and validation images that cannot be read (empty, cut short, unreadable, a named pipe) are refused when the
split is set up, naming the file, before anything decodes, caches or trains on them; nothing opens a named pipe."""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal

import numpy as np
import pytest
from fixtures_data import write_cub, write_imagefolder
from PIL import Image

from nola_vision.data import CorruptImageError, DatasetMetadataError, FewShotDataModule, build_dataset
from nola_vision.data.datasets import ImageDataset

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")


@contextlib.contextmanager
def fails_rather_than_hangs(seconds: int = 20):
    """Turn a read that blocks (a named pipe opened without a writer) into a failure, rather than a hung test."""
    def stop(*_):
        raise TimeoutError(f"blocked for {seconds} s: something opened the named pipe")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def folder_root(tmp_path):
    write_imagefolder(tmp_path / "pets", train_per_class=6, eval_per_class=2, eval_folder="test")
    return tmp_path / "pets"


@pytest.mark.parametrize("shots, val_shots", [(0, 0), (0, 2), (2, 2)])
def test_an_empty_training_or_validation_image_is_refused_at_setup_naming_it_without_decoding(
        folder_root, monkeypatch, shots, val_shots):
    # shots=0 reads the train split from disk during training: a 0-byte image stopped a CLI fit mid-epoch, nothing
    # saved (the test split alone was stat-checked up front)
    dm = FewShotDataModule("imagefolder", root=str(folder_root), shots=shots, val_shots=val_shots, image_size=8,
                           cache_images=False)
    dm.setup("fit")
    drawn = dm.val_manifest if val_shots else dm.train_manifest
    empty = folder_root / drawn[0][0]
    empty.write_bytes(b"")
    decoded = []
    monkeypatch.setattr(ImageDataset, "load_image", lambda self, index: decoded.append(index))
    again = FewShotDataModule("imagefolder", root=str(folder_root), shots=shots, val_shots=val_shots, image_size=8)
    with pytest.raises(CorruptImageError, match=rf"{empty} is empty \(0 bytes.*Copy them again") as error:
        again.setup("fit")
    assert "training and validation images of imagefolder" in str(error.value)
    assert error.value.before_run and not decoded  # a refusal before the run (CLI exit 2); a stat, no decoding
    assert again.split is None and again.train_set is None


@pytest.mark.parametrize("form", ["PNG", "JPEG"])
def test_an_image_cut_short_is_refused_at_setup_and_one_with_data_after_its_end_is_read(folder_root, form,
                                                                                        monkeypatch):
    """An interrupted copy leaves a file cut short, rarely an empty one: with shots=0 it passed the setup check and
    stopped the fit mid-epoch ("image file is truncated") with nothing saved."""
    settings = dict(root=str(folder_root), shots=0, image_size=8, cache_images=False)
    dm = FewShotDataModule("imagefolder", **settings)
    dm.setup("fit")
    path = folder_root / dm.train_manifest[0][0]
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noise.save(buffer, format=form)
    whole = buffer.getvalue()
    path.write_bytes(whole + bytes(200))  # data after the end marker, as a phone's motion photo appends a video
    with monkeypatch.context() as patched:  # found whole by its marker, not by decoding it
        opened, real_open = [], Image.open
        patched.setattr(Image, "open", lambda file, *args: opened.append(file) or real_open(file, *args))
        FewShotDataModule("imagefolder", **settings).setup("fit")
        assert not [file for file in opened if str(file) == str(path)]
    path.write_bytes(whole[:len(whole) * 6 // 10])
    with pytest.raises(CorruptImageError, match=rf"{re.escape(str(path))} is cut short \(its \d+ bytes end before "
                                                r"the image does: an interrupted copy"):
        FewShotDataModule("imagefolder", **settings).setup("fit")
    if form == "JPEG":  # an EXIF thumbnail's end marker, in the header, does not stand for the image's
        thumbnail = io.BytesIO()
        noise.resize((8, 8)).save(thumbnail, format="JPEG")
        exif = b"Exif\0\0" + thumbnail.getvalue()
        with_thumbnail = whole[:2] + b"\xff\xe1" + (2 + len(exif)).to_bytes(2, "big") + exif + whole[2:]
        path.write_bytes(with_thumbnail[:len(with_thumbnail) * 6 // 10])
        with pytest.raises(CorruptImageError, match="is cut short"):
            FewShotDataModule("imagefolder", **settings).setup("fit")
        path.write_bytes(with_thumbnail)
        FewShotDataModule("imagefolder", **settings).setup("fit")


def test_a_web_page_saved_under_an_images_name_is_refused_at_setup_and_images_of_other_formats_are_read(
        folder_root):
    # a scraper's HTML saved as .jpg passed the checks (no image end marker to look for) and stopped a shots=0 fit
    # mid-epoch, and a test image only after training
    settings = dict(root=str(folder_root), shots=0, image_size=8, cache_images=False)
    dm = FewShotDataModule("imagefolder", **settings)
    dm.setup("fit")
    paths = [folder_root / key for key, _ in dm.train_manifest[:3]]
    formats = iter(["BMP", "TIFF", "WEBP"])  # a PNG's name may hold other formats PIL reads: they train
    for path in paths:
        Image.new("RGB", (8, 8), "red").save(path, format=next(formats))
    FewShotDataModule("imagefolder", **settings).setup("fit")
    paths[0].write_text("<!DOCTYPE html><html><body>Rate limited</body></html>")
    with pytest.raises(CorruptImageError, match=rf"{re.escape(str(paths[0]))} is not an image: no image format "
                                                r"begins as it does \(b'<!DOCTYP'\.\.\.: a web page"):
        FewShotDataModule("imagefolder", **settings).setup("fit")


def test_an_unreadable_image_that_is_not_drawn_is_not_refused(folder_root):
    dm = FewShotDataModule("imagefolder", root=str(folder_root), shots=1, image_size=8)
    dm.setup("fit")
    undrawn = next(key for key, _ in dm.train_set.dataset.samples if (key, _) not in dm.train_manifest)
    (folder_root / undrawn).write_bytes(b"")
    FewShotDataModule("imagefolder", root=str(folder_root), shots=1, image_size=8).setup("fit")


@needs_fifo
def test_a_named_pipe_named_as_an_image_is_refused_when_listed_naming_it(folder_root):
    # listed as a sample, and Image.open on it blocked forever (at setup, when drawn and cached)
    pipe = folder_root / "train" / "cat" / "pipe.jpg"
    os.mkfifo(pipe)
    with fails_rather_than_hangs():
        for read in (lambda: build_dataset("imagefolder", folder_root, "train"),
                     lambda: build_dataset("imagefolder", folder_root, "test"),
                     lambda: FewShotDataModule("imagefolder", root=str(folder_root), shots=0,
                                               image_size=8).setup("fit")):
            with pytest.raises(DatasetMetadataError, match=rf"{pipe} is not a regular file \(a named pipe"):
                read()
    os.unlink(pipe)
    os.mkfifo(folder_root / "train" / "cat" / "notes")  # not an image name: not read, not opened
    with fails_rather_than_hangs():
        assert len(build_dataset("imagefolder", folder_root, "train")) == 18


@needs_fifo
def test_a_named_pipe_a_datasets_metadata_lists_is_never_opened(tmp_path):
    # CUB lists its images in images.txt: a named pipe there was opened by load_image, and blocked
    info = write_cub(tmp_path, num_classes=200, train_per_class=1, test_per_class=1)
    dataset = build_dataset("cub200", tmp_path, "test")
    path = dataset.path_of(dataset.samples[0][0])
    path.unlink()
    os.mkfifo(path)
    assert info["folder"] in path.parents
    with fails_rather_than_hangs():
        assert build_dataset("cub200", tmp_path, "test").unreadable_files() == [path]
        with pytest.raises(CorruptImageError, match=rf"cannot read image {path} .*not a regular file"):
            dataset.load_image(0)
