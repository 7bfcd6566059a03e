"""Writes that cannot succeed: a full disk or a file size limit mid-run is one error line, not a traceback; an output
that cannot be written (a folder the process may not write, a name over the file system's limit, a symlink into a
missing folder, a table that is a directory, a SQLite storage in a missing folder) is refused before the first run;
and a killed protocol's fit keeps its run's claim, so a re-run does not start it twice."""
import contextlib
import errno
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_fit import fake_python

from nola_vision.cli import main
from nola_vision.runs.protocol import run_protocol
from nola_vision.runs.results import claim_run
from nola_vision.train.cli import check_result_path

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_offline.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--trainer.max_epochs", "1"]
LONG = "n" * 300  # over the 255 bytes a file name may have on common file systems
# root obeys file permissions only without its capabilities (CAP_DAC_OVERRIDE)
NO_CAPS = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"] if os.geteuid() == 0 else []


def run(capsys, *args):
    """Exit code and stderr of the console script's main, in this process."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


@contextlib.contextmanager
def file_size_limit(kib):
    """``ulimit -f`` for this process: a longer write fails with EFBIG (Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (kib * 1024, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


# ---- a write that fails mid-run -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kib, options, message", [
    (40, [], "epoch=0-step=3.ckpt: a file would exceed the file size limit"),  # a ~47 KB checkpoint, whole or none
    (3, ["--trainer.enable_checkpointing", "false"], "cannot save to"),  # the ~3.2 KB adapter: save_adapter's own
], ids=["checkpoint", "adapter"])
def test_a_file_size_limit_mid_fit_is_one_error_line(tmp_path, capsys, kib, options, message):
    with file_size_limit(kib):
        code, err = run(capsys, "fit", "-c", TINY, *QUIET, "--trainer.default_root_dir", tmp_path, *options)
    assert code == 1 and message in err and "Traceback" not in err


@pytest.mark.parametrize("error, message", [
    (PermissionError(errno.EACCES, "Permission denied", "/x/r.json"), "Permission denied: '/x/r.json'"),
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/x/last.ckpt"), "'/x/last.ckpt' (no space is left"),
], ids=["permission", "full-disk"])
def test_an_os_error_names_its_file_and_a_programming_error_stays_a_traceback(monkeypatch, capsys, error, message):
    def fail(args):
        raise error

    monkeypatch.setattr("nola_vision.train.cli.run_lightning_cli", fail)
    code, err = run(capsys, "fit", "-c", TINY)
    assert code == 1 and message in err
    monkeypatch.setattr("nola_vision.train.cli.run_lightning_cli", lambda args: [][0])
    with pytest.raises(IndexError):
        main(["fit", "-c", TINY])


def test_a_result_file_whose_write_fails_after_the_pass_names_the_option_and_gives_the_metrics(tmp_path, capsys,
                                                                                                monkeypatch):
    # exit 2 (a configuration error) and a bare error naming the hidden temporary, the metrics only in the log
    from nola_vision.train import cli as train_cli

    write = train_cli.write_json_atomic

    def read_only(path, *args, **kwargs):
        if Path(path).name == "result.json":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(Path(path).parent / ".result.json.nv-x.tmp"))
        return write(path, *args, **kwargs)

    monkeypatch.setattr(train_cli, "write_json_atomic", read_only)
    code, err = run(capsys, "fit", "-c", TINY, *QUIET, "--trainer.default_root_dir", tmp_path / "run", "--result_file",
                    tmp_path / "result.json")
    assert code == 1 and f"--result_file {tmp_path / 'result.json'} could not be written (Read-only file system). " \
        "Training finished and was kept: adapter" in " ".join(err.split()) and '"test/acc":' in err
    checkpoint = next((tmp_path / "run").rglob("last.ckpt"))
    code, err = run(capsys, "test", "-c", TINY, *QUIET, "--trainer.default_root_dir", tmp_path / "tested",
                    "--ckpt_path", checkpoint, "--result_file", tmp_path / "result.json")
    assert code == 1 and "could not be written (Read-only file system); the test pass ran, its metrics: " \
        '{"test/acc":' in " ".join(err.split()) and ".nv-x.tmp" not in err


# ---- an output that cannot be written, refused before the run -----------------------------------------------------

