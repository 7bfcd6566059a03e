"""`nola-vision tune`: selection on validation only, resumable Optuna studies, workers sharing one study."""
import csv
import json
import os
import re
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path

import pytest
import yaml
from fake_fit import fake_python
from tune_study import FAST, TINY, fits, tune_cmd

from nola_vision.cli import main
from nola_vision.runs.protocol import check_fit_arguments
from nola_vision.runs.tune import _Search, check_grid, parse_grid, run_tune
from nola_vision.train.cli import cli_parser


def test_grid_keys_and_validation_data_are_checked(tmp_path, capsys):
    assert parse_grid(["model.lr=1e-3,5e-3", "model.adapter.init_args.scale=1,4"]) == {
        "model.lr": [0.001, 0.005], "model.adapter.init_args.scale": [1, 4]}
    for bad in ["lr=1e-3", "model.lr", "model.lr=", "model..lr=1"]:
        with pytest.raises(ValueError, match="dotted key"):
            parse_grid([bad])
    with pytest.raises(ValueError, match="--data.val_shots"):
        run_tune([TINY], {"model.lr": [1e-3]}, out=str(tmp_path), name="t", overrides=["--trainer.max_epochs", "1"])
    # the console script's own exit code and message (in this process: tune_study runs it as a process)
    capsys.readouterr()
    assert main(tune_cmd(tmp_path, "--grid", "model.lr")[3:]) == 2  # a refusal before any run, as fit exits
    assert "dotted key" in capsys.readouterr().err


def test_validation_shots_are_read_as_fit_reads_them_from_a_whole_group_or_a_file(tmp_path):
    from nola_vision.runs.tune import _val_shots

    group = tmp_path / "data.yaml"
    group.write_text("val_shots: 3\n")
    assert _val_shots([TINY], []) == 0
    assert _val_shots([TINY], ["--data.val_shots", "2"]) == 2
    assert _val_shots([TINY], ["--data", "{val_shots: 2, shots: 2}"]) == 2  # was read as none: tune refused the run
    assert _val_shots([TINY], ["--data", str(group)]) == 3


def test_tune_chooses_on_validation_without_reading_test_then_runs_the_protocol(tune_study):
    done, out = tune_study.restart, tune_study.out
    assert done.returncode == 0, done.stderr[-3000:]
    trials = list(csv.DictReader((out / "t" / "tune_trials.csv").open()))
    assert sorted(t["model.lr"] for t in trials) == ["0.0001", "0.02"] and {t["state"] for t in trials} == {"COMPLETE"}
    best = json.loads((out / "t" / "best.json").read_text())
    assert best["val_acc"] == max(float(t["val_acc"]) for t in trials)
    assert "Chosen" in (out / "t" / "tune_results.md").read_text() and "model:" in (out / "t" / "best.yaml").read_text()
    assert (out / "t" / "split0-init0" / "result.json").is_file() and "| t | nola |" in (out / "results.md").read_text()
    # the spy saw exactly one test-split read (in either command's processes): the protocol's run, never a
    # selection fit
    readers = tune_study.test_reads
    assert len(readers) == 1 and str(out / "t" / "split0-init0") in " ".join(readers[0])
    assert "--model.lr" in readers[0] and best["overrides"][1] in readers[0]


def test_a_restarted_search_runs_only_the_remaining_trials(tune_study):
    # the study above: its first command stopped after one trial (--n_trials 1), the same command then finished it
    first, second = tune_study.first, tune_study.restart
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(tune_study.first_fits) == 1 and not tune_study.first_best
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("[tune t] trial #") == 1  # only the remaining trial ran
    assert len(fits(tune_study.out)) == 2 and (tune_study.out / "t" / "best.json").is_file()


