"""Adapter configurations: plain dataclasses that round-trip through JSON."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Union

BASIS_MODES = ("shared", "per_layer")
NOLA_INITS = ("paper", "zero_delta")
DEFAULT_NOLA_TARGETS = ("mlp.fc1", "mlp.fc2")
DEFAULT_LORA_TARGETS = ("attn.q", "attn.v")
# Methods that add no adapter layers: train the classifier head only, or every parameter.
PLAIN_METHODS = ("linear", "full")


@dataclass
class NOLAConfig:
    """NOLA: A = Σ αᵢAᵢ, B = Σ βⱼBⱼ over frozen random bases; ΔW = (scale/rank)·A·B; only α, β train.

    Args:
        rank: rank r of A (in×r) and B (r×out).
        num_basis_a: k, the number of random bases (and trained coefficients α) for A.
        num_basis_b: l, the number of random bases (and trained coefficients β) for B.
        targets: module-name suffixes or regexes; ``attn.q``/``attn.k``/``attn.v`` adapt one third of ``attn.qkv``.
        seed: generator seed of the random bases.
        scale: c in ΔW = (c/r)·A·B.
        basis: ``"shared"`` (one basis set per shape, shared by all layers) or ``"per_layer"``
            (distinct bases per layer, regenerated in chunks in forward and backward).
        init: ``"paper"`` (α=1/k, β=1/l) or ``"zero_delta"`` (α=1/k, β=0, so ΔW=0 at step 0).
        recompute_activation: for an adapted ``mlp.fc2``, recompute its input (the activation output) in
            backward from the pre-activation the model keeps anyway, instead of storing it.
    """

    rank: int = 4
    num_basis_a: int = 1024
    num_basis_b: int = 1024
    targets: List[str] = field(default_factory=lambda: list(DEFAULT_NOLA_TARGETS))
    seed: int = 0
    scale: float = 1.0
    basis: str = "shared"
    init: str = "paper"
    recompute_activation: bool = True

    method = "nola"

    def __post_init__(self) -> None:
        self.targets = _as_target_list(self.targets)
        _require_positive(self, "rank", "num_basis_a", "num_basis_b")
        _require_choice("basis", self.basis, BASIS_MODES)
        _require_choice("init", self.init, NOLA_INITS)

    @property
    def scaling(self) -> float:
        return self.scale / self.rank

    def to_dict(self) -> Dict[str, Any]:
        return {"method": self.method, **asdict(self)}


@dataclass
class LoRAConfig:
    """LoRA baseline on the same machinery: A kaiming-uniform, B zero, ΔW = (alpha/rank)·A·B.

    Args:
        rank: rank r.
        alpha: scaling numerator; ``None`` means alpha = rank (scale 1, as in the NOLA paper's baseline).
        targets: module-name suffixes or regexes; ``attn.q``/``attn.k``/``attn.v`` adapt one third of ``attn.qkv``.
        seed: seed of A's initialisation (portable generator, never the global RNG).
        recompute_activation: as in ``NOLAConfig``.
    """

    rank: int = 4
    alpha: Optional[float] = None
    targets: List[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    seed: int = 0
    recompute_activation: bool = True

    method = "lora"

    def __post_init__(self) -> None:
        self.targets = _as_target_list(self.targets)
        _require_positive(self, "rank")

    @property
    def scaling(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def to_dict(self) -> Dict[str, Any]:
        return {"method": self.method, **asdict(self)}


AdapterConfig = Union[NOLAConfig, LoRAConfig]
CONFIG_CLASSES = {"nola": NOLAConfig, "lora": LoRAConfig}


def config_from_dict(data: Dict[str, Any]) -> AdapterConfig:
    """Inverse of ``to_dict``: rebuilds a NOLAConfig or LoRAConfig, rejecting unknown methods and keys."""
    data = dict(data)
    method = data.pop("method", None)
    if method not in CONFIG_CLASSES:
        raise ValueError(f"unknown adapter method {method!r}; expected one of {sorted(CONFIG_CLASSES)}")
    cls = CONFIG_CLASSES[method]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; valid fields are {sorted(known)}")
    return cls(**data)


def _as_target_list(targets: Any) -> List[str]:
    if isinstance(targets, str):
        targets = [targets]
    targets = [str(t) for t in targets]
    if not targets:
        raise ValueError("targets must name at least one module, e.g. ['mlp.fc1', 'mlp.fc2']")
    return targets


def _require_positive(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive integer, got {value!r}")


def _require_choice(name: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {list(choices)}")
