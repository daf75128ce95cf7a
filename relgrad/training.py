"""Backend-free pieces of the training loops of both twins: the epoch loop, early stopping, divergence, history.

There is one epoch loop, :func:`run_epochs`.  Each twin's ``fit`` (``relgrad.numpy.fit`` and
``relgrad.torch.fit``) supplies what touches arrays or tensors (one epoch of optimiser steps, the exact
validation log-likelihood, parameter snapshots, the training checkpoint); ``python -m relgrad.experiments``
runs on ``relgrad.torch.fit`` with callbacks.  The loop adds what long runs need: a per-epoch callback, a
wall-clock budget that may stop mid-epoch, an evaluation of the untrained model, and resuming from a saved
:class:`LoopState` (written atomically with :func:`atomic_write`).
"""

from __future__ import annotations

import copy
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import CheckpointError, SingularWeightError, TrainingDivergedError
from .utils import progress as progress_bar

__all__ = [
    "History", "EpochRecord", "EpochResult", "LoopState", "EarlyStopping", "minibatch_indices", "check_loss",
    "check_step", "validation_score", "run_epochs", "atomic_write", "METHODS", "LOSS_LIMIT", "GRAD_NORM_LIMIT",
    "STOP_REASONS", "check_resume_settings",
]

#: Gradient methods every twin understands.  ``"autodiff"`` (autograd through slogdet) is torch-only.
METHODS = ("relative", "authors", "mixed", "ordinary", "autodiff")

#: A training loss beyond this (in absolute value) is divergence.
LOSS_LIMIT = 1e8
#: A gradient whose norm exceeds this (or is NaN/inf) is divergence.  2**50 (about 1.1e15) is exactly
#: representable in float32 and float64, so a device-side and a host-side comparison agree bit for bit; and
#: with every gradient entry below it, Adam's second moment stays below 2**100, far from float32 overflow,
#: so an accepted step cannot produce inf/NaN in the optimiser state.
GRAD_NORM_LIMIT = 2.0**50

#: Why :func:`run_epochs` stopped (``History.stopped_by``).
STOP_REASONS = ("epochs", "patience", "time_cap", "diverged")

_HINT = "Lower the learning rate, or check the data scaling (standardise the inputs)."


@dataclass
class EpochRecord:
    """One evaluated epoch: what :func:`run_epochs` passes to ``on_epoch_end`` and keeps in ``History.records``.

    ``seconds`` is the training time since the start of the run (across resumes); ``train_loss`` is NaN for
    the evaluation of the untrained model (``initial``); ``partial`` marks an epoch cut short by the time
    budget; ``best`` marks a new best validation log-likelihood.
    """

    epoch: int
    steps: int
    seconds: float
    train_loss: float
    val_log_likelihood: float
    best: bool
    partial: bool = False
    initial: bool = False


