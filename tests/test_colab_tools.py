"""The Colab tools: the rehearsal's package diff and cell-error rules, its stand-in kernel, and the link checker.

The full rehearsal (a fresh venv, a clone, every chapter) runs in CI as its own stage (`make colab`); these
tests cover its parts in a few seconds.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import check_colab_links as links  # noqa: E402
import colab_rehearsal as rehearsal  # noqa: E402

# ----------------------------------------------------------------------------------------- freeze and diff
BEFORE = """\
numpy==2.4.6
torch==2.13.0+cpu
scikit-learn==1.9.1
typing_extensions==4.16.0
pip==23.2.1
"""


def freeze(extra: str = "", drop: str = "", replace=None) -> dict:
    text = BEFORE if replace is None else BEFORE.replace(*replace)
    lines = [ln for ln in text.splitlines() if not (drop and ln.startswith(drop))]
    return rehearsal.parse_freeze("\n".join(lines) + "\n" + extra)


def test_parse_freeze_understands_pins_urls_and_editables() -> None:
    parsed = rehearsal.parse_freeze(
        "# a comment\n\nTyping_Extensions==4.16.0\nrelgrad @ git+file://localhost/tmp/r@abc\n"
        "-e git+https://example.org/x.git@deadbeef#egg=some_pkg\n")
    assert parsed == {"typing-extensions": "Typing_Extensions==4.16.0",
                      "relgrad": "relgrad @ git+file://localhost/tmp/r@abc",
                      "some-pkg": "-e git+https://example.org/x.git@deadbeef#egg=some_pkg"}


def test_only_relgrad_added_is_clean() -> None:
    diff = rehearsal.diff_freeze(freeze(), freeze("relgrad @ git+file://localhost/tmp/r@abc"))
    assert diff.ok, diff.problems
    assert diff.added == ["relgrad @ git+file://localhost/tmp/r@abc"] and not diff.changed and not diff.removed


def test_changed_removed_and_foreign_packages_fail() -> None:
    after = freeze("relgrad==0.1.0\nrequests==2.34.2", drop="scikit-learn", replace=("numpy==2.4.6", "numpy==2.3.5"))
    diff = rehearsal.diff_freeze(freeze(), after)
    assert not diff.ok
    assert diff.changed == [("numpy", "numpy==2.4.6", "numpy==2.3.5")]
    assert diff.removed == ["scikit-learn==1.9.1"]
    text = "\n".join(diff.problems)
    assert "numpy changed: numpy==2.4.6 -> numpy==2.3.5" in text
    assert "scikit-learn==1.9.1 was preinstalled and has been removed" in text
    assert "requests==2.34.2 was added" in text
    assert len(diff.problems) == 3


def test_missing_declared_dependency_is_a_note_not_a_failure() -> None:
    before = freeze(drop="numpy")
    diff = rehearsal.diff_freeze(before, freeze("relgrad==0.1.0"), dependencies=["numpy", "tqdm"])
    assert diff.ok, diff.problems
    assert any("numpy==2.4.6 was added" in n for n in diff.notes)


def test_relgrad_must_be_installed_by_the_chapters_and_not_before() -> None:
    never = rehearsal.diff_freeze(freeze(), freeze())
    assert not never.ok and "never installed" in never.problems[0]
    already = rehearsal.diff_freeze(freeze("relgrad==0.1.0"), freeze("relgrad==0.1.0"))
    assert not already.ok and "already installed" in already.problems[0]


def test_pins_come_from_requirements_and_must_be_exact() -> None:
    text = "# header\ntorch==2.13.0\nnumpy==2.4.6  # comment\nscikit_learn==1.9.1\ntqdm>=4\n"
    assert rehearsal.pinned_versions(text, ["torch", "scikit-learn"]) == ["torch==2.13.0", "scikit_learn==1.9.1"]
    with pytest.raises(ValueError, match="tqdm"):
        rehearsal.pinned_versions(text, ["tqdm"])
    pins = rehearsal.pinned_versions((ROOT / "requirements.txt").read_text(), rehearsal.PREINSTALLED)
    assert "torch==2.13.0" in pins and len(pins) == len(rehearsal.PREINSTALLED)


def test_runtime_environment_takes_colab_versions_and_drops_their_pins_from_the_constraints() -> None:
    runtime = "# Colab\ntorch==2.13.0\nnumpy==2.1.3\nmatplotlib==3.10.0\nscipy==1.16.3\nscikit-learn==1.6.1\n" \
              "ipykernel==6.17.1\ntqdm==4.67.3\n"
    requirements = "numpy==2.4.6\nScikit_Learn==1.9.1  # sklearn\ncontourpy==1.3.3\n# numpy==9 in a comment\n"
    pins, constraints = rehearsal.runtime_environment(runtime, requirements)
    assert pins == ["torch==2.13.0", "numpy==2.1.3", "matplotlib==3.10.0", "scikit-learn==1.6.1", "scipy==1.16.3",
                    "tqdm==4.67.3", "ipykernel==6.17.1"]
    assert constraints == "contourpy==1.3.3\n# numpy==9 in a comment\n"
    with pytest.raises(ValueError, match="ipykernel"):
        rehearsal.runtime_environment("torch==2.13.0\n", requirements)
    # the committed runtime file: Colab's numpy and matplotlib (googlecolab/backend-info), the local torch
    committed = rehearsal.runtime_environment((ROOT / rehearsal.RUNTIME_FILE).read_text(),
                                              (ROOT / "requirements.txt").read_text())[0]
    assert "numpy==2.1.3" in committed and "matplotlib==3.10.0" in committed and "torch==2.13.0" in committed


def test_dependency_names_skip_extras() -> None:
    reqs = ["numpy>=1.26", "tqdm>=4.60", 'torch>=2.2; extra == "torch"', 'pytest>=7; extra=="test"']
    assert rehearsal.dependency_names(reqs) == ["numpy", "tqdm"]


def test_toc_order() -> None:
    toc = {"root": "book/intro", "parts": [{"chapters": [{"file": "book/b"}, {"file": "book/a.md"}]}]}
    assert rehearsal.toc_order(toc, ["a", "z", "intro", "b"]) == ["intro", "b", "a", "z"]


# ------------------------------------------------------------------------------------- raises-exception
def executed(*cells) -> nbformat.NotebookNode:
    """A notebook of already-executed code cells: (tags, outputs, ran)."""
    nb = nbformat.v4.new_notebook()
    for tags, outputs, ran in cells:
        cell = nbformat.v4.new_code_cell("x = 1", metadata={"tags": tags})
        cell.outputs = [nbformat.from_dict(o) for o in outputs]
        cell.execution_count = 1 if ran else None
        nb.cells.append(cell)
    return nb


ERROR = {"output_type": "error", "ename": "ValueError", "evalue": "\x1b[31mboom\x1b[0m", "traceback": []}


def test_errors_are_allowed_only_in_tagged_cells_and_tagged_cells_must_raise() -> None:
    ok = executed(([], [], True), (["raises-exception"], [ERROR], True), ([], [], False))
    assert rehearsal.cell_problems(ok) == []
    bad = executed(([], [ERROR], True), (["raises-exception"], [], True))
    assert rehearsal.cell_problems(bad) == ["cell 0: ValueError: boom", "cell 1: tagged 'raises-exception' but raised nothing"]


def _run_in_rehearsal_kernel(tmp_path: Path, cells, extra_env, kernel_name: str = rehearsal.KERNEL_NAME):
    """Kernelspecs of the rehearsal for this Python, one notebook of ``cells`` run in a fresh folder:
    (result, executed notebook, the folder)."""
    stub = tmp_path / "stub"
    rehearsal.write_stand_ins(stub)
    kernels = rehearsal.write_kernelspec(tmp_path / "kernels", Path(sys.executable), stub, extra_env)
    nb = nbformat.v4.new_notebook()
    nb.cells = cells
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    venv = Path(sys.executable).parent.parent
    result = rehearsal.run_notebook(path, kernels, rehearsal.clean_env(venv, tmp_path), cwd, timeout=60,
                                    save_to=tmp_path / "out.ipynb", kernel_log=tmp_path / "kernel.log",
                                    kernel_name=kernel_name)
    return result, nbformat.read(tmp_path / "out.ipynb", as_version=4), cwd


def test_stand_in_kernel_takes_the_colab_branch(tmp_path: Path) -> None:
    """The stand-in launcher imports google.colab; the kernel runs in the given directory with the given env;
    a raises-exception cell is allowed to raise."""
    result, out, cwd = _run_in_rehearsal_kernel(tmp_path, [
        nbformat.v4.new_code_cell('import os, sys\nassert "google.colab" in sys.modules\n'
                                  'print(os.environ["RELGRAD_PIP_TARGET"], os.environ["TQDM_DISABLE"], os.getcwd())'),
        nbformat.v4.new_code_cell("1 / 0", metadata={"tags": ["raises-exception"]}),
        nbformat.v4.new_code_cell("open('left-behind.txt', 'w').close()"),
    ], {"RELGRAD_PIP_TARGET": "relgrad @ git+file://localhost/x@main"})
    assert result.ok, result.problems
    assert result.left_files == ["left-behind.txt"]
    assert out.cells[0].outputs[0]["text"].split() == ["relgrad", "@", "git+file://localhost/x@main", "1", str(cwd)]
    assert out.cells[1].outputs[0]["ename"] == "ZeroDivisionError"


def test_installed_kernel_of_the_student_pass_takes_the_local_branch(tmp_path: Path) -> None:
    """The student pass's kernel: same python, no stand-in google.colab, so the setup cell installs nothing."""
    result, out, _ = _run_in_rehearsal_kernel(tmp_path, [
        nbformat.v4.new_code_cell('import sys\nassert "google.colab" not in sys.modules\nprint(sys.executable)')],
        {}, kernel_name=rehearsal.INSTALLED_KERNEL_NAME)
    assert result.ok, result.problems
    assert Path(out.cells[0].outputs[0]["text"].strip()).resolve() == Path(sys.executable).resolve()


