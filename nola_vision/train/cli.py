"""The Lightning CLI of ``nola-vision fit|validate|test|predict``: ``FewShotClassifier`` + ``FewShotDataModule`` with
linked arguments, a test pass after ``fit``, a JSON result file and a predictions CSV."""
from __future__ import annotations

import contextlib
import contextvars
import csv
import dataclasses
import difflib
import errno
import functools
import hashlib
import importlib
import importlib.util
import inspect
import io
import json
import math
import os
import re
import shutil
import sys
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple, Union

import fsspec
import torch
import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import CombinedLoader, rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from ..adapters.files import WEIGHTS_NAME, require_adapter_directory
from ..core.config import resolve_adapter
from ..core.inject import adapter_state, quantization_aware_bits
from ..core.plan import plan_injection
from ..core.registry import METHODS, method_of
from ..core.storage import (
    NOT_ALLOWED,
    atomic_path,
    check_writable_file,
    file_in_the_way,
    nearest_folder,
    out_of_room_hint,
    previous_path,
    spreadsheet_safe,
    try_lock,
    write_bytes_atomic,
    write_json_atomic,
)
from ..core.warn import warn_user
from ..data import CorruptImageError, FewShotDataModule
from ..data.datamodule import check_datamodule_arguments, require_share_per_process
from ..data.datasets import expand_root, unreadable_named
from ..data.fewshot import manifest_settings
from ..models.backbones import OFFLINE_PRETRAINED_FILE, build_backbone, check_backbone_name
from .checkpoint_io import (
    LocalAtomicCheckpointIO,
    UnsafeCheckpointError,
    load_checkpoint,
    newest_checkpoint,
    require_readable_file,
    require_whole_checkpoint,
    use_atomic_checkpoints,
)
from .module import (
    FewShotClassifier,
    NonFiniteLossError,
    batches_into_epoch,
    changed_hparams,
    check_classifier_arguments,
    check_training_data,
    check_training_length,
    refuse_weight_changing_callbacks,
    require_training_left,
    training_finished,
    whole_epochs,
)

__all__ = ["CLI_SETTINGS", "CONFIG_ERRORS", "FIT_METRICS", "RUN_ERRORS", "FinalWeights", "MonitoredMetricError",
           "NolaCLI", "OutputKeptError", "PredictionsCSVWriter", "RunConfigSaver", "RunSeed", "argument_error",
           "argument_value_error", "check_checkpoint_file", "check_config_sources", "check_full_passes",
           "check_monitors", "check_result_path", "checkpoint_run", "cli_parser", "command_digest", "error_message",
           "fit_options",
           "keyboard_interrupt_of", "run_lightning_cli"]


PREDICTIONS_HEADER = ["index", "path", "label", "label_name", "prediction", "prediction_name", "confidence"]


def _as_list(values: Any) -> list:
    """A tensor's values as a list, in one read from its device; other sequences as they are."""
    return values.tolist() if isinstance(values, torch.Tensor) else list(values)


class PredictionsCSVWriter(BasePredictionWriter):
    """Writes ``predictions.csv``: index, image path, true label, predicted label and class names, confidence.

    Paths and true-label names come from the data module's test split, and only for a pass over it: a loader of
    other images (``trainer.predict(model, dataloaders=...)`` after a data module's run) leaves them empty rather than
    name the data module's files. Each pass starts with no rows, so a failed pass leaves none behind."""

    def __init__(self, path: Optional[str] = None) -> None:
        super().__init__(write_interval="batch")
        self.path = path
        self.rows: List[Dict[str, Any]] = []

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.rows = []

    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: Any,
                           batch_indices: Optional[Sequence[int]], batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        # each batch read back once (on a GPU every element read was a wait for the device)
        predicted, confidence = _as_list(prediction["prediction"]), _as_list(prediction["confidence"])
        labels = _as_list(prediction["label"]) if prediction.get("label") is not None else None
        indices = list(batch_indices) if batch_indices is not None else [None] * len(predicted)
        of_test_split = _predicts_test_split(trainer, dataloader_idx)
        for i in range(len(predicted)):
            self.rows.append({"index": indices[i], "prediction": int(predicted[i]), "confidence": float(confidence[i]),
                              "label": int(labels[i]) if labels is not None else None, "of_test_split": of_test_split})

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rows = self.rows
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: List[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, rows)
            rows = sorted((r for part in gathered for r in part), key=lambda r: (r["index"] is None, r["index"] or 0))
        # trainer.log_dir is a collective under DDP: every rank asks, before the others return (rank 0 waited alone)
        path = Path(self.path or Path(trainer.log_dir or trainer.default_root_dir) / "predictions.csv")
        _stop_if_terminated(trainer)
        if not trainer.is_global_zero:
            return
        datamodule = getattr(trainer, "datamodule", None)
        names = getattr(datamodule, "class_names", None) if datamodule is not None else None
        samples = getattr(getattr(getattr(datamodule, "test_set", None), "dataset", None), "samples", None)
        # a file of another name that appeared at the path during the pass is kept (the pass fails saying so)
        check = _kept_output_check(path, "--predictions_file", "predict", _is_predictions_file)
        # class names and paths from undecodable file names keep their bytes (surrogate escapes), not an error
        with atomic_path(path, check=check) as tmp, open(tmp, "w", newline="", encoding="utf-8",
                                                         errors="surrogateescape") as f:
            writer = csv.writer(f)
            writer.writerow(PREDICTIONS_HEADER)
            for r in rows:
                idx, label, pred = r["index"], r["label"], r["prediction"]
                own = r["of_test_split"] and idx is not None
                writer.writerow(map(spreadsheet_safe, [
                    idx, samples[idx][0] if samples is not None and own else "", "" if label is None else label,
                    names[label] if names and own and label is not None else "", pred, names[pred] if names else "",
                    f"{r['confidence']:.6f}"]))
        print(f"nola_vision: wrote {len(rows)} predictions to {path}")
        self.rows = []


def _predicts_test_split(trainer: Trainer, dataloader_idx: int) -> bool:
    """Whether predict loader ``dataloader_idx`` reads the data module's test split (whose files name the rows)."""
    loaders = getattr(trainer, "predict_dataloaders", None)
    if loaders is None:  # not a pass of a Trainer (a writer driven by hand): the data module's split, as before
        return True
    loaders = CombinedLoader(loaders, "sequential").flattened  # one, a list or a dict: numbered as Lightning does
    test_set = getattr(getattr(trainer, "datamodule", None), "test_set", None)
    return (test_set is not None and dataloader_idx < len(loaders)
            and getattr(loaders[dataloader_idx], "dataset", None) is test_set)


def _stop_if_terminated(trainer: Trainer) -> None:
    """End the command (exit 143) where a SIGTERM came after the pass's last batch, before its file is written: a
    scheduler's cancel in that window was lost, the file written and the exit 0."""
    if getattr(trainer, "received_sigterm", False):  # a writer driven by hand may have no Trainer
        raise SIGTERMException


class StopPredictingOnSigterm(Callback):
    """Ends a predict pass on SIGTERM (a scheduler's cancel), as Lightning ends fit and test passes: its predict loop
    never looks, so the pass ran on until the scheduler's kill, or exited 0 having written its file."""

    def on_predict_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.received_sigterm:
            raise SIGTERMException


def _undecodable_settings(node: Any, option: str = "") -> Iterator[Tuple[str, str]]:
    """(option, value) of each setting holding a byte that is not UTF-8 (a path of a Latin-1 folder, read with
    Python's surrogate escapes)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _undecodable_settings(value, f"{option}.{key}" if option else str(key))
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _undecodable_settings(value, option)
    elif isinstance(node, str):
        try:
            node.encode("utf-8")
        except UnicodeEncodeError:
            yield option, node


def _refuse_undecodable_settings(config: Any) -> None:
    """Refuse, before a fit makes anything, a setting that a UTF-8 ``config.yaml`` cannot hold: the run's config would
    not read back (``test -c <run>/config.yaml``: "invalid Unicode character escape")."""
    found = _undecodable_setting(config.as_dict())
    if found is not None:
        raise ValueError(f"{found}: the run's config.yaml stores its settings as text, which cannot hold it, so the "
                         "run could not be tested or resumed from its config. Run under a UTF-8 locale (or "
                         "PYTHONUTF8=1), rename the folder or file to a UTF-8 name, or pass a symbolic link that has "
                         "one")


def _undecodable_setting(settings: Dict[str, Any]) -> Optional[str]:
    """"--option value holds a byte ..." for the first setting a UTF-8 ``config.yaml`` cannot hold; None if none."""
    found = next(_undecodable_settings(settings), None)
    if found is None:
        return None
    option, value = found
    shown = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return (f"--{option} {shown} holds a byte this process cannot read as text (a name written in another encoding, "
            "such as Latin-1, or any non-ASCII name under an ASCII locale such as LC_ALL=C with PYTHONUTF8=0; this "
            f"one's is {sys.getfilesystemencoding()})")


class RunConfigSaver(SaveConfigCallback):
    """Saves a run's ``config.yaml`` into its log directory, never over another run's.

    Without a logger every run logs straight into ``default_root_dir``, so a second ``fit`` there would replace the
    first run's config and exported adapter beside its checkpoints: it is refused before training. A resumed fit, or
    a ``test``/``validate``/``predict`` of the run in that folder, keeps the run's config as it is. A fit holds its
    folder's ``.fit-running`` until it ends, so a fit started meanwhile into the same folder (logger-less, or the same
    ``version_N`` picked by two runs at once) is refused before it checks the folder.
    """

    _lock: Optional[int] = None
    _output_locks: Tuple[int, ...] = ()
    # Set by NolaCLI.fit: its after_fit (the test pass, the result) releases the outputs' locks, not teardown.
    outputs_until_after_fit: bool = False
    _path: Optional[Path] = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        path = Path(trainer.log_dir) / self.config_filename  # a collective under DDP: every rank asks
        self._path = None if "://" in str(trainer.log_dir) else path  # for save_config, which rank 0 alone runs
        if stage == "fit" and "://" not in str(trainer.log_dir):  # a remote folder (s3://) has no file locks
            self._hold_folder(trainer, path.parent)
        if stage == "fit":
            adapter_dir = self.config.model.get("adapter_dir")
            if adapter_dir is not None:  # a file there is refused before a lock file is made beside it
                require_adapter_directory(adapter_dir)
            self._hold_outputs(trainer)
        exists = trainer.strategy.broadcast(path.is_file() if trainer.is_global_zero else False)
        kept = trainer.strategy.broadcast(_holds_work(path.parent) if trainer.is_global_zero else False)
        checkpoint = self.config.get("ckpt_path")
        # resuming the run in this folder; another run's checkpoint would continue that run over this one's files
        own = (path.parent / "checkpoints").resolve()
        resumes_it = checkpoint is not None and (str(checkpoint) in ("last", "best", "hpc", "registry")
                                                 or Path(checkpoint).resolve().parent == own)
        if kept and stage == "fit" and not resumes_it:  # its config.yaml gone too (deleted with its folder mid-run)
            given = f" (--ckpt_path {checkpoint} belongs to another folder)" if checkpoint is not None else ""
            checkpoints = any(path.parent.glob("checkpoints/*.ckpt"))
            resume = (f"resume that run with {_how_to_resume([path.parent / 'checkpoints'])}" if checkpoints else
                      f"move its exported adapter ({path.parent / 'adapter'}) away")
            held = f"{path.name}, its checkpoints and exported adapter" if exists else \
                f"its checkpoints or exported adapter; its {path.name} is gone"
            raise ValueError(
                f"{path.parent} already holds another run ({held}), which "
                f"this fit would overwrite{given}: a run without a logger writes straight into "
                "--trainer.default_root_dir. Choose another --trainer.default_root_dir, keep the logger (each run then "
                f"gets its own version_N folder), or {resume}")
        if exists and (kept or stage != "fit"):
            self.already_saved = True
            return
        given_files = self.config.get("config") or []
        if exists and not trainer.strategy.broadcast(_is_saved_config(path, given_files) if trainer.is_global_zero
                                                     else True):
            raise ValueError(
                f"{path} exists and is not a config.yaml a run saved (a file of yours, a --print_config dump, or a "
                "config this command reads), which this fit would overwrite: a run without a logger writes straight "
                "into --trainer.default_root_dir (the working directory by default). Choose another "
                "--trainer.default_root_dir, or keep the logger (each run then gets its own version_N folder). If it "
                "is the config of a run that died, saved by an earlier nola-vision (no mark under its header), delete "
                "it")
        undecodable = _undecodable_setting(self.config.as_dict()) if stage != "fit" else None  # fit refused it
        if undecodable is not None:  # written, it would not read back: "found invalid Unicode character escape"
            rank_zero_warn(f"nola_vision: {undecodable}: {path} is not written, since a config.yaml holds its settings "
                           "as text and could not hold this one (the run goes on; a UTF-8 name, or a symbolic link "
                           "with one, keeps its config)")
            self.already_saved = True
            return
        config = self.config
        if stage == "fit" and config.get("ckpt_path") is not None:
            # the checkpoint it resumed is not the run's: `test -c <this run>/config.yaml` would evaluate that one
            self.config = config.clone()
            self.config.ckpt_path = None
        try:
            super().setup(trainer, pl_module, stage)  # none yet, or the config of a run that died before it kept any
        finally:
            self.config = config

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Mark the config LightningCLI just saved (rank 0) as a run's, under its header: the one config.yaml a later
        logger-less fit in this folder may replace (a ``--print_config`` dump has the same header)."""
        path = self._path  # setup's (trainer.log_dir is a collective); None for a remote folder
        if path is None or not path.is_file():
            return
        header, _, rest = path.read_bytes().partition(b"\n")
        write_bytes_atomic(path, header + b"\n" + SAVED_CONFIG_MARK + rest)

    def _hold_folder(self, trainer: Trainer, folder: Path) -> None:
        """Take the folder's fit lock (rank 0), or refuse the fit when another one holds it."""
        if trainer.is_global_zero:
            self._lock = _lock_run_folder(folder)
        if not trainer.strategy.broadcast(self._lock is not None if trainer.is_global_zero else True):
            raise ValueError(f"another fit is running in {folder} now (it holds {folder / FIT_LOCK}): wait for it to "
                             "end, or choose another --trainer.default_root_dir")

    def _hold_outputs(self, trainer: Trainer) -> None:
        """Take the fit lock of the run's ``--model.adapter_dir`` and ``--result_file`` (rank 0), or refuse the fit
        when another fit holds one: two fits sharing them each exported and wrote its result, leaving one run's result
        beside the other run's adapter. Held until the fit's result is written (``release_outputs``)."""
        outputs = {"--model.adapter_dir": self.config.model.get("adapter_dir"),
                   "--result_file": self.config.get("result_file")}
        held, busy = [], None
        if trainer.is_global_zero:
            for option, output in outputs.items():
                if output is None or "://" in str(output):
                    continue
                fd = _lock_run_output(Path(output))
                if fd is None:
                    busy = (option, str(output))
                    break
                held.append(fd)
        self._output_locks = tuple(held)
        busy = trainer.strategy.broadcast(busy)
        if busy is not None:
            self._release()
            option, output = busy
            raise ValueError(f"another fit is writing {option} {output} now (it holds "
                             f"{_output_lock_path(Path(output))}): two fits sharing it would leave one run's result "
                             "beside the other's adapter. Wait for it to end, or give this fit its own adapter_dir and "
                             "result_file")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._release_folder()
        if stage == "fit" and not self.outputs_until_after_fit:  # else held through the test pass and the result
            self.release_outputs()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._release()  # Lightning calls no teardown after a failure; an in-process retry must find the folder free

    def _release(self) -> None:
        self._release_folder()
        self.release_outputs()

    def _release_folder(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def release_outputs(self) -> None:
        """Let go of the outputs' locks (``_hold_outputs``): the fit's result is written, or it failed."""
        for fd in self._output_locks:
            os.close(fd)
        self._output_locks = ()


class FinalWeights(Callback):
    """Keeps the checkpoints a run resumes from and names in its result at the weights it ended with.

    A ``ModelCheckpoint`` that saves after validation (Lightning's choice with ``check_val_every_n_epoch`` > 1, or
    with validation inside an epoch) saves nothing after an epoch that did not validate: ``last.ckpt`` would hold an
    earlier epoch than the exported adapter and the result, and a resume from it would train those epochs again. At
    the end of such an epoch this saves what that callback would have saved there: ``last.ckpt``, and without a
    monitored metric its newest checkpoint (``epoch=E-step=S.ckpt``). A callback that monitors a metric keeps its
    best among the validated epochs, and its ``last.ckpt`` the latest epoch (Lightning saves it only with a new
    best). It also records the last step whose weights were validated during fit, so that the CLI validates the
    final weights when no validation saw them. When a callback stops the fit for a metric it
    monitors and that was not logged (``monitoring_callback``), it saves the ``last.ckpt`` the checkpoint callbacks
    would have saved at that point (``kept``), so the epochs trained are not lost.
    """

    def __init__(self) -> None:
        self.validated_step: Optional[int] = None
        self.kept: Optional[str] = None
        self._resumed_states: Dict[str, Any] = {}
        self._resumed_step: Optional[int] = None  # the step a resumed fit started at
        self._passes_started = False  # a batch was taken: a later error is the run's, not its configuration's

    def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
        self._passes_started = True

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Keep the checkpoint of the previous epoch's end as ``epoch-end.ckpt`` in each checkpoint callback's folder
        (``keep_epoch_end``): a save inside this epoch (validation inside it, every n steps, a stop for ``max_time``)
        replaces ``last.ckpt`` and the epoch's checkpoint with one that no fit resumes from, and a run stopped then
        kept none to resume."""
        if trainer.fast_dev_run or not trainer.global_step or not trainer.is_global_zero:
            return
        # Linked only where saves replace a file by renaming a new one over it (``LocalAtomicCheckpointIO``): another
        # writer may rewrite it in place (Lightning's moves a staged file, across file systems a copy into it).
        io = trainer.strategy.checkpoint_io
        link = isinstance(io, LocalAtomicCheckpointIO)
        resumed = trainer.ckpt_path if trainer.global_step == self._resumed_step else None  # it logs anew, perhaps
        saved: Dict[Path, List[str]] = {}  # each callback's folder: --ckpt_path last looks beside its last.ckpt
        for c in trainer.checkpoint_callbacks:
            if isinstance(c, ModelCheckpoint) and c.dirpath and "://" not in str(c.dirpath):
                # last.ckpt, else (save_last off) the newest it saved, which a save inside this epoch replaces
                saved.setdefault(Path(c.dirpath), []).extend(p for p in (c.last_model_path, c._last_checkpoint_saved)
                                                             if p)
        # An asynchronous writer (AsyncCheckpointIO) may still be writing the epoch's checkpoint: its one thread keeps
        # it after that save, and before any save of this epoch
        executor = _async_writer(trainer)
        for folder, paths in saved.items():  # last.ckpt is often the newest saved too: each path is read once
            job = functools.partial(_keep_epoch_end_of, list(dict.fromkeys([*paths, *([resumed] if resumed else [])])),
                                    trainer.global_step, folder / EPOCH_END_CHECKPOINT, link)
            if executor is not None:
                executor.submit(job)
            else:
                job()

    def on_validation_batch_start(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        self._passes_started = self._passes_started or not trainer.sanity_checking

    def on_test_batch_start(self, *args: Any, **kwargs: Any) -> None:
        self._passes_started = True

    def on_predict_batch_start(self, *args: Any, **kwargs: Any) -> None:
        self._passes_started = True

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: Dict[str, Any]) -> None:
        self._resumed_states = checkpoint.get("callbacks") or {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A resume logs to a new ``version_N`` folder, and Lightning then forgets the scores of the checkpoints a
        monitoring callback kept in the run's earlier folder: its first new epoch would count as the best. They are
        taken up again (files that are gone left out); Lightning deletes no file outside its own folder."""
        self._resumed_step = trainer.global_step if trainer.ckpt_path else None
        for callback in trainer.checkpoint_callbacks:
            state = self._resumed_states.get(getattr(callback, "state_key", None))
            if (isinstance(callback, ModelCheckpoint) and callback.monitor is not None and isinstance(state, dict)
                    and state.get("dirpath") != callback.dirpath):
                _take_up_best(callback, state)
        self._resumed_states = {}

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # what the console script says of it (``cli.main``): a run's failure (exit 1), not a refusal (exit 2)
        _note(exception, "run_started", self._passes_started)
        if trainer.state.fn != TrainerFn.FITTING or trainer.fast_dev_run or not trainer.global_step:
            return
        if monitoring_callback(exception) is None:  # the console script names the checkpoint to resume from
            _note(exception, "kept_checkpoint", kept_checkpoint(trainer))
            return
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last:
                if callback._last_global_step_saved != trainer.global_step:
                    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))
                self.kept = self.kept or callback.last_model_path or None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self.validated_step = trainer.global_step

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.fast_dev_run:
            return
        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint) or callback._last_global_step_saved == trainer.global_step:
                continue
            if callback._should_save_on_train_epoch_end(trainer):
                if callback.monitor is not None and callback.save_last:
                    self._save_last_before_top_k(trainer, callback)
                continue
            # what ModelCheckpoint.on_train_epoch_end does, for a callback that saves only after validation
            candidates = callback._monitor_candidates(trainer)
            every = callback._every_n_epochs
            if callback.monitor is None and every >= 1 and (trainer.current_epoch + 1) % every == 0:
                callback._save_topk_checkpoint(trainer, candidates)
            callback._save_last_checkpoint(trainer, candidates)  # whatever its schedule: fit resumes from it

    @staticmethod
    def _save_last_before_top_k(trainer: Trainer, callback: ModelCheckpoint) -> None:
        """Save the ``last.ckpt`` of a monitoring callback that saves at this epoch's end (it runs after this one):
        Lightning refreshes ``last.ckpt`` only when the metric improved, so it would hold the best epoch's weights.
        The callback then decides on its top-k as if nothing was saved, and saves ``last.ckpt`` again if it saves."""
        saved_step = callback._last_global_step_saved
        callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))
        callback._last_global_step_saved = saved_step


