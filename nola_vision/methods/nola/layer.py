"""NOLA's layer: the factors are combinations of frozen random bases, A = Σ αᵢAᵢ and B = Σ βⱼBⱼ."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ...core.basis import BasisBank, BasisSpec, basis_streams, combine_bases
from ...core.layer import AdaptedLinear, Slice, as_factors, full_precision
from .config import NOLAConfig

__all__ = ["COSTLY_BASIS_SIZE", "NOLALinear"]

# num_basis × rank from which inject warns of the bases' cost: 4× the defaults' 1024 × 4 (measured 1.5× LoRA's step)
COSTLY_BASIS_SIZE = 16384


class NOLALinear(AdaptedLinear):
    """NOLA: A = Σ αᵢAᵢ and B = Σ βⱼBⱼ over frozen random bases; only α (k) and β (l) per slice train."""

    adapter_parameter_names = ("nola_alpha", "nola_beta")
    # Bases decoded to float32 per step of the shared combination: a cache-sized temporary (1.5 MB for ViT-B's
    # 3072×4 factors), measured fastest on CPU among 16/32/128.
    shared_chunk = 32

    def __init__(
        self,
        base: nn.Linear,
        config: NOLAConfig,
        name: str,
        slices: Optional[Sequence[Slice]] = None,
        bank: Optional[BasisBank] = None,
    ) -> None:
        self.require_config(config, NOLAConfig)
        super().__init__(base, slices, config.rank, config.scaling)
        k, l = config.num_basis_a, config.num_basis_b  # noqa: E741 (the paper's k and l)
        self.basis = config.basis
        self.bank = bank if bank is not None else BasisBank()
        self.specs_a, self.specs_b = self._specs(config, name, self.in_features, self.width, self.slices)
        shapes = self.parameter_shapes(config, self.in_features, self.width, len(self.slices))
        # float32 whatever torch's default dtype (inject gives a float64 layer's float64 from these values)
        self.nola_alpha = nn.Parameter(torch.full(shapes["nola_alpha"], 1.0 / k, dtype=torch.float32,
                                                  device=base.weight.device))
        beta = 0.0 if config.init == "zero_delta" else 1.0 / l
        self.nola_beta = nn.Parameter(torch.full(shapes["nola_beta"], beta, dtype=torch.float32,
                                                 device=base.weight.device))

    @classmethod
    def parameter_shapes(cls, config: NOLAConfig, in_features: int, width: int, num_slices: int
                         ) -> Dict[str, Tuple[int, ...]]:
        return {"nola_alpha": (num_slices, config.num_basis_a), "nola_beta": (num_slices, config.num_basis_b)}

    @staticmethod
    def _specs(config: NOLAConfig, name: str, in_features: int, width: int,
               slices: Sequence[Slice]) -> Tuple[Tuple[BasisSpec, ...], Tuple[BasisSpec, ...]]:
        """The bases of A and B: one spec for all slices when shared, one per slice otherwise."""
        streams_a, streams_b = basis_streams(config.basis, name, in_features, config.rank, width, slices)
        specs_a = tuple(BasisSpec(config.seed, s, (in_features, config.rank), config.num_basis_a) for s in streams_a)
        specs_b = tuple(BasisSpec(config.seed, s, (config.rank, width), config.num_basis_b) for s in streams_b)
        return specs_a, specs_b

    @classmethod
    def pointless_sizes(cls, config: NOLAConfig, in_features: int, width: int) -> List[str]:
        """A rank above min(in, out), which ΔW = A·B cannot reach: NOLA trains k + l values whatever the rank, so a
        larger one only adds basis memory and compute; and bases of k × rank ``COSTLY_BASIS_SIZE`` or more, whose
        codes, generation and combination cost well beyond LoRA's step (4× the defaults' k = 1024, r = 4)."""
        most, reasons = min(in_features, width), []
        if config.rank > most:
            reasons.append(f"rank={config.rank} is above min(in, out)={most}: ΔW = A·B has rank at most {most}, so a "
                           "larger rank only makes each random basis larger (memory and compute; the k + l trained "
                           f"values stay as they are); use rank <= {most}")
        k = max(config.num_basis_a, config.num_basis_b)
        if k * config.rank >= COSTLY_BASIS_SIZE:
            reasons.append(f"num_basis × rank = {k} × {config.rank}: each random basis holds k·in·r values, so its "
                           "codes, their generation and their combination grow with k × rank, not the k + l trained "
                           "values (on ViT-B, r = 16 took 1.5× LoRA's step time and r = 32 2.2×, with 2.5× its "
                           "memory). Keep k × rank near 4,096 where cost matters; see 'What the bases cost' in the "
                           "docs' Random bases page")
        return reasons

    @classmethod
    def plan_basis_specs(cls, config: NOLAConfig, name: str, in_features: int, width: int,
                         slices: Sequence[Slice]) -> Tuple[BasisSpec, ...]:
        specs_a, specs_b = cls._specs(config, name, in_features, width, slices)
        return specs_a + specs_b

    @classmethod
    def injection_context(cls, config: NOLAConfig) -> Dict[str, Any]:
        return {"bank": BasisBank()}  # one bank per model: each shared basis is held once per device

    def _apply(self, *args: Any, **kwargs: Any) -> NOLALinear:
        """``model.to(device)`` and the like also release the shared codes held on the device the layer left (a
        model moved off a GPU would otherwise keep its bases there, 60 MiB for ViT-B, until a pass ran there)."""
        moved = super()._apply(*args, **kwargs)
        self.bank.release_elsewhere(self.weight.device)
        return moved

    def shared_coefficients(self) -> List[Tuple[BasisSpec, str]]:
        if self.basis != "shared":
            return []
        return [(self.specs_a[0], "nola_alpha"), (self.specs_b[0], "nola_beta")]

    def _combine(self, coefficients: Tensor, specs: Tuple[BasisSpec, ...]) -> Tensor:
        if self.basis == "shared":
            return combine_bases(coefficients, specs[0], chunk=self.shared_chunk, bank=self.bank)
        return torch.cat([combine_bases(coefficients[i : i + 1], spec) for i, spec in enumerate(specs)])

    def factors(self) -> Tuple[Tensor, Tensor]:
        with full_precision(self.nola_alpha.device):
            a = self._combine(self.trained("nola_alpha"), self.specs_a)
            b = self._combine(self.trained("nola_beta"), self.specs_b)
        return as_factors(self, a, b)

    def basis_specs(self) -> Tuple[BasisSpec, ...]:
        return self.specs_a + self.specs_b


