"""Measured peak memory of one gradient, on the CPU: ``python -m relgrad.bench.memory --help``.

Each measurement runs in a fresh Python process, so that nothing another configuration allocated is
counted.  The child builds the benchmark step (:func:`relgrad.bench.make_step`), runs one full warm-up
step (gradient and Adam, so that the gradients and Adam's moments exist), then resets the kernel's
high-water mark of the resident set (``/proc/self/clear_refs``, Linux) and runs one more gradient.  The
figure recorded is the peak resident set during that gradient minus the resident set just before it: the
transient memory of one gradient on top of the training loop's steady state (model, gradients, Adam).
Python's ``tracemalloc`` does not see torch's allocations, hence the operating system's count.

Linux only (``/proc``); elsewhere :func:`peak_gradient_bytes` raises OSError.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

__all__ = ["MEMORY_FIELDS", "peak_gradient_bytes", "measure_memory", "main"]

#: Columns of the memory CSV.  ``peak_bytes`` is the measured transient of one gradient; ``stacks`` is it in
#: units of M x D x D numbers (the size of one per-sample Jacobian stack); ``model_bytes`` is
#: :func:`relgrad.costs.jacobian_stack_bytes` (the model of the "jacobian" method; empty for the others).
MEMORY_FIELDS = ("method", "dtype", "n_layers", "batch", "dim", "rss_before_bytes", "peak_bytes", "stacks",
                 "model_bytes", "threads", "cpu", "torch", "relgrad", "date")

_CHILD = r"""
import json, os, sys, torch
from relgrad.bench import make_step
method, L, M, D, dtype, threads = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5], int(sys.argv[6])
torch.set_num_threads(threads)
step = make_step("torch", method, L, M, D, dtype=dtype)
step.grad(); step.update()  # warm-up: gradients and Adam's moments now exist, as in a training loop

def status(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    raise OSError(f"no {key} in /proc/self/status")

with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset the peak resident set (VmHWM) to the current one
before = status("VmRSS")
step.grad()
print(json.dumps({"rss_before_bytes": before, "peak_bytes": status("VmHWM") - before}))
"""


def peak_gradient_bytes(method: str, n_layers: int, batch: int, dim: int, *, dtype: str = "float32",
                        threads: int = 1, timeout_s: float = 600.0) -> Dict[str, int]:
    """Peak resident-set growth (bytes) of one gradient of a torch benchmark method, in a fresh process.

    Returns ``{"rss_before_bytes": ..., "peak_bytes": ...}``.  Raises OSError where ``/proc`` is missing
    (not Linux) and RuntimeError when the child fails (its error output is in the message).

    Shapes:
        the step is an L x D flow on a batch (M, D), as in :func:`relgrad.bench.make_step`.
    """
    if not os.path.exists("/proc/self/clear_refs"):
        raise OSError("peak-memory measurement needs Linux's /proc/self/clear_refs")
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, method, str(n_layers), str(batch), str(dim), dtype, str(threads)],
        capture_output=True, text=True, timeout=timeout_s,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement of {method} L={n_layers} M={batch} D={dim} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_memory(methods: Sequence[str], layers: Sequence[int], batches: Sequence[int], dims: Sequence[int], *,
                   dtype: str = "float32", threads: int = 1, log=print) -> List[Dict[str, object]]:
    """One row of :data:`MEMORY_FIELDS` per (method, L, M, D), each measured by :func:`peak_gradient_bytes`."""
    import torch

    import relgrad

    from ..costs import jacobian_stack_bytes
    from ..utils import cpu_name

    itemsize = 8 if dtype == "float64" else 4
    info = {"threads": threads, "cpu": f"{cpu_name()} x{os.cpu_count()}", "torch": torch.__version__,
            "relgrad": relgrad.__version__, "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}
    rows = []
    for method in methods:
        for n_layers in layers:
            for batch in batches:
                for dim in dims:
                    got = peak_gradient_bytes(method, n_layers, batch, dim, dtype=dtype, threads=threads)
                    model = jacobian_stack_bytes(n_layers, batch, dim, itemsize) if method == "jacobian" else ""
                    row = {"method": method, "dtype": dtype, "n_layers": n_layers, "batch": batch, "dim": dim,
                           **got, "stacks": got["peak_bytes"] / (batch * dim * dim * itemsize),
                           "model_bytes": model, **info}
                    if log:
                        log(f"{method:<9} L={n_layers} M={batch:<4} D={dim:<5} "
                            f"peak +{got['peak_bytes'] / 2**20:8.1f} MiB = {row['stacks']:5.2f} stacks of M D^2")
                    rows.append(row)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .cli import int_list
    from .steps import METHODS

    p = argparse.ArgumentParser(prog="python -m relgrad.bench.memory", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", default="jacobian", help="comma-separated torch benchmark methods")
    p.add_argument("--layers", type=int_list, default=[2])
    p.add_argument("--batches", type=int_list, default=[10])
    p.add_argument("--dims", type=int_list, default=[256, 512, 1024])
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    p.add_argument("--out", default="-", help="CSV file to write ('-' for none)")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS or m == "gemm"]
    if bad or not methods:
        p.error(f"unknown or untimed method {', '.join(bad) or '(none)'}; choose from "
                f"{', '.join(m for m in METHODS if m != 'gemm')}")
    rows = measure_memory(methods, args.layers, args.batches, args.dims, dtype=args.dtype, threads=args.threads)
    if args.out != "-":
        from .harness import write_csv

        print(f"wrote {write_csv(rows, args.out, MEMORY_FIELDS)} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
