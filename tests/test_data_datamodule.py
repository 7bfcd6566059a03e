"""FewShotDataModule on real-format fixtures: shapes, dtypes, normalisation, steps, seeded splits, errors."""

from __future__ import annotations

import itertools
import random
import re
import shutil
import warnings
from itertools import count
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision.datasets as tvd
from fixtures_data import cifar_class_with_checksums, class_color, write_cifar10, write_cub, write_imagefolder
from lightning.pytorch.trainer.states import TrainerFn
from PIL import Image

from nola_vision.data import DATASETS, CorruptImageError, DatasetNotFoundError, FewShotDataModule
from nola_vision.data.datasets import FASHION_MNIST_SYSTEM_DIR
from nola_vision.data.fewshot import draw_order
from nola_vision.data.transforms import IMAGENET_MEAN, IMAGENET_STD


@pytest.fixture
def cifar10_root(tmp_path, monkeypatch):
    """CIFAR-10 pickles (6 train, 2 test per class) with their checksums registered (see test_data_datasets)."""
    info = write_cifar10(tmp_path / "data", train_per_class=6, test_per_class=2)
    monkeypatch.setattr(DATASETS["cifar10"].reader, "torchvision_class",
                        cifar_class_with_checksums(tvd.CIFAR10, info["md5"]))
    return tmp_path / "data"


@pytest.fixture
def folder_root(tmp_path):
    write_imagefolder(tmp_path / "pets", train_per_class=6, eval_per_class=2, eval_folder="test")
    return tmp_path / "pets"


def test_num_classes_and_class_names_are_known_before_setup(tmp_path, folder_root):
    write_cub(tmp_path / "birds", train_per_class=1, test_per_class=1)
    dm = FewShotDataModule("cub200", root=str(tmp_path / "birds"), shots=1)
    assert dm.num_classes == 200 and dm.class_names[:2] == ["Bird_001", "Bird_002"] and dm.train_set is None
    assert FewShotDataModule("imagefolder", root=str(folder_root)).num_classes == 3
    # a static table: known even before the data is downloaded
    assert FewShotDataModule("cifar100", root=str(tmp_path / "not-yet")).num_classes == 100


@pytest.mark.parametrize("shots", [6, 0])
def test_allow_fewer_that_leaves_no_validation_image_at_all_is_refused(tmp_path, shots):
    """Every class held its training shots only: val_shots=1 drew nothing, and validate wrote a result without
    metrics (exit 0), fit one without val/acc, and tune failed every trial after training it."""
    write_imagefolder(tmp_path / "pets", train_per_class=6 if shots else 1, eval_per_class=1, eval_folder="test")
    dm = FewShotDataModule("imagefolder", root=str(tmp_path / "pets"), shots=shots, val_shots=1, allow_fewer=True,
                           image_size=8)
    with pytest.raises(ValueError, match=rf"val_shots=1 drew no validation image: with allow_fewer.*every class of "
                                         rf"imagefolder has {shots or 1} training image\(s\) or fewer"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the shortage warning of allow_fewer
        dm.setup("fit")
    assert dm.train_set is None
    partly = tmp_path / "partly"  # one class with a validation image: drawn as before
    write_imagefolder(partly, train_per_class=6, eval_per_class=1, eval_folder="test")
    (partly / "train" / "cat" / "cat 00.png").rename(partly / "train" / "cat" / "cat 06.png")
    shutil.copy(partly / "train" / "cat" / "cat 06.png", partly / "train" / "cat" / "cat 07.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        more = FewShotDataModule("imagefolder", root=str(partly), shots=6, val_shots=1, allow_fewer=True, image_size=8)
        more.setup("fit")
    assert len(more.val_manifest) == 1


def test_the_class_names_and_manifests_a_caller_gets_are_its_own_copies(folder_root):
    """They were the lists the data module and its datasets read: sorting or shuffling what was returned (to look at
    it) relabelled the classes or reordered the training images of every later batch, checkpoint and export."""
    dm = FewShotDataModule("imagefolder", root=str(folder_root), shots=2, val_shots=1, image_size=32)
    names = list(dm.class_names)
    dm.class_names.reverse()
    dm.setup("fit")
    train, val = list(dm.train_manifest), list(dm.val_manifest)
    random.Random(0).shuffle(dm.train_manifest)
    dm.val_manifest.clear()
    dm.class_names.append("extra")
    assert dm.class_names == names and dm.train_manifest == train and dm.val_manifest == val
    assert dm.train_set.samples == train and dm.train_set.dataset.class_names == names


@pytest.mark.parametrize("augment", ["paper", "timm", "none"])
def test_batches_have_expected_shape_dtype_and_normalisation(folder_root, augment):
    dm = FewShotDataModule("imagefolder", root=str(folder_root), shots=4, batch_size=4, image_size=32,
                           backbone="vit_base_patch16_224", augment=augment, shuffle_seed=0)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    # the backbone's own mean/std (0.5, 0.5, 0.5): pixel values in [0, 1] map into [-1, 1]
    assert x.min() >= -1 - 1e-6 and x.max() <= 1 + 1e-6
    dm.setup("test")
    xt, yt = next(iter(dm.test_dataloader()))
    assert xt.shape == (4, 3, 32, 32)
    # eval images are flat colours: exactly (c / 255 - 0.5) / 0.5 per channel
    for img, label in zip(xt, yt):
        expected = torch.tensor([(c / 255 - 0.5) / 0.5 for c in class_color(int(label))])
        assert torch.allclose(img.mean(dim=(1, 2)), expected, atol=1e-5)
    if augment == "none":
        for img, label in zip(x, y):
            expected = torch.tensor([(c / 255 - 0.5) / 0.5 for c in class_color(int(label))])
            assert torch.allclose(img.mean(dim=(1, 2)), expected, atol=1e-5)


def test_imagenet_normalisation_option(folder_root):
    dm = FewShotDataModule("imagefolder", root=str(folder_root), shots=1, batch_size=3, image_size=16,
                           backbone="vit_base_patch16_224", augment="none", normalize="imagenet")
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    for img, label in zip(x, y):
        expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip(class_color(int(label)),
                                                                       IMAGENET_MEAN, IMAGENET_STD)])
        assert torch.allclose(img.mean(dim=(1, 2)), expected, atol=1e-5)


def test_five_shot_cifar10_with_batch_16_gives_3_steps(cifar10_root):
    dm = FewShotDataModule("cifar10", root=str(cifar10_root), shots=5, batch_size=16, image_size=32)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(dm.train_set) == 50 and loader.drop_last and len(loader) == 3
    assert sum(len(y) for _, y in loader) == 48
    dm.setup("test")
    assert len(dm.test_set) == 20 and len(dm.test_dataloader()) == 2