# The checkpoint of the latest epoch's end, beside ``last.ckpt``: what a fit stopped inside an epoch resumes from.
EPOCH_END_CHECKPOINT = "epoch-end.ckpt"


def keep_epoch_end(source: Path, kept: Path, link: bool = True) -> None:
    """Put ``source`` at ``kept`` in one step: hard-linked (with ``link``, where the file system allows), else a copy,
    kept only where it is whole (an asynchronous writer may not have finished ``source``); a failure warns: the run
    goes on, only a stop inside the coming epoch would keep nothing to resume from."""
    if not source.is_file() or kept.exists() and os.path.samefile(source, kept):
        return
    staged = kept.with_name(f".{kept.name}.{os.getpid()}.tmp")
    try:
        kept.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()
        linked = False
        if link:
            with contextlib.suppress(OSError):
                os.link(source, staged)
                linked = True
        if not linked:
            shutil.copyfile(source, staged)
            if not _resumable(staged):
                raise OSError(f"{source} was not whole when copied")
        os.replace(staged, kept)
    except OSError as error:
        with contextlib.suppress(OSError):
            staged.unlink()
        rank_zero_warn(f"nola_vision: could not keep {source} as {kept} ({error.strerror or error}): a run stopped "
                       "inside the coming epoch would keep no checkpoint to resume from")


def _resumable_last(last: Path) -> str:
    """``last``, or where it was saved inside an epoch (a fit resumes from no such checkpoint) the checkpoint of the
    latest epoch's end beside it (``epoch-end.ckpt``), with a warning: that epoch trains again from its start."""
    kept = last.with_name(EPOCH_END_CHECKPOINT)
    saved = _loaded(last)  # one cut short or unreadable is named as such when the fit opens it
    if not kept.is_file() or saved is None or not batches_into_epoch(saved) or not _resumable(kept):
        return str(last)
    rank_zero_warn(f"nola_vision: --ckpt_path last: {last} was saved inside an epoch (a stop for max_time or a "
                   "signal, validation inside the epoch, or a save every n steps), and a resume from it would skip "
                   f"the rest of that epoch; resuming from {kept}, saved at the end of the epoch before, so the "
                   "epoch it stopped inside trains again from its start")
    return str(kept)


def _keep_epoch_end_of(paths: Sequence[str], step: int, kept: Path, link: bool) -> None:
    """Keep at ``kept`` the first of ``paths`` that is a checkpoint saved at the end of the epoch ended at ``step``."""
    source = next((path for path in paths if _saved_at_epoch_end(path, step)), None)
    if source is not None:
        keep_epoch_end(Path(source), kept, link=link)


def _saved_at_epoch_end(path: str, step: int) -> bool:
    """Whether ``path`` is a checkpoint saved at an epoch's end, at global step ``step``."""
    saved = _loaded(path)
    return saved is not None and saved.get("global_step") == step and not batches_into_epoch(saved)


def _loaded(path: Union[str, os.PathLike]) -> Optional[Dict[str, Any]]:
    """The checkpoint at a local ``path`` (its tensors mapped, not read), or None where it cannot be read (cut short,
    no checkpoint, a remote path)."""
    try:
        saved = load_checkpoint(path)
    except Exception:  # noqa: BLE001 (cut short, or not a checkpoint: not one to name)
        return None
    return saved if isinstance(saved, dict) else None


def _note(exception: BaseException, name: str, value: Any) -> None:
    """Set ``exception.<name>`` where the exception takes attributes (one with ``__slots__`` does not)."""
    with contextlib.suppress(AttributeError, TypeError):
        setattr(exception, name, value)


def kept_checkpoint(trainer: Trainer) -> Optional[str]:
    """The checkpoint a stopped fit resumes from: its checkpoint callbacks' ``last.ckpt`` where that file exists
    (Lightning names it before writing it: stopped during its first save, there is none), else their newest
    checkpoint, of those saved at an epoch's end (a resume from one saved inside an epoch is refused); None when they
    kept none."""
    _wait_for_writes(trainer)
    callbacks = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
    for path in (Path(c.last_model_path) for c in callbacks if c.last_model_path):
        if path.is_file() and _resumable(path):
            return str(path)
    others = (path for callback in callbacks if callback.dirpath and os.path.isdir(callback.dirpath)
              for path in Path(callback.dirpath).glob("*.ckpt"))
    newest = newest_checkpoint(others, _resumable)
    return str(newest) if newest is not None else None


def _wait_for_writes(trainer: Trainer) -> None:
    """Let an asynchronous checkpoint writer (``AsyncCheckpointIO``'s one thread) finish what it was given."""
    executor = _async_writer(trainer)
    if executor is not None:
        with contextlib.suppress(Exception):  # shut down already: nothing is left to write
            executor.submit(lambda: None).result(timeout=600)


def _async_writer(trainer: Trainer) -> Optional[ThreadPoolExecutor]:
    """The one thread an asynchronous checkpoint writer (``AsyncCheckpointIO``) saves on, None for others."""
    executor = getattr(trainer.strategy.checkpoint_io, "_executor", None)
    return executor if isinstance(executor, ThreadPoolExecutor) else None


def _resumable(path: Path) -> bool:
    """Whether ``path`` is a whole checkpoint saved at an epoch's end (``batches_into_epoch``)."""
    saved = _loaded(path)
    return saved is not None and not batches_into_epoch(saved)


def _take_up_best(callback: ModelCheckpoint, state: Dict[str, Any]) -> None:
    """Give ``callback`` the top-k checkpoints (and their scores) its ``state`` from another folder recorded."""
    kept = {path: score for path, score in (state.get("best_k_models") or {}).items() if Path(path).is_file()}
    if not kept:
        return
    models = callback.best_k_models = {**kept, **callback.best_k_models}
    best, worst = (min, max) if callback.mode == "min" else (max, min)
    callback.best_model_path = best(models, key=models.get)
    callback.best_model_score = models[callback.best_model_path]
    if 0 < callback.save_top_k <= len(models):
        callback.kth_best_model_path = worst(models, key=models.get)
        callback.kth_value = models[callback.kth_best_model_path]


class RunSeed(Callback):
    """Records the run's ``seed_everything`` in its checkpoints (``checkpoint[RUN_RECORD]["seed"]``): ``test`` and
    ``validate --result_file`` then name the seed of the run that trained the weights, not the command line's.

    A fit resumed from a checkpoint that records another seed, or none (an older checkpoint), trained with more than
    one seed, or with one nobody knows: its checkpoints record None (unknown).
    """

    def __init__(self, seed: Optional[int]) -> None:
        self.seed = seed

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: Dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING and (checkpoint.get(RUN_RECORD) or {}).get("seed") != self.seed:
            self.seed = None

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: Dict[str, Any]) -> None:
        checkpoint[RUN_RECORD] = {"seed": self.seed}


RUN_RECORD = "nola_vision_run"  # the checkpoint key of what the CLI records of its run (RunSeed)

# Not ".<name>.lock", the form of a directory's writer lock (core.storage): a fit exporting into <folder>/fit
# would wait on this lock, its own.
FIT_LOCK = ".fit-running"


def claim_log_dir(trainer: Trainer) -> Optional[Path]:
    """Pick the run's ``version_N`` folder and make it, holding a lock beside the versions (rank 0 picks; the other
    ranks learn it by broadcast once the processes are joined): two commands started together in one root (two
    ``predict`` passes, a ``test`` beside a ``fit``) picked the same folder, and the second replaced the first one's
    predictions and config record. Returns the folder when this call made it, else None (no logger, a remote folder,
    a folder that existed, another rank)."""
    logger = trainer.logger
    root = getattr(logger, "root_dir", None) if logger is not None else None
    joined = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not trainer.is_global_zero and not joined:
        return None
    fd = None
    if root is not None and "://" not in str(root) and trainer.is_global_zero:
        with _explained_log_folder(Path(root)):
            os.makedirs(root, exist_ok=True)
            fd = try_lock(Path(root) / ".version.lock", wait=True)
    try:
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        if fd is None or log_dir is None or os.path.isdir(log_dir):
            return None
        with _explained_log_folder(Path(log_dir)):
            os.makedirs(log_dir)
        trainer.callbacks.append(_DropUnusedRunFolder(Path(log_dir)))
        return Path(log_dir)
    finally:
        if fd is not None:
            os.close(fd)


def _plain_bar_on_a_narrow_console(trainer: Trainer) -> None:
    """Swap Lightning's rich progress bar (its default where ``rich`` is installed) for the tqdm one when the console
    cannot encode the rich bar's characters (a Latin-1 or ASCII locale): the rich bar failed at the end of the fit,
    after the export, and the test pass and the result were lost."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        "━•".encode(encoding)
        return
    except (UnicodeEncodeError, LookupError):
        pass
    for index, callback in enumerate(trainer.callbacks):
        if isinstance(callback, RichProgressBar):
            trainer.callbacks[index] = TQDMProgressBar()
            rank_zero_info(f"nola_vision: the console's encoding ({encoding}) cannot show the rich progress bar; "
                           "showing tqdm's")


@contextlib.contextmanager
def _explained_log_folder(folder: Path) -> Iterator[None]:
    """Name the folder that refuses the run's log folder ``folder`` and the options that move it: the bare
    ``[Errno 13] Permission denied`` named neither."""
    try:
        yield
    except OSError as error:
        if error.strerror != os.strerror(error.errno or 0):
            raise  # one that explains itself (a lock file another user owns)
        if error.errno in NOT_ALLOWED:
            refusing = nearest_folder(folder) or folder.parent
            why = f"this process may not create files in {refusing} ({error.strerror}). Pass a writable"
        elif error.errno in (errno.ELOOP, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EEXIST):
            loop = " (a loop of symbolic links)" if error.errno == errno.ELOOP else ""
            why = f"{error.strerror}{loop}. Pass another"
        else:
            raise
        explained = type(error)(error.errno, f"cannot make the run's log folder {folder}: {why} "
                                             "--trainer.default_root_dir (the working directory by default), or a "
                                             "logger save_dir there")
        explained.before_run = True  # a refusal before the run (exit 2): nothing was made
        raise explained from error


class _DropUnusedRunFolder(Callback):
    """Removes the ``version_N`` folder ``claim_log_dir`` made when the run fails before it wrote anything but its
    fit lock and saved config (a DDP launch whose processes never joined, Ctrl-C while they start, a fit refused in
    setup): a run that never ran leaves no folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if trainer.is_global_zero:
            _remove_if_unused(self.folder)


def _remove_if_unused(folder: Path) -> None:
    """Remove ``folder``, a run folder ``claim_log_dir`` made, when it holds nothing but what a run writes before it
    starts: its fit lock (``FIT_LOCK``) and the config it saved (``SAVED_CONFIG_MARK``). Anything else keeps it."""
    with contextlib.suppress(OSError):
        entries = list(folder.iterdir()) if folder.is_dir() else []
        if all(entry.name == FIT_LOCK or (entry.is_file() and not entry.is_symlink() and entry.stat().st_size
                                          and _is_saved_config(entry, ())) for entry in entries):
            for entry in entries:
                entry.unlink()
            folder.rmdir()


def _lock_run_folder(folder: Path) -> Optional[int]:
    """A descriptor holding the exclusive lock on ``<folder>/.fit-running`` until it is closed, or None when another
    process holds it. Not ``results.claim_run``'s ``.claim``: a protocol run's fit inherits that lock from the
    protocol command, which holds it in the same folder. Where no lock can be taken (Windows), nothing is locked."""
    folder.mkdir(parents=True, exist_ok=True)
    return try_lock(folder / FIT_LOCK)


def _config_savers(trainer: Trainer) -> List[RunConfigSaver]:
    """The trainer's ``RunConfigSaver`` (LightningCLI adds it to the callbacks, keeping no reference of its own)."""
    return [callback for callback in trainer.callbacks if isinstance(callback, RunConfigSaver)]


def _output_lock_path(output: Path) -> Path:
    """``.<name>.fit-running`` beside a fit's output, symlinks resolved (the exports write through them, so two fits
    naming one folder by two paths share its lock): the lock a fit writing it holds until it ends."""
    real = Path(os.path.realpath(output))
    name = f".{real.name}{FIT_LOCK}"
    if len(os.fsencode(name)) > 255:  # over a file name's limit: a name as long as the output's own is allowed
        name = f".{hashlib.sha256(os.fsencode(real.name)).hexdigest()[:16]}{FIT_LOCK}"
    return real.parent / name


