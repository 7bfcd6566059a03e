"""``nola-vision protocol``: the paper's few-shot protocol, split seeds × init seeds, with a mean (std) table.

Each run is ``nola-vision fit`` in its own process and directory (``<out>/<name>/split<S>-init<I>``) with
``--data.split_seed S --seed_everything I``. A run counts only once its ``result.json`` exists, and that
file is written atomically after the final test pass, so a killed run leaves nothing counted and is
re-run from scratch on restart, while finished runs are skipped. ``results.csv`` and ``results.md`` are
rebuilt from every ``result.json`` under ``<out>`` after each run. A result with a non-finite metric, a
status other than ok, or from a process that exited non-zero never counts.

A row is keyed by its settings (the config files' content, the overrides without seeds and paths, and the
content of every file they name, ``results.config_key``):
``<out>/<name>/config.json`` records them, and re-running under the same name with other settings is refused
with the differing settings named (the same overrides in another order are the same settings: ``same_settings``),
instead of averaging runs of different settings into one row. Each result records the digests of the images it
was made on (``results.data_digests``), and adding runs to a row made on other images (a data folder changed since)
is refused the same way.

The fit command line is checked once, before any run (``check_fit_arguments``): a misspelt option or a value fit
refuses would fail every run alike.

What the seeds control: the split seed draws the k-shot training images (so a split manifest, ``data.split_file``
or ``data.val_split_file``, is refused in a config or an override, a settings file among the overrides,
``--config x.yaml``, included); the init seed is the run's
``seed_everything`` (head initialisation, data order, augmentation). The adapter config's own ``seed``
(NOLA's random bases, LoRA's A) stays as configured, as in the authors' code, which fixes the bases.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
import yaml
from torch import Tensor

from ..core.storage import check_writable_file, file_in_the_way, write_json_atomic
from ..core.warn import warn_user
from .executors import (
    CONFIG_EXIT,
    DIVERGED_EXIT,
    NOT_STARTED,
    Executor,
    LocalExecutor,
    Run,
    add_executor_arguments,
    build_executor,
    failure,
    start_no_more,
    stop_runs_on_signals,
)
from .knn import extract_features, knn_predict, neighbours_used
from .results import (
    JOB_LOCK_FILE,
    RESULT_FILE,
    STAMP_FILE,
    adopt_result,
    check_row_data,
    check_seeds,
    check_tables_ours,
    claim_row,
    claim_unfinished_run,
    config_key,
    counted,
    data_digests,
    finished_result,
    image_changes,
    other_command,
    parse_overrides,
    read_result,
    request_runs,
    result_counts,
    row_folder,
    stamp_claimed_run,
    write_tables,
)

__all__ = ["CONTROLLED", "KNN_MODEL", "REPLAY_SPLIT", "Row", "check_fit_arguments", "check_knn_k",
           "check_output_paths", "error_text", "fit_argument_error", "fit_command", "main", "open_knn_row",
           "open_row", "refuse_abbreviated_options", "refuse_controlled_configs", "refuse_controlled_overrides",
           "refuse_settings_from_environment", "run_dir_name", "run_knn", "run_protocol", "set_options"]


# how to replay the split of one run, which a split manifest given to protocol or tune cannot do
REPLAY_SPLIT = ("a split manifest would give every split seed the same images. To replay one run's split, run "
                "`nola-vision fit` with its manifests: "
                "--data.split_file <run folder>/<dataset>_<k>shot_seed<S>_train.txt and, for a config with "
                "val_shots > 0, --data.val_split_file <run folder>/<dataset>_<k>shot_seed<S>_val<V>.txt (or "
                "--data.val_shots 0 to replay without validation)")

# What protocol sets in every run itself, and how to control it instead: an override of these would make every
# "split seed" the same split (or every init seed the same seed), or write the results where nothing reads them.
CONTROLLED = {
    "--seed_everything": "set the init seeds with protocol's --init_seeds",
    "--data.split_seed": "set the split seeds with protocol's --split_seeds",
    "--data.split_file": f"protocol draws each run's split from --split_seeds; {REPLAY_SPLIT}",
    "--data.val_split_file": f"protocol draws each run's split from --split_seeds; {REPLAY_SPLIT}",
    "--trainer.default_root_dir": "choose where runs go with protocol's --out and --name",
    "--data.split_dir": "choose where runs go with protocol's --out and --name",
    "--result_file": "choose where runs go with protocol's --out and --name",
    "--model.adapter_dir": "every run exports its adapter into its own run folder (its result.json names it), so "
                           "that no run overwrites another's",
    "--test_after_fit": "protocol reports each run's test accuracy, so it always tests after fit",
    "--trainer.limit_test_batches": "protocol reports each run's accuracy on the full test split, so it tests on "
                                    "every test image",
    "--ckpt_path": "each run trains from its own seeds; a checkpoint given to every run would make them one run "
                   "(its weights and random state), counted as several",
}


GROUPS = ("--data", "--model", "--trainer")
# fit's options that load a whole settings file (or YAML text) at their place on the command line
CONFIG_OPTIONS = ("--config", "-c")


def refuse_controlled_overrides(overrides: Sequence[str], controlled: Dict[str, str] = CONTROLLED,
                                prog: str = "protocol") -> None:
    """Refuse an override of what ``prog`` sets in every run, saying how to control it instead."""
    for key, value in parse_overrides(overrides):
        for option in set_options(key, value):
            # fit takes a unique prefix of an option name for the option (``--seed 3`` is ``--seed_everything 3``),
            # unless the prefix is an option itself (``--model.adapter`` is not ``--model.adapter_dir``)
            hit = next((c for c in controlled if c == option or option not in GROUPS and c.startswith(option)), None)
            if hit is None or hit != option and _is_fit_option(option):
                continue
            given = f"{key} {value}" if value is not None else key
            raise ValueError(f"{prog} sets {hit} in every run itself, so `{given}` cannot be passed on to fit: "
                             f"{controlled[hit]}")


def _is_fit_option(option: str) -> bool:
    """Whether ``option`` is a whole option name of ``fit`` (its parser is built only for this question)."""
    from ..train.cli import fit_options

    return option in fit_options()


def refuse_controlled_configs(configs: Sequence[str], controlled: Dict[str, str] = CONTROLLED,
                             prog: str = "protocol") -> None:
    """Refuse a config file that sets what ``prog`` controls and does not set again on fit's command line (a split
    manifest): every run would keep the config's value. Those it sets again (seeds, folders) may stay in a config."""
    set_again = set(_run_settings(Path(), 0, 0))  # the options, whatever the run
    for config in configs:
        for option, value in _config_settings(config).items():
            if option in controlled and option not in set_again and value is not None:
                raise ValueError(f"config {config} sets {option[2:]}: {value}, which {prog} controls in every run "
                                 f"itself: {controlled[option]}")