def test_drop_last_only_when_a_full_batch_remains(cifar10_root):
    dm = FewShotDataModule("cifar10", root=str(cifar10_root), shots=1, batch_size=16, image_size=32)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert not loader.drop_last and [len(y) for _, y in loader] == [10]


def test_train_loader_shuffles_with_a_seeded_generator(cifar10_root):
    def order(**kw):
        dm = FewShotDataModule("cifar10", root=str(cifar10_root), shots=5, batch_size=10, image_size=8,
                               augment="none", **kw)
        dm.setup("fit")
        return torch.cat([y for _, y in dm.train_dataloader()]).tolist()

    assert order(shuffle_seed=1) == order(shuffle_seed=1) != order(shuffle_seed=2)
    state = torch.get_rng_state()
    with torch.random.fork_rng():
        torch.manual_seed(5)  # shuffle_seed=None follows seed_everything / torch.initial_seed()
        a = order()
        torch.manual_seed(5)
        assert order() == a
    assert torch.equal(torch.get_rng_state(), state)


def test_loaders_built_by_hand_each_epoch_go_on_drawing_new_orders_as_one_loaders_epochs_do(cifar10_root):
    """A loop calling train_dataloader() each epoch (the notebooks' own loop) got the first epoch's order every time,
    and drop_last left out the same images in every epoch."""
    def module():
        dm = FewShotDataModule("cifar10", root=str(cifar10_root), shots=5, batch_size=16, image_size=8,
                               augment="none", shuffle_seed=3)
        dm.setup("fit")
        return dm

    rebuilt, kept = module(), module()
    loader = kept.train_dataloader()
    by_hand = [torch.cat([y for _, y in rebuilt.train_dataloader()]).tolist() for _ in range(4)]
    one_loader = [torch.cat([y for _, y in loader]).tolist() for _ in range(4)]
    assert by_hand == one_loader and len({tuple(order) for order in by_hand}) == 4
    assert [len(order) for order in by_hand] == [48] * 4  # 50 images, batches of 16: 2 left out, other ones each time


def test_ddp_train_sampler_is_seeded_with_shuffle_seed(cifar10_root):
    """The sampler Lightning trains with under DDP (built here without launching 2 processes)."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.trainer.states import RunningStage
    from torch.utils.data import DistributedSampler

    def sampler(shuffle_seed):
        trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False)
        dm = FewShotDataModule("cifar10", root=str(cifar10_root), shots=5, batch_size=10, image_size=8,
                               augment="none", shuffle_seed=shuffle_seed)
        dm.trainer = trainer
        dm.setup("fit")
        loader = trainer._data_connector._prepare_dataloader(dm.train_dataloader(), True, RunningStage.TRAINING)
        return loader.sampler

    a, b = sampler(3), sampler(4)
    assert isinstance(a, DistributedSampler) and (a.seed, a.num_replicas, a.shuffle) == (3, 2, True)
    assert list(a) == list(sampler(3)) != list(b) and len(list(a)) == 25  # rank 0's half of 50 images


@pytest.mark.parametrize("shuffle_seed", [None, 3])
def test_ddp_keeps_a_batch_when_each_process_has_less_than_one(cifar10_root, shuffle_seed):
    """10 images, batch 8, 2 processes: 5 each. drop_last decided on all 10 left every process 0 batches, so a fit
    trained nothing and exported the untrained adapter."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.trainer.states import RunningStage

    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False)
    dm = FewShotDataModule("cifar10", root=str(cifar10_root), shots=1, batch_size=8, image_size=8, augment="none",
                           shuffle_seed=shuffle_seed)
    dm.trainer = trainer
    dm.setup("fit")
    loader = trainer._data_connector._prepare_dataloader(dm.train_dataloader(), True, RunningStage.TRAINING)
    assert len(loader) == 1 and [len(y) for _, y in loader] == [5]


def test_two_ranks_draw_the_same_split_and_write_the_same_manifest(cifar10_root, tmp_path):
    ranks = []
    for rank in range(2):
        dm = FewShotDataModule("cifar10", root=str(cifar10_root), shots=3, split_seed=2, val_shots=2,
                               image_size=8, split_dir=str(tmp_path / f"rank{rank}"))
        dm.setup("fit")
        ranks.append(dm)
    assert ranks[0].train_manifest == ranks[1].train_manifest and ranks[0].split == ranks[1].split
    assert ranks[0].manifest_path.read_text() == ranks[1].manifest_path.read_text()
    assert ranks[0].manifest_path.name == "cifar10_3shot_seed2_train.txt"
    assert not set(ranks[0].train_manifest) & set(ranks[0].val_manifest) and len(ranks[0].val_set) == 20
    other = FewShotDataModule("cifar10", root=str(cifar10_root), shots=3, split_seed=3, image_size=8)
    other.setup("fit")
    assert other.train_manifest != ranks[0].train_manifest


def test_a_datasets_other_spellings_are_one_dataset_in_its_manifests_and_records(cifar10_root, tmp_path):
    # CIFAR10 and cifar10 read the same images but wrote two manifests side by side, so one that lists other images
    # was never compared with the run's, and results tables split one dataset in two rows
    spellings = []
    for name in ("CIFAR10", "cifar10", "Cifar10"):
        dm = FewShotDataModule(name, root=str(cifar10_root), shots=3, split_seed=2, image_size=8,
                               split_dir=str(tmp_path / "splits"))
        dm.setup("fit")
        spellings.append((dm.hparams.dataset, dm.dataset_name, dm.manifest_path.name))
    assert set(spellings) == {("cifar10", "cifar10", "cifar10_3shot_seed2_train.txt")}
    assert sorted(path.name for path in (tmp_path / "splits").iterdir()) == ["cifar10_3shot_seed2_train.txt"]
    with pytest.raises(ValueError, match="unknown dataset 'CIFAR-11'"):
        FewShotDataModule("CIFAR-11", root=str(cifar10_root))


def test_split_file_reproduces_a_run_exactly(cifar10_root, tmp_path):
    dm = FewShotDataModule("cifar10", root=str(cifar10_root), shots=4, split_seed=9, val_shots=1,
                           image_size=8, split_dir=str(tmp_path / "run"))
    dm.setup("fit")
    again = FewShotDataModule("cifar10", root=str(cifar10_root), shots=4, split_seed=0, image_size=8,
                              split_file=str(dm.manifest_path), val_split_file=str(dm.val_manifest_path))
    again.setup("fit")
    assert again.train_manifest == dm.train_manifest and again.val_manifest == dm.val_manifest
    assert (again.shots, again.val_shots, again.split_seed) == (4, 1, 9)  # what the run records is the manifest's


