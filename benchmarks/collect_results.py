"""Assemble ``benchmarks/RESULTS.md`` (and the README's quotes) from what the scripts wrote into ``results/``.

Each section is a script's printed table exactly as written (its first line names date, machine and command),
with its plot; the targets and headline tables are computed from the raw JSON, so no number is typed by hand. The
README quotes a result between ``<!-- results: name -->`` and ``<!-- /results -->`` (``headline``: NOLA against
LoRA in four numbers); the documentation site fills the same markers when it is built (``docs/hooks/results.py``).

    python benchmarks/collect_results.py           # rewrite RESULTS.md and the README's quotes
    python benchmarks/collect_results.py --check   # exit 1 if either is not what the results give
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from accuracy import DATASETS as ACCURACY_DATASETS
from common import markdown_table, paired_quartiles

from nola_vision.core.storage import write_text_atomic

HERE = Path(__file__).resolve().parent

# (result name, title, how it was run): in the order of the report. A missing result is listed as not run.
SECTIONS: Tuple[Tuple[str, str, str], ...] = (
    ("nola_vs_lora_vit_b", "NOLA-MLP against LoRA q,v: training step, ViT-B/16, fp32",
     "The targets' table, 1 torch thread. Memory: each run in a fresh process, rounds in alternating order (its step "
     "times are slowed by the fixed allocator threshold that lets the process's RSS count every freed tensor). Time: "
     "the paired columns, every method in one process with glibc's default allocator, one step each per round in "
     "alternating order, the median of the per-round ratios with its quartiles. Training peak: the step's memory "
     "above what the warm-up step left, where NOLA's shared basis codes (60 MiB) count as step memory: by default a "
     "CPU training step holds them from its backward pass to the next forward pass, which releases them before the "
     "activations grow; \"codes held\" (`nv.set_basis_holding(model, True)`) keeps them and skips generating them. "
     "Kept across steps: what the warm-up left above the built model (about 30 MiB that every method's first step "
     "loads), so \"peak + kept\" is the process's memory peak above the built model."),
    ("nola_vs_lora_vit_l", "NOLA-MLP against LoRA q,v: training step, ViT-L/16, fp32", "As for ViT-B/16."),
    ("nola_vs_lora_bf16_vit_b", "NOLA-MLP against LoRA q,v: training step, ViT-B/16, bf16 autocast",
     "The same step under `torch.autocast(\"cpu\", dtype=torch.bfloat16)`. A frozen `nn.Linear` keeps autocast's "
     "bf16 copy of its weight from forward to backward; an adapted layer keeps none and casts the weight again in "
     "backward. NOLA adapts `fc1` and `fc2` (8 of a block's 12 weight matrices), LoRA only `qkv` (3), so in bf16 NOLA "
     "holds the least memory and pays the most re-casting: with the CPU's bf16 matrix units the casts are a few "
     "percent of a step. NOLA's fp32 work (combining the bases, generating their codes) weighs twice as much "
     "against a bf16 step as against an fp32 one; with the codes held, its peak still stays under LoRA's."),
    ("nola_vs_lora_bf16_vit_l", "NOLA-MLP against LoRA q,v: training step, ViT-L/16, bf16 autocast", "As for ViT-B/16."),
    ("profile_step", "Where the time and memory of a training step go: NOLA-MLP against LoRA q,v",
     "`torch.profiler` self CPU time per op (1 torch thread: on a shared machine other processes inflate the times, "
     "not the calls or FLOPs) and, tracked tensor by tensor, what is alive at the step's memory peak. NOLA's shared "
     "basis codes are listed beside it: held between steps, released by the forward pass before the activations "
     "grow, generated again in the backward pass once they are gone."),
    ("profile_step_bf16", "Where the time and memory of a training step go, bf16 autocast",
     "The same profile under `torch.autocast(\"cpu\", dtype=torch.bfloat16)`: the frozen products run on the CPU's "
     "bf16 matrix units, so the adapter's float32 and memory-bound work (combining and generating the bases, the "
     "low-rank additions, the activation recomputed in backward) weighs more against the step."),
    ("train_step_vit_b", "Training step, ViT-B/16", "2 torch threads on the otherwise idle machine."),
    ("train_step_vit_b_1thread", "Training step, ViT-B/16, 1 torch thread",
     "Run beside the accuracy benchmark, each on its own core."),
    ("train_step_vit_l", "Training step, ViT-L/16", "2 torch threads on the otherwise idle machine."),
    ("compile_step_vit_b", "Training step under torch.compile, ViT-B/16",
     "Eager and `torch.compile(model)` (inductor) side by side, 2 torch threads; the compiled step is timed after two "
     "warm-up steps that compile the model. A compiled backward cannot hand the basis codes to the next step, so a "
     "compiled CPU step generates them in forward and in backward."),
    ("compile_step_vit_l", "Training step under torch.compile, ViT-L/16", "As for ViT-B/16."),
    ("grad_ckpt_off_vit_b", "Gradient checkpointing, ViT-B/16: off", "Measured right before the run with it on."),
    ("grad_ckpt_on_vit_b", "Gradient checkpointing, ViT-B/16: on (`model.set_grad_checkpointing(True)`)",
     "timm's default (non-reentrant) checkpointing: the shared bases are still combined once per step for all layers, "
     "and the recomputed layers read the forward pass's factors."),
    ("sweep_k", "Scaling with the number of bases k = l (ViT-B/16)",
     "Shared bases are int16 codes held once per model (2 bytes × k × the factor shapes: 61 KB per basis index "
     "for ViT-B NOLA-MLP), generated once per CPU training step and never under its activations, so neither time "
     "nor memory grows with layers; per-layer bases are regenerated in forward and backward, so time grows with "
     "k × layers and memory stays flat. One round per point: "
     "step times carry this machine's ±10% noise."),
    ("sweep_layers", "Scaling with the number of adapted blocks (ViT-B/16, k = l = 1024)",
     "Blocks are adapted from the first, so backward always runs through the whole model. One round per point, "
     "as the k sweep."),
    ("inference", "Inference throughput and task switch, ViT-B/16", ""),
    ("compiled_switch", "Task switch of a torch.compile'd model, ViT-B/16",
     "`nv.load_adapter` on the compiled, unmerged model copies the trained tensors into its parameters in place; the "
     "compiled graphs stay valid, so no switch recompiles."),
    ("onnx_tasks", "One ONNX graph for every task, ViT-B/16 (ONNX Runtime, CPU)",
     "The task-input graph holds the frozen weights and the shared bases (float32) and takes the coefficients or "
     "LoRA factors and the head as inputs; the merged graph holds one task."),
    ("multitask", "Many tasks on one backbone: mixed-task batches, ViT-B/16",
     "Every image of a batch answered by its own task; resident memory measured in a fresh process."),
    ("storage", "Storage per task", ""),
    ("accuracy", "Accuracy on real offline data, learning rates chosen on validation",
     "Trials ran 2 at a time, 1 torch thread each; finished trials are reused from the cache (and stage 1's "
     "validation scores from results/study_lr_stage1.json), so this table comes from one command."),
    ("accuracy_study", "What NOLA needs: placement, init, k, scale and shared vs per-layer bases at the NOLA recipe "
     "(5-shot)", "Each variant at the NOLA recipe (lr 3e-2, head lr 1e-2, 2 warm-up epochs); the three placements "
     "train 49,152 coefficients each. The two budgets of 98,304 (k = l = 2048 on the MLP; k = l = 1024 on MLP + q, v) "
     "also train at lr 1e-2 and 2e-2, each at the point chosen on validation, as a larger step suits them less."),
    ("accuracy_transfer", "Does the recipe transfer? Fashion-MNIST, each method at its recipe and its neighbours (5-shot)",
     "The recipes were chosen on digits validation images; here each method's recipe competes, again on validation, "
     "with the points around it on a dataset the choice never saw (first 1,000 test images)."),
    ("gpu_train_step_vit_b", "GPU training step, ViT-B/16, bf16",
     "One process per method on the GPU the first line names. A step of this size was launch-bound on the H200 of 2026-12-04: "
     "`torch.profiler` gave our LoRA 10.6 ms of GPU work in a 40 ms step and peft's LoRA 11.5 ms in 22 ms "
     "(2026-12-04), so these ratios measure the host's Python and kernel-launch cost more than GPU work (see the "
     "host's cost tables below). The first run (2026-12-04) decoded NOLA's bases 32 at a time and recomputed fc2's "
     "activation in 2 MiB blocks, as on a CPU, and took 0.141 s a step (4.13× LoRA; per-layer bases 0.902 s, 26×); "
     "since then accelerators take 8M-value chunks and blocks (`bases_per_chunk`, `_block_rows`)."),
    ("gpu_train_step_vit_l", "GPU training step, ViT-L/16, bf16",
     "As for ViT-B. `bash benchmarks/run_all.sh gpu` re-runs both tables."),
    ("launch_bound_vit_b", "The host's cost of a training step, ViT-B/16's 12 blocks, bf16: the GPU step's bound on a CPU",
     "A GPU step of this model is launch-bound (see above), so its time is what the host spends per op. Here every "
     "op of every block runs at width 64 on 16-px images (two tokens), where kernels cost next to nothing, and "
     "nola_vision makes an accelerator's choices (`functions.launch_bound`): the step time is the host's cost alone. "
     "(Until 2026-12-04 the images were 32 px, 65 tokens: there a bfloat16 product of rank 4 took this CPU 15-20 µs "
     "of arithmetic, and an adapted layer has seven, which counted against the method with more adapted layers.) "
     "History, same proxy: commit e8b3b99's NOLA-MLP took 1.44× our LoRA (1.785× at k = l = 1,024, the H200's "
     "ratio, though about 8 ms of it was the CPU's arithmetic on 1,024 bases, hence k = l = 64 here); the few-launch "
     "path (e4634e2) 1.32×, at 32 px. Since, alternating runs of e4634e2 and this table's code at 16 px: 1.29-1.31× "
     "against 1.10-1.11×. Layers sharing a basis get their factors viewed, scaled and cast to autocast's dtype once "
     "per basis, not per layer (casts in forward, backward and of the gradients; 1,990 ops a step → 1,446, our LoRA's 1,503 → 1,407); x A and "
     "the layer's input reach the product as 2-d rows; an adapted layer is one autograd node where no saved-tensor "
     "hooks run (checkpointing keeps two, for its recomputation to stop before the product); the hooks walk the "
     "model's tree once, and again only after a module is assigned; no-op casts are skipped; bases combined in one "
     "chunk are one product. What remains is structural: NOLA-MLP adapts fc1 and fc2 (24 layers of ViT-B), LoRA q,v "
     "one qkv per block (12), and each adapted layer costs the host Python and autograd work that a frozen one does "
     "not, in forward and in backward; Adam steps 50 tensors against 26. peft's LoRA adapts the same 12 layers with "
     "fewer host ops than ours (no slices for q and v, C++ autograd nodes only). A GPU session re-measures the bf16 "
     "table above (`bash benchmarks/run_all.sh gpu`)."),
    ("launch_bound_vit_l", "The host's cost of a training step, ViT-L/16's 24 blocks, bf16", "As for ViT-B/16."),
)
# Printed under the targets: what the step-time ranges mean (the run shown's numbers are filled in by timing_note).
TIMING_NOTE = (
    "NOLA-MLP's step-time ratios to LoRA are paired: both methods train in one process, one step each per round in "
    "alternating order, and each round's ratio compares steps seconds apart (median of the rounds, quartiles "
    "bracketed; glibc's default allocator). Even paired, the median moves by a few percent from run to run on this "
    "shared VM (two runs of the ViT-B fp32 table on the same code on the Intel VM, 2026-12-01: 1.07× and 1.02×), and on "
    "a busy day more (a run on 2026-12-03: quartiles up to ±8%). {shown} Before the joined low-rank product the bf16 "
    "tables gave 1.034× and 1.045× with quartiles above 1.00×, a real cost: the bases' generation (~37 ms a ViT-B "
    "step) and combination (~47 ms) stay in float32 while the step takes half fp32's time, and each adapted MLP's "
    "rank-4 products over its 3,072-wide tensors cost more than LoRA's on q and v (`benchmarks/profile_step.py`). "
    "Fresh-process rounds swing by ±10–20%, too much to decide a few percent; they give the memory (a process's peak "
    "cannot be split between two models). The training peak is the step's memory above what a run keeps across "
    "steps; NOLA's shared basis codes (60 MiB for ViT-B, 80 MiB for ViT-L at k = l = 1024) count as step memory. By "
    "default a CPU step holds them only between its backward pass and the next forward pass, never under its "
    "activations, and generates them once per step; `nv.set_basis_holding(model, True)` (\"codes held\") keeps them, "
    "trading their memory for that time. \"Peak + kept\" is the process's peak above the built model. The profile "
    "section shows where each method's time and memory go."
)


def timing_note(results: Path) -> str:
    """``TIMING_NOTE`` with the paired ratios of the run shown, from its raw numbers."""
    shown = []
    for precision, tag in (("fp32", ""), ("bf16", "_bf16")):
        ratios = []
        for model in ("vit_b", "vit_l"):
            data = _load(results, f"nola_vs_lora{tag}_{model}")
            if data is not None and "paired_step_s" in _method(data, "nola"):
                low, median, high = paired_quartiles(_method(data, "nola"), _method(data, "lora"))
                ratios.append(f"{median:.3f}× ({'ViT-B' if model == 'vit_b' else 'ViT-L'}, quartiles "
                              f"{low:.3f}–{high:.3f})")
        if ratios:
            shown.append(f"{' and '.join(ratios)} in {precision}")
    run = f"In the run shown NOLA's median ratios are {'; '.join(shown)}." if shown else ""
    return TIMING_NOTE.format(shown=run)


PARTS = {"nola_vs_lora_vit_b": "nola_vs_lora", "nola_vs_lora_vit_l": "nola_vs_lora",
         "nola_vs_lora_bf16_vit_b": "nola_vs_lora", "nola_vs_lora_bf16_vit_l": "nola_vs_lora",
         "profile_step": "profile", "profile_step_bf16": "profile",
         "train_step_vit_b": "train_step", "train_step_vit_b_1thread": "train_step_1thread",
         "train_step_vit_l": "train_step_large", "compile_step_vit_b": "train_step_compile",
         "compile_step_vit_l": "train_step_compile",
         "grad_ckpt_off_vit_b": "grad_checkpointing", "grad_ckpt_on_vit_b": "grad_checkpointing",
         "gpu_train_step_vit_b": "gpu", "gpu_train_step_vit_l": "gpu",
         "launch_bound_vit_b": "launch_bound", "launch_bound_vit_l": "launch_bound"}


METHOD_NAMES = {"lora": "LoRA q,v", "nola": "NOLA-MLP"}
# The NOLA-MLP variants of the targets' tables: the default, and its basis codes held across steps.
NOLA_VARIANTS = {"nola": "NOLA-MLP", "nola_held": "NOLA-MLP, codes held,"}


def _load(results: Path, name: str):
    """Result ``name``'s raw numbers, or None where it was not run; one measured on another model than the report's
    labels name (``ViT-B/16`` for ``*_vit_b``) is refused, naming the file."""
    path = results / f"{name}.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    setting = data.get("setting", "") if isinstance(data, dict) else ""
    measured = re.match(r"[\w.\-]*", setting)[0]  # the setting starts with the timm name
    expected = _labelled_model(name)
    if measured and expected and measured != expected:
        raise ValueError(f"{path} was measured on {measured}, and the report labels it {expected}: re-run "
                         f"`bash benchmarks/run_all.sh {PARTS.get(name, name)}`, which measures {expected}")
    return data


def _labelled_model(name: str) -> Optional[str]:
    """The timm model the report's labels name for result ``name`` (ViT-B/16 or ViT-L/16), or None."""
    if re.search(r"_vit_l(_|$)", name):
        return "vit_large_patch16_224"
    if re.search(r"_vit_b(_|$)", name) or name in ("inference", "compiled_switch", "onnx_tasks", "multitask"):
        return "vit_base_patch16_224"
    return None


