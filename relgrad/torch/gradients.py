"""Gradients of the dense flow's negative log-likelihood, in the four flavours relgrad compares.

The central piece is :func:`training_loss`: a scalar whose ordinary ``loss.backward()`` leaves the chosen
gradient in ``W.grad`` / ``b.grad``, so that any ``torch.optim`` optimiser applies it.

* ``"relative"`` (strict, augmented-matrix rule): each layer is a :class:`RelativeLinear` autograd Function
  that returns the layer output and a zero-valued stand-in for ``-log|det W|``; its backward returns the
  relative gradient of both, ``Delta^T (Y W) - W`` and ``Delta^T (Y b) + g_b - b``, in O(M D^2).  No slogdet,
  inverse or solve is ever computed, and no D x D x D product either.
* ``"authors"``: :class:`AuthorsLinear`, the published code transcribed: the same direction without the
  ``-b`` on the bias, evaluated in the published order (three M x D x D products and an outer product).
* ``"ordinary"``: plain autograd for the data term plus an :class:`OrdinaryLogDet` surrogate whose
  backward returns ``-W^{-T}`` from an explicit inverse (O(D^3) per layer per step).
* ``"autodiff"``: autograd through ``torch.linalg.slogdet`` of the full negative log-likelihood.

Forward value: for relative/authors/ordinary the loss is the data part ``-mean(log N(s) + sum log sigma')``
only (the surrogates evaluate to zero, so no log-determinant is computed during training); for autodiff it
is the full negative log-likelihood.  Use ``model.log_likelihood`` for the exact value.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from ..training import METHODS
from .activation import sigma_and_log_det
from .flow import DenseFlow, Trace, standard_normal_log_prob

__all__ = [
    "METHODS",
    "RelativeLinear",
    "AuthorsLinear",
    "OrdinaryLogDet",
    "deltas",
    "training_loss",
    "gradients",
    "loss_and_gradients",
]

Grads = List[Tuple[torch.Tensor, torch.Tensor]]


def check_method(method: str) -> str:
    """Return ``method`` if it is one of :data:`relgrad.training.METHODS`, else raise ValueError listing them.

    Shapes:
        none (a string in, the same string out).
    """
    if method not in METHODS:
        raise ValueError(f"unknown gradient method {method!r}; valid methods are {', '.join(METHODS)}")
    return method


# --------------------------------------------------------------------------------------------- Functions
class RelativeLinear(torch.autograd.Function):
    """``(Y, r) = (Z W^T + b, 0)``: an affine layer and a zero-valued stand-in ``r`` for ``-log|det W|``.

    The backward returns *relative* gradients for (W, b).  With ``Delta = dLoss/dY``, ``c = dLoss/dr`` (1 when
    ``r`` is added to the loss once) and ``g_b = Delta^T 1``:

        grad_W = Delta^T (Y W) - c W
        grad_b = Delta^T (Y b) + g_b - c b          (strict; ``strict=False``, the authors' rule, drops ``- c b``)

    This is ``[G_W | g_b] Ahat^T Ahat`` (top rows) for the data term plus the relative gradient ``-[W, b]`` of
    ``-log|det Ahat|``.  Because ``Z W^T + 1 b^T = Y``, the bias terms ``g_b b^T W`` and ``g_b b.b`` are already
    inside ``Delta^T (Y W)`` and ``Delta^T (Y b)``: two M x D x D products and one in-place D x D update, no
    ``W^T W``, no outer-product temporary.  ``Y`` is the layer's own output, so saving it costs no memory.
    ``grad_Z = Delta W`` is the ordinary backpropagated gradient and is skipped when Z needs none (layer 1).

    Shapes:
        z: (M, D), weight: (D, D), bias: (D,); returns Y (M, D) and a scalar zero.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, strict: bool):  # type: ignore[override]
        y = torch.addmm(bias, z, weight.T)
        ctx.save_for_backward(y, weight, bias)
        ctx.strict = strict
        ctx.set_materialize_grads(False)  # an unused output sends None, not a tensor of zeros
        return y, weight.new_zeros(())

    @staticmethod
    @once_differentiable  # a relative gradient is not the gradient of a function: no double backward
    def backward(ctx, delta: Optional[torch.Tensor], c: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        y, weight, bias = ctx.saved_tensors
        if delta is None:  # only the log-det stand-in is in the loss
            delta = torch.zeros_like(y)
        grad_z = delta @ weight if ctx.needs_input_grad[0] else None
        grad_w = torch.mm(delta.T, y @ weight)  # never (Delta^T Y) W or W^T W: those are O(D^3)
        grad_b = torch.mv(delta.T, y @ bias) + delta.sum(dim=0)
        if c is not None:
            grad_w.addcmul_(weight, c, value=-1.0)  # in place: -c W costs one pass over a D x D matrix
            if ctx.strict:
                grad_b.addcmul_(bias, c, value=-1.0)
        return grad_z, grad_w, grad_b, None


class AuthorsLinear(torch.autograd.Function):
    """The published code's relative gradient, in its own evaluation order: ``(Y, r)`` as :class:`RelativeLinear`.

    The backward recomputes ``Y0 = Z W^T`` and adds the bias terms as outer products, as the authors' code does:

        grad_W = Delta^T ((Z W^T) W) + outer(g_b, W^T b) - c W
        grad_b = Delta^T (Z (W^T b)) + g_b (1 + b.b)              (no "- c b": the authors' bias rule)

    Same values as ``RelativeLinear(strict=False)`` up to rounding, but three M x D x D products instead of two
    and a D x D outer-product temporary: the "authors" method of the benchmark.

    Shapes:
        z: (M, D), weight: (D, D), bias: (D,); returns Y (M, D) and a scalar zero.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):  # type: ignore[override]
        ctx.save_for_backward(z, weight, bias)
        ctx.set_materialize_grads(False)
        return torch.addmm(bias, z, weight.T), weight.new_zeros(())

    @staticmethod
    @once_differentiable
    def backward(ctx, delta: Optional[torch.Tensor], c: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        z, weight, bias = ctx.saved_tensors
        if delta is None:
            delta = torch.zeros(z.shape[0], weight.shape[0], dtype=z.dtype, device=z.device)
        grad_z = delta @ weight if ctx.needs_input_grad[0] else None
        g_b, wtb = delta.sum(dim=0), weight.T @ bias
        grad_w = delta.T @ ((z @ weight.T) @ weight) + torch.outer(g_b, wtb)
        grad_b = delta.T @ (z @ wtb) + g_b * (1.0 + bias @ bias)
        if c is not None:
            grad_w = grad_w - c * weight
        return grad_z, grad_w, grad_b


class OrdinaryLogDet(torch.autograd.Function):
    """Zero-valued surrogate whose backward is the ordinary gradient of ``-log|det W|``: ``-W^{-T}``.

    The explicit inverse is the O(D^3) per-step cost the relative gradient removes.

    Shapes:
        weight: (D, D); returns a scalar zero.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(weight)
        return weight.new_zeros(())

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        return -grad * torch.linalg.inv(weight).T


# --------------------------------------------------------------------------------------------- losses
Layer = Callable[[int, torch.Tensor], torch.Tensor]


def _data_loss(model: DenseFlow, x: torch.Tensor, layer: Layer) -> torch.Tensor:
    """``-mean(log N(s) + sum_{k<L} log sigma'(y_k))`` with ``y_k = layer(k, z_{k-1})``."""
    z, act = x, x.new_zeros(x.shape[0])
    for k in range(model.n_layers):
        y = layer(k, z)
        if k < model.n_layers - 1:
            z, log_det = sigma_and_log_det(y, model.alpha)
            act = act + log_det
    return -(standard_normal_log_prob(y) + act).mean()


def _relative_layer(model: DenseFlow, method: str, stand_ins: List[torch.Tensor]) -> Layer:
    """Layer k as RelativeLinear ("relative") or AuthorsLinear ("authors"); collects the log-det stand-ins."""

    def layer(k: int, z: torch.Tensor) -> torch.Tensor:
        w, b = model.weights[k], model.biases[k]
        y, r = RelativeLinear.apply(z, w, b, True) if method == "relative" else AuthorsLinear.apply(z, w, b)
        stand_ins.append(r)
        return y

    return layer


def _plain_layer(model: DenseFlow) -> Layer:
    return lambda k, z: torch.nn.functional.linear(z, model.weights[k], model.biases[k])


def _training_loss(model: DenseFlow, x: torch.Tensor, method: str) -> torch.Tensor:
    # Unchecked version for fit(), which validated the whole data set once (a per-step isfinite check
    # would force a device synchronisation on CUDA).
    if method in ("relative", "authors"):
        stand_ins: List[torch.Tensor] = []  # the zero-valued -log|det W_k| of each layer
        loss = _data_loss(model, x, _relative_layer(model, method, stand_ins))
        for r in stand_ins:
            loss = loss + r
        return loss
    loss = _data_loss(model, x, _plain_layer(model))
    if method == "ordinary":
        for w in model.weights:
            loss = loss + OrdinaryLogDet.apply(w)
        return loss
    # autodiff: the full NLL, differentiated by autograd through slogdet (no singularity check per step).
    return loss - sum(torch.linalg.slogdet(w).logabsdet for w in model.weights)


def training_loss(model: DenseFlow, x: torch.Tensor, method: str = "relative", *, check: bool = True) -> torch.Tensor:
    """A scalar whose ``.backward()`` puts the ``method`` gradient of the NLL into ``W.grad`` and ``b.grad``.

    ``method``: "relative" (strict), "authors" (no ``-b`` on the bias), "ordinary" (explicit inverse) or
    "autodiff" (autograd through slogdet).  The returned value is ``-mean(log N(s) + sum log sigma')`` for
    the first three (the log-det surrogates are zero-valued: no log-determinant is computed while training)
    and the full mean negative log-likelihood for "autodiff".

    ``check=False`` skips the finiteness check of ``x`` (a device synchronisation on CUDA): for loops that
    validated their whole data set once.

    Shapes:
        x: (M, D); returns a scalar tensor.
    """
    check_method(method)
    return _training_loss(model, model._batch(x) if check else x, method)


def _param_grads(model: DenseFlow, loss: torch.Tensor) -> Grads:
    # autograd.grad instead of backward(): the same numbers, without touching the parameters' .grad.
    params = [p for pair in zip(model.weights, model.biases) for p in pair]
    flat = torch.autograd.grad(loss, params, allow_unused=True)
    flat = [torch.zeros_like(p) if g is None else g for p, g in zip(params, flat)]
    return [(flat[2 * k], flat[2 * k + 1]) for k in range(model.n_layers)]


def gradients(model: DenseFlow, x: torch.Tensor, method: str = "relative") -> Grads:
    """The ``method`` gradient of the mean NLL (minimisation convention), one ``(dW, db)`` per layer.

    The values ``training_loss(model, x, method).backward()`` would put in ``.grad`` (the parameters'
    existing ``.grad`` are left untouched).

    Shapes:
        x: (M, D); returns L pairs ((D, D), (D,)).
    """
    return _param_grads(model, training_loss(model, x, method))


def loss_and_gradients(model: DenseFlow, x: torch.Tensor, method: str = "relative") -> Tuple[float, Grads]:
    """The surrogate loss value (see :func:`training_loss`) as a float, and :func:`gradients`.

    Shapes:
        x: (M, D); returns (float, L pairs ((D, D), (D,))).
    """
    loss = training_loss(model, x, method)
    return float(loss.detach()), _param_grads(model, loss)


def deltas(model: DenseFlow, trace: Trace) -> List[torch.Tensor]:
    """``Delta_k = dLoss_data/dY_k`` for every layer, by autograd (the paper's Appendix D trick).

    A zero "accumulator" is added to every pre-activation of a pass restarted from ``trace.zs[0]``; the
    gradient of ``Loss_data = -mean(log N(s) + sum log sigma')`` w.r.t. each accumulator is Delta_k
    (including the 1/M and the direct ``sigma''/sigma'`` term).

    Shapes:
        trace: a Trace of a batch (M, D); returns L tensors (M, D).
    """
    x = trace.zs[0].detach()
    accs = [torch.zeros_like(x, requires_grad=True) for _ in range(model.n_layers)]
    ws = [w.detach() for w in model.weights]
    bs = [b.detach() for b in model.biases]
    with torch.enable_grad():
        loss = _data_loss(model, x, lambda k, z: torch.nn.functional.linear(z, ws[k], bs[k]) + accs[k])
        return list(torch.autograd.grad(loss, accs))
