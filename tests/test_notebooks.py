"""The notebooks execute offline, top to bottom, with tiny settings, and plot inline."""
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from nola_vision.runs.tune import run_tune

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TINY = str(ROOT / "configs" / "tiny_offline.yaml")
FAST = ["--trainer.max_epochs", "1", "--data.shots", "2", "--data.val_shots", "1"]
LORA = '{"class_path": "nola_vision.LoRAConfig", "init_args": {"rank": 2, "targets": ["attn.q", "attn.v"]}}'


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


def inline_images(notebook: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for cell in notebook.cells for out in cell.get("outputs", []))


def tiny_tune(out: Path, name: str, *overrides: str) -> None:
    """What `nola-vision tune` writes for a tiny study: two learning rates, then a one-run protocol."""
    run_tune([TINY], {"model.lr": [1e-3, 2e-2]}, out=str(out), name=name, overrides=[*FAST, *overrides],
             protocol_split_seeds=[0], protocol_init_seeds=[0], echo=False)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebooks_plot_inline_and_default_to_the_offline_backbone(path):
    sources = "\n".join(cell.source for cell in nbformat.read(path, as_version=4).cells)
    assert "matplotlib.use" not in sources and "Agg" not in sources
    if "NOLA_VISION_TINY" in sources:
        assert "OFFLINE_PRETRAINED_FILE" in sources and "vit_small_patch14_dinov2" in sources


def test_quickstart_notebook_runs_offline(tmp_path):
    notebook = execute("01_quickstart.ipynb", tmp_path, NOLA_VISION_TINY="1")
    text = outputs(notebook)
    assert "'adapter': 8192" in text and "test accuracy after 3 steps" in text
    assert "4-bit adapter" in text and "max |merged - unmerged|" in text
    assert inline_images(notebook) == 1  # the loss curve


def check_tune_notebook(tmp_path: Path, out: Path, studies: list) -> None:
    notebook = execute("02_protocol_results.ipynb", tmp_path, NOLA_VISION_RESULTS=str(out / "results.csv"))
    text = outputs(notebook)
    assert f"{len(studies)} runs from" in text and f"tune studies: {', '.join(studies)}" in text
    assert "model.lr" in text and "val acc %" in text and "COMPLETE" in text  # the trials DataFrame
    assert inline_images(notebook) == 2  # val acc against lr, test acc against parameters
    assert (out / "accuracy_vs_params.png").stat().st_size > 10_000


def test_protocol_results_notebook_shows_a_real_tune_study(tmp_path, tune_study):
    # the study `nola-vision tune` made for test_tune.py (see tune_study.py): two learning rates, a one-run protocol
    assert tune_study.restart.returncode == 0, tune_study.restart.stderr[-3000:]
    check_tune_notebook(tmp_path, tune_study.out, ["t"])


@pytest.mark.slow
def test_protocol_results_notebook_compares_the_tune_studies_of_two_methods(tmp_path):
    tiny_tune(tmp_path / "tune", "lora", "--model.adapter", LORA)
    tiny_tune(tmp_path / "tune", "nola")
    check_tune_notebook(tmp_path, tmp_path / "tune", ["lora", "nola"])


def protocol_results(tmp_path: Path, rows: list) -> Path:
    """A protocol's results.csv (as write_tables writes it) holding ``rows``, the other fields empty."""
    import csv

    from nola_vision.runs.results import CSV_FIELDS

    results = tmp_path / "protocol" / "results.csv"
    results.parent.mkdir()
    with open(results, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return results


def test_protocol_results_notebook_runs_on_results_without_a_tune_study(tmp_path):
    # without tune studies its trial cells raised (pd.concat of nothing, then NameError)
    results = protocol_results(tmp_path, [
        {"name": name, "method": method, "shots": 5, "test_acc": acc, "adapter_params": trainable, "head_params": 0,
         "trainable_params": trainable}
        for name, method, trainable, acc in (("nola", "nola", 100, 0.8), ("knn", "knn (k=1)", 0, 0.6))])
    text = outputs(execute("02_protocol_results.ipynb", tmp_path, NOLA_VISION_RESULTS=str(results)))
    assert "tune studies: none" in text and "no tune study under" in text


def test_protocol_results_notebook_never_averages_runs_of_different_settings(tmp_path):
    # it grouped by name and parameter counts only: two runs of one name on other backbones were averaged, where
    # results.md says "not averaged: mixed settings"
    results = protocol_results(tmp_path, [
        {"name": name, "method": name, "backbone": backbone, "shots": 5, "test_acc": acc, "adapter_params": 10,
         "head_params": 2, "trainable_params": 12}
        for name, backbone, acc in (("nola", "vit_a", 0.2), ("nola", "vit_b", 0.8), ("lora", "vit_a", 0.5),
                                    ("lora", "vit_a", 0.7))])
    notebook = execute("02_protocol_results.ipynb", tmp_path, NOLA_VISION_RESULTS=str(results))
    text = outputs(notebook)
    assert "backbone vit_a / vit_b" in text and "nola: not drawn, its runs differ in backbone vit_a / vit_b" in text
    assert "50.0" not in text  # the mean of the mixed runs
    assert "60.0" in text and "10.0" in text  # lora: mean 60, population std 10
    assert inline_images(notebook) == 1


def test_many_tasks_notebook_serves_a_mixed_batch_and_exports(tmp_path):
    # Opened from notebooks/ (Jupyter's start), it wrote runs/ there: untracked files in the repository (an 82 MB graph
    # with the real backbone), as .gitignore ignores only the root's runs/. It works from the repository root now.
    notebooks = tmp_path / "repo" / "notebooks"
    notebooks.mkdir(parents=True)
    (notebooks / "run_offline.py").write_text("")  # what tells the repository's notebooks folder
    text = outputs(execute("03_many_tasks.ipynb", notebooks, NOLA_VISION_TINY="1"))
    assert "max |mixed batch - each task's merged model|" in text and "five-or-more" in text
    assert "max |peft - nola_vision|" in text and "max |ONNX Runtime - PyTorch|" in text
    assert (tmp_path / "repo" / "runs" / "notebooks" / "many_tasks" / "digit.onnx").is_file()
    assert sorted(p.name for p in notebooks.iterdir()) == ["run_offline.py"]