def _method(data: Dict, method: str) -> Dict:
    result = _optional_method(data, method)
    if result is None:
        raise KeyError(f"no {method!r} result (all blocks) in {data.get('setting', 'the results')!r}")
    return result


def _verdict(value: float, limit: float, higher_is_better: bool = False, unit: str = "×") -> str:
    met = value >= limit if higher_is_better else value <= limit
    if met:
        return "met"
    if unit != "×":
        return f"missed by {abs(value - limit):.{_digits(value, limit, 1)}f} {unit}"
    return f"missed by {abs(value - limit):.{_digits(value, limit)}f}{unit}"


def _shown(value: float, limit: float, least: int = 2) -> str:
    """``value`` with the decimals ``_digits`` gives it against ``limit``."""
    return f"{value:.{_digits(value, limit, least)}f}"


def _digits(value: float, limit: float, least: int = 2) -> int:
    """``least`` decimals, or as many more (up to 6) as it takes for a value other than the limit to print as another
    number (1.003× against 1.00×, not 1.00×)."""
    digits = least
    while value != limit and digits < 6 and f"{value:.{digits}f}" == f"{limit:.{digits}f}":
        digits += 1
    return digits


def _spread(reference: Dict, result: Dict) -> str:
    """The range of the time ratio over any pairing of the two methods' rounds: the machine's noise, in words."""
    if len(reference.get("step_s_rounds", [])) < 2:
        return ""
    low = min(result["step_s_rounds"]) / max(reference["step_s_rounds"])
    high = max(result["step_s_rounds"]) / min(reference["step_s_rounds"])
    return f" (rounds: {low:.2f}–{high:.2f}×)"


