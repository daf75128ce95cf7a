"""Tests of relgrad.datasets: toys, splits, standardisation, the image pipeline, likelihood spaces, IDX files.

Nothing here uses the network: the IDX tests write their own small files, and the one test that exercises the
download helper fetches a local ``file://`` URL.
"""

from __future__ import annotations

import gzip
import math
import socket
import struct
from pathlib import Path

import numpy as np
import pytest

from relgrad import datasets as ds
from relgrad.datasets import images
from relgrad.errors import NonFiniteError, ShapeError, UnknownDatasetError

N = 20_000  # large enough for the geometric checks below to have tight tolerances


# ============================================================================================ toys
@pytest.mark.parametrize("name", ds.TOY_DATASETS)
def test_toy_shape_dtype_finite(name):
    x = ds.sample_toy(name, 257, rng=0)
    assert x.shape == (257, 2)
    assert x.dtype == np.float64
    assert np.all(np.isfinite(x))


@pytest.mark.parametrize("name", ds.TOY_DATASETS)
def test_toy_seeded_reproducibility(name):
    a = ds.sample_toy(name, 500, rng=123)
    b = ds.sample_toy(name, 500, rng=123)
    c = ds.sample_toy(name, 500, rng=124)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # A Generator is used (and advanced) in place: two draws from it differ, a re-seeded one repeats.
    gen = np.random.default_rng(7)
    first, second = ds.sample_toy(name, 100, gen), ds.sample_toy(name, 100, gen)
    assert not np.allclose(first, second)
    np.testing.assert_array_equal(first, ds.sample_toy(name, 100, np.random.default_rng(7)))


def test_toy_names_are_the_papers_seven():
    assert set(ds.TOY_DATASETS) == {"sine", "trimodal", "moons", "rings", "2spirals", "checkerboard", "8gaussians"}
    assert ds.sample_toy("  Moons ", 3, 0).shape == (3, 2)  # case and whitespace are forgiven


def test_sine_geometry():
    x = ds.sample_toy("sine", N, 0)
    assert x[:, 0].min() >= -2 and x[:, 0].max() <= 2
    resid = x[:, 1] - np.sin(3 * x[:, 0])
    assert abs(resid.mean()) < 0.01
    assert abs(resid.std() - 0.25) < 0.01


def test_trimodal_geometry():
    x = ds.sample_toy("trimodal", N, 1)
    centres = np.array([[0, 0], [5, 5], [5, -5]], float)
    k = np.argmin(((x[:, None, :] - centres) ** 2).sum(-1), axis=1)
    np.testing.assert_allclose(np.bincount(k, minlength=3) / N, 1 / 3, atol=0.02)
    for j, std in enumerate([1.0, 0.5, 0.5]):
        np.testing.assert_allclose(x[k == j].mean(0), centres[j], atol=0.05)
        np.testing.assert_allclose(x[k == j].std(0), std, rtol=0.05)


def _distance_to_upper_half_circle(p):
    """Distance from each point to the arc {(cos t, sin t): 0 <= t <= pi}."""
    on_arc_side = p[:, 1] >= 0
    to_circle = np.abs(np.linalg.norm(p, axis=1) - 1)
    to_ends = np.minimum(np.linalg.norm(p - [1.0, 0.0], axis=1), np.linalg.norm(p - [-1.0, 0.0], axis=1))
    return np.where(on_arc_side, to_circle, to_ends)


def test_moons_geometry():
    x = ds.sample_toy("moons", N, 2)
    d_upper = _distance_to_upper_half_circle(x)
    # the lower moon is the upper one rotated by pi about (0.5, 0.25): p -> (1, 0.5) - p maps it back
    d_lower = _distance_to_upper_half_circle(np.array([1.0, 0.5]) - x)
    assert np.all(np.minimum(d_upper, d_lower) < 0.3)  # every point lies near one of the two arcs
    assert abs(np.mean(d_upper < d_lower) - 0.5) < 0.02
    assert np.mean(np.minimum(d_upper, d_lower) < 0.1) > 0.9  # noise std 0.05 (radial part ~ N(0, 0.05^2))


