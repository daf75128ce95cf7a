"""Training checkpoints and resuming: a SIGKILLed run resumed is bit-identical to an uninterrupted one.

The torch twin is checked across processes (a child killed with SIGKILL in the middle of an epoch, a second
child resuming from the last checkpoint, a third running straight through), in float32 and float64 on the
CPU; both twins also in-process (resume after some epochs, and after a time cut in the middle of an epoch).
Damaged checkpoints give a CheckpointError naming the file, and a failed write keeps the previous checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import List

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import relgrad.numpy as rn  # noqa: E402
import relgrad.torch as rt  # noqa: E402
import relgrad.torch.train as torch_train  # noqa: E402
from relgrad.errors import CheckpointError  # noqa: E402
from relgrad.training import History  # noqa: E402

# ------------------------------------------------------------------------------------------- across processes
CHILD = textwrap.dedent(
    """
    import sys, time
    import torch
    import relgrad.torch.train as T
    from relgrad.torch import DenseFlow, fit

    mode, folder = sys.argv[1:3]
    dtypes = sys.argv[3:]
    torch.set_num_threads(1)
    BATCHES = 12                                          # 600 / 50 steps per epoch
    if mode == "killed":
        # Progress signal for the parent: in the middle of epoch 1 (after the checkpoint of epoch 0 was
        # written), write the marker file and wait there to be killed.
        real, calls = T.training_loss, [0]
        def training_loss(*args, **kwargs):
            calls[0] += 1
            if calls[0] == BATCHES + BATCHES // 2:
                open(f"{folder}/{dtypes[0]}_marker", "w").write("mid-epoch 1")
                time.sleep(300)
            return real(*args, **kwargs)
        T.training_loss = training_loss
    for dtype in dtypes:                                  # one process may run several dtypes, one after the other
        dt = getattr(torch, dtype)
        g = torch.Generator().manual_seed(0)
        mix = torch.randn(8, 8, generator=g, dtype=torch.float64) / 3
        x = torch.randn(700, 8, generator=g, dtype=torch.float64)
        x = torch.tanh(x @ mix) + 0.3 * x                 # a non-Gaussian cloud the flow can learn
        x = ((x - x.mean(0)) / x.std(0)).to(dt)
        xt, xv = x[:600], x[600:]
        model = DenseFlow(8, 2, generator=0, dtype=dt, device="cpu")
        ckpt = f"{folder}/{dtype}_{'straight' if mode == 'straight' else 'run'}.pt"
        hist = fit(model, xt, xv, epochs=4, batch_size=50, lr=3e-2, patience=None, generator=1, progress=False,
                   checkpoint_path=ckpt, resume=(mode == "resumed"))
        torch.save({"state": {k: v.clone() for k, v in model.state_dict().items()}, "history": hist.to_dict()},
                   f"{folder}/{dtype}_{mode}_out.pt")
    """
)


def _child(script: Path, mode: str, folder: Path, *dtypes: str) -> subprocess.Popen:
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), mode, str(folder), *dtypes],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> None:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{out}\n{err}"


def test_sigkilled_run_resumes_bit_identical(tmp_path: Path) -> None:
    """float32 and float64, CPU: kill -9 in the middle of epoch 1, resume in a new process, compare with a third.

    Four processes, each spending most of its few seconds importing torch: one killed run per dtype, then one
    process resuming both; meanwhile one process runs both dtypes straight through.
    """
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    t0 = time.perf_counter()
    dtypes = ("float32", "float64")
    straight = _child(script, "straight", tmp_path, *dtypes)
    killed = {dt: _child(script, "killed", tmp_path, dt) for dt in dtypes}
    deadline = time.monotonic() + 180
    while killed:
        for dt, proc in list(killed.items()):
            if not (tmp_path / f"{dt}_marker").exists():
                assert proc.poll() is None, proc.communicate()
                continue
            # the child is now inside a step of epoch 1, after writing the checkpoint of epoch 0
            ckpt = tmp_path / f"{dt}_run.pt"
            assert ckpt.exists()
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            assert proc.returncode == -signal.SIGKILL
            assert not (tmp_path / f"{dt}_killed_out.pt").exists()
            saved = torch.load(ckpt, weights_only=True)["training"]
            assert saved["loop"]["next_epoch"] == 1 and saved["runner"]["position"] == 0  # the state after epoch 0
            print(f"{dt}: killed after {time.perf_counter() - t0:.1f} s")
            del killed[dt]
        assert time.monotonic() < deadline, "a child never reached the middle of epoch 1"
        time.sleep(0.02)
    resumed = _child(script, "resumed", tmp_path, *dtypes)
    _finish(resumed)
    _finish(straight)
    print(f"all four children done after {time.perf_counter() - t0:.1f} s")

    for dt in dtypes:
        a = torch.load(tmp_path / f"{dt}_straight_out.pt", weights_only=True)
        b = torch.load(tmp_path / f"{dt}_resumed_out.pt", weights_only=True)
        assert a["state"].keys() == b["state"].keys()
        for key in a["state"]:
            assert torch.equal(a["state"][key], b["state"][key]), (dt, key)
        assert a["state"]["layers.0.weight"].dtype == getattr(torch, dt)
        ha, hb = History.from_dict(a["history"]), History.from_dict(b["history"])
        assert len(ha.val_log_likelihood) == 4 and ha.steps == 48
        assert ha.train_loss == hb.train_loss and ha.val_log_likelihood == hb.val_log_likelihood
        assert (ha.steps, ha.best_epoch, ha.best_val_log_likelihood) == (hb.steps, hb.best_epoch,
                                                                         hb.best_val_log_likelihood)
        assert [r.steps for r in ha.records] == [r.steps for r in hb.records]
        assert hb.resumed_at_epoch == 1 and ha.resumed_at_epoch is None
        # the run learned something, so the equality above is not that of two untouched models
        assert ha.val_log_likelihood[-1] > ha.val_log_likelihood[0]


# ------------------------------------------------------------------------------------------- in-process, torch
def _toy(dtype: torch.dtype = torch.float64, n: int = 500, dim: int = 3):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    x = torch.sinh(x) / 2 + x
    x = ((x - x.mean(0)) / x.std(0)).to(dtype)
    return x[: n - 100], x[n - 100:]


def _torch_run(tmp: Path, dtype: torch.dtype, **kwargs) -> tuple:
    xt, xv = _toy(dtype)
    model = rt.DenseFlow(3, 2, generator=0, dtype=dtype, device="cpu")
    options = dict(batch_size=40, lr=2e-2, patience=None, generator=7, progress=False)
    hist = rt.fit(model, xt, xv, **{**options, **kwargs})
    return model, hist


def _same_floats(a: List[float], b: List[float]) -> bool:
    """Equal lists of floats, NaN included (the train loss of an initial evaluation is NaN)."""
    return len(a) == len(b) and np.array_equal(np.array(a), np.array(b), equal_nan=True)


def _same_run(m1, h1: History, m2, h2: History) -> None:
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    assert _same_floats(h1.train_loss, h2.train_loss) and h1.val_log_likelihood == h2.val_log_likelihood
    assert (h1.steps, h1.best_epoch, h1.best_val_log_likelihood) == (h2.steps, h2.best_epoch, h2.best_val_log_likelihood)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_resume_after_some_epochs_matches_a_straight_run(tmp_path: Path, dtype: torch.dtype) -> None:
    straight = _torch_run(tmp_path, dtype, epochs=5)
    ckpt = tmp_path / "run.pt"
    first = _torch_run(tmp_path, dtype, epochs=2, checkpoint_path=ckpt)
    assert len(first[1].val_log_likelihood) == 2
    # the training checkpoint is also a model checkpoint: the best parameters so far
    best = rt.load_checkpoint(None, ckpt, device="cpu")
    assert torch.equal(best.log_likelihood(_toy(dtype)[1]), first[0].log_likelihood(_toy(dtype)[1]))
    resumed = _torch_run(tmp_path, dtype, epochs=5, checkpoint_path=ckpt, resume=True)
    _same_run(*straight, *resumed)
    assert resumed[1].resumed_at_epoch == 2
    # resuming a finished run does nothing more (and still returns the best model)
    again = _torch_run(tmp_path, dtype, epochs=5, checkpoint_path=ckpt, resume=True)
    _same_run(*straight, *again)


def test_resume_after_a_time_cut_inside_an_epoch(tmp_path: Path) -> None:
    """A checkpoint written at a time cut holds the position inside the epoch: the resumed run finishes it."""
    straight = _torch_run(tmp_path, torch.float64, epochs=3, evaluate_initial=True)
    ckpt = tmp_path / "cut.pt"
    cut = _torch_run(tmp_path, torch.float64, epochs=3, evaluate_initial=True, checkpoint_path=ckpt,
                     max_seconds=1e-9)
    h = cut[1]
    assert h.stopped_by == "time_cap" and h.steps == 1 and h.records[-1].partial and h.records[-1].epoch == 1
    saved = torch.load(ckpt, weights_only=True)["training"]
    assert saved["runner"]["position"] == 1 and saved["loop"]["next_epoch"] == 1
    assert len(saved["loop"]["history"]["records"]) == 1  # the partial evaluation is not part of the resumable state
    resumed = _torch_run(tmp_path, torch.float64, epochs=3, evaluate_initial=True, checkpoint_path=ckpt, resume=True)
    _same_run(*straight, *resumed)
    assert [r.epoch for r in resumed[1].records] == [0, 1, 2, 3] and not any(r.partial for r in resumed[1].records)


def test_resume_with_a_numpy_generator(tmp_path: Path) -> None:
    """generator=np.random.Generator shuffles as the NumPy twin does; its state is part of the checkpoint."""
    straight = _torch_run(tmp_path, torch.float64, epochs=3, generator=np.random.default_rng(4))
    ckpt = tmp_path / "np.pt"
    _torch_run(tmp_path, torch.float64, epochs=1, generator=np.random.default_rng(4), checkpoint_path=ckpt)
    resumed = _torch_run(tmp_path, torch.float64, epochs=3, generator=np.random.default_rng(4), checkpoint_path=ckpt,
                         resume=True)
    _same_run(*straight, *resumed)
    with pytest.raises(CheckpointError, match="same kind of generator"):
        _torch_run(tmp_path, torch.float64, epochs=3, generator=4, checkpoint_path=ckpt, resume=True)


def test_resume_restores_the_callers_global_generator(tmp_path: Path) -> None:
    """generator=None draws the shuffling seed from torch's global RNG; a resumed run leaves it where an
    uninterrupted run would, so code after fit sees the same random numbers."""
    ckpt = tmp_path / "g.pt"
    torch.manual_seed(11)
    _torch_run(tmp_path, torch.float64, epochs=3, generator=None)
    after_straight = torch.rand(3)
    torch.manual_seed(11)
    _torch_run(tmp_path, torch.float64, epochs=1, generator=None, checkpoint_path=ckpt)
    torch.manual_seed(12345)  # a fresh process would start from another global state
    _torch_run(tmp_path, torch.float64, epochs=3, generator=None, checkpoint_path=ckpt, resume=True)
    assert torch.equal(torch.rand(3), after_straight)


def test_resume_refuses_other_settings(tmp_path: Path) -> None:
    ckpt = tmp_path / "run.pt"
    _torch_run(tmp_path, torch.float64, epochs=1, checkpoint_path=ckpt)
    with pytest.raises(CheckpointError, match="batch_size=40.*batch_size=20"):
        _torch_run(tmp_path, torch.float64, epochs=2, checkpoint_path=ckpt, resume=True, batch_size=20)
    with pytest.raises(CheckpointError, match="method"):
        _torch_run(tmp_path, torch.float64, epochs=2, checkpoint_path=ckpt, resume=True, method="autodiff")
    xt, xv = _toy()
    with pytest.raises(CheckpointError, match="other training data"):
        rt.fit(rt.DenseFlow(3, 2, generator=0, dtype=torch.float64, device="cpu"), xt * 1.01, xv, batch_size=40,
               epochs=2, progress=False, checkpoint_path=ckpt, resume=True)
    model_only = tmp_path / "model.pt"
    rt.save_checkpoint(rt.DenseFlow(3, 2, generator=0, dtype=torch.float64, device="cpu"), model_only)
    with pytest.raises(CheckpointError, match="no training state"):
        _torch_run(tmp_path, torch.float64, epochs=2, checkpoint_path=model_only, resume=True)
    with pytest.raises(ValueError, match="checkpoint_path"):
        _torch_run(tmp_path, torch.float64, epochs=2, resume=True)


def test_resume_without_a_checkpoint_starts_a_new_run(tmp_path: Path) -> None:
    ckpt = tmp_path / "new.pt"
    straight = _torch_run(tmp_path, torch.float64, epochs=2)
    fresh = _torch_run(tmp_path, torch.float64, epochs=2, checkpoint_path=ckpt, resume=True)
    _same_run(*straight, *fresh)
    assert ckpt.exists() and fresh[1].resumed_at_epoch is None


# ------------------------------------------------------------------------------------------- damaged files
def test_truncated_torch_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    ckpt = tmp_path / "run.pt"
    _torch_run(tmp_path, torch.float64, epochs=1, checkpoint_path=ckpt)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"run\.pt.*truncated.*Delete it"):
        _torch_run(tmp_path, torch.float64, epochs=2, checkpoint_path=ckpt, resume=True)
    with pytest.raises(CheckpointError, match=r"run\.pt"):
        rt.load_checkpoint(None, ckpt, device="cpu")
    ckpt.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"run\.pt"):
        rt.load_checkpoint(None, ckpt, device="cpu")


def test_truncated_numpy_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    ckpt = tmp_path / "run.npz"
    xt, xv = (t.numpy() for t in _toy())
    rn.fit(rn.DenseFlow(3, 2, rng=0), xt, xv, epochs=1, batch_size=40, rng=1, progress=False, checkpoint_path=ckpt)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) - 200])
    with pytest.raises(CheckpointError, match=r"run\.npz.*damaged.*Delete it"):
        rn.fit(rn.DenseFlow(3, 2, rng=0), xt, xv, epochs=2, batch_size=40, rng=1, progress=False,
               checkpoint_path=ckpt, resume=True)
    with pytest.raises(CheckpointError, match=r"run\.npz"):
        rn.load_checkpoint(None, ckpt)


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint is replaced atomically: a write that dies half-way leaves the last good file intact."""
    ckpt = tmp_path / "run.pt"
    _torch_run(tmp_path, torch.float64, epochs=1, checkpoint_path=ckpt)
    good = ckpt.read_bytes()
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):  # writes part of the file, then the "disk fills up"
        real_save(obj, f, *args, **kwargs)
        f.truncate(100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch_train.torch, "save", dying_save)
    with pytest.raises(OSError, match="No space left"):
        _torch_run(tmp_path, torch.float64, epochs=3, checkpoint_path=ckpt, resume=True)
    monkeypatch.undo()
    assert ckpt.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]  # no temporary file left behind
    resumed = _torch_run(tmp_path, torch.float64, epochs=3, checkpoint_path=ckpt, resume=True)
    _same_run(*_torch_run(tmp_path, torch.float64, epochs=3), *resumed)


