"""Model-level adapter work: shared-basis batching across layers, merge/unmerge, and switching a merged model's task.

Layers hold per-layer math only (``layer.py``); what needs every adapted layer of a model at once lives here.
"""
from __future__ import annotations

import functools
import sys
import threading
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import functions
from .basis import BasisSpec, combine_bases
from .fingerprint import frozen_records
from .interrupts import all_or_nothing
from .layer import AdaptedLinear, adapted_layers, as_factors, full_precision, is_injected, narrow_range
from .targets import require_module

__all__ = ["SWITCH_LOCK", "batched_factors", "checkpointed_models", "checkpointing_modules", "combine_shared",
           "combine_shared_factors", "delta_factors_of_values", "gradient_checkpointing", "has_shared_bases",
           "holding_switch_lock", "merge", "merged_delta_factors", "reentrant_checkpointing_inputs",
           "reentrant_checkpointing_output", "release_shared_factors", "require_current_merge",
           "require_own_merged_flags", "shared_delta_factors", "switch_merged", "unmerge"]

# (layer, shared basis, coefficients): one request of ``combine_shared``.
SharedEntry = Tuple[AdaptedLinear, BasisSpec, Tensor]


def combine_shared(entries: Sequence[SharedEntry]) -> List[Tensor]:
    """Rows of ``coefficients @ bases`` for each entry, with one combination per distinct basis and device.

    Every entry whose basis is shared (``AdaptedLinear.shared_coefficients``) with others is combined in the same
    pass over that basis: merge, task switching and multi-task serving read each basis once, whatever the layers.
    """
    rows: list = [None] * len(entries)
    for indices, combined in _combined_groups(entries):
        for i, part in zip(indices, combined.split([entries[i][2].shape[0] for i in indices])):
            rows[i] = part
    return rows


def _combined_groups(entries: Sequence[SharedEntry]) -> List[Tuple[List[int], Tensor]]:
    """The entries' indices by basis and device, each group with its combined rows (the entries' rows in order)."""
    groups: dict = {}
    for index, (_, spec, coefficients) in enumerate(entries):
        groups.setdefault((spec, coefficients.device), []).append(index)
    combined = []
    for (spec, device), indices in groups.items():
        layer = entries[indices[0]][0]
        with full_precision(device):
            coefficients = torch.cat([entries[i][2] for i in indices])
            combined.append((indices, combine_bases(coefficients, spec, chunk=layer.shared_chunk, bank=layer.bank)))
    return combined


Factors = Tuple[Tensor, Tensor]


