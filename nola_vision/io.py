"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors`` holding coefficients and head, never bases."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor, nn

from . import __version__
from .basis import GENERATOR_VERSION, fingerprint
from .config import PLAIN_METHODS, NOLAConfig, config_from_dict
from .inject import (
    adapter_state,
    adapted_layers,
    basis_fingerprint,
    classifier_head,
    find_targets,
    inject,
)
from .layers import LoRALinear, NOLALinear, nola_basis_specs, switch_merged
from .quantize import SUPPORTED_BITS, dequantize, pack4, quantize, unpack4

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "nola_vision.adapter/1"
PathLike = Union[str, os.PathLike]


class AdapterLoadError(ValueError):
    """An adapter file does not fit the model it is loaded onto, or is missing or damaged."""


def architecture_name(model: nn.Module) -> str:
    """The timm architecture (without pretrained tag) from the model's pretrained cfg, else its class name."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def num_classes_of(model: nn.Module) -> int:
    if hasattr(model, "num_classes"):
        return int(model.num_classes)
    return int(getattr(classifier_head(model), "out_features", 0))


def _trained_tensors(model: nn.Module) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    """(adapter tensors, head tensors) by full parameter name; "full" saves every parameter as "adapter"."""
    state = adapter_state(model)
    if state.method == "full":
        return {name: p for name, p in model.named_parameters()}, {}
    adapter = {
        f"{layer_name}.{param_name}": param
        for layer_name, layer in adapted_layers(model).items()
        for param_name, param in layer.adapter_parameters().items()
    }
    head = classifier_head(model)
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    head_tensors = {name: p for name, p in model.named_parameters() if id(p) in head_ids}
    return adapter, head_tensors


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so an interrupted save never leaves a half-written file."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(data)
    os.replace(tmp.name, path)


def save_adapter(model: nn.Module, directory: PathLike, bits: int = 16) -> Path:
    """Save what was trained (adapter coefficients/factors and the head) to ``directory``; returns it.

    ``bits`` 32 or 16 store floats; 8 and 4 store adapter tensors as per-tensor affine integer codes
    (the head stays float16). Random bases are never saved: the config records seed, generator version
    and a fingerprint, and ``load_adapter`` regenerates and verifies them.
    """
    state = adapter_state(model)
    if state is None:
        raise ValueError("model has no adapters: call nola_vision.inject(model, config) before save_adapter")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    adapter, head = _trained_tensors(model)
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
    config = state.config_dict()
    document = {
        "format": FORMAT,
        "method": state.method,
        "config": config,
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
        "basis_fingerprint": basis_fingerprint(model),
    }
    metadata = {"format": FORMAT, "quantization": json.dumps(quantization, separators=(",", ":"))}
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / WEIGHTS_NAME, save_safetensors_bytes(tensors, metadata=metadata))
    # One top-level key per line, values compact: readable, and small next to 4-bit coefficients.
    lines = ",\n".join(f" {json.dumps(key)}: {json.dumps(value, separators=(',', ':'))}" for key, value in document.items())
    _atomic_write(out / CONFIG_NAME, ("{\n" + lines + "\n}\n").encode())
    return out


def adapter_size_bytes(directory: PathLike) -> int:
    """Bytes on disk of an adapter directory (config + weights)."""
    return sum((Path(directory) / name).stat().st_size for name in (CONFIG_NAME, WEIGHTS_NAME))


def read_adapter(directory: PathLike) -> Tuple[dict, Dict[str, Tensor], dict]:
    """The config document, the raw stored tensors and the quantisation table of an adapter directory."""
    root = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (root / name).is_file():
            raise AdapterLoadError(f"{root / name} is missing: an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME} (written by save_adapter)")
    try:
        document = json.loads((root / CONFIG_NAME).read_text())
    except json.JSONDecodeError as error:
        raise AdapterLoadError(f"{root / CONFIG_NAME} is not valid JSON ({error}); the file is truncated or was edited") from error
    if document.get("format") != FORMAT:
        raise AdapterLoadError(f"{root / CONFIG_NAME} has format {document.get('format')!r}, expected {FORMAT!r}")
    raw = (root / WEIGHTS_NAME).read_bytes()
    try:
        tensors = load_safetensors_bytes(raw)
        header_size = int.from_bytes(raw[:8], "little")
        metadata = json.loads(raw[8 : 8 + header_size]).get("__metadata__", {})
    except (SafetensorError, ValueError, json.JSONDecodeError) as error:
        raise AdapterLoadError(f"{root / WEIGHTS_NAME} is truncated or corrupt ({error}); save the adapter again") from error
    return document, tensors, json.loads(metadata.get("quantization", "{}"))


def _decode(tensors: Dict[str, Tensor], quantization: dict, shapes: Dict[str, Tuple[int, ...]]) -> Dict[str, Tensor]:
    """Float32 values of every stored tensor, dequantised and reshaped to the model's shapes."""
    values = {}
    for name, stored in tensors.items():
        shape = shapes.get(name)
        if shape is None:
            raise AdapterLoadError(f"the file holds tensor {name!r}, which this model does not have")
        if name in quantization:
            minimum, step, bits = quantization[name]
            numel = int(torch.Size(shape).numel())
            codes = unpack4(stored, numel) if bits == 4 else stored
            if codes.numel() != numel:
                raise AdapterLoadError(f"tensor {name} holds {codes.numel()} values in the file but the model needs {numel}")
            stored = dequantize(codes, minimum, step)
        if stored.numel() != torch.Size(shape).numel():
            raise AdapterLoadError(f"tensor {name} has shape {tuple(stored.shape)} in the file but {shape} in the model")
        values[name] = stored.float().reshape(shape)
    return values


