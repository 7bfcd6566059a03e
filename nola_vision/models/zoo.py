"""NOLA variants in timm's model registry, and ``create_model`` for any timm model plus an adapter."""
from __future__ import annotations

import difflib
import json
import logging
import os
import pickle
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import timm
import torch
from safetensors import SafetensorError
from timm.models import (
    FeatureDictNet,
    FeatureGraphNet,
    FeatureHookNet,
    generate_default_cfgs,
    get_arch_pretrained_cfgs,
    is_model,
    model_entrypoint,
    register_model,
    split_model_name_tag,
)
from torch import nn

try:  # the wrapper of features_only ViTs, not exported by timm.models
    from timm.models._features import FeatureGetterNet
except ImportError:  # pragma: no cover (older timm)
    FeatureGetterNet = None

from ..core.checks import check_bool, check_num_classes
from ..core.config import AdapterConfig, resolve_adapter
from ..core.inject import NOLA_SUFFIX, inject, name_architecture, nola_base_name
from ..core.layer import IDENTITY_KEY, MERGED_FLAG
from ..core.registry import get_method
from ..core.targets import feature_wrapper_name, head_parameter_names
from .weights import (
    LOCAL_DIR,
    OVERLAY_WEIGHT_SOURCES,
    UnreadableWeights,
    adapter_entries,
    check_backbone_keys,
    check_backbone_shapes,
    loaded_keys,
    local_dir_weights,
    raised_for_other_shapes,
    read_failure,
    read_state_dict,
    state_dict_overlay,
)

__all__ = ["NOLA_VARIANTS", "check_model_name", "create_model", "download_failure"]

# Base architecture → NOLA defaults. ViT-L uses rank 1, as in the paper (98,304 coefficients at k=l=1024).
NOLA_VARIANTS: Dict[str, Dict[str, Any]] = {
    "vit_tiny_patch16_224": {},
    "vit_small_patch16_224": {},
    "vit_base_patch16_224": {},
    "vit_large_patch16_224": {"rank": 1},
    "vit_small_patch14_dinov2": {},
}
METHOD = "nola"

# timm reads pretrained cfgs of registered models from this module attribute.
default_cfgs: Dict[str, Any] = {}


def check_model_name(model_name: str, fix: str = "") -> None:
    """Raise ValueError when ``model_name`` (``arch`` or ``arch.tag``) is unknown to timm, naming close matches.

    ``fix`` is appended to the message (e.g. which option to change).
    """
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"a timm model name is a non-empty str (such as 'vit_base_patch16_224'), got "
                         f"{model_name!r} ({type(model_name).__name__}). {fix}".rstrip())
    if model_name.lower().startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        return  # timm resolves these sources itself (a Hub repo, a local folder with config.json)
    architecture, tag = split_model_name_tag(model_name)
    if not is_model(architecture):
        base = nola_base_name(architecture)
        if base is not None and is_model(base):  # a real model without a registered *_nola twin
            variants = ", ".join(name + NOLA_SUFFIX for name in NOLA_VARIANTS)
            raise ValueError(f"unknown timm model '{model_name}': only {variants} are registered with NOLA built in. "
                             f"Adapt {base} with nv.create_model({base!r}, adapter='nola') (or nv.inject on the "
                             f"model timm.create_model({base!r}) builds). {fix}".rstrip())
        names = {name.lower(): name for name in timm.list_models()}  # compared case-insensitively
        close = [names[m] for m in difflib.get_close_matches(architecture.lower(), names, n=5, cutoff=0.6)]
        hint = f" Close matches: {', '.join(close)}." if close else " See timm.list_models('*vit*') for names."
        raise ValueError(f"unknown timm model '{model_name}'.{hint} {fix}".rstrip())
    if tag and model_name not in timm.list_pretrained(f"{architecture}.*"):
        tags = timm.list_pretrained(f"{architecture}.*")
        bare = {name.split(".", 1)[1].lower(): name for name in tags}  # compared without the shared architecture
        starting = [name for key, name in bare.items() if key.startswith(tag.lower())]
        similar = [bare[key] for key in difflib.get_close_matches(tag.lower(), bare)]
        close = list(dict.fromkeys([*starting, *similar]))[:3]
        hint = f" Close matches: {', '.join(close)}." if close else ""
        more = f" and {len(tags) - _TAGS_SHOWN} more (timm.list_pretrained('{architecture}.*'))"
        shown = (", ".join(tags[:_TAGS_SHOWN]) + (more if len(tags) > _TAGS_SHOWN else "")
                 or "(none: this architecture has no pretrained weights)")
        raise ValueError(f"unknown pretrained tag '{tag}' for timm model '{architecture}'.{hint} Available: {shown}. "
                         f"Drop the tag for timm's default. {fix}".rstrip())


