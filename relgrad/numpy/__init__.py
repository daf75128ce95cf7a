"""relgrad.numpy: the pure-NumPy twin (hand-written backpropagation, float64 by default).

The same names as :mod:`relgrad.torch` where they mean the same thing (``DenseFlow``, ``log_prob``,
``sample``, ``gradients``, ``fit``, ``rng=``), so a chapter switches backend with one import::

    from relgrad.numpy import DenseFlow, gradients, fit

Differences: ``DenseFlow.forward`` returns ``s`` here but ``(s, logabsdet)`` in torch (whose flow is built
from layers); there is no ``"autodiff"`` method (no autograd); ``gradients``' method defaults to
``"relative"`` here and to the model's rule in torch.
"""

from .activation import DEFAULT_ALPHA, dlog_sigma_prime, log_sigma_prime, sigma, sigma_inverse, sigma_prime
from .flow import DenseFlow, LogLikelihoodTerms, Trace
from .gradients import deltas, gradients, loss_and_gradients
from .train import Adam, fit, load_checkpoint, save_checkpoint

__all__ = [
    "DEFAULT_ALPHA",
    "sigma",
    "sigma_prime",
    "log_sigma_prime",
    "dlog_sigma_prime",
    "sigma_inverse",
    "DenseFlow",
    "Trace",
    "LogLikelihoodTerms",
    "deltas",
    "gradients",
    "loss_and_gradients",
    "Adam",
    "fit",
    "save_checkpoint",
    "load_checkpoint",
]