def step_ratio(reference: Dict, result: Dict) -> Tuple[float, str]:
    """The step-time ratio and its spread: paired when measured so, else over fresh-process rounds."""
    if "paired_step_s" in result and "paired_step_s" in reference:
        low, median, high = paired_quartiles(result, reference)
        return median, f" (paired, quartiles {low:.2f}–{high:.2f}×)"
    return result["step_s"] / reference["step_s"], _spread(reference, result)


def _optional_method(data: Dict, method: str) -> Optional[Dict]:
    return next((r for r in data["results"] if r["method"] == method and not r.get("blocks")), None)


def _ratio_row(name: str, value: float, limit: float, spread: str = "") -> List[str]:
    return [name, f"{_shown(value, limit)}×{spread}", _verdict(value, limit)]


def training_targets(results: Path) -> List[List[str]]:
    """NOLA-MLP (shared basis) against LoRA q,v: step time and memory ≤ 1.00×, per model and precision."""
    rows = []
    for name, title, _ in SECTIONS:
        data = _load(results, name)
        if not name.startswith("nola_vs_lora") or data is None:
            continue
        lora = _method(data, "lora")
        where = title.split(": training step, ")[1]
        for method, name in NOLA_VARIANTS.items():
            nola = _optional_method(data, method)
            if nola is None:
                continue
            ratio, spread = step_ratio(lora, nola)
            rows += [_ratio_row(f"{name} step time ≤ 1.00× LoRA q,v ({where})", ratio, 1.0, spread),
                     _ratio_row(f"{name} training peak ≤ 1.00× LoRA q,v ({where})",
                                nola["train_mem_mb"] / lora["train_mem_mb"], 1.0)]
            if "kept_mb" in nola:
                total = (nola["train_mem_mb"] + nola["kept_mb"]) / (lora["train_mem_mb"] + lora["kept_mb"])
                rows.append(_ratio_row(f"{name} training peak + kept across steps ≤ 1.00× LoRA q,v ({where})", total,
                                       1.0))
    for name, title, _ in SECTIONS:
        data = _load(results, name)
        if name.startswith("train_step") and data is not None:
            per_layer = _method(data, "nola_per_layer")["train_mem_mb"] / _method(data, "lora")["train_mem_mb"]
            rows.append(_ratio_row(f"NOLA per-layer-basis training peak ≤ 1.15× LoRA "
                                   f"({title.replace('Training step, ', '')})", per_layer, 1.15))
    return rows + compile_targets(results)


