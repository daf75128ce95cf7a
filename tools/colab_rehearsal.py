#!/usr/bin/env python3
"""Rehearse Google Colab offline: run every chapter the way a reader who presses the Colab button runs it.

What Colab does, and what this rehearsal does instead (nothing here needs the network):

  Colab                                            rehearsal
  -----------------------------------------------  -----------------------------------------------------------
  a Python with torch, numpy, matplotlib,          a fresh virtual environment holding only those packages,
  scikit-learn, scipy, tqdm, ipykernel             at Colab's versions (tools/colab-runtime.txt: its source,
  preinstalled, and no relgrad                     date, and what cannot be matched here: Python, torch),
                                                   their dependencies constrained by requirements.txt; no relgrad
  ``google.colab`` imported by the kernel at       a stand-in ``google.colab`` module and a stand-in
  start-up (``python -m colab_kernel_launcher``)   ``colab_kernel_launcher`` on the kernel's PYTHONPATH
  opens book/NAME.ipynb from GitHub, branch main   executes book/NAME.ipynb of a local clone of branch main
  the setup cell runs ``pip install relgrad @      the same cell, unchanged, with RELGRAD_PIP_TARGET set to
  git+https://github.com/OWNER/REPO@main``         ``relgrad @ git+file://CLONE@main``: the same pip code path
  working directory /content, without the repo     an empty temporary directory per chapter

Before the first chapter it records ``pip freeze`` of the environment; after the last it records it again and
fails when a preinstalled package changed version or disappeared (installing relgrad must leave Colab's own
torch and numpy alone), or when anything other than relgrad was added (a declared dependency of relgrad that
was missing is reported but allowed). A chapter fails on any cell error, except in cells tagged
``raises-exception``, which must raise.

Course material runs here too, where students run it (tools/make_assignments.py of the clone writes it):
a chapter with self-check cells runs as its *solution notebook*, which is the whole chapter (checked: every
code cell, in order, same tags) with each self-check made strict, and every autograded check must print
"✓" (the reference solutions pass); then every chapter with exercises runs as its *student notebook*, in
which only the stubs (and the chapter's own ``raises-exception`` cells) may raise (in a kernel of the same venv
without the stand-in ``google.colab``, so its setup cell uses relgrad as the chapters installed it instead
of installing it once more). ``--no-assignments``
runs the plain chapters only. (tests/test_assignments.py runs the same checks in the book's environment
when RELGRAD_RUN_ASSIGNMENTS=1.)

By default the rehearsal uses the committed state of the checkout (HEAD; on branch main that is exactly what
Colab opens), cloned into a repository whose branch is named main (``repository.branch`` of _config.yml), so
the setup cell's ``@main`` resolves as it will on GitHub. ``--ref`` picks another commit or branch.
``--source worktree`` rehearses the working tree instead (tracked files plus untracked files git does not
ignore, committed into the clone as a snapshot): for trying uncommitted chapters locally; CI uses the default.

Usage:
  python tools/colab_rehearsal.py                      # every chapter of main, committed state
  python tools/colab_rehearsal.py --source worktree    # include uncommitted changes (local testing)
  python tools/colab_rehearsal.py --chapters intro     # only some chapters
  python tools/colab_rehearsal.py --no-assignments     # plain chapters, no student/solution notebooks
  python3 tools/colab_rehearsal.py --prepare-venv --workdir W; python tools/colab_rehearsal.py --workdir W
                                                       # the venv made first (CI: while it installs the book's)
Exit status 0 when every chapter passed and the package check holds; 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]

#: What Colab preinstalls that the book needs (plus ipykernel, which runs the notebooks). Nothing else.
PREINSTALLED = ("torch", "numpy", "matplotlib", "scikit-learn", "scipy", "tqdm", "ipykernel")
#: Colab's versions of PREINSTALLED (relative to the repository root).
RUNTIME_FILE = "tools/colab-runtime.txt"
#: The only package the setup cells may add.
PACKAGE = "relgrad"
KERNEL_NAME = "colab-rehearsal"
RAISES_TAG = "raises-exception"
#: DESIGN §6: each chapter executes in at most 90 s (reported, not enforced: Colab machines differ).
CHAPTER_BUDGET_S = 90.0

#: Environment variables of the caller that must not reach the rehearsal (they would leak the caller's
#: environment into the kernel, or change what the setup cell installs).
SCRUBBED_ENV = (
    "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONEXECUTABLE", "PYTHONUSERBASE",
    "CONDA_PREFIX", "CONDA_DEFAULT_ENV", "JUPYTER_PATH", "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR",
    "IPYTHONDIR", "MPLBACKEND", "MPLCONFIGDIR", "PYTHONHASHSEED", "RELGRAD_PIP_TARGET", "PIP_USER", "PIP_TARGET", "PIP_PREFIX",
    "PIP_REQUIRE_VIRTUALENV", "PIP_NO_INDEX_OVERRIDE", "__PYVENV_LAUNCHER__",
)

COLAB_MODULE = '''\
"""Stand-in for Colab's ``google.colab``, written by tools/colab_rehearsal.py.

On Colab the kernel imports ``google.colab`` at start-up; the book's setup cells test
``"google.colab" in sys.modules`` to decide whether to install relgrad.
"""

REHEARSAL = True
'''

KERNEL_LAUNCHER = '''\
"""Stand-in for Colab's kernel launcher (``python3 -m colab_kernel_launcher -f CONNECTION_FILE``).

