"""Self-checks for the book's coding exercises (course material; see :mod:`relgrad.teaching`).

Each ``check_*`` function runs a student's function on seeded inputs, compares the result with a reference
computed by :mod:`relgrad` (or NumPy), prints ``✓ ...`` on success and, on failure, a specific hint for the
typical mistakes of that exercise.

Two modes:

* default (``strict=False``, used by the visible cells of the book and by students): print the verdict and
  return ``True``/``False``; never raise, not even when the function is still a stub raising
  ``NotImplementedError`` (a friendly "not implemented yet" is printed instead);
* ``strict=True`` (used by the generated nbgrader test cells): print the same message, then raise
  ``AssertionError`` on any failure, "not implemented yet" included, so that an autograder scores it 0.

Checks and the exercise each belongs to (see ``EXERCISE_CHECKS``):

========================================  ===========================  ============================
check                                     exercise label               function checked
========================================  ===========================  ============================
:func:`check_logdet_grad_2x2`             ``ex-logdet-two``            ``logdet_grad_2x2(W)``
:func:`check_relative_gradient`           ``ex-rel-examples``          ``relative_gradient(f, W)``
:func:`check_relative_weight_update`      ``ex-backprop-two-forms``    ``relative_weight_update(Delta, Z, W)``
:func:`check_strict_layer_update`         ``ex-biases-centred``        ``strict_layer_update(W, b, Y, Delta)``
:func:`check_bpd_from_unit_nats`          ``ex-cov-bpd``               ``bpd_from_unit_nats(nats, dim, levels)``
:func:`check_layer_jacobian`              ``ex-jacobian-layer``        ``layer_jacobian(W, b, z, phi_prime)``
:func:`check_ica_step`                    ``ex-rel-ica-adam``          ``ica_step(W, X, mu)``
:func:`check_activity_relative_gradient`  ``ex-limits-activity``       ``activity_relative_gradient(W, Z, lam)``
:func:`check_sigma_inverse`               ``ex-sampling-newton``       ``sigma_inverse_newton(v, alpha)``
:func:`check_lognormal_density`           ``ex-cov-lognormal``         ``lognormal_density(x)``
:func:`check_logdet_by_hand`              ``ex-cov-logdet-2x2``        ``logdet_by_hand(p)``
:func:`check_training_memory_gib`         ``ex-limits-memory``         ``training_memory_gib(dim, n_layers, bytes)``
:func:`check_logit_nats_to_bpd`           ``ex-images-convert``        ``logit_nats_to_bpd(nats, y, lam, levels)``
========================================  ===========================  ============================

Operation counts (the "you formed ``W^T W`` first" hints) are measured by behaviour, not by timing: the
student's function receives NumPy arrays of a subclass that records the shapes of every matrix product
(``@``, ``np.matmul``, ``np.dot``, ``ndarray.dot``); a product of two ``D x D`` matrices is the cubic
mistake.  A function that computes without any visible product (``np.einsum``, a conversion to torch) is
checked on its values only, and the check says so.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..datasets import dequantize, logit_log_jacobian, logit_transform
from ..numpy.activation import sigma, sigma_inverse, sigma_prime
from ..numpy.gradients import relative_layer

__all__ = [
    "EXERCISE_CHECKS",
    "check_activity_relative_gradient",
    "check_bpd_from_unit_nats",
    "check_ica_step",
    "check_layer_jacobian",
    "check_logdet_by_hand",
    "check_logdet_grad_2x2",
    "check_logit_nats_to_bpd",
    "check_lognormal_density",
    "check_relative_gradient",
    "check_relative_weight_update",
    "check_sigma_inverse",
    "check_strict_layer_update",
    "check_training_memory_gib",
]

#: exercise label -> name of the check function in this module.
EXERCISE_CHECKS: Dict[str, str] = {
    "ex-logdet-two": "check_logdet_grad_2x2",
    "ex-rel-examples": "check_relative_gradient",
    "ex-backprop-two-forms": "check_relative_weight_update",
    "ex-biases-centred": "check_strict_layer_update",
    "ex-cov-bpd": "check_bpd_from_unit_nats",
    "ex-jacobian-layer": "check_layer_jacobian",
    "ex-rel-ica-adam": "check_ica_step",
    "ex-limits-activity": "check_activity_relative_gradient",
    "ex-sampling-newton": "check_sigma_inverse",
    "ex-cov-lognormal": "check_lognormal_density",
    "ex-cov-logdet-2x2": "check_logdet_by_hand",
    "ex-limits-memory": "check_training_memory_gib",
    "ex-images-convert": "check_logit_nats_to_bpd",
}

_NOT_IMPLEMENTED = object()


class _Failed(Exception):
    """Raised inside a check to stop it with a hint."""


# --------------------------------------------------------------------------------------------- helpers


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__name__", repr(fn))


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    """Call the student's function; NotImplementedError -> sentinel, other errors -> a hint."""
    try:
        return fn(*args)
    except NotImplementedError:
        return _NOT_IMPLEMENTED
    except Exception as err:  # the student's bug, reported as a hint
        extra = ""
        if "truth value of an array" in str(err):
            extra = (" (a Python `if` or `while` on a whole array: work elementwise with np.where, masks, "
                     "or a condition like np.any(...))")
        raise _Failed(f"{_name(fn)} raised {type(err).__name__}: {err}{extra}") from err


def _as_array(value: Any, what: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor is accepted
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise _Failed(f"{what} should be an array of numbers, got {type(value).__name__}") from err


def _close(a: np.ndarray, b: np.ndarray, rtol: float = 1e-8, atol: float = 1e-10) -> bool:
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=rtol, atol=atol))


def _match_mistake(got: np.ndarray, mistakes: Sequence[Tuple[np.ndarray, str]]) -> Optional[str]:
    for value, hint in mistakes:
        if _close(got, value):
            return hint
    return None


def _report(ok: bool, message: str, strict: bool) -> bool:
    print(("✓ " if ok else "✗ ") + message)
    if not ok and strict:
        raise AssertionError(message)
    return ok


