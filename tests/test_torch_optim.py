"""relgrad.torch.optim: the Lie-algebra optimisers (RelativeAdam, RelativeSGD) and the lr schedules."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import relgrad.torch as rt
from relgrad.torch.optim import (RelativeAdam, RelativeSGD, jax_adam_schedule, lie_gradient,
                                 warmup_cosine_schedule)
from torch_helpers import FORBIDDEN, F64, OpRecorder, data, random_flow

D, M = 6, 16


def _stream(x: torch.Tensor, t: int, m: int = M) -> torch.Tensor:
    start = (t * m) % (x.shape[0] - m)
    return x[start:start + m]


def _train(model, opt, x, steps, method="relative"):
    for t in range(steps):
        opt.zero_grad(set_to_none=True)
        rt.training_loss(model, _stream(x, t), method).backward()
        opt.step()


def _augmented(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = w.shape[0]
    a = torch.eye(d + 1, dtype=w.dtype)
    a[:d, :d], a[:d, d] = w, b
    return a


def test_lie_gradient_is_the_exact_gradient_times_the_augmented_transpose() -> None:
    # independent reference: autograd through slogdet gives the exact gradient G; Etil = [G_W | g_b] Ahat^T
    model = random_flow(D, 2)
    x = data(M, D)
    z, ys, ll = x, [], 0.0
    for k, layer in enumerate(model.layers):
        y, logdet = layer(z, rule="autodiff")
        ys.append(y)
        ll = ll + logdet
        if k < model.n_layers - 1:
            z, log_slope = model.activation(y)
            ll = ll + log_slope
    ll = ll - 0.5 * (y ** 2).sum(1) - 0.5 * D * math.log(2 * math.pi)
    params = [p for layer in model.layers for p in (layer.weight, layer.bias)]
    grads = torch.autograd.grad(-ll.mean(), ys + params)
    deltas, g = grads[:len(ys)], grads[len(ys):]
    for k, layer in enumerate(model.layers):
        e = lie_gradient(ys[k].detach(), deltas[k], torch.tensor(-1.0, dtype=F64), True)
        exact = torch.cat([g[2 * k], g[2 * k + 1][:, None]], dim=1) @ _augmented(
            layer.weight.detach(), layer.bias.detach()).T
        torch.testing.assert_close(e, exact, rtol=1e-10, atol=1e-12)


def test_relative_sgd_without_momentum_is_torch_sgd_on_the_relative_gradient() -> None:
    x = data(400, D, seed=3) + 2.0
    a, b = random_flow(D, 2), random_flow(D, 2)
    _train(a, RelativeSGD(a, lr=1e-2, momentum=0.0), x, 30)
    _train(b, torch.optim.SGD(b.parameters(), lr=1e-2), x, 30)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def _dense_reference_step(model, x, state, lr, betas, eps=1e-30):
    """RelativeAdam written with dense D x (D+1) matrices, as the module docstring states it (O(D^3))."""
    rt.training_loss(model, x, "autodiff").backward()
    b1, b2 = betas
    new = []
    for k, layer in enumerate(model.layers):
        w, b = layer.weight.detach(), layer.bias.detach()
        ahat = _augmented(w, b)
        g = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1)
        e = g @ ahat.T                                        # the Lie-algebra gradient
        st = state.setdefault(k, {"t": 0, "row": torch.zeros(D, dtype=F64), "col": torch.zeros(D + 1, dtype=F64),
                                   "m": torch.zeros(D, D + 1, dtype=F64)})
        st["t"] += 1
        st["row"] = b2 * st["row"] + (1 - b2) * (e ** 2).sum(1)
        st["col"] = b2 * st["col"] + (1 - b2) * (e ** 2).sum(0)
        rh, ch = st["row"] / (1 - b2 ** st["t"]) + eps, st["col"] / (1 - b2 ** st["t"]) + eps
        vhat = rh[:, None] * ch[None, :] / rh.sum()           # Adafactor's rank-one second moment
        p = e / vhat.sqrt()
        u = (p @ ahat)[:D]                                     # U = P Ahat, top rows
        st["m"] = b1 * st["m"] + (1 - b1) * u
        new.append((ahat[:D] - lr * st["m"] / (1 - b1 ** st["t"])))
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for layer, wb in zip(model.layers, new):
            layer.weight.copy_(wb[:, :D])
            layer.bias.copy_(wb[:, D])


def test_relative_adam_matches_the_dense_formula() -> None:
    x = data(400, D, seed=4) * 2 + 1
    a, ref = random_flow(D, 2), random_flow(D, 2)
    opt = RelativeAdam(a, lr=3e-2, betas=(0.8, 0.9))
    state: dict = {}
    for t in range(5):
        opt.zero_grad(set_to_none=True)
        rt.training_loss(a, _stream(x, t)).backward()
        opt.step()
        _dense_reference_step(ref, _stream(x, t), state, 3e-2, (0.8, 0.9))
        for p, q in zip(a.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-11)


def _equivariance_error(make_opt) -> float:
    """Train on x and on x' = P x + c from W1' = W1 P^-1, b1' = b1 - W1 P^-1 c; map back and compare."""
    g = torch.Generator().manual_seed(7)
    p_mat = torch.randn(D, D, generator=g, dtype=F64) + 2 * torch.eye(D, dtype=F64)
    shift = 3 * torch.randn(D, generator=g, dtype=F64)
    x = data(400, D, seed=5) @ torch.randn(D, D, generator=g, dtype=F64) + 1.0
    xp = x @ p_mat.T + shift
    a, b = random_flow(D, 2), random_flow(D, 2)
    with torch.no_grad():
        pinv = torch.linalg.inv(p_mat)
        w1, b1 = b.layers[0].weight.clone(), b.layers[0].bias.clone()
        b.layers[0].weight.copy_(w1 @ pinv)
        b.layers[0].bias.copy_(b1 - w1 @ pinv @ shift)
    _train(a, make_opt(a), x, 100)
    _train(b, make_opt(b), xp, 100)
    with torch.no_grad():
        w1_back = b.layers[0].weight @ p_mat
        b1_back = b.layers[0].bias + b.layers[0].weight @ shift
        errs = [(a.layers[0].weight - w1_back).abs().max(), (a.layers[0].bias - b1_back).abs().max(),
                (a.layers[1].weight - b.layers[1].weight).abs().max(), (a.layers[1].bias - b.layers[1].bias).abs().max()]
    return float(max(errs))


