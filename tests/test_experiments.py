"""``python -m relgrad.experiments``: the CLI, the quick smoke runs (digits and an IDX folder), the time cap,
and the committed results under relgrad/results/."""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from relgrad import experiments  # noqa: E402

SUMMARY_KEYS = {
    "command", "dataset", "dim", "levels", "sizes", "hyperparameters", "machine", "date", "wall_seconds",
    "train_seconds", "steps", "stopped_by", "cut_by_time_cap", "epochs_completed", "partial_last_epoch",
    "best_epoch", "best_val_logit_nats", "best_val_bpd", "test",
}
TEST_KEYS = {"logit_nats", "logit_nats_2se", "pixel_nats", "pixel_nats_2se", "bpd", "bpd_2se"}
MACHINE_KEYS = {"platform", "cpu_count", "torch", "device", "device_name"}


def _write_idx(path: Path, arr: np.ndarray) -> None:
    """An IDX file of uint8 data (type code 0x08), gzipped, as MNIST ships it."""
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


def _check_outputs(csv_path: Path, *, dataset: str, dim: int) -> dict:
    summary = json.loads(csv_path.with_suffix(".json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert TEST_KEYS <= set(summary["test"])
    assert MACHINE_KEYS <= set(summary["machine"])
    assert summary["dataset"] == dataset and summary["dim"] == dim
    assert summary["command"].startswith("python -m relgrad.experiments")
    for key in ("logit_nats", "pixel_nats", "bpd", "logit_nats_2se", "bpd_2se"):
        assert math.isfinite(summary["test"][key]), key
    # bits/dim and pixel nats are two views of one number.
    assert summary["test"]["bpd"] == pytest.approx(-summary["test"]["pixel_nats"] / (dim * math.log(2)))
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == experiments.HISTORY_FIELDS
    assert rows[0]["epoch"] == "0" and len(rows) >= 2  # the initial model, then at least one epoch
    for row in rows:
        assert math.isfinite(float(row["val_logit_nats"])) and math.isfinite(float(row["val_bpd"]))
    return summary


def test_help_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "relgrad.experiments", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for flag in ("--dataset", "--max-minutes", "--method", "--quick", "--batch-size", "--download", "--resume",
                 "--checkpoint"):
        assert flag in out.stdout


def test_quick_digits(tmp_path, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    out = tmp_path / "digits.csv"
    summary = experiments.main(["--quick", "--dataset", "digits", "--out", str(out), "--quiet",
                                "--device", "cpu", "--samples", "3", "--threads", "1"])
    s = _check_outputs(out, dataset="digits", dim=64)
    assert s == summary
    assert s["sizes"] == dict(zip(("train", "val", "test"), experiments.QUICK_SIZES))
    assert s["stopped_by"] == "epochs" and s["epochs_completed"] == 1 and not s["cut_by_time_cap"]
    samples = np.load(tmp_path / "digits_samples.npy")
    assert samples.shape == (3, 8, 8) and samples.max() <= 16


def test_time_cap_stops_cleanly(tmp_path, monkeypatch):
    """A tiny cap stops after the first step, records a partial epoch and still evaluates the test set."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    out = tmp_path / "capped.csv"
    experiments.main(["--quick", "--dataset", "digits", "--out", str(out), "--quiet", "--device", "cpu",
                      "--max-minutes", "1e-9", "--epochs", "5"])
    s = _check_outputs(out, dataset="digits", dim=64)
    assert s["stopped_by"] == "time_cap" and s["cut_by_time_cap"]
    assert s["partial_last_epoch"] and s["epochs_completed"] == 0 and s["steps"] == 1


def test_whiten_reports_likelihoods_of_the_original_logit_space_data(tmp_path, monkeypatch):
    """--whiten: the flow sees whitened data; the reported test number is exact for the unwhitened data."""
    import torch

    from relgrad import datasets
    from relgrad.torch import load_checkpoint

    monkeypatch.setenv("TQDM_DISABLE", "1")
    out, ckpt = tmp_path / "white.csv", tmp_path / "white.pt"
    s = experiments.main(["--quick", "--dataset", "digits", "--out", str(out), "--quiet", "--device", "cpu",
                          "--whiten", "--checkpoint", str(ckpt), "--dtype", "float64", "--samples", "2"])
    _check_outputs(out, dataset="digits", dim=64)
    assert s["hyperparameters"]["whiten"] is True
    # rebuild the run's data exactly as the script does (seed 0: data seed = first spawned child)
    split = datasets.load_dataset("digits", rng=np.random.default_rng(np.random.SeedSequence(0).spawn(3)[0]),
                                  sizes=experiments.QUICK_SIZES, lam=1e-6)
    white, wh = datasets.whiten(split)
    assert s["whitening_log_abs_det"] == pytest.approx(wh.log_abs_det, rel=1e-12)
    model = load_checkpoint(None, ckpt).to("cpu")
    with torch.no_grad():
        ll = model.log_likelihood(torch.as_tensor(white.test)).numpy() + wh.log_abs_det
    expected = datasets.image_likelihood_summary(ll, split.test, lam=1e-6, levels=17)
    assert s["test"]["logit_nats"] == pytest.approx(expected["logit_nats"], rel=1e-10)
    assert s["test"]["bpd"] == pytest.approx(expected["bpd"], rel=1e-10)
    assert np.load(tmp_path / "white_samples.npy").shape == (2, 8, 8)


@pytest.mark.parametrize("kind", ["centre", "scale"])
def test_preprocess_halves_report_likelihoods_of_the_original_logit_space_data(tmp_path, monkeypatch, kind):
    """--preprocess centre / scale: the flow sees x - mean or x / std (training statistics, written out here by
    hand); the reported test number is exact for the unmapped data (scale adds -sum log std, centre 0)."""
    import torch

    from relgrad import datasets
    from relgrad.torch import load_checkpoint

    monkeypatch.setenv("TQDM_DISABLE", "1")
    out, ckpt = tmp_path / f"{kind}.csv", tmp_path / f"{kind}.pt"
    s = experiments.main(["--quick", "--dataset", "digits", "--out", str(out), "--quiet", "--device", "cpu",
                          "--preprocess", kind, "--checkpoint", str(ckpt), "--dtype", "float64"])
    _check_outputs(out, dataset="digits", dim=64)
    assert s["hyperparameters"]["preprocess"] == kind and s["hyperparameters"]["whiten"] is False
    split = datasets.load_dataset("digits", rng=np.random.default_rng(np.random.SeedSequence(0).spawn(3)[0]),
                                  sizes=experiments.QUICK_SIZES, lam=1e-6)
    mean, std = split.train.mean(axis=0), split.train.std(axis=0)
    if kind == "centre":
        z, log_det = split.test - mean, 0.0
    else:
        z, log_det = split.test / std, -np.log(std).sum()
    assert s["whitening_log_abs_det"] == pytest.approx(log_det, abs=1e-12)
    model = load_checkpoint(None, ckpt).to("cpu")
    with torch.no_grad():
        ll = model.log_likelihood(torch.as_tensor(z)).numpy() + log_det
    expected = datasets.image_likelihood_summary(ll, split.test, lam=1e-6, levels=17)
    assert s["test"]["logit_nats"] == pytest.approx(expected["logit_nats"], rel=1e-10)


def test_whiten_and_another_preprocess_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="two different maps"):
        experiments.main(["--quick", "--dataset", "digits", "--out", str(tmp_path / "x.csv"), "--quiet",
                          "--whiten", "--preprocess", "centre"])


def test_relative_optimisers_refuse_a_method_they_would_ignore(tmp_path):
    with pytest.raises(SystemExit, match="would ignore --method mixed: use --method relative"):
        experiments.main(["--quick", "--dataset", "digits", "--out", str(tmp_path / "x.csv"), "--quiet",
                          "--method", "mixed", "--optimizer", "relative-adam"])


def test_quick_digits_mixed_rule(tmp_path, monkeypatch):
    """--method mixed trains (relative on W, ordinary on b), records its method, and is not the strict rule:
    the same seed with --method relative ends elsewhere."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    runs = {m: experiments.main(["--quick", "--dataset", "digits", "--out", str(tmp_path / f"{m}.csv"), "--quiet",
                                 "--device", "cpu", "--threads", "1", "--method", m, "--dtype", "float64"])
            for m in ("mixed", "relative")}
    assert runs["mixed"]["hyperparameters"]["method"] == "mixed" and math.isfinite(runs["mixed"]["test"]["logit_nats"])
    assert abs(runs["mixed"]["test"]["logit_nats"] - runs["relative"]["test"]["logit_nats"]) > 1e-6


