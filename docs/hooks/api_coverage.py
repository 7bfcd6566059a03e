"""The API reference covers every public name: each name of ``nola_vision.__all__`` must be rendered on the page
of its floor (``::: nola_vision.<floor>.<module>.<name>``), listed in its floor's row of the index table and have a
docstring, or the build stops.

Names are found where they are defined (the public face re-exports them; ``FewShotClassifier`` and
``FewShotDataModule`` load lazily), and docstrings are read as mkdocstrings reads them (griffe, statically).
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Dict, List, Tuple

import griffe
from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parents[2]
FLOORS = ("core", "methods", "adapters", "serve", "models", "data", "train")
PAGES: Dict[str, str] = {**{floor: f"api/{floor}.md" for floor in FLOORS}, "version": "api/index.md"}
DIRECTIVE = re.compile(r"^::: ([\w.]+)\s*$", re.M)
INDEX_ROW = re.compile(r"^\| \[(\w+)\]\(\w+\.md\) \|[^|]*\|([^|]*)\|\s*$", re.M)


def public_paths() -> List[Tuple[str, str]]:
    """(public name, the dotted path where it is defined) for every name of ``nola_vision.__all__``."""
    package = importlib.import_module("nola_vision")
    static = griffe.load("nola_vision", search_paths=[str(ROOT)])
    paths = []
    for name in package.__all__:
        member = static.members.get(name)
        if member is not None and member.is_alias:
            paths.append((name, member.final_target.path))
        else:  # a lazily loaded name: where the running package finds it
            value = getattr(package, name)
            paths.append((name, f"{value.__module__}.{value.__qualname__}"))
    return paths


def problems(docs_dir: Path) -> List[str]:
    """What keeps the API reference from documenting every public name; empty when it is complete."""
    static = griffe.load("nola_vision", search_paths=[str(ROOT)])
    rendered = {page: set(DIRECTIVE.findall((docs_dir / page).read_text())) for page in set(PAGES.values())}
    listed = {floor: set(re.findall(r"`(\w+)`", names))
              for floor, names in INDEX_ROW.findall((docs_dir / "api/index.md").read_text())}
    found = []
    for name, path in public_paths():
        floor = path.split(".")[1]
        page = PAGES.get(floor)
        if page is None:
            found.append(f"nola_vision.{name} is defined in {path}, on no floor with an API page: add one to "
                         f"docs/hooks/api_coverage.py PAGES and mkdocs.yml")
            continue
        if not any(path == shown or path.startswith(shown + ".") for shown in rendered[page]):
            found.append(f"nola_vision.{name} is missing from docs/{page}: add `::: {path}`")
        if floor in FLOORS and name not in listed.get(floor, set()):
            found.append(f"nola_vision.{name} is missing from the {floor} row of docs/api/index.md's table")
        if not static[path.split(".", 1)[1]].docstring:
            found.append(f"nola_vision.{name} ({path}) has no docstring")
    return found


def on_pre_build(config):
    found = problems(Path(config["docs_dir"]))
    if found:
        raise PluginError("the API reference does not cover the public names:\n  " + "\n  ".join(found))
