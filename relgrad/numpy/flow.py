"""The dense normalizing flow of Gresele et al. (2020) in pure NumPy.

Column-vector maths (DESIGN section 4), row-batch code (one sample per row, as ``nn.Linear``):

    z_0 = x;   y_k = W_k z_{k-1} + b_k   (code: Y_k = Z_{k-1} W_k^T + b_k);   z_k = sigma(y_k) for k < L;   s = y_L.

    log p(x) = sum_i log N(s_i; 0, 1)  +  sum_{k<L} sum_i log sigma'(y_{k,i})  +  sum_k log|det W_k|
               (base term L_p)            (activation term L_J^1)               (parameter-only term L_J^2)

Layers are numbered from 1 in messages and in the maths, from 0 in the Python lists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from ..errors import SingularWeightError
from ..utils import as_generator, check_alpha, check_batch, check_finite
from .activation import DEFAULT_ALPHA, log_sigma_prime, sigma, sigma_inverse

__all__ = ["DenseFlow", "Trace", "LogLikelihoodTerms"]

_LOG_2PI = math.log(2.0 * math.pi)


@dataclass
class Trace:
    """Everything the forward pass computed that backpropagation needs.

    Shapes:
        zs: L arrays ``(M, D)``, the layer inputs z_0 = x, z_1, ..., z_{L-1};
        ys: L arrays ``(M, D)``, the pre-activations y_1, ..., y_L;
        s:  ``(M, D)``, the output y_L (the last layer has no nonlinearity).
    """

    zs: List[np.ndarray]
    ys: List[np.ndarray]

    @property
    def s(self) -> np.ndarray:
        """The flow's output s = y_L, shape ``(M, D)``."""
        return self.ys[-1]


@dataclass
class LogLikelihoodTerms:
    """The three terms of the per-sample log-likelihood, in nats.

    Shapes:
        base: ``(M,)`` sum_i log N(s_i; 0, 1);
        activation: ``(M,)`` sum_{k<L} sum_i log sigma'(y_{k,i});
        logdet: ``(M,)`` sum_k log|det W_k| (the same number for every sample, broadcast);
        total(): ``(M,)`` their sum, log p(x).
    """

    base: np.ndarray
    activation: np.ndarray
    logdet: np.ndarray

    def total(self) -> np.ndarray:
        """log p(x) per sample, shape ``(M,)``."""
        return self.base + self.activation + self.logdet


