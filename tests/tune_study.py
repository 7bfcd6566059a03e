"""One real tiny `nola-vision tune` study, made once per test session (``tune_study`` in conftest.py) and checked by
several tests: the console script stopped after its first trial (``--n_trials 1``), then restarted with the same
command, which runs the remaining trial and the protocol, with every process's reads of the test split recorded by
a spy.

Its fits are the expensive part (a process each): the restart, choose-on-validation and notebook tests all read this
one study instead of making three.
"""
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_offline.yaml")
FAST = ["--trainer.max_epochs", "1", "--data.shots", "2", "--data.val_shots", "2"]
GRID = "model.lr=1e-4,2e-2"
# every Python process started with this on PYTHONPATH records each read of a test split, with its command line
SPY = """
import json, os, sys
import nola_vision.data.datamodule as dm
_build = dm.build_dataset
def build_dataset(name, root, split, *args, **kwargs):
    if split == "test":
        with open(os.environ["TEST_SPLIT_READS"], "a") as f:
            f.write(json.dumps(sys.argv) + "\\n")
    return _build(name, root, split, *args, **kwargs)
dm.build_dataset = build_dataset
"""


def tune_cmd(out, *extra):
    return [sys.executable, "-m", "nola_vision.cli", "tune", "-c", TINY, "--out", str(out), "--name", "t", *FAST,
            *extra]


def fits(root):
    """Every fit that ran under a tune folder: Lightning writes one version folder per run."""
    return sorted(str(p.parent.parent.relative_to(root)) for p in root.glob("t/tune/*/*/lightning_logs/version_*/"))


@dataclass
class TuneStudy:
    out: Path  # --out: the study is out/t, the protocol's tables out/results.*
    first: subprocess.CompletedProcess  # the console script stopped after one trial
    first_fits: List[str]  # fits() after it
    first_best: bool  # whether it wrote best.json
    restart: subprocess.CompletedProcess  # the console script that finished the search and ran the protocol
    test_reads: List[list]  # the command line of every process that read a test split, in order


def make_tune_study(folder: Path) -> TuneStudy:
    """Two learning rates, one fit each on validation, then a one-run protocol with the chosen one."""
    (folder / "spy").mkdir(parents=True)
    (folder / "spy" / "sitecustomize.py").write_text(SPY)
    reads = folder / "test_reads.jsonl"
    reads.touch()
    out = folder / "out"
    cmd = tune_cmd(out, "--grid", GRID, "--protocol_split_seeds", "0", "--protocol_init_seeds", "0")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder / "spy"), os.environ.get("PYTHONPATH", "")]),
           "TEST_SPLIT_READS": str(reads)}  # the console script and every fit it starts run with the spy
    first = subprocess.run([*cmd, "--n_trials", "1"], capture_output=True, text=True, env=env, timeout=900)
    first_fits, first_best = fits(out), (out / "t" / "best.json").exists()
    restart = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    readers = [json.loads(line) for line in reads.read_text().splitlines()]
    return TuneStudy(out, first, first_fits, first_best, restart, readers)
