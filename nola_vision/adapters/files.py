"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors`` holding coefficients and head, never bases.

The pair is written as one unit (a sibling temporary directory swapped in) and carries checksums: the config
records a sha256 of the weights file and a sha256 of its own fields, so flipped bytes or an edited ``scale``
fail to load instead of giving other outputs. It also records a fingerprint of the frozen weights the adapter was
trained on (``core.fingerprint``), so it is not applied to other pretrained weights by mistake. ``verify_adapter``
checks a directory against a model without changing the model; ``load_adapter`` is verify, then apply; serving
registers tasks through it too.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from timm.models import is_model
from torch import Tensor, nn

from ..core.basis import GENERATOR_VERSION
from ..core.checks import as_integer, check_bool, check_path, is_finite_number, shown
from ..core.config import config_from_dict
from ..core.fingerprint import (
    CONTEXT_FIELDS,
    FINGERPRINT_FIELDS,
    FINGERPRINT_VERSION,
    HEAD_INPUTS,
    PRECISIONS_FIELDS,
    adapter_fingerprint,
    differing_module,
    holds_update,
    is_context,
    is_positions,
    is_precision,
    is_precisions,
    is_statistics,
    missing_merges,
    unexpected_merges,
)
from ..core.inject import (
    AdapterState,
    MovedActivation,
    adapter_state,
    inject,
    nola_base_name,
    quantization_aware_bits,
    refuse_wrapped_adapters,
    require_head_at_trained_bits,
    require_unchanged_statistics,
    unload,
    unwrap_model,
)
from ..core.interrupts import all_or_nothing
from ..core.layer import adapted_layers, factors_overflow, narrow_range
from ..core.merge import SWITCH_LOCK, delta_factors_of_values, require_current_merge, switch_merged
from ..core.plan import InjectionPlan, plan_injection
from ..core.quantize import (
    INTEGER_BITS,
    SUPPORTED_BITS,
    dequantize,
    grid_step,
    head_bits,
    pack4,
    quantize,
    require_bits,
    seen_alike,
    unpack4,
)
from ..core.registry import method_of
from ..core.storage import (
    FileTooLargeError,
    NotARegularFileError,
    atomic_directory,
    read_file,
    read_files,
    resolve_directory_target,
    set_aside_copy,
)
from ..core.targets import (
    classifier_head,
    feature_wrapper_name,
    head_parameter_names,
    require_adapter_values,
    require_module,
    require_no_inner_wrappers,
    require_nothing_else_trained,
    trained_parameters,
)
from ..core.warn import warn_user
from ..version import __version__