def _refuse_output_of_a_running_fit(output: Path, option: str) -> None:
    """Refuse an output a fit running now will write (it holds ``_output_lock_path(output)``): the fit's result would
    replace this command's at its end, without a word."""
    if "://" in str(output):
        return
    lock = _output_lock_path(output)
    if not lock.exists():
        return
    fd = try_lock(lock)
    if fd is None:
        raise ValueError(f"a fit running now writes {option} {output} at its end (it holds {lock}), which would "
                         f"replace this result: pass another {option}, or wait for the fit to end")
    os.close(fd)


def _lock_run_output(output: Path) -> Optional[int]:
    """A descriptor holding the exclusive lock on ``_output_lock_path(output)`` until it is closed (its folder made),
    or None when another process holds it."""
    lock = _output_lock_path(output)
    lock.parent.mkdir(parents=True, exist_ok=True)
    return try_lock(lock)


# The line a run (fit, test or predict) puts under LightningCLI's header in the config.yaml it saves
# (RunConfigSaver.save_config); earlier builds wrote the older line, which still marks their runs' configs.
SAVED_CONFIG_MARK = b"# saved by nola-vision: a run's config, which a later fit without a logger here replaces\n"
_OLDER_SAVED_CONFIG_MARKS = (b"# saved by nola-vision fit: a run's config, which a later fit without a logger here "
                             b"replaces\n",)


def _is_saved_config(path: Path, given_files: Sequence[Any]) -> bool:
    """Whether a fit may replace ``path``: an empty file, or a config a run saved (``SAVED_CONFIG_MARK`` under
    LightningCLI's header); never a config file this command reads (``-c``), a ``--print_config`` dump (the same
    header without the mark) or any other file of the user's."""
    if any(_same_local_file(path, given) for given in given_files):
        return False
    try:
        with open(path, "rb") as stream:
            if not os.fstat(stream.fileno()).st_size:
                return True
            header, mark = stream.readline(256), stream.readline(len(_OLDER_SAVED_CONFIG_MARKS[0]) + 2)
    except OSError:
        return False
    return header.startswith(b"# lightning.pytorch==") and any(
        mark.rstrip(b"\r\n") == known.rstrip(b"\n") for known in (SAVED_CONFIG_MARK, *_OLDER_SAVED_CONFIG_MARKS))


def saved_run_folder(given_files: Sequence[Any]) -> Optional[Path]:
    """The folder of the last ``-c`` file that is a config a fit saved (``SAVED_CONFIG_MARK``): its run's folder,
    which holds its ``checkpoints/``; None when no such file is given."""
    saved = _saved_config(given_files)
    return saved.parent if saved is not None else None


def _saved_config(given_files: Sequence[Any]) -> Optional[Path]:
    """The last ``-c`` file that is a config a fit saved (``SAVED_CONFIG_MARK``), or None."""
    for given in reversed(list(given_files)):
        path = _local_path(given)
        if path is not None and path.is_file() and path.stat().st_size and _is_saved_config(path, []):
            return path
    return None


def _local_path(given: Any) -> Optional[Path]:
    """The path of a ``-c`` entry (a jsonargparse path, as it resolved it when parsing); None for an inline
    ``--config`` string."""
    if given is None:
        return None
    absolute = getattr(given, "absolute", None)
    try:
        return Path(absolute if isinstance(absolute, str) else os.fspath(given))
    except TypeError:
        return None


def _same_local_file(path: Path, given: Any) -> bool:
    """Whether a ``-c`` entry (a jsonargparse path, or None for an inline ``--config`` string) is the file ``path``;
    an entry that is no local file (inline, a URL, removed since) is not."""
    local = _local_path(given)
    try:
        return local is not None and os.path.samefile(path, local)
    except (OSError, ValueError):
        return False


def _how_to_resume(folders: Sequence[Path]) -> str:
    """How to resume the run kept in ``folders`` (checkpoint folders): ``--ckpt_path last``, or, where a run was killed
    between Lightning's epoch checkpoint and ``last.ckpt`` (which it writes second), the newest checkpoint's path."""
    kept = [p for folder in folders for p in Path(folder).glob("*.ckpt") if p.is_file()]
    newest = newest_checkpoint(kept, _resumable) or newest_checkpoint(kept)  # one saved inside an epoch is refused
    if newest is None or any(map(_is_last_checkpoint, kept)):
        return "--ckpt_path last"
    return f"--ckpt_path {newest} (its newest checkpoint: it stopped before writing last.ckpt)"


def _holds_work(folder: Path) -> bool:
    """Whether a run folder holds what a run kept: a checkpoint or an exported adapter (a folder of another kind
    named ``adapter`` is not one)."""
    return any(folder.glob("checkpoints/*.ckpt")) or (folder / "adapter" / WEIGHTS_NAME).is_file()


class _ConciseParser(LightningArgumentParser):
    """The CLI's parser: an error shows its message under the parser's tip to run ``--help``, without the usage of
    every option above them (about 90 lines, under which the line naming the mistake was lost)."""

    def print_usage(self, file: Any = None) -> None:
        pass


