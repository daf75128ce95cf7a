"""The optimiser study's runs (issue #14): named grids of ``python -m relgrad.experiments`` runs, resumable.

    python tools/optimizer_runs.py run GRID [--only SUBSTRING] [--threads 1]
    python tools/optimizer_runs.py summary          # rewrite relgrad/results/optimizers/summary.csv
    python tools/optimizer_runs.py list GRID

Each run writes ``relgrad/results/optimizers/NAME.csv`` (rewritten every epoch) and ``NAME.json`` (command,
machine, date) through :mod:`relgrad.experiments`, with a training checkpoint in ``_build/optimizer_ckpt/``
so that a killed grid restarts where it stopped (``--resume``; a finished run, one with its JSON, is
skipped).  Runs of a grid go one after another in one process; start two grids side by side on two cores
only with ``--threads 1`` each (then each run has one core, and wall-clock times stay comparable).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "relgrad" / "results" / "optimizers"
CKPT = ROOT / "_build" / "optimizer_ckpt"

SUMMARY_FIELDS = ("dataset", "D", "method", "optimizer", "lr", "batch", "seed", "epochs", "steps", "wall_s",
                  "best_epoch", "test_logit_nats", "test_bpd", "schedule", "max_lie_norm", "preprocess", "warmup_epochs", "stopped_by", "name")

# the common model: the book's tuned setting (2 layers, alpha 0.3, lam 1e-6), batch 100
BASE = ["--layers", "2", "--alpha", "0.3", "--lam", "1e-6", "--batch-size", "100", "--diagnostics"]


def _cell(dataset: str, method: str, optimizer: str, lr: float, seed: int, epochs: int, *, extra: List[str] = (),
          tag: str = "") -> Dict[str, object]:
    short = {"digits": "digits", "fashion-mnist-14": "fm14", "fashion-mnist": "fm"}[dataset]
    name = f"{short}_{method}_{optimizer}_lr{lr:g}{('_' + tag) if tag else ''}_s{seed}"
    base = list(BASE)
    if "--batch-size" in extra:  # the cell's own batch size replaces the common one (one flag in the command)
        i = base.index("--batch-size")
        del base[i:i + 2]
    args = ["--dataset", dataset, "--method", method, "--optimizer", optimizer, "--lr", f"{lr:g}",
            "--seed", str(seed), "--epochs", str(epochs), "--patience", "0", *base, *extra]
    return {"name": name, "args": args}


def _comparison(dataset: str, lr: float, trust_lr: float, epochs: int, seeds: tuple) -> List[Dict[str, object]]:
    """Per seed: autodiff + Adam, relative + Adam and relative + RelativeAdam at ``lr``; RelativeAdam and
    RelativeSGD at ``trust_lr`` with the trust region ``--max-lie-norm 0.1``."""
    trust = ["--max-lie-norm", "0.1"]
    return [c for s in seeds for c in (
        _cell(dataset, "autodiff", "adam", lr, s, epochs),
        _cell(dataset, "relative", "adam", lr, s, epochs),
        _cell(dataset, "relative", "relative-adam", lr, s, epochs),
        _cell(dataset, "relative", "relative-adam", trust_lr, s, epochs, extra=trust, tag="t0.1"),
        _cell(dataset, "relative", "relative-sgd", trust_lr, s, epochs, extra=trust, tag="t0.1"),
    )]


def _ablations(dataset: str, epochs: int, seeds: tuple) -> List[Dict[str, object]]:
    """One factor at a time, autodiff and relative with Adam at lr 1e-3 unless the factor is the schedule: the
    data's mean vs its scale (centre / scale / standardise / whiten, against no preprocessing in the base
    grid), a cosine decay to 1e-5, the Self Normalizing Flows setting (lr 1e-4, 10-epoch linear warm-up) and
    Adam with the authors' JAX step count."""
    return [
        _cell(dataset, m, "adam", lr, s, epochs, extra=extra, tag=tag)
        for s in seeds
        for m in ("autodiff", "relative")
        for (lr, extra, tag) in (
            *((1e-3, ["--preprocess", k], k) for k in ("centre", "scale", "standardise", "whiten")),
            (1e-3, ["--schedule", "cosine", "--final-lr", "1e-5"], "cosine"),
            (1e-4, ["--warmup-epochs", "10"], "snf"),
            (1e-4, ["--schedule", "jax-adam"], "jax"),
        )
    ]


