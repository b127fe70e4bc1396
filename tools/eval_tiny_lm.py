"""One-shot pruning of a small causal language model trained here: held-out perplexity of Wanda, SparseGPT, ADMM.

    python tools/eval_tiny_lm.py [--steps 1500] [--checkpoint PATH] [--levels 50,70,2:4] [--json PATH]

No download: the text is Python's own documentation, shipped with every CPython as
``pydoc_data.topics`` (79 topics, ~465k characters). Sorted by name, every 10th topic is held
out for evaluation; the model trains on the rest. The model is a character-level GPT (4
pre-norm blocks, width 64, 4 heads, MLP 256, context 64, 0.2M parameters; q, k, v, attention
output and the two MLP linears of each block are ``nn.Linear``: 24 weights pruned, embeddings
and head kept), trained with AdamW from a fixed seed for ``--steps`` steps of 32 windows (a few
minutes on 2 idle CPU cores). The trained weights are cached in ``--checkpoint`` and reused when
the settings match.

Each method prunes a copy block by block with ``fx_sparsity.one_shot`` (scope = the block
class), calibrated on ``--calibration`` windows of training text, and is scored by the
per-character perplexity ``exp(mean cross-entropy)`` on the held-out text (non-overlapping
windows). ADMM rows also report the mean per-layer reconstruction error relative to SparseGPT's
(``ADMMSparsifier(compare=True)``) and the pruning time against SparseGPT's.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from _eval_report import (
    RECONSTRUCTION_HEADERS,
    github_table,
    reconstruction_cells,
    reconstruction_summary,
    recorded_states,
    report,
)
from torch import nn

import fx_sparsity as fxs

CONTEXT = 64


def load_text() -> tuple[str, str]:
    """(training text, held-out text): Python's documentation topics, every 10th (by name) held out."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    held = [topics[k] for i, k in enumerate(names) if i % 10 == 5]
    train = [topics[k] for i, k in enumerate(names) if i % 10 != 5]
    return "\n\n".join(train), "\n\n".join(held)


class Block(nn.Module):
    """A pre-norm transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.query, self.key, self.value = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        h = self.norm1(x)
        q, k, v = (proj(h).view(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.out(attended)
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, width: int = 64, depth: int = 4, heads: int = 4, hidden: int = 256):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(CONTEXT, width))
        self.blocks = nn.Sequential(*(Block(width, heads, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.position[:ids.shape[1]]
        return self.head(self.norm(self.blocks(x)))


def encode(text: str, vocab: list[str]) -> torch.Tensor:
    index = {ch: i for i, ch in enumerate(vocab)}
    return torch.tensor([index.get(ch, 0) for ch in text], dtype=torch.long)


def train(data: torch.Tensor, vocab_size: int, steps: int, seed: int, log=print) -> TinyLM:
    torch.manual_seed(seed)
    model = TinyLM(vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    warmup = max(steps // 10, 1)  # linear warm-up, then cosine decay to 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(steps):
        offsets = torch.randint(0, len(data) - CONTEXT - 1, (32,), generator=generator)
        windows = torch.stack([data[o:o + CONTEXT + 1] for o in offsets.tolist()])
        loss = F.cross_entropy(model(windows[:, :-1]).flatten(0, 1), windows[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"  step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    return model.eval()


@torch.no_grad()
def perplexity(model: nn.Module, data: torch.Tensor, batch: int = 64) -> float:
    """Per-character perplexity over non-overlapping windows of ``CONTEXT + 1`` characters."""
    usable = (len(data) - 1) // CONTEXT * CONTEXT
    inputs, targets = data[:usable].view(-1, CONTEXT), data[1:usable + 1].view(-1, CONTEXT)
    total, count = 0.0, 0
    for i in range(0, len(inputs), batch):
        logits = model(inputs[i:i + batch])
        total += F.cross_entropy(logits.flatten(0, 1), targets[i:i + batch].flatten(), reduction="sum").item()
        count += targets[i:i + batch].numel()
    return math.exp(total / count)


METHODS = {  # name -> factory(level, m)
    "Wanda": lambda level, m: fxs.WandaSparsifier(level, semi_structured_block_size=m),
    "SparseGPT": lambda level, m: fxs.SparseGPTSparsifier(level, semi_structured_block_size=m),
    "ADMM": lambda level, m: fxs.ADMMSparsifier(level, semi_structured_block_size=m, compare=True),
}


def prune(model: TinyLM, method: str, level: float, m: int | None, calibration: list) -> tuple[nn.Module, list]:
    """A copy of ``model`` pruned block by block; the per-weight state each block's sparsifier recorded."""
    with recorded_states() as states:
        pruned = fxs.one_shot(model, METHODS[method](level, m), calibration, scope=Block, progress=False)
    return pruned, states


