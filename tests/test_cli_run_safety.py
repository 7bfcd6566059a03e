"""Runs that overwrote each other or trained silently wrong: two fits at once in one folder, a re-run into a fixed
``adapter_dir``, a resume with another ``max_epochs``, and predictions of classes whose names are not UTF-8."""
import csv
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from nola_vision.cli import main
from nola_vision.train import module
from nola_vision.train.cli import (
    FIT_LOCK,
    SAVED_CONFIG_MARK,
    PredictionsCSVWriter,
    _is_saved_config,
    check_config_sources,
    claim_log_dir,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_offline.yaml"
FIT = ["fit", "-c", str(TINY), "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "1",
       "--test_after_fit", "false"]
NO_LOGGER = ["--trainer.logger", "false"]


def run(capsys, *args):
    """Exit code and stderr of the console script's main, in this process."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hold_fit_lock(folder: Path) -> int:
    """Hold ``folder``'s fit lock as a fit running there now would."""
    fcntl = pytest.importorskip("fcntl")  # Windows: fits lock nothing
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / FIT_LOCK, os.O_RDONLY | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


# without a logger, or two runs of a logger on the same version_N (given, or picked by both at once)
SAME_VERSION = ["--trainer.logger", "CSVLogger", "--trainer.logger.version", "0"]


@pytest.mark.parametrize("logger, folder", [(NO_LOGGER, "."), (SAME_VERSION, "lightning_logs/version_0")])
def test_a_fit_into_a_folder_another_fit_is_running_in_is_refused(tmp_path, capsys, logger, folder):
    fit = [*FIT, "--trainer.default_root_dir", tmp_path, *logger]
    if "CSVLogger" in logger:
        fit += ["--trainer.logger.save_dir", tmp_path]
    held = hold_fit_lock(tmp_path / folder)
    try:
        code, err = run(capsys, *fit)
    finally:
        os.close(held)
    assert code == 2 and f"another fit is running in {tmp_path / folder}" in err.replace("/./", "/")
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("adapter"))
    # the lock file left behind keeps nothing: a fit runs there, and once it ended, a resume of it too
    assert run(capsys, *fit)[0] == 0
    assert run(capsys, *fit, "--ckpt_path", "last", "--trainer.max_epochs", "2")[0] == 0


@pytest.mark.parametrize("shared", ["adapter", "result.json"])
def test_a_fit_sharing_its_adapter_dir_or_result_file_with_a_running_fit_is_refused(tmp_path, capsys, shared):
    """Two fits into other run folders but one adapter_dir and result_file each exported and wrote its result: one
    run's result ended beside the other run's adapter, and the other's result was lost, both exiting 0."""
    outputs = ["--model.adapter_dir", tmp_path / "adapter", "--result_file", tmp_path / "result.json"]
    held = hold_fit_lock(tmp_path)  # a fit's lock on <output>: .<name>.fit-running beside it
    os.rename(tmp_path / FIT_LOCK, tmp_path / f".{shared}{FIT_LOCK}")
    try:
        code, err = run(capsys, *FIT, "--trainer.default_root_dir", tmp_path / "b", *outputs)
    finally:
        os.close(held)
    option = "--model.adapter_dir" if shared == "adapter" else "--result_file"
    assert code == 2 and f"another fit is writing {option} {tmp_path / shared} now" in " ".join(err.split())
    assert not list(tmp_path.rglob("*.ckpt")) and not (tmp_path / "adapter").exists()
    assert run(capsys, *FIT, "--trainer.default_root_dir", tmp_path / "b", *outputs)[0] == 0  # once it ended
    assert (tmp_path / "adapter").is_dir() and (tmp_path / "result.json").is_file()


