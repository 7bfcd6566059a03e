"""Put adapters into any model by module name, and take them out again: ``unload`` is the inverse of ``inject``.

``inject`` applies an injection plan (``plan.py``) and remembers what it changed: each adapted layer keeps the
module it replaced (``base_layer``) and the activation it took over, the adapter state keeps the hook handles and
every parameter's ``requires_grad`` flag. One routine, ``replace_module``, swaps modules in both directions, so
``unload`` gives back the original module objects and flags, and ``merge_and_unload`` folds into them.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .basis import BasisBank
from .checks import check_bool
from .config import AdapterConfig
from .fingerprint import (
    RUNNING_STATISTICS,
    frozen_buffers,
    merge_probes,
    merges_held,
    record_merged,
    running_statistics,
    unmerged_probes,
)
from .interrupts import all_or_nothing, interrupts_deferred
from .layer import HOOK_KINDS, STATE_ATTRIBUTE, AdaptedLinear, adapted_layers, has_hooks
from .merge import (
    checkpointed_models,
    combine_shared_factors,
    has_shared_bases,
    holding_switch_lock,
    merge,
    reentrant_checkpointing_inputs,
    reentrant_checkpointing_output,
    release_shared_factors,
    require_own_merged_flags,
    require_stored_weights,
    unmerge,
)
from .plan import InjectionPlan, plan_injection
from .quantize import QAT_BITS, fake_quantize, head_bits, require_bits, seen_alike
from .registry import method_of
from .targets import classifier_head, require_module, require_not_data_parallel, unwrap_model
from .warn import warn_user

__all__ = ["NOLA_SUFFIX", "AdapterState", "MovedActivation", "adapter_state", "inject", "merge_and_unload",
           "name_architecture", "nola_base_name", "quantization_aware_bits", "refuse_wrapped_adapters",
           "replace_module", "require_head_at_trained_bits", "require_unchanged_statistics", "set_basis_holding",
           "set_quantization_aware", "unload", "unwrap_model"]


@dataclass
class AdapterState:
    """What ``inject`` attached to a model: its plan, the shared basis bank, and what undoing it restores."""

    plan: InjectionPlan
    bank: Optional[BasisBank] = None
    # requires_grad of every parameter before inject, by name (names do not change: adapted layers keep them).
    requires_grad: Dict[str, bool] = field(default_factory=dict)
    hooks: List[RemovableHandle] = field(default_factory=list)
    # Quantisation-aware training's bits (``set_quantization_aware``), and the forward hooks that show the head's
    # layers at their stored width meanwhile (None in models pickled before a head could have several).
    quant_bits: Optional[int] = None
    quantized_head: Optional[List[Union[RemovableHandle, _StoredBitsForward]]] = None
    # Copies of the running statistics of every batch norm at inject, by buffer name: adapter files do not store
    # them, so saving refuses a model whose statistics training changed (see ``running_statistics``).
    statistics: Dict[str, Tensor] = field(default_factory=dict)
    # Copies of the other floating-point buffers a state dict holds, by name (``frozen_buffers``), for the same check.
    buffers: Dict[str, Tensor] = field(default_factory=dict)
    # The folder ``load_adapter`` last applied and its class names (None where it records none): a save without
    # ``class_names`` says they are not carried over, as the model's tensors may hold another task since.
    loaded_class_names: Optional[Tuple[str, List[str]]] = None

    @property
    def config(self) -> AdapterConfig:
        return self.plan.config

    @property
    def method(self) -> str:
        return self.config.method

    def config_dict(self) -> Union[str, dict]:
        """The config as adapter files store it: a plain method's name, or the config's ``to_dict()``."""
        return self.config.serialize()

    def __getstate__(self) -> dict:
        # A handle on a module since replaced (the head ``reset_classifier`` swapped out) refers to hooks that are
        # gone: removing it does nothing, and unpickling it fails, so copies and saved models leave it out.
        state = dict(self.__dict__)
        state["hooks"] = [handle for handle in self.hooks if _is_live(handle)]
        if self.quantized_head is not None:
            state["quantized_head"] = [hook for hook in self.quantized_head
                                       if not isinstance(hook, RemovableHandle) or _is_live(hook)]
        return state


def _is_live(handle: RemovableHandle) -> bool:
    """Whether the hooks dict ``handle`` removes from still exists."""
    return handle.hooks_dict_ref() is not None


def adapter_state(model: nn.Module) -> Optional[AdapterState]:
    """The ``AdapterState`` that ``inject`` attached, or None for a plain model."""
    return getattr(model, STATE_ATTRIBUTE, None)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at the dotted module path ``name`` of ``model``; returns the module it replaced."""
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child_name)
    setattr(parent, child_name, new)
    return old


def _recomputable_activation(parent: nn.Module, child_name: str) -> Optional[nn.Module]:
    """The activation of a timm-style Mlp whose fc2 may recompute its input (nothing between act and fc2).

    Only a pure function is taken over: an activation with hooks (backward's recomputation would skip them), with
    parameters or buffers (their state-dict keys would move under fc2) or in place (it would overwrite the kept
    pre-activation) stays where it is.
    """
    from timm.layers import Mlp

    if child_name != "fc2" or type(parent).forward is not Mlp.forward:
        return None
    activation = parent.act
    pure = (not has_hooks(activation) and not getattr(activation, "inplace", False)
            and next(activation.parameters(), None) is None and next(activation.buffers(), None) is None)
    return activation if pure and _between_is_identity(parent, training=True) else None


def _between_is_identity(mlp: nn.Module, *, training: bool) -> bool:
    """Whether ``mlp.drop1`` and ``mlp.norm`` (between the activation and fc2) pass their input through unchanged:
    no norm, and a dropout that is off (p = 0) or, unless ``training``, in eval mode. A few attribute reads."""
    drop = mlp.drop1
    no_dropout = (isinstance(drop, nn.Identity) or getattr(drop, "p", 1.0) == 0.0
                  or (not training and isinstance(drop, nn.modules.dropout._DropoutNd) and not drop.training))
    return no_dropout and isinstance(mlp.norm, nn.Identity)