class NolaCLI(LightningCLI):
    """LightningCLI with linked data/model arguments, a test pass after ``fit`` and a JSON result file."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.written_result: Optional[str] = None  # the --result_file this run wrote, once it has
        self.command_sha256: Optional[str] = None  # command_digest of its arguments, once parsed
        try:
            super().__init__(*args, **kwargs)
        except BaseException as stop:  # a Ctrl-C as the run returned, after its result was written: the console
            reported = keyboard_interrupt_of(stop) or stop
            if self.written_result is not None:  # script says so (cli.main), not "no result was written"
                _note(reported, "written_result", self.written_result)
            elif self._exported_this_fit() and not hasattr(reported, "finished_fit"):
                # stopped after the export, outside after_fit (in Lightning's teardown of the fit): as after_fit says
                self._note_finished_fit(reported)
            raise

    def _exported_this_fit(self) -> bool:
        """Whether this command is a fit that exported its adapter (training finished)."""
        model = getattr(self, "model", None)
        return getattr(self, "subcommand", None) == "fit" and getattr(model, "exported_adapter_dir", None) is not None

    def _note_finished_fit(self, reported: BaseException) -> None:
        """Note on ``reported`` the adapter and checkpoint of a fit stopped after training finished, which the console
        script names (``cli._kept``)."""
        note = self.model.before_export.note if self.model.before_export is not None else ""
        _note(reported, "finished_fit", {"adapter": self.model.exported_adapter_dir or self.model.export_target,
                                         "note": note, "checkpoint": self._finished_checkpoint()})

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("model.backbone", "data.backbone")  # preprocessing from the backbone's timm cfg
        parser.link_arguments("model.image_size", "data.image_size")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="after fit, test the final weights on the full test split (the paper's number)")
        parser.add_argument("--result_file", type=Optional[str], default=None,
                            help="fit, test, validate: write the final metrics, the checkpoint and parameter counts to "
                                 "this JSON file (atomically; an existing file is replaced only if it is such a "
                                 "result); predict refuses it (see --predictions_file)")
        parser.add_argument("--predictions_file", type=Optional[str], default=None,
                            help="predict: CSV path (default <log_dir>/predictions.csv)")

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Lightning's parser (each subcommand's too), whose errors show one line of usage (``_ConciseParser``)."""
        parser = super().init_parser(**kwargs)
        parser.__class__ = _ConciseParser  # a subclass that only overrides a method: Lightning built the rest
        return parser

    def setup_parser(self, add_subcommands: bool, main_kwargs: Dict[str, Any], subparser_kwargs: Dict[str, Any]
                     ) -> None:
        """Remember whether the parser has subcommands (``run=False`` builds a flat one: its ``-c`` files are flat)."""
        self.with_subcommands = add_subcommands
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse; resolve ``--ckpt_path last`` in this run directory; remember the model arguments as given, so
        that those the checkpoint's hyper-parameters replace (LightningCLI does so next) can be reported."""
        check_config_sources(sys.argv[1:] if args is None else args, subcommands=self.with_subcommands,
                             trainer_class=self.trainer_class)
        super().parse_arguments(parser, args)
        config = self.config.get(self.config.get("subcommand") or "")
        if config is None:
            return
        for option in ("result_file", "predictions_file"):  # empty: no file, and no word of it
            if config.get(option) is not None and not str(config.get(option)).strip():
                raise ValueError(f"--{option} is empty: pass a file path, or leave the option out to write none")
        _absolute_paths(config)  # "~/x.json" too: no shell expands it in a config file
        root = config.trainer.default_root_dir  # absolute now (_absolute_paths), or a URL
        _refuse_files_in_the_way(config.trainer)
        _check_seed(config.get("seed_everything"))
        argv = sys.argv[1:] if args is None else args
        self.command_sha256 = command_digest(argv)  # a fit result records it: which command wrote the result
        # a run's own config.yaml names its run: its folder's checkpoints, not the newest run's under the root (unless
        # the command line names the root to look under)
        run = (None if _given_on_command_line(argv, "--trainer.default_root_dir")
               else saved_run_folder(config.get("config") or []))
        dirpaths = checkpoint_dirpaths(config) + (logger_checkpoint_folders(config) if run is None else [])
        if config.get("ckpt_path") == "best":
            config.ckpt_path = find_best_checkpoint(run or root, runs_below=run is None, dirpaths=dirpaths)
        if config.get("ckpt_path") == "last":
            config.ckpt_path = find_last_checkpoint(run or root, runs_below=run is None, dirpaths=dirpaths)
            if config.ckpt_path is not None and self.config.get("subcommand") == "fit":
                config.ckpt_path = _resumable_last(Path(config.ckpt_path))
            if config.ckpt_path is None:
                where = (f"in {run}, the folder of the run's config.yaml given with -c" if run else
                         f"under {root} (nor its <name>/version_N folders)")
                if dirpaths:
                    where += f" nor in {', '.join(map(str, dirpaths))} (its checkpoint callbacks' and logger's folders)"
                resume = _how_to_resume(_checkpoint_folders(run or root, run is None, dirpaths))
                if resume != "--ckpt_path last":
                    raise FileNotFoundError(f"--ckpt_path last: no last.ckpt {where}; to resume, pass {resume}")
                raise FileNotFoundError(f"--ckpt_path last: no last.ckpt {where}: nothing to resume. Pass "
                                        "--trainer.default_root_dir of the run, or a checkpoint path")
        subcommand = self.config.get("subcommand")
        if subcommand in ("test", "validate", "predict") and config.get("ckpt_path") is None:
            raise ValueError(f"{subcommand} without --ckpt_path would evaluate the untrained model (a random head): "
                             "pass --ckpt_path <a checkpoint of the fit run> (or --ckpt_path last for the newest under "
                             "--trainer.default_root_dir)")
        result = config.get("result_file")
        # a fit's saved config.yaml carries the fit's result path, which evaluating its checkpoint must not replace
        from_config = bool(result) and not _given_on_command_line(argv, "--result_file")
        # the result_file of a fit's saved config (-c), as written and made absolute: read once for the checks below
        written = _saved_result_file(config.get("config") or []) if from_config else None
        saved_result = _from_working_directory(written) if written is not None else None
        if subcommand != "predict" and config.get("predictions_file") and _given_on_command_line(argv,
                                                                                                "--predictions_file"):
            raise ValueError(f"{subcommand} writes no predictions: --predictions_file is for predict (its metrics go "
                             "to --result_file)")
        if subcommand == "predict" and result:
            if not from_config:
                raise ValueError("predict writes no metrics: --result_file is for fit, test and validate. Its "
                                 "predictions go to --predictions_file (default <log_dir>/predictions.csv)")
            config.result_file = None
        elif (subcommand in ("test", "validate") and written is not None and not os.path.isabs(expand_root(written))
              and saved_result == _from_working_directory(result)):
            # recorded as typed by earlier versions: relative to the folder the fit ran in, which is not known here
            config.result_file = None
            rank_zero_info(f"nola_vision: the config's result_file {written} is the result of the run that saved the "
                           "config, recorded relative to the folder that run was started in (by an earlier "
                           f"nola_vision): not written. Pass --result_file to write the {subcommand} metrics")
        elif subcommand in ("test", "validate") and from_config and (
                _is_fit_result(Path(result)) or saved_result == result):
            config.result_file = None
            whose = ("is the result of the run that saved the config" if saved_result == result else
                     f"holds the result of a fit (of checkpoint {_fit_result_checkpoint(Path(result))})")
            rank_zero_info(f"nola_vision: the config's result_file {result} {whose}, kept as it is: pass "
                           f"--result_file to write the {subcommand} metrics")
        elif (subcommand == "fit" and from_config and config.get("ckpt_path") is None
              and saved_result == _from_working_directory(result)):
            # a new run from a run's saved config (a variant: other epochs, another seed) is another run: replacing
            # the saved run's result lost it, silently (a resume, with --ckpt_path, finishes that run and writes it)
            config.result_file = None
            rank_zero_info(f"nola_vision: the config's result_file {result} is the result of the run that saved the "
                           "config, kept as it is: this new run writes no result file (pass --result_file to write "
                           "one; --ckpt_path resumes that run instead)")
        predictions = config.get("predictions_file")
        if (subcommand == "predict" and predictions and not _given_on_command_line(argv, "--predictions_file")
                and _saved_config(config.get("config") or []) is not None):
            # a saved run's config carries that pass's file: another checkpoint's pass would replace it unasked
            config.predictions_file = None
            rank_zero_info(f"nola_vision: the config's predictions_file {predictions} holds the predictions of the "
                           "run that saved the config, kept as it is: this pass writes <log_dir>/predictions.csv "
                           "(pass --predictions_file to choose)")
        check_checkpoint_file(config.get("ckpt_path"))
        if isinstance(argv, (list, tuple)) and config.model.get("adapter") is not None:
            warn_carried_adapter_settings(parser, [str(a) for a in argv], subcommand, config.model.adapter)
        self.given_model = config.model.clone()
        fields = sorted({key.split(".", 1)[0] for key in config.model.keys()})
        self.explicit_model_args = explicit_model_args(argv, fields) if isinstance(argv, (list, tuple)) else set()

    def before_instantiate_classes(self) -> None:
        """Fail on an unknown backbone with close matches, before anything is built."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_backbone_name(config.model.backbone)
        _check_precision_package(config.trainer.get("precision"))
        if self.subcommand == "fit":  # the run's config.yaml, which test -c reads, must hold every setting
            _refuse_undecodable_settings(config)
        if self.subcommand and getattr(self, "given_model", None) is not None:
            for key, value in check_checkpoint_overrides(self.given_model, config.model,
                                                         self.explicit_model_args).items():
                config.model[key] = value

    def before_fit(self) -> None:
        """What only the end of a run would find, found before it trains: the result path, a result of part of an
        evaluation split (``check_full_passes``), a callback that monitors a metric the module never logs
        (``check_monitors``) or validation metrics without validation images, and (when testing after fit, on data
        already on disk) the test split's class folders and its missing, empty or unreadable image files."""
        check_training_length(self.trainer)  # before the run's folder and config exist (on_fit_start checks it too)
        refuse_weight_changing_callbacks(self.trainer)
        config = self.config[self.subcommand]
        check_launcher(self.trainer, config.trainer.strategy)
        data = self.datamodule.hparams
        validates = bool(data.get("val_shots") or data.get("val_split_file"))
        adapter_dir = config.model.get("adapter_dir")
        if adapter_dir is not None and "://" not in str(adapter_dir):  # the export makes a folder beside it
            real = Path(os.path.realpath(adapter_dir))
            check_writable_file(real.parent / ".nv-export-check", f"--model.adapter_dir {adapter_dir}")
        if config.result_file:
            check_result_path(config.result_file)
            _refuse_replacing(Path(config.result_file), "--result_file", "fit, validate or test", _is_result_file)
            self.model.before_export = ResultRetirer(config.result_file)
            if self.trainer.overfit_batches and not self.trainer.fast_dev_run:
                raise ValueError(f"--trainer.overfit_batches {self.trainer.overfit_batches} trains (and validates) on "
                                 f"a few fixed batches, a debugging run: --result_file {config.result_file} would "
                                 "record its accuracy as the run's. Drop --trainer.overfit_batches, or drop "
                                 "--result_file")
            check_full_passes(self.trainer, ["val"] * validates + ["test"] * bool(config.test_after_fit),
                              config.result_file)
        check_monitors(self.trainer.callbacks)
        checkpoint = config.get("ckpt_path")
        if checkpoint is not None and Path(checkpoint).is_file():  # a resume: refused before anything is written
            saved = load_checkpoint(checkpoint)
            check_training_data(saved.get("datamodule_hyper_parameters") if isinstance(saved, dict) else None,
                                self.datamodule.hparams)
            if isinstance(saved, dict) and training_finished(saved, self.trainer) and self._export_missing(checkpoint):
                self.model.finishes_run = True  # stopped during its export: this fit exports and tests it
                if config.model.get("adapter_dir") is None:  # into the run's folder, where the check above looks
                    self.model.hparams.adapter_dir = str(self._outputs(checkpoint)[0].parent)
                rank_zero_info(f"nola_vision: {checkpoint} finished training, and its run holds no exported adapter "
                               "nor result (stopped during the export, or moved since): this fit trains nothing, "
                               "exports it and tests it")
            elif isinstance(saved, dict):
                try:
                    require_training_left(saved, self.trainer)
                except ValueError as refused:
                    older = self._older_outputs(checkpoint)
                    if not older:
                        raise
                    raise ValueError(
                        f"{refused}. At its output paths, {' and '.join(older)} {'is' if len(older) == 1 else 'are'} "
                        "older than its checkpoint, perhaps an earlier run's: if this run stopped during its export, "
                        "finish it into paths of its own, --model.adapter_dir <a new folder> --result_file <a new "
                        "file>, which exports and tests it") from None
        watching = [f"{type(c).__name__}(monitor={c.monitor!r})" for c in self.trainer.callbacks
                    if str(getattr(c, "monitor", None) or "").startswith("val/")]
        if watching and not validates:
            raise ValueError(f"{', '.join(watching)} monitors a validation metric, and this run has no validation "
                             "images: set --data.val_shots N (e.g. 2; drawn apart from the training shots)")
        if watching and self.trainer.limit_val_batches == 0:
            raise ValueError(f"{', '.join(watching)} monitors a validation metric, and --trainer.limit_val_batches 0 "
                             "runs no validation pass: drop --trainer.limit_val_batches 0, or the callback")
        every, epochs = self.trainer.check_val_every_n_epoch, self.trainer.max_epochs
        if watching and every is not None and epochs is not None and 0 < epochs < every:
            raise ValueError(f"{', '.join(watching)} monitors a validation metric, and "
                             f"--trainer.check_val_every_n_epoch {every} is above --trainer.max_epochs {epochs}: no "
                             "validation runs during training, so the callback would never act (no best checkpoint, "
                             "no early stop). Lower "
                             "--trainer.check_val_every_n_epoch, or drop the callback")
        if config.test_after_fit:
            self._check_test_images("training (the test after fit reads every test image)")
        claim_log_dir(self.trainer)

    def _export_missing(self, checkpoint: str) -> bool:
        """Whether the run of ``checkpoint`` never finished its export: no exported adapter (in
        ``--model.adapter_dir``, or beside the run's ``checkpoints`` folder where none was given), and no
        ``--result_file`` recorded (a finished run whose adapter was moved away is not redone)."""
        return not any(path.exists() for path in self._outputs(checkpoint))

    def _outputs(self, checkpoint: str) -> List[Path]:
        """The adapter file and the result file the run of ``checkpoint`` exports to."""
        config = self.config[self.subcommand]
        given = config.model.get("adapter_dir")
        folder = Path(given) if given is not None else Path(checkpoint).resolve().parent.parent / "adapter"
        return [folder / WEIGHTS_NAME, *([Path(config.result_file)] if config.result_file else [])]

    def _older_outputs(self, checkpoint: str) -> List[str]:
        """The run's output files that exist and are all older than ``checkpoint`` (named as options), else none:
        perhaps an earlier run's at shared paths, where this run stopped before its export. Not taken for it (a run
        folder copied without its times looks alike), only said."""
        trained = os.stat(checkpoint).st_mtime_ns
        found = [path for path in self._outputs(checkpoint) if path.exists()]
        if not found or any(path.stat().st_mtime_ns >= trained for path in found):
            return []
        return [f"the {'adapter in ' + str(path.parent) if path.name == WEIGHTS_NAME else 'result ' + str(path)}"
                for path in found]

    def after_fit(self) -> None:
        try:
            self._after_training()
        except BaseException as stop:  # Lightning exits 1 on Ctrl-C, with the interrupt as the exit's context
            stops = (KeyboardInterrupt, SIGTERMException)  # SIGTERMException is a SystemExit
            interrupt = stop if isinstance(stop, stops) else stop.__context__
            reported = interrupt if isinstance(interrupt, stops) else stop
            if not isinstance(reported, OutputKeptError):  # the console script names what was kept (cli.main)
                self._note_finished_fit(reported)
            raise
        finally:
            for saver in _config_savers(self.trainer):
                saver.release_outputs()

    def _after_training(self) -> None:
        """What a fit runs once training finished: validate the final weights where no validation saw them, test
        them (``test_after_fit``) and write the result file."""
        config = self.config[self.subcommand]
        # a SIGTERM during the export (inside fit, after its loops stopped looking) ends the command here: the next
        # pass's handler would forget it, and the run went on to test and exit 0
        _stop_if_terminated(self.trainer)
        # before the passes below: a BatchSizeFinder callback searches again in them, resetting the loops' progress
        trained = {"epochs": whole_epochs(self.trainer), "steps": self.trainer.global_step}
        # a resume that trained nothing (a run stopped in its export) logged no training metrics: its checkpoint's
        metrics = {**self.model.checkpoint_train_metrics,
                   **{k: float(v) for k, v in self.trainer.callback_metrics.items() if v.numel() == 1}}
        if self._final_weights_unvalidated():
            # the last epoch did not validate (check_val_every_n_epoch > 1, max_steps, ...): the val/* metrics are an
            # earlier epoch's, while the result, the adapter and last.ckpt are the final weights'
            results = self.trainer.validate(self.model, datamodule=self.datamodule)
            metrics.update({k: float(v) for k, v in (results[0] if results else {}).items()})
        if config.test_after_fit and not self.trainer.interrupted:
            results = self.trainer.test(self.model, datamodule=self.datamodule)
            metrics.update({k: float(v) for k, v in (results[0] if results else {}).items()})
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank asks
        if config.result_file and self.trainer.fast_dev_run:  # its metrics are those of a few batches
            rank_zero_info(f"nola_vision: fast_dev_run, so {config.result_file} is not written")
            return
        if config.result_file and self.trainer.is_global_zero and not self.trainer.interrupted:
            checkpoint = _absolute(self._final_checkpoint())
            try:
                self._write_fit_result(config.result_file, metrics, log_dir, checkpoint, trained)
            except (OutputKeptError, OSError) as error:  # OSError: a write the checks before the run let through
                why = (error_message(error).rstrip(".") if isinstance(error, OutputKeptError)
                       else _unwritten(error, config.result_file))
                raise OutputKeptError(
                    f"{why}. Training finished and was kept: adapter {self.model.exported_adapter_dir}, checkpoint "
                    f"{checkpoint or '(none)'}; its metrics: {json.dumps(metrics, sort_keys=True)}") from error

    def _write_fit_result(self, path: str, metrics: Dict[str, float], log_dir: Optional[str],
                          checkpoint: Optional[str], trained: Dict[str, int]) -> None:
        write_json_atomic(path, check=_kept_output_check(Path(path), "--result_file", "fit, validate or test",
                                                         _is_result_file), obj={
                "metrics": metrics,
                "config": {"method": self.model.adapter_config.method,
                           "backbone": self.model.hparams.backbone, "dataset": self.datamodule.dataset_name,
                           "shots": self.datamodule.shots, "split_seed": self.datamodule.split_seed,
                           "val_shots": self.datamodule.val_shots,  # as test and validate results record it
                           "quant_bits": quantization_aware_bits(self.model.model),  # the bits the metrics saw
                           "seed": self.run_seed.seed,  # None when a resume mixed seeds (RunSeed)
                           "precision": str(self.trainer.precision)},  # as Lightning ran it (16-mixed is bf16 on CPU)
                "parameter_counts": self.model.parameter_counts,
                **trained,  # "epochs" (whole) and "steps" the fit trained
                "adapter_dir": _absolute(self.model.exported_adapter_dir),
                "command_sha256": self.command_sha256,
                # the metrics are those of the trained tensors; the file stores them at these bits
                "adapter_bits": self.model.exported_adapter_bits,
                "adapter_sha256": self.model.exported_adapter_sha256,  # which adapter: the folder may be re-exported
                "evaluated": self._tested_images(metrics),
                "log_dir": _absolute(log_dir),
                "checkpoint": checkpoint,
            })
        self.written_result = path

    def _tested_images(self, metrics: Dict[str, float]) -> Optional[Dict[str, Any]]:
        """The images behind a fit's ``test/*`` metrics, as a test result records them (``_evaluated``): fits on two
        roots of one dataset otherwise gave results alike. None where the fit did not test."""
        tested = getattr(self.datamodule, "test_set", None)
        if tested is None or not any(key.startswith("test/") for key in metrics):
            return None
        return self._evaluated("test", tested)

    def _evaluated(self, split: str, images: Any) -> Dict[str, Any]:
        """What a result records of the images a pass read (``evaluated``): split, dataset, root, count, precision."""
        data = self.datamodule
        return {"split": split, "dataset": data.dataset_name, "root": _images_root(images, data.root),
                "images": len(images) if images is not None else None, "precision": str(self.trainer.precision)}

    def _finished_checkpoint(self) -> Optional[str]:
        """The checkpoint of a finished fit's final weights (``_final_checkpoint``) where it exists, else None: a stop
        after training names it to test (a resume's epoch-end.ckpt holds earlier weights than the adapter's)."""
        try:
            path = self._final_checkpoint()
        except Exception:  # noqa: BLE001 (a remote or unreadable best checkpoint: none to name)
            return None
        return path if path and ("://" in path or os.path.isfile(path)) else None

    def _final_checkpoint(self) -> Optional[str]:
        """The checkpoint ``test`` reproduces the result from, one that holds the final weights: ``last.ckpt``, else
        the best one when it was saved at the final step; None when the run kept neither (with a warning when its
        best holds earlier weights)."""
        callback = self.trainer.checkpoint_callback
        last, best = getattr(callback, "last_model_path", None), getattr(callback, "best_model_path", None)
        if last or not best:
            return last or None
        with fsspec.open(best, "rb") as file:  # the run's own small file, local or remote (s3://, gs://)
            # the run's own file, written by this fit (weights_only would refuse a callback's numpy scalar in it, and
            # a run whose fit finished lost its result)
            step = torch.load(file, map_location="cpu", weights_only=False)["global_step"]
        if step == self.trainer.global_step:
            return best
        rank_zero_warn(f"nola_vision: the result names no checkpoint: the run's ModelCheckpoint kept {best}, an "
                       "earlier step's weights, and no last.ckpt (save_last false), while the result's metrics are "
                       f"the final weights' (the exported adapter, {self.model.exported_adapter_dir})")
        return None

    def _final_weights_unvalidated(self) -> bool:
        """Whether this run validates (validation images, ``limit_val_batches`` > 0) and no validation during fit saw
        its final weights."""
        trainer, final = self.trainer, getattr(self, "final_weights", None)
        if final is None or trainer.interrupted or trainer.fast_dev_run or not trainer.limit_val_batches:
            return False
        if self.datamodule.val_set is None:
            return False
        return final.validated_step != trainer.global_step

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, keeping a ``last.ckpt`` of the latest epoch's weights by default (``FinalWeights``), so that
        ``fit --ckpt_path last`` resumes a run where it stopped and ``test`` on it reproduces fit's accuracy."""
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except TypeError as error:  # Lightning's own check of a value (devices=-2), raised as a TypeError
            raise ValueError(f"--trainer: {error}") from error
        use_atomic_checkpoints(trainer)
        _plain_bar_on_a_narrow_console(trainer)
        for callback in trainer.checkpoint_callbacks:
            # not in a fast_dev_run, whose ModelCheckpoint saves no other checkpoint (Lightning 2.6 saves last at the
            # end of any fit): its last-v1.ckpt would be the newest that --ckpt_path last finds in the run's folder
            # (a ModelCheckpoint: other Checkpoint callbacks, OnExceptionCheckpoint, have no save_last)
            if isinstance(callback, ModelCheckpoint) and callback.save_last is None and not trainer.fast_dev_run:
                callback.save_last = True
        self.final_weights = FinalWeights()
        seed = self.config[self.subcommand].seed_everything if self.subcommand else None
        self.run_seed = RunSeed(seed if isinstance(seed, int) and not isinstance(seed, bool) else None)
        trainer.callbacks.extend([self.final_weights, self.run_seed])
        return trainer

    def fit(self, model: LightningModule, **kwargs: Any) -> None:
        """``Trainer.fit``; a callback that stops it for a metric it monitors and that was not logged (a name that
        ``check_monitors`` cannot know) ends it with a ``MonitoredMetricError`` naming the checkpoint kept, not with
        Lightning's traceback."""
        for saver in _config_savers(self.trainer):
            saver.outputs_until_after_fit = True  # after_fit lets go of them
        try:
            self.trainer.fit(model, **kwargs)
        except (MisconfigurationException, RuntimeError) as err:
            callback = monitoring_callback(err)
            if callback is None:
                raise
            kept, why = self.final_weights.kept, error_message(err)
            raise MonitoredMetricError(
                f"{type(callback).__name__}(monitor={callback.monitor!r}) stopped the fit at step "
                f"{self.trainer.global_step}: {why}{'' if why.endswith(('.', '?')) else '.'} "
                + (f"The weights trained so far are kept in {kept}: monitor a metric the run logs, then resume "
                   f"with --ckpt_path {kept}" if kept else "Nothing was kept (no checkpoint callback saves last.ckpt)")
            ) from err

    def before_validate(self) -> None:
        if not self.datamodule.val_shots and not self.datamodule.val_split_file:
            checkpoint = self.config[self.subcommand].get("ckpt_path")
            raise ValueError("validate needs validation images: set --data.val_shots (images per class drawn apart "
                             "from the training shots, e.g. 2) as in the run that trained the checkpoint"
                             + ("; a run trained without them has none to validate on (another val_shots draws "
                                "another split, which validate refuses: its validation images could be the run's "
                                "training images), so evaluate it with nola-vision test instead" if checkpoint
                                else ""))
        self._check_result_file("val")
        claim_log_dir(self.trainer)

    def before_test(self) -> None:
        self._check_result_file("test")
        claim_log_dir(self.trainer)

    def _check_result_file(self, split: str) -> None:
        """The result path, and a pass over the whole split, are checked before the pass, whose metrics a bad path
        would lose at the end."""
        path = self.config[self.subcommand].result_file
        if path:
            check_result_path(path)
            _refuse_replacing(Path(path), "--result_file", "fit, validate or test", _is_result_file)
            if _is_fit_result(Path(path)):
                raise ValueError(f"--result_file {path} holds the result of a fit (its adapter, epochs and "
                                 f"checkpoint), which a {self.subcommand} result would replace; a run's config.yaml "
                                 "carries its fit's --result_file. Pass another --result_file (e.g. "
                                 f"{Path(path).stem}_{self.subcommand}.json), or --result_file null")
            _refuse_output_of_a_running_fit(Path(path), "--result_file")
            check_full_passes(self.trainer, [split], path, batches=self._split_batches)

    def after_test(self) -> None:
        self._write_evaluation_result("test")

    def after_validate(self) -> None:
        self._write_evaluation_result("val")

    def _write_evaluation_result(self, split: str) -> None:
        """``test``/``validate --result_file``: the metrics of the pass, as ``fit`` writes its own, with the checkpoint
        it evaluated and the split it read (``test``: the full test split; ``val``: the run's validation images).

        ``config`` is the checkpoint's run (``checkpoint_run``: its k-shot split and seed), never this command line's
        data settings or seed, which decide nothing of the weights: protocol and tune file results by it. What the
        pass itself read is ``evaluated``."""
        config = self.config[self.subcommand]
        if not config.result_file:
            return
        trainer = self.trainer
        if trainer.fast_dev_run:  # its metrics are those of a few batches
            rank_zero_info(f"nola_vision: fast_dev_run, so {config.result_file} is not written")
            return
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        _stop_if_terminated(trainer)
        if not trainer.is_global_zero or trainer.interrupted:
            return
        data, checkpoint = self.datamodule, str(trainer.ckpt_path or config.ckpt_path)
        if data.train_set is None and data.test_set is None:  # the pass set its data up in processes it started
            data.setup(split if split == "test" else "validate")  # (ddp_spawn): listed here to count its images
        evaluated = data.test_set if split == "test" else data.val_set
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        kept = _kept_output_check(Path(config.result_file), "--result_file", "fit, validate or test", _is_result_file,
                                  f"its metrics: {json.dumps(metrics, sort_keys=True)}")
        result = {
            "metrics": metrics,
            "subcommand": self.subcommand,
            "split": split,
            "config": {"method": self.model.adapter_config.method, "backbone": self.model.hparams.backbone,
                       **checkpoint_run(checkpoint), "quant_bits": quantization_aware_bits(self.model.model)},
            # the images of this pass: the test split of --data.dataset/root (any shots), or the validation images
            # drawn as the run drew them (another draw is refused before the pass)
            "evaluated": self._evaluated(split, evaluated),
            "parameter_counts": self.model.parameter_counts,
            "log_dir": _absolute(log_dir),
            "checkpoint": _absolute(checkpoint),
        }
        try:
            write_json_atomic(config.result_file, result, check=kept)
        except OSError as error:  # a write the checks before the pass let through: exit 1, naming the option
            raise OutputKeptError(f"{_unwritten(error, config.result_file)}; the {self.subcommand} pass ran, its "
                                  f"metrics: {json.dumps(metrics, sort_keys=True)}") from error
        self.written_result = config.result_file
        rank_zero_info(f"nola_vision: wrote the {self.subcommand} metrics to {config.result_file}")

    def before_predict(self) -> None:
        """What would lose the pass's predictions at its end, or write part of them over a whole file, is found before
        it: the predictions path, a pass cut to part of the test split (``fast_dev_run`` writes no file), and test
        images that are missing, empty or unreadable. SIGTERM ends the pass (``StopPredictingOnSigterm``)."""
        trainer = self.trainer
        trainer.callbacks.append(StopPredictingOnSigterm())
        if any(isinstance(cb, BasePredictionWriter) for cb in trainer.callbacks):  # the user's own writer decides
            return
        if trainer.fast_dev_run:  # predictions of a few batches
            rank_zero_info("nola_vision: fast_dev_run, so no predictions file is written")
            return
        path = self.config[self.subcommand].predictions_file
        if path:
            check_result_path(path, "--predictions_file", "predictions.csv")
        made = claim_log_dir(trainer)  # before the checks below, which take a while: the folder is this pass's
        try:
            self._check_predictions(path)
        except BaseException:
            if made is not None:
                _remove_if_unused(made)
            raise

    def _check_predictions(self, path: Optional[str]) -> None:
        """``before_predict``'s checks of the predictions file and the test images."""
        trainer = self.trainer
        default = Path(trainer.log_dir or trainer.default_root_dir) / "predictions.csv"  # the writer's
        _refuse_replacing(Path(path) if path else default, "--predictions_file", "predict", _is_predictions_file)
        limit = trainer.limit_predict_batches
        self._check_test_images("predicting (the pass reads every test image)")
        whole = isinstance(limit, float) and limit >= 1.0 or isinstance(limit, int) and limit >= self._split_batches(
            "test")
        if not whole:
            part = f"{limit} batch(es)" if isinstance(limit, int) else f"{limit * 100:g}% of its batches"
            raise ValueError(f"--trainer.limit_predict_batches {limit} limits the pass to {part}, so "
                             f"{path or default} would hold predictions of part of the test split, with nothing saying "
                             "so: drop --trainer.limit_predict_batches (or use --trainer.fast_dev_run to try a few "
                             "batches without a file)")
        trainer.callbacks.append(PredictionsCSVWriter(path))

    def _split_batches(self, split: str) -> float:
        """The batches a process takes to pass over the whole ``val`` or ``test`` split (infinite while its data is
        still to download): under DDP each takes its share, at most ``ceil(images / processes)`` images (a limit of the
        whole split's batches refused a limit that covered every process's share)."""
        if self.datamodule.download:
            return float("inf")
        if split == "val":
            self.datamodule.setup("validate")
            loader = self.datamodule.val_dataloader()
        else:
            self.datamodule.setup("test")
            loader = self.datamodule.predict_dataloader()
        world = self.trainer.world_size
        if world <= 1 or not loader.batch_size:
            return len(loader)
        return math.ceil(math.ceil(len(loader.dataset) / world) / loader.batch_size)

    def _check_test_images(self, why: str) -> None:
        """Refuse missing, empty (0-byte) or unreadable test images before a pass that would fail on them at the end
        (data still to download is not there to check)."""
        if self.datamodule.download:
            return
        self.datamodule.setup("test")
        if self.trainer.world_size > 1:  # else found when the test pass starts, after training
            require_share_per_process(len(self.datamodule.test_set), self.trainer.world_size, "test")
        bad = self.datamodule.test_set.dataset.unreadable_files()
        if bad:
            error = CorruptImageError(f"{len(bad)} test image(s) cannot be read: {unreadable_named(bad)}. Copy them "
                                      f"again, make them readable, or remove them, before {why}")
            error.before_run = True  # a refusal before the run (exit 2): every run of the split would fail alike
            raise error


