"""Whether a weights file fits a timm backbone: every backbone weight given, no other key (the classifier aside).

timm loads a file non-strictly when the head size differs (it drops the head), so a wrong or partial file would
otherwise leave random weights in place silently."""
from __future__ import annotations

import re
import sys
import traceback
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..core.layer import IDENTITY_KEY, MERGED_FLAG
from ..core.registry import METHODS

__all__ = ["LOCAL_DIR", "OVERLAY_WEIGHT_SOURCES", "UnreadableWeights", "adapter_entries", "check_backbone_keys",
           "check_backbone_shapes", "local_dir_weights", "loaded_keys", "raised_for_other_shapes", "read_state_dict",
           "read_failure", "state_dict_overlay"]

# The keys of a pretrained_cfg_overlay that name weights for timm to load (it takes the first it finds, in this order).
OVERLAY_WEIGHT_SOURCES = ("state_dict", "file", "url", "hf_hub_id")
# The overlay keys that name another weights file than the registry's, whose format custom_load described.
_FILE_SOURCES = ("file", "url", "hf_hub_id", "hf_hub_filename")
# timm's prefix of a model name that reads config.json and the weights from a local folder.
LOCAL_DIR = "local-dir:"
# The weights files timm looks for in such a folder, in its order (timm.models._hub._PREFERRED_FILES), then by suffix.
_LOCAL_DIR_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
_LOCAL_DIR_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")

# Position tables, which timm resamples on purpose for another input size (the model then reads other images).
_RESIZED_FOR_THE_INPUT = re.compile(r"(^|\.)(pos_embed|relative_position_bias_table|rel_pos\w*)($|\.)")


def read_failure(err: BaseException) -> str:
    """``"<type>: <message>"`` of an error reading a weights file; a file cut short reads the same on every torch
    (the unpickler's EOFError says "Ran out of input", or nothing)."""
    return "EOFError: the file ends early" if isinstance(err, EOFError) else f"{type(err).__name__}: {err}"


def state_dict_overlay(kwargs: dict) -> dict:
    """``kwargs`` whose ``pretrained_cfg_overlay``, where it names a weights file of its own, reads that file as a
    state dict unless it sets ``custom_load`` itself: timm before 1.0.31 kept the registry's ``custom_load`` (the
    augreg ViTs' JAX ``.npz``) and read a local ``.pth``/``.safetensors`` as one. timm 1.0.31 does the same."""
    overlay = kwargs.get("pretrained_cfg_overlay")
    if not isinstance(overlay, dict) or "custom_load" in overlay or not any(overlay.get(key) for key in _FILE_SOURCES):
        return kwargs
    return {**kwargs, "pretrained_cfg_overlay": {**overlay, "custom_load": False}}


def local_dir_weights(model_name: str) -> Path | None:
    """The weights file timm loads for a ``local-dir:<folder>`` model name with ``pretrained=True`` (its preferred
    names first, then the first file of each suffix), or None (another name, or a folder without one)."""
    if not model_name.lower().startswith(LOCAL_DIR):
        return None
    folder = Path(model_name[len(LOCAL_DIR):])
    preferred = getattr(sys.modules.get("timm.models._hub"), "_PREFERRED_FILES", _LOCAL_DIR_FILES)
    for name in preferred:
        if (folder / name).is_file():
            return folder / name
    for suffix in _LOCAL_DIR_SUFFIXES:
        found = sorted(path for path in folder.glob(f"*{suffix}") if path.is_file())
        if found:
            return found[0]
    return None


def _adapter_parameter_names() -> set[str]:
    """The trained tensors' names of every registered method's layers (``nola_alpha``, ``lora_A``, ...)."""
    return {name for method in METHODS.values() if method.layer_cls is not None
            for name in getattr(method.layer_cls, "adapter_parameter_names", ())}


def adapter_entries(keys: Iterable[str]) -> list[str]:
    """The keys of a state dict that belong to adapted layers: any registered method's trained tensors, the merged
    flags and the identity entries (a ``*_nola`` or injected model's state dict holds them beside the weights)."""
    names = _adapter_parameter_names() | {MERGED_FLAG, IDENTITY_KEY}
    return [key for key in keys if key.rsplit(".", 1)[-1] in names]


class UnreadableWeights(ValueError):
    """A weights file no state dict can be read from (cut short, not a state dict); the reader's error is its cause,
    and the caller names the option that gave the file."""


def read_state_dict(path: Path, what: str) -> dict[str, Any]:
    """The state dict timm reads from ``path`` (``state_dict``/``model`` unwrapped, ``module.`` stripped), as tensors
    on the meta device: names and shapes for the checks, without reading (and holding) the weights a second time.

    Raises UnreadableWeights when no state dict can be read, ValueError naming ``what`` for a safetensors file without
    its suffix (timm reads files by it) or a file of other objects than tensors."""
    from safetensors import safe_open
    from timm.models import clean_state_dict, load_state_dict

    with open(path, "rb") as file:
        head = file.read(9)
    if path.suffix != ".safetensors" and len(head) == 9 and head[8:] == b"{":  # safetensors: 8-byte size, then JSON
        raise ValueError(f"{what} {path} is a safetensors file without the .safetensors suffix, which timm reads "
                         "files by: rename it to end in .safetensors")
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as file:
                return clean_state_dict({key: torch.empty(file.get_slice(key).get_shape(), device="meta")
                                         for key in file.keys()})
        state = load_state_dict(str(path), device="meta")
    except Exception as err:  # the unpickler fails on other bytes with any error (KeyError, IndexError, ...)
        raise UnreadableWeights(f"{what} {path} cannot be read as a state dict ({read_failure(err)})") from err
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"{what} {path} holds a {type(state).__name__}, not a state dict of tensors: save the "
                         "backbone's state_dict()")
    return state


