"""The cost model of one training step, in GEMM floating-point operations (DESIGN §4).

Only matrix products are counted (2·m·n·k for an m×k by k×n product); elementwise work, O(L·M·D), and the
optimiser, O(L·D²), are left out.  ``L`` layers of width ``D``, batch of ``M`` samples.  The first layer
needs no gradient with respect to its input, hence the "−2".
"""

from __future__ import annotations

__all__ = ["flops_plain", "flops_relative", "flops_ordinary", "crossover_dim"]


def flops_plain(n_layers: int, batch: int, dim: int) -> float:
    """Backpropagation through the same MLP without any log-determinant term: (6L − 2)·M·D².

    Per layer: forward 2MD², gradient w.r.t. the input 2MD² (not for the first layer), w.r.t. W 2MD².
    """
    return (6 * n_layers - 2) * batch * dim**2


def flops_relative(n_layers: int, batch: int, dim: int) -> float:
    """The tight relative gradient, ``Δᵀ (Y₀ W)`` per layer: (8L − 2)·M·D² (one extra M×D×D product per layer)."""
    return (8 * n_layers - 2) * batch * dim**2


def flops_ordinary(n_layers: int, batch: int, dim: int) -> float:
    """Backprop plus the explicit log-determinant gradient W⁻ᵀ per layer: (6L − 2)·M·D² + (8/3)·L·D³.

    The D³ term counts an LU factorisation (⅔D³) and the solve for the inverse (2D³).
    """
    return flops_plain(n_layers, batch, dim) + 8.0 / 3.0 * n_layers * dim**3


def crossover_dim(n_layers: int, batch: int) -> float:
    """The width D* above which the relative step needs fewer FLOPs than the ordinary one: D* ≈ ¾·M.

    Solves (8/3)·L·D³ = 2·L·M·D² (the relative step's extra 2LMD² against the inverse's (8/3)LD³).
    """
    return 0.75 * batch
