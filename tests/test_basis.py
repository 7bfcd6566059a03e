"""Random bases: portable golden values, independence from global RNG, chunked combination."""
import copy
import subprocess
import sys

import pytest
import torch
from counted_ops import CountedOps

from nola_vision.core.basis import (
    BasisBank,
    BasisSpec,
    bases_per_chunk,
    basis_codes,
    combine_bases,
    fingerprint,
    portable_uniform,
    random_bits,
)

# Codes of the first values of two streams, and LoRA's float32 init bits: any generator change breaks these.
GOLDEN_A = [13089, 31802, 17533, 22606, 31068, 8642, 5617, 12331]
GOLDEN_B_LAST = [29864, 17699, 21079, -22930]
GOLDEN_BITS = [3987960831, 2925305337, 1926911879]
GOLDEN_UNIFORM = [1036800936, -1112036472, 1047954888, -1097293234]


def golden_values(device="cpu"):
    a = BasisSpec(0, "A/768x4", (768, 4), 1).codes(device)[0, :8]
    b = BasisSpec(7, "B/4x3072", (4, 3072), 1024).codes(device, start=1023)[0, :4]
    uniform = portable_uniform(0, "lora", 4, 0.5, device=device)
    return a.tolist(), b.tolist(), uniform.cpu().view(torch.int32).tolist()


def test_bases_equal_golden_values():
    assert golden_values() == (GOLDEN_A, GOLDEN_B_LAST, GOLDEN_UNIFORM)
    assert random_bits(0, "x", torch.tensor([0, 1, 2**32 + 5])).tolist() == GOLDEN_BITS


def test_bases_identical_in_a_separate_process():
    code = (
        "import torch; from nola_vision.core.basis import BasisSpec;"
        "print(BasisSpec(3, 'A/64x2', (64, 2), 8).generate().view(torch.int32).sum().item())"
    )
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    here = BasisSpec(3, "A/64x2", (64, 2), 8).generate().view(torch.int32).sum().item()
    assert runs[0] == runs[1] == f"{here}\n"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bases_identical_on_cuda():
    assert golden_values("cuda") == (GOLDEN_A, GOLDEN_B_LAST, GOLDEN_UNIFORM)
    spec = BasisSpec(5, "B/4x768", (4, 768), 300)
    assert torch.equal(spec.generate("cuda").cpu(), spec.generate())
    coefficients = torch.randn(2, 300, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(combine_bases(coefficients.cuda(), spec).cpu(), combine_bases(coefficients, spec))


def test_generation_never_touches_global_rng():
    state = torch.get_rng_state()
    BasisSpec(0, "A/8x2", (8, 2), 16).generate()
    portable_uniform(0, "x", 10, 1.0)
    assert torch.equal(torch.get_rng_state(), state)


def test_basis_i_does_not_depend_on_how_many_are_drawn():
    many = BasisSpec(1, "s", (16, 3), 40).generate()
    assert torch.equal(BasisSpec(1, "s", (16, 3), 5).generate(start=20, count=5), many[20:25])
    odd = BasisSpec(1, "t", (7,), 3000).codes().flatten()  # odd basis size: chunks start mid-pair
    assert torch.equal(BasisSpec(1, "t", (7,), 3000).codes(start=1001, count=999).flatten(), odd[7007:14000])
    long = basis_codes(2, "u", 100_003)  # spans several generation chunks, at another alignment
    assert torch.equal(basis_codes(2, "u", 50_001, start=33_333), long[33_333:83_334])


def test_distribution_matches_kaiming_uniform_bound():
    bases = BasisSpec(0, "A/256x4", (256, 4), 256).generate()
    bound = 1 / (256 * 4) ** 0.5  # kaiming_uniform_(a=√5) of a (k, in, r) tensor: 1/√(in·r)
    assert bases.abs().max() < bound
    assert bases.abs().max() > 0.999 * bound
    assert abs(bases.mean().item()) < 0.01 * bound
    assert bases.var().item() == pytest.approx(bound**2 / 3, rel=0.01)
    flat = bases.flatten()
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()) < 0.01
    assert abs(torch.corrcoef(torch.stack([flat[0::2], flat[1::2]]))[0, 1].item()) < 0.01  # two halves of a hash
    assert len(torch.unique(flat)) > 60_000  # a fine grid: 65,536 levels


def test_streams_and_seeds_give_different_bases():
    a = BasisSpec(0, "A/8x2", (8, 2), 4).generate()
    assert not torch.equal(a, BasisSpec(1, "A/8x2", (8, 2), 4).generate())
    assert not torch.equal(a, BasisSpec(0, "B/8x2", (8, 2), 4).generate())


def test_fingerprint_changes_with_seed_and_shape():
    spec = BasisSpec(0, "A/64x4", (64, 4), 128)
    assert fingerprint([spec]) == fingerprint([spec])
    assert fingerprint([spec]) != fingerprint([BasisSpec(1, "A/64x4", (64, 4), 128)])
    assert fingerprint([spec]) != fingerprint([BasisSpec(0, "A/64x4", (64, 4), 127)])


