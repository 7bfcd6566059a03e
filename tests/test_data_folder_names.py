"""ImageFolder names a user can get wrong without seeing it: class folders whose names differ only in Unicode
normalization, a val/ folder beside test/, and a data root written with ``~``."""

from __future__ import annotations

import unicodedata
import warnings
from pathlib import Path

import pytest
from fixtures_data import class_color, write_imagefolder
from PIL import Image

from nola_vision.data import (
    DatasetMetadataError,
    DatasetNotFoundError,
    FewShotDataModule,
    build_dataset,
    dataset_class_names,
    dataset_num_classes,
)
from nola_vision.data.datasets import expand_root

NFC = "caf\u00e9"  # as Linux and Windows tools write it: one code point for the accented e
NFD = "cafe\u0301"  # as macOS writes it: e, then a combining acute accent


def _class_folder(root: Path, split: str, name: str, label: int, images: int = 2) -> None:
    for j in range(images):
        path = root / split / name / f"{j:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 6), class_color(label)).save(path)


def _folder(root: Path, train: tuple[str, ...], test: tuple[str, ...]) -> Path:
    for split, names in (("train", train), ("test", test)):
        for label, name in enumerate(names):
            _class_folder(root, split, name, label)
    return root


# ---------------------------------------------------------------- Unicode normalization of class folder names

def test_the_fixture_names_look_alike_but_are_two_folders(tmp_path):
    assert unicodedata.normalize("NFC", NFD) == NFC and NFD != NFC
    _folder(tmp_path, train=(NFC, NFD, "tea"), test=(NFC, "tea"))
    assert len(list((tmp_path / "train").iterdir())) == 3  # the file system keeps both spellings apart


def test_class_folders_that_differ_only_in_unicode_normalization_are_refused_naming_both(tmp_path):
    # one real class became two labels with identical-looking names: ['café', 'café', 'tea'], without a word
    _folder(tmp_path, train=(NFC, NFD, "tea"), test=(NFC, "tea"))
    for read in (lambda: build_dataset("imagefolder", tmp_path, "train"),
                 lambda: build_dataset("imagefolder", tmp_path, "test"),
                 lambda: dataset_num_classes("imagefolder", tmp_path),
                 lambda: dataset_class_names("imagefolder", tmp_path),
                 lambda: FewShotDataModule("imagefolder", root=str(tmp_path), shots=1, image_size=8)):
        with pytest.raises(DatasetMetadataError) as err:
            read()
        message = str(err.value)
        assert ascii(NFC) in message and ascii(NFD) in message  # 'caf\xe9' and 'cafe\u0301': the difference shows
        assert "differ only in Unicode normalization" in message and "NFC/NFD" in message and "macOS" in message
        assert "rename" in message and "merge" in message.lower()
    # refused, never merged or renamed behind the user's back
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == sorted([NFC, NFD, "tea"])


def test_a_macos_copy_of_a_tree_gives_every_class_the_label_it_has_on_linux(tmp_path):
    # sorted as they were spelled, NFD 'e' + accent came before 'f' and NFC 'é' after 'g': the same images, the same
    # seed, and every label of the copy another (a checkpoint refused on it, a manifest unreplayable)
    NFC_ETE, NFD_ETE = "\u00e9t\u00e9", "e\u0301te\u0301"
    linux = _folder(tmp_path / "linux", train=("f", NFC_ETE, "g"), test=("f", NFC_ETE, "g"))
    macos = _folder(tmp_path / "macos", train=("f", NFD_ETE, "g"), test=("f", NFD_ETE, "g"))
    assert build_dataset("imagefolder", linux, "train").class_names == ["f", "g", NFC_ETE]
    for split in ("train", "test"):
        assert build_dataset("imagefolder", macos, split).class_names == ["f", "g", NFD_ETE]
    assert [label for _, label in build_dataset("imagefolder", macos, "train").samples] == \
        [label for _, label in build_dataset("imagefolder", linux, "train").samples]


def _accented_tree(root: Path, form: str) -> Path:
    """Two classes with accented names holding images with accented names, all spelled in ``form`` (NFC or NFD)."""
    for split, count in (("train", 4), ("test", 2)):
        for label, name in enumerate(["caf\u00e9", "th\u00e9"]):
            folder = root / split / unicodedata.normalize(form, name)
            folder.mkdir(parents=True)
            for j in range(count):
                image = Image.new("RGB", (8, 6), class_color(label + 3 * j))
                image.save(folder / unicodedata.normalize(form, f"r\u00e9sum\u00e9 {j}.png"))
    return root


