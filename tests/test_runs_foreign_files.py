"""Protocol and tune never write over a file of a name they write that they did not write themselves (a user's
results.md, best.yaml or config.json): they refuse before any run, naming the file; their own earlier files are
still replaced."""
import json
import os
from pathlib import Path

import pytest
from fake_fit import fake_python
from fixtures_data import write_imagefolder

from nola_vision.core.storage import write_text_atomic
from nola_vision.runs import protocol
from nola_vision.runs import tune as tune_module
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


def test_protocol_refuses_before_any_run_tables_it_could_not_write_after_it(tmp_path):
    out = tmp_path / "proj"
    (out / ".results.lock").mkdir(parents=True)  # the lock the tables are rebuilt under, after each run
    options = dict(out=str(out), split_seeds=[0], init_seeds=[0], python=fake_python(tmp_path), echo=False)
    with pytest.raises(ValueError, match=r"\.results\.lock, the lock file that writers of it take turns on, is a "
                                         "directory"):
        run_protocol([TINY], name="row", **options)
    assert not (out / "row").exists()
    (out / ".results.lock").rmdir()
    write_tables(str(out))
    os.chmod(out / "results.csv", 0o444)  # write-protected: its rename would undo that
    try:
        with pytest.raises(ValueError, match=r"results\.csv is write-protected \(mode 0444\)"):
            run_protocol([TINY], name="row", **options)
        assert not (out / "row").exists()
    finally:
        os.chmod(out / "results.csv", 0o644)
    run_protocol([TINY], name="row", **options)
    assert "| row |" in (out / "results.md").read_text()


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
    os.chmod(root / "best.yaml", 0o444)  # write-protected: refused before any trial, not at the end of the search
    try:
        with pytest.raises(ValueError, match=r"^the search's best\.yaml: .*best\.yaml is write-protected"):
            check_tune_files_ours(root)
    finally:
        os.chmod(root / "best.yaml", 0o644)
    (root / "tune.db").unlink()
    assert tune() is not None  # and replaced by the next run
    assert json.loads((root / "best.json").read_text())["params"] == {"model.lr": 1e-3}


def test_a_results_md_written_while_the_runs_go_on_is_refused_when_the_tables_are_written(tmp_path, monkeypatch):
    # Checked before the first run, the tables are rewritten after every run, hours later: a user's results.md that
    # appeared meanwhile was replaced. It is checked again just before each write; the finished runs stay.
    out = tmp_path / "proj"
    original = protocol.request_runs

    def user_writes_meanwhile(*args, **kwargs):
        (out / "results.md").write_text("# My project\n")
        return original(*args, **kwargs)

    monkeypatch.setattr(protocol, "request_runs", user_writes_meanwhile)
    options = dict(out=str(out), split_seeds=[0], init_seeds=[0], python=fake_python(tmp_path), echo=False)
    with pytest.raises(ValueError, match=r"results.md exists and is not a results table.*finished runs are kept"):
        run_protocol([TINY], name="row", **options)
    assert (out / "results.md").read_text() == "# My project\n" and list((out / "row").glob("*/result.json"))
    monkeypatch.setattr(protocol, "request_runs", original)
    (out / "results.md").unlink()
    run_protocol([TINY], name="row", **options)  # the same command writes the tables of the finished run
    assert "| row |" in (out / "results.md").read_text()


def _tune(tmp_path, **options):
    data = tmp_path / "images"
    if not data.exists():
        write_imagefolder(data, ("a", "b"), 4, 2, eval_folder="test")
    return run_tune([TINY], {"model.lr": [1e-3, 2e-3]}, out=str(tmp_path / "out"), name="t", echo=False,
                    python=fake_python(tmp_path, metric="val/acc"),
                    overrides=["--data.dataset", "imagefolder", "--data.root", str(data), "--data.shots", "2",
                               "--data.val_shots", "1"], **options)


def test_a_tune_file_written_while_the_trials_run_is_refused_when_tune_writes_it(tmp_path, monkeypatch):
    root = tmp_path / "out" / "t"
    original = tune_module.write_trial_tables

    def user_writes_meanwhile(*args, **kwargs):
        (root / "best.yaml").write_text("model:\n  lr: 0.5\n")
        return original(*args, **kwargs)

    monkeypatch.setattr(tune_module, "write_trial_tables", user_writes_meanwhile)
    with pytest.raises(ValueError, match="best.yaml exists and is not a file nola-vision tune wrote"):
        _tune(tmp_path, skip_protocol=True)
    assert (root / "best.yaml").read_text() == "model:\n  lr: 0.5\n"


def test_tune_without_the_protocol_leaves_a_users_results_md_in_out_alone(tmp_path):
    # --skip_protocol writes no <out>/results.md, so a project folder's own one is no reason to refuse.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.md").write_text("# My project notes\n")
    assert _tune(tmp_path, skip_protocol=True) is not None
    assert (tmp_path / "out" / "results.md").read_text() == "# My project notes\n"


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


def test_a_tune_table_of_a_study_whose_name_is_not_utf8_is_recognised_as_tunes(tmp_path):
    # Its header names the study (surrogate escapes in the str); read back with replacement characters, it never
    # matched, so tune refused its own table at its next write.
    root = tmp_path / os.fsdecode(b"row_\xe9")
    root.mkdir()
    write_text_atomic(root / "tune_results.md", f"# Tuning: {root.name}\n\nrows\n")
    check_tune_files_ours(root)
