"""The CLI's final weights, resumes and evaluation results: ``last.ckpt`` and ``val/acc`` are the final epoch's when
validation is sparser than every epoch; a resume keeps the run's training-data settings; ``test``/``validate`` write
their ``--result_file``."""
import csv
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from nola_vision.cli import main
from nola_vision.train.cli import run_lightning_cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_offline.yaml"
QUIET = ["--trainer.enable_progress_bar", "false"]
CLI = [sys.executable, "-m", "nola_vision.cli"]
STEPS = 3  # 5-shot digits, batch 16: 3 training steps per epoch


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-epoch run that validates every 2nd epoch: its last epoch does not validate during fit."""
    root = tmp_path_factory.mktemp("sparse_validation")
    result = root / "result.json"
    cli = run_lightning_cli(["fit", "-c", str(TINY), "--trainer.default_root_dir", str(root), "--data.val_shots", "2",
                             "--trainer.max_epochs", "3", "--trainer.check_val_every_n_epoch", "2",
                             "--result_file", str(result), *QUIET])
    assert cli.trainer.global_step == 3 * STEPS
    fit = json.loads(result.read_text())
    return {"root": root, "fit": fit, "checkpoint": Path(fit["checkpoint"]),
            "config": Path(fit["log_dir"]) / "config.yaml"}


# ---- A: the final weights, whatever check_val_every_n_epoch ------------------------------------------------------

def test_last_checkpoint_and_newest_checkpoint_hold_the_final_epoch(run):
    assert run["checkpoint"].name == "last.ckpt"
    saved = torch.load(run["checkpoint"], map_location="cpu", weights_only=False)
    assert (saved["epoch"], saved["global_step"]) == (2, 3 * STEPS)  # not epoch 1, the last one that validated
    assert (run["checkpoint"].parent / f"epoch=2-step={3 * STEPS}.ckpt").is_file()
    assert run["fit"]["epochs"] == 3


def test_test_and_validate_of_last_ckpt_reproduce_the_fit_result(run):
    common = ["-c", str(run["config"]), "--ckpt_path", str(run["checkpoint"]), *QUIET]
    tested = run_lightning_cli(["test", *common]).trainer.callback_metrics["test/acc"].item()
    assert tested == pytest.approx(run["fit"]["metrics"]["test/acc"], abs=1e-7)
    validated = run_lightning_cli(["validate", *common]).trainer.callback_metrics["val/acc"].item()
    assert validated == pytest.approx(run["fit"]["metrics"]["val/acc"], abs=1e-7)  # the final weights' val/acc
    rows = list(csv.DictReader(open(Path(run["fit"]["log_dir"]) / "metrics.csv")))
    logged = [float(r["val/acc"]) for r in rows if r.get("val/acc")]
    assert logged[-1] == pytest.approx(run["fit"]["metrics"]["val/acc"])  # logged last, after the last epoch


def test_resuming_the_last_checkpoint_trains_only_the_new_epochs(run, tmp_path):
    cli = run_lightning_cli(["fit", "-c", str(run["config"]), "--ckpt_path", str(run["checkpoint"]),
                             "--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "4",
                             "--test_after_fit", "false", *QUIET])
    assert (cli.trainer.current_epoch, cli.trainer.global_step) == (4, 4 * STEPS)
    rows = list(csv.DictReader(open(Path(cli.trainer.log_dir) / "metrics.csv")))
    assert {r["epoch"] for r in rows if r.get("train/loss_step")} == {"3"}  # epoch 2 is not trained again


def test_a_new_fit_from_a_runs_saved_config_keeps_that_runs_result(run, tmp_path, caplog):
    """The saved config carries the run's --result_file: a variant fit from it (other epochs) replaced that result
    with its own, silently, with no copy kept; test and validate already kept it."""
    result = Path(run["fit"]["log_dir"]).parents[1] / "result.json"
    before = result.read_bytes()
    assert main(["fit", "-c", str(run["config"]), "--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs",
                 "1", "--test_after_fit", "false", *QUIET]) == 0
    assert result.read_bytes() == before
    assert f"the config's result_file {result} is the result of the run that saved the config, kept as it is: this " \
           "new run writes no result file" in caplog.text


def test_an_earlier_versions_relative_result_file_is_neither_written_nor_taken_for_a_file_here(run, tmp_path,
                                                                                                monkeypatch, caplog):
    """Saved configs of earlier versions record result_file as typed, relative to the fit's working directory: a
    test from another folder wrote its metrics to a fit_result.json there, or called another run's file there "the
    result of the run that saved the config"."""
    saved = yaml.safe_load(run["config"].read_text())
    header = run["config"].read_text().split("\n", 2)
    old = tmp_path / "old" / "config.yaml"
    old.parent.mkdir()
    old.write_text("\n".join(header[:2]) + "\n" + yaml.safe_dump({**saved, "result_file": "fit_result.json"}))
    here = tmp_path / "elsewhere"
    here.mkdir()
    monkeypatch.chdir(here)
    common = ["test", "-c", str(old), "--ckpt_path", str(run["checkpoint"]), *QUIET]
    assert main(common) == 0
    assert not (here / "fit_result.json").exists()
    assert ("the config's result_file fit_result.json is the result of the run that saved the config, recorded "
            "relative to the folder that run was started in") in caplog.text
    caplog.clear()
    (here / "fit_result.json").write_text(json.dumps(run["fit"]))  # another run's result lies here: not its
    unmarked = tmp_path / "unmarked.yaml"  # a config without the saved mark (before 2026-12-02)
    unmarked.write_text(yaml.safe_dump({**saved, "result_file": "fit_result.json"}))
    assert main(["test", "-c", str(unmarked), "--ckpt_path", str(run["checkpoint"]), *QUIET]) == 0
    assert (f"result_file {here / 'fit_result.json'} holds the result of a fit (of checkpoint {run['checkpoint']}), "
            "kept as it is") in caplog.text


