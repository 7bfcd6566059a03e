"""tune and protocol bookkeeping (failed fits, claims, grid values, row keys) and verify_adapter's quantisation check,
with fake fits (tests/fake_fit.py) so that no test trains."""
import fcntl
import json
import os
import subprocess
import sys
import threading
import time
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
from fake_fit import fake_python
from tiny_models import as_if_trained, tiny_vit

import nola_vision as nv
from nola_vision.runs.executors import call, claimed_job
from nola_vision.runs.protocol import run_protocol
from nola_vision.runs.results import JOB_LOCK_FILE, RESULT_FILE, claim_unfinished_run, config_key, result_counts
from nola_vision.runs.tune import parse_grid, run_tune

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_offline.yaml")
VAL = ["--data.val_shots", "2"]


def counting_fit(tmp_path, fails_first: int) -> str:
    """A fake fit that appends a line to ``starts.txt`` when it starts, exits 1 for its first ``fails_first`` starts
    and then writes a val/acc result."""
    script = tmp_path / "counting_fit"
    starts = tmp_path / "starts.txt"
    script.write_text(f"""#!{sys.executable}
import json, sys
args = sys.argv[1:]
with open({str(starts)!r}, "a") as f:
    f.write(" ".join(args) + "\\n")
if len(open({str(starts)!r}).read().splitlines()) <= {fails_first}:
    sys.exit(1)
json.dump({{"metrics": {{"val/acc": 0.5}}}}, open(args[args.index("--result_file") + 1], "w"))
""")
    script.chmod(0o755)
    return str(script)


def starts(tmp_path) -> int:
    path = tmp_path / "starts.txt"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_tpe_stops_when_every_fit_fails_instead_of_starting_trials_without_end(tmp_path):
    # M1: the budget counted only complete and running trials, so failing fits started trial after trial; a failure
    # now ends the run's drawing (later draws learn from every result), and the next run retries it first
    python = counting_fit(tmp_path, fails_first=6)
    with pytest.raises(RuntimeError, match=r"no trial completed \(1 failed"):
        run_tune([TINY], {"model.lr": [1e-3, 2e-3]}, out=str(tmp_path / "out"), name="t", sampler="tpe", n_trials=2,
                 overrides=VAL, python=python, skip_protocol=True, echo=False)
    assert starts(tmp_path) == 1


def test_tpe_with_some_failed_trials_chooses_nothing_until_rerun(tmp_path):
    python = counting_fit(tmp_path, fails_first=1)
    kw = dict(out=str(tmp_path / "out"), name="t", sampler="tpe", n_trials=2, overrides=VAL, python=python,
              skip_protocol=True, echo=False)
    with pytest.raises(RuntimeError, match=r"no trial completed \(1 failed"):
        run_tune([TINY], {"model.lr": [1e-3, 2e-3]}, **kw)
    assert run_tune([TINY], {"model.lr": [1e-3, 2e-3]}, **kw)["val_acc"] == 0.5  # the rerun completes the budget


def test_a_fit_that_wrote_its_result_then_exited_non_zero_is_never_counted_on_a_retry(tmp_path):
    # M3: the retry counted the result.json of the failed fit
    python = fake_python(tmp_path, acc="0.9", code=1, metric="val/acc")
    kw = dict(out=str(tmp_path / "out"), name="t", overrides=VAL, python=python, skip_protocol=True, echo=False)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="failed"):
            run_tune([TINY], {"model.lr": [1e-3]}, **kw)
    (run_dir,) = (tmp_path / "out" / "t" / "tune").glob("trial-*/split0-init0")
    assert not (run_dir / "result.json").exists() and (run_dir / "result.json.failed").is_file()
    assert not (tmp_path / "out" / "t" / "best.json").exists()
    # protocol, through the same routine
    with pytest.raises(RuntimeError, match="exit 4"):
        run_protocol([TINY], out=str(tmp_path / "out"), name="r", split_seeds=[0], init_seeds=[0],
                     python=fake_python(tmp_path, code=4), echo=False)
    assert (tmp_path / "out" / "r" / "split0-init0" / "result.json.failed").is_file()
    assert not (tmp_path / "out" / "r" / "split0-init0" / "result.json").exists()


