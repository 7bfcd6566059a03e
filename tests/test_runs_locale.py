"""protocol and tune read and write their files as UTF-8 whatever the locale: a row made in one locale resumes in
another, and tune's own table stays its own."""
import os
import subprocess
import sys
from pathlib import Path

from fake_fit import fake_python
from test_data_names_and_links import _latin1_locale

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_offline.yaml")
FAST = ["--trainer.max_epochs", "1", "--data.shots", "2", "--data.val_shots", "1"]


def in_locale(env, code, *args):
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout.decode(errors="replace")


def test_a_config_with_accents_keys_its_row_alike_in_every_locale(tmp_path):
    # read in the locale's encoding and hashed as UTF-8: the same file gave another row key under Latin-1, and the
    # row's finished runs were refused as made with other settings
    config = tmp_path / "accents.yaml"
    config.write_text(Path(TINY).read_text() + "# réglage des chiffres\n", encoding="utf-8")
    code = ("import sys; from nola_vision.runs.results import config_key; "
            "print(config_key([sys.argv[1]], [])['config_hash'])")
    (tmp_path / "locales").mkdir()
    latin1 = {**os.environ, **_latin1_locale(tmp_path / "locales")}
    assert in_locale(latin1, code, str(config)) == in_locale(dict(os.environ), code, str(config))


def test_tune_in_a_latin1_locale_keeps_its_table_its_own(tmp_path):
    # its table was read in the locale's encoding and written back as UTF-8, each run garbling "réglage" once more,
    # and the next run refused the file as not tune's own
    (tmp_path / "locales").mkdir()
    env = {**os.environ, **_latin1_locale(tmp_path / "locales"), "PYTHONIOENCODING": "utf-8"}
    code = ("import sys; from nola_vision.runs.tune import run_tune\n"
            f"run_tune([{TINY!r}], {{'model.lr': [1e-3]}}, out=sys.argv[1], name='r\\xe9glage', python=sys.argv[2], "
            f"overrides={FAST!r}, skip_protocol=True, echo=False)")
    python = fake_python(tmp_path, acc="0.5", metric="val/acc")
    for _ in range(2):
        in_locale(env, code, str(tmp_path / "out"), python)
    folder = tmp_path / "out" / os.fsdecode(b"r\xe9glage")  # named in Latin-1 by that process
    table = (folder / "tune_results.md").read_text(encoding="utf-8")
    assert table.startswith("# Tuning: réglage") and table.count("Chosen (trial #") == 1
