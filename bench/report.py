"""docs/BENCHMARKS.md and docs/BENCHMARKS.json hold one section per benchmark script: each script rewrites
its own section and leaves the others as they are."""

from __future__ import annotations

import json
from pathlib import Path

HEADER = ["# Benchmarks", "", "Each section is written by the script it names; rerun that script to refresh it.", ""]


def write_section(path: Path, owner: str, lines: list[str]) -> None:
    """Put ``lines`` between ``owner``'s markers in the Markdown file ``path``, replacing what was there."""
    begin, end = f"<!-- begin {owner} -->", f"<!-- end {owner} -->"
    text = path.read_text() if path.is_file() else "\n".join(HEADER)
    block = "\n".join([begin, *lines, end])
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def update_json(path: Path, results: dict) -> None:
    """Replace the top-level keys of ``results`` in the JSON file ``path``, keeping the others."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**data, **results}, indent=2) + "\n")
