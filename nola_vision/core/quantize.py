"""Uniform affine quantisation of adapter coefficients (per tensor), 4-bit packing, and its STE for training."""
from __future__ import annotations

import struct
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .checks import FLOAT32_TINY, as_integer

__all__ = ["INTEGER_BITS", "QAT_BITS", "SUPPORTED_BITS", "dequantize", "fake_quantize", "grid_step", "head_bits",
           "pack4", "quantize", "require_bits", "seen_alike", "unpack4"]

# The one list of bit widths: adapter files store floats at 32 or 16 bits, integer codes at 8 or 4.
SUPPORTED_BITS = (32, 16, 8, 4)
INTEGER_BITS = tuple(bits for bits in SUPPORTED_BITS if bits <= 8)
# Quantisation-aware training simulates the integer widths.
QAT_BITS = INTEGER_BITS
# The classifier head is a few thousand values: below 16 bits it keeps 8-bit codes, which cost little and keep accuracy.
MIN_HEAD_INTEGER_BITS = 8
# Steps below float32's smallest normal value (FLOAT32_TINY) are not held by float32 arithmetic: such ranges are coded
# in float64.
# grid_step looks this many float32 steps either side of a computed step (a recomputed one is a few away).
_NEAR = 32
# Fake quantisation of values on a grid looks this many either side first (one or two away in practice), then as far
# as grid_step does, so that it shows the values a file stores.
_ON_GRID = 4


def head_bits(bits: int) -> int:
    """The width the classifier head is stored with when the adapter tensors are stored at ``bits``."""
    return bits if bits >= 16 else max(bits, MIN_HEAD_INTEGER_BITS)


def seen_alike(first: Optional[int], second: Optional[int], adapts_layers: bool) -> bool:
    """Whether trained tensors are seen alike at ``first`` and ``second`` bits (quantisation-aware widths, or file
    bits; None: full precision): the same bits, or, for a head alone (a linear probe), the same head width (8 bits
    for both 4 and 8)."""
    if first and second and not adapts_layers:
        return head_bits(first) == head_bits(second)
    return first == second


def require_bits(bits: Any, name: str = "bits", allowed: Sequence[int] = SUPPORTED_BITS,
                 optional: bool = False) -> Optional[int]:
    """``bits`` as an int from ``allowed`` (None too when ``optional``); a ValueError names ``name`` otherwise.

    Any integer type is taken (``numpy.int64(16)``), a float or bool is not (``16.0`` is refused, not rounded).
    """
    if bits is None and optional:
        return None
    value = as_integer(bits)
    if value not in allowed:
        choices = ", ".join(map(str, allowed)) + (" or None" if optional else "")
        raise ValueError(f"{name} must be one of {choices} (an integer), got {bits!r} ({type(bits).__name__})")
    return value


def quantize(values: Tensor, bits: int) -> Tuple[Tensor, float, float]:
    """Codes in [0, 2**bits - 1] (uint8) with (minimum, step): ``value ≈ minimum + code * step``.

    The rounding error of every value is at most ``step / 2 = (max - min) / (2 * (2**bits - 1))``.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"integer quantisation supports 2 to 8 bits, got {bits}")
    flat = values.detach().float().flatten()
    minimum, maximum = flat.min().item() + 0.0, flat.max().item()  # + 0.0: a -0.0 minimum as the 0.0 it decodes to
    levels = 2**bits - 1
    step = (maximum - minimum) / levels
    if step == 0.0:  # a constant tensor (e.g. the paper's α = 1/k init) is exact with code 0
        return torch.zeros_like(flat, dtype=torch.uint8), minimum, 0.0
    if step < FLOAT32_TINY:  # float32 cannot hold the step (values near 1e-44): in float64
        codes = torch.round((flat.double() - minimum) / step).clamp_(0, levels).to(torch.uint8)
        return codes, minimum, step
    # At half scale, so that a range wider than float32's largest value (values near ±3e38) does not overflow;
    # halving is exact, so the codes are those of (flat - minimum) / step.
    codes = torch.round((flat / 2 - minimum / 2) / (step / 2)).clamp_(0, levels).to(torch.uint8)
    return codes, minimum, step


def grid_step(values: Tensor, codes: Tensor, minimum: float, step: float) -> float:
    """The step a file records for ``quantize(values)``'s ``codes``: the smallest float32 step, among those near
    ``step``, that decodes them to the same values, so that a file's bytes depend on what it gives back alone.

    Values a save decoded (an adapter loaded and saved again) keep exactly their step, and so their bytes: ``step``,
    computed anew from the decoded maximum, may differ from the recorded one in its last digits. Values off every grid
    (trained ones) get the smallest step that decodes as ``step`` does, so training quantisation-aware (which decodes
    with ``step``) sees what the file gives back."""
    if not step or abs(step) < FLOAT32_TINY:  # a constant tensor, or a float64 range: as quantize gave them
        return step
    candidates = _steps_near(step, range(-_NEAR, _NEAR + 1))
    flat = values.detach().float().flatten()
    for target in (flat, dequantize(codes, minimum, step)):  # values on a grid, else what ``step`` decodes
        found = next((c for c in candidates if torch.equal(dequantize(codes, minimum, c), target)), None)
        if found is not None:
            return found
    return step  # never: the float32 step nearest ``step`` decodes as ``step`` does


def dequantize(codes: Tensor, minimum: float, step: float) -> Tensor:
    """``minimum + codes * step`` in float32, at half scale like ``quantize``: finite for every finite range."""
    if 0.0 < abs(step) < FLOAT32_TINY:  # as in quantize: in float64, then rounded once to float32
        return (minimum + codes.double() * step).float()
    return (minimum / 2 + codes.float() * (step / 2)) * 2


def pack4(codes: Tensor) -> Tensor:
    """Two 4-bit codes per byte (low nibble first); an odd count is padded with one zero nibble."""
    codes = codes.flatten().to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    return codes[0::2] | (codes[1::2] << 4)


def unpack4(packed: Tensor, numel: int) -> Tensor:
    """The first ``numel`` 4-bit codes of ``pack4``'s bytes (low nibble first)."""
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=1).flatten()
    return codes[:numel]


