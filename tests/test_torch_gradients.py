"""relgrad.torch gradients: identities between the four methods, the custom autograd Functions, op and FLOP
counts of a training step."""

from __future__ import annotations

from typing import List

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from relgrad.training import METHODS
from relgrad.torch import (
    DenseFlow,
    deltas,
    dlog_sigma_prime,
    gradients,
    loss_and_gradients,
    sigma,
    sigma_prime,
    training_loss,
)

from torch_helpers import F64, data, forbidden_ops, random_flow

SHAPES = [(1, 1), (3, 1), (2, 2), (5, 3), (8, 4)]


def max_rel(a: List[torch.Tensor], b: List[torch.Tensor]) -> float:
    return max(((x - y).norm() / y.norm()).item() for x, y in zip(a, b))


def flat(grads) -> List[torch.Tensor]:
    return [t for pair in grads for t in pair]


# --------------------------------------------------------------------------------------------- deltas
@pytest.mark.parametrize("dim,n_layers", SHAPES)
def test_deltas_match_handwritten_backprop(dim: int, n_layers: int) -> None:
    model = random_flow(dim, n_layers)
    x = data(7, dim)
    tr = model.trace(x)
    got = deltas(model, tr)
    # Delta_L = S/M; Delta_k = (Delta_{k+1} W_{k+1}) * sigma'(Y_k) - sigma''/sigma'(Y_k) / M
    want = [tr.s / 7]
    for k in range(n_layers - 2, -1, -1):
        y = tr.ys[k]
        want.insert(0, (want[0] @ model.weights[k + 1]) * sigma_prime(y, model.alpha) - dlog_sigma_prime(y, model.alpha) / 7)
    assert len(got) == n_layers
    assert max_rel(got, [w.detach() for w in want]) < 1e-13


# --------------------------------------------------------------------------------------------- identities
@pytest.mark.parametrize("dim,n_layers", SHAPES)
def test_ordinary_equals_autodiff(dim: int, n_layers: int) -> None:
    model = random_flow(dim, n_layers, seed=dim)
    x = data(9, dim)
    ordinary, autodiff = gradients(model, x, "ordinary"), gradients(model, x, "autodiff")
    err = max_rel(flat(ordinary), flat(autodiff))
    print(f"D={dim} L={n_layers}: |ordinary - autodiff| / |autodiff| = {err:.1e}")
    assert err < 1e-12
    # and the autodiff gradient is the gradient of the exact mean NLL
    params = list(model.parameters())
    nll = -model.log_likelihood(x).mean()
    exact = torch.autograd.grad(nll, [p for pair in zip(model.weights, model.biases) for p in pair])
    assert max_rel(flat(autodiff), list(exact)) < 1e-13
    assert len(params) == 2 * n_layers


def augmented_relative(w: torch.Tensor, b: torch.Tensor, dw: torch.Tensor, db: torch.Tensor):
    """[G | g] Ahat^T Ahat, top D rows, with Ahat = [[W, b], [0, 1]]: the definition (O(D^3), test only)."""
    dim = w.shape[0]
    a_hat = torch.zeros(dim + 1, dim + 1, dtype=w.dtype)
    a_hat[:dim, :dim], a_hat[:dim, dim], a_hat[dim, dim] = w, b, 1.0
    out = torch.cat([dw, db[:, None]], dim=1) @ (a_hat.T @ a_hat)
    return out[:, :dim], out[:, dim]


@pytest.mark.parametrize("dim,n_layers", SHAPES)
def test_relative_is_ordinary_times_augmented_metric(dim: int, n_layers: int) -> None:
    model = random_flow(dim, n_layers, seed=10 + dim)
    x = data(6, dim, seed=2)
    relative, autodiff = gradients(model, x, "relative"), gradients(model, x, "autodiff")
    want = [augmented_relative(w.detach(), b.detach(), dw, db)
            for w, b, (dw, db) in zip(model.weights, model.biases, autodiff)]
    err = max_rel(flat(relative), flat(want))
    print(f"D={dim} L={n_layers}: |relative - [G|g] Ahat^T Ahat| / |.| = {err:.1e}")
    assert err <= 1e-10
    authors = gradients(model, x, "authors")
    for (rw, rb), (aw, ab), b in zip(relative, authors, model.biases):
        # the weight rule is the same (evaluated in another order, so equal up to rounding)
        assert torch.allclose(aw, rw, rtol=1e-12, atol=1e-12)
        assert torch.allclose(ab - rb, b.detach(), rtol=0, atol=1e-12)  # authors lack exactly the "-b"


