"""tools/make_assignments.py: student notebooks run (only stubs raise), solutions pass every check,
output is deterministic and carries well-formed nbgrader metadata.

Where the notebooks are executed: the Colab rehearsal (`make colab`, a CI stage) runs every student notebook
and, for every chapter with a self-check, the solution notebook in place of the plain chapter, in the
Colab-like environment where students run them, with the rules of tools/colab_rehearsal.py
(``student_problems``, ``solution_problems``, ``coverage_problems``). Running them here as well would
execute each of those chapters twice more in CI, so the two execution tests below are skipped unless
``RELGRAD_RUN_ASSIGNMENTS=1`` (they then apply the same rules in the book's environment). Everything that
needs no kernel is checked here always.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import colab_rehearsal as rehearsal  # noqa: E402
import make_assignments as ma  # noqa: E402

# Every chapter with exercises gets a student notebook; those with a self-check cell (an autograded
# exercise) are also run with the reference solutions (for the others that run is the chapter itself,
# which nbval executes).
SOURCES = {p.stem: p.read_text() for p in sorted((ROOT / "book").glob("*.md"))}
CHAPTERS = sorted(n for n, text in SOURCES.items() if rehearsal.has_exercise(text))
CHECKED = [c for c in CHAPTERS if rehearsal.has_self_check(SOURCES[c])]

RUN = os.environ.get("RELGRAD_RUN_ASSIGNMENTS") == "1"
executes = pytest.mark.skipif(not RUN, reason="executed by the Colab rehearsal (make colab); "
                                              "RELGRAD_RUN_ASSIGNMENTS=1 runs it here too")


def _generate(out: Path, with_solutions: bool) -> Path:
    args = [str(ROOT / "book" / f"{c}.md") for c in CHAPTERS] + ["--out", str(out)]
    assert ma.main(args + (["--with-solutions"] if with_solutions else [])) == 0
    return out


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict:
    """Student ('stu') and solution ('sol') notebooks of every chapter with exercises, written once."""
    base = tmp_path_factory.mktemp("assignments")
    return {"stu": _generate(base / "stu", False), "sol": _generate(base / "sol", True)}


def _read(generated, kind: str, name: str):
    return nbformat.read(generated[kind] / f"{name}.ipynb", as_version=4)


def _execute(path: Path):
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=300, allow_errors=True,
                   resources={"metadata": {"path": str(ROOT / "book")}}).execute()
    return nb


def _book_raising_sources(name: str) -> set:
    """Sources of the chapter's own cells tagged raises-exception (demonstrations of errors)."""
    return rehearsal.raising_sources(ma.jupytext.read(ROOT / "book" / f"{name}.md"))


def test_every_chapter_with_exercises_has_notebooks(generated):
    assert CHAPTERS and CHECKED
    assert sorted(p.stem for p in generated["stu"].glob("*.ipynb")) == CHAPTERS
    assert sorted(p.stem for p in generated["sol"].glob("*.ipynb")) == CHAPTERS


@pytest.mark.parametrize("name", CHAPTERS)
def test_student_notebook_has_stubs_and_no_solutions(generated, name):
    """What the student rule checks without a kernel (the run itself: test_student_notebook_raises_only_in_tagged_cells)."""
    nb = _read(generated, "stu", name)
    stubs = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution")]
    assert stubs and all("raises-exception" in c.metadata.get("tags", []) for c in stubs)
    assert all("NotImplementedError" in c.source for c in stubs)
    assert "### BEGIN SOLUTION" not in nbformat.writes(nb)
    assert "solution-start" not in nbformat.writes(nb)


@pytest.mark.parametrize("name", CHECKED)
def test_solution_notebook_is_the_chapter_with_strict_checks(generated, name):
    """The Colab rehearsal runs this notebook in place of the chapter: it must hold every code cell of it."""
    sol = _read(generated, "sol", name)
    assert rehearsal.coverage_problems(nbformat.read(ROOT / "book" / f"{name}.ipynb", as_version=4), sol) == []
    graded = [c for c in sol.cells if c.metadata.get("nbgrader", {}).get("grade")]
    assert graded, "at least one autograded check"
    assert all("strict=True" in c.source for c in graded)