# What FewShotClassifier logs during fit (train/module.py's self.log calls), by the names callbacks find them under:
# train/loss is logged per step and per epoch, so Lightning adds train/loss_step and train/loss_epoch. test/acc is
# logged by test passes only. tests/test_cli_records.py compares this with a fit's callback metrics.
FIT_METRICS = ("train/loss", "train/loss_step", "train/loss_epoch", "train/acc", "val/acc")
MODULE_PREFIXES = ("train/", "val/", "test/")  # the module's names; any other may be logged by a user's callback


class MonitoredMetricError(ValueError):
    """A callback stopped a fit for a metric it monitors that was never logged: a configuration error found late."""


def check_launcher(trainer: Trainer, strategy: Any) -> None:
    """Refuse a fit whose ranks run in processes this one starts (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``):
    what the run exported, checkpointed and how far it got stays in those processes, so this one would record a
    result naming no adapter or checkpoint, at epoch 0, and validate the weights again."""
    launcher = trainer.strategy.launcher
    if isinstance(launcher, _MultiProcessingLauncher):
        raise ValueError(f"--trainer.strategy {strategy} runs the fit in processes the command cannot read its "
                         "adapter, checkpoint and result back from: use --trainer.strategy ddp (each rank started as "
                         "a script of its own, rank 0 recording the run), or train from Python with FewShotClassifier")


def check_monitors(callbacks: Sequence[Callback]) -> None:
    """Refuse a callback (``ModelCheckpoint``, ``EarlyStopping``) that monitors a name of the module's own
    (``train/``, ``val/``, ``test/``) that the module never logs during fit: Lightning finds it missing only after the
    first epoch, and stops the run there with a traceback. Other names may come from a callback of the user's."""
    wrong = [f"{type(c).__name__}(monitor={c.monitor!r})" for c in callbacks
             if isinstance(getattr(c, "monitor", None), str) and c.monitor.startswith(MODULE_PREFIXES)
             and c.monitor not in FIT_METRICS]
    if wrong:
        raise ValueError(f"{', '.join(wrong)} monitors a metric the model never logs during fit (test/ metrics are "
                         "logged by test passes only), so the run would stop after its first epoch: monitor one of "
                         f"{', '.join(FIT_METRICS)} (val/acc needs --data.val_shots)")


def monitoring_callback(err: BaseException) -> Optional[Callback]:
    """The callback that raised ``err`` from its own code over the metric it monitors (``EarlyStopping``'s
    RuntimeError, ``ModelCheckpoint``'s MisconfigurationException for a metric never logged), or None."""
    if not isinstance(err, (MisconfigurationException, RuntimeError)):
        return None
    frames = [frame for frame, _ in traceback.walk_tb(err.__traceback__)]
    owner = frames[-1].f_locals.get("self") if frames else None
    monitor = getattr(owner, "monitor", None)
    if isinstance(owner, Callback) and isinstance(monitor, str) and monitor in str(err):
        return owner
    return None


def check_full_passes(trainer: Trainer, splits: Sequence[str], result_file: str,
                      batches: Optional[Callable[[str], float]] = None) -> None:
    """Refuse a result file of evaluation passes (``val``, ``test``) that a trainer limit cuts to part of their split
    (``limit_val_batches``/``limit_test_batches`` other than 1.0 or 0, ``overfit_batches``): its ``val/acc`` or
    ``test/acc`` would be the accuracy of a few batches, recorded as the split's. ``fast_dev_run`` writes no result;
    a run without ``--result_file`` may take any limit. ``batches`` (a split's batch count) is given for the
    ``validate`` and ``test`` subcommands: a whole number of batches that covers the split is every batch, and a limit
    of 0 is refused too, since their result would hold no metric."""
    if trainer.fast_dev_run:
        return
    if splits and getattr(trainer, "barebones", False):
        metrics = " and ".join(f"{split}/acc" for split in dict.fromkeys(splits))
        raise ValueError(f"--trainer.barebones true turns Lightning's logging off, so --result_file {result_file} "
                         f"would hold no {metrics} (replacing any result there): drop --trainer.barebones, or drop "
                         "--result_file")
    cut = []
    for split in splits:
        limit = trainer.limit_val_batches if split == "val" else trainer.limit_test_batches
        name = "validation images" if split == "val" else "test split"
        if limit == 0 and batches is not None:
            raise ValueError(f"--trainer.limit_{split}_batches 0 runs no {split} pass, so --result_file {result_file} "
                             f"would hold no {split}/acc (replacing any result there): drop --trainer.limit_{split}_"
                             f"batches 0 to evaluate the {name}, or drop --result_file")
        if limit == 0 or isinstance(limit, float) and limit >= 1.0:  # no pass in a fit (no metric), or every batch
            continue
        if isinstance(limit, int) and batches is not None and limit >= batches(split):
            continue
        option = (f"--trainer.overfit_batches {trainer.overfit_batches}" if split == "val" and trainer.overfit_batches
                  else f"--trainer.limit_{split}_batches {limit}")
        part = f"{limit} batch(es)" if isinstance(limit, int) else f"{limit * 100:g}% of its batches"
        unknown = isinstance(limit, int) and batches is None  # fit checks before its loaders exist
        cover = "could cover only part of the" if unknown else "would cover only part of the"
        cut.append((option, f"{option} limits the {split} pass to {part}, so {split}/acc in --result_file "
                            f"{result_file} {cover} {name}" + (" (fit takes no batch count: only 1.0, every "
                                                               "batch)" if unknown else "")))
    if cut:
        drop = " and ".join(option for option, _ in cut)
        raise ValueError("; ".join(why for _, why in cut) + f", with nothing saying so: drop {drop} to evaluate every "
                         "image, or drop --result_file")


class ResultRetirer:
    """``before_export`` of a fit with ``--result_file``: a result there that describes the adapter folder the export
    is about to replace is moved aside (``<result>.previous``) first, so no valid-looking result ever sits beside
    another adapter, whatever stops the run after the export (a failure, SIGTERM, SIGKILL)."""

    def __init__(self, result_file: str) -> None:
        self.path, self.note = Path(result_file), ""

    def __call__(self, adapter: Path) -> None:
        try:
            described = json.loads(self.path.read_text()).get("adapter_dir")
        except (OSError, ValueError, AttributeError):  # none there, or not a result
            return
        if described is None or Path(described).resolve() != adapter.resolve():
            return
        aside = previous_path(self.path, _replaceable_result)
        os.replace(self.path, aside)
        self.note = f" {self.path} described the adapter this run replaced: moved to {aside}."
        rank_zero_info(f"nola_vision:{self.note}")


def checkpoint_run(path: str) -> Dict[str, Any]:
    """What checkpoint ``path`` records of the run that trained it: its k-shot split (``dataset``, ``shots``,
    ``split_seed``, ``val_shots``; a replayed manifest's as the run resolved them) and its ``seed`` (``RunSeed``).
    A value the checkpoint does not record is None (unknown), never the command line's."""
    with fsspec.open(path, "rb") as file:  # a small file, local or remote (s3://, gs://)
        saved = torch.load(file, map_location="cpu", weights_only=True)  # never running a shared file's code
    data = (saved.get("nola_vision") or {}).get("data") or {}
    split = data.get("split") or saved.get("datamodule_hyper_parameters") or {}
    record = {key: split.get(key) for key in ("dataset", "shots", "split_seed", "val_shots")}
    drawn = data.get("drawn")  # the split as the run resolved it: a replayed manifest's settings (no seed: None)
    if drawn is not None:
        record.update({key: drawn.get(key) for key in ("shots", "split_seed", "val_shots")})
    elif split.get("split_file"):  # an older checkpoint: the settings in the header of the manifest it replayed
        train, val = _manifest_header(split["split_file"]), _manifest_header(split.get("val_split_file"))
        record.update(shots=train.get("shots"), split_seed=train.get("split_seed"),
                      val_shots=val.get("val_shots") if split.get("val_split_file") else 0)
    return {**record, "seed": (saved.get(RUN_RECORD) or {}).get("seed")}


def _manifest_header(path: Optional[str]) -> Dict[str, int]:
    """The integer settings a manifest's header records ({} for none, or an unreadable file)."""
    try:
        header = manifest_settings(path) if path else {}
    except OSError:
        return {}
    return {key: int(value) for key, value in header.items() if value.lstrip("-").isdigit()}


def _refuse_replacing(path: Path, option: str, writers: str, recognised: Callable[[Path], bool]) -> None:
    """Refuse an output path that holds a file ``recognised`` does not take for an earlier output of ``writers`` (one
    is replaced): a checkpoint or an adapter's file named there by mistake would be lost."""
    if path.is_file() and path.stat().st_size and not recognised(path):
        raise ValueError(f"{option} {path} exists and is not a file {writers} wrote, so it would be replaced: pass "
                         f"another {option} (or remove the file)")


def _absolute(path: Any) -> Optional[str]:
    """A local path a result records, made absolute (a URL as it is): the result names the files from any working
    directory, as the run's ``data.root`` is (``_absolute_paths``)."""
    if path is None or path == "":
        return None
    return str(path) if "://" in str(path) else _from_working_directory(path)


def _images_root(evaluated: Any, given: Any) -> str:
    """Where the evaluated images came from: the dataset's own root (``sklearn-digits`` for the bundled digits, a
    system copy's folder), else the ``--data.root`` given (a digits result named ``data``, which it never read)."""
    dataset = evaluated
    while dataset is not None and not hasattr(dataset, "root"):  # through the transform's wrapper and the val Subset
        dataset = getattr(dataset, "dataset", None)
    return str(getattr(dataset, "root", given))


def _unwritten(error: OSError, path: str) -> str:
    """Why ``--result_file path`` was not written (its temporary's name left out), with the fix for want of room."""
    hint = out_of_room_hint(error)
    return f"--result_file {path} could not be written ({error.strerror or error}){f': {hint}' if hint else ''}"


class OutputKeptError(RuntimeError):
    """A file that appeared at a run's output path while it ran (a user's, hours into a fit) was kept, so the run's
    output was not written there: a failure of the run (exit code 1), not of its configuration."""


def _kept_output_check(path: Path, option: str, writers: str, recognised: Callable[[Path], bool],
                       lost: str = "") -> Callable[[], None]:
    """``atomic_path``'s check for an output file: what ``_refuse_replacing`` refuses before the run, refused again
    just before the rename, as an ``OutputKeptError`` (``lost``: what the message should give instead)."""
    def check() -> None:
        try:
            _refuse_replacing(path, option, writers, recognised)
        except ValueError as error:
            raise OutputKeptError(f"{error}; it appeared during the run, so nothing was written there"
                                  + (f"; {lost}" if lost else "")) from None
    return check


def _is_predictions_file(path: Path) -> bool:
    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            return next(csv.reader(f), None) == PREDICTIONS_HEADER
    except (OSError, csv.Error):  # unreadable, or not CSV (a binary file)
        return False


# A result file is a few KB of JSON: a larger file is something else (a checkpoint), and is not read to tell.
_LARGEST_RESULT_FILE = 1 << 24


def _result_document(path: Path) -> Optional[dict]:
    """The file's JSON object if it has its ``metrics``, as fit, validate and test write, else None."""
    if path.stat().st_size > _LARGEST_RESULT_FILE:
        return None
    try:
        document = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):  # unreadable, not UTF-8, not JSON (a binary file) or too deep
        return None
    return document if isinstance(document, dict) and isinstance(document.get("metrics"), dict) else None


def _is_result_file(path: Path) -> bool:
    return _result_document(path) is not None


def _replaceable_result(path: Path) -> bool:
    """Whether ``path`` holds an earlier result set aside, to be replaced: not a user's file or folder of that name
    (``previous_path`` steps past write-protected ones as well)."""
    return path.is_file() and not path.is_symlink() and _is_result_file(path)


def _saved_result_file(given_files: Sequence[Any]) -> Optional[str]:
    """The ``result_file`` a fit's saved config (the last ``-c`` file that is one) names, as written: that fit's
    result, also after it was moved away (an evaluation of the run would write its metrics there unasked). Configs
    of earlier versions recorded it as typed, relative to the fit's working directory."""
    path = _saved_config(given_files)
    if path is None:
        return None
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    result = saved.get("result_file") if isinstance(saved, dict) else None
    return result if isinstance(result, str) and result else None


def _fit_result_checkpoint(path: Path) -> Optional[str]:
    """The checkpoint a fit's result file records (None where it records none)."""
    document = _result_document(path) if path.is_file() else None
    return document.get("checkpoint") if isinstance(document, dict) else None


def _is_fit_result(path: Path) -> bool:
    """A result file that ``fit`` wrote (test and validate record their ``subcommand``)."""
    document = _result_document(path) if path.is_file() else None
    return document is not None and "subcommand" not in document


def command_digest(argv: Sequence[Any]) -> str:
    """The digest of a command's arguments (``["fit", ...]``), which its fit result records: protocol stamps that of
    the fit it starts, so a result another fit wrote in the run's folder (resumed or re-run by hand, maybe with other
    settings) is told from the run's own."""
    return hashlib.sha256(json.dumps([str(arg) for arg in argv]).encode()).hexdigest()[:16]