def test_rings_geometry():
    x = ds.sample_toy("rings", N, 3)
    r = np.linalg.norm(x, axis=1)
    radii = np.array(ds.RING_RADII)
    nearest = np.argmin(np.abs(r[:, None] - radii), axis=1)
    assert np.all(np.abs(r - radii[nearest]) < 0.5)
    # shares proportional to circumference (1:2:3), and no angular preference
    np.testing.assert_allclose(np.bincount(nearest) / N, radii / radii.sum(), atol=0.02)
    angle = np.arctan2(x[:, 1], x[:, 0])
    assert abs(np.cos(angle).mean()) < 0.03 and abs(np.sin(angle).mean()) < 0.03


def test_two_spirals_geometry():
    x = ds.sample_toy("2spirals", N, 4)
    r = np.linalg.norm(x, axis=1)
    assert r.max() < 3.0 + 0.6
    np.testing.assert_allclose(x.mean(0), 0, atol=0.05)  # point symmetric
    # On either arm r = theta / pi with theta = polar angle (+pi for the second arm), so
    # pi * r - angle is a multiple of pi up to the noise.  Points far from the centre are checked.
    far = r > 1.0
    phase = np.mod(np.pi * r[far] - np.arctan2(x[far, 1], x[far, 0]), np.pi)
    off = np.minimum(phase, np.pi - phase)
    assert np.mean(off < np.pi / 4) > 0.9
    # a ring-shaped or blob-shaped density would spread the phase uniformly: only 50% below pi/4
    assert np.mean(off < np.pi / 8) > 0.6


def test_checkerboard_occupancy():
    x = ds.sample_toy("checkerboard", N, 5)
    assert x.min() >= -2 and x.max() < 2
    col, row = np.floor(x[:, 0]).astype(int) + 2, np.floor(x[:, 1]).astype(int) + 2
    assert np.all((col + row) % 2 == 0)  # only the 'black' cells are occupied
    counts = np.zeros((4, 4))
    np.add.at(counts, (row, col), 1)
    black = (np.add.outer(np.arange(4), np.arange(4)) % 2) == 0
    np.testing.assert_allclose(counts[black] / N, 1 / 8, atol=0.01)
    assert np.all(counts[~black] == 0)


def test_eight_gaussians_geometry():
    x = ds.sample_toy("8gaussians", N, 6)
    angles = np.arange(8) * np.pi / 4
    centres = ds.EIGHT_GAUSSIANS_RADIUS * np.column_stack([np.cos(angles), np.sin(angles)])
    dist = np.linalg.norm(x[:, None, :] - centres, axis=-1)
    k = dist.argmin(1)
    assert np.all(dist.min(1) < 6 * ds.EIGHT_GAUSSIANS_STD)
    np.testing.assert_allclose(np.bincount(k, minlength=8) / N, 1 / 8, atol=0.015)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1).mean(), 2.0, atol=0.02)
    np.testing.assert_allclose(x[k == 0].std(0), ds.EIGHT_GAUSSIANS_STD, rtol=0.1)


def test_unknown_toy_name_lists_valid_names_and_suggests():
    with pytest.raises(UnknownDatasetError) as info:
        ds.sample_toy("8gausians", 10)
    msg = str(info.value)
    assert "Did you mean '8gaussians'" in msg
    for name in ds.TOY_DATASETS:
        assert name in msg
    assert isinstance(info.value, KeyError)  # so `except KeyError` still works
    with pytest.raises(UnknownDatasetError) as info:
        ds.load_dataset("qqqqqq")
    assert "Did you mean" not in str(info.value) and "digits" in str(info.value)


@pytest.mark.parametrize("n", [0, -3, 2.5, True, "10"])
def test_toy_bad_count(n):
    with pytest.raises(ValueError):
        ds.sample_toy("moons", n, 0)


def test_toy_bad_rng_type():
    with pytest.raises(TypeError):
        ds.sample_toy("moons", 10, rng="seed")


# ============================================================================================ splits
def test_load_toy_split_sizes_disjoint_and_reproducible():
    split = ds.load_dataset("rings", rng=0, sizes=(300, 100, 50))
    assert split.sizes == (300, 100, 50) and split.dim == 2
    rows = np.concatenate(list(split))
    assert len(np.unique(rows, axis=0)) == len(rows)  # no sample appears in two parts
    again = ds.load_dataset("rings", rng=0, sizes=(300, 100, 50))
    for a, b in zip(split, again):
        np.testing.assert_array_equal(a, b)
    assert ds.load_dataset("sine", rng=0).sizes == (5000, 5000, 5000)  # the paper's default