def compile_targets(results: Path) -> List[List[str]]:
    """The compiled step's training peak against the eager one's, per method (ViT-B/16)."""
    data = _load(results, "compile_step_vit_b")
    if data is None:
        return []
    rows = []
    for method in ("lora", "nola"):
        eager, compiled = (next(r for r in data["results"] if r["method"] == method and r.get("compiled") == c)
                           for c in (False, True))
        rows.append(_ratio_row(f"compiled training peak ≤ eager, {METHOD_NAMES[method]} (ViT-B/16)",
                               compiled["train_mem_mb"] / eager["train_mem_mb"], 1.0))
    return rows


def inference_targets(results: Path) -> List[List[str]]:
    data = _load(results, "inference")
    if data is None:
        return []
    seconds = {name: statistics.median(times) for name, times in data["throughput_s"].items()}
    merged = seconds["base model"] / seconds["NOLA merged"]
    switch_ms = statistics.median(data["switch_s"]["in_place"]) * 1000
    floor = data["switch_s"].get("memory_floor")  # one pass over the adapted weights, which a switch must make
    processes = data.get("switch_process_medians_s", {}).get("in_place", [])
    spread = (f"; per process {min(processes) * 1000:.0f}–{max(processes) * 1000:.0f} ms" if len(processes) > 1
              else "")
    measured = f"{switch_ms:.1f} ms" + (f" (weights pass alone: {statistics.median(floor) * 1000:.1f} ms{spread})"
                                        if floor else "")
    return [["merged NOLA inference ≥ 0.97× base images/s (ViT-B/16)", f"{merged:.3f}×", _verdict(merged, 0.97, True)],
            ["task switch (load + in-place re-merge) < 50 ms (ViT-B/16)", measured, _verdict(switch_ms, 50.0, unit="ms")]]


