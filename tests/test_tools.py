"""The authoring tools: the pairing check must catch drift and outputs, and sync must be idempotent."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import check_pairing  # noqa: E402
import notebooks  # noqa: E402
import sync_notebooks  # noqa: E402


@pytest.fixture
def chapter(tmp_path: Path) -> Path:
    """A synced copy of the intro chapter in a scratch folder."""
    md = tmp_path / "intro.md"
    shutil.copy(ROOT / "book" / "intro.md", md)
    sync_notebooks.sync(md)
    return md


def test_fresh_pair_is_clean_and_sync_is_idempotent(chapter: Path) -> None:
    assert check_pairing.problems_of(chapter) == []
    before = chapter.with_suffix(".ipynb").read_bytes()
    assert sync_notebooks.sync(chapter) is False
    assert chapter.with_suffix(".ipynb").read_bytes() == before


def test_edited_twin_is_reported_with_file_and_fix(chapter: Path) -> None:
    twin = chapter.with_suffix(".ipynb")
    nb = json.loads(twin.read_text())
    code = next(c for c in nb["cells"] if c["cell_type"] == "code" and "setup" not in c["metadata"].get("tags", []))
    code["source"].append("\nprint('edited in Jupyter')")
    twin.write_text(json.dumps(nb))
    problems = check_pairing.problems_of(chapter)
    assert len(problems) == 1
    assert "intro.ipynb" in problems[0] and "source differs" in problems[0]
    assert "make sync" in problems[0] and "sync_notebooks.py" in problems[0]


def test_outputs_in_twin_are_reported(chapter: Path) -> None:
    twin = chapter.with_suffix(".ipynb")
    nb = json.loads(twin.read_text())
    code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    code["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["hi\n"]}]
    code["execution_count"] = 1
    twin.write_text(json.dumps(nb))
    problems = check_pairing.problems_of(chapter)
    assert any("committed with outputs" in p for p in problems)


def test_stale_setup_cell_and_missing_twin_are_reported(chapter: Path) -> None:
    text = chapter.read_text().replace("print_environment()\n```", "print('old setup')\n```", 1)
    chapter.write_text(text)
    assert any("setup cell" in p for p in check_pairing.problems_of(chapter))
    chapter.with_suffix(".ipynb").unlink()
    assert any("missing twin" in p for p in check_pairing.problems_of(chapter))


def test_changed_tag_is_reported(chapter: Path) -> None:
    twin = chapter.with_suffix(".ipynb")
    nb = json.loads(twin.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"][-1]
    code["metadata"]["tags"] = ["raises-exception"]
    twin.write_text(json.dumps(nb))
    assert any("tags differ" in p for p in check_pairing.problems_of(chapter))


def test_setup_cell_installs_from_the_configured_repository() -> None:
    url, branch = notebooks.repository()
    assert branch == "main"
    assert f"git+{url}@main" in notebooks.setup_source()
    assert "google.colab" in notebooks.setup_source()


def test_repository_pairing_check_passes() -> None:
    """The committed book itself is in sync (the same command CI runs)."""
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "check_pairing.py")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