@pytest.mark.parametrize("shared, option", [("adapter", "--model.adapter_dir"), ("result.json", "--result_file")])
def test_a_fit_naming_a_running_fits_output_through_a_symlink_is_refused_too(tmp_path, capsys, shared, option):
    # the lock was named after the path as given (.alias.fit-running): both fits ran and exported into one folder
    held = hold_fit_lock(tmp_path)
    os.rename(tmp_path / FIT_LOCK, tmp_path / f".{shared}{FIT_LOCK}")
    if shared == "adapter":
        (tmp_path / shared).mkdir()
    (tmp_path / "links").mkdir()
    alias = tmp_path / "links" / "alias"
    alias.symlink_to(tmp_path / shared)  # a dangling link for the result: written through
    try:
        code, err = run(capsys, *FIT, "--trainer.default_root_dir", tmp_path / "b", option, alias)
    finally:
        os.close(held)
    assert code == 2 and f"another fit is writing {option} {tmp_path / 'links' / 'alias'} now" in " ".join(err.split())
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_fit_holds_its_adapter_dir_and_result_file_locks_until_its_result_is_written(tmp_path, capsys, monkeypatch):
    """The locks were let go when trainer.fit returned, before the test pass and the result's write: a second fit could
    export over the adapter meanwhile, and the first run's result then described the other run's adapter."""
    import lightning.pytorch

    from nola_vision.core.storage import try_lock

    locks = [tmp_path / f".{name}{FIT_LOCK}" for name in ("adapter", "result.json")]
    free = []
    testing = lightning.pytorch.Trainer.test

    def probing(*args, **kwargs):
        for lock in locks:
            fd = try_lock(lock)  # another open file: refused while the fit holds it
            free.append(fd is not None)
            if fd is not None:
                os.close(fd)
        return testing(*args, **kwargs)

    monkeypatch.setattr(lightning.pytorch.Trainer, "test", probing)
    outputs = ["--model.adapter_dir", tmp_path / "adapter", "--result_file", tmp_path / "result.json"]
    args = FIT[:-2]  # with its test pass
    assert run(capsys, *args, "--trainer.default_root_dir", tmp_path / "run", *outputs)[0] == 0
    assert free == [False, False]
    for lock in locks:  # and let go once it ended
        os.close(try_lock(lock))