def _config_settings(config: str) -> Dict[str, Any]:
    """The dotted fit options a config file (or YAML text, as ``--config`` also takes) sets, with their values:
    ``data: {split_file: x}`` (or the group under ``init_args``, or in a file of its own) sets ``--data.split_file``.
    Empty for a file that is not a YAML mapping, which fit itself reports."""
    try:
        content = yaml.safe_load(_settings_text(config))
    except (ValueError, yaml.YAMLError, RecursionError):
        return {}
    if not isinstance(content, dict):
        return {}
    settings: Dict[str, Any] = {}
    for key, value in content.items():
        option = f"--{key}"
        settings[option] = value
        if option in GROUPS:
            # fit reads a group file a config names from the config's folder
            group = _group_settings(value, Path(config).parent)
            settings.update({f"{option}.{name}": field for name, field in group.items()})
    return settings


def set_options(key: str, value: Optional[str]) -> List[str]:
    """The dotted fit options an override sets: ``--data.init_args.split_seed 7`` sets ``--data.split_seed``, a
    whole group given as YAML (``--data '{split_seed: 7}'``) or as a file sets each of its keys, and a settings file
    (``--config x.yaml``, ``-c x.yaml``) each option it sets (``data: {split_seed: 7}``, ``seed_everything: 5``)."""
    option = key.replace(".init_args.", ".")
    if value is not None and option in CONFIG_OPTIONS:
        return [option, *_config_settings(value)]
    if value is None or option not in GROUPS:
        return [option]
    return [option] + [f"{option}.{name}" for name in _group_settings(value)]