@dataclass
class History:
    """What ``fit`` returns: per-epoch curves plus the epoch whose parameters were kept.

    ``train_loss`` is the mean training surrogate loss of each epoch (for the relative and authors' methods
    it omits the parameter-only term ``-sum_k log|det W_k|``, which is never computed during training);
    ``val_log_likelihood`` is the exact mean validation log-likelihood in nats (one slogdet per layer).
    ``records`` holds one :class:`EpochRecord` per entry of those lists (with steps, seconds and flags).
    ``stopped_by`` is one of :data:`STOP_REASONS`; ``error`` is the divergence message when it is
    ``"diverged"``.  ``seconds`` is the training time, summed over resumed runs.
    """

    method: str
    train_loss: List[float] = field(default_factory=list)
    val_log_likelihood: List[float] = field(default_factory=list)
    best_epoch: int = -1
    best_val_log_likelihood: float = -math.inf
    stopped_early: bool = False
    seconds: float = 0.0
    steps: int = 0
    records: List[EpochRecord] = field(default_factory=list)
    stopped_by: str = ""
    error: Optional[str] = None
    resumed_at_epoch: Optional[int] = None

    def summary(self) -> str:
        """One stable line for a chapter to print."""
        return (
            f"{self.method}: {len(self.val_log_likelihood)} epochs, best epoch {self.best_epoch}, "
            f"best val log-lik {self.best_val_log_likelihood:.4f} nats"
            + (" (early stop)" if self.stopped_early else "")
        )

    def to_dict(self) -> Dict[str, Any]:
        """Plain Python types only (floats, ints, str, lists, dicts), for a checkpoint or JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "History":
        data = dict(data)
        data["records"] = [EpochRecord(**r) for r in data.get("records", [])]
        return cls(**data)


class EpochResult(NamedTuple):
    """What a twin's ``train_epoch`` returns: the sample-weighted mean loss of the steps it ran, the global step
    count after them, and False when the time budget cut the epoch short (then the twin keeps its position in
    the epoch, so a resumed run finishes the same epoch)."""

    loss: float
    steps: int
    complete: bool = True


@dataclass
class LoopState:
    """The loop's part of a training checkpoint: everything :func:`run_epochs` needs to continue a run.

    ``best`` is whatever the twin's ``snapshot()`` returned for the best epoch so far.  ``next_epoch`` is the
    epoch to run next (for a checkpoint written at a time cut: the cut epoch, which the twin then finishes).
    """

    next_epoch: int
    history: History
    stopper: Dict[str, Any]
    best: Any
    evaluate_initial: bool

    def to_dict(self, best: Any = None) -> Dict[str, Any]:
        """Plain types (``best`` replaced by the given serialisable form, e.g. CPU tensors or None)."""
        return {"next_epoch": self.next_epoch, "history": self.history.to_dict(), "stopper": dict(self.stopper),
                "best": best, "evaluate_initial": self.evaluate_initial}

    @classmethod
    def from_dict(cls, data: Dict[str, Any], best: Any) -> "LoopState":
        return cls(next_epoch=int(data["next_epoch"]), history=History.from_dict(data["history"]),
                   stopper=dict(data["stopper"]), best=best, evaluate_initial=bool(data["evaluate_initial"]))


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

    def state_dict(self) -> Dict[str, Any]:
        """The counters (not ``patience``: a resumed run may change it)."""
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best, self.best_epoch = float(state["best"]), int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])


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


def check_loss(value: float, *, epoch: int, step: int, limit: float = LOSS_LIMIT) -> None:
    """Stop training with :class:`~relgrad.errors.TrainingDivergedError` when a loss is NaN, infinite or beyond ``limit``.

    A flow whose loss explodes usually has a weight matrix drifting towards singularity or a learning rate
    that is too large; the message says so, so the user knows what to change.
    """
    if not math.isfinite(value) or abs(value) > limit:
        raise TrainingDivergedError(f"training diverged at epoch {epoch}, step {step}: loss = {value!r}. {_HINT}")


def check_step(
    loss: float,
    grad_norms: Sequence[float] = (),
    *,
    epoch: int,
    step: int,
    names: Optional[Sequence[str]] = None,
    limit: float = LOSS_LIMIT,
    grad_limit: float = GRAD_NORM_LIMIT,
) -> None:
    """:func:`check_loss`, then the same for each parameter's gradient norm (NaN, inf or beyond ``grad_limit``).

    A finite loss can still come with a non-finite gradient (the ordinary gradient's ``W^{-T}`` of a nearly
    singular ``W``); an optimiser step on it would write NaN into the parameters.

    Shapes:
        grad_norms: one float per parameter; names: the parameters' names, in the same order.
    """
    check_loss(loss, epoch=epoch, step=step, limit=limit)
    for k, g in enumerate(grad_norms):
        if not g <= grad_limit:  # written so that NaN fails it too
            name = names[k] if names is not None else f"#{k}"
            raise TrainingDivergedError(
                f"training diverged at epoch {epoch}, step {step}: loss = {loss!r} but the gradient of "
                f"parameter {name} has norm {float(g)!r} (limit {grad_limit:.3g}). {_HINT}"
            )


def _linalg_errors() -> Tuple[type, ...]:
    # torch is optional and heavy: only look for its LinAlgError when something already imported torch.
    errors: List[type] = [SingularWeightError, np.linalg.LinAlgError]
    torch = sys.modules.get("torch")
    linalg = getattr(torch, "linalg", None) if torch is not None else None
    if linalg is not None and isinstance(getattr(linalg, "LinAlgError", None), type):
        errors.append(linalg.LinAlgError)
    return tuple(errors)


def validation_score(evaluate: Callable[[], float], *, epoch: int) -> float:
    """Run ``evaluate()`` (the exact mean validation log-likelihood) and turn failure into divergence.

    A weight matrix that became singular (:class:`~relgrad.errors.SingularWeightError`), a failed
    factorisation (``torch.linalg.LinAlgError`` / ``numpy.linalg.LinAlgError``, e.g. an ill-conditioned ``W``
    on CUDA) or a non-finite score all mean training went off the rails; each raises
    :class:`~relgrad.errors.TrainingDivergedError`.
    """
    try:
        score = float(evaluate())
    except _linalg_errors() as err:
        raise TrainingDivergedError(f"training diverged at epoch {epoch}: {err}. {_HINT}") from err
    if not math.isfinite(score):
        raise TrainingDivergedError(f"training diverged at epoch {epoch}: validation log-likelihood is {score!r}. {_HINT}")
    return score


def atomic_write(path: Union[str, "os.PathLike[str]"], write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file so that ``path`` always holds either its previous content or the complete new one.

    ``write(handle)`` writes into a temporary file in the same folder (same file system, so the rename is
    atomic); the file is flushed and fsynced, then ``os.replace`` puts it at ``path``.  If ``write`` raises,
    or the process dies, ``path`` is untouched and the temporary file is removed (or, after a kill, left as
    a hidden ``.NAME.*.tmp`` file that nothing reads).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable (POSIX); not possible everywhere (Windows), and not essential
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def run_epochs(
    *,
    method: str,
    epochs: int,
    patience: Optional[int],
    train_epoch: Callable[[int, int, Callable[[], bool]], Union[EpochResult, Tuple[float, int]]],
    evaluate: Callable[[], float],
    snapshot: Callable[[], Any],
    restore: Callable[[Any], None],
    on_best: Optional[Callable[[], None]] = None,
    on_epoch_end: Optional[Callable[[EpochRecord, History], None]] = None,
    save_state: Optional[Callable[[LoopState, Any], None]] = None,
    resume: Optional[LoopState] = None,
    max_seconds: Optional[float] = None,
    evaluate_initial: bool = False,
    on_divergence: str = "raise",
    progress: Optional[bool] = None,
    log_every: int = 0,
    agree: Optional[Callable[[bool], bool]] = None,
) -> History:
    """The epoch loop of both twins' ``fit`` (and so of ``python -m relgrad.experiments``).

    The twin supplies what touches arrays or tensors:

    * ``train_epoch(epoch, step, out_of_time)`` runs one shuffled pass of optimiser steps, starting at global
      step count ``step``, and returns an :class:`EpochResult`.  It calls ``out_of_time()`` (a cheap host-side
      clock check) between steps and, when it returns True, stops early with ``complete=False``; it keeps its
      position, so that a run resumed from the checkpoint written then finishes that same epoch.
    * ``evaluate()`` returns the exact mean validation log-likelihood (failures become divergence, see
      :func:`validation_score`); ``snapshot()``/``restore(state)`` copy the parameters out and back.
    * ``save_state(loop_state, best)`` writes a training checkpoint: the twin adds its parameters, optimiser
      and RNG state to the :class:`LoopState`; ``best`` is the best snapshot so far (which differs from
      ``loop_state.best`` only at a time cut, where the loop state is the one from before the cut epoch's
      evaluation).  It is called after the initial evaluation, after every epoch, and at a time cut.

    Options:

    * ``on_epoch_end(record, history)`` after every evaluated epoch (the history's records end with it);
      ``on_best()`` at each new best.
    * ``max_seconds``: wall-clock budget of this call; at least one step always runs.  When it runs out
      inside an epoch, that partial epoch is still evaluated (``record.partial``); when it runs out at the
      end of an epoch, training stops there.  ``History.stopped_by`` is then ``"time_cap"``.
    * ``evaluate_initial``: evaluate the untrained model first, as epoch 0 (``train_loss`` NaN); training
      epochs are then numbered 1..epochs, otherwise 0..epochs-1.  ``epochs`` counts training epochs.
    * ``resume``: a :class:`LoopState` from a checkpoint (the twin has already restored its own state);
      the run continues at ``resume.next_epoch`` up to the same last epoch an uninterrupted run would reach.
    * ``on_divergence``: ``"raise"`` re-raises :class:`~relgrad.errors.TrainingDivergedError` (after restoring the best
      parameters); ``"stop"`` records it (``stopped_by="diverged"``, ``error``) and returns the history.
    * ``agree(flag) -> bool``: with several processes, turns this process's "out of time" at the end of an
      epoch into the group's decision (any process out of time), so all stop at the same epoch.

    The best epoch's parameters are restored at the end, whatever stopped the run.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be positive or None, got {max_seconds!r}")
    if on_divergence not in ("raise", "stop"):
        raise ValueError(f"on_divergence must be 'raise' or 'stop', got {on_divergence!r}")
    start = time.perf_counter()
    stopper = EarlyStopping(patience)
    if resume is not None:
        history, best = copy.deepcopy(resume.history), resume.best
        stopper.load_state_dict(resume.stopper)
        evaluate_initial, next_epoch = resume.evaluate_initial, resume.next_epoch
        history.resumed_at_epoch = next_epoch
    else:
        history, best = History(method=method), snapshot()
        next_epoch = 1 if evaluate_initial else 0
    first = 1 if evaluate_initial else 0
    last = first + epochs - 1
    seconds_before = history.seconds  # a resumed run keeps counting from where the checkpoint was written

    def elapsed() -> float:
        return seconds_before + time.perf_counter() - start

    def out_of_time() -> bool:
        return max_seconds is not None and time.perf_counter() - start > max_seconds

    def state(next_ep: int) -> LoopState:
        return LoopState(next_epoch=next_ep, history=copy.deepcopy(history), stopper=stopper.state_dict(),
                         best=best, evaluate_initial=evaluate_initial)

    def record(epoch: int, steps: int, loss: float, *, partial: bool = False, initial: bool = False) -> None:
        nonlocal best
        score = validation_score(evaluate, epoch=epoch)
        is_best = stopper.update(score, epoch)
        if is_best:
            best = snapshot()
            if on_best is not None:
                on_best()
        rec = EpochRecord(epoch=epoch, steps=steps, seconds=elapsed(), train_loss=float(loss),
                          val_log_likelihood=score, best=is_best, partial=partial, initial=initial)
        history.records.append(rec)
        history.train_loss.append(rec.train_loss)
        history.val_log_likelihood.append(score)
        history.steps, history.seconds = steps, rec.seconds
        history.best_epoch, history.best_val_log_likelihood = stopper.best_epoch, stopper.best
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss:.4f}", val_ll=f"{score:.4f}")
        if log_every > 0 and (epoch % log_every == 0 or epoch == last):
            print(f"epoch {epoch:4d}  train loss {loss:.4f}  val log-lik {score:.4f}")
        if on_epoch_end is not None:
            on_epoch_end(rec, history)

    def save(loop_state: LoopState) -> None:
        if save_state is not None:
            save_state(loop_state, best)

    bar = progress_bar(range(next_epoch, last + 1), disable=None if progress is None else not progress,
                       desc=f"fit ({method})")
    stopped_by = "epochs"
    try:
        if resume is None and evaluate_initial:
            record(0, 0, math.nan, initial=True)
            save(state(1))
        if stopper.should_stop:  # only after resuming a run that had already stopped by patience
            stopped_by = "patience"
        else:
            for epoch in bar:
                result = EpochResult(*train_epoch(epoch, history.steps, out_of_time))
                if not result.complete:
                    # The checkpoint of a cut keeps the loop as it was before this partial evaluation, so that
                    # a resumed run finishes the epoch and evaluates it once, as an uninterrupted run would.
                    history.steps, history.seconds = result.steps, elapsed()
                    before = state(epoch)
                    record(epoch, result.steps, result.loss, partial=True)
                    save(before)
                    stopped_by = "time_cap"
                    break
                record(epoch, result.steps, result.loss)
                save(state(epoch + 1))
                if stopper.should_stop:
                    stopped_by = "patience"
                    break
                if epoch < last and (out_of_time() if agree is None else agree(out_of_time())):
                    stopped_by = "time_cap"
                    break
    except TrainingDivergedError as err:
        restore(best)
        history.stopped_by, history.error = "diverged", str(err)
        history.seconds = elapsed()
        if on_divergence == "raise":
            raise
        return history
    finally:
        if hasattr(bar, "close"):
            bar.close()
    restore(best)
    history.stopped_by, history.stopped_early = stopped_by, stopped_by == "patience"
    history.best_epoch, history.best_val_log_likelihood = stopper.best_epoch, stopper.best
    history.seconds = elapsed()
    return history


def check_resume_settings(saved: Dict[str, Any], now: Dict[str, Any], path: Any, *, data_rtol: float,
                          data_atol: float) -> None:
    """Refuse to resume a training checkpoint written by a run with other settings or other data.

    ``now`` maps setting names to this run's values; ``"data"`` is a fingerprint of ``x_train`` (sum, sum of
    squares) compared within ``data_rtol``/``data_atol`` (the twins' dtypes round it differently); every
    other key must be equal.  Raises :class:`~relgrad.errors.CheckpointError` naming the file and the setting.
    """
    for key, value in now.items():
        if key == "data":
            old = saved.get("data")
            if old is None or not np.allclose(old, value, rtol=data_rtol, atol=data_atol):
                raise CheckpointError(
                    f"checkpoint {path} was written for other training data (sum, sum of squares {old} vs {value}); "
                    "resume with the same x_train, or start a new run"
                )
        elif saved.get(key) != value:
            raise CheckpointError(
                f"checkpoint {path} was written by a run with {key}={saved.get(key)!r}, this run has {key}={value!r}; "
                "resume with the same settings (epochs, patience and max_seconds may change), or start a new run"
            )
