"""Random bases: portable golden values, independence from global RNG, chunked per-layer generation."""
import subprocess
import sys

import pytest
import torch

from nola_vision.basis import (
    BasisBank,
    BasisSpec,
    combine_generated,
    fingerprint,
    random_bits,
    uniform_bases,
)

# Float32 bit patterns of the first values of two streams: any change to the generator breaks these.
GOLDEN_A = [-1151374715, 958781891, 1011135327, -1139059142, -1136448854, 989036397, 1015496071, 1016144366]
GOLDEN_B_LAST = [-1149172307, -1157626384, 1007928546, 990454438]
GOLDEN_BITS = [3845451082, 2551873231, 2178467953]


def golden_values(device="cpu"):
    a = uniform_bases(0, "A/768x4", (768, 4), 1, device=device)[0, :2].flatten()
    b = uniform_bases(7, "B/4x3072", (4, 3072), 1, start=1023, device=device)[0, 0, :4]
    return a.cpu().view(torch.int32).tolist(), b.cpu().view(torch.int32).tolist()


def test_bases_equal_golden_values():
    assert golden_values() == (GOLDEN_A, GOLDEN_B_LAST)
    assert random_bits(0, "x", torch.tensor([0, 1, 2**32 + 5])).tolist() == GOLDEN_BITS


def test_bases_identical_in_a_separate_process():
    code = (
        "import torch; from nola_vision.basis import uniform_bases;"
        "print(uniform_bases(3, 'A/64x2', (64, 2), 8).view(torch.int32).sum().item())"
    )
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in range(2)]
    here = uniform_bases(3, "A/64x2", (64, 2), 8).view(torch.int32).sum().item()
    assert runs[0] == runs[1] == f"{here}\n"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bases_identical_on_cuda():
    assert golden_values("cuda") == (GOLDEN_A, GOLDEN_B_LAST)
    cpu = uniform_bases(5, "B/4x768", (4, 768), 300)
    assert torch.equal(uniform_bases(5, "B/4x768", (4, 768), 300, device="cuda").cpu(), cpu)


def test_generation_never_touches_global_rng():
    state = torch.get_rng_state()
    uniform_bases(0, "A/8x2", (8, 2), 16)
    assert torch.equal(torch.get_rng_state(), state)


def test_basis_i_does_not_depend_on_how_many_are_drawn():
    many = uniform_bases(1, "s", (16, 3), 40)
    assert torch.equal(uniform_bases(1, "s", (16, 3), 5, start=20), many[20:25])


def test_distribution_matches_kaiming_uniform_bound():
    bases = uniform_bases(0, "A/256x4", (256, 4), 256)
    bound = 1 / (256 * 4) ** 0.5  # kaiming_uniform_(a=√5) of a (k, in, r) tensor: 1/√(in·r)
    assert bases.abs().max() <= bound
    assert bases.abs().max() > 0.999 * bound
    assert abs(bases.mean().item()) < 0.01 * bound
    assert bases.var().item() == pytest.approx(bound**2 / 3, rel=0.01)
    flat = bases.flatten()
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()) < 0.01


def test_streams_and_seeds_give_different_bases():
    a = uniform_bases(0, "A/8x2", (8, 2), 4)
    assert not torch.equal(a, uniform_bases(1, "A/8x2", (8, 2), 4))
    assert not torch.equal(a, uniform_bases(0, "B/8x2", (8, 2), 4))


def test_fingerprint_changes_with_seed_and_shape():
    spec = BasisSpec(0, "A/64x4", (64, 4), 128)
    assert fingerprint([spec]) == fingerprint([spec])
    assert fingerprint([spec]) != fingerprint([BasisSpec(1, "A/64x4", (64, 4), 128)])
    assert fingerprint([spec]) != fingerprint([BasisSpec(0, "A/64x4", (64, 4), 127)])


def test_generated_combination_matches_dense_in_forward_and_backward():
    spec = BasisSpec(0, "layer/A", (24, 3), 50)
    coefficients = torch.randn(2, 50, generator=torch.Generator().manual_seed(0), requires_grad=True)
    weight = torch.randn(2, 72, generator=torch.Generator().manual_seed(1))
    out = combine_generated(coefficients, spec, chunk=7)  # chunks that do not divide k
    (out * weight).sum().backward()
    dense_coefficients = coefficients.detach().clone().requires_grad_(True)
    dense = dense_coefficients @ spec.generate()
    (dense * weight).sum().backward()
    torch.testing.assert_close(out, dense)
    torch.testing.assert_close(coefficients.grad, dense_coefficients.grad)


def test_bank_generates_once_per_device_and_survives_deepcopy():
    import copy

    bank, spec = BasisBank(), BasisSpec(0, "A/8x2", (8, 2), 4)
    first = bank.get(spec, torch.device("cpu"))
    assert bank.get(spec, torch.device("cpu")) is first
    assert bank.nbytes() == 4 * 16 * 4
    clone = copy.deepcopy(bank)
    assert clone.nbytes() == 0 and torch.equal(clone.get(spec, torch.device("cpu")), first)
