"""Accuracy of structured pruning on real data: a small CNN on scikit-learn's 8x8 digits, trained dense,
then SaliencyPruner to 50% of its channels (CubicSL over the fine-tuning epochs), pruned, and tested.

    python tools/structured_digits.py [--seeds 5]

Prints, per seed, dense and pruned test accuracy and the parameter counts, then the mean change.
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch import nn

import fx_sparsity as fxs
from fx_sparsity.demo import load_digits_split


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10))


def epoch(model: nn.Module, opt: torch.optim.Optimizer, x, y, g: torch.Generator) -> None:
    model.train()
    perm = torch.randperm(len(x), generator=g)
    for i in range(0, len(perm), 64):
        b = perm[i:i + 64]
        loss = F.cross_entropy(model(x[b]), y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()


@torch.no_grad()
def accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def run(seed: int, dense_epochs: int = 30, finetune_epochs: int = 15) -> dict:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    xtr, ytr, xte, yte = load_digits_split(seed)
    xtr, xte = xtr.reshape(-1, 1, 8, 8), xte.reshape(-1, 1, 8, 8)
    model = cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(dense_epochs):
        epoch(model, opt, xtr, ytr, g)
    dense_acc = accuracy(model, xte, yte)
    pruner = fxs.SaliencyPruner(0.5)
    masked = fxs.prepare_fx_sparse(model, pruner, example_inputs=(xtr[:2],))
    scheduler = fxs.CubicSL(pruner, init_sl=0.0, init_t=0, delta_t=1, total_t=finetune_epochs // 2)
    opt = torch.optim.Adam(masked.parameters(), lr=5e-4)
    for _ in range(finetune_epochs):
        epoch(masked, opt, xtr, ytr, g)
        pruner.step()
        scheduler.step()
    pruned = pruner.prune()
    return {"seed": seed, "dense": dense_acc, "pruned": accuracy(pruned, xte, yte),
            "masked": accuracy(masked, xte, yte),
            "dense_params": sum(p.numel() for p in model.parameters()),
            "pruned_params": sum(p.numel() for p in pruned.parameters())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args(argv)
    rows = [run(seed) for seed in range(args.seeds)]
    for r in rows:
        print(f"seed {r['seed']}: dense {100 * r['dense']:.2f}%  pruned {100 * r['pruned']:.2f}% "
              f"(masked {100 * r['masked']:.2f}%)  params {r['dense_params']:,} -> {r['pruned_params']:,}")
    change = statistics.mean(100 * (r["pruned"] - r["dense"]) for r in rows)
    print(f"mean change: {change:+.2f} points; worst seed {min(100 * (r['pruned'] - r['dense']) for r in rows):+.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
