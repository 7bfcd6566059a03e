"""A draw's manifests say which part of it they hold (``part=train``, ``part=val``): a replay that passes one for the
other is refused; manifests written before that marker are checked by their images per class, and fall back to what a
manifest written by hand records when those do not fit their header."""

from __future__ import annotations

import re
import shutil
import warnings

import pytest
from fixtures_data import write_imagefolder

from nola_vision.data import FewShotDataModule
from nola_vision.data.fewshot import manifest_settings


@pytest.fixture
def folder_root(tmp_path):
    write_imagefolder(tmp_path / "pets", train_per_class=9, eval_per_class=1, eval_folder="test")
    return tmp_path / "pets"


@pytest.fixture
def drawn(folder_root, tmp_path):
    """A 5-shot draw with 2 validation images per class, its manifests written under split_dir."""
    dm = FewShotDataModule("imagefolder", root=str(folder_root), shots=5, val_shots=2, image_size=8,
                           split_dir=str(tmp_path / "splits"))
    dm.setup("fit")
    return dm


def replay(dm: FewShotDataModule, split_file, val_split_file=None) -> FewShotDataModule:
    again = FewShotDataModule("imagefolder", root=str(dm.root), shots=5, val_shots=2 if val_split_file else 0,
                              image_size=8, split_file=str(split_file),
                              val_split_file=str(val_split_file) if val_split_file else None)
    again.setup("fit")
    return again


def as_an_earlier_version_wrote_it(path) -> None:
    """Rewrite a manifest's header as versions before ``part=`` wrote it (no part, no header digest)."""
    path.write_text(re.sub(r" part=\w+| header=[0-9a-f]{16}", "", path.read_text(), count=2))


def test_each_manifest_says_which_part_of_the_draw_it_holds(drawn):
    assert manifest_settings(drawn.manifest_path)["part"] == "train"
    assert manifest_settings(drawn.val_manifest_path)["part"] == "val"
    again = replay(drawn, drawn.manifest_path, drawn.val_manifest_path)  # as written: the draw, recorded as such
    assert (again.shots, again.split_seed, again.val_shots) == (5, 0, 2)
    assert again.train_manifest == drawn.train_manifest and again.val_manifest == drawn.val_manifest


def test_swapped_manifests_are_refused_naming_the_file_and_what_to_pass(drawn):
    # trained on the 2 validation images per class, validated on the 5 training shots, and recorded shots=5
    # split_seed=0 (in hparams.yaml too), without a word
    with pytest.raises(ValueError, match=rf"{re.escape(str(drawn.val_manifest_path))} holds the validation images of "
                                         r"its draw \(its header says part=val\), but it is passed as split_file.*"
                                         r"Pass it as --data.val_split_file.*_train\.txt\) as --data.split_file"):
        replay(drawn, drawn.val_manifest_path, drawn.manifest_path)


def test_a_validation_manifest_alone_as_split_file_is_refused(drawn):
    with pytest.raises(ValueError, match=r"part=val\), but it is passed as split_file"):
        replay(drawn, drawn.val_manifest_path)


def test_a_training_manifest_as_val_split_file_is_refused(drawn, tmp_path):
    other = FewShotDataModule("imagefolder", root=str(drawn.root), shots=1, split_seed=3, image_size=8,
                              split_dir=str(tmp_path / "other"))
    other.setup("fit")
    with pytest.raises(ValueError, match=rf"{re.escape(str(other.manifest_path))} holds the training images of its "
                                         r"draw \(its header says part=train\), but it is passed as val_split_file"):
        replay(drawn, drawn.manifest_path, other.manifest_path)


def test_swapped_manifests_of_an_earlier_version_are_replayed_as_listed_with_a_warning(drawn):
    for path in (drawn.manifest_path, drawn.val_manifest_path):
        as_an_earlier_version_wrote_it(path)
    with pytest.warns(UserWarning) as record:
        again = replay(drawn, drawn.val_manifest_path, drawn.manifest_path)
    said = [str(w.message) for w in record]
    assert any(re.search(r"passed as split_file \(training images\), but it lists up to 2 images per class.*may be "
                         r"that draw's validation manifest.*no split_seed", text) for text in said), said
    assert any(re.search(r"passed as val_split_file \(validation images\), but it lists up to 5 images per class.*"
                         r"may be that draw's training manifest", text) for text in said), said
    assert (again.shots, again.split_seed, again.val_shots) == (2, None, 5)  # what it trains on, no seed's draw
    with pytest.warns(UserWarning, match=r"passed as split_file"):
        alone = replay(drawn, drawn.val_manifest_path)
    assert (alone.shots, alone.split_seed, alone.val_shots) == (2, None, 0)


def test_manifests_of_an_earlier_version_used_as_written_replay_as_before(drawn):
    for path in (drawn.manifest_path, drawn.val_manifest_path):
        as_an_earlier_version_wrote_it(path)
        assert "part" not in manifest_settings(path) and "header" not in manifest_settings(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = replay(drawn, drawn.manifest_path, drawn.val_manifest_path)
        alone = replay(drawn, drawn.manifest_path)
    assert (again.shots, again.split_seed, again.val_shots) == (5, 0, 2)
    assert again.train_manifest == drawn.train_manifest and again.val_manifest == drawn.val_manifest
    assert (alone.shots, alone.split_seed, alone.val_shots) == (5, 0, 0)


def test_an_edited_part_is_not_taken_for_the_draw(drawn, tmp_path):
    # part= is covered by the header digest: marking the validation manifest part=train does not make it the draw
    edited = tmp_path / "edited.txt"
    edited.write_text(drawn.val_manifest_path.read_text().replace("part=val", "part=train", 1))
    again = replay(drawn, edited)
    assert (again.shots, again.split_seed) == (2, None)


def test_an_earlier_manifest_of_short_classes_drawn_with_allow_fewer_replays_as_its_draw(tmp_path):
    # every class below shots (allow_fewer) and no validation part: it was taken for "maybe the validation manifest"
    # and replayed as written by hand, losing its seed
    write_imagefolder(tmp_path / "few", train_per_class=3, eval_per_class=1, eval_folder="test")
    dm = FewShotDataModule("imagefolder", root=str(tmp_path / "few"), shots=5, val_shots=0, image_size=8,
                           allow_fewer=True, split_dir=str(tmp_path / "splits"))
    dm.setup("fit")
    as_an_earlier_version_wrote_it(dm.manifest_path)
    first_class = sorted((tmp_path / "few" / "train").iterdir())[0]
    image = sorted(first_class.iterdir())[0]
    shutil.copy(image, first_class / f"added{image.suffix}")  # a new image: the seed now draws another split
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = FewShotDataModule("imagefolder", root=str(dm.root), shots=5, val_shots=0, image_size=8,
                                  allow_fewer=True, split_file=str(dm.manifest_path))
        again.setup("fit")
    assert (again.shots, again.split_seed) == (5, 0)
