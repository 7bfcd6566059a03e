"""The paper's nearest-neighbour baseline: k-NN on frozen backbone features, one result per split seed."""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..core.storage import write_json_atomic
from .results import RESULT_FILE, claim_row, config_key, counted, read_result, request_runs

__all__ = ["extract_features", "knn_predict", "run_knn"]


def _require_finite(features: Tensor, side: str) -> None:
    """Raise when rows of ``features`` hold NaN or inf: normalised, they would match or outvote arbitrarily."""
    bad = (~torch.isfinite(features).all(dim=1)).nonzero().flatten()
    if len(bad):
        raise ValueError(f"{len(bad)} of {len(features)} {side} feature rows hold NaN or inf (rows "
                         f"{bad[:5].tolist()}): the backbone produced non-finite features")


def knn_predict(train_features: Tensor, train_labels: Tensor, test_features: Tensor, k: int = 1,
                num_classes: Optional[int] = None, chunk: int = 4096) -> Tensor:
    """Labels of ``test_features`` by majority vote of their ``k`` most cosine-similar training features.

    Ties are broken by the summed similarity of the tied classes. Labels must be integers in
    ``[0, num_classes)``; features 2-D, finite and non-empty.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    for side, features in (("train", train_features), ("test", test_features)):
        if features.ndim != 2 or not len(features):
            raise ValueError(f"{side} features must be a non-empty 2-D tensor, got shape {tuple(features.shape)}")
        _require_finite(features, side)
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train features have {train_features.shape[1]} dimensions and test features "
                         f"{test_features.shape[1]}: extract both with the same backbone")
    if train_labels.shape != (len(train_features),) or train_labels.is_floating_point() or train_labels.is_complex():
        raise ValueError(f"train labels must be {len(train_features)} integers (one per train feature row), got "
                         f"shape {tuple(train_labels.shape)} of {train_labels.dtype}")
    train_labels = train_labels.long()
    num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
    if train_labels.min() < 0 or train_labels.max() >= num_classes:
        raise ValueError(f"train labels must lie in [0, {num_classes}), got {int(train_labels.min())} to "
                         f"{int(train_labels.max())}")
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
    features = torch.cat(feats)
    _require_finite(features, "extracted")
    return features, torch.cat(labels)


def run_knn(configs: Sequence[str], *, out: str, name: str, split_seeds: Sequence[int],
            overrides: Sequence[str] = (), k: int = 1, echo: bool = True) -> None:
    """The paper's nearest-neighbour baseline: k-NN on frozen backbone features, one result per split seed."""
    from torch.utils.data import DataLoader

    from ..data import FewShotSubset
    from ..train.cli import run_lightning_cli

    key = config_key(configs, [*_drop_trainer_args(overrides), f"--knn_k={k}"])
    (Path(out) / name).mkdir(parents=True, exist_ok=True)
    claim_row(Path(out) / name, key)
    request_runs(Path(out) / name, [f"split{split_seed}" for split_seed in split_seeds])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    test_cache: Optional[Tuple[Tensor, Tensor]] = None
    for split_seed in split_seeds:
        result = Path(out) / name / f"split{split_seed}" / RESULT_FILE
        if counted(read_result(result)):
            continue
        start = time.time()
        args = [a for c in configs for a in ("-c", str(c))] + list(_drop_trainer_args(overrides)) + [
            "--data.split_seed", str(split_seed), "--model.adapter", "linear", "--model.quant_bits", "null"]
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
