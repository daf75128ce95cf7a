"""Optimisers whose statistics live in the relative (Lie-algebra) coordinates of each dense layer.

Why: Adam rescales every *entry* of ``weight.grad``.  With the relative gradient ``R = E W`` (``E`` the
gradient in the coordinates of a multiplicative step ``W <- (I - eps A) W``) that per-entry rescaling is
done in a basis that has no meaning for the group of invertible matrices: it changes the step's direction
in the Lie algebra (it adds rotations), and it makes training depend on an affine change of the input,
which the relative gradient itself does not (equivariance, Cardoso & Laheld 1996).  The optimisers here
keep their statistics in the Lie algebra and apply the step multiplicatively, so they inherit the
equivariance.

The Lie-algebra gradient of a layer ``Y = Z W^T + 1 b^T`` (batch rows, ``Delta = dLoss/dY``, ``c_m =
dLoss/dr_m`` for its log-determinant stand-in, ``csum = sum_m c_m``, ``-1`` for ``-mean log p``) in the
augmented coordinates ``Ahat = [[W, b], [0, 1]]`` is the D x (D+1) matrix

    Etil = Delta^T [Y | 1] + csum [I | 0]            (the relative gradient is Etil Ahat: R_W = E W, ...)

:class:`RelativeAdam` (R1 of the optimiser research note): Adafactor-style second moments of ``Etil**2``
factored by rows (D) and columns (D+1), ``1/sqrt(Vhat_ij) = a_i c_j``; the preconditioned Lie step is
``P = diag(a) Etil diag(c)`` and its update in parameter coordinates ``U = P Ahat`` is formed in rank-M form
(``diag(a) Delta^T ((Ytil diag c) Ahat) + csum diag(a c) [W | b]``): two M x D x D products, never a
D x D x D product, an inverse or a solve.  Momentum is kept in parameter coordinates (``m`` is then the same
linear image of the Lie-algebra momentum at the current W, up to the change of W over its horizon).  An
optional trust region ``max_lie_norm`` caps ``||lr P||_F`` of the *current* update (a bound on its spectral
norm); the applied step is the bias-corrected momentum of such updates, so it is not capped itself (an
average of past, differently scaled steps can exceed the cap).  ``precondition="none"`` keeps ``a = c = 1``: relative SGD with (EMA)
momentum and the same trust region, exported as :class:`RelativeSGD`.

Cost per layer and step, on top of the layer's own backward: two M x D x D products for ``U``, and ``Etil``
explicitly (M D (D+1) multiply-adds) when its statistics are used (the factored moments or the trust region;
plain :class:`RelativeSGD` skips it); O(D^2) memory for ``m`` and O(D) for the factors.  A frozen bias
(``requires_grad=False``) stays put and its weight takes its block of ``U`` (the bias column still enters the
statistics and ``||P||_F``, as for a trained bias).

Use::

    opt = RelativeAdam(flow, lr=1e-3)          # the model (any nn.Module holding RelativeLinear layers)
    loss = training_loss(flow, x); loss.backward(); opt.step(); opt.zero_grad()

The optimiser records, through forward hooks on the model's :class:`~relgrad.torch.RelativeLinear` layers,
each training forward's ``Y`` and (through tensor hooks) its ``Delta`` and ``c`` in the backward; ``step``
uses every forward whose backward ran since the last step (gradient accumulation adds them, as ``.grad``
does) and forgets them.  It does not read ``weight.grad`` for those layers: the update comes from the
recorded batch, so it is the same whichever rule the layer's ``.grad`` carries.  Other trainable parameters
of the model (none in a DenseFlow) get an ordinary Adam step with the same ``lr`` and ``betas`` (eps 1e-8).

Several processes: give the optimiser the DistributedDataParallel wrapper.  Each step then averages ``Etil``
(before the statistics, when they are used) and ``U`` (before the momentum) over the wrapper's process group,
one or two all-reduces of D (D + 1) numbers per layer, as DDP averages ``.grad``; every process takes the same
step, equal to one process on the concatenated batch when the processes' losses are weighted as DDP's gradient
average assumes (equal shares, or :func:`~relgrad.torch.fit`'s weighting of unequal ones).  Every process must
call ``step`` with the same layers recorded and the same skip decision (``fit`` agrees on it), or the
collectives wait for each other.  An unwrapped model while ``torch.distributed`` runs several processes is refused
at ``step`` (each process would step on its own share and the copies would drift apart) unless
``distributed=False`` says that this process trains its own model alone.  ``nn.DataParallel`` is refused (its
per-call replicas do not run the hooks).  Not supported (a clear error):
bad-step skipping on the device other than through ``found_inf`` (the GradScaler protocol, which
:func:`~relgrad.torch.fit` uses).

Shapes:
    per RelativeLinear layer: weight (D, D), bias (D,) or None; recorded Y and Delta (M, D), c (M,).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .nn import RelativeLinear

__all__ = ["RelativeAdam", "RelativeSGD", "lie_gradient", "PRECONDITIONERS", "warmup_cosine_schedule",
           "jax_adam_schedule"]

#: ``precondition=`` choices: row/column-factored second moments, or none (relative SGD with momentum).
PRECONDITIONERS = ("factored", "none")


def lie_gradient(y: torch.Tensor, delta: torch.Tensor, csum: torch.Tensor, bias: bool) -> torch.Tensor:
    """``Etil = Delta^T [Y | 1] + csum [I | 0]``: the gradient in the coordinates of ``Ahat <- (I + A) Ahat``.

    (Without a bias the last column is dropped.)  ``-Etil Ahat`` is minus the relative gradient, so relative
    SGD is ``Ahat <- (I - lr Etil) Ahat``.

    Shapes:
        y, delta: (M, D); csum: (); returns (D, D + 1) with a bias, else (D, D).
    """
    e = delta.T @ y
    e.diagonal().add_(csum)
    if bias:
        e = torch.cat([e, delta.sum(dim=0, keepdim=True).T], dim=1)
    return e


class _Recorder:
    """The batches of one layer between two steps: ``Y`` from its forward, ``Delta`` and ``c`` from its backward."""

    def __init__(self, layer: RelativeLinear) -> None:
        self.layer = layer
        self.records: List[Dict[str, Optional[torch.Tensor]]] = []
        self.handle = layer.register_forward_hook(self._forward)

    def _forward(self, module: nn.Module, args: Tuple[Any, ...], output: Tuple[torch.Tensor, torch.Tensor]) -> None:
        y, r = output
        if not (module.training and torch.is_grad_enabled() and y.requires_grad and r.requires_grad):
            return  # evaluation, or a forward no backward can reach: nothing to record
        rec: Dict[str, Optional[torch.Tensor]] = {"y": y.detach(), "delta": None, "c": None}
        self.records.append(rec)

        def on_delta(g: torch.Tensor) -> None:
            rec["delta"] = g.detach() if rec["delta"] is None else rec["delta"] + g.detach()

        def on_c(g: torch.Tensor) -> None:
            rec["c"] = g.detach() if rec["c"] is None else rec["c"] + g.detach()

        y.register_hook(on_delta)
        r.register_hook(on_c)

    def take(self, dtype: torch.dtype) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(Y, Delta, csum) of every recorded forward whose backward ran (rows stacked), or None; then forget all."""
        done = [r for r in self.records if r["delta"] is not None]
        self.records = []
        if not done:
            return None
        y = torch.cat([r["y"].reshape(-1, r["y"].shape[-1]).to(dtype) for r in done])
        delta = torch.cat([r["delta"].reshape(-1, r["delta"].shape[-1]).to(dtype) for r in done])
        csum = sum((r["c"].sum().to(dtype) if r["c"] is not None else torch.zeros((), dtype=dtype, device=y.device))
                   for r in done)
        return y, delta, csum


