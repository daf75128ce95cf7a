"""relgrad.numpy gradients: hand-written backprop against finite differences, the relative/augmented identity,
the authors' bias rule, the descent property and the O(M D^2) evaluation (no inverse in a relative step)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relgrad.errors import SingularWeightError
from relgrad.numpy import DenseFlow, deltas, gradients, loss_and_gradients


def random_flow(dim: int, n_layers: int, seed: int, bias_scale: float = 0.5) -> DenseFlow:
    rng = np.random.default_rng(seed)
    model = DenseFlow(dim, n_layers, rng=rng)
    for w, b in zip(model.weights, model.biases):
        w += 0.3 * rng.standard_normal(w.shape)
        b += bias_scale * rng.standard_normal(b.shape)
    return model


def augmented(w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A = [[W, b], [0, 1]], shape (D+1, D+1)."""
    d = w.shape[0]
    a = np.zeros((d + 1, d + 1))
    a[:d, :d], a[:d, d], a[d, d] = w, b, 1.0
    return a


def fd_gradient(model: DenseFlow, x: np.ndarray, param: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central differences of the mean NLL (exact, with log|det W|) w.r.t. every entry of ``param`` (in place)."""
    grad = np.empty_like(param)
    for i in np.ndindex(param.shape):
        old = param[i]
        param[i] = old + h
        up = -model.log_likelihood(x).mean()
        param[i] = old - h
        down = -model.log_likelihood(x).mean()
        param[i] = old
        grad[i] = (up - down) / (2.0 * h)
    return grad


@pytest.mark.parametrize("dim,n_layers,m", [(1, 1, 5), (2, 3, 7), (3, 2, 4), (4, 4, 9)])
def test_ordinary_gradient_matches_finite_differences(dim: int, n_layers: int, m: int) -> None:
    model = random_flow(dim, n_layers, seed=dim * 7 + n_layers)
    x = np.random.default_rng(m).standard_normal((m, dim)) * 1.5
    grads = gradients(model, x, "ordinary")
    for k, (dw, db) in enumerate(grads):
        for analytic, param in ((dw, model.weights[k]), (db, model.biases[k])):
            fd = fd_gradient(model, x, param)
            rel = np.abs(analytic - fd).max() / np.abs(fd).max()
            assert rel < 1e-7, (k, rel)  # measured: <= 3.5e-9 (worst entry, relative to the largest)


def test_deltas_are_gradients_of_the_data_loss_wrt_preactivations() -> None:
    model = random_flow(3, 3, seed=1)
    x = np.random.default_rng(2).standard_normal((5, 3))
    tr = model.trace(x)
    ds = deltas(model, tr)
    assert [d.shape for d in ds] == [(5, 3)] * 3
    np.testing.assert_allclose(ds[-1], tr.s / 5, rtol=1e-15)  # d(-mean log N(s))/ds = s / M
    # Delta_k^T Z_{k-1} is the data part of the weight gradient: check it against FD of the surrogate loss
    b0 = model.biases[0]
    fd = np.empty(3)
    for i in range(3):
        b0[i] += 1e-6
        up = loss_and_gradients(model, x)[0]
        b0[i] -= 2e-6
        down = loss_and_gradients(model, x)[0]
        b0[i] += 1e-6
        fd[i] = (up - down) / 2e-6
    np.testing.assert_allclose(ds[0].sum(0), fd, rtol=1e-7)


def test_surrogate_loss_omits_only_the_logdet_term() -> None:
    model = random_flow(4, 2, seed=3)
    x = np.random.default_rng(4).standard_normal((6, 4))
    terms = model.log_likelihood_terms(x)
    for method in ("relative", "authors", "mixed", "ordinary"):
        loss, _ = loss_and_gradients(model, x, method)
        assert isinstance(loss, float)
        np.testing.assert_allclose(loss, -np.mean(terms.base + terms.activation), rtol=1e-14)


@pytest.mark.parametrize("dim,n_layers,m", [(1, 1, 3), (2, 2, 10), (5, 3, 4), (16, 4, 8), (16, 2, 40)])
def test_relative_gradient_is_augmented_ordinary_times_AtA(dim: int, n_layers: int, m: int) -> None:
    model = random_flow(dim, n_layers, seed=dim + 3 * n_layers)
    x = np.random.default_rng(m).standard_normal((m, dim))
    ordinary = gradients(model, x, "ordinary")
    relative = gradients(model, x, "relative")
    authors = gradients(model, x, "authors")
    for k in range(n_layers):
        w, b = model.weights[k], model.biases[k]
        a = augmented(w, b)
        expected = np.hstack([ordinary[k][0], ordinary[k][1][:, None]]) @ (a.T @ a)
        got = np.hstack([relative[k][0], relative[k][1][:, None]])
        rel = np.abs(got - expected).max() / np.abs(expected).max()
        assert rel <= 1e-10, (k, rel)  # measured: <= 1.1e-14
        # the authors' rule: same weight gradient (evaluated in the published order: equal up to rounding),
        # bias gradient larger by exactly +b (no "-b" term)
        np.testing.assert_allclose(authors[k][0], relative[k][0], rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(authors[k][1] - relative[k][1], b, rtol=1e-12, atol=1e-13)


def test_without_biases_authors_equals_relative_and_classic_formula() -> None:
    """b = 0: both rules reduce to the classic relative gradient (G - W^{-T}) W^T W = Delta^T (Y W) - W."""
    model = random_flow(5, 3, seed=5, bias_scale=0.0)
    x = np.random.default_rng(6).standard_normal((7, 5))
    ordinary, relative, authors = (gradients(model, x, mth) for mth in ("ordinary", "relative", "authors"))
    for k, w in enumerate(model.weights):
        np.testing.assert_allclose(relative[k][0], ordinary[k][0] @ w.T @ w, rtol=1e-10, atol=1e-13)
        for got, want in zip(authors[k], relative[k]):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)


def inner_products(model: DenseFlow, x: np.ndarray, method: str) -> list:
    """Per-layer <[dW_o | db_o], [dW_m | db_m]> between the ordinary gradient and ``method``'s direction."""
    ordinary, other = gradients(model, x, "ordinary"), gradients(model, x, method)
    return [float(np.vdot(go[0], gm[0]) + np.vdot(go[1], gm[1])) for go, gm in zip(ordinary, other)]


@settings(max_examples=60, deadline=None)
@given(
    dim=st.integers(1, 6),
    n_layers=st.integers(1, 4),
    m=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
    bias_scale=st.sampled_from([0.0, 0.5, 3.0]),
    x_scale=st.sampled_from([0.1, 1.0, 5.0]),
)
def test_relative_gradient_is_a_descent_direction(
    dim: int, n_layers: int, m: int, seed: int, bias_scale: float, x_scale: float
) -> None:
    """<G, G A^T A> = ||G A^T||^2 >= 0 per layer (augmented form), hence also summed over all parameters."""
    model = random_flow(dim, n_layers, seed=seed, bias_scale=bias_scale)
    x = np.random.default_rng(seed + 1).standard_normal((m, dim)) * x_scale
    ordinary = gradients(model, x, "ordinary")
    per_layer = inner_products(model, x, "relative")
    for k, value in enumerate(per_layer):
        w, b = model.weights[k], model.biases[k]
        g_hat = np.hstack([ordinary[k][0], ordinary[k][1][:, None]])
        norm_sq = float(np.linalg.norm(g_hat @ augmented(w, b).T) ** 2)  # the closed form of the inner product
        assert value >= -1e-12 * max(norm_sq, 1.0)
        np.testing.assert_allclose(value, norm_sq, rtol=1e-8, atol=1e-12)
    assert sum(per_layer) >= 0.0


@pytest.mark.parametrize("dim,n_layers,m", [(1, 1, 3), (2, 2, 10), (5, 3, 4), (16, 2, 40)])
def test_mixed_rule_is_the_weights_relative_gradient_and_the_ordinary_bias_gradient(dim: int, n_layers: int, m: int) -> None:
    """"mixed": dW = Gamma_W W^T W (Gamma_W the full ordinary weight gradient, checked against finite differences
    above), db = g_b; it is the strict rule minus the coupling outer(g_b, W^T b) on the weight."""
    model = random_flow(dim, n_layers, seed=5 * dim + n_layers)
    x = np.random.default_rng(m + 1).standard_normal((m, dim)) * 2.0
    ordinary, mixed, relative = (gradients(model, x, r) for r in ("ordinary", "mixed", "relative"))
    for k in range(n_layers):
        w, b = model.weights[k], model.biases[k]
        expected_w = ordinary[k][0] @ (w.T @ w)
        assert np.abs(mixed[k][0] - expected_w).max() <= 1e-10 * np.abs(expected_w).max()
        np.testing.assert_allclose(mixed[k][1], ordinary[k][1], rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(relative[k][0] - mixed[k][0], np.outer(ordinary[k][1], w.T @ b),
                                   rtol=1e-9, atol=1e-11)


@settings(max_examples=30, deadline=None)
@given(dim=st.integers(1, 6), n_layers=st.integers(1, 4), m=st.integers(1, 12), seed=st.integers(0, 2**32 - 1),
       bias_scale=st.sampled_from([0.0, 0.5, 3.0]))
def test_mixed_rule_is_a_descent_direction(dim: int, n_layers: int, m: int, seed: int, bias_scale: float) -> None:
    """<Gamma_W, Gamma_W W^T W> + <g_b, g_b> = ||W Gamma_W^T||^2 + ||g_b||^2 per layer, with any biases."""
    model = random_flow(dim, n_layers, seed=seed, bias_scale=bias_scale)
    x = np.random.default_rng(seed + 1).standard_normal((m, dim))
    ordinary = gradients(model, x, "ordinary")
    for k, value in enumerate(inner_products(model, x, "mixed")):
        closed = float(np.linalg.norm(model.weights[k] @ ordinary[k][0].T) ** 2 + ordinary[k][1] @ ordinary[k][1])
        np.testing.assert_allclose(value, closed, rtol=1e-8, atol=1e-12)
        assert value >= 0.0


@settings(max_examples=30, deadline=None)
@given(dim=st.integers(1, 6), n_layers=st.integers(1, 4), m=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))
def test_authors_rule_is_a_descent_direction_when_biases_vanish(dim: int, n_layers: int, m: int, seed: int) -> None:
    model = random_flow(dim, n_layers, seed=seed, bias_scale=0.0)
    x = np.random.default_rng(seed + 1).standard_normal((m, dim))
    assert all(v >= 0.0 for v in inner_products(model, x, "authors"))


def test_authors_rule_is_not_a_descent_direction_near_the_optimum() -> None:
    """With biases the authors' rule is NOT descent in general: near the ML solution of an affine Gaussian flow
    the ordinary gradient is small, while the authors' direction tends to [0, b] != 0 (its fixed point is
    elsewhere).  Shrinking the optimal bias by 1% makes their inner product negative; the relative one stays >= 0.
    """
    rng = np.random.default_rng(0)
    x = rng.multivariate_normal([3.0, -2.0], [[1.0, 0.6], [0.6, 0.5]], size=400)
    mu, cov = x.mean(0), np.cov(x.T, bias=True)
    model = DenseFlow(2, 1, rng=0)
    w = np.linalg.inv(np.linalg.cholesky(cov))  # W^T W = cov^{-1}: the ML weight (up to rotation)
    model.weights[0][...] = w
    model.biases[0][...] = -0.99 * (w @ mu)  # the ML bias is -W mu
    assert inner_products(model, x, "authors")[0] < 0.0
    assert inner_products(model, x, "relative")[0] > 0.0


def test_relative_and_authors_steps_never_invert_or_decompose(monkeypatch: pytest.MonkeyPatch) -> None:
    """The O(M D^2) promise: a relative/authors/mixed step calls no inverse, solve, determinant or factorisation."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("an O(D^3) linear-algebra routine was called in a relative-gradient step")

    model = random_flow(6, 3, seed=8)
    x = np.random.default_rng(9).standard_normal((4, 6))
    for name in ("inv", "solve", "slogdet", "det", "svd", "qr", "cholesky", "eig", "pinv", "lstsq"):
        monkeypatch.setattr(np.linalg, name, forbidden)
    for method in ("relative", "authors", "mixed"):
        assert len(gradients(model, x, method)) == 3
    with pytest.raises(AssertionError, match="O\\(D\\^3\\)"):
        gradients(model, x, "ordinary")  # the ordinary gradient does need W^{-1}: the patch is live


def test_gradient_shapes_and_dtypes() -> None:
    model = random_flow(3, 2, seed=10)
    x = np.random.default_rng(11).standard_normal((5, 3))
    for method in ("relative", "authors", "mixed", "ordinary"):
        grads = gradients(model, x, method)
        assert len(grads) == 2
        for dw, db in grads:
            assert dw.shape == (3, 3) and db.shape == (3,) and dw.dtype == db.dtype == np.float64


def test_unknown_and_torch_only_methods() -> None:
    model = DenseFlow(2, 2, rng=0)
    x = np.zeros((3, 2))
    with pytest.raises(ValueError, match="unknown gradient method 'natural'.*relative.*authors.*ordinary"):
        gradients(model, x, "natural")
    with pytest.raises(ValueError, match="relgrad.torch"):
        gradients(model, x, "autodiff")
    with pytest.raises(ValueError, match="unknown"):
        loss_and_gradients(model, x, "Relative")


def test_ordinary_gradient_with_singular_weight_names_the_layer() -> None:
    model = random_flow(3, 3, seed=12)
    model.weights[2][1] = 0.0
    with pytest.raises(SingularWeightError, match="layer 3 of 3"):
        gradients(model, np.ones((2, 3)), "ordinary")
