"""relgrad.torch: the PyTorch twin (``nn.Module`` layers, CPU or CUDA, float32 or float64, any ``torch.optim``).

Same names and semantics as :mod:`relgrad.numpy` where they mean the same thing; switch backend by
changing one import.  The layers are the library: :class:`RelativeLinear`, :class:`SmoothLeakyReLU` and
:class:`RelativeConv1x1` return ``(output, logabsdet)`` and carry the relative gradient (or the ordinary /
authors' / autodiff one) through an ordinary ``loss.backward()``; :class:`DenseFlow` is built from them.
:func:`training_loss` calls the model, so DistributedDataParallel and ``torch.compile`` see the step.

Example:
    >>> import torch, relgrad.torch as rt
    >>> flow = rt.DenseFlow(3, n_layers=2, generator=0)
    >>> opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    >>> x = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))
    >>> loss = rt.training_loss(flow, x)          # the relative gradient, O(M D^2) per layer
    >>> loss.backward(); opt.step()
    >>> flow.log_prob(x).shape                     # exact log-likelihood (one LU per layer)
    torch.Size([16])
"""

from .activation import DEFAULT_ALPHA, dlog_sigma_prime, log_sigma_prime, sigma, sigma_inverse, sigma_prime
from .flow import DenseFlow, LogLikelihoodTerms, Trace
from .functions import sigma_and_log_det
from .gradients import data_loss, deltas, gradients, loss_and_gradients, training_loss, unwrap
from .nn import RULES, RelativeConv1x1, RelativeLinear, SmoothLeakyReLU
from .train import fit, load_checkpoint, make_adam, mean_log_likelihood, save_checkpoint

__all__ = [
    "DEFAULT_ALPHA",
    "sigma",
    "sigma_prime",
    "log_sigma_prime",
    "dlog_sigma_prime",
    "sigma_inverse",
    "sigma_and_log_det",
    "RULES",
    "RelativeLinear",
    "SmoothLeakyReLU",
    "RelativeConv1x1",
    "DenseFlow",
    "Trace",
    "LogLikelihoodTerms",
    "deltas",
    "data_loss",
    "gradients",
    "loss_and_gradients",
    "training_loss",
    "unwrap",
    "fit",
    "make_adam",
    "mean_log_likelihood",
    "save_checkpoint",
    "load_checkpoint",
]