def shared_delta_factors(layers: Sequence[AdaptedLinear], values: Optional[Sequence[Dict[str, Tensor]]] = None,
                         autocast: bool = False) -> List[Tuple[Factors, Optional[Factors]]]:
    """``delta_factors()`` of each shared-basis layer (of its ``values``, when given), combining each basis once for
    all layers; with ``autocast``, also those factors in the dtype autocast casts them to on their device (or None).

    The rows of layers adapted over their whole width come first in each combination: where they share a shape and
    scaling (and all coefficients a dtype), they are viewed, scaled and cast as one tensor per basis, so a training
    step spends a few ops on all their factors instead of about ten per layer (views, scaling, and casts in forward,
    in backward and of the gradients), the ops that bound a step on a GPU. Each layer's values are those
    ``delta_factors_of`` gives for its rows of the combination, bit for bit; as with autocast's own cast of a
    parameter, a layer called several times in one pass adds up its factors' gradients in the cast dtype.
    """
    order = sorted(range(len(layers)), key=lambda index: not layers[index].whole_width)  # stable: whole layers first
    entries, roles = [], []
    for index in order:
        layer = layers[index]
        for role, (spec, name) in enumerate(layer.shared_coefficients()):
            value = layer.trained(name) if values is None else values[index][name].to(getattr(layer, name).device)
            entries.append((layer, spec, value))
            roles.append(role)  # 0: A's rows, 1: B's (as_factors)
    one_dtype = len({coefficients.dtype for _, _, coefficients in entries}) == 1
    parts: List[Tensor] = [None] * len(entries)  # type: ignore[list-item]
    casts: List[Optional[Tensor]] = [None] * len(entries)
    final = [False] * len(entries)  # parts[i] is entry i's delta factor, not its rows
    for indices, combined in _combined_groups(entries):
        whole = [i for i in indices if entries[i][0].whole_width] if one_dtype else []
        shapes = {_factor_shape(entries[i][0], roles[i]) for i in whole}
        scalings = {entries[i][0].scaling if roles[i] == 0 else 1.0 for i in whole}
        if len(shapes) != 1 or len(scalings) != 1:
            whole = []
        rest = indices[len(whole):]
        if rest:
            for i, part in zip(rest, combined[len(whole):].split([entries[i][2].shape[0] for i in rest])):
                parts[i] = part
        if not whole:
            continue
        viewed = (combined[: len(whole)] if rest else combined).view(len(whole), *shapes.pop())
        scaling = scalings.pop()
        viewed = viewed * scaling if scaling != 1.0 else viewed  # A's scaling, as delta_factors_of applies it
        cast = functions.autocast_dtype(combined.device) if autocast and viewed.dtype == torch.float32 else None
        cast_parts = viewed.to(cast).unbind(0) if cast is not None else [None] * len(whole)
        for i, part, cast_part in zip(whole, viewed.unbind(0), cast_parts):
            parts[i], casts[i], final[i] = part, cast_part, True
    factors: Dict[int, Tuple[Factors, Optional[Factors]]] = {}
    for index, a, b in zip(order, range(0, len(entries), 2), range(1, len(entries), 2)):
        layer = entries[a][0]
        if not (final[a] or final[b]):
            factors[index] = (layer.delta_factors_of(as_factors(layer, parts[a], parts[b])), None)
            continue
        for i in (a, b):  # a whole-width layer whose other basis is combined with other shapes or scalings
            if not final[i]:
                part = parts[i].view(_factor_shape(layer, roles[i]))
                parts[i] = part * layer.scaling if roles[i] == 0 and layer.scaling != 1.0 else part
        both_cast = casts[a] is not None and casts[b] is not None  # not ``None in``: Tensor == None costs ~20 µs
        factors[index] = ((parts[a], parts[b]), (casts[a], casts[b]) if both_cast else None)
    return [factors[index] for index in range(len(layers))]


def _factor_shape(layer: AdaptedLinear, role: int) -> Tuple[int, int]:
    """The 2-d shape of a whole-width layer's delta factor: A (in, rank), B (rank, out)."""
    return (layer.in_features, layer.rank) if role == 0 else (layer.rank, layer.out_features)


def _shared_layers(model: nn.Module, include_merged: bool) -> List[AdaptedLinear]:
    return _shared(adapted_layers(model).values(), include_merged)


def _shared(layers: Iterable[AdaptedLinear], include_merged: bool) -> List[AdaptedLinear]:
    return [layer for layer in layers if layer.shared_coefficients() and (include_merged or not layer.merged)]


def _walk(model: nn.Module) -> Tuple[List[AdaptedLinear], bool]:
    """The adapted layers of ``model`` (as ``adapted_layers`` orders them) and whether it checkpoints
    (``gradient_checkpointing``): a training step's hooks ask both, and a walk of a ViT-B's tree costs the host
    ~0.3 ms. The tree is walked again only after a module was assigned into any module (``_tree_changed``) or one of
    its modules was freed; the walk holds them weakly (a model, or a layer unloaded from it, is freed as before), and
    every module's checkpointing flag is read each time (setting it registers nothing)."""
    if torch.compiler.is_compiling():
        return _walked(*_walk_tree(model))
    cached = _WALKS.get(model)
    walk = None
    if cached is not None and cached[0] == _tree_generation:
        walk = tuple([[ref() for ref in refs] for refs in cached[1:]])  # no generator: see _walked
        for modules in walk:
            if None in modules:  # a module freed since (deleted from the tree, which registers nothing)
                walk = None
                break
    if walk is None:
        walk = _walk_tree(model)
        _WALKS[model] = (_tree_generation, *[[weakref.ref(module) for module in modules] for modules in walk])
    return _walked(*walk)


def _walked(layers: List[AdaptedLinear], modules: List[nn.Module], with_class_flag: List[nn.Module]
            ) -> Tuple[List[AdaptedLinear], bool]:
    # Loops, no generator expressions, here and in the hooks: a hook whose trace held no ops (a pass without grad) is
    # skipped by dynamo from then on and runs eagerly inside compiled calls, where a fullgraph=True compile refuses
    # any generator frame started ("Attempt to trace generator")
    for module in modules:
        if module.__dict__.get("grad_checkpointing") is True:
            return layers, True
    for module in with_class_flag:
        if _checkpoints(module):
            return layers, True
    return layers, False


