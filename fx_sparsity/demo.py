"""``python -m fx_sparsity demo``: prune a handwritten-digits classifier to 90% end to end.

Data: scikit-learn's bundled 8x8 digits (1797 images, shipped inside the sklearn wheel, no
download; scikit-learn comes with the ``demo`` extra: ``pip install "fx-sparsity[demo]"``).
A 64-256-256-10 MLP is trained dense, pruned gradually with ``WeightNormSparsifier`` (1x4
blocks) on a ``CubicSL`` schedule, fine-tuned with the masks fixed, printed as an annotated
graph, lowered with the dynamic sparse-quantized mapping, and compared with the dense model
on held-out accuracy and latency.
"""
from __future__ import annotations

import contextlib
import functools
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn
from tqdm import tqdm

from .errors import FxSparsityError

__all__ = ["DemoConfig", "DemoResult", "MissingExtra", "run_demo", "load_digits_split"]


class MissingExtra(FxSparsityError, RuntimeError):
    """An optional dependency (an extra of the package) that the chosen option needs is not installed."""


MISSING_SKLEARN = ("the demo's data (scikit-learn's bundled digits) needs scikit-learn: "
                   'pip install "fx-sparsity[demo]"')


def _sklearn_load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise MissingExtra(MISSING_SKLEARN) from e
    return load_digits


@dataclass
class DemoConfig:
    level: float = 0.9
    block_shape: tuple[int, int] = (1, 4)
    steps: int = 30  # pruning steps: one epoch of training, then sparsifier.step() and scheduler.step()
    seed: int = 0
    hidden: int = 256
    dense_epochs: int = 30
    finetune_epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    threads: int = 1
    latency_batch: int = 64
    latency_repeat: int = 50
    plot: str | None = None

    @classmethod
    def fast(cls, **overrides: Any) -> DemoConfig:
        """Seconds instead of tens of seconds (for tests); accuracy is not the point then."""
        base = dict(steps=5, hidden=128, dense_epochs=8, finetune_epochs=5, latency_repeat=3)
        return cls(**{**base, **overrides})


@dataclass
class DemoResult:
    dense_accuracy: float
    sparse_accuracy: float
    lowered_accuracy: float | None
    sparsity: float  # fraction of zeros in the pruned weights
    latency_ms: dict[str, float | None]
    schedule: list[tuple[int, float, float]] = field(default_factory=list)  # (step, level, actual zeros)
    lowering_error: str | None = None
    seconds: float = 0.0


