"""Adam, the training loop, training checkpoints and resuming of the NumPy twin.

The epoch loop (early stopping, time budget, callbacks, history) is :func:`relgrad.training.run_epochs`,
shared with the torch twin; this module owns what touches arrays: the minibatch steps, Adam and ``.npz``
checkpoints.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import CheckpointError
from ..training import (
    EpochRecord, EpochResult, History, LoopState, atomic_write, check_resume_settings, check_step, run_epochs,
)
from ..utils import as_generator, check_batch, check_finite
from .flow import DenseFlow
from .gradients import check_method, loss_and_gradients

__all__ = ["Adam", "fit", "save_checkpoint", "load_checkpoint", "CHECKPOINT_FORMAT", "TRAINING_FORMAT"]

PathLike = Union[str, "os.PathLike[str]"]

#: Version of the .npz checkpoint layout; bump it when the stored keys change.
CHECKPOINT_FORMAT = 1
_CHECKPOINT_KEYS = ("format_version", "dim", "n_layers", "alpha", "weights", "biases")
#: Version of the training state that ``fit(checkpoint_path=...)`` adds to the ``.npz`` (key ``training_json``
#: plus the arrays named in :data:`_TRAINING_ARRAYS`).
TRAINING_FORMAT = 1
_TRAINING_ARRAYS = ("train_weights", "train_biases", "adam_m_weights", "adam_m_biases", "adam_v_weights",
                    "adam_v_biases")


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

    def state_dict(self) -> Dict[str, Any]:
        """Step count and hyperparameters, and copies of the moment arrays (``m``, ``v``: one per parameter)."""
        return {"t": self.t, "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "m": [a.copy() for a in self.m], "v": [a.copy() for a in self.v]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (moments copied in place, so the arrays keep their identity)."""
        if len(state["m"]) != len(self.m) or len(state["v"]) != len(self.v):
            raise ValueError(f"Adam state for {len(state['m'])} parameters, this optimiser has {len(self.m)}")
        for dst, src in zip(self.m + self.v, list(state["m"]) + list(state["v"])):
            if dst.shape != np.shape(src):
                raise ValueError(f"Adam moment of shape {np.shape(src)} for a parameter of shape {dst.shape}")
            dst[...] = src
        self.t, self.lr, self.eps = int(state["t"]), float(state["lr"]), float(state["eps"])
        self.betas = (float(state["betas"][0]), float(state["betas"][1]))


# ------------------------------------------------------------------------------------------- checkpoints
def _write_npz(path: PathLike, arrays: Dict[str, Any]) -> Path:
    # np.savez on a file handle: no ".npz" appended to the name; atomic: path is never left half-written.
    return atomic_write(path, lambda handle: np.savez(handle, **arrays))


def _model_arrays(model: DenseFlow, weights: Sequence[np.ndarray], biases: Sequence[np.ndarray]) -> Dict[str, Any]:
    return {"format_version": CHECKPOINT_FORMAT, "dim": model.dim, "n_layers": model.n_layers, "alpha": model.alpha,
            "weights": np.stack(weights), "biases": np.stack(biases)}


def save_checkpoint(model: DenseFlow, path: PathLike) -> Path:
    """Write the model's parameters and shape metadata to an ``.npz`` file at exactly ``path``.

    Written atomically (a temporary file in the same folder, then ``os.replace``): ``path`` holds either the
    previous checkpoint or the complete new one, never a truncated file.

    Shapes:
        stored ``weights`` ``(L, D, D)``, ``biases`` ``(L, D)``; scalars ``dim``, ``n_layers``, ``alpha``.
    """
    return _write_npz(path, _model_arrays(model, model.weights, model.biases))


_WHAT_TO_DO = (
    "It may be truncated or overwritten by another program (relgrad writes checkpoints atomically, so a crash "
    "during a write leaves the previous checkpoint intact). Delete it (or restore a copy) and start again "
    "without resume, or point to another checkpoint."
)


