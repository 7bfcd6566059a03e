"""The k-NN baseline's rows are set up, checked, recorded and claimed as protocol's rows are, and its features are
the model's own (its forward hooks included)."""
import json
import os
from pathlib import Path

import pytest
import torch
from fake_fit import fake_python
from fixtures_data import write_imagefolder
from PIL import Image
from tiny_models import tiny_vit

from nola_vision.runs import protocol
from nola_vision.runs.knn import extract_features, knn_predict
from nola_vision.runs.protocol import run_knn, run_protocol
from nola_vision.runs.results import claim_run, summarise, write_tables

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_offline.yaml")
FAST = ["--trainer.max_epochs", "1", "--data.shots", "2"]


@pytest.fixture
def folder_config(tmp_path):
    """A tiny ViT on a three-class image folder, whose images a test can add to."""
    write_imagefolder(tmp_path / "data", eval_folder="test", train_per_class=4)
    config = tmp_path / "tiny.yaml"
    config.write_text(f"""seed_everything: 0
trainer: {{accelerator: cpu, devices: 1, max_epochs: 1, logger: false}}
model:
  backbone: vit_tiny_patch16_224
  pretrained: false
  image_size: 32
  num_classes: 3
  backbone_kwargs: {{patch_size: 8, depth: 2, embed_dim: 64, num_heads: 2}}
data: {{dataset: imagefolder, root: {tmp_path / 'data'}, shots: 2, batch_size: 4}}
""")
    return str(config)


def _result(out, name, split):
    return json.loads((Path(out) / name / f"split{split}" / "result.json").read_text())


def test_a_knn_row_refuses_a_split_on_other_images_and_records_the_key_the_row_records(tmp_path, folder_config):
    out = str(tmp_path / "out")
    run_knn([folder_config], out=out, name="row", split_seeds=[0],
            overrides=["--data.shots", "2", "--data.batch_size=4"], echo=False)
    recorded = json.loads((tmp_path / "out" / "row" / "config.json").read_text())["config_hash"]
    first = _result(out, "row", 0)
    assert set(first["data"]) == {"train", "test"} and first["config_hash"] == recorded
    # the same settings in another order are the same row: its split records the hash the row records
    run_knn([folder_config], out=out, name="row", split_seeds=[1],
            overrides=["--data.batch_size=4", "--data.shots", "2"], echo=False)
    second = _result(out, "row", 1)
    assert second["config_hash"] == recorded and second["data"] == first["data"]
    # an image added since: a split on it would be averaged with those made before, so it is refused
    Image.new("RGB", (20, 16), (0, 0, 0)).save(tmp_path / "data" / "train" / "cat" / "cat 98.png")
    with pytest.raises(ValueError, match="made on other images"):
        run_knn([folder_config], out=out, name="row", split_seeds=[2],
                overrides=["--data.shots", "2", "--data.batch_size=4"], echo=False)
    assert not (tmp_path / "out" / "row" / "split2" / "result.json").exists()
    assert summarise(write_tables(out))[0]["mixed"] == {}


@pytest.mark.parametrize("name", ["grp/cell", "a|b", " padded"])
def test_a_knn_row_name_must_be_one_folder_name(tmp_path, name):
    with pytest.raises(ValueError, match="a row name is one folder name"):
        run_knn([TINY], out=str(tmp_path), name=name, split_seeds=[0], overrides=FAST, echo=False)
    assert not list(tmp_path.rglob("result.json"))


def test_protocol_refuses_a_knn_row_of_other_settings_before_any_fit(tmp_path):
    knn_row = tmp_path / "out" / "row-knn"
    knn_row.mkdir(parents=True)
    (knn_row / "config.json").write_text(json.dumps({"config_hash": "0" * 16, "configs": ["x"],
                                                     "config_sha256": ["0" * 16], "overrides": []}))
    with pytest.raises(ValueError, match="row-knn holds runs made with other settings"):
        run_protocol([TINY], out=str(tmp_path / "out"), name="row", split_seeds=[0], init_seeds=[0], overrides=FAST,
                     knn=True, python=fake_python(tmp_path), echo=False)
    assert not list((tmp_path / "out").rglob("result.json"))  # no fit ran


