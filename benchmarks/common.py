"""Helpers shared by the benchmark scripts: run header, Markdown tables, output files, peft baselines."""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from torch import nn

from nola_vision.core.storage import write_bytes_atomic, write_text_atomic

# peft baselines on timm's fused ``attn.qkv`` (peft cannot adapt the q and v thirds alone), with their
# papers' ViT settings: VeRA r=256; FourierFT n=3000 (ViT-B) / 10000 (ViT-L) frequencies, scaling 300.
PEFT_METHODS = ("peft_lora", "peft_vera", "peft_fourierft")


def machine(device: str = "cpu") -> str:
    """The CPU model and usable cores (plus the GPU name for a CUDA device), in words."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"{cpu}, {cores} cores"
    if device.startswith("cuda"):
        import torch

        text += f", {torch.cuda.get_device_name(device)}"
    return text


def header(script: str, argv: Optional[Sequence[str]], device: str = "cpu") -> str:
    """One line: date, machine, torch version and the command that produced the table."""
    import torch

    args = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python", f"benchmarks/{Path(script).name}", *args])
    return (f"_{time.strftime('%Y-%m-%d %H:%M')}, {machine(device)}, torch {torch.__version__}, "
            f"`{command}`_")


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    """A Markdown table; the first ``left`` columns are left-aligned, the rest right-aligned."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" if i < left else "---:" for i in range(len(columns))) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def at_least(least: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number of ``least`` or more, so that a count of rounds, steps or tasks of 0 is
    refused with the parser's usage before anything is measured (not as a ZeroDivisionError after the runs)."""
    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is too small: give {least} or more")
        return value

    count.__name__ = f"at_least_{least}"  # argparse names the type in some messages
    return count


POSITIVE, NON_NEGATIVE = at_least(1), at_least(0)


def add_model_arguments(parser: Any, batch: int, bits: int) -> None:
    """--model, --batch, --img-size, --num-classes, --k and --bits of the ViT-B NOLA-MLP serving benchmarks."""
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=POSITIVE, default=batch)
    parser.add_argument("--img-size", type=POSITIVE, default=224)
    parser.add_argument("--num-classes", type=POSITIVE, default=10)
    parser.add_argument("--k", type=POSITIVE, default=1024, help="NOLA-MLP bases per factor, k = l (rank 4)")
    parser.add_argument("--bits", type=int, default=bits, help="bits of the saved task adapters")


def add_common_arguments(parser: Any) -> None:
    """--threads, --json and --png, which every benchmark script takes."""
    parser.add_argument("--threads", type=NON_NEGATIVE, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--png", help="also write a plot here")


def held_basis_bytes(model: nn.Module) -> int:
    """Bytes of NOLA's shared basis codes the model's bank holds now (0 for other methods)."""
    from nola_vision.core.inject import adapter_state

    state = adapter_state(model)
    return state.bank.nbytes() if state is not None and state.bank is not None else 0


def paired_ratios(result: Dict[str, Any], reference: Dict[str, Any]) -> List[float]:
    """Step time ÷ the reference's in every round of a paired run (both timed in one process, seconds apart)."""
    return [step / ref for step, ref in zip(result["paired_step_s"], reference["paired_step_s"])]


def paired_quartiles(result: Dict[str, Any], reference: Dict[str, Any]) -> List[float]:
    """The lower quartile, median and upper quartile of the per-round paired ratios (inclusive: within the rounds,
    numpy's default; the exclusive method puts them outside two rounds)."""
    ratios = paired_ratios(result, reference)
    return statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3


def paired_summary(result: Dict[str, Any], reference: Dict[str, Any]) -> str:
    """The median paired ratio with its quartiles, e.g. ``1.02× (1.01–1.03)``."""
    low, median, high = paired_quartiles(result, reference)
    return f"{median:.3f}× ({low:.3f}–{high:.3f})"


def answer_as_worker(args: Any, worker: Callable[[Any], Dict[str, Any]]) -> bool:
    """In a ``--worker`` subprocess (each measurement runs in a fresh process): measure method ``args.worker`` and
    print its result as one JSON line for the parent. False in the parent process."""
    if not args.worker:
        return False
    args.method = args.worker
    print(json.dumps(worker(args)))
    return True


def publish(script: str, argv: Optional[Sequence[str]], args: Any, setting: str, text: str, data: Dict[str, Any],
            plot: Optional[Callable[[str], None]] = None, device: str = "cpu") -> None:
    """How every benchmark ends: the header line, the setting and the tables printed (RESULTS.md quotes them as
    printed), the raw numbers with the header and setting written to ``--json`` (``collect_results.py`` prints the
    tables again under the header of the run the numbers come from), and the plot to ``--png``."""
    first = header(script, argv, device)
    print(first)
    print(f"\n{setting}\n")
    print(text)
    write_json(args.json, {"header": first, "setting": setting, **data})
    if args.png and plot is not None:
        try:
            import matplotlib  # noqa: F401  (a dev extra: a bare GPU machine may lack it)
        except ImportError:
            print(f"{script}: matplotlib is not installed, so {args.png} was not drawn (the numbers are written)",
                  file=sys.stderr)
            Path(args.png).unlink(missing_ok=True)  # an earlier run's plot is not this run's
            return
        plot(args.png)


def write_json(path: Optional[str], data: Any) -> None:
    """Write ``data`` to ``path`` (if given) in one atomic step: an earlier run's numbers stay whole if it fails."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def suptitle(figure: Any, text: str) -> None:
    """A figure title wrapped to the figure's width (the benchmark settings are long)."""
    figure.suptitle(textwrap.fill(text, 130), fontsize=8)


def save_figure(figure: Any, path: str) -> None:
    """Save ``figure`` as a PNG at ``path`` in one atomic step, and close it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, dpi=120, format="png")
    pyplot().close(figure)
    write_bytes_atomic(path, image.getvalue())


def fourierft_frequencies(model: nn.Module) -> int:
    """FourierFT's paper setting: 3000 spectral coefficients per layer for ViT-B (and smaller), 10000 for ViT-L."""
    return 10000 if getattr(model, "embed_dim", 768) > 768 else 3000


def peft_config(method: str, model: nn.Module, save_projection: bool = True) -> Any:
    """The peft config of a baseline on ``attn.qkv``, training the classifier head too."""
    from peft import FourierFTConfig, LoraConfig, VeraConfig

    shared = dict(target_modules=["qkv"], modules_to_save=["head"])
    if method == "peft_lora":
        return LoraConfig(r=4, lora_alpha=4, **shared)
    if method == "peft_vera":
        return VeraConfig(r=256, save_projection=save_projection, **shared)
    if method == "peft_fourierft":
        return FourierFTConfig(n_frequency=fourierft_frequencies(model), scaling=300.0, **shared)
    raise ValueError(f"unknown peft method {method!r}; choose from {list(PEFT_METHODS)}")


def block_targets(suffixes: List[str], blocks: int) -> List[str]:
    """Targets restricted to the first ``blocks`` transformer blocks (0: the suffixes alone, every block)."""
    if blocks <= 0:
        return list(suffixes)
    return [f"blocks.{i}.{suffix}" for i in range(blocks) for suffix in suffixes]