# How many of an architecture's pretrained tags an unknown tag's error lists (ViT-B/16 has 10).
_TAGS_SHOWN = 20


def download_failure(model_name: str, err: OSError, instead: str) -> str:
    """Why the pretrained weights of ``model_name`` could not be had, where timm fetches them, and ``instead``: what
    to do without them."""
    config = timm.models.get_pretrained_cfg(model_name)
    hub, url = getattr(config, "hf_hub_id", None), getattr(config, "url", None)
    where = f" (timm downloads them from the Hugging Face Hub, {hub})" if hub else (
        f" (timm downloads them from {url})" if url else "")
    if hub and os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
        from huggingface_hub import constants

        fix = (f"HF_HUB_OFFLINE is set, so only the cache folder ({constants.HF_HUB_CACHE}, under HF_HOME) is read and "
               "it does not hold them: unset HF_HUB_OFFLINE for one run with internet (later runs read the cache), "
               f"point HF_HOME at a cache folder that holds them, or {instead}")
    else:
        fix = f"Connect to the internet once (later runs read the cache), or {instead}"
    return (f"cannot get the pretrained weights of {model_name}{where} into timm's cache: {type(err).__name__}: "
            f"{str(err).rstrip('.')}. {fix}")


def create_model(model_name: str, adapter: Optional[Union[AdapterConfig, str, Dict[str, Any]]] = None,
                 **kwargs: Any) -> nn.Module:
    """``timm.create_model(model_name, **kwargs)`` followed by ``inject(model, adapter)`` when one is given.

    ``adapter`` is a config, a method name ("nola", "lora" for their defaults; "linear", "full") or a config's
    ``to_dict()`` form, as ``FewShotClassifier`` takes it. A ``pretrained_cfg_overlay=dict(file=...)`` must hold
    every backbone weight; an adapted model's state dict there also gives its adapters and head, as for ``*_nola``
    names.

    Works for every timm model whose blocks hold the targeted ``nn.Linear`` layers (ViT, DeiT, Swin, DINOv2, …).
    """
    check_model_name(model_name)
    _check_num_classes(kwargs)
    if kwargs.get("pretrained") is not None:  # "no" was true: hub weights downloaded (offline: a minute of retries)
        kwargs["pretrained"] = check_bool(kwargs["pretrained"], "pretrained")
    config = resolve_adapter(adapter) if adapter is not None else None  # checked before the model is built
    architecture = _architecture(model_name).split(".")[0]
    base = nola_base_name(architecture)
    nola_name = base is not None
    if config is not None and nola_name:
        raise ValueError(f"{model_name} comes with NOLA adapters (set by nola_* arguments), so adapter= would be a "
                         f"second injection: pass adapter= with the plain model ({base!r}), or nola_config= here")
    checkpoint = kwargs.get("checkpoint_path")
    if checkpoint and os.path.isdir(checkpoint):
        raise ValueError(f"checkpoint_path {checkpoint} is a directory, and timm loads a state-dict file from it: an "
                         "adapter saved by nv.save_adapter loads onto the created model with "
                         "nv.load_adapter(model, directory)")
    if checkpoint and not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint_path {checkpoint} does not exist: point it at a .pth/.safetensors state "
                                f"dict of {model_name}")
    # a *_nola entrypoint checks its own overlay (timm.create_model reaches it without this function)
    weights = None if nola_name else _local_weights(model_name, kwargs)
    # an adapted model's checkpoint loads once the adapters are in (timm would load it into the plain model first)
    held = _checkpoint_adapters(checkpoint) if checkpoint else []
    if held and config is None and not nola_name:  # timm would list every adapter tensor as an unexpected key
        raise ValueError(f"checkpoint_path {checkpoint} holds an adapted model's state dict (adapted at "
                         f"{_adapted_at(held)}): pass adapter= with the settings it was adapted with (method, "
                         "targets, rank, seed, ...), or point it at the base model's weights")
    adapted_checkpoint = (config is not None or nola_name) and bool(held)
    if adapted_checkpoint:
        kwargs = {key: value for key, value in kwargs.items() if key != "checkpoint_path"}
    try:
        with _quiet_about_adapter_entries(weights):
            model = timm.create_model(model_name, **_loading(kwargs, weights))
    except TypeError as err:  # the model class's own "__init__() got an unexpected keyword argument 'x'"
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        name = unexpected.group(1) if unexpected is not None else None
        if name is not None and name.startswith("nola_") and model_name.lower().startswith(LOCAL_DIR):
            folder = model_name[len(LOCAL_DIR):]
            raise TypeError(f"{folder}/config.json gives {architecture} NOLA arguments ({name}): timm's save_for_hf "
                            f"wrote it from a {architecture}{NOLA_SUFFIX} model under its base's name (nola_vision "
                            f"before 2026-12-06). Name \"{architecture}{NOLA_SUFFIX}\" as the \"architecture\" in "
                            "that config.json, then create the model from the folder again") from err
        if name is None or name not in kwargs:  # raised inside the build, not for an argument
            raise
        if name.startswith("nola_"):
            hint = f"nola_* arguments belong to the *_nola names ({architecture}_nola), or adapter settings to adapter="
        elif nola_name and name in {f.name for f in fields(get_method(METHOD).config_cls)}:
            hint = f"a *_nola name takes NOLA settings with a nola_ prefix: pass nola_{name}="
        else:
            hint = "check its spelling against the model class's arguments"
        raise TypeError(f"create_model: {model_name} takes no argument {name!r}: {hint}") from err
    except (EOFError, RuntimeError, pickle.UnpicklingError, SafetensorError) as err:
        source = f"checkpoint_path {checkpoint}" if checkpoint else _overlay_label(kwargs)
        if source is None:
            raise
        if _read_but_misfit(err):
            raise _misfit(source, model_name, err) from err
        raise _unloadable(source, model_name, err) from err
    except OSError as err:  # no network, a proxy, a full cache disk: timm could not download the weights
        if checkpoint and not kwargs.get("pretrained"):  # torch.load of some files cut short: a bare EINVAL
            raise _unloadable(f"checkpoint_path {checkpoint}", model_name, err) from err
        if nola_name or weights or not kwargs.get("pretrained") or model_name.lower().startswith(LOCAL_DIR):
            raise
        raise FileNotFoundError(download_failure(model_name, err, "pass pretrained_cfg_overlay=dict(file=<a local "
                                                 ".safetensors/.pth state dict of the model>), or pretrained=False "
                                                 "for random weights")) from err
    base_keys = _check_overlay_covers(model, weights) if weights else set()
    if config is not None:
        inject(model, config)
    if adapted_checkpoint:
        own = adapter_entries(list(model.state_dict()))
        theirs, ours = sorted({key.rsplit(".", 1)[0] for key in held}), sorted({key.rsplit(".", 1)[0] for key in own})
        if theirs != ours and _adapted_at(held) == _adapted_at(own):  # the same layers under other names
            raise ValueError(f"checkpoint_path {checkpoint} names its adapted layers otherwise ({theirs[0]}, this "
                             f"model's {ours[0]}): a wrapper's state dict (a FewShotClassifier checkpoint holds the "
                             "backbone as 'model.') or timm's features_only=True model's, or the reverse. Point it at "
                             "the state dict of a model built as this one (the backbone's own state_dict())")
        if theirs != ours:  # torch lists the keys of each side, naming neither layout
            raise ValueError(f"checkpoint_path {checkpoint} holds adapter tensors of another adapted model: the "
                             f"file's model is adapted at {_adapted_at(held)}, this one at {_adapted_at(own)}. "
                             + (f"Build {model_name} with the nola_* settings the file's model was created with "
                                "(nola_targets, ...)" if nola_name else "Pass adapter= with the settings the file's "
                                "model was adapted with (method, targets, rank, ...)"))
        try:
            timm.models.load_checkpoint(model, checkpoint)
        except RuntimeError as err:  # an adapted layer refuses another update (seed, targets, rank, ...)
            if not _read_but_misfit(err):
                raise
            raise _misfit(f"checkpoint_path {checkpoint}", model_name, err) from err
    if weights:
        _load_saved_adapter(model, model_name, weights, base_keys=base_keys,
                            fix="Pass adapter= with the settings the file's model was adapted with (method, targets, "
                                "rank, seed, ...), or point the overlay at the base model's weights")
    return model