Like Colab's, it imports ``google.colab`` before starting the IPython kernel. Written by tools/colab_rehearsal.py.
"""

import os
import sys

if __name__ == "__main__":
    if sys.path and sys.path[0] in ("", os.getcwd()):
        del sys.path[0]  # as ipykernel_launcher: the kernel puts its working directory back itself
    import google.colab  # noqa: F401
    from ipykernel import kernelapp as app

    app.launch_new_instance()
'''


# --------------------------------------------------------------------------------------------------- pure logic
def normalize(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_freeze(text: str) -> Dict[str, str]:
    """``pip freeze --all`` output -> {normalised name: requirement line}.

    Understands ``name==version``, ``name @ url`` and ``-e url#egg=name``; skips comments and blank lines.
    """
    found: Dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-e "):
            m = re.search(r"[#&]egg=([A-Za-z0-9._-]+)", line)
            name = m.group(1) if m else line[3:].strip()
        else:
            m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)", line)
            if not m:
                continue
            name = m.group(1)
        found[normalize(name)] = line
    return found


def _version_of(line: str) -> str:
    """The version part of a freeze line ('torch==2.13.0' -> '2.13.0'), or the line itself for URLs."""
    m = re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*\s*===?\s*(\S+)$", line)
    return m.group(1) if m else line


@dataclass
class FreezeDiff:
    """How the environment changed while the chapters ran, and what of that is not allowed."""

    added: List[str] = field(default_factory=list)                 # freeze lines of new packages
    removed: List[str] = field(default_factory=list)               # freeze lines of vanished packages
    changed: List[Tuple[str, str, str]] = field(default_factory=list)  # (name, before, after)
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def diff_freeze(before: Mapping[str, str], after: Mapping[str, str], allowed: Iterable[str] = (PACKAGE,),
                dependencies: Iterable[str] = ()) -> FreezeDiff:
    """Compare two :func:`parse_freeze` results.

    A preinstalled package that changed version or was removed is a problem. An added package is a problem
    unless it is in ``allowed`` (relgrad) or is one of relgrad's declared ``dependencies`` (then it was
    missing from the preinstalled set: reported as a note).
    """
    allowed_n = {normalize(a) for a in allowed}
    deps_n = {normalize(d) for d in dependencies}
    out = FreezeDiff()
    for name in sorted(before):
        if name not in after:
            out.removed.append(before[name])
            out.problems.append(f"{before[name]} was preinstalled and has been removed")
        elif _version_of(before[name]) != _version_of(after[name]):
            out.changed.append((name, before[name], after[name]))
            out.problems.append(f"{name} changed: {before[name]} -> {after[name]} (Colab's own copy must be kept)")
    for name in sorted(set(after) - set(before)):
        out.added.append(after[name])
        if name in allowed_n:
            continue
        if name in deps_n:
            out.notes.append(f"{after[name]} was added: a declared dependency of {PACKAGE} missing from the "
                             "preinstalled set")
        else:
            out.problems.append(f"{after[name]} was added, but only {', '.join(sorted(allowed_n))} may be")
    for name in sorted(allowed_n):
        if name in before:
            out.problems.append(f"{before[name]} was already installed before the first chapter ran")
        elif name not in after:
            out.problems.append(f"{name} was never installed: the setup cells' pip install failed or did not run")
    return out


def pinned_versions(requirements: str, names: Sequence[str]) -> List[str]:
    """``name==version`` for each of ``names``, taken from requirements-format text; exact pins only."""
    pins: Dict[str, str] = {}
    for raw in requirements.splitlines():
        line = raw.split("#", 1)[0].strip()
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;]+)", line)
        if m:
            pins[normalize(m.group(1))] = f"{m.group(1)}=={m.group(2)}"
    missing = [n for n in names if normalize(n) not in pins]
    if missing:
        raise ValueError(f"no exact pin (name==version) for: {', '.join(missing)}")
    return [pins[normalize(n)] for n in names]


def runtime_environment(runtime: str, requirements: str) -> Tuple[List[str], str]:
    """(pins, constraints) of the rehearsal venv: Colab's versions of :data:`PREINSTALLED` from the runtime
    file's text, and requirements.txt's text without the lines of those packages, which constrains everything
    they pull in (so the venv is the same on every run) without contradicting Colab's versions."""
    pins = pinned_versions(runtime, PREINSTALLED)
    names = {normalize(n) for n in PREINSTALLED}
    kept = []
    for raw in requirements.splitlines():
        m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)", raw.split("#", 1)[0])
        if not (m and normalize(m.group(1)) in names):
            kept.append(raw)
    return pins, "\n".join(kept) + "\n"


def dependency_names(requires: Iterable[str]) -> List[str]:
    """Names of the unconditional requirements in ``importlib.metadata.requires()`` output (no extras)."""
    names = []
    for req in requires:
        if "extra ==" in req.replace("extra==", "extra =="):
            continue
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)", req.strip())
        if m:
            names.append(normalize(m.group(1)))
    return names


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def cell_problems(nb) -> List[str]:
    """Errors an executed notebook must not have: an error output in a cell not tagged ``raises-exception``,
    or a tagged cell that ran without raising. Cells that never ran (execution stopped earlier) are skipped."""
    problems = []
    for k, cell in enumerate(nb.cells):
        if cell.get("cell_type") != "code" or not cell.get("source", "").strip():
            continue
        tagged = RAISES_TAG in cell.get("metadata", {}).get("tags", [])
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        ran = cell.get("execution_count") is not None or bool(cell.get("outputs"))
        if errors and not tagged:
            e = errors[0]
            problems.append(f"cell {k}: {e.get('ename')}: {strip_ansi(str(e.get('evalue')))[:300]}")
        elif tagged and ran and not errors:
            problems.append(f"cell {k}: tagged '{RAISES_TAG}' but raised nothing")
    return problems


