"""The dense normalizing flow as a ``torch.nn.Module`` composed of relgrad's layers.

Row-batch convention (as in ``nn.Linear``): ``Y_k = Z_{k-1} W_k^T + b_k``, ``Z_k = sigma(Y_k)`` for
``k < L`` and ``s = Y_L`` (the last layer is affine).  The model works on any device, in float32 or
float64 (half precision through ``torch.autocast``); every tensor it returns has the model's dtype and
device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.distributions import Distribution

from ..errors import CheckpointError, ShapeError
from ..utils import check_batch, check_finite, select_device
from .activation import DEFAULT_ALPHA, sigma
from .nn import (GeneratorLike, RelativeLinear, SmoothLeakyReLU, as_generator, check_parameter_dtype, check_rule,
                 pick_rng)

__all__ = ["DenseFlow", "Trace", "LogLikelihoodTerms"]

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


class DenseFlow(nn.Module):
    """Dense normalizing flow: L :class:`~relgrad.torch.RelativeLinear` layers with a
    :class:`~relgrad.torch.SmoothLeakyReLU` between them, and a base distribution.

    Args:
        dim: data dimension D.
        n_layers: number of affine layers L (the last one has no activation).
        alpha: negative slope of the smooth leaky ReLU, in (0, 1).
        rng: torch.Generator, int seed, or None (torch's global generator) for the initialisation
            (``generator=`` is accepted as an alias: the torch spelling; the NumPy twin says ``rng``).
        device: "cpu", "cuda", "cuda:N", "auto" or None (= "auto"); "cuda" without a GPU raises DeviceError.
        dtype: float32 (default) or float64; half precision goes through ``torch.autocast``, not here.
        rule: the gradient rule of every layer in training ("relative", "authors", "mixed", "ordinary", "autodiff").
        base: a ``torch.distributions.Distribution`` over s, either of event shape (D,) or with D (or 1)
            independent scalar components; None (default) is the standard normal N(0, I).  It must live on
            the model's device; a base with learnable parameters is not moved by ``.to()``.

    Initialisation: orthogonal weights (Haar), zero biases, so the initial flow is volume preserving.

    ``forward(x, rule=None)`` returns ``(s, logabsdet)`` like any flow layer; training goes through it
    (``training_loss`` calls the model), so DistributedDataParallel, ``torch.compile`` and hooks see the
    step.  ``log_prob``/``log_likelihood`` are exact in any mode.

    Shapes:
        layers: L RelativeLinear (weight (D, D), bias (D,)); weights/biases: L parameters each.

    Examples:
        >>> import torch, relgrad.torch as rt
        >>> flow = rt.DenseFlow(3, n_layers=2, rng=0, device="cpu")   # default "auto": CUDA if present
        >>> x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
        >>> s, logabsdet = flow(x)
        >>> s.shape, logabsdet.shape
        (torch.Size([8, 3]), torch.Size([8]))
        >>> torch.allclose(flow.inverse(s), x, atol=1e-5)
        True

        In evaluation mode ``logabsdet`` is exact, so adding the base log-density of ``s`` gives
        :meth:`log_prob`:

        >>> _ = flow.eval()
        >>> s, logabsdet = flow(x)
        >>> torch.allclose(flow.base_log_prob(s) + logabsdet, flow.log_prob(x), atol=1e-5)
        True
    """

    def __init__(
        self,
        dim: int,
        n_layers: int = 2,
        *,
        alpha: float = DEFAULT_ALPHA,
        rng: GeneratorLike = None,
        device: Optional[Union[str, torch.device]] = None,
        dtype: torch.dtype = torch.float32,
        rule: str = "relative",
        base: Optional[Distribution] = None,
        generator: GeneratorLike = None,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("n_layers", n_layers)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        check_parameter_dtype(dtype, "DenseFlow parameters")
        self.dim = int(dim)
        self.n_layers = int(n_layers)
        self.rule = check_rule(rule)
        dev = torch.device(select_device(None if device is None else str(device)))
        gen = as_generator(pick_rng(rng, generator))
        self.layers = nn.ModuleList(
            [RelativeLinear(self.dim, True, rule, rng=gen, device=dev, dtype=dtype) for _ in range(self.n_layers)]
        )
        for k, layer in enumerate(self.layers):
            layer.where = f"layer {k + 1} of {self.n_layers}"
        self.activation = SmoothLeakyReLU(alpha)
        self.base = _check_base(base, self.dim)
        # (dim, n_layers, alpha) as a float64 buffer: saved by state_dict(), checked when one is loaded.
        self.register_buffer("config", torch.tensor([self.dim, self.n_layers, self.alpha], dtype=torch.float64, device=dev))

    # ----------------------------------------------------------------------------------- properties
    @property
    def alpha(self) -> float:
        """The smooth leaky ReLU's slope."""
        return self.activation.alpha

    @property
    def weights(self) -> Tuple[nn.Parameter, ...]:
        """The L weight matrices (D, D), first layer first (views of ``layers[k].weight``)."""
        return tuple(layer.weight for layer in self.layers)

    @property
    def biases(self) -> Tuple[nn.Parameter, ...]:
        """The L biases (D,), first layer first."""
        return tuple(layer.bias for layer in self.layers)

    @property
    def device(self) -> torch.device:
        """The device of the parameters."""
        return self.layers[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the parameters."""
        return self.layers[0].weight.dtype

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, n_layers={self.n_layers}, alpha={self.alpha}, rule={self.rule!r}, "
                f"dtype={self.dtype}, device={self.device}")

    # ----------------------------------------------------------------------------------- state dict
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # State dicts written before the layers were modules ("weights.k", "biases.k", no config buffer).
        for k in range(self.n_layers):
            for old, new in ((f"weights.{k}", f"layers.{k}.weight"), (f"biases.{k}", f"layers.{k}.bias")):
                if prefix + old in state_dict and prefix + new not in state_dict:
                    state_dict[prefix + new] = state_dict.pop(prefix + old)
        # dim, n_layers and alpha travel with state_dict() (the "config" buffer): another architecture or
        # another alpha fails loudly instead of loading into the wrong model.
        config = state_dict.get(prefix + "config")
        if config is not None:
            want = dict(zip(("dim", "n_layers", "alpha"), config.double().tolist()))
            for name, value in want.items():
                if not math.isclose(float(getattr(self, name)), value, rel_tol=1e-6, abs_tol=0.0):  # float32 after .float()
                    raise CheckpointError(
                        f"state dict has {name}={value:g} but the model has {name}={getattr(self, name)!r}"
                    )
        elif any(key.startswith(prefix + "layers.") for key in state_dict):
            state_dict[prefix + "config"] = self.config.clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ----------------------------------------------------------------------------------- input handling
    def _batch(self, x: Union[torch.Tensor, np.ndarray], name: str = "x") -> torch.Tensor:
        """Validate a batch (shape and finiteness) and move it to the model's dtype and device.

        Shapes:
            x: (M, D); returns (M, D).
        """
        x = self._shaped(x, name)
        check_finite(bool(torch.isfinite(x).all()), name)
        return x

    def _shaped(self, x: Union[torch.Tensor, np.ndarray], name: str = "x") -> torch.Tensor:
        # Shape check and conversion only: nothing that reads tensor values (no device sync, compile-friendly).
        x = torch.as_tensor(x)
        check_batch(tuple(x.shape), self.dim, name)
        return x.to(device=self.device, dtype=self.dtype)

    def base_log_prob(self, s: torch.Tensor) -> torch.Tensor:
        """``log p_s(s)`` per sample, summed over the D components.

        Shapes:
            s: (M, D); returns (M,).
        """
        if self.base is None:
            return standard_normal_log_prob(s)
        lp = self.base.log_prob(s)
        return lp.sum(dim=-1) if lp.dim() == s.dim() else lp

    # ----------------------------------------------------------------------------------- passes
    def _pass(self, x: torch.Tensor, rule: Optional[str]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(s, sum of the activations' log sigma', sum of the layers' log|det W|) per sample."""
        z, act, lin = x, None, None
        for k, layer in enumerate(self.layers):
            y, r = layer(z, rule)
            lin = r if lin is None else lin + r
            if k < self.n_layers - 1:
                z, a = self.activation(y)
                act = a if act is None else act + a
        s = y if y.dtype == self.dtype else y.to(self.dtype)  # autocast: the base density in full precision
        return s, (torch.zeros_like(lin) if act is None else act), lin

    def forward(self, x: torch.Tensor, rule: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(s, logabsdet)``: the flow ``s = g(x)`` and ``log|det dg/dx|`` per sample.

        ``logabsdet`` carries each layer's rule in training mode (zero-valued stand-ins for
        relative/authors/mixed/ordinary) and is exact in evaluation mode; ``rule=`` overrides the layers' rule.
        The batch's shape is checked, its values are not (no device synchronisation): use
        :meth:`log_prob` or ``training_loss(..., check=True)`` for checked input.

        Shapes:
            x: (M, D); returns s (M, D) and logabsdet (M,).
        """
        s, act, lin = self._pass(self._shaped(x), rule)
        return s, act + lin

    def _trace(self, x: torch.Tensor) -> Trace:
        # Unchecked pass, for callers that validated x already (deltas).
        zs, ys = [], []
        z = x
        for k, layer in enumerate(self.layers):
            zs.append(z)
            y = torch.nn.functional.linear(z, layer.weight, layer.bias)
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

    def _inverse(self, s: torch.Tensor) -> torch.Tensor:
        z = s
        for k in reversed(range(self.n_layers)):
            if k < self.n_layers - 1:
                z = self.activation.inverse(z)[0]
            z = self.layers[k].inverse(z)[0]
        return z

    @torch.no_grad()
    def inverse(self, s: torch.Tensor) -> torch.Tensor:
        """The inverse flow x = g^{-1}(s): one LU solve per layer plus the Newton inverse of sigma.

        Costs O(D^3) per layer once per value of the weights (the LU factorisation is cached), not per sample.
        Unlike the layers' ``inverse``, it returns ``x`` alone (no log-determinant).

        Shapes:
            s: (M, D); returns x (M, D).

        Examples:
            >>> import torch, relgrad.torch as rt
            >>> flow = rt.DenseFlow(3, n_layers=3, rng=0, device="cpu")
            >>> x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
            >>> torch.allclose(flow.inverse(flow(x)[0]), x, atol=1e-5)
            True
        """
        z = self._batch(s, "s")
        for layer in self.layers:  # raise SingularWeightError naming the first bad layer before any solve
            layer.factorisation()
        return self._inverse(z)

    def _base_draw(self, shape: Tuple[int, ...], generator: GeneratorLike, reparam: bool) -> torch.Tensor:
        gen = as_generator(generator)
        if self.base is None:
            device = self.device if gen is None else gen.device
            return torch.randn(*shape, self.dim, generator=gen, dtype=self.dtype, device=device).to(self.device)
        draw = self.base.rsample if reparam else self.base.sample
        if gen is None:
            out = draw(torch.Size(shape))
        else:  # torch.distributions take no generator: draw under a private RNG state seeded from it
            seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device))
            with torch.random.fork_rng(devices=[] if self.device.type == "cpu" else [self.device]):
                torch.manual_seed(seed)
                out = draw(torch.Size(shape))
        out = out.expand(*shape, self.dim) if out.shape[-1:] != (self.dim,) else out
        return out.to(device=self.device, dtype=self.dtype)

    @staticmethod
    def _shape(sample_shape: Union[int, Sequence[int], torch.Size]) -> Tuple[int, ...]:
        if isinstance(sample_shape, (int, np.integer)) and not isinstance(sample_shape, bool):
            sample_shape = (int(sample_shape),)
        try:
            shape = tuple(int(n) for n in sample_shape)  # type: ignore[union-attr]
        except TypeError:
            raise ValueError(f"sample_shape must be a positive int or a tuple of them, got {sample_shape!r}") from None
        if not shape or any(n < 1 for n in shape) or isinstance(sample_shape, bool):
            raise ValueError(f"n must be a positive int (or a tuple of positive ints), got {sample_shape!r}")
        return shape

    @torch.no_grad()
    def sample(self, n: Union[int, Sequence[int], torch.Size] = 1, rng: GeneratorLike = None, *,
               generator: GeneratorLike = None) -> torch.Tensor:
        """Draw samples: the base distribution pushed through :meth:`inverse`.

        ``n``: an int (returns (n, D)) or a ``sample_shape`` tuple (returns sample_shape + (D,)).
        ``rng`` (alias ``generator``): torch.Generator or int seed (an int draws on the CPU, so CPU and
        GPU give the same samples), or None (torch's global generator on the model's device).

        Shapes:
            returns (n, D) (or sample_shape + (D,)) with the model's dtype and device.

        Examples:
            >>> import torch, relgrad.torch as rt
            >>> flow = rt.DenseFlow(3, rng=0)
            >>> flow.sample(5, rng=0).shape
            torch.Size([5, 3])
            >>> flow.sample((2, 4), rng=1).shape
            torch.Size([2, 4, 3])
            >>> torch.equal(flow.sample(5, rng=0), flow.sample(5, rng=0))     # an int seed: reproducible
            True
        """
        shape = self._shape(n)
        s = self._base_draw(shape, pick_rng(rng, generator), reparam=False).reshape(-1, self.dim)
        return self.inverse(s).reshape(*shape, self.dim)

    def rsample(self, sample_shape: Union[int, Sequence[int], torch.Size] = 1, rng: GeneratorLike = None, *,
                generator: GeneratorLike = None) -> torch.Tensor:
        """Reparameterised samples: differentiable in the parameters (reverse-KL / variational training).

        The inverse runs with autograd: ``torch.linalg.solve`` per layer and the Newton inverse of sigma
        with its implicit-function gradient.  Costs one O(D^3) solve per layer per call.

        Shapes:
            returns sample_shape + (D,).
        """
        shape = self._shape(sample_shape)
        s = self._base_draw(shape, pick_rng(rng, generator), reparam=True).reshape(-1, self.dim)
        for layer in self.layers:
            layer.factorisation()  # the singularity check, with its clear error
        return self._inverse(s).reshape(*shape, self.dim)

    # ----------------------------------------------------------------------------------- likelihood
    def logdet_weights(self) -> torch.Tensor:
        """Per-layer ``log|det W_k|`` (an explicit evaluation: one LU per layer, cached per value of W_k).

        Raises SingularWeightError naming the layer ("layer k of L") when W_k has NaN/inf entries, a zero
        determinant, or a condition number beyond 1/eps of the dtype (its log-det would be meaningless).
        Differentiable (slogdet) when grad is enabled.

        Shapes:
            returns (L,).
        """
        return torch.stack([layer.logabsdet() for layer in self.layers])

    def log_likelihood_terms(self, x: torch.Tensor) -> LogLikelihoodTerms:
        """The three terms of the exact log-likelihood of each sample (differentiable).

        Shapes:
            x: (M, D); returns a LogLikelihoodTerms with three (M,) tensors.
        """
        for layer in self.layers:
            layer.factorisation()  # condition check first, naming the layer (cached per value of W)
        s, act, lin = self._pass(self._batch(x), "exact")
        return LogLikelihoodTerms(base=self.base_log_prob(s), activation=act, logdet=lin)

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """Exact per-sample log p(x) in nats (differentiable unless grad is disabled).

        Shapes:
            x: (M, D); returns (M,).
        """
        return self.log_likelihood_terms(x).total()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` per sample, exact (the ``torch.distributions`` name of :meth:`log_likelihood`).

        Shapes:
            x: (M, D); returns (M,).

        Examples:
            One orthogonal layer with zero bias (the initialisation) preserves volume and the norm, so
            ``log p(x)`` is the standard normal's, ``-log(2 pi)`` at the origin in 2-D:

            >>> import torch, relgrad.torch as rt
            >>> flow = rt.DenseFlow(2, n_layers=1, rng=0)
            >>> round(flow.log_prob(torch.zeros(1, 2)).item(), 4)
            -1.8379
            >>> flow.log_prob(torch.randn(8, 2, generator=torch.Generator().manual_seed(1))).shape
            torch.Size([8])
        """
        return self.log_likelihood(x)


def _check_base(base: Optional[Distribution], dim: int) -> Optional[Distribution]:
    if base is None:
        return None
    if not isinstance(base, Distribution):
        raise TypeError(f"base must be a torch.distributions.Distribution or None, got {type(base).__name__}")
    shape = tuple(base.batch_shape) + tuple(base.event_shape)
    if shape not in ((), (dim,), (1,)):
        raise ShapeError(
            f"base has batch_shape {tuple(base.batch_shape)} and event_shape {tuple(base.event_shape)}; "
            f"relgrad needs a distribution over R^{dim}: event_shape ({dim},), or {dim} (or 1) independent "
            "scalar components (e.g. torch.distributions.Laplace(torch.zeros(D), torch.ones(D)))"
        )
    return base