# ------------------------------------------------------------------------------------------- in-process, NumPy
def _numpy_run(**kwargs) -> tuple:
    xt, xv = (t.numpy() for t in _toy())
    model = rn.DenseFlow(3, 2, rng=0)
    hist = rn.fit(model, xt, xv, **{**dict(batch_size=40, lr=2e-2, patience=None, rng=5, progress=False), **kwargs})
    return model, hist


def _same_numpy_run(m1, h1: History, m2, h2: History) -> None:
    for p, q in zip(m1.parameters(), m2.parameters()):
        np.testing.assert_array_equal(p, q)
    assert _same_floats(h1.train_loss, h2.train_loss) and h1.val_log_likelihood == h2.val_log_likelihood
    assert (h1.steps, h1.best_epoch) == (h2.steps, h2.best_epoch)


def test_numpy_resume_matches_a_straight_run(tmp_path: Path) -> None:
    straight = _numpy_run(epochs=5)
    ckpt = tmp_path / "run.npz"
    _numpy_run(epochs=2, checkpoint_path=ckpt)
    with np.load(ckpt) as data:  # Adam's moments and step count are part of it
        assert data["adam_m_weights"].shape == (2, 3, 3) and np.any(data["adam_v_biases"] != 0)
    resumed = _numpy_run(epochs=5, checkpoint_path=ckpt, resume=True)
    _same_numpy_run(*straight, *resumed)
    # and the file reads as the best model
    best = rn.load_checkpoint(None, ckpt)
    np.testing.assert_array_equal(best.weights[0], resumed[0].weights[0])


