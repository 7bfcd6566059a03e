"""protocol and tune runs that used to be mixed, duplicated, orphaned or left unclear: names and folders, seeds,
file-valued overrides, grids that fit refuses, fits reused across settings, concurrent commands, SIGTERM."""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fake_fit import fake_python

from nola_vision.runs.protocol import run_protocol
from nola_vision.runs.results import claim_run, row_folder
from nola_vision.runs.tune import parse_grid, run_tune

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_offline.yaml")
FAST = ["--trainer.max_epochs", "1", "--data.shots", "2"]


@pytest.mark.parametrize("name", ["grp/cell", ".", "..", "a|b", " padded", "lr 1e-3\nrow", "a\tb", ""])
def test_a_row_name_must_be_one_folder_name(tmp_path, name):
    # "" (an unset shell variable, --name "$ROW") was taken for no name: the runs went to the config's row
    with pytest.raises(ValueError, match="a row name is one folder name"):
        run_protocol([TINY], out=str(tmp_path), name=name, split_seeds=[0], init_seeds=[0], overrides=FAST)
    with pytest.raises(ValueError, match="a row name is one folder name"):
        run_tune([TINY], {"model.lr": [1e-3]}, out=str(tmp_path), name=name, python="/bin/false", echo=False,
                 overrides=[*FAST, "--data.val_shots", "1"], skip_protocol=True)
    assert not (tmp_path / "tiny_offline").exists()


@pytest.mark.parametrize("name", ["results.csv", "results.md", ".results.lock", ".hidden"])
def test_a_row_name_that_takes_the_tables_or_their_lock_is_refused_before_any_fit(tmp_path, name):
    # results.csv ran the fits into <out>/results.csv/, then every later command on --out failed on that folder
    with pytest.raises(ValueError, match=rf"--name '{re.escape(name)}': .* is where --out keeps its"):
        run_protocol([TINY], out=str(tmp_path), name=name, split_seeds=[0], init_seeds=[0], overrides=FAST,
                     python="/bin/false", echo=False)
    assert not (tmp_path / name).exists()


def test_a_row_name_that_differs_from_a_rows_only_in_unicode_normalization_is_refused(tmp_path):
    # "café" typed on Linux (NFC) and pasted from macOS (NFD) made two folders, two table rows that look alike
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    assert row_folder(str(tmp_path), nfc) == tmp_path / nfc
    with pytest.raises(ValueError, match=r"--name 'cafe\\u0301': .* holds the row 'caf\\xe9', whose name differs "
                                         r"only in Unicode normalization .* reuse the existing row's name"):
        row_folder(str(tmp_path), nfd)
    assert not (tmp_path / nfd).exists()
    assert row_folder(str(tmp_path), nfc) == tmp_path / nfc  # the row's own name, as its folder spells it


@pytest.mark.parametrize("heartbeat", [0, -5, 2.5, True])
def test_a_tune_heartbeat_must_be_a_whole_positive_number_of_seconds(tmp_path, heartbeat):
    """Optuna's own message named its parameter (heartbeat_interval), not --heartbeat."""
    with pytest.raises(ValueError, match=rf"--heartbeat {heartbeat!r}: give a whole number of seconds, at least 1"):
        run_tune([TINY], {"model.lr": [1e-3]}, out=str(tmp_path), name="t", python="/bin/false", echo=False,
                 overrides=[*FAST, "--data.val_shots", "1"], skip_protocol=True, heartbeat_s=heartbeat)


def test_seeds_knn_k_and_an_output_under_a_file_are_checked_before_any_fit(tmp_path):
    for seeds, message in (([], "--split_seeds is empty"), ([0, 0], "repeats a seed")):
        with pytest.raises(ValueError, match=message):
            run_protocol([TINY], out=str(tmp_path), name="r", split_seeds=seeds, init_seeds=[0], overrides=FAST)
    for knn in (True, False):  # without --knn the 12 fits ran, the value given ignored (the docs say it is refused)
        with pytest.raises(ValueError, match="--knn_k must be a positive integer"):
            run_protocol([TINY], out=str(tmp_path), name="r", split_seeds=[0], init_seeds=[0], overrides=FAST,
                         knn=knn, knn_k=0)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="afile is a file, so the runs cannot go under"):
        run_protocol([TINY], out=str(tmp_path / "afile"), name="r", split_seeds=[0], init_seeds=[0], overrides=FAST)
    assert not list(tmp_path.rglob("result.json"))


