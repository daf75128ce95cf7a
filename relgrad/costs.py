"""The cost model of one training step, in GEMM floating-point operations (DESIGN §4).

Only matrix products are counted (2·m·n·k for an m×k by k×n product); elementwise work, O(L·M·D), and the
optimiser, O(L·D²), are left out.  ``L`` layers of width ``D``, batch of ``M`` samples.  The first layer
needs no gradient with respect to its input, hence the "−2".
"""

from __future__ import annotations

__all__ = [
    "flops_plain", "flops_relative", "flops_authors", "flops_ordinary", "flops_lu", "step_flops", "crossover_dim",
]


def flops_plain(n_layers: int, batch: int, dim: int) -> float:
    """Backpropagation through the same MLP without any log-determinant term: (6L − 2)·M·D².

    Per layer: forward 2MD², gradient w.r.t. the input 2MD² (not for the first layer), w.r.t. W 2MD².
    """
    return (6 * n_layers - 2) * batch * dim**2


def flops_relative(n_layers: int, batch: int, dim: int) -> float:
    """The tight relative gradient, ``Δᵀ (Y₀ W)`` per layer: (8L − 2)·M·D² (one extra M×D×D product per layer)."""
    return (8 * n_layers - 2) * batch * dim**2


def flops_authors(n_layers: int, batch: int, dim: int) -> float:
    """The published code's evaluation order, ``Δᵀ ((Z Wᵀ) W)``: it recomputes Z Wᵀ, so (10L − 2)·M·D²."""
    return (10 * n_layers - 2) * batch * dim**2


def flops_lu(n_layers: int, batch: int, dim: int) -> float:
    """An LU-parameterised layer applied as two triangular-masked GEMMs (nflows' LULinear): (12L − 2)·M·D².

    Per layer: forward 2·2MD² (U, then L), gradients of L and U 2·2MD², gradient through L to the
    intermediate 2MD² and through U to the input 2MD² (not for the first layer).
    """
    return (12 * n_layers - 2) * batch * dim**2


def flops_ordinary(n_layers: int, batch: int, dim: int) -> float:
    """Backprop plus the explicit log-determinant gradient W⁻ᵀ per layer: (6L − 2)·M·D² + (8/3)·L·D³.

    The D³ term counts an LU factorisation (⅔D³) and the solve for the inverse (2D³).
    """
    return flops_plain(n_layers, batch, dim) + 8.0 / 3.0 * n_layers * dim**3


def step_flops(method: str, n_layers: int, batch: int, dim: int) -> float:
    """GEMM flops of one training step of a benchmark method (``"autodiff"`` is counted as ``"ordinary"``:
    an LU in slogdet's forward and a solve for W⁻ᵀ in its backward; ``"gemm"`` runs the relative step's GEMMs).
    """
    table = {
        "plain": flops_plain, "relative": flops_relative, "gemm": flops_relative, "authors": flops_authors,
        "ordinary": flops_ordinary, "autodiff": flops_ordinary, "lu": flops_lu,
    }
    if method not in table:
        raise ValueError(f"no FLOP model for method {method!r}; known: {', '.join(table)}")
    return table[method](n_layers, batch, dim)


def crossover_dim(n_layers: int, batch: int) -> float:
    """The width D* above which the relative step needs fewer FLOPs than the ordinary one: D* ≈ ¾·M.

    Solves (8/3)·L·D³ = 2·L·M·D² (the relative step's extra 2LMD² against the inverse's (8/3)LD³).
    """
    return 0.75 * batch
