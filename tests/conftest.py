"""Shared fixtures."""
import pytest
import torch


@pytest.fixture
def images() -> torch.Tensor:
    """A fixed batch of four 32-px images for the tiny ViTs of tiny_models.py."""
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
