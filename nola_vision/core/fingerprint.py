"""Which frozen weights a model has: a fingerprint robust to dtype, and the adapters merged into them.

An adapter only gives its outputs on the frozen weights it was trained on. Per module, the fingerprint holds the
norm and ``SKETCHES`` random ±1 projections of a fixed sample of its frozen parameters (float64, signs from the
portable generator of ``basis``). Projections are linear, so the root mean square of the differences of two
fingerprints estimates the norm of the difference of the weights (Johnson–Lindenstrauss). Two modules match when
that estimate stays below a tolerance of their norm set by the coarser precision the two sides' weights are held at,
record by record (``record_precisions``: the precision that holds most of a record's values, so a module loaded from
bfloat16 values among float32 ones loosens only its own check; ``_tolerance``): ``TOLERANCE`` (2⁻⁶ ≈ 1.6 %) where
either is bfloat16 (a copy moves each weight by at most 2⁻⁸ of its value), 2⁻⁸ for float16 (2⁻¹¹), and for float32
what the records' own rounding allows (2⁻¹¹ ≈ 0.05 %, 2⁻⁹ for the packed ``context``), so that a few steps of
fine-tuning (0.1–1 % of a weight's norm) are told apart as surely as another pretrained tag or a random init (tens
of per cent). Fingerprints without a ``precision`` (files before 2026-12-06) match within ``TOLERANCE``. A change
below the tolerance, or confined to weights outside the sample, is not seen; ``merge_and_unload`` therefore also
records what it folded in (``merged_adapters``), and ``holds_update`` tells an adapter's own update, folded in where
that record was lost (a state dict), from rounding.

Adapter files name the records of the layers they adapt and the norm the head reads; every other frozen module
their outputs depend on (patch embedding, attention, norms) is recorded too, packed without names in name order
(``context``: 24 bytes a module, so a ViT-B NOLA file grows by 1.6 KB instead of 6.5 KB). Norm layers that keep
running statistics (hybrid ViTs' batch norms) are recorded by them too (``statistics``): they are buffers, which a
forward pass in train mode changes, and the outputs depend on them as on weights. Other persistent floating-point
buffers (a wrapper's normalisation constants) are recorded per module holding them, packed as context is
(``buffers``).
"""
from __future__ import annotations

import base64
import functools
import hashlib
import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm as LegacySpectralNorm

from .basis import random_bits
from .checks import is_finite_number
from .layer import AdaptedLinear, adapted_layers
from .plan import InjectionPlan
from .targets import classifier_head

__all__ = ["CONTEXT_FIELDS", "FINGERPRINT_FIELDS", "FINGERPRINT_VERSION", "HEAD_INPUTS", "MERGED_ATTRIBUTE",
           "MERGED_PROBES_ATTRIBUTE", "PACKED_TOLERANCE", "PRECISIONS_FIELDS", "RECORD_TOLERANCE", "RUNNING_STATISTICS",
           "TOLERANCE",
           "adapter_fingerprint", "buffer_modules", "buffer_records", "context_modules", "differing_buffers",
           "differing_module", "differing_positions", "differing_records", "differing_statistics", "frozen_buffers",
           "frozen_fingerprint", "frozen_modules", "frozen_records", "held_precision",
           "holds_update", "is_context", "is_positions", "is_precision", "is_precisions", "is_statistics",
           "merge_probes", "merged_adapters", "merges_held", "missing_merges", "position_records", "record_merged",
           "record_precisions", "recorded_merges", "running_statistics", "sample_sizes", "statistics_layers",
           "statistics_records", "tensors_sha256", "unexpected_merges", "unmatched_merges", "unmerged_probes"]

FINGERPRINT_VERSION = "sample16384-sign8-float64-v1"
# The entries of a fingerprint and of its ``context``: a reader refuses others, which a newer version's checks would be.
FINGERPRINT_FIELDS = ("version", "modules", "merged", "context", "positions", "statistics", "buffers", "precision",
                      "precisions")
CONTEXT_FIELDS = ("modules", "records")
PRECISIONS_FIELDS = ("modules", "context", "positions", "statistics", "buffers")
TOLERANCE = 2**-6
# The tightest tolerances the records' rounding allows (5 significant digits; ``context`` packs its projections as
# float16, within 2⁻¹¹ of each): for weights held in float32 (or float64) on both sides.
RECORD_TOLERANCE = 2**-11
PACKED_TOLERANCE = 2**-9
# float16 keeps values below 2⁻¹⁴ with an absolute error of up to 2⁻²⁵: allowed per √element, with margin.
ABSOLUTE_TOLERANCE = 2**-23
SKETCHES = 8
# Values per parameter tensor: one in each of SAMPLE equal strata of its flat positions, at an offset that
# jumps by the prime STRIDE (so the sample spreads over rows and columns). The cost does not grow with a layer's
# size: ViT-B's 25 modules take milliseconds.
SAMPLE = 16384
STRIDE = 2654435761
# The modules the classifier head reads from, by timm's names (ViT's final norm or its pooled ``fc_norm``,
# ConvNeXt's ``head.norm``): their weights shape the features a head was trained on.
HEAD_INPUTS = ("norm", "fc_norm", "head.norm")
MERGED_ATTRIBUTE = "nola_merged_adapters"
MERGED_PROBES_ATTRIBUTE = "nola_merged_probes"  # the weights' values around each merge (``merge_probes``), in order
_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Parameters timm resizes for another input size (absolute and relative position embeddings): left out of the
# context records, so an adapter still loads onto the model built for another input size.
_RESIZED_WITH_INPUT = ("pos_embed", "relative_position", "rel_pos")
# The buffers of a norm layer that keeps running statistics, recorded in ``statistics``.
RUNNING_STATISTICS = ("running_mean", "running_var")
# A context record: the norm (float64, as computed), then the 8 projections divided by it (float16: within 0.05%
# of the norm, far under the tolerance), little-endian.
_CONTEXT_DTYPES = (np.dtype("<f8"), np.dtype("<f2"))
_CONTEXT_BYTES = 8 + 2 * SKETCHES
# Records keep 5 significant digits (``_records``): a relative distance under this may be rounding alone.
_ROUNDING = 5e-5
# Low-rank factors of a weight update: ΔWᵀ = a @ b, a (in, r) and b (r, out).
Factors = Tuple[Tensor, Tensor]


def frozen_modules(model: nn.Module, plan: InjectionPlan) -> List[str]:
    """The modules an adapter file records by name: every adapted layer, and the norm(s) the classifier head reads
    (``HEAD_INPUTS`` that exist and hold parameters); none for full fine-tuning, which trains them all.

    A plan that adapts no layer (a linear probe) records every linear and convolution layer outside the head instead:
    the head norm alone would not tell two random inits apart (timm sets every norm to ones and zeros).
    """
    if plan.config.train_backbone:
        return []
    head_modules = _head_module_ids(model)
    layers = list(plan.layers) or [name for name, module in model.named_modules()
                                   if isinstance(module, _WEIGHT_LAYERS) and id(module) not in head_modules]
    inputs = []
    for name in HEAD_INPUTS:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if id(module) not in head_modules and any(True for _ in module.parameters(recurse=False)):
            inputs.append(name)
    return [*layers, *inputs]


