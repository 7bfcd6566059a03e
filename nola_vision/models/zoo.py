"""NOLA variants in timm's model registry, and ``create_model`` for any timm model plus an adapter."""
from __future__ import annotations

import difflib
import os
import pickle
import sys
from dataclasses import fields
from typing import Any, Callable, Dict, Optional, Union

import timm
from safetensors import SafetensorError
from timm.models import (
    generate_default_cfgs,
    get_arch_pretrained_cfgs,
    is_model,
    model_entrypoint,
    register_model,
    split_model_name_tag,
)
from torch import nn

from ..core.config import AdapterConfig, resolve_adapter
from ..core.inject import inject
from ..core.registry import get_method
from ..core.targets import head_parameter_names

__all__ = ["NOLA_VARIANTS", "check_model_name", "create_model", "download_failure"]

# Base architecture → NOLA defaults. ViT-L uses rank 1, as in the paper (98,304 coefficients at k=l=1024).
NOLA_VARIANTS: Dict[str, Dict[str, Any]] = {
    "vit_tiny_patch16_224": {},
    "vit_small_patch16_224": {},
    "vit_base_patch16_224": {},
    "vit_large_patch16_224": {"rank": 1},
    "vit_small_patch14_dinov2": {},
}
NOLA_SUFFIX = "_nola"
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
        names = {name.lower(): name for name in timm.list_models()}  # compared case-insensitively
        close = [names[m] for m in difflib.get_close_matches(architecture.lower(), names, n=5, cutoff=0.6)]
        hint = f" Close matches: {', '.join(close)}." if close else " See timm.list_models('*vit*') for names."
        raise ValueError(f"unknown timm model '{model_name}'.{hint} {fix}".rstrip())
    if tag and model_name not in timm.list_pretrained(f"{architecture}.*"):
        tags = timm.list_pretrained(f"{architecture}.*")
        shown = ", ".join(tags[:8]) or "(none: this architecture has no pretrained weights)"
        raise ValueError(f"unknown pretrained tag '{tag}' for timm model '{architecture}'. Available: {shown}. "
                         f"Drop the tag for timm's default. {fix}".rstrip())


def download_failure(model_name: str, err: OSError, instead: str) -> str:
    """Why the pretrained weights of ``model_name`` could not be had, where timm fetches them, and ``instead``: what
    to do without them."""
    config = timm.models.get_pretrained_cfg(model_name)
    hub, url = getattr(config, "hf_hub_id", None), getattr(config, "url", None)
    where = f" (timm downloads them from the Hugging Face Hub, {hub})" if hub else (
        f" (timm downloads them from {url})" if url else "")
    return (f"cannot get the pretrained weights of {model_name}{where} into timm's cache: {type(err).__name__}: "
            f"{err}. Connect to the internet once (later runs read the cache), or {instead}")


def create_model(model_name: str, adapter: Optional[Union[AdapterConfig, str, Dict[str, Any]]] = None,
                 **kwargs: Any) -> nn.Module:
    """``timm.create_model(model_name, **kwargs)`` followed by ``inject(model, adapter)`` when one is given.

    ``adapter`` is a config, a method name ("nola", "lora" for their defaults; "linear", "full") or a config's
    ``to_dict()`` form, as ``FewShotClassifier`` takes it.

    Works for every timm model whose blocks hold the targeted ``nn.Linear`` layers (ViT, DeiT, Swin, DINOv2, …).
    """
    check_model_name(model_name)
    config = resolve_adapter(adapter) if adapter is not None else None  # checked before the model is built
    if config is not None and model_name.split(".")[0].endswith(NOLA_SUFFIX):
        base = model_name.split(".")[0][: -len(NOLA_SUFFIX)]
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
    try:
        model = timm.create_model(model_name, **kwargs)
    except (EOFError, RuntimeError, pickle.UnpicklingError, SafetensorError) as err:
        if not checkpoint:
            raise
        if _read_but_misfit(err):
            raise ValueError(f"checkpoint_path {checkpoint} holds weights of other names or shapes than {model_name} "
                             f"built with these arguments ({str(err).splitlines()[0]} ...): point it at a state dict "
                             "of this model, or build the model the file was saved from") from err
        raise _unloadable(f"checkpoint_path {checkpoint}", model_name, err) from err
    if config is not None:
        inject(model, config)
    return model