# ------------------------------------------------------------------------- student and solution notebooks
def code(source: str, tags=(), nbgrader=None, outputs=()) -> nbformat.NotebookNode:
    meta = {"tags": list(tags)} if tags else {}
    if nbgrader is not None:
        meta["nbgrader"] = nbgrader
    cell = nbformat.v4.new_code_cell(source, metadata=meta)
    cell.outputs = [nbformat.from_dict(o) for o in outputs]
    cell.execution_count = 1
    return cell


def notebook(*cells) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = list(cells)
    return nb


STUB_ERROR = {"output_type": "error", "ename": "NotImplementedError", "evalue": "Exercise ex-a: your code here",
              "traceback": ["\x1b[31mNotImplementedError\x1b[0m: Exercise ex-a: your code here"]}
CHECK_ERROR = {"output_type": "error", "ename": "AssertionError", "evalue": "f (exercise ex-a): not implemented yet",
               "traceback": []}
SOLUTION = {"solution": True, "grade": False, "locked": False, "grade_id": "ex-a-solution", "schema_version": 3}
GRADED = {"grade": True, "solution": False, "locked": True, "points": 1, "grade_id": "ex-a-check", "schema_version": 3}
RAISES = ["raises-exception"]


def test_student_rule_allows_only_stubs_and_the_chapters_own_demonstrations() -> None:
    demo = "1 / 0"
    good = notebook(code("x = 1"), code(demo, RAISES, outputs=[ERROR]),
                    code("f()", RAISES, SOLUTION, outputs=[STUB_ERROR]),
                    code("assert check_a(f, strict=True)", RAISES, GRADED, outputs=[CHECK_ERROR]))
    assert rehearsal.student_problems(good, {demo}) == []
    text = "\n".join(rehearsal.student_problems(good, set()))  # the demonstration is not the chapter's
    assert "cell 1 raised, and it is neither an exercise cell nor one of the chapter's" in text
    untagged = notebook(code("f()", (), SOLUTION, outputs=[STUB_ERROR]), code("y = 2", outputs=[ERROR]))
    text = "\n".join(rehearsal.student_problems(untagged, set()))
    assert "cell 0 raised but is not tagged raises-exception" in text and "cell 1 raised" in text
    wrong = notebook(code("f()", RAISES, SOLUTION, outputs=[ERROR]))
    assert "raised something other than the stub's NotImplementedError" in rehearsal.student_problems(wrong, set())[0]
    assert rehearsal.student_problems(notebook(code("x = 1")), set()) == ["no cell raised: the stubs should raise somewhere"]
    leaked = notebook(code("### BEGIN SOLUTION\nf()", RAISES, SOLUTION, outputs=[STUB_ERROR]))
    assert rehearsal.student_problems(leaked, set()) == ["the student notebook still contains '### BEGIN SOLUTION'"]


