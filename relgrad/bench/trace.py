"""Where the time of the ``gemm`` reference goes: ``python -m relgrad.bench.trace --help``.

A diagnostic of the benchmark, not part of it.  In the harness's context (the steps of the timed torch
methods built side by side and run in rotated rounds, as :func:`relgrad.bench.harness.measure_group`
does), it times every matrix product of the relative step twice at the ``gemm`` reference's turn:

* ``fresh``: each product allocates its output, as ``torch.mm(a, b)`` does (the ``gemm`` reference as it
  was first written, and what autograd does inside the relative step);
* ``preallocated``: each product writes into an output allocated once (``out=``, the reference now);

and, at the relative step's turn, the same products inside its gradient (``torch.profiler``, self time
per call).  The whole gradient of every other method is timed at its turn too.  Every row also counts
the minor page faults: a fresh D x D float32 output is D^2 * 4 / 4096 new pages, each faulted in on its
first write.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import resource
import statistics
import time
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["TRACE_FIELDS", "trace_gemm", "main"]

#: Columns of the trace CSV (times in milliseconds per call: median, least and greatest over the rounds;
#: minor page faults per call, median).
TRACE_FIELDS = ("dim", "batch", "path", "product", "layer", "ms", "ms_min", "ms_max", "faults", "rounds", "threads",
                "cpu", "torch", "relgrad", "date")

_CONTEXT = ("plain", "relative", "authors", "ordinary", "autodiff", "lu", "gemm")


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _products(x, ws, bs, bufs: Optional[dict], rec: Dict[Tuple[str, str, int], List[Tuple[float, int]]]) -> None:
    """The products of relgrad.bench.steps._torch_gemms, one at a time, timed, fresh or into ``bufs``."""
    import torch

    path = "fresh" if bufs is None else "preallocated"

    def timed(product: str, layer: int, fn):
        f0, t0 = _faults(), time.perf_counter()
        out = fn()
        rec.setdefault((path, product, layer), []).append((1e3 * (time.perf_counter() - t0), _faults() - f0))
        return out

    ys, z = [], x
    for k, (w, b) in enumerate(zip(ws, bs)):
        z = timed("Z W^T + b", k + 1, (lambda: torch.addmm(b, z, w.T)) if bufs is None
                  else (lambda: torch.addmm(b, z, w.T, out=bufs["ys"][k])))
        ys.append(z)
    delta = ys[-1]
    for k in reversed(range(len(ws))):
        yw = timed("Y W", k + 1, (lambda: ys[k] @ ws[k]) if bufs is None
                   else (lambda: torch.mm(ys[k], ws[k], out=bufs["yw"])))
        timed("Delta^T (Y W)", k + 1, (lambda: torch.mm(delta.T, yw)) if bufs is None
              else (lambda: torch.mm(delta.T, yw, out=bufs["grads"][k])))
        if k > 0:
            delta = timed("Delta W", k + 1, (lambda: delta @ ws[k]) if bufs is None
                          else (lambda: torch.mm(delta, ws[k], out=bufs["delta"][k])))


def _relative_ops(prof) -> Dict[str, List[float]]:
    """Self CPU time (ms) of each product call in one profiled relative gradient, by product."""
    names = {"aten::addmm": "Z W^T + b", "aten::addcmul_": "+ (sum c) W, in place"}
    out: Dict[str, List[float]] = {}
    for e in prof.events():
        shapes = [tuple(s) for s in (e.input_shapes or []) if s]
        if e.name == "aten::mm" and len(shapes) == 2:
            (a0, a1), (b0, b1) = shapes
            name = "Delta^T (Y W)" if a0 == b1 and a1 == b0 and a0 > a1 else "Y W or Delta W"
        elif e.name in names and shapes and len(shapes[0]) == 2:
            name = names[e.name]
        else:
            continue
        out.setdefault(name, []).append(e.self_cpu_time_total / 1e3)
    return out


def trace_gemm(dim: int, batch: int, *, n_layers: int = 2, rounds: int = 3, methods: Sequence[str] = _CONTEXT,
               log=print) -> List[Dict[str, object]]:
    """Rows of :data:`TRACE_FIELDS` for one shape (see the module docstring).

    Shapes:
        an L x D flow and a batch (M, D), as in :func:`relgrad.bench.make_step`.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    import relgrad

    from ..utils import cpu_name
    from .steps import torch_gemm_buffers, make_step

    steps = {m: make_step("torch", m, n_layers, batch, dim) for m in methods}
    gemm = steps["gemm"]
    env = dict(zip(gemm.grad.__code__.co_freevars, (c.cell_contents for c in gemm.grad.__closure__)))
    x, ws, bs = env["x"], env["ws"], env["bs"]  # the reference's own batch and weights
    bufs = torch_gemm_buffers(x, ws)
    for step in steps.values():
        step.grad()
        step.update()
    rec: Dict[Tuple[str, str, int], List[Tuple[float, int]]] = {}
    rel_ops: Dict[str, List[float]] = {}
    keys = list(steps)
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:  # the harness's rotation
            if key == "gemm":
                _products(x, ws, bs, None, rec)
                _products(x, ws, bs, bufs, rec)
            elif key == "relative":
                f0, t0 = _faults(), time.perf_counter()
                with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                    steps[key].grad()
                rec.setdefault(("relative step", "whole gradient", 0), []).append(
                    (1e3 * (time.perf_counter() - t0), _faults() - f0))
                steps[key].update()
                for name, v in _relative_ops(prof).items():
                    rel_ops.setdefault(name, []).extend(v)
            else:
                f0, t0 = _faults(), time.perf_counter()
                steps[key].grad()
                rec.setdefault((f"{key} step", "whole gradient", 0), []).append(
                    (1e3 * (time.perf_counter() - t0), _faults() - f0))
                steps[key].update()
    info = {"dim": dim, "batch": batch, "rounds": rounds, "threads": torch.get_num_threads(),
            "cpu": f"{cpu_name()} x{os.cpu_count()}", "torch": torch.__version__, "relgrad": relgrad.__version__,
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}
    rows = []
    for (path, product, layer), v in rec.items():
        times = [t for t, _ in v]
        rows.append({**info, "path": path, "product": product, "layer": layer, "ms": statistics.median(times),
                     "ms_min": min(times), "ms_max": max(times), "faults": statistics.median(f for _, f in v)})
    for name, v in rel_ops.items():
        rows.append({**info, "path": "relative step", "product": name, "layer": "", "ms": statistics.median(v),
                     "ms_min": min(v), "ms_max": max(v), "faults": ""})
    if log:
        for row in rows:
            log(f"D={dim} M={batch} {row['path']:<13} {row['product']:<22} {str(row['layer']):>2} "
                f"{row['ms']:8.2f} ms ({row['ms_min']:.2f}-{row['ms_max']:.2f})  faults {row['faults']}")
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .cli import int_list

    p = argparse.ArgumentParser(prog="python -m relgrad.bench.trace", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dims", type=int_list, default=[4096])
    p.add_argument("--batches", type=int_list, default=[10, 100])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--out", default="-", help="CSV file to write ('-' for none)")
    args = p.parse_args(argv)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    rows = [r for d in args.dims for m in args.batches for r in trace_gemm(d, m, rounds=args.rounds)]
    if args.out != "-":
        from .harness import write_csv

        print(f"wrote {write_csv(rows, args.out, TRACE_FIELDS)} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
