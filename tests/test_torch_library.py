"""relgrad.torch as a library: the layers on their own, wrappers (DDP, autocast, torch.compile, torch.func),
distributions-style sampling, the 1x1 convolution, and independent references at realistic widths.

References are independent of the code under test: autograd through ``slogdet`` (float64) times the
augmented metric ``Ahat^T Ahat`` for relative gradients, ``F.conv2d`` for the convolution, brute-force
Jacobians for log-determinants.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import relgrad.torch as rt
from relgrad.errors import CheckpointError, ShapeError, SingularWeightError
from torch_helpers import F64, FORBIDDEN, OpRecorder, data, random_flow

ROOT = Path(__file__).resolve().parents[1]


def relative_of(grad_w: torch.Tensor, grad_b, w: torch.Tensor, b) -> tuple:
    """The strict relative gradient from ordinary gradients: ``[G_W | g_b] Ahat^T Ahat`` (top rows)."""
    if b is None:
        return grad_w @ w.T @ w, None
    return grad_w @ w.T @ w + torch.outer(grad_b, b) @ w, grad_w @ w.T @ b + grad_b * (1.0 + b @ b)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("bias", [True, False])
def test_relative_linear_layer_in_a_hand_written_flow(bias: bool) -> None:
    """A flow the reader writes: RelativeLinear, an elementwise affine layer, RelativeLinear.  ``.grad`` of the
    relative layers equals autograd-through-slogdet's gradient times the augmented metric (float64)."""
    g = torch.Generator().manual_seed(0)
    lin1 = rt.RelativeLinear(6, bias=bias, generator=g, dtype=F64)
    lin2 = rt.RelativeLinear(6, bias=bias, generator=g, dtype=F64)
    log_scale = torch.nn.Parameter(0.3 * torch.randn(6, generator=g, dtype=F64))
    with torch.no_grad():
        for lin in (lin1, lin2):
            lin.weight.add_(0.4 * torch.randn(6, 6, generator=g, dtype=F64))
            if bias:
                lin.bias.copy_(torch.randn(6, generator=g, dtype=F64))
    x = torch.randn(20, 6, generator=g, dtype=F64)

    def nll(exact: bool) -> torch.Tensor:
        rule = "autodiff" if exact else None
        y, ld1 = lin1(x, rule)
        y = y * log_scale.exp()  # an "ActNorm-like" layer written by hand
        s, ld2 = lin2(y, rule)
        base = torch.distributions.Normal(0.0, 1.0).log_prob(s).sum(1)
        return -(base + ld1 + log_scale.sum() + ld2).mean()

    exact = torch.autograd.grad(nll(True), [lin1.weight, lin2.weight, log_scale] + ([lin1.bias, lin2.bias] if bias else []))
    nll(False).backward()
    for k, lin in enumerate((lin1, lin2)):
        gb = exact[3 + k] if bias else None
        want_w, want_b = relative_of(exact[k], gb, lin.weight.detach(), None if lin.bias is None else lin.bias.detach())
        assert rel(lin.weight.grad, want_w) < 1e-12
        if bias:
            assert rel(lin.bias.grad, want_b) < 1e-12
    assert rel(log_scale.grad, exact[2]) < 1e-12  # the other layer gets its ordinary gradient


def test_relative_linear_modes_values_and_inverse() -> None:
    g = torch.Generator().manual_seed(1)
    lin = rt.RelativeLinear(5, generator=g, dtype=F64)
    with torch.no_grad():
        lin.weight.mul_(1.7).add_(0.2 * torch.randn(5, 5, generator=g, dtype=F64))
        lin.bias.normal_(generator=g)
    x = torch.randn(7, 5, generator=g, dtype=F64)
    y, ld = lin(x)
    assert torch.equal(ld, torch.zeros(7, dtype=F64))  # training: the zero-valued stand-in
    lin.eval()
    y2, ld2 = lin(x)
    true = torch.log(torch.linalg.det(lin.weight.detach()).abs())
    assert torch.allclose(y2, y) and torch.allclose(ld2, true.expand(7), rtol=1e-13)
    back, ld_inv = lin.inverse(y2.detach())
    assert torch.allclose(back, x, rtol=1e-12, atol=1e-12) and torch.allclose(ld_inv, -ld2, rtol=1e-13)
    with pytest.raises(ValueError, match="valid methods are " + ", ".join(rt.RULES)):
        lin(x, rule="natural")
    with pytest.raises(ShapeError, match=r"\(N, 5\)"):
        lin(torch.zeros(3, 4, dtype=F64))


