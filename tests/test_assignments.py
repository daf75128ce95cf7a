"""tools/make_assignments.py: student notebooks run (only stubs raise), solutions pass every check,
output is deterministic and carries well-formed nbgrader metadata."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import make_assignments as ma  # noqa: E402

# Every chapter with exercises gets a student notebook; those with a self-check cell (an autograded
# exercise) are also run with the reference solutions (for the others that run is the chapter itself,
# which nbval executes).
CHAPTERS = sorted(p.stem for p in (ROOT / "book").glob("*.md") if "````{exercise}" in p.read_text())
CHECKED = [c for c in CHAPTERS if ":tags: [self-check]" in (ROOT / "book" / f"{c}.md").read_text()]


def _generate(tmp_path: Path, name: str, with_solutions: bool) -> Path:
    out = tmp_path / ("sol" if with_solutions else "stu")
    args = [str(ROOT / "book" / f"{c}.md") for c in CHAPTERS] + ["--out", str(out)]
    assert ma.main(args + (["--with-solutions"] if with_solutions else [])) == 0
    return out / f"{name}.ipynb"


def _execute(path: Path):
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=300, allow_errors=True,
                   resources={"metadata": {"path": str(ROOT / "book")}}).execute()
    return nb


def _errors(nb):
    return [(k, c) for k, c in enumerate(nb.cells) if c.cell_type == "code"
            and any(o.get("output_type") == "error" for o in c.get("outputs", []))]


def _book_raising_sources(name: str) -> set:
    """Sources of the chapter's own cells tagged raises-exception (demonstrations of errors)."""
    nb = ma.jupytext.read(ROOT / "book" / f"{name}.md")
    return {c.source for c in nb.cells if "raises-exception" in c.get("metadata", {}).get("tags", [])}


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


@pytest.mark.parametrize("name", CHAPTERS)
def test_student_notebook_raises_only_in_tagged_cells(tmp_path, name):
    nb = _execute(_generate(tmp_path, name, with_solutions=False))
    errors = _errors(nb)
    assert errors, "the stubs should raise somewhere"
    for k, cell in errors:
        assert "raises-exception" in cell.metadata.get("tags", []), (k, cell.source)
    # outside the chapter's own demonstrations of errors, only stubs and their checks raise
    exercise_errors = [c for _, c in errors if "nbgrader" in c.metadata]
    assert exercise_errors
    for cell in exercise_errors:
        text = "".join("".join(o.get("traceback", [])) + o.get("evalue", "") for o in cell.outputs)
        assert "NotImplementedError" in text or "not implemented yet" in text, cell.source
    assert not [c for _, c in errors if "nbgrader" not in c.metadata
                and c.source not in _book_raising_sources(name)]
    assert "### BEGIN SOLUTION" not in nbformat.writes(nb)
    assert "solution-start" not in nbformat.writes(nb)


@pytest.mark.parametrize("name", CHECKED)
def test_with_solutions_every_check_passes(tmp_path, name):
    nb = _execute(_generate(tmp_path, name, with_solutions=True))
    assert [c.source for _, c in _errors(nb) if c.source not in _book_raising_sources(name)] == []
    graded = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade")]
    assert graded, "at least one autograded check"
    for cell in graded:
        assert "strict=True" in cell.source
        assert _stdout(cell).startswith("✓ "), _stdout(cell)


def test_deterministic(tmp_path):
    for name in CHAPTERS:
        for sol in (False, True):
            a = _generate(tmp_path / "a", name, sol).read_bytes()
            b = _generate(tmp_path / "b", name, sol).read_bytes()
            assert a == b


def test_nbgrader_metadata(tmp_path):
    for name in CHAPTERS:
        nb = nbformat.read(_generate(tmp_path, name, with_solutions=False), as_version=4)
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


def test_statements_and_roles_are_plain_markdown(tmp_path):
    nb = nbformat.read(_generate(tmp_path, "sampling", with_solutions=False), as_version=4)
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
