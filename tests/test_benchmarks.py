"""Smoke tests: every benchmark script's ``main`` runs end to end on a tiny timm ViT, so the scripts cannot rot."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import accuracy  # noqa: E402
import collect_results  # noqa: E402
import inference  # noqa: E402
import storage  # noqa: E402
import train_step  # noqa: E402

TINY = "vit_tiny_patch16_224"
TINY_KWARGS = dict(depth=2)


def _check_outputs(out: str, tmp_path: Path) -> dict:
    assert "torch" in out and "| --- " not in out and "|---" in out  # header line and a Markdown table
    assert (tmp_path / "plot.png").stat().st_size > 0
    return json.loads((tmp_path / "raw.json").read_text())


def _files(tmp_path: Path) -> list:
    return ["--png", str(tmp_path / "plot.png"), "--json", str(tmp_path / "raw.json")]


@pytest.mark.parametrize("method", list(train_step.METHODS))
def test_train_step_worker_runs_every_method(method):
    args = train_step.parse_args(["--model", TINY, "--img-size", "32", "--batch", "2", "--steps", "1", "--warmup", "0",
                                  "--k", "32", "--blocks", "1"])
    args.method = method
    result = train_step.worker(args)
    assert result["step_s"] > 0 and result["trainable"] > 0


def test_train_step_main_measures_in_subprocesses(tmp_path, capsys):
    train_step.main(["--model", TINY, "--img-size", "32", "--batch", "2", "--steps", "1", "--warmup", "0", "--k", "32",
                     "--methods", "linear", "lora", "--rounds", "2", *_files(tmp_path)])
    data = _check_outputs(capsys.readouterr().out, tmp_path)
    assert [r["method"] for r in data["results"]] == ["linear", "lora"]
    assert all(len(r["step_s_rounds"]) == 2 and r["step_s"] == min(r["step_s_rounds"]) for r in data["results"])
    assert "best of 2 rounds" in data["setting"]


def test_best_round_keeps_the_fastest_time_and_the_highest_peak():
    rounds = [{"step_s": 2.0, "train_mem_mb": 10.0, "peak_mb": 50.0}, {"step_s": 1.5, "train_mem_mb": 11.0, "peak_mb": 49.0}]
    assert train_step.best_round(rounds) == {"step_s": 1.5, "train_mem_mb": 11.0, "peak_mb": 50.0, "step_s_rounds": [2.0, 1.5]}


def test_train_step_sweep_jobs_cover_shared_and_per_layer_bases():
    jobs = train_step.jobs(train_step.parse_args(["--sweep", "k", "--values", "256", "512"]))
    assert [(j["method"], j["k"]) for j in jobs] == [("lora", 1024), ("nola", 256), ("nola_per_layer", 256),
                                                     ("nola", 512), ("nola_per_layer", 512)]
    jobs = train_step.jobs(train_step.parse_args(["--sweep", "layers"]))
    assert sorted({j["blocks"] for j in jobs}) == [1, 3, 6, 9, 12]


@pytest.mark.slow
@pytest.mark.parametrize("sweep", ["k", "layers"])
def test_train_step_sweeps_run_and_plot(sweep, tmp_path, capsys):
    train_step.main(["--model", TINY, "--img-size", "32", "--batch", "2", "--steps", "1", "--warmup", "0", "--k", "16",
                     "--sweep", sweep, "--values", "16" if sweep == "k" else "1", *_files(tmp_path)])
    assert len(_check_outputs(capsys.readouterr().out, tmp_path)["results"]) == 3  # LoRA and both basis modes at one value


def test_storage_main(tmp_path, capsys):
    storage.main(["--models", TINY, *_files(tmp_path)], img_size=32, **TINY_KWARGS)
    results = _check_outputs(capsys.readouterr().out, tmp_path)
    size = {(r["row"], r["classes"]): r["bytes"] for r in results}
    assert size[(storage.ROWS[2][0], 10)] < size[(storage.ROWS[1][0], 10)] < size[(storage.ROWS[0][0], 10)]
    assert all(size[(name, 200)] > size[(name, 10)] for name, *_ in storage.ROWS)


def test_inference_main(tmp_path, capsys):
    inference.main(["--model", TINY, "--img-size", "32", "--batch", "2", "--rounds", "1", "--switches", "1", "--k", "32",
                    *_files(tmp_path)], **TINY_KWARGS)
    data = _check_outputs(capsys.readouterr().out, tmp_path)
    assert set(data["throughput_s"]) == set(inference.MODELS) and data["switch_max_logit_error"] < 1e-3


def test_accuracy_main(tmp_path, capsys):
    accuracy.main(["--backbone", TINY, "--image-size", "32", "--shots", "1", "--seeds", "0", "--epochs", "1",
                   "--test-limit", "20", "--methods", "linear", "lora_r1", "nola_1024", "qat4", *_files(tmp_path)],
                  **TINY_KWARGS)
    data = _check_outputs(capsys.readouterr().out, tmp_path)
    rows = data["runs"][0]["rows"]
    assert {"linear", "lora_r1", "nola_1024", "qat4", "nola_1024_ptq3"} <= set(rows)
    assert all(0.0 <= row["accuracy"] <= 100.0 for row in rows.values())


def _train_step_json(path: Path, lora: float, nola: float) -> None:
    rows = [{"method": m, "blocks": 0, "step_s": t, "step_s_rounds": [t, t + 0.2], "train_mem_mb": mem}
            for m, t, mem in (("lora", lora, 100.0), ("nola", nola, 105.0), ("nola_per_layer", 9.0, 120.0))]
    path.write_text(json.dumps({"setting": "", "results": rows}))


def test_collected_targets_are_computed_from_the_raw_results(tmp_path):
    _train_step_json(tmp_path / "train_step_vit_b.json", lora=2.0, nola=2.5)
    (tmp_path / "train_step_vit_b.md").write_text("_header_\n\n| a |\n|---|")
    (tmp_path / "inference.json").write_text(json.dumps({"throughput_s": {"base model": [1.0, 1.0], "NOLA merged": [1.01]},
                                                       "switch_s": {"in_place": [0.03, 0.04, 0.05]}}))
    report = collect_results.build(tmp_path)
    assert "| NOLA shared-basis step time ≤ 1.10× our LoRA r=4 (ViT-B/16) | 1.25× (rounds: 1.14–1.35×) | missed by 0.15× |" in report
    assert "| NOLA shared-basis training peak ≤ 1.10× LoRA (ViT-B/16) | 1.05× | met |" in report
    assert "| NOLA per-layer-basis training peak ≤ 1.15× LoRA (ViT-B/16) | 1.20× | missed by 0.05× |" in report
    assert "| merged NOLA inference ≥ 0.97× base images/s (ViT-B/16) | 0.990× | met |" in report
    assert "| task switch (load + in-place re-merge) < 50 ms (ViT-B/16) | 40.0 ms | met |" in report
    assert "## Training step, ViT-B/16\n" in report and "## Storage" not in report
    assert "Not run yet: `accuracy`, `gpu`, " in report
    readme = "intro\n<!-- results: train_step_vit_b -->\nold numbers\n<!-- /results -->\nrest\n"
    assert collect_results.sync_readme(readme, tmp_path) == (
        "intro\n<!-- results: train_step_vit_b -->\n\n_header_\n\n| a |\n|---|\n\n<!-- /results -->\nrest\n")


def test_results_report_and_readme_quotes_are_up_to_date_with_the_results():
    assert collect_results.main(["--check"]) == 0, "run: python benchmarks/collect_results.py"