def tune_beside_a_claimed_fit(tmp_path, result=None):
    """A tune worker (a thread: its chosen point lands in the returned dict) started on a trial folder whose claim
    another process holds (its fit runs), after that fit wrote ``result`` if given; returns the run folder, the
    claim's descriptor, the thread and the dict."""
    kw = dict(out=str(tmp_path / "out"), name="t", overrides=VAL, skip_protocol=True, heartbeat_s=1)
    with pytest.raises(RuntimeError, match="failed"):
        run_tune([TINY], {"model.lr": [1e-3]}, python="/bin/false", echo=False, **kw)  # leaves the run folder
    (run_dir,) = (tmp_path / "out" / "t" / "tune").glob("trial-*/split0-init0")
    other = os.open(run_dir / ".claim", os.O_RDONLY | os.O_CREAT)  # the other process's fit holds the claim
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    if result is not None:
        (run_dir / "result.json").write_text(json.dumps(result))
    python = counting_fit(tmp_path, fails_first=0)
    chosen = {}
    worker = threading.Thread(target=lambda: chosen.update(run_tune([TINY], {"model.lr": [1e-3]}, python=python,
                                                                     echo=True, **kw)))
    worker.start()
    return run_dir, other, worker, chosen


def test_tune_waits_for_a_fit_another_process_runs_in_its_folder_and_never_starts_a_second(tmp_path, capsys):
    # M4: a restarted tune started a second fit beside the fit a killed worker had left running there
    run_dir, other, worker, chosen = tune_beside_a_claimed_fit(tmp_path)
    printed = ""
    deadline = time.monotonic() + 50
    while "runs in another process" not in printed and not starts(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.1)
        printed += capsys.readouterr().out
    assert not starts(tmp_path), "a second fit was started in the folder whose fit runs"
    assert f"{run_dir}: its fit runs in another process" in printed and "waiting for it to end" in printed
    (run_dir / "result.json").write_text(json.dumps({"metrics": {"val/acc": 0.75}}))  # the other fit ends
    os.close(other)
    worker.join(timeout=50)
    assert chosen["val_acc"] == 0.75 and not starts(tmp_path)


def test_tune_does_not_count_a_result_whose_fit_another_process_still_judges(tmp_path, capsys):
    # a trial on the point another trial's fit was running read that fit's result.json as soon as it was written and
    # counted it, although the fit then exited 1 (its own trial failed): the failed fit's score was chosen
    run_dir, other, worker, chosen = tune_beside_a_claimed_fit(tmp_path, {"metrics": {"val/acc": 0.9}})
    printed = ""
    deadline = time.monotonic() + 50
    while "waiting for it to end" not in printed and worker.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
        printed += capsys.readouterr().out
    assert worker.is_alive() and "waiting for it to end" in printed, "the result of a fit still running was counted"
    (run_dir / "result.json").replace(run_dir / "result.json.failed")  # that fit exits 1: its result never counts
    os.close(other)
    worker.join(timeout=50)
    assert chosen["val_acc"] == 0.5 and starts(tmp_path) == 1  # this trial ran the fit itself


def test_verify_adapter_refuses_what_load_adapter_refuses_on_a_quantisation_aware_model(tmp_path):
    # M5: verify accepted a 4-bit file for a model training quantisation-aware at 8 bits; load refused it
    config = nv.NOLAConfig(rank=2, num_basis_a=8, num_basis_b=8)
    saved = as_if_trained(nv.inject(tiny_vit(), config))
    nv.save_adapter(saved, tmp_path / "a4", bits=4)
    target = nv.set_quantization_aware(nv.inject(tiny_vit(), config), 8)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    for check in (nv.verify_adapter, nv.load_adapter):
        with pytest.raises(nv.AdapterLoadError, match="quantisation-aware at 8 bits .*4-bit adapter"):
            check(target, tmp_path / "a4")
    assert issubclass(nv.AdapterLoadError, ValueError)  # callers catching ValueError still catch it
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    nv.set_quantization_aware(target, 4)
    nv.verify_adapter(target, tmp_path / "a4")  # at the file's bits it fits


