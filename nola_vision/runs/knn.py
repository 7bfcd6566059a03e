"""The paper's nearest-neighbour baseline: k-NN on frozen backbone features (``protocol.run_knn`` runs its rows)."""
from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..core.checks import check_int
from ..core.warn import warn_user

__all__ = ["extract_features", "knn_predict", "neighbours_used"]


def _require_finite(features: Tensor, side: str) -> None:
    """Raise when rows of ``features`` hold NaN or inf: normalised, they would match or outvote arbitrarily."""
    bad = (~torch.isfinite(features).all(dim=1)).nonzero().flatten()
    if len(bad):
        raise ValueError(f"{len(bad)} of {len(features)} {side} feature rows hold NaN or inf (rows "
                         f"{bad[:5].tolist()}): the backbone produced non-finite features")


def neighbours_used(k: int, train_images: int) -> int:
    """The ``k`` that ``knn_predict`` votes with among ``train_images`` training images: at most all of them."""
    return min(k, train_images)


def knn_predict(train_features: Tensor, train_labels: Tensor, test_features: Tensor, k: int = 1,
                num_classes: Optional[int] = None, chunk: int = 4096) -> Tensor:
    """Labels of ``test_features`` by majority vote of their ``k`` most cosine-similar training features.

    Ties are broken by the summed similarity of the tied classes. Similarities are computed in float32, in float64
    where either side's features are float64 (nearly parallel features tell apart there only). Labels must be
    integers in ``[0, num_classes)``; features 2-D, finite and non-empty. A ``k`` above the training images is lowered
    to their number, with a warning (``neighbours_used``).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    chunk = check_int(chunk, "chunk (test rows compared at a time)", at_least=1)  # 0 or -1 gave bare range errors
    for name, value in (("train_features", train_features), ("train_labels", train_labels),
                        ("test_features", test_features)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a tensor (as extract_features returns), got a {type(value).__name__}: "
                            f"convert it with torch.as_tensor({name})")
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
    used = neighbours_used(k, len(train_labels))
    if used < k:
        warn_user(f"k={k} exceeds the {used} training images: every test image is given the same neighbours; k-NN "
                  f"uses k={used} (pass a k of at most {used})")
    dtype = torch.float64 if torch.float64 in (train_features.dtype, test_features.dtype) else torch.float32
    train = nn.functional.normalize(train_features.to(dtype), dim=1)
    predictions = []
    for start in range(0, len(test_features), chunk):
        test = nn.functional.normalize(test_features[start:start + chunk].to(dtype), dim=1)
        sims, idx = (test @ train.T).topk(used, dim=1)
        labels = train_labels[idx]
        votes = torch.zeros(len(test), num_classes, device=test.device, dtype=dtype)
        votes.scatter_add_(1, labels, torch.ones_like(sims))
        weight = torch.zeros_like(votes).scatter_add_(1, labels, sims)
        # the most votes, then the highest summed similarity among those classes (compared apart: a weight folded into
        # the counts rounded away in float32 near a count, and the tie went to the lowest label)
        tied = votes == votes.max(dim=1, keepdim=True).values
        predictions.append(weight.masked_fill(~tied, float("-inf")).argmax(dim=1))
    return torch.cat(predictions)


@torch.no_grad()
def extract_features(model: nn.Module, loader: Iterable, device: torch.device) -> Tuple[Tensor, Tensor]:
    """Pre-logit features (the input of the model's classifier, which timm's ``forward_head(pre_logits=True)``
    returns) and labels of every batch, with the model in eval mode on ``device``.

    The model is called as a whole (``model(images)``), so its own forward hooks run as in any other use (a
    preprocessing pre-hook changes the features as it changes the logits); a model without one classifier module
    (``get_classifier()``) is read through ``forward_features``/``forward_head``, and refused when it has forward
    hooks, which that would skip. Float images are cast to the model's dtype (a backbone held in 16 bits); the
    features come back as float32. The caller's model keeps its train/eval modes and, when all of it was on one
    device, its device."""
    head = getattr(model, "get_classifier", None)
    head = head() if callable(head) else None
    if not isinstance(head, nn.Module) and not all(callable(getattr(model, name, None))
                                                   for name in ("forward_features", "forward_head")):
        inner = next((name for name, module in model.named_modules() if name and callable(
            getattr(module, "get_classifier", None))), None)
        hint = f"pass its submodule {inner!r} (model.get_submodule({inner!r})), " if inner else ""
        raise TypeError(f"{type(model).__name__} has no classifier module (get_classifier()) and no "
                        f"forward_features/forward_head to read its pre-logit features from: {hint}a timm model, or a "
                        "model with a get_classifier() whose input is those features")
    if not isinstance(head, nn.Module) and (model._forward_pre_hooks or model._forward_hooks):
        raise ValueError(f"{type(model).__name__} has forward hooks and no single classifier module "
                         "(get_classifier()) whose input is the pre-logit features, so they would be extracted without "
                         "the hooks: apply what the hooks do to the images instead, or give the model a "
                         "get_classifier()")
    modes = [(module, module.training) for module in model.modules()]
    devices = {t.device for t in (*model.parameters(), *model.buffers())}
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    seen: List[Tensor] = []
    hook = head.register_forward_pre_hook(lambda _, args: seen.append(args[0])) if isinstance(head, nn.Module) else None
    feats, labels = [], []
    try:
        model.eval().to(device)
        for images, targets in loader:
            images = images.to(device, dtype) if images.is_floating_point() else images.to(device)
            if hook is None:
                feats.append(model.forward_head(model.forward_features(images), pre_logits=True).float().cpu())
            else:
                seen.clear()
                model(images)
                if len(seen) != 1:
                    raise ValueError(f"the classifier of {type(model).__name__} (get_classifier(): "
                                     f"{type(head).__name__}) ran {len(seen)} times in one forward pass, so its input "
                                     "is not one batch of pre-logit features")
                feats.append(seen[0].float().cpu())
            labels.append(torch.as_tensor(targets))
    finally:
        if hook is not None:
            hook.remove()
        for module, training in modes:  # as the caller had it, module by module (a frozen part may stay in eval)
            module.training = training
        if len(devices) == 1 and devices != {torch.device(device)}:
            model.to(devices.pop())
    features = torch.cat(feats)
    _require_finite(features, "extracted")
    return features, torch.cat(labels)