def test_numpy_resume_after_a_time_cut(tmp_path: Path) -> None:
    straight = _numpy_run(epochs=2, evaluate_initial=True)
    ckpt = tmp_path / "cut.npz"
    cut = _numpy_run(epochs=2, evaluate_initial=True, checkpoint_path=ckpt, max_seconds=1e-9)
    assert cut[1].stopped_by == "time_cap" and cut[1].records[-1].partial and cut[1].steps == 1
    resumed = _numpy_run(epochs=2, evaluate_initial=True, checkpoint_path=ckpt, resume=True)
    _same_numpy_run(*straight, *resumed)


def test_numpy_resume_refuses_a_model_only_file(tmp_path: Path) -> None:
    path = rn.save_checkpoint(rn.DenseFlow(3, 2, rng=0), tmp_path / "model.npz")
    with pytest.raises(CheckpointError, match="no training state"):
        _numpy_run(epochs=2, checkpoint_path=path, resume=True)


# ------------------------------------------------------------------------------------------- load_checkpoint
def test_load_checkpoint_builds_on_the_given_device_without_touching_the_global_rng(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    model = rt.DenseFlow(4, 2, generator=3, dtype=torch.float64, device="cpu")
    rt.save_checkpoint(model, path)
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    loaded = rt.load_checkpoint(None, path, device="cpu")
    assert torch.equal(torch.rand(4), expected)  # the global generator did not move
    assert loaded.device.type == "cpu" and loaded.dtype == torch.float64
    for a, b in zip(model.parameters(), loaded.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="model=None"):
        rt.load_checkpoint(loaded, path, device="cpu")


def test_load_checkpoint_strips_a_ddp_module_prefix(tmp_path: Path) -> None:
    model = rt.DenseFlow(4, 2, generator=3, dtype=torch.float64, device="cpu")
    path = tmp_path / "ddp.pt"
    rt.save_checkpoint(model, path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"] = {"module." + k: v for k, v in ckpt["state_dict"].items()}  # as saved from a DDP wrapper
    torch.save(ckpt, path)
    loaded = rt.load_checkpoint(None, path, device="cpu")
    for a, b in zip(model.parameters(), loaded.parameters()):
        assert torch.equal(a, b)


def test_history_round_trips_through_a_dict() -> None:
    h = _torch_run(Path("."), torch.float64, epochs=2, evaluate_initial=True)[1]
    again = History.from_dict(h.to_dict())
    assert repr(again) == repr(h) and [r.initial for r in again.records] == [True, False, False]