def serving_targets(results: Path) -> List[List[str]]:
    """Switching a compiled model (time and recompilations) and the task-input ONNX graph's latency at batch 32."""
    rows = []
    switch = _load(results, "compiled_switch")
    for row in switch["rows"] if switch else []:
        ms = statistics.median(row["switch_s"]) * 1000
        rows += [[f"task switch of a compiled unmerged {row['method']} model ≤ 50 ms (ViT-B/16)",
                  f"{_shown(ms, 50.0, 1)} ms",
                  _verdict(ms, 50.0, unit="ms")],
                 [f"recompilations in {len(row['switch_s'])} switches of a compiled {row['method']} model: 0",
                  str(row["recompilations"]), "met" if row["recompilations"] == 0 else "missed"]]
    graphs = _load(results, "onnx_tasks")
    for entry in graphs["methods"] if graphs else []:
        for row in entry["rows"]:
            if row["batch"] == 32:
                ratio = statistics.median(row["seconds"]["tasks"]) / statistics.median(row["seconds"]["merged"])
                rows.append([f"{entry['method']} task-input ONNX graph ≤ 1.3× the merged graph's latency at batch 32 "
                             "(ViT-B/16)", f"{_shown(ratio, 1.3)}×", _verdict(ratio, 1.3)])
    return rows


def multitask_targets(results: Path) -> List[List[str]]:
    data = _load(results, "multitask")
    if data is None:
        return []
    seconds = {(row["method"], row["tasks"]): statistics.median(row["seconds"]) for row in data["rows"]}
    speed = {key: seconds[("merged", 1)] / value for key, value in seconds.items()}
    rows = [[f"mixed batch of {data['batch']} with {tasks} tasks ≥ {limit}× merged single-task images/s (ViT-B/16)",
             f"{_shown(speed[('multitask', tasks)], limit)}×", _verdict(speed[("multitask", tasks)], limit, True)]
            for tasks, limit in ((8, 0.8), (64, 0.6)) if ("multitask", tasks) in speed]
    rows += [[f"mixed batch ahead of peft's LoRA mixed batch with {tasks} tasks",
              f"{speed[('multitask', tasks)]:.2f}× vs {speed[('peft', tasks)]:.2f}×",
              _verdict(speed[("multitask", tasks)] / speed[("peft", tasks)], 1.0, True)]
             for method, tasks in sorted(speed) if method == "peft"]
    memory = {row["registered"]: row["rss_mb"] for row in data["memory"]}
    if 1000 in memory:
        added = memory[1000] * 2**20 / 1e6  # the JSON's rss_mb is in MiB, the target in MB
        rows.append(["1,000 registered NOLA tasks add ≤ 250 MB resident memory (ViT-B/16)",
                     f"{_shown(added, 250.0, 1)} MB", _verdict(added, 250.0, unit="MB")])
    return rows


def storage_targets(results: Path) -> List[List[str]]:
    data = _load(results, "storage")
    if data is None:
        return []
    row = next(r for r in _storage_rows(data) if r["row"].endswith("4-bit") and r["row"].startswith("NOLA")
               and r["model"] == "vit_base_patch16_224" and r["head"] == "CIFAR-10")
    kb = row["bytes"] / 1000
    return [["ViT-B NOLA + CIFAR-10 head ≤ 48 KB at 4 bits", f"{kb:.1f} KB", _verdict(kb, 48.0, unit="KB")]]


def _storage_rows(data) -> List[Dict]:
    """storage.json's rows: its ``results``, or the bare list it was before it recorded its header and setting."""
    return data if isinstance(data, list) else data["results"]


def accuracy_targets(results: Path) -> List[List[str]]:
    data = _load(results, "accuracy")
    if data is None:
        return []
    rows = []
    for shots in sorted({run["shots"] for run in data["runs"]}):
        runs = [run["rows"] for run in data["runs"] if run["shots"] == shots]
        full, four = (statistics.mean(r[key]["accuracy"] for r in runs) for key in ("nola_1024_ptq16", "nola_1024_ptq4"))
        gap = full - four
        rows.append([f"4-bit NOLA within 0.5 points of 16-bit accuracy ({shots}-shot, {len(runs)} seeds)",
                     f"{four:.1f} vs {full:.1f} ({gap:+.2f} points)", _verdict(gap, 0.5, unit="points")])
        if all("lora_r4" in r and "nola_1024" in r for r in runs):
            nola, lora = (statistics.mean(r[key]["accuracy"] for r in runs) for key in ("nola_1024", "lora_r4"))
            rows.append([f"NOLA-MLP k=l=1024 ≥ LoRA q,v r=4 − 1 point, lr chosen on validation ({shots}-shot, "
                         f"{len(runs)} seeds)", f"{nola:.1f} vs {lora:.1f} ({nola - lora:+.1f} points)",
                         _verdict(lora - nola, 1.0, unit="points")])
    return rows


TARGETS: Tuple[Callable[[Path], List[List[str]]], ...] = (training_targets, inference_targets, serving_targets,
                                                           multitask_targets, storage_targets, accuracy_targets)