__all__ = ["CONFIG_NAME", "PEFT_EXPORT_MARK", "WEIGHTS_NAME", "AdapterLoadError", "VerifiedAdapter",
           "adapter_size_bytes", "architecture_name", "canonical_safetensors", "changed_settings", "decode_tensors",
           "existing_adapter_kind", "layer_shapes", "load_adapter", "num_classes_of", "other_adapter_files_error",
           "output_settings", "pooling_of", "read_adapter", "save_adapter", "unrecorded_settings", "verify_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# The safetensors metadata export_peft writes into its weights (peft ignores it): it tells an export of ours, which a
# new export may replace, from a peft adapter trained elsewhere, which it must not.
PEFT_EXPORT_MARK = {"written_by": "nola_vision.export_peft"}
_SAFETENSORS_HEADER_LIMIT = 100_000_000  # safetensors' own limit on a header's bytes
# The largest adapter_config.json read: a config holds settings, checksums and class names (100,000 names take a few
# MB), never tensors, so a larger file is not one; refusing it before reading keeps a crafted GB-sized one from
# filling memory.
_CONFIG_LIMIT = 64 << 20
FORMAT = "nola_vision.adapter/3"
# Format 2 has checksums but no frozen-weights fingerprint: it loads, checked by what it has. Format 1 files (before
# checksums) can be checked for nothing, so they load only on request (``allow_unchecked_legacy=True``).
CHECKED_FORMATS = (FORMAT, "nola_vision.adapter/2")
UNCHECKED_FORMATS = ("nola_vision.adapter/1",)
PathLike = Union[str, os.PathLike]


class AdapterLoadError(ValueError):
    """An adapter file does not fit the model it is loaded onto, or is missing or damaged."""


def architecture_name(model: nn.Module) -> str:
    """The timm architecture (without pretrained tag) from the model's pretrained cfg, else its class name; a timm zoo
    NOLA model (``<base>_nola``) by its base architecture."""
    return _timm_architecture(model) or type(model).__name__


def _timm_architecture(model: nn.Module) -> Optional[str]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    architecture = cfg.get("architecture")
    base = nola_base_name(architecture)
    if base is not None:
        return base if is_model(base) else architecture
    return architecture


def pooling_of(model: nn.Module) -> Optional[str]:
    """How the head pools the tokens (timm's ``global_pool``: "token", "avg", "map", ...), None where the model has
    no such setting. It changes every output without changing a weight, so an adapter file records it."""
    pooling = getattr(model, "global_pool", None)
    return pooling if isinstance(pooling, str) else None


def output_settings(model: nn.Module) -> Dict[str, Any]:
    """Other settings that change every output without changing a weight, which an adapter file records: the number
    of heads of each attention layer (``num_heads``), the activation of each activation layer, the class and
    epsilon of each normalisation layer, constructor options such as ``pool_include_prefix`` (``_OPTIONS``), the
    class of each block and a digest of the parameter names. Records of older files hold fewer of them
    (``changed_settings``)."""
    heads, activations, slots, epsilons, norms = [], [], [], [], []
    for name, module in model.named_modules():
        heads_of = vars(module).get("num_heads")  # a plain attribute; getattr would raise inside nn.Module for most
        if _is_int(heads_of):
            heads.append(heads_of)
        where = type(module).__module__.rsplit(".", 1)[-1]
        if where in ("activation", "activations"):
            activations.append(module)
        if _is_activation_slot(name, module, where):
            slots.append(_activation_layer_name(module))
        if "Norm" in type(module).__name__ and isinstance(vars(module).get("eps"), float):
            epsilons.append(vars(module)["eps"])  # per layer, in order: which layer has which eps matters
            norms.append(_norm_name(module))
    return {"attention_heads": heads, "activations": sorted({_activation_name(m) for m in activations}),
            "activation_layers": [_activation_layer_name(m) for m in activations], "activation_slots": slots,
            "norm_eps": epsilons, "norm_layers": norms, "constructor_options": _constructor_options(model),
            "block_layers": [type(m).__name__ for name, m in model.named_modules() if _BLOCK_NAME.search(name)],
            "parameter_names": parameter_names_digest(model)}


# Constructor options that timm models keep as plain attributes and that change outputs without changing a weight
# name: ViT's/EVA's ``no_embed_class`` (only pos_embed's length changes) and ``pool_include_prefix``, and EVA's
# rotary embedding (``rope``: its class, None without one) with its settings (``ref_feat_shape``, the pretrained
# grid its frequencies are scaled to, is one, as a list). Options that follow the input size
# (``img_size``, ``dynamic_img_size``, a rope's ``feat_shape``) are left out: another input size still loads.
_OPTIONS = ("no_embed_class", "pool_include_prefix", "rope", "rotate_half", "temperature", "grid_indexing",
            "grid_offset", "ref_feat_shape", "in_pixels", "linear_bands", "grid_type", "normalize_coords",
            "min_period", "max_period", "always_partition", "target_shift_size")
# The blocks of a model, by timm's names (``blocks.3``, ``stages.1.blocks.0``): their class decides the order of
# norm, attention and MLP (``block_fn``, EVA's ``use_post_norm``) with the same parameter names.
_BLOCK_NAME = re.compile(r"(^|\.)blocks\.\d+$")
# Activation and norm classes by the function they compute: timm's and torch's classes of one function compare
# equal (timm's GELU is nn.GELU's name already; a norm computed in float32 is the same function).
_ACTIVATION_ALIASES = {"GELUTanh": "GELU(approximate='tanh')", "Swish": "SiLU", "HardSwish": "Hardswish",
                       "HardSigmoid": "Hardsigmoid", "SwishMe": "SiLU", "MishMe": "Mish", "HardSwishMe": "Hardswish",
                       "HardSigmoidMe": "Hardsigmoid", "HardMishMe": "HardMish"}
# The activation of a block, whatever its class (a user's own, timm's memory-efficient ``activations_me``, or
# nn.Identity for none): a module held under one of these attribute names (timm's ``act``, ``act1``, ``act_fn``).
_ACTIVATION_SLOT = re.compile(r"(act|activation|nonlin|nonlinearity|input_activation)(_fn|_layer)?\d*$")
_NORM_ALIASES = {"RmsNorm": "RMSNorm", "GroupNorm1": "GroupNorm"}
# Attributes of torch's activation and norm layers that change what they compute (not ``inplace``, not PReLU's
# ``init``, a starting value of its weight).
_ACTIVATION_ARGUMENTS = ("negative_slope", "alpha", "beta", "threshold", "value", "min_val", "max_val", "lower",
                         "upper", "dim", "lambd")
_NORM_ARGUMENTS = ("num_groups",)


def _is_activation_slot(name: str, module: nn.Module, where: str) -> bool:
    """Whether ``module`` (named ``name``, its class defined in module ``where``) is a block's activation: an
    activation class, or any module held under an activation's name. An adapted fc2's ``input_activation`` stands
    for the ``mlp.act`` it took over, whose placeholder (``MovedActivation``) is left out, so the record is the
    plain model's."""
    if isinstance(module, MovedActivation):
        return False
    return where.startswith("activation") or bool(_ACTIVATION_SLOT.match(name.rsplit(".", 1)[-1]))


def _constructor_options(model: nn.Module) -> Dict[str, List[Any]]:
    """The values of each ``_OPTIONS`` attribute the model's modules hold, in module order (a submodule by its
    class name, None where it is left out)."""
    options: Dict[str, List[Any]] = {}
    for module in model.modules():
        for name in _OPTIONS:
            if name in module._modules:
                child = module._modules[name]
                options.setdefault(name, []).append(None if child is None else type(child).__name__)
            elif name in vars(module) and _is_option_value(vars(module)[name]):
                value = vars(module)[name]
                options.setdefault(name, []).append(list(value) if isinstance(value, (list, tuple)) else value)
    return options


def parameter_names_digest(model: nn.Module) -> str:
    """A short hash of the backbone's parameter names (head and adapter tensors left out): constructor settings that
    add or remove parameters outside the fingerprinted layers (LayerScale's ``init_values``, ``reg_tokens``,
    ``qkv_bias``, ``pos_embed``) change it. Names only, not shapes, so another input size still loads."""
    skipped = set(head_parameter_names(model)) | {
        f"{name}.{key}" for name, layer in adapted_layers(model).items() for key in layer.adapter_parameter_names}
    names = sorted(name for name, _ in model.named_parameters() if name not in skipped)
    return _sha256("\n".join(names).encode())[:16]


def changed_settings(recorded: Dict[str, Any], own: Dict[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    """(recorded, own) of each setting both records hold with other outputs (``_same_setting``): records written
    before a setting was recorded (older files, checkpoints, graphs) are compared on the ones they hold."""
    return {key: (value, own[key]) for key, value in recorded.items()
            if key in own and not _same_setting(key, value, own[key])}


def _same_setting(key: str, recorded: Any, own: Any) -> bool:
    """Whether two records of one setting give the same outputs: the set of activation class names by the functions
    they compute, constructor options on the ones both hold (another timm version may hold more)."""
    if key == "activations":  # class names, as recorded before activation_layers: GELUTanh, not its function
        return _by_function(recorded, unrecorded_twins=True) == _by_function(own, unrecorded_twins=True)
    if key == "activation_layers":
        return _by_function(recorded, unrecorded_twins=True, ordered=True) == \
            _by_function(own, unrecorded_twins=True, ordered=True)
    if key == "activation_slots":
        return _by_function(recorded, ordered=True) == _by_function(own, ordered=True)
    if key == "constructor_options":
        return not _changed_options(recorded, own)
    return recorded == own


# Functions whose timm class of its default build lies outside the activation modules the older records read
# (``activations_me``: hard_mish is HardMishMe, HardMish where timm builds for export), so those records hold it on
# one side only: left out of them, which ``activation_slots`` records whatever the class.
_UNRECORDED_TWINS = frozenset({"HardMish"})
_INTEGER_ARGUMENT = re.compile(r"=(-?\d+)(?=[,)])")


def _by_function(names: List[str], unrecorded_twins: bool = False, ordered: bool = False) -> Any:
    """Activation records by the function each computes: one name for one function's classes, numbers written as
    floats (``ELU(alpha=1)`` is ``ELU(alpha=1.0)``), timm's export twins left out of the older records."""
    canonical = [_INTEGER_ARGUMENT.sub(r"=\1.0", _canonical_activation(name)) for name in names]
    if unrecorded_twins:
        canonical = [name for name in canonical if name.split("(", 1)[0] not in _UNRECORDED_TWINS]
    return canonical if ordered else set(canonical)


def _changed_options(recorded: Dict[str, List[Any]], own: Dict[str, List[Any]]) -> Dict[str, Tuple[list, list]]:
    """(recorded, own) values of each constructor option both records hold with other values."""
    return {name: (values, own[name]) for name, values in recorded.items() if name in own and own[name] != values}


def _activation_name(module: nn.Module) -> str:
    """The class name, with GELU's approximation: what older files recorded, as a set, under "activations"."""
    approximate = getattr(module, "approximate", "none")
    return type(module).__name__ + (f"(approximate={approximate!r})" if approximate != "none" else "")


def _activation_layer_name(module: nn.Module) -> str:
    """What an activation layer computes, as one name: its canonical class with the arguments that change its
    function (LeakyReLU's slope)."""
    return _canonical_activation(_activation_name(module)) + _arguments(module, _ACTIVATION_ARGUMENTS)


def _canonical_activation(name: str) -> str:
    """One name for the classes of one activation function: timm's GELUTanh is GELU(approximate='tanh')."""
    return _ACTIVATION_ALIASES.get(name, name)


def _norm_name(module: nn.Module) -> str:
    """What a normalisation layer computes, as one name: timm's RmsNorm is torch's RMSNorm, a float32 variant is
    its function's, and a GroupNorm holds its group count."""
    name = re.sub(r"Fp32$", "", type(module).__name__)
    return _NORM_ALIASES.get(name, name) + _arguments(module, _NORM_ARGUMENTS)


def _arguments(module: nn.Module, names: Tuple[str, ...]) -> str:
    """``(name=value, ...)`` of the plain attributes ``names`` the module holds; empty when it holds none."""
    found = [f"{name}={vars(module)[name]!r}" for name in names
             if name in vars(module) and _is_scalar(vars(module)[name])]
    return f"({', '.join(found)})" if found else ""


def num_classes_of(model: nn.Module) -> int:
    """The class count of the model's classifier: its head's ``out_features``, or its last layer's for a head of
    several (``nn.Sequential(nn.Dropout(0.2), nn.Linear(d, 7))``), which a head replaced by hand changes while timm's
    ``num_classes`` stays; else ``num_classes``, else 0."""
    head = classifier_head(model)
    outputs = [module.out_features for module in (head.modules() if head is not None else ())
               if isinstance(getattr(module, "out_features", None), int)]
    if outputs:
        return outputs[0] if isinstance(getattr(head, "out_features", None), int) else outputs[-1]
    return int(getattr(model, "num_classes", 0))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _document_digest(document: Dict[str, Any]) -> str:
    """Checksum of every config field (all of them change outputs or what is checked), itself excluded."""
    fields = {key: value for key, value in document.items() if key != "config_sha256"}
    return _sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())


def _document_text(document: Dict[str, Any]) -> str:
    """One top-level key per line, values compact: readable, and small next to 4-bit coefficients."""
    lines = ",\n".join(f" {json.dumps(key)}: {json.dumps(value, separators=(',', ':'))}"
                       for key, value in document.items())
    return "{\n" + lines + "\n}\n"


def save_adapter(model: nn.Module, directory: PathLike, bits: int = 16,
                 class_names: Optional[Sequence[str]] = None) -> Path:
    """Save what was trained (adapter coefficients/factors and the head) to ``directory``; returns it.

    ``bits`` 32 or 16 store floats; 8 and 4 store adapter tensors as per-tensor affine integer codes of that width
    and the head as 8-bit codes. At 16 bits a tensor with a value beyond float16's ±65,504 (a head trained at a
    large learning rate) is stored in float32: it loads exactly, at 2 more bytes per value of that tensor only,
    where refusing would throw a trained result away. Every tensor is encoded and checked finite as it will be
    stored before ``directory`` is touched. Random bases are never saved: the config records seed, generator
    version and a fingerprint, and ``load_adapter`` regenerates and verifies them. The two files replace an
    existing adapter in ``directory`` in one atomic step (``core.storage.atomic_directory``); other files there
    are kept. A ``torch.compile``d model saves what the module it wraps holds, under that module's names.
    Refused: a trainable parameter the file would not hold, batch-norm running statistics that changed since
    inject (files hold no buffers), integer codes for full fine-tuning, and a directory holding a peft export;
    saving at other bits than quantisation-aware training used warns. ``class_names`` (one per output of the head, in
    order) are recorded for whoever serves the file (``VerifiedAdapter.class_names``, ``MultiTaskModel.class_names``).
    """
    require_module(model, "save_adapter")
    directory = check_path(directory, "the adapter directory", expand_user=True)
    model = unwrap_model(model)
    require_no_inner_wrappers(model, "nv.save_adapter")
    state = adapter_state(model)
    if state is None:
        refuse_wrapped_adapters(model, "save that module, save_adapter(model.get_submodule({inner!r}), directory)")
        raise ValueError("model has no adapters: call nola_vision.inject(model, config) before save_adapter")
    state.plan.require_same_trained(model)
    require_head_at_trained_bits(model, "save_adapter")
    bits = require_bits(bits)
    if state.config.train_backbone and bits < 16:
        raise ValueError(f"bits={bits} stores each tensor as {bits}-bit codes over its own range: fine for adapter "
                         "coefficients, but full fine-tuning stores every backbone weight, which such codes would "
                         "change far more than training did. Save a fully fine-tuned model with bits=16 or 32")
    adapter, head = trained_parameters(model, state.config.train_backbone)
    require_adapter_values(model, "save_adapter")  # before anything reads the layers' state dicts
    require_nothing_else_trained(model, {**adapter, **head}, "an adapter file")
    _require_no_unsaved_layer_state(model)
    require_unchanged_statistics(model)
    require_current_merge(model, "save_adapter")
    _warn_if_not_trained_width(model, bits)
    require_adapter_directory(directory)
    names = _checked_class_names(class_names, num_classes_of(model))
    if class_names is None:
        _warn_of_loaded_class_names(state)
    head_names = set(state.plan.head_names)
    stored_bits = {name: head_bits(bits) if name in head_names else bits for name in {**adapter, **head}}
    aware = quantization_aware_bits(model)  # at the saved bits, training saw what the codes store: nothing is lost
    seen = {name: head_bits(aware) if name in head_names else aware for name in stored_bits} if aware else {}
    tensors: Dict[str, Tensor] = {}
    quantization: Dict[str, List[float]] = {}
    for name, param in {**adapter, **head}.items():
        if param.is_meta:
            raise ValueError(f"tensor {name} is on the meta device, which holds no values: there is nothing to save "
                             "(load or train the model's weights on a real device first)")
        value = param.detach().cpu().contiguous()  # channels_last weights, a transposed head: stored row-major
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"tensor {name} holds NaN or Inf values: refusing to save a diverged adapter "
                             "(train again with a lower learning rate)")
        if stored_bits[name] >= 16:
            tensors[name] = _stored_floats(name, value, stored_bits[name])
        else:  # coded from float32 values: a float64 tensor float32 cannot hold is refused as at bits=32
            tensors[name], quantization[name] = _stored_codes(name, _stored_floats(name, value, 32), stored_bits[name],
                                                              trained_at_bits=seen.get(name) == stored_bits[name],
                                                              file_bits=bits)
    metadata = {"format": FORMAT, "quantization": json.dumps(quantization, separators=(",", ":"))}
    weights = canonical_safetensors(save_safetensors_bytes(tensors, metadata=metadata))
    document: Dict[str, Any] = {
        "format": FORMAT,
        "method": state.method,
        "config": state.config_dict(),
        "backbone": architecture_name(model),
        "pooling": pooling_of(model),
        "settings": output_settings(model),
        "num_classes": num_classes_of(model),
        **({"class_names": names} if names is not None else {}),
        "layers": layer_shapes(model),
        "head": sorted(head),
        "bits": bits,
        "library_version": __version__,
        "generator_version": GENERATOR_VERSION,
        "basis_fingerprint": state.plan.basis_fingerprint(),
        "frozen_weights": adapter_fingerprint(model, state.plan),
        "weights_sha256": _sha256(weights),
    }
    document["config_sha256"] = _document_digest(document)
    # Checked again under the writer lock: an export_peft of the same directory may have finished meanwhile.
    with atomic_directory(directory, check=partial(_refuse_peft_export, directory),
                          names=(WEIGHTS_NAME, CONFIG_NAME)) as tmp:
        (tmp / WEIGHTS_NAME).write_bytes(weights)
        (tmp / CONFIG_NAME).write_text(_document_text(document))
    return Path(directory)


def _warn_of_loaded_class_names(state: AdapterState) -> None:
    """Warn where the file last loaded into the model records class names that a save without ``class_names`` does
    not: the model cannot tell whether its tensors still hold that task (a fused optimiser step changes them unseen)."""
    loaded = getattr(state, "loaded_class_names", None)  # None in models pickled before it was recorded
    if loaded is not None:
        source, names = loaded
        warn_user(f"the adapter loaded into this model from {source} records class names ({', '.join(names[:3])}"
                  f"{', ...' if len(names) > 3 else ''}); this save records none. Pass class_names= to record names "
                  f"(nv.verify_adapter(model, {str(source)!r}).class_names gives those)")


def _checked_class_names(names: Optional[Sequence[str]], num_classes: int) -> Optional[List[str]]:
    """``names`` as a list: one non-empty string per output of the head, or a ValueError saying what is wrong."""
    if names is None:
        return None
    if isinstance(names, (set, frozenset)):  # no order of outputs: names would label them as a hash orders them
        raise TypeError(f"class_names must be a list of non-empty strings in the order of the head's outputs, got a "
                        f"{type(names).__name__}, which has no such order: pass sorted(...) or the dataset's list")
    if isinstance(names, str):
        raise TypeError(f"class_names must be a sequence of non-empty strings, one per class, got {names!r}")
    if isinstance(names, dict):  # {name: output index} (ImageFolder's class_to_idx): ordered by the indices
        indices = {name: as_integer(index) for name, index in names.items()}  # numpy's (np.unique, np.arange) too
        if sorted(i for i in indices.values() if i is not None) != list(range(len(names))):
            raise TypeError("class_names as a dict maps each name to its output index, 0 to n-1 once each, got "
                            f"{shown(names)}: pass a list of names in the order of the head's outputs")
        names = sorted(indices, key=indices.__getitem__)
    if not isinstance(names, Iterable):  # an int: list() raised a bare TypeError
        raise TypeError(f"class_names must be a sequence of non-empty strings, one per class, got {shown(names)}")
    names = list(names)  # a generator is read once
    if not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"class_names must be a sequence of non-empty strings, one per class, got {names!r}")
    if len(names) != num_classes:
        raise ValueError(f"got {len(names)} class_names for a head of {num_classes} classes: pass one name per output, "
                         "in the order of the head's outputs")
    return names  # a name may repeat: ImageNet's descriptions name two classes 'crane'


