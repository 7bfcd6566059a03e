"""ONNX Runtime latency of one graph for every task (trained tensors as inputs) against a task's merged graph.

For each method a ViT is adapted and one task saved; ``nv.export_onnx`` writes the merged single-task graph (the
task loaded onto a fresh model) and the task-input graph (``tasks_as_inputs=True``, fed ``nv.onnx_task_inputs``).
Both run in ONNX Runtime on the CPU at each batch size, in interleaved rounds (order rotated every round); the
median per graph is reported with the file sizes, export times and the largest logit difference between the graphs.

    python benchmarks/onnx_tasks.py                       # ViT-B/16, batch 1 and 32, 224 px, CPU
    python benchmarks/onnx_tasks.py --methods nola --batches 1 --rounds 2
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from common import POSITIVE, add_common_arguments, markdown_table, publish, pyplot, save_figure, suptitle
from compiled_switch import METHODS, adapter_config, save_tasks
from inference import base_model

import nola_vision as nv

GRAPHS = ("merged", "tasks")
RATIO_TARGET = (32, 1.3)  # issue 18: the task-input graph within 1.3× the merged graph's latency at batch 32


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def interleaved(calls: Dict[str, Callable[[], object]], rounds: int) -> Dict[str, List[float]]:
    """Seconds per call of every entry, one warm-up call each, then ``rounds`` rounds in rotated order."""
    names = list(calls)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for name in names:
        calls[name]()
    for index in range(rounds):
        for name in names[index % len(names):] + names[: index % len(names)]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return times


def measure(method: str, args: argparse.Namespace, base: torch.nn.Module, root: Path) -> Dict:
    task = save_tasks(nv.inject(copy.deepcopy(base), adapter_config(method, args.k)), root / method, 1, args.bits)[0]
    model = nv.load_adapter(copy.deepcopy(base), task)
    paths, export_s = {"merged": root / f"{method}_merged.onnx", "tasks": root / f"{method}_tasks.onnx"}, {}
    for graph, path in paths.items():
        start = time.perf_counter()
        nv.export_onnx(model, path, tasks_as_inputs=graph == "tasks")
        export_s[graph] = time.perf_counter() - start
    del model
    sessions = {graph: session(path, args.threads) for graph, path in paths.items()}
    inputs = {"merged": {}, "tasks": nv.onnx_task_inputs(task, paths["tasks"])}
    rows = []
    for batch in args.batches:
        images = torch.randn(batch, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(batch))
        feeds = {graph: {"images": images.numpy(), **inputs[graph]} for graph in GRAPHS}
        calls = {graph: (lambda graph=graph, feed=feeds[graph]: sessions[graph].run(None, feed)[0]) for graph in GRAPHS}
        times = interleaved(calls, args.rounds)
        error = float(np.abs(calls["tasks"]() - calls["merged"]()).max())
        rows.append({"batch": batch, "seconds": times, "max_logit_error": error})
    sizes = {graph: path.stat().st_size for graph, path in paths.items()}
    return {"method": method, "rows": rows, "bytes": sizes, "export_s": export_s, "task_inputs": len(inputs["tasks"])}


def run(args: argparse.Namespace, **model_kwargs) -> Dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    base = base_model(args.model, args.img_size, args.num_classes, **model_kwargs)
    with tempfile.TemporaryDirectory() as root:
        return {"methods": [measure(method, args, base, Path(root)) for method in args.methods]}


def ratio(row: Dict) -> float:
    return statistics.median(row["seconds"]["tasks"]) / statistics.median(row["seconds"]["merged"])


def tables(result: Dict, k: int) -> str:
    speed, files = [], []
    for entry in result["methods"]:
        name = METHODS[entry["method"]].format(k=k)
        for row in entry["rows"]:
            merged, tasks = (statistics.median(row["seconds"][graph]) * 1000 for graph in GRAPHS)
            speed.append([name, row["batch"], f"{merged:.0f}", f"{tasks:.0f}", f"{ratio(row):.2f}",
                          f"{row['max_logit_error']:.1e}"])
        files.append([name, f"{entry['bytes']['merged'] / 2**20:.1f}", f"{entry['bytes']['tasks'] / 2**20:.1f}",
                      entry["task_inputs"], f"{entry['export_s']['merged']:.1f}", f"{entry['export_s']['tasks']:.1f}"])
    return (markdown_table(["method", "batch", "merged graph ms (median)", "task-input graph ms (median)",
                            "× merged", "largest logit difference"], speed, left=2) + "\n\n" +
            markdown_table(["method", "merged graph MiB", "task-input graph MiB", "task inputs",
                            "merged export s", "task-input export s"], files))


def target_lines(result: Dict) -> List[str]:
    batch, limit = RATIO_TARGET
    lines = []
    for entry in result["methods"]:
        for row in entry["rows"]:
            if row["batch"] == batch:
                value = ratio(row)
                lines.append(f"{entry['method']}: task-input graph {value:.2f}× the merged graph's latency at batch "
                             f"{batch} (target ≤ {limit}×: {'met' if value <= limit else 'missed'})")
    return lines


def printed(result: Dict) -> str:
    """What the run prints below its setting, from its raw numbers (``collect_results.py --check`` compares them)."""
    # A JSON written before it recorded ``k`` was run with the default: collect_results prints it again only while that
    # gives the table its run printed.
    targets = "\n".join(f"- {line}" for line in target_lines(result))
    return f"{tables(result, result.get('k', parse_args([]).k))}\n\n{targets}"


def plot(result: Dict, path: str, title: str, k: int) -> None:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(10, 3.5))
    for entry in result["methods"]:
        batches = [row["batch"] for row in entry["rows"]]
        axis.plot(batches, [ratio(row) for row in entry["rows"]], marker="o", label=METHODS[entry["method"]].format(k=k))
    axis.axhline(1.0, color="gray", linestyle="--", label="merged graph")
    axis.plot([RATIO_TARGET[0]], [RATIO_TARGET[1]], linestyle="none", marker="_", markersize=16, color="tab:red",
              label="target")
    axis.set_xscale("log", base=2)
    axis.set_xticks(sorted({row["batch"] for entry in result["methods"] for row in entry["rows"]} | {RATIO_TARGET[0]}))
    axis.xaxis.set_major_formatter("{x:g}")
    axis.minorticks_off()
    axis.set_xlabel("batch")
    axis.set_ylabel("task-input graph latency, × merged")
    axis.legend(fontsize=8)
    suptitle(figure, title)
    save_figure(figure, path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batches", type=POSITIVE, nargs="+", default=[1, 32])
    parser.add_argument("--img-size", type=POSITIVE, default=224)
    parser.add_argument("--num-classes", type=POSITIVE, default=10)
    parser.add_argument("--k", type=POSITIVE, default=1024, help="NOLA-MLP bases per factor, k = l (rank 4)")
    parser.add_argument("--bits", type=int, default=16, help="bits of the saved task adapter")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--rounds", type=POSITIVE, default=5, help="interleaved timed runs per graph and batch")
    add_common_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None, **model_kwargs) -> None:
    """``model_kwargs`` go to ``timm.create_model`` (tests pass a tiny architecture)."""
    args = parse_args(argv)
    result = run(args, **model_kwargs)
    import onnxruntime as ort

    setting = (f"{args.model}, {args.img_size} px, ONNX Runtime {ort.__version__} CPU fp32, "
               f"{args.threads or 'default'} intra-op threads, median of {args.rounds} interleaved rounds; one "
               f"{args.bits}-bit task of {args.num_classes} classes; graphs by nv.export_onnx (merged, and "
               "tasks_as_inputs=True fed nv.onnx_task_inputs)")
    result["k"] = args.k
    publish(__file__, argv, args, setting, printed(result), result,
            lambda png: plot(result, png, setting, args.k))


if __name__ == "__main__":
    main()
