"""Which modules an adapter changes and which parameters train: target matching, the classifier head, and the
one definition of a model's trained tensors (used by the plan, files, counts, training, export and serving)."""
from __future__ import annotations

import inspect
import re
from typing import Dict, List, Optional, Tuple

from torch import nn

from .layer import Slice, adapted_layers

__all__ = ["QKV_SLICES", "adaptable_linears", "blocks_regex", "classifier_head", "feature_wrapper_name",
           "find_targets", "head_parameter_names", "image_channels", "nested_suffix_matches", "require_adapter_values",
           "require_module", "require_no_inner_wrappers", "require_no_peft_model", "require_not_data_parallel",
           "require_nothing_else_trained", "require_one_head", "require_values", "trained_parameters", "unwrap_model"]

# Virtual targets: one third of a fused ``qkv`` projection, by position of its output rows.
QKV_SLICES = {"q": 0, "k": 1, "v": 2}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module that a ``torch.compile`` wrapper, ``DistributedDataParallel`` or ``DataParallel`` runs (through any
    nesting of them), else ``model``: adapters, their layer names and files belong to it.

    The wrappers prefix every name (``_orig_mod.``, ``module.``); code that matches names works on the module inside.
    """
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


# Wrappers that put a name of their own between a module and its parent's: torch.compile's, activation checkpointing's
# (torch.distributed's checkpoint_wrapper, which Lightning's FSDP applies) and FSDP's. How to keep the names, for each.
_NAME_WRAPPERS = {
    "_orig_mod": ("torch.compile", "Compile it in place ({path}.compile(), which keeps the names) or compile the "
                                   "whole model"),
    "_checkpoint_wrapped_module": ("checkpoint_wrapper", "Checkpoint with timm's model.set_grad_checkpointing(), which "
                                                         "keeps the names"),
    "_fsdp_wrapped_module": ("FullyShardedDataParallel", "Save from a model that FSDP does not wrap"),
}


def require_no_inner_wrappers(model: nn.Module, who: str) -> None:
    """Refuse a model holding a wrapper below its top (a regionally compiled block): its modules' names carry the
    wrapper's ``_orig_mod.``, which files and graphs would record and a plain model of the architecture does not have.
    A wrapper around the whole model is unwrapped by every function (``unwrap_model``). ``who`` starts the message."""
    for name, module in unwrap_model(model).named_modules():
        for attribute, (wrapper, fix) in _NAME_WRAPPERS.items():
            if name and isinstance(getattr(module, attribute, None), nn.Module):
                path = "model" + "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in name.split("."))
                raise ValueError(
                    f"{who}: {name} is wrapped by {wrapper}, so the names of the layers inside it carry "
                    f"'{attribute}.', which adapter files and graphs do not record (the model they load onto has "
                    f"no such names). {fix.format(path=path)}; to go on with this model, put back the module it "
                    f"wraps: {path} = {path}.{attribute}")


def require_module(model: object, function: str, *, adaptable: bool = True) -> None:
    """Refuse anything but an ``nn.Module`` with a TypeError naming what was passed, before any attribute of it is read;
    a model name gets the one call that builds that model with adapters. With ``adaptable``, also refuse a module
    that takes its adapters another way: one whose ``adapter_call_refusal`` (a class attribute) says which, found
    through ``torch.compile``/DDP wrappers and inside a model that holds one."""
    if isinstance(model, nn.Module):
        for name, module in model.named_modules() if adaptable else ():
            refusal = getattr(type(module), "adapter_call_refusal", None)
            if isinstance(refusal, str):
                where = "" if module is unwrap_model(model) else f"the model holds a {type(module).__name__} ({name}): "
                raise ValueError(f"nv.{function}: {where}{refusal}")
        if adaptable:
            require_no_peft_model(model, function)
        return
    got = f"the string {model!r}" if isinstance(model, str) else f"a {type(model).__name__}"
    hint = (f": to build that timm model with adapters, call nv.create_model({model!r}, adapter=config)"
            if isinstance(model, str) and function != "unload" else "")
    raise TypeError(f"nv.{function} takes a model (a torch.nn.Module), got {got}{hint}")


def require_values(model: nn.Module, function: str) -> None:
    """Refuse to write a model whose weights hold no values: on the meta device, or adapter tensors inject made
    there that nothing gave values since (``require_adapter_values``)."""
    if any(parameter.is_meta for parameter in model.parameters()):
        raise ValueError(f"{function}: the model's weights are on the meta device, which holds no values: there is "
                         "nothing to write (load or train its weights on a real device first)")
    require_adapter_values(model, function)


def require_adapter_values(model: nn.Module, function: str) -> None:
    """Refuse adapter tensors that inject made on the meta device and nothing gave values since: ``to_empty()`` left
    them uninitialised memory (on the meta device they are refused as holding no values)."""
    unset = [name for name, layer in adapted_layers(model).items() if layer.holds_unset_values()]
    if unset:
        more = f" and {len(unset) - 1} more layers" if len(unset) > 1 else ""
        raise ValueError(f"{function}: the adapter tensors of {unset[0]}{more} were on the meta device (inject "
                         "there, or a move there) and given no values since, so they hold uninitialised memory: load "
                         "an adapter first (nv.load_adapter), or inject once the weights are on a real device")


def require_no_peft_model(model: nn.Module, function: str) -> None:
    """Refuse a peft model (or one holding peft's adapter layers): nola_vision's adapters and files belong to the plain
    model, whose parameter names peft's wrappers change (``base_model.model.``, ``base_layer``)."""
    found = next(((name, module) for name, module in model.named_modules()
                  if type(module).__module__.split(".")[0] == "peft"), None)
    if found is not None:
        name, module = found
        where = "is" if module is model else f"holds ({name or 'itself'})"
        raise ValueError(f"nv.{function}: the model {where} a peft {type(module).__name__}, and nola_vision adapts and "
                         "loads into the plain timm model. Pass that model: peft_model.unload() gives it back without "
                         "peft's adapters, peft_model.merge_and_unload() with them folded into its weights")


def require_not_data_parallel(model: nn.Module, removing: bool = False) -> None:
    """Refuse to add adapters through ``DistributedDataParallel``/``DataParallel``: the wrapper took the model's
    parameters when it was built, so new adapter tensors would silently train unsynchronised on each replica.
    ``removing``: refuse to remove them through ``DistributedDataParallel``, whose next forward pass would fail on
    the tensors it holds (``DataParallel`` takes the module as it is at each call)."""
    kinds = (nn.parallel.DistributedDataParallel,) + (() if removing else (nn.DataParallel,))
    wrapper = next((module for module in model.modules() if isinstance(module, kinds)), None)
    if wrapper is not None and removing:
        raise ValueError(f"the model is (or holds) a {type(wrapper).__name__}, which holds the adapter tensors it was "
                         "built with: removing them through it would break its next forward pass. Unload the model "
                         "inside it (wrapper.module), then wrap that again if it is to train on")
    if wrapper is not None:
        raise ValueError(f"the model is (or holds) a {type(wrapper).__name__}, which took its parameters when it was "
                         "built: adapters added now would not be synchronised across replicas. Inject (or load "
                         "the adapter) into the plain model first, then wrap it")


def _matches(name: str, pattern: str) -> bool:
    """A target matches a module name as an exact name, a dotted suffix, or a full regex match."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def nested_suffix_matches(pattern: str, names: List[str]) -> List[str]:
    """The layers of ``names`` that the suffix ``pattern`` selects inside a module whose own ``pattern`` it selects
    too (a relative-position ViT's ``blocks.0.attn.rel_pos.mlp.fc1`` beside ``blocks.0.mlp.fc1``): rarely meant."""
    suffix = "." + pattern
    matched = [name for name in names if name.endswith(suffix)]
    owners = {name[: -len(suffix)] + "." for name in matched}
    return [name for name in matched if any(name.startswith(owner) and name != owner + pattern for owner in owners)]


def blocks_regex(names: List[str]) -> str:
    """A regex that fully matches ``names`` with any block indices (``blocks\\.\\d+\\.mlp\\.fc1``), and no other
    kind of layer."""
    return "|".join(re.escape(kind).replace(r"\*", r"\d+") for kind in _summarise_names(names))


def _summarise_names(names: List[str]) -> List[str]:
    """Module names with block indices folded (``blocks.*.mlp.fc1``), for readable error messages."""
    return sorted({re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", name) for name in names})


def _classifier_owners(model: nn.Module) -> List[nn.Module]:
    """The modules whose ``get_classifier()`` names the head: the model itself when it has the method, else its
    outermost submodules that have it and whose head has parameters (a timm model inside a wrapper module; headless
    encoders, ``num_classes=0``, do not count)."""
    if callable(getattr(model, "get_classifier", None)):
        return [model]
    owners: Dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        inside = any(name.startswith(f"{owner}.") for owner in owners)
        if callable(getattr(module, "get_classifier", None)) and not inside:
            owners[name] = module
    return [module for module in owners.values() if _has_head(module.get_classifier())]


def _has_head(head: object) -> bool:
    heads = head if isinstance(head, (tuple, list)) else [head]
    return any(isinstance(h, nn.Module) and any(True for _ in h.parameters()) for h in heads)


def classifier_head(model: nn.Module) -> Optional[nn.Module]:
    """The classifier head by timm's ``get_classifier()`` contract (of the model or of the one timm model it wraps);
    None for a model without one."""
    owners = _classifier_owners(model)
    head = owners[0].get_classifier() if len(owners) == 1 else None
    return head if isinstance(head, nn.Module) and _has_head(head) else None


def require_one_head(model: nn.Module, headless_serves: bool = True) -> None:
    """Refuse a model with several classifier heads: timm's distilled DeiT and EfficientFormer return a tuple from
    ``get_classifier()``, and a wrapper may hold several timm models. Adapters would train beside heads that stay
    frozen at their random init. ``headless_serves``: whether the caller takes a model without heads (adapters train
    without one; ``MultiTaskModel`` needs one), which the refusal of a distilled model then suggests."""
    owners = _classifier_owners(model)
    if len(owners) > 1:
        names = [name for name, module in model.named_modules() if any(module is owner for owner in owners)]
        raise ValueError(f"{type(model).__name__} holds {len(owners)} timm models with classifier heads "
                         f"({', '.join(names)}), and nola_vision trains one head: define get_classifier() on it to "
                         "return the head to train")
    heads = owners[0].get_classifier() if owners else None
    if isinstance(heads, (tuple, list)) and _has_head(heads):  # a headless one (num_classes=0) has identities
        names = [name for name, module in model.named_modules() if any(module is h for h in heads)]
        raise ValueError(f"{type(model).__name__} has {len(heads)} classifier heads ({', '.join(names)}: a distilled "
                         "model), and nola_vision trains one: use the model without distillation (e.g. "
                         "deit_base_patch16_224 for deit_base_distilled_patch16_224; LeViT: timm.create_model(name, "
                         f"distilled=False)){', or build it without heads (num_classes=0)' if headless_serves else ''}")
    others = _other_heads(owners[0], heads) if isinstance(heads, nn.Module) and _has_head(heads) else []
    if others:
        prefix = next(name for name, module in model.named_modules() if module is owners[0])
        names = [f"{prefix}.{name}" if prefix else name for name in others]
        raise ValueError(
            f"{type(model).__name__} has classifier layers beside the head get_classifier() returns: "
            f"{', '.join(names)} (timm lists them with it, and they feed the logits, e.g. VOLO's aux_head). "
            "nola_vision trains one head, so they would stay frozen at their random init (timm re-initialises them for "
            "a new class count). Create the model without them (timm's VOLO: use_aux_head=False)")


def _other_heads(owner: nn.Module, head: nn.Module) -> List[str]:
    """Names (within ``owner``) of classifier layers outside ``head``: those timm's pretrained config lists as its
    classifiers (VOLO's ``('head', 'aux_head')``), and ``Linear`` children named like a head with the head's class
    count (a model built without timm's factory has no config)."""
    config = getattr(owner, "pretrained_cfg", None)
    listed = config.get("classifier") if isinstance(config, dict) else getattr(config, "classifier", None)
    names = [listed] if isinstance(listed, str) else list(listed or ())
    classes = getattr(head, "out_features", None)
    names += [name for name, child in owner.named_children() if "head" in name and isinstance(child, nn.Linear)
              and classes is not None and child.out_features == classes]
    inside = {id(module) for module in head.modules()}
    found = []
    for name in dict.fromkeys(names):
        try:
            module = owner.get_submodule(name)
        except AttributeError:  # not built (use_aux_head=False leaves None), or named otherwise in this version
            continue
        if id(module) not in inside and _has_head(module):
            found.append(name)
    return found


def head_parameter_names(model: nn.Module) -> Tuple[str, ...]:
    """Full names of the classifier head's parameters (empty without a head)."""
    head = classifier_head(model)
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    return tuple(name for name, p in model.named_parameters() if id(p) in head_ids)


def trained_parameters(model: nn.Module, train_backbone: bool) -> Tuple[Dict[str, nn.Parameter],
                                                                         Dict[str, nn.Parameter]]:
    """(adapter tensors, head tensors) by full parameter name: what a method trains and an adapter file holds.

    With ``train_backbone`` (full fine-tuning) every parameter counts as "adapter" and the head part is empty.
    """
    if train_backbone:
        return dict(model.named_parameters()), {}
    adapter = {f"{layer_name}.{param_name}": param for layer_name, layer in adapted_layers(model).items()
               for param_name, param in layer.adapter_parameters().items()}
    parameters = dict(model.named_parameters())
    return adapter, {name: parameters[name] for name in head_parameter_names(model)}


def require_nothing_else_trained(model: nn.Module, saved: Dict[str, nn.Parameter], written: str) -> None:
    """Refuse to write ``written`` (an adapter file, a peft export) when a parameter that trains is not in ``saved``:
    its trained value would be lost, and what is written would load as another model."""
    extra = [name for name, p in model.named_parameters() if p.requires_grad and name not in saved]
    if extra:
        raise ValueError(
            f"{len(extra)} trainable parameter(s) are not part of {written}: {extra[:4]}"
            f"{' ...' if len(extra) > 4 else ''}. Their trained values would be lost and what is written would load "
            "with other outputs than this model. Freeze them (requires_grad_(False)) before training, or train them "
            "with the 'full' method and nv.save_adapter, which saves every weight"
        )


def _splits_into_q_k_v_blocks(attention: nn.Module) -> bool:
    """Whether an attention's forward reads its fused qkv output as q, k, v blocks (``reshape(B, N, 3, num_heads,
    ...)`` or ``chunk(3, dim=-1)``), the layout that slicing by thirds assumes; MaxViT's ``head_first`` and
    EfficientFormer lay it out head by head."""
    if getattr(attention, "head_first", False):
        return False
    try:
        source = inspect.getsource(type(attention).forward)
    except (OSError, TypeError):  # no source (a compiled or dynamically built class): the layout cannot be read
        return False
    blocks = (r"\b3,\s*(self\.)?(num_heads|heads|n_heads)\b",  # reshape(B, N, 3, heads, head_dim)
              r"\.chunk\(\s*3\s*,\s*dim\s*=\s*(-1|2)\s*\)")  # qkv(x).chunk(3, dim=-1): q | k | v
    return any(re.search(pattern, source) for pattern in blocks)


def _no_match_message(model: nn.Module, pattern: str, linears: List[str], head: Optional[nn.Module]) -> str:
    """Why a target matched nothing: the model's Linear layers to choose from, or that it has none to adapt."""
    kind = type(model).__name__
    if isinstance(model, nn.Linear):
        return (f"target {pattern!r}: the model is itself an nn.Linear, and inject replaces layers inside a model: "
                "wrap it (nn.Sequential(linear)) and target its name ('0'), or adapt the model that holds it")
    blocks = getattr(model, "blocks", None)
    if not linears and isinstance(blocks, nn.Module) and next(blocks.children(), None) is None:
        return (f"target {pattern!r}: {kind} has no blocks (built with depth 0?), so it has no layer to adapt: build "
                "it with at least one block, or train its head alone with 'linear'")
    if not linears:
        return (f"target {pattern!r}: {kind} has no nn.Linear layer outside its classifier head (its layers are "
                "convolutions or fused ops), so no adapter fits it; adapt a transformer (ViT, DeiT, Swin, ...) or "
                "train its head alone with 'linear'")
    head_names = [name for name, module in model.named_modules() if head is not None and module is head]
    is_head = bool(head_names) and any(_matches(name, pattern) for name in head_names)
    return (f"target {pattern!r} matches no nn.Linear of {kind}"
            f"{' outside its classifier head, which every method trains in full (never adapted)' if is_head else ''}. "
            f"{_regex_error(pattern)}{_suffix_regex_hint(pattern, linears)}"
            f"Its Linear layers are: {', '.join(_summarise_names(linears))} "
            "(targets are name suffixes or regexes; 'attn.q', 'attn.k', 'attn.v' select one third of a fused "
            "'attn.qkv')")


def _regex_error(pattern: str) -> str:
    """Why ``pattern`` is no regex (``mlp.fc[``), as a sentence, or an empty string: it then matched names only."""
    try:
        re.compile(pattern)
    except re.error as error:
        return f"It is no valid regex either ({error}), so it matched as an exact name or suffix only. "
    return ""


def _suffix_regex_hint(pattern: str, linears: List[str]) -> str:
    """For a regex written as a name suffix (``mlp.fc[12]``, ``attn.q|attn.v``): that a regex matches the whole dotted
    name, and a pattern that does, with what it selects as a target (the thirds of a fused qkv included)."""
    suggestion = rf".*\.(?:{pattern})" if "|" in pattern else rf".*\.{pattern}"
    try:
        re.compile(suggestion)
    except re.error:
        return ""
    found = []
    for name in linears:
        if _matches(name, suggestion):
            found.append(name)
        else:
            found += [virtual for virtual in _virtual_thirds(name).values() if _matches(virtual, suggestion)]
    if not found:
        return ""
    return f"A regex matches the whole dotted name: '{suggestion}' selects {', '.join(_summarise_names(found))}. "


def _virtual_thirds(name: str) -> Dict[str, str]:
    """The virtual names of a fused ``qkv`` layer's thirds (``blocks.0.attn.qkv`` → ``blocks.0.attn.q``, ...), which
    targets match as they match module names (so a regex alternation selects each of them alike); none for others."""
    if name != "qkv" and not name.endswith(".qkv"):
        return {}
    return {part: name[: -len("qkv")] + part for part in QKV_SLICES}


def _refuse_part_of_a_pair(pattern: str, targets: List[str], linears: Dict[str, nn.Linear]) -> None:
    """Raise where ``pattern`` names q, k or v of an attention that fuses it with one other (ConViT's ``qk``, the
    ``kv`` of Twins' and PVT's sub-sampled attention) and no target takes that fused layer: it cannot be sliced, and
    matching the other blocks only left those attentions without the update, with no word (``attn.v`` adapted
    ConViT's last two blocks of twelve)."""
    for name in linears:
        owner, _, fused = name.rpartition(".")
        if len(fused) != 2 or not set(fused) <= set(QKV_SLICES) or any(_matches(name, t) for t in targets):
            continue
        for part in fused:
            virtual = f"{owner}.{part}" if owner else part
            if _matches(virtual, pattern):
                raise ValueError(
                    f"target {pattern!r} names {part} of {owner or 'the model'}, where {part} lies inside the fused "
                    f"layer {name} ({' and '.join(fused)} together), which a target cannot split: that attention "
                    f"would be left without {part}'s update. Target the fused layer as well (add "
                    f"{'.'.join(name.split('.')[-2:])!r} to the targets), or layers every block has separately (e.g. "
                    "'mlp.fc1', 'mlp.fc2')")


def adaptable_linears(model: nn.Module) -> Dict[str, nn.Linear]:
    """Every ``nn.Linear`` a target can select, by module name: those outside the classifier head, below the model
    itself (inject replaces layers inside a model, never the model: an ``nn.Linear`` model is named "")."""
    head = classifier_head(model)
    head_modules = {id(m) for m in head.modules()} if head is not None else set()
    return {name: module for name, module in model.named_modules()
            if name and isinstance(module, nn.Linear) and id(module) not in head_modules}


def _refuse_read_by_weight(model: nn.Module, name: str, pattern: str) -> None:
    """Raise where the layer ``name`` is the ``out_proj`` of an ``nn.MultiheadAttention``, which reads its weight
    directly (``F.multi_head_attention_forward``) and never calls it: the adapter would never apply (found only at
    the first forward pass, as a layer never called)."""
    owner, _, attribute = name.rpartition(".")
    if attribute == "out_proj" and isinstance(model.get_submodule(owner), nn.MultiheadAttention):
        raise ValueError(f"target {pattern!r} selects {name}, the output projection of torch's nn.MultiheadAttention "
                         f"{owner}, which reads its weight directly and never calls the layer: an adapter there would "
                         "never apply. Target other Linear layers (timm's ViTs have their own attention, whose "
                         "'attn.qkv' and 'attn.proj' adapt)")


def _select(found: Dict[str, List[Slice]], chosen_by: Dict[Tuple[str, Slice], str], name: str, part: Slice,
            pattern: str, repeats: Optional[List[Tuple[str, str, str]]]) -> None:
    """Record that ``pattern`` selects ``part`` of layer ``name`` (once, however many targets select it); a part
    another target selected already is added to ``repeats`` as (that target, this one, the layer)."""
    other = chosen_by.setdefault((name, part), pattern)
    if other == pattern:
        found.setdefault(name, []).append(part)
    elif repeats is not None:
        repeats.append((other, pattern, name))


def find_targets(model: nn.Module, targets: List[str],
                 repeats: Optional[List[Tuple[str, str, str]]] = None) -> Dict[str, Tuple[Slice, ...]]:
    """Resolve target patterns to ``{linear module name: output slices}``; raise if any pattern matches nothing, or
    two select overlapping slices of a layer. A layer (or slice) two targets select is adapted once, and told in
    ``repeats`` (``plan_injection`` warns of it)."""
    head = classifier_head(model)
    linears = adaptable_linears(model)
    found: Dict[str, List[Slice]] = {}
    chosen_by: Dict[Tuple[str, Slice], str] = {}  # the pattern that selected each layer's slice first
    for pattern in targets:
        matched = False
        for name, module in linears.items():
            if _matches(name, pattern):
                _refuse_read_by_weight(model, name, pattern)
                _select(found, chosen_by, name, (0, module.out_features), pattern, repeats)
                matched = True
                continue
            thirds = [part for part, virtual in _virtual_thirds(name).items() if _matches(virtual, pattern)]
            if not thirds:
                continue
            if module.out_features % 3:
                raise ValueError(f"target {pattern!r}: {name} has {module.out_features} outputs, not a fused qkv")
            parent = model.get_submodule(name.rpartition(".")[0])
            heads, head_dim = getattr(parent, "num_heads", None), getattr(parent, "head_dim", None)
            if isinstance(heads, int) and isinstance(head_dim, int) and module.out_features == 2 * heads * head_dim:
                raise ValueError(
                    f"target {pattern!r}: {name} has {module.out_features} outputs, 2 x {heads} heads x {head_dim} of "
                    f"{type(parent).__name__}: k and v only (GCViT's global attention takes q from elsewhere), so "
                    "its thirds are not q, k and v. Target the fused layer ('attn.qkv') instead")
            if not _splits_into_q_k_v_blocks(parent):
                raise ValueError(
                    f"target {pattern!r}: cannot tell that {type(parent).__name__} splits the output of {name} "
                    "into q, k and v blocks (reshape(B, N, 3, num_heads, ...)); it may lay them out head by head, "
                    "so a third of it would mix q, k and v. Target the fused layer ('attn.qkv') instead")
            width = module.out_features // 3
            for part in thirds:
                start = QKV_SLICES[part] * width
                _select(found, chosen_by, name, (start, start + width), pattern, repeats)
            matched = True
        _refuse_part_of_a_pair(pattern, targets, linears)
        if not matched:
            raise ValueError(_no_match_message(model, pattern, list(linears), head))
    resolved = {}
    for name, slices in found.items():
        slices = sorted(set(slices))  # one pattern given twice selects each part twice
        for (_, end), (start, _) in zip(slices, slices[1:]):
            if start < end:
                raise ValueError(f"targets overlap on {name}: output slices {slices}; pick either the fused layer "
                                 "or its slices")
        resolved[name] = tuple(slices)
    return resolved


def feature_wrapper_name(name: str) -> str:
    """``name`` as a timm ``features_only`` wrapper that flattens its first two parts names it (Swin's ``layers.0.x``
    is ``layers_0.x``); ``name`` itself where its second part is not an index."""
    parts = name.split(".")
    return ".".join([f"{parts[0]}_{parts[1]}", *parts[2:]]) if len(parts) > 2 and parts[1].isdigit() else name


def image_channels(model: nn.Module) -> Optional[int]:
    """The channels of the images ``model`` reads: its patch embedding's first convolution's input (a hybrid ViT's
    stem, not its ``proj``, which reads the CNN's features), or None for a model without one."""
    embed = getattr(model, "patch_embed", None)
    for module in embed.modules() if isinstance(embed, nn.Module) else ():
        if isinstance(module, nn.modules.conv._ConvNd):
            return module.in_channels
    return None
