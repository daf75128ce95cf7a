"""Timing harness: interleaved rounds, medians and quartiles, the same-run GEMM rate, CSV and ratio tables.

A *group* is one shape and place: (device, dtype, L, M, D).  Inside a group every (backend, method) pair is
built once, warmed up, and then timed in rounds: each round runs one full training step of every pair, in an
order rotated from round to round (A B C, B C A, C A B, ...), so slow drifts of the machine (frequency,
other tenants, thermal state) hit every method alike.  Each step is timed in two parts, the gradient
(forward + backward) and the Adam update, with a device synchronisation after each.

Ratios are only ever formed between methods of the same group, i.e. measured side by side in one run.
"""

from __future__ import annotations

import csv
import datetime as _dt
import gc
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..utils import cpu_name
from .steps import CUBIC, PER_SAMPLE_JACOBIAN, Step, available, make_step

__all__ = [
    "Group", "FIELDS", "machine_info", "measure_group", "run_benchmark", "write_csv", "read_csv",
    "ratio_rows", "format_ratio_table", "loglog_slope", "slopes",
]

#: Columns of the benchmark CSV, in order (times in milliseconds; q1/q3 are the quartiles over rounds).
FIELDS = (
    "backend", "device", "dtype", "n_layers", "batch", "dim", "method", "rounds",
    "grad_ms", "grad_ms_q1", "grad_ms_q3", "opt_ms", "step_ms", "step_ms_q1", "step_ms_q3",
    "flops", "gflops", "gemm_fraction",
    "threads", "cpu", "gpu", "torch", "numpy", "blas", "relgrad", "date",
)


@dataclass(frozen=True)
class Group:
    """One shape and place of the benchmark: every method in it is timed side by side."""

    device: str
    dtype: str
    n_layers: int
    batch: int
    dim: int


# --------------------------------------------------------------------------------------------- machine
def _blas_name() -> str:
    try:
        from threadpoolctl import threadpool_info

        libs = [f"{i.get('internal_api')} {i.get('version')} ({i.get('num_threads')} threads)"
                for i in threadpool_info() if i.get("user_api") == "blas"]
        return "; ".join(libs) or "unknown"
    except ImportError:
        return "unknown (threadpoolctl not installed)"


def machine_info(device: str = "cpu") -> Dict[str, str]:
    """What the CSV records about the machine and libraries (the same value on every row of one run)."""
    import relgrad

    info = {"cpu": f"{cpu_name()} x{os.cpu_count()}", "gpu": "", "torch": "", "numpy": np.__version__,
            "blas": _blas_name(), "relgrad": relgrad.__version__,
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "threads": ""}
    try:
        import torch

        info["torch"] = torch.__version__
        info["threads"] = str(torch.get_num_threads())
        if device.startswith("cuda"):
            info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    except ImportError:
        pass
    return info


# --------------------------------------------------------------------------------------------- timing
def _time_step(step: Step) -> Tuple[float, float]:
    """Seconds for the gradient and for the update of one step (device synchronised after each)."""
    t0 = time.perf_counter()
    step.grad()
    step.sync()
    t1 = time.perf_counter()
    step.update()
    step.sync()
    return t1 - t0, time.perf_counter() - t1


def _quartiles(values: Sequence[float]) -> Tuple[float, float, float]:
    q1, med, q3 = np.percentile(np.asarray(values), [25, 50, 75])
    return float(q1), float(med), float(q3)


#: D x D matrices each method keeps alive per layer during the interleaved rounds: the parameter, its
#: gradient and Adam's two moments (the LU baseline has two triangular factors; gemm only reads W).
_MATRICES_PER_LAYER = {"plain": 4, "relative": 4, "authors": 4, "ordinary": 5, "autodiff": 5, "lu": 8,
                       "jacobian": 4, "gemm": 1, "relative-adam": 8}  # relative-adam: + momentum, Etil, its square, U


def _transient_bytes(group: Group, method: str) -> float:
    # What one gradient allocates on top of that state, where it is not O(D^2): the per-sample Jacobian
    # stacks of "jacobian", (4L + 1) M x D x D numbers (relgrad.costs.jacobian_stack_bytes).
    from ..costs import jacobian_stack_bytes

    if method in PER_SAMPLE_JACOBIAN:
        return jacobian_stack_bytes(group.n_layers, group.batch, group.dim, 8 if group.dtype == "float64" else 4)
    return 0.0