def _given_on_command_line(argv: Any, option: str) -> bool:
    """Whether ``option`` is on the command line itself (``--x v``, ``--x=v`` or an abbreviation argparse takes),
    not only in a ``-c`` file; arguments given as a mapping (``run_lightning_cli({...})``) name each value."""
    if not isinstance(argv, (list, tuple)):
        return argv is not None
    args = [str(a) for a in argv]
    for i, arg in enumerate(args):
        name, equals, value = arg.partition("=")
        if len(name) <= 2 or not name.startswith("--") or not option.startswith(name):
            continue
        rest = option[len(name):]
        if not rest.startswith("."):  # the option, or an abbreviation of it
            return True
        # its group given whole (--trainer '{...}' or a file): given where the group's value sets it
        if _group_sets(value if equals else (args[i + 1] if i + 1 < len(args) else ""), rest[1:].split(".")):
            return True
    return False


def _yaml_value(value: str) -> Any:
    """An option's value as the parser reads it: the YAML of the file it names, else the YAML (or JSON) of the text
    itself; None where it is no YAML."""
    try:
        text = Path(value).read_text() if Path(value).is_file() else value
    except (OSError, ValueError):  # a long inline value is no file name
        text = value
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None


def _group_sets(value: str, keys: List[str]) -> bool:
    """Whether a group option's value (inline YAML/JSON, or a file of it) sets the nested ``keys``."""
    settings = _yaml_value(value)
    for key in keys:
        if not isinstance(settings, dict) or key not in settings:
            return False
        settings = settings[key]
    return True


def check_config_sources(argv: Any, subcommands: bool = True, trainer_class: Any = Trainer) -> None:
    """Refuse a ``-c``/``--config`` file that is not valid YAML, naming the file (the parser's message names
    neither the file nor which of several ``-c`` files it was), any config or value nested too deeply to parse, a
    misspelt key (``_check_section_keys``, ``trainer:`` against ``trainer_class``), and a linked data option
    (``LINKED_FROM``); with ``subcommands`` (the CLI's parser has them), also a flat file given before the
    subcommand."""
    if not isinstance(argv, (list, tuple)):
        return
    args = [str(a) for a in argv]
    subcommand_at = next((i for i, arg in enumerate(args) if arg in NolaCLI.subcommands()
                          and (i == 0 or args[i - 1] not in ("-c", "--config"))), len(args))
    for i, arg in enumerate(args):
        option, equals, value = arg.partition("=")
        if not equals:
            option, value = (args[i - 1] if i else ""), arg
        if option in ("-c", "--config") and Path(value).is_file():
            with open(value, errors="replace") as stream:  # YAML's messages then name the file
                node = _check_yaml(stream, f"config file {value}")
            if node is None:
                raise ValueError(f"config file {value} is empty (or only comments): it sets nothing; give it a "
                                 "model and data section, e.g. copy configs/tiny_offline.yaml")
            if subcommands and i < subcommand_at:
                _check_top_level_config(node, value)
                for _, section in node.value if isinstance(node, yaml.MappingNode) else []:  # fit: {model: ...}
                    if isinstance(section, yaml.MappingNode):
                        _check_section_keys(section, value, trainer_class)
            else:
                if subcommands and subcommand_at < len(args):
                    _check_top_level_keys(node, value, args[subcommand_at])
                _check_section_keys(node, value, trainer_class)
        elif option == "--model.adapter" and value[:1] not in ("{", "["):
            _adapter_class(value)  # a custom method's config class registers itself: its options are then known
        elif option in ("--model", "--data", "--trainer"):  # a section given whole: a file or an inline mapping
            inline = f"the value of {option}"
            where, node = ((inline, _check_yaml(value, inline, syntax=False)) if value[:1] in ("{", "[")
                           else _group_file_node(value, "."))
            _check_section(option[2:], node, where, trainer_class)
        elif option.startswith("-") and value[:1] in ("{", "["):
            node = _check_yaml(value, f"the value of {option}", syntax=False)  # a plain string to the parser, maybe
            if option == "--model.adapter":  # a misspelt init_args key failed as "unknown adapter '<the JSON>'"
                _check_adapter_init_args(node, f"the value of {option}")
        if arg.startswith("--"):
            name = arg.partition("=")[0]
            _refuse_linked(name[2:].replace(".init_args.", "."), "")
            _check_command_line_key(name, trainer_class)
    _refuse_options_of_a_method_name(args)


def _check_command_line_key(option: str, trainer_class: Any) -> None:
    """Refuse ``--model.<key>``, ``--data.<key>`` or ``--trainer.<key>`` whose key no argument of the section's class
    has, naming the close ones (as for a config file's key): the parser said only "unrecognized arguments". A key
    that begins one argument's name alone is argparse's abbreviation of it, and taken."""
    section, _, rest = option[2:].partition(".")
    cls = {"model": FewShotClassifier, "data": FewShotDataModule, "trainer": trainer_class}.get(section)
    key = rest.split(".", 1)[0].rstrip("+")  # --model.adapter.init_args.rank: its field; --trainer.callbacks+=
    if cls is None or not key or key == "help":
        return
    parameters = inspect.signature(cls).parameters
    if _field_named(key, list(parameters)) is None:
        _refuse_unknown_key(cls, parameters, f"{section}.", key, "the command line")


def _refuse_options_of_a_method_name(args: List[str]) -> None:
    """Refuse ``--model.adapter lora`` (or a ``-c``/``--model`` value setting ``model.adapter: lora``) followed by
    ``--model.adapter.<option>``: a method name stands for its default config and takes no options, which the parser
    reported as a dump of the adapter Union's subtypes."""
    name = source = None
    for i, arg in enumerate(args):
        option, equals, value = arg.partition("=")
        if option in _ADAPTER_KEYS:
            value = value if equals else (args[i + 1] if i + 1 < len(args) else "")
            node = _nested_value(value, _ADAPTER_KEYS[option])
            if option == "--model.adapter" or node is not None:  # it sets the adapter: a method's name, or not
                name = node if isinstance(node, str) and node.lower() in METHODS else None
                source = f"--model.adapter {name}" if option == "--model.adapter" else \
                    f"{option} {value} (its model.adapter: {name})"
        elif option == "--model.adapter.class_path":  # another class: its options are its own
            name = None
        elif name is not None and option.startswith("--model.adapter.") and option != "--model.adapter.help":
            key = option[len("--model.adapter."):].removeprefix("init_args.").split(".", 1)[0]
            takers = [method.config_cls.__name__ for method in METHODS.values()
                      if key in inspect.signature(method.config_cls).parameters]
            config = METHODS[name.lower()].config_cls.__name__
            fix = (f"give its config class instead, --model.adapter {config} {option} ..." if config in takers else
                   f"{config} has no {key} either; " + (f"{', '.join(takers)} take{'s' * (len(takers) == 1)} it"
                                                        if takers else "no adapter config class takes it"))
            raise ValueError(f"{source} names a method with its default settings, which takes no options, so "
                             f"{option} has nothing to set: {fix}")


# Top-level keys every subcommand takes: a config file's others are checked against its parser (built for it only).
_COMMON_KEYS = frozenset({"model", "data", "trainer", "seed_everything", "ckpt_path", "result_file", "predictions_file",
                          "test_after_fit", "weights_only"})


def _check_top_level_keys(node: Any, path: str, subcommand: str) -> None:
    """Refuse a top-level key of config file ``path`` that ``subcommand`` has no option for, naming the close ones: the
    parser said only "does not accept option", where a misspelt section key names them."""
    keys = [key.value.split(".", 1)[0] for key, _ in node.value if isinstance(key, yaml.ScalarNode)] \
        if isinstance(node, yaml.MappingNode) else []
    unknown = [key for key in keys if key not in _COMMON_KEYS]
    if not unknown:
        return
    parser = cli_parser()  # built once for every subcommand's options
    top_level = {command: sorted({option[2:].split(".", 1)[0] for option in subcommand_options(command, parser)
                                  if option.startswith("--")} - {"help"}) for command in NolaCLI.subcommands()}
    accepted = top_level[subcommand]
    for key in unknown:
        if key not in accepted:
            owners = [other for other, options in top_level.items() if other != subcommand and key in options]
            close = difflib.get_close_matches(key, accepted, n=3, cutoff=0.6)
            hint = (f"an option of nola-vision {' and '.join(owners)}, not of {subcommand}; " if owners else
                    f"did you mean {' or '.join(close)}? " if close else "")
            raise ValueError(f"config file {path}: {key} is no option of nola-vision {subcommand} ({hint}its "
                             f"options: {', '.join(accepted)})")


def _check_top_level_config(node: Any, path: str) -> None:
    """Refuse a ``-c`` file before the subcommand that sets anything but subcommand sections: the parser silently
    ignores those keys, so ``nola-vision -c run/config.yaml fit`` (a run's flat config) trained on defaults."""
    keys = [key.value for key, _ in node.value] if isinstance(node, yaml.MappingNode) else []
    stray = [str(key) for key in keys if key not in NolaCLI.subcommands() and key != "subcommand"]  # which one runs
    if stray:
        raise ValueError(
            f"config file {path} comes before the subcommand, where only {', '.join(NolaCLI.subcommands())} "
            f"sections apply: its {', '.join(stray[:5])}{' ...' if len(stray) > 5 else ''} would be ignored. Give it "
            f"after the subcommand (nola-vision fit -c {path}), or nest its settings under fit:")


# data options the CLI sets from the model's (``NolaCLI.add_arguments_to_parser``): a value given for them is dropped
LINKED_FROM = {"data.backbone": "model.backbone", "data.image_size": "model.image_size",
               "model.num_classes": "data.num_classes"}


def _refuse_linked(option: str, where: str) -> None:
    """Refuse setting a linked option (``data.image_size``): the parser drops a config file's value silently (the
    run trained at the backbone's default size) and calls a command-line one an invalid value. ``model.num_classes``,
    which the head takes from the data: refused on the command line (where the parser pointed at a
    ``data.num_classes`` that does not exist), said to be ignored in a file (one that states the data's count is
    right)."""
    source = LINKED_FROM.get(option)
    if option == "model.num_classes":
        why = (f"{option} is the data's class count (FewShotDataModule.num_classes, read from its dataset), which the "
               "head always takes")
        if not where:
            raise ValueError(f"{why}: drop it (the classes come from --data.dataset and --data.root)")
        warn_user(f"nola_vision: {where}{why}: its value is ignored")
        return
    if source is not None:
        raise ValueError(f"{where}{option} is set from {source} (the data's preprocessing follows the model): set "
                         f"{source} (--{source}) instead")


def _check_section_keys(node: Any, path: str, trainer_class: Any = Trainer) -> None:
    """Refuse a ``model:``, ``data:`` or ``trainer:`` key that is no argument of FewShotClassifier, FewShotDataModule
    or the Trainer, or an adapter's ``init_args`` key that is none of its config class, naming the file and the close
    ones: the parser's message names neither, nor which of several ``-c`` files holds it, under ~90 lines of usage;
    and a linked data option (``LINKED_FROM``)."""
    for key, value in node.value if isinstance(node, yaml.MappingNode) else []:
        if isinstance(key, yaml.ScalarNode):
            _check_section(key.value, value, path, trainer_class)


def _check_section(section: str, node: Any, path: str, trainer_class: Any = Trainer) -> None:
    """``_check_section_keys`` for one section (``model``, ``data``, ``trainer``; others are left to the parser) of
    config file ``path``: a mapping, or a group file it names."""
    cls = {"model": FewShotClassifier, "data": FewShotDataModule, "trainer": trainer_class}.get(section)
    if cls is None:
        return
    if isinstance(node, yaml.ScalarNode):  # a group file (data: data.yaml), read from this file's folder
        path, node = _group_file_node(str(node.value), path)
    if not isinstance(node, yaml.MappingNode):
        return
    label = path if path.startswith("the value of") else f"config file {path}"
    parameters = inspect.signature(cls).parameters
    for option, option_value in _init_args_too(node):
        if not isinstance(option, yaml.ScalarNode):
            continue
        _refuse_linked(f"{section}.{option.value}", f"{label}: ")
        _refuse_unknown_key(cls, parameters, f"{section}.", option.value, label)
        if section == "model" and option.value == "adapter":
            _check_adapter_init_args(option_value, label)


def _group_file_node(value: str, path: str) -> Tuple[str, Any]:
    """(the file, its YAML node) of a group file a config file names (relative to that file's folder, as the parser
    reads it); (``path``, None) where ``value`` names no file."""
    file = Path(path).parent / os.path.expanduser(value)
    try:
        if not file.is_file():
            return path, None
        with open(file, errors="replace") as stream:
            return str(file), _check_yaml(stream, f"config file {file}")
    except OSError:
        return path, None


def _init_args_too(node: Any) -> List[Tuple[Any, Any]]:
    """A section's key-value nodes, those under its ``init_args`` (``class_path`` form) in their place."""
    pairs = []
    for key, value in node.value:
        if isinstance(key, yaml.ScalarNode) and key.value == "init_args" and isinstance(value, yaml.MappingNode):
            pairs.extend(value.value)
        elif not (isinstance(key, yaml.ScalarNode) and key.value == "class_path"):
            pairs.append((key, value))
    return pairs


def _check_adapter_init_args(node: Any, label: str) -> None:
    """Refuse an ``init_args`` key of ``model.adapter`` that its ``class_path`` config class has no field for (a
    class that cannot be imported is left to the parser, which names it)."""
    if isinstance(node, yaml.ScalarNode):  # a class by name (adapter: mypackage.MyConfig): later files' options
        _adapter_class(str(node.value))  # of a custom class are known once its module registered it
        return
    fields = dict((key.value, value) for key, value in node.value if isinstance(key, yaml.ScalarNode)) \
        if isinstance(node, yaml.MappingNode) else {}
    class_path, init_args = fields.get("class_path"), fields.get("init_args")
    cls = _adapter_class(str(class_path.value)) if isinstance(class_path, yaml.ScalarNode) else None
    if class_path is None and isinstance(init_args, yaml.MappingNode):
        _refuse_keys_of_no_adapter(init_args, label)
    if cls is None or not isinstance(init_args, yaml.MappingNode):
        return
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return
    for option, _ in init_args.value:
        if isinstance(option, yaml.ScalarNode):
            _refuse_unknown_key(cls, parameters, "model.adapter.init_args.", option.value, label)


def _adapter_class(class_path: str) -> Any:
    """The class ``class_path`` names (``NOLAConfig``, or ``mypackage.MyConfig`` imported as the parser will, which
    registers a custom method); None where it names none (the parser names what fails to import)."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module or "nola_vision"), name)
    except Exception:
        return None


def _refuse_keys_of_no_adapter(init_args: Any, label: str) -> None:
    """Refuse an ``init_args`` key, given without a ``class_path`` (for the class set before), that no registered
    adapter config class takes: a typo, which the parser reported as a dump of the adapter Union's subtypes."""
    accepted = sorted({name for method in METHODS.values()
                       for name in inspect.signature(method.config_cls).parameters if name != "self"})
    for option, _ in init_args.value:
        if isinstance(option, yaml.ScalarNode) and option.value not in accepted:
            close = difflib.get_close_matches(option.value, accepted, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(f'model.adapter.init_args.{c}' for c in close)}? " if close else ""
            raise ValueError(f"{label}: model.adapter.init_args.{option.value} is an option of no adapter config "
                             f"class ({hint}nola-vision fit --help lists each class's options)")


def _refuse_unknown_key(cls: Any, parameters: Mapping[str, inspect.Parameter], prefix: str, option: str,
                        label: str) -> None:
    """Refuse ``option``, a key under ``prefix`` of what ``label`` names (``config file <path>``), if ``cls`` (whose
    signature has ``parameters``) takes no such argument."""
    if option in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    # not the linked ones, which are refused when set (``_refuse_linked``)
    accepted = [name for name in parameters if name != "self" and f"{prefix}{name}" not in LINKED_FROM]
    close = difflib.get_close_matches(option, accepted, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(f'{prefix}{c}' for c in close)}? " if close else ""
    listed = f"its options: {', '.join(accepted)}" if len(accepted) <= 30 else "nola-vision fit --help lists them"
    owner = getattr(cls, "__name__", cls)  # a trainer_class may be any callable (a functools.partial)
    raise ValueError(f"{label}: {prefix}{option} is no option of {owner} ({hint}{listed})")


