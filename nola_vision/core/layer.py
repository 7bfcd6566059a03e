"""The adapted-layer contract: a frozen ``nn.Linear`` plus a low-rank update on whole or sliced output features.

Every method's layer (``NOLALinear``, ``LoRALinear``, …) subclasses ``AdaptedLinear`` and shares its forward,
merge and slice mechanism; a method only says how it produces the factors A (in×r) and B (r×width) of each
slice. What model-level code (plan, inject, merge, files, serving, export) may read from a layer is declared
here, on the base class, and nowhere else.
"""
from __future__ import annotations

import json
import weakref
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .basis import BasisSpec, factor_dtype
from .functions import (
    MergedGuard,
    MergedTangentGuard,
    add_low_rank_output,
    autocast_available,
    cast_to,
    is_batched,
    low_rank_linear,
    product_dtype,
    transforms_active,
)
from .interrupts import interrupts_deferred
from .quantize import fake_quantize

__all__ = ["HOOK_KINDS", "IDENTITY_KEY", "MERGED_FLAG", "STATE_ATTRIBUTE", "AdaptedLinear", "Slice", "adapted_layers",
           "as_factors", "factors_overflow", "full_precision", "has_hooks", "is_injected", "narrow_range"]

Slice = Tuple[int, int]
# A 0-dim uint8 buffer of every adapted layer: merged-ness (and the quantisation-aware bits ΔW was merged at)
# travels with its state dict (see ``_load_from_state_dict``).
MERGED_FLAG = "adapter_merged"
# The entry of each adapted layer's state dict (``get_extra_state``) that identifies its update: method, slices, rank,
# scaling and random bases, as JSON bytes in a uint8 tensor (so ``safetensors.save_file(model.state_dict())`` works).
IDENTITY_KEY = "_extra_state"


# The dicts of a module's own hooks, by hook id.
HOOK_KINDS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def has_hooks(module: nn.Module) -> bool:
    """Whether the module itself carries forward or backward hooks (global hooks aside)."""
    return any(getattr(module, kind) for kind in HOOK_KINDS)


def full_precision(device: torch.device) -> ContextManager[None]:
    """Disable autocast: coefficient combinations are tiny and must not cast the large bases every step."""
    return torch.autocast(device_type=device.type, enabled=False) if autocast_available(device.type) else nullcontext()


# Values of a merged weight its stamp keeps (``AdaptedLinear._weight_stamp``), evenly spaced over it.
_STAMP_VALUES = 64


def _same_stamp(kept: Tuple[Any, ...], now: Optional[Tuple[Any, ...]]) -> bool:
    return now is not None and kept[:4] == now[:4] and torch.equal(kept[4], now[4])


class _Rounding(NamedTuple):
    """What a merge in a 16-bit dtype rounded away: the values of the weight before the merge where weight − ΔW would
    not round back to them, at their flat ``positions`` (int32 where they fit); ``positions`` None: ``values`` is the
    whole weight, kept where more than a third of the entries would not round back (a ΔW about as large as W). Both
    in host memory."""

    positions: Optional[Tensor]
    values: Tensor


_SIXTEEN_BIT = (torch.float16, torch.bfloat16)
_WIDER = (torch.float32, torch.float64)  # merge dtypes whose ΔW a weight cast to 16 bits since subtracts in float32


def _factor_overflows(weight: Tensor, left: Tensor, right: Tensor) -> bool:
    """Whether a factor cast to a weight's dtype of narrow range (float16) left it: ΔW may still fit, formed aside."""
    return narrow_range(weight) and not bool(torch.isfinite(left).all() and torch.isfinite(right).all())


def factors_overflow(weight: Tensor, a: Tensor, b: Tensor) -> bool:
    """Whether an unmerged pass of a layer of ``weight``, which casts ΔW's factors ``a``, ``b`` (``delta_factors``) to
    the weight's dtype, would take one beyond that dtype's range (float16: 65,504), where ΔW itself may fit."""
    return _factor_overflows(weight, b.t().to(weight.dtype), a.t().to(weight.dtype))