def _run(label: str, fn: Callable[..., Any], body: Callable[[], str], strict: bool) -> bool:
    """Run a check body: it returns the success message or raises _Failed with a hint."""
    try:
        return _report(True, body(), strict)
    except _NotImplementedYet:
        return _report(False, f"{_name(fn)} is not implemented yet (exercise {label}): replace the "
                              "`raise NotImplementedError` by your code, then run this check again.", strict)
    except _Failed as failure:
        return _report(False, f"{_name(fn)} (exercise {label}): {failure}", strict)


class _NotImplementedYet(Exception):
    pass


def _result(fn: Callable[..., Any], *args: Any) -> Any:
    out = _call(fn, *args)
    if out is _NOT_IMPLEMENTED:
        raise _NotImplementedYet
    return out


# ------------------------------------------------------------------------------------ counting products


class _Counted(np.ndarray):
    """An ndarray that records the operand shapes of every matrix product it takes part in."""

    log: List[Tuple[Tuple[int, ...], Tuple[int, ...]]]

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        plain = [np.asarray(x) if isinstance(x, _Counted) else x for x in inputs]
        if ufunc is np.matmul and method == "__call__":
            _Counted.log.append((np.shape(plain[0]), np.shape(plain[1])))
        if "out" in kwargs:
            kwargs["out"] = tuple(np.asarray(o) if isinstance(o, _Counted) else o for o in kwargs["out"])
        result = getattr(ufunc, method)(*plain, **kwargs)
        return _wrap(result)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        if func is np.dot:
            _Counted.log.append((np.shape(args[0]), np.shape(args[1])))
        elif func is np.linalg.multi_dot:
            shapes = [np.shape(a) for a in args[0]]
            _Counted.log.extend(zip(shapes[:-1], shapes[1:]))  # an upper bound is not needed: pairwise
        unwrapped = _unwrap(args)
        return _wrap(func(*unwrapped, **_unwrap(kwargs)))

    def dot(self, other: Any, *args: Any) -> Any:  # type: ignore[override]
        return np.dot(self, other, *args)


_Counted.log = []


def _unwrap(obj: Any) -> Any:
    if isinstance(obj, _Counted):
        return np.asarray(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _unwrap(v) for k, v in obj.items()}
    return obj


def _wrap(obj: Any) -> Any:
    if isinstance(obj, np.ndarray) and not isinstance(obj, _Counted) and obj.dtype.kind == "f":
        return obj.view(_Counted)
    if isinstance(obj, tuple):
        return tuple(_wrap(o) for o in obj)
    return obj


def _counted_call(fn: Callable[..., Any], *arrays: np.ndarray) -> Tuple[Any, List[Tuple[Tuple[int, ...], ...]]]:
    """Call fn on counting copies of ``arrays``; return its result (plain) and the list of products."""
    _Counted.log = []
    out = _result(fn, *[np.array(a).view(_Counted) for a in arrays])
    log, _Counted.log = list(_Counted.log), []
    return _unwrap(out), log


def _cubic_products(log: Sequence[Tuple[Tuple[int, ...], ...]], dim: int) -> List[str]:
    """The products with a (D x D) @ (D x D) shape: O(D^3)."""
    return [f"{a} @ {b}" for a, b in log if len(a) == 2 and len(b) == 2 and a == (dim, dim) and b == (dim, dim)]


# ---------------------------------------------------------------------------------------------- checks


def check_logdet_grad_2x2(logdet_grad_2x2: Callable[[np.ndarray], np.ndarray], *, strict: bool = False) -> bool:
    """Check ``logdet_grad_2x2(W)``, the gradient of ``log|det W|`` for a 2x2 matrix (exercise ``ex-logdet-two``).

    The reference is ``W^{-T}`` (``np.linalg.inv(W).T``), on seeded matrices with positive and negative
    determinants.  Hints: forgot the transpose (returned ``W^{-1}``), returned the cofactor matrix without
    dividing by ``det W`` or divided by ``|det W|`` (sign lost for a negative determinant).

    Args:
        logdet_grad_2x2: the student's function, ``(2, 2)`` array -> ``(2, 2)`` array.
        strict: raise ``AssertionError`` on failure (for autograding) instead of only printing.

    Returns:
        True when the function agrees with the reference on every test matrix.
    """
    def body() -> str:
        rng = np.random.default_rng(20240)
        mats = [np.array([[2.0, 0.5], [1.5, 3.0]]), np.array([[1.0, 3.0], [2.0, -0.5]])]  # det > 0, then < 0
        mats += [rng.standard_normal((2, 2)) for _ in range(4)]
        for W in mats:
            got = _as_array(_result(logdet_grad_2x2, W.copy()), "the returned gradient")
            ref = np.linalg.inv(W).T
            if got.shape != (2, 2):
                raise _Failed(f"returned shape {got.shape}, expected (2, 2)")
            if _close(got, ref):
                continue
            det = np.linalg.det(W)
            cof = ref * det
            hint = _match_mistake(got, [
                (np.linalg.inv(W), "you returned W^{-1}; the gradient is its transpose W^{-T} "
                                   "(d log|det W| / dW_ij = (W^{-1})_ji)."),
                (cof, "you returned the cofactor matrix; divide it by det W."),
                (cof / abs(det), "you divided by |det W|: the derivative of log|u| is 1/u for either sign, "
                                 "so divide by det W itself (try a matrix with det W < 0)."),
                (-ref, "the sign is flipped: the gradient of log|det W| is +W^{-T}."),
            ])
            raise _Failed(hint or f"wrong value for W = {W.round(3).tolist()}: expected {ref.round(4).tolist()}, "
                                  f"got {got.round(4).tolist()}.")
        return f"{_name(logdet_grad_2x2)} agrees with W^-T on {len(mats)} matrices (including det W < 0)."

    return _run("ex-logdet-two", logdet_grad_2x2, body, strict)


