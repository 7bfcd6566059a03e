"""The protocol runner: seeds grid in separate runs, skip-on-restart, atomic results, tables, k-NN baseline."""
import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from fake_fit import fake_python

from nola_vision.runs.knn import knn_predict
from nola_vision.runs.protocol import main, run_protocol
from nola_vision.runs.results import collect_results, summarise, write_tables

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_offline.yaml")
FAST = ["--trainer.max_epochs", "1", "--data.shots", "2"]


def test_protocol_runs_the_grid_writes_tables_and_skips_finished_runs(tmp_path, capsys):
    out = tmp_path / "out"
    rows = run_protocol([TINY], out=str(out), name="tiny", split_seeds=[0, 1], init_seeds=[0], overrides=FAST, knn=True)
    assert sorted((r["name"], r["split_seed"]) for r in rows) == [("tiny", 0), ("tiny", 1), ("tiny-knn", 0), ("tiny-knn", 1)]
    table = list(csv.DictReader((out / "results.csv").open()))
    assert len(table) == 4 and {r["adapter_params"] for r in table if r["name"] == "tiny"} == {"512"}
    assert (out / "tiny" / "split1-init0" / "digits_2shot_seed1_train.txt").is_file()  # the run's manifest
    md = (out / "results.md").read_text()
    accs = [100 * float(r["test_acc"]) for r in table if r["name"] == "tiny"]
    mean, std = sum(accs) / 2, abs(accs[0] - accs[1]) / 2  # population std of two values
    assert f"| tiny | nola | vit_tiny_patch16_224 | digits | 2 | 512 | 650 | 1,162 | 2 | {mean:.1f} ({std:.1f}) |" in md
    assert "| tiny-knn | knn (k=1) |" in md
    capsys.readouterr()
    # a restart skips finished runs (their results are untouched)
    before = (out / "tiny" / "split0-init0" / "result.json").stat().st_mtime_ns
    assert main(["-c", TINY, "--out", str(out), "--name", "tiny", "--split_seeds", "0", "1", "--init_seeds", "0",
                 *FAST]) == 0
    assert capsys.readouterr().out.count("done already, skipped") == 2
    assert (out / "tiny" / "split0-init0" / "result.json").stat().st_mtime_ns == before


def test_a_run_resumed_by_hand_with_other_settings_is_left_out_of_its_row(tmp_path, capsys):
    # fit -c <run>/config.yaml --ckpt_path last --trainer.max_epochs 2 rewrote the result without the row's settings
    # hash; the next protocol command stamped it as the row's, and the row averaged a 2-epoch run with 1-epoch ones
    from nola_vision.cli import main as nola_vision

    out, kw = tmp_path / "out", dict(split_seeds=[0], init_seeds=[0], overrides=FAST, echo=False)
    assert len(run_protocol([TINY], out=str(out), name="r", **kw)) == 1
    run = out / "r" / "split0-init0"
    assert nola_vision(["fit", "-c", str(next(run.rglob("config.yaml"))), "--ckpt_path", "last",
                        "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false"]) == 0
    assert json.loads((run / "result.json").read_text())["epochs"] == 2
    capsys.readouterr()
    with pytest.warns(UserWarning, match=r"split0-init0/result.json was written by another fit than the one its row's "
                      r"command started .* left out of the tables"):
        assert run_protocol([TINY], out=str(out), name="r", **{**kw, "echo": True}) == []
    assert "split 0 init 0: written by another fit (left out of the tables), skipped" in capsys.readouterr().out
    assert "config_hash" not in json.loads((run / "result.json").read_text())  # never stamped as the row's