def loaded_keys(state_dict: Mapping[str, Any], model: nn.Module) -> list[str]:
    """The keys timm loads from ``state_dict`` into ``model``: after its architecture's checkpoint filter, which
    converts other projects' layouts (DINOv2's, OpenAI CLIP's, ...) into timm's."""
    convert = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    return list(state_dict) if convert is None else list(convert(dict(state_dict), model))


def _head_key(key: str, model: nn.Module) -> bool:
    """Whether ``key`` belongs to the classifier, which timm drops from a file when the head size differs."""
    classifiers = model.pretrained_cfg.get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else classifiers
    return any(key.startswith(f"{name}.") for name in classifiers)


def raised_for_other_shapes(error: BaseException) -> bool:
    """Whether loading a weights file raised for its shapes: torch's load_state_dict ("size mismatch"), or a reshape
    in timm's resampling of the position embedding (its checkpoint filter), which another count of class or register
    tokens fails first."""
    return "size mismatch" in str(error) or any(frame.name == "resample_abs_pos_embed"
                                                for frame in traceback.extract_tb(error.__traceback__))


def check_backbone_shapes(model: nn.Module, shapes: Mapping[str, Sequence[int]], path: str | Path, what: str) -> None:
    """Raise ValueError when a weight the file at ``path`` holds under a name of ``model`` has another shape there
    (classifier, position tables and the first conv's input channels aside): timm's checkpoint filters resample patch
    embeddings (FlexiViT), so another ``patch_size`` would load other weights than the file's without a word.
    ``shapes``: the file's, as saved (before timm's filter)."""
    own = model.state_dict()
    first_conv = f"{model.pretrained_cfg.get('first_conv')}.weight"
    changed = [f"{key} {tuple(shape)} in the file, {tuple(own[key].shape)} in the model"
               for key, shape in shapes.items()
               if key in own and not _same_but_channels(key, tuple(shape), tuple(own[key].shape), first_conv)
               and not _head_key(key, model) and not _RESIZED_FOR_THE_INPUT.search(key)]
    if changed:
        name = model.pretrained_cfg.get("architecture", type(model).__name__)
        raise ValueError(f"{what} {path} holds weights of other shapes than {name} as built ({'; '.join(changed[:2])}"
                         f"{'; ...' if len(changed) > 2 else ''}): timm would resample them into other weights than "
                         "the file's. Build the backbone the file was saved from (its patch_size, embed_dim, ...)")


def _same_but_channels(key: str, shape: tuple, own: tuple, first_conv: str) -> bool:
    """Whether a file's weight of ``shape`` loads as ``own``: the same shape, or the first conv's for another
    ``in_chans`` (timm adapts its input channels, summing or repeating them, without changing its kernels)."""
    return shape == own or (key == first_conv and len(shape) == len(own) > 1 and shape[0] == own[0]
                            and shape[2:] == own[2:])


def _likely_cause(path: Path, missing: list[str], unexpected: list[str], expected: set[str]) -> str:
    """Why a file does not match the backbone, for the error message."""
    prefixes = sorted({k.split(".", 1)[0] for k in unexpected if "." in k and k.split(".", 1)[1] in expected})
    if prefixes:
        return (f"its keys carry a '{prefixes[0]}.' prefix (a Lightning checkpoint, a wrapper's state dict, or timm's "
                f"features_only=True model's?): save the timm backbone's own state_dict() instead (built without "
                "features_only)")
    if any(key.rsplit(".", 1)[-1] in _adapter_parameter_names() for key in unexpected):
        if (path.parent / "adapter_config.json").is_file():
            return (f"it is a nola_vision adapter (save_adapter): build the backbone from its base weights and load "
                    f"the adapter with nv.load_adapter(model, '{path.parent}')")
        return ("it holds adapter tensors beside the weights (an adapted model's state_dict()): save the base "
                "weights (nv.unload(model) first, or the pretrained file it was built from), and save adapters with "
                "nv.save_adapter")
    if missing and unexpected:
        return "it holds another model's weights, or keys that are not in timm's layout for this model"
    if missing:
        return "it holds only part of the backbone"
    return "it holds weights this backbone does not have: check backbone_kwargs (depth, embed_dim, ...)"


def check_backbone_keys(model: nn.Module, keys: Iterable[str], path: str | Path, what: str) -> None:
    """Raise ValueError naming the keys and their likely cause when the state dict ``keys`` of ``path`` leave a
    weight of ``model`` unset or hold others; classifier keys are ignored on both sides."""
    path = Path(path)
    # a batch norm's step counter may be absent: torch's own loading fills it in
    expected = {k for k in model.state_dict() if not _head_key(k, model) and not k.endswith(".num_batches_tracked")}
    given = {k for k in keys if not _head_key(k, model)}
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        problems = [f"{len(names)} {label} (e.g. {', '.join(names[:3])})"
                    for label, names in (("backbone weights missing", missing), ("unexpected keys", unexpected))
                    if names]
        name = model.pretrained_cfg.get("architecture", type(model).__name__)
        raise ValueError(f"{what} {path} does not fit {name}: {' and '.join(problems)}; "
                         f"{_likely_cause(path, missing, unexpected, expected)}")
