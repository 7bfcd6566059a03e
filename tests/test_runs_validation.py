"""Run tooling tells the truth: protocol and tune refuse overrides of what they set in every run, tune checks its grid
against `fit`'s own options before the first trial, and a search in which no trial completed exits non-zero."""
import re
from pathlib import Path

import pytest

from nola_vision.cli import main
from nola_vision.runs.protocol import refuse_controlled_overrides, run_protocol
from nola_vision.runs.tune import check_grid, parse_grid, run_tune

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_offline.yaml")
FAST = ["--trainer.max_epochs", "1", "--data.shots", "2", "--data.val_shots", "2"]


@pytest.mark.parametrize("override, option, instead", [
    (["--data.split_seed", "7"], "--data.split_seed", "--split_seeds"),
    (["--data.split_se", "7"], "--data.split_seed", "--split_seeds"),  # fit takes a unique prefix for the option
    (["--data.init_args.split_seed=7"], "--data.split_seed", "--split_seeds"),
    (["--data", "{split_seed: 7, shots: 2}"], "--data.split_seed", "--split_seeds"),
    (["--seed_everything=3"], "--seed_everything", "--init_seeds"),
    (["--seed", "3"], "--seed_everything", "--init_seeds"),
    (["--trainer.default_root_dir", "elsewhere"], "--trainer.default_root_dir", "--out and --name"),
    (["--data.split_dir", "elsewhere"], "--data.split_dir", "--out and --name"),
    (["--result_file", "r.json"], "--result_file", "--out and --name"),
    (["--test_after_fit", "false"], "--test_after_fit", "always tests after fit"),
    (["--model.adapter_dir", "one"], "--model.adapter_dir", "its own run folder"),
    # every run resumed one checkpoint: one adapter, counted as several runs ("mean (0.0)")
    (["--ckpt_path", "runs/x/last.ckpt"], "--ckpt_path", "counted as several"),
    (["--ckpt_path=last"], "--ckpt_path", "counted as several"),
])
def test_protocol_refuses_overrides_of_what_it_sets_in_every_run(tmp_path, override, option, instead):
    with pytest.raises(ValueError, match=rf"protocol sets {option} in every run itself.*{instead}"):
        run_protocol([TINY], out=str(tmp_path / "out"), split_seeds=[0, 1], init_seeds=[0],
                     overrides=["--trainer.max_epochs", "1", *override], echo=False)
    assert not (tmp_path / "out").exists()  # refused before anything ran


@pytest.mark.parametrize("override", [["--model.adapter", "lora"], ["--model.adapter={method: lora, rank: 2}"]])
def test_an_option_whose_name_begins_a_controlled_one_is_not_taken_for_its_abbreviation(override):
    refuse_controlled_overrides(override)  # --model.adapter is an option of fit, not a prefix of --model.adapter_dir
    check_grid([TINY], [], {"model.adapter": ["lora", "nola"]})
    with pytest.raises(ValueError, match="protocol sets --model.adapter_dir"):
        refuse_controlled_overrides(["--model.adapter_d", "one"])  # an abbreviation fit would expand


def test_protocol_cli_refuses_a_split_seed_override_naming_its_own_option(tmp_path, capsys):
    code = main(["protocol", "-c", TINY, "--out", str(tmp_path), "--split_seeds", "0", "1", "--data.split_seed", "7"])
    assert code == 2  # a refusal before any run: fit's code for it
    assert "protocol sets --data.split_seed in every run itself" in capsys.readouterr().err


def test_tune_refuses_overrides_and_grid_keys_it_sets_itself(tmp_path):
    with pytest.raises(ValueError, match="tune sets --seed_everything .*--protocol_init_seeds"):
        run_tune([TINY], {"model.lr": [1e-3]}, out=str(tmp_path), overrides=[*FAST, "--seed_everything", "3"])
    with pytest.raises(ValueError, match="tune sets --model.adapter_dir .*its own run folder"):
        run_tune([TINY], {"model.lr": [1e-3]}, out=str(tmp_path), overrides=[*FAST, "--model.adapter_dir", "one"])
    with pytest.raises(ValueError, match="tune sets --data.split_seed .*--split_seeds"):
        run_tune([TINY], {"data.split_seed": [0, 1]}, out=str(tmp_path), overrides=FAST)
    with pytest.raises(ValueError, match="tune sets --ckpt_path .*counted as several"):
        run_tune([TINY], {"model.lr": [1e-3]}, out=str(tmp_path), overrides=[*FAST, "--ckpt_path", "last"])
    assert not list(tmp_path.iterdir())


def test_a_grid_over_what_tune_sets_itself_says_how_to_set_it_not_that_the_key_needs_a_dot():
    # "--grid seed_everything=1,2: expected a dotted key": the seeds are tune's --init_seeds
    with pytest.raises(ValueError, match="tune sets --seed_everything in every run itself.*--init_seeds"):
        parse_grid(["seed_everything=1,2"])
    with pytest.raises(ValueError, match="tune sets --result_file in every run itself"):
        parse_grid(["--result_file=a.json,b.json"])