def test_quick_idx_folder(tmp_path, monkeypatch):
    """The IDX path, offline: a tiny Fashion-MNIST-like folder of random 28 x 28 images."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    rng = np.random.default_rng(0)
    data = tmp_path / "fmnist"
    data.mkdir()
    _write_idx(data / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (310, 28, 28)))
    _write_idx(data / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (100, 28, 28)))
    out = tmp_path / "fm.csv"
    experiments.main(["--quick", "--dataset", "fashion-mnist", "--data-dir", str(data), "--out", str(out),
                      "--quiet", "--device", "cpu", "--method", "authors"])
    s = _check_outputs(out, dataset="fashion-mnist", dim=784)
    assert s["levels"] == 256 and s["hyperparameters"]["method"] == "authors"
    assert s["data_dir"] == str(data)


@pytest.mark.parametrize("path", sorted(experiments.results_dir().glob("*.json")), ids=lambda p: p.stem)
def test_committed_results_are_complete(path):
    """Every committed run has its CSV and a JSON the book can read (test numbers finite, cap stated)."""
    result = experiments.load_result(path.stem)
    s, h = result["summary"], result["history"]
    assert SUMMARY_KEYS <= set(s) and TEST_KEYS <= set(s["test"])
    assert math.isfinite(s["test"]["logit_nats"]) and math.isfinite(s["test"]["bpd"])
    assert s["epochs_completed"] == int(np.sum(h["partial"][1:] == 0))
    assert h["epoch"][0] == 0 and np.all(np.isfinite(h["val_logit_nats"]))


def _rows(path: Path) -> list:
    with open(path, newline="") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def test_resume_continues_a_run_as_if_uninterrupted(tmp_path, monkeypatch):
    """--resume: 1 epoch, then resumed to 3 epochs, gives the CSV of a straight 3-epoch run (all but seconds)
    and the same test numbers; the checkpoint file is also the best model."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    common = ["--dataset", "digits", "--train-size", "200", "--val-size", "100", "--test-size", "100",
              "--quiet", "--device", "cpu", "--threads", "1", "--batch-size", "20", "--lr", "1e-3"]
    straight = experiments.main([*common, "--epochs", "3", "--out", str(tmp_path / "straight.csv")])
    out = tmp_path / "resumed.csv"
    first = experiments.main([*common, "--epochs", "1", "--out", str(out), "--resume"])
    assert first["checkpoint"] == str(tmp_path / "resumed.pt") and first["resumed_at_epoch"] is None
    assert len(_rows(out)) == 2
    resumed = experiments.main([*common, "--epochs", "3", "--out", str(out), "--resume"])
    assert resumed["resumed_at_epoch"] == 2
    assert _rows(out) == _rows(tmp_path / "straight.csv") and len(_rows(out)) == 4
    for key in ("steps", "stopped_by", "epochs_completed", "best_epoch", "best_val_logit_nats", "test"):
        assert resumed[key] == straight[key], key
    _check_outputs(out, dataset="digits", dim=64)
    # the run improved on the initial model, so the equality is not that of untrained models
    assert max(float(r["val_logit_nats"]) for r in _rows(out)[1:]) > float(_rows(out)[0]["val_logit_nats"])
    from relgrad.torch import load_checkpoint

    assert load_checkpoint(None, tmp_path / "resumed.pt", device="cpu").dim == 64