def check_relative_gradient(relative_gradient: Callable[[Callable[[Any], Any], np.ndarray], np.ndarray], *,
                            strict: bool = False) -> bool:
    """Check ``relative_gradient(f, W)``, which returns ``grad f(W) W^T`` (exercise ``ex-rel-examples``).

    ``f`` is a torch function of a float64 tensor; the check uses a linear ``f(W) = <A, W>`` (gradient
    ``A``, so every typical mistake gives a recognisable value) and ``f(W) = tr(W)``.  Hints: forgot the
    ``W^T`` factor, wrong transpose or side (``G W``, ``W^T G``, ``W G``), returned the update direction
    ``G W^T W`` instead of the relative gradient.

    Args:
        relative_gradient: the student's function ``(f, W) -> (D, D) array``.
        strict: raise ``AssertionError`` on failure (for autograding) instead of only printing.

    Returns:
        True when the function agrees with the reference.
    """
    import torch

    def body() -> str:
        rng = np.random.default_rng(20241)
        D = 4
        W = rng.standard_normal((D, D))
        A = rng.standard_normal((D, D))
        A_t = torch.tensor(A, dtype=torch.float64)
        cases = [(lambda w: torch.sum(A_t * w), A, "f(W) = <A, W>"), (torch.trace, np.eye(D), "f(W) = tr W")]
        for f, G, what in cases:
            got = _as_array(_result(relative_gradient, f, W.copy()), "the relative gradient")
            ref = G @ W.T
            if got.shape != (D, D):
                raise _Failed(f"returned shape {got.shape} for a {D}x{D} W, expected ({D}, {D}).")
            if _close(got, ref):
                continue
            hint = _match_mistake(got, [
                (G, "you returned the ordinary gradient grad f; the relative gradient multiplies it on the "
                    "right by W^T."),
                (G @ W, "wrong transpose: you computed grad f @ W; the relative gradient is grad f @ W.T."),
                (W.T @ G, "wrong side: you computed W^T @ grad f; the relative gradient is grad f @ W^T "
                          "(W^T on the right)."),
                (W @ G, "wrong side: you computed W @ grad f; the relative gradient is grad f @ W^T."),
                (G @ W.T @ W, "you returned the update direction grad f W^T W; the relative gradient stops "
                              "at grad f W^T."),
                (-ref, "the sign is flipped: return grad f W^T, not its negative."),
            ])
            raise _Failed(hint or f"wrong value for {what}: expected grad f @ W.T.")
        return f"{_name(relative_gradient)} returns grad f W^T (checked on <A, W> and tr W)."

    return _run("ex-rel-examples", relative_gradient, body, strict)


def _reference_data_update(Delta: np.ndarray, Z: np.ndarray, W: np.ndarray) -> np.ndarray:
    return Delta.T @ ((Z @ W.T) @ W)


def check_relative_weight_update(relative_weight_update: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
                                 *, strict: bool = False) -> bool:
    """Check ``relative_weight_update(Delta, Z, W)`` = ``Delta^T Z W^T W`` in ``O(M D^2)`` (``ex-backprop-two-forms``).

    Values are compared with ``Delta^T ((Z W^T) W)`` on seeded inputs with ``M = 3`` and ``D = 40``; the
    operation count is measured by recording every matrix product: a ``D x D`` by ``D x D`` product
    (``W^T W``, or ``(Delta^T Z) W^T`` when ``Delta^T Z`` is formed first) costs ``O(D^3)`` and fails.
    Hints: forgot a ``W`` factor, wrong transpose (``W W^T``), cubic order.

    Args:
        relative_weight_update: the student's function ``(Delta (M, D), Z (M, D), W (D, D)) -> (D, D)``.
        strict: raise ``AssertionError`` on failure (for autograding) instead of only printing.

    Returns:
        True when the values agree and no ``D x D`` by ``D x D`` product was taken.
    """
    def body() -> str:
        rng = np.random.default_rng(20242)
        M, D = 3, 40
        Delta, Z, W = rng.standard_normal((M, D)), rng.standard_normal((M, D)), rng.standard_normal((D, D))
        out, log = _counted_call(relative_weight_update, Delta, Z, W)
        got = _as_array(out, "the weight update")
        ref = _reference_data_update(Delta, Z, W)
        if got.shape != (D, D):
            raise _Failed(f"returned shape {got.shape}, expected ({D}, {D}) for Delta, Z of shape ({M}, {D}).")
        if not _close(got, ref):
            G = Delta.T @ Z
            hint = _match_mistake(got, [
                (G, "you returned Delta^T Z, the ordinary data gradient: multiply by W^T W (from the right)."),
                (G @ W.T, "you stopped at the relative gradient Delta^T Z W^T: the update direction has one "
                          "more factor W."),
                (G @ W @ W.T, "wrong transpose: you computed Delta^T Z W W^T; the update is Delta^T Z W^T W, "
                              "i.e. Delta^T (Y0 W) with Y0 = Z W^T."),
                (W.T @ W @ G, "wrong side: W^T W multiplies Delta^T Z from the right."),
                (Z.T @ Delta @ W.T @ W, "you transposed the outer product: it is Delta^T Z, not Z^T Delta."),
            ])
            raise _Failed(hint or "wrong value: expected Delta^T Z W^T W = Delta.T @ ((Z @ W.T) @ W).")
        cubic = _cubic_products(log, D)
        if cubic:
            raise _Failed(f"right value, wrong cost: you multiplied two {D}x{D} matrices ({cubic[0]}), which "
                          "costs O(D^3). Do not form W^T W (or Delta^T Z) first: evaluate Delta.T @ ((Z @ W.T) @ W), "
                          "three products of O(M D^2).")
        if not log:
            return (f"{_name(relative_weight_update)} returns the right values (its operation count could not be "
                    "observed: no @/np.matmul/np.dot on the inputs).")
        return f"{_name(relative_weight_update)} returns Delta^T Z W^T W with {len(log)} products, none of them D x D by D x D."

    return _run("ex-backprop-two-forms", relative_weight_update, body, strict)


