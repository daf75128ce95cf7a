#!/usr/bin/env python3
"""Write student notebooks (nbgrader-ready) from the chapters' exercises.

Usage: python tools/make_assignments.py [book/NAME.md ...] [--out _build/student] [--with-solutions]

For every chapter (default: every chapter source with an exercise) one notebook ``OUT/NAME.ipynb``:

* the prose of each solution (between ``{solution-start}`` and ``{solution-end}``) is removed;
* in each code cell with ``### BEGIN SOLUTION`` ... ``### END SOLUTION`` the inside is replaced by
  ``raise NotImplementedError("Exercise <label>: your code here")``; a function the solution defines keeps
  its ``def`` line and docstring with that body, so its name exists (cell tagged ``raises-exception``);
  solution code cells without markers are dropped;
* after each exercise a check cell: the chapter's ``self-check`` cell with the check called as
  ``assert check_...(fn, strict=True)`` (it raises ``AssertionError`` on failure, as nbgrader's autograder needs;
  in the student version it is tagged ``raises-exception``, since it fails until the exercise is done),
  or, for an exercise without automatic check, a read-only cell saying so;
* exercise statements become plain Markdown headings (``### Exercise: <title>``) and MyST roles in the prose
  (``{doc}``, ``{ref}``, ``{eq}``, ``{cite:p}``, ...) plain text, since Jupyter and Colab do not render MyST;
* nbgrader metadata (schema 3): solution cells ``<label>-solution``, check cells autograded tests
  ``<label>-check`` (1 point), exercise statements read-only ``<label>-statement``.

``--with-solutions`` keeps the reference solutions (markers included): the notebook is then an nbgrader
*source* notebook (``nbgrader generate_assignment`` removes the solutions itself) and a test that every
self-check passes.  Output is deterministic: the same sources give byte-identical files.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from notebooks import ROOT, chapter_sources, jupytext, nbformat, relative  # noqa: E402

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
SELF_CHECK_TAG = "self-check"
RAISES_TAG = "raises-exception"
DEFAULT_OUT = ROOT / "_build" / "student"

_OPEN = re.compile(r"^(?P<fence>`{3,}|:{3,})\{(?P<name>exercise|solution-start|solution-end)\}\s*(?P<arg>.*)$")
_LABEL = re.compile(r"^:label:\s*(\S+)")
_ROLE = re.compile(r"\{(?P<role>[a-z]+(?::[a-z]+)?)\}`(?P<text>[^`]*)`")
_OPTION = re.compile(r"^:[\w-]+:")
_CHECK_CALL = re.compile(r"^(?:assert\s+)?(?P<call>(?P<fn>check_\w+)\((?P<args>.*)\))\s*$")


def _nbgrader(**fields) -> Dict[str, object]:
    return {"nbgrader": dict(fields, schema_version=3)}


def solution_meta(label: str) -> Dict[str, object]:
    return _nbgrader(solution=True, grade=False, locked=False, grade_id=f"{label}-solution")


def test_meta(label: str) -> Dict[str, object]:
    return _nbgrader(grade=True, solution=False, locked=True, points=1, grade_id=f"{label}-check")


def readonly_meta(grade_id: str) -> Dict[str, object]:
    return _nbgrader(grade=False, solution=False, locked=True, grade_id=grade_id)


def _split_markers(source: str) -> Tuple[List[str], List[str], List[str]]:
    lines = source.split("\n")
    starts = [i for i, l in enumerate(lines) if l.strip() == BEGIN]
    ends = [i for i, l in enumerate(lines) if l.strip() == END]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ValueError("a solution cell needs exactly one BEGIN SOLUTION ... END SOLUTION pair")
    return lines[:starts[0]], lines[starts[0] + 1:ends[0]], lines[ends[0] + 1:]


def stub_source(source: str, label: str) -> str:
    """Replace the solution between the markers by a stub; keep top-level ``def`` lines and docstrings."""
    before, inside, after = _split_markers(source)
    indent = re.match(r"\s*", next((l for l in inside if l.strip()), "")).group(0)
    body = textwrap.dedent("\n".join(inside))
    raise_line = f'raise NotImplementedError("Exercise {label}: your code here")'
    body_lines = body.split("\n")
    stub: List[str] = []
    for node in ast.parse(body).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0]
            has_doc = isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) \
                and isinstance(first.value.value, str)
            keep_to = first.end_lineno if has_doc else first.lineno - 1
            start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
            header = body_lines[start:keep_to]
            inner = re.match(r"\s*", body_lines[first.lineno - 1]).group(0) or "    "
            if stub:
                stub += ["", ""]
            stub += header + [inner + raise_line]
    if not stub:
        stub = ["# your code here", raise_line]
    stub = [indent + l if l else l for l in stub]
    return "\n".join(before + stub + after)


def strict_check_source(source: str) -> str:
    """The book's self-check cell with each ``[assert] check_x(args)`` line turned into ``assert check_x(args, strict=True)``."""
    out = []
    for line in source.split("\n"):
        m = _CHECK_CALL.match(line)
        if m:
            line = f"assert {m.group('fn')}({m.group('args')}, strict=True)"
        out.append(line)
    return "\n".join(out)


