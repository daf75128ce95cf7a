"""relgrad.torch: the PyTorch twin (``nn.Module``, CPU or CUDA, float32 or float64, any ``torch.optim``).

Same names and semantics as :mod:`relgrad.numpy`; switch backend by changing one import.  The PyTorch
extra is :func:`training_loss`, whose ordinary ``loss.backward()`` leaves the relative gradient (or the
ordinary / authors' / autodiff one) in ``.grad``, so any ``torch.optim`` optimiser applies it.
"""

from .activation import DEFAULT_ALPHA, dlog_sigma_prime, log_sigma_prime, sigma, sigma_inverse, sigma_prime
from .flow import DenseFlow, LogLikelihoodTerms, Trace
from .gradients import deltas, gradients, loss_and_gradients, training_loss
from .train import fit, load_checkpoint, save_checkpoint

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
    "training_loss",
    "fit",
    "save_checkpoint",
    "load_checkpoint",
]
