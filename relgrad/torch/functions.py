"""The autograd Functions behind relgrad's layers: where the relative gradient is computed.

Each Function is written in the ``forward`` + ``setup_context`` style with ``generate_vmap_rule = True``,
so that ``torch.func`` (``grad``, ``vmap``, ``functional_call``) and ``torch.compile(fullgraph=True)`` can
trace it.  Each one returns a *zero-valued stand-in* for a log-determinant next to its real output: the
value costs nothing, and its backward carries the gradient rule (relative, authors', mixed or ordinary).

Sign convention (as ``log_prob``): the stand-in ``r`` has the value of ``+log|det W|`` per row (zero here,
the exact value is never computed in a step), and ``c = dLoss/dr``.  A loss ``-mean(log p)`` gives
``c_i = -1/M`` for each of the M rows, so ``sum_i c_i = -1``: the relative gradient of ``-log|det W|`` is
``-W``.  A 1x1 convolution has one row per pixel, so the same sum is ``-H W`` per image automatically.

Mixed precision: under ``torch.autocast`` the forward GEMM runs in the autocast dtype; every backward
product is done in the parameters' dtype (float32/float64) after casting ``Delta`` and ``Y`` up, since
``Delta^T (Y W) + c W`` cancels near an optimum and half precision would swamp it.

Layering: this module imports only torch (and nothing above it in relgrad.torch).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

__all__ = ["RelativeAffine", "RELATIVE_AFFINE_RULES", "AuthorsAffine", "OrdinaryLogDet", "SigmaAndLogDet",
           "sigma_and_log_det"]

#: The rules :class:`RelativeAffine` computes: the strict relative gradient, its values without the ``-b``
#: (the authors' rule; :class:`AuthorsAffine` is that rule in the published evaluation order) and the mixed
#: rule (relative on the weight, ordinary on the bias).
RELATIVE_AFFINE_RULES = ("relative", "authors", "mixed")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (M, D) with M the product of the leading sizes (a view when possible)."""
    return t.reshape(-1, t.shape[-1])


def _no_autocast(t: torch.Tensor) -> torch.autocast:
    # A backward called inside an autocast region (e.g. a whole training loop under autocast) would
    # otherwise run its products in half precision with mixed dtypes; this is what custom_bwd does.
    return torch.autocast(device_type=t.device.type, enabled=False)