def test_a_config_that_resumes_a_checkpoint_is_refused_by_protocol(tmp_path):
    config = tmp_path / "resume.yaml"
    config.write_text("ckpt_path: runs/x/last.ckpt\n")
    with pytest.raises(ValueError, match=rf"config {config} sets ckpt_path: runs/x/last.ckpt, which protocol controls"):
        run_protocol([TINY, str(config)], out=str(tmp_path / "out"), split_seeds=[0, 1], init_seeds=[0],
                     overrides=FAST, echo=False)


@pytest.fixture(scope="module")
def fit_options():
    """check_grid's parser is fit's own: built once for these tests."""
    return lambda grid, overrides=FAST: check_grid([TINY], overrides, grid)


@pytest.mark.parametrize("grid, message", [
    ({"model.lrr": [1e-3]}, r"--grid model\.lrr=0\.001 is not accepted by `nola-vision fit`.*model\.lrr is no option "
                            r"of FewShotClassifier \(did you mean model\.lr"),
    ({"model.adapter.init_args.scales": [1]}, r"(?s)--grid model\.adapter\.init_args\.scales=1 .*'scales' is not"),
    ({"model.lr": [1e-3, "fast"]}, r"(?s)--grid model\.lr=fast is not accepted.*model\.lr"),
    ({"data.shot": [1]}, r"--data\.shot abbreviates --data\.shots: tune takes whole option names"),
])
def test_a_grid_key_or_value_that_fit_does_not_take_is_refused_before_any_trial(fit_options, grid, message):
    with pytest.raises(ValueError, match=message):
        fit_options(grid)


def test_grid_keys_of_the_adapters_init_args_are_fit_options(fit_options):
    fit_options({"model.adapter.init_args.scale": [1, 4], "model.lr": [1e-3, 5e-3], "data.augment": ["none", "paper"]})


def test_overrides_that_fit_does_not_take_are_refused_before_any_trial(fit_options):
    with pytest.raises(ValueError, match="configs and overrides are not valid `nola-vision fit` arguments"):
        fit_options({"model.lr": [1e-3]}, [*FAST, "--trainer.max_epochz", "1"])
    with pytest.raises(ValueError, match="--trainer.max_epoch abbreviates --trainer.max_epochs: tune takes whole"):
        fit_options({"model.lr": [1e-3]}, [*FAST, "--trainer.max_epoch", "1"])


def test_tune_exits_non_zero_when_no_trial_completed(tmp_path, capsys):
    code = main(["tune", "-c", TINY, "--out", str(tmp_path), "--name", "t", *FAST, "--skip_protocol",
                 "--grid", "model.lr=1e-3", "--data.root", str(tmp_path / "missing"), "--data.dataset", "imagefolder"])
    err = capsys.readouterr().err
    assert code == 1 and "no trial completed (1 failed" in err
    assert not (tmp_path / "t" / "best.json").exists()


def test_each_protocol_run_exports_into_its_own_folder_even_when_a_config_names_one_adapter_dir(tmp_path):
    from nola_vision.runs.protocol import fit_command
    from nola_vision.train.cli import cli_parser

    config = tmp_path / "shared_adapter.yaml"
    config.write_text(f"model:\n  adapter_dir: {tmp_path / 'one'}\n")  # every run would overwrite the last one's
    command = fit_command("python", ["-c", TINY, "-c", str(config)], tmp_path / "run", 0, 0, [])
    parsed = cli_parser().parse_args(list(command[3:]))
    assert parsed["fit"]["model"]["adapter_dir"] is None  # so fit exports into <run>/.../adapter


@pytest.mark.parametrize("options, message", [
    (dict(protocol_init_seeds=[-1]), r"--protocol_init_seeds -1 is out of range"),
    (dict(protocol_split_seeds=[0, 0]), r"--protocol_split_seeds \[0, 0\] repeats a seed"),
    (dict(n_trials=0), r"--n_trials 0: give at least 1"),
    (dict(n_trials=0, sampler="tpe"), r"--n_trials 0: give at least 1"),  # tpe ran 20 trials
    (dict(n_trials=-2), r"--n_trials -2: give at least 1"),
])
def test_tune_refuses_protocol_seeds_and_trial_counts_before_the_first_trial(tmp_path, options, message):
    # the protocol's seeds were refused after the whole search, under the selection seeds' option names
    with pytest.raises(ValueError, match=message):
        run_tune([TINY], {"model.lr": [1e-3, 2e-2]}, out=str(tmp_path / "out"), name="t", overrides=FAST, echo=False,
                 **options)
    assert not (tmp_path / "out").exists()  # refused before anything ran


