"""``nola-vision protocol``: the paper's few-shot protocol, split seeds × init seeds, with a mean (std) table.

Each run is ``nola-vision fit`` in its own process and directory (``<out>/<name>/split<S>-init<I>``) with
``--data.split_seed S --seed_everything I``. A run counts only once its ``result.json`` exists, and that
file is written atomically after the final test pass, so a killed run leaves nothing counted and is
re-run from scratch on restart, while finished runs are skipped. ``results.csv`` and ``results.md`` are
rebuilt from every ``result.json`` under ``<out>`` after each run. A result with a non-finite metric, a
status other than ok, or from a process that exited non-zero never counts.

A row is keyed by its settings (the config files' content and the overrides, without seeds and paths):
``<out>/<name>/config.json`` records them, and re-running under the same name with other settings is refused
with the differing settings named, instead of averaging runs of different settings into one row.

What the seeds control: the split seed draws the k-shot training images; the init seed is the run's
``seed_everything`` (head initialisation, data order, augmentation). The adapter config's own ``seed``
(NOLA's random bases, LoRA's A) stays as configured, as in the authors' code, which fixes the bases.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .atomic import atomic_path, write_json_atomic, write_text_atomic
from .executors import Executor, LocalExecutor, Run, add_executor_arguments, build_executor

__all__ = ["RESULT_FILE", "collect_results", "config_key", "knn_predict", "main", "run_knn", "run_protocol",
           "write_tables"]

RESULT_FILE = "result.json"
CONFIG_FILE = "config.json"
CSV_FIELDS = ["name", "method", "backbone", "dataset", "shots", "split_seed", "init_seed", "test_acc",
              "adapter_params", "head_params", "trainable_params", "epochs", "wall_s", "run_dir"]
# set per run by the runner, or only where outputs go: they do not change what a row measures
RUN_ARGS = ("--seed_everything", "--data.split_seed", "--trainer.default_root_dir", "--data.split_dir",
            "--result_file", "--trainer.enable_progress_bar", "--test_after_fit")


def run_dir_name(split_seed: int, init_seed: int) -> str:
    return f"split{split_seed}-init{init_seed}"


def _pairs(overrides: Sequence[str]) -> List[Tuple[str, Optional[str]]]:
    """``--key value`` and ``--key=value`` as ``(key, value)`` pairs, in order (a flag alone has value None)."""
    pairs: List[Tuple[str, Optional[str]]] = []
    args = list(overrides)
    i = 0
    while i < len(args):
        arg = args[i]
        if "=" in arg and arg.startswith("--"):
            key, value = arg.split("=", 1)
            pairs.append((key, value))
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            pairs.append((arg, args[i + 1]))
            i += 1
        else:
            pairs.append((arg, None))
        i += 1
    return pairs


def config_key(configs: Sequence[str], overrides: Sequence[str]) -> Dict[str, Any]:
    """What a protocol row measures: the composed config files' content and the overrides, without seeds and
    paths, with a short hash. Rows are keyed by it so runs with other settings never share a mean."""
    contents = [Path(c).read_text() for c in configs]
    settings = [f"{k}={v}" if v is not None else k for k, v in _pairs(overrides) if k not in RUN_ARGS]
    digest = hashlib.sha256(json.dumps({"configs": contents, "overrides": settings}).encode()).hexdigest()[:16]
    return {"config_hash": digest, "configs": [str(c) for c in configs],
            "config_sha256": [hashlib.sha256(c.encode()).hexdigest()[:16] for c in contents], "overrides": settings}


def _claim_row(root: Path, key: Dict[str, Any]) -> None:
    """Record the row's settings in ``<root>/config.json``, or refuse when its runs were made with others."""
    path = root / CONFIG_FILE
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = None
    if old is None:  # older rows have no config.json: their result files carry the hash, or nothing to compare
        hashes = {d.get("config_hash") for d in map(_read_result, root.glob(f"*/{RESULT_FILE}")) if d}
        if hashes - {None, key["config_hash"]}:
            raise ValueError(f"{root} holds runs made with other settings than now; pass another --name for a "
                             f"separate row, or delete {root} to redo it")
        write_json_atomic(path, key)
        return
    if old.get("config_hash") == key["config_hash"]:
        return
    diffs = []
    if old.get("config_sha256") != key["config_sha256"]:
        diffs.append(f"config files: before {old.get('configs')} (content {old.get('config_sha256')}), now "
                     f"{key['configs']} (content {key['config_sha256']})")
    before, now = old.get("overrides", []), key["overrides"]
    if before != now:
        diffs.append(f"overrides: only before {[o for o in before if o not in now] or before}, "
                     f"only now {[o for o in now if o not in before] or now}")
    raise ValueError(f"{root} holds runs made with other settings ({'; '.join(diffs) or 'see ' + str(path)}); "
                     f"their results would be averaged into one row. Pass another --name for a separate row, "
                     f"or delete {root} to redo this one")