# How errors name a weights file given as ``pretrained_cfg_overlay=dict(file=...)``.
OVERLAY_FILE = "pretrained_cfg_overlay file"


@dataclass
class _LocalWeights:
    """Weights timm loads from this machine (an overlay's state dict or file, a ``local-dir:`` folder's file): the
    option that gave them and where they are (errors name both), their keys and shapes (``state``: meta tensors for a
    file), and the file (None: in memory)."""

    what: str
    where: str
    state: Dict[str, Any]
    path: Optional[str]

    @property
    def label(self) -> str:
        return f"{self.what} {self.where}"

    def values(self) -> Dict[str, Any]:
        """The tensors themselves."""
        return self.state if self.path is None else timm.models.load_state_dict(self.path)


def _local_weights(model_name: str, kwargs: Dict[str, Any]) -> Optional[_LocalWeights]:
    """The weights timm will load from this machine into ``model_name`` built with ``kwargs``, to check that they
    cover the model (timm loads them non-strictly for another ``num_classes``); None where there are none, or the
    model loads them itself (``custom_load``). Refuses weights named while ``pretrained=False`` (timm ignores them),
    a big_vision ``.npz`` without ``custom_load`` (torch would fail on it as on a damaged zip) and a ``features_only``
    model's state dict (``_refuse_features_state``)."""
    weights = _named_weights(model_name, kwargs)
    if weights is not None:
        _refuse_features_state(weights, model_name)
    return weights


