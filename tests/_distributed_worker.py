"""One rank of the distributed test: DDP and FSDP2 over a prepared module, gloo on loopback.

``run(rank, world_size, port, out_dir)`` trains the same prepared MLP under each recipe
and saves, per step, what every rank holds (masks, whole weights, levels) to
``out_dir/rank{rank}.pt``; the test compares the ranks with each other and with a
single-process run on the concatenated batch (``reference``).
"""
from __future__ import annotations

import datetime
import os
import warnings

import torch
import torch.distributed as dist
from torch import nn

import fx_sparsity as fxs

STEPS = 5
BATCH = 8
LEVEL = 0.75
CONFIG = [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight"}, {"tensor_fqn": "4.weight", "sparsity_level": 0.5}]


def make(bool_mask: bool = False, scope="model", device="cpu"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)).to(device)
    config = [dict(entry) for entry in CONFIG]
    if bool_mask:
        config[1]["mask_dtype"] = torch.bool
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=LEVEL, sparse_block_shape=(1, 4))
    prepared = fxs.prepare_fx_sparse(model, sparsifier, config, scope=scope)
    scheduler = fxs.CubicSL(sparsifier, init_sl=0.0, delta_t=1, total_t=3)
    return prepared, sparsifier, scheduler


def batch(rank: int, step: int):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(BATCH, 16, generator=g), torch.randn(BATCH, 10, generator=g)


def masks(prepared) -> dict[str, torch.Tensor]:
    out = {}
    for e in CONFIG:
        mask = fxs.passes.mask_or_none(prepared, e["tensor_fqn"] + "_mask")
        out[e["tensor_fqn"]] = (mask.full_tensor() if hasattr(mask, "full_tensor") else mask).detach().clone()
    return out


def weights(prepared) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in prepared.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = full.detach().clone()
    return out