def test_evaluation_factorises_once_per_value_of_the_weight() -> None:
    """The LU is cached: many evaluations between two steps factorise once; every change of W is seen
    (including fused Adam, which does not bump the version counter)."""
    model = random_flow(6, 2)
    x = data(10, 6)
    rec = OpRecorder()
    with rec, torch.no_grad():
        for _ in range(3):
            model.log_prob(x)
    lu_calls = [op for op in rec.ops if "lu_factor" in op]
    assert lu_calls  # it does factorise ...
    rec2 = OpRecorder()
    with rec2, torch.no_grad():
        model.log_prob(x)
    assert not any("lu_factor" in op for op in rec2.ops)  # ... and not again for the same weights
    before = model.log_prob(x).detach()
    opt = rt.train.make_adam(model.parameters(), lr=0.1)
    rt.training_loss(model, x).backward()
    opt.step()
    with torch.no_grad():
        after = model.log_prob(x)
        fresh = rt.DenseFlow(6, 2, dtype=F64)
        fresh.load_state_dict(model.state_dict())
        assert torch.allclose(after, fresh.log_prob(x), rtol=1e-13) and not torch.allclose(after, before)


def test_condition_check_from_the_lu_factors() -> None:
    """The condition estimate (Hager, from the LU factors) against the 1-norm condition number."""
    g = torch.Generator().manual_seed(3)
    for scale in (1e-2, 1e-6, 1e-10):
        u, _, v = torch.linalg.svd(torch.randn(30, 30, generator=g, dtype=F64))
        w = u @ torch.diag(torch.logspace(0, math.log10(scale), 30, dtype=F64)) @ v
        lin = rt.RelativeLinear(30, dtype=F64)
        with torch.no_grad():
            lin.weight.copy_(w)
        true = float(torch.linalg.cond(w, p=1))
        from relgrad.torch.nn import _inverse_norm1_estimate

        fac = lin.factorisation()
        est = float(torch.linalg.matrix_norm(w, ord=1)) * _inverse_norm1_estimate(fac.lu, fac.pivots)
        assert true / 3 <= est <= true * (1 + 1e-9), (scale, est, true)
    with torch.no_grad():
        lin.weight.copy_(u @ torch.diag(torch.logspace(0, -17, 30, dtype=F64)) @ v)
    with pytest.raises(SingularWeightError, match="singular to torch.float64"):
        lin.eval()(torch.zeros(1, 30, dtype=F64))


# --------------------------------------------------------------------------------------------- independence
def test_float32_relative_gradient_at_d256_against_float64_autodiff() -> None:
    """The float32 relative gradient of a D = 256, L = 3 flow against autodiff x Ahat^T Ahat in float64.

    Tolerance: float32 GEMMs of width 256 round each dot product to ~sqrt(256) * 6e-8 ~ 1e-6 relative, and the
    gradient is a difference of two O(|W|) terms (data part minus W), which can amplify that by the ratio
    of their norms (< 100 here, printed): 1e-4 leaves a margin and still catches any wrong term (those give
    errors of order 1)."""
    dim, layers, m = 256, 3, 64
    model64 = random_flow(dim, layers, seed=5, bias_scale=0.3)
    model32 = random_flow(dim, layers, seed=5, bias_scale=0.3, dtype=torch.float32)
    x = data(m, dim, seed=6)
    nll = -model64.log_likelihood(x).mean()
    params = [p for pair in zip(model64.weights, model64.biases) for p in pair]
    exact = torch.autograd.grad(nll, params)
    got = rt.gradients(model32, x.float(), "relative")
    for k, (gw, gb) in enumerate(got):
        w, b = model64.weights[k].detach(), model64.biases[k].detach()
        want_w, want_b = relative_of(exact[2 * k], exact[2 * k + 1], w, b)
        data_norm = float((want_w + w).norm() / want_w.norm())
        print(f"layer {k + 1}: rel err W {rel(gw.double(), want_w):.1e}, b {rel(gb.double(), want_b):.1e}; "
              f"|data part| / |gradient| = {data_norm:.1f}")
        assert rel(gw.double(), want_w) < 1e-4 and rel(gb.double(), want_b) < 1e-4