def test_a_manifest_whose_lines_were_reordered_trains_in_the_draws_order(cifar10_root, tmp_path):
    # the line order was the training order, which the split's records (order-free) never saw: a re-sorted copy of a
    # run's manifest was taken as that draw, and a resume from it trained another adapter
    dm = FewShotDataModule("cifar10", root=str(cifar10_root), shots=4, split_seed=9, image_size=8,
                           split_dir=str(tmp_path / "run"))
    dm.setup("fit")
    lines = dm.manifest_path.read_text().splitlines(keepends=True)
    header = [line for line in lines if line.startswith("#")]
    for name, images in (("sorted", sorted), ("reversed", lambda rows: rows[::-1])):
        shuffled = tmp_path / f"{name}.txt"
        shuffled.write_text("".join(header + images([line for line in lines if not line.startswith("#")])))
        again = FewShotDataModule("cifar10", root=str(cifar10_root), split_file=str(shuffled), image_size=8)
        again.setup("fit")
        assert again.train_manifest == dm.train_manifest and again.split_seed == 9, name
        assert list(again.train_set.indices) == list(dm.train_set.indices), name
    # without a header no seed is recorded: its lines' order is the order it trains in, as it always was
    bare = tmp_path / "bare.txt"
    bare.write_text("".join(line for line in lines if not line.startswith("#")))
    again = FewShotDataModule("cifar10", root=str(cifar10_root), split_file=str(bare), image_size=8)
    again.setup("fit")
    assert again.train_manifest == dm.train_manifest


def test_the_draw_is_the_same_for_composed_and_decomposed_file_names():
    # a folder copied to macOS's HFS+ names "é" decomposed (NFD): the same files drew other images
    composed, decomposed = "train/caf\u00e9/r\u00e9sum\u00e9 1.png", "train/cafe\u0301/re\u0301sume\u0301 1.png"
    assert composed != decomposed and draw_order(composed, 3) == draw_order(decomposed, 3)
    assert draw_order("train/a\udcff.png", 3) != draw_order("train/b\udcff.png", 3)  # bytes of non-UTF-8 names


def add_drawn_image(dm: FewShotDataModule, class_name: str) -> Path:
    """Add a train image of ``class_name`` that ``dm``'s split seed draws before its drawn ones: the same settings then
    draw another split, and one of the run's training images becomes a validation image."""
    label = dm.class_names.index(class_name)
    first = min(draw_order(key, dm.split_seed) for key, drawn in dm.train_manifest if drawn == label)
    keys = (f"train/{class_name}/new {i}.png" for i in count())
    key = next(key for key in keys if draw_order(key, dm.split_seed) < first)
    path = Path(dm.root) / key
    Image.new("RGB", (20, 16), class_color(label)).save(path)
    return path


def test_a_manifest_of_another_draw_is_refused_and_kept(folder_root, tmp_path):
    def drawn(split_dir=str(tmp_path / "splits")):
        dm = FewShotDataModule("imagefolder", root=str(folder_root), shots=2, val_shots=2, image_size=8,
                               split_dir=split_dir)
        dm.setup("fit")
        return dm

    run = drawn()
    kept = {path: path.read_bytes() for path in (run.manifest_path, run.val_manifest_path)}
    drawn()  # the same images again: the manifests stay as they are
    add_drawn_image(run, "cat")
    with pytest.raises(ValueError, match=rf"{re.escape(str(run.manifest_path))} lists another k-shot split .* the "
                                         rf"images under {re.escape(str(folder_root))} changed since it was written.* "
                                         r"so it is not replaced: .*--data.split_file"):
        drawn()
    assert {path: path.read_bytes() for path in kept} == kept  # the record of what the run trained on
    assert drawn(split_dir=None).split_digest != run.split_digest  # what checkpoints record of the draw


def test_a_manifest_kept_after_a_class_folder_was_added_names_the_renumbered_classes(folder_root, tmp_path):
    # it said the manifest "lists 4 image(s) this run does not draw, e.g. 'train/cat/0.png'": the run draws them,
    # under the next label, since a class that sorts first was added
    def drawn():
        dm = FewShotDataModule("imagefolder", root=str(folder_root), shots=2, image_size=8,
                               split_dir=str(tmp_path / "splits"))
        dm.setup("fit")
        return dm

    run = drawn()
    classes = sorted(path.name for path in (folder_root / "train").iterdir())
    first = sorted(folder_root.joinpath("train", classes[0]).iterdir())
    added = folder_root / "train" / "aardvark"
    added.mkdir()
    for number, image in enumerate(first):
        shutil.copy(image, added / f"a{number}{image.suffix}")
    with pytest.raises(ValueError) as refused:
        drawn()
    message = str(refused.value)
    listed = sorted(run.train_manifest)[0]
    assert f"{len(run.train_manifest)} image(s) it lists are drawn with another label, e.g. '{listed[0]}' (label " \
           f"{listed[1]} there, {listed[1] + 1} now)" in message
    assert f"the classes under {folder_root} changed since it was written (a class folder added" in message
    assert "this run does not draw" not in message and "this run draws 2 image(s) it does not list" in message


def test_a_refused_setup_leaves_no_split_so_a_retried_setup_is_refused_again(folder_root, tmp_path):
    """The split was kept before the manifests were checked: a second setup (a retried Trainer.fit) trained on the
    refused draw, with no manifest written."""
    def module():
        return FewShotDataModule("imagefolder", root=str(folder_root), shots=2, val_shots=1, image_size=8,
                                 split_dir=str(tmp_path / "splits"))

    run = module()
    run.setup("fit")
    add_drawn_image(run, "cat")
    dm = module()
    for _ in range(2):
        with pytest.raises(ValueError, match="lists another k-shot split"):
            dm.setup("fit")
        assert dm.split_digest is None and dm.manifest_path is None
        with pytest.raises(RuntimeError, match=r"call setup\(\) first"):
            dm.train_dataloader()
        with pytest.raises(RuntimeError, match=r"call setup\(\) first"):  # not an empty list: no validation at all
            dm.val_dataloader()