def toc_order(toc: Mapping, names: Iterable[str]) -> List[str]:
    """``names`` ordered as they appear in a _toc.yml mapping (book/NAME entries), the rest alphabetically."""
    seen: List[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            for key in ("root", "file"):
                value = node.get(key)
                if isinstance(value, str):
                    stem = Path(value).with_suffix("").name if value.endswith((".md", ".ipynb")) else Path(value).name
                    if stem not in seen:
                        seen.append(stem)
            for value in node.values():
                if isinstance(value, (list, dict)):
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(toc)
    wanted = set(names)
    return [n for n in seen if n in wanted] + sorted(wanted - set(seen))


# ------------------------------------------------------------------------- student and solution notebooks
# tools/make_assignments.py writes, for every chapter with an exercise, a *student* notebook (solutions
# replaced by stubs that raise NotImplementedError, a strict check after each exercise) and, with
# --with-solutions, the *solution* notebook: the chapter's code cells, every one of them, with each
# ``self-check`` cell turned into its strict version (``assert check_x(f, strict=True)``), plus read-only
# cells for exercises without a check. The rehearsal runs both where students run them. The rules:
#   student:  errors only in cells tagged raises-exception; the exercise cells (nbgrader metadata) raise
#             because of the stubs (NotImplementedError / "not implemented yet"); any other error is one of
#             the chapter's own raises-exception demonstrations; no solution text left in the notebook;
#   solution: the chapter's rules (cell_problems) and every autograded cell calls its check with
#             strict=True and prints "✓ ": the reference solutions pass every check.

def has_exercise(md_text: str) -> bool:
    """A chapter source with an ``{exercise}`` directive: make_assignments writes a student notebook for it."""
    return "````{exercise}" in md_text


def has_self_check(md_text: str) -> bool:
    """A chapter source with a ``self-check`` cell: its solution notebook has autograded cells."""
    return ":tags: [self-check]" in md_text


def _tags(cell) -> List[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def _error_cells(nb) -> List[Tuple[int, object]]:
    return [(k, c) for k, c in enumerate(nb.cells) if c.get("cell_type") == "code"
            and any(o.get("output_type") == "error" for o in c.get("outputs", []))]


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def _short(source: str) -> str:
    return source.strip().split("\n")[0][:80]


def raising_sources(chapter_nb) -> set:
    """Sources of the chapter's own code cells tagged ``raises-exception`` (demonstrations of errors)."""
    return {c.get("source", "") for c in chapter_nb.cells
            if c.get("cell_type") == "code" and RAISES_TAG in _tags(c)}


def student_problems(nb, book_raising: Iterable[str]) -> List[str]:
    """What is wrong with an executed student notebook (run with errors allowed); [] when nothing is."""
    import nbformat

    raising = set(book_raising)
    problems = []
    errors = _error_cells(nb)
    if not errors:
        problems.append("no cell raised: the stubs should raise somewhere")
    for k, cell in errors:
        if RAISES_TAG not in _tags(cell):
            problems.append(f"cell {k} raised but is not tagged {RAISES_TAG}: {_short(cell.source)}")
    exercise_errors = [(k, c) for k, c in errors if "nbgrader" in c.get("metadata", {})]
    if errors and not exercise_errors:
        problems.append("no exercise cell (nbgrader metadata) raised")
    for k, cell in exercise_errors:
        text = "".join("".join(o.get("traceback", [])) + o.get("evalue", "") for o in cell.get("outputs", []))
        if "NotImplementedError" not in text and "not implemented yet" not in text:
            problems.append(f"exercise cell {k} raised something other than the stub's NotImplementedError: "
                            f"{_short(cell.source)}")
    for k, cell in errors:
        if "nbgrader" not in cell.get("metadata", {}) and cell.source not in raising:
            problems.append(f"cell {k} raised, and it is neither an exercise cell nor one of the chapter's "
                            f"raises-exception cells: {_short(cell.source)}")
    text = nbformat.writes(nb)
    for leftover in ("### BEGIN SOLUTION", "solution-start"):
        if leftover in text:
            problems.append(f"the student notebook still contains {leftover!r}")
    return problems


def solution_problems(nb) -> List[str]:
    """What is wrong with an executed solution notebook beyond :func:`cell_problems`: every autograded cell
    calls its check with ``strict=True`` and printed ``✓ ``; there is at least one."""
    graded = [(k, c) for k, c in enumerate(nb.cells) if c.get("metadata", {}).get("nbgrader", {}).get("grade")]
    problems = [] if graded else ["no autograded check cell"]
    for k, cell in graded:
        if "strict=True" not in cell.source:
            problems.append(f"autograded cell {k} does not call its check with strict=True: {_short(cell.source)}")
        out = _stdout(cell)
        if not out.startswith("✓ "):
            problems.append(f"autograded cell {k} did not print '✓ ' (the reference solution fails its check): "
                            f"{out.strip()[:300] or 'no output'}")
    return problems


def _unstrict(source: str) -> str:
    """A strict check cell read back as the book's cell: ``assert check_x(a, strict=True)`` -> ``check_x(a)``."""
    lines = []
    for line in source.split("\n"):
        line = re.sub(r",\s*strict=True\)\s*$", ")", line)
        lines.append(line[len("assert "):] if line.startswith("assert check_") else line)
    return "\n".join(lines)


def coverage_problems(chapter_nb, solution_nb) -> List[str]:
    """The solution notebook must run the whole chapter: every code cell of the chapter, in order, with the
    same tags, verbatim or (a ``self-check`` cell) as its strict version; its other code cells are nbgrader
    cells. Then running it instead of the chapter loses nothing the chapter run checks."""
    problems: List[str] = []
    mine = [c for c in solution_nb.cells if c.get("cell_type") == "code"]
    pos = 0
    for k, cell in enumerate(c for c in chapter_nb.cells if c.get("cell_type") == "code"):
        want, strict = cell.get("source", ""), "self-check" in _tags(cell)
        while pos < len(mine):
            got = mine[pos]
            pos += 1
            same = got.source == want or (strict and _unstrict(got.source) == _unstrict(want))
            if same:
                if not strict and sorted(_tags(got)) != sorted(_tags(cell)):
                    problems.append(f"code cell {k} of the chapter has tags {_tags(cell)} in the chapter but "
                                    f"{_tags(got)} in the solution notebook")
                break
            if "nbgrader" not in got.get("metadata", {}):
                problems.append(f"the solution notebook has a code cell that is not in the chapter: {_short(got.source)}")
        else:
            problems.append(f"code cell {k} of the chapter is not in the solution notebook: {_short(want)}")
            break
    return problems


# --------------------------------------------------------------------------------------------- side effects
def log(msg: str = "") -> None:
    print(msg, flush=True)


def run(cmd: Sequence[str], *, env: Optional[Mapping[str, str]] = None, cwd: Optional[Path] = None,
        capture: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(map(str, cmd)), env=dict(env) if env is not None else None, cwd=cwd, text=True,
                          stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None)
    if proc.returncode != 0:
        detail = ((proc.stdout or "") + (proc.stderr or "")).strip()
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{detail[-3000:]}")
    return proc


def clean_env(venv: Path, work: Path) -> Dict[str, str]:
    """The caller's environment minus what would leak into the rehearsal, with the venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env["IPYTHONDIR"] = str(work / "ipython")          # no user IPython profile or startup files
    env["MPLCONFIGDIR"] = str(work / "matplotlib")     # no user matplotlibrc
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["TQDM_DISABLE"] = "1"
    return env


def git(repo: Path, *args: str) -> str:
    return run(["git", "-C", repo, *args], capture=True).stdout.strip()


def resolve_ref(repo: Path, ref: str) -> str:
    """The commit ``ref`` (a branch, tag, commit or HEAD) names in ``repo``."""
    proc = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
                          text=True, capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{repo}: cannot resolve {ref!r} to a commit")
    return proc.stdout.strip()


def make_clone(repo: Path, dest: Path, commit: str, branch: str, worktree: bool) -> str:
    """Clone ``repo`` into ``dest`` with branch ``branch`` at ``commit``; with ``worktree``, commit a snapshot
    of the working tree of ``repo`` on top. Returns the commit the clone's ``branch`` points at."""
    run(["git", "clone", "--quiet", "--no-checkout", repo, dest])
    run(["git", "-C", dest, "checkout", "--quiet", "-B", branch, commit])
    if worktree:
        for rel in git(dest, "ls-files", "-z").split("\0"):
            if rel:
                (dest / rel).unlink(missing_ok=True)
        listed = run(["git", "-C", repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                     capture=True).stdout.split("\0")
        for rel in listed:
            src = repo / rel
            if rel and src.is_file():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / rel)
        run(["git", "-C", dest, "add", "-A"])
        run(["git", "-C", dest, "-c", "user.name=colab-rehearsal", "-c", "user.email=rehearsal@localhost",
             "commit", "--quiet", "--allow-empty", "--no-verify", "-m", "colab rehearsal: working-tree snapshot"])
    return git(dest, "rev-parse", "HEAD")


def write_stand_ins(stub: Path) -> None:
    """``google.colab`` (``google`` stays a namespace package, as on Colab) and ``colab_kernel_launcher``."""
    (stub / "google" / "colab").mkdir(parents=True, exist_ok=True)
    (stub / "google" / "colab" / "__init__.py").write_text(COLAB_MODULE)
    (stub / "colab_kernel_launcher.py").write_text(KERNEL_LAUNCHER)


#: The kernel of the student pass: the same venv without the stand-in google.colab, so the setup cell does
#: not reinstall relgrad (the chapters' setup cells installed it from the same commit, and that install is
#: what the chapter pass rehearses); saves one pip install (~6 s) per student notebook.
INSTALLED_KERNEL_NAME = "colab-rehearsal-installed"


def write_kernelspec(kernels: Path, python: Path, stub: Path, extra_env: Mapping[str, str]) -> Path:
    """Kernelspecs for the venv: ``colab-rehearsal`` (``python -m colab_kernel_launcher`` with the stand-ins on
    PYTHONPATH: the setup cell takes its Colab branch) and ``colab-rehearsal-installed`` (plain
    ``ipykernel_launcher``: relgrad is used as installed). Returns the folder to give a KernelSpecManager as
    ``kernel_dirs``."""
    for name, argv, env in (
        (KERNEL_NAME, [str(python), "-m", "colab_kernel_launcher", "-f", "{connection_file}"],
         {"PYTHONPATH": str(stub), **extra_env}),
        (INSTALLED_KERNEL_NAME, [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
         {"TQDM_DISABLE": "1"}),
    ):
        spec_dir = kernels / name
        spec_dir.mkdir(parents=True, exist_ok=True)
        spec = {"argv": argv, "display_name": f"Python 3 ({name})", "language": "python", "env": env}
        (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
    return kernels


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def create_venv(base_python: str, venv: Path, pins: Sequence[str], constraints: Path, env: Mapping[str, str]) -> None:
    run([base_python, "-m", "venv", venv], env=env, capture=True)
    run([venv_python(venv), "-m", "pip", "install", "--quiet", "-c", constraints, *pins], env=env, capture=True)


#: Written into a venv made by ``--prepare-venv``; a later run in the same --workdir takes the venv only when
#: this matches (same base interpreter, same runtime file and requirements.txt) and deletes it first, so a venv
#: serves once.
VENV_MARKER = ".prepared-by-colab-rehearsal.json"


def venv_key(base_python: str, requirements: str) -> dict:
    import hashlib
    return {"base_python": os.path.realpath(base_python),
            "requirements_sha256": hashlib.sha256(requirements.encode()).hexdigest()}


def take_prepared_venv(venv: Path, key: Mapping[str, str]) -> Optional[str]:
    """Use a venv left by ``--prepare-venv`` when it was made for ``key``: returns None when it is taken (its
    marker removed), else why not (the caller then makes a fresh one)."""
    marker = venv / VENV_MARKER
    if not marker.is_file():
        return "no prepared venv" if not venv.exists() else "a venv without the marker of --prepare-venv (used before?)"
    try:
        found = json.loads(marker.read_text())
    except ValueError:
        return "unreadable marker"
    if found != dict(key):
        return f"prepared for {found}, not {dict(key)}"
    marker.unlink()
    return None


def pip_freeze(python: Path, env: Mapping[str, str]) -> str:
    return run([python, "-m", "pip", "freeze", "--all"], env=env, capture=True).stdout


PROBE = r'''
import importlib.metadata as md, json, sys
out = {}
try:
    dist = md.distribution("relgrad")
except md.PackageNotFoundError:
    out["installed"] = False
else:
    out["installed"] = True
    out["version"] = dist.version
    out["requires"] = dist.requires or []
    out["direct_url"] = json.loads(dist.read_text("direct_url.json") or "null")
    import relgrad
    out["file"] = relgrad.__file__
print(json.dumps(out))
'''


def probe_relgrad(python: Path, env: Mapping[str, str], cwd: Path) -> dict:
    """What the rehearsal environment knows about relgrad, asked from an empty directory."""
    return json.loads(run([python, "-c", PROBE], env=env, cwd=cwd, capture=True).stdout.strip().splitlines()[-1])


@dataclass
class ChapterResult:
    name: str
    seconds: float = 0.0
    problems: List[str] = field(default_factory=list)
    left_files: List[str] = field(default_factory=list)
    cells: int = 0
    kind: str = "chapter"              # chapter | solution (the chapter with strict checks) | student
    nb: object = field(default=None, repr=False)  # the executed notebook

    @property
    def ok(self) -> bool:
        return not self.problems


def run_notebook(path: Path, kernel_dirs: Path, env: Mapping[str, str], cwd: Path, timeout: int,
                 save_to: Optional[Path] = None, kernel_log: Optional[Path] = None,
                 kernel_name: str = KERNEL_NAME, allow_errors: bool = False) -> ChapterResult:
    """Execute one notebook in a fresh kernel from the rehearsal kernelspec, in ``cwd``; the kernel's own
    stdout/stderr (not the cells' outputs) go to ``kernel_log``. The kernel is shut down afterwards.

    By default execution stops at the first error in a cell not tagged ``raises-exception`` and the result
    carries :func:`cell_problems`; with ``allow_errors`` every cell runs and judging the errors is left to
    the caller (the executed notebook is ``result.nb``)."""
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    result = ChapterResult(name=path.stem)
    nb = nbformat.read(path, as_version=4)
    result.cells = sum(1 for c in nb.cells if c.cell_type == "code")
    km = AsyncKernelManager(kernel_name=kernel_name, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dirs)]))
    result.nb = nb
    client = NotebookClient(nb, km=km, timeout=timeout, allow_errors=allow_errors, record_timing=True,
                            resources={"metadata": {"path": str(cwd)}})
    launch = {"env": dict(env), "cwd": str(cwd), "cleanup_kc": True}  # cleanup_kc: shut the kernel down after
    t = time.perf_counter()
    try:
        if kernel_log is not None:
            kernel_log.parent.mkdir(parents=True, exist_ok=True)
            with open(kernel_log, "w") as fh:
                client.execute(stdout=fh, stderr=subprocess.STDOUT, **launch)
        else:
            client.execute(**launch)
    except CellExecutionError as exc:
        lines = [ln for ln in strip_ansi(str(exc)).splitlines() if ln.strip()]
        result.problems.append("cell error:\n" + textwrap.indent("\n".join(lines[-25:]), "      "))
    except Exception as exc:  # timeouts, a dead kernel, a kernel that never started
        result.problems.append(f"{type(exc).__name__}: {strip_ansi(str(exc))[-1500:]}")
    result.seconds = time.perf_counter() - t
    if not result.problems and not allow_errors:
        result.problems.extend(cell_problems(nb))
    result.left_files = sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*") if p.is_file())
    if save_to is not None:
        save_to.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, save_to)
    return result


