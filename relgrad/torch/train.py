"""Training loop and checkpoints for :class:`relgrad.torch.DenseFlow`.

The bookkeeping (minibatches, early stopping, divergence, history) is shared with the NumPy twin through
:mod:`relgrad.training`; this module owns what touches tensors: the optimiser, the exact validation
log-likelihood and ``torch.save`` checkpoints.
"""

from __future__ import annotations

import os
from typing import Dict, Iterable, Optional, Tuple, Union

import numpy as np
import torch

from ..errors import CheckpointError
from ..training import History, check_loss, minibatch_indices, run_epochs
from .flow import DenseFlow
from .gradients import _training_loss, check_method

__all__ = ["fit", "save_checkpoint", "load_checkpoint", "make_adam"]

PathLike = Union[str, "os.PathLike[str]"]
RngLike = Union[torch.Generator, np.random.Generator, int, None]

#: Version of the checkpoint dictionary layout written by :func:`save_checkpoint`.
CHECKPOINT_FORMAT = 1


# --------------------------------------------------------------------------------------------- helpers
def make_adam(params: Iterable[torch.nn.Parameter], lr: float = 1e-3) -> torch.optim.Adam:
    """``torch.optim.Adam`` with ``fused=True`` when this torch supports it for the parameters, else default.

    The fused kernel updates every parameter in one launch (CUDA) or one loop (CPU); torch rejects it at
    construction for unsupported devices/dtypes (or old versions), and then the default implementation is used.

    Shapes:
        params: parameters of any shapes (all on one device, one dtype).
    """
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.Adam(params, lr=lr)


def _numpy_rng(generator: RngLike) -> np.random.Generator:
    # minibatch_indices (shared with the NumPy twin) shuffles with a NumPy generator; derive one from the
    # torch generator so a torch seed alone fixes the whole run.
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        return np.random.default_rng(int(generator))
    if generator is None or isinstance(generator, torch.Generator):
        dev = "cpu" if generator is None else generator.device
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=dev))
        return np.random.default_rng(seed)
    raise TypeError(f"generator must be a torch.Generator, np.random.Generator, int or None, got {type(generator).__name__}")


def _snapshot(model: DenseFlow) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def mean_log_likelihood(model: DenseFlow, x: torch.Tensor, batch_size: int = 4096) -> float:
    """Exact mean log-likelihood (nats) of ``x``, in chunks so a large validation set fits in memory.

    Shapes:
        x: (N, D); returns a float.
    """
    logdet = model.logdet_weights().sum()  # once, not once per chunk
    total = 0.0
    for start in range(0, x.shape[0], batch_size):
        tr = model._trace(x[start : start + batch_size])
        total += float(model._terms_from_trace(tr, logdet).total().sum())
    return total / x.shape[0]


def _epoch(model: DenseFlow, opt: torch.optim.Optimizer, x: torch.Tensor, method: str, batch_size: int,
           rng: np.random.Generator, epoch: int, step: int) -> Tuple[float, int]:
    """One pass over the shuffled training set; returns (sample-weighted mean loss, global step count)."""
    total = 0.0
    for idx in minibatch_indices(x.shape[0], batch_size, rng):
        opt.zero_grad(set_to_none=True)
        loss = _training_loss(model, x[torch.as_tensor(idx, device=x.device)], method)
        value = float(loss.detach())
        step += 1
        check_loss(value, epoch=epoch, step=step)  # before stepping on a NaN gradient
        loss.backward()
        opt.step()
        total += value * len(idx)
    return total / x.shape[0], step


