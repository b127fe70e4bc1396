"""Training run for the checkpoint test: importable, and runnable as a fresh process.

``python tests/_checkpoint_worker.py CHECKPOINT OUT STEPS`` rebuilds the model from scratch
(a different random init, so only the checkpoint can make it right), loads the checkpoint
(model + sparsifier + scheduler + optimizer + RNG state) with ``torch.load``'s default
``weights_only=True``, trains ``STEPS`` more steps and saves the final state to ``OUT``.
"""
from __future__ import annotations

import os
import sys

import torch
from torch import nn

import fx_sparsity as fxs

CONFIG = [
    {"tensor_fqn": "0.weight"},
    {"tensor_fqn": "3.weight", "sparsity_level": 0.6, "sparse_block_shape": (2, 2), "zeros_per_block": 2,
     "mask_dtype": torch.bool},
]


def build(seed: int):
    """Model (with dropout: the RNG state matters), sparsifier, optimizer (with state), scheduler."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 4))
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.8, sparse_block_shape=(1, 4))
    prepared = fxs.prepare_fx_sparse(model, sparsifier, [dict(entry) for entry in CONFIG])
    optimizer = torch.optim.Adam(prepared.parameters(), lr=1e-2)
    scheduler = fxs.CubicSL(sparsifier, init_sl=0.1, delta_t=1, total_t=6)
    return prepared, sparsifier, optimizer, scheduler


def train(run, start: int, stop: int) -> None:
    prepared, sparsifier, optimizer, scheduler = run
    for step in range(start, stop):
        g = torch.Generator().manual_seed(1000 + step)  # the data depends on the step only
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
        loss = (prepared(x) - y).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sparsifier.step()
        scheduler.step()


def checkpoint(run) -> dict:
    prepared, sparsifier, optimizer, scheduler = run
    return {"model": prepared.state_dict(), "sparsifier": sparsifier.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state()}


def restore(state: dict):
    run = build(seed=12345)
    prepared, sparsifier, optimizer, scheduler = run
    prepared.load_state_dict(state["model"])
    sparsifier.load_state_dict(state["sparsifier"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return run


if __name__ == "__main__":
    path, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)
    state = torch.load(path)  # weights_only=True: a checkpoint needs no pickled code
    run = restore(state)
    start = state["scheduler"]["last_epoch"]
    train(run, start, start + steps)
    torch.save(checkpoint(run), out)
    assert os.path.exists(out)
