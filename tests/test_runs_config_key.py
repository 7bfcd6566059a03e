"""A protocol/tune row's key covers every file its settings name: group, subclass and nested config files (found
recursively, relative to the naming file's folder as fit's parser resolves them) and weights files, by their bytes."""
import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

import pytest

from nola_vision.runs.protocol import run_protocol
from nola_vision.runs.results import (
    RUN_ARGS,
    claim_row,
    collect_results,
    config_key,
    parse_overrides,
    summarise,
    write_tables,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_offline.yaml"
TOP = """trainer: {accelerator: cpu, devices: 1, max_epochs: 1}
model: sub/model.yaml
data: data.yaml
"""


def old_key(configs, overrides):
    """The key before files named in the settings counted (what existing rows' config.json and result.json hold)."""
    contents = [Path(c).read_text() for c in configs]
    pairs = [(k, v) for k, v in parse_overrides(overrides) if k not in RUN_ARGS]
    settings = [f"{k}={v}" if v is not None else k for k, v in pairs]
    digest = hashlib.sha256(json.dumps({"configs": contents, "overrides": settings}).encode()).hexdigest()[:16]
    return {"config_hash": digest, "configs": [str(c) for c in configs],
            "config_sha256": [hashlib.sha256(c.encode()).hexdigest()[:16] for c in contents], "overrides": settings}


def nested_configs(tmp_path, shots=4, rank=4):
    """cfg/top.yaml names cfg/data.yaml and cfg/sub/model.yaml, which names cfg/sub/deeper/nola.yaml (each path
    relative to the folder of the file that names it)."""
    cfg = tmp_path / "cfg"
    (cfg / "sub" / "deeper").mkdir(parents=True, exist_ok=True)
    (cfg / "top.yaml").write_text(TOP)
    (cfg / "data.yaml").write_text(f"dataset: digits\nshots: {shots}\n")
    (cfg / "sub" / "model.yaml").write_text("backbone: vit_tiny_patch16_224\npretrained: false\n"
                                            "adapter: deeper/nola.yaml\n")
    (cfg / "sub" / "deeper" / "nola.yaml").write_text("class_path: nola_vision.NOLAConfig\n"
                                                      f"init_args: {{rank: {rank}}}\n")
    return cfg


def test_settings_that_name_no_file_keep_the_key_of_earlier_versions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plain = tmp_path / "plain.yaml"
    plain.write_text("model: {backbone: vit_tiny_patch16_224, lr: 0.01}\ndata: {dataset: digits, root: .}\n")
    for configs, overrides in (([str(TINY)], []), ([str(TINY), str(plain)], ["--trainer.max_epochs", "1",
                                                                             "--model.lr=1e-3", "--data.shots", "2",
                                                                             "--seed_everything", "3"])):
        assert config_key(configs, overrides) == old_key(configs, overrides)
        assert json.dumps(config_key(configs, overrides)) == json.dumps(old_key(configs, overrides))


def test_a_changed_group_file_a_config_names_changes_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = nested_configs(tmp_path)
    (tmp_path / "data.yaml").write_text("shots: 8\n")  # in the working directory: not the file cfg/top.yaml names
    before = config_key([str(cfg / "top.yaml")], [])
    (tmp_path / "data.yaml").write_text("shots: 1\n")
    assert config_key([str(cfg / "top.yaml")], [])["config_hash"] == before["config_hash"]
    (cfg / "data.yaml").write_text("dataset: digits\nshots: 1\n")  # the config's text is the same
    after = config_key([str(cfg / "top.yaml")], [])
    assert after["config_sha256"] == before["config_sha256"] and after["config_hash"] != before["config_hash"]
    assert set(after["files"]) == {str(cfg / "data.yaml"), str(cfg / "sub" / "model.yaml"),
                                   str(cfg / "sub" / "deeper" / "nola.yaml")}


def test_a_changed_file_named_two_levels_down_changes_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = nested_configs(tmp_path, rank=4)
    before = config_key(["cfg/top.yaml"], [])["config_hash"]
    nested_configs(tmp_path, rank=1)  # only cfg/sub/deeper/nola.yaml changes
    assert config_key(["cfg/top.yaml"], [])["config_hash"] != before
    # a file named in an override counts too, with what it names (relative to its folder)
    for overrides in (["--model", "cfg/sub/model.yaml"], ["--model", "{adapter: cfg/sub/deeper/nola.yaml}"]):
        before = config_key([str(TINY)], overrides)["config_hash"]
        (cfg / "sub" / "deeper" / "nola.yaml").write_text(f"class_path: nola_vision.NOLAConfig  # {overrides}\n")
        assert config_key([str(TINY)], overrides)["config_hash"] != before, overrides
    key = config_key([str(TINY)], ["--model", "cfg/sub/model.yaml"])
    assert set(key["files"]) == {"cfg/sub/model.yaml", "cfg/sub/deeper/nola.yaml"}
    inline = config_key([str(TINY)], ["--model", "{adapter: cfg/sub/deeper/nola.yaml}"])
    assert set(inline["files"]) == {"cfg/sub/deeper/nola.yaml"}


def test_files_that_name_each_other_in_a_loop_are_read_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.yaml").write_text("config: b.yaml\n")
    (tmp_path / "b.yaml").write_text("config: a.yaml\ndata: {shots: 1}\n")
    before = config_key(["a.yaml"], [])["config_hash"]
    (tmp_path / "b.yaml").write_text("config: a.yaml\ndata: {shots: 2}\n")
    key = config_key(["a.yaml"], [])
    assert key["config_hash"] != before and list(key["files"]) == ["b.yaml"]


def test_a_binary_override_file_counts_by_its_bytes_streamed_never_decoded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}\x80\xff\xfe" * 1000)  # not UTF-8
    overrides = ["--model.pretrained_file", "w.safetensors"]
    assert config_key([str(TINY)], overrides)  # no UnicodeDecodeError
    for method in ("read_text", "read_bytes"):  # the whole file is never read into memory at once
        original = getattr(Path, method)
        monkeypatch.setattr(Path, method, lambda self, *a, _o=original, **k: (_ for _ in ()).throw(
            AssertionError(f"{self} read whole")) if self.suffix == ".safetensors" else _o(self, *a, **k))
    before = config_key([str(TINY)], overrides)
    assert before["files"] == {"w.safetensors": hashlib.sha256(weights.open("rb").read()).hexdigest()[:16]}
    with weights.open("r+b") as f:
        f.seek(5000)
        f.write(b"\x01")
    assert config_key([str(TINY)], overrides)["config_hash"] != before["config_hash"]
    # the same file named in a config counts as well (fit opens a plain path from the working directory)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "w.yaml").write_text("model: {pretrained_file: w.safetensors}\n")
    before = config_key([str(TINY), "cfg/w.yaml"], [])
    weights.write_bytes(b"\x00other weights")
    after = config_key([str(TINY), "cfg/w.yaml"], [])
    assert after["config_hash"] != before["config_hash"] and list(after["files"]) == ["w.safetensors"]


