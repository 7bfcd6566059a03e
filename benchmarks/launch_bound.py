"""The host's cost of a training step, NOLA-MLP against LoRA q,v: the part that bounds a GPU step launched op by op.

A ViT-B step at batch 32 in bf16 is launch-bound on an H200: `torch.profiler` gave our LoRA 10.6 ms of GPU work in
a 35-40 ms step, so the step time is what the host spends per op (Python, autograd, dispatch, kernel launch), and
the GPU table's ratios measure that. This script measures the same cost on the CPU: the model keeps its depth
(every op of every block runs) but takes a width of 64 and 16-px images (two tokens, four rows a product), so its
kernels cost next to nothing (at 32 px, 130 rows, a bfloat16 product of rank 4 took this CPU 15-20 µs of
arithmetic, about five launches' worth, and an adapted layer has seven), and nola_vision makes an accelerator's
choices (``functions.launch_bound`` answers True: 8M-value basis chunks and activation blocks, shared basis codes
held, one autograd node per adapted layer). NOLA takes k = l = 64 bases by default: an accelerator combines
ViT-B's 1,024 in one or two 8M-value chunks, the same ops, in microseconds, where this CPU would spend about 8 ms a
step on their arithmetic. Every method trains in one process, ``--steps`` steps each per round in alternating order;
a method's time is its median round, its ratio the median of the per-round ratios to our LoRA (quartiles
bracketed). "Ops" are the aten ops one step dispatches (each a kernel launch or a view on a GPU).

    python benchmarks/launch_bound.py                                # ViT-B's 12 blocks, bf16 autocast
    python benchmarks/launch_bound.py --model vit_large_patch16_224  # ViT-L's 24 blocks
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Dict, Optional, Sequence

import torch
from common import (
    NON_NEGATIVE,
    PEFT_METHODS,
    POSITIVE,
    add_common_arguments,
    markdown_table,
    paired_summary,
    publish,
    pyplot,
    save_figure,
)
from torch.utils._python_dispatch import TorchDispatchMode
from train_step import METHODS, build

import nola_vision.core.functions as functions

WIDTH = dict(embed_dim=64, num_heads=4, img_size=16)  # every block's ops, kernels next to free
DEFAULT_METHODS = ("linear", "lora", "nola", "peft_lora")
DEFAULT_K = 64  # see above


class CountedOps(TorchDispatchMode):
    """Counts the aten ops run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def measure(args: argparse.Namespace) -> Dict[str, Dict[str, Any]]:
    """Per method: step seconds of every round, and the ops of one step, with an accelerator's choices."""
    torch.set_num_threads(args.threads or 1)
    original = functions.launch_bound
    functions.launch_bound = lambda device: True
    try:
        return _measure(args)
    finally:
        functions.launch_bound = original


def _measure(args: argparse.Namespace) -> Dict[str, Dict[str, Any]]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, WIDTH["img_size"], WIDTH["img_size"], generator=generator)
    labels = torch.randint(0, 10, (args.batch,), generator=generator)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    steps = {}
    for method in args.methods:
        torch.manual_seed(0)
        model = build(method, args.model, 10, "cpu", args.k, **WIDTH).train()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, foreach=True)

        def step(model=model, optimizer=optimizer) -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = torch.nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()

        steps[method] = step
    results: Dict[str, Dict[str, Any]] = {method: {"paired_step_s": []} for method in args.methods}
    for method, step in steps.items():
        for _ in range(args.warmup):
            step()
        with CountedOps() as counter:
            step()
        results[method]["ops"] = counter.count
    for round_ in range(args.rounds):
        for method, step in list(steps.items())[:: 1 if round_ % 2 == 0 else -1]:  # alternating order
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            results[method]["paired_step_s"].append((time.perf_counter() - start) / args.steps)
    for result in results.values():
        result["step_s"] = statistics.median(result["paired_step_s"])
    return results


def table(results: Dict[str, Dict[str, Any]], k: int) -> str:
    reference = results["lora"]
    rows = []
    for method, result in results.items():
        ratio = "1" if method == "lora" else paired_summary(result, reference)
        rows.append([METHODS[method].format(k=k), f"{result['step_s'] * 1e3:.1f}", f"{result['ops']:,}",
                     f"{result['ops'] / reference['ops']:.2f}×", ratio])
    return markdown_table(["method", "host ms / step", "ops / step", "ops ÷ LoRA", "time ÷ LoRA (paired)"], rows)


def printed(data: Dict[str, Any]) -> str:
    """The table a run prints, from its raw numbers (``collect_results.py --check`` compares them)."""
    # A JSON written before it recorded ``k`` was run with the default: collect_results prints it again only while that
    # gives the table its run printed.
    return table(data["results"], data.get("k", DEFAULT_K))


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_base_patch16_224", help="its depth is kept, its width is 64")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS))
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--batch", type=POSITIVE, default=2)
    parser.add_argument("--k", type=POSITIVE, default=DEFAULT_K, help="NOLA's bases per factor (k = l; see above)")
    parser.add_argument("--steps", type=POSITIVE, default=5, help="steps per method and round")
    parser.add_argument("--rounds", type=POSITIVE, default=25)
    parser.add_argument("--warmup", type=NON_NEGATIVE, default=3)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if "lora" not in args.methods:
        parser.error("--methods must include lora (the ratios' reference)")
    if any(method in PEFT_METHODS for method in args.methods):
        try:
            import peft  # noqa: F401
        except ImportError:
            parser.error("the peft methods need peft (pip install -e '.[dev]')")
    results = measure(args)
    setting = (f"{args.model}'s blocks at width {WIDTH['embed_dim']} ({WIDTH['img_size']}-px images, batch "
               f"{args.batch}), {args.precision}, CPU with an accelerator's choices, {args.threads or 1} torch "
               f"thread(s), {args.rounds} paired rounds of {args.steps} steps.")
    publish(__file__, argv, args, setting, table(results, args.k), {"results": results, "k": args.k},
            plot=lambda path: plot(results, args.k, setting, path))


def plot(results: Dict[str, Dict[str, Any]], k: int, setting: str, path: str) -> None:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(8, 3.5))
    names = [METHODS[method].format(k=k) for method in results]
    axis.barh(names, [result["step_s"] * 1e3 for result in results.values()], color="tab:blue")
    axis.invert_yaxis()
    axis.set_xlabel("host ms per training step (median round)")
    axis.set_title(setting, fontsize=8, wrap=True)
    save_figure(figure, path)


if __name__ == "__main__":
    main()
