"""Training-step time and peak memory of NOLA against LoRA, a linear probe and peft's LoRA, side by side.

Each method runs in its own fresh process (so peaks do not mix) on the same timm model with random
weights, batch and seed: forward, cross-entropy, backward and an Adam step, timed after warm-up.
Peak memory is the training peak above the resting model: on CUDA from the caching allocator, on the CPU
from the process's peak RSS (VmHWM, reset after the model is built; glibc's mmap threshold is fixed so
freed tensors return to the OS).

    python benchmarks/train_step.py                      # ViT-B/16, batch 8, 224 px, CPU
    python benchmarks/train_step.py --device cuda --precision bf16 --model vit_large_patch16_224
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List

METHODS = {
    "linear": "linear probe (head only)",
    "lora": "LoRA q,v r=4 (ours)",
    "nola": "NOLA-MLP k=l=1024 r=4, shared basis",
    "nola_per_layer": "NOLA-MLP k=l=1024 r=4, per-layer basis",
    "peft_lora": "peft LoRA attn.qkv r=4",
}


def build(method: str, model_name: str, num_classes: int, device: str):
    """The model with the method's trainable parameters (random weights; no download)."""
    import timm
    import torch

    import nola_vision as nv

    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes).to(device)
    if method == "linear":
        return nv.inject(model, "linear")
    if method == "lora":
        return nv.inject(model, nv.LoRAConfig(rank=4, targets=["attn.q", "attn.v"]))
    if method in ("nola", "nola_per_layer"):
        basis = "shared" if method == "nola" else "per_layer"
        return nv.inject(model, nv.NOLAConfig(rank=4, num_basis_a=1024, num_basis_b=1024, basis=basis))
    if method == "peft_lora":
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=["qkv"], modules_to_save=["head"]))
        return peft_model.to(device)
    raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(args: argparse.Namespace) -> Dict[str, float]:
    """Run one method and return its median step time and training peak memory."""
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = torch.device(args.device)
    model = build(args.method, args.model, args.num_classes, args.device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=generator).to(device)
    labels = torch.randint(0, args.num_classes, (args.batch,), generator=generator).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # The resting state: weights, optimiser, inputs. Everything above it (bases included) is training memory.
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        resting = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current RSS
        resting = _rss_kib("VmRSS") * 1024
    times: List[float] = []
    for index in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        if index >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_kib("VmHWM") * 1024
    return {
        "method": args.method,
        "step_s": statistics.median(times),
        "train_mem_mb": (peak - resting) / 2**20,
        "peak_mb": peak / 2**20,
        "trainable": sum(p.numel() for p in trainable),
    }


def run_all(args: argparse.Namespace) -> List[Dict[str, float]]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    results = []
    for method in args.methods:
        command = [sys.executable, __file__, "--worker", method] + _shared_flags(args)
        print(f"running {method} ...", file=sys.stderr, flush=True)
        out = subprocess.run(command, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{method} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


def _shared_flags(args: argparse.Namespace) -> List[str]:
    flags = []
    for name in ("model", "device", "batch", "img_size", "steps", "warmup", "num_classes", "precision", "threads"):
        flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return flags


def table(results: List[Dict[str, float]], reference: str = "lora") -> str:
    ref = next((r for r in results if r["method"] == reference), None)
    lines = [
        "| method | trainable params | step (s, median) | × LoRA | training peak (MiB) | × LoRA |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        time_ratio = f"{r['step_s'] / ref['step_s']:.2f}" if ref else "-"
        mem_ratio = f"{r['train_mem_mb'] / ref['train_mem_mb']:.2f}" if ref else "-"
        lines.append(
            f"| {METHODS[r['method']]} | {r['trainable']:,} | {r['step_s']:.3f} | {time_ratio} | "
            f"{r['train_mem_mb']:.0f} | {mem_ratio} |"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        args.method = args.worker
        print(json.dumps(worker(args)))
        return
    results = run_all(args)
    import platform

    import torch

    print(
        f"{args.model}, batch {args.batch}, {args.img_size} px, {args.device} {args.precision}, "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}"
    )
    print(table(results))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
