"""Mixed-task inference: one frozen ViT answering a batch whose images belong to 1, 8 or 64 different tasks.

Images/s of ``nv.MultiTaskModel`` (NOLA-MLP tasks: every image gets its own task's update in one pass of the
frozen model) beside (a) one merged model switched group by group (``load_adapter`` on the merged model switches
in place, W += ΔW_new − ΔW_old, then the group's images run) and (b) peft's LoRA mixed batch (``PeftModel`` with
one LoRA r=4 per task on the same layers, ``adapter_names=`` per image), each relative to the merged single-task
model. Models are measured in interleaved rounds (order rotated every round); the median per row is reported.
Resident memory: the RSS that registering 1, 100 and 1,000 NOLA tasks adds, measured in a fresh process.

    python benchmarks/multitask.py                          # ViT-B/16, batch 64, 224 px, CPU
    python benchmarks/multitask.py --tasks 1 8 --registered 1 100 --rounds 1
"""
from __future__ import annotations

import argparse
import copy
import gc
import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from common import (
    POSITIVE,
    add_common_arguments,
    add_model_arguments,
    markdown_table,
    publish,
    pyplot,
    save_figure,
    suptitle,
)
from inference import base_model
from torch import nn

import nola_vision as nv

METHODS = {
    "merged": "merged model, one task (reference)",
    "multitask": "NOLA MultiTaskModel, mixed batch",
    "switch": "merged model switched per task group",
    "peft": "peft LoRA mixed batch (adapter_names)",
}
# Issue 10's targets: × merged single-task images/s at a number of distinct tasks per batch; MB for 1,000 tasks.
SPEED_TARGETS = {8: 0.8, 64: 0.6}
MEMORY_TARGET = (1000, 250.0)


def save_tasks(base: nn.Module, config: nv.NOLAConfig, count: int, root: Path, bits: int) -> List[Path]:
    """``count`` NOLA adapters with distinct small random coefficients and heads, as after training one task each."""
    model = nv.inject(copy.deepcopy(base), config)
    trained = [p for p in model.parameters() if p.requires_grad]
    initial = [p.detach().clone() for p in trained]
    generator = torch.Generator().manual_seed(0)
    directories = []
    with torch.no_grad():
        for index in range(count):
            for parameter, start in zip(trained, initial):
                parameter.copy_(start + 0.5 * start.abs().mean() * torch.randn(start.shape, generator=generator))
            directories.append(nv.save_adapter(model, root / f"task{index:04d}", bits=bits))
    return directories


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_worker(args: argparse.Namespace, model_kwargs: dict, directories: List[Path]) -> List[Dict[str, float]]:
    """In a fresh process: the RSS that registering the first 1, 100, 1,000 tasks (cumulatively) adds to a served
    backbone, beside the bytes of the numbers the tasks hold."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model = nv.MultiTaskModel(base_model(args.model, args.img_size, args.num_classes, **model_kwargs))
    gc.collect()
    before, registered, rows = rss_bytes(), 0, []
    for count in sorted(args.registered):
        for index in range(registered, count):
            model.add_task(f"task{index}", directories[index])
        registered = count
        gc.collect()
        rows.append({"registered": count, "rss_mb": (rss_bytes() - before) / 2**20,  # *_mb: MiB, as named before
                     "held_mb": model.memory_bytes()["tasks"] / 2**20})
    return rows


class SwitchedMerged:
    """A merged model answering a mixed batch group by group, switching in place to each group's task it does not
    already hold (``load_adapter`` on a merged model: W += ΔW_new − ΔW_old)."""

    def __init__(self, model: nn.Module, directories: Sequence[Path]) -> None:
        self.directories = directories
        self.model = nv.merge(nv.load_adapter(model, directories[0]))
        self.current = 0

    def __call__(self, images: torch.Tensor, tasks: List[int]) -> torch.Tensor:
        index = torch.tensor(tasks)
        out = None
        for task in dict.fromkeys(tasks):
            rows = (index == task).nonzero().squeeze(1)
            if task != self.current:
                nv.load_adapter(self.model, self.directories[task])
                self.current = task
            logits = self.model(images[rows])
            out = logits.new_empty(len(tasks), logits.shape[1]) if out is None else out
            out[rows] = logits
        return out


def peft_mixed(base: nn.Module, count: int) -> nn.Module:
    """peft with ``count`` LoRA r=4 adapters on the layers NOLA-MLP adapts, each with its own head."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=4, target_modules=["fc1", "fc2"], modules_to_save=["head"])
    model = get_peft_model(copy.deepcopy(base), config, adapter_name="task0")
    for index in range(1, count):
        model.add_adapter(f"task{index}", config)
    return model.eval()


