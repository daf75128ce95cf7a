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

=========================================  ================================  ===============================================
check                                      exercise label                    function checked
=========================================  ================================  ===============================================
:func:`check_logdet_grad_2x2`              ``ex-logdet-two``                 ``logdet_grad_2x2(W)``
:func:`check_relative_gradient`            ``ex-rel-examples``               ``relative_gradient(f, W)``
:func:`check_left_relative_weight_update`  ``ex-rel-left``                   ``left_relative_weight_update(Delta, Z, W)``
:func:`check_strict_layer_update`          ``ex-biases-centred``             ``strict_layer_update(W, b, Y, Delta)``
:func:`check_bpd_from_unit_nats`           ``ex-cov-bpd``                    ``bpd_from_unit_nats(nats, dim, levels)``
:func:`check_layer_jacobian`               ``ex-jacobian-layer``             ``layer_jacobian(W, b, z, phi_prime)``
:func:`check_ica_step`                     ``ex-rel-ica-adam``               ``ica_step(W, X, mu)``
:func:`check_whiten`                       ``ex-ica-whitening``              ``whiten(X)``
:func:`check_activity_relative_gradient`   ``ex-limits-activity``            ``activity_relative_gradient(W, Z, lam)``
:func:`check_sigma_inverse`                ``ex-sampling-newton``            ``sigma_inverse_newton(v, alpha)``
:func:`check_sigma_inverse_bisect`         ``ex-sampling-bisection``         ``sigma_inverse_bisect(v, alpha, tol)``
:func:`check_make_sampler`                 ``ex-sampling-cached``            ``make_sampler(model)``
:func:`check_lognormal_density`            ``ex-cov-lognormal``              ``lognormal_density(x)``
:func:`check_logdet_by_hand`               ``ex-cov-logdet-2x2``             ``logdet_by_hand(p)``
:func:`check_training_memory_gib`          ``ex-limits-memory``              ``training_memory_gib(dim, n_layers, batch)``
:func:`check_logit_nats_to_bpd`            ``ex-images-convert``             ``logit_nats_to_bpd(nats, y, lam, levels)``
:func:`check_logit_space_nats`             ``ex-images-lambda``              ``logit_space_nats(x, lam)``
:func:`check_laplace_deltas`               ``ex-backprop-laplace``           ``laplace_deltas(model, x)``
:func:`check_accumulator_deltas`           ``ex-backprop-accumulator``       ``accumulator_deltas(tmodel, x)``
:func:`check_conv1x1_relative_gradient`    ``ex-backprop-conv1x1``           ``conv1x1_relative_gradient(x, W)``
:func:`check_density_lower_bound`          ``ex-toy-densities-lower-bound``  ``density_lower_bound(model, radius)``
=========================================  ================================  ===============================================

Operation counts (the "you formed ``W^T W`` first" hints) are measured by behaviour, not by timing: the
student's function receives NumPy arrays of a subclass that records the shapes of every matrix product
(``@``, ``np.matmul``, ``np.dot``, ``ndarray.dot``); a product of two ``D x D`` matrices is the cubic
mistake.  A function that computes without any visible product (``np.einsum``, a conversion to torch) is
checked on its values only, and the check says so.  The same arrays record the ``numpy.linalg`` functions
they are passed to (an inverse where the exercise is to do without one); a sampler that should factorise
once is observed by recording the calls to ``numpy.linalg``'s factorisations while it draws.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..datasets import dequantize, logit_log_jacobian, logit_transform
from ..numpy.activation import sigma, sigma_inverse, sigma_prime
from ..numpy.gradients import relative_layer

__all__ = [
    "EXERCISE_CHECKS",
    "check_accumulator_deltas",
    "check_activity_relative_gradient",
    "check_bpd_from_unit_nats",
    "check_conv1x1_relative_gradient",
    "check_density_lower_bound",
    "check_ica_step",
    "check_laplace_deltas",
    "check_layer_jacobian",
    "check_left_relative_weight_update",
    "check_logdet_by_hand",
    "check_logdet_grad_2x2",
    "check_logit_nats_to_bpd",
    "check_logit_space_nats",
    "check_lognormal_density",
    "check_make_sampler",
    "check_relative_gradient",
    "check_sigma_inverse",
    "check_sigma_inverse_bisect",
    "check_strict_layer_update",
    "check_training_memory_gib",
    "check_whiten",
]

#: exercise label -> name of the check function in this module.
EXERCISE_CHECKS: Dict[str, str] = {
    "ex-logdet-two": "check_logdet_grad_2x2",
    "ex-rel-examples": "check_relative_gradient",
    "ex-rel-left": "check_left_relative_weight_update",
    "ex-biases-centred": "check_strict_layer_update",
    "ex-cov-bpd": "check_bpd_from_unit_nats",
    "ex-jacobian-layer": "check_layer_jacobian",
    "ex-rel-ica-adam": "check_ica_step",
    "ex-ica-whitening": "check_whiten",
    "ex-limits-activity": "check_activity_relative_gradient",
    "ex-sampling-newton": "check_sigma_inverse",
    "ex-sampling-bisection": "check_sigma_inverse_bisect",
    "ex-sampling-cached": "check_make_sampler",
    "ex-cov-lognormal": "check_lognormal_density",
    "ex-cov-logdet-2x2": "check_logdet_by_hand",
    "ex-limits-memory": "check_training_memory_gib",
    "ex-images-convert": "check_logit_nats_to_bpd",
    "ex-images-lambda": "check_logit_space_nats",
    "ex-backprop-laplace": "check_laplace_deltas",
    "ex-backprop-accumulator": "check_accumulator_deltas",
    "ex-backprop-conv1x1": "check_conv1x1_relative_gradient",
    "ex-toy-densities-lower-bound": "check_density_lower_bound",
}

_NOT_IMPLEMENTED = object()


class _Failed(Exception):
    """Raised inside a check to stop it with a hint."""


# --------------------------------------------------------------------------------------------- helpers


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__name__", repr(fn))


def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call the student's function; NotImplementedError -> sentinel, other errors -> a hint."""
    try:
        return fn(*args, **kwargs)
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