def _require_quantization_fits(model: nn.Module, bits: int, directory: PathLike, adapts_layers: bool) -> None:
    """Refuse to load onto a model under quantisation-aware training at other bits than the file's: the model would
    show the loaded values at its own width, so its outputs would not be the saved adapter's."""
    aware = quantization_aware_bits(model)
    if aware is not None and not seen_alike(aware, bits, adapts_layers):
        raise AdapterLoadError(
            f"the model trains quantisation-aware at {aware} bits (nv.set_quantization_aware), so it would see the "
            f"{bits}-bit adapter in {directory} at {aware} bits, with other outputs than the saved one. Call "
            f"nv.set_quantization_aware(model, None) before loading (and set it again to train on at {aware} bits), or "
            "load a file saved at those bits")


def canonical_safetensors(raw: bytes) -> bytes:
    """``raw`` with its header's metadata keys sorted: safetensors writes them in hash-map order, which changes from
    process to process, so two saves of the same values would differ byte for byte (and in ``weights_sha256``).
    The rewritten header has the same length and the same tensors."""
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > size:  # never for the same entries in another order; keep the library's bytes then
        return raw
    return raw[:8] + text.ljust(size) + raw[8 + size :]


def _warn_if_not_trained_width(model: nn.Module, bits: int) -> None:
    """Warn when quantisation-aware training saw other values than ``bits`` stores: the file then loads as another
    model than the one that was trained and evaluated."""
    trained_bits = quantization_aware_bits(model)
    if trained_bits is not None and not seen_alike(trained_bits, bits, bool(adapted_layers(model))):
        warn_user(f"the model trains against {trained_bits}-bit adapter values (its head at "
                  f"{head_bits(trained_bits)} bits; set_quantization_aware) but is saved at bits={bits}: the file "
                  f"holds the latent values, whose outputs differ from the trained model's. Save with "
                  f"bits={trained_bits} to keep what was trained and evaluated")


def require_adapter_directory(directory: PathLike) -> None:
    """Refuse, before anything is trained or written, a directory ``save_adapter`` cannot replace: a file, the working
    directory, a mount point or a path too long for its files (``core.storage.resolve_directory_target``), or one
    holding a peft export, or a URL (``s3://bucket/x`` would be written to a local folder ``s3:/bucket/x``)."""
    if "://" in os.fspath(directory):
        raise ValueError(f"{os.fspath(directory)} is a URL, and an adapter is saved to a local folder (this one would "
                         f"be {Path(directory)}, here): save it locally, then copy the folder there (fsspec, or "
                         "your storage's command-line tool)")
    resolve_directory_target(directory, (WEIGHTS_NAME, CONFIG_NAME))
    _refuse_peft_export(directory)


def _refuse_peft_export(directory: PathLike) -> None:
    """A ValueError when ``directory`` holds a peft export, or adapter files another tool wrote, which the files of
    ``save_adapter`` (of the same names) would replace."""
    kind = existing_adapter_kind(directory)
    if kind == "peft":
        raise ValueError(f"{directory} holds a peft LoRA export (nv.export_peft); save_adapter would replace it with "
                         "files of the same names. Save the adapter into another directory")
    if kind == "other":
        raise ValueError(other_adapter_files_error(directory, "save_adapter"))


def other_adapter_files_error(directory: PathLike, writer: str) -> str:
    """Why ``writer`` refuses ``directory``: it holds an ``adapter_config.json`` or ``adapter_model.safetensors`` that
    neither ``save_adapter`` nor ``export_peft`` wrote (another library's adapter, or a user's file)."""
    unreadable = _unreadable_reason(Path(directory) / CONFIG_NAME)
    if unreadable is not None:
        return (f"{directory} holds {CONFIG_NAME}, which this process cannot read ({unreadable}), so {writer} cannot "
                "tell whether nv.save_adapter or nv.export_peft wrote it, and would replace it with a file of the same "
                "name: make it readable (chmod u+r), write into another directory, or move it away")
    peft = _peft_config(Path(directory) / CONFIG_NAME)
    what = ("a peft adapter trained elsewhere (an nv.export_peft of nola_vision before its exports were marked counts "
            "as one too: remove that directory to export there again)" if peft else
            "another library's adapter, or your own file or folder")
    return (f"{directory} holds {CONFIG_NAME} or {WEIGHTS_NAME} that neither nv.save_adapter nor nv.export_peft wrote "
            f"({what}): {writer} would replace them with files of the same names. "
            "Write into another directory, or move those files away")


def _unreadable_reason(path: Path) -> Optional[str]:
    """Why this process cannot read the file ``path`` (its system error), or None: readable, absent or no file."""
    try:
        if path.is_file():
            with path.open("rb"):
                pass
    except OSError as error:
        return error.strerror or type(error).__name__
    return None


def existing_adapter_kind(directory: PathLike) -> Optional[str]:
    """What ``directory``'s adapter files are: ``"nola_vision"`` (``save_adapter``), ``"peft"`` (``export_peft``),
    ``"other"`` (an ``adapter_config.json`` that is neither, or an ``adapter_model.safetensors`` without any: another
    tool's, a user's file or folder, or one this process cannot read), or None (neither file, or only empty ones).
    Both writers write files of the same names, so each refuses to replace the other's, and both refuse to replace
    another tool's."""
    config, weights = Path(directory) / CONFIG_NAME, Path(directory) / WEIGHTS_NAME
    try:
        if any(path.exists() and not path.is_file() for path in (config, weights)):
            return "other"  # a folder (or another entry) of that name: the user's, which a save would replace
        if not config.is_file() or not config.stat().st_size:
            return "other" if weights.is_file() and weights.stat().st_size else None
        document = _small_json(config)
    except FileNotFoundError:  # removed meanwhile
        return None
    except OSError:  # unreadable files (no permission, an I/O error) are not ours; a directory that cannot be looked
        # into at all (a name too long, a parent it may not search) is left to the writer, which says why
        return "other" if os.path.isdir(directory) else None
    except (ValueError, RecursionError):  # not JSON: not ours
        return "other"
    if not isinstance(document, dict):
        return "other"
    if str(document.get("format", "")).startswith("nola_vision.adapter/"):
        return "nola_vision"
    return "peft" if "peft_type" in document and _has_export_mark(weights) else "other"


def _has_export_mark(weights: Path) -> bool:
    """Whether ``weights`` is a safetensors file whose metadata holds ``PEFT_EXPORT_MARK``. Its header alone is read,
    from the open file (``safetensors.safe_open`` refuses a path that is not UTF-8)."""
    try:
        with open(weights, "rb") as file:
            size = int.from_bytes(file.read(8), "little")
            if size > _SAFETENSORS_HEADER_LIMIT:
                return False
            header = json.loads(file.read(size))
    except (OSError, ValueError, RecursionError):
        return False
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(metadata, dict) and all(metadata.get(key) == value for key, value in PEFT_EXPORT_MARK.items())


def _small_json(config: Path) -> Any:
    """The JSON document in ``config``; ``FileTooLargeError`` (an OSError) for a file too large to be a config,
    which is not read."""
    return json.loads(read_file(config, _CONFIG_LIMIT))


def _peft_config(config: Path) -> bool:
    """Whether ``config`` is a JSON object with a ``peft_type``: a peft adapter's config."""
    try:
        if not config.is_file():  # a FIFO would block the read
            return False
        document = _small_json(config)
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(document, dict) and "peft_type" in document


def _stored_floats(name: str, value: Tensor, bits: int) -> Tensor:
    """``value`` as float16 at 16 bits (a bfloat16 tensor as it is: exact), or float32 (at 32 bits, and at 16 where
    float16 would lose it).

    A dtype keeps a tensor when every value is within its range and comes back within half a step of that dtype at
    the tensor's largest value (``_lossless_in``): beyond ±65,504 float16 would turn values into ±inf (or, up to
    65,520, into ±65,504), and a tensor of values below its normal range (6e-5: a LoRA B or a head after a few steps
    at a small learning rate) would lose most of its digits, or every value, to subnormals and zeros; so would
    float32 a float64 model's tensor below 1e-38.
    """
    if bits == 16 and value.dtype == torch.bfloat16:
        return value
    for dtype in (torch.float16, torch.float32) if bits == 16 else (torch.float32,):
        within = not value.numel() or float(value.detach().abs().max()) <= torch.finfo(dtype).max
        if within and _lossless_in(value, dtype):  # within: up to 65,520 float16 rounds to 65,504, not to inf
            return value.to(dtype)
    largest = value.abs().max().item()
    if largest > torch.finfo(torch.float32).max:
        raise ValueError(f"tensor {name} holds {largest:.4g}, beyond float32's range: it cannot be stored (train again "
                         "with a lower learning rate)")
    raise ValueError(f"tensor {name} holds values up to {largest:.4g} only, below float32's normal range (from "
                     f"{torch.finfo(torch.float32).tiny:.2g}): float32 would store them as zeros or lose most of their "
                     "digits: an adapter file holds at most float32")


def _lossless_in(value: Tensor, dtype: torch.dtype, steps: float = 0.5) -> bool:
    """Whether ``value`` cast to ``dtype`` stays finite and within ``steps`` ``dtype`` steps at its largest value of
    it (half a step: what rounding gives a tensor in the dtype's normal range; one that would overflow or sink into
    subnormals goes beyond)."""
    if not value.numel() or value.dtype == dtype:
        return True
    exact, cast = value.double(), value.to(dtype).double()
    if not bool(torch.isfinite(cast).all()):
        return False
    return float((cast - exact).abs().max()) <= torch.finfo(dtype).eps * steps * float(exact.abs().max())


def _require_no_unsaved_layer_state(model: nn.Module) -> None:
    """Refuse to save an adapted layer that holds state of its own beyond its trained tensors (a method's persistent
    buffer, a frozen parameter): the file would not hold it, so it would load with other outputs. What a layer needs
    besides its trained tensors is regenerated from the config (as NOLA's bases are) or kept out of its state."""
    for name, layer in adapted_layers(model).items():
        kept = layer.unstored_state()
        if kept:
            raise ValueError(f"{name} ({type(layer).__name__}) holds {kept} in its state, which adapter "
                             "files do not store: the file would load with other outputs. Make it a trained tensor "
                             "(in adapter_parameter_names), or regenerate it from the config and register it with "
                             "persistent=False (see the guide 'Adding a method')")


def _stored_codes(name: str, value: Tensor, bits: int, trained_at_bits: bool = False,
                  file_bits: Optional[int] = None) -> Tuple[Tensor, List[float]]:
    """``value`` as ``bits``-bit codes (4-bit packed) with its quantisation entry; refused if it would load as inf.
    A warning names a tensor whose values the codes move far, unless training saw them at these bits already
    (``trained_at_bits``: quantisation-aware training, whose outputs the codes then reproduce). ``file_bits``: the
    bits the file is saved at, where they differ from the tensor's own (a head's 8-bit codes in a 4-bit file)."""
    codes, minimum, step = quantize(value, bits)
    step = grid_step(value, codes, minimum, step)  # values saved before keep their bytes
    stored = dequantize(codes, minimum, step)
    if not bool(torch.isfinite(stored).all()):
        raise ValueError(f"tensor {name} spans [{value.min().item():.4g}, {value.max().item():.4g}], too wide for "
                         f"{bits}-bit codes (they would load as inf): save it with bits=32")
    values = value.detach().float().flatten()
    spread, error = _typical_spread(values), (stored.flatten() - values).abs().median().item()
    if error > 0.5 * spread and error > 0 and not trained_at_bits:  # a few far larger values left one or two codes
        moved = (f"{error / spread:.0%} of how far its values typically lie from their median" if spread > 0 else
                 f"{error:.3g}, where most of them are 0")  # no code holds 0 exactly: every zero moves
        warn_user(f"tensor {name} loses most of its values at {bits} bits: storing moves a typical value by "
                  f"{moved}, since values up to "
                  f"{values.abs().max().item():.4g} set the range of its {2 ** bits} codes. Save with bits=16, or "
                  f"train quantisation-aware at {file_bits or bits} bits (set_quantization_aware"
                  f"{f', which sees the head at its {bits}-bit codes' if (file_bits or bits) != bits else ''})",
                  UserWarning)
    return (pack4(codes) if bits == 4 else codes), [minimum, step, bits]