def _check_yaml(text: Any, source: str, syntax: bool = True) -> Any:
    """The composed YAML node of ``text`` (None when it holds no document), or a ValueError naming ``source``."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)  # the structure only: nothing is constructed
    except RecursionError:
        raise ValueError(f"{source} nests too deeply to be a config; flatten it") from None
    except yaml.YAMLError as err:
        if syntax:
            raise ValueError(f"{source} is not valid YAML: {err}") from None
        return None
    _refuse_repeated_keys(node, source)
    _refuse_alias_expansion(node, source)
    return node


MAX_CONFIG_NODES = 100_000  # values a config may expand to through its aliases; a real one holds a few hundred


def _refuse_alias_expansion(node: Any, source: str) -> None:
    """Refuse a config whose aliases make a value hold itself (``a: &a [*a]``: the parser recursed until it failed,
    with thousands of lines of traceback) or expand to more than ``MAX_CONFIG_NODES`` values (a few lines of nested
    aliases, "billion laughs", kept the parser building for ever)."""
    sizes: Dict[int, int] = {}
    entered: Set[int] = set()
    pending = [(node, False)] if node is not None else []
    while pending:
        current, children_done = pending.pop()
        children = ([part for pair in current.value for part in pair] if isinstance(current, yaml.MappingNode)
                    else list(current.value) if isinstance(current, yaml.SequenceNode) else [])
        if children_done:
            sizes[id(current)] = 1 + sum(sizes[id(child)] for child in children)
            if sizes[id(current)] > MAX_CONFIG_NODES:
                raise ValueError(f"{source}: its aliases (*name) expand it to more than {MAX_CONFIG_NODES:,} values, "
                                 "which no config holds: write the values out, or alias fewer times")
            continue
        if id(current) in sizes:  # another alias of a node already counted
            continue
        if id(current) in entered:  # reached again inside itself
            raise ValueError(f"{source}: an alias (*name) refers to a value that holds it, so the config would "
                             "contain itself without end: alias a finished value only")
        entered.add(id(current))
        pending.append((current, True))
        pending.extend((child, False) for child in children)


def _refuse_repeated_keys(node: Any, source: str) -> None:
    """Refuse a mapping that sets a key twice: YAML loaders keep the last value, dropping the first without a word
    (a second ``model:`` section replaced the first's settings)."""
    pending, walked = [node], set()
    loader = yaml.SafeLoader("")  # builds each scalar key as the config's loader does (1 and '1' differ; ~ is null)
    while pending:
        node = pending.pop()
        if id(node) in walked:  # an alias repeats its anchor's node (one may even hold itself)
            continue
        walked.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: Dict[Any, Any] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    try:
                        built = loader.construct_object(key)
                    except yaml.YAMLError:  # left to the parser, which names it
                        built = (key.tag, key.value)
                    if built in seen:
                        lines = f"{seen[built].start_mark.line + 1} and {key.start_mark.line + 1}"
                        raise ValueError(f"{source} sets {key.value!r} twice (lines {lines}): YAML keeps only the "
                                         "last, so the first would be dropped without a word. Keep one")
                    seen[built] = key
                pending.append(value)
        elif isinstance(node, yaml.SequenceNode):
            pending.extend(node.value)


def keyboard_interrupt_of(stop: BaseException) -> Optional[KeyboardInterrupt]:
    """The Ctrl-C (SIGINT) behind ``stop``: itself, or the KeyboardInterrupt that Lightning's ``SystemExit(1)`` was
    raised from (a trainer exits 1 on Ctrl-C, the code of a failed run); None for any other exit."""
    interrupt = stop if isinstance(stop, KeyboardInterrupt) else stop.__context__
    return interrupt if isinstance(interrupt, KeyboardInterrupt) else None


def error_message(err: BaseException) -> str:
    """The error's own message, without the traceback a DataLoader worker wraps a re-raised error in; a bare system
    error for want of room (its file named when known) says so and what frees it, as a full disk gives no hint."""
    text = str(err).strip()
    if "Original Traceback" in text:  # torch's ExceptionWrapper: "...\n<module>.<Class>: <message>" ends it
        text = text.splitlines()[-1].split(": ", 1)[-1]
    hint = out_of_room_hint(err) if isinstance(err, OSError) else None
    if hint and err.strerror == os.strerror(err.errno):  # only a bare one: an explained error (a save's) says it
        text += f" ({hint})"
    return text


def check_result_path(path: str, option: str = "--result_file", example: str = "result.json") -> None:
    """Refuse an output file that cannot be written (a directory, ``check_writable_file``'s cases) before the run,
    not after it."""
    if os.path.isdir(path):
        raise ValueError(f"{option} {path} is a directory: pass a file path, e.g. {Path(path) / example}")
    check_writable_file(path, f"{option} {path}")


def check_checkpoint_file(path: Optional[str]) -> None:
    """Refuse a ``--ckpt_path`` that is missing, a directory, or not a checkpoint (another file, or one cut short by a
    full disk or an interrupted copy), before anything is built: torch's own errors name neither."""
    if path is None or path in ("best", "hpc", "registry"):  # Lightning's own lookups
        return
    file = Path(path)
    require_readable_file(file, "--ckpt_path")
    if not file.is_file():
        what = "a directory" if file.is_dir() else "not a regular file" if file.exists() else "missing"
        raise FileNotFoundError(f"--ckpt_path {path} is {what}: pass a "
                                "checkpoint file of a fit run (<log_dir>/checkpoints/*.ckpt), or --ckpt_path last")
    require_whole_checkpoint(file, "--ckpt_path")
    try:  # as Lightning loads it (only tensors and plain values); a zip archive mapped, its tensors not read twice
        loaded = load_checkpoint(file)
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(f"--ckpt_path {err}") from err
    except (RuntimeError, EOFError, ValueError) as err:  # a zip archive of other files (.npz), a damaged record
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"--ckpt_path {path} is not a checkpoint written by fit (torch cannot read it: {first}). "
                         "Pass a checkpoint of a fit run (<log_dir>/checkpoints/*.ckpt), or --ckpt_path last") from err
    missing = [key for key in ("pytorch-lightning_version", "state_dict")
               if not isinstance(loaded, dict) or key not in loaded]
    if missing:
        bare = isinstance(loaded, dict) and bool(loaded) and all(isinstance(v, torch.Tensor) for v in loaded.values())
        what = " (a bare state dict, as torch.save(model.state_dict()) writes)" if bare else ""
        raise ValueError(f"--ckpt_path {path} is a torch file, but not a checkpoint written by fit: it lacks "
                         f"{' and '.join(missing)}{what}. "
                         "Pass a checkpoint of a fit run (<log_dir>/checkpoints/*.ckpt), or --ckpt_path last")


# The checkpoint names Lightning (and ``parse_arguments``) resolve themselves: no file path
_CHECKPOINT_NAMES = ("last", "best", "hpc", "registry")


def _absolute_paths(config: Any) -> None:
    """Make the relative folders and files a run reads and writes absolute (from the working directory, where they are
    read): ``--data.root``, the split manifests, ``--model.pretrained_file`` and ``adapter_dir``, ``--result_file``,
    ``--predictions_file``, ``--ckpt_path`` (a file, not ``last``/``best``) and ``--trainer.default_root_dir`` (the
    working directory itself when unset). The run's
    config.yaml, checkpoints and results then name them, and ``test -c <run>/config.yaml`` run from another directory
    reads the run's images and weights and finds its ``--ckpt_path last``/``best``, not those of another folder of
    that relative name. A URL is left as it is."""
    data = config.get("data")
    for key in ("root", "split_file", "val_split_file", "split_dir"):
        path = data.get(key) if data is not None else None
        if isinstance(path, str) and path and "://" not in path:
            data[key] = _from_working_directory(path)  # "~/data" too: no shell expands it in a config file
    model = config.get("model")
    for key in ("pretrained_file", "adapter_dir"):
        path = model.get(key) if model is not None else None
        if isinstance(path, str) and path and "://" not in path and path != OFFLINE_PRETRAINED_FILE:
            model[key] = _from_working_directory(path)
    for key in ("result_file", "predictions_file", "ckpt_path"):
        path = config.get(key)
        if isinstance(path, str) and path and "://" not in path and path not in _CHECKPOINT_NAMES:
            config[key] = _from_working_directory(path)
    trainer = config.get("trainer")
    if trainer is not None:
        root = trainer.get("default_root_dir")
        if root is None or isinstance(root, str) and root and "://" not in root:
            trainer.default_root_dir = _from_working_directory(root) if root else os.getcwd()
        for init_args in _checkpoint_callback_args(trainer):
            if "://" not in init_args.dirpath:
                init_args.dirpath = _from_working_directory(init_args.dirpath)


def _from_working_directory(path: Any) -> str:
    """``path`` (``~`` expanded) made absolute from the working directory, naming what the system opens there.

    ``os.path.abspath`` drops ``link/..`` as text, naming the folder beside the link instead of the link target's
    parent, which the system opens (and a folder of that name there was read silently): the part up to a path's last
    ``..`` is resolved as the system resolves it, the rest kept as given."""
    path = os.path.join(os.getcwd(), expand_root(os.fspath(path)))
    parts = Path(path).parts
    if ".." not in parts:
        return os.path.normpath(path)
    last = len(parts) - parts[::-1].index("..")
    return os.path.normpath(os.path.join(os.path.realpath(os.path.join(*parts[:last])), *parts[last:]))


def _check_seed(seed: object) -> None:
    """Refuse a ``seed_everything`` numpy cannot take, before anything runs (Lightning's error names no option)."""
    largest = 2**32 - 1
    if type(seed) is int and not 0 <= seed <= largest:
        raise ValueError(f"--seed_everything must be true, false or an integer from 0 to {largest} (the seeds numpy "
                         f"takes), got {seed}")


def _refuse_files_in_the_way(trainer: Any) -> None:
    """Refuse, before anything trains, a folder the run writes into that cannot be one (it, or a folder above it, is a
    file): the run's root, a ``ModelCheckpoint``'s ``dirpath`` (else the first epoch's checkpoint failed on a bare
    ``[Errno 17]`` after that epoch trained) and a logger's ``save_dir``."""
    places = [("--trainer.default_root_dir", trainer.get("default_root_dir"))]
    places += [("--trainer.callbacks ModelCheckpoint's dirpath", args.dirpath)
               for args in _checkpoint_callback_args(trainer)]
    places += [(f"--trainer.logger {class_path}'s save_dir", save_dir)
               for class_path, save_dir in _logger_save_dirs(trainer)]
    for option, path in places:
        if not isinstance(path, (str, os.PathLike)) or not str(path) or "://" in str(path):
            continue
        blocking = file_in_the_way(_from_working_directory(str(path)))
        if blocking is not None:
            raise ValueError(f"{option} {path} cannot be a folder: {blocking} is a file. Choose a directory (the file "
                             "was left untouched, and nothing trained)")


def _logger_save_dirs(trainer: Any) -> List[Tuple[str, Any]]:
    """(class path, ``save_dir``) of each configured logger that names one."""
    loggers = trainer.get("logger")
    found = []
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        init_args = getattr(logger, "init_args", None)
        save_dir = init_args.get("save_dir") if init_args is not None else None
        if isinstance(save_dir, (str, os.PathLike)) and str(save_dir) and "://" not in str(save_dir):
            found.append((getattr(logger, "class_path", "logger"), save_dir))
    return found


def logger_checkpoint_folders(config: Any) -> List[Path]:
    """The ``<name>/version_N/checkpoints`` folders under the ``save_dir`` of the config's first logger, where
    Lightning puts a run's checkpoints when that logger names its own folder (``default_root_dir`` holds none)."""
    trainer = config.get("trainer")
    save_dirs = _logger_save_dirs(trainer) if trainer is not None else []
    if not save_dirs:
        return []
    save_dir = Path(expand_root(str(save_dirs[0][1]))).absolute()  # an empty logger name drops the <name> level
    return sorted({*save_dir.glob("*/*/checkpoints"), *save_dir.glob("*/checkpoints")})


def _checkpoint_callback_args(trainer: Any) -> List[Any]:
    """The init args of the configured ``ModelCheckpoint`` callbacks (subclasses too) that name a ``dirpath``."""
    found = []
    for callback in trainer.get("callbacks") or []:
        class_path, init_args = getattr(callback, "class_path", None), getattr(callback, "init_args", None)
        if not isinstance(class_path, str) or init_args is None or not isinstance(init_args.get("dirpath"), str):
            continue
        with contextlib.suppress(ImportError, AttributeError, ValueError):
            cls = _class_of(class_path if "." in class_path else f"lightning.pytorch.callbacks.{class_path}")
            if isinstance(cls, type) and issubclass(cls, ModelCheckpoint) and init_args.dirpath:
                found.append(init_args)
    return found


def checkpoint_dirpaths(config: Any) -> List[Path]:
    """The folders the config's ``ModelCheckpoint`` callbacks save into (their ``dirpath``): Lightning keeps their
    checkpoints, ``last.ckpt`` too, there instead of in the run's folder."""
    trainer = config.get("trainer")
    return [Path(args.dirpath) for args in _checkpoint_callback_args(trainer)] if trainer is not None else []


def find_last_checkpoint(root: os.PathLike, runs_below: bool = True,
                         dirpaths: Sequence[os.PathLike] = ()) -> Optional[str]:
    """The newest ``last.ckpt`` (or ``last-v1.ckpt``, ...) of any run under ``root`` (each run logs to its own
    ``<name>/version_N``, where Lightning's own ``ckpt_path="last"`` lookup does not look) or in ``dirpaths`` (the
    run's checkpoint callbacks' own folders), or None; with ``runs_below`` False, only ``root``'s own run's (a
    logger-less run's folder holds the others' too)."""
    found = (p for folder in _checkpoint_folders(root, runs_below, dirpaths) for p in folder.glob("last*.ckpt"))
    newest = newest_checkpoint(found, _is_last_checkpoint)
    return str(newest) if newest is not None else None


def _checkpoint_folders(root: os.PathLike, runs_below: bool, dirpaths: Sequence[os.PathLike]) -> List[Path]:
    """Where the runs under ``root`` keep their checkpoints: its own ``checkpoints``, with ``runs_below`` each
    ``<name>/version_N/checkpoints``, and the run's checkpoint callbacks' own folders (``dirpaths``)."""
    below = Path(root).glob("*/*/checkpoints") if runs_below else ()
    return [Path(root) / "checkpoints", *below, *map(Path, dirpaths)]


