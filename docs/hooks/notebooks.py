"""The three notebooks of ``notebooks/`` on the site, rendered by mkdocs-jupyter from their stored outputs.

They stay where they are (the tests execute them there); the build adds them as pages under ``notebooks/``
before mkdocs-jupyter looks for notebooks, hence the high priority.
"""
from __future__ import annotations

from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


@event_priority(100)
def on_files(files, config):
    for notebook in sorted(NOTEBOOKS.glob("*.ipynb")):
        files.append(File(f"notebooks/{notebook.name}", str(NOTEBOOKS.parent), config["site_dir"],
                          config["use_directory_urls"]))
    return files
