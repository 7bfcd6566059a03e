"""ONNX export: a merged graph for one task, or one graph for every task of a backbone with the task as inputs.

NOLA and LoRA are linear in what they train once the frozen weights and random bases are fixed. With
``tasks_as_inputs=True`` the unmerged model is traced with its trained tensors (coefficients or LoRA factors, and
the head) as graph inputs, and its frozen weights and shared bases (decoded to float32) as constants: one file then
serves every task trained on that backbone with that adapter config and head size, and ``onnx_task_inputs`` gives
a task's arrays for it. A graph has one head size: tasks with another class count need their own graph.
"""
from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..adapters.files import (
    AdapterLoadError,
    PathLike,
    architecture_name,
    changed_settings,
    decode_tensors,
    layer_shapes,
    num_classes_of,
    output_settings,
    pooling_of,
    read_adapter,
    unchecked_frozen_weights,
)
from ..core.basis import GENERATOR_VERSION, BasisSpec
from ..core.checks import check_bool, check_path
from ..core.config import config_from_dict
from ..core.fingerprint import (
    adapter_fingerprint,
    differing_buffers,
    differing_positions,
    differing_records,
    differing_statistics,
    sample_sizes,
    unmatched_merges,
)
from ..core.inject import adapter_state, quantization_aware_bits, set_quantization_aware, unwrap_model
from ..core.interrupts import interrupts_deferred
from ..core.layer import adapted_layers, as_factors, full_precision
from ..core.merge import checkpointing_modules, merge
from ..core.registry import method_of
from ..core.storage import atomic_path
from ..core.targets import (
    image_channels,
    require_module,
    require_no_inner_wrappers,
    require_nothing_else_trained,
    require_values,
    trained_parameters,
)
from ..core.warn import warn_user
from .multitask import MultiTaskModel

__all__ = ["GRAPH_FORMAT", "export_onnx", "onnx_task_inputs"]

# Recorded in the metadata of a task-input graph, with what a task must match to fit it (see ``_graph_metadata``).
GRAPH_FORMAT = "nola_vision.onnx_tasks/1"
_PREFIX = "nola_vision."


def export_onnx(model: nn.Module, path: PathLike, *, tasks_as_inputs: bool = False,
                input_size: Optional[Sequence[int]] = None) -> Path:
    """Write ``model`` as an ONNX graph with input ``images`` and output ``logits``, both with a dynamic batch axis
    (of one image or more: ONNX Runtime cannot reshape an empty batch).

    By default the graph is the merged model: one task at the base model's cost, computing what the model computes
    (under quantisation-aware training too), in the dtype of its parameters (``model`` itself is not changed).
    With ``tasks_as_inputs`` the unmerged float32 model is exported with every trained tensor as an input named as
    in adapter files, applied as given (not quantisation-aware): one graph for all tasks of this backbone and its
    frozen weights, adapter config (seed and bases included) and head size, fed by ``onnx_task_inputs``. Heads of
    another size need their own graph (export a model built with that ``num_classes``);
    ``onnx_task_inputs(adapter_dir, graph)`` refuses a task that does not fit. ``input_size`` (C, H, W) defaults to
    the size the model was built for. An existing file at ``path`` is replaced only if it is an ONNX graph (an earlier
    export). Returns ``path``.
    """
    require_module(model, "export_onnx", adaptable=False)  # a MultiTaskModel gets its own message below
    path = check_path(path, "export_onnx's path", expand_user=True)
    check_bool(tasks_as_inputs, "export_onnx: tasks_as_inputs")
    model = unwrap_model(model)
    if tasks_as_inputs:  # its inputs are named as in adapter files
        require_no_inner_wrappers(model, "nv.export_onnx")
    _refuse_replacing_other_files(Path(path))
    if isinstance(input_size, (np.ndarray, torch.Tensor)) and input_size.ndim == 1:  # as a torch.Size is taken
        input_size = input_size.tolist()
    if input_size is not None:
        _check_input_size(input_size, model)
    if isinstance(model, MultiTaskModel):
        raise TypeError("a MultiTaskModel picks its tasks by name in forward, which a graph cannot take: export "
                        "its backbone with nv.export_onnx(backbone, path, tasks_as_inputs=True) (the model it was "
                        "built on, with an adapter of the tasks' config injected or loaded) and feed each task's "
                        "arrays with nv.onnx_task_inputs(adapter_dir, graph)")
    parameter = next(model.parameters(), None)
    if parameter is None:
        raise TypeError(f"export_onnx exports a timm model with weights, got a {type(model).__name__} without any")
    require_values(model, "export_onnx")
    if parameter.dtype == torch.bfloat16:
        raise ValueError("ONNX has no bfloat16 Conv at the opsets torch's exporter writes (up to 20), so the graph of "
                         "a bfloat16 model would not load: export a float16 or float32 copy "
                         "(copy.deepcopy(model).half() or .float())")
    if parameter.dtype == torch.float64:
        raise ValueError("ONNX Runtime has no float64 Conv on the CPU, so the graph of a float64 model would not load "
                         "there: export a float32 copy (copy.deepcopy(model).float())")
    if input_size is None:
        input_size = _input_size(model)
        if getattr(getattr(model, "patch_embed", None), "img_size", None) is None:
            _require_runs_at(model, input_size, parameter)
    images = torch.zeros(2, *input_size, device=parameter.device, dtype=parameter.dtype)
    if not tasks_as_inputs:
        # Merged but not unloaded: the head of a quantisation-aware model is seen through a hook that unloading removes.
        # A module around an injected model (a wrapper's preprocessing) is merged as a whole: torch cannot trace an
        # unmerged NOLA layer's pass.
        served = merge(copy.deepcopy(model)) if adapted_layers(model) else model
        with _as_served(served):
            return _export(_ImagesOnly(served), (images,), ["images"], path)
    graph = _TaskInputGraph(model)
    with _as_served(graph.model):
        return _export(graph, (images, *graph.example_inputs()), ["images", *graph.names], path,
                       _graph_metadata(model))


