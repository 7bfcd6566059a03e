"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors`` holding coefficients and head, never bases.

The pair is written as one unit (a sibling temporary directory swapped in) and carries checksums: the config
records a sha256 of the weights file and a sha256 of its own fields, so flipped bytes or an edited ``scale``
fail to load instead of giving other outputs. ``verify_adapter`` checks a directory against a model's injection
plan without changing the model; ``load_adapter`` is verify, then apply; serving registers tasks through it too.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor, nn

from ..core.basis import GENERATOR_VERSION
from ..core.config import config_from_dict
from ..core.inject import adapter_state, inject
from ..core.layer import adapted_layers
from ..core.merge import switch_merged
from ..core.plan import InjectionPlan, plan_injection
from ..core.quantize import INTEGER_BITS, SUPPORTED_BITS, dequantize, pack4, quantize, require_bits, unpack4
from ..core.storage import atomic_directory, read_files
from ..core.targets import classifier_head, trained_parameters
from ..version import __version__

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "AdapterLoadError", "VerifiedAdapter", "adapter_size_bytes",
           "architecture_name", "decode_tensors", "load_adapter", "num_classes_of", "read_adapter", "save_adapter",
           "verify_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "nola_vision.adapter/2"
# Format 1 (before checksums) still loads; its files carry no checksums to verify.
LEGACY_FORMATS = ("nola_vision.adapter/1",)
PathLike = Union[str, os.PathLike]


class AdapterLoadError(ValueError):
    """An adapter file does not fit the model it is loaded onto, or is missing or damaged."""


def architecture_name(model: nn.Module) -> str:
    """The timm architecture (without pretrained tag) from the model's pretrained cfg, else its class name."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def num_classes_of(model: nn.Module) -> int:
    """The class count of the model's classifier (timm's ``num_classes``, else the head's out_features)."""
    if hasattr(model, "num_classes"):
        return int(model.num_classes)
    return int(getattr(classifier_head(model), "out_features", 0))


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


def save_adapter(model: nn.Module, directory: PathLike, bits: int = 16) -> Path:
    """Save what was trained (adapter coefficients/factors and the head) to ``directory``; returns it.

    ``bits`` 32 or 16 store floats; 8 and 4 store adapter tensors as per-tensor affine integer codes
    (the head keeps 8-bit codes). Random bases are never saved: the config records seed, generator version
    and a fingerprint, and ``load_adapter`` regenerates and verifies them. The two files replace an
    existing adapter in ``directory`` together or not at all; other files there are kept.
    """
    state = adapter_state(model)
    if state is None:
        raise ValueError("model has no adapters: call nola_vision.inject(model, config) before save_adapter")
    bits = require_bits(bits)
    adapter, head = trained_parameters(model, state.config.train_backbone)
    for name, param in {**adapter, **head}.items():
        if not bool(torch.isfinite(param.detach()).all()):
            raise ValueError(f"tensor {name} holds NaN or Inf values: refusing to save a diverged adapter "
                             "(train again with a lower learning rate)")
    float_dtype = torch.float32 if bits == 32 else torch.float16
    tensors: Dict[str, Tensor] = {}
    quantization: Dict[str, List[float]] = {}
    # The head is a few thousand values: below 16 bits it keeps 8, which costs little and keeps accuracy.
    stored_bits = {**{name: bits for name in adapter}, **{name: max(bits, 8) for name in head}}
    for name, param in {**adapter, **head}.items():
        if stored_bits[name] >= 16:
            tensors[name] = param.detach().to("cpu", float_dtype)
            continue
        codes, minimum, step = quantize(param.cpu(), stored_bits[name])
        tensors[name] = pack4(codes) if stored_bits[name] == 4 else codes
        quantization[name] = [minimum, step, stored_bits[name]]
    metadata = {"format": FORMAT, "quantization": json.dumps(quantization, separators=(",", ":"))}
    weights = save_safetensors_bytes(tensors, metadata=metadata)
    document: Dict[str, Any] = {
        "format": FORMAT,
        "method": state.method,
        "config": state.config_dict(),
        "backbone": architecture_name(model),
        "num_classes": num_classes_of(model),
        "layers": {
            name: {"in": layer.in_features, "out": layer.out_features, "slices": [list(s) for s in layer.slices]}
            for name, layer in adapted_layers(model).items()
        },
        "head": sorted(head),
        "bits": bits,
        "library_version": __version__,
        "generator_version": GENERATOR_VERSION,
        "basis_fingerprint": state.plan.basis_fingerprint(),
        "weights_sha256": _sha256(weights),
    }
    document["config_sha256"] = _document_digest(document)
    with atomic_directory(directory) as tmp:
        (tmp / WEIGHTS_NAME).write_bytes(weights)
        (tmp / CONFIG_NAME).write_text(_document_text(document))
    return Path(directory)


