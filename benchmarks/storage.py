"""Bytes on disk per task: our NOLA and LoRA adapter files against peft's ``save_pretrained`` (LoRA, VeRA, FourierFT).

Every file holds the trained adapter and the classifier head (a CIFAR-10 head of 10 classes, a CUB head of
200), as each library writes them: ours ``adapter_config.json`` + ``adapter_model.safetensors`` (coefficients
at 16/8/4 bits, head float16, or 8-bit codes below 16 bits; never the random bases), peft's the same two
file names (its README.md is not counted). peft's methods adapt the fused ``attn.qkv``: peft cannot target
the q and v thirds our LoRA adapts. Models are built on the meta device and filled from a fixed generator (no
300M-parameter random init). The trained tensors get trained-like values from it too: a quantised file records each
tensor's minimum and step as decimal text, whose length depends on the values (an untrained adapter's 1/64 and 0
are shorter than a trained one's, by about 1.3 KB in a 4-bit ViT-B file).

    python benchmarks/storage.py --png storage.png
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from common import markdown_table, peft_config, publish, pyplot, save_figure
from torch import nn

# The paper's NOLA presets (NOLA-MLP): ViT-B r=4, ViT-L r=1, k = l = 1024.
NOLA_RANK = {"vit_base_patch16_224": 4, "vit_large_patch16_224": 1}
HEADS = {"CIFAR-10": 10, "CUB": 200}
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
# (row label, method, bits or torch dtype name, VeRA save_projection)
ROWS = [
    ("NOLA-MLP k=l=1024 (ours), 16-bit", "nola", 16, None),
    ("NOLA-MLP k=l=1024 (ours), 8-bit", "nola", 8, None),
    ("NOLA-MLP k=l=1024 (ours), 4-bit", "nola", 4, None),
    ("LoRA q,v r=4 (ours), 16-bit", "lora", 16, None),
    ("peft LoRA attn.qkv r=4, fp32", "peft_lora", "float32", None),
    ("peft LoRA attn.qkv r=4, fp16", "peft_lora", "float16", None),
    ("peft VeRA attn.qkv r=256, projections saved, fp32", "peft_vera", "float32", True),
    ("peft VeRA attn.qkv r=256, projections saved, fp16", "peft_vera", "float16", True),
    ("peft VeRA attn.qkv r=256, projections not saved, fp32", "peft_vera", "float32", False),
    ("peft VeRA attn.qkv r=256, projections not saved, fp16", "peft_vera", "float16", False),
    ("peft FourierFT attn.qkv, fp32", "peft_fourierft", "float32", None),
    ("peft FourierFT attn.qkv, fp16", "peft_fourierft", "float16", None),
]


def empty_model(model_name: str, num_classes: int, **kwargs) -> nn.Module:
    """The timm model with weight-like backbone values and a small finite head, from a fixed local generator: the
    frozen-weights fingerprint a file records is then the same in every run (uninitialised memory gave numbers of
    other lengths, so file sizes varied by ~0.5% between runs)."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)
    model.to_empty(device="cpu")
    head = model.get_classifier()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.02)
        head.bias.zero_()
    return model