def test_a_killed_run_leaves_nothing_counted(tmp_path):
    out = tmp_path / "out"
    done = out / "cell" / "split0-init0"
    done.mkdir(parents=True)
    (done / "result.json").write_text(json.dumps({"metrics": {"test/acc": 0.5}, "config": {"method": "nola"},
                                                   "parameter_counts": {"adapter": 8, "head": 2}}))
    killed = out / "cell" / "split0-init1"  # killed mid-run: logs, a checkpoint, a temporary result file
    (killed / "checkpoints").mkdir(parents=True)
    (killed / "checkpoints" / "epoch=3.ckpt").write_bytes(b"x")
    (killed / ".result.json.123.tmp").write_text('{"metrics": {"test/acc": 0.9')
    half = out / "cell" / "split1-init0"
    half.mkdir()
    (half / "result.json").write_text('{"metrics": {"test/')  # even a torn file is never counted
    with pytest.warns(UserWarning, match="split1-init0/result.json cannot be read as a result"):
        rows = write_tables(str(out))
    assert [r["run_dir"] for r in rows] == [str(done)]
    assert summarise(rows)[0]["runs"] == 1


def test_failed_runs_are_reported_and_not_counted(tmp_path):
    with pytest.raises(RuntimeError, match="runs failed"):
        run_protocol([TINY], out=str(tmp_path), name="bad", split_seeds=[0], init_seeds=[0],
                     overrides=[*FAST, "--data.shots", "500"], echo=False)
    assert collect_results(str(tmp_path)) == []
    assert "allow_fewer" in (tmp_path / "bad" / "split0-init0" / "log.txt").read_text()


def test_a_diverged_run_is_reported_as_such_with_what_to_change(tmp_path):
    """A diverged fit (exit 3) diverges again as it is: re-running the same command, the advice given to every failed
    run, could not help."""
    fit = tmp_path / "diverging_fit"
    fit.write_text(f"#!{sys.executable}\nimport sys\n"
                   "print('nola-vision: error: training diverged: the loss is nan at step 1', file=sys.stderr)\n"
                   "sys.exit(3)\n")
    fit.chmod(0o755)
    with pytest.raises(RuntimeError, match=r"runs failed \(a diverged run diverges again as it is: lower model.lr "
                                           r"\(or add warm-up epochs\), under another --name\):\n.* \(training "
                                           r"diverged: the loss is nan at step 1; see "):
        run_protocol([TINY], out=str(tmp_path), name="big_lr", split_seeds=[0], init_seeds=[0], overrides=FAST,
                     python=str(fit), echo=False)
    assert collect_results(str(tmp_path)) == []


def test_the_knn_baseline_ignores_quantisation_aware_training(tmp_path):
    # --model.quant_bits (for the fits) reached the k-NN pass's linear model, which refused it after every fit ran
    from nola_vision.runs.protocol import run_knn

    run_knn([TINY], out=str(tmp_path), name="q4-knn", split_seeds=[0], overrides=["--model.quant_bits", "4"],
            echo=False)
    assert (tmp_path / "q4-knn" / "split0" / "result.json").is_file()


def test_a_test_pass_on_part_of_the_test_split_is_refused_and_every_run_tests_on_all_of_it(tmp_path):
    # --trainer.limit_test_batches 1 reported the accuracy of 8 of 899 images as the run's, unflagged
    from nola_vision.runs.protocol import fit_command, refuse_controlled_overrides

    with pytest.raises(ValueError, match="limit_test_batches .* accuracy on the full test split"):
        refuse_controlled_overrides(["--trainer.limit_test_batches", "1"])
    command = fit_command("python", ["-c", TINY], tmp_path, 0, 0, [])
    assert command[command.index("--trainer.limit_test_batches") + 1] == "1.0"


def test_knn_votes_by_cosine_similarity():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 1.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    test = torch.tensor([[10.0, 1.0], [0.05, 1.0], [0.2, 1.0]])
    assert knn_predict(train, labels, test, k=1).tolist() == [0, 1, 2]
    # k=3: two neighbours of class 1 outvote the single nearest one of class 2
    assert knn_predict(train, labels, test[2:], k=3).tolist() == [1]
    # a 1-1 tie is broken by similarity
    assert knn_predict(train[2:4], torch.tensor([1, 2]), torch.tensor([[0.0, 1.0]]), k=2, num_classes=3).tolist() == [1]


