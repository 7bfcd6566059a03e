"""Where a training step's time and memory go, NOLA-MLP against LoRA q,v: which ops, how much time and memory each.

Each (model, method) runs in its own process, built as ``train_step.py`` builds it (random weights, same batch and
seed), after one warm-up step (shared bases generated, optimiser state created). Then, each over its own step:

* time: ``torch.profiler`` self CPU time and calls of every op, per step (median of ``--steps`` profiled steps);
* FLOPs: ``torch.utils.flop_counter.FlopCounterMode``, with the formulas it lacks added (``flop_formulas``): the
  in-place ``addmm_`` of the adapted layers' frozen products and the CPU flash attention;
* memory: every tensor storage the step creates is tracked (a ``TorchDispatchMode`` with a weak reference per
  storage), and at the step's peak the live bytes are grouped by the module and op that made them. This is
  deterministic: no allocator caching, no RSS noise from other processes. What the model holds across steps
  (weights, optimiser state) is not part of it; NOLA's shared basis codes are listed beside it, held between
  steps and at the peak (a CPU training step releases them before its activations grow).

    python benchmarks/profile_step.py                  # ViT-B/16 batch 8 and ViT-L/16 batch 4, 1 thread
    python benchmarks/profile_step.py --models vit_base_patch16_224:8 --steps 3
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import weakref
from typing import Callable, Container, Dict, List, Optional, Sequence

from common import (
    POSITIVE,
    add_common_arguments,
    answer_as_worker,
    held_basis_bytes,
    markdown_table,
    publish,
    pyplot,
    save_figure,
    suptitle,
)
from train_step import METHODS, build

MODELS = ("vit_base_patch16_224:8", "vit_large_patch16_224:4")
TOP_OPS = 12
TOP_TENSORS = 10


def _memory_tracker():
    """A dispatch mode that follows every storage created under it and snapshots the live ones at their peak.

    ``probe(made)`` is read at the peak too: memory the step holds then but did not create (NOLA's basis codes made
    before it; ``made``: the storages the step created and still holds, which the peak counts already).
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.module_tracker import ModuleTracker

    class MemoryTracker(TorchDispatchMode):
        def __init__(self, modules: ModuleTracker, probe: Callable[[Container[int]], int]) -> None:
            super().__init__()
            self.modules, self.probe = modules, probe
            self.probe_at_peak = 0
            self.live: Dict[int, tuple] = {}
            self.refs: Dict[int, weakref.ref] = {}
            self.total = self.peak = 0
            self.at_peak: Dict[str, int] = {}
            self.peak_op = ""

        def _freed(self, key: int, _ref) -> None:
            nbytes, _ = self.live.pop(key)
            self.refs.pop(key, None)
            self.total -= nbytes

        def _label(self, op: str) -> str:
            if self.modules.is_bw:
                return f"backward: {op}"  # the module tracker's backward attribution is approximate: op only
            module = max(self.modules.parents, key=len).split(".", 1)[-1]
            module = re.sub(r"\.\d+(?=\.|$)", ".*", module) if module != "Global" else "model"
            return f"{module}: {op}"

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                      if isinstance(t, torch.Tensor)}
            op = func.overloadpacket.__name__
            for tensor in tree_flatten(out)[0]:
                if not isinstance(tensor, torch.Tensor):
                    continue
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key in inputs or key in self.live or storage.nbytes() == 0:
                    continue  # a view or an in-place result: no new memory
                self.live[key] = (storage.nbytes(), self._label(op))
                self.refs[key] = weakref.ref(storage, lambda ref, key=key: self._freed(key, ref))
                self.total += storage.nbytes()
            if self.total > self.peak:
                self.peak, self.peak_op, self.probe_at_peak = self.total, self._label(op), self.probe(self.live)
                at_peak: Dict[str, int] = collections.Counter()
                for nbytes, label in self.live.values():
                    at_peak[label] += nbytes
                self.at_peak = dict(at_peak)
            return out

    return MemoryTracker


def basis_bytes_made_before(model, made: Container[int]) -> int:
    """Bytes of the basis codes the model's bank holds whose storage is not among ``made`` (pointers of the storages
    the step created): codes regenerated within the step are in its peak already."""
    from nola_vision.core.inject import adapter_state

    state = adapter_state(model)
    if state is None or state.bank is None:
        return 0
    storages = {codes.untyped_storage().data_ptr(): codes.untyped_storage().nbytes()
                for codes in state.bank.tensors().values()}
    return sum(nbytes for pointer, nbytes in storages.items() if pointer not in made)


def flop_formulas() -> Dict:
    """FLOP formulas ``FlopCounterMode`` lacks: without them it counts an in-place ``addmm_`` (every adapted layer's
    frozen product) and CPU attention as 0 FLOPs, so a method that adapts more layers would seem to compute less."""
    import torch
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    def in_place_product(self, left, right, *args, out_shape=None, **kwargs) -> int:
        return 2 * left[0] * left[1] * right[1]

    def attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    def attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    return {aten.addmm_: in_place_product, aten._scaled_dot_product_flash_attention_for_cpu: attention,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: attention_backward}


