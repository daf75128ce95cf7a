"""Backend-free helpers shared by the twins and the book: seeding, progress bars, device choice, validation.

Nothing here imports torch at module level, so the NumPy twin works without torch installed.
"""

from __future__ import annotations

import os
import platform
import random
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, TypeVar

import numpy as np

from .errors import DeviceError, NonFiniteError, ShapeError

T = TypeVar("T")

__all__ = [
    "seed_everything",
    "as_generator",
    "progress",
    "progress_disabled",
    "torch_available",
    "cuda_available",
    "select_device",
    "check_alpha",
    "check_batch",
    "check_finite",
    "cpu_name",
    "environment_summary",
    "print_environment",
    "results_dir",
]


# --------------------------------------------------------------------------------------------- seeding
def seed_everything(seed: int) -> np.random.Generator:
    """Seed Python's ``random``, NumPy's legacy global state and (if installed) torch on every device.

    Returns a fresh ``np.random.Generator`` seeded with ``seed``.  Prefer passing that generator (or a
    ``torch.Generator``) explicitly to every function that draws: global seeding is a safety net, not the
    mechanism relgrad relies on.
    """
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    random.seed(int(seed))
    np.random.seed(int(seed) % 2**32)
    if torch_available():
        import torch

        torch.manual_seed(int(seed))  # also seeds every CUDA device
    return np.random.default_rng(int(seed))


def as_generator(rng: "np.random.Generator | int | None") -> np.random.Generator:
    """Turn ``rng`` (a Generator, an int seed or ``None`` for fresh entropy) into a ``np.random.Generator``."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    raise TypeError(f"rng must be a numpy Generator, an int seed or None, got {type(rng).__name__}")


# --------------------------------------------------------------------------------------------- progress
def progress_disabled() -> bool:
    """True when the environment variable ``TQDM_DISABLE`` is set to a true value (as CI and the book build do)."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in {"1", "true", "yes", "on"}


def progress(iterable: Iterable[T], *, disable: Optional[bool] = None, **kwargs: Any) -> Iterable[T]:
    """Wrap ``iterable`` in a ``tqdm.auto`` progress bar (a notebook widget in Jupyter, text elsewhere).

    The bar is off when ``disable`` is true, or when ``disable`` is ``None`` and ``TQDM_DISABLE`` is set.
    Extra keyword arguments go to ``tqdm`` (``desc``, ``total``, ``leave``...).
    """
    from tqdm.auto import tqdm

    if disable is None:
        disable = progress_disabled()
    return tqdm(iterable, disable=disable, **kwargs)


# --------------------------------------------------------------------------------------------- devices
def torch_available() -> bool:
    """True when torch can be imported."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def cuda_available() -> bool:
    """True when torch is installed and sees at least one CUDA device."""
    if not torch_available():
        return False
    import torch

    return bool(torch.cuda.is_available())


def select_device(device: Optional[str] = None) -> str:
    """Resolve a device name: ``None``/``"auto"`` gives ``"cuda"`` when available, else ``"cpu"``.

    An explicit ``"cuda"`` (or ``"cuda:N"``) on a machine without CUDA raises :class:`~relgrad.errors.DeviceError` instead
    of silently falling back to the CPU.
    """
    if device is None or str(device) == "auto":
        return "cuda" if cuda_available() else "cpu"
    name = str(device)
    if name.startswith("cuda"):
        if not cuda_available():
            raise DeviceError(
                f"device {name!r} was requested but CUDA is not available on this machine "
                f"(torch installed: {torch_available()}); use device='cpu' or device='auto'"
            )
        import torch

        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return name
    if name == "cpu":
        return name
    raise DeviceError(f"unknown device {name!r}: expected 'cpu', 'cuda', 'cuda:N' or 'auto'")


# --------------------------------------------------------------------------------------------- validation
def check_alpha(alpha: float) -> float:
    """Return ``alpha`` as a float if it lies strictly between 0 and 1, else raise ``ValueError``.

    The smooth leaky ReLU is a bijection of the real line with slope in (alpha, 1) only for 0 < alpha < 1:
    alpha = 0 makes it softplus (not onto R), alpha = 1 makes it the identity (no nonlinearity).
    """
    a = float(alpha)
    if not (0.0 < a < 1.0) or not np.isfinite(a):
        raise ValueError(f"alpha must lie strictly between 0 and 1 (got {alpha!r})")
    return a


def check_batch(shape: tuple, dim: int, name: str = "x") -> None:
    """Raise :class:`~relgrad.errors.ShapeError` unless ``shape`` is ``(M, dim)`` with ``M >= 1``.

    Batches are row-major: one sample per row, as in ``nn.Linear``.
    """
    if len(shape) != 2:
        raise ShapeError(
            f"{name} must be a 2-D batch of shape (M, D={dim}); got an array with {len(shape)} dimension(s), "
            f"shape {tuple(shape)}" + (" (for one sample use x[None, :])" if len(shape) == 1 else "")
        )
    if shape[1] != dim:
        raise ShapeError(f"{name} has {shape[1]} columns but the model has dimension D={dim}; shape {tuple(shape)}")
    if shape[0] < 1:
        raise ShapeError(f"{name} is an empty batch, shape {tuple(shape)}")


def check_finite(all_finite: bool, name: str = "x") -> None:
    """Raise :class:`~relgrad.errors.NonFiniteError` naming ``name`` when ``all_finite`` is false (each twin computes the flag)."""
    if not all_finite:
        raise NonFiniteError(f"{name} contains NaN or infinite values; clean or impute the data first")


# --------------------------------------------------------------------------------------------- reporting
def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux), for result files that record the machine."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def environment_summary() -> dict:
    """Versions and hardware a chapter prints in its first cell (stable keys, no timestamps)."""
    import relgrad

    info = {
        "python": platform.python_version(),
        "relgrad": relgrad.__version__,
        "numpy": np.__version__,
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu_count": os.cpu_count(),
    }
    if torch_available():
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["device"] = select_device("auto")
        if info["device"].startswith("cuda"):
            info["gpu"] = torch.cuda.get_device_name(0)
    else:
        info["torch"] = "not installed"
        info["device"] = "cpu"
    info["in_colab"] = "google.colab" in sys.modules
    return info


def print_environment() -> None:
    """Print :func:`environment_summary` as aligned ``key: value`` lines (the first cell of every chapter)."""
    info = environment_summary()
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}} : {value}")


# --------------------------------------------------------------------------------------------- files
def results_dir() -> Path:
    """The folder of the committed results (``relgrad/results``), found relative to the installed package.

    A plain path helper here, so that whoever reads the committed runs (the experiments CLI, the benchmark,
    a chapter) needs nothing more than this module.
    """
    return Path(__file__).resolve().parent / "results"
