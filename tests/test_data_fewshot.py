"""k-shot sampling: exactly k per class, seeded and process-independent, disjoint validation, manifests."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from nola_vision.data import (
    NotEnoughImagesError,
    indices_from_manifest,
    read_manifest,
    sample_kshot,
    write_manifest,
)
from nola_vision.data.fewshot import FewShotSplit, draw_order, manifest_settings, split_digest

NAMES = [f"class_{c}" for c in range(10)]


def make_samples(per_class: int = 30, num_classes: int = 10) -> list[tuple[str, int]]:
    """Keys shaped like real relative paths, classes interleaved as in CIFAR."""
    return [(f"images/{c:03d}/img_{i:04d}.jpg", c) for i in range(per_class) for c in range(num_classes)]


def keys(samples, indices):
    return [samples[i][0] for i in indices]


def test_kshot_draws_exactly_k_per_class():
    samples = make_samples()
    for k in (1, 5, 10):
        split = sample_kshot(samples, k, seed=3, class_names=NAMES)
        counts = Counter(samples[i][1] for i in split.train)
        assert counts == {c: k for c in range(10)} and len(set(split.train)) == 10 * k
        assert split.val == []


def test_same_seed_draws_the_same_split_in_another_process():
    """A fresh interpreter with another hash seed and global seed draws the identical manifest."""
    samples = make_samples()
    here = keys(samples, sample_kshot(samples, 5, seed=11, val_shots=2).train)
    code = (
        "import json, random\n"
        "random.seed(999)\n"
        "from nola_vision.data.fewshot import sample_kshot\n"
        "s = [(f'images/{c:03d}/img_{i:04d}.jpg', c) for i in range(30) for c in range(10)]\n"
        "print(json.dumps([s[i][0] for i in sample_kshot(s, 5, seed=11, val_shots=2).train]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "4242"})
    assert json.loads(out.stdout) == here


def test_different_seeds_draw_different_images():
    samples = make_samples()
    draws = {seed: frozenset(sample_kshot(samples, 5, seed=seed).train) for seed in range(4)}
    assert len(set(draws.values())) == 4


def test_sampling_never_touches_the_global_rng():
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    sample_kshot(make_samples(), 5, seed=1, val_shots=3)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state


def test_draw_depends_on_file_names_not_listing_order():
    samples = make_samples()
    shuffled = samples[::-1]
    a = sorted(keys(samples, sample_kshot(samples, 5, seed=2).train))
    b = sorted(keys(shuffled, sample_kshot(shuffled, 5, seed=2).train))
    assert a == b


def test_five_shot_set_is_contained_in_ten_shot_set_of_same_seed():
    samples = make_samples()
    five, ten = sample_kshot(samples, 5, seed=7).train, sample_kshot(samples, 10, seed=7).train
    assert set(five) < set(ten)


def test_validation_subset_never_overlaps_the_kshot_set():
    samples = make_samples(per_class=12)
    for seed in range(5):
        split = sample_kshot(samples, 10, seed=seed, val_shots=2)
        assert not set(split.train) & set(split.val)
        assert Counter(samples[i][1] for i in split.val) == {c: 2 for c in range(10)}


def test_zero_shots_keeps_every_image_outside_validation():
    samples = make_samples(per_class=8)
    split = sample_kshot(samples, 0, seed=0, val_shots=3)
    assert len(split.train) == 50 and len(split.val) == 30
    assert set(split.train) | set(split.val) == set(range(len(samples)))


def test_class_with_too_few_images_names_class_and_count():
    samples = make_samples(per_class=8)
    samples = [s for s in samples if not (s[1] == 4 and s[0] > "images/004/img_0002.jpg")]  # class 4: 3 images
    with pytest.raises(NotEnoughImagesError) as err:
        sample_kshot(samples, 5, seed=0, class_names=NAMES)
    assert "class 'class_4'" in str(err.value) and "has 3 train images" in str(err.value)
    assert "allow_fewer" in str(err.value)


def test_allow_fewer_keeps_what_a_short_class_has():
    samples = make_samples(per_class=8)
    samples = [s for s in samples if not (s[1] == 4 and s[0] > "images/004/img_0002.jpg")]
    with pytest.warns(UserWarning, match="class_4"):
        split = sample_kshot(samples, 5, seed=0, val_shots=1, class_names=NAMES, allow_fewer=True)
    counts = Counter(samples[i][1] for i in split.train)
    assert counts[4] == 3 and counts[0] == 5
    assert all(samples[i][1] != 4 for i in split.val)
    # every image outside validation (shots=0): a short class still trains on one of its images first
    samples = [s for s in samples if not (s[1] == 4 and s[0] > "images/004/img_0001.jpg")]  # class 4: 2 images
    with pytest.warns(UserWarning, match="class_4"):
        split = sample_kshot(samples, 0, seed=0, val_shots=2, class_names=NAMES, allow_fewer=True)
    assert Counter(samples[i][1] for i in split.train)[4] == 1 and Counter(samples[i][1] for i in split.val)[4] == 1


def test_validation_that_does_not_fit_is_also_an_error():
    with pytest.raises(NotEnoughImagesError, match="needs 12 per class"):
        sample_kshot(make_samples(per_class=11), 10, seed=0, val_shots=2)


def test_manifest_round_trip_reproduces_the_same_samples(tmp_path):
    samples = make_samples() + [("images/with space/a b.jpg", 3)]
    split = sample_kshot(samples, 5, seed=5)
    path = write_manifest(tmp_path / "m" / "train.txt", samples, split.train + [len(samples) - 1],
                          header="dataset=x shots=5\nsplit_seed=5")
    text = path.read_text().splitlines()
    assert text[0] == "# dataset=x shots=5" and text[2] == f"{samples[split.train[0]][0]} {samples[split.train[0]][1]}"
    entries = read_manifest(path)
    assert entries[-1] == ("images/with space/a b.jpg", 3)
    assert indices_from_manifest(samples, entries) == split.train + [len(samples) - 1]
    # a different listing order of the same dataset maps to the same images
    reordered = samples[::-1]
    assert keys(reordered, indices_from_manifest(reordered, entries)) == [e[0] for e in entries]


@pytest.mark.parametrize("indices, match", [
    ([-1], "got -1"), ([40], "got 40"), ([True], "got True"), ([1.0], "got 1.0"), (["0"], "got '0'"),
])
def test_manifest_indices_must_be_positions_in_samples_and_nothing_is_written_otherwise(tmp_path, indices, match):
    # -1 wrapped to the last sample and True wrote sample 1; 40 and 1.0 gave a bare IndexError / TypeError
    path = tmp_path / "train.txt"
    with pytest.raises(ValueError, match=rf"indices must be positions in samples, integers 0\.\.39, {match}"):
        write_manifest(path, make_samples(per_class=4), [0, *indices])
    assert not path.exists()


@pytest.mark.parametrize("sample, match", [
    (("a\nb.jpg", 0), r"has key 'a\\nb.jpg' .*line breaks"), (("a\rb.jpg", 0), "line breaks"), ((7, 0), "has key 7"),
    (("a.jpg", True), "has label True .* a label is an integer"), (("a.jpg", "3"), "has label '3'"),
    (("a.jpg", 1.0), "has label 1.0"),
])
def test_a_sample_whose_manifest_line_would_not_read_back_is_refused_before_writing(tmp_path, sample, match):
    # these were written, and read_manifest then failed or read another key or label
    path = tmp_path / "train.txt"
    with pytest.raises(ValueError, match=rf"write_manifest: sample 1 .*{match}"):
        write_manifest(path, [("ok.jpg", 0), sample], [0, 1])
    assert not path.exists()


def test_an_empty_sample_list_is_refused_not_drawn_into_an_empty_split():
    with pytest.raises(ValueError, match="sample_kshot: samples is empty: there are no images to draw a split from"):
        sample_kshot([], shots=1)
    for class_names in ([], ["a", "b"]):  # allow_fewer kept what there was: nothing
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(NotEnoughImagesError, match="there are no images of any of the"):
                sample_kshot([], shots=1, class_names=class_names, allow_fewer=True)


def test_keys_that_look_like_comments_or_escapes_read_back_as_written(tmp_path):
    """A key starting with '#' (a class folder named "#1") was written as is and read back as a comment: the sample
    was silently left out of the split."""
    samples = [("#1/a.png", 0), ("  #2/b.png", 1), ("\\c.png", 2), ("d#.png", 3), ("# e.png", 4)]
    path = write_manifest(tmp_path / "train.txt", samples, range(len(samples)), header="seed=0")
    assert read_manifest(path) == samples
    assert path.read_text().splitlines()[:2] == ["# seed=0", "\\#1/a.png 0"]
    # a key of an older manifest that begins with a backslash (no escape then) reads as it was written
    path.write_text("\\x/a.png 0\n\\ y.png 1\n")
    assert read_manifest(path) == [("\\x/a.png", 0), ("\\ y.png", 1)]


def test_manifest_indices_may_be_integer_tensor_elements(tmp_path):
    path = write_manifest(tmp_path / "train.txt", make_samples(), torch.tensor([3, 0]))
    assert read_manifest(path) == [make_samples()[3], make_samples()[0]]


def test_manifest_with_unknown_path_or_wrong_label_is_rejected(tmp_path):
    samples = make_samples()
    path = tmp_path / "m.txt"
    path.write_text("images/000/img_0000.jpg 1\n")
    with pytest.raises(ValueError, match="has label 1, but the dataset says 0"):
        indices_from_manifest(samples, read_manifest(path), str(path))
    path.write_text("images/000/nope.jpg 0\n")
    with pytest.raises(ValueError, match="nope.jpg"):
        indices_from_manifest(samples, read_manifest(path), str(path))
    path.write_text("no-label-here\n")
    with pytest.raises(ValueError, match=r"m.txt:1: expected 'relative/path label'"):
        read_manifest(path)


@pytest.mark.parametrize("label", ["+1", "00", "01", "1_0", "-1", "\u0661", "1.0"])
def test_a_manifest_label_is_a_class_number_as_write_manifest_writes_it(tmp_path, label):
    """int() took "+1", "00", "1_0" and the Arabic-Indic digit one as labels, so a hand-edited line read as another."""
    path = tmp_path / "m.txt"
    path.write_text(f"images/000/img_0000.jpg {label}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"m.txt:1: expected 'relative/path label' with the label a class number"):
        read_manifest(path)
    path.write_text("images/000/img_0000.jpg 0\nimages/001/img_0001.jpg 10\n", encoding="utf-8")
    assert read_manifest(path) == [("images/000/img_0000.jpg", 0), ("images/001/img_0001.jpg", 10)]


def test_a_manifest_saved_with_a_byte_order_mark_or_keys_in_another_unicode_form_says_so(tmp_path):
    samples = make_samples() + [("images/caf\u00e9.jpg", 3)]  # NFC, as Linux tools name it
    path = tmp_path / "m.txt"
    path.write_text("# dataset=x shots=1\nimages/000/img_0000.jpg 0\n", encoding="utf-8-sig")  # Windows Notepad's
    assert read_manifest(path) == [("images/000/img_0000.jpg", 0)] and manifest_settings(path)["dataset"] == "x"
    path.write_text("images/cafe\u0301.jpg 3\n")  # NFD, as macOS names it: both print as café
    # the same image: a manifest written on Linux replays on a macOS copy of the folder, and the reverse
    assert indices_from_manifest(samples, read_manifest(path), str(path)) == [len(samples) - 1]
    # two files of one composed form (an e with a dot below and an acute, composed and decomposed), and a key in a
    # third form (its marks in the other order): only the exact name could tell which file it means
    both = samples + [("images/\u1eb9\u0301.jpg", 3), ("images/e\u0323\u0301.jpg", 3)]
    path.write_text("images/e\u0301\u0323.jpg 3\n")
    with pytest.raises(ValueError, match=r"'images/e\\u0301\\u0323.jpg' is not in the dataset's train split: the "
                                         r"dataset has 'images/\\u1eb9\\u0301.jpg', the same name written with other "
                                         r"code points"):
        indices_from_manifest(both, read_manifest(path), str(path))
    path.write_text("images/e\u0323\u0301.jpg 3\n")
    assert indices_from_manifest(both, read_manifest(path), str(path)) == [len(both) - 1]  # exactly that name
    path.write_text("images/ca\uff46e\u0301.jpg 3\n")  # a look-alike letter (fullwidth f): no such image
    with pytest.raises(ValueError, match="is not in the dataset's train split"):
        indices_from_manifest(both, read_manifest(path), str(path))


def test_split_digest_names_the_drawn_images_not_their_indices_or_order():
    samples = make_samples(per_class=6, num_classes=3)
    split = sample_kshot(samples, 2, seed=0, val_shots=2)
    digest = split_digest(samples, split)
    assert split_digest(samples, FewShotSplit(split.train[::-1], split.val[::-1])) == digest
    # an image of class 0 that sorts last in the draw: every index moves, the drawn images stay
    last = next(f"images/000/late_{i}.jpg" for i in range(1000) if draw_order(f"images/000/late_{i}.jpg", 0)
                > max(draw_order(key, 0) for key, label in samples if label == 0))
    shifted = [(last, 0)] + samples
    again = sample_kshot(shifted, 2, seed=0, val_shots=2)
    assert again.train != split.train and split_digest(shifted, again) == digest
    # one that sorts first: it is drawn, so the draw is another
    first = next(f"images/000/early_{i}.jpg" for i in range(1000) if draw_order(f"images/000/early_{i}.jpg", 0)
                 < min(draw_order(key, 0) for key, label in samples if label == 0))
    added = samples + [(first, 0)]
    assert split_digest(added, sample_kshot(added, 2, seed=0, val_shots=2)) != digest
    assert split_digest(samples, FewShotSplit(split.train, split.val[:-1])) != digest  # validation images count too


def test_a_file_name_that_is_not_utf8_is_drawn_by_its_bytes_and_utf8_names_keep_their_draw():
    import hashlib

    from nola_vision.data.fewshot import FewShotSplit, draw_order, split_digest

    latin1 = os.fsdecode(b"cat/caf\xe9.png")  # a name copied from a Latin-1 system: a surrogate escape in Python
    expected = hashlib.blake2b(b"3\0cat/caf\xe9.png", digest_size=8).digest()
    assert draw_order(latin1, 3) == int.from_bytes(expected, "big")
    utf8 = hashlib.blake2b("3\0cat/café.png".encode(), digest_size=8).digest()
    assert draw_order("cat/café.png", 3) == int.from_bytes(utf8, "big")  # the splits of earlier releases
    samples = [(latin1, 0), ("cat/b.png", 0)]
    assert split_digest(samples, FewShotSplit([0], [1])) != split_digest(samples, FewShotSplit([1], [0]))


@pytest.mark.parametrize("seed, hint", [(3.0, True), (True, True), (None, False), ("3", False), ([3], False)])
def test_a_seed_that_is_no_integer_is_refused_and_int_is_advised_only_for_a_number(seed, hint):
    with pytest.raises(TypeError, match=r"sample_kshot: seed must be an integer, got ") as caught:
        sample_kshot([("a.png", 0), ("b.png", 1)], 1, seed=seed)
    assert ("pass int(" in str(caught.value)) is hint  # int(None) or int('x') would fail in turn


def test_samples_that_are_not_path_label_pairs_are_named():
    with pytest.raises(ValueError, match=r"labels \['cat', 'dog'\] are not class numbers"):  # was a str + int TypeError
        sample_kshot([("a.png", "cat"), ("b.png", "dog")], 1)
    with pytest.raises(ValueError, match=r"labels \[0.0, 1.0\] are not class numbers: a label is an integer"):
        sample_kshot([("a.png", 0.0), ("b.png", 1.0)], 1)  # said "not classes 0..-1 (len(class_names)=0)"
    with pytest.raises(TypeError, match=r"an image key is a str .*got PosixPath\('a.png'\) \(PosixPath\) at index 0"):
        sample_kshot([(Path("a.png"), 0), ("b.png", 1)], 1)  # was unicodedata's TypeError
    with pytest.raises(TypeError, match=r"samples are a sequence of \(image path, integer label\) pairs, got a "
                                        r"NoneType"):
        sample_kshot(None, 1)
    with pytest.raises(TypeError, match=r"got 'a.png' at index 1"):
        sample_kshot([("b.png", 0), "a.png"], 1)
    with pytest.raises(ValueError, match="allow_fewer must be true or false, got 'no'"):
        sample_kshot([("a.png", 0), ("b.png", 1)], 1, allow_fewer="no")
    assert sample_kshot([("a.png", 0), ("b.png", 1)], 1, allow_fewer=np.True_) == FewShotSplit([0, 1])
    with pytest.raises(TypeError, match=r"class_names is a list of names, one per label, got 'abc' \(str\)"):
        sample_kshot([("a.png", 0), ("b.png", 1)], 1, class_names="abc")  # was taken as the classes a, b and c


@pytest.mark.parametrize("samples", [[("a.png", 0), ("b.png", 0), ("a.png", 0)],
                                     [("a.png", 0), ("b.png", 0), ("a.png", 1), ("c.png", 1)]],
                         ids=["same label", "two labels"])
def test_an_image_listed_twice_is_refused_not_drawn_twice(samples):
    # a 2-shot draw took the repeated image twice (one distinct image), or into two classes
    with pytest.raises(ValueError, match=r"'a.png' is listed twice \(at indices 0 and 2\)"):
        sample_kshot(samples, 1)


def test_a_manifest_the_replay_would_refuse_is_not_written_and_manifest_entries_are_typed(tmp_path):
    samples = [("a.png", 0), ("b.png", 1)]
    with pytest.raises(ValueError, match="index 0 is listed twice"):
        write_manifest(tmp_path / "m.txt", samples, [0, 0, 1])
    assert not (tmp_path / "m.txt").exists()
    with pytest.raises(TypeError, match=r"a key is a str .*got PosixPath"):
        indices_from_manifest(samples, [(Path("a.png"), 0)])
    for label in ("0", 0.0):  # "has label 0, but the dataset says 0"; a float was taken as the integer
        with pytest.raises(TypeError, match=rf"'a.png' has label {re.escape(repr(label))} .*a label is an integer"):
            indices_from_manifest(samples, [("a.png", label)])
