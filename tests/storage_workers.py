"""Processes for the storage tests: writers and a reader sharing one adapter directory, and writers that die mid-save.

    python storage_workers.py write DIRECTORY SEED BITS SAVES GO_FILE   save one adapter SAVES times, then print counts
    python storage_workers.py die DIRECTORY SEED WHERE READY_FILE       start a save and stop inside it (see ``die``)
    python storage_workers.py hold DIRECTORY SEED READY_FILE GO_FILE    save, pausing before the swap (see ``hold``)
Each prints one JSON line; a writer touches ``writer<SEED>.ready`` beside GO_FILE when its model is built.
"""
import json
import resource
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
from tiny_models import as_if_trained, tiny_vit

import nola_vision as nv
from nola_vision.adapters.files import CONFIG_NAME, WEIGHTS_NAME
from nola_vision.core import storage

__all__ = ["CONFIG", "USER_FILE", "USER_TEXT", "trained"]

CONFIG = nv.NOLAConfig(rank=2, num_basis_a=16, num_basis_b=16, targets=["mlp.fc1", "attn.v"])
USER_FILE, USER_TEXT = "notes.txt", "mine"


def trained(seed: int) -> torch.nn.Module:
    return as_if_trained(nv.inject(tiny_vit(), CONFIG), seed, scale=0.1)


def wait_for(path: Path) -> None:
    while not path.exists():
        time.sleep(0.01)


def write(directory: str, seed: str, bits: str, saves: str, go: str) -> dict:
    model = trained(int(seed))
    Path(go).with_name(f"writer{seed}.ready").touch()
    wait_for(Path(go))
    failures = []
    for _ in range(int(saves)):
        try:
            nv.save_adapter(model, directory, bits=int(bits))
        except Exception:  # counted, not raised: the test reports every failure
            failures.append(traceback.format_exc(limit=3))
    return {"saves": int(saves), "failures": failures}


def die(directory: str, seed: str, where: str, ready: str) -> dict:
    """Save, and die inside the save: ``write`` SIGKILLed while writing the staged config, ``remove`` SIGKILLed
    while removing the replaced set after the swap, ``fsize`` by SIGXFSZ (file size limit) writing the weights."""
    model = trained(int(seed))
    if where == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it by default; a shell's ulimit does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))
    elif where == "write":
        write_text = Path.write_text

        def blocking_write_text(path, *args, **kwargs):
            if path.name == CONFIG_NAME and (path.parent / WEIGHTS_NAME).exists():
                Path(ready).touch()
                time.sleep(600)
            return write_text(path, *args, **kwargs)

        Path.write_text = blocking_write_text
    elif where == "remove":
        rmtree = shutil.rmtree

        def blocking_rmtree(path, *args, **kwargs):  # the first removal of a hidden sibling: the replaced set
            if Path(path).name.startswith(f".{Path(directory).name}."):
                Path(ready).touch()
                time.sleep(600)
            return rmtree(path, *args, **kwargs)

        shutil.rmtree = blocking_rmtree
    nv.save_adapter(model, directory)
    return {"saved": True}


def hold(directory: str, seed: str, ready: str, go: str) -> dict:
    """Save, pausing once the old set's entries are linked into the staged one (touching READY_FILE) until GO_FILE
    exists: what appears in the old directory meanwhile is in neither set."""
    model = trained(int(seed))
    fsync_entries = storage._fsync_entries

    def pausing(staged, names):
        Path(ready).touch()
        wait_for(Path(go))
        return fsync_entries(staged, names)

    storage._fsync_entries = pausing
    nv.save_adapter(model, directory)
    return {"saved": True}


if __name__ == "__main__":
    role, *arguments = sys.argv[1:]
    print(json.dumps({"write": write, "die": die, "hold": hold}[role](*arguments)), flush=True)
