"""What a CLI run records and when it stops: a test's result names the checkpoint's run, a result of part of a split
is refused, a monitored metric the model never logs is refused before training (or, found mid-run, ends in one line
keeping the checkpoint), and the demo refuses a repeated method."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

CLI = [sys.executable, "-m", "nola_vision.cli"]
# a one-block ViT of width 32 on digits at 32 px: 3-shot, 2 validation images per class, 3 steps per epoch
CONFIG = {
    "seed_everything": 0,
    "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "enable_model_summary": False,
                "enable_progress_bar": False, "log_every_n_steps": 1, "num_sanity_val_steps": 0},
    "model": {"backbone": "vit_tiny_patch16_224", "pretrained": False, "image_size": 32,
              "backbone_kwargs": {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2},
              "adapter": {"class_path": "nola_vision.NOLAConfig",
                          "init_args": {"rank": 2, "num_basis_a": 16, "num_basis_b": 16,
                                        "targets": ["mlp.fc1", "mlp.fc2"]}},
              "optimizer": "adam", "lr": 5.0e-3},
    "data": {"dataset": "digits", "shots": 3, "split_seed": 0, "val_shots": 2, "batch_size": 8,
             "eval_batch_size": 256, "augment": "none"},
}


def cli(folder: Path, *args) -> subprocess.CompletedProcess:
    """The console script in its own process, run in ``folder`` with the tiny config."""
    return subprocess.run([*CLI, *map(str, args[:1]), "-c", str(folder.parent / "tiny.yaml"), *map(str, args[1:])],
                          cwd=folder, capture_output=True, text=True, timeout=600)


def refused_here(folder: Path, monkeypatch, capsys, *args) -> str:
    """What ``cli`` says on stderr for a command refused before it runs, from the console script's ``main`` in this
    process (a refusal needs no process of its own: one costs seconds of start-up); fails unless it exits with 2."""
    from nola_vision.cli import main

    monkeypatch.chdir(folder)
    environment = dict(os.environ)  # Lightning sets PL_GLOBAL_SEED and others for the process it takes as its own
    try:
        code = main([*map(str, args[:1]), "-c", str(folder.parent / "tiny.yaml"), *map(str, args[1:])])
    finally:
        os.environ.clear()
        os.environ.update(environment)
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    return err


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One fitted run (1 epoch, seed 0, split seed 0, 3 shots, 2 validation images per class, CSV logger)."""
    base = tmp_path_factory.mktemp("records")
    (base / "tiny.yaml").write_text(yaml.safe_dump(CONFIG))
    folder = base / "work"
    folder.mkdir()
    done = cli(folder, "fit", "--trainer.default_root_dir", "run", "--test_after_fit", "false")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "batch_transfer" not in done.stderr  # Lightning's note of the model's hooks, which are there by design
    log_dir = folder / "run" / "lightning_logs" / "version_0"
    return {"folder": folder, "log_dir": log_dir, "checkpoint": log_dir / "checkpoints" / "last.ckpt"}


def test_a_test_result_records_the_checkpoints_run_not_the_command_lines_data_settings_and_seed(fitted):
    result = fitted["folder"] / "test.json"
    done = cli(fitted["folder"], "test", "--ckpt_path", fitted["checkpoint"], "--trainer.logger", "false",
               "--trainer.default_root_dir", "evaluated", "--data.shots", 10, "--data.split_seed", 4,
               "--data.val_shots", 0, "--seed_everything", 9, "--result_file", result)
    assert done.returncode == 0, done.stderr[-3000:]
    written = json.loads(result.read_text())
    assert written["config"] == {"method": "nola", "backbone": "vit_tiny_patch16_224", "dataset": "digits",
                                 "shots": 3, "split_seed": 0, "val_shots": 2, "seed": 0, "quant_bits": None}
    evaluated = written["evaluated"]  # what the pass read: the whole test split, whatever the shots
    assert (evaluated["split"], evaluated["dataset"]) == ("test", "digits") and evaluated["images"] > 100
    assert evaluated["root"] == "sklearn-digits"  # scikit-learn's bundled images, not the data/ folder never read