@pytest.mark.parametrize("seed", range(6))
def test_relative_gradient_is_a_descent_direction(seed: int) -> None:
    """Per layer <G, G Ahat^T Ahat> = |G Ahat^T|_F^2 >= 0 with G = [G_W | g_b] the ordinary gradient
    (DESIGN 4): the inner product of the two methods' gradients is that squared norm, hence positive."""
    model = random_flow(6, 3, seed=seed, bias_scale=0.3 + seed)
    x = data(20, 6, seed=seed + 1)
    ordinary, relative = gradients(model, x, "ordinary"), gradients(model, x, "relative")
    for (ow, ob), (rw, rb), w, b in zip(ordinary, relative, model.weights, model.biases):
        inner = float((ow * rw).sum() + (ob * rb).sum())
        a_hat = torch.eye(7, dtype=F64)
        a_hat[:6, :6], a_hat[:6, 6] = w.detach(), b.detach()
        norm2 = float((torch.cat([ow, ob[:, None]], 1) @ a_hat.T).pow(2).sum())
        assert inner > 0 and inner == pytest.approx(norm2, rel=1e-10)


def reference_grads(model: DenseFlow, x: torch.Tensor, method: str):
    """Each method's gradient from an independent route: autograd of the exact mean NLL (slogdet), then the
    definition of the rule on top of it (``[G | g] Ahat^T Ahat``; the authors' rule lacks the ``-b``; the mixed
    rule is ``(G W^T W, g)``)."""
    nll = -model.log_likelihood(x).mean()
    exact = torch.autograd.grad(nll, [p for pair in zip(model.weights, model.biases) for p in pair])
    out = []
    for k, (w, b) in enumerate(zip(model.weights, model.biases)):
        dw, db = exact[2 * k], exact[2 * k + 1]
        if method in ("relative", "authors"):
            dw, db = augmented_relative(w.detach(), b.detach(), dw, db)
            if method == "authors":
                db = db + b.detach()
        elif method == "mixed":
            dw = dw @ (w.detach().T @ w.detach())
        out.append((dw, db))
    return out


@pytest.mark.parametrize("method", METHODS)
def test_training_loss_value_and_backward(method: str) -> None:
    model = random_flow(4, 3)
    x = data(5, 4)
    loss = training_loss(model, x, method)
    terms = model.log_likelihood_terms(x)
    data_part = -(terms.base + terms.activation).mean()
    expected = data_part - terms.logdet[0] if method == "autodiff" else data_part
    assert torch.allclose(loss, expected, rtol=1e-14)
    assert loss.shape == ()
    loss.backward()
    for (dw, db), w, b in zip(reference_grads(model, x, method), model.weights, model.biases):
        assert torch.allclose(w.grad, dw, rtol=1e-11, atol=1e-13) and torch.allclose(b.grad, db, rtol=1e-11, atol=1e-13)
    value, grads = loss_and_gradients(model, x, method)
    assert value == pytest.approx(loss.item(), rel=1e-14) and len(grads) == 3


def test_gradients_leave_existing_grad_untouched() -> None:
    model = random_flow(3, 2)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    gradients(model, data(4, 3), "relative")
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())


@pytest.mark.parametrize("scale", [3.0, -0.5])
def test_relative_backward_is_linear_in_the_loss_scale(scale: float) -> None:
    # the backward multiplies Delta and the stand-in's coefficient alike, whatever scales the loss
    model = random_flow(4, 2)
    x = data(5, 4)
    (scale * training_loss(model, x, "relative")).backward()
    for (dw, db), w, b in zip(reference_grads(model, x, "relative"), model.weights, model.biases):
        assert torch.allclose(w.grad, scale * dw, rtol=1e-11, atol=1e-13)
        assert torch.allclose(b.grad, scale * db, rtol=1e-11, atol=1e-13)


def test_sgd_step_applies_the_relative_gradient() -> None:
    """One torch.optim.SGD step moves the parameters by -lr times the relative gradient of its definition."""
    model = random_flow(5, 3)
    x = data(8, 5)
    lr = 0.05
    expected = [(w.detach() - lr * dw, b.detach() - lr * db)
                for (dw, db), w, b in zip(reference_grads(model, x, "relative"), model.weights, model.biases)]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    opt.zero_grad()
    training_loss(model, x, "relative").backward()
    opt.step()
    for (ew, eb), w, b in zip(expected, model.weights, model.biases):
        assert torch.allclose(w.detach(), ew, rtol=0, atol=1e-13) and torch.allclose(b.detach(), eb, rtol=0, atol=1e-13)


def test_float32_relative_gradient_close_to_float64() -> None:
    m64 = random_flow(6, 3)
    m32 = random_flow(6, 3, dtype=torch.float32)
    x = data(10, 6)
    g64, g32 = flat(gradients(m64, x, "relative")), flat(gradients(m32, x.float(), "relative"))
    assert all(g.dtype == torch.float32 for g in g32)
    assert max_rel([g.double() for g in g32], g64) < 1e-5


def test_unknown_method_lists_valid_ones() -> None:
    model = random_flow(2, 2)
    with pytest.raises(ValueError, match="relative.*authors.*mixed.*ordinary.*autodiff"):
        training_loss(model, data(3, 2), "natural")
    with pytest.raises(ValueError):
        gradients(model, data(3, 2), "Relative")