def test_two_workers_share_one_sqlite_study_without_running_a_trial_twice(tmp_path):
    # sharing the study is tune's own bookkeeping: stand-in fits (fake_fit.py) that record each run they were started
    # for, and wait (up to 60 s) until both workers' fits have started, so that the workers overlap
    ran, started = tmp_path / "ran.txt", tmp_path / "started"
    started.mkdir()
    rendezvous = (f'[__import__("time").sleep(0.2) for _ in range(300) '
                  f'if len(__import__("os").listdir({str(started)!r})) < 2]')
    fit = fake_python(tmp_path, metric="val/acc", extra=(
        f'"ran": open({str(ran)!r}, "a").write(value("--result_file") + "\\n"), '
        f'"started": open({str(started)!r} + "/" + str(__import__("os").getpid()), "w").close(), "met": {rendezvous},'))
    worker = ("import sys; from nola_vision.runs.tune import _Search, parse_grid, run_tune; run_tune([sys.argv[1]], "
              "parse_grid(['model.lr=1e-4,2e-2', 'model.head_lr=1e-3']), out=sys.argv[2], name='t', "
              "overrides=sys.argv[4:], skip_protocol=True, python=sys.argv[3])")
    cmd = [sys.executable, "-c", worker, TINY, str(tmp_path / "out"), fit, *FAST]
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [o[1][-2000:] for o in outputs]
    trials_run = [[line for line in o[0].splitlines() if line.startswith("[tune t] trial #")] for o in outputs]
    assert [len(lines) for lines in trials_run] == [1, 1]  # the workers overlapped: one trial each
    runs = ran.read_text().splitlines()
    assert len(runs) == len(set(runs)) == 2  # each grid point fitted exactly once
    table = csv.DictReader((tmp_path / "out" / "t" / "tune_trials.csv").open())
    trials = [t for t in table if t["state"] == "COMPLETE"]
    assert sorted(t["model.lr"] for t in trials) == ["0.0001", "0.02"]


@pytest.mark.parametrize("where", ["config", "override", "grid"])
def test_a_split_manifest_is_refused_before_the_first_trial(tmp_path, where):
    # a trial's selection seeds (and the protocol's split seeds after it) would all train on the manifest's images
    import yaml

    config = yaml.safe_load(Path(TINY).read_text())
    if where == "config":
        config["data"]["split_file"] = "manifest.txt"
    (tmp_path / "manifest.yaml").write_text(yaml.safe_dump(config))
    overrides = [*FAST, "--data.val_split_file", "val.txt"] if where == "override" else FAST
    grid = {"data.split_file": ["a.txt", "b.txt"]} if where == "grid" else {"model.lr": [1e-3]}
    with pytest.raises(ValueError, match=r"tune draws each fit's split from --split_seeds.*`nola-vision fit` with its "
                                         r"manifest"):
        run_tune([str(tmp_path / "manifest.yaml")], grid, out=str(tmp_path / "out"), name="t", overrides=overrides,
                 skip_protocol=True, python=str(Path(tmp_path / "never")), echo=False)
    assert not (tmp_path / "out").exists()


def _diverging_fit(tmp_path, diverging_lr):
    """A stand-in fit that diverges (exit 3, as fit's NaN-loss stop) at ``diverging_lr``, else scores lr * 10."""
    script = tmp_path / "diverging_fit"
    script.write_text(f"""#!{sys.executable}
import json, sys
args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1]
if value("--model.lr") == {str(diverging_lr)!r}:
    print("nola-vision: error: training diverged: the loss is nan at step 1 (epoch 0)", file=sys.stderr)
    sys.exit(3)
json.dump({{"metrics": {{"val/acc": float(value("--model.lr")) * 10}},
           "config": {{"method": "fake", "split_seed": int(value("--data.split_seed")),
                      "seed": int(value("--seed_everything"))}},
           "parameter_counts": {{"adapter": 8, "head": 2}}}}, open(value("--result_file"), "w"))
""")
    script.chmod(0o755)
    return str(script)


