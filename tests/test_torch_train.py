"""relgrad.torch training loop: relative vs autodiff training, early stopping, divergence, seeding, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from relgrad.errors import CheckpointError, NonFiniteError, ShapeError, TrainingDivergedError
import relgrad.torch as rt
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


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 4),
                    reason="fused Adam on the CPU needs torch >= 2.4 (make_adam falls back to the default)")
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


# --------------------------------------------------------------------------------------------- no per-step sync
def _bad_row_data(dtype: torch.dtype = torch.float32, n: int = 400, bad: int = 123) -> tuple:
    """Standardised 2-D data with one finite but huge row: its batch's loss overflows to inf in float32."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=g, dtype=dtype)
    x[bad] = 1e30 if dtype == torch.float32 else 1e200
    return x, torch.randn(100, 2, generator=g, dtype=dtype)


def _bad_step(n: int, batch_size: int, seed: int, bad: int) -> int:
    """The 1-based step whose minibatch holds row ``bad``: fit shuffles with torch.randperm and a generator
    seeded with the int seed, on the data's device."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return int((perm == bad).nonzero()[0, 0]) // batch_size + 1


@pytest.mark.parametrize("check_every", [1, 4, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_bad_batch_never_reaches_the_parameters(dtype: torch.dtype, check_every: int) -> None:
    """A minibatch whose loss is inf: divergence names its epoch and step whenever the device flags are read,
    and no NaN/inf reaches the parameters or Adam's state (fused Adam skips the step on the device)."""
    x, xv = _bad_row_data(dtype)
    step = _bad_step(len(x), 20, 5, 123)
    assert 1 < step < len(x) // 20  # a step in the middle of epoch 0, not the last
    model = fresh(dtype)
    initial = [p.detach().clone() for p in model.parameters()]
    opts = []

    def adam(params):
        opts.append(make_adam(params, lr=1e-2))
        return opts[-1]

    with pytest.raises(TrainingDivergedError, match=f"epoch 0, step {step}: loss = inf"):
        fit(model, x, xv, epochs=2, batch_size=20, generator=5, progress=False, optimizer=adam, check_every=check_every)
    # the best parameters (here the initial ones: no epoch was completed) are back in the model
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), initial))
    state = opts[0].state
    assert all(torch.isfinite(t).all() for s in state.values() for t in s.values())
    # fused Adam skipped the bad step and every step after it: its state is that of step - 1 good steps
    ref_model, perm = fresh(dtype), torch.randperm(len(x), generator=torch.Generator().manual_seed(5))
    ref = make_adam(ref_model.parameters(), lr=1e-2)
    for i in range(step - 1):
        ref.zero_grad(set_to_none=True)
        rt.training_loss(ref_model, x[perm[i * 20:(i + 1) * 20]], check=False).backward()
        ref.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state[p][key], ref.state[q][key]), key


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=False, foreach=False),
    lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
], ids=["adam-unfused", "sgd-momentum"])
def test_a_bad_batch_with_an_optimiser_without_device_skipping(make_opt) -> None:
    """Optimisers that cannot skip a step on the device get zeroed gradients instead: still finite everywhere."""
    x, xv = _bad_row_data(torch.float32)
    step = _bad_step(len(x), 20, 5, 123)
    model, opts = fresh(torch.float32), []
    with pytest.raises(TrainingDivergedError, match=f"epoch 0, step {step}"):
        fit(model, x, xv, epochs=1, batch_size=20, generator=5, progress=False, check_every=1000,
            optimizer=lambda ps: opts.append(make_opt(ps)) or opts[-1])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(t).all() for s in opts[0].state.values() for t in s.values() if torch.is_tensor(t))


