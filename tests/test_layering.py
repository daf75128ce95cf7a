"""The package's import structure: every module imports on its own, the datasets layers point downwards only,
and no module reaches into another module's private names.

* Each module of relgrad is imported alone in a fresh interpreter (subprocesses, run in parallel): a
  circular import may only show when its module is the first one imported, which a single process
  importing everything in turn would hide.  A module that its package's ``__init__`` already loads shares
  that package's subprocess, which is the same import (see :func:`_fresh_imports`).
* ``relgrad.datasets`` is layered (DESIGN §8, "Layering after the split"): the base imports no other
  datasets module; toys, images, transforms and metrics import only the base; the loader may import
  them; nothing imports the package ``__init__`` from inside.  Read from the source with ``ast``.
* No ``from .x import _y`` (nor ``from . import x`` followed by ``x._y``) across relgrad modules: a
  name used by another module is public in its own.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, FrozenSet, Iterator, List, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "relgrad"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


FILES: Dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "results" not in p.parts}
MODULES = sorted(FILES)


# ============================================================================================ imports
@dataclass
class Imported:
    """The outcome of ``python -c "import <module>"`` in a fresh interpreter."""

    returncode: int
    stderr: str
    loaded: FrozenSet[str]  # the relgrad modules in sys.modules afterwards (empty when the import failed)
    via: Optional[str] = None  # the package whose own fresh import this outcome is (see _fresh_imports)


_REPORT = "import sys; print(*sorted(m for m in sys.modules if m == 'relgrad' or m.startswith('relgrad.')))"


def _import_alone(module: str) -> Imported:
    done = subprocess.run([sys.executable, "-c", f"import {module}; {_REPORT}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    loaded = frozenset(done.stdout.split()) if done.returncode == 0 else frozenset()
    return Imported(done.returncode, done.stderr, loaded)


_RESULTS: Dict[str, Imported] = {}


def _fresh_imports() -> Dict[str, Imported]:
    """The fresh-interpreter import of every module, computed once, in parallel, wave by wave (by depth).

    ``import pkg.mod`` first runs ``pkg/__init__.py`` to the end, then loads ``pkg.mod`` unless that already
    loaded it.  So when the fresh import of ``pkg`` has loaded ``pkg.mod``, ``import pkg.mod`` in a fresh
    interpreter would do exactly the same thing, in the same order; its outcome is taken from ``pkg``'s
    (``via``) instead of paying for another interpreter (torch alone takes seconds to import).  Every other
    module gets its own subprocess.
    """
    if not _RESULTS:
        # The threads only wait on subprocesses; one more than the cores, since importing is partly I/O.
        with ThreadPoolExecutor(max_workers=(os.cpu_count() or 2) + 1) as pool:
            for depth in range(max(m.count(".") for m in MODULES) + 1):
                wave = [m for m in MODULES if m.count(".") == depth]
                parents = {m: _RESULTS.get(m.rpartition(".")[0]) for m in wave}
                own = [m for m in wave if parents[m] is None or m not in parents[m].loaded]
                for module, result in zip(own, pool.map(_import_alone, own)):
                    _RESULTS[module] = result
                for module in set(wave) - set(own):
                    parent = parents[module]
                    _RESULTS[module] = replace(parent, via=parent.via or module.rpartition(".")[0])
    return _RESULTS


_MISSING = re.compile(r"ModuleNotFoundError: No module named '([\w.]+)'")


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone_in_a_fresh_interpreter(module: str) -> None:
    done = _fresh_imports()[module]
    if done.returncode != 0:
        missing = _MISSING.search(done.stderr)
        top = missing.group(1).split(".")[0] if missing else None
        if top is not None and top != "relgrad" and importlib.util.find_spec(top) is None:
            pytest.skip(f"{module} needs {top}, which is not installed")  # an optional dependency (torch, ...)
    how = f" (the same as `import {done.via}`, which loads it)" if done.via else ""
    assert done.returncode == 0, f"`python -c 'import {module}'`{how} failed:\n{done.stderr[-3000:]}"


# ============================================================================================ the import graph
def _parse(module: str) -> ast.Module:
    return ast.parse(FILES[module].read_text(encoding="utf-8"), filename=str(FILES[module]))


def _package_of(module: str) -> str:
    """The package a module's relative imports start from (a package ``__init__`` is its own package)."""
    return module if FILES[module].name == "__init__.py" else module.rpartition(".")[0]