@pytest.mark.parametrize("stored", [True, False], ids=["stored_codes", "regenerated"])
def test_chunked_combination_matches_dense_in_forward_and_backward(stored):
    spec = BasisSpec(0, "layer/A", (24, 3), 50)
    coefficients = torch.randn(2, 50, generator=torch.Generator().manual_seed(0), requires_grad=True)
    weight = torch.randn(2, 72, generator=torch.Generator().manual_seed(1))
    codes = spec.codes() if stored else None
    out = combine_bases(coefficients, spec, codes, chunk=7)  # chunks that do not divide k
    (out * weight).sum().backward()
    dense_coefficients = coefficients.detach().clone().requires_grad_(True)
    dense = dense_coefficients @ spec.generate().flatten(1)
    (dense * weight).sum().backward()
    torch.testing.assert_close(out, dense)
    torch.testing.assert_close(coefficients.grad, dense_coefficients.grad)


@pytest.mark.parametrize("stored", [True, False], ids=["stored_codes", "regenerated"])
def test_accelerators_combine_bases_in_few_chunks_where_the_cpu_takes_cache_sized_ones(stored):
    """Each chunk costs kernel launches on an accelerator (a GPU step of NOLA was launch-bound at 32 bases a chunk):
    there ViT-B's shared B bases (1024 of 4x3072) take two chunks each way, on the CPU sixteen (meta stands in for
    an accelerator: it runs the same ops without memory)."""
    spec = BasisSpec(0, "B/4x3072", (4, 3072), 1024)
    assert bases_per_chunk(spec, torch.device("cpu"), 64) == 64
    assert bases_per_chunk(spec, torch.device("cuda"), 64) == 682  # 8M values, 32 MiB in float32
    assert bases_per_chunk(BasisSpec(0, "B/4x8", (4, 8), 1024), torch.device("cuda"), 64) == 262144  # all at once
    for device, chunks in (("cpu", 16), ("meta", 2)):
        coefficients = torch.randn(24, 1024, device=device, requires_grad=True)
        codes = spec.codes(device) if stored else None
        with CountedOps() as ops:
            combine_bases(coefficients, spec, codes).sum().backward()
        assert (ops.calls["addmm_"], ops.calls["mm"]) == (chunks, chunks), device


def test_codes_combined_in_one_chunk_take_no_buffer_and_give_the_chunked_sums_bit_for_bit():
    """One chunk (an accelerator's usual case) is one product onto the half sums: no buffer, slices or copies to
    launch, and the values of the buffered path, which adds the same product onto the same expanded sums."""
    spec = BasisSpec(0, "layer/A", (24, 3), 50)
    coefficients = torch.randn(5, 50, generator=torch.Generator().manual_seed(0), requires_grad=True)
    codes = spec.codes()
    with CountedOps() as ops:
        out = combine_bases(coefficients, spec, codes, chunk=50)
        grad = torch.autograd.grad(out, coefficients, torch.ones_like(out))[0]
    assert not {"empty", "copy_", "cat"} & set(ops.calls), ops.calls
    with torch.no_grad():
        half_sums = (0.5 * coefficients.sum(1, keepdim=True)).expand(-1, spec.numel).contiguous()
        assert torch.equal(out, half_sums.addmm_(coefficients, codes.float()).mul_(spec.step))
        step_grad = torch.ones_like(out) * spec.step
        assert torch.equal(grad, step_grad @ codes.float().t() + 0.5 * step_grad.sum(1, keepdim=True))


@pytest.mark.parametrize("source", ["stored_codes", "regenerated", "bank"])
def test_combination_differentiates_twice_like_the_dense_product(source):
    """MAML's inner step differentiates the coefficient gradient: its second derivative is the dense product's."""
    spec = BasisSpec(0, "layer/A", (24, 3), 50)
    generator = torch.Generator().manual_seed(0)
    coefficients = torch.randn(2, 50, generator=generator, requires_grad=True)
    weight, direction = torch.randn(2, 72, generator=generator), torch.randn(2, 50, generator=generator)
    codes = spec.codes() if source == "stored_codes" else None
    bank = BasisBank() if source == "bank" else None

    def second_derivative(combine):
        inner = torch.autograd.grad((combine(coefficients) * weight).pow(2).sum(), coefficients, create_graph=True)[0]
        return torch.autograd.grad((inner * direction).sum(), coefficients)[0]

    got = second_derivative(lambda c: combine_bases(c, spec, codes, chunk=7, bank=bank))  # several chunks
    expected = second_derivative(lambda c: c @ spec.generate().flatten(1))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_bank_generates_once_per_device_and_survives_deepcopy():
    bank, spec = BasisBank(keep=True), BasisSpec(0, "A/8x2", (8, 2), 4)
    first = bank.get(spec, torch.device("cpu"))
    assert bank.get(spec, torch.device("cpu")) is first
    assert first.dtype == torch.int16 and bank.nbytes() == 4 * 16 * 2
    clone = copy.deepcopy(bank)
    assert clone.keep is True and clone.nbytes() == 0 and torch.equal(clone.get(spec, torch.device("cpu")), first)


