"""relgrad: exact maximum-likelihood training of dense normalizing flows with the relative gradient.

Two twins with the same names and semantics:

* :mod:`relgrad.numpy` -- pure NumPy, hand-written backpropagation, float64 by default (the didactic one);
* :mod:`relgrad.torch` -- PyTorch ``nn.Module``, CPU or CUDA, float32 or float64, any ``torch.optim`` optimiser.

Backend-free helpers live in :mod:`relgrad.utils`, :mod:`relgrad.datasets`, :mod:`relgrad.plotting`,
:mod:`relgrad.training` and :mod:`relgrad.errors`.  ``import relgrad`` imports neither NumPy twin nor torch.
Course material (the book's exercise self-checks) lives apart, in :mod:`relgrad.teaching`.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