def wrap_list(items: Sequence[str], indent: str = "    ") -> str:
    return textwrap.fill(", ".join(items), width=110, initial_indent=indent, subsequent_indent=indent,
                         break_on_hyphens=False, break_long_words=False)


def write_assignments(clone: Path, out: Path, names: Sequence[str]) -> Tuple[Dict[str, Path], Dict[str, Path], List[str]]:
    """The clone's tools/make_assignments.py writes the student and the solution notebooks of every chapter
    with an exercise into ``out/student`` and ``out/solution``. Returns ({name: solution notebook} for the
    chapters among ``names`` with a self-check, {name: student notebook} for those with an exercise, problems)."""
    tool = clone / "tools" / "make_assignments.py"
    for kind, extra in (("student", []), ("solution", ["--with-solutions"])):
        run([sys.executable, tool, "--out", out / kind, *extra], cwd=clone, capture=True)
    solutions: Dict[str, Path] = {}
    students: Dict[str, Path] = {}
    problems: List[str] = []
    for name in names:
        md = clone / "book" / f"{name}.md"
        text = md.read_text(encoding="utf-8") if md.is_file() else ""
        student, solution = out / "student" / f"{name}.ipynb", out / "solution" / f"{name}.ipynb"
        if has_exercise(text):
            if student.is_file():
                students[name] = student
            else:
                problems.append(f"book/{name}.md has an exercise but make_assignments wrote no student notebook")
        if has_self_check(text):
            if solution.is_file():
                solutions[name] = solution
            else:
                problems.append(f"book/{name}.md has a self-check but make_assignments wrote no solution notebook")
    return solutions, students, problems


