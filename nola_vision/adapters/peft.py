"""Export an adapted model as a standard peft LoRA adapter: train with NOLA, serve on any LoRA stack.

Every adapted layer becomes one peft LoRA module with A and B materialised from its factors: a layer with
S output slices (q and v of a fused ``qkv``) gets rank S·r, with each slice's B in its own output rows and
zeros elsewhere, so ``lora_B(lora_A(x)) · lora_alpha/rank`` equals our update. The head is ``modules_to_save``.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor, nn

from ..core.checks import check_path
from ..core.fingerprint import merged_adapters
from ..core.inject import (
    adapter_state,
    quantization_aware_bits,
    refuse_wrapped_adapters,
    require_head_at_trained_bits,
    require_unchanged_statistics,
    unwrap_model,
)
from ..core.layer import adapted_layers
from ..core.merge import require_current_merge
from ..core.quantize import fake_quantize, head_bits
from ..core.storage import atomic_directory
from ..core.targets import (
    classifier_head,
    require_module,
    require_no_inner_wrappers,
    require_nothing_else_trained,
    require_values,
    trained_parameters,
)
from .files import (
    CONFIG_NAME,
    PEFT_EXPORT_MARK,
    WEIGHTS_NAME,
    canonical_safetensors,
    existing_adapter_kind,
    other_adapter_files_error,
)

__all__ = ["export_peft"]

PEFT_PREFIX = "base_model.model."


def _alpha(rank: int, scaling: float) -> Union[int, float]:
    """peft's ``lora_alpha`` for a module of ``rank`` whose update is scaled by ``scaling``."""
    alpha = scaling * rank
    return int(alpha) if float(alpha).is_integer() else alpha


def _modules_to_save(model: nn.Module, head: Optional[nn.Module]) -> Dict[str, nn.Module]:
    """The head as peft's ``modules_to_save`` takes it, by module name: itself, or each module of a ``ModuleList`` or
    ``ModuleDict`` head (CrossViT's, one Linear per branch), which peft cannot wrap whole."""
    if head is None:
        return {}
    name = next(n for n, m in model.named_modules() if m is head)
    if isinstance(head, (nn.ModuleList, nn.ModuleDict)):
        return {f"{name}.{child}": module for child, module in head.named_children()}
    return {name: head}


def _refuse_nola_vision_adapter(directory: Union[str, Path]) -> None:
    """A ValueError when ``directory`` holds a ``save_adapter`` file, which a peft export of the same names would
    replace without a way back to its coefficients."""
    kind = existing_adapter_kind(directory)
    if kind == "other":
        raise ValueError(other_adapter_files_error(directory, "export_peft"))
    if kind == "nola_vision":
        raise ValueError(f"{directory} holds a nola_vision adapter (nv.save_adapter), whose files have the same names: "
                         "exporting there would replace it, and a peft export cannot give back its coefficients. "
                         "Export into another directory")


def _why_no_layers(model: nn.Module, state) -> str:
    """Why a model without adapter layers has nothing to export, and what to do instead."""
    if state is not None:
        trains = "the whole backbone" if state.config.train_backbone else "the head only"
        return f"method {state.method!r} has no adapter layers (it trains {trains}): save it with nv.save_adapter"
    folded = merged_adapters(model)
    if folded:
        return (f"the model's weights hold {len(folded)} adapter(s) folded in by nv.merge_and_unload (last: "
                f"{folded[-1]['method']!r}), which leaves no adapter to export: export before merge_and_unload")
    return "inject or load an adapter first (nv.inject / nv.load_adapter)"