def _typical_spread(values: Tensor) -> float:
    """How far values typically lie from their median (the median absolute deviation), or, where most are equal,
    their typical magnitude: the scale a coding error must stay well under for the values to keep their differences."""
    spread = (values - values.median()).abs().median().item()
    return spread if spread > 0 else values.abs().median().item()


def adapter_size_bytes(directory: PathLike) -> int:
    """Bytes on disk of an adapter directory (config + weights)."""
    root = Path(check_path(directory, "the adapter directory", expand_user=True))
    try:
        is_directory = stat.S_ISDIR(root.stat().st_mode)
        entries = {root / name: (root / name).stat() for name in (CONFIG_NAME, WEIGHTS_NAME)} if is_directory else {}
    except FileNotFoundError as error:
        if error.filename != str(root):
            raise AdapterLoadError(f"{error.filename} is missing: an adapter directory holds {CONFIG_NAME} and "
                                   f"{WEIGHTS_NAME} (written by save_adapter)") from error
        is_directory = None
    except OSError as error:  # a symbolic link loop, no permission, an I/O error
        raise _unreadable(error, root) from error
    if not is_directory:
        raise AdapterLoadError(f"{directory} is {'missing' if is_directory is None else 'a file'}, not an adapter "
                               f"directory ({CONFIG_NAME} and {WEIGHTS_NAME}, written by save_adapter)")
    other = next((path for path, info in entries.items() if not stat.S_ISREG(info.st_mode)), None)
    if other is not None:
        raise AdapterLoadError(f"{other} is not a file (a directory, FIFO or device): the adapter directory was "
                               "changed after it was saved; save the adapter again")
    return sum(info.st_size for info in entries.values())


def _too_large(path: Path, size: int, limit: Optional[int]) -> AdapterLoadError:
    """Why a file too large to read is refused: over ``limit`` bytes, or (``None``) more than memory holds."""
    if limit is not None:
        return AdapterLoadError(f"{path} is {size:,} bytes, more than the {limit:,} an {CONFIG_NAME} may have (it "
                                "holds settings, checksums and class names, never tensors): this is not the config "
                                "save_adapter wrote; save the adapter again")
    return AdapterLoadError(f"{path} is {size:,} bytes, too large to read into this process's memory. A NOLA or LoRA "
                            "adapter takes KB to MB (a full fine-tune's, the model's size): if this file should be "
                            "that large, load it where more memory is free; otherwise it is not the file "
                            "save_adapter wrote")


def _unreadable(error: OSError, root: Path) -> AdapterLoadError:
    where = error.filename or root
    if error.errno == errno.ELOOP:  # neither permissions nor the disk: links that lead back to themselves
        return AdapterLoadError(f"{where} cannot be read ({error.strerror}): a symbolic link on its path leads back "
                                "to itself; point it at the adapter directory save_adapter wrote")
    return AdapterLoadError(f"{where} cannot be read ({error.strerror or error}): check its "
                            "permissions (and the directories' above it) or the disk")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_scalar(value: Any) -> bool:
    """A value JSON stores as it is: null, a boolean, a finite number or a string."""
    return value is None or isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value))


def _is_option_value(value: Any) -> bool:
    """A constructor option's value as a file records it: a scalar, or a list or tuple of scalars (a shape)."""
    return _is_scalar(value) or (isinstance(value, (list, tuple)) and all(_is_scalar(x) for x in value))


def _is_layer(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    slices = value.get("slices")
    return (_is_int(value.get("in")) and _is_int(value.get("out")) and isinstance(slices, list) and bool(slices)
            and all(isinstance(s, list) and len(s) == 2 and all(_is_int(i) for i in s) for s in slices))


# Every field of the config document: (check, what it must be). Checked before anything is built.
_SCHEMA = {
    "method": (lambda v: isinstance(v, str), "a method name"),
    "config": (lambda v: isinstance(v, (str, dict)), "a method name or a config object"),
    "backbone": (lambda v: isinstance(v, str), "a timm architecture name"),
    "num_classes": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "layers": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and _is_layer(x) for k, x in v.items()),
               'an object {layer name: {"in": int, "out": int, "slices": [[start, end], ...]}}'),
    "head": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of tensor names"),
    "bits": (lambda v: _is_int(v) and v in SUPPORTED_BITS, f"one of {SUPPORTED_BITS}"),
    "generator_version": (lambda v: isinstance(v, str), "a string"),
    "library_version": (lambda v: isinstance(v, str), "a string"),
    "basis_fingerprint": (lambda v: v is None or isinstance(v, str), "a string or null"),
}
_CHECKSUMS = {name: (lambda v: isinstance(v, str), "a sha256 hex string")
              for name in ("weights_sha256", "config_sha256")}


def _is_number_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(is_finite_number(x) for x in value)


def _is_frozen_weights(value: Any) -> bool:
    if value is None:
        return True
    if not isinstance(value, dict):
        return False
    modules, merged = value.get("modules"), value.get("merged")
    # no modules: a full fine-tune's record, of the running statistics and other buffers alone
    return (isinstance(value.get("version"), str) and isinstance(modules, dict)
            and (bool(modules) or bool(value.get("statistics")) or bool(value.get("buffers")))
            and isinstance(merged, list)
            and all(isinstance(k, str) and _is_number_list(r) for k, r in modules.items())
            and all(isinstance(entry, dict) and _is_name_list(entry.get("layers", [])) for entry in merged)
            and ("context" not in value or is_context(value["context"]))
            and ("positions" not in value or is_positions(value["positions"]))
            and ("statistics" not in value or is_statistics(value["statistics"]))
            and ("buffers" not in value or is_context(value["buffers"]))
            and ("precision" not in value or is_precision(value["precision"]))
            and ("precisions" not in value or is_precisions(value["precisions"], value)))


def _is_name_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(x, str) for x in value)


def _is_options(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(name, str) and isinstance(values, list) and bool(values) and all(_is_option_value(x) for x in values)
        for name, values in value.items())


_POOLING = (lambda v: v is None or isinstance(v, str), "null or a timm global_pool name")
_CLASS_NAMES = (lambda v: isinstance(v, list) and all(isinstance(x, str) and x for x in v), "a list of class names")
# Each key of the settings record and what it must be; older files hold the first two only.
_SETTING_FIELDS = {
    "attention_heads": (lambda v: isinstance(v, list) and all(_is_int(x) for x in v), "[integers]"),
    "activations": (_is_name_list, "[names]"),
    "activation_layers": (_is_name_list, "[names] (optional)"),
    "activation_slots": (_is_name_list, "[names] (optional)"),
    "norm_eps": (lambda v: v == [] or _is_number_list(v), "[numbers] (optional)"),
    "norm_layers": (_is_name_list, "[names] (optional)"),
    "constructor_options": (_is_options, "{option: [null, booleans, numbers, strings or lists of them]} (optional)"),
    "block_layers": (_is_name_list, "[names] (optional)"),
    "parameter_names": (lambda v: isinstance(v, str), "str (optional)"),
}
_REQUIRED_SETTINGS = ("attention_heads", "activations")


def _is_settings(value: Any) -> bool:
    return (isinstance(value, dict) and all(key in value for key in _REQUIRED_SETTINGS)
            and all(valid(value[key]) for key, (valid, _) in _SETTING_FIELDS.items() if key in value))


_SETTINGS = (_is_settings, "{" + ", ".join(f"{json.dumps(key)}: {what}" for key, (_, what) in _SETTING_FIELDS.items())
             + "}")
_FROZEN_WEIGHTS = {"frozen_weights": (_is_frozen_weights, 'null or {"version": str, "modules": {module name: '
                                                          '[numbers]}, "merged": [{..., "layers": [names]}], '
                                                          'optionally "context": {"modules": int, "records": base64 '
                                                          'of 24 bytes each}, "positions": {parameter name: '
                                                          '{"shape": [ints], "record": [9 numbers]}}, '
                                                          '"statistics": {norm layer name: [9 numbers]}, '
                                                          '"buffers": as "context", '
                                                          '"precision": a machine epsilon and "precisions": '
                                                          '{"modules"/"context"/"buffers": [an exponent per '
                                                          'record], "positions"/"statistics": {name: exponent}}}')}


def _read_document(path: Path, raw: bytes, allow_unchecked_legacy: bool) -> dict:
    """The config document, with every field's type checked: a damaged or hand-edited file fails here, clearly.

    Checksums are required by the current formats and verified whenever present, whatever ``format`` says, so
    editing the format cannot skip them; a file without any loads only with ``allow_unchecked_legacy``.
    """
    _refuse_stand_in(path, raw)
    try:
        document = json.loads(raw.decode("utf-8-sig"))  # an editor may have added a byte-order mark
    except ValueError as error:  # not JSON, not UTF-8, an integer of over 4,300 digits
        raise AdapterLoadError(f"{path} is not valid JSON ({error}); the file is truncated or was edited") from error
    except RecursionError as error:
        raise AdapterLoadError(f"{path} nests its JSON too deeply to be an adapter config; the file was edited or "
                               "crafted: save the adapter again") from error
    if not isinstance(document, dict) or document.get("format") not in (*CHECKED_FORMATS, *UNCHECKED_FORMATS):
        raise AdapterLoadError(_unknown_format(path, document))
    checked = document["format"] in CHECKED_FORMATS or any(key in document for key in _CHECKSUMS)
    if not checked and not allow_unchecked_legacy:
        raise AdapterLoadError(
            f"{path} has the legacy format {document['format']!r}, which carries no checksums: an edited scale or "
            "damaged weights would load unnoticed. Save the adapter again with this nola_vision (from the model that "
            "trained it), or pass allow_unchecked_legacy=True to load its contents unchecked"
        )
    fingerprinted = document["format"] == FORMAT or "frozen_weights" in document
    schema = {**_SCHEMA, **(_CHECKSUMS if checked else {}), **(_FROZEN_WEIGHTS if fingerprinted else {}),
              **({"pooling": _POOLING} if "pooling" in document else {}),  # older files record none
              **({"settings": _SETTINGS} if "settings" in document else {}),
              **({"class_names": _CLASS_NAMES} if "class_names" in document else {})}
    _refuse_unknown_fields(path, document, {"format", *_SCHEMA, *_CHECKSUMS, *_FROZEN_WEIGHTS, "pooling", "settings",
                                            "class_names"}, "")
    if "settings" in document and isinstance(document["settings"], dict):
        _refuse_unknown_fields(path, document["settings"], set(_SETTING_FIELDS), "settings.")
    record = document.get("frozen_weights")
    if isinstance(record, dict):  # a newer version's check, skipped here, would let other weights load silently
        _refuse_unknown_fields(path, record, set(FINGERPRINT_FIELDS), "frozen_weights.")
        packed = (("context", CONTEXT_FIELDS), ("buffers", CONTEXT_FIELDS), ("precisions", PRECISIONS_FIELDS))
        for part, known in packed:
            if isinstance(record.get(part), dict):
                _refuse_unknown_fields(path, record[part], set(known), f"frozen_weights.{part}.")
    for key, (valid, what) in schema.items():
        if key not in document:
            raise AdapterLoadError(f"{path} lacks the field {key!r}; the file is incomplete or was edited: save the "
                                   "adapter again")
        if not valid(document[key]):
            raise AdapterLoadError(f"{path}: field {key!r} must be {what}, got {document[key]!r} "
                                   f"({type(document[key]).__name__}); the file was edited or damaged")
    if "class_names" in document and len(document["class_names"]) != document["num_classes"]:
        raise AdapterLoadError(f"{path}: field 'class_names' holds {len(document['class_names'])} names for a "
                               f"{document['num_classes']}-class head; the file was edited or damaged")
    # Before any field is trusted: an edited class count or backbone would otherwise be reported as the model's fault.
    if "config_sha256" in document and _document_digest(document) != document["config_sha256"]:
        rewritten = raw.decode("utf-8-sig").replace("\r\n", "\n") != _document_text(document)
        raise AdapterLoadError(f"{path} was edited or damaged after it was saved: its checksum (which "
                               "covers scale, init, targets, slices, bits and every other field) does not match; "
                               + ("its layout is not the one nola_vision writes, so a program rewrote it: where no "
                                  "value was edited, JSON tools such as jq or JavaScript's JSON.stringify write a "
                                  "whole-number float (scale 1.0) as 1, which changes what the checksum covers. "
                                  "Restore the file as it was saved (a copy of the folder, say), or save the adapter "
                                  "again" if rewritten
                                  else "save the adapter again"))
    return document