class RelativeAdam(torch.optim.Optimizer):
    """Adam with its second moments in the relative (Lie-algebra) coordinates, factored by rows and columns.

    Args:
        model: an ``nn.Module`` holding :class:`~relgrad.torch.RelativeLinear` layers (a DenseFlow, or any model),
            or its DistributedDataParallel wrapper (several processes: see the module docstring).
        distributed: None (default): average over the processes of a DDP wrapper's group, refuse an unwrapped
            model when several processes run; True: the same, and require the DDP wrapper; False: never
            synchronise (each process trains its own unwrapped model; a DDP wrapper is refused).
        lr: step size in Lie-algebra units: an entry of the preconditioned step ``P`` is about 1, so
            ``lr`` is the typical relative change per entry.
        betas: (beta1, beta2): momentum of the update and decay of the factored second moments.
        eps: added to the row and column second moments (keeps ``a``, ``c`` finite for a zero gradient).
        precondition: ``"factored"`` (row/column second moments) or ``"none"`` (a = c = 1: relative SGD with
            EMA momentum).
        max_lie_norm: if set, the current update of each layer is shortened so that ``||lr P||_F <= max_lie_norm``
            (the momentum step applied is not capped itself).

    ``step()`` follows ``torch.optim``: per layer, ``m <- beta1 m + (1 - beta1) U`` and
    ``[W | b] <- [W | b] - lr_eff m / (1 - beta1^t)``, with ``U = P Ahat`` as in the module docstring.
    ``state_dict()``/``load_state_dict()`` round-trip the moments and step counts (``fit``'s checkpoints).
    ``last_diagnostics`` holds, per layer, ``||P||_F`` (when ``max_lie_norm`` is set, else None) and the step
    size applied (device tensors: no host synchronisation per step).

    Shapes:
        per layer: weight (D, D), bias (D,); state ``exp_avg`` like each trained parameter, ``row_sq`` (D,), ``col_sq``
        (D + 1,) (D without a bias) on the weight.
    """

    #: read a CPU ``found_inf`` on the host (free there); False forces the device path (torch.where), for tests
    _host_skip = True

    def __init__(self, model: nn.Module, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-30, *, precondition: str = "factored", max_lie_norm: Optional[float] = None,
                 distributed: Optional[bool] = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__} takes the model (an nn.Module holding RelativeLinear layers), "
                            f"not {type(model).__name__}: it records each layer's batch through hooks")
        wrapped = isinstance(model, nn.parallel.DistributedDataParallel)
        if distributed not in (None, True, False):
            raise ValueError(f"distributed must be None, True or False, got {distributed!r}")
        if distributed is True and not wrapped:
            raise ValueError(f"{type(self).__name__}(distributed=True) synchronises through a DistributedDataParallel "
                             f"wrapper: pass the wrapper, not the {type(model).__name__} itself")
        if distributed is False and wrapped:
            raise ValueError(f"{type(self).__name__}(distributed=False) with a DistributedDataParallel wrapper would let "
                             "the processes drift apart: leave distributed at None (or True) to synchronise them")
        # the group whose processes a step averages over: a DDP wrapper's
        self._group: Any = model.process_group if wrapped else None
        self._distributed = distributed
        if isinstance(model, nn.DataParallel):
            raise NotImplementedError(
                f"{type(self).__name__} records each layer's batch through hooks, which nn.DataParallel's per-call "
                "replicas do not run: use DistributedDataParallel (one process per device) or one device")
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a positive finite number, got {lr!r}")
        b1, b2 = betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        if precondition not in PRECONDITIONERS:
            raise ValueError(f"precondition must be one of {PRECONDITIONERS}, got {precondition!r}")
        if max_lie_norm is not None and not max_lie_norm > 0:
            raise ValueError(f"max_lie_norm must be positive or None, got {max_lie_norm!r}")
        layers = [m for m in model.modules() if isinstance(m, RelativeLinear)]
        if not layers:
            raise ValueError(f"{type(model).__name__} holds no RelativeLinear layer: {type(self).__name__} has nothing "
                             "to precondition; use torch.optim.Adam")
        self._layers = [layer for layer in layers if layer.weight.requires_grad]
        mine = {id(p) for layer in self._layers for p in (layer.weight, layer.bias) if p is not None}
        groups = [{"params": [p for layer in self._layers for p in (layer.weight, layer.bias) if p is not None],
                   "kind": "relative"}]
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in mine]
        if others:
            groups.append({"params": others, "kind": "ordinary"})
        defaults = dict(lr=float(lr), betas=(float(b1), float(b2)), eps=float(eps), precondition=precondition,
                        max_lie_norm=None if max_lie_norm is None else float(max_lie_norm))
        super().__init__(groups, defaults)
        self._recorders = [_Recorder(layer) for layer in self._layers]
        self.last_diagnostics: List[Dict[str, Any]] = []
        # fit() passes a device-side "skip this step" flag through GradScaler's protocol (found_inf)
        self._step_supports_amp_scaling = True

    def __del__(self) -> None:  # the hooks must not outlive the optimiser
        for rec in getattr(self, "_recorders", []):
            rec.handle.remove()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad``, and forget the batches recorded since the last step (as ``.grad``)."""
        super().zero_grad(set_to_none=set_to_none)
        for rec in getattr(self, "_recorders", []):
            rec.records = []

    def _world(self) -> int:
        """Number of processes whose recorded batches a step averages: the DDP wrapper's group, else 1."""
        if self._group is not None:
            return dist.get_world_size(self._group)
        if self._distributed is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError(
                f"{type(self).__name__} was given an unwrapped model while torch.distributed runs "
                f"{dist.get_world_size()} processes: each would step on its own share of the batch and the copies "
                f"would drift apart. Pass the DistributedDataParallel wrapper ({type(self).__name__}(ddp_model, ...)), "
                "or distributed=False if this process trains its own model alone")
        return 1

    def _average(self, world: int, *tensors: Optional[torch.Tensor]) -> None:
        """In place: the mean over the processes of each tensor (None skipped), one all-reduce for all of them."""
        present = [t for t in tensors if t is not None]
        if world == 1 or not present:
            return
        flat = torch.cat([t.reshape(-1) for t in present])
        dist.all_reduce(flat, group=self._group)
        flat.div_(world)
        offset = 0
        for t in present:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:  # type: ignore[override]
        """One update from the batches recorded since the last step (see the class docstring)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        world = self._world()  # (refuses an unwrapped model under several processes before anything changes)
        if getattr(self, "grad_scale", None) is not None:
            raise NotImplementedError(
                f"{type(self).__name__} does not unscale its recorded batches: use it without torch.amp.GradScaler "
                "(bf16 autocast needs no scaler)")
        for rec in self._recorders:  # checked before any layer steps, so that this error leaves nothing half-applied
            layer = rec.layer
            if layer.weight.grad is not None and not any(r["delta"] is not None for r in rec.records):
                raise RuntimeError(
                    f"{type(self).__name__}: {layer.where} has a gradient but no recorded batch; its forward must "
                    "run in training mode with grad enabled, through the module (layer(x), not its weight), "
                    "after this optimiser was created")
        found_inf = getattr(self, "found_inf", None)
        skip = None if found_inf is None else found_inf.reshape(()) > 0
        self.last_diagnostics = []
        if skip is not None and skip.device.type == "cpu" and self._host_skip:
            # on the CPU reading the flag costs nothing: a skipped step then touches nothing, and a taken one
            # runs in place (on an accelerator the flag stays there and torch.where keeps the state instead)
            if bool(skip):
                for rec in self._recorders:
                    rec.records = []
                return loss
            skip = None
        for group in self.param_groups:
            if group["kind"] == "relative":
                for rec in self._recorders:
                    self._relative_step(rec, group, skip, world)
            else:
                self._ordinary_step(group, skip)
        return loss

    # ------------------------------------------------------------------------------------------ helpers
    @staticmethod
    def _assign(target: torch.Tensor, new: torch.Tensor, skip: Optional[torch.Tensor]) -> None:
        # a skipped step leaves parameters and state bit-identical, decided on the device (no host sync)
        target.copy_(new if skip is None else torch.where(skip, target, new))

    @classmethod
    def _momentum_step(cls, param: torch.Tensor, m: torch.Tensor, u: torch.Tensor, beta1: float,
                       scale: torch.Tensor, skip: Optional[torch.Tensor]) -> None:
        """``m <- beta1 m + (1 - beta1) u``; ``param <- param - scale m`` (both kept when ``skip`` is true)."""
        if skip is None:  # in place: each buffer is read and written once
            m.lerp_(u, 1 - beta1)
            param.addcmul_(m, scale, value=-1)
        else:
            m_new = torch.lerp(m, u, 1 - beta1)
            cls._assign(param, param - scale * m_new, skip)
            cls._assign(m, m_new, skip)

    def _relative_step(self, rec: _Recorder, group: Dict[str, Any], skip: Optional[torch.Tensor], world: int) -> None:
        layer = rec.layer
        w, b = layer.weight, layer.bias
        batch = rec.take(w.dtype)
        if batch is None:  # (a layer with a gradient and no batch was refused in step())
            return
        y, delta, csum = batch
        beta1, beta2 = group["betas"]
        state = self.state[w]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float64, device=w.device)
            state["exp_avg"] = torch.zeros_like(w)
            if b is not None and b.requires_grad:
                self.state[b]["exp_avg"] = torch.zeros_like(b)
            if group["precondition"] == "factored":
                state["row_sq"] = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
                state["col_sq"] = torch.zeros(w.shape[1] + (b is not None), dtype=w.dtype, device=w.device)
        if state["step"].device != w.device:  # loaded from a checkpoint of another device
            state["step"] = state["step"].to(w.device)
        step = state["step"] + 1
        d = w.shape[0]
        # Etil = [E_w | e_b] (lie_gradient), kept as its two blocks (no (D, D+1) concatenation), and formed only
        # for the statistics that need it: the factored second moments and the trust region's ||P||_F
        need_e = group["precondition"] == "factored" or group["max_lie_norm"] is not None
        if need_e:
            e_w = delta.T @ y                                                 # M D^2
            e_w.diagonal().add_(csum)
            e_b = delta.sum(dim=0) if b is not None else None
            self._average(world, e_w, e_b)  # several processes: the whole batch's Etil, as DDP's .grad
        sq_w = None
        if group["precondition"] == "factored":
            sq_w = e_w.square()
            row_new, col_new = sq_w.sum(dim=1), sq_w.sum(dim=0)
            if e_b is not None:
                row_new = row_new + e_b.square()
                col_new = torch.cat([col_new, e_b.square().sum().reshape(1)])
            row = beta2 * state["row_sq"] + (1 - beta2) * row_new
            col = beta2 * state["col_sq"] + (1 - beta2) * col_new
            corr = 1 - beta2 ** step
            row_hat, col_hat = row / corr + group["eps"], col / corr + group["eps"]
            # Adafactor: Vhat_ij = row_i col_j / sum(row), so 1/sqrt(Vhat_ij) = a_i c_j
            a = row_hat.rsqrt()
            c = col_hat.rsqrt() * row_hat.sum().sqrt()
            self._assign(state["row_sq"], row, skip)
            self._assign(state["col_sq"], col, skip)
        else:
            a = torch.ones(d, dtype=w.dtype, device=w.device)
            c = torch.ones(d + (b is not None), dtype=w.dtype, device=w.device)
        lr_eff = torch.full((), group["lr"], dtype=w.dtype, device=w.device)
        p_fro = None
        if group["max_lie_norm"] is not None:
            # ||P||_F^2 = sum_ij a_i^2 Etil_ij^2 c_j^2: one pass over Etil^2 (a matrix-vector product)
            sq_w = e_w.square() if sq_w is None else sq_w
            p_sq = a.square() @ (sq_w @ c[:d].square())
            if e_b is not None:
                p_sq = p_sq + (a.square() * e_b.square()).sum() * c[d].square()
            p_fro = p_sq.sqrt()
            lr_eff = torch.minimum(lr_eff, group["max_lie_norm"] / p_fro.clamp_min(torch.finfo(w.dtype).tiny))
        # U = P Ahat in rank-M form: diag(a) Delta^T ((Ytil diag c) Ahat) + csum diag(a c) [W | b]
        yc = y * c[None, :d]
        u_w = delta.T @ (yc @ w)                                              # two M x D x D products
        u_w.mul_(a[:, None]).addcmul_(w, (csum * a * c[:d])[:, None])
        u_b = None
        if b is not None and b.requires_grad:  # (a frozen bias stays put; W takes its block of P Ahat)
            ycb = yc @ b + c[d]                                               # (M,)
            u_b = a * (delta.T @ ycb) + csum * a * c[:d] * b
        self._average(world, u_w, u_b)  # U is linear in the batch: the mean of the processes' U is the whole one's
        corr1 = 1 - beta1 ** step
        scale = (lr_eff / corr1).to(w.dtype)
        self._momentum_step(w, state["exp_avg"], u_w, beta1, scale, skip)
        if u_b is not None:
            # (setdefault: a bias frozen at the first step and trained later starts its momentum at zero)
            m_b = self.state[b].setdefault("exp_avg", torch.zeros_like(b))
            self._momentum_step(b, m_b, u_b, beta1, scale, skip)
        self._assign(state["step"], step, skip)
        self.last_diagnostics.append({"layer": layer.where, "lie_norm": p_fro, "lr": lr_eff})

    def _ordinary_step(self, group: Dict[str, Any], skip: Optional[torch.Tensor]) -> None:
        """Plain Adam for parameters outside the RelativeLinear layers (e.g. a researcher's own modules)."""
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            st = self.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float64, device=p.device)
                st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
            if st["step"].device != p.device:  # loaded from a checkpoint of another device
                st["step"] = st["step"].to(p.device)
            step = st["step"] + 1
            m = beta1 * st["exp_avg"] + (1 - beta1) * p.grad
            v = beta2 * st["exp_avg_sq"] + (1 - beta2) * p.grad.square()
            upd = (m / (1 - beta1 ** step)) / ((v / (1 - beta2 ** step)).sqrt() + 1e-8)
            self._assign(p, p - group["lr"] * upd, skip)
            self._assign(st["exp_avg"], m, skip)
            self._assign(st["exp_avg_sq"], v, skip)
            self._assign(st["step"], step, skip)


