"""The bottom layer of :mod:`relgrad.datasets`: argument checks shared by every other module of the package.

Nothing here knows about a particular dataset; every other module of the package may import from here, and
this module imports no other one (``tests/test_layering.py`` keeps it so).
"""

from __future__ import annotations

import difflib
from typing import Sequence, Union

import numpy as np

from ..errors import UnknownDatasetError

__all__ = ["RNGLike", "resolve_name", "check_count", "check_lam"]

#: What every drawing function accepts as ``rng``: a Generator (used in place), an int seed, or ``None``
#: (fresh entropy); :func:`relgrad.utils.as_generator` turns it into a Generator.
RNGLike = Union[np.random.Generator, int, None]


def resolve_name(name: str, valid: Sequence[str], what: str = "dataset") -> str:
    """Return the canonical spelling of ``name`` or raise ``UnknownDatasetError`` with a suggestion."""
    key = str(name).strip().lower()
    if key in valid:
        return key
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownDatasetError(f"unknown {what} {name!r}.{hint} Valid names: {', '.join(valid)}.")


def check_count(n: int, name: str = "n") -> int:
    """Return ``n`` as an int if it is a positive integer (bools and floats are rejected)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{name} must be a positive integer, got {n!r}")
    return int(n)


def check_lam(lam: float) -> float:
    """Return ``lam`` as a float if ``0 <= lam < 0.5`` (the logit transform's margin), else raise ``ValueError``."""
    lam = float(lam)
    if not 0.0 <= lam < 0.5:
        raise ValueError(f"lam must satisfy 0 <= lam < 0.5, got {lam!r}")
    return lam