def test_replaying_the_manifest_of_a_whole_train_split_records_shots_0(folder_root, tmp_path):
    """A shots=0 run's manifest lists every training image: its replay counted the largest class as the shots, cached
    every image and wrote the manifest again under another name."""
    Image.new("RGB", (20, 16), (9, 9, 9)).save(folder_root / "train" / "dog" / "extra.png")  # classes of 4 and 5
    whole = FewShotDataModule("imagefolder", root=str(folder_root), shots=0, image_size=8,
                              split_dir=str(tmp_path / "splits"))
    whole.setup("fit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "fewer images for classes" warning
        replay = FewShotDataModule("imagefolder", root=str(folder_root), split_file=str(whole.manifest_path),
                                   image_size=8, split_dir=str(tmp_path / "splits"))
        replay.setup("fit")
    assert replay.shots == 0 and replay.manifest_path == whole.manifest_path and not replay.train_set.cache
    assert sorted(replay.train_manifest) == sorted(whole.train_manifest)
    assert sorted(p.name for p in (tmp_path / "splits").iterdir()) == [whole.manifest_path.name]


def test_a_manifest_whose_header_settings_were_edited_records_what_it_lists_not_the_edit(folder_root, tmp_path):
    """Its images= digest covers the image lines only: shots and split_seed edited in the header were recorded as the
    run's draw (into checkpoints and the names of manifests written later)."""
    drawn = FewShotDataModule("imagefolder", root=str(folder_root), shots=2, split_seed=7, image_size=8,
                              split_dir=str(tmp_path / "splits"))
    drawn.setup("fit")
    text = drawn.manifest_path.read_text()
    assert re.search(r"images=[0-9a-f]{16} header=[0-9a-f]{16}\n", text)
    for name, content, recorded in (
            ("as_written.txt", text, (2, 7)),
            ("edited.txt", text.replace("shots=2 split_seed=7", "shots=5 split_seed=3", 1), (2, None)),
            ("older.txt", re.sub(r" header=[0-9a-f]{16}", "", text, count=1), (2, 7))):  # before the header digest
        (tmp_path / name).write_text(content)
        replay = FewShotDataModule("imagefolder", root=str(folder_root), split_file=str(tmp_path / name),
                                   image_size=8)
        replay.setup("fit")
        assert (replay.shots, replay.split_seed) == recorded, name


def test_replaying_a_manifest_after_a_class_was_added_is_refused_naming_the_class(folder_root, tmp_path):
    """The new class got no training image, silently, while the test split scored it; the run recorded the draw's
    shots and seed as if it had trained on every class."""
    drawn = FewShotDataModule("imagefolder", root=str(folder_root), shots=2, split_seed=7, image_size=8,
                              split_dir=str(tmp_path / "splits"))
    drawn.setup("fit")
    for split in ("train", "test"):
        (folder_root / split / "zebra").mkdir()
        for j in range(3):
            Image.new("RGB", (20, 16), (j, 200, 10)).save(folder_root / split / "zebra" / f"z{j}.png")
    replay = FewShotDataModule("imagefolder", root=str(folder_root), split_file=str(drawn.manifest_path),
                               image_size=8)
    with pytest.raises(ValueError, match=r"lists no training image of 1 of the \d+ classes there now \('zebra'\)"):
        replay.setup("fit")


@pytest.mark.parametrize("shots", [1, 0])
def test_a_manifest_of_a_draw_that_found_no_training_image_of_a_class_replays(folder_root, tmp_path, shots):
    # allow_fewer draws nothing of a class whose train folder is empty: its own manifest was refused on replay
    for image in (folder_root / "train" / "owl").iterdir():
        image.unlink()
    drawn = FewShotDataModule("imagefolder", root=str(folder_root), shots=shots, allow_fewer=True, image_size=8,
                              split_dir=str(tmp_path / "splits"))
    drawn.setup("fit")
    replay = FewShotDataModule("imagefolder", root=str(folder_root), split_file=str(drawn.manifest_path),
                               image_size=8)
    replay.setup("fit")
    assert sorted(replay.train_manifest) == sorted(drawn.train_manifest)


def test_a_manifest_no_seed_drew_records_no_split_seed_and_never_takes_a_draws_name(folder_root, tmp_path):
    """A hand-written manifest was recorded as the config's seed 0 and written under split_dir as seed 0's draw, so
    seed 0's real draw was then refused there as if the images had changed; a shots=0 header on a trimmed manifest
    was recorded as every train image."""
    drawn = FewShotDataModule("imagefolder", root=str(folder_root), shots=2, image_size=8)
    drawn.setup("fit")
    undrawn = [sample for sample in drawn.train_set.dataset.samples if sample not in drawn.train_manifest]
    by_hand = tmp_path / "by_hand.txt"  # no header: images no seed has to draw
    by_hand.write_text("".join(f"{key} {label}\n" for key, label in undrawn[::2]))
    whole = FewShotDataModule("imagefolder", root=str(folder_root), shots=0, split_seed=4, image_size=8,
                              split_dir=str(tmp_path / "whole"))
    whole.setup("fit")
    trimmed = tmp_path / "trimmed.txt"  # the whole split's header (shots=0 split_seed=4) over 2 images a class
    header = [line for line in whole.manifest_path.read_text().splitlines(keepends=True) if line.startswith("#")]
    trimmed.write_text("".join(header) + "".join(f"{key} {label}\n" for key, label in drawn.train_manifest))
    for manifest in (by_hand, trimmed):
        replay = FewShotDataModule("imagefolder", root=str(folder_root), split_file=str(manifest), image_size=8,
                                   split_dir=str(tmp_path / "splits"))
        replay.setup("fit")
        assert replay.split_seed is None and replay.shots > 0, manifest
        assert "seed" not in replay.manifest_path.name and "listed-" in replay.manifest_path.name
    seed0 = FewShotDataModule("imagefolder", root=str(folder_root), shots=2, image_size=8,
                              split_dir=str(tmp_path / "splits"))
    seed0.setup("fit")  # its own record, beside the listed ones
    assert seed0.manifest_path.name == "imagefolder_2shot_seed0_train.txt"
    faithful = FewShotDataModule("imagefolder", root=str(folder_root), split_file=str(whole.manifest_path),
                                 image_size=8)
    faithful.setup("fit")
    assert (faithful.shots, faithful.split_seed) == (0, 4)
    add_drawn_image(seed0, "cat")  # seed 0 now draws another image: its manifest, unedited, is still its draw
    replay = FewShotDataModule("imagefolder", root=str(folder_root), split_file=str(seed0.manifest_path),
                               image_size=8, split_dir=str(tmp_path / "splits"))
    replay.setup("fit")
    assert (replay.shots, replay.split_seed, replay.manifest_path) == (2, 0, seed0.manifest_path)


def test_runs_with_another_val_shots_keep_their_own_manifests_and_a_manifest_of_other_settings_is_named(
        folder_root, tmp_path):
    # the same split_dir with another val_shots was refused as if the images under root had changed
    def drawn(val_shots):
        dm = FewShotDataModule("imagefolder", root=str(folder_root), shots=2, val_shots=val_shots, image_size=8,
                               split_dir=str(tmp_path / "splits"))
        dm.setup("fit")
        return dm

    first, second = drawn(val_shots=2), drawn(val_shots=1)
    assert first.manifest_path == second.manifest_path  # the same training draw, one record
    assert first.val_manifest_path.name.endswith("_val2.txt") and second.val_manifest_path.name.endswith("_val1.txt")
    lines = first.manifest_path.read_text().splitlines()
    first.manifest_path.write_text("\n".join(lines[:-1]) + "\n")  # an image gone: the shared record's header
    with pytest.raises(ValueError, match="changed since it was written") as refused:  # says val_shots=2 (first's)
        drawn(val_shots=1)
    assert "was written by a run with" not in str(refused.value)
    lines = first.manifest_path.read_text().replace("split_seed=0", "split_seed=7").splitlines()
    first.manifest_path.write_text("\n".join(lines) + "\n")  # another seed's record: other images
    with pytest.raises(ValueError, match=rf"{re.escape(str(first.manifest_path))} was written by a run with "
                                         r"split_seed=7, but this run has split_seed=0.*another --data.split_dir.*"
                                         r"--data.split_seed 7\)$") as refused:
        drawn(val_shots=2)
    assert "changed" not in str(refused.value)


def test_every_rank_refuses_a_manifest_of_another_draw_and_only_rank_zero_writes(folder_root, tmp_path):
    # rank 0 alone refused it, and the other ranks waited at the barrier ending Lightning's setup until a timeout
    from types import SimpleNamespace

    def rank1(split_dir):
        dm = FewShotDataModule("imagefolder", root=str(folder_root), shots=2, image_size=8, split_dir=str(split_dir))
        dm.trainer = SimpleNamespace(is_global_zero=False)  # what setup reads of a DDP rank's trainer
        dm.setup("fit")
        return dm

    run = FewShotDataModule("imagefolder", root=str(folder_root), shots=2, image_size=8,
                            split_dir=str(tmp_path / "splits"))
    run.setup("fit")
    add_drawn_image(run, "cat")
    with pytest.raises(ValueError, match=rf"{re.escape(str(run.manifest_path))} lists another k-shot split"):
        rank1(tmp_path / "splits")
    assert not rank1(tmp_path / "fresh").manifest_path.exists()  # written by rank 0 only


def test_val_shots_with_a_split_file_but_no_val_split_file_is_refused_at_construction(tmp_path):
    with pytest.raises(ValueError, match=r"val_shots=2 with a split_file but no val_split_file.*--data.val_split_file"):
        FewShotDataModule("digits", split_file=str(tmp_path / "train.txt"), val_shots=2)
    FewShotDataModule("digits", split_file=str(tmp_path / "train.txt"))  # a replay without validation


@pytest.mark.parametrize("what", ["missing", "a directory"])
def test_a_split_file_that_is_no_file_is_named_by_the_module(folder_root, tmp_path, what):
    # read_manifest's raw FileNotFoundError / IsADirectoryError, at setup
    manifest = tmp_path / "split.txt"
    if what == "a directory":
        manifest.mkdir()
    replay = FewShotDataModule("imagefolder", root=str(folder_root), split_file=str(manifest), image_size=8)
    with pytest.raises(FileNotFoundError, match=f"FewShotDataModule.split_file {manifest} is {what}: pass a manifest"):
        replay.setup("fit")


def test_a_manifest_that_lists_an_image_twice_is_refused(cifar10_root, tmp_path):
    dm = FewShotDataModule("cifar10", root=str(cifar10_root), shots=2, split_seed=0, image_size=8,
                           split_dir=str(tmp_path / "run"))
    dm.setup("fit")
    lines = dm.manifest_path.read_text().splitlines()
    entries = [i for i, line in enumerate(lines) if not line.startswith("#")]
    lines[entries[1]] = lines[entries[0]]  # one image twice, another dropped: still 2 lines for that class
    edited = tmp_path / "edited.txt"
    edited.write_text("\n".join(lines) + "\n")
    again = FewShotDataModule("cifar10", root=str(cifar10_root), shots=2, image_size=8, split_file=str(edited))
    with pytest.raises(ValueError, match="is listed twice"):
        again.setup("fit")


def test_kshot_images_are_decoded_once_and_cached(folder_root, monkeypatch):
    dm = FewShotDataModule("imagefolder", root=str(folder_root), shots=2, batch_size=2, image_size=8)
    dm.setup("fit")
    assert len(dm.train_set.cache) == 6
    monkeypatch.setattr(type(dm.train_set.dataset), "load_image",
                        lambda self, i: pytest.fail("image decoded again"))
    assert sum(len(y) for _, y in dm.train_dataloader()) == 6


def test_cache_budget_is_respected(folder_root):
    dm = FewShotDataModule("imagefolder", root=str(folder_root), shots=2, image_size=8, cache_mb=3 * (20 * 16 * 3) / 2**20)  # three 20x16 RGB images
    with pytest.warns(UserWarning, match="image cache full after 3 of 6"):
        dm.setup("fit")
    assert len(dm.train_set.cache) == 3 and len(dm.train_set) == 6


def test_cache_budget_holds_train_and_validation_images_together(folder_root):
    """Each set took the whole budget: twice cache_mb was held."""
    image = 20 * 16 * 3
    dm = FewShotDataModule("imagefolder", root=str(folder_root), shots=1, val_shots=1, image_size=8,
                           cache_mb=4 * image / 2**20)
    with pytest.warns(UserWarning, match="image cache full after 1 of 3"):
        dm.setup("fit")
    assert (len(dm.train_set.cache), len(dm.val_set.cache)) == (3, 1)
    assert dm.train_set.cached_bytes + dm.val_set.cached_bytes == 4 * image


def test_corrupt_image_in_kshot_set_fails_at_setup_naming_the_file(folder_root):
    for path in (folder_root / "train" / "owl").iterdir():
        path.write_bytes(b"garbage")
    dm = FewShotDataModule("imagefolder", root=str(folder_root), shots=2, image_size=8)
    with pytest.raises(CorruptImageError, match=r"train/owl/owl 0\d\.png"):
        dm.setup("fit")


def test_class_with_too_few_images_fails_unless_allowed(folder_root):
    for path in sorted((folder_root / "train" / "dog").iterdir())[2:]:
        path.unlink()
    dm = FewShotDataModule("imagefolder", root=str(folder_root), shots=5, image_size=8)
    with pytest.raises(ValueError, match="class 'dog' .* has 2 train images"):
        dm.setup("fit")
    dm = FewShotDataModule("imagefolder", root=str(folder_root), shots=5, image_size=8, allow_fewer=True)
    with pytest.warns(UserWarning):
        dm.setup("fit")
    assert len(dm.train_set) == 12


def test_missing_root_fails_with_the_expected_path(tmp_path):
    dm = FewShotDataModule("cifar10", root=str(tmp_path / "nowhere"), image_size=8)
    dm.prepare_data()  # download=False: nothing to do
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py.*download=True"):
        dm.setup("fit")


def test_bad_arguments_are_rejected_at_construction(folder_root):
    with pytest.raises(ValueError, match="augment"):
        FewShotDataModule("imagefolder", root=str(folder_root), augment="mixup")
    with pytest.raises(ValueError, match="unknown dataset 'cifar11'"):
        FewShotDataModule("cifar11")


def test_validation_loader_is_empty_without_val_shots(folder_root):
    dm = FewShotDataModule("imagefolder", root=str(folder_root), shots=2, image_size=8)
    dm.setup("fit")
    assert dm.val_dataloader() == []


def test_digits_end_to_end_with_lightning_trainer():
    """The module drives a real Trainer fit + test; digits need no files."""
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10))
            self.seen = []

        def training_step(self, batch, _):
            x, y = batch
            self.seen.append(tuple(x.shape))
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def validation_step(self, batch, _):
            pass

        def test_step(self, batch, _):
            self.log("acc", (self.net(batch[0]).argmax(1) == batch[1]).float().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = FewShotDataModule("digits", shots=5, val_shots=1, batch_size=16, image_size=16, augment="paper")
    model = Probe()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_test_batches=2)
    trainer.fit(model, datamodule=dm)
    assert model.seen == [(16, 3, 16, 16)] * 3
    assert trainer.test(model, datamodule=dm, verbose=False)[0]["acc"] >= 0


