"""Training-step time and peak memory of NOLA against LoRA, a linear probe and peft's LoRA, VeRA and FourierFT.

Each measurement runs in its own fresh process (so peaks do not mix) on the same timm model with random
weights, batch and seed: forward, cross-entropy, backward and an Adam step, timed after warm-up.
The training peak is the highest memory of the timed steps above the memory right before them, after the warm-up
has built everything a run keeps across steps (optimiser state, compiled code); what the warm-up kept is listed
beside it ("kept across steps", the same for every step of a long run). NOLA's shared basis codes count as step
memory, not as kept: a CPU training step holds them only between its backward pass and the next forward pass.
On CUDA both come from the caching allocator, on the CPU from the process's RSS (VmHWM, reset after the warm-up; glibc's mmap
threshold is fixed so freed tensors return to the OS). With ``--rounds`` every method is measured again, in
alternating order: its step time is the median round's, its memory the highest round's (training peak and kept
each on its own, so their sum bounds any one round's from above). Ratios are to our LoRA (q,v r=4) measured in the same run; in the
layer sweep, to our LoRA on the same blocks. peft's methods adapt the fused ``attn.qkv`` (peft cannot target its
q and v thirds alone).

    python benchmarks/train_step.py                      # ViT-B/16, batch 8, 224 px, CPU
    python benchmarks/train_step.py --sweep k --png k.png          # k = l = 256 ... 4096
    python benchmarks/train_step.py --sweep layers --png layers.png  # adapted blocks 1 ... depth
    python benchmarks/train_step.py --device cuda --precision bf16 --model vit_large_patch16_224
    python benchmarks/train_step.py --methods lora nola --compile --warmup 2   # eager and torch.compile side by side
    python benchmarks/train_step.py --methods lora nola --threads 1 --rounds 5  # NOLA vs LoRA on a shared machine
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from common import (
    NON_NEGATIVE,
    PEFT_METHODS,
    POSITIVE,
    add_common_arguments,
    answer_as_worker,
    block_targets,
    held_basis_bytes,
    markdown_table,
    paired_summary,
    peft_config,
    publish,
    pyplot,
    save_figure,
    suptitle,
)

METHODS = {
    "linear": "linear probe (head only)",
    "lora": "LoRA q,v r=4 (ours)",
    "nola": "NOLA-MLP k=l={k} r=4, shared basis",
    "nola_held": "NOLA-MLP k=l={k} r=4, shared basis held (set_basis_holding)",
    "nola_per_layer": "NOLA-MLP k=l={k} r=4, per-layer basis",
    "peft_lora": "peft LoRA attn.qkv r=4",
    "peft_vera": "peft VeRA attn.qkv r=256",
    "peft_fourierft": "peft FourierFT attn.qkv",
}
SWEEP_K = (256, 512, 1024, 2048, 4096)


def build(method: str, model_name: str, num_classes: int, device: str, k: int = 1024, blocks: int = 0,
          img_size: int = 224, **model_kwargs):
    """The model with the method's trainable parameters (random weights; no download).

    ``blocks`` > 0 adapts only the first ``blocks`` transformer blocks (our methods only), so backward
    always reaches block 0 and a layer sweep measures the adapters' own cost. ``model_kwargs`` go to timm
    (``embed_dim``, ``num_heads``: ``launch_bound.py``'s narrow models).
    """
    import timm

    import nola_vision as nv

    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, img_size=img_size,
                              **model_kwargs).to(device)
    if method == "linear":
        return nv.inject(model, "linear")
    if method == "lora":
        return nv.inject(model, nv.LoRAConfig(rank=4, targets=block_targets(["attn.q", "attn.v"], blocks)))
    if method in ("nola", "nola_held", "nola_per_layer"):
        basis = "per_layer" if method == "nola_per_layer" else "shared"
        targets = block_targets(["mlp.fc1", "mlp.fc2"], blocks)
        model = nv.inject(model, nv.NOLAConfig(rank=4, num_basis_a=k, num_basis_b=k, targets=targets, basis=basis))
        return nv.set_basis_holding(model, True) if method == "nola_held" else model
    if method in PEFT_METHODS:
        from peft import get_peft_model

        return get_peft_model(model, peft_config(method, model)).to(device)
    raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def training_step(args: argparse.Namespace, method: str):
    """The method's model (built and set up as ``args`` says) and one training step on a fixed batch."""
    import torch

    device = torch.device(args.device)
    torch.manual_seed(0)  # every method's process builds the same backbone and head
    model = build(method, args.model, args.num_classes, args.device, args.k, args.blocks, args.img_size).train()
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)  # timm's contract: blocks recompute their activations in backward
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-3)
    forward = torch.compile(model, backend=args.compile_backend) if args.compile else model
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=generator).to(device)
    labels = torch.randint(0, args.num_classes, (args.batch,), generator=generator).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = torch.nn.functional.cross_entropy(forward(images), labels)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return model, trainable, step


