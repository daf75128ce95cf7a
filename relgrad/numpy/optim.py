"""The NumPy twin of :mod:`relgrad.torch.optim`: Adam with its statistics in the relative (Lie-algebra) coordinates.

Written to be read next to the derivation in the book: every quantity has the name it has there.  For layer
k with pre-activations ``Y`` (rows), ``Delta = dLoss/dY`` (``relgrad.numpy.deltas``, which carries the 1/M of
the mean loss) and the augmented matrix ``Ahat = [[W, b], [0, 1]]``:

    Etil = Delta^T [Y | 1] - [I | 0]                         (D x (D+1); the relative gradient is Etil Ahat)
    v_row <- b2 v_row + (1 - b2) rowsums(Etil**2),   v_col <- b2 v_col + (1 - b2) colsums(Etil**2)
    a = vhat_row**-1/2,   c = sqrt(sum vhat_row) vhat_col**-1/2       (1/sqrt(Vhat_ij) = a_i c_j, Adafactor)
    P = diag(a) Etil diag(c);   U = P Ahat  = diag(a) Delta^T ((Ytil diag c) Ahat) - diag(a c) [W | b]
    m <- b1 m + (1 - b1) U;    [W | b] <- [W | b] - lr_eff m / (1 - b1^t),   lr_eff = min(lr, max_lie_norm / ||P||_F)

``U`` is formed in rank-M form (two M x D x D products), never as the D x D x D product ``P Ahat``.  Same
arithmetic as the torch optimiser (tested to 1e-10 in float64 on the same batches).

Shapes:
    per layer: weight (D, D), bias (D,); state ``m_w`` (D, D), ``m_b`` (D,), ``v_row`` (D,), ``v_col`` (D + 1,).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .flow import DenseFlow
from .gradients import deltas

__all__ = ["RelativeAdam", "lie_gradient"]


def lie_gradient(y: np.ndarray, delta: np.ndarray, csum: float = -1.0) -> np.ndarray:
    """``Etil = Delta^T [Y | 1] + csum [I | 0]`` (``csum = -1`` for the mean negative log-likelihood).

    Shapes:
        y, delta: (M, D); returns (D, D + 1).
    """
    e = delta.T @ y
    e[np.diag_indices_from(e)] += csum
    return np.concatenate([e, delta.sum(axis=0)[:, None]], axis=1)


class RelativeAdam:
    """Lie-algebra Adam with row/column-factored second moments (see the module docstring for the update).

    ``step(x)`` runs the batch through ``model`` (``model.trace``), backpropagates ``Delta`` and updates every
    layer in place; ``precondition="none"`` gives relative SGD with EMA momentum.

    Shapes:
        x: (M, D) for ``step``.
    """

    def __init__(self, model: DenseFlow, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-30, *, precondition: str = "factored", max_lie_norm: Optional[float] = None) -> None:
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a positive finite number, got {lr!r}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {betas!r}")
        if precondition not in ("factored", "none"):
            raise ValueError(f"precondition must be 'factored' or 'none', got {precondition!r}")
        if max_lie_norm is not None and not max_lie_norm > 0:
            raise ValueError(f"max_lie_norm must be positive or None, got {max_lie_norm!r}")
        self.model, self.lr, self.betas, self.eps = model, float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.precondition, self.max_lie_norm = precondition, max_lie_norm
        d, n = model.dim, model.n_layers
        self.t = 0
        self.m_w = [np.zeros((d, d)) for _ in range(n)]
        self.m_b = [np.zeros(d) for _ in range(n)]
        self.v_row = [np.zeros(d) for _ in range(n)]
        self.v_col = [np.zeros(d + 1) for _ in range(n)]

    def step(self, x: np.ndarray) -> None:
        """One update of every layer from the batch ``x`` (in place)."""
        model = self.model
        trace = model.trace(x)
        ds = deltas(model, trace)
        self.t += 1
        b1, b2 = self.betas
        d = model.dim
        for k in range(model.n_layers):
            w, b, y, delta = model.weights[k], model.biases[k], trace.ys[k], ds[k]
            e = lie_gradient(y, delta)
            if self.precondition == "factored":
                self.v_row[k] = b2 * self.v_row[k] + (1 - b2) * (e ** 2).sum(axis=1)
                self.v_col[k] = b2 * self.v_col[k] + (1 - b2) * (e ** 2).sum(axis=0)
                row_hat = self.v_row[k] / (1 - b2 ** self.t) + self.eps
                col_hat = self.v_col[k] / (1 - b2 ** self.t) + self.eps
                a, c = row_hat ** -0.5, np.sqrt(row_hat.sum()) * col_hat ** -0.5
            else:
                a, c = np.ones(d), np.ones(d + 1)
            lr = self.lr
            if self.max_lie_norm is not None:
                lr = min(lr, self.max_lie_norm / max(float(np.linalg.norm(a[:, None] * e * c[None, :])), 1e-300))
            yc = y * c[None, :d]                                    # Ytil diag(c), first D columns
            u_w = a[:, None] * (delta.T @ (yc @ w)) - (a * c[:d])[:, None] * w
            u_b = a * (delta.T @ (yc @ b + c[d])) - a * c[:d] * b
            self.m_w[k] = b1 * self.m_w[k] + (1 - b1) * u_w
            self.m_b[k] = b1 * self.m_b[k] + (1 - b1) * u_b
            w -= lr / (1 - b1 ** self.t) * self.m_w[k]
            b -= lr / (1 - b1 ** self.t) * self.m_b[k]

    def state_dict(self) -> Dict[str, Any]:
        """Step count, hyperparameters and copies of the moments."""
        return {"t": self.t, "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "m_w": [a.copy() for a in self.m_w], "m_b": [a.copy() for a in self.m_b],
                "v_row": [a.copy() for a in self.v_row], "v_col": [a.copy() for a in self.v_col]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        for key in ("m_w", "m_b", "v_row", "v_col"):
            mine = getattr(self, key)
            if len(state[key]) != len(mine) or any(np.shape(s) != a.shape for s, a in zip(state[key], mine)):
                raise ValueError(f"RelativeAdam state {key!r} does not fit this model ({len(mine)} layers, D={self.model.dim})")
            setattr(self, key, [np.array(s, dtype=float) for s in state[key]])
        self.t, self.lr, self.eps = int(state["t"]), float(state["lr"]), float(state["eps"])
        self.betas = (float(state["betas"][0]), float(state["betas"][1]))
