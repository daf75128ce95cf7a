"""Gradients of the dense flow's negative log-likelihood, in the five flavours relgrad compares.

The central piece is :func:`training_loss`: a scalar whose ordinary ``loss.backward()`` leaves the chosen
gradient in each layer's ``weight.grad`` / ``bias.grad``, so that any ``torch.optim`` optimiser applies it.
It *calls the model* (``model(x, rule=method)``), so a ``DistributedDataParallel``- or
``torch.compile``-wrapped model works: the wrapper sees the step and all-reduces / compiles it.  The
gradient rules live in the layers (:class:`relgrad.torch.RelativeLinear`):

* ``"relative"`` (strict, augmented-matrix rule): ``Delta^T (Y W) - W`` and ``Delta^T (Y b) + g_b - b``,
  O(M D^2) per layer; no slogdet, inverse or solve, and no D x D x D product either.
* ``"authors"``: the published code transcribed: the same direction without the ``-b`` on the bias,
  evaluated in the published order (three M x D x D products and an outer product).
* ``"mixed"``: relative on the weight, ordinary on the bias: ``Delta^T (Y W) - outer(g_b, W^T b) - W`` and
  ``g_b``, O(M D^2) (the hypothesis that the bias coupling through ``Ahat^T Ahat`` slows training).
* ``"ordinary"``: plain autograd for the data term plus a stand-in whose backward returns ``-W^{-T}`` from
  an explicit inverse (O(D^3) per layer per step).
* ``"autodiff"``: autograd through ``torch.linalg.slogdet`` of the full negative log-likelihood.

Forward value: for relative/authors/mixed/ordinary the loss is the data part ``-mean(log p_s(s) + sum log sigma')``
only (the stand-ins evaluate to zero, so no log-determinant is computed during training); for autodiff it
is the full negative log-likelihood.  Use ``model.log_prob`` for the exact value.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from .flow import DenseFlow, Trace
from .functions import sigma_and_log_det
from .nn import RULES, check_rule

__all__ = ["METHODS", "unwrap", "data_loss", "deltas", "training_loss", "gradients", "loss_and_gradients"]

#: The gradient methods (the layers' rules).
METHODS = RULES

Grads = List[Tuple[torch.Tensor, torch.Tensor]]


def check_method(method: str) -> str:
    """Return ``method`` if it is one of :data:`METHODS`, else raise ValueError listing them.

    Shapes:
        none (a string in, the same string out).
    """
    return check_rule(method)


def unwrap(model: nn.Module) -> DenseFlow:
    """The :class:`DenseFlow` inside ``model``: itself, or under DDP / DataParallel (``.module``) or
    ``torch.compile`` (``._orig_mod``) wrappers, any number deep.  Raises TypeError for anything else.

    Shapes:
        none.
    """
    m = model
    for _ in range(16):
        if isinstance(m, DenseFlow):
            return m
        inner = getattr(m, "_orig_mod", None) or getattr(m, "module", None)
        if not isinstance(inner, nn.Module):
            break
        m = inner
    raise TypeError(f"expected a relgrad.torch.DenseFlow (possibly wrapped by DDP or torch.compile), got {type(model).__name__}")


# --------------------------------------------------------------------------------------------- losses
def data_loss(model: DenseFlow, x: torch.Tensor) -> torch.Tensor:
    """``-mean(log p_s(s) + sum_{k<L} log sigma'(y_k))`` through plain autograd layers, no log-det term.

    The same multilayer perceptron and loss without any log-determinant: the lower bound on the cost of any
    exact method (the benchmark's "plain"), and the function whose gradient is ``G_W`` in the book.

    Shapes:
        x: (M, D) (already validated); returns a scalar tensor.
    """
    z, act = x, None
    for k, layer in enumerate(model.layers):
        y = torch.nn.functional.linear(z, layer.weight, layer.bias)
        if k < model.n_layers - 1:
            z, a = sigma_and_log_det(y, model.alpha)
            act = a if act is None else act + a
    lp = model.base_log_prob(y)
    return -(lp if act is None else lp + act).mean()


def training_loss(model: nn.Module, x: torch.Tensor, method: Optional[str] = None, *, check: bool = True) -> torch.Tensor:
    """A scalar whose ``.backward()`` puts the ``method`` gradient of the mean NLL into the parameters' ``.grad``.

    ``model``: a :class:`DenseFlow`, or one wrapped by ``DistributedDataParallel`` / ``torch.compile``: the
    wrapper is *called* (``model(x, rule=method)``), so it sees the step.  ``method``: "relative" (strict),
    "authors" (no ``-b`` on the bias), "mixed" (relative on W, ordinary on b), "ordinary" (explicit inverse)
    or "autodiff" (autograd through slogdet); None uses the model's ``rule``.  The returned value is
    ``-mean(log p_s(s) + sum log sigma')`` for the first four (the log-det stand-ins are zero-valued: no log-determinant is computed while
    training) and the full mean negative log-likelihood for "autodiff".

    ``check=False`` skips the finiteness check of ``x`` (a device synchronisation on CUDA, and a graph
    break for torch.compile): for loops that validated their whole data set once.

    Shapes:
        x: (M, D); returns a scalar tensor.

    Examples:
        >>> import torch, relgrad.torch as rt
        >>> flow = rt.DenseFlow(3, n_layers=2, rng=0)
        >>> x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
        >>> loss = rt.training_loss(flow, x)          # method=None: the model's rule, "relative"
        >>> loss.backward()                           # the relative gradient lands in .grad
        >>> flow.layers[0].weight.grad.shape, flow.layers[0].bias.grad.shape
        (torch.Size([3, 3]), torch.Size([3]))

        The value omits ``-sum_k log|det W_k|``; it is zero at the orthogonal initialisation, so there
        the value equals the full negative log-likelihood that "autodiff" returns:

        >>> full = rt.training_loss(flow, x, "autodiff")
        >>> torch.allclose(loss, full), torch.allclose(full, -flow.log_prob(x).mean())
        (True, True)
    """
    flow = unwrap(model)
    rule = flow.rule if method is None else check_method(method)
    if check:
        x = flow._batch(x)
    s, logabsdet = model(x, rule=rule)
    return -(flow.base_log_prob(s) + logabsdet).mean()


def _param_grads(model: DenseFlow, loss: torch.Tensor) -> Grads:
    # autograd.grad instead of backward(): the same numbers, without touching the parameters' .grad.
    params = [p for pair in zip(model.weights, model.biases) for p in pair]
    flat = torch.autograd.grad(loss, params, allow_unused=True)
    flat = [torch.zeros_like(p) if g is None else g for p, g in zip(params, flat)]
    return [(flat[2 * k], flat[2 * k + 1]) for k in range(model.n_layers)]


def gradients(model: nn.Module, x: torch.Tensor, method: Optional[str] = None) -> Grads:
    """The ``method`` gradient of the mean NLL (minimisation convention), one ``(dW, db)`` per layer.

    The values ``training_loss(model, x, method).backward()`` would put in ``.grad`` (the parameters'
    existing ``.grad`` are left untouched).

    Shapes:
        x: (M, D); returns L pairs ((D, D), (D,)).

    Examples:
        >>> import torch, relgrad.torch as rt
        >>> flow = rt.DenseFlow(3, n_layers=2, rng=0)
        >>> x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
        >>> grads = rt.gradients(flow, x, "relative")
        >>> [(tuple(dw.shape), tuple(db.shape)) for dw, db in grads]
        [((3, 3), (3,)), ((3, 3), (3,))]
        >>> rt.training_loss(flow, x, "relative").backward()
        >>> torch.allclose(grads[0][0], flow.layers[0].weight.grad)
        True

        With ``b = 0`` (the initialisation) the relative weight gradient is the ordinary one times ``W^T W``:

        >>> W = flow.layers[0].weight.detach()
        >>> ordinary = rt.gradients(flow, x, "ordinary")
        >>> torch.allclose(grads[0][0], ordinary[0][0] @ W.T @ W, atol=1e-5)
        True
    """
    return _param_grads(unwrap(model), training_loss(model, x, method))


def loss_and_gradients(model: nn.Module, x: torch.Tensor, method: Optional[str] = None) -> Tuple[float, Grads]:
    """The training loss value (see :func:`training_loss`) as a float, and :func:`gradients`.

    Shapes:
        x: (M, D); returns (float, L pairs ((D, D), (D,))).

    Examples:
        >>> import torch, relgrad.torch as rt
        >>> flow = rt.DenseFlow(3, n_layers=2, rng=0)
        >>> x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
        >>> value, grads = rt.loss_and_gradients(flow, x, "autodiff")
        >>> isinstance(value, float), len(grads)
        (True, 2)
    """
    loss = training_loss(model, x, method)
    return float(loss.detach()), _param_grads(unwrap(model), loss)


def deltas(model: DenseFlow, trace: Trace) -> List[torch.Tensor]:
    """``Delta_k = dLoss_data/dY_k`` for every layer, by autograd (the paper's Appendix D trick).

    A zero "accumulator" is added to every pre-activation of a pass restarted from ``trace.zs[0]`` (the
    batch; the rest of the trace is recomputed, since the accumulators must be in the graph); the gradient
    of ``Loss_data = -mean(log p_s(s) + sum log sigma')`` w.r.t. each accumulator is Delta_k (including the
    1/M and the direct ``sigma''/sigma'`` term).

    Shapes:
        trace: a Trace of a batch (M, D); returns L tensors (M, D).

    Examples:
        >>> import torch, relgrad.torch as rt
        >>> flow = rt.DenseFlow(3, n_layers=2, rng=0)
        >>> tr = flow.trace(torch.randn(8, 3, generator=torch.Generator().manual_seed(1)))
        >>> d = rt.deltas(flow, tr)
        >>> len(d), d[-1].shape
        (2, torch.Size([8, 3]))
        >>> torch.allclose(d[-1], tr.s / 8)     # the last layer: d(-mean log N(s; 0, I))/ds = s / M
        True
    """
    x = trace.zs[0].detach()
    accs = [torch.zeros_like(x, requires_grad=True) for _ in range(model.n_layers)]
    with torch.enable_grad():
        z, act = x, x.new_zeros(x.shape[0])
        for k, layer in enumerate(model.layers):
            y = torch.nn.functional.linear(z, layer.weight.detach(), layer.bias.detach()) + accs[k]
            if k < model.n_layers - 1:
                z, a = sigma_and_log_det(y, model.alpha)
                act = act + a
        loss = -(model.base_log_prob(y) + act).mean()
        return list(torch.autograd.grad(loss, accs))