def memory_estimate(group: Group, pairs: Sequence[Tuple[str, str]]) -> float:
    """Bytes that timing ``pairs`` side by side needs at once: every method's D x D state (all models are
    alive through the rounds) plus the largest transient of one gradient (only one step runs at a time;
    the per-sample Jacobian stacks of "jacobian" are the only transient that is not O(L D^2)).

    Shapes:
        none; returns a float (bytes).
    """
    itemsize = 8 if group.dtype == "float64" else 4
    per_layer = sum(_MATRICES_PER_LAYER.get(method, 5) for _, method in pairs)
    transient = max((_transient_bytes(group, method) for _, method in pairs), default=0.0)
    return float(per_layer * group.n_layers * group.dim**2 * itemsize) + transient


def _available_bytes(device: str) -> Optional[float]:
    """Free memory of ``device``: CUDA's ``mem_get_info``, or the host's available pages (None if unknown)."""
    if device.startswith("cuda"):
        import torch

        return float(torch.cuda.mem_get_info(torch.device(device))[0])
    try:  # Linux: MemAvailable counts the page cache the kernel can drop, which free pages do not
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return 1024.0 * int(line.split()[1])
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # not every platform has these names
        return None


def _check_memory(group: Group, pairs: Sequence[Tuple[str, str]]) -> None:
    # Every method's model and Adam state live through the rounds: refuse clearly instead of running out of
    # device memory halfway through a sweep (e.g. D = 16384 with all seven methods needs ~45 GB in float32).
    # On the CPU only the per-sample Jacobian is checked: it is the one method whose memory grows with M
    # (about 22 GB at D = 784, M = 1000), and the host's other methods have run at every committed size.
    on_cuda = group.device.startswith("cuda")
    if not on_cuda and not any(m in PER_SAMPLE_JACOBIAN for _, m in pairs):
        return
    free = _available_bytes(group.device)
    if free is None:
        return
    need = memory_estimate(group, pairs)
    if need > 0.8 * free:
        raise MemoryError(
            f"timing {len(pairs)} methods side by side at M={group.batch}, D={group.dim}, L={group.n_layers} "
            f"needs about {need / 2**30:.1f} GiB of {group.device} memory, {free / 2**30:.1f} GiB are free: "
            "pass fewer --methods (the per-sample 'jacobian' needs (4L+1) M D^2 numbers), a smaller "
            "--max-jacobian-dim, --dims or --batches"
        )


def measure_group(group: Group, pairs: Sequence[Tuple[str, str]], *, warmup: int = 3, repeats: int = 15,
                  min_repeats: int = 3, budget_s: float = 20.0, seed: int = 0,
                  log: Optional[Callable[[str], None]] = None) -> List[Dict[str, object]]:
    """Time every (backend, method) pair of ``pairs`` on ``group`` in interleaved rounds.

    The number of rounds is ``repeats``, reduced (not below ``min_repeats``) when the warm-up says that
    the rounds would take longer than ``budget_s`` seconds.  Returns one row per pair, with the columns of
    :data:`FIELDS` except the machine columns.
    """
    _check_memory(group, pairs)
    steps: Dict[Tuple[str, str], Step] = {}
    for backend, method in pairs:
        steps[(backend, method)] = make_step(backend, method, group.n_layers, group.batch, group.dim,
                                             device=group.device, dtype=group.dtype, seed=seed)
    last: Dict[Tuple[str, str], float] = {}
    for key, step in steps.items():
        for _ in range(max(1, warmup)):
            g, o = _time_step(step)
        last[key] = g + o
    per_round = sum(last.values())
    rounds = repeats if per_round * repeats <= budget_s else max(min_repeats, int(budget_s / per_round))
    if log:
        log(f"  {len(steps)} methods, {rounds} rounds, about {per_round * rounds:.1f} s")
    keys = list(steps)
    samples: Dict[Tuple[str, str], List[Tuple[float, float]]] = {k: [] for k in keys}
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:  # rotate the order every round
            samples[key].append(_time_step(steps[key]))
    del steps
    gc.collect()
    return _rows(group, samples)