def test_no_validation_works_with_a_trainer():
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(3, 10)

        def training_step(self, batch, _):
            return torch.nn.functional.cross_entropy(self.w(batch[0].mean(dim=(2, 3))), batch[1])

        def validation_step(self, batch, _):
            raise AssertionError("no validation data was asked for")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = FewShotDataModule("digits", shots=2, batch_size=8, image_size=8, augment="none")
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Tiny(), datamodule=dm)
    assert trainer.global_step == 2


@pytest.mark.skipif(not Path(FASHION_MNIST_SYSTEM_DIR, "train-images-idx3-ubyte.gz").is_file(),
                    reason="apt-get install dataset-fashion-mnist to run this")
def test_real_fashion_mnist_ten_shot(tmp_path):
    dm = FewShotDataModule("fashion_mnist", root=str(tmp_path), shots=10, batch_size=16, image_size=32)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert len(dm.train_set) == 100 and x.shape == (16, 3, 32, 32) and len(dm.train_dataloader()) == 6
    assert dm.class_names[0] == "T-shirt/top"


def test_datasets_and_transforms_pickle_for_spawned_workers(cifar10_root, folder_root):
    import pickle

    for name, root in (("cifar10", cifar10_root), ("imagefolder", folder_root)):
        dm = FewShotDataModule(name, root=str(root), shots=2, image_size=8)
        dm.setup()
        for ds in (dm.train_set, dm.test_set):
            clone = pickle.loads(pickle.dumps(ds))
            assert len(clone) == len(ds) and clone[0][0].shape == (3, 8, 8) and clone[0][1] == ds[0][1]