def load_digits_split(seed: int, test_fraction: float = 0.25):
    """Stratified train/test split of sklearn's digits, standardised with the training statistics.

    Raises :class:`MissingExtra` when scikit-learn is not installed.
    """
    digits = _sklearn_load_digits()()
    x = torch.tensor(digits.data, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = round(len(idx) * test_fraction)
        test.append(idx[:k])
        train.append(idx[k:])
    train_idx, test_idx = torch.cat(train), torch.cat(test)
    # Pixels are 0..16. Centre with the training mean but keep one scale for all pixels: a per-pixel
    # std blows up border pixels that are (almost) always 0, and int8 lowering quantizes the input
    # with one scale per tensor.
    x = (x - x[train_idx].mean(0)) / 16
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def _mlp(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def _train_epoch(model: nn.Module, opt: torch.optim.Optimizer, x, y, batch_size: int, g: torch.Generator) -> float:
    model.train()
    perm = torch.randperm(len(x), generator=g)
    total = 0.0
    for i in range(0, len(perm), batch_size):
        b = perm[i:i + batch_size]
        loss = F.cross_entropy(model(x[b]), y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item() * len(b)
    return total / len(x)


@torch.no_grad()
def _accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def _mask_zeros(sparsifier) -> float:
    masks = [sparsifier.get_mask(g["tensor_fqn"]) for g in sparsifier.groups]
    numel = sum(m.numel() for m in masks)
    return sum(m.numel() - int(torch.count_nonzero(m)) for m in masks) / numel


def _check_plotting() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise MissingExtra(
            "--plot needs matplotlib, which is not installed: pip install 'fx-sparsity[plot]' "
            "(or pip install matplotlib), or run the demo without --plot") from e


def _plot(path: str, sparsifier, schedule, cfg: DemoConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    groups = sparsifier.groups
    fig, axes = plt.subplots(1, len(groups) + 1, figsize=(4 * (len(groups) + 1), 4))
    for ax, group in zip(axes, groups):
        mask = sparsifier.get_mask(group["tensor_fqn"]).float()
        ax.imshow(mask.numpy(), cmap="gray_r", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        zeros = 1 - mask.mean().item()
        ax.set_title(f"{group['tensor_fqn']} mask (black: kept)\n{tuple(mask.shape)}, {100 * zeros:.1f}% zeros")
        ax.set_xlabel("input")
        ax.set_ylabel("output")
    ax = axes[-1]
    steps = [s for s, _, _ in schedule]
    ax.plot(steps, [100 * lvl for _, lvl, _ in schedule], "o-", label="configured level (CubicSL)")
    ax.plot(steps, [100 * z for _, _, z in schedule], "x--", label="zeros in the masks")
    ax.set_xlabel("pruning step")
    ax.set_ylabel("sparsity (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"schedule to {100 * cfg.level:.0f}%, {'x'.join(map(str, cfg.block_shape))} blocks")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


@contextlib.contextmanager
def _quiet_quantized_deprecations():
    """torch 2.13 warns that quantized tensors are deprecated whenever the int8 kernels are built."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*(quantize_per_tensor|TypedStorage).*deprecated",
                                category=UserWarning)
        yield


def _lower(prepared):
    """The lowering step: one call, default (dynamic sparse-quantized) mapping."""
    import fx_sparsity

    return fx_sparsity.convert_fx_sparse(prepared)


def _auto_choices(lowered) -> str:
    choices = [m.fx_sparsity_info.get("auto_choice") for m in lowered.modules()
               if "auto_choice" in getattr(m, "fx_sparsity_info", {})]
    return ", ".join(f"{choices.count(c)}x {c}" for c in dict.fromkeys(choices))


def run_demo(cfg: DemoConfig | None = None, *, out: TextIO | None = None, progress: bool = True) -> DemoResult:
    """Run the whole demo, printing to ``out`` (default stdout); returns the numbers."""
    import fx_sparsity as fxs
    from fx_sparsity.printing import format_sparse_graph
    from fx_sparsity.timing import interleaved_median_ms

    cfg = cfg or DemoConfig()
    out = out or sys.stdout
    _sklearn_load_digits()  # refuse before any work when an extra is missing
    if cfg.plot:
        _check_plotting()
    start = time.perf_counter()

    def say(*args):
        print(*args, file=out, flush=True)

    threads = torch.get_num_threads()
    # A model this small trains fastest single-threaded, and all three latencies use the same setting.
    torch.set_num_threads(cfg.threads)
    try:
        torch.manual_seed(cfg.seed)
        g = torch.Generator().manual_seed(cfg.seed)
        x_train, y_train, x_test, y_test = load_digits_split(cfg.seed)
        model = _mlp(cfg.hidden)
        n_params = sum(p.numel() for p in model.parameters())
        say(f"fx_sparsity demo: 8x8 handwritten digits (scikit-learn), {len(x_train)} train / {len(x_test)} "
            f"test images; MLP 64-{cfg.hidden}-{cfg.hidden}-10 ({n_params:,} parameters); "
            f"{cfg.threads} thread{'s' if cfg.threads > 1 else ''}; seed {cfg.seed}")

        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        for _ in range(cfg.dense_epochs):
            _train_epoch(model, opt, x_train, y_train, cfg.batch_size, g)
        dense_acc = _accuracy(model, x_test, y_test)
        say(f"[1/5] dense: {cfg.dense_epochs} epochs, test accuracy {100 * dense_acc:.2f}%")

        block = "x".join(map(str, cfg.block_shape))
        sparsifier = fxs.WeightNormSparsifier(sparsity_level=cfg.level, sparse_block_shape=cfg.block_shape)
        prepared = fxs.prepare_fx_sparse(model, sparsifier)  # every nn.Linear weight
        scheduler = fxs.CubicSL(sparsifier, init_sl=0.0, total_t=cfg.steps, delta_t=1)
        say(f"[2/5] pruning every Linear to {100 * cfg.level:.0f}% in {block} blocks: WeightNormSparsifier, "
            f"CubicSL over {cfg.steps} steps (an epoch of training per step)")
        opt = torch.optim.Adam(prepared.parameters(), lr=cfg.lr)
        schedule = [(0, sparsifier.groups[0]["sparsity_level"], 0.0)]
        bar = tqdm(range(1, cfg.steps + 1), desc="pruning", unit="step", file=sys.stderr,
                   disable=not progress, leave=False)
        for step in bar:
            loss = _train_epoch(prepared, opt, x_train, y_train, cfg.batch_size, g)
            sparsifier.step()
            scheduler.step()
            schedule.append((step, sparsifier.groups[0]["sparsity_level"], _mask_zeros(sparsifier)))
            bar.set_postfix(level=f"{100 * schedule[-1][1]:.0f}%", loss=f"{loss:.3f}")
        bar.close()
        sparsifier.step()  # the masks at the final level the last scheduler step set
        schedule.append((cfg.steps + 1, sparsifier.groups[0]["sparsity_level"], _mask_zeros(sparsifier)))
        pruned_acc = _accuracy(prepared, x_test, y_test)

        opt = torch.optim.Adam(prepared.parameters(), lr=cfg.lr)
        for _ in range(cfg.finetune_epochs):
            _train_epoch(prepared, opt, x_train, y_train, cfg.batch_size, g)
        sparse_acc = _accuracy(prepared, x_test, y_test)
        sparsity = _mask_zeros(sparsifier)
        say(f"[3/5] pruned to {100 * sparsity:.1f}% zeros: test accuracy {100 * pruned_acc:.2f}%, after "
            f"{cfg.finetune_epochs} fine-tuning epochs with the masks fixed {100 * sparse_acc:.2f}%")

        sample = (x_test[:cfg.latency_batch],)
        say("[4/5] the prepared graph (masks are the torch.mul nodes):")
        say(format_sparse_graph(prepared, example_inputs=sample))

        lowered, lowering_error = None, None
        try:
            with _quiet_quantized_deprecations():
                lowered = _lower(prepared)
        except (ValueError, RuntimeError, NotImplementedError) as e:
            lowering_error = f"{type(e).__name__}: {e}"
        if lowered is not None:
            say("[5/5] lowered with the dynamic sparse-quantized mapping (convert_fx_sparse):")
            with _quiet_quantized_deprecations():
                say(format_sparse_graph(lowered, example_inputs=sample))
        else:
            say(f"[5/5] lowering failed: {lowering_error}")
        lowered_acc = _accuracy(lowered, x_test, y_test) if lowered is not None else None
        # Our own fp32 targets for comparison: per layer, the fastest of dense / CSR / BSR on these shapes.
        with _quiet_quantized_deprecations():
            auto = fxs.convert_fx_sparse(prepared, "auto", example_inputs=sample)
        auto_acc = _accuracy(auto, x_test, y_test)

        models = {"dense": model, "sparse": prepared, "lowered": lowered, "auto": auto}
        for m in models.values():
            if m is not None:
                m.eval()
        # Interleaved: a change in machine load hits all three alike, so the ratios hold.
        latency: dict[str, float | None] = {"lowered": None, **interleaved_median_ms(
            {name: functools.partial(m, *sample) for name, m in models.items() if m is not None},
            repeat=cfg.latency_repeat, number=None)}

        if cfg.plot:
            _plot(cfg.plot, sparsifier, schedule, cfg)
    finally:
        torch.set_num_threads(threads)

    def row(name, acc, ms):
        if acc is None:
            return [name, "n/a", "n/a", ""]
        return [name, f"{100 * acc:.2f}%", f"{ms:.3f}", f"{ms / latency['dense']:.2f}x"]

    lowered_name = "lowered (sparse int8, dynamic)"
    say("")
    say(tabulate([row("dense", dense_acc, latency["dense"]),
                  row(f"sparse {100 * sparsity:.0f}% (masked)", sparse_acc, latency["sparse"]),
                  row(lowered_name, lowered_acc, latency["lowered"]),
                  row(f"lowered (auto: {_auto_choices(auto)})", auto_acc, latency["auto"])],
                 headers=["model", "test accuracy", f"latency, batch {len(sample[0])} (ms)", "vs dense"],
                 tablefmt="simple", disable_numparse=True))
    delta = 100 * (sparse_acc - dense_acc)
    say(f"\n{100 * sparsity:.0f}%-sparse accuracy {100 * sparse_acc:.2f}% vs dense {100 * dense_acc:.2f}% "
        f"({delta:+.2f} points); latency: median of {cfg.latency_repeat} interleaved samples, {cfg.threads} thread"
        f"{'s' if cfg.threads > 1 else ''}")
    if cfg.plot:
        say(f"wrote {cfg.plot}: the masks and the sparsity schedule")
    seconds = time.perf_counter() - start
    say(f"done in {seconds:.1f} s")
    return DemoResult(dense_acc, sparse_acc, lowered_acc, sparsity, latency, schedule, lowering_error, seconds)