def _walk_tree(model: nn.Module) -> Tuple[List[AdaptedLinear], List[nn.Module], List[nn.Module]]:
    """The adapted layers of ``model`` in ``named_modules`` order, all its modules, and those whose class has a
    ``grad_checkpointing`` attribute (a class attribute or property, which ``_checkpoints`` reads)."""
    layers, modules, seen, stack = [], [], set(), [model]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        modules.append(module)
        if isinstance(module, AdaptedLinear):
            layers.append(module)
        stack.extend(reversed([child for child in module._modules.values() if child is not None]))
    return layers, modules, [module for module in modules if hasattr(type(module), "grad_checkpointing")]


# Each model's last walk (weak references), with the generation of module trees it was taken in.
_WALKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_tree_generation = 0


def _tree_changed(*_: object) -> None:
    """nn.Module's registration hook: a module was assigned into another, so walks taken before may be stale. (A
    deleted module bumps nothing: a layer no longer in the tree then combines factors that nothing reads.)"""
    global _tree_generation
    _tree_generation += 1


torch.nn.modules.module.register_module_module_registration_hook(_tree_changed)


def has_shared_bases(model: nn.Module) -> bool:
    """Whether any adapted layer uses a shared basis (then ``inject`` installs the batching hooks)."""
    return bool(_shared_layers(model, include_merged=True))


def checkpointing_modules(model: nn.Module) -> List[nn.Module]:
    """The modules that recompute their blocks in backward (timm's ``set_grad_checkpointing`` contract: a
    ``grad_checkpointing`` flag set to True)."""
    return [module for module in model.modules() if _checkpoints(module)]


def _checkpoints(module: nn.Module) -> bool:
    """Whether ``module.grad_checkpointing is True``, without ``nn.Module.__getattr__``'s raised AttributeError for
    the modules that have no such attribute (most of them): training steps ask this of the whole tree."""
    flag = module.__dict__.get("grad_checkpointing")
    if flag is None and hasattr(type(module), "grad_checkpointing"):  # a class attribute or property
        flag = getattr(module, "grad_checkpointing", None)
    return flag is True


def gradient_checkpointing(model: nn.Module) -> bool:
    """Whether the model recomputes blocks in backward (timm's ``set_grad_checkpointing`` contract), from its kept
    walk (``_walk``)."""
    return _walk(model)[1]


def _reentrant_checkpointing() -> bool:
    """Whether timm checkpoints re-entrantly: each block then runs its own backward inside the outer one, which
    must not go through a combination shared by every block (the first block's backward would free it)."""
    use_reentrant = getattr(sys.modules.get("timm.layers"), "use_reentrant_ckpt", None)
    return True if use_reentrant is None else bool(use_reentrant())


def reentrant_checkpointing_inputs(model: nn.Module, args: tuple, kwargs: dict) -> Optional[Tuple[tuple, dict]]:
    """Forward pre-hook (with keyword arguments): under re-entrant gradient checkpointing, hand the model its images
    as tensors that require grad (the same storage). Re-entrant checkpointing only differentiates a block whose input
    requires grad, and a frozen stem's output does not: without this every adapter would silently get no gradient.
    ``inject`` installs it on the model and on each timm model inside it, which gets the images of a dict batch."""
    if not torch.is_grad_enabled():
        return None
    for value in (*args, *kwargs.values()):  # a loop, no generator: see _walked
        if _frozen_input(value):
            break
    else:
        return None
    if not (_reentrant_checkpointing() and gradient_checkpointing(model)):
        return None
    return tuple(map(_requiring_grad, args)), {key: _requiring_grad(value) for key, value in kwargs.items()}


def reentrant_checkpointing_output(model: nn.Module, module: nn.Module, args: tuple, output: object) -> object:
    """Forward hook on the frozen children of a timm model (its stem) with ``model`` bound: under re-entrant
    gradient checkpointing, hand on their output as a tensor that requires grad, as ``reentrant_checkpointing_inputs``
    does with the images, for calls that skip the model's own forward (``model.forward_features(x)``)."""
    if not torch.is_grad_enabled() or not _frozen_input(output):
        return None
    if not (_reentrant_checkpointing() and gradient_checkpointing(model)):
        return None
    return _requiring_grad(output)


