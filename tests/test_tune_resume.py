"""Resuming a search: TPE draws on as one uninterrupted search would (so does another worker of the study), and
the same config files named by another path resume the study."""
import json
import shutil
import sqlite3
import sys
from pathlib import Path

import pytest

from nola_vision.runs.protocol import run_protocol
from nola_vision.runs.tune import run_tune

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_offline.yaml")
GRID = {"model.lr": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2], "model.head_lr": [1e-3, 1e-2, 1e-1]}
FAST = ["--trainer.max_epochs", "1", "--data.shots", "2", "--data.val_shots", "2"]


def scored_fit(tmp_path, fail_call=None):
    """A stand-in for `nola-vision fit` whose validation accuracy is a fixed function of the grid point; with
    ``fail_call``, its fit of that number (counted from 1 over the script's life) exits 1 without a result."""
    script = tmp_path / "fake_python"
    calls = tmp_path / "fake_python_calls"
    script.write_text(f"""#!{sys.executable}
import hashlib, json, sys
from pathlib import Path
calls = Path({str(calls)!r})
calls.write_text(str(int(calls.read_text() if calls.exists() else 0) + 1))
if int(calls.read_text()) == {fail_call!r}:
    sys.exit(1)
args = sys.argv[1:]
value = lambda flag, default=None: args[len(args) - args[::-1].index(flag)] if flag in args else default
point = f"{{float(value('--model.lr', '0.03'))}}|{{float(value('--model.head_lr', '0.01'))}}"
acc = int(hashlib.sha256(point.encode()).hexdigest()[:8], 16) / 2 ** 32
metrics = {{"val/acc": acc, **({{}} if value("--test_after_fit") == "false" else {{"test/acc": acc}})}}
json.dump({{"metrics": metrics, "config": {{"method": "fake", "split_seed": int(value("--data.split_seed")),
           "seed": int(value("--seed_everything"))}}, "parameter_counts": {{"adapter": 8, "head": 2}}}},
          open(value("--result_file"), "w"))
""")
    script.chmod(0o755)
    return str(script)


def points(out, state=None):
    """The grid point of each trial of the study (of those in ``state`` only, where given), in trial order."""
    with sqlite3.connect(Path(out) / "t" / "tune.db") as db:
        rows = db.execute("select t.number, p.param_name, p.param_value, t.state from trials t join trial_params p "
                          "on p.trial_id = t.trial_id order by t.number, p.param_name").fetchall()
    trials = {}
    for number, name, value, in_state in rows:
        if state is None or in_state == state:
            trials.setdefault(number, []).append((name, value))
    return [tuple(trials[number]) for number in sorted(trials)]


def test_a_resumed_tpe_search_goes_on_drawing_as_the_uninterrupted_one_did(tmp_path):
    """A search resumed in a new process drew its first points again (a sampler seeded once per process), used its
    budget on them and could choose another recipe than the uninterrupted search."""
    search = dict(grid=GRID, name="t", sampler="tpe", skip_protocol=True, overrides=FAST,
                  python=scored_fit(tmp_path), echo=False)
    whole = run_tune([TINY], out=str(tmp_path / "whole"), n_trials=6, **search)
    run_tune([TINY], out=str(tmp_path / "resumed"), n_trials=3, **search)  # stopped after its third trial
    resumed = run_tune([TINY], out=str(tmp_path / "resumed"), n_trials=6, **search)
    drawn = points(tmp_path / "whole")
    assert len(drawn) == 6 and drawn[3:] != drawn[:3]
    assert points(tmp_path / "resumed") == drawn
    assert resumed["params"] == whole["params"]