def onnx_task_inputs(adapter_dir: PathLike, graph: Union[PathLike, Any, None] = None, *,
                     allow_unchecked_legacy: bool = False) -> Dict[str, np.ndarray]:
    """The float32 arrays of one saved task, by graph input name, for a graph of ``export_onnx(tasks_as_inputs=True)``.

    The adapter files are checked as they are read (checksums, sizes, finite values). Pass ``graph`` (the ``.onnx``
    path, an ``onnx.ModelProto`` or an ``onnxruntime.InferenceSession``) to check that the task fits it, or raise
    ``AdapterLoadError`` naming the fix: same backbone, adapter config, layer sizes and bases, head size (one graph per
    head size), and frozen weights (as ``load_adapter`` checks them; graphs exported before they were recorded take
    any), at every bit width. ``allow_unchecked_legacy`` admits format 1 files, which carry no checksums.

        session.run(None, {"images": images, **nv.onnx_task_inputs("runs/cifar10", session)})
    """
    check_bool(allow_unchecked_legacy, "onnx_task_inputs: allow_unchecked_legacy")
    document, stored, quantization = read_adapter(adapter_dir, allow_unchecked_legacy=allow_unchecked_legacy)
    document = {**document, "num_classes": _head_classes(document, stored, quantization)}
    info = _read_graph(graph) if graph is not None else None
    if info is not None:  # before decoding: integer codes decoded to the graph's shapes would fail on a misfit first
        _check_task_fits(document, info, Path(adapter_dir))
    shapes = _task_shapes(document, stored, quantization, info.inputs if info is not None else None)
    values = decode_tensors(stored, quantization, shapes)
    if info is not None:
        _check_tensor_shapes(values, info, Path(adapter_dir))
    return {name: value.numpy() for name, value in values.items()}


class _ImagesOnly(nn.Module):
    """``model(images)``, nothing else: the exporter would pass the model's other forward arguments as traced values
    (EVA's ``is_causal`` default becomes a tensor, which timm's attention refuses)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)


class _TaskInputGraph(nn.Module):
    """``forward(images, *trained tensors)``: the unmerged model with what a task trains as inputs.

    Every shared basis is a float32 buffer (a constant of the graph), multiplied once by the stacked coefficients of
    all layers that use it, as ``combine_shared`` does in PyTorch; the layers read the rows as their batched factors.
    Everything else (LoRA factors, the head) stands in for its parameter during the forward pass.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        state = adapter_state(model)
        if state is None:
            raise ValueError(f"{type(model).__name__} has no adapters, so there is no task to take as input: inject or "
                             "load one first, or export the plain model with export_onnx(model, path)")
        if state.config.train_backbone:
            raise ValueError("full fine-tuning trains every weight, so tasks share nothing a graph could hold: export "
                             "each task with export_onnx(model, path)")
        state.plan.require_own_adapters(model)  # the graph's inputs would be another injection's tensors
        dtype = next(model.parameters()).dtype
        if dtype != torch.float32:
            raise ValueError(f"the model's parameters are {dtype}, and a task-input graph takes the float32 arrays of "
                             "nv.onnx_task_inputs: export it from the float32 model (model.float()), or export each "
                             f"task in {dtype} with export_onnx(model, path)")
        for name, layer in adapted_layers(model).items():
            if layer.merged:
                raise ValueError(f"layer {name} is merged: a task-input graph needs the frozen weights without ΔW; "
                                 "call nv.unmerge(model) first")
            if layer.basis_specs() and not layer.shared_coefficients():
                raise ValueError(f"layer {name} regenerates its own bases (basis='per_layer'); a task-input graph "
                                 "holds shared bases only: train with basis='shared', or export one merged graph per "
                                 "task with export_onnx(model, path)")
        model = _traceable(model)
        layers = adapted_layers(model)
        adapter, head = trained_parameters(model, train_backbone=False)
        # every other weight is a constant of the graph, which the tasks it serves then run with
        require_nothing_else_trained(model, {**adapter, **head}, "a task-input graph's inputs")
        self.names: List[str] = [*adapter, *head]
        self._example = [p.detach() for p in (*adapter.values(), *head.values())]
        self.model = model
        self._shared = {name: layer for name, layer in layers.items() if layer.shared_coefficients()}
        specs = dict.fromkeys(spec for layer in self._shared.values() for spec, _ in layer.shared_coefficients())
        self._bases: Dict[BasisSpec, str] = {}
        for index, spec in enumerate(specs):
            self._bases[spec] = f"basis{index}"
            self.register_buffer(f"basis{index}", spec.generate(_device(model)).view(spec.count, spec.numel))

    def example_inputs(self) -> List[Tensor]:
        return list(self._example)

    def forward(self, images: Tensor, *tensors: Tensor) -> Tensor:
        values = dict(zip(self.names, tensors))
        entries = [(spec, values[f"{name}.{coefficients}"]) for name, layer in self._shared.items()
                   for spec, coefficients in layer.shared_coefficients()]
        rows: List[Optional[Tensor]] = [None] * len(entries)
        for spec, buffer in self._bases.items():
            indices = [i for i, (s, _) in enumerate(entries) if s == spec]
            combined = torch.cat([entries[i][1] for i in indices]) @ getattr(self, buffer)
            for i, part in zip(indices, combined.split([entries[i][1].shape[0] for i in indices])):
                rows[i] = part
        parts = iter(rows)
        try:  # set inside: factors left on a layer (a Ctrl-C half-way) were used by its next pass, stale
            for layer in self._shared.values():
                layer.batched_factors = layer.delta_factors_of(
                    as_factors(layer, *[next(parts) for _ in layer.shared_coefficients()]))
            with _substituted(self.model, values), _without_own_model_hooks(self.model):
                return self.model(images)
        finally:
            with interrupts_deferred():
                for layer in self._shared.values():
                    layer.batched_factors = None


