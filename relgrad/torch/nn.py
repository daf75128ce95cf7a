"""Relative-gradient layers: ``nn.Module``s a researcher drops into any flow.

Every layer follows the transform protocol of nflows / FrEIA / normflows: ``forward(x)`` returns
``(y, logabsdet)`` and ``inverse(y)`` returns ``(x, logabsdet_of_the_inverse)``, with ``logabsdet`` one
number per sample (shape ``(N,)``).  Compose them, sum the ``logabsdet``s, add a base log-density, and
minimise ``-mean(log p)`` with any ``torch.optim`` optimiser through an ordinary ``loss.backward()``.

* :class:`RelativeLinear` ``(features, bias=True, rule="relative")``: ``y = x W^T + b``.  In training
  mode its ``logabsdet`` is a zero-valued stand-in that carries the chosen gradient rule:

  - ``"relative"``: the strict relative gradient of the augmented matrix ``[[W, b], [0, 1]]``:
    ``.grad`` holds ``[G_W | g_b] Ahat^T Ahat - [W, b]``, O(M D^2), no inverse, no determinant;
  - ``"authors"``: the published code's rule (no ``-b`` on the bias), in its evaluation order;
  - ``"mixed"``: the weight's relative gradient ``Gamma_W W^T W`` alone, with ``Gamma_W`` the full ordinary
    weight gradient, and the bias's ordinary gradient (no coupling through ``Ahat^T Ahat``), O(M D^2);
  - ``"ordinary"``: the Euclidean gradient with an explicit ``W^{-T}`` (O(D^3) per step);
  - ``"autodiff"``: the exact ``log|det W|`` by ``slogdet``, differentiated by autograd (O(D^3) per step).

  In evaluation mode (``.eval()``) it returns the exact value, from one LU factorisation per parameter
  version (cached: evaluating many batches factorises once), differentiable by autograd when grad is on.
* :class:`SmoothLeakyReLU` ``(alpha)``: ``sigma(u) = alpha u + (1 - alpha) softplus(u)``, exact
  ``logabsdet`` (it is cheap), Newton inverse.
* :class:`RelativeConv1x1` ``(channels)``: Glow's invertible 1x1 convolution with the same stand-in,
  one row per pixel, so its weight in the loss is H W: relative step ``G W^T W - H W W`` in O(N H W C^2).

Layering: activation -> functions -> this module -> flow -> gradients -> train.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..errors import ShapeError, SingularWeightError
from ..training import METHODS
from ..utils import check_alpha, select_device
from .activation import DEFAULT_ALPHA, log_sigma_prime, sigma, sigma_inverse, sigma_prime
from .functions import AuthorsAffine, OrdinaryLogDet, RelativeAffine, sigma_and_log_det

__all__ = [
    "RULES", "check_rule", "RelativeLinear", "SmoothLeakyReLU", "RelativeConv1x1", "random_orthogonal",
    "as_generator", "pick_rng", "PARAMETER_DTYPES",
]

#: The gradient rules of :class:`RelativeLinear` (and of ``training_loss``'s ``method``).
RULES = METHODS
#: Parameter dtypes relgrad accepts.  Half precision is for activations, through ``torch.autocast``.
PARAMETER_DTYPES = (torch.float32, torch.float64)

GeneratorLike = Union[torch.Generator, int, None]


def check_rule(rule: str) -> str:
    """Return ``rule`` if it is one of :data:`RULES`, else raise ValueError listing them.

    Shapes:
        none (a string in, the same string out).
    """
    if rule not in RULES:
        raise ValueError(f"unknown gradient method {rule!r}; valid methods are {', '.join(RULES)}")
    return rule


def check_parameter_dtype(dtype: torch.dtype, what: str = "parameters") -> torch.dtype:
    """Refuse half / bfloat16 (and non-float) parameters with a message that points to autocast."""
    if dtype not in PARAMETER_DTYPES:
        hint = (" For mixed precision keep the parameters in float32 and run the forward pass under "
                "torch.autocast(device_type, dtype=torch.bfloat16 or torch.float16): relgrad's layers "
                "support it, and their log-determinants and inverses need float32/float64 linear algebra."
                if dtype in (torch.float16, torch.bfloat16) else "")
        raise TypeError(f"{what} must be float32 or float64, got {dtype}.{hint}")
    return dtype


def pick_rng(rng: GeneratorLike, generator: GeneratorLike) -> GeneratorLike:
    """``rng`` (the name both twins use) or ``generator`` (its torch spelling, accepted as an alias)."""
    if rng is not None and generator is not None:
        raise TypeError("pass the random source as rng= or as its alias generator=, not both")
    return rng if rng is not None else generator


def as_generator(generator: GeneratorLike) -> Optional[torch.Generator]:
    """A ``torch.Generator`` from a Generator, an int seed (a new CPU generator) or None (torch's global one)."""
    # None keeps torch's global generator, so torch.manual_seed / utils.seed_everything make it reproducible.
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(int(generator))
    raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")


def random_orthogonal(dim: int, generator: Optional[torch.Generator], dtype: torch.dtype) -> torch.Tensor:
    """A Haar-distributed orthogonal matrix: QR of a Gaussian with the signs of R's diagonal moved into Q.

    Shapes:
        returns (dim, dim), on the generator's device (CPU for the global generator).
    """
    device = torch.device("cpu") if generator is None else generator.device
    g = torch.randn(dim, dim, generator=generator, dtype=torch.float64, device=device)
    q, r = torch.linalg.qr(g)
    # Without the sign fix QR's convention biases the distribution (diag(R) > 0 is not Haar).
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    # LAPACK returns Q column-major; a row-major parameter keeps W and its gradient in one memory layout
    # (otherwise autograd copies every gradient into the parameter's strides and elementwise ops go strided).
    return (q * signs).to(dtype).contiguous()


# --------------------------------------------------------------------------------------------- exact algebra
class Factorisation(NamedTuple):
    """One LU factorisation of a weight and what is read from it.

    Shapes:
        lu: (D, D), pivots: (D,), logabsdet: () (a float tensor).
    """

    lu: torch.Tensor
    pivots: torch.Tensor
    logabsdet: torch.Tensor


def _inverse_norm1_estimate(lu: torch.Tensor, pivots: torch.Tensor) -> float:
    """Hager's estimate of ``||W^{-1}||_1`` from an LU factorisation (LAPACK's gecon idea): O(D^2) per step.

    A lower bound that is almost always within a factor 3 of the truth; a few triangular solves instead
    of an SVD, so the condition check reuses the one factorisation evaluation needs anyway.
    """
    n = lu.shape[-1]
    x = torch.full((n, 1), 1.0 / n, dtype=lu.dtype, device=lu.device)
    est = 0.0
    for it in range(5):
        y = torch.linalg.lu_solve(lu, pivots, x)
        new = float(y.abs().sum())
        if not math.isfinite(new):
            return math.inf
        if it > 0 and new <= est:
            break
        est = new
        sign = torch.where(y >= 0, 1.0, -1.0).to(lu.dtype)
        z = torch.linalg.lu_solve(lu, pivots, sign, adjoint=True)
        j = int(z.abs().argmax())
        if it > 0 and float(z.abs().max()) <= float((z * x).sum()):
            break
        x = torch.zeros_like(x)
        x[j] = 1.0
    return est


def factorise(weight: torch.Tensor, where: str = "the weight") -> Factorisation:
    """LU-factorise ``weight`` once: a condition check, ``log|det W|`` and solves all come from it.

    Raises SingularWeightError naming ``where`` when W has NaN/inf entries, a zero pivot, or an estimated
    condition number beyond 1/eps of its dtype (its log-determinant and inverse would be meaningless).

    Shapes:
        weight: (D, D); returns a Factorisation.
    """
    with torch.no_grad():
        w = weight.detach()
        if not bool(torch.isfinite(w).all()):
            raise SingularWeightError(f"weight matrix of {where} has NaN or infinite entries")
        try:
            lu, pivots, _ = torch.linalg.lu_factor_ex(w)
        except RuntimeError as err:  # torch.linalg.LinAlgError derives from RuntimeError
            raise SingularWeightError(f"weight matrix of {where} could not be factorised: {err}") from err
        diag = lu.diagonal().abs()
        cond = math.inf
        if bool(diag.min() > 0):
            cond = float(torch.linalg.matrix_norm(w, ord=1)) * _inverse_norm1_estimate(lu, pivots)
        if not cond * torch.finfo(w.dtype).eps < 1.0:
            raise SingularWeightError(
                f"weight matrix of {where} is singular to {w.dtype} precision (condition number {cond:.3g}); "
                "its log-determinant and inverse are undefined"
            )
        return Factorisation(lu, pivots, diag.log().sum())


def _same_values(saved: torch.Tensor, current: torch.Tensor) -> bool:
    # Exact comparison with a saved copy: O(D^2), versus the O(D^3) factorisation it saves.  The version
    # counter cannot be the key: fused optimisers (Adam(fused=True)) and .data writes do not bump it.
    try:
        return saved.shape == current.shape and saved.dtype == current.dtype and saved.device == current.device \
            and bool(torch.equal(saved, current))
    except Exception:  # functorch / fake tensors: no caching
        return False


def _functorch_wrapped(t: torch.Tensor) -> bool:
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))
    except AttributeError:  # older torch
        return False


