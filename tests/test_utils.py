"""Backend-free helpers: seeding, progress, device choice, validation, cost model."""

from __future__ import annotations

import numpy as np
import pytest

from relgrad import costs, utils
from relgrad.errors import DeviceError, NonFiniteError, ShapeError
from relgrad.training import EarlyStopping, check_loss, minibatch_indices
from relgrad.errors import TrainingDivergedError


def test_seed_everything_makes_draws_repeatable() -> None:
    a = utils.seed_everything(3).standard_normal(4), np.random.rand(2)
    b = utils.seed_everything(3).standard_normal(4), np.random.rand(2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    with pytest.raises(TypeError):
        utils.seed_everything("3")  # type: ignore[arg-type]


def test_seed_everything_seeds_torch() -> None:
    torch = pytest.importorskip("torch")
    utils.seed_everything(5)
    a = torch.randn(3)
    utils.seed_everything(5)
    assert torch.equal(a, torch.randn(3))


def test_progress_honours_tqdm_disable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert utils.progress_disabled()
    bar = utils.progress(range(3))
    assert bar.disable and list(bar) == [0, 1, 2]
    monkeypatch.setenv("TQDM_DISABLE", "0")
    assert not utils.progress_disabled()


def test_select_device() -> None:
    assert utils.select_device("cpu") == "cpu"
    assert utils.select_device(None) == ("cuda" if utils.cuda_available() else "cpu")
    assert utils.select_device("auto") == utils.select_device(None)
    with pytest.raises(DeviceError, match="unknown device"):
        utils.select_device("tpu")
    if not utils.cuda_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            utils.select_device("cuda")


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.5, 1.5, float("nan")])
def test_check_alpha_rejects_values_outside_open_interval(alpha: float) -> None:
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        utils.check_alpha(alpha)


def test_check_batch_and_finite_messages() -> None:
    utils.check_batch((4, 3), 3)
    with pytest.raises(ShapeError, match=r"x\[None, :\]"):
        utils.check_batch((3,), 3)
    with pytest.raises(ShapeError, match="3 columns but the model has dimension D=5"):
        utils.check_batch((4, 3), 5)
    with pytest.raises(NonFiniteError, match="NaN or infinite"):
        utils.check_finite(False, "data")


def test_training_bookkeeping() -> None:
    rng = np.random.default_rng(0)
    batches = list(minibatch_indices(10, 4, rng))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(np.concatenate(batches)) == list(range(10))
    stopper = EarlyStopping(patience=2)
    assert stopper.update(1.0, 0) and not stopper.update(0.5, 1) and not stopper.should_stop
    assert not stopper.update(0.9, 2) and stopper.should_stop and stopper.best_epoch == 0
    check_loss(1.0, epoch=0, step=0)
    with pytest.raises(TrainingDivergedError, match="epoch 3, step 7"):
        check_loss(float("nan"), epoch=3, step=7)


def test_cost_model_ratios() -> None:
    # DESIGN §4: relative / plain = (8L-2)/(6L-2) = 1.4 at L = 2; crossover D* = 0.75 M.
    assert costs.flops_relative(2, 10, 100) / costs.flops_plain(2, 10, 100) == pytest.approx(1.4)
    d = costs.crossover_dim(2, 100)
    assert costs.flops_ordinary(2, 100, d) == pytest.approx(costs.flops_relative(2, 100, d))
    assert costs.flops_ordinary(2, 10, 784) / costs.flops_relative(2, 10, 784) == pytest.approx(30.6, abs=0.1)


def test_results_dir_is_the_committed_folder_next_to_the_package() -> None:
    from pathlib import Path

    import relgrad

    folder = utils.results_dir()
    assert folder == Path(relgrad.__file__).resolve().parent / "results"
    assert (folder / "README.md").is_file() and sorted(folder.glob("*.json"))  # the committed runs are there