# --------------------------------------------------------------------------------------------- conv 1x1
def test_relative_conv1x1_against_conv2d_autodiff() -> None:
    """RelativeConv1x1's gradient = (F.conv2d + H W slogdet, by autograd) times the augmented metric, float64;
    its exact log-determinant and inverse; no inverse/slogdet/solve in its training step."""
    g = torch.Generator().manual_seed(7)
    n, c, h, w_ = 3, 4, 5, 6
    for bias in (False, True):
        conv = rt.RelativeConv1x1(c, bias=bias, generator=g, dtype=F64)
        with torch.no_grad():
            conv.weight.add_(0.3 * torch.randn(c, c, generator=g, dtype=F64))
            if bias:
                conv.bias.copy_(torch.randn(c, generator=g, dtype=F64))
        x = torch.randn(n, c, h, w_, generator=g, dtype=F64)
        w = conv.weight.detach().clone().requires_grad_()
        b = conv.bias.detach().clone().requires_grad_() if bias else None
        y_ref = torch.nn.functional.conv2d(x, w[:, :, None, None], b)
        nll = -(torch.distributions.Normal(0.0, 1.0).log_prob(y_ref).sum((1, 2, 3)) + h * w_ * torch.linalg.slogdet(w)[1]).mean()
        ordinary = torch.autograd.grad(nll, [w] + ([b] if bias else []))
        rec = OpRecorder()
        with rec:
            y, ld = conv(x)
            loss = -(torch.distributions.Normal(0.0, 1.0).log_prob(y).sum((1, 2, 3)) + ld).mean()
            loss.backward()
        assert not {op for op in rec.ops if FORBIDDEN.search(op)}
        assert torch.allclose(y, y_ref, rtol=1e-13, atol=1e-13)
        want_w, want_b = relative_of(ordinary[0], ordinary[1] if bias else None, w.detach(), None if b is None else b.detach())
        assert rel(conv.weight.grad, want_w) < 1e-10
        if bias:
            assert rel(conv.bias.grad, want_b) < 1e-10
        conv.eval()
        y2, ld2 = conv(x)
        assert torch.allclose(ld2, (h * w_ * torch.linalg.slogdet(w.detach())[1]).expand(n), rtol=1e-12)
        back, ld_inv = conv.inverse(y2.detach())
        assert torch.allclose(back, x, atol=1e-11) and torch.allclose(ld_inv, -ld2)
    with pytest.raises(ShapeError, match=r"\(N, 4, H, W\)"):
        conv(torch.zeros(2, 3, 4, 4, dtype=F64))


# --------------------------------------------------------------------------------------------- precision
def test_half_precision_parameters_are_refused_with_a_pointer_to_autocast() -> None:
    for dtype in (torch.float16, torch.bfloat16):
        with pytest.raises(TypeError, match="torch.autocast"):
            rt.DenseFlow(3, dtype=dtype)
        with pytest.raises(TypeError, match="torch.autocast"):
            rt.RelativeLinear(3, dtype=dtype)
        model = rt.DenseFlow(3, generator=0).to(dtype)  # converted after construction: refused at first use
        with pytest.raises(TypeError, match="torch.autocast"):
            rt.training_loss(model, torch.randn(4, 3))


def test_bf16_autocast_trains_and_its_gradient_is_close_to_float32() -> None:
    model = random_flow(16, 3, dtype=torch.float32, bias_scale=0.3)
    x = data(64, 16).float()
    ref = rt.gradients(model, x, "relative")
    for method in ("relative", "authors", "autodiff"):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = rt.training_loss(model, x, method)
        assert loss.dtype == torch.float32
        loss.backward()
        want = ref if method == "relative" else rt.gradients(model, x, method)
        for (gw, gb), w, b in zip(want, model.weights, model.biases):
            assert w.grad.dtype == torch.float32
            # bf16 keeps 8 significant bits (2^-8 = 4e-3 relative per product): the whole gradient within 3e-2
            assert rel(w.grad, gw) < 3e-2 and rel(b.grad, gb) < 3e-2, (method, rel(w.grad, gw))
    xt, xv = data(256, 16, seed=3).float(), data(64, 16, seed=4).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hist = rt.fit(model, xt, xv, epochs=1, batch_size=32, lr=1e-3, generator=0, progress=False)
    assert len(hist.val_log_likelihood) == 1 and math.isfinite(hist.val_log_likelihood[0])
    assert all(p.dtype == torch.float32 for p in model.parameters())