def check_strict_layer_update(strict_layer_update: Callable[..., Tuple[np.ndarray, np.ndarray]], *,
                              strict: bool = False) -> bool:
    """Check ``strict_layer_update(W, b, Y, Delta) -> (dW, db)``, the strict relative update of one layer (``ex-biases-centred``).

    The reference is ``relgrad.numpy.gradients.relative_layer(..., strict=True)``:
    ``dW = Delta^T (Y W) - W`` and ``db = Delta^T (Y b) + Delta^T 1 - b`` with ``Y = Z W^T + 1 b^T``.
    Hints: the authors' bias rule (``db`` without ``- b``), the log-determinant term ``-W`` forgotten,
    ``g_b = Delta^T 1`` forgotten, and the cubic order (a ``D x D`` by ``D x D`` product).

    Args:
        strict_layer_update: the student's function ``(W (D, D), b (D,), Y (M, D), Delta (M, D)) -> (dW, db)``.
        strict: raise ``AssertionError`` on failure (for autograding) instead of only printing.

    Returns:
        True when both blocks agree with the reference and no cubic product was taken.
    """
    def body() -> str:
        rng = np.random.default_rng(20243)
        M, D = 3, 30
        W, b = rng.standard_normal((D, D)), rng.standard_normal(D)
        Z, Delta = rng.standard_normal((M, D)), rng.standard_normal((M, D))
        Y = Z @ W.T + b
        out, log = _counted_call(strict_layer_update, W, b, Y, Delta)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise _Failed("should return a pair (dW, db).")
        dW, db = _as_array(out[0], "dW"), _as_array(out[1], "db")
        ref_w, ref_b = relative_layer(W, b, Y, Delta, strict=True)
        if dW.shape != (D, D) or db.shape != (D,):
            raise _Failed(f"returned shapes {dW.shape}, {db.shape}; expected ({D}, {D}) and ({D},).")
        if not _close(dW, ref_w):
            hint = _match_mistake(dW, [
                (ref_w + W, "dW lacks the log-determinant term: subtract W (the relative gradient of "
                            "-log|det W| is -W^{-T} W^T W = -W)."),
                (ref_w + 2 * W, "dW has the log-determinant term with the wrong sign: subtract W, do not add it."),
                (Delta.T @ Y @ W.T @ W - W, "wrong transpose: use Delta^T (Y W), not Delta^T Y W^T W."),
            ])
            raise _Failed(hint or "dW is wrong: expected Delta^T (Y W) - W.")
        if not _close(db, ref_b):
            hint = _match_mistake(db, [
                (ref_b + b, "dW is right but db is not: you used the authors' bias rule (without the - b of the "
                            "augmented log-determinant gradient); the strict rule subtracts b."),
                (ref_b + 2 * b, "db has the bias term with the wrong sign: subtract b, do not add it."),
                (ref_b - Delta.sum(axis=0), "db lacks g_b = Delta^T 1 (the bias gradient of the data terms)."),
                (ref_b + b - Delta.sum(axis=0), "db lacks both g_b = Delta^T 1 and the strict - b."),
            ])
            raise _Failed(hint or "db is wrong: expected Delta^T (Y b) + Delta^T 1 - b.")
        cubic = _cubic_products(log, D)
        if cubic:
            raise _Failed(f"right values, wrong cost: a {D}x{D} by {D}x{D} product ({cubic[0]}) costs O(D^3); "
                          "evaluate Delta.T @ (Y @ W) and Delta.T @ (Y @ b) right to left.")
        return f"{_name(strict_layer_update)} gives the strict rule's (dW, db) in O(M D^2)."

    return _run("ex-biases-centred", strict_layer_update, body, strict)


def check_bpd_from_unit_nats(bpd_from_unit_nats: Callable[[float, int, int], float], *,
                             strict: bool = False) -> bool:
    """Check ``bpd_from_unit_nats(nats, dim, levels)``, bits per dimension in pixel units (``ex-cov-bpd``).

    ``nats`` is a mean log-likelihood per image in unit-cube coordinates; the reference is
    ``log2(levels) - nats / (dim ln 2)`` (:func:`relgrad.datasets.bits_per_dim` of the pixel-unit
    log-likelihood ``nats - dim log(levels)``).  Hints: the ``log2 K`` term of the scaling Jacobian forgotten
    or taken in nats, nats not converted to bits, no division by ``D``, the sign of the log-likelihood.

    Args:
        bpd_from_unit_nats: the student's function ``(float, int, int) -> float``.
        strict: raise ``AssertionError`` on failure (for autograding) instead of only printing.

    Returns:
        True when the function agrees with the reference on every case.
    """
    def body() -> str:
        cases = [(1500.0, 784, 256), (1500.0, 784, 16), (-250.0, 64, 17), (0.0, 3072, 256)]
        for nats, dim, levels in cases:
            got = _as_array(_result(bpd_from_unit_nats, nats, dim, levels), "the bits per dimension")
            ref = np.log2(levels) - nats / (dim * np.log(2))
            if got.shape != ():
                raise _Failed(f"returned an array of shape {got.shape}; expected one number.")
            if _close(got, np.asarray(ref)):
                continue
            hint = _match_mistake(got, [
                (np.asarray(-nats / (dim * np.log(2))), "the scaling from pixel units to the unit cube is "
                 "missing: add log2 K (the Jacobian of u -> u / K costs D log K nats, log2 K bits per dimension)."),
                (np.asarray(np.log(levels) - nats / (dim * np.log(2))), "you added log K in nats; in bits it is "
                 "log2 K."),
                (np.asarray(np.log2(levels) - nats / dim), "you left the log-likelihood in nats: divide by "
                 "D ln 2, not by D, to get bits per dimension."),
                (np.asarray(np.log2(levels) - nats / np.log(2)), "bits per *dimension*: divide by D as well."),
                (np.asarray(np.log2(levels) + nats / (dim * np.log(2))), "sign: bits per dimension are a code "
                 "length, -log p; a higher log-likelihood gives fewer bits."),
                (np.asarray(-ref), "the sign is flipped: bpd = log2 K - log p_X / (D ln 2)."),
            ])
            raise _Failed(hint or f"wrong value for nats = {nats}, D = {dim}, K = {levels}: expected {ref:.6f}, "
                                  f"got {float(got):.6f}.")
        return f"{_name(bpd_from_unit_nats)} agrees with log2 K - nats / (D ln 2) on {len(cases)} cases."

    return _run("ex-cov-bpd", bpd_from_unit_nats, body, strict)


