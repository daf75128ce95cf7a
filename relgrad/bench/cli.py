"""Command line of the benchmark: ``python -m relgrad.bench --help``.

Examples::

    python -m relgrad.bench --quick                                  # smoke test, well under a minute
    python -m relgrad.bench --dims 784 --batches 10,100,1000         # the goal table at D = 784
    python -m relgrad.bench --backends torch --methods plain,relative,ordinary,autodiff,jacobian,gemm \\
        --batches 10 --dims 128,256,512,1024,2048,4096,8192 --out sweep.csv   # the paper's figure
    python -m relgrad.bench --devices cuda --dims 1024,4096,16384      # on a GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional, Sequence

from ..errors import DeviceError
from ..utils import select_device
from .harness import format_ratio_table, run_benchmark, slopes, write_csv
from .steps import BACKENDS, DEFAULT_METHODS, METHODS

#: Settings of ``--quick`` (CI's smoke test): the chosen methods (by default :data:`DEFAULT_METHODS`) on every
#: backend, two small widths, two batches.
QUICK = {"dims": [64, 256], "batches": [10, 100], "repeats": 5, "warmup": 2, "budget": 5.0}


def int_list(text: str) -> List[int]:
    """Parse "128,256" into [128, 256] for argparse (also used by the memory and trace tools)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _choices(valid: Sequence[str]):
    def parse(text: str) -> List[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in valid]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad) or 'empty list'}; choose from {', '.join(valid)}")
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m relgrad.bench",
        description="Time one training step (gradient + Adam) of a dense flow for several gradient methods, "
        "side by side, and print ratio tables. Methods: plain (same MLP, no log-det), relative (ours), "
        "authors (published three-product order), ordinary (explicit inverse), autodiff (autograd through "
        "slogdet of each weight), lu (LU-parameterised layers as in nflows), jacobian (autodiff through the "
        "full per-sample Jacobian, vmap(jacrev) + slogdet: most likely the paper's third curve, O(M D^3) time and "
        "O(M D^2) memory, so only with --methods), gemm (only the relative step's GEMMs, at its shapes and "
        "layouts, into preallocated outputs: the machine's GEMM rate for this step), relative-adam (the relative "
        "gradient updated by relgrad.torch.optim.RelativeAdam instead of Adam: its opt_ms is RelativeAdam's step; "
        "only with --methods).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--backends", type=_choices(BACKENDS), default=list(BACKENDS), help="comma-separated")
    p.add_argument("--methods", type=_choices(METHODS), default=list(DEFAULT_METHODS),
                   help="comma-separated (jacobian and relative-adam are not in the default: name them)")
    p.add_argument("--devices", type=_choices(("cpu", "cuda")), default=["cpu"], help="cpu and/or cuda")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--dims", type=int_list, default=[784], help="widths D, comma-separated")
    p.add_argument("--batches", type=int_list, default=[10, 100, 1000], help="batch sizes M, comma-separated")
    p.add_argument("--layers", type=int_list, default=[2], help="numbers of layers L, comma-separated")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and for NumPy's BLAS (default: leave the libraries' defaults)")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds per group (each round runs every method once)")
    p.add_argument("--min-repeats", type=int, default=3, help="never fewer rounds than this")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per method before the rounds")
    p.add_argument("--budget", type=float, default=20.0,
                   help="seconds of timed rounds per group; fewer rounds (not below --min-repeats) when slower")
    p.add_argument("--max-cubic-dim", type=int, default=8192,
                   help="skip ordinary and autodiff (O(D^3) per step) above this width")
    p.add_argument("--max-jacobian-dim", type=int, default=2048,
                   help="skip jacobian (O(M D^3) time, (4L+1) M D^2 numbers of memory per step) above this width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench.csv", help="CSV file to write ('-' for none)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: dims {QUICK['dims']}, batches {QUICK['batches']}, {QUICK['repeats']} rounds")
    return p


def _set_threads(n: int) -> object:
    """Limit torch and the BLAS of NumPy to ``n`` threads; returns the threadpoolctl limiter to keep alive."""
    if n < 1:
        raise SystemExit(f"--threads must be positive, got {n}")
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        print("note: threadpoolctl is not installed, NumPy's BLAS keeps its own thread count", file=sys.stderr)
        return None
    return threadpool_limits(limits=n, user_api="blas")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.dims, args.batches = QUICK["dims"], QUICK["batches"]
        args.repeats, args.warmup, args.budget = QUICK["repeats"], QUICK["warmup"], QUICK["budget"]
    if args.repeats < 1 or args.min_repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats and --min-repeats must be >= 1 and --warmup >= 0")
    limiter = _set_threads(args.threads) if args.threads is not None else None  # noqa: F841 (kept alive)
    for device in args.devices:
        try:
            select_device(device)  # a CUDA request without a GPU stops here, with the reason
        except DeviceError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    start = time.perf_counter()
    rows = run_benchmark(
        backends=args.backends, methods=args.methods, devices=args.devices, dtype=args.dtype, dims=args.dims,
        batches=args.batches, layers=args.layers, max_cubic_dim=args.max_cubic_dim,
        max_jacobian_dim=args.max_jacobian_dim, warmup=args.warmup,
        repeats=args.repeats, min_repeats=args.min_repeats, budget_s=args.budget, seed=args.seed,
    )
    print()
    print("Full step (gradient + Adam), median over rounds; x/rel = time of x / time of relative:")
    print(format_ratio_table(rows, "step_ms"))
    print()
    print("Gradient only (forward + backward):")
    print(format_ratio_table(rows, "grad_ms"))
    fitted = slopes(rows)
    if fitted:
        print()
        print("Fitted log-log slopes of the step time against D:")
        for s in fitted:
            print(f"  {s['backend']:<6} {s['device']:<5} L={s['n_layers']} M={s['batch']:<5} {s['method']:<9} "
                  f"D {s['dims']:<11} slope {s['slope']:.2f}")
    if args.out != "-":
        print(f"\nwrote {write_csv(rows, args.out)} ({len(rows)} rows) in {time.perf_counter() - start:.1f} s")
    return 0
