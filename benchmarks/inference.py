"""Inference throughput of the base model, NOLA unmerged and NOLA merged, and the time to switch tasks.

Throughput: images/s of a forward pass (``torch.inference_mode``) at one batch size; the three models are
measured in interleaved rounds (order rotated every round) so that machine noise hits all of them alike,
and the median per model is reported. Task switch: a live model serving task A (merged) is switched to
task B's saved adapter by ``load_adapter`` on the merged model (reads the files, checks the basis fingerprint,
copies coefficients and head, and applies W += ΔW_new − ΔW_old in place); median over A→B switches (each timed
load changes the task), beside the naive unmerge + load_adapter + merge back B→A. The switches are timed in ``--switch-processes``
fresh processes (each builds the model and its two tasks), pooled, with each process's median shown: on a shared
VM the same switch can take twice as long in one process as in another.

    python benchmarks/inference.py                        # ViT-B/16, batch 32, 224 px, CPU
    python benchmarks/inference.py --model vit_large_patch16_224 --batch 8 --png inference.png
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from common import (
    NON_NEGATIVE,
    POSITIVE,
    add_common_arguments,
    add_model_arguments,
    answer_as_worker,
    markdown_table,
    publish,
    pyplot,
    save_figure,
    suptitle,
)
from torch import nn

import nola_vision as nv

MODELS = ("base model", "NOLA unmerged", "NOLA merged")
SWITCH_TARGET_MS = 50  # issue 5: a ViT-B task switch under 50 ms
# The floor of an in-place switch: every adapted weight read and written once, with no other work.
WEIGHTS_PASS = "memory_floor"


def base_model(model_name: str, img_size: int, num_classes: int, **kwargs) -> nn.Module:
    """The timm model with random weights of backbone seed 0 (the library's builder; the global RNG is untouched)."""
    from nola_vision.models.backbones import build_backbone

    with torch.random.fork_rng(devices=[]):  # the head too: every run builds the same model
        torch.manual_seed(0)
        return build_backbone(model_name, num_classes, pretrained=False, image_size=img_size, **kwargs).eval()


def randomise_trained(model: nn.Module, seed: int) -> nn.Module:
    """Give the adapter coefficients and head distinct values, as after training on one task."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(parameter + torch.randn(parameter.shape, generator=generator) * parameter.abs().mean())
    return model


def throughput(models: Dict[str, nn.Module], images: torch.Tensor, rounds: int) -> Dict[str, List[float]]:
    """Seconds per forward pass of each model, one warm-up pass each, then ``rounds`` interleaved rounds."""
    names = list(models)
    times: Dict[str, List[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for name in names:
            models[name](images)
        for index in range(rounds):
            for name in names[index % len(names):] + names[: index % len(names)]:
                start = time.perf_counter()
                models[name](images)
                times[name].append(time.perf_counter() - start)
    return times


def switch_times(model: nn.Module, directories: Sequence[Path], switches: int) -> Dict[str, List[float]]:
    """Seconds to switch a live merged model between tasks: load_adapter in place (W += ΔW_new − ΔW_old), always
    from task 0 to task 1, and, for comparison, the naive unmerge + load_adapter + merge back from task 1 to task 0,
    and the memory floor (one pass over the adapted weights, which any in-place switch must read and write). Every
    timed load changes the task: none reloads the live one."""
    parts: Dict[str, List[float]] = {"in_place": [], "unmerge_load_merge": [], WEIGHTS_PASS: []}
    nv.load_adapter(model, directories[0])
    nv.merge(model)
    weights = [layer.weight for layer in nv.adapted_layers(model).values()]
    for index in range(switches + 1):  # the first switch is a warm-up
        t0 = time.perf_counter()
        nv.load_adapter(model, directories[1])
        t1 = time.perf_counter()
        nv.unmerge(model)
        nv.load_adapter(model, directories[0])
        nv.merge(model)
        t2 = time.perf_counter()
        with torch.no_grad():
            for weight in weights:  # x 1.0 is exact: the weights are read and written, their values unchanged
                weight.mul_(1.0)
        t3 = time.perf_counter()
        if index:
            parts["in_place"].append(t1 - t0)
            parts["unmerge_load_merge"].append(t2 - t1)
            parts[WEIGHTS_PASS].append(t3 - t2)
    return parts


def switch_run(args: argparse.Namespace, **model_kwargs) -> Dict:
    """One process's task switches: the model and two saved tasks built, ``args.switches`` switches timed, then the
    live model's logits checked against the target task's unmerged model."""
    if args.threads:
        torch.set_num_threads(args.threads)
    config = nv.NOLAConfig(rank=4, num_basis_a=args.k, num_basis_b=args.k)
    base = base_model(args.model, args.img_size, args.num_classes, **model_kwargs)
    unmerged = randomise_trained(nv.inject(copy.deepcopy(base), config), seed=1)
    images = torch.randn(2, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as root:
        directories = [nv.save_adapter(unmerged, Path(root) / "task_a", bits=args.bits),
                       nv.save_adapter(randomise_trained(copy.deepcopy(unmerged), seed=2), Path(root) / "task_b",
                                       bits=args.bits)]
        live = nv.inject(copy.deepcopy(base), config)
        switches = switch_times(live, directories, args.switches)
        # the live model, switched in place to task B, must predict what B's adapter predicts unmerged
        nv.load_adapter(live, directories[1])
        reference = nv.load_adapter(nv.inject(copy.deepcopy(base), config), directories[1])
        with torch.inference_mode():
            error = (live(images) - reference(images)).abs().max().item()
    return {"switch_s": switches, "switch_max_logit_error": error}


def switch_in_fresh_process(args: argparse.Namespace, **model_kwargs) -> Dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", "switch", "--model", args.model,
               "--img-size", str(args.img_size), "--num-classes", str(args.num_classes), "--k", str(args.k),
               "--bits", str(args.bits), "--switches", str(args.switches), "--threads", str(args.threads),
               "--model-kwargs", json.dumps(model_kwargs)]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the switch process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace, **model_kwargs) -> Dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    config = nv.NOLAConfig(rank=4, num_basis_a=args.k, num_basis_b=args.k)
    base = base_model(args.model, args.img_size, args.num_classes, **model_kwargs)
    unmerged = randomise_trained(nv.inject(copy.deepcopy(base), config), seed=1)
    merged = nv.merge(copy.deepcopy(unmerged))
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))
    times = throughput(dict(zip(MODELS, (base, unmerged, merged))), images, args.rounds)
    del base, unmerged, merged
    runs = ([switch_in_fresh_process(args, **model_kwargs) for _ in range(args.switch_processes)]
            if args.switch_processes else [switch_run(args, **model_kwargs)])
    switches = {part: [s for r in runs for s in r["switch_s"][part]] for part in runs[0]["switch_s"]}
    per_process = {part: [statistics.median(r["switch_s"][part]) for r in runs] for part in switches}
    return {"throughput_s": times, "switch_s": switches, "switch_process_medians_s": per_process,
            "switch_max_logit_error": max(r["switch_max_logit_error"] for r in runs), "batch": args.batch}


def table(result: Dict) -> str:
    medians = {name: statistics.median(seconds) for name, seconds in result["throughput_s"].items()}
    base = medians[MODELS[0]]
    rows = [[name, f"{result['batch'] / seconds:.1f}", f"{seconds * 1000:.0f}", f"{base / seconds:.3f}"] for name, seconds in medians.items()]
    speed = markdown_table(["model", "images/s", "ms per batch (median)", "× base images/s"], rows)
    switch = {name: statistics.median(seconds) * 1000 for name, seconds in result["switch_s"].items()}
    processes = result.get("switch_process_medians_s", {})
    rows = [[name, f"{ms:.1f}", ", ".join(f"{s * 1000:.1f}" for s in processes.get(name, []))]
            for name, ms in switch.items()]
    return speed + "\n\n" + markdown_table(["task switch step", "ms (median)", "median of each process (ms)"], rows)


def switch_lines(result: Dict) -> str:
    """The in-place switch against its target and the weights pass it cannot beat, and the switch's logit error."""
    total = statistics.median(result["switch_s"]["in_place"]) * 1000
    floor = statistics.median(result["switch_s"][WEIGHTS_PASS]) * 1000
    return (f"Task switch (in place): {total:.1f} ms (issue target for ViT-B: < {SWITCH_TARGET_MS} ms); reading and "
            f"writing the adapted weights alone takes {floor:.1f} ms on this machine.\n"
            f"After switching, merged logits differ from the target adapter's unmerged logits by at most "
            f"{result['switch_max_logit_error']:.1e}.")


def printed(result: Dict) -> str:
    """What the run prints below its setting, from its raw numbers (``collect_results.py --check`` compares them)."""
    return f"{table(result)}\n\n{switch_lines(result)}"


def plot(result: Dict, path: str, title: str) -> None:
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    names = list(result["throughput_s"])
    rates = [[result["batch"] / s for s in result["throughput_s"][name]] for name in names]
    left.boxplot(rates)
    left.set_xticks(range(1, len(names) + 1), names)
    left.set_ylabel("images/s (each round)")
    parts = list(result["switch_s"])
    right.bar(parts, [statistics.median(result["switch_s"][name]) * 1000 for name in parts])
    right.axhline(SWITCH_TARGET_MS, color="tab:red", linestyle=":", label=f"target {SWITCH_TARGET_MS} ms")
    right.set_ylabel("ms (median)")
    right.set_title("task switch of a merged model", fontsize=9)
    right.legend(fontsize=8)
    suptitle(figure, title)
    save_figure(figure, path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, batch=32, bits=4)
    parser.add_argument("--rounds", type=POSITIVE, default=5, help="interleaved timed passes per model")
    parser.add_argument("--switches", type=POSITIVE, default=20, help="timed task switches per process")
    parser.add_argument("--switch-processes", type=NON_NEGATIVE, default=3,
                        help="fresh processes that time the switches (0: this one)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-kwargs", default="{}", help=argparse.SUPPRESS)
    add_common_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None, **model_kwargs) -> None:
    """``model_kwargs`` go to ``timm.create_model`` (tests pass a tiny architecture)."""
    args = parse_args(argv)
    if answer_as_worker(args, lambda worker_args: switch_run(worker_args, **json.loads(worker_args.model_kwargs))):
        return
    result = run(args, **model_kwargs)
    processes = f"in each of {args.switch_processes} fresh processes" if args.switch_processes else "in this process"
    setting = (f"{args.model}, batch {args.batch}, {args.img_size} px, CPU fp32, {torch.get_num_threads()} threads, "
               f"median of {args.rounds} interleaved rounds; NOLA-MLP k=l={args.k} r=4 (shared basis); "
               f"switch: median of {args.switches} switches between two {args.bits}-bit adapters {processes}, "
               "pooled")
    publish(__file__, argv, args, setting, printed(result), result,
            lambda png: plot(result, png, setting))


if __name__ == "__main__":
    main()