def check_layer_jacobian(layer_jacobian: Callable[..., np.ndarray], *, strict: bool = False) -> bool:
    """Check ``layer_jacobian(W, b, z, phi_prime)`` = ``diag(phi'(W z + b)) W`` (``ex-jacobian-layer``).

    Seeded ``D = 5`` inputs with ``phi = tanh`` and with the smooth leaky ReLU (``alpha = 0.3``).  Hints:
    ``phi'`` scaling the columns instead of the rows (``W diag(phi')``), ``phi'`` taken at ``z`` or at
    ``W z`` (bias forgotten) instead of the pre-activation ``W z + b``, the diagonal or ``W`` alone, a
    transposed result.

    Args:
        layer_jacobian: the student's function ``(W (D, D), b (D,), z (D,), phi_prime) -> (D, D)``;
            ``phi_prime`` maps an array to the elementwise derivative of the activation.
        strict: raise ``AssertionError`` on failure (for autograding) instead of only printing.

    Returns:
        True when the function agrees with the reference for both activations.
    """
    def body() -> str:
        rng = np.random.default_rng(20244)
        D = 5
        W, b, z = rng.standard_normal((D, D)), rng.standard_normal(D), rng.standard_normal(D)
        cases = [(lambda y: 1.0 - np.tanh(y) ** 2, "tanh"),
                 (lambda y: sigma_prime(y, 0.3), "the smooth leaky ReLU")]
        for phi_prime, what in cases:
            got = _as_array(_result(layer_jacobian, W.copy(), b.copy(), z.copy(), phi_prime), "the Jacobian")
            y = W @ z + b
            ref = phi_prime(y)[:, None] * W
            if got.shape != (D, D):
                raise _Failed(f"returned shape {got.shape}, expected ({D}, {D}).")
            if _close(got, ref):
                continue
            hint = _match_mistake(got, [
                (W * phi_prime(y)[None, :], "phi'(y) scales the columns of W in your answer (W diag(phi')); "
                 "it must scale the rows: entry (i, j) is phi'(y_i) W_ij, i.e. diag(phi'(y)) W."),
                (phi_prime(z)[:, None] * W, "phi' must be taken at the pre-activation y = W z + b, not at z."),
                (phi_prime(W @ z)[:, None] * W, "the bias is missing: phi' is taken at y = W z + b."),
                (ref.T, "your Jacobian is transposed: row i holds the derivatives of output i."),
                (np.diag(phi_prime(y)), "you returned diag(phi'(y)) alone; the chain rule multiplies it by W."),
                (W, "you returned W: the activation contributes the factor diag(phi'(W z + b))."),
            ])
            raise _Failed(hint or f"wrong value for phi = {what}: expected diag(phi'(W z + b)) W.")
        return f"{_name(layer_jacobian)} returns diag(phi'(W z + b)) W (checked with tanh and the smooth leaky ReLU)."

    return _run("ex-jacobian-layer", layer_jacobian, body, strict)


def check_ica_step(ica_step: Callable[[np.ndarray, np.ndarray, float], np.ndarray], *,
                   strict: bool = False) -> bool:
    """Check ``ica_step(W, X, mu)``, one relative-gradient ICA ascent step (``ex-rel-ica-adam``).

    Reference: ``W + mu (I + E[phi(s) s^T]) W`` with ``phi = -tanh``, ``s = W x`` and rows of ``X`` the
    samples (so ``S = X W^T`` and ``E[phi(s) s^T] = phi(S)^T S / N``), on seeded Laplace data.  Hints: the
    ordinary (infomax) step with ``W^{-T}``, the identity forgotten, the outer product transposed, a sum
    instead of a mean, ``phi = +tanh``, ``W`` multiplied from the wrong side, the direction returned
    without the step.

    Args:
        ica_step: the student's function ``(W (D, D), X (N, D), mu) -> (D, D)``.
        strict: raise ``AssertionError`` on failure (for autograding) instead of only printing.

    Returns:
        True when the function agrees with the reference.
    """
    def body() -> str:
        rng = np.random.default_rng(20245)
        N, D, mu = 200, 3, 0.05
        X = rng.laplace(size=(N, D)) @ rng.standard_normal((D, D)).T
        W = np.eye(D) + 0.3 * rng.standard_normal((D, D))
        got = _as_array(_result(ica_step, W.copy(), X.copy(), mu), "the new W")
        S = X @ W.T
        phi = -np.tanh(S)
        C = phi.T @ S / N                       # E[phi(s) s^T]
        ref = W + mu * (np.eye(D) + C) @ W
        if got.shape != (D, D):
            raise _Failed(f"returned shape {got.shape}, expected ({D}, {D}).")
        if not _close(got, ref):
            ordinary = np.linalg.inv(W).T + phi.T @ X / N
            hint = _match_mistake(got, [
                (W + mu * ordinary, "that is the ordinary (infomax) step, W + mu (W^-T + E[phi(s) x^T]); the "
                 "relative step multiplies it by W^T W: W + mu (I + E[phi(s) s^T]) W, with no inverse."),
                (W + mu * C @ W, "the identity is missing: the direction is (I + E[phi(s) s^T]) W."),
                (W + mu * (np.eye(D) + C.T) @ W, "the outer product is transposed: E[phi(s) s^T] has "
                 "entries E[phi(s_i) s_j], i.e. phi(S).T @ S / N with S = X @ W.T."),
                (W + mu * (np.eye(D) + N * C) @ W, "use the mean over samples, not the sum: divide "
                 "phi(S).T @ S by N."),
                (W + mu * (np.eye(D) - C) @ W, "phi is -tanh (the score of a super-Gaussian source), not +tanh."),
                (W + mu * W @ (np.eye(D) + C), "the factor W belongs on the right: the direction is "
                 "(I + E[phi(s) s^T]) W, not W (I + E[phi(s) s^T])."),
                ((np.eye(D) + C) @ W, "you returned the direction; the step is W + mu * direction."),
                (W - mu * (np.eye(D) + C) @ W, "this is an ascent step on the log-likelihood: add mu * direction."),
            ])
            raise _Failed(hint or "wrong value: expected W + mu (I + E[phi(s) s^T]) W with phi = -tanh, S = X W^T.")
        return f"{_name(ica_step)} takes the relative-gradient ICA step W + mu (I + E[phi(s) s^T]) W."

    return _run("ex-rel-ica-adam", ica_step, body, strict)


