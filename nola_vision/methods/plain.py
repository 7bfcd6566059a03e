"""The plain methods: ``linear`` trains the classifier head only, ``full`` trains every parameter; no adapter layers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.config import AdapterConfig
from ..core.registry import register_method


@dataclass(frozen=True, eq=False)
class PlainConfig(AdapterConfig):
    """A method without adapter layers. Equal to its name, so ``config == "linear"`` keeps working."""

    def serialize(self) -> str:
        return self.method

    def __eq__(self, other: Any) -> bool:
        return other == self.method if isinstance(other, str) else type(other) is type(self)

    def __hash__(self) -> int:
        return hash(self.method)

    def __repr__(self) -> str:
        return repr(self.method)


@dataclass(frozen=True, eq=False, repr=False)  # PlainConfig's repr: its name (a generated one replaced it)
class LinearProbeConfig(PlainConfig):
    """Linear probe: the backbone stays frozen, only the classifier head trains."""

    method = "linear"

    def describe(self) -> str:
        return "head only"


@dataclass(frozen=True, eq=False, repr=False)
class FullFineTuneConfig(PlainConfig):
    """Full fine-tuning: every parameter trains (the paper's grid: 8e-5 … 1e-5)."""

    method = "full"
    train_backbone = True

    def describe(self) -> str:
        return "all parameters"


# the head alone, chosen on validation like the adapters' recipes
register_method("linear", LinearProbeConfig, default_lr=1e-2, default_warmup_fraction=0.1)
register_method("full", FullFineTuneConfig, default_lr=5e-5)
