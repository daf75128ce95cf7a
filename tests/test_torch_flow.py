"""relgrad.torch: activation, DenseFlow passes, exact log-likelihood, inverse, sampling, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from relgrad.errors import DeviceError, NonFiniteError, ShapeError, SingularWeightError
from relgrad.torch import (
    DEFAULT_ALPHA,
    DenseFlow,
    dlog_sigma_prime,
    log_sigma_prime,
    sigma,
    sigma_inverse,
    sigma_prime,
)

F64 = torch.float64


def random_flow(dim: int, n_layers: int, seed: int = 0, dtype: torch.dtype = F64, alpha: float = DEFAULT_ALPHA) -> DenseFlow:
    """A flow with non-orthogonal, well-conditioned weights and non-zero biases (the init is too special)."""
    g = torch.Generator().manual_seed(seed)
    model = DenseFlow(dim, n_layers, alpha=alpha, generator=g, dtype=dtype, device="cpu")
    with torch.no_grad():
        for w, b in zip(model.weights, model.biases):
            w.copy_(torch.eye(dim, dtype=F64) + 0.4 * torch.randn(dim, dim, generator=g, dtype=F64) / math.sqrt(dim))
            b.copy_(0.5 * torch.randn(dim, generator=g, dtype=F64))
    return model


def data(m: int, dim: int, seed: int = 1, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(m, dim, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


# --------------------------------------------------------------------------------------------- activation
@pytest.mark.parametrize("alpha", [0.01, 0.3, 0.9])
def test_activation_derivatives_match_autograd(alpha: float) -> None:
    u = torch.linspace(-40, 40, 2001, dtype=F64, requires_grad=True)
    (d1,) = torch.autograd.grad(sigma(u, alpha).sum(), u)
    assert torch.allclose(d1, sigma_prime(u, alpha), rtol=1e-14, atol=0)
    (d2,) = torch.autograd.grad(log_sigma_prime(u, alpha).sum(), u)
    # autograd computes sigmoid' as s*(1-s), which loses digits (then underflows) as u grows;
    # dlog_sigma_prime uses sigmoid(u)*sigmoid(-u) and stays accurate
    mid = u.detach().abs() <= 5
    assert torch.allclose(d2[mid], dlog_sigma_prime(u, alpha)[mid], rtol=1e-12, atol=0)
    assert torch.allclose(d2, dlog_sigma_prime(u, alpha), rtol=0, atol=1e-15)
    big = torch.tensor([50.0, 200.0], dtype=F64)  # tail: (1-alpha) e^{-u} (to first order)
    assert torch.allclose(dlog_sigma_prime(big, alpha), (1 - alpha) * torch.exp(-big), rtol=1e-12)
    sp = sigma_prime(u, alpha)  # in (alpha, 1); the ends are reached only by rounding
    assert bool(((sp >= alpha) & (sp <= 1)).all()) and bool(((sp > alpha) & (sp < 1))[mid].all())


@pytest.mark.parametrize("alpha", [0.01, 0.3, 0.9])
def test_sigma_inverse_exact_to_rounding(alpha: float) -> None:
    g = torch.Generator().manual_seed(0)
    u = torch.cat([torch.randn(20000, generator=g, dtype=F64) * 10,
                   torch.tensor([-1e6, -1e4, -30.0, -1.0, 0.0, 1.0, 30.0, 1e4, 1e6], dtype=F64)])
    back = sigma_inverse(sigma(u, alpha), alpha)
    err = ((back - u).abs() / u.abs().clamp_min(1.0)).max().item()
    assert err < 1e-14, err
    assert torch.isfinite(sigma(torch.tensor([-1e4, 1e4], dtype=F64), alpha)).all()


def test_sigma_large_inputs_and_float32() -> None:
    u = torch.tensor([-1e4, 1e4], dtype=torch.float32)
    assert torch.equal(sigma(u, 0.3), torch.tensor([-3e3, 1e4], dtype=torch.float32))
    assert sigma(u).dtype == torch.float32 and sigma_inverse(sigma(u)).dtype == torch.float32


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_alpha_outside_unit_interval(bad: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        sigma(torch.zeros(2), bad)
    with pytest.raises(ValueError, match="alpha"):
        DenseFlow(2, alpha=bad, device="cpu")


# --------------------------------------------------------------------------------------------- model
def test_init_is_orthogonal_with_zero_bias_and_seeded() -> None:
    a = DenseFlow(6, 3, generator=7, device="cpu", dtype=F64)
    b = DenseFlow(6, 3, generator=torch.Generator().manual_seed(7), device="cpu", dtype=F64)
    for wa, wb, ba in zip(a.weights, b.weights, a.biases):
        assert torch.allclose(wa.T @ wa, torch.eye(6, dtype=F64), atol=1e-13)
        assert torch.equal(wa, wb) and torch.equal(ba, torch.zeros(6, dtype=F64))
    assert not torch.equal(a.weights[0], a.weights[1])
    assert all(isinstance(w, torch.nn.Parameter) for w in a.weights) and len(list(a.parameters())) == 6
    assert [type(m).__name__ for m in a.layers] == ["RelativeLinear"] * 3
    assert a.dim == 6 and a.n_layers == 3 and a.alpha == DEFAULT_ALPHA
    assert DenseFlow(3, device="cpu").dtype == torch.float32


def test_trace_caches_layer_inputs_and_preactivations() -> None:
    model = random_flow(4, 3)
    x = data(5, 4)
    tr = model.trace(x)
    assert len(tr.zs) == 3 and len(tr.ys) == 3 and torch.equal(tr.zs[0], x)
    for k in range(3):
        assert torch.allclose(tr.ys[k], tr.zs[k] @ model.weights[k].T + model.biases[k], atol=1e-15)
    assert torch.allclose(tr.zs[1], sigma(tr.ys[0], model.alpha), atol=0)
    # the same product in and outside an autograd Function may round differently in the last bit (seen on Intel)
    torch.testing.assert_close(tr.s, model(x)[0], rtol=0, atol=1e-14)


def brute_force_log_likelihood(model: DenseFlow, x: torch.Tensor) -> torch.Tensor:
    """log N(s) + log|det J(x)| with J from autograd.functional.jacobian on each sample."""
    out = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda v: model(v[None])[0][0], xi)
        s = model(xi[None])[0][0]
        base = -0.5 * (s @ s) - 0.5 * len(s) * math.log(2 * math.pi)
        out.append(base + torch.linalg.slogdet(jac).logabsdet)
    return torch.stack(out)


@pytest.mark.parametrize("dim,n_layers", [(1, 1), (2, 2), (5, 3), (9, 4), (16, 2), (16, 4)])
def test_log_likelihood_terms_match_brute_force_jacobian(dim: int, n_layers: int) -> None:
    model = random_flow(dim, n_layers, seed=dim + n_layers)
    x = data(6, dim, seed=dim)
    terms = model.log_likelihood_terms(x)
    brute = brute_force_log_likelihood(model, x)
    rel = ((terms.total() - brute).abs() / brute.abs()).max().item()
    print(f"D={dim} L={n_layers}: log-likelihood vs brute-force Jacobian rel err {rel:.2e}")
    assert rel <= 1e-10
    # the logdet term is the parameter-only sum, broadcast over the batch
    assert torch.allclose(terms.logdet, model.logdet_weights().sum().expand(6))
    assert terms.base.shape == terms.activation.shape == (6,)
    if n_layers == 1:
        assert torch.equal(terms.activation, torch.zeros(6, dtype=F64))


def test_logdet_weights_per_layer() -> None:
    model = random_flow(5, 3)
    expected = torch.stack([torch.log(torch.linalg.det(w).abs()) for w in model.weights])
    assert model.logdet_weights().shape == (3,)
    assert torch.allclose(model.logdet_weights(), expected, rtol=1e-12)


@pytest.mark.parametrize("dim,n_layers", [(1, 1), (3, 2), (8, 4)])
def test_inverse_of_forward(dim: int, n_layers: int) -> None:
    model = random_flow(dim, n_layers)
    x = data(50, dim) * 3
    back = model.inverse(model(x)[0])
    rel = ((back - x).norm() / x.norm()).item()
    assert rel <= 1e-8, rel
    assert torch.allclose(model(model.inverse(x))[0], x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_shape_dtype_device_and_seed(dtype: torch.dtype) -> None:
    model = random_flow(3, 2, dtype=dtype)
    xs = model.sample(7, generator=3)
    assert xs.shape == (7, 3) and xs.dtype == dtype and xs.device.type == "cpu"
    assert torch.equal(xs, model.sample(7, generator=torch.Generator().manual_seed(3)))
    assert not xs.requires_grad
    # samples are the inverse of standard-normal draws
    s = torch.randn(7, 3, generator=torch.Generator().manual_seed(3), dtype=dtype)
    assert torch.allclose(model(xs)[0], s, atol=1e-4 if dtype == torch.float32 else 1e-10)


def test_float32_model_outputs_float32() -> None:
    model = random_flow(4, 2, dtype=torch.float32)
    x = data(3, 4)  # float64 input is cast to the model's dtype
    assert model(x)[0].dtype == torch.float32 and model.log_likelihood(x).dtype == torch.float32
    ll64 = random_flow(4, 2).log_likelihood(x)
    assert torch.allclose(model.log_likelihood(x).double(), ll64, rtol=1e-5)


# --------------------------------------------------------------------------------------------- bad input
def test_wrong_shapes_raise_shape_error() -> None:
    model = random_flow(3, 2)
    for bad in (torch.zeros(3, dtype=F64), torch.zeros(2, 4, dtype=F64), torch.zeros(1, 2, 3, dtype=F64),
                torch.zeros(0, 3, dtype=F64)):
        with pytest.raises(ShapeError):
            model.log_likelihood(bad)
        with pytest.raises(ShapeError):
            model(bad)
    with pytest.raises(ShapeError, match="columns"):
        model.inverse(torch.zeros(2, 4, dtype=F64))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_data_raises(value: float) -> None:
    model = random_flow(3, 2)
    x = data(4, 3)
    x[2, 1] = value
    with pytest.raises(NonFiniteError):
        model.log_likelihood(x)
    with pytest.raises(NonFiniteError):
        model.trace(x)


@pytest.mark.parametrize("kind", ["zero_row", "rank_deficient", "nan", "inf"])
def test_singular_or_non_finite_weights_name_the_layer(kind: str) -> None:
    model = random_flow(4, 3)
    with torch.no_grad():
        w = model.weights[1]
        if kind == "zero_row":
            w[2] = 0.0
        elif kind == "rank_deficient":
            w[3] = 0.3 * w[0] - 1.7 * w[1]
        else:
            w[0, 0] = float(kind)
    with pytest.raises(SingularWeightError, match="layer 2 of 3"):
        model.log_likelihood(data(2, 4))
    with pytest.raises(SingularWeightError, match="layer 2 of 3"):
        model.inverse(data(2, 4))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_gpu_raises_device_error() -> None:
    with pytest.raises(DeviceError, match="CUDA"):
        DenseFlow(3, device="cuda")


def test_auto_device_and_numpy_input() -> None:
    model = DenseFlow(2, 1, device=None, dtype=F64, generator=0)
    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    ll = model.log_likelihood(np.zeros((2, 2)))
    assert ll.shape == (2,) and np.isclose(ll[0].item(), -math.log(2 * math.pi))
