"""Protocol and tune never write over a file of a name they write that they did not write themselves (a user's
results.md, best.yaml or config.json): they refuse before any run, naming the file; their own earlier files are
still replaced."""
import json
from pathlib import Path

import pytest
from fake_fit import fake_python
from fixtures_data import write_imagefolder

from nola_vision.runs.protocol import run_protocol
from nola_vision.runs.results import check_tables_ours, claim_row, config_key, write_tables
from nola_vision.runs.tune import check_tune_files_ours, run_tune

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_offline.yaml")


@pytest.mark.parametrize("table", ["results.md", "results.csv"])
def test_a_table_the_library_did_not_write_is_refused(tmp_path, table):
    (tmp_path / table).write_text("my notes\n")
    with pytest.raises(ValueError, match=rf"{table}.*another --out, or remove or rename"):
        check_tables_ours(str(tmp_path))
    assert (tmp_path / table).read_text() == "my notes\n"


def test_tables_the_library_wrote_and_empty_or_missing_ones_pass(tmp_path):
    check_tables_ours(str(tmp_path))
    (tmp_path / "results.md").touch()
    check_tables_ours(str(tmp_path))
    write_tables(str(tmp_path))
    check_tables_ours(str(tmp_path))


def test_protocol_refuses_before_any_run_a_results_md_it_did_not_write_and_replaces_its_own(tmp_path):
    out = tmp_path / "proj"
    out.mkdir()
    (out / "results.md").write_text("# My project\n")
    options = dict(out=str(out), split_seeds=[0], init_seeds=[0], python=fake_python(tmp_path), echo=False)
    with pytest.raises(ValueError, match="results.md"):
        run_protocol([TINY], name="row", **options)
    assert (out / "results.md").read_text() == "# My project\n" and not (out / "row").exists()
    (out / "results.md").unlink()
    run_protocol([TINY], name="row", **options)
    run_protocol([TINY], name="other", **options)  # the tables of the first run are replaced
    assert "| other |" in (out / "results.md").read_text() and "other" in (out / "results.csv").read_text()


@pytest.mark.parametrize("file, content", [("best.json", '{"lr": 1}'), ("best.yaml", "model:\n  lr: 1\n"),
                                           ("tune_results.md", "# Notes\n"), ("tune_trials.csv", "a,b\n")])
def test_a_tune_file_tune_did_not_write_is_refused(tmp_path, file, content):
    (tmp_path / file).write_text(content)
    with pytest.raises(ValueError, match=rf"{file}.*another --out or --name, or remove or rename"):
        check_tune_files_ours(tmp_path)
    assert (tmp_path / file).read_text() == content


def test_tune_refuses_a_foreign_best_yaml_before_any_trial_and_replaces_its_own_files(tmp_path):
    data, root = tmp_path / "images", tmp_path / "out" / "t"
    write_imagefolder(data, ("a", "b"), 4, 2, eval_folder="test")
    root.mkdir(parents=True)
    (root / "best.yaml").write_text("model:\n  lr: 0.5\n")

    def tune():
        return run_tune([TINY], {"model.lr": [1e-3, 2e-3]}, out=str(tmp_path / "out"), name="t", echo=False,
                        python=fake_python(tmp_path, metric="val/acc"), skip_protocol=True,
                        overrides=["--data.dataset", "imagefolder", "--data.root", str(data), "--data.shots", "2",
                                   "--data.val_shots", "1"])

    with pytest.raises(ValueError, match="best.yaml"):
        tune()
    assert (root / "best.yaml").read_text() == "model:\n  lr: 0.5\n" and not (root / "tune.db").exists()
    (root / "best.yaml").unlink()
    assert tune() is not None
    check_tune_files_ours(root)  # what tune wrote is recognised as its own
    (root / "tune.db").unlink()
    assert tune() is not None  # and replaced by the next run
    assert json.loads((root / "best.json").read_text())["params"] == {"model.lr": 1e-3}


@pytest.mark.parametrize("content, why", [("not json {", "protocol row's config"),
                                          ('{"note": "mine"}', "protocol row's config")])
def test_a_rows_config_json_that_is_no_row_record_is_refused_not_replaced(tmp_path, content, why):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(ValueError, match=why) as err:
        claim_row(tmp_path, config_key([TINY], []))
    assert "other settings" not in str(err.value) and "config.json" in str(err.value)
    assert (tmp_path / "config.json").read_text() == content


def test_an_empty_or_missing_config_json_is_written(tmp_path):
    key = config_key([TINY], [])
    assert claim_row(tmp_path, key) == key
    (tmp_path / "config.json").write_text("")
    assert claim_row(tmp_path, key) == key
    assert json.loads((tmp_path / "config.json").read_text())["config_hash"] == key["config_hash"]