def test_a_macos_copy_passes_the_checks_of_a_run_made_on_linux(tmp_path):
    # the copy drew the same images with the same labels, yet its digests differed and its names compared unequal:
    # the run's checkpoint was "trained on classes ['café', 'thé'], the data has ['café', 'thé']", a validate or resume
    # saw "the images changed", and the run's manifests would not replay on it
    import lightning as L

    import nola_vision as nv
    from nola_vision.runs.results import data_digests

    linux, macos = _accented_tree(tmp_path / "linux", "NFC"), _accented_tree(tmp_path / "macos", "NFD")
    splits = tmp_path / "splits"
    options = dict(shots=2, val_shots=1, augment="none", image_size=16, batch_size=4, split_seed=3,
                   backbone="vit_tiny_patch16_224")
    first = FewShotDataModule("imagefolder", root=str(linux), split_dir=str(splits), **options)
    first.setup("fit")
    copy = FewShotDataModule("imagefolder", root=str(macos), split_dir=str(splits), **options)
    copy.setup("fit")  # the Linux run's manifests in split_dir list its images: kept, not refused
    assert copy.split_digest == first.split_digest and copy.train_order_digest == first.train_order_digest
    assert data_digests("imagefolder", str(macos)) == data_digests("imagefolder", str(linux))
    replay = FewShotDataModule("imagefolder", root=str(macos), split_file=str(first.manifest_path),
                               val_split_file=str(first.val_manifest_path), augment="none", image_size=16,
                               backbone="vit_tiny_patch16_224")
    replay.setup("fit")
    assert replay.split_digest == first.split_digest
    assert [key for key, _ in replay.train_manifest] == [key for key, _ in copy.train_manifest]  # the copy's names

    model_options = dict(pretrained=False, image_size=16, lr=1e-3,
                         backbone_kwargs=dict(patch_size=8, depth=1, embed_dim=32, num_heads=2))
    adapter = nv.NOLAConfig(rank=2, num_basis_a=4, num_basis_b=4)
    trainer = L.Trainer(max_epochs=1, logger=False, accelerator="cpu", enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path / "run"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(nv.FewShotClassifier("vit_tiny_patch16_224", 2, adapter, **model_options), datamodule=first)
        checkpoint = trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path
        for check in ("test", "validate"):  # the same classes (test), the same k-shot draw (validate)
            again = FewShotDataModule("imagefolder", root=str(macos), **options)
            getattr(L.Trainer(logger=False, accelerator="cpu", enable_progress_bar=False), check)(
                nv.FewShotClassifier("vit_tiny_patch16_224", 2, adapter, **model_options), datamodule=again,
                ckpt_path=checkpoint)


def test_class_folders_that_differ_only_in_surrounding_whitespace_are_refused_naming_both(tmp_path):
    # 'cat' and 'cat ' (a trailing space from a script or a copy) became two classes, silently where test/ had both
    _folder(tmp_path, train=("cat", "cat ", "dog"), test=("cat", "cat ", "dog"))
    with pytest.raises(DatasetMetadataError) as err:
        build_dataset("imagefolder", tmp_path, "train")
    message = str(err.value)
    assert "'cat'" in message and "'cat '" in message and "differ only in surrounding whitespace" in message
    assert "Unicode" not in message
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["cat", "cat ", "dog"]


def test_held_out_class_folders_spelled_in_another_normalization_are_named_with_ascii(tmp_path):
    # train/ copied on Linux (NFC), test/ on macOS (NFD): the error read "test has class folders that train lacks:
    # ['café']", a name that looks like train's own
    _folder(tmp_path, train=(NFC, "tea"), test=(NFD, "tea"))
    assert build_dataset("imagefolder", tmp_path, "train").class_names == [NFC, "tea"]
    with pytest.raises(DatasetMetadataError, match="lacks") as err:
        build_dataset("imagefolder", tmp_path, "test")
    message = str(err.value)
    assert ascii(NFD) in message and ascii(NFC) in message and NFD not in message
    assert "differ only in Unicode normalization" in message and "rename" in message


def test_a_held_out_class_train_lacks_is_still_named_as_it_is(tmp_path):
    _folder(tmp_path, train=(NFC, "tea"), test=(NFC, "tea", "zebra"))
    with pytest.raises(ValueError, match=r"lacks: \['zebra'\]$"):
        build_dataset("imagefolder", tmp_path, "test")


@pytest.mark.parametrize("train_name, test_name", [("cat ", "cat"), ("cat", " cat"), ("cat\t", "cat")])
def test_held_out_class_folders_that_differ_only_in_surrounding_whitespace_are_named_with_a_hint(
        tmp_path, train_name, test_name):
    # train/'cat ' (a trailing space) beside test/cat read "test has class folders that train lacks: ['cat']", with
    # no word of the space that makes them two folders
    _folder(tmp_path, train=(train_name, "tea"), test=(test_name, "tea"))
    with pytest.raises(DatasetMetadataError, match="lacks") as err:
        build_dataset("imagefolder", tmp_path, "test")
    message = str(err.value)
    assert f"{ascii(test_name)} (train/ has {ascii(train_name)})" in message
    assert "differ only in surrounding whitespace" in message and "Unicode" not in message and "rename" in message


def test_held_out_names_that_differ_in_normalization_and_whitespace_say_both(tmp_path):
    _folder(tmp_path, train=(NFC + " ", "tea"), test=(NFD, "tea"))
    with pytest.raises(DatasetMetadataError, match="Unicode normalization .* and surrounding whitespace"):
        build_dataset("imagefolder", tmp_path, "test")


def test_names_in_one_normalization_are_kept_as_on_disk_and_open_their_files(tmp_path):
    _folder(tmp_path, train=(NFD, "tea"), test=(NFD, "tea"))
    for split in ("train", "test"):
        dataset = build_dataset("imagefolder", tmp_path, split)
        assert dataset.class_names == [NFD, "tea"]  # not renormalized: keys must open the real files
        assert dataset.samples[0] == (f"{split}/{NFD}/00.png", 0)
        assert dataset.load_image(0).getpixel((0, 0)) == class_color(0)


# ---------------------------------------------------------------- val/ beside test/

def test_a_val_folder_beside_test_is_named_as_not_read(tmp_path):
    write_imagefolder(tmp_path, eval_folder="test", train_per_class=2, eval_per_class=1)
    write_imagefolder(tmp_path, eval_folder="val", train_per_class=2, eval_per_class=1)
    with pytest.warns(UserWarning, match=r"val is not read") as record:
        dataset = build_dataset("imagefolder", tmp_path, "train")
    message = next(w for w in record if "val is not read" in str(w.message))
    assert message.filename == __file__  # names the caller's line
    assert "test/ is the held-out split" in str(message.message) and "--data.val_shots" in str(message.message)
    assert "val_split_file" in str(message.message) and "rename" in str(message.message)
    assert {key.split("/", 1)[0] for key, _ in dataset.samples} == {"train"}  # what is read stays as it was
    with warnings.catch_warnings():  # said once for a fit: its test build is quiet
        warnings.simplefilter("error")
        assert {key.split("/", 1)[0] for key, _ in build_dataset("imagefolder", tmp_path, "test").samples} == {"test"}


def test_a_val_folder_alone_is_the_held_out_split_without_a_warning(tmp_path):
    write_imagefolder(tmp_path, eval_folder="val", train_per_class=2, eval_per_class=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build_dataset("imagefolder", tmp_path, "test").samples[0][0].startswith("val/")
        build_dataset("imagefolder", tmp_path, "train")


def test_the_data_module_warns_that_val_is_not_read(tmp_path):
    write_imagefolder(tmp_path, eval_folder="test", train_per_class=3, eval_per_class=1)
    write_imagefolder(tmp_path, eval_folder="val", train_per_class=3, eval_per_class=1)
    dm = FewShotDataModule("imagefolder", root=str(tmp_path), shots=2, val_shots=1, image_size=8)
    with pytest.warns(UserWarning, match=r"val is not read"):
        dm.setup("fit")
    assert {key.split("/", 1)[0] for key, _ in dm.val_manifest} == {"train"}


# ---------------------------------------------------------------- ~ in the data root

@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_imagefolder(tmp_path / "imgs", eval_folder="test", train_per_class=3, eval_per_class=1)
    return tmp_path


def test_a_home_relative_root_is_read_by_every_entry_point(home):
    # build_dataset expanded ~, but FewShotDataModule failed: "dataset 'imagefolder' not found: expected ~/imgs/train"
    assert build_dataset("imagefolder", "~/imgs", "train").class_names == ["cat", "dog", "owl"]
    assert dataset_num_classes("imagefolder", "~/imgs") == 3
    assert dataset_class_names("imagefolder", "~/imgs") == ["cat", "dog", "owl"]
    dm = FewShotDataModule("imagefolder", root="~/imgs", shots=2, val_shots=1, image_size=8,
                           split_dir="~/splits")
    assert dm.num_classes == 3 and dm.class_names == ["cat", "dog", "owl"]
    assert dm.root == str(home / "imgs")  # what the run records is the folder it read
    dm.setup(None)
    assert dm.train_set.dataset.root == home / "imgs" and len(dm.test_set) == 3
    assert dm.manifest_path.parent == home / "splits" and dm.manifest_path.is_file()
    assert not Path("~").exists()  # nothing written under a folder literally named ~


def test_a_home_relative_split_file_is_replayed(home):
    first = FewShotDataModule("imagefolder", root="~/imgs", shots=2, val_shots=1, image_size=8, split_dir="~/splits")
    first.setup("fit")
    train, val = (f"~/{path.relative_to(home)}" for path in (first.manifest_path, first.val_manifest_path))
    replay = FewShotDataModule("imagefolder", root="~/imgs", shots=2, val_shots=1, image_size=8, split_file=train,
                               val_split_file=val)
    replay.setup("fit")
    assert replay.train_manifest == first.train_manifest and replay.val_manifest == first.val_manifest


def test_a_url_is_left_as_it_is_and_refused_as_a_data_root(home):
    assert expand_root("s3://bucket/~data") == "s3://bucket/~data"  # a logger's or checkpoint's folder may be one
    with pytest.raises(DatasetNotFoundError, match="the dataset root s3://bucket/~data is a URL"):
        FewShotDataModule("cifar10", root="s3://bucket/~data", shots=1, image_size=8)