@contextmanager
def _without_own_model_hooks(model: nn.Module) -> Iterator[None]:
    """Within the block, the forward hooks ``inject`` put on ``model`` itself do nothing, and the user's run.

    Those would combine the bases with the coefficients of the parameters instead of the graph's inputs; the user's
    (e.g. normalising the images, or a temperature on the logits) are part of what the model computes.
    """
    own = {handle.id for handle in adapter_state(model).hooks}
    saved = [(hooks, key, hook) for hooks in (model._forward_pre_hooks, model._forward_hooks)
             for key, hook in hooks.items() if key in own]
    try:
        for hooks, key, _ in saved:
            hooks[key] = _do_nothing  # in place: the hooks keep their order
        yield
    finally:
        with interrupts_deferred():
            for hooks, key, hook in saved:
                hooks[key] = hook


def _do_nothing(*_: Any, **__: Any) -> None:
    """A forward (pre-)hook that changes nothing."""


@contextmanager
def _substituted(model: nn.Module, values: Dict[str, Tensor]) -> Iterator[None]:
    """Within the block, each named parameter of ``model`` is replaced by the given tensor (a graph input).

    ``torch.func.functional_call`` does the same but refuses to run while tracing, which the ONNX export does.
    """
    swapped = []
    try:  # swapped inside: a parameter swapped before a Ctrl-C stayed a plain tensor that no longer trained
        for name, value in values.items():
            owner, _, attribute = name.rpartition(".")
            module = model.get_submodule(owner)
            swapped.append((module, attribute, module._parameters[attribute]))
            module._parameters[attribute] = value
        yield
    finally:
        with interrupts_deferred():
            for module, attribute, parameter in reversed(swapped):
                module._parameters[attribute] = parameter


