"""The ``Examples:`` sections of the public docstrings are executed, so they cannot go stale.

One test per module, run with the standard library's ``doctest``.  The modules in ``WITH_EXAMPLES`` must
contain examples (``attempted > 0``: a docstring edit that drops them fails here); those in ``OTHERS``
have none today, and any example added to them later is run too.  Modules are imported by name
(``importlib``): ``relgrad.torch.gradients`` as an attribute is the *function* ``gradients``.
"""

from __future__ import annotations

import doctest
import importlib

import pytest

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

WITH_EXAMPLES = [
    "relgrad.torch",
    "relgrad.torch.nn",
    "relgrad.torch.flow",
    "relgrad.torch.gradients",
    "relgrad.torch.activation",
    "relgrad.numpy.flow",
    "relgrad.numpy.gradients",
    "relgrad.numpy.activation",
    "relgrad.datasets.loader",
    "relgrad.datasets.toys",
    "relgrad.datasets.transforms",
    "relgrad.datasets.metrics",
]
OTHERS = [
    "relgrad.torch.functions",
    "relgrad.numpy",
    "relgrad.datasets",
    "relgrad.datasets.base",
    "relgrad.datasets.images",
]


def _module(name: str):
    if name.startswith("relgrad.torch"):
        pytest.importorskip("torch")
    return importlib.import_module(name)


def _run(name: str) -> doctest.TestResults:
    module = _module(name)
    result = doctest.testmod(module, optionflags=FLAGS, verbose=False, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (see the output above)"
    return result


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_docstring_examples(name: str) -> None:
    assert _run(name).attempted > 0, f"{name} has no docstring examples any more"


@pytest.mark.parametrize("name", OTHERS)
def test_docstring_examples_if_any(name: str) -> None:
    _run(name)
