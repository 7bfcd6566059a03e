"""The nola-vision CLI: fit → test round trip offline, predictions CSV, bad configs, paper presets."""
import csv
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from nola_vision import LoRAConfig, NOLAConfig, count_parameters, inject
from nola_vision.cli import main
from nola_vision.data import FewShotDataModule
from nola_vision.train.cli import NolaCLI, run_lightning_cli
from nola_vision.train.module import FewShotClassifier

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_offline.yaml"
PAPER = ROOT / "configs" / "paper"
QUIET = ["--trainer.enable_progress_bar", "false"]
CLI = [sys.executable, "-m", "nola_vision.cli"]  # the console script, from any (even unactivated) environment


def test_fit_then_test_from_checkpoint_gives_the_same_accuracy(tmp_path):
    result = tmp_path / "result.json"
    # the real console script, in its own process
    run = subprocess.run([*CLI, "fit", "-c", str(TINY), "--trainer.default_root_dir", str(tmp_path),
                          "--result_file", str(result), *QUIET], check=True, cwd=tmp_path, capture_output=True, text=True)
    assert "args parameter is intended" not in run.stderr  # Lightning's warning when given args and sys.argv both
    fit = json.loads(result.read_text())
    ckpt = Path(fit["checkpoint"])
    assert ckpt.is_file() and ckpt.stat().st_size < 1_000_000
    assert fit["parameter_counts"]["adapter"] == 2 * 2 * (64 + 64)
    assert (Path(fit["adapter_dir"]) / "adapter_model.safetensors").is_file()
    config = Path(fit["log_dir"]) / "config.yaml"  # the saved config of the run re-parses
    cli = run_lightning_cli(["test", "-c", str(config), "--ckpt_path", str(ckpt), *QUIET])
    assert cli.trainer.callback_metrics["test/acc"].item() == pytest.approx(fit["metrics"]["test/acc"], abs=1e-7)
    exported = json.loads((Path(fit["adapter_dir"]) / "adapter_config.json").read_text())
    assert exported["class_names"] == cli.datamodule.class_names  # what the head's outputs are, for serving


def test_a_quantisation_aware_fit_records_its_bits_and_warns_of_other_adapter_bits_before_training(tmp_path):
    # the result said nothing of the 4 bits its test/acc was measured at; adapter_bits 16 was warned of after the
    # training, from "<frozen runpy>", naming save_adapter's bits=
    result = tmp_path / "result.json"
    with pytest.warns(UserWarning, match=r"quant_bits=4 trains against 4-bit adapter values, but adapter_bits=16 "
                                         r"will store the latent values") as caught:
        cli = run_lightning_cli(["fit", "-c", str(TINY), "--trainer.default_root_dir", str(tmp_path), "--model.quant_bits",
                                 "4", "--model.adapter_bits", "16", "--trainer.max_epochs", "1", "--result_file",
                                 str(result), "--trainer.logger", "false", *QUIET])
    assert not [w for w in caught if "the model trains against" in str(w.message)]  # not again at the export
    written = json.loads(result.read_text())
    assert (written["config"]["quant_bits"], written["adapter_bits"]) == (4, 16)
    assert cli.trainer.global_step > 0


def test_predict_writes_a_csv_with_class_names(tmp_path):
    out = tmp_path / "pred.csv"
    run_lightning_cli(["fit", "-c", str(TINY), "--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "1",
                       "--test_after_fit", "false", *QUIET])
    run_lightning_cli(["predict", "-c", str(TINY), "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", "last",
                       "--predictions_file", str(out), *QUIET])
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 1797 - 898  # the digits test split
    assert rows[0].keys() >= {"index", "path", "label", "prediction", "prediction_name", "confidence"}
    assert [int(r["index"]) for r in rows] == list(range(len(rows)))
    assert rows[0]["prediction_name"] == rows[0]["prediction"]  # digit classes are named "0".."9"


def test_a_fit_without_validation_images_does_not_warn_about_its_empty_validation_loader(tmp_path, recwarn):
    # val_shots 0: the data module's empty validation list made Lightning warn that its length was zero.
    code = main(["fit", "-c", str(TINY), "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "1",
                 "--test_after_fit", "false", *QUIET])
    assert code == 0
    assert not [w for w in recwarn if "across ranks is zero" in str(w.message)]