def test_an_abbreviated_model_option_is_refused_with_a_checkpoint_as_the_option_itself_is(run, tmp_path, capsys):
    """argparse takes --model.label for --model.label_smoothing: given with --ckpt_path it was read as a config
    file's value, and the resume trained on with the checkpoint's 0.1 (exit 0)."""
    common = ["fit", "-c", str(run["config"]), "--ckpt_path", str(run["checkpoint"]), "--trainer.default_root_dir",
              str(tmp_path), "--trainer.max_epochs", "4", *QUIET]
    for option in ("--model.label_smoothing", "--model.label"):
        assert main([*common, option, "0.3"]) == 2
        assert "differ from --model.label_smoothing 0.3 (checkpoint: " in capsys.readouterr().err


def test_resuming_with_the_runs_own_null_rates_is_no_change(run, tmp_path):
    """lr, head_lr and warmup_epochs null ask for the recipe's values, which the checkpoint holds resolved: the run's
    own command line was refused as 'differ from --model.lr None (checkpoint: 0.03)'."""
    cli = run_lightning_cli(["fit", "-c", str(run["config"]), "--ckpt_path", str(run["checkpoint"]),
                             "--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "4",
                             "--model.lr", "null", "--model.head_lr", "null", "--model.warmup_epochs", "null",
                             "--test_after_fit", "false", *QUIET])
    assert cli.trainer.global_step == 4 * STEPS


@pytest.mark.parametrize("option, value", [("--trainer.max_epochs", "2"), ("--trainer.max_epochs", "3"),
                                           ("--trainer.max_steps", str(3 * STEPS))])
def test_resuming_a_run_that_reached_its_limit_already_is_refused_before_anything_is_written(run, tmp_path, capsys,
                                                                                             option, value):
    """It trained nothing, exited 0, and exported the checkpoint's adapter into a new run with a result file."""
    result = tmp_path / "result.json"
    code = main(["fit", "-c", str(run["config"]), "--ckpt_path", str(run["checkpoint"]), "--trainer.default_root_dir",
                 str(tmp_path / "resumed"), "--test_after_fit", "false", "--result_file", str(result), option, value,
                 *QUIET])
    err = " ".join(capsys.readouterr().err.split())
    name = option.split(".")[-1]
    assert code == 2 and "Traceback" not in err
    assert (f"the checkpoint ends epoch 2 at step {3 * STEPS} (3 epochs trained), and trainer.{name}={value} "
            f"({option}) ends the run there: resuming would train nothing") in err
    assert f"Raise {name} above {3 * STEPS if name == 'max_steps' else 3} to train on" in err
    assert not result.exists() and not (tmp_path / "resumed").exists()


def test_resuming_a_run_that_reached_its_limit_through_the_trainer_is_refused_before_it_exports(run, tmp_path):
    cli = run_lightning_cli(["-c", str(TINY), "--trainer.default_root_dir", str(tmp_path), "--data.val_shots", "2",
                             "--trainer.max_epochs", "3", *QUIET], run=False)
    with pytest.raises(ValueError, match=r"trainer\.max_epochs=3 \(--trainer\.max_epochs\) ends the run there"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(run["checkpoint"]))
    assert not list(tmp_path.rglob("adapter_model.safetensors"))


# ---- B: a resume keeps the run's training-data settings ---------------------------------------------------------

@pytest.mark.parametrize("option, value, shown", [
    ("--data.augment", "timm", "--data.augment 'timm' (checkpoint: 'none')"),
    ("--data.batch_size", "8", "--data.batch_size 8 (checkpoint: 16)"),
    ("--data.shuffle_seed", "7", "--data.shuffle_seed 7 (checkpoint: None)"),
    ("--data.normalize", "imagenet", "--data.normalize 'imagenet' (checkpoint: 'model')"),
])
def test_resuming_with_other_training_data_settings_is_refused_naming_them(run, tmp_path, capsys, option, value,
                                                                           shown):
    code = main(["fit", "-c", str(run["config"]), "--ckpt_path", str(run["checkpoint"]), "--trainer.default_root_dir",
                 str(tmp_path), "--trainer.max_epochs", "4", "--test_after_fit", "false", *QUIET, option, value])
    assert code == 2
    err = capsys.readouterr().err
    assert shown in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # refused before anything was written: no config.yaml records the value


