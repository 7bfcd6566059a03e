"""Settings files among protocol's and tune's overrides (``--config x.yaml``, ``-c x.yaml``) are read and checked as
other overrides are, never replace a run's seeds or folders, and two commands starting on one row take turns."""
import json
import re
import threading
import time
from pathlib import Path

import pytest
from fake_fit import fake_python

import nola_vision.runs.results as results
from nola_vision.runs.protocol import fit_command, refuse_controlled_overrides, run_protocol
from nola_vision.runs.results import claim_row, collect_results, config_key
from nola_vision.runs.tune import CONTROLLED as TUNE_CONTROLLED
from nola_vision.runs.tune import run_tune

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_offline.yaml")

# what a settings file among the overrides may set that protocol sets in every run itself
SET_BY_RUNS = {"data.split_seed": "data: {split_seed: 7}", "seed_everything": "seed_everything: 5",
               "model.adapter_dir": "model: {adapter_dir: shared}",
               "trainer.default_root_dir": "trainer: {default_root_dir: elsewhere}"}


def settings_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "extra.yaml"
    path.write_text(text + "\n")
    return str(path)


@pytest.mark.parametrize("key", sorted(SET_BY_RUNS))
@pytest.mark.parametrize("form", ["--config X", "--config=X", "-c X", "-cX", "-c=X"])
def test_a_settings_file_override_setting_what_runs_set_is_refused_naming_the_file_and_key(tmp_path, key, form):
    path = settings_file(tmp_path, SET_BY_RUNS[key])
    overrides = form.replace("X", path).split()
    for controlled, prog in ((None, "protocol"), (TUNE_CONTROLLED, "tune")):
        with pytest.raises(ValueError, match=rf"{prog} sets --{key} .*{path}"):
            refuse_controlled_overrides(overrides, *([controlled] if controlled else []), prog=prog)


def test_inline_settings_given_to_config_are_checked_too():
    with pytest.raises(ValueError, match=r"--data\.split_seed"):
        refuse_controlled_overrides(["--config", "{data: {split_seed: 7}}"])
    refuse_controlled_overrides(["--config", "{model: {lr: 0.01}}"])  # what no run sets passes


def test_protocol_and_tune_refuse_a_settings_file_override_before_any_run(tmp_path):
    path = settings_file(tmp_path, "data: {split_seed: 7}\nseed_everything: 5")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"--data\.split_seed .*{path}"):
        run_protocol([TINY], out=str(out), name="row", split_seeds=(0, 1), init_seeds=(0,),
                     overrides=["--config", path], python=fake_python(tmp_path), echo=False)
    assert not out.exists()
    with pytest.raises(ValueError, match=rf"tune sets --data\.split_seed .*{path}"):
        run_tune([TINY], {"model.lr": [1e-3]}, out=str(tmp_path / "tune"), name="t",
                 overrides=["-c", path, "--data.val_shots", "1"], python=fake_python(tmp_path), echo=False)


def test_a_runs_seeds_and_folders_win_over_a_settings_file_among_the_overrides(tmp_path):
    from nola_vision.train.cli import cli_parser

    path = settings_file(tmp_path, "\n".join(["data: {split_seed: 7, split_dir: elsewhere}", "seed_everything: 5",
                                             "model: {adapter_dir: shared}",
                                             "trainer: {default_root_dir: elsewhere}"]))
    run = tmp_path / "split3-init1"
    for overrides in (["--config", path], ["--config", path, "--test_after_fit", "false"]):
        args = list(fit_command("python", ["-c", TINY], run, 3, 1, overrides)[3:])
        parsed = cli_parser().parse_args(args)["fit"]
        assert (parsed.data.split_seed, parsed.seed_everything) == (3, 1)
        assert (parsed.data.split_dir, parsed.trainer.default_root_dir) == (str(run), str(run))
        assert parsed.model.adapter_dir is None and parsed.result_file == str(run / "result.json")
        # a caller's own test setting (tune's trials) still applies
        assert parsed.test_after_fit is ("--test_after_fit" not in overrides)