@pytest.mark.slow
def test_worker_processes_yield_the_same_split(folder_root):
    dm = FewShotDataModule("imagefolder", root=str(folder_root), shots=2, batch_size=2, image_size=8,
                           augment="none", num_workers=2, shuffle_seed=0)
    dm.setup("fit")
    labels = sorted(torch.cat([y for _, y in dm.train_dataloader()]).tolist())
    assert labels == [0, 0, 1, 1, 2, 2]


def lightning_orders(loader, epochs):
    """Each epoch's labels as Lightning's loop takes them from a sized loader: its batches, never asking for one more
    (so a sampler's iterator is not run to its end, unless workers' prefetching does)."""
    return [torch.cat([y for _, y in itertools.islice(loader, len(loader))]).tolist() for _ in range(epochs)]


def test_a_checkpointed_loader_state_continues_the_orders_of_the_uninterrupted_run(cifar10_root):
    """The train order is a seeded DataLoader's (unchanged from before checkpoints kept it), and a module restored
    from ``state_dict`` after epoch e draws the orders epochs e+1, e+2 drew, not epoch 0's again."""
    def module():
        dm = FewShotDataModule("cifar10", root=str(cifar10_root), shots=5, batch_size=10, image_size=8,
                               augment="none", shuffle_seed=3)
        dm.setup("fit")
        return dm

    def orders(loader, epochs):
        return [torch.cat([y for _, y in loader]).tolist() for _ in range(epochs)]

    first = module()
    reference = torch.utils.data.DataLoader(first.train_set, batch_size=10, shuffle=True, drop_last=True,
                                            generator=torch.Generator().manual_seed(3))
    uninterrupted = orders(first.train_dataloader(), 3)
    assert uninterrupted == lightning_orders(reference, 3)
    interrupted = module()
    assert orders(interrupted.train_dataloader(), 1) == uninterrupted[:1]
    resumed = module()
    resumed.load_state_dict(interrupted.state_dict())
    assert orders(resumed.train_dataloader(), 2) == uninterrupted[1:] and uninterrupted[1] != uninterrupted[0]


def test_a_checkpoint_of_a_ddp_run_keeps_the_random_states_its_augmentations_draw_from(cifar10_root):
    """Under DDP the shuffle is Lightning's distributed sampler's, and the module kept nothing: a resumed DDP run
    drew other augmentations and dropout than the uninterrupted one. The global random states are kept as in one
    process."""
    dm = FewShotDataModule("cifar10", root=str(cifar10_root), shots=5, batch_size=10, image_size=8)
    dm.setup("fit")
    assert dm.state_dict() == {}  # no train loader yet: nothing drawn
    dm.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": 0})
    dm.train_dataloader()
    torch.manual_seed(5)
    random.seed(5)
    state = dm.state_dict()
    assert set(state) == {"torch_rng", "python_rng", "rank_rngs"}
    # a copy, not the state itself: a checkpoint holding itself failed every recursive walk (AsyncCheckpointIO)
    assert [set(kept) for kept in state["rank_rngs"]] == [{"torch_rng", "python_rng"}]
    expected = torch.rand(3), random.random()
    torch.manual_seed(6)
    random.seed(6)
    dm.trainer.state = SimpleNamespace(fn="fit")
    dm.load_state_dict(state)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_a_ddp_checkpoint_keeps_every_processs_random_states_and_each_resumes_its_own(cifar10_root, monkeypatch):
    """The processes' random states drift apart (a RandomResizedCrop draws as often as an image's size asks), and rank 0
    alone writes the checkpoint: every rank resumed from rank 0's states, so a DDP run on photos of varied sizes went
    on otherwise than the uninterrupted one."""
    states = []
    for seed in (5, 6):  # rank 0's and rank 1's states when the checkpoint is written
        torch.manual_seed(seed)
        random.seed(seed)
        states.append({"torch_rng": torch.random.get_rng_state(), "python_rng": random.getstate()})
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_gather_object", lambda out, state: out.__setitem__(slice(None), states))
    dm = FewShotDataModule("cifar10", root=str(cifar10_root), shots=5, batch_size=10, image_size=8)
    dm.setup("fit")
    dm.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": 0}, world_size=2,
                                 global_rank=0, state=SimpleNamespace(fn="fit"))
    dm.train_dataloader()
    saved = dm.state_dict()
    assert [torch.equal(kept["torch_rng"], state["torch_rng"]) for kept, state in zip(saved["rank_rngs"], states)] == [
        True, True]
    torch.manual_seed(6)
    random.seed(6)
    expected = torch.rand(3), random.random()
    dm.trainer.global_rank = 1
    torch.manual_seed(0)
    dm.load_state_dict(saved)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    dm.trainer.world_size, dm.trainer.global_rank = 1, 0  # resumed in one process: it cannot go on as the run did
    with pytest.warns(RuntimeWarning, match="resumes a run of 2 processes on 1"):
        dm.load_state_dict(saved)


