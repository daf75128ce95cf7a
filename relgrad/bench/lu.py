"""The "lu" baseline of the benchmark: the dense flow with LU-parameterised layers, as flow libraries build them.

Each layer is ``W_k = L_k U_k`` after a fixed random permutation of its input, with ``L`` unit lower
triangular and ``U`` upper triangular with diagonal ``softplus(d) + 1e-3`` (nflows' ``LULinear`` +
``RandomPermutation``).  Then ``log|det W_k| = sum log diag(U)`` costs O(D), and the layer is applied as two
triangular-masked GEMMs, ``(z U^T) L^T``: no O(D^3) work, but twice the GEMMs of a dense layer in the forward
pass and in the backward pass, plus the D x D masking passes.  The masks are applied with ``tril``/``triu``
and the unit and softplus diagonals without building a diagonal matrix, which is cheaper than nflows'
index scatter: the baseline is, if anything, favoured.

The function class differs from the unconstrained dense flow (``det W > 0`` after the permutation), so this
module is for timing, not for the book's likelihood comparisons.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..torch.activation import DEFAULT_ALPHA, log_sigma_prime, sigma
from ..torch.flow import standard_normal_log_prob

__all__ = ["LUDenseFlow"]

#: Lower bound added to softplus on U's diagonal (nflows' default ``eps``).
DIAG_EPS = 1e-3


class LUDenseFlow(nn.Module):
    """L LU-parameterised affine layers with the smooth leaky ReLU between them.

    Args:
        dim: data dimension D; n_layers: L; alpha: activation slope; generator: torch.Generator for the
        initialisation (entries uniform in ``+-1/sqrt(D)``, U's diagonal starting at 1); device, dtype.

    Shapes:
        lower, upper: L parameters (D, D) (only the strict triangles are used); diag, biases: L parameters (D,).
    """

    def __init__(self, dim: int, n_layers: int = 2, *, alpha: float = DEFAULT_ALPHA,
                 generator: Optional[torch.Generator] = None, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.dim, self.n_layers, self.alpha = dim, n_layers, alpha
        bound = 1.0 / math.sqrt(dim)

        def uniform(*shape: int) -> nn.Parameter:
            t = (2.0 * torch.rand(*shape, generator=generator, dtype=dtype) - 1.0) * bound
            return nn.Parameter(t.to(device))

        # softplus(d) + eps = 1 at the start, as in nflows
        d0 = math.log(math.expm1(1.0 - DIAG_EPS))
        self.lower = nn.ParameterList([uniform(dim, dim) for _ in range(n_layers)])
        self.upper = nn.ParameterList([uniform(dim, dim) for _ in range(n_layers)])
        self.diag = nn.ParameterList(
            [nn.Parameter(torch.full((dim,), d0, dtype=dtype, device=device)) for _ in range(n_layers)]
        )
        self.biases = nn.ParameterList(
            [nn.Parameter(torch.zeros(dim, dtype=dtype, device=device)) for _ in range(n_layers)]
        )
        perms = [torch.randperm(dim, generator=generator) for _ in range(n_layers)]
        for k, p in enumerate(perms):
            self.register_buffer(f"perm{k}", p.to(device))

    def _layer(self, k: int, z: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
        """``y = L U P z + b`` for a row batch, and ``log|det|`` of the layer.  Shapes: z (M, D) -> (M, D), ()."""
        z = z[:, getattr(self, f"perm{k}")]
        u_diag = torch.nn.functional.softplus(self.diag[k]) + DIAG_EPS
        h = torch.nn.functional.linear(z, torch.triu(self.upper[k], 1)) + z * u_diag  # z U^T
        y = torch.nn.functional.linear(h, torch.tril(self.lower[k], -1), self.biases[k]) + h  # h L^T + b
        return y, torch.log(u_diag).sum()

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood of a batch (exact: the log-determinant is a sum of logs).

        Shapes:
            x: (M, D); returns a scalar.
        """
        z, act, logdet = x, x.new_zeros(x.shape[0]), x.new_zeros(())
        for k in range(self.n_layers):
            y, ld = self._layer(k, z)
            logdet = logdet + ld
            if k < self.n_layers - 1:
                act = act + log_sigma_prime(y, self.alpha).sum(dim=-1)
                z = sigma(y, self.alpha)
        return -(standard_normal_log_prob(y) + act).mean() - logdet