@pytest.mark.parametrize("override, message", [
    (["--model.backbone", "vit_tiny_patch16_22"], "Close matches: vit_tiny_patch16_224"),
    (["--model.adapter", '{"class_path": "nola_vision.NOLAConfig", "init_args": {"targets": ["mlp.fc3"]}}'],
     "matches no nn.Linear"),
    (["--data.shots", "200"], "allow_fewer"),
])
def test_bad_configs_fail_before_training_naming_the_fix(tmp_path, capsys, override, message):
    code = main(["fit", "-c", str(TINY), "--trainer.default_root_dir", str(tmp_path), *QUIET, *override])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ckpt"))


class _Parsed(Exception):
    pass


class ParseOnlyCLI(NolaCLI):
    """Stops after parsing and linking: checks configs without downloading weights or data."""

    def before_instantiate_classes(self) -> None:
        raise _Parsed(self.config)


def parse(*files: Path):
    with pytest.raises(_Parsed) as parsed:
        ParseOnlyCLI(FewShotClassifier, FewShotDataModule, args=[a for f in files for a in ("-c", str(f))], run=False)
    return parsed.value.args[0]


# Paper rows: backbone config -> method configs and their exact trained adapter parameters (DESIGN.md)
PAPER_ROWS = {
    "vit_b16": {"full": None, "linear": 0, "lora_qv_r4": 147_456, "nola_mlp_r4_k1024": 49_152},
    "vit_b16_mae": {"full": None, "linear": 0, "lora_qv_r4": 147_456, "nola_mlp_r4_k1024": 49_152},
    "vit_l16": {"lora_qv_r4": 393_216, "lora_qv_r1": 98_304, "nola_mlp_r1_k1024": 98_304, "nola_mlp_r1_k512": 49_152},
    "vit_l16_mae": {"lora_qv_r4": 393_216, "lora_qv_r1": 98_304, "nola_mlp_r1_k1024": 98_304, "nola_mlp_r1_k512": 49_152},
}
DATASETS = ["cifar10", "cifar100", "cub200", "caltech101", "food101"]


def test_paper_presets_compose_with_the_papers_hyperparameters():
    cfg = parse(PAPER / "base.yaml", PAPER / "backbone/vit_b16.yaml", PAPER / "method/nola_mlp_r4_k1024.yaml",
                PAPER / "data/cifar100.yaml", PAPER / "shots/10.yaml")
    assert (cfg.trainer.max_epochs, cfg.trainer.precision) == (50, "16-mixed")
    assert (cfg.model.optimizer, cfg.model.lr, cfg.model.min_lr, cfg.model.weight_decay) == ("adam", 5e-3, 1e-6, 0.0)
    assert cfg.model.label_smoothing == 0.1 and cfg.data.batch_size == 16 and cfg.data.augment == "paper"
    assert (cfg.data.dataset, cfg.data.shots, cfg.data.backbone) == ("cifar100", 10, cfg.model.backbone)
    assert cfg.model.adapter.init_args.num_basis_a == 1024 and cfg.model.adapter.init_args.rank == 4


def test_paper_presets_cover_every_cell_with_exact_counts():
    """Every (backbone, method, dataset, shots) cell parses; adapter counts match the paper on meta-device models."""
    import timm

    for backbone, methods in PAPER_ROWS.items():
        name = yaml.safe_load((PAPER / f"backbone/{backbone}.yaml").read_text())["model"]["backbone"]
        assert timm.list_pretrained(name) == [name]
        for method, expected in methods.items():
            adapter = yaml.safe_load((PAPER / f"method/{method}.yaml").read_text())["model"]["adapter"]
            if expected is not None:
                config = adapter if isinstance(adapter, str) else \
                    {"NOLAConfig": NOLAConfig, "LoRAConfig": LoRAConfig}[adapter["class_path"].split(".")[-1]](**adapter["init_args"])
                with torch.device("meta"):
                    model = timm.create_model(name.split(".")[0], pretrained=False, num_classes=10)
                assert count_parameters(inject(model, config))["adapter"] == expected, (backbone, method)
    # every cell's composition parses (one backbone per row suffices for data/shots, they are independent files)
    for backbone, dataset, shots in itertools.product(PAPER_ROWS, DATASETS, (5, 10)):
        method = next(iter(PAPER_ROWS[backbone]))
        cfg = parse(PAPER / "base.yaml", PAPER / f"backbone/{backbone}.yaml", PAPER / f"method/{method}.yaml",
                    PAPER / f"data/{dataset}.yaml", PAPER / f"shots/{shots}.yaml")
        assert (cfg.data.dataset, cfg.data.shots) == (dataset, shots)