def test_a_fit_driven_from_python_lets_go_of_its_output_locks_when_it_ends(tmp_path):
    """Only the console script's after_fit let go of them: a second fit in the same process (a notebook) into the same
    adapter_dir was refused as if another fit were writing it."""
    from nola_vision.core.storage import try_lock
    from nola_vision.train.cli import run_lightning_cli

    for run in ("a", "b"):
        args = [*FIT[1:-2], "--test_after_fit", "false", "--trainer.default_root_dir", str(tmp_path / run),
                "--model.adapter_dir", str(tmp_path / "adapter")]
        cli = run_lightning_cli(args, run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    os.close(try_lock(tmp_path / f".adapter{FIT_LOCK}"))  # free


@pytest.mark.parametrize("below", ["", "runs"])
def test_a_default_root_dir_at_or_under_a_file_is_a_configuration_error_naming_both(tmp_path, capsys, below):
    """Lightning's bare '[Errno 20] Not a directory: .../lightning_logs' named neither the option nor the file."""
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    root = notes / below if below else notes
    code, err = run(capsys, *FIT, "--trainer.default_root_dir", root)
    assert code == 2 and (f"--trainer.default_root_dir {root} cannot be a folder: {notes} is a file. Choose a "
                          "directory (the file was left untouched, and nothing trained)") in err
    assert notes.read_text() == "mine\n"


@pytest.mark.parametrize("option", ["checkpoint", "logger"])
def test_a_checkpoint_dirpath_or_logger_save_dir_at_a_file_is_refused_before_anything_trains(tmp_path, capsys, option):
    """A ModelCheckpoint's dirpath at a file trained a whole epoch, then failed on a bare '[Errno 17] File exists'
    (its checkpoint lost); a logger's save_dir there on a bare '[Errno 20] Not a directory'."""
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    extra = (["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath", notes] if option == "checkpoint"
             else ["--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", notes / "logs"])
    code, err = run(capsys, *FIT, "--trainer.default_root_dir", tmp_path / "run", *extra)
    named = "ModelCheckpoint's dirpath" if option == "checkpoint" else "CSVLogger's save_dir"
    assert code == 2 and named in err and f"cannot be a folder: {notes} is a file" in err and "nothing trained" in err
    assert notes.read_text() == "mine\n" and not (tmp_path / "run").exists()


def test_commands_started_together_in_one_root_each_claim_their_own_version_folder(tmp_path):
    """Two predict passes started together picked the same version_N (the folder was made only later, after the slow
    checks): the second replaced the first one's predictions and config record."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import CSVLogger

    first, second = (Trainer(logger=CSVLogger(tmp_path), enable_progress_bar=False) for _ in range(2))
    assert claim_log_dir(first) == tmp_path / "lightning_logs" / "version_0" and (tmp_path / "lightning_logs" /
                                                                                     "version_0").is_dir()
    assert claim_log_dir(second) == tmp_path / "lightning_logs" / "version_1"
    assert first.log_dir != second.log_dir
    assert claim_log_dir(Trainer(logger=False, default_root_dir=tmp_path / "none")) is None  # no logger: no folder
    assert not (tmp_path / "none").exists()


def test_a_run_that_fails_before_writing_anything_leaves_no_version_folder(tmp_path):
    """The folder is claimed before the run starts: a DDP launch whose processes never joined (a busy port), or Ctrl-C
    while they started, left an empty version_N behind."""
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.loggers import CSVLogger

    class FailsAtSetup(LightningModule):
        def setup(self, stage):
            raise RuntimeError("before anything ran")

        def training_step(self, batch):
            return None

        def configure_optimizers(self):
            return None

    trainer = Trainer(logger=CSVLogger(tmp_path), enable_progress_bar=False, max_epochs=1)
    folder = claim_log_dir(trainer)
    with pytest.raises(RuntimeError, match="before anything ran"):
        trainer.fit(FailsAtSetup(), train_dataloaders=[])
    assert not folder.exists()


def test_a_rerun_into_one_adapter_dir_keeps_the_previous_adapter_and_results_name_theirs(tmp_path, capsys):
    shared = tmp_path / "shared_adapter"
    common = [*FIT, *NO_LOGGER, "--model.adapter_dir", shared]
    assert run(capsys, *common, "--trainer.default_root_dir", tmp_path / "a", "--model.lr", "5e-3",
               "--result_file", tmp_path / "a.json")[0] == 0
    first = json.loads((tmp_path / "a.json").read_text())
    assert first["adapter_sha256"] == sha256(shared / "adapter_model.safetensors")
    with pytest.warns(UserWarning, match=f"{shared} already held an adapter.*kept as {shared}.previous"):
        assert run(capsys, *common, "--trainer.default_root_dir", tmp_path / "b", "--model.lr", "5e-2",
                   "--result_file", tmp_path / "b.json")[0] == 0
    second = json.loads((tmp_path / "b.json").read_text())
    assert second["adapter_sha256"] == sha256(shared / "adapter_model.safetensors") != first["adapter_sha256"]
    previous = shared.with_name("shared_adapter.previous")
    assert sha256(previous / "adapter_model.safetensors") == first["adapter_sha256"]


def test_a_failed_export_into_an_adapter_dir_loses_no_adapter(tmp_path, capsys, monkeypatch):
    shared = tmp_path / "shared_adapter"
    common = [*FIT, *NO_LOGGER, "--model.adapter_dir", shared]
    assert run(capsys, *common, "--trainer.default_root_dir", tmp_path / "a")[0] == 0
    kept = (shared / "adapter_model.safetensors").read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module, "save_adapter", full_disk)
    with pytest.warns(UserWarning, match="already held an adapter"):
        assert run(capsys, *common, "--trainer.default_root_dir", tmp_path / "b")[0] == 1
    assert (shared / "adapter_model.safetensors").read_bytes() == kept
    assert (shared.with_name("shared_adapter.previous") / "adapter_model.safetensors").read_bytes() == kept


def test_resuming_with_another_max_epochs_trains_on_at_the_new_schedules_rates(tmp_path):
    """A run of 1 epoch extended to 3: the checkpoint's learning rates had decayed to min_lr (the 1-epoch cosine's
    end), and the extension trained at them. Now epoch 1 trains at the 3-epoch cosine's rate, with a warning."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from test_module import NOLA, TINY, loader, trainer

    from nola_vision.train.module import FewShotClassifier
    from nola_vision.train.recipe import cosine_factor

    def module():
        return FewShotClassifier(num_classes=4, adapter=NOLA, lr=1e-2, head_lr=1e-2, min_lr=1e-6, warmup_epochs=0,
                                 **TINY)

    L.seed_everything(0)
    trainer(tmp_path / "a", epochs=1).fit(module(), loader())
    checkpoint = next((tmp_path / "a" / "checkpoints").glob("*.ckpt"))
    rates = []

    class Rates(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            rates.append([group["lr"] for group in trainer.optimizers[0].param_groups])

    with pytest.warns(UserWarning, match=r"resuming at epoch 1 with learning rate 1e-06 .* gives 0.0075 there"):
        trainer(tmp_path / "b", epochs=3, callbacks=[Rates()]).fit(module(), loader(), ckpt_path=checkpoint)
    factor = cosine_factor(3, 1e-2, 1e-6, 0)
    assert rates == [[1e-2 * factor(1)] * len(rates[0]), [1e-2 * factor(2)] * len(rates[0])]
    # a resume on the run's own schedule keeps the checkpoint's rates, without a warning
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "c", save_top_k=-1)
    trainer(tmp_path / "c", epochs=3, callbacks=[every_epoch]).fit(module(), loader())
    rates.clear()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="nola_vision: resuming")
        trainer(tmp_path / "d", epochs=3, callbacks=[Rates()]).fit(module(), loader(),
                                                                  ckpt_path=next((tmp_path / "c").glob("epoch=0-*")))
    assert rates == [[1e-2 * factor(1)] * len(rates[0]), [1e-2 * factor(2)] * len(rates[0])]