def context_modules(model: nn.Module, recorded: Sequence[str]) -> List[str]:
    """The other frozen modules an adapter's outputs depend on, sorted by name (not by the order a block registers
    them in): those outside the classifier head, other than ``recorded``, with parameters of their own besides
    position embeddings (``_context_parameters``)."""
    head_modules, recorded = _head_module_ids(model), set(recorded)
    return sorted(name for name, module in model.named_modules()
                  if name not in recorded and id(module) not in head_modules and _context_parameters(module))


def adapter_fingerprint(model: nn.Module, plan: InjectionPlan) -> Optional[dict]:
    """The fingerprint adapter files and task-input graphs record: ``frozen_modules`` by name, and the
    ``context_modules`` packed in order. Full fine-tuning replaces every weight: its record is that of the buffers the
    file does not hold alone (batch norms' running statistics, ``frozen_buffers``)."""
    if plan.config.train_backbone:
        return frozen_fingerprint(model, [], statistics=True)
    named = frozen_modules(model, plan)
    context = context_modules(model, named)
    fingerprint = frozen_fingerprint(model, named, precision=held_precision(model, [*named, *context]),
                                     statistics=True, precisions=record_precisions(model, named, context, True))
    if fingerprint is not None:
        records = _context_records(model, context)
        fingerprint["context"] = {"modules": len(context), "records": _pack([records[name] for name in context])}
        positions = position_records(model)
        if positions:
            fingerprint["positions"] = positions
    return fingerprint


def record_precisions(model: nn.Module, named: Sequence[str], context: Sequence[str] = (),
                      statistics: bool = False, adapted: Sequence[str] = ()) -> dict:
    """Per record of a fingerprint, the precision its values are held at, as the exponent e of the machine epsilon
    2⁻ᵉ (7: bfloat16, 10: float16, 23: float32): ``modules`` in the order of ``named``, ``context`` in the order given,
    ``positions`` and (with ``statistics``) ``statistics`` by name and ``buffers`` (where the model has any) in the
    order of ``buffer_modules`` (``adapted``: as there). A record counts at the precision that holds most of its
    values (``_majority``), so a module loaded from bfloat16 values among float32 ones is matched at bfloat16's
    tolerance and no other is."""
    def exponent(pairs: List[Tuple[float, int]]) -> int:
        return round(-math.log2(_majority(pairs)))

    def module(name: str, parameters: Callable[[nn.Module], Dict[str, nn.Parameter]]) -> int:
        layer = model.get_submodule(name)
        return exponent(_layer_pairs(layer, parameters(layer)))

    found: dict = {
        "modules": [module(name, _frozen_parameters) for name in named],
        "context": [module(name, _context_parameters) for name in context],
        "positions": {name: exponent(_pairs({name: value})) for name, value in _position_parameters(model).items()}}
    if statistics:
        found["statistics"] = {name: exponent(_pairs(dict(zip(RUNNING_STATISTICS, buffers))))
                               for name, buffers in _statistics_buffers(model).items()}
        owners = _module_buffers(model, adapted)
        if owners:
            found["buffers"] = [exponent(_pairs(buffers)) for buffers in owners.values()]
    return found


# The exponents ``record_precisions`` writes: bfloat16, float16, float32, float64 and the float8 types.
_EXPONENTS = {round(-math.log2(torch.finfo(dtype).eps)) for dtype in (
    torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2)}


def is_precisions(value: object, fingerprint: dict) -> bool:
    """Whether ``value`` is a well-formed ``precisions`` entry of ``fingerprint`` (``record_precisions``: one
    exponent it writes per record the fingerprint holds; other keys are refused by the reader as a newer version's)."""
    if not isinstance(value, dict):
        return False
    lengths = {"modules": len(fingerprint.get("modules") or {}),
               **{kind: fingerprint[kind].get("modules") for kind in ("context", "buffers")
                  if isinstance(fingerprint.get(kind), dict)}}
    names = {kind: set(fingerprint[kind]) for kind in ("positions", "statistics")
             if isinstance(fingerprint.get(kind), dict)}  # a record left out (as before it was kept) is not compared
    for kind, entry in value.items():
        exponents = entry if isinstance(entry, list) else list(entry.values()) if isinstance(entry, dict) else None
        if exponents is None or any(isinstance(e, bool) or e not in _EXPONENTS for e in exponents):
            return False
        if kind in lengths and (not isinstance(entry, list) or len(entry) != lengths[kind]):
            return False
        if kind in names and (not isinstance(entry, dict) or set(entry) != names[kind]):
            return False
    return True


def statistics_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """The norm layers that keep running statistics (batch norms, tracking instance norms) by name: state that a
    forward pass in train mode changes without a gradient (hybrid ViTs' convolutional stems have them)."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats}


def running_statistics(model: nn.Module) -> Dict[str, Tensor]:
    """The buffers a forward pass in train mode changes without a gradient, by name (plain ViTs have none): the
    running means and variances of ``statistics_layers``, and spectral norms' power-iteration vectors (the buffers of
    a parametrization, ``torch.nn.utils.parametrizations.spectral_norm``, or of the older
    ``torch.nn.utils.spectral_norm``), which set the norm the weight is divided by."""
    found = {f"{name}.{buffer}" if name else buffer: getattr(module, buffer)
             for name, module in statistics_layers(model).items()
             for buffer in RUNNING_STATISTICS if getattr(module, buffer, None) is not None}
    for name, module in model.named_modules():
        owned = []
        if isinstance(module, parametrize.ParametrizationList):
            owned = [buffer for buffer, _ in module.named_buffers()]
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, LegacySpectralNorm):
                owned += [f"{hook.name}_u", f"{hook.name}_v"]
        for buffer in owned:
            found[f"{name}.{buffer}" if name else buffer] = module.get_buffer(buffer)
    return found


def statistics_records(model: nn.Module) -> Dict[str, List[float]]:
    """The running statistics of ``statistics_layers`` outside the classifier head, by layer name: the record of each
    layer's running means and variances together (empty for plain ViTs, whose files then hold no ``statistics``)."""
    with torch.no_grad():
        vectors = {name: torch.cat([_sample(value) for value in buffers])
                   for name, buffers in _statistics_buffers(model).items()}
        return _records(vectors) if vectors else {}


def _statistics_buffers(model: nn.Module) -> Dict[str, List[Tensor]]:
    """The running means and variances of each of ``statistics_layers`` outside the classifier head that has both."""
    head = _head_module_ids(model)
    found = {}
    for name, module in statistics_layers(model).items():
        buffers = [getattr(module, buffer) for buffer in RUNNING_STATISTICS]
        if id(module) not in head and all(isinstance(value, Tensor) for value in buffers):
            found[name] = buffers
    return found


def is_statistics(value: object) -> bool:
    """Whether ``value`` is a well-formed ``statistics`` entry: {layer name: [numbers]}."""
    return isinstance(value, dict) and all(
        isinstance(name, str) and isinstance(record, list) and len(record) == SKETCHES + 1
        and all(is_finite_number(x) for x in record) for name, record in value.items())