def test_solution_rule_needs_a_strict_check_that_prints_a_tick() -> None:
    tick = {"output_type": "stream", "name": "stdout", "text": "✓ f (exercise ex-a): right\n"}
    cross = {"output_type": "stream", "name": "stdout", "text": "✗ f (exercise ex-a): off by one\n"}
    assert rehearsal.solution_problems(notebook(code("assert check_a(f, strict=True)", (), GRADED, [tick]))) == []
    assert rehearsal.solution_problems(notebook(code("x = 1"))) == ["no autograded check cell"]
    bad = rehearsal.solution_problems(notebook(code("assert check_a(f)", (), GRADED, [cross])))
    assert "does not call its check with strict=True" in bad[0] and "did not print '✓ '" in bad[1] and "off by one" in bad[1]


def test_solution_notebook_must_hold_every_code_cell_of_the_chapter() -> None:
    chapter = notebook(code("setup()", ["setup"]), code("### BEGIN SOLUTION\nf = 1\n### END SOLUTION", ["x"]),
                       code("assert check_a(f)", ["self-check"]), code("1 / 0", RAISES))
    solution = notebook(code("setup()", ["setup"]), code("### BEGIN SOLUTION\nf = 1\n### END SOLUTION", ["x"], SOLUTION),
                        code("assert check_a(f, strict=True)", (), GRADED),
                        code('print("no automatic check")', (), {"grade": False}), code("1 / 0", RAISES))
    assert rehearsal.coverage_problems(chapter, solution) == []
    dropped = notebook(*solution.cells[:3])
    assert rehearsal.coverage_problems(chapter, dropped) == ["code cell 3 of the chapter is not in the solution notebook: 1 / 0"]
    retagged = notebook(*solution.cells[:4], code("1 / 0"))
    assert "has tags ['raises-exception'] in the chapter but [] in the solution notebook" in \
        rehearsal.coverage_problems(chapter, retagged)[0]
    extra = notebook(solution.cells[0], code("other = 2"), *solution.cells[1:])
    assert rehearsal.coverage_problems(chapter, extra) == [
        "the solution notebook has a code cell that is not in the chapter: other = 2"]
    assert rehearsal.has_exercise("````{exercise} Title\n:label: ex-a\n````") and not rehearsal.has_exercise("# x")
    assert rehearsal.has_self_check("```{code-cell} ipython3\n:tags: [self-check]\n")