def test_a_diverging_grid_point_counts_as_the_worst_score_and_the_search_chooses_among_the_others(tmp_path):
    """Divergence at a large learning rate is an outcome of the grid, not a fault: it failed the trial, and every
    re-run of the same command ran it again and chose nothing (the grid could not be narrowed either)."""
    fit = _diverging_fit(tmp_path, 0.05)
    chosen = run_tune([TINY], {"model.lr": [1e-3, 0.05, 2e-2]}, out=str(tmp_path / "out"), name="t", python=fit,
                      echo=False, skip_protocol=True, overrides=FAST)
    assert chosen["params"] == {"model.lr": 2e-2} and chosen["val_acc"] == pytest.approx(0.2)
    rows = {row["model.lr"]: row for row in csv.DictReader((tmp_path / "out" / "t" / "tune_trials.csv").open())}
    assert rows["0.05"]["state"] == "DIVERGED" and rows["0.05"]["val_acc"] == ""
    assert rows["0.05"]["error"].startswith("training diverged: the loss is nan at step 1 (epoch 0), log ")
    assert "| DIVERGED |" in (tmp_path / "out" / "t" / "tune_results.md").read_text()
    with pytest.raises(RuntimeError, match=r"no trial completed but diverged \(1, e.g. training diverged: .*lower "
                                           r"the learning rates"):
        run_tune([TINY], {"model.lr": [0.05]}, out=str(tmp_path / "out"), name="all", python=fit, echo=False,
                 skip_protocol=True, overrides=FAST)


@pytest.mark.parametrize("key, values", [("data.val_shots", [2, 3]), ("data.shots", [2, 5]),
                                         ("data.root", ["/a", "/b"]), ("data.dataset", ["cifar10", "cifar100"])])
def test_a_grid_over_the_images_trained_or_validated_on_is_refused_before_the_first_trial(tmp_path, key, values):
    # validation accuracies on other images choose nothing; trial results also recorded the base root's images only,
    # so a grid root's changed images went unseen and its stale score was reused
    with pytest.raises(ValueError, match=rf"--grid {key}: .*measure other tasks and choose nothing. Search one "
                                         rf"setting per study: --{key} as an override"):
        run_tune([TINY], {"model.lr": [1e-3], key: values}, out=str(tmp_path / "out"), name="t", skip_protocol=True,
                 overrides=["--trainer.max_epochs", "1", "--data.shots", "2", "--data.val_shots", "1"])
    assert not (tmp_path / "out").exists()


def test_a_worker_with_another_heartbeat_than_its_study_is_refused(tmp_path):
    """A worker with a shorter --heartbeat took another worker's live trial for dead and failed it; that worker then
    crashed on Optuna's "Trial#1 has already finished and can not be updated"."""
    fit = fake_python(tmp_path, metric="val/acc")
    run = partial(run_tune, [TINY], parse_grid(["model.lr=1e-4"]), out=str(tmp_path / "out"), name="t",
                  overrides=FAST, skip_protocol=True, python=fit)
    run(heartbeat_s=30)
    with pytest.raises(ValueError, match=r"study 't' .* runs with --heartbeat 30 \(set by its first worker\).*Pass "
                                         r"--heartbeat 30"):
        run(heartbeat_s=1)
    run(heartbeat_s=30)  # the same interval: the finished study is read again


@pytest.mark.parametrize("name", ["a?b", "x%41y"])
def test_a_row_name_with_a_url_character_keeps_its_study_in_its_own_folder(tmp_path, name):
    """The default study URL held the row folder's path as it is: SQLAlchemy read "a?b" as the file "a" with a query,
    and "x%41y" as "xAy" (another row's folder, or a "--storage" error for an option never given)."""
    fit = fake_python(tmp_path, metric="val/acc")
    run_tune([TINY], parse_grid(["model.lr=1e-4"]), out=str(tmp_path / "out"), name=name, overrides=FAST,
             skip_protocol=True, python=fit)
    assert (tmp_path / "out" / name / "tune.db").is_file()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [name]


def test_a_trial_another_worker_ended_is_said_so_not_a_crash(capsys):
    optuna = pytest.importorskip("optuna")
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    study.tell(trial, state=optuna.trial.TrialState.FAIL)  # what the other worker's stale-trial sweep did
    search = object.__new__(_Search)
    search.lock = threading.Lock()
    with search._finishing(trial):
        trial.set_user_attr("val_accs", {"0": 0.5})
        study.tell(trial, 0.5)
    assert "trial #0 was ended by another worker meanwhile" in capsys.readouterr().out
    assert study.trials[0].state == optuna.trial.TrialState.FAIL


