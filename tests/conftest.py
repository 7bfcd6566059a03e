"""Shared fixtures, and the method matrix's ``variant`` fixture over every registered method."""
import os
import pickle

import example_method  # noqa: F401  (registers README's example method for the whole session: the matrix covers it)
import pytest
import torch
from method_matrix import method_variants


def pytest_configure(config):
    """Under pytest-xdist each worker takes its share of the cores (and so do the processes a test starts): workers
    that each spin up every core's thread slow one another down."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


@pytest.fixture(autouse=True)
def caltech_fixture_counts(monkeypatch):
    """Caltech-101 fixtures (fixtures_data.write_caltech101) write a few images per category, not the archive's
    8,677: one image per category counts as complete. Tests of the cut-short check set their own counts."""
    from nola_vision.data import datasets

    monkeypatch.setattr(datasets, "CALTECH101_IMAGES", dict.fromkeys(datasets.CALTECH101_CLASSES, 1), raising=False)


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
    """One real tiny tune study (see tune_study.py), shared by the tests that read it: under pytest-xdist the first
    worker to need it makes it and the others read it (its fits take about 40 s)."""
    from filelock import FileLock
    from tune_study import make_tune_study

    if "PYTEST_XDIST_WORKER" not in os.environ:
        return make_tune_study(tmp_path_factory.mktemp("tune_study"))
    shared = tmp_path_factory.getbasetemp().parent  # the session's folder, above every worker's own
    made = shared / "tune_study.pickle"
    with FileLock(str(shared / "tune_study.lock")):
        if not made.exists():
            made.write_bytes(pickle.dumps(make_tune_study(shared / "tune_study")))
        return pickle.loads(made.read_bytes())
