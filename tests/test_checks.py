"""relgrad.checks: each check passes the reference and names each typical mistake."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from relgrad import checks
from relgrad.numpy.gradients import _relative_layer


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
    return _relative_layer(np.asarray(W), np.asarray(b), np.asarray(Y), np.asarray(Delta), strict=True)


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