def _imports(module: str) -> Iterator[Tuple[int, str, List[str], Optional[str]]]:
    """``(line, absolute module, imported names, local name of the module)`` for each import in ``module`` of a
    relgrad module, at any depth (imports inside functions count too).  ``from pkg import sub`` with ``sub`` a
    module yields ``pkg.sub`` with no names; the local name is set when a whole module is bound to one name
    (``from pkg import sub``, ``import pkg.sub as s``)."""
    for node in ast.walk(_parse(module)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "relgrad":
                    yield node.lineno, alias.name, [], alias.asname
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(module).split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "relgrad":
                continue
            names = []
            for alias in node.names:
                if f"{target}.{alias.name}" in FILES:
                    yield node.lineno, f"{target}.{alias.name}", [], alias.asname or alias.name
                else:
                    names.append(alias.name)
            if names:
                yield node.lineno, target, names, None


# ---------------------------------------------------------------------------------------- datasets layers
#: Layer of each module of relgrad.datasets, from the ground up; a module imports only lower layers.
DATASETS_LAYERS = {
    "relgrad.datasets.base": 0,
    "relgrad.datasets.toys": 1,
    "relgrad.datasets.images": 1,
    "relgrad.datasets.transforms": 1,
    "relgrad.datasets.metrics": 1,
    "relgrad.datasets.loader": 2,
    "relgrad.datasets": 3,  # the package __init__: re-exports everything, so nothing inside may import it
}
DATASETS_MODULES = [m for m in MODULES if m == "relgrad.datasets" or m.startswith("relgrad.datasets.")]


def test_every_datasets_module_has_a_layer() -> None:
    assert set(DATASETS_MODULES) == set(DATASETS_LAYERS), (
        "a module of relgrad.datasets was added or removed: give it its layer in DATASETS_LAYERS")


@pytest.mark.parametrize("module", [m for m in DATASETS_MODULES if m != "relgrad.datasets"])
def test_datasets_module_imports_only_lower_layers(module: str) -> None:
    layer = DATASETS_LAYERS[module]
    upward = [f"line {line}: {target} (layer {DATASETS_LAYERS[target]})"
              for line, target, _, _ in _imports(module)
              if target in DATASETS_LAYERS and DATASETS_LAYERS[target] >= layer]
    assert not upward, f"{module} (layer {layer}) imports its own layer or one above it: {upward}"


# ---------------------------------------------------------------------------------------- private names
def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_uses(module: str) -> List[str]:
    """``from relgrad.x import _y``, and ``x._y`` where ``x`` was imported from another relgrad module."""
    found: List[str] = []
    bound: Dict[str, str] = {}  # local name -> the relgrad module it came from
    for line, target, names, local in _imports(module):
        if target == module:
            continue
        found += [f"line {line}: from {target} import {n}" for n in names if _is_private(n)]
        bound.update({n: target for n in names})
        if local is not None:
            bound[local] = target
    for node in ast.walk(_parse(module)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound \
                and _is_private(node.attr):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr} ({bound[node.value.id]})")
    return found


@pytest.mark.parametrize("module", MODULES)
def test_no_private_names_from_other_modules(module: str) -> None:
    offenders = _private_uses(module)
    assert not offenders, f"{module} uses private names of other relgrad modules (make them public there): {offenders}"


def test_the_checks_see_imports() -> None:
    """The parser above finds what it must: relative, absolute, nested and submodule imports."""
    imports = {target for _, target, _, _ in _imports("relgrad.datasets.loader")}
    assert {"relgrad.datasets.base", "relgrad.datasets.toys", "relgrad.errors", "relgrad.utils"} <= imports
    assert "relgrad.datasets.images" in {target for _, target, _, _ in _imports("relgrad.datasets")}
    checks = {target: names for _, target, names, _ in _imports("relgrad.teaching.checks")}
    assert "deltas" in checks["relgrad.numpy.gradients"]