def adapter_size_bytes(directory: PathLike) -> int:
    """Bytes on disk of an adapter directory (config + weights)."""
    return sum((Path(directory) / name).stat().st_size for name in (CONFIG_NAME, WEIGHTS_NAME))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_layer(value: Any) -> bool:
    slices = value.get("slices") if isinstance(value, dict) else None
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


def _read_document(path: Path, raw: bytes) -> dict:
    """The config document, with every field's type checked: a damaged or hand-edited file fails here, clearly."""
    try:
        document = json.loads(raw.decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterLoadError(f"{path} is not valid JSON ({error}); the file is truncated or was edited") from error
    if not isinstance(document, dict) or document.get("format") not in (FORMAT, *LEGACY_FORMATS):
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise AdapterLoadError(f"{path} has format {found!r}, expected {FORMAT!r}")
    schema = {**_SCHEMA, **(_CHECKSUMS if document["format"] == FORMAT else {})}
    for key, (valid, what) in schema.items():
        if key not in document:
            raise AdapterLoadError(f"{path} lacks the field {key!r}; the file is incomplete or was edited: save the "
                                   "adapter again")
        if not valid(document[key]):
            raise AdapterLoadError(f"{path}: field {key!r} must be {what}, got {document[key]!r} "
                                   f"({type(document[key]).__name__}); the file was edited or damaged")
    return document


def _read_weights(path: Path, raw: bytes, document: dict) -> Tuple[Dict[str, Tensor], dict]:
    """The stored tensors and quantisation table, after checking the file's sha256 against the config's."""
    expected = document.get("weights_sha256")
    if expected is not None and _sha256(raw) != expected:
        raise AdapterLoadError(f"{path} is truncated or corrupt: its sha256 differs from the one recorded in "
                               f"{CONFIG_NAME}; save the adapter again")
    try:
        tensors = load_safetensors_bytes(raw)
        header_size = int.from_bytes(raw[:8], "little")
        metadata = json.loads(raw[8 : 8 + header_size]).get("__metadata__", {})
        quantization = json.loads(metadata.get("quantization", "{}"))
    except (SafetensorError, ValueError, AttributeError, json.JSONDecodeError) as error:
        raise AdapterLoadError(f"{path} is truncated or corrupt ({error}); save the adapter again") from error
    return tensors, quantization


def read_adapter(directory: PathLike) -> Tuple[dict, Dict[str, Tensor], dict]:
    """The checked config document, the raw stored tensors and the quantisation table of an adapter directory.

    Both files are read from one directory, so a save that replaces the adapter meanwhile gives the old or the
    new pair, never one of each.
    """
    root = Path(directory)
    try:
        raw = read_files(root, (CONFIG_NAME, WEIGHTS_NAME))
    except FileNotFoundError as error:
        raise AdapterLoadError(f"{error.args[0] if error.args else root} is missing: an adapter directory holds "
                               f"{CONFIG_NAME} and {WEIGHTS_NAME} (written by save_adapter)") from error
    document = _read_document(root / CONFIG_NAME, raw[CONFIG_NAME])
    return (document, *_read_weights(root / WEIGHTS_NAME, raw[WEIGHTS_NAME], document))


def decode_tensors(tensors: Dict[str, Tensor], quantization: dict,
                   shapes: Dict[str, Tuple[int, ...]]) -> Dict[str, Tensor]:
    """Float32 values of every stored tensor, dequantised and reshaped to the plan's shapes.

    Sizes are compared before anything is unpacked, and non-finite values are refused.
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
            entry = quantization[name]
            if not (isinstance(entry, list) and len(entry) == 3 and _is_int(entry[2]) and entry[2] in INTEGER_BITS):
                raise AdapterLoadError(f"tensor {name}: quantisation entry {entry!r} is not [minimum, step, bits] "
                                       f"with bits in {INTEGER_BITS}")
            minimum, step, bits = entry
            stored_numel = (numel + 1) // 2 if bits == 4 else numel
            if stored.dtype != torch.uint8 or stored.numel() != stored_numel:
                raise AdapterLoadError(f"tensor {name} holds {stored.numel()} {bits}-bit codes in the file but the "
                                       f"model needs {numel} values of shape {shape}")
            stored = dequantize(unpack4(stored, numel) if bits == 4 else stored, minimum, step)
        elif stored.numel() != numel:
            raise AdapterLoadError(f"tensor {name} has shape {tuple(stored.shape)} in the file but {shape} in the "
                                   "model")
        value = stored.float().reshape(shape)
        if not bool(torch.isfinite(value).all()):
            raise AdapterLoadError(f"tensor {name} holds NaN or Inf values; the adapter is damaged or diverged")
        values[name] = value
    return values


def _check_architecture(model: nn.Module, document: dict) -> None:
    backbone, model_arch = document["backbone"], architecture_name(model)
    if backbone != model_arch:
        raise AdapterLoadError(f"adapter was trained on {backbone!r} but the model is {model_arch!r}: create the "
                               f"model with timm.create_model({backbone!r}, ...)")


def _check_num_classes(model: nn.Module, document: dict) -> None:
    if document["num_classes"] != num_classes_of(model):
        raise AdapterLoadError(
            f"adapter has a {document['num_classes']}-class head but the model has {num_classes_of(model)} classes: "
            f"create the model with num_classes={document['num_classes']}"
        )


def _plan_for(model: nn.Module, document: dict) -> InjectionPlan:
    """The injection plan the file must fit: the model's own (already injected) or a fresh one."""
    try:
        config = config_from_dict(document["config"])
    except (TypeError, ValueError) as error:
        raise AdapterLoadError(f"the adapter config {document['config']!r} is not valid: {error}") from error
    if config.method != document["method"]:
        raise AdapterLoadError(f"the file says method {document['method']!r} but its config is {config.method!r}")
    state = adapter_state(model)
    if state is not None:
        if state.config_dict() != document["config"]:
            raise AdapterLoadError(f"model already has adapters with config {state.config_dict()}, the file has "
                                   f"{document['config']}; load onto a fresh model")
        return state.plan
    try:
        return plan_injection(model, config)
    except ValueError as error:
        raise AdapterLoadError(f"adapter targets do not fit this model: {error}") from error


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


def _check_bases_and_checksum(plan: InjectionPlan, document: dict, path: Path) -> None:
    """The generator version and fingerprint of the regenerated bases, then the config document's own checksum."""
    expected = plan.basis_fingerprint()
    if expected is not None and document["generator_version"] != GENERATOR_VERSION:
        raise AdapterLoadError(
            f"adapter bases come from generator {document['generator_version']!r}, this nola_vision has "
            f"{GENERATOR_VERSION!r}: install the nola_vision version {document['library_version']} that wrote it"
        )
    if expected != document["basis_fingerprint"]:
        raise AdapterLoadError(
            f"basis fingerprint mismatch: the file says {document['basis_fingerprint']}, regenerated bases give "
            f"{expected}; the bases (seed, shapes or generator) differ from those the adapter was trained with"
        )
    if document["format"] == FORMAT and _document_digest(document) != document["config_sha256"]:
        raise AdapterLoadError(f"{path} was edited or damaged after it was saved: its checksum (which "
                               "covers scale, init, targets, slices, bits and every other field) does not match; "
                               "save the adapter again")


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

    @property
    def num_classes(self) -> int:
        return self.document["num_classes"]


def verify_adapter(model: nn.Module, directory: PathLike, *, match_num_classes: bool = True) -> VerifiedAdapter:
    """Everything ``load_adapter`` checks, without changing the model; raises ``AdapterLoadError`` naming the fix.

    Checked: the file's fields and checksums, architecture, class count (unless ``match_num_classes`` is False:
    then the head takes the file's class count, as a server of many tasks needs), layer shapes against the
    injection plan, the fingerprint of the regenerated random bases, tensor sizes and finite values.
    """
    document, stored, quantization = read_adapter(directory)
    _check_architecture(model, document)
    if match_num_classes:
        _check_num_classes(model, document)
    plan = _plan_for(model, document)
    _check_layers(plan, document)
    _check_bases_and_checksum(plan, document, Path(directory) / CONFIG_NAME)
    shapes = dict(plan.trained_shapes)
    if not match_num_classes:  # the head's class dimension at the file's class count
        own = num_classes_of(model)
        for name in plan.head_names:
            shape = shapes[name]
            shapes[name] = (document["num_classes"], *shape[1:]) if shape[0] == own else shape
    values = decode_tensors(stored, quantization, shapes)
    return VerifiedAdapter(Path(directory), document, plan, values, stored, quantization, shapes)


def load_adapter(model: nn.Module, directory: PathLike) -> nn.Module:
    """Load a saved adapter onto a base model of the same architecture (injecting it if needed).

    ``verify_adapter`` checks everything before the model changes: the file's fields and checksums, architecture,
    class count, layer shapes against the injection plan, the fingerprint of the regenerated random bases, and
    finite values. On a merged model with the same adapter config, it switches tasks in place
    (W += ΔW_new − ΔW_old) and stays merged.
    """
    verified = verify_adapter(model, directory)
    if adapter_state(model) is None:
        inject(model, verified.plan)
    switch_merged(model, verified.values)  # plain copies; a merged model switches tasks in place and stays merged
    return model