def _refuse_features_state(weights: _LocalWeights, model_name: str) -> None:
    """Refuse the state dict of timm's ``features_only=True`` model: a ViT's holds every key under ``model.`` and no
    head (a wrapper's or a Lightning checkpoint's hold one: ``check_backbone_keys`` names their prefix), Swin's renames
    ``layers.0`` to ``layers_0``. timm loads weights into the plain model before it wraps it, so none of its names fit
    (a raw AttributeError inside timm's filter, or "16 backbone weights missing ... only part of the backbone")."""
    tops = {key.split(".", 1)[0] for key in weights.state}
    stages = sorted(f"{base}.0 as {base}_0" for base in _STAGE_CONTAINERS if f"{base}_0" in tops and base not in tops)
    prefixed = tops == {"model"} and not any(key.startswith("model.head.") for key in weights.state)
    if not stages and not prefixed:
        return
    how = f"renames {stages[0]}" if stages else "holds the backbone as 'model'"
    raise ValueError(f"{weights.label} holds the state dict of timm's features_only=True model (which {how}), and "
                     f"timm loads weights into {model_name} before it wraps it: point it at the state dict of the "
                     "model built without features_only (an adapter saved from a features model loads with "
                     "nv.load_adapter onto one built alike)")


# The containers of stages or blocks whose first child timm's features wrapper names ``<name>_0`` (NASNet's own
# ``cell_0`` is a module of the plain model).
_STAGE_CONTAINERS = ("blocks", "features", "layers", "levels", "stages")


def _named_weights(model_name: str, kwargs: Dict[str, Any]) -> Optional[_LocalWeights]:
    """``_local_weights`` before its check of the state dict's names."""
    overlay = kwargs.get("pretrained_cfg_overlay")
    overlay = overlay if isinstance(overlay, dict) else {}
    sources = [key for key in OVERLAY_WEIGHT_SOURCES if overlay.get(key) is not None]
    if sources and not kwargs.get("pretrained"):
        raise ValueError(f"pretrained_cfg_overlay names weights ({', '.join(sources)}), but pretrained=False builds "
                         "random weights and timm ignores them: pass pretrained=True to load them, or drop them")
    if not kwargs.get("pretrained") or overlay.get("custom_load"):
        return None
    if sources and sources[0] == "state_dict":
        state = overlay["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"pretrained_cfg_overlay state_dict holds a {type(state).__name__}, not a state dict of "
                             f"tensors: pass {model_name}'s state_dict()")
        return _LocalWeights("pretrained_cfg_overlay", "state_dict", state, None)
    if sources and sources[0] == "file":
        file = str(overlay["file"])
        if file.endswith(".npz"):
            raise ValueError(f"{OVERLAY_FILE} {file} is a big_vision .npz file, which timm reads only with "
                             "custom_load=True in the overlay (for the models that can, such as ViTs): add it, or "
                             "point the overlay at a .safetensors/.pth state dict")
        return _LocalWeights(OVERLAY_FILE, file, _read_overlay_file(file, model_name), file)
    folder_file = local_dir_weights(_local_dir_name(model_name, kwargs)) if not sources else None
    if folder_file is not None:
        what = f"{model_name}'s weights file"
        try:
            return _LocalWeights(what, str(folder_file), read_state_dict(folder_file, what), str(folder_file))
        except UnreadableWeights as err:
            raise _unloadable(f"{what} {folder_file}", model_name, err.__cause__) from err.__cause__
    return None


def _checkpoint_adapters(checkpoint: str) -> List[str]:
    """The adapter entries of the state dict in ``checkpoint`` (an adapted model's, beside its weights); none for a
    file no state dict is read from, which timm then reports."""
    try:
        return adapter_entries(read_state_dict(Path(checkpoint), "checkpoint_path"))
    except ValueError:  # UnreadableWeights, or a file of other objects
        return []


def _local_dir_name(model_name: str, kwargs: Dict[str, Any]) -> str:
    """``local-dir:<folder>`` for a model timm builds from a folder (an entrypoint sees its architecture's name and the
    folder in its ``pretrained_cfg``), else ``model_name``."""
    config = kwargs.get("pretrained_cfg")
    if isinstance(config, dict) and config.get("source") == "local-dir" and config.get("file"):
        return f"{LOCAL_DIR}{config['file']}"
    return model_name


