"""Datasets for the book, all usable offline: the paper's 2-D toys, scikit-learn's digits, and MNIST-style IDX files.

Backend-free (NumPy only).  scikit-learn is imported lazily, inside the function that needs it, so
``import relgrad.datasets`` works without it.  Nothing here touches the network unless you call
:func:`download_mnist` yourself.

Three groups:

* **2-D toys** (:data:`TOY_DATASETS`, :func:`sample_toy`): sine, trimodal, moons, rings, 2spirals,
  checkerboard, 8gaussians.  Every draw takes an explicit ``rng``.
* **Splits and standardisation** (:class:`Split`, :func:`load_dataset`, :func:`standardize`).
* **Image data** (digits, MNIST, Fashion-MNIST): dequantisation, the logit transform and the conversions
  between the likelihood spaces in which papers report their numbers (below), plus an IDX reader.

Likelihood spaces for image data
--------------------------------
An image has ``D`` pixels with integer values ``v`` in ``{0, ..., K-1}`` (``K`` = ``levels``: 256 for
MNIST and Fashion-MNIST, **17 for scikit-learn's 8x8 digits**, whose values are 0..16).  The pipeline is

1. dequantise: ``u = v + eps``, ``eps ~ U[0, 1)^D``, so ``u`` lies in ``[0, K)^D`` ("pixel units");
2. scale: ``x = u / K`` in ``[0, 1)^D``;
3. logit: ``y = logit(lam + (1 - 2 lam) x)``; the flow models ``y``.

By the change of variables, with ``log p_Y(y)`` the flow's log-density,

    log p_U(u) = log p_Y(y) + sum_d log|dy_d/dx_d| - D log K,
    log|dy_d/dx_d| = log(1 - 2 lam) - log s_d - log(1 - s_d),   s_d = lam + (1 - 2 lam) x_d,

and **bits per dimension** are

    bpd = -log p_U(u) / (D ln 2).

This is the convention of RealNVP, Glow, MAF's bits/pixel and Self Normalizing Flows (data in
``[0, 256)^D``); since ``E[log p_U(u)] <= log P(v)`` (Theis et al. 2016) it upper-bounds the code length
of the discrete images in bits per pixel.  A model uniform on the pixel cube scores exactly ``log2 K``
bpd (8 for 256 levels, ``log2 17 = 4.087`` for digits).  Digits bpd are per 17-level pixel and are not
comparable with 8-bit image bpd.

The relative-gradient paper reports MNIST differently: ``mean log p_Y(y)`` in nats **in logit space**,
with ``lam = 1e-6`` and **no** preprocessing Jacobian (MAF's MNIST protocol), e.g. -1375.2 nats.  That
number cannot be turned into bits/dim without the data (the Jacobian term depends on each image).
:func:`image_likelihood_summary` returns both numbers side by side.  (The authors' code also divides the
dequantised data by its global maximum instead of by ``K``; the difference is below 0.4 % in scale and
we use the exact ``/K`` so the Jacobian is exact.)
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import math
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import NonFiniteError, ShapeError, UnknownDatasetError
from .utils import as_generator

__all__ = [
    "TOY_DATASETS",
    "IMAGE_DATASETS",
    "DATASETS",
    "sample_toy",
    "Split",
    "load_dataset",
    "Standardizer",
    "standardize",
    "Whitener",
    "whiten",
    "load_digits_pixels",
    "dequantize",
    "logit_transform",
    "logit_inverse",
    "logit_log_jacobian",
    "unit_to_pixels",
    "pixel_log_likelihood",
    "bits_per_dim",
    "bits_per_dim_from_logit",
    "image_likelihood_summary",
    "read_idx",
    "load_idx_images",
    "load_idx_labels",
    "default_data_dir",
    "download_mnist",
    "MNIST_MIRROR",
    "FASHION_MNIST_MIRROR",
    "DEBIAN_FASHION_MNIST_DIR",
]

RNGLike = Union[np.random.Generator, int, None]


# ============================================================================================ name lookup
def _resolve_name(name: str, valid: Sequence[str], what: str = "dataset") -> str:
    """Return the canonical spelling of ``name`` or raise :class:`UnknownDatasetError` with a suggestion."""
    key = str(name).strip().lower()
    if key in valid:
        return key
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownDatasetError(f"unknown {what} {name!r}.{hint} Valid names: {', '.join(valid)}.")


def _check_count(n: int, name: str = "n") -> int:
    """Return ``n`` as an int if it is a positive integer (bools and floats are rejected)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{name} must be a positive integer, got {n!r}")
    return int(n)


