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


def left_ref(Delta, Z, W):
    return ((Delta @ W) @ W.T).T @ Z - W


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


def memory_ref(dim, n_layers, batch=0, *, bytes_per_number=4):
    return bytes_per_number * n_layers * (3 * (dim ** 2 + dim) + 2 * batch * dim) / 2 ** 30


def _memory(numbers):
    """A training_memory_gib that counts ``numbers(D, L, M)`` numbers (a typical mistake), with the right signature."""
    return lambda d, n, m=0, *, bytes_per_number=4: bytes_per_number * numbers(d, n, m) / 2 ** 30


def lsn_ref(x, lam):
    from relgrad.datasets import logit_transform
    return float(np.mean(-logit_transform(x, lam)[1]))


def _lsn(x, lam, *, factor=1.0, sign=1.0, at_x=False, reduce="images", inner=-1.0):
    """Mean logit-space nats of the uniform model, by hand; the flags reproduce typical mistakes."""
    xi = x if at_x else lam + (1 - 2 * lam) * x
    per_pixel = factor * np.log(1 - 2 * lam) + inner * (np.log(xi) + np.log(1 - xi))   # log|dy_d / dx_d|
    log_p = -sign * per_pixel
    return {"images": log_p.sum(axis=1).mean(), "pixels": log_p.mean(), "sum": log_p.sum(),
            "per-image": log_p.sum(axis=1)}[reduce]


def _lsn_in_place(x, lam):
    x *= 1.0 - 2 * lam
    x += lam
    return float(np.mean(-(np.log(1 - 2 * lam) - np.log(x) - np.log(1 - x)).sum(axis=1)))


def bound_ref(model, radius):
    lip = np.prod([np.linalg.norm(w, 2) for w in model.weights])
    rho = np.linalg.norm(model.forward(np.zeros((1, 2)))) + radius * lip
    D, L = model.dim, model.n_layers
    return (-0.5 * rho ** 2 - np.log(2 * np.pi) + D * (L - 1) * np.log(model.alpha)
            + model.logdet_weights().sum())


def _bound(model, radius, *, rho=None, act=None, det=1.0, norm=2, combine=np.prod, log2pi=1.0, half=0.5):
    """The weight-only bound with parts replaced: ``rho(g0, R, lip)``, ``act(D, L, alpha)`` (typical mistakes)."""
    D, L = model.dim, model.n_layers
    lip = combine([np.linalg.norm(w, norm) for w in model.weights])
    g0 = np.linalg.norm(model.forward(np.zeros((1, 2))))
    r = g0 + radius * lip if rho is None else rho(g0, radius, lip)
    a = D * (L - 1) * np.log(model.alpha) if act is None else act(D, L, model.alpha)
    return -half * r ** 2 - log2pi * np.log(2 * np.pi) + a + det * model.logdet_weights().sum()


def convert_ref(nats, y, lam, levels):
    from relgrad.datasets import logit_log_jacobian
    d = y.shape[1]
    return -(nats + np.mean(logit_log_jacobian(y, lam)) - d * np.log(levels)) / (d * np.log(2))


def _jac_mean(y, lam):
    from relgrad.datasets import logit_log_jacobian
    return np.mean(logit_log_jacobian(y, lam))


def conv_ref(x, W):
    Y = (x @ W.T).reshape(-1, W.shape[0])               # rows y_np^T
    return Y.T @ (Y @ W) / x.shape[0] - x.shape[1] * W


def _conv_sum(x, W):
    return np.einsum("npi,npj->ij", x @ W.T, x @ W.T)


def _conv_loop(x, W):
    """Per-pixel loop: accepted (values and cost are fine)."""
    N, P, C = x.shape
    S = np.zeros((C, C))
    for n in range(N):
        for q in range(P):
            y = W @ x[n, q]
            S += np.outer(y, y)
    return S @ W / N - P * W