def _sum_in_float32(weight: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """weight + (a b)ᵀ formed in float32 and rounded once to the weight's dtype."""
    return weight.float().addmm_(b.t().float(), a.t().float()).to(weight.dtype)


def narrow_range(weight: Tensor) -> bool:
    """Whether an update merged into ``weight`` can leave its dtype's range (float16, the 8-bit floats; see
    ``_WIDE_RANGE``). A weight on the meta device has no values to leave a range."""
    return torch.finfo(weight.dtype).max <= _WIDE_RANGE and not weight.is_meta


# Float dtypes with a larger largest value than this (float32, bfloat16, float64) hold any merged update a trained
# adapter reaches; float16 (65,504) and the 8-bit floats do not, so their merges are checked.
_WIDE_RANGE = 1e30


class AdaptedLinear(nn.Module):
    """Frozen ``y = x Wᵀ + b`` plus ``scaling · (x A) B`` on each output slice, without materialising ΔW.

    ``weight`` and ``bias`` are the wrapped layer's own parameters, so state-dict keys of the base model are
    unchanged and pretrained weights load into an adapted model as they are; the only other keys are the adapter
    tensors, the ``adapter_merged`` flag, which keeps a merged state dict from adding ΔW twice, and ``_extra_state``
    (``identity()``), which keeps adapter tensors from loading into a layer with another update.

    The contract, everything model-level code may use:

    * a method implements ``adapter_parameter_names``, ``parameter_shapes`` and ``factors`` (and, with random
      bases, ``plan_basis_specs``, ``basis_specs``, ``injection_context`` and ``shared_coefficients``);
    * model-level code reads ``base_layer`` (the module this layer replaced, given back by ``unload``),
      ``in_features``, ``out_features``, ``slices``, ``whole_width``, ``width``, ``rank``, ``scaling``, ``merged``,
      ``adapter_parameters()``, ``trained()``, ``trained_values()``, ``delta_factors()``, ``delta_factors_of()``,
      ``merged_values``, ``merged_delta_factors()``, ``identity()``, ``unstored_state()``, ``pending_passes`` and
      ``get_delta_weight()``,
      and calls ``merge()``, ``unmerge()``, ``replace_merged_delta()``, ``keep_batched_factors()``,
      ``release_batched_factors()`` and ``forget_pending_passes()``;
    * inject calls ``follow_float64_weight()`` (so does the multi-task model), ``note_injected_identity()`` and
      ``take_activation()``, and unload ``give_back_activation()``;
      files call ``require_injected_identity()``; model-level code reads
      ``input_activation`` and sets ``quant_bits`` (quantisation-aware training),
      ``batched_factors`` and ``batched_cast`` (shared-basis batching, one forward pass at a time: the layer's
      ``delta_factors()``, and those in autocast's dtype) and ``unmerged_record`` (the
      frozen-weights fingerprint of the unmerged weight, taken by ``merge.merge`` before folding ΔW in); inject's
      load post-hook reads and resets ``unchecked_load``; model-level code reads ``values_unset`` and
      ``holds_unset_values()``, and clears ``values_unset`` once it copies values into the adapter tensors.
    """

    adapter_parameter_names: Tuple[str, ...] = ()
    # Whether the last load_state_dict gave this layer adapter tensors without their identity entry (see
    # ``_load_from_state_dict``); inject's load post-hook reads it.
    unchecked_load: bool = False
    # Whether it also gave them with a weight but no merged flag (the earliest builds wrote none): taken as unmerged.
    unflagged_load: bool = False
    # Whether the layer was made on the meta device and its adapter tensors got no values since (a load_state_dict
    # holding them, load_adapter): to_empty() gives them uninitialised memory, which no pass may compute with.
    values_unset: bool = False
    # While ``values_unset``, the adapter tensors that to_empty() (or a later move) made from the meta ones, by name,
    # with their version counters: these very tensors, unwritten since, hold no values; others passed in their place
    # (torch.func.functional_call) do, and so do these once written in place. None in layers pickled before it was
    # kept, whose every materialised tensor counts as unset.
    unset_tensors: Optional[Dict[str, Tuple[Tensor, Optional[int]]]] = None
    # What take_activation() left at ``mlp.act``; None where nothing is taken over (and in layers pickled before it
    # was kept, which then go unchecked).
    activation_placeholder: Optional[nn.Module] = None

    def __init__(self, base: nn.Linear, slices: Optional[Sequence[Slice]], rank: int, scaling: float) -> None:
        """``slices``: the adapted output ranges; None (or empty) for all of the layer's outputs."""
        super().__init__()
        if not isinstance(base, nn.Linear):  # a Conv2d or None failed as a bare AttributeError (out_features)
            raise TypeError(f"{type(self).__name__} adapts an nn.Linear, got {type(base).__name__}")
        if slices is None or len(slices) == 0:
            slices = [(0, base.out_features)]
        widths = {end - start for start, end in slices}
        if len(widths) != 1:
            raise ValueError(f"all adapted slices of a layer must have the same width, got {list(slices)}")
        ordered = sorted((int(start), int(end)) for start, end in slices)
        if any(not 0 <= start < end <= base.out_features for start, end in ordered) or any(
                end > start for (_, end), (start, _) in zip(ordered, ordered[1:])):
            # a slice past the outputs was cut short by the forward pass (a trained row silently dropped)
            raise ValueError(f"the adapted slices {list(slices)} must be disjoint ranges of the layer's "
                             f"{base.out_features} outputs (0 <= start < end <= {base.out_features})")
        # Kept out of the module tree (no state-dict keys, no second copy of the weight in .to()): it shares
        # ``weight`` and ``bias`` with this layer, so it is the original module, merged or not.
        self.__dict__["base_layer"] = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.slices: Tuple[Slice, ...] = tuple((int(s), int(e)) for s, e in slices)
        self.width = widths.pop()
        self.rank = rank
        self.scaling = scaling
        self.register_buffer(MERGED_FLAG, torch.zeros((), dtype=torch.uint8, device=base.weight.device))
        self.merged = False
        self.values_unset = base.weight.is_meta
        self.unset_tensors = {}
        # Set by take_activation() for an mlp.fc2 whose activation was moved here to be recomputed in backward.
        self.input_activation: Optional[nn.Module] = None
        # The Mlp whose ``act`` that is, outside the module tree (it is this layer's parent).
        self.__dict__["activation_owner"] = None
        # Quantisation-aware training: forward sees the values that save_adapter(bits=...) would store.
        self.quant_bits: Optional[int] = None
        # Combined factors of the current forward pass, set by merge.combine_shared_factors (see there).
        self.batched_factors: Optional[Tuple[Tensor, Tensor]] = None
        # While merged: the fingerprint record of the weight without ΔW (see ``unmerged_record``).
        self.unmerged_record = None
        # While merged: copies of the trained tensors as the forward pass saw them when ΔW was folded in (see
        # ``merged_values``); unmerge and task switches subtract exactly their ΔW.
        self._merged_values: Optional[Dict[str, Tensor]] = None
        # While merged: the factors of the ΔW folded in, when this layer computed them (``merged_delta_factors``).
        self._merged_factors: Optional[Tuple[Tensor, Tensor]] = None
        # While merged in a 16-bit dtype: what unmerging would not round back (``_merge_update``).
        self._rounding: Optional[_Rounding] = None
        # Forward passes (gradient checkpointing) whose backward may still recompute blocks from the batched factors.
        self._pending_passes = 0

    @property
    def whole_width(self) -> bool:
        """Whether one slice spans the whole output: the delta factors are then A and B themselves, viewed (no
        permute, no padding)."""
        return self.slices == ((0, self.out_features),)

    @property
    def batched_factors(self) -> Optional[Tuple[Tensor, Tensor]]:
        """``delta_factors()`` combined for all layers of a forward pass at once; ``delta_factors`` returns them."""
        return self._batched_factors

    @batched_factors.setter
    def batched_factors(self, value: Optional[Tuple[Tensor, Tensor]]) -> None:
        self.hold_batched_factors(value)

    def hold_batched_factors(self, factors: Optional[Tuple[Tensor, Tensor]],
                             cast: Optional[Tuple[Tensor, Tensor]] = None) -> None:
        """Set ``batched_factors`` and ``batched_cast`` as plain attributes: an assignment passes
        nn.Module.__setattr__'s checks first (~4 µs), and every training step sets them a few times per layer."""
        self.__dict__.update(_batched_factors=factors, _batched_cast=cast, _batched_versions=None,
                             _kept_past_backward=False)

    @property
    def batched_cast(self) -> Optional[Tuple[Tensor, Tensor]]:
        """The batched factors as autocast casts them (cast once for all layers), which a training pass whose product
        has their dtype uses; setting ``batched_factors`` drops them."""
        return self.__dict__.get("_batched_cast")

    @batched_cast.setter
    def batched_cast(self, value: Optional[Tuple[Tensor, Tensor]]) -> None:
        self.__dict__["_batched_cast"] = value

    def take_activation(self, mlp: nn.Module, placeholder: nn.Module) -> None:
        """Compute ``mlp.act`` here, on the pre-activation ``mlp`` passes in (backward recomputes it instead of keeping
        it), leaving ``placeholder`` at ``mlp.act``; ``give_back_activation`` undoes it. Each forward pass checks that
        the placeholder is still there (its ``mlp_name``, if any, names the Mlp in the error)."""
        activation = mlp.act
        mlp.act = placeholder.train(activation.training)
        self.input_activation = activation
        self.__dict__["activation_owner"] = mlp
        self.__dict__["activation_placeholder"] = placeholder  # a plain attribute: mlp.act holds it in the tree
        self.__dict__["_given_back"] = None

    def give_back_activation(self, *, for_hook: bool = False) -> None:
        """Put a taken-over activation back at ``mlp.act``: the layer then receives its output, as in a plain model.

        ``for_hook``: for a hook on this layer, which must see its real input; once the last such hook is removed,
        the layer takes the activation over again (a model summary's passing hooks leave the recompute on)."""
        if not for_hook:
            self.__dict__["_given_back"] = None  # for good (unload): no hook's removal takes it over again
        if self.input_activation is None:
            return
        owner, activation = self.activation_owner, self.input_activation
        placeholder = self.activation_placeholder
        placeholder = owner.act if placeholder is None else placeholder  # None: pickled before it was kept
        if owner.act is placeholder:  # else replaced since inject: that module stays, the taken-over one goes
            owner.act = activation
        del self.input_activation  # out of the module tree, then a plain attribute again
        self.input_activation = None
        self.__dict__["activation_owner"] = None
        self.__dict__["activation_placeholder"] = None
        if for_hook:
            self.__dict__["_given_back"] = (owner, activation, placeholder)

    def hooked_activation_stand_in(self) -> Optional[str]:
        """The name of the MLP whose ``act`` is this layer's stand-in and carries hooks, which giving the activation
        back drops; None otherwise. Unload warns of it before it changes anything."""
        if self.input_activation is None:
            return None
        owner, placeholder = self.activation_owner, self.activation_placeholder
        placeholder = owner.act if placeholder is None else placeholder
        if owner.act is not placeholder or not has_hooks(placeholder):
            return None
        return getattr(placeholder, "mlp_name", "mlp")

    def _register_seeing_real_input(self, register: Any, *args: Any, **kwargs: Any) -> RemovableHandle:
        """Register a hook after giving a taken-over activation back; its handle's removal may take it over again."""
        self.give_back_activation(for_hook=True)
        handle = register(*args, **kwargs)
        if self.__dict__.get("_given_back") is None:  # never taken over, or given back for good
            return handle
        self.__dict__.setdefault("_hook_ids", set()).add(handle.id)
        return _RetakingHandle(handle, self)

    def _hook_removed(self, hook_id: int) -> None:
        """Take the activation over again once no hook registered through this layer's methods is left, unless it
        changed since (replaced at ``mlp.act``, or given hooks of its own: those stay where they are)."""
        hook_ids = self.__dict__.get("_hook_ids", set())
        hook_ids.discard(hook_id)
        given_back = self.__dict__.get("_given_back")
        if hook_ids or given_back is None:
            return
        owner, activation, placeholder = given_back
        if owner.act is activation and not has_hooks(activation):
            self.take_activation(owner, placeholder)

    def register_forward_pre_hook(self, *args: Any, **kwargs: Any) -> RemovableHandle:
        """As ``nn.Module``'s; a taken-over activation goes back to ``mlp.act`` while it is registered: the hook sees
        the real input."""
        return self._register_seeing_real_input(super().register_forward_pre_hook, *args, **kwargs)

    def register_forward_hook(self, *args: Any, **kwargs: Any) -> RemovableHandle:
        """As ``nn.Module``'s; a taken-over activation goes back to ``mlp.act`` while it is registered: the hook sees
        the real input."""
        return self._register_seeing_real_input(super().register_forward_hook, *args, **kwargs)

    def register_full_backward_hook(self, *args: Any, **kwargs: Any) -> RemovableHandle:
        """As ``nn.Module``'s; a taken-over activation goes back to ``mlp.act`` while it is registered, so
        ``grad_input`` is the gradient of the real input."""
        return self._register_seeing_real_input(super().register_full_backward_hook, *args, **kwargs)

    def keep_batched_factors(self) -> None:
        """Keep the batched factors past their forward pass (for a backward that recomputes blocks) only while the
        adapter tensors stay unchanged: a forward pass whose backward never comes (and an optimizer step) would
        otherwise leave stale factors to every later call outside the model's forward (``forward_features``).

        Each call counts one pass whose backward is pending; ``release_batched_factors`` counts it done, after which
        only recomputations use the factors. A recomputed block may read another pending pass's
        factors: with unchanged adapter tensors they hold the same values, and its gradients still flow through its own
        pass's graph (torch takes only the values of what a recomputation saves)."""
        self._pending_passes = self.__dict__.get("_pending_passes", 0) + 1
        self._batched_versions = self._adapter_versions()

    def release_batched_factors(self) -> None:
        """One pass's backward has the factors' gradients: it no longer counts as pending. The factors stay until the
        model's next forward pass replaces them (or they go stale): a graph kept for another backward
        (``retain_graph=True``, ``create_graph=True``) recomputes its blocks from them again, and a recomputation that
        combined its own factors would save other tensors than the forward pass did (torch refuses that)."""
        self._pending_passes = max(0, self.__dict__.get("_pending_passes", 0) - 1)
        if self._pending_passes == 0:
            self._kept_past_backward = True

    def _usable_batched_factors(self) -> Optional[Tuple[Tensor, Tensor]]:
        """The batched factors a call may use: not stale, and once every backward of their passes is done, only in a
        block recomputed inside a later backward through a kept graph. Any other call drops them: a new graph
        recomputes from the factors its own forward pass combined, and a call without grad (``forward_features`` after
        a step) combines the tensors now, which a write through ``.data`` changes without a version to tell."""
        if self._batched_factors is None:
            return None
        if self.stale_batched_factors() and not _inside_backward():
            # inside backward, a block recomputes with the factors its forward pass combined, even from tensors since
            # put back (torch.func.functional_call's): torch refuses a recomputation that saves other tensors
            return None
        if self.__dict__.get("_kept_past_backward") and not _inside_backward():
            self.hold_batched_factors(None)
            return None
        return self._batched_factors

    def stale_batched_factors(self) -> bool:
        """Whether kept factors no longer match the adapter tensors (changed since: their backward never came)."""
        versions = self._batched_versions
        return self._batched_factors is not None and versions is not None and versions != self._adapter_versions()

    @property
    def pending_passes(self) -> int:
        """Forward passes whose backward may still recompute blocks from the batched factors (kept till then)."""
        return self.__dict__.get("_pending_passes", 0)

    def forget_pending_passes(self) -> None:
        """Forget the passes whose backward never came (their factors are stale): the next pass's factors are
        dropped after its own backward."""
        self._pending_passes = 0

    @property
    def unmerged_record(self) -> Optional[List[float]]:
        """While merged: the fingerprint record of the weight without ΔW (taken by ``merge.merge`` before folding ΔW
        in, or by the fingerprint since), as long as the weight is what it was then or a task switch left; None when
        unknown, or once the weight was written otherwise (``copy_``, an optimizer step, a cast, a write through
        ``.data`` that changed its probed values): then weight − ΔW is fingerprinted."""
        kept = self.__dict__.get("_unmerged_record")
        return kept[0] if kept is not None and _same_stamp(kept[1], self._weight_stamp()) else None

    @unmerged_record.setter
    def unmerged_record(self, record: Optional[List[float]]) -> None:
        stamp = self._weight_stamp() if record is not None else None
        self.__dict__["_unmerged_record"] = None if stamp is None else (record, stamp)

    @property
    def cast_rounding(self) -> Optional[torch.dtype]:
        """The 16-bit dtype the weight was rounded to while merged (``merge``, ``bfloat16()``, ``float()``,
        ``unmerge``), as long as the weight is what unmerge left: it differs from the weight before the merge by that
        dtype's rounding, off its grid by ΔW, so the fingerprint holds it to that dtype's tolerance. None otherwise."""
        kept = self.__dict__.get("_cast_rounding")
        return kept[0] if kept is not None and _same_stamp(kept[1], self._weight_stamp()) else None

    @cast_rounding.setter
    def cast_rounding(self, dtype: Optional[torch.dtype]) -> None:
        stamp = self._weight_stamp() if dtype is not None else None
        self.__dict__["_cast_rounding"] = None if stamp is None else (dtype, stamp)

    def _merged_grid(self) -> Optional[torch.dtype]:
        """The 16-bit dtype whose grid holds every sampled value of a wider merged weight (cast there and back while
        merged), None where none does or the sample is too uniform to tell."""
        if self.weight.dtype not in _WIDER or self.weight.is_meta:
            return None
        flat = self.weight.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)]
        if sample.unique().numel() < 32:
            return None
        return next((dtype for dtype in _SIXTEEN_BIT[::-1] if torch.equal(sample.to(dtype).to(sample.dtype), sample)),
                    None)

    def _weight_stamp(self) -> Optional[Tuple[Any, ...]]:
        """What tells whether the weight was written: its version, storage, dtype, device and a few of its values
        (``.data`` has a version of its own); None for a weight that keeps no version (an inference tensor)."""
        weight = self.weight
        if weight.is_inference() or weight.is_meta:
            return None
        flat = weight.detach().reshape(-1)
        probe = flat[:: max(1, flat.numel() // _STAMP_VALUES)][:_STAMP_VALUES].clone()
        return (weight._version, weight.data_ptr(), weight.dtype, weight.device, probe)

    def _adapter_versions(self) -> Tuple[Any, ...]:
        """What kept factors were combined from: each adapter tensor's version, storage, dtype and device (``.data``
        assignment and ``.to()`` bump no version), and the quantisation-aware bits."""
        return (self.quant_bits, *((p._version, p.data_ptr(), p.dtype, p.device)
                                   for p in self.adapter_parameters().values()))

    def __getstate__(self) -> dict:
        # The batched factors belong to one pass's autograd graph, which a copy must not share (nor can deepcopy).
        # The unmerged record's stamp names this weight's storage: the copy stamps its own (``__setstate__``), and
        # marks its own unset tensors (a copy's version counters start afresh).
        unset = None if self.unset_tensors is None else self._unset_names()
        return {**self.__dict__, "_batched_factors": None, "_batched_cast": None, "_batched_versions": None,
                "_pending_passes": 0, "_reading": None, "_merged_flag_version": None, "_unmerged_record": None,
                "_copied_unmerged_record": self.unmerged_record, "_cast_rounding": None,
                "_copied_cast_rounding": self.cast_rounding, "unset_tensors": None if unset is None else {},
                "_copied_unset_names": unset}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if self.merged and self.__dict__.get("_merged_values") is None:
            # pickled before merged layers kept what they merged: the trained tensors are the best record there is
            self._set_merged_update(self.trained_values())
        if "_merged_tensors" not in state:  # pickled before merged layers noted their tensor objects
            self._hold_merged_tensors()
        self._note_merged_flag()  # a copy's flag is a new tensor, its version counted afresh
        # a copy's weight holds the values the record was valid for (a copy fingerprinted weight − ΔW instead)
        self.unmerged_record = self.__dict__.pop("_copied_unmerged_record", None)
        self.cast_rounding = self.__dict__.pop("_copied_cast_rounding", None)
        unset = self.__dict__.pop("_copied_unset_names", None)
        if unset:
            self.unset_tensors = {name: (getattr(self, name), _version_of(getattr(self, name))) for name in unset}

    @property
    def merged(self) -> bool:
        """Whether ΔW is folded into ``weight``; kept as a Python bool too, so forward never reads a device tensor."""
        return self._merged

    @merged.setter
    def merged(self, value: bool) -> None:
        # 0 unmerged; merged: the quantisation-aware bits ΔW was folded in at, 1 without (unmerge must match them).
        # The buffer first: a write that fails leaves both as they were.
        getattr(self, MERGED_FLAG).fill_((self.quant_bits or 1) if value else 0)
        self._merged = bool(value)
        self._hold_merged_tensors()
        self._note_merged_flag()

    def _note_merged_flag(self) -> None:
        """Note the merged flag's version counter (every in-place write bumps it), so that a pass reads the flag's
        value again only after a write (``overwritten_merged_flag``); a flag that already says otherwise than the
        layer (a copy or a cast of one overwritten before) is noted as written, so the next pass reads it."""
        flag = getattr(self, MERGED_FLAG)
        if flag.is_inference() or flag.is_meta:  # these keep no version
            self.__dict__["_merged_flag_version"] = None
            return
        # (to_empty()'s flag holds whatever memory held: its layer refuses passes until values are written, the flag
        # among them, which bumps the version)
        unset = getattr(self, "values_unset", False)
        self.__dict__["_merged_flag_version"] = (
            flag, flag._version if unset or int(flag) == self._own_flag() else -1)

    def _own_flag(self) -> int:
        """What the merged flag says of this layer: 0 unmerged; merged, the quantisation-aware bits ΔW was merged at
        (1 without)."""
        return (self.quant_bits or 1) if self._merged else 0

    def overwritten_merged_flag(self, exact: bool = False) -> Optional[int]:
        """The value the layer's flag was overwritten with since the layer set it, where it no longer says whether
        (and at which bits) this layer merged; else None. timm's ``ModelEmaV3`` and ``ModelEmaV2`` copy every buffer
        of the model they track, the weights with them: into a merged copy (to evaluate the EMA) an unmerged model's
        0, with the weights averaged into W + ½ΔW, whose state dict then loaded as an unmerged one; into an unmerged
        copy a merged model's flag, with the merged weights, to which each pass added ΔW again."""
        noted, flag = self.__dict__.get("_merged_flag_version"), getattr(self, MERGED_FLAG)
        if flag.is_meta or (not exact and (noted is None or noted[0] is not flag or noted[1] == flag._version)):
            return None
        value = int(flag)  # read only after a write, or where ``exact`` asks (a write through .data keeps the version)
        if value == self._own_flag():
            if not flag.is_inference():
                self._note_merged_flag()  # the same value written again (a copy of an equally merged model's)
            return None
        return value

    def require_own_merged_flag(self, action: str, name: str = "", exact: bool = False) -> None:
        """Raise a RuntimeError for ``action`` on a layer whose flag was overwritten since the layer set it
        (``overwritten_merged_flag``; ``exact``: its value read, not its version): its weight was written along with
        it, so it holds no known W (unmerged) or W + ΔW (merged)."""
        value = self.overwritten_merged_flag(exact)
        if value is None:
            return
        says = "unmerged" if value == 0 else "merged at full precision" if value == 1 else f"merged at {value} bits"
        if not self._merged:
            raise RuntimeError(
                f"{name or type(self).__name__} is unmerged, but its {MERGED_FLAG} flag was overwritten since (it now "
                f"says {says}): a copy of a merged model's buffers into it (timm's ModelEmaV3/ModelEmaV2 set() and "
                "update() copy the flag of the model they track, and its merged weights with it). Its weight then "
                f"holds a ΔW that {action} would add again, silently wrong. Load the weights again (load_state_dict "
                "of an unmerged model's state dict, then the adapter); keep the model an EMA tracks unmerged, and "
                "merge a copy of it to evaluate (copy.deepcopy(model))")
        raise RuntimeError(
            f"{name or type(self).__name__} is merged, but its {MERGED_FLAG} flag was overwritten since nv.merge "
            f"(it now says {says}): an EMA update averaging this merged copy with an unmerged model (timm's "
            "ModelEmaV3 copies the flag and averages the weights), or a copy of another model's buffers into it. "
            f"Its weight then holds part of a ΔW, so {action} would be silently wrong. Load the weights again "
            "(load_state_dict of an unmerged model's state dict, then the adapter); to evaluate an EMA merged, "
            "merge a copy of it (copy.deepcopy(ema.module)), not the EMA's own module")

    def _hold_merged_tensors(self) -> None:
        """Note which tensor objects the adapter tensors are while merged: a pass given others of other values
        (``functional_call``, a parameter replaced) would compute the merged ΔW, not theirs, so forward refuses it
        (``_refuse_other_tensors``; ``torch.export`` and ``torch.compile``, which trace stand-ins of the module's own
        tensors, are let through, and equal copies are compared by value)."""
        self._merged_tensors = tuple(self.adapter_parameters().values()) if self._merged else ()

    @classmethod
    def require_config(cls, config: Any, expected: type) -> None:
        """Raise a TypeError unless ``config`` is an ``expected`` (this layer's config class): another method's config
        holds settings this layer would read as its own (a NOLAConfig's rank built a LoRA layer)."""
        if not isinstance(config, expected):
            raise TypeError(f"{cls.__name__} is built from a {expected.__name__}, got a {type(config).__name__}: "
                            "nv.inject(model, config) builds the layer of each config's method")

    @classmethod
    def parameter_shapes(
        cls, config: Any, in_features: int, width: int, num_slices: int
    ) -> Dict[str, Tuple[int, ...]]:
        """Shapes of the trained tensors by parameter name, known before the layer exists."""
        raise NotImplementedError(f"{cls.__name__} does not define parameter_shapes, which every method's layer class "
                                  "does (see the guide 'Adding a method')")

    @classmethod
    def pointless_sizes(cls, config: Any, in_features: int, width: int) -> List[str]:
        """Why the config's sizes are pointless on an ``in_features``→``width`` layer (inject warns with each): a rank
        above min(in, out), which ΔW = A·B cannot reach."""
        rank, most = getattr(config, "rank", None), min(in_features, width)
        if isinstance(rank, int) and rank > most:
            return [f"rank={rank} is above min(in, out)={most}: ΔW = A·B has rank at most {most}, so a larger rank "
                    f"only adds trained values; use rank <= {most}"]
        return []

    @classmethod
    def plan_basis_specs(cls, config: Any, name: str, in_features: int, width: int,
                         slices: Sequence[Slice]) -> Tuple[BasisSpec, ...]:
        """The random bases the layer will use (none by default), known before it exists."""
        return ()

    @classmethod
    def injection_context(cls, config: Any) -> Dict[str, Any]:
        """Keyword arguments shared by every layer of one injection (e.g. NOLA's basis bank)."""
        return {}

    def shared_coefficients(self) -> List[Tuple[BasisSpec, str]]:
        """(shared basis, coefficient parameter name) pairs that model-wide batching may combine for this layer.

        A layer that returns any also has ``bank`` (a ``BasisBank``) and ``shared_chunk``; its factors are
        the combined rows, in this order, viewed by ``as_factors``.
        """
        return []

    def basis_specs(self) -> Tuple[BasisSpec, ...]:
        """Every random basis this layer uses (its fingerprint is recorded in adapter files)."""
        return ()

    def trained(self, name: str, value: Optional[Tensor] = None) -> Tensor:
        """An adapter parameter (or a ``value`` for it) as the forward pass uses it.

        Fake-quantised during quantisation-aware training, decoded in the dtype the factors are computed in (float32
        for a bfloat16 or float16 parameter: what a model loading the file computes with, as its adapter parameters
        are float32). Inside ``delta_factors(values)`` the given values, as they are (they are what a forward pass
        saw, quantised already).
        """
        if value is None:
            reading = self.__dict__.get("_reading")
            if reading is not None:
                return reading[name]
            value = getattr(self, name)
            if self.values_unset and self._holds_no_values(name, value):
                raise ValueError(f"{type(self).__name__} adapter tensor {name} was on the meta device (inject there, "
                                 "or a move there) and has been given no values since, so after to_empty() it holds "
                                 "uninitialised memory: load an adapter (nv.load_adapter, or a state dict holding its "
                                 "tensors), write them in place under torch.no_grad() (copy_; a write through .data, "
                                 "or under inference_mode, goes unseen), or inject into the model once its weights "
                                 "are on a real device")
        return fake_quantize(value, self.quant_bits, factor_dtype(value.dtype)) if self.quant_bits else value

    def trained_values(self) -> Dict[str, Tensor]:
        """Copies of the trained tensors as the forward pass sees them (a few numbers for NOLA, r·(in+out) for LoRA)."""
        return {name: self.trained(name).detach().clone() for name in self.adapter_parameter_names}

    @contextmanager
    def _reading_values(self, values: Dict[str, Tensor]) -> Iterator[None]:
        """Within this block, ``factors()`` combines ``values`` instead of the parameters."""
        devices = {name: getattr(self, name).device for name in self.adapter_parameter_names}
        self.__dict__["_reading"] = {name: value.to(devices[name]) for name, value in values.items()}
        try:
            yield
        finally:
            self.__dict__["_reading"] = None

    def factors(self) -> Tuple[Tensor, Tensor]:
        """A of shape (slices, in, rank) and B of shape (slices, rank, width), without scaling, in any float dtype:
        ``delta_factors_of`` computes in float32, or in float64 when either factor is (``basis.factor_dtype``)."""
        raise NotImplementedError(f"{type(self).__name__} does not define factors, which every method's layer class "
                                  "does (see the guide 'Adding a method')")

    def delta_factors(self, values: Optional[Dict[str, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        """Factors of the whole update, scaling applied: ΔWᵀ = A @ B with A (in, slices·rank), B (slices·rank, out).

        ``values``: trained tensors as a forward pass saw them (``trained_values()``, ``merged_values``), whose update
        to compute instead of the parameters'. B of a layer adapted over its whole width may be the trained parameter
        itself: clone it to keep a snapshot."""
        if values is not None:
            with self._reading_values(values):
                return self.delta_factors_of(self.factors())
        batched = self._usable_batched_factors()
        return self.delta_factors_of(self.factors()) if batched is None else batched

    def delta_factors_of(self, factors: Tuple[Tensor, Tensor]) -> Tuple[Tensor, Tensor]:
        """``delta_factors`` of given factors (A (slices, in, rank), B (slices, rank, width), as ``factors()``)."""
        a, b = factors
        if a.shape != (len(self.slices), self.in_features, self.rank) or b.shape != (len(self.slices), self.rank,
                                                                                      self.width):
            self._refuse_factor_shapes(a, b)
        # Each step asks this of every layer: a dtype comparison in Python, not a dispatched promote_types.
        dtype = factor_dtype(a.dtype if a.dtype == b.dtype else torch.promote_types(a.dtype, b.dtype))
        a, b = a.to(dtype), b.to(dtype)
        if self.whole_width:
            # views, not a[0] and b[0]: their gradients are the same tensors (select's is a zeroed copy, two kernels
            # on a GPU), and one slice needs no permute
            return a.reshape(self.in_features, self.rank) * self.scaling, b.reshape(self.rank, self.out_features)
        num_slices = len(self.slices)
        a = a.permute(1, 0, 2).reshape(self.in_features, num_slices * self.rank) * self.scaling
        # Each slice's B placed in its own output columns: one matmul covers q and v of a fused qkv.
        blocks = [F.pad(b[i], (start, self.out_features - end)) for i, (start, end) in enumerate(self.slices)]
        return a, torch.cat(blocks, dim=0)

    def _refuse_factor_shapes(self, a: Tensor, b: Tensor) -> None:
        """Refuse factors of another layout than ``factors()`` promises (a transposed A reshaped silently into another
        update; other shapes failed deep in torch), naming the method's class."""
        slices, width = len(self.slices), self.width
        raise ValueError(f"{type(self).__name__}.factors() gave A {tuple(a.shape)} and B {tuple(b.shape)}; a layer of "
                         f"{slices} slice(s) of width {width}, {self.in_features} inputs and rank {self.rank} needs A "
                         f"({slices}, {self.in_features}, {self.rank}) and B ({slices}, {self.rank}, {width}): "
                         "(slices, in, rank) and (slices, rank, width), ΔWᵀ = A @ B per slice")

    @torch.no_grad()
    def get_delta_weight(self) -> Tensor:
        """ΔW (out×in, in the factors' dtype): what ``merge`` adds to ``weight``."""
        a, b = self.delta_factors()
        return (a @ b).t()

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, torch.fx.Proxy):
            self._refuse_fx_trace()
        activation = self.input_activation
        placeholder = self.activation_placeholder
        if placeholder is not None and self.activation_owner.act is not placeholder:
            self._refuse_replaced_activation()
        if activation is not None and has_hooks(activation):  # hooks run once, on the output this pass keeps
            x, activation = activation(x), None
        if self.merged:
            tensors, merged_with = self.adapter_parameters().values(), self._merged_tensors
            if not torch.compiler.is_compiling():
                self.require_own_merged_flag("this pass")
            # (torch.export passes fake stand-ins for the layer's own tensors, and traces no function the check's
            # torch.compiler.disable leaves out: nothing to compare there)
            if merged_with is not None and any(p is not q for p, q in zip(tensors, merged_with)) \
                    and not torch.compiler.is_exporting():
                self._require_merged_values(tensors)
            y = F.linear(x if activation is None else activation(x), self.weight, self.bias)
            # torch.func's and forward-mode AD's differentiated tensors need no requires_grad: all are guarded there
            transformed = transforms_active()
            guarded = list(tensors) if transformed else [p for p in tensors if p.requires_grad]
            if not guarded or not (transformed or torch.is_grad_enabled()):
                return y
            return (MergedTangentGuard if transformed else MergedGuard).apply(y, *guarded)
        if not torch.compiler.is_compiling():  # the flag's value is read only after a write to it
            noted = self.__dict__.get("_merged_flag_version")
            if noted is not None and noted[0]._version != noted[1]:
                self.require_own_merged_flag("this pass")
        a, b = self.delta_factors()
        frozen = not (self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad))
        # (TorchScript's tracer records the plain ops below: it cannot trace the training pass's autograd functions)
        if torch.is_grad_enabled() and frozen and not transforms_active() and not torch.jit.is_tracing():
            # The factors in the product's dtype, as it would cast them: cast once per basis for all layers where
            # that was done, else here, so that what the layer keeps for backward never depends on it (a block that
            # checkpointing recomputes after another pass replaced the batched factors keeps what it kept before).
            dtype, cast = product_dtype(x), self.batched_cast
            if cast is not None and cast[0].dtype == dtype and a is self._batched_factors[0]:
                a, b = cast
            else:
                a, b = cast_to(a, dtype), cast_to(b, dtype)
            return low_rank_linear(x, self.weight, self.bias, a, b, activation)
        inputs = x if activation is None else activation(x)
        return add_low_rank_output(F.linear(inputs, self.weight, self.bias), inputs @ a.to(inputs.dtype), b)

    @torch.compiler.disable
    def _require_merged_values(self, tensors: Iterable[Tensor]) -> None:
        """Refuse a merged pass given other tensor objects than those merged unless they hold the merged values; run
        eagerly under torch.compile (a graph break only where other tensors are given), whose guards see no values."""
        if any(is_batched(tensor) for tensor in tensors):  # vmap's: torch.equal has no batching rule
            raise RuntimeError(
                f"{type(self).__name__} is merged, and torch.func.vmap gave it batches of adapter tensors in place of "
                "those merged, which its merged weight would ignore (their values cannot be compared one by one "
                "there). Call nv.unmerge(model) first: unmerged, each pass computes the update from the tensors it "
                "is given")
        if not self._given_merged_values(tensors):
            self._refuse_other_tensors()

    def _given_merged_values(self, tensors: Iterable[Tensor]) -> bool:
        """Whether other tensor objects hold the merged values: accelerate's offload hooks, or a
        ``functional_call`` of the model's own values, put equal copies in place of the parameters each pass."""
        values = self.merged_values or {}
        given = dict(zip(self.adapter_parameter_names, tensors))
        return values.keys() == given.keys() and all(
            tensor.is_meta or torch.equal(tensor.detach(), values[name].to(tensor.device, tensor.dtype))
            for name, tensor in given.items())

    def _refuse_other_tensors(self) -> None:
        """Raise for a merged pass whose adapter tensors are not those merged: its weight holds the ΔW of the ones
        that were, so the tensors given would be silently ignored."""
        names = ", ".join(self.adapter_parameter_names)
        raise RuntimeError(
            f"{type(self).__name__} is merged: its weight holds the ΔW of the adapter tensors ({names}) it had when "
            "merged, and this pass was given tensors of other values in their place (torch.func.functional_call, or "
            "a parameter replaced since), which a merged weight would ignore. Call nv.unmerge(model) first: unmerged, "
            "each pass computes the update from the tensors it is given")

    def _refuse_fx_trace(self) -> None:
        """Refuse ``torch.fx`` symbolic tracing (``symbolic_trace``, timm's ``create_feature_extractor``), which
        cannot trace an adapted layer's pass (it failed inside torch with a bare TraceError), naming what works."""
        raise TypeError(f"torch.fx cannot trace {type(self).__name__} (nola_vision's adapted layers: their pass "
                        "depends on the input's dtype and device and on the layer's state): trace "
                        "nv.merge_and_unload(model) (a plain model of the merged weights; timm's "
                        "create_feature_extractor too), or use torch.export or torch.compile, which trace the model "
                        "as it is")

    def __prepare_scriptable__(self) -> AdaptedLinear:
        """Refuse ``torch.jit.script``, which cannot compile adapted layers (it failed deep inside torch with "Unknown
        type annotation"), naming what works instead."""
        raise TypeError(f"torch.jit.script cannot compile {type(self).__name__} (nola_vision's adapted layers): "
                        "script nv.merge_and_unload(model) (a plain model of the merged weights), or use "
                        "torch.jit.trace(model, example, check_trace=False), torch.export or torch.compile")

    def _replicate_for_data_parallel(self) -> AdaptedLinear:
        # DataParallel's replica gets broadcast copies of the merged tensors after this: nothing to compare them to
        replica = super()._replicate_for_data_parallel()
        replica._merged_tensors = None
        replica.__dict__["_merged_flag_version"] = None
        return replica

    def _refuse_replaced_activation(self) -> None:
        """Raise for an ``mlp.act`` replaced after ``take_activation``: this layer would apply the activation it took
        over on top of the new module's output (GELU(new(h))), a silent change of the model."""
        name = getattr(self.activation_placeholder, "mlp_name", "mlp")
        new, taken = type(self.activation_owner.act).__name__, self.input_activation
        raise ValueError(
            f"{name}.act was replaced after inject (it is now a {new}), but the adapted {name}.fc2 took the "
            f"activation over at inject ({taken}) and applies it itself (recompute_activation=True), so this pass "
            f"would compute {type(taken).__name__}({new}(h)). Call nv.unload(model), which keeps the new {name}.act, "
            f"then inject again (or change activations before inject; with recompute_activation=False inject leaves "
            f"{name}.act in place, and it may be changed afterwards)")

    def _add_low_rank(self, a: Tensor, b: Tensor, into: Optional[Tensor] = None) -> None:
        """weight (or ``into``, shaped as it) += (a b)ᵀ as one addmm (a strided add of a transposed ΔW is ten times
        slower). A float64 weight adds the product formed aside: float64 addmm_ rounds an update added and then
        subtracted unevenly, so merge and unmerge cycles drifted the weight by about 0.7 of its rounding step each.
        Where a factor does not fit the weight's dtype (float16, whose largest value a scaled A can pass while ΔW
        fits: an A of 2e5 for a ΔW of 40 wrote inf into the frozen weight), the sum is formed in float32."""
        weight = self.weight if into is None else into
        left, right = b.t().to(weight.dtype), a.t().to(weight.dtype)
        if _factor_overflows(weight, left, right):
            weight.copy_(_sum_in_float32(weight, a, b))
            return
        if weight.dtype == torch.float64:
            weight.add_(left @ right)
        else:
            weight.addmm_(left, right)

    def _merge_update(self, a: Tensor, b: Tensor, weight: Optional[Tensor] = None) -> Optional[_Rounding]:
        """weight (or ``weight``, a copy of it) += (a b)ᵀ; in a 16-bit dtype, also the entries that subtracting it again
        would not round back to (``_Rounding``: for a trained adapter a few in ten thousand). Each 16-bit rounding of a
        task switch otherwise stayed in the weight: 300 switches among three bfloat16 tasks moved the logits by 14%,
        where a fresh merge rounds once."""
        weight = self.weight if weight is None else weight
        if weight.dtype not in _SIXTEEN_BIT or weight.is_meta:
            self._add_low_rank(a, b, into=weight)
            return None
        before = weight.detach().clone()
        self._add_low_rank(a, b, into=weight)
        back = weight.detach().clone()
        self._add_low_rank(-a, b, into=back)  # what _unmerge_update computes
        lost = torch.ne(back, before).reshape(-1)
        del back
        # Kept in host memory, so a merged model on an accelerator still takes what its base model takes there
        if int(lost.sum()) * 3 > lost.numel():  # positions and values would outgrow a copy
            return _Rounding(None, before.cpu())
        positions = lost.nonzero().squeeze(1)
        values = before[torch.unravel_index(positions, before.shape)]
        narrow = positions.int() if before.numel() <= torch.iinfo(torch.int32).max else positions
        return _Rounding(narrow.cpu(), values.cpu())

    def _as_merged(self, weight: Tensor) -> Optional[Tensor]:
        """``weight`` in the 16-bit dtype it was merged in, where the model was cast since without loss (bfloat16 to
        float32): unmerges and switches then run in that dtype, with the entries the merge kept. None where it was not
        cast, or the cast lost values (the kept entries then no longer apply)."""
        rounding = self.__dict__.get("_rounding")
        if rounding is None or rounding.values.dtype == weight.dtype:
            return None
        merged = weight.detach().to(rounding.values.dtype)
        return merged if torch.equal(merged.to(weight.dtype), weight) else None

    def _unmerge_update(self, a: Tensor, b: Tensor, weight: Optional[Tensor] = None) -> None:
        """weight (or ``weight``, a copy of it) −= (a b)ᵀ: the weight before ``_merge_update``, bit for bit, from the
        entries it kept. They are put back only where the weight (in the dtype it merged in) comes within a few
        rounding steps of them: other weights loaded since keep their values. A weight cast since to a dtype that holds
        its merged values exactly (bfloat16 to float32) is unmerged in the merge's dtype, then cast again."""
        weight = self.weight if weight is None else weight
        rounding = self.__dict__.get("_rounding")
        if rounding is not None and rounding.values.dtype != weight.dtype:  # the model was cast since the merge
            merged = self._as_merged(weight)
            if merged is not None:
                self._unmerge_update(a, b, weight=merged)
                weight.copy_(merged)
                return
            rounding = None
        if rounding is None and weight.dtype in _SIXTEEN_BIT and self.__dict__.get("_merged_in") in _WIDER:
            # cast to 16 bits since a float32 merge: ΔW subtracted in float32 and rounded once (factors rounded to the
            # weight's dtype first moved entries whose rank terms cancel by tens of its steps). A merge of unknown
            # dtype (a merged state dict loaded) is taken as the weight's: subtracted as a 16-bit merge adds
            weight.copy_(_sum_in_float32(weight, -a, b))
            return
        if rounding is None or (rounding.positions is not None and not rounding.positions.numel()):
            self._add_low_rank(-a, b, into=weight)
            return
        if rounding.positions is None:
            where = (...,)
        else:
            where = torch.unravel_index(rounding.positions.to(weight.device, torch.int64), weight.shape)
        merged = weight[where].float()
        self._add_low_rank(-a, b, into=weight)
        kept = rounding.values.to(weight.device)
        # a rounding step of the merged value or of the kept one (a ΔW larger than the weight there): four of either
        scale = torch.maximum(merged.abs(), kept.float().abs()) + torch.finfo(kept.dtype).tiny
        if bool(((weight[where].float() - kept.float()).abs() <= 4 * torch.finfo(kept.dtype).eps * scale).all()):
            weight[where] = kept

    @torch.no_grad()
    def exact_unmerged_weight(self) -> Optional[Tensor]:
        """While merged in 16 bits, with the entries that merge kept still applying (the weight not cast since, or
        cast without loss, bfloat16 to float32): a copy of the weight as ``unmerge`` would leave it, bit for bit the
        weight before the merge; the layer is unchanged. None otherwise (weight − ΔW is known to a rounding only)."""
        rounding = self.__dict__.get("_rounding")
        if not self.merged or rounding is None:
            return None
        if rounding.values.dtype != self.weight.dtype and self._as_merged(self.weight) is None:
            return None
        weight = self.weight.detach().clone()
        self._unmerge_update(*self.merged_delta_factors(), weight=weight)
        return weight

    @torch.no_grad()
    def switch_overflow(self, old: Tuple[Tensor, Tensor], new: Tuple[Tensor, Tensor]) -> Optional[str]:
        """Why ``replace_merged_delta(old, new)`` would leave the weight dtype's range, or None: a float16 weight is
        unmerged first, so the new update is checked against the weight as unmerge gives it back."""
        if not (self.merge_can_overflow and self.weight.dtype in _SIXTEEN_BIT):
            return self.low_rank_overflow(torch.cat([new[0], -old[0]], dim=1), torch.cat([new[1], old[1]], dim=0))
        weight = self.weight.detach().clone()
        self._unmerge_update(*old, weight=weight)
        return self.low_rank_overflow(*new, weight=weight)

    @property
    def merge_can_overflow(self) -> bool:
        """Whether a merged update can leave the weight dtype's range (float16, the 8-bit floats): only then is
        ``low_rank_overflow`` worth its factors. A weight on the meta device has no values to leave a range."""
        return narrow_range(self.weight)

    @torch.no_grad()
    def low_rank_overflow(self, a: Tensor, b: Tensor, weight: Optional[Tensor] = None) -> Optional[str]:
        """Why weight (or ``weight``, shaped as it) + (a b)ᵀ would not be finite in the weight's dtype, or None: a merge
        in a dtype of narrow range (float16: up to 65,504) can leave it, one of wide range (float32) with factors far
        beyond a trained adapter's (finite factors, an infinite product), and an infinite weight cannot be unmerged.

        A bound first (the largest |W| plus the largest row norm of ``a`` times column norm of ``b``), so a weight is
        read once, and in a dtype of wide range only when the factors' part alone nears it; only near the range is the
        sum formed aside. A weight that is not finite already is not blamed.
        """
        weight = self.weight if weight is None else weight
        if weight.is_meta:
            return None
        largest = torch.finfo(weight.dtype).max
        norms = float(a.double().norm(dim=1).max() * b.double().norm(dim=0).max()) if a.numel() and b.numel() else 0.0
        if norms < largest * 2.0 ** -20 and not narrow_range(weight):
            return None  # only a weight within a millionth of its dtype's largest value could leave it
        bound = float(weight.abs().max()) + norms  # faster than vector_norm(inf) on the CPU, in float16 too
        if bound < 0.99 * largest:  # 1% for float16's rounding of the sum
            return None
        left, right = b.t().to(weight.dtype), a.t().to(weight.dtype)  # as _add_low_rank adds them
        if _factor_overflows(weight, left, right):
            total = _sum_in_float32(weight, a, b)
        else:
            total = torch.addmm(weight, left, right)
        if bool(torch.isfinite(total).all()) or not bool(torch.isfinite(weight).all()):
            return None
        delta = (b.t().double() @ a.t().double()).abs().max().item()
        span = f"±{largest:,.0f}" if largest < 1e6 else f"±{largest:.4g}"
        return (f"its ΔW (entries up to {delta:.4g}) added to its {weight.dtype} weight would leave {weight.dtype}'s "
                f"range ({span})")

    @property
    def merged_values(self) -> Optional[Dict[str, Tensor]]:
        """While merged: the trained tensors whose ΔW is in ``weight``, as the forward pass saw them; else None.

        Whatever happens to the parameters meanwhile (an optimizer step, an in-place edit), unmerge and task switches
        subtract the update of these values: exactly what merge added (the weights then come back within one
        rounding step of their dtype)."""
        return self.__dict__.get("_merged_values") if self.merged else None

    def changed_since_merge(self) -> List[str]:
        """While merged: the adapter tensors (by name) whose values changed since the merge (an EMA or optimizer step,
        an in-place edit; a cast of the model is no change), so that ``weight`` holds another update than they give;
        else none."""
        merged = self.merged_values
        if merged is None:
            return []
        current = self.trained_values()
        return [key for key, value in merged.items() if not _same_up_to_a_cast(value, current[key])]

    def changed_by_a_cast_note(self) -> str:
        """Where ``changed_since_merge`` may name tensors no one changed, the clause that says why (quantisation-aware
        training: a cast of the model quantises each tensor anew on the range it gives it), else ""."""
        return (f" (under quantisation-aware training at {self.quant_bits} bits a cast of the model moves them too: "
                "each tensor is quantised anew on the range the cast gives it)" if self.quant_bits else "")

    @property
    def keeps_merged_factors(self) -> bool:
        """Whether ``merged_delta_factors()`` returns the factors this layer added (no bases are combined for it)."""
        return self.merged and self.__dict__.get("_merged_factors") is not None

    def merged_delta_factors(self) -> Tuple[Tensor, Tensor]:
        """``delta_factors`` of what is merged into ``weight`` (``merged_values``): the very factors that were added
        when this layer merged them (unmerge and switches then subtract bit for bit what was added, without combining
        the bases again), else computed from ``merged_values`` (a merged state dict or pickle)."""
        values = self.merged_values
        if values is None:
            raise RuntimeError(f"{type(self).__name__} is not merged: it has no merged update")
        factors = self.__dict__.get("_merged_factors")
        if factors is None:
            return self.delta_factors(values)
        return factors[0].to(self.weight.device), factors[1].to(self.weight.device)

    def _set_merged_update(self, values: Optional[Dict[str, Tensor]],
                           factors: Optional[Tuple[Tensor, Tensor]] = None, rounding: Optional[_Rounding] = None,
                           dtype: Optional[torch.dtype] = None) -> None:
        """Record what is merged: the trained ``values`` and, when known, the ``factors`` added to the weight
        (``_owned`` copies, made before the weight was written), the ``rounding`` that unmerging them would not undo,
        and the ``dtype`` the weight had when they were added. Only assignments: nothing here fails after a write."""
        self._merged_values = values
        self._merged_factors = factors
        self._rounding = rounding
        self._merged_in = dtype

    def _scratch_weight(self) -> Optional[Tensor]:
        """A copy of a 16-bit weight for a merge or unmerge to compute in (it takes several writes and allocations),
        then copied in as one write; None where one in-place op writes the weight (float32, float64, meta): either
        way a failure (out of memory) leaves the weight as it was, never written with its flag and record unset."""
        weight = self.weight
        return weight.detach().clone() if weight.dtype in _SIXTEEN_BIT and not weight.is_meta else None

    @torch.no_grad()
    def merge(self, factors: Optional[Tuple[Tensor, Tensor]] = None,
              values: Optional[Dict[str, Tensor]] = None) -> None:
        """Fold ΔW into ``weight`` for inference at the base layer's cost, keeping the trained tensors it came from.

        ``factors``: ``delta_factors()`` of the trained tensors now, when model-level code computed them already
        (``merge.merge`` checks them for overflow first), or of ``values`` (an unmerge undone: what it had merged)."""
        if not self.merged:
            values = self.trained_values() if values is None else values  # what the factors are combined from
            factors = self.delta_factors() if factors is None else factors
            kept, scratch = _owned(factors), self._scratch_weight()  # allocated before the weight is written
            rounding = None if scratch is None else self._merge_update(*factors, weight=scratch)
            # the weight, its merged flag and its record change together: the flag and the record first, then the
            # weight's one write, last; if anything fails, the flag and the record are set back
            with interrupts_deferred():
                try:
                    self.merged = True
                    self._set_merged_update(values, kept, rounding, self.weight.dtype)
                    if scratch is None:
                        self._merge_update(*factors)
                    else:
                        self.weight.copy_(scratch)
                except BaseException:
                    self.merged = False
                    self._set_merged_update(None)
                    raise

    @torch.no_grad()
    def unmerge(self, factors: Optional[Tuple[Tensor, Tensor]] = None) -> None:
        """Subtract the merged ΔW again (exact up to one float rounding per weight).

        ``factors``: ``merged_delta_factors()`` computed by model-level code (``merge.unmerge`` combines the shared
        bases of every layer at once)."""
        if self.merged:
            self.require_own_merged_flag("unmerge", exact=True)
            factors = self.merged_delta_factors() if factors is None else factors
            grid = self._merged_grid()
            scratch = self._scratch_weight()
            if scratch is not None:
                self._unmerge_update(*factors, weight=scratch)
            with interrupts_deferred():  # the weight and its merged flag change together (then the record goes)
                try:
                    self.merged = False
                    if scratch is None:
                        self._unmerge_update(*factors)  # one write, last (a cast weight's is computed aside first)
                    else:
                        self.weight.copy_(scratch)
                except BaseException:
                    self.merged = True
                    raise
                self._set_merged_update(None)  # what an unmerged layer reads of it: nothing (merged_values is None)
                self.unmerged_record = None
                self.cast_rounding = grid

    @torch.no_grad()
    def replace_merged_delta(self, old: Tuple[Tensor, Tensor], new: Tuple[Tensor, Tensor],
                             values: Optional[Dict[str, Tensor]] = None,
                             record: Optional[List[float]] = None) -> None:
        """On a merged layer, weight += ΔW_new − ΔW_old: a switch between tasks. A float32 or float64 weight takes it
        as one rank-2r update (rounded once); a 16-bit one is unmerged, then merged again (``_merge_update``), so its
        weight is that of a fresh merge of the new task, however many switches came before. So is a weight merged in
        16 bits and cast since without loss (bfloat16 to float32): it switches in the merge's dtype.

        ``old`` must be ``merged_delta_factors()``; ``new`` the update of ``values`` (default: the trained tensors
        now), which become what is merged. ``record``: the fingerprint record of the weight without ΔW (default: the
        layer's now; a switch undone passes the one from before it)."""
        self.require_own_merged_flag("a task switch", exact=True)
        record = self.unmerged_record if record is None else record  # a switch leaves the weight without ΔW as it was
        values = self.trained_values() if values is None else values
        with interrupts_deferred():  # the weight and the record of what it merged change together
            self._switch_merged_delta(old, new, values)
            self.unmerged_record = record

    def _switch_merged_delta(self, old: Tuple[Tensor, Tensor], new: Tuple[Tensor, Tensor],
                             values: Dict[str, Tensor]) -> None:
        # Everything is computed aside (a copy of the weight, the joined factors), then written in one op, last.
        kept = _owned(new)
        # Merged in 16 bits, then cast without loss to a dtype of wider range (float32): switched in the merge's dtype,
        # unless the new update leaves it (float16), which the weight's own dtype then takes.
        wide = self.weight.dtype not in _SIXTEEN_BIT and not self.merge_can_overflow
        merged = self._as_merged(self.weight) if wide else None
        if merged is not None:
            self._unmerge_update(*old, weight=merged)
            if self.low_rank_overflow(*new, weight=merged) is None:
                rounding = self._merge_update(*new, weight=merged)
                self._recorded_write(lambda: self.weight.copy_(merged), values, kept, rounding, merged.dtype)
                return
            scratch = merged.to(self.weight.dtype)
            self._add_low_rank(*new, into=scratch)
            self._recorded_write(lambda: self.weight.copy_(scratch), values, kept, None, self.weight.dtype)
            return
        scratch = self._scratch_weight()
        if scratch is not None:
            self._unmerge_update(*old, weight=scratch)
            rounding = self._merge_update(*new, weight=scratch)
            self._recorded_write(lambda: self.weight.copy_(scratch), values, kept, rounding, self.weight.dtype)
            return
        a, b = torch.cat([new[0], -old[0]], dim=1), torch.cat([new[1], old[1]], dim=0)
        self._recorded_write(lambda: self._add_low_rank(a, b), values, kept, None, self.weight.dtype)

    def _recorded_write(self, write: Callable[[], Any], values: Dict[str, Tensor], factors: Tuple[Tensor, Tensor],
                        rounding: Optional[_Rounding], dtype: torch.dtype) -> None:
        """Record a switch's new merged update, then run ``write``, the weight's one write: the record is set back if
        it fails, so the record names the update the weight holds (which undoing a switch reads)."""
        before = tuple(self.__dict__.get(key) for key in ("_merged_values", "_merged_factors", "_rounding",
                                                           "_merged_in"))
        self._set_merged_update(values, factors, rounding, dtype)
        try:
            write()
        except BaseException:
            self._set_merged_update(*before)
            raise

    def unstored_state(self) -> List[str]:
        """Keys of this layer's state dict that adapter files do not store: all but the frozen weight and bias, the
        merged flag, the identity entry, the trained tensors and a taken-over activation (the backbone's). A method
        regenerates what else it needs from its config and registers it with ``persistent=False``."""
        kept = {"weight", "bias", MERGED_FLAG, IDENTITY_KEY, *self.adapter_parameter_names}
        self.__dict__["_listing_keys"] = True  # the keys only: no state dict to refuse (``_save_to_state_dict``)
        try:
            keys = self.state_dict(keep_vars=True)
        finally:
            self.__dict__.pop("_listing_keys", None)
        return sorted(key for key in keys if key not in kept and not key.startswith("input_activation."))

    def adapter_parameters(self) -> Dict[str, nn.Parameter]:
        """The trained tensors of this layer by parameter name."""
        return {name: getattr(self, name) for name in self.adapter_parameter_names}

    def _save_to_state_dict(self, destination: Dict[str, Any], prefix: str, keep_vars: bool) -> None:
        """``Module._save_to_state_dict``, refused while the adapter tensors hold no values (``values_unset``): a
        state dict of them, loaded elsewhere, would pass for trained tensors (a checkpoint of the model too)."""
        if self.holds_unset_values():
            raise ValueError(f"{prefix[:-1] or type(self).__name__}: its adapter tensors were on the meta device "
                             "(inject there, or a move there) and given no values since, so they hold uninitialised "
                             "memory, which a state dict would pass on as trained tensors: load an adapter first "
                             "(nv.load_adapter, or a state dict holding its tensors)")
        # by the flag's version, as a pass: an EMA (timm's ModelEmaV3) takes a state dict every step, and reading the
        # flag itself would wait for the device once per layer
        self.require_own_merged_flag("a state dict of it", prefix[:-1])
        changed = [] if self.__dict__.get("_listing_keys") else self.changed_since_merge()
        if changed:
            raise ValueError(f"{prefix[:-1] or type(self).__name__} is merged, and its {', '.join(changed)} changed "
                             f"since nv.merge{self.changed_by_a_cast_note()}, so its weight holds the update of the "
                             "values merged then: a state dict of the new values beside that weight would load as "
                             "their merge (its unmerge then off by the difference). Call nv.unmerge(model) first "
                             "(nv.merge again to evaluate the new values), or undo the change")
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def holds_unset_values(self) -> bool:
        """Whether the adapter tensors hold uninitialised memory: made (or moved) on the meta device and given no
        values since, then materialised (``to_empty()``); on the meta device they hold nothing to compute with."""
        return not any(p.is_meta for p in self.adapter_parameters().values()) and bool(self._unset_names())

    def _unset_names(self, with_meta: bool = False) -> List[str]:
        """The adapter tensors (by name) that hold no values (``_holds_no_values``), and with ``with_meta`` those on the
        meta device too; none once the layer's values are set."""
        if not self.values_unset:
            return []
        return [name for name, value in self.adapter_parameters().items()
                if (with_meta and value.is_meta) or self._holds_no_values(name, value)]

    def _holds_no_values(self, name: str, value: Tensor) -> bool:
        """Whether ``value``, used as adapter tensor ``name`` of a layer whose values are unset, is one that to_empty()
        made, unwritten since: a tensor passed in its place (functional_call over a meta copy of the model) holds its
        own values, and one written in place (``copy_``) has been given them."""
        if value.is_meta:
            return False
        if self.unset_tensors is None:
            return True
        marked, version = self.unset_tensors.get(name, (None, None))
        return marked is value and _version_of(value) == version

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> AdaptedLinear:
        """``Module._apply`` (``.to()``, ``to_empty()``, ...), marking the adapter tensors unset once moved to the meta
        device: they hold no values there, nor after a later ``to_empty()``, which makes the tensors it marks."""
        unset = self._unset_names(with_meta=True)
        module = super()._apply(fn, recurse)
        parameters = self.adapter_parameters()
        if any(parameter.is_meta for parameter in parameters.values()):
            self.values_unset = True
            self.unset_tensors = {}
        elif unset:
            self.unset_tensors = {name: (parameters[name], _version_of(parameters[name])) for name in unset}
        self._hold_merged_tensors()  # where the conversion made new parameter objects, those are the merged ones
        self._note_merged_flag()
        return module

    def identity(self) -> Dict[str, Any]:
        """What identifies this layer's update besides its trained tensors: method, output slices, rank, scaling,
        random bases (seed, stream, shape, count) and the bits of quantisation-aware training, which change the
        update the tensors give. Trained tensors of another identity mean another update."""
        return {"method": type(self).__name__, "slices": [list(s) for s in self.slices], "rank": self.rank,
                "scaling": float(self.scaling),
                "bases": [[spec.seed, spec.stream, list(spec.shape), spec.count] for spec in self.basis_specs()],
                "quant_bits": self.quant_bits}

    def follow_float64_weight(self) -> None:
        """Give a float64 layer's adapter tensors float64, as inject-then-``.double()`` would: float32 ones would
        round every update and gradient of a model cast to float64 first."""
        if self.weight.dtype == torch.float64:
            for parameter in self.adapter_parameters().values():
                if parameter.is_floating_point():
                    parameter.data = parameter.data.to(torch.float64)

    def note_injected_identity(self) -> None:
        """Record the update identity inject made the layer with (its quantisation-aware bits aside, which
        ``set_quantization_aware`` changes): ``require_injected_identity`` compares against it."""
        self.__dict__["injected_identity"] = {k: v for k, v in self.identity().items() if k != "quant_bits"}

    def require_injected_identity(self, name: str) -> None:
        """Raise if the layer's update identity changed after inject (``layer.scaling *= 2``): files record the
        config's values, so its tensors would save, or switch in, as another update than the model computes."""
        injected = self.__dict__.get("injected_identity")  # None in layers pickled before it was recorded
        current = self.identity()
        changed = [f"{key} is {current[key]!r}, injected as {value!r}" for key, value in (injected or {}).items()
                   if current.get(key) != value]
        if changed:
            raise ValueError(f"adapted layer {name} changed after inject ({'; '.join(changed)}): adapter files record "
                             "the config's values, so its tensors would save or load as another update than the "
                             "model computes; set it back, or re-inject with a config that gives it (nv.unload(model), "
                             "then nv.inject(model, config))")

    def get_extra_state(self) -> Tensor:
        """The layer's ``identity()`` as JSON bytes in a uint8 tensor: a state dict then says what its adapter tensors
        belong to, and stays a dict of tensors (safetensors)."""
        data = json.dumps(self.identity(), sort_keys=True, separators=(",", ":")).encode()
        return torch.tensor(list(data), dtype=torch.uint8)

    def set_extra_state(self, state: Any) -> None:
        """Nothing to set: the identity follows from the layer, and ``_load_from_state_dict`` compared it already."""

    def _identity_mismatch(self, state: Any, name: str, compare_bits: bool = True) -> Optional[str]:
        """Why a state dict's identity entry does not describe this layer's update, or None when it does."""
        try:
            saved = json.loads(bytes(state.detach().cpu().to(torch.uint8).reshape(-1).tolist()).decode())
            if not isinstance(saved, dict):
                raise ValueError
        except (ValueError, TypeError, AttributeError, RuntimeError, NotImplementedError):
            return f"{name}: the state dict's {IDENTITY_KEY} entry is not an adapter identity (damaged or not this " \
                   f"library's; an average of state dicts must leave the {IDENTITY_KEY} entries out and copy them " \
                   "from one of them)"
        own = self.identity()
        if "quant_bits" not in saved or not compare_bits:  # unknown (saved before they were recorded), or compared
            own.pop("quant_bits")                            # by the merged flag, which records them too
            saved.pop("quant_bits", None)
        if saved.get("quant_bits") != own.get("quant_bits") and {**saved, "quant_bits": None} == {**own,
                                                                                                  "quant_bits": None}:
            trained, here = saved["quant_bits"], own["quant_bits"]
            return (f"{name}: the state dict's adapter tensors were trained "
                    f"{f'quantisation-aware at {trained} bits' if trained else 'at full precision'}, and this model "
                    f"is set to {f'{here} bits' if here else 'full precision'}, so they would give another update: "
                    f"call nv.set_quantization_aware(model, {trained}) before loading it (then "
                    f"nv.set_quantization_aware(model, {here}) to train on from there at this model's setting)")
        differ = []
        for key in sorted(set(own) | set(saved)):
            if key == "bases" and saved.get(key) != own.get(key):
                differ += [f"{field} {_bases_field(saved.get(key), i)} (this model: {_bases_field(own.get(key), i)})"
                           for i, field in enumerate(("seed", "basis streams", "basis shapes", "number of bases"))
                           if _bases_field(saved.get(key), i) != _bases_field(own.get(key), i)]
            elif saved.get(key) != own.get(key):
                differ.append(f"{key} {saved.get(key)} (this model: {own.get(key)})")
        if not differ:
            return None
        return (f"{name}: the state dict's adapter tensors belong to another update: {'; '.join(differ)}. Its "
                "coefficients would apply to other bases, slices or scaling: inject this model with the config the "
                "state dict was saved with (method, targets, rank, scale, seed, basis), or move adapters with "
                "nv.save_adapter/nv.load_adapter")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Load the merged flag with the weight it describes, so a merged state dict never adds ΔW twice, and refuse
        adapter tensors of another update (``identity()``).

        A state dict without the flag (a plain model's, e.g. pretrained weights) holds unmerged weights. A
        merged layer needs its weight and adapter tensors from one state dict, or it refuses to load. A state dict
        without the identity entry (a plain model's, or saved before it existed) loads unchecked; where it holds adapter
        tensors, ``unchecked_load`` says so until the model-level load post-hook has warned.
        """
        refusal = self.load_refusal(state_dict, prefix)
        if refusal is not None:
            error_msgs.append(refusal)
            return
        identity, flag, loads, merged = self._state_entries(state_dict, prefix)
        # the weight the kept rounding entries belong to (a 16-bit merged layer's): they hold only for that weight
        kept_for = self.weight.detach().clone() if self.merged and self.__dict__.get("_rounding") else None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for key, present in ((MERGED_FLAG, flag is not None), (IDENTITY_KEY, identity is not None)):
            if not present and prefix + key in missing_keys:
                missing_keys.remove(prefix + key)  # plain models' and older state dicts have neither entry
        loaded_adapter = all(loads[1:])
        if loaded_adapter:
            self.values_unset = False
        # adapter tensors whose identity nothing checked (inject's load post-hook warns once per load)
        self.unchecked_load = identity is None and any(loads[1:])
        self.unflagged_load = self.unchecked_load and flag is None and loads[0]
        self.merged = merged
        if not merged:
            self._set_merged_update(None)
        elif loaded_adapter:
            # The loaded weight holds the saved model's ΔW, that of the trained tensors loaded with it (the state dict
            # of a merged model is taken in one go): those are what is merged now, whatever this model had merged.
            values, previous = self.trained_values(), self.__dict__.get("_merged_values")
            if previous is not None and previous.keys() == values.keys() and all(
                    torch.equal(previous[key].to(value.device), value) for key, value in values.items()):
                self._merged_values = values  # the same update loaded back: the factors it kept hold
                if kept_for is None or not torch.equal(kept_for, self.weight):
                    self._rounding = None  # another weight (another model's): its rounding was not kept
            else:
                self._set_merged_update(values)
        # else nothing of this layer's update was loaded: what this model merged stays merged
        self.unmerged_record = None  # other weights: a merged one is fingerprinted from its weight minus ΔW

    def load_refusal(self, state_dict: Dict[str, Any], prefix: str) -> Optional[str]:
        """Why this layer refuses its entries of ``state_dict`` (under ``prefix``), or None: adapter tensors of another
        update (``identity()``), a weight merged at other quantisation-aware bits, or a merged (unmerged) state without
        the weight and adapter tensors it needs. The model's load pre-hook asks every layer before anything loads."""
        name = prefix[:-1] or type(self).__name__
        identity, flag, loads, merged = self._state_entries(state_dict, prefix)
        merged_state = flag is not None and bool(flag)  # its flag records the bits ΔW was merged at, checked below
        mismatch = self._identity_mismatch(identity, name, not merged_state) if identity is not None else None
        if mismatch is not None:
            return mismatch
        folded_bits = (int(flag) if int(flag) > 1 else None) if merged and flag is not None else self.quant_bits
        if folded_bits != self.quant_bits:
            return (f"{name}: the state dict's weight holds ΔW merged "
                    f"{f'at {folded_bits} bits (quantisation-aware)' if folded_bits else 'at full precision'}, this "
                    f"model is set to {f'{self.quant_bits} bits' if self.quant_bits else 'full precision'}, so "
                    f"unmerge would subtract another ΔW: call nv.set_quantization_aware(model, {folded_bits}) before "
                    "loading it, or nv.unmerge before state_dict()")
        # Merged: ΔW of exactly these coefficients is in exactly this weight. Unmerged: the weight is a plain one.
        consistent = (all(loads) or (not any(loads) and self.merged)) if merged else (loads[0] or not self.merged)
        if not consistent:
            return (f"{name}: the state dict is {'' if merged else 'un'}merged but does not hold the layer's weight "
                    "with its adapter tensors, so ΔW would be lost or added twice: call nv.unmerge(model) before "
                    "state_dict() (and before loading into a merged model), or load the full state dict")
        return None

    def _state_entries(self, state_dict: Dict[str, Any], prefix: str) -> Tuple[Any, Any, List[bool], bool]:
        """This layer's identity entry and merged flag in ``state_dict`` (None where absent), whether it holds the
        weight and each adapter tensor, and whether loading it leaves the layer merged (no flag: merged only where it
        loads no weight and the layer is merged now)."""
        identity, flag = state_dict.get(prefix + IDENTITY_KEY), state_dict.get(prefix + MERGED_FLAG)
        loads = [prefix + key in state_dict for key in ("weight", *self.adapter_parameter_names)]
        merged = bool(flag) if flag is not None else (False if loads[0] else self.merged)
        return identity, flag, loads, merged

    def extra_repr(self) -> str:
        slices = "" if self.whole_width else f", slices={list(self.slices)}"
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}{slices}"


def _owned(factors: Tuple[Tensor, Tensor]) -> Tuple[Tensor, Tensor]:
    """Copies of factors with their own storage, as a merged layer keeps them: a shared-basis batch's rows are views of
    every layer's, and B may be a parameter."""
    return factors[0].detach().clone(), factors[1].detach().clone()


def _bases_field(bases: Any, index: int) -> Any:
    """One field of every basis in an ``identity()``'s bases (for naming what differs)."""
    return [entry[index] if isinstance(entry, list) and len(entry) > index else None for entry in bases or []]


def _inside_backward() -> bool:
    """Whether this code runs inside a backward pass (a block recomputed by gradient checkpointing)."""
    return torch._C._current_graph_task_id() != -1


def as_factors(layer: AdaptedLinear, a_rows: Tensor, b_rows: Tensor) -> Tuple[Tensor, Tensor]:
    """Combined basis rows viewed as the layer's factors: A (slices, in, rank), B (slices, rank, width)."""
    num_slices = len(layer.slices)
    return a_rows.view(num_slices, layer.in_features, layer.rank), b_rows.view(num_slices, layer.rank, layer.width)


def _version_of(tensor: Tensor) -> Optional[int]:
    """The tensor's version counter, which in-place writes advance; None for an inference tensor, which has none."""
    return None if tensor.is_inference() else tensor._version


STATE_ATTRIBUTE = "nola_adapter"  # the attribute ``nv.inject`` gives the model it adapts (its ``AdapterState``)


def adapted_layers(model: nn.Module) -> Dict[str, AdaptedLinear]:
    """Every adapter layer of the model by module name."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"nv.adapted_layers takes a model (a torch.nn.Module), got a {type(model).__name__}")
    return {name: m for name, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def is_injected(model: nn.Module) -> bool:
    """Whether ``model`` or a module in it went through ``nv.inject`` (a linear probe or full fine-tuning adapts no
    layer) or holds adapter layers."""
    return any(hasattr(module, STATE_ATTRIBUTE) or isinstance(module, AdaptedLinear) for module in model.modules())


class _RetakingHandle(RemovableHandle):
    """A hook's handle on an adapted layer: removing it removes the hook, then lets the layer take its activation
    over again once no such hook is left (``AdaptedLinear._hook_removed``)."""

    def __init__(self, handle: RemovableHandle, layer: AdaptedLinear) -> None:
        self.__dict__.update(handle.__dict__)  # the same hooks dict, id and extra dicts
        self.layer_ref = weakref.ref(layer)

    def remove(self) -> None:
        super().remove()
        layer = getattr(self, "layer_ref", lambda: None)()  # an unpickled handle holds no layer
        if layer is not None:
            layer._hook_removed(self.id)


def _same_up_to_a_cast(merged: Tensor, current: Tensor) -> bool:
    """Whether ``current`` is exactly ``merged`` cast to its dtype, maybe by way of one or both 16-bit dtypes (a model
    cast to half, then bfloat16, then back after the merge). A small step (an EMA update of 0.5 %) is no cast: it
    passed a tolerance of one bfloat16 step."""
    merged = merged.to(current.device)
    for route in ((), (torch.bfloat16,), (torch.float16,), (torch.float16, torch.bfloat16),
                  (torch.bfloat16, torch.float16)):
        cast = merged
        for dtype in (*route, current.dtype):
            cast = cast.to(dtype)
        if torch.equal(cast, current):
            return True
    return False
