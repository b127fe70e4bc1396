"""The ``structured`` case, ratios from one run (random weights, CPU):

- a ResNet-50-shaped CNN, dense vs pruned to half its channels by ``SaliencyPruner`` (batch 16, 224²);
- an LSTM tagger (embedding 256, 2 layers of 512 units), dense vs half its hidden units cut by ours and by
  torch.ao's ``LSTMSaliencyPruner``: time, parameters, and how far each cut model is from its masked one.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import fx_sparsity as fxs
from fx_sparsity.timing import interleaved_median_ms

__all__ = ["case_structured", "resnet50_shaped", "Bottleneck", "LSTMTagger"]


class Bottleneck(nn.Module):
    """torchvision's ResNet Bottleneck: 1x1 reduce, 3x3, 1x1 expand (x4), downsample when the shape changes."""

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + identity)


def resnet50_shaped(scale: float = 1.0, classes: int = 1000) -> nn.Module:
    """ResNet-50's layers ([3, 4, 6, 3] bottlenecks), its widths (64..2048 channels) times ``scale``."""
    stem = max(1, int(64 * scale))
    layers: list[nn.Module] = [nn.Conv2d(3, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem), nn.ReLU(),
                               nn.MaxPool2d(3, 2, 1)]
    cin = stem
    for i, count in enumerate((3, 4, 6, 3)):
        width = stem * 2 ** i
        for j in range(count):
            layers.append(Bottleneck(cin, width, 2 if i and not j else 1))
            cin = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def case_structured(quick: bool) -> list[dict]:
    torch.manual_seed(0)
    model = resnet50_shaped().eval()
    size, batch = (64, 2) if quick else (224, 16)
    x = torch.randn(batch, 3, size, size)
    pruner = fxs.SaliencyPruner(0.5)
    masked = fxs.prepare_fx_sparse(model, pruner, example_inputs=(x[:1],))
    pruner.step()
    pruned = pruner.prune().eval()
    masked.eval()
    with torch.no_grad():
        error = ((pruned(x) - masked(x)).norm() / masked(x).norm()).item()
    dense_params = sum(p.numel() for p in model.parameters())
    pruned_params = sum(p.numel() for p in pruned.parameters())
    ms = interleaved_median_ms({"dense": lambda: model(x), "pruned": lambda: pruned(x)}, warmup=1,
                               repeat=2 if quick else 7)
    return [{"case": "structured", "name": f"ResNet-50-shaped, 50% of channels, batch {batch}, {size}x{size}",
             "ms": {"dense": ms["dense"], "pruned": ms["pruned"]},
             "ratios": {"speedup": ms["dense"] / ms["pruned"], "fewer parameters": dense_params / pruned_params,
                        "pruned vs masked rel. error": max(error, 1e-12)}}, _lstm_tagger(quick)]


class LSTMTagger(nn.Module):
    """Tokens -> embedding -> LSTM -> a Linear per step."""

    def __init__(self, vocab: int = 1000, width: int = 256, hidden: int = 512, layers: int = 2, tags: int = 32):
        super().__init__()
        self.emb, self.lstm = nn.Embedding(vocab, width), nn.LSTM(width, hidden, layers, batch_first=True)
        self.fc = nn.Linear(hidden, tags)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(self.lstm(self.emb(tokens))[0])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return max(((a - b).norm() / b.norm()).item(), 1e-12)


def _lstm_tagger(quick: bool) -> dict:
    from torch.ao.pruning._experimental.pruner import LSTMSaliencyPruner

    torch.manual_seed(0)
    hidden, steps = (128, 16) if quick else (512, 64)
    model = LSTMTagger(hidden=hidden).eval()
    x = torch.randint(0, 1000, (16, steps))
    pruner = fxs.SaliencyPruner(0.5)
    masked = fxs.prepare_fx_sparse(model, pruner, [{"tensor_fqn": "lstm.weight_ih_l0"}], example_inputs=(x[:1],))
    pruner.step()
    ours = pruner.prune().eval()
    reference = copy.deepcopy(model)
    theirs_pruner = LSTMSaliencyPruner({"sparsity_level": 0.5})
    theirs_pruner.prepare(reference, [{"tensor_fqn": f"lstm.weight_{k}_l{i}"} for i in range(2) for k in ("ih", "hh")])
    theirs_pruner.step()
    with torch.no_grad():
        theirs_masked = reference(x)
        theirs: nn.Module = theirs_pruner.prune()  # type: ignore[func-returns-value, assignment]  # (annotated None)
        theirs.eval()
        errors = {"fx_sparsity pruned vs masked rel. error": _relative(ours(x), masked.eval()(x)),
                  "torch.ao pruned vs masked rel. error": _relative(theirs(x), theirs_masked)}
        ms = interleaved_median_ms({"dense": lambda: model(x), "fx_sparsity": lambda: ours(x),
                                    "torch.ao": lambda: theirs(x)}, warmup=1, repeat=2 if quick else 7)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in
              (("dense", model), ("fx_sparsity", ours), ("torch.ao", theirs))}
    return {"case": "structured", "name": f"LSTM tagger, 2 x {hidden} units, half cut, batch 16 x {steps} steps",
            "ms": ms, "ratios": {"speedup (fx_sparsity)": ms["dense"] / ms["fx_sparsity"],
                                 "speedup (torch.ao)": ms["dense"] / ms["torch.ao"],
                                 "fewer parameters": params["dense"] / params["fx_sparsity"], **errors}}
