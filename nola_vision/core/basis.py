"""Portable, counter-based random bases for NOLA.

Every basis value is a pure function of (seed, stream, basis index, element index), computed with 64-bit
integer tensor ops only, so CPU and CUDA give bit-identical values in every process and torch version, and
the global RNG is never touched. Basis ``i`` does not depend on how many bases are drawn, so ``k`` can grow
without changing the first bases. Values lie on a 16-bit grid and are held as int16 codes: shared bases
cost 2 bytes per value, and only a small chunk is ever decoded to float32. On the CPU the same hash runs in
wrapping uint32 NumPy arithmetic (about 2 ns per value on one core), cheap enough to regenerate the shared bases
in a training step instead of holding them under its activation peak (``BasisBank``).
"""
from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from . import functions

GENERATOR_VERSION = "nola-lowbias32x2-int16-v1"

_MASK32 = 0xFFFFFFFF


def _generation_chunk(device: Optional[torch.device | str]) -> int:
    """Elements hashed per step: cache-sized on the CPU (20x faster than large steps), large on accelerators."""
    return 1 << 15 if torch.device(device or "cpu").type == "cpu" else 1 << 22


# lowbias32's rounds (shift, then multiply) and its final shift: the int64 tensor and uint32 NumPy hashes share them.
_HASH_ROUNDS = ((16, 0x7FEB352D), (15, 0x046CA68B))
_HASH_FINAL_SHIFT = 16


def _hash32(x: Tensor) -> Tensor:
    """Wellons' lowbias32 integer hash of 32-bit values held in int64, in place on ``x``.

    Both multipliers are below 2**31 (the second is lowbias32's with its top bit cleared, which changes
    only bit 31 of each product), so every product stays below 2**63: exact in int64 on every device.
    """
    for shift, multiplier in _HASH_ROUNDS:
        x ^= x >> shift
        x.mul_(multiplier).bitwise_and_(_MASK32)
    x ^= x >> _HASH_FINAL_SHIFT
    return x


def stream_key(seed: int, stream: str) -> Tuple[int, int]:
    """Two 32-bit keys for a (seed, stream) pair; sha256 keeps them stable across processes and platforms."""
    digest = hashlib.sha256(f"{int(seed)}|{stream}".encode()).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")


def random_bits(seed: int, stream: str, counters: Tensor) -> Tensor:
    """Uniform 32-bit integers (as int64) for non-negative int64 counters: two keyed hash rounds."""
    key0, key1 = stream_key(seed, stream)
    x = _hash32((counters & _MASK32) ^ key0)
    x ^= (counters >> 32) ^ key1
    return _hash32(x)


def portable_uniform(
    seed: int,
    stream: str,
    n: int,
    bound: float,
    start: int = 0,
    device: Optional[torch.device | str] = None,
) -> Tensor:
    """Elements ``start .. start+n`` of a stream as float32 values in [-bound, bound), identical on every device
    (the CPU when ``device`` is None, whatever torch's default device)."""
    device = torch.device(device or "cpu")
    # One IEEE multiply of exact integers: the same float32 result on every device.
    scale = torch.tensor(bound / 2**23, dtype=torch.float32, device=device)
    out = torch.empty(n, dtype=torch.float32, device=device)
    chunk = _generation_chunk(device)
    for offset in range(0, n, chunk):
        size = min(chunk, n - offset)
        counters = torch.arange(start + offset, start + offset + size, dtype=torch.int64, device=device)
        bits = random_bits(seed, stream, counters)
        out[offset : offset + size] = ((bits >> 8) - (1 << 23)).to(torch.float32) * scale
    return out