def test_rerun_with_other_settings_is_refused_naming_them(tmp_path):
    out = str(tmp_path / "out")
    run_protocol([TINY], out=out, name="row", split_seeds=[0], init_seeds=[0], overrides=["--model.lr", "1e-3"], python=fake_python(tmp_path), echo=False)
    # same settings (seeds and paths aside): the finished run is kept and the row grows
    run_protocol([TINY], out=out, name="row", split_seeds=[0, 1], init_seeds=[0], overrides=["--model.lr=1e-3"], python=fake_python(tmp_path), echo=False)
    with pytest.raises(ValueError, match=r"model\.lr=2e-2.*--name"):
        run_protocol([TINY], out=out, name="row", split_seeds=[2], init_seeds=[0], overrides=["--model.lr", "2e-2"], python=fake_python(tmp_path), echo=False)
    rows = collect_results(out)
    assert len(rows) == 2
    hashes = {json.loads(Path(r["run_dir"], "result.json").read_text())["config_hash"] for r in rows}
    assert hashes == {json.loads((Path(out) / "row" / "config.json").read_text())["config_hash"]}
    # another name is a separate row
    run_protocol([TINY], out=out, name="row_lr2e-2", split_seeds=[0], init_seeds=[0], overrides=["--model.lr", "2e-2"], python=fake_python(tmp_path),
                 echo=False)
    assert {s["name"]: s["runs"] for s in summarise(collect_results(out))} == {"row": 2, "row_lr2e-2": 1}


def test_non_finite_failed_status_or_nonzero_exit_never_count(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="no finite test accuracy"):
        run_protocol([TINY], out=str(out), name="nan", split_seeds=[0], init_seeds=[0], python=fake_python(tmp_path, acc="nan"), echo=False)
    with pytest.raises(RuntimeError, match="exit 4"):
        run_protocol([TINY], out=str(out), name="crash", split_seeds=[0], init_seeds=[0], python=fake_python(tmp_path, code=4), echo=False)
    status = out / "status" / "split0-init0"
    status.mkdir(parents=True)
    (status / "result.json").write_text(json.dumps({"metrics": {"test/acc": 0.9}, "status": "diverged"}))
    loss = out / "loss" / "split0-init0"
    loss.mkdir(parents=True)
    (loss / "result.json").write_text('{"metrics": {"test/acc": 0.9, "train/loss": NaN}}')
    huge = out / "huge" / "split0-init0"  # an integer beyond float's range (an edited file): no count, no crash
    huge.mkdir(parents=True)
    (huge / "result.json").write_text('{"metrics": {"test/acc": 0.9, "train/loss": 1' + "0" * 400 + '}}')
    assert collect_results(str(out)) == []
    # a crashed run's result is moved aside, so a restart redoes it instead of skipping it
    assert (out / "crash" / "split0-init0" / "result.json.failed").is_file()
    rows = run_protocol([TINY], out=str(out), name="crash", split_seeds=[0], init_seeds=[0], python=fake_python(tmp_path), echo=False)
    assert [r["name"] for r in rows] == ["crash"]


