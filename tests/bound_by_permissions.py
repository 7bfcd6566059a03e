"""Run Python code in a process that file permissions bind, as they bind every user but root.

The suite runs as root in CI, where a read-only folder refuses nothing: there the child drops the capabilities that
let root ignore permissions or give files away (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER,
CAP_CHOWN, CAP_FSETID) with util-linux's ``setpriv``.
"""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# another user's id for files a test hands over (nobody)
OTHER_USER = 65534


def run_bound(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter bound by file permissions; skip where that cannot be arranged."""
    command = [sys.executable, "-c", textwrap.dedent(code)]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("root ignores file permissions, and setpriv (util-linux) is missing to drop that")
        command = [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner,-chown,-fsetid", "--", *command]
    paths = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)})
    if done.returncode != 0 and "setpriv:" in done.stderr:
        pytest.skip(f"setpriv could not drop root's capabilities here: {done.stderr.strip()}")
    return done


def give_away(path: Path, user: int = OTHER_USER) -> None:
    """Make ``path`` (and what it holds) another ``user``'s; skip where this process may not."""
    try:
        for entry in [path, *path.rglob("*")]:
            os.lchown(entry, user, user)
    except PermissionError:
        pytest.skip("only root may hand files to another user")
