"""The results store of protocol and tune runs: what a finished run wrote, whether it counts, and the tables.

A run counts only once its ``result.json`` exists with finite metrics and status ok. A row (``<out>/<name>``) is
keyed by its settings (``config.json``: the config files' content, the overrides without seeds and paths, and the
content of every file they name: a group, subclass or nested config file, found recursively, or a weights file),
so runs with other settings are never averaged into one row; the tables refuse to average runs of one row whose
results record different settings or images (each result's ``data``: digests of the train and test images, so a
data folder that changed between runs is caught). ``requested.json`` lists every run a command asked the row for, so
the tables can flag a mean over fewer runs (failed, or still running).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import shutil
import statistics
import unicodedata
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import yaml

from ..core.checks import is_finite_number
from ..core.storage import (
    check_writer_lock,
    file_in_the_way,
    spreadsheet_safe,
    try_lock,
    write_json_atomic,
    write_set_atomic,
    writer_lock,
)
from ..core.warn import warn_user

__all__ = ["CONFIG_FILE", "CSV_FIELDS", "JOB_LOCK_FILE", "MAX_SEED", "RESULT_FILE", "ROW_SETTINGS", "RUN_ARGS",
           "RUN_FOLDER", "STAMP_FILE", "adopt_result", "check_row_data", "check_seeds", "check_tables_ours",
           "claim_row", "claim_run", "claim_unfinished_run", "claimed_elsewhere", "collect_results",
           "config_file_options", "config_key", "counted", "data_digests", "discard_result", "effective_overrides",
           "finished_result", "first_line", "image_changes", "mixed_settings", "other_command", "override_changes",
           "parse_overrides", "read_result", "referenced_files", "refuse_foreign_file", "request_runs",
           "requested_runs", "result_counts", "retire_unfinished_run", "row_folder", "run_seeds_mismatch",
           "same_settings", "stamp_claimed_run", "summarise", "write_tables"]

RESULT_FILE = "result.json"
TABLES_LOCK = "results"  # writer_lock(<out>/results): .results.lock, held while the tables are rebuilt
CONFIG_FILE = "config.json"
# The field of a row's config.json listing the hashes of earlier records of its settings, which its runs may carry
EARLIER_HASHES = "earlier_config_hashes"
REQUESTED_FILE = "requested.json"
STAMP_FILE = ".stamp.json"  # in a run folder: what the command that started its fit stamps on its result
JOB_LOCK_FILE = ".job"  # in a run folder: locked by the cluster job that runs its fit (``executors.claimed_job``)
RESULTS_MD_HEADER = ("| run | method | backbone | dataset | shots | adapter params | head params | trained params "
                     "| runs | top-1 % mean (std) |")  # results.md's first line
RESULTS_MD_MARK = "| run | method | "  # how every version's results.md began: what the tables know theirs by
CSV_FIELDS = ["name", "method", "backbone", "dataset", "shots", "split_seed", "init_seed", "test_acc",
              "adapter_params", "head_params", "trainable_params", "epochs", "wall_s", "run_dir", "train_images",
              "test_images", "precision"]
# set per run by the runner, or only where outputs go: they do not change what a row measures
RUN_ARGS = ("--seed_everything", "--data.split_seed", "--trainer.default_root_dir", "--data.split_dir",
            "--result_file", "--trainer.enable_progress_bar", "--test_after_fit")
MAX_SEED = 2**32 - 1  # seed_everything's (numpy's) largest seed; the smallest is 0



def parse_overrides(overrides: Sequence[str]) -> List[Tuple[str, Optional[str]]]:
    """``--key value`` and ``--key=value`` as ``(key, value)`` pairs, in order (a flag alone has value None); a short
    option with its value attached (``-cx.yaml``, ``-c=x.yaml``, as fit takes them) is ``("-c", "x.yaml")``."""
    pairs: List[Tuple[str, Optional[str]]] = []
    args = list(overrides)
    i = 0
    while i < len(args):
        arg = args[i]
        if "=" in arg and arg.startswith("--"):
            key, value = arg.split("=", 1)
            pairs.append((key, value))
        elif len(arg) > 2 and arg[0] == "-" and arg[1] not in "-.0123456789":
            pairs.append((arg[:2], arg[2:].removeprefix("=")))
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            pairs.append((arg, args[i + 1]))
            i += 1
        else:
            pairs.append((arg, None))
        i += 1
    return pairs


def config_key(configs: Sequence[str], overrides: Sequence[str]) -> Dict[str, Any]:
    """What a protocol row measures: the composed config files' content, the overrides without seeds and paths, and
    the content of every file they name (``referenced_files``), with a short hash. Rows are keyed by it so runs with
    other settings never share a mean.

    The hash of settings that name no file is the one of earlier versions (``config.json`` rows keep matching);
    ``files`` (path as fit opens it: sha256 prefix) is there only when some file is named."""
    contents = [_config_text(c) for c in configs]
    pairs = [(k, v) for k, v in parse_overrides(overrides) if k not in RUN_ARGS]
    settings = [f"{k}={v}" if v is not None else k for k, v in pairs]
    named = [(k, v) for k, v in pairs if v is not None]
    files = referenced_files(configs, [v for _, v in named], contents, [k for k, _ in named])
    # a named file counts by its content (its path is in the text that names it); the list keeps their order
    digest = hashlib.sha256(json.dumps({"configs": contents, "overrides": settings,
                                        **({"files": list(files.values())} if files else {})}
                                       ).encode()).hexdigest()[:16]
    return {"config_hash": digest, "configs": [str(c) for c in configs],
            "config_sha256": [hashlib.sha256(c.encode()).hexdigest()[:16] for c in contents], "overrides": settings,
            **({"files": {path: sha[:16] for path, sha in files.items()}} if files else {})}


def _config_text(config: str) -> str:
    try:
        return Path(config).read_text(encoding="utf-8")  # YAML's encoding, whatever the locale's: the same hash
    except UnicodeDecodeError as err:
        raise ValueError(f"config {config} is not a text (YAML) file: {err}") from None


# A file of at most this size without a NUL byte (a weights file has them) is read as YAML for the files it names.
_SETTINGS_FILE_MAX = 1 << 20
_CHUNK = 1 << 20


def referenced_files(configs: Sequence[str], values: Sequence[str],
                     contents: Optional[Sequence[str]] = None,
                     options: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """Every file the composed settings name, as ``{path: sha256 of its bytes}`` in the order found, each resolved as
    fit resolves it: in a ``-c`` config (or a file it names), a value of an option from which fit's parser loads a
    settings file (a group, ``data: data.yaml``; a subclass, ``model: {adapter: nola.yaml}``; ``config: base.yaml``:
    ``config_file_options``) relative to the naming file's folder, and any other path relative to the working
    directory, where fit opens it (``pretrained_file: w.safetensors``); an override value (or a string in an inline
    YAML override, ``--model '{adapter: a.yaml}'``) relative to the working directory; and, recursively, the same in
    each settings file named. Files are hashed in chunks, never decoded: a weights file counts by its bytes.
    ``contents``: the configs' text, when already read; ``options``: the override option of each value
    (``--model.adapter``), for the files its settings name."""
    found: Dict[str, str] = {}
    seen = {os.path.realpath(c) for c in configs}  # their text is in the key already

    def visit(path: Path, loadable: bool, option: str) -> None:
        real = os.path.realpath(path)
        if real in seen:
            return
        seen.add(real)
        try:
            digest, data = _file_digest(path, keep=loadable)
        except OSError as err:
            raise ValueError(f"cannot read {path}, a file the config or an override names: {err}") from None
        found[str(path)] = digest
        content = _yaml(data) if data is not None else None
        if isinstance(content, (dict, list)):  # settings (jsonargparse loads them from there): what they name counts
            walk(content, path.parent, config_file_options().get(option, option))

    def walk(node: Any, folder: Optional[Path], option: str) -> None:
        """``folder``: that of the file holding ``node``, None on the command line (the working directory);
        ``option``: the dotted fit option ``node`` sets ("" for a whole config)."""
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, folder, f"{option}.{key}" if option else str(key))
        elif isinstance(node, list):
            for value in node:
                walk(value, folder, option)
        elif isinstance(node, str):
            name(node, folder, option)

    def name(text: str, folder: Optional[Path], option: str) -> None:
        if folder is None:
            candidates = [(Path(text), True)]
        elif not (_is_file(folder / text) or _is_file(Path(text))):
            candidates = []  # names no file (most values): fit's parser need not be asked
        elif option in config_file_options():  # a settings file: jsonargparse looks in the naming file's folder first
            candidates = [(folder / text, True), (Path(text), True)]
        else:
            candidates = [(Path(text), False)]  # fit opens any other path from the working directory
        for path, loadable in candidates:
            if _is_file(path):
                visit(path, loadable, option)
                return
        if text.lstrip()[:1] in ("{", "["):  # a group given inline: the files it names
            walk(_yaml(text), folder, option)

    try:
        for config, text in zip(configs, contents if contents is not None else map(_config_text, configs)):
            walk(_yaml(text), Path(config).parent, "")
        for value, option in zip(values, options if options is not None else [""] * len(values)):
            name(value, None, _option_name(option))
    except RecursionError:
        raise ValueError("a config or an override nests too deeply (or its files name each other in a loop too "
                         "deep to follow); flatten it") from None
    return found


def _option_name(option: str) -> str:
    """An override's dotted fit option as settings files name it: ``--model.init_args.adapter`` is ``model.adapter``,
    and ``-c`` is ``config``."""
    name = option.lstrip("-").replace(".init_args.", ".")
    return "config" if option == "-c" else name


def config_file_options() -> Dict[str, str]:
    """The fit options whose string value fit's parser loads as a settings file, read relative to the folder of the
    file that gives it, each with the option the loaded file's keys belong to (``train.cli.settings_file_options``)."""
    from ..train.cli import settings_file_options

    return settings_file_options()