def test_divergence_at_the_initial_evaluation_is_recorded(tmp_path, monkeypatch):
    """L7: a failed evaluation of the untrained model is a recorded divergence, not an escaping exception."""
    import relgrad.torch.train as T

    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setattr(T, "mean_log_likelihood", lambda model, x: float("nan"))
    out = tmp_path / "diverged.csv"
    s = experiments.main(["--quick", "--dataset", "digits", "--out", str(out), "--quiet", "--device", "cpu"])
    assert s["stopped_by"] == "diverged" and "epoch 0" in s["error"] and s["steps"] == 0
    assert s["epochs_completed"] == 0 and not s["partial_last_epoch"] and s["best_epoch"] == -1
    assert math.isfinite(s["test"]["logit_nats"])  # the initial model itself is fine: only its validation "failed"
    assert json.loads(out.with_suffix(".json").read_text())["stopped_by"] == "diverged"
    with open(out, newline="") as handle:
        assert next(csv.reader(handle)) == list(experiments.HISTORY_FIELDS)


@pytest.mark.parametrize("optimizer", [[], ["--optimizer", "relative-adam", "--max-lie-norm", "0.1"]],
                         ids=["adam", "relative-adam"])
def test_distributed_under_torchrun_equals_one_process(tmp_path, monkeypatch, optimizer):
    """`torchrun --nproc_per_node 2 -m relgrad.experiments --distributed` (gloo, CPU, float64), one epoch on the
    digits with a global batch of 20, writes the CSV and JSON of the single-process run with --batch-size 20.
    The 1197 training digits leave a last global batch of 17 rows, shared 8/9 between the two processes.
    With Adam, and with RelativeAdam (its statistics averaged over the two processes)."""
    import json
    import socket

    monkeypatch.setenv("TQDM_DISABLE", "1")
    common = ["--dataset", "digits", "--epochs", "1", "--batch-size", "20", "--lr", "1e-3", "--dtype", "float64",
              "--device", "cpu", "--threads", "1", "--quiet", *optimizer]
    single = experiments.main([*common, "--out", str(tmp_path / "single.csv")])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    out = tmp_path / "ddp.csv"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port), "-m", "relgrad.experiments", "--distributed",
                           *common, "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = json.loads(out.with_suffix(".json").read_text())
    assert ddp["processes"] == 2 and ddp["distributed_backend"] == "gloo" and single["processes"] == 1
    assert ddp["command"].startswith("torchrun --nproc_per_node 2 -m relgrad.experiments --distributed")
    assert ddp["steps"] == single["steps"] == 60 and ddp["epochs_completed"] == 1
    a, b = _rows(out), _rows(tmp_path / "single.csv")
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        for key in ("epoch", "steps", "train_loss", "val_logit_nats", "val_bpd", "partial", "best"):
            x, y = float(ra[key]), float(rb[key])   # (the initial row has no training loss: NaN in both)
            assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-9, abs=2e-6), key  # 6 decimals
    assert float(a[1]["val_logit_nats"]) > float(a[0]["val_logit_nats"]) + 1.0   # it trained
    for key in ("logit_nats", "pixel_nats", "bpd"):
        assert ddp["test"][key] == pytest.approx(single["test"][key], rel=1e-10), key