def _architecture(model_name: str) -> str:
    """The timm architecture ``model_name`` builds: a ``local-dir:`` folder's config.json names it (timm reports an
    unreadable one itself), other names are their own."""
    if not model_name.lower().startswith(LOCAL_DIR):
        return model_name
    try:
        with open(Path(model_name[len(LOCAL_DIR):]) / "config.json", encoding="utf-8") as file:
            architecture = json.load(file).get("architecture")
    except (OSError, ValueError, AttributeError):
        return model_name
    return architecture if isinstance(architecture, str) else model_name


def _overlay_label(kwargs: Dict[str, Any]) -> Optional[str]:
    """How errors name the overlay's weights file, or None where it names none."""
    overlay = kwargs.get("pretrained_cfg_overlay")
    file = overlay.get("file") if isinstance(overlay, dict) else None
    return f"{OVERLAY_FILE} {file}" if file and kwargs.get("pretrained") else None


def _read_overlay_file(path: str, model_name: str) -> Dict[str, Any]:
    """The state dict (meta tensors) of an overlay file; a named error for a missing file, a folder or a file that is
    no state dict, where timm raises a bare ``FileNotFoundError('')`` or ``EOFError('')``."""
    if os.path.isdir(path):
        raise ValueError(f"{OVERLAY_FILE} {path} is a directory, and timm loads a state-dict file from it: point it at "
                         f"a .safetensors/.pth state dict of {model_name} (an adapter saved by nv.save_adapter loads "
                         "onto the created model with nv.load_adapter(model, directory))")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{OVERLAY_FILE} {path} does not exist: point it at a local .safetensors/.pth state "
                                f"dict of {model_name}")
    try:
        return read_state_dict(Path(path), OVERLAY_FILE)
    except UnreadableWeights as err:
        raise _unloadable(f"{OVERLAY_FILE} {path}", model_name, err.__cause__) from err.__cause__


def _loading(kwargs: Dict[str, Any], weights: Optional[_LocalWeights]) -> Dict[str, Any]:
    """``kwargs`` for timm, which loads local weights strictly when their head fits and so would refuse an adapted
    model's for its adapter entries: these are loaded after injection (``_load_saved_adapter``), and
    ``_check_overlay_covers`` keeps the backbone weights strict. An overlay's own file is read as a state dict
    (``state_dict_overlay``)."""
    kwargs = state_dict_overlay(kwargs)
    return {**kwargs, "pretrained_strict": False} if weights and adapter_entries(weights.state) else kwargs


@contextmanager
def _quiet_about_adapter_entries(weights: Optional[_LocalWeights]) -> Iterator[None]:
    """Drop timm's warning of "Unexpected keys" when they are all adapter entries of ``weights``: it leaves them out
    of its non-strict load, and they are loaded after injection or the file is refused (``_load_saved_adapter``), so
    the warning would tell of adapters dropped that were not."""
    entries = set(adapter_entries(weights.state)) if weights else set()
    if not entries:
        yield
        return

    def keep(record: logging.LogRecord) -> bool:
        listed = re.match(r"Unexpected keys \((.*)\) found while loading", str(record.msg))
        return listed is None or not set(listed.group(1).split(", ")) <= entries

    logger = logging.getLogger("timm.models._builder")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _check_overlay_covers(model: nn.Module, weights: _LocalWeights) -> set:
    """Refuse local weights that leave a backbone weight unset or hold other weights (timm loads them non-strictly
    for another ``num_classes``, leaving random weights in place); the classifier and adapter entries aside. A
    ``features_only`` model pruned the layers after its last output: the file's weights of those are not checked.
    Returns the plain model's state-dict keys, which tell the adapters' apart after injection."""
    target = _loaded_into(model)
    own = set(target.state_dict())
    saved_adapters = set(adapter_entries(weights.state)) - own
    backbone = {key: value for key, value in weights.state.items() if key not in saved_adapters}
    keys = loaded_keys(backbone, target)
    shapes = {key: value.shape for key, value in backbone.items()}
    if isinstance(model, _FEATURE_WRAPPERS):  # some flatten the model's Sequentials (layers.0 is layers_0)
        renamed = {key: _wrapper_name(key, own) for key in {*keys, *shapes}}
        keys = [renamed[key] for key in keys if renamed[key] is not None]
        shapes = {renamed[key]: shape for key, shape in shapes.items() if renamed[key] is not None}
    check_backbone_keys(target, keys, weights.where, weights.what)
    check_backbone_shapes(target, shapes, weights.where, weights.what)
    return own


# timm's features_only wrappers: built around a model it loaded the weights into, and pruned after the last output
_FEATURE_WRAPPERS = tuple(cls for cls in (FeatureDictNet, FeatureHookNet, FeatureGraphNet, FeatureGetterNet)
                          if cls is not None)


def _loaded_into(model: nn.Module) -> nn.Module:
    """The module timm loaded local weights into, whose names they hold: a ``features_only`` ViT's inner model (its
    FeatureGetterNet adds a ``model.`` prefix); the model itself otherwise."""
    return model.model if FeatureGetterNet is not None and isinstance(model, FeatureGetterNet) else model


