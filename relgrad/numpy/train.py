"""Adam, the training loop and checkpoints of the NumPy twin.

Bookkeeping shared with the torch twin (minibatches, early stopping, divergence check, history) lives in
:mod:`relgrad.training`; this module owns what touches arrays.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import CheckpointError
from ..training import History, check_loss, minibatch_indices, run_epochs
from ..utils import as_generator, check_batch, check_finite
from .flow import DenseFlow
from .gradients import check_method, loss_and_gradients

__all__ = ["Adam", "fit", "save_checkpoint", "load_checkpoint"]

PathLike = Union[str, "os.PathLike[str]"]

#: Version of the .npz checkpoint layout; bump it when the stored keys change.
CHECKPOINT_FORMAT = 1
_CHECKPOINT_KEYS = ("format_version", "dim", "n_layers", "alpha", "weights", "biases")


class Adam:
    """Adam (Kingma & Ba, 2015), updating the given arrays in place; same arithmetic as ``torch.optim.Adam``.

    m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2;   p <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    Shapes:
        params: arrays of any shapes; ``step(grads)`` takes gradients of the same shapes, in the same order.
    """

    def __init__(
        self,
        params: Sequence[np.ndarray],
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {betas!r}")
        self.params = list(params)
        self.lr, self.betas, self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.m = [np.zeros_like(p) for p in self.params]
        self.v = [np.zeros_like(p) for p in self.params]
        self._scratch = [np.empty_like(p) for p in self.params]  # one buffer per parameter: no temporaries
        self.t = 0

    def step(self, grads: Sequence[np.ndarray]) -> None:
        """One Adam update of every parameter (in place).

        Shapes:
            grads: one array per parameter, each the shape of its parameter.
        """
        if len(grads) != len(self.params):
            raise ValueError(f"expected {len(self.params)} gradients, got {len(grads)}")
        self.t += 1
        b1, b2 = self.betas
        step_size = self.lr / (1.0 - b1**self.t)  # bias corrections of m and v, folded into scalars
        v_scale = 1.0 / np.sqrt(1.0 - b2**self.t)
        for p, g, m, v, tmp in zip(self.params, grads, self.m, self.v, self._scratch):
            if g.shape != p.shape:
                raise ValueError(f"gradient of shape {g.shape} for a parameter of shape {p.shape}")
            # In place through one scratch buffer: each line is one pass over the parameter (no allocations).
            m *= b1
            np.multiply(g, 1.0 - b1, out=tmp)
            m += tmp
            v *= b2
            np.multiply(g, g, out=tmp)
            tmp *= 1.0 - b2
            v += tmp
            np.sqrt(v, out=tmp)
            tmp *= v_scale
            tmp += self.eps
            np.divide(m, tmp, out=tmp)
            tmp *= step_size
            p -= tmp


# ------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(model: DenseFlow, path: PathLike) -> Path:
    """Write the model's parameters and shape metadata to an ``.npz`` file at exactly ``path``.

    Shapes:
        stored ``weights`` ``(L, D, D)``, ``biases`` ``(L, D)``; scalars ``dim``, ``n_layers``, ``alpha``.
    """
    path = Path(path)
    with open(path, "wb") as fh:  # a file handle: np.savez would otherwise append ".npz" to the name
        np.savez(
            fh,
            format_version=CHECKPOINT_FORMAT,
            dim=model.dim,
            n_layers=model.n_layers,
            alpha=model.alpha,
            weights=np.stack(model.weights),
            biases=np.stack(model.biases),
        )
    return path


def _read_checkpoint(path: PathLike) -> dict:
    """Load and validate the arrays of a checkpoint file; :class:`CheckpointError` if it is not one of ours."""
    try:
        with np.load(path, allow_pickle=False) as data:
            stored = {key: data[key] for key in data.files}
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise CheckpointError(f"{path} is not a relgrad NumPy checkpoint (.npz): {err}") from err
    missing = [key for key in _CHECKPOINT_KEYS if key not in stored]
    if missing:
        raise CheckpointError(f"{path} is not a relgrad NumPy checkpoint: missing {missing}")
    if int(stored["format_version"]) != CHECKPOINT_FORMAT:
        version = int(stored["format_version"])
        raise CheckpointError(f"{path} has checkpoint format {version}, expected {CHECKPOINT_FORMAT}")
    dim, n_layers = int(stored["dim"]), int(stored["n_layers"])
    if stored["weights"].shape != (n_layers, dim, dim) or stored["biases"].shape != (n_layers, dim):
        raise CheckpointError(f"{path} is corrupt: parameter shapes do not match dim={dim}, n_layers={n_layers}")
    return stored


def load_checkpoint(model: Optional[DenseFlow], path: PathLike) -> DenseFlow:
    """Load a checkpoint into ``model`` (in place, so optimisers keep valid references) or into a new model.

    With ``model=None`` a fresh :class:`DenseFlow` (float64) is built from the stored metadata.  A model of
    another dimension, depth or alpha raises :class:`CheckpointError` naming the mismatch.

    Shapes:
        returns the model, with L weights ``(D, D)`` and L biases ``(D,)`` from the file.
    """
    stored = _read_checkpoint(path)
    meta = {"dim": int(stored["dim"]), "n_layers": int(stored["n_layers"]), "alpha": float(stored["alpha"])}
    if model is None:
        model = DenseFlow(meta["dim"], meta["n_layers"], alpha=meta["alpha"])
    mismatches = [
        f"{key}: checkpoint {value!r}, model {getattr(model, key)!r}"
        for key, value in meta.items()
        if getattr(model, key) != value
    ]
    if mismatches:
        raise CheckpointError(f"checkpoint {path} does not fit the model ({'; '.join(mismatches)})")
    for k in range(model.n_layers):
        model.weights[k][...] = stored["weights"][k]
        model.biases[k][...] = stored["biases"][k]
    return model


# ------------------------------------------------------------------------------------------- training
def _validated(x: np.ndarray, dim: int, name: str) -> np.ndarray:
    """Check a whole data set once, up front, so that errors name it (``x_train``/``x_val``) and not a minibatch."""
    x = np.asarray(x)
    check_batch(x.shape, dim, name)
    check_finite(bool(np.isfinite(x).all()), name)
    return x


def _copy_params(model: DenseFlow) -> List[np.ndarray]:
    return [p.copy() for p in model.parameters()]


def _restore_params(model: DenseFlow, saved: List[np.ndarray]) -> None:
    for p, q in zip(model.parameters(), saved):
        p[...] = q  # in place: the optimiser and the caller keep references to these arrays


def _train_epoch(
    model: DenseFlow,
    x: np.ndarray,
    opt: Adam,
    method: str,
    batch_size: int,
    rng: np.random.Generator,
    epoch: int,
    step: int,
) -> Tuple[float, int]:
    """One pass over shuffled minibatches; returns (sample-weighted mean surrogate loss, global step count)."""
    total = 0.0
    for idx in minibatch_indices(x.shape[0], batch_size, rng):
        loss, grads = loss_and_gradients(model, x[idx], method)
        step += 1
        check_loss(loss, epoch=epoch, step=step)
        opt.step([dw for dw, _ in grads] + [db for _, db in grads])  # the order of model.parameters()
        total += loss * len(idx)
    return total / x.shape[0], step


def fit(
    model: DenseFlow,
    x_train: np.ndarray,
    x_val: np.ndarray,
    *,
    method: str = "relative",
    epochs: int = 100,
    batch_size: int = 100,
    lr: float = 1e-3,
    patience: Optional[int] = 10,
    rng: "np.random.Generator | int | None" = None,
    progress: Optional[bool] = None,
    checkpoint_path: Optional[PathLike] = None,
    log_every: int = 0,
) -> History:
    """Train ``model`` in place with Adam and early stopping on the exact validation log-likelihood.

    Each epoch shuffles the training set (``rng``), takes one Adam step per minibatch with the chosen gradient
    (``"relative"``, ``"authors"`` or ``"ordinary"``) and then evaluates the mean validation log-likelihood.
    The parameters of the best epoch are kept and restored at the end (and written to ``checkpoint_path`` each
    time a new best is found).  Training stops after ``patience`` epochs without improvement (``None``: never).
    A non-finite or exploding loss, or a non-finite validation log-likelihood, raises
    :class:`~relgrad.errors.TrainingDivergedError`.  ``progress=None`` shows a bar unless ``TQDM_DISABLE`` is set;
    ``log_every=n > 0`` prints one summary line every n epochs.  Epochs are numbered from 0 in the history.

    Shapes:
        x_train: ``(N, D)``; x_val: ``(N_val, D)``; returns a :class:`~relgrad.training.History` whose lists
        have one entry per epoch run.
    """
    check_method(method)
    x_train = _validated(x_train, model.dim, "x_train")
    x_val = _validated(x_val, model.dim, "x_val")
    gen, opt = as_generator(rng), Adam(model.parameters(), lr=lr)
    # Overflow inside a diverging run is reported by check_loss / validation_score with a clear message;
    # NumPy's own overflow warnings would only precede that error with noise.
    with np.errstate(over="ignore", invalid="ignore"):
        return run_epochs(
            method=method,
            epochs=epochs,
            patience=patience,
            train_epoch=lambda epoch, step: _train_epoch(model, x_train, opt, method, batch_size, gen, epoch, step),
            evaluate=lambda: float(np.mean(model.log_likelihood(x_val))),
            snapshot=lambda: _copy_params(model),
            restore=lambda saved: _restore_params(model, saved),
            on_best=None if checkpoint_path is None else lambda: save_checkpoint(model, checkpoint_path),
            progress=progress,
            log_every=log_every,
        )