def test_an_override_file_counts_by_its_content(tmp_path):
    trainer = tmp_path / "trainer.yaml"
    trainer.write_text("max_epochs: 1\n")
    overrides = ["--data.shots", "2", "--trainer", str(trainer)]
    # the row's settings are the protocol's to record and compare: a stand-in fit (fake_fit.py) finishes the run
    run_protocol([TINY], out=str(tmp_path / "out"), name="cell", split_seeds=[0], init_seeds=[0], overrides=overrides,
                 python=fake_python(tmp_path), echo=False)
    assert (tmp_path / "out" / "cell" / "split0-init0" / "result.json").is_file()
    trainer.write_text("max_epochs: 2\n")
    with pytest.raises(ValueError, match="holds runs made with other settings"):
        run_protocol([TINY], out=str(tmp_path / "out"), name="cell", split_seeds=[0], init_seeds=[0, 1],
                     overrides=overrides, python=fake_python(tmp_path), echo=False)


def test_a_run_another_process_holds_is_skipped_not_run_twice(tmp_path, capsys):
    held = claim_run(tmp_path / "out" / "cell" / "split0-init1")
    try:  # the claims are the protocol's own: a stand-in fit (fake_fit.py) runs the run it is free to run
        run_protocol([TINY], out=str(tmp_path / "out"), name="cell", split_seeds=[0], init_seeds=[0, 1],
                     overrides=FAST, python=fake_python(tmp_path))
    finally:
        os.close(held)
    out = capsys.readouterr().out
    assert "split 0 init 1: running in another process, skipped" in out
    # the table printed next lacks that run (or, with all runs elsewhere, the whole row): say why, and who adds it
    assert (f"cell: 1 of its 2 runs run in another process, so the tables leave them out until they end (that "
            f"process adds them; if it was killed, run this command again once they end, which adds them): "
            f"{tmp_path / 'out' / 'results.md'}") in out
    assert (tmp_path / "out" / "cell" / "split0-init0" / "result.json").is_file()
    assert not (tmp_path / "out" / "cell" / "split0-init1" / "result.json").exists()
    assert claim_run(tmp_path / "out" / "cell" / "split0-init1") is not None  # released by the other holder


