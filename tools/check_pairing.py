#!/usr/bin/env python3
"""Fail when a chapter's .md source and its .ipynb twin have drifted, or the twin carries outputs.

Timestamp-free: both files are read with jupytext and compared cell by cell (type, source, tags).
Also checks that every chapter has a current setup cell and that no .ipynb lacks its .md source.
Exit status 0 when everything is in sync; 1 with one line per problem otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from notebooks import (  # noqa: E402
    BOOK, cell_signature, chapter_sources, find_setup_cell, jupytext, nbformat, relative, setup_source, twin_of,
)

FIX = "run `make sync` (or `python tools/sync_notebooks.py {md}`) and commit both files"


def problems_of(md: Path) -> List[str]:
    twin = twin_of(md)
    fix = FIX.format(md=relative(md))
    if not twin.exists():
        return [f"{relative(twin)}: missing twin of {relative(md)}; {fix}"]
    source, paired = jupytext.read(md), nbformat.read(twin, as_version=4)
    found = []
    i = find_setup_cell(source)
    if i is None or source.cells[i].source != setup_source():
        found.append(f"{relative(md)}: setup cell missing or out of date; {fix}")
    with_outputs = [k for k, c in enumerate(paired.cells) if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count"))]
    if with_outputs:
        found.append(f"{relative(twin)}: committed with outputs in cell(s) {with_outputs}; {fix}")
    a = [cell_signature(c) for c in source.cells]
    b = [cell_signature(c) for c in paired.cells]
    if len(a) != len(b):
        found.append(f"{relative(twin)}: {len(b)} cells but {relative(md)} has {len(a)}; {fix}")
    else:
        for k, (x, y) in enumerate(zip(a, b)):
            if x != y:
                what = "type" if x[0] != y[0] else "tags" if x[1] == y[1] else "source"
                found.append(f"{relative(twin)}: cell {k} {what} differs from {relative(md)}; {fix}")
                break
    return found


def main() -> int:
    sources = chapter_sources()
    problems = [p for md in sources for p in problems_of(md)]
    known = {twin_of(md) for md in sources}
    for nb in sorted(BOOK.glob("*.ipynb")):
        if nb not in known:
            problems.append(f"{relative(nb)}: no paired source {relative(nb.with_suffix('.md'))} (the .md is the source of truth)")
    for line in problems:
        print("PAIRING:", line)
    print(f"pairing check: {len(sources)} chapter(s), {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