def _mean_accuracy(data: Dict, shots: int, method: str) -> float:
    return statistics.mean(run["rows"][method]["accuracy"] for run in data["runs"] if run["shots"] == shots)


HEADLINE_SOURCES = ("storage", "accuracy", "nola_vs_lora_vit_b", "gpu_train_step_vit_b")  # what headline_rows reads


def headline_rows(results: Path, pending: Optional[Mapping[str, str]] = None) -> List[List[str]]:
    """NOLA against LoRA in four numbers (trained parameters, file size, accuracy, cost), each from the raw JSON."""
    rows = []
    storage = _load(results, "storage")
    if storage is not None:
        vit_b = {r["row"]: r for r in _storage_rows(storage) if r["model"] == "vit_base_patch16_224" and r["head"] == "CIFAR-10"}
        nola, lora = vit_b["NOLA-MLP k=l=1024 (ours), 4-bit"], vit_b["LoRA q,v r=4 (ours), 16-bit"]
        rows += [["trained adapter parameters, ViT-B/16 (NOLA-MLP r=4 k=l=1024; LoRA q,v r=4)",
                  f"{nola['adapter_params']:,}", f"{lora['adapter_params']:,}"],
                 ["adapter file with a CIFAR-10 head, ViT-B/16", f"{nola['bytes'] / 1000:.1f} KB (4-bit)",
                  f"{lora['bytes'] / 1000:.1f} KB (16-bit)"]]
    accuracy = _load(results, "accuracy")
    if accuracy is not None:
        trained = {key: accuracy["runs"][0]["rows"][key]["adapter"] for key in ("nola_1024", "lora_r4")}
        backbone, dataset = _accuracy_setting(accuracy)
        rows += [[f"test accuracy (%), {shots}-shot {dataset}, {backbone} ({trained['nola_1024']:,} vs "
                  f"{trained['lora_r4']:,} trained), lr chosen on validation, "
                  f"{sum(run['shots'] == shots for run in accuracy['runs'])} split seeds",
                  f"{_mean_accuracy(accuracy, shots, 'nola_1024'):.1f}", f"{_mean_accuracy(accuracy, shots, 'lora_r4'):.1f}"]
                 for shots in sorted({run["shots"] for run in accuracy["runs"]})]
    step = _load(results, "nola_vs_lora_vit_b")
    if step is not None:
        lora, nola = _method(step, "lora"), _method(step, "nola")
        total = (nola["train_mem_mb"] + nola["kept_mb"]) / (lora["train_mem_mb"] + lora["kept_mb"])
        rows.append(["training step time / training peak (NOLA's basis codes counted) / peak + what a run keeps, "
                     "ViT-B/16, CPU fp32 (× LoRA)",
                     f"{step_ratio(lora, nola)[0]:.2f}× / {nola['train_mem_mb'] / lora['train_mem_mb']:.2f}× / "
                     f"{total:.2f}×", "1.00× / 1.00× / 1.00×"])
    gpu = _load(results, "gpu_train_step_vit_b")
    if gpu is not None:
        lora, nola = _method(gpu, "lora"), _method(gpu, "nola")
        batch = re.search(r"batch \d+", gpu.get("setting", ""))
        rows.append([f"training step time / training peak, ViT-B/16, {_gpu_name(results, 'gpu_train_step_vit_b', pending)} "
                     f"bf16{f', {batch[0]}' if batch else ''} (× LoRA)",
                     f"{nola['step_s'] / lora['step_s']:.2f}× / {nola['train_mem_mb'] / lora['train_mem_mb']:.2f}×",
                     "1.00× / 1.00×"])
    return rows


def _gpu_name(results: Path, name: str, pending: Optional[Mapping[str, str]] = None) -> str:
    """The GPU a part ran on, from its output's first line (``NVIDIA H200``), or "a GPU"."""
    if (results / f"{name}.md").is_file():
        machine = _machine(printed_output(results, name, pending))
        if "NVIDIA" in machine:
            return "one " + machine.rsplit(", ", 1)[-1].removeprefix("NVIDIA ")
    return "a GPU"


def _accuracy_setting(data: Dict) -> Tuple[str, str]:
    """The backbone (``ViT-S/14``, or the timm name of a smoke test's random one) and the dataset (``digits``) of an
    accuracy run, as its protocol names them (``accuracy.protocol``)."""
    match = re.match(r"Protocol: (?P<backbone>.+?), frozen; (?P<dataset>.+?) upsampled", data["protocol"])
    if match is None:
        raise ValueError("accuracy.json's protocol names no backbone and dataset: run benchmarks/accuracy.py again")
    short = re.search(r"ViT-[A-Z]/\d+", match["backbone"])
    backbone = short[0] if short and "random weights" not in match["backbone"] else match["backbone"]
    names = {text: key for key, text in ACCURACY_DATASETS.items()}
    return backbone, names.get(match["dataset"], match["dataset"]).replace("_", "-")


def headline_sources(results: Path, pending: Optional[Mapping[str, str]] = None) -> str:
    """The line under the headline naming when and where each of its results was measured."""
    sources = []
    for name in HEADLINE_SOURCES:
        if (results / f"{name}.md").is_file():
            match = HEADER.match(printed_output(results, name, pending).splitlines()[0])
            sources.append(f"`{name}` {match['date']}, {match['machine']}" if match else f"`{name}`")
    return f"_Measured: {'; '.join(sources)}._" if sources else ""


def target_rows(results: Path) -> List[List[str]]:
    return [row for target in TARGETS for row in target(results)]


