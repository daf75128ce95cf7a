"""The exceptions relgrad raises.  All derive from :class:`RelgradError` so callers can catch them at once.

Each subclass also derives from the built-in exception a Python user would expect (``ValueError`` for bad
input, ``RuntimeError`` for a failed run), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class RelgradError(Exception):
    """Base class of every relgrad exception."""


class ShapeError(RelgradError, ValueError):
    """An array or tensor has the wrong number of dimensions or a size that does not match the model."""


class NonFiniteError(RelgradError, ValueError):
    """Input data (or parameters) contain NaN or infinity."""


class SingularWeightError(RelgradError, ValueError):
    """A weight matrix is singular (or non-finite) where an exact evaluation needs its determinant or inverse."""


class UnknownDatasetError(RelgradError, KeyError):
    """A dataset name is not one relgrad knows.  The message lists the known names."""

    def __str__(self) -> str:  # KeyError would otherwise print the message with quotes around it
        return str(self.args[0]) if self.args else ""


class DeviceError(RelgradError, RuntimeError):
    """A device was requested that this machine does not have (e.g. ``"cuda"`` without a GPU)."""


class TrainingDivergedError(RelgradError, RuntimeError):
    """Training produced a non-finite or exploding loss or gradient, or a validation evaluation failed (a
    singular weight, a failed factorisation, a non-finite log-likelihood); the message says at which epoch
    (and step) and what to change.  ``fit`` restores the best parameters before raising it."""


class CheckpointError(RelgradError, ValueError):
    """A checkpoint does not match the model it is loaded into (dimension, layers, alpha), is malformed,
    truncated or damaged (the message names the file and what to do), or, when resuming training, was written
    by a run with other settings or holds no training state."""