def test_a_relative_checkpoint_path_is_recorded_absolute_so_a_replay_from_elsewhere_reads_that_checkpoint(fitted):
    """The config.yaml of a test pass kept --ckpt_path as given: replayed from another folder that holds the same
    relative path, it would evaluate another checkpoint."""
    relative = fitted["checkpoint"].relative_to(fitted["folder"])
    done = cli(fitted["folder"], "test", "--ckpt_path", relative, "--trainer.default_root_dir", "relative")
    assert done.returncode == 0, done.stderr[-3000:]
    saved = yaml.safe_load(next((fitted["folder"] / "relative").rglob("config.yaml")).read_text())
    assert saved["ckpt_path"] == str(fitted["checkpoint"])


@pytest.mark.parametrize("subcommand, split", [pytest.param("test", "test", marks=pytest.mark.slow),  # one path
                                               ("validate", "val")])  # which the validation draw's Subset takes too
def test_a_pass_run_in_a_spawned_process_records_the_images_it_read(fitted, subcommand, split):
    """Under ddp_spawn the command's own data module was never set up, and the result recorded "images": null."""
    result = fitted["folder"] / f"spawned-{subcommand}.json"
    done = cli(fitted["folder"], subcommand, "--ckpt_path", fitted["checkpoint"], "--trainer.logger", "false",
               "--trainer.strategy", "ddp_spawn", "--trainer.default_root_dir", f"spawned-{subcommand}",
               "--result_file", result)
    assert done.returncode == 0, done.stderr[-3000:]
    evaluated = json.loads(result.read_text())["evaluated"]
    assert evaluated["split"] == split and evaluated["images"] == (899 if split == "test" else 20)
    assert evaluated["root"] == "sklearn-digits"  # the validation draw's too, through its Subset


@pytest.mark.parametrize("subcommand, limits, part", [
    ("fit", ["--trainer.limit_test_batches", 1, "--trainer.limit_val_batches", 1], "part of the"),
    ("test", ["--trainer.limit_test_batches", 0.5], "part of the test split"),
    ("test", ["--trainer.limit_test_batches", 0.9999], "limits the test pass to 99.99% of its batches"),  # said 100%
    ("test", ["--trainer.limit_test_batches", 0], "runs no test pass"),  # wrote "metrics": {} over a result
    ("validate", ["--trainer.limit_val_batches", 0], "runs no val pass"),
])
def test_a_result_file_of_part_of_a_split_is_refused_before_anything_runs(fitted, subcommand, limits, part,
                                                                         monkeypatch, capsys):
    result = fitted["folder"] / f"limited-{subcommand}.json"
    where = fitted["folder"] / f"limited-{subcommand}"
    checkpoint = ["--ckpt_path", fitted["checkpoint"]] if subcommand != "fit" else []
    err = refused_here(fitted["folder"], monkeypatch, capsys, subcommand, *checkpoint, *limits, "--trainer.logger",
                       "false", "--trainer.default_root_dir", where, "--result_file", result)
    assert part in err and "drop --trainer.limit_" in err and "Traceback" not in err
    assert not result.exists() and not list(where.rglob("*.ckpt"))


def test_a_batch_limit_that_covers_the_whole_split_is_a_whole_pass(fitted):
    result = fitted["folder"] / "one-batch.json"  # one batch of 1000 holds the 899 test images
    done = cli(fitted["folder"], "test", "--ckpt_path", fitted["checkpoint"], "--trainer.limit_test_batches", 1,
               "--data.eval_batch_size", 1000, "--trainer.logger", "false", "--trainer.default_root_dir",
               fitted["folder"] / "one-batch", "--result_file", result)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(result.read_text())["metrics"]["test/acc"] > 0


def test_a_monitor_the_model_never_logs_is_refused_before_training_listing_the_logged_ones(fitted, monkeypatch,
                                                                                          capsys):
    where = fitted["folder"] / "typo"
    err = refused_here(fitted["folder"], monkeypatch, capsys, "fit", "--trainer.callbacks+=ModelCheckpoint",
                       "--trainer.callbacks.monitor", "val/accuracy", "--trainer.callbacks.mode", "max",
                       "--trainer.logger", "false", "--trainer.default_root_dir", where)
    assert "ModelCheckpoint(monitor='val/accuracy') monitors a metric the model never logs" in err
    assert "monitor one of train/loss" in err and "val/acc" in err and "Traceback" not in err
    assert not list(where.rglob("*.ckpt"))