def test_predictions_of_classes_named_in_no_utf8_keep_their_bytes(tmp_path):
    path = tmp_path / "predictions.csv"
    writer = PredictionsCSVWriter(str(path))
    names = [os.fsdecode(b"caf\xe9"), "tea"]  # a Latin-1 folder name, as the dataset lists it
    trainer = SimpleNamespace(world_size=1, is_global_zero=True, datamodule=SimpleNamespace(class_names=names),
                              log_dir=str(tmp_path), default_root_dir=str(tmp_path))
    prediction = {"prediction": torch.tensor([0, 1]), "confidence": torch.tensor([0.9, 0.6]),
                  "label": torch.tensor([0, 0])}
    writer.write_on_batch_end(trainer, None, prediction, [0, 1], None, 0, 0)
    writer.on_predict_epoch_end(trainer, None)
    rows = path.read_bytes().splitlines()
    assert rows[1] == b"0,,0,caf\xe9,0,caf\xe9,0.900000" and rows[2] == b"1,,0,caf\xe9,1,tea,0.600000"


def test_predictions_of_classes_named_like_formulas_open_in_a_spreadsheet_as_text(tmp_path):
    """Class folders named =1+2, +cat or @dog were written as they are: a spreadsheet opening predictions.csv ran
    them as formulas (a crafted folder name could be a HYPERLINK or DDE payload)."""
    path = tmp_path / "predictions.csv"
    writer = PredictionsCSVWriter(str(path))
    names = ["=1+2", "+cat", "@dog", "-owl", "tea-cup"]
    trainer = SimpleNamespace(world_size=1, is_global_zero=True, datamodule=SimpleNamespace(class_names=names),
                              log_dir=str(tmp_path), default_root_dir=str(tmp_path))
    prediction = {"prediction": torch.tensor([0, 1, 2, 3, 4]), "confidence": torch.tensor([0.5] * 5),
                  "label": torch.tensor([4, 3, 2, 1, 0])}
    writer.write_on_batch_end(trainer, None, prediction, [0, 1, 2, 3, 4], None, 0, 0)
    writer.on_predict_epoch_end(trainer, None)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["prediction_name"] for r in rows] == ["'=1+2", "'+cat", "'@dog", "'-owl", "tea-cup"]
    assert [r["label_name"] for r in rows] == ["tea-cup", "'-owl", "'@dog", "'+cat", "'=1+2"]
    assert [r["prediction"] for r in rows] == ["0", "1", "2", "3", "4"]


