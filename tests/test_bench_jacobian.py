"""The benchmark's "jacobian" method (autodiff through the full per-sample Jacobian, the paper's third curve):
its Jacobians, likelihood and gradient against independent float64 references, its flop model against
FlopCounterMode, and its wiring (torch only, its own width cap, the memory refusal).  No speed is asserted."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import relgrad.torch as rt
from relgrad.bench import make_step, ratio_rows, run_benchmark
from relgrad.bench.harness import Group, _check_memory, memory_estimate
from relgrad.bench.jacobian import jacobian_nll, per_sample_forward, per_sample_jacobians
from relgrad.costs import flops_jacobian, jacobian_stack_bytes, step_flops


def _flow(dim: int = 5, n_layers: int = 3, seed: int = 1) -> rt.DenseFlow:
    """A float64 flow away from its volume-preserving initialisation (random biases, scaled weights), so
    that every layer's sigma' and every bias matters."""
    model = rt.DenseFlow(dim, n_layers, rng=seed, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for k, (w, b) in enumerate(zip(model.weights, model.biases)):
            w.mul_(0.7 + 0.2 * k).add_(0.1 * torch.randn(w.shape, generator=gen, dtype=torch.float64))
            b.copy_(torch.randn(b.shape, generator=gen, dtype=torch.float64))
    return model


def _batch(m: int = 6, dim: int = 5, seed: int = 2) -> torch.Tensor:
    return torch.randn(m, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_per_sample_forward_is_the_flow() -> None:
    model, x = _flow(), _batch()
    g = per_sample_forward(model)
    s = model(x)[0]
    assert torch.allclose(torch.stack([g(xm) for xm in x]), s, atol=1e-14, rtol=0)


@pytest.mark.parametrize("mode", ["rev", "fwd"])
def test_per_sample_jacobians_match_brute_force_and_finite_differences(mode: str) -> None:
    model, x = _flow(), _batch()
    got = per_sample_jacobians(model, x, mode)
    assert got.shape == (6, 5, 5)
    with torch.no_grad():
        f = lambda v: model(v[None])[0][0]  # noqa: E731  (the library's own forward, one sample)
        brute = torch.stack([torch.autograd.functional.jacobian(f, xm) for xm in x])
        h = 1e-6  # central differences: error O(h^2) ~ 1e-12, rounding ~ 1e-10
        eye = torch.eye(5, dtype=torch.float64)
        fd = torch.stack([torch.stack([(f(xm + h * e) - f(xm - h * e)) / (2 * h) for e in eye], dim=1) for xm in x])
    assert torch.allclose(got, brute, atol=1e-13, rtol=0)
    assert (got - fd).abs().max() < 1e-8


@pytest.mark.parametrize("mode", ["rev", "fwd"])
def test_jacobian_nll_is_the_exact_likelihood_and_its_gradient(mode: str) -> None:
    """Value: -mean log p(x) of DenseFlow.log_prob (one LU per weight); gradient: the exact gradient by two
    other routes, autograd through log_prob and the library's "autodiff" training loss."""
    model, x = _flow(), _batch()
    loss = jacobian_nll(model, x, mode)
    exact = -model.log_prob(x).mean()
    assert abs(loss.item() - exact.item()) < 1e-12
    params = list(model.parameters())
    got = torch.autograd.grad(loss, params)
    via_log_prob = torch.autograd.grad(exact, params)
    via_autodiff = torch.autograd.grad(rt.training_loss(model, x, "autodiff"), params)
    for a, b, c in zip(got, via_log_prob, via_autodiff):
        assert (a - b).abs().max() < 1e-10 and (a - c).abs().max() < 1e-10


def test_jacobian_nll_refuses_bad_input() -> None:
    model = _flow()
    with pytest.raises(ValueError, match="unknown Jacobian mode 'both'"):
        jacobian_nll(model, _batch(), "both")
    with pytest.raises(TypeError, match="DenseFlow"):
        jacobian_nll(torch.nn.Linear(5, 5), _batch())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        jacobian_nll(model, torch.zeros(3, 4, dtype=torch.float64))  # wrong width
    with pytest.raises(ValueError):
        jacobian_nll(model, torch.full((3, 5), float("nan"), dtype=torch.float64))


