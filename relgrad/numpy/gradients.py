"""Hand-written backpropagation and the gradient rules of the NumPy twin ("autodiff" lives in relgrad.torch).

The loss that training minimises is the mean negative log-likelihood of a batch,

    Loss = -mean_m [ L_p(x_m) + L_J^1(x_m) ]  -  sum_k log|det W_k|        (=: Loss_data + Loss_det).

Row-batch notation: Z_{k-1}, Y_k, Delta_k are ``(M, D)`` with one sample per row, Y_k = Z_{k-1} W_k^T + b_k,
and Delta_k = dLoss_data / dY_k (it includes the 1/M of the mean).  With G_W = Delta^T Z and g_b = Delta^T 1
(the ordinary gradients of Loss_data), the rules are

    ordinary:  dW = G_W - W^{-T}                          db = g_b                         (explicit inverse, O(D^3))
    relative:  dW = G_W W^T W + g_b b^T W - W             db = G_W W^T b + g_b (1 + b.b) - b
    authors:   as relative but without the "- b" on the bias (the rule of the published code), evaluated in the
               published order: Z W^T recomputed, three M x D x D products and an outer product.
    mixed:     dW = (G_W - W^{-T}) W^T W = G_W W^T W - W    db = g_b     (relative on W alone, ordinary on b)

The relative rule is the ordinary gradient of the augmented matrix A = [[W, b], [0, 1]] multiplied on the right
by A^T A (top D rows).  It is evaluated in O(M D^2) without ever forming W^T W, (Delta^T Y0) W or an inverse:
since Z W^T + 1 b^T = Y, the first two terms of each line collapse to

    G_W W^T W + g_b b^T W = Delta^T (Z W^T + 1 b^T) W = Delta^T (Y W)
    G_W W^T b + g_b b.b   = Delta^T (Y b)

i.e. dW = Delta^T (Y W) - W and db = Delta^T (Y b) + g_b - b.  This equals the form with Y0 = Y - b,
Delta^T (Y0 W) + outer(g_b, W^T b) - W, but needs no D x D outer-product temporary.  Cost: two M x D x D GEMMs
per layer (Y W, then Delta^T (Y W)), the same order as backpropagation itself.
"""

from __future__ import annotations

from typing import List, Tuple

import numpy as np
from numpy.typing import ArrayLike

from ..errors import SingularWeightError
from ..training import METHODS
from .activation import dlog_sigma_prime, sigma_prime
from .flow import DenseFlow, Trace

__all__ = ["check_method", "deltas", "gradients", "loss_and_gradients", "relative_layer"]

#: Gradient methods the NumPy twin implements.
NUMPY_METHODS = ("relative", "authors", "mixed", "ordinary")

Grads = List[Tuple[np.ndarray, np.ndarray]]


def check_method(method: str) -> None:
    """Raise ``ValueError`` for a method this twin cannot run, saying what to use instead."""
    if method == "autodiff":
        raise ValueError(
            "method 'autodiff' (autograd through slogdet) needs torch: use relgrad.torch, "
            f"or one of {NUMPY_METHODS} in relgrad.numpy"
        )
    if method not in METHODS:
        raise ValueError(
            f"unknown gradient method {method!r}; valid methods: {METHODS} ('autodiff': relgrad.torch only)"
        )


def deltas(model: DenseFlow, trace: Trace) -> List[np.ndarray]:
    """Backpropagate Delta_k = dLoss_data / dY_k through the layers, last to first.

    Loss_data = -mean(L_p + L_J^1).  At the output, d(-log N(s; 0, I))/ds = s, so Delta_L = S / M.  Going back
    through layer k+1 (Y_{k+1} = Z_k W_{k+1}^T + b) gives dLoss/dZ_k = Delta_{k+1} W_{k+1}; through Z_k = sigma(Y_k)
    it is multiplied by sigma'(Y_k); and Y_k also enters L_J^1 directly, adding -(1/M) sigma''/sigma' (Y_k).

    Shapes:
        trace: as returned by ``model.trace(x)`` for x ``(M, D)``; returns L arrays ``(M, D)``, Delta_1..Delta_L.
    """
    m = trace.s.shape[0]
    delta = trace.s / m
    out = [delta]
    for k in range(model.n_layers - 2, -1, -1):  # 0-based index of the layer whose output feeds layer k+1
        y = trace.ys[k]
        delta = delta @ model.weights[k + 1]  # row form of W^T delta
        delta *= sigma_prime(y, model.alpha)
        delta -= dlog_sigma_prime(y, model.alpha) / m
        out.append(delta)
    out.reverse()
    return out