def reference(world_size: int) -> list[dict]:
    """The same training in one process on the ranks' batches concatenated (what DDP/FSDP average to)."""
    prepared, sparsifier, scheduler = make()
    opt = torch.optim.SGD(prepared.parameters(), lr=0.1, momentum=0.9)
    records = []
    for step in range(STEPS):
        xs, ys = zip(*(batch(r, step) for r in range(world_size)))
        loss = (prepared(torch.cat(xs)) - torch.cat(ys)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsifier.step()
        scheduler.step()
        records.append({"masks": masks(prepared), "weights": weights(prepared)})
    return records


def train(rank, wrapped, prepared, sparsifier, scheduler, step_sparsifier, one_more_forward=False, device="cpu"):
    """SGD steps on this rank's batches; ``step_sparsifier`` (a callable, or None on ranks that don't) runs
    after ``optimizer.step()``, then the scheduler."""
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    records = []
    for step in range(STEPS):
        x, y = (t.to(device) for t in batch(rank, step))
        loss = (wrapped(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step_sparsifier is not None:
            step_sparsifier()
            scheduler.step()
        records.append({"masks": masks(prepared), "weights": weights(prepared),
                        "levels": [g["sparsity_level"] for g in sparsifier.groups]})
    if one_more_forward:
        wrapped(batch(rank, STEPS)[0])  # the masks of the last step reach the other ranks at this forward
    return records


def ddp_runs(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    # Recipe 1: every rank calls sparsifier.step() after optimizer.step(); no buffer broadcast needed.
    prepared, sparsifier, scheduler = make()
    out["ddp_every_rank"] = train(rank, DDP(prepared, broadcast_buffers=False), prepared, sparsifier, scheduler,
                                  sparsifier.step)
    # The same on scope="layers" (the user's Sequential with a GraphModule per masked layer).
    prepared, sparsifier, scheduler = make(scope="layers")
    out["ddp_layers"] = train(rank, DDP(prepared, broadcast_buffers=False), prepared, sparsifier, scheduler,
                              sparsifier.step)
    # The same with bool masks and broadcast_buffers=True (gloo broadcasts bool buffers).
    prepared, sparsifier, scheduler = make(bool_mask=True)
    out["ddp_bool_broadcast"] = train(rank, DDP(prepared, broadcast_buffers=True), prepared, sparsifier,
                                      scheduler, sparsifier.step)
    # Recipe 2: only rank 0 steps the sparsifier; DDP's buffer broadcast (at each forward) carries the masks.
    prepared, sparsifier, scheduler = make()
    seen = []
    prepared.register_forward_pre_hook(lambda module, args: seen.append(masks(module)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the scheduler on rank 1 warns: its sparsifier never steps
        out["ddp_rank0_broadcast"] = train(rank, DDP(prepared, broadcast_buffers=True), prepared, sparsifier,
                                           scheduler, sparsifier.step if rank == 0 else None, one_more_forward=True)
    out["ddp_rank0_broadcast_seen_at_forward"] = seen
    return out


def fsdp2_run(rank: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    out = {}
    # An inlined layer's own forward never runs, so fully_shard on it never gathers its weight.
    prepared, _, _ = make()
    fully_shard(prepared.get_submodule("2"))
    fully_shard(prepared)
    try:
        prepared(batch(rank, 0)[0])
        out["per_layer_error"] = None
    except RuntimeError as e:
        out["per_layer_error"] = str(e).splitlines()[0]

    prepared, sparsifier, scheduler = make()
    fully_shard(prepared)
    out["param_types"] = sorted({type(p).__name__ for p in prepared.parameters()})
    out["mask_types"] = sorted({type(prepared.get_buffer(e["tensor_fqn"] + "_mask")).__name__ for e in CONFIG})
    probe, probe_sparsifier, _ = make()
    fully_shard(probe)
    for group in probe_sparsifier.groups:
        group["sparsity_level"] = 0.5
    probe_sparsifier.step()  # on the shards: step() gathers the whole weights itself
    out["sharded_step"] = {"zeros": [(m == 0).float().mean().item() for m in masks(probe).values()],
                           "param_types": sorted({type(p).__name__ for p in probe.parameters()})}

    def step():
        prepared.unshard()
        try:
            sparsifier.step()
        finally:
            prepared.reshard()

    out["fsdp2"] = train(rank, prepared, prepared, sparsifier, scheduler, step)

    # scope="layers": each layer is its own GraphModule, so fully_shard per layer (as per transformer
    # block) works: FSDP2 gathers a layer's weight when the layer runs, and the graph masks it there.
    layered, layered_sparsifier, layered_scheduler = make(scope="layers")
    shards = [layered.get_submodule(name) for name in ("0", "2", "4")]
    for layer in shards:
        fully_shard(layer)
    fully_shard(layered)

    def step_layers():
        for module in (*shards, layered):
            module.unshard()
        try:
            layered_sparsifier.step()
        finally:
            for module in (*shards, layered):
                module.reshard()

    out["fsdp2_layers"] = train(rank, layered, layered, layered_sparsifier, layered_scheduler, step_layers)
    out["fsdp2_layers_bytes"] = {
        "mask": sum(b.numel() * b.element_size() for n, b in layered.named_buffers() if n.endswith("_mask")),
        "weight_shard": sum(p.to_local().numel() * p.element_size() for n, p in layered.named_parameters()
                            if n.endswith("weight")),
    }
    for module in (*shards, layered):
        module.reshard()

    # Masks sharded like the weights: each rank keeps its shard of every mask.
    sharded, sharded_sparsifier, sharded_scheduler = make(scope="layers")
    out["masks_as_parameters"] = fxs.masks_as_parameters(sharded)
    for name in ("0", "2", "4"):
        fully_shard(sharded.get_submodule(name))
    fully_shard(sharded)
    out["fsdp2_sharded_masks"] = train(rank, sharded, sharded, sharded_sparsifier, sharded_scheduler,
                                       sharded_sparsifier.step)  # step() gathers and writes the shards itself
    out["fsdp2_sharded_masks_bytes"] = sum(
        p.to_local().numel() * p.element_size() for n, p in sharded.named_parameters() if n.endswith("_mask"))
    out["fsdp2_sharded_masks_keys"] = sorted(k for k in sharded.state_dict() if k.endswith("_mask"))
    try:
        sharded_sparsifier.squash_mask()
        out["sharded_masks_squash_error"] = None
    except RuntimeError as e:
        out["sharded_masks_squash_error"] = str(e).split(", which")[0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # they stay GraphModules, and squash says so
        layered_sparsifier.squash_mask()
    out["fsdp2_layers_squashed"] = {"classes": [type(layered.get_submodule(n)).__name__ for n in ("0", "2", "4")],
                                    "output": layered(batch(0, 99)[0]).detach(),
                                    "has_masks": any("_mask" in n for n, _ in layered.named_buffers())}

    prepared.unshard()
    try:
        sparsifier.squash_mask()
        out["unsharded_squash_error"] = None
    except RuntimeError as e:
        out["unsharded_squash_error"] = str(e)
    prepared.reshard()
    before = weights(prepared)
    final_masks = masks(prepared)
    sparsifier.squash_mask()
    out["squashed"] = {"weights": weights(prepared), "expected": {
        k: before[k] * final_masks[k] if k in final_masks else before[k] for k in before},
        "output": prepared(batch(0, 99)[0]).detach(), "has_masks": any("_mask" in n for n, _ in prepared.named_buffers())}
    return out


def run_ddp_on_gpus(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """DDP over a module prepared on the GPU: NCCL with a GPU per rank where there are enough GPUs, else gloo
    with the ranks sharing one (NCCL refuses two ranks on one GPU)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    nccl = dist.is_nccl_available() and torch.cuda.device_count() >= world_size
    device = torch.device("cuda", rank if nccl else 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl" if nccl else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        prepared, sparsifier, scheduler = make(device=device)
        records = train(rank, DDP(prepared, device_ids=[device], broadcast_buffers=False), prepared, sparsifier,
                        scheduler, sparsifier.step, device=device)
        on_cpu = [{k: {n: t.cpu() for n, t in v.items()} if isinstance(v, dict) else v for k, v in r.items()}
                  for r in records]
        mask_devices = sorted({str(sparsifier.get_mask(g["tensor_fqn"]).device) for g in sparsifier.groups})
        torch.save({"backend": dist.get_backend(), "mask_devices": mask_devices, "records": on_cpu},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(target, world_size: int, out_dir, timeout_s: float = 120) -> list[dict]:
    """Run ``target(rank, world_size, port, out_dir)`` on ``world_size`` spawned ranks; what each saved."""
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(target, args=(world_size, port, str(out_dir)), nprocs=world_size, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout_s  # a hung collective must fail the test, not hang CI
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed workers did not finish in {timeout_s:g} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(os.path.join(str(out_dir), f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def run(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = ddp_runs(rank)
        results.update(fsdp2_run(rank))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