def _is_file(path: Path) -> bool:
    try:
        return len(str(path)) < 4096 and "\n" not in str(path) and path.is_file()
    except (OSError, ValueError):  # a name too long, or with a NUL
        return False


def _file_digest(path: Path, keep: bool) -> Tuple[str, Optional[bytes]]:
    """The sha256 of a file's bytes, read in chunks, and with ``keep`` its bytes when it may hold settings (small, no
    NUL byte)."""
    digest = hashlib.sha256()
    kept: Optional[bytearray] = bytearray() if keep else None
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
            if kept is not None:
                kept = None if len(kept) + len(chunk) > _SETTINGS_FILE_MAX or b"\0" in chunk else kept + chunk
    return digest.hexdigest(), bytes(kept) if kept is not None else None


def _yaml(data: Any) -> Any:
    """The YAML (or JSON) document in ``data`` (bytes or text), or None when it holds none."""
    try:
        return yaml.safe_load(data)
    except (ValueError, yaml.YAMLError, RecursionError):
        return None


def _recorded_by_earlier_key(old: Dict[str, Any], key: Dict[str, Any]) -> bool:
    """Whether ``old`` (a row's ``config.json`` from before named files counted by their bytes) recorded the settings
    of ``key``: its hash is the earlier one of these settings (which held an override file's text) and ``key`` names
    no file that the earlier key did not cover (one a config names, or one an override file names)."""
    values = [setting.split("=", 1)[1] for setting in key["overrides"] if "=" in setting]
    try:
        contents = [Path(c).read_text(encoding="utf-8") for c in key["configs"]]
        override_files = {v: Path(v).read_text(encoding="utf-8") for v in values if _is_file(Path(v))}
    except (OSError, UnicodeDecodeError):  # the earlier key could not have been made of these
        return False
    if set(key.get("files", {})) != {str(Path(v)) for v in override_files}:
        return False
    earlier = {"configs": contents, "overrides": key["overrides"],
               **({"override_files": override_files} if override_files else {})}
    return old.get("config_hash") == hashlib.sha256(json.dumps(earlier).encode()).hexdigest()[:16]