def test_split_validates_shapes():
    a = np.zeros((4, 3))
    with pytest.raises(ShapeError):
        ds.Split(a, np.zeros((2, 2)), a)
    with pytest.raises(ShapeError):
        ds.Split(a, np.zeros(3), a)
    train, val, test = ds.Split(a, a[:1], a[:2])
    assert (len(train), len(val), len(test)) == (4, 1, 2)


def test_load_dataset_bad_sizes():
    with pytest.raises(ValueError):
        ds.load_dataset("moons", sizes=(10, 10))
    with pytest.raises(ValueError):
        ds.load_dataset("digits", sizes=(1500, 200, 200))  # 1900 > 1797
    with pytest.raises(UnknownDatasetError):
        ds.load_dataset("digits", space="logits-ish")


# ============================================================================================ digits
def test_digits_pixels():
    pixels, labels = ds.load_digits_pixels()
    assert pixels.shape == (1797, 64) and labels.shape == (1797,)
    assert pixels.min() == 0 and pixels.max() == 16
    assert set(np.unique(labels)) == set(range(10))


def test_digits_split_shapes_ranges_and_partition():
    pixels, _ = ds.load_digits_pixels()
    split = ds.load_dataset("digits", rng=0, space="unit", sizes=(1197, 300, 300))
    assert split.sizes == (1197, 300, 300) and split.dim == 64
    assert split.info["levels"] == 17 and split.info["image_shape"] == (8, 8)
    for part in split:
        assert part.dtype == np.float64 and part.min() >= 0 and part.max() < 1
    # Quantising back recovers the original images, each exactly once: the parts partition the data set.
    recovered = np.concatenate([ds.unit_to_pixels(p, 17) for p in split])
    np.testing.assert_array_equal(np.unique(recovered, axis=0, return_counts=True)[1],
                                  np.unique(pixels, axis=0, return_counts=True)[1])
    np.testing.assert_array_equal(np.unique(recovered, axis=0), np.unique(pixels, axis=0))


def test_digits_spaces_agree_and_are_seeded():
    unit = ds.load_dataset("digits", rng=5, space="unit")
    logit = ds.load_dataset("digits", rng=5, space="logit", lam=1e-6)
    pix = ds.load_dataset("digits", rng=5, space="pixels")
    assert logit.info["lam"] == 1e-6 and logit.info["space"] == "logit"
    np.testing.assert_allclose(ds.logit_inverse(logit.test, 1e-6), unit.test, atol=1e-10)
    np.testing.assert_allclose(pix.val, 17 * unit.val, rtol=1e-14)
    assert pix.train.max() < 17
    other = ds.load_dataset("digits", rng=6, space="unit")
    assert not np.allclose(other.train, unit.train)
    np.testing.assert_array_equal(ds.load_dataset("digits", rng=5, space="unit").train, unit.train)


def test_dequantize_range_and_inverse():
    rng = np.random.default_rng(0)
    v = rng.integers(0, 17, size=(4000, 64))
    x = ds.dequantize(v, levels=17, rng=1)
    assert x.min() >= 0 and x.max() < 1
    np.testing.assert_array_equal(ds.unit_to_pixels(x, 17), v)
    noise = 17 * x - v  # the uniform noise itself
    assert abs(noise.mean() - 0.5) < 0.005 and abs(noise.var() - 1 / 12) < 0.002
    np.testing.assert_array_equal(x, ds.dequantize(v, levels=17, rng=1))


@pytest.mark.parametrize("bad", [np.array([[0, 17]]), np.array([[-1, 3]]), np.array([[0.5, 1.0]])])
def test_dequantize_rejects_non_pixels(bad):
    with pytest.raises(ValueError):
        ds.dequantize(bad, levels=17, rng=0)


# ============================================================================================ logit transform
@pytest.mark.parametrize("lam", [1e-6, 0.05])
def test_logit_round_trip(lam):
    rng = np.random.default_rng(0)
    x = rng.random((200, 30))
    x[0, :4] = [0.0, 1.0, 1e-12, 1 - 1e-12]  # the ends of the interval are included when lam > 0
    y, _ = ds.logit_transform(x, lam)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(ds.logit_inverse(y, lam), x, rtol=0, atol=1e-10)


def test_logit_round_trip_lam_zero_interior():
    x = np.random.default_rng(1).uniform(1e-9, 1 - 1e-9, size=(50, 8))
    y, _ = ds.logit_transform(x, 0.0)
    np.testing.assert_allclose(ds.logit_inverse(y, 0.0), x, rtol=0, atol=1e-10)
    with pytest.raises(ValueError):
        ds.logit_transform(np.array([[0.0, 0.5]]), 0.0)


