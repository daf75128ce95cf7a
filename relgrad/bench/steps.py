"""One training step per benchmark method, split into the gradient (forward + backward) and the optimiser update.

A :class:`Step` is built once per configuration and then called many times by the harness.  Every method
trains the same dense flow shape (L layers of D x D, batch M) from the same seed with Adam:

=========  ===========================================================================================
plain      the same MLP and loss without any log-determinant term: the lower bound of any exact method
relative   the tight relative gradient (``relgrad.torch.RelativeLinear`` / ``relgrad.numpy``), O(L M D^2)
authors    the published code's evaluation order (three M x D x D products per layer), O(L M D^2)
ordinary   the Euclidean gradient with an explicit inverse W^{-T} per layer, O(L M D^2 + L D^3)
autodiff   autograd through ``torch.linalg.slogdet`` (torch only), O(L M D^2 + L D^3)
lu         LU-parameterised layers as in nflows (torch only, :mod:`relgrad.bench.lu`), O(L M D^2)
jacobian   autodiff through the full per-sample Jacobian, ``vmap(jacrev(g))`` + ``slogdet`` (torch only,
           :mod:`relgrad.bench.jacobian`): most likely the paper's "Autodiff" curve, O(L M D^3) time, O(L M D^2) memory
gemm       only the GEMMs of the relative step, at its shapes and layouts, into preallocated outputs: the
           machine's GEMM rate for this step
=========  ===========================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Tuple

import numpy as np

from ..costs import step_flops

__all__ = ["torch_gemm_buffers", "METHODS", "DEFAULT_METHODS", "BACKENDS", "TORCH_ONLY", "CUBIC", "PER_SAMPLE_JACOBIAN", "Step",
           "make_step", "available"]

METHODS = ("plain", "relative", "authors", "ordinary", "autodiff", "lu", "jacobian", "gemm", "relative-adam")
#: What ``python -m relgrad.bench`` times without ``--methods``: all but "jacobian", whose O(M D^2) memory
#: (about 22 GB at the default D = 784, M = 1000) and O(M D^3) time make it opt-in, and "relative-adam" (the
#: relative gradient with relgrad.torch.optim.RelativeAdam instead of Adam: an optimiser comparison, opt-in).
DEFAULT_METHODS = tuple(m for m in METHODS if m not in ("jacobian", "relative-adam"))
BACKENDS = ("torch", "numpy")
#: Methods the NumPy twin does not have.
TORCH_ONLY = ("autodiff", "lu", "jacobian", "relative-adam")
#: Methods with an O(D^3) term per step (skipped above ``--max-cubic-dim``).
CUBIC = ("ordinary", "autodiff")
#: Methods with an O(M D^3) term and O(M D^2) memory per step (skipped above ``--max-jacobian-dim``).
PER_SAMPLE_JACOBIAN = ("jacobian",)

#: Adam's step size in the benchmark: small, so hundreds of timed steps leave the weights where they started.
BENCH_LR = 1e-6


@dataclass
class Step:
    """A benchmark method ready to run.

    ``grad()`` computes the gradient (forward and backward pass) and leaves it where ``update()`` applies it
    (Adam; RelativeAdam for "relative-adam"); ``sync()`` waits for the device.  ``flops`` is the GEMM-flop model of ``grad()``.
    """

    grad: Callable[[], None]
    update: Callable[[], None]
    sync: Callable[[], None]
    flops: float


def _nothing() -> None:
    return None


# --------------------------------------------------------------------------------------------- torch
def _torch_step(method: str, n_layers: int, batch: int, dim: int, device: str, dtype: str, seed: int) -> Step:
    import torch

    from ..torch import DenseFlow, data_loss, training_loss
    from ..torch.train import make_adam
    from .lu import LUDenseFlow

    tdtype = getattr(torch, dtype)
    # A generator on the device: the initial QR (O(D^3) in float64) then runs there, not on the host CPU
    # (minutes per model at D = 16384 on a small host).
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, dim, generator=gen, dtype=tdtype, device=device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else _nothing
    flops = step_flops(method, n_layers, batch, dim)

    if method == "lu":
        lu_model = LUDenseFlow(dim, n_layers, generator=gen, device=device, dtype=tdtype)
        opt = make_adam(lu_model.parameters(), lr=BENCH_LR)

        def lu_grad() -> None:
            opt.zero_grad(set_to_none=True)
            lu_model.loss(x).backward()

        return Step(lu_grad, opt.step, sync, flops)

    model = DenseFlow(dim, n_layers, generator=gen, device=device, dtype=tdtype)
    if method == "gemm":
        ws = [w.detach() for w in model.weights]
        bs = [b.detach() for b in model.biases]
        bufs = torch_gemm_buffers(x, ws)
        return Step(lambda: _torch_gemms(x, ws, bs, bufs), _nothing, sync, flops)

    if method == "relative-adam":  # the same gradient; the update is RelativeAdam's step (its products in opt_ms)
        from ..torch.optim import RelativeAdam

        ropt = RelativeAdam(model, lr=BENCH_LR)

        def relative_grad() -> None:
            ropt.zero_grad(set_to_none=True)
            training_loss(model, x, "relative", check=False).backward()

        return Step(relative_grad, ropt.step, sync, flops)
    opt = make_adam(model.parameters(), lr=BENCH_LR)
    if method == "plain":
        loss_fn = lambda: data_loss(model, x)  # noqa: E731
    elif method == "jacobian":
        from .jacobian import jacobian_nll

        loss_fn = lambda: jacobian_nll(model, x, check=False)  # noqa: E731
    else:
        loss_fn = lambda: training_loss(model, x, method, check=False)  # noqa: E731

    def grad() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()

    return Step(grad, opt.step, sync, flops)


def torch_gemm_buffers(x, ws) -> dict:
    """Preallocated outputs (shared with ``python -m relgrad.bench.trace``) for :func:`_torch_gemms`: (M, D) for the forward, ``Y W`` and ``Delta W``
    products, one (D, D) per layer for ``Delta^T (Y W)`` (the relative step writes L distinct gradients)."""
    import torch

    return {"ys": [torch.empty_like(x) for _ in ws], "yw": torch.empty_like(x),
            "delta": [torch.empty_like(x) for _ in ws], "grads": [torch.empty_like(w) for w in ws]}


def _torch_gemms(x, ws, bs, out: dict) -> None:
    """The GEMMs of one relative step, in its shapes and layouts (the same calls as
    :class:`relgrad.torch.functions.RelativeAffine`: ``addmm(b, Z, W^T)`` forward, then per layer, last
    to first, ``Y W``, ``mm(Delta^T, Y W)`` with ``Delta^T`` a transposed view, and ``Delta W`` except for
    layer 1), each written into a preallocated output (:func:`torch_gemm_buffers`).

    Preallocated, because a fresh D x D output can cost more than its product: at D = 4096 (64 MiB, above
    glibc's mmap threshold, which grows up to 32 MiB, so a new mapping each time) its 16 384 page faults took 13 to
    110 ms per call on the book's machine, against about 3 ms for the product at M = 10
    (``relgrad/results/bench/cpu_gemm_trace.csv``).  A reference that allocates measures page faults and
    is not a ceiling; this one measures the products alone.
    """
    import torch

    ys, z = out["ys"], x
    for k, (w, b) in enumerate(zip(ws, bs)):
        z = torch.addmm(b, z, w.T, out=ys[k])
    delta = ys[-1]
    for k in reversed(range(len(ws))):
        yw = torch.mm(ys[k], ws[k], out=out["yw"])
        torch.mm(delta.T, yw, out=out["grads"][k])
        if k > 0:
            delta = torch.mm(delta, ws[k], out=out["delta"][k])


# --------------------------------------------------------------------------------------------- numpy
def _numpy_step(method: str, n_layers: int, batch: int, dim: int, dtype: str, seed: int) -> Step:
    from ..numpy import DenseFlow
    from ..numpy.gradients import loss_and_gradients
    from ..numpy.train import Adam

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, dim)).astype(dtype)
    model = DenseFlow(dim, n_layers, rng=rng, dtype=dtype)
    flops = step_flops(method, n_layers, batch, dim)
    if method == "gemm":
        bufs = _numpy_gemm_buffers(x, model.weights)
        return Step(lambda: _numpy_gemms(x, model.weights, model.biases, bufs), _nothing, _nothing, flops)

    opt = Adam(model.parameters(), lr=BENCH_LR)
    grads: List[np.ndarray] = []

    def grad() -> None:
        if method == "plain":
            pairs = _numpy_plain(model, x)
        else:
            pairs = loss_and_gradients(model, x, method)[1]
        grads[:] = [dw for dw, _ in pairs] + [db for _, db in pairs]  # the order of model.parameters()

    return Step(grad, lambda: opt.step(grads), _nothing, flops)


def _numpy_plain(model, x: np.ndarray) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Backprop through the same MLP and loss with no log-determinant: ``(Delta^T Z, Delta^T 1)`` per layer."""
    from ..numpy.gradients import deltas

    tr = model.trace(x)
    model._data_terms(tr)  # the loss value, as the other methods compute it
    return [(d.T @ z, d.sum(axis=0)) for d, z in zip(deltas(model, tr), tr.zs)]


def _numpy_gemm_buffers(x: np.ndarray, ws: List[np.ndarray]) -> dict:
    """Preallocated outputs for :func:`_numpy_gemms` (as :func:`torch_gemm_buffers`)."""
    return {"ys": [np.empty_like(x) for _ in ws], "yw": np.empty_like(x),
            "delta": [np.empty_like(x) for _ in ws], "grads": [np.empty_like(w) for w in ws]}


def _numpy_gemms(x: np.ndarray, ws: List[np.ndarray], bs: List[np.ndarray], out: dict) -> None:
    """NumPy version of :func:`_torch_gemms`: the NumPy relative step's products (``Z W^T``, ``Y W``,
    ``Delta^T (Y W)``, ``Delta W``), each into a preallocated output."""
    ys, z = out["ys"], x
    for k, (w, b) in enumerate(zip(ws, bs)):
        z = np.matmul(z, w.T, out=ys[k])
        z += b
    delta = ys[-1]
    for k in reversed(range(len(ws))):
        yw = np.matmul(ys[k], ws[k], out=out["yw"])
        np.matmul(delta.T, yw, out=out["grads"][k])
        if k > 0:
            delta = np.matmul(delta, ws[k], out=out["delta"][k])


# --------------------------------------------------------------------------------------------- factory
def make_step(backend: str, method: str, n_layers: int, batch: int, dim: int, *, device: str = "cpu",
              dtype: str = "float32", seed: int = 0) -> Step:
    """Build the step of ``method`` on ``backend`` ("torch" or "numpy") for an L x D flow and batch M.

    Raises ValueError for an unknown backend or method, or a torch-only method ("autodiff", "lu",
    "jacobian") on NumPy, and
    relgrad.errors.DeviceError for a CUDA device that does not exist.

    Shapes:
        the step trains L weights (D, D) and biases (D,) on one fixed batch (M, D).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends are {', '.join(BACKENDS)}")
    if method not in METHODS:
        raise ValueError(f"unknown benchmark method {method!r}; valid methods are {', '.join(METHODS)}")
    if backend == "numpy":
        if method in TORCH_ONLY:
            raise ValueError(f"method {method!r} is torch-only (it needs autograd, or an optimiser or layer the "
                             "NumPy twin does not have)")
        if device != "cpu":
            raise ValueError(f"the numpy backend runs on the CPU only, not on {device!r}")
        return _numpy_step(method, n_layers, batch, dim, dtype, seed)
    from ..utils import select_device

    return _torch_step(method, n_layers, batch, dim, select_device(device), dtype, seed)


def available(backend: str, method: str) -> bool:
    """Whether ``backend`` has ``method`` (the NumPy twin lacks :data:`TORCH_ONLY`)."""
    return not (backend == "numpy" and method in TORCH_ONLY)