def row_folder(out: str, name: str) -> Path:
    """``<out>/<name>``, made: a row's name is one folder name (the tables read ``<out>/<name>/<run>/result.json``),
    not one that looks like another row's (``_refuse_row_name_alike``)."""
    if (not name or name in (".", "..") or any(c in name for c in "/\\|") or name != name.strip()
            or not name.isprintable()):
        raise ValueError(f"--name {name!r}: a row name is one folder name (no '/', '\\' or '|' (the table's column "
                         "separator), not '.' or '..', no leading or trailing spaces, no line breaks, tabs or other "
                         "control characters, which would break the table's row)")
    if name in _TABLES or name.startswith("."):  # the fits would run, then every table of --out fail on the folder
        raise ValueError(f"--name {name!r}: {Path(out) / name} is where --out keeps its "
                         f"{'tables' if name in _TABLES else 'hidden files (the tables lock .results.lock)'}, not a "
                         "row: choose a name that is not results.csv or results.md and does not start with '.'")
    _refuse_row_name_alike(Path(out), name)
    root = Path(out) / name
    blocking = file_in_the_way(root)
    if blocking is not None:
        raise ValueError(f"{blocking} is a file, so the runs cannot go under {root}: choose another --out or --name")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _refuse_row_name_alike(out: Path, name: str) -> None:
    """Refuse a new row ``name`` that differs from a row folder of ``out`` only in Unicode normalization (NFC/NFD):
    the table would show two rows that look alike. A row's own name, spelled as its folder is, passes."""
    try:
        folders = [entry.name for entry in os.scandir(out) if entry.is_dir()]
    except OSError:  # no --out yet (a file in the way is named by row_folder)
        return
    if name in folders:
        return
    form = unicodedata.normalize("NFC", name)
    alike = next((folder for folder in folders if unicodedata.normalize("NFC", folder) == form), None)
    if alike is not None:
        raise ValueError(f"--name {ascii(name)}: {out} holds the row {ascii(alike)}, whose name differs only in "
                         "Unicode normalization (NFC/NFD: macOS writes an accented letter as the letter and a "
                         "combining accent, most other systems as one code point). They look alike but would be two "
                         "rows of the table: reuse the existing row's name as its folder spells it (copy the folder's "
                         "name), or pass another --name")


def retire_unfinished_run(run_dir: Path) -> None:
    """Before a run folder's fit is redone from its start: drop what a logger-less fit which died there wrote at its
    root (its ``config.yaml``, checkpoints and exported adapter, of a run that recorded no result), which would
    otherwise make the retry refuse the folder as another run's, or mix the two runs' checkpoints."""
    (run_dir / "config.yaml").unlink(missing_ok=True)
    for folder in ("checkpoints", "adapter"):
        shutil.rmtree(run_dir / folder, ignore_errors=True)


def claim_run(run_dir: Path) -> Optional[int]:
    """An exclusive lock on ``<run_dir>/.claim``, held by this process until the returned descriptor is closed; None
    when another process holds it (it runs that fit now): two protocol commands on one row never run a fit twice.
    Where no lock can be taken (Windows), nothing is locked."""
    blocking = file_in_the_way(run_dir)
    if blocking is not None:  # mkdir said only "[Errno 17] File exists"
        raise NotADirectoryError(f"{blocking} is a file, so the run folder {run_dir} cannot be made: move the file "
                                 "away and run the same command again")
    run_dir.mkdir(parents=True, exist_ok=True)
    return try_lock(run_dir / ".claim")


def claimed_elsewhere(run_dir: Path) -> bool:
    """Whether another process holds ``run_dir``'s claim: its fit runs there, or has written a result whose fit's exit
    code is still to judge it (a fit that fails after writing it never counts)."""
    claim = claim_run(run_dir)
    if claim is None:
        return True
    os.close(claim)
    return False


def claim_unfinished_run(run_dir: Path, metric: str = "test/acc") -> Optional[int]:
    """Claim ``run_dir`` for a new fit (``claim_run``), unless its result counts (``metric``): the claim's descriptor,
    with the folder ready for the fit (a result that does not count moved aside, never mistaken for a finished run,
    and a dead fit's leftovers retired), or None when its result counts or another process holds the claim (runs
    its fit now). The one path by which ``protocol`` and ``tune`` start a fit in a run folder."""
    if result_counts(run_dir, metric):
        return None
    claim = claim_run(run_dir)
    if claim is None:
        return None
    # finished by another process meanwhile, or a cluster job runs its fit (one that a killed command submitted)
    if result_counts(run_dir, metric) or _job_running(run_dir):
        os.close(claim)
        return None
    discard_result(run_dir / RESULT_FILE)
    retire_unfinished_run(run_dir)
    return claim


def _job_running(run_dir: Path) -> bool:
    """Whether a cluster job holds ``run_dir``'s job lock: its command's claim is not passed to another node, so a job
    outlives a command that was killed, and its fit goes on there."""
    if not (run_dir / JOB_LOCK_FILE).exists():  # local fits never take it: no file in their folders
        return False
    lock = try_lock(run_dir / JOB_LOCK_FILE)
    if lock is None:
        return True
    os.close(lock)
    return False


def result_counts(run_dir: Path, metric: str = "test/acc") -> bool:
    """Whether ``run_dir`` holds a result that counts (``metric`` finite): a finished fit, never to be run again."""
    return counted(read_result(run_dir / RESULT_FILE), metric)


def stamp_claimed_run(run_dir: Path, stamp: Dict[str, Any]) -> None:
    """Record in ``run_dir`` what the command that claimed it stamps on its fit's result once the fit ends (the row's
    settings hash, the images it is made on): a result the fit writes after that command died is stamped from it
    (``adopt_result``), never from what a later command finds."""
    write_json_atomic(run_dir / STAMP_FILE, stamp)


