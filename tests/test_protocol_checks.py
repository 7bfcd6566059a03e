"""Protocol and tune refuse what would fail or mix every run once, before any run: data that changed under a row,
an init seed seed_everything refuses, a misspelt fit option, a trainer set to train no epoch."""
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from fake_fit import fake_python
from PIL import Image

from nola_vision.runs.protocol import run_protocol
from nola_vision.runs.results import write_tables
from nola_vision.runs.tune import check_grid

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_offline.yaml")


def image_folder(root: Path, test_per_class: int) -> None:
    """An imagefolder dataset of two classes: 4 train images each, ``test_per_class`` test images each."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("test", test_per_class)):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_a_row_refuses_runs_on_images_that_changed_since_its_first_runs(tmp_path):
    # split 0 ran on a folder, the folder was regenerated with other test images, split 1 ran on the new data: one
    # row of 2 runs on two data sets, without a warning
    data = tmp_path / "imgdata"
    image_folder(data, test_per_class=2)
    options = dict(out=str(tmp_path / "out"), name="row", init_seeds=[0], python=fake_python(tmp_path), echo=False,
                   overrides=["--data.dataset", "imagefolder", "--data.root", str(data), "--data.shots", "2"])
    run_protocol([TINY], split_seeds=[0], **options)
    recorded = json.loads((tmp_path / "out" / "row" / "split0-init0" / "result.json").read_text())["data"]
    assert set(recorded) == {"train", "test"}
    image_folder(data, test_per_class=5)  # more test images
    with pytest.raises(ValueError, match=r"split0-init0 was made on other images .* \(test images "):
        run_protocol([TINY], split_seeds=[0, 1], **options)
    assert not (tmp_path / "out" / "row" / "split1-init0").exists()


def test_the_tables_do_not_average_runs_that_recorded_other_test_images(tmp_path):
    for run, test in (("split0-init0", "aaaa"), ("split1-init0", "bbbb")):
        (tmp_path / "row" / run).mkdir(parents=True)
        (tmp_path / "row" / run / "result.json").write_text(json.dumps({
            "metrics": {"test/acc": 0.5}, "config": {"method": "nola"}, "parameter_counts": {"adapter": 8, "head": 2},
            "data": {"train": "tttt", "test": test}}))
    with pytest.warns(UserWarning, match="test_images aaaa / bbbb"):
        write_tables(str(tmp_path))
    assert "not averaged: mixed settings" in (tmp_path / "results.md").read_text()


def test_the_tables_do_not_average_runs_trained_in_other_precisions(tmp_path):
    # a row resumed with --trainer.precision bf16-mixed after its first run trained in float32; a run recorded before
    # results named their precision is averaged with either
    for run, precision in (("split0-init0", "32-true"), ("split1-init0", "bf16-mixed"), ("split2-init0", None)):
        (tmp_path / "row" / run).mkdir(parents=True)
        config = {"method": "nola", **({"precision": precision} if precision else {})}
        (tmp_path / "row" / run / "result.json").write_text(json.dumps({
            "metrics": {"test/acc": 0.5}, "config": config, "parameter_counts": {"adapter": 8, "head": 2}}))
    with pytest.warns(UserWarning, match="precision 32-true / bf16-mixed"):
        write_tables(str(tmp_path))
    assert "not averaged: mixed settings" in (tmp_path / "results.md").read_text()
    (tmp_path / "row" / "split1-init0" / "result.json").unlink()
    write_tables(str(tmp_path))
    assert "| 2 | 50.0 (0.0) |" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("field, value, named", [
    ("config", "nola", "config is str"), ("parameter_counts", [8, 2], "parameter_counts is list"),
    ("parameter_counts", {"adapter": None, "head": 2}, "parameter_counts.adapter is None"),
    ("parameter_counts", {"adapter": "8", "head": 2}, "parameter_counts.adapter is '8'"),
])
def test_a_hand_edited_result_is_left_out_of_the_tables_naming_it_and_the_other_runs_are_tabled(tmp_path, field,
                                                                                                value, named):
    # it stopped the tables of every row under --out (and so every protocol command there) with a bare traceback
    for run in ("split0-init0", "split1-init0"):
        (tmp_path / "row" / run).mkdir(parents=True)
        (tmp_path / "row" / run / "result.json").write_text(json.dumps({
            "metrics": {"test/acc": 0.5}, "config": {"method": "nola"}, "parameter_counts": {"adapter": 8, "head": 2}}))
    damaged = tmp_path / "row" / "split1-init0" / "result.json"
    damaged.write_text(json.dumps({**json.loads(damaged.read_text()), field: value}))
    message = rf"{re.escape(str(damaged))} is not a result fit writes \({re.escape(named)}\), so it is left out"
    with pytest.warns(UserWarning, match=message + r" of the tables. Delete .*split1-init0 to redo the run"):
        write_tables(str(tmp_path))
    assert "| 1 | 50.0 (0.0) |" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("content", ['{"metrics": {"test/', '[0.5]'], ids=["truncated", "not_an_object"])
def test_an_unreadable_result_is_left_out_of_the_tables_naming_it_and_the_other_runs_are_tabled(tmp_path, content):
    # it was dropped without a word: the row looked as if that run had never been asked for
    for run in ("split0-init0", "split1-init0", "split2-init0"):
        (tmp_path / "row" / run).mkdir(parents=True)
        (tmp_path / "row" / run / "result.json").write_text(json.dumps({
            "metrics": {"test/acc": 0.5}, "config": {"method": "nola"}, "parameter_counts": {"adapter": 8, "head": 2}}))
    damaged = tmp_path / "row" / "split2-init0" / "result.json"
    damaged.write_text(content)
    message = rf"{re.escape(str(damaged))} cannot be read as a result \(truncated, or not a JSON object\), so it is"
    with pytest.warns(UserWarning, match=message + r" left out of the tables. Re-run the command that made it to redo"):
        write_tables(str(tmp_path))
    assert "| 2 | 50.0 (0.0) |" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_protocol_refuses_an_init_seed_that_seed_everything_refuses_before_any_run(tmp_path, seed):
    with pytest.raises(ValueError, match=f"--init_seeds {seed} is out of range: .* 0 to 4294967295"):
        run_protocol([TINY], out=str(tmp_path), name="neg", split_seeds=[0], init_seeds=[seed],
                     python=fake_python(tmp_path), echo=False)
    assert not (tmp_path / "neg").exists()


@pytest.mark.parametrize("override, message", [
    (["--trainer.max_epochz", "1"], "unrecognized arguments: --trainer.max_epochz 1"),
    (["--trainer.max_epochs", "-1"], "trainer.max_epochs=-1 .* 1 or more epochs"),
    (["--model.lr", "-1"], "lr"),
])
def test_protocol_refuses_fit_arguments_every_run_would_fail_on_before_any_run(tmp_path, override, message):
    with pytest.raises(ValueError, match=f"not valid `nola-vision fit` arguments, so every run would fail: .*{message}"
                       ):
        run_protocol([TINY], out=str(tmp_path), name="typo", split_seeds=[0], init_seeds=[0], overrides=override,
                     python=fake_python(tmp_path), echo=False)
    assert not (tmp_path / "typo").exists()


def test_protocol_and_tune_refuse_an_abbreviated_fit_option_naming_the_whole_one(tmp_path):
    # fit takes --trainer.max_ep; protocol refused it as if every run would fail, and an abbreviation of an option
    # protocol sets itself (--model.adapter_d) would pass its by-name check.
    with pytest.raises(ValueError, match=r"^--trainer.max_ep abbreviates --trainer.max_epochs: protocol takes whole"):
        run_protocol([TINY], out=str(tmp_path), name="short", split_seeds=[0], init_seeds=[0],
                     overrides=["--trainer.max_ep=1"], python=fake_python(tmp_path), echo=False)
    assert not (tmp_path / "short").exists()
    with pytest.raises(ValueError, match=r"^--model.l abbreviates --model.label_smoothing or --model.lr: tune takes"):
        check_grid([TINY], [], {"model.l": [1e-3]})
    with pytest.raises(ValueError, match=r"^--trainer.max_ep abbreviates --trainer.max_epochs: tune takes"):
        check_grid([TINY], ["--trainer.max_ep", "1"], {"model.lr": [1e-3]})


def test_tune_refuses_a_trainer_that_trains_no_epoch_before_any_trial():
    with pytest.raises(ValueError, match="trainer.max_epochs=-1 .* 1 or more epochs"):
        check_grid([TINY], ["--trainer.max_epochs", "-1"], {"model.lr": [1e-3]})
    with pytest.raises(ValueError, match="--grid trainer.max_epochs=0 .* trains nothing"):
        check_grid([TINY], [], {"trainer.max_epochs": [0, 2]})


def test_a_run_that_fit_refuses_is_reported_with_its_error_not_as_one_to_retry(tmp_path):
    # exit 2 (fit refused to run) was reported as "re-run the same command to retry them"
    refusing = tmp_path / "refusing_python"
    refusing.write_text(f"#!{sys.executable}\nimport sys\nprint('loading')\n"
                        "print('nola-vision: error: FewShotDataModule.root imgdata: no such folder', file=sys.stderr)\n"
                        "sys.exit(2)\n")
    refusing.chmod(0o755)
    with pytest.raises(RuntimeError) as raised:  # the other runs share its settings: not started (each took minutes
        run_protocol([TINY], out=str(tmp_path), name="bad", split_seeds=[0, 1], init_seeds=[0, 1],  # offline)
                     python=str(refusing), echo=False)
    text = str(raised.value)
    assert text.count("fit refused to run: nola-vision: error: FewShotDataModule.root imgdata") == 1
    assert "3 more runs of bad not started, as they would be refused alike" in text
    assert "fix what the errors name, then re-run" in text and "to retry them" not in text