@executes
@pytest.mark.parametrize("name", CHAPTERS)
def test_student_notebook_raises_only_in_tagged_cells(generated, name):
    nb = _execute(generated["stu"] / f"{name}.ipynb")
    assert rehearsal.student_problems(nb, _book_raising_sources(name)) == []


@executes
@pytest.mark.parametrize("name", CHECKED)
def test_with_solutions_every_check_passes(generated, name):
    nb = _execute(generated["sol"] / f"{name}.ipynb")
    raising = _book_raising_sources(name)
    assert [c.source for _, c in rehearsal._error_cells(nb) if c.source not in raising] == []
    assert rehearsal.solution_problems(nb) == []


def test_deterministic(generated, tmp_path):
    for kind, sol in (("stu", False), ("sol", True)):
        again = _generate(tmp_path / kind, sol)
        for name in CHAPTERS:
            assert (again / f"{name}.ipynb").read_bytes() == (generated[kind] / f"{name}.ipynb").read_bytes(), name


def test_nbgrader_metadata(generated):
    for name in CHAPTERS:
        nb = _read(generated, "stu", name)
        nbformat.validate(nb)
        ids = [c.metadata["nbgrader"]["grade_id"] for c in nb.cells if "nbgrader" in c.metadata]
        assert len(ids) == len(set(ids)), "grade_id must be unique"
        for cell in nb.cells:
            meta = cell.metadata.get("nbgrader")
            if meta is None:
                continue
            assert meta["schema_version"] == 3
            assert set(meta) >= {"grade", "solution", "locked", "grade_id"}
            if meta["solution"]:
                assert cell.cell_type == "code" and meta == {"solution": True, "grade": False, "locked": False,
                                                             "grade_id": meta["grade_id"], "schema_version": 3}
                assert meta["grade_id"].endswith("-solution") and "NotImplementedError" in cell.source
            if meta["grade"]:
                assert meta["locked"] and not meta["solution"] and meta["points"] == 1
                assert meta["grade_id"].endswith("-check")
        labels = [label for label, _ in ma.exercises(ROOT / "book" / f"{name}.md")]
        assert [i[:-len("-solution")] for i in ids if i.endswith("-solution")] == labels


def test_statements_and_roles_are_plain_markdown(generated):
    nb = _read(generated, "stu", "sampling")
    statements = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id", "").endswith("-statement")]
    assert [c.source.split("\n")[0] for c in statements][-2:] == [
        "### Exercise: Newton's inverse from scratch", "### Exercise: A sampler that factorises once"]
    text = nbformat.writes(nb)
    assert "{exercise}" not in text and ":label:" not in text and "{doc}`" not in text and "{cite:" not in text
    assert ma.plain_markdown("see {doc}`biases`, {eq}`eq-x`, {ref}`ex-a`, {cite:p}`a2020, b2021` and "
                             "{cite:t}`c2019`") == "see *biases*, (`eq-x`), `ex-a`, [a2020, b2021] and c2019"


def test_stub_keeps_signature_and_docstring():
    src = 'x = 1\n### BEGIN SOLUTION\ndef f(a, b=2):\n    """Doc."""\n    return a\n\n\ny = f(1)\n### END SOLUTION\nprint(x)'
    out = ma.stub_source(src, "ex-a")
    assert out == ('x = 1\ndef f(a, b=2):\n    """Doc."""\n    raise NotImplementedError("Exercise ex-a: your code here")'
                   '\nprint(x)')
    assert ma.strict_check_source("from relgrad.checks import c\n\nassert check_x(f)") == \
        "from relgrad.checks import c\n\nassert check_x(f, strict=True)"


def test_help():
    with pytest.raises(SystemExit) as exc:
        ma.main(["--help"])
    assert exc.value.code == 0