def _ordinary_layer(w: np.ndarray, z: np.ndarray, delta: np.ndarray, where: str) -> Tuple[np.ndarray, np.ndarray]:
    """dW = Delta^T Z - W^{-T}, db = Delta^T 1: the Euclidean gradient, O(D^3) for the inverse.

    Shapes:
        w ``(D, D)``, z and delta ``(M, D)``; returns ``(D, D)``, ``(D,)``.
    """
    try:
        w_inv = np.linalg.inv(w)
    except np.linalg.LinAlgError as err:
        raise SingularWeightError(f"weight matrix of {where} is singular: the ordinary gradient needs W^-1") from err
    dw = delta.T @ z
    dw -= w_inv.T
    return dw, delta.sum(axis=0)


def relative_layer(
    w: np.ndarray, b: np.ndarray, y: np.ndarray, delta: np.ndarray, strict: bool
) -> Tuple[np.ndarray, np.ndarray]:
    """Relative gradient of one layer, O(M D^2): dW = Delta^T (Y W) - W, db = Delta^T (Y b) + g_b [- b if strict].

    See the module docstring for why Y (with the bias) turns the augmented rule into this tight form.

    Shapes:
        w ``(D, D)``, b ``(D,)``, y and delta ``(M, D)``; returns ``(D, D)``, ``(D,)``.
    """
    dw = delta.T @ (y @ w)  # association order is the whole point: never (Delta^T Y) W or W^T W
    dw -= w  # relative gradient of -log|det W|: -W^{-T} W^T W = -W, free
    db = delta.T @ (y @ b)
    db += delta.sum(axis=0)
    if strict:
        db -= b  # the "+b" of the augmented log-det gradient [W, b]; the published code omits it
    return dw, db


def _authors_layer(
    w: np.ndarray, b: np.ndarray, z: np.ndarray, delta: np.ndarray
) -> Tuple[np.ndarray, np.ndarray]:
    """The published code's rule in its evaluation order (the torch twin's ``relgrad.torch.functions.AuthorsAffine``).

    dW = Delta^T ((Z W^T) W) + outer(g_b, W^T b) - W,  db = Delta^T (Z (W^T b)) + g_b (1 + b.b): the strict rule
    without the ``- b``, with ``Z W^T`` recomputed (three M x D x D products) and a D x D outer product.

    Shapes:
        w ``(D, D)``, b ``(D,)``, z and delta ``(M, D)``; returns ``(D, D)``, ``(D,)``.
    """
    g_b, wtb = delta.sum(axis=0), w.T @ b
    dw = delta.T @ ((z @ w.T) @ w)
    dw += np.outer(g_b, wtb)
    dw -= w
    return dw, delta.T @ (z @ wtb) + g_b * (1.0 + b @ b)


def _mixed_layer(
    w: np.ndarray, b: np.ndarray, y: np.ndarray, delta: np.ndarray
) -> Tuple[np.ndarray, np.ndarray]:
    """Relative on the weight, ordinary on the bias: dW = Delta^T (Y W) - outer(g_b, W^T b) - W, db = g_b.

    ``Delta^T (Y W) = G_W W^T W + g_b b^T W``; the outer product takes the bias coupling out again, so dW is
    the weight's own relative gradient ``(G_W - W^{-T}) W^T W`` in O(M D^2) without W^T W or an inverse.

    Shapes:
        w ``(D, D)``, b ``(D,)``, y and delta ``(M, D)``; returns ``(D, D)``, ``(D,)``.
    """
    g_b = delta.sum(axis=0)
    dw = delta.T @ (y @ w)
    dw -= np.outer(g_b, w.T @ b)
    dw -= w
    return dw, g_b