def plain_markdown(text: str) -> str:
    """MyST roles as plain Markdown, for Jupyter and Colab, which do not render them.

    ``{doc}`x``` -> *x*, ``{ref}`x``` / ``{numref}`x``` -> `x`, ``{eq}`x``` -> (`x`),
    ``{cite:p}`a,b``` -> [a, b], ``{cite:t}`a``` -> a; other roles keep their text.
    """
    def role(m: "re.Match[str]") -> str:
        name, body = m.group("role"), m.group("text")
        if name == "doc":
            return f"*{body}*"
        if name in ("ref", "numref"):
            return f"`{body}`"
        if name == "eq":
            return f"(`{body}`)"
        if name.startswith("cite"):
            keys = ", ".join(k.strip() for k in body.split(","))
            return f"[{keys}]" if name != "cite:t" else keys
        return body
    return _ROLE.sub(role, text)


def exercise_markdown(block: List[str], label: str) -> List[str]:
    """An ``{exercise}`` directive (fences, title, options, body) as a plain Markdown heading and body."""
    title = _OPEN.match(block[0]).group("arg").strip()
    body = [l for l in block[1:-1] if not _OPTION.match(l)]
    while body and not body[0].strip():
        body.pop(0)
    return [f"### Exercise: {title}" if title else "### Exercise", "", f"*Exercise `{label}`*", ""] + body


def generic_check_source(label: str) -> str:
    return f'print("Exercise {label} has no automatic check: compare your answer with the solution in the book.")'