def _param_precision(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # autocast hands the backward bf16/fp16 tensors; the relative-gradient products run in the weight's dtype.
    return t if t.dtype == like.dtype else t.to(like.dtype)


class RelativeAffine(torch.autograd.Function):
    """``(Y, r) = (Z W^T + b, 0)`` with the *relative* gradient in its backward.

    With ``Delta = dLoss/dY`` (rows), ``c = dLoss/dr`` and ``g_b = Delta^T 1``, for ``rule="relative"``:

        grad_W = Delta^T (Y W) + (sum c) W
        grad_b = Delta^T (Y b) + g_b + (sum c) b      (``rule="authors"``: the authors' values, without ``(sum c) b``)

    This is ``[G_W | g_b] Ahat^T Ahat`` (the top rows; ``Ahat`` the augmented matrix ``[[W, b], [0, 1]]``)
    for the data term, plus the relative gradient ``(sum c) [W, b]`` of ``(sum c) log|det Ahat|``.  Because
    ``Z W^T + 1 b^T = Y``, the bias terms ``g_b b^T W`` and ``g_b b.b`` are already inside ``Delta^T (Y W)``
    and ``Delta^T (Y b)``: two M x D x D products and one in-place D x D update; never ``W^T W`` or
    ``(Delta^T Y) W``, which cost O(D^3).  ``Y`` is the layer's own output, so saving it costs no memory.
    ``grad_Z = Delta W`` is the ordinary backpropagated gradient, skipped when Z needs none (layer 1).
    Without a bias (``bias=None``) the same formulas hold with ``b = 0``.

    ``rule="mixed"`` moves the weight alone by its relative gradient and the bias by its ordinary gradient:

        grad_W = Delta^T (Y W) - outer(g_b, W^T b) + (sum c) W   ( = Gamma_W W^T W, Gamma_W the ordinary gradient)
        grad_b = g_b

    (``Delta^T (Y W)`` holds ``g_b b^T W``, which the outer product takes out again: O(D^2), no extra GEMM.  Under
    half-precision autocast that subtraction cancels when the bias dominates ``Y``: the saved ``Y`` is rounded
    to the autocast dtype, so train the mixed rule in float32 there.)

    Shapes:
        z: (..., D), weight: (D, D), bias: (D,) or None; returns Y (..., D) and r (...) (zeros).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], rule: str):  # type: ignore[override]
        y = torch.nn.functional.linear(z, weight, bias)
        return y, weight.new_zeros(z.shape[:-1])

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[torch.Tensor, torch.Tensor]) -> None:
        z, weight, bias, rule = inputs
        if rule not in RELATIVE_AFFINE_RULES:
            raise ValueError(f"RelativeAffine: rule must be one of {RELATIVE_AFFINE_RULES}, got {rule!r}")
        ctx.save_for_backward(output[0], weight, bias)
        ctx.rule = rule
        ctx.z_dtype = z.dtype

    @staticmethod
    def backward(ctx: Any, delta: torch.Tensor, c: torch.Tensor):  # type: ignore[override]
        with _no_autocast(delta):
            return RelativeAffine._grads(ctx, delta, c)

    @staticmethod
    def _grads(ctx: Any, delta: torch.Tensor, c: torch.Tensor):
        y, weight, bias = ctx.saved_tensors
        d = _rows(_param_precision(delta, weight))
        y2 = _rows(_param_precision(y, weight))
        csum = c.sum().to(weight.dtype)
        grad_z = (d @ weight).reshape(delta.shape).to(ctx.z_dtype) if ctx.needs_input_grad[0] else None
        grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.mm(d.T, y2 @ weight)  # never (Delta^T Y) W or W^T W: those are O(D^3)
            grad_w.addcmul_(weight, csum)  # in place: (sum c) W costs one pass over a D x D matrix
            if ctx.rule == "mixed" and bias is not None:  # take out the coupling g_b b^T W (O(D^2))
                grad_w.sub_(torch.outer(d.sum(dim=0), weight.T @ bias))
        if bias is not None and ctx.needs_input_grad[2]:
            if ctx.rule == "mixed":
                grad_b = d.sum(dim=0)
            else:
                grad_b = torch.mv(d.T, y2 @ bias) + d.sum(dim=0)
                if ctx.rule == "relative":
                    grad_b.addcmul_(bias, csum)
        return grad_z, grad_w, grad_b, None


class AuthorsAffine(torch.autograd.Function):
    """The published code's relative gradient, in its own evaluation order: ``(Y, r)`` as :class:`RelativeAffine`.

    The backward recomputes ``Y0 = Z W^T`` and adds the bias terms as outer products, as the authors' code does:

        grad_W = Delta^T ((Z W^T) W) + outer(g_b, W^T b) + (sum c) W
        grad_b = Delta^T (Z (W^T b)) + g_b (1 + b.b)             (no "(sum c) b": the authors' bias rule)

    Same values as ``RelativeAffine`` with ``rule="authors"`` up to rounding, but three M x D x D products instead of two
    and a D x D outer-product temporary: the "authors" method of the benchmark.

    Shapes:
        z: (..., D), weight: (D, D), bias: (D,) or None; returns Y (..., D) and r (...) (zeros).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):  # type: ignore[override]
        return torch.nn.functional.linear(z, weight, bias), weight.new_zeros(z.shape[:-1])

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[torch.Tensor, torch.Tensor]) -> None:
        z, weight, bias = inputs
        ctx.save_for_backward(z, weight, bias)

    @staticmethod
    def backward(ctx: Any, delta: torch.Tensor, c: torch.Tensor):  # type: ignore[override]
        with _no_autocast(delta):
            return AuthorsAffine._grads(ctx, delta, c)

    @staticmethod
    def _grads(ctx: Any, delta: torch.Tensor, c: torch.Tensor):
        z, weight, bias = ctx.saved_tensors
        d = _rows(_param_precision(delta, weight))
        z2 = _rows(_param_precision(z, weight))
        csum = c.sum().to(weight.dtype)
        grad_z = (d @ weight).reshape(delta.shape).to(z.dtype) if ctx.needs_input_grad[0] else None
        g_b = d.sum(dim=0)
        grad_w = d.T @ ((z2 @ weight.T) @ weight) + csum * weight
        grad_b = None
        if bias is not None:
            wtb = weight.T @ bias
            grad_w = grad_w + torch.outer(g_b, wtb)
            grad_b = d.T @ (z2 @ wtb) + g_b * (1.0 + bias @ bias)
        return grad_z, grad_w, grad_b