def test_a_row_with_fewer_runs_than_requested_is_flagged_until_they_finish(tmp_path, monkeypatch):
    out = tmp_path / "out"
    flaky = tmp_path / "flaky"
    flaky.write_text(f"""#!{sys.executable}
import os, sys
if "--data.split_seed" in sys.argv and sys.argv[sys.argv.index("--data.split_seed") + 1] == "1" and os.environ.get("FAIL"):
    sys.exit(4)
os.execv({fake_python(tmp_path)!r}, [{fake_python(tmp_path)!r}, *sys.argv[1:]])
""")
    flaky.chmod(0o755)
    run_protocol([TINY], out=str(out), name="full", split_seeds=[0], init_seeds=[0, 1], python=fake_python(tmp_path),
                 echo=False)
    monkeypatch.setenv("FAIL", "1")  # the runs of split seed 1 fail
    with pytest.raises(RuntimeError, match="exit 4"):
        run_protocol([TINY], out=str(out), name="row", split_seeds=[0, 1], init_seeds=[0, 1], python=str(flaky),
                     echo=False)
    monkeypatch.delenv("FAIL")
    md = (out / "results.md").read_text()
    assert "| row | fake |" in md and "| 2 of 4 | 50.0 (0.0) |" in md
    assert "| full | fake |" in md and "| 2 | 50.0 (0.0) |" in md
    assert "Fewer runs than requested (row: split1-init0, split1-init1)" in md  # which runs it lacks
    # a later command asking for fewer seeds does not hide the missing ones; finishing them clears the flag
    run_protocol([TINY], out=str(out), name="row", split_seeds=[0], init_seeds=[0], python=fake_python(tmp_path),
                 echo=False)
    assert "| 2 of 4 |" in (out / "results.md").read_text()
    run_protocol([TINY], out=str(out), name="row", split_seeds=[1], init_seeds=[0, 1], python=str(flaky), echo=False)
    md = (out / "results.md").read_text()
    assert "| 4 | 50.0 (0.0) |" in md and " of 4 |" not in md and "Fewer runs" not in md
    # a row whose runs all failed is listed too (it was left out: the table looked complete)
    monkeypatch.setenv("FAIL", "1")
    with pytest.raises(RuntimeError, match="exit 4"):
        run_protocol([TINY], out=str(out), name="none", split_seeds=[1], init_seeds=[0], python=str(flaky),
                     echo=False)
    monkeypatch.delenv("FAIL")
    md = (out / "results.md").read_text()
    assert "| none |  |  |  |  |  |  |  | 0 of 1 | no finished run |" in md and "(none: split1-init0)" in md


@pytest.mark.parametrize("executor, init_seeds", [
    ("local_jobs", [0, 1]),  # 4 runs through 2 slots: runs wait for a free slot
    # one job array of 2 (submitit's local executor starts every job at once, each a process importing nola_vision:
    # a bigger array runs the same code, only longer)
    ("submitit_local", [0]),
], ids=["local_jobs", "submitit_local"])
def test_runs_go_through_an_executor(tmp_path, executor, init_seeds):
    from nola_vision.runs.executors import LocalExecutor, SubmititExecutor

    ex = (LocalExecutor(jobs=2) if executor == "local_jobs"
          else SubmititExecutor(str(tmp_path / "submitit"), cluster="local", jobs=2, gpus_per_node=0, poll_s=0.2))
    rows = run_protocol([TINY], out=str(tmp_path / "out"), name="row", split_seeds=[0, 1], init_seeds=init_seeds, python=fake_python(tmp_path),
                        echo=False, executor=ex)
    assert sorted((r["split_seed"], r["init_seed"]) for r in rows) == [(s, i) for s in (0, 1) for i in init_seeds]
    assert all(isinstance(r["wall_s"], float) for r in rows)


def test_a_run_whose_program_cannot_start_is_reported_failed_with_its_log_and_the_others_go_on(tmp_path):
    # a missing --python raised FileNotFoundError out of protocol: no list of failed runs, no log, no tables
    from nola_vision.runs.executors import LocalExecutor, Run

    missing = str(tmp_path / "no_such_python")
    runs = [Run((missing, "-c", "pass"), tmp_path / "a" / "log.txt"),
            Run((sys.executable, "-c", "pass"), tmp_path / "b" / "log.txt")]
    assert sorted((run.log.parent.name, code) for run, code, _ in LocalExecutor(1).run(runs)) == [("a", -1), ("b", 0)]
    assert "the run could not be started: [Errno 2] No such file or directory" in (tmp_path / "a" / "log.txt").read_text()
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match=r"(?s)runs failed \(fix what the errors name, then re-run the same command\)"
                                           r".*split0-init0 \(the run could not be started: \[Errno 2\] No such file "
                                           r"or directory.*; see .*split0-init0/log.txt\).*split1-init0 \(the run "):
        run_protocol([TINY], out=str(out), name="row", split_seeds=[0, 1], init_seeds=[0], python=missing, echo=False,
                     executor=LocalExecutor(1))
    assert "No such file or directory" in (out / "row" / "split1-init0" / "log.txt").read_text()
    assert "| row |  |  |  |  |  |  |  | 0 of 2 | no finished run |" in (out / "results.md").read_text()