def test_a_list_valued_grid_value_is_one_value_and_an_unbalanced_one_is_refused():
    # M6: the value was split on its inner commas, each half run as a fit
    key = "model.adapter.init_args.targets"
    assert parse_grid([f"{key}=[mlp.fc1,mlp.fc2],[mlp.fc1]"]) == {key: ["[mlp.fc1,mlp.fc2]", "[mlp.fc1]"]}
    assert parse_grid(["model.x={a: 1, b: [2,3]},'c,d',it's"]) == {"model.x": ["{a: 1, b: [2,3]}", "'c,d'", "it's"]}
    assert parse_grid(["model.lr=1e-3,5e-3"]) == {"model.lr": [0.001, 0.005]}
    for bad, missing in ((f"{key}=[mlp.fc1,mlp.fc2", "']' is missing"), (f"{key}=mlp.fc1],[qkv]", "closes no"),
                         ("model.x='a,b", "is missing")):
        with pytest.raises(ValueError, match=rf"{missing}.*written whole, e\.g\. --grid"):
            parse_grid([bad])


def test_a_list_valued_grid_value_reaches_fit_whole(tmp_path):
    python = counting_fit(tmp_path, fails_first=0)
    grid = parse_grid(["model.adapter.init_args.targets=[mlp.fc1,mlp.fc2],[mlp.fc1]"])
    run_tune([TINY], grid, out=str(tmp_path / "out"), name="t", overrides=VAL, python=python, skip_protocol=True,
             echo=False)
    lines = (tmp_path / "starts.txt").read_text().splitlines()
    assert sorted(line.split("--model.adapter.init_args.targets ")[1].split()[0] for line in lines) == [
        "[mlp.fc1,mlp.fc2]", "[mlp.fc1]"]


def test_the_row_key_hashes_the_weights_file_fit_opens_from_the_working_directory(tmp_path, monkeypatch):
    # M2: a plain path in a config was looked up beside the config first, where fit never opens it
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "c.yaml").write_text("model: {pretrained_file: w.bin}\ndata: data.yaml\n")
    (tmp_path / "cfg" / "data.yaml").write_text("shots: 2\n")  # a group file: jsonargparse reads it from cfg/
    for folder in (tmp_path, tmp_path / "cfg"):
        (folder / "w.bin").write_bytes(b"\0weights")
    (tmp_path / "data.yaml").write_text("shots: 3\n")
    configs = [TINY, "cfg/c.yaml"]
    before = config_key(configs, [])
    assert set(before["files"]) == {"w.bin", "cfg/data.yaml"}
    (tmp_path / "w.bin").write_bytes(b"\0other weights")  # what fit loads changed
    assert config_key(configs, [])["config_hash"] != before["config_hash"]
    after = config_key(configs, [])
    (tmp_path / "cfg" / "w.bin").write_bytes(b"\0unused")  # files fit does not open do not count
    (tmp_path / "data.yaml").write_text("shots: 4\n")
    assert config_key(configs, [])["config_hash"] == after["config_hash"]
    (tmp_path / "cfg" / "data.yaml").write_text("shots: 5\n")
    assert config_key(configs, [])["config_hash"] != after["config_hash"]


