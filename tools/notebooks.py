"""Shared logic of the authoring tools: which pages are notebooks, the setup cell, and how a pair is compared.

The MyST Markdown file ``book/NAME.md`` is the source of every chapter; ``book/NAME.ipynb`` is its twin for
Colab and nbval, committed without outputs.  ``tools/sync_notebooks.py`` writes twins and setup cells;
``tools/check_pairing.py`` fails when anything has drifted.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional, Tuple

import jupytext
import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
SETUP_TAG = "setup"

#: The setup cell every chapter starts with; {pip_target} comes from _config.yml (the one place naming the repo).
SETUP_TEMPLATE = '''\
# Setup: on Google Colab, install relgrad from the book's repository (Colab's own torch, numpy and
# matplotlib are kept: relgrad declares lower bounds only). Elsewhere nothing is installed.
import os, subprocess, sys
if "google.colab" in sys.modules:
    target = os.environ.get("RELGRAD_PIP_TARGET", "{pip_target}")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", target], check=True)
from relgrad.plotting import use_book_style
from relgrad.utils import print_environment
use_book_style()
print_environment()'''


def repository() -> Tuple[str, str]:
    """(url, branch) of the book's repository, read from ``_config.yml``."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    repo = config["repository"]
    return repo["url"].rstrip("/"), repo.get("branch", "main")


def pip_target() -> str:
    url, branch = repository()
    return f"relgrad @ git+{url}@{branch}"


def setup_source() -> str:
    return SETUP_TEMPLATE.format(pip_target=pip_target())


def is_notebook_source(md: Path) -> bool:
    """A Markdown page is a notebook when its front matter declares a jupytext pairing and a kernel."""
    head = md.read_text(encoding="utf-8")[:2000]
    return head.startswith("---") and "jupytext:" in head and "kernelspec:" in head


def chapter_sources(book: Path = BOOK) -> List[Path]:
    return sorted(p for p in book.glob("*.md") if is_notebook_source(p))


def twin_of(md: Path) -> Path:
    return md.with_suffix(".ipynb")


def cell_signature(cell) -> Tuple[str, str, Tuple[str, ...]]:
    """What must agree between the twins: cell type, source (trailing blank lines ignored) and tags."""
    tags = tuple(sorted(cell.get("metadata", {}).get("tags", [])))
    return cell["cell_type"], cell["source"].rstrip(), tags


def find_setup_cell(nb) -> Optional[int]:
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and SETUP_TAG in cell.get("metadata", {}).get("tags", []):
            return i
    return None


def strip_outputs(nb) -> None:
    """Remove outputs and execution data, and give cells stable ids so regenerating a twin is a no-op."""
    for k, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{k:03d}"
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.get("metadata", {}).pop("execution", None)


def relative(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


__all__ = [
    "ROOT", "BOOK", "SETUP_TAG", "repository", "pip_target", "setup_source", "chapter_sources", "twin_of",
    "cell_signature", "find_setup_cell", "strip_outputs", "relative", "jupytext", "nbformat", "re",
]