def _orthogonal(dim: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-random orthogonal matrix: QR of a Gaussian matrix, with the signs of R's diagonal moved into Q.

    Without the sign fix, QR's sign convention would bias the distribution of Q.

    Shapes:
        returns ``(dim, dim)``.
    """
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


class DenseFlow:
    """L fully connected invertible layers with the smooth leaky ReLU between them (none after the last).

    Args:
        dim: data dimension D (every layer is D x D).
        n_layers: number of affine layers L (L = 1 is an affine flow, i.e. a Gaussian model).
        alpha: slope parameter of the activation, strictly between 0 and 1.
        rng: ``np.random.Generator``, int seed or ``None``; used only for the initial weights.
        dtype: floating dtype of the parameters and of every computation (float64 by default).

    Initialisation: orthogonal W_k (well conditioned, ``|det W_k| = 1``), zero b_k.
    The parameter arrays are updated in place by optimisers and never re-bound, so references taken by
    ``parameters()`` stay valid for the lifetime of the model.

    Shapes:
        weights: L arrays ``(D, D)``; biases: L arrays ``(D,)``.

    Examples:
        Calling the model is :meth:`forward`, which returns ``s`` alone (the torch twin's forward returns
        ``(s, logabsdet)``):

        >>> import numpy as np
        >>> from relgrad.numpy import DenseFlow
        >>> flow = DenseFlow(3, n_layers=2, rng=0)
        >>> x = np.random.default_rng(1).standard_normal((8, 3))
        >>> s = flow(x)
        >>> s.shape, flow.log_prob(x).shape, flow.sample(5, rng=0).shape
        ((8, 3), (8,), (5, 3))
        >>> np.allclose(flow.inverse(s), x)
        True

        One orthogonal layer with zero bias (the initialisation) keeps the standard normal density,
        ``-log(2 pi)`` at the origin in 2-D:

        >>> round(float(DenseFlow(2, n_layers=1, rng=0).log_prob(np.zeros((1, 2)))[0]), 4)
        -1.8379
    """

    def __init__(
        self,
        dim: int,
        n_layers: int = 2,
        *,
        alpha: float = DEFAULT_ALPHA,
        rng: "np.random.Generator | int | None" = None,
        dtype: DTypeLike = np.float64,
    ) -> None:
        for name, value in (("dim", dim), ("n_layers", n_layers)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.dtype = np.dtype(dtype)
        if not np.issubdtype(self.dtype, np.floating):
            raise ValueError(f"dtype must be a floating type, got {self.dtype}")
        self.dim, self.n_layers, self.alpha = int(dim), int(n_layers), check_alpha(alpha)
        gen = as_generator(rng)
        self.weights: List[np.ndarray] = [_orthogonal(self.dim, gen).astype(self.dtype) for _ in range(self.n_layers)]
        self.biases: List[np.ndarray] = [np.zeros(self.dim, dtype=self.dtype) for _ in range(self.n_layers)]

    def __repr__(self) -> str:
        return f"DenseFlow(dim={self.dim}, n_layers={self.n_layers}, alpha={self.alpha}, dtype={self.dtype})"

    def parameters(self) -> List[np.ndarray]:
        """The parameter arrays themselves (not copies): all weights, then all biases.

        (The torch twin's ``parameters()`` goes layer by layer, ``W_1, b_1, W_2, ...``, as its layers are
        modules: copy between the twins by ``weights[k]`` / ``biases[k]``, not by position.)

        Shapes:
            returns L arrays ``(D, D)`` followed by L arrays ``(D,)``.
        """
        return [*self.weights, *self.biases]

    # ------------------------------------------------------------------ forward direction
    def _batch(self, x: ArrayLike, name: str) -> np.ndarray:
        """Validate a batch (shape, finiteness) and return it as a C-contiguous array of the model's dtype."""
        x = np.asarray(x)
        check_batch(x.shape, self.dim, name)
        x = np.ascontiguousarray(x, dtype=self.dtype)  # contiguous rows keep the GEMMs on the fast BLAS path
        check_finite(bool(np.isfinite(x).all()), name)
        return x

    def trace(self, x: ArrayLike) -> Trace:
        """Forward pass that keeps every layer input and pre-activation (what backpropagation needs).

        Shapes:
            x: ``(M, D)``; returns a :class:`Trace` of L inputs and L pre-activations, each ``(M, D)``.
        """
        z = self._batch(x, "x")
        zs, ys = [], []
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            zs.append(z)
            y = z @ w.T  # row form of W z; w.T is a view, BLAS reads it transposed without a copy
            y += b
            ys.append(y)
            if k < self.n_layers - 1:
                z = sigma(y, self.alpha)
        return Trace(zs=zs, ys=ys)

    def forward(self, x: ArrayLike) -> np.ndarray:
        """The flow g(x) = s.

        Shapes:
            x: ``(M, D)``; returns s ``(M, D)``.
        """
        return self.trace(x).s

    __call__ = forward

    # ------------------------------------------------------------------ exact evaluation (O(D^3) per layer)
    def _check_weight(self, k: int) -> None:
        """Raise :class:`~relgrad.errors.SingularWeightError` naming the layer (1-based) when W_{k+1} is not usable exactly.

        That is: W has NaN/inf entries, or its condition number exceeds 1/eps (this includes det W = 0).
        Then neither log|det W| nor W^{-1} means anything in floating point.  The singular values cost an
        O(D^3) SVD, which is why only evaluation calls (never training steps) make this check.
        """
        w, where = self.weights[k], f"layer {k + 1} of {self.n_layers}"
        if not np.isfinite(w).all():
            raise SingularWeightError(f"weight matrix of {where} contains NaN or infinite entries")
        sv = np.linalg.svd(w, compute_uv=False)
        if not sv[-1] > np.finfo(w.dtype).eps * sv[0]:  # cond > 1/eps without dividing; W = 0 fails too
            cond = sv[0] / sv[-1] if sv[-1] > 0 else math.inf
            raise SingularWeightError(
                f"weight matrix of {where} is singular to {w.dtype} precision (condition number {cond:.3g}); "
                "its log-determinant and inverse are undefined"
            )

    def logdet_weights(self) -> np.ndarray:
        """Per-layer log|det W_k| via slogdet (the parameter-only term L_J^2; an O(D^3) evaluation call).

        Each layer is checked first, so a singular or non-finite W_k raises
        :class:`~relgrad.errors.SingularWeightError` ("layer k of L") instead of returning -inf or NaN.

        Shapes:
            returns ``(L,)``.
        """
        out = np.empty(self.n_layers, dtype=self.dtype)
        for k, w in enumerate(self.weights):
            self._check_weight(k)
            out[k] = np.linalg.slogdet(w)[1]
        return out

    def log_likelihood_terms(self, x: ArrayLike) -> LogLikelihoodTerms:
        """The three terms of log p(x) per sample (base, activation, log-det), in nats.

        Shapes:
            x: ``(M, D)``; each field of the result is ``(M,)``.
        """
        base, activation = self._data_terms(self.trace(x))
        logdet = np.full(base.shape, self.logdet_weights().sum(), dtype=self.dtype)
        return LogLikelihoodTerms(base=base, activation=activation, logdet=logdet)

    def _data_terms(self, tr: Trace) -> "tuple[np.ndarray, np.ndarray]":
        """Per-sample base term L_p and activation term L_J^1 from a trace (the O(M D) part of log p(x)).

        Shapes:
            returns two arrays ``(M,)``.
        """
        s = tr.s
        base = -0.5 * np.einsum("md,md->m", s, s) - 0.5 * self.dim * _LOG_2PI
        activation = np.zeros(s.shape[0], dtype=self.dtype)
        for y in tr.ys[:-1]:  # the last layer is affine: no activation term
            activation += log_sigma_prime(y, self.alpha).sum(axis=1)
        return base, activation

    def log_likelihood(self, x: ArrayLike) -> np.ndarray:
        """Exact per-sample log p(x) in nats (an evaluation call: slogdet per layer, not for training steps).

        Shapes:
            x: ``(M, D)``; returns ``(M,)``.
        """
        return self.log_likelihood_terms(x).total()

    def log_prob(self, x: ArrayLike) -> np.ndarray:
        """``log p(x)`` per sample, exact (the ``torch.distributions`` name of :meth:`log_likelihood`).

        Shapes:
            x: ``(M, D)``; returns ``(M,)``.
        """
        return self.log_likelihood(x)

    # ------------------------------------------------------------------ inverse direction and sampling
    def inverse(self, s: ArrayLike) -> np.ndarray:
        """x = g^{-1}(s): undo each layer, from the last to the first (one D x D solve per layer).

        Shapes:
            s: ``(M, D)``; returns x ``(M, D)``.
        """
        y = self._batch(s, "s")
        for k in reversed(range(self.n_layers)):
            self._check_weight(k)  # a clear error instead of garbage for a singular W
            z = np.linalg.solve(self.weights[k], (y - self.biases[k]).T).T  # z = W^{-1}(y - b), all rows at once
            # the input of every layer but the first is sigma of the previous pre-activation
            y = sigma_inverse(z, self.alpha) if k > 0 else z
        return np.ascontiguousarray(y)

    def sample(self, n: "int | tuple" = 1, rng: "np.random.Generator | int | None" = None) -> np.ndarray:
        """Draw samples: standard normal s pushed through the inverse flow.

        ``n``: an int (returns ``(n, D)``) or a ``sample_shape`` tuple (returns ``sample_shape + (D,)``), as
        the torch twin.

        Shapes:
            returns ``(n, D)`` (or ``sample_shape + (D,)``) in the model's dtype.
        """
        shape = (n,) if isinstance(n, (int, np.integer)) and not isinstance(n, bool) else n
        try:
            shape = tuple(int(k) for k in shape) if not isinstance(shape, bool) else ()
        except TypeError:
            shape = ()
        if not shape or any(k < 1 for k in shape) or isinstance(n, bool):
            raise ValueError(f"n must be a positive int (or a tuple of positive ints), got {n!r}")
        s = as_generator(rng).standard_normal((int(np.prod(shape)), self.dim)).astype(self.dtype, copy=False)
        return self.inverse(s).reshape(*shape, self.dim)