def _frozen_input(value: object) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point() and not value.requires_grad


def _requiring_grad(value: object) -> object:
    return value.detach().requires_grad_(True) if _frozen_input(value) else value


def checkpointed_models(model: nn.Module) -> List[nn.Module]:
    """The model and every timm model inside it (``set_grad_checkpointing``): where re-entrant checkpointing needs
    inputs that require grad (``reentrant_checkpointing_inputs``)."""
    return [model] + [module for module in model.modules()
                      if module is not model and callable(getattr(module, "set_grad_checkpointing", None))]


def combine_shared_factors(model: nn.Module, *_: object, include_merged: bool = False) -> None:
    """Forward pre-hook: combine the coefficients of all layers that share a basis in one matmul per basis.

    Twelve ViT blocks then read (and decode) each shared basis once per step instead of twelve times, in
    forward and in backward. Layers called outside the model's forward combine their own factors.
    """
    walk = _walk(model)
    layers = []
    for layer in _shared(walk[0], include_merged):
        if layer.stale_batched_factors():
            layer.forget_pending_passes()  # kept for a backward that never came: the adapter tensors changed since
        if layer.pending_passes and not torch.is_grad_enabled():
            continue  # a pending backward recomputes blocks from these (current) factors: use them, keep them
        layer.hold_batched_factors(None)
        layers.append(layer)
    if torch.is_grad_enabled() and _reentrant_checkpointing() and walk[1]:
        return  # each layer combines its own factors, inside the checkpointed block that recomputes them
    # A pass with grad also gets the factors as autocast casts them, once for all layers (the forward uses them)
    for layer, (factors, cast) in zip(layers, shared_delta_factors(layers, autocast=torch.is_grad_enabled())):
        layer.hold_batched_factors(factors, cast)


def release_shared_factors(model: nn.Module, *_: object) -> None:
    """Forward hook: drop the per-pass factors so no graph outlives the forward pass that built it.

    With (non-reentrant) gradient checkpointing, backward recomputes each block's layers, which read the layer's
    factors: they are kept until the model's next forward pass replaces them, for every backward that may still
    recompute blocks (two forward passes then one backward, the two-views pattern, recompute the first pass's blocks
    after the second pass's backward; a second backward through a kept graph recomputes them again). A pass counts as
    pending in its layers until backward has computed its factors' gradients (one counter per layer, one hook per
    pass): meanwhile a pass without grad uses the kept factors instead of replacing them.
    """
    adapted, checkpoints = _walk(model)
    factors = {layer: (*layer.batched_factors, *(layer.batched_cast or ())) for layer in adapted
               if layer.batched_factors is not None}
    trained = [f for tensors in factors.values() for f in tensors if f.requires_grad]
    if trained and torch.is_grad_enabled() and checkpoints:
        layers = list(factors)
        torch.autograd.graph.register_multi_grad_hook(trained, lambda _: _release_factors(layers))
        if not torch.compiler.is_compiling():
            for layer in layers:
                layer.keep_batched_factors()
        return
    for layer in factors:
        if not layer.pending_passes:  # else kept for the backward of an earlier pass (see combine_shared_factors)
            layer.hold_batched_factors(None)


def _release_factors(layers: List[AdaptedLinear]) -> None:
    """One pass's backward has computed its factors' gradients: it is no longer pending in its layers (which keep the
    factors for another backward through a kept graph, ``AdaptedLinear.release_batched_factors``)."""
    for layer in layers:
        layer.release_batched_factors()


@contextmanager
def batched_factors(model: nn.Module) -> Iterator[None]:
    """Within this block every shared-basis layer's factors come from one combination per basis."""
    combine_shared_factors(model, include_merged=True)
    try:
        yield
    finally:
        release_shared_factors(model)