# ============================================================================================ 2-D toys
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

#: Names accepted by :func:`sample_toy` and :func:`load_dataset`.
TOY_DATASETS: Tuple[str, ...] = tuple(_TOYS)


def sample_toy(name: str, n: int, rng: RNGLike = None) -> np.ndarray:
    """Draw ``n`` i.i.d. points from the 2-D toy density ``name`` (one of :data:`TOY_DATASETS`).

    ``rng`` is a ``np.random.Generator``, an int seed, or ``None`` (fresh entropy): the same seed gives the
    same array.  An unknown name raises :class:`~relgrad.errors.UnknownDatasetError` listing the valid ones.

    Shapes:
        returns ``(n, 2)``, float64, one point per row.
    """
    key = _resolve_name(name, TOY_DATASETS, "toy dataset")
    return np.ascontiguousarray(_TOYS[key](_check_count(n), as_generator(rng)), dtype=np.float64)


# ============================================================================================ splits
@dataclass(frozen=True, eq=False)
class Split:
    """Train / validation / test arrays of one dataset, plus a small ``info`` dict describing them.

    ``info`` records what a later conversion needs, e.g. ``{"name": "digits", "space": "logit",
    "levels": 17, "lam": 1e-6, "image_shape": (8, 8)}`` for image data.  ``train, val, test = split``
    unpacks the three arrays.

    Shapes:
        ``train`` ``(N_train, D)``, ``val`` ``(N_val, D)``, ``test`` ``(N_test, D)``; the same ``D``.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    info: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for part in ("train", "val", "test"):
            a = getattr(self, part)
            if not isinstance(a, np.ndarray) or a.ndim != 2:
                raise ShapeError(f"Split.{part} must be a 2-D array (N, D), got {getattr(a, 'shape', type(a))}")
        dims = {self.train.shape[1], self.val.shape[1], self.test.shape[1]}
        if len(dims) != 1:
            raise ShapeError(f"train, val and test must have the same number of columns, got {sorted(dims)}")

    @property
    def dim(self) -> int:
        """The dimension ``D`` (number of columns)."""
        return int(self.train.shape[1])

    @property
    def sizes(self) -> Tuple[int, int, int]:
        """``(N_train, N_val, N_test)``."""
        return (len(self.train), len(self.val), len(self.test))

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter((self.train, self.val, self.test))


#: Image datasets :func:`load_dataset` understands (digits is bundled; the other two read IDX files).
IMAGE_DATASETS: Tuple[str, ...] = ("digits", "mnist", "fashion-mnist")
#: Every name :func:`load_dataset` accepts.
DATASETS: Tuple[str, ...] = TOY_DATASETS + IMAGE_DATASETS

_SPACES = ("logit", "unit", "pixels")
# Default split sizes: the paper's 5k/5k/5k toys; 1797 digits as 1197/300/300; MNIST's 50k/10k/10k.
_DEFAULT_SIZES = {"toy": (5000, 5000, 5000), "digits": (1197, 300, 300), "idx": (50000, 10000, 10000)}


def load_dataset(
    name: str,
    *,
    rng: RNGLike = None,
    sizes: Optional[Tuple[int, int, int]] = None,
    space: str = "logit",
    lam: float = 1e-6,
    directory: Union[str, os.PathLike, None] = None,
) -> Split:
    """Load ``name`` (a toy, ``"digits"``, ``"mnist"`` or ``"fashion-mnist"``) as a :class:`Split`.

    * Toys: ``sizes = (N_train, N_val, N_test)`` fresh i.i.d. draws (default 5000 each, as the paper).
    * ``"digits"``: the 1797 images shuffled by ``rng`` and cut into ``sizes`` (default 1197/300/300),
      dequantised with ``rng`` and mapped to ``space`` (17 levels).
    * ``"mnist"``/``"fashion-mnist"``: read from ``directory`` (see :func:`load_idx_images`).  As in the
      paper, train = the first ``N_train`` training images, val = the last ``N_val``, test = the first
      ``N_test`` test images (default 50000/10000/10000); 256 levels.

    ``space`` (images only): ``"logit"`` (default, what the flow models; ``lam`` as in
    :func:`logit_transform`), ``"unit"`` (dequantised, in ``[0, 1)``) or ``"pixels"`` (dequantised, in
    ``[0, K)``).  ``split.info`` records ``levels``, ``lam`` and ``space`` for the likelihood conversions.

    Shapes:
        every part is ``(N_part, D)`` float64; ``D = 2`` for toys, 64 for digits, 784 for (Fashion-)MNIST.
    """
    key = _resolve_name(name, DATASETS)
    gen = as_generator(rng)
    if key in _TOYS:
        return _load_toy(key, gen, sizes or _DEFAULT_SIZES["toy"])
    space = _resolve_name(space, _SPACES, "space")
    if key == "digits":
        pixels, _ = load_digits_pixels()
        parts = _shuffle_split(pixels, sizes or _DEFAULT_SIZES["digits"], gen)
        return _image_split(parts, gen, name=key, levels=17, space=space, lam=lam, image_shape=(8, 8))
    parts = _idx_parts(key, directory, sizes or _DEFAULT_SIZES["idx"])
    return _image_split(parts, gen, name=key, levels=256, space=space, lam=lam, image_shape=(28, 28))


def _check_sizes(sizes: Sequence[int]) -> Tuple[int, int, int]:
    if len(sizes) != 3:
        raise ValueError(f"sizes must be (N_train, N_val, N_test), got {sizes!r}")
    return tuple(_check_count(s, "each split size") for s in sizes)  # type: ignore[return-value]


def _load_toy(name: str, rng: np.random.Generator, sizes: Sequence[int]) -> Split:
    n_train, n_val, n_test = _check_sizes(sizes)
    # One draw cut in three: i.i.d. samples, so the parts are independent and reproducible from one seed.
    data = sample_toy(name, n_train + n_val + n_test, rng)
    train, val, test = np.split(data, [n_train, n_train + n_val])
    return Split(train, val, test, info={"name": name, "space": "data"})


def _shuffle_split(data: np.ndarray, sizes: Sequence[int], rng: np.random.Generator) -> Tuple[np.ndarray, ...]:
    """Shuffle the rows with ``rng`` and cut consecutive, disjoint blocks of the requested sizes."""
    n_train, n_val, n_test = _check_sizes(sizes)
    total = n_train + n_val + n_test
    if total > len(data):
        raise ValueError(f"sizes {tuple(sizes)} ask for {total} rows but the dataset has only {len(data)}")
    order = rng.permutation(len(data))[:total]
    return tuple(data[idx] for idx in np.split(order, [n_train, n_train + n_val]))


def _image_split(
    parts: Sequence[np.ndarray], rng: np.random.Generator, *, name: str, levels: int, space: str, lam: float,
    image_shape: Tuple[int, int],
) -> Split:
    """Dequantise the integer parts (train, val, test in that order from ``rng``) and map them to ``space``."""
    out = []
    for pixels in parts:
        x = dequantize(pixels.reshape(len(pixels), -1), levels=levels, rng=rng)
        if space == "logit":
            x = logit_transform(x, lam)[0]
        elif space == "pixels":
            x = x * levels
        out.append(x)
    info = {"name": name, "space": space, "levels": levels, "lam": lam if space == "logit" else None,
            "image_shape": image_shape}
    return Split(*out, info=info)


# ============================================================================================ standardising
@dataclass(frozen=True, eq=False)
class Standardizer:
    """The affine map ``z = (x - mean) / std`` (per column) and its log-Jacobian.

    A flow fitted to ``z`` gives ``log p_X(x) = log p_Z(z) + log_abs_det``, with the constant
    ``log_abs_det = -sum_d log std_d``: use :meth:`to_original_log_likelihood` to report likelihoods in
    the original space.

    Shapes:
        ``mean`` and ``std`` are ``(D,)``; ``transform``/``inverse`` map ``(M, D)`` to ``(M, D)``.
    """

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> "Standardizer":
        """Column means and (population) standard deviations of ``x`` (``(N, D)``, N >= 2)."""
        x = _as_batch(x, "x")
        if len(x) < 2:
            raise ShapeError(f"need at least 2 rows to estimate a standard deviation, got shape {x.shape}")
        std = x.std(axis=0)
        constant = np.flatnonzero(std <= 1e-12 * np.maximum(1.0, np.abs(x).max(axis=0)))
        if constant.size:
            # A constant column has no density (log-likelihood +inf); standardising would divide by zero.
            raise ValueError(
                f"columns {constant.tolist()[:10]} are constant, so they cannot be standardised "
                "(dequantise image data first, or drop those columns)"
            )
        return cls(mean=x.mean(axis=0), std=std)

    @property
    def log_abs_det(self) -> float:
        """``log|det dz/dx| = -sum_d log std_d`` (the same for every sample)."""
        return float(-np.sum(np.log(self.std)))

    def transform(self, x: np.ndarray) -> np.ndarray:
        """``z = (x - mean) / std``."""
        return (_as_batch(x, "x", self.mean.shape[0]) - self.mean) / self.std

    def inverse(self, z: np.ndarray) -> np.ndarray:
        """``x = z * std + mean``."""
        return _as_batch(z, "z", self.mean.shape[0]) * self.std + self.mean

    def to_original_log_likelihood(self, log_p_z: Union[np.ndarray, float]) -> Union[np.ndarray, float]:
        """Turn log-densities of standardised data into log-densities of the original data (per sample)."""
        return log_p_z + self.log_abs_det


def standardize(data: Union[Split, np.ndarray]) -> Tuple[Union[Split, np.ndarray], Standardizer]:
    """Standardise each column to zero mean and unit variance; return the data and the :class:`Standardizer`.

    For a :class:`Split` the statistics come from ``train`` only (so validation and test data stay unseen)
    and are applied to all three parts.  ``standardizer.log_abs_det`` is the log-Jacobian needed to report
    likelihoods in the original space.

    Shapes:
        an ``(N, D)`` array, or a Split with ``D`` columns, in; the same shapes out.
    """
    return _fit_and_apply(Standardizer, data, "standardized")


def _fit_and_apply(kind: Any, data: Union[Split, np.ndarray], flag: str) -> Tuple[Union[Split, np.ndarray], Any]:
    """Fit ``kind`` (Standardizer or Whitener) on ``data`` (on ``train`` for a Split) and transform all of it."""
    if isinstance(data, Split):
        fitted = kind.fit(data.train)
        parts = (fitted.transform(part) for part in (data.train, data.val, data.test))
        return Split(*parts, info=dict(data.info, **{flag: True})), fitted
    fitted = kind.fit(data)
    return fitted.transform(data), fitted


@dataclass(frozen=True, eq=False)
class Whitener:
    """The affine map ``z = A (x - mean)`` with ``A = Sigma^{-1/2}`` (symmetric), and its log-Jacobian.

    The full-covariance sibling of :class:`Standardizer`: ``z`` has identity sample covariance on the data it
    was fitted to.  A flow fitted to ``z`` gives ``log p_X(x) = log p_Z(z) + log_abs_det`` with the constant
    ``log_abs_det = -1/2 log det Sigma``.

    Shapes:
        ``mean`` is ``(D,)``, ``matrix`` (``A``) and ``inverse_matrix`` (``A^{-1} = Sigma^{1/2}``) are
        ``(D, D)``; ``transform``/``inverse`` map ``(M, D)`` to ``(M, D)``.
    """

    mean: np.ndarray
    matrix: np.ndarray
    inverse_matrix: np.ndarray
    log_abs_det: float

    @classmethod
    def fit(cls, x: np.ndarray) -> "Whitener":
        """Mean and (population) covariance of ``x`` (``(N, D)``, ``N > D``); clear error if it is singular."""
        x = _as_batch(x, "x")
        n, d = x.shape
        if n <= d:
            raise ShapeError(f"need more rows than columns to whiten (a full-rank covariance), got shape {x.shape}")
        mean = x.mean(axis=0)
        eigval, eigvec = np.linalg.eigh(np.cov(x.T, bias=True).reshape(d, d))
        if eigval.min() <= 1e-12 * max(eigval.max(), 1e-300):
            raise ValueError(f"the covariance is singular (smallest eigenvalue {eigval.min():.2e}, largest "
                             f"{eigval.max():.2e}), so the data cannot be whitened (dequantise image data first)")
        matrix = (eigvec / np.sqrt(eigval)) @ eigvec.T
        inverse_matrix = (eigvec * np.sqrt(eigval)) @ eigvec.T
        return cls(mean=mean, matrix=matrix, inverse_matrix=inverse_matrix,
                   log_abs_det=float(-0.5 * np.sum(np.log(eigval))))

    def transform(self, x: np.ndarray) -> np.ndarray:
        """``z = A (x - mean)`` for every row."""
        return (_as_batch(x, "x", self.mean.shape[0]) - self.mean) @ self.matrix.T

    def inverse(self, z: np.ndarray) -> np.ndarray:
        """``x = A^{-1} z + mean`` for every row."""
        return _as_batch(z, "z", self.mean.shape[0]) @ self.inverse_matrix.T + self.mean

    def to_original_log_likelihood(self, log_p_z: Union[np.ndarray, float]) -> Union[np.ndarray, float]:
        """Turn log-densities of whitened data into log-densities of the original data (per sample)."""
        return log_p_z + self.log_abs_det


def whiten(data: Union[Split, np.ndarray]) -> Tuple[Union[Split, np.ndarray], Whitener]:
    """Whiten (zero mean, identity covariance); return the data and the :class:`Whitener`.

    For a :class:`Split` the statistics come from ``train`` only and are applied to all three parts.

    Shapes:
        an ``(N, D)`` array, or a Split with ``D`` columns, in; the same shapes out.
    """
    return _fit_and_apply(Whitener, data, "whitened")


def _as_batch(x: np.ndarray, name: str, dim: Optional[int] = None) -> np.ndarray:
    """``x`` as a finite float64 ``(M, D)`` array, else :class:`ShapeError` / :class:`NonFiniteError`."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or (dim is not None and a.shape[1] != dim):
        want = f"(M, {dim})" if dim is not None else "(M, D)"
        raise ShapeError(f"{name} must have shape {want}, got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise NonFiniteError(f"{name} contains NaN or infinite values")
    return a


# ============================================================================================ digits
def load_digits_pixels() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (no network): integer pixels 0..16 and labels 0..9.

    Shapes:
        returns ``pixels`` ``(1797, 64)`` int64 and ``labels`` ``(1797,)`` int64.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # scikit-learn is an optional dependency (extra "data")
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn") from exc
    bunch = load_digits()
    return bunch.data.astype(np.int64), bunch.target.astype(np.int64)


# ============================================================================================ image transforms
def dequantize(pixels: np.ndarray, *, levels: int, rng: RNGLike = None) -> np.ndarray:
    """Uniform dequantisation scaled to the unit cube: ``x = (v + U[0, 1)) / levels``.

    ``pixels`` must hold integers in ``0..levels-1``.  The result lies in ``[0, 1)``; its density relates
    to the density of ``u = v + U`` on ``[0, levels)`` by ``log p_U(u) = log p_X(x) - D log(levels)``.

    Shapes:
        ``pixels`` any shape (usually ``(M, D)``); returns the same shape, float64.
    """
    levels = _check_count(levels, "levels")
    v = np.asarray(pixels)
    if v.size and (not np.all(np.isfinite(v)) or np.any(v != np.round(v)) or v.min() < 0 or v.max() > levels - 1):
        raise ValueError(f"pixels must be integers in 0..{levels - 1} (got range "
                         f"{np.nanmin(v) if v.size else None}..{np.nanmax(v) if v.size else None})")
    noise = as_generator(rng).random(v.shape)
    return (v.astype(np.float64) + noise) / levels


def _check_lam(lam: float) -> float:
    lam = float(lam)
    if not 0.0 <= lam < 0.5:
        raise ValueError(f"lam must satisfy 0 <= lam < 0.5, got {lam!r}")
    return lam


def logit_transform(x: np.ndarray, lam: float = 1e-6) -> Tuple[np.ndarray, np.ndarray]:
    """``y = logit(lam + (1 - 2 lam) x)`` and its per-sample log-Jacobian ``sum_d log|dy_d/dx_d|``.

    ``lam`` keeps the argument of the logit away from 0 and 1 (1e-6 for MNIST in the paper and in MAF;
    RealNVP used 0.05 for CIFAR-10).  ``x`` must lie in ``[0, 1]`` (open interval when ``lam == 0``).
    ``log|dy/dx| = log(1 - 2 lam) - log s - log(1 - s)`` with ``s = lam + (1 - 2 lam) x``.

    Shapes:
        ``x`` ``(..., D)``; returns ``y`` ``(..., D)`` and the log-Jacobian ``(...)`` (summed over ``D``).
    """
    lam = _check_lam(lam)
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 0:
        raise ShapeError("x must have at least one dimension (..., D)")
    if not np.all(np.isfinite(x)):
        raise NonFiniteError("x contains NaN or infinite values")
    lo_ok = x > 0 if lam == 0 else x >= 0
    hi_ok = x < 1 if lam == 0 else x <= 1
    if not (np.all(lo_ok) and np.all(hi_ok)):
        interval = "(0, 1)" if lam == 0 else "[0, 1]"
        raise ValueError(f"x must lie in {interval} for the logit transform with lam={lam}; "
                         f"got range {x.min()}..{x.max()}")
    s = lam + (1.0 - 2.0 * lam) * x
    log_s, log_1ms = np.log(s), np.log1p(-s)
    y = log_s - log_1ms
    log_jac = math.log1p(-2.0 * lam) - log_s - log_1ms
    return y, log_jac.sum(axis=-1)


def logit_inverse(y: np.ndarray, lam: float = 1e-6) -> np.ndarray:
    """Inverse of :func:`logit_transform`: ``x = (sigmoid(y) - lam) / (1 - 2 lam)``.

    Shapes:
        ``y`` any shape; returns the same shape, float64.  Values of ``y`` beyond ``+-logit(lam)`` (which
        a flow's samples can reach) map slightly outside ``[0, 1]``; :func:`unit_to_pixels` clips them.
    """
    lam = _check_lam(lam)
    y = np.asarray(y, dtype=np.float64)
    # sigmoid written with exp(-|y|) so it neither overflows nor loses digits for large |y|.
    e = np.exp(-np.abs(y))
    s = np.where(y >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return (s - lam) / (1.0 - 2.0 * lam)


def logit_log_jacobian(y: np.ndarray, lam: float = 1e-6) -> np.ndarray:
    """``sum_d log|dy_d/dx_d|`` of the logit transform, computed from the logit-space data ``y``.

    Equal to the log-Jacobian returned by :func:`logit_transform`, but needs only ``y`` (what a flow sees):
    ``log|dy/dx| = log(1 - 2 lam) + softplus(y) + softplus(-y)``, since ``-log s = softplus(-y)`` and
    ``-log(1 - s) = softplus(y)`` for ``s = sigmoid(y)``.

    Shapes:
        ``y`` ``(..., D)``; returns ``(...)``.
    """
    lam = _check_lam(lam)
    y = np.asarray(y, dtype=np.float64)
    if y.ndim == 0:
        raise ShapeError("y must have at least one dimension (..., D)")
    a = np.abs(y)
    # softplus(y) + softplus(-y) = |y| + 2 log(1 + exp(-|y|)), stable for any y.
    per_dim = math.log1p(-2.0 * lam) + a + 2.0 * np.log1p(np.exp(-a))
    return per_dim.sum(axis=-1)


def unit_to_pixels(x: np.ndarray, levels: int) -> np.ndarray:
    """Quantise unit-cube values back to integer pixels ``floor(x * levels)``, clipped to ``0..levels-1``.

    Inverts :func:`dequantize` exactly (the noise lies in ``[0, 1)``); use it to display model samples.

    Shapes:
        any shape in, the same shape out (int64).
    """
    levels = _check_count(levels, "levels")
    return np.clip(np.floor(np.asarray(x, dtype=np.float64) * levels), 0, levels - 1).astype(np.int64)


# ============================================================================================ likelihood spaces
def pixel_log_likelihood(
    log_p_logit: np.ndarray, y: np.ndarray, *, lam: float, levels: int
) -> np.ndarray:
    """Log-density of the dequantised data in pixel units ``[0, levels)^D`` from a logit-space log-density.

    ``log p_U(u) = log p_Y(y) + sum_d log|dy_d/dx_d| - D log(levels)`` (module docstring).  ``lam`` must
    be the one used to make ``y``.

    Shapes:
        ``log_p_logit`` ``(M,)`` and ``y`` ``(M, D)``; returns ``(M,)`` nats per image.
    """
    y = np.asarray(y, dtype=np.float64)
    log_p = np.asarray(log_p_logit, dtype=np.float64)
    if y.ndim != 2 or log_p.shape != y.shape[:1]:
        raise ShapeError(f"expected log_p_logit (M,) and y (M, D); got {log_p.shape} and {y.shape}")
    levels = _check_count(levels, "levels")
    return log_p + logit_log_jacobian(y, lam) - y.shape[1] * math.log(levels)


def bits_per_dim(log_p_pixels: Union[np.ndarray, float], dim: int) -> Union[np.ndarray, float]:
    """Bits per dimension ``-log p_U(u) / (D ln 2)`` from a log-density in pixel units (nats).

    Shapes:
        any shape (usually ``(M,)``) in, the same out; average it for the reported number.
    """
    dim = _check_count(dim, "dim")
    return -np.asarray(log_p_pixels, dtype=np.float64) / (dim * math.log(2.0))


def bits_per_dim_from_logit(
    log_p_logit: np.ndarray, y: np.ndarray, *, lam: float, levels: int
) -> np.ndarray:
    """Bits per dimension (pixel units ``[0, levels)``, full preprocessing Jacobian) from logit-space values.

    Shapes:
        ``log_p_logit`` ``(M,)`` and ``y`` ``(M, D)``; returns ``(M,)``.
    """
    y = np.asarray(y, dtype=np.float64)
    return bits_per_dim(pixel_log_likelihood(log_p_logit, y, lam=lam, levels=levels), y.shape[-1])


def _mean_and_2se(values: np.ndarray) -> Tuple[float, float]:
    """Mean and two standard errors (the paper's and MAF's ``+-``)."""
    v = np.asarray(values, dtype=np.float64)
    se = v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return float(v.mean()), float(2.0 * se)


def image_likelihood_summary(
    log_p_logit: np.ndarray, y: np.ndarray, *, lam: float, levels: int
) -> Dict[str, float]:
    """The numbers a chapter reports for image data, each as mean and +-2 standard errors.

    * ``logit_nats``: mean ``log p_Y(y)``, logit space, no preprocessing Jacobian: the paper's MNIST
      convention (-1375.2 nats), comparable only with the same ``lam`` and pipeline;
    * ``pixel_nats``: mean ``log p_U(u)`` in pixel units ``[0, levels)^D``, full Jacobian;
    * ``bpd``: bits per dimension ``-log p_U(u) / (D ln 2)`` (Glow / SNF / MAF bits-per-pixel convention).

    Shapes:
        ``log_p_logit`` ``(M,)`` and ``y`` ``(M, D)`` in; a dict of floats out (keys ``*_2se`` hold the errors).
    """
    pix = pixel_log_likelihood(log_p_logit, y, lam=lam, levels=levels)
    out: Dict[str, float] = {}
    for key, values in (("logit_nats", np.asarray(log_p_logit, float)), ("pixel_nats", pix),
                        ("bpd", bits_per_dim(pix, y.shape[1]))):
        out[key], out[key + "_2se"] = _mean_and_2se(values)
    out.update(levels=float(levels), lam=float(lam), dim=float(y.shape[1]))
    return out


# ============================================================================================ IDX files
# IDX (LeCun's MNIST format): magic = 0x00 0x00 <dtype code> <ndim>, then ndim big-endian uint32 sizes,
# then the data in C order, big-endian.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic (whatever its extension says)."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: corrupt or truncated gzip file ({exc})") from exc


def read_idx(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read an IDX file (MNIST / Fashion-MNIST format), gzipped or raw, into a native-endian array.

    Supported element types (third magic byte): 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64.  A malformed file (bad magic, unknown type, truncated header or data,
    trailing bytes) raises ``ValueError`` naming the file and the problem.

    Shapes:
        returns the array with the dimensions stored in the header, e.g. ``(N, 28, 28)`` for images and
        ``(N,)`` for labels.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic number {data[:4].hex() or 'missing'}; "
                         "expected 0000 followed by a type code and the number of dimensions)")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise ValueError(f"{path}: unknown IDX element type 0x{code:02X} (known: {known})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, {ndim} dimensions need {header})")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        kind = "truncated" if len(data) - header < expected else "has trailing bytes"
        raise ValueError(f"{path}: IDX data {kind}: header says shape {dims} of {dtype.name} "
                         f"({expected} bytes) but {len(data) - header} bytes follow the header")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))  # native byte order, and a writable copy


