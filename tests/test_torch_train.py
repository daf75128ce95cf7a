"""relgrad.torch training loop: relative vs autodiff training, early stopping, divergence, seeding, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from relgrad.errors import CheckpointError, NonFiniteError, ShapeError, TrainingDivergedError
from relgrad.torch import DenseFlow, fit, load_checkpoint, save_checkpoint
from relgrad.torch.train import make_adam, mean_log_likelihood
from relgrad.training import validation_score
from relgrad.training import History

F64 = torch.float64


def gaussian_mixture(n: int, seed: int) -> np.ndarray:
    """A 2-D mixture of three anisotropic Gaussians (a non-Gaussian toy a 2-layer flow can fit)."""
    rng = np.random.default_rng(seed)
    centres = np.array([[-2.0, 0.0], [2.0, 1.0], [0.0, 3.0]])
    return centres[rng.integers(0, 3, n)] + rng.standard_normal((n, 2)) * np.array([0.4, 0.8])


@pytest.fixture(scope="module")
def toy() -> tuple:
    x = gaussian_mixture(3000, seed=0)
    x = (x - x.mean(axis=0)) / x.std(axis=0)  # standardised, as fit expects
    return torch.tensor(x[:2000]), torch.tensor(x[2000:])


def fresh(dtype: torch.dtype = F64, n_layers: int = 2, dim: int = 2) -> DenseFlow:
    return DenseFlow(dim, n_layers, generator=0, dtype=dtype, device="cpu")


def test_relative_and_autodiff_reach_the_same_likelihood(toy) -> None:
    xt, xv = toy
    results = {}
    for method in ("relative", "autodiff"):
        model = fresh()
        hist = fit(model, xt, xv, method=method, epochs=25, batch_size=100, lr=2e-2, patience=None,
                   generator=1, progress=False)
        with torch.no_grad():
            results[method] = (hist, model.log_likelihood(xv))
    (h_rel, ll_rel), (h_auto, ll_auto) = results["relative"], results["autodiff"]
    diff = ll_rel - ll_auto
    se = (diff.std() / math.sqrt(len(diff))).item()
    print(f"val LL: relative {h_rel.best_val_log_likelihood:.4f}, autodiff {h_auto.best_val_log_likelihood:.4f}, "
          f"difference {diff.mean().item():+.4f} (s.e. {se:.4f}); after epoch 0: {h_rel.val_log_likelihood[0]:.4f}")
    assert abs(h_rel.best_val_log_likelihood - h_auto.best_val_log_likelihood) < 0.05
    # both learned something: far better than the (volume-preserving) initial flow
    start = fresh().log_likelihood(xv).mean().item()
    assert h_rel.best_val_log_likelihood > start + 0.3 and h_auto.best_val_log_likelihood > start + 0.3
    # the restored parameters are the best epoch's
    assert ll_rel.mean().item() == pytest.approx(h_rel.best_val_log_likelihood, rel=1e-12)
    assert h_rel.best_val_log_likelihood == max(h_rel.val_log_likelihood)


def test_history_fields_and_early_stopping(toy) -> None:
    xt, xv = toy
    model = fresh()
    hist = fit(model, xt[:300], xv[:200], epochs=200, batch_size=50, lr=5e-2, patience=2, generator=3, progress=False)
    assert isinstance(hist, History) and hist.method == "relative"
    n = len(hist.val_log_likelihood)
    assert hist.stopped_early and n < 200 and n == len(hist.train_loss)
    assert hist.best_epoch == int(np.argmax(hist.val_log_likelihood)) and n - 1 - hist.best_epoch == 2
    assert hist.steps == n * 6 and hist.seconds > 0
    with torch.no_grad():
        assert model.log_likelihood(xv[:200]).mean().item() == pytest.approx(hist.best_val_log_likelihood, rel=1e-12)


def test_same_seed_gives_bitwise_identical_runs(toy) -> None:
    xt, xv = toy
    runs = []
    for _ in range(2):
        model = DenseFlow(2, 3, generator=5, dtype=torch.float32, device="cpu")
        hist = fit(model, xt[:500], xv[:200], epochs=3, batch_size=64, lr=1e-2, generator=torch.Generator().manual_seed(9),
                   progress=False)
        runs.append((hist, [p.detach().clone() for p in model.parameters()]))
    (h1, p1), (h2, p2) = runs
    assert h1.train_loss == h2.train_loss and h1.val_log_likelihood == h2.val_log_likelihood
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    # a different shuffling seed gives a different trajectory (so the check above can fail)
    model = DenseFlow(2, 3, generator=5, dtype=torch.float32, device="cpu")
    h3 = fit(model, xt[:500], xv[:200], epochs=3, batch_size=64, lr=1e-2, generator=10, progress=False)
    assert h3.train_loss != h1.train_loss


@pytest.mark.parametrize("method", ["relative", "ordinary"])
def test_divergence_raises(toy, method: str) -> None:
    xt, xv = toy
    with pytest.raises(TrainingDivergedError, match="epoch 0, step 2"):  # the first step overshoots
        fit(fresh(), xt, xv, method=method, epochs=5, lr=1e3, progress=False, generator=0)


def test_singular_weights_at_validation_are_divergence(toy) -> None:
    model = fresh()
    with torch.no_grad():
        model.weights[1][0] = float("nan")
    with pytest.raises(TrainingDivergedError, match="layer 2 of 2"):
        validation_score(lambda: mean_log_likelihood(model, toy[1]), epoch=4)


def test_fit_validates_its_input(toy) -> None:
    xt, xv = toy
    bad = xt.clone()
    bad[5, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="x_train"):
        fit(fresh(), bad, xv, epochs=1, progress=False)
    with pytest.raises(ShapeError, match="x_val"):
        fit(fresh(), xt, xv[:, :1], epochs=1, progress=False)
    with pytest.raises(ValueError, match="valid methods"):
        fit(fresh(), xt, xv, method="newton", epochs=1, progress=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adam_is_fused_on_cpu(dtype: torch.dtype) -> None:
    opt = make_adam(fresh(dtype).parameters(), lr=1e-3)
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["fused"] is True


def test_progress_and_log_every(toy, capsys) -> None:
    xt, xv = toy
    fit(fresh(), xt[:200], xv[:100], epochs=3, lr=1e-2, progress=False, log_every=2, generator=0)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch")]
    assert len(lines) == 2 and "val log-lik" in lines[0]  # epochs 0 and 2 (the last)


# --------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip(tmp_path: Path, toy) -> None:
    xt, xv = toy
    model = fresh()
    fit(model, xt[:500], xv[:200], epochs=3, lr=1e-2, progress=False, generator=0)
    path = tmp_path / "flow.pt"
    save_checkpoint(model, path)
    other = DenseFlow(2, 2, generator=123, dtype=F64, device="cpu")
    assert not torch.equal(other.log_likelihood(xv), model.log_likelihood(xv))
    assert load_checkpoint(other, path) is other
    assert torch.equal(other.log_likelihood(xv), model.log_likelihood(xv))
    rebuilt = load_checkpoint(None, path)
    assert rebuilt.dtype == F64 and rebuilt.dim == 2 and rebuilt.n_layers == 2 and rebuilt.alpha == model.alpha
    assert torch.equal(rebuilt.to("cpu").log_likelihood(xv), model.log_likelihood(xv))
    # loading into a float32 model keeps its dtype
    m32 = load_checkpoint(fresh(torch.float32), path)
    assert m32.dtype == torch.float32 and torch.allclose(m32.log_likelihood(xv).double(), model.log_likelihood(xv), rtol=1e-5)


def test_fit_writes_the_best_checkpoint(tmp_path: Path, toy) -> None:
    xt, xv = toy
    path = tmp_path / "best.pt"
    model = fresh()
    hist = fit(model, xt[:500], xv[:200], epochs=4, lr=1e-2, progress=False, generator=0, checkpoint_path=path)
    saved = load_checkpoint(None, path).to("cpu")
    assert saved.log_likelihood(xv[:200]).mean().item() == pytest.approx(hist.best_val_log_likelihood, rel=1e-12)


@pytest.mark.parametrize("other", [dict(dim=3), dict(n_layers=3), dict(alpha=0.1)])
def test_checkpoint_mismatch_names_it(tmp_path: Path, other: dict) -> None:
    path = tmp_path / "flow.pt"
    save_checkpoint(fresh(), path)
    kwargs = dict(dim=2, n_layers=2, alpha=0.3) | other
    target = DenseFlow(kwargs.pop("dim"), kwargs.pop("n_layers"), alpha=kwargs.pop("alpha"), device="cpu")
    name = next(iter(other))
    with pytest.raises(CheckpointError, match=name):
        load_checkpoint(target, path)


def test_malformed_checkpoint(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_checkpoint(None, junk)
    torch.save({"weights": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(fresh(), tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(fresh(), tmp_path / "missing.pt")
