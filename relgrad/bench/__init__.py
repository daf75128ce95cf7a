"""The benchmark harness: ``python -m relgrad.bench`` (see ``--help``).

It times one full training step (gradient, then Adam) of the dense flow for several gradient methods,
backends, devices and shapes, side by side in one run, and reports medians, quartiles, the achieved
GFLOP/s as a fraction of the machine's GEMM rate measured at the same shapes, and ratio tables.
:mod:`relgrad.bench.steps` builds the steps, :mod:`relgrad.bench.harness` times them and writes the CSV,
:mod:`relgrad.bench.lu` is the LU-parameterised baseline.  The committed sweeps of the book live in
``relgrad/results/bench/`` (see :func:`results_path`).
"""

from __future__ import annotations

from pathlib import Path

from .harness import (
    FIELDS,
    Group,
    format_ratio_table,
    loglog_slope,
    machine_info,
    measure_group,
    ratio_rows,
    read_csv,
    run_benchmark,
    slopes,
    write_csv,
)
from .steps import BACKENDS, DEFAULT_METHODS, METHODS, Step, make_step

__all__ = [
    "BACKENDS", "METHODS", "DEFAULT_METHODS", "FIELDS", "Group", "Step", "make_step", "machine_info", "measure_group",
    "run_benchmark", "write_csv", "read_csv", "ratio_rows", "format_ratio_table", "loglog_slope", "slopes",
    "results_path",
]


def results_path(name: str) -> Path:
    """The committed benchmark CSV ``relgrad/results/bench/<name>.csv`` (FileNotFoundError naming what exists)."""
    from ..experiments import results_dir

    folder = results_dir() / "bench"
    path = folder / f"{name}.csv"
    if not path.is_file():
        have = sorted(p.stem for p in folder.glob("*.csv")) if folder.is_dir() else []
        raise FileNotFoundError(f"no committed benchmark {name!r} in {folder}; available: {', '.join(have) or 'none'}")
    return path