def worker(args: argparse.Namespace) -> Dict[str, float]:
    """Run one method and return its median step time and training peak memory (``paired``: every method)."""
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.method == "paired":
        return paired_worker(args)
    device = torch.device(args.device)
    model, trainable, step = training_step(args, args.method)

    def memory() -> int:
        if device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return _rss_kib("VmRSS") * 1024

    before = memory()
    warmup = []
    for _ in range(args.warmup):
        start = time.perf_counter()
        step()
        warmup.append(time.perf_counter() - start)
    # The steady state: weights, optimiser state, compiled code. The training peak is everything above it. NOLA's
    # basis codes count as step memory: a CPU step releases them before its activations grow and generates them
    # again in backward (a GPU step holds them throughout, so there they are under the peak as well).
    codes = held_basis_bytes(model)
    resting = memory() - codes
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current RSS
    times: List[float] = []
    cpu_times: List[float] = []
    for _ in range(args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_kib("VmHWM") * 1024
    return {
        "method": args.method,
        "k": args.k,
        "blocks": args.blocks,
        "compiled": bool(args.compile),
        "step_s": statistics.median(times),
        # CPU time of the process: less sensitive than wall time to other processes on a shared machine
        "step_cpu_s": statistics.median(cpu_times),
        "warmup_s": sum(warmup),  # with --compile: the compilation
        "train_mem_mb": (peak - resting) / 2**20,
        "kept_mb": (resting - before) / 2**20,
        "codes_mb": codes / 2**20,
        "peak_mb": peak / 2**20,
        "trainable": sum(p.numel() for p in trainable),
    }


def paired_worker(args: argparse.Namespace) -> Dict[str, Dict[str, List[float]]]:
    """Every method in one process, one step of each per round in alternating order: every round's ratio compares
    steps seconds apart, so the slow spells of a shared machine, which swing fresh-process rounds by ±10-20%,
    cancel out. Memory is not measured here (the methods share the process)."""
    steps = {method: training_step(args, method)[2] for method in args.methods}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times: Dict[str, Dict[str, List[float]]] = {method: {"step_s": [], "step_cpu_s": []} for method in steps}
    for round_index in range(args.paired):
        for method in list(steps)[:: 1 if round_index % 2 == 0 else -1]:
            start, cpu_start = time.perf_counter(), time.process_time()
            steps[method]()
            times[method]["step_s"].append(time.perf_counter() - start)
            times[method]["step_cpu_s"].append(time.process_time() - cpu_start)
    return times


def model_depth(model_name: str) -> int:
    """Number of transformer blocks, read from a model built on the meta device (no memory, no init)."""
    import timm
    import torch

    with torch.device("meta"):
        return len(timm.create_model(model_name, pretrained=False).blocks)


def check_blocks(args: argparse.Namespace) -> None:
    """Refuse adapting more blocks than the model has (``--blocks``, ``--sweep layers --values``) before any run: the
    runs would adapt all of them and label the rows with the number given."""
    option = "--values" if args.sweep == "layers" else "--blocks"
    wanted = max(args.values or [0]) if args.sweep == "layers" else 0 if args.sweep else args.blocks
    if wanted and wanted > (depth := model_depth(args.model)):
        raise SystemExit(f"{option} {wanted} exceeds {args.model}'s {depth} blocks: give {depth} or fewer")


def jobs(args: argparse.Namespace) -> List[Dict[str, int]]:
    """The (method, k, blocks) measurements of the chosen mode."""
    if args.sweep == "k":
        values = args.values or list(SWEEP_K)
        return [{"method": "lora", "k": args.k, "blocks": 0}] + [
            {"method": method, "k": k, "blocks": 0} for k in values for method in ("nola", "nola_per_layer")
        ]
    if args.sweep == "layers":
        depth = model_depth(args.model)
        values = args.values or sorted({1, depth // 4, depth // 2, 3 * depth // 4, depth} - {0})
        return [{"method": method, "k": args.k, "blocks": n} for n in values for method in ("lora", "nola", "nola_per_layer")]
    modes = (False, True) if args.compile else (False,)
    return [{"method": method, "k": args.k, "blocks": args.blocks, "compiled": compiled}
            for method in args.methods for compiled in modes]


def run_all(args: argparse.Namespace) -> List[Dict[str, float]]:
    """Measure every job ``args.rounds`` times, in alternating order: each job's median step time, highest memory.

    A fresh process per measurement keeps memory peaks apart; alternating rounds and the median keep a slow spell
    of a shared machine from landing on one method only.
    """
    # glibc returns freed memory at once, so a CPU process's resident peak is the step's; a GPU step is bound by the
    # host's launches instead, which these settings would slow (about 3% on launch_bound.py's stand-in)
    env = (dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0") if args.device == "cpu"
           else dict(os.environ))
    todo = jobs(args)
    rounds: List[List[Dict]] = [[] for _ in todo]
    for round_index in range(args.rounds):
        order = list(range(len(todo)))[:: 1 if round_index % 2 == 0 else -1]
        for index in order:
            job = todo[index]
            command = [sys.executable, os.path.abspath(__file__), "--worker", job["method"], "--k", str(job["k"]),
                       "--blocks", str(job["blocks"])] + (["--compile"] if job.get("compiled") else []) + _shared_flags(args)
            print(f"round {round_index + 1}/{args.rounds}: {label(job)} (blocks: {job['blocks'] or 'all'}) ...",
                  file=sys.stderr, flush=True)
            rounds[index].append(_run_worker(job["method"], command, env))
    results = [median_round(measured) for measured in rounds]
    if args.paired:
        print(f"paired: {', '.join(args.methods)} in one process, {args.paired} rounds ...", file=sys.stderr, flush=True)
        command = [sys.executable, os.path.abspath(__file__), "--worker", "paired", "--methods", *args.methods,
                   "--paired", str(args.paired), "--k", str(args.k), "--blocks", str(args.blocks)] + _shared_flags(args)
        paired = _run_worker("paired", command, dict(os.environ))  # glibc's defaults: no memory is measured here
        for result in results:
            result.update({f"paired_{key}": values for key, values in paired[result["method"]].items()})
    return results


def _run_worker(name: str, command: List[str], env: Dict[str, str]) -> Dict:
    out = subprocess.run(command, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_round(measured: List[Dict]) -> Dict:
    """One job's result over its rounds: the median step time, the highest memory, and every round's step time."""
    result = dict(measured[0])
    for key in ("step_s", "step_cpu_s"):
        result[key] = statistics.median(r[key] for r in measured)
    for key in ("train_mem_mb", "kept_mb", "peak_mb"):
        result[key] = max(r[key] for r in measured)
    result["step_s_rounds"] = [r["step_s"] for r in measured]
    return result


def _shared_flags(args: argparse.Namespace) -> List[str]:
    flags = []
    for name in ("model", "device", "batch", "img_size", "steps", "warmup", "num_classes", "precision", "threads",
                 "compile_backend"):
        flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return flags + (["--grad-checkpointing"] if args.grad_checkpointing else [])


def label(result: Dict) -> str:
    return METHODS[result["method"]].format(k=result["k"]) + (", torch.compile" if result.get("compiled") else "")


def reference(results: List[Dict], result: Dict) -> Optional[Dict]:
    """Our LoRA on the same blocks and in the same mode (eager or compiled) as ``result``."""
    loras = [r for r in results if r["method"] == "lora" and r.get("compiled") == result.get("compiled")]
    same = [r for r in loras if r["blocks"] == result["blocks"]]
    return (same or loras or [None])[0]


def table(results: List[Dict], sweep: Optional[str] = None) -> str:
    columns = ["method", "trainable params", "step (s, median)", "× LoRA", "training peak (MiB)", "× LoRA",
               "kept across steps (MiB)", "peak + kept, × LoRA"]
    if sweep == "layers":
        columns.insert(0, "adapted blocks")
    compiled = any(r.get("compiled") for r in results)
    if compiled:
        columns += ["speed-up of torch.compile", "warm-up incl. compilation (s)"]
    paired = all("paired_step_s" in r for r in results)
    if paired:
        columns += ["paired step (s, median)", "paired × LoRA (quartiles)"]
    rows = []
    for r in results:
        ref = reference(results, r)
        total = r["train_mem_mb"] + r["kept_mb"]
        ref_total = ref["train_mem_mb"] + ref["kept_mb"] if ref else 0.0
        row = [label(r), f"{r['trainable']:,}", f"{r['step_s']:.3f}",
               f"{r['step_s'] / ref['step_s']:.2f}" if ref else "-", f"{r['train_mem_mb']:.0f}",
               f"{r['train_mem_mb'] / ref['train_mem_mb']:.2f}" if ref and ref["train_mem_mb"] > 0 else "-",
               f"{r['kept_mb']:.0f}", f"{total / ref_total:.2f}" if ref_total > 0 else "-"]
        if compiled:
            eager = next((e for e in results if not e.get("compiled") and (e["method"], e["k"], e["blocks"])
                          == (r["method"], r["k"], r["blocks"])), None)
            row += [f"{eager['step_s'] / r['step_s']:.2f}×" if r.get("compiled") and eager else "-",
                    f"{r['warmup_s']:.1f}" if r.get("compiled") else "-"]
        if paired:
            row += [f"{statistics.median(r['paired_step_s']):.3f}", paired_summary(r, ref) if ref else "-"]
        rows.append(([r["blocks"]] if sweep == "layers" else []) + row)
    return markdown_table(columns, rows, left=2 if sweep == "layers" else 1)


def printed(data: Dict) -> str:
    """The table a run prints, from its raw numbers (``collect_results.py --check`` compares them). Results written
    before the JSON named its sweep tell it by what varies: the adapted blocks, or NOLA's k."""
    results = data["results"]
    sweep = data.get("sweep")
    if "sweep" not in data and len({r["blocks"] for r in results}) > 1:
        sweep = "layers"
    elif "sweep" not in data and len({r["k"] for r in results if r["method"] != "lora"}) > 1:
        sweep = "k"
    return table(results, sweep)


def plot(results: List[Dict], sweep: Optional[str], path: str, title: str) -> None:
    """Bars of the ratios to our LoRA, or for a sweep step time and memory against k or adapted blocks."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    metrics = (("step_s", "step time (s, median)"), ("train_mem_mb", "training peak memory (MiB)"))
    if sweep is None:
        names = [label(r) for r in results]
        for axis, (key, name) in zip(axes, metrics):
            ratios = [r[key] / ref[key] if (ref := reference(results, r)) and ref[key] > 0 else 0.0 for r in results]
            bars = axis.barh(names, ratios, color="tab:blue")
            axis.bar_label(bars, labels=[f"{ratio:.2f}×" for ratio in ratios], fontsize=8, padding=2)
            axis.axvline(1.0, color="k", linestyle="--", linewidth=0.8)
            axis.set_xscale("log")
            axis.set_xlabel(f"{name.split(' (')[0]} × our LoRA (log scale)")
            axis.invert_yaxis()
        axes[1].set_yticklabels([])
    else:
        key_x = "k" if sweep == "k" else "blocks"
        for axis, (key, name) in zip(axes, metrics):
            for method in ("lora", "nola", "nola_per_layer"):
                points = sorted((r[key_x], r[key]) for r in results if r["method"] == method)
                if sweep == "k" and method == "lora":
                    axis.axhline(points[0][1], color="k", linestyle="--", label=METHODS["lora"])
                    continue
                text = METHODS[method].replace("k=l={k} ", "" if sweep == "k" else f"k=l={results[0]['k']} ")
                axis.plot(*zip(*points), marker="o", label=text)
            axis.set_xlabel("k = l (bases per factor)" if sweep == "k" else "adapted blocks (from the first)")
            axis.set_ylabel(name)
            if sweep == "k":
                axis.set_xscale("log", base=2)
        axes[0].legend(fontsize=8)
    suptitle(figure, title)
    save_figure(figure, path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=POSITIVE, default=8)
    parser.add_argument("--img-size", type=POSITIVE, default=224)
    parser.add_argument("--steps", type=POSITIVE, default=5)
    parser.add_argument("--warmup", type=NON_NEGATIVE, default=2)
    parser.add_argument("--rounds", type=POSITIVE, default=1, help="measure every method this often, in alternating "
                        "order: the median step time, the highest memory (for a shared, noisy machine)")
    parser.add_argument("--paired", type=NON_NEGATIVE, default=0, help="also time the methods in one process for this many "
                        "rounds, one step each per round in alternating order: a ratio per round; their median resolves about "
                        "2%% on a noisy machine (memory comes from the fresh-process runs)")
    parser.add_argument("--num-classes", type=POSITIVE, default=10)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "nola_held"], choices=list(METHODS))
    parser.add_argument("--k", type=POSITIVE, default=1024, help="NOLA bases per factor, k = l")
    parser.add_argument("--blocks", type=NON_NEGATIVE, default=0, help="adapt only the first N blocks (0: all)")
    parser.add_argument("--sweep", choices=["k", "layers"], help="scale k (256..4096) or the adapted blocks")
    parser.add_argument("--values", type=POSITIVE, nargs="+", help="override the sweep's k values or block counts")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="recompute each block's activations in backward (timm's set_grad_checkpointing)")
    parser.add_argument("--compile", action="store_true", help="measure every method also under torch.compile(model), "
                        "after warm-up steps that include compilation (use --warmup 2 or more: shared bases compile "
                        "twice, before and after their codes are generated)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default: inductor)")
    add_common_arguments(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _has_cuda() -> bool:
    import torch  # here only: this (parent) process measures nothing, its workers import torch themselves

    return torch.cuda.is_available()


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if answer_as_worker(args, worker):
        return
    if args.sweep and (args.compile or args.paired):
        raise SystemExit("--compile and --paired compare the steps of --methods; run them without --sweep")
    if args.compile and args.paired:  # the paired worker builds eager steps: its times would fill the compiled rows
        raise SystemExit("--paired times eager steps only: run --compile without it")
    check_blocks(args)
    if any(method.startswith("peft_") for method in args.methods) and importlib.util.find_spec("peft") is None:
        raise SystemExit("the peft methods need peft (pip install -e '.[dev]'), or leave them out of --methods: "
                         f"--methods {' '.join(m for m in args.methods if not m.startswith('peft_'))}")
    if args.device.startswith("cuda") and not _has_cuda():
        raise SystemExit(f"--device {args.device}: torch sees no CUDA device here (torch.cuda.is_available() is False)")
    results = run_all(args)
    setting = (f"{args.model}, batch {args.batch}, {args.img_size} px, {args.device} {args.precision}, "
               f"median of {args.steps} steps after {args.warmup} warm-up"
               + (", gradient checkpointing" if args.grad_checkpointing else "")
               + (f", torch.compile backend {args.compile_backend}" if args.compile else "")
               + (f", median of {args.rounds} rounds in alternating order" if args.rounds > 1 else "")
               + (f"; paired: {args.paired} rounds of one step per method in one process" if args.paired else "")
               + (f", {args.threads} torch thread{'s' if args.threads > 1 else ''}" if args.threads else ""))
    publish(__file__, argv, args, setting, table(results, args.sweep), {"results": results, "sweep": args.sweep},
            lambda png: plot(results, args.sweep, png, setting), device=args.device)


if __name__ == "__main__":
    main()