def loaded_by_fit(args):
    """The files fit's own parser loads settings from for ``fit args`` (its ``__path__`` records), absolute."""
    from nola_vision.train.cli import cli_parser

    found = set()

    def walk(node):
        for key, value in vars(node).items():
            if key == "__path__" and value is not None:
                found.add(Path(value.absolute))
            elif type(value).__name__ == "Namespace":
                walk(value)

    walk(cli_parser().parse_args(["fit", *args]).fit)
    return found


def test_the_key_covers_every_file_fit_loads_settings_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = nested_configs(tmp_path)
    (tmp_path / "data_cli.yaml").write_text("dataset: digits\nshots: 2\n")  # on the command line: from here
    for overrides in ([], ["--data", "data_cli.yaml"], ["--model.adapter", "cfg/sub/deeper/nola.yaml"]):
        args = ["-c", "cfg/top.yaml", *overrides]
        loaded = loaded_by_fit(args)
        keyed = {Path(p).absolute() for p in config_key(["cfg/top.yaml"], overrides)["files"]}
        assert loaded and loaded <= keyed, (overrides, loaded - keyed)
    assert loaded_by_fit(["-c", "cfg/top.yaml"]) == {cfg / "data.yaml", cfg / "sub" / "model.yaml",
                                                     cfg / "sub" / "deeper" / "nola.yaml"}