def printed_output(results: Path, name: str, pending: Optional[Mapping[str, str]] = None) -> str:
    """What a part's script printed (``<name>.md``, or its reprint in ``pending`` that is not written yet: the report
    is built before any file is); empty while ``run_all.sh`` is rewriting it or after it failed."""
    text = (pending or {}).get(name, None) or (results / f"{name}.md").read_text()
    text = text.strip()
    if not text:
        raise ValueError(f"{results / name}.md is empty: its part is still running or failed; re-run "
                         f"`bash benchmarks/run_all.sh {PARTS.get(name, name)}`")
    return text


# The first line of every script's output: "_<date>, <machine>, torch <version>, `<command>`_" (common.header).
HEADER = re.compile(r"^_(?P<date>[^,]+), (?P<machine>.+), (?P<rest>torch \S+, `.*`_)$")
RUN_ALL_CPU = ("`bash benchmarks/run_all.sh cpu` re-runs every CPU table on one machine in one go: about 2 h 20 min on "
               "the quiet 2-core AMD EPYC VM (2½ hours on the Intel Xeon one) for everything but the accuracy parts, "
               "which add minutes with their trial cache (runs/accuracy_cache) and about an hour without it (AMD: accuracy 36 "
               "min, accuracy_study 15 min, accuracy_transfer 7 min)")


def _machine(printed: str) -> str:
    match = HEADER.match(printed.splitlines()[0])
    return match["machine"] if match else "unknown machine"


def _without_machine(printed: str) -> str:
    """The printed output with its first line naming date, torch and command only (the machine is named once)."""
    first, _, rest = printed.partition("\n")
    match = HEADER.match(first)
    return f"_{match['date']}, {match['rest']}\n{rest}" if match else printed


def machine_lines(machines: Dict[str, str]) -> Tuple[Optional[str], List[str]]:
    """The machine most CPU tables were measured on, and the lines that name it once (and any other machine)."""
    cpu = {name: m for name, m in machines.items() if not name.startswith("gpu_")}
    if not cpu:
        return None, []
    main = collections.Counter(cpu.values()).most_common(1)[0][0]
    others = {name: m for name, m in cpu.items() if m != main}
    lines = [f"CPU tables: **{main}**. {RUN_ALL_CPU}.", ""]
    if others:
        parts = sorted({PARTS.get(name, name) for name in others})
        lines += [f"Measured on another machine ({', '.join(sorted(set(others.values())))}) and so not comparable with "
                  f"the rest until re-run: {', '.join(f'`{name}`' for name in others)} "
                  f"(`bash benchmarks/run_all.sh {' '.join(parts)}`).", ""]
    return main, lines


def build(results: Path, pending: Optional[Mapping[str, str]] = None) -> str:
    """The report: the one machine, targets computed from the JSON, then every section's printed table and plot
    (``pending``: reprinted tables not written yet)."""
    done = [section for section in SECTIONS if (results / f"{section[0]}.md").is_file()]
    missing = sorted({PARTS.get(section[0], section[0]) for section in SECTIONS if section not in done})
    printed = {name: printed_output(results, name, pending) for name, _, _ in done}
    main, machine_text = machine_lines({name: _machine(text) for name, text in printed.items()})
    lines = ["# Benchmark results", "",
             "Written by `python benchmarks/collect_results.py` from `benchmarks/results/`. Each section below is exactly "
             "what its script printed (the first line names date, torch and command; the machine is named here once), "
             "with its plot. Reproduce with `bash benchmarks/run_all.sh <part>`.", "", *machine_text]
    if missing:
        lines += [f"Not run yet: {', '.join(f'`{part}`' for part in missing)}.", ""]
    rows = target_rows(results)
    if rows:
        lines += ["## Targets", "", markdown_table(["target", "measured", "verdict"], rows), "", timing_note(results), ""]
    for name, title, note in done:
        note = " ".join(filter(None, [note, _run_note(name, printed[name])]))
        lines += [f"## {title}", ""] + ([note, ""] if note else [])
        lines += [_without_machine(printed[name]) if _machine(printed[name]) == main else printed[name], ""]
        if (results / f"{name}.png").is_file():
            lines += [f"![{title}](results/{name}.png)", ""]
    return "\n".join(lines)


# What is true of one run only, shown beside its table while that run (its header's date) is the one shown.
RUN_NOTES = {
    ("gpu_train_step_vit_b", "2026-12-04 12:01"): "This table is the second run of that day, with the 8M-value chunks and "
    "blocks.",
    ("gpu_train_step_vit_l", "2026-12-04 11:49"): "This table was measured before the 8M-value chunks and blocks. After "
    "them, in the ViT-B table's session (lora, nola and peft_lora only): our LoRA 0.066 s, NOLA-MLP 0.144 s (2.18×; "
    "it was 0.299 s), peft's LoRA 0.034 s, peaks unchanged (4,714, 4,467 and 4,547 MiB).",
}


def _run_note(name: str, printed: str) -> str:
    match = HEADER.match(printed.splitlines()[0])
    return RUN_NOTES.get((name, match["date"] if match else ""), "")


README_BLOCK = re.compile(r"(<!-- results: (\w+) -->\n)(.*?)(<!-- /results -->)", re.S)


