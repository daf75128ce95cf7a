"""Likelihood spaces for image data: logit-space nats, pixel-unit nats and bits per dimension.

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
:func:`~relgrad.datasets.image_likelihood_summary` returns both numbers side by side.  (The authors' code also divides the
dequantised data by its global maximum instead of by ``K``; the difference is below 0.4 % in scale and
we use the exact ``/K`` so the Jacobian is exact.)
"""

from __future__ import annotations

import math
from typing import Dict, Tuple, Union

import numpy as np

from ..errors import ShapeError
from .base import check_count, check_lam

__all__ = [
    "logit_log_jacobian",
    "pixel_log_likelihood",
    "bits_per_dim",
    "bits_per_dim_from_logit",
    "image_likelihood_summary",
]


# ============================================================================================ likelihood spaces
def logit_log_jacobian(y: np.ndarray, lam: float = 1e-6) -> np.ndarray:
    """``sum_d log|dy_d/dx_d|`` of the logit transform, computed from the logit-space data ``y``.

    Equal to the log-Jacobian returned by :func:`~relgrad.datasets.logit_transform`, but needs
    only ``y`` (what a flow sees): ``log|dy/dx| = log(1 - 2 lam) + softplus(y) + softplus(-y)``, since
    ``-log s = softplus(-y)`` and ``-log(1 - s) = softplus(y)`` for ``s = sigmoid(y)``.  It lives here, with
    the conversions that need it, rather than with the transform, so that this module needs only the base.

    Shapes:
        ``y`` ``(..., D)``; returns ``(...)``.
    """
    lam = check_lam(lam)
    y = np.asarray(y, dtype=np.float64)
    if y.ndim == 0:
        raise ShapeError("y must have at least one dimension (..., D)")
    a = np.abs(y)
    # softplus(y) + softplus(-y) = |y| + 2 log(1 + exp(-|y|)), stable for any y.
    per_dim = math.log1p(-2.0 * lam) + a + 2.0 * np.log1p(np.exp(-a))
    return per_dim.sum(axis=-1)


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
    levels = check_count(levels, "levels")
    return log_p + logit_log_jacobian(y, lam) - y.shape[1] * math.log(levels)


def bits_per_dim(log_p_pixels: Union[np.ndarray, float], dim: int) -> Union[np.ndarray, float]:
    """Bits per dimension ``-log p_U(u) / (D ln 2)`` from a log-density in pixel units (nats).

    Shapes:
        any shape (usually ``(M,)``) in, the same out; average it for the reported number.

    Examples:
        A density uniform on the pixel cube ``[0, 256)^D`` scores 8 bits per dimension:

        >>> import math
        >>> import numpy as np
        >>> from relgrad.datasets import bits_per_dim
        >>> round(float(bits_per_dim(-784 * math.log(256), 784)), 4)
        8.0
        >>> bits_per_dim(np.array([-100.0, -120.0]), dim=64).round(4)
        array([2.2542, 2.7051])
    """
    dim = check_count(dim, "dim")
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