@pytest.mark.parametrize("lam", [1e-6, 0.05])
def test_logit_log_jacobian_matches_finite_differences(lam):
    x = np.random.default_rng(2).uniform(0.02, 0.98, size=(20, 5))
    y, log_jac = ds.logit_transform(x, lam)
    h = 1e-6
    dydx = (ds.logit_transform(x + h, lam)[0] - ds.logit_transform(x - h, lam)[0]) / (2 * h)
    np.testing.assert_allclose(log_jac, np.log(dydx).sum(1), rtol=1e-7)
    # analytic derivative, written out independently: (1 - 2 lam) / (s (1 - s))
    s = lam + (1 - 2 * lam) * x
    np.testing.assert_allclose(log_jac, np.log((1 - 2 * lam) / (s * (1 - s))).sum(1), rtol=1e-12)


def test_logit_log_jacobian_from_y_equals_from_x_even_at_the_ends():
    lam = 1e-6
    x = np.random.default_rng(3).random((100, 16))
    x[0, :3] = [0.0, 1.0, 0.5]
    y, from_x = ds.logit_transform(x, lam)
    np.testing.assert_allclose(ds.logit_log_jacobian(y, lam), from_x, rtol=1e-12)
    # at x = 0 the derivative is (1 - 2 lam) / (lam (1 - lam)) ~ 1e6
    _, end = ds.logit_transform(np.zeros((1, 1)), lam)
    np.testing.assert_allclose(end, [math.log((1 - 2 * lam) / (lam * (1 - lam)))], rtol=1e-12)


def test_logit_input_validation():
    with pytest.raises(ValueError):
        ds.logit_transform(np.array([[1.2]]))
    with pytest.raises(ValueError):
        ds.logit_transform(np.array([[-0.1]]))
    with pytest.raises(NonFiniteError):
        ds.logit_transform(np.array([[np.nan]]))
    with pytest.raises(ValueError):
        ds.logit_transform(np.array([[0.5]]), lam=0.5)
    with pytest.raises(ShapeError):
        ds.logit_transform(np.float64(0.5))


def test_logit_inverse_extreme_values_are_finite():
    x = ds.logit_inverse(np.array([-800.0, 800.0, 0.0]), 0.0)
    np.testing.assert_allclose(x, [0.0, 1.0, 0.5])


# ============================================================================================ likelihood spaces
@pytest.mark.parametrize("levels", [17, 256])
def test_bits_per_dim_of_a_uniform_pixel_model_is_log2_levels(levels):
    """A model uniform on [0,1)^D (density 1) has, in logit space, log p_Y(y) = -log|dy/dx|; in pixel units
    its density is levels^-D, i.e. exactly log2(levels) bits per dimension (8 for MNIST, 4.087 for digits)."""
    lam, D = 1e-6, 64
    x = ds.dequantize(np.random.default_rng(0).integers(0, levels, (50, D)), levels=levels, rng=1)
    y, log_jac = ds.logit_transform(x, lam)
    log_p_logit = -log_jac
    np.testing.assert_allclose(ds.pixel_log_likelihood(log_p_logit, y, lam=lam, levels=levels),
                               -D * math.log(levels), rtol=1e-10)
    np.testing.assert_allclose(ds.bits_per_dim_from_logit(log_p_logit, y, lam=lam, levels=levels),
                               math.log2(levels), rtol=1e-10)


def test_bits_per_dim_hand_worked_gaussian_example():
    """D = 1, lam = 0, pixel 127.5 of 256 -> x = 0.5, y = 0, dy/dx = 1/(0.5*0.5) = 4.
    A standard normal in logit space: log p_Y = -0.5 ln(2 pi); log p_U = -0.5 ln(2 pi) + ln 4 - ln 256;
    bpd = -log p_U / ln 2 = 8 - 2 + 0.5 log2(2 pi) = 7.32574..."""
    y = np.zeros((1, 1))
    log_p_logit = np.array([-0.5 * math.log(2 * math.pi)])
    bpd = ds.bits_per_dim_from_logit(log_p_logit, y, lam=0.0, levels=256)
    np.testing.assert_allclose(bpd, [6 + 0.5 * math.log2(2 * math.pi)], rtol=1e-12)
    np.testing.assert_allclose(bpd, [7.325748064736159], rtol=1e-12)