def test_resuming_through_the_trainer_with_another_batch_size_is_refused_too(run, tmp_path):
    cli = run_lightning_cli(["-c", str(TINY), "--trainer.default_root_dir", str(tmp_path), "--data.val_shots", "2",
                             "--trainer.max_epochs", "4", "--data.batch_size", "8", *QUIET], run=False)
    with pytest.raises(ValueError, match=r"--data.batch_size 8 \(checkpoint: 16\)"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(run["checkpoint"]))
    assert not list(tmp_path.rglob("*.ckpt"))  # refused before a step


def test_resuming_with_settings_that_only_change_how_data_is_read_trains_on(run, tmp_path):
    # digits ship with scikit-learn: another root holds the same images, so the run's split digest matches
    cli = run_lightning_cli(["fit", "-c", str(run["config"]), "--ckpt_path", str(run["checkpoint"]),
                             "--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "4",
                             "--test_after_fit", "false", "--data.eval_batch_size", "7", "--data.cache_images", "false",
                             "--data.num_workers", "1", "--data.root", str(tmp_path / "moved"), *QUIET])
    assert cli.trainer.global_step == 4 * STEPS


# ---- C: test and validate write their --result_file -------------------------------------------------------------

def test_test_writes_its_result_file(run, tmp_path):
    result = tmp_path / "test.json"
    done = subprocess.run([*CLI, "test", "-c", str(run["config"]), "--ckpt_path", str(run["checkpoint"]),
                           "--trainer.default_root_dir", str(tmp_path), "--result_file", str(result), *QUIET],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    written = json.loads(result.read_text())
    assert (written["subcommand"], written["split"], written["checkpoint"]) == ("test", "test", str(run["checkpoint"]))
    assert written["metrics"]["test/acc"] == pytest.approx(run["fit"]["metrics"]["test/acc"], abs=1e-7)
    assert written["parameter_counts"] == run["fit"]["parameter_counts"]
    trained = {key: value for key, value in run["fit"]["config"].items() if key != "precision"}
    assert written["config"] == trained and trained["val_shots"] == 2  # the fit's recorded its validation draw too
    # the fit records the precision it trained in, the test the precision of its own pass
    assert run["fit"]["config"]["precision"] == written["evaluated"]["precision"] == "32-true"


def test_evaluating_with_the_runs_config_keeps_the_fits_result(run, tmp_path, capsys):
    """A run's config.yaml carries the fit's --result_file: test -c <it> replaced the fit's result (its adapter,
    epochs, checkpoint) with the test's metrics, and predict -c <it> was refused."""
    fit_result = Path(yaml.safe_load(run["config"].read_text())["result_file"])
    before = fit_result.read_bytes()
    common = ["-c", str(run["config"]), "--ckpt_path", str(run["checkpoint"]), "--trainer.default_root_dir",
              str(tmp_path), *QUIET]
    assert main(["test", *common]) == 0
    assert main(["predict", *common, "--predictions_file", str(tmp_path / "p.csv")]) == 0
    assert fit_result.read_bytes() == before and (tmp_path / "p.csv").is_file()
    for option in ("--result_file", "--result"):  # named, or abbreviated as argparse allows: refused, before the pass
        assert main(["validate", *common, option, str(fit_result)]) == 2
        assert "holds the result of a fit" in capsys.readouterr().err and fit_result.read_bytes() == before


def test_validate_writes_its_result_file_and_predict_refuses_one(run, tmp_path, capsys):
    common = ["-c", str(run["config"]), "--ckpt_path", str(run["checkpoint"]), "--trainer.default_root_dir",
              str(tmp_path), *QUIET]
    result = tmp_path / "val.json"
    assert main(["validate", *common, "--result_file", str(result)]) == 0
    written = json.loads(result.read_text())
    assert (written["subcommand"], written["split"]) == ("validate", "val")
    assert written["metrics"] == {"val/acc": pytest.approx(run["fit"]["metrics"]["val/acc"], abs=1e-7)}
    assert main(["validate", *common, "--result_file", str(tmp_path)]) == 2  # a directory: refused before the pass
    assert "is a directory" in capsys.readouterr().err
    assert main(["predict", *common, "--result_file", str(tmp_path / "p.json")]) == 2
    assert "--result_file is for fit, test and validate" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_a_result_file_that_names_a_checkpoint_or_an_adapters_config_is_refused_before_the_pass(run, tmp_path,
                                                                                                  capsys):
    """--result_file pointed by mistake at the run's checkpoint or adapter config replaced it with the metrics."""
    common = ["-c", str(run["config"]), "--ckpt_path", str(run["checkpoint"]), "--trainer.default_root_dir",
              str(tmp_path), *QUIET]
    checkpoint = tmp_path / "copy.ckpt"
    checkpoint.write_bytes(run["checkpoint"].read_bytes())
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({"format": "nola_vision.adapter/3", "config": {"method": "nola"}}))
    for subcommand, victim in (("test", checkpoint), ("validate", config)):
        before = victim.read_bytes()
        assert main([subcommand, *common, "--result_file", str(victim)]) == 2
        assert "is not a file fit, validate or test wrote" in capsys.readouterr().err
        assert victim.read_bytes() == before
    assert main(["fit", "-c", str(TINY), "--trainer.default_root_dir", str(tmp_path / "fit"), "--trainer.max_epochs",
                 "1", "--result_file", str(config), *QUIET]) == 2
    assert "is not a file fit, validate or test wrote" in capsys.readouterr().err and not (tmp_path / "fit").exists()
    result = tmp_path / "val.json"  # an earlier result file is replaced
    assert main(["validate", *common, "--result_file", str(result)]) == 0
    assert main(["validate", *common, "--result_file", str(result)]) == 0
    assert json.loads(result.read_text())["subcommand"] == "validate"


