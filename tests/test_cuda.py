"""relgrad.torch on a CUDA GPU: the CPU checks again on the device (skipped when no GPU is present)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import relgrad.numpy as rn
import relgrad.torch as rt
from relgrad.torch.train import make_adam

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from torch_helpers import F64, data, forbidden_ops, random_flow


def flow(dim: int, n_layers: int, device: str, dtype: torch.dtype = F64, seed: int = 0) -> rt.DenseFlow:
    return random_flow(dim, n_layers, seed=seed, dtype=dtype, device=device, bias_scale=0.6)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return ((a - b).norm() / b.norm()).item()


def test_model_lives_on_the_gpu() -> None:
    model = flow(4, 2, "cuda")
    assert all(p.device.type == "cuda" for p in model.parameters())
    x = data(5, 4)  # a CPU batch is moved to the model's device
    assert model(x)[0].device.type == "cuda" and model.log_likelihood(x).device.type == "cuda"
    assert rt.DenseFlow(3, device="auto").device.type == "cuda"


@pytest.mark.parametrize("dim,n_layers", [(3, 1), (6, 3), (32, 2)])
def test_float64_gradient_identities_on_gpu(dim: int, n_layers: int) -> None:
    model = flow(dim, n_layers, "cuda")
    x = data(9, dim).cuda()
    ordinary, autodiff = rt.gradients(model, x, "ordinary"), rt.gradients(model, x, "autodiff")
    assert max(rel(a, b) for pa, pb in zip(ordinary, autodiff) for a, b in zip(pa, pb)) < 1e-11
    relative = rt.gradients(model, x, "relative")
    for (dw, db), (gw, gb), w, b in zip(relative, autodiff, model.weights, model.biases):
        a_hat = torch.zeros(dim + 1, dim + 1, dtype=F64, device="cuda")
        a_hat[:dim, :dim], a_hat[:dim, dim], a_hat[dim, dim] = w.detach(), b.detach(), 1.0
        want = torch.cat([gw, gb[:, None]], dim=1) @ (a_hat.T @ a_hat)
        assert rel(dw, want[:, :dim]) < 1e-10 and rel(db, want[:, dim]) < 1e-10


def test_gpu_agrees_with_cpu_and_numpy() -> None:
    gpu, cpu = flow(10, 3, "cuda"), flow(10, 3, "cpu")
    x = data(12, 10)
    nm = rn.DenseFlow(10, 3)
    for k in range(3):
        nm.weights[k][...] = cpu.weights[k].detach().numpy()
        nm.biases[k][...] = cpu.biases[k].detach().numpy()
    assert rel(gpu.log_likelihood(x), cpu.log_likelihood(x)) < 1e-12
    assert rel(gpu.log_likelihood(x), torch.tensor(nm.log_likelihood(x.numpy()))) < 1e-12
    assert rel(gpu.inverse(x), cpu.inverse(x)) < 1e-12
    for method in ("relative", "authors", "ordinary"):
        gg, gn = rt.gradients(gpu, x, method), rn.gradients(nm, x.numpy(), method)
        for pg, pn in zip(gg, gn):
            assert rel(pg[0], torch.tensor(pn[0])) < 1e-12 and rel(pg[1], torch.tensor(pn[1])) < 1e-12


def test_relative_step_on_gpu_never_factorises() -> None:
    model, x = flow(16, 3, "cuda", torch.float32), data(4, 16).float().cuda()
    seen = {method: forbidden_ops(model, x, method) for method in ("relative", "autodiff")}
    assert seen["relative"] == set() and any("slogdet" in op for op in seen["autodiff"])


def test_float32_training_on_gpu() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1200, 4)) @ np.array([[1.0, 0.5, 0, 0], [0, 1.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0.3, 1.0]])
    x = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)
    model = rt.DenseFlow(4, 2, generator=0, device="cuda")
    assert make_adam(model.parameters()).defaults["fused"] is True
    start = model.log_likelihood(x[1000:].cuda()).mean().item()
    hist = rt.fit(model, x[:1000], x[1000:], epochs=5, lr=1e-2, generator=0, progress=False)
    assert model.dtype == torch.float32 and model.device.type == "cuda"
    assert all(math.isfinite(v) for v in hist.val_log_likelihood)
    assert hist.best_val_log_likelihood > start + 0.1


def test_sampling_on_gpu() -> None:
    model = flow(3, 2, "cuda", torch.float32)
    xs = model.sample(11, generator=4)
    assert xs.shape == (11, 3) and xs.device.type == "cuda" and xs.dtype == torch.float32
    g = torch.Generator(device="cuda").manual_seed(4)
    xg = model.sample(11, generator=g)
    assert xg.device.type == "cuda" and torch.isfinite(xg).all()
    assert torch.equal(xg, model.sample(11, generator=torch.Generator(device="cuda").manual_seed(4)))
    assert torch.allclose(model.inverse(model(xs)[0]), xs, atol=1e-4)


def test_checkpoint_from_gpu_to_cpu(tmp_path) -> None:
    gpu = flow(5, 2, "cuda")
    rt.save_checkpoint(gpu, tmp_path / "gpu.pt")
    cpu = rt.load_checkpoint(flow(5, 2, "cpu", seed=9), tmp_path / "gpu.pt")
    x = data(6, 5)
    assert torch.equal(cpu.log_likelihood(x), gpu.log_likelihood(x).cpu()) or rel(cpu.log_likelihood(x), gpu.log_likelihood(x)) < 1e-12


def test_benchmark_runs_every_torch_method_on_cuda(tmp_path) -> None:
    from relgrad.bench import read_csv
    from relgrad.bench.cli import main

    out = tmp_path / "cuda.csv"
    assert main(["--devices", "cuda", "--backends", "torch", "--dims", "64,128", "--batches", "10",
                 "--repeats", "2", "--warmup", "1", "--out", str(out)]) == 0
    rows = read_csv(out)
    assert {r["method"] for r in rows} == {"plain", "relative", "authors", "ordinary", "autodiff", "lu", "gemm"}
    assert all(r["device"] == "cuda" and r["gpu"] for r in rows)


# --------------------------------------------------------------------------------------------- library on CUDA
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_on_gpu_close_to_float32(dtype: torch.dtype) -> None:
    model = flow(64, 3, "cuda", torch.float32)
    x = data(128, 64).float().cuda()
    for method in ("relative", "authors"):
        ref = rt.gradients(model, x, method)
        model.zero_grad()
        with torch.autocast("cuda", dtype=dtype):
            loss = rt.training_loss(model, x, method, check=False)
        loss.backward()
        for (gw, gb), w, b in zip(ref, model.weights, model.biases):
            assert w.grad.dtype == torch.float32
            assert rel(w.grad, gw) < 3e-2 and rel(b.grad, gb) < 3e-2, (method, dtype, rel(w.grad, gw))


def test_tf32_noise_floor_is_bounded() -> None:
    """With TF32 matmuls (10-bit mantissa) the float32 relative gradient stays within 1e-2 of float64."""
    model64, model32 = flow(256, 2, "cuda"), flow(256, 2, "cuda", torch.float32)
    x = data(64, 256).cuda()
    want = rt.gradients(model64, x, "relative")
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            got = rt.gradients(model32, x.float(), "relative")
            worst = max(rel(gw, ww) for (gw, _), (ww, _) in zip(got, want))
            print(f"TF32={tf32}: worst relative error {worst:.1e}")
            assert worst < (1e-2 if tf32 else 1e-4)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_relative_step_on_gpu(backend: str) -> None:
    model = flow(32, 3, "cuda", torch.float32)
    x = data(64, 32).float().cuda()
    eager = rt.gradients(model, x, "relative")
    torch._dynamo.reset()
    step = torch.compile(lambda m, xb: rt.training_loss(m, xb, "relative", check=False), fullgraph=True, backend=backend)
    model.zero_grad()
    step(model, x).backward()
    for (gw, gb), w, b in zip(eager, model.weights, model.biases):
        assert rel(w.grad, gw) < 1e-5 and rel(b.grad, gb) < 1e-5
    torch._dynamo.reset()


def test_fit_step_makes_no_host_synchronisation() -> None:
    """One training step of the loop's kind (validated data, check=False, fused Adam) under
    torch.cuda.set_sync_debug_mode("error"): any device-to-host sync raises."""
    model = flow(16, 2, "cuda", torch.float32)
    x = data(256, 16).float().cuda()
    opt = make_adam(model.parameters(), lr=1e-3)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rt.training_loss(model, x[:32], check=False).backward()  # warm-up outside the check (lazy CUDA init)
    opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        order = torch.randperm(x.shape[0], device="cuda", generator=gen)
        running = torch.zeros((), device="cuda")
        for start in range(0, 256, 32):
            opt.zero_grad(set_to_none=True)
            loss = rt.training_loss(model, x[order[start:start + 32]], check=False)
            loss.backward()
            opt.step()
            running += loss.detach()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(running).item()


def test_checkpoint_from_cpu_to_gpu_and_auto_device(tmp_path) -> None:
    cpu = flow(5, 2, "cpu")
    rt.save_checkpoint(cpu, tmp_path / "cpu.pt")
    gpu = rt.load_checkpoint(flow(5, 2, "cuda", seed=9), tmp_path / "cpu.pt")
    assert gpu.device.type == "cuda"
    fresh = rt.load_checkpoint(None, tmp_path / "cpu.pt", device="cuda")
    x = data(6, 5)
    for m in (gpu, fresh):
        assert m.device.type == "cuda" and rel(m.log_likelihood(x.cuda()), cpu.log_likelihood(x)) < 1e-12
    assert rt.load_checkpoint(None, tmp_path / "cpu.pt", device="cpu").device.type == "cpu"


def test_ddp_with_cuda_tensors_world_size_one() -> None:
    """DDP (nccl, one rank) on the GPU: the wrapped step gives the unwrapped gradients."""
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        model = flow(8, 2, "cuda")
        x = data(16, 8).cuda()
        want = rt.gradients(model, x, "relative")
        ddp = DDP(model, device_ids=[0])
        rt.training_loss(ddp, x, "relative").backward()
        for (gw, gb), w, b in zip(want, model.weights, model.biases):
            assert rel(w.grad, gw) < 1e-12 and rel(b.grad, gb) < 1e-12
    finally:
        dist.destroy_process_group()


def test_conv1x1_on_gpu_matches_cpu() -> None:
    cpu = rt.RelativeConv1x1(4, generator=0, dtype=F64)
    gpu = rt.RelativeConv1x1(4, generator=0, dtype=F64, device="cuda")
    x = torch.randn(2, 4, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    for m, xx in ((cpu, x), (gpu, x.cuda())):
        y, ld = m(xx)
        (-(y.pow(2).sum() / 2) + ld.sum()).backward()
    assert rel(gpu.weight.grad, cpu.weight.grad) < 1e-12