def holding_switch_lock(action: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """``action(model, ...)``, a change of a model's weights or adapters, under ``SWITCH_LOCK``: a merge beside
    another thread's merge, unmerge, unload or task switch interleaved their read-modify-writes of the frozen
    weights, which then stayed off for good."""
    @functools.wraps(action)
    def held(*args: Any, **kwargs: Any) -> nn.Module:
        with SWITCH_LOCK:
            return action(*args, **kwargs)
    return held


@holding_switch_lock
def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter's ΔW into its frozen weight: inference then costs what the base model costs.

    Each layer first keeps the fingerprint of its unmerged weight, so that checking which frozen weights the
    model has (e.g. ``load_adapter`` switching tasks in place) stays cheap while it is merged. Nothing is recorded
    for autograd, so the basis bank keeps the shared bases' codes, which a task switch reads again.
    """
    _require_adapted_layers(model, "merge")
    require_own_merged_flags(model, "merge")  # before any layer changes
    unmerged = {name: layer for name, layer in adapted_layers(model).items() if not layer.merged}
    require_stored_weights(unmerged, "merge")
    valued = [name for name, layer in unmerged.items() if not layer.weight.is_meta]  # meta: shapes only, no record
    records = frozen_records(model, valued)
    with torch.no_grad(), batched_factors(model):
        # every layer checked before any weight changes, with the factors its merge then adds
        checked = {name: layer.delta_factors() for name, layer in unmerged.items()}
        for name, factors in checked.items():
            _require_finite_update(name, factors)
            overflow = unmerged[name].low_rank_overflow(*factors)
            if overflow is not None:
                fix = ("Serve the model unmerged, or merge in float32 or bfloat16 (model.float() before nv.merge)"
                       if narrow_range(unmerged[name].weight) else "Its trained tensors are far beyond a trained "
                       "adapter's (a diverged run?): train or load other values")
                raise OverflowError(f"nv.merge: {name}: {overflow}; no weight was changed. {fix}")
        # every layer merged, or none (each layer's merge is one write, or none)
        with all_or_nothing("nv.merge") as undo:
            for name, layer in unmerged.items():
                undo.append(functools.partial(_unmerge_if_merged, layer))  # before: it may fail after its write
                layer.merge(checked[name])
                layer.unmerged_record = records.get(name)
    return model


def require_stored_weights(layers: Dict[str, AdaptedLinear], action: str,
                           tensors: Tuple[str, ...] = ("weight",)) -> None:
    """Refuse ``action`` on layers whose weight (or other of ``tensors``) is computed, added after inject: by a
    parametrization, or before each call from other parameters (``torch.nn.utils.prune``, the legacy
    ``weight_norm``). ΔW written into it would land in a tensor thrown away at the next call (the layer counted as
    merged without it, or unmerged with it still in), and ``unload`` could not give it back as a parameter."""
    what = " or ".join(tensors)
    lost = ("the original layer could not take it back as its parameter" if action == "unload" else
            "ΔW written into it would be lost")
    keep = "or keep the adapters" if action == "unload" else "or keep the model unmerged"
    parametrized = [name for name, layer in layers.items()
                    if any(parametrize.is_parametrized(layer, tensor) for tensor in tensors)]
    if parametrized:
        raise ValueError(f"nv.{action}: the {what} of {', '.join(parametrized)} is computed by a parametrization "
                         f"(torch.nn.utils.parametrize, registered after inject), so {lost}: nothing was changed. "
                         "Remove it first (parametrize.remove_parametrizations(layer, 'weight'), which keeps the "
                         f"weight it computes), {keep}")
    # a tensor held but not as a parameter (a bias of None is no tensor: a Linear(bias=False) has none to compute)
    computed = [name for name, layer in layers.items()
                if any(tensor not in layer._parameters and getattr(layer, tensor, None) is not None
                       for tensor in tensors)]
    if computed:
        raise ValueError(f"nv.{action}: the {what} of {', '.join(computed)} is no parameter but computed before "
                         "each call (torch.nn.utils.prune or the legacy torch.nn.utils.weight_norm, applied after "
                         f"inject), so {lost}: nothing was changed. Make it permanent first (prune.remove(layer, "
                         f"'weight'), torch.nn.utils.remove_weight_norm(layer)), {keep}")


def _require_finite_update(name: str, factors: Tuple[Tensor, Tensor]) -> None:
    """Refuse to merge a layer's update that is not finite (trained tensors holding NaN or inf): it would turn the
    whole frozen weight into NaN, which no unmerge gives back."""
    if any(factor.is_meta for factor in factors) or all(bool(torch.isfinite(factor).all()) for factor in factors):
        return
    raise ValueError(f"nv.merge: {name}'s update is not finite (its trained tensors hold NaN or inf: a diverged "
                     "training step?): merged, it would turn the frozen weight into NaN, which nv.unmerge cannot "
                     "undo; no weight was changed. Train or load finite values first (nv.load_adapter of a saved "
                     "adapter)")


def _require_adapted_layers(model: nn.Module, action: str) -> None:
    """Refuse ``action`` on a model that holds no adapters, its own or a submodule's (merging works through
    wrappers): returning it unchanged would look like a merge (or unmerge) that took place."""
    require_module(model, action)
    if not is_injected(model):
        raise ValueError(f"nv.{action}: {type(model).__name__} has no nola_vision adapters (never injected, or "
                         f"unloaded): there is nothing to {action}; call nv.inject or nv.load_adapter first")


def delta_factors_of_values(pairs: Sequence[Tuple[AdaptedLinear, Dict[str, Tensor]]]) -> List[Tuple[Tensor, Tensor]]:
    """``layer.delta_factors(values)`` of each (layer, values) pair, the shared bases combined once for all layers."""
    shared = [i for i, (layer, _) in enumerate(pairs) if layer.shared_coefficients()]
    factors = shared_delta_factors([pairs[i][0] for i in shared], [pairs[i][1] for i in shared])
    combined = {i: pair for i, (pair, _) in zip(shared, factors)}
    return [combined[i] if i in combined else layer.delta_factors(values) for i, (layer, values) in enumerate(pairs)]


def merged_delta_factors(layers: Sequence[AdaptedLinear]) -> Dict[int, Tuple[Tensor, Tensor]]:
    """``merged_delta_factors()`` of merged layers by ``id``: the factors each layer added where it kept them, else
    combined from its ``merged_values``, the shared bases once for all such layers."""
    merged = [layer for layer in layers if layer.merged]
    recompute = [layer for layer in merged if not layer.keeps_merged_factors]
    factors = dict(zip(map(id, recompute),
                       delta_factors_of_values([(layer, layer.merged_values) for layer in recompute])))
    factors.update({id(layer): layer.merged_delta_factors() for layer in merged if id(layer) not in factors})
    return factors


def require_current_merge(model: nn.Module, action: str) -> None:
    """Refuse ``action`` (a file of the trained tensors) on a merged model whose adapter tensors changed since the
    merge (an EMA or optimizer step, an in-place edit): the model computes with the values merged then, so the file
    would load back with other outputs than the model gives."""
    require_own_merged_flags(model, action)
    for name, layer in adapted_layers(model).items():
        changed = layer.changed_since_merge()
        if changed:
            raise ValueError(
                f"{action}: the model is merged, and {name}'s {', '.join(changed)} changed since "
                f"nv.merge{layer.changed_by_a_cast_note()}, so the model still computes with the values merged then: "
                "a file of the new values would load back with other outputs than this model gives. Call "
                "nv.unmerge(model) first (nv.merge again to evaluate the new values), or undo the change")


@holding_switch_lock
def unmerge(model: nn.Module) -> nn.Module:
    """Undo ``merge`` so the adapters can train again: each layer subtracts exactly the update it merged, whatever
    happened to its trained tensors since (an optimizer step while merged)."""
    _require_adapted_layers(model, "unmerge")
    require_own_merged_flags(model, "unmerge")  # before any layer changes
    merged = {name: layer for name, layer in adapted_layers(model).items() if layer.merged}
    require_stored_weights(merged, "unmerge")
    layers = list(merged.values())
    with torch.no_grad():
        factors = merged_delta_factors(layers)
        with all_or_nothing("nv.unmerge") as undo:  # every layer unmerged, or none
            for layer in layers:
                values, kept, record = layer.merged_values, factors[id(layer)], layer.unmerged_record
                undo.append(functools.partial(_merge_again, layer, values, kept, record))  # before: as in merge
                layer.unmerge(kept)
    return model


def _merge_again(layer: AdaptedLinear, values: Dict[str, Tensor], factors: Tuple[Tensor, Tensor],
                 record: Optional[List[float]]) -> None:
    """Undo a layer's unmerge, if it got as far as its weight: the same update merged again, recorded as merged from
    the same values and weight."""
    if not layer.merged:
        layer.merge(factors, values)
        layer.unmerged_record = record


def _unmerge_if_merged(layer: AdaptedLinear) -> None:
    """Undo a layer's merge, if it got as far as its weight."""
    if layer.merged:
        layer.unmerge()