class MovedActivation(nn.Identity):
    """What stays at ``mlp.act`` while the adapted ``mlp.fc2`` computes the activation itself: it passes the
    pre-activation through, so a hook registered here after ``inject`` sees that (a warning says so); hooks on the
    activation itself (``fc2.input_activation``) run on its output, and a hook on ``fc2`` gives the activation back.

    Each pass checks that ``mlp.drop1`` and ``mlp.norm`` still change nothing (inject checked them): a dropout turned
    on or a norm put there afterwards would run on the pre-activation, before fc2 activates it; and that ``mlp.fc2``
    still computes the activation (a layer put there after inject would skip it)."""

    def __init__(self, mlp: Optional[nn.Module] = None, name: str = "mlp") -> None:
        super().__init__()
        self.__dict__["mlp"] = mlp  # the Mlp whose act this stands in for, outside the module tree
        self.mlp_name = name
        # The activation itself, outside the module tree: unload puts it back even where the adapted fc2 that
        # computes it was replaced since, and nothing else holds it.
        self.__dict__["activation"] = mlp.act if mlp is not None else None

    def forward(self, x: Tensor) -> Tensor:
        mlp = getattr(self, "mlp", None)
        if mlp is not None and not _between_is_identity(mlp, training=False):
            _refuse_changed_mlp(mlp, self.mlp_name)
        if mlp is not None and getattr(mlp.fc2, "input_activation", None) is None:
            _refuse_replaced_fc2(mlp, self.mlp_name)
        if torch.compiler.is_compiling():
            return x
        if has_hooks(self):
            warn_user(
                "a hook on mlp.act, whose activation the adapted mlp.fc2 computes (recompute_activation=True), sees "
                "the pre-activation, and an output it returns would be activated after it. Hook "
                "mlp.fc2.input_activation, register it before inject (the activation then stays in place), or inject "
                "with recompute_activation=False", UserWarning)
        elif _global_module_hooks():
            warn_user(
                "a global module hook (torch.nn.modules.module.register_module_forward_hook and the like) sees "
                "mlp.act's output and mlp.fc2's input as the pre-activation: the adapted mlp.fc2 computes the "
                "activation (recompute_activation=True). Register the hook on the modules themselves (a hook on an "
                "adapted fc2 gets its real input), or inject with recompute_activation=False", UserWarning)
        return x


def _refuse_changed_mlp(mlp: nn.Module, name: str) -> None:
    """Raise for an Mlp whose drop1 or norm changed since inject took its activation over (``_between_is_identity``)."""
    if not isinstance(mlp.norm, nn.Identity):
        changed, wrong = f"{name}.norm is now a {type(mlp.norm).__name__}", "act(norm(h)) instead of norm(act(h))"
    else:
        changed = f"{name}.drop1 now drops (a {type(mlp.drop1).__name__} with p={getattr(mlp.drop1, 'p', '?')})"
        wrong = "act(dropout(h)) instead of dropout(act(h))"
    raise ValueError(
        f"{changed}, set after inject, but its adapted {name}.fc2 computes {name}.act itself "
        f"(recompute_activation=True), so this pass would compute {wrong}. nv.unload(model) and inject again with "
        "recompute_activation=False, or set the dropout or norm before inject "
        "(inject then keeps the activation in place)")


def _refuse_replaced_fc2(mlp: nn.Module, name: str) -> None:
    """Raise for an ``mlp.fc2`` replaced after inject took its activation over: the new layer would get the
    pre-activation, and the activation would be skipped."""
    raise ValueError(
        f"{name}.fc2 was replaced after inject (it is now a {type(mlp.fc2).__name__}), but the adapted fc2 it replaced "
        f"computed {name}.act itself (recompute_activation=True): {name}.act is a pass-through now, so this pass "
        f"would skip the activation. Call nv.unload(model) before replacing layers (it puts {name}.act back), then "
        "inject again")


def _global_module_hooks() -> bool:
    """Whether hooks registered for every module (``register_module_forward_hook`` and the like) exist."""
    module = torch.nn.modules.module
    return any(getattr(module, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                         "_global_backward_hooks", "_global_backward_pre_hooks"))


def inject(model: nn.Module, config: Union[AdapterConfig, str, Dict[str, Any], InjectionPlan]) -> nn.Module:
    """Add adapters in place; freeze everything but the adapters and the classifier head.

    ``config`` is a registered method's config (``NOLAConfig``, ``LoRAConfig``, …), a method's name (``"nola"``,
    ``"lora"``: their default configs; ``"linear"``: train the head only; ``"full"``: train everything), a config's
    ``to_dict()`` form (as ``create_model`` takes it), or a plan from ``plan_injection(model, config)``. Nothing is
    changed when the config or a target is invalid. ``unload`` undoes it exactly. A ``torch.compile`` wrapper is
    adapted through the module it runs (the names of its layers and files are that module's) and returned. The head is
    what timm's ``get_classifier()`` returns, on the model or the outermost submodule that has it: a wrapper module
    with a head of its own defines ``get_classifier()`` to have it trained.
    """
    require_module(model, "inject")
    require_not_data_parallel(model)
    wrapper, model = model, unwrap_model(model)
    _require_not_injected(model)
    if isinstance(config, InjectionPlan):
        config.require_planned_config()
        config.require_fits(model)
        # its own copy of the config, as plan_injection makes one: a change to the plan's after inject would be
        # recorded by files while the layers compute with the values they were made with
        plan = dataclasses.replace(config, config=copy.deepcopy(config.config))
    else:
        plan = plan_injection(model, config)  # validates before anything changes
    config = plan.config
    _warn_about_hooks(model, list(plan.layers))
    layer_cls = method_of(config).layer_cls
    head = classifier_head(model)
    _require_trainable(model, head, config.train_backbone)
    context = layer_cls.injection_context(config) if layer_cls is not None else {}
    built: Dict[str, AdaptedLinear] = {}  # every layer built before the model changes: a failure leaves it as it was
    for name, layer in plan.layers.items():
        base = model.get_submodule(name)
        # in the base layer's train/eval mode, so that unload gives it back in the mode it had; never inference
        # tensors (an inject or first load_adapter under torch.inference_mode), which autograd silently leaves out
        with torch.inference_mode(False):
            built[name] = layer_cls(base, config, name, layer.slices, **context).train(base.training)
            _require_declared_tensors(name, built[name], layer.tensor_shapes)
            built[name].follow_float64_weight()
            built[name].note_injected_identity()
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    hooks: List[RemovableHandle] = []
    with all_or_nothing("nv.inject") as undo:  # the model wholly adapted, or (an error, Ctrl-C part-way) as it was
        undo.append(functools.partial(_undo_injection, model, built, hooks, requires_grad))
        model.requires_grad_(config.train_backbone)
        if head is not None:
            head.requires_grad_(True)
        elif not config.train_backbone:
            _warn_about_frozen_wrapper_layers(model, list(plan.layers))
        for name, adapted in built.items():
            parent_name, _, child_name = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if config.recompute_activation and _recomputable_activation(parent, child_name) is not None:
                # recomputed from the pre-activation in backward
                adapted.take_activation(parent, MovedActivation(parent, parent_name))
            replace_module(model, name, adapted)
        for module in checkpointed_models(model) if plan.layers else []:
            hooks.append(module.register_forward_pre_hook(reentrant_checkpointing_inputs, with_kwargs=True))
            for child in _frozen_children(module):
                hooks.append(child.register_forward_hook(functools.partial(reentrant_checkpointing_output, module)))
        if head is not None:
            hooks.append(head.register_forward_pre_hook(_compact_input))
        if has_shared_bases(model):
            hooks.append(model.register_forward_pre_hook(combine_shared_factors))
            hooks.append(model.register_forward_hook(release_shared_factors, always_call=True))
        _require_adapters_called(model, list(plan.layers), into=hooks)
        _disable_fast_paths(model, list(plan.layers), into=hooks)
        if plan.layers:
            keys = [f"{name}.{parameter}" for name, layer in adapted_layers(model).items()
                    for parameter in layer.adapter_parameter_names]
            hooks.append(model.register_load_state_dict_post_hook(_PlainStateDicts(keys)))
        hooks.append(model._register_load_state_dict_pre_hook(_check_bits, with_module=True))
        state = AdapterState(plan, context.get("bank"), requires_grad, hooks)
        state.statistics = {name: value.detach().clone() for name, value in running_statistics(model).items()}
        state.buffers = {name: value.detach().clone() for name, value in frozen_buffers(model).items()}
        setattr(model, STATE_ATTRIBUTE, state)
    return wrapper