def test_student_notebook_runs_with_errors_allowed(tmp_path: Path) -> None:
    """allow_errors=True: every cell runs and the caller judges the errors (result.nb)."""
    stub = tmp_path / "stub"
    rehearsal.write_stand_ins(stub)
    kernels = rehearsal.write_kernelspec(tmp_path / "kernels", Path(sys.executable), stub, {})
    path = tmp_path / "stu.ipynb"
    nbformat.write(notebook(code('raise NotImplementedError("Exercise ex-a: your code here")', RAISES, SOLUTION),
                            code("y = 2"), code("print(y)")), path)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    venv = Path(sys.executable).parent.parent
    res = rehearsal.run_notebook(path, kernels, rehearsal.clean_env(venv, tmp_path), cwd, timeout=60, allow_errors=True)
    assert res.ok and res.nb.cells[2].outputs[0]["text"] == "2\n"
    assert rehearsal.student_problems(res.nb, set()) == []


def test_prepared_venv_is_taken_once_and_only_when_it_matches(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    key = rehearsal.venv_key(sys.executable, "torch==2.13.0\n")
    assert rehearsal.take_prepared_venv(venv, key) == "no prepared venv"
    venv.mkdir()
    (venv / rehearsal.VENV_MARKER).write_text(__import__("json").dumps(key))
    assert "prepared for" in rehearsal.take_prepared_venv(venv, rehearsal.venv_key(sys.executable, "torch==2.12.0\n"))
    assert rehearsal.take_prepared_venv(venv, key) is None
    assert "used before" in rehearsal.take_prepared_venv(venv, key)


def test_rehearsal_help() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "colab_rehearsal.py"), "--help"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "--source" in proc.stdout and "google.colab" in proc.stdout
    assert "--no-assignments" in proc.stdout and "--prepare-venv" in proc.stdout


# ------------------------------------------------------------------------------------------ link checker
HEADER = "---\njupytext:\n  formats: ipynb,md:myst\nkernelspec:\n  name: python3\n---\n\n# {name}\n"
GOOD = "https://colab.research.google.com/github/octo/book/blob/main/book/{name}.ipynb"
BADGE = "https://colab.research.google.com/assets/colab-badge.svg"