def _refuse_unknown_fields(path: Path, document: dict, known: set, prefix: str) -> None:
    """Refuse fields this version does not know: a newer nola_vision records what changes the outputs (as pooling and
    settings once were) within one format, so applying the file without them could give other outputs silently."""
    unknown = sorted(set(document) - known)
    if unknown:
        raise AdapterLoadError(
            f"{path} holds the field{'s' if len(unknown) > 1 else ''} {', '.join(prefix + k for k in unknown[:4])}, "
            f"which this nola_vision ({__version__}) does not know: the file was written by a newer version, whose "
            "outputs this one cannot reproduce, or was edited. Upgrade nola_vision (pip install -U nola_vision)")


def _upgrade_hint(document: dict) -> str:
    """What to add to a refusal of a file a later nola_vision wrote (its ``library_version``'s release numbers above
    this one's): that upgrading reads it; else nothing."""
    def release(version: Any) -> Tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", str(version).split("+")[0])[:3])

    if release(document.get("library_version")) <= release(__version__):
        return ""
    return (f" The file was written by nola_vision {document['library_version']}, newer than this one ({__version__}): "
            "upgrade nola_vision (pip install -U nola_vision) to load it.")


def _unknown_format(path: Path, document: Any) -> str:
    """Why a config document is not one this version reads, and what to do about it."""
    if not isinstance(document, dict):
        return f"{path} holds a JSON {type(document).__name__}, not an adapter config (expected format {FORMAT!r})"
    found = document.get("format")
    if found is None and "peft_type" in document:
        return (f"{path} is a peft adapter (nv.export_peft writes these), not a nola_vision adapter: load it with "
                "peft.PeftModel.from_pretrained(model, directory)")
    newer = re.fullmatch(r"nola_vision\.adapter/(\d+)", found) if isinstance(found, str) else None
    if newer is not None and int(newer.group(1)) > int(FORMAT.rsplit("/", 1)[1]):
        return (f"{path} has format {found!r}, written by a newer nola_vision than this one ({__version__}, which "
                f"reads up to {FORMAT!r}): upgrade nola_vision (pip install -U nola_vision)")
    return f"{path} has format {found!r}, expected {FORMAT!r}"


def _refuse_stand_in(path: Path, raw: bytes) -> None:
    """Refuse a file that stands in for the adapter's, naming what it is: a Git LFS pointer (a repository cloned
    without ``git lfs pull``) or a web page (a download that got an error page), which "save the adapter again"
    does not cure for someone who did not save it."""
    head = raw[:200].removeprefix(b"\xef\xbb\xbf").lstrip().lower()  # after a UTF-8 byte-order mark
    if head.startswith(b"version https://git-lfs"):
        raise AdapterLoadError(f"{path} is a Git LFS pointer ({len(raw)} bytes), not the file itself: the repository "
                               "was cloned or pulled without its LFS files. Run `git lfs pull` in it (after `git lfs "
                               "install`), then load again")
    if head.startswith((b"<!doctype html", b"<html", b"<?xml")):  # an error or login page, a cloud store's error
        raise AdapterLoadError(f"{path} is a web page or an XML error ({len(raw)} bytes), not the adapter's file: a "
                               "download got an error or login page instead. Download the file again from its raw or "
                               "'resolve' address")


def _read_weights(path: Path, raw: bytes, document: dict) -> Tuple[Dict[str, Tensor], dict]:
    """The stored tensors and quantisation table, after checking the file's sha256 against the config's."""
    _refuse_stand_in(path, raw)
    expected = document.get("weights_sha256")
    if expected is not None and _sha256(raw) != expected:
        raise AdapterLoadError(f"{path} is truncated or corrupt, or comes from another save than {CONFIG_NAME} "
                               f"beside it: its sha256 differs from the one recorded there; save the adapter again")
    try:
        tensors = load_safetensors_bytes(raw)
    except MemoryError:  # the tensors are a copy of the bytes: a file that fits once may not fit twice
        raise _too_large(path, len(raw), None) from None
    try:
        header_size = int.from_bytes(raw[:8], "little")
        metadata = json.loads(raw[8 : 8 + header_size]).get("__metadata__", {})
        quantization = json.loads(metadata.get("quantization", "{}"))
    except (SafetensorError, ValueError, AttributeError, json.JSONDecodeError) as error:
        raise AdapterLoadError(f"{path} is truncated or corrupt ({error}); save the adapter again") from error
    if not isinstance(quantization, dict):
        raise AdapterLoadError(f"{path}'s quantisation table is a JSON {type(quantization).__name__}, not an object of "
                               "entries by tensor name (the file was edited or written by another tool); save the "
                               "adapter again")
    return tensors, quantization


def read_adapter(directory: PathLike, *, allow_unchecked_legacy: bool = False) -> Tuple[dict, Dict[str, Tensor], dict]:
    """The checked config document, the raw stored tensors and the quantisation table of an adapter directory.

    Both files are read from one directory, so a save that replaces the adapter meanwhile gives the old or the
    new pair, never one of each. A legacy file without checksums (format 1) is refused unless
    ``allow_unchecked_legacy`` says that its contents may go unchecked.
    """
    root = Path(check_path(directory, "the adapter directory", expand_user=True))
    allow_unchecked_legacy = check_bool(allow_unchecked_legacy, "allow_unchecked_legacy")  # "no" read as true
    try:
        raw = read_files(root, (CONFIG_NAME, WEIGHTS_NAME), max_bytes={CONFIG_NAME: _CONFIG_LIMIT})
    except FileNotFoundError as error:
        aside = set_aside_copy(root)
        found = (f"; {aside} holds the adapter that was there, set aside by a save killed before it finished: rename "
                 f"it back to {root.name} to load it" if aside is not None else "")
        raise AdapterLoadError(f"{error.args[0] if error.args else root} is missing: an adapter directory holds "
                               f"{CONFIG_NAME} and {WEIGHTS_NAME} (written by save_adapter){found}") from error
    except NotADirectoryError as error:
        # the path itself, or the folder it lies under (``notes/task`` with ``notes`` a file)
        file = next((path for path in (root, *root.parents) if path.is_file()), root)
        where = f"{root} is a file" if file == root else f"{root} lies under {file}, a file"
        raise AdapterLoadError(f"{where}, not an adapter directory: pass the directory save_adapter wrote "
                               f"({CONFIG_NAME} and {WEIGHTS_NAME} inside)") from error
    except (IsADirectoryError, NotARegularFileError) as error:
        what = "a directory" if isinstance(error, IsADirectoryError) else "a FIFO, socket or device"
        raise AdapterLoadError(f"{error.args[0] if error.args else root} is {what} where save_adapter writes a "
                               "file: the adapter directory was changed after it was saved; save the adapter again") \
            from error
    except FileTooLargeError as error:
        raise _too_large(Path(error.filename), error.size, error.limit) from None
    except OSError as error:  # no permission, an I/O error
        raise _unreadable(error, root) from error
    document = _read_document(root / CONFIG_NAME, raw[CONFIG_NAME], allow_unchecked_legacy)
    return (document, *_read_weights(root / WEIGHTS_NAME, raw[WEIGHTS_NAME], document))


_FLOAT_STORAGE = (torch.float16, torch.bfloat16, torch.float32)


def decode_tensors(tensors: Dict[str, Tensor], quantization: dict,
                   shapes: Dict[str, Tuple[int, ...]]) -> Dict[str, Tensor]:
    """Float32 values of every stored tensor, dequantised and reshaped to the plan's shapes.

    Shapes (code counts for quantised tensors) are compared before anything is unpacked, and non-finite values are
    refused.
    """
    unexpected = sorted(set(tensors) - set(shapes))
    if unexpected:
        raise AdapterLoadError(f"the file holds tensor {unexpected[0]!r}, which this model does not have")
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        raise AdapterLoadError(f"{WEIGHTS_NAME} lacks tensors {missing[:4]}; the file is incomplete")
    values = {}
    for name, stored in tensors.items():
        shape = shapes[name]
        numel = math.prod(shape)
        if name in quantization:
            minimum, step, bits = _quantization_entry(name, quantization[name])
            if stored.dtype != torch.uint8:
                raise AdapterLoadError(f"tensor {name} is stored as {stored.dtype}, but its quantisation entry says "
                                       f"{bits}-bit codes, which are stored as uint8 (the file was edited or damaged)")
            if stored.dim() != 1:  # unpacked in the order save_adapter wrote them: flat
                raise AdapterLoadError(f"tensor {name}'s {bits}-bit codes have shape {tuple(stored.shape)}, but codes "
                                       "are stored flat, in one dimension, as save_adapter writes them (the file was "
                                       "edited or damaged)")
            stored_numel = (numel + 1) // 2 if bits == 4 else numel
            if stored.numel() != stored_numel:
                what = f"two 4-bit codes a byte: {stored_numel} bytes" if bits == 4 else f"{numel} codes"
                raise AdapterLoadError(f"tensor {name} holds {stored.numel()} bytes of {bits}-bit codes, but the "
                                       f"model's {numel} values of shape {shape} take {what}")
            stored = dequantize(unpack4(stored, numel) if bits == 4 else stored, minimum, step)
        elif stored.dtype not in _FLOAT_STORAGE:
            raise AdapterLoadError(f"tensor {name} is stored as {stored.dtype} without a quantisation entry: "
                                   "unquantised tensors are float16, bfloat16 or float32 (the file was edited or "
                                   "damaged)")
        elif tuple(stored.shape) != tuple(shape):  # transposed or reshaped: as many values, in another order
            position = (" (a position table: a full fine-tune holds it at the input size it trained at, so build the "
                        "model at that size)") if "pos_embed" in name.rsplit(".", 1)[-1] else ""
            raise AdapterLoadError(f"tensor {name} has shape {tuple(stored.shape)} in the file but {shape} in the "
                                   f"model{position}")
        value = stored.float().reshape(shape)
        if not bool(torch.isfinite(value).all()):
            raise AdapterLoadError(f"tensor {name} holds NaN or Inf values; the adapter is damaged or diverged")
        values[name] = value
    return values


def _quantization_entry(name: str, entry: Any) -> Tuple[float, float, int]:
    """(minimum, step, bits) of a tensor's quantisation entry, refused unless finite numbers, step ≥ 0, and bits
    that ``save_adapter`` writes."""
    if not (isinstance(entry, list) and len(entry) == 3 and _is_int(entry[2]) and entry[2] in INTEGER_BITS
            and _is_number_list(entry[:2]) and entry[1] >= 0):
        raise AdapterLoadError(f"tensor {name}: quantisation entry {entry!r} is not [minimum, step, bits] with a "
                               f"finite minimum, a finite step ≥ 0 and bits in {INTEGER_BITS}")
    return float(entry[0]), float(entry[1]), entry[2]


def _check_architecture(model: nn.Module, document: dict) -> None:
    backbone, model_arch = document["backbone"], architecture_name(model)
    if backbone == model_arch:
        return
    # A wrapper of the timm backbone (a FewShotClassifier, a notebook's own module): name the module to pass instead.
    # Only a timm architecture names a backbone: a class name such as "Sequential" would match a ViT's own blocks.
    inner = next((name for name, module in model.named_modules() if name and _timm_architecture(module) == backbone),
                 None)
    if inner is not None:
        raise AdapterLoadError(f"adapter was trained on {backbone!r}, which the model ({model_arch!r}) holds as its "
                               f"submodule {inner!r}: pass that module, model.get_submodule({inner!r})")
    if backbone[:1].isupper():  # a class name: the file was saved from a module of the user's own, such as a wrapper
        raise AdapterLoadError(f"adapter was trained on a {backbone!r} module (the model it was saved from had no timm "
                               f"architecture), but the model is {model_arch!r}: load it onto a {backbone!r} built as "
                               "the one it was saved from (an adapter saved from a wrapper loads onto that wrapper)")
    raise AdapterLoadError(f"adapter was trained on {backbone!r} but the model is {model_arch!r}: create the "
                           f"model with timm.create_model({backbone!r}, ...)")


