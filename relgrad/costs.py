"""The cost model of one training step, in GEMM floating-point operations (DESIGN §4).

Only matrix products are counted (2·m·n·k for an m×k by k×n product); elementwise work, O(L·M·D), and the
optimiser, O(L·D²), are left out.  ``L`` layers of width ``D``, batch of ``M`` samples.  The first layer
needs no gradient with respect to its input, hence the "−2".
"""

from __future__ import annotations

__all__ = [
    "flops_plain", "flops_relative", "flops_authors", "flops_ordinary", "flops_lu", "flops_jacobian", "step_flops",
    "crossover_dim", "JACOBIAN_STACKS_PER_LAYER", "JACOBIAN_STACKS_EXTRA", "jacobian_stack_bytes",
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


def flops_jacobian(n_layers: int, batch: int, dim: int) -> float:
    """Autodiff through the full per-sample Jacobian (``vmap(jacrev(g))`` + ``slogdet``, the benchmark's
    ``"jacobian"``): (6L − 2)·M·D³ + (6L − 2)·M·D² in matrix products, plus (8/3)·M·D³ for ``slogdet``.

    Building each sample's D×D Jacobian pushes D basis vectors back through the L layers (2LD³ per sample,
    the first layer included: dg/dx is the point); the outer ``backward()`` differentiates those L products
    with respect to the weights (2LD³) and to their D×D inputs (2(L − 1)D³, none for the constant basis).
    That is plain backpropagation's count (6L − 2) with D rows per sample instead of one; the pass for
    ``s = g(x)`` adds (6L − 2)·M·D².  ``slogdet`` adds an LU of every J_m (⅔D³) and a solve for J_m⁻ᵀ in its
    backward (2D³), which ``FlopCounterMode`` does not count.
    """
    L, M, D = n_layers, batch, float(dim)
    return (6 * L - 2) * M * D**2 * (D + 1) + 8.0 / 3.0 * M * D**3


#: Transient memory of one "jacobian" gradient, in M×D×D stacks: ``4·L + 1``.  Measured, not derived
#: (``python -m relgrad.bench.memory``, committed in ``relgrad/results/bench/cpu_jacobian_memory.csv``):
#: the peak resident-set growth of one gradient is 5.00, 9.00 and 13.00 stacks at L = 1, 2, 3
#: (D = 1024, M = 10, float32, ``jacrev``).
JACOBIAN_STACKS_PER_LAYER = 4
JACOBIAN_STACKS_EXTRA = 1


def jacobian_stack_bytes(n_layers: int, batch: int, dim: int, itemsize: int = 4) -> float:
    """Memory model of one "jacobian" gradient: (4L + 1) stacks of M×D×D numbers (bytes; ``itemsize`` 4 for
    float32, 8 for float64), on top of the model, its gradients and the optimiser's state.

    The constants are fitted to measurements (:data:`JACOBIAN_STACKS_PER_LAYER`); what the stacks are is
    autograd's business: the per-layer cotangent stacks that the outer backward needs, the stacked J and
    its LU, and the backward's J⁻ᵀ and gradients of the same size.
    """
    stacks = JACOBIAN_STACKS_PER_LAYER * n_layers + JACOBIAN_STACKS_EXTRA
    return float(stacks * batch * dim * dim * itemsize)


def step_flops(method: str, n_layers: int, batch: int, dim: int) -> float:
    """GEMM flops of one training step of a benchmark method (``"autodiff"`` is counted as ``"ordinary"``:
    an LU in slogdet's forward and a solve for W⁻ᵀ in its backward; ``"gemm"`` runs the relative step's GEMMs;
    ``"jacobian"`` is :func:`flops_jacobian`, its slogdet included; ``"relative-adam"`` is the relative gradient,
    its optimiser's own 6·L·M·D² GEMM flops left out like every optimiser's).
    """
    table = {
        "plain": flops_plain, "relative": flops_relative, "gemm": flops_relative, "authors": flops_authors,
        "ordinary": flops_ordinary, "autodiff": flops_ordinary, "lu": flops_lu, "jacobian": flops_jacobian,
        "relative-adam": flops_relative,
    }
    if method not in table:
        raise ValueError(f"no FLOP model for method {method!r}; known: {', '.join(table)}")
    return table[method](n_layers, batch, dim)


def crossover_dim(n_layers: int, batch: int) -> float:
    """The width D* above which the relative step needs fewer FLOPs than the ordinary one: D* ≈ ¾·M.

    Solves (8/3)·L·D³ = 2·L·M·D² (the relative step's extra 2LMD² against the inverse's (8/3)LD³).
    """
    return 0.75 * batch