def test_an_exploding_gradient_is_divergence(monkeypatch: pytest.MonkeyPatch, toy) -> None:
    """A finite loss with a non-finite gradient (e.g. the ordinary gradient of a singular W) is caught too."""
    import relgrad.torch.train as T

    xt, xv = toy
    real, calls = T.training_loss, [0]

    def loss_with_bad_gradient(model, *args, **kwargs):
        calls[0] += 1
        loss = real(model, *args, **kwargs)
        if calls[0] == 3:  # add sqrt(0): the value stays the same, the derivative is inf
            w = model.weights[0]
            loss = loss + torch.sqrt((w - w.detach())[0, 0])
        return loss

    monkeypatch.setattr(T, "training_loss", loss_with_bad_gradient)
    model = fresh()
    with pytest.raises(TrainingDivergedError, match=r"epoch 0, step 3: loss = .* gradient of parameter layers\.0\.weight"):
        fit(model, xt, xv, epochs=1, batch_size=100, generator=0, progress=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_per_epoch_values_do_not_depend_on_the_check_interval(toy) -> None:
    """The device-side bookkeeping reads the losses back in windows; the epoch values are those of a loop that
    read every step (float64 sums in step order), bit for bit."""
    xt, xv = toy
    runs = []
    for every in (1, 7, 10_000):
        model = fresh(torch.float32)
        hist = fit(model, xt[:700], xv[:200], epochs=3, batch_size=30, lr=1e-2, generator=2, progress=False,
                   check_every=every)
        runs.append((hist.train_loss, hist.val_log_likelihood, [p.detach().clone() for p in model.parameters()]))
    for other in runs[1:]:
        assert other[0] == runs[0][0] and other[1] == runs[0][1]
        assert all(torch.equal(a, b) for a, b in zip(other[2], runs[0][2]))
    # and the train loss is the sample-weighted mean of the step losses, accumulated in float64 on the host
    model, perm = fresh(torch.float32), torch.randperm(700, generator=torch.Generator().manual_seed(2))
    opt, total = make_adam(model.parameters(), lr=1e-2), 0.0
    for i in range(0, 700, 30):
        opt.zero_grad(set_to_none=True)
        loss = rt.training_loss(model, xt[:700].float()[perm[i:i + 30]], check=False)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(perm[i:i + 30])
    assert total / 700 == runs[0][0][0]


# --------------------------------------------------------------------------------------------- loop options
def test_fit_callbacks_initial_evaluation_and_time_budget(toy) -> None:
    xt, xv = toy
    seen = []
    model = fresh()
    start = model.log_likelihood(xv[:200]).mean().item()
    hist = fit(model, xt[:300], xv[:200], epochs=3, batch_size=50, lr=1e-2, generator=0, progress=False,
               evaluate_initial=True, on_epoch_end=lambda rec, h: seen.append((rec, len(h.records))))
    assert [r.epoch for r, _ in seen] == [0, 1, 2, 3] and [n for _, n in seen] == [1, 2, 3, 4]
    assert seen[0][0].initial and math.isnan(seen[0][0].train_loss) and seen[0][0].steps == 0 and seen[0][0].best
    assert seen[0][0].val_log_likelihood == pytest.approx(start, rel=1e-12)
    assert [r.steps for r, _ in seen] == [0, 6, 12, 18] and hist.records == [r for r, _ in seen]
    assert hist.stopped_by == "epochs" and len(hist.val_log_likelihood) == 4
    capped = fit(fresh(), xt[:300], xv[:200], epochs=50, batch_size=50, generator=0, progress=False, max_seconds=1e-9)
    assert capped.stopped_by == "time_cap" and capped.steps == 1 and capped.records[-1].partial
    assert len(capped.records) == 1 and capped.best_epoch == 0


def test_divergence_can_be_recorded_instead_of_raised(toy) -> None:
    xt, xv = toy
    model = fresh()
    initial = [p.detach().clone() for p in model.parameters()]
    hist = fit(model, xt, xv, epochs=5, lr=1e3, progress=False, generator=0, on_divergence="stop",
               evaluate_initial=True)
    assert hist.stopped_by == "diverged" and "epoch 1, step 2" in hist.error and not hist.stopped_early
    assert len(hist.records) == 1 and hist.best_epoch == 0  # the initial evaluation, kept as the best
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), initial))
    with pytest.raises(ValueError, match="on_divergence"):
        fit(fresh(), xt, xv, epochs=1, progress=False, on_divergence="ignore")


def test_linalg_error_at_validation_is_divergence() -> None:
    def failing() -> float:
        raise torch.linalg.LinAlgError("linalg.lu_factor: U[3,3] is zero, singular U.")

    with pytest.raises(TrainingDivergedError, match="epoch 7: linalg.lu_factor"):
        validation_score(failing, epoch=7)