def page(link: str = "") -> str:
    anchor = f'<a href="{link}" class="btn" title="Launch on Colab">Colab</a>' if link else ""
    return f"<html><body><a href='https://github.com/octo/book'>repo</a>{anchor}</body></html>"


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A repository with two paired chapters (intro, theory), one plain page (refs), and their built pages."""
    (tmp_path / "_config.yml").write_text("repository:\n  url: https://github.com/octo/book\n  branch: main\n")
    book, html = tmp_path / "book", tmp_path / "_build" / "html" / "book"
    book.mkdir()
    html.mkdir(parents=True)
    for name in ("intro", "theory"):
        (book / f"{name}.md").write_text(HEADER.format(name=name))
        (book / f"{name}.ipynb").write_text("{}")
        (html / f"{name}.html").write_text(page(GOOD.format(name=name)))
    (book / "refs.md").write_text("# References\n")
    (html / "refs.html").write_text(page())
    (html.parent / "_static").mkdir()
    (html.parent / "_static" / "x.html").write_text(page("https://colab.research.google.com/wrong"))
    (tmp_path / "README.md").write_text(
        f"[![Open in Colab]({BADGE})]({GOOD.format(name='intro')})\n\n"
        "Or go to `https://colab.research.google.com/github/octo/book/blob/main/book/<chapter>.ipynb`.\n")
    return tmp_path


def test_good_site_passes(site: Path) -> None:
    problems, warnings, counts = links.check(site)
    assert problems == [] and warnings == []
    assert counts == {"pages": 2, "links": 2, "chapters": 2, "readme": 1}
    assert links.main(["--root", str(site)]) == 0


def test_wrong_repository_branch_and_page_are_reported(site: Path) -> None:
    html = site / "_build" / "html" / "book"
    (html / "intro.html").write_text(page(GOOD.format(name="intro").replace("octo/book", "octo/other")))
    (html / "theory.html").write_text(page(GOOD.format(name="intro")))
    (html / "refs.html").write_text(page(GOOD.format(name="theory").replace("/main/", "/master/")))
    problems, _, _ = links.check(site)
    text = "\n".join(problems)
    assert "book/intro.html: Colab link https://colab.research.google.com/github/octo/other/" in text
    assert "book/theory.html: Colab link opens book/intro.ipynb, not this page's own twin book/theory.ipynb" in text
    assert "book/refs.html: Colab link" in text and "/master/" in text
    assert "has no Colab launch link" not in text  # a wrong link is reported once, as wrong
    assert len(problems) == 3
    assert links.main(["--root", str(site)]) == 1


def test_missing_twin_unbuilt_chapter_and_readme_are_reported(site: Path) -> None:
    (site / "book" / "theory.ipynb").unlink()
    (site / "_build" / "html" / "book" / "intro.html").write_text(page())
    (site / "book" / "extra.md").write_text(HEADER.format(name="extra"))
    (site / "README.md").write_text(f"[![b]({BADGE})]({GOOD.format(name='refs')}) "
                                    f"[x](https://colab.research.google.com/drive/123)\n")
    problems, _, _ = links.check(site)
    text = "\n".join(problems)
    assert "book/theory.html: links to book/theory.ipynb, which does not exist" in text
    assert "book/intro.html: chapter page has no Colab launch link to " + GOOD.format(name="intro") in text
    assert "book/extra.md is a paired chapter but book/extra.html was not built" in text
    assert "README.md: Colab link opens book/refs.ipynb, but book/refs.md is not a paired chapter" in text
    assert "README.md: Colab link https://colab.research.google.com/drive/123 is not of the form" in text


def test_config_branch_must_be_main_and_build_must_exist(site: Path) -> None:
    (site / "_config.yml").write_text("repository:\n  url: https://github.com/octo/book\n")
    problems, _, _ = links.check(site, build=site / "nowhere")
    assert any("repository.branch is 'master'" in p for p in problems)
    assert any("no built site; run `make book` first" in p for p in problems)


def test_uncommitted_twin_warns_or_fails(site: Path) -> None:
    git = ["git", "-C", str(site), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "book/intro.ipynb", "book/intro.md"], check=True)
    problems, warnings, _ = links.check(site)
    assert problems == []
    assert warnings == ["book/theory.html: book/theory.ipynb exists but is not committed: Colab would not find it on GitHub"]
    problems, warnings, _ = links.check(site, require_committed=True)
    assert len(problems) == 1 and "not committed" in problems[0] and warnings == []


def test_github_slug() -> None:
    assert links.github_slug("https://github.com/relgrad/relgrad") == ("relgrad", "relgrad")
    assert links.github_slug("https://github.com/a/b.git/") == ("a", "b")
    with pytest.raises(ValueError):
        links.github_slug("https://gitlab.com/a/b")