def check_activity_relative_gradient(activity_relative_gradient: Callable[[np.ndarray, np.ndarray, float], np.ndarray],
                                     *, strict: bool = False) -> bool:
    """Check ``activity_relative_gradient(W, Z, lam)`` = ``(lam / M) Y^T (Y W)``, ``Y = Z W^T`` (``ex-limits-activity``).

    The relative gradient (update direction ``grad W^T W``) of the activity penalty
    ``lam / (2M) sum_m ||W z_m||^2`` on seeded inputs with ``M = 3``, ``D = 30``; products are recorded and a
    ``D x D`` by ``D x D`` one fails.  Hints: the ordinary gradient, ``W^T W`` forgotten on one side, the
    ``1/M`` or ``lam`` forgotten, the cubic order.

    Args:
        activity_relative_gradient: the student's function ``(W (D, D), Z (M, D), lam) -> (D, D)``.
        strict: raise ``AssertionError`` on failure (for autograding) instead of only printing.

    Returns:
        True when the values agree and no cubic product was taken.
    """
    def body() -> str:
        rng = np.random.default_rng(20246)
        M, D, lam = 3, 30, 0.7
        W, Z = rng.standard_normal((D, D)), rng.standard_normal((M, D))
        out, log = _counted_call(activity_relative_gradient, W, Z, np.float64(lam))
        got = _as_array(out, "the relative gradient")
        Y = Z @ W.T
        ref = lam / M * Y.T @ (Y @ W)
        if got.shape != (D, D):
            raise _Failed(f"returned shape {got.shape}, expected ({D}, {D}).")
        if not _close(got, ref):
            grad = lam / M * Y.T @ Z
            hint = _match_mistake(got, [
                (grad, "you returned the ordinary gradient (lam/M) Y^T Z; multiply it by W^T W from the right."),
                (grad @ W.T, "you stopped at grad W^T; the update direction is grad W^T W."),
                (lam * Y.T @ (Y @ W), "the 1/M of the mean over the batch is missing."),
                (Y.T @ (Y @ W) / M, "the factor lam is missing."),
                (lam / M * Y.T @ (Y @ W.T), "wrong transpose: Y^T (Y W), with Y = Z W^T."),
                (lam / M * Z.T @ (Z @ W), "the penalty acts on Y = Z W^T: the result is (lam/M) Y^T (Y W)."),
            ])
            raise _Failed(hint or "wrong value: expected (lam / M) Y^T (Y W) with Y = Z W^T.")
        cubic = _cubic_products(log, D)
        if cubic:
            raise _Failed(f"right value, wrong cost: a {D}x{D} by {D}x{D} product ({cubic[0]}) costs O(D^3); "
                          "evaluate (lam / M) * Y.T @ (Y @ W) with Y = Z @ W.T: three O(M D^2) products.")
        return f"{_name(activity_relative_gradient)} returns (lam/M) Y^T (Y W) in O(M D^2)."

    return _run("ex-limits-activity", activity_relative_gradient, body, strict)