def _check_compatible(model: nn.Module, document: dict) -> None:
    """Raise AdapterLoadError naming what differs between the adapter and the model; changes nothing."""
    backbone, model_arch = document["backbone"], architecture_name(model)
    if backbone != model_arch:
        raise AdapterLoadError(f"adapter was trained on {backbone!r} but the model is {model_arch!r}: create the model with timm.create_model({backbone!r}, ...)")
    if document["num_classes"] != num_classes_of(model):
        raise AdapterLoadError(
            f"adapter has a {document['num_classes']}-class head but the model has {num_classes_of(model)} classes: "
            f"create the model with num_classes={document['num_classes']}"
        )
    method = document["method"]
    state = adapter_state(model)
    if state is not None:
        current = state.config_dict()
        if current != document["config"]:
            raise AdapterLoadError(f"model already has adapters with config {current}, the file has {document['config']}; load onto a fresh model")
        return
    if method in PLAIN_METHODS:
        return
    config = config_from_dict(document["config"])
    try:
        layers = find_targets(model, config.targets)
    except ValueError as error:
        raise AdapterLoadError(f"adapter targets do not fit this model: {error}") from error
    stored = {name: [tuple(s) for s in layer["slices"]] for name, layer in document["layers"].items()}
    if {name: list(slices) for name, slices in layers.items()} != stored:
        missing = sorted(set(stored) - set(layers))
        raise AdapterLoadError(f"adapter layers differ from the model's: the model lacks {missing[:4]} (and/or slices differ)")
    for name, layer in document["layers"].items():
        linear = model.get_submodule(name)
        in_features, out_features = layer["in"], layer["out"]
        if (linear.in_features, linear.out_features) != (in_features, out_features):
            raise AdapterLoadError(
                f"layer {name} is {linear.in_features}→{linear.out_features} in the model but {in_features}→{out_features} in the adapter"
            )


def _expected_fingerprint(document: dict) -> Optional[str]:
    if document["method"] != "nola":
        return None
    config = config_from_dict(document["config"])
    assert isinstance(config, NOLAConfig)
    specs = []
    for name, layer in document["layers"].items():
        slices = [tuple(s) for s in layer["slices"]]
        specs_a, specs_b = nola_basis_specs(config, name, layer["in"], slices[0][1] - slices[0][0], slices)
        specs.extend(specs_a + specs_b)
    return fingerprint(specs)


def _expected_shapes(model: nn.Module, document: dict) -> Dict[str, Tuple[int, ...]]:
    """Shape of every tensor the file must hold, derived from the model and config without changing the model."""
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    if document["method"] in PLAIN_METHODS:
        return shapes
    config = config_from_dict(document["config"])
    layer_class = NOLALinear if config.method == "nola" else LoRALinear
    for name, layer in document["layers"].items():
        slices = layer["slices"]
        width = slices[0][1] - slices[0][0]
        for param, shape in layer_class.parameter_shapes(config, layer["in"], width, len(slices)).items():
            shapes[f"{name}.{param}"] = tuple(shape)
    return shapes


def _required_tensors(model: nn.Module, document: dict) -> List[str]:
    """Names the file must hold: the head, plus every adapter tensor (every parameter for "full")."""
    if document["method"] == "full":
        return [name for name, _ in model.named_parameters()]
    if document["method"] == "linear":
        return list(document["head"])
    config = config_from_dict(document["config"])
    names = list(document["head"])
    for layer_name in document["layers"]:
        names += [f"{layer_name}.{param}" for param in (NOLALinear if config.method == "nola" else LoRALinear).adapter_parameter_names]
    return names


def load_adapter(model: nn.Module, directory: PathLike) -> nn.Module:
    """Load a saved adapter onto a base model of the same architecture (injecting it if needed).

    Everything is checked before the model changes: architecture, class count, layer shapes, and the
    fingerprint of the regenerated random bases against the one stored at save time. On a merged model
    with the same adapter config, it switches tasks in place (W += ΔW_new − ΔW_old) and stays merged.
    """
    document, tensors, quantization = read_adapter(directory)
    _check_compatible(model, document)
    if document["generator_version"] != GENERATOR_VERSION and document["method"] == "nola":
        raise AdapterLoadError(
            f"adapter bases come from generator {document['generator_version']!r}, this nola_vision has "
            f"{GENERATOR_VERSION!r}: install the nola_vision version {document['library_version']} that wrote it"
        )
    expected = _expected_fingerprint(document)
    if expected != document["basis_fingerprint"]:
        raise AdapterLoadError(
            f"basis fingerprint mismatch: the file says {document['basis_fingerprint']}, regenerated bases give "
            f"{expected}; the bases (seed, shapes or generator) differ from those the adapter was trained with"
        )
    shapes = _expected_shapes(model, document)
    required = _required_tensors(model, document)
    missing = sorted(set(required) - set(tensors))
    if missing:
        raise AdapterLoadError(f"{WEIGHTS_NAME} lacks tensors {missing[:4]}; the file is incomplete")
    values = _decode(tensors, quantization, shapes)
    if adapter_state(model) is None:
        config = document["config"] if document["method"] in PLAIN_METHODS else config_from_dict(document["config"])
        inject(model, config)
    switch_merged(model, values)  # plain copies; a merged model switches tasks in place and stays merged
    return model
