"""Many tasks on one frozen backbone: a batch whose images belong to different tasks, answered in one pass.

``MultiTaskModel`` wraps a plain timm model. Every linear layer that a registered task adapts gets a forward
hook that adds each image's own task update (x A_t) B_t with two batched matmuls over per-image factors, so the
frozen model runs once for the whole batch: no merge, no task switch, no loop over images. NOLA, LoRA and
head-only tasks share the backbone whatever their targets. Tasks are held as the numbers their adapter files
store; the factors of recently used tasks are cached under a memory budget (least recently used go first).
"""
from __future__ import annotations

import copy
import difflib
import math
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.hooks import RemovableHandle

from ..adapters.files import (
    AdapterLoadError,
    PathLike,
    decode_tensors,
    output_settings,
    pooling_of,
    read_adapter,
    verify_adapter,
)
from ..core.basis import BasisBank
from ..core.checks import check_bool, check_number, check_path, shown
from ..core.fingerprint import recorded_merges
from ..core.functions import autocast_available
from ..core.inject import adapter_state
from ..core.interrupts import all_or_nothing, interrupts_deferred
from ..core.layer import adapted_layers
from ..core.merge import shared_delta_factors
from ..core.plan import InjectionPlan
from ..core.registry import method_of
from ..core.targets import (
    adaptable_linears,
    classifier_head,
    image_channels,
    require_module,
    require_no_inner_wrappers,
    require_no_peft_model,
    require_one_head,
)

__all__ = ["MultiTaskModel"]

# Image shapes whose rows per image a server keeps (``_require_images_first``), the oldest dropped beyond.
_SHAPES_KEPT = 64

# Errors name every registered task up to this many; of more, the closest to a wrong name and the first ones.
_LISTED_TASKS = 10

# Per adapted layer, for the batch being answered: the present tasks' stacked factors A (tasks, in, rank) and
# B (tasks, rank, out), and each image's position in that stack.
LayerBatch = Tuple[Tensor, Tensor, Tensor]


@dataclass
class _Task:
    """A registered task as its file stores it: tensors (float16/32 or integer codes), their quantisation and the
    shapes they decode to, with the injection plan of its config."""

    plan: InjectionPlan
    stored: Dict[str, Tensor]
    quantization: dict
    shapes: Dict[str, Tuple[int, ...]]
    num_classes: int
    class_names: Optional[List[str]] = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.stored.values())

    def __getstate__(self) -> dict:
        """Pickled as its one buffer and where each tensor lies in it: pickle wrote the whole buffer once for every
        tensor viewing it (a task 50 times over on a 12-block ViT, though ``memory_bytes`` counted it once)."""
        return {**self.__dict__, "stored": _buffer_and_layout(self.stored)}

    def __setstate__(self, state: dict) -> None:
        stored = state["stored"]
        if isinstance(stored, tuple):  # its buffer and layout (pickles of earlier versions hold the tensors)
            state = {**state, "stored": _views(*stored)}
        self.__dict__.update(state)


# Where each of a task's tensors lies in its buffer: (name, byte offset, dtype, shape), in order.
_Layout = List[Tuple[str, int, torch.dtype, Tuple[int, ...]]]


