"""The package's public names: ``__all__``, ``dir()`` and the lazily imported training pieces agree."""

from __future__ import annotations

import rlcompleter

import nola_vision as nv


def test_dir_lists_every_public_name_so_tab_completion_offers_the_lazy_ones():
    assert set(nv.__all__) <= set(dir(nv))  # FewShotClassifier and FewShotDataModule were missing (lazy)
    completer = rlcompleter.Completer({"nv": nv})
    offered = {completer.complete("nv.FewShot", state) for state in range(3)} - {None}
    assert offered == {"nv.FewShotClassifier(", "nv.FewShotDataModule("}  # callables, hence the "("


def test_every_public_name_resolves():
    for name in nv.__all__:
        assert getattr(nv, name) is not None, name