def test_failed_fits_are_still_reported_when_the_knn_baseline_fails_too(tmp_path, monkeypatch):
    def broken_knn(*args, **kwargs):
        raise RuntimeError("k-NN ran out of memory")

    monkeypatch.setattr(protocol, "run_knn", broken_knn)
    with pytest.raises(RuntimeError, match="(?s)runs failed.*split0-init0.*k-NN baseline failed too: k-NN ran out"):
        run_protocol([TINY], out=str(tmp_path / "out"), name="row", split_seeds=[0], init_seeds=[0], overrides=FAST,
                     knn=True, python=fake_python(tmp_path, code=1), echo=False)


def test_a_knn_split_another_process_holds_is_left_to_it(tmp_path, capsys):
    out = tmp_path / "out"
    held = claim_run(out / "row" / "split1")
    try:
        run_knn([TINY], out=str(out), name="row", split_seeds=[0, 1], overrides=FAST)
    finally:
        os.close(held)
    assert (out / "row" / "split0" / "result.json").is_file()
    assert not (out / "row" / "split1" / "result.json").exists()
    assert "row split 1: running in another process, skipped" in capsys.readouterr().out
    assert [r["run_dir"] for r in write_tables(str(out))] == [str(out / "row" / "split0")]


def test_a_row_named_like_a_formula_opens_in_a_spreadsheet_as_text(tmp_path):
    """results.csv wrote a row named =1+2 as it is: a spreadsheet ran it as a formula."""
    import csv

    out = tmp_path / "out"
    run_knn([TINY], out=str(out), name="=1+2", split_seeds=[0], overrides=FAST)
    assert write_tables(str(out))[0]["name"] == "=1+2"  # the rows themselves keep the name
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["name"], r["run_dir"]) for r in rows] == [("'=1+2", str(out / "=1+2" / "split0"))]


def test_extract_features_runs_the_models_forward_hooks_and_keeps_its_modes():
    model = tiny_vit(num_classes=5)
    # a preprocessing pre-hook on the model (raw [0, 1] images normalised), which every use of the model runs
    model.register_forward_pre_hook(lambda module, args: ((args[0] - 0.5) / 0.25,))
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    seen = {}
    handle = model.head.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(images)
    handle.remove()
    model.train()
    model.blocks[0].eval()  # a frozen part the caller keeps in eval mode
    features, labels = extract_features(model, [(images, torch.arange(6) % 5)], torch.device("cpu"))
    torch.testing.assert_close(features, seen["x"])
    assert labels.tolist() == [0, 1, 2, 3, 4, 0]
    assert model.training and model.blocks[1].training and not model.blocks[0].training


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_extract_features_of_a_backbone_held_in_another_dtype_casts_the_images_to_it(dtype):
    # float32 images into a bfloat16 backbone failed inside torch ("Input type (float) and bias type ... same")
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = tiny_vit()
    reference, _ = extract_features(model, [(images, torch.arange(4))], torch.device("cpu"))
    features, _ = extract_features(model.to(dtype), [(images, torch.arange(4))], torch.device("cpu"))
    assert features.dtype == torch.float32 and next(model.parameters()).dtype == dtype
    torch.testing.assert_close(features, reference, rtol=0.05, atol=0.05)


def test_extract_features_refuses_hooks_it_could_not_run():
    class Backbone(torch.nn.Module):  # no classifier module to read the pre-logits from: forward_head it is
        def forward_features(self, x):
            return x.flatten(1)

        def forward_head(self, x, pre_logits=False):
            return x

    model = Backbone()
    model.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    with pytest.raises(ValueError, match="has forward hooks and no single classifier module"):
        extract_features(model, [(torch.ones(2, 3), torch.zeros(2))], torch.device("cpu"))