# --------------------------------------------------------------------------------------------- layers
class RelativeLinear(nn.Module):
    """An invertible affine layer ``y = x W^T + b`` whose log-determinant trains with the relative gradient.

    Args:
        features: D (the layer is D -> D).
        bias: learn a bias ``b`` (True) or not.
        rule: the gradient its log-determinant carries in training: "relative" (strict, default),
            "authors", "mixed", "ordinary" or "autodiff" (see the module docstring).
        rng: torch.Generator, int seed or None (torch's global generator) for the initialisation
            (``generator=`` is accepted as an alias: the torch spelling; the NumPy twin says ``rng``).
        device, dtype: of the parameters; float32 or float64 (use ``torch.autocast`` for half precision).

    Initialisation: a Haar-random orthogonal W (volume preserving) and ``b = 0``.

    ``forward(x, rule=None)`` returns ``(y, logabsdet)``: in training mode ``logabsdet`` is a zero-valued
    stand-in (rules relative/authors/mixed/ordinary) or ``slogdet`` (autodiff); in evaluation mode the exact
    value.  An explicit ``rule=`` overrides both (``rule="exact"``: the checked exact value in any mode).
    Add ``logabsdet`` to the log-likelihood exactly once.

    Shapes:
        x: (N, D); returns y (N, D) and logabsdet (N,).  weight: (D, D), bias: (D,).

    Examples:
        A forward pass returns the output and one log-determinant per sample; the inverse undoes it:

        >>> import torch, relgrad.torch as rt
        >>> layer = rt.RelativeLinear(3, rng=0, device="cpu")     # default "auto": CUDA if present
        >>> x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
        >>> y, logabsdet = layer(x)
        >>> y.shape, logabsdet.shape
        (torch.Size([5, 3]), torch.Size([5]))
        >>> torch.allclose(layer.inverse(y)[0], x, atol=1e-5)
        True

        The stand-in's backward makes ``.grad`` the relative gradient: without a bias, the ordinary
        gradient (rule "ordinary") times ``W^T W``:

        >>> ordinary = rt.RelativeLinear(3, bias=False, rule="ordinary", rng=0, device="cpu")
        >>> relative = rt.RelativeLinear(3, bias=False, rng=0, device="cpu")   # the same seed: the same W
        >>> for lin in (ordinary, relative):
        ...     y, logabsdet = lin(x)
        ...     (0.5 * (y ** 2).sum(dim=1) - logabsdet).mean().backward()   # -mean log p, Gaussian base
        >>> W = relative.weight.detach()
        >>> torch.allclose(relative.weight.grad, ordinary.weight.grad @ W.T @ W, atol=1e-5)
        True
    """

    def __init__(
        self,
        features: int,
        bias: bool = True,
        rule: str = "relative",
        *,
        rng: GeneratorLike = None,
        device: Optional[Union[str, torch.device]] = None,
        dtype: torch.dtype = torch.float32,
        generator: GeneratorLike = None,
    ) -> None:
        super().__init__()
        if isinstance(features, bool) or not isinstance(features, (int, np.integer)) or features < 1:
            raise ValueError(f"features must be a positive int, got {features!r}")
        check_parameter_dtype(dtype)
        self.features = int(features)
        self.rule = check_rule(rule)
        dev = torch.device(select_device(None if device is None else str(device)))
        self.weight = nn.Parameter(random_orthogonal(self.features, as_generator(pick_rng(rng, generator)), dtype).to(dev))
        self.bias = nn.Parameter(torch.zeros(self.features, dtype=dtype, device=dev)) if bias else None
        self.where = "the weight"  # a container (DenseFlow) names the layer: "layer k of L"
        self._cache: Optional[Tuple[torch.Tensor, Factorisation]] = None  # (copy of W, its factorisation)

    def extra_repr(self) -> str:
        return f"features={self.features}, bias={self.bias is not None}, rule={self.rule!r}"

    # ----------------------------------------------------------------------------------- exact algebra
    def factorisation(self) -> Factorisation:
        """The LU factorisation of W, computed once per value of W and cached.

        The cache is checked against a saved copy of W (an O(D^2) comparison), so evaluating many batches
        between two optimiser steps factorises once, and any change to W (optimiser, ``.data``, a loaded
        state dict) is seen.

        Shapes:
            returns a Factorisation (lu (D, D), pivots (D,), logabsdet ()).
        """
        w = self.weight.detach()
        if self._cache is not None and _same_values(self._cache[0], w):
            return self._cache[1]
        fac = factorise(w, self.where)
        if not _functorch_wrapped(w):  # never keep a transform's tensor beyond the transform
            self._cache = (w.clone(), fac)
        return fac

    def logabsdet(self) -> torch.Tensor:
        """Exact ``log|det W|`` (a 0-d tensor): differentiable (slogdet) when grad is on, else cached LU.

        Shapes:
            returns ().
        """
        if torch.is_grad_enabled() and self.weight.requires_grad:
            self.factorisation()  # the condition check (cached), then a differentiable value
            return torch.linalg.slogdet(self.weight).logabsdet
        return self.factorisation().logabsdet

    # ----------------------------------------------------------------------------------- passes
    def _check_input(self, x: torch.Tensor) -> None:
        # Python-level checks only (shapes, dtypes): no device synchronisation, nothing torch.compile breaks on.
        if x.dim() != 2 or x.shape[-1] != self.features:
            raise ShapeError(f"{type(self).__name__} expects input of shape (N, {self.features}), got {tuple(x.shape)}")
        check_parameter_dtype(self.weight.dtype, f"{type(self).__name__} parameters")

    def _affine(self, x: torch.Tensor, rule: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """(y, per-row logabsdet of W) for rows x (M, D), with the given rule."""
        w, b = self.weight, self.bias
        if rule == "relative":
            return RelativeAffine.apply(x, w, b, "relative")
        if rule == "mixed":
            return RelativeAffine.apply(x, w, b, "mixed")
        if rule == "authors":
            return AuthorsAffine.apply(x, w, b)
        y = torch.nn.functional.linear(x, w, b)
        if rule == "ordinary":
            return y, OrdinaryLogDet.apply(w, x)
        if rule == "autodiff":  # a training step: slogdet and its autograd backward, no per-step condition check
            logdet = torch.linalg.slogdet(w).logabsdet
        else:  # "exact": checked, cached under no_grad, differentiable with grad on
            logdet = self.logabsdet()
        return y, logdet.expand(x.shape[0])

    def _rule(self, rule: Optional[str]) -> str:
        if rule is not None:
            return rule if rule == "exact" else check_rule(rule)
        return self.rule if self.training else "exact"  # evaluation: the exact value

    def forward(self, x: torch.Tensor, rule: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(x W^T + b, log|det W|)`` per sample; see the class docstring for what ``logabsdet`` carries.

        Shapes:
            x: (N, D); returns (N, D) and (N,).
        """
        self._check_input(x)
        return self._affine(x, self._rule(rule))

    def inverse(self, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``x = (y - b) W^{-T}`` and ``-log|det W|`` per sample (exact; differentiable when grad is on).

        One LU factorisation per value of W (cached) under ``torch.no_grad``; with grad on, a
        differentiable ``torch.linalg.solve`` (``rsample``).

        Shapes:
            y: (N, D); returns (N, D) and (N,).
        """
        self._check_input(y)
        r = y if self.bias is None else y - self.bias
        # Rows: X W^T = Y - b  <=>  X^T = W^{-1} (Y - b)^T, solved without forming W^{-1}.
        if torch.is_grad_enabled() and (self.weight.requires_grad or y.requires_grad):
            self.factorisation()
            x = torch.linalg.solve(self.weight, r.T).T
        else:
            fac = self.factorisation()
            x = torch.linalg.lu_solve(fac.lu, fac.pivots, r.T).T
        return x, (-self.logabsdet()).expand(y.shape[0])


class SmoothLeakyReLU(nn.Module):
    """The smooth leaky ReLU ``sigma(u) = alpha u + (1 - alpha) softplus(u)`` as a flow layer.

    A strictly increasing bijection with slope in ``(alpha, 1)``; its log-Jacobian is cheap, so
    ``forward`` always returns the exact value (in float32 at least, also under autocast).

    Shapes:
        x: (N, ...) any shape with a batch axis first; returns y of the same shape and logabsdet (N,)
        (the sum of ``log sigma'`` over all axes but the first).

    Examples:
        >>> import torch, relgrad.torch as rt
        >>> act = rt.SmoothLeakyReLU(alpha=0.3)
        >>> x = torch.linspace(-2.0, 2.0, 6).reshape(2, 3)
        >>> y, logabsdet = act(x)
        >>> torch.allclose(logabsdet, act.log_derivative(x).sum(dim=1))
        True
        >>> torch.allclose(act.inverse(y)[0], x, atol=1e-6)
        True
    """

    def __init__(self, alpha: float = DEFAULT_ALPHA) -> None:
        super().__init__()
        self.alpha = check_alpha(alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(sigma(x), sum log sigma'(x))`` per sample, one fused pass with a hand-written backward.

        Shapes:
            x: (N, ...); returns (N, ...) and (N,).
        """
        flat = x if x.dim() == 2 else x.reshape(x.shape[0], -1)
        y, logdet = sigma_and_log_det(flat, self.alpha)
        return y.reshape(x.shape), logdet

    def log_derivative(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise ``log sigma'(x)``.  Shapes: any shape; returns the same shape."""
        return log_sigma_prime(x, self.alpha)

    def inverse(self, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``sigma^{-1}(y)`` by safeguarded Newton (exact to rounding) and ``-sum log sigma'`` per sample.

        With grad on, the result is differentiable: one Newton correction from the detached root gives
        the implicit-function gradient ``1/sigma'(x)`` and leaves the value unchanged to rounding.

        Shapes:
            y: (N, ...); returns (N, ...) and (N,).
        """
        with torch.no_grad():
            x = sigma_inverse(y.detach(), self.alpha)
        if torch.is_grad_enabled() and y.requires_grad:
            x = x + (y - sigma(x, self.alpha)) / sigma_prime(x, self.alpha)
        logdet = log_sigma_prime(x, self.alpha).reshape(x.shape[0], -1).sum(dim=1)
        return x, -logdet


class RelativeConv1x1(nn.Module):
    """Glow's invertible 1x1 convolution, trained with the relative gradient (no LU parameterisation).

    The same map as :class:`RelativeLinear` applied to every pixel's channel vector; its log-determinant
    per image is ``H W log|det W|``.  The stand-in is one zero per pixel row, so in the backward its
    weight is ``H W`` automatically: the step is ``G W^T W - H W W`` (plus the bias terms), O(N H W C^2),
    with no C x C x C operation.  ``rule`` and evaluation mode behave as in :class:`RelativeLinear`.

    Args:
        channels: C.
        bias: learn a per-channel bias (default False: Glow puts an ActNorm next to it).
        rule: as :class:`RelativeLinear`; also ``rng`` (alias ``generator``), ``device`` and ``dtype``.

    Shapes:
        x: (N, C, H, W); returns y (N, C, H, W) and logabsdet (N,).  weight: (C, C), bias: (C,).

    Examples:
        >>> import math, torch, relgrad.torch as rt
        >>> conv = rt.RelativeConv1x1(4, rng=0, device="cpu")
        >>> x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
        >>> y, logabsdet = conv(x)
        >>> y.shape, logabsdet.shape
        (torch.Size([2, 4, 3, 3]), torch.Size([2]))
        >>> torch.allclose(conv.inverse(y)[0], x, atol=1e-5)
        True

        The exact log-determinant per image is ``H W log|det W|``: 3 * 3 * 4 log 2 for ``W = 2 I``:

        >>> with torch.no_grad():
        ...     _ = conv.weight.copy_(2 * torch.eye(4))
        >>> [round(v / math.log(2), 4) for v in conv(x, rule="exact")[1].tolist()]
        [36.0, 36.0]
    """

    def __init__(
        self,
        channels: int,
        bias: bool = False,
        rule: str = "relative",
        *,
        rng: GeneratorLike = None,
        device: Optional[Union[str, torch.device]] = None,
        dtype: torch.dtype = torch.float32,
        generator: GeneratorLike = None,
    ) -> None:
        super().__init__()
        self.linear = RelativeLinear(channels, bias, rule, rng=pick_rng(rng, generator), device=device, dtype=dtype)

    @property
    def weight(self) -> nn.Parameter:
        return self.linear.weight

    @property
    def bias(self) -> Optional[nn.Parameter]:
        return self.linear.bias

    @property
    def channels(self) -> int:
        return self.linear.features

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ShapeError(f"RelativeConv1x1 expects input of shape (N, {self.channels}, H, W), got {tuple(x.shape)}")
        return x.permute(0, 2, 3, 1).reshape(-1, self.channels)  # one row per pixel, as nflows' 1x1 conv

    @staticmethod
    def _image(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        n, c, h, w = shape
        return rows.reshape(n, h, w, c).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor, rule: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """The 1x1 convolution and ``H W log|det W|`` per image (see the class docstring).

        Shapes:
            x: (N, C, H, W); returns (N, C, H, W) and (N,).
        """
        rows = self._rows(x)
        y, r = self.linear(rows, rule)
        # per-pixel log-determinants summed over the image: H W log|det W| (or the stand-in's zeros)
        return self._image(y, x.shape), r.reshape(x.shape[0], -1).sum(dim=1)

    def inverse(self, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The inverse convolution and ``-H W log|det W|`` per image.

        Shapes:
            y: (N, C, H, W); returns (N, C, H, W) and (N,).
        """
        x, r = self.linear.inverse(self._rows(y))
        return self._image(x, y.shape), r.reshape(y.shape[0], -1).sum(dim=1)