def test_bits_per_dim_with_a_logistic_model_and_large_lam():
    """A standard logistic density in logit space is sigmoid(y) ~ U(0, 1): x is uniform with density (1 - 2 lam)
    on its range, so log p_U = D (log(1 - 2 lam) - log K) and bpd = log2 K - log2(1 - 2 lam). The logistic
    log-density is written here directly, not through relgrad's Jacobian."""
    lam, K, D = 0.05, 17, 10
    y = np.random.default_rng(0).logistic(size=(30, D))
    log_p_logit = (-y - 2 * np.log1p(np.exp(-y))).sum(1)
    np.testing.assert_allclose(ds.pixel_log_likelihood(log_p_logit, y, lam=lam, levels=K),
                               D * (math.log(1 - 2 * lam) - math.log(K)), rtol=1e-10)
    np.testing.assert_allclose(ds.bits_per_dim_from_logit(log_p_logit, y, lam=lam, levels=K),
                               math.log2(K) - math.log2(1 - 2 * lam), rtol=1e-10)


def test_bits_per_dim_basic_and_validation():
    np.testing.assert_allclose(ds.bits_per_dim(-784 * math.log(2), 784), 1.0)
    np.testing.assert_allclose(ds.bits_per_dim(np.array([-2.0, -4.0]) * math.log(2), 2), [1.0, 2.0])
    with pytest.raises(ValueError):
        ds.bits_per_dim(-1.0, 0)
    with pytest.raises(ShapeError):
        ds.pixel_log_likelihood(np.zeros(3), np.zeros((4, 2)), lam=1e-6, levels=256)


def test_image_likelihood_summary_reports_both_conventions():
    lam, K = 1e-6, 256
    x = ds.dequantize(np.random.default_rng(0).integers(0, K, (40, 784)), levels=K, rng=0)
    y, log_jac = ds.logit_transform(x, lam)
    log_p_logit = -log_jac - 3.0  # uniform model minus 3 nats: 8 + 3/(784 ln 2) bpd
    out = ds.image_likelihood_summary(log_p_logit, y, lam=lam, levels=K)
    np.testing.assert_allclose(out["logit_nats"], log_p_logit.mean())
    np.testing.assert_allclose(out["pixel_nats"], -784 * math.log(256) - 3.0)
    np.testing.assert_allclose(out["bpd"], 8 + 3 / (784 * math.log(2)))
    assert out["pixel_nats_2se"] < 1e-6  # every image scores the same here
    assert out["logit_nats_2se"] > 0
    assert out["levels"] == 256 and out["dim"] == 784


# ============================================================================================ standardisation
def test_standardizer_round_trip_and_log_jacobian():
    rng = np.random.default_rng(0)
    scale, shift = np.array([0.5, 3.0, 10.0]), np.array([1.0, -2.0, 0.0])
    x = rng.standard_normal((5000, 3)) * scale + shift
    z, st = ds.standardize(x)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(z.std(0), 1, atol=1e-12)
    np.testing.assert_allclose(st.inverse(z), x, atol=1e-12)
    np.testing.assert_allclose(st.log_abs_det, -np.log(x.std(0)).sum())
    # a standard normal on z, mapped back, is the Gaussian N(mean, diag(std^2)) on x
    log_p_z = -0.5 * (z ** 2).sum(1) - 1.5 * math.log(2 * math.pi)
    direct = (-0.5 * ((x - st.mean) / st.std) ** 2 - np.log(st.std) - 0.5 * math.log(2 * math.pi)).sum(1)
    np.testing.assert_allclose(st.to_original_log_likelihood(log_p_z), direct, rtol=1e-12)


def test_standardize_split_uses_train_statistics_only():
    split = ds.load_dataset("trimodal", rng=0, sizes=(400, 300, 200))
    std_split, st = ds.standardize(split)
    np.testing.assert_allclose(st.mean, split.train.mean(0))
    np.testing.assert_allclose(std_split.train.mean(0), 0, atol=1e-12)
    assert np.abs(std_split.val.mean(0)).max() > 1e-6  # validation data were not used to fit
    np.testing.assert_allclose(std_split.test, (split.test - st.mean) / st.std)
    assert std_split.info["standardized"] and std_split.info["name"] == "trimodal"