@pytest.mark.parametrize("name", ["relative-adam", "relative-adam-trust", "relative-sgd", "torch-sgd"])
def test_lie_optimisers_are_equivariant_to_affine_input_changes(name: str) -> None:
    make = {
        "relative-adam": lambda m: RelativeAdam(m, lr=1e-2),
        "relative-adam-trust": lambda m: RelativeAdam(m, lr=1e-1, max_lie_norm=0.05),
        "relative-sgd": lambda m: RelativeSGD(m, lr=1e-2, momentum=0.9),
        "torch-sgd": lambda m: torch.optim.SGD(m.parameters(), lr=1e-2),   # relative SGD through .grad
    }[name]
    assert _equivariance_error(make) < 1e-10


def test_adam_on_the_relative_gradient_is_not_equivariant() -> None:
    # the same harness detects a non-equivariant optimiser (the test above can fail)
    assert _equivariance_error(lambda m: torch.optim.Adam(m.parameters(), lr=1e-2)) > 1e-3


def test_step_cost_is_rank_m_and_runs_no_cubic_op() -> None:
    dim, m, layers = 64, 8, 2
    model = random_flow(dim, layers)
    x = data(m, dim)
    opt = RelativeAdam(model, lr=1e-3, max_lie_norm=0.1)
    rt.training_loss(model, x).backward()
    counter, rec = FlopCounterMode(display=False), OpRecorder()
    with counter, rec:
        opt.step()
    flops = counter.get_total_flops()
    # per layer: Etil (2 M D D) and U (two M x D x D products); the bias's two matrix-vector products (4 M D)
    # are not counted by FlopCounterMode (it counts matrix-matrix products only)
    expected = layers * 6 * m * dim ** 2
    print(f"RelativeAdam.step: {flops} GEMM flops = {flops / expected:.3f} x 6 L M D^2")
    assert flops == expected
    assert not {op for op in rec.ops if FORBIDDEN.search(op)}, rec.ops
    # plain relative SGD (no statistics, no trust region) does not form Etil: U's two products only
    sgd = RelativeSGD(model, lr=1e-3)
    sgd.zero_grad()
    rt.training_loss(model, x).backward()
    counter = FlopCounterMode(display=False)
    with counter:
        sgd.step()
    assert counter.get_total_flops() == layers * 4 * m * dim ** 2


def test_distributed_argument_is_checked_against_the_wrapper() -> None:
    model = random_flow(D, 2)
    with pytest.raises(ValueError, match="pass the wrapper"):
        RelativeAdam(model, distributed=True)
    with pytest.raises(ValueError, match="None, True or False"):
        RelativeSGD(model, distributed="yes")
    RelativeAdam(model, distributed=False)  # one process training its own model: accepted