def _undo_injection(model: nn.Module, built: Dict[str, AdaptedLinear], hooks: List[RemovableHandle],
                    requires_grad: Dict[str, bool]) -> None:
    """Undo an ``inject`` stopped part-way: its hooks removed, the layers it replaced (and activations it took over)
    given back, the ``requires_grad`` flags restored."""
    for handle in hooks:
        handle.remove()
    for name, adapted in built.items():
        if model.get_submodule(name) is adapted:
            _give_back(model, name, adapted)
        else:  # not put in place: only its activation may have been taken over
            adapted.give_back_activation()
    _restore_requires_grad(model, requires_grad)


def _require_trainable(model: nn.Module, head: Optional[nn.Module], train_backbone: bool) -> None:
    """Refuse, before anything changes, parameters that are to train but are inference tensors (the model was built
    under ``torch.inference_mode``): torch refuses their ``requires_grad`` outside it, halfway through inject."""
    if torch.is_inference_mode_enabled():
        return
    trained = {id(p) for p in (model if train_backbone else head or nn.Module()).parameters()}
    frozen = next((name for name, p in model.named_parameters() if id(p) in trained and p.is_inference()), None)
    if frozen is not None:
        raise ValueError(f"nv.inject: parameter {frozen} is an inference tensor (the model was built or loaded under "
                         "torch.inference_mode), which torch never lets train: build the model outside "
                         "inference_mode, or inject inside it to serve only")


def _warn_about_frozen_wrapper_layers(model: nn.Module, adapted: List[str]) -> None:
    """Warn of the ``nn.Linear`` layers a wrapper module holds outside its timm models when no head was found: inject
    freezes them at their initial values, and a wrapper's own classifier (``self.fc`` after a headless timm model)
    would then never train, without a word."""
    inside = [name for name, module in model.named_modules() if callable(getattr(module, "get_classifier", None))]
    if "" in inside or hasattr(model, "feature_info"):  # a timm model: no head (num_classes=0, features_only)
        return
    frozen = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)
              and name not in adapted and not any(name.startswith(f"{owner}.") for owner in inside)]
    if frozen:
        warn_user(f"{type(model).__name__} has no classifier head by timm's get_classifier() contract, so inject "
                  f"froze its own nn.Linear layer(s) outside the timm model at their initial values: "
                  f"{', '.join(frozen[:5])}{', ...' if len(frozen) > 5 else ''}. If one is the classifier, give "
                  f"{type(model).__name__} a get_classifier() method that returns it (then it trains), and inject "
                  "again into a fresh model (or nv.unload(model) first)")


def _frozen_children(model: nn.Module) -> List[nn.Module]:
    """The children of ``model`` that neither train nor hold an adapter (a ViT's stem, its dropouts and norms)."""
    return [child for child in model.children()
            if not any(p.requires_grad for p in child.parameters())
            and not any(isinstance(m, AdaptedLinear) for m in child.modules())]


def _require_not_injected(model: nn.Module) -> None:
    """Refuse a model that has adapters, or holds a submodule that has (a wrapper of an injected model): a second
    injection would freeze the first one's adapters, and neither unload nor adapter files handle both."""
    for name, module in model.named_modules():
        state = adapter_state(module)
        if state is not None and not name:
            raise ValueError(f"model already has {state.method!r} adapters; inject into a fresh model (or "
                             "nv.unload(model) first)")
        if state is not None:
            raise ValueError(f"submodule {name} of the {type(model).__name__} already has {state.method!r} adapters, "
                             f"which this injection would freeze: nv.unload(model.{name}) first, or inject into "
                             f"model.{name} itself")


def _require_declared_tensors(name: str, layer: AdaptedLinear, shapes: Dict[str, Tuple[int, ...]]) -> None:
    """Refuse a layer whose parameters are not those its class declares: each of ``adapter_parameter_names`` created,
    at the shape ``parameter_shapes`` gives (``shapes``), and no other of its own (files store, counts count and loads
    fill only those), naming the class member to fix."""
    cls = type(layer).__name__
    own = {key: p for key, p in layer.named_parameters() if key not in ("weight", "bias")
           and not key.startswith("input_activation.")}
    declared = layer.adapter_parameter_names
    if set(shapes) != set(declared):
        raise TypeError(f"{cls}.parameter_shapes gives {sorted(shapes)}, and {cls}.adapter_parameter_names lists "
                        f"{sorted(declared)}: they name the same trained tensors")
    for key in declared:
        tensor = own.get(key)
        if not isinstance(tensor, nn.Parameter):
            raise TypeError(f"{cls}.adapter_parameter_names lists {key}, which the layer on {name} does not create as "
                            "an nn.Parameter of its own")
        if tuple(tensor.shape) != tuple(shapes[key]):
            raise TypeError(f"{cls} created {key} of shape {tuple(tensor.shape)} on {name}, where "
                            f"{cls}.parameter_shapes gives {tuple(shapes[key])}")
    undeclared = sorted(set(own) - set(declared))
    if undeclared:
        raise TypeError(f"{cls} on {name} creates parameter(s) {', '.join(undeclared)} that "
                        f"{cls}.adapter_parameter_names does not list: list the trained ones there (files store, "
                        "counts count and loads fill only those), and keep what is regenerated from the config as a "
                        "buffer registered with persistent=False")