def differing_statistics(expected: dict, actual: dict) -> Optional[str]:
    """What differs between the running statistics a fingerprint ``expected`` recorded (none in files from before
    2026-12-05, nor for models without them) and those of the fingerprint ``actual`` (none: not known, as in a graph
    exported before), naming the first norm layer."""
    if actual.get("statistics") is None:
        return None
    tolerance = _tolerances(expected, actual, "statistics")
    for name, record in (expected.get("statistics") or {}).items():
        other = actual["statistics"].get(name)
        if other is None:
            return (f"the model's {name or 'root module'} keeps no running statistics (or is missing), where the "
                    "adapter's backbone had them")
        difference = _difference(record, other, 0, tolerance(name))
        if difference is not None:
            return (f"the running statistics of {name} differ by about {_amount(difference)} of their norm (a forward "
                    "pass in train mode updates them: keep batch norms in eval mode while training, as "
                    "FewShotClassifier does)")
    return None


def frozen_buffers(model: nn.Module, adapted: Sequence[str] = ()) -> Dict[str, Tensor]:
    """The floating-point buffers a state dict holds (persistent) outside the classifier head, other than
    ``running_statistics``, by name: constants the outputs depend on that adapter files do not hold, such as a
    wrapper's normalisation mean and std (plain timm ViTs have none). Adapted layers' are left out, and those of the
    layers ``adapted`` names (a model not injected yet): inject replaces a layer, and its buffers with it."""
    return {f"{owner}.{name}" if owner else name: value
            for owner, buffers in _module_buffers(model, adapted).items() for name, value in buffers.items()}


def buffer_modules(model: nn.Module, adapted: Sequence[str] = ()) -> List[str]:
    """The modules that hold ``frozen_buffers``, sorted by name: the order of a fingerprint's ``buffers`` records."""
    return list(_module_buffers(model, adapted))


def _module_buffers(model: nn.Module, adapted: Sequence[str] = ()) -> Dict[str, Dict[str, Tensor]]:
    """``frozen_buffers`` by the module holding them (modules sorted by name, each one's buffers by name)."""
    adapted, found = set(adapted), {}
    for module_name, module in model.named_modules():
        buffers = {name: value for name, value in module._buffers.items()
                   if isinstance(value, Tensor) and value.is_floating_point()
                   and name not in module._non_persistent_buffers_set}
        if buffers and module_name not in adapted and not isinstance(module, AdaptedLinear):
            found[module_name] = (module, buffers)
    if not found:  # the usual case, told without the walks below (a load checks it each time)
        return {}
    head, moving = _head_module_ids(model), {id(value) for value in running_statistics(model).values()}
    kept = {name: {key: value for key, value in sorted(buffers.items()) if id(value) not in moving}
            for name, (module, buffers) in found.items() if id(module) not in head}
    return dict(sorted((name, buffers) for name, buffers in kept.items() if buffers))


def buffer_records(model: nn.Module, adapted: Sequence[str] = ()) -> dict:
    """The ``buffers`` entry of a fingerprint: one record per module of ``buffer_modules`` (its buffers' values
    together), packed in that order as ``context`` is; ``{"modules": 0, ...}`` without them, which tells a model
    without buffers from a file written before they were recorded."""
    with torch.no_grad():
        records = _records({name: torch.cat([_sample(value) for value in buffers.values()])
                            for name, buffers in _module_buffers(model, adapted).items()})
    return {"modules": len(records), "records": _pack(list(records.values()))}


def differing_buffers(expected: dict, actual: dict, owners: Optional[Callable[[], Sequence[str]]] = None
                      ) -> Optional[str]:
    """What differs between the buffers (``frozen_buffers``) a fingerprint ``expected`` recorded (no record in files
    from before 2026-12-07: not compared) and those of the fingerprint ``actual`` (none: not known, as in a graph
    exported before), naming the first differing module by ``owners()`` (``buffer_modules`` of the model, asked
    only then) if given, else by its place."""
    if actual.get("buffers") is None or expected.get("buffers") is None:
        return None
    count, theirs = expected["buffers"]["modules"], actual["buffers"]["modules"]
    if theirs != count:
        names = owners() if owners is not None else None
        return (f"{count} module(s) of the adapter's backbone held persistent floating-point buffers outside the head "
                f"and {theirs} here{f' ({_listed(names)})' if names else ''}: adapter files do not hold buffers, so "
                "the adapter would load onto other constants")
    tolerance = _tolerances(expected, actual, "buffers", packed=True)
    for index, (record, other) in enumerate(zip(_unpack(expected["buffers"]), _unpack(actual["buffers"]))):
        difference = _difference(record, other, 0, tolerance(index))
        if difference is not None:
            names = owners() if owners is not None else None
            where = names[index] if names else f"module {index + 1} of the {count} holding them"
            return (f"the buffers of {where} differ by about {_amount(difference)} of their norm (adapter files do "
                    "not hold buffers: the adapter was trained with other constants there)")
    return None


