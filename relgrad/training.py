"""Backend-free pieces of the training loops of both twins: minibatches, early stopping, divergence, history.

Each twin's ``fit`` (``relgrad.numpy.fit`` and ``relgrad.torch.fit``) owns the parts that touch arrays or
tensors (gradients, optimiser, checkpoints); everything that is plain bookkeeping lives here, once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, List, Optional, Tuple

import numpy as np

from .errors import SingularWeightError, TrainingDivergedError
from .utils import progress as progress_bar

__all__ = [
    "History", "EarlyStopping", "minibatch_indices", "check_loss", "validation_score", "run_epochs", "METHODS",
]

#: Gradient methods every twin understands.  ``"autodiff"`` (autograd through slogdet) is torch-only.
METHODS = ("relative", "authors", "ordinary", "autodiff")


@dataclass
class History:
    """What ``fit`` returns: per-epoch curves plus the epoch whose parameters were kept.

    ``train_loss`` is the mean training surrogate loss of each epoch (for the relative and authors' methods
    it omits the parameter-only term ``-sum_k log|det W_k|``, which is never computed during training);
    ``val_log_likelihood`` is the exact mean validation log-likelihood in nats (one slogdet per layer).
    """

    method: str
    train_loss: List[float] = field(default_factory=list)
    val_log_likelihood: List[float] = field(default_factory=list)
    best_epoch: int = -1
    best_val_log_likelihood: float = -math.inf
    stopped_early: bool = False
    seconds: float = 0.0
    steps: int = 0

    def summary(self) -> str:
        """One stable line for a chapter to print."""
        return (
            f"{self.method}: {len(self.val_log_likelihood)} epochs, best epoch {self.best_epoch}, "
            f"best val log-lik {self.best_val_log_likelihood:.4f} nats"
            + (" (early stop)" if self.stopped_early else "")
        )


class EarlyStopping:
    """Keep track of the best validation score and say when ``patience`` epochs passed without improvement.

    ``update(score)`` returns True when the score is a new best (the caller then copies its parameters).
    ``min_delta`` is the smallest increase that counts as an improvement.
    """

    def __init__(self, patience: Optional[int] = 10, min_delta: float = 0.0) -> None:
        if patience is not None and patience < 1:
            raise ValueError(f"patience must be a positive int or None, got {patience!r}")
        self.patience = patience
        self.min_delta = float(min_delta)
        self.best = -math.inf
        self.best_epoch = -1
        self.bad_epochs = 0

    def update(self, score: float, epoch: int) -> bool:
        if score > self.best + self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = float(score), epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience


def minibatch_indices(n: int, batch_size: int, rng: np.random.Generator, *, drop_last: bool = False) -> Iterator[np.ndarray]:
    """Yield index arrays of a random permutation of ``range(n)`` in chunks of ``batch_size``.

    Shapes: each yielded array is ``(batch_size,)`` (the last one may be shorter unless ``drop_last``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = rng.permutation(n)
    stop = n - (n % batch_size) if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]


def check_loss(value: float, *, epoch: int, step: int, limit: float = 1e8) -> None:
    """Stop training with :class:`TrainingDivergedError` when a loss is NaN, infinite or beyond ``limit``.

    A flow whose loss explodes usually has a weight matrix drifting towards singularity or a learning rate
    that is too large; the message says so, so the user knows what to change.
    """
    if not math.isfinite(value) or abs(value) > limit:
        raise TrainingDivergedError(
            f"training diverged at epoch {epoch}, step {step}: loss = {value!r}. "
            "Lower the learning rate, or check the data scaling (standardise the inputs)."
        )


def validation_score(evaluate: Callable[[], float], *, epoch: int) -> float:
    """Run ``evaluate()`` (the exact mean validation log-likelihood) and turn failure into divergence.

    A weight matrix that became singular (:class:`~relgrad.errors.SingularWeightError`) or a non-finite
    score both mean training went off the rails; either raises :class:`TrainingDivergedError`.
    """
    hint = "Lower the learning rate, or check the data scaling (standardise the inputs)."
    try:
        score = float(evaluate())
    except SingularWeightError as err:
        raise TrainingDivergedError(f"training diverged at epoch {epoch}: {err}. {hint}") from err
    if not math.isfinite(score):
        raise TrainingDivergedError(f"training diverged at epoch {epoch}: validation log-likelihood is {score!r}. {hint}")
    return score


def run_epochs(
    *,
    method: str,
    epochs: int,
    patience: Optional[int],
    train_epoch: Callable[[int, int], Tuple[float, int]],
    evaluate: Callable[[], float],
    snapshot: Callable[[], Any],
    restore: Callable[[Any], None],
    on_best: Optional[Callable[[], None]] = None,
    progress: Optional[bool] = None,
    log_every: int = 0,
) -> History:
    """The epoch loop both twins' ``fit`` share; the twin supplies what touches arrays or tensors.

    ``train_epoch(epoch, step)`` runs one shuffled pass and returns (mean training loss, global step count);
    ``evaluate()`` returns the exact mean validation log-likelihood; ``snapshot()``/``restore(state)`` copy
    the parameters out and back; ``on_best()`` runs at each new best epoch (e.g. to write a checkpoint).
    The best epoch's parameters are restored at the end.  Epochs are numbered from 0.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    stopper, history = EarlyStopping(patience), History(method=method)
    best, start = snapshot(), time.perf_counter()
    bar = progress_bar(range(epochs), disable=None if progress is None else not progress, desc=f"fit ({method})")
    for epoch in bar:
        loss, history.steps = train_epoch(epoch, history.steps)
        score = validation_score(evaluate, epoch=epoch)
        history.train_loss.append(loss)
        history.val_log_likelihood.append(score)
        if stopper.update(score, epoch):
            best = snapshot()
            if on_best is not None:
                on_best()
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss:.4f}", val_ll=f"{score:.4f}")
        if log_every > 0 and (epoch % log_every == 0 or epoch == epochs - 1):
            print(f"epoch {epoch:4d}  train loss {loss:.4f}  val log-lik {score:.4f}")
        if stopper.should_stop:
            history.stopped_early = True
            break
    restore(best)
    history.best_epoch, history.best_val_log_likelihood = stopper.best_epoch, stopper.best
    history.seconds = time.perf_counter() - start
    return history
