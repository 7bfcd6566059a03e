"""Benchmark results on the site, read from ``benchmarks/results/`` when the site is built: no number is copied.

A page writes ``<!-- results: name -->`` on a line of its own; the build puts there what
``benchmarks/collect_results.py`` puts into ``RESULTS.md`` for that result (its note, the table exactly as the
script printed it, whose first line names date, machine and command, and its plot). ``targets`` and ``headline``
are the tables computed from the raw JSON. An unknown or unfinished result stops the build.
"""
from __future__ import annotations

import posixpath
import re
import sys
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
MARKER = re.compile(r"^<!-- results: (\w+) -->$", re.M)
PLOTS = "benchmarks/results"  # where the plots are published on the site

sys.path.insert(0, str(ROOT / "benchmarks"))
import collect_results  # noqa: E402  (a script folder, not a package)


def section(name: str) -> str:
    """The Markdown that stands for ``<!-- results: name -->``: as in RESULTS.md, without the heading."""
    if name == "targets":
        return f"{collect_results.quote(RESULTS, name)}\n\n{collect_results.timing_note(RESULTS)}"
    if name == "headline":
        return collect_results.quote(RESULTS, name)
    notes = {section_name: note for section_name, _, note in collect_results.SECTIONS}
    if name not in notes:
        raise ValueError(f"no benchmark result is called {name!r}; known: targets, headline, {', '.join(notes)}")
    if not (RESULTS / f"{name}.md").is_file():
        raise ValueError(f"{RESULTS / name}.md does not exist: run `bash benchmarks/run_all.sh "
                         f"{collect_results.PARTS.get(name, name)}`, or remove the marker")
    text = collect_results.printed_output(RESULTS, name)
    return f"{notes[name]}\n\n{text}" if notes[name] else text


def on_files(files, config):
    """Publish every plot under ``benchmarks/results/`` on the site."""
    for plot in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"{PLOTS}/{plot.name}", abs_src_path=str(plot)))
    return files


def on_page_markdown(markdown, page, config, files):
    def fill(match: re.Match) -> str:
        name = match.group(1)
        try:
            text = section(name)
        except ValueError as error:
            raise PluginError(f"{page.file.src_uri}: {error}") from error
        if (RESULTS / f"{name}.png").is_file():
            plot = posixpath.relpath(f"{PLOTS}/{name}.png", posixpath.dirname(page.file.src_uri) or ".")
            text += f"\n\n![{name} plot]({plot})"
        return text

    return MARKER.sub(fill, markdown)