def _result(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    out = _call(fn, *args, **kwargs)
    if out is _NOT_IMPLEMENTED:
        raise _NotImplementedYet
    return out


# ------------------------------------------------------------------------------------ counting products


class _Counted(np.ndarray):
    """An ndarray that records the operand shapes of every matrix product it takes part in, and the names of
    the ``numpy.linalg`` functions (``inv``, ``solve``, ...) it is passed to."""

    log: List[Tuple[Tuple[int, ...], Tuple[int, ...]]]
    linalg: List[str]

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        plain = [np.asarray(x) if isinstance(x, _Counted) else x for x in inputs]
        if ufunc is np.matmul and method == "__call__":
            _Counted.log.append((np.shape(plain[0]), np.shape(plain[1])))
        if "out" in kwargs:
            kwargs["out"] = tuple(np.asarray(o) if isinstance(o, _Counted) else o for o in kwargs["out"])
        result = getattr(ufunc, method)(*plain, **kwargs)
        return _wrap(result)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        if getattr(func, "__module__", "") == "numpy.linalg":
            _Counted.linalg.append(func.__name__)
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
_Counted.linalg = []


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
    out, log, _ = _counted_call_linalg(fn, *arrays)
    return out, log


def _counted_call_linalg(fn: Callable[..., Any], *arrays: np.ndarray
                         ) -> Tuple[Any, List[Tuple[Tuple[int, ...], ...]], List[str]]:
    """As :func:`_counted_call`, and also the names of the ``numpy.linalg`` functions called on the inputs."""
    _Counted.log, _Counted.linalg = [], []
    try:
        out = _result(fn, *[np.array(a).view(_Counted) for a in arrays])
        log, linalg = list(_Counted.log), list(_Counted.linalg)
    finally:
        _Counted.log, _Counted.linalg = [], []
    return _unwrap(out), log, linalg


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


def check_left_relative_weight_update(
        left_relative_weight_update: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray], *,
        strict: bool = False) -> bool:
    """Check ``left_relative_weight_update(Delta, Z, W)`` = ``W W^T Delta^T Z - W`` in ``O(M D^2)`` (``ex-rel-left``).

    The update direction of the perturbation ``W -> W (I + eps)`` for the whole loss of one layer (data part
    ``Delta^T Z``, log-determinant part ``-W^{-T}``, so ``W W^T (Delta^T Z - W^{-T}) = W W^T Delta^T Z - W``), on
    seeded inputs with ``M = 3`` and ``D = 40``; every matrix product is recorded and one of two ``D x D``
    matrices (``W W^T``, or ``W (W^T Delta^T Z)`` when ``Delta^T Z`` is formed first) costs ``O(D^3)`` and
    fails.  Hints: the right relative update ``Delta^T Z W^T W - W`` instead of the left one, the ``-W`` of the
    log-determinant forgotten or with the wrong sign, ``W^T W`` instead of ``W W^T``, the outer product
    transposed, the cubic order.

    Args:
        left_relative_weight_update: the student's function ``(Delta (M, D), Z (M, D), W (D, D)) -> (D, D)``.
        strict: raise ``AssertionError`` on failure (for autograding) instead of only printing.

    Returns:
        True when the values agree and no ``D x D`` by ``D x D`` product was taken.
    """
    def body() -> str:
        rng = np.random.default_rng(20242)
        M, D = 3, 40
        Delta, Z, W = rng.standard_normal((M, D)), rng.standard_normal((M, D)), rng.standard_normal((D, D))
        out, log = _counted_call(left_relative_weight_update, Delta, Z, W)
        got = _as_array(out, "the weight update")
        G = Delta.T @ Z  # the ordinary gradient of the data part
        ref = W @ (W.T @ G) - W
        if got.shape != (D, D):
            raise _Failed(f"returned shape {got.shape}, expected ({D}, {D}) for Delta, Z of shape ({M}, {D}).")
        if not _close(got, ref):
            hint = _match_mistake(got, [
                (G @ W.T @ W - W, "that is the right relative update Delta^T Z W^T W - W (perturbation (I + eps) W); "
                                  "perturbing W (I + eps) puts the factor W W^T on the left: W W^T Delta^T Z - W."),
                (W @ W.T @ G, "the log-determinant term is missing: subtract W (W W^T times the -W^{-T} of "
                              "-log|det W| is -W)."),
                (W @ W.T @ G + W, "the log-determinant term has the wrong sign: the loss contains -log|det W|, "
                                  "whose part of the update is -W."),
                (W.T @ W @ G - W, "wrong transpose: W (I + eps) = W + W eps gives the factor W W^T, not W^T W."),
                (W @ W.T @ Z.T @ Delta - W, "you transposed the outer product: the data gradient is Delta^T Z, "
                                            "not Z^T Delta."),
                (G, "you returned Delta^T Z, the ordinary data gradient: multiply it by W W^T from the left and "
                    "subtract W."),
                (G - W, "the factor W W^T is missing in front of Delta^T Z."),
            ])
            raise _Failed(hint or "wrong value: expected W W^T Delta^T Z - W = ((Delta @ W) @ W.T).T @ Z - W.")
        cubic = _cubic_products(log, D)
        if cubic:
            raise _Failed(f"right value, wrong cost: you multiplied two {D}x{D} matrices ({cubic[0]}), which "
                          "costs O(D^3). Do not form W W^T (or Delta^T Z) first: evaluate "
                          "((Delta @ W) @ W.T).T @ Z - W, three products of O(M D^2).")
        if not log:
            return (f"{_name(left_relative_weight_update)} returns the right values (its operation count could not "
                    "be observed: no @/np.matmul/np.dot on the inputs).")
        return (f"{_name(left_relative_weight_update)} returns W W^T Delta^T Z - W with {len(log)} products, none of "
                "them D x D by D x D.")

    return _run("ex-rel-left", left_relative_weight_update, body, strict)


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

    Reference: ``W + mu (I + E[phi(y) y^T]) W`` with ``phi = -tanh``, ``y = W x`` and rows of ``X`` the
    samples (so ``Y = X W^T`` and ``E[phi(y) y^T] = phi(Y)^T Y / N``), on seeded Laplace data.  Hints: the
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
        C = phi.T @ S / N                       # E[phi(y) y^T]
        ref = W + mu * (np.eye(D) + C) @ W
        if got.shape != (D, D):
            raise _Failed(f"returned shape {got.shape}, expected ({D}, {D}).")
        if not _close(got, ref):
            ordinary = np.linalg.inv(W).T + phi.T @ X / N
            hint = _match_mistake(got, [
                (W + mu * ordinary, "that is the ordinary (infomax) step, W + mu (W^-T + E[phi(y) x^T]); the "
                 "relative step multiplies it by W^T W: W + mu (I + E[phi(y) y^T]) W, with no inverse."),
                (W + mu * C @ W, "the identity is missing: the direction is (I + E[phi(y) y^T]) W."),
                (W + mu * (np.eye(D) + C.T) @ W, "the outer product is transposed: E[phi(y) y^T] has "
                 "entries E[phi(s_i) s_j], i.e. phi(S).T @ S / N with S = X @ W.T."),
                (W + mu * (np.eye(D) + N * C) @ W, "use the mean over samples, not the sum: divide "
                 "phi(S).T @ S by N."),
                (W + mu * (np.eye(D) - C) @ W, "phi is -tanh (the score of a super-Gaussian source), not +tanh."),
                (W + mu * W @ (np.eye(D) + C), "the factor W belongs on the right: the direction is "
                 "(I + E[phi(y) y^T]) W, not W (I + E[phi(y) y^T])."),
                ((np.eye(D) + C) @ W, "you returned the direction; the step is W + mu * direction."),
                (W - mu * (np.eye(D) + C) @ W, "this is an ascent step on the log-likelihood: add mu * direction."),
            ])
            raise _Failed(hint or "wrong value: expected W + mu (I + E[phi(y) y^T]) W with phi = -tanh, Y = X W^T.")
        return f"{_name(ica_step)} takes the relative-gradient ICA step W + mu (I + E[phi(y) y^T]) W."

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
    """Check ``training_memory_gib(dim, n_layers, batch=0, *, bytes_per_number=4)`` (``ex-limits-memory``).

    Reference: ``bytes * (3 L (D^2 + D) + 2 L M D) / 2^30`` GiB: the parameters and Adam's two moments (three
    numbers per parameter) and, for a batch of ``M = batch`` samples, the activations the backward pass reads,
    ``z_{k-1}`` and ``y_k`` (``M x D`` each) for every layer, the arrays a :class:`relgrad.numpy.Trace` keeps.
    ``batch = 0`` gives the parameters and Adam state alone.  Called as ``fn(D, L, M, bytes_per_number=b)`` and
    with the defaults ``fn(D, L)`` and ``fn(D, L, M)``.  Hints: the activations forgotten, only ``z`` or only
    ``y`` counted, the activations of one layer only, ``s`` counted on top of ``y_L``, Adam's moments given to
    the activations, the biases forgotten, Adam's moments forgotten or counted once, decimal gigabytes instead
    of GiB, the defaults (``batch = 0``, ``bytes_per_number = 4``) or the order of the arguments.

    Args:
        training_memory_gib: the student's function ``(dim, n_layers, batch=0, *, bytes_per_number=4) -> float``.
        strict: raise ``AssertionError`` on failure (for autograding) instead of only printing.

    Returns:
        True when every case agrees.
    """
    def call(*args: Any, **kwargs: Any) -> np.ndarray:
        try:
            return _as_array(_result(training_memory_gib, *args, **kwargs), "the memory")
        except _Failed as failure:
            if "multiple values" in str(failure) or "unexpected keyword" in str(failure):
                raise _Failed(f"{failure}. The signature is training_memory_gib(dim, n_layers, batch=0, *, "
                              "bytes_per_number=4): batch is the third argument.") from failure
            raise

    def body() -> str:
        for dim, layers, batch, nbytes in ((10, 3, 7, 8), (784, 2, 100, 4), (4096, 1, 256, 2), (784, 2, 0, 4)):
            got = call(dim, layers, batch, bytes_per_number=nbytes)
            params = layers * (dim ** 2 + dim)
            acts = 2 * layers * batch * dim       # z_{k-1} and y_k, M x D each, for every layer
            gib = lambda numbers: np.asarray(nbytes * numbers / 2 ** 30)  # noqa: E731
            _first_mismatch(got, gib(3 * params + acts), [
                (gib(3 * params), "the activations are missing: the backward pass reads z_{k-1} and y_k "
                 "(M x D each) of every layer, 2 L M D numbers for a batch of M."),
                (gib(3 * params + acts // 2), "count both arrays of each layer: its input z_{k-1} and its "
                 "pre-activation y_k, M x D each (2 L M D in all)."),
                (gib(3 * params + 2 * batch * dim), "the activations are kept for every layer: 2 L M D numbers, "
                 "not 2 M D."),
                (gib(3 * params + acts + batch * dim), "s is y_L, already counted: the trace keeps z_0 = x, ..., "
                 "z_{L-1} and y_1, ..., y_L = s, 2 L arrays of M x D."),
                (gib(3 * (params + acts)), "Adam's moments belong to the parameters only: the activations are one "
                 "number each (2 L M D), not three."),
                (gib(3 * layers * dim ** 2 + acts), "the biases are missing: each layer has D^2 + D parameters."),
                (gib(params + acts), "Adam's two moment estimates are missing: three numbers per parameter."),
                (gib(2 * params + acts), "Adam keeps two numbers per parameter on top of the parameter itself: "
                 "three in all."),
                (gib(3 * params + acts) * 2 ** 30 / 1e9, "GiB are 2^30 bytes, not 10^9."),
            ], f"wrong value for D = {dim}, L = {layers}, M = {batch}, {nbytes} bytes per number.")
        params = 2 * (784 ** 2 + 784)
        got = call(784, 2)
        if not _close(got, np.asarray(12 * params / 2 ** 30)):
            if _close(got, np.asarray(24 * params / 2 ** 30)):
                raise _Failed("the default bytes_per_number should be 4 (float32), not 8.")
            raise _Failed("the defaults should be batch = 0 (parameters and Adam state only) and "
                          "bytes_per_number = 4 (float32).")
        if not _close(call(784, 2, 100), np.asarray(4 * (3 * params + 2 * 2 * 100 * 784) / 2 ** 30)):
            raise _Failed("training_memory_gib(784, 2, 100) is wrong: batch is the third argument (the signature is "
                          "training_memory_gib(dim, n_layers, batch=0, *, bytes_per_number=4)).")
        return (f"{_name(training_memory_gib)} counts 3 numbers per parameter (L (D^2 + D) of them) and 2 L M D "
                "activations, in GiB.")

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


def check_logit_space_nats(logit_space_nats: Callable[[np.ndarray, float], float], *, strict: bool = False) -> bool:
    """Check ``logit_space_nats(x, lam)``, the mean ``log p_Y(y)`` of the uniform model on the unit cube (``ex-images-lambda``).

    ``x`` is a seeded ``(N, D) = (30, 64)`` batch of dequantised 17-level images in ``[0, 1)``; by the change of
    variables the model ``log p_X(x) = 0`` has ``log p_Y(y) = -log|det dy/dx|`` in logit space, so the reference
    is minus the mean over the images of :func:`relgrad.datasets.logit_transform`'s log-Jacobian
    ``sum_d [log(1 - 2 lam) - log xi_d - log(1 - xi_d)]``, ``xi_d = lam + (1 - 2 lam) x_d``, for
    ``lam = 1e-6, 1e-3, 0.05`` (the last makes the ``(1 - 2 lam)`` factor visible), without changing ``x``.
    Hints: the sign (``+log|det|``, the Jacobian of the other direction), the factor ``(1 - 2 lam)`` forgotten
    or divided by, the logit's derivative ``1 / (xi (1 - xi))`` taken as the sigmoid's ``xi (1 - xi)`` (its log
    with the wrong sign), the derivative at ``x`` instead of at ``xi``, a mean over the pixels as well, a sum
    over the images, a ``D log K`` of the pixel scale added or subtracted (the model is on the unit cube), one
    value per image instead of their mean.

    Args:
        logit_space_nats: the student's function ``(x (N, D) in [0, 1), lam) -> float``.
        strict: raise ``AssertionError`` on failure (for autograding) instead of only printing.

    Returns:
        True when the function agrees with the reference for every ``lam``.
    """
    def body() -> str:
        rng = np.random.default_rng(20254)
        levels, (N, D) = 17, (30, 64)
        x = dequantize(rng.integers(0, levels, (N, D)), levels=levels, rng=rng)
        for lam in (1e-6, 1e-3, 0.05):
            x_in = x.copy()
            got = _as_array(_result(logit_space_nats, x_in, lam), "the logit-space nats")
            if not np.array_equal(x_in, x):
                raise _Failed("your function changed its input x in place; work on new arrays.")
            xi = lam + (1 - 2 * lam) * x
            log_xi = (np.log(xi) + np.log1p(-xi)).sum(axis=1)        # sum_d log xi_d (1 - xi_d), per image
            log_x = (np.log(x) + np.log1p(-x)).sum(axis=1)
            c = D * np.log1p(-2 * lam)                                # sum_d log(1 - 2 lam)
            ref = float(np.mean(-logit_transform(x, lam)[1]))          # = mean(log_xi) - c
            if got.shape == (N,):
                raise _Failed(f"returned one value per image (shape {got.shape}); return their mean over the "
                              "images, one number.")
            if got.shape == (N, D):
                raise _Failed(f"returned one value per pixel (shape {got.shape}); sum the log-Jacobian over the "
                              "pixels of each image, then average over the images: one number.")
            what = f"wrong value for lam = {lam:g}: expected {ref:.4f} nats (minus the mean log|det dy/dx|)."
            _first_mismatch(got, np.asarray(ref), [
                (np.asarray(-ref), "the sign is flipped: p_Y(y) = p_X(x) |det dy/dx|^{-1}, so log p_Y = 0 - "
                 "log|det dy/dx| (you returned +log|det dy/dx|)."),
                (np.asarray(ref + c), "the factor (1 - 2 lam) of d xi / dx is missing: "
                 "dy/dx = (1 - 2 lam) / (xi (1 - xi)), so each pixel adds log(1 - 2 lam) to log|det dy/dx| "
                 "(visible at lam = 0.05)."),
                (np.asarray(ref + 2 * c), "(1 - 2 lam) multiplies the derivative, d xi / dx = 1 - 2 lam: add "
                 "log(1 - 2 lam) to log|dy/dx|, do not subtract it."),
                (np.asarray(float(np.mean(-(c + log_xi)))), "the derivative of the logit is 1 / (xi (1 - xi)), "
                 "the inverse of the sigmoid's xi (1 - xi): log|dy/dx| = log(1 - 2 lam) - log xi - log(1 - xi), "
                 "with minus signs."),
                (np.asarray(float(np.mean(-(c - log_x)))), "the logit's derivative is taken at "
                 "xi = lam + (1 - 2 lam) x, not at x."),
                (np.asarray(float(np.mean(log_x))), "the margin is missing: y = logit(xi) with "
                 "xi = lam + (1 - 2 lam) x, so the derivative is (1 - 2 lam) / (xi (1 - xi)), taken at xi."),
                (np.asarray(ref / D), "that is a mean over the pixels too: sum log|dy_d/dx_d| over the D pixels "
                 "of each image (one log-determinant per image), then average over the images."),
                (np.asarray(ref * N), "that is a sum over the images: return the mean over the N images."),
                (np.asarray(ref - D * np.log(levels)), "the D log K of the pixel scale does not belong here: the "
                 "model is uniform on the unit cube (log p_X(x) = 0), and x is already in [0, 1)."),
                (np.asarray(ref + D * np.log(levels)), "the D log K of the pixel scale does not belong here: the "
                 "model is uniform on the unit cube (log p_X(x) = 0), and x is already in [0, 1)."),
            ], what)
        return (f"{_name(logit_space_nats)} returns minus the mean log-Jacobian of the logit, for lam = 1e-6, "
                "1e-3 and 0.05.")

    return _run("ex-images-lambda", logit_space_nats, body, strict)


def check_conv1x1_relative_gradient(conv1x1_relative_gradient: Callable[[np.ndarray, np.ndarray], np.ndarray], *,
                                    strict: bool = False) -> bool:
    """Check ``conv1x1_relative_gradient(x, W)``, the relative gradient of a ``1 x 1`` convolution (``ex-backprop-conv1x1``).

    ``x`` has shape ``(N, P, C)`` (image ``n``, pixel ``p``, channel vector ``x[n, p]``) and ``y_np = W x_np``;
    the loss is ``-(1/N) sum_n [sum_p log N(y_np; 0, I) + P log|det W|]``.  The reference is the ordinary
    gradient ``(1/N) sum_np y_np x_np^T - P W^{-T}`` times ``W^T W``, i.e. ``(1/N) sum_np y_np y_np^T W - P W``,
    on seeded inputs with ``N = 4``, ``P = 9``, ``C = 6``.  An inverse (``np.linalg.inv``, ``solve``, ...) on the
    inputs fails.  Both orders pass, with a note on their cost: ``(Y^T Y) W`` (a ``C x C`` by ``C x C`` product,
    ``2 N P C^2 + 2 C^3``) and ``Y^T (Y W)`` (``4 N P C^2``), ``Y`` the ``(N P, C)`` rows; with ``N P > C`` rows, as
    for images, the first is the cheaper one, the opposite of a dense layer's ``M < D``.  Hints: the factor ``P``
    of the log-determinant forgotten, the log-determinant term missing or with the wrong sign, the ordinary
    gradient, ``grad W^T`` instead of ``grad W^T W``, ``W`` on the wrong side, a sum over images or a mean over
    pixels, ``x @ W`` instead of ``x @ W.T``, an inverse.

    Args:
        conv1x1_relative_gradient: the student's function ``(x (N, P, C), W (C, C)) -> (C, C)``.
        strict: raise ``AssertionError`` on failure (for autograding) instead of only printing.

    Returns:
        True when the value agrees with the reference and no inverse of the inputs was computed.
    """
    def body() -> str:
        rng = np.random.default_rng(20251)
        N, P, C = 4, 9, 6
        x, W = rng.standard_normal((N, P, C)), rng.standard_normal((C, C))
        out, log, linalg = _counted_call_linalg(conv1x1_relative_gradient, x, W)
        got = _as_array(out, "the relative gradient")
        Y = x @ W.T                                         # y_np = W x_np, channel vectors in the last axis
        S_yy = np.einsum("npi,npj->ij", Y, Y)               # sum over images and pixels of y y^T
        ordinary = np.einsum("npi,npj->ij", Y, x) / N - P * np.linalg.inv(W).T
        ref = ordinary @ W.T @ W
        if got.shape != (C, C):
            raise _Failed(f"returned shape {got.shape}, expected ({C}, {C}) for x of shape ({N}, {P}, {C}).")
        if not _close(got, ref):
            Y_wrong = x @ W
            hint = _match_mistake(got, [
                (S_yy @ W / N - W, "the log-determinant of the whole map is P log|det W| (one W per pixel): "
                                   "subtract P W, not W."),
                (S_yy @ W / N, "the log-determinant term is missing: its relative gradient is -P W."),
                (S_yy @ W / N + P * W, "the log-determinant term has the wrong sign: the loss contains "
                                       "-P log|det W|, whose relative gradient is -P W."),
                (ordinary, "that is the ordinary gradient (1/N) sum y x^T - P W^{-T}; multiply it by W^T W from "
                           "the right: (1/N) sum y y^T W - P W, no inverse."),
                (S_yy / N - P * np.eye(C), "you stopped at grad W^T = (1/N) sum y y^T - P I; the update "
                                           "direction is grad W^T W, one more factor W on the right."),
                (W @ S_yy / N - P * W, "the factor W belongs on the right: (1/N) sum y y^T W - P W."),
                (S_yy @ W - P * W, "the loss is a mean over the N images: divide the data term by N."),
                (S_yy @ W / N - N * P * W, "the loss is a mean over the N images: its log-determinant term "
                                           "is P log|det W|, not N P log|det W|."),
                (ref / P, "you averaged over the pixels too: log p of an image is the sum over its P pixels "
                          "(and P log|det W|); average over the N images only."),
                (Y_wrong.reshape(-1, C).T @ (Y_wrong.reshape(-1, C) @ W) / N - P * W,
                 "y_p = W x_p: with the channel vectors along the last axis of x, Y = x @ W.T, not x @ W."),
            ])
            raise _Failed(hint or "wrong value: expected (1/N) sum_np y_np y_np^T W - P W with y_np = W x_np.")
        inverses = sorted(set(linalg) & {"inv", "solve", "pinv", "lstsq", "tensorinv", "tensorsolve"})
        if inverses:
            raise _Failed(f"right value, but you called np.linalg.{inverses[0]}: the point of the relative gradient "
                          "is that it needs no inverse (W^{-T} W^T W = W, so the log-determinant part is -P W).")
        cubic = _cubic_products(log, C)
        order = ""
        if cubic:  # forming the C x C matrix first: the cheaper order when the N P rows outnumber the C channels
            order = (f" It forms a C x C matrix first ({cubic[0]}): 2 N P C^2 + O(C^3), cheaper than the thin "
                     "Y^T (Y W) (4 N P C^2) whenever N P > C, as for images.")
        return f"{_name(conv1x1_relative_gradient)} returns (1/N) sum y y^T W - P W with no inverse.{order}"

    return _run("ex-backprop-conv1x1", conv1x1_relative_gradient, body, strict)


def _random_flow(dim: int, n_layers: int, seed: int) -> Any:
    """A NumPy DenseFlow with generic (non-orthogonal) weights and non-zero biases, for the checks."""
    from ..numpy.flow import DenseFlow

    rng = np.random.default_rng(seed)
    model = DenseFlow(dim, n_layers, rng=seed)
    for w, b in zip(model.weights, model.biases):
        w += 0.3 * rng.standard_normal(w.shape)   # in place: the model keeps its arrays
        b += 0.5 * rng.standard_normal(b.shape)
    return model


def _backprop(model: Any, x: np.ndarray, start: np.ndarray, direct: float = 1.0) -> List[np.ndarray]:
    """Delta_1..Delta_L from Delta_L = start: (Delta_{k+1} W_{k+1}) sigma'(Y_k) - direct sigma''/sigma'(Y_k) / M."""
    from ..numpy.activation import dlog_sigma_prime

    tr = model.trace(x)
    m = x.shape[0]
    delta, out = start, [start]
    for k in range(model.n_layers - 2, -1, -1):
        y = tr.ys[k]
        delta = (delta @ model.weights[k + 1]) * sigma_prime(y, model.alpha)
        delta = delta - direct * dlog_sigma_prime(y, model.alpha) / m
        out.append(delta)
    return out[::-1]


def _list_of_arrays(value: Any, n: int, shape: Tuple[int, ...], what: str) -> List[np.ndarray]:
    if not isinstance(value, (list, tuple)):
        raise _Failed(f"should return a list of {n} arrays ({what}, layer 1 first), got {type(value).__name__}.")
    if len(value) != n:
        raise _Failed(f"returned {len(value)} arrays for a flow of {n} layers: one Delta_k per layer, layer 1 first.")
    arrays = [_as_array(v, what) for v in value]
    for k, a in enumerate(arrays):
        if a.shape != shape:
            raise _Failed(f"Delta_{k + 1} has shape {a.shape}, expected {shape} (one row per sample).")
    return arrays


def _match_list(got: List[np.ndarray], mistakes: Sequence[Tuple[List[np.ndarray], str]]) -> Optional[str]:
    for value, hint in mistakes:
        if all(_close(g, v) for g, v in zip(got, value)):
            return hint
    return None


def check_laplace_deltas(laplace_deltas: Callable[[Any, np.ndarray], Sequence[np.ndarray]], *,
                         strict: bool = False) -> bool:
    """Check ``laplace_deltas(model, x)``, the ``Delta_k`` for a standard Laplace base (``ex-backprop-laplace``).

    ``model`` is a seeded three-layer :class:`relgrad.numpy.DenseFlow` with generic weights and biases,
    ``x`` an ``(M, D)`` batch; the reference, in the minimisation convention of :func:`relgrad.numpy.deltas`,
    starts from ``Delta_L = sign(S) / M`` and runs the unchanged recursion.  Hints: the Gaussian start
    ``S / M`` kept, the sign of ``Delta_L`` flipped, the maximisation convention (``delta_k`` instead of
    ``-delta_k / M``), a sum instead of a mean, the activation's direct term forgotten or with the wrong sign,
    the layers in the wrong order.

    Args:
        laplace_deltas: the student's function ``(model, x (M, D)) -> [Delta_1, ..., Delta_L]``, each ``(M, D)``.
        strict: raise ``AssertionError`` on failure (for autograding) instead of only printing.

    Returns:
        True when every ``Delta_k`` agrees with the reference.
    """
    def body() -> str:
        model = _random_flow(4, 3, 20252)
        x = np.random.default_rng(20253).standard_normal((6, 4))
        M, L = x.shape[0], model.n_layers
        s = model.trace(x).s
        got = _list_of_arrays(_result(laplace_deltas, model, x.copy()), L, x.shape, "the Delta_k")
        ref = _backprop(model, x, np.sign(s) / M)
        if all(_close(g, r) for g, r in zip(got, ref)):
            return (f"{_name(laplace_deltas)} returns the Laplace Delta_1..Delta_{L} (start sign(S)/M, recursion "
                    "unchanged).")
        hint = _match_list(got, [
            (_backprop(model, x, s / M), "that is the Gaussian start Delta_L = S / M: for log p_s = -|s| - log 2 "
                                         "the start is Delta_L = sign(S) / M (the recursion is unchanged)."),
            (_backprop(model, x, -np.sign(s) / M), "the sign of Delta_L is flipped: the loss derivative of "
             "-log p_s(s) = |s| + log 2 is +sign(s), so Delta_L = sign(S) / M."),
            ([-M * r for r in ref], "that is the maximisation convention (delta_k, derivatives of the "
                                    "log-likelihood); return relgrad's Delta_k = -delta_k / M."),
            ([M * r for r in ref], "the 1/M of the mean over the batch is missing (in Delta_L and in the direct "
                                   "term)."),
            (_backprop(model, x, np.sign(s) / M, direct=0.0), "the activation's direct term is missing: each "
             "hidden layer adds -sigma''(Y_k) / sigma'(Y_k) / M (the log sigma' of L_J^1)."),
            (_backprop(model, x, np.sign(s) / M, direct=-1.0), "the activation's direct term has the wrong sign: "
             "subtract sigma''(Y_k) / sigma'(Y_k) / M."),
            (ref[::-1], "the list is in the wrong order: return Delta_1 (the first layer) first."),
        ])
        bad = next(k for k, (g, r) in enumerate(zip(got, ref)) if not _close(g, r))
        raise _Failed(hint or f"Delta_{bad + 1} is wrong: expected Delta_L = sign(S)/M, then "
                              "Delta_k = (Delta_{k+1} W_{k+1}) * sigma'(Y_k) - sigma''/sigma'(Y_k) / M.")

    return _run("ex-backprop-laplace", laplace_deltas, body, strict)


def check_accumulator_deltas(accumulator_deltas: Callable[[Any, Any], Sequence[Any]], *, strict: bool = False) -> bool:
    """Check ``accumulator_deltas(tmodel, x)``, the ``Delta_k`` from zero accumulators (``ex-backprop-accumulator``).

    ``tmodel`` is a seeded three-layer :class:`relgrad.torch.DenseFlow` (float64, CPU) with generic
    parameters and ``x`` an ``(M, D)`` float64 tensor; the reference is :func:`relgrad.numpy.deltas` of the
    NumPy flow with the same parameters (standard normal base, minimisation convention).  Tensors or arrays
    are accepted.  Hints: a sum instead of a mean, the maximisation convention or a flipped sign, the
    accumulators added after the activation instead of to the pre-activations, the activations'
    log-derivative term missing from the loss, the layers in the wrong order.

    Args:
        accumulator_deltas: the student's function ``(tmodel, x (M, D) tensor) -> [Delta_1, ..., Delta_L]``.
        strict: raise ``AssertionError`` on failure (for autograding) instead of only printing.

    Returns:
        True when every ``Delta_k`` agrees with the reference.
    """
    import torch

    from .. import torch as rt
    from ..numpy.gradients import deltas

    def body() -> str:
        model = _random_flow(5, 3, 20254)
        x = np.random.default_rng(20255).standard_normal((8, 5))
        M, L = x.shape[0], model.n_layers
        tmodel = rt.DenseFlow(model.dim, L, alpha=model.alpha, dtype=torch.float64, device="cpu")
        with torch.no_grad():
            for k in range(L):
                tmodel.weights[k].copy_(torch.from_numpy(model.weights[k]))
                tmodel.biases[k].copy_(torch.from_numpy(model.biases[k]))
        got = _list_of_arrays(_result(accumulator_deltas, tmodel, torch.from_numpy(x.copy())), L, x.shape,
                              "the Delta_k")
        tr = model.trace(x)
        ref = deltas(model, tr)
        if all(_close(g, r) for g, r in zip(got, ref)):
            return f"{_name(accumulator_deltas)} returns relgrad's Delta_1..Delta_{L} from the accumulators."
        after = [ref[k + 1] @ model.weights[k + 1] for k in range(L - 1)] + [ref[-1]]  # dLoss/dZ_k, dLoss/dS
        hint = _match_list(got, [
            ([M * r for r in ref], "the 1/M is missing: the loss is the mean negative log-likelihood over the batch, "
                                   "not the sum."),
            ([-M * r for r in ref], "that is the maximisation convention (derivatives of the summed log-likelihood): "
                                    "differentiate the loss -mean(log p), as relgrad does."),
            ([-r for r in ref], "the sign is flipped: differentiate the loss, minus the mean log-likelihood."),
            (after, "the accumulators sit after the activations: add them to the pre-activations "
                    "y_k = z_{k-1} W_k^T + b_k, before sigma."),
            (_backprop(model, x, tr.s / M, direct=0.0), "the activations' term is missing from the loss: the data "
             "loss is -mean(log N(s) + sum_k sum_i log sigma'(y_k,i)) (relgrad.torch.log_sigma_prime)."),
            (ref[::-1], "the list is in the wrong order: return Delta_1 (the first layer) first."),
        ])
        bad = next(k for k, (g, r) in enumerate(zip(got, ref)) if not _close(g, r))
        raise _Failed(hint or f"Delta_{bad + 1} differs from relgrad.numpy.deltas: differentiate "
                              "-mean(log N(s; 0, I) + sum_k log sigma'(y_k)) with respect to zero accumulators "
                              "added to every pre-activation.")

    return _run("ex-backprop-accumulator", accumulator_deltas, body, strict)


def check_whiten(whiten: Callable[[np.ndarray], Tuple[np.ndarray, np.ndarray]], *, strict: bool = False) -> bool:
    """Check ``whiten(X) -> (Z, V)``: ``V = Sigma^{-1/2}`` symmetric, ``Z = (X - mean) V^T`` (``ex-ica-whitening``).

    ``Sigma`` is the covariance of the centred rows of ``X`` divided by ``N``; the test data are seeded,
    correlated, with a non-zero mean.  Hints: the pair swapped, ``N - 1`` instead of ``N`` (``np.cov``'s
    default), the entrywise power ``Sigma ** -0.5``, ``Sigma^{-1}`` or ``Sigma^{1/2}`` instead of
    ``Sigma^{-1/2}``, a non-symmetric whitening matrix (Cholesky), the mean not removed (from the covariance or
    from ``Z``), a per-column standardisation, ``X`` changed in place.

    Args:
        whiten: the student's function ``X (N, D) -> (Z (N, D), V (D, D))``.
        strict: raise ``AssertionError`` on failure (for autograding) instead of only printing.

    Returns:
        True when ``V`` and ``Z`` agree with the reference.
    """
    def body() -> str:
        rng = np.random.default_rng(20256)
        N, D = 400, 3
        mix = np.array([[2.0, 0.0, 0.0], [1.2, 0.5, 0.0], [-0.7, 0.3, 0.2]])
        X = rng.laplace(size=(N, D)) @ mix.T + np.array([2.0, -1.0, 0.5])
        X_in = X.copy()
        out = _result(whiten, X_in)
        if not np.array_equal(X_in, X):
            raise _Failed("your function changed X in place; work on a copy (Xc = X - X.mean(axis=0) is a new array).")
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise _Failed("should return a pair (Z, V): the whitened data and the whitening matrix.")
        Z, V = _as_array(out[0], "Z"), _as_array(out[1], "V")
        if Z.shape == (D, D) and V.shape == (N, D):
            raise _Failed("the pair is swapped: return (Z, V), the whitened data first.")
        if Z.shape != (N, D) or V.shape != (D, D):
            raise _Failed(f"returned shapes {Z.shape} and {V.shape}; expected ({N}, {D}) and ({D}, {D}).")
        Xc = X - X.mean(axis=0)
        Sigma = Xc.T @ Xc / N
        evals, evecs = np.linalg.eigh(Sigma)
        power = lambda p: evecs @ np.diag(evals ** p) @ evecs.T  # noqa: E731  (a matrix function of Sigma)
        V_ref = power(-0.5)
        if not np.all(np.isfinite(V)):
            raise _Failed("V contains NaN or inf: Sigma ** -0.5 takes the power of every entry (negative "
                          "covariances give NaN). Sigma^{-1/2} is a matrix function: U diag(lambda^{-1/2}) U^T "
                          "from np.linalg.eigh(Sigma).")
        if not _close(V, V_ref):
            Xm = X.T @ X / N
            ev_m, U_m = np.linalg.eigh(Xm)
            with np.errstate(all="ignore"):
                entrywise = Sigma ** -0.5
            hint = _match_mistake(V, [
                (V_ref * np.sqrt((N - 1) / N), "you divided the covariance by N - 1 (np.cov's default); divide by N "
                                               "(np.cov(X.T, bias=True), or Xc.T @ Xc / N) so that Z.T @ Z / N = I."),
                (entrywise, "Sigma ** -0.5 takes the power of every entry; Sigma^{-1/2} is a matrix function: "
                            "U diag(lambda^{-1/2}) U^T from np.linalg.eigh(Sigma)."),
                (power(-1.0), "that is Sigma^{-1}: whitening needs Sigma^{-1/2} (eigenvalues to the power -1/2)."),
                (power(0.5), "that is Sigma^{1/2}: whitening needs its inverse, Sigma^{-1/2}."),
                (U_m @ np.diag(ev_m ** -0.5) @ U_m.T, "the covariance must be that of the centred rows: subtract the "
                                                      "mean before forming X^T X / N."),
                (np.diag(1 / Xc.std(axis=0)), "dividing every column by its standard deviation removes the scales, "
                                              "not the correlations: V = Sigma^{-1/2} with the full covariance."),
                (np.linalg.inv(np.linalg.cholesky(Sigma)), "L^{-1} from the Cholesky factor Sigma = L L^T whitens too, "
                                                           "but it is not symmetric; V is the symmetric Sigma^{-1/2}."),
            ])
            if hint is None and np.allclose(V @ Sigma @ V.T, np.eye(D), atol=1e-8):
                hint = ("V whitens (V Sigma V^T = I) but is not the symmetric Sigma^{-1/2} = "
                        "U diag(lambda^{-1/2}) U^T; any rotation of it whitens as well.")
            raise _Failed(hint or "V is wrong: expected the symmetric Sigma^{-1/2} of the covariance of the centred "
                                  "rows (divided by N).")
        Z_ref = Xc @ V_ref.T
        if not _close(Z, Z_ref):
            hint = _match_mistake(Z, [
                (X @ V_ref.T, "V is right but Z is not centred: Z = (X - mean) V^T."),
                (Xc @ np.linalg.inv(V_ref).T, "Z = Xc V^T multiplies by V = Sigma^{-1/2}, not by its inverse."),
            ])
            raise _Failed(hint or "Z is wrong: expected (X - X.mean(axis=0)) @ V.T.")
        return f"{_name(whiten)} returns Z with identity covariance and the symmetric V = Sigma^-1/2."

    return _run("ex-ica-whitening", whiten, body, strict)


def check_sigma_inverse_bisect(sigma_inverse_bisect: Callable[..., Tuple[np.ndarray, int]], *,
                               strict: bool = False) -> bool:
    """Check ``sigma_inverse_bisect(v, alpha, tol) -> (u, n_iterations)`` (``ex-sampling-bisection``).

    ``u`` must solve ``sigma(u, alpha) = v`` to ``|u - u*| <= tol max(1, |u*|)`` (with a little room for
    rounding), compared with :func:`relgrad.numpy.sigma_inverse`, on the chapter's values of ``v`` with
    ``tol = 1e-8`` and on values with ``|u*| < 16`` with ``tol = 1e-14`` (where a loop that stops on an absolute
    width still terminates), for ``alpha = 0.3`` and ``0.01``, without changing ``v``.  The iteration count
    must be one number, and each halving of ``tol`` must cost about one iteration: from ``tol = 1e-8`` to
    ``1e-14`` it grows by ``log2(1e6) = 19.9`` (17 to 23 accepted).  Hints: no pair returned, an inverted
    comparison or a bracket that misses the root (the result sits at an end of the bracket), the ``alpha``
    branch of the bracket forgotten for ``v < 0``, too few iterations, a count that ignores ``tol``.

    Args:
        sigma_inverse_bisect: the student's function ``(v array (K,), alpha, tol) -> (u array (K,), int)``.
        strict: raise ``AssertionError`` on failure (for autograding) instead of only printing.

    Returns:
        True when every case is solved to ``tol`` and the count behaves like a bisection's.
    """
    def solve(v: np.ndarray, alpha: float, tol: float) -> Tuple[np.ndarray, int]:
        v_in = v.copy()
        with np.errstate(all="ignore"):
            out = _result(sigma_inverse_bisect, v_in, alpha, tol)
        if not np.array_equal(v_in, v):
            raise _Failed("your function changed its input v in place; work on new arrays (np.where returns one).")
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise _Failed("should return a pair (u, n_iterations): the solution and the number of bisection steps.")
        u, steps = _as_array(out[0], "u"), _as_array(out[1], "the iteration count")
        if steps.shape != () or steps != np.round(steps) or steps < 0:
            raise _Failed(f"the iteration count should be one whole number (all entries are halved together), "
                          f"got {np.asarray(out[1]).tolist()!r}.")
        if u.shape != v.shape:
            raise _Failed(f"returned u of shape {u.shape} for v of shape {v.shape}; keep the shape.")
        return u, int(steps)

    def body() -> str:
        chapter_v = np.array([-50.0, -5.0, -1.0, -0.1, 0.0, 0.1, 1.0, 5.0, 50.0])
        small = {0.3: np.array([-3.0, -0.5, 0.0, 0.2, 2.0, 10.0]), 0.01: np.array([-0.1, 0.0, 0.3, 4.0])}
        cases = [(chapter_v, 0.3, 1e-8), (chapter_v[2:], 0.01, 1e-8), (small[0.3], 0.3, 1e-14),
                 (small[0.01], 0.01, 1e-14)]
        counts = {}
        for v, alpha, tol in cases:
            u, steps = solve(v, alpha, tol)
            counts[(alpha, tol, len(v))] = steps
            u_star = sigma_inverse(v, alpha)
            scale = np.maximum(1.0, np.abs(u_star))
            err = np.abs(u - u_star) / scale
            if np.all(err <= 1.01 * tol + 4e-15):
                continue
            k = int(np.argmax(err))
            where = f"(alpha = {alpha}, tol = {tol:g}, v = {v[k]:g}: expected {u_star[k]:.15g}, got {u[k]:.15g})"
            ok = err <= 1.01 * tol + 4e-15
            c = np.log(2.0)
            lo, hi = np.minimum(v - c, (v - c) / alpha), np.minimum(v, v / alpha)
            if np.all(np.isfinite(u)) and np.max(err) < 1e-3:
                raise _Failed(f"close but not to tol {where}: iterate until the bracket is narrower than "
                              "tol * max(1, |u|), not a fixed number of times.")
            near = lambda a, b: np.abs(a - b) <= 2 * tol * np.maximum(1.0, np.abs(b)) + 1e-12  # noqa: E731
            plain_ends = near(u, v - c) | near(u, v)
            if np.all(plain_ends[~ok]):
                raise _Failed(f"the bracket [v - log 2, v] misses the root {where}: for small and negative v, "
                              "sigma(u) is about alpha u, so take the smaller of the two branches at each end, "
                              "[min(v - log 2, (v - log 2) / alpha), min(v, v / alpha)].")
            ends = near(u, lo) | near(u, hi)
            if np.any(ends & ~ok):
                raise _Failed(f"the result sits at an end of the bracket {where}: the update is inverted or the "
                              "bracket misses the root. If sigma(mid) < v the root is right of mid (lo = mid), "
                              "else hi = mid; the bracket is [min(v - log 2, (v - log 2)/alpha), min(v, v/alpha)].")
            raise _Failed(f"sigma(u) is not v {where}: bisection keeps a bracket [lo, hi] with sigma(lo) <= v <= "
                          "sigma(hi) and halves it.")
        growth = counts[(0.3, 1e-14, 6)] - solve(small[0.3], 0.3, 1e-8)[1]
        if not 17 <= growth <= 23:
            raise _Failed(f"the iteration count grows by {growth} from tol = 1e-8 to 1e-14; bisection halves the "
                          "bracket once per iteration, so it should grow by about log2(1e6) = 20. Count the "
                          "halvings of the loop, and stop when the bracket is narrower than tol * max(1, |u|).")
        return (f"{_name(sigma_inverse_bisect)} solves sigma(u) = v to tol in {counts[(0.3, 1e-14, 6)]} halvings at "
                f"tol = 1e-14 ({growth} more than at 1e-8).")

    return _run("ex-sampling-bisection", sigma_inverse_bisect, body, strict)


_FACTORISATIONS = ("inv", "solve", "pinv", "lstsq", "svd", "eig", "cholesky", "qr", "det", "slogdet")


def _invert(model: Any, s: np.ndarray, *, transpose: bool = True, bias: bool = True, activation: str = "inverse",
            order: str = "backward") -> np.ndarray:
    """x = g^{-1}(s), with flags that reproduce the typical mistakes of a sampler."""
    from ..numpy.activation import sigma as forward

    layers = range(model.n_layers - 1, -1, -1) if order == "backward" else range(model.n_layers)
    z, last = s, model.n_layers - 1
    for k in layers:
        if k != last or activation == "everywhere":
            z = sigma_inverse(z, model.alpha) if activation != "forward" else forward(z, model.alpha)
        inv = np.linalg.inv(model.weights[k])
        z = (z - model.biases[k] if bias else z) @ (inv.T if transpose else inv)
    return z


def check_make_sampler(make_sampler: Callable[[Any], Callable[[int, Any], np.ndarray]], *,
                       strict: bool = False) -> bool:
    """Check ``make_sampler(model) -> sample(n, rng)`` with the inverses computed once (``ex-sampling-cached``).

    ``model`` is a seeded three-layer :class:`relgrad.numpy.DenseFlow` (``D = 16``, generic weights and biases);
    ``sample(n, rng)`` must return what ``model.sample(n, rng=rng)`` returns (to rounding) for integer seeds and
    for a generator, ``n = 1`` included.  While ``sample`` runs, the check records calls to ``numpy.linalg``'s
    factorisations (``inv``, ``solve``, ``svd``, ...; also those inside ``DenseFlow.inverse`` and
    ``DenseFlow.sample``): any call fails, since the inverses belong in ``make_sampler``.  Hints: another draw
    of the noise than ``standard_normal((n, D))``, ``W^{-1}`` instead of ``W^{-T}`` in the rows convention, the
    bias not subtracted, ``sigma`` instead of ``sigma^{-1}``, ``sigma^{-1}`` after the first layer too, the
    layers in the forward order, a factorisation on every call.

    Args:
        make_sampler: the student's function ``model -> sample``, with ``sample(n, rng) -> (n, D)`` array.
        strict: raise ``AssertionError`` on failure (for autograding) instead of only printing.

    Returns:
        True when the samples agree and ``sample`` factorises nothing.
    """
    def body() -> str:
        model = _random_flow(16, 3, 20257)
        sampler = _result(make_sampler, model)
        if not callable(sampler):
            raise _Failed(f"make_sampler should return a function sample(n, rng), got {type(sampler).__name__}.")
        calls: List[str] = []
        saved = {name: getattr(np.linalg, name) for name in _FACTORISATIONS}

        def recording(name: str) -> Callable[..., Any]:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                calls.append(name)
                return saved[name](*args, **kwargs)
            return wrapper

        cases = [(7, 11), (1, 3), (5, np.random.default_rng(9))]
        for n, rng in cases:
            ref = model.sample(n, rng=np.random.default_rng(9) if not isinstance(rng, int) else rng)
            for name in _FACTORISATIONS:
                setattr(np.linalg, name, recording(name))
            try:
                with np.errstate(all="ignore"):
                    got = _as_array(_result(sampler, n, rng), "the samples")
            finally:
                for name, fn in saved.items():
                    setattr(np.linalg, name, fn)
            what = f"sample({n}, {rng if isinstance(rng, int) else 'a generator'})"
            if got.shape != ref.shape:
                raise _Failed(f"{what} returned shape {got.shape}, expected {ref.shape}: one row per sample.")
            if not _close(got, ref, rtol=1e-9, atol=1e-10):
                seed = rng if isinstance(rng, int) else 9
                s = np.random.default_rng(seed).standard_normal((n, model.dim))
                s_t = np.random.default_rng(seed).standard_normal((model.dim, n)).T
                hint = _match_mistake(got, [
                    (_invert(model, s_t), "draw the noise as DenseFlow.sample does: "
                                          "np.random.default_rng(rng).standard_normal((n, D)), one row per sample."),
                    (_invert(model, s, transpose=False), "in the rows convention z = (y - b) W^{-T}: multiply by "
                                                         "inv(W).T, not inv(W)."),
                    (_invert(model, s, bias=False), "subtract the bias before undoing W: z = (y - b_k) W_k^{-T}."),
                    (_invert(model, s, activation="forward"), "you applied sigma; going backwards needs sigma^{-1} "
                                                              "(relgrad.numpy.sigma_inverse)."),
                    (_invert(model, s, activation="everywhere"), "sigma^{-1} undoes the activations between the "
                     "layers only: the last layer has no activation (s = y_L), so do not apply it to s."),
                    (_invert(model, s, order="forward"), "undo the layers from the last to the first."),
                ])
                raise _Failed(hint or f"{what} differs from model.sample({n}, rng): start from "
                                      "s = default_rng(rng).standard_normal((n, D)) and undo the layers last to first.")
            if calls:
                raise _Failed(f"right samples, but sample() called np.linalg.{calls[0]} ({len(calls)} factorisation "
                              "call(s) for one batch): compute the inverses once in make_sampler and only multiply "
                              "in sample (model.sample and model.inverse factorise on every call).")
        return f"{_name(make_sampler)} samples like model.sample, with no factorisation per call."

    return _run("ex-sampling-cached", make_sampler, body, strict)


def _toy_flow(n_layers: int, alpha: float, seed: int) -> Any:
    """A two-dimensional NumPy DenseFlow with generic weights and biases and the given slope alpha."""
    from ..numpy.flow import DenseFlow

    rng = np.random.default_rng(seed)
    model = DenseFlow(2, n_layers, alpha=alpha, rng=seed)
    for w, b in zip(model.weights, model.biases):
        w += 0.4 * rng.standard_normal(w.shape)   # in place: the model keeps its arrays
        b += 0.5 * rng.standard_normal(b.shape)
    return model


def _weight_bound(model: Any, radius: float, *, norm: Any = 2, combine: Any = np.prod, centre: bool = True,
                  lipschitz: bool = True, gauss: str = "far", act: float = 1.0, act_layers: int = -1,
                  det_sign: float = 1.0, log2pi: float = 1.0, half: float = 0.5) -> float:
    """The weight-only lower bound of ``ex-toy-densities-lower-bound``; the flags reproduce its typical mistakes."""
    D, L = model.dim, model.n_layers
    lip = combine([np.linalg.norm(w, norm) for w in model.weights]) if lipschitz else 1.0
    g0 = float(np.linalg.norm(model.forward(np.zeros((1, D))))) if centre else 0.0
    rho = {"far": g0 + radius * lip, "near": g0 - radius * lip, "peak": 0.0}[gauss]
    return float(-half * rho ** 2 - log2pi * 0.5 * D * np.log(2 * np.pi)
                 + act * D * (L + act_layers) * np.log(model.alpha) + det_sign * model.logdet_weights().sum())


def check_density_lower_bound(density_lower_bound: Callable[[Any, float], float], *, strict: bool = False) -> bool:
    """Check ``density_lower_bound(model, radius)``, a weight-only lower bound on ``log p(x)`` over a disc (``ex-toy-densities-lower-bound``).

    ``model`` is a seeded two-dimensional :class:`relgrad.numpy.DenseFlow` with generic weights and biases (two
    layers with ``alpha = 0.3``, three with ``alpha = 0.05``), ``radius`` 3 and 1.5.  The reference is the
    chapter's bound on ``||x|| <= R``:
    ``-rho^2 / 2 - log(2 pi) + D (L - 1) log alpha + sum_k log|det W_k|`` with
    ``rho = ||g(0)|| + R prod_k ||W_k||_2`` (spectral norms), and it must hold at every point of a grid of the
    disc.  Hints: the ``D (L - 1) log alpha`` or ``sum log|det W_k|`` term with the wrong sign, ``sigma' < 1``
    used instead of ``sigma' > alpha`` (an upper bound on the activation term), ``L`` layers of activations
    instead of ``L - 1``, the Gaussian factor at its peak or at the nearest point of the image of the disc
    (a sup, not an inf), the radius used as if it were in the base space (``rho = R``), the Lipschitz factor or
    ``||g(0)||`` forgotten, Frobenius norms or a sum of norms, the normaliser ``-(D / 2) log(2 pi)`` with
    ``D = 1``, the density instead of its log.  A value that is not a lower bound on the grid is reported with
    the point where it fails.

    Args:
        density_lower_bound: the student's function ``(model, radius) -> float`` (a log-density).
        strict: raise ``AssertionError`` on failure (for autograding) instead of only printing.

    Returns:
        True when the function agrees with the reference on every model and radius.
    """
    def body() -> str:
        cases = [(_toy_flow(2, 0.3, 20255), 3.0), (_toy_flow(3, 0.05, 20256), 1.5)]
        for model, radius in cases:
            got = _as_array(_result(density_lower_bound, model, radius), "the bound")
            ref = _weight_bound(model, radius)
            what = f"L = {model.n_layers}, alpha = {model.alpha}, R = {radius}"
            if got.shape != ():
                raise _Failed(f"returned shape {got.shape} ({what}); return one number, a bound valid on the whole "
                              "disc.")
            if _close(got, np.asarray(ref)):
                continue
            far = ("on the disc ||x|| <= R the Gaussian factor is smallest where ||g(x)|| is largest, at most "
                   "rho = ||g(0)|| + R prod_k ||W_k||_2: evaluate it there.")
            hint = _match_mistake(got, [(np.asarray(value), h) for value, h in [
                (_weight_bound(model, radius, act=-1.0), "the activation term enters with a plus sign: each of "
                 "the D (L - 1) terms log sigma'(y) is at least log alpha, so add D (L - 1) log alpha (it is "
                 "negative)."),
                (_weight_bound(model, radius, det_sign=-1.0), "log|det J_g| contains + sum_k log|det W_k| "
                 "(the Jacobian J_g = W_L D_{L-1} ... D_1 W_1): add it, do not subtract it."),
                (_weight_bound(model, radius, act=0.0), "sigma' < 1 bounds log sigma' from above (by 0); a lower "
                 "bound needs sigma' > alpha: D (L - 1) log alpha."),
                (_weight_bound(model, radius, act_layers=0), "the last layer has no activation: D (L - 1) terms "
                 "log sigma', not D L."),
                (_weight_bound(model, radius, gauss="peak"), "that uses the largest value of the Gaussian factor "
                 "(at g(x) = 0), a sup over the disc; " + far),
                (_weight_bound(model, radius, gauss="near"), "rho = ||g(0)|| - R prod ||W_k||_2 is the nearest "
                 "the image of the disc can come to 0, where the Gaussian is largest (a sup); " + far),
                (_weight_bound(model, radius, centre=False, lipschitz=False), "the radius R is in data space "
                 "(||x|| <= R), not in the base space of s = g(x): map it through g, "
                 "||g(x)|| <= ||g(0)|| + R prod_k ||W_k||_2."),
                (_weight_bound(model, radius, lipschitz=False), "the Lipschitz factor is missing: "
                 "||g(x) - g(0)|| <= ||x|| prod_k ||W_k||_2, so rho = ||g(0)|| + R prod_k ||W_k||_2."),
                (_weight_bound(model, radius, centre=False), "||g(0)|| is missing: the biases move the centre, "
                 "so ||g(x)|| <= ||g(0)|| + ||x|| prod_k ||W_k||_2."),
                (_weight_bound(model, radius, norm="fro"), "that is still a bound, but with Frobenius norms; the "
                 "Lipschitz constant of x -> W x is the spectral norm np.linalg.norm(W, 2), which is smaller."),
                (_weight_bound(model, radius, combine=np.sum), "the Lipschitz constants of composed maps multiply: "
                 "prod_k ||W_k||_2, not their sum."),
                (_weight_bound(model, radius, log2pi=0.5), "the normaliser of a D-dimensional standard normal is "
                 "-(D / 2) log(2 pi) = -log(2 pi) for D = 2."),
                (_weight_bound(model, radius, half=1.0), "the Gaussian's exponent is -rho^2 / 2: the 1/2 is "
                 "missing."),
                (np.exp(ref), "that is the density; return its logarithm (a log-density)."),
            ]])
            if hint:
                raise _Failed(f"{hint} ({what})")
            side = np.linspace(-radius, radius, 81)
            pts = np.stack(np.meshgrid(side, side), axis=-1).reshape(-1, 2)
            pts = pts[np.linalg.norm(pts, axis=1) <= radius]
            logp = model.log_likelihood(pts)
            if float(got) > logp.min():
                k = int(np.argmin(logp))
                raise _Failed(f"{float(got):.3f} is not a lower bound ({what}): at x = {pts[k].round(3).tolist()}, "
                              f"inside the disc, log p(x) = {logp[k]:.3f}. Expected {ref:.4f}.")
            raise _Failed(f"{float(got):.3f} is below log p on the disc but is not the weight-only bound ({what}): "
                          f"expected {ref:.4f} = -rho^2/2 - log(2 pi) + D (L - 1) log alpha + sum_k log|det W_k|.")
        return (f"{_name(density_lower_bound)} returns the weight-only bound -rho^2/2 - log 2pi + D(L-1) log alpha "
                "+ sum log|det W_k| (checked on two flows).")

    return _run("ex-toy-densities-lower-bound", density_lower_bound, body, strict)