def test_whitener_identity_covariance_round_trip_and_exact_gaussian_log_likelihood():
    rng = np.random.default_rng(1)
    mix = rng.standard_normal((4, 4)) * np.array([0.1, 1.0, 3.0, 20.0])
    x = rng.standard_normal((3000, 4)) @ mix.T + np.array([1.0, -2.0, 0.5, 7.0])
    z, wh = ds.whiten(x)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-10)
    np.testing.assert_allclose(np.cov(z.T, bias=True), np.eye(4), atol=1e-10)
    np.testing.assert_allclose(wh.inverse(z), x, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(wh.matrix, wh.matrix.T, atol=1e-12)                 # Sigma^{-1/2} is symmetric
    np.testing.assert_allclose(wh.matrix @ wh.inverse_matrix, np.eye(4), atol=1e-10)
    cov = np.cov(x.T, bias=True)
    np.testing.assert_allclose(wh.log_abs_det, -0.5 * np.linalg.slogdet(cov)[1], rtol=1e-10)
    # N(0, I) on z, mapped back, is the maximum-likelihood Gaussian on x
    log_p_z = -0.5 * (z ** 2).sum(1) - 2 * math.log(2 * math.pi)
    d = x - x.mean(0)
    direct = -0.5 * np.einsum("ni,ij,nj->n", d, np.linalg.inv(cov), d) - 0.5 * np.linalg.slogdet(2 * math.pi * cov)[1]
    np.testing.assert_allclose(wh.to_original_log_likelihood(log_p_z), direct, rtol=1e-10)


def test_whiten_split_uses_train_statistics_and_rejects_singular_data():
    split = ds.load_dataset("digits", rng=0, lam=1e-6)
    white, wh = ds.whiten(split)
    np.testing.assert_allclose(np.cov(white.train.T, bias=True), np.eye(64), atol=1e-8)
    assert np.abs(white.val.mean(0)).max() > 1e-3  # validation data were not used to fit
    np.testing.assert_allclose(white.test, wh.transform(split.test))
    assert white.info["whitened"] and white.info["name"] == "digits"
    pixels, _ = ds.load_digits_pixels()  # raw pixels: constant columns, singular covariance
    with pytest.raises(ValueError, match="singular"):
        ds.whiten(pixels.astype(float))
    with pytest.raises(ShapeError, match="more rows than columns"):
        ds.whiten(np.random.default_rng(0).random((3, 3)))
    with pytest.raises(ShapeError):
        wh.transform(np.zeros((2, 5)))


def test_standardize_rejects_constant_columns_and_bad_shapes():
    pixels, _ = ds.load_digits_pixels()  # column 0 is always 0 in the raw digits
    with pytest.raises(ValueError, match="constant"):
        ds.standardize(pixels.astype(float))
    with pytest.raises(ShapeError):
        ds.standardize(np.zeros((1, 3)))
    _, st = ds.standardize(np.random.default_rng(0).random((10, 3)))
    with pytest.raises(ShapeError):
        st.transform(np.zeros((2, 4)))


# ============================================================================================ IDX files
def idx_bytes(arr: np.ndarray, code: int) -> bytes:
    """Encode ``arr`` as an IDX file by hand (magic, big-endian dims, big-endian data)."""
    big = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + np.ascontiguousarray(arr, dtype=big).tobytes()


def write_idx(path: Path, arr: np.ndarray, code: int = 0x08, compress: bool = None) -> Path:
    data = idx_bytes(arr, code)
    if compress if compress is not None else path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_uint8_images_and_labels(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 5, 4), dtype=np.uint8)
    labels = rng.integers(0, 10, 7, dtype=np.uint8)
    got = ds.read_idx(write_idx(tmp_path / "images", images, compress=compress))
    assert got.dtype == np.uint8 and got.shape == (7, 5, 4)
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(ds.read_idx(write_idx(tmp_path / "labels", labels, compress=compress)), labels)


@pytest.mark.parametrize("code,dtype", [(0x09, np.int8), (0x0B, np.int16), (0x0C, np.int32),
                                        (0x0D, np.float32), (0x0E, np.float64)])
def test_read_idx_other_dtypes_big_endian(tmp_path, code, dtype):
    arr = (np.arange(24).reshape(2, 3, 4) * 37 - 300).astype(dtype)
    if np.issubdtype(dtype, np.integer):
        arr = np.clip(arr, np.iinfo(dtype).min, np.iinfo(dtype).max).astype(dtype)
    else:
        arr = arr + np.asarray(0.25, dtype)
    got = ds.read_idx(write_idx(tmp_path / "a.idx", arr, code))
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    np.testing.assert_array_equal(got, arr)
    got[0, 0, 0] = 1  # a writable copy, not a view of the file's bytes