def _check_wrapping(model: nn.Module, document: dict) -> None:
    """Refuse, naming the wrapper, a file whose layers are this model's under one more (or one less) leading name:
    timm's ``features_only=True`` model holds the backbone as ``model`` (and drops what follows its last output), so
    its adapter does not fit the backbone built as a classifier, nor the reverse. Swin's wrapper renames ``layers.0``
    to ``layers_0`` instead, and either drops the blocks after its last output, which the file may hold."""
    saved, modules = list(document["layers"]), {name for name, _ in model.named_modules()}
    if not saved or any(name in modules for name in saved):
        return
    tops = {name.split(".", 1)[0] for name in modules if name}
    wrapper = ("timm's features_only=True model, which holds the backbone as 'model' (Swin's renames layers.0 to "
               "layers_0) and drops the blocks after its last output")
    if any(unwrapped in modules for name in saved for unwrapped in _unwrapped_names(name)):
        raise AdapterLoadError(f"adapter was saved from {wrapper}, so its layers ({saved[0]}, ...) are not this "
                               "model's: build the model as the one it was saved from (features_only=True with the "
                               "same out_indices)")
    if any(feature_wrapper_name(name) in modules or any(f"{top}.{name}" in modules for top in tops) for name in saved):
        raise AdapterLoadError(f"adapter was saved from the backbone alone, and this model is {wrapper}, so the "
                               f"file's layers ({saved[0]}, ...) are not this model's: build the model as the one it "
                               "was saved from (without features_only)")


def _unwrapped_names(name: str) -> List[str]:
    """What a features wrapper's layer ``name`` is in the backbone alone: without its first part (``model.``), or
    its first part split again (``layers_0.x`` → ``layers.0.x``)."""
    first, _, rest = name.partition(".")
    top, _, index = first.rpartition("_")
    return [rest] + ([f"{top}.{index}.{rest}"] if top and index.isdigit() and rest else [])


def _check_pooling(model: nn.Module, document: dict) -> None:
    trained, pooling = document.get("pooling"), pooling_of(model)
    if trained is not None and pooling is not None and trained != pooling:
        raise AdapterLoadError(f"adapter was trained on a model that pools its tokens with global_pool={trained!r}, "
                               f"but this model uses global_pool={pooling!r}, so every output would differ: create it "
                               f"with timm.create_model({document['backbone']!r}, ..., global_pool={trained!r})")


def _check_settings(model: nn.Module, document: dict) -> None:
    """The model computes what the one the adapter was trained on did where no weight tells: as many attention heads,
    the same activations, parameter names, normalisation layers and constructor options (a file is checked on the
    settings it records: older files record fewer, the oldest none)."""
    trained, own = document.get("settings"), output_settings(model)
    _warn_of_unrecorded_settings(document)
    if trained is None:
        return
    for check in (_check_heads, _check_activations, _check_parameter_names, _check_norms, _check_blocks,
                  _check_options):
        check(trained, own, document["backbone"])


# What the settings a file of an earlier nola_vision may lack decide (pooling is a field of its own); those recorded
# later (the layers' norm classes, each activation by layer or slot, constructor options) are rarer to change.
_UNRECORDED_WHAT = {"attention_heads": "attention heads (num_heads)", "activations": "activations (act_layer)",
                    "norm_eps": "normalisation epsilons (norm_layer's eps)",
                    "parameter_names": "parameter names (qkv_bias, LayerScale, register tokens, ...)"}


def unrecorded_settings(settings: Optional[dict], pooling_recorded: bool) -> List[str]:
    """What a record of an earlier nola_vision (an adapter file's ``settings``, a checkpoint's) lacks of the settings
    that change outputs without changing a weight, named for a warning: nothing checks those at a load."""
    return ([] if pooling_recorded else ["pooling (global_pool)"]) + [
        what for key, what in _UNRECORDED_WHAT.items() if key not in (settings or {})]


def _warn_of_unrecorded_settings(document: dict) -> None:
    """Warn that a file of an earlier nola_vision, which records fewer of the settings that change outputs without
    changing a weight, loads unchecked onto a backbone built with others of them (other heads, activation, pooling)."""
    missing = unrecorded_settings(document.get("settings"), "pooling" in document)
    if missing:
        warn_user(f"nola_vision: this adapter file was saved by an earlier nola_vision that did not record the "
                  f"backbone's {', '.join(missing)}, so nothing checks them: a backbone built with other such "
                  "settings loads without error and gives other outputs. Build the model as the one it was trained "
                  "on, then save the adapter again (nv.save_adapter) to record them")


def _check_heads(trained: dict, own: dict, backbone: str) -> None:
    count = len(trained["attention_heads"])
    if count != len(own["attention_heads"]):
        raise AdapterLoadError(
            f"adapter was saved from a model with {count} attention layers, this model has "
            f"{len(own['attention_heads'])} (another depth, or another features_only out_indices, which keeps the "
            f"blocks up to the last index?): create it with the adapter's {count} blocks, one attention layer each "
            f"(timm.create_model({backbone!r}, ..., depth={count}) for a ViT; depths= per stage, {count} in all, for "
            "Swin; a features_only model with the out_indices it was trained with)")
    if trained["attention_heads"] != own["attention_heads"]:
        raise AdapterLoadError(
            f"adapter was trained on a model whose attention layers have {_few(trained['attention_heads'])} heads, "
            f"this model's have {_few(own['attention_heads'])}: the same weights give other outputs. Create it with "
            f"timm.create_model({backbone!r}, ..., num_heads={_few(trained['attention_heads'])}) as in training")


def _check_activations(trained: dict, own: dict, backbone: str) -> None:
    """The same activation functions (by what they compute), and in files that record them, layer by layer."""
    if not _same_setting("activations", trained["activations"], own["activations"]):
        raise AdapterLoadError(
            f"adapter was trained on a model with activations {trained['activations']}, this model has "
            f"{own['activations']}: the same weights give other outputs. Create it with the act_layer it was trained "
            "with")
    if "activation_layers" in trained and not _same_setting("activation_layers", trained["activation_layers"],
                                                            own["activation_layers"]):
        raise AdapterLoadError(
            f"adapter was trained on a model whose activation layers compute, in order, {trained['activation_layers']}"
            f", this model's compute {own['activation_layers']}: the same weights give other outputs. Create it with "
            f"timm.create_model({backbone!r}, ...) and the act_layer of each block it was trained with")
    if "activation_slots" in trained and not _same_setting("activation_slots", trained["activation_slots"],
                                                           own["activation_slots"]):
        raise AdapterLoadError(
            f"adapter was trained on a model whose blocks' activations (any class, by the module's name: act, act1, "
            f"act_fn, ...) are, in order, {_few(trained['activation_slots'])}, this model's are "
            f"{_few(own['activation_slots'])}: the same weights give other outputs. Create it with "
            f"timm.create_model({backbone!r}, ...) and the act_layer of each block it was trained with")


def _check_parameter_names(trained: dict, own: dict, backbone: str) -> None:
    if "parameter_names" in trained and trained["parameter_names"] != own["parameter_names"]:
        raise AdapterLoadError(
            "adapter was trained on a model with other parameters (by name, head aside): a constructor setting that "
            "adds or removes parameters differs, e.g. init_values (LayerScale), reg_tokens, class_token, qkv_bias or "
            f"pos_embed, so the same weights give other outputs. Create it with timm.create_model({backbone!r}, ...) "
            "and the settings it was trained with")


def _check_norms(trained: dict, own: dict, backbone: str) -> None:
    """As many normalisation layers, with the same epsilons and (in files that record them) classes."""
    if "norm_eps" in trained and len(trained["norm_eps"]) != len(own["norm_eps"]):
        raise AdapterLoadError(
            f"adapter was trained on a model with {len(trained['norm_eps'])} normalisation layers, this model has "
            f"{len(own['norm_eps'])} (another depth, or qk_norm/pre_norm?): the same weights give other outputs. "
            "Create it as it was trained")
    _refuse_other(trained, own, "norm_eps", "normalisation layers use eps", "this model's use",
                  "Create it with the norm_layer (eps) it was trained with")
    _refuse_other(trained, own, "norm_layers", "normalisation layers are", "this model's are",
                  f"Create it with timm.create_model({backbone!r}, ..., norm_layer=...) as it was trained")


def _check_blocks(trained: dict, own: dict, backbone: str) -> None:
    """The same block classes: the same weights in another order of norm, attention and MLP give other outputs."""
    _refuse_other(trained, own, "block_layers", "blocks are", "this model's are",
                  f"Create it with timm.create_model({backbone!r}, ...) and the block_fn (EVA: use_post_norm) it was "
                  "trained with")


def _refuse_other(trained: dict, own: dict, key: str, subject: str, own_subject: str, fix: str) -> None:
    """Refuse a file whose recorded per-layer ``key`` differs from this model's, naming both and the fix."""
    if key in trained and trained[key] != own[key]:
        raise AdapterLoadError(
            f"adapter was trained on a model whose {subject} {_few(trained[key])}, {own_subject} "
            f"{_few(own[key])}: the same weights give other outputs. {fix}")


def _check_options(trained: dict, own: dict, backbone: str) -> None:
    """The same constructor options, of those both the file and the model hold (``_OPTIONS``)."""
    changed = _changed_options(trained.get("constructor_options", {}), own["constructor_options"])
    if changed:
        name, (was, now) = next(iter(changed.items()))
        raise AdapterLoadError(
            f"adapter was trained on a model with {name}={_few(was)}, this model has {name}={_few(now)}: the same "
            f"weights give other outputs. Create it with timm.create_model({backbone!r}, ...) and the {name} it was "
            "trained with")


def _few(values: List[Any]) -> str:
    """A per-layer list shown compactly: one number when every layer has it."""
    return str(values[0]) if values and all(value == values[0] for value in values) else str(values)


def _check_head_stored(plan: InjectionPlan, document: dict, stored: Dict[str, Tensor]) -> None:
    """The file holds the model's head tensors, unless it says it has none: an adapter saved from a headless model
    (``num_classes=0``) is complete, and it is the model's head it cannot fill."""
    missing = [name for name in plan.head_names if name not in stored]
    if missing and not document["head"]:
        raise AdapterLoadError(
            f"the adapter was saved from a model without a classifier head, so it holds no values for this model's "
            f"head {missing}: create the model as it was, timm.create_model({document['backbone']!r}, ..., "
            f"num_classes={document['num_classes']}) (its outputs are then the features), or train and save the "
            "adapter on a model with a head")
    other = [name for name in missing if name not in document["head"]]
    if other:  # not a file cut short: it says which head tensors it saved
        raise AdapterLoadError(
            f"the adapter's head holds {document['head']}, this model's head also has {other} (a bias where the "
            "saved head had none?), which the file has no values for: build the head as the adapter's model had it")


def _check_injected_head(model: nn.Module) -> None:
    """An injected model still has the head its adapters were injected with (not one from reset_classifier), and its
    adapter tensors their shapes."""
    state = adapter_state(model)
    if state is not None:
        try:
            state.plan.require_same_trained(model)
            require_head_at_trained_bits(model)
        except ValueError as error:
            raise AdapterLoadError(str(error)) from error


def _check_num_classes(model: nn.Module, classes: int) -> None:
    if classes != num_classes_of(model):
        raise AdapterLoadError(f"adapter has a {classes}-class head but the model has {num_classes_of(model)} classes: "
                               f"create the model with num_classes={classes}")