def _wrapper_name(key: str, own: set) -> Optional[str]:
    """The name ``key`` of the plain model has in a ``features_only`` model with keys ``own`` (itself, or flattened
    where the wrapper flattened ``layers``); None for a layer it pruned."""
    name = key if key in own else feature_wrapper_name(key)
    return name if name in own else None


def _read_but_misfit(err: BaseException) -> bool:
    """Whether torch read the file and found weights of other names or shapes (its own message says which; callers
    such as ``build_backbone`` name the backbone arguments), rather than failing to read it."""
    return isinstance(err, RuntimeError) and "Error(s) in loading state_dict" in str(err)


def _misfit(weights: str, model_name: str, err: BaseException) -> ValueError:
    """The error for a weights file torch read but could not load into ``model_name``, with torch's informative lines:
    an adapted layer's own message (which names the seed, targets, ... that differ), else the first mismatched keys."""
    lines = _torch_lines(err)
    torch_lines = ("Missing key(s)", "Unexpected key(s)", "size mismatch for")
    layers = [line for line in lines if not line.startswith(torch_lines)]
    if layers:
        more = f" (and {len(layers) - 1} more layers like it)" if len(layers) > 1 else ""
        qat = re.search(r"trained quantisation-aware at (\d+) bits", layers[0])
        how = ("" if qat is None else f". create_model builds and loads in one call, so build the model without "
               f"{weights.split(' ')[0]}, call nv.set_quantization_aware(model, {qat.group(1)}), then "
               "model.load_state_dict(torch.load(file))")
        return ValueError(f"{weights} does not load into {model_name} as built: {layers[0]}{more}{how}")
    outputs = _other_outputs(lines)
    if outputs is not None:
        module, saved, built = outputs
        return ValueError(f"{weights} holds a {module} of {saved} outputs, {model_name} as built has {built}: pass the "
                          f"num_classes it was trained with ({saved})")
    shown = [line if len(line) <= 300 else line[:300] + " ..." for line in lines[:3]]
    more = f"; and {len(lines) - 3} more" if len(lines) > 3 else ""
    return ValueError(f"{weights} holds weights of other names or shapes than {model_name} built with these arguments "
                      f"({'; '.join(shown)}{more}): point it at a state dict of this model, or build the model the "
                      "file was saved from")


def _torch_lines(err: BaseException) -> List[str]:
    """The lines of torch's load_state_dict error after its heading, one per mismatched key or layer."""
    return [line.strip() for line in str(err).splitlines()[1:] if line.strip()]


_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+)\.(weight|bias): copying a param with shape "
                            r"torch\.Size\(\[([\d, ]*)\]\) from checkpoint, the shape in current model is "
                            r"torch\.Size\(\[([\d, ]*)\]\)")


def _other_outputs(lines: List[str]) -> Optional[Tuple[str, int, int]]:
    """(module, saved outputs, built outputs) where torch's only complaint is one layer's output count (a head
    trained for another ``num_classes``); None otherwise."""
    found = [_SIZE_MISMATCH.match(line) for line in lines]
    if not found or not all(found):
        return None
    shapes = {(m[1], tuple(int(n) for n in m[3].split(",") if n.strip()),
               tuple(int(n) for n in m[4].split(",") if n.strip())) for m in found}
    modules = {module for module, _, _ in shapes}
    if len(modules) != 1 or any(not s or len(s) != len(b) or s[1:] != b[1:] for _, s, b in shapes):
        return None
    outputs = {(s[0], b[0]) for _, s, b in shapes}
    return (modules.pop(), *outputs.pop()) if len(outputs) == 1 else None


def _unloadable(weights: str, model_name: str, err: BaseException) -> ValueError:
    """The error for a weights file timm could not load into ``model_name`` (cut short, not a state dict, ...)."""
    if raised_for_other_shapes(err):
        return ValueError(f"{weights} holds weights of other shapes than {model_name} as built (another embed_dim, "
                          f"mlp_ratio, or class/register tokens?): {str(err).strip().splitlines()[-1]}. Build the "
                          "model the file was saved from")
    return ValueError(f"{weights} does not load into {model_name} ({read_failure(err)}): point it at an intact "
                      ".pth/.safetensors state dict of this model (an interrupted copy or download is cut short; "
                      "another project's layout loads only where timm converts it)")


def _check_num_classes(kwargs: Dict[str, Any]) -> None:
    """Check ``num_classes`` in place: -1 gave a headless model silently, "3" or 2.5 failed deep in timm. 0 is a
    headless encoder; None leaves timm the model's default head."""
    if "num_classes" in kwargs:
        kwargs["num_classes"] = check_num_classes(kwargs["num_classes"], optional=True)


