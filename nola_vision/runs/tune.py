"""``nola-vision tune``: choose hyperparameters on validation accuracy with Optuna, then run the protocol with them.

A trial is one ``nola-vision fit`` per selection seed (``--split_seeds`` × ``--init_seeds``), each in its own
process and folder ``<out>/<name>/tune/trial-<hash>/split<S>-init<I>`` with ``--test_after_fit false``, scored by
the mean final-epoch ``val/acc``: the test split is never read while choosing. The study lives in an Optuna RDB
storage (``sqlite:///<out>/<name>/tune.db`` by default), so a killed search resumes where it stopped, and
workers on several machines can share one study through a ``postgresql://`` or ``mysql://`` URL.

Each fit starts only under its folder's claim, as in ``protocol``: a fit that another process runs there (one a killed
worker left running) is waited for, never started twice; a fit that exits non-zero never counts, even where it wrote
its result. Grid search claims grid points in the storage: a point is run by one worker only (a duplicate claim
yields to the lower trial number), finished points are never rerun, and points whose trial failed or whose worker died
(its heartbeat went stale) are retried by the next run. Trial fits and the study record the images they were made
on (``results.data_digests`` of the train split, which the validation images are drawn from; never the test split),
and a search whose data changed since is refused before any trial, as the protocol refuses such rows: their
validation accuracies would choose the values. Then the best point (ties: the first in grid order)
is run through ``protocol`` (split seeds × init seeds, final test accuracy) as the row ``<name>``.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import math
import os
import re
import signal
import statistics
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import yaml

from ..core.storage import (
    atomic_path,
    check_writable_file,
    spreadsheet_safe,
    write_json_atomic,
    write_set_atomic,
    write_text_atomic,
    writer_lock,
)
from .executors import (
    CONFIG_EXIT,
    DIVERGED_EXIT,
    Executor,
    LocalExecutor,
    Run,
    Stopped,
    add_executor_arguments,
    build_executor,
    failure,
    start_no_more,
    stop_runs_on_signals,
    stopping,
    stopping_within,
)
from .protocol import (
    REPLAY_SPLIT,
    check_output_paths,
    error_text,
    fit_argument_error,
    fit_command,
    open_row,
    refuse_abbreviated_options,
    refuse_controlled_configs,
    refuse_controlled_overrides,
    refuse_settings_from_environment,
    run_protocol,
)
from .results import (
    CONFIG_FILE,
    JOB_LOCK_FILE,
    RESULT_FILE,
    STAMP_FILE,
    adopt_result,
    check_seeds,
    claim_unfinished_run,
    claimed_elsewhere,
    config_key,
    counted,
    data_digests,
    effective_overrides,
    finished_result,
    first_line,
    image_changes,
    other_command,
    override_changes,
    parse_overrides,
    read_result,
    referenced_files,
    refuse_foreign_file,
    result_counts,
    row_folder,
    same_settings,
    stamp_claimed_run,
)

__all__ = ["CONTROLLED", "check_grid", "check_sqlite_storage", "check_tune_files_ours", "main", "parse_grid",
           "run_tune"]

BEST_YAML_MARK = "# chosen by nola-vision tune"  # how every version's best.yaml began
BEST_YAML_HEADER = f"{BEST_YAML_MARK} on validation accuracy"
CHOSEN_KEYS = ("params", "val_acc", "trial", "overrides")  # what best.json holds (and selection_seeds)
GRID_KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
# what tune sets in every fit itself, and how to control it instead
CONTROLLED = {
    "--seed_everything": "set the init seeds with tune's --init_seeds (selection) and --protocol_init_seeds",
    "--data.split_seed": "set the split seeds with tune's --split_seeds (selection) and --protocol_split_seeds",
    "--data.split_file": f"tune draws each fit's split from --split_seeds and --protocol_split_seeds; {REPLAY_SPLIT}",
    "--data.val_split_file": f"tune draws each fit's split from --split_seeds and --protocol_split_seeds; "
                             f"{REPLAY_SPLIT}",
    "--trainer.default_root_dir": "choose where runs go with tune's --out and --name",
    "--data.split_dir": "choose where runs go with tune's --out and --name",
    "--result_file": "choose where runs go with tune's --out and --name",
    "--model.adapter_dir": "every run exports its adapter into its own run folder (its result.json names it), so "
                           "that no run overwrites another's",
    "--test_after_fit": "tune selects on validation accuracy without testing, then the protocol tests",
    "--trainer.limit_test_batches": "the protocol after the search tests every run on the full test split",
    "--ckpt_path": "each run trains from its own seeds; a checkpoint given to every run would make them one run "
                   "(its weights and random state), counted as several",
}
# Fit options a search cannot choose by validation accuracy: each value trains or validates on other images. (Trial
# results also record the images of the base options only, so a changed image folder of one value went unseen.)
NOT_SEARCHED = {
    "data.dataset": "each dataset has other images and classes",
    "data.root": "each root holds other images",
    "data.shots": "each k trains on other (more or fewer) images",
    "data.val_shots": "each value validates on another draw of images",
    "data.allow_fewer": "it changes which images a short class trains and validates on",
}
Params = Dict[str, Any]
# the splits trial fits read: their validation images are drawn from the train split; the test split is never read
SELECTION_SPLITS = ("train",)


class TrialFailed(RuntimeError):
    """A trial's fit failed or gave no validation accuracy: reported, not counted. ``by_signal``: every fit ended by
    a stop's signal (Ctrl-C, SIGTERM, SIGHUP), which may reach the fits before this process."""

    def __init__(self, message: str, by_signal: bool = False) -> None:
        super().__init__(message)
        self.by_signal = by_signal


# Exit codes of a fit a stop's signal ended: the fit's own (128 + signal) or the signal's (negative).
_STOP_CODES = frozenset(code for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
                        for code in (128 + signum, -signum))
# How long a worker waits for its own stop after its fits were ended by one's signal (the terminal's Ctrl-C reaches
# the fits and this process alike, in either order).
_STOP_GRACE_S = 2.0


class TrialDiverged(RuntimeError):
    """A trial's fit diverged (``DIVERGED_EXIT``): an outcome of its values, counted as the worst score (never chosen),
    not retried."""