def _switch_back(layer: AdaptedLinear, changes: Tuple[Tuple[Tensor, Tensor], Tuple[Tensor, Tensor]],
                 switched_to: Dict[str, Tensor], values: Dict[str, Tensor], record: Optional[List[float]]) -> None:
    """Undo a layer's task switch, if its weight took it (it merged ``switched_to``, though what came after the write,
    the ``record`` of its unmerged weight, may have failed): the previous update, of ``values``, merged again."""
    if layer.merged_values is switched_to:
        layer.replace_merged_delta(*changes, values, record)


def require_own_merged_flags(model: nn.Module, action: str) -> None:
    """Refuse ``action`` on a model with a layer whose merged flag was overwritten since the layer set it
    (``AdaptedLinear.overwritten_merged_flag``, its value read: a write through ``.data`` keeps the version), naming
    the layer."""
    for name, layer in adapted_layers(model).items():
        layer.require_own_merged_flag(action, name, exact=True)


# The lock a task switch, merge, unmerge or unload holds from its checks to its last write, one for the process: two
# such changes from two threads interleaved their read-modify-writes of the frozen weights (W += ΔW_new − ΔW_old),
# which then stayed off for good, and one model is reached through wrappers and submodules that no per-model key
# ties together (nv.unmerge(nn.Sequential(model)) beside nv.load_adapter(model)). Changes are rare; passes never
# take it.
SWITCH_LOCK = threading.RLock()