def test_a_trial_failed_for_its_stopped_worker_says_so_in_the_trials_table(tmp_path):
    # a trial Optuna failed for its missed heartbeats showed as FAIL with an empty error, as if its fit had failed
    import csv

    import optuna

    from nola_vision.runs.tune import write_trial_tables

    distribution = optuna.distributions.CategoricalDistribution([1e-3, 1e-2])
    trials = [optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, params={"model.lr": 1e-3},
                                        distributions={"model.lr": distribution}),
              optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, params={"model.lr": 1e-2},
                                        distributions={"model.lr": distribution}, user_attrs={"error": "boom"})]
    write_trial_tables(tmp_path, trials, {"model.lr": [1e-3, 1e-2]}, "sqlite:///tune.db")
    with open(tmp_path / "tune_trials.csv") as f:
        errors = [row["error"] for row in csv.DictReader(f)]
    assert errors == ["no error recorded: its worker stopped (killed?), and its missed heartbeats failed it", "boom"]


def test_the_trial_tables_are_utf8_under_any_locale_and_a_value_holding_a_pipe_keeps_its_cell(tmp_path):
    """tune_trials.csv (and each run's log.txt) was written in the locale's encoding: Latin-1 bytes beside UTF-8
    tables, and under LC_ALL=C a codec error. A grid value holding '|' (a regex of targets) split its markdown cell,
    shifting every later column of the row. A cell a spreadsheet would run as a formula is written as text."""
    import optuna

    from nola_vision.runs.tune import write_trial_tables

    script = f'''
import optuna, os, sys
from pathlib import Path
from nola_vision.runs.executors import _start
from nola_vision.runs.tune import write_trial_tables
grid = {{"model.adapter.init_args.targets": ["[blocks\\.0\\.fc1|blocks\\.1\\.fc1]"]}}
distribution = optuna.distributions.CategoricalDistribution(grid["model.adapter.init_args.targets"])
trial = optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, params={{k: v[0] for k, v in grid.items()}},
                                  distributions={{k: distribution for k in grid}},
                                  user_attrs={{"error": "in d\\u00e9p\\u00f4t"}})
root = Path({str(tmp_path)!r})
write_trial_tables(root, [trial], grid, "sqlite:///tune.db")
_start([sys.executable, "-c", "pass", os.fsdecode(b"d\\xc3\\xa9p\\xc3\\xb4t")], str(root / "log.txt"), None, ()).wait()
'''
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, encoding="utf-8")
    assert done.returncode == 0, done.stderr
    assert "in dépôt" in (tmp_path / "tune_trials.csv").read_text(encoding="utf-8")
    assert (tmp_path / "log.txt").read_text(encoding="utf-8").rstrip().endswith("dépôt")
    row = (tmp_path / "tune_results.md").read_text(encoding="utf-8").splitlines()[-1]
    cells = re.split(r"(?<!\\)\|", row)[1:-1]
    assert len(cells) == 6 and cells[1].strip() == r"[blocks\.0\.fc1\|blocks\.1\.fc1]" and cells[4].strip() == "FAIL"
    write_trial_tables(tmp_path, [optuna.trial.create_trial(  # a value a spreadsheet would run: as text
        state=optuna.trial.TrialState.FAIL, params={"model.lr": 1e-3}, user_attrs={"error": "=1+2"},
        distributions={"model.lr": optuna.distributions.CategoricalDistribution([1e-3])})], {"model.lr": [1e-3]},
        "sqlite:///tune.db")
    with open(tmp_path / "tune_trials.csv", newline="", encoding="utf-8") as f:
        assert [(row["model.lr"], row["error"]) for row in csv.DictReader(f)] == [("0.001", "'=1+2")]