# --------------------------------------------------------------------------------------------- compile / func
@pytest.mark.parametrize("method", ["relative", "authors", "ordinary", "autodiff"])
def test_compiled_step_fullgraph_matches_eager(method: str) -> None:
    model = random_flow(8, 3, dtype=torch.float32, bias_scale=0.3)
    x = data(32, 8).float()
    eager = rt.gradients(model, x, method)
    torch._dynamo.reset()
    step = torch.compile(lambda m, xb: rt.training_loss(m, xb, method, check=False), fullgraph=True, backend="aot_eager")
    model.zero_grad()
    step(model, x).backward()
    for (gw, gb), w, b in zip(eager, model.weights, model.biases):
        assert torch.allclose(w.grad, gw, rtol=1e-6, atol=1e-6) and torch.allclose(b.grad, gb, rtol=1e-6, atol=1e-6)
    # a compiled module (torch.compile(model)) goes through training_loss too
    torch._dynamo.reset()
    model.zero_grad()
    rt.training_loss(torch.compile(model, fullgraph=True, backend="aot_eager"), x, method, check=False).backward()
    assert all(torch.allclose(w.grad, gw, rtol=1e-6, atol=1e-6) for (gw, _), w in zip(eager, model.weights))
    torch._dynamo.reset()


def test_torch_func_grad_and_vmap_over_an_ensemble() -> None:
    from torch.func import functional_call, grad, stack_module_state, vmap

    flows = [random_flow(5, 2, seed=s) for s in range(4)]
    x = data(12, 5)
    template = flows[0]

    def loss(params, buffers, xb):
        s, logabsdet = functional_call(template, (params, buffers), (xb,), {"rule": "relative"})
        return -(template.base_log_prob(s) + logabsdet).mean()

    params = {k: v.detach() for k, v in template.named_parameters()}
    buffers = dict(template.named_buffers())
    g = grad(loss)(params, buffers, x)
    want = rt.gradients(template, x, "relative")
    assert torch.allclose(g["layers.0.weight"], want[0][0], rtol=1e-13, atol=1e-14)
    assert torch.allclose(g["layers.1.bias"], want[1][1], rtol=1e-13, atol=1e-14)
    stacked, stacked_buffers = stack_module_state(flows)
    gv = vmap(grad(loss), in_dims=(0, 0, None))(stacked, stacked_buffers, x)
    for i, flow in enumerate(flows):
        for k, (gw, gb) in enumerate(rt.gradients(flow, x, "relative")):
            assert torch.allclose(gv[f"layers.{k}.weight"][i], gw, rtol=1e-12, atol=1e-13)
            assert torch.allclose(gv[f"layers.{k}.bias"][i], gb, rtol=1e-12, atol=1e-13)


# --------------------------------------------------------------------------------------------- distributions API
def test_log_prob_sample_shape_and_rsample() -> None:
    model = random_flow(3, 2)
    xs = model.sample((4, 5), generator=0)
    assert xs.shape == (4, 5, 3) and not xs.requires_grad
    assert torch.equal(xs.reshape(20, 3), model.sample(20, generator=0))
    s = torch.randn(20, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert torch.allclose(model(xs.reshape(20, 3))[0], s, atol=1e-10)
    assert torch.allclose(model.log_prob(xs.reshape(20, 3)), model.log_likelihood(xs.reshape(20, 3)))
    # rsample: differentiable, same values; its gradient matches central finite differences
    r = model.rsample(20, generator=0)
    assert r.requires_grad and torch.allclose(r, xs.reshape(20, 3), atol=1e-12)
    w = model.weights[0]
    (gw,) = torch.autograd.grad(r.pow(2).sum(), w)
    eps = 1e-6
    with torch.no_grad():
        w[0, 1] += eps
        up = model.sample(20, generator=0).pow(2).sum()
        w[0, 1] -= 2 * eps
        down = model.sample(20, generator=0).pow(2).sum()
        w[0, 1] += eps
    assert float(gw[0, 1]) == pytest.approx(float((up - down) / (2 * eps)), rel=1e-5)


def test_any_base_distribution() -> None:
    """A Laplace base (D independent components): log_prob adds its log-density; the relative gradient of
    training_loss equals autodiff x Ahat^T Ahat with that base."""
    base = torch.distributions.Laplace(torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64))
    model = rt.DenseFlow(4, 2, generator=0, dtype=F64, base=base)
    x = data(9, 4)
    s = model(x)[0]
    lp = model.log_prob(x)
    assert torch.allclose(lp - model.log_likelihood_terms(x).activation - model.logdet_weights().sum(),
                          base.log_prob(s).sum(1), rtol=1e-13)
    exact = torch.autograd.grad(-model.log_prob(x).mean(), [model.weights[0], model.biases[0]])
    gw, gb = rt.gradients(model, x, "relative")[0]
    want_w, want_b = relative_of(exact[0], exact[1], model.weights[0].detach(), model.biases[0].detach())
    assert rel(gw, want_w) < 1e-12 and rel(gb, want_b) < 1e-12
    assert model.sample(3, generator=1).shape == (3, 4)
    assert torch.equal(model.sample(3, generator=1), model.sample(3, generator=1))
    with pytest.raises(ShapeError, match="distribution over R"):
        rt.DenseFlow(4, base=torch.distributions.Normal(torch.zeros(3), torch.ones(3)))