def _packed(tensors: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """``tensors`` copied into one buffer, as views of it: a task's tensors are one allocation instead of one per
    tensor (each a small heap block the file's parsing interleaved with its own), so many registered tasks do not
    fragment the heap."""
    return _views(*_buffer_and_layout(tensors))


def _buffer_and_layout(tensors: Dict[str, Tensor]) -> Tuple[Tensor, _Layout]:
    """``tensors`` copied into one byte buffer, each starting at a multiple of 16 bytes (so every dtype's view is
    aligned), with where each lies."""
    sizes = [-(-t.numel() * t.element_size() // 16) * 16 for t in tensors.values()]
    buffer = torch.empty(sum(sizes), dtype=torch.uint8)
    layout, offset = [], 0
    for (name, tensor), size in zip(tensors.items(), sizes):
        nbytes = tensor.numel() * tensor.element_size()
        buffer[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)
        layout.append((name, offset, tensor.dtype, tuple(tensor.shape)))
        offset += size
    return buffer, layout


def _views(buffer: Tensor, layout: _Layout) -> Dict[str, Tensor]:
    """The tensors ``layout`` places in ``buffer``, as views of it."""
    return {name: buffer[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
            for name, offset, dtype, shape in layout}


@dataclass
class _Factors:
    """A task made ready to run: ΔWᵀ = A B per adapted layer (float32, scaling applied) and its head, for the
    backbone's device and head dtype (``placement``)."""

    layers: Dict[str, Tuple[Tensor, Tensor]]
    head: Dict[str, Tensor]
    placement: Tuple[torch.device, torch.dtype]
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        tensors = [t for pair in self.layers.values() for t in pair] + list(self.head.values())
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors)


def _changed_backbone(method: str) -> AdapterLoadError:
    """The refusal of a task of a method that trains the backbone itself (full fine-tuning): it cannot share one."""
    return AdapterLoadError(f"a {method!r} adapter changes the backbone itself, so it cannot share one: serve it on "
                            "its own model with nv.load_adapter")


def _backbone_method(directory: PathLike) -> Optional[str]:
    """The method of the adapter file in ``directory`` where it trains the backbone itself; None otherwise, and where
    the file cannot be read."""
    try:
        method = read_adapter(directory)[0]["method"]
        return method if method_of(method).config_cls.train_backbone else None
    except (AdapterLoadError, OSError, ValueError, KeyError, TypeError):
        return None


class MultiTaskModel(nn.Module):
    """One frozen timm backbone serving many tasks at once: each image of a batch is answered by its own task.

    ``add_task(name, adapter_dir)`` registers an adapter saved by ``save_adapter`` (NOLA, LoRA or a linear
    probe), with its own head and class count; ``model(images, tasks)`` returns one logits tensor per image.
    Inference only. Safe to call from several threads: calls run one at a time, as do ``add_task`` and
    ``remove_task``. A call's task state belongs to its thread, so any other forward pass of the backbone (another
    thread calling it directly, or another ``MultiTaskModel`` wrapping it) runs without this model's updates.

    Args:
        model: a plain timm model (not injected). Its weights are shared and never changed; its head is unused.
        cache_mb: memory budget for the factors and heads of recently used tasks and the random bases held to
            combine new ones (released first: generated again when a new task is combined); tasks outside it are
            kept only as the numbers their files hold and combined again when next used.
    """

    # Read by core.targets.require_module: inject, load_adapter, merge and the like would change the shared backbone.
    adapter_call_refusal = ("a MultiTaskModel serves the tasks added with served.add_task(name, adapter_dir) and "
                            "takes no adapter of its own, which would change the backbone every task shares: save "
                            "the adapter with nv.save_adapter and add it as a task")

    def __init__(self, model: nn.Module, cache_mb: float = 256.0) -> None:
        require_module(model, "MultiTaskModel", adaptable=False)
        require_no_peft_model(model, "MultiTaskModel")
        super().__init__()
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            raise ValueError("MultiTaskModel serves a plain timm model, and this one is torch.compile'd (its hooks "
                             "and methods belong to the module it wraps): pass the plain model and compile the "
                             "served model instead, torch.compile(nv.MultiTaskModel(model))")
        require_no_inner_wrappers(model, "nv.MultiTaskModel")
        if _has_adapters(model):
            raise ValueError("MultiTaskModel serves a plain timm model, and this one has adapters injected: pass a "
                             "fresh timm.create_model(...) (or call nv.unload(model) first)")
        require_one_head(model, headless_serves=False)
        head = classifier_head(model)
        if head is None or not callable(getattr(model, "forward_head", None)):
            raise ValueError("MultiTaskModel needs a timm classifier (forward_features, forward_head and a head "
                             "layer): create the backbone with any num_classes > 0")
        _require_head_after_pooling(model, head)
        _require_no_model_hooks(model, "")
        self._cache_mb = float(check_number(cache_mb, "MultiTaskModel.cache_mb", at_least=0))
        self.model = model.eval()
        self._head_name = next(name for name, module in model.named_modules() if module is head)
        self._tasks: Dict[str, _Task] = {}
        self._contexts: Dict[type, dict] = {}
        self._cache: OrderedDict[str, _Factors] = OrderedDict()
        self._hooks: Dict[str, RemovableHandle] = {}
        # Per image shape: the rows each hooked layer's input has for one image (1 where images come first)
        self._rows_per_image: Dict[Tuple[int, ...], Dict[str, int]] = {}
        self._finalizer = _removing_hooks_when_collected(self)
        self._call = _Call()
        self._merged = recorded_merges(model)  # the merges recorded when wrapped; a later merge is refused
        # The weights the tasks were checked against (None: recorded at the next call); a later change is refused.
        self._weights: Optional[_WeightRecord] = _WeightRecord(model)
        self._copied_weights: Optional[Dict[str, _Sample]] = None  # a copy's original's weights (see __setstate__)
        self._lock = threading.RLock()

    def train(self, mode: bool = True) -> MultiTaskModel:
        """Inference only: the shared backbone stays in eval mode (train mode would change its norms' running
        statistics, and with them every task's outputs, for good)."""
        super().train(mode)
        self.model.eval()
        return self

    def __copy__(self) -> MultiTaskModel:
        """Refused: a shallow copy would share the backbone and its hooks, which call this server (the copy served
        nothing, and collecting it removed the hooks this server serves by)."""
        raise TypeError("copy.copy of a MultiTaskModel would share its backbone's hooks with this server, and serve "
                        "nothing: copy.deepcopy(server) gives a second server with its own backbone, or build "
                        "another MultiTaskModel on the same backbone and add the tasks to it")

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in ("_lock", "_call", "_weights", "_finalizer"):  # each copy gets its own (see __setstate__)
            state.pop(name)
        if self._weights is not None:  # a copy's first call checks its weights against these values
            state["_copied_weights"] = self._weights.samples_for_copy()
        return state

    def __setstate__(self, state: dict) -> None:
        for name in ("_batch", "_applied"):  # pickled when the per-call state was kept on the model
            state.pop(name, None)
        if "cache_mb" in state:  # pickled when the budget was a plain attribute
            state["_cache_mb"] = state.pop("cache_mb")
        state.setdefault("_merged", recorded_merges(state["_modules"]["model"]))
        super().__setstate__(state)
        # A lock and a thread-local do not copy or pickle. Copied weights have new version counters: recorded at the
        # first call, since the model may still be half copied here (its hooks lead a copy through this object), after
        # comparing them with the original's sampled values (pickles from before they were kept: not compared).
        self._lock = threading.RLock()
        self._call = _Call()
        self._finalizer = _removing_hooks_when_collected(self)
        self._weights = None
        self.__dict__.setdefault("_copied_weights", None)
        self.__dict__.setdefault("_rows_per_image", {})

    @property
    def cache_mb(self) -> float:
        """The factor cache's budget in MiB (0 caches nothing); checked when set, as at construction. A lower budget
        frees what no longer fits at once, not at the next call."""
        return self._cache_mb

    @cache_mb.setter
    def cache_mb(self, value: float) -> None:
        budget = float(check_number(value, "MultiTaskModel.cache_mb", at_least=0))
        with self._lock:
            self._cache_mb = budget
            self._keep_within_budget()

    @property
    def tasks(self) -> List[str]:
        """Names of the registered tasks, in the order they were added."""
        return list(self._tasks)

    @property
    def cached_tasks(self) -> List[str]:
        """Tasks whose factors are cached, least recently used first."""
        return list(self._cache)

    def num_classes(self, task: str) -> int:
        return self._task(task).num_classes

    def class_names(self, task: str) -> Optional[List[str]]:
        """The names of ``task``'s outputs, in order, where its file records them (``save_adapter(class_names=)``;
        the CLI records the dataset's); None otherwise."""
        names = self._task(task).class_names
        return list(names) if names is not None else None  # a caller's edit must not relabel the task

    def add_task(self, name: str, adapter_dir: PathLike, *, check_frozen_weights: bool = True,
                 allow_unchecked_legacy: bool = False) -> None:
        """Register the adapter in ``adapter_dir`` as task ``name``, checked as ``load_adapter`` checks it.

        Checked before it is accepted: file fields and checksums, backbone architecture and layer widths, the
        fingerprint of the regenerated random bases, the backbone's frozen weights against the fingerprint saved
        with the adapter (``check_frozen_weights=False`` skips it, for a deliberate transfer), tensor sizes and
        finite values. ``allow_unchecked_legacy`` admits format 1 files, which carry no checksums.
        """
        adapter_dir = check_path(adapter_dir, "the adapter directory", expand_user=True)
        check_bool(check_frozen_weights, "add_task: check_frozen_weights")
        check_bool(allow_unchecked_legacy, "add_task: allow_unchecked_legacy")
        if not isinstance(name, str) or not name:
            raise TypeError(f"a task name is a non-empty str (batches name their tasks by it), got {name!r}")
        if name in self._tasks:
            raise ValueError(f"task {name!r} is already registered: call remove_task({name!r}) first to replace it")
        try:
            task = self._read_task(Path(adapter_dir), check_frozen_weights=check_frozen_weights,
                                   allow_unchecked_legacy=allow_unchecked_legacy)
        except AdapterLoadError as error:
            raise AdapterLoadError(f"task {name!r} ({adapter_dir}): {error}") from error
        with self._lock:
            if name in self._tasks:
                raise ValueError(f"task {name!r} is already registered: call remove_task({name!r}) first to "
                                 "replace it")
            if not self._tasks:  # no task holds on to earlier weights: the ones this task was checked against count
                self._weights, self._copied_weights = _WeightRecord(self.model), None
            # the task with all its hooks, or none: a task registered with a layer left unhooked served without
            # that layer's update, and could not be added again
            with all_or_nothing("add_task") as undo:
                self._tasks[name] = self._sharing_plans(task)
                undo.append(lambda: self._forget(name))
                self._hook_layers()

    def remove_task(self, name: str) -> None:
        """Forget a task, its cached factors and the random bases no other task uses (and, with the last task, the
        backbone's hooks)."""
        with self._lock:
            self._task(name)
            self._forget(name)
            used = {method_of(task.plan.config).layer_cls for task in self._tasks.values()}
            for layer_cls in set(self._contexts) - used:
                del self._contexts[layer_cls]
            kept = {spec for task in self._tasks.values() for layer in task.plan.layers.values()
                    for spec in layer.basis_specs}
            for bank in self._banks():  # those of the remaining tasks stay: generating them again costs a step's time
                bank.retain(kept)

    def memory_bytes(self) -> Dict[str, int]:
        """Bytes held: the tasks' stored numbers, the factor cache, and the shared random bases."""
        with self._lock:
            return {"tasks": sum(task.nbytes() for task in self._tasks.values()),
                    "cache": sum(factors.nbytes for factors in self._cache.values()),
                    "bases": sum(bank.nbytes() for bank in self._banks())}

    def _forget(self, name: str) -> None:
        """Drop task ``name``, its cached factors and the hooks no other task needs."""
        del self._tasks[name]
        self._cache.pop(name, None)
        self._hook_layers()

    def _banks(self) -> List[BasisBank]:
        return [bank for context in self._contexts.values() for bank in _context_banks(context)]

    @torch.no_grad()
    def forward(self, images: Tensor, tasks: Union[str, Sequence[str]]) -> List[Tensor]:
        """Logits of every image under its own task: one tensor per image, of its task's class count.

        ``tasks`` names one registered task per image (a single name: the whole batch). The frozen backbone runs
        once for the batch; each adapted layer adds every image's task update in two batched matmuls.
        """
        with self._lock:
            names = self._check_tasks(images, tasks)
            self._require_unchanged_backbone()
            present = list(dict.fromkeys(names))
            position = {task: i for i, task in enumerate(present)}
            index = torch.tensor([position[task] for task in names], device=images.device)
            factors = self._factors(present)
            batches = self._layer_batches(factors, index)
            if len(present) > 1:
                self._require_images_first(images, batches)
            call = self._call
            call.batch, call.applied = batches, set()
            try:
                features = self._pooled_features(images)
                self._require_every_update_applied()
            finally:
                call.batch = {}
            head = _private_copy(self.model.get_submodule(self._head_name))
            logits: List[Optional[Tensor]] = [None] * len(names)
            for i, task in enumerate(factors):  # heads differ in size per task: one matmul per task present
                rows = (index == i).nonzero().squeeze(1)
                for row, value in zip(rows.tolist(), functional_call(head, task.head, (features[rows],))):
                    logits[row] = value
        return logits  # type: ignore[return-value]

    # Bookkeeping that must run at every call: traced, dynamo inlines a walk over every entry (which once exceeded
    # its recursion limit in the full suite) and reads a hook's __qualname__ as a descriptor.
    @torch.compiler.disable
    def _require_unchanged_backbone(self) -> None:
        """Refuse to serve once the wrapped model itself was adapted or had an adapter merged in (``load_adapter`` or
        ``merge_and_unload`` on it): its layers no longer run the hooks, or run them on top of another task. Also once
        it got model-level forward hooks, which a call would skip, or its weights, buffers or settings were written or
        replaced, which the tasks were not checked against; and while it is in train mode."""
        if _has_adapters(self.model):
            raise RuntimeError("the model this MultiTaskModel serves was given adapters since it was wrapped "
                               "(nv.inject or nv.load_adapter on it): its tasks would be served through the wrong "
                               "layers. Serve single tasks on another copy of the backbone, or nv.unload(model) first")
        if recorded_merges(self.model) != self._merged:  # a write of the weights is found below
            raise RuntimeError("the model this MultiTaskModel serves had an adapter merged into its weights since it "
                               "was wrapped (nv.merge_and_unload): every task would get that update too. Wrap a fresh "
                               "timm.create_model(...) instead")
        _require_no_model_hooks(self.model, " since it was wrapped")
        if self._weights is None:
            record = _WeightRecord(self.model)
            change = record.differs_from(self._copied_weights)
            if change is None:
                self._weights, self._copied_weights = record, None
        else:
            change = self._weights.change(self.model)
        if change is not None:
            raise RuntimeError(f"the weights of the model this MultiTaskModel serves changed since its tasks were "
                               f"registered: {change} (by load_state_dict, an optimizer step or an assignment), and "
                               "add_task checked each task against the weights it had then. Wrap the backbone in a "
                               "new nv.MultiTaskModel and add the tasks again, which checks them against these "
                               "weights (or remove_task every task and add them again)")
        if any(module.training for module in self.model.modules()):  # named only when refused: this runs every call
            training = next(name for name, module in self.model.named_modules() if module.training)
            raise RuntimeError(f"the model this MultiTaskModel serves is in train mode ({training or 'the model'}; "
                               "model.train() was called on it since it was wrapped): its batch norms would fold the "
                               "served images into their running statistics for good and its dropout would drop at "
                               "random, so each image's logits would depend on its batch. Call served.eval() (or "
                               "model.eval()) before serving")

    def _pooled_features(self, images: Tensor) -> Tensor:
        """The backbone's pooled features (its head's input), each hooked layer adding the call's task updates."""
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)

    @torch.compiler.disable
    def _require_images_first(self, images: Tensor, layers: Dict[str, LayerBatch]) -> None:
        """Refuse a batch mixing tasks over an adapted layer whose input is not one row per image: found once per
        image shape by a pass of one image, since a count of rows equal to the batch's can be chance (a relative-
        position MLP reads a 27-row table of positions, the same for every image: a batch of 27 gave its rows
        different tasks' updates, silently)."""
        shape = tuple(images.shape[1:])
        rows = self._rows_per_image.get(shape)
        if rows is None:
            call = self._call
            call.rows = {}
            try:
                self._pooled_features(images[:1])
            finally:
                rows, call.rows = call.rows, None
            if len(self._rows_per_image) >= _SHAPES_KEPT:  # a server of images of any size: the oldest goes
                del self._rows_per_image[next(iter(self._rows_per_image))]
            self._rows_per_image[shape] = rows
        name = next((name for name in layers if rows.get(name, 1) != 1), None)
        if name is not None:
            raise RuntimeError(f"layer {name}'s input is not one row per image (it has {rows[name]} rows for one "
                               "image: windows or tokens first, as Swin's window attention, or a table computed from "
                               "positions alone, as a relative-position MLP's), so a batch mixing tasks cannot give "
                               "each image its own update there. Serve the tasks that adapt it one task per batch "
                               "(model(images, 'task')), or mix tasks that adapt other layers")

    def _require_every_update_applied(self) -> None:
        """Refuse outputs without an update a task holds: a hooked layer that the backbone never called (its parent
        reads ``layer.weight`` directly, as timm's BEiT and EVA attention read ``qkv``)."""
        skipped = sorted(set(self._call.batch) - self._call.applied)
        if skipped:
            raise ValueError(f"adapted layer {skipped[0]} was never called in the backbone's forward pass (its parent "
                             "reads the layer's weight directly, e.g. F.linear(x, self.qkv.weight, bias)), so a task's "
                             "update there would be silently left out: serve tasks that adapt other layers of this "
                             "model (e.g. mlp.fc1, mlp.fc2, attn.proj)")

    def _task(self, name: str) -> _Task:
        if not isinstance(name, str):
            raise TypeError(f"a task is named by a str, got {shown(name)}; {self._registered()}")
        if name not in self._tasks:
            raise ValueError(f"unknown task {name!r}; {self._registered(name)} (add_task(name, adapter_dir) registers "
                             "one)")
        return self._tasks[name]

    def _registered(self, wrong: Optional[str] = None) -> str:
        """The registered tasks as an error names them: all of a few; of many, their count, the names closest to
        ``wrong`` and the first few (a typo in a server of thousands of tasks logged every name)."""
        names = sorted(self._tasks)
        if len(names) <= _LISTED_TASKS:
            return f"registered tasks are {names}"
        close = difflib.get_close_matches(wrong, names, n=3, cutoff=0.6) if wrong is not None else []
        closest = f"closest: {close}; " if close else ""
        return (f"{len(names)} tasks are registered ({closest}the first {_LISTED_TASKS}: {names[:_LISTED_TASKS]}; "
                "MultiTaskModel.tasks lists them all)")

    def _check_tasks(self, images: Tensor, tasks: Union[str, Sequence[str]]) -> List[str]:
        if not self._tasks:
            raise ValueError("no task is registered: add one with add_task(name, adapter_dir)")
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise ValueError(f"images must be one batch tensor (images, channels, height, width), got "
                             f"{shown(images) if not isinstance(images, Tensor) else f'shape {tuple(images.shape)}'}: "
                             "stack single images with torch.stack (or add a batch dimension with image[None])")
        dtype = next(self.model.parameters()).dtype
        autocast = autocast_available(images.device.type) and torch.is_autocast_enabled(images.device.type)
        if not images.is_floating_point() or (images.dtype != dtype and not autocast):
            raise ValueError(f"images are {images.dtype} and the backbone's weights {dtype}: pass images as the "
                             f"model's float type (images.to({dtype})), normalised as for the backbone")
        _require_image_size(self.model, images)
        count = images.shape[0]
        names = [tasks] * count if isinstance(tasks, str) else tasks
        if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
            raise ValueError(f"tasks must be one task name (str) for the whole batch or a list of names, one per "
                             f"image, got {shown(tasks)}; {self._registered()}")
        if len(names) != count:
            raise ValueError(f"got {len(names)} task names for {count} images: pass one task name per image (or "
                             "a single name for the whole batch)")
        for name in dict.fromkeys([tasks] if isinstance(tasks, str) else names):  # an empty batch's name too
            self._task(name)
        return list(names)

    def _read_task(self, directory: Path, **checks: bool) -> _Task:
        """A task checked by ``verify_adapter`` (any class count: each task has its own head), kept as stored."""
        try:
            verified = verify_adapter(self.model, directory, match_num_classes=False, **checks)
        except AdapterLoadError as error:  # a full fine-tune's file: that cause, not what followed from it (a shape)
            method = _backbone_method(directory)
            if method is not None:
                raise _changed_backbone(method) from error
            raise
        if verified.plan.config.train_backbone:
            raise _changed_backbone(verified.plan.config.method)
        return _Task(verified.plan, _packed(verified.stored), verified.quantization, verified.shapes,
                     verified.num_classes, verified.class_names)

    def _sharing_plans(self, task: _Task) -> _Task:
        """``task`` holding the plan and shapes of an equal registered task: tasks of one config on one backbone
        share them, instead of a thousand tasks holding a thousand copies (about 45 KB each for ViT-B). Only the
        distinct plans held are compared: a few (one per config and head size), however many tasks there are."""
        distinct = {id(other.plan): other for other in self._tasks.values()}
        for other in distinct.values():
            if other.plan == task.plan:
                task.plan = other.plan
                if other.shapes == task.shapes:
                    task.shapes = other.shapes
                break
        return task

    def _hook_layers(self) -> None:
        """While any task is registered, one forward hook on every linear layer a task can adapt (outside the head),
        not only those the tasks adapt: a compiled served model inlines the hooks it finds at its first call, and
        torch.compile does not guard on hooks, so a task added later would not be applied there. A layer no task of
        a batch adapts returns its output at once. Without tasks the backbone carries none."""
        self._rows_per_image.clear()  # found again for the layers hooked now
        wanted = set(adaptable_linears(self.model)) if self._tasks else set()
        wanted |= {layer for task in self._tasks.values() for layer in task.plan.layers}
        for name in sorted(set(self._hooks) - wanted):
            with interrupts_deferred():  # a hook removed and forgotten together
                self._hooks[name].remove()
                del self._hooks[name]
        for name in sorted(wanted - set(self._hooks)):
            with interrupts_deferred():  # a hook registered and kept together: one not kept was never removed
                self._hooks[name] = self.model.get_submodule(name).register_forward_hook(_LayerHook(self, name))

    def _add_updates(self, name: str, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        """Forward hook: y + (x A_t) B_t with each image's task t, as two batched matmuls over per-image factors."""
        call = self._call
        if call.rows is not None:  # a pass of one image: how many rows the layer's input has (_require_images_first)
            call.rows.setdefault(name, args[0].shape[0])
            return output
        batch = call.batch.get(name)
        if batch is None:  # not this model's call on this thread, or no task of this batch adapts the layer
            return output
        call.applied.add(name)
        a, b, index = batch
        x = args[0]
        dtype = output.dtype  # under autocast it may differ from the input's and the weight's
        if a.shape[0] == 1:  # a single task: two plain matmuls, no per-image factors
            flat = output.view(-1, output.shape[-1])
            xa = (x @ a[0].to(x.dtype)).reshape(flat.shape[0], -1)
            return flat.addmm_(xa.to(dtype), b[0].to(dtype)).view(output.shape)
        images = index.shape[0]
        if x.shape[0] != images:
            raise RuntimeError(f"layer {name} sees {x.shape[0]} rows for a batch of {images} images (windows or "
                               "tokens first, as Swin's window attention): a batch mixing tasks needs adapted layers "
                               "that keep the image dimension first. Serve the tasks that adapt it one task per "
                               "batch (model(images, 'task')), or mix tasks that adapt other layers")
        xa = torch.bmm(x.reshape(images, -1, x.shape[-1]), a.index_select(0, index).to(x.dtype))
        output.view(images, -1, output.shape[-1]).baddbmm_(xa.to(dtype), b.index_select(0, index).to(dtype))
        return output

    def _layer_batches(self, factors: List[_Factors], index: Tensor) -> Dict[str, LayerBatch]:
        """Per hooked layer, the present tasks' factors stacked: zero-padded to the largest rank, zero for a task
        that does not adapt the layer."""
        batches = {}
        for name in dict.fromkeys(layer for task in factors for layer in task.layers):
            if name not in self._hooks:  # its update would be silently left out
                raise RuntimeError(f"layer {name} of a task carries no hook of this MultiTaskModel: remove_task "
                                   "and add_task the tasks again")
            pairs = [task.layers.get(name) for task in factors]
            ranks = [pair[0].shape[1] for pair in pairs if pair is not None]
            weight = self.model.get_submodule(name).weight
            a = weight.new_zeros(len(pairs), weight.shape[1], max(ranks))
            b = weight.new_zeros(len(pairs), max(ranks), weight.shape[0])
            for i, pair in enumerate(pairs):
                if pair is not None:
                    a[i, :, : pair[0].shape[1]] = pair[0]
                    b[i, : pair[1].shape[0]] = pair[1]
            batches[name] = (a, b, index)
        return batches

    def _factors(self, names: List[str]) -> List[_Factors]:
        """Factors of ``names`` in order: cached ones marked recently used, the others combined together, then the
        cache trimmed to its budget, least recently used first."""
        weight = next(self.model.get_submodule(self._head_name).parameters())  # the head may be several layers
        placement = (weight.device, weight.dtype)
        missing = [name for name in names if name not in self._cache or self._cache[name].placement != placement]
        self._cache.update(self._materialise(missing, placement) if missing else {})
        for name in names:
            self._cache.move_to_end(name)
        result = [self._cache[name] for name in names]
        self._keep_within_budget()
        return result

    def _keep_within_budget(self) -> None:
        """Release the held bases, then the least recently used tasks' factors, until what is held fits ``cache_mb``
        (the bases go first: generated again only when a new task is combined)."""
        budget, total = self.cache_mb * 2**20, sum(task.nbytes for task in self._cache.values())
        while self._cache and total > budget:
            total -= self._cache.popitem(last=False)[1].nbytes
        banks = self._banks()
        if total + sum(bank.nbytes() for bank in banks) > budget:
            for bank in banks:
                bank.release()

    def _materialise(self, names: List[str], placement: Tuple[torch.device, torch.dtype]) -> Dict[str, _Factors]:
        """Factors of new tasks from their stored numbers, by each method's own layer class.

        The coefficients of every layer of every task that share a basis are combined in one pass over that
        basis, as ``merge`` does for one model.
        """
        prefix = f"{self._head_name}."
        layers, heads = [], {}
        for name in names:
            task = self._tasks[name]
            values = decode_tensors(task.stored, task.quantization, task.shapes)
            config = task.plan.config
            layer_cls = method_of(config).layer_cls
            if layer_cls not in self._contexts:  # NOLA's basis bank: one per method, shared by every task
                self._contexts[layer_cls] = layer_cls.injection_context(config) if layer_cls is not None else {}
            for layer_name, plan in task.plan.layers.items():
                layer = layer_cls(self.model.get_submodule(layer_name), config, layer_name, plan.slices,
                                  **self._contexts[layer_cls])
                layer.follow_float64_weight()  # a float64 backbone's updates in float64, as inject computes them
                for parameter_name, parameter in layer.adapter_parameters().items():
                    parameter.copy_(values[f"{layer_name}.{parameter_name}"])
                layers.append((name, layer_name, layer))
            heads[name] = {key[len(prefix):]: values[key] for key in task.plan.head_names}
        shared = [layer for _, _, layer in layers if layer.shared_coefficients()]
        combined = {id(layer): pair for layer, (pair, _) in zip(shared, shared_delta_factors(shared))}
        # a method's bases are held for its tasks combined last (tasks of one config share them), no others: every
        # seed or basis count served once stayed held (_factors then keeps them within cache_mb)
        for layer_cls in {type(layer) for _, _, layer in layers}:
            used = [spec for _, _, layer in layers if type(layer) is layer_cls for spec in layer.basis_specs()]
            for bank in _context_banks(self._contexts[layer_cls]):
                bank.retain(used)
        factors: Dict[str, Dict[str, Tuple[Tensor, Tensor]]] = {name: {} for name in names}
        for name, layer_name, layer in layers:
            a, b = combined[id(layer)] if id(layer) in combined else layer.delta_factors()
            factors[name][layer_name] = (a.clone(), b.clone())  # own storage: not a view of all tasks' rows
        for name in names:
            _require_representable(name, factors[name], heads[name], placement[1])
            heads[name] = {key: value.to(*placement) for key, value in heads[name].items()}
        return {name: _Factors(factors[name], heads[name], placement) for name in names}


def _context_banks(context: dict) -> List[BasisBank]:
    """The basis banks among a method's injection context (``injection_context``)."""
    return [value for value in context.values() if isinstance(value, BasisBank)]


def _require_representable(task: str, factors: Dict[str, Tuple[Tensor, Tensor]], head: Dict[str, Tensor],
                            dtype: torch.dtype) -> None:
    """Refuse a task whose head or update factors overflow ``dtype`` (``add_task`` checks the dtype the backbone had
    then; a later ``.half()`` of the served model would make them infinite without a word)."""
    tensors = {**{f"{layer}.{part}": value for layer, pair in factors.items() for part, value in zip("AB", pair)},
               **{f"head {key}": value for key, value in head.items()}}
    for label, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value.to(dtype)).all()):
            raise AdapterLoadError(
                f"task {task!r}: {label} holds values up to {value.abs().max().item():.4g}, beyond the {dtype} the "
                f"model is served in now (at most {torch.finfo(dtype).max:.4g}): they would become infinite. Serve it "
                "in float32 or bfloat16, or remove the task (remove_task)")


class _LayerHook:
    """The forward hook of one adapted layer, bound weakly to its MultiTaskModel: the backbone does not keep a served
    model that was dropped alive (with its cache and bases), and once it is collected its hooks are removed
    (``_removing_hooks_when_collected``). Copies (deepcopy, pickle) are bound to the copy of the served model."""

    __name__ = "MultiTaskModel._add_updates"  # what torch.jit.script reads of a hook on a module it compiles

    def __init__(self, served: MultiTaskModel, name: str) -> None:
        self.name = name
        self._served = weakref.ref(served)

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        served = self._served()
        return output if served is None else served._add_updates(self.name, module, args, output)

    def __getstate__(self) -> dict:
        return {"name": self.name, "served": self._served()}

    def __setstate__(self, state: dict) -> None:
        self.name = state["name"]
        served = state["served"]
        self._served = weakref.ref(served) if served is not None else _collected


def _collected() -> None:
    """What the weak reference of a collected served model gives."""
    return None


def _removing_hooks_when_collected(served: MultiTaskModel) -> weakref.finalize:
    """Remove the served model's layer hooks from the backbone once the served model is garbage-collected."""
    finalizer = weakref.finalize(served, _remove_hooks, served._hooks)
    finalizer.atexit = False
    return finalizer


def _remove_hooks(hooks: Dict[str, RemovableHandle]) -> None:
    for handle in hooks.values():
        handle.remove()
    hooks.clear()


class _Call(threading.local):
    """The per-call state of the call this thread runs: the hooked layers' stacked task factors (``LayerBatch``), and
    the layers that added them so far. Kept per thread, so that any other forward pass of the backbone (another
    thread's direct call, another MultiTaskModel wrapping it) finds none and passes through unchanged."""

    def __init__(self) -> None:
        self.batch: Dict[str, LayerBatch] = {}
        self.applied: set = set()
        self.rows: Optional[Dict[str, int]] = None  # while finding each layer's input rows for one image


def _private_copy(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` and its submodules, each with its own tensor dicts and the original's hooks.

    ``functional_call`` swaps tensors into the module it runs, and the backbone's own head may run meanwhile in
    another thread (called directly, or served by another MultiTaskModel): it swaps them into this copy instead.
    """
    view = copy.copy(module)
    view._parameters, view._buffers = dict(module._parameters), dict(module._buffers)
    view._modules = {name: _private_copy(child) for name, child in module._modules.items()}
    return view


def _require_no_model_hooks(model: nn.Module, since: str) -> None:
    """Refuse a backbone with forward (pre-)hooks of its own: a call runs ``forward_features`` and ``forward_head``
    (each task has its own head), which skips them, whereas each task's own model runs them."""
    hooks = [*model._forward_pre_hooks.values(), *model._forward_hooks.values()]
    if hooks:
        names = ", ".join(getattr(hook, "__qualname__", None) or repr(hook) for hook in hooks)
        raise ValueError(f"the model this MultiTaskModel serves has forward hooks of its own{since} ({names}), which "
                         "MultiTaskModel does not run: it calls forward_features and forward_head, with each task's "
                         "head. Remove them (handle.remove()) and apply them outside: preprocess the images before "
                         "calling it, and post-process each task's logits")


def _require_head_after_pooling(model: nn.Module, head: nn.Module) -> None:
    """Refuse a head that pools the features itself (timm's ``ClassifierHead``, as SAM ViT's): a call runs each task's
    head on ``forward_head(pre_logits=True)``'s features, pooled already, which such a head would pool again (a bare
    shape error deep in timm). A head that is a container of heads (CrossViT's ``ModuleList``, one per branch,
    whose logits the model averages) is refused too: it has no forward of its own to run a task's head through."""
    if isinstance(head, (nn.ModuleList, nn.ModuleDict)):
        raise ValueError(f"{type(model).__name__}'s classifier head is a {type(head).__name__} of {len(head)} heads, "
                         "whose logits the model combines itself, and a MultiTaskModel runs one head per task on the "
                         "pooled features: serve its tasks one at a time with nv.load_adapter (a task switch copies "
                         "in place)")
    pools = [m for m in head.modules() if "Pool" in type(m).__name__
             and not (callable(getattr(m, "is_identity", None)) and m.is_identity())]
    if pools:
        raise ValueError(f"{type(model).__name__}'s classifier head ({type(head).__name__}) pools the features itself "
                         f"({type(pools[0]).__name__}), after the point where a MultiTaskModel applies each task's "
                         "head: serve its tasks one at a time with nv.load_adapter (a task switch copies in place)")


def _require_image_size(model: nn.Module, images: Tensor) -> None:
    """Refuse images of another size than a backbone built for one size takes (timm's ``strict_img_size``), or with
    other channels than it reads, naming both: timm's assertion, a hybrid's shape error deep in its position
    embedding, or the convolution's channel error, named neither."""
    channels = image_channels(model)
    if channels is not None and images.shape[1] != channels:
        raise ValueError(f"images have {images.shape[1]} channels, and the backbone reads {channels}-channel images: "
                         f"pass them as its tasks were trained (e.g. a grey image repeated to {channels} channels, "
                         "images.expand(-1, 3, -1, -1), for an RGB backbone)")
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    if size is not None and getattr(embed, "strict_img_size", False) and tuple(images.shape[-2:]) != tuple(size):
        height, width = images.shape[-2:]
        raise ValueError(f"images are {height}x{width}, and the backbone takes {size[0]}x{size[1]} (timm's img_size): "
                         "resize them as its tasks were trained (the data's image_size), or build "
                         "the backbone with dynamic_img_size=True")


class _WeightRecord:
    """The backbone's weights as its tasks were checked against them: every dict of submodules and of parameters
    with its entries, each parameter's version counter, and a few of its values; its buffers (batch norms' running
    statistics), by version and values; and its settings (``_Settings``).

    A write in place (``load_state_dict``, an optimizer step) bumps a counter, and a replaced parameter or module is
    another object; a move to another device or dtype keeps both. Comparing costs 0.1-0.2 ms a call on ViT-B (152
    parameters in 276 modules). An inference tensor (made under ``torch.inference_mode``, e.g. by a move there)
    keeps no counter, and a copy of the model has new ones: for those, the sampled values are compared, all in one
    op (about 1 ms a call on ViT-B). Writes through ``.data`` bump no counter, and are not seen (nor by autograd).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.sizes: List[Tuple[dict, int]] = []
        self.entries: List[Tuple[dict, str, object, Optional[int]]] = []  # kept alive: their ids are not reused
        for module in model.modules():
            for entries in (module._modules, module._parameters):
                self.sizes.append((entries, len(entries)))
                self.entries += [(entries, key, value, _version(value))
                                 for key, value in entries.items()]
        # persistent buffers only: a non-persistent one is the model's own cache, which its forward may replace
        # (ConViT's rel_indices, made for the token count at the first call)
        self.buffers = [_BufferRecord(name, module._buffers, key) for name, module in model.named_modules()
                        for key, value in module._buffers.items()
                        if value is not None and key not in module._non_persistent_buffers_set]
        self.sizes += [(module._buffers, len(module._buffers)) for module in model.modules()]
        self.settings = _Settings(model)
        parameters = list(model.named_parameters())
        self.parameter_names = {name for name, _ in parameters}
        self.samples: Dict[str, _Sample] = {name: _Sample.of(p) for name, p in parameters}
        self.samples.update((record.name, record.sample) for record in self.buffers)  # a copy's are compared too
        # Each parameter's latest sample, taken again after a move to another dtype or device: compared exactly.
        self._latest = {id(p): self.samples[name] for name, p in parameters}
        self._joined: Tuple[Tuple[int, ...], Optional[Tensor]] = ((), None)  # the latest samples of a call, as one

    def change(self, model: nn.Module) -> Optional[str]:
        """None when ``model`` is the recorded model with the recorded weights, else what changed."""
        if model is self.model and all(len(entries) == size for entries, size in self.sizes):
            unversioned: List[Tensor] = []
            if all(entries.get(key) is value and self._same_version(value, version, unversioned)
                   for entries, key, value, version in self.entries) and self._same_values(unversioned):
                buffer = next((record.name for record in self.buffers if not record.unchanged()), None)
                return f"buffer {buffer} was written or replaced" if buffer else self.settings.change(model)
        recorded = {id(value): version for _, _, value, version in self.entries if isinstance(value, Tensor)}
        changed = next((name for name, p in model.named_parameters()
                        if id(p) not in recorded or not self._unchanged(p, recorded[id(p)])), None)
        return f"{changed} was written or replaced" if changed else "a module was replaced, added or removed"

    def samples_for_copy(self) -> Dict[str, _Sample]:
        """What a copy's weights must match, by name: samples of the weights now while this record finds them
        unchanged (a move to another dtype and back keeps the version counters but rounds the values, which the
        first samples would then refuse), else the first samples, which a copy refuses as its original does."""
        if self.change(self.model) is not None:
            return self.samples
        return {**{name: _Sample.of(p) for name, p in self.model.named_parameters()},
                **{record.name: _Sample.of(record.entries[record.key]) for record in self.buffers}}

    def differs_from(self, samples: Optional[Dict[str, _Sample]]) -> Optional[str]:
        """None when the parameters hold the sampled values of another record (the original of a copy), else the
        first that differs."""
        if samples is None:
            return None
        if samples.keys() == self.parameter_names:  # a pickle from before buffers were recorded: parameters alone
            samples = {**samples, **{record.name: record.sample for record in self.buffers}}
        caches = {f"{name}.{key}" if name else key for name, module in self.model.named_modules()
                  for key in module._non_persistent_buffers_set}
        samples = {name: sample for name, sample in samples.items() if name not in caches}  # pickled when recorded
        if samples.keys() != self.samples.keys():
            return "a module was replaced, added or removed"
        changed = next((name for name, sample in samples.items() if not self.samples[name].matches(sample)), None)
        return f"{changed} was written or replaced" if changed else None

    @staticmethod
    def _same_version(value: object, version: Optional[int], unversioned: List[Tensor]) -> bool:
        """Whether ``value`` keeps the recorded version; a tensor where either side has none goes to
        ``unversioned``, whose values are compared next."""
        now = _version(value)
        if version is not None and now is not None:
            return now == version
        if isinstance(value, Tensor):  # else a module, or a parameter registered as None
            unversioned.append(value)
        return True

    def _same_values(self, tensors: List[Tensor]) -> bool:
        """Whether ``tensors`` hold their latest samples: one comparison of all of them, where each is in the
        sample's dtype and on its device, else one at a time (a move since), keeping the samples taken then."""
        if not tensors:
            return True
        latest = [self._latest[id(t)] for t in tensors]
        device = tensors[0].device
        if all(t.dtype == s.dtype and t.device == device and s.values.device == device
               for t, s in zip(tensors, latest)):
            ids = tuple(id(t) for t in tensors)
            if self._joined[0] != ids:
                self._joined = (ids, torch.cat([s.values for s in latest]))
            now = torch.cat([_sampled(t) for t in tensors]).to(torch.float32)
            return now.shape == self._joined[1].shape and torch.allclose(now, self._joined[1], rtol=0.0, atol=0.0,
                                                                         equal_nan=True)
        for tensor, sample in zip(tensors, latest):
            now = _Sample.of(tensor)
            if not now.matches(sample):
                return False
            self._latest[id(tensor)] = now
        return True

    def _unchanged(self, value: Tensor, version: Optional[int]) -> bool:
        unversioned: List[Tensor] = []
        return self._same_version(value, version, unversioned) and self._same_values(unversioned)


class _BufferRecord:
    """A buffer as its tasks were checked against it (``module._buffers[key]``): the tensor, its version and a few
    of its values. A move to another device or dtype makes a new tensor: its values are compared then, and it is
    recorded in turn; a write in place bumps the version."""

    def __init__(self, name: str, entries: dict, key: str) -> None:
        self.name = f"{name}.{key}" if name else key
        self.entries, self.key = entries, key
        self.value: Tensor = entries[key]
        self.version = _version(self.value)
        self.sample = self.latest = _Sample.of(self.value)

    def unchanged(self) -> bool:
        now = self.entries.get(self.key)
        if now is self.value and self.version is not None and _version(now) is not None:
            return _version(now) == self.version
        if not isinstance(now, Tensor):
            return False
        taken = _Sample.of(now)
        if not taken.matches(self.latest):
            return False
        self.value, self.version, self.latest = now, _version(now), taken
        return True


class _Settings:
    """The backbone's plain attributes (``global_pool``, ``num_heads``, a norm's ``eps``...), compared at each call
    in a few microseconds; where one changed, the settings ``add_task`` checked (``pooling_of``, ``output_settings``,
    about 2 ms on ViT-B) are compared again, and a change they ignore (``fused_attn``) is recorded."""

    def __init__(self, model: nn.Module) -> None:
        self.checked = (pooling_of(model), output_settings(model))
        self.attributes = _plain_attributes(model)

    def change(self, model: nn.Module) -> Optional[str]:
        """None while the settings ``add_task`` checked are unchanged, else the attribute that changed them."""
        moved = next(((name, key, value) for name, entries, key, value in self.attributes
                      if not _same(entries.get(key, _ABSENT), value)), None)
        if moved is None:
            return None
        if (pooling_of(model), output_settings(model)) != self.checked:
            name, key, value = moved
            now = vars(model.get_submodule(name)).get(key, _ABSENT)
            return (f"{name + '.' if name else ''}{key} was set to {'nothing' if now is _ABSENT else repr(now)} "
                    f"(was {value!r}), which changes every output")
        self.attributes = _plain_attributes(model)
        return None


_ABSENT = object()
_SCALARS = (bool, int, float, str, type(None))


def _same(now: object, recorded: object) -> bool:
    """Whether an attribute holds its recorded value (the same object first: a NaN is not equal to itself)."""
    return now is recorded or now == recorded


def _is_plain(value: object) -> bool:
    """A scalar, or a tuple or list of them: what compares by value."""
    return isinstance(value, _SCALARS) or (isinstance(value, (tuple, list)) and all(map(_is_plain, value)))


def _plain_attributes(model: nn.Module) -> List[Tuple[str, dict, str, object]]:
    """Each public plain attribute of each module (not ``training``: refused on its own): its module's name, the
    module's attribute dict, its key and a copy of its value."""
    return [(name, vars(module), key, copy.copy(value)) for name, module in model.named_modules()
            for key, value in vars(module).items()
            if not key.startswith("_") and key != "training" and _is_plain(value)]


def _sampled(value: Tensor) -> Tensor:
    """Up to 17 evenly spaced values of ``value`` (a view where it is contiguous; complex ones as real pairs)."""
    flat = (torch.view_as_real(value.detach()) if value.is_complex() else value.detach()).reshape(-1)
    return flat[:: max(1, flat.numel() // 16)]


@dataclass(frozen=True)
class _Sample:
    """A parameter's sampled values (``_sampled``) as float32, and its dtype: what tells a write in place where no
    version counter does."""

    values: Tensor
    dtype: torch.dtype

    @staticmethod
    def of(value: Tensor) -> _Sample:
        return _Sample(_sampled(value).to(torch.float32, copy=True), value.dtype)

    def matches(self, other: _Sample) -> bool:
        """Equal values; after a move to another dtype, ``other``'s values as rounding to this one gives them."""
        theirs = other.values.to(self.values.device)
        if theirs.shape != self.values.shape:
            return False
        rtol = atol = 0.0
        if self.dtype != other.dtype and self.dtype.is_floating_point and other.dtype.is_floating_point:
            theirs = theirs.to(self.dtype).to(torch.float32)
            # a chain of moves (float32 to bfloat16 to float16) rounds twice; values below the normal range lose more
            dtypes = (torch.finfo(self.dtype), torch.finfo(other.dtype))
            rtol, atol = 2 * max(d.eps for d in dtypes), max(d.tiny for d in dtypes)
        return torch.allclose(self.values, theirs, rtol=rtol, atol=atol, equal_nan=True)


def _version(value: object) -> Optional[int]:
    """A tensor's version counter (bumped by every write in place); None for a module, and for an inference tensor
    (made under ``torch.inference_mode``, e.g. by a move there), which keeps none."""
    if not isinstance(value, Tensor) or value.is_inference():
        return None
    return value._version


def _has_adapters(model: nn.Module) -> bool:
    """Whether adapters were injected into ``model``: the plain backbone MultiTaskModel serves has none."""
    return adapter_state(model) is not None or bool(adapted_layers(model))