def parse_grid(items: Sequence[str]) -> Dict[str, List[Any]]:
    """``["model.lr=1e-3,5e-3", ...]`` as ``{"model.lr": [0.001, 0.005]}`` (numbers parsed, other values strings; a
    YAML list or mapping, ``[mlp.fc1,mlp.fc2]``, is one value)."""
    grid: Dict[str, List[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().lstrip("-")
        if sep and f"--{key}" in CONTROLLED:  # seed_everything, result_file, ...: not dotted, and tune's own
            refuse_controlled_overrides([f"--{key}", values], CONTROLLED, prog="tune")
        if not sep or not GRID_KEY.match(key) or not values.strip():
            raise ValueError(f"--grid {item!r}: expected a dotted key and comma-separated values, e.g. "
                             "--grid model.lr=1e-3,5e-3,2e-2 or --grid model.adapter.init_args.scale=1,4")
        if key in grid:
            raise ValueError(f"--grid {key} is given twice: list all its values in one --grid {key}=a,b,c")
        parsed = [_number(v.strip()) for v in _split_values(key, values) if v.strip()]
        if not parsed:
            raise ValueError(f"--grid {key} has no values: list them, e.g. --grid {key}=1e-3,5e-3")
        if len({repr(float(v)) if isinstance(v, (int, float)) else v for v in parsed}) != len(parsed):
            raise ValueError(f"--grid {item!r} repeats a value (1 and 1.0 are one setting)")
        if len(set(map(str, parsed))) != len(parsed):
            raise ValueError(f"--grid {item!r} repeats a value")
        grid[key] = parsed
    if not grid:
        raise ValueError("tune needs at least one --grid key=v1,v2,... (e.g. --grid model.lr=1e-3,5e-3,2e-2)")
    return grid


def _split_values(key: str, values: str) -> List[str]:
    """``values`` split on the commas outside brackets, braces and quotes, so that a YAML flow value is one value
    (``[mlp.fc1,mlp.fc2],[qkv]`` is two lists); unbalanced ones are refused before any fit runs."""
    parts, current, open_ = [], [], []  # open_: the closers (or quote) still awaited, innermost last
    closers = {"[": "]", "{": "}"}
    for char in values:
        if open_ and open_[-1] in "'\"":
            if char == open_[-1]:
                open_.pop()
        elif char in "'\"" and "".join(current).rstrip()[-1:] in ("", "[", "{", ",", ":"):  # where YAML quotes
            open_.append(char)
        elif char in closers:
            open_.append(closers[char])
        elif char in "]}":
            if not open_ or open_[-1] != char:
                raise ValueError(f"--grid {key}={values}: {char!r} closes no bracket opened before it; a value that "
                                 f"is a YAML list or mapping is written whole, e.g. --grid {key}=[a,b],[c]")
            open_.pop()
        elif char == "," and not open_:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    if open_:
        raise ValueError(f"--grid {key}={values}: {open_[-1]!r} is missing (a bracket or quote is not closed); a value "
                         f"that is a YAML list or mapping is written whole, e.g. --grid {key}=[a,b],[c]")
    return [*parts, "".join(current)]


def check_grid(configs: Sequence[str], overrides: Sequence[str], grid: Dict[str, List[Any]]) -> None:
    """Refuse, before the first trial, a grid key that no ``fit`` option has, a value ``fit`` does not accept, and a
    key that tune sets itself: every value is parsed by ``fit``'s own parser, composed as a trial composes it, and
    checked as ``fit`` checks it before training (``fit_argument_error``)."""
    from ..train.cli import cli_parser

    for key, values in grid.items():
        refuse_controlled_overrides([f"--{key}", *map(str, values[:1])], CONTROLLED, prog="tune")
        if key in NOT_SEARCHED:
            raise ValueError(f"--grid {key}: {NOT_SEARCHED[key]}, so the points' validation accuracies measure other "
                             f"tasks and choose nothing. Search one setting per study: --{key} as an override (and "
                             "one --name per value)")
    refuse_abbreviated_options([*overrides, *(f"--{key}" for key in grid)], "tune")
    refuse_settings_from_environment("tune")
    parser = cli_parser()
    base = ["fit", *(a for c in configs for a in ("-c", str(c))), *overrides]
    error = fit_argument_error(parser, base)
    if error:
        raise ValueError(f"the configs and overrides are not valid `nola-vision fit` arguments: {error}")
    for key, values in grid.items():
        for value in values:
            args = [*base, f"--{key}", str(value)]
            error = fit_argument_error(parser, args)
            if error:
                raise ValueError(f"--grid {key}={value} is not accepted by `nola-vision fit` (see nola-vision fit "
                                 f"--help): {error}")


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def grid_points(grid: Dict[str, List[Any]]) -> List[Params]:
    """Every combination, in Optuna ``GridSampler`` order (keys sorted, then the values as given)."""
    keys = sorted(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _point_key(params: Params) -> str:
    return json.dumps({k: str(v) for k, v in params.items()}, sort_keys=True)


def _grid_named_files(grid: Dict[str, List[Any]]) -> Dict[str, Dict[str, Dict[str, str]]]:
    """``{key: {value: {path: sha256 prefix}}}`` for each grid value that names a file (an adapter YAML, a weights
    file), with the files that file names in turn: a grid point counts by their content, as a protocol row does, so
    an edited file is a new setting rather than a reason to reuse the old file's scores."""
    named: Dict[str, Dict[str, Dict[str, str]]] = {}
    for key, values in grid.items():
        for value in values:
            files = referenced_files([], [str(value)], options=[key])
            if files:
                named.setdefault(key, {})[str(value)] = {path: sha[:16] for path, sha in files.items()}
    return named


def _param_args(params: Params) -> List[str]:
    return [arg for k, v in sorted(params.items()) for arg in (f"--{k}", str(v))]


def _fit_options(configs: Sequence[str], overrides: Sequence[str], group: str) -> Any:
    """The ``group`` (``data``, ``trainer``) as ``fit`` reads the composed configs and overrides: its own parser, so a
    whole group given as YAML (``--data '{val_shots: 2}'``) or as a file counts as it does for fit."""
    from ..train.cli import cli_parser

    return cli_parser().parse_args(["fit", *(a for c in configs for a in ("-c", str(c))), *overrides])["fit"][group]


def _refuse_no_validation(configs: Sequence[str], overrides: Sequence[str], grid: Dict[str, List[Any]]) -> None:
    """Refuse ``trainer.limit_val_batches`` 0 (set, or a grid value): no validation pass runs, so every trial would
    train and then fail for want of the validation accuracy tune chooses on."""
    key = "trainer.limit_val_batches"
    values = grid.get(key, [_fit_options(configs, overrides, "trainer").get("limit_val_batches")])
    if any(isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0 for value in values):
        where = f"--grid {key} holds 0" if key in grid else f"--{key} is 0"
        raise ValueError(f"{where}, which runs no validation pass, and tune chooses on validation accuracy: every "
                         f"trial would train, then fail without it. Leave {key} out (or above 0)")


def _val_shots(configs: Sequence[str], overrides: Sequence[str]) -> int:
    """``data.val_shots`` as ``fit`` reads it."""
    return int(_fit_options(configs, overrides, "data").get("val_shots") or 0)


@dataclass
class _Images:
    """The images the trial fits read (``SELECTION_SPLITS``), by ``data_digests``: a trial fit or a study's scores
    made on other images are never reused."""

    dataset: str
    root: str
    digests: Optional[Dict[str, str]]  # None while the data does not exist (the first fit downloads it)

    @classmethod
    def of(cls, configs: Sequence[str], overrides: Sequence[str]) -> _Images:
        data = _fit_options(configs, overrides, "data")
        return cls(data.dataset, data.root, data_digests(data.dataset, data.root, splits=SELECTION_SPLITS))

    def now(self) -> Optional[Dict[str, str]]:
        """The digests, read once the data exists (after a fit downloaded it)."""
        if self.digests is None:
            self.digests = data_digests(self.dataset, self.root, splits=SELECTION_SPLITS)
        return self.digests

    def changes(self, recorded: Any) -> List[str]:
        """How the images ``recorded`` (a result's or a study's ``data``) differ from these; none where unknown."""
        return image_changes(recorded, self.digests)

    def __str__(self) -> str:
        return f"dataset {self.dataset} under --data.root {self.root}"


def _trial_folder(root: Path, settings_hash: str, named_files: Dict[str, Dict[str, Dict[str, str]]],
                  params: Params) -> Path:
    """A grid point's folder, keyed by the settings too: fits made with other settings (a deleted, re-made study) are
    never reused."""
    point = _point_key(params)
    files = {key: named_files[key][str(value)] for key, value in sorted(params.items())
             if str(value) in named_files.get(key, {})}
    if files:  # the content of the files it names (grids naming none keep their folders' names)
        point += "|" + json.dumps(files, sort_keys=True)
    digest = hashlib.sha256(f"{settings_hash}|{point}".encode()).hexdigest()[:10]
    return root / "tune" / f"trial-{digest}"


def _refuse_trial_fits_on_other_images(root: Path, settings_hash: str,
                                       named_files: Dict[str, Dict[str, Dict[str, str]]], points: Sequence[Params],
                                       images: _Images) -> None:
    """Refuse to reuse a trial fit made on other images than the data holds now: its validation accuracy would choose
    the values (the protocol refuses such runs for its rows alike)."""
    for point in points:
        for path in sorted(_trial_folder(root, settings_hash, named_files, point).glob(f"*/{RESULT_FILE}")):
            result = read_result(path)
            changed = images.changes(result.get("data")) if counted(result, "val/acc") else []
            if changed:
                raise ValueError(
                    f"{path.parent} is a trial fit made on other images than {images} holds now "
                    f"({'; '.join(changed)}); the search would reuse its validation accuracy. Restore the data as it "
                    f"was, pass another --name (or --out) for a new search, or delete {root / 'tune'} and the study "
                    "to redo this one")


class _Search:
    """One worker's view of the study: claims trials, runs their fits, reports them."""

    def __init__(self, *, study: Any, storage: Any, grid: Dict[str, List[Any]], sampler: str, root: Path,
                 python: str, config_args: List[str], overrides: List[str], seeds: List[Tuple[int, int]],
                 executor: Executor, n_trials: Optional[int], tpe_budget: int, echo: bool, settings_hash: str,
                 images: _Images, named_files: Dict[str, Dict[str, Dict[str, str]]]) -> None:
        self.study, self.storage, self.grid, self.sampler, self.root = study, storage, grid, sampler, root
        self.python, self.config_args, self.overrides, self.seeds = python, config_args, overrides, seeds
        self.executor, self.n_trials, self.tpe_budget, self.echo = executor, n_trials, tpe_budget, echo
        # GridSampler gives trial number k < len(grid) grid point k of its (seeded) order: the point a first-pass
        # trial runs is known from its number at creation, which keeps concurrent claims free of races
        sampler_order = getattr(study.sampler, "_all_grids", None)
        self.points = ([dict(zip(sorted(grid), values)) for values in sampler_order] if sampler_order is not None
                       else grid_points(grid))
        self.first_pass = sampler_order is not None
        self.lock = threading.Lock()
        self.failed_here: Set[str] = set()  # failed in this run: retried by the next run, not in a loop now
        self.unbeaten_since: Dict[int, float] = {}  # trial id: when this worker first saw it running without a beat
        self.failures = 0  # trials failed in this run: they use up tpe's budget, so a fit failing alike ends the run
        self.started = 0
        self.settings_hash, self.images = settings_hash, images
        self.named_files = named_files  # grid_files: the content of the files grid values name
        self.heartbeat_s = storage.get_heartbeat_interval() or 30

    # ---- claiming ------------------------------------------------------------------------------------
    def _identity(self, trial: Any) -> Optional[str]:
        """The grid point a trial runs, known from its creation: enqueued params, or GridSampler's trial number."""
        fixed = trial.system_attrs.get("fixed_params")
        if fixed is not None:
            return _point_key(fixed)
        if self.first_pass and trial.number < len(self.points):
            return _point_key(self.points[trial.number])
        if self.sampler == "tpe" and trial.params:  # a drawn trial, once its values were suggested
            return _point_key(trial.params)
        return None

    def _claim(self) -> Optional[Any]:
        """A RUNNING trial this worker runs now, or None when nothing is left for it (waits on other workers)."""
        import optuna
        from optuna.trial import TrialState

        awaiting = False  # a never-beaten trial holds TPE's last draw: wait (outside the lock), then look again
        while True:
            if awaiting and stopping_within(min(5.0, self.heartbeat_s)):
                return None
            awaiting = False
            with self.lock:
                if self.n_trials is not None and self.started >= self.n_trials:
                    return None
                optuna.storages.fail_stale_trials(self.study)
                trials = self.study.get_trials(deepcopy=False)
                if self._fail_never_beaten(trials):
                    trials = self.study.get_trials(deepcopy=False)
                if self.sampler == "tpe":
                    used = sum(t.state in (TrialState.COMPLETE, TrialState.RUNNING) for t in trials) + self.failures
                    # after a failure nothing more is drawn: later draws learn from every earlier result, and the
                    # next run retries the failed one in its draw's place first
                    if used >= self.tpe_budget or self.failures:
                        if self.failures or not _never_beaten(trials):
                            return None
                        # a trial never beaten holds the last draw: wait out its grace period on this worker's
                        # clock (_fail_never_beaten), then its draw is run again
                        awaiting = True
                        continue
                    orphan = self._orphan(trials)
                    if orphan is not None:  # its point again, under its draw: as the uninterrupted search ran it
                        self.study.enqueue_trial(orphan.params, user_attrs={_RETRY: orphan.number,
                                                                            _DRAW: _draw_of(orphan)})
                    trial = self.study.ask()
                    asked = self.storage.get_trial(trial._trial_id)
                    if "fixed_params" in asked.system_attrs:  # a retry (its own or another worker's)
                        draw = asked.user_attrs.get(_DRAW)
                        if draw is None or self._draw_taken(trial, draw):  # another worker retries that draw
                            _release(self.study, trial, "released unrun: another trial runs its draw")
                            continue
                    else:
                        # Drawn now, by a sampler seeded with the draw's index (the trial's number less the retries
                        # numbered before it, read now that it has its number, so a retried point takes no draw's
                        # place): one seeded once per process replayed its draws in a resumed search and in each
                        # worker of a shared study.
                        draw = trial.number - sum(_RETRY in t.user_attrs for t in self.study.get_trials(deepcopy=False)
                                                  if t.number < trial.number)
                        trial.set_user_attr(_DRAW, draw)
                        self.study.sampler = optuna.samplers.TPESampler(seed=draw)
                    self._suggest(trial)
                    self._start_beating(trial)
                    self.started += 1
                    return trial
                done = {self._identity(t) for t in trials if t.state == TrialState.COMPLETE}
                running = {self._identity(t) for t in trials if t.state == TrialState.RUNNING}
                todo = [p for p in map(_point_key, self.points) if p not in done | running | self.failed_here]
                if todo:
                    waiting = {self._identity(t) for t in trials if t.state == TrialState.WAITING}
                    if (len(trials) >= len(self.points) or not self.first_pass) and todo[0] not in waiting:
                        self.study.enqueue_trial(self._params_of(todo[0]))
                    trial = self.study.ask()
                    mine = self._identity(self.storage.get_trial(trial._trial_id))
                    if mine is None or self._taken(trial, mine):
                        _release(self.study, trial, "released unrun: another trial runs its point")
                        continue
                    self._start_beating(trial)
                    self.started += 1
                    if _point_key(self._suggest(trial)) != mine:
                        raise RuntimeError(f"trial #{trial.number} got other values than its claim: optuna's "
                                           "GridSampler changed how it numbers grid points; use --sampler tpe")
                    return trial
                if not (running - done):
                    return None
            # other workers run the last points: wait, take over if they die; a stop ends the wait at once
            if stopping_within(min(5.0, self.heartbeat_s)):
                return None

    def _orphan(self, trials: Sequence[Any]) -> Optional[Any]:
        """A TPE trial whose draw no trial holds now (complete, running or waiting): released by a stop, failed in
        an earlier run, or failed for its worker's missed heartbeats (killed). Its point is run again, under its
        draw, before anything new is drawn; by draw, not by point: TPE may draw one point twice, each draw counting."""
        from optuna.trial import TrialState

        held = {_draw_of(t) for t in trials if t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)}
        for trial in trials:
            if (trial.state in (TrialState.FAIL, TrialState.PRUNED) and _draw_of(trial) not in held
                    and set(trial.params) == set(self.grid)):
                return trial
        return None

    def _draw_taken(self, trial: Any, draw: int) -> bool:
        """Whether another trial holds TPE draw ``draw`` (completed, or claimed under a lower number)."""
        from optuna.trial import TrialState

        return any(other.number != trial.number and _draw_of(other) == draw and (
            other.state == TrialState.COMPLETE or (
                other.state in (TrialState.RUNNING, TrialState.WAITING) and other.number < trial.number))
            for other in self.study.get_trials(deepcopy=False))

    def _params_of(self, key: str) -> Params:
        return next(p for p in self.points if _point_key(p) == key)

    def _taken(self, trial: Any, identity: str) -> bool:
        """Whether another trial already holds this point (completed, or claimed under a lower number)."""
        from optuna.trial import TrialState

        for other in self.study.get_trials(deepcopy=False):
            if other.number == trial.number or self._identity(other) != identity:
                continue
            if other.state == TrialState.COMPLETE or (
                    other.state in (TrialState.RUNNING, TrialState.WAITING) and other.number < trial.number):
                return True
        return False

    def _beat(self, trial: Any) -> None:
        self.storage.record_heartbeat(trial._trial_id)

    def _start_beating(self, trial: Any) -> None:
        """A claimed trial's first heartbeat, and the mark that it beats (``_fail_never_beaten``)."""
        self._beat(trial)
        trial.set_user_attr(_BEATING, True)

    def _fail_never_beaten(self, trials: Sequence[Any]) -> bool:
        """Fail the running ``trials`` whose worker was killed between creating them and their first heartbeat, once
        the grace period has passed (Optuna's stale check passes over trials without one, so their points were taken
        as running forever and every later run waited for them); whether any was.

        The grace period is timed from when this worker first saw the trial so, on its own monotonic clock: the
        trial's start stamp is naive local time, which daylight saving's end, a clock stepped back or another
        machine's clock put an hour ahead, and the search waited that hour in silence."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        now, grace = time.monotonic(), 3 * self.heartbeat_s  # the storage's grace period
        dead = [t for t in _never_beaten(trials) if now - self.unbeaten_since.setdefault(t._trial_id, now) > grace]
        for trial in dead:
            with suppress(UpdateFinishedTrialError):  # another worker failed it first
                self.storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        return bool(dead)

    # ---- running -------------------------------------------------------------------------------------
    def work(self) -> None:
        while not stopping():  # after SIGTERM or Ctrl-C no further trial is claimed
            trial = self._claim()
            if trial is None:
                return
            self._run(trial)

    def _suggest(self, trial: Any) -> Params:
        return {k: trial.suggest_categorical(k, self.grid[k]) for k in sorted(self.grid)}

    def _run(self, trial: Any) -> None:
        from optuna.trial import TrialState

        stop = threading.Event()
        beat = threading.Thread(target=self._beat_until, args=(trial, stop), daemon=True)
        beat.start()
        start = time.monotonic()
        params = self._suggest(trial)
        label = f"[tune {self.root.name}] trial #{trial.number} {params}"
        try:
            try:
                accs = self._fit(params)
            except OSError as err:  # its folders cannot be made or written (a file in the way, a full disk)
                raise TrialFailed(error_text(err)) from err
        except TrialDiverged as err:
            stop.set()
            with self._finishing(trial):
                trial.set_user_attr("diverged", str(err))
                trial.set_user_attr("duration_s", round(time.monotonic() - start, 1))
                self.study.tell(trial, -math.inf)
            if self.echo:
                print(f"{label}: diverged, counted as the worst score ({err})", flush=True)
            return
        except (TrialFailed, Stopped) as err:
            stop.set()
            # its fits were stopped with this process (Ctrl-C, SIGTERM): released, not failed; a fit the terminal's
            # signal ended first (exit 130) is waited on briefly for this process's own stop
            if stopping() or (getattr(err, "by_signal", False) and stopping_within(_STOP_GRACE_S)):
                with self._finishing(trial):
                    _release(self.study, trial, "released: its fits were stopped with the command")
                if self.echo:
                    print(f"{label}: stopped with this process, not counted: the same command runs it again",
                          flush=True)
                return
            if isinstance(err, Stopped):
                raise
            with self._finishing(trial):
                self.failed_here.add(_point_key(params))
                self.failures += 1
                trial.set_user_attr("error", str(err))
                self.study.tell(trial, state=TrialState.FAIL)
            if self.echo:
                print(f"{label}: FAILED, not counted ({err})", flush=True)
            return
        finally:
            stop.set()
        score = statistics.fmean(accs.values())
        with self._finishing(trial):
            trial.set_user_attr("val_accs", accs)
            trial.set_user_attr("duration_s", round(time.monotonic() - start, 1))
            self.study.tell(trial, score)
        if self.echo:
            per_seed = ", ".join(f"{100 * a:.1f}" for a in accs.values())
            done = sum(t.state == TrialState.COMPLETE for t in self.study.get_trials(deepcopy=False))
            total = len(self.points) if self.sampler == "grid" else self.tpe_budget
            print(f"{label}: val acc {100 * score:.2f}% (per seed {per_seed}) [{done}/{total} done, "
                  f"{time.monotonic() - start:.0f} s]", flush=True)

    @contextmanager
    def _finishing(self, trial: Any) -> Iterator[None]:
        """The lock, while this worker records how a trial ended. A trial another worker ended meanwhile (it took this
        one's heartbeats for stalled: a storage lock held for long) is said so instead of failing the worker: its fits
        are kept, and the run that takes the point again reuses them."""
        import optuna

        with self.lock:
            try:
                yield
            except optuna.exceptions.UpdateFinishedTrialError:
                print(f"tune: trial #{trial.number} was ended by another worker meanwhile, which took it for stalled "
                      "(no heartbeat within 3 of this worker's --heartbeat); its fits are kept, and the worker that "
                      "runs the point again reuses them", flush=True)

    def _beat_until(self, trial: Any, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_s):
            self._beat(trial)

    def _fit(self, params: Params) -> Dict[str, float]:
        """Validation accuracy of every selection seed of one grid point. Finished fits are reused; a fit is started
        only under its folder's claim (``claim_unfinished_run``, as protocol does), so a fit another process runs
        there (one a killed worker left running) is waited for, never started twice."""
        from ..train.cli import command_digest  # loaded by check_grid

        trial_dir = self._trial_dir(params)
        overrides = [*self.overrides, *_param_args(params), "--test_after_fit", "false"]
        seeds = {trial_dir / f"split{s}-init{i}": (s, i) for s, i in self.seeds}
        announced: Set[Path] = set()
        while True:
            results = {d: read_result(d / RESULT_FILE) for d in seeds}
            for run_dir, result in results.items():  # finished after the worker that started it was killed (kill -9)
                if counted(result, "val/acc") and "data" not in result:
                    adopt_result(run_dir, "val/acc")
            # a result counts once its fit has ended well: one another process's fit wrote may yet be discarded
            left = [d for d, result in results.items() if not counted(result, "val/acc") or claimed_elsewhere(d)]
            if not left:
                break
            claims: Dict[Path, int] = {}
            try:
                for run_dir in left:
                    claim = claim_unfinished_run(run_dir, "val/acc")
                    if claim is not None:
                        claims[run_dir] = claim
                commands = {d: fit_command(self.python, self.config_args, d, *seeds[d], overrides) for d in claims}
                for run_dir, command in commands.items():  # for a later worker, should this one die
                    stamp_claimed_run(run_dir, {"data": self.images.now(),
                                                "command_sha256": command_digest(command[3:])})
                runs = [Run(command, d / "log.txt", claims[d], d / JOB_LOCK_FILE, partial(result_counts, d, "val/acc"))
                        for d, command in commands.items()]
                ended = []
                fits = self.executor.run(runs)
                for run, code, _ in fits:
                    if not self._record(run.log.parent, code):
                        ended.append((run, code))
                        if code == CONFIG_EXIT:  # the trial's other seeds share its settings: refused alike
                            start_no_more(fits)
                            break
            finally:
                for claim in claims.values():
                    os.close(claim)
            errors = [self._failure(run, code) for run, code in ended]
            if errors and all(code == DIVERGED_EXIT for _, code in ended):
                raise TrialDiverged("; ".join(errors))
            if errors:
                raise TrialFailed("; ".join(errors), by_signal=all(code in _STOP_CODES for _, code in ended))
            if not runs:
                self._wait_for_others(left, announced)
        accs = {}
        for run_dir in seeds:
            result = read_result(run_dir / RESULT_FILE)
            if any(k.startswith("test/") for k in result["metrics"]):
                raise RuntimeError(f"{run_dir} read the test split during selection")  # guarded, never expected
            accs[run_dir.name] = float(result["metrics"]["val/acc"])
        return accs

    def _trial_dir(self, params: Params) -> Path:
        return _trial_folder(self.root, self.settings_hash, self.named_files, params)

    def _record(self, run_dir: Path, code: int) -> bool:
        """Whether the fit in ``run_dir`` finished; its result then records the images it read, as the protocol's
        results do, so that a later search reuses it only on the same images (``check_data``)."""
        result = finished_result(run_dir, code, "val/acc")
        if result is None:
            return False
        result.setdefault("data", self.images.now())
        write_json_atomic(run_dir / RESULT_FILE, result)
        return True

    def check_data(self) -> None:
        """Refuse, before any trial, to reuse a trial fit made on other images than the data holds now, or, for a
        point the study has not scored, one another fit wrote: a fit resumed or re-run by hand in its folder (maybe
        with other settings) is told by the command digest tune stamps when it starts the fit, which the fit's result
        records (``other_command``)."""
        _refuse_trial_fits_on_other_images(self.root, self.settings_hash, self.named_files, self.points, self.images)
        from optuna.trial import TrialState

        scored = {self._identity(t) for t in self.study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE}
        for point in self.points:
            if _point_key(point) in scored:  # its score is the study's: the folder is never read again
                continue
            for path in sorted(self._trial_dir(point).glob(f"*/{RESULT_FILE}")):
                result = read_result(path)
                if counted(result, "val/acc") and other_command(result, read_result(path.parent / STAMP_FILE) or {}):
                    raise ValueError(
                        f"{path} was written by another fit than the one tune started in {path.parent} (resumed or "
                        "re-run by hand, maybe with other settings): its val/acc is not this grid point's. Move that "
                        "folder away (tune then fits the point's run again), or pass another --name for a new search")

    @staticmethod
    def _failure(run: Run, code: int) -> str:
        if code != 0:
            return f"{failure(code, run.log)}, log {run.log}"
        return f"{run.log.parent / RESULT_FILE} has no finite val/acc (see {run.log})"

    def _wait_for_others(self, run_dirs: List[Path], announced: Set[Path]) -> None:
        """Wait a while for the fits that other processes run in ``run_dirs`` (holding their claims): once they end,
        their results count, or, where they failed, this trial runs them."""
        for run_dir in run_dirs:
            if self.echo and run_dir not in announced:
                print(f"[tune {self.root.name}] {run_dir}: its fit runs in another process (it holds "
                      f"{run_dir / '.claim'} or, a cluster job, {run_dir / JOB_LOCK_FILE}; e.g. a fit a killed tune "
                      "left running), so no second one is started: waiting for it to end", flush=True)
            announced.add(run_dir)
        deadline = time.monotonic() + min(5.0, self.heartbeat_s)
        while time.monotonic() < deadline:
            if stopping():
                raise Stopped(f"stopped waiting for the fits in {', '.join(map(str, run_dirs))}: this process is "
                              "stopping")
            time.sleep(0.2)


def _grid_sampler(grid: Dict[str, List[Any]]) -> Any:
    """Optuna's GridSampler minus its ``study.stop()`` after a trial: workers stop when every point is done."""
    import optuna

    class GridSampler(optuna.samplers.GridSampler):
        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            pass

    return GridSampler(grid, seed=0)


def _never_beaten(trials: Sequence[Any]) -> List[Any]:
    """The running ``trials`` without a first heartbeat (``_Search._start_beating``): live for a moment, or their
    worker was killed before it."""
    from optuna.trial import TrialState

    return [t for t in trials if t.state == TrialState.RUNNING and _BEATING not in t.user_attrs]


# How long a worker that found the study just made by another waits for its maker to record the settings.
_CLAIM_WAIT_S = 60.0

# SQLite's messages for a file that is no database (or a damaged one): retrying cannot help.
_DAMAGED_DATABASE = ("file is not a database", "database disk image is malformed")


def _open_study(name: str, storage_url: str, grid: Dict[str, List[Any]], sampler: str, heartbeat_s: int,
                key: Dict[str, Any], data: Optional[Dict[str, str]]) -> Tuple[Any, Any, Dict[str, Any]]:
    """Create or load the study, refusing one made with other settings (configs, overrides, grid, seeds); also returns
    the settings key the study records (``key``, or the one recorded for the same settings).

    Only the worker that creates the study records its settings, and the images it scores on (``data``, where they
    exist yet), since creating a study is atomic in every database: workers started together with other settings or
    other images, on machines sharing ``--storage``, never both record theirs; the others wait for the maker's record
    and compare (``_check_study_data`` for the images)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # heartbeats are what let a restarted search take over a dead worker's trial; they work outside optimize()
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning, module="optuna|nola_vision")
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    from sqlalchemy.exc import SQLAlchemyError

    engine = {"connect_args": {"timeout": 120}} if storage_url.startswith("sqlite") else {}
    chosen = _grid_sampler(grid) if sampler == "grid" else optuna.samplers.TPESampler(seed=0)
    for attempt in range(5):  # workers starting together race to create the tables: the losers retry
        try:
            storage = optuna.storages.RDBStorage(storage_url, engine_kwargs=engine, heartbeat_interval=heartbeat_s,
                                                 grace_period=3 * heartbeat_s)
            try:
                study, made = optuna.create_study(study_name=name, storage=storage, sampler=chosen,
                                                  direction="maximize"), True
            except optuna.exceptions.DuplicatedStudyError:
                study, made = optuna.load_study(study_name=name, storage=storage, sampler=chosen), False
            break
        except SQLAlchemyError as error:
            reason = str(getattr(error, "orig", None) or error)
            if any(damage in reason for damage in _DAMAGED_DATABASE):
                raise ValueError(f"--storage {storage_url}: {reason}: the file is not a study database tune can read "
                                 "(damaged, or another file). Move it away, or pass another --name or --storage"
                                 ) from None
            if attempt == 4:
                raise
            time.sleep(1.0 + attempt)
    old = study.user_attrs.get("settings") if made else _maker_settings(study)
    if old is None:
        trials = len(study.get_trials(deepcopy=False))
        if trials:  # its trials' scores would choose the values, as if fits of this grid had made them
            raise ValueError(f"study {name!r} in {storage_url} holds {trials} trials that tune did not make (it "
                             "records no tune settings: a study of another program or search); pass another --name "
                             "or --storage")
        study.set_user_attr("heartbeat_s", heartbeat_s)  # before the settings, which tell the others all is recorded
        if data is not None and "data" not in study.user_attrs:
            study.set_user_attr("data", data)
        study.set_user_attr("settings", key)
        return study, storage, key
    differing = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
    if not differing or set(differing) <= {"config_hash", "configs", "overrides"} and same_settings(old, key):
        # the same settings (the same config files by another path, overrides in another order): its fits count
        return study, storage, old
    changes = [override_changes(old.get("overrides", []), key["overrides"]) if k == "overrides" else
               _grid_files_change(old.get(k), key.get(k)) if k == "grid_files" else
               f"{k}: before {old.get(k)}, now {key.get(k)}" for k in differing if k != "config_hash"]
    raise ValueError(f"study {name!r} in {storage_url} was made with other settings ({'; '.join(changes)}); pass "
                     "another --name, or delete the study")


def _maker_settings(study: Any) -> Optional[Dict[str, Any]]:
    """The settings of a study another worker made: a study without them and without trials may have been made a
    moment ago, its maker about to record them, so they are awaited (up to ``_CLAIM_WAIT_S``; then a maker that died
    before recording them leaves an empty study this worker takes)."""
    deadline = time.monotonic() + _CLAIM_WAIT_S
    while True:
        settings = study.user_attrs.get("settings")
        if settings is not None or time.monotonic() > deadline or study.get_trials(deepcopy=False):
            return settings
        time.sleep(0.2)


def _grid_files_change(old: Optional[dict], new: Optional[dict]) -> str:
    """How the content of the files that grid values name changed since the study was made."""
    if old is None:
        return ("the files grid values name are not recorded by the study (made before tune counted them by their "
                f"content): now {new}")
    new = new or {}  # none of the grid's values names a file now
    changed = sorted({f"{key}={value}" for key in {*old, *new} for value in {*old.get(key, {}), *new.get(key, {})}
                      if old.get(key, {}).get(value) != new.get(key, {}).get(value)})
    return f"the content of files that grid values name changed: {', '.join(changed)}"


def _check_heartbeat(study: Any, heartbeat_s: int, name: str, storage_url: str) -> None:
    """Record the study's heartbeat, or refuse another: a worker takes a trial without a heartbeat for 3 of its own
    intervals as dead, so one with a shorter interval failed the live trials of the others (which then crashed)."""
    recorded = study.user_attrs.get("heartbeat_s")
    if recorded is None:
        study.set_user_attr("heartbeat_s", heartbeat_s)
    elif recorded != heartbeat_s:
        raise ValueError(f"study {name!r} in {storage_url} runs with --heartbeat {recorded} (set by its first worker), "
                         f"and every worker of a study must beat alike: one with another interval takes the others' "
                         f"live trials for dead (or is taken for dead). Pass --heartbeat {recorded}")


def _check_study_data(study: Any, images: _Images, name: str, storage_url: str) -> None:
    """Refuse a study whose trials are scored on other images than these (finished trials are never rerun, so their
    scores would choose the values); record these where its maker found no images yet (the first fit downloads
    them)."""
    recorded = study.user_attrs.get("data")
    changed = images.changes(recorded)
    if changed:
        raise ValueError(f"study {name!r} in {storage_url} scored its trials on other images than {images} holds now "
                         f"({'; '.join(changed)}); restore the data as it was, pass another --name for a new search, "
                         "or delete the study and its trial folders to redo it")
    if recorded is None and images.digests is not None:
        study.set_user_attr("data", images.digests)


def _sqlite_url(path: Path) -> str:
    """The SQLite URL of the database file ``path``: a ``?`` or ``%`` in a row name is escaped, since SQLAlchemy reads
    them as a query string and an escape (``--name 'a?b'`` put the study in the file ``a``, another row's)."""
    return "sqlite:///" + str(path).replace("%", "%25").replace("?", "%3F")


def check_sqlite_storage(url: str) -> None:
    """Refuse a SQLite storage URL whose database cannot be made (its folder missing, or not writable) before the
    study opens: SQLite makes the file, not its folder, and opening it fails only after seconds of retries."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:  # an unknown database (foo://) too: its NoSuchModuleError came once <out>/<name> was made
        parsed = make_url(url)
        parsed.get_dialect()
    except ArgumentError as error:  # SQLAlchemy's message names neither the option nor the value
        raise ValueError(f"--storage {url!r} is no database URL ({error}): give one such as sqlite:///path/tune.db "
                         "(a SQLite file) or postgresql://user@host/db") from None
    if parsed.get_backend_name() != "sqlite":
        return
    database = _sqlite_database_file(parsed)
    if database is None:
        raise ValueError(f"--storage {url!r} is an in-memory SQLite database, which each of tune's threads opens anew "
                         "(empty, without the study's tables) and which ends with the process: give a file, "
                         "sqlite:///path/tune.db, or leave --storage out (<out>/<name>/tune.db)")
    folder = Path(database).parent
    if not os.path.isdir(folder):
        raise ValueError(f"--storage {url}: the folder {folder} does not exist (SQLite makes the database file, not "
                         "its folder): create it, or pass another --storage")
    check_writable_file(database, f"--storage {url}")


def _sqlite_database_file(parsed: Any) -> Optional[str]:
    """The file a parsed SQLite URL opens, or None for a database in memory: with ``uri=true`` the name is SQLite's
    own URI (``file:path?mode=memory``, ``file::memory:?cache=shared``), whose ``file:`` is no part of the path."""
    from urllib.parse import unquote, urlsplit

    name = parsed.database
    if name in (None, "", ":memory:"):
        return None
    if str(parsed.query.get("uri", "")).lower() not in ("true", "1"):
        return name
    uri = urlsplit(name)
    options = dict(parsed.query)
    options.update(part.partition("=")[::2] for part in uri.query.split("&") if part)
    path = unquote(uri.path) if uri.scheme == "file" else name
    return None if path in ("", ":memory:") or options.get("mode") == "memory" else path


def _refusal_advice(trials: Sequence[Any], url: str, example: bool = True) -> Optional[str]:
    """What to do where a trial of this run failed because its fit refused its settings (exit 2): the same command
    meets the refusal again unless what it names changes, and the study keeps its grid; None where none was."""
    refused = [why for why in map(_failure, trials) if "refused to run" in why]
    if not refused:
        return None
    shown = f" (e.g. {refused[0][:300]})" if example else ""
    return (f"a fit refused its settings{shown}, which re-running the same command meets again unless what it names "
            f"changes: fix that, or, for a grid value fit refuses, delete the study ({url}) and re-run without that "
            "value: the other values' trial fits are reused")


def _failed_in_this_run(trials: Sequence[Any], search: Any) -> List[Any]:
    """Each grid point's last failed trial, for the points that failed in this run (``failed_here``): a failure of an
    earlier run, retried since, is no reason for this one's."""
    last: Dict[str, Any] = {}
    for trial in trials:
        key = search._identity(trial)
        if trial.state.name == "FAIL" and key in search.failed_here:
            last[key] = trial
    return list(last.values())


def run_tune(
    configs: Sequence[str],
    grid: Dict[str, List[Any]],
    *,
    out: str = "runs/tune",
    name: Optional[str] = None,
    split_seeds: Sequence[int] = (0,),
    init_seeds: Sequence[int] = (0,),
    overrides: Sequence[str] = (),
    sampler: str = "grid",
    n_trials: Optional[int] = None,
    storage: Optional[str] = None,
    protocol_split_seeds: Sequence[int] = (0, 1, 2, 3),
    protocol_init_seeds: Sequence[int] = (0, 1, 2),
    skip_protocol: bool = False,
    executor: Optional[Executor] = None,
    heartbeat_s: int = 30,
    python: str = sys.executable,
    echo: bool = True,
) -> Optional[Dict[str, Any]]:
    """Run the search (this worker's share), write the trial table, then the protocol with the best values.

    ``n_trials``: grid — at most this many trials from this worker (default: until the grid is done); tpe — the
    study's total (default 20). Returns ``best.json``'s content, or None while trials are left to run. Raises
    ValueError before the first trial for an override or grid key that ``fit`` does not accept, or an override,
    grid key or config that sets what tune sets itself (seeds, split manifests, result paths: ``CONTROLLED``);
    RuntimeError when no trial completed.
    """
    if not configs:
        raise ValueError("tune needs a config: nola-vision tune -c configs/... --grid model.lr=1e-3,5e-3")
    for config in configs:
        if not Path(config).is_file():
            raise FileNotFoundError(f"config {config} does not exist")
    if sampler not in ("grid", "tpe"):
        raise ValueError(f"--sampler must be grid or tpe, got {sampler!r}")
    refuse_controlled_configs(configs, CONTROLLED, prog="tune")
    refuse_controlled_overrides(overrides, CONTROLLED, prog="tune")
    check_grid(configs, overrides, grid)  # the configs and overrides parse as fit's
    if _val_shots(configs, overrides) <= 0:
        raise ValueError("tune chooses on validation accuracy, and this config has no validation images: pass "
                         "--data.val_shots N (e.g. 5; drawn from the train images, disjoint from the k shots)")
    _refuse_no_validation(configs, overrides, grid)
    if n_trials is not None and n_trials < 1:
        raise ValueError(f"--n_trials {n_trials}: give at least 1 (or leave it out: grid runs until the grid is done, "
                         "tpe runs 20 trials)")
    name = name if name is not None else "_".join(Path(c).stem for c in configs)  # "" is refused, not replaced
    if isinstance(heartbeat_s, bool) or not isinstance(heartbeat_s, int) or heartbeat_s < 1:
        raise ValueError(f"--heartbeat {heartbeat_s!r}: give a whole number of seconds, at least 1 (how often a worker "
                         "records that its trial is alive; a trial silent for 3 of them is taken over)")
    check_seeds(split_seeds, init_seeds)
    if not skip_protocol:  # refused now, not after the search
        check_seeds(protocol_split_seeds, protocol_init_seeds, option_prefix="protocol_")
    if storage is not None:  # refused before row_folder makes <out>/<name>
        check_sqlite_storage(storage)
    check_output_paths(out, name, tables=not skip_protocol)  # run_protocol checks them again when it runs
    root = row_folder(out, name)
    check_tune_files_ours(root)
    seeds = [(s, i) for s in split_seeds for i in init_seeds]
    named_files = _grid_named_files(grid)
    key = {**config_key(configs, overrides), "grid": {k: [str(v) for v in vs] for k, vs in grid.items()},
           **({"grid_files": named_files} if named_files else {}),
           "sampler": sampler, "selection_seeds": [list(s) for s in seeds]}
    if not skip_protocol:
        _refuse_a_row_no_choice_fits(root, key, grid)
    url = storage or _sqlite_url((root / "tune.db").resolve())
    check_sqlite_storage(url)
    images = _Images.of(configs, overrides)
    # this command's trial folders' fits first: a refused run makes no study (whose maker records the images)
    _refuse_trial_fits_on_other_images(root, key["config_hash"], named_files, grid_points(grid), images)
    with writer_lock(root / "tune.db"):  # workers starting together: one records its settings, the others compare
        study, rdb, key = _open_study(name, url, grid, sampler, heartbeat_s, key, images.digests)
        _check_heartbeat(study, heartbeat_s, name, url)
    executor = executor or LocalExecutor(1)
    search = _Search(study=study, storage=rdb, grid=grid, sampler=sampler, root=root, python=python,
                     config_args=[a for c in configs for a in ("-c", str(c))], overrides=list(overrides), seeds=seeds,
                     executor=executor, n_trials=n_trials if sampler == "grid" else None,
                     tpe_budget=20 if n_trials is None else n_trials,
                     echo=echo, settings_hash=key["config_hash"], images=images, named_files=named_files)
    search.check_data()  # those of the settings the study records (the same settings, by other config paths)
    _check_study_data(study, images, name, url)
    workers = max(1, math.ceil(executor.capacity / len(seeds)))
    if echo:
        print(f"[tune {name}] study {url}: {len(search.points) if sampler == 'grid' else search.tpe_budget} "
              f"trials of {len(seeds)} fit(s) each, {workers} at once", flush=True)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(search.work) for _ in range(workers)]:
            future.result()
    trials = study.get_trials(deepcopy=False)
    write_trial_tables(root, trials, grid, url)
    best = _best(trials, grid_points(grid) if sampler == "grid" else None)
    if best is None:
        failed = [_failure(t) for t in trials if t.state.name == "FAIL" and not _released(t)]
        diverged = [t.user_attrs["diverged"] for t in trials if "diverged" in t.user_attrs]
        why = (f" ({len(failed)} failed, e.g. {failed[0]})" if failed else
               f" but diverged ({len(diverged)}, e.g. {diverged[0]}): lower the learning rates of the grid, or add "
               "warm-up epochs" if diverged else "")
        refusal = _refusal_advice(_failed_in_this_run(trials, search), url, example=False)
        raise RuntimeError(f"no trial completed{why}: nothing can be chosen; see {root / 'tune_results.md'}"
                           + (f". {refusal}" if refusal else ""))
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    finished = (len(complete) >= search.tpe_budget if sampler == "tpe" else
                all(_point_key(p) in {search._identity(t) for t in complete} for p in search.points))
    if not finished and search.failures:
        retry = (_refusal_advice(_failed_in_this_run(trials, search), url)
                 or "fix the cause and re-run the same command to retry them")
        raise RuntimeError(f"{search.failures} trial(s) failed in this run, so nothing is chosen yet (see "
                           f"{root / 'tune_results.md'} and each trial's log.txt): {retry}")
    if not finished:
        if echo:
            print(f"[tune {name}] trials are left to run (or failed, and are retried): re-run the same command to go "
                  f"on; table: {root / 'tune_results.md'}", flush=True)
        return None
    chosen = {"params": best.params, "val_acc": best.value, "trial": best.number,
              "overrides": _param_args(best.params), "selection_seeds": [list(s) for s in seeds]}
    if not skip_protocol:  # the protocol row takes the new values, or nothing names them (best.* stay as they were)
        redo = (f"delete only the row's split*-init* folders, config.json and requested.json in {root} to redo it "
                f"(not {root} itself: it holds the study too, tune.db and tune/)")
        try:
            open_row(configs, out=out, name=name, overrides=[*overrides, *_param_args(best.params)], redo=redo)
        except ValueError as error:
            if _earlier_choice(root) == chosen["overrides"]:  # the row of the same choice refused (its data changed)
                raise ValueError(f"the protocol row of the search's choice, {' '.join(chosen['overrides'])} (trial "
                                 f"#{best.number}), cannot take more runs: {error}") from None
            earlier = (". best.json and best.yaml still name the earlier choice" if _earlier_choice(root) is not None
                       else "")
            raise ValueError(f"the search now chooses {' '.join(chosen['overrides'])} (trial #{best.number}), but "
                             f"the protocol row cannot take it: {error}{earlier}") from None
    write_set_atomic([  # one choice: never a best.json of the new one beside a best.yaml of the old
        (root / "best.json", json.dumps(chosen, indent=1, sort_keys=True) + "\n", _checked(root / "best.json")),
        (root / "best.yaml", BEST_YAML_HEADER + "\n" + yaml.safe_dump(best_fragment(configs, overrides, best.params),
                                                                       sort_keys=True),
         _checked(root / "best.yaml"))])
    _append_choice(root / "tune_results.md", chosen, protocol=not skip_protocol)
    if echo:
        print(f"[tune {name}] best {best.params}: val acc {100 * best.value:.2f}% (trial #{best.number})", flush=True)
    if not skip_protocol:
        run_protocol(configs, out=out, name=name, split_seeds=protocol_split_seeds, init_seeds=protocol_init_seeds,
                     overrides=[*overrides, *_param_args(best.params)], python=python, echo=echo, executor=executor)
    return chosen


def _refuse_a_row_no_choice_fits(root: Path, key: Dict[str, Any], grid: Dict[str, List[Any]]) -> None:
    """Refuse, before the first trial, a protocol row already at ``root`` (one ``nola-vision protocol`` made) whose
    settings no grid point gives: the search would run every trial, then find that the protocol of its choice cannot
    add to the row. Other config files are told at once; a row recorded before named files counted, or naming files
    other than these settings, is left to the check after the search."""
    try:
        recorded = json.loads((root / CONFIG_FILE).read_bytes())
    except (OSError, ValueError):
        return
    if not isinstance(recorded, dict) or "files" not in recorded and key.get("files"):
        return
    if recorded.get("files", {}) != key.get("files", {}):
        return
    rows = effective_overrides(recorded.get("overrides", []))
    fits = recorded.get("config_sha256") == key["config_sha256"] and any(
        rows == effective_overrides([*key["overrides"], *(f"{k}={v}" for k, v in parse_overrides(_param_args(p)))])
        for p in grid_points(grid))
    if not fits:
        raise ValueError(f"{root} holds a protocol row made with settings that no choice of this search gives (see "
                         f"{root / CONFIG_FILE}: configs {recorded.get('configs')}, overrides "
                         f"{recorded.get('overrides')}), so the protocol of its choice could not add to it. Pass "
                         "another --name, or --skip_protocol to search only (nothing was run)")


def _earlier_choice(root: Path) -> Optional[List[str]]:
    """The overrides ``best.json`` names (the choice of an earlier run of this search), or None."""
    try:
        return json.loads((root / "best.json").read_bytes()).get("overrides")
    except (OSError, ValueError, AttributeError):
        return None


def _is_best_json(path: Path) -> bool:
    data = json.loads(path.read_bytes())
    return isinstance(data, dict) and all(k in data for k in CHOSEN_KEYS)


def check_tune_files_ours(root: Path) -> None:
    """Refuse, before any trial, a ``best.json``, ``best.yaml``, ``tune_results.md`` or ``tune_trials.csv`` in the
    study's folder that tune did not write (``refuse_foreign_file``): it replaces them (and checks each again just
    before it does); and one it could not replace then (``check_writable_file``: a write-protected file, a folder
    this process may not write)."""
    for name in _TUNE_FILES:
        _refuse_foreign_tune_file(root / name)
        check_writable_file(root / name, f"the search's {name}")


# How each file is known as one tune wrote, by its content.
_TUNE_FILES: Dict[str, Callable[[Path], bool]] = {
    "best.json": _is_best_json,
    "best.yaml": lambda path: first_line(path).startswith(BEST_YAML_MARK),
    "tune_results.md": lambda path: first_line(path) == f"# Tuning: {path.parent.name}",
    "tune_trials.csv": lambda path: first_line(path).startswith("trial,"),
}


def _refuse_foreign_tune_file(path: Path) -> None:
    refuse_foreign_file(path, _TUNE_FILES[path.name], "a file nola-vision tune wrote",
                        "Pass another --out or --name, or remove or rename the file.")


def _checked(path: Path) -> Callable[[], None]:
    """The ``check`` of a tune file's atomic write: refuse, just before replacing it, a file tune did not write."""
    return partial(_refuse_foreign_tune_file, path)


def _best(trials: Sequence[Any], points: Optional[List[Params]]) -> Optional[Any]:
    """The completed trial with the highest score; ties go to the first grid point (or the first TPE draw: a retried
    point keeps its draw's place). Scores within ``_TIE`` of the highest tie: fit records accuracies as float32, so
    means of equal accuracies differ in their last bits (2/20 and 4/20 against 3/20 twice)."""
    complete = [t for t in trials if t.state.name == "COMPLETE" and t.value is not None and math.isfinite(t.value)]
    if not complete:
        return None
    order = {_point_key(p): i for i, p in enumerate(points or [])}
    highest = max(t.value for t in complete)
    tied = [t for t in complete if t.value >= highest - _TIE]
    return min(tied, key=lambda t: (order.get(_point_key(t.params), 0), _draw_of(t)))


# Scores closer than this are equal: far above float32's rounding of an accuracy (6e-8 near 1), far below one image
# of any validation set a few-shot search uses.
_TIE = 1e-6


# User attributes of a trial: the trial whose point it runs again (enqueued), and a TPE trial's draw (its sampler's
# seed; a retry keeps the draw of the trial it retries); ``released``, why a trial was let go without counting.
_RETRY, _DRAW, _RELEASED = "retry_of", "draw", "released"
_BEATING = "beating"  # set with a claimed trial's first heartbeat


def _draw_of(trial: Any) -> int:
    """A trial's place among the draws: recorded for TPE trials, else (grid, or studies before it was) its number."""
    return trial.user_attrs.get(_DRAW, trial.number)


def _release(study: Any, trial: Any, why: str) -> None:
    """End ``trial`` uncounted and left out of the tables, its point left for another trial: failed in the study,
    which Optuna's samplers ignore (TPE learns from pruned trials, so a stopped one would change later draws)."""
    from optuna.trial import TrialState

    trial.set_user_attr(_RELEASED, why)
    study.tell(trial, state=TrialState.FAIL)


def _released(trial: Any) -> bool:
    """Whether a trial was released uncounted (``_release``; studies before it recorded such trials as pruned)."""
    return trial.state.name == "PRUNED" or _RELEASED in trial.user_attrs


def _yaml_values(params: Params) -> Params:
    """``params`` with each YAML list or mapping given as text on the command line (``[attn.qkv]``) as the list or
    mapping it is, as ``fit`` reads it: best.yaml then holds the value, not its quoted text (which only ``-c``, not a
    plain YAML reader, turns back into a list)."""
    def value(text: Any) -> Any:
        if isinstance(text, str) and text.lstrip()[:1] in ("[", "{"):
            with suppress(yaml.YAMLError):
                return yaml.safe_load(text)
        return text
    return {key: value(text) for key, text in params.items()}


def best_fragment(configs: Sequence[str], overrides: Sequence[str], params: Params) -> Dict[str, Any]:
    """best.yaml's values: the chosen ``params`` nested (``_nested``), but a key inside a mapping-valued option
    (``model.backbone_kwargs.depth``) as that whole mapping as the trial's ``fit`` read it. A later ``-c`` replaces a
    mapping whole: the key alone dropped the configs' other entries, and ``fit -c best.yaml`` built another model."""
    from ..train.cli import cli_parser

    fit = cli_parser().parse_args(["fit", *(a for c in configs for a in ("-c", str(c))), *overrides,
                                   *_param_args(params)])["fit"]
    values: Dict[str, Any] = {}
    for key, value in _yaml_values(params).items():
        parts = key.split(".")
        mapping = next((".".join(parts[:end]) for end in range(1, len(parts))
                        if isinstance(fit.get(".".join(parts[:end])), dict)), None)
        if mapping is None:
            values[key] = value
        else:
            values[mapping] = dict(fit.get(mapping))
    return _nested(values)


def _nested(params: Params) -> Dict[str, Any]:
    """``{"model.lr": 1}`` as ``{"model": {"lr": 1}}`` (a YAML fragment to compose with ``-c``). A class chosen by
    name with keys below it (``model.adapter: LoRAConfig``, ``model.adapter.init_args.rank: 2``) becomes
    ``{class_path: LoRAConfig, init_args: {rank: 2}}``, the form ``-c`` reads: the keys were nested under the name's
    text, and tune failed after its last trial."""
    tree: Dict[str, Any] = {}
    for key, value in sorted(params.items()):  # a name before the keys below it
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {} if child is None else {"class_path": child}
            node = child
        node[leaf] = value
    return tree


def write_trial_tables(root: Path, trials: Sequence[Any], grid: Dict[str, List[Any]], url: str) -> None:
    """``tune_trials.csv`` and ``tune_results.md``: every trial's params, mean and per-seed val acc, state, time."""
    keys = sorted(grid)
    shown = [t for t in trials if not _released(t)]
    seeds = sorted({s for t in shown for s in t.user_attrs.get("val_accs", {})})
    trials_csv = root / "tune_trials.csv"
    with atomic_path(trials_csv, check=_checked(trials_csv)) as tmp, open(tmp, "w", newline="", encoding="utf-8",
                                                                               errors="surrogateescape") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", *keys, "val_acc", *(f"val_acc_{s}" for s in seeds), "state", "duration_s", "error"])
        for t in shown:
            accs = t.user_attrs.get("val_accs", {})
            writer.writerow(map(spreadsheet_safe, [
                t.number, *(t.params.get(k, "") for k in keys), _score(t, lambda v: v),
                *(accs.get(s, "") for s in seeds), _state(t), t.user_attrs.get("duration_s", ""),
                _failure(t) if t.state.name == "FAIL" else t.user_attrs.get("diverged", "")]))
    lines = [f"# Tuning: {root.name}", "",
             f"Study `{root.name}` in `{url}`. Score: mean final-epoch validation accuracy over the selection seeds "
             "(fits with `--test_after_fit false`: the test split is not read while choosing).", "",
             "| trial | " + " | ".join(keys) + " | val acc % | per seed | state | time s |",
             "|---:|" + "---:|" * len(keys) + "---:|---|---|---:|"]
    for t in sorted(shown, key=lambda t: -(t.value if t.value is not None else -1)):
        accs = t.user_attrs.get("val_accs", {})
        per_seed = ", ".join(f"{100 * a:.1f}" for a in accs.values())
        value = _score(t, lambda v: f"{100 * v:.2f}")
        lines.append(f"| {t.number} | " + " | ".join(_cell(t.params.get(k, "")) for k in keys)
                     + f" | {value} | {per_seed} | {_state(t)} | {t.user_attrs.get('duration_s', '')} |")
    write_text_atomic(root / "tune_results.md", "\n".join(lines) + "\n", check=_checked(root / "tune_results.md"))


def _cell(value: Any) -> str:
    """``value`` as a markdown table cell: a ``|`` in it (a regex of targets) escaped, else it splits the cell."""
    return str(value).replace("|", "\\|")


def _score(trial: Any, shown: Callable[[float], Any]) -> Any:
    """A trial's score as the tables show it: empty where it has none (failed, running) or diverged (-inf)."""
    return "" if trial.value is None or not math.isfinite(trial.value) else shown(trial.value)


def _failure(trial: Any) -> str:
    """Why a failed trial failed: its fit's error, or, where it recorded none, that its worker stopped (killed, or its
    machine lost): Optuna fails a trial whose heartbeats stopped."""
    if "error" in trial.user_attrs:
        return trial.user_attrs["error"]
    return "no error recorded: its worker stopped (killed?), and its missed heartbeats failed it"


def _state(trial: Any) -> str:
    """A trial's state for the tables: DIVERGED for a completed trial whose fit diverged."""
    return "DIVERGED" if "diverged" in trial.user_attrs else trial.state.name


def _append_choice(path: Path, chosen: Dict[str, Any], protocol: bool) -> None:
    """Add the chosen values to the trials' table, and where the protocol with them is (not run with
    ``--skip_protocol``)."""
    then = ("The protocol with these values is the row of this name in ../results.md." if protocol else
            "The protocol was skipped (--skip_protocol): run the same command without it for the row in "
            "../results.md.")
    line = (f"\nChosen (trial #{chosen['trial']}, val acc {100 * chosen['val_acc']:.2f}%): "
            f"`{' '.join(chosen['overrides'])}` (also in best.json, best.yaml). {then}\n")
    text = path.read_text(encoding="utf-8", errors="surrogateescape")  # as write_text_atomic wrote it
    if not text.endswith(line):  # another worker of the study, done at the same time, added it already
        write_text_atomic(path, text + line, check=_checked(path))


def _missing_module(error: ImportError) -> str:
    """What to install for an ImportError of ``tune``: Optuna itself, or the driver of the --storage URL's database
    (Optuna's message names neither the URL's scheme nor a package)."""
    if error.name == "optuna":
        return "nola-vision tune needs Optuna, which is not installed: pip install 'nola_vision[tune]'"
    return (f"{error_text(error)}: the --storage URL's database needs its Python driver (postgresql://: pip install "
            "psycopg2-binary; mysql://: pip install mysqlclient, or PyMySQL with a mysql+pymysql:// URL)")


# SQLite's reasons for a write that failed (a full disk, a file size limit, a failing disk, a network file system
# without locking): SQLAlchemy's message adds the SQL statement and names none of them.
_DATABASE_WRITE_FAILED = ("disk I/O error", "database or disk is full")


def _storage_failure(error: BaseException) -> Optional[str]:
    """A study database's write that failed, as one line naming the causes and the fixes; None for other errors.
    Optuna wraps the error of a write made once the study is open (``StorageInternalError``): its cause says why."""
    errors = _storage_errors()
    while errors and isinstance(error, errors):
        reason = str(getattr(error, "orig", None) or "")
        if any(damage in reason for damage in _DAMAGED_DATABASE):
            return (f"the study database cannot be read: {reason}: part of it is damaged (or it is another "
                    "file), found once the study was open. Move it away and run the same command again (the trial "
                    "folders' fits count again), or pass another --name or --storage")
        if any(cause in reason for cause in _DATABASE_WRITE_FAILED):
            return (f"cannot write the study database: {reason} (a full disk, a file size limit (ulimit -f), a "
                    "failing disk, or a network file system without file locking). Make room or raise the limit "
                    "(for a network file system: --storage on a local disk, or a postgresql:// URL), then run the "
                    "same command again: tune goes on from what the database holds")
        if error.__cause__ is None:
            return None
        error = error.__cause__
    return None


def _storage_errors() -> Tuple[type, ...]:
    """SQLAlchemy's base error and Optuna's wrapper of a failed storage write, each once it is imported (a study was
    opened), else none: no error of theirs can have occurred."""
    exc, optuna = sys.modules.get("sqlalchemy.exc"), sys.modules.get("optuna.exceptions")
    return ((exc.SQLAlchemyError,) if exc is not None else ()) + ((optuna.StorageInternalError,) if optuna else ())


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nola-vision tune",
        description="Choose hyperparameters on validation accuracy (Optuna; one fit per selection seed per trial, "
                    "never reading the test split), then run the protocol with the chosen values. Unknown "
                    "arguments go to every fit, e.g. --trainer.max_epochs 5 --data.val_shots 5.")
    parser.add_argument("-c", "--config", action="append", required=True, help="YAML config; repeat to compose")
    parser.add_argument("--out", default="runs/tune", help="output folder (the protocol's results.md is here)")
    parser.add_argument("--name", default=None, help="study and row name (default: config file stems)")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="values of a dotted fit option, e.g. model.lr=1e-3,5e-3,2e-2 (a YAML list or mapping is "
                             "one value: model.adapter.init_args.targets=[qkv],[mlp.fc1,mlp.fc2]); repeat for more "
                             "keys")
    parser.add_argument("--split_seeds", type=int, nargs="+", default=[0], help="selection split seeds")
    parser.add_argument("--init_seeds", type=int, nargs="+", default=[0], help="selection init seeds")
    parser.add_argument("--sampler", choices=["grid", "tpe"], default="grid")
    parser.add_argument("--n_trials", type=int, default=None,
                        help="grid: at most this many trials from this worker; tpe: trials in the study (20)")
    parser.add_argument("--storage", default=None, help="Optuna RDB URL (default sqlite:///<out>/<name>/tune.db); "
                        "a postgresql:// or mysql:// URL lets workers on several machines share the study")
    parser.add_argument("--heartbeat", type=int, default=30,
                        help="seconds between a running trial's heartbeats; after 3 missed, it is retried")
    parser.add_argument("--protocol_split_seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--protocol_init_seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--skip_protocol", action="store_true", help="only search (e.g. extra workers)")
    add_executor_arguments(parser)
    args, overrides = parser.parse_known_args(argv)
    try:
        with stop_runs_on_signals():
            name = args.name if args.name is not None else "_".join(Path(c).stem for c in args.config)
            grid = parse_grid(args.grid)
            executor = build_executor(args, Path(args.out) / name / "submitit")
            chosen = run_tune(args.config, grid, out=args.out, name=name, split_seeds=args.split_seeds,
                              init_seeds=args.init_seeds, overrides=overrides, sampler=args.sampler,
                              n_trials=args.n_trials, storage=args.storage,
                              protocol_split_seeds=args.protocol_split_seeds,
                              protocol_init_seeds=args.protocol_init_seeds, skip_protocol=args.skip_protocol,
                              executor=executor, heartbeat_s=args.heartbeat)
    except ImportError as err:  # Optuna (the [tune] extra) or the --storage URL's database driver is not installed
        print(f"nola-vision tune: error: {_missing_module(err)}", file=sys.stderr)
        return CONFIG_EXIT
    except (RuntimeError, ValueError, OSError, *_storage_errors()) as err:  # the tuple is built as an error arrives
        print(f"nola-vision tune: error: {_storage_failure(err) or error_text(err)}", file=sys.stderr)
        return CONFIG_EXIT if isinstance(err, (ValueError, FileNotFoundError)) else 1  # refused, as fit's; else failed
    root = Path(args.out) / name
    print((root / "tune_results.md").read_text(encoding="utf-8", errors="surrogateescape"))
    if chosen is not None and not args.skip_protocol:
        print((Path(args.out) / "results.md").read_text(encoding="utf-8", errors="surrogateescape"))
    return 0