def test_a_trial_stops_at_its_first_fit_that_fit_refuses(tmp_path):
    # every seed of the trial ran into the same refusal (offline, a minute of hub retries each)
    refusing = tmp_path / "refusing_python"
    refusing.write_text(f"#!{sys.executable}\nimport sys\n"
                        "print('nola-vision: error: class 0 has 90 train images', file=sys.stderr)\nsys.exit(2)\n")
    refusing.chmod(0o755)
    with pytest.raises(RuntimeError) as raised:
        run_tune([TINY], {"model.lr": [1e-3]}, out=str(tmp_path / "out"), name="t", python=str(refusing),
                 split_seeds=[0, 1], init_seeds=[0, 1], echo=False, skip_protocol=True, overrides=FAST)
    assert str(raised.value).count("class 0 has 90 train images") == 1
    assert len(list((tmp_path / "out" / "t").rglob("log.txt"))) < 4  # those already running, not the 4 seeds


def test_a_refused_trial_says_that_re_running_the_same_command_fails_alike(tmp_path):
    # "fix the cause and re-run the same command to retry them": the same command was refused again, every time
    refusing = tmp_path / "refusing_python"
    refusing.write_text(f"#!{sys.executable}\nimport sys\n"
                        "print('nola-vision: error: target nope matches nothing', file=sys.stderr)\nsys.exit(2)\n")
    refusing.chmod(0o755)
    with pytest.raises(RuntimeError, match=r"target nope matches nothing.*a fit refused its settings, which re-running "
                                           r"the same command meets again .*delete the study \(sqlite:///.*tune.db\)"):
        run_tune([TINY], {"model.lr": [1e-3]}, out=str(tmp_path / "out"), name="t", python=str(refusing),
                 echo=False, skip_protocol=True, overrides=FAST)


def test_an_earlier_runs_refusal_is_no_reason_for_this_runs_failure(tmp_path):
    # the study keeps the failed trials of every run: a refusal fixed since was quoted for a new, other failure
    mode = tmp_path / "mode"
    fit = tmp_path / "fit_python"
    fit.write_text(f"""#!{sys.executable}
import json, sys
args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1]
if float(value("--model.lr")) > 5e-3:
    print("nola-vision: error: " + open({str(mode)!r}).read(), file=sys.stderr)
    sys.exit(2 if "refused" in open({str(mode)!r}).read() else 1)
json.dump({{"metrics": {{"val/acc": 0.5}}, "config": {{"method": "fake", "split_seed": int(value("--data.split_seed")),
           "seed": int(value("--seed_everything"))}}, "parameter_counts": {{"adapter": 8, "head": 2}}}},
          open(value("--result_file"), "w"))
""")
    fit.chmod(0o755)
    run = partial(run_tune, [TINY], {"model.lr": [1e-3, 1e-2]}, out=str(tmp_path / "out"), name="t", python=str(fit),
                  echo=False, skip_protocol=True, overrides=FAST)
    mode.write_text("refused: a file is missing")
    with pytest.raises(RuntimeError, match="a fit refused its settings"):
        run()
    mode.write_text("out of memory")
    with pytest.raises(RuntimeError) as raised:
        run()
    assert "refused its settings" not in str(raised.value)
    assert "fix the cause and re-run the same command to retry them" in str(raised.value)


@pytest.mark.parametrize("grid, said", [
    ("model.adapter.init_args.targets=[attn.qkv],[bogus]", "target 'bogus' matches no nn.Linear of VisionTransformer"),
    ("model.backbone=vit_tiny_patch16_224,vit_bogus", "unknown timm model 'vit_bogus'"),
    ("data.batch_size=8,0", "FewShotDataModule.batch_size must be a positive integer, got 0"),
    ("data.eval_batch_size=8,-1", "FewShotDataModule.eval_batch_size must be a positive integer or null, got -1"),
    ("data.num_workers=0,-2", r"FewShotDataModule.num_workers must be an integer >= 0, got -2")])
