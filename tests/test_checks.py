"""relgrad.teaching.checks: each check passes the reference and names each typical mistake."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from relgrad.teaching import checks
from relgrad.numpy.gradients import relative_layer


def logdet_ref(W):
    return np.linalg.inv(W).T


def relgrad_ref(f, W):
    w = torch.tensor(W, dtype=torch.float64, requires_grad=True)
    f(w).backward()
    return w.grad.numpy() @ W.T


def _grad(f, W):
    w = torch.tensor(W, dtype=torch.float64, requires_grad=True)
    f(w).backward()
    return w.grad.numpy()


def update_ref(Delta, Z, W):
    return Delta.T @ ((Z @ W.T) @ W)


def layer_ref(W, b, Y, Delta):
    return relative_layer(np.asarray(W), np.asarray(b), np.asarray(Y), np.asarray(Delta), strict=True)


def bpd_ref(nats, dim, levels):
    return np.log2(levels) - nats / (dim * np.log(2))


def jac_ref(W, b, z, phi_prime):
    return phi_prime(W @ z + b)[:, None] * W


def ica_ref(W, X, mu):
    S = X @ W.T
    return W + mu * (np.eye(len(W)) + (-np.tanh(S)).T @ S / len(X)) @ W


def activity_ref(W, Z, lam):
    Y = Z @ W.T
    return lam / len(Z) * Y.T @ (Y @ W)


def _softplus(u):
    return np.logaddexp(0.0, u)


def _newton(v, alpha, steps=100, naive=False, divide_by_sigma=False):
    """sigma^{-1} by Newton; the flags reproduce typical mistakes."""
    softplus = (lambda u: np.log1p(np.exp(u))) if naive else _softplus
    sig = lambda u: alpha * u + (1 - alpha) * softplus(u)  # noqa: E731
    dsig = lambda u: alpha + (1 - alpha) / (1 + np.exp(-u))  # noqa: E731
    v = np.asarray(v, dtype=float)
    u = np.where(v >= 0, v, v / alpha)
    for _ in range(steps):
        new = u - (sig(u) - v) / (sig(u) if divide_by_sigma else dsig(u))
        new = np.minimum(new, u) if not divide_by_sigma else new
        if np.array_equal(new, u):
            break
        u = new
    return u


def newton_ref(v, alpha):
    return _newton(v, alpha)


def _newton_if(v, alpha):
    u = v if v >= 0 else v / alpha  # a Python if on an array
    return _newton(u, alpha)


def _newton_in_place(v, alpha):
    v[v < 0] /= alpha  # overwrites the caller's v, then solves the wrong equation
    return _newton(v, alpha)


def _phi(z):
    return np.exp(-0.5 * z ** 2) / np.sqrt(2 * np.pi)


def lognormal_ref(x):
    return _phi(np.log(x)) / x


def logdet_hand_ref(p):
    return np.log(1 - 0.25 * np.cos(p[1]) * (1 - np.tanh(p[0]) ** 2))


def memory_ref(dim, n_layers, bytes_per_number=4):
    return 3 * bytes_per_number * n_layers * (dim ** 2 + dim) / 2 ** 30


def convert_ref(nats, y, lam, levels):
    from relgrad.datasets import logit_log_jacobian
    d = y.shape[1]
    return -(nats + np.mean(logit_log_jacobian(y, lam)) - d * np.log(levels)) / (d * np.log(2))


def _jac_mean(y, lam):
    from relgrad.datasets import logit_log_jacobian
    return np.mean(logit_log_jacobian(y, lam))


def stub(*args):
    raise NotImplementedError("Exercise: your code here")


CASES = {
    "check_logdet_grad_2x2": (logdet_ref, [
        (lambda W: np.linalg.inv(W), "you returned W^{-1}"),
        (lambda W: np.linalg.inv(W).T * np.linalg.det(W), "cofactor matrix"),
        (lambda W: np.linalg.inv(W).T * np.sign(np.linalg.det(W)), "divided by |det W|"),
        (lambda W: -np.linalg.inv(W).T, "sign is flipped"),
    ]),
    "check_relative_gradient": (relgrad_ref, [
        (lambda f, W: _grad(f, W), "ordinary gradient"),
        (lambda f, W: _grad(f, W) @ W, "wrong transpose"),
        (lambda f, W: W.T @ _grad(f, W), "wrong side"),
        (lambda f, W: _grad(f, W) @ W.T @ W, "update direction"),
    ]),
    "check_relative_weight_update": (update_ref, [
        (lambda D, Z, W: D.T @ Z, "you returned Delta^T Z"),
        (lambda D, Z, W: D.T @ (Z @ W.T), "stopped at the relative gradient"),
        (lambda D, Z, W: D.T @ ((Z @ W) @ W.T), "wrong transpose"),
        (lambda D, Z, W: (D.T @ Z) @ (W.T @ W), "wrong cost"),
        (lambda D, Z, W: ((D.T @ Z) @ W.T) @ W, "wrong cost"),
        (lambda D, Z, W: np.dot(D.T, Z).dot(W.T.dot(W)), "wrong cost"),
    ]),
    "check_strict_layer_update": (layer_ref, [
        (lambda W, b, Y, D: (D.T @ (Y @ W) - W, D.T @ (Y @ b) + D.sum(axis=0)), "authors' bias rule"),
        (lambda W, b, Y, D: (D.T @ (Y @ W), D.T @ (Y @ b) + D.sum(axis=0) - b), "log-determinant term"),
        (lambda W, b, Y, D: (D.T @ (Y @ W) - W, D.T @ (Y @ b) - b), "lacks g_b"),
        (lambda W, b, Y, D: ((D.T @ Y) @ W - W, D.T @ (Y @ b) + D.sum(axis=0) - b), "wrong cost"),
    ]),
    "check_bpd_from_unit_nats": (bpd_ref, [
        (lambda n, d, k: -n / (d * np.log(2)), "add log2 K"),
        (lambda n, d, k: np.log(k) - n / (d * np.log(2)), "in bits it is log2 K"),
        (lambda n, d, k: np.log2(k) - n / d, "divide by D ln 2"),
        (lambda n, d, k: np.log2(k) - n / np.log(2), "divide by D as well"),
        (lambda n, d, k: np.log2(k) + n / (d * np.log(2)), "a higher log-likelihood gives fewer bits"),
        (lambda n, d, k: np.array([bpd_ref(n, d, k)]), "expected one number"),
    ]),
    "check_layer_jacobian": (jac_ref, [
        (lambda W, b, z, p: W * p(W @ z + b)[None, :], "must scale the rows"),
        (lambda W, b, z, p: p(z)[:, None] * W, "not at z"),
        (lambda W, b, z, p: p(W @ z)[:, None] * W, "the bias is missing"),
        (lambda W, b, z, p: (p(W @ z + b)[:, None] * W).T, "transposed"),
        (lambda W, b, z, p: np.diag(p(W @ z + b)), "diag(phi'(y)) alone"),
        (lambda W, b, z, p: W, "you returned W"),
    ]),
    "check_ica_step": (ica_ref, [
        (lambda W, X, mu: W + mu * (np.linalg.inv(W).T - np.tanh(X @ W.T).T @ X / len(X)), "infomax"),
        (lambda W, X, mu: W + mu * (-np.tanh(X @ W.T)).T @ (X @ W.T) / len(X) @ W, "identity is missing"),
        (lambda W, X, mu: W + mu * (np.eye(3) + (X @ W.T).T @ (-np.tanh(X @ W.T)) / len(X)) @ W, "transposed"),
        (lambda W, X, mu: W + mu * (np.eye(3) + (-np.tanh(X @ W.T)).T @ (X @ W.T)) @ W, "not the sum"),
        (lambda W, X, mu: W + mu * (np.eye(3) + np.tanh(X @ W.T).T @ (X @ W.T) / len(X)) @ W, "not +tanh"),
        (lambda W, X, mu: W + mu * W @ (np.eye(3) + (-np.tanh(X @ W.T)).T @ (X @ W.T) / len(X)),
         "belongs on the right"),
        (lambda W, X, mu: (ica_ref(W, X, mu) - W) / mu, "you returned the direction"),
        (lambda W, X, mu: 2 * W - ica_ref(W, X, mu), "add mu * direction"),
    ]),
    "check_activity_relative_gradient": (activity_ref, [
        (lambda W, Z, lam: lam / len(Z) * (Z @ W.T).T @ Z, "ordinary gradient"),
        (lambda W, Z, lam: lam / len(Z) * (Z @ W.T).T @ Z @ W.T, "stopped at grad W^T"),
        (lambda W, Z, lam: lam * (Z @ W.T).T @ ((Z @ W.T) @ W), "1/M"),
        (lambda W, Z, lam: (Z @ W.T).T @ ((Z @ W.T) @ W) / len(Z), "factor lam is missing"),
        (lambda W, Z, lam: lam / len(Z) * (Z @ W.T).T @ ((Z @ W.T) @ W.T), "wrong transpose"),
        (lambda W, Z, lam: lam / len(Z) * ((Z @ W.T).T @ Z) @ (W.T @ W), "wrong cost"),
    ]),
    "check_lognormal_density": (lognormal_ref, [
        (lambda x: _phi(np.log(x)), "Jacobian is missing"),
        (lambda x: _phi(np.log(x)) * x, "you multiplied by x"),
        (lambda x: _phi(x) / x, "not at x"),
        (lambda x: np.exp(-0.5 * np.log(x) ** 2) / x, "1/sqrt(2 pi) is missing"),
    ]),
    "check_logdet_by_hand": (logdet_hand_ref, [
        (lambda p: np.exp(logdet_hand_ref(p)), "take its logarithm"),
        (lambda p: 0.0, "diagonal product only"),
        (lambda p: np.log(1 + 0.25 * np.cos(p[1]) * (1 - np.tanh(p[0]) ** 2)), "do not add it"),
        (lambda p: np.log(1 - 0.25 * np.cos(p[1]) * (1 - np.tanh(p[0]))), "not 1 - tanh(x)"),
        (lambda p: np.log(1 - 0.25 * np.cos(p[1]) * np.tanh(p[0])), "not tanh"),
    ]),
    "check_training_memory_gib": (memory_ref, [
        (lambda d, n, b=4: 3 * b * n * d ** 2 / 2 ** 30, "biases are missing"),
        (lambda d, n, b=4: b * n * (d ** 2 + d) / 2 ** 30, "two moment estimates are missing"),
        (lambda d, n, b=4: 2 * b * n * (d ** 2 + d) / 2 ** 30, "three in all"),
        (lambda d, n, b=4: 3 * b * n * (d ** 2 + d) / 1e9, "not 10^9"),
        (lambda d, n, b=8: 3 * b * n * (d ** 2 + d) / 2 ** 30, "default bytes_per_number"),
    ]),
    "check_logit_nats_to_bpd": (convert_ref, [
        (lambda n, y, lam, k: -(n - y.shape[1] * np.log(k)) / (y.shape[1] * np.log(2)), "log-Jacobian is missing"),
        (lambda n, y, lam, k: -(n + _jac_mean(y, lam)) / (y.shape[1] * np.log(2)), "D log K"),
        (lambda n, y, lam, k: convert_ref(n, y, lam, k) * np.log(2), "divide by D ln 2"),
        (lambda n, y, lam, k: -convert_ref(n, y, lam, k), "sign is flipped"),
        (lambda n, y, lam, k: -(n - _jac_mean(y, lam) - y.shape[1] * np.log(k)) / (y.shape[1] * np.log(2)),
         "plus sign"),
    ]),
    "check_sigma_inverse": (newton_ref, [
        (lambda v, a: a * v + (1 - a) * _softplus(v), "you applied sigma"),
        (lambda v, a: np.array(v, copy=True), "returned v unchanged"),
        (lambda v, a: _newton(v, a, steps=2), "not converged"),
        (lambda v, a: _newton(v, a, naive=True), "only at large |v|: exp overflows"),
        (lambda v, a: _newton(v, a, divide_by_sigma=True), "do not divide by sigma(u)"),
        (_newton_if, "np.where"),
        (_newton_in_place, "changed its input v in place"),
        (lambda v, a: newton_ref(v, a).ravel(), "keeps the shape"),
    ]),
}


def test_every_check_is_registered():
    assert sorted(checks.EXERCISE_CHECKS.values()) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_passes(name, capsys):
    ref, _ = CASES[name]
    assert getattr(checks, name)(ref) is True
    assert capsys.readouterr().out.startswith("✓ ")
    assert getattr(checks, name)(ref, strict=True) is True


@pytest.mark.parametrize("name,k", [(n, k) for n in sorted(CASES) for k in range(len(CASES[n][1]))])
def test_typical_mistake_gets_its_hint(name, k, capsys):
    wrong, hint = CASES[name][1][k]
    assert getattr(checks, name)(wrong) is False
    out = capsys.readouterr().out
    assert out.startswith("✗ ") and hint in out, out
    with pytest.raises(AssertionError, match="exercise ex-"):
        getattr(checks, name)(wrong, strict=True)


@pytest.mark.parametrize("name", sorted(CASES))
def test_not_implemented_is_friendly(name, capsys):
    assert getattr(checks, name)(stub) is False  # does not raise
    assert "not implemented yet" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="not implemented yet"):
        getattr(checks, name)(stub, strict=True)


def test_crashing_function_is_reported(capsys):
    assert checks.check_logdet_grad_2x2(lambda W: W[5]) is False
    assert "raised IndexError" in capsys.readouterr().out


def test_torch_and_einsum_answers_are_accepted(capsys):
    assert checks.check_relative_weight_update(lambda D, Z, W: np.einsum("mi,mj->ij", D, np.einsum("mk,kj->mj", Z @ W.T, W)))
    assert "could not be observed" not in capsys.readouterr().out  # Z @ W.T was seen
    assert checks.check_logdet_grad_2x2(lambda W: torch.linalg.inv(torch.from_numpy(W)).T)


def test_every_check_has_its_exercise_and_self_check_cell():
    """Each registered check is called by a self-check cell right after its exercise's solution."""
    from pathlib import Path
    book = Path(__file__).resolve().parents[1] / "book"
    sources = {p.stem: p.read_text() for p in book.glob("*.md")}
    for label, check in checks.EXERCISE_CHECKS.items():
        homes = [name for name, text in sources.items() if f":label: {label}\n" in text]
        assert len(homes) == 1, (label, homes)
        text = sources[homes[0]]
        after = text[text.index(f"````{{solution-start}} {label}"):]
        after = after[after.index("````{solution-end}"):]
        next_exercise = after.find("````{exercise}")
        block = after if next_exercise < 0 else after[:next_exercise]
        assert ":tags: [self-check]" in block and f"assert {check}(" in block, (label, check)