@pytest.mark.parametrize("n_trials, fail_call", [
    (6, 4),  # the fourth draw
    (4, 1),  # the first draw, whose point the second draws again: a retry by point found it held and dropped it
    (14, 10),  # past TPE's 10 random draws: draws after a failure in the same run learnt without its result
])
def test_a_tpe_point_whose_trial_failed_is_run_again_in_its_draws_place(tmp_path, n_trials, fail_call):
    # the next run drew new points instead: the failed (or Ctrl-C-stopped, or killed) trial's point was never run,
    # and the resumed search completed other points than the uninterrupted one and could choose another recipe
    search = dict(grid=GRID, name="t", sampler="tpe", skip_protocol=True, overrides=FAST, echo=False,
                  n_trials=n_trials)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    whole = run_tune([TINY], out=str(tmp_path / "whole"), python=scored_fit(tmp_path / "a"), **search)
    failing = scored_fit(tmp_path / "b", fail_call=fail_call)
    with pytest.raises(RuntimeError, match=r"1 trial\(s\) failed in this run|no trial completed \(1 failed"):
        run_tune([TINY], out=str(tmp_path / "resumed"), python=failing, **search)
    resumed = run_tune([TINY], out=str(tmp_path / "resumed"), python=failing, **search)
    completed = points(tmp_path / "whole", "COMPLETE")
    assert len(completed) == n_trials and sorted(points(tmp_path / "resumed", "COMPLETE")) == sorted(completed)
    assert resumed["params"] == whole["params"]


def test_the_same_config_named_by_another_path_resumes_the_study(tmp_path, monkeypatch):
    """Re-run as `-c ./cfgs/tiny.yaml` (or by its absolute path, from a script), a search begun as `-c cfgs/tiny.yaml`
    was refused as made with other settings, though the files are the same (protocol compares their content)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfgs").mkdir()
    shutil.copy(TINY, tmp_path / "cfgs" / "tiny.yaml")
    search = dict(grid={"model.lr": [1e-4, 1e-3], "model.head_lr": [1e-2]}, out="out", name="t", skip_protocol=True,
                  overrides=FAST, python=scored_fit(tmp_path), echo=False)
    first = run_tune(["cfgs/tiny.yaml"], n_trials=1, **search)
    assert first is None  # one grid point left
    chosen = run_tune([str(tmp_path / "cfgs" / "tiny.yaml")], **search)
    assert chosen is not None and len(points("out")) == 2
    assert run_tune(["./cfgs/tiny.yaml"], **search)["params"] == chosen["params"]


def test_a_protocol_row_no_choice_of_the_search_fits_is_refused_before_the_first_trial(tmp_path):
    """`tune --name r` over a row `protocol --name r` made with other settings ran every trial, then refused the
    choice (saying that best.json, never written, still named an earlier one)."""
    fit = scored_fit(tmp_path)
    grid = {"model.lr": [1e-4, 1e-3], "model.head_lr": [1e-2]}
    run_protocol([TINY], out=str(tmp_path / "out"), name="r", split_seeds=[0], init_seeds=[0], python=fit, echo=False,
                 overrides=[*FAST, "--model.lr", "0.03"])
    with pytest.raises(ValueError, match=r"holds a protocol row made with settings that no choice of this search "
                                         r"gives .*--skip_protocol to search only \(nothing was run\)"):
        run_tune([TINY], grid=grid, out=str(tmp_path / "out"), name="r", overrides=FAST, python=fit, echo=False)
    assert not (tmp_path / "out" / "r" / "tune").exists()
    # a row of the grid's choice (its values spelled otherwise) is the protocol of that choice
    run_protocol([TINY], out=str(tmp_path / "out"), name="s", split_seeds=[0], init_seeds=[0], python=fit, echo=False,
                 overrides=[*FAST, "--model.lr", "0.0001", "--model.head_lr", "0.010"])
    chosen = run_tune([TINY], grid={**grid, "model.lr": [1e-4]}, out=str(tmp_path / "out"), name="s", overrides=FAST,
                      python=fit, echo=False, protocol_split_seeds=[0], protocol_init_seeds=[0])
    assert chosen is not None and (tmp_path / "out" / "s" / "tune").is_dir()


def rank_scored_fit(tmp_path):
    """A stand-in for `nola-vision fit` scoring the adapter file it is given by the rank it holds (rank/10), and
    counting its calls."""
    script = tmp_path / "rank_fit"
    script.write_text(f"""#!{sys.executable}