def _rows(group: Group, samples: Dict[Tuple[str, str], List[Tuple[float, float]]]) -> List[Dict[str, object]]:
    from ..costs import step_flops

    rows = []
    for (backend, method), times in samples.items():
        grad = [1e3 * g for g, _ in times]
        opt = [1e3 * o for _, o in times]
        step = [g + o for g, o in zip(grad, opt)]
        gq1, gmed, gq3 = _quartiles(grad)
        sq1, smed, sq3 = _quartiles(step)
        flops = step_flops(method, group.n_layers, group.batch, group.dim)
        rows.append({
            "backend": backend, "device": group.device, "dtype": group.dtype, "n_layers": group.n_layers,
            "batch": group.batch, "dim": group.dim, "method": method, "rounds": len(times),
            "grad_ms": gmed, "grad_ms_q1": gq1, "grad_ms_q3": gq3, "opt_ms": float(np.median(opt)),
            "step_ms": smed, "step_ms_q1": sq1, "step_ms_q3": sq3,
            "flops": flops, "gflops": flops / (gmed * 1e-3) / 1e9, "gemm_fraction": "",
        })
    for row in rows:  # achieved GFLOP/s as a fraction of the same-run, same-backend GEMM rate
        gemm = [r for r in rows if r["backend"] == row["backend"] and r["method"] == "gemm"]
        if gemm and row["method"] != "gemm":
            row["gemm_fraction"] = float(row["gflops"]) / float(gemm[0]["gflops"])
    return rows


def run_benchmark(*, backends: Sequence[str], methods: Sequence[str], devices: Sequence[str] = ("cpu",),
                  dtype: str = "float32", dims: Sequence[int], batches: Sequence[int],
                  layers: Sequence[int] = (2,), max_cubic_dim: int = 8192, max_jacobian_dim: int = 2048,
                  warmup: int = 3,
                  repeats: int = 15, min_repeats: int = 3, budget_s: float = 20.0, seed: int = 0,
                  log: Optional[Callable[[str], None]] = print) -> List[Dict[str, object]]:
    """The whole sweep: every group of devices x layers x batches x dims, each timed by :func:`measure_group`.

    Pairs a backend cannot run (the NumPy twin has no "autodiff", "lu" or "jacobian"; no NumPy on CUDA) are
    left out, the O(D^3) methods are skipped above ``max_cubic_dim`` and the per-sample Jacobian
    (O(M D^3) time, O(M D^2) memory) above ``max_jacobian_dim``.  Returns the rows with the machine columns.
    """
    rows: List[Dict[str, object]] = []
    for device in devices:
        info = machine_info(device)
        for n_layers in layers:
            for batch in batches:
                for dim in dims:
                    group = Group(device, dtype, n_layers, batch, dim)
                    for backend in backends:
                        # One backend at a time: NumPy's BLAS threads and torch's OpenMP threads, interleaved,
                        # wait on each other (measured: several-fold slowdowns of both on 2 cores).
                        pairs = [(backend, m) for m in methods
                                 if available(backend, m) and not (backend == "numpy" and device != "cpu")
                                 and not (m in CUBIC and dim > max_cubic_dim)
                                 and not (m in PER_SAMPLE_JACOBIAN and dim > max_jacobian_dim)]
                        if not pairs:
                            continue
                        if log:
                            log(f"{backend} {device} {dtype} L={n_layers} M={batch} D={dim}")
                        for row in measure_group(group, pairs, warmup=warmup, repeats=repeats,
                                                 min_repeats=min_repeats, budget_s=budget_s, seed=seed, log=log):
                            rows.append({**row, **info})
    return rows


