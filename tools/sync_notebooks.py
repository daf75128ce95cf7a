#!/usr/bin/env python3
"""Make every chapter's setup cell current and write its output-free .ipynb twin from the .md source.

Usage: python tools/sync_notebooks.py [book/NAME.md ...]   (default: every paired chapter)
The .md file is the source of truth; the .ipynb is regenerated from it (outputs never committed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from notebooks import (  # noqa: E402
    chapter_sources, find_setup_cell, jupytext, relative, setup_source, strip_outputs, twin_of,
)


def sync(md: Path) -> bool:
    """Update ``md``'s setup cell and rewrite its twin; return True if either file changed."""
    nb = jupytext.read(md)
    changed = False
    i = find_setup_cell(nb)
    if i is None:
        raise SystemExit(f"{relative(md)}: no code cell tagged 'setup' (every chapter starts with one)")
    if nb.cells[i].source != setup_source():
        nb.cells[i].source = setup_source()
        jupytext.write(nb, md, fmt="md:myst")
        changed = True
    strip_outputs(nb)
    twin = twin_of(md)
    old = twin.read_text(encoding="utf-8") if twin.exists() else None
    jupytext.write(nb, twin, fmt="ipynb")
    return changed or old != twin.read_text(encoding="utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path, help="chapter sources (book/*.md); default: all")
    args = parser.parse_args(argv)
    for md in args.files or chapter_sources():
        print(("updated   " if sync(md.resolve()) else "unchanged ") + relative(md.resolve()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
