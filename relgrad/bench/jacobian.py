"""The "jacobian" method of the benchmark: autodiff through the full per-sample Jacobian of the flow.

This reproduces the path of the authors' code that builds ``vmap(jacfwd(g))`` and differentiates its
``slogdet`` (their ``get_loss_jac``), which is most likely the third curve ("Autodiff") of the timing figure
of Gresele et al. (2020); the paper's text on that figure could not be read.  It computes:

1. for each sample ``x_m`` the D x D Jacobian ``J_m = dg/dx (x_m)`` of the whole flow by automatic
   differentiation, ``torch.func.vmap(torch.func.jacrev(g))``: one (M, D, D) stack;
2. ``log|det J_m|`` by ``torch.linalg.slogdet`` (an LU of every ``J_m``);
3. the mean negative log-likelihood ``-mean_m(log p_s(g(x_m)) + log|det J_m|)``, and ``.backward()``
   through all of it for the weight gradients.

Nothing here uses the structure ``J = W_L D_{L-1} W_{L-1} ... D_1 W_1`` of the dense flow, and that is
the point: it is what a generic autodiff framework does for any bijection, at O(L M D^3) time and
O(L M D^2) memory.  The book's ``autodiff`` method, by contrast, differentiates ``slogdet`` of each
weight matrix: O(L D^3), no factor M.

Reverse mode (``jacrev``) is the default; ``mode="fwd"`` gives the authors' ``jacfwd``.  For a square
Jacobian both push D basis vectors through every layer, so they run nearly the same matrix products: the
count of :func:`relgrad.costs.flops_jacobian` is exact for ``jacrev``, and ``FlopCounterMode`` counts 0.8 to
1.9 % more for ``jacfwd`` (L = 1-3, M = 8, D = 32-64).  They differ in overhead and memory too; the memory
model :func:`relgrad.costs.jacobian_stack_bytes` was measured for ``jacrev`` only.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..torch.activation import sigma
from ..torch.flow import DenseFlow

__all__ = ["JACOBIAN_MODES", "per_sample_forward", "per_sample_jacobians", "jacobian_nll"]

#: Autodiff modes for the per-sample Jacobian: reverse (``torch.func.jacrev``) or forward (``jacfwd``).
JACOBIAN_MODES = ("rev", "fwd")


def per_sample_forward(model: DenseFlow) -> Callable[[torch.Tensor], torch.Tensor]:
    """``g`` for one sample, ``x (D,) -> s (D,)``: ``z_k = sigma(W_k z_{k-1} + b_k)``, no activation after
    the last layer (the same map as ``model(x)[0]``).

    It closes over the model's parameters (not copies), so an outer ``backward()`` reaches them through
    any ``torch.func`` transform of ``g``.

    Shapes:
        the returned function maps (D,) to (D,).
    """
    weights, biases, alpha, last = model.weights, model.biases, model.alpha, model.n_layers - 1

    def g(x1: torch.Tensor) -> torch.Tensor:
        z = x1
        for k, (w, b) in enumerate(zip(weights, biases)):
            y = torch.mv(w, z) if b is None else torch.addmv(b, w, z)  # W z + b: F.linear for one row
            z = sigma(y, alpha) if k < last else y
        return z

    return g


def _check_mode(mode: str) -> str:
    if mode not in JACOBIAN_MODES:
        raise ValueError(f"unknown Jacobian mode {mode!r}; valid modes are {', '.join(JACOBIAN_MODES)}")
    return mode


def per_sample_jacobians(model: DenseFlow, x: torch.Tensor, mode: str = "rev") -> torch.Tensor:
    """Every sample's Jacobian ``dg/dx`` by autodiff: ``vmap(jacrev(g))(x)`` (``jacfwd`` for ``mode="fwd"``).

    Differentiable with respect to the model's parameters.  Raises ValueError for an unknown mode.

    Shapes:
        x: (M, D); returns (M, D, D), entry [m, i, j] = d g_i / d x_j at x_m.
    """
    jac = torch.func.jacrev if _check_mode(mode) == "rev" else torch.func.jacfwd
    return torch.func.vmap(jac(per_sample_forward(model)))(x)


def jacobian_nll(model: DenseFlow, x: torch.Tensor, mode: str = "rev", *, check: bool = True) -> torch.Tensor:
    """Mean negative log-likelihood through the full per-sample Jacobians: ``-mean(log p_s(g(x)) + log|det J|)``.

    Exact: the same value as ``-model.log_prob(x).mean()``, and its ``.backward()`` leaves the exact
    gradient in the parameters' ``.grad``, at O(L M D^3) time and O(L M D^2) memory
    (:func:`relgrad.costs.flops_jacobian`, :func:`relgrad.costs.jacobian_stack_bytes`).  ``s = g(x)`` comes
    out of the same pass as the Jacobians (``has_aux``), as a framework would compute it.  ``check=False``
    skips the shape and finiteness check of ``x`` (the benchmark validated its batch once).  Raises
    TypeError for a model that is not a :class:`~relgrad.torch.DenseFlow`, ValueError for an unknown mode
    or a batch of the wrong shape.

    Shapes:
        x: (M, D); returns a scalar tensor.
    """
    if not isinstance(model, DenseFlow):
        raise TypeError(f"jacobian_nll needs a relgrad.torch.DenseFlow, got {type(model).__name__}")
    jac = torch.func.jacrev if _check_mode(mode) == "rev" else torch.func.jacfwd
    if check:
        x = model._batch(x)
    g = per_sample_forward(model)

    def g_and_s(x1: torch.Tensor):
        s1 = g(x1)
        return s1, s1  # (output to differentiate, aux returned as is)

    jacobians, s = torch.func.vmap(jac(g_and_s, has_aux=True))(x)
    logabsdet = torch.linalg.slogdet(jacobians).logabsdet
    return -(model.base_log_prob(s) + logabsdet).mean()
