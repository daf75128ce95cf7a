"""Self-checks for the book's coding exercises.

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

__all__ = [
    "EXERCISE_CHECKS",
    "check_logdet_grad_2x2",
    "check_relative_gradient",
    "check_relative_weight_update",
    "check_strict_layer_update",
]

#: exercise label -> name of the check function in this module.
EXERCISE_CHECKS: Dict[str, str] = {
    "ex-logdet-two": "check_logdet_grad_2x2",
    "ex-rel-examples": "check_relative_gradient",
    "ex-backprop-two-forms": "check_relative_weight_update",
    "ex-biases-centred": "check_strict_layer_update",
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
        raise _Failed(f"{_name(fn)} raised {type(err).__name__}: {err}") from err


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

    The reference is ``relgrad.numpy.gradients._relative_layer(..., strict=True)``:
    ``dW = Delta^T (Y W) - W`` and ``db = Delta^T (Y b) + Delta^T 1 - b`` with ``Y = Z W^T + 1 b^T``.
    Hints: the authors' bias rule (``db`` without ``- b``), the log-determinant term ``-W`` forgotten,
    ``g_b = Delta^T 1`` forgotten, and the cubic order (a ``D x D`` by ``D x D`` product).

    Args:
        strict_layer_update: the student's function ``(W (D, D), b (D,), Y (M, D), Delta (M, D)) -> (dW, db)``.
        strict: raise ``AssertionError`` on failure (for autograding) instead of only printing.

    Returns:
        True when both blocks agree with the reference and no cubic product was taken.
    """
    from relgrad.numpy.gradients import _relative_layer

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
        ref_w, ref_b = _relative_layer(W, b, Y, Delta, strict=True)
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