@torch.no_grad()
def export_peft(model: nn.Module, directory: Union[str, Path]) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained``
    loads onto a fresh base model (of the architecture the adapters were injected into) with the same logits.

    Written like ``save_adapter``'s files (``core.storage.atomic_directory``), after every tensor is checked finite;
    a directory holding a ``save_adapter`` file (same names) is refused, since a peft export cannot give back its
    coefficients, and so is a peft adapter that no export wrote (exports mark their weights' metadata). Under
    quantisation-aware training the factors and the head are exported as the model sees them. A ``torch.compile``d
    model is exported as the module it wraps (whose module names peft matches).
    """
    require_module(model, "export_peft")
    directory = check_path(directory, "the export directory", expand_user=True)
    model = unwrap_model(model)
    require_no_inner_wrappers(model, "nv.export_peft")
    _refuse_nola_vision_adapter(directory)
    state = adapter_state(model)
    if state is None:  # module names would carry the wrapper's prefix, which peft finds on no base model
        refuse_wrapped_adapters(model, "export that module, nv.export_peft(model.get_submodule({inner!r}), directory)")
    layers = adapted_layers(model)
    if not layers:
        raise ValueError(f"nothing to export as a peft LoRA adapter: {_why_no_layers(model, state)}")
    adapter_tensors, head_tensors = trained_parameters(model, train_backbone=False)  # the factors' sources, the head
    require_nothing_else_trained(model, {**adapter_tensors, **head_tensors}, "a peft export")
    require_values(model, "export_peft")
    require_unchanged_statistics(model)
    require_current_merge(model, "export_peft")
    require_head_at_trained_bits(model, "export_peft")
    folded = merged_adapters(model)
    if folded:
        raise ValueError(
            f"the model's weights hold {len(folded)} earlier adapter(s) folded in by nv.merge_and_unload (first: "
            f"{folded[0]['method']!r} on {len(folded[0]['layers'])} layers), which a peft export does not carry: "
            "PeftModel.from_pretrained on a fresh base model would give other logits. Export from a model trained "
            "on the plain base weights, or save each adapter with nv.save_adapter")
    tensors: Dict[str, Tensor] = {}
    ranks: Dict[str, int] = {}
    alphas: Dict[str, Union[int, float]] = {}
    for name, layer in layers.items():
        a, b = layer.delta_factors()  # ΔWᵀ = a @ b, scaling applied to a; b holds each slice in its own columns
        rank = a.shape[1]
        lora_a = a / layer.scaling if layer.scaling else a
        ranks[name], alphas[name] = rank, _alpha(rank, layer.scaling)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = lora_a.t()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.t()
    saved = _modules_to_save(model, classifier_head(model))
    quantized_head = state is not None and bool(state.quantized_head)
    quant_bits = quantization_aware_bits(model)
    for module_name, module in saved.items():
        trained = dict(module.named_parameters())
        for key, value in module.state_dict().items():
            if quantized_head and quant_bits and key in trained:  # the head as the QAT model sees it
                value = fake_quantize(value, head_bits(quant_bits))
            tensors[f"{PEFT_PREFIX}{module_name}.{key}"] = value
    # One rank and alpha for most modules; the others (e.g. a qkv with q and v slices) by name (peft matches a suffix).
    r, lora_alpha = Counter(zip(ranks.values(), alphas.values())).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "target_modules": sorted(layers),
        "r": r,
        "lora_alpha": lora_alpha,
        "rank_pattern": {re.escape(n): ranks[n] for n in sorted(layers) if ranks[n] != r},
        "alpha_pattern": {re.escape(n): alphas[n] for n in sorted(layers) if alphas[n] != lora_alpha},
        "modules_to_save": list(saved) or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    tensors = {key: value.detach().float().cpu().contiguous() for key, value in tensors.items()}
    for key, value in tensors.items():
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"tensor {key} holds NaN or Inf values (in float32): refusing to export a diverged "
                             "adapter (train again with a lower learning rate)")
    # Checked again under the writer lock: a save_adapter of the same directory may have finished meanwhile.
    with atomic_directory(directory, check=partial(_refuse_nola_vision_adapter, directory),
                          names=(WEIGHTS_NAME, CONFIG_NAME)) as tmp:  # the names peft reads
        raw = save_safetensors_bytes(tensors, metadata={"format": "pt", **PEFT_EXPORT_MARK})
        (tmp / WEIGHTS_NAME).write_bytes(canonical_safetensors(raw))  # the same bytes every export
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=1) + "\n")
    return Path(directory)