@pytest.mark.parametrize("path, message", [
    (f"{LONG}.json", "is 305 bytes long, over the"),  # in an existing folder
    (f"new/{LONG}.json", "is 305 bytes long, over the"),  # in a folder not made yet
    (f"{LONG}/result.json", "is 300 bytes long, over the"),
    ("link.json", "is a symlink to"),  # into a folder that does not exist
], ids=["long-name", "long-name-in-a-new-folder", "long-folder-name", "symlink-into-a-missing-folder"])
def test_a_result_path_that_cannot_be_written_is_refused(tmp_path, monkeypatch, path, message):
    monkeypatch.chdir(tmp_path)
    os.symlink(tmp_path / "missing" / "result.json", "link.json")
    with pytest.raises(ValueError, match=message):
        check_result_path(path)
    check_result_path("new/deeper/result.json")  # a folder made at the end is fine


def test_fit_refuses_a_symlink_into_a_missing_folder_before_training(tmp_path, capsys):
    os.symlink(tmp_path / "missing" / "result.json", tmp_path / "link.json")
    code, err = run(capsys, "fit", "-c", TINY, *QUIET, "--trainer.default_root_dir", tmp_path,
                    "--result_file", tmp_path / "link.json")
    assert code == 2 and "whose folder does not exist" in err and not list(tmp_path.rglob("*.ckpt"))