def test_a_logger_less_fit_keeps_a_users_own_config_yaml_and_replaces_a_dead_runs(tmp_path, capsys):
    """Without a logger a run writes config.yaml straight into default_root_dir (the working directory by default),
    where a user's own config.yaml was replaced by Lightning's dump."""
    mine = tmp_path / "config.yaml"
    mine.write_text("# my project config\nkey: value\n")
    code, err = run(capsys, *FIT, "--trainer.logger", "false", "--trainer.default_root_dir", tmp_path)
    assert code == 2 and "is not a config.yaml a run saved" in err
    assert mine.read_text() == "# my project config\nkey: value\n" and not (tmp_path / "checkpoints").exists()
    # A run that died before it kept anything left its marked dump (here, by the line earlier builds wrote): replaced,
    # and the new dump is marked in turn.
    older_mark = "# saved by nola-vision fit: a run's config, which a later fit without a logger here replaces\n"
    mine.write_text("# lightning.pytorch==2.6.6\n" + older_mark + "seed_everything: 0\n")
    code, err = run(capsys, *FIT, "--trainer.logger", "false", "--trainer.default_root_dir", tmp_path)
    assert code == 0, err
    assert "seed_everything" in mine.read_text() and "key: value" not in mine.read_text()
    assert mine.read_text().splitlines()[1] == SAVED_CONFIG_MARK.decode().rstrip("\n")
    assert yaml.safe_load(mine.read_text())["trainer"]["logger"] is False  # still a config -c reads


@pytest.mark.parametrize("text", [
    "\n# my project config\nkey: value\n",  # a blank first line
    "# lightning.pytorch==2.6.6\n# my note: lr picked by hand\nseed_everything: 0\n",  # --print_config, then edited
])
def test_a_logger_less_fit_keeps_a_print_config_dump_or_a_file_with_a_blank_first_line(tmp_path, capsys, text):
    mine = tmp_path / "config.yaml"
    mine.write_text(text)
    code, err = run(capsys, *FIT, *NO_LOGGER, "--trainer.default_root_dir", tmp_path)
    assert code == 2 and "is not a config.yaml a run saved" in err and "--print_config" in err
    assert mine.read_text() == text


def test_a_logger_less_fit_never_replaces_the_config_file_it_reads(tmp_path, capsys, monkeypatch):
    # A run's own saved config.yaml, passed back with -c into the same folder, is the command's input: kept.
    code, err = run(capsys, *FIT, *NO_LOGGER, "--trainer.default_root_dir", tmp_path, "--trainer.max_steps", "1")
    assert code == 0, err
    saved = tmp_path / "config.yaml"
    shutil.rmtree(tmp_path / "checkpoints", ignore_errors=True)
    shutil.rmtree(tmp_path / "adapter", ignore_errors=True)
    text = saved.read_text() + "# my edit\n"
    saved.write_text(text)
    monkeypatch.chdir(tmp_path)
    code, err = run(capsys, "fit", "-c", "config.yaml", "--trainer.max_epochs", "1")
    assert code == 2 and "a config this command reads" in err and saved.read_text() == text


