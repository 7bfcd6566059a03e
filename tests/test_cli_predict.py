"""``predict`` and its predictions CSV: never part of a pass over a whole file, never another loader's file names,
never a file that appeared at the path during the pass; ``~`` in output paths; SIGTERM ends the pass."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from nola_vision.cli import main
from nola_vision.train.cli import PredictionsCSVWriter, run_lightning_cli

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "nola_vision.cli"]
COLOURS = {"bird": (30, 30, 200), "cat": (200, 30, 30), "dog": (30, 200, 30)}
TEST_IMAGES = 3 * len(COLOURS)


class WriteUserFile(Callback):
    """Writes a user's own file at ``path`` during a predict or test pass (another process of the user's would)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_predict_batch_end(self, *args, **kwargs) -> None:
        Path(self.path).write_text("my notes\n")

    on_test_batch_end = on_predict_batch_end


class SlowBatches(Callback):
    """Says when a predict batch ended, then takes its time: the test sends SIGTERM meanwhile."""

    def on_predict_batch_end(self, *args, **kwargs) -> None:
        print("BATCH_DONE", flush=True)
        time.sleep(2)


class SlowEnd(Callback):
    """Says when a pass's last batch is done, then takes its time before the pass's file is written."""

    def on_predict_epoch_end(self, *args, **kwargs) -> None:
        print("END_REACHED", flush=True)
        time.sleep(3)

    on_test_epoch_end = on_predict_epoch_end