def _finite(value: Any) -> bool:
    return not isinstance(value, (int, float)) or math.isfinite(value)


def counted(data: Optional[Dict[str, Any]], metric: str = "test/acc") -> bool:
    """Whether a result counts: it holds ``metric``, every metric is finite and its status (if any) is ok."""
    if not data or data.get("status", "ok") != "ok":
        return False
    metrics = data.get("metrics")
    return isinstance(metrics, dict) and metric in metrics and all(_finite(v) for v in metrics.values())


def _discard(result: Path) -> None:
    """Move a result that must not count aside (kept for inspection as ``result.json.failed``)."""
    if result.exists():
        result.replace(result.with_name(RESULT_FILE + ".failed"))


def fit_command(python: str, config_args: Sequence[str], run_dir: Path, split_seed: int, init_seed: int,
                overrides: Sequence[str]) -> Tuple[str, ...]:
    """The ``nola-vision fit`` command line of one run, writing everything under ``run_dir``."""
    quiet = [] if any("enable_progress_bar" in o for o in overrides) else ["--trainer.enable_progress_bar", "false"]
    return (python, "-m", "nola_vision.cli", "fit", *config_args,
            "--seed_everything", str(init_seed), "--data.split_seed", str(split_seed),
            "--trainer.default_root_dir", str(run_dir), "--data.split_dir", str(run_dir),
            "--result_file", str(run_dir / RESULT_FILE), *quiet, *overrides)