def _names_class(class_path: Any, cls: type) -> bool:
    """Whether ``class_path`` names ``cls`` (by its module or the package's export, as jsonargparse resolves it)."""
    return isinstance(class_path, str) and class_path.rsplit(".", 1)[-1] == cls.__name__


def _nola_config_from_kwargs(kwargs: Dict[str, Any], defaults: Dict[str, Any]) -> Any:
    """Pop ``nola_config`` or ``nola_<field>`` keyword arguments into the registered NOLA config."""
    config_cls = get_method(METHOD).config_cls
    config = kwargs.pop("nola_config", None)
    overrides = {f.name: kwargs.pop(f"nola_{f.name}") for f in fields(config_cls) if f"nola_{f.name}" in kwargs}
    unknown = sorted(k for k in kwargs if k.startswith("nola_"))
    if unknown:
        valid = [f"nola_{f.name}" for f in fields(config_cls)]
        raise TypeError(f"unknown NOLA arguments {unknown}; valid ones are {valid} and nola_config")
    if config is not None:
        if overrides:
            raise TypeError("pass either nola_config or nola_<field> arguments, not both")
        if isinstance(config, dict) and "class_path" not in config and config.get("method", METHOD) == METHOD:
            # NOLA fields (the method perhaps left out): a dict sets only what it names, so the model's defaults (rank
            # 1 for ViT-L) fill the rest, as for nola_<field> arguments; a NOLAConfig object sets every field itself
            config = {**defaults, **config, "method": METHOD}
        elif isinstance(config, dict) and _names_class(config.get("class_path"), config_cls):  # jsonargparse's form
            config = {**config, "init_args": {**defaults, **(config.get("init_args") or {})}}
        config = resolve_adapter(config)  # a NOLAConfig or its to_dict() form
        if not isinstance(config, config_cls):
            raise TypeError(f"nola_config of a {NOLA_SUFFIX} model must be a {config_cls.__name__} (or its to_dict() "
                            f"form), got a {type(config).__name__}: for another method create the base model with "
                            "nv.create_model(name, adapter=config)")
        return config
    return config_cls(**{**defaults, **overrides})


def _make_entrypoint(base: str, defaults: Dict[str, Any]) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        # timm.create_model reaches here without nv.create_model's checks ("no" was true: the weights downloaded)
        pretrained = check_bool(pretrained, "pretrained")
        _check_num_classes(kwargs)
        config = _nola_config_from_kwargs(kwargs, defaults)
        tag = kwargs.get("pretrained_cfg")
        if isinstance(tag, str) and tag not in get_arch_pretrained_cfgs(base):  # timm would name the base model
            check_model_name(f"{name}.{tag}")
        # The base entrypoint resolves the pretrained tag (passed as pretrained_cfg) and loads weights first.
        weights = _local_weights(name, {**kwargs, "pretrained": pretrained})
        try:
            with _quiet_about_adapter_entries(weights):
                model = model_entrypoint(base)(pretrained=pretrained, **_loading(kwargs, weights))
        except (EOFError, RuntimeError, pickle.UnpicklingError, SafetensorError) as err:
            if weights and _read_but_misfit(err) and _other_outputs(_torch_lines(err)):  # timm.create_model's too
                raise _misfit(weights.label, name, err) from err
            if not weights or _read_but_misfit(err):  # torch's message names the keys (build_backbone adds its kwargs)
                raise
            raise _unloadable(weights.label, name, err) from err
        except OSError as err:  # no network, a proxy, a full cache disk: timm could not download the weights
            if not pretrained or weights:
                raise
            tagged = f"{base}.{tag}" if isinstance(tag, str) else base
            raise FileNotFoundError(download_failure(tagged, err, "pass pretrained_cfg_overlay=dict(file=<a local "
                                                     ".safetensors/.pth state dict of the base model>), or "
                                                     "pretrained=False for random weights")) from err
        base_keys = _check_overlay_covers(model, weights) if weights else set()
        inject(model, config)
        if weights:
            _load_saved_adapter(model, name, weights, base_keys=base_keys,
                                fix=f"Build {name} with the nola_* settings the file's model was created with "
                                    "(nola_targets, nola_rank, nola_seed, ...), or point the overlay at the base "
                                    "model's weights")
        # timm's save_for_hf writes it beside the nola_* arguments timm records: the folder then builds this model
        # again (named by its base, they were arguments the base model does not take)
        name_architecture(model, name)
        return model

    name = base + NOLA_SUFFIX
    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"timm {base} with NOLA adapters (pass nola_rank, nola_num_basis_a, … or nola_config)."
    return entrypoint


