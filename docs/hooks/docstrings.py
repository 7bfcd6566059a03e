"""Quote a docstring in a guide: ``<!-- docstring: nola_vision.core.layer.AdaptedLinear -->`` on a line of its own
becomes that object's docstring, read as mkdocstrings reads it (griffe, statically).

The API pages render each object once (one anchor per name); a guide that explains a contract quotes the
docstring that declares it, so the two never differ.
"""
from __future__ import annotations

import re
from pathlib import Path

import griffe
from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"^<!-- docstring: ([\w.]+) -->$", re.M)


def on_page_markdown(markdown, page, config, files):
    if not MARKER.search(markdown):
        return markdown
    package = griffe.load("nola_vision", search_paths=[str(ROOT)])

    def quote(match: re.Match) -> str:
        path = match.group(1)
        try:
            docstring = package[path.split(".", 1)[1]].docstring
        except (KeyError, IndexError) as error:
            raise PluginError(f"{page.file.src_uri}: no object {path} to quote the docstring of") from error
        if docstring is None:
            raise PluginError(f"{page.file.src_uri}: {path} has no docstring to quote")
        return docstring.value

    return MARKER.sub(quote, markdown)