def test_a_grid_value_naming_no_layer_or_no_model_is_refused_before_the_first_trial(tmp_path, grid, said):
    """A target that matches no layer, an unknown backbone, or a data setting the data module refuses was found only
    when its trial's fit built them, after the trials before it had run (the docs say every value is checked before
    the first trial)."""
    with pytest.raises(ValueError, match=f"--grid {re.escape(grid.split('=')[0])}=.* is not accepted .*{said}"):
        check_grid([TINY], ["--data.val_shots", "2"], parse_grid([grid]))
    with pytest.raises(ValueError, match=said):  # protocol's own check of its overrides
        check_fit_arguments([TINY], [f"--{grid.split('=')[0]}", grid.split("=")[1].split(",")[1]])


@pytest.mark.parametrize("override, grid", [(["--trainer.limit_val_batches", "0"], {}),
                                            ([], {"trainer.limit_val_batches": [0, 1.0]})])
def test_a_search_that_would_run_no_validation_pass_is_refused_before_the_first_trial(tmp_path, override, grid):
    """--trainer.limit_val_batches 0 (or a grid value 0) trained every trial, then failed for want of val/acc."""
    with pytest.raises(ValueError, match=r"limit_val_batches (is|holds) 0, which runs no validation pass"):
        run_tune([TINY], {"model.lr": [1e-3], **grid}, out=str(tmp_path), name="t", overrides=[*FAST, *override],
                 python=fake_python(tmp_path), echo=False)
    assert not list(tmp_path.rglob("log.txt"))


def fit_preferring(tmp_path, flag, best):
    """A stand-in for `fit` whose validation accuracy is 0.9 where option ``flag`` is ``best``, else 0.5."""
    fit = tmp_path / "fit_python"
    fit.write_text(f"""#!{sys.executable}
import json, sys
args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1]
score = 0.9 if value({flag!r}) == {best!r} else 0.5
json.dump({{"metrics": {{"val/acc": score}},
           "config": {{"method": "fake", "split_seed": int(value("--data.split_seed")),
           "seed": int(value("--seed_everything"))}}, "parameter_counts": {{"adapter": 8, "head": 2}}}},
          open(value("--result_file"), "w"))
""")
    fit.chmod(0o755)
    return fit


def test_best_yaml_holds_a_list_grid_value_as_a_list_that_fit_reads_back_as_the_trial_ran(tmp_path):
    # best.yaml held '[attn.qkv]', quoted: `fit -c best.yaml` read it as a list, a plain YAML reader as a string
    fit = fit_preferring(tmp_path, "--model.adapter.init_args.targets", "[attn.qkv, mlp.fc1]")
    grid = parse_grid(["model.adapter.init_args.targets=[attn.proj],[attn.qkv, mlp.fc1]"])
    run_tune([TINY], grid, out=str(tmp_path / "out"), name="t", python=str(fit), echo=False, skip_protocol=True,
             overrides=FAST)
    chosen = yaml.safe_load((tmp_path / "out" / "t" / "best.yaml").read_text())
    assert chosen["model"]["adapter"]["init_args"]["targets"] == ["attn.qkv", "mlp.fc1"]
    best = json.loads((tmp_path / "out" / "t" / "best.json").read_text())
    assert best["overrides"] == ["--model.adapter.init_args.targets", "[attn.qkv, mlp.fc1]"]  # as the trial ran
    composed = cli_parser().parse_args(["fit", "-c", TINY, "-c", str(tmp_path / "out" / "t" / "best.yaml")])
    assert composed["fit"]["model"] == cli_parser().parse_args(["fit", "-c", TINY, *best["overrides"]])["fit"]["model"]


def test_best_yaml_of_a_key_inside_a_mapping_option_composes_into_the_model_the_trial_ran(tmp_path):
    # best.yaml held {backbone_kwargs: {depth: 2}}: a later -c replaces a mapping whole, so `fit -c best.yaml` built
    # timm's default width (1,041,354 parameters instead of 114,762) from the configs' other entries dropped
    fit = fit_preferring(tmp_path, "--model.backbone_kwargs.depth", "1")
    run_tune([TINY], parse_grid(["model.backbone_kwargs.depth=2,1"]), out=str(tmp_path / "out"), name="t",
             python=str(fit), echo=False, skip_protocol=True, overrides=FAST)
    best = json.loads((tmp_path / "out" / "t" / "best.json").read_text())
    assert best["overrides"] == ["--model.backbone_kwargs.depth", "1"]
    composed = cli_parser().parse_args(["fit", "-c", TINY, "-c", str(tmp_path / "out" / "t" / "best.yaml")])
    trial = cli_parser().parse_args(["fit", "-c", TINY, *best["overrides"]])
    assert composed["fit"]["model"] == trial["fit"]["model"]
    assert composed["fit"]["model"]["backbone_kwargs"]["embed_dim"] == 64  # the config's, kept