class _Builder:
    def __init__(self, with_solutions: bool):
        self.with_solutions = with_solutions
        self.cells: List = []
        self.label: Optional[str] = None       # the current exercise
        self.in_solution = False
        self.pending_check: Optional[str] = None  # label whose check cell is still to be written

    def markdown(self, text: str, meta: Optional[dict] = None) -> None:
        if text.strip():
            self.cells.append(nbformat.v4.new_markdown_cell(plain_markdown(text.strip("\n")), metadata=meta or {}))

    def check_cell(self, label: str, book_cell=None) -> None:
        if book_cell is not None:
            tags = [] if self.with_solutions else [RAISES_TAG]
            meta = dict(test_meta(label), tags=tags)
            self.cells.append(nbformat.v4.new_code_cell(strict_check_source(book_cell.source), metadata=meta))
        else:
            self.cells.append(nbformat.v4.new_code_cell(generic_check_source(label), metadata=readonly_meta(f"{label}-check")))

    def flush_check(self, next_cell=None) -> bool:
        """Write the pending check cell; return True when ``next_cell`` (a self-check cell) was used."""
        if self.pending_check is None:
            return False
        label, self.pending_check = self.pending_check, None
        uses = next_cell is not None and next_cell.cell_type == "code" and \
            SELF_CHECK_TAG in next_cell.get("metadata", {}).get("tags", [])
        self.check_cell(label, next_cell if uses else None)
        return uses

    def add_markdown(self, source: str, next_cell) -> bool:
        kept: List[str] = []
        lines = source.split("\n")
        i, statement = 0, None
        consumed_next = False
        while i < len(lines):
            m = _OPEN.match(lines[i])
            if not m:
                if not self.in_solution:
                    kept.append(lines[i])
                i += 1
                continue
            fence, name = m.group("fence"), m.group("name")
            j = i + 1
            while j < len(lines) and lines[j].strip() != fence:
                j += 1
            block = lines[i:j + 1]
            if name == "exercise":
                label = next((_LABEL.match(l).group(1) for l in block if _LABEL.match(l)), None)
                if label is None:
                    raise ValueError(f"exercise without :label: ({lines[i]})")
                self.markdown("\n".join(kept), readonly_meta(f"{statement}-statement") if statement else None)
                self.label = statement = label
                kept = exercise_markdown(block, label)
            elif name == "solution-start":
                self.in_solution = True
            else:  # solution-end: the check cell goes here
                self.in_solution = False
                self.pending_check = self.label
                self.markdown("\n".join(kept), readonly_meta(f"{statement}-statement") if statement else None)
                kept, statement = [], None
                rest_blank = all(not l.strip() for l in lines[j + 1:])
                consumed_next = self.flush_check(next_cell if rest_blank else None)
            i = j + 1
        self.markdown("\n".join(kept), readonly_meta(f"{statement}-statement") if statement else None)
        return consumed_next

    def add_code(self, cell) -> None:
        tags = list(cell.get("metadata", {}).get("tags", []))
        has_markers = BEGIN in cell.source and END in cell.source
        if self.in_solution and not has_markers:
            return  # solution code without markers: not shown to students
        if SELF_CHECK_TAG in tags:
            return  # a self-check cell not directly after its solution-end: already replaced
        if has_markers:
            label = self.label or "exercise"
            meta = dict(solution_meta(label))
            if self.with_solutions:
                source = cell.source
                if tags:
                    meta["tags"] = tags
            else:
                source = stub_source(cell.source, label)
                meta["tags"] = sorted(set(tags) | {RAISES_TAG})
            self.cells.append(nbformat.v4.new_code_cell(source, metadata=meta))
        else:
            self.cells.append(nbformat.v4.new_code_cell(cell.source, metadata={"tags": tags} if tags else {}))


def build(md: Path, with_solutions: bool = False):
    """The student (or, with solutions, nbgrader source) notebook of one chapter; None if it has no exercise."""
    nb = jupytext.read(md)
    builder = _Builder(with_solutions)
    skip_next = False
    for k, cell in enumerate(nb.cells):
        if skip_next:
            skip_next = False
            continue
        nxt = nb.cells[k + 1] if k + 1 < len(nb.cells) else None
        if cell.cell_type == "markdown":
            skip_next = builder.add_markdown(cell.source, nxt)
        elif cell.cell_type == "code":
            builder.add_code(cell)
    builder.flush_check()
    if not any("nbgrader" in c.metadata for c in builder.cells):
        return None
    out = nbformat.v4.new_notebook(cells=builder.cells)
    out.metadata = {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
                    "language_info": {"name": "python"}}
    for k, cell in enumerate(out.cells):
        cell["id"] = f"cell-{k:03d}"
    return out


def exercises(md: Path) -> List[Tuple[str, str]]:
    """(label, title) of each exercise of a chapter source, in order."""
    found, lines = [], md.read_text(encoding="utf-8").split("\n")
    for i, line in enumerate(lines):
        m = _OPEN.match(line)
        if m and m.group("name") == "exercise":
            label = next((_LABEL.match(l).group(1) for l in lines[i + 1:i + 6] if _LABEL.match(l)), "")
            found.append((label, m.group("arg").strip()))
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path, help="chapter sources (book/*.md); default: every chapter with exercises")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {relative(DEFAULT_OUT)})")
    parser.add_argument("--with-solutions", action="store_true",
                        help="keep the reference solutions (an nbgrader source notebook / solutions-substituted test)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for md in args.files or chapter_sources():
        nb = build(md.resolve(), args.with_solutions)
        if nb is None:
            continue
        target = args.out / (md.stem + ".ipynb")
        target.write_text(nbformat.writes(nb) + "\n", encoding="utf-8")
        print(f"wrote {relative(target.resolve())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