class RelativeSGD(RelativeAdam):
    """Relative SGD with EMA momentum and an optional Lie-norm trust region: :class:`RelativeAdam` with
    ``precondition="none"``.

    ``[W | b] <- [W | b] - lr m / (1 - beta^t)``, ``m <- beta m + (1 - beta) Etil Ahat`` (the relative
    gradient, computed from the recorded batch).  With ``momentum=0`` and no trust region this is exactly
    ``torch.optim.SGD`` on the relative gradient.

    Shapes:
        as :class:`RelativeAdam`.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-2, momentum: float = 0.9, *,
                 max_lie_norm: Optional[float] = None, distributed: Optional[bool] = None) -> None:
        super().__init__(model, lr=lr, betas=(momentum, 0.0), precondition="none", max_lie_norm=max_lie_norm,
                         distributed=distributed)


# ============================================================================================ schedules
def warmup_cosine_schedule(total_steps: int, *, warmup_steps: int = 0, final_factor: float = 1.0) -> Callable[[int], float]:
    """``t -> factor`` for :func:`~relgrad.torch.fit`'s ``lr_schedule``: a linear warm-up over ``warmup_steps``
    (factor ``(t + 1) / warmup_steps``, as Self Normalizing Flows' per-batch warm-up), then a cosine from 1 down to
    ``final_factor`` at ``total_steps`` (``final_factor=1``: constant after the warm-up).

    Shapes:
        none (integers in, a float out).
    """
    if total_steps < 1 or warmup_steps < 0:
        raise ValueError(f"need total_steps >= 1 and warmup_steps >= 0, got {total_steps}, {warmup_steps}")
    if not 0.0 <= final_factor <= 1.0:
        raise ValueError(f"final_factor must be in [0, 1], got {final_factor!r}")

    def factor(t: int) -> float:
        if t < warmup_steps:
            return (t + 1) / warmup_steps
        span = max(total_steps - warmup_steps, 1)
        progress = min((t - warmup_steps) / span, 1.0)
        return final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def jax_adam_schedule(steps_per_epoch: int, betas: Tuple[float, float] = (0.9, 0.999),
                      first_epoch: int = 1) -> Callable[[int], float]:
    """``t -> factor`` that makes ``torch.optim.Adam`` take the steps of the authors' JAX training loop.

    Their ``experiments/train.py`` calls ``update(i, opt_state, batch)`` with ``i`` the *epoch* (from
    ``first_epoch``), and ``jax.example_libraries.optimizers.adam`` bias-corrects with ``1 - b**(i + 1)``.
    Torch corrects with the true step count ``t + 1``; the ratio of the two step sizes,

        [sqrt(1 - b2^(i+1)) / (1 - b1^(i+1))] / [sqrt(1 - b2^(t+1)) / (1 - b1^(t+1))],   i = first_epoch + t // steps_per_epoch,

    is this factor (exact up to where ``eps`` enters, 1e-8 against sqrt(v) ~ |gradient|).

    Shapes:
        none (integers in, a float out).
    """
    b1, b2 = betas
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")

    def correction(k: int) -> float:
        return math.sqrt(1.0 - b2 ** k) / (1.0 - b1 ** k)

    def factor(t: int) -> float:
        epoch = first_epoch + t // steps_per_epoch
        return correction(epoch + 1) / correction(t + 1)

    return factor