def test_local_executor_gives_each_job_slot_its_gpus():
    from nola_vision.runs.executors import LocalExecutor

    assert LocalExecutor(jobs=3, gpus_per_job=1, devices=["0", "1"]).slot_devices == ["0", "1", "0"]
    assert LocalExecutor(jobs=2, gpus_per_job=2, devices=["0", "1", "2", "3"]).slot_devices == ["0,1", "2,3"]
    assert LocalExecutor(jobs=2, devices=[]).slot_devices == [None, None]
    assert LocalExecutor(jobs=2, gpus_per_job=0, devices=["0", "1"]).slot_devices == ["", ""]  # on the CPU
    for gpus, devices in ((-1, ["0", "1"]), (3, ["0", "1"]), (1, [])):  # -1 hid every GPU, 3 listed one twice
        with pytest.raises(ValueError, match=rf"--gpus_per_job must be between 0 .*got {gpus}"):
            LocalExecutor(jobs=2, gpus_per_job=gpus, devices=devices)


def with_data(tmp_path, name, data, top=None):
    """The tiny config with ``data`` fields (and top-level ``top`` fields) added, as a file of its own."""
    import yaml

    config = yaml.safe_load(Path(TINY).read_text())
    config["data"].update(data)
    config.update(top or {})
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize("config_data, overrides", [
    ({"split_file": "manifest.txt"}, []),
    ({"split_file": "manifest.txt", "val_split_file": "val.txt"}, []),
    ({}, ["--data.split_file", "manifest.txt"]),
    ({}, ["--data.init_args.val_split_file=val.txt"]),
    ({}, ["--data", "{split_file: manifest.txt, shots: 2}"]),  # a whole group, as fit accepts it
])
def test_a_split_manifest_in_a_config_or_an_override_is_refused_before_any_run(tmp_path, config_data, overrides):
    # it gave every split seed the manifest's images, averaged in results.md as independent splits
    config = with_data(tmp_path, "manifest.yaml", config_data)
    # and the replay it names passes the validation manifest too: a config with val_shots > 0 refuses one without
    with pytest.raises(ValueError, match=r"draws each run's split from --split_seeds.*`nola-vision fit` with its "
                                         r"manifests: --data\.split_file <run folder>/\S+_train\.txt .*"
                                         r"--data\.val_split_file <run folder>/\S+_val<V>\.txt \(or --data\.val_shots 0"):
        run_protocol([config], out=str(tmp_path / "out"), split_seeds=[0, 1], init_seeds=[0], overrides=overrides,
                     python=fake_python(tmp_path), echo=False)
    assert not (tmp_path / "out").exists()


def test_a_config_class_path_group_with_a_split_manifest_is_refused(tmp_path):
    config = tmp_path / "class_path.yaml"
    config.write_text("data:\n  class_path: nola_vision.data.FewShotDataModule\n"
                      "  init_args: {dataset: digits, split_file: manifest.txt}\n")
    with pytest.raises(ValueError, match=rf"config {config} sets data\.split_file: manifest\.txt"):
        run_protocol([TINY, str(config)], out=str(tmp_path / "out"), split_seeds=[0], init_seeds=[0],
                     python=fake_python(tmp_path), echo=False)