def _listed(names: Sequence[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def position_records(model: nn.Module) -> Dict[str, dict]:
    """The position embeddings (``_RESIZED_WITH_INPUT``) outside the classifier head, by parameter name: each with its
    shape and record. They are compared only at the same shape: timm resizes them for another input size."""
    parameters = _position_parameters(model)
    with torch.no_grad():
        records = _records({name: _sample(value) for name, value in parameters.items()})
    return {name: {"shape": list(parameters[name].shape), "record": record} for name, record in records.items()}


def _position_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """The position embeddings (``_RESIZED_WITH_INPUT``) outside the classifier head, by parameter name, sorted."""
    head = _head_module_ids(model)
    return dict(sorted((f"{module_name}.{name}".lstrip("."), value) for module_name, module in model.named_modules()
                       if id(module) not in head for name, value in _frozen_parameters(module).items()
                       if any(part in name for part in _RESIZED_WITH_INPUT)))


def is_positions(value: object) -> bool:
    """Whether ``value`` is a well-formed ``positions`` entry: {name: {"shape": [ints], "record": [numbers]}}."""
    def valid(entry: object) -> bool:
        return (isinstance(entry, dict) and isinstance(entry.get("shape"), list)
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in entry["shape"])
                and isinstance(entry.get("record"), list) and len(entry["record"]) == SKETCHES + 1
                and all(is_finite_number(x) for x in entry["record"]))

    return isinstance(value, dict) and all(isinstance(name, str) and valid(entry) for name, entry in value.items())


def differing_positions(expected: dict, actual: dict) -> Optional[str]:
    """What differs between the position embeddings the fingerprints ``expected`` (none in files from before
    2026-12-04) and ``actual`` record, naming the first; those of another shape (another input size) or that a side
    lacks are not compared."""
    tolerance = _tolerances(expected, actual, "positions")
    for name, entry in (expected.get("positions") or {}).items():
        other = (actual.get("positions") or {}).get(name)
        if other is None or other["shape"] != entry["shape"]:
            continue
        difference = _difference(entry["record"], other["record"], min(math.prod(entry["shape"]), SAMPLE),
                                 tolerance(name))
        if difference is not None:
            return _differ(name, difference, tolerance(name))
    return None


def _context_parameters(module: nn.Module) -> Dict[str, nn.Parameter]:
    """A module's frozen parameters that context records hold: all but position embeddings (``_RESIZED_WITH_INPUT``),
    so a class token or BEiT's q and v biases are checked beside a relative position table."""
    return {name: value for name, value in _frozen_parameters(module).items()
            if not any(part in name for part in _RESIZED_WITH_INPUT)}


def _context_records(model: nn.Module, names: Sequence[str]) -> Dict[str, List[float]]:
    with torch.no_grad():
        modules = {name: model.get_submodule(name) for name in names}
        return _records({name: _module_vector(module, _context_parameters(module)) for name, module in modules.items()})


def is_context(value: object) -> bool:
    """Whether ``value`` is a well-formed ``context`` entry (a count and that many packed records)."""
    if not isinstance(value, dict) or not set(CONTEXT_FIELDS) <= set(value):  # others: a newer version's (refused)
        return False
    count, records = value["modules"], value["records"]
    if not isinstance(count, int) or isinstance(count, bool) or count < 0 or not isinstance(records, str):
        return False
    try:
        return len(base64.b64decode(records, validate=True)) == count * _CONTEXT_BYTES
    except ValueError:
        return False


def _head_module_ids(model: nn.Module) -> set:
    head = classifier_head(model)
    return {id(m) for m in head.modules()} if head is not None else set()


def _pack(records: Sequence[List[float]]) -> str:
    """Context records as base64: per record its norm and its projections relative to the norm."""
    parts = []
    for norm, *sketches in records:
        relative = np.array(sketches, dtype=np.float64) / norm if norm else np.zeros(len(sketches))
        parts += [np.array([norm], dtype=_CONTEXT_DTYPES[0]).tobytes(), relative.astype(_CONTEXT_DTYPES[1]).tobytes()]
    return base64.b64encode(b"".join(parts)).decode("ascii")


def _unpack(context: dict) -> List[List[float]]:
    """The records ``_pack`` wrote (``context`` checked by ``is_context``)."""
    raw = base64.b64decode(context["records"])
    records = []
    for start in range(0, len(raw), _CONTEXT_BYTES):
        norm = float(np.frombuffer(raw, _CONTEXT_DTYPES[0], 1, start)[0])
        relative = np.frombuffer(raw, _CONTEXT_DTYPES[1], SKETCHES, start + 8).astype(np.float64)
        records.append([norm, *(relative * norm).tolist()])
    return records


def merged_adapters(model: nn.Module) -> List[dict]:
    """What ``merge_and_unload`` folded into the model's weights: one entry (method, config, layers) per adapter;
    without those the weights no longer hold (``load_state_dict`` of the base weights, or of weights saved between
    two merges: ``merges_held``)."""
    return recorded_merges(model)[:merges_held(model)]


def recorded_merges(model: nn.Module) -> List[dict]:
    """The entries ``merge_and_unload`` recorded, whatever the weights hold now (a later merge adds one)."""
    return list(getattr(model, MERGED_ATTRIBUTE, []))


def unmerged_probes(model: nn.Module, layers: Sequence[str]) -> Dict[str, Tuple[Tensor, Tensor]]:
    """Of adapted layers ``layers``, taken before a merge: a few positions of each weight and its values there as
    unmerged (ΔW of a layer merged already taken out), float64 on the CPU. An unmerged layer's are read as they are,
    exactly; reading them after the merge would rebuild a 16-bit weight whole (``exact_unmerged_weight``)."""
    with torch.no_grad():
        return {name: (positions, _unmerged_at(layer, positions)) for name in layers
                for layer in [model.get_submodule(name)] for positions in [_probe_positions(layer.weight.numel())]}


def merge_probes(model: nn.Module, unmerged: Dict[str, Tuple[Tensor, Tensor]]
                 ) -> Dict[str, Tuple[Tensor, Tensor, Tensor]]:
    """``unmerged_probes`` of layers merged since, with each weight's merged values at its positions, for
    ``record_merged``."""
    probes = {}
    with torch.no_grad():
        for name, (positions, before) in unmerged.items():
            weight = model.get_submodule(name).weight.detach()
            merged = weight.reshape(-1).index_select(0, positions.to(weight.device))
            probes[name] = (positions, before, merged.to(torch.float64).cpu())
    return probes


def _unmerged_at(layer: nn.Module, positions: Tensor) -> Tensor:
    """The values of ``layer``'s weight at flat ``positions`` as unmerged (a merged adapted layer's ΔW taken out),
    float64 on the CPU."""
    weight = layer.weight.detach()
    parameters, delta = _unmerged(layer, {"weight": weight})
    at = positions.to(weight.device)
    values = parameters["weight"].reshape(-1).index_select(0, at).to(torch.float64)
    return (values - delta(at) if delta is not None else values).cpu()


def record_merged(model: nn.Module, entry: dict, probes: Dict[str, Tuple[Tensor, Tensor, Tensor]],
                  held: Optional[int] = None) -> None:
    """Remember that ``entry``'s update is now part of the model's weights (kept by deepcopy, not by state dicts),
    with ``merge_probes`` of its layers, after the first ``held`` recorded merges (default: all), those the weights
    held before this one (``merges_held``); the others' records are dropped."""
    records = recorded_merges(model)
    held = len(records) if held is None else held
    stack = _probe_stack(model, len(records))[:held]
    setattr(model, MERGED_ATTRIBUTE, [*records[:held], entry])
    setattr(model, MERGED_PROBES_ATTRIBUTE, [*stack, dict(probes)])


def _probe_stack(model: nn.Module, count: int) -> List[Dict[str, Tuple[Tensor, Tensor, Tensor]]]:
    """The probes of each of the ``count`` recorded merges, in order; a model merged by an earlier version kept one
    dict for all of them (values from before the first merge), which counts as the first merge's alone."""
    probes = getattr(model, MERGED_PROBES_ATTRIBUTE, None)
    if isinstance(probes, dict):
        probes = [probes]
    stack = list(probes or [])[:count]
    return stack + [{}] * (count - len(stack))


def merges_held(model: nn.Module) -> int:
    """How many of the recorded merges the model's weights still hold: the first k where they are again the weights
    from before merge k+1, within the rounding of the coarser dtype, at every probed position the merges since moved
    beyond it (``load_state_dict`` of the base weights, or of weights saved between two merges); all of them
    otherwise. Adapted layers count with their unmerged weights (an adapter injected since is not a merge). Merges
    without probes (records of earlier versions) are held, as are weights of another size or on the meta device."""
    records = recorded_merges(model)
    stack = _probe_stack(model, len(records))
    with torch.no_grad():
        for held in range(len(records)):
            if stack[held] and _weights_before(model, stack[held:]):  # a merge without probes tells nothing
                return held
    return len(records)


def _weights_before(model: nn.Module, stack: Sequence[Dict[str, Tuple[Tensor, Tensor, Tensor]]]) -> bool:
    """Whether every layer the merges of ``stack`` probed holds its values from before the first of them that
    merged into it, at the positions they moved it beyond rounding (at least one: False without probes)."""
    layers: Dict[str, Tuple[Tensor, Tensor, Tensor]] = {}
    for probes in stack:
        for name, (positions, before, merged) in probes.items():
            first = layers.get(name)  # the values before the first merge into it, the values after the last
            layers[name] = (positions, before, merged) if first is None or not torch.equal(first[0], positions) \
                else (positions, first[1], merged)
    told = False
    for name, (positions, before, merged) in layers.items():
        module = _submodule(model, name)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or weight.is_meta or not weight.is_floating_point() \
                or not torch.equal(_probe_positions(weight.numel()), positions):
            return False
        now = _unmerged_at(module, positions)
        # the coarsest of the weight's dtype now, the one its merged values were held at, and the one its values
        # now are held at (base weights loaded back from a bfloat16 copy)
        rounding = 2 * max(torch.finfo(weight.dtype).eps, _held_by(merged), _held_by(now))
        tolerance = rounding * torch.maximum(before.abs(), merged.abs()) + torch.finfo(torch.float32).tiny
        moved = (merged - before).abs() > 4 * tolerance
        if not bool(((now - before).abs() <= tolerance)[moved].all()):
            return False
        told = told or bool(moved.any())
    return told


def _submodule(model: nn.Module, name: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


# Positions of a merged weight ``merge_probes`` keeps: few, as merges are told from base weights at every one.
_PROBES = 128


def _probe_positions(numel: int) -> Tensor:
    count = min(numel, _PROBES)
    return torch.arange(count, dtype=torch.int64) * numel // max(count, 1)


def _frozen_parameters(module: nn.Module) -> Dict[str, nn.Parameter]:
    """A module's own parameters other than adapter tensors, by name in sorted order."""
    adapter = set(module.adapter_parameters()) if isinstance(module, AdaptedLinear) else set()
    own = dict(module.named_parameters(recurse=False))
    return {name: own[name] for name in sorted(own) if name not in adapter}


@functools.lru_cache(maxsize=64)  # a pure function of its arguments; a backbone has few distinct tensor sizes
def _positions(numel: int, device: torch.device) -> Tensor:
    bounds = torch.arange(SAMPLE + 1, dtype=torch.int64, device=device) * numel // SAMPLE
    start, length = bounds[:-1], bounds[1:] - bounds[:-1]
    return start + torch.arange(SAMPLE, dtype=torch.int64, device=device) * STRIDE % length


def _sample(values: Tensor, delta: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """Up to ``SAMPLE`` values of a tensor (minus ``delta``'s, a function of flat positions), float64, non-finite
    values as 0. A complex tensor's values are its real and imaginary parts."""
    flat = _real_values(values.detach())
    positions = _positions(flat.numel(), flat.device) if flat.numel() > SAMPLE else None
    sample = (flat if positions is None else flat.index_select(0, positions)).to(torch.float64)
    if delta is not None:
        sample = sample - delta(torch.arange(flat.numel(), device=flat.device) if positions is None else positions)
    return torch.nan_to_num(sample, nan=0.0, posinf=0.0, neginf=0.0)


def _real_values(values: Tensor) -> Tensor:
    """A tensor's values as one flat real tensor: a complex tensor's real and imaginary parts side by side (a cast
    to float64 would keep the real parts only, so weights differing in their imaginary parts would match)."""
    flat = values.reshape(-1)
    return torch.view_as_real(flat).reshape(-1) if flat.is_complex() else flat


def _unmerged(module: nn.Module, parameters: Dict[str, Tensor], update: Optional[Factors] = None
              ) -> Tuple[Dict[str, Tensor], Optional[Callable[[Tensor], Tensor]]]:
    """``parameters`` of ``module`` as unmerged values, with what to take out of the weight's samples (``_delta``):
    a merged layer's weight as ``unmerge`` gives it back where a 16-bit merge makes that exact (the weight it merged
    into, bit for bit, though cast since without loss), else less ΔW in float64; and less ``update`` either way."""
    merged = isinstance(module, AdaptedLinear) and module.merged and "weight" in parameters
    exact = module.exact_unmerged_weight() if merged else None
    if exact is not None:
        parameters = {**parameters, "weight": exact}
    factors = [*([module.merged_delta_factors()] if merged and exact is None else []),
               *([update] if update is not None else [])]
    return parameters, _delta(factors)


def _delta(factors: List[Factors]) -> Optional[Callable[[Tensor], Tensor]]:
    """The sum of the updates of ``factors`` at flat positions of a weight, None if none; from the low-rank
    factors, so ΔW is never built."""
    if not factors:
        return None
    a = torch.cat([a.detach() for a, _ in factors], dim=1).to(torch.float64)  # a sum of updates: factors side by side
    b = torch.cat([b.detach() for _, b in factors], dim=0).to(torch.float64)

    def at(positions: Tensor) -> Tensor:
        rows, columns = positions // a.shape[0], positions % a.shape[0]
        return (a[columns] * b[:, rows].t()).sum(dim=1)

    return at


def _module_vector(module: nn.Module, parameters: Optional[Dict[str, nn.Parameter]] = None,
                   update: Optional[Factors] = None) -> Tensor:
    """The sampled values of one module's ``parameters`` (default: its frozen ones), as unmerged weights (a merged
    layer's ΔW taken out again), less ``update`` on the weight."""
    parameters, delta = _unmerged(module, _frozen_parameters(module) if parameters is None else parameters, update)
    parts = [_sample(value, delta if name == "weight" else None) for name, value in parameters.items()]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


@functools.lru_cache(maxsize=4)
def _signs(length: int, device: torch.device) -> Tensor:
    """±1 of shape (length, SKETCHES): the low bits of one portable 32-bit hash per element (a pure function)."""
    bits = random_bits(0, "frozen-weights", torch.arange(length, dtype=torch.int64, device=device))
    planes = bits[:, None] >> torch.arange(SKETCHES, dtype=torch.int64, device=device) & 1
    return (1 - 2 * planes).to(torch.float64)


def _records(vectors: Dict[str, Tensor]) -> Dict[str, List[float]]:
    """Per module: [norm, SKETCHES projections] of its sampled values, to 5 significant digits."""
    # a multiple of SAMPLE: element i's signs do not depend on the length, and few lengths are cached
    longest = -(-max((v.numel() for v in vectors.values()), default=1) // SAMPLE) * SAMPLE
    signs = {}
    records = {}
    for name, vector in vectors.items():
        if vector.is_meta:
            raise ValueError(f"{name or 'the model'}'s frozen weights are on the meta device, which holds no values, "
                             "so they cannot be fingerprinted (an adapter file records the weights it was trained on): "
                             "materialize the model first (model.to_empty(device='cpu'), then load its weights)")
        if vector.device not in signs:
            signs[vector.device] = _signs(longest, vector.device)
        values = torch.cat([torch.linalg.vector_norm(vector)[None], vector @ signs[vector.device][: vector.numel()]])
        records[name] = [float(f"{value:.5g}") for value in values.tolist()]
    return records


def frozen_fingerprint(model: nn.Module, modules: Optional[Sequence[str]] = None,
                       precision: Optional[float] = None, statistics: bool = False,
                       precisions: Optional[dict] = None) -> Optional[dict]:
    """Fingerprint of the frozen weights of ``modules`` (default: every module with a parameter that does not
    train), with the adapters merged into them, the precision most of their values are held at (default:
    ``held_precision`` of ``modules``) and each record's (default: ``record_precisions`` of ``modules``); with
    ``statistics``, also the running statistics of batch norms and the other buffers (``frozen_buffers``, none
    too: what files and checkpoints record). None when there are no modules and no ``statistics``.

    Merged adapted layers count with their unmerged weights: the record ``merge`` took before folding ΔW in,
    else their weight minus ΔW (then kept as their record). Cheap (a fixed sample per tensor) and the same on every
    device and dtype.
    """
    if modules is None:
        modules = [name for name, module in model.named_modules()
                   if any(not p.requires_grad for p in _frozen_parameters(module).values())]
    with_statistics = statistics and bool(_statistics_buffers(model))
    if not modules and not statistics:
        return None
    if precisions is None:
        found = record_precisions(model, modules, statistics=statistics)
        precisions = {"modules": found["modules"], **({"statistics": found["statistics"]} if with_statistics else {}),
                      **({"buffers": found["buffers"]} if "buffers" in found else {})}
    fingerprint = {"version": FINGERPRINT_VERSION, "modules": frozen_records(model, modules),
                   "merged": merged_adapters(model),
                   "precision": held_precision(model, modules) if precision is None else precision,
                   "precisions": precisions}
    if with_statistics:
        fingerprint["statistics"] = statistics_records(model)
    if statistics:
        fingerprint["buffers"] = buffer_records(model)
    return fingerprint


def frozen_records(model: nn.Module, modules: Sequence[str],
                   memo: Optional[Dict[str, List[float]]] = None) -> Dict[str, List[float]]:
    """The records of ``frozen_fingerprint`` alone, by module name. Merged adapted layers count with their unmerged
    weights: the record ``merge`` took before folding ΔW in, else their weight minus ΔW (then kept as their record).
    ``memo``: records of this model taken since its weights last changed, by name, reused and added to (the checks of
    one load share it, so no module is sampled twice)."""
    memo = {} if memo is None else memo
    merged = {name: layer for name, layer in adapted_layers(model).items() if layer.merged}
    known = {name: layer.unmerged_record for name, layer in merged.items() if layer.unmerged_record is not None}
    with torch.no_grad():
        computed = _records({name: _module_vector(model.get_submodule(name))
                             for name in modules if name not in known and name not in memo})
    for name in computed.keys() & merged.keys():  # kept until the weight is written (a moved or copied model's too)
        merged[name].unmerged_record = computed[name]
    memo.update(computed)
    return {name: known[name] if name in known else memo[name] for name in modules}


def held_precision(model: nn.Module, modules: Sequence[str]) -> float:
    """The machine epsilon of the precision that holds most of the values of the frozen parameters of ``modules``
    (``_majority``): what a fingerprint's tolerance is set by (``_tolerance``), so that one module held otherwise (a
    norm loaded from bfloat16 values among float32 weights) loosens no check but its own (``record_precisions``)."""
    layers = [model.get_submodule(name) for name in modules]
    return _majority([pair for layer in layers for pair in _layer_pairs(layer, _frozen_parameters(layer))])


def _layer_pairs(layer: nn.Module, parameters: Dict[str, Tensor]) -> List[Tuple[float, int]]:
    """``_pairs`` of a layer's values as unmerged (``_unmerged``), an adapted layer's weight at the coarser of that
    precision and the one its values were held at merged: a cast while merged (``merge``, ``bfloat16()``, ``float()``,
    ``unmerge``) leaves the weight off the bfloat16 grid by ΔW, with bfloat16's rounding (``cast_rounding``)."""
    values, delta = _unmerged(layer, parameters)
    if not isinstance(layer, AdaptedLinear) or "weight" not in values:
        return _pairs(values, delta)
    pairs = _pairs({name: value for name, value in values.items() if name != "weight"})
    weight = _pairs({"weight": values["weight"]}, delta)
    if weight:
        if layer.merged:  # the weight as it is holds ΔW
            held = _pairs({"weight": parameters["weight"]})
        else:  # unmerged after a cast while merged: that cast's rounding
            rounded = layer.cast_rounding
            held = [] if rounded is None else [(torch.finfo(rounded).eps, weight[0][1])]
        weight = [(max(weight[0][0], held[0][0]) if held else weight[0][0], weight[0][1])]
    return pairs + weight


def _pairs(values: Dict[str, Tensor], delta: Optional[Callable[[Tensor], Tensor]] = None) -> List[Tuple[float, int]]:
    """(machine epsilon of the precision it is held at (``_held_by``), number of values) of each of ``values`` that
    tells it (``_telling_sample``); ``delta`` (a merged layer's ΔW at flat positions) taken out of a ``weight``."""
    return [(_held_by(sample), value.numel()) for name, value in values.items()
            if (sample := _telling_sample(value, delta if name == "weight" else None)) is not None]


def _majority(pairs: Sequence[Tuple[float, int]]) -> float:
    """The precision of ``pairs`` (epsilon, values) that holds the most values, the coarser of a tie; float32's where
    none is given (constants alone, as timm's norms at init, which every type holds exactly)."""
    counts: Dict[float, int] = {}
    for eps, count in pairs:
        counts[eps] = counts.get(eps, 0) + count
    return max(counts, key=lambda eps: (counts[eps], eps)) if counts else torch.finfo(torch.float32).eps


def is_precision(value: object) -> bool:
    """Whether ``value`` is a well-formed ``precision`` entry: a machine epsilon, a number in (0, 1)."""
    return is_finite_number(value) and 0 < value < 1


def unexpected_merges(expected: Optional[dict], model: nn.Module) -> List[dict]:
    """Adapters merged into the model's weights that were not merged into those ``expected`` was taken from."""
    return unmatched_merges(merged_adapters(model), expected.get("merged", []) if expected else [])


def missing_merges(expected: Optional[dict], model: nn.Module) -> List[dict]:
    """Adapters merged into the weights ``expected`` was taken from that the model does not record as merged."""
    return unmatched_merges(expected.get("merged", []) if expected else [], merged_adapters(model))


def unmatched_merges(entries: Sequence[dict], others: Sequence[dict]) -> List[dict]:
    """The merge records of ``entries`` that no record of ``others`` matches, each record matching once: weights
    with an adapter merged twice (or two of one config) are not those with it merged once."""
    left = list(others)
    unmatched = []
    for entry in entries:
        if entry in left:
            left.remove(entry)
        else:
            unmatched.append(entry)
    return unmatched


def differing_module(expected: dict, model: nn.Module, loose: bool = False,
                     memo: Optional[Dict[str, List[float]]] = None, adapted: Sequence[str] = ()) -> Optional[str]:
    """None when the model's frozen weights match the fingerprint ``expected``, else what differs, naming the first
    differing module. Raises ValueError for a fingerprint of another version, which cannot be compared. ``loose``:
    match within ``TOLERANCE`` whatever precision the weights are held at (as fingerprints that record none), a
    difference an update merged in may stay under (``holds_update``). ``memo``: as ``frozen_records``'.
    ``adapted``: the layers the fingerprint's adapter adapts, on a model not injected yet (``frozen_buffers``)."""
    if expected.get("version") != FINGERPRINT_VERSION:
        raise ValueError(f"the frozen weights were fingerprinted by {expected.get('version')!r}, and this "
                         f"nola_vision computes {FINGERPRINT_VERSION!r}")
    names = list(expected["modules"])
    missing = [name for name in names if not _has_module(model, name)]
    if missing:
        return f"the model has no module {missing[0]}"
    context = context_modules(model, names) if "context" in expected else []
    records = {"modules": frozen_records(model, names, memo), "positions": position_records(model),
               "statistics": statistics_records(model),
               **({"buffers": buffer_records(model, adapted)} if "buffers" in expected else {})}
    context_records = _context_records(model, context) if "context" in expected else {}
    sizes = {"modules": _named_sample_sizes(model, names)}
    if loose:  # no precision on the model's side: TOLERANCE
        return _differing(expected, {**records, "precision": None, "precisions": {}}, sizes, context_records, model,
                          adapted)
    # The model's side at the finest precision first: its tolerances are then the file's alone, which the coarser of
    # the two sides' can only widen, so a match there is a match (a task switch's usual case, without the model's
    # precisions: a third of the check on ViT-B). A difference is judged again at the precisions the model holds.
    finest = {**records, "precision": _FINEST, "precisions": {}}
    if _differing(expected, finest, sizes, context_records, model, adapted) is None:
        return None
    # every record of the model's side has its precision: no fallback ``precision`` is needed
    actual = {**records, "precision": None,
              "precisions": record_precisions(model, names, context, statistics=True, adapted=adapted)}
    return _differing(expected, actual, sizes, context_records, model, adapted)


# The machine epsilon of float64, the finest precision a record can be held at.
_FINEST = 2.0 ** -52


def _differing(expected: dict, actual: dict, sizes: dict, context_records: Dict[str, List[float]],
               model: nn.Module, adapted: Sequence[str] = ()) -> Optional[str]:
    """``differing_module``'s comparison of the model's records ``actual`` (and of its context, by name) with
    ``expected``, at the tolerances their precisions give."""
    root = f"{type(model).__name__} itself"
    difference = differing_records(expected, actual, sizes, root)
    if difference is not None:
        return difference
    if "context" in expected:
        context = list(context_records)
        if len(context) != expected["context"]["modules"]:
            return (f"the model has {len(context)} other frozen modules (outside the adapted layers and the head), "
                    f"the adapter's backbone had {expected['context']['modules']}")
        difference = differing_records(  # the context records by name, as the named ones are compared
            _as_named(expected, dict(zip(context, _unpack(expected["context"])))),
            _as_named(actual, context_records),
            {"modules": dict(zip(context, _context_sample_sizes(model, context)))}, root, packed=True)
    if difference is None:
        difference = differing_positions(expected, actual)
    if difference is None:
        difference = differing_statistics(expected, actual)
    if difference is not None:
        return difference
    return differing_buffers(expected, actual, lambda: [name or f"{type(model).__name__} itself"
                                                        for name in buffer_modules(model, adapted)])


def _as_named(fingerprint: dict, records: Dict[str, List[float]]) -> dict:
    """A fingerprint's context ``records`` (by module name, in order) as named records, with their precisions."""
    precisions = (fingerprint.get("precisions") or {}).get("context")
    return {"modules": records, "precision": fingerprint.get("precision"),
            **({"precisions": {"modules": precisions}} if precisions is not None else {})}


def sample_sizes(model: nn.Module, fingerprint: dict) -> dict:
    """How many values ``fingerprint`` (``adapter_fingerprint`` of ``model``) sampled of each module, by name and, for
    its context records, in order: what ``differing_records`` needs for the absolute tolerance of weights near zero
    where the model itself is not at hand (a task-input ONNX graph records them)."""
    names = list(fingerprint["modules"])
    sizes: dict = {"modules": _named_sample_sizes(model, names)}
    if "context" in fingerprint:
        sizes["context"] = _context_sample_sizes(model, context_modules(model, names))
    return sizes


def _named_sample_sizes(model: nn.Module, names: Sequence[str]) -> Dict[str, int]:
    return {name: _sample_size(_frozen_parameters(model.get_submodule(name))) for name in names}


def _context_sample_sizes(model: nn.Module, context: Sequence[str]) -> List[int]:
    return [_sample_size(_context_parameters(model.get_submodule(name))) for name in context]


def differing_records(expected: dict, actual: dict, sizes: Optional[dict] = None,
                      root: str = "the model itself", packed: bool = False) -> Optional[str]:
    """None when every module of the fingerprint ``expected`` matches its record in ``actual`` (both of this
    version), and their context records match when both hold them, else what differs, naming the first differing
    module. ``sizes`` (values sampled per module, as ``sample_sizes()`` gives them) adds the absolute tolerance for
    weights near zero; without it only the relative one applies. The relative one is set by the precisions the two
    sides record (``_tolerances``; ``packed``: the records of ``modules`` were packed as context records are)."""
    sizes = sizes or {}
    tolerance = _tolerances(expected, actual, "modules", packed)
    for name, record in expected["modules"].items():
        other = actual["modules"].get(name)
        label = name or root
        if other is None:
            return f"there is no fingerprint of {label}"
        difference = _difference(record, other, sizes.get("modules", {}).get(name, 0), tolerance(name))
        if difference is not None:
            return _differ(label, difference, tolerance(name))
    if "context" not in expected or "context" not in actual:
        return None
    count = expected["context"]["modules"]
    if actual["context"]["modules"] != count:
        return (f"the other frozen modules (outside the adapted layers and the head) number {count} where the "
                f"adapter was trained and {actual['context']['modules']} here")
    context_sizes = sizes.get("context") or [0] * count
    tolerance = _tolerances(expected, actual, "context", packed=True)
    for index, (record, other) in enumerate(zip(_unpack(expected["context"]), _unpack(actual["context"]))):
        difference = _difference(record, other, context_sizes[index] if index < len(context_sizes) else 0,
                                 tolerance(index))
        if difference is not None:
            return _differ(f"frozen module {index + 1} of the {count} outside the adapted layers and the head",
                           difference, tolerance(index))
    return None


def _tolerances(expected: dict, actual: dict, kind: str, packed: bool = False) -> Callable[[Any], float]:
    """The tolerance of each record of ``kind`` (``record_precisions``' keys; a context record by its index) between
    the fingerprints ``expected`` and ``actual``: each side's recorded precision of that record, else its
    ``precision``, else none (``TOLERANCE``)."""
    mine, theirs = _recorded(expected, kind), _recorded(actual, kind)
    return lambda key: _tolerance(mine.get(key, expected.get("precision")), theirs.get(key, actual.get("precision")),
                                  packed=packed)


def _recorded(fingerprint: dict, kind: str) -> Dict[Any, float]:
    """The machine epsilon ``fingerprint`` records for each of its records of ``kind`` (by name; context records by
    index); empty where it records none."""
    recorded = (fingerprint.get("precisions") or {}).get(kind)
    if recorded is None:
        return {}
    if isinstance(recorded, dict):
        return {name: 2.0 ** -exponent for name, exponent in recorded.items()}
    keys = list(fingerprint["modules"]) if kind == "modules" else range(len(recorded))
    return {key: 2.0 ** -exponent for key, exponent in zip(keys, recorded)}


def _tolerance(*precisions: Optional[float], packed: bool = False) -> float:
    """How far two records may lie apart, relative to the norm, for weights held at ``precisions`` (machine
    epsilons; None where a fingerprint does not record it: ``TOLERANCE``): four times the coarser epsilon, at least
    what the records' own rounding needs (``PACKED_TOLERANCE`` for packed context records) and at most
    ``TOLERANCE``."""
    if any(precision is None for precision in precisions):
        return TOLERANCE
    floor = PACKED_TOLERANCE if packed else RECORD_TOLERANCE
    return min(TOLERANCE, max(floor, 4 * max(precisions)))


def _differ(label: str, difference: float, tolerance: float = TOLERANCE) -> str:
    if not difference < 100:  # two weights lie at most about twice their norm apart: a record edited (inf: its length)
        return (f"the record of the weights of {label} lies over 100 times their norm from this model's, farther than "
                "the records of any two weights do: the record was edited or damaged")
    held = ("a bfloat16 or float16 copy of the same weights differs by under 0.5%" if tolerance >= TOLERANCE else
            f"at the precision both sides' weights are held at, rounding alone stays under {_amount(tolerance)}")
    return f"the weights of {label} differ by about {_amount(difference)} of their norm ({held})"


def _amount(difference: float) -> str:
    """A relative difference as the messages show it: two decimals under 1%, one under 10%."""
    return f"{difference:.{2 if difference < 0.01 else 1 if difference < 0.1 else 0}%}"


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _sample_size(parameters: Dict[str, nn.Parameter]) -> int:
    """How many values the fingerprint samples of ``parameters``."""
    return sum(min(value.numel() * (2 if value.is_complex() else 1), SAMPLE) for value in parameters.values())


def _difference(expected: List[float], actual: List[float], count: int, tolerance: float) -> Optional[float]:
    """The estimated norm of the weights' difference relative to their norm, when it exceeds ``tolerance``."""
    if len(expected) != len(actual):
        return math.inf
    scale = max(abs(expected[0]), abs(actual[0]))
    estimate = _distance(expected, actual)
    if estimate <= tolerance * scale + ABSOLUTE_TOLERANCE * math.sqrt(count):
        return None
    return estimate / scale if scale else math.inf


def _distance(expected: List[float], actual: List[float]) -> float:
    """The estimated norm of the difference of the weights two records (of equal length) were taken of: by
    ``math.hypot``, which squares nothing, so a record edited to hold 1e308 gives a distance (inf at worst), not an
    OverflowError."""
    sketches = [e - a for e, a in zip(expected[1:], actual[1:])]
    return max(math.hypot(*sketches) / math.sqrt(len(sketches)), abs(expected[0] - actual[0]))


def holds_update(expected: dict, model: nn.Module, names: Sequence[str],
                 updates: Callable[[List[str]], Dict[str, Factors]], difference: Optional[str] = None,
                 memo: Optional[Dict[str, List[float]]] = None) -> bool:
    """Whether layers ``names`` already hold the update ``updates(changed)`` gives, merged in where no record says so
    (a state dict): taken out, their weights come at least twice as close to ``expected``. ``difference``: what
    ``differing_module`` found (None: a match); one beyond ``TOLERANCE`` (``differing_module(..., loose=True)``) is
    another backbone's, for which the update (seconds of work on ViT-B) is not computed.

    Summed over the layers the weights of differ beyond rounding (only those updates are computed), so that a bfloat16
    copy's rounding cannot line up with one layer's update; another adapter merged in stays as far or moves away.
    ``memo``: as ``frozen_records``' (``differing_module``'s, whose records of the layers are those needed here)."""
    if difference is not None and differing_module(expected, model, loose=True, memo=memo,
                                                   adapted=names) is not None:
        return False
    records = expected["modules"]
    merged = {name for name, layer in adapted_layers(model).items() if layer.merged}  # recorded: unexpected_merges
    names = [name for name in names if name in records and name not in merged]
    actual = frozen_records(model, names, memo)
    now = {name: _relative(records[name], actual[name]) for name in names}
    # _rounding is at least _ROUNDING: a layer within it is unchanged without sampling its weight again
    changed = [name for name, distance in now.items()
               if distance > _ROUNDING and distance > _rounding(model.get_submodule(name))]
    if not changed:
        return False
    update = updates(changed)
    with torch.no_grad():
        taken_out = _records({name: _module_vector(model.get_submodule(name), update=update[name]) for name in changed})
    without = math.hypot(*(_relative(records[name], taken_out[name]) for name in changed))  # no overflow: an edit
    return without < math.hypot(*(now[name] for name in changed)) / 2


def _rounding(module: nn.Module) -> float:
    """The relative distance rounding alone may put between a record and a module's weight: the record's 5 digits, or
    half the machine epsilon of a half-precision copy (no update smaller than that can be told from it anyway)."""
    weight = getattr(module, "weight", None)
    sample = _telling_sample(weight) if isinstance(weight, Tensor) else None
    return max(_ROUNDING, (_held_by(sample) if sample is not None else 0.0) / 2)


# How many distinct values of a coarser type a sample must round to before values near them count as held at it.
_SPREAD = 32
# The types a weight's values may be held at, coarsest first (bfloat16 before float16: its values often fit float16
# as well, but not the reverse beyond float16's subnormals).
_HELD_TYPES = (torch.bfloat16, torch.float16, torch.float32)


def _held_by(sample: Tensor) -> float:
    """The machine epsilon of the first of ``_HELD_TYPES`` coarser than ``sample``'s dtype that holds every value of
    it, else its dtype's."""
    own = torch.finfo(sample.dtype).eps
    for dtype in _HELD_TYPES:
        eps = torch.finfo(dtype).eps
        if eps <= own:
            return own
        rounded = sample.to(dtype).to(sample.dtype)
        if torch.equal(rounded, sample):
            return eps
        # Merges, switches and unmerges (and a merged weight less ΔW) leave such values within a few roundings of the
        # tensor's own type, at the scale of each value or, for values near zero, of the typical one (the median: no
        # outlier sets it): allowed 2⁻⁹ of a step of the coarser type at that scale, where the values spread over many
        # of its steps (values bunched at one, as norms near 1 after a few steps, would all lie that close while held
        # at float32).
        magnitude = sample.abs()
        scale = torch.maximum(magnitude, magnitude.median())
        if rounded.unique().numel() >= _SPREAD and bool(((rounded - sample).abs() <= scale * (eps * 2**-9)).all()):
            return eps
    return own


def _telling_sample(value: Tensor, delta: Optional[Callable[[Tensor], Tensor]] = None) -> Optional[Tensor]:
    """A strided sample of a floating tensor's values, less ``delta``'s at their flat positions (a merged weight's
    ΔW), to tell the precision they are held at; None for a tensor that tells nothing (not floating, on the meta
    device, or one repeated value, as timm's norms and biases at init)."""
    if not value.is_floating_point() or value.is_meta:
        return None
    flat = value.detach().reshape(-1)
    positions = torch.arange(0, flat.numel(), max(1, flat.numel() // 256), device=flat.device)
    sample = flat[positions]
    if delta is not None:  # the weight it holds unmerged, within the merge's rounding
        sample = (sample.to(torch.float64) - delta(positions)).to(value.dtype)
    sample = sample[sample.isfinite()]  # a NaN equals nothing, so no type would seem to hold it
    return None if sample.numel() == 0 or bool((sample == sample[0]).all()) else sample


def _relative(expected: List[float], actual: List[float]) -> float:
    """``_distance`` relative to the larger norm (0 for two records of zeros, infinite for records of two versions)."""
    if len(expected) != len(actual):
        return math.inf
    scale = max(abs(expected[0]), abs(actual[0]))
    distance = _distance(expected, actual)
    return distance / scale if scale else (math.inf if distance else 0.0)


def tensors_sha256(named: Iterable[Tuple[str, Tensor]]) -> str:
    """sha256 over named tensors' names, dtypes, shapes and bytes, in the order given (callers give name order):
    exact where the frozen-weight fingerprint tolerates dtype and rounding, and independent of how a file lays out its
    header (what a checkpoint records of its trained tensors, the converted offline backbone's recorded digest)."""
    digest = hashlib.sha256()
    for name, tensor in named:
        tensor = tensor.detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