def evaluate(steps: int = 1500, seed: int = 0, checkpoint: str | None = None, levels=("50", "70", "2:4"),
             n_calibration: int = 128, log=print) -> dict:
    train_text, held_text = load_text()
    vocab = sorted(set(train_text))
    train_data, held_data = encode(train_text, vocab), encode(held_text, vocab)
    key = {"steps": steps, "seed": seed, "vocab": len(vocab), "chars": len(train_text)}
    model = None
    if checkpoint and os.path.exists(checkpoint):
        saved = torch.load(checkpoint, weights_only=True)
        if saved.get("key") == key:
            model = TinyLM(len(vocab))
            model.load_state_dict(saved["state_dict"])
            model.eval()
            log(f"loaded {checkpoint}")
    train_seconds = 0.0
    if model is None:
        log(f"training: {len(train_text)} characters, vocabulary {len(vocab)}, {steps} steps")
        start = time.perf_counter()
        model = train(train_data, len(vocab), steps, seed, log)
        train_seconds = time.perf_counter() - start
        if checkpoint:
            torch.save({"key": key, "state_dict": model.state_dict()}, checkpoint)
    generator = torch.Generator().manual_seed(seed + 1)
    offsets = torch.randint(0, len(train_data) - CONTEXT, (n_calibration,), generator=generator).tolist()
    windows = torch.stack([train_data[o:o + CONTEXT] for o in offsets])
    calibration = [(windows[i:i + 16],) for i in range(0, n_calibration, 16)]
    dense = perplexity(model, held_data)
    log(f"dense held-out perplexity {dense:.3f} ({len(held_text)} characters)")
    rows = []
    for pattern in levels:
        level, m = (0.5, 4) if pattern == "2:4" else (int(pattern) / 100, None)
        for method in METHODS:
            start = time.perf_counter()
            pruned, states = prune(model, method, level, m, calibration)
            seconds = time.perf_counter() - start
            linears = [mod.weight for mod in pruned.blocks.modules() if isinstance(mod, nn.Linear)]
            zeros = sum(int((w == 0).sum()) for w in linears) / sum(w.numel() for w in linears)
            row = {"pattern": pattern if pattern == "2:4" else f"{pattern}%", "method": method, "zeros": zeros,
                   "perplexity": perplexity(pruned, held_data), "seconds": seconds,
                   "reconstruction": reconstruction_summary(states)}
            rows.append(row)
            log(f"  {row['pattern']} {method}: perplexity {row['perplexity']:.3f} ({seconds:.1f} s)")
    return {"dense": dense, "rows": rows, "train_seconds": train_seconds, "steps": steps, "seed": seed,
            "vocab": len(vocab), "train_chars": len(train_text), "held_chars": len(held_text),
            "threads": torch.get_num_threads(), "n_calibration": n_calibration}


def table(result: dict) -> str:
    rows = [["dense", "-", "0.0%", f"{result['dense']:.3f}", "-", "-"]]
    rows += [[r["pattern"], r["method"], f"{r['zeros']:.1%}", f"{r['perplexity']:.3f}",
              *reconstruction_cells(r["reconstruction"])] for r in result["rows"]]
    return github_table(rows, ["pattern", "method", "zeros", "held-out perplexity", *RECONSTRUCTION_HEADERS])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="training steps (batch 32 x 64 characters)")
    parser.add_argument("--seed", type=int, default=0)
    default_checkpoint = os.path.join(os.environ.get("TMPDIR", "/tmp"), "fx_sparsity_tiny_lm.pt")
    parser.add_argument("--checkpoint", default=default_checkpoint,
                        help="trained weights, reused when the settings match ('' to always train)")
    parser.add_argument("--levels", default="50,70,2:4", help="comma-separated: 50, 70 (percent) or 2:4")
    parser.add_argument("--calibration", type=int, default=128, help="calibration windows of 64 characters")
    parser.add_argument("--json", help="write the raw numbers here")
    args = parser.parse_args(argv)
    result = evaluate(args.steps, args.seed, args.checkpoint or None, args.levels.split(","), args.calibration)
    title = (f"Tiny character-level LM ({result['train_chars']} training / {result['held_chars']} held-out "
             f"characters of pydoc_data.topics), {result['steps']} steps, seed {result['seed']}; one_shot block by "
             f"block, {result['n_calibration']} calibration windows; torch {torch.__version__}, "
             f"{result['threads']} threads")
    report(title, table(result), result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