# --------------------------------------------------------------------------------------------- files
def write_csv(rows: Iterable[Dict[str, object]], path: "str | os.PathLike[str]",
              fields: Sequence[str] = FIELDS) -> Path:
    """Write rows with the columns ``fields`` (default :data:`FIELDS`; the memory and trace tools pass their own),
    floats with 6 significant digits."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items() if k in fields})
    return path


def read_csv(path: "str | os.PathLike[str]") -> List[Dict[str, object]]:
    """Read a benchmark CSV back: numbers become int/float, everything else stays a string."""
    ints = {"n_layers", "batch", "dim", "rounds"}
    floats = {"grad_ms", "grad_ms_q1", "grad_ms_q3", "opt_ms", "step_ms", "step_ms_q1", "step_ms_q3",
              "flops", "gflops", "gemm_fraction"}
    out = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            parsed: Dict[str, object] = dict(row)
            for k in ints:
                parsed[k] = int(row[k])
            for k in floats:
                parsed[k] = float(row[k]) if row[k] not in ("", None) else math.nan
            out.append(parsed)
    return out


# --------------------------------------------------------------------------------------------- analysis
def _find(rows: Sequence[Dict[str, object]], **where: object) -> Optional[Dict[str, object]]:
    hits = [r for r in rows if all(r[k] == v for k, v in where.items())]
    return hits[0] if hits else None


def ratio_rows(rows: Sequence[Dict[str, object]], column: str = "step_ms") -> List[Dict[str, object]]:
    """One summary per (backend, group): the relative time, relative/plain, every other method / relative,
    and the relative step's fraction of the GEMM rate.  Missing methods give NaN."""
    out = []
    seen = []
    for r in rows:
        key = (r["backend"], r["device"], r["dtype"], r["n_layers"], r["batch"], r["dim"])
        if key in seen:
            continue
        seen.append(key)
        where = dict(zip(("backend", "device", "dtype", "n_layers", "batch", "dim"), key))
        rel = _find(rows, method="relative", **where)
        if rel is None:
            continue
        t_rel = float(rel[column])
        summary: Dict[str, object] = {**where, "relative_ms": t_rel}
        plain = _find(rows, method="plain", **where)
        summary["relative/plain"] = t_rel / float(plain[column]) if plain else math.nan
        for m in ("authors", "ordinary", "autodiff", "lu", "jacobian"):
            hit = _find(rows, method=m, **where)
            summary[f"{m}/relative"] = float(hit[column]) / t_rel if hit else math.nan
        frac = rel["gemm_fraction"]
        summary["gemm_fraction"] = float(frac) if frac not in ("", None) else math.nan
        out.append(summary)
    return out


def format_ratio_table(rows: Sequence[Dict[str, object]], column: str = "step_ms") -> str:
    """The printed table of :func:`ratio_rows` (one line per backend and group)."""
    summ = ratio_rows(rows, column)
    head = (f"{'backend':<7} {'device':<6} {'dtype':<7} {'L':>2} {'M':>5} {'D':>5} {'relative ms':>11} "
            f"{'rel/plain':>9} {'authors/rel':>11} {'ordinary/rel':>12} {'autodiff/rel':>12} {'lu/rel':>6} "
            f"{'jacobian/rel':>12} {'rel % GEMM':>10}")
    lines = [head, "-" * len(head)]

    def num(v: object, fmt: str) -> str:
        return "—" if isinstance(v, float) and math.isnan(v) else format(v, fmt)

    for s in summ:
        frac = s["gemm_fraction"]
        lines.append(
            f"{s['backend']:<7} {s['device']:<6} {s['dtype']:<7} {s['n_layers']:>2} {s['batch']:>5} {s['dim']:>5} "
            f"{s['relative_ms']:>11.3f} {num(s['relative/plain'], '.2f'):>9} {num(s['authors/relative'], '.2f'):>11} "
            f"{num(s['ordinary/relative'], '.1f'):>12} {num(s['autodiff/relative'], '.1f'):>12} "
            f"{num(s['lu/relative'], '.2f'):>6} {num(s['jacobian/relative'], '.0f'):>12} "
            f"{'—' if isinstance(frac, float) and math.isnan(frac) else format(100 * float(frac), '.0f') + '%':>10}"
        )
    return "\n".join(lines)


def loglog_slope(dims: Sequence[float], times: Sequence[float]) -> float:
    """Least-squares slope of log(time) against log(D): the empirical exponent of the cost."""
    if len(dims) < 2:
        return math.nan
    return float(np.polyfit(np.log(np.asarray(dims, float)), np.log(np.asarray(times, float)), 1)[0])


def slopes(rows: Sequence[Dict[str, object]], column: str = "step_ms") -> List[Dict[str, object]]:
    """The fitted log-log slope of ``column`` against D for every (backend, device, dtype, L, M, method)
    that was measured at three or more dimensions."""
    keys = []
    for r in rows:
        k = (r["backend"], r["device"], r["dtype"], r["n_layers"], r["batch"], r["method"])
        if k not in keys:
            keys.append(k)
    out = []
    for k in keys:
        pts = sorted((int(r["dim"]), float(r[column])) for r in rows
                     if (r["backend"], r["device"], r["dtype"], r["n_layers"], r["batch"], r["method"]) == k)
        if len(pts) >= 3:
            dims, times = zip(*pts)
            out.append({**dict(zip(("backend", "device", "dtype", "n_layers", "batch", "method"), k)),
                        "dims": f"{dims[0]}-{dims[-1]}", "points": len(pts), "slope": loglog_slope(dims, times)})
    return out