def test_a_result_its_fit_wrote_after_the_command_died_is_recorded_with_the_rows_settings_and_images(tmp_path):
    # kill -9 of the command while its fit ran: the fit finished alone, and its result was counted without the
    # settings and images the command stamps (the tables' train_images/test_images were empty for it)
    out, row = tmp_path / "out", tmp_path / "out" / "cell"
    run_protocol([TINY], out=str(out), name="cell", split_seeds=[0], init_seeds=[0], overrides=FAST,
                 python=fake_python(tmp_path), echo=False)
    stamped = json.loads((row / "split0-init0" / "result.json").read_text())
    assert stamped["config_hash"] and stamped["data"]
    # what the command recorded when it claimed the run, before its fit started
    stamp = json.loads((row / "split0-init0" / ".stamp.json").read_text())
    assert stamp == {"config_hash": stamped["config_hash"], "data": stamped["data"],
                     "command_sha256": stamp["command_sha256"]}  # which fit command it started
    for init in (1, 2):  # init 1 as a killed command leaves it; init 2 without the command's record (unknown)
        orphan = {key: stamped[key] for key in ("metrics", "config", "parameter_counts")}  # what the fit writes
        (row / f"split0-init{init}").mkdir()
        (row / f"split0-init{init}" / "result.json").write_text(json.dumps({**orphan, "config": {
            **orphan["config"], "seed": init}}))
    (row / "split0-init1" / ".stamp.json").write_text(json.dumps(stamp))
    held = claim_run(row / "split0-init1")  # while the command that holds it lives, it stamps the result itself
    try:
        run_protocol([TINY], out=str(out), name="cell", split_seeds=[0], init_seeds=[0, 1, 2], overrides=FAST,
                     python=fake_python(tmp_path, acc="0.1"), echo=False)  # would fit them with 0.1
    finally:
        os.close(held)
    assert "config_hash" not in json.loads((row / "split0-init1" / "result.json").read_text())
    run_protocol([TINY], out=str(out), name="cell", split_seeds=[0], init_seeds=[0, 1, 2], overrides=FAST,
                 python=fake_python(tmp_path, acc="0.1"), echo=False)
    adopted = json.loads((row / "split0-init1" / "result.json").read_text())
    assert adopted["metrics"] == orphan["metrics"]  # counted, not run again
    assert (adopted["config_hash"], adopted["data"]) == (stamped["config_hash"], stamped["data"])
    unknown = json.loads((row / "split0-init2" / "result.json").read_text())
    assert unknown["metrics"] == orphan["metrics"] and "data" not in unknown and "config_hash" not in unknown
    rows = {r["run_dir"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert len(rows) == 3 and rows[str(row / "split0-init1")]["train_images"] == stamped["data"]["train"]


def test_grids_that_fit_refuses_or_that_repeat_a_setting_are_refused_before_the_first_trial(tmp_path):
    with pytest.raises(ValueError, match="--grid model.lr has no values"):
        parse_grid(["model.lr=,"])
    with pytest.raises(ValueError, match="repeats a value"):
        parse_grid(["model.lr=1,1.0"])
    for grid, message in ((["model.lr=-1,1e-2"], "lr must be a finite number > 0"),
                          (["model.lr=1e-7"], r"min_lr \(1e-06\) must not exceed lr")):
        with pytest.raises(ValueError, match=message):
            run_tune([TINY], parse_grid(grid), out=str(tmp_path), name="t", overrides=[*FAST, "--data.val_shots", "2"],
                     skip_protocol=True, echo=False)
    assert not (tmp_path / "t").exists()


def test_a_debugging_pass_that_writes_no_result_is_refused_before_the_first_fit(tmp_path):
    # every fit ran, exited 0 without a result, and was reported failed: "re-run the same command to retry them"
    debug = [*FAST, "--trainer.fast_dev_run", "true"]
    fails = fake_python(tmp_path, code=1)  # no fit may start
    with pytest.raises(ValueError, match=r"--trainer.fast_dev_run True is a debugging pass .* no run would count"):
        run_protocol([TINY], out=str(tmp_path), name="r", split_seeds=[0], init_seeds=[0], overrides=debug,
                     python=fails, echo=False)
    with pytest.raises(ValueError, match=r"--trainer.fast_dev_run True is a debugging pass"):
        run_tune([TINY], parse_grid(["model.lr=1e-3,1e-2"]), out=str(tmp_path), name="t", skip_protocol=True,
                 overrides=[*debug, "--data.val_shots", "2"], python=fails, echo=False)
    assert not list(tmp_path.rglob("log.txt"))


def test_a_file_where_a_run_folder_goes_is_named_and_its_trial_fails_instead_of_hanging(tmp_path):
    # mkdir said "[Errno 17] File exists", and the trial stayed RUNNING: the next run waited out its heartbeats
    import optuna

    (tmp_path / "blocked").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"blocked is a file, so the run folder .*blocked/run cannot be "
                                                  "made: move the file away"):
        claim_run(tmp_path / "blocked" / "run")
    (tmp_path / "out" / "t").mkdir(parents=True)
    (tmp_path / "out" / "t" / "tune").write_text("in the way")
    with pytest.raises(RuntimeError, match=r"no trial completed \(1 failed, e.g. .*tune is a file, so the run folder"):
        run_tune([TINY], parse_grid(["model.lr=1e-3"]), out=str(tmp_path / "out"), name="t", skip_protocol=True,
                 overrides=[*FAST, "--data.val_shots", "2"], python=fake_python(tmp_path, metric="val/acc"),
                 echo=False)
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path / 'out' / 't' / 'tune.db'}")
    (trial,) = study.get_trials(deepcopy=False)
    assert trial.state.name == "FAIL" and "is a file, so the run folder" in trial.user_attrs["error"]