def test_help_lists_subcommands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "demo" in out and "protocol" in out and "fit" in out


@pytest.fixture
def run_cli(tmp_path, capfd, monkeypatch):
    """The console script run in ``tmp_path``: its exit code and output (file descriptors 1 and 2, so a data loader
    worker's output too). In this process: test_fit_then_test_from_checkpoint_gives_the_same_accuracy runs the real
    console script, and each of these would only add the start-up of a fresh interpreter importing Lightning."""
    def run(*args: str) -> subprocess.CompletedProcess:
        monkeypatch.chdir(tmp_path)
        capfd.readouterr()
        code = main([*args, "--trainer.default_root_dir", str(tmp_path), *QUIET])
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess([*CLI, *args], code, out, err)

    return run


def test_diverging_fit_stops_with_a_short_error_and_exports_nothing(tmp_path, run_cli):
    run = run_cli("fit", "-c", str(TINY), "--model.lr", "9e5", "--result_file", str(tmp_path / "result.json"))
    assert run.returncode == 3, run.stderr[-3000:]  # its own code: tune counts the point as diverged
    assert "training diverged" in run.stderr and "lr 9" in run.stderr and "Lower model.lr" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "result.json").exists()
    assert not list(tmp_path.rglob("adapter_model.safetensors")) and not list(tmp_path.rglob("adapter_config.json"))


@pytest.mark.parametrize("split, extra", [("train", []), ("val", ["--data.num_workers", "1"]), ("test", [])])
def test_corrupt_image_gives_a_short_error_naming_the_file(tmp_path, run_cli, split, extra):
    from fixtures_data import write_imagefolder

    write_imagefolder(tmp_path / "data", eval_folder="test" if split == "test" else "val")
    bad = tmp_path / "data" / split / "dog" / "dog 01.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png IEND\xaeB`\x82")  # ends as a PNG: not cut short, undecodable
    run = run_cli("fit", "-c", str(TINY), "--data.dataset", "imagefolder", "--data.root", str(tmp_path / "data"),
                  "--data.shots", "4", "--trainer.max_epochs", "1", *extra)
    assert run.returncode == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    message = run.stderr.strip().splitlines()[-2]
    assert message.startswith("nola-vision: error: cannot decode image") and str(bad) in message
    assert "Replace it with a valid image" in message and ".." not in message
    if split == "test":  # found after training, which is kept
        assert "Training had finished and was kept" in message