def _traceable(model: nn.Module) -> nn.Module:
    """``model``, or a copy a task-input graph can trace: without quantisation-aware training (a graph input is the
    task's tensor as its file holds it, which quantising again, to the model's width, would change), and with modules
    compiled in place (``module.compile()``) running eagerly, which ``torch.jit.trace`` requires."""
    compiled = [name for name, module in model.named_modules() if module.__dict__.get("_compiled_call_impl")]
    quantised = quantization_aware_bits(model) is not None
    if not quantised and not compiled:
        return model
    copied = copy.deepcopy(model)
    for name in compiled:
        copied.get_submodule(name)._compiled_call_impl = None
    return set_quantization_aware(copied, None) if quantised else copied


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _input_size(model: nn.Module) -> Tuple[int, ...]:
    """(C, H, W) the model was built for: its patch embedding's image size, else the model's own (CrossViT's, whose
    patch embeddings are a list; MaxViT's), else its pretrained config's."""
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None) or _pair(getattr(model, "img_size", None))
    if size is not None:
        channels = image_channels(model)
        return (3 if channels is None else channels, *size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" not in cfg:
        raise ValueError(f"cannot tell the image size {type(model).__name__} takes: pass input_size=(3, H, W)")
    return tuple(cfg["input_size"])


def _pair(size: Any) -> Optional[Tuple[int, int]]:
    """An image size a model records as an int or an (H, W) pair, as (H, W); None for anything else."""
    if isinstance(size, int) and not isinstance(size, bool):
        return size, size
    if isinstance(size, Sequence) and len(size) == 2 and all(isinstance(n, int) for n in size):
        return tuple(size)
    return None


def _require_runs_at(model: nn.Module, size: Tuple[int, ...], parameter: Tensor) -> None:
    """Refuse the pretrained config's image size for a model that records no size of its own (Hiera, LeViT) where it
    fails at that size: built for another one, its trace failed deep inside torch with a shape mismatch."""
    images = torch.zeros(1, *size, device=parameter.device, dtype=parameter.dtype)
    try:
        with _as_served(model):
            model(images)
    except (RuntimeError, ValueError, AssertionError, IndexError) as error:  # IndexError: MViTv2's position tables
        raise ValueError(f"export_onnx: {type(model).__name__} records no image size of its own, and a pass at its "
                         f"pretrained config's {size[1]}×{size[2]} fails ({type(error).__name__}: {error}); pass "
                         "input_size=(3, H, W), the size it was built for") from error


def _check_input_size(size: Any, model: nn.Module) -> None:
    """Refuse an ``input_size`` that is not (C, H, W), or not the size a fixed-size ViT was built for, now: traced,
    it fails deep inside the model's forward."""
    if isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 3 and all(
            isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > 0 for n in size):
        embed = getattr(model, "patch_embed", None)
        built = tuple(getattr(embed, "img_size", None) or ())
        channels = image_channels(model)
        if isinstance(channels, int) and size[0] != channels:
            raise ValueError(f"input_size {tuple(size)}: the model takes {channels}-channel images; export at "
                             f"({channels}, {size[1]}, {size[2]})")
        patch = tuple(getattr(embed, "patch_size", None) or ())
        proj = getattr(embed, "proj", None)
        overlapping = isinstance(proj, nn.Conv2d) and tuple(proj.stride) != tuple(proj.kernel_size)  # PVT-v2's
        if len(patch) == 2 and (size[1] % patch[0] or size[2] % patch[1]) and not overlapping and not getattr(
                embed, "dynamic_img_pad", False):
            raise ValueError(f"input_size {tuple(size)}: {size[1]}×{size[2]} is not a multiple of the model's "
                             f"{patch[0]}×{patch[1]} patches; export at a multiple (e.g. "
                             f"({size[0]}, {size[1] - size[1] % patch[0] or patch[0]}, "
                             f"{size[2] - size[2] % patch[1] or patch[1]}))")
        if getattr(model, "dynamic_img_size", False) and built and tuple(size[1:]) != built:
            raise ValueError(f"input_size {tuple(size)}: the model resamples its position embeddings to sizes other "
                             f"than the {built[0]}×{built[1]} it was built for with antialiased bicubic "
                             "interpolation, which ONNX has no operator for: export at "
                             f"({size[0]}, {built[0]}, {built[1]}), or build the model with img_size={tuple(size[1:])}")
        if getattr(embed, "strict_img_size", False) and built and tuple(size[1:]) != built:
            raise ValueError(f"input_size {tuple(size)}: the model was built for {built[0]}×{built[1]} images; export "
                             f"at (3, {built[0]}, {built[1]}), or build it with img_size={tuple(size[1:])} for that "
                             "size (dynamic_img_size=True resamples its position embeddings with an interpolation "
                             "ONNX has no operator for)")
        return
    try:
        example = f"{tuple(_input_size(model))}, the size the model was built for"
    except ValueError:
        example = "(3, 224, 224)"
    raise ValueError(f"input_size must be 3 positive ints (channels, height, width), e.g. {example}; got {size!r}")


@contextmanager
def _as_served(model: nn.Module) -> Iterator[None]:
    """Eval mode, no gradients, no autocast and no gradient checkpointing while tracing; the modules' settings come
    back.

    A graph has no backward to save memory for, and timm's re-entrant checkpointing (``set_reentrant_ckpt(True)``)
    runs even without gradients, where the tracer fails inside torch (``unordered_map::at``). An autocast around the
    export (a bf16-mixed Lightning hook's) would be traced into the graph as casts: 16-bit products in a float32
    graph, and bfloat16 ones ONNX Runtime cannot load.
    """
    training = {module: module.training for module in model.modules()}
    checkpointing = checkpointing_modules(model)
    try:  # set inside: a Ctrl-C during model.eval() left part of a training model in eval mode
        model.eval()
        for module in checkpointing:
            module.grad_checkpointing = False
        with torch.no_grad(), _no_autocast():
            yield
    finally:
        with interrupts_deferred():
            for module, mode in training.items():
                module.training = mode
            for module in checkpointing:
                module.grad_checkpointing = True


@contextmanager
def _no_autocast() -> Iterator[None]:
    """Autocast off on every device type torch can autocast on (the model may sit on any of them)."""
    with ExitStack() as stack:
        for device in ("cpu", "cuda", "xpu", "mps"):
            stack.enter_context(full_precision(torch.device(device)))
        yield


def _export(module: nn.Module, args: Tuple[Tensor, ...], input_names: List[str], path: PathLike,
            metadata: Optional[Dict[str, str]] = None) -> Path:
    """The legacy (TorchScript) exporter, into a private folder, then written to ``path`` by ``_write_graph``.

    The dynamo exporter needs onnxscript, an extra package. A graph over 2 GB has its tensors in external files named
    after the parameters, beside the file it is exported to: in the private folder they neither collide with another
    graph's nor stay behind.
    """
    name, written = os.path.basename(os.path.realpath(path)), []
    try:
        with atomic_path(path) as tmp, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export",
                                    category=DeprecationWarning)
            with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=f"{tmp.name}.") as folder:
                exported = Path(folder) / "graph.onnx"
                try:
                    torch.onnx.export(module, args, str(exported), input_names=input_names, output_names=["logits"],
                                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
                except torch.onnx.errors.UnsupportedOperatorError as error:
                    raise ValueError(
                        f"export_onnx: {type(getattr(module, 'model', module)).__name__}'s forward pass uses an "
                        f"operator that ONNX cannot express ({error}), so the model cannot be exported to ONNX. "
                        "One such: a position embedding resampled with antialiased bicubic interpolation (NaFlexViT "
                        "at any size, a dynamic-size ViT at sizes other than its own)") from error
                external = len(os.listdir(folder)) > 1  # the tensors' files beside the graph
                if metadata or external:
                    _write_graph(exported, tmp, name, metadata or {}, external, written)
                else:
                    shutil.copyfile(exported, tmp)  # into the file atomic_path locked, not a rename over it
            replaced = _own_external_data(tmp.parent / name)
    except BaseException:
        for data in written:
            data.unlink(missing_ok=True)
        raise
    for data in replaced:
        data.unlink(missing_ok=True)
    return Path(path)


def _write_graph(exported: Path, tmp: Path, name: str, metadata: Dict[str, str], external: bool,
                 written: List[Path]) -> None:
    """Write the graph at ``exported`` to ``tmp`` (renamed to ``name`` next) with ``metadata`` added, and its
    ``external`` data to one file of its own beside it, ``<name>.<8 hex digits>.data``, appended to ``written``.

    A new name per export: a graph already at ``name`` keeps reading its own data until the rename replaces it, and
    ``_export`` then removes that data (``_own_external_data``). An export killed after writing the data leaves it,
    unreferenced. Saved as one protobuf, a graph with its data would exceed protobuf's 2 GB.
    """
    onnx = _import_onnx()
    graph = _load_protobuf(exported)
    for key, value in metadata.items():
        graph.metadata_props.add(key=_PREFIX + key, value=value)
    if not external:
        onnx.save(graph, str(tmp), format="protobuf")
        return
    from onnx.external_data_helper import load_external_data_for_model

    load_external_data_for_model(graph, str(exported.parent))
    location = f"{name}.{secrets.token_hex(4)}.data"
    written.append(tmp.parent / location)
    onnx.save_model(graph, str(tmp), format="protobuf", save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location)
    with open(tmp.parent / location, "rb") as data:
        os.fsync(data.fileno())  # on disk before the graph that reads it is renamed into place


def _refuse_replacing_other_files(path: Path) -> None:
    """Refuse an export onto an existing file that is not an ONNX graph (an earlier export is replaced): a checkpoint
    or an adapter's file named by mistake would be lost."""
    if path.is_file() and path.stat().st_size and not _is_onnx_graph(path):
        raise ValueError(f"{path} exists and is not an ONNX graph (an earlier export would be replaced), so the export "
                         "would overwrite it: pass another path (or remove the file)")


# The tags a ModelProto field after ir_version starts with (producer_name, producer_version, domain, model_version,
# doc_string, graph, opset_import, metadata_props, training_info): what an exporter writes third.
_MODEL_FIELD_TAGS = frozenset((0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72, 0x7A))
_LARGEST_GRAPH_FILE = 2**31  # protobuf's limit: a larger graph keeps its tensors in external data files


def _is_onnx_graph(path: Path) -> bool:
    """Whether ``path`` holds an ONNX model with a graph. Its first bytes must be those exporters write (the
    ``ir_version`` field: tag 0x08 and a small version, then another field's tag), which a checkpoint (a zip), JSON or
    a safetensors file (8 bytes of header length, whose second and third bytes are 0 below 256 bytes and a valid tag
    only for headers of megabytes) do not have; then it must parse, and be under protobuf's 2 GB."""
    with open(path, "rb") as stream:
        head = stream.read(3)
    if len(head) < 3 or head[0] != 0x08 or not 1 <= head[1] < 0x80 or head[2] not in _MODEL_FIELD_TAGS:
        return False
    if path.stat().st_size >= _LARGEST_GRAPH_FILE:
        return False
    try:
        _import_onnx()
    except ImportError:  # the merged export needs no onnx package: the first bytes decide
        return True
    from google.protobuf.message import DecodeError  # onnx's own dependency

    try:
        return len(_load_protobuf(path).graph.node) > 0
    except (OSError, DecodeError, ValueError):
        return False


def _own_external_data(graph: Path) -> List[Path]:
    """The external data files ``_write_graph`` wrote for the graph now at ``graph`` (none where it has none)."""
    pattern = re.compile(rf"{re.escape(graph.name)}\.[0-9a-f]{{8}}\.data")
    if not graph.is_file() or not any(pattern.fullmatch(entry) for entry in os.listdir(graph.parent)):
        return []
    from google.protobuf.message import DecodeError  # onnx's own dependency

    try:
        tensors = _load_protobuf(graph).graph.initializer
    except (OSError, DecodeError):  # not a graph: it references nothing
        return []
    locations = {entry.value for tensor in tensors for entry in tensor.external_data if entry.key == "location"}
    return [graph.parent / location for location in sorted(locations) if pattern.fullmatch(location)]


def _import_onnx():
    try:
        import onnx
    except ImportError as error:
        raise ImportError("task-input ONNX graphs record which tasks fit them with the onnx package: "
                          "pip install onnx (or nola_vision[onnx])") from error
    return onnx


def _graph_metadata(model: nn.Module) -> Dict[str, str]:
    """What a task must match to fit the graph: backbone, adapter config, bases, head size, and frozen weights (their
    fingerprint as adapter files record it)."""
    state = adapter_state(model)
    fingerprint = adapter_fingerprint(model, state.plan)
    metadata = {"format": GRAPH_FORMAT, "backbone": architecture_name(model),
                "config": _canonical(state.config_dict()), "basis_fingerprint": state.plan.basis_fingerprint() or "",
                "generator_version": GENERATOR_VERSION, "num_classes": str(num_classes_of(model)),
                "pooling": json.dumps(pooling_of(model)), "settings": json.dumps(output_settings(model)),
                "frozen_weights": _canonical(fingerprint), "layers": _canonical(layer_shapes(model))}
    if fingerprint is not None:
        metadata["frozen_sample_sizes"] = _canonical(sample_sizes(model, fingerprint))
    return metadata


def _same_update(graph_config: Optional[str], task_config: Any) -> bool:
    """Whether a task's config gives its tensors the update the graph's does (``AdapterConfig.same_update``)."""
    try:
        return graph_config is not None and config_from_dict(json.loads(graph_config)).same_update(
            config_from_dict(task_config))
    except (TypeError, ValueError):  # not a config this library reads: it cannot fit
        return False


def _canonical(config: Any) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def _task_shapes(document: dict, stored: Dict[str, Tensor], quantization: dict,
                 graph_inputs: Optional[Dict[str, Tuple[Any, ...]]] = None) -> Dict[str, Tuple[int, ...]]:
    """Shapes of a task's tensors: the method's shapes of each adapted layer, and the head's.

    Integer codes of a head are stored flat, without their shape: a graph's input of that name gives it; without a
    graph, a head of one ``Linear`` (a weight, perhaps a bias) has its class dimension first, and any other head is
    refused (its shapes cannot be told from the file).
    """
    try:
        config = config_from_dict(document["config"])
    except (TypeError, ValueError) as error:
        raise AdapterLoadError(f"the adapter config {document['config']!r} is not valid: {error}") from error
    if config.train_backbone:
        raise AdapterLoadError("a fully fine-tuned task holds every weight, so it has no task-input graph: export "
                               "its model with export_onnx(model, path)")
    layer_cls = method_of(config).layer_cls
    shapes: Dict[str, Tuple[int, ...]] = {}
    for name, layer in document["layers"].items():
        (start, end), count = layer["slices"][0], len(layer["slices"])
        for key, shape in layer_cls.parameter_shapes(config, layer["in"], end - start, count).items():
            shapes[f"{name}.{key}"] = tuple(shape)
    classes = document["num_classes"]
    one_linear = _one_linear(document["head"])
    for name in document["head"]:
        tensor = stored.get(name, torch.empty(0))  # a missing tensor is reported by decode_tensors
        graph_shape = (graph_inputs or {}).get(name)
        if name not in quantization:
            shapes[name] = tuple(tensor.shape)
        elif graph_shape is not None and all(isinstance(d, int) for d in graph_shape):
            shapes[name] = tuple(graph_shape)  # a head tensor the graph lacks is reported by _check_tensor_shapes
        elif not one_linear:
            raise AdapterLoadError(
                f"the task's head is not one Linear layer ({', '.join(document['head'])}), and its {name} is stored "
                "as integer codes, whose shape the file does not hold: pass the graph "
                "(nv.onnx_task_inputs(adapter_dir, graph)) to take the shapes from its inputs")
        else:
            shapes[name] = (classes,) if name.endswith(".bias") else (classes, tensor.numel() // max(classes, 1))
    return shapes


def _head_classes(document: dict, stored: Dict[str, Tensor], quantization: dict) -> int:
    """The rows of a one-Linear head as stored (its bias, one value or code each; a float weight's first dimension),
    else the count the file records: earlier versions recorded timm's stale ``num_classes`` for a head replaced by
    hand (``model.head = nn.Linear(d, 7)`` on a 1000-class model), with 7-row tensors."""
    if not _one_linear(document["head"]):
        return document["num_classes"]
    for name in document["head"]:
        tensor = stored.get(name)
        if tensor is None:
            continue
        if name.endswith(".bias") and tensor.dim() == 1:
            return int(tensor.numel())
        if name not in quantization and tensor.dim() == 2:
            return int(tensor.shape[0])
    return document["num_classes"]


def _one_linear(head: Sequence[str]) -> bool:
    """Whether a head's tensor names are one layer's ``weight`` and perhaps its ``bias``."""
    layers = {name.rpartition(".")[0] for name in head}
    return len(layers) == 1 and {name.rpartition(".")[2] for name in head} <= {"weight", "bias"}


@dataclass(frozen=True)
class _GraphInfo:
    """A graph's nola_vision metadata and the shapes of its inputs (a str for a dynamic axis)."""

    metadata: Dict[str, str]
    inputs: Dict[str, Tuple[Any, ...]]


def _read_graph(graph: Union[PathLike, Any]) -> _GraphInfo:
    """A graph's metadata and inputs, from its path, an ``onnx.ModelProto`` or an ``onnxruntime.InferenceSession``.

    Any other type is refused with a ``TypeError``: duck typing an unknown object would fail with a raw attribute error.
    """
    if isinstance(graph, (str, os.PathLike)):
        graph = _load_graph(os.path.expanduser(os.fspath(graph)))
    if _instance_of(graph, "onnx", "ModelProto"):
        metadata = {entry.key: entry.value for entry in graph.metadata_props}
        inputs = {i.name: tuple(d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim)
                  for i in graph.graph.input}
    elif _instance_of(graph, "onnxruntime", "InferenceSession"):
        metadata = dict(graph.get_modelmeta().custom_metadata_map)
        inputs = {i.name: tuple(i.shape) for i in graph.get_inputs()}
    else:
        raise TypeError(f"graph is a {type(graph).__module__}.{type(graph).__qualname__}: pass the graph that "
                        "export_onnx(model, path, tasks_as_inputs=True) wrote as its path, an onnx.ModelProto "
                        "(onnx.load(path)) or an onnxruntime.InferenceSession")
    return _GraphInfo({k[len(_PREFIX):]: v for k, v in metadata.items() if k.startswith(_PREFIX)}, inputs)


def _load_protobuf(path: PathLike) -> Any:
    """The ONNX model at ``path`` as the binary protobuf export_onnx writes, whatever its suffix (``onnx.load`` picks a
    JSON or text parser for ``.json``, ``.textproto``, ``.onnxtxt``), without its external data: the graph's metadata,
    inputs and data locations are all the library reads."""
    return _import_onnx().load(str(path), format="protobuf", load_external_data=False)


def _load_graph(path: PathLike) -> Any:
    from google.protobuf.message import Error as ProtobufError  # onnx's own dependency

    try:
        return _load_protobuf(path)
    except (OSError, ProtobufError) as error:
        raise AdapterLoadError(f"{path} cannot be read as an ONNX graph ({error}): pass the .onnx file that "
                               "export_onnx(model, path, tasks_as_inputs=True) wrote") from error


def _instance_of(value: Any, module: str, name: str) -> bool:
    """Whether ``value`` is a ``module.name``, without importing ``module`` (its objects exist only once imported)."""
    cls = getattr(sys.modules.get(module), name, None)
    return isinstance(cls, type) and isinstance(value, cls)


def _check_task_fits(document: dict, graph: _GraphInfo, directory: Path) -> None:
    """Raise ``AdapterLoadError`` unless the task's backbone, config, layer sizes, bases, head size, pooling, model
    settings and frozen weights fit the graph (its tensors' shapes: ``_check_tensor_shapes``)."""
    meta = graph.metadata
    if meta.get("format") != GRAPH_FORMAT:
        raise AdapterLoadError("the graph was not written by export_onnx(model, path, tasks_as_inputs=True), so it "
                               "takes no task inputs")
    task = {"backbone": document["backbone"], "config": _canonical(document["config"]),
            "basis_fingerprint": document["basis_fingerprint"] or "", "num_classes": str(document["num_classes"])}
    fixes = {"backbone": "export a graph of that backbone", "config": "export a graph from a model with that config",
             "basis_fingerprint": "its bases (seed, shapes or generator) differ from the graph's: export a graph from "
                                  "a model with the task's config",
             "num_classes": "one graph serves one head size: export another graph from a model with "
                            f"num_classes={document['num_classes']}"}
    for key, value in task.items():
        if key == "basis_fingerprint" and "layers" in meta:  # graphs exported before it was recorded: unchecked
            _check_layer_sizes(document["layers"], json.loads(meta["layers"]), directory)
        fits = _same_update(meta.get(key), document["config"]) if key == "config" else meta.get(key) == value
        if not fits:
            raise AdapterLoadError(f"task {directory} does not fit the graph: its {key} is {value}, the graph's is "
                                   f"{meta.get(key)}; {fixes[key]}")
    if "pooling" in document and "pooling" in meta:  # either may predate the field: then unchecked
        trained, pooling = document["pooling"], json.loads(meta["pooling"])
    else:
        trained = pooling = None
    if trained != pooling:
        raise AdapterLoadError(f"task {directory} does not fit the graph: it was trained with global_pool={trained!r}, "
                               f"the graph pools with {pooling!r}; export a graph from a model created with "
                               f"global_pool={trained!r}")
    graph_settings = json.loads(meta.get("settings", "{}"))
    if changed_settings(document.get("settings") or {}, graph_settings):
        raise AdapterLoadError(f"task {directory} does not fit the graph: it was trained on a model with "
                               f"{document['settings']}, the graph's has {graph_settings} (heads per attention layer, "
                               "activations, normalisation layers and their epsilons, constructor options such as "
                               "pool_include_prefix); export a graph from a model created as in training")
    if "frozen_weights" in meta:  # graphs exported before it was recorded fit any frozen weights
        sizes = json.loads(meta["frozen_sample_sizes"]) if "frozen_sample_sizes" in meta else None  # older: relative
        _check_frozen_weights(document, json.loads(meta["frozen_weights"]), directory, sizes)


def _check_layer_sizes(task: Dict[str, dict], graph: Dict[str, dict], directory: Path) -> None:
    """Raise ``AdapterLoadError`` naming the first adapted layer whose sizes differ between the task and the graph (a
    task trained on a wider backbone of the same name: its bases differ too, but that would not say why)."""
    def size(layer: Optional[dict]) -> str:
        return "not adapted" if layer is None else f"{layer['in']}→{layer['out']}"

    for name in sorted(set(task) | set(graph)):
        if task.get(name) != graph.get(name):
            raise AdapterLoadError(f"task {directory} does not fit the graph: its layer {name} is "
                                   f"{size(task.get(name))}, the graph's {size(graph.get(name))}; export a graph from "
                                   "a model of the architecture and sizes the task was trained on")


def _check_tensor_shapes(values: Dict[str, Tensor], graph: _GraphInfo, directory: Path) -> None:
    """Raise ``AdapterLoadError`` unless the task's decoded tensors have the shapes of the graph's inputs."""
    expected = {name: shape for name, shape in graph.inputs.items() if name != "images"}
    got = {name: tuple(value.shape) for name, value in values.items()}
    if got != expected:
        raise AdapterLoadError(f"task {directory} holds tensors {got}, the graph takes {expected}: export a graph "
                               "from a model with the task's config")


def _check_frozen_weights(document: dict, graph: Optional[dict], directory: Path,
                          sizes: Optional[dict] = None) -> None:
    """Raise ``AdapterLoadError`` unless the graph holds the frozen weights the task was trained on, as
    ``load_adapter`` requires of a model: the same adapters merged into them, and the same fingerprint (format 2
    files have none: only merges are checked), with the graph's ``sizes`` for weights near zero."""
    task = document.get("frozen_weights")
    task_merged, graph_merged = (task or {}).get("merged", []), (graph or {}).get("merged", [])
    if unmatched_merges(task_merged, graph_merged) or unmatched_merges(graph_merged, task_merged):
        raise AdapterLoadError(
            f"task {directory} does not fit the graph: the adapters folded into the frozen weights by "
            f"nv.merge_and_unload differ ({len(graph_merged)} in the graph's, {len(task_merged)} in the task's, not "
            "the same): export the graph from the model the task was trained on")
    unchecked = unchecked_frozen_weights(document)
    if unchecked is not None:  # as load_adapter warns of it
        warn_user(unchecked)
    if task is None or graph is None:
        return
    if task.get("version") != graph.get("version"):
        raise AdapterLoadError(f"task {directory}'s frozen weights were fingerprinted by {task.get('version')!r}, the "
                               f"graph's by {graph.get('version')!r}: export the graph with the nola_vision version "
                               f"{document['library_version']} that wrote the task")
    difference = differing_records(task, graph, sizes)
    if difference is None:
        difference = differing_positions(task, graph)
    if difference is None:  # a graph exported before 2026-12-05 holds no statistics: not compared
        difference = differing_statistics(task, graph)
    if difference is None:  # nor one before 2026-12-07 buffers
        difference = differing_buffers(task, graph)
    if difference is not None:
        raise AdapterLoadError(
            f"task {directory} does not fit the graph: the graph's frozen weights are not those the task was trained "
            f"on: {difference}. Export the graph from a model with the pretrained weights the task was trained on (the "
            "same timm name and pretrained tag, or pretrained_file; another tag, a fine-tune, a random init or weights "
            "with an adapter merged in give other outputs)")