def quote(results: Path, name: str, pending: Optional[Mapping[str, str]] = None) -> str:
    """What the README shows of a result: its tables (or the targets table) and the line naming date and command."""
    if name == "targets":
        return markdown_table(["target", "measured", "verdict"], target_rows(results))
    if name == "headline":
        return "\n\n".join(filter(None, [markdown_table(["measured", "NOLA", "LoRA"], headline_rows(results, pending)),
                                          headline_sources(results, pending)]))
    printed = printed_output(results, name, pending)
    tables = ["\n".join(line for line in block.splitlines() if line.startswith("|")) for block in printed.split("\n\n")]
    return "\n\n".join([printed.splitlines()[0]] + [table for table in tables if table])


def sync_readme(text: str, results: Path, pending: Optional[Mapping[str, str]] = None) -> str:
    """The README with every ``<!-- results: name -->`` block replaced by the current quote of that result."""
    return README_BLOCK.sub(lambda m: f"{m.group(1)}\n{quote(results, m.group(2), pending)}\n\n{m.group(4)}", text)


# Results whose script can print its output again from the raw numbers (its ``printed(data)``): ``--check`` compares
# that with the ``.md`` it printed, so a table that no longer follows its ``.json`` (edited, or printed by older code)
# is found.
REPRINTED = {"multitask": "multitask", "profile_step": "profile_step", "profile_step_bf16": "profile_step",
             "storage": "storage", "inference": "inference", "onnx_tasks": "onnx_tasks",
             "compiled_switch": "compiled_switch", "launch_bound_vit_b": "launch_bound",
             "launch_bound_vit_l": "launch_bound",
             **{name: "train_step" for name in (
                 "nola_vs_lora_vit_b", "nola_vs_lora_vit_l", "nola_vs_lora_bf16_vit_b", "nola_vs_lora_bf16_vit_l",
                 "train_step_vit_b", "train_step_vit_b_1thread", "train_step_vit_l", "compile_step_vit_b",
                 "compile_step_vit_l", "grad_ckpt_off_vit_b", "grad_ckpt_on_vit_b", "sweep_k", "sweep_layers",
                 "gpu_train_step_vit_b", "gpu_train_step_vit_l")}}


# Results whose printed output holds what their JSON does not (accuracy.py's wall time and thread counts, its shot
# order): ``--check`` cannot compare them with their ``.json`` and says so.
NOT_REPRINTED = ("accuracy", "accuracy_study", "accuracy_transfer")


def reprinted(results: Path, name: str) -> Optional[str]:
    """The ``.md`` the script of result ``name`` prints from its ``.json``, under the header line the JSON records;
    None for a result not run."""
    md, raw = results / f"{name}.md", results / f"{name}.json"
    if not md.is_file() or not raw.is_file():
        return None
    import importlib

    data = json.loads(raw.read_text())
    setting = data.get("setting") if isinstance(data, dict) else None  # storage.json was a bare list of rows
    body = "\n\n".join(filter(None, [setting, importlib.import_module(REPRINTED[name]).printed(data)]))
    if isinstance(data, dict) and "header" in data:
        return f"{data['header']}\n\n{body}\n"
    return _under_old_header(md, raw, body, PARTS.get(name, name))


def _under_old_header(md: Path, raw: Path, body: str, part: str) -> str:
    """A reprint of a JSON written before the scripts recorded their header line: the ``.md``'s first line names its
    run only while the ``.md`` still shows the JSON's numbers, so anything else is refused, not written under it."""
    first = md.read_text().split("\n", 1)[0]
    if not HEADER.match(first):  # an emptied table would be written back under a blank first line
        raise ValueError(f"{md} does not start with its run's header line (it is empty or cut short): its part is "
                         f"still running or failed; re-run `bash benchmarks/run_all.sh {part}`")
    text = f"{first}\n\n{body}\n"
    if text != md.read_text():
        raise ValueError(f"{md} is stale and cannot be printed again: {raw.name} records no header line (written "
                         f"before the scripts recorded it), and {md.name}'s (date, machine, command) would name a run "
                         f"whose numbers it no longer shows; re-run `bash benchmarks/run_all.sh {part}`")
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--readme", type=Path, default=HERE.parent / "README.md")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a file is stale")
    args = parser.parse_args(argv)
    try:  # everything is computed (and so checked) before any file is written
        reprints = {name: text for name in REPRINTED if (text := reprinted(args.results, name)) is not None}
        wanted = {**{args.results / f"{name}.md": text for name, text in reprints.items()},
                  args.out: build(args.results, reprints),
                  args.readme: sync_readme(args.readme.read_text(), args.results, reprints)}
    except ValueError as err:
        print(f"collect_results: error: {err}", file=sys.stderr)
        return 1
    except (KeyError, StopIteration, FileNotFoundError) as err:  # a result run with other settings than run_all.sh's
        what = f"has no {err}" if isinstance(err, KeyError) else (
            f"is missing: {err.filename}" if isinstance(err, FileNotFoundError) else "has none of the rows it needs")
        print(f"collect_results: error: a result the report reads {what}: it was run with other settings (methods, "
              "models) than benchmarks/run_all.sh uses. Run that part of run_all.sh again", file=sys.stderr)
        return 1
    stale = [path for path, text in wanted.items() if not path.is_file() or path.read_text() != text]
    if args.check:
        unchecked = [name for name in NOT_REPRINTED if (args.results / f"{name}.md").is_file()]
        if unchecked:
            print(f"not compared with their .json (they print what it does not hold): {', '.join(unchecked)}")
        for path in stale:
            print(f"{path} is stale: run python benchmarks/collect_results.py", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        write_text_atomic(path, wanted[path])
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
