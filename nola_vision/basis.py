"""Portable, counter-based random bases for NOLA.

Every basis value is a pure function of (seed, stream, basis index, element index), computed with 64-bit
integer tensor ops only, so CPU and CUDA give bit-identical values in every process and torch version, and
the global RNG is never touched. Basis ``i`` does not depend on how many bases are drawn, so ``k`` can grow
without changing the first bases.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

GENERATOR_VERSION = "nola-triple32-v1"

_MASK32 = 0xFFFFFFFF
# Elements generated per step: bounds the int64 temporaries to a few tens of MB.
_GENERATION_CHUNK = 1 << 21


def _mul32(x: Tensor, constant: int) -> Tensor:
    """(x * constant) mod 2**32 for x in [0, 2**32), exact in int64 on every device (no overflow)."""
    low = (x & 0xFFFF) * constant
    high = (((x >> 16) * constant) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _triple32(x: Tensor) -> Tensor:
    """Chris Wellons' triple32 integer hash: a bijection of [0, 2**32) with very low bias."""
    x = x ^ (x >> 17)
    x = _mul32(x, 0xED5AD4BB)
    x = x ^ (x >> 11)
    x = _mul32(x, 0xAC4C1B51)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x31848BAB)
    return x ^ (x >> 14)


def stream_key(seed: int, stream: str) -> Tuple[int, int]:
    """Two 32-bit keys for a (seed, stream) pair; sha256 keeps them stable across processes and platforms."""
    digest = hashlib.sha256(f"{int(seed)}|{stream}".encode()).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")


def random_bits(seed: int, stream: str, counters: Tensor) -> Tensor:
    """Uniform 32-bit integers (as int64) for the given non-negative int64 counters."""
    key0, key1 = stream_key(seed, stream)
    x = _triple32((counters & _MASK32) ^ key0)
    return _triple32(x ^ (counters >> 32) ^ key1)


def portable_uniform(
    seed: int,
    stream: str,
    n: int,
    bound: float,
    start: int = 0,
    device: Optional[torch.device | str] = None,
) -> Tensor:
    """Elements ``start .. start+n`` of a stream as float32 values in [-bound, bound), identical on every device."""
    # One IEEE multiply of exact integers: the same float32 result on every device.
    scale = torch.tensor(bound / 2**23, dtype=torch.float32, device=device)
    out = torch.empty(n, dtype=torch.float32, device=device)
    for offset in range(0, n, _GENERATION_CHUNK):
        size = min(_GENERATION_CHUNK, n - offset)
        counters = torch.arange(start + offset, start + offset + size, dtype=torch.int64, device=device)
        bits = random_bits(seed, stream, counters)
        out[offset : offset + size] = ((bits >> 8) - (1 << 23)).to(torch.float32) * scale
    return out


def uniform_bases(
    seed: int,
    stream: str,
    shape: Sequence[int],
    count: int,
    start: int = 0,
    device: Optional[torch.device | str] = None,
) -> Tensor:
    """Bases ``start .. start+count`` of a stream, float32 of shape (count, *shape), entries U(±1/√numel).

    The bound equals ``kaiming_uniform_(a=√5)`` on a (count, *shape) tensor, as in the NOLA authors' code.
    """
    numel = math.prod(shape)
    values = portable_uniform(seed, stream, count * numel, 1.0 / math.sqrt(numel), start * numel, device)
    return values.view(count, *shape)


@dataclass(frozen=True)
class BasisSpec:
    """What identifies one set of bases: the generator inputs and the shape of each basis matrix."""

    seed: int
    stream: str
    shape: Tuple[int, ...]
    count: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def generate(self, device: Optional[torch.device | str] = None, start: int = 0, count: Optional[int] = None) -> Tensor:
        """Bases as a (count, numel) float32 matrix, ready for ``coefficients @ bases``."""
        count = self.count - start if count is None else count
        return uniform_bases(self.seed, self.stream, self.shape, count, start, device).view(count, self.numel)


def fingerprint(specs: Sequence[BasisSpec], probes: int = 16) -> str:
    """A short hash of the bases (first and last basis, first ``probes`` values each) plus the generator version.

    Cheap to recompute on load, and it changes whenever the generator or any spec would give other values.
    """
    digest = hashlib.sha256(GENERATOR_VERSION.encode())
    for spec in sorted(set(specs), key=lambda s: (s.stream, s.shape, s.count, s.seed)):
        digest.update(f"{spec.seed}|{spec.stream}|{spec.shape}|{spec.count}".encode())
        for index in sorted({0, spec.count - 1}):
            first = uniform_bases(spec.seed, spec.stream, spec.shape, 1, start=index).flatten()[:probes]
            digest.update(first.numpy().tobytes())
    return digest.hexdigest()[:16]


class BasisBank:
    """Generated shared bases, one tensor per spec, held on one device at a time.

    Layers look their bases up here at forward time instead of registering buffers, so ``model.to(device)``
    cannot silently make one copy per layer, and checkpoints never contain bases.
    """

    def __init__(self) -> None:
        self._tensors: Dict[BasisSpec, Tensor] = {}

    def get(self, spec: BasisSpec, device: torch.device) -> Tensor:
        """The (count, numel) basis matrix of ``spec`` on ``device``, generated there on first use."""
        tensor = self._tensors.get(spec)
        if tensor is None or tensor.device != device:
            # Generate on the target device (portable bits) and drop the copy on the old device.
            tensor = spec.generate(device)
            self._tensors[spec] = tensor
        return tensor

    def tensors(self) -> Dict[BasisSpec, Tensor]:
        """The bases generated so far (for memory accounting and tests)."""
        return dict(self._tensors)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def clear(self) -> None:
        self._tensors.clear()

    def __getstate__(self) -> dict:
        # Bases are regenerated on demand; never pickle or deep-copy them.
        return {"_tensors": {}}


class _GeneratedCombination(torch.autograd.Function):
    """coefficients (S, k) @ bases (k, numel), with bases regenerated in chunks in forward and backward.

    Memory stays at one chunk of bases per call instead of k × numel per layer.
    """

    @staticmethod
    def forward(ctx, coefficients: Tensor, spec: BasisSpec, chunk: int) -> Tensor:  # type: ignore[override]
        ctx.spec, ctx.chunk = spec, chunk
        ctx.save_for_backward(coefficients)
        coefficients32 = coefficients.float()
        out = coefficients32.new_zeros(coefficients.shape[0], spec.numel)
        for start in range(0, spec.count, chunk):
            count = min(chunk, spec.count - start)
            bases = spec.generate(coefficients.device, start, count)
            out.addmm_(coefficients32[:, start : start + count], bases)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (coefficients,) = ctx.saved_tensors
        spec, chunk = ctx.spec, ctx.chunk
        grad32 = grad.float()
        grad_coefficients = torch.empty(coefficients.shape, dtype=torch.float32, device=coefficients.device)
        for start in range(0, spec.count, chunk):
            count = min(chunk, spec.count - start)
            bases = spec.generate(coefficients.device, start, count)
            grad_coefficients[:, start : start + count] = grad32 @ bases.t()
        return grad_coefficients.to(coefficients.dtype), None, None


def combine_generated(coefficients: Tensor, spec: BasisSpec, chunk: int = 64) -> Tensor:
    """``coefficients @ bases`` for per-layer bases that are never stored (see ``_GeneratedCombination``)."""
    return _GeneratedCombination.apply(coefficients, spec, chunk)