def test_a_short_config_option_with_its_value_attached_is_keyed_by_the_files_content(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("x.yaml").write_text("model: {lr: 0.01}\n")
    for form in (["-cx.yaml"], ["-c=x.yaml"], ["-c", "x.yaml"]):
        assert list(config_key([TINY], form).get("files", {})) == ["x.yaml"], form


def write_result(run_dir: Path, split_seed: object, seed: object) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "result.json").write_text(json.dumps({
        "metrics": {"test/acc": 0.5}, "config": {"method": "nola", "split_seed": split_seed, "seed": seed}}))


def test_a_result_recording_other_seeds_than_its_folder_is_left_out_of_the_tables_with_a_warning(tmp_path):
    write_result(tmp_path / "row" / "split0-init0", 0, 0)
    write_result(tmp_path / "row-knn" / "split1", 1, "")  # the k-NN baseline records no init seed
    assert len(collect_results(str(tmp_path))) == 2
    write_result(tmp_path / "row" / "split1-init0", 7, 0)  # one run's result in another's folder
    write_result(tmp_path / "other" / "split3-init1", 3, 5)
    with pytest.warns(UserWarning) as caught:
        rows = collect_results(str(tmp_path))  # never stops the tables of the other rows
    kept = sorted(str(tmp_path / d) for d in ("row/split0-init0", "row-knn/split1"))
    assert sorted(r["run_dir"] for r in rows) == kept
    messages = sorted(str(w.message) for w in caught)
    assert re.search(r"split3-init1.*seed 5.*init seed 1.*Delete", messages[0])
    assert re.search(r"split1-init0.*split_seed 7.*split seed 1.*Delete", messages[1])


def test_a_copy_of_a_run_folder_under_a_name_with_leading_zeros_is_not_counted_again(tmp_path):
    # split00-init0 (a backup copy) matched as a second run of seeds (0, 0): the row showed 3 runs of 2.
    write_result(tmp_path / "row" / "split0-init0", 0, 0)
    write_result(tmp_path / "row" / "split1-init0", 1, 0)
    write_result(tmp_path / "row" / "split00-init0", 0, 0)
    write_result(tmp_path / "row" / "split1-init00", 1, 0)
    write_result(tmp_path / "row" / "split-1-init0", -1, 0)  # negative seeds are runs' own names
    runs = sorted(Path(r["run_dir"]).name for r in collect_results(str(tmp_path)))
    assert runs == ["split-1-init0", "split0-init0", "split1-init0"]


@pytest.mark.parametrize("form", [["-c", "sub/x.yaml"], ["-csub/x.yaml"], ["-c=sub/x.yaml"],
                                  ["--config", "sub/x.yaml"]])
def test_a_settings_file_override_counts_the_files_it_names_whatever_its_form(tmp_path, monkeypatch, form):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.yaml").write_text("data: data.yaml\n")
    (tmp_path / "sub" / "data.yaml").write_text("shots: 5\n")
    before = config_key([TINY], form)["config_hash"]
    (tmp_path / "sub" / "data.yaml").write_text("shots: 10\n")  # read from x.yaml's folder, as fit reads it
    assert config_key([TINY], form)["config_hash"] != before


def test_two_commands_claiming_one_row_with_other_settings_take_turns(tmp_path, monkeypatch):
    write = results.write_json_atomic

    def slow_write(path, obj, *args, **kwargs):  # widens the window between reading and writing config.json
        time.sleep(0.5)
        return write(path, obj, *args, **kwargs)

    monkeypatch.setattr(results, "write_json_atomic", slow_write)
    root = tmp_path / "row"
    root.mkdir()
    keys = [config_key([TINY], ["--model.lr", lr]) for lr in ("0.05", "0.001")]
    outcomes: list = []

    def claim(key: dict) -> None:
        try:
            outcomes.append(claim_row(root, key)["config_hash"])
        except ValueError as err:
            outcomes.append(err)

    threads = [threading.Thread(target=claim, args=(key,)) for key in keys]
    for thread in threads:
        thread.start()
        time.sleep(0.1)
    for thread in threads:
        thread.join()
    refused = [o for o in outcomes if isinstance(o, ValueError)]
    assert len(refused) == 1 and "other settings" in str(refused[0])
    recorded = json.loads((root / "config.json").read_text())["config_hash"]
    assert [o for o in outcomes if not isinstance(o, ValueError)] == [recorded]