def grids() -> Dict[str, List[Dict[str, object]]]:
    g: Dict[str, List[Dict[str, object]]] = {}
    seeds = (0, 1, 2)
    # digits: every optimiser at a small lr grid (cheap: seconds per run)
    g["digits"] = [
        _cell("digits", m, o, lr, s, 300)
        for s in seeds
        for (m, o, lrs) in (("autodiff", "adam", (1e-3, 1e-4)), ("relative", "adam", (1e-3, 1e-4)),
                            ("relative", "relative-adam", (1e-3, 3e-4, 1e-4)),
                            ("relative", "relative-sgd", (1e-2, 3e-3, 1e-3)))
        for lr in lrs
    ]
    # digits, second round: larger steps, with the Lie-norm trust region for the relative-* optimisers
    g["digits2"] = _comparison("digits", 3e-3, 1e-2, 300, seeds)
    # digits, one factor at a time (see _ablations)
    g["digits-ablations"] = _ablations("digits", 300, seeds)
    # the mixed rule (relative on W, ordinary on b: the bias-coupling hypothesis) with Adam, as in "digits"
    g["digits-mixed"] = [_cell("digits", "mixed", "adam", lr, s, 300) for s in seeds for lr in (1e-3, 1e-4)]
    # learning rate x batch size: batches 20 and 500 at the three lr of the base grids (batch 100 is there)
    g["digits-lr-batch"] = [
        _cell("digits", m, "adam", lr, s, 300, extra=["--batch-size", str(bs)], tag=f"b{bs}")
        for s in seeds for m in ("autodiff", "relative") for lr in (1e-4, 1e-3, 3e-3) for bs in (20, 500)
    ]
    # Fashion-MNIST at 14 x 14 (D = 196): 500 steps per epoch, 40 epochs
    g["fm14"] = _comparison("fashion-mnist-14", 1e-3, 3e-3, 40, seeds)
    # the same one-factor-at-a-time ablations at D = 196 (compared at equal epochs)
    g["fm14-ablations"] = _ablations("fashion-mnist-14", 40, seeds)
    g["fm14-mixed"] = [_cell("fashion-mnist-14", "mixed", "adam", 1e-3, s, 40) for s in seeds]
    # the step budget at D = 196: a larger learning rate, and a smaller batch (5 times the steps per epoch)
    g["fm14-budget"] = [
        _cell("fashion-mnist-14", m, "adam", lr, s, 40, extra=extra, tag=tag)
        for s in seeds for m in ("autodiff", "relative")
        for (lr, extra, tag) in ((3e-3, [], ""), (1e-3, ["--batch-size", "20"], "b20"))
    ]
    # Fashion-MNIST at full size (D = 784): 2 seeds x the three settings that matter at D = 196, 30 epochs
    g["fm"] = [_cell("fashion-mnist", m, o, 1e-3, s, 30)
               for s in (0, 1)
               for (m, o) in (("autodiff", "adam"), ("relative", "adam"), ("relative", "relative-adam"))]
    # RelativeAdam diverged at D = 784 within one epoch (second layer nearly singular): the same with the
    # trust region max_lie_norm 0.1
    g["fm"] += [_cell("fashion-mnist", "relative", "relative-adam", 1e-3, s, 30, extra=["--max-lie-norm", "0.1"],
                      tag="t0.1") for s in (0, 1)]
    # the mixed rule at full size (equal epochs against the fm grid's runs of the same seed)
    g["fm-mixed"] = [_cell("fashion-mnist", "mixed", "adam", 1e-3, s, 30) for s in (0, 1)]
    # a ten times smaller learning rate at full size (the step budget; relative + Adam does not stall there)
    g["fm-lr"] = [_cell("fashion-mnist", m, "adam", 1e-4, s, 30)
                  for s in (0, 1) for m in ("relative", "mixed", "autodiff")]
    # longer runs at full size, seeds 0 and 1, 100 epochs: does the lead at equal epochs last, and does any run
    # pass the Gaussian? (lane "a": the two relative runs, lane "b": autodiff, so that two lanes can share the cores)
    g["fm-long-a"] = [c for s in (0, 1) for c in (
        _cell("fashion-mnist", "relative", "relative-adam", 1e-3, s, 100, extra=["--max-lie-norm", "0.1"],
              tag="t0.1_e100"),
        _cell("fashion-mnist", "relative", "adam", 1e-4, s, 100, tag="e100"))]
    g["fm-long-b"] = [_cell("fashion-mnist", "autodiff", "adam", 1e-3, s, 100, tag="e100") for s in (0, 1)]
    return g


def run_grid(name: str, only: str, threads: int) -> None:
    sys.path.insert(0, str(ROOT))
    from relgrad import experiments

    OUT.mkdir(parents=True, exist_ok=True)
    CKPT.mkdir(parents=True, exist_ok=True)
    for cell in grids()[name]:
        if only and only not in cell["name"]:
            continue
        out = OUT / f"{cell['name']}.csv"
        if out.with_suffix(".json").exists():
            continue
        argv = [*cell["args"], "--out", str(out.relative_to(ROOT)), "--resume",
                "--checkpoint", str((CKPT / f"{cell['name']}.pt").relative_to(ROOT)), "--threads", str(threads),
                "--quiet"]
        print("run", cell["name"], flush=True)
        experiments.main(argv)
        summary()


def summary() -> Path:
    rows = []
    for js in sorted(OUT.glob("*.json")):
        s = json.loads(js.read_text())
        h = s["hyperparameters"]
        opt = {"Adam": "adam", "RelativeAdam": "relative-adam", "RelativeSGD": "relative-sgd"}[h["optimizer"].split(" ")[0]]
        rows.append({
            "dataset": s["dataset"], "D": s["dim"], "method": h["method"], "optimizer": opt, "lr": h["lr"],
            "batch": h["batch_size"], "seed": h["seed"], "epochs": s["epochs_completed"], "steps": s["steps"],
            "wall_s": s["train_seconds"], "best_epoch": s["best_epoch"], "test_logit_nats": s["test"]["logit_nats"],
            "test_bpd": s["test"]["bpd"], "schedule": h.get("schedule", "constant"),
            "max_lie_norm": h.get("max_lie_norm"), "preprocess": h.get("preprocess", "none"),
            "warmup_epochs": h.get("warmup_epochs", 0.0), "stopped_by": s["stopped_by"], "name": js.stem,
        })
    path = OUT / "summary.csv"
    with open(path, "w", newline="") as handle:
        w = csv.DictWriter(handle, fieldnames=SUMMARY_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.4f}" if isinstance(r[k], float) and math.isfinite(r[k]) else r[k])
                        for k in SUMMARY_FIELDS})
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["run", "summary", "list"])
    p.add_argument("grid", nargs="?", default=None)
    p.add_argument("--only", default="")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    if a.what == "summary":
        print(summary())
    elif a.what == "list":
        for cell in grids()[a.grid]:
            print(cell["name"], " ".join(cell["args"]))
    else:
        run_grid(a.grid, a.only, a.threads)


if __name__ == "__main__":
    main()