def require_unchanged_statistics(model: nn.Module) -> None:
    """Refuse to save or export a model whose running statistics differ from those at inject (a forward pass in train
    mode updates them) or whose norm stopped keeping them, or whose other buffers (``frozen_buffers``) changed: files
    and exports hold no buffers, so the adapter would load onto the base model's and give other outputs, whatever the
    method. A dtype round trip passes."""
    model = unwrap_model(model)
    state = adapter_state(model)
    changed_buffers = _changed(getattr(state, "buffers", None) or {}, frozen_buffers(model))  # none pickled before
    if changed_buffers:
        raise ValueError(
            f"the buffer {changed_buffers[0]} changed since inject ({len(changed_buffers)} buffer(s) changed), and "
            "adapter files and exports hold no buffers: the adapter would load onto the base model's and give other "
            "outputs than this model. Set buffers before nv.inject, or nv.unload the model, set them and inject "
            "again, then train again")
    changed = _changed(state.statistics if state is not None else {}, running_statistics(model))
    spectral = [name for name in changed if name.rpartition(".")[2] not in RUNNING_STATISTICS]
    if spectral:
        raise ValueError(
            f"the power-iteration vectors of a spectral norm changed since inject ({spectral[0]}: a forward pass in "
            "train mode updates them, and they set the norm its weight is divided by), and adapter files and exports "
            "hold no buffers: the adapter would load with other outputs than this model. Train with that module in "
            "eval mode (its parametrization's, or the owning layer's for torch.nn.utils.spectral_norm), or remove "
            "the spectral norm before inject")
    if changed:
        layers = list(dict.fromkeys(name.rpartition(".")[0] for name in changed))
        raise ValueError(
            f"the running statistics of {len(layers)} norm layer(s) changed since inject (first: {layers[0]}), and "
            "adapter files and exports hold no buffers: the adapter would load onto the base model's statistics and "
            "give other outputs than this model. Train with those layers in eval mode, as FewShotClassifier does "
            "(after model.train(): for m in model.modules(): if isinstance(m, torch.nn.modules.batchnorm._NormBase): "
            "m.eval()), or nv.unload the model and inject again into one with the base model's statistics (e.g. a "
            "fresh timm.create_model), then train again")


def _changed(saved: Dict[str, Tensor], current: Dict[str, Tensor]) -> List[str]:
    """The names of the ``saved`` copies that ``current`` lacks or holds other values for (``_close``)."""
    return [name for name, kept in saved.items() if name not in current or not _close(current[name], kept)]


def _close(current: Tensor, saved: Tensor) -> bool:
    """Equal up to a bf16 round trip (a model cast to another dtype and back keeps its statistics), NaN to NaN; of
    another shape, not."""
    return current.shape == saved.shape and torch.allclose(current.float(), saved.to(current.device).float(),
                                                           rtol=4e-3, atol=1e-6, equal_nan=True)


def _compact_input(module: nn.Module, args: tuple) -> Optional[tuple]:
    """Forward pre-hook on the classifier head: hand it pooled features as a compact tensor. Class-token pooling
    gives a (batch, features) view into the whole final token map, and the trained head keeps its input for its
    weight gradient: that view would keep every token's features alive until backward reaches the head, which a
    compiled backward does last. Inputs of other ranks (a convnet head's channels-last maps) are left as they are."""
    if args and isinstance(args[0], Tensor) and args[0].dim() == 2 and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


class _PlainStateDicts:
    """Load-state-dict post-hook: a plain model's state dict (pretrained weights, timm's ``checkpoint_path``) loads
    into the injected model strictly; when it holds none of the adapter tensors, they keep their values instead of
    being reported missing (unless inject made them on the meta device: they have none to keep). A state dict holding
    some of them must hold all. Adapter tensors loaded without their
    layers' identity entries (``_extra_state``: a dict of the trainable tensors only, or one saved before it existed)
    load with a warning, since nothing checked that they belong to this adapter config. (A class, so the model still
    pickles.)"""

    def __init__(self, adapter_keys: List[str]) -> None:
        self.adapter_keys = adapter_keys

    def __call__(self, module: nn.Module, incompatible) -> None:
        # names as loaded: with a prefix when loaded through a wrapper (torch.compile's _orig_mod.)
        missing = [key for key in incompatible.missing_keys
                   if any(key == k or key.endswith("." + k) for k in self.adapter_keys)]
        # layers made on the meta device have no values to keep: their tensors stay reported missing
        unset = any(layer.values_unset for layer in adapted_layers(module).values())
        if len(missing) == len(self.adapter_keys) and not unset:
            for key in missing:
                incompatible.missing_keys.remove(key)
        unchecked = [name for name, layer in adapted_layers(module).items() if layer.unchecked_load]
        unflagged = any(layer.unflagged_load for layer in adapted_layers(module).values())
        for layer in adapted_layers(module).values():
            layer.unchecked_load = layer.unflagged_load = False
        if unchecked:
            merged = (" It also holds their weights without the 'adapter_merged' flag, so they were taken as unmerged: "
                      "a merged model's state dict of the earliest builds, which wrote no flag, gives ΔW twice (load "
                      "it into a plain model, or unmerge it with the build that wrote it)." if unflagged else "")
            warn_user(
                f"nola_vision: the state dict gave {len(unchecked)} adapted layer(s) (e.g. {unchecked[0]}) their "
                "adapter tensors without their identity entries ('_extra_state'), so nothing checked that they were "
                "trained with this model's adapter config (method, rank, scaling, seed, bases): another config's "
                "tensors load without error and give wrong outputs. Keep the '_extra_state' entries "
                "(model.state_dict() holds them), or save and load adapters with nv.save_adapter and nv.load_adapter."
                + merged)