def test_evaluation_passes_leave_the_global_random_state_alone(cifar10_root):
    """A loader without a generator of its own draws its workers' seed from the global random state at every pass:
    each validation pass shifted every later augmentation, so the trained weights depended on how often the run
    validated."""
    dm = FewShotDataModule("cifar10", root=str(cifar10_root), shots=2, val_shots=1, image_size=8)
    dm.setup("fit")
    torch.manual_seed(3)
    state = torch.get_rng_state()
    for loader in (dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        list(loader)
    assert torch.equal(torch.get_rng_state(), state)


def test_an_evaluation_set_smaller_than_the_processes_sharing_it_is_refused_naming_both(cifar10_root):
    # the process left without an image failed inside Lightning ("DataLoader within local rank has zero length")
    # while the other waited on it, after the training
    dm = FewShotDataModule("cifar10", root=str(cifar10_root), shots=2, val_shots=1, image_size=8)
    dm.setup("fit")
    processes = len(dm.val_set) + 1
    dm.trainer = SimpleNamespace(world_size=processes, global_rank=0)
    with pytest.raises(ValueError, match=rf"the validation set holds {len(dm.val_set)} image\(s\), fewer than the "
                                         rf"{processes} processes that share it"):
        dm.val_dataloader()
    dm.trainer.world_size = len(dm.val_set)  # one image each: evaluated
    assert sum(len(y) for _, y in dm.val_dataloader()) == 1


def test_loader_workers_change_neither_the_orders_nor_a_resumed_runs_orders(cifar10_root):
    """Persistent workers make one loader iterator per run (one more after a resume), no workers one per epoch, and
    each iterator draws its workers' seed: the orders must come from the seeded shuffle alone."""
    def module(workers):
        dm = FewShotDataModule("cifar10", root=str(cifar10_root), shots=5, batch_size=10, image_size=8,
                               augment="none", shuffle_seed=3, num_workers=workers)
        dm.setup("fit")
        return dm

    def orders(loader, epochs):
        return [torch.cat([y for _, y in loader]).tolist() for _ in range(epochs)]

    # Lightning stops a loader without workers after its last batch; workers' prefetching runs the shuffle to its end
    without_workers = lightning_orders(module(0).train_dataloader(), 3)
    assert orders(module(2).train_dataloader(), 3) == without_workers == orders(module(0).train_dataloader(), 3)
    interrupted = module(2)
    assert orders(interrupted.train_dataloader(), 1) == without_workers[:1]
    resumed = module(2)
    resumed.load_state_dict(interrupted.state_dict())
    assert orders(resumed.train_dataloader(), 2) == without_workers[1:]
    # Fewer images than a batch: one partial batch, for which Lightning runs the shuffle to its end (as a plain
    # seeded DataLoader does), with or without workers.
    small = [FewShotDataModule("cifar10", root=str(cifar10_root), shots=1, batch_size=16, image_size=8,
                               augment="none", shuffle_seed=3, num_workers=workers) for workers in (0, 2)]
    for dm in small:
        dm.setup("fit")
    reference = torch.utils.data.DataLoader(small[0].train_set, batch_size=16, shuffle=True,
                                            generator=torch.Generator().manual_seed(3))
    assert lightning_orders(small[0].train_dataloader(), 3) == orders(small[1].train_dataloader(), 3) == \
        orders(reference, 3)


class _LabelRecorder(__import__("lightning").LightningModule):
    """Trains nothing that matters: records each training batch's labels, in the order the fit takes them."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.labels = []

    def training_step(self, batch, index):
        self.labels.append(batch[1].tolist())
        return self.weight ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("reload", [0, 1])
def test_a_fits_orders_do_not_depend_on_workers_when_its_loaders_are_rebuilt_every_epoch(cifar10_root, reload):
    # Lightning iterates a rebuilt loader twice, and one with workers draws its first batches each time: every
    # reload drew an order for nothing, so with workers the fit trained on other batches than without
    import lightning as L

    labels = []
    for workers in (0, 2):
        dm = FewShotDataModule("cifar10", root=str(cifar10_root), shots=5, batch_size=10, image_size=8,
                               augment="none", shuffle_seed=3, num_workers=workers)
        recorder = _LabelRecorder()
        L.Trainer(max_epochs=3, reload_dataloaders_every_n_epochs=reload, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0).fit(recorder,
                                                                                               datamodule=dm)
        labels.append(recorder.labels)
    assert labels[0] == labels[1]
    steps = len(labels[0]) // 3
    epochs = [labels[0][e * steps:(e + 1) * steps] for e in range(3)]
    assert epochs[0] != epochs[1] != epochs[2]  # new orders each epoch, reloaded or not


class _ValidatedLabelRecorder(_LabelRecorder):
    def validation_step(self, batch, index):
        pass


@pytest.mark.parametrize("reload,validation", [(0, None), (1, None), (0, 0.5), (1, 0.5)],
                         ids=["", "reload", "validated_mid_epoch", "reload-validated_mid_epoch"])
def test_a_run_resumed_from_an_epoch_end_checkpoint_trains_on_the_uninterrupted_runs_orders_with_workers(
        cifar10_root, tmp_path, reload, validation):
    # Was: the resumed fit started its loader while Lightning still named the finished epoch (current_epoch; with
    # validation within the epoch the checkpoint is saved before the epoch counts as processed), its workers drew
    # that epoch an order, and the epoch that trained drew again: every later epoch took the next one's order
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(recorder, callbacks=(), ckpt_path=None):
        data = FewShotDataModule("cifar10", root=str(cifar10_root), shots=5, val_shots=1 if validation else 0,
                                 batch_size=10, image_size=8, augment="none", shuffle_seed=3, num_workers=2)
        L.Trainer(max_epochs=4, reload_dataloaders_every_n_epochs=reload, logger=False, callbacks=list(callbacks),
                  enable_checkpointing=bool(callbacks), enable_progress_bar=False, enable_model_summary=False,
                  val_check_interval=validation or 1.0, limit_val_batches=1 if validation else 0,
                  limit_train_batches=4,
                  num_sanity_val_steps=0, default_root_dir=tmp_path).fit(recorder, datamodule=data,
                                                                        ckpt_path=ckpt_path)
        return recorder.labels

    recorder = _ValidatedLabelRecorder if validation else _LabelRecorder
    every_epoch = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
    uninterrupted = fit(recorder(), [every_epoch])
    # the epoch's last save: at its end, or at the validation after its last batch (epoch=1-v1.ckpt)
    last_of_epoch_1 = max(tmp_path.glob("epoch=1*.ckpt"), key=lambda path: path.stat().st_mtime_ns)
    resumed = fit(recorder(), ckpt_path=last_of_epoch_1)
    assert resumed == uninterrupted[len(uninterrupted) // 2:]


def test_hidden_folders_and_files_are_not_classes_or_images(tmp_path):
    write_imagefolder(tmp_path / "pets", train_per_class=6, eval_per_class=2, eval_folder="test")
    for split in ("train", "test"):
        (tmp_path / "pets" / split / ".ipynb_checkpoints").mkdir()
        (tmp_path / "pets" / split / "cat" / "._cat 00.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    dm = FewShotDataModule("imagefolder", root=str(tmp_path / "pets"), shots=2, image_size=8, augment="none")
    assert dm.class_names == ["cat", "dog", "owl"] and dm.num_classes == 3
    dm.setup()
    assert len(dm.test_set) == 6 and not dm.test_set.dataset.unreadable_files()
    assert all("._" not in path for path, _ in dm.test_set.dataset.samples)


def test_an_imagefolder_with_one_class_says_so(tmp_path):
    write_imagefolder(tmp_path / "one", classes=("only",), eval_folder="test")
    with pytest.raises(ValueError, match="has one class \\('only'\\): a classifier needs at least two"):
        FewShotDataModule("imagefolder", root=str(tmp_path / "one"), shots=2, image_size=8).num_classes


def test_a_held_out_class_without_images_is_named_in_a_warning(tmp_path):
    write_imagefolder(tmp_path / "pets", train_per_class=6, eval_per_class=2, eval_folder="test")
    for image in (tmp_path / "pets" / "test" / "dog").iterdir():
        image.unlink()
    dm = FewShotDataModule("imagefolder", root=str(tmp_path / "pets"), shots=2, image_size=8, augment="none")
    with pytest.warns(UserWarning, match=r"no images of classes \['dog'\]"):
        dm.setup("test")


def test_loaders_built_again_each_epoch_go_on_shuffling_as_one_loader_does(tmp_path):
    """``reload_dataloaders_every_n_epochs=1`` (was: every rebuilt loader seeded its shuffle anew, so each epoch
    trained on the first epoch's batch order); a new Trainer's fit starts the seeded orders again."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    import nola_vision as nv

    class Orders(Callback):
        def __init__(self):
            self.first = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.first.setdefault(trainer.current_epoch, batch[1].tolist())

    def orders(reload: int):
        L.seed_everything(0)
        data = FewShotDataModule("digits", shots=2, image_size=32, backbone="vit_tiny_patch16_224", augment="none",
                                 batch_size=4)
        model = nv.FewShotClassifier("vit_tiny_patch16_224", 10, "linear", pretrained=False, image_size=32,
                                     backbone_kwargs={"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2},
                                     adapter_dir=str(tmp_path / f"adapter{reload}"))
        seen = Orders()
        L.Trainer(max_epochs=3, reload_dataloaders_every_n_epochs=reload, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, callbacks=[seen], num_sanity_val_steps=0,
                  default_root_dir=tmp_path).fit(model, datamodule=data)
        return [seen.first[epoch] for epoch in range(3)]

    once = orders(0)
    assert len({str(order) for order in once}) == 3
    assert orders(1) == once


@pytest.mark.parametrize("stage", ["train", "Fit", "testing"])
def test_setup_refuses_a_stage_it_does_not_know_listing_the_stages(folder_root, stage):
    """setup('train') drew nothing, and the loader then said to call setup(), which had been called."""
    dm = FewShotDataModule("imagefolder", root=str(folder_root), shots=1, image_size=8)
    with pytest.raises(ValueError, match=rf"setup\(stage='{stage}'\): not a stage; use one of None, 'fit', 'validate', "
                                         r"'test', 'predict'"):
        dm.setup(stage)
    dm.setup(TrainerFn.FITTING)  # what Lightning passes
    assert len(dm.train_set) == 3


def test_resuming_a_checkpoint_without_its_data_modules_state_warns_that_the_order_starts_again(cifar10_root,
                                                                                                tmp_path):
    # checkpoints of builds before the shuffle state was kept resumed silently on the first epoch's order again
    import lightning as L

    from nola_vision import NOLAConfig
    from nola_vision.train.module import FewShotClassifier

    def fit(epochs, ckpt_path=None):
        data = FewShotDataModule("cifar10", root=str(cifar10_root), shots=2, batch_size=10, image_size=32,
                                 augment="none", backbone="vit_tiny_patch16_224")
        model = FewShotClassifier(num_classes=10, backbone="vit_tiny_patch16_224", pretrained=False, image_size=32,
                                  backbone_kwargs=dict(patch_size=8, depth=1, embed_dim=32, num_heads=2),
                                  adapter=NOLAConfig(num_basis_a=8, num_basis_b=8), warmup_epochs=0)
        L.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  default_root_dir=tmp_path, limit_val_batches=0).fit(model, datamodule=data, ckpt_path=ckpt_path)

    fit(1)
    checkpoint = next((tmp_path / "checkpoints").glob("*.ckpt"))
    saved = torch.load(checkpoint, weights_only=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(2, ckpt_path=checkpoint)
    assert not [w for w in caught if "no state of its data module" in str(w.message)]  # resumed with that state
    del saved["FewShotDataModule"]  # as written before that state was kept (with no digests of it then)
    del saved["nola_vision"]["resume_sha256"], saved["nola_vision"]["record_sha256"]
    torch.save(saved, checkpoint)
    with pytest.warns(UserWarning, match=r"checkpoint holds no state of its data module .*shuffle the images and "
                                         r"draw augmentations from the seed's start again"):
        fit(2, ckpt_path=checkpoint)