def _image_folder(root: Path) -> Path:
    for split, n in (("train", 4), ("test", 3)):
        for name, colour in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (16, 16), colour).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-epoch fit on a 3-class image folder; the arguments of a predict pass of its last checkpoint."""
    root = tmp_path_factory.mktemp("predict")
    data = _image_folder(root / "data")
    args = ["--data.dataset", "imagefolder", "--data.root", str(data), "--data.shots", "4", "--data.batch_size", "4",
            "--data.eval_batch_size", "4", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
            "--trainer.default_root_dir", str(root / "run")]
    assert main(["fit", "-c", str(ROOT / "configs" / "tiny_offline.yaml"), *args, "--trainer.max_epochs", "1",
                 "--test_after_fit", "false"]) == 0
    checkpoint = root / "run" / "checkpoints" / "last.ckpt"
    return {"data": data, "predict": ["predict", "-c", str(root / "run" / "config.yaml"), "--ckpt_path",
                                      str(checkpoint), "--trainer.enable_progress_bar", "false"],
            "fit": ["fit", "-c", str(ROOT / "configs" / "tiny_offline.yaml"), *args[:-2], "--trainer.max_steps", "1"]}


def _rows(path: Path) -> list:
    return list(csv.DictReader(path.open(newline="")))


def test_a_debugging_pass_never_writes_part_of_the_predictions_over_the_whole_file(run, tmp_path, capsys):
    out = tmp_path / "p.csv"
    assert main([*run["predict"], "--predictions_file", str(out)]) == 0
    whole = out.read_bytes()
    assert len(_rows(out)) == TEST_IMAGES
    assert main([*run["predict"], "--predictions_file", str(out), "--trainer.fast_dev_run", "true"]) == 0
    assert out.read_bytes() == whole  # fast_dev_run predicted one batch, and wrote none of it
    for limit in ("0.5", "2"):  # of 3 batches
        assert main([*run["predict"], "--predictions_file", str(out), "--trainer.limit_predict_batches", limit]) == 2
        assert "would hold predictions of part of the test split" in capsys.readouterr().err
        assert out.read_bytes() == whole
    assert main([*run["predict"], "--predictions_file", str(out), "--trainer.limit_predict_batches", "3"]) == 0
    assert len(_rows(out)) == TEST_IMAGES  # a limit of every batch is no limit


def test_predictions_file_is_refused_by_test_and_a_tilde_is_the_home_folder(run, tmp_path, monkeypatch, capsys):
    assert main(["test", *run["predict"][1:], "--predictions_file", str(tmp_path / "p.csv")]) == 2
    assert "test writes no predictions: --predictions_file is for predict" in capsys.readouterr().err
    assert main(["test", *run["predict"][1:], "--predictions_file", "null"]) == 0  # sets nothing
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main([*run["predict"], "--predictions_file", "~/p.csv"]) == 0
    assert len(_rows(tmp_path / "home" / "p.csv")) == TEST_IMAGES and not (tmp_path / "~").exists()
    assert main(["test", *run["predict"][1:], "--result_file", "~/test.json"]) == 0
    assert (tmp_path / "home" / "test.json").is_file() and not (tmp_path / "~").exists()


@pytest.mark.parametrize("subcommand, option", [("predict", "--predictions_file"), ("test", "--result_file"),
                                                ("fit", "--result_file")])
def test_a_users_file_that_appears_at_the_output_during_the_pass_is_kept(run, tmp_path, subcommand, option, capsys):
    out = tmp_path / "out"
    args = ([*run["fit"], "--trainer.default_root_dir", str(tmp_path / "run")] if subcommand == "fit"
            else [subcommand, *run["predict"][1:]])
    code = main([*args, option, str(out), "--trainer.callbacks+=test_cli_predict.WriteUserFile",
                 "--trainer.callbacks.init_args.path", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and out.read_text() == "my notes\n"  # a failure of the run, not of its configuration
    assert f"{option} {out} exists and is not a file" in err and "it appeared during the run" in err
    if subcommand != "predict":  # what the pass measured is in the message
        assert "its metrics: {" in err and "test/acc" in err
    if subcommand == "fit":  # and what it trained is kept
        assert "Training finished and was kept" in err and str(tmp_path / "run" / "checkpoints") in err


def test_a_fit_from_a_mapping_of_arguments_runs(tmp_path):
    # the --predictions_file check took any mapping for an explicit --predictions_file, refusing every such fit
    config = yaml.safe_load((ROOT / "configs" / "tiny_offline.yaml").read_text())
    config["trainer"].update(max_steps=1, default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False)
    cli = run_lightning_cli({"subcommand": "fit", "fit": {**config, "test_after_fit": False}})
    assert cli.trainer.global_step == 1


def test_a_missing_or_empty_test_image_is_named_before_the_pass(run, tmp_path, capsys):
    empty = run["data"] / "test" / "dog" / "2.png"
    kept = empty.read_bytes()
    for damaged, why in ((b"", "empty (0 bytes"), (kept[: len(kept) // 2], "cut short")):
        try:
            empty.write_bytes(damaged)
            assert main([*run["predict"], "--predictions_file", str(tmp_path / "p.csv")]) == 2  # refused before
        finally:
            empty.write_bytes(kept)
        err = capsys.readouterr().err
        # a cut-short image was said to be "missing, empty (0 bytes) or unreadable": each is named with its reason
        assert f"1 test image(s) cannot be read: {empty} is {why}" in err
        assert "before predicting" in err
        assert not (tmp_path / "p.csv").exists()


def test_results_name_their_files_from_any_working_directory(run, tmp_path, monkeypatch):
    # a fit into a relative folder recorded runs/.../last.ckpt: from another directory its test read nothing
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "-c", str(ROOT / "configs" / "tiny_offline.yaml"), "--data.dataset", "imagefolder",
                 "--data.root", str(run["data"]), "--data.shots", "4", "--trainer.enable_progress_bar", "false",
                 "--trainer.default_root_dir", "rel", "--trainer.max_steps", "1", "--test_after_fit", "false",
                 "--result_file", "fit.json"]) == 0
    fit = json.loads((tmp_path / "fit.json").read_text())
    for key in ("log_dir", "checkpoint", "adapter_dir"):
        assert Path(fit[key]).is_absolute() and Path(fit[key]).exists(), (key, fit[key])
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["test", "-c", str(Path(fit["log_dir"]) / "config.yaml"), "--ckpt_path", fit["checkpoint"],
                 "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--result_file", "t.json",
                 "--trainer.default_root_dir", "."]) == 0
    tested = json.loads((tmp_path / "elsewhere" / "t.json").read_text())
    assert tested["checkpoint"] == fit["checkpoint"] and Path(tested["log_dir"]).is_absolute()


def test_a_saved_configs_predictions_file_is_kept_from_another_checkpoints_pass(run, tmp_path):
    # predict -c <an earlier predict's config.yaml> --ckpt_path <another run's> replaced that pass's predictions
    earlier = tmp_path / "earlier.csv"
    logged = ["--trainer.logger", "true", "--trainer.default_root_dir", str(tmp_path / "logs")]
    assert main([*run["predict"], *logged, "--predictions_file", str(earlier)]) == 0
    kept = earlier.read_bytes()
    (saved,) = (tmp_path / "logs").rglob("config.yaml")
    assert yaml.safe_load(saved.read_text())["predictions_file"] == str(earlier)
    assert main(["predict", "-c", str(saved), "--ckpt_path", run["predict"][4], *logged[:2],
                 "--trainer.enable_progress_bar", "false"]) == 0
    assert earlier.read_bytes() == kept
    assert len(list((tmp_path / "logs").rglob("predictions.csv"))) == 1  # this pass's, in its own log folder


def test_a_fits_result_names_the_images_its_test_metrics_come_from(run, tmp_path):
    # fits on two roots of one dataset gave results whose config sections were the same
    assert main([*run["fit"], "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.logger", "false",
                 "--result_file", str(tmp_path / "fit.json")]) == 0
    evaluated = json.loads((tmp_path / "fit.json").read_text())["evaluated"]
    assert evaluated["split"] == "test" and evaluated["root"] == str(run["data"])
    assert evaluated["images"] == TEST_IMAGES
    assert main([*run["fit"], "--trainer.default_root_dir", str(tmp_path / "untested"), "--trainer.logger", "false",
                 "--test_after_fit", "false", "--result_file", str(tmp_path / "untested.json")]) == 0
    assert json.loads((tmp_path / "untested.json").read_text())["evaluated"] is None


def test_sigterm_ends_a_predict_pass_without_writing_its_file(run, tmp_path):
    out = tmp_path / "p.csv"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([*CLI, *run["predict"], "--predictions_file", str(out),
                                "--trainer.callbacks+=test_cli_predict.SlowBatches"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    for line in process.stdout:  # the pass has started: its first batch ended
        if "BATCH_DONE" in line:
            break
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143 and "stopped by SIGTERM" in err  # before: the pass went on, and exited 0
    assert not out.exists()


@pytest.mark.parametrize("subcommand", ["predict", pytest.param("test", marks=pytest.mark.slow)])  # one guard for both
def test_a_sigterm_after_the_last_batch_writes_nothing_and_exits_143(run, tmp_path, subcommand):
    # Lightning's handler took it and nothing looked again: the file was written (over the old one) and the exit 0,
    # so a scheduler's cancel was lost
    out = tmp_path / ("p.csv" if subcommand == "predict" else "r.json")
    option = "--predictions_file" if subcommand == "predict" else "--result_file"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([*CLI, subcommand, *run["predict"][1:], option, str(out),
                                "--trainer.callbacks+=test_cli_predict.SlowEnd"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    for line in process.stdout:
        if "END_REACHED" in line:
            break
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143 and "stopped by SIGTERM" in err, err[-2000:]
    assert not out.exists()


# ---- the writer under a Trainer of its own (Python) --------------------------------------------------------------

class _Images(Dataset):
    """Labelled stand-in images; ``fail_at`` makes one of them fail to load."""

    def __init__(self, n: int, fail_at: int = -1) -> None:
        self.samples = [(f"test/{i % 2}/{i}.png", i % 2) for i in range(n)]
        self.fail_at = fail_at

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        if i == self.fail_at:
            raise OSError(f"cannot read image {i}")
        return torch.full((2,), float(i)), self.samples[i][1]


class _TestSplit(Dataset):
    def __init__(self, dataset: _Images) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[i]


class _Data(LightningDataModule):
    class_names = ["even", "odd"]

    def __init__(self) -> None:
        super().__init__()
        self.test_set = _TestSplit(_Images(6))

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=2)


class _Classifier(LightningModule):
    def predict_step(self, batch, batch_idx):
        x, y = batch
        prediction = (x[:, 0] > 2).long()
        return {"prediction": prediction, "confidence": torch.ones(len(y)), "label": y}


def test_the_writer_reads_each_batch_back_once_not_each_value(tmp_path):
    # on a GPU each int(tensor[i]) waits for the device: 3 waits per image
    from counted_ops import CountedOps

    writer = PredictionsCSVWriter(str(tmp_path / "p.csv"))
    prediction = {"prediction": torch.tensor([1, 0, 1]), "confidence": torch.tensor([0.5, 0.25, 1.0]),
                  "label": torch.tensor([1, 1, 0])}
    with CountedOps() as ops:
        writer.write_on_batch_end(SimpleNamespace(), None, prediction, [4, 5, 6], None, 0, 0)
    assert ops.calls["_local_scalar_dense"] == 0
    assert [(r["index"], r["prediction"], r["confidence"], r["label"]) for r in writer.rows] == [
        (4, 1, 0.5, 1), (5, 0, 0.25, 1), (6, 1, 1.0, 0)]


def test_the_writer_names_only_the_data_modules_own_files_and_keeps_no_rows_of_a_failed_pass(tmp_path):
    out = tmp_path / "p.csv"
    writer = PredictionsCSVWriter(str(out))
    trainer = Trainer(callbacks=[writer], logger=False, enable_progress_bar=False, accelerator="cpu")
    model, data = _Classifier(), _Data()
    trainer.predict(model, datamodule=data, return_predictions=False)
    assert [r["path"] for r in _rows(out)] == [f"test/{i % 2}/{i}.png" for i in range(6)]
    trainer.predict(model, dataloaders={"split": data.predict_dataloader()}, return_predictions=False)  # a dict
    assert [r["path"] for r in _rows(out)] == [f"test/{i % 2}/{i}.png" for i in range(6)]
    # Another loader after the data module's pass: Lightning keeps trainer.datamodule, whose files are not these.
    trainer.predict(model, dataloaders=DataLoader(_Images(4), batch_size=2), return_predictions=False)
    rows = _rows(out)
    assert len(rows) == 4 and {r["path"] for r in rows} == {""} and {r["label_name"] for r in rows} == {""}
    assert [r["prediction_name"] for r in rows] == ["even", "even", "even", "odd"]  # the model's classes
    with pytest.raises(OSError, match="cannot read image 3"):  # a pass that fails after its first batch
        trainer.predict(model, dataloaders=DataLoader(_Images(6, fail_at=3), batch_size=2), return_predictions=False)
    trainer.predict(model, datamodule=data, return_predictions=False)
    assert len(_rows(out)) == 6  # not 8: the failed pass's first batch is not among them