_IDX_KINDS = ("mnist", "fashion-mnist")
_IDX_SPLITS = ("train", "test")

#: Where Debian's ``dataset-fashion-mnist`` package installs the four Fashion-MNIST files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Mirrors used by :func:`download_mnist` (the official hosts; only called on request).
MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
FASHION_MNIST_MIRROR = "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"
# MD5 of the official .gz files (torchvision's table).  Debian recompresses its copies, so only downloads
# are checked against these.
_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}


def default_data_dir(kind: str = "mnist") -> Path:
    """Where :func:`load_idx_images` looks when no directory is given, and :func:`download_mnist` writes.

    ``$RELGRAD_DATA_DIR/<kind>`` when that variable is set; else, for Fashion-MNIST, Debian's
    ``/usr/share/datasets/fashion-mnist`` when it exists; else ``~/.cache/relgrad/<kind>``.
    """
    kind = _resolve_name(kind, _IDX_KINDS, "IDX dataset kind")
    if os.environ.get("RELGRAD_DATA_DIR"):
        return Path(os.environ["RELGRAD_DATA_DIR"]).expanduser() / kind
    if kind == "fashion-mnist" and DEBIAN_FASHION_MNIST_DIR.is_dir():
        return DEBIAN_FASHION_MNIST_DIR
    return Path.home() / ".cache" / "relgrad" / kind