# ---- C: fits that would train nothing, or skip batches -------------------------------------------------------

@pytest.mark.parametrize("option", ["--trainer.max_steps", "--trainer.limit_train_batches"])
def test_a_fit_set_to_train_nothing_is_refused_instead_of_recording_an_untrained_result(tmp_path, capsys, option):
    result = tmp_path / "result.json"
    code = main(["fit", "-c", str(TINY), "--trainer.default_root_dir", str(tmp_path), option, "0",
                 "--result_file", str(result), *QUIET])
    err = capsys.readouterr().err
    assert code == 2 and f"{option.split('.')[-1]}=0 ({option}) trains nothing" in err and "Traceback" not in err
    assert not result.exists() and not list(tmp_path.rglob("adapter_model.safetensors"))


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork"])
def test_a_fit_whose_ranks_run_in_child_processes_is_refused_before_anything_is_written(tmp_path, capsys, strategy):
    """Under ddp_spawn the command's process never learnt what rank 0 exported or checkpointed: its result named no
    adapter or checkpoint, at epoch 0, after validating the weights a second time."""
    code = main(["fit", "-c", str(TINY), "--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator", "cpu",
                 "--trainer.devices", "2", "--trainer.strategy", strategy, "--result_file", str(tmp_path / "r.json"),
                 *QUIET])
    err = capsys.readouterr().err
    assert code == 2 and f"--trainer.strategy {strategy} runs the fit in processes" in err and "Traceback" not in err
    assert "--trainer.strategy ddp " in err and not list(tmp_path.iterdir())


@pytest.mark.parametrize("option, value, says", [
    ("--trainer.accumulate_grad_batches", "-1", "a negative one ascends the loss"),  # trained backwards, exit 0
    ("--trainer.accumulate_grad_batches", "0", "Use 1 (a step per batch) or more"),  # ZeroDivisionError mid-epoch
    ("--trainer.check_val_every_n_epoch", "0", "must be 1 or more"),
    ("--trainer.val_check_interval", "0", "must be above 0"),
    ("--trainer.gradient_clip_val", "-1", "Lightning skips clipping for a value below 0"),  # ran unclipped
])
def test_step_intervals_below_one_are_refused_before_anything_is_built(tmp_path, capsys, option, value, says):
    code = main(["fit", "-c", str(TINY), "--trainer.default_root_dir", str(tmp_path), option, value,
                 "--data.val_shots", "1", *QUIET])
    err = capsys.readouterr().err
    assert code == 2 and f"{option.split('.')[-1]}={value} ({option})" in err and says in err
    assert "Traceback" not in err and not list(tmp_path.iterdir())


@pytest.mark.parametrize("interval", ["00:00:10:00", 50, 0.25])
def test_time_batch_and_fraction_validation_intervals_pass(interval):
    # Lightning takes a time ("DD:HH:MM:SS", a timedelta) too: only a number can be 0 or below.
    from nola_vision.train.module import check_training_length

    check_training_length(SimpleNamespace(val_check_interval=interval, check_val_every_n_epoch=None))


def test_a_python_trainer_accumulating_a_negative_number_of_batches_is_refused_at_fit_start(tmp_path):
    import lightning as L

    from nola_vision.train.module import check_training_length

    with pytest.raises(ValueError, match="accumulate_grad_batches=-1"):
        check_training_length(L.Trainer(accumulate_grad_batches=-1, logger=False, default_root_dir=tmp_path))