def test_the_same_overrides_in_another_order_are_the_same_protocol_row(tmp_path):
    # M7: the overrides were hashed in the order given, and the refusal listed both lists whole
    python = fake_python(tmp_path)
    kw = dict(out=str(tmp_path / "out"), name="r", init_seeds=[0], python=python, echo=False)
    run_protocol([TINY], split_seeds=[0], overrides=["--trainer.max_epochs", "1", "--data.shots", "2"], **kw)
    recorded = json.loads((tmp_path / "out" / "r" / "config.json").read_text())
    run_protocol([TINY], split_seeds=[0, 1], overrides=["--data.shots=2", "--trainer.max_epochs", "1"], **kw)
    run_protocol([TINY], split_seeds=[2], overrides=["--data.shots", "5", "--trainer.max_epochs", "1",
                                                     "--data.shots", "2"], **kw)  # the last value counts
    results = [json.loads(p.read_text()) for p in (tmp_path / "out" / "r").glob("split*/result.json")]
    assert len(results) == 3 and {r["config_hash"] for r in results} == {recorded["config_hash"]}
    with pytest.raises(ValueError, match=r"overrides: --data\.shots=2 -> --data\.shots=3; \(not given\) -> "
                                         r"--model\.lr=1e-3; --trainer\.max_epochs=1 -> \(not given\)"):
        run_protocol([TINY], split_seeds=[3], overrides=["--model.lr", "1e-3", "--data.shots", "3"], **kw)