class _FakeQuantize(torch.autograd.Function):
    """Quantise-dequantise in forward, identity gradient in backward (straight-through estimator)."""

    @staticmethod
    def forward(ctx, values: Tensor, bits: int, dtype: torch.dtype) -> Tensor:  # type: ignore[override]
        ctx.dtype = values.dtype
        return _stored_values(values, bits, dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad.to(ctx.dtype), None, None


def fake_quantize(values: Tensor, bits: int, dtype: Optional[torch.dtype] = None) -> Tensor:
    """What ``values`` become after saving at ``bits``, in ``dtype`` (default: theirs), differentiable by the
    straight-through estimator; under ``torch.compile``, one opaque operator.

    A file's codes decode to float32: a bfloat16 tensor that is combined in float32 (NOLA's coefficients) passes
    ``dtype=torch.float32``, so that it computes with what a model loading the file (float32 coefficients) does."""
    dtype = values.dtype if dtype is None else dtype
    if torch.compiler.is_compiling():
        return _fake_quantize_op(values, bits, dtype)
    return _FakeQuantize.apply(values, bits, dtype)


# Traced, quantize's range (read with .item()) became a constant of the graph: a compiled quantisation-aware step
# recompiled at every optimizer step until dynamo's recompile limit. As an operator the range stays a runtime value.
@torch.library.custom_op("nola_vision::fake_quantize", mutates_args=())
def _fake_quantize_op(values: Tensor, bits: int, dtype: torch.dtype) -> Tensor:
    stored = _stored_values(values, bits, dtype)
    # values on their grid come back as themselves (a view), which an operator's output may not be
    return stored.clone() if stored.untyped_storage().data_ptr() == values.untyped_storage().data_ptr() else stored


def _stored_values(values: Tensor, bits: int, dtype: torch.dtype) -> Tensor:
    """``values`` coded at ``bits`` and decoded, in their shape and ``dtype``: what a file at ``bits`` gives back.

    Values on a grid already (a file at ``bits`` loaded into a model training at ``bits``) come back unchanged, as
    the file's step (``grid_step``) decodes them: the step computed anew from their decoded maximum may differ in
    its last digits, which moved some by one float32 step from the values training saw."""
    codes, minimum, step = quantize(values, bits)
    decoded = dequantize(codes, minimum, step)
    if step and abs(step) >= FLOAT32_TINY:
        flat = values.detach().float().flatten()
        off = (decoded - flat).abs().max().item()
        if 0 < off <= abs(step) * (2**bits - 1) * 2**-17:  # within a few steps' rounding of the range: on a grid
            decoded = _decoded_on_their_grid(flat, codes, minimum, step, decoded)
    return decoded.view_as(values).to(dtype)


def _decoded_on_their_grid(flat: Tensor, codes: Tensor, minimum: float, step: float, decoded: Tensor) -> Tensor:
    """``flat`` itself where a float32 step within ``_NEAR`` of ``step`` decodes ``codes`` to it exactly
    (``grid_step``'s first search: then a file stores ``flat``), else ``decoded``. The ``_ON_GRID`` nearest steps are
    tried first, in one product; the rest only where none of them is the grid."""
    offsets = range(-_NEAR, _NEAR + 1)
    for ring in ([o for o in offsets if abs(o) <= _ON_GRID], [o for o in offsets if abs(o) > _ON_GRID]):
        candidates = torch.tensor(_steps_near(step, ring), dtype=torch.float32, device=flat.device)
        grids = (minimum / 2 + codes.float().unsqueeze(0) * (candidates.unsqueeze(1) / 2)) * 2
        if bool((grids == flat).all(dim=1).any()):
            return flat
    return decoded


def _steps_near(step: float, offsets: Sequence[int]) -> List[float]:
    """The normal float32 numbers ``offsets`` float32 steps away from ``step`` (rounded to float32): the candidate
    grid steps. Counted on the float's bits in Python, not by viewing a tensor as int32, which the TorchScript tracer
    (``torch.jit.trace``, the ONNX export) cannot record: exporting a quantisation-aware model failed on it."""
    bits = struct.unpack("<i", struct.pack("<f", step))[0]
    near = (struct.unpack("<f", struct.pack("<i", bits + offset))[0] for offset in offsets)
    return [value for value in near if value >= FLOAT32_TINY]


@_fake_quantize_op.register_fake
def _(values, bits, dtype):
    return torch.empty_like(values, dtype=dtype)


def _remember_dtype(ctx, inputs, output) -> None:
    ctx.dtype = inputs[0].dtype


def _straight_through(ctx, grad: Tensor):
    return grad.to(ctx.dtype), None, None


_fake_quantize_op.register_autograd(_straight_through, setup_context=_remember_dtype)
