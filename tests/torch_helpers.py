"""Shared fixtures-as-functions of the torch tests (CPU and CUDA): generic flows, data, an op recorder."""

from __future__ import annotations

import math
import re
from typing import Set

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from relgrad.torch import DenseFlow, training_loss

F64 = torch.float64

#: ATen op names that would mean an O(D^3) factorisation, inverse or determinant.
FORBIDDEN = re.compile(r"(^|_)(slogdet|det|logdet|inv|inverse|solve|lu|svd|svdvals|eig|eigh|cholesky|qr|pinv)(_|$)")


def random_flow(dim: int, n_layers: int, *, seed: int = 0, dtype: torch.dtype = F64, device: str = "cpu",
                bias_scale: float = 0.7) -> DenseFlow:
    """Non-orthogonal weights and non-zero biases (so every term of every identity is exercised), drawn
    on the CPU in float64 so that every device and dtype gets the same parameters."""
    g = torch.Generator().manual_seed(seed)
    model = DenseFlow(dim, n_layers, generator=g, dtype=dtype, device=device)
    with torch.no_grad():
        for w, b in zip(model.weights, model.biases):
            w.copy_(torch.eye(dim, dtype=F64) + 0.5 * torch.randn(dim, dim, generator=g, dtype=F64) / math.sqrt(dim))
            b.copy_(bias_scale * torch.randn(dim, generator=g, dtype=F64))
    return model


def data(m: int, dim: int, seed: int = 1) -> torch.Tensor:
    """A float64 CPU batch (m, dim)."""
    return 1.5 * torch.randn(m, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


class OpRecorder(TorchDispatchMode):
    """Records the name of every ATen op that runs (forward and backward, including custom Functions)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func._schema.name.split("::")[-1])
        return func(*args, **(kwargs or {}))


def forbidden_ops(model: DenseFlow, x: torch.Tensor, method: str) -> Set[str]:
    """The O(D^3) ops one ``training_loss(...).backward()`` with ``method`` runs."""
    rec = OpRecorder()
    with rec:
        training_loss(model, x, method).backward()
    return {op for op in rec.ops if FORBIDDEN.search(op)}
