"""relgrad.numpy.DenseFlow: the log-likelihood decomposition, inverse, sampling and input validation."""

from __future__ import annotations

import numpy as np
import pytest

from relgrad.errors import NonFiniteError, ShapeError, SingularWeightError
from relgrad.numpy import DenseFlow, LogLikelihoodTerms, Trace, sigma_prime


def random_flow(dim: int, n_layers: int, seed: int, alpha: float = 0.3) -> DenseFlow:
    """A flow whose weights are far from orthogonal (orthogonal + 0.3 Gaussian) and whose biases are nonzero."""
    rng = np.random.default_rng(seed)
    model = DenseFlow(dim, n_layers, alpha=alpha, rng=rng)
    for w, b in zip(model.weights, model.biases):
        w += 0.3 * rng.standard_normal(w.shape)
        b += 0.5 * rng.standard_normal(b.shape)
    return model


def explicit_jacobians(model: DenseFlow, x: np.ndarray) -> np.ndarray:
    """J = W_L D_{L-1} W_{L-1} ... D_1 W_1 per sample, with D_k = diag(sigma'(y_k)).  Shape (M, D, D)."""
    tr = model.trace(x)
    jac = np.broadcast_to(model.weights[0], (x.shape[0], model.dim, model.dim)).copy()
    for k in range(1, model.n_layers):
        jac = model.weights[k] @ (sigma_prime(tr.ys[k - 1], model.alpha)[:, :, None] * jac)
    return jac


def finite_difference_jacobians(model: DenseFlow, x: np.ndarray, h: float = 1e-4) -> np.ndarray:
    """Central differences of forward(), column by column.  Shape (M, D, D).

    h = 1e-4 balances truncation (h^2) against rounding (eps / h), which the slogdet amplifies by cond(J)
    (up to ~1e6 for the 16-D, 4-layer case).
    """
    jac = np.empty((x.shape[0], model.dim, model.dim))
    for j in range(model.dim):
        e = np.zeros(model.dim)
        e[j] = h
        jac[:, :, j] = (model.forward(x + e) - model.forward(x - e)) / (2.0 * h)
    return jac


CASES = [(1, 1), (2, 2), (3, 4), (5, 3), (8, 2), (16, 4), (16, 1)]


@pytest.mark.parametrize("dim,n_layers", CASES)
def test_log_det_terms_match_explicit_jacobian(dim: int, n_layers: int) -> None:
    model = random_flow(dim, n_layers, seed=10 * dim + n_layers)
    x = np.random.default_rng(dim).standard_normal((6, dim)) * 1.5
    terms = model.log_likelihood_terms(x)
    log_det_model = terms.activation + terms.logdet
    sign, log_det = np.linalg.slogdet(explicit_jacobians(model, x))
    assert np.all(sign != 0)
    rel = np.abs(log_det_model - log_det) / np.maximum(np.abs(log_det), 1.0)
    assert rel.max() < 1e-12, rel.max()  # measured: <= 2.1e-13 (worst: D=16, L=4, cond(J) ~ 6e5)


@pytest.mark.parametrize("dim,n_layers", CASES)
def test_log_det_terms_match_finite_difference_jacobian(dim: int, n_layers: int) -> None:
    model = random_flow(dim, n_layers, seed=10 * dim + n_layers)
    x = np.random.default_rng(dim).standard_normal((6, dim)) * 1.5
    terms = model.log_likelihood_terms(x)
    _, log_det = np.linalg.slogdet(finite_difference_jacobians(model, x))
    rel = np.abs(terms.activation + terms.logdet - log_det) / np.maximum(np.abs(log_det), 1.0)
    assert rel.max() < 1e-7, rel.max()  # measured: <= 5e-9 (finite-difference error)