def check_sigma_inverse(sigma_inverse_newton: Callable[[np.ndarray, float], np.ndarray], *,
                        strict: bool = False) -> bool:
    """Check ``sigma_inverse_newton(v, alpha)``, the Newton inverse of the smooth leaky ReLU (``ex-sampling-newton``).

    The answer ``u`` must satisfy ``sigma(u, alpha) = v`` to ``1e-12`` relative (compared with
    :func:`relgrad.numpy.sigma_inverse`) for ``|v|`` from 0 to ``1e4``, for arrays of any shape (a 0-d array
    and a ``(3, 4)`` array included) and both ``alpha = 0.3`` and ``0.01``, without changing ``v``.  Hints:
    ``sigma`` applied instead of its inverse, a Newton step with the wrong sign or divided by ``sigma``
    instead of ``sigma'``, too few iterations, ``inf``/NaN from an overflowing softplus at large ``|v|``,
    a Python ``if`` on an array, a changed shape, ``v`` overwritten.

    Args:
        sigma_inverse_newton: the student's function ``(v array (...), alpha) -> array (...)``.
        strict: raise ``AssertionError`` on failure (for autograding) instead of only printing.

    Returns:
        True when every case is solved to rounding.
    """
    def body() -> str:
        rng = np.random.default_rng(20247)
        grid = np.array([-1e4, -300.0, -50.0, -5.0, -1.0, -0.1, 0.0, 0.1, 1.0, 5.0, 50.0, 800.0, 1e4])
        cases = [(grid, 0.3), (grid, 0.01), (np.array(-2.5), 0.3), (3.0 * rng.standard_normal((3, 4)), 0.3)]
        for v, alpha in cases:
            v_in = v.copy()
            with np.errstate(all="ignore"):
                raw = _call(sigma_inverse_newton, v_in, alpha)
            if raw is _NOT_IMPLEMENTED:
                raise _NotImplementedYet
            got = _as_array(raw, "the inverse")
            if not np.array_equal(v_in, v):
                raise _Failed("your function changed its input v in place; work on a copy (u = v.copy(), or "
                              "np.where(...), which returns a new array).")
            ref = sigma_inverse(v, alpha)
            if got.shape != v.shape:
                raise _Failed(f"returned shape {got.shape} for v of shape {v.shape}; the inverse acts elementwise "
                              "and keeps the shape.")
            if _close(got, ref, rtol=1e-12, atol=1e-13):
                continue
            bad = ~np.isclose(got, ref, rtol=1e-12, atol=1e-13)
            where = f"(alpha = {alpha}, first wrong v = {v[bad].flat[0]:g}: expected {ref[bad].flat[0]:.15g}, " \
                    f"got {got[bad].flat[0]:.15g})"
            if not np.all(np.isfinite(got)):
                small = np.abs(v) <= 5
                if np.all(np.isfinite(got[small])) and _close(got[small], ref[small], rtol=1e-12, atol=1e-13):
                    raise _Failed(f"inf or NaN in the result {where}, only at large |v|: exp overflows. Compute "
                                  "softplus(u) as np.logaddexp(0, u) (or max(u, 0) + log1p(exp(-|u|))) and the "
                                  "sigmoid without the exp of a large positive number.")
                raise _Failed(f"inf or NaN in the result {where}: the iteration diverged. Newton's step is "
                              "u - (sigma(u) - v) / sigma'(u), minus sign, divided by the derivative "
                              "sigma'(u) = alpha + (1 - alpha) sigmoid(u).")
            with np.errstate(all="ignore"):
                forward = sigma(v, alpha)
            hint = _match_mistake(got, [
                (forward, "you applied sigma, not its inverse: solve sigma(u) = v for u."),
                (v, "you returned v unchanged: no Newton step was taken."),
            ])
            if hint is None:
                with np.errstate(all="ignore"):
                    residual = np.abs(sigma(got, alpha) - v) / np.maximum(1.0, np.abs(v))
                if np.nanmax(residual) < 1e-3:
                    hint = (f"close but not converged {where}: iterate until the step no longer changes u (a fixed "
                            "small number of steps is not enough from every start), and start to the right of "
                            "the root: u0 = v for v >= 0, v / alpha for v < 0.")
                else:
                    hint = (f"sigma(u) is far from v {where}. Newton's step is u - (sigma(u) - v) / sigma'(u) with "
                            "sigma'(u) = alpha + (1 - alpha) sigmoid(u); do not divide by sigma(u).")
            raise _Failed(hint)
        return (f"{_name(sigma_inverse_newton)} solves sigma(u) = v to rounding for |v| up to 1e4, alpha 0.3 and 0.01, "
                "any shape.")

    return _run("ex-sampling-newton", sigma_inverse_newton, body, strict)


def _first_mismatch(got: np.ndarray, ref: np.ndarray, mistakes: Sequence[Tuple[np.ndarray, str]], what: str) -> None:
    """Raise _Failed with the hint of the mistake ``got`` matches, else a generic message."""
    if got.shape != ref.shape:
        raise _Failed(f"returned shape {got.shape}, expected {ref.shape}.")
    if not _close(got, ref):
        raise _Failed(_match_mistake(got, mistakes) or what)


def check_lognormal_density(lognormal_density: Callable[[np.ndarray], np.ndarray], *, strict: bool = False) -> bool:
    """Check ``lognormal_density(x)``, the density of ``exp(S)``, ``S ~ N(0, 1)`` (``ex-cov-lognormal``).

    Reference ``phi(log x) / x`` on a seeded array of positive numbers.  Hints: the Jacobian ``1/x``
    forgotten, multiplied by ``x`` instead of divided, the normal density taken at ``x`` instead of ``log x``,
    the ``1/sqrt(2 pi)`` forgotten.

    Args:
        lognormal_density: the student's function, array ``(N,)`` of positive numbers -> array ``(N,)``.
        strict: raise ``AssertionError`` on failure (for autograding) instead of only printing.

    Returns:
        True when the function agrees with the reference.
    """
    def body() -> str:
        x = np.exp(np.random.default_rng(20248).standard_normal(12) * 1.5)
        got = _as_array(_result(lognormal_density, x.copy()), "the density")
        phi = np.exp(-0.5 * np.log(x) ** 2) / np.sqrt(2 * np.pi)
        _first_mismatch(got, phi / x, [
            (phi, "the Jacobian is missing: p_X(x) = p_S(log x) |d log x / dx| = phi(log x) / x."),
            (phi * x, "multiply by |g'(x)| = 1/x, i.e. divide by x (you multiplied by x)."),
            (np.exp(-0.5 * x ** 2) / np.sqrt(2 * np.pi) / x, "the normal density is taken at g(x) = log x, "
             "not at x."),
            (np.exp(-0.5 * np.log(x) ** 2) / x, "the normal density's 1/sqrt(2 pi) is missing."),
        ], "wrong value: expected phi(log x) / x with phi the standard normal density.")
        return f"{_name(lognormal_density)} returns phi(log x) / x (the log-normal density)."

    return _run("ex-cov-lognormal", lognormal_density, body, strict)