def _file_classes(rows: List[str], plan: InjectionPlan, document: dict, stored: Dict[str, Tensor],
                  quantization: Dict[str, Any]) -> int:
    """The class count of the file's head: the rows of its stored tensors of the model's class rows where their form
    tells them (``_stored_rows``) and they agree, else what the file records. Files of earlier versions recorded timm's
    ``num_classes`` for a head replaced by hand (``model.head = nn.Linear(d, 7)`` left it at 1000), while their head
    tensors hold 7 rows. A head of another width is refused as such (``_check_head_width``), not taken for another
    class count. ``rows``: the model's ``_class_rows``. Tensors stored as packed 4-bit codes (a "full" fine-tuning
    file of early versions stored its head so) tell neither: two values a byte."""
    unpacked = {name: tensor for name, tensor in stored.items() if not _packed(quantization.get(name))}
    counts = {_stored_rows(unpacked.get(name), plan.trained_shapes.get(name)) for name in rows} - {None}
    # Tensors that disagree (a weight stored transposed) tell no count: the file's, and the shape checks name them
    classes = counts.pop() if len(counts) == 1 else document["num_classes"]
    _check_head_width(rows, plan, unpacked, classes)
    return classes


def _check_class_names(directory: PathLike, document: dict, classes: int) -> None:
    """Refuse recorded class names that do not name the stored head's outputs one to one: the document compares them
    with its own ``num_classes`` only, and a file whose head tensors hold other rows would label outputs wrongly."""
    names = document.get("class_names")
    if names is not None and len(names) != classes:
        raise AdapterLoadError(f"{directory}: field 'class_names' holds {len(names)} names, but the file's head has "
                               f"{classes} outputs (its tensors were replaced or the file edited, its checksums "
                               "recomputed): save the adapter again with one name per output")


def _packed(entry: Any) -> bool:
    """Whether a quantisation entry (``[minimum, step, bits]``) is of 4-bit codes, two to a byte."""
    return isinstance(entry, (list, tuple)) and len(entry) == 3 and entry[2] == 4


def _stored_rows(tensor: Optional[Tensor], shape: Optional[Tuple[int, ...]]) -> Optional[int]:
    """The rows of a stored class-row tensor of the model's ``shape``: a float tensor's first dimension (it is stored
    in its shape), or a bias's value count (a head is stored at 8 bits or more, one code a value, but flat); None
    for the flat codes of a weight, whose rows depend on the width they were trained at."""
    if tensor is None or not shape:
        return None
    if tensor.dtype in _FLOAT_STORAGE and tensor.dim() == len(shape):
        return tensor.shape[0]
    return tensor.numel() if len(shape) == 1 else None


def _check_head_width(rows: List[str], plan: InjectionPlan, stored: Dict[str, Tensor], classes: int) -> None:
    """Each stored class-row tensor holds ``classes`` rows of the model's head inputs: a head trained on another width
    (``embed_dim``) would otherwise be reported as another class count, naming a fix that does not fit either."""
    for name in rows:
        shape, tensor = plan.trained_shapes.get(name), stored.get(name)
        if tensor is None or not shape or len(shape) == 1 or not classes:
            continue
        inputs = math.prod(shape[1:])
        if tensor.numel() != classes * inputs:
            raise AdapterLoadError(
                f"the adapter's head {name} takes {tensor.numel() / classes:g} input features for each of its "
                f"{classes} classes, and the model's head takes {inputs}: the adapter was trained on a model of "
                "another width (embed_dim). Create the model with the architecture and sizes the adapter was trained "
                "on")


def _class_rows(model: nn.Module) -> List[str]:
    """The parameters whose rows are the model's classes: the weight and bias of each Linear in its head with as many
    outputs as it has classes (not a norm in the head, whose features may number as many)."""
    head, own = classifier_head(model), num_classes_of(model)
    if head is None:
        return []
    prefix = next(name for name, module in model.named_modules() if module is head)
    return [".".join(filter(None, (prefix, layer_name, parameter)))
            for layer_name, layer in head.named_modules() if isinstance(layer, nn.Linear) and layer.out_features == own
            for parameter, _ in layer.named_parameters(recurse=False)]


def _plan_for(model: nn.Module, document: dict) -> InjectionPlan:
    """The injection plan the file must fit: the model's own (already injected) or a fresh one."""
    try:
        config = config_from_dict(document["config"])
    except (TypeError, ValueError) as error:
        raise AdapterLoadError(f"the adapter config {document['config']!r} is not valid: {error}."
                               f"{_upgrade_hint(document)}") from error
    if config.method != document["method"]:
        raise AdapterLoadError(f"the file says method {document['method']!r} but its config is {config.method!r}")
    state = adapter_state(model)
    if state is not None:
        if not state.config.same_update(config):
            if state.config.method != config.method:  # other settings altogether: their differences tell nothing
                differ = f"method {state.config.method!r} in the model, {config.method!r} in the file"
            else:  # as the update takes them (LoRA's alpha None is its rank): equal effect, no difference
                mine, theirs = state.config.update_settings(), config.update_settings()
                differ = "in effect: " + "; ".join(
                    f"{key} {mine.get(key)!r} in the model, {theirs.get(key)!r} in the file"
                    for key in sorted(mine.keys() | theirs.keys()) if mine.get(key) != theirs.get(key))
            raise AdapterLoadError(f"model already has adapters with config {state.config_dict()}, the file has "
                                   f"{document['config']} ({differ}): a task switch copies the file's tensors into "
                                   "adapters of the same settings; load onto a fresh model, or nv.unload(model) first")
        return state.plan
    try:
        return plan_injection(model, config, warn=False)  # the file's sizes: its trainer was told
    except ValueError as error:
        raise AdapterLoadError(f"adapter targets do not fit this model: {error}") from error


def _check_representable(model: nn.Module, values: Dict[str, Tensor]) -> None:
    """Every value fits the dtype of the parameter it is copied into: a float16 model overflows above 65504 to
    infinity, which the files' float32 values may hold, and turns a tensor below its normal range (6e-5, a head saved
    as float32 for that reason) into zeros and subnormals (``_lossless_in``). Adapter tensors not injected yet get
    float32 parameters, which hold any file's values: the update they give is checked against the layer's dtype
    (``_check_unmerged_range``)."""
    parameters = dict(model.named_parameters())
    for name, value in values.items():
        if name not in parameters:
            continue
        dtype = parameters[name].dtype
        # up to 8 steps at its largest value (0.8% in float16: a tensor just below the normal range still loads)
        if not value.numel() or not dtype.is_floating_point or _lossless_in(value, dtype, steps=8):
            continue
        largest = float(value.abs().max())
        if largest > torch.finfo(dtype).max:
            raise AdapterLoadError(f"tensor {name} holds values up to {largest:.4g}, beyond the {dtype} of this "
                                   f"model (at most {torch.finfo(dtype).max:.4g}): they would become infinite. Load "
                                   "it onto a float32 or bfloat16 model")
        raise AdapterLoadError(f"tensor {name} holds values up to {largest:.4g} only, below the normal range of the "
                               f"{dtype} of this model (from {torch.finfo(dtype).tiny:.2g}): they would load as zeros "
                               "or as subnormals of a few digits. Load it onto a float32 or bfloat16 model")


def _check_unmerged_range(model: nn.Module, plan: InjectionPlan,
                          updates: Callable[[List[str]], Dict[str, Tuple[Tensor, Tensor]]]) -> None:
    """An unmerged pass casts each layer's update factors (``updates``) to its weight's dtype: on a float16 layer one
    beyond 65,504 gives inf or NaN outputs where ΔW itself may fit. A merged layer switches in its weight, which
    ``switch_merged`` checks."""
    own = adapted_layers(model)
    weights = {name: model.get_submodule(name).weight for name in plan.layers
               if not (name in own and own[name].merged)}
    narrow = [name for name, weight in weights.items() if narrow_range(weight)]
    for name, (a, b) in (updates(narrow) if narrow else {}).items():
        weight = weights[name]
        if factors_overflow(weight, a, b):
            largest = max(float(a.abs().max()), float(b.abs().max()))
            raise AdapterLoadError(
                f"the update of layer {name} has factors (ΔWᵀ = A·B, scaling included) up to {largest:.4g}, beyond "
                f"the {weight.dtype} of this model (at most {torch.finfo(weight.dtype).max:.4g}): each unmerged pass "
                "casts them to it and would give inf or NaN outputs. Load it onto a float32 or bfloat16 model (merged "
                "there with nv.merge_and_unload, then cast to float16, ΔW keeps float16's range where it fits)")