def test_a_frozen_bias_stays_put_and_a_refused_step_changes_nothing() -> None:
    model = random_flow(D, 2)
    x = data(4 * M, D)
    first = [m for m in model.modules() if isinstance(m, rt.RelativeLinear)][0]
    first.bias.requires_grad_(False)
    b0, w0 = first.bias.detach().clone(), first.weight.detach().clone()
    opt = RelativeAdam(model, lr=1e-2)
    _train(model, opt, x, 3)
    assert torch.equal(first.bias.detach(), b0) and not torch.equal(first.weight.detach(), w0)
    # the second layer gets a gradient by hand (no recorded batch): step() refuses before touching any layer
    last = [m for m in model.modules() if isinstance(m, rt.RelativeLinear)][-1]
    opt.zero_grad()
    rt.training_loss(model, _stream(x, 5)).backward()
    for rec in opt._recorders:
        if rec.layer is last:
            rec.records = []
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="no recorded batch"):
        opt.step()
    assert all(torch.equal(p.detach(), q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("host_skip", [True, False], ids=["host-read", "device-where"])
def test_found_inf_skips_the_step_bit_identically(host_skip: bool, monkeypatch) -> None:
    # host-read: the CPU path (the flag read on the host); device-where: the path an accelerator takes
    monkeypatch.setattr(RelativeAdam, "_host_skip", host_skip)
    model = random_flow(D, 2)
    x = data(64, D)
    opt = RelativeAdam(model, lr=1e-2)
    _train(model, opt, x, 3)
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: {n: v.clone() for n, v in s.items()} for k, s in opt.state.items()}
    rt.training_loss(model, x[:M]).backward()
    opt.found_inf = torch.ones(())
    opt.step()
    del opt.found_inf
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    for k, s in opt.state.items():
        for n, v in s.items():
            assert torch.equal(v, state[k][n]), n
    assert all(not rec.records for rec in opt._recorders)
    # a taken step with found_inf = 0 is the ordinary step (in place, or through torch.where)
    ref = random_flow(D, 2)
    ref.load_state_dict(model.state_dict())
    ref_opt = RelativeAdam(ref, lr=1e-2)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # (a state_dict holds the live tensors)
    for m, o in ((model, opt), (ref, ref_opt)):
        o.zero_grad()
        rt.training_loss(m, x[:M]).backward()
    opt.found_inf = torch.zeros(())
    opt.step()
    del opt.found_inf
    ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-14)


def test_a_bias_frozen_then_unfrozen_trains() -> None:
    model = random_flow(D, 2)
    x = data(4 * M, D)
    first = [m for m in model.modules() if isinstance(m, rt.RelativeLinear)][0]
    first.bias.requires_grad_(False)
    opt = RelativeAdam(model, lr=1e-2)
    _train(model, opt, x, 2)
    first.bias.requires_grad_(True)
    b0 = first.bias.detach().clone()
    _train(model, opt, x, 2)
    assert not torch.equal(first.bias.detach(), b0)


def test_state_round_trips_through_a_resumed_fit(tmp_path) -> None:
    x = (data(300, D, seed=8) * 2 + 1).float()
    xv = (data(100, D, seed=9) * 2 + 1).float()

    def run(epochs, resume, path):
        flow = rt.DenseFlow(D, 2, generator=0, device="cpu")
        return flow, rt.fit(flow, x, xv, epochs=epochs, batch_size=32, patience=None, generator=1, progress=False,
                            optimizer=lambda params: RelativeAdam(flow, lr=1e-2), checkpoint_path=path, resume=resume)

    full, h_full = run(4, False, None)
    ckpt = tmp_path / "run.pt"
    run(2, True, ckpt)
    resumed, h_res = run(4, True, ckpt)
    assert h_res.resumed_at_epoch == 2
    assert [r.val_log_likelihood for r in h_res.records] == [r.val_log_likelihood for r in h_full.records]
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_toy_convergence_to_the_gaussian_mle() -> None:
    # one linear layer + Gaussian base: the MLE is the Gaussian fit, whose NLL is known in closed form
    g = torch.Generator().manual_seed(0)
    d = 8
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    scales = torch.logspace(-1, 0.5, d, dtype=F64)                      # variances 1e-2 .. 10
    x = (torch.randn(4000, d, generator=g, dtype=F64) * scales) @ q.T - 5.0
    mean, cov = x.mean(0), torch.cov(x.T, correction=0)
    mle_nll = 0.5 * float(torch.logdet(2 * math.pi * math.e * cov))
    flow = rt.DenseFlow(d, 1, generator=0, dtype=F64, device="cpu")
    opt = RelativeAdam(flow, lr=1e-2)
    for t in range(3000):
        opt.zero_grad(set_to_none=True)
        rt.training_loss(flow, _stream(x, t, 100)).backward()
        opt.step()
    with torch.no_grad():
        excess = -float(flow.log_prob(x).mean()) - mle_nll
    print(f"RelativeAdam, linear Gaussian toy: excess NLL {excess:.4f} nats over the MLE")
    assert 0 <= excess < 0.02
    del mean