@pytest.mark.parametrize("n_layers,batch,dim", [(1, 4, 32), (2, 3, 48), (3, 2, 40)])
def test_flop_model_counts_the_executed_products(n_layers: int, batch: int, dim: int) -> None:
    """FlopCounterMode counts the matrix products (not slogdet's LU and solve): they must be the model's
    (6L-2) M D^2 (D + 1) exactly; the model's total adds slogdet's 8/3 M D^3."""
    step = make_step("torch", "jacobian", n_layers, batch, dim)
    counter = FlopCounterMode(display=False)
    with counter:
        step.grad()
    products = (6 * n_layers - 2) * batch * dim**2 * (dim + 1)
    assert counter.get_total_flops() == products
    assert step.flops == step_flops("jacobian", n_layers, batch, dim) == flops_jacobian(n_layers, batch, dim)
    assert step.flops == pytest.approx(products + 8 / 3 * batch * dim**3, rel=1e-12)


def test_bench_step_runs_and_numpy_refuses() -> None:
    step = make_step("torch", "jacobian", 2, 4, 16)
    step.grad()
    step.update()
    step.sync()
    with pytest.raises(ValueError, match="'jacobian' is torch-only"):
        make_step("numpy", "jacobian", 2, 4, 16)


def test_width_cap_skips_it_and_numpy_leaves_it_out() -> None:
    rows = run_benchmark(backends=["torch", "numpy"], methods=["relative", "jacobian"], dims=[8, 16],
                         batches=[3], max_jacobian_dim=8, warmup=1, repeats=1, min_repeats=1, log=None)
    have = {(r["backend"], r["method"], r["dim"]) for r in rows}
    assert have == {("torch", "relative", 8), ("torch", "jacobian", 8), ("torch", "relative", 16),
                    ("numpy", "relative", 8), ("numpy", "relative", 16)}
    summary = {(s["backend"], s["dim"]): s for s in ratio_rows(rows)}
    assert summary["torch", 8]["jacobian/relative"] > 0


def test_memory_estimate_and_refusal_include_the_jacobian_stacks() -> None:
    group = Group("cpu", "float32", 2, 1000, 784)
    stacks = jacobian_stack_bytes(2, 1000, 784)
    assert stacks == 9 * 1000 * 784**2 * 4  # (4L + 1) M D^2 float32 numbers: 22 GB
    state = 4 * 2 * 784**2 * 4
    assert memory_estimate(group, [("torch", "jacobian")]) == state + stacks
    assert memory_estimate(group, [("torch", "relative")]) == state  # no transient for the O(MD^2) methods
    huge = Group("cpu", "float32", 2, 10**6, 4096)  # ~6 PB of stacks: refused on any machine
    with pytest.raises(MemoryError, match="jacobian"):
        _check_memory(huge, [("torch", "relative"), ("torch", "jacobian")])
    _check_memory(huge, [("torch", "relative")])  # on the CPU only the jacobian's stacks are checked


def test_gemm_reference_writes_into_preallocated_outputs() -> None:
    """The fix of the GEMM reference: no allocation per call.  At D = 2900 a D x D float32 output is just
    over 32 MiB, glibc's ceiling for its heap, so a fresh one is a new mapping whose ~8200 pages fault."""
    import resource

    step = make_step("torch", "gemm", 1, 4, 2900)
    step.grad()  # the first call may still touch the buffers' pages
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step.grad()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 100  # vs ~8200 for one fresh output


def test_memory_and_trace_tools_run() -> None:
    from relgrad.bench.memory import main as memory_main, peak_gradient_bytes
    from relgrad.bench.trace import trace_gemm

    got = peak_gradient_bytes("jacobian", 1, 4, 64)
    assert set(got) == {"rss_before_bytes", "peak_bytes"} and got["rss_before_bytes"] > 0 and got["peak_bytes"] >= 0
    with pytest.raises(SystemExit):
        memory_main(["--methods", "gemm"])  # nothing to measure: the reference has no gradient
    rows = trace_gemm(64, 4, rounds=1, methods=("plain", "relative", "gemm"), log=None)
    paths = {r["path"] for r in rows}
    assert {"fresh", "preallocated", "relative step", "plain step"} <= paths
    products = {r["product"] for r in rows if r["path"] == "preallocated"}
    assert products == {"Z W^T + b", "Y W", "Delta^T (Y W)", "Delta W"}
    assert all(r["ms_min"] <= r["ms"] <= r["ms_max"] for r in rows)