def layer_shapes(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    """Each adapted layer's in and out features and output slices, as an adapter file records them (``layers``)."""
    return {name: {"in": layer.in_features, "out": layer.out_features, "slices": [list(s) for s in layer.slices]}
            for name, layer in adapted_layers(model).items()}


def _check_layers(plan: InjectionPlan, document: dict) -> None:
    """Every adapted layer of the file exists in the plan with the same in/out features and slices."""
    stored = document["layers"]
    for name in sorted(set(stored) | set(plan.layers)):
        if name not in plan.layers:
            raise AdapterLoadError(f"the adapter adapts layer {name}, which the model's targets do not give")
        if name not in stored:
            raise AdapterLoadError(f"the model's targets give layer {name}, which the adapter file lacks")
        layer, want = stored[name], plan.layers[name]
        file_shape = (layer["in"], layer["out"], [tuple(s) for s in layer["slices"]])
        model_shape = (want.in_features, want.out_features, list(want.slices))
        if file_shape != model_shape:
            raise AdapterLoadError(
                f"layer {name} is {want.in_features}→{want.out_features} (slices {list(want.slices)}) in the model "
                f"but {layer['in']}→{layer['out']} (slices {file_shape[2]}) in the adapter: create the model with "
                "the architecture and sizes the adapter was trained on"
            )


def _check_bases(plan: InjectionPlan, document: dict) -> None:
    """The generator version and fingerprint of the regenerated bases."""
    expected = plan.basis_fingerprint()
    if expected is not None and document["generator_version"] != GENERATOR_VERSION:
        upgrade = _upgrade_hint(document)
        if upgrade:
            raise AdapterLoadError(f"adapter bases come from generator {document['generator_version']!r}, this "
                                   f"nola_vision has {GENERATOR_VERSION!r}.{upgrade}")
        raise AdapterLoadError(
            f"adapter bases come from generator {document['generator_version']!r}, this nola_vision has "
            f"{GENERATOR_VERSION!r}, whose bases differ: load it with a nola_vision whose generator is "
            f"{document['generator_version']!r} (the file was written by nola_vision {document['library_version']}, "
            "an early build: generators are listed in the docs' Random bases page), or train the task again"
        )
    if expected != document["basis_fingerprint"]:
        raise AdapterLoadError(
            f"basis fingerprint mismatch: the file says {document['basis_fingerprint']}, regenerated bases give "
            f"{expected}; the bases (seed, shapes or generator) differ from those the adapter was trained with"
        )


def _describe_merged(entries: List[dict]) -> str:
    layers = [str(name) for name in entries[0].get("layers", [])]
    return (f"{len(entries)} adapter(s) folded in by nv.merge_and_unload (a {entries[0].get('method')!r} adapter on "
            f"{', '.join(layers[:2])}{', ...' if len(layers) > 2 else ''})")


def unchecked_frozen_weights(document: dict) -> Optional[str]:
    """Why a file's record cannot tell the frozen weights it was trained on from others, where it cannot: a format 2
    file records none, a linear probe's file from 2026-11-30 only the head's input norm, which timm sets to ones and
    zeros in every random init; None otherwise (and for full fine-tuning, which replaces them)."""
    record = document.get("frozen_weights")
    if method_of(document["method"]).config_cls.train_backbone:
        return None
    written = f"this adapter file ({document['format']}, written by nola_vision {document['library_version']})"
    fix = "Save it again from the model it was trained on to record them"
    if record is None:
        return (f"{written} records no fingerprint of the frozen weights it was trained on, so nothing checks that the "
                f"model holds them: another pretrained tag or a random init loads with other outputs. {fix}")
    if "context" not in record and set(record["modules"]) <= set(HEAD_INPUTS):
        return (f"{written} records only the frozen weights of the norm its head reads ({', '.join(record['modules'])}"
                "), which every random init of the backbone has too: only another pretrained tag is told apart. "
                f"{fix}")
    return None


def _check_frozen_weights(model: nn.Module, document: dict, plan: InjectionPlan,
                          updates: Callable[[List[str]], Dict[str, Tuple[Tensor, Tensor]]]) -> None:
    """The model's frozen weights are those the adapter was trained on: the same adapters merged into them, the same
    fingerprint (format 2 files have none: only merges are checked), and not the file's own update (``updates``) folded
    in already. Full fine-tuning replaces them: only the batch norms' running statistics it recorded are checked."""
    record = document.get("frozen_weights")
    if plan.config.train_backbone:
        if record is not None:
            _refuse_other_weights(_compared_weights(record, model, document, {}, plan))
        return
    merged = unexpected_merges(record, model)
    if merged:
        raise AdapterLoadError(
            f"the model's weights hold {_describe_merged(merged)}, which this adapter was not trained on: loading it "
            "would add its update on top (twice, if it is the same adapter). Load it onto the unmerged base model (a "
            "fresh timm.create_model), or use nv.unload instead of nv.merge_and_unload to remove an adapter; pass "
            "check_frozen_weights=False to stack it on purpose"
        )
    missing = missing_merges(record, model)
    if missing:
        raise AdapterLoadError(
            f"the adapter was trained on weights with {_describe_merged(missing)}, and this model records none: load "
            "it onto the model that adapter was merged into (a state dict does not carry that record: if the model "
            "holds those merged weights, pass check_frozen_weights=False)"
        )
    unchecked = unchecked_frozen_weights(document)
    if unchecked is not None:
        warn_user(unchecked)
    if record is None:
        return
    memo: Dict[str, List[float]] = {}  # the model's records, taken once for both checks (its weights do not change)
    difference = _compared_weights(record, model, document, memo, plan)
    # told before the difference it explains
    if holds_update(record, model, list(plan.layers), updates, difference, memo):
        raise AdapterLoadError(
            "this adapter (or one whose update is close to its own, such as an earlier checkpoint of its run) is "
            "already merged into the model's weights (folded in by nv.merge_and_unload, whose record a state dict does "
            "not carry): loading it would add its update a second time. Load it onto the unmerged "
            "base model (a fresh timm.create_model), or use nv.unload instead of nv.merge_and_unload to remove an "
            "adapter; pass check_frozen_weights=False to stack it on purpose"
        )
    _refuse_other_weights(difference)


def _compared_weights(record: dict, model: nn.Module, document: dict, memo: Dict[str, List[float]],
                      plan: InjectionPlan) -> Optional[str]:
    """What differs between the model's frozen weights and the file's ``record`` of them (``differing_module``), or
    None; a record this build cannot compare is refused, saying which build can."""
    try:
        return differing_module(record, model, memo=memo, adapted=list(plan.layers))
    except ValueError as error:
        if record.get("version") == FINGERPRINT_VERSION:  # comparable, yet the weights could not be read (meta)
            raise AdapterLoadError(str(error)) from error
        upgrade = _upgrade_hint(document)
        if upgrade:
            raise AdapterLoadError(f"{error}.{upgrade}") from error
        raise AdapterLoadError(f"{error}: load it with the nola_vision build that wrote the adapter (version "
                               f"{document['library_version']}), or pass check_frozen_weights=False to load it "
                               "unchecked") from error


def _refuse_other_weights(difference: Optional[str]) -> None:
    """Refuse a model whose frozen weights ``difference`` tells apart from those the file records (None: the same)."""
    if difference is not None:
        raise AdapterLoadError(
            f"the model's frozen weights are not those the adapter was trained on: {difference}. Create the model with "
            "the pretrained weights it was trained on (the same timm name and pretrained tag, or pretrained_file; "
            "another tag, a fine-tune, a random init or weights with an adapter merged in give other outputs; a "
            "random backbone of a FewShotClassifier or CLI run, pretrained=False, is rebuilt by "
            "nola_vision.models.build_backbone(backbone, num_classes, pretrained=False, backbone_seed=<the run's, 0 by "
            "default>, **backbone_kwargs)), or pass check_frozen_weights=False to transfer it on purpose"
        )


def _file_updates(model: nn.Module, plan: InjectionPlan, stored: Dict[str, Tensor], quantization: dict,
                  names: List[str]) -> Dict[str, Tuple[Tensor, Tensor]]:
    """The update (``delta_factors``) of the file's values on each adapted layer ``names``: by the model's own layers
    once injected, else by layers built around its linears for the purpose (the model does not change). Shared bases
    are combined once for all layers, as ``merge`` does."""
    layer_cls, own = method_of(plan.config).layer_cls, adapted_layers(model)
    context = {} if own else layer_cls.injection_context(plan.config)  # one basis bank, as inject would make
    layers, values = {}, {}
    for name in names:
        layer = own[name] if own else layer_cls(model.get_submodule(name), plan.config, name, plan.layers[name].slices,
                                                **context)
        keys = {parameter: f"{name}.{parameter}" for parameter in layer.adapter_parameter_names}
        decoded = decode_tensors({key: stored[key] for key in keys.values() if key in stored}, quantization,
                                 {key: plan.trained_shapes[key] for key in keys.values()})
        layers[name] = layer
        values[name] = {parameter: decoded[key] for parameter, key in keys.items()}
    return dict(zip(names, delta_factors_of_values([(layers[name], values[name]) for name in names])))


def _each_once(updates: Callable[[List[str]], Dict[str, Tuple[Tensor, Tensor]]]
               ) -> Callable[[List[str]], Dict[str, Tuple[Tensor, Tensor]]]:
    """``updates``, computing each layer's at most once: the frozen-weight check and the unmerged-range check of a
    float16 model may both need a layer's."""
    computed: Dict[str, Tuple[Tensor, Tensor]] = {}

    def each_once(names: List[str]) -> Dict[str, Tuple[Tensor, Tensor]]:
        missing = [name for name in names if name not in computed]
        computed.update(updates(missing) if missing else {})
        return {name: computed[name] for name in names}
    return each_once


@dataclass(frozen=True)
class VerifiedAdapter:
    """What ``verify_adapter`` read and checked: the config document, the plan it fits, and the decoded values.

    ``values`` are float32 by full parameter name, shaped for the model (``shapes``); ``stored`` and
    ``quantization`` are the tensors as the file holds them (integer codes at 8/4 bits), for callers that keep
    the compact form and decode later with ``decode_tensors``.
    """

    directory: Path
    document: Dict[str, Any]
    plan: InjectionPlan
    values: Dict[str, Tensor]
    stored: Dict[str, Tensor]
    quantization: Dict[str, Any]
    shapes: Dict[str, Tuple[int, ...]]

    # The class count of the file's head (``_file_classes``): earlier versions recorded timm's stale ``num_classes``
    # for a head replaced by hand.
    classes: Optional[int] = None

    @property
    def num_classes(self) -> int:
        return self.document["num_classes"] if self.classes is None else self.classes

    @property
    def class_names(self) -> Optional[List[str]]:
        """The names of the head's outputs, in order, where the file records them (``save_adapter(class_names=)``)."""
        return self.document.get("class_names")


def verify_adapter(model: nn.Module, directory: PathLike, *, match_num_classes: bool = True,
                   check_frozen_weights: bool = True, allow_unchecked_legacy: bool = False) -> VerifiedAdapter:
    """Everything ``load_adapter`` checks, without changing the model; raises ``AdapterLoadError`` naming the fix.

    Checked: the file's fields and checksums, architecture, class count (unless ``match_num_classes`` is False:
    then the head takes the file's class count, as a server of many tasks needs), layer shapes against the
    injection plan, the fingerprint of the regenerated random bases, the frozen weights (unless
    ``check_frozen_weights`` is False), that a model under quantisation-aware training trains at the file's bits,
    tensor sizes and finite values. ``allow_unchecked_legacy`` admits format 1 files, which carry no checksums.
    """
    require_module(model, "verify_adapter")
    for flag, value in (("match_num_classes", match_num_classes), ("check_frozen_weights", check_frozen_weights),
                        ("allow_unchecked_legacy", allow_unchecked_legacy)):
        check_bool(value, f"verify_adapter: {flag}")
    model = unwrap_model(model)
    require_no_inner_wrappers(model, "nv.verify_adapter")
    document, stored, quantization = read_adapter(directory, allow_unchecked_legacy=allow_unchecked_legacy)
    _check_architecture(model, document)
    _check_pooling(model, document)
    _check_wrapping(model, document)
    _check_settings(model, document)
    _check_injected_head(model)
    plan = _plan_for(model, document)
    _check_layers(plan, document)  # first: another width changes the layers, and the head (``_file_classes``)
    rows = _class_rows(model)
    classes = _file_classes(rows, plan, document, stored, quantization)
    _check_class_names(directory, document, classes)
    if match_num_classes:
        _check_num_classes(model, classes)
    _check_bases(plan, document)
    updates = _each_once(partial(_file_updates, model, plan, stored, quantization))
    if check_frozen_weights:
        _check_frozen_weights(model, document, plan, updates)
    _require_quantization_fits(model, document["bits"], directory, bool(plan.layers))
    shapes = dict(plan.trained_shapes)
    if not match_num_classes:  # the head's class dimension at the file's class count
        for name in rows:
            if name in shapes:
                shapes[name] = (classes, *shapes[name][1:])
    _check_head_stored(plan, document, stored)
    values = decode_tensors(stored, quantization, shapes)
    _check_representable(model, values)
    _check_unmerged_range(model, plan, updates)
    return VerifiedAdapter(Path(directory), document, plan, values, stored, quantization, shapes, classes)


def load_adapter(model: nn.Module, directory: PathLike, *, check_frozen_weights: bool = True,
                 allow_unchecked_legacy: bool = False) -> nn.Module:
    """Load a saved adapter onto the base model it was trained on (injecting it if needed).

    ``verify_adapter`` checks everything before the model changes: the file's fields and checksums, architecture,
    class count, layer shapes against the injection plan, the fingerprint of the regenerated random bases, the
    frozen weights, the bits of quantisation-aware training, and finite values. The frozen weights of the adapted
    layers and of the norm the head reads must match the fingerprint saved with the adapter within the rounding of
    the precision they are held at (a bfloat16 copy does; another pretrained tag, a fine-tune of a few steps or a random
    init does not), and no adapter may have been merged into them
    since (``merge_and_unload``); ``check_frozen_weights=False`` skips both, for a deliberate transfer. Format 2 files
    hold no fingerprint, so only merged adapters are checked for them; format 1 files, without checksums, load only
    with ``allow_unchecked_legacy=True``. On a model with the same adapter config it switches tasks in place: the
    trained tensors are copied into the model's own parameters (a merged model applies W += ΔW_new − ΔW_old and stays
    merged), so a ``torch.compile``d model (pass it or the module it wraps) runs the new task without recompiling.
    """
    require_module(model, "load_adapter")
    check_bool(check_frozen_weights, "load_adapter: check_frozen_weights")
    check_bool(allow_unchecked_legacy, "load_adapter: allow_unchecked_legacy")
    target = unwrap_model(model)
    require_no_inner_wrappers(target, "nv.load_adapter")
    if any(tensor.is_meta for tensor in (*target.parameters(), *target.buffers())):  # copies onto meta do nothing
        raise AdapterLoadError("the model's weights are on the meta device, which holds no values: the adapter's "
                               "values would be lost there. materialize the model first (model.to_empty(device='cpu'), "
                               "then load its weights), then load the adapter")
    with SWITCH_LOCK:  # another thread's switch, merge or unload waits: their writes would interleave
        verified = verify_adapter(target, directory, check_frozen_weights=check_frozen_weights,
                                  allow_unchecked_legacy=allow_unchecked_legacy)
        # the model wholly the task, or (an error, Ctrl-C part-way) as it was: a first load interrupted between the
        # inject and the copy left fresh untrained adapters that a save then wrote as a task
        with all_or_nothing("nv.load_adapter") as undo:
            if adapter_state(target) is None:
                inject(model, verified.plan)  # through the wrapper: refused under DistributedDataParallel
                undo.append(lambda: unload(target))
            switch_merged(target, verified.values)  # plain copies; a merged model switches in place and stays merged
            names = verified.class_names
            adapter_state(target).loaded_class_names = (str(directory), list(names)) if names else None
    return model