def basis_codes(
    seed: int, stream: str, n: int, start: int = 0, device: Optional[torch.device | str] = None
) -> Tensor:
    """Elements ``start .. start+n`` of a stream as int16 codes c; the basis value is (c + ½)·bound/2¹⁵.

    Bases are uniform on a symmetric 65,536-level grid over (-bound, bound): kaiming-uniform at 16-bit
    resolution, stored in 2 bytes per value instead of 4, so shared bases cost half the memory. Each
    32-bit hash gives two codes (element 2i: high half of hash i, element 2i+1: low half).
    """
    device = torch.device(device or "cpu")
    if torch.jit.is_tracing():  # TorchScript's tracer takes no device argument of an operator: the codes are constants
        return _generate_codes(seed, stream, n, start, device)
    return _basis_codes(seed, stream, n, start, device)


# One opaque operator for torch.compile: tracing the chunked hash loop would unroll thousands of integer ops
# into the graph (minutes of compilation for ViT-B's shared bases); eager calls run the same code.
@torch.library.custom_op("nola_vision::basis_codes", mutates_args=())
def _basis_codes(seed: int, stream: str, n: int, start: int, device: torch.device) -> Tensor:
    return _generate_codes(seed, stream, n, start, device)


def _generate_codes(seed: int, stream: str, n: int, start: int, device: torch.device) -> Tensor:
    """``basis_codes``' body: NumPy on the CPU, int64 tensor ops elsewhere."""
    if device.type == "cpu":
        return torch.from_numpy(_cpu_codes(seed, stream, n, start))
    out = torch.empty(n, dtype=torch.int16, device=device)
    chunk = _generation_chunk(device)
    for offset in range(0, n, chunk):
        size = min(chunk, n - offset)
        first = start + offset
        pairs = torch.arange(first >> 1, ((first + size - 1) >> 1) + 1, dtype=torch.int64, device=device)
        bits = random_bits(seed, stream, pairs)
        halves = torch.stack([bits >> 16, bits & 0xFFFF], dim=1).flatten()
        skip = first & 1
        out[offset : offset + size] = (halves[skip : skip + size] - (1 << 15)).to(torch.int16)
    return out