import json, re, sys
from pathlib import Path
calls = Path({str(tmp_path / 'calls')!r})
calls.write_text(str(int(calls.read_text() if calls.exists() else 0) + 1))
args = sys.argv[1:]
value = lambda flag: args[len(args) - args[::-1].index(flag)]
acc = int(re.search(r"rank: (\\d+)", Path(value("--model.adapter")).read_text()).group(1)) / 10
json.dump({{"metrics": {{"val/acc": acc}}, "config": {{"method": "fake", "split_seed": int(value("--data.split_seed")),
           "seed": int(value("--seed_everything"))}}, "parameter_counts": {{"adapter": 8, "head": 2}}}},
          open(value("--result_file"), "w"))
""")
    script.chmod(0o755)
    return str(script)


def test_a_grid_value_naming_a_file_counts_by_the_files_content(tmp_path, monkeypatch):
    """`--grid model.adapter=a.yaml,b.yaml` was keyed by the paths: after a.yaml was edited, the same command reused
    the old trials' scores, chose a.yaml on them and ran the protocol with the new a.yaml."""
    monkeypatch.chdir(tmp_path)
    adapter = "class_path: nola_vision.NOLAConfig\ninit_args: {{rank: {}, num_basis_a: 64, num_basis_b: 64}}\n"
    Path("a.yaml").write_text(adapter.format(4))
    Path("b.yaml").write_text(adapter.format(2))
    search = dict(grid={"model.adapter": ["a.yaml", "b.yaml"]}, out="out", name="t", skip_protocol=True,
                  overrides=FAST, python=rank_scored_fit(tmp_path), echo=False)
    assert run_tune([TINY], **search)["params"] == {"model.adapter": "a.yaml"}
    Path("a.yaml").write_text(adapter.format(1))
    with pytest.raises(ValueError, match=r"made with other settings \(the content of files that grid values name "
                                         r"changed: model\.adapter=a\.yaml\)"):
        run_tune([TINY], **search)
    (tmp_path / "out" / "t" / "tune.db").unlink()  # the study deleted: b.yaml's fit counts, a.yaml's is made again
    assert run_tune([TINY], **search)["params"] == {"model.adapter": "b.yaml"}
    assert (tmp_path / "calls").read_text() == "3"


def test_a_trial_fit_resumed_by_hand_with_other_settings_is_refused_not_reused(tmp_path):
    # fit -c <trial run>/config.yaml --ckpt_path last --trainer.max_epochs 2 rewrote the result of a 1-epoch grid
    # point; once the study was deleted, the search took its val/acc for the point's
    from nola_vision.cli import main as nola_vision

    kw = dict(out=str(tmp_path / "out"), name="t", overrides=FAST, skip_protocol=True, echo=False)
    best = run_tune([TINY], {"model.lr": [1e-3]}, **kw)
    (run,) = (tmp_path / "out" / "t" / "tune").glob("trial-*/split0-init0")
    (tmp_path / "out" / "t" / "tune.db").unlink()
    assert run_tune([TINY], {"model.lr": [1e-3]}, **kw) == best  # its own fit's result (the command tune stamped)
    assert nola_vision(["fit", "-c", str(next(run.rglob("config.yaml"))), "--ckpt_path", "last",
                        "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false"]) == 0
    assert run_tune([TINY], {"model.lr": [1e-3]}, **kw) == best  # the study holds the point's score: never read
    (tmp_path / "out" / "t" / "tune.db").unlink()
    with pytest.raises(ValueError, match=r"split0-init0/result.json was written by another fit than the one tune "
                                         r"started .*Move that folder away"):
        run_tune([TINY], {"model.lr": [1e-3]}, **kw)
    shutil.move(run, tmp_path / "resumed")  # as the message says: the point's run is fitted again
    run_tune([TINY], {"model.lr": [1e-3]}, **kw)
    assert json.loads((run / "result.json").read_text())["epochs"] == 1