def test_tune_without_optuna_or_a_database_driver_says_what_to_install(tmp_path, monkeypatch, capsys):
    from nola_vision.runs import tune

    monkeypatch.setitem(sys.modules, "optuna", None)  # what an environment without it gives: an ImportError
    command = ["-c", TINY, "--out", str(tmp_path), "--grid", "model.lr=1e-3", "--skip_protocol",
               "--data.val_shots", "2", *FAST]
    assert tune.main(command) == 2
    assert "nola-vision tune needs Optuna, which is not installed: pip install 'nola_vision[tune]'" in \
        capsys.readouterr().err
    monkeypatch.delitem(sys.modules, "optuna")
    monkeypatch.setitem(sys.modules, "psycopg2", None)  # the driver SQLAlchemy's postgresql:// takes
    assert tune.main([*command, "--storage", "postgresql://user@127.0.0.1:1/db"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "postgresql://: pip install psycopg2-binary" in err


def test_workers_of_one_study_done_at_once_write_the_chosen_line_once(tmp_path):
    # each read the table, then appended its line: the last to finish wrote it a second time
    from nola_vision.runs.tune import _append_choice

    table = tmp_path / "tune_results.md"
    table.write_text(f"# Tuning: {tmp_path.name}\n\n| trial | model.lr | val acc % |\n")
    chosen = {"trial": 1, "val_acc": 0.5, "overrides": ["--model.lr", "0.01"]}
    for _ in range(2):
        _append_choice(table, chosen, protocol=False)
    assert table.read_text().count("Chosen (trial #1") == 1


def test_trial_fits_made_with_other_settings_are_never_reused(tmp_path):
    grid = parse_grid(["model.lr=1e-2"])
    # reusing a trial's fits is tune's decision: a stand-in fit (fake_fit.py) records the epochs it was asked for
    fit = fake_python(tmp_path, metric="val/acc", extra='"epochs": int(value("--trainer.max_epochs")),')
    common = dict(out=str(tmp_path), name="t", skip_protocol=True, echo=False, python=fit)
    run_tune([TINY], grid, overrides=[*FAST, "--data.val_shots", "2"], **common)
    (tmp_path / "t" / "tune.db").unlink()  # "delete the study", as the error for changed settings says
    run_tune([TINY], grid, overrides=["--trainer.max_epochs", "2", "--data.shots", "2", "--data.val_shots", "2"],
             **common)
    epochs = sorted(json.loads(p.read_text())["epochs"] for p in (tmp_path / "t" / "tune").rglob("result.json"))
    assert epochs == [1, 2]


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads running processes from /proc")
def test_sigterm_stops_the_fit_a_protocol_started(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "nola_vision.cli", "protocol", "-c", TINY, "--out", str(out), "--name", "cell",
               "--split_seeds", "0", "--init_seeds", "0", "--trainer.max_epochs", "50"]
    protocol = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = str(out / "cell" / "split0-init0")

    def fits():
        found = []
        for entry in Path("/proc").iterdir():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "fit" in cmdline and run_dir in cmdline and entry.name != str(protocol.pid):
                found.append(entry.name)
        return found

    deadline = time.time() + 120
    while not fits() and time.time() < deadline:
        time.sleep(0.5)
    assert fits(), "the fit never started"
    protocol.send_signal(signal.SIGTERM)
    assert protocol.wait(timeout=60) == 128 + signal.SIGTERM
    deadline = time.time() + 30
    while fits() and time.time() < deadline:
        time.sleep(0.5)
    assert not fits()


def test_a_logger_less_run_that_was_killed_is_redone_by_the_same_command(tmp_path):
    run_dir = tmp_path / "out" / "cell" / "split0-init0"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("# the config a killed fit wrote\n")
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"partial")
    run_protocol([TINY], out=str(tmp_path / "out"), name="cell", split_seeds=[0], init_seeds=[0],
                 overrides=[*FAST, "--trainer.logger", "false"], echo=False)
    assert json.loads((run_dir / "result.json").read_text())["metrics"]["test/acc"] >= 0


@pytest.mark.parametrize("value", [None, "0.7", True, [0.7], 5.0, -0.1, float("nan")])
def test_a_result_whose_accuracy_is_not_a_number_in_0_1_does_not_count_and_is_left_out_of_the_tables(tmp_path, value):
    from nola_vision.runs.results import counted, write_tables

    good = {"status": "ok", "metrics": {"test/acc": 0.7, "val/acc": 0.6}, "config": {"method": "nola"}}
    edited = {**good, "metrics": {**good["metrics"], "test/acc": value}}
    assert counted(good) and not counted(edited)
    for run, data in (("split0-init0", good), ("split0-init1", edited)):
        (tmp_path / "row" / run).mkdir(parents=True)
        (tmp_path / "row" / run / "result.json").write_text(json.dumps(data))
    rows = write_tables(str(tmp_path))  # the edited run is redone by the next protocol, not summarised (or raised on)
    assert [Path(r["run_dir"]).name for r in rows] == ["split0-init0"]


def test_only_run_folders_count_and_a_null_config_is_read_as_empty(tmp_path):
    # a copy of a run folder (split0-init0.bak) counted as one more run of the row; a null config raised in the tables
    from nola_vision.runs.results import write_tables

    good = {"status": "ok", "metrics": {"test/acc": 0.7}, "config": None, "parameter_counts": None}
    for run in ("split0-init0", "split0-init0.bak", "split1", "split-1-init0"):
        (tmp_path / "row" / run).mkdir(parents=True)
        (tmp_path / "row" / run / "result.json").write_text(json.dumps(good))
    rows = write_tables(str(tmp_path))
    assert sorted(Path(r["run_dir"]).name for r in rows) == ["split-1-init0", "split0-init0", "split1"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("stop, code, says", [
    # Lightning stops on SIGTERM with a code-less SystemExit: exit 0, as if the run had finished
    ("SIGTERM", 128 + 15, "stopped by SIGTERM"),
    # and exits 1 on Ctrl-C, the code of a failed run; neither said where the weights were kept
    ("SIGINT", 130, "interrupted (Ctrl-C, SIGINT) before the run finished"),
])
def test_a_stopped_fit_exits_with_its_signals_code_naming_the_checkpoint_to_resume_from(tmp_path, stop, code, says):
    result = tmp_path / "result.json"
    command = [sys.executable, "-m", "nola_vision.cli", "fit", "-c", TINY, "--trainer.logger", "false",
               "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
               "--trainer.max_epochs", "200", "--result_file", str(result)]
    fit = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal starts it
    deadline = time.time() + 120
    # last.ckpt is saved after the epoch's checkpoint: a signal between the two names the epoch's
    while not (tmp_path / "checkpoints" / "last.ckpt").exists() and time.time() < deadline and fit.poll() is None:
        time.sleep(0.2)
    assert (tmp_path / "checkpoints" / "last.ckpt").exists(), "the fit never trained an epoch"
    fit.send_signal(getattr(signal, stop))
    _, err = fit.communicate(timeout=60)
    assert fit.returncode == code and says in err
    assert f"kept: resume with --ckpt_path {tmp_path / 'checkpoints' / 'last.ckpt'}" in err
    assert not result.exists()


# a protocol whose every run is a stand-in that records its pid in its run folder and sleeps
PROTOCOL_OF_SLEEPERS = """
import sys
from nola_vision.runs import protocol
protocol.run_protocol.__kwdefaults__["python"] = sys.argv[1]
sys.exit(protocol.main(sys.argv[2:]))
"""


def sleeper(tmp_path):
    script = tmp_path / "sleeper"
    script.write_text(f"""#!{sys.executable}
import os, sys, time
run_dir = os.path.dirname(sys.argv[sys.argv.index("--result_file") + 1])
with open(os.path.join(run_dir, "started"), "w") as f:
    f.write(str(os.getpid()))
time.sleep(60)
""")
    script.chmod(0o755)
    return str(script)


def pid_in(path):
    """The pid a stand-in run wrote to ``path``, or None before it has."""
    text = path.read_text() if path.is_file() else ""
    return int(text) if text.isdigit() else None


def alive(pid):
    """Whether a process runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads running processes from /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, *([signal.SIGHUP] if hasattr(signal, "SIGHUP")
                                                                     else [])])
def test_a_stopped_protocol_starts_no_queued_run_and_exits_with_the_signals_code(tmp_path, signum):
    # the queued runs used to start one after another once the running one was stopped, and protocol never exited;
    # SIGHUP (a login node's terminal closed) killed the protocol alone, leaving its fits (or SLURM jobs) running
    out = tmp_path / "out"
    # SIGHUP as a login shell leaves it (this test session may run under nohup, which ignores it)
    command = [sys.executable, "-c", "import signal; signal.signal(signal.SIGHUP, signal.SIG_DFL)\n"
               + PROTOCOL_OF_SLEEPERS, sleeper(tmp_path), "-c", TINY, "--out", str(out),
               "--name", "cell", "--split_seeds", "0", "1", "2", "--init_seeds", "0", "--jobs", "1"]
    protocol = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = out / "cell" / "split0-init0" / "started"
    try:
        deadline = time.time() + 60
        while pid_in(first) is None and time.time() < deadline and protocol.poll() is None:
            time.sleep(0.2)
        assert pid_in(first) is not None, "the first run never started"
        protocol.send_signal(signum)
        assert protocol.wait(timeout=30) == 128 + signum  # 143 for SIGTERM, 130 for Ctrl-C
        time.sleep(1)
        assert sorted(p.parent.name for p in out.glob("cell/*/started")) == ["split0-init0"]
        assert sorted(p.parent.name for p in out.glob("cell/*/log.txt")) == ["split0-init0"]  # queued logs untouched
        assert not alive(pid_in(first))
    finally:
        if protocol.poll() is None:
            os.killpg(protocol.pid, signal.SIGKILL)  # the protocol and the runs it started (its session)
            protocol.wait()
        for pid in filter(alive, map(pid_in, out.glob("cell/*/started"))):
            os.kill(pid, signal.SIGKILL)


def test_a_stop_is_over_once_its_context_is_left(tmp_path, monkeypatch):
    # a Ctrl-C in a notebook or a test session refused every later run of the process until it restarted
    from nola_vision.runs import executors

    monkeypatch.setattr(executors, "_STOPPING", threading.Event())  # this test's stop state, whatever it leaves
    monkeypatch.setattr(executors, "_RUNNING", set())
    run = [sys.executable, "-c", "pass"]
    with executors.stop_runs_on_signals():
        with pytest.raises(SystemExit, match="130"):
            executors._stop(signal.SIGINT, None)  # what the handler does on Ctrl-C, without sending one
        assert executors.stopping()
        with pytest.raises(executors.Stopped):
            executors.call(run, str(tmp_path / "refused.log"))
    assert not executors.stopping()
    assert executors.call(run, str(tmp_path / "after.log"))[0] == 0


def test_a_stop_while_the_fit_arguments_are_checked_ends_the_command_rather_than_refusing_the_arguments(monkeypatch):
    # a Ctrl-C during tune's checks (10-20 s for a grid) was reported as "--grid ... is not accepted", exit 2
    from nola_vision.runs import executors
    from nola_vision.train.cli import argument_error, cli_parser

    monkeypatch.setattr(executors, "_STOPPING", threading.Event())
    monkeypatch.setattr(executors, "_RUNNING", set())
    parser = cli_parser()
    parse = type(parser).parse_args

    def stopped_while_parsing(self, *args, **kwargs):
        executors._stop(signal.SIGINT, None)  # what the handler does on Ctrl-C, without sending one

    with executors.stop_runs_on_signals():
        monkeypatch.setattr(type(parser), "parse_args", stopped_while_parsing)
        with pytest.raises(SystemExit, match="130"):
            argument_error(parser, ["fit", "--model.lr", "0.01"])
        monkeypatch.setattr(type(parser), "parse_args", parse)
    assert "model.lr" in argument_error(parser, ["fit", "--model.lr", "fast"])  # an argument error is still reported


def test_a_stop_gives_the_fits_it_terminates_one_grace_period_together(monkeypatch):
    # each fit had 30 s in turn: four that ignore SIGTERM held the handler 2 minutes, past SLURM's KillWait (30 s)
    from nola_vision.runs import executors

    class Stubborn:
        """A fit that ignores SIGTERM: it exits only when killed."""

        def __init__(self):
            self.waited, self.killed = [], False

        def terminate(self):
            pass

        def wait(self, timeout):
            self.waited.append(timeout)
            time.sleep(min(timeout, 0.5))
            raise subprocess.TimeoutExpired("fit", timeout)

        def kill(self):
            self.killed = True

    fits = [Stubborn() for _ in range(4)]
    monkeypatch.setattr(executors, "_STOPPING", threading.Event())
    monkeypatch.setattr(executors, "_RUNNING", set(fits))
    monkeypatch.setattr(executors, "_STOP_GRACE_S", 0.3, raising=False)
    with pytest.raises(SystemExit, match="143"):
        executors._stop(signal.SIGTERM, None)
    assert all(fit.killed for fit in fits)
    assert sum(timeout for fit in fits for timeout in fit.waited) <= 0.3


@pytest.mark.parametrize("command", ["protocol", "tune"])
def test_protocol_and_tune_leave_the_signal_handlers_as_they_found_them(tmp_path, command):
    # a Ctrl-C in a notebook or a test session after the command would otherwise still stop its (finished) runs
    from nola_vision.cli import main

    signals = [getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name)]
    before = [signal.getsignal(signum) for signum in signals]
    assert main([command, "-c", str(tmp_path / "missing.yaml"), "--out", str(tmp_path)]) == 2  # refused, as fit's
    assert [signal.getsignal(signum) for signum in signals] == before


def test_the_slurm_executor_without_submitit_says_how_to_install_it(monkeypatch):
    from nola_vision.runs.executors import SubmititExecutor

    monkeypatch.setitem(sys.modules, "submitit", None)  # what an environment without it gives: an ImportError
    with pytest.raises(ValueError, match=r"--executor slurm runs the fits through submitit, which is not installed: "
                                         r"pip install 'nola_vision\[slurm\]'"):
        SubmititExecutor("unused", cluster="slurm")


def test_the_slurm_executor_on_a_machine_without_slurm_is_refused_before_any_run(tmp_path):
    # submitit's RuntimeError ("Could not detect srun") exited 1, as a failed run does, not 2
    pytest.importorskip("submitit")
    import shutil

    from nola_vision.runs.executors import SubmititExecutor

    if shutil.which("srun"):
        pytest.skip("this machine has SLURM")
    with pytest.raises(ValueError, match=r"--executor slurm submits the fits to SLURM, which this machine has not "
                                         r"\(.*srun.*\): run the command on a SLURM login node"):
        SubmititExecutor(str(tmp_path / "submitit"), cluster="slurm")


@pytest.mark.parametrize("setting, option", [(dict(jobs=-3), "--jobs must be at least 1, got -3"),
                                             (dict(time_min=0), "--slurm_time must be at least 1, got 0"),
                                             (dict(cpus_per_task=0), "--slurm_cpus_per_task must be at least 1"),
                                             (dict(gpus_per_node=-1), "--slurm_gpus_per_node must be at least 0")])
def test_submitit_settings_no_job_can_run_with_are_refused_before_any_run(tmp_path, setting, option):
    # Accepted, every run then failed with "exit -1 ... re-run to retry", which failed the same way each time.
    pytest.importorskip("submitit")
    from nola_vision.runs.executors import SubmititExecutor

    with pytest.raises(ValueError, match=option):
        SubmititExecutor(str(tmp_path / "submitit"), cluster="local", **setting)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads running processes from /proc")
@pytest.mark.parametrize("sigint", ["taken", "ignored"])
def test_a_submitit_batch_left_early_cancels_its_jobs_and_their_runs(tmp_path, sigint, request):
    # its jobs went on running, and on SLURM queued array tasks started after the protocol had stopped; locally with
    # SIGINT ignored (nohup, `cmd &` in a script), submitit's SIGINT to its jobs was ignored by them too
    from nola_vision.runs.executors import Run, SubmititExecutor

    if sigint == "ignored":
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))

    pid_file = tmp_path / "pid"
    sleep = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60)"
    runs = [Run((sys.executable, "-c", "pass"), tmp_path / "quick.log"),
            Run((sys.executable, "-c", sleep, str(pid_file)), tmp_path / "sleep.log")]
    executor = SubmititExecutor(str(tmp_path / "submitit"), cluster="local", jobs=2, gpus_per_node=0, poll_s=0.2)
    batch = executor.run(runs)
    try:
        assert next(batch)[0] == runs[0]
        deadline = time.time() + 60
        while pid_in(pid_file) is None and time.time() < deadline:
            time.sleep(0.2)
        assert pid_in(pid_file) is not None, "the run never started"
        batch.close()  # the caller stops reading: stopped by a signal, or an error
        deadline = time.time() + 30
        while alive(pid_in(pid_file)) and time.time() < deadline:
            time.sleep(0.2)
        assert not alive(pid_in(pid_file))
    finally:
        if pid_in(pid_file) is not None and alive(pid_in(pid_file)):
            os.kill(pid_in(pid_file), signal.SIGKILL)


TUNE_OF_SLEEPERS = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as at a terminal (a test session may ignore it)
from nola_vision.runs import tune
tune.run_tune.__kwdefaults__["python"] = sys.argv[1]
sys.exit(tune.main(sys.argv[2:]))
"""


def sleeping_search(tmp_path, out, grid: str) -> list:
    """The command line of a tune search over ``grid`` (one split and init seed) whose fits sleep (``sleeper``)."""
    return [sys.executable, "-c", TUNE_OF_SLEEPERS, sleeper(tmp_path), "-c", TINY, "--out", str(out), "--name", "t",
            "--grid", grid, "--split_seeds", "0", "--init_seeds", "0", "--skip_protocol", "--data.val_shots", "2"]


def started_fits(out, search, timeout: float = 60) -> list:
    """The marks of the trial fits started under ``out``, once there is one (or ``search`` ended, or ``timeout``)."""
    deadline = time.time() + timeout
    while not list(out.glob("t/tune/*/*/started")) and time.time() < deadline and search.poll() is None:
        time.sleep(0.2)
    return list(out.glob("t/tune/*/*/started"))


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads running processes from /proc")
def test_a_trial_stopped_by_ctrl_c_is_released_for_the_next_run_not_recorded_as_failed(tmp_path):
    # the fits Ctrl-C stopped failed the trial: its table said FAIL with "exit code -15", as if its values had failed
    import optuna

    out = tmp_path / "out"
    command = sleeping_search(tmp_path, out, "model.lr=1e-3,1e-2")
    search = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        (started,) = started_fits(out, search)
        while pid_in(started) is None:
            time.sleep(0.1)
        search.send_signal(signal.SIGINT)
        assert search.wait(timeout=30) == 128 + signal.SIGINT
        assert not alive(pid_in(started))
    finally:
        if search.poll() is None:
            os.killpg(search.pid, signal.SIGKILL)
            search.wait()
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{out / 't' / 'tune.db'}")
    # released: the next run of the command takes its point up again; failed in the study, as Optuna's samplers
    # ignore failed trials (TPE learns from pruned ones)
    (trial,) = study.get_trials(deepcopy=False)
    assert trial.state.name == "FAIL" and "stopped with the command" in trial.user_attrs["released"]


def test_a_fit_the_terminals_ctrl_c_ended_first_is_released_not_failed(tmp_path):
    # the fit exited 130 before the search's own handler had run: its trial was recorded FAILED (exit 130)
    import optuna

    fit = tmp_path / "interrupted_fit"
    fit.write_text(f"""#!{sys.executable}
import os, subprocess, sys
subprocess.Popen(["sh", "-c", "sleep 0.5; kill -INT {{}}".format(os.getppid())], start_new_session=True)
sys.exit(130)  # as a fit stopped by Ctrl-C exits, before the signal reaches the search
""")
    fit.chmod(0o755)
    out = tmp_path / "out"
    command = [sys.executable, "-c", TUNE_OF_SLEEPERS, str(fit), "-c", TINY, "--out", str(out), "--name", "t",
               "--grid", "model.lr=1e-3", "--split_seeds", "0", "--init_seeds", "0", "--skip_protocol",
               "--data.val_shots", "2"]
    assert subprocess.run(command, capture_output=True, timeout=120).returncode == 128 + signal.SIGINT
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{out / 't' / 'tune.db'}")
    (trial,) = study.get_trials(deepcopy=False)
    assert trial.state.name == "FAIL" and "released" in trial.user_attrs and "error" not in trial.user_attrs


def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (its /proc status's SigCgt mask)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next((line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), "0")
    return bool(int(mask, 16) >> (signum - 1) & 1)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads running processes from /proc")
def test_a_worker_waiting_on_another_workers_last_trial_stops_at_once(tmp_path):
    # It slept and looked again until the other worker's trial ended (hours for a real fit; SLURM kills 30 s after
    # the stop), ignoring the SIGTERM it had been sent.
    out = tmp_path / "out"
    command = sleeping_search(tmp_path, out, "model.lr=1e-3")
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    second = None
    try:
        assert started_fits(out, first), "the first worker's fit never started"
        second = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  start_new_session=True)
        deadline = time.time() + 90  # its SIGTERM handler installed (imports take long on a loaded machine) ...
        while not _catches(second.pid, signal.SIGTERM) and time.time() < deadline and second.poll() is None:
            time.sleep(0.2)
        time.sleep(5)  # ... then it found the only point running elsewhere, and waits on it
        assert second.poll() is None
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=15) == 128 + signal.SIGTERM
        assert len(list(out.glob("t/tune/*/*/started"))) == 1  # it started no fit
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for pid in filter(alive, map(pid_in, out.glob("t/tune/*/*/started"))):
            os.kill(pid, signal.SIGKILL)


def test_a_fit_on_a_console_that_cannot_show_the_rich_bar_finishes_and_writes_its_result(tmp_path):
    # Lightning's default bar where rich is installed failed at the end of the fit on a Latin-1 or ASCII console:
    # "'ascii' codec can't encode character '\u2022'", after the export, and the test pass and the result were lost
    pytest.importorskip("rich")
    result = tmp_path / "result.json"
    done = subprocess.run([sys.executable, "-m", "nola_vision.cli", "fit", "-c", TINY, "--trainer.max_epochs", "1",
                           "--trainer.default_root_dir", str(tmp_path), "--result_file", str(result)],
                          capture_output=True, timeout=300, env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert json.loads(result.read_text())["metrics"]["test/acc"] >= 0