def _idx_file(directory: Union[str, os.PathLike, None], kind: str, split: str, what: str) -> Path:
    """Path of the standard file (``.gz`` preferred, raw accepted) or a FileNotFoundError saying how to get it."""
    kind = _resolve_name(kind, _IDX_KINDS, "IDX dataset kind")
    split = _resolve_name(split, _IDX_SPLITS, "split")
    folder = Path(directory).expanduser() if directory is not None else default_data_dir(kind)
    prefix = "train" if split == "train" else "t10k"
    base = f"{prefix}-{what}-idx{3 if what == 'images' else 1}-ubyte"
    for candidate in (folder / f"{base}.gz", folder / base):
        if candidate.is_file():
            return candidate
    how = f"call relgrad.datasets.download_mnist({str(folder)!r}, kind={kind!r}) (needs internet)"
    if kind == "fashion-mnist":
        how += (" or, on Debian/Ubuntu, `sudo apt-get install dataset-fashion-mnist`, which installs the files "
                f"under {DEBIAN_FASHION_MNIST_DIR}")
    raise FileNotFoundError(f"{kind} {split} {what} not found: looked for {base}.gz and {base} in {folder}. "
                            f"To get them, {how}.")


def load_idx_images(
    directory: Union[str, os.PathLike, None] = None, kind: str = "mnist", split: str = "train"
) -> np.ndarray:
    """Read the standard images file of MNIST or Fashion-MNIST (``train-images-idx3-ubyte.gz`` or
    ``t10k-images-idx3-ubyte.gz``, gzipped or not) from ``directory`` (default :func:`default_data_dir`).

    Never downloads; a missing file raises FileNotFoundError explaining how to get it.

    Shapes:
        returns ``(N, 28, 28)`` uint8 (N = 60000 for train, 10000 for test).
    """
    images = read_idx(_idx_file(directory, kind, split, "images"))
    if images.ndim != 3:
        raise ShapeError(f"an images file must hold a 3-D array (N, rows, cols), got shape {images.shape}")
    return images