def test_a_monitor_found_missing_mid_run_ends_in_one_line_and_keeps_the_epochs_checkpoint(fitted):
    """A name without the module's prefixes may be a callback of the user's: it is let through, and when it is
    never logged the fit stops with a one-line error after keeping what it trained."""
    where = fitted["folder"] / "mid"
    done = cli(fitted["folder"], "fit", "--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor",
               "accuracy", "--trainer.max_epochs", 3, "--trainer.logger", "false", "--trainer.default_root_dir", where)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "EarlyStopping(monitor='accuracy') stopped the fit" in done.stderr
    kept = where / "checkpoints" / "last.ckpt"
    assert str(kept) in done.stderr or "last.ckpt" in done.stderr
    assert torch.load(kept, map_location="cpu", weights_only=False)["global_step"] == 3  # epoch 0's 3 steps


def test_fit_metrics_are_the_metrics_a_fit_logs(fitted):
    """The names ``check_monitors`` accepts are those a fit logs (read in a fresh process, like the CLI's)."""
    done = subprocess.run([sys.executable, "-c", "import json; from nola_vision.train.cli import FIT_METRICS; "
                           "print(json.dumps(FIT_METRICS))"], cwd=fitted["folder"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(fitted["log_dir"] / "metrics.csv", newline="") as f:
        logged = {name for name in next(csv.reader(f)) if name.startswith(("train/", "val/", "test/"))}
    # loggers get train/loss per step and per epoch; callbacks also find it as train/loss
    assert logged | {"train/loss"} == set(json.loads(done.stdout))


def test_demo_refuses_a_repeated_method(tmp_path):
    from nola_vision.demo import run_demo

    with pytest.raises(ValueError, match="repeat one"):
        run_demo(methods=("linear", "linear"), seeds=(0,), out=str(tmp_path / "demo"))
    assert not (tmp_path / "demo").exists()


def test_a_relative_data_root_is_recorded_as_the_folder_it_read(fitted):
    """``test -c <run>/config.yaml`` from another directory read another folder of that relative name (with the same
    class names, a silent accuracy of other images): the run records the absolute folder."""
    saved = yaml.safe_load((fitted["log_dir"] / "config.yaml").read_text())
    assert saved["data"]["root"] == str(fitted["folder"] / "data")
    hparams = torch.load(fitted["checkpoint"], map_location="cpu", weights_only=False)["datamodule_hyper_parameters"]
    assert hparams["root"] == str(fitted["folder"] / "data")


def test_evaluating_a_runs_config_keeps_to_that_run_and_its_fit_result(tmp_path):
    # --trainer '<json>' counted as --trainer.default_root_dir: --ckpt_path last took the newest run under the root;
    # with the fit's result moved away, test wrote its metrics at the fit's result_file path unasked
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(CONFIG))
    folder = tmp_path / "work"
    folder.mkdir()
    done = cli(folder, "fit", "--trainer.default_root_dir", "run", "--test_after_fit", "false", "--result_file",
               "fit.json")
    assert done.returncode == 0, done.stderr[-3000:]
    runs = folder / "run" / "lightning_logs"
    shutil.copytree(runs / "version_0", runs / "version_1")  # a newer run under the same root
    (folder / "fit.json").rename(folder / "moved.json")
    config = runs / "version_0" / "config.yaml"
    done = subprocess.run([*CLI, "test", "-c", str(config), "--ckpt_path", "last", "--trainer",
                           '{"enable_progress_bar": false}', "--result_file", "test.json"], cwd=folder,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((folder / "test.json").read_text())["checkpoint"] == str(runs / "version_0" / "checkpoints"
                                                                               / "last.ckpt")
    done = subprocess.run([*CLI, "test", "-c", str(config), "--ckpt_path", "last"], cwd=folder, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (folder / "fit.json").exists()
    assert "the config's result_file" in done.stdout + done.stderr
