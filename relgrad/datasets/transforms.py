"""Maps between the data and the space a flow models, each with the log-Jacobian that keeps likelihoods exact.

* :class:`~relgrad.datasets.Standardizer` and :class:`~relgrad.datasets.Whitener`: per-column and full-covariance affine maps (fitting one on
  a split's training part and applying it to all three parts is :func:`~relgrad.datasets.standardize`
  / :func:`~relgrad.datasets.whiten`);
* image data: :func:`~relgrad.datasets.dequantize` (integer pixels to the unit cube), :func:`~relgrad.datasets.logit_transform` and
  :func:`~relgrad.datasets.logit_inverse`, and :func:`~relgrad.datasets.unit_to_pixels` (back to integer pixels, to display samples).

The logit transform's log-Jacobian computed from the logit-space data alone, which the likelihood conversions
need, is :func:`~relgrad.datasets.logit_log_jacobian` (the pipeline is written out in
``relgrad.datasets.metrics``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np

from ..errors import NonFiniteError, ShapeError
from ..utils import as_generator
from .base import RNGLike, check_count, check_lam

__all__ = [
    "Standardizer",
    "Whitener",
    "dequantize",
    "logit_transform",
    "logit_inverse",
    "unit_to_pixels",
]


# ============================================================================================ standardising
@dataclass(frozen=True, eq=False)
class Standardizer:
    """The affine map ``z = (x - mean) / std`` (per column) and its log-Jacobian.

    A flow fitted to ``z`` gives ``log p_X(x) = log p_Z(z) + log_abs_det``, with the constant
    ``log_abs_det = -sum_d log std_d``: use ``to_original_log_likelihood`` to report likelihoods in
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


@dataclass(frozen=True, eq=False)
class Whitener:
    """The affine map ``z = A (x - mean)`` with ``A = Sigma^{-1/2}`` (symmetric), and its log-Jacobian.

    The full-covariance sibling of :class:`~relgrad.datasets.Standardizer`: ``z`` has identity sample covariance on the data it
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


def _as_batch(x: np.ndarray, name: str, dim: Optional[int] = None) -> np.ndarray:
    """``x`` as a finite float64 ``(M, D)`` array, else ``ShapeError`` / ``NonFiniteError``."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or (dim is not None and a.shape[1] != dim):
        want = f"(M, {dim})" if dim is not None else "(M, D)"
        raise ShapeError(f"{name} must have shape {want}, got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise NonFiniteError(f"{name} contains NaN or infinite values")
    return a


# ============================================================================================ image transforms
def dequantize(pixels: np.ndarray, *, levels: int, rng: RNGLike = None) -> np.ndarray:
    """Uniform dequantisation scaled to the unit cube: ``x = (v + U[0, 1)) / levels``.

    ``pixels`` must hold integers in ``0..levels-1``.  The result lies in ``[0, 1)``; its density relates
    to the density of ``u = v + U`` on ``[0, levels)`` by ``log p_U(u) = log p_X(x) - D log(levels)``.

    Shapes:
        ``pixels`` any shape (usually ``(M, D)``); returns the same shape, float64.
    """
    levels = check_count(levels, "levels")
    v = np.asarray(pixels)
    if v.size and (not np.all(np.isfinite(v)) or np.any(v != np.round(v)) or v.min() < 0 or v.max() > levels - 1):
        raise ValueError(f"pixels must be integers in 0..{levels - 1} (got range "
                         f"{np.nanmin(v) if v.size else None}..{np.nanmax(v) if v.size else None})")
    noise = as_generator(rng).random(v.shape)
    return (v.astype(np.float64) + noise) / levels


def logit_transform(x: np.ndarray, lam: float = 1e-6) -> Tuple[np.ndarray, np.ndarray]:
    """``y = logit(lam + (1 - 2 lam) x)`` and its per-sample log-Jacobian ``sum_d log|dy_d/dx_d|``.

    ``lam`` keeps the argument of the logit away from 0 and 1 (1e-6 for MNIST in the paper and in MAF;
    RealNVP used 0.05 for CIFAR-10).  ``x`` must lie in ``[0, 1]`` (open interval when ``lam == 0``).
    ``log|dy/dx| = log(1 - 2 lam) - log s - log(1 - s)`` with ``s = lam + (1 - 2 lam) x``.

    Shapes:
        ``x`` ``(..., D)``; returns ``y`` ``(..., D)`` and the log-Jacobian ``(...)`` (summed over ``D``).

    Examples:
        >>> import numpy as np
        >>> from relgrad.datasets import logit_inverse, logit_transform
        >>> x = np.array([[0.5, 0.5], [0.25, 0.75]])
        >>> y, log_jac = logit_transform(x)
        >>> log_jac.round(4)                          # log 4 per coordinate at x = 1/2
        array([2.7726, 3.3479])
        >>> np.allclose(logit_inverse(y), x)
        True
    """
    lam = check_lam(lam)
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
    """Inverse of :func:`~relgrad.datasets.logit_transform`: ``x = (sigmoid(y) - lam) / (1 - 2 lam)``.

    Shapes:
        ``y`` any shape; returns the same shape, float64.  Values of ``y`` beyond ``+-logit(lam)`` (which
        a flow's samples can reach) map slightly outside ``[0, 1]``; :func:`~relgrad.datasets.unit_to_pixels` clips them.
    """
    lam = check_lam(lam)
    y = np.asarray(y, dtype=np.float64)
    # sigmoid written with exp(-|y|) so it neither overflows nor loses digits for large |y|.
    e = np.exp(-np.abs(y))
    s = np.where(y >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return (s - lam) / (1.0 - 2.0 * lam)


def unit_to_pixels(x: np.ndarray, levels: int) -> np.ndarray:
    """Quantise unit-cube values back to integer pixels ``floor(x * levels)``, clipped to ``0..levels-1``.

    Inverts :func:`~relgrad.datasets.dequantize` exactly (the noise lies in ``[0, 1)``); use it to display model samples.

    Shapes:
        any shape in, the same shape out (int64).
    """
    levels = check_count(levels, "levels")
    return np.clip(np.floor(np.asarray(x, dtype=np.float64) * levels), 0, levels - 1).astype(np.int64)