class OrdinaryLogDet(torch.autograd.Function):
    """Zero-valued stand-in for ``log|det W|`` per row whose backward is the ordinary gradient ``(sum c) W^{-T}``.

    The explicit inverse is the O(D^3) per-step cost the relative gradient removes.

    Shapes:
        weight: (D, D), like: (..., D) (only its leading shape is used); returns (...) (zeros).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(weight: torch.Tensor, like: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return weight.new_zeros(like.shape[:-1])

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx: Any, c: torch.Tensor):  # type: ignore[override]
        with _no_autocast(c):
            return OrdinaryLogDet._grads(ctx, c)

    @staticmethod
    def _grads(ctx: Any, c: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return c.sum().to(weight.dtype) * torch.linalg.inv(weight).mT, None


class SigmaAndLogDet(torch.autograd.Function):
    """``(sigma(y), sum_i log sigma'(y_i))`` in one pass, with a hand-written backward (see :func:`~relgrad.torch.sigma_and_log_det`).

    The third output, ``sigma'(y)``, is returned only so that the backward can reuse it (non-differentiable).
    Half-precision input (autocast) is computed in float32: a sum of D logarithms in bf16 loses whole nats.

    Shapes:
        y: (..., D); returns (..., D), (...) and (..., D).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(y: torch.Tensor, alpha: float):  # type: ignore[override]
        a = float(alpha)
        if y.dtype not in (torch.float32, torch.float64):
            y = y.float()
        # in place on fresh tensors: fewer elementwise kernels and temporaries per step
        slope = torch.sigmoid(y).mul_(1.0 - a).add_(a)  # sigma'(y)
        z = torch.log1p(torch.exp(-torch.abs(y))).add_(torch.clamp_min(y, 0.0)).mul_(1.0 - a).add_(y, alpha=a)
        return z, torch.log(slope).sum(dim=-1), slope

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[torch.Tensor, ...]) -> None:
        y, alpha = inputs
        ctx.mark_non_differentiable(output[2])
        ctx.save_for_backward(y, output[2])
        ctx.alpha = float(alpha)

    @staticmethod
    def backward(ctx: Any, grad_z: torch.Tensor, grad_logdet: torch.Tensor, _unused: Any):  # type: ignore[override]
        with _no_autocast(grad_z):
            return SigmaAndLogDet._grads(ctx, grad_z, grad_logdet, _unused)

    @staticmethod
    def _grads(ctx: Any, grad_z: torch.Tensor, grad_logdet: torch.Tensor, _unused: Any):
        y, slope = ctx.saved_tensors
        yf = y if y.dtype == slope.dtype else y.to(slope.dtype)
        # d/dy log sigma'(y) = (1-alpha) sigmoid(y) sigmoid(-y) / sigma'(y)  (stable for large |y|)
        dlog = torch.sigmoid(yf).mul_(torch.sigmoid(-yf)).mul_(1.0 - ctx.alpha).div_(slope)
        # out of place: addcmul_ has no vmap batching rule (torch.func would fall back to a slow loop)
        grad = torch.addcmul(grad_z.to(slope.dtype) * slope, dlog, grad_logdet.to(slope.dtype).unsqueeze(-1))
        return grad.to(y.dtype), None


def sigma_and_log_det(y: torch.Tensor, alpha: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The activation and its log-Jacobian together: ``(sigma(y), sum over the last axis of log sigma'(y))``.

    The same values as :func:`relgrad.torch.sigma` and :func:`relgrad.torch.log_sigma_prime` (summed), in
    one pass with a hand-written backward (``sigma'`` and ``sigma''/sigma'``): far fewer elementwise kernels
    than autograd through both formulas.  ``alpha`` is not validated here (the callers did it once).

    Shapes:
        y: (..., D); returns (..., D) and (...).
    """
    z, logdet, _ = SigmaAndLogDet.apply(y, alpha)
    return z, logdet