def test_a_wrapper_of_the_backbone_or_labels_as_a_list_are_named_not_a_raw_attribute_error():
    class Wrapper(torch.nn.Module):  # a Lightning module or a notebook's own: no classifier of its own
        def __init__(self):
            super().__init__()
            self.model = tiny_vit()

    batches = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))]
    with pytest.raises(TypeError, match=r"pass its submodule 'model' \(model.get_submodule\('model'\)\)"):
        extract_features(Wrapper(), batches, "cpu")
    with pytest.raises(TypeError, match=r"train_labels must be a tensor .* got a list"):
        knn_predict(torch.randn(3, 4), [0, 1, 0], torch.randn(2, 4))


def test_a_k_above_the_training_images_is_lowered_to_them_with_a_warning_naming_both():
    # every test image then votes over every training image: the same votes for all, without a word
    generator = torch.Generator().manual_seed(0)
    train, test = torch.randn(6, 8, generator=generator), torch.randn(200, 8, generator=generator)
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    with pytest.warns(UserWarning, match=r"k=1000 exceeds the 6 training images: every test image is given the same "
                                         r"neighbours; k-NN uses k=6"):
        lowered = knn_predict(train, labels, test, k=1000)
    assert torch.equal(lowered, knn_predict(train, labels, test, k=6))


def test_float64_features_are_compared_in_float64_where_float32_cannot_tell_them_apart():
    """Features sharing a large offset differ in float64 only: cast to float32, 1-NN fell to about chance."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    features = torch.as_tensor(digits.data, dtype=torch.float64) + 1e4  # nearly parallel: cosines within 1e-7 of 1
    labels = torch.as_tensor(digits.target)
    train, test = features[::2], features[1::2]
    cosine = torch.nn.functional.normalize(test, dim=1) @ torch.nn.functional.normalize(train, dim=1).T
    reference = labels[::2][cosine.argmax(dim=1)]  # brute force in float64
    assert torch.equal(knn_predict(train, labels[::2], test, k=1), reference)
    assert (reference == labels[1::2]).float().mean() > 0.9
    assert (knn_predict(train.float(), labels[::2], test.float(), k=1) == labels[1::2]).float().mean() < 0.7


def test_a_knn_row_records_the_k_its_classifier_used(tmp_path):
    # the row was named "knn (k=1000)" when 20 training images (2 shots of 10 digits) made it a 20-NN
    out = str(tmp_path / "out")
    with pytest.warns(UserWarning, match="k=1000 exceeds the 20 training images"):
        run_knn([TINY], out=out, name="row", split_seeds=[0], overrides=FAST, k=1000, echo=False)
    assert _result(out, "row", 0)["config"]["method"] == "knn (k=20)"
    write_tables(out)
    assert "| row | knn (k=20) |" in (tmp_path / "out" / "results.md").read_text()


def test_a_failure_writing_results_md_puts_results_csv_back(tmp_path, folder_config, monkeypatch):
    # the two tables were two separate writes: a failure on the second left a newer csv beside an older md
    from nola_vision.core import storage

    out = tmp_path / "out"
    run_knn([folder_config], out=str(out), name="row", split_seeds=[0], overrides=FAST[2:], echo=False)
    write_tables(str(out))
    before = {name: (out / name).read_bytes() for name in ("results.csv", "results.md")}
    write = storage.write_text_atomic

    def failing(path, text, check=None):
        if Path(path).name == "results.md":
            raise OSError(28, "No space left on device")
        return write(path, text, check)

    monkeypatch.setattr(storage, "write_text_atomic", failing)
    result = _result(out, "row", 0)
    (out / "row" / "split0" / "result.json").write_text(json.dumps({**result, "metrics": {
        **result["metrics"], "test/acc": 0.125}}))
    with pytest.raises(OSError, match="No space left"):
        write_tables(str(out))
    monkeypatch.undo()
    assert {name: (out / name).read_bytes() for name in before} == before
    write_tables(str(out))
    assert "0.125" in (out / "results.csv").read_text() and "12.5" in (out / "results.md").read_text()
