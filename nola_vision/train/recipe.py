"""The training recipe and schedule, in one place: the module, the benchmarks and the notebooks all use it.

A registered method carries its recipe (``nv.get_method(name)``: learning rates of the adapter and the head, the
share of the epochs spent warming up); ``parameter_groups`` puts the head in its own optimiser group and
``lr_schedule`` is the schedule of every group (linear warm-up, then cosine, one multiplier for all groups).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..core.registry import method_of
from ..core.targets import head_parameter_names

__all__ = ["MIN_EPOCHS_FOR_WARMUP", "cosine_factor", "lr_schedule", "parameter_groups", "recipe_learning_rates",
           "recipe_warmup_epochs"]

# The fewest epochs a recipe's warm-up has room in: one warm-up epoch and two along the cosine.
MIN_EPOCHS_FOR_WARMUP = 3


def parameter_groups(model: nn.Module, lr: float, head_lr: float) -> List[Dict[str, Any]]:
    """Optimiser groups of the trainable parameters: the adapter (every backbone parameter for ``full``) at ``lr``,
    the classifier head at ``head_lr``; empty groups are left out."""
    head = set(head_parameter_names(model))
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for name, p in trained if name not in head], "lr": lr},
              {"params": [p for name, p in trained if name in head], "lr": head_lr}]
    return [g for g in groups if g["params"]]


def lr_schedule(optimizer: torch.optim.Optimizer, *, steps: int, lr: float, min_lr: float,
                warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The recipe's schedule, stepped once per epoch (or per step, with steps counted so): ``cosine_factor`` as one
    multiplier for every group, so the adapter goes from ``lr`` to ``min_lr`` and the head from its own peak to
    ``min_lr · head_lr / lr``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_factor(steps, lr, min_lr, warmup_steps))


def recipe_learning_rates(config: Any, lr: Optional[float], head_lr: Optional[float]) -> Tuple[float, float]:
    """(adapter lr, head lr): given values win; an unset ``lr`` takes the method's recipe (and its head lr when
    ``head_lr`` is unset too); an unset ``head_lr`` with a given ``lr`` is that ``lr``."""
    method = method_of(config)
    if lr is None:
        lr = method.default_lr
        if head_lr is None:
            head_lr = method.default_head_lr
    return lr, head_lr if head_lr is not None else lr


def recipe_warmup_epochs(config: Any, epochs: int) -> int:
    """The method's recipe warm-up for a run of ``epochs``: its ``default_warmup_fraction``, rounded half up, and at
    least 1 epoch from 3 epochs on (room for it and two decaying epochs): the recipe's rates assume a warm-up (NOLA's
    3e-2 diverges without one), which a tenth of 3 or 4 epochs would round away."""
    fraction = method_of(config).default_warmup_fraction
    share = math.floor(fraction * epochs + 0.5)
    return 1 if share == 0 and fraction > 0 and epochs >= MIN_EPOCHS_FOR_WARMUP else share


def cosine_factor(epochs: int, lr: float, min_lr: float, warmup_epochs: int = 0) -> Callable[[int], float]:
    """LR multiplier per epoch: linear warm-up, then cosine from ``lr`` to ``min_lr`` at the last epoch's end.

    Without warm-up this is ``CosineAnnealingLR(T_max=epochs, eta_min=min_lr)`` stepped per epoch, as in the paper.
    """
    floor = min_lr / lr if lr > 0 else 0.0
    # a partial of a module-level function, not a closure: a scheduler (and the trainer holding it) then pickles
    return functools.partial(_cosine_factor_at, warmup_epochs=warmup_epochs, decay=max(epochs - warmup_epochs, 1),
                             floor=floor)


def _cosine_factor_at(epoch: int, warmup_epochs: int, decay: int, floor: float) -> float:
    if epoch < warmup_epochs:
        return (epoch + 1) / (warmup_epochs + 1)
    t = min(epoch - warmup_epochs, decay) / decay
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