def test_fit_ckpt_path_last_resumes_the_previous_run(tmp_path):
    common = ["-c", str(TINY), "--trainer.default_root_dir", str(tmp_path), "--test_after_fit", "false", *QUIET]
    run_lightning_cli(["fit", *common, "--trainer.max_epochs", "2"])
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    cli = run_lightning_cli(["fit", *common, "--trainer.max_epochs", "3", "--ckpt_path", "last",
                             "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                             "--trainer.logger.save_dir", str(tmp_path)])
    assert cli.trainer.ckpt_path == str(last)
    assert (cli.trainer.current_epoch, cli.trainer.global_step) == (3, 9)  # 5-shot digits, batch 16: 3 steps/epoch
    rows = list(csv.DictReader(open(Path(cli.trainer.log_dir) / "metrics.csv")))
    assert {r["epoch"] for r in rows if r.get("train/loss_step")} == {"2"}  # only the third epoch was trained


def test_checkpoint_hyperparameters_never_silently_replace_model_arguments(tmp_path, capsys):
    run_lightning_cli(["fit", "-c", str(TINY), "--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "1",
                       "--model.lr", "1e-3", "--test_after_fit", "false", *QUIET])
    ckpt = str(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")
    predict = ["predict", "-c", str(TINY), "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", ckpt, *QUIET,
               "--predictions_file", str(tmp_path / "pred.csv")]
    assert main([*predict, "--model.lr", "0.1"]) == 2  # an explicit argument the checkpoint would replace
    err = capsys.readouterr().err
    assert "--model.lr 0.1 (checkpoint: 0.001)" in err and "Drop those arguments" in err
    with pytest.warns(UserWarning, match=r"model.lr 0.005 -> 0.001"):  # a config-file value: replaced, with a warning
        run_lightning_cli(predict)
    assert main([*predict, "--model.lr", "0.001"]) == 0  # the same value is fine
    assert main([*predict[:-1], str(tmp_path)]) != 0  # a directory: refused before the prediction pass, not after
    assert f"--predictions_file {tmp_path} is a directory: pass a file path" in capsys.readouterr().err
    notes = tmp_path / "notes.csv"  # a file predict did not write is never replaced (its own earlier file is)
    notes.write_text("my notes\n")
    assert main([*predict[:-1], str(notes)]) != 0 and notes.read_text() == "my notes\n"
    assert "exists and is not a file predict wrote" in capsys.readouterr().err


def test_a_huge_learning_rate_exports_an_adapter_that_loads_before_the_result_is_written(tmp_path, run_cli):
    from safetensors.torch import load_file

    from nola_vision import load_adapter

    result = tmp_path / "result.json"
    run = run_cli("fit", "-c", str(TINY), "--model.lr", "1e5", "--trainer.max_epochs", "1", "--result_file", str(result))
    assert run.returncode == 0, run.stderr[-3000:]
    adapter_dir = Path(json.loads(result.read_text())["adapter_dir"])
    stored = load_file(adapter_dir / "adapter_model.safetensors")
    assert max(t.float().abs().max().item() for t in stored.values()) > 65_504  # beyond float16: kept in float32
    model = run_lightning_cli(["-c", str(TINY), "--trainer.default_root_dir", str(tmp_path), *QUIET],
                              run=False).model.model  # the same seeded backbone and adapter config
    load_adapter(model, adapter_dir)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_an_adapter_dir_that_is_a_file_is_refused_before_training_and_left_untouched(tmp_path, run_cli):
    target = tmp_path / "adapter"
    target.write_text("my notes")
    run = run_cli("fit", "-c", str(TINY), "--model.adapter_dir", str(target), "--result_file", str(tmp_path / "result.json"))
    assert run.returncode == 2, run.stderr[-3000:]
    assert "is an existing file, not a directory" in run.stderr and "Traceback" not in run.stderr
    assert target.read_text() == "my notes" and not (tmp_path / "result.json").exists()
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.glob(".adapter*"))


def test_the_top_level_help_lists_every_command_then_says_whose_help_follows(capsys):
    # Lightning's "usage: nola-vision [-c CONFIG] {fit,validate,test,predict}" followed the summary without a word,
    # as if demo, protocol and tune were no commands
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    summary, lightning = out.split("The Lightning CLI's own help, for fit, validate, test and predict")
    assert all(f"  {command} " in summary for command in ("demo", "protocol", "tune"))
    assert "usage: nola-vision [-c CONFIG] {fit,validate,test,predict}" in lightning


def test_usage_lines_and_tips_name_the_command_however_it_was_started(capsys):
    """Started as `python -m nola_vision.cli`, the usage line and the tip of a misspelt option named "cli.py"
    (Lightning takes the program's name from sys.argv[0]): `cli.py fit --help` runs nothing."""
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert capsys.readouterr().out.startswith("usage: nola-vision [options] fit")
    with pytest.raises(SystemExit):
        main(["fit", "--shotz", "3"])
    assert "run: nola-vision fit --help" in capsys.readouterr().err
    # a misspelt section option is named with the close ones, as a config file's key is ("unrecognized arguments")
    assert main(["fit", "--data.shotz", "3"]) == 2
    assert "the command line: data.shotz is no option of FewShotDataModule (did you mean data.shots" in \
        capsys.readouterr().err