def test_a_run_folder_copied_from_a_row_with_other_settings_is_left_out_of_its_tables(tmp_path):
    """Rows that differ only in a setting the results do not record (the learning rate): a run folder copied from
    one into the other carries the other row's settings hash and is not averaged into it."""
    import shutil

    from nola_vision.runs.results import collect_results
    python = fake_python(tmp_path)
    kw = dict(out=str(tmp_path / "out"), init_seeds=[0], python=python, echo=False)
    for name, lr, split in (("a", "1e-3", 0), ("b", "2e-3", 1)):
        run_protocol([TINY], name=name, split_seeds=[split], overrides=["--model.lr", lr], **kw)
    shutil.copytree(tmp_path / "out" / "a" / "split0-init0", tmp_path / "out" / "b" / "split0-init0")
    with pytest.warns(UserWarning, match=r"b/split0-init0/result\.json was made with other settings .* a run folder "
                                         r"of another row, so it is left out"):
        rows = collect_results(str(tmp_path / "out"))
    assert sorted((r["name"], r["split_seed"]) for r in rows) == [("a", 0), ("b", 1)]
    shutil.rmtree(tmp_path / "out" / "b" / "split0-init0")  # as the warning says: redone with b's settings
    run_protocol([TINY], name="b", split_seeds=[0, 1], overrides=["--model.lr", "2e-3"], **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = collect_results(str(tmp_path / "out"))
    assert sorted((r["name"], r["split_seed"]) for r in rows) == [("a", 0), ("b", 0), ("b", 1)]


def test_overrides_whose_order_changes_what_fit_sets_stay_apart_and_the_refusal_says_so(tmp_path):
    python = fake_python(tmp_path)
    kw = dict(out=str(tmp_path / "out"), name="r", init_seeds=[0], python=python, echo=False)
    run_protocol([TINY], split_seeds=[0], overrides=["--data", "{shots: 2}", "--data.shots", "3"], **kw)
    with pytest.raises(ValueError, match=r"overrides in another order: .*fit's result depends on their order"):
        run_protocol([TINY], split_seeds=[1], overrides=["--data.shots", "3", "--data", "{shots: 2}"], **kw)


def test_a_tune_study_goes_on_with_its_overrides_in_another_order_reusing_its_fits(tmp_path):
    python = counting_fit(tmp_path, fails_first=0)
    kw = dict(out=str(tmp_path / "out"), name="t", python=python, skip_protocol=True, echo=False)
    run_tune([TINY], {"model.lr": [1e-3]}, overrides=[*VAL, "--data.shots", "2"], **kw)
    assert run_tune([TINY], {"model.lr": [1e-3]}, overrides=["--data.shots", "2", *VAL], **kw)["val_acc"] == 0.5
    run_tune([TINY], {"model.lr": [1e-3, 2e-3]}, overrides=["--data.shots", "2", *VAL], **{**kw, "name": "u"})
    assert starts(tmp_path) == 3  # one fit for t (reused by its rerun), two for u
    with pytest.raises(ValueError, match=r"other settings \(overrides: --data\.shots=2 -> --data\.shots=4\)"):
        run_tune([TINY], {"model.lr": [1e-3]}, overrides=["--data.shots", "4", *VAL], **kw)


def test_settings_file_options_come_from_fits_parser_or_a_table_of_the_same_options(monkeypatch):
    import jsonargparse._typehints

    from nola_vision.train import cli

    cli.settings_file_options.cache_clear()
    from_parser = cli.settings_file_options()
    assert {"config", "data", "model", "trainer", "model.adapter", "trainer.callbacks"} <= set(from_parser)
    assert from_parser["config"] == "" and from_parser["model.adapter"] == "model.adapter"
    # a jsonargparse without the internals it reads (before 4.51 it lacks is_subclass_container_typehint)
    monkeypatch.delattr(jsonargparse._typehints, "is_subclass_container_typehint")
    cli.settings_file_options.cache_clear()
    try:
        table = cli.settings_file_options()
    finally:
        cli.settings_file_options.cache_clear()
    assert table == {k: v for k, v in from_parser.items() if not k.endswith(".help")}


def test_overrides_that_append_or_load_a_config_keep_their_order_and_every_value():
    from nola_vision.runs.results import effective_overrides

    appended = ["--trainer.callbacks+=A", "--trainer.callbacks+=B"]
    assert effective_overrides(appended) == appended != effective_overrides(["--trainer.callbacks+=B"])
    assert effective_overrides(["--model.lr=0.1", "--config=x.yaml"]) != effective_overrides(
        ["--config=x.yaml", "--model.lr=0.1"])
    assert effective_overrides(["--model.lr=0.1", "--data.shots=2", "--model.lr=0.2"]) == effective_overrides(
        ["--data.shots=2", "--model.lr=0.2"]) == ["--data.shots=2", "--model.lr=0.2"]



def test_a_cluster_jobs_fit_holds_its_runs_job_lock_after_the_job_dies_so_a_rerun_starts_no_second_fit(tmp_path):
    """On SLURM a command's claim stays on its node: killed (kill -9), its jobs went on, and a re-run started each of
    their fits a second time in the same folder, retiring the live fit's config.yaml first."""
    run_dir, release = tmp_path / "run", tmp_path / "release"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("the live fit's settings")
    job = subprocess.Popen([sys.executable, "-c", "import sys; from nola_vision.runs.executors import claimed_job; "
                            "claimed_job(sys.argv[1:4], sys.argv[4], sys.argv[5])", sys.executable, "-c",
                            f"import os, time\nopen({str(tmp_path / 'started')!r}, 'w')\n"
                            f"while not os.path.exists({str(release)!r}):\n    time.sleep(0.05)\n"
                            f"open({str(tmp_path / 'ran')!r}, 'w')", str(tmp_path / "log.txt"),
                            str(run_dir / JOB_LOCK_FILE)], start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "started").exists():  # the fit runs (its log opens before it starts: a loaded
            assert time.monotonic() < deadline, "the job never started its fit"  # machine killed the job first)
            time.sleep(0.05)
        job.kill()  # the job dies; its fit goes on, holding the lock it inherited
        job.wait()
        assert claim_unfinished_run(run_dir) is None  # a re-run leaves the run to the live fit
        assert (run_dir / "config.yaml").exists()
    finally:
        release.touch()
        deadline = time.monotonic() + 30
        while not (tmp_path / "ran").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    time.sleep(0.2)  # the fit exits once it wrote its file
    claim = claim_unfinished_run(run_dir)  # the fit ended: its run can be claimed again
    assert claim is not None
    os.close(claim)


def test_a_job_a_killed_command_left_queued_waits_for_the_running_one_and_runs_no_fit_once_it_counts(tmp_path):
    """The re-run's job and a queued job of the killed command ran the same fit twice, one after the other."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    marker = tmp_path / "ran"
    fit = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    running = os.open(run_dir / JOB_LOCK_FILE, os.O_RDONLY | os.O_CREAT)  # the other job's fit runs
    fcntl.flock(running, fcntl.LOCK_EX)
    outcome = {}
    queued = threading.Thread(target=lambda: outcome.update(code=claimed_job(
        fit, str(tmp_path / "log.txt"), run_dir / JOB_LOCK_FILE, partial(result_counts, run_dir))))
    queued.start()
    time.sleep(0.5)
    assert queued.is_alive() and not marker.exists()  # waits for the lock, starts nothing
    (run_dir / RESULT_FILE).write_text(json.dumps({"metrics": {"test/acc": 0.5}}))  # the other fit ends
    os.close(running)
    queued.join(timeout=30)
    assert outcome["code"][0] == 0 and not marker.exists()
    (run_dir / RESULT_FILE).unlink()  # no counted result: the job runs the fit
    assert claimed_job(fit, str(tmp_path / "log.txt"), run_dir / JOB_LOCK_FILE,
                       partial(result_counts, run_dir))[0] == 0
    assert marker.exists()


def test_commands_rebuilding_one_outs_tables_take_turns_so_none_writes_a_stale_table(tmp_path, monkeypatch):
    # a command that read the results before another's run finished replaced the newer tables with its older ones
    from nola_vision.runs import results

    def finish(row: str, seed: int) -> None:
        run_dir = tmp_path / row / f"split{seed}-init0"
        run_dir.mkdir(parents=True)
        (run_dir / RESULT_FILE).write_text(json.dumps({
            "metrics": {"test/acc": 0.5}, "parameter_counts": {"adapter": 8, "head": 2},
            "config": {"method": "nola", "backbone": "vit", "dataset": "digits", "shots": 5, "split_seed": seed,
                       "seed": 0}}))

    finish("a", 0)
    collected, real = threading.Event(), results.collect_results

    def slow(out):  # the first command has read the results, and not yet written its tables
        rows = real(out)
        if threading.current_thread().name == "first":
            collected.set()
            time.sleep(1.0)
        return rows

    monkeypatch.setattr(results, "collect_results", slow)
    first = threading.Thread(target=results.write_tables, args=(str(tmp_path),), name="first")
    first.start()
    collected.wait(10)
    finish("b", 0)  # another command's run finishes, and that command rebuilds the tables
    results.write_tables(str(tmp_path))
    first.join(10)
    assert "| b | nola |" in (tmp_path / "results.md").read_text()
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 1 + 2


def test_a_study_of_that_name_that_tune_did_not_make_is_refused_not_adopted(tmp_path):
    # Adopted, its 4 trials counted as this grid's points: 0 fits ran, and a value it never fitted was "chosen".
    import optuna

    (tmp_path / "out" / "t").mkdir(parents=True)
    foreign = optuna.create_study(study_name="t", storage=f"sqlite:///{tmp_path}/out/t/tune.db", direction="maximize")
    for score in (0.99, 0.98):
        trial = foreign.ask()
        trial.suggest_float("dropout", 0, 1)
        foreign.tell(trial, score)
    python = counting_fit(tmp_path, fails_first=0)
    kw = dict(out=str(tmp_path / "out"), name="t", python=python, skip_protocol=True, echo=False)
    with pytest.raises(ValueError, match="study 't' in .* holds 2 trials that tune did not make"):
        run_tune([TINY], {"model.lr": [1e-3, 2e-3]}, overrides=VAL, **kw)
    assert starts(tmp_path) == 0
    assert run_tune([TINY], {"model.lr": [1e-3, 2e-3]}, overrides=VAL, **{**kw, "name": "u"})["val_acc"] == 0.5


def test_an_empty_study_whose_maker_died_before_recording_its_settings_is_taken_after_the_wait(tmp_path, monkeypatch):
    # a worker finding the study made by another waits for its settings: a maker killed before recording them leaves
    # an empty study, which is taken once the wait is over
    import optuna

    from nola_vision.runs import tune

    (tmp_path / "out" / "t").mkdir(parents=True)
    optuna.create_study(study_name="t", storage=f"sqlite:///{tmp_path}/out/t/tune.db", direction="maximize")
    monkeypatch.setattr(tune, "_CLAIM_WAIT_S", 0.5)
    kw = dict(out=str(tmp_path / "out"), name="t", python=counting_fit(tmp_path, fails_first=0), skip_protocol=True,
              echo=False)
    assert run_tune([TINY], {"model.lr": [1e-3, 2e-3]}, overrides=VAL, **kw)["val_acc"] == 0.5


def lr_scored_fit(tmp_path) -> str:
    """A fake fit whose accuracy is 100 × its learning rate: validation during selection, test in the protocol."""
    script = tmp_path / "lr_scored_fit"
    script.write_text(f"""#!{sys.executable}
import json, sys
args = sys.argv[1:]
value = lambda flag: args[len(args) - 1 - args[::-1].index(flag) + 1]
acc = float(value("--model.lr")) * 100
metric = "val/acc" if "--test_after_fit" in args and value("--test_after_fit") == "false" else "test/acc"
json.dump({{"metrics": {{metric: acc}}, "config": {{"method": "fake", "split_seed": int(value("--data.split_seed")),
           "seed": int(value("--seed_everything"))}}, "parameter_counts": {{"adapter": 8, "head": 2}}}},
          open(value("--result_file"), "w"))
""")
    script.chmod(0o755)
    return str(script)


def test_a_grown_tpe_study_whose_new_choice_its_protocol_row_refuses_leaves_best_as_it_was(tmp_path):
    # best.json and tune_results.md named the new value while results.md kept the row measured with the old one,
    # and the refusal said to delete the row's folder, which holds the study.
    kw = dict(out=str(tmp_path / "out"), name="t", overrides=VAL, python=lr_scored_fit(tmp_path), sampler="tpe",
              protocol_split_seeds=[0], protocol_init_seeds=[0], echo=False)
    grid = {"model.lr": [0.001, 0.002, 0.003, 0.004]}
    first = run_tune([TINY], grid, n_trials=1, **kw)["params"]["model.lr"]
    best = tmp_path / "out" / "t" / "best.json"
    before = best.read_text()
    with pytest.raises(ValueError, match=r"the search now chooses --model\.lr 0\.004 .* to redo it \(not .*t itself: "
                                         r"it holds the study too"):
        run_tune([TINY], grid, n_trials=8, **kw)
    assert first != 0.004 and best.read_text() == before
    table = (tmp_path / "out" / "t" / "tune_results.md").read_text()
    chosen = [line for line in table.splitlines() if "Chosen" in line]
    assert not any("0.004" in line for line in chosen)  # the trials table is rewritten; no choice names it


def test_a_finished_search_whose_unchanged_choice_its_row_refuses_says_so_without_a_new_choice(tmp_path, monkeypatch):
    # test images changed under a finished row: the refusal said "the search now chooses" the same values, and both
    # "delete <row> to redo this one" and "do not delete <row>"
    import nola_vision.runs.tune as tune

    kw = dict(out=str(tmp_path / "out"), name="t", overrides=VAL, python=lr_scored_fit(tmp_path),
              protocol_split_seeds=[0], protocol_init_seeds=[0], echo=False)
    grid = {"model.lr": [0.001, 0.002]}
    run_tune([TINY], grid, **kw)

    def refused(*args, redo, **kwargs):
        raise ValueError(f"<row> was made on other images; pass another --name, or {redo}")

    monkeypatch.setattr(tune, "open_row", refused)
    with pytest.raises(ValueError) as refusal:
        run_tune([TINY], grid, **kw)
    message = str(refusal.value)
    assert message.startswith("the protocol row of the search's choice, --model.lr 0.002 (trial #0), cannot take "
                              "more runs: <row> was made on other images")
    assert "now chooses" not in message and "to redo it (not " in message and "holds the study too" in message


def test_a_runs_wall_time_ignores_the_wall_clock_stepping_back(tmp_path, monkeypatch):
    # timed by time.time(): an NTP correction of an hour back while a fit ran recorded wall_s -3586 in its result
    real, calls = time.time, []

    def stepped_back():
        calls.append(1)
        return real() - 3600 * (len(calls) > 1)

    monkeypatch.setattr(time, "time", stepped_back)
    code, wall = call([sys.executable, "-c", "pass"], str(tmp_path / "log.txt"))
    assert code == 0 and 0 <= wall < 60