def _read_but_misfit(err: BaseException) -> bool:
    """Whether torch read the file and found weights of other names or shapes (its own message says which; callers
    such as ``build_backbone`` name the backbone arguments), rather than failing to read it."""
    return isinstance(err, RuntimeError) and "Error(s) in loading state_dict" in str(err)


def _unloadable(weights: str, model_name: str, err: BaseException) -> ValueError:
    """The error for a weights file timm could not load into ``model_name`` (cut short, not a state dict, ...)."""
    return ValueError(f"{weights} does not load into {model_name} ({type(err).__name__}: "
                      f"{str(err) or 'the file ends early'}): point it at an intact .pth/.safetensors state dict of "
                      "this model (an interrupted copy or download is cut short)")


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
        config = _nola_config_from_kwargs(kwargs, defaults)
        tag = kwargs.get("pretrained_cfg")
        if isinstance(tag, str) and tag not in get_arch_pretrained_cfgs(base):  # timm would name the base model
            check_model_name(f"{name}.{tag}")
        # The base entrypoint resolves the pretrained tag (passed as pretrained_cfg) and loads weights first.
        weights_file = (kwargs.get("pretrained_cfg_overlay") or {}).get("file") if pretrained else None
        try:
            model = model_entrypoint(base)(pretrained=pretrained, **kwargs)
        except (EOFError, RuntimeError, pickle.UnpicklingError, SafetensorError) as err:
            if not weights_file or _read_but_misfit(err):
                raise
            raise _unloadable(weights_file, name, err) from err
        except OSError as err:  # no network, a proxy, a full cache disk: timm could not download the weights
            if not pretrained or weights_file:
                raise
            tagged = f"{base}.{tag}" if isinstance(tag, str) else base
            raise FileNotFoundError(download_failure(tagged, err, "pass pretrained_cfg_overlay=dict(file=<a local "
                                                     ".safetensors/.pth state dict of the base model>), or "
                                                     "pretrained=False for random weights")) from err
        base_keys = set(model.state_dict()) if weights_file else set()
        inject(model, config)
        if weights_file:
            _load_saved_adapter(model, weights_file, base_keys)
        return model

    name = base + NOLA_SUFFIX
    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"timm {base} with NOLA adapters (pass nola_rank, nola_num_basis_a, … or nola_config)."
    return entrypoint


def _load_saved_adapter(model: nn.Module, weights_file: str, base_keys: set) -> None:
    """Load what a ``_nola`` model's own state dict in ``weights_file`` holds beyond the base model's weights: its
    adapter tensors (timm left them out as unexpected keys) and its trained head (timm drops a pretrained head for
    another ``num_classes`` than the base's 1000). Nothing for a base model's file."""
    state, own = timm.models.load_state_dict(weights_file), model.state_dict()
    adapter_keys = [key for key in own if key not in base_keys]
    found = [key for key in adapter_keys if key in state]
    if not found:
        return
    missing = [key for key in adapter_keys if key not in state]
    if missing:
        raise ValueError(f"{weights_file} holds adapter tensors of another NOLA model: it has no {missing[0]} (and "
                         f"{len(missing) - 1} more of this model's): pass the nola_* arguments it was created with")
    head_state = {key: state[key] for key in head_parameter_names(model) if key in state}
    for key, value in head_state.items():
        if value.shape != own[key].shape:
            raise ValueError(f"{weights_file} holds a trained head {key} of shape {tuple(value.shape)}, this model's "
                             f"is {tuple(own[key].shape)}: pass the num_classes it was trained with")
    model.load_state_dict({**head_state, **{key: state[key] for key in found}}, strict=False)


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