def test_terms_structure_and_base_term() -> None:
    model = random_flow(4, 3, seed=0)
    x = np.random.default_rng(1).standard_normal((5, 4))
    terms = model.log_likelihood_terms(x)
    assert isinstance(terms, LogLikelihoodTerms)
    for field in (terms.base, terms.activation, terms.logdet, terms.total()):
        assert field.shape == (5,) and field.dtype == np.float64
    s = model.forward(x)
    np.testing.assert_allclose(terms.base, -0.5 * (s**2).sum(1) - 2.0 * np.log(2 * np.pi), rtol=1e-14)
    np.testing.assert_allclose(terms.logdet, np.linalg.slogdet(np.stack(model.weights))[1].sum(), rtol=1e-12)
    np.testing.assert_array_equal(model.log_likelihood(x), terms.total())
    np.testing.assert_allclose(model.logdet_weights(), np.linalg.slogdet(np.stack(model.weights))[1], rtol=1e-12)


def test_affine_flow_is_a_gaussian() -> None:
    """n_layers=1: s = W x + b, so p(x) = N(x; -W^{-1} b, (W^T W)^{-1})."""
    model = random_flow(3, 1, seed=2)
    w, b = model.weights[0], model.biases[0]
    mean, cov = -np.linalg.solve(w, b), np.linalg.inv(w.T @ w)
    x = np.random.default_rng(3).standard_normal((10, 3))
    diff = x - mean
    expected = -0.5 * np.einsum("md,de,me->m", diff, np.linalg.inv(cov), diff) - 0.5 * (
        3 * np.log(2 * np.pi) + np.linalg.slogdet(cov)[1]
    )
    np.testing.assert_allclose(model.log_likelihood(x), expected, rtol=1e-12)


def test_density_integrates_to_one_in_1d() -> None:
    model = random_flow(1, 3, seed=4)
    grid = np.linspace(-60.0, 60.0, 120001)[:, None]
    mass = np.trapezoid(np.exp(model.log_likelihood(grid)), grid[:, 0])
    assert abs(mass - 1.0) < 1e-6, mass


def test_trace_contents() -> None:
    model = random_flow(3, 3, seed=5)
    x = np.random.default_rng(6).standard_normal((4, 3))
    tr = model.trace(x)
    assert isinstance(tr, Trace) and len(tr.zs) == 3 and len(tr.ys) == 3
    np.testing.assert_array_equal(tr.zs[0], x)
    np.testing.assert_array_equal(tr.s, model.forward(x))
    np.testing.assert_allclose(tr.ys[1], tr.zs[1] @ model.weights[1].T + model.biases[1], rtol=1e-14)


def test_init_is_orthogonal_with_zero_bias_and_seeded() -> None:
    model = DenseFlow(6, 3, rng=7)
    for w, b in zip(model.weights, model.biases):
        np.testing.assert_allclose(w @ w.T, np.eye(6), atol=1e-13)
        assert w.dtype == np.float64 and w.flags.c_contiguous and not b.any()
    again = DenseFlow(6, 3, rng=np.random.default_rng(7))
    for w1, w2 in zip(model.weights, again.weights):
        np.testing.assert_array_equal(w1, w2)
    assert not np.array_equal(DenseFlow(6, 3, rng=8).weights[0], model.weights[0])
    assert model.parameters()[0] is model.weights[0] and model.parameters()[3] is model.biases[0]


def test_orthogonal_init_is_unbiased() -> None:
    """Haar-distributed Q has E[Q] = 0; plain QR (without moving R's diagonal signs into Q) gives E[Q_00] ~ -0.5."""
    first = np.array([DenseFlow(3, 1, rng=seed).weights[0][0, 0] for seed in range(1000)])
    assert abs(first.mean()) < 0.1  # standard error ~0.018


