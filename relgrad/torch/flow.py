"""The dense normalizing flow as a ``torch.nn.Module``.

Row-batch convention (as in ``nn.Linear``): ``Y_k = Z_{k-1} W_k^T + b_k``, ``Z_k = sigma(Y_k)`` for
``k < L`` and ``s = Y_L`` (the last layer is affine).  The model works on any device and in any floating
dtype; every tensor it returns has the model's dtype and device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Union

import numpy as np
import torch
from torch import nn

from ..errors import SingularWeightError
from ..utils import check_alpha, check_batch, check_finite, select_device
from .activation import DEFAULT_ALPHA, log_sigma_prime, sigma, sigma_inverse

__all__ = ["DenseFlow", "Trace", "LogLikelihoodTerms"]

GeneratorLike = Union[torch.Generator, int, None]

_LOG_2PI = math.log(2.0 * math.pi)


@dataclass
class Trace:
    """The cached pass of a batch through the flow.

    Shapes:
        zs: L tensors (M, D): the layer inputs z_0 = x, z_1, ..., z_{L-1}.
        ys: L tensors (M, D): the pre-activations y_1, ..., y_L.
        s: (M, D): the output ``ys[-1]``.
    """

    zs: List[torch.Tensor]
    ys: List[torch.Tensor]

    @property
    def s(self) -> torch.Tensor:
        return self.ys[-1]


@dataclass
class LogLikelihoodTerms:
    """The three parts of the exact per-sample log-likelihood, in nats.

    Shapes:
        base: (M,) ``sum_i log N(s_i; 0, 1)``.
        activation: (M,) ``sum_{k<L} sum_i log sigma'(y_{k,i})``.
        logdet: (M,) ``sum_k log|det W_k|`` (one parameter-only number, broadcast over the batch).
    """

    base: torch.Tensor
    activation: torch.Tensor
    logdet: torch.Tensor

    def total(self) -> torch.Tensor:
        """Per-sample log p(x).  Shapes: returns (M,)."""
        return self.base + self.activation + self.logdet


def standard_normal_log_prob(s: torch.Tensor) -> torch.Tensor:
    """Log-density of a standard normal, summed over the last axis.

    Shapes:
        s: (M, D); returns (M,).
    """
    return -0.5 * (s * s).sum(dim=-1) - 0.5 * s.shape[-1] * _LOG_2PI


def _as_generator(generator: GeneratorLike) -> Optional[torch.Generator]:
    # None keeps torch's global generator, so torch.manual_seed / utils.seed_everything make it reproducible.
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(int(generator))
    raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")


def _gen_device(generator: Optional[torch.Generator]) -> torch.device:
    return torch.device("cpu") if generator is None else generator.device


def random_orthogonal(dim: int, generator: Optional[torch.Generator], dtype: torch.dtype) -> torch.Tensor:
    """A Haar-distributed orthogonal matrix: QR of a Gaussian with the signs of R's diagonal moved into Q.

    Shapes:
        returns (dim, dim), on the generator's device (CPU for the global generator).
    """
    g = torch.randn(dim, dim, generator=generator, dtype=torch.float64, device=_gen_device(generator))
    q, r = torch.linalg.qr(g)
    # Without the sign fix QR's convention biases the distribution (diag(R) > 0 is not Haar).
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    # LAPACK returns Q column-major; a row-major parameter keeps W and its gradient in one memory layout
    # (otherwise autograd copies every gradient into the parameter's strides and elementwise ops go strided).
    return (q * signs).to(dtype).contiguous()


class DenseFlow(nn.Module):
    """Dense normalizing flow: L invertible affine layers with smooth leaky ReLUs between them.

    Args:
        dim: data dimension D.
        n_layers: number of affine layers L (the last one has no activation).
        alpha: negative slope of the smooth leaky ReLU, in (0, 1).
        generator: torch.Generator, int seed, or None (torch's global generator) for the initialisation.
        device: "cpu", "cuda", "cuda:N", "auto" or None (= "auto"); "cuda" without a GPU raises DeviceError.
        dtype: floating dtype of the parameters (float32 by default; float64 for exact checks).

    Initialisation: orthogonal weights (Haar), zero biases, so the initial flow is volume preserving.

    Shapes:
        weights: L parameters (D, D); biases: L parameters (D,).
    """

    def __init__(
        self,
        dim: int,
        n_layers: int = 2,
        *,
        alpha: float = DEFAULT_ALPHA,
        generator: GeneratorLike = None,
        device: Optional[Union[str, torch.device]] = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("n_layers", n_layers)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        self.dim = int(dim)
        self.n_layers = int(n_layers)
        self.alpha = check_alpha(alpha)
        dev = torch.device(select_device(None if device is None else str(device)))
        gen = _as_generator(generator)
        self.weights = nn.ParameterList(
            [nn.Parameter(random_orthogonal(self.dim, gen, dtype).to(dev)) for _ in range(self.n_layers)]
        )
        self.biases = nn.ParameterList(
            [nn.Parameter(torch.zeros(self.dim, dtype=dtype, device=dev)) for _ in range(self.n_layers)]
        )

    # ----------------------------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        """The device of the parameters."""
        return self.weights[0].device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the parameters."""
        return self.weights[0].dtype

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_layers={self.n_layers}, alpha={self.alpha}, dtype={self.dtype}, device={self.device}"

    # ----------------------------------------------------------------------------------- input handling
    def _batch(self, x: Union[torch.Tensor, np.ndarray], name: str = "x") -> torch.Tensor:
        """Validate a batch (shape and finiteness) and move it to the model's dtype and device.

        Shapes:
            x: (M, D); returns (M, D).
        """
        x = torch.as_tensor(x)
        check_batch(tuple(x.shape), self.dim, name)
        x = x.to(device=self.device, dtype=self.dtype)
        check_finite(bool(torch.isfinite(x).all()), name)
        return x

    # ----------------------------------------------------------------------------------- passes
    def _trace(self, x: torch.Tensor) -> Trace:
        # Unchecked pass, for callers that validated x already (training steps, deltas).
        zs, ys = [], []
        z = x
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            zs.append(z)
            y = torch.nn.functional.linear(z, w, b)
            ys.append(y)
            if k < self.n_layers - 1:
                z = sigma(y, self.alpha)
        return Trace(zs=zs, ys=ys)

    def trace(self, x: torch.Tensor) -> Trace:
        """Run a batch through the flow keeping every layer input and pre-activation.

        Differentiable (autograd records it unless the caller disables grad).

        Shapes:
            x: (M, D); returns a Trace with L tensors (M, D) in ``zs`` and in ``ys``.
        """
        return self._trace(self._batch(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The flow g(x) = s.

        Shapes:
            x: (M, D); returns s (M, D).
        """
        return self.trace(x).s

    @torch.no_grad()
    def inverse(self, s: torch.Tensor) -> torch.Tensor:
        """The inverse flow x = g^{-1}(s): one linear solve per layer plus the Newton inverse of sigma.

        Costs O(D^3) per layer once per call (an LU factorisation), not per sample.

        Shapes:
            s: (M, D); returns x (M, D).
        """
        z = self._batch(s, "s")
        self.logdet_weights()  # raises SingularWeightError naming the layer before a solve can fail
        for k in reversed(range(self.n_layers)):
            if k < self.n_layers - 1:
                z = sigma_inverse(z, self.alpha)
            w, b = self.weights[k], self.biases[k]
            # Rows: Z W^T = Y - b  <=>  Z = (Y - b) W^{-T}, solved from the right without forming W^{-1}.
            z = torch.linalg.solve(w.T, z - b, left=False)
        return z

    @torch.no_grad()
    def sample(self, n: int, generator: GeneratorLike = None) -> torch.Tensor:
        """Draw n samples: standard normal base pushed through :meth:`inverse`.

        Shapes:
            returns (n, D) with the model's dtype and device.
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        gen = _as_generator(generator)
        s = torch.randn(int(n), self.dim, generator=gen, dtype=self.dtype, device=_gen_device(gen))
        return self.inverse(s.to(self.device))

    # ----------------------------------------------------------------------------------- likelihood
    def logdet_weights(self) -> torch.Tensor:
        """Per-layer ``log|det W_k|`` via slogdet (an explicit evaluation: O(D^3) per layer).

        Raises SingularWeightError naming the layer ("layer k of L") when W_k has NaN/inf entries, a zero
        determinant, or a condition number beyond 1/eps of the dtype (its log-det would be meaningless).

        Shapes:
            returns (L,).
        """
        out = []
        for k, w in enumerate(self.weights):
            _check_weight(w, k, self.n_layers)
            out.append(torch.linalg.slogdet(w).logabsdet)
        return torch.stack(out)

    def log_likelihood_terms(self, x: torch.Tensor) -> LogLikelihoodTerms:
        """The three terms of the exact log-likelihood of each sample (differentiable).

        Shapes:
            x: (M, D); returns a LogLikelihoodTerms with three (M,) tensors.
        """
        tr = self.trace(x)
        logdet = self.logdet_weights().sum()
        return self._terms_from_trace(tr, logdet)

    def _terms_from_trace(self, tr: Trace, logdet: torch.Tensor) -> LogLikelihoodTerms:
        base = standard_normal_log_prob(tr.s)
        act = torch.zeros_like(base)
        for y in tr.ys[:-1]:
            act = act + log_sigma_prime(y, self.alpha).sum(dim=-1)
        return LogLikelihoodTerms(base=base, activation=act, logdet=logdet.expand_as(base))

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """Exact per-sample log p(x) in nats (uses slogdet; differentiable unless grad is disabled).

        Shapes:
            x: (M, D); returns (M,).
        """
        return self.log_likelihood_terms(x).total()


def _check_weight(w: torch.Tensor, k: int, n_layers: int) -> None:
    """Raise SingularWeightError for a non-finite or numerically singular weight (layer k is 0-based)."""
    where = f"layer {k + 1} of {n_layers}"
    with torch.no_grad():
        if not bool(torch.isfinite(w).all()):
            raise SingularWeightError(f"weight matrix of {where} has NaN or infinite entries")
        sv = torch.linalg.svdvals(w)
        # cond = s_max / s_min > 1/eps, written without a division so that s_min == 0 is covered too.
        if not bool(sv[-1] > sv[0] * torch.finfo(w.dtype).eps):
            cond = (sv[0] / sv[-1]).item() if sv[-1] > 0 else math.inf
            raise SingularWeightError(
                f"weight matrix of {where} is singular to {w.dtype} precision (condition number {cond:.3g}); "
                "its log-determinant and inverse are undefined"
            )