def worker(args: argparse.Namespace) -> Dict:
    """Profile one method on one model: op times, FLOPs and the tensors alive at the step's memory peak."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode
    from torch.utils.module_tracker import ModuleTracker


    torch.set_num_threads(args.threads or torch.get_num_threads())
    model = build(args.method, args.model, args.num_classes, "cpu", args.k, img_size=args.img_size).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=generator)
    labels = torch.randint(0, args.num_classes, (args.batch,), generator=generator)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()

    step()  # warm-up: bases and optimiser state exist from here on
    times: Dict[str, List[float]] = collections.defaultdict(list)
    calls: Dict[str, int] = {}
    totals = []
    for _ in range(args.steps):
        with profile(activities=[ProfilerActivity.CPU]) as profiled:
            step()
        events = profiled.key_averages()
        totals.append(sum(event.self_cpu_time_total for event in events) / 1e3)
        for event in events:
            times[event.key].append(event.self_cpu_time_total / 1e3)
            calls[event.key] = event.count
    with FlopCounterMode(display=False, custom_mapping=flop_formulas()) as flops:
        step()
    modules = ModuleTracker()
    with modules, _memory_tracker()(modules, lambda made: basis_bytes_made_before(model, made)) as memory:
        step()
    return {
        "model": args.model, "batch": args.batch, "method": args.method, "k": args.k, "threads": args.threads,
        "precision": args.precision,
        "step_ms": statistics.median(totals),
        "op_ms": {key: statistics.median(values + [0.0] * (args.steps - len(values))) for key, values in times.items()},
        "op_calls": calls,
        "flops": {str(op): count for op, count in flops.get_flop_counts()["Global"].items()},
        "peak_mib": memory.peak / 2**20, "peak_op": memory.peak_op,
        "at_peak_mib": {label: nbytes / 2**20 for label, nbytes in memory.at_peak.items()},
        "bases_mib": held_basis_bytes(model) / 2**20, "bases_at_peak_mib": memory.probe_at_peak / 2**20,
    }


def _model_batch(text: str) -> str:
    """A ``model:batch`` pair as given, checked (``vit_base_patch16_224:8``)."""
    model, _, batch = text.partition(":")
    if not model or not batch.isdigit() or int(batch) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is no model:batch pair (e.g. vit_base_patch16_224:8)")
    return text


def run_all(args: argparse.Namespace) -> List[Dict]:
    """Every (model, method) in a fresh process, so one run's memory never mixes with another's."""
    results = []
    for entry in args.models:
        model, batch = entry.split(":")
        for method in args.methods:
            print(f"profiling {method} on {model}, batch {batch} ...", file=sys.stderr, flush=True)
            command = [sys.executable, os.path.abspath(__file__), "--worker", method, "--model", model, "--batch", batch,
                       "--steps", str(args.steps), "--threads", str(args.threads), "--k", str(args.k),
                       "--img-size", str(args.img_size), "--num-classes", str(args.num_classes),
                       "--precision", args.precision]
            out = subprocess.run(command, capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"{method} on {model} failed:\n{out.stderr[-3000:]}")
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


def _label(result: Dict) -> str:
    return METHODS[result["method"]].format(k=result.get("k", 1024))


def _fmt(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def summary_table(runs: List[Dict]) -> str:
    reference = runs[0]
    columns = ["", *[_label(r) for r in runs], *[f"{r['method']} ÷ {reference['method']}" for r in runs[1:]]]
    rows = []
    for name, value in (("profiled step, CPU time (ms)", lambda r: r["step_ms"]),
                        ("FLOPs (G)", lambda r: sum(r["flops"].values()) / 1e9),
                        ("tensor memory peak above the step's start (MiB)", lambda r: r["peak_mib"]),
                        ("basis codes held between steps (MiB)", lambda r: r["bases_mib"]),
                        # made before the step: codes the step regenerated are in its peak already
                        ("basis codes held at the peak (MiB)", lambda r: r["bases_at_peak_mib"]),
                        ("peak + basis codes held at it (MiB)", lambda r: r["peak_mib"] + r["bases_at_peak_mib"])):
        values = [value(r) for r in runs]
        rows.append([name, *[_fmt(v, 1) for v in values],
                     *[f"{v / values[0]:.3f}" if values[0] else "-" for v in values[1:]]])
    rows.append(["peak reached in", *[f"`{r['peak_op']}`" for r in runs], *["" for _ in runs[1:]]])
    return markdown_table(columns, rows)


def largest_first(runs: List[Dict], key: str) -> List[str]:
    """The names of ``key``'s entries, largest in any run first; ties by name, so a JSON prints one table whatever
    the order of a set (``PYTHONHASHSEED``)."""
    return sorted({k for r in runs for k in r[key]}, key=lambda k: (-max(r[key].get(k, 0.0) for r in runs), k))


def op_table(runs: List[Dict]) -> str:
    """The ops with the most time in any run, their time per step and calls, and what the others add up to."""
    keys = largest_first(runs, "op_ms")
    shown = keys[:TOP_OPS]
    rows = [[f"`{key}`", *[f"{_fmt(r['op_ms'].get(key, 0.0), 1)} ({r['op_calls'].get(key, 0)})" for r in runs],
             *[_fmt(r["op_ms"].get(key, 0.0) - runs[0]["op_ms"].get(key, 0.0), 1) for r in runs[1:]]] for key in shown]
    rest = [sum(v for k, v in r["op_ms"].items() if k not in shown) for r in runs]
    rows.append(["all other ops", *[_fmt(v, 1) for v in rest], *[_fmt(v - rest[0], 1) for v in rest[1:]]])
    columns = ["op (self CPU time)", *[f"{r['method']}: ms (calls)" for r in runs],
               *[f"{r['method']} − {runs[0]['method']} (ms)" for r in runs[1:]]]
    return markdown_table(columns, rows)


def memory_table(runs: List[Dict]) -> str:
    """The tensors alive at each run's memory peak, by the module and op that made them."""
    labels = largest_first(runs, "at_peak_mib")
    shown = labels[:TOP_TENSORS]
    rows = [[f"`{label}`", *[_fmt(r["at_peak_mib"].get(label, 0.0), 1) for r in runs]] for label in shown]
    rows.append(["all other tensors", *[_fmt(sum(v for k, v in r["at_peak_mib"].items() if k not in shown), 1)
                                        for r in runs]])
    rows.append(["**peak**", *[f"**{_fmt(r['peak_mib'], 1)}**" for r in runs]])
    return markdown_table(["alive at the peak: made by module: op", *[f"{r['method']} (MiB)" for r in runs]], rows)