def as_trained(model: nn.Module) -> None:
    """Give the trained tensors trained-like values (normal, std 0.02) from a fixed generator."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)


def measure(model_name: str, num_classes: int, method: str, precision, save_projection: Optional[bool],
            directory: Path, **kwargs) -> Dict[str, int]:
    """Save one adapter to ``directory``; return its bytes on disk and adapter parameter count (head excluded)."""
    import nola_vision as nv

    model = empty_model(model_name, num_classes, **kwargs)
    head_params = sum(p.numel() for p in model.get_classifier().parameters())
    if method in ("nola", "lora"):
        rank = NOLA_RANK.get(model_name, 4)
        config = nv.NOLAConfig(rank=rank, num_basis_a=1024, num_basis_b=1024) if method == "nola" else nv.LoRAConfig(rank=4)
        nv.inject(model, config)
        as_trained(model)
        nv.save_adapter(model, directory, bits=precision)
        return {"bytes": nv.adapter_size_bytes(directory), "adapter_params": nv.count_parameters(model)["adapter"]}
    from peft import get_peft_model

    peft_model = get_peft_model(model, peft_config(method, model, save_projection=bool(save_projection)))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    peft_model.to(getattr(torch, precision)).save_pretrained(str(directory))
    return {"bytes": sum((directory / name).stat().st_size for name in PEFT_FILES), "adapter_params": trainable - head_params}


def run(models: Sequence[str], **kwargs) -> List[Dict]:
    results = []
    with tempfile.TemporaryDirectory() as root:
        for model_name in models:
            for head, classes in HEADS.items():
                for index, (name, method, precision, projection) in enumerate(ROWS):
                    directory = Path(root) / f"{model_name}-{classes}-{index}"
                    sizes = measure(model_name, classes, method, precision, projection, directory, **kwargs)
                    results.append({"row": name, "model": model_name, "head": head, "classes": classes, **sizes})
    return results


def _short(model_name: str) -> str:
    return {"vit_base_patch16_224": "ViT-B", "vit_large_patch16_224": "ViT-L"}.get(model_name, model_name)


def _kb(size: int) -> str:
    return f"{size / 1000:,.1f} KB" if size < 10**6 else f"{size / 10**6:,.2f} MB"


SETTING = "Bytes on disk per task (1 KB = 1000 bytes); \"params\" counts adapter parameters without the head."


def table(results: List[Dict], models: Sequence[str]) -> str:
    """One row per adapter, one column per backbone and head; ratios to our 4-bit NOLA on the first column."""
    cell = {(r["row"], r["model"], r["head"]): r for r in results}
    first = (models[0], next(iter(HEADS)))
    reference = cell[(ROWS[2][0], *first)]["bytes"]
    columns = ["adapter"] + [f"{_short(m)} params" for m in models]
    columns += [f"{_short(m)} + {head} head" for m in models for head in HEADS]
    columns += [f"× NOLA 4-bit ({_short(first[0])}, {first[1]})"]
    rows = []
    for name, *_ in ROWS:
        row = [name] + [f"{cell[(name, m, next(iter(HEADS)))]['adapter_params']:,}" for m in models]
        row += [_kb(cell[(name, m, head)]["bytes"]) for m in models for head in HEADS]
        rows.append(row + [f"{cell[(name, *first)]['bytes'] / reference:.1f}"])
    return markdown_table(columns, rows)


def printed(data) -> str:
    """The table a run prints, from its raw numbers (``collect_results.py --check`` compares them); a JSON written
    before it recorded the setting is the bare list of rows, printed with the setting."""
    rows = data if isinstance(data, list) else data["results"]
    text = table(rows, list(dict.fromkeys(row["model"] for row in rows)))
    return f"{SETTING}\n\n{text}" if isinstance(data, list) else text


def plot(results: List[Dict], models: Sequence[str], path: str) -> None:
    plt = pyplot()
    names = [name for name, *_ in ROWS]
    columns = [(m, head) for m in models for head in HEADS]
    figure, axis = plt.subplots(figsize=(10, 0.55 * len(names) + 1.5))
    height = 0.8 / len(columns)
    for index, (model_name, head) in enumerate(columns):
        sizes = {r["row"]: r["bytes"] for r in results if r["model"] == model_name and r["head"] == head}
        positions = [i + index * height for i in range(len(names))]
        axis.barh(positions, [sizes[n] / 1000 for n in names], height, label=f"{_short(model_name)} + {head} head")
    axis.set_yticks([i + 0.4 - height / 2 for i in range(len(names))], names, fontsize=8)
    axis.invert_yaxis()
    axis.set_xscale("log")
    axis.set_xlabel("KB on disk per task (log scale)")
    axis.legend(fontsize=8)
    save_figure(figure, path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_base_patch16_224", "vit_large_patch16_224"])
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--png", help="also write a plot here")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None, **model_kwargs) -> None:
    """``model_kwargs`` go to ``timm.create_model`` (tests pass a tiny architecture)."""
    args = parse_args(argv)
    results = run(args.models, **model_kwargs)
    publish(__file__, argv, args, SETTING, table(results, args.models), {"results": results},
            lambda png: plot(results, args.models, png))


if __name__ == "__main__":
    main()