class _CallCheck:
    """Checks that every adapted layer is called when its parent module runs: some attentions read
    ``self.qkv.weight`` with ``F.linear`` instead of calling the layer (timm's EVA and BEiT with a qkv bias, Swin
    V2), so an adapter there would silently change nothing but the merged weights. Each parent's first completed
    forward pass is checked (through ``model()``, ``forward_features`` or any other path), and once every parent
    has passed, its hooks are removed. Calls are recorded per thread (DataParallel's replicas run the same modules
    in several threads), and parents are known by name, so a deep copy or a pickled model keeps checking (a
    class, so the model still pickles).

    Compiled code records no calls, and a compiled model can run some modules compiled and others eagerly (a
    compiled submodule, a frame dynamo gave up on, a recompile limit): a parent whose pass ran any hook compiled
    (``unseen``) is not judged in that pass, rather than blame a layer whose call the check could not see; its next
    eager pass is (and so is a model's eager pass after ``torch.export`` traced it).
    """

    unseen = False  # also for checks pickled before it was kept

    def __init__(self, layers_by_parent: Dict[str, List[str]], parent_types: Dict[str, str]) -> None:
        self.pending = {parent: list(layers) for parent, layers in layers_by_parent.items()}
        self.parent_types = parent_types
        self.called: Dict[int, set] = {}  # by thread
        self.handles: List[RemovableHandle] = []  # removed once every parent passed
        self.unseen = False  # a hook ran compiled since the last parent's eager pass began

    def __getstate__(self) -> dict:
        # Handles on a module since replaced or cut off (``model.blocks = model.blocks[:6]``) refer to hooks that are
        # gone: unpickling one fails, so copies and saved models leave them out (as ``AdapterState`` does).
        return {**self.__dict__, "handles": [handle for handle in self.handles if _is_live(handle)]}

    def _compiling(self) -> bool:
        """Whether this hook runs compiled (or traced), marking the pass ``unseen`` (dynamo replays the assignment
        when the compiled code runs; it only writes, so no guard depends on it)."""
        if torch.compiler.is_compiling():
            self.unseen = True
            return True
        return False

    def parent_starts(self, parent: str, module: nn.Module, args: tuple) -> None:
        layers = self.pending.get(parent)
        if layers is not None and not self._compiling():
            self.unseen = False
            self.called.setdefault(threading.get_ident(), set()).difference_update(layers)

    def layer_called(self, name: str, module: nn.Module, args: tuple, output: Tensor) -> None:
        if self.pending and not self._compiling():
            self.called.setdefault(threading.get_ident(), set()).add(name)

    def parent_ends(self, parent: str, module: nn.Module, args: tuple, output: object) -> None:
        layers = self.pending.get(parent)
        if layers is None or self._compiling() or self.unseen:
            return
        called = self.called.get(threading.get_ident(), set())
        skipped = [name for name in layers if name not in called]
        if skipped:
            kind = self.parent_types[parent]
            raise ValueError(
                f"adapted layer {skipped[0]} was never called although its parent {kind} ran"
                f"{f' ({len(skipped)} such layers)' if len(skipped) > 1 else ''}: {kind}.forward reads the layer's "
                "weight directly (e.g. F.linear(x, self.qkv.weight, bias)), so an adapter there changes nothing. "
                "Target other layers of this model (e.g. mlp.fc1, mlp.fc2, attn.proj): nv.unload(model), then "
                "inject again")
        self.pending.pop(parent, None)
        if not self.pending:
            self.called.clear()
            for handle in self.handles:
                handle.remove()


def _require_adapters_called(model: nn.Module, names: List[str], into: List[RemovableHandle]) -> None:
    """Install a ``_CallCheck``: a pre-hook and a hook on each adapted layer's parent, a hook on each layer (each
    handle appended to ``into`` as it is registered)."""
    if not names:
        return
    layers_by_parent: Dict[str, List[str]] = {}
    for name in names:
        layers_by_parent.setdefault(name.rpartition(".")[0], []).append(name)
    parents = {parent: model.get_submodule(parent) for parent in layers_by_parent}
    check = _CallCheck(layers_by_parent, {parent: type(module).__name__ for parent, module in parents.items()})
    check.handles = []
    registrations = [functools.partial(register, functools.partial(hook, parent))
                     for parent, module in parents.items()
                     for register, hook in ((module.register_forward_pre_hook, check.parent_starts),
                                            (module.register_forward_hook, check.parent_ends))]
    # nn.Module's own registration: this hook reads no input, so the layer keeps computing its activation
    # (AdaptedLinear's gives it back, for hooks that read the input).
    registrations += [functools.partial(nn.Module.register_forward_hook, model.get_submodule(name),
                                        functools.partial(check.layer_called, name)) for name in names]
    for register in registrations:
        handle = register()
        check.handles.append(handle)
        into.append(handle)


# Modules whose inference fast path reads their children's weights directly (``torch._transformer_encoder_layer_fwd``)
# unless a child has forward hooks: an adapter inside one would be skipped without a word.
_FAST_PATH_MODULES = (nn.TransformerEncoderLayer,)


def _disable_fast_paths(model: nn.Module, names: List[str], into: List[RemovableHandle]) -> None:
    """A no-op forward pre-hook on each adapted layer inside a ``_FAST_PATH_MODULES`` module, kept while the adapter
    is: the module then always runs its layers, as its own check for hooks decides (handles appended to ``into``)."""
    for name in names:
        parts = name.split(".")
        ancestors = [model.get_submodule(".".join(parts[:depth])) for depth in range(len(parts))]
        if any(isinstance(module, _FAST_PATH_MODULES) for module in ancestors):
            into.append(model.get_submodule(name).register_forward_pre_hook(_run_the_layer))