def mixed_tasks(distinct: int, batch: int) -> List[int]:
    """The task of every image: ``distinct`` tasks in shares as equal as the batch allows, in shuffled order."""
    order = torch.randperm(batch, generator=torch.Generator().manual_seed(distinct)).tolist()
    return [position % distinct for position in order]


def interleaved(calls: Dict[tuple, Callable[[], torch.Tensor]], rounds: int):
    """Seconds per call of every entry, one warm-up call each, then ``rounds`` rounds in rotated order; and the
    last outputs."""
    names = list(calls)
    times: Dict[tuple, List[float]] = {name: [] for name in names}
    with torch.no_grad():
        outputs = {name: calls[name]() for name in names}
        for index in range(rounds):
            for name in names[index % len(names):] + names[: index % len(names)]:
                start = time.perf_counter()
                outputs[name] = calls[name]()
                times[name].append(time.perf_counter() - start)
    return times, outputs


def run(args: argparse.Namespace, **model_kwargs) -> Dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    if max(args.tasks) > args.batch:
        raise SystemExit(f"--tasks {max(args.tasks)} exceeds --batch {args.batch}: a batch holds at most one task per image")
    config = nv.NOLAConfig(rank=4, num_basis_a=args.k, num_basis_b=args.k)
    base = base_model(args.model, args.img_size, args.num_classes, **model_kwargs)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as root:
        directories = save_tasks(base, config, max(max(args.tasks), max(args.registered)), Path(root), args.bits)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            memory = pool.submit(memory_worker, args, model_kwargs, directories).result()
        merged = nv.merge(nv.load_adapter(copy.deepcopy(base), directories[0]))
        switched = SwitchedMerged(copy.deepcopy(base), directories)
        peft = peft_mixed(base, max(args.tasks))
        served = nv.MultiTaskModel(base, cache_mb=args.cache_mb)  # last: its hooks stay on this backbone alone
        for index in range(max(args.tasks)):
            served.add_task(f"task{index}", directories[index])
        calls: Dict[tuple, Callable[[], torch.Tensor]] = {("merged", 1): lambda: merged(images)}
        for distinct in args.tasks:
            tasks = mixed_tasks(distinct, args.batch)
            names = [f"task{task}" for task in tasks]
            calls[("multitask", distinct)] = lambda names=names: torch.stack(served(images, names))
            if distinct > 1:
                calls[("switch", distinct)] = lambda tasks=tasks: switched(images, tasks)
            calls[("peft", distinct)] = lambda names=names: peft(images, adapter_names=names)
        times, outputs = interleaved(calls, args.rounds)
    # Each task's own merged model, group by group, against the mixed batch on the same images.
    errors = [(outputs[("multitask", d)] - outputs[("switch", d) if d > 1 else ("merged", 1)]).abs().max().item()
              for d in args.tasks]
    rows = [{"method": method, "tasks": distinct, "seconds": times[(method, distinct)]} for method, distinct in calls]
    return {"batch": args.batch, "rows": rows, "memory": memory, "max_logit_error": max(errors)}


def speed_ratios(result: Dict) -> Dict[tuple, float]:
    """× the merged single-task images/s of every (method, tasks) row, from the median times."""
    medians = {(row["method"], row["tasks"]): statistics.median(row["seconds"]) for row in result["rows"]}
    return {key: medians[("merged", 1)] / seconds for key, seconds in medians.items()}


def tables(result: Dict) -> str:
    ratios = speed_ratios(result)
    speed = []
    for row in result["rows"]:
        seconds = statistics.median(row["seconds"])
        speed.append([row["tasks"], METHODS[row["method"]], f"{result['batch'] / seconds:.1f}", f"{seconds * 1000:.0f}",
                      f"{ratios[(row['method'], row['tasks'])]:.2f}"])
    memory = [[f"{row['registered']:,}", f"{row['rss_mb']:.1f}", f"{row['held_mb']:.1f}",
               f"{row['rss_mb'] * 1024 / row['registered']:.0f}"] for row in result["memory"]]
    return (markdown_table(["distinct tasks in the batch", "model", "images/s", "ms per batch (median)",
                            "× merged single-task"], speed, left=2) + "\n\n" +
            markdown_table(["registered NOLA tasks", "RSS added (MiB)", "numbers held (MiB)", "RSS per task (KiB)"],
                           memory))


