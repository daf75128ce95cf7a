"""The paper's 2-D toy densities: sine, trimodal, moons, rings, 2spirals, checkerboard, 8gaussians.

Every draw takes an explicit ``rng`` (see :data:`~relgrad.datasets.base.RNGLike`).
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import numpy as np

from ..utils import as_generator
from .base import RNGLike, check_count, resolve_name

__all__ = [
    "TOY_DATASETS",
    "sample_toy",
    "RING_RADII",
    "RING_NOISE",
    "EIGHT_GAUSSIANS_RADIUS",
    "EIGHT_GAUSSIANS_STD",
    "TRIMODAL_CENTRES",
    "TRIMODAL_STDS",
    "SPIRAL_TURNS",
    "SPIRAL_NOISE",
    "MOONS_NOISE",
    "SINE_NOISE",
]


# Each toy is a function (n, rng) -> (n, 2) float64.  Scales are chosen so every toy lives roughly in
# [-4, 4]^2 except trimodal (the paper's centres) and moons (scikit-learn's classic geometry).

#: Radii of the concentric ``rings`` toy and the Gaussian noise added to each point.
RING_RADII = (1.0, 2.0, 3.0)
RING_NOISE = 0.1
#: Radius of the circle on which the ``8gaussians`` centres lie, and each component's standard deviation.
EIGHT_GAUSSIANS_RADIUS = 2.0
EIGHT_GAUSSIANS_STD = 0.15
#: The ``trimodal`` mixture of the paper: three equally weighted isotropic Gaussians.
TRIMODAL_CENTRES = ((0.0, 0.0), (5.0, 5.0), (5.0, -5.0))
TRIMODAL_STDS = (1.0, 0.5, 0.5)
#: ``2spirals``: angle runs over [0, SPIRAL_TURNS * 2 pi]; radius = angle / pi (so up to 3); noise std.
SPIRAL_TURNS = 1.5
SPIRAL_NOISE = 0.1
MOONS_NOISE = 0.05
SINE_NOISE = 0.25


def _sine(n: int, rng: np.random.Generator) -> np.ndarray:
    """x1 ~ U(-2, 2), x2 = sin(3 x1) + 0.25 N(0, 1): a wavy ridge (the paper's definition)."""
    x1 = rng.uniform(-2.0, 2.0, n)
    x2 = np.sin(3.0 * x1) + SINE_NOISE * rng.standard_normal(n)
    return np.column_stack([x1, x2])


def _trimodal(n: int, rng: np.random.Generator) -> np.ndarray:
    """Three Gaussians at (0,0), (5,5), (5,-5) with std 1, 0.5, 0.5, equal weights."""
    k = rng.integers(0, 3, n)
    centres = np.asarray(TRIMODAL_CENTRES)[k]
    stds = np.asarray(TRIMODAL_STDS)[k, None]
    return centres + stds * rng.standard_normal((n, 2))


def _moons(n: int, rng: np.random.Generator) -> np.ndarray:
    """Two interleaved half circles of radius 1 (centres (0,0) and (1,0.5)), as scikit-learn's make_moons."""
    upper = rng.random(n) < 0.5
    t = rng.uniform(0.0, np.pi, n)
    # The lower moon is the upper one rotated by pi about (0.5, 0.25).
    x = np.where(upper, np.cos(t), 1.0 - np.cos(t))
    y = np.where(upper, np.sin(t), 0.5 - np.sin(t))
    return np.column_stack([x, y]) + MOONS_NOISE * rng.standard_normal((n, 2))


def _rings(n: int, rng: np.random.Generator) -> np.ndarray:
    """Concentric circles of radii 1, 2, 3; a ring's share of points is proportional to its circumference."""
    radii = np.asarray(RING_RADII)
    # Weight by radius so the density along every ring is the same (points per unit arc length).
    r = rng.choice(radii, size=n, p=radii / radii.sum())
    theta = rng.uniform(0.0, 2.0 * np.pi, n)
    points = r[:, None] * np.column_stack([np.cos(theta), np.sin(theta)])
    return points + RING_NOISE * rng.standard_normal((n, 2))


def _two_spirals(n: int, rng: np.random.Generator) -> np.ndarray:
    """Two interleaved Archimedean spirals r = theta / pi, the second the point reflection of the first."""
    # theta ~ sqrt(U) makes the density per unit arc length roughly constant (arc length grows like theta^2).
    theta = np.sqrt(rng.random(n)) * (2.0 * np.pi * SPIRAL_TURNS)
    r = theta / np.pi
    arm = np.where(rng.random(n) < 0.5, 1.0, -1.0)
    points = (arm * r)[:, None] * np.column_stack([np.cos(theta), np.sin(theta)])
    return points + SPIRAL_NOISE * rng.standard_normal((n, 2))


def _checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform on the 8 'black' unit squares of a 4x4 board on [-2, 2]^2 (cells with even column + row)."""
    cell = rng.integers(0, 8, n)
    row = cell // 2  # 0..3, two black cells per row
    col = 2 * (cell % 2) + (row % 2)  # shifts by one on odd rows, so (col + row) is always even
    return np.column_stack([col, row]) + rng.random((n, 2)) - 2.0


def _eight_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    """Eight Gaussians (std 0.15) centred on the circle of radius 2 at angles k pi / 4."""
    angle = rng.integers(0, 8, n) * (np.pi / 4.0)
    centres = EIGHT_GAUSSIANS_RADIUS * np.column_stack([np.cos(angle), np.sin(angle)])
    return centres + EIGHT_GAUSSIANS_STD * rng.standard_normal((n, 2))


_TOYS: Dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "sine": _sine,
    "trimodal": _trimodal,
    "moons": _moons,
    "rings": _rings,
    "2spirals": _two_spirals,
    "checkerboard": _checkerboard,
    "8gaussians": _eight_gaussians,
}

#: Names accepted by :func:`~relgrad.datasets.sample_toy` and :func:`~relgrad.datasets.load_dataset`.
TOY_DATASETS: Tuple[str, ...] = tuple(_TOYS)


def sample_toy(name: str, n: int, rng: RNGLike = None) -> np.ndarray:
    """Draw ``n`` i.i.d. points from the 2-D toy density ``name`` (one of :data:`~relgrad.datasets.TOY_DATASETS`).

    ``rng`` is a ``np.random.Generator``, an int seed, or ``None`` (fresh entropy): the same seed gives the
    same array.  An unknown name raises :class:`~relgrad.errors.UnknownDatasetError` listing the valid ones.

    Shapes:
        returns ``(n, 2)``, float64, one point per row.

    Examples:
        >>> import numpy as np
        >>> from relgrad.datasets import sample_toy
        >>> sample_toy("2spirals", 500, rng=0).shape
        (500, 2)
        >>> np.array_equal(sample_toy("rings", 4, rng=1), sample_toy("rings", 4, rng=1))
        True
        >>> sample_toy("moon", 10)
        Traceback (most recent call last):
            ...
        relgrad.errors.UnknownDatasetError: unknown toy dataset 'moon'. Did you mean 'moons'? ...
    """
    key = resolve_name(name, TOY_DATASETS, "toy dataset")
    return np.ascontiguousarray(_TOYS[key](check_count(n), as_generator(rng)), dtype=np.float64)
