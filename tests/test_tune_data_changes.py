"""Tune reuses a trial fit, or a study's scores, only on the images they were made on (the train split, which the
validation images are drawn from; the test split is never read while choosing); and the ViT-L NOLA variant's rank-1
default holds for a partial ``nola_config`` dict."""
import json
import shutil
from pathlib import Path

import pytest
import timm
from fake_fit import fake_python
from fixtures_data import write_imagefolder

import nola_vision.data
from nola_vision.core.inject import adapter_state
from nola_vision.runs.tune import run_tune

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_offline.yaml")
GRID = {"model.lr": [1e-3, 2e-3]}


@pytest.fixture
def search(tmp_path, monkeypatch):
    """``search(train_per_class, test_per_class)``: write the image folder so, run a search of two trials with
    stand-in fits, and return the fits logged so far (``search.ran``); ``search.splits``: every split the tune process
    read."""
    ran, data = tmp_path / "ran.txt", tmp_path / "images"
    ran.touch()
    fit = fake_python(tmp_path, metric="val/acc",
                      extra=f'"ran": open({str(ran)!r}, "a").write(value("--result_file") + "\\n"),')
    read = nola_vision.data.build_dataset
    splits = []

    def spy(name, root, split="train", *args, **kwargs):
        splits.append(split)
        return read(name, root, split, *args, **kwargs)

    monkeypatch.setattr(nola_vision.data, "build_dataset", spy)

    def run(train_per_class, test_per_class):
        shutil.rmtree(data, ignore_errors=True)
        write_imagefolder(data, ("a", "b"), train_per_class, test_per_class, eval_folder="test")
        run_tune([TINY], GRID, out=str(tmp_path / "out"), name="t", python=fit, echo=False, skip_protocol=True,
                 overrides=["--data.dataset", "imagefolder", "--data.root", str(data), "--data.shots", "2",
                            "--data.val_shots", "1"])
        return ran.read_text().splitlines()

    run.root, run.splits, run.ran = tmp_path / "out" / "t", splits, ran
    return run


def test_trial_fits_made_on_other_train_images_are_never_reused_even_after_the_study_is_deleted(search):
    assert len(search(4, 2)) == 2
    # the protocol was skipped: the table's last line said its row was in ../results.md
    assert "The protocol was skipped (--skip_protocol): run the same command without it for the row in " \
        "../results.md." in (search.root / "tune_results.md").read_text()
    results = [json.loads(p.read_text()) for p in search.root.glob("tune/trial-*/*/result.json")]
    assert len(results) == 2 and all(set(r["data"]) == {"train"} for r in results)  # what the fits read, recorded
    # other test images only: selection never reads them, so the fits are reused (the study deleted, as below)
    (search.root / "tune.db").unlink()
    assert len(search(4, 3)) == 2
    # other train images (and so other validation images): the old fits' val/acc chose the values
    (search.root / "tune.db").unlink()
    with pytest.raises(ValueError, match=r"trial fit made on other images .*\(train images .*delete .*tune and the "
                                         r"study"):
        search(5, 3)
    assert len(search.ran.read_text().splitlines()) == 2  # refused before any fit
    assert "test" not in search.splits and "train" in search.splits  # the test split was never listed nor read
    # it made no study: an empty one (no settings yet) made a later search wait 60 s for them, then take it
    assert not (search.root / "tune.db").exists()
    # as the message says: without the old trial folders the search runs again on the new images
    shutil.rmtree(search.root / "tune")
    assert len(search(5, 3)) == 4


def test_a_trial_fit_that_finished_after_its_worker_died_is_reused_with_the_images_recorded(search):
    # kill -9 of the worker while its fit ran: the fit wrote its result alone, without the images the worker records,
    # and later searches reused it without ever checking them
    assert len(search(4, 2)) == 2
    # the protocol was skipped: the table's last line said its row was in ../results.md
    assert "The protocol was skipped (--skip_protocol): run the same command without it for the row in " \
        "../results.md." in (search.root / "tune_results.md").read_text()
    paths = sorted(search.root.glob("tune/trial-*/*/result.json"))
    recorded = [json.loads(p.read_text()) for p in paths]
    for path, result in zip(paths, recorded):
        path.write_text(json.dumps({k: v for k, v in result.items() if k != "data"}))
    (search.root / "tune.db").unlink()  # the search starts again and finds the fits finished
    assert len(search(4, 2)) == 2  # reused, not fitted again
    assert [json.loads(p.read_text())["data"] for p in paths] == [r["data"] for r in recorded]
    (search.root / "tune.db").unlink()  # so the next search checks their images as it checks every fit's
    with pytest.raises(ValueError, match="trial fit made on other images"):
        search(5, 2)


def test_a_kept_study_scored_on_other_train_images_is_refused(search):
    assert len(search(4, 2)) == 2
    # the protocol was skipped: the table's last line said its row was in ../results.md
    assert "The protocol was skipped (--skip_protocol): run the same command without it for the row in " \
        "../results.md." in (search.root / "tune_results.md").read_text()
    with pytest.raises(ValueError, match="trial fit made on other images"):
        search(5, 2)
    shutil.rmtree(search.root / "tune")  # the fits are gone, but the study's finished trials are never rerun
    with pytest.raises(ValueError, match=r"study 't' in .* scored its trials on other images .*\(train images "):
        search(5, 2)
    assert len(search.ran.read_text().splitlines()) == 2


def test_vit_large_nola_keeps_its_rank_1_default_for_a_partial_nola_config_dict():
    small = dict(pretrained=False, depth=1, embed_dim=32, num_heads=2, img_size=32, num_classes=3)
    ranks = [adapter_state(timm.create_model("vit_large_patch16_224_nola", nola_config=config, **small)).config.rank
             for config in ({"num_basis_a": 16}, {"method": "nola", "num_basis_b": 16}, {"rank": 2},
                            {"class_path": "nola_vision.NOLAConfig", "init_args": {"num_basis_a": 16}},
                            {"class_path": "nola_vision.NOLAConfig", "init_args": {"rank": 2}})]
    assert ranks == [1, 1, 2, 1, 2]
    assert adapter_state(timm.create_model("vit_large_patch16_224_nola", nola_num_basis_a=16, **small)).config.rank == 1


def test_the_worker_that_makes_a_study_records_its_images_with_its_settings(search, monkeypatch):
    # on machines sharing --storage, the maker recorded the images only after the others could see its settings: a
    # worker with other images at the same path, started together, recorded its own, and both searches went on
    import nola_vision.runs.tune as tune

    class Paused(Exception):
        """The maker, stopped the moment it has made the study."""

    def pause(*args):
        raise Paused

    with monkeypatch.context() as patched:
        patched.setattr(tune, "_check_heartbeat", pause)
        with pytest.raises(Paused):
            search(4, 2)
    with pytest.raises(ValueError, match=r"study 't' in .* scored its trials on other images .*\(train images "):
        search(5, 2)  # another machine's worker, its data at the same path holding other images
    assert search.ran.read_text() == ""