def _layer_gradients(model: DenseFlow, trace: Trace, method: str) -> Grads:
    """Per-layer (dW, db) of the loss from a trace, for a validated method."""
    grads = []
    for k, delta in enumerate(deltas(model, trace)):
        w, b = model.weights[k], model.biases[k]
        if method == "ordinary":
            grads.append(_ordinary_layer(w, trace.zs[k], delta, f"layer {k + 1} of {model.n_layers}"))
        elif method == "authors":
            grads.append(_authors_layer(w, b, trace.zs[k], delta))
        elif method == "mixed":
            grads.append(_mixed_layer(w, b, trace.ys[k], delta))
        else:
            grads.append(relative_layer(w, b, trace.ys[k], delta, strict=True))
    return grads


def loss_and_gradients(model: DenseFlow, x: ArrayLike, method: str = "relative") -> Tuple[float, Grads]:
    """The training surrogate loss and the chosen gradient of the loss, from one forward and one backward pass.

    The returned loss is -mean(L_p + L_J^1): it omits the parameter-only term -sum_k log|det W_k|, which a
    training step never evaluates (it would cost O(D^3)); its gradient is nonetheless included in every rule.
    Use ``model.log_likelihood`` for the exact value.

    Shapes:
        x: ``(M, D)``; returns a float and L pairs ``(dW (D, D), db (D,))``.

    Examples:
        At the orthogonal initialisation ``log|det W_k| = 0``, so the value equals the exact mean
        negative log-likelihood:

        >>> import numpy as np
        >>> from relgrad.numpy import DenseFlow, loss_and_gradients
        >>> flow = DenseFlow(3, n_layers=2, rng=0)
        >>> x = np.random.default_rng(1).standard_normal((8, 3))
        >>> loss, grads = loss_and_gradients(flow, x)
        >>> round(loss, 4), round(float(-flow.log_prob(x).mean()), 4), len(grads)
        (4.6367, 4.6367, 2)
    """
    check_method(method)
    tr = model.trace(x)
    base, activation = model._data_terms(tr)
    return -float(np.mean(base + activation)), _layer_gradients(model, tr, method)


def gradients(model: DenseFlow, x: ArrayLike, method: str = "relative") -> Grads:
    """Gradient of the mean negative log-likelihood of the batch x (minimisation convention).

    method: ``"relative"`` (strict augmented relative gradient, O(M D^2)), ``"authors"`` (the published code's
    rule: no ``-b`` on the bias), ``"mixed"`` (relative on the weight, ordinary on the bias), ``"ordinary"``
    (Euclidean gradient with an explicit inverse, O(D^3)).  ``"autodiff"`` is torch-only.

    Shapes:
        x: ``(M, D)``; returns L pairs ``(dW (D, D), db (D,))``, layer 1 first.

    Examples:
        >>> import numpy as np
        >>> from relgrad.numpy import DenseFlow, gradients
        >>> flow = DenseFlow(3, n_layers=2, rng=0)
        >>> x = np.random.default_rng(1).standard_normal((8, 3))
        >>> [(dw.shape, db.shape) for dw, db in gradients(flow, x)]
        [((3, 3), (3,)), ((3, 3), (3,))]

        The relative gradient ``[dW | db]`` is the ordinary one times ``A^T A``, with ``A`` the
        augmented matrix ``[[W, b], [0, 1]]`` (here with a non-zero bias):

        >>> flow.biases[0][:] = 0.5
        >>> A = np.eye(4); A[:3, :3], A[:3, 3] = flow.weights[0], flow.biases[0]
        >>> G = np.column_stack(gradients(flow, x, "ordinary")[0])          # (3, 4)
        >>> np.allclose(np.column_stack(gradients(flow, x)[0]), G @ A.T @ A)
        True
    """
    return loss_and_gradients(model, x, method)[1]