def test_read_idx_gzip_detected_by_content(tmp_path):
    arr = np.arange(6, dtype=np.uint8)
    path = tmp_path / "looks-raw.idx"
    path.write_bytes(gzip.compress(idx_bytes(arr, 0x08)))
    np.testing.assert_array_equal(ds.read_idx(path), arr)


@pytest.mark.parametrize(
    "payload,message",
    [
        (b"\x00\x01\x08\x01\x00\x00\x00\x01\x00", "not an IDX file"),
        (b"PK\x03\x04junk", "not an IDX file"),
        (b"\x00\x00", "not an IDX file"),
        (b"\x00\x00\x0a\x01\x00\x00\x00\x01\x00", "unknown IDX element type 0x0A"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated IDX header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02", "truncated"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x01\x01\x02", "trailing bytes"),
    ],
)
def test_read_idx_malformed(tmp_path, payload, message):
    path = tmp_path / "bad.idx"
    path.write_bytes(payload)
    with pytest.raises(ValueError, match=message) as info:
        ds.read_idx(path)
    assert "bad.idx" in str(info.value)


def test_read_idx_corrupt_gzip(tmp_path):
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.arange(100, dtype=np.uint8), 0x08))[:30])
    with pytest.raises(ValueError, match="gzip"):
        ds.read_idx(path)


def write_fake_mnist(folder: Path, n_train: int = 12, n_test: int = 5, gz_test: bool = False) -> dict:
    """Standard file names: train files gzipped, test files raw (or gzipped): both must be found."""
    rng = np.random.default_rng(0)
    data = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    suffix = ".gz" if gz_test else ""
    write_idx(folder / "train-images-idx3-ubyte.gz", data["train_images"])
    write_idx(folder / "train-labels-idx1-ubyte.gz", data["train_labels"])
    write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", data["test_images"])
    write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", data["test_labels"])
    return data


@pytest.mark.parametrize("kind", ["mnist", "fashion-mnist"])
def test_load_idx_images_and_labels_standard_names(tmp_path, kind):
    data = write_fake_mnist(tmp_path)
    np.testing.assert_array_equal(ds.load_idx_images(tmp_path, kind, "train"), data["train_images"])
    np.testing.assert_array_equal(ds.load_idx_images(tmp_path, kind, "test"), data["test_images"])
    np.testing.assert_array_equal(ds.load_idx_labels(tmp_path, kind, "train"), data["train_labels"])
    np.testing.assert_array_equal(ds.load_idx_labels(str(tmp_path), kind, "test"), data["test_labels"])
    with pytest.raises(UnknownDatasetError):
        ds.load_idx_images(tmp_path, kind, "validation")


def test_load_idx_images_wrong_rank(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros(10, np.uint8))
    with pytest.raises(ShapeError):
        ds.load_idx_images(tmp_path, "mnist", "train")


def test_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        ds.load_idx_images(tmp_path, "fashion-mnist", "test")
    msg = str(info.value)
    assert "t10k-images-idx3-ubyte.gz" in msg and str(tmp_path) in msg
    assert "download_mnist" in msg and "apt-get install dataset-fashion-mnist" in msg
    with pytest.raises(FileNotFoundError) as info:
        ds.load_idx_labels(tmp_path, "mnist", "train")
    assert "train-labels-idx1-ubyte.gz" in str(info.value) and "download_mnist" in str(info.value)
    assert "apt-get" not in str(info.value)  # Debian ships Fashion-MNIST only