def target_lines(result: Dict) -> List[str]:
    """The issue's targets that this run measured, each with its measured value."""
    ratios = speed_ratios(result)
    lines = []
    for distinct, target in SPEED_TARGETS.items():
        if ("multitask", distinct) in ratios:
            value = ratios[("multitask", distinct)]
            lines.append(f"{distinct} tasks per batch: {value:.2f}× merged single-task images/s (target ≥ {target}×: "
                         f"{'met' if value >= target else 'missed'})")
    ahead = [d for (method, d) in ratios if method == "peft" and ratios[("multitask", d)] > ratios[("peft", d)]]
    counts = [d for (method, d) in ratios if method == "peft"]
    lines.append(f"ahead of peft's LoRA mixed batch at {len(ahead)} of {len(counts)} task counts ({counts}; target: all)")
    memory = {row["registered"]: row["rss_mb"] for row in result["memory"]}
    count, limit = MEMORY_TARGET
    if count in memory:
        added = memory[count] * 2**20 / 1e6  # the target is in MB (10^6 bytes); rss_mb is in MiB
        lines.append(f"{count:,} registered NOLA tasks add {added:.1f} MB ({memory[count]:.1f} MiB) resident memory "
                     f"(target ≤ {limit:.0f} MB: {'met' if added <= limit else 'missed'})")
    return lines


def plot(result: Dict, path: str, title: str) -> None:
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    ratios = speed_ratios(result)
    for method in ("multitask", "switch", "peft"):
        points = sorted((d, r) for (m, d), r in ratios.items() if m == method)
        if points:
            left.plot(*zip(*points), marker="o", label=METHODS[method])
    left.axhline(1.0, color="gray", linestyle="--", label=METHODS["merged"])
    targets = list(SPEED_TARGETS.items())
    left.plot(*zip(*targets), linestyle="none", marker="_", markersize=14, color="tab:red", label="targets")
    left.set_xscale("log", base=2)
    left.set_xticks(sorted({d for _, d in ratios} | set(SPEED_TARGETS)), minor=False)
    left.xaxis.set_major_formatter("{x:g}")
    left.set_xlabel("distinct tasks in a batch")
    left.set_ylabel("× merged single-task images/s")
    left.legend(fontsize=7)
    counts = [row["registered"] for row in result["memory"]]
    right.plot(counts, [row["rss_mb"] for row in result["memory"]], marker="o", label="RSS added")
    right.plot(counts, [row["held_mb"] for row in result["memory"]], marker=".", label="numbers held")
    right.axhline(MEMORY_TARGET[1], color="tab:red", linestyle=":", label=f"target at {MEMORY_TARGET[0]:,} tasks")
    right.set_xscale("log")
    right.set_xticks(counts, [f"{count:,}" for count in counts])
    right.minorticks_off()
    right.set_xlabel("registered NOLA tasks")
    right.set_ylabel("MB")
    right.legend(fontsize=7)
    suptitle(figure, title)
    save_figure(figure, path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, batch=64, bits=16)
    parser.add_argument("--tasks", type=POSITIVE, nargs="+", default=[1, 8, 64], help="distinct tasks per batch")
    parser.add_argument("--registered", type=POSITIVE, nargs="+", default=[1, 100, 1000],
                        help="registered task counts whose resident memory is measured")
    parser.add_argument("--cache-mb", type=float, default=256.0, help="MultiTaskModel's factor cache budget")
    parser.add_argument("--rounds", type=POSITIVE, default=3, help="interleaved timed passes per row")
    add_common_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None, **model_kwargs) -> None:
    """``model_kwargs`` go to ``timm.create_model`` (tests pass a tiny architecture)."""
    args = parse_args(argv)
    result = run(args, **model_kwargs)
    setting = (f"{args.model}, batch {args.batch}, {args.img_size} px, CPU fp32, {torch.get_num_threads()} threads, "
               f"median of {args.rounds} interleaved rounds; NOLA-MLP tasks k=l={args.k} r=4 (shared basis, "
               f"{args.bits}-bit files, {args.num_classes}-class heads), factor cache {args.cache_mb:g} MB; peft: LoRA "
               "r=4 on mlp.fc1+fc2 with the head in modules_to_save, one adapter per task")
    publish(__file__, argv, args, setting, printed(result), result, lambda png: plot(result, png, setting))


def printed(result: Dict) -> str:
    """What the run prints below its setting, from its raw numbers (``collect_results.py --check`` compares them)."""
    targets = "\n".join(f"- {line}" for line in target_lines(result))
    error = f"Mixed-batch logits differ from each task's own merged model by at most {result['max_logit_error']:.1e}."
    return f"{tables(result)}\n\n{targets}\n\n{error}"


if __name__ == "__main__":
    main()