def test_bad_input_gets_clear_errors() -> None:
    flow = random_flow(D, 2)
    with pytest.raises(TypeError, match="takes the model"):
        RelativeAdam(list(flow.parameters()))
    with pytest.raises(ValueError, match="no RelativeLinear"):
        RelativeAdam(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="lr"):
        RelativeAdam(flow, lr=-1.0)
    with pytest.raises(ValueError, match="precondition"):
        RelativeAdam(flow, precondition="diagonal")
    opt = RelativeAdam(flow)
    # a gradient that did not come through the layers' forward (here: written by hand) has no recorded batch
    for p in flow.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match="no recorded batch"):
        opt.step()


def test_other_parameters_get_plain_adam() -> None:
    # a model with a RelativeLinear and an ordinary parameter: the latter follows torch.optim.Adam exactly
    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = rt.RelativeLinear(D, rng=0, device="cpu", dtype=F64)
            self.scale = torch.nn.Parameter(torch.ones(D, dtype=F64))

    x = data(M, D)
    a, b = Model(), Model()
    opt_a = [RelativeAdam(a, lr=1e-2)]
    opt_b = [RelativeAdam(b.lin, lr=1e-2), torch.optim.Adam([b.scale], lr=1e-2)]
    for _ in range(3):
        for model, opts in ((a, opt_a), (b, opt_b)):
            y, r = model.lin(x * model.scale)
            (0.5 * (y ** 2).sum(1) - r).mean().backward()
            for o in opts:
                o.step()
                o.zero_grad()
    torch.testing.assert_close(a.scale, b.scale, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.lin.weight, b.lin.weight, rtol=1e-12, atol=1e-12)
    assert not torch.equal(a.scale, torch.ones_like(a.scale))


def test_warmup_cosine_schedule() -> None:
    f = warmup_cosine_schedule(100, warmup_steps=10, final_factor=0.01)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.01 + 0.99 * 0.5) and f(100) == pytest.approx(0.01) and f(500) == pytest.approx(0.01)


def test_jax_adam_schedule_reproduces_the_epoch_step_count() -> None:
    # independent reference: Adam written as jax.example_libraries.optimizers.adam, called with i = epoch
    target = np.array([3.0, -2.0, 0.5])
    spe, lr, b1, b2, eps = 7, 0.05, 0.9, 0.999, 1e-8
    x = np.zeros(3)
    m = v = np.zeros(3)
    for t in range(5 * spe):
        i = 1 + t // spe                                     # the epoch, as in the authors' train.py
        g = x - target
        m = (1 - b1) * g + b1 * m
        v = (1 - b2) * g ** 2 + b2 * v
        mhat, vhat = m / (1 - b1 ** (i + 1)), v / (1 - b2 ** (i + 1))
        x = x - lr * mhat / (np.sqrt(vhat) + eps)
    p = torch.zeros(3, dtype=F64, requires_grad=True)
    opt = torch.optim.Adam([p], lr=lr, betas=(b1, b2), eps=eps)
    f = jax_adam_schedule(spe, (b1, b2))
    for t in range(5 * spe):
        opt.param_groups[0]["lr"] = lr * f(t)
        opt.zero_grad()
        (0.5 * ((p - torch.as_tensor(target)) ** 2).sum()).backward()
        opt.step()
    np.testing.assert_allclose(p.detach().numpy(), x, rtol=1e-6, atol=1e-6)


def test_zero_grad_forgets_recorded_batches_and_grad_scaler_is_refused() -> None:
    x = data(64, D)
    a, b = random_flow(D, 2), random_flow(D, 2)
    oa, ob = RelativeAdam(a, lr=1e-2), RelativeAdam(b, lr=1e-2)
    rt.training_loss(a, x[32:]).backward()   # a backward that zero_grad discards
    oa.zero_grad()
    for model, opt in ((a, oa), (b, ob)):
        rt.training_loss(model, x[:32]).backward()
        opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    rt.training_loss(a, x[:32]).backward()
    oa.grad_scale = torch.ones(())
    with pytest.raises(NotImplementedError, match="GradScaler"):
        oa.step()