def test_load_dataset_idx_uses_the_papers_split(tmp_path):
    data = write_fake_mnist(tmp_path, n_train=12, n_test=5, gz_test=True)
    split = ds.load_dataset("mnist", rng=0, directory=tmp_path, sizes=(8, 3, 4), space="unit")
    assert split.sizes == (8, 3, 4) and split.dim == 784 and split.info["levels"] == 256
    flat = lambda a: a.reshape(len(a), -1)  # noqa: E731
    np.testing.assert_array_equal(ds.unit_to_pixels(split.train, 256), flat(data["train_images"][:8]))
    np.testing.assert_array_equal(ds.unit_to_pixels(split.val, 256), flat(data["train_images"][-3:]))
    np.testing.assert_array_equal(ds.unit_to_pixels(split.test, 256), flat(data["test_images"][:4]))
    logit = ds.load_dataset("mnist", rng=0, directory=tmp_path, sizes=(8, 3, 4))
    np.testing.assert_allclose(ds.logit_inverse(logit.train, 1e-6), split.train, atol=1e-10)
    with pytest.raises(ValueError):
        ds.load_dataset("mnist", directory=tmp_path, sizes=(10, 3, 4))  # 13 > 12 training images


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("RELGRAD_DATA_DIR", str(tmp_path))
    assert ds.default_data_dir("mnist") == tmp_path / "mnist"
    (tmp_path / "mnist").mkdir()
    write_fake_mnist(tmp_path / "mnist")
    assert ds.load_idx_images(kind="mnist", split="test").shape == (5, 28, 28)
    monkeypatch.delenv("RELGRAD_DATA_DIR")
    assert ds.default_data_dir("mnist") == Path.home() / ".cache" / "relgrad" / "mnist"
    expected = ds.DEBIAN_FASHION_MNIST_DIR if ds.DEBIAN_FASHION_MNIST_DIR.is_dir() else (
        Path.home() / ".cache" / "relgrad" / "fashion-mnist")
    assert ds.default_data_dir("fashion-mnist") == expected


@pytest.mark.skipif(not ds.DEBIAN_FASHION_MNIST_DIR.is_dir(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_debian_fashion_mnist_test_split(monkeypatch):
    monkeypatch.delenv("RELGRAD_DATA_DIR", raising=False)
    images = ds.load_idx_images(kind="fashion-mnist", split="test")
    labels = ds.load_idx_labels(kind="fashion-mnist", split="test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
    assert np.bincount(labels).tolist() == [1000] * 10  # Fashion-MNIST's balanced test set


def test_download_helper_is_atomic_and_checks_md5(tmp_path):
    """The fetch-and-verify step, on a local file:// URL (no network)."""
    import hashlib

    src = tmp_path / "src.gz"
    src.write_bytes(gzip.compress(idx_bytes(np.arange(10, dtype=np.uint8), 0x08)))
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    dest = tmp_path / "out" / "train-labels-idx1-ubyte.gz"
    images._download_file(src.as_uri(), dest, md5)
    assert dest.read_bytes() == src.read_bytes()
    bad = tmp_path / "out" / "other.gz"
    with pytest.raises(OSError, match="checksum mismatch"):
        images._download_file(src.as_uri(), bad, "0" * 32)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [dest.name]  # no partial file left


def test_mirror_constants_and_checksums_cover_the_standard_files():
    assert ds.MNIST_MIRROR.startswith("https://") and ds.MNIST_MIRROR.endswith("/")
    assert ds.FASHION_MNIST_MIRROR.startswith("https://") and ds.FASHION_MNIST_MIRROR.endswith("/")
    names = {f"{p}-{w}-idx{r}-ubyte.gz" for p in ("train", "t10k") for w, r in (("images", 3), ("labels", 1))}
    for kind in ("mnist", "fashion-mnist"):
        assert set(images._MD5[kind]) == names


def test_no_network_when_loading(monkeypatch):
    """Loading toys and digits must never open a socket."""

    def refuse(*args, **kwargs):
        raise AssertionError("relgrad.datasets tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    ds.load_dataset("digits", rng=0)
    for name in ds.TOY_DATASETS:
        ds.load_dataset(name, rng=0, sizes=(10, 10, 10))


def test_block_sums_downsample_by_2x2_areas_exactly():
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (4, 28, 28))
    out = ds.block_sums(pixels)
    ref = np.array([[[pixels[n, 2 * i:2 * i + 2, 2 * j:2 * j + 2].sum() for j in range(14)] for i in range(14)]
                    for n in range(4)])
    np.testing.assert_array_equal(out, ref)
    assert ds.block_sums(np.full((1, 784), 255)).max() == 1020


def test_fourteen_by_fourteen_variant_loads_with_1021_levels(tmp_path):
    data = write_fake_mnist(tmp_path)
    n_train = len(data["train_images"])
    split = ds.load_dataset("fashion-mnist-14", rng=0, sizes=(n_train - 2, 2, 3), directory=tmp_path, space="pixels")
    assert split.dim == 196 and split.info["levels"] == 1021 and split.info["image_shape"] == (14, 14)
    # dequantised pixels lie in [sum, sum + 1) of the integer block sums
    sums = ds.block_sums(data["train_images"][: n_train - 2]).reshape(n_train - 2, -1)
    assert np.all(split.train >= sums) and np.all(split.train < sums + 1)
