"""Shared fixtures, and the method matrix's ``variant`` fixture over every registered method."""
import example_method  # noqa: F401  (registers README's example method for the whole session: the matrix covers it)
import pytest
import torch
from method_matrix import method_variants


@pytest.fixture
def images() -> torch.Tensor:
    """A fixed batch of four 32-px images for the tiny ViTs of tiny_models.py."""
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(params=method_variants(), ids=lambda variant: variant.id)
def variant(request):
    """Each variant of every registered method (see method_matrix.py): a test taking it runs once per variant."""
    return request.param


@pytest.fixture(params=[v for v in method_variants() if v.has_layers], ids=lambda variant: variant.id)
def adapter_variant(request):
    """Each variant whose method adds adapter layers (all but ``linear`` and ``full``)."""
    return request.param


@pytest.fixture(scope="session")
def tune_study(tmp_path_factory):
    """One real tiny tune study (see tune_study.py), shared by the tests that read it."""
    from tune_study import make_tune_study

    return make_tune_study(tmp_path_factory.mktemp("tune_study"))