@pytest.mark.parametrize("least, most", [("min_epochs", "max_epochs"), ("min_steps", "max_steps")])
def test_a_minimum_above_its_maximum_is_refused_before_training(tmp_path, capsys, least, most):
    """--trainer.min_epochs 5 --trainer.max_epochs 3 trained 3 epochs without a word (Lightning stops at the max)."""
    code = main(["fit", "-c", str(TINY), "--trainer.default_root_dir", str(tmp_path), f"--trainer.{least}", "5",
                 f"--trainer.{most}", "3", *QUIET])
    err = capsys.readouterr().err
    assert code == 2 and f"trainer.{least}=5 is above trainer.{most}=3" in err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_resuming_from_a_checkpoint_saved_inside_an_epoch_is_refused(tmp_path, capsys):
    first = run_lightning_cli(["fit", "-c", str(TINY), "--trainer.default_root_dir", str(tmp_path / "first"),
                               "--trainer.max_steps", "2", "--test_after_fit", "false", *QUIET])
    assert first.trainer.global_step == 2 < STEPS  # stopped inside epoch 0
    checkpoint = Path(first.trainer.checkpoint_callback.last_model_path)
    code = main(["fit", "-c", str(TINY), "--ckpt_path", str(checkpoint), "--trainer.default_root_dir",
                 str(tmp_path / "resumed"), "--test_after_fit", "false", *QUIET])
    err = capsys.readouterr().err
    assert code == 2 and "saved after step 2, 2 batches into epoch 0" in err and "never train" in err
    # its only epoch=E-step=S.ckpt is this one: the advice to resume from an epoch's end alone left the user stuck
    assert [p.name for p in checkpoint.parent.glob("epoch=*.ckpt")] == ["epoch=0-step=2.ckpt"]
    assert "a run stopped inside its first epoch keeps none" in " ".join(err.split())
    assert not list((tmp_path / "resumed").rglob("*.ckpt"))
    from nola_vision.train.module import _require_epoch_end

    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] = [{"batches_yielded": 2}]  # a stateful loader's
    _require_epoch_end(saved)  # continues inside the epoch: let through


def test_the_result_names_no_checkpoint_rather_than_one_of_earlier_weights(tmp_path):
    # a user's ModelCheckpoint without last.ckpt whose best is epoch 0: test on it would not reproduce the result
    result = tmp_path / "result.json"
    common = ["-c", str(TINY), "--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "2",
              "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.monitor", "train/loss",
              "--trainer.callbacks.mode", "max", "--trainer.callbacks.save_last", "false", *QUIET]
    with pytest.warns(UserWarning, match="the result names no checkpoint"):
        run_lightning_cli(["fit", *common, "--trainer.callbacks.save_top_k", "1", "--result_file", str(result)])
    saved = json.loads(result.read_text())
    assert saved["checkpoint"] is None and saved["epochs"] == 2
    kept = list(tmp_path.rglob("*.ckpt"))  # the best, and the checkpoint of the latest epoch's end kept for a resume
    assert {torch.load(k, weights_only=False)["global_step"] for k in kept} == {STEPS}  # epoch 0's weights
    assert sorted(k.name for k in kept) == sorted(["epoch-end.ckpt", f"epoch=0-step={STEPS}.ckpt"])