def _run_the_layer(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook that changes nothing: its presence keeps a fast path from bypassing the layer."""


@holding_switch_lock
def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without keeping its update: the original modules, weights and ``requires_grad`` flags.

    A merged model is unmerged first (float32 and float64 weights then come back within one rounding step per merge of
    other values, 16-bit ones bit for bit: see ``AdaptedLinear.unmerge``). Returns the model (changed in place). The
    classifier head is trained in place, never replaced, so it keeps its trained values; ``"full"`` fine-tuning trains
    the weights themselves, in place: unloading it restores the flags and hooks, and the model keeps its trained
    weights.
    """
    require_module(model, "unload")
    require_not_data_parallel(model, removing=True)
    wrapper, model = model, unwrap_model(model)
    state = _require_own_adapter_state(model, "unload")
    require_own_merged_flags(model, "unload")  # before any layer changes
    require_stored_weights(adapted_layers(model), "unload", ("weight", "bias"))
    _warn_of_dropped_hooks(adapted_layers(model), {handle.id for handle in state.hooks})
    with interrupts_deferred():  # unmerged and removed together: unmerge's own hold let a Ctrl-C in between
        _remove_injection(unmerge(model), state, "unload")
    return wrapper


@holding_switch_lock
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter's update into its original module's weight, then remove the injection.

    The model records what was folded in (``fingerprint.merged_adapters``), so loading an adapter trained on
    the weights without it (the same one again, say) is refused instead of adding its update on top.
    """
    require_module(model, "merge_and_unload")
    require_not_data_parallel(model, removing=True)
    wrapper, model = model, unwrap_model(model)
    state = _require_own_adapter_state(model, "merge_and_unload")
    require_own_merged_flags(model, "merge_and_unload")  # before any layer changes
    require_head_at_trained_bits(model, "merge_and_unload")
    require_stored_weights(adapted_layers(model), "merge_and_unload", ("weight", "bias"))
    _warn_of_dropped_hooks(adapted_layers(model), {handle.id for handle in state.hooks})
    held = merges_held(model)  # earlier merges whose weights were loaded back over: not carried on
    unmerged = unmerged_probes(model, sorted(state.plan.layers))
    merge(model)
    probes = merge_probes(model, unmerged)  # so a later load of the base weights drops the record
    if state.quantized_head:  # the hooks that showed the head at its stored width go: fold that in
        head, bits = classifier_head(model), head_bits(quantization_aware_bits(model))
        with torch.no_grad():
            for parameter in head.parameters():
                parameter.copy_(fake_quantize(parameter, bits))
    with interrupts_deferred():  # removed and recorded together: a Ctrl-C between them lost what was folded in
        _remove_injection(model, state, "merge_and_unload")
        if state.plan.layers:
            folded = {"method": state.method, "config": state.config_dict(), "layers": sorted(state.plan.layers)}
            record_merged(model, folded, probes, held)
    return wrapper


def _warn_about_hooks(model: nn.Module, names: List[str]) -> None:
    """Warn that hooks on a layer ``inject`` replaces stop running: its adapted layer does not call it."""
    hooked = [name for name in names if has_hooks(model.get_submodule(name))]
    if hooked:
        warn_user(f"{', '.join(hooked[:3])}{', ...' if len(hooked) > 3 else ''} carry forward or backward hooks, "
                  "which do not run while the layer is adapted (inject replaces it; unload gives it back with its "
                  "hooks): register them on the adapted layer, model.get_submodule(name), after inject",
                  UserWarning)


def _require_own_adapter_state(model: nn.Module, action: str) -> AdapterState:
    """The model's adapter state; refused for a model without adapters of its own, naming an injected submodule."""
    state = adapter_state(model)
    if state is None:
        refuse_wrapped_adapters(model, f"call nv.{action}(model.get_submodule({{inner!r}}))")
        raise ValueError(f"nv.{action}: {type(model).__name__} has no nola_vision adapters (never injected, or already "
                         "unloaded); call nv.inject or nv.load_adapter first")
    try:
        state.plan.require_own_adapters(model)
    except ValueError as error:
        raise ValueError(f"nv.{action}: {error}") from None
    return state


def _remove_injection(model: nn.Module, state: AdapterState, action: str) -> nn.Module:
    """Give back the replaced modules and moved activations, remove the hooks, restore the flags and the state, with
    Ctrl-C held: an unload interrupted inside a layer's activation hand-back could be neither run again nor served.
    An error giving a layer back (a user's module hook) says what is left and that ``action`` run again finishes it:
    the layers given back already hold what the others still compute, so nothing reported the half-unloaded model."""
    with interrupts_deferred():
        layers = adapted_layers(model)
        for done, (name, layer) in enumerate(layers.items()):
            try:
                _give_back(model, name, layer)
            except Exception as error:
                raise RuntimeError(
                    f"nv.{action} failed giving back {name} ({type(error).__name__}: {error}) after {done} of "
                    f"{len(layers)} adapted layers were given back: the model is left partly unloaded. Remove the "
                    f"cause, then call nv.{action}(model) again to finish (it gives back the layers left)") from error
        for module in list(model.modules()):  # an adapted fc2 replaced after inject left its activation's placeholder
            placeholder = module._modules.get("act")
            if isinstance(placeholder, MovedActivation) and placeholder.__dict__.get("activation") is not None:
                module.act = placeholder.activation.train(placeholder.training)
        for handle in [*state.hooks, *_head_hooks(state)]:
            handle.remove()
        _restore_requires_grad(model, state.requires_grad)
        delattr(model, STATE_ATTRIBUTE)
        _name_base_architecture(model)
    return model


# The timm zoo registers each NOLA model as ``<base>_nola`` (``models.zoo``) and names that architecture in its
# pretrained config, so that timm's ``save_for_hf`` writes a folder that builds it again with its ``nola_*``
# arguments; its adapter files name the base (``adapters.files.architecture_name``).
NOLA_SUFFIX = "_nola"


def nola_base_name(architecture: object) -> Optional[str]:
    """``<base>`` of a timm zoo NOLA architecture name ``<base>_nola``; None for any other value."""
    if isinstance(architecture, str) and len(architecture) > len(NOLA_SUFFIX) and architecture.endswith(NOLA_SUFFIX):
        return architecture[: -len(NOLA_SUFFIX)]
    return None


def name_architecture(model: nn.Module, name: str) -> None:
    """Name ``name`` as the architecture in the model's pretrained config (a copy of it, under timm's ``default_cfg``
    alias too), which timm's ``save_for_hf`` writes into config.json; nothing where the model has no such config."""
    config = getattr(model, "pretrained_cfg", None)
    if not isinstance(config, dict):
        return
    named = {**config, "architecture": name}
    if getattr(model, "default_cfg", None) is config:  # timm's alias of the same dict
        model.default_cfg = named
    model.pretrained_cfg = named


def _name_base_architecture(model: nn.Module) -> None:
    """A ``<base>_nola`` model whose adapters were removed names ``<base>`` again, and timm's record of its
    arguments (``_model_args``, which ``save_for_hf`` writes) loses the ``nola_*`` ones: its folder rebuilt fresh
    adapters around the weights that were saved without them."""
    config = getattr(model, "pretrained_cfg", None)
    architecture = config.get("architecture") if isinstance(config, dict) else None
    base = nola_base_name(architecture)
    if base is None:
        return
    name_architecture(model, base)
    arguments = getattr(model, "_model_args", None)
    if isinstance(arguments, dict):
        model._model_args = {key: value for key, value in arguments.items() if not key.startswith("nola_")}


def _warn_of_dropped_hooks(layers: Dict[str, AdaptedLinear], own: Set[int]) -> None:
    """Warn of hooks registered on adapted layers (other than inject's ``own``) or on the activations' stand-ins:
    unload gives back the layers they adapted and the activations, so the hooks no longer run. Before anything
    changes: a warning turned into an error (``-W error``) stops unload there, not halfway."""
    hooked = [name for name, layer in layers.items()
              if any(key not in own for kind in HOOK_KINDS for key in getattr(layer, kind))]
    if hooked:
        warn_user(f"unload drops the hooks registered on {', '.join(hooked[:3])}{', ...' if len(hooked) > 3 else ''} "
                  "after inject: they were on the adapted layers, which unload replaces by the layers they adapted. "
                  "Register them again on model.get_submodule(name)", UserWarning)
    for mlp in filter(None, (layer.hooked_activation_stand_in() for layer in layers.values())):
        warn_user(f"unload drops the hooks registered on {mlp}.act after inject: they were on the stand-in for the "
                  "activation the adapted fc2 computed (recompute_activation=True), which unload replaces by the "
                  f"activation itself. Register them again on {mlp}.act", UserWarning)


def _give_back(model: nn.Module, name: str, layer: AdaptedLinear) -> None:
    """Put the module ``layer`` replaced back at ``name``, with its activation (if the layer took it over)."""
    layer.give_back_activation()
    base = layer.base_layer
    # The layer's live parameters: to("meta"), to_empty() and load_state_dict(assign=True) replace them.
    base.weight, base.bias = layer.weight, layer.bias
    replace_module(model, name, base.train(layer.training))


def _restore_requires_grad(model: nn.Module, flags: Dict[str, bool]) -> None:
    """Each parameter's ``requires_grad`` as ``flags`` recorded it before inject (a parameter it did not record
    keeps its own). An inference tensor (a cast made inside ``torch.inference_mode()``) takes it there, where alone
    torch lets it be set."""
    for name, parameter in model.named_parameters():
        with torch.inference_mode(parameter.is_inference()):
            parameter.requires_grad_(flags.get(name, parameter.requires_grad))


@holding_switch_lock
def set_quantization_aware(model: nn.Module, bits: Optional[int]) -> nn.Module:
    """Train against the values ``save_adapter(bits=bits)`` stores (straight-through estimator); ``None`` turns it off.

    The adapter tensors are seen at ``bits``; a linear classifier head at the width files keep it (8-bit codes).
    Refused on a merged model whose setting it would change: unmerge would subtract another update than was merged,
    and on a model without adapters, where it would change nothing and training would silently run in full precision.
    """
    require_module(model, "set_quantization_aware")
    bits = require_bits(bits, "quantisation-aware training bits", QAT_BITS, optional=True)
    wrapper, model = model, unwrap_model(model)
    state = adapter_state(model)
    if state is None:
        refuse_wrapped_adapters(model, "call set_quantization_aware(model.get_submodule({inner!r}), bits)")
    if state is None and bits is not None:
        raise ValueError(f"{type(model).__name__} has no nola_vision adapters to train quantisation-aware (never "
                         "injected, or unloaded); call nv.inject or nv.load_adapter first, then set_quantization_aware")
    if state is not None and bits is not None and state.config.train_backbone:
        raise ValueError(f"full fine-tuning trains every weight, which files keep at 16 or 32 bits only (per-tensor "
                         f"codes would change each weight more than training did): quantisation-aware training at "
                         f"{bits} bits would train a model no file reproduces. Train at full precision, or adapt "
                         "the model with NOLA or LoRA for integer codes")
    merged = [name for name, layer in adapted_layers(model).items() if layer.merged and layer.quant_bits != bits]
    if merged:
        raise ValueError(
            f"{merged[0]} is merged: its weight holds the update as seen at quantisation-aware bits "
            f"{adapted_layers(model)[merged[0]].quant_bits}, and unmerge (or a task switch) subtracts the update as "
            "the current setting sees it, so changing it now would leave another update in the frozen weight. Call "
            "nv.unmerge(model) first, then set_quantization_aware, then nv.merge(model) again")
    # every layer, the state and the head at the new bits, or (an error, Ctrl-C part-way) all at the old ones: a
    # model reporting 8 bits with layers at 4, or a head without its hooks, saved a file that gave other outputs
    with all_or_nothing("nv.set_quantization_aware") as undo:
        for layer in adapted_layers(model).values():
            undo.append(functools.partial(setattr, layer, "quant_bits", layer.quant_bits))
            layer.quant_bits = bits
        if state is not None:
            undo.append(functools.partial(_set_head_bits, model, state, state.quant_bits))
            _set_head_bits(model, state, bits)
    return wrapper


def _set_head_bits(model: nn.Module, state: AdapterState, bits: Optional[int]) -> None:
    """Record ``bits`` in ``state`` and show the classifier head at the width files keep it at those bits (its
    hooks replaced; none for ``None``)."""
    state.quant_bits = bits
    for handle in _head_hooks(state):
        handle.remove()
    state.quantized_head = None
    head = classifier_head(model)
    state.quantized_head = hooks = (_quantize_head(head, head_bits(bits)) if bits is not None and head is not None
                                    else None)
    if hooks is not None and not adapted_layers(model):  # a linear probe: no adapted layer records the bits
        hooks.append(model._register_state_dict_hook(functools.partial(_save_bits, bits)))


def refuse_wrapped_adapters(model: nn.Module, fix: str) -> None:
    """Refuse a model without adapters of its own that holds an injected submodule (injected, then wrapped): ``fix``
    (formatted with ``inner``, the submodule's name) says what to pass instead; and one whose adapted layers belong to
    an injection of a module that contains it, which holds their state."""
    inner = next((name for name, module in model.named_modules() if adapter_state(module) is not None), None)
    if inner is not None:
        raise ValueError(f"the model has no adapters itself, but its submodule {inner!r} does (injected before "
                         f"wrapping): {fix.format(inner=inner)}")
    layers = adapted_layers(model)
    if layers:
        raise ValueError(f"the model holds {len(layers)} adapted layer(s) ({next(iter(layers))}, ...) but no adapters "
                         "of its own: nv.inject was given a module that contains it, which holds their state (the "
                         "config, the random bases, the head). Call this on the module nv.inject was given")


def quantization_aware_bits(model: nn.Module) -> Optional[int]:
    """The bits ``set_quantization_aware`` set on the model (its adapters and head are seen at them), else None."""
    state = adapter_state(unwrap_model(model))
    if state is None:
        return None
    layer_bits = {layer.quant_bits for layer in adapted_layers(model).values()} - {None}
    return state.quant_bits or min(layer_bits, default=None)


def set_basis_holding(model: nn.Module, hold: Optional[bool]) -> nn.Module:
    """Whether the model holds its shared basis codes: ``None`` (default) everywhere but in a CPU training pass,
    ``True`` always (a CPU step skips regenerating them, ~1.5% of a ViT-B step, and holds them under its
    activations: +60 MiB for ViT-B), ``False`` never (every pass regenerates them, and held codes go now)."""
    hold = check_bool(hold, "set_basis_holding: hold", optional=True)  # a numpy bool too; "no" is refused
    wrapper, model = model, unwrap_model(model)  # DataParallel, DDP, torch.compile
    state = adapter_state(model)
    if state is None:
        refuse_wrapped_adapters(model, "call nv.set_basis_holding(model.get_submodule({inner!r}), hold)")
    if state is None or state.bank is None or not has_shared_bases(model):
        method = state.method if state is not None else None
        raise ValueError(f"the model has no shared basis codes to hold (adapters: {method!r}): only NOLA with "
                         "basis='shared' holds them")
    state.bank.keep = hold
    if hold is False:
        state.bank.release()
    return wrapper


def require_head_at_trained_bits(model: nn.Module, action: Optional[str] = None) -> None:
    """Raise where quantisation-aware training's head hooks are not on the model's classifier head: a head replaced
    since (``model.reset_classifier(n)``, the same ``n``) trains and runs at full precision, while files, peft exports
    and merges keep it at the stored width, so their outputs would differ from the model's (``action``: the call that
    refuses it, named first)."""
    state = adapter_state(model)
    head = classifier_head(model)
    if state is None or state.quant_bits is None or not state.quantized_head or head is None:
        return
    for module in head.modules():
        if type(module).forward is nn.Linear.forward:
            shown = any(isinstance(hook, functools.partial) and hook.func in (_quantized_linear, _quantized_head)
                        for hook in module._forward_hooks.values())
        elif any(parameter is not None for parameter in module._parameters.values()):
            shown = isinstance(module.__dict__.get("forward"), _StoredBitsForward)
        else:
            continue
        if not shown:
            raise ValueError(
                f"{f'nv.{action}: ' if action else ''}the classifier head was replaced after "
                f"nv.set_quantization_aware(model, {state.quant_bits}) (model.reset_classifier?): the new head trains "
                f"and runs at full precision, while files keep it at {head_bits(state.quant_bits)} bits, so their "
                f"outputs would differ from the model's. Call nv.set_quantization_aware(model, {state.quant_bits}) "
                "again after replacing the head, before training it")


def _head_hooks(state: AdapterState) -> List[Union[RemovableHandle, _StoredBitsForward]]:
    """The quantisation-aware head hooks (one handle in models pickled when the head had one hook)."""
    hooks = state.quantized_head
    return [] if hooks is None else [hooks] if isinstance(hooks, RemovableHandle) else list(hooks)


# The state-dict entry of a linear probe trained quantisation-aware (adapted layers record it in their identity).
QAT_BITS_KEY = "nola_quant_bits"


def _save_bits(bits: int, module: nn.Module, state_dict: Dict[str, Tensor], prefix: str, metadata: object) -> None:
    """State-dict hook of a model without adapted layers set quantisation-aware: its state dict records ``bits``."""
    state_dict[prefix + QAT_BITS_KEY] = torch.tensor(bits)


def _check_bits(model: nn.Module, state_dict: Dict[str, Tensor], prefix: str, metadata: object, strict: bool,
                missing: List[str], unexpected: List[str], errors: List[str]) -> None:
    """Load pre-hook of an injected model: refuse, before anything loads, a state dict that an adapted layer refuses
    (``AdaptedLinear.load_refusal``: another update, other bits) or, in a model without adapted layers, one of other
    quantisation-aware bits (or of none; a linear probe's loaded at other bits gave other outputs without a word).
    Added to torch's errors instead, a refusal came after every other module had loaded: the head took the refused
    state dict's values."""
    layers = adapted_layers(model)
    refusals = [refusal for name, layer in layers.items()
                if (refusal := layer.load_refusal(state_dict, f"{prefix}{name}.")) is not None]
    if not layers:  # no adapted layer's identity records quantisation-aware bits
        state = adapter_state(model)
        bits = state.quant_bits if state is not None else None
        saved = state_dict.pop(prefix + QAT_BITS_KEY, None)
        saved_bits = None if saved is None else int(saved)
        if not seen_alike(saved_bits, bits, adapts_layers=False):
            trained = (f"quantisation-aware at {saved_bits} bits" if saved_bits is not None else
                       f"at full precision (it records no {QAT_BITS_KEY}, or that entry was left out)")
            shown = f"at {bits} bits (set_quantization_aware)" if bits is not None else "at full precision"
            refusals.append(f"the state dict's head was trained {trained}, and this model shows it {shown}: its "
                            "outputs would differ. Set the model to the bits the state dict was trained at first "
                            "(nv.set_quantization_aware)")
    if refusals:
        raise RuntimeError(f"Error(s) in loading state_dict for {type(model).__name__}:\n\t" + "\n\t".join(refusals))


def _quantize_head(head: nn.Module, bits: int) -> List[Union[RemovableHandle, _StoredBitsForward]]:
    """Forward hooks that show each layer of the head with its parameters as files store them (``bits``): the head
    itself when it is a Linear, else each of its modules that holds parameters (timm's CrossViT has a Linear per
    branch in a ModuleList, which is never called itself)."""
    hooks: List[Union[RemovableHandle, _StoredBitsForward]] = []
    try:
        for module in head.modules():
            if type(module).forward is nn.Linear.forward:  # a Linear (a subclass with a forward of its own is not)
                hooks.append(module.register_forward_hook(functools.partial(_quantized_linear, bits),
                                                          with_kwargs=True))
            elif any(parameter is not None for parameter in module._parameters.values()):
                hooks.append(_StoredBitsForward(module, bits))
    except BaseException:  # none left behind that no state names
        for hook in hooks:
            hook.remove()
        raise
    return hooks


def _quantized_linear(bits: int, layer: nn.Linear, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
    """Forward hook: the layer's output with its weight and bias as stored at ``bits`` (straight-through gradient)."""
    bias = fake_quantize(layer.bias, bits) if layer.bias is not None else None
    return F.linear(args[0] if args else kwargs["input"], fake_quantize(layer.weight, bits), bias)


def _quantized_head(bits: int, head: nn.Linear, args: tuple, output: Tensor) -> Tensor:
    """The hook of models pickled while a Linear head was the only one seen quantised (registered without kwargs)."""
    return _quantized_linear(bits, head, args, {}, output)


class _StoredBitsForward:
    """A head layer's forward (set on the instance) that runs the class's forward once with the layer's own
    parameters as stored at ``bits`` (straight-through gradient to them), swapped back in a ``finally``: also after
    an interrupt, so no plain tensor is ever left where a trained parameter belongs. Calls from several threads run
    one at a time: one that started while another's swap was in place would take the quantised tensors for the trained
    parameters and put them back for good. ``remove`` takes it off."""

    def __init__(self, module: nn.Module, bits: int) -> None:
        self.module, self.bits = module, bits
        self._lock = threading.RLock()
        module.forward = self

    def __call__(self, *args: object, **kwargs: object) -> object:
        module = self.module
        with self._lock:
            trained = {name: parameter for name, parameter in module._parameters.items() if parameter is not None}
            try:
                for name, parameter in trained.items():
                    module._parameters[name] = fake_quantize(parameter, self.bits)
                return type(module).forward(module, *args, **kwargs)
            finally:
                module._parameters.update(trained)

    def __getstate__(self) -> dict:
        return {"module": self.module, "bits": self.bits}  # a lock does not copy or pickle

    def __setstate__(self, state: dict) -> None:
        self.module, self.bits = state["module"], state["bits"]
        self._lock = threading.RLock()

    def remove(self) -> None:
        if self.module.__dict__.get("forward") is self:
            del self.module.forward