def _cpu_codes(seed: int, stream: str, n: int, start: int) -> np.ndarray:
    """The same codes as the int64 tensor path, hashed in wrapping uint32 NumPy arithmetic: 6x faster on CPU.

    lowbias32 only needs the low 32 bits of each product, which uint32 multiplication keeps exactly. Each hash
    is rotated by 16 bits so that its little-endian int16 view holds (high half, low half), and flipping the
    halves' top bits turns offset-binary values into the codes (h - 2**15). NumPy's integer loops release the
    GIL, so torch's intra-op threads (idle meanwhile) hash disjoint ranges in parallel.
    """
    if n == 0:
        return np.empty(0, dtype=np.int16)
    keys = tuple(np.uint32(key) for key in stream_key(seed, stream))
    first_pair, end_pair = start >> 1, ((start + n - 1) >> 1) + 1
    hashes = np.empty(end_pair - first_pair, dtype=np.uint32)
    workers = min(torch.get_num_threads(), -(-hashes.size // _CPU_HASH_CHUNK))
    bounds = [hashes.size * i // workers // _CPU_HASH_CHUNK * _CPU_HASH_CHUNK for i in range(workers)] + [hashes.size]
    ranges = [(first_pair + begin, hashes[begin:end]) for begin, end in zip(bounds, bounds[1:])]
    if workers == 1:
        _hash_pairs(*ranges[0], *keys, _CPU_HASH_CHUNK)
    else:
        list(_thread_pool(workers).map(lambda r: _hash_pairs(*r, *keys, _CPU_PARALLEL_HASH_CHUNK), ranges))
    skip = start & 1
    return hashes.view(np.int16)[skip : skip + n]


_CPU_HASH_CHUNK = 1 << 16  # hashes per NumPy pass: its arrays stay in the L2 cache (measured fastest)
# Hashes per pass when several threads hash: each NumPy call releases the GIL only for its loop, and taking the GIL
# back costs tens of microseconds when another thread holds it, so the threads' passes must be long enough not to
# serialise on those hand-overs (2 threads on 64K-hash passes were no faster than 1; on 256K, 1.3-1.6x faster).
_CPU_PARALLEL_HASH_CHUNK = 1 << 18
_CPU_ARANGE = np.arange(max(_CPU_HASH_CHUNK, _CPU_PARALLEL_HASH_CHUNK), dtype=np.uint32)
# This process's pool and its size, by process id (a forked child makes its own: threads do not survive fork).
_POOLS: Dict[int, Tuple[int, ThreadPoolExecutor]] = {}


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """The process's pool of at least ``workers`` threads: one pool, grown to the most ever asked (a pool per count
    left every count's threads alive, 70 idle threads after torch.set_num_threads went through 2..16)."""
    size, pool = _POOLS.get(os.getpid(), (0, None))
    if pool is None or size < workers:
        # the old pool's threads end once it is collected; no shutdown, which would fail a thread about to map on it
        pool = ThreadPoolExecutor(workers, thread_name_prefix="nola-bases")
        _POOLS[os.getpid()] = (workers, pool)
    return pool


def _hash_pairs(first_pair: int, out: np.ndarray, key0: np.uint32, key1: np.uint32, chunk: int) -> None:
    """Rotated, offset lowbias32x2 hashes of pair counters ``first_pair ..`` into ``out``, ``chunk`` at a time."""
    scratch = np.empty(min(chunk, out.size), dtype=np.uint32)
    offset = 0
    while offset < out.size:
        pair = first_pair + offset
        # A chunk never crosses a multiple of 2**32 pairs, so the counter's high word is one scalar.
        size = min(chunk, out.size - offset, (((pair >> 32) + 1) << 32) - pair)
        x, tmp = out[offset : offset + size], scratch[:size]
        np.add(_CPU_ARANGE[:size], np.uint32(pair & _MASK32), out=x)
        x ^= key0
        _hash32_numpy(x, tmp)
        x ^= np.uint32(pair >> 32) ^ key1
        _hash32_numpy(x, tmp)
        np.left_shift(x, np.uint32(16), out=tmp)
        x >>= np.uint32(16)
        x |= tmp
        x ^= np.uint32(0x80008000)
        offset += size


def _hash32_numpy(x: np.ndarray, tmp: np.ndarray) -> None:
    """``_hash32`` in place on uint32 values, ``tmp`` a scratch array of the same size."""
    for shift, multiplier in _HASH_ROUNDS:
        np.right_shift(x, np.uint32(shift), out=tmp)
        x ^= tmp
        x *= np.uint32(multiplier)
    np.right_shift(x, np.uint32(_HASH_FINAL_SHIFT), out=tmp)
    x ^= tmp


@_basis_codes.register_fake
def _(seed: int, stream: str, n: int, start: int, device: torch.device) -> Tensor:
    return torch.empty(n, dtype=torch.int16, device=device)


@dataclass(frozen=True)
class BasisSpec:
    """One set of bases: the generator inputs, the shape of each basis matrix, and how many there are.

    The bound 1/√numel equals ``kaiming_uniform_(a=√5)`` on a (count, *shape) tensor, as in the NOLA
    authors' code.
    """

    seed: int
    stream: str
    shape: Tuple[int, ...]
    count: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def step(self) -> float:
        """Value of one code unit: basis value = (code + ½) · step."""
        return 1.0 / math.sqrt(self.numel) / 2**15

    def codes(self, device: Optional[torch.device | str] = None, start: int = 0, count: Optional[int] = None) -> Tensor:
        """Bases ``start .. start+count`` as an int16 (count, numel) code matrix."""
        count = self.count - start if count is None else count
        codes = basis_codes(self.seed, self.stream, count * self.numel, start * self.numel, device)
        return codes.view(count, self.numel)

    def generate(
        self, device: Optional[torch.device | str] = None, start: int = 0, count: Optional[int] = None
    ) -> Tensor:
        """Bases as float32 values, shape (count, *shape)."""
        codes = self.codes(device, start, count)
        return decode(codes, self.step).view(codes.shape[0], *self.shape)


def basis_streams(
    mode: str, layer: str, in_features: int, rank: int, width: int, slices: Sequence[Tuple[int, int]]
) -> Tuple[List[str], List[str]]:
    """Stream names of the A and B bases of one adapted layer: the names (with the seed) select the bases.

    ``shared``: keyed by factor shape only, so every layer (and slice) of that shape uses the same bases, as
    the authors' code does by reseeding before each layer. ``per_layer``: one stream per layer and slice.
    """
    if mode == "shared":
        return [f"A/{in_features}x{rank}"], [f"B/{rank}x{width}"]
    return [f"{layer}/{start}:{end}/A" for start, end in slices], [f"{layer}/{start}:{end}/B" for start, end in slices]


def decode(codes: Tensor, step: float) -> Tensor:
    """float32 basis values of int16 codes: (code + ½)·step, exact up to one rounding on every device."""
    return (codes.to(torch.float32) + 0.5) * torch.tensor(step, dtype=torch.float32, device=codes.device)


def fingerprint(specs: Sequence[BasisSpec], probes: int = 16) -> str:
    """A short hash of the bases (first and last basis, first ``probes`` codes each) plus the generator version.

    Cheap to recompute on load, and it changes whenever the generator or any spec would give other values.
    """
    digest = hashlib.sha256(GENERATOR_VERSION.encode())
    for spec in sorted(set(specs), key=lambda s: (s.stream, s.shape, s.count, s.seed)):
        digest.update(f"{spec.seed}|{spec.stream}|{spec.shape}|{spec.count}".encode())
        for index in sorted({0, spec.count - 1}):
            # Only the probed codes are generated: a crafted huge shape cannot allocate here.
            codes = basis_codes(spec.seed, spec.stream, min(probes, spec.numel), index * spec.numel)
            digest.update(codes.numpy().tobytes())
    return digest.hexdigest()[:16]


class BasisBank:
    """Shared bases as int16 codes, held on one device at a time, or regenerated in every pass.

    Layers look their bases up here at forward time instead of registering buffers, so ``model.to(device)``
    cannot silently make one copy per layer, and checkpoints never contain bases. ``keep=None`` (the default)
    holds the codes except in a CPU pass that records gradients, where they would sit under the training step's
    activation peak (60 MiB for ViT-B's shared bases, 9% of a batch-8 step): the backward pass generates them
    (its combination runs last, when the activations are gone), the next forward pass uses and releases them, so
    a step generates them once (about 1.5% of a ViT-B step on one core). On accelerators regenerating is
    launch-bound and the codes are small next to the activations. ``keep=True`` always holds them (serving),
    ``keep=False`` never does (each pass regenerates them chunk by chunk).
    """

    def __init__(self, keep: Optional[bool] = None) -> None:
        self.keep = keep
        self._codes: Dict[BasisSpec, Tensor] = {}

    def holds(self, device: torch.device) -> bool:
        """Whether a pass on ``device`` in the current grad mode reads held codes (else it regenerates them)."""
        if self.keep is not None:
            return self.keep
        return functions.launch_bound(device) or not torch.is_grad_enabled()

    def get(self, spec: BasisSpec, device: torch.device) -> Optional[Tensor]:
        """The (count, numel) int16 codes of ``spec`` on ``device``: held (generated there on first use) where
        this pass holds them; otherwise handed over and released if held, else ``None`` (regenerate per chunk)."""
        if not self.holds(device):
            codes = self._codes.pop(spec, None)
            return codes if codes is not None and codes.device == device else None
        codes = self._codes.get(spec)
        if codes is None or codes.device != device:
            # Generate on the target device (portable bits) and drop the copy on the old device.
            codes = spec.codes(device)
            self._codes[spec] = codes
        return codes

    def release(self) -> None:
        """Drop every held code (they are generated again where a pass needs them)."""
        self._codes.clear()

    def retain(self, specs: Iterable[BasisSpec]) -> None:
        """Drop the codes held for any basis other than ``specs``."""
        keep = set(specs)
        self._codes = {spec: codes for spec, codes in self._codes.items() if spec in keep}

    def release_elsewhere(self, device: torch.device) -> None:
        """Drop the codes held on devices other than ``device``: a model moved off a device leaves none there."""
        self._codes = {spec: codes for spec, codes in self._codes.items() if codes.device == device}

    def tensors(self) -> Dict[BasisSpec, Tensor]:
        """The codes held now (for memory accounting and tests)."""
        return dict(self._codes)

    def nbytes(self) -> int:
        """Bytes of the codes held now."""
        return sum(t.numel() * t.element_size() for t in self._codes.values())

    def __getstate__(self) -> dict:
        # Bases are regenerated on demand; never pickle or deep-copy them.
        return {"keep": self.keep, "_codes": {}}

    def __setstate__(self, state: dict) -> None:
        self.keep, self._codes = state.get("keep"), {}


def factor_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype factors are computed in from trained tensors of ``dtype``: float32, or float64 for a float64
    model, so that its factors (and ``gradcheck`` of them) keep float64's precision."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Decoded values per chunk on accelerators: 8M, 32 MiB in float32 (ViT-B's shared B bases in two chunks); a chunk
# holds at least the CPU's number of bases, so bases wider than 8M / chunk values exceed it.
_ACCELERATOR_CHUNK_ELEMENTS = 1 << 23


class _CombineBases(torch.autograd.Function):
    """``coefficients (S, k) @ bases (k, numel)`` in ``factor_dtype``, decoding (or generating) bases a chunk at a time.

    Only one chunk of float32 codes exists at any moment, in forward and in backward, whether the codes are
    stored (shared bases) or regenerated (per-layer bases). Codes the forward pass was handed but not held are
    not kept for backward, which asks ``bank`` again (or regenerates them). With bases = (codes + ½)·step, the ½
    is applied once through the coefficient sums instead of to every decoded value.
    """

    @staticmethod
    def forward(ctx, coefficients: Tensor, spec: BasisSpec, codes: Optional[Tensor], chunk: int,  # type: ignore[override]
                keep_codes: bool, bank: Optional[BasisBank]) -> Tensor:
        ctx.spec, ctx.codes, ctx.chunk, ctx.bank = spec, codes if keep_codes else None, chunk, bank
        ctx.save_for_backward(coefficients)
        wide = coefficients.to(factor_dtype(coefficients.dtype))
        half_sums = 0.5 * wide.sum(1, keepdim=True)
        if codes is not None and chunk >= spec.count:  # one chunk (accelerators): no buffer, no slices, no copy
            return torch.addmm(half_sums, wide, codes.to(wide.dtype)).mul_(spec.step)
        out = half_sums.expand(-1, spec.numel).contiguous()
        for start, rows in _chunks(spec, codes, chunk, coefficients.device, wide.dtype):
            out.addmm_(wide[:, start : start + rows.shape[0]], rows)
        return out.mul_(spec.step)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (coefficients,) = ctx.saved_tensors
        codes = ctx.codes
        if codes is None and ctx.bank is not None:
            codes = ctx.bank.get(ctx.spec, coefficients.device)  # grad mode is off here: generated and held
        if torch.is_grad_enabled():  # backward(create_graph=True): a projection that can be differentiated again
            grad_coefficients = _ProjectOnBases.apply(grad, ctx.spec, codes, ctx.chunk)
        else:
            grad_coefficients = _project_on_bases(grad, ctx.spec, codes, ctx.chunk)
        return grad_coefficients.to(coefficients.dtype), None, None, None, None, None


class _ProjectOnBases(torch.autograd.Function):
    """``grad (S, numel) @ basesᵀ``, the combination's backward, as a function whose own backward is the
    combination: a double backward (MAML's inner step) differentiates NOLA's coefficient gradients exactly."""

    @staticmethod
    def forward(ctx, grad: Tensor, spec: BasisSpec, codes: Optional[Tensor], chunk: int) -> Tensor:  # type: ignore[override]
        ctx.spec, ctx.codes, ctx.chunk, ctx.dtype = spec, codes, chunk, grad.dtype
        return _project_on_bases(grad, spec, codes, chunk)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        combined = _CombineBases.apply(grad, ctx.spec, ctx.codes, ctx.chunk, True, None)
        return combined.to(ctx.dtype), None, None, None


def _project_on_bases(grad: Tensor, spec: BasisSpec, codes: Optional[Tensor], chunk: int) -> Tensor:
    """``grad @ basesᵀ`` as (S, k) in ``factor_dtype``, decoding (or generating) the bases a chunk at a time."""
    wide = grad.to(factor_dtype(grad.dtype)) * spec.step
    if codes is not None and chunk >= spec.count:  # one chunk (accelerators): no buffer, no slices, no copies
        return wide @ codes.to(wide.dtype).t() + 0.5 * wide.sum(1, keepdim=True)
    # Column blocks joined once (an (S, k) copy, tiny): torch.compile cannot trace mm into a strided out=.
    blocks = [wide @ rows.t() for _, rows in _chunks(spec, codes, chunk, grad.device, wide.dtype)]
    return torch.cat(blocks, dim=1) + 0.5 * wide.sum(1, keepdim=True)


def bases_per_chunk(spec: BasisSpec, device: torch.device, chunk: int) -> int:
    """Bases decoded (or generated) at a time on ``device``: ``chunk`` on the CPU, where a cache-sized chunk is fastest;
    on accelerators each chunk costs kernel launches (a GPU step was launch-bound at 32 bases), so as many as fill
    ``_ACCELERATOR_CHUNK_ELEMENTS``, at least ``chunk``."""
    if not functions.launch_bound(device):
        return chunk
    return max(chunk, _ACCELERATOR_CHUNK_ELEMENTS // max(1, spec.numel))


def _chunks(spec: BasisSpec, codes: Optional[Tensor], chunk: int, device: torch.device, dtype: torch.dtype):
    """(first index, code rows in ``dtype``) for consecutive chunks of bases, all decoded into one reused buffer.

    Each chunk is only valid until the next is yielded. One allocation per pass instead of one per chunk keeps
    small, cache-sized chunks cheap.
    """
    buffer = torch.empty(min(chunk, spec.count), spec.numel, dtype=dtype, device=device)
    for start in range(0, spec.count, chunk):
        count = min(chunk, spec.count - start)
        rows = codes[start : start + count] if codes is not None else spec.codes(device, start, count)
        yield start, buffer[:count].copy_(rows)


def combine_bases(coefficients: Tensor, spec: BasisSpec, codes: Optional[Tensor] = None, chunk: int = 64,
                  bank: Optional[BasisBank] = None) -> Tensor:
    """``coefficients @ bases`` as (S, numel) in ``factor_dtype``: from ``codes``, from a ``bank`` (shared bases; it
    decides whether they are held), or regenerated chunk by chunk (per-layer bases). ``chunk``: bases decoded at a
    time on the CPU (cache-sized); accelerators take larger chunks (``bases_per_chunk``)."""
    chunk = bases_per_chunk(spec, coefficients.device, chunk)
    if functions.transforms_active():  # torch.func transforms need plain ops: the codes whole, once
        if codes is None:
            codes = bank.get(spec, coefficients.device) if bank is not None else None
        codes = spec.codes(coefficients.device) if codes is None else codes
        wide = coefficients.to(factor_dtype(coefficients.dtype))  # as the eager pass: float64 stays float64
        return torch.addmm(0.5 * wide.sum(1, keepdim=True), wide, codes.to(wide.dtype)).mul(spec.step)
    keep_codes, backward_bank = True, None
    if bank is not None and codes is None:
        codes = bank.get(spec, coefficients.device)
        if not bank.holds(coefficients.device):
            # Handed over for this pass only. A compiled backward cannot call back into the bank (a Python side
            # effect): it regenerates the codes.
            keep_codes, backward_bank = False, None if torch.compiler.is_compiling() else bank
    return _CombineBases.apply(coefficients, spec, codes, chunk, keep_codes, backward_bank)