def test_a_data_root_under_the_home_folder_is_read_there_not_under_the_working_directory(tmp_path, monkeypatch):
    """A YAML config's '~/data' (no shell expands it there) became '<cwd>/~/data'."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    cli = run_lightning_cli(["fit", "-c", str(TINY), "--data.root=~/digits", "--trainer.default_root_dir",
                             str(tmp_path), "--trainer.max_epochs", "1", "--test_after_fit", "false", *QUIET])
    assert cli.datamodule.hparams.root == str(tmp_path / "digits")
    saved = (Path(cli.trainer.log_dir) / "config.yaml").read_text()
    assert f"root: {tmp_path / 'digits'}" in saved


# ---- a ModelCheckpoint that monitors val/acc ---------------------------------------------------------------------

MONITORED = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.monitor=val/acc",
             "--trainer.callbacks.mode=max", "--trainer.callbacks.save_top_k=1", "--data.val_shots", "2", *QUIET]


def monitored_state(checkpoint: Path) -> dict:
    states = torch.load(checkpoint, map_location="cpu", weights_only=False)["callbacks"]
    return next(state for key, state in states.items() if "'monitor': 'val/acc'" in key)


def logged_val_acc(*log_dirs: Path) -> list:
    return [float(row["val/acc"]) for log_dir in log_dirs for row in csv.DictReader(open(log_dir / "metrics.csv"))
            if row.get("val/acc")]


def test_a_monitored_runs_last_ckpt_holds_its_final_epoch_and_test_finds_its_best(tmp_path, monkeypatch):
    # Lightning refreshed last.ckpt only when val/acc improved: the result named an earlier epoch's weights
    result = tmp_path / "fit.json"
    run_lightning_cli(["fit", "-c", str(TINY), "--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs",
                       "4", "--result_file", str(result), *MONITORED])
    fit = json.loads(result.read_text())
    assert torch.load(fit["checkpoint"], map_location="cpu", weights_only=False)["global_step"] == 4 * STEPS
    best = monitored_state(Path(fit["checkpoint"]))
    assert best["best_model_score"].item() == max(logged_val_acc(Path(fit["log_dir"])))
    monkeypatch.chdir(tmp_path.parent)  # a new process elsewhere: Lightning's own "best" knew no checkpoint
    tested = run_lightning_cli(["test", "-c", str(Path(fit["log_dir"]) / "config.yaml"), "--ckpt_path", "best", *QUIET])
    assert Path(tested.trainer.ckpt_path).resolve() == Path(best["best_model_path"]).resolve()


def test_best_names_what_is_missing_when_no_metric_was_monitored(run, capsys):
    code = main(["test", "-c", str(run["config"]), "--ckpt_path", "best", *QUIET])
    err = capsys.readouterr().err  # said ModelCheckpoint was not configured to save the best model
    assert code == 2 and "has no single best checkpoint: no ModelCheckpoint of it monitored a metric" in err


def test_best_of_a_run_whose_monitor_was_never_scored_says_no_validation_scored_it(tmp_path, capsys):
    # validation every 50 batches of a 9-batch run: "no ModelCheckpoint of it monitored a metric", naming as the fix
    # the callback the run had
    fit = ["fit", "-c", str(TINY), "--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "3",
           "--trainer.check_val_every_n_epoch", "null", "--trainer.val_check_interval", "50", *MONITORED]
    assert main(fit) == 0
    code = main(["test", "-c", str(next(tmp_path.rglob("config.yaml"))), "--ckpt_path", "best", *QUIET])
    err = capsys.readouterr().err
    assert code == 2 and "its ModelCheckpoint monitored val/acc, which no validation during training scored" in err


def test_a_resumed_monitored_run_keeps_the_best_of_its_earlier_epochs(tmp_path):
    # the resume logs to version_1, and Lightning dropped the scores kept in version_0: its first epoch was the best
    common = ["fit", "-c", str(TINY), "--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "6",
              *MONITORED]
    run_lightning_cli([*common, "--trainer.max_steps", str(3 * STEPS)])  # stopped after 3 of 6 epochs
    resumed = run_lightning_cli([*common, "--ckpt_path", "last"])
    logs = sorted((tmp_path / "lightning_logs").glob("version_*"))
    assert [p.name for p in logs] == ["version_0", "version_1"]
    before, after = logged_val_acc(logs[0]), logged_val_acc(logs[1])
    assert len(before) == len(after) == 3 and max(before) > max(after)  # the best epoch came before the resume
    callback = resumed.trainer.checkpoint_callback
    assert callback.best_model_score.item() == max(before) and Path(callback.best_model_path).parent.parent == logs[0]
    assert monitored_state(logs[1] / "checkpoints" / "last.ckpt")["best_model_path"] == callback.best_model_path


def test_a_runs_config_used_from_another_folder_finds_that_runs_checkpoint(tmp_path, monkeypatch):
    # its default_root_dir was saved relative ("run"): --ckpt_path last from another folder holding a "run" of its own
    # tested that run's checkpoint, under the first run's config
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        run_lightning_cli(["fit", "-c", str(TINY), "--trainer.default_root_dir", "run", "--trainer.max_epochs", "1",
                           "--data.split_dir", "splits", "--test_after_fit", "false", *QUIET])
    config = tmp_path / "a" / "run" / "lightning_logs" / "version_0" / "config.yaml"
    saved = yaml.safe_load(config.read_text())
    assert saved["trainer"]["default_root_dir"] == str(tmp_path / "a" / "run")
    assert saved["data"]["split_dir"] == str(tmp_path / "a" / "splits")
    tested = run_lightning_cli(["test", "-c", str(config), "--ckpt_path", "last", *QUIET])  # run from b
    assert Path(tested.trainer.ckpt_path).is_relative_to(tmp_path / "a")
    assert not (tmp_path / "b" / "run" / "lightning_logs" / "version_1").exists()  # it logs beside the fit's


def test_a_resumed_runs_config_names_no_checkpoint_to_evaluate(run, tmp_path, capsys):
    # its config.yaml kept the checkpoint it resumed from: test -c <it> without --ckpt_path evaluated those older
    # weights, silently, and named them in its result
    cli = run_lightning_cli(["fit", "-c", str(run["config"]), "--ckpt_path", str(run["checkpoint"]),
                             "--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "4",
                             "--test_after_fit", "false", *QUIET])
    config = Path(cli.trainer.log_dir) / "config.yaml"
    assert yaml.safe_load(config.read_text())["ckpt_path"] is None
    assert main(["test", "-c", str(config), *QUIET]) == 2
    assert "test without --ckpt_path would evaluate the untrained model" in capsys.readouterr().err
    # its own last.ckpt, not the newest under the root nor the one it resumed
    tested = run_lightning_cli(["test", "-c", str(config), "--ckpt_path", "last", *QUIET])
    assert Path(tested.trainer.ckpt_path) == Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"


def test_last_with_a_runs_config_is_that_runs_last_checkpoint_not_the_newest_runs(tmp_path):
    # two runs under one root: `test -c version_0/config.yaml --ckpt_path last` tested version_1's weights
    for seed in ("0", "1"):
        run_lightning_cli(["fit", "-c", str(TINY), "--trainer.default_root_dir", str(tmp_path), "--seed_everything",
                           seed, "--trainer.max_epochs", "1", "--test_after_fit", "false", *QUIET])
    first = tmp_path / "lightning_logs" / "version_0"
    tested = run_lightning_cli(["test", "-c", str(first / "config.yaml"), "--ckpt_path", "last",
                                "--trainer.logger", "false", *QUIET])
    assert Path(tested.trainer.ckpt_path) == first / "checkpoints" / "last.ckpt"
    # a logger-less run's folder is the root: its own last.ckpt, not the newer logged runs' below it
    loggerless = tmp_path / "loggerless"
    for logger in ("false", "true"):
        run_lightning_cli(["fit", "-c", str(TINY), "--trainer.default_root_dir", str(loggerless), "--trainer.logger",
                           logger, "--trainer.max_epochs", "1", "--test_after_fit", "false", *QUIET])
    tested = run_lightning_cli(["test", "-c", str(loggerless / "config.yaml"), "--ckpt_path", "last",
                                "--trainer.logger", "false", *QUIET])
    assert Path(tested.trainer.ckpt_path) == loggerless / "checkpoints" / "last.ckpt"
    # the root named on the command line: its newest run, whatever config the settings came from
    tested = run_lightning_cli(["test", "-c", str(first / "config.yaml"), "--trainer.default_root_dir", str(tmp_path),
                                "--ckpt_path", "last", "--trainer.logger", "false", *QUIET])
    assert Path(tested.trainer.ckpt_path) == tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt"
    # without a run's config, the newest run under the root, as before
    tested = run_lightning_cli(["test", "-c", str(TINY), "--trainer.default_root_dir", str(tmp_path), "--ckpt_path",
                                "last", "--trainer.logger", "false", *QUIET])
    assert Path(tested.trainer.ckpt_path) == tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt"


def test_last_and_best_are_found_in_a_checkpoint_callbacks_own_folder(tmp_path, monkeypatch):
    # was: a ModelCheckpoint with its own dirpath keeps last.ckpt there, and --ckpt_path last/best looked only in the
    # run's folder ("no last.ckpt ... nothing to resume")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    callback = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath=ckpts",
                "--trainer.callbacks.save_last=true", "--trainer.callbacks.monitor=val/acc",
                "--trainer.callbacks.mode=max", "--trainer.callbacks.filename={epoch}"]
    run_lightning_cli(["fit", "-c", str(TINY), "--trainer.default_root_dir", "run", "--trainer.max_epochs", "2",
                       "--data.val_shots", "2", "--test_after_fit", "false", *callback, *QUIET])
    config = tmp_path / "run" / "lightning_logs" / "version_0" / "config.yaml"
    assert yaml.safe_load(config.read_text())["trainer"]["callbacks"][0]["init_args"]["dirpath"] == \
        str(tmp_path / "ckpts")  # saved absolute, as the run's other folders
    monkeypatch.chdir(tmp_path / "elsewhere")
    tested = run_lightning_cli(["test", "-c", str(config), "--ckpt_path", "last", "--trainer.logger", "false", *QUIET])
    assert Path(tested.trainer.ckpt_path) == tmp_path / "ckpts" / "last.ckpt"
    best = torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=False)["callbacks"]
    tested = run_lightning_cli(["test", "-c", str(config), "--ckpt_path", "best", "--trainer.logger", "false", *QUIET])
    assert Path(tested.trainer.ckpt_path) == Path(next(iter(best.values()))["best_model_path"])
    assert Path(tested.trainer.ckpt_path).parent == tmp_path / "ckpts"


def test_a_runs_result_file_and_weights_file_are_saved_absolute(tmp_path, monkeypatch):
    # saved relative, `test -c <run>/config.yaml` from another directory missed the fit's result and wrote a test
    # result of that name there; a relative pretrained_file read another directory's file of that name
    from safetensors.torch import save_file

    from nola_vision.models.backbones import build_backbone

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    backbone = build_backbone("vit_tiny_patch16_224", 0, pretrained=False, image_size=32,
                              **yaml.safe_load(TINY.read_text())["model"]["backbone_kwargs"])
    save_file(backbone.state_dict(), "weights.safetensors")
    run_lightning_cli(["fit", "-c", str(TINY), "--trainer.default_root_dir", "run", "--trainer.max_epochs", "1",
                       "--model.pretrained", "true", "--model.pretrained_file", "weights.safetensors",
                       "--model.adapter_dir", "adapter", "--result_file", "result.json", *QUIET])
    config = tmp_path / "a" / "run" / "lightning_logs" / "version_0" / "config.yaml"
    saved = yaml.safe_load(config.read_text())
    assert saved["result_file"] == str(tmp_path / "a" / "result.json")
    assert saved["model"]["pretrained_file"] == str(tmp_path / "a" / "weights.safetensors")
    assert saved["model"]["adapter_dir"] == str(tmp_path / "a" / "adapter")
    monkeypatch.chdir(tmp_path / "b")
    assert main(["test", "-c", str(config), "--ckpt_path", "last", *QUIET]) == 0
    assert not (tmp_path / "b" / "result.json").exists()


def test_a_checkpoint_is_pointed_at_its_moved_weights_file_and_refuses_other_weights(tmp_path, monkeypatch, capsys):
    # was: any --model.pretrained_file other than the recorded string (a moved project, or a checkpoint that recorded
    # it relative) was refused as a changed hyper-parameter, so the checkpoint could not be tested or resumed at all
    from safetensors.torch import save_file

    from nola_vision.models.backbones import build_backbone

    kwargs = yaml.safe_load(TINY.read_text())["model"]["backbone_kwargs"]
    monkeypatch.chdir(tmp_path)
    weights = build_backbone("vit_tiny_patch16_224", 0, pretrained=False, image_size=32, **kwargs).state_dict()
    save_file(weights, "weights.safetensors")
    save_file({**weights, "blocks.0.mlp.fc1.weight": weights["blocks.0.mlp.fc1.weight"] * 1.1}, "other.safetensors")
    run_lightning_cli(["fit", "-c", str(TINY), "--trainer.default_root_dir", "run", "--trainer.max_epochs", "1",
                       "--model.pretrained", "true", "--model.pretrained_file", "weights.safetensors",
                       "--test_after_fit", "false", *QUIET])
    last = tmp_path / "run" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    (tmp_path / "moved").mkdir()
    (tmp_path / "weights.safetensors").rename(tmp_path / "moved" / "weights.safetensors")
    test = ["test", "-c", str(TINY), "--ckpt_path", str(last), "--trainer.logger", "false", *QUIET]
    assert main([*test, "--model.pretrained_file", "moved/weights.safetensors"]) == 0
    capsys.readouterr()
    assert main([*test, "--model.pretrained_file", "other.safetensors"]) == 2  # the fingerprint tells other weights
    assert "frozen" in capsys.readouterr().err
    # the run's config.yaml edited to the new place: its recorded file is gone, so the config's path is taken
    config = tmp_path / "run" / "lightning_logs" / "version_0" / "config.yaml"
    edited = tmp_path / "edited.yaml"
    edited.write_text(config.read_text().replace(str(tmp_path / "weights.safetensors"),
                                                 str(tmp_path / "moved" / "weights.safetensors")))
    assert main(["test", "-c", str(edited), "--ckpt_path", str(last), "--trainer.logger", "false", *QUIET]) == 0
    # a run that loaded no weights file (pretrained false) is not pointed at one
    run_lightning_cli(["fit", "-c", str(TINY), "--trainer.default_root_dir", "random", "--trainer.max_epochs", "1",
                       "--test_after_fit", "false", *QUIET])
    random_last = tmp_path / "random" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    assert main(["test", "-c", str(TINY), "--ckpt_path", str(random_last), "--trainer.logger", "false",
                 "--model.pretrained_file", "moved/weights.safetensors", *QUIET]) == 2
    assert "Drop those arguments" in capsys.readouterr().err


def test_a_checkpoint_that_records_no_weights_file_is_given_one_without_a_key_error():
    # the hyper-parameters of a checkpoint written before pretrained_file existed lack the key
    from jsonargparse import Namespace

    from nola_vision.train.cli import check_checkpoint_overrides

    given = Namespace(pretrained=True, pretrained_file="/new/weights.safetensors")
    assert check_checkpoint_overrides(given, Namespace(pretrained=True), {"pretrained_file"}) == {}


def test_a_run_with_a_gradient_clip_algorithm_keeps_checkpoints_that_load(tmp_path, capsys):
    # the checkpoint recorded Lightning's GradClipAlgorithmType: weights_only loading refused it, so test, resume and
    # load_from_checkpoint all failed with an UnpicklingError after a fit that exited 0
    clip = ["--trainer.gradient_clip_val", "0.5", "--trainer.gradient_clip_algorithm", "norm"]
    run_lightning_cli(["fit", "-c", str(TINY), "--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "1",
                       "--test_after_fit", "false", *clip, *QUIET])
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert main(["test", "-c", str(TINY), "--ckpt_path", str(last), "--trainer.logger", "false", *QUIET]) == 0
    resumed = run_lightning_cli(["fit", "-c", str(TINY), "--trainer.default_root_dir", str(tmp_path), "--ckpt_path",
                                 str(last), "--trainer.max_epochs", "2", "--test_after_fit", "false", *clip, *QUIET])
    assert resumed.trainer.current_epoch == 2
    assert main(["fit", "-c", str(TINY), "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(last),
                 "--trainer.max_epochs", "2", "--trainer.gradient_clip_val", "0.5",
                 "--trainer.gradient_clip_algorithm", "value", *QUIET]) == 2
    assert "--trainer.gradient_clip_algorithm 'value' (checkpoint: 'norm')" in capsys.readouterr().err
    # a checkpoint of an earlier version holds the enum itself: it loads, and compares as its string
    from lightning.pytorch.utilities import GradClipAlgorithmType

    earlier = torch.load(last, weights_only=False)
    earlier["nola_vision"]["training"]["gradient_clip_algorithm"] = GradClipAlgorithmType.NORM
    del earlier["nola_vision"]["record_sha256"]  # not recorded then
    torch.save(earlier, tmp_path / "earlier.ckpt")
    assert main(["test", "-c", str(TINY), "--ckpt_path", str(tmp_path / "earlier.ckpt"), "--trainer.logger", "false",
                 *QUIET]) == 0
    resumed = run_lightning_cli(["fit", "-c", str(TINY), "--trainer.default_root_dir", str(tmp_path / "again"),
                                 "--ckpt_path", str(tmp_path / "earlier.ckpt"), "--trainer.max_epochs", "2",
                                 "--test_after_fit", "false", *clip, *QUIET])
    assert resumed.trainer.current_epoch == 2
