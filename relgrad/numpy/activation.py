"""The smooth leaky ReLU of the relative-gradient flows, its derivatives and its inverse (pure NumPy).

    sigma(u)   = alpha * u + (1 - alpha) * softplus(u)
    sigma'(u)  = alpha + (1 - alpha) * sigmoid(u)                    in (alpha, 1)
    d/du log sigma'(u) = sigma''(u) / sigma'(u) = (1 - alpha) sigmoid(u) (1 - sigmoid(u)) / sigma'(u)

For 0 < alpha < 1 the function is a strictly increasing, convex bijection of the real line, so it can be
inverted by Newton's method (see :func:`sigma_inverse`).  Every function is elementwise, accepts a scalar or
an array of any shape and returns an array of the same shape; integer input is promoted to float64.  All
of them are written so that no intermediate overflows: they stay warning-free for ``|u|`` up to 1e308.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from ..utils import check_alpha

__all__ = ["DEFAULT_ALPHA", "sigma", "sigma_prime", "log_sigma_prime", "dlog_sigma_prime", "sigma_inverse"]

#: Slope of the activation for u -> -inf (the authors' PyTorch notebook uses 0.3, their JAX code 0.01).
DEFAULT_ALPHA: float = 0.3


def _as_float_array(u: ArrayLike) -> np.ndarray:
    """Return ``u`` as a floating NumPy array (float64 unless it already is a floating type)."""
    u = np.asarray(u)
    return u if np.issubdtype(u.dtype, np.floating) else u.astype(np.float64)


def _softplus(u: np.ndarray) -> np.ndarray:
    """log(1 + e^u) without overflow: max(u, 0) + log1p(e^{-|u|}) only ever exponentiates a non-positive number."""
    return np.maximum(u, 0) + np.log1p(np.exp(-np.abs(u)))


def _sigmoid_parts(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (sigmoid(u), sigmoid(u) * (1 - sigmoid(u))) computed from e = exp(-|u|) <= 1.

    Writing both through e avoids overflow for large |u| and avoids the cancellation in 1 - sigmoid(u)
    for large positive u: sigmoid(|u|) = 1 / (1 + e), sigmoid(-|u|) = e / (1 + e), and the product
    sigmoid (1 - sigmoid) = e / (1 + e)^2 is symmetric in u.
    """
    e = np.exp(-np.abs(u))
    inv = 1.0 / (1.0 + e)
    sig = np.where(u >= 0, inv, e * inv)
    return sig, e * inv * inv


def sigma(u: ArrayLike, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """Smooth leaky ReLU ``alpha * u + (1 - alpha) * softplus(u)``.

    Shapes:
        u: any shape ``(...)``; returns the same shape.

    Examples:
        >>> from relgrad.numpy import sigma
        >>> sigma([-1.0, 0.0, 1.0]).round(4)
        array([-0.0807,  0.4852,  1.2193])
        >>> round(float(sigma(0)), 4)                 # (1 - alpha) log 2; an int is promoted to float64
        0.4852
    """
    a = check_alpha(alpha)
    u = _as_float_array(u)
    return a * u + (1.0 - a) * _softplus(u)


def sigma_prime(u: ArrayLike, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """Derivative ``alpha + (1 - alpha) * sigmoid(u)``, which lies in (alpha, 1).

    Shapes:
        u: any shape ``(...)``; returns the same shape.
    """
    a = check_alpha(alpha)
    sig, _ = _sigmoid_parts(_as_float_array(u))
    return a + (1.0 - a) * sig


def log_sigma_prime(u: ArrayLike, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """``log sigma'(u)``: the per-unit contribution of an activation to log|det J|.

    For u >= 0 it is written as log1p(sigma' - 1) with sigma' - 1 = -(1 - alpha) sigmoid(-u): there sigma'
    rounds to 1 for large u and log(sigma') would lose the tiny (but exact) value -(1 - alpha) e^{-u}.
    For u < 0, sigma' = alpha + (1 - alpha) sigmoid(u) is a sum of positive terms and its log is accurate,
    whereas log1p would cancel (1 + x ~ alpha).

    Shapes:
        u: any shape ``(...)``; returns the same shape.
    """
    a = check_alpha(alpha)
    u = _as_float_array(u)
    sig, _ = _sigmoid_parts(u)
    sig_neg, _ = _sigmoid_parts(-u)
    return np.where(u >= 0, np.log1p(-(1.0 - a) * sig_neg), np.log(a + (1.0 - a) * sig))


def dlog_sigma_prime(u: ArrayLike, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """``d/du log sigma'(u) = sigma''(u) / sigma'(u)``: the direct term of the log-det in backpropagation.

    Shapes:
        u: any shape ``(...)``; returns the same shape.
    """
    a = check_alpha(alpha)
    sig, sig_1msig = _sigmoid_parts(_as_float_array(u))
    return (1.0 - a) * sig_1msig / (a + (1.0 - a) * sig)


def sigma_inverse(v: ArrayLike, alpha: float = DEFAULT_ALPHA, *, max_iter: int = 100) -> np.ndarray:
    """Inverse of :func:`sigma` by safeguarded Newton iteration, exact to a few ulps for ``|u|`` up to 1e6.

    sigma is convex and increasing, so Newton's method started to the right of the root decreases
    monotonically to it.  Both starting points below are to the right of the root:
    for v >= 0, sigma(v) = v + (1 - alpha) softplus(-v) > v, so start at u0 = v (sigma(u) ~ u for large u);
    for v < 0, sigma(v / alpha) = v + (1 - alpha) softplus(v / alpha) > v, so start at u0 = v / alpha
    (sigma(u) ~ alpha u for very negative u).  From such a start the root is reached in a handful of steps.
    The safeguard keeps the iterates monotone (a step may not increase u: in floating point a rounded
    residual can have the wrong sign at the root) and stops as soon as no entry changes any more.
    NaN stays NaN and +-inf maps to +-inf.

    Shapes:
        v: any shape ``(...)``; returns the same shape.

    Examples:
        >>> import numpy as np
        >>> from relgrad.numpy import sigma, sigma_inverse
        >>> u = np.array([-50.0, -1.0, 0.0, 3.0, 1e6])
        >>> np.allclose(sigma_inverse(sigma(u)), u)
        True
        >>> sigma_inverse([-np.inf, np.nan, np.inf])
        array([-inf,  nan,  inf])
    """
    a = check_alpha(alpha)
    v = _as_float_array(v)
    shape, v = v.shape, v.reshape(-1)  # work on a flat copy so masks also work for 0-d input
    u = np.where(v >= 0, v, v / a)
    active = np.isfinite(u)  # non-finite entries are already their own inverse
    for _ in range(max_iter):
        if not active.any():
            break
        ua, va = u[active], v[active]
        step = (sigma(ua, a) - va) / sigma_prime(ua, a)
        new = np.minimum(ua - step, ua)  # monotone safeguard
        changed = new != ua
        u[active] = new
        active[active] = changed  # only entries that still move need another step
    return u.reshape(shape)