def test_config_entries_that_are_no_local_file_do_not_block_replacing_a_runs_config(tmp_path):
    # An inline --config string is None in the parsed list, and a -c URL or a file removed since is no local file:
    # each made the check fail and refuse a dead run's marked config.yaml.
    saved = tmp_path / "config.yaml"
    saved.write_text("# lightning.pytorch==2.6.6\n" + SAVED_CONFIG_MARK.decode() + "seed_everything: 0\n")
    assert _is_saved_config(saved, [None, tmp_path / "removed.yaml", "https://example.org/config.yaml"])
    assert not _is_saved_config(saved, [None, saved])


def test_a_config_file_before_the_subcommand_must_hold_subcommand_sections(tmp_path, capsys):
    """``nola-vision -c run/config.yaml fit``: the parser silently ignored every key of a flat config given before
    the subcommand, so the run trained on the defaults instead of the file's settings."""
    flat = tmp_path / "flat.yaml"
    flat.write_text(TINY.read_text())
    code, err = run(capsys, "-c", flat, "fit", "--trainer.default_root_dir", tmp_path / "run")
    assert code == 2 and "comes before the subcommand" in err and f"nola-vision fit -c {flat}" in err
    assert "model, data" in err and not (tmp_path / "run").exists()
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text("seed_everything: 5\nfit:\n  seed_everything: 3\n")
    assert "its seed_everything would be ignored" in run(capsys, "-c", mixed, "fit")[1]
    nested = tmp_path / "nested.yaml"
    nested.write_text("fit:\n  seed_everything: 3\ntest:\n  seed_everything: 4\n")
    check_config_sources(["-c", str(nested), "fit", "-c", str(flat)])  # sections before, a flat file after: fine
    check_config_sources(["--config", str(nested), "fit"])
    chosen = tmp_path / "chosen.yaml"  # the subcommand itself may come from the file
    chosen.write_text("subcommand: fit\nfit:\n  seed_everything: 3\n")
    check_config_sources(["-c", str(chosen)])
    with pytest.raises(ValueError, match="comes before the subcommand"):
        check_config_sources([f"--config={flat}", "fit"])


def test_a_fit_refused_in_setup_leaves_no_version_folder_behind(tmp_path, capsys):
    """A fit refused once its version_N was made (here an adapter_dir that is a file) left the folder holding its fit
    lock, and a refusal after the config was saved left that too: runs that never trained among the versions."""
    blocking = tmp_path / "adapter"
    blocking.write_text("mine\n")
    code, err = run(capsys, *FIT, "--trainer.default_root_dir", tmp_path / "root", "--model.adapter_dir", blocking)
    assert code == 2 and "is an existing file, not a directory" in err
    assert not any((tmp_path / "root" / "lightning_logs").glob("version_*"))


@pytest.mark.parametrize("extra, kept", [(None, False), ("metrics.csv", True), ("checkpoints", True)])
def test_only_a_claimed_folder_holding_just_its_lock_and_saved_config_is_removed(tmp_path, extra, kept):
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.loggers import CSVLogger

    trainer = Trainer(logger=CSVLogger(tmp_path), enable_progress_bar=False, max_epochs=1)
    folder = claim_log_dir(trainer)

    class FailsAfterTheConfigIsSaved(LightningModule):
        def setup(self, stage):
            (folder / FIT_LOCK).touch()
            (folder / "config.yaml").write_bytes(b"# lightning.pytorch==2.6.0\n" + SAVED_CONFIG_MARK + b"seed: 0\n")
            if extra == "checkpoints":
                (folder / extra).mkdir()
            elif extra:
                (folder / extra).write_text("step\n")
            raise RuntimeError("refused")

        def training_step(self, batch):
            return None

        def configure_optimizers(self):
            return None

    with pytest.raises(RuntimeError, match="refused"):
        trainer.fit(FailsAfterTheConfigIsSaved(), train_dataloaders=[])
    assert folder.exists() == kept
    if kept:
        assert (folder / "config.yaml").is_file() and (folder / FIT_LOCK).exists()