@pytest.mark.parametrize("shared", ["--out", "--storage"])
def test_two_tunes_started_together_with_other_settings_never_share_one_study(tmp_path, monkeypatch, shared):
    # Both read the new study's settings (none yet) before either wrote its own: both went on, one study mixing fits
    # of max_epochs 1 and 2, and a later run trusted the other's scores. Now one records, the other compares: under
    # one --out folder, and on machines sharing a --storage database with their own folders (no lock in common).
    import optuna

    recorded = optuna.study.Study.set_user_attr

    def slowly(study, key, value):  # a slow shared storage: the window between reading and writing, widened
        if key == "settings":  # longer than a worker losing the race to create the tables waits (1 s) to retry
            threading.Event().wait(3.0)
        return recorded(study, key, value)

    monkeypatch.setattr(optuna.study.Study, "set_user_attr", slowly)
    python, errors = fake_python(tmp_path, acc="0.5", metric="val/acc"), []

    def tune(epochs):
        out, storage = ((tmp_path / "out", None) if shared == "--out" else
                        (tmp_path / f"machine{epochs}", f"sqlite:///{tmp_path}/shared.db"))
        try:
            run_tune([TINY], parse_grid(["model.lr=1e-3,2e-2"]), out=str(out), name="race", storage=storage,
                     python=python, echo=False, skip_protocol=True,
                     overrides=[*FAST[:1], epochs, *FAST[2:]])
        except ValueError as error:
            errors.append(str(error))

    threads = [threading.Thread(target=tune, args=(epochs,)) for epochs in ("1", "2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(errors) == 1 and "was made with other settings" in errors[0] and "max_epochs" in errors[0], errors


def test_equal_mean_accuracies_tie_to_the_first_grid_point_despite_float32_rounding():
    # fit records accuracies as float32: 2/20 and 4/20 average a few 1e-9 below 3/20 twice, and chose the second point
    from types import SimpleNamespace

    import numpy as np

    from nola_vision.runs.tune import _best, grid_points

    points = grid_points({"model.lr": ["0.001", "0.02"]})
    scores = [np.mean([float(np.float32(2 / 20)), float(np.float32(4 / 20))]), float(np.float32(3 / 20))]
    assert scores[0] < scores[1]  # the rounding the rule must see through
    trials = [SimpleNamespace(state=SimpleNamespace(name="COMPLETE"), value=value, params=point, user_attrs={},
                              number=number) for number, (point, value) in enumerate(zip(points, scores))]
    assert _best(trials, points).params == {"model.lr": "0.001"}
    assert _best(trials[::-1], points).params == {"model.lr": "0.001"}
    trials[1].value = scores[1] + 1 / 40  # one image more of 40 is no tie
    assert _best(trials, points).params == {"model.lr": "0.02"}


@pytest.mark.parametrize("sampler", ["grid", "tpe"])
def test_a_trial_whose_worker_was_killed_before_its_first_heartbeat_is_retried_not_waited_for(tmp_path, sampler):
    # kill -9 between Optuna creating the running trial and its first heartbeat: Optuna's stale check passes over a
    # trial without one, so every later run of the command waited for it forever, saying nothing. Its start stamp
    # (naive local time) an hour ahead, as daylight saving's end or a clock stepped back leaves it, made the next run
    # wait that hour. A TPE search whose last draw it held returned at once ("trials left to run") at every run.
    import sqlite3

    import optuna

    python = fake_python(tmp_path, acc="0.5", metric="val/acc")
    args = dict(out=str(tmp_path / "out"), name="t", python=python, skip_protocol=True, overrides=FAST,
                heartbeat_s=1, sampler=sampler, **({"n_trials": 2} if sampler == "tpe" else {}))
    first = run_tune([TINY], parse_grid(["model.lr=1e-3,2e-2"]), echo=False, **{**args, "n_trials": 1})
    assert (first is None) == (sampler == "grid")  # a grid has a point left; TPE's budget of one is spent
    database = tmp_path / "out" / "t" / "tune.db"
    optuna.load_study(study_name="t", storage=f"sqlite:///{database}").ask()  # the killed worker's claim
    with sqlite3.connect(database) as connection:
        connection.execute("UPDATE trials SET datetime_start = datetime(datetime_start, '+3600 seconds') "
                           "WHERE state = 'RUNNING'")
    code = (f"from nola_vision.runs.tune import run_tune, parse_grid\n"
            f"run_tune([{TINY!r}], parse_grid(['model.lr=1e-3,2e-2']), echo=False, **{args!r})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    best = json.loads((tmp_path / "out" / "t" / "best.json").read_text())
    assert sampler == "tpe" or best["params"] == {"model.lr": 0.001}  # both points ran; the tie goes to the first
    states = [t.state.name for t in optuna.load_study(study_name="t", storage=f"sqlite:///{database}").trials]
    assert states.count("COMPLETE") == 2 and "RUNNING" not in states


def test_best_yaml_of_a_class_switch_with_its_init_args_composes_into_the_model_the_trial_ran(tmp_path):
    # model.adapter.init_args.rank was nested under the text 'LoRAConfig': tune failed after its last trial
    # ('str' object has no attribute 'setdefault'), writing no best.json nor best.yaml
    fit = fit_preferring(tmp_path, "--model.adapter", "LoRAConfig")
    run_tune([TINY], parse_grid(["model.adapter=NOLAConfig,LoRAConfig", "model.adapter.init_args.rank=1,2"]),
             out=str(tmp_path / "out"), name="t", python=str(fit), echo=False, skip_protocol=True, overrides=FAST)
    best = json.loads((tmp_path / "out" / "t" / "best.json").read_text())
    assert best["params"]["model.adapter"] == "LoRAConfig"
    composed = cli_parser().parse_args(["fit", "-c", TINY, "-c", str(tmp_path / "out" / "t" / "best.yaml")])
    trial = cli_parser().parse_args(["fit", "-c", TINY, *best["overrides"]])
    assert composed["fit"]["model"] == trial["fit"]["model"]


def test_a_worker_awaiting_a_never_beaten_trial_leaves_the_other_workers_free(tmp_path):
    # it waited out the grace period holding the workers' lock: another worker's finished 0.2 s fit could not be
    # recorded meanwhile, and its trial's duration read 10 to 15 s
    import optuna

    python = fake_python(tmp_path, acc="0.5", metric="val/acc")
    args = dict(out=str(tmp_path / "out"), name="t", python=python, skip_protocol=True, overrides=FAST, heartbeat_s=3,
                sampler="tpe")
    run_tune([TINY], parse_grid(["model.lr=1e-3,2e-2"]), echo=False, **{**args, "n_trials": 1})
    storage = f"sqlite:///{tmp_path / 'out' / 't' / 'tune.db'}"
    optuna.load_study(study_name="t", storage=storage).ask()  # a killed worker's claim, never beaten
    code = ("from nola_vision.runs.tune import run_tune, parse_grid\n"
            "from nola_vision.runs.executors import LocalExecutor\n"
            f"run_tune([{TINY!r}], parse_grid(['model.lr=1e-3,2e-2']), echo=False, executor=LocalExecutor(2), "
            f"n_trials=3, **{args!r})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    trials = optuna.load_study(study_name="t", storage=storage).trials
    assert [t.state.name for t in trials].count("COMPLETE") == 3
    assert max(t.user_attrs["duration_s"] for t in trials if t.state.name == "COMPLETE") < 5  # 9 s of grace
