"""The smooth leaky ReLU of relgrad.numpy: derivatives against finite differences, the Newton inverse, stability."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from relgrad.numpy import DEFAULT_ALPHA, dlog_sigma_prime, log_sigma_prime, sigma, sigma_inverse, sigma_prime

ALPHAS = [0.01, DEFAULT_ALPHA, 0.9]
U = np.linspace(-15.0, 15.0, 601)
H = 1e-5  # central differences: truncation O(h^2) ~ 1e-10, rounding O(eps/h) ~ 1e-11


def central_difference(f, u: np.ndarray, h: float = H) -> np.ndarray:
    return (f(u + h) - f(u - h)) / (2.0 * h)


def max_rel_err(actual: np.ndarray, expected: np.ndarray, floor: float = 0.0) -> float:
    return float(np.max(np.abs(actual - expected) / np.maximum(np.abs(expected), floor)))


@pytest.mark.parametrize("alpha", ALPHAS)
def test_sigma_prime_matches_finite_differences(alpha: float) -> None:
    fd = central_difference(lambda u: sigma(u, alpha), U)
    assert max_rel_err(sigma_prime(U, alpha), fd) < 1e-8  # measured: <= 2.5e-10


@pytest.mark.parametrize("alpha", ALPHAS)
def test_log_sigma_prime_is_log_of_derivative(alpha: float) -> None:
    fd = central_difference(lambda u: sigma(u, alpha), U)
    # log(fd) inherits fd's absolute error (~1e-10), so compare absolutely here ...
    assert np.abs(log_sigma_prime(U, alpha) - np.log(fd)).max() < 1e-9
    np.testing.assert_allclose(np.exp(log_sigma_prime(U, alpha)), sigma_prime(U, alpha), rtol=1e-14)
    # ... and check the far right tail relatively: log sigma'(u) ~ -(1 - alpha) e^{-u}, which log(sigma') would lose
    u = np.array([40.0, 60.0, 80.0])  # far enough that the next term of the expansion, e^{-2u}, is below 1e-17
    np.testing.assert_allclose(log_sigma_prime(u, alpha), -(1 - alpha) * np.exp(-u), rtol=1e-12)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_dlog_sigma_prime_matches_finite_differences(alpha: float) -> None:
    fd = central_difference(lambda u: log_sigma_prime(u, alpha), U)
    # far in the tails the derivative is ~e^{-|u|}: compare relative to a floor there (absolute error ~1e-11)
    assert max_rel_err(dlog_sigma_prime(U, alpha), fd, floor=1e-4) < 1e-6  # measured: <= 3e-7 (FD noise at the floor)


def test_values_at_known_points() -> None:
    a = 0.3
    np.testing.assert_allclose(sigma(0.0, a), (1 - a) * np.log(2.0), rtol=1e-15)
    np.testing.assert_allclose(sigma_prime(0.0, a), a + (1 - a) / 2, rtol=1e-15)
    np.testing.assert_allclose(dlog_sigma_prime(0.0, a), (1 - a) * 0.25 / (a + (1 - a) / 2), rtol=1e-15)
    # asymptotes: slope 1 on the right, alpha on the left
    np.testing.assert_allclose(sigma(1e3, a), 1e3, rtol=1e-15)
    np.testing.assert_allclose(sigma(-1e3, a), -1e3 * a, rtol=1e-15)


def roundtrip_grid() -> np.ndarray:
    mags = np.logspace(-300, 6, 3000)
    return np.concatenate([-mags[::-1], [0.0], mags])


@pytest.mark.parametrize("alpha", ALPHAS)
def test_sigma_inverse_roundtrip_to_machine_precision(alpha: float) -> None:
    u = roundtrip_grid()
    u_back = sigma_inverse(sigma(u, alpha), alpha)
    # Relative to max(|u|, 1): for |u| << 1, sigma(u) ~ (1-alpha) log 2 only stores u to absolute precision
    # ~1e-16, so no inverse can recover tiny u relatively; for |u| >= 1 this is the plain relative error.
    err = np.abs(u_back - u) / np.maximum(np.abs(u), 1.0)
    assert err.max() <= 1e-12, err.max()  # measured: <= 4.6e-16
    big = np.abs(u) >= 1.0
    assert (np.abs(u_back - u)[big] / np.abs(u[big])).max() <= 1e-12


@pytest.mark.parametrize("alpha", ALPHAS)
def test_sigma_of_inverse_is_identity(alpha: float) -> None:
    mags = np.logspace(-12, 6, 500)
    v = np.concatenate([-mags, [0.0], mags])
    np.testing.assert_allclose(sigma(sigma_inverse(v, alpha), alpha), v, rtol=1e-13, atol=1e-15)


def test_sigma_inverse_shapes_dtypes_and_non_finite() -> None:
    assert sigma_inverse(0.5).shape == ()
    assert sigma_inverse(np.zeros((2, 3, 4))).shape == (2, 3, 4)
    assert sigma_inverse(np.float32(1.5)).dtype == np.float32
    assert sigma_inverse(np.array([1, 2])).dtype == np.float64  # integers are promoted
    out = sigma_inverse(np.array([np.nan, np.inf, -np.inf]))
    assert np.isnan(out[0]) and out[1] == np.inf and out[2] == -np.inf


def test_sigma_inverse_is_monotone_newton_from_the_right() -> None:
    # with max_iter=1 the iterate must already be at or right of the root (the safeguarded start)
    u = np.linspace(-50, 50, 101)
    v = sigma(u)
    assert np.all(sigma_inverse(v, max_iter=1) >= u - 1e-12)


def test_no_runtime_warnings_for_large_inputs() -> None:
    u = np.array([-1e308, -1e6, -1e4, -800.0, 0.0, 800.0, 1e4, 1e6, 1e308])
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        for f in (sigma, sigma_prime, log_sigma_prime, dlog_sigma_prime):
            assert np.all(np.isfinite(f(u)))
        u_mid = u[1:-1]
        np.testing.assert_allclose(sigma_inverse(sigma(u_mid)), u_mid, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.5, 1.5, float("nan"), float("inf")])
def test_alpha_outside_open_unit_interval_raises(bad: float) -> None:
    for f in (sigma, sigma_prime, log_sigma_prime, dlog_sigma_prime, sigma_inverse):
        with pytest.raises(ValueError, match="alpha"):
            f(np.ones(3), bad)
