"""The protocol runner: seeds grid in separate runs, skip-on-restart, atomic results, tables, k-NN baseline."""
import csv
import json
from pathlib import Path

import pytest
import torch

from nola_vision.protocol import collect_results, knn_predict, main, run_protocol, summarise, write_tables

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_offline.yaml")
FAST = ["--trainer.max_epochs", "1", "--data.shots", "2"]


def test_protocol_runs_the_grid_writes_tables_and_skips_finished_runs(tmp_path, capsys):
    out = tmp_path / "out"
    rows = run_protocol([TINY], str(out), "tiny", split_seeds=[0, 1], init_seeds=[0], overrides=FAST, knn=True)
    assert sorted((r["name"], r["split_seed"]) for r in rows) == [("tiny", 0), ("tiny", 1), ("tiny-knn", 0), ("tiny-knn", 1)]
    table = list(csv.DictReader((out / "results.csv").open()))
    assert len(table) == 4 and {r["adapter_params"] for r in table if r["name"] == "tiny"} == {"512"}
    assert (out / "tiny" / "split1-init0" / "digits_2shot_seed1_train.txt").is_file()  # the run's manifest
    md = (out / "results.md").read_text()
    accs = [100 * float(r["test_acc"]) for r in table if r["name"] == "tiny"]
    mean, std = sum(accs) / 2, abs(accs[0] - accs[1]) / 2  # population std of two values
    assert f"| tiny | nola | vit_tiny_patch16_224 | digits | 2 | 512 | 650 | 2 | {mean:.1f} ({std:.1f}) |" in md
    assert "| tiny-knn | knn (k=1) |" in md
    capsys.readouterr()
    # a restart skips finished runs (their results are untouched)
    before = (out / "tiny" / "split0-init0" / "result.json").stat().st_mtime_ns
    assert main(["-c", TINY, "--out", str(out), "--name", "tiny", "--split_seeds", "0", "1", "--init_seeds", "0",
                 *FAST]) == 0
    assert capsys.readouterr().out.count("done already, skipped") == 2
    assert (out / "tiny" / "split0-init0" / "result.json").stat().st_mtime_ns == before


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
    rows = write_tables(str(out))
    assert [r["run_dir"] for r in rows] == [str(done)]
    assert summarise(rows)[0]["runs"] == 1


def test_failed_runs_are_reported_and_not_counted(tmp_path):
    with pytest.raises(RuntimeError, match="runs failed"):
        run_protocol([TINY], str(tmp_path), "bad", split_seeds=[0], init_seeds=[0],
                     overrides=[*FAST, "--data.shots", "500"], echo=False)
    assert collect_results(str(tmp_path)) == []
    assert "allow_fewer" in (tmp_path / "bad" / "split0-init0" / "log.txt").read_text()


def test_knn_votes_by_cosine_similarity():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 1.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    test = torch.tensor([[10.0, 1.0], [0.05, 1.0], [0.2, 1.0]])
    assert knn_predict(train, labels, test, k=1).tolist() == [0, 1, 2]
    # k=3: two neighbours of class 1 outvote the single nearest one of class 2
    assert knn_predict(train, labels, test[2:], k=3).tolist() == [1]
    # a 1-1 tie is broken by similarity
    assert knn_predict(train[2:4], torch.tensor([1, 2]), torch.tensor([[0.0, 1.0]]), k=2, num_classes=3).tolist() == [1]