def _load_saved_adapter(model: nn.Module, model_name: str, weights: _LocalWeights, *, base_keys: set,
                        fix: str) -> None:
    """Load what a model's own state dict in ``weights`` holds beyond the base model's weights: an adapted model's
    adapter tensors (timm left them out as unexpected keys), and a trained head of this model's size (timm drops a
    head for another ``num_classes`` than its pretrained config's, 1000 for most, even where the file's fits: a
    linear probe's or a fine-tune's would stay random). A file adapted at other layers than this model is refused
    (its adapters and head would be dropped), ``fix`` saying how to build the model it fits."""
    pruned = isinstance(model, _FEATURE_WRAPPERS)  # features_only: the layers after the last output are gone
    model = _loaded_into(model)
    state, own = weights.state, model.state_dict()
    adapter_keys = [key for key in own if key not in base_keys]
    saved = [key for key in adapter_entries(state) if key not in base_keys]
    if pruned:
        layers = {name for name, _ in model.named_modules()}
        saved = [key for key in saved if key.rsplit(".", 1)[0] in layers]
    if not saved:
        heads = [key for key in head_parameter_names(model) if key in state and state[key].shape == own[key].shape]
        if heads and _head_dropped(model):
            values = weights.values()
            model.load_state_dict({key: values[key] for key in heads}, strict=False)
        return
    source = weights.label
    where = (f"the file's model is adapted at {_adapted_at(saved)}, this one at "
             f"{_adapted_at(adapter_entries(adapter_keys)) if adapter_keys else 'no layer (it has no adapters)'}")
    foreign = [key for key in saved if key not in own]
    if foreign:
        shown = [key for key in foreign if key.rsplit(".", 1)[-1] not in (MERGED_FLAG, IDENTITY_KEY)] or foreign
        raise ValueError(f"{source} holds adapter tensors this model does not have "
                         f"({', '.join(shown[:3])}{f' and {len(foreign) - 3} more' if len(foreign) > 3 else ''}): "
                         f"{where}, so its trained adapters and head would be dropped. {fix}")
    missing = [key for key in adapter_keys if key not in state]
    if missing:
        raise ValueError(f"{source} holds adapter tensors of another adapted model: it has no "
                         f"{missing[0]} (and {len(missing) - 1} more of this model's): {where}. {fix}")
    for key in head_parameter_names(model):
        if key in state and state[key].shape != own[key].shape:
            raise ValueError(f"{source} holds a trained head {key} of shape "
                             f"{tuple(state[key].shape)}, this model's is {tuple(own[key].shape)}: pass the "
                             "num_classes it was trained with")
    values = weights.values()
    # the adapted layers' weights too: a merged model's hold ΔW, which its merged flag says (loaded weights unchanged)
    layer_weights = [f"{layer}.{p}" for layer in {key.rsplit(".", 1)[0] for key in saved} for p in ("weight", "bias")]
    kept = [key for key in [*head_parameter_names(model), *layer_weights] if key in values]
    try:
        model.load_state_dict({key: values[key] for key in [*kept, *saved]}, strict=False)
    except RuntimeError as err:  # an adapted layer refuses tensors of another update (seed, slices, rank, ...)
        raise _misfit(source, model_name, err) from err


def _head_dropped(model: nn.Module) -> bool:
    """Whether timm dropped the loaded weights' head: it does for another ``num_classes`` than its pretrained config's
    (where they match it loaded the head itself, and nothing needs reading again)."""
    config = getattr(model, "pretrained_cfg", None) or {}
    return config.get("num_classes") != getattr(model, "num_classes", None)


def _adapted_at(keys: List[str]) -> str:
    """Where the adapter entries ``keys`` sit, as targets (``blocks.3.mlp.fc1`` → ``mlp.fc1``) and a layer count."""
    layers = sorted({key.rsplit(".", 1)[0] for key in keys})
    targets = sorted({".".join(_after_last_index(layer.split("."))) for layer in layers})
    return f"{', '.join(targets)} ({len(layers)} layer{'s' if len(layers) != 1 else ''})"


def _after_last_index(parts: List[str]) -> List[str]:
    """The parts of a module name after its last numeric one (a block index), or all of them."""
    indices = [i for i, part in enumerate(parts) if part.isdigit()]
    return parts[indices[-1] + 1:] if indices and indices[-1] + 1 < len(parts) else parts


def _register_variants() -> None:
    module = sys.modules[__name__]
    for base, defaults in NOLA_VARIANTS.items():
        name = base + NOLA_SUFFIX
        # Same pretrained tags and weights as the base (the copies keep the base's hub ids).
        tagged = {name + key[len(base):]: cfg for key, cfg in get_arch_pretrained_cfgs(base).items()}
        default_cfgs.update(generate_default_cfgs(tagged))
        entrypoint = _make_entrypoint(base, defaults)
        setattr(module, name, entrypoint)
        if not is_model(name):
            register_model(entrypoint)


_register_variants()