@torch.no_grad()
def switch_merged(model: nn.Module, values: Dict[str, Tensor]) -> None:
    """Copy new adapter values (by parameter name) into a model, applying W += ΔW_new − ΔW_old on merged layers.

    ΔW_old is what each layer merged (the factors it added, kept since, or those of ``merged_values``), not the update
    of its parameters now, which an optimizer step or an in-place edit may have changed since; ΔW_new is that of the
    new values (a layer whose parameters ``values`` leaves out: of its parameters now). The coefficients of all
    shared-basis layers are combined in one pass over each basis, so switching a live ViT-B between tasks touches
    each weight once and decodes each basis once. On an unmerged model this is a plain copy.
    """
    require_own_merged_flags(model, "a task switch")
    layers = {name: m for name, m in adapted_layers(model).items() if m.merged}
    require_stored_weights(layers, "load_adapter")
    new_values = {
        id(layer): {name: layer.trained(name, values.get(f"{prefix}.{name}", getattr(layer, name))
                                        .to(getattr(layer, name))).detach().clone()
                    for name in layer.adapter_parameter_names}
        for prefix, layer in layers.items()}
    old_factors = merged_delta_factors(list(layers.values()))
    new_factors = delta_factors_of_values([(layer, new_values[id(layer)]) for layer in layers.values()])  # of copies:
    changes = {id(layer): (old_factors[id(layer)], new)  # the parameters are overwritten below
               for layer, new in zip(layers.values(), new_factors)}
    for prefix, layer in layers.items():  # before anything changes (None at once where no range can be left)
        overflow = layer.switch_overflow(*changes[id(layer)])
        if overflow is not None:
            fix = ("Switch tasks on an unmerged model (nv.unmerge), or hold the weights in float32 or bfloat16"
                   if narrow_range(layer.weight) else "The new task's trained tensors are far beyond a trained "
                   "adapter's (a diverged run?): load another task")
            raise OverflowError(f"{prefix}: merging the new task's update: {overflow}; the model still serves its "
                                f"previous task, unchanged. {fix}")
    parameters = dict(model.named_parameters())
    before = {name: parameters[name].detach().clone() for name in values}
    # the whole new task, or the old one: never a model (or a saved file) of both
    with all_or_nothing("the task switch") as undo:
        undo.append(lambda: [parameters[name].copy_(value) for name, value in before.items()])
        for name, value in values.items():
            parameters[name].copy_(value)
        for prefix, layer in adapted_layers(model).items():  # layers made on the meta device hold values now
            if all(f"{prefix}.{name}" in values for name in layer.adapter_parameter_names):
                undo.append(functools.partial(setattr, layer, "values_unset", layer.values_unset))
                layer.values_unset = False
        for layer in layers.values():
            old, new = changes[id(layer)]
            undo.append(functools.partial(_switch_back, layer, (new, old), new_values[id(layer)], layer.merged_values,
                                          layer.unmerged_record))
            layer.replace_merged_delta(old, new, new_values[id(layer)])
