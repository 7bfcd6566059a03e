"""Adapter layers: a frozen ``nn.Linear`` plus a low-rank update on whole or sliced output features.

``NOLALinear`` and ``LoRALinear`` share one forward, merge and slice mechanism; they differ only in how
they produce the factors A (in×r) and B (r×width) of each slice. A layer class also says, before it exists,
which tensors it trains and which bases it uses (``parameter_shapes``, ``plan_basis_specs``), so an
injection plan can be computed and checked without building anything. Model-wide work (shared-basis
batching, merge, task switching) lives in ``merge.py``.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .basis import BasisBank, BasisSpec, basis_streams, combine_bases, portable_uniform
from .quantize import fake_quantize

if TYPE_CHECKING:
    from .methods.lora import LoRAConfig
    from .methods.nola import NOLAConfig

Slice = Tuple[int, int]
# A 0-dim bool buffer of every adapted layer: merged-ness travels with its state dict (see ``_load_from_state_dict``).
MERGED_FLAG = "adapter_merged"


def full_precision(device: torch.device):
    """Disable autocast: coefficient combinations are tiny and must not cast the large bases every step."""
    is_available = getattr(torch, "is_autocast_available", lambda kind: kind in ("cpu", "cuda"))
    return torch.autocast(device_type=device.type, enabled=False) if is_available(device.type) else nullcontext()


class AdaptedLinear(nn.Module):
    """Frozen ``y = x Wᵀ + b`` plus ``scaling · (x A) B`` on each output slice, without materialising ΔW.

    ``weight`` and ``bias`` are the wrapped layer's own parameters, so state-dict keys of the base model are
    unchanged and pretrained weights load into an adapted model as they are; the only other keys are the adapter
    tensors and the ``adapter_merged`` flag, which keeps a merged state dict from adding ΔW twice.
    """

    adapter_parameter_names: Tuple[str, ...] = ()

    def __init__(self, base: nn.Linear, slices: Sequence[Slice], rank: int, scaling: float) -> None:
        super().__init__()
        widths = {end - start for start, end in slices}
        if len(widths) != 1:
            raise ValueError(f"all adapted slices of a layer must have the same width, got {list(slices)}")
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.slices: Tuple[Slice, ...] = tuple((int(s), int(e)) for s, e in slices)
        self.width = widths.pop()
        self.rank = rank
        self.scaling = scaling
        self.register_buffer(MERGED_FLAG, torch.zeros((), dtype=torch.bool, device=base.weight.device))
        self.merged = False
        # Set by inject() for an mlp.fc2 whose activation was moved here to be recomputed in backward.
        self.input_activation: Optional[nn.Module] = None
        # Quantisation-aware training: forward sees the values that save_adapter(bits=...) would store.
        self.quant_bits: Optional[int] = None
        # Combined factors of the current forward pass, set by merge.combine_shared_factors (see there).
        self.batched_factors: Optional[Tuple[Tensor, Tensor]] = None

    @property
    def merged(self) -> bool:
        """Whether ΔW is folded into ``weight``; kept as a Python bool too, so forward never reads a device tensor."""
        return self._merged

    @merged.setter
    def merged(self, value: bool) -> None:
        self._merged = bool(value)
        getattr(self, MERGED_FLAG).fill_(self._merged)

    @classmethod
    def parameter_shapes(
        cls, config: Any, in_features: int, width: int, num_slices: int
    ) -> Dict[str, Tuple[int, ...]]:
        """Shapes of the trained tensors by parameter name, known before the layer exists."""
        raise NotImplementedError

    @classmethod
    def plan_basis_specs(cls, config: Any, name: str, in_features: int, width: int,
                         slices: Sequence[Slice]) -> Tuple[BasisSpec, ...]:
        """The random bases the layer will use (none by default), known before it exists."""
        return ()

    @classmethod
    def injection_context(cls, config: Any) -> Dict[str, Any]:
        """Keyword arguments shared by every layer of one injection (e.g. NOLA's basis bank)."""
        return {}

    def shared_coefficients(self) -> List[Tuple[BasisSpec, str]]:
        """(shared basis, coefficient parameter name) pairs that model-wide batching may combine for this layer.

        A layer that returns any also has ``bank`` (a ``BasisBank``) and ``shared_chunk``; its factors are
        the combined rows, in this order, viewed by ``as_factors``.
        """
        return []

    def basis_specs(self) -> Tuple[BasisSpec, ...]:
        return ()

    def trained(self, name: str, value: Optional[Tensor] = None) -> Tensor:
        """An adapter parameter (or a ``value`` for it) as the forward pass uses it.

        Fake-quantised during quantisation-aware training.
        """
        value = getattr(self, name) if value is None else value
        return fake_quantize(value, self.quant_bits) if self.quant_bits else value

    def factors(self) -> Tuple[Tensor, Tensor]:
        """A of shape (slices, in, rank) and B of shape (slices, rank, width), float32, without scaling."""
        raise NotImplementedError

    def delta_factors(self) -> Tuple[Tensor, Tensor]:
        """Factors of the whole update, scaling applied: ΔWᵀ = A @ B with A (in, slices·rank), B (slices·rank, out)."""
        a, b = self.factors() if self.batched_factors is None else self.batched_factors
        num_slices = len(self.slices)
        a = a.permute(1, 0, 2).reshape(self.in_features, num_slices * self.rank) * self.scaling
        if self.slices == ((0, self.out_features),):
            return a, b[0]
        # Each slice's B placed in its own output columns: one matmul covers q and v of a fused qkv.
        blocks = [F.pad(b[i], (start, self.out_features - end)) for i, (start, end) in enumerate(self.slices)]
        return a, torch.cat(blocks, dim=0)

    @torch.no_grad()
    def get_delta_weight(self) -> Tensor:
        """ΔW (out×in, float32): what ``merge`` adds to ``weight``."""
        a, b = self.delta_factors()
        return (a @ b).t()

    def forward(self, x: Tensor) -> Tensor:
        pre_activation = None
        if self.input_activation is not None:
            pre_activation, x = x, self.input_activation(x)
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            trained = [p for p in self.adapter_parameters().values() if p.requires_grad]
            return _MergedGuard.apply(y, *trained) if trained and torch.is_grad_enabled() else y
        a, b = self.delta_factors()
        if pre_activation is not None and torch.is_grad_enabled():
            return _RecomputedInputDelta.apply(y, x, pre_activation.detach(), a, b, self.input_activation)
        return _add_low_rank_output(y, x @ a.to(x.dtype), b)

    def _add_low_rank(self, a: Tensor, b: Tensor) -> None:
        """weight += (a b)ᵀ as one addmm (a strided add of a transposed ΔW is ten times slower)."""
        self.weight.addmm_(b.t().to(self.weight.dtype), a.t().to(self.weight.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into ``weight`` for inference at the base layer's cost."""
        if not self.merged:
            self._add_low_rank(*self.delta_factors())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ΔW again (exact up to one float rounding per weight)."""
        if self.merged:
            a, b = self.delta_factors()
            self._add_low_rank(-a, b)
            self.merged = False

    @torch.no_grad()
    def replace_merged_delta(self, old: Tuple[Tensor, Tensor], new: Tuple[Tensor, Tensor]) -> None:
        """On a merged layer, weight += ΔW_new − ΔW_old as one rank-2r update: a fast switch between tasks."""
        self._add_low_rank(torch.cat([new[0], -old[0]], dim=1), torch.cat([new[1], old[1]], dim=0))

    def adapter_parameters(self) -> dict:
        return {name: getattr(self, name) for name in self.adapter_parameter_names}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Load the merged flag with the weight it describes, so a merged state dict never adds ΔW twice.

        A state dict without the flag (a plain model's, e.g. pretrained weights) holds unmerged weights. A
        merged layer needs its weight and adapter tensors from one state dict, or it refuses to load.
        """
        flag = state_dict.get(prefix + MERGED_FLAG)
        loads = [prefix + name in state_dict for name in ("weight", *self.adapter_parameter_names)]
        merged = bool(flag) if flag is not None else (False if loads[0] else self.merged)
        # Merged: ΔW of exactly these coefficients is in exactly this weight. Unmerged: the weight is a plain one.
        consistent = (all(loads) or (not any(loads) and self.merged)) if merged else (loads[0] or not self.merged)
        if not consistent:
            error_msgs.append(
                f"{prefix[:-1] or type(self).__name__}: the state dict is {'' if merged else 'un'}merged but does not "
                "hold the layer's weight with its adapter tensors, so ΔW would be lost or added twice: call "
                "nv.unmerge(model) before state_dict() (and before loading into a merged model), or load the full "
                "state dict"
            )
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if flag is None and prefix + MERGED_FLAG in missing_keys:
            missing_keys.remove(prefix + MERGED_FLAG)  # plain models' and older state dicts have no flag
        self.merged = merged

    def extra_repr(self) -> str:
        slices = "" if self.slices == ((0, self.out_features),) else f", slices={list(self.slices)}"
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}{slices}"


class _MergedGuard(torch.autograd.Function):
    """Identity on a merged layer's output whose backward raises: its adapter would silently get no gradient."""

    @staticmethod
    def forward(ctx, y: Tensor, *adapter_parameters: Tensor) -> Tensor:  # type: ignore[override]
        return y.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        raise RuntimeError(
            "backward through a merged adapter: its ΔW is folded into the frozen weight, so its adapter parameters "
            "would get no gradient. Call nv.unmerge(model) before training (for inference, use torch.no_grad())"
        )


def _add_low_rank_output(y: Tensor, xa: Tensor, b: Tensor) -> Tensor:
    """y + xa @ b as one addmm: the low-rank output is never written and read back separately."""
    out = torch.addmm(y.reshape(-1, y.shape[-1]), xa.reshape(-1, xa.shape[-1]), b.to(xa.dtype))
    return out.view(y.shape)


class _RecomputedInputDelta(torch.autograd.Function):
    """``y + (x A) B`` for x = act(h) that keeps h (already kept by the activation's own backward), not x.

    An adapted ``mlp.fc2`` needs its input for the gradient of A; a frozen model never stores that
    activation output, so recomputing it in backward keeps NOLA-MLP's memory at LoRA's level. The gradient
    for x joins the frozen path's before the activation's backward, which then runs once.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, y: Tensor, x: Tensor, h: Tensor, a: Tensor, b: Tensor, activation: nn.Module
    ) -> Tensor:
        ctx.activation = activation
        ctx.save_for_backward(h, a, b)
        return _add_low_rank_output(y, x @ a.to(x.dtype), b)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        h, a, b = ctx.saved_tensors
        dtype = grad.dtype
        a_, b_ = a.to(dtype), b.to(dtype)
        grad_xa = grad @ b_.t()
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            with torch.no_grad():
                x = ctx.activation(h).to(dtype)
            if ctx.needs_input_grad[3]:
                grad_a = (x.flatten(0, -2).t() @ grad_xa.flatten(0, -2)).to(a.dtype)
            if ctx.needs_input_grad[4]:
                grad_b = ((x @ a_).flatten(0, -2).t() @ grad.flatten(0, -2)).to(b.dtype)
        if ctx.needs_input_grad[1]:
            grad_x = grad_xa @ a_.t()
        return grad, grad_x, None, grad_a, grad_b, None


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
        super().__init__(base, slices or [(0, base.out_features)], config.rank, config.scaling)
        k, l = config.num_basis_a, config.num_basis_b  # noqa: E741 (the paper's k and l)
        self.basis = config.basis
        self.bank = bank if bank is not None else BasisBank()
        self.specs_a, self.specs_b = self._specs(config, name, self.in_features, self.width, self.slices)
        shapes = self.parameter_shapes(config, self.in_features, self.width, len(self.slices))
        self.nola_alpha = nn.Parameter(torch.full(shapes["nola_alpha"], 1.0 / k, device=base.weight.device))
        beta = 0.0 if config.init == "zero_delta" else 1.0 / l
        self.nola_beta = nn.Parameter(torch.full(shapes["nola_beta"], beta, device=base.weight.device))

    @classmethod
    def parameter_shapes(cls, config: NOLAConfig, in_features: int, width: int, num_slices: int) -> dict:
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
    def plan_basis_specs(cls, config: NOLAConfig, name: str, in_features: int, width: int,
                         slices: Sequence[Slice]) -> Tuple[BasisSpec, ...]:
        specs_a, specs_b = cls._specs(config, name, in_features, width, slices)
        return specs_a + specs_b

    @classmethod
    def injection_context(cls, config: NOLAConfig) -> Dict[str, Any]:
        return {"bank": BasisBank()}  # one bank per model: each shared basis is held once per device

    def shared_coefficients(self) -> List[Tuple[BasisSpec, str]]:
        if self.basis != "shared":
            return []
        return [(self.specs_a[0], "nola_alpha"), (self.specs_b[0], "nola_beta")]

    def _combine(self, coefficients: Tensor, specs: Tuple[BasisSpec, ...]) -> Tensor:
        if self.basis == "shared":
            codes = self.bank.get(specs[0], coefficients.device)
            return combine_bases(coefficients, specs[0], codes, self.shared_chunk)
        return torch.cat([combine_bases(coefficients[i : i + 1], spec) for i, spec in enumerate(specs)])

    def factors(self) -> Tuple[Tensor, Tensor]:
        with full_precision(self.nola_alpha.device):
            a = self._combine(self.trained("nola_alpha"), self.specs_a)
            b = self._combine(self.trained("nola_beta"), self.specs_b)
        return as_factors(self, a, b)

    def basis_specs(self) -> Tuple[BasisSpec, ...]:
        return self.specs_a + self.specs_b


def as_factors(layer: AdaptedLinear, a_rows: Tensor, b_rows: Tensor) -> Tuple[Tensor, Tensor]:
    """Combined basis rows viewed as the layer's factors: A (slices, in, rank), B (slices, rank, width)."""
    num_slices = len(layer.slices)
    return a_rows.view(num_slices, layer.in_features, layer.rank), b_rows.view(num_slices, layer.rank, layer.width)


class LoRALinear(AdaptedLinear):
    """LoRA: trained A (kaiming-uniform, portable seed) and B (zero), ΔW = (alpha/r)·A·B."""

    adapter_parameter_names = ("lora_A", "lora_B")

    def __init__(
        self, base: nn.Linear, config: LoRAConfig, name: str, slices: Optional[Sequence[Slice]] = None
    ) -> None:
        super().__init__(base, slices or [(0, base.out_features)], config.rank, config.scaling)
        num_slices, rank = len(self.slices), config.rank
        shapes = self.parameter_shapes(config, self.in_features, self.width, num_slices)
        # kaiming_uniform_(a=√5) of a (rank, in) weight has bound 1/√in; drawn from the portable generator.
        bound = 1 / math.sqrt(self.in_features)
        a = portable_uniform(config.seed, f"{name}/lora_A", num_slices * rank * self.in_features, bound)
        a = a.view(num_slices, rank, self.in_features).transpose(1, 2).contiguous()
        assert a.shape == shapes["lora_A"]
        self.lora_A = nn.Parameter(a.to(base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(shapes["lora_B"], device=base.weight.device))

    @classmethod
    def parameter_shapes(cls, config: LoRAConfig, in_features: int, width: int, num_slices: int) -> dict:
        return {"lora_A": (num_slices, in_features, config.rank), "lora_B": (num_slices, config.rank, width)}

    def factors(self) -> Tuple[Tensor, Tensor]:
        return self.trained("lora_A").float(), self.trained("lora_B").float()