def _is_last_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a ``last.ckpt`` Lightning writes (``last-v1.ckpt`` beside an older one)."""
    return re.fullmatch(r"last(-v\d+)?", path.stem) is not None


def find_best_checkpoint(root: os.PathLike, runs_below: bool = True, dirpaths: Sequence[os.PathLike] = ()) -> str:
    """The best checkpoint of the newest run under ``root`` (or in ``dirpaths``) by the metric its ``ModelCheckpoint``
    monitored, as the run's ``last.ckpt`` records it: Lightning's own ``ckpt_path="best"`` asks the trainer's
    callback, which knows nothing in a new process."""
    last = find_last_checkpoint(root, runs_below, dirpaths)
    if last is None:
        raise FileNotFoundError(f"--ckpt_path best: no run under {root} (no last.ckpt, nor in its <name>/version_N "
                                "folders). Pass --trainer.default_root_dir of the run, or a checkpoint path")
    states = load_checkpoint(last).get("callbacks") or {}  # safely: the run folder may be someone else's
    monitored = {state["best_model_path"]: state["monitor"] for state in states.values()
                 if isinstance(state, dict) and state.get("monitor") and state.get("best_model_path")}
    unscored = sorted({state["monitor"] for state in states.values()
                       if isinstance(state, dict) and state.get("monitor") and not state.get("best_model_path")})
    if len(monitored) != 1:
        why = ("its ModelCheckpoint callbacks monitored several metrics" if monitored else
               f"its ModelCheckpoint monitored {', '.join(unscored)}, which no validation during training scored, "
               "so it saved no best (check --trainer.check_val_every_n_epoch and --trainer.val_check_interval)"
               if unscored else
               "no ModelCheckpoint of it monitored a metric (fit with --trainer.callbacks+=ModelCheckpoint "
               "--trainer.callbacks.monitor=val/acc --trainer.callbacks.mode=max)")
        raise ValueError(f"--ckpt_path best: the run of {last} has no single best checkpoint: {why}. Pass the "
                         f"checkpoint's path ({Path(last).parent}/*.ckpt), or --ckpt_path last")
    path, metric = next(iter(monitored.items()))
    for candidate in (Path(path), Path(last).parent / Path(path).name):  # recorded relative to the fit's folder
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(f"--ckpt_path best: the run's best checkpoint by {metric}, {path}, is gone (recorded in "
                            f"{last}): pass another checkpoint of the run, or --ckpt_path last")


def _check_precision_package(precision: Any) -> None:
    """Refuse ``transformer-engine`` precisions without NVIDIA's package, naming it: Lightning's ModuleNotFoundError
    came with its whole traceback (exit 1), where other bad precisions exit 2 with the choices."""
    if isinstance(precision, str) and precision.startswith("transformer-engine") and \
            importlib.util.find_spec("transformer_engine") is None:
        raise ValueError(f"--trainer.precision {precision} needs NVIDIA's Transformer Engine (pip install "
                         "'transformer_engine[pytorch]', on a GPU with FP8), which is not installed: choose bf16-mixed "
                         "or 16-mixed, or install it")


def explicit_model_args(argv: Sequence[Any], fields: Sequence[str] = ()) -> set:
    """Top-level ``model`` fields set on the command line (``--model.lr 0.1``, ``--model.adapter.init_args.rank=2``),
    an abbreviation argparse takes (``--model.label 0.3``) named as the one field of ``fields`` it begins."""
    typed = {str(a)[len("--model."):].split("=", 1)[0].split(".", 1)[0] for a in argv if str(a).startswith("--model.")}
    return {_field_named(name, fields) or name for name in typed}


def _field_named(key: str, fields: Sequence[str]) -> Optional[str]:
    """The field of ``fields`` that ``key`` names: itself, or the one field it begins (argparse's abbreviation of an
    option, ``label`` for ``label_smoothing``); None where it names none, or begins several."""
    if key in fields:
        return key
    matches = [field for field in fields if field.startswith(key)]
    return matches[0] if len(matches) == 1 else None


# Hyper-parameters that say where a file is, not what it holds: the command line may point a checkpoint at its frozen
# weights' new place (a moved project, another machine), since loading compares the weights with the checkpoint's
# fingerprint of them and refuses other ones.
_LOCATION_HPARAMS = ("pretrained_file",)
# Where and at how many bits the adapter is exported: given on the command line, they replace the checkpoint's (a run
# whose export failed on a full disk is finished by resuming it with another adapter_dir).
_OUTPUT_HPARAMS = ("adapter_dir", "adapter_bits")


def _moved_location(key: str, given: Dict[str, Any], used: Dict[str, Any], explicit: set) -> bool:
    """Whether the given ``key`` (a file location) replaces the checkpoint's: a different one for a checkpoint whose
    run loaded weights (``pretrained``), given on the command line, or in a config file where the recorded file is
    gone (a moved project's edited config.yaml); a config that merely differs keeps the checkpoint's."""
    value, recorded = given.get(key), used.get(key)
    if not value or value == recorded or not used.get("pretrained"):
        return False
    return key in explicit or not (isinstance(recorded, str) and os.path.exists(recorded))


def _full_fine_tuning(hparams: Dict[str, Any]) -> bool:
    """Whether the checkpoint's run trained every weight (it then holds them all, and no frozen fingerprint)."""
    with contextlib.suppress(ValueError, TypeError):
        return bool(resolve_adapter(hparams.get("adapter")).train_backbone)
    return False


def check_checkpoint_overrides(given: Any, used: Any, explicit: set) -> Dict[str, Any]:
    """With a checkpoint, LightningCLI rebuilds the model from the checkpoint's hyper-parameters: refuse command-line
    ``--model.*`` values it would silently replace, warn about config-file values it replaces. Returns the given
    file locations (``_LOCATION_HPARAMS``, ``_moved_location``) and export settings (``_OUTPUT_HPARAMS``) to build
    with instead of the checkpoint's."""
    given, used = given.as_dict(), used.as_dict()
    changed = changed_hparams(used, given, given.keys() & used.keys())  # as a resume through Trainer.fit compares
    moved = {k: changed.pop(k)[0] for k in _LOCATION_HPARAMS
             if k in changed and _moved_location(k, given, used, explicit)}
    outputs = {k: changed.pop(k)[0] for k in _OUTPUT_HPARAMS if k in changed and k in explicit}
    for key, value in outputs.items():
        rank_zero_info(f"nola_vision: --ckpt_path: --model.{key} {value!r} replaces the checkpoint's {used[key]!r} "
                       "(how the adapter is exported: what the run trains is unchanged)")
    for key, value in moved.items():
        checked = ("a full fine-tuning checkpoint holds every weight: the file only builds the model"
                   if _full_fine_tuning(used)
                   else "the checkpoint's fingerprint of the frozen weights checks what it holds")
        source = f"--model.{key}" if key in explicit else f"the config's model.{key}"
        rank_zero_info(f"nola_vision: --ckpt_path: {source} {value} replaces the checkpoint's {used[key]}, "
                       f"{'which is gone' if key not in explicit else 'as given'} ({checked})")
    refused = {k: v for k, v in changed.items() if k in explicit}
    if refused:
        raise ValueError("with --ckpt_path the model is rebuilt from the checkpoint's hyper-parameters, which differ "
                         "from " + "; ".join(f"--model.{k} {a!r} (checkpoint: {b!r})" for k, (a, b) in refused.items())
                         + ". Drop those arguments, or train a new run with them.")
    if changed:
        rank_zero_warn("nola_vision: --ckpt_path: the checkpoint's model hyper-parameters replace the config's: "
                       + "; ".join(f"model.{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    return {**moved, **outputs}


def _class_of(class_path: str) -> Any:
    """The class ``class_path`` names (``nola_vision.LoRAConfig``, or its defining module's path)."""
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _class_defaults(class_path: str) -> Dict[str, Any]:
    """The keyword defaults of the class ``class_path`` names (``nola_vision.LoRAConfig``)."""
    cls = _class_of(class_path)
    if dataclasses.is_dataclass(cls):  # the adapter configs: a default_factory's signature default is "<factory>"
        return {field.name: field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
                for field in dataclasses.fields(cls) if field.init}
    return {key: parameter.default for key, parameter in inspect.signature(cls).parameters.items()}


def _same_value(a: Any, b: Any) -> bool:
    """Equal settings, a list and a tuple of the same items included (a config file gives lists)."""
    return (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b)


def carried_adapter_settings(parser: Any, argv: List[str], subcommand: Optional[str], adapter: Any
                             ) -> Dict[str, Any]:
    """The settings that ``--model.adapter <Class>`` on the command line, or a later ``-c`` file naming another
    adapter class, took over from an earlier class's config (jsonargparse keeps every init arg the new class
    accepts): ``{name: (value, the new class's default)}`` for those that differ from that default and that neither
    the command line nor that file gives itself."""
    switch = _last_adapter_switch(argv)
    if switch is None or not hasattr(adapter, "init_args"):
        return {}
    at, given = switch
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            before = parser.parse_args(argv[:at])
    except SystemExit:  # what comes before the switch does not parse alone: nothing to compare with
        return {}
    previous = (before.get(subcommand) if subcommand else before).get("model.adapter")
    if not hasattr(previous, "init_args") or _class_of(previous.class_path) is _class_of(adapter.class_path):
        return {}
    given |= {arg[len("--model.adapter."):].split("=", 1)[0].removeprefix("init_args.").split(".", 1)[0]
              for arg in argv if arg.startswith("--model.adapter.")}
    defaults = _class_defaults(adapter.class_path)
    earlier = previous.init_args.as_dict()
    return {name: (kept, defaults.get(name)) for name, kept in adapter.init_args.as_dict().items()
            if name not in given and name in earlier and _same_value(earlier[name], kept)
            and not _same_value(defaults.get(name, inspect.Parameter.empty), kept)}


# Where the value of each option that can set the adapter class holds model.adapter.
_ADAPTER_KEYS: Dict[str, Tuple[str, ...]] = {"--model.adapter": (), "--model": ("adapter",),
                                             "-c": ("model", "adapter"), "--config": ("model", "adapter")}


def _last_adapter_switch(argv: List[str]) -> Optional[Tuple[int, set]]:
    """(position, settings it gives) of the last argument that sets the adapter class: ``--model.adapter``, or a
    ``--model`` or ``-c`` value (a file or inline YAML) whose ``model.adapter`` names a class, by ``class_path`` or
    by name; None without one."""
    last = None
    for i, arg in enumerate(argv):
        option, _, inline = arg.partition("=")
        if option not in _ADAPTER_KEYS:
            continue
        value = inline if inline else (argv[i + 1] if i + 1 < len(argv) else "")
        node = _nested_value(value, _ADAPTER_KEYS[option])
        switches = isinstance(node, str) or isinstance(node, dict) and "class_path" in node
        if option != "--model.adapter" and not switches:
            continue  # a value that does not switch the class
        given = set(node) | set(node.get("init_args") or {}) if isinstance(node, dict) else set()
        last = (i, given - {"class_path", "init_args"})
    return last


def _nested_value(value: str, keys: Tuple[str, ...]) -> Any:
    """The value at ``keys`` in an option's value as the parser reads it (a file or inline YAML), following a nested
    value that names a file (``model: model.yaml``, relative to the file naming it); None where it sets none."""
    node, folder = value, Path()
    for key in (*keys, None):
        if isinstance(node, str):  # a file's name (relative to the file naming it), or inline YAML
            path = _file_named(folder / node)
            node, folder = (_yaml_value(str(path)), path.parent) if path else (_yaml_value(node), folder)
        if key is None:
            return node
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]


def _file_named(path: Path) -> Optional[Path]:
    """``path`` where it names a file, else None (a long inline value is no file name)."""
    try:
        return path if path.is_file() else None
    except (OSError, ValueError):
        return None


def warn_carried_adapter_settings(parser: Any, argv: List[str], subcommand: Optional[str], adapter: Any) -> None:
    """Warn that ``--model.adapter LoRAConfig`` over a config file's NOLA adapter kept its targets (and any other
    setting both classes take): the run is not the new class with its defaults, as the option reads."""
    carried = carried_adapter_settings(parser, argv, subcommand, adapter)
    if carried:
        name = adapter.class_path.rpartition(".")[2]
        at = _last_adapter_switch(argv)[0]
        option, _, inline = argv[at].partition("=")
        switch = (f"--model.adapter {name}" if option == "--model.adapter" else
                  f"{option} {inline or argv[at + 1]} (its model.adapter {name})")
        rank_zero_warn(f"nola_vision: {switch} kept the earlier adapter's "
                       + ", ".join(f"{key}={value!r} ({name}'s default: {default!r})"
                                   for key, (value, default) in carried.items())
                       + f" (a new class keeps the settings it accepts). Give them on the command line "
                       f"(--model.adapter.{next(iter(carried))} ...) to choose others")


# MisconfigurationException: Lightning's own "this trainer setting is wrong" (a callback's invalid arguments)
CONFIG_ERRORS: tuple = (ValueError, FileNotFoundError, MisconfigurationException)
# a run that started and failed: exit code 1
RUN_ERRORS: tuple = (NonFiniteLossError, CorruptImageError, OutputKeptError)


def run_lightning_cli(args: Optional[List[str]] = None, run: bool = True) -> NolaCLI:
    """Build (and with ``run``, execute) the Lightning CLI; ``args`` None reads ``sys.argv``. A run leaves torch's
    process-wide algorithm settings as it found them (``--trainer.deterministic`` and ``--trainer.benchmark`` set
    them for the run); built without running, the caller's trainer needs them, so they stay."""
    with warnings.catch_warnings(), (_torch_flags_kept() if run else contextlib.nullcontext()):
        # FewShotClassifier checks and converts batches in its transfer hooks by design, whatever the data module:
        # Lightning's note of each, on every run, reads as a fault and asks nothing of the user
        warnings.filterwarnings("ignore", message=r"You have overridden `on_(before|after)_batch_transfer` in "
                                                  r"`LightningModule` but have passed in a `LightningDataModule`")
        # in a context of its own: jsonargparse keeps its last parser in a context variable it never resets, which
        # held the run (its trainer, model with backbone, data module with datasets) alive after a notebook's call
        return contextvars.copy_context().run(NolaCLI, FewShotClassifier, FewShotDataModule, args=args, run=run,
                                              parser_kwargs={"prog": PROG}, **CLI_SETTINGS)


@contextlib.contextmanager
def _torch_flags_kept() -> Iterator[None]:
    """Put back, on leaving, the settings Lightning's trainer changes for the whole process: a notebook's later code
    (and its next run) ran with deterministic algorithms after one ``--trainer.deterministic true`` run, and raised
    where an operation has no deterministic implementation."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


# The command's name in usage lines and tips, however it was started (``python -m nola_vision.cli`` named "cli.py").
PROG = "nola-vision"
CLI_SETTINGS: Dict[str, Any] = {"save_config_callback": RunConfigSaver, "save_config_kwargs": {"overwrite": True},
                                "auto_configure_optimizers": False}


class _Built(Exception):
    """Carries the parser out of LightningCLI's constructor, before it parses anything."""


def cli_parser() -> Any:
    """The parser of ``nola-vision fit|validate|test|predict``, built but never run: it checks arguments (``tune``
    checks its grid with it) without instantiating a model, a dataset or a trainer. Unlike the CLI's it takes only
    whole option names (``--data.shot`` is not ``--data.shots``), so a key it accepts is the option it names."""

    class ParserOnly(NolaCLI):
        def parse_arguments(self, parser: Any, args: Any) -> None:
            raise _Built(parser)

    exact = {"allow_abbrev": False}
    try:
        ParserOnly(FewShotClassifier, FewShotDataModule, args=[], parser_kwargs={**exact, "prog": PROG, **{
            subcommand: exact for subcommand in NolaCLI.subcommands()}}, **CLI_SETTINGS)
    except _Built as built:
        return built.args[0]
    raise RuntimeError("LightningCLI built no parser")  # its constructor always parses: never reached


@functools.lru_cache(maxsize=1)
def fit_options() -> frozenset:
    """Every option name of ``nola-vision fit`` (``--model.adapter``, ``--data.shots``, ...), from its parser."""
    return subcommand_options("fit")


def subcommand_options(subcommand: str, parser: Any = None) -> frozenset:
    """Every option name of ``nola-vision <subcommand>`` (fit, validate, test, predict), from its parser (``parser``:
    one ``cli_parser()`` built already)."""
    parser = cli_parser() if parser is None else parser
    return frozenset(parser._subcommands_action._name_parser_map[subcommand]._option_string_actions)


# What settings_file_options falls back to where jsonargparse's internals differ from those it reads: the groups,
# the config file and the class-typed options of fit.
_SETTINGS_FILE_OPTIONS = {"config": "", "data": "data", "model": "model", "trainer": "trainer",
                          **{option: option for option in ("model.adapter", "trainer.accelerator", "trainer.strategy",
                                                            "trainer.logger", "trainer.callbacks", "trainer.profiler",
                                                            "trainer.plugins")}}


@functools.lru_cache(maxsize=1)
def settings_file_options() -> Dict[str, str]:
    """The ``fit`` options whose string value jsonargparse loads as a settings file, relative to the folder of the
    file that gives it: ``--config``, the groups (``data``, ``model``, ``trainer``) and class-typed options
    (``model.adapter``, ``trainer.callbacks``); each with the option the loaded file's keys belong to.

    Read from fit's parser through jsonargparse internals; where a jsonargparse version lacks them, a fixed table of
    the same options.
    """
    try:
        from jsonargparse import ActionConfigFile
        from jsonargparse._actions import _ActionConfigLoad
        from jsonargparse._typehints import ActionTypeHint, is_subclass_container_typehint

        options: Dict[str, str] = {}
        for action in cli_parser()._subcommands_action._name_parser_map["fit"]._actions:
            typehint = getattr(action, "_typehint", None)
            if isinstance(action, ActionConfigFile):
                options[action.dest] = action.dest.rpartition(".")[0]  # a config file sets the options beside it
            elif isinstance(action, _ActionConfigLoad) or typehint is not None and (
                    ActionTypeHint.is_subclass_typehint(typehint, all_subtypes=False)
                    or is_subclass_container_typehint(typehint)):
                options[action.dest] = action.dest
        return options
    except (ImportError, AttributeError, KeyError, TypeError):
        return dict(_SETTINGS_FILE_OPTIONS)


def argument_value_error(parser: Any, args: Sequence[str], parsed: Any = None) -> Optional[str]:
    """The error ``FewShotClassifier`` and ``FewShotDataModule`` would raise for the model, data and trainer arguments
    of ``fit`` ``args`` (a range or a combination the parser accepts: ``lr`` -1, ``min_lr`` above ``lr``,
    ``max_epochs`` 0, ``batch_size`` 0), found without building the model or reading data; None if they pass.
    ``args`` must parse (``argument_error``); ``parsed``: their subcommand's config, where the caller parsed them
    already."""
    if parsed is None:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            parsed = parser.parse_args(list(args))[args[0]]
    model = parsed.model.as_dict()
    model["num_classes"] = model.get("num_classes") or 2  # linked from the data when the run builds it
    try:
        config = check_classifier_arguments(model)
        check_datamodule_arguments(parsed.data.as_dict())
        if args[0] == "fit":
            check_training_length(parsed.trainer)
        _check_adapter_fits(model, config)
    except (ValueError, TypeError) as err:
        return str(err)
    return None


def _check_adapter_fits(model: Dict[str, Any], config: Any) -> None:
    """The backbone's name, and the adapter's targets on the backbone built on the meta device (no weights, no
    memory, a fraction of a second): a protocol row or a tune grid value naming an unknown model or a target that
    matches no layer was found only when its run built the model, after other runs had taken hours."""
    check_backbone_name(model["backbone"])
    if method_of(config).layer_cls is None:
        return
    try:
        with torch.device("meta"):
            backbone = build_backbone(model["backbone"], model["num_classes"], pretrained=False,
                                      image_size=model["image_size"], **(model["backbone_kwargs"] or {}))
    except (ValueError, TypeError):
        raise
    except Exception:  # noqa: BLE001 (a model that cannot be built on the meta device: its run builds it)
        return
    if adapter_state(backbone) is None:  # a *_nola name: the run refuses it, saying why
        plan_injection(backbone, config)


def argument_error(parser: Any, args: Sequence[str]) -> Optional[str]:
    """The error ``parser`` reports for ``args`` (what the CLI would print before exiting), or None when they parse."""
    try:
        check_config_sources(list(args))
    except ValueError as err:
        return str(err)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(list(args))
    except SystemExit as stop:
        if isinstance(stop.code, int) and stop.code > 128:  # a stop's signal (Ctrl-C: 130) while it parsed
            raise
        text = printed.getvalue()
        return text[text.rfind("error:"):].strip() if "error:" in text else text.strip() or "not accepted"
    return None