def check_logdet_by_hand(logdet_by_hand: Callable[[np.ndarray], float], *, strict: bool = False) -> bool:
    """Check ``logdet_by_hand(p)`` = ``log|det J_g(p)|`` for ``g(x) = (x1 + sin(x2)/2, x2 + tanh(x1)/2)`` (``ex-cov-logdet-2x2``).

    Reference ``log(1 - cos(x2) (1 - tanh(x1)^2) / 4)`` at seeded points.  Hints: the determinant without
    the logarithm, the product of the diagonal only (``0``), a ``+`` for the off-diagonal product, the
    derivative of ``tanh`` taken as ``1 - tanh`` or ``tanh``.

    Args:
        logdet_by_hand: the student's function, one point ``(2,)`` -> a number.
        strict: raise ``AssertionError`` on failure (for autograding) instead of only printing.

    Returns:
        True when the function agrees with the reference at every point.
    """
    def body() -> str:
        points = np.random.default_rng(20249).standard_normal((6, 2)) * 1.5
        for p in points:
            got = _as_array(_result(logdet_by_hand, p.copy()), "log|det J|")
            c, t = np.cos(p[1]), np.tanh(p[0])
            det = 1 - 0.25 * c * (1 - t ** 2)
            _first_mismatch(got, np.asarray(np.log(det)), [
                (np.asarray(det), "you returned det J; take its logarithm (log|det J|)."),
                (np.asarray(0.0), "log of the diagonal product only: det J = 1 * 1 - (off-diagonal product), "
                                  "subtract (cos x2 / 2)(tanh'(x1) / 2)."),
                (np.asarray(np.log(1 + 0.25 * c * (1 - t ** 2))), "det [[a, b], [c, d]] = ad - bc: subtract the "
                                                                "off-diagonal product, do not add it."),
                (np.asarray(np.log(1 - 0.25 * c * (1 - t))), "tanh'(x) = 1 - tanh(x)^2, not 1 - tanh(x)."),
                (np.asarray(np.log(1 - 0.25 * c * t)), "the derivative of tanh is 1 - tanh^2, not tanh."),
            ], f"wrong value at p = {p.round(3).tolist()}: expected {np.log(det):.6f}.")
        return f"{_name(logdet_by_hand)} agrees with log(1 - cos(x2)(1 - tanh(x1)^2)/4) at {len(points)} points."

    return _run("ex-cov-logdet-2x2", logdet_by_hand, body, strict)


def check_training_memory_gib(training_memory_gib: Callable[..., float], *, strict: bool = False) -> bool:
    """Check ``training_memory_gib(dim, n_layers, bytes_per_number=4)`` (``ex-limits-memory``).

    Reference: ``3 * bytes * L (D^2 + D) / 2^30`` (parameters and Adam's two moments).  Hints: biases
    forgotten, Adam's moments forgotten or counted once, decimal gigabytes instead of GiB, the default of
    ``bytes_per_number`` not 4.

    Args:
        training_memory_gib: the student's function ``(dim, n_layers, bytes_per_number=4) -> float``.
        strict: raise ``AssertionError`` on failure (for autograding) instead of only printing.

    Returns:
        True when every case agrees.
    """
    def body() -> str:
        for dim, layers, nbytes in ((784, 2, 4), (10, 3, 8), (4096, 1, 2)):
            got = _as_array(_result(training_memory_gib, dim, layers, nbytes), "the memory")
            params = layers * (dim ** 2 + dim)
            _first_mismatch(got, np.asarray(3 * nbytes * params / 2 ** 30), [
                (np.asarray(3 * nbytes * layers * dim ** 2 / 2 ** 30), "the biases are missing: each layer has "
                 "D^2 + D parameters."),
                (np.asarray(nbytes * params / 2 ** 30), "Adam's two moment estimates are missing: three numbers per "
                 "parameter."),
                (np.asarray(2 * nbytes * params / 2 ** 30), "Adam keeps two numbers per parameter on top of the "
                 "parameter itself: three in all."),
                (np.asarray(3 * nbytes * params / 1e9), "GiB are 2^30 bytes, not 10^9."),
            ], f"wrong value for D = {dim}, L = {layers}, {nbytes} bytes per number.")
        got = _as_array(_result(training_memory_gib, 784, 2), "the memory")
        if not _close(got, np.asarray(12 * 2 * (784 ** 2 + 784) / 2 ** 30)):
            raise _Failed("the default bytes_per_number should be 4 (float32).")
        return f"{_name(training_memory_gib)} counts 3 numbers per parameter, L (D^2 + D) parameters, in GiB."

    return _run("ex-limits-memory", training_memory_gib, body, strict)


def check_logit_nats_to_bpd(logit_nats_to_bpd: Callable[..., float], *, strict: bool = False) -> bool:
    """Check ``logit_nats_to_bpd(mean_logit_nats, y, lam, levels)`` (``ex-images-convert``).

    Reference: ``-(mean_logit_nats + mean log|det dy/dx| - D log K) / (D ln 2)`` with the log-Jacobian of the
    logit transform averaged over the images ``y`` (:func:`relgrad.datasets.logit_log_jacobian`).  Hints: the
    logit Jacobian or the ``D log K`` term forgotten, nats not converted to bits, the sign.

    Args:
        logit_nats_to_bpd: the student's function ``(float, y (N, D), lam, levels) -> float``.
        strict: raise ``AssertionError`` on failure (for autograding) instead of only printing.

    Returns:
        True when the function agrees with the reference.
    """
    def body() -> str:
        rng = np.random.default_rng(20250)
        levels, lam, nats = 17, 1e-6, -120.0
        x = dequantize(rng.integers(0, levels, (40, 64)), levels=levels, rng=rng)
        y = logit_transform(x, lam)[0]
        d, jac = y.shape[1], float(np.mean(logit_log_jacobian(y, lam)))
        got = _as_array(_result(logit_nats_to_bpd, nats, y.copy(), lam, levels), "the bits per dimension")
        ref = -(nats + jac - d * np.log(levels)) / (d * np.log(2))
        _first_mismatch(got, np.asarray(ref), [
            (np.asarray(-(nats - d * np.log(levels)) / (d * np.log(2))), "the logit transform's log-Jacobian "
             "is missing: add its mean over the images (logit_log_jacobian(y, lam))."),
            (np.asarray(-(nats + jac) / (d * np.log(2))), "the D log K of the scaling u -> u / K is missing."),
            (np.asarray(-(nats + jac - d * np.log(levels)) / d), "that is nats per dimension: divide by D ln 2."),
            (np.asarray(-ref), "the sign is flipped: bits per dimension are -log p_U / (D ln 2)."),
            (np.asarray(-(nats - jac - d * np.log(levels)) / (d * np.log(2))), "the log-Jacobian enters with a "
             "plus sign: log p_U = log p_Y + log|det dy/dx| - D log K."),
        ], f"wrong value: expected {ref:.6f} bits/dim.")
        return f"{_name(logit_nats_to_bpd)} converts logit-space nats to bits/dim with the mean Jacobian."

    return _run("ex-images-convert", logit_nats_to_bpd, body, strict)
