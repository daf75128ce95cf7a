"""pytest plugins for the whole repository (unit tests in tests/, chapters in book/ via nbval).

Chapters that nbval executes cleanly are handed to the book build through Jupyter Book's execution cache, so
``make test && make book`` executes each chapter once (tools/notebook_cache.py explains the why and the
safeguards). ``--notebook-cache ''`` turns this off.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "tools"))
import notebook_cache  # noqa: E402  (tools/ is not a package)


def pytest_addoption(parser):
    parser.addoption("--notebook-cache", default=str(notebook_cache.CACHE_DIR),
                     help="folder of Jupyter Book's execution cache to store notebooks nbval ran cleanly in "
                          "(default: %(default)s; '' for none)")


def pytest_configure(config):
    folder = config.getoption("--notebook-cache")
    try:
        import jupyter_cache  # noqa: F401  (Jupyter Book's; absent when only relgrad[test] is installed)
    except ImportError:
        folder = ""
    config._relgrad_notebooks = notebook_cache.NbvalRecorder(Path(folder) if folder else None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if hasattr(item, "test_outputs") and hasattr(item, "cell_num"):   # an nbval cell
        item.config._relgrad_notebooks.record(item, outcome.get_result())


def pytest_sessionfinish(session):
    stored = session.config._relgrad_notebooks.finish()
    if stored:
        print(f"\nnotebook cache: {len(stored)} chapter(s) executed cleanly, stored for the book build in "
              f"{session.config.getoption('--notebook-cache')}")