# --------------------------------------------------------------------------------------------- fit
def fit(
    model: DenseFlow,
    x_train: torch.Tensor,
    x_val: torch.Tensor,
    *,
    method: str = "relative",
    epochs: int = 100,
    batch_size: int = 100,
    lr: float = 1e-3,
    patience: Optional[int] = 10,
    generator: RngLike = None,
    progress: Optional[bool] = None,
    checkpoint_path: Optional[PathLike] = None,
    log_every: int = 0,
) -> History:
    """Maximum-likelihood training with Adam and the chosen gradient, early stopping on the exact val LL.

    Each epoch shuffles the training set into minibatches, takes one Adam step per minibatch on
    :func:`relgrad.torch.training_loss` (divergence -> TrainingDivergedError), then evaluates the exact mean
    validation log-likelihood.  The best parameters are kept (and saved to ``checkpoint_path`` if given)
    and restored into ``model`` at the end; ``patience=None`` never stops early.  ``progress``: True/False
    shows/hides the bar, None honours ``TQDM_DISABLE``.  ``log_every > 0`` prints a line every that many
    epochs.  Epochs are numbered from 0.  ``generator`` (torch or NumPy generator, or int seed; None uses
    torch's global generator) drives the shuffling.

    Shapes:
        x_train: (N, D), x_val: (N_val, D); returns a relgrad.training.History.
    """
    check_method(method)
    x_train = model._batch(x_train, "x_train")  # validated once: the per-step loss skips the checks
    x_val = model._batch(x_val, "x_val")
    rng, opt = _numpy_rng(generator), make_adam(model.parameters(), lr=lr)
    return run_epochs(
        method=method,
        epochs=epochs,
        patience=patience,
        train_epoch=lambda epoch, step: _epoch(model, opt, x_train, method, batch_size, rng, epoch, step),
        evaluate=lambda: mean_log_likelihood(model, x_val),
        snapshot=lambda: _snapshot(model),
        restore=model.load_state_dict,
        on_best=None if checkpoint_path is None else lambda: save_checkpoint(model, checkpoint_path),
        progress=progress,
        log_every=log_every,
    )



# --------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(model: DenseFlow, path: PathLike) -> None:
    """Save parameters and the metadata needed to rebuild the model (``torch.save`` of plain tensors/dicts).

    Shapes:
        writes L weights (D, D) and L biases (D,), stored on the CPU.
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(
        {
            "format": "relgrad.torch.DenseFlow",
            "version": CHECKPOINT_FORMAT,
            "dim": model.dim,
            "n_layers": model.n_layers,
            "alpha": model.alpha,
            "dtype": str(model.dtype).replace("torch.", ""),
            "state_dict": state,
        },
        path,
    )


def _read_checkpoint(path: PathLike) -> dict:
    try:
        # weights_only=True: never unpickle arbitrary objects from a file.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch raises several unpickling error types for a malformed file
        raise CheckpointError(f"{path} is not a readable relgrad checkpoint: {err}") from err
    keys = {"format", "version", "dim", "n_layers", "alpha", "dtype", "state_dict"}
    if not isinstance(ckpt, dict) or not keys <= set(ckpt) or ckpt["format"] != "relgrad.torch.DenseFlow":
        raise CheckpointError(f"{path} is not a relgrad.torch DenseFlow checkpoint")
    if ckpt["version"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {ckpt['version']}, expected {CHECKPOINT_FORMAT}")
    return ckpt


def _check_match(model: DenseFlow, ckpt: dict, path: PathLike) -> None:
    for name in ("dim", "n_layers", "alpha"):
        have, want = getattr(model, name), ckpt[name]
        if have != want:
            raise CheckpointError(f"checkpoint {path} has {name}={want!r} but the model has {name}={have!r}")


def load_checkpoint(model: Optional[DenseFlow], path: PathLike) -> DenseFlow:
    """Load a checkpoint into ``model`` (keeping its dtype and device), or build a new model if None.

    A new model gets the checkpoint's dimension, layers, alpha and dtype, on the default device
    (``"auto"``: CUDA when available).  A model of another shape or alpha raises CheckpointError naming
    the mismatch.

    Shapes:
        reads L weights (D, D) and L biases (D,).
    """
    ckpt = _read_checkpoint(path)
    if model is None:
        dtype = getattr(torch, str(ckpt["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"checkpoint {path} has an unknown dtype {ckpt['dtype']!r}")
        model = DenseFlow(int(ckpt["dim"]), int(ckpt["n_layers"]), alpha=float(ckpt["alpha"]), dtype=dtype)
    _check_match(model, ckpt, path)
    try:
        model.load_state_dict(ckpt["state_dict"])  # copies into the existing parameters: dtype/device kept
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path} does not fit the model: {err}") from err
    return model