# ------------------------------------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", type=Path, default=ROOT, help="repository to rehearse (default: the one holding this script)")
    p.add_argument("--source", choices=("committed", "worktree"), default="committed",
                   help="committed (default): the branch Colab opens, as committed; worktree: the working tree "
                        "of --repo, uncommitted and untracked-but-not-ignored files included (local testing)")
    p.add_argument("--ref", default="HEAD", help="commit or branch to rehearse (default: HEAD, the committed state of "
                                                 "the checkout); the clone always calls it main")
    p.add_argument("--chapters", nargs="+", metavar="NAME", help="only these chapters (book/NAME.ipynb)")
    p.add_argument("--workdir", type=Path, help="where to build the clone, venv and chapter folders "
                                                "(default: a temporary directory, removed afterwards)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (executed notebooks are in "
                                                       "WORKDIR/executed)")
    p.add_argument("--python", default=None, help="base interpreter for the rehearsal venv (default: the one "
                                                 "running this script, outside any venv)")
    p.add_argument("--pip-target", default=None,
                   help="value of RELGRAD_PIP_TARGET for the setup cells (default: 'relgrad @ git+file://localhost/CLONE@BRANCH'; "
                        "'{clone}' is replaced by the clone's path). For demonstrating failures.")
    p.add_argument("--no-assignments", dest="assignments", action="store_false",
                   help="run the chapters only; by default a chapter with self-checks runs as its solution notebook "
                        "(the whole chapter, checks strict) and every chapter with exercises also as its student "
                        "notebook (tools/make_assignments.py), as students run them")
    p.add_argument("--prepare-venv", action="store_true",
                   help="only create the rehearsal venv in --workdir (from the runtime file and requirements.txt of --ref, standard "
                        "library only: runs before any other environment exists) and exit; the next run with the "
                        "same --workdir uses it instead of creating one (CI overlaps it with its own install)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per cell (default: 300, as _config.yml)")
    p.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    return p.parse_args(argv)


