"""CLI runs that used to lose work or report silently wrong numbers: a second run into a finished one's folder,
resumes that were not the interrupted run, tests of untrained or mismatched checkpoints, failures found only after
training."""
import json
import os
import pickle
import re
import shutil
from itertools import count
from pathlib import Path

import lightning.pytorch
import pytest
import torch
import yaml
from fixtures_data import write_imagefolder
from lightning.pytorch.utilities.exceptions import SIGTERMException

from nola_vision.cli import main
from nola_vision.data import FewShotDataModule, read_manifest
from nola_vision.data.fewshot import draw_order
from nola_vision.train.cli import run_lightning_cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_offline.yaml"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
FIT = ["fit", "-c", str(TINY), *QUIET]


def run(capsys, *args):
    """Exit code and stderr of the console script's main, in this process."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def trained_tensors(checkpoint):
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]


def stop_inside_epoch_2(monkeypatch):
    """Make the next fit stop by Ctrl-C at the third batch of epoch 2 (after a validation inside that epoch saved
    last.ckpt, where validation runs twice an epoch); returns the real training step, to put back."""
    from nola_vision.train.module import FewShotClassifier

    step = FewShotClassifier.training_step

    def stopped(self, batch, batch_idx):
        if self.current_epoch == 2 and batch_idx == 2:
            raise KeyboardInterrupt
        return step(self, batch, batch_idx)

    monkeypatch.setattr(FewShotClassifier, "training_step", stopped)
    return step


def test_a_second_fit_into_a_finished_runs_folder_is_refused_and_resuming_it_is_not(tmp_path, capsys):
    assert run(capsys, *FIT, "--trainer.default_root_dir", tmp_path, "--trainer.max_epochs", 1)[0] == 0
    kept = {p: p.read_bytes() for p in [tmp_path / "config.yaml", *(tmp_path / "adapter").iterdir()]}
    code, err = run(capsys, *FIT, "--trainer.default_root_dir", tmp_path, "--trainer.max_epochs", 1,
                    "--data.split_seed", 7)
    assert code == 2 and "already holds another run" in err and "--ckpt_path last" in err
    other = tmp_path.with_name(f"{tmp_path.name}_other")  # its checkpoint would continue it over this run's files
    assert run(capsys, *FIT, "--trainer.default_root_dir", other, "--trainer.max_epochs", 1)[0] == 0
    code, err = run(capsys, *FIT, "--trainer.default_root_dir", tmp_path, "--trainer.max_epochs", 2,
                    "--ckpt_path", other / "checkpoints" / "last.ckpt")
    assert code == 2 and "already holds another run" in err and "belongs to another folder" in err
    # a debug pass runs, but neither replaces the run's adapter nor writes a result
    assert run(capsys, *FIT, "--trainer.default_root_dir", tmp_path, "--trainer.fast_dev_run", "true",
               "--result_file", tmp_path / "debug.json")[0] == 0
    assert {p: p.read_bytes() for p in kept} == kept and not (tmp_path / "debug.json").exists()
    assert run(capsys, *FIT, "--trainer.default_root_dir", tmp_path, "--trainer.max_epochs", 2,
               "--ckpt_path", "last")[0] == 0


def test_a_run_killed_between_its_epoch_checkpoint_and_last_ckpt_is_resumed_from_the_checkpoint_it_names(tmp_path,
                                                                                                          capsys):
    # Lightning writes epoch=E-step=S.ckpt, then last.ckpt: a kill between them kept one, and both messages sent the
    # user to --ckpt_path last, which then found nothing to resume
    fit = [*FIT, "--trainer.default_root_dir", tmp_path, "--test_after_fit", "false", "--trainer.max_epochs", 1]
    assert run(capsys, *fit)[0] == 0
    (tmp_path / "checkpoints" / "last.ckpt").unlink()
    epoch = next((tmp_path / "checkpoints").glob("epoch=0-step=*.ckpt"))
    code, err = run(capsys, *fit, "--data.split_seed", 7)
    assert code == 2 and "already holds another run" in err and f"--ckpt_path {epoch} (its newest checkpoint" in err
    code, err = run(capsys, *fit[:-1], 2, "--ckpt_path", "last")
    assert code == 2 and f"no last.ckpt under {tmp_path}" in err and f"to resume, pass --ckpt_path {epoch}" in err
    assert run(capsys, *fit[:-1], 2, "--ckpt_path", epoch)[0] == 0
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 1


def test_a_resumed_run_trains_exactly_as_the_uninterrupted_run(tmp_path, capsys):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    fit = [*FIT, "--test_after_fit", "false", "--data.augment", "paper"]  # random crops, jitter and flips as well
    assert run(capsys, *fit, "--trainer.default_root_dir", whole)[0] == 0
    # 50 images in batches of 16 (the last dropped): 3 steps per epoch, so this stops after epoch 0
    assert run(capsys, *fit, "--trainer.default_root_dir", parts, "--trainer.max_steps", 3)[0] == 0
    assert run(capsys, *fit, "--trainer.default_root_dir", parts, "--ckpt_path", "last")[0] == 0
    a, b = (trained_tensors(root / "checkpoints" / "last.ckpt") for root in (whole, parts))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_stopped_after_a_save_inside_an_epoch_resumes_from_the_epoch_before_exactly(tmp_path, capsys,
                                                                                         monkeypatch):
    """Validation inside each epoch saves last.ckpt (and the epoch's checkpoint) there, where no fit resumes from: a
    run stopped inside an epoch kept nothing to resume, every trained epoch lost. The end of the epoch before is kept
    as epoch-end.ckpt, and --ckpt_path last resumes from it, training as the uninterrupted run did."""
    from nola_vision.train.module import FewShotClassifier

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    fit = [*FIT, "--test_after_fit", "false", "--trainer.max_epochs", 3, "--data.val_shots", 2,
           "--trainer.val_check_interval", 0.5]
    assert run(capsys, *fit, "--trainer.default_root_dir", whole)[0] == 0
    step = stop_inside_epoch_2(monkeypatch)
    code, err = run(capsys, *fit, "--trainer.default_root_dir", parts)
    kept = parts / "checkpoints" / "epoch-end.ckpt"
    assert code == 130 and f"resume with --ckpt_path {kept}" in err
    assert torch.load(kept, weights_only=False)["epoch"] == 1
    monkeypatch.setattr(FewShotClassifier, "training_step", step)
    with pytest.warns(UserWarning, match=f"resuming from {re.escape(str(kept))}, saved at the end of the epoch"):
        assert run(capsys, *fit, "--trainer.default_root_dir", parts, "--ckpt_path", "last")[0] == 0
    a, b = (trained_tensors(root / "checkpoints" / "last.ckpt") for root in (whole, parts))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_each_checkpoint_folder_keeps_its_epoch_end_and_a_cut_short_last_ckpt_is_named_not_passed_over(
        tmp_path, capsys, monkeypatch):
    """With two ModelCheckpoint folders only the first kept epoch-end.ckpt, and --ckpt_path last (the other folder's
    last.ckpt, saved inside an epoch) was refused; a last.ckpt cut short resumed an epoch earlier without a word of
    the damage, passing over the whole epoch=E-step=S.ckpt beside it."""
    from nola_vision.train.module import FewShotClassifier

    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp_path / "A"), "monitor": "val/acc", "mode": "max"}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp_path / "B")}}]}}))
    fit = [*FIT, "-c", callbacks, "--trainer.default_root_dir", tmp_path / "run", "--test_after_fit", "false",
           "--trainer.max_epochs", 3, "--data.val_shots", 2, "--trainer.val_check_interval", 0.5]
    step = stop_inside_epoch_2(monkeypatch)
    assert run(capsys, *fit)[0] == 130
    for folder in ("A", "B"):
        assert torch.load(tmp_path / folder / "epoch-end.ckpt", weights_only=False)["epoch"] == 1
    monkeypatch.setattr(FewShotClassifier, "training_step", step)
    with pytest.warns(UserWarning, match="resuming from .*epoch-end.ckpt"):
        assert run(capsys, *fit, "--ckpt_path", "last")[0] == 0
    last = tmp_path / "B" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:100])
    code, err = run(capsys, *fit[:-6], "--trainer.max_epochs", 4, "--ckpt_path", "last")
    assert code == 2 and f"--ckpt_path {last} is not a checkpoint written by fit" in err


@pytest.mark.parametrize("setup", ["two callbacks in one folder", "save_last off", "asynchronous writer"])
def test_the_epoch_end_checkpoint_is_kept_whatever_the_checkpoint_setup(tmp_path, capsys, monkeypatch, setup):
    """A second callback in the folder without last.ckpt hid the first one's; a callback with save_last off kept
    none; an asynchronous writer was still writing the epoch's checkpoint when it was to be kept (none kept)."""
    checkpoint = "lightning.pytorch.callbacks.ModelCheckpoint"
    folder = str(tmp_path / "checkpoints")
    callbacks = {"two callbacks in one folder": [
        {"class_path": checkpoint, "init_args": {"dirpath": folder}},
        {"class_path": checkpoint, "init_args": {"dirpath": folder, "monitor": "val/acc", "mode": "max",
                                                  "save_last": False}}],
        "save_last off": [{"class_path": checkpoint, "init_args": {"dirpath": folder, "save_last": False}}],
        "asynchronous writer": [{"class_path": checkpoint, "init_args": {"dirpath": folder}}]}[setup]
    trainer = {"callbacks": callbacks}
    if setup == "asynchronous writer":
        trainer["plugins"] = [{"class_path": "lightning.pytorch.plugins.io.AsyncCheckpointIO",
                               "init_args": {"checkpoint_io": {"class_path": "slow_checkpoint_io.SlowCheckpointIO"}}}]
    settings = tmp_path / "settings.yaml"
    settings.write_text(yaml.safe_dump({"trainer": trainer}))
    stop_inside_epoch_2(monkeypatch)
    fit = [*FIT, "-c", settings, "--trainer.default_root_dir", tmp_path, "--test_after_fit", "false",
           "--trainer.max_epochs", 3, "--data.val_shots", 2, "--trainer.val_check_interval", 0.5]
    code, err = run(capsys, *fit)
    kept = tmp_path / "checkpoints" / "epoch-end.ckpt"
    assert code == 130 and f"resume with --ckpt_path {kept}" in err
    assert torch.load(kept, weights_only=False)["epoch"] == 1


def test_a_finished_run_stopped_in_its_test_names_the_checkpoint_of_its_final_weights(tmp_path, capsys, monkeypatch):
    """Stopped by max_steps inside its second epoch, then interrupted in its test, the run named epoch-end.ckpt
    (the first epoch's end) as the checkpoint to test, not last.ckpt, which holds the exported adapter's weights."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lightning.pytorch.Trainer, "test", interrupted)
    code, err = run(capsys, *FIT, "--trainer.default_root_dir", tmp_path, "--trainer.max_steps", 5)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert code == 130 and f"--ckpt_path {last}" in " ".join(err.split()) and "epoch-end" not in err


def test_the_epoch_end_checkpoint_is_a_whole_copy_where_it_is_not_linked(tmp_path):
    """Where saves may rewrite last.ckpt in place (a checkpoint writer of the user's), a hard link would change with
    it: the kept checkpoint is then a copy, and one not whole (an asynchronous writer's, unfinished) is not kept."""
    from nola_vision.train.cli import keep_epoch_end

    first = run_lightning_cli([*FIT, "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_epochs", "1",
                               "--test_after_fit", "false"])
    source = Path(first.trainer.checkpoint_callback.last_model_path)
    keep_epoch_end(source, tmp_path / "copy.ckpt", link=False)
    assert os.stat(tmp_path / "copy.ckpt").st_ino != os.stat(source).st_ino
    assert (tmp_path / "copy.ckpt").read_bytes() == source.read_bytes()
    (tmp_path / "partial.ckpt").write_bytes(source.read_bytes()[:200])
    with pytest.warns(UserWarning, match="was not whole when copied"):
        keep_epoch_end(tmp_path / "partial.ckpt", tmp_path / "copy.ckpt", link=False)
    assert (tmp_path / "copy.ckpt").read_bytes() == source.read_bytes()


def test_resuming_on_another_split_is_refused(tmp_path, capsys):
    assert run(capsys, *FIT, "--trainer.default_root_dir", tmp_path, "--trainer.max_epochs", 1)[0] == 0
    code, err = run(capsys, *FIT, "--trainer.default_root_dir", tmp_path, "--trainer.max_epochs", 2,
                    "--ckpt_path", "last", "--data.split_seed", 7)
    assert code == 2 and "resuming trains on another split" in err and "--data.split_seed 7 (checkpoint: 0)" in err
    # every image drawn (shots 0): the same images, which the seed orders and the shuffle indexes into, so other batches
    every = tmp_path / "every"
    assert run(capsys, *FIT, "--trainer.default_root_dir", every, "--trainer.max_epochs", 1, "--data.shots", 0)[0] == 0
    code, err = run(capsys, *FIT, "--trainer.default_root_dir", every, "--trainer.max_epochs", 2, "--data.shots", 0,
                    "--ckpt_path", "last", "--data.split_seed", 7)
    assert code == 2 and "resuming trains the run's images in another order than the run did (--data.split_seed 7 " \
                         "(checkpoint: 0))" in err
    assert run(capsys, *FIT, "--trainer.default_root_dir", every, "--trainer.max_epochs", 2, "--data.shots", 0,
               "--ckpt_path", "last")[0] == 0


def test_a_callback_monitoring_validation_without_validation_images_is_refused_before_training(tmp_path, capsys):
    code, err = run(capsys, *FIT, "--trainer.default_root_dir", tmp_path, "--trainer.callbacks+=EarlyStopping",
                    "--trainer.callbacks.monitor", "val/acc")
    assert code == 2 and "EarlyStopping(monitor='val/acc') monitors a validation metric" in err and "val_shots" in err
    assert not list(tmp_path.glob("checkpoints/*.ckpt"))  # it failed after the first epoch, with a traceback
    assert run(capsys, *FIT, "--trainer.default_root_dir", tmp_path, "--trainer.callbacks+=EarlyStopping",
               "--trainer.callbacks.monitor", "val/acc", "--data.val_shots", 2, "--trainer.max_epochs", 1,
               "--test_after_fit", "false")[0] == 0


def test_validating_on_another_split_or_testing_with_other_preprocessing_is_refused(tmp_path, capsys):
    assert run(capsys, *FIT, "--trainer.default_root_dir", tmp_path, "--trainer.max_epochs", 1,
               "--data.val_shots", 2, "--test_after_fit", "false")[0] == 0
    evaluate = ["-c", TINY, *QUIET, "--trainer.default_root_dir", tmp_path, "--ckpt_path", "last"]
    code, err = run(capsys, "validate", *evaluate, "--data.val_shots", 2, "--data.split_seed", 7)
    assert code == 2 and "validating draws its images from another split" in err  # they could be training images
    code, err = run(capsys, "test", *evaluate, "--data.normalize", "imagenet")
    assert code == 2 and "preprocessed evaluation images as" in err and "--data.normalize" in err
    assert run(capsys, "test", *evaluate)[0] == 0


def test_validating_or_resuming_after_images_were_added_is_refused_and_the_runs_manifests_are_kept(tmp_path, capsys):
    """An image added to a class folder changes the draw of the same settings (a validation image could be one the
    checkpoint trained on): the checkpoint's digest of its drawn images refuses it. A replay of the run's manifests
    passes, and so does a checkpoint written before checkpoints recorded the digest."""
    write_imagefolder(tmp_path / "pets", train_per_class=6, eval_folder="test")
    splits, run_dir = tmp_path / "splits", tmp_path / "run"
    data = ["--data.dataset", "imagefolder", "--data.root", tmp_path / "pets", "--data.shots", 2, "--data.val_shots", 2]
    assert run(capsys, *FIT, *data, "--data.split_dir", splits, "--trainer.default_root_dir", run_dir,
               "--trainer.max_epochs", 1, "--test_after_fit", "false")[0] == 0
    manifests = {path: path.read_bytes() for path in splits.iterdir()}
    cats = [key for key, label in read_manifest(splits / "imagefolder_2shot_seed0_train.txt") if label == 0]
    first = min(draw_order(key, 0) for key in cats)
    added = next(key for key in (f"train/cat/new {i}.png" for i in count()) if draw_order(key, 0) < first)
    shutil.copy(tmp_path / "pets" / cats[0], tmp_path / "pets" / added)  # drawn before the run's first 'cat' image

    validate = ["validate", "-c", TINY, *QUIET, *data, "--trainer.default_root_dir", run_dir]
    code, err = run(capsys, *validate, "--ckpt_path", "last", "--data.split_dir", splits)
    assert code == 2 and "lists another k-shot split than this run draws" in err and "not replaced" in err
    assert {path: path.read_bytes() for path in splits.iterdir()} == manifests
    code, err = run(capsys, *validate, "--ckpt_path", "last")
    assert code == 2 and "validating draws its images from another split than the run did, with the same data" in err
    code, err = run(capsys, *FIT, *data, "--trainer.default_root_dir", run_dir, "--trainer.max_epochs", 2,
                    "--ckpt_path", "last")
    assert code == 2 and "resuming trains on another split than the run did, with the same data settings" in err
    replay = ["--data.split_file", splits / "imagefolder_2shot_seed0_train.txt",
              "--data.val_split_file", splits / "imagefolder_2shot_seed0_val2.txt"]
    assert run(capsys, *validate, "--ckpt_path", "last", *replay, "--data.split_dir", splits)[0] == 0
    older = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    del older["nola_vision"]["data"]["split_digest"], older["nola_vision"]["record_sha256"]
    # and its root as typed: relative (the CLI records it absolute now, and no resume of such a run was possible)
    older["nola_vision"]["data"]["split"]["root"] = os.path.relpath(tmp_path / "pets")
    older["nola_vision"]["data"]["split"]["dataset"] = "ImageFolder"  # and its dataset as typed, in another spelling
    torch.save(older, tmp_path / "older.ckpt")
    assert run(capsys, *validate, "--ckpt_path", tmp_path / "older.ckpt")[0] == 0  # compared by its settings


def test_the_results_of_a_hand_written_manifest_record_no_split_seed(tmp_path, capsys):
    # they recorded the config's split_seed 0, and test's record took the manifest header's claim
    write_imagefolder(tmp_path / "pets", train_per_class=6, eval_folder="test")
    data = ["--data.dataset", "imagefolder", "--data.root", tmp_path / "pets"]
    manifest = tmp_path / "chosen.txt"
    manifest.write_text("# nola_vision k-shot manifest: dataset=imagefolder shots=3 split_seed=5\n" + "".join(
        f"train/{name}/{name} {i:02d}.png {label}\n" for label, name in enumerate(("cat", "dog", "owl"))
        for i in range(1, 4)))
    run_dir = tmp_path / "run"
    assert run(capsys, *FIT, *data, "--data.split_file", manifest, "--trainer.default_root_dir", run_dir,
               "--trainer.max_epochs", 1, "--result_file", tmp_path / "fit.json")[0] == 0
    assert json.loads((tmp_path / "fit.json").read_text())["config"]["split_seed"] is None
    assert run(capsys, "test", "-c", TINY, *QUIET, *data, "--trainer.default_root_dir", run_dir, "--ckpt_path", "last",
               "--result_file", tmp_path / "test.json")[0] == 0
    recorded = json.loads((tmp_path / "test.json").read_text())["config"]
    assert (recorded["shots"], recorded["split_seed"]) == (3, None)


def test_val_shots_with_a_split_file_but_no_validation_manifest_is_refused_before_training(tmp_path, capsys):
    drawn = FewShotDataModule("digits", shots=5, image_size=8, augment="none")
    drawn.setup("fit")
    manifest = drawn.save_split(str(tmp_path / "splits"))
    code, err = run(capsys, *FIT, "--trainer.default_root_dir", tmp_path / "run", "--data.split_file", manifest,
                    "--data.val_shots", 2, "--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor",
                    "val/acc")
    assert code == 2 and "with a split_file but no val_split_file" in err and "--data.val_split_file" in err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_evaluating_without_or_with_a_wrong_checkpoint_says_what_is_wrong(tmp_path, capsys):
    for subcommand in ("test", "validate", "predict"):
        code, err = run(capsys, subcommand, "-c", TINY, *QUIET, "--trainer.default_root_dir", tmp_path)
        assert code == 2 and "would evaluate the untrained model" in err
    code, err = run(capsys, "test", "-c", TINY, *QUIET, "--trainer.default_root_dir", tmp_path, "--ckpt_path", "last")
    assert code == 2 and "no last.ckpt under" in err
    assert run(capsys, *FIT, "--trainer.default_root_dir", tmp_path, "--trainer.max_epochs", 1)[0] == 0
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    (tmp_path / "cut.ckpt").write_bytes(checkpoint.read_bytes()[:20000])
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    import numpy as np  # a zip archive of other files passed the zip check, then failed in torch with a traceback

    np.savez(tmp_path / "arrays.npz", a=np.zeros(3))
    for bad in ("cut.ckpt", "text.ckpt", "arrays.npz"):
        code, err = run(capsys, "test", "-c", TINY, *QUIET, "--ckpt_path", tmp_path / bad)
        assert code == 2 and "is not a checkpoint written by fit" in err and "Traceback" not in err
    # torch's format before zip archives, which torch reads but not memory-mapped: that failed with a traceback
    torch.save(torch.load(checkpoint, weights_only=False), tmp_path / "legacy.ckpt",
               _use_new_zipfile_serialization=False)
    code, err = run(capsys, "test", "-c", TINY, *QUIET, "--ckpt_path", tmp_path / "legacy.ckpt")
    assert code == 0 and "Traceback" not in err
    # a damaged record (KeyError, AttributeError), and none at all: its split was then not compared when validating
    saved = torch.load(checkpoint, weights_only=False)
    for name, record in (("empty", {}), ("text", "x"), ("no_basis", {**saved["nola_vision"], "record_sha256": None})):
        if name == "no_basis":
            del record["basis_fingerprint"], record["record_sha256"]
        torch.save({**saved, "nola_vision": record}, tmp_path / f"{name}.ckpt")
        code, err = run(capsys, "test", "-c", TINY, *QUIET, "--ckpt_path", tmp_path / f"{name}.ckpt")
        assert code == 2 and "checkpoint['nola_vision']) lacks what every record holds" in err, name
    torch.save({key: value for key, value in saved.items() if key != "nola_vision"}, tmp_path / "unrecorded.ckpt")
    code, err = run(capsys, "validate", "-c", TINY, *QUIET, "--ckpt_path", tmp_path / "unrecorded.ckpt",
                    "--data.split_seed", 1, "--data.val_shots", 2)
    assert code == 2 and "validating draws its images from another split than the run did" in err
    # an object weights_only loading refuses: Lightning's UnpicklingError ended in a traceback
    torch.save({"state_dict": {}, "callbacks": {"mine": Path("x")}}, tmp_path / "objects.ckpt")
    code, err = run(capsys, "test", "-c", TINY, *QUIET, "--ckpt_path", tmp_path / "objects.ckpt")
    # Python 3.13 pickles the class as pathlib._local.PosixPath
    assert code == 2 and re.search(r"holds objects that safe loading refuses \(pathlib(\._local)?\.PosixPath", err)
    assert "Traceback" not in err
    # torch files that are no Lightning checkpoint: Lightning's KeyError ended in a traceback
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    torch.save({"weight": torch.ones(2)}, tmp_path / "weights.ckpt")
    for bad, what in (("plain.ckpt", "lacks pytorch-lightning_version. "), ("weights.ckpt", "(a bare state dict")):
        code, err = run(capsys, "test", "-c", TINY, *QUIET, "--ckpt_path", tmp_path / bad)
        assert code == 2 and "is a torch file, but not a checkpoint written by fit" in err and what in err, err
        assert "Traceback" not in err
    # a 10-class digits checkpoint on 3 classes, then on 10 classes with other names
    write_imagefolder(tmp_path / "pets", eval_folder="test")
    write_imagefolder(tmp_path / "ten", classes=tuple("abcdefghij"), eval_folder="test")
    data = ["--data.dataset", "imagefolder", "--data.shots", 2]
    test = ["test", "-c", TINY, *QUIET, "--ckpt_path", checkpoint, *data]
    code, err = run(capsys, *test, "--data.root", tmp_path / "pets")
    assert code == 2 and "trained on 10 classes, and this model's head has 3 outputs" in err
    code, err = run(capsys, *test, "--data.root", tmp_path / "ten")
    assert code == 2 and "trained on classes ['0', '1', '2', '3', '4'] ..., the data has ['a', 'b'" in err


def test_what_the_end_of_a_run_needs_is_checked_before_it_trains(tmp_path, capsys):
    code, err = run(capsys, *FIT, "--trainer.default_root_dir", tmp_path / "a", "--result_file", tmp_path)
    assert code == 2 and "is a directory" in err
    write_imagefolder(tmp_path / "pets", eval_folder="test")
    (tmp_path / "pets" / "test" / "cat" / "cat 00.png").write_bytes(b"")
    code, err = run(capsys, *FIT, "--trainer.default_root_dir", tmp_path / "b", "--data.dataset", "imagefolder",
                    "--data.root", tmp_path / "pets", "--data.shots", 2)
    assert code == 2 and "cat 00.png" in err  # refused, not failed
    assert "1 test image(s) cannot be read: " in err and "cat 00.png is empty (0 bytes" in err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_an_empty_config_and_a_validation_without_images_are_named(tmp_path, capsys):
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    code, err = run(capsys, "fit", "-c", tmp_path / "empty.yaml")
    assert code == 2 and "empty.yaml is empty" in err
    assert run(capsys, *FIT, "--trainer.default_root_dir", tmp_path, "--trainer.max_epochs", 1,
               "--result_file", tmp_path / "r.json")[0] == 0
    assert json.loads((tmp_path / "r.json").read_text())["adapter_bits"] == 16
    code, err = run(capsys, "validate", "-c", TINY, *QUIET, "--ckpt_path", tmp_path / "checkpoints" / "last.ckpt")
    assert code == 2 and "validate needs validation images: set --data.val_shots" in err
    # setting them is refused as another split: say so, and what evaluates such a run, not only to set them
    assert "a run trained without them has none to validate on" in err and "nola-vision test instead" in err


def test_the_demo_refuses_repeated_seeds_and_names_its_own_options(capsys):
    from nola_vision.demo import main as demo

    assert demo(["--seeds", "0", "0", "--no_progress"]) == 1
    assert "repeat one" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # a usage error, as argparse's own
        demo(["--epochs", "0", "--no_progress"])
    assert stop.value.code == 2 and "argument --epochs: 0 is below 1" in capsys.readouterr().err
    assert demo(["--dataset", "cub200", "--root", "/nonexistent", "--no_progress", "--backbone", "vit_tiny_patch16_224",
                 "--no_pretrained", "--image_size", "64"]) == 1
    err = capsys.readouterr().err
    assert "--root" in err and "--data.root" not in err


def test_a_logger_less_fit_that_died_before_keeping_anything_does_not_lock_its_folder(tmp_path, capsys):
    code, err = run(capsys, *FIT, "--trainer.default_root_dir", tmp_path, "--trainer.max_epochs", 1,
                    "--model.lr", "9e5")
    assert code == 3 and (tmp_path / "config.yaml").is_file() and not list(tmp_path.rglob("*.ckpt"))
    assert run(capsys, *FIT, "--trainer.default_root_dir", tmp_path, "--trainer.max_epochs", 1)[0] == 0


def test_a_rerun_that_fails_after_replacing_the_adapter_moves_the_old_result_aside(tmp_path, capsys):
    write_imagefolder(tmp_path / "pets", eval_folder="test")
    common = [*FIT, "--data.dataset", "imagefolder", "--data.root", tmp_path / "pets", "--data.shots", 2,
              "--trainer.max_epochs", 1, "--model.adapter_dir", tmp_path / "adapter",
              "--result_file", tmp_path / "r.json"]
    assert run(capsys, *common, "--trainer.default_root_dir", tmp_path / "a")[0] == 0
    # not a PNG, though it ends as one (a file cut short is refused before the run)
    (tmp_path / "pets" / "test" / "dog" / "dog 01.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png IEND\xaeB`\x82")
    code, err = run(capsys, *common, "--trainer.default_root_dir", tmp_path / "b")
    assert code == 1 and "described the adapter this run replaced: moved to" in err
    assert not (tmp_path / "r.json").exists() and (tmp_path / "r.json.previous").is_file()


def test_the_result_of_the_adapter_a_rerun_replaces_is_moved_aside_before_the_export(tmp_path, capsys, monkeypatch):
    # Moved aside only when Python saw the run fail: a SIGKILL after the export left the first run's result beside
    # the second run's adapter. What the test pass after fit finds on disk is what a kill there would leave.
    same = ["--model.adapter_dir", tmp_path / "adapter", "--result_file", tmp_path / "result.json"]
    assert run(capsys, *FIT, "--trainer.default_root_dir", tmp_path / "a", "--trainer.max_epochs", 1, *same)[0] == 0
    first = json.loads((tmp_path / "result.json").read_text())["adapter_sha256"]
    seen = []

    def killed_here(*args, **kwargs):
        seen.append((tmp_path / "result.json").exists())
        seen.append(json.loads((tmp_path / "result.json.previous").read_text())["adapter_sha256"])
        raise SystemExit(137)

    monkeypatch.setattr(lightning.pytorch.Trainer, "test", killed_here)
    with pytest.raises(SystemExit):
        run(capsys, *FIT, "--trainer.default_root_dir", tmp_path / "b", "--trainer.max_epochs", 1, *same)
    assert seen == [False, first]


@pytest.mark.parametrize("stop, code, said", [
    (KeyboardInterrupt, 130, "interrupted (Ctrl-C, SIGINT)"), (SIGTERMException, 143, "stopped by SIGTERM")])
def test_a_test_after_fit_that_is_interrupted_moves_aside_the_result_of_the_adapter_it_replaced(tmp_path, capsys,
                                                                                                 monkeypatch, stop,
                                                                                                 code, said):
    same = ["--model.adapter_dir", tmp_path / "adapter", "--result_file", tmp_path / "result.json"]
    assert run(capsys, *FIT, "--trainer.default_root_dir", tmp_path / "a", "--trainer.max_epochs", 1, *same)[0] == 0

    def interrupted(*args, **kwargs):
        raise stop  # as a SIGTERM or Ctrl-C in the test pass

    monkeypatch.setattr(lightning.pytorch.Trainer, "test", interrupted)
    returned, err = run(capsys, *FIT, "--trainer.default_root_dir", tmp_path / "b", "--trainer.max_epochs", 1, *same)
    assert returned == code and f"{said} before the run finished: no result was written" in err
    # the fit had finished: what it kept is named, not left for the user to find (nor a resume advised)
    checkpoint = next((tmp_path / "b").rglob("last.ckpt"))
    assert (f"Training had finished and was kept: adapter {tmp_path / 'adapter'}, checkpoint {checkpoint}. Get its "
            f"metrics with: nola-vision test -c <this config> --ckpt_path {checkpoint}") in " ".join(err.split())
    # the adapter is the second run's: the first run's result no longer sits beside it as if it described it
    assert not (tmp_path / "result.json").exists() and (tmp_path / "result.json.previous").is_file()


@pytest.mark.parametrize("stop", [KeyboardInterrupt, OSError])
def test_a_fit_stopped_during_its_export_is_finished_by_resuming_it(tmp_path, capsys, monkeypatch, stop):
    """Stopped (Ctrl-C, a full disk) while exporting the adapter, a fully trained run could never be finished from the
    CLI: the resume the message advised was refused as training nothing, and a new fit as overwriting the run."""
    from nola_vision.train import module

    export = module.save_adapter

    def stopped(*args, **kwargs):
        raise stop("No space left on device") if stop is OSError else stop()

    fit = [*FIT, "--trainer.default_root_dir", tmp_path, "--trainer.max_epochs", 2, "--result_file",
           tmp_path / "result.json"]
    monkeypatch.setattr(module, "save_adapter", stopped)
    code, err = run(capsys, *fit)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert code == (130 if stop is KeyboardInterrupt else 1) and f"resume with --ckpt_path {last}" in err
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "result.json").exists()
    monkeypatch.setattr(module, "save_adapter", export)
    code, err = run(capsys, *fit, "--ckpt_path", "last")
    assert code == 0, err
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["epochs"] == 2 and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    # the training metrics its training logged, from the checkpoint: the resume trained nothing, so logged none
    assert {"train/loss", "train/acc", "test/acc"} <= result["metrics"].keys()
    # finished now: a resume that would train nothing is refused again
    code, err = run(capsys, *fit, "--ckpt_path", "last")
    assert code == 2 and "resuming would train nothing" in err


def test_a_logged_run_stopped_during_its_export_is_finished_into_its_own_folder_once(tmp_path, capsys, monkeypatch):
    """With a logger, the resume that finished the run exported into its own new version folder, while the check
    looks in the checkpoint's run folder: every further resume exported and tested the run again, into a new one."""
    from nola_vision.train import module

    export = module.save_adapter

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    fit = ["fit", "-c", str(TINY), "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", tmp_path,
           "--trainer.max_epochs", 1, "--test_after_fit", "false"]
    monkeypatch.setattr(module, "save_adapter", stopped)
    assert run(capsys, *fit)[0] == 130
    monkeypatch.setattr(module, "save_adapter", export)
    assert run(capsys, *fit, "--ckpt_path", "last")[0] == 0
    adapters = sorted(tmp_path.rglob("adapter_model.safetensors"))
    assert [path.parent.parent.name for path in adapters] == ["version_0"]
    code, err = run(capsys, *fit, "--ckpt_path", "last")
    assert code == 2 and "resuming would train nothing" in err
    assert sorted(tmp_path.rglob("adapter_model.safetensors")) == adapters


@pytest.mark.parametrize("shared", ["adapter_dir", "result_file", "both"])
def test_a_fit_stopped_during_its_export_where_an_earlier_run_left_its_files_is_told_how_to_finish(tmp_path, capsys,
                                                                                                    monkeypatch,
                                                                                                    shared):
    """A second run sharing --model.adapter_dir or --result_file with a finished one, stopped before its export,
    was refused as training nothing, with no word of how to finish it. Files older than its checkpoint are not taken
    for an earlier run's (a run folder copied without its times looks alike, and its result would be replaced): the
    refusal names them and the paths of its own that finish it."""
    from nola_vision.train import module

    export = module.save_adapter
    paths = {"adapter_dir": ["--model.adapter_dir", tmp_path / "adapter"],
             "result_file": ["--result_file", tmp_path / "result.json"]}
    same = [arg for key, args in paths.items() if shared in (key, "both") for arg in args]
    adapter = tmp_path / "adapter" if shared != "result_file" else tmp_path / "b" / "adapter"
    assert run(capsys, *FIT, "--trainer.default_root_dir", tmp_path / "a", "--trainer.max_epochs", 1, *same)[0] == 0
    earlier = (tmp_path / "a" / "adapter" if shared == "result_file" else adapter) / "adapter_model.safetensors"
    earlier_bytes = earlier.read_bytes()

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    second = [*FIT, "--trainer.default_root_dir", tmp_path / "b", "--trainer.max_epochs", 2, *same]
    monkeypatch.setattr(module, "save_adapter", stopped)
    assert run(capsys, *second)[0] == 130
    monkeypatch.setattr(module, "save_adapter", export)
    code, err = run(capsys, *second, "--ckpt_path", "last")
    said = " ".join(err.split())
    assert code == 2 and "resuming would train nothing" in said and "older than its checkpoint, perhaps an " \
        "earlier run's: if this run stopped during its export, finish it into paths of its own, --model.adapter_dir " \
        "<a new folder> --result_file <a new file>" in said
    assert earlier.read_bytes() == earlier_bytes or (  # the earlier one is kept, in its folder or set aside
        adapter.with_name("adapter.previous") / "adapter_model.safetensors").read_bytes() == earlier_bytes
    own = ["--model.adapter_dir", tmp_path / "own", "--result_file", tmp_path / "own.json"]
    code, err = run(capsys, *second, "--ckpt_path", "last", *own)
    assert code == 0, err
    result = json.loads((tmp_path / "own.json").read_text())
    assert result["epochs"] == 2 and (tmp_path / "own" / "adapter_model.safetensors").read_bytes() != earlier_bytes


def test_a_finished_run_whose_adapter_a_later_run_replaced_is_not_exported_again(tmp_path, capsys):
    """The later run's adapter (newer than the first run's checkpoint) may be there because the first run's export
    was replaced: exporting the first run again would push the later one out, so the resume is refused as before."""
    same = ["--model.adapter_dir", tmp_path / "adapter", "--trainer.max_epochs", 1]
    assert run(capsys, *FIT, "--trainer.default_root_dir", tmp_path / "a", *same)[0] == 0
    assert run(capsys, *FIT, "--trainer.default_root_dir", tmp_path / "b", *same, "--seed_everything", 7)[0] == 0
    later = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    code, err = run(capsys, *FIT, "--trainer.default_root_dir", tmp_path / "a", *same, "--ckpt_path", "last")
    assert code == 2 and "resuming would train nothing" in err
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == later


def test_a_fit_stopped_by_ctrl_c_leaves_sigint_as_it_found_it(tmp_path, capsys, monkeypatch):
    """Lightning ignores SIGINT while it shuts down after a Ctrl-C and never restores it: a later run in the process
    (a notebook cell, a script's second main()) could no longer be interrupted."""
    import signal

    from nola_vision.train import module

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(module, "save_adapter", stopped)  # inside Trainer.fit, where Lightning handles the Ctrl-C
    code, err = run(capsys, *FIT, "--trainer.default_root_dir", tmp_path, "--trainer.max_epochs", 1)
    assert code == 130 and "interrupted (Ctrl-C, SIGINT)" in err
    assert signal.getsignal(signal.SIGINT) is before


def test_a_fit_whose_export_failed_is_finished_into_another_adapter_dir_at_other_bits(tmp_path, capsys,
                                                                                       monkeypatch):
    """Its export failed on a full disk, the resume that finishes a run was refused for --model.adapter_dir (and
    --model.adapter_bits) differing from the checkpoint's, though neither changes what the run trains."""
    from nola_vision.train import module

    export = module.save_adapter

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    fit = [*FIT, "--trainer.default_root_dir", tmp_path, "--trainer.max_epochs", 1, "--test_after_fit", "false"]
    monkeypatch.setattr(module, "save_adapter", disk_full)
    assert run(capsys, *fit)[0] == 1
    monkeypatch.setattr(module, "save_adapter", export)
    other = tmp_path / "elsewhere" / "adapter"
    code, err = run(capsys, *fit, "--ckpt_path", "last", "--model.adapter_dir", other, "--model.adapter_bits", 8)
    assert code == 0, err
    assert json.loads((other / "adapter_config.json").read_text())["bits"] == 8
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("failure", [RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                     RuntimeError("a callback's bug")])
def test_a_run_failing_with_an_error_of_its_own_names_the_checkpoint_to_resume_from(tmp_path, capsys, monkeypatch,
                                                                                    failure):
    """An out-of-memory error (a RuntimeError) or a callback's bug in the second epoch printed Lightning's traceback
    alone: not the checkpoint of the first epoch, which the docs say the message names."""
    from nola_vision.train.module import FewShotClassifier

    step = FewShotClassifier.training_step

    def failing_in_epoch_1(self, batch, batch_idx):
        if self.current_epoch == 1:
            raise failure
        return step(self, batch, batch_idx)

    monkeypatch.setattr(FewShotClassifier, "training_step", failing_in_epoch_1)
    code, err = run(capsys, *FIT, "--trainer.default_root_dir", tmp_path, "--trainer.max_epochs", 2)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert code == 1 and "Traceback" in err and str(failure) in err
    assert "nola-vision: error: the run failed with the RuntimeError above" in err
    assert f"resume with --ckpt_path {last}" in err
    assert ("out of memory: lower --data.batch_size" in err) == ("out of memory" in str(failure))


class FailInSecondEpoch(lightning.pytorch.Callback):
    """Raises a ValueError as the second epoch starts: a failure of the run, after its first epoch was kept."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise ValueError("the data went away")


def test_an_error_raised_mid_run_is_the_runs_failure_and_names_the_checkpoint_kept(tmp_path, capsys):
    """A ValueError after training started exited 2, a refusal of the configuration (protocol and tune then abandoned
    the rest of their grid as refused alike), and named no checkpoint to resume from."""
    code, err = run(capsys, *FIT, "--trainer.default_root_dir", tmp_path, "--trainer.max_epochs", 2,
                    "--trainer.callbacks+=test_cli_runs.FailInSecondEpoch")
    assert code == 1 and "the data went away" in err
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert f"The weights of its last saved epoch are kept: resume with --ckpt_path {last}" in " ".join(err.split())
    # refused before any batch: still a refusal
    code, err = run(capsys, *FIT, "--trainer.default_root_dir", tmp_path / "b", "--data.dataset", "imagefolder",
                    "--data.root", tmp_path / "missing")
    assert code == 2 and "Traceback" not in err


def test_a_fit_stopped_in_its_first_last_ckpt_save_names_the_checkpoint_that_exists(tmp_path, capsys, monkeypatch):
    # Lightning names last.ckpt before writing it: the message named a file that was never written
    save = lightning.pytorch.Trainer.save_checkpoint

    def interrupted_at_last(self, filepath, *args, **kwargs):
        if Path(filepath).name == "last.ckpt":
            raise KeyboardInterrupt
        return save(self, filepath, *args, **kwargs)

    monkeypatch.setattr(lightning.pytorch.Trainer, "save_checkpoint", interrupted_at_last)
    code, err = run(capsys, *FIT, "--trainer.default_root_dir", tmp_path, "--trainer.max_epochs", 2)
    kept = next((tmp_path / "checkpoints").glob("epoch=0-*.ckpt"))
    assert code == 130 and f"resume with --ckpt_path {kept}" in " ".join(err.split()) and "last.ckpt" not in err


def test_a_fit_into_a_folder_holding_a_runs_checkpoints_without_its_config_is_refused(tmp_path, capsys):
    """A run whose folder was deleted mid-run wrote its checkpoints and adapter into it again, but no config.yaml: a
    second fit there was accepted, and the folder mixed the two runs' checkpoints, config and adapter."""
    assert run(capsys, *FIT, "--trainer.default_root_dir", tmp_path, "--trainer.max_epochs", 1)[0] == 0
    (tmp_path / "config.yaml").unlink()
    kept = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code, err = run(capsys, *FIT, "--trainer.default_root_dir", tmp_path, "--trainer.max_epochs", 1, "--model.lr", 0.05)
    assert code == 2 and "its config.yaml is gone" in err and "--ckpt_path last" in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == kept


class InterruptAtStep5(lightning.pytorch.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 5:
            raise KeyboardInterrupt


def test_a_fit_stopped_after_a_save_inside_an_epoch_names_no_checkpoint_a_resume_refuses(tmp_path, capsys):
    """With validation inside an epoch, last.ckpt was saved mid-epoch: the Ctrl-C message named it as 'the weights of
    its last saved epoch', and the resume it advised was refused as skipping the rest of that epoch."""
    fit = [*FIT, "--trainer.default_root_dir", tmp_path, "--trainer.max_epochs", 4, "--data.val_shots", 2,
           "--trainer.val_check_interval", 2]
    code, err = run(capsys, *fit, "--trainer.callbacks+=test_cli_runs.InterruptAtStep5")
    assert code == 130
    named = " ".join(err.split()).partition("resume with --ckpt_path ")[2].split(" ")[0]
    if named:  # only a checkpoint saved at an epoch's end, which a resume takes
        assert run(capsys, *fit, "--ckpt_path", named)[0] == 0
    else:
        assert "kept" not in err


def test_the_result_counts_the_epochs_trained_whole_and_the_steps(tmp_path, capsys):
    # max_steps 4 at 3 steps an epoch recorded "epochs": 2 (Lightning counts the epoch it stopped inside as done)
    fit = [*FIT, "--trainer.default_root_dir", tmp_path, "--result_file", tmp_path / "result.json"]
    assert run(capsys, *fit, "--trainer.max_steps", 4)[0] == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert (result["epochs"], result["steps"]) == (1, 4)


def test_a_folder_named_adapter_of_another_kind_is_no_run_and_a_finished_runs_moved_adapter_is_not_redone(tmp_path,
                                                                                                         capsys):
    # a user's package folder named adapter/ made a logger-less fit refuse "another run", advising a resume of nothing
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "__init__.py").write_text("x = 1\n")
    fit = [*FIT, "--trainer.default_root_dir", tmp_path, "--model.adapter_dir", tmp_path / "exported",
           "--result_file", tmp_path / "result.json", "--trainer.max_epochs", 1]
    assert run(capsys, *fit)[0] == 0 and (tmp_path / "adapter" / "__init__.py").is_file()
    # finished, with its result recorded: a resume after its adapter was moved away is not a run stopped in its export
    (tmp_path / "exported").rename(tmp_path / "served")
    code, err = run(capsys, *fit, "--ckpt_path", "last")
    assert code == 2 and "resuming would train nothing" in err and not (tmp_path / "exported").exists()


@pytest.mark.parametrize("name", ["exp", ""])  # an empty name drops that level of the folders
def test_ckpt_path_last_finds_the_run_of_a_logger_with_its_own_save_dir(tmp_path, capsys, name):
    # checkpoints under <save_dir>/<name>/version_N were not looked for: "no last.ckpt ... nothing to resume"
    fit = ["fit", "-c", str(TINY), "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", tmp_path,
           "--trainer.logger+=CSVLogger", f"--trainer.logger.save_dir={tmp_path / 'logs'}",
           f"--trainer.logger.name={name}", "--test_after_fit", "false"]
    assert run(capsys, *fit, "--trainer.max_epochs", 1)[0] == 0
    code, err = run(capsys, *fit, "--trainer.max_epochs", 2, "--ckpt_path", "last")
    assert code == 0, err
    assert (tmp_path / "logs" / name / "version_1" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("options, said", [
    (["--trainer.limit_val_batches", 0], "--trainer.limit_val_batches 0 runs no validation pass"),
    (["--trainer.check_val_every_n_epoch", 10, "--trainer.max_epochs", 4],
     "--trainer.check_val_every_n_epoch 10 is above --trainer.max_epochs 4: no validation runs during training")])
def test_a_monitor_of_validation_with_no_validation_pass_is_refused_before_training(tmp_path, capsys, options, said):
    # limit_val_batches 0 passed the check: EarlyStopping stopped the run after an epoch, ModelCheckpoint kept no best;
    # with check_val_every_n_epoch above max_epochs the callback never acted, and test --ckpt_path best then said no
    # callback monitored a metric
    code, err = run(capsys, *FIT, "--trainer.default_root_dir", tmp_path, "--data.val_shots", 2, *options,
                    "--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor=val/acc")
    assert code == 2 and said in err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_fit_with_an_on_exception_checkpoint_callback_runs(tmp_path, capsys):
    # every such fit failed with a traceback: the CLI set save_last on every Checkpoint callback, which it lacks
    code, err = run(capsys, *FIT, "--trainer.default_root_dir", tmp_path, "--trainer.max_epochs", 1,
                    "--trainer.callbacks+=OnExceptionCheckpoint", f"--trainer.callbacks.dirpath={tmp_path / 'exc'}")
    assert code == 0, err


def test_a_fit_with_a_batch_size_finder_records_the_epochs_and_steps_it_trained(tmp_path, capsys):
    # the finder searched again in the test after fit, resetting the loops' progress: "epochs": 0, "steps": 0
    result = tmp_path / "result.json"
    code, err = run(capsys, *FIT, "--trainer.default_root_dir", tmp_path, "--trainer.max_epochs", 2,
                    "--trainer.callbacks+=BatchSizeFinder", "--trainer.callbacks.max_trials=1",
                    "--trainer.callbacks.steps_per_trial=1", "--result_file", result)
    assert code == 0, err
    recorded = json.loads(result.read_text())
    checkpoint = torch.load(recorded["checkpoint"], map_location="cpu", weights_only=False)
    assert recorded["epochs"] == 2 and recorded["steps"] == checkpoint["global_step"] > 0


def test_barebones_with_a_result_file_is_refused_before_training(tmp_path, capsys):
    # barebones turns self.log off: fit and test wrote result files with "metrics": {}
    code, err = run(capsys, *FIT, "--trainer.default_root_dir", tmp_path, "--trainer.barebones", "true",
                    "--trainer.enable_checkpointing", "false", "--trainer.enable_model_summary", "false",
                    "--trainer.log_every_n_steps", "null", "--trainer.num_sanity_val_steps", 0,
                    "--result_file", tmp_path / "result.json")
    assert code == 2 and "--trainer.barebones true turns Lightning's logging off" in err and "test/acc" in err
    assert not (tmp_path / "result.json").exists()


def test_a_debug_pass_resuming_a_trained_checkpoint_names_fast_dev_run(tmp_path, capsys):
    # it blamed trainer.max_steps=1, which the user never set ("Raise max_steps above 3")
    assert run(capsys, *FIT, "--trainer.default_root_dir", tmp_path, "--trainer.max_epochs", 1)[0] == 0
    code, err = run(capsys, *FIT, "--trainer.default_root_dir", tmp_path, "--trainer.fast_dev_run", "true",
                    "--ckpt_path", "last")
    assert code == 2 and "trainer.fast_dev_run" in err and "Raise max_steps" not in err


@pytest.mark.parametrize("stop, code, said", [
    (KeyboardInterrupt, 130, "interrupted (Ctrl-C, SIGINT)"), (SIGTERMException, 143, "stopped by SIGTERM")])
def test_a_run_stopped_as_it_returns_after_writing_its_result_says_the_result_was_written(tmp_path, capsys,
                                                                                         monkeypatch, stop, code,
                                                                                         said):
    """A Ctrl-C just after the run wrote --result_file was reported as "no result was written"."""
    from nola_vision.train.cli import NolaCLI

    def then_stopped(write):
        def written(self, *args, **kwargs):
            write(self, *args, **kwargs)
            raise stop
        return written

    result = tmp_path / "result.json"
    monkeypatch.setattr(NolaCLI, "after_fit", then_stopped(NolaCLI.after_fit))
    returned, err = run(capsys, *FIT, "--trainer.default_root_dir", tmp_path, "--trainer.max_epochs", 1,
                        "--model.adapter_dir", tmp_path / "adapter", "--result_file", result)
    assert returned == code and f"{said} as the run ended, after it wrote its result to {result}" in err
    assert json.loads(result.read_text())["metrics"]
    monkeypatch.setattr(NolaCLI, "after_test", then_stopped(NolaCLI.after_test))
    tested = tmp_path / "tested.json"
    returned, err = run(capsys, "test", "-c", TINY, *QUIET, "--trainer.default_root_dir", tmp_path, "--ckpt_path",
                        "last", "--result_file", tested)
    assert returned == code and f"{said} as the run ended, after it wrote its result to {tested}" in err
    assert json.loads(tested.read_text())["metrics"]


def test_a_retired_result_steps_past_a_users_files_of_its_name_and_shortens_a_name_too_long_for_the_suffix(tmp_path):
    """A user's file at <result>.previous (write-protected too) was replaced by the retired result without a word, a
    folder there failed the run after training (Is a directory), and a result name of 247-255 bytes failed it there
    too (File name too long)."""
    from nola_vision.train.cli import ResultRetirer

    adapter = tmp_path / "adapter"
    adapter.mkdir()

    def retired(name):
        path = tmp_path / name
        path.write_text(json.dumps({"metrics": {}, "adapter_dir": str(adapter)}))
        retirer = ResultRetirer(str(path))
        retirer(adapter)
        assert not path.exists()
        return Path(retirer.note.rpartition("moved to ")[2].rstrip("."))

    notes = tmp_path / "r.json.previous"
    notes.write_text("my notes")
    notes.chmod(0o444)
    (tmp_path / "r.json.previous.1").mkdir()
    assert retired("r.json") == tmp_path / "r.json.previous.2"
    assert notes.read_text() == "my notes" and (tmp_path / "r.json.previous.1").is_dir()
    assert retired("r.json") == tmp_path / "r.json.previous.2"  # an earlier retired result is replaced
    long = "r" * 245 + ".json"
    aside = retired(long)
    assert aside.name.endswith(".previous") and len(aside.name.encode()) <= 255 and aside.parent == tmp_path
    assert json.loads(aside.read_text())["adapter_dir"] == str(adapter)


class _RunsCode:
    """A pickled object whose unpickling writes a file: what a shared run folder's checkpoint may hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("subcommand", ["test", "fit"])
def test_a_run_folders_checkpoints_are_never_unpickled_in_full(tmp_path, capsys, subcommand):
    """--ckpt_path best/last read a run folder's last.ckpt before the checkpoint's own (safe) check: a full unpickling
    there ran the code a shared run's file named."""
    from nola_vision.train.checkpoint_io import UnsafeCheckpointError, load_checkpoint
    from nola_vision.train.cli import checkpoint_run

    marker, last = tmp_path / "ran", tmp_path / "shared" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    torch.save({"pytorch-lightning_version": lightning.pytorch.__version__, "global_step": 0, "state_dict": {},
                "callbacks": {}, "payload": _RunsCode(marker)}, last)
    which = "best" if subcommand == "test" else "last"
    code, err = run(capsys, subcommand, "-c", TINY, *QUIET, "--trainer.default_root_dir", tmp_path / "shared",
                    "--ckpt_path", which)
    assert code == 2 and "holds objects that safe loading refuses" in err and "Traceback" not in err
    with pytest.raises(UnsafeCheckpointError, match=r"last.ckpt holds objects that safe loading refuses"):
        load_checkpoint(last)
    with pytest.raises(pickle.UnpicklingError):  # a test's record of the run it evaluates, read safely too
        checkpoint_run(str(last))
    assert not marker.exists()


@pytest.mark.parametrize("moment, finished", [("last_checkpoint", True), ("in_export", False), ("teardown", False),
                                              ("after_export", True), ("after_test", True)])
def test_a_real_sigterm_after_training_stops_the_command_and_names_what_was_kept(tmp_path, capsys, monkeypatch,
                                                                                 moment, finished):
    """A scheduler's cancel after the loops stopped looking (the last checkpoint's save) was noted and forgotten: the
    run tested and exited 0. Between Lightning's passes (its teardown, the export, after the test pass) the default
    action ended the process at once (-15), saying nothing of what was kept. Stopped in the export, the run is
    resumed, as after a Ctrl-C there."""
    import signal

    from nola_vision.train import module

    def then_sigterm(original):
        def run_then_signal(*args, **kwargs):
            returned = original(*args, **kwargs)
            if not sent:  # once (Lightning's teardown runs again after a failure)
                sent.append(moment)
                signal.raise_signal(signal.SIGTERM)
            return returned
        return run_then_signal

    sent, trainer = [], lightning.pytorch.Trainer
    patched = {"last_checkpoint": (lightning.pytorch.callbacks.ModelCheckpoint, "on_train_end"),
               "in_export": (module, "save_adapter"), "teardown": (trainer, "_teardown"),
               "after_export": (module.FewShotClassifier, "on_fit_end"), "after_test": (trainer, "test")}[moment]
    monkeypatch.setattr(*patched, then_sigterm(getattr(*patched)))
    before = signal.getsignal(signal.SIGTERM)
    code, err = run(capsys, *FIT, "--trainer.default_root_dir", tmp_path, "--trainer.max_epochs", 1,
                    "--result_file", tmp_path / "result.json")
    assert code == 143 and "stopped by SIGTERM before the run finished: no result was written" in err
    checkpoint = next(tmp_path.rglob("last.ckpt"))
    said = (f"Training had finished and was kept: adapter {tmp_path / 'adapter'}, checkpoint {checkpoint}" if finished
            else f"resume with --ckpt_path {checkpoint}")
    assert said in " ".join(err.split()) and sent
    assert not (tmp_path / "result.json").exists() and signal.getsignal(signal.SIGTERM) is before


def test_a_fit_whose_best_checkpoint_holds_a_callbacks_numpy_scalar_still_writes_its_result(tmp_path, capsys,
                                                                                            monkeypatch):
    # the run's own best checkpoint (save_last false) was read with weights_only to name it in the result: a
    # callback's numpy scalar failed that read after training, and the result was lost
    (tmp_path / "numpy_state.py").write_text(
        "import numpy as np\nfrom lightning.pytorch.callbacks import Callback\n\n\n"
        "class NumpyState(Callback):\n"
        "    def state_dict(self):\n        return {'best': np.float64(0.5)}\n\n"
        "    def load_state_dict(self, state):\n        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, err = run(capsys, *FIT, "--trainer.default_root_dir", tmp_path / "run", "--trainer.max_epochs", 1,
                    "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.monitor", "train/loss",
                    "--trainer.callbacks.mode", "min", "--trainer.callbacks.save_last", "false",
                    "--trainer.callbacks+=numpy_state.NumpyState", "--test_after_fit", "false",
                    "--result_file", tmp_path / "result.json")
    assert code == 0, err
    assert json.loads((tmp_path / "result.json").read_text())["checkpoint"].endswith("epoch=0-step=3.ckpt")