def _laplace(model, x, start="sign", direct=1.0, scale=None, reverse=False):
    """Laplace deltas; the flags reproduce typical mistakes."""
    from relgrad.numpy import dlog_sigma_prime, sigma_prime
    tr = model.trace(x)
    M = x.shape[0] if scale is None else scale
    delta = {"sign": np.sign(tr.s), "minus": -np.sign(tr.s), "gauss": tr.s}[start] / M
    out = [delta]
    for k in range(model.n_layers - 2, -1, -1):
        y = tr.ys[k]
        delta = (delta @ model.weights[k + 1]) * sigma_prime(y, model.alpha)
        delta = delta - direct * dlog_sigma_prime(y, model.alpha) / M
        out.append(delta)
    return out if reverse else out[::-1]


def laplace_ref(model, x):
    return _laplace(model, x)


def _accumulate(tmodel, x, mean=True, sign=1.0, after=False, activation_term=True, reverse=False):
    """Deltas from zero accumulators; the flags reproduce typical mistakes."""
    from relgrad import torch as rt
    L = tmodel.n_layers
    accs = [torch.zeros_like(x, requires_grad=True) for _ in range(L)]
    z, act = x, torch.zeros(x.shape[0], dtype=x.dtype)
    for k, (w, b) in enumerate(zip(tmodel.weights, tmodel.biases)):
        y = z @ w.T + b
        if not after:
            y = y + accs[k]
        if k < L - 1:
            act = act + rt.log_sigma_prime(y, tmodel.alpha).sum(dim=1)
            z = rt.sigma(y, tmodel.alpha)
            if after:
                z = z + accs[k]
        elif after:
            y = y + accs[k]
    log_ps = -0.5 * (y ** 2).sum(dim=1) - 0.5 * x.shape[1] * np.log(2 * np.pi)
    ll = log_ps + (act if activation_term else 0.0)
    loss = -sign * (ll.mean() if mean else ll.sum())
    grads = list(torch.autograd.grad(loss, accs))
    return grads[::-1] if reverse else grads


def accumulator_ref(tmodel, x):
    return _accumulate(tmodel, x)


def whiten_ref(X):
    Xc = X - X.mean(axis=0)
    evals, evecs = np.linalg.eigh(Xc.T @ Xc / len(Xc))
    V = evecs @ np.diag(evals ** -0.5) @ evecs.T
    return Xc @ V.T, V


def _whiten_with(X, V_of, centre_z=True):
    Xc = X - X.mean(axis=0)
    V = V_of(Xc)
    return (Xc if centre_z else X) @ V.T, V


def _sym_power(S, p):
    evals, evecs = np.linalg.eigh(S)
    return evecs @ np.diag(evals ** p) @ evecs.T


def _whiten_in_place(X):
    X -= X.mean(axis=0)   # changes the caller's array
    return whiten_ref(X)


def _bisect(v, alpha, tol=1e-14, invert=False, no_alpha=False, fixed=None, ignore_tol=False, absolute=False):
    """sigma^{-1} by bisection, returning (u, iterations); the flags reproduce typical mistakes."""
    from relgrad.numpy import sigma
    c = np.log(2.0)
    lo = v - c if no_alpha else np.minimum(v - c, (v - c) / alpha)
    hi = v if no_alpha else np.minimum(v, v / alpha)
    tol = 1e-15 if ignore_tol else tol
    steps = 0
    while True:
        if fixed is not None and steps == fixed:
            break
        width = hi - lo
        if fixed is None and not np.any(width > (tol if absolute else tol * np.maximum(1.0, np.abs(hi)))):
            break
        mid = 0.5 * (lo + hi)
        below = sigma(mid, alpha) < v
        if invert:
            below = ~below
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
        steps += 1
        if steps > 2000:
            break
    return 0.5 * (lo + hi), steps


def bisect_ref(v, alpha, tol):
    return _bisect(v, alpha, tol)


def _sampler(model, transpose=True, bias=True, activation="inverse", order="backward", noise="rows",
             cache=True):
    """make_sampler with flags that reproduce typical mistakes."""
    from relgrad.numpy import sigma, sigma_inverse
    inv_t = [np.linalg.inv(w).T if transpose else np.linalg.inv(w) for w in model.weights] if cache else None

    def sample(n, rng):
        gen = np.random.default_rng(rng)
        s = gen.standard_normal((n, model.dim)) if noise == "rows" else gen.standard_normal((model.dim, n)).T
        mats = inv_t if cache else [np.linalg.inv(w).T for w in model.weights]
        layers = range(model.n_layers - 1, -1, -1) if order == "backward" else range(model.n_layers)
        z = s
        for k in layers:
            if k != model.n_layers - 1 or activation == "everywhere":
                z = sigma(z, model.alpha) if activation == "forward" else sigma_inverse(z, model.alpha)
            z = (z - model.biases[k] if bias else z) @ mats[k]
        return z
    return sample


