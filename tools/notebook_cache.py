#!/usr/bin/env python3
"""Executed chapters, shared between the tests and the book build (so CI executes each chapter once there).

``make test`` executes every ``book/NAME.ipynb`` with nbval; ``make book`` executes every ``book/NAME.md``
again to render its outputs, in the same environment. Both are the same code cells (``make check`` keeps the
twins in sync), so the second execution only costs time. The pytest plugin in ``conftest.py`` (this module's
:class:`NbvalRecorder`) therefore stores each notebook that nbval ran from its first cell to its last without
a failure into the Jupyter Book execution cache (``_build/.jupyter_cache``, jupyter-cache's format), and the
book build, with ``execute_notebooks: cache``, renders those outputs instead of executing again. A chapter
that is not in the cache (not run by the tests, a cell failed, its code changed since) is executed by the
build as before, so ``make book`` alone still executes everything.

jupyter-cache matches a notebook by its code cells (source and metadata) and kernel only. What else decides
the outputs (relgrad's code, its committed results, the installed packages, the Python) is written next to
the cache as a *fingerprint*; ``python tools/notebook_cache.py check`` (run by ``make book`` first) empties
the cache when the fingerprint differs, so a page is never rendered from outputs of other code (and labels
it with the current fingerprint, so the chapters the build executes itself are reused by the next build).

Usage:
  python tools/notebook_cache.py check    # drop the cache when relgrad/, the packages or Python changed
  python tools/notebook_cache.py list     # what the cache holds
  python tools/notebook_cache.py fingerprint   # what the cache's outputs are valid for
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
#: Jupyter Book's cache folder (``execute.cache`` in _config.yml names the same path).
CACHE_DIR = ROOT / "_build" / ".jupyter_cache"
FINGERPRINT = "relgrad-fingerprint.json"
#: What a chapter's outputs depend on besides its own code cells: the package, and the book's sources (a page
#: may read other pages: the instructors' exercise table reads every chapter's exercises).
INPUTS = ("relgrad", "book", "requirements.txt", "pyproject.toml")
#: Environment variables that change what cells print (the Makefile and CI set them for tests and builds).
ENVIRONMENT = ("TQDM_DISABLE", "PYTHONHASHSEED")


def fingerprint() -> Dict[str, str]:
    """Hashes of everything besides the code cells that decides a chapter's outputs.

    Returns a dict: ``files`` (sha256 over the contents and paths of :data:`INPUTS`, bytecode excluded),
    ``packages`` (sha256 over the name and version of every distribution in the environment's site-packages),
    ``python`` and ``environment`` (the variables of :data:`ENVIRONMENT`) and ``python``.
    """
    files = hashlib.sha256()
    for top in INPUTS:
        path = ROOT / top
        for f in sorted([path] if path.is_file() else path.rglob("*")):
            if f.is_file() and not {"__pycache__", ".ipynb_checkpoints"} & set(f.parts) and f.suffix != ".pyc":
                files.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    # the environment's site-packages only: sys.path differs between processes (pytest puts the repository
    # root first, where an editable install leaves relgrad.egg-info), the installed packages do not
    site = sorted({sysconfig.get_paths()[key] for key in ("purelib", "platlib")})
    packages = sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions(path=site))
    return {
        "files": files.hexdigest(),
        "packages": hashlib.sha256("\n".join(packages).encode()).hexdigest(),
        "python": sys.version,
        "environment": {name: os.environ.get(name) for name in ENVIRONMENT},
    }


def check(cache_dir: Path = CACHE_DIR) -> bool:
    """Keep ``cache_dir`` only when its fingerprint equals the current one; otherwise empty it. Either way it
    then carries the current fingerprint, so what the build itself executes and caches next is labelled with
    the code it ran. Returns True when cached chapters were kept."""
    stamp = cache_dir / FINGERPRINT
    current = fingerprint()
    try:
        kept = json.loads(stamp.read_text()) == current
    except (OSError, ValueError):
        kept = False
    if kept:
        print(f"notebook cache: kept {len(_records(cache_dir))} chapter(s) executed with this code and environment")
    else:
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
            print(f"notebook cache: {cache_dir} was made with other code, packages or Python: removed")
        print("notebook cache: empty; the build executes every chapter")
        cache_dir.mkdir(parents=True)
        stamp.write_text(json.dumps(current, indent=1))
    return kept


def _records(cache_dir: Path) -> List[str]:
    from jupyter_cache import get_cache

    return [r.uri for r in get_cache(str(cache_dir)).list_cache_records()]


def store(notebook_path: Path, cells: Dict[int, list], seconds: float, cache_dir: Path = CACHE_DIR,
          current: Optional[Dict[str, str]] = None) -> None:
    """Put ``notebook_path`` with the outputs nbval recorded (code-cell index -> outputs) into the cache.

    Execution counts are numbered 1, 2, ... over the code cells, as a fresh kernel would; the fingerprint is
    (re)written, so the cache only ever holds outputs of the current code.
    """
    import nbformat
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    nb = nbformat.read(notebook_path, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    for count, (index, cell) in enumerate(zip(range(len(code)), code), start=1):
        cell.outputs = [nbformat.from_dict(dict(out)) for out in cells[index]]
        cell.execution_count = count
        for out in cell.outputs:
            if out.output_type == "execute_result":
                out.execution_count = count
    cache_dir.mkdir(parents=True, exist_ok=True)
    stamp = cache_dir / FINGERPRINT
    current = fingerprint() if current is None else current
    try:
        same = json.loads(stamp.read_text()) == current
    except (OSError, ValueError):   # no stamp: records of unknown code (e.g. an older build) are not kept
        same = not any(cache_dir.iterdir())
    if not same:
        shutil.rmtree(cache_dir)
        cache_dir.mkdir(parents=True)
    stamp.write_text(json.dumps(current, indent=1))
    # uri: the page the book builds from this notebook (the .md source; jupyter-cache matches by code cells)
    source = notebook_path.with_suffix(".md")
    uri = str(source if source.exists() else notebook_path)
    get_cache(str(cache_dir)).cache_notebook_bundle(
        CacheBundleIn(nb, uri, data={"execution_seconds": seconds, "executed_by": "nbval (make test)"}),
        check_validity=False, overwrite=True)


class NbvalRecorder:
    """pytest plugin: collect the outputs nbval reads for each cell; cache notebooks that ran clean.

    A notebook is stored only when every one of its code cells ran (none skipped, none deselected) and
    passed, in one session, with the CI's cache folder as target (``--notebook-cache DIR``, default
    ``_build/.jupyter_cache``; ``--notebook-cache ''`` turns it off).
    """

    def __init__(self, cache_dir: Optional[Path]) -> None:
        self.cache_dir = cache_dir
        # what the notebooks run with: taken before they run, compared again before anything is stored
        self.started_with = fingerprint() if cache_dir else None
        self.outputs: Dict[str, Dict[int, list]] = {}
        self.failed: set = set()
        self.started: Dict[str, float] = {}
        self.ended: Dict[str, float] = {}

    def record(self, item, report) -> None:
        """Hook body for ``pytest_runtest_logreport``-like data: one report of one nbval cell."""
        path = str(item.parent.fspath)
        self.started.setdefault(path, time.perf_counter())
        if report.when == "call" and report.passed and item.test_outputs is not None:
            self.outputs.setdefault(path, {})[item.cell_num] = list(item.test_outputs)
        elif report.failed or report.skipped:
            self.failed.add(path)
        self.ended[path] = time.perf_counter()

    def finish(self) -> List[str]:
        """Store every clean notebook; returns the stored paths."""
        if not self.cache_dir:
            return []
        if fingerprint() != self.started_with:
            print("notebook cache: relgrad/, the book, the packages or the environment changed during the tests: "
                  "nothing stored")
            return []
        import nbformat

        stored = []
        for path, cells in self.outputs.items():
            if path in self.failed:
                continue
            nb = nbformat.read(path, as_version=4)
            n_code = sum(cell.cell_type == "code" for cell in nb.cells)
            if sorted(cells) != list(range(n_code)):
                continue                       # some cells were deselected or never reported: not clean
            store(Path(path), cells, self.ended[path] - self.started[path], self.cache_dir, self.started_with)
            stored.append(path)
        return stored


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "check"
    if command == "check":
        check()
    elif command == "fingerprint":
        print(json.dumps(fingerprint(), indent=1))
    elif command == "list":
        print("\n".join(_records(CACHE_DIR)) if CACHE_DIR.exists() else "(no cache)")
    else:
        sys.exit(__doc__)