def run_protocol(
    configs: Sequence[str],
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
    Raises ValueError when ``<out>/<name>`` holds runs made with other settings, RuntimeError listing failed
    runs (after running the others).
    """
    if not configs:
        raise ValueError("protocol needs a config: nola-vision protocol -c configs/paper/... [-c ...]")
    for config in configs:
        if not Path(config).is_file():
            raise FileNotFoundError(f"config {config} does not exist")
    name = name or "_".join(Path(c).stem for c in configs)
    root = Path(out) / name
    key = config_key(configs, overrides)
    root.mkdir(parents=True, exist_ok=True)
    _claim_row(root, key)
    executor = executor or LocalExecutor(1)
    config_args = [arg for c in configs for arg in ("-c", str(c))]
    grid = [(s, i) for s in split_seeds for i in init_seeds]
    labels: Dict[Path, str] = {}
    pending: List[Run] = []
    for n, (split_seed, init_seed) in enumerate(grid, 1):
        run_dir = root / run_dir_name(split_seed, init_seed)
        label = f"[{n}/{len(grid)}] {name} split {split_seed} init {init_seed}"
        if counted(_read_result(run_dir / RESULT_FILE)):
            if echo:
                print(f"{label}: done already, skipped", flush=True)
            continue
        _discard(run_dir / RESULT_FILE)  # a result that does not count must not be mistaken for a finished run
        run_dir.mkdir(parents=True, exist_ok=True)
        labels[run_dir] = label
        pending.append(Run(fit_command(python, config_args, run_dir, split_seed, init_seed, overrides),
                           run_dir / "log.txt"))
    failed: List[str] = []
    for run, code, wall in executor.run(pending):
        run_dir, label = run.log.parent, labels[run.log.parent]
        result = run_dir / RESULT_FILE
        row = _read_result(result)
        if code != 0 or not counted(row):
            _discard(result)
            why = f"exit {code}" if code != 0 else "no finite test accuracy"
            failed.append(f"{run_dir} ({why}; see {run.log})")
            if echo:
                print(f"{label}: FAILED ({why}), log: {run.log}", flush=True)
            continue
        # the wall time of the whole run, process start-up included, and the settings it was made with
        row.update(wall_s=wall, config_hash=key["config_hash"])
        write_json_atomic(result, row)
        write_tables(out)
        if echo:
            print(f"{label}: test acc {100 * row['metrics']['test/acc']:.2f}% ({wall:.0f} s)", flush=True)
    if knn:
        run_knn(configs, out, name + "-knn", split_seeds, overrides, k=knn_k, echo=echo)
    rows = write_tables(out)
    if failed:
        raise RuntimeError("runs failed (re-run the same command to retry them):\n  " + "\n  ".join(failed))
    return rows


def _read_result(path: Path) -> Optional[Dict[str, Any]]:
    """A finished run's result, or None (missing, or unreadable: then the run is not counted)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def collect_results(out: str) -> List[Dict[str, Any]]:
    """One row per finished run under ``out``: runs without a complete ``result.json``, with a non-finite
    metric or with a status other than ok are left out."""
    rows = []
    for path in sorted(Path(out).glob(f"*/*/{RESULT_FILE}")):
        data = _read_result(path)
        if not counted(data):
            continue
        cfg, counts = data.get("config", {}), data.get("parameter_counts", {})
        rows.append({
            "name": path.parent.parent.name, "method": cfg.get("method", ""), "backbone": cfg.get("backbone", ""),
            "dataset": cfg.get("dataset", ""), "shots": cfg.get("shots", ""),
            "split_seed": cfg.get("split_seed", ""), "init_seed": cfg.get("seed", ""),
            "test_acc": data["metrics"]["test/acc"], "adapter_params": counts.get("adapter", 0),
            "head_params": counts.get("head", 0), "trainable_params": counts.get("trainable", 0),
            "epochs": data.get("epochs", ""), "wall_s": data.get("wall_s", ""), "run_dir": str(path.parent),
        })
    return rows


def summarise(rows: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per name: mean and population std of test accuracy (in %), run count, exact parameter counts."""
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["name"], []).append(row)
    summary = []
    for members in groups.values():
        accs = [100.0 * float(r["test_acc"]) for r in members]
        first = members[0]
        summary.append({**{k: first[k] for k in ("name", "method", "backbone", "dataset", "shots",
                                                  "adapter_params", "head_params")},
                        "runs": len(accs), "mean": statistics.fmean(accs), "std": statistics.pstdev(accs)})
    return summary


def write_tables(out: str) -> List[Dict[str, Any]]:
    """Rebuild ``<out>/results.csv`` (one row per run) and ``<out>/results.md`` (mean (std) per name)."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    rows = collect_results(out)
    with atomic_path(root / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| run | method | backbone | dataset | shots | adapter params | head params | runs | top-1 % mean (std) |",
             "|---|---|---|---|---|---:|---:|---:|---:|"]
    for s in summarise(rows):
        lines.append(f"| {s['name']} | {s['method']} | {s['backbone']} | {s['dataset']} | {s['shots']} | "
                     f"{s['adapter_params']:,} | {s['head_params']:,} | {s['runs']} | "
                     f"{s['mean']:.1f} ({s['std']:.1f}) |")
    write_text_atomic(root / "results.md", "\n".join(lines) + "\n\nMean (population std) of final-epoch top-1 accuracy "
                 "on the full test split over split seeds × init seeds.\n")
    return rows


# ---- k-NN baseline on frozen features ------------------------------------------------------------
def knn_predict(train_features: Tensor, train_labels: Tensor, test_features: Tensor, k: int = 1,
                num_classes: Optional[int] = None, chunk: int = 4096) -> Tensor:
    """Labels of ``test_features`` by majority vote of their ``k`` most cosine-similar training features.

    Ties are broken by the summed similarity of the tied classes.
    """
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, len(train_labels))
    train = nn.functional.normalize(train_features.float(), dim=1)
    predictions = []
    for start in range(0, len(test_features), chunk):
        test = nn.functional.normalize(test_features[start:start + chunk].float(), dim=1)
        sims, idx = (test @ train.T).topk(k, dim=1)
        labels = train_labels[idx]
        votes = torch.zeros(len(test), num_classes, device=test.device)
        votes.scatter_add_(1, labels, torch.ones_like(sims))
        weight = torch.zeros_like(votes).scatter_add_(1, labels, sims)
        predictions.append((votes + 1e-3 * weight / k).argmax(dim=1))  # |weight/k| <= 1, so counts decide first
    return torch.cat(predictions)


@torch.no_grad()
def extract_features(model: nn.Module, loader: Iterable, device: torch.device) -> Tuple[Tensor, Tensor]:
    """Pre-logit features (timm ``forward_head(pre_logits=True)``) and labels of every batch."""
    model.eval().to(device)
    feats, labels = [], []
    for images, targets in loader:
        x = model.forward_features(images.to(device))
        feats.append(model.forward_head(x, pre_logits=True).float().cpu())
        labels.append(torch.as_tensor(targets))
    return torch.cat(feats), torch.cat(labels)


def run_knn(configs: Sequence[str], out: str, name: str, split_seeds: Sequence[int], overrides: Sequence[str] = (),
            k: int = 1, echo: bool = True) -> None:
    """The paper's nearest-neighbour baseline: k-NN on frozen backbone features, one result per split seed."""
    from torch.utils.data import DataLoader

    from .cli import run_lightning_cli
    from .data import FewShotSubset

    key = config_key(configs, [*_drop_trainer_args(overrides), f"--knn_k={k}"])
    (Path(out) / name).mkdir(parents=True, exist_ok=True)
    _claim_row(Path(out) / name, key)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    test_cache: Optional[Tuple[Tensor, Tensor]] = None
    for split_seed in split_seeds:
        result = Path(out) / name / f"split{split_seed}" / RESULT_FILE
        if counted(_read_result(result)):
            continue
        start = time.time()
        args = [a for c in configs for a in ("-c", str(c))] + list(_drop_trainer_args(overrides)) + [
            "--data.split_seed", str(split_seed), "--model.adapter", "linear"]
        with warnings.catch_warnings():  # LightningCLI warns when args are given while sys.argv holds others
            warnings.simplefilter("ignore", UserWarning)
            cli = run_lightning_cli(args, run=False)
        dm, model = cli.datamodule, cli.model.model
        dm.setup("fit")
        train = FewShotSubset(dm.train_set.dataset, dm.train_set.indices, dm.eval_transform)
        train_feats, train_labels = extract_features(model, DataLoader(train, batch_size=dm.eval_batch_size,
                                                                       num_workers=dm.num_workers), device)
        if test_cache is None:
            test_cache = extract_features(model, dm.test_dataloader(), device)
        test_feats, test_labels = test_cache
        pred = knn_predict(train_feats.to(device), train_labels.to(device), test_feats.to(device), k, dm.num_classes)
        acc = (pred.cpu() == test_labels).float().mean().item()
        hp = cli.model.hparams
        write_json_atomic(result, {
            "metrics": {"test/acc": acc},
            "parameter_counts": {"adapter": 0, "head": 0, "trainable": 0},
            "config": {"method": f"knn (k={k})", "backbone": hp.backbone, "dataset": dm.dataset_name,
                       "shots": dm.shots, "split_seed": split_seed, "seed": ""},
            "epochs": 0, "wall_s": round(time.time() - start, 1), "config_hash": key["config_hash"],
        })
        if echo:
            print(f"{name} split {split_seed}: {k}-NN test acc {100 * acc:.2f}%", flush=True)


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
        name = args.name or "_".join(Path(c).stem for c in args.config)
        executor = build_executor(args, Path(args.out) / name / "submitit")
        run_protocol(args.config, args.out, name, args.split_seeds, args.init_seeds, overrides,
                     knn=args.knn, knn_k=args.knn_k, executor=executor)
    except (RuntimeError, ValueError, FileNotFoundError) as err:
        print(f"nola-vision protocol: error: {err}", file=sys.stderr)
        return 1
    print((Path(args.out) / "results.md").read_text())
    return 0