def sampler_ref(model):
    return _sampler(model)


def stub(*args, **kwargs):
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
    "check_left_relative_weight_update": (left_ref, [
        (lambda D, Z, W: D.T @ ((Z @ W.T) @ W) - W, "that is the right relative update"),
        (lambda D, Z, W: ((D @ W) @ W.T).T @ Z, "log-determinant term is missing"),
        (lambda D, Z, W: ((D @ W) @ W.T).T @ Z + W, "wrong sign"),
        (lambda D, Z, W: ((D @ W.T) @ W).T @ Z - W, "not W^T W"),
        (lambda D, Z, W: ((D @ W) @ W.T).T @ Z - W.T, "wrong value: expected W W^T"),  # no specific hint
        (lambda D, Z, W: D.T @ Z, "ordinary data gradient"),
        (lambda D, Z, W: (W @ W.T) @ (D.T @ Z) - W, "wrong cost"),
        (lambda D, Z, W: W @ (W.T @ (D.T @ Z)) - W, "wrong cost"),
        (lambda D, Z, W: np.dot(W, W.T).dot(D.T.dot(Z)) - W, "wrong cost"),
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
        (_memory(lambda d, n, m: 3 * n * (d ** 2 + d)), "the activations are missing"),
        (_memory(lambda d, n, m: 3 * n * (d ** 2 + d) + n * m * d), "count both arrays of each layer"),
        (_memory(lambda d, n, m: 3 * n * (d ** 2 + d) + 2 * m * d), "not 2 M D"),
        (_memory(lambda d, n, m: 3 * n * (d ** 2 + d) + (2 * n + 1) * m * d), "s is y_L, already counted"),
        (_memory(lambda d, n, m: 3 * n * (d ** 2 + d + 2 * m * d)), "not three"),
        (_memory(lambda d, n, m: 3 * n * d ** 2 + 2 * n * m * d), "biases are missing"),
        (_memory(lambda d, n, m: n * (d ** 2 + d) + 2 * n * m * d), "two moment estimates are missing"),
        (_memory(lambda d, n, m: 2 * n * (d ** 2 + d) + 2 * n * m * d), "three in all"),
        (lambda d, n, m=0, *, bytes_per_number=4: memory_ref(d, n, m, bytes_per_number=bytes_per_number)
         * 2 ** 30 / 1e9, "not 10^9"),
        (lambda d, n, m=0, *, bytes_per_number=8: memory_ref(d, n, m, bytes_per_number=bytes_per_number),
         "not 8"),
        (lambda d, n, m=100, *, bytes_per_number=4: memory_ref(d, n, m, bytes_per_number=bytes_per_number),
         "the defaults should be batch = 0"),
        (lambda d, n, b=4, m=0: memory_ref(d, n, m, bytes_per_number=b), "batch is the third argument"),
        (lambda d, n, m=0, *, nbytes=4: memory_ref(d, n, m, bytes_per_number=nbytes), "batch is the third argument"),
        (lambda d, n, m=0, bytes_per_number=4: memory_ref(d, n, bytes_per_number=bytes_per_number),
         "the activations are missing"),
    ]),
    "check_logit_space_nats": (lsn_ref, [
        (lambda x, lam: _lsn(x, lam, sign=-1.0), "the sign is flipped"),
        (lambda x, lam: _lsn(x, lam, factor=0.0), "the factor (1 - 2 lam) of d xi / dx is missing"),
        (lambda x, lam: _lsn(x, lam, factor=-1.0), "do not subtract it"),
        (lambda x, lam: _lsn(x, lam, inner=1.0), "the inverse of the sigmoid's"),
        (lambda x, lam: _lsn(x, lam, at_x=True), "not at x"),
        (lambda x, lam: _lsn(x, lam, at_x=True, factor=0.0), "the margin is missing"),
        (lambda x, lam: _lsn(x, lam, reduce="pixels"), "a mean over the pixels too"),
        (lambda x, lam: _lsn(x, lam, reduce="sum"), "a sum over the images"),
        (lambda x, lam: _lsn(x, lam) - x.shape[1] * np.log(17), "the D log K of the pixel scale"),
        (lambda x, lam: _lsn(x, lam) + x.shape[1] * np.log(17), "the D log K of the pixel scale"),
        (lambda x, lam: _lsn(x, lam, reduce="per-image"), "one value per image"),
        (lambda x, lam: -np.log(1 - 2 * lam) + np.log(x) + np.log(1 - x), "one value per pixel"),
        (_lsn_in_place, "changed its input x in place"),
        (lambda x, lam: _lsn(x, lam) + 1.0, "wrong value for lam = 1e-06"),
    ]),
    "check_density_lower_bound": (bound_ref, [
        (lambda m, R: _bound(m, R, act=lambda d, n, a: -d * (n - 1) * np.log(a)), "the activation term enters"),
        (lambda m, R: _bound(m, R, det=-1.0), "do not subtract it"),
        (lambda m, R: _bound(m, R, act=lambda d, n, a: 0.0), "sigma' < 1 bounds log sigma' from above"),
        (lambda m, R: _bound(m, R, act=lambda d, n, a: d * n * np.log(a)), "not D L"),
        (lambda m, R: _bound(m, R, rho=lambda g0, r, lip: 0.0), "a sup over the disc"),
        (lambda m, R: _bound(m, R, rho=lambda g0, r, lip: g0 - r * lip), "(a sup)"),
        (lambda m, R: _bound(m, R, rho=lambda g0, r, lip: r), "the radius R is in data space"),
        (lambda m, R: _bound(m, R, rho=lambda g0, r, lip: g0 + r), "the Lipschitz factor is missing"),
        (lambda m, R: _bound(m, R, rho=lambda g0, r, lip: r * lip), "||g(0)|| is missing"),
        (lambda m, R: _bound(m, R, norm="fro"), "Frobenius norms"),
        (lambda m, R: _bound(m, R, combine=np.sum), "not their sum"),
        (lambda m, R: _bound(m, R, log2pi=0.5), "-(D / 2) log(2 pi)"),
        (lambda m, R: _bound(m, R, half=1.0), "the 1/2 is missing"),
        (lambda m, R: np.exp(bound_ref(m, R)), "that is the density"),
        (lambda m, R: bound_ref(m, R) + 30.0, "is not a lower bound"),
        (lambda m, R: bound_ref(m, R) - 1.0, "is not the weight-only bound"),
        (lambda m, R: np.full(3, bound_ref(m, R)), "return one number"),
    ]),
    "check_logit_nats_to_bpd": (convert_ref, [
        (lambda n, y, lam, k: -(n - y.shape[1] * np.log(k)) / (y.shape[1] * np.log(2)), "log-Jacobian is missing"),
        (lambda n, y, lam, k: -(n + _jac_mean(y, lam)) / (y.shape[1] * np.log(2)), "D log K"),
        (lambda n, y, lam, k: convert_ref(n, y, lam, k) * np.log(2), "divide by D ln 2"),
        (lambda n, y, lam, k: -convert_ref(n, y, lam, k), "sign is flipped"),
        (lambda n, y, lam, k: -(n - _jac_mean(y, lam) - y.shape[1] * np.log(k)) / (y.shape[1] * np.log(2)),
         "plus sign"),
    ]),
    "check_conv1x1_relative_gradient": (conv_ref, [
        (lambda x, W: _conv_sum(x, W) @ W / x.shape[0] - W, "subtract P W, not W"),
        (lambda x, W: _conv_sum(x, W) @ W / x.shape[0], "log-determinant term is missing"),
        (lambda x, W: _conv_sum(x, W) @ W / x.shape[0] + x.shape[1] * W, "wrong sign"),
        (lambda x, W: np.einsum("npi,npj->ij", x @ W.T, x) / x.shape[0] - x.shape[1] * np.linalg.inv(W).T,
         "that is the ordinary gradient"),
        (lambda x, W: _conv_sum(x, W) / x.shape[0] - x.shape[1] * np.eye(len(W)), "you stopped at grad W^T"),
        (lambda x, W: W @ _conv_sum(x, W) / x.shape[0] - x.shape[1] * W, "belongs on the right"),
        (lambda x, W: _conv_sum(x, W) @ W - x.shape[1] * W, "divide the data term by N"),
        (lambda x, W: conv_ref(x, W) / x.shape[1], "averaged over the pixels too"),
        (lambda x, W: (x @ W).reshape(-1, len(W)).T @ ((x @ W).reshape(-1, len(W)) @ W) / x.shape[0]
         - x.shape[1] * W, "Y = x @ W.T, not x @ W"),
        (lambda x, W: (np.einsum("npi,npj->ij", x @ W.T, x) / x.shape[0] - x.shape[1] * np.linalg.inv(W).T)
         @ W.T @ W, "you called np.linalg.inv"),
        (lambda x, W: (np.einsum("npi,npj->ij", x @ W.T, x) / x.shape[0]
                       - x.shape[1] * np.linalg.solve(W, np.eye(len(W))).T) @ W.T @ W, "np.linalg.solve"),
    ]),
    "check_laplace_deltas": (laplace_ref, [
        (lambda m, x: _laplace(m, x, start="gauss"), "the Gaussian start"),
        (lambda m, x: _laplace(m, x, start="minus"), "sign of Delta_L is flipped"),
        (lambda m, x: [-len(x) * d for d in laplace_ref(m, x)], "maximisation convention"),
        (lambda m, x: _laplace(m, x, scale=1.0), "the 1/M of the mean"),
        (lambda m, x: _laplace(m, x, direct=0.0), "direct term is missing"),
        (lambda m, x: _laplace(m, x, direct=-1.0), "direct term has the wrong sign"),
        (lambda m, x: _laplace(m, x, reverse=True), "wrong order"),
        (lambda m, x: laplace_ref(m, x)[1:], "one Delta_k per layer"),
        (lambda m, x: np.stack(laplace_ref(m, x)), "should return a list"),
    ]),
    "check_accumulator_deltas": (accumulator_ref, [
        (lambda t, x: _accumulate(t, x, mean=False), "the 1/M is missing"),
        (lambda t, x: _accumulate(t, x, mean=False, sign=-1.0), "maximisation convention"),
        (lambda t, x: _accumulate(t, x, sign=-1.0), "the sign is flipped"),
        (lambda t, x: _accumulate(t, x, after=True), "after the activations"),
        (lambda t, x: _accumulate(t, x, activation_term=False), "activations' term is missing"),
        (lambda t, x: _accumulate(t, x, reverse=True), "wrong order"),
        (lambda t, x: [d[:, :-1] for d in accumulator_ref(t, x)], "one row per sample"),
    ]),
    "check_whiten": (whiten_ref, [
        (lambda X: whiten_ref(X)[::-1], "the pair is swapped"),
        (lambda X: whiten_ref(X)[0], "should return a pair"),
        (lambda X: _whiten_with(X, lambda Xc: _sym_power(np.cov(Xc.T), -0.5)), "np.cov's default"),
        (lambda X: _whiten_with(X, lambda Xc: np.power(Xc.T @ Xc / len(Xc), -0.5, where=Xc.T @ Xc > 0,
                                                      out=np.full((Xc.shape[1],) * 2, np.nan))), "matrix function"),
        (lambda X: _whiten_with(X, lambda Xc: _sym_power(Xc.T @ Xc / len(Xc), -1.0)), "that is Sigma^{-1}"),
        (lambda X: _whiten_with(X, lambda Xc: _sym_power(Xc.T @ Xc / len(Xc), 0.5)), "that is Sigma^{1/2}"),
        (lambda X: (X @ _sym_power(X.T @ X / len(X), -0.5), _sym_power(X.T @ X / len(X), -0.5)),
         "subtract the mean before forming"),
        (lambda X: _whiten_with(X, lambda Xc: np.diag(1 / Xc.std(axis=0))), "removes the scales"),
        (lambda X: _whiten_with(X, lambda Xc: np.linalg.inv(np.linalg.cholesky(Xc.T @ Xc / len(Xc)))),
         "it is not symmetric"),
        (lambda X: _whiten_with(X, lambda Xc: _sym_power(Xc.T @ Xc / len(Xc), -0.5), centre_z=False),
         "Z is not centred"),
        (_whiten_in_place, "changed X in place"),
    ]),
    "check_sigma_inverse_bisect": (bisect_ref, [
        (lambda v, a, tol: _bisect(v, a, tol)[0], "should return a pair"),
        (lambda v, a, tol: _bisect(v, a, tol, invert=True), "sits at an end of the bracket"),
        (lambda v, a, tol: _bisect(v, a, tol, no_alpha=True), "misses the root"),
        (lambda v, a, tol: _bisect(v, a, tol, fixed=30), "close but not to tol"),
        (lambda v, a, tol: _bisect(v, a, tol, ignore_tol=True), "grows by"),
        (lambda v, a, tol: (_bisect(v, a, tol)[0], np.full(v.shape, 40)), "one whole number"),
        (lambda v, a, tol: (_bisect(v, a, tol)[0], 0), "grows by"),
        (lambda v, a, tol: (_bisect(v, a, tol)[0][:-1], _bisect(v, a, tol)[1]), "keep the shape"),
    ]),
    "check_make_sampler": (sampler_ref, [
        (lambda m: _sampler(m, noise="columns"), "draw the noise as DenseFlow.sample does"),
        (lambda m: _sampler(m, transpose=False), "multiply by inv(W).T, not inv(W)"),
        (lambda m: _sampler(m, bias=False), "subtract the bias"),
        (lambda m: _sampler(m, activation="forward"), "you applied sigma"),
        (lambda m: _sampler(m, activation="everywhere"), "do not apply it to s"),
        (lambda m: _sampler(m, order="forward"), "from the last to the first"),
        (lambda m: _sampler(m, cache=False), "called np.linalg.inv"),
        (lambda m: (lambda n, rng: m.sample(n, rng=rng)), "factorisation call"),
        (lambda m: m.sample(3, rng=0), "should return a function"),
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
    left = lambda D, Z, W: np.einsum("mi,mj->ij", np.einsum("mk,jk->mj", D @ W, W), Z) - W  # noqa: E731
    assert checks.check_left_relative_weight_update(left)
    assert "could not be observed" not in capsys.readouterr().out  # D @ W was seen
    assert checks.check_left_relative_weight_update(
        lambda D, Z, W: (torch.from_numpy(W) @ (torch.from_numpy(W).T @ (torch.from_numpy(D).T @ torch.from_numpy(Z)))
                         - torch.from_numpy(W)).numpy())
    assert "could not be observed" in capsys.readouterr().out  # torch: values only, and the check says so
    assert checks.check_logdet_grad_2x2(lambda W: torch.linalg.inv(torch.from_numpy(W)).T)


def test_accepted_variants_of_the_new_checks(capsys):
    """Answers that are right in another form pass: loops, einsum, a C^3 product (with a note), tensors."""
    assert checks.check_conv1x1_relative_gradient(_conv_loop)
    assert "forms a C x C matrix first" in capsys.readouterr().out  # S @ W: the cheaper order for N P > C
    assert checks.check_conv1x1_relative_gradient(lambda x, W: (np.einsum("npi,npj->ij", x @ W.T, x) / x.shape[0])
                                                  @ (W.T @ W) - x.shape[1] * W)  # W^T W first: same order of cost
    capsys.readouterr()
    assert checks.check_conv1x1_relative_gradient(conv_ref)
    assert "forms a C x C matrix first" not in capsys.readouterr().out  # Y^T (Y W): the thin order
    assert checks.check_conv1x1_relative_gradient(lambda x, W: np.einsum("npi,npj,jk->ik", x @ W.T, x @ W.T, W)
                                                  / len(x) - x.shape[1] * W)
    assert checks.check_accumulator_deltas(lambda t, x: [d.numpy() for d in accumulator_ref(t, x)])
    assert checks.check_whiten(lambda X: (whiten_ref(X)[0], torch.from_numpy(whiten_ref(X)[1])))
    assert checks.check_sigma_inverse_bisect(lambda v, a, tol: _bisect(v, a, tol, absolute=True))
    assert checks.check_make_sampler(lambda m: (lambda sample: (lambda n, rng: sample(n, rng)))(_sampler(m)))


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
