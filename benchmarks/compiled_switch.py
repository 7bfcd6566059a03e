"""Switching the task of a torch.compile'd model: time per switch and recompilations, NOLA-MLP and LoRA q,v.

For each method an unmerged ViT is adapted, three tasks are saved, and the model is compiled (inductor by default)
and warmed up. Then, ``--switches`` times: ``nv.load_adapter(compiled, next task)`` (reads and verifies the files,
copies the coefficients or LoRA factors and the head into the live parameters in place) and one compiled forward
pass. Reported: the median time per switch, the compiled forward pass after the warm-up and after the switches,
the graphs dynamo compiled during the switches (0: no recompilation), and the largest difference between the
compiled model's logits and the eager model's for each task.

    python benchmarks/compiled_switch.py                  # ViT-B/16, batch 1, 224 px, CPU, inductor
    python benchmarks/compiled_switch.py --backend aot_eager --switches 5
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

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
from torch._dynamo.testing import CompileCounterWithBackend

import nola_vision as nv

METHODS = {"nola": "NOLA-MLP k=l={k} r=4, shared basis", "lora": "LoRA q,v r=4"}
SWITCH_TARGET_MS = 50  # issue 18: a switch of a compiled ViT-B under 50 ms, with no recompilation


def adapter_config(method: str, k: int):
    if method == "nola":
        return nv.NOLAConfig(rank=4, num_basis_a=k, num_basis_b=k, targets=["mlp.fc1", "mlp.fc2"])
    return nv.LoRAConfig(rank=4, targets=["attn.q", "attn.v"])


def save_tasks(model: nn.Module, root: Path, count: int, bits: int) -> List[Path]:
    """``count`` tasks as after training: every trained tensor (LoRA's zero B too) moved by seeded noise."""
    generator = torch.Generator().manual_seed(0)
    trained = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in trained]
    directories = []
    with torch.no_grad():
        for index in range(count):
            for parameter, value in zip(trained, start):
                spread = value.abs().mean().clamp_min(1e-3)
                parameter.copy_(value + spread * torch.randn(value.shape, generator=generator))
            directories.append(nv.save_adapter(model, root / f"task{index}", bits=bits))
    return directories


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def measure(method: str, args: argparse.Namespace, base: nn.Module, images: torch.Tensor, root: Path) -> Dict:
    """One method: warm-up (compilation), then the timed switches, each followed by a compiled forward pass."""
    tasks = save_tasks(nv.inject(copy.deepcopy(base), adapter_config(method, args.k)), root / method, 3, args.bits)
    model = nv.load_adapter(copy.deepcopy(base), tasks[0])
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(args.backend)
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        # Two passes: with shared bases the batching hook compiles once more after the first has generated the codes.
        warmup_s = timed(lambda: compiled(images)) + timed(lambda: compiled(images))
        forward_before_s = [timed(lambda: compiled(images)) for _ in range(args.forwards)]
        frames = counter.frame_count
        switch_s, forward_s = [], []
        for index in range(1, args.switches + 1):
            switch_s.append(timed(lambda index=index: nv.load_adapter(compiled, tasks[index % len(tasks)])))
            forward_s.append(timed(lambda: compiled(images)))
        recompilations = counter.frame_count - frames
        errors = []
        for task in tasks:
            nv.load_adapter(compiled, task)
            errors.append((compiled(images) - model(images)).abs().max().item())  # model(): the eager module
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"method": method, "trained": trained, "warmup_s": warmup_s, "forward_before_s": forward_before_s,
            "switch_s": switch_s, "forward_s": forward_s, "frames": frames, "recompilations": recompilations,
            "max_logit_error": max(errors)}


def run(args: argparse.Namespace, **model_kwargs) -> Dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    base = base_model(args.model, args.img_size, args.num_classes, **model_kwargs)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as root:
        rows = [measure(method, args, base, images, Path(root)) for method in args.methods]
    return {"rows": rows, "batch": args.batch}


def label(row: Dict, k: int) -> str:
    return METHODS[row["method"]].format(k=k)


def table(result: Dict, k: int) -> str:
    rows = [[label(row, k), f"{row['trained']:,}", f"{statistics.median(row['switch_s']) * 1000:.1f}",
             f"{max(row['switch_s']) * 1000:.1f}", f"{statistics.median(row['forward_before_s']) * 1000:.0f}",
             f"{statistics.median(row['forward_s']) * 1000:.0f}", row["recompilations"], f"{row['max_logit_error']:.1e}",
             f"{row['warmup_s']:.1f}"] for row in result["rows"]]
    return markdown_table(["method", "trained values", "switch ms (median)", "switch ms (max)",
                           "compiled forward ms, before switches", "… after each switch (median)",
                           "graphs compiled during the switches", "largest logit difference from eager",
                           "warm-up incl. compilation (s)"], rows)


def target_lines(result: Dict) -> List[str]:
    lines = []
    for row in result["rows"]:
        ms = statistics.median(row["switch_s"]) * 1000
        met = ms <= SWITCH_TARGET_MS and row["recompilations"] == 0
        lines.append(f"{row['method']}: {ms:.1f} ms per switch, {row['recompilations']} recompilations in "
                     f"{len(row['switch_s'])} switches (target ≤ {SWITCH_TARGET_MS} ms and 0: {'met' if met else 'missed'})")
    return lines


def printed(result: Dict) -> str:
    """What the run prints below its setting, from its raw numbers (``collect_results.py --check`` compares them)."""
    # A JSON written before it recorded ``k`` was run with the default: collect_results prints it again only while that
    # gives the table its run printed.
    targets = "\n".join(f"- {line}" for line in target_lines(result))
    return f"{table(result, result.get('k', parse_args([]).k))}\n\n{targets}"


def plot(result: Dict, path: str, title: str, k: int) -> None:
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    names = [label(row, k) for row in result["rows"]]
    left.bar(names, [statistics.median(row["switch_s"]) * 1000 for row in result["rows"]])
    left.axhline(SWITCH_TARGET_MS, color="tab:red", linestyle=":", label=f"target {SWITCH_TARGET_MS} ms")
    left.set_ylabel("ms per switch (median)")
    left.tick_params(axis="x", labelsize=7)
    left.legend(fontsize=8)
    for name, row in zip(names, result["rows"]):
        right.plot(range(1, len(row["forward_s"]) + 1), [s * 1000 for s in row["forward_s"]], marker=".", label=name)
    right.xaxis.get_major_locator().set_params(integer=True)
    right.set_xlabel("switch")
    right.set_ylabel("compiled forward ms after the switch")
    right.set_ylim(bottom=0)
    right.legend(fontsize=7)
    suptitle(figure, title)
    save_figure(figure, path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, batch=1, bits=16)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--switches", type=POSITIVE, default=20, help="timed switches between three tasks")
    parser.add_argument("--forwards", type=POSITIVE, default=3, help="compiled forward passes timed before the switches")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    add_common_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None, **model_kwargs) -> None:
    """``model_kwargs`` go to ``timm.create_model`` (tests pass a tiny architecture)."""
    args = parse_args(argv)
    result = run(args, **model_kwargs)
    setting = (f"{args.model}, unmerged, torch.compile backend {args.backend}, forward batch {args.batch}, "
               f"{args.img_size} px, CPU fp32, {torch.get_num_threads()} threads; {args.switches} switches between "
               f"three {args.bits}-bit tasks by nv.load_adapter on the compiled model")
    result["k"] = args.k
    publish(__file__, argv, args, setting, printed(result), result,
            lambda png: plot(result, png, setting, args.k))


if __name__ == "__main__":
    main()