def test_distributed_outside_torchrun_says_how_to_start_it(tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit, match="torchrun --nproc_per_node 2 -m relgrad.experiments --distributed"):
        experiments.main(["--quick", "--dataset", "digits", "--distributed", "--device", "cpu",
                          "--out", str(tmp_path / "x.csv")])


def test_relative_adam_with_diagnostics_resumes_as_if_uninterrupted(tmp_path, monkeypatch):
    """--optimizer relative-adam --warmup-epochs --diagnostics: the extra columns are logged per epoch, and a
    resumed run gives the same CSV (diagnostics included, all but the seconds) as a straight one."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    common = ["--dataset", "digits", "--train-size", "200", "--val-size", "100", "--test-size", "100",
              "--quiet", "--device", "cpu", "--threads", "1", "--batch-size", "20", "--lr", "1e-3",
              "--optimizer", "relative-adam", "--warmup-epochs", "0.5", "--diagnostics",
              "--alpha", "0.3"]
    straight = experiments.main([*common, "--epochs", "3", "--out", str(tmp_path / "straight.csv")])
    out = tmp_path / "resumed.csv"
    experiments.main([*common, "--epochs", "1", "--out", str(out), "--resume"])
    experiments.main([*common, "--epochs", "3", "--out", str(out), "--resume"])
    rows = _rows(out)
    assert rows == _rows(tmp_path / "straight.csv") and len(rows) == 4
    for k in ("bias_norm_1", "cond_2", "skew_ratio_1", "cos_descent"):
        assert all(math.isfinite(float(r[k])) for r in rows), k
    assert float(rows[-1]["cond_1"]) >= 1.0 and float(rows[-1]["bias_norm_1"]) > 0
    assert straight["hyperparameters"]["optimizer"].startswith("RelativeAdam")
    h = experiments.read_history(out)
    assert h["cos_descent"].shape == (4,)


def test_diagnostics_do_not_change_the_run(tmp_path, monkeypatch):
    """The probe step works on copies: a run with --diagnostics has the history of the same run without."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    common = ["--dataset", "digits", "--train-size", "200", "--val-size", "100", "--test-size", "100",
              "--quiet", "--device", "cpu", "--threads", "1", "--batch-size", "20", "--lr", "1e-3", "--epochs", "3"]
    for opt in ("adam", "relative-adam"):
        plain = experiments.main([*common, "--optimizer", opt, "--out", str(tmp_path / f"{opt}_plain.csv")])
        probed = experiments.main([*common, "--optimizer", opt, "--diagnostics", "--out", str(tmp_path / f"{opt}_d.csv")])
        a, b = _rows(tmp_path / f"{opt}_plain.csv"), _rows(tmp_path / f"{opt}_d.csv")
        assert [{k: r[k] for k in a[0]} for r in b] == a, opt
        assert plain["test"] == probed["test"], opt


def test_load_result_names_with_a_dot_and_subfolders():
    """Run names such as ``..._t0.1_s0`` contain a dot: load_result appends the extension instead of replacing
    the "suffix" after it (which would look for ``..._t0.json``)."""
    name = "optimizers/digits_relative_relative-adam_lr0.01_t0.1_s0"
    result = experiments.load_result(name)
    with open(experiments.results_dir() / f"{name}.json") as handle:
        assert result["summary"] == json.load(handle)
    assert len(result["history"]["epoch"]) > 1
    with pytest.raises(FileNotFoundError, match="no committed run 'optimizers/nope_t0.1'"):
        experiments.load_result("optimizers/nope_t0.1")