# --------------------------------------------------------------------------------------------- op and FLOP counts
# Any factorisation, inverse, solve or determinant: the O(D^3) work a relative step must never do.
@pytest.mark.parametrize("method", ["relative", "authors", "mixed"])
def test_relative_step_never_factorises(method: str) -> None:
    model = random_flow(16, 3)
    x = data(4, 16)
    assert forbidden_ops(model, x, method) == set()


def test_op_recorder_sees_slogdet_and_inverse() -> None:
    # the instrument can fail: the other methods do call the O(D^3) kernels
    model = random_flow(16, 3)
    x = data(4, 16)
    auto, ordinary = forbidden_ops(model, x, "autodiff"), forbidden_ops(model, x, "ordinary")
    assert any("slogdet" in op for op in auto), auto
    assert any(op.startswith("linalg_inv") for op in ordinary), ordinary


def counted_flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def plain_mlp_step(model: DenseFlow, x: torch.Tensor) -> None:
    """Backprop through the same MLP with nn.Linear-style layers and no log-determinant at all."""
    z = x
    for k, (w, b) in enumerate(zip(model.weights, model.biases)):
        y = torch.nn.functional.linear(z, w, b)
        z = sigma(y, model.alpha) if k < model.n_layers - 1 else y
    (0.5 * (z * z).sum()).backward()


@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_relative_step_flops_are_tight(n_layers: int) -> None:
    dim, m = 64, 8
    model = random_flow(dim, n_layers)
    x = data(m, dim)
    rel = counted_flops(lambda: training_loss(model, x, "relative").backward())
    plain = counted_flops(lambda: plain_mlp_step(model, x))
    rel_ratio, plain_ratio = rel / ((8 * n_layers - 2) * m * dim**2), plain / ((6 * n_layers - 2) * m * dim**2)
    print(f"L={n_layers}: relative {rel} flops = {rel_ratio:.3f} (8L-2)MD^2; plain MLP {plain} = {plain_ratio:.3f} (6L-2)MD^2")
    assert abs(rel_ratio - 1) < 0.1 and abs(plain_ratio - 1) < 0.1
    # the published evaluation order recomputes Z W^T in the backward: one more M x D x D product per layer
    authors = counted_flops(lambda: training_loss(model, x, "authors").backward())
    assert abs(authors / ((10 * n_layers - 2) * m * dim**2) - 1) < 0.1
    # the mixed rule takes the coupling out with an O(D^2) outer product: the relative step's products exactly
    assert counted_flops(lambda: training_loss(model, x, "mixed").backward()) == rel


def test_relative_linear_splits_into_data_and_logdet_parts() -> None:
    """RelativeAffine's two outputs: Y alone gives the data part Delta^T (Y W); the per-row stand-in r for
    +log|det W|, entered as the loss term -mean(r), gives -(W, b); a coefficient c on it scales only that part."""
    from relgrad.torch.functions import RelativeAffine

    g = torch.Generator().manual_seed(3)
    z = torch.randn(5, 4, generator=g, dtype=F64)
    w = torch.randn(4, 4, generator=g, dtype=F64).requires_grad_()
    b = torch.randn(4, generator=g, dtype=F64).requires_grad_()
    y, r = RelativeAffine.apply(z, w, b, "relative")
    assert r.shape == (5,) and torch.equal(r, torch.zeros(5, dtype=F64))
    delta = torch.randn(5, 4, generator=g, dtype=F64)
    data_w, data_b = torch.autograd.grad((y * delta).sum(), (w, b), retain_graph=True)
    yd = (z @ w.T + b).detach()
    assert torch.allclose(data_w, delta.T @ (yd @ w.detach()), rtol=1e-12, atol=1e-12)
    assert torch.allclose(data_b, delta.T @ (yd @ b.detach()) + delta.sum(0), rtol=1e-12, atol=1e-12)
    det_w, det_b = torch.autograd.grad(-r.mean(), (w, b), retain_graph=True)
    assert torch.allclose(det_w, -w.detach(), rtol=1e-15, atol=0) and torch.allclose(det_b, -b.detach(), rtol=1e-15, atol=0)
    both_w, both_b = torch.autograd.grad((y * delta).sum() - 2.5 * r.mean(), (w, b))
    assert torch.allclose(both_w, data_w - 2.5 * w.detach(), rtol=1e-12, atol=1e-12)
    assert torch.allclose(both_b, data_b - 2.5 * b.detach(), rtol=1e-12, atol=1e-12)


def test_weights_and_gradients_share_a_row_major_layout() -> None:
    """QR returns Q column-major; a transposed parameter would make autograd copy every gradient into its strides."""
    model = DenseFlow(6, 2, generator=0)
    training_loss(model, torch.randn(3, 6), "relative").backward()
    for w in model.weights:
        assert w.is_contiguous() and w.grad is not None and w.grad.stride() == w.stride()