@pytest.mark.parametrize("storage", ["foo", "tune.db", "sqlite//tune.db"])
def test_tune_refuses_a_storage_that_is_no_database_url_naming_the_option_before_making_a_folder(tmp_path, storage):
    # SQLAlchemy's "Could not parse SQLAlchemy URL" named neither --storage nor the value, and out/t/ was left behind
    with pytest.raises(ValueError, match=rf"--storage '{storage}' is no database URL .*: give one such as "
                                         r"sqlite:///path/tune\.db"):
        run_tune([TINY], {"model.lr": [1e-3, 2e-2]}, out=str(tmp_path / "out"), name="t", overrides=FAST, echo=False,
                 storage=storage)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("storage", ["sqlite://", "sqlite:///:memory:", "sqlite:///file::memory:?cache=shared&uri=true",
                                     "sqlite:///file:m?mode=memory&cache=shared&uri=true"])
def test_tune_refuses_an_in_memory_storage_before_making_a_folder(tmp_path, storage):
    # each worker thread opened its own empty database: "no such table: trials", reported as Optuna's "invalid data
    # in the commit"
    with pytest.raises(ValueError, match=rf"--storage '{re.escape(storage)}' is an in-memory SQLite database, "
                                         r".*give a file"):
        run_tune([TINY], {"model.lr": [1e-3, 2e-2]}, out=str(tmp_path / "out"), name="t", overrides=FAST, echo=False,
                 storage=storage)
    assert not (tmp_path / "out").exists()


def test_tune_refuses_a_storage_of_a_database_sqlalchemy_does_not_know_before_making_a_folder(tmp_path):
    # SQLAlchemy's "Can't load plugin: sqlalchemy.dialects:foo" exited 1, named no option, and left out/t/ behind
    with pytest.raises(ValueError, match=r"--storage 'foo://bar' is no database URL \(Can't load plugin: "
                                         r"sqlalchemy.dialects:foo\): give one such as sqlite:///path/tune\.db"):
        run_tune([TINY], {"model.lr": [1e-3, 2e-2]}, out=str(tmp_path / "out"), name="t", overrides=FAST, echo=False,
                 storage="foo://bar")
    assert not (tmp_path / "out").exists()


def test_tune_names_a_damaged_study_database_and_what_to_do(tmp_path):
    # SQLite's bare "file is not a database" with SQL, after ten seconds of retries
    (tmp_path / "out" / "t").mkdir(parents=True)
    (tmp_path / "out" / "t" / "tune.db").write_bytes(b"not a database, " * 256)
    with pytest.raises(ValueError, match=r"--storage sqlite:///.*tune.db: file is not a database: the file is not a "
                                         r"study database tune can read .* Move it away, or pass another --name"):
        run_tune([TINY], {"model.lr": [1e-3, 2e-2]}, out=str(tmp_path / "out"), name="t", overrides=FAST, echo=False)


def test_tune_names_a_study_database_that_found_no_room_and_what_to_do(tmp_path, capsys):
    # SQLAlchemy's "(sqlite3.OperationalError) disk I/O error [SQL: CREATE TABLE ...]" named neither cause nor fix
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, hard))  # Python ignores SIGXFSZ: the write fails (EFBIG)
    try:
        code = main(["tune", "-c", TINY, "--out", str(tmp_path / "out"), "--name", "t", "--grid",
                     "model.lr=1e-3,1e-2", "--skip_protocol", *FAST])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    err = capsys.readouterr().err
    assert code == 1 and "cannot write the study database: disk I/O error (a full disk, a file size limit" in err
    assert "[SQL:" not in err and "run the same command again" in err


def test_a_study_write_that_failed_once_the_study_is_open_is_named_from_optunas_wrapped_error():
    # Optuna wraps a failed write of an open study as StorageInternalError ('typically happens due to invalid data'),
    # which escaped as a traceback: its cause holds SQLite's reason
    import sqlite3

    import optuna
    from sqlalchemy.exc import OperationalError

    from nola_vision.runs.tune import _storage_failure

    try:
        try:
            raise OperationalError("UPDATE trials ...", {}, sqlite3.OperationalError("disk I/O error"))
        except OperationalError as error:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from error
    except optuna.exceptions.StorageInternalError as wrapped:
        assert _storage_failure(wrapped).startswith("cannot write the study database: disk I/O error (a full disk")
    assert _storage_failure(optuna.exceptions.StorageInternalError("invalid data")) is None
    try:  # damage found after the study opened (a later page of the file): Optuna's words were "invalid data"
        try:
            raise OperationalError("SELECT ...", {}, sqlite3.DatabaseError("database disk image is malformed"))
        except OperationalError as error:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from error
    except optuna.exceptions.StorageInternalError as wrapped:
        assert re.match(r"the study database cannot be read: database disk image is malformed: part of it is "
                        r"damaged .*Move it away", _storage_failure(wrapped))


def test_tune_checks_the_file_of_a_sqlite_uri_storage_not_its_file_colon_name(tmp_path, monkeypatch):
    # with uri=true SQLite opens "file:sub/t.db" as sub/t.db: the check looked for a folder "file:sub" instead
    from nola_vision.runs.tune import check_sqlite_storage

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"the folder sub does not exist"):
        check_sqlite_storage("sqlite:///file:sub/t.db?uri=true")
    (tmp_path / "sub").mkdir()
    check_sqlite_storage("sqlite:///file:sub/t.db?uri=true")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]  # no file named "file:sub..." was tried or left
