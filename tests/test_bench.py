"""The benchmark harness: it runs what it says (FLOP counts, the LU baseline's exact likelihood), writes a
complete CSV, computes ratios and slopes correctly, and refuses bad input clearly.  No speed is asserted."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from relgrad.bench import FIELDS, format_ratio_table, loglog_slope, make_step, ratio_rows, read_csv, slopes, write_csv
from relgrad.bench.cli import build_parser, main
from relgrad.bench.lu import LUDenseFlow
from relgrad.costs import step_flops
from relgrad.errors import DeviceError
from relgrad.torch.flow import standard_normal_log_prob
from relgrad.torch.activation import log_sigma_prime, sigma
from relgrad.utils import cuda_available


def test_help_lists_every_method(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for method in ("plain", "relative", "authors", "ordinary", "autodiff", "lu", "jacobian", "gemm", "relative-adam",
                   "--quick", "--max-jacobian-dim"):
        assert method in out


def test_small_run_writes_every_pair_and_prints_ratios(tmp_path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "b.csv"
    assert main(["--dims", "16,24,32", "--batches", "4", "--repeats", "2", "--warmup", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rel/plain" in printed and "Fitted log-log slopes" in printed
    rows = read_csv(out)
    with open(out) as fh:
        assert fh.readline().strip().split(",") == list(FIELDS)
    pairs = {(r["backend"], r["method"]) for r in rows}
    torch_methods = {"plain", "relative", "authors", "ordinary", "autodiff", "lu", "gemm"}  # "jacobian", "relative-adam": opt-in
    assert pairs == {("torch", m) for m in torch_methods} | {("numpy", m) for m in torch_methods - {"autodiff", "lu"}}
    assert len(rows) == 3 * len(pairs)
    for r in rows:
        assert r["rounds"] == 2 and r["grad_ms_q1"] <= r["grad_ms"] <= r["grad_ms_q3"]
        assert r["step_ms"] > 0 and r["gflops"] > 0 and r["cpu"] and r["numpy"] == np.__version__
        assert math.isnan(r["gemm_fraction"]) == (r["method"] == "gemm")


def test_relative_adam_step_updates_with_relative_adam() -> None:
    """"relative-adam": the relative gradient (its flops as "relative"), then RelativeAdam's step: 6 L M D^2 more
    GEMM flops in the update, and the weights move (a little: the benchmark's lr)."""
    n_layers, batch, dim = 2, 8, 64
    step = make_step("torch", "relative-adam", n_layers, batch, dim)
    counter = FlopCounterMode(display=False)
    with counter:
        step.grad()
    assert counter.get_total_flops() == step_flops("relative", n_layers, batch, dim) == step.flops
    counter = FlopCounterMode(display=False)
    with counter:
        step.update()
    assert counter.get_total_flops() == 6 * n_layers * batch * dim**2
    step.grad()
    before = [w.detach().clone() for w in step.update.__self__._layers[0].parameters()]
    step.update()
    assert any(not torch.equal(a, b) for a, b in zip(before, step.update.__self__._layers[0].parameters()))
    with pytest.raises(ValueError, match="torch-only"):
        make_step("numpy", "relative-adam", n_layers, batch, dim)


@pytest.mark.parametrize("method", ["plain", "relative", "authors", "lu", "gemm"])
def test_torch_steps_run_the_gemm_flops_of_their_cost_model(method: str) -> None:
    """FlopCounterMode counts the GEMMs a step really runs; they must match relgrad.costs.step_flops."""
    n_layers, batch, dim = 2, 8, 64
    step = make_step("torch", method, n_layers, batch, dim)
    counter = FlopCounterMode(display=False)
    with counter:
        step.grad()
    got, want = counter.get_total_flops(), step_flops(method, n_layers, batch, dim)
    assert abs(got / want - 1) < 0.1, (method, got, want)


def test_lu_flow_loss_is_the_exact_negative_log_likelihood() -> None:
    """Assemble W_k = L_k U_k P_k explicitly and compare the LU flow's loss with slogdet of the dense matrices."""
    torch.manual_seed(0)
    dim, n_layers = 5, 2
    model = LUDenseFlow(dim, n_layers, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = torch.randn(7, dim, dtype=torch.float64)
    z, act, logdet = x, 0.0, 0.0
    with torch.no_grad():
        for k in range(n_layers):
            low = torch.tril(model.lower[k], -1) + torch.eye(dim, dtype=torch.float64)
            up = torch.triu(model.upper[k], 1) + torch.diag(torch.nn.functional.softplus(model.diag[k]) + 1e-3)
            perm = torch.eye(dim, dtype=torch.float64)[getattr(model, f"perm{k}")]  # rows: z[:, p] = z P^T
            w = low @ up @ perm
            y = z @ w.T + model.biases[k]
            logdet = logdet + torch.linalg.slogdet(w).logabsdet
            if k < n_layers - 1:
                act = act + log_sigma_prime(y, model.alpha).sum(-1)
                z = sigma(y, model.alpha)
        want = -(standard_normal_log_prob(y) + act).mean() - logdet
        got = model.loss(x)
    assert abs(float(got - want)) < 1e-12


def test_ratios_and_slopes_from_synthetic_rows(tmp_path) -> None:
    rows = []
    for dim in (100, 200, 400, 800):
        for method, t in (("plain", 1.0 * dim**2), ("relative", 1.3 * dim**2), ("ordinary", 1e-2 * dim**3),
                          ("gemm", 1.1 * dim**2)):
            rows.append({"backend": "torch", "device": "cpu", "dtype": "float32", "n_layers": 2, "batch": 10,
                         "dim": dim, "method": method, "rounds": 3, "grad_ms": t, "grad_ms_q1": t, "grad_ms_q3": t,
                         "opt_ms": 0.0, "step_ms": t, "step_ms_q1": t, "step_ms_q3": t, "flops": 1.0,
                         "gflops": 1.0 / t, "gemm_fraction": (1.1 / 1.3 if method == "relative" else ""),
                         "threads": "2", "cpu": "x", "gpu": "", "torch": "t", "numpy": "n", "blas": "b",
                         "relgrad": "r", "date": "d"})
    rows = read_csv(write_csv(rows, tmp_path / "s.csv"))  # through the file, as the book reads them
    summary = ratio_rows(rows)
    assert len(summary) == 4
    assert all(abs(s["relative/plain"] - 1.3) < 1e-5 for s in summary)
    assert abs(summary[-1]["ordinary/relative"] - 1e-2 * 800 / 1.3) < 1e-3
    assert all(math.isnan(s["lu/relative"]) for s in summary)
    fitted = {s["method"]: s["slope"] for s in slopes(rows)}
    assert abs(fitted["relative"] - 2.0) < 1e-6 and abs(fitted["ordinary"] - 3.0) < 1e-6
    assert "—" in format_ratio_table(rows) and "85%" in format_ratio_table(rows)
    assert abs(loglog_slope([1, 10, 100], [5, 500, 50000]) - 2.0) < 1e-12


def test_bad_requests_fail_clearly(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match="unknown benchmark method 'fast'.*relative"):
        make_step("torch", "fast", 2, 4, 8)
    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        make_step("jax", "relative", 2, 4, 8)
    with pytest.raises(ValueError, match="'lu' is torch-only"):
        make_step("numpy", "lu", 2, 4, 8)
    for argv in (["--dims", "0"], ["--methods", "relative,fast"], ["--batches", "ten"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    assert "choose from" in capsys.readouterr().err


@pytest.mark.skipif(cuda_available(), reason="needs a machine without CUDA")
def test_cuda_request_without_a_gpu(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(DeviceError, match="CUDA is not available"):
        make_step("torch", "relative", 2, 4, 8, device="cuda")
    assert main(["--devices", "cuda", "--out", "-"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