def file_text(repo: Path, commit: str, source: str, path: str) -> str:
    """A file of the repository as rehearsed: the working tree's, or the commit's."""
    if source == "worktree":
        return (repo / path).read_text()
    return git(repo, "show", f"{commit}:{path}") + "\n"


def environment_files(repo: Path, commit: str, source: str) -> str:
    """The runtime file and requirements.txt, joined (what the prepared venv's key hashes)."""
    return file_text(repo, commit, source, RUNTIME_FILE) + file_text(repo, commit, source, "requirements.txt")


def prepare_venv(args: argparse.Namespace) -> int:
    """--prepare-venv: the venv of Colab's packages alone, marked for the next run in the same --workdir."""
    if args.workdir is None:
        log("--prepare-venv needs --workdir (the run that uses the venv names the same folder)")
        return 2
    t = time.perf_counter()
    repo, work = args.repo.resolve(), args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    venv = work / "venv"
    if venv.exists():
        shutil.rmtree(venv)
    commit = resolve_ref(repo, args.ref)
    pins, constraint_text = runtime_environment(file_text(repo, commit, args.source, RUNTIME_FILE),
                                                file_text(repo, commit, args.source, "requirements.txt"))
    constraints = work / "prepared-constraints.txt"
    constraints.write_text(constraint_text)
    base_python = args.python or getattr(sys, "_base_executable", None) or sys.executable
    log(f"--- prepare venv {venv} ({base_python}) with Colab's versions ({RUNTIME_FILE}): {' '.join(pins)}")
    create_venv(base_python, venv, pins, constraints, clean_env(venv, work))
    (venv / VENV_MARKER).write_text(json.dumps(venv_key(base_python, environment_files(repo, commit, args.source))))
    log(f"    ({time.perf_counter() - t:.1f} s)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.prepare_venv:
        return prepare_venv(args)
    import nbformat
    import yaml

    t_start = time.perf_counter()
    repo = args.repo.resolve()
    config = yaml.safe_load((repo / "_config.yml").read_text())
    branch = (config.get("repository") or {}).get("branch", "main")
    commit = resolve_ref(repo, args.ref)
    described = args.ref
    made_temp = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="colab-rehearsal-")) if made_temp else args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    clone, venv, stub = work / "repo", work / "venv", work / "colab-stub"
    assignments = work / "assignments"
    for path in (clone, stub, work / "kernels", work / "chapters", work / "executed", assignments):
        if path.exists():
            shutil.rmtree(path)
    failures: List[str] = []
    report: dict = {"repo": str(repo), "source": args.source, "ref": described, "workdir": str(work)}
    steps: List[Tuple[str, float]] = []
    results: List[ChapterResult] = []

    def step(name: str, t0: float) -> None:
        steps.append((name, time.perf_counter() - t0))
        log(f"    ({steps[-1][1]:.1f} s)")

    try:
        log(f"=== Colab rehearsal of {repo} ({args.source}: {described} = {commit[:12]})")
        log(f"    workdir {work}")
        if args.source == "committed":
            dirty = [ln for ln in git(repo, "status", "--porcelain").splitlines() if ln.strip()]
            if dirty:
                log(f"    note: {len(dirty)} uncommitted/untracked path(s) in {repo} are not rehearsed (Colab sees "
                    "the committed branch); --source worktree includes them")
        tip = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}"],
                             text=True, capture_output=True).stdout.strip()
        if tip and tip != commit:
            log(f"    note: rehearsing {commit[:12]}, not the tip of {branch} ({tip[:12]}): what Colab will see once "
                f"it is on {branch}")

        t = time.perf_counter()
        log(f"--- clone ({args.source}) into {clone}")
        head = make_clone(repo, clone, commit, branch, worktree=args.source == "worktree")
        log(f"    branch {branch} of the clone = {head[:12]}")
        step("clone", t)

        t = time.perf_counter()
        runtime, requirements = ((clone / name).read_text() for name in (RUNTIME_FILE, "requirements.txt"))
        pins, constraint_text = runtime_environment(runtime, requirements)
        report["runtime"] = {"file": RUNTIME_FILE, "pins": pins}
        base_python = args.python or getattr(sys, "_base_executable", None) or sys.executable
        env = clean_env(venv, work)
        log(f"--- venv ({base_python}) with what Colab preinstalls, at Colab's versions ({RUNTIME_FILE}): "
            f"{' '.join(pins)}")
        why_not = take_prepared_venv(venv, venv_key(base_python, environment_files(clone, "", "worktree")))
        if why_not is None:
            log("    made by --prepare-venv for this base interpreter, runtime file and requirements.txt, not used "
                "since: taken")
        else:
            if venv.exists():
                log(f"    not taking {venv}: {why_not}")
                shutil.rmtree(venv)
            constraints = work / "constraints.txt"
            constraints.write_text(constraint_text)
            create_venv(base_python, venv, pins, constraints, env)
        python = venv_python(venv)
        step("venv", t)

        empty = work / "probe"
        empty.mkdir(exist_ok=True)
        before_text = pip_freeze(python, env)
        (work / "freeze-before.txt").write_text(before_text)
        before = parse_freeze(before_text)
        report["before"] = sorted(before.values())
        log(f"--- packages before any chapter ({len(before)}, pip freeze --all):")
        log(wrap_list(sorted(before.values(), key=str.lower)))
        if probe_relgrad(python, env, empty)["installed"]:
            failures.append("relgrad is importable before the first setup cell ran")

        write_stand_ins(stub)
        # file://localhost/PATH, not file:///PATH: pip before 23.3 (Python 3.11's bundled pip is 23.2.1) rejects
        # an empty host in a 'name @ url' requirement; the https URL of the real setup cell parses with any pip.
        pip_target = (args.pip_target or f"{PACKAGE} @ git+file://localhost{{clone}}@{branch}").replace("{clone}", str(clone))
        kernel_env = {"RELGRAD_PIP_TARGET": pip_target, "TQDM_DISABLE": "1"}
        kernel_dirs = write_kernelspec(work / "kernels", python, stub, kernel_env)
        log(f"--- kernel: {python} -m colab_kernel_launcher (stand-in google.colab from {stub})")
        log(f"    RELGRAD_PIP_TARGET={pip_target}")

        available = {p.stem for p in (clone / "book").glob("*.ipynb")}
        toc = yaml.safe_load((clone / "_toc.yml").read_text()) if (clone / "_toc.yml").exists() else {}
        names = toc_order(toc, available)
        if args.chapters:
            unknown = sorted(set(args.chapters) - available)
            if unknown:
                failures.append(f"no book/NAME.ipynb in the rehearsed tree for: {', '.join(unknown)}")
            names = [n for n in names if n in set(args.chapters)]
        if not names:
            failures.append("no chapter notebooks (book/*.ipynb) to run")
        solutions: Dict[str, Path] = {}
        students: Dict[str, Path] = {}
        if args.assignments and names:
            t = time.perf_counter()
            log(f"--- student and solution notebooks ({clone / 'tools' / 'make_assignments.py'})")
            solutions, students, problems = write_assignments(clone, assignments, names)
            log(f"    {len(students)} student notebooks; {len(solutions)} chapters run as their solution notebook")
            for problem in problems:
                log(f"    PROBLEM: {problem}")
            failures.extend(problems)
            step("assign", t)

        def report_run(res: ChapterResult, label: str) -> None:
            results.append(res)
            flag = "PASS" if res.ok else "FAIL"
            slow = f"  (over the {CHAPTER_BUDGET_S:.0f} s budget of DESIGN §6)" \
                if res.seconds > CHAPTER_BUDGET_S and res.kind != "student" else ""
            log(f"    {flag}  {label:<34} {res.seconds:6.1f} s  {res.cells:3d} code cells{slow}")
            for problem in res.problems:
                log(f"          {problem}")
            if res.left_files:
                log(f"          wrote into its working directory: {', '.join(res.left_files[:8])}"
                    + (" ..." if len(res.left_files) > 8 else ""))

        log(f"--- chapters ({len(names)}), each in a fresh kernel and an empty working directory"
            + (f"; the {len(solutions)} with self-checks as their solution notebook (the whole chapter, every "
               "check strict: each must print '✓')" if solutions else "") + ":")
        for name in names:
            cwd = work / "chapters" / name
            cwd.mkdir(parents=True)
            chapter = clone / "book" / f"{name}.ipynb"
            solution = solutions.get(name)
            res = run_notebook(solution or chapter, kernel_dirs, env, cwd, args.timeout,
                               save_to=work / "executed" / f"{name}.ipynb",
                               kernel_log=work / "executed" / f"{name}.kernel.log")
            res.name = name
            if solution is not None:
                res.kind = "solution"
                covered = coverage_problems(nbformat.read(chapter, as_version=4), nbformat.read(solution, as_version=4))
                checks = solution_problems(res.nb) if res.ok else []
                res.problems = covered + res.problems + checks
            report_run(res, name + (" (solution notebook)" if solution is not None else ""))
        if students:
            log(f"--- student notebooks ({len(students)}): every cell runs; only the stubs (and the chapter's own "
                "raises-exception cells) may raise. Kernel without the stand-in google.colab: relgrad as the "
                "chapters' setup cells installed it (not once more per notebook)")
        # relgrad installed by the chapters (else, e.g. with --chapters limited, the Colab kernel installs it)
        student_kernel = INSTALLED_KERNEL_NAME if students and probe_relgrad(python, env, empty)["installed"] \
            else KERNEL_NAME
        for name, student in students.items():
            cwd = work / "chapters" / f"{name}.student"
            cwd.mkdir(parents=True)
            res = run_notebook(student, kernel_dirs, env, cwd, args.timeout, allow_errors=True,
                               kernel_name=student_kernel,
                               save_to=work / "executed" / f"{name}.student.ipynb",
                               kernel_log=work / "executed" / f"{name}.student.kernel.log")
            res.name, res.kind = name, "student"
            if res.ok:
                book_raising = raising_sources(nbformat.read(clone / "book" / f"{name}.ipynb", as_version=4))
                res.problems.extend(student_problems(res.nb, book_raising))
            report_run(res, f"{name} (student notebook)")
        failures.extend(f"{r.kind} notebook {r.name} failed" for r in results if not r.ok)
        report["chapters"] = [{"name": r.name, "kind": r.kind, "seconds": round(r.seconds, 2), "ok": r.ok,
                               "problems": r.problems, "left_files": r.left_files} for r in results]

        after_text = pip_freeze(python, env)
        (work / "freeze-after.txt").write_text(after_text)
        after = parse_freeze(after_text)
        info = probe_relgrad(python, env, empty)
        deps = dependency_names(info.get("requires", [])) if info.get("installed") else []
        diff = diff_freeze(before, after, allowed=(PACKAGE,), dependencies=deps)
        report["after"] = sorted(after.values())
        report["diff"] = {"added": diff.added, "removed": diff.removed, "changed": diff.changed,
                          "problems": diff.problems, "notes": diff.notes}
        log(f"--- packages after the chapters ({len(after)}): diff against before")
        for line in diff.added:
            log(f"    + {line}")
        for line in diff.removed:
            log(f"    - {line}")
        for name, old, new in diff.changed:
            log(f"    ~ {old}  ->  {new}")
        if not (diff.added or diff.removed or diff.changed):
            log("    (no change)")
        for note in diff.notes:
            log(f"    note: {note}")
        for problem in diff.problems:
            log(f"    PROBLEM: {problem}")
        failures.extend(f"packages: {p}" for p in diff.problems)

        if info.get("installed"):
            durl = info.get("direct_url") or {}
            vcs = durl.get("vcs_info", {})
            where = f"{durl.get('url')} @ {vcs.get('requested_revision')} (commit {str(vcs.get('commit_id'))[:12]})"
            log(f"--- relgrad {info['version']} installed by the setup cell from {where}")
            log(f"    imported from {info['file']}; declared dependencies: {', '.join(deps) or 'none'}")
            report["relgrad"] = info
            if not str(info.get("file", "")).startswith(str(venv)):
                failures.append(f"relgrad is imported from {info.get('file')}, not from the rehearsal venv")
            if args.pip_target is None and vcs.get("commit_id") != head:
                failures.append(f"relgrad was installed from commit {vcs.get('commit_id')}, not the clone's {head}")
        else:
            log("--- relgrad: not installed")
    except Exception as exc:  # a step of the rehearsal itself failed (clone, venv, install)
        failures.append(f"rehearsal aborted: {type(exc).__name__}: {exc}")
    finally:
        total = time.perf_counter() - t_start
        report["seconds"] = round(total, 1)
        report["failures"] = failures
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
        if made_temp and not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    log("=== summary")
    for name, secs in steps:
        log(f"    {name:<8} {secs:6.1f} s")
    for kind, label in (("chapter", "chapters"), ("solution", "solution"), ("student", "student")):
        runs = [r for r in results if r.kind == kind]
        if runs:
            log(f"    {label:<8} {sum(r.seconds for r in runs):6.1f} s  ({sum(r.ok for r in runs)}/{len(runs)} passed)")
    log(f"    total    {total:6.1f} s")
    for failure in failures:
        log(f"FAIL: {failure}")
    if made_temp and args.keep:
        log(f"kept {work}")
    log("Colab rehearsal: " + ("OK" if not failures else f"FAILED ({len(failures)} problem(s))"))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
