"""One rank of the DistributedDataParallel check (run by tests/test_torch_library.py through torchrun).

Every rank builds the same float64 flow, wraps it in DDP (gloo, CPU), and takes 5 optimiser steps on its
own shard of each global batch with ``relgrad.torch.training_loss(ddp_model, shard, method)``.  Rank 0 also
trains an unwrapped copy on the concatenated global batches in one process.  The ranks' final parameters
are gathered; rank 0 writes, per (method, optimiser; SGD, Adam, and RelativeAdam / RelativeSGD, which average
their recorded statistics over the processes): the largest difference between the ranks and the
largest difference from the single-process run, to the JSON file named by argv[1].

Then ``relgrad.torch.fit`` itself: every rank calls ``fit(DDP(model), x_train, x_val, batch_size=B)`` with the
same data and seed; rank 0 also fits an unwrapped model with batch size ``B * world`` in one process. 37
training rows with B=4 on 2 ranks make the last global batch 5 rows, split 2/3: the unequal-share weighting
is exercised too. Rank 0 records the differences of the parameters and of the per-epoch history, and that only
it wrote the checkpoint.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import relgrad.torch as rt
from relgrad.torch.optim import RelativeAdam, RelativeSGD

DIM, LAYERS, GLOBAL_BATCH, STEPS = 5, 3, 8, 5


def make_model() -> rt.DenseFlow:
    model = rt.DenseFlow(DIM, LAYERS, generator=0, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # generic (non-orthogonal) weights and non-zero biases: every term matters
        for w, b in zip(model.weights, model.biases):
            w.add_(0.3 * torch.randn(DIM, DIM, generator=g, dtype=torch.float64))
            b.copy_(0.5 * torch.randn(DIM, generator=g, dtype=torch.float64))
    return model


def make_opt(name: str, model) -> torch.optim.Optimizer:
    """``model``: the flow or its DDP wrapper (the relative-coordinate optimisers take the model itself; rank 0's
    one-process reference runs inside the process group, so it says that it trains alone)."""
    alone = None if isinstance(model, DDP) else False
    if name == "relative-adam":
        return RelativeAdam(model, lr=0.01, distributed=alone)
    if name == "relative-sgd":  # with the trust region, so that ||P||_F is computed from the averaged Etil
        return RelativeSGD(model, lr=0.05, max_lie_norm=0.05, distributed=alone)
    return torch.optim.SGD(model.parameters(), lr=0.05) if name == "sgd" else torch.optim.Adam(model.parameters(), lr=0.01)


def train(model, opt, batches, method: str) -> None:
    for xb in batches:
        opt.zero_grad(set_to_none=True)
        rt.training_loss(model, xb, method).backward()
        opt.step()


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(2)
    batches = [1.3 * torch.randn(GLOBAL_BATCH, DIM, generator=g, dtype=torch.float64) for _ in range(STEPS)]
    shard = GLOBAL_BATCH // world  # equal shards: the mean over ranks of per-rank means is the global mean
    results = {}
    runs = [(m, o) for m in ("relative", "authors", "mixed", "autodiff") for o in ("sgd", "adam")]
    runs += [("relative", "relative-adam"), ("relative", "relative-sgd")]  # statistics averaged over the processes
    for method, opt_name in runs:
        model = make_model()
        ddp = DDP(model)
        train(ddp, make_opt(opt_name, ddp), [b[rank * shard:(rank + 1) * shard] for b in batches], method)
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        if rank == 0:
            single = make_model()
            train(single, make_opt(opt_name, single), batches, method)
            ref = torch.cat([p.detach().reshape(-1) for p in single.parameters()])
            start = torch.cat([p.detach().reshape(-1) for p in make_model().parameters()])
            results[f"{method}/{opt_name}"] = {
                "between_ranks": max(float((t - gathered[0]).abs().max()) for t in gathered),
                "vs_single_process": max(float((t - ref).abs().max()) for t in gathered),
                "moved": float((ref - start).abs().max()),
            }
    # fit under DDP against fit in one process on the same global batches
    g = torch.Generator().manual_seed(3)
    x_train = 1.3 * torch.randn(37, DIM, generator=g, dtype=torch.float64)
    x_val = 1.3 * torch.randn(11, DIM, generator=g, dtype=torch.float64)
    ckpt_dir = out + ".ckpt"
    # (key, method, optimiser name or None for fit's Adam): RelativeAdam with unequal shares in the last batch too
    fits = [(m, m, None) for m in ("relative", "authors", "mixed", "autodiff")] + [("relative-adam", "relative", "relative-adam")]
    for key, method, opt_name in fits:
        model = make_model()
        ddp = DDP(model)
        ckpt = f"{ckpt_dir}-{key}-rank{rank}.pt"   # one path per rank, to see which ranks write
        hist = rt.fit(ddp, x_train, x_val, method=method, epochs=3, batch_size=4, lr=0.01, patience=None,
                      generator=5, progress=False, check_every=3, checkpoint_path=ckpt,
                      optimizer=None if opt_name is None else (lambda params, m=ddp, o=opt_name: make_opt(o, m)))
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        if rank == 0:
            import os

            single = make_model()
            ref_hist = rt.fit(single, x_train, x_val, method=method, epochs=3, batch_size=4 * world, lr=0.01,
                              patience=None, generator=5, progress=False,
                              optimizer=None if opt_name is None else (lambda params, m=single, o=opt_name: make_opt(o, m)))
            ref = torch.cat([p.detach().reshape(-1) for p in single.parameters()])
            results[f"fit/{key}"] = {
                "between_ranks": max(float((t - gathered[0]).abs().max()) for t in gathered),
                "vs_single_process": max(float((t - ref).abs().max()) for t in gathered),
                "moved": float((ref - torch.cat([p.detach().reshape(-1) for p in make_model().parameters()])).abs().max()),
                "train_loss": max(abs(a.train_loss - b.train_loss) for a, b in zip(hist.records, ref_hist.records)),
                "val_ll": max(abs(a.val_log_likelihood - b.val_log_likelihood)
                              for a, b in zip(hist.records, ref_hist.records)),
                "epochs": [len(hist.records), len(ref_hist.records)],
                "steps": [hist.steps, ref_hist.steps],
            }
        dist.barrier()
        if rank == 0:  # only rank 0 writes its checkpoint; it holds the parameters fit restored (the best)
            saved = rt.load_checkpoint(None, ckpt, device="cpu")
            results[f"fit/{key}"]["checkpoint"] = {
                "rank0_written": os.path.exists(ckpt),
                "rank1_written": os.path.exists(f"{ckpt_dir}-{key}-rank1.pt"),
                "vs_model": max(float((a - b).abs().max()) for a, b in zip(saved.parameters(), model.parameters())),
            }
    # a time cut mid-epoch (decided by the group at a check), then a resume from rank 0's checkpoint, equals an
    # uninterrupted run; every process stops at the same step
    path = out + ".resume.pt"          # the same file on every process (one file system)
    common = dict(method="relative", epochs=2, batch_size=4, lr=0.01, patience=None, generator=5, progress=False,
                  check_every=3)
    cut_model = make_model()
    cut = rt.fit(DDP(cut_model), x_train, x_val, max_seconds=1e-9, checkpoint_path=path, **common)
    dist.barrier()
    resumed_model = make_model()
    resumed = rt.fit(DDP(resumed_model), x_train, x_val, checkpoint_path=path, resume=True, **common)
    straight_model = make_model()
    straight = rt.fit(DDP(straight_model), x_train, x_val, **common)
    steps = torch.tensor([float(cut.steps)])
    gathered_steps = [torch.empty_like(steps) for _ in range(world)]
    dist.all_gather(gathered_steps, steps)
    if rank == 0:
        try:   # the DDP run's checkpoint, resumed by one process: another global batch, refused
            rt.fit(make_model(), x_train, x_val, checkpoint_path=path, resume=True, **common)
            one_process = None
        except Exception as err:  # noqa: BLE001  (the test checks the type by name)
            one_process = f"{type(err).__name__}: {err}"
        results["fit/cut-resume"] = {
            "one_process": one_process,
            "cut": [cut.stopped_by, [float(t) for t in gathered_steps]],
            "params": max(float((a - b).abs().max())
                          for a, b in zip(resumed_model.parameters(), straight_model.parameters())),
            "train_loss": [[r.train_loss for r in h.records] for h in (resumed, straight)],
            "val": max(abs(a.val_log_likelihood - b.val_log_likelihood)
                       for a, b in zip(resumed.records, straight.records)),
        }

    # what fit refuses on several processes
    refused = {}
    cases = {
        "no_generator": dict(generator=None),
        "different_data": dict(x_train=x_train + rank),
        "reordered_data": dict(x_train=x_train.flip(0) if rank else x_train),
        "seed_plus_rank": dict(generator=1 + rank),
        "different_settings": dict(check_every=10 + rank),
    }
    for case, change in cases.items():
        kwargs = dict(x_train=x_train, x_val=x_val, epochs=1, batch_size=4, generator=1, progress=False)
        kwargs.update(change)
        try:
            rt.fit(DDP(make_model()), **kwargs)
            refused[case] = None
        except ValueError as err:
            refused[case] = str(err)
    try:   # RelativeAdam on an unwrapped model while 2 processes run: refused at the first step
        lone = make_model()
        opt = RelativeAdam(lone, lr=0.01)
        rt.training_loss(lone, batches[0][rank * shard:(rank + 1) * shard]).backward()
        opt.step()
        refused["relative_adam_unwrapped"] = None
    except RuntimeError as err:
        refused["relative_adam_unwrapped"] = str(err)
    results["fit/refused"] = refused
    if rank == 0:
        with open(out, "w") as handle:
            json.dump({"world_size": world, "results": results}, handle, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