def report(results: List[Dict]) -> str:
    parts = []
    for model in dict.fromkeys(r["model"] for r in results):
        runs = [r for r in results if r["model"] == model]
        parts += [f"### {model}, batch {runs[0]['batch']}", "", summary_table(runs), "", op_table(runs), "",
                  memory_table(runs), ""]
    return "\n".join(parts).rstrip()


def printed(data: Dict) -> str:
    """What the run prints below its setting, from its raw numbers (``collect_results.py --check`` compares them)."""
    return report(data["results"])


def plot(results: List[Dict], path: str, title: str) -> None:
    """Per model: time of the top ops and memory at the peak by maker, one bar per method."""
    plt = pyplot()
    models = list(dict.fromkeys(r["model"] for r in results))
    figure, axes = plt.subplots(len(models), 2, figsize=(13, 4.5 * len(models)), squeeze=False)
    for row, model in zip(axes, models):
        runs = [r for r in results if r["model"] == model]
        for axis, key, unit in ((row[0], "op_ms", "self CPU time per step (ms)"),
                                (row[1], "at_peak_mib", "alive at the memory peak (MiB)")):
            names = largest_first(runs, key)[:10]
            height = 0.8 / len(runs)
            for i, r in enumerate(runs):
                axis.barh([j + i * height for j in range(len(names))], [r[key].get(n, 0.0) for n in names], height,
                          label=_label(r))
            axis.set_yticks([j + 0.4 - height / 2 for j in range(len(names))], names, fontsize=7)
            axis.invert_yaxis()
            axis.set_xlabel(unit)
            axis.set_title(model, fontsize=9)
        row[0].legend(fontsize=7)
    suptitle(figure, title)
    save_figure(figure, path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), type=_model_batch, help="model:batch pairs")
    parser.add_argument("--methods", nargs="+", default=["lora", "nola"], choices=list(METHODS))
    parser.add_argument("--steps", type=POSITIVE, default=1, help="profiled steps per run (median per op)")
    parser.add_argument("--k", type=POSITIVE, default=1024, help="NOLA bases per factor, k = l")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: the step under torch.autocast('cpu', dtype=torch.bfloat16)")
    add_common_arguments(parser)
    parser.set_defaults(threads=1)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if answer_as_worker(args, worker):
        return
    results = run_all(args)
    setting = (f"one training step (forward, cross-entropy, backward, Adam) after one warm-up step, cpu {args.precision}"
               f"{' autocast' if args.precision == 'bf16' else ''}, "
               f"{args.threads} torch thread{'s' if args.threads != 1 else ''}, median of {args.steps} profiled "
               f"step{'s' if args.steps != 1 else ''}")
    publish(__file__, argv, args, setting, printed({"results": results}), {"results": results},
            lambda png: plot(results, png, setting))


if __name__ == "__main__":
    main()