def _settings_text(value: str, folder: Path = Path()) -> str:
    """The text fit loads settings from: the file ``value`` names (relative to ``folder``), else ``value`` itself."""
    path = folder / value
    try:
        return path.read_text(encoding="utf-8") if path.is_file() else value
    except (OSError, ValueError):  # a name too long to be a file, or a file fit cannot read either
        return value


def _group_settings(value: Any, folder: Path = Path()) -> Dict[str, Any]:
    """The fields a whole fit group (``--data``, ``data:``) sets: a mapping, YAML text or a YAML file (a relative path
    is read from ``folder``, as fit does), with its ``init_args`` unwrapped; empty for anything else (a class path
    alone sets no field)."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(_settings_text(value, folder))
        except (ValueError, yaml.YAMLError, RecursionError):
            return {}
    if not isinstance(value, dict):
        return {}
    return value["init_args"] if isinstance(value.get("init_args"), dict) else value


def check_output_paths(out: str, name: str, tables: bool = True) -> None:
    """Refuse, before the first run, an ``--out`` or ``--name`` whose tables or run folders could not be written (a
    folder this process may not write, a name over the file system's limit, ``results.csv`` a directory), found
    otherwise only after a fit, or as an OSError; and tables of that name nola-vision did not write, which it would
    replace (``check_tables_ours``). A file in the way of the row is ``row_folder``'s to name. ``tables=False``: a
    caller that writes no ``<out>`` tables (``tune --skip_protocol``) checks the row folder only."""
    root = Path(out) / name
    if tables:
        check_tables_ours(out)
    if file_in_the_way(root) is not None:
        return
    for table in ("results.csv", "results.md") if tables else ():
        check_writable_file(Path(out) / table, f"--out {out}")
    first = root / run_dir_name(0, 0)  # when it exists, a finished run (maybe another user's) that is only read
    # os.path's: False, where Path.exists raises, for a name over the file system's limit (refused just below)
    check_writable_file((root / f"{first.name}-next" if os.path.exists(first) else first) / RESULT_FILE, "--name")


def run_dir_name(split_seed: int, init_seed: int) -> str:
    return f"split{split_seed}-init{init_seed}"


# the run settings a caller's own overrides may replace (tune's trials pass --test_after_fit false), given before them
TEST_SETTINGS = ("--test_after_fit", "--trainer.limit_test_batches")


def _run_settings(run_dir: Path, split_seed: int, init_seed: int) -> Dict[str, str]:
    """What every run's command line sets after the configs, replacing their values: seeds, where the run writes
    (an ``adapter_dir`` a config sets is reset: each run exports into its own log folder, not all into one), and a
    test pass on the whole test split (a config's ``test_after_fit: false`` would leave every run without a test
    accuracy, its ``limit_test_batches`` would report the accuracy of a few batches as the run's)."""
    return {"--seed_everything": str(init_seed), "--data.split_seed": str(split_seed),
            "--trainer.default_root_dir": str(run_dir), "--data.split_dir": str(run_dir),
            "--result_file": str(run_dir / RESULT_FILE), "--model.adapter_dir": "null", "--test_after_fit": "true",
            "--trainer.limit_test_batches": "1.0"}


def fit_command(python: str, config_args: Sequence[str], run_dir: Path, split_seed: int, init_seed: int,
                overrides: Sequence[str]) -> Tuple[str, ...]:
    """The ``nola-vision fit`` command line of one run, writing everything under ``run_dir``. Its seeds and folders
    come after the overrides, where fit gives them the last word: no settings file among the overrides replaces them."""
    quiet = [] if any("enable_progress_bar" in o for o in overrides) else ["--trainer.enable_progress_bar", "false"]
    settings = _run_settings(run_dir, split_seed, init_seed)
    tests = [a for k in TEST_SETTINGS for a in (k, settings.pop(k))]
    own = [a for pair in settings.items() for a in pair]
    return (python, "-m", "nola_vision.cli", "fit", *config_args, *tests, *quiet, *overrides, *own)


def fit_argument_error(parser: Any, args: Sequence[str]) -> Optional[str]:
    """Why ``fit`` would refuse ``args`` (``["fit", ...]``) before training, found without running it (its parser, the
    model's and trainer's range checks), or why its run would not count: a debugging pass (``fast_dev_run``) writes no
    result, so every run of the row or trial would be reported failed; None when none applies."""
    from ..train.cli import argument_error, argument_value_error

    error = argument_error(parser, args)
    if error is not None:
        return error
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        parsed = parser.parse_args(list(args))[args[0]]  # once, for both checks below
    error = argument_value_error(parser, args, parsed)
    passes = parsed.trainer.fast_dev_run if args[0] == "fit" else None
    if error is None and passes:
        error = (f"--trainer.fast_dev_run {passes} is a debugging pass of a few batches, which writes no "
                 "result.json, so no run would count: drop it (to debug one run: nola-vision fit "
                 "--trainer.fast_dev_run true)")
    return error


def refuse_abbreviated_options(args: Sequence[str], prog: str) -> None:
    """Refuse an abbreviated fit option (``--trainer.max_ep``), naming the whole one. Fit takes it, but ``prog``
    finds the options it sets itself, and a row's settings, by their whole names."""
    from ..train.cli import fit_options

    options = fit_options()
    for arg in args:
        given = arg.split("=", 1)[0]
        whole = sorted(o for o in options if o.startswith(given)) if given.startswith("--") and given != "--" else []
        if whole and given not in options:
            raise ValueError(f"{given} abbreviates {' or '.join(whole)}: {prog} takes whole option names (it finds "
                             f"the options it sets itself, and the settings of a row, by name)")


def refuse_settings_from_environment(prog: str) -> None:
    """Refuse fit options set by environment variables (read where ``JSONARGPARSE_DEFAULT_ENV=true``): every fit
    reads them, but the row's (or study's) settings, made of the configs and overrides, do not record them, so runs
    with other values would count as one row's."""
    if os.environ.get("JSONARGPARSE_DEFAULT_ENV", "").lower() != "true":
        return
    found = sorted(name for name in os.environ if name.startswith("PL_FIT__") or name in ("PL_CONFIG", "PL_SUBCOMMAND"))
    if found:
        raise ValueError(f"{prog}: {', '.join(found)} set{'s' * (len(found) == 1)} fit options from the environment "
                         "(JSONARGPARSE_DEFAULT_ENV=true), which the settings a row or study records leave out: give "
                         "them as overrides instead (PL_FIT__TRAINER__MAX_EPOCHS=3 is --trainer.max_epochs 3), or "
                         "unset them")


def check_fit_arguments(configs: Sequence[str], overrides: Sequence[str], prog: str = "protocol") -> Any:
    """Refuse, before any run, a fit command line that every run would fail on alike (an unknown or misspelt option,
    a value fit refuses) or whose runs would read settings the row does not record (from the environment); returns
    fit's parsed config, as every run composes it."""
    from ..train.cli import cli_parser

    refuse_settings_from_environment(prog)
    refuse_abbreviated_options(overrides, prog)
    parser = cli_parser()
    args = list(fit_command("python", [a for c in configs for a in ("-c", str(c))], Path("run"), 0, 0, overrides)[3:])
    error = fit_argument_error(parser, args)
    if error:
        raise ValueError(f"the configs and overrides are not valid `nola-vision fit` arguments, so every run would "
                         f"fail: {error}")
    return parser.parse_args(args)["fit"]


@dataclass
class Row:
    """A row set up for runs (``open_row``): its folder, the key it records, and the images its runs are made on."""

    root: Path
    key: Dict[str, Any]  # the key the row records (``claim_row``): the one a same-settings row was recorded under
    dataset: str
    data_root: str
    images: Optional[Dict[str, str]]  # ``data_digests`` checked before the first run; None until the data exists

    def recorded(self) -> Dict[str, Any]:
        """The row's part of a result just made: the hash of the key the row records, and the images as they are
        after the run (those checked before the first run, unless they changed since: the table then averages the run
        with none of the others; where the first run only downloaded them, as it left them)."""
        now = data_digests(self.dataset, self.data_root)
        if self.images is None:
            self.images = now
        return {"config_hash": self.key["config_hash"], "data": now if now is not None else self.images}


def open_row(configs: Sequence[str], *, out: str, name: str, overrides: Sequence[str],
             run_overrides: Optional[Sequence[str]] = None, redo: Optional[str] = None) -> Row:
    """Set up the row ``<out>/<name>`` before any of its runs, as every row is set up (protocol's fits, the k-NN
    baseline): refuse a run command line fit would refuse (``check_fit_arguments``), a name that is not one folder
    name or paths that cannot be written, settings other than those the row's runs were made with (``claim_row``)
    and images other than those they read (``check_row_data``).

    ``overrides``: what the row is keyed by (``config_key``); ``run_overrides``: the overrides of each run's command
    line, when they differ (default ``overrides``); ``redo``: how a refusal says to redo the row (default: delete
    its folder)."""
    data = check_fit_arguments(configs, overrides if run_overrides is None else run_overrides).data
    key = config_key(configs, overrides)
    check_output_paths(out, name)
    root = row_folder(out, name)
    key = claim_row(root, key, redo)
    images = data_digests(data.dataset, data.root)
    if images is not None:  # else the first run downloads the data
        check_row_data(root, images, f"dataset {data.dataset} under --data.root {data.root}", redo)
    return Row(root=root, key=key, dataset=data.dataset, data_root=data.root, images=images)


def run_protocol(
    configs: Sequence[str],
    *,
    out: str = "runs/protocol",
    name: Optional[str] = None,
    split_seeds: Sequence[int] = (0, 1, 2, 3),
    init_seeds: Sequence[int] = (0, 1, 2),
    overrides: Sequence[str] = (),
    knn: bool = False,
    knn_k: int = 1,
    python: str = sys.executable,
    echo: bool = True,
    executor: Optional[Executor] = None,
) -> List[Dict[str, Any]]:
    """Run every (split seed, init seed) of a config that has no result yet; return all rows of ``<out>``.

    ``configs`` are YAML files composed in order (``-c a.yaml -c b.yaml``); ``overrides`` are extra CLI
    arguments for every run (``--trainer.max_epochs 5``); ``executor`` runs them (default: one at a time here).
    Raises ValueError, before any run, when an override or a config sets what the protocol controls (seeds, split
    manifests, result paths: ``CONTROLLED``), fit would refuse the command line (``check_fit_arguments``), or
    ``<out>/<name>`` (with ``knn``, also ``<out>/<name>-knn``) holds runs made with other settings or on other images
    (``open_row``); RuntimeError listing failed runs (after running the others, and the k-NN baseline's error with
    them when it failed too).
    """
    if not configs:
        raise ValueError("protocol needs a config: nola-vision protocol -c configs/paper/... [-c ...]")
    for config in configs:
        if not Path(config).is_file():
            raise FileNotFoundError(f"config {config} does not exist")
    refuse_controlled_configs(configs)
    refuse_controlled_overrides(overrides)
    name = name if name is not None else "_".join(Path(c).stem for c in configs)  # "" is refused, not replaced
    check_seeds(split_seeds, init_seeds)
    check_knn_k(knn_k)  # without --knn too: a value given is a value meant (a missing --knn, or a typo)
    row = open_row(configs, out=out, name=name, overrides=overrides)
    if knn:  # its settings and images are checked now, not after every fit ran
        open_knn_row(configs, out=out, name=name + "-knn", overrides=overrides, k=knn_k)
    from ..train.cli import command_digest  # loaded by the checks above

    root = row.root
    executor = executor or LocalExecutor(1)
    config_args = [arg for c in configs for arg in ("-c", str(c))]
    grid = [(s, i) for s in split_seeds for i in init_seeds]
    request_runs(root, [run_dir_name(s, i) for s, i in grid])
    labels: Dict[Path, str] = {}
    claims: Dict[Path, int] = {}
    pending: List[Run] = []
    elsewhere = 0
    for n, (split_seed, init_seed) in enumerate(grid, 1):
        run_dir = root / run_dir_name(split_seed, init_seed)
        label = f"[{n}/{len(grid)}] {name} split {split_seed} init {init_seed}"
        done = read_result(run_dir / RESULT_FILE)
        if counted(done):
            if "config_hash" not in done:  # finished after the command that started it was killed (kill -9)
                adopt_result(run_dir)
            if echo:
                foreign = "config_hash" not in done and other_command(done, read_result(run_dir / STAMP_FILE) or {})
                print(f"{label}: {'written by another fit (left out of the tables)' if foreign else 'done already'}, "
                      "skipped", flush=True)
            continue
        claim = claim_unfinished_run(run_dir)
        if claim is None:  # another process runs it (or has just finished it)
            if not result_counts(run_dir):
                elsewhere += 1
                if echo:
                    print(f"{label}: running in another process, skipped", flush=True)
            continue
        claims[run_dir] = claim
        # what this command stamps on the result once the fit ends, for a later command should this one die first
        command = fit_command(python, config_args, run_dir, split_seed, init_seed, overrides)
        stamp_claimed_run(run_dir, {"config_hash": row.key["config_hash"], "data": row.images,
                                    "command_sha256": command_digest(command[3:])})
        labels[run_dir] = label
        pending.append(Run(command, run_dir / "log.txt", claim, run_dir / JOB_LOCK_FILE,
                           partial(result_counts, run_dir)))
    failed: List[str] = []
    # a run failed on its configuration (refused) or its training diverged: re-running the same command fails alike
    refused = diverged = False
    ended: Set[Path] = set()
    results = executor.run(pending)
    try:
        for run, code, wall in results:
            ended.add(run.log.parent)
            run_dir, label = run.log.parent, labels[run.log.parent]
            result = finished_result(run_dir, code)
            if result is None:
                why = failure(code, run.log) if code != 0 else "no finite test accuracy"
                refused = refused or code == CONFIG_EXIT or why.startswith(NOT_STARTED)
                diverged = diverged or code == DIVERGED_EXIT
                failed.append(f"{run_dir} ({why}; see {run.log})")
                if echo:
                    print(f"{label}: FAILED ({why}), log: {run.log}", flush=True)
                if code == CONFIG_EXIT and len(ended) < len(pending):  # the rest share its settings: refused alike
                    start_no_more(results)
                    failed.append(_not_started(name, [r.log.parent for r in pending if r.log.parent not in ended]))
                    break
                continue
            # the wall time of the whole run, process start-up included, the settings it was made with and (where fit
            # does not record them) the images it read
            recorded = row.recorded()
            result.update(wall_s=wall, config_hash=recorded["config_hash"])
            result.setdefault("data", recorded["data"])
            changes = image_changes(row.images, result["data"])
            if changes:
                warn_user(f"nola_vision: the images changed while {name} ran ({'; '.join(changes)}): {run_dir} is "
                          "recorded with the images as they are now, and the tables average it with no run of the "
                          "others. Restore the images and delete it to redo it, or start a row of its own")
            write_json_atomic(run_dir / RESULT_FILE, result)
            write_tables(out)
            if echo:
                print(f"{label}: test acc {100 * result['metrics']['test/acc']:.2f}% ({wall:.0f} s)", flush=True)
    finally:
        for claim in claims.values():
            os.close(claim)
    knn_error: Optional[Exception] = None
    if knn:
        try:
            run_knn(configs, out=out, name=name + "-knn", split_seeds=split_seeds, overrides=overrides, k=knn_k,
                    echo=echo)
        except Exception as err:  # re-raised below, with the fits' failures when there are any
            knn_error = err
    rows = write_tables(out)
    if elsewhere and echo:
        print(f"{name}: {elsewhere} of its {len(grid)} runs run in another process, so the tables leave them out "
              f"until they end (that process adds them; if it was killed, run this command again once they end, "
              f"which adds them): {Path(out) / 'results.md'}", flush=True)
    if failed:
        retry = ("fix what the errors name, then re-run the same command" if refused else
                 "a diverged run diverges again as it is: lower model.lr (or add warm-up epochs), under another "
                 "--name" if diverged else "re-run the same command to retry them")
        also = f"\nthe k-NN baseline failed too: {error_text(knn_error)}" if knn_error is not None else ""
        raise RuntimeError(f"runs failed ({retry}):\n  " + "\n  ".join(failed) + also) from knn_error
    if knn_error is not None:
        raise knn_error
    return rows


def _not_started(name: str, rest: List[Path]) -> str:
    """The failure line for the runs of a row left when one was refused: those it never started, and those already
    running that finished meanwhile (a later command stamps and counts them, as after a killed command)."""
    finished = sum(result_counts(run_dir) for run_dir in rest)
    counted_later = f"{finished} runs of {name} already running finished meanwhile: re-running the command counts them"
    if finished == len(rest):
        return counted_later
    line = f"{len(rest) - finished} more runs of {name} not started, as they would be refused alike"
    return f"{line} ({counted_later})" if finished else line


def check_knn_k(k: int) -> None:
    """Refuse a ``k`` that is not a positive integer, before anything runs."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"--knn_k must be a positive integer (neighbours of the k-NN baseline), got {k!r}")


# what the k-NN pass sets in each split's model: a linear probe's backbone (the head is never trained), unquantised
KNN_MODEL = ("--model.adapter", "linear", "--model.quant_bits", "null")


def open_knn_row(configs: Sequence[str], *, out: str, name: str, overrides: Sequence[str] = (),
                 k: int = 1) -> Row:
    """Set up the k-NN row ``<out>/<name>`` before any of its splits, as protocol sets up each row
    (``open_row``): keyed by the configs, the overrides without trainer options and ``k``; refused when its
    splits were made with other settings or on other images, or when the settings would give every split seed the
    same split (a split manifest, ``CONTROLLED``)."""
    check_knn_k(k)
    for config in configs:
        if not Path(config).is_file():
            raise FileNotFoundError(f"config {config} does not exist")
    kept = _drop_trainer_args(overrides)
    refuse_controlled_configs(configs, prog="the k-NN baseline")
    refuse_controlled_overrides(kept, prog="the k-NN baseline")
    return open_row(configs, out=out, name=name, overrides=[*kept, f"--knn_k={k}"], run_overrides=[*kept, *KNN_MODEL])


def run_knn(configs: Sequence[str], *, out: str, name: str, split_seeds: Sequence[int],
            overrides: Sequence[str] = (), k: int = 1, echo: bool = True) -> None:
    """The paper's nearest-neighbour baseline: k-NN on frozen backbone features, one result per split seed.

    The row is set up as protocol's rows are (``open_knn_row``, before any split) and each split is claimed as
    protocol claims a fit (``claim_unfinished_run``): finished splits are skipped, and one that another process
    computes now is left to it. Each result records the key the row records and the images it was made on."""
    from torch.utils.data import DataLoader

    from ..data import FewShotSubset
    from ..train.cli import run_lightning_cli

    row = open_knn_row(configs, out=out, name=name, overrides=overrides, k=k)
    request_runs(row.root, [f"split{split_seed}" for split_seed in split_seeds])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    test_cache: Optional[Tuple[Tensor, Tensor]] = None
    for split_seed in split_seeds:
        run_dir = row.root / f"split{split_seed}"
        claim = claim_unfinished_run(run_dir)
        if claim is None:  # finished, or another process computes it now
            if echo and not result_counts(run_dir):
                print(f"{name} split {split_seed}: running in another process, skipped", flush=True)
            continue
        try:
            start = time.monotonic()
            args = [a for c in configs for a in ("-c", str(c))] + list(_drop_trainer_args(overrides)) + [
                "--data.split_seed", str(split_seed), *KNN_MODEL]
            with warnings.catch_warnings():  # LightningCLI warns when args are given while sys.argv holds others
                warnings.simplefilter("ignore", UserWarning)
                cli = run_lightning_cli(args, run=False)
            dm, model = cli.datamodule, cli.model.model.to(device)
            dm.setup("fit")
            train = FewShotSubset(dm.train_set.dataset, dm.train_set.indices, dm.eval_transform)
            train_feats, train_labels = extract_features(
                model, DataLoader(train, batch_size=dm.eval_batch_size, num_workers=dm.num_workers), device)
            if test_cache is None:
                test_cache = extract_features(model, dm.test_dataloader(), device)
            test_feats, test_labels = test_cache
            pred = knn_predict(train_feats.to(device), train_labels.to(device), test_feats.to(device), k,
                               dm.num_classes)
            used = neighbours_used(k, len(train_labels))  # the classifier that ran, which the table row names
            acc = (pred.cpu() == test_labels).float().mean().item()
            hp = cli.model.hparams
            write_json_atomic(run_dir / RESULT_FILE, {
                "metrics": {"test/acc": acc},
                "parameter_counts": {"adapter": 0, "head": 0, "trainable": 0},
                "config": {"method": f"knn (k={used})", "backbone": hp.backbone, "dataset": dm.dataset_name,
                           "shots": dm.shots, "split_seed": split_seed, "seed": "",
                           "precision": "32-true"},  # extract_features runs in float32, without autocast
                "epochs": 0, "wall_s": round(time.monotonic() - start, 1), **_unchanged(row, name),
            })
            if echo:
                print(f"{name} split {split_seed}: {used}-NN test acc {100 * acc:.2f}%", flush=True)
        finally:
            os.close(claim)


def _unchanged(row: Row, name: str) -> Dict[str, Any]:
    """``row.recorded()`` of a k-NN run, whose test features were read once for every split: a change of the images
    since the row was opened is refused (the features may be of either)."""
    recorded = row.recorded()
    changes = image_changes(row.images, recorded["data"])
    if changes:
        raise RuntimeError(f"the images changed while the k-NN row {name} ran ({'; '.join(changes)}), and its test "
                           "features were read once for every split: run the command again once they stay as they are")
    return recorded


def _drop_trainer_args(overrides: Sequence[str]) -> List[str]:
    """Overrides without ``--trainer.*``/``--seed_everything``: the k-NN pass builds no trainer state that matters."""
    kept, skip = [], False
    for arg in overrides:
        if skip:
            skip = False
            continue
        if arg.startswith(("--trainer.", "--seed_everything")):
            skip = "=" not in arg
            continue
        kept.append(arg)
    return kept


def error_text(err: BaseException) -> str:
    """The one line a failed ``protocol`` or ``tune`` prints: an OSError as ``fit`` prints it (its file, and for want
    of room the cause and fix), any other error its message."""
    if not isinstance(err, OSError):
        return str(err)
    from ..train.cli import error_message

    return error_message(err)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nola-vision protocol",
        description="Run split seeds x init seeds of a config (each run in its own process and folder, finished "
                    "runs skipped; --jobs N at once, or on SLURM with --executor slurm) and write results.csv plus "
                    "a mean (population std) table to results.md. "
                    "Unknown arguments are passed to every `nola-vision fit` run, e.g. --trainer.max_epochs 5.")
    parser.add_argument("-c", "--config", action="append", required=True, help="YAML config; repeat to compose")
    parser.add_argument("--out", default="runs/protocol", help="output folder holding every protocol of a table")
    parser.add_argument("--name", default=None, help="name of this protocol's row (default: config file stems)")
    parser.add_argument("--split_seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--init_seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--knn", action="store_true", help="also run the k-NN baseline on frozen features")
    parser.add_argument("--knn_k", type=int, default=1, help="neighbours of the k-NN baseline")
    add_executor_arguments(parser)
    args, overrides = parser.parse_known_args(argv)
    try:
        with stop_runs_on_signals():
            name = args.name if args.name is not None else "_".join(Path(c).stem for c in args.config)
            executor = build_executor(args, Path(args.out) / name / "submitit")
            run_protocol(args.config, out=args.out, name=name, split_seeds=args.split_seeds,
                         init_seeds=args.init_seeds, overrides=overrides, knn=args.knn, knn_k=args.knn_k,
                         executor=executor)
    except (RuntimeError, ValueError, OSError) as err:  # OSError: a write failed (a full disk, a folder's permissions)
        print(f"nola-vision protocol: error: {error_text(err)}", file=sys.stderr)
        return CONFIG_EXIT if isinstance(err, (ValueError, FileNotFoundError)) else 1  # refused, as fit's; else failed
    print((Path(args.out) / "results.md").read_text(encoding="utf-8", errors="surrogateescape"))
    return 0
