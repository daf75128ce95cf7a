#!/usr/bin/env python3
"""The book's other editions, built from the same sources and the same executed chapters as the website.

  pdf       ``make pdf``: the whole book as one PDF (Jupyter Book's LaTeX builder, xelatex underneath),
            solutions left out (they are on the website), into ``_build/latex/relgrad-book.pdf``; copied into
            the website as ``_build/html/relgrad-book.pdf`` when the website has been built (the intro links it).
  student   ``make book-student``: the website without the solutions (sphinx-exercise's ``hide_solutions``),
            for instructors who host their own copy, into ``_build/student-edition/_build/html``.
  archive   ``make archive``: ``relgrad-notebooks.zip`` (every chapter's ``.ipynb``, as Colab opens them) and
            ``relgrad-student-notebooks.zip`` (the student notebooks of tools/make_assignments.py), each with a
            README naming the commit, into ``_build/html`` (the intro and the instructors' page link them).

The editions differ from ``_config.yml`` only by the settings in :data:`EDITIONS`; the derived configuration is
written to ``_build/editions/NAME.yml`` and passed to ``jupyter-book build --config``, so there is still one
configuration to edit. Chapters come from Jupyter Book's execution cache when ``make test`` or ``make book``
executed them with this code (tools/notebook_cache.py); the others are executed.

Usage:
  python tools/editions.py pdf | student | archive
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Dict, List

import yaml

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "_build"
PDF_NAME = "relgrad-book.pdf"
ARCHIVES = {"chapters": "relgrad-notebooks.zip", "student": "relgrad-student-notebooks.zip"}

#: Settings of each edition on top of _config.yml (merged into its ``sphinx.config``).
EDITIONS: Dict[str, dict] = {
    # Solutions are removed from the PDF: they are dropdowns on the website, and inline they would follow each
    # exercise (LaTeX has no dropdown). Same for the student edition, which exists for that reason.
    "pdf": {"hide_solutions": True},
    "student": {"hide_solutions": True},
}


def derived_config(edition: str) -> Path:
    """Write _config.yml with the edition's settings to ``_build/editions/EDITION.yml``; return its path."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    derived = copy.deepcopy(config)
    derived.setdefault("sphinx", {}).setdefault("config", {}).update(EDITIONS[edition])
    # Jupyter Book resolves local extensions' folders relative to the configuration file: make them absolute
    for name, folder in (derived["sphinx"].get("local_extensions") or {}).items():
        derived["sphinx"]["local_extensions"][name] = str((ROOT / folder).resolve())
    out = BUILD / "editions" / f"{edition}.yml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# Derived from _config.yml by tools/editions.py ({edition} edition): do not edit.\n"
                   + yaml.safe_dump(derived, sort_keys=False, allow_unicode=True))
    return out


def jupyter_book(*args: str) -> None:
    exe = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(exe if exe.exists() else "jupyter-book"), "build", ".", "-W", "-n", "--keep-going", *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def build_pdf() -> Path:
    jupyter_book("--builder", "pdflatex", "--config", str(derived_config("pdf")))
    pdf = BUILD / "latex" / PDF_NAME
    if not pdf.is_file():
        raise SystemExit(f"the LaTeX build finished without {pdf}: see _build/latex/*.log")
    html = BUILD / "html"
    if html.is_dir():
        shutil.copy2(pdf, html / PDF_NAME)
        print(f"copied into the website: {html / PDF_NAME}")
    print(f"PDF: {pdf} ({pdf.stat().st_size / 1e6:.1f} MB)")
    return pdf


def build_student() -> Path:
    out = BUILD / "student-edition"
    jupyter_book("--config", str(derived_config("student")), "--path-output", str(out))
    index = out / "_build" / "html" / "index.html"
    for name in (PDF_NAME, *ARCHIVES.values()):      # the downloads the intro links, when built already
        if (BUILD / "html" / name).is_file():
            shutil.copy2(BUILD / "html" / name, index.parent / name)
    print(f"student edition: {index}")
    return index


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True, capture_output=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, text=True,
                               capture_output=True, check=True).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def write_zip(path: Path, files: List[Path], base: Path, readme: str) -> None:
    """A zip of ``files`` (names relative to ``base``, under one top folder) with a README.txt; fixed
    timestamps, so the same files give the same archive."""
    top = path.stem
    stamp = (2020, 1, 1, 0, 0, 0)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(zipfile.ZipInfo(f"{top}/README.txt", stamp), readme)
        for f in sorted(files):
            z.writestr(zipfile.ZipInfo(f"{top}/{f.relative_to(base)}", stamp), f.read_bytes(),
                       compress_type=zipfile.ZIP_DEFLATED)
    print(f"{path} ({len(files)} notebooks, {path.stat().st_size / 1e3:.0f} kB)")


def build_archive() -> List[Path]:
    sys.path.insert(0, str(ROOT / "tools"))
    from notebooks import chapter_sources, twin_of  # noqa: E402

    out = BUILD / "html"
    out.mkdir(parents=True, exist_ok=True)
    head = commit()
    chapters = [twin_of(md) for md in chapter_sources()]
    missing = [str(p) for p in chapters if not p.is_file()]
    if missing:
        raise SystemExit(f"missing chapter notebooks: {missing} (run `make sync`)")
    write_zip(out / ARCHIVES["chapters"], chapters, ROOT / "book", (
        "relgrad book: every chapter as a Jupyter notebook, without outputs.\n"
        f"Commit: {head}\n\n"
        "Run them with the environment of the repository's requirements.txt (Python 3.11), or open them in\n"
        "Google Colab, where the first cell installs relgrad. Each notebook runs on its own.\n"))
    student_dir = BUILD / "student"
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_assignments.py"), "--out", str(student_dir)],
                   cwd=ROOT, check=True)
    students = sorted(student_dir.glob("*.ipynb"))
    if not students:
        raise SystemExit(f"tools/make_assignments.py wrote no notebooks into {student_dir}")
    write_zip(out / ARCHIVES["student"], students, student_dir, (
        "relgrad book: student notebooks (solutions replaced by stubs, self-checks after each exercise).\n"
        f"Commit: {head}\n\n"
        "Generated by tools/make_assignments.py; see the book's page 'Course material' for grading with\n"
        "nbgrader.\n"))
    return [out / name for name in ARCHIVES.values()]


def main(argv: List[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("pdf", "student", "archive"):
        print(__doc__)
        return 2
    {"pdf": build_pdf, "student": build_student, "archive": build_archive}[argv[0]]()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.exit(main(sys.argv[1:]))
