"""The smooth leaky ReLU of the dense flow, on torch tensors (any device, any floating dtype).

``sigma(u) = alpha*u + (1-alpha)*softplus(u)`` is strictly increasing and convex with slope in
``(alpha, 1)``, hence a bijection of the real line.  Every function is elementwise and keeps the dtype and
device of its input; all of them are differentiable by autograd.
"""

from __future__ import annotations

import torch

from ..utils import check_alpha

__all__ = [
    "DEFAULT_ALPHA", "sigma", "sigma_prime", "log_sigma_prime", "dlog_sigma_prime", "sigma_inverse",
]

#: Slope of the negative half-line (the value the authors' PyTorch notebook used).
DEFAULT_ALPHA = 0.3


def _softplus(u: torch.Tensor) -> torch.Tensor:
    # torch.nn.functional.softplus switches to the identity above a threshold (an error of ~1e-9 at u=20),
    # which would break agreement with the NumPy twin; this form is exact everywhere and never overflows.
    return torch.clamp_min(u, 0.0) + torch.log1p(torch.exp(-torch.abs(u)))


def sigma(u: torch.Tensor, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """Smooth leaky ReLU ``alpha*u + (1-alpha)*softplus(u)``.

    Shapes:
        u: any shape; returns the same shape.

    Examples:
        >>> import torch, relgrad.torch as rt
        >>> [round(v, 4) for v in rt.sigma(torch.tensor([-1.0, 0.0, 1.0])).tolist()]
        [-0.0807, 0.4852, 1.2193]
        >>> rt.sigma(torch.zeros(2, 3), alpha=0.5).shape        # elementwise: the input's shape
        torch.Size([2, 3])
    """
    a = check_alpha(alpha)
    return a * u + (1.0 - a) * _softplus(u)


def sigma_prime(u: torch.Tensor, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """Derivative ``alpha + (1-alpha)*sigmoid(u)``, always in ``(alpha, 1)``.

    Shapes:
        u: any shape; returns the same shape.
    """
    a = check_alpha(alpha)
    return a + (1.0 - a) * torch.sigmoid(u)


def log_sigma_prime(u: torch.Tensor, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """``log sigma'(u)``: the per-coordinate log-Jacobian of the activation.

    Shapes:
        u: any shape; returns the same shape.
    """
    # As the NumPy twin: for u >= 0 sigma' rounds to 1 for large u, so log1p(sigma' - 1) keeps the tiny exact
    # value -(1 - alpha) e^{-u}; for u < 0 sigma' is a sum of positive terms and its log is accurate.
    # (The fused training kernel sigma_and_log_det uses the plain log: its error is below 1e-7 nats per unit.)
    a = check_alpha(alpha)
    return torch.where(u >= 0, torch.log1p(-(1.0 - a) * torch.sigmoid(-u)), torch.log(a + (1.0 - a) * torch.sigmoid(u)))


def dlog_sigma_prime(u: torch.Tensor, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """``d/du log sigma'(u) = sigma''(u)/sigma'(u) = (1-alpha) s (1-s) / sigma'(u)`` with ``s = sigmoid(u)``.

    Shapes:
        u: any shape; returns the same shape.
    """
    a = check_alpha(alpha)
    s = torch.sigmoid(u)
    # s*(1-s) is computed as sigmoid(u)*sigmoid(-u) so that it does not round to 0 for large positive u.
    return (1.0 - a) * s * torch.sigmoid(-u) / (a + (1.0 - a) * s)


def sigma_inverse(v: torch.Tensor, alpha: float = DEFAULT_ALPHA, *, max_iter: int = 100) -> torch.Tensor:
    """Inverse of :func:`sigma` by safeguarded Newton iteration (exact to rounding for ``|u|`` up to 1e6).

    sigma is convex and increasing, so Newton started to the right of the root decreases monotonically
    onto it.  Both starts lie to the right: ``sigma(u) > u`` gives ``u* < v`` for ``v >= 0``, and
    ``sigma(v/alpha) = v + (1-alpha)*softplus(v/alpha) > v`` gives ``u* < v/alpha`` for ``v < 0``.
    The safeguard keeps every step non-increasing (a rounded residual can have the wrong sign at the root)
    and the loop stops as soon as no entry moves.  NaN stays NaN and +-inf maps to +-inf.

    Shapes:
        v: any shape; returns the same shape.

    Examples:
        >>> import torch, relgrad.torch as rt
        >>> u = torch.tensor([-50.0, -1.0, 0.0, 3.0, 1e4])
        >>> torch.allclose(rt.sigma_inverse(rt.sigma(u)), u, atol=1e-5)
        True
        >>> rt.sigma_inverse(torch.tensor([float("-inf"), float("inf")]))
        tensor([-inf, inf])
    """
    a = check_alpha(alpha)
    u = torch.where(v >= 0, v, v / a)
    finite = torch.isfinite(u)  # non-finite entries are their own inverse; Newton would turn them into NaN
    for _ in range(max_iter):
        step = (sigma(u, a) - v) / sigma_prime(u, a)
        u_new = torch.where(finite, torch.minimum(u - step, u), u)  # monotone from the right: never move up
        if not bool((u_new < u).any()):  # one device sync per iteration, a handful of iterations
            break
        u = u_new
    return u