@pytest.mark.parametrize("dim,n_layers", [(1, 1), (2, 3), (7, 2), (16, 4)])
def test_inverse_of_forward_is_identity(dim: int, n_layers: int) -> None:
    model = random_flow(dim, n_layers, seed=dim + n_layers)
    x = np.random.default_rng(0).standard_normal((50, dim)) * 3.0
    x_back = model.inverse(model.forward(x))
    rel = np.linalg.norm(x_back - x) / np.linalg.norm(x)
    assert rel <= 1e-8, rel  # measured: <= 5.3e-13
    s = np.random.default_rng(1).standard_normal((50, dim))
    np.testing.assert_allclose(model.forward(model.inverse(s)), s, rtol=1e-8, atol=1e-10)


def test_sample_shapes_dtype_and_reproducibility() -> None:
    model = random_flow(3, 2, seed=9)
    a = model.sample(11, rng=123)
    assert a.shape == (11, 3) and a.dtype == np.float64 and np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, model.sample(11, rng=np.random.default_rng(123)))
    assert not np.array_equal(a, model.sample(11, rng=124))
    # samples are the inverse flow applied to standard normal draws
    np.testing.assert_allclose(model.forward(a), np.random.default_rng(123).standard_normal((11, 3)), atol=1e-10)
    m32 = DenseFlow(3, 2, rng=0, dtype=np.float32)
    assert m32.sample(4, rng=0).dtype == np.float32 and m32.log_likelihood(np.zeros((2, 3))).dtype == np.float32
    with pytest.raises(ValueError, match="positive int"):
        model.sample(0)


def test_sample_moments_match_model() -> None:
    """For an affine flow, samples have the model's mean -W^{-1} b and covariance (W^T W)^{-1}."""
    model = random_flow(2, 1, seed=11)
    w, b = model.weights[0], model.biases[0]
    x = model.sample(200_000, rng=0)
    np.testing.assert_allclose(x.mean(0), -np.linalg.solve(w, b), atol=0.02)
    np.testing.assert_allclose(np.cov(x.T), np.linalg.inv(w.T @ w), atol=0.02)


# ------------------------------------------------------------------------------------ bad input
def test_wrong_shapes_raise_shape_error() -> None:
    model = DenseFlow(3, 2, rng=0)
    for method in (model.forward, model.log_likelihood, model.inverse, model.trace, model.log_likelihood_terms):
        with pytest.raises(ShapeError, match="2-D batch"):
            method(np.zeros(3))
        with pytest.raises(ShapeError, match="dimension D=3"):
            method(np.zeros((5, 4)))
        with pytest.raises(ShapeError, match="empty"):
            method(np.zeros((0, 3)))
    assert issubclass(ShapeError, ValueError)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_data_raise(bad: float) -> None:
    model = DenseFlow(3, 2, rng=0)
    x = np.zeros((4, 3))
    x[2, 1] = bad
    for method in (model.forward, model.log_likelihood, model.inverse):
        with pytest.raises(NonFiniteError, match="NaN or infinite"):
            method(x)


@pytest.mark.parametrize("kind", ["zero_row", "rank_deficient", "nan", "inf", "zero"])
def test_singular_or_non_finite_weights_name_the_layer(kind: str) -> None:
    model = random_flow(4, 3, seed=3)
    w = model.weights[1]
    if kind == "zero_row":
        w[2] = 0.0
    elif kind == "rank_deficient":
        w[3] = w[0] + 2.0 * w[1]
    elif kind == "nan":
        w[0, 0] = np.nan
    elif kind == "inf":
        w[1, 2] = np.inf
    else:
        w[...] = 0.0
    x = np.ones((2, 4))
    for call in (model.logdet_weights, lambda: model.log_likelihood(x), lambda: model.inverse(x)):
        with pytest.raises(SingularWeightError, match="layer 2 of 3"):
            call()


def test_constructor_validation() -> None:
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError):
            DenseFlow(bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            DenseFlow(2, bad)  # type: ignore[arg-type]
    for alpha in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="alpha"):
            DenseFlow(2, alpha=alpha)
    with pytest.raises(ValueError, match="floating"):
        DenseFlow(2, dtype=np.int64)