def test_state_dict_carries_dim_and_alpha() -> None:
    a = rt.DenseFlow(3, 2, alpha=0.3, generator=0)
    with pytest.raises(CheckpointError, match="alpha"):
        rt.DenseFlow(3, 2, alpha=0.1).load_state_dict(a.state_dict())
    old_style = {f"weights.{k}": a.weights[k].detach() for k in range(2)} | {f"biases.{k}": a.biases[k].detach() for k in range(2)}
    b = rt.DenseFlow(3, 2, alpha=0.3)
    b.load_state_dict(old_style)  # state dicts from before the layers were modules still load
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# --------------------------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_ranks_equal_one_process(tmp_path) -> None:
    """Two gloo processes on the loopback interface, float64: after 5 SGD / Adam steps of relative, authors,
    mixed and autodiff through DDP, and of RelativeAdam / RelativeSGD (statistics averaged over the processes),
    both ranks hold the same parameters, equal to one process on the concatenated batches to 1e-12 (and the
    parameters did move); fit with each, unequal shares included, equals fit in one process."""
    out = tmp_path / "ddp.json"
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "tests"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(ROOT / "tests" / "ddp_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    methods = ("relative", "authors", "mixed", "autodiff")
    assert set(results) == ({f"{m}/{o}" for m in methods for o in ("sgd", "adam")} | {f"fit/{m}" for m in methods}
                            | {"relative/relative-adam", "relative/relative-sgd", "fit/relative-adam"}
                            | {"fit/refused", "fit/cut-resume"})
    refused = results.pop("fit/refused")
    assert "needs generator= an explicit seed" in refused["no_generator"]
    assert "x_train differs between the processes" in refused["different_data"]
    assert "x_train differs between the processes" in refused["reordered_data"]
    assert "different shuffling states" in refused["seed_plus_rank"]
    assert "the arguments differ between the processes" in refused["different_settings"]
    assert "Pass the DistributedDataParallel wrapper" in refused["relative_adam_unwrapped"]
    cut = results.pop("fit/cut-resume")      # time cut agreed by both ranks, resume == uninterrupted
    assert cut["cut"] == ["time_cap", [3.0, 3.0]]
    assert cut["one_process"].startswith("CheckpointError") and "on 2 process(es)" in cut["one_process"]
    assert cut["params"] < 1e-12 and cut["val"] < 1e-10
    assert cut["train_loss"][0] == pytest.approx(cut["train_loss"][1], rel=1e-12)   # the cut epoch's loss too
    for key, r in results.items():
        print(key, r)
        assert r["between_ranks"] == 0.0 or r["between_ranks"] < 1e-14, key
        assert r["vs_single_process"] < 1e-12, key
        assert r["moved"] > 1e-3, key
        if key.startswith("fit/"):  # fit(DDP(model), batch_size=4) on 2 ranks == fit(model, batch_size=8)
            assert r["epochs"][0] == r["epochs"][1] == 3 and r["steps"][0] == r["steps"][1] == 3 * 5, key
            assert r["train_loss"] < 1e-10 and r["val_ll"] < 1e-10, key
            assert r["checkpoint"] == {"rank0_written": True, "rank1_written": False, "vs_model": 0.0}, key


def test_training_loss_accepts_wrappers_and_refuses_other_models() -> None:
    model = random_flow(3, 2)
    x = data(5, 3)

    class Wrapper(torch.nn.Module):  # the shape of DDP / DataParallel: the flow under .module
        def __init__(self, module):
            super().__init__()
            self.module = module
            self.calls = 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.module(*args, **kwargs)

    wrapped = Wrapper(model)
    assert torch.equal(rt.training_loss(wrapped, x), rt.training_loss(model, x)) and wrapped.calls == 1
    with pytest.raises(TypeError, match="DenseFlow"):
        rt.training_loss(torch.nn.Linear(3, 3), x)