def test_mean_log_likelihood_sums_in_float64() -> None:
    """L1: the per-sample values of a float32 model are summed in float64 (a float32 sum of 10^4 values of
    size ~10^2 drifts by ~1e-3 nats on the mean)."""
    g = torch.Generator().manual_seed(1)
    model = DenseFlow(16, 2, generator=0, dtype=torch.float32, device="cpu")
    x = 4.0 * torch.randn(10_000, 16, generator=g)
    got = mean_log_likelihood(model, x, batch_size=4096)
    with torch.no_grad():
        chunks = [model.log_likelihood(x[i:i + 4096]).double() for i in range(0, 10_000, 4096)]
    exact = math.fsum(torch.cat(chunks).tolist()) / 10_000
    assert got == pytest.approx(exact, rel=1e-13, abs=0.0)


_HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def _watch_steps(monkeypatch: pytest.MonkeyPatch, on_read) -> None:
    """Call ``on_read(name)`` for every host read of a tensor inside fit's epochs, outside the periodic check."""
    import relgrad.torch.train as T

    inside = [False]
    for name in _HOST_READS:
        real = getattr(torch.Tensor, name)

        def watched(self, *args, _real=real, _name=name, **kwargs):
            if inside[0]:
                on_read(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, watched)
    real_call, real_check = T._TorchEpochs.__call__, T._TorchEpochs._check

    def call(self, *args, **kwargs):
        inside[0] = True
        try:
            return real_call(self, *args, **kwargs)
        finally:
            inside[0] = False

    def check(self, *args, **kwargs):
        inside[0] = False
        try:
            return real_check(self, *args, **kwargs)
        finally:
            inside[0] = True

    monkeypatch.setattr(T._TorchEpochs, "__call__", call)
    monkeypatch.setattr(T._TorchEpochs, "_check", check)


@pytest.mark.parametrize("method", ["relative", "authors", "ordinary", "autodiff"])
def test_no_host_reads_between_checks(monkeypatch: pytest.MonkeyPatch, toy, method: str) -> None:
    """M1: no step reads a tensor back to the host (on CUDA each would be a synchronisation): no ``.item()``,
    ``float()``, ``bool()``, ``.cpu()``... inside an epoch except in the check every ``check_every`` steps."""
    reads = []
    _watch_steps(monkeypatch, reads.append)
    xt, xv = toy
    hist = fit(fresh(), xt[:600], xv[:100], method=method, epochs=2, batch_size=50, lr=1e-2, generator=0,
               progress=False, check_every=1000)
    assert hist.steps == 24 and reads == []


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_steps_never_synchronise(monkeypatch: pytest.MonkeyPatch) -> None:
    """M1 on the GPU: torch's sync debug mode raises at any synchronisation inside an epoch (outside the
    periodic check), with the paper's batch size of 10."""
    import relgrad.torch.train as T

    real_call, real_check = T._TorchEpochs.__call__, T._TorchEpochs._check

    def call(self, *args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real_call(self, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def check(self, *args, **kwargs):
        torch.cuda.set_sync_debug_mode("default")
        try:
            return real_check(self, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(T._TorchEpochs, "__call__", call)
    monkeypatch.setattr(T._TorchEpochs, "_check", check)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=g).cuda()
    model = DenseFlow(16, 2, generator=0, device="cuda")
    hist = fit(model, x[:400], x[400:], epochs=2, batch_size=10, lr=1e-3, generator=0, progress=False,
               check_every=1000)
    assert hist.steps == 80 and all(math.isfinite(v) for v in hist.val_log_likelihood)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_resume_is_bit_identical_and_checkpoints_move_between_devices(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=g).cuda()

    def run(epochs: int, **kwargs):
        model = DenseFlow(8, 2, generator=0, device="cuda")
        hist = fit(model, x[:400], x[400:], epochs=epochs, batch_size=20, lr=1e-2, patience=None, generator=3,
                   progress=False, **kwargs)
        return model, hist

    straight = run(3)
    ckpt = tmp_path / "cuda.pt"
    run(1, checkpoint_path=ckpt)
    resumed = run(3, checkpoint_path=ckpt, resume=True)
    for a, b in zip(straight[0].parameters(), resumed[0].parameters()):
        assert torch.equal(a, b)
    assert straight[1].val_log_likelihood == resumed[1].val_log_likelihood
    on_cpu = load_checkpoint(None, ckpt, device="cpu")  # GPU -> CPU
    save_checkpoint(on_cpu, tmp_path / "cpu.pt")
    back = load_checkpoint(None, tmp_path / "cpu.pt", device="cuda")  # CPU -> GPU
    assert back.device.type == "cuda"
    assert torch.equal(back.weights[0].cpu(), resumed[0].weights[0].cpu())
