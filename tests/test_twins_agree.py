"""The NumPy and PyTorch twins compute the same numbers from the same parameters and data.

float64 on the CPU: agreement to 1e-12 (relative); float32 torch against float64 NumPy: about 1e-5.
Parameters are copied from the torch model into the NumPy one by assigning its weights and biases.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import relgrad.numpy as rn
import relgrad.torch as rt

F64 = torch.float64
SHAPES = [(1, 1), (3, 2), (6, 3), (10, 4)]
TOL = 1e-12


def twins(dim: int, n_layers: int, seed: int = 0, dtype: torch.dtype = F64, alpha: float = 0.3):
    """A torch flow with generic (non-orthogonal) weights and non-zero biases, and its NumPy copy."""
    g = torch.Generator().manual_seed(seed)
    tm = rt.DenseFlow(dim, n_layers, alpha=alpha, generator=g, dtype=dtype, device="cpu")
    with torch.no_grad():
        for w, b in zip(tm.weights, tm.biases):
            w.copy_(torch.eye(dim, dtype=F64) + 0.5 * torch.randn(dim, dim, generator=g, dtype=F64) / math.sqrt(dim))
            b.copy_(0.6 * torch.randn(dim, generator=g, dtype=F64))
    nm = rn.DenseFlow(dim, n_layers, alpha=alpha)
    for k in range(n_layers):
        nm.weights[k][...] = tm.weights[k].detach().double().numpy()
        nm.biases[k][...] = tm.biases[k].detach().double().numpy()
    return tm, nm


def data(m: int, dim: int, seed: int = 1) -> np.ndarray:
    return 1.5 * np.random.default_rng(seed).standard_normal((m, dim))


def rel_err(t: torch.Tensor, a: np.ndarray) -> float:
    t = t.detach().double().numpy()
    return float(np.linalg.norm(t - a) / max(np.linalg.norm(a), 1e-300))


def test_same_public_names() -> None:
    # torch uses torch.optim; numpy has no autograd, so the layers that carry a rule through backward,
    # the loss that calls them and the wrapper helper are torch's alone
    torch_only = {"training_loss", "data_loss", "unwrap", "RelativeLinear", "SmoothLeakyReLU", "RelativeConv1x1",
                  "sigma_and_log_det", "RULES", "make_adam", "mean_log_likelihood"}
    numpy_only = {"Adam"}
    assert set(rt.__all__) - torch_only == set(rn.__all__) - numpy_only
    assert rt.DEFAULT_ALPHA == rn.DEFAULT_ALPHA


@pytest.mark.parametrize("alpha", [0.01, 0.3, 0.9])
def test_activation_agrees(alpha: float) -> None:
    u = np.concatenate([np.random.default_rng(0).standard_normal(5000) * 8, [-1e6, -1e4, -30.0, 0.0, 30.0, 1e4, 1e6]])
    ut = torch.tensor(u)
    for name in ("sigma", "sigma_prime", "log_sigma_prime"):
        assert rel_err(getattr(rt, name)(ut, alpha), getattr(rn, name)(u, alpha)) < TOL, name
    # sigma''/sigma' underflows towards 0 in the tails, so compare it entrywise with an absolute floor
    np.testing.assert_allclose(rt.dlog_sigma_prime(ut, alpha).numpy(), rn.dlog_sigma_prime(u, alpha), rtol=TOL, atol=1e-300)
    v = rn.sigma(u, alpha)
    np.testing.assert_allclose(rt.sigma_inverse(torch.tensor(v), alpha).numpy(), rn.sigma_inverse(v, alpha), rtol=TOL, atol=1e-15)


@pytest.mark.parametrize("dim,n_layers", SHAPES)
def test_trace_likelihood_and_inverse_agree(dim: int, n_layers: int) -> None:
    tm, nm = twins(dim, n_layers, seed=dim)
    x = data(7, dim)
    tt, nt = tm.trace(torch.tensor(x)), nm.trace(x)
    for a, b in zip(tt.zs + tt.ys, nt.zs + nt.ys):
        assert rel_err(a, b) < TOL
    ttm, ntm = tm.log_likelihood_terms(torch.tensor(x)), nm.log_likelihood_terms(x)
    for field in ("base", "activation", "logdet"):
        if n_layers == 1 and field == "activation":
            assert np.all(ntm.activation == 0) and torch.all(ttm.activation == 0)
            continue
        assert rel_err(getattr(ttm, field), getattr(ntm, field)) < TOL, field
    assert rel_err(tm.logdet_weights(), nm.logdet_weights()) < TOL or np.allclose(nm.logdet_weights(), 0, atol=1e-14)
    assert rel_err(tm.log_likelihood(torch.tensor(x)), nm.log_likelihood(x)) < TOL
    assert rel_err(tm.inverse(torch.tensor(x)), nm.inverse(x)) < TOL


@pytest.mark.parametrize("dim,n_layers", SHAPES)
def test_deltas_and_gradients_agree(dim: int, n_layers: int) -> None:
    tm, nm = twins(dim, n_layers, seed=20 + dim)
    x = data(9, dim, seed=3)
    for a, b in zip(rt.deltas(tm, tm.trace(torch.tensor(x))), rn.deltas(nm, nm.trace(x))):
        assert rel_err(a, b) < TOL
    for method in ("relative", "authors", "mixed", "ordinary"):
        lt, gt = rt.loss_and_gradients(tm, torch.tensor(x), method)
        ln, gn = rn.loss_and_gradients(nm, x, method)
        assert abs(lt - ln) <= TOL * abs(ln)
        errs = [rel_err(a, b) for pt, pn in zip(gt, gn) for a, b in zip(pt, pn)]
        assert max(errs) < TOL, (method, errs)


def test_autodiff_is_torch_only_and_agrees_with_numpy_ordinary() -> None:
    tm, nm = twins(5, 3)
    x = data(8, 5)
    with pytest.raises(ValueError, match="relgrad.torch"):
        rn.gradients(nm, x, "autodiff")
    for pt, pn in zip(rt.gradients(tm, torch.tensor(x), "autodiff"), rn.gradients(nm, x, "ordinary")):
        assert rel_err(pt[0], pn[0]) < TOL and rel_err(pt[1], pn[1]) < TOL


def test_float32_torch_close_to_float64_numpy() -> None:
    tm, nm = twins(8, 3, dtype=torch.float32)
    x = data(16, 8)
    xt = torch.tensor(x, dtype=torch.float32)
    worst = rel_err(tm.log_likelihood(xt), nm.log_likelihood(x))
    for method in ("relative", "ordinary"):
        gt, gn = rt.gradients(tm, xt, method), rn.gradients(nm, x, method)
        worst = max(worst, *(rel_err(a, b) for pt, pn in zip(gt, gn) for a, b in zip(pt, pn)))
    print(f"float32 torch vs float64 numpy: worst relative error {worst:.1e}")
    assert worst < 1e-5


def test_fit_trajectories_agree() -> None:
    # Same initial parameters and shuffling seed: the two Adam implementations follow the same path.
    tm, nm = twins(3, 2, seed=4)
    x = data(400, 3, seed=5) * 0.5
    # a NumPy generator makes the torch twin shuffle with NumPy's permutation (an int seed shuffles on the device)
    ht = rt.fit(tm, torch.tensor(x[:300]), torch.tensor(x[300:]), epochs=3, batch_size=50, lr=1e-2,
                generator=np.random.default_rng(7), progress=False)
    hn = rn.fit(nm, x[:300], x[300:], epochs=3, batch_size=50, lr=1e-2, rng=7, progress=False)
    np.testing.assert_allclose(ht.val_log_likelihood, hn.val_log_likelihood, rtol=1e-10)
    np.testing.assert_allclose(ht.train_loss, hn.train_loss, rtol=1e-10)
    assert ht.best_epoch == hn.best_epoch and ht.steps == hn.steps
    for a, b in zip(list(tm.weights) + list(tm.biases), nm.weights + nm.biases):
        assert rel_err(a, b) < 1e-10


def test_log_sigma_prime_tail_agrees_in_float32() -> None:
    """Both twins keep the tail -(1 - alpha) e^{-u} of log sigma'(u) for large u (float32 too)."""
    u = np.array([5.0, 15.0, 30.0, 60.0])
    want = np.log1p(-(0.7) / (1.0 + np.exp(u)))  # (1 - alpha) sigmoid(-u), alpha = 0.3
    got = rt.log_sigma_prime(torch.tensor(u, dtype=torch.float32), 0.3).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(rn.log_sigma_prime(u, 0.3), want, rtol=1e-13)