def load_idx_labels(
    directory: Union[str, os.PathLike, None] = None, kind: str = "mnist", split: str = "train"
) -> np.ndarray:
    """Read the standard labels file (``train-labels-idx1-ubyte.gz`` / ``t10k-labels-idx1-ubyte.gz``).

    Shapes:
        returns ``(N,)`` uint8.
    """
    labels = read_idx(_idx_file(directory, kind, split, "labels"))
    if labels.ndim != 1:
        raise ShapeError(f"a labels file must hold a 1-D array (N,), got shape {labels.shape}")
    return labels


def _idx_parts(kind: str, directory: Union[str, os.PathLike, None], sizes: Sequence[int]) -> Tuple[np.ndarray, ...]:
    """The paper's MNIST split: first N_train / last N_val training images, first N_test test images."""
    n_train, n_val, n_test = _check_sizes(sizes)
    train_file = load_idx_images(directory, kind, "train")
    test_file = load_idx_images(directory, kind, "test")
    if n_train + n_val > len(train_file) or n_test > len(test_file):
        raise ValueError(f"sizes {tuple(sizes)} exceed the files ({len(train_file)} train, {len(test_file)} test)")
    return train_file[:n_train], train_file[len(train_file) - n_val:], test_file[:n_test]


def _md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_file(url: str, dest: Path, md5: Optional[str], timeout: float = 60.0) -> Path:
    """Fetch ``url`` into ``dest`` atomically (temporary file, then rename) and check its MD5 if given."""
    import urllib.request

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
        if md5 is not None and _md5_of(tmp) != md5:
            raise OSError(f"checksum mismatch for {url}: got md5 {_md5_of(tmp)}, expected {md5}")
        os.replace(tmp, dest)  # only a complete, verified file ever appears under the final name
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def download_mnist(
    directory: Union[str, os.PathLike, None] = None, kind: str = "mnist", *, overwrite: bool = False,
    timeout: float = 60.0,
) -> Path:
    """Download the four IDX files of MNIST (or Fashion-MNIST) into ``directory`` and return it.

    For online use (e.g. Colab); nothing in relgrad calls it implicitly.  Files come from
    :data:`MNIST_MIRROR` / :data:`FASHION_MNIST_MIRROR` and are checked against the official MD5 sums.
    Files already present are kept unless ``overwrite``.  ``directory`` defaults to
    :func:`default_data_dir` (for Fashion-MNIST, pass a writable directory if Debian's copy is absent).
    """
    kind = _resolve_name(kind, _IDX_KINDS, "IDX dataset kind")
    folder = Path(directory).expanduser() if directory is not None else default_data_dir(kind)
    mirror = MNIST_MIRROR if kind == "mnist" else FASHION_MNIST_MIRROR
    for filename, md5 in _MD5[kind].items():
        dest = folder / filename
        if dest.is_file() and not overwrite:
            continue
        _download_file(mirror + filename, dest, md5, timeout)
    return folder
