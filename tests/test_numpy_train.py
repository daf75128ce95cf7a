"""relgrad.numpy training: Adam, the bias fixed points, fit (early stopping, determinism, divergence), checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from relgrad.errors import CheckpointError, NonFiniteError, ShapeError, TrainingDivergedError
from relgrad.numpy import Adam, DenseFlow, fit, gradients, load_checkpoint, save_checkpoint
from relgrad.training import History


def mixture(n: int, rng: np.random.Generator) -> np.ndarray:
    """A 2-D mixture of three Gaussians (generated inline: no data files)."""
    centers = np.array([[-2.0, 0.0], [2.0, 0.5], [0.0, 2.5]])
    return centers[rng.integers(0, 3, n)] + 0.4 * rng.standard_normal((n, 2))


@pytest.fixture(scope="module")
def data() -> tuple:
    rng = np.random.default_rng(0)
    return mixture(400, rng), mixture(200, rng)


# ------------------------------------------------------------------------------------------- Adam
def test_adam_first_step_is_lr_times_sign() -> None:
    """With bias correction, step 1 is lr * g / (|g| + eps'): the sign of g scaled by lr, whatever |g| is."""
    p = np.array([1.0, -2.0, 0.5])
    g = np.array([3.0, -1e-3, 1e3])
    opt = Adam([p], lr=0.1, eps=1e-8)
    opt.step([g])
    np.testing.assert_allclose(p, [1.0, -2.0, 0.5] - 0.1 * g / (np.abs(g) + 1e-8), rtol=1e-14)
    np.testing.assert_allclose(p, [0.9, -1.9, 0.4], rtol=1e-5)  # |g| >> eps: a step of lr in every coordinate


def test_adam_matches_torch_adam() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    params = [rng.standard_normal((3, 3)), rng.standard_normal(3)]
    tparams = [torch.tensor(p.copy(), requires_grad=True) for p in params]
    opt = Adam(params, lr=0.01, betas=(0.8, 0.99), eps=1e-6)
    topt = torch.optim.Adam(tparams, lr=0.01, betas=(0.8, 0.99), eps=1e-6)
    for _ in range(20):
        grads = [rng.standard_normal(p.shape) for p in params]
        for tp, g in zip(tparams, grads):
            tp.grad = torch.tensor(g)
        opt.step(grads)
        topt.step()
    for p, tp in zip(params, tparams):
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_adam_minimises_a_quadratic_and_validates() -> None:
    p = np.array([5.0, -3.0])
    opt = Adam([p], lr=0.1)
    for _ in range(2000):
        opt.step([2.0 * (p - np.array([1.0, 2.0]))])
    np.testing.assert_allclose(p, [1.0, 2.0], atol=1e-4)
    with pytest.raises(ValueError, match="expected 1 gradients"):
        opt.step([])
    with pytest.raises(ValueError, match="shape"):
        opt.step([np.zeros(3)])
    with pytest.raises(ValueError, match="lr"):
        Adam([p], lr=0.0)


# ------------------------------------------------------------------------------------------- the bias story
def affine_gaussian_fixed_point(method: str) -> tuple:
    """Full-batch gradient descent of a 1-layer (affine) flow on 2-D Gaussian data with mean (3, -2).

    Returns (model mean, model covariance, sample mean, sample covariance (1/N)).
    """
    rng = np.random.default_rng(1)
    x = rng.multivariate_normal([3.0, -2.0], [[1.0, 0.6], [0.6, 0.5]], size=500)
    model = DenseFlow(2, 1, rng=0)
    w, b = model.weights[0], model.biases[0]
    for _ in range(1000):  # lr 0.05: converged to machine precision (measured ~1e-15) in ~0.05 s
        (dw, db), = gradients(model, x, method)
        w -= 0.05 * dw
        b -= 0.05 * db
    return -np.linalg.solve(w, b), np.linalg.inv(w.T @ w), x.mean(0), np.cov(x.T, bias=True)


def test_relative_gradient_reaches_the_maximum_likelihood_gaussian() -> None:
    mean, cov, mu, sample_cov = affine_gaussian_fixed_point("relative")
    assert np.abs(mean - mu).max() <= 1e-3  # model mean = sample mean
    assert np.abs(cov - sample_cov).max() <= 1e-3  # model covariance = population covariance


def test_authors_rule_converges_to_half_the_mean() -> None:
    """Its fixed point has g_b = -b instead of g_b = 0: mean mu / 2, covariance inflated by mu mu^T / 4."""
    mean, cov, mu, sample_cov = affine_gaussian_fixed_point("authors")
    assert np.abs(mean - mu / 2).max() <= 1e-3
    assert np.abs(mean - mu).max() > 1.0
    assert np.abs(cov - (sample_cov + np.outer(mu, mu) / 4)).max() <= 1e-3


# ------------------------------------------------------------------------------------------- fit
def test_fit_improves_validation_log_likelihood(data: tuple) -> None:
    x_train, x_val = data
    model = DenseFlow(2, 3, rng=0)
    before = model.log_likelihood(x_val).mean()
    history = fit(model, x_train, x_val, epochs=15, batch_size=50, lr=1e-2, rng=1, progress=False)
    assert isinstance(history, History) and history.method == "relative"
    assert len(history.train_loss) == len(history.val_log_likelihood) == 15
    assert history.steps == 15 * 8 and history.seconds > 0
    assert history.best_val_log_likelihood > before + 1.0  # measured: -5.00 -> -3.44 nats
    # the model left behind is the best epoch's
    assert model.log_likelihood(x_val).mean() == history.best_val_log_likelihood
    assert history.best_epoch == int(np.argmax(history.val_log_likelihood))


@pytest.mark.parametrize("method", ["authors", "ordinary"])
def test_fit_other_methods_run(data: tuple, method: str) -> None:
    x_train, x_val = data
    model = DenseFlow(2, 2, rng=0)
    before = model.log_likelihood(x_val).mean()
    history = fit(model, x_train, x_val, method=method, epochs=5, batch_size=50, lr=1e-2, rng=1, progress=False)
    assert history.method == method and history.best_val_log_likelihood > before


def test_early_stopping_restores_the_best_epoch(data: tuple, tmp_path: Path) -> None:
    x_train, x_val = data
    x_val = 1.3 * x_val + 0.3  # a validation set from a wider, shifted distribution: it peaks early
    model = DenseFlow(2, 2, rng=0)
    ckpt = tmp_path / "best.npz"
    history = fit(
        model, x_train, x_val, epochs=40, batch_size=50, lr=1e-2, patience=3, rng=1, progress=False, checkpoint_path=ckpt
    )
    assert history.stopped_early
    assert 0 < history.best_epoch < len(history.val_log_likelihood) - 1  # measured: best epoch 2 of 6
    assert len(history.val_log_likelihood) == history.best_epoch + 1 + 3
    assert history.val_log_likelihood[-1] < history.best_val_log_likelihood
    assert model.log_likelihood(x_val).mean() == history.best_val_log_likelihood
    saved = load_checkpoint(None, ckpt)
    np.testing.assert_array_equal(saved.log_likelihood(x_val), model.log_likelihood(x_val))


def test_same_seed_gives_bit_identical_training(data: tuple) -> None:
    x_train, x_val = data
    runs = []
    for _ in range(2):
        model = DenseFlow(2, 2, rng=5)
        history = fit(model, x_train, x_val, epochs=4, batch_size=32, lr=1e-2, rng=7, progress=False)
        runs.append((model, history))
    (m1, h1), (m2, h2) = runs
    assert h1.train_loss == h2.train_loss and h1.val_log_likelihood == h2.val_log_likelihood
    for p, q in zip(m1.parameters(), m2.parameters()):
        np.testing.assert_array_equal(p, q)
    m3 = DenseFlow(2, 2, rng=5)
    h3 = fit(m3, x_train, x_val, epochs=4, batch_size=32, lr=1e-2, rng=8, progress=False)
    assert h3.train_loss != h1.train_loss  # another shuffling seed gives another trajectory


def test_huge_learning_rate_raises_training_diverged(data: tuple) -> None:
    x_train, x_val = data
    with pytest.raises(TrainingDivergedError, match="diverged at epoch 0.*learning rate"):
        fit(DenseFlow(2, 3, rng=0), x_train, x_val, epochs=5, lr=1e3, rng=0, progress=False)


def test_non_finite_parameters_after_a_step_are_divergence(data: tuple) -> None:
    """If the weights become non-finite the exact validation evaluation must report divergence, not crash."""
    x_train, x_val = data
    model = DenseFlow(2, 2, rng=0)
    model.weights[1][0, 0] = np.inf
    with pytest.raises(TrainingDivergedError):
        fit(model, x_train, x_val, epochs=2, rng=0, progress=False)


def test_fit_validates_inputs(data: tuple) -> None:
    x_train, x_val = data
    model = DenseFlow(2, 2, rng=0)
    with pytest.raises(ShapeError, match="x_train"):
        fit(model, x_train[:, :1], x_val, progress=False)
    with pytest.raises(ShapeError, match="x_val"):
        fit(model, x_train, x_val[0], progress=False)
    bad = x_train.copy()
    bad[3, 0] = np.nan
    with pytest.raises(NonFiniteError, match="x_train"):
        fit(model, bad, x_val, progress=False)
    with pytest.raises(ValueError, match="relgrad.torch"):
        fit(model, x_train, x_val, method="autodiff", progress=False)
    with pytest.raises(ValueError, match="unknown gradient method"):
        fit(model, x_train, x_val, method="sgd", progress=False)


def test_progress_bar_honours_tqdm_disable_and_log_every(
    data: tuple, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    x_train, x_val = data
    monkeypatch.setenv("TQDM_DISABLE", "1")
    fit(DenseFlow(2, 2, rng=0), x_train, x_val, epochs=2, rng=0)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    fit(DenseFlow(2, 2, rng=0), x_train, x_val, epochs=4, rng=0, log_every=2)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all("val log-lik" in line for line in lines)  # epochs 0, 2 and the last


# ------------------------------------------------------------------------------------------- checkpoints
def trained_model() -> DenseFlow:
    rng = np.random.default_rng(3)
    model = DenseFlow(3, 2, alpha=0.2, rng=rng)
    for p in model.parameters():
        p += 0.3 * rng.standard_normal(p.shape)
    return model


def test_checkpoint_round_trip_is_exact(tmp_path: Path) -> None:
    model = trained_model()
    x = np.random.default_rng(4).standard_normal((20, 3))
    path = save_checkpoint(model, tmp_path / "flow.npz")
    fresh = load_checkpoint(None, path)
    assert (fresh.dim, fresh.n_layers, fresh.alpha) == (3, 2, 0.2)
    np.testing.assert_array_equal(fresh.log_likelihood(x), model.log_likelihood(x))
    target = DenseFlow(3, 2, alpha=0.2, rng=0)
    refs = target.parameters()
    assert load_checkpoint(target, path) is target
    assert all(p is q for p, q in zip(refs, target.parameters()))  # loaded in place: optimiser refs stay valid
    np.testing.assert_array_equal(target.log_likelihood(x), model.log_likelihood(x))


def test_checkpoint_path_without_npz_suffix(tmp_path: Path) -> None:
    model = trained_model()
    path = save_checkpoint(model, tmp_path / "flow.ckpt")
    assert path.exists() and path.name == "flow.ckpt"  # np.savez would have written flow.ckpt.npz
    np.testing.assert_array_equal(load_checkpoint(None, path).weights[0], model.weights[0])


@pytest.mark.parametrize(
    "other,mismatch",
    [(DenseFlow(4, 2, alpha=0.2), "dim"), (DenseFlow(3, 3, alpha=0.2), "n_layers"), (DenseFlow(3, 2), "alpha")],
)
def test_checkpoint_of_another_shape_raises(tmp_path: Path, other: DenseFlow, mismatch: str) -> None:
    path = save_checkpoint(trained_model(), tmp_path / "flow.npz")
    with pytest.raises(CheckpointError, match=mismatch):
        load_checkpoint(other, path)


def test_malformed_checkpoints_raise(tmp_path: Path) -> None:
    not_npz = tmp_path / "text.npz"
    not_npz.write_text("hello")
    with pytest.raises(CheckpointError, match="not a relgrad NumPy checkpoint"):
        load_checkpoint(None, not_npz)
    partial = tmp_path / "partial.npz"
    np.savez(partial, weights=np.zeros((1, 2, 2)))
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(None, partial)
    corrupt = tmp_path / "corrupt.npz"
    np.savez(
        corrupt, format_version=1, dim=2, n_layers=2, alpha=0.3, weights=np.zeros((1, 2, 2)), biases=np.zeros((2, 2))
    )
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(None, corrupt)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(None, tmp_path / "absent.npz")


# ------------------------------------------------------------------------------------------- loop options
def test_adam_state_dict_round_trip() -> None:
    rng = np.random.default_rng(0)
    p, q = rng.standard_normal(4), None
    opt = Adam([p], lr=0.05)
    for _ in range(3):
        opt.step([rng.standard_normal(4)])
    q = p.copy()
    twin = Adam([q], lr=0.5)
    twin.load_state_dict(opt.state_dict())
    assert twin.t == 3 and twin.lr == 0.05
    g = rng.standard_normal(4)
    opt.step([g])
    twin.step([g])
    np.testing.assert_array_equal(p, q)
    with pytest.raises(ValueError, match="parameters"):
        Adam([p, q]).load_state_dict(opt.state_dict())


def test_fit_callbacks_initial_evaluation_time_budget_and_recorded_divergence(data: tuple) -> None:
    x_train, x_val = data
    seen = []
    model = DenseFlow(2, 2, rng=0)
    start = model.log_likelihood(x_val).mean()
    history = fit(model, x_train, x_val, epochs=2, batch_size=50, lr=1e-2, rng=1, progress=False,
                  evaluate_initial=True, on_epoch_end=lambda rec, h: seen.append(rec))
    assert [r.epoch for r in seen] == [0, 1, 2] and seen[0].initial and seen[0].val_log_likelihood == start
    assert [r.steps for r in seen] == [0, 8, 16] and history.records == seen and history.stopped_by == "epochs"
    capped = fit(DenseFlow(2, 2, rng=0), x_train, x_val, epochs=9, batch_size=50, rng=1, progress=False,
                 max_seconds=1e-9)
    assert capped.stopped_by == "time_cap" and capped.steps == 1 and capped.records[-1].partial
    model = DenseFlow(2, 3, rng=0)
    initial = [p.copy() for p in model.parameters()]
    diverged = fit(model, x_train, x_val, epochs=5, lr=1e3, rng=0, progress=False, on_divergence="stop")
    assert diverged.stopped_by == "diverged" and "diverged at epoch 0" in diverged.error
    for p, q in zip(model.parameters(), initial):  # no epoch completed: the initial parameters are restored
        np.testing.assert_array_equal(p, q)