def test_same_argument_names_for_the_same_things() -> None:
    """rng= in both twins (torch also takes its own spelling, generator=); sample(n or shape) and log_prob."""
    import inspect

    assert "rng" in inspect.signature(rt.DenseFlow).parameters and "rng" in inspect.signature(rn.DenseFlow).parameters
    for name in ("sample", "log_prob", "log_likelihood", "inverse", "log_likelihood_terms", "logdet_weights", "trace"):
        assert hasattr(rt.DenseFlow, name) and hasattr(rn.DenseFlow, name), name
    assert list(inspect.signature(rt.DenseFlow.sample).parameters)[:3] == list(inspect.signature(rn.DenseFlow.sample).parameters)[:3]
    tm, nm = twins(3, 2, seed=1)
    xs_n = nm.sample((2, 4), rng=0)
    assert xs_n.shape == (2, 4, 3) and tm.sample((2, 4), rng=0).shape == (2, 4, 3)
    assert torch.equal(tm.sample(5, rng=3), tm.sample(5, generator=3))
    with pytest.raises(TypeError, match="not both"):
        rt.DenseFlow(3, rng=1, generator=1)
    np.testing.assert_allclose(nm.log_prob(xs_n[0]), nm.log_likelihood(xs_n[0]))


@pytest.mark.parametrize("max_lie_norm", [None, 0.05])
def test_relative_adam_twins_follow_the_same_trajectory(max_lie_norm) -> None:
    from relgrad.numpy.optim import RelativeAdam as NumpyRelativeAdam
    from relgrad.torch.optim import RelativeAdam as TorchRelativeAdam

    tm, npm = twins(5, 2, seed=3)
    x = data(240, 5, seed=4) * 2 + 1
    n_opt = NumpyRelativeAdam(npm, lr=3e-2, betas=(0.8, 0.95), max_lie_norm=max_lie_norm)
    t_opt = TorchRelativeAdam(tm, lr=3e-2, betas=(0.8, 0.95), max_lie_norm=max_lie_norm)
    for t in range(12):
        xb = x[20 * t: 20 * t + 20]
        n_opt.step(xb)
        t_opt.zero_grad()
        rt.training_loss(tm, torch.as_tensor(xb)).backward()
        t_opt.step()
    for wn, wt in zip(npm.weights + npm.biases, list(tm.weights) + list(tm.biases)):
        np.testing.assert_allclose(wn, wt.detach().numpy(), rtol=1e-10, atol=1e-12)
    assert not np.allclose(npm.weights[0], twins(5, 2, seed=3)[1].weights[0])  # it moved