def test_a_group_file_beside_its_config_with_a_split_manifest_is_refused(tmp_path, monkeypatch):
    # fit reads `data: data.yaml` from the config's folder; protocol read it from the current directory and let it by
    import yaml

    from nola_vision.train.cli import cli_parser

    (tmp_path / "configs").mkdir()
    config = yaml.safe_load(Path(TINY).read_text())
    (tmp_path / "configs" / "data.yaml").write_text(yaml.safe_dump({**config["data"], "split_file": "manifest.txt"}))
    config["data"] = "data.yaml"
    (tmp_path / "configs" / "main.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    parsed = cli_parser().parse_args(["fit", "-c", str(tmp_path / "configs" / "main.yaml")])["fit"]
    assert parsed["data"]["split_file"] == "manifest.txt"  # what every run would have read
    with pytest.raises(ValueError, match=r"config .*main\.yaml sets data\.split_file: manifest\.txt"):
        run_protocol([str(tmp_path / "configs" / "main.yaml")], out=str(tmp_path / "out"), split_seeds=[0],
                     init_seeds=[0], python=fake_python(tmp_path), echo=False)
    assert not (tmp_path / "out").exists()


def test_seeds_folders_and_the_test_pass_a_config_sets_are_replaced_in_every_run(tmp_path):
    from nola_vision.runs.protocol import fit_command
    from nola_vision.train.cli import cli_parser

    # what a printed config (--print_config) holds: the seeds and folders of one run, and unset manifests
    config = with_data(tmp_path, "printed.yaml", {"split_seed": 9, "split_file": None, "val_split_file": None},
                       {"seed_everything": 7, "test_after_fit": False, "result_file": "one.json"})
    rows = run_protocol([config], out=str(tmp_path / "out"), name="row", split_seeds=[0, 1], init_seeds=[0],
                        python=fake_python(tmp_path), echo=False)
    assert sorted(r["split_seed"] for r in rows) == [0, 1]
    run = tmp_path / "out" / "row" / "split1-init0"
    parsed = cli_parser().parse_args(list(fit_command("python", ["-c", config], run, 1, 0, [])[3:]))["fit"]
    assert (parsed["seed_everything"], parsed["data"]["split_seed"]) == (0, 1)
    assert parsed["test_after_fit"] is True  # false in the config left every run without a test accuracy
    assert parsed["result_file"] == str(run / "result.json")


def test_the_table_shows_what_each_row_trains_beside_its_adapter_and_head():
    # full fine-tuning showed "0 adapter params", the linear probe's budget; results without the count: the sum
    row = {"name": "full", "method": "full", "backbone": "b", "dataset": "d", "shots": 5, "test_acc": 0.5,
           "adapter_params": 0, "head_params": 650, "trainable_params": 114_250}
    older = {**row, "name": "older", "method": "nola", "adapter_params": 512, "trainable_params": ""}
    assert [(s["name"], s["trainable_params"]) for s in summarise([row, older])] == [("full", 114_250),
                                                                                     ("older", 1_162)]


@pytest.mark.parametrize("jobs", [1, 2])
def test_the_local_executor_starts_no_run_after_the_caller_leaves_at_a_result(tmp_path, jobs):
    """Its pool started the next queued run the moment one ended, before the caller saw that one refused (exit 2)
    and left: with --jobs 1 one more fit always ran, and was reported as not started."""
    from nola_vision.runs.executors import LocalExecutor, Run, start_no_more

    runs = []
    for i, seconds in enumerate([0, 3, 0, 0]):  # with two slots, the first ends while the second runs
        (tmp_path / f"r{i}").mkdir()
        marker = tmp_path / f"r{i}" / "started"
        code = f"import pathlib, sys, time; pathlib.Path({str(marker)!r}).touch(); time.sleep({seconds}); sys.exit(2)"
        runs.append(Run((sys.executable, "-c", code), tmp_path / f"r{i}" / "log.txt"))
    results = LocalExecutor(jobs).run(runs)
    first, code, _ = next(results)
    assert first is runs[0] and code == 2
    start_no_more(results)
    started = sorted(p.parent.name for p in tmp_path.glob("r*/started"))
    assert started == ["r0", "r1"][:jobs]


def test_a_run_that_failed_after_training_started_is_listed_with_its_error_line(tmp_path):
    # "exit 1" alone: a corrupt image's one-line reason sat in the log while the summary advised a retry
    from nola_vision.runs.executors import failure

    log = tmp_path / "log.txt"
    log.write_text("nola-vision fit ...\nEpoch 0 ...\nnola-vision: error: cannot decode image /d/c1/3.png\n")
    assert failure(1, log) == "exit 1: nola-vision: error: cannot decode image /d/c1/3.png"
    log.write_text("nola-vision fit ...\nKilled\n")
    assert failure(137, log) == "exit 137"
