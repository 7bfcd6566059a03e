"""Both notebooks execute offline, top to bottom, with tiny settings."""
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from nola_vision.protocol import run_protocol

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_offline.yaml")


def execute(name: str, tmp_path: Path, **env: str) -> nbformat.NotebookNode:
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    old = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return notebook


def outputs(notebook: nbformat.NotebookNode) -> str:
    texts = []
    for cell in notebook.cells:
        for out in cell.get("outputs", []):
            texts.append(out.get("text", "") or out.get("data", {}).get("text/plain", ""))
    return "\n".join(texts)


def test_quickstart_notebook_runs_offline(tmp_path):
    text = outputs(execute("01_quickstart.ipynb", tmp_path, NOLA_VISION_TINY="1"))
    assert "'adapter': 8192" in text and "4-bit adapter" in text and "max |merged - unmerged|" in text


def test_protocol_results_notebook_plots_a_real_protocol_csv(tmp_path):
    out = tmp_path / "protocol"
    fast = ["--trainer.max_epochs", "1", "--data.shots", "2"]
    run_protocol([TINY], str(out), "tiny-nola", split_seeds=[0], init_seeds=[0, 1], overrides=fast)
    run_protocol([TINY], str(out), "tiny-linear", split_seeds=[0], init_seeds=[0], overrides=fast + ["--model.adapter", "linear"])
    text = outputs(execute("02_protocol_results.ipynb", tmp_path, NOLA_VISION_RESULTS=str(out / "results.csv")))
    assert "3 runs from" in text and "tiny-nola" in text and "tiny-linear" in text
    assert (out / "accuracy_vs_params.png").stat().st_size > 10_000