def test_a_row_recorded_before_named_files_counted_is_refused_naming_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nested_configs(tmp_path)
    (tmp_path / "row").mkdir()
    (tmp_path / "row" / "config.json").write_text(json.dumps(old_key(["cfg/top.yaml"], [])))
    with pytest.raises(ValueError, match=r"cfg/data\.yaml .*recorded before the files its settings name counted"):
        claim_row(tmp_path / "row", config_key(["cfg/top.yaml"], []))


def fake_python(tmp_path):
    """A stand-in for `python -m nola_vision.cli fit`: a result with the shots of the data file the config names."""
    script = tmp_path / "fake_python"
    script.write_text(f"""#!{sys.executable}
import json, sys, yaml
args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1]
shots = yaml.safe_load(open("cfg/data.yaml"))["shots"]
json.dump({{"metrics": {{"test/acc": 0.5}}, "config": {{"method": "fake", "shots": shots,
           "split_seed": int(value("--data.split_seed")), "seed": int(value("--seed_everything"))}},
           "parameter_counts": {{"adapter": 8, "head": 2}}}}, open(value("--result_file"), "w"))
""")
    script.chmod(0o755)
    return str(script)


def test_protocol_refuses_to_add_runs_of_a_changed_group_file_to_a_row(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = nested_configs(tmp_path, shots=4)
    run = dict(out="out", name="row", init_seeds=[0], python=fake_python(tmp_path), echo=False)
    run_protocol([str(cfg / "top.yaml")], split_seeds=[0], **run)
    nested_configs(tmp_path, shots=1)
    with pytest.raises(ValueError, match=r"data\.yaml"):
        run_protocol([str(cfg / "top.yaml")], split_seeds=[0, 1], **run)
    assert [r["shots"] for r in collect_results("out")] == [4]


def test_the_tables_do_not_average_runs_of_one_row_that_record_different_settings(tmp_path):
    # a row written before its key covered named files: one run with 4 shots, one with 1, the same hash
    for run, shots in (("split0-init0", 4), ("split1-init0", 1)):
        (tmp_path / "row" / run).mkdir(parents=True)
        (tmp_path / "row" / run / "result.json").write_text(json.dumps({
            "metrics": {"test/acc": 0.5}, "config": {"method": "nola", "shots": shots}, "config_hash": "abc"}))
    (tmp_path / "ok" / "split0-init0").mkdir(parents=True)
    (tmp_path / "ok" / "split0-init0" / "result.json").write_text(json.dumps({"metrics": {"test/acc": 0.5},
                                                                              "config": {"shots": 4}}))
    with pytest.warns(UserWarning, match=r"row .*different settings \(shots 1 / 4\)"):
        rows = write_tables(str(tmp_path))
    by_name = {s["name"]: s for s in summarise(rows)}
    assert by_name["row"]["mixed"] == {"shots": ["1", "4"]} and math.isnan(by_name["row"]["mean"])
    assert by_name["ok"]["mixed"] == {} and by_name["ok"]["mean"] == 50.0
    md = (tmp_path / "results.md").read_text()
    assert "| row | nola |  |  | 1 / 4 | 0 | 0 | 0 | 2 | not averaged: mixed settings |" in md
    assert "NOT AVERAGED (row (shots 1 / 4))" in md
    assert "config_hash" not in (tmp_path / "results.csv").read_text().splitlines()[0]


def test_a_row_recorded_with_an_override_file_before_files_counted_by_bytes_is_the_same_row(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("t.yaml").write_text("max_epochs: 2\n")
    overrides = ["--trainer", "t.yaml"]
    key = config_key([str(TINY)], overrides)
    earlier = dict(old_key([str(TINY)], overrides))  # the earlier key held an override file's text
    pairs = [(k, v) for k, v in parse_overrides(overrides) if k not in RUN_ARGS]
    earlier["config_hash"] = hashlib.sha256(json.dumps({
        "configs": [TINY.read_text()], "overrides": earlier["overrides"],
        "override_files": {v: Path(v).read_text() for _, v in pairs}}).encode()).hexdigest()[:16]
    assert earlier["config_hash"] != key["config_hash"]
    (tmp_path / "row").mkdir()
    (tmp_path / "row" / "config.json").write_text(json.dumps(earlier))
    claim_row(tmp_path / "row", key)  # unchanged settings: the row goes on, its record upgraded
    upgraded = json.loads((tmp_path / "row" / "config.json").read_text())
    assert upgraded == {**key, "earlier_config_hashes": [earlier["config_hash"]]}
    for run, config_hash in (("split0-init0", earlier["config_hash"]), ("split1-init0", key["config_hash"]),
                             ("split2-init0", "0123456789abcdef")):  # the last: a run folder of another row
        (tmp_path / "row" / run).mkdir()
        (tmp_path / "row" / run / "result.json").write_text(json.dumps({
            "metrics": {"test/acc": 0.5}, "config": {"method": "nola", "shots": 4}, "config_hash": config_hash}))
    with pytest.warns(UserWarning, match="split2-init0.*made with other settings .hash 0123456789abcdef"):
        assert len(collect_results(str(tmp_path))) == 2  # the runs of before and after the upgrade
    for run in ("split0-init0", "split1-init0", "split2-init0"):
        shutil.rmtree(tmp_path / "row" / run)
    (tmp_path / "row" / "config.json").write_text(json.dumps(earlier))
    Path("t.yaml").write_text("max_epochs: 3\n")  # changed since: refused
    with pytest.raises(ValueError, match="holds runs made with other settings"):
        claim_row(tmp_path / "row", config_key([str(TINY)], overrides))
    for run, config_hash in (("split0-init0", earlier["config_hash"]), ("split1-init0", key["config_hash"])):
        (tmp_path / "row" / run).mkdir()  # runs of before and after the upgrade are averaged as one row
        (tmp_path / "row" / run / "result.json").write_text(json.dumps({
            "metrics": {"test/acc": 0.5}, "config": {"method": "nola", "shots": 4}, "config_hash": config_hash}))
    (row,) = summarise(collect_results(str(tmp_path)))
    assert row["mixed"] == {} and row["mean"] == 50.0


def test_a_float_override_written_another_way_is_the_same_row_but_a_name_or_path_is_not():
    # "--model.lr 5e-3" refused a rerun with "--model.lr 0.005" as other settings (fit parses both alike)
    from nola_vision.runs.results import same_settings

    def key(*overrides):
        return config_key([str(TINY)], list(overrides))

    assert same_settings(key("--model.lr", "5e-3"), key("--model.lr", "0.005"))
    assert same_settings(key("--model.lr=5.0E-3", "--model.min_lr", "1e-6"), key("--model.min_lr", "0.000001",
                                                                                 "--model.lr", ".005"))
    assert not same_settings(key("--model.lr", "5e-3"), key("--model.lr", "0.05"))
    assert not same_settings(key("--data.root", "1.50"), key("--data.root", "1.5"))  # two folders
    assert not same_settings(key("--trainer.max_epochs", "010"), key("--trainer.max_epochs", "10"))  # as given
