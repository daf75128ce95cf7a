"""Training loop, training checkpoints and resuming for :class:`relgrad.torch.DenseFlow`.

The epoch loop itself (early stopping, time budget, callbacks, history) is :func:`relgrad.training.run_epochs`,
shared with the NumPy twin; this module owns what touches tensors: the optimiser steps, the exact validation
log-likelihood and ``torch.save`` checkpoints.

The steps never wait for the device.  The shuffle is one ``torch.randperm`` per epoch on the data's device;
the loss and gradient norms of each step stay on the device and are read back every ``check_every`` steps and
at the end of the epoch; a step whose loss or gradient is not finite is neutralised on the device before the
optimiser can apply it (see :class:`_TorchEpochs`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import numpy as np
import torch
import torch.distributed as dist

from ..errors import CheckpointError, TrainingDivergedError
from ..training import (
    GRAD_NORM_LIMIT, LOSS_LIMIT, EpochRecord, EpochResult, History, LoopState, atomic_write, check_resume_settings,
    check_step, run_epochs,
)
from ..utils import check_batch, check_finite
from ..utils import progress as progress_bar
from .flow import DenseFlow
from .gradients import check_method, training_loss, unwrap

__all__ = [
    "fit", "save_checkpoint", "load_checkpoint", "make_adam", "mean_log_likelihood", "CHECKPOINT_FORMAT",
    "TRAINING_FORMAT",
]

PathLike = Union[str, "os.PathLike[str]"]
RngLike = Union[torch.Generator, np.random.Generator, int, None]
OptimizerFactory = Callable[[List[torch.nn.Parameter]], torch.optim.Optimizer]

#: Version of the checkpoint dictionary layout written by :func:`save_checkpoint`.
CHECKPOINT_FORMAT = 1
#: Version of the ``"training"`` entry (the resumable state) that ``fit(checkpoint_path=...)`` adds.
TRAINING_FORMAT = 1


# --------------------------------------------------------------------------------------------- helpers
def make_adam(params: Iterable[torch.nn.Parameter], lr: float = 1e-3) -> torch.optim.Adam:
    """``torch.optim.Adam`` with ``fused=True`` when this torch supports it for the parameters, else default.

    The fused kernel updates every parameter in one launch (CUDA) or one loop (CPU); torch rejects it at
    construction for unsupported devices/dtypes (or old versions), and then the default implementation is used.
    The fused kernel also skips a step on the device when told that the gradients are not finite, which
    :func:`~relgrad.torch.fit` uses (no host synchronisation per step).

    Shapes:
        params: parameters of any shapes (all on one device, one dtype).
    """
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.Adam(params, lr=lr)


@torch.no_grad()
def mean_log_likelihood(model: DenseFlow, x: torch.Tensor, batch_size: int = 4096) -> float:
    """Exact mean log-likelihood (nats) of ``x``, in chunks so a large validation set fits in memory.

    The per-sample values are summed in float64 on the device (a float32 sum of thousands of values of size
    ~1e3 loses a few nats per chunk) and read back once.

    Shapes:
        x: (N, D); returns a float.
    """
    if x.shape[0] < 1:
        raise ValueError("mean_log_likelihood needs at least one sample")
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], batch_size):
        total += model.log_likelihood(x[start : start + batch_size]).to(torch.float64).sum()
    return float(total) / x.shape[0]


def _prepare(model: DenseFlow, x: Any, name: str) -> torch.Tensor:
    """Validate a whole data set once (shape, finiteness) and move it to the model's device and dtype.

    Shapes:
        x: (N, D); returns (N, D).
    """
    x = torch.as_tensor(x)
    check_batch(tuple(x.shape), model.dim, name)
    x = x.to(device=model.device, dtype=model.dtype)
    check_finite(bool(torch.isfinite(x).all()), name)
    return x


class _Shuffle:
    """The permutation of each epoch, drawn on the data's device by ``torch.randperm`` (no host traffic), or
    by NumPy when the caller passed a ``np.random.Generator``: then the order is exactly the NumPy twin's
    (``rng.permutation(n)`` once per epoch, as :func:`relgrad.training.minibatch_indices`), uploaded once
    per epoch from pinned memory.

    Shapes:
        ``permutation(n)`` returns (n,) int64 on ``device``.
    """

    def __init__(self, generator: Union[torch.Generator, np.random.Generator], device: torch.device) -> None:
        self.generator, self.device = generator, device
        self.kind = "numpy" if isinstance(generator, np.random.Generator) else "torch"

    def get_state(self) -> Any:
        if self.kind == "numpy":
            return self.generator.bit_generator.state  # a dict of str and int
        return self.generator.get_state()

    def set_state(self, state: Any) -> None:
        if self.kind == "numpy":
            self.generator.bit_generator.state = state
        else:
            self.generator.set_state(state)

    def permutation(self, n: int) -> torch.Tensor:
        if self.kind == "torch":
            return torch.randperm(n, generator=self.generator, device=self.device)
        perm = torch.from_numpy(self.generator.permutation(n))
        if self.device.type == "cuda":
            perm = perm.pin_memory()  # a pageable source would make the copy wait for the device
        return perm.to(self.device, non_blocking=True)

    def where(self) -> str:
        return "numpy" if self.kind == "numpy" else self.generator.device.type


def _shuffle_generator(generator: RngLike, device: torch.device) -> _Shuffle:
    """The shuffling of a run: NumPy's for a ``np.random.Generator`` (used as it is, as the NumPy twin does),
    else a private torch.Generator on the data's device, seeded from ``generator``.

    An int is the seed itself; a torch generator (or None: torch's global generator) gives one draw, so a
    single seed fixes the whole run and the caller's generator advances by one number.
    """
    if isinstance(generator, bool):
        raise TypeError("generator must be a torch.Generator, np.random.Generator, int or None, got a bool")
    if isinstance(generator, np.random.Generator):
        return _Shuffle(generator, device)
    if isinstance(generator, (int, np.integer)):
        seed = int(generator)
    elif generator is None or isinstance(generator, torch.Generator):
        dev = "cpu" if generator is None else generator.device
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=dev))
    else:
        raise TypeError(
            f"generator must be a torch.Generator, np.random.Generator, int or None, got {type(generator).__name__}"
        )
    return _Shuffle(torch.Generator(device=device).manual_seed(seed), device)


def _caller_rng_state(generator: RngLike) -> Any:
    """The state of the generator that seeded the shuffling (None for an int seed, which has no state)."""
    if generator is None:
        return torch.get_rng_state()
    if isinstance(generator, torch.Generator):
        return generator.get_state()
    return None  # an int seed has no state; a NumPy generator is the shuffling's own (saved with it)


def _set_caller_rng_state(generator: RngLike, state: Any, path: PathLike) -> None:
    if state is None or not (generator is None or isinstance(generator, torch.Generator)):
        return
    try:
        if generator is None:
            torch.set_rng_state(state)
        else:
            generator.set_state(state)
    except (TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"checkpoint {path}: the state of the generator passed as generator= cannot be restored ({err}); "
            "resume with the same kind of generator (None, an int seed, a torch.Generator on the same device, or "
            "a NumPy Generator with the same bit generator)"
        ) from err


def _snapshot(model: DenseFlow) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _to_cpu(obj: Any) -> Any:
    """A copy of a nest of dicts/lists/tuples with every tensor on the CPU (``torch.save`` keeps devices)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _strip_module_prefix(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    # DistributedDataParallel / DataParallel save their wrapped module's keys as "module.<name>".
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


# --------------------------------------------------------------------------------------------- processes
def _process_group(model: torch.nn.Module) -> tuple:
    """(rank, world size, process group) of a DistributedDataParallel ``model`` (under any number of
    ``torch.compile`` wrappers); (0, 1, None) for anything else, which trains in one process."""
    from torch.nn.parallel import DistributedDataParallel

    m = model
    for _ in range(16):
        if isinstance(m, DistributedDataParallel):
            return dist.get_rank(m.process_group), dist.get_world_size(m.process_group), m.process_group
        inner = getattr(m, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            break
        m = inner
    return 0, 1, None


#: Numbers for the methods in the agreement check of several processes.
_METHOD_CODES = {"relative": 1, "authors": 2, "ordinary": 3, "autodiff": 4, "mixed": 5}


def _ordered_fingerprint(x: torch.Tensor) -> List[float]:
    """Three float64 sums of ``x`` that change when its rows are reordered (the data check of several
    processes: each must hold the same rows in the same order)."""
    x64 = x.detach().to(torch.float64).reshape(x.shape[0], -1) if x.dim() > 1 else x.detach().to(torch.float64)[:, None]
    weights = torch.arange(1, x64.shape[0] + 1, dtype=torch.float64, device=x64.device)
    return [float(x64.sum()), float((x64 * x64).sum()), float((weights[:, None] * x64).sum())]


def _state_code(state: Any) -> float:
    """A float standing for a generator state (48 bits of its sha256), to compare it between processes."""
    import hashlib
    import pickle

    blob = state.cpu().numpy().tobytes() if isinstance(state, torch.Tensor) else pickle.dumps(state)
    return float(int(hashlib.sha256(blob).hexdigest()[:12], 16))


def _same_on_every_process(values: List[float], device: torch.device, group: Any) -> bool:
    """Whether ``values`` (a few floats) are equal on every process of ``group`` (two all-reduces)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    hi, lo = t.clone(), -t
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(lo, op=dist.ReduceOp.MAX, group=group)
    return bool(torch.equal(hi, -lo))


# --------------------------------------------------------------------------------------------- one epoch
class _TorchEpochs:
    """One shuffled pass of optimiser steps per call, with no host-device synchronisation inside it.

    Safety argument (why no NaN or inf ever reaches the parameters or the optimiser state):

    * After ``backward`` each step stacks, on the device, its loss and the norm of every gradient into a row
      ``v``, and folds ``ok = all(|v| <= limits)`` into a sticky device flag ``alive`` (1 until the first bad
      step, then 0 for the rest of the window).  NaN fails every comparison, so NaN and inf are "not ok";
      so are a loss beyond ``LOSS_LIMIT`` and a gradient norm beyond ``GRAD_NORM_LIMIT``.
    * With fused Adam (and any optimiser that declares ``_step_supports_amp_scaling``), ``1 - alive`` is passed
      as ``found_inf``, the flag ``torch.amp.GradScaler`` uses: the fused kernel then skips the whole update on
      the device (parameters, both moments and the step count stay bit-identical).  With any other
      optimiser the gradients are overwritten with zeros (``masked_fill_``, not a multiplication, which would
      keep NaN) whenever ``alive`` is 0, so it only ever sees finite gradients below the limit, and its state
      stays finite.
    * Every ``check_every`` steps, at a time cut and at the end of the epoch, the rows are read back (one
      synchronisation); the first bad row raises :class:`~relgrad.errors.TrainingDivergedError` naming its epoch and step,
      exactly as the synchronised check did, and :func:`run_epochs` restores the best parameters.

    For a run without bad steps the arithmetic is that of the synchronised loop: the gradients reach the
    optimiser unchanged, and the epoch loss is accumulated on the host in float64, in step order, from the
    read-back losses (``total += loss * batch_size``), as before.

    State for a resumed run (:meth:`state_dict`): the generator, its state at the start of the current epoch,
    and the position inside the epoch with the partial loss sum (non-zero only after a time cut).

    Several processes (``world > 1``, a DistributedDataParallel model): every process holds the whole training
    set and draws the same permutation; a step takes the next ``batch_size * world`` rows of it (the *global*
    batch, the one a single process with that batch size would take) and this process trains on its share
    (``rank``-th of ``world`` near-equal parts). Its loss is the mean over its rows times ``share * world /
    global rows`` (exactly 1 for equal shares), so DDP's average of the processes' gradients is the gradient of
    the mean over the global batch, for every rule (each is linear in the per-row terms). Whether a step is
    applied is decided on all processes together (one all-reduce of the ok-flag per step), so they never
    drift apart; the epoch loss is summed over the processes.

    Shapes:
        x: (N, D) on the model's device; each step uses ``batch_size`` rows (the last one may be shorter),
        or its share of ``batch_size * world`` rows with several processes.
    """

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, method: str,
                 batch_size: int, shuffle: _Shuffle, *, check_every: int = 100,
                 batch_progress: Optional[bool] = False, rank: int = 0, world: int = 1, group: Any = None,
                 lr_schedule: Optional[Callable[[int], float]] = None) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(check_every, bool) or not isinstance(check_every, (int, np.integer)) or check_every < 1:
            raise ValueError(f"check_every must be a positive int, got {check_every!r}")
        self.model, self.opt, self.x, self.method = model, opt, x, method
        self.batch_size, self.check_every, self.batch_progress = int(batch_size), int(check_every), batch_progress
        self.shuffle = shuffle
        # lr of each parameter group at step t (0-based, counted over the whole run) = its lr at construction
        # times lr_schedule(t): a function of the step only, so a resumed run gets the same rates
        self.lr_schedule = lr_schedule
        self.base_lrs = [float(g["lr"]) for g in opt.param_groups]
        flow = unwrap(model)          # model itself is what trains (a DDP wrapper synchronises the gradients)
        self.named = [(n, p) for n, p in flow.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        self.rank, self.world, self.group = int(rank), int(world), group
        n, step_rows = x.shape[0], self.batch_size * self.world
        self.n_batches = math.ceil(n / step_rows)
        # rows of the permutation this process trains on at each step, its loss factor, and the number of rows
        # its loss stands for in the epoch's mean (with one process: the batch, factor 1, the batch size)
        self.shares: List[tuple] = []
        for i in range(self.n_batches):
            m = min(step_rows, n - i * step_rows)
            if m < self.world:
                raise ValueError(
                    f"the last step of an epoch has {m} training rows for {self.world} processes: every process "
                    f"needs at least one; use a training set size or batch_size for which N mod "
                    f"(batch_size * processes) is 0 or at least {self.world} (N={n}, batch_size={self.batch_size})")
            lo, hi = i * step_rows + self.rank * m // self.world, i * step_rows + (self.rank + 1) * m // self.world
            factor = (hi - lo) * self.world / m
            self.shares.append((lo, hi, factor, m if self.world == 1 else m / self.world))
        dev, dt = x.device, flow.dtype
        self.limits = torch.tensor([LOSS_LIMIT] + [GRAD_NORM_LIMIT] * len(self.params), dtype=dt, device=dev)
        self.limits_cpu = self.limits.cpu()
        self.rows = torch.empty((self.n_batches, len(self.params) + 1), dtype=dt, device=dev)
        self.alive = torch.ones((), dtype=torch.float32, device=dev)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=dev)
        self.skip_on_device = bool(getattr(opt, "_step_supports_amp_scaling", False))
        # with several processes: per step, whether every process's row passed (the all-reduced flag)
        self.all_ok = torch.ones(self.n_batches, dtype=torch.float32, device=dev) if self.world > 1 else None
        # position inside the current epoch (non-zero only after a time cut)
        self.position, self.loss_sum, self.seen = 0, 0.0, 0
        self.epoch_start_state: Any = None

    # ------------------------------------------------------------------ state for resuming
    def state_dict(self) -> Dict[str, Any]:
        return {"generator": self.shuffle.get_state(), "device_type": self.shuffle.where(),
                "epoch_start_state": self.epoch_start_state, "position": self.position,
                "loss_sum": self.loss_sum, "seen": self.seen, "n_train": int(self.x.shape[0]),
                "batch_size": self.batch_size}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state["device_type"] != self.shuffle.where():
            raise CheckpointError(
                f"the checkpoint's shuffling generator ran on {state['device_type']} but this run's is "
                f"{self.shuffle.where()}: its state cannot be carried over; resume on the same kind of device "
                "with the same kind of generator= (int/torch or NumPy), or start a new run"
            )
        try:
            self.shuffle.set_state(state["generator"])
        except (TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"the checkpoint's shuffling state does not fit this run's generator: {err}") from err
        self.epoch_start_state = state["epoch_start_state"]
        self.position, self.loss_sum, self.seen = int(state["position"]), float(state["loss_sum"]), state["seen"]
        if self.rank != 0:  # the checkpoint's partial sums are the group's, held by rank 0 (see the time cut)
            self.loss_sum, self.seen = 0.0, 0.0

    # ------------------------------------------------------------------ one epoch
    def _grads(self) -> List[torch.Tensor]:
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]

    def _check(self, lo: int, hi: int, epoch: int, step_before: int) -> None:
        """Read rows ``lo:hi`` back (the one synchronisation), raise at the first bad one, else add the losses."""
        if hi <= lo:
            return
        rows = self.rows[lo:hi].cpu()
        ok = (rows.abs() <= self.limits_cpu).all(dim=1)  # the device's comparison, on the same values
        if not bool(ok.all()):
            j = int((~ok).nonzero()[0, 0])
            values = rows[j].tolist()
            check_step(values[0], values[1:], epoch=epoch, step=step_before + j + 1, names=[n for n, _ in self.named])
            raise AssertionError("a row failed the device check but passed check_step")  # pragma: no cover
        if self.all_ok is not None:
            bad = (self.all_ok[lo:hi].cpu() == 0).nonzero()
            if bad.numel():
                raise TrainingDivergedError(
                    f"epoch {epoch}, step {step_before + int(bad[0, 0]) + 1}: another process of the "
                    "DistributedDataParallel group had a non-finite or exploding loss or gradient (its own error "
                    "names it); the step was applied by none of them")
        for k, loss in enumerate(rows[:, 0].tolist(), start=lo):
            size = self.shares[k][3]
            self.loss_sum += loss * size  # float64, in step order: the synchronised loop's arithmetic
            self.seen += size

    def _anyone(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any process of the group (one all-reduce)."""
        t = torch.tensor([float(flag)], dtype=torch.float32, device=self.x.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t[0] > 0)

    def _group_sums(self) -> tuple:
        """(sum of losses times rows, rows) over every process of the group (one all-reduce)."""
        t = torch.tensor([self.loss_sum, self.seen], dtype=torch.float64, device=self.x.device)
        dist.all_reduce(t, group=self.group)
        return float(t[0]), float(t[1])

    def _epoch_loss(self, total_rows: int) -> float:
        """Mean training loss of the epoch's rows (over every process)."""
        if self.world == 1:
            return self.loss_sum / total_rows
        return self._group_sums()[0] / total_rows

    def __call__(self, epoch: int, step: int, out_of_time: Callable[[], bool]) -> EpochResult:
        n = self.x.shape[0]
        if self.position == 0:
            self.epoch_start_state = self.shuffle.get_state()
            self.loss_sum, self.seen = 0.0, 0
        else:  # finishing an epoch cut by a time budget: draw the same permutation again
            self.shuffle.set_state(self.epoch_start_state)
        perm = self.shuffle.permutation(n)
        start_batch = self.position
        step_at_lo, lo = step, start_batch
        self.alive.fill_(1.0)
        batches = range(start_batch, self.n_batches)
        if self.batch_progress is not False:
            batches = progress_bar(batches, disable=None if self.batch_progress is None else not self.batch_progress,
                                   desc=f"epoch {epoch}", leave=False)
        cut = False
        for i in batches:
            share_lo, share_hi, factor, _ = self.shares[i]
            xb = self.x.index_select(0, perm[share_lo:share_hi])
            self.opt.zero_grad(set_to_none=True)
            loss = training_loss(self.model, xb, self.method, check=False)
            if factor != 1.0:  # an unequal share of the last global batch: weight rows as one process would
                loss = loss * factor
            loss.backward()
            grads = self._grads()
            row = torch.stack([loss.detach().to(self.rows.dtype), *torch._foreach_norm(grads)])
            self.rows[i].copy_(row)
            ok = (row.abs() <= self.limits).all()
            if self.all_ok is not None:  # apply the step on every process or on none
                flag = ok.to(torch.float32)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
                self.all_ok[i].copy_(flag)
                ok = flag > 0
            self.alive.mul_(ok)
            if self.lr_schedule is not None:
                factor_t = float(self.lr_schedule(step))
                for g, base in zip(self.opt.param_groups, self.base_lrs):
                    g["lr"] = base * factor_t
            if self.skip_on_device:
                torch.sub(1.0, self.alive, out=self.found_inf)
                self.opt.found_inf, self.opt.grad_scale = self.found_inf, None  # GradScaler's protocol
                try:
                    self.opt.step()
                finally:
                    del self.opt.found_inf, self.opt.grad_scale
            else:
                dead = self.alive == 0
                for g in grads:
                    g.masked_fill_(dead, 0.0)
                self.opt.step()
            step += 1
            last = i == self.n_batches - 1
            at_check = last or (i + 1 - lo) >= self.check_every
            if self.world == 1:
                cut = not last and out_of_time()
            else:  # the processes must cut at the same step: decided together, at the checks only
                cut = not last and at_check and self._anyone(out_of_time())
            if at_check or cut:
                self._check(lo, i + 1, epoch, step_at_lo)
                lo, step_at_lo = i + 1, step
            if cut:
                break
        if hasattr(batches, "close"):
            batches.close()
        if cut:
            self.position = lo
            if self.world > 1:  # from here on rank 0 holds the group's partial sums (what a checkpoint saves)
                total, seen = self._group_sums()
                self.loss_sum, self.seen = (total, seen) if self.rank == 0 else (0.0, 0.0)
                return EpochResult(total / max(seen, 1.0), step, False)
            return EpochResult(self.loss_sum / max(self.seen, 1), step, False)
        self.position = 0
        return EpochResult(self._epoch_loss(n), step, True)


# --------------------------------------------------------------------------------------------- checkpoints
def _header(model: DenseFlow, best_state: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    return {
        "format": "relgrad.torch.DenseFlow",
        "version": CHECKPOINT_FORMAT,
        "dim": model.dim,
        "n_layers": model.n_layers,
        "alpha": model.alpha,
        "dtype": str(model.dtype).replace("torch.", ""),
        "state_dict": _to_cpu(best_state),
    }


def _atomic_torch_save(obj: Any, path: PathLike) -> None:
    atomic_write(path, lambda handle: torch.save(obj, handle))


def save_checkpoint(model: DenseFlow, path: PathLike) -> None:
    """Save parameters and the metadata needed to rebuild the model (``torch.save`` of plain tensors/dicts).

    Written atomically (a temporary file in the same folder, then ``os.replace``): ``path`` holds either the
    previous checkpoint or the complete new one, never a truncated file.

    Shapes:
        writes L weights (D, D) and L biases (D,), stored on the CPU.
    """
    _atomic_torch_save(_header(model, model.state_dict()), path)


_WHAT_TO_DO = (
    "It may be truncated or overwritten by another program (relgrad writes checkpoints atomically, so a crash "
    "during a write leaves the previous checkpoint intact). Delete it (or restore a copy) and start again "
    "without resume, or point to another checkpoint."
)


def _read_checkpoint(path: PathLike) -> dict:
    try:
        # weights_only=True: never unpickle arbitrary objects from a file.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch raises several unpickling/zip error types for a malformed file
        raise CheckpointError(f"{path} is not a readable relgrad checkpoint ({type(err).__name__}: {err}). "
                              f"{_WHAT_TO_DO}") from err
    keys = {"format", "version", "dim", "n_layers", "alpha", "dtype", "state_dict"}
    if not isinstance(ckpt, dict) or not keys <= set(ckpt) or ckpt["format"] != "relgrad.torch.DenseFlow":
        raise CheckpointError(f"{path} is not a relgrad.torch DenseFlow checkpoint (missing keys or another format)")
    if ckpt["version"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {ckpt['version']}, expected {CHECKPOINT_FORMAT}")
    ckpt["state_dict"] = _strip_module_prefix(ckpt["state_dict"])
    return ckpt


def _check_match(model: DenseFlow, ckpt: dict, path: PathLike) -> None:
    for name in ("dim", "n_layers", "alpha"):
        have, want = getattr(model, name), ckpt[name]
        if have != want:
            raise CheckpointError(f"checkpoint {path} has {name}={want!r} but the model has {name}={have!r}")


def _load_state(model: DenseFlow, state: Dict[str, torch.Tensor], path: PathLike) -> None:
    try:
        model.load_state_dict(_strip_module_prefix(state))  # copies into the existing parameters: dtype/device kept
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path} does not fit the model: {err}") from err


def load_checkpoint(model: Optional[DenseFlow], path: PathLike, *,
                    device: Optional[Union[str, torch.device]] = None) -> DenseFlow:
    """Load a checkpoint into ``model`` (keeping its dtype and device), or build a new model if None.

    Reads files of :func:`save_checkpoint` and the training checkpoints of ``fit(checkpoint_path=...)``
    (which hold the best parameters so far).  A new model gets the checkpoint's dimension, layers, alpha and
    dtype, on ``device`` (None: ``"auto"``, CUDA when available); it is built with a private generator and
    then overwritten, so loading never advances torch's global RNG.  Keys saved from a
    ``DistributedDataParallel`` wrapper (``"module."`` prefix) are accepted.  A model of another shape or
    alpha raises CheckpointError naming the mismatch; an unreadable or truncated file raises CheckpointError
    naming the file.

    Shapes:
        reads L weights (D, D) and L biases (D,).
    """
    ckpt = _read_checkpoint(path)
    if model is None:
        dtype = getattr(torch, str(ckpt["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"checkpoint {path} has an unknown dtype {ckpt['dtype']!r}")
        model = DenseFlow(int(ckpt["dim"]), int(ckpt["n_layers"]), alpha=float(ckpt["alpha"]), dtype=dtype,
                          device=None if device is None else str(device), generator=0)
    elif device is not None:
        raise ValueError("device= applies when load_checkpoint builds the model (model=None); "
                         "move an existing model with model.to(device)")
    _check_match(model, ckpt, path)
    _load_state(model, ckpt["state_dict"], path)
    return model


def _data_fingerprint(x: torch.Tensor) -> List[float]:
    # Two float64 sums: enough to notice that a resumed run got other data (another seed, size or scaling).
    x64 = x.to(torch.float64)
    return [float(x64.sum()), float((x64 * x64).sum())]


def _read_training(path: PathLike) -> dict:
    ckpt = _read_checkpoint(path)
    training = ckpt.get("training")
    if not isinstance(training, dict):
        raise CheckpointError(
            f"{path} holds a model but no training state (written by save_checkpoint, not by fit); it cannot be "
            "resumed. Load it with load_checkpoint, or start a new run with another checkpoint_path."
        )
    if training.get("version") != TRAINING_FORMAT:
        raise CheckpointError(f"{path} has training-state format {training.get('version')!r}, expected {TRAINING_FORMAT}")
    return ckpt


def _check_settings(saved: Dict[str, Any], now: Dict[str, Any], path: PathLike) -> None:
    check_resume_settings(saved, now, path, data_rtol=1e-6, data_atol=1e-9)


# --------------------------------------------------------------------------------------------- fit
def fit(
    model: Union[DenseFlow, torch.nn.Module],
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
    resume: bool = False,
    log_every: int = 0,
    max_seconds: Optional[float] = None,
    evaluate_initial: bool = False,
    on_epoch_end: Optional[Callable[[EpochRecord, History], None]] = None,
    on_divergence: str = "raise",
    optimizer: Optional[OptimizerFactory] = None,
    check_every: int = 100,
    batch_progress: Optional[bool] = False,
    lr_schedule: Optional[Callable[[int], float]] = None,
) -> History:
    """Maximum-likelihood training with Adam and the chosen gradient, early stopping on the exact val LL.

    Each epoch shuffles the training set on its device (``torch.randperm``; see ``generator``), takes one optimiser step per
    minibatch on :func:`relgrad.torch.training_loss`, then evaluates the exact mean validation
    log-likelihood.  The best parameters are kept and restored into ``model`` at the end; ``patience=None``
    never stops early.  No step waits for the device: losses are checked every ``check_every`` steps and at
    the end of each epoch, and a non-finite (or exploding) loss or gradient is never applied; it raises
    :class:`~relgrad.errors.TrainingDivergedError` naming its epoch and step, after the best parameters are
    restored (``on_divergence="stop"`` returns the history with ``stopped_by="diverged"`` instead).

    Options (the loop is :func:`relgrad.training.run_epochs`):

    * ``generator``: int seed, torch generator, or None (torch's global generator) for the shuffling on the
      device; a NumPy generator instead shuffles exactly as the NumPy twin's ``fit(rng=...)`` does (one
      upload of the permutation per epoch), so both twins can follow the same trajectory.
    * ``checkpoint_path``: a training checkpoint written atomically after every epoch: the best parameters so
      far (so :func:`load_checkpoint` reads it as a model), plus the current parameters, the optimiser state,
      the shuffling generator, early stopping and the history.  ``resume=True`` continues from it (a missing
      file starts a new run, so one command serves the first run and every restart); a run resumed after a
      kill ends bit-identical to an uninterrupted one (same device).  Method, batch size, training data and
      ``evaluate_initial`` must match; ``epochs``, ``patience`` and ``max_seconds`` may change.
    * ``max_seconds``: wall-clock budget; may stop mid-epoch (that epoch is evaluated, marked partial).
    * ``evaluate_initial``: evaluate the untrained model as epoch 0 (training epochs are then 1..epochs).
    * ``on_epoch_end(record, history)``: called after each evaluated epoch (an :class:`~relgrad.training.EpochRecord`).
    * ``optimizer``: a function ``params -> torch.optim.Optimizer`` (default: :func:`~relgrad.torch.make_adam` with ``lr``);
      for ``relgrad.torch.optim.RelativeAdam``, which takes the model: ``lambda params: RelativeAdam(flow, lr)``.
    * ``lr_schedule``: ``t -> factor``; before step ``t`` (0-based over the whole run, resumed runs included)
      every parameter group's learning rate is its initial one times ``factor`` (warm-up, cosine decay, the
      JAX Adam step count of ``relgrad.torch.optim.jax_adam_schedule``).
    * ``progress``: True/False shows/hides the epoch bar, None honours ``TQDM_DISABLE``; ``batch_progress``
      the same for a bar per epoch over its minibatches (default off); ``log_every > 0`` prints a line every
      that many epochs.  Epochs are numbered from 0.

    ``model`` may be a :class:`DenseFlow` or a wrapper of one (``torch.compile``, DistributedDataParallel):
    the steps go through the wrapper, evaluation and checkpoints use the flow inside.  **Several processes**
    (``model`` wrapped in ``DistributedDataParallel``, e.g. under ``torchrun``): call ``fit`` on every
    process with the same ``x_train``, ``x_val`` and ``generator`` (an explicit seed is required: every
    process must draw the same permutation; ``x_train`` is checked to be the same); ``batch_size`` is per
    process, so each step trains on a global batch of ``batch_size * world_size`` rows, split between the
    processes, and the parameters follow exactly those of one process with that batch size (tested to 1e-12
    in float64).  Only rank 0 writes ``checkpoint_path`` (all read it on ``resume``, so it must be on a shared
    file system); ``max_seconds`` cuts all processes at the same step, decided at the checks.

    Shapes:
        x_train: (N, D), x_val: (N_val, D); returns a relgrad.training.History.
    """
    check_method(method)
    if resume and checkpoint_path is None:
        raise ValueError("resume=True needs checkpoint_path (the training checkpoint to continue from)")
    wrapper, model = model, unwrap(model)   # steps through the wrapper; everything else on the flow itself
    rank, world, group = _process_group(wrapper)
    x_train = _prepare(model, x_train, "x_train")  # validated once: the per-step loss skips the checks
    x_val = _prepare(model, x_val, "x_val")
    if world > 1:
        if generator is None or isinstance(generator, bool):
            raise ValueError(f"fit on {world} processes (DistributedDataParallel) needs generator= an explicit seed "
                             "(int, torch.Generator or NumPy Generator), the same on every process: each must "
                             "draw the same permutation of the training set")
        for name, x in (("x_train", x_train), ("x_val", x_val)):
            if not _same_on_every_process([float(x.shape[0]), *_ordered_fingerprint(x)], x.device, group):
                raise ValueError(f"fit on {world} processes: {name} differs between the processes; give every "
                                 f"process the whole, identical {name} in the same order (fit splits each global "
                                 "batch itself)")
        agreed = [batch_size, check_every, epochs, -1 if patience is None else patience,
                  -1.0 if max_seconds is None else max_seconds, float(evaluate_initial), float(resume),
                  float(_METHOD_CODES.get(method, -1))]
        if not _same_on_every_process([float(v) for v in agreed], x_train.device, group):
            raise ValueError(f"fit on {world} processes: the arguments differ between the processes (method, "
                             "batch_size, check_every, epochs, patience, max_seconds, evaluate_initial, resume must "
                             "be the same everywhere)")
    params = list(model.parameters())
    opt = make_adam(params, lr=lr) if optimizer is None else optimizer(params)
    runner = _TorchEpochs(wrapper, opt, x_train, method, batch_size, _shuffle_generator(generator, x_train.device),
                          check_every=check_every, batch_progress=batch_progress, rank=rank, world=world,
                          group=group, lr_schedule=lr_schedule)
    if world > 1 and not _same_on_every_process([_state_code(runner.shuffle.get_state())], x_train.device, group):
        raise ValueError(f"fit on {world} processes: generator= gives the processes different shuffling states; "
                         "pass the same seed everywhere (not seed + rank), so that they draw the same permutation")
    caller_rng = _caller_rng_state(generator)  # after the one draw that seeded the shuffling
    settings = {"method": method, "batch_size": int(batch_size), "n_train": int(x_train.shape[0]),
                "evaluate_initial": bool(evaluate_initial), "optimizer": type(opt).__name__}
    if world > 1:
        settings["processes"] = world
    data = _data_fingerprint(x_train) if checkpoint_path is not None else None

    loop_state: Optional[LoopState] = None
    if resume and Path(checkpoint_path).exists():
        ckpt = _read_training(checkpoint_path)
        tr = ckpt["training"]
        _check_match(model, ckpt, checkpoint_path)
        _check_settings(tr["settings"], {**settings, "data": data}, checkpoint_path)
        if tr["settings"].get("processes", 1) != world:  # (absent in single-process checkpoints)
            raise CheckpointError(
                f"checkpoint {checkpoint_path} was written by a run on {tr['settings'].get('processes', 1)} "
                f"process(es), this run has {world}: the global batch differs; resume with as many processes")
        _load_state(model, tr["model"], checkpoint_path)
        try:
            opt.load_state_dict(tr["optimizer"])
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint {checkpoint_path}: the optimiser state does not fit: {err}") from err
        runner.load_state_dict(tr["runner"])
        # The caller's generator (or torch's global one) seeded the shuffling with one draw at the start of the
        # original run; put it back where that run left it, so that code after fit sees the same random
        # stream as after an uninterrupted run.
        _set_caller_rng_state(generator, tr.get("caller_rng"), checkpoint_path)
        loop = tr["loop"]
        best = loop["best"] if loop["best"] is not None else ckpt["state_dict"]
        best = {k: v.to(device=model.device) for k, v in _strip_module_prefix(best).items()}
        loop_state = LoopState.from_dict(loop, best=best)
    if world > 1:  # every process resumed from the same checkpoint, or none did (shared file system)
        where = [-1.0 if loop_state is None else float(loop_state.next_epoch), float(runner.position),
                 *_ordered_fingerprint(torch.cat([p.detach().reshape(-1) for p in params]))]
        if not _same_on_every_process(where, x_train.device, group):
            raise CheckpointError(
                f"fit on {world} processes: the processes did not resume from the same state ({checkpoint_path}): "
                "the checkpoint must be on a file system that every process reads, and exist for all or none")

    def save_state(state: LoopState, best: Dict[str, torch.Tensor]) -> None:
        training = {
            "version": TRAINING_FORMAT,
            "settings": {**settings, "data": data},
            "model": _to_cpu(model.state_dict()),
            "optimizer": _to_cpu(opt.state_dict()),
            "runner": _to_cpu(runner.state_dict()),
            "caller_rng": caller_rng,
            # the loop's best differs from the file's best only in a checkpoint written at a time cut
            "loop": state.to_dict(best=None if state.best is best else _to_cpu(state.best)),
        }
        _atomic_torch_save({**_header(model, best), "training": training}, checkpoint_path)

    return run_epochs(
        method=method,
        epochs=epochs,
        patience=patience,
        train_epoch=runner,
        evaluate=lambda: mean_log_likelihood(model, x_val),
        snapshot=lambda: _snapshot(model),
        restore=model.load_state_dict,
        on_epoch_end=on_epoch_end,
        save_state=None if checkpoint_path is None or rank != 0 else save_state,
        resume=loop_state,
        max_seconds=max_seconds,
        evaluate_initial=evaluate_initial,
        on_divergence=on_divergence,
        progress=progress,
        log_every=log_every,
        agree=None if world == 1 else runner._anyone,
    )