def adopt_result(run_dir: Path, metric: str = "test/acc") -> None:
    """Stamp a counted result that its fit wrote after the command that started it died (``kill -9``) with what that
    command recorded (``stamp_claimed_run``), under the run's claim: while another process holds it, that process
    stamps (or discards, when its fit exited non-zero) the result itself. A field the stamp leaves unknown stays
    unknown, and a result another command wrote (``other_command``) is never stamped."""
    claim = claim_run(run_dir)
    if claim is None:
        return
    try:
        result, stamp = read_result(run_dir / RESULT_FILE), read_result(run_dir / STAMP_FILE) or {}
        missing = {key: value for key, value in stamp.items() if value is not None and key not in (result or {})}
        if counted(result, metric) and missing and not other_command(result, stamp):
            write_json_atomic(run_dir / RESULT_FILE, {**result, **missing})
    finally:
        os.close(claim)


def other_command(result: Optional[Dict[str, Any]], stamp: Dict[str, Any]) -> bool:
    """Whether ``result`` was written by a fit with other arguments than the one its run's stamp records (a resume or
    a re-run by hand, maybe with other settings): by their ``command_sha256``, where both record one."""
    written, started = (result or {}).get("command_sha256"), stamp.get("command_sha256")
    return written is not None and started is not None and written != started


def finished_result(run_dir: Path, code: int, metric: str = "test/acc") -> Optional[Dict[str, Any]]:
    """The result that the fit which exited with ``code`` left in ``run_dir``, when it counts (``metric``); else None,
    with the result moved aside (``discard_result``): a fit that failed after writing it (``code`` != 0) never
    counts, in this command or in a later one that finds the file."""
    result = read_result(run_dir / RESULT_FILE)
    if code == 0 and counted(result, metric):
        return result
    discard_result(run_dir / RESULT_FILE)
    return None


def request_runs(root: Path, runs: Sequence[str]) -> None:
    """Add ``runs`` (run folder names) to the row's ``requested.json``: what its commands asked for, so far.

    Two commands on one row take turns (``writer_lock``), so neither loses the other's runs."""
    root.mkdir(parents=True, exist_ok=True)
    with writer_lock(root / REQUESTED_FILE):
        before, readable = _requested(root)
        if not set(runs) <= before or not readable:
            write_json_atomic(root / REQUESTED_FILE, sorted(before | set(runs)))


def requested_runs(root: Path) -> Set[str]:
    """The run folder names that commands asked the row ``root`` for (empty for rows written before this record)."""
    return _requested(root)[0]


def _requested(root: Path) -> Tuple[Set[str], bool]:
    """``requested_runs``, and whether its file was readable. A damaged one (cut short, edited) is named, and the
    row's run folders stand in for it (a failed run keeps its folder), so the tables still count the runs that
    failed; the next command on the row writes it again."""
    path = root / REQUESTED_FILE
    try:
        names = json.loads(path.read_bytes())
    except FileNotFoundError:
        return set(), True
    except (OSError, ValueError) as error:
        names = error
    if isinstance(names, list) and all(isinstance(name, str) for name in names):
        return set(names), True
    folders = {entry.name for entry in root.iterdir() if entry.is_dir() and RUN_FOLDER.fullmatch(entry.name)}
    why = f"{type(names).__name__}: {names}" if isinstance(names, Exception) else "not a list of run folder names"
    warn_user(f"nola_vision: {path} cannot be read as the list of runs asked for ({why}): the row's run folders "
              f"stand in for it ({len(folders)}), and the next command on the row writes it again")
    return folders, False


def check_seeds(split_seeds: Sequence[int], init_seeds: Sequence[int], option_prefix: str = "") -> None:
    """Refuse empty or repeated seeds (a repeated one would run, and count, the same run twice) and an init seed that
    ``seed_everything`` refuses, which would fail every run of it. A split seed only orders a hash: any integer.
    ``option_prefix``: of the options named (tune's ``protocol_``)."""
    for option, seeds in ((f"{option_prefix}split_seeds", split_seeds), (f"{option_prefix}init_seeds", init_seeds)):
        if not seeds:
            raise ValueError(f"--{option} is empty: give at least one seed")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"--{option} {list(seeds)} repeats a seed: each (split, init) run is made once")
    for seed in init_seeds:
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"--{option_prefix}init_seeds {seed} is out of range: an init seed is each run's "
                             f"seed_everything, which takes 0 to {MAX_SEED} (2**32-1)")


def data_digests(dataset: str, root: str, splits: Sequence[str] = ("train", "test")) -> Optional[Dict[str, str]]:
    """What a run of ``dataset`` under ``root`` reads now: ``{"train": ..., "test": ...}`` (each of ``splits``; tune's
    selection reads only ``("train",)``), sha256 prefixes of each split's sorted ``key label size`` lines (an in-memory
    split: its pixels and labels), so runs made before and after the images changed are told apart. None when the
    data cannot be read here (not downloaded yet)."""
    from ..data import build_dataset

    try:
        return {split: _images_digest(build_dataset(dataset, root, split)) for split in splits}
    except (OSError, ValueError):
        return None