def test_a_folder_the_process_may_not_write_is_refused_by_fit_and_protocol_before_the_run(tmp_path):
    if NO_CAPS and (shutil.which("setpriv") is None or subprocess.run([*NO_CAPS, "true"]).returncode != 0):
        pytest.skip("running as root, which may write anywhere, and setpriv cannot drop that")
    (tmp_path / "ro").mkdir(mode=0o555)
    script = f"""import sys
from nola_vision.runs.protocol import main
from nola_vision.train.cli import check_result_path
try:
    check_result_path("ro/result.json")
except ValueError as err:
    print(err)
sys.exit(main(["-c", {TINY!r}, "--out", "ro/out", "--split_seeds", "0", "--init_seeds", "0"]))
"""
    done = subprocess.run([*NO_CAPS, sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    refusals = done.stdout + done.stderr
    assert done.returncode == 2 and "Traceback" not in refusals, refusals[-3000:]
    assert f"--result_file ro/result.json: this process may not create files in {tmp_path / 'ro'}" in refusals
    assert f"--out ro/out: this process may not create files in {tmp_path / 'ro'}" in refusals


def test_fit_refuses_an_adapter_dir_in_a_folder_it_may_not_write_before_the_run(tmp_path):
    # exit 1 (a failed run) where protocol and tune skip only exit 2 (a refusal: every run would fail alike)
    if NO_CAPS and (shutil.which("setpriv") is None or subprocess.run([*NO_CAPS, "true"]).returncode != 0):
        pytest.skip("running as root, which may write anywhere, and setpriv cannot drop that")
    (tmp_path / "ro").mkdir(mode=0o555)
    done = subprocess.run([*NO_CAPS, sys.executable, "-m", "nola_vision.cli", "fit", "-c", TINY, *QUIET,
                           "--model.adapter_dir", "ro/adapter"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert (f"--model.adapter_dir {tmp_path / 'ro' / 'adapter'}: this process may not create files in "
            f"{tmp_path / 'ro'}") in done.stderr


def test_fit_refuses_a_log_folder_through_a_loop_of_symbolic_links_before_the_run(tmp_path, capsys):
    os.symlink("b", tmp_path / "a")
    os.symlink("a", tmp_path / "b")
    code, err = run(capsys, "fit", "-c", TINY, "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "1",
                    "--trainer.default_root_dir", tmp_path / "a")
    assert code == 2 and "cannot make the run's log folder" in err and "(a loop of symbolic links)" in err, err


def test_the_fit_lock_of_an_output_whose_name_is_near_the_limit_fits_the_limit(tmp_path):
    # ".<name>.fit-running" beside a 250-byte adapter_dir or result_file name was over 255 bytes: exit 1, naming the
    # lock file, though the output's own name is allowed
    from nola_vision.train.cli import _lock_run_output, _output_lock_path

    output = tmp_path / ("a" * 250)
    lock = _output_lock_path(output)
    assert len(os.fsencode(lock.name)) <= 255 and lock == _output_lock_path(output) and lock.parent == tmp_path
    assert _output_lock_path(tmp_path / "adapter").name == ".adapter.fit-running"  # as before where it fits
    fd = _lock_run_output(output)
    assert fd is not None and _lock_run_output(output) is None  # held: a second fit writing it is refused
    os.close(fd)


def test_protocol_refuses_a_table_that_is_a_directory_before_any_fit(tmp_path):
    (tmp_path / "results.csv").mkdir()
    with pytest.raises(ValueError, match="results.csv is an existing directory"):
        run_protocol([TINY], out=str(tmp_path), name="r", split_seeds=[0], init_seeds=[0],
                     python=fake_python(tmp_path), echo=False)
    assert not list(tmp_path.rglob("log.txt"))


def test_protocol_refuses_a_name_over_the_limit_as_an_error_line(tmp_path, capsys):
    code, err = run(capsys, "protocol", "-c", TINY, "--out", tmp_path, "--name", LONG, "--split_seeds", 0,
                    "--init_seeds", 0)
    assert code == 2 and "--name: the name nnnn" in err and "is 300 bytes long" in err


def test_protocol_reports_a_full_disk_as_an_error_line(tmp_path, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "results.md"))

    monkeypatch.setattr("nola_vision.runs.protocol.run_protocol", full)
    code, err = run(capsys, "protocol", "-c", TINY, "--out", tmp_path)
    assert code == 1 and f"No space left on device: '{tmp_path / 'results.md'}' (no space is left" in err


def test_tune_refuses_a_sqlite_storage_in_a_missing_folder_at_once(tmp_path, capsys):
    start = time.monotonic()
    code, err = run(capsys, "tune", "-c", TINY, "--grid", "model.lr=1e-3,5e-3", "--data.val_shots", 2,
                    "--skip_protocol", "--out", tmp_path, "--storage", f"sqlite:///{tmp_path}/missing/x.db")
    assert code == 2 and f"the folder {tmp_path / 'missing'} does not exist" in err
    assert time.monotonic() - start < 8  # not after optuna's retries


def test_tune_reports_a_storage_error_as_an_error_line(tmp_path, monkeypatch, capsys):
    from sqlalchemy.exc import OperationalError

    def locked(*args, **kwargs):
        raise OperationalError("INSERT INTO trials", {}, Exception("database is locked"))

    monkeypatch.setattr("nola_vision.runs.tune.run_tune", locked)
    code, err = run(capsys, "tune", "-c", TINY, "--grid", "model.lr=1e-3", "--out", tmp_path)
    assert code == 1 and "database is locked" in err


# ---- a killed protocol -------------------------------------------------------------------------------------------

def test_a_killed_protocols_fit_keeps_its_claim(tmp_path):
    started = tmp_path / "started"
    fit = tmp_path / "slow_fit"  # a fit that trains for a while
    fit.write_text(f"#!{sys.executable}\nimport os, time\nopen({str(started)!r}, 'w').write(str(os.getpid()))\n"
                   "time.sleep(120)\n")
    fit.chmod(0o755)
    driver = subprocess.Popen([sys.executable, "-c", "from nola_vision.runs.protocol import run_protocol\n"
                               f"run_protocol([{TINY!r}], out={str(tmp_path / 'out')!r}, name='row', split_seeds=[0], "
                               f"init_seeds=[0], python={str(fit)!r}, echo=False)"])
    try:
        deadline = time.monotonic() + 120
        while not started.exists() or not started.read_text():
            assert driver.poll() is None and time.monotonic() < deadline, "the fit never started"
            time.sleep(0.1)
        driver.send_signal(signal.SIGKILL)  # kill -9, the OOM killer: the fit goes on as an orphan
        driver.wait()
        run_dir = tmp_path / "out" / "row" / "split0-init0"
        assert claim_run(run_dir) is None  # a re-run sees the run as running, and skips it
    finally:
        driver.kill()
        if started.exists() and started.read_text():
            os.kill(int(started.read_text()), signal.SIGKILL)
    deadline = time.monotonic() + 30  # once the fit is gone, its claim is free
    while (claim := claim_run(run_dir)) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert claim is not None
    os.close(claim)


def test_a_checkpoint_is_staged_beside_its_final_name_and_a_failed_write_keeps_the_previous_one(tmp_path, capsys,
                                                                                                 monkeypatch):
    """Lightning stages a checkpoint in the system's temporary folder and moves it: with the run on another file
    system the move is a copy onto the final name, and a full disk or a kill during it cut last.ckpt short, over the
    previous one (whose resume then failed)."""
    assert run(capsys, "fit", "-c", TINY, *QUIET, "--trainer.default_root_dir", tmp_path, "--test_after_fit",
               "false")[0] == 0
    last = tmp_path / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    renamed, replace = [], os.replace

    def spied(source, destination, *args, **kwargs):
        renamed.append((Path(source), Path(destination)))
        return replace(source, destination, *args, **kwargs)

    monkeypatch.setattr(os, "replace", spied)
    assert run(capsys, "fit", "-c", TINY, *QUIET, "--trainer.default_root_dir", tmp_path, "--trainer.max_epochs", 2,
               "--ckpt_path", "last", "--test_after_fit", "false")[0] == 0
    assert any(final == last for _, final in renamed)
    assert all(staged.parent == final.parent for staged, final in renamed if final.suffix == ".ckpt")
    before = last.read_bytes()
    with file_size_limit(len(before) // 1024 - 4):  # the next checkpoint stops halfway
        code, err = run(capsys, "fit", "-c", TINY, *QUIET, "--trainer.default_root_dir", tmp_path,
                        "--trainer.max_epochs", 3, "--ckpt_path", "last", "--test_after_fit", "false")
    assert code == 1 and "File too large" in err and "Traceback" not in err
    assert last.read_bytes() == before and all(p.suffix == ".ckpt" for p in last.parent.iterdir())  # no temporary


def test_a_checkpoint_cut_short_is_refused_naming_the_newest_whole_one_beside_it(tmp_path, capsys):
    assert run(capsys, "fit", "-c", TINY, *QUIET, "--trainer.default_root_dir", tmp_path, "--test_after_fit",
               "false")[0] == 0
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # an earlier copy onto the final name, stopped halfway
    whole = next(last.parent.glob("epoch=*.ckpt"))
    code, err = run(capsys, "fit", "-c", TINY, *QUIET, "--trainer.default_root_dir", tmp_path, "--ckpt_path", "last",
                    "--trainer.max_epochs", 2)
    assert code == 2 and f"the newest whole one beside it: --ckpt_path {whole}" in " ".join(err.split())


def test_a_console_that_cannot_be_written_drops_its_output_and_the_command_goes_on(tmp_path, capsys):
    """stdout on a full disk (a job log over quota) failed the command after its work was done: fit exported its
    adapter but wrote no result, and predict wrote its CSV, then exited 1 advising to free disk space."""
    import io

    from nola_vision.cli import console_that_cannot_fail_the_run

    full = open("/dev/full", "w")  # every write (flush) fails with ENOSPC
    kept = sys.stdout
    try:
        sys.stdout = full
        with console_that_cannot_fail_the_run():
            for _ in range(2000):
                print("a progress line", flush=False)
            print("nola_vision: wrote the result", flush=True)
            sys.stdout.flush()
        assert sys.stdout is full
    finally:
        sys.stdout = kept
        full.close()  # its buffer now flushes to the null device: no error at exit either
    assert capsys.readouterr().err.count("the console output (stdout) cannot be written (No space left on device)") == 1
    out, err = open("/dev/full", "w"), open("/dev/full", "w")  # both on a full disk (a job's combined log)
    kept_err = sys.stderr
    try:
        sys.stdout, sys.stderr = out, err
        with console_that_cannot_fail_the_run():
            print("a progress line" * 1000, flush=True)
            print("a warning" * 1000, file=sys.stderr, flush=True)
    finally:
        sys.stdout, sys.stderr = kept, kept_err
        out.close()
        err.close()
    for errors in ("strict", "surrogateescape"):  # the C or POSIX locale's streams: "×" in the table note failed
        ascii_console = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors=errors)
        try:
            sys.stdout = ascii_console
            with console_that_cannot_fail_the_run():  # a run folder named with a letter the console cannot show
                print("nola_vision: wrote 900 predictions to runs/prédictions.csv (1.2× faster)")
            assert ascii_console.errors == errors  # as it was
        finally:
            sys.stdout = kept
        ascii_console.flush()
        assert b"runs/pr\\xe9dictions.csv (1.2\\xd7 faster)" in ascii_console.buffer.getvalue()


def test_fit_refuses_a_setting_its_config_yaml_cannot_hold_before_making_anything(tmp_path):
    # a Latin-1 folder name: the run trained, then `test -c <run>/config.yaml` failed on "invalid Unicode character
    # escape"; the checkpoint, opened by torch by its UTF-8 name, was "not a checkpoint written by fit"
    root = tmp_path / os.fsdecode(b"lat\xe9n")
    done = subprocess.run([sys.executable, "-m", "nola_vision.cli", "fit", "-c", TINY, *QUIET,
                           "--trainer.default_root_dir", str(root)], capture_output=True, text=True,
                          errors="backslashreplace")
    assert done.returncode == 2, done.stderr
    assert "--trainer.default_root_dir " in done.stderr
    assert "holds a byte this process cannot read as text" in done.stderr
    assert not root.exists()


def test_a_test_of_a_checkpoint_with_a_latin1_name_runs_and_writes_no_config_that_would_not_read_back(tmp_path, capsys):
    # its config.yaml held "\udce9", which `test -c <that folder>/config.yaml` refused: "invalid Unicode character"
    assert run(capsys, "fit", "-c", TINY, *QUIET, "--test_after_fit", "false", "--trainer.default_root_dir",
               tmp_path / "run")[0] == 0
    latin1 = tmp_path / os.fsdecode(b"lat\xe9n.ckpt")
    shutil.copy(tmp_path / "run" / "checkpoints" / "last.ckpt", latin1)
    # in a process of its own: pytest-xdist cannot send a captured "\udce9" back from its worker
    done = subprocess.run([sys.executable, "-m", "nola_vision.cli", "test", "-c", TINY,
                           "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir",
                           str(tmp_path / "test"), "--ckpt_path", str(latin1)], capture_output=True, text=True,
                          errors="backslashreplace")
    assert done.returncode == 0, done.stderr
    assert re.search(r"--ckpt_path .* holds a byte this process cannot read as text .*config\.yaml is not written",
                     done.stderr), done.stderr
    folder = tmp_path / "test" / "lightning_logs" / "version_0"
    assert (folder / "metrics.csv").is_file() and not (folder / "config.yaml").exists()


def test_a_checkpoint_whose_path_torch_cannot_open_by_name_is_read_through_a_file(tmp_path):
    import torch

    from nola_vision.train.checkpoint_io import load_checkpoint

    path = tmp_path / os.fsdecode(b"lat\xe9n.ckpt")
    with open(path, "wb") as file:  # as Lightning writes it: through Python, by the name's own bytes
        torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, file)
    with pytest.raises((RuntimeError, OSError, UnicodeError)):
        torch.load(str(path), weights_only=True, mmap=True)  # torch maps the file by its UTF-8 name: none such
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3 and torch.equal(loaded["state_dict"]["w"], torch.ones(2))
    torch.save({"epoch": 1}, tmp_path / "plain.ckpt")
    assert load_checkpoint(tmp_path / "plain.ckpt")["epoch"] == 1  # memory-mapped by its name


def test_a_result_file_a_running_fit_will_write_is_refused_by_test(tmp_path, capsys):
    # the test wrote it, then the fit's result replaced it at the fit's end, while the test said it wrote it
    from nola_vision.train.cli import _lock_run_output

    assert run(capsys, "fit", "-c", TINY, *QUIET, "--test_after_fit", "false", "--trainer.default_root_dir",
               tmp_path / "run")[0] == 0
    result = tmp_path / "result.json"
    held = _lock_run_output(result)  # as a fit with --result_file result.json holds it until its result is written
    try:
        code, err = run(capsys, "test", "-c", TINY, *QUIET, "--result_file", result, "--ckpt_path",
                        tmp_path / "run" / "checkpoints" / "last.ckpt")
    finally:
        os.close(held)
    assert code == 2 and f"a fit running now writes --result_file {result} at its end" in err, err
    assert not result.exists()