def _read_checkpoint(path: PathLike) -> dict:
    """Load and validate the arrays of a checkpoint file; :class:`~relgrad.errors.CheckpointError` if it is not one of ours."""
    try:
        with np.load(path, allow_pickle=False) as data:
            stored = {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise
    except Exception as err:  # BadZipFile, EOFError, ValueError, OSError, zlib.error... for a damaged file
        raise CheckpointError(
            f"{path} is not a relgrad NumPy checkpoint (.npz) or is damaged ({type(err).__name__}: {err}). {_WHAT_TO_DO}"
        ) from err
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


def _check_fits(model: DenseFlow, stored: dict, path: PathLike) -> None:
    meta = {"dim": int(stored["dim"]), "n_layers": int(stored["n_layers"]), "alpha": float(stored["alpha"])}
    mismatches = [
        f"{key}: checkpoint {value!r}, model {getattr(model, key)!r}"
        for key, value in meta.items()
        if getattr(model, key) != value
    ]
    if mismatches:
        raise CheckpointError(f"checkpoint {path} does not fit the model ({'; '.join(mismatches)})")


def _set_params(model: DenseFlow, weights: np.ndarray, biases: np.ndarray) -> None:
    for k in range(model.n_layers):
        model.weights[k][...] = weights[k]  # in place: the optimiser and the caller keep references
        model.biases[k][...] = biases[k]


def load_checkpoint(model: Optional[DenseFlow], path: PathLike) -> DenseFlow:
    """Load a checkpoint into ``model`` (in place, so optimisers keep valid references) or into a new model.

    Reads files of :func:`save_checkpoint` and the training checkpoints of ``fit(checkpoint_path=...)`` (which
    hold the best parameters so far).  With ``model=None`` a fresh :class:`DenseFlow` (float64) is built from
    the stored metadata.  A model of another dimension, depth or alpha raises :class:`~relgrad.errors.CheckpointError` naming
    the mismatch; a damaged or truncated file raises :class:`~relgrad.errors.CheckpointError` naming the file.

    Shapes:
        returns the model, with L weights ``(D, D)`` and L biases ``(D,)`` from the file.
    """
    stored = _read_checkpoint(path)
    if model is None:
        # a fixed seed: building the model (then overwriting it) must not draw from any caller's generator
        model = DenseFlow(int(stored["dim"]), int(stored["n_layers"]), alpha=float(stored["alpha"]), rng=0)
    _check_fits(model, stored, path)
    _set_params(model, stored["weights"], stored["biases"])
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


class _NumpyEpochs:
    """One pass over shuffled minibatches per call (``rng.permutation`` once per epoch, as :func:`minibatch_indices`).

    Each step is checked on the host before Adam applies it (:func:`~relgrad.training.check_step`: the loss and
    every gradient norm), so a bad step never reaches the parameters or Adam's moments.  State for a resumed
    run: the generator's state at the start of the current epoch, and the position inside the epoch with the
    partial loss sum (non-zero only after a time cut).

    Shapes:
        x: (N, D); each step uses ``batch_size`` rows (the last one may be shorter).
    """

    def __init__(self, model: DenseFlow, x: np.ndarray, opt: Adam, method: str, batch_size: int,
                 rng: np.random.Generator) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.model, self.x, self.opt, self.method, self.batch_size, self.rng = model, x, opt, method, int(batch_size), rng
        self.names = [f"weights[{k}]" for k in range(model.n_layers)] + [f"biases[{k}]" for k in range(model.n_layers)]
        self.position, self.loss_sum, self.seen = 0, 0.0, 0
        self.epoch_start_state: Optional[dict] = None

    def state_dict(self) -> Dict[str, Any]:
        return {"generator": self.rng.bit_generator.state, "epoch_start_state": self.epoch_start_state,
                "position": self.position, "loss_sum": self.loss_sum, "seen": self.seen}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["generator"]
        self.epoch_start_state = state["epoch_start_state"]
        self.position, self.loss_sum, self.seen = int(state["position"]), float(state["loss_sum"]), int(state["seen"])

    def __call__(self, epoch: int, step: int, out_of_time: Callable[[], bool]) -> EpochResult:
        n, bs = self.x.shape[0], self.batch_size
        if self.position == 0:
            self.epoch_start_state = self.rng.bit_generator.state
            self.loss_sum, self.seen = 0.0, 0
        else:  # finishing an epoch cut by a time budget: draw the same permutation again
            self.rng.bit_generator.state = self.epoch_start_state
        order = self.rng.permutation(n)
        for start in range(self.position, n, bs):
            idx = order[start : start + bs]
            loss, grads = loss_and_gradients(self.model, self.x[idx], self.method)
            flat = [dw for dw, _ in grads] + [db for _, db in grads]  # the order of model.parameters()
            step += 1
            check_step(loss, [float(np.sqrt(np.vdot(g, g))) for g in flat], epoch=epoch, step=step, names=self.names)
            self.opt.step(flat)
            self.loss_sum += loss * len(idx)
            self.seen += len(idx)
            if start + bs < n and out_of_time():
                self.position = start + bs
                return EpochResult(self.loss_sum / self.seen, step, False)
        self.position = 0
        return EpochResult(self.loss_sum / n, step, True)


def _check_settings(saved: Dict[str, Any], now: Dict[str, Any], path: PathLike) -> None:
    check_resume_settings(saved, now, path, data_rtol=1e-12, data_atol=1e-12)


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
    resume: bool = False,
    log_every: int = 0,
    max_seconds: Optional[float] = None,
    evaluate_initial: bool = False,
    on_epoch_end: Optional[Callable[[EpochRecord, History], None]] = None,
    on_divergence: str = "raise",
) -> History:
    """Train ``model`` in place with Adam and early stopping on the exact validation log-likelihood.

    Each epoch shuffles the training set (``rng``), takes one Adam step per minibatch with the chosen gradient
    (``"relative"``, ``"authors"``, ``"mixed"`` or ``"ordinary"``) and then evaluates the mean validation log-likelihood.
    The parameters of the best epoch are kept and restored at the end.  Training stops after ``patience``
    epochs without improvement (``None``: never).  A non-finite or exploding loss or gradient (checked before
    the step is applied), or a non-finite validation log-likelihood, raises
    :class:`~relgrad.errors.TrainingDivergedError` after the best parameters are restored
    (``on_divergence="stop"`` returns the history with ``stopped_by="diverged"`` instead).

    The loop is :func:`relgrad.training.run_epochs`, with the torch twin's options:

    * ``checkpoint_path``: a training checkpoint (``.npz``) written atomically after every epoch: the best
      parameters so far (so :func:`load_checkpoint` reads it as a model), the current parameters, Adam's
      moments and step count, the generator's state, early stopping and the history.  ``resume=True``
      continues from it (a missing file starts a new run); a resumed run ends bit-identical to an
      uninterrupted one.  Method, batch size, training data and ``evaluate_initial`` must match.
    * ``max_seconds``: wall-clock budget (may stop mid-epoch; that epoch is evaluated, marked partial).
    * ``evaluate_initial``: evaluate the untrained model as epoch 0 (training epochs are then 1..epochs).
    * ``on_epoch_end(record, history)`` after each evaluated epoch.
    * ``progress=None`` shows a bar unless ``TQDM_DISABLE`` is set; ``log_every=n > 0`` prints one summary
      line every n epochs.  Epochs are numbered from 0 in the history.

    Shapes:
        x_train: ``(N, D)``; x_val: ``(N_val, D)``; returns a :class:`~relgrad.training.History` whose lists
        have one entry per epoch run.
    """
    check_method(method)
    if resume and checkpoint_path is None:
        raise ValueError("resume=True needs checkpoint_path (the training checkpoint to continue from)")
    x_train = _validated(x_train, model.dim, "x_train")
    x_val = _validated(x_val, model.dim, "x_val")
    gen, opt = as_generator(rng), Adam(model.parameters(), lr=lr)
    runner = _NumpyEpochs(model, x_train, opt, method, batch_size, gen)
    L = model.n_layers
    settings = {"method": method, "batch_size": int(batch_size), "n_train": int(x_train.shape[0]),
                "evaluate_initial": bool(evaluate_initial),
                "data": [float(np.sum(x_train)), float(np.sum(np.square(x_train, dtype=np.float64)))]}

    loop_state: Optional[LoopState] = None
    if resume and Path(checkpoint_path).exists():
        stored = _read_checkpoint(checkpoint_path)
        _check_fits(model, stored, checkpoint_path)
        missing = [k for k in ("training_json", *_TRAINING_ARRAYS) if k not in stored]
        if missing:
            raise CheckpointError(
                f"{checkpoint_path} holds a model but no training state (missing {missing}; written by "
                "save_checkpoint, not by fit): it cannot be resumed. Load it with load_checkpoint, or start a new "
                "run with another checkpoint_path."
            )
        try:
            training = json.loads(str(stored["training_json"]))
        except ValueError as err:
            raise CheckpointError(f"{checkpoint_path}: the training state is not valid JSON ({err}). {_WHAT_TO_DO}") from err
        if training.get("version") != TRAINING_FORMAT:
            raise CheckpointError(
                f"{checkpoint_path} has training-state format {training.get('version')!r}, expected {TRAINING_FORMAT}"
            )
        _check_settings(training["settings"], settings, checkpoint_path)
        _set_params(model, stored["train_weights"], stored["train_biases"])
        adam = dict(training["adam"])
        adam["m"] = [*stored["adam_m_weights"], *stored["adam_m_biases"]]
        adam["v"] = [*stored["adam_v_weights"], *stored["adam_v_biases"]]
        try:
            opt.load_state_dict(adam)
            runner.load_state_dict(training["runner"])
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"checkpoint {checkpoint_path}: the training state does not fit: {err}") from err
        if "loop_best_weights" in stored:
            best = [*stored["loop_best_weights"], *stored["loop_best_biases"]]
        else:
            best = [*stored["weights"], *stored["biases"]]
        loop_state = LoopState.from_dict(training["loop"], best=[np.array(b) for b in best])

    def save_state(state: LoopState, best: List[np.ndarray]) -> None:
        adam = opt.state_dict()
        training = {
            "version": TRAINING_FORMAT,
            "settings": settings,
            "adam": {k: v for k, v in adam.items() if k not in ("m", "v")},
            "runner": runner.state_dict(),
            "loop": state.to_dict(best=None),
        }
        arrays = _model_arrays(model, best[:L], best[L:])
        arrays.update({
            # json keeps every float exactly (repr round-trips), NaN and infinities included
            "training_json": np.array(json.dumps(training)),
            "train_weights": np.stack(model.weights), "train_biases": np.stack(model.biases),
            "adam_m_weights": np.stack(adam["m"][:L]), "adam_m_biases": np.stack(adam["m"][L:]),
            "adam_v_weights": np.stack(adam["v"][:L]), "adam_v_biases": np.stack(adam["v"][L:]),
        })
        if state.best is not best:  # only in a checkpoint written at a time cut
            arrays["loop_best_weights"], arrays["loop_best_biases"] = np.stack(state.best[:L]), np.stack(state.best[L:])
        _write_npz(checkpoint_path, arrays)

    # Overflow inside a diverging run is reported by check_step / validation_score with a clear message;
    # NumPy's own overflow warnings would only precede that error with noise.
    with np.errstate(over="ignore", invalid="ignore"):
        return run_epochs(
            method=method,
            epochs=epochs,
            patience=patience,
            train_epoch=runner,
            evaluate=lambda: float(np.mean(model.log_likelihood(x_val))),
            snapshot=lambda: _copy_params(model),
            restore=lambda saved: _restore_params(model, saved),
            on_epoch_end=on_epoch_end,
            save_state=None if checkpoint_path is None else save_state,
            resume=loop_state,
            max_seconds=max_seconds,
            evaluate_initial=evaluate_initial,
            on_divergence=on_divergence,
            progress=progress,
            log_every=log_every,
        )