def _images_digest(dataset: Any) -> str:
    """sha256 prefix of one split's images: file keys, labels and sizes (a stat, never a decode), or the pixels."""
    from ..data.fewshot import composed_name

    digest = hashlib.sha256()
    images = getattr(dataset, "images", None)
    if images is not None:  # array-backed (CIFAR, digits): keys are positions, the pixels are the content
        import numpy as np

        digest.update(np.ascontiguousarray(images).data)
        digest.update(json.dumps(dataset.targets).encode())
    else:
        # keys in their composed form: a macOS copy of the folder (NFD names) holds the same images
        lines = (f"{composed_name(key)} {label} {_file_size(dataset, key)}" for key, label in dataset.samples)
        for line in sorted(lines):
            digest.update(line.encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()[:16]


def _file_size(dataset: Any, key: str) -> int:
    """The size of sample ``key``'s file, -1 when it cannot be read (fit reports that itself)."""
    try:
        return dataset.path_of(key).stat().st_size
    except OSError:
        return -1


def image_changes(recorded: Any, digests: Optional[Dict[str, str]]) -> List[str]:
    """How the images ``recorded`` (a result's or a study's ``data``) differ from ``digests`` (``data_digests``), split
    by split; none where either is unknown."""
    if not isinstance(recorded, dict) or digests is None:
        return []
    return [f"{split} images {recorded[split]} -> {digest}" for split, digest in digests.items()
            if recorded.get(split) not in (None, digest)]


def check_row_data(root: Path, digests: Dict[str, str], data: str, redo: Optional[str] = None) -> None:
    """Refuse to add runs to the row ``root`` when its finished runs recorded other images than ``data`` (the
    dataset and root, for the message) holds now: the row would average runs on two data sets, as it would runs of
    two config files (``claim_row``). ``redo``: how to redo the row (default: delete ``root``)."""
    for path in sorted(root.glob(f"*/{RESULT_FILE}")):
        result = read_result(path)
        recorded = result.get("data") if RUN_FOLDER.fullmatch(path.parent.name) and counted(result) else None
        if not isinstance(recorded, dict):
            continue
        changed = image_changes(recorded, digests)
        if changed:
            raise ValueError(f"{path.parent} was made on other images than {data} holds now ({'; '.join(changed)}); "
                             f"their results would be averaged into one row. Restore the data as it was, pass another "
                             f"--name for a separate row, or {redo or _redo(root)}")


def claim_row(root: Path, key: Dict[str, Any], redo: Optional[str] = None) -> Dict[str, Any]:
    """Record the row's settings in ``<root>/config.json``, or refuse when its runs were made with others; returns the
    key the row records (``key``, or the one recorded for the same settings: ``same_settings``), whose hash its
    results carry. Two commands starting on one row take turns (``writer_lock``): the second compares its settings
    with those the first recorded, never records its own over them. ``redo``: how a refusal says to redo the row
    (default: delete ``root``)."""
    with writer_lock(root / CONFIG_FILE):
        return _claim_row(root, key, redo or _redo(root))


def _redo(root: Path) -> str:
    return f"delete {root} to redo this one"


def _claim_row(root: Path, key: Dict[str, Any], redo: str) -> Dict[str, Any]:
    """``claim_row``'s read, compare and write, under its lock."""
    path = root / CONFIG_FILE
    refuse_foreign_file(path, _is_row_config, "a protocol row's config (a JSON object with its config_hash)",
                        f"Pass another --name for a separate row, or move {path} away.")
    try:
        old = json.loads(path.read_bytes())
    except (OSError, ValueError):
        old = None  # missing or empty (anything else was refused above)
    if old is None:  # older rows have no config.json: their result files carry the hash, or nothing to compare
        hashes = {d.get("config_hash") for d in map(read_result, root.glob(f"*/{RESULT_FILE}")) if d}
        if hashes - {None, key["config_hash"]}:
            raise ValueError(f"{root} holds runs made with other settings than now; pass another --name for a "
                             f"separate row, or {redo}")
        write_json_atomic(path, {**key, EARLIER_HASHES: []})
        return key
    if old.get("config_hash") == key["config_hash"] or same_settings(old, key):
        return old
    if "files" not in old and _recorded_by_earlier_key(old, key):
        # the same settings, recorded before named files counted by their bytes: its runs carry the earlier hash
        write_json_atomic(path, {**key, EARLIER_HASHES: [old["config_hash"], *old.get(EARLIER_HASHES, [])]})
        return key
    diffs = []
    if old.get("config_sha256") != key["config_sha256"]:
        diffs.append(f"config files: before {old.get('configs')} (content {old.get('config_sha256')}), now "
                     f"{key['configs']} (content {key['config_sha256']})")
    before, now = old.get("overrides", []), key["overrides"]
    if effective_overrides(before) != effective_overrides(now):
        diffs.append(override_changes(before, now))
    files_before, files_now = old.get("files", {}), key.get("files", {})
    if files_before != files_now:
        changed = [f"{p} {files_before.get(p, '(not named)')} -> {files_now.get(p, '(not named)')}"
                   for p in dict.fromkeys([*files_before, *files_now]) if files_before.get(p) != files_now.get(p)]
        earlier = (" (this row was recorded before the files its settings name counted, so which content its runs "
                   "read is unknown)" if "files" not in old and not diffs else "")
        diffs.append(f"files the configs or overrides name (content sha256): {'; '.join(changed)}{earlier}")
    raise ValueError(f"{root} holds runs made with other settings ({'; '.join(diffs) or 'see ' + str(path)}); "
                     f"their results would be averaged into one row. Pass another --name for a separate row, "
                     f"or {redo}")


def _row_hashes(root: Path) -> Optional[Set[str]]:
    """The settings hashes a run of the row at ``root`` may carry (its ``config.json``'s, and those it replaced when
    an earlier version's record of the same settings was upgraded), or None where that is not known: no readable
    ``config.json``, or one written before it listed the hashes it replaced."""
    try:
        recorded = json.loads((root / CONFIG_FILE).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(recorded, dict) or not isinstance(recorded.get(EARLIER_HASHES), list):
        return None
    return {str(recorded.get("config_hash")), *map(str, recorded[EARLIER_HASHES])}


def _is_row_config(path: Path) -> bool:
    data = json.loads(path.read_bytes())
    return isinstance(data, dict) and "config_hash" in data


def first_line(path: Path) -> str:
    """The first line of a text file (at most 4096 characters, without its line end); bytes that are not UTF-8 as
    surrogate escapes, as Python holds a file name that is not UTF-8 (so a header naming one compares equal)."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return f.readline(4096).rstrip("\r\n")


def refuse_foreign_file(path: Path, ours: Callable[[Path], bool], what: str, fix: str) -> None:
    """Refuse (ValueError) a ``path`` nola-vision would write over when it is a non-empty file that ``ours`` does not
    recognise as one it wrote (``what``): a user's file of that name would be lost. Missing or empty files pass; so
    does what is no file (a directory: the writers' own checks name it)."""
    try:
        if not path.is_file() or path.stat().st_size == 0:
            return
        mine = ours(path)
    except (OSError, ValueError, RecursionError):
        mine = False
    if not mine:
        raise ValueError(f"{path} exists and is not {what}: nola-vision would replace it, losing its content. {fix}")


def check_tables_ours(out: str) -> None:
    """Refuse (``refuse_foreign_file``) an ``<out>/results.csv`` or ``results.md`` that ``write_tables`` did not
    write: it rebuilds both after every run (and checks each again just before it replaces it); and a lock file of
    the tables it could not take then (``check_writer_lock``), found otherwise only after the first fit."""
    for table in _TABLES:
        _refuse_foreign_table(Path(out) / table)
    check_writer_lock(Path(out) / TABLES_LOCK)


# How each table is known as one write_tables wrote, by its first line; earlier versions' tables had fewer columns.
_TABLES: Dict[str, Callable[[Path], bool]] = {
    "results.csv": lambda path: first_line(path).startswith(",".join(CSV_FIELDS[:3])),
    "results.md": lambda path: first_line(path).startswith(RESULTS_MD_MARK),
}


def _refuse_foreign_table(path: Path) -> None:
    refuse_foreign_file(path, _TABLES[path.name], "a results table nola-vision wrote (its header is not "
                        "nola-vision's)", "Pass another --out, or remove or rename the file (finished runs are kept: "
                        "the same command then writes the tables without running them again).")


def _option_path(key: str) -> Tuple[str, ...]:
    """The option a key sets, as parts: ``--model.adapter.init_args.rank`` is ``(model, adapter, rank)``."""
    return tuple(p for p in key.lstrip("-").split(".") if p not in ("init_args", "class_path", "dict_kwargs"))


def _last_values(settings: Sequence[str]) -> Dict[str, Optional[str]]:
    """Each key's last value (``key=value`` settings; a flag alone has None), in the order of those last values."""
    last: Dict[str, Optional[str]] = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        last.pop(key, None)
        last[key] = value if sep else None
    return last


def effective_overrides(settings: Sequence[str]) -> List[str]:
    """The overrides (``key=value`` settings) as fit applies them, in one canonical form: each key's last value, sorted
    by key. Where one key sets a group or class that another sets part of (``--data`` and ``--data.shots``), a list
    grows (``--trainer.callbacks+=...``) or a config file may set anything, fit's result depends on their order and
    every value, so they stay as given."""
    last = _last_values(settings)
    paths = [_option_path(k) for k in last]
    if any(k.endswith("+") or _option_path(k)[-1:] in (("config",), ("c",), ("print_config",)) for k in last) or any(
            a[:len(b)] == b for i, a in enumerate(paths) for j, b in enumerate(paths) if i != j):
        return list(settings)
    return [k if v is None else f"{k}={_canonical_float(k, v)}" for k, v in sorted(last.items())]


_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][+-]?\d+)")
# Options whose values are names or paths ("1.5" and "1.50" are two folders), never numbers to compare as such.
_NAMING_OPTION = re.compile(r"root|dir|file|path|name|backbone|dataset|tag|version|ckpt|config", re.IGNORECASE)


def _canonical_float(key: str, value: str) -> str:
    """A float written in one form (``5e-3``, ``0.005`` and ``5.0E-3`` are ``0.005``), which fit parses alike, so a
    rerun that writes a rate another way is the same row; integers, names and paths as given."""
    if _NAMING_OPTION.search(key.rsplit(".", 1)[-1]) or not _FLOAT.fullmatch(value.strip()):
        return value
    return repr(float(value))


def same_settings(old: Dict[str, Any], key: Dict[str, Any]) -> bool:
    """Whether two keys (``config_key``) record the same settings: the configs' content, the named files' content and
    the overrides as fit applies them (``effective_overrides``), so the same overrides given in another order (or with
    a value repeated) are one row, whichever order made its hash."""
    return (old.get("config_sha256") == key["config_sha256"] and old.get("files", {}) == key.get("files", {})
            and effective_overrides(old.get("overrides", [])) == effective_overrides(key["overrides"]))


def override_changes(before: Sequence[str], now: Sequence[str]) -> str:
    """What differs between two lists of overrides (``key=value`` settings), said per key, for a refusal."""
    old, new = _last_values(before), _last_values(now)

    def shown(values: Dict[str, Optional[str]], key: str) -> str:
        return "(not given)" if key not in values else key if values[key] is None else f"{key}={values[key]}"

    changed = [f"{shown(old, k)} -> {shown(new, k)}" for k in sorted(old.keys() | new.keys())
               if k not in old or k not in new or old[k] != new[k]]
    if changed:
        return f"overrides: {'; '.join(changed)}"
    return (f"overrides in another order: before {list(before)}, now {list(now)}; one sets a group or class that "
            "another sets part of, so fit's result depends on their order: give them in the order before")




def counted(data: Optional[Dict[str, Any]], metric: str = "test/acc") -> bool:
    """Whether a result counts: it holds ``metric``, every metric is a finite number (an accuracy one in [0, 1]) and
    its status (if any) is ok. A result that does not count is run again, never summarised."""
    if not data or data.get("status", "ok") != "ok":
        return False
    metrics = data.get("metrics")
    if not (isinstance(metrics, dict) and metric in metrics and all(is_finite_number(v) for v in metrics.values())):
        return False
    return not metric.endswith("/acc") or 0.0 <= metrics[metric] <= 1.0


def discard_result(result: Path) -> None:
    """Move a result that must not count aside (kept for inspection as ``result.json.failed``)."""
    if result.exists():
        result.replace(result.with_name(RESULT_FILE + ".failed"))


def read_result(path: Path) -> Optional[Dict[str, Any]]:
    """A finished run's result, or None (missing, or unreadable: then the run is not counted)."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# The run folders of a row: split<S>-init<I> (fits), split<S> (the k-NN baseline). Other folders (a user's copy,
# split0-init0.bak) are not runs of the row.
# The seeds as runs name their folders (no leading zeros): a copy named split00-init0 is not a second run of (0, 0).
RUN_FOLDER = re.compile(r"split(?P<split>0|-?[1-9]\d*)(-init(?P<init>0|-?[1-9]\d*))?")


def run_seeds_mismatch(path: Path, data: Dict[str, Any]) -> Optional[str]:
    """Why a result (at ``path``) is not its run folder's run, or None: made with a split or init seed that a settings
    file replaced, it would be counted as another run's, one run averaged as two."""
    folder = RUN_FOLDER.fullmatch(path.parent.name)
    cfg = data.get("config") if isinstance(data.get("config"), dict) else {}
    for field, group in (("split_seed", "split"), ("seed", "init")):
        recorded, expected = cfg.get(field), folder.group(group) if folder else None
        if recorded not in (None, "") and expected is not None and str(recorded) != str(int(expected)):
            return (f"{path} records {field} {recorded}, but its folder {path.parent.name} is the run of {group} seed "
                    f"{int(expected)}: it was made with other seeds than its folder's, so it is left out of the "
                    f"tables. Delete {path.parent} to redo the run")
    return None


# The fields of a result the tables read, with the types they take; a field may be absent (older results).
_RESULT_FIELDS = {"config": dict, "parameter_counts": dict, "data": dict, "epochs": (int, float, str),
                  "wall_s": (int, float, str)}


def _foreign_settings(path: Path, data: Dict[str, Any], hashes: Optional[Set[str]]) -> Optional[str]:
    """Why a result (at ``path``) is not a run of its row, or None: it carries a settings hash its row never recorded
    (a run folder copied from another row), so averaging it would mix two rows' settings (``hashes``: the row's)."""
    recorded = data.get("config_hash")
    if recorded is None and other_command(data, read_result(path.parent / STAMP_FILE) or {}):
        return (f"{path} was written by another fit than the one its row's command started in {path.parent} (resumed "
                "or re-run by hand, maybe with other settings), so it is left out of the tables. Delete "
                f"{path.parent} to redo the run with its row's settings")
    if hashes is None or recorded is None or str(recorded) in hashes:
        return None
    return (f"{path} was made with other settings (hash {recorded}) than its row records in "
            f"{path.parent.parent / CONFIG_FILE} ({', '.join(sorted(hashes))}): a run folder of another row, so it is "
            f"left out of the tables. Delete {path.parent} to redo the run")


def _malformed_result(path: Path, data: Dict[str, Any]) -> Optional[str]:
    """Why a counted result (at ``path``) cannot be tabled, or None: a field of another type than fit writes
    (hand-edited, or another tool's), which would stop the tables of every row under ``out``."""
    wrong = [f"{field} is {type(data[field]).__name__}" for field, kind in _RESULT_FIELDS.items()
             if data.get(field) is not None and not isinstance(data[field], kind)]
    counts = data.get("parameter_counts") if isinstance(data.get("parameter_counts"), dict) else {}
    wrong += [f"parameter_counts.{key} is {value!r}" for key, value in counts.items()
              if key in ("adapter", "head", "trainable") and (type(value) is not int or value < 0)]
    if not wrong:
        return None
    return (f"{path} is not a result fit writes ({'; '.join(wrong)}), so it is left out of the tables. Delete "
            f"{path.parent} to redo the run")


def collect_results(out: str) -> List[Dict[str, Any]]:
    """One row per finished run under ``out``: runs without a ``result.json``, with a non-finite metric or with a
    status other than ok, and folders not named as runs (``RUN_FOLDER``) are left out; so is, with a warning, a
    ``result.json`` that cannot be read as one (truncated, or no JSON object), or a result that records other seeds
    than its folder's (``run_seeds_mismatch``), another settings hash than its row's (``_foreign_settings``) or a field
    of another type than fit writes: one bad run never stops the tables of every row under ``out``."""
    rows = []
    hashes: Dict[Path, Optional[Set[str]]] = {}
    for path in sorted(Path(out).glob(f"*/*/{RESULT_FILE}")):
        if not RUN_FOLDER.fullmatch(path.parent.name):
            continue
        data = read_result(path)
        # results are written atomically: one that cannot be read is damaged, never half-written (and one gone since
        # the glob was moved aside by another command)
        if data is None and path.exists():
            warn_user(f"{path} cannot be read as a result (truncated, or not a JSON object), so it is left out of "
                      "the tables. Re-run the command that made it to redo the run, or delete the file")
        if not counted(data):
            continue
        row = path.parent.parent
        if row not in hashes:
            hashes[row] = _row_hashes(row)
        mismatch = (run_seeds_mismatch(path, data) or _foreign_settings(path, data, hashes[row])
                    or _malformed_result(path, data))
        if mismatch is not None:
            warn_user(mismatch)
            continue
        cfg, counts = data.get("config") or {}, data.get("parameter_counts") or {}
        images = data.get("data") if isinstance(data.get("data"), dict) else {}
        rows.append({
            "name": path.parent.parent.name, "method": cfg.get("method", ""), "backbone": cfg.get("backbone", ""),
            "dataset": cfg.get("dataset", ""), "shots": cfg.get("shots", ""),
            "split_seed": cfg.get("split_seed", ""), "init_seed": cfg.get("seed", ""),
            "test_acc": data["metrics"]["test/acc"], "adapter_params": counts.get("adapter", 0),
            "head_params": counts.get("head", 0), "trainable_params": counts.get("trainable", 0),
            "epochs": data.get("epochs", ""), "wall_s": data.get("wall_s", ""), "run_dir": str(path.parent),
            "train_images": images.get("train", ""), "test_images": images.get("test", ""),
            "precision": cfg.get("precision", ""),
        })
    return rows


# What the runs of one row must share to be averaged (seeds, times and folders differ between them), the digests of
# the images they read included. Not the config hash: rows recorded by earlier versions keep their runs' older hashes
# (``claim_row`` checks the settings).
ROW_SETTINGS = ("method", "backbone", "dataset", "shots", "adapter_params", "head_params", "train_images",
                "test_images", "precision")


def mixed_settings(members: Sequence[Dict[str, Any]]) -> Dict[str, List[str]]:
    """The ``ROW_SETTINGS`` in which the results of one row's runs differ, with their values (empty: none). A value
    a result does not record differs from none."""
    mixed = {}
    for field in ROW_SETTINGS:
        values = sorted({str(r.get(field)) for r in members if r.get(field) not in (None, "")})
        if len(values) > 1:
            mixed[field] = values
    return mixed


def summarise(rows: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per name: mean and population std of test accuracy (in %), run count, exact parameter counts, and ``mixed``:
    the settings its runs differ in (``mixed_settings``); then the runs are not averaged (mean and std are NaN)."""
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["name"], []).append(row)
    summary = []
    for members in groups.values():
        accs = [100.0 * float(r["test_acc"]) for r in members]
        first, mixed = members[0], mixed_settings(members)
        summary.append({**{k: first[k] for k in ("name", "method", "backbone", "dataset", "shots",
                                                  "adapter_params", "head_params")},
                        # what trains (full fine-tuning: the backbone, no adapter); results without it: the sum
                        "trainable_params": (first.get("trainable_params")
                                             or first["adapter_params"] + first["head_params"]),
                        "runs": len(accs), "mean": math.nan if mixed else statistics.fmean(accs),
                        "std": math.nan if mixed else statistics.pstdev(accs), "mixed": mixed})
    return summary


def write_tables(out: str) -> List[Dict[str, Any]]:
    """Rebuild ``<out>/results.csv`` (one row per run) and ``<out>/results.md`` (mean (std) per name). Commands on one
    ``--out`` take turns from reading the results to writing both tables (``writer_lock``): one that read them before
    another's run finished would otherwise replace the newer tables with its older ones."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    with writer_lock(root / TABLES_LOCK):
        return _write_tables(root, out)


def _missing_runs(name: str, missing: Set[str]) -> str:
    """A row's name with the run folders it lacks, for the note on rows with fewer runs than requested."""
    listed = sorted(missing)
    return f"{name}: {', '.join(listed[:6])}{', ...' if len(listed) > 6 else ''}" if listed else name


def _write_tables(root: Path, out: str) -> List[Dict[str, Any]]:
    rows = collect_results(out)
    csv_path, md_path = root / "results.csv", root / "results.md"
    lines = [RESULTS_MD_HEADER,
             "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    finished: Dict[str, Set[str]] = {}
    for row in rows:
        finished.setdefault(row["name"], set()).add(Path(row["run_dir"]).name)
    short, mixed, left_out = [], [], []
    for s in summarise(rows):
        requested = requested_runs(root / s["name"])
        asked = len(requested | finished[s["name"]])
        runs = f"{s['runs']}" if asked == s["runs"] else f"{s['runs']} of {asked}"
        if asked != s["runs"]:
            short.append(_missing_runs(s["name"], requested - finished[s["name"]]))
            # done, yet not in the tables (a warning names why); a result that does not count is redone by a re-run
            left_out.extend(str(root / s["name"] / run) for run in sorted(requested - finished[s["name"]])
                            if result_counts(root / s["name"] / run))
        differ = "; ".join(f"{field} {' / '.join(values)}" for field, values in s["mixed"].items())
        if differ:
            mixed.append(f"{s['name']} ({differ})")
            warn_user(f"nola_vision: the runs of row {s['name']} under {out} were made with different settings "
                      f"({differ}): not averaged; see {root / 'results.md'}")
        shots = " / ".join(s["mixed"]["shots"]) if "shots" in s["mixed"] else s["shots"]
        lines.append(f"| {s['name']} | {s['method']} | {s['backbone']} | {s['dataset']} | {shots} | "
                     f"{s['adapter_params']:,} | {s['head_params']:,} | {s['trainable_params']:,} | {runs} | "
                     + (f"{s['mean']:.1f} ({s['std']:.1f}) |" if not differ else "not averaged: mixed settings |"))
    for folder in sorted(p.parent for p in root.glob(f"*/{REQUESTED_FILE}")):
        requested = requested_runs(folder)
        if requested and folder.name not in finished:  # every run failed, or none finished yet
            lines.append(f"| {folder.name} |  |  |  |  |  |  |  | 0 of {len(requested)} | no finished run |")
            short.append(_missing_runs(folder.name, requested))
    notes = ["Mean (population std) of final-epoch top-1 accuracy on the full test split over split seeds × init "
             "seeds."]
    if mixed:
        notes.append(f"NOT AVERAGED ({', '.join(mixed)}): the runs of these rows record different settings or "
                     "images, so no mean of them measures one experiment (each run is in results.csv). Redo each "
                     "setting in a row of its own: delete the row's folder, or pass another --name.")
    if short:
        notes.append(f"Fewer runs than requested ({'; '.join(short)}): their mean is over the finished runs only, so "
                     "it is not comparable with full rows. Re-run the same command to finish them (failed runs are "
                     "listed in its output and each run's log.txt)"
                     + (f"; a run whose result is left out of the tables (a warning names why) is taken as done: "
                        f"delete its folder first ({', '.join(left_out[:3])}{', ...' if len(left_out) > 3 else ''})."
                        if left_out else "."))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, CSV_FIELDS)
    writer.writeheader()
    writer.writerows({key: spreadsheet_safe(value) for key, value in row.items()} for row in rows)
    write_set_atomic([(csv_path, table.getvalue(), partial(_refuse_foreign_table, csv_path)),
                      (md_path, "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n",
                       partial(_refuse_foreign_table, md_path))])
    return rows