def test_a_cpu_training_pass_takes_over_held_codes_and_releases_them():
    spec, cpu = BasisSpec(0, "A/8x2", (8, 2), 4), torch.device("cpu")
    bank = BasisBank()
    with torch.no_grad():  # evaluation (and a backward pass, where grad mode is off) holds the codes
        held = bank.get(spec, cpu)
    assert bank.nbytes() == 4 * 16 * 2
    assert bank.get(spec, cpu) is held and bank.nbytes() == 0  # grad enabled: handed over, no longer held
    assert bank.get(spec, cpu) is None  # nothing held: the pass regenerates them chunk by chunk
    assert bank.holds(torch.device("cuda")) and not bank.holds(cpu)
    assert BasisBank(keep=True).holds(cpu)
    with torch.no_grad():
        assert not BasisBank(keep=False).holds(cpu)


def test_a_cpu_training_step_generates_shared_codes_once_and_never_holds_them_under_its_activations(monkeypatch):
    spec = BasisSpec(0, "A/24x3", (24, 3), 50)
    bank, generated = BasisBank(), []
    original = BasisSpec.codes
    monkeypatch.setattr(BasisSpec, "codes", lambda *args, **kwargs: generated.append(args) or original(*args, **kwargs))
    coefficients = torch.randn(2, 50, generator=torch.Generator().manual_seed(0), requires_grad=True)
    for _ in range(3):
        out = combine_bases(coefficients, spec, chunk=7, bank=bank)
        assert bank.nbytes() == 0  # the forward pass released what the last backward left
        out.square().sum().backward()
        assert bank.nbytes() == 50 * 72 * 2  # held from backward until the next forward
    # Step 1's forward regenerates 8 chunks; each backward generates the whole set once, reused by the next forward.
    assert len(generated) == 8 + 3
    dense = coefficients.detach().clone().requires_grad_(True)
    (dense @ spec.generate().flatten(1)).square().sum().backward()
    torch.testing.assert_close(coefficients.grad, 3 * dense.grad)


def test_cpu_codes_equal_the_int64_tensor_path_at_every_alignment():
    # The CPU path hashes in NumPy uint32; the accelerator path in torch int64 (run here from random_bits).
    def reference(n: int, start: int) -> torch.Tensor:
        pairs = torch.arange(start >> 1, ((start + n - 1) >> 1) + 1, dtype=torch.int64)
        bits = random_bits(3, "s", pairs)
        halves = torch.stack([bits >> 16, bits & 0xFFFF], dim=1).flatten()
        return (halves[start & 1 : (start & 1) + n] - (1 << 15)).to(torch.int16)

    boundary = 2 * 2**32  # element of the first pair whose counter has a high word: chunks split there
    for n, start in [(1, 0), (2, 1), (7, 5), (200_003, 0), (150_001, 12_345), (300_000, boundary - 131_071),
                     (5, boundary - 3), (1_000, 2**41 + 1)]:
        assert torch.equal(basis_codes(3, "s", n, start), reference(n, start)), (n, start)
    assert basis_codes(3, "s", 0).shape == (0,)
    threads = torch.get_num_threads()
    try:  # torch's intra-op threads hash disjoint ranges: the codes do not depend on how many there are
        torch.set_num_threads(3)
        assert torch.equal(basis_codes(3, "s", 1_000_001, 77), reference(1_000_001, 77))
        # several long passes per thread, one of them split where the counter's high word changes
        assert torch.equal(basis_codes(3, "s", 3_000_001, boundary - 1_000_001),
                           reference(3_000_001, boundary - 1_000_001))
    finally:
        torch.set_num_threads(threads)


def test_code_generation_keeps_one_thread_pool_grown_to_the_most_threads_asked():
    """A pool per thread count stayed alive: torch.set_num_threads through 2..6 left 2+3+4+5+6 idle threads."""
    import gc
    import threading
    import time

    from nola_vision.core.basis import _CPU_HASH_CHUNK, basis_codes

    before = torch.get_num_threads()
    try:
        for threads in range(2, 7):
            torch.set_num_threads(threads)
            basis_codes(0, "pools", 2 * _CPU_HASH_CHUNK * threads, 0, torch.device("cpu"))
        gc.collect()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and sum(t.name.startswith("nola-bases") for t in threading.enumerate()) > 6:
            time.sleep(0.05)
        assert sum(t.name.startswith("nola-bases") for t in threading.enumerate()) <= 6
    finally:
        torch.set_num_threads(before)
