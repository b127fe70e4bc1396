"""SparseGPT: masks and reconstructed weights against a direct computation of the published algorithm."""
import pytest
import torch
from torch import nn

import fx_sparsity as fxs
from fx_sparsity.passes import GramObserver


def reference_sparsegpt(weight, x, sparsity, n=0, m=0, block=128, percdamp=0.01):
    """Frantar & Alistarh 2023, Algorithm 1, eagerly: each pruned column's error goes to every later column
    at once (the library batches these updates per block; the result is the same up to float order)."""
    w = weight.double().clone()
    h = (x.double().T @ x.double())
    h += percdamp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    cols = w.shape[1]
    keep = torch.ones_like(w, dtype=torch.bool)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        if not n:
            scores = w[:, start:end] ** 2 / u.diagonal()[start:end] ** 2
            k = int(scores.numel() * sparsity)
            block_keep = torch.ones(scores.numel(), dtype=torch.bool)
            block_keep[scores.flatten().argsort()[:k]] = False
            keep[:, start:end] = block_keep.reshape(scores.shape)
        for i in range(start, end):
            if n and (i - start) % m == 0:
                scores = w[:, i:i + m] ** 2 / u.diagonal()[i:i + m] ** 2
                drop = scores.argsort(dim=1)[:, :n]
                keep[:, i:i + m].scatter_(1, drop, False)
            q = w[:, i] * keep[:, i]
            err = (w[:, i] - q) / u[i, i]
            w[:, i:] -= err[:, None] * u[i, i:][None, :]
            w[:, i] = q
    return w.float(), keep


def calibrated(sparsifier, model, batches, **kwargs):
    prepared = fxs.prepare_fx_sparse(model, sparsifier, **kwargs)
    with torch.no_grad():
        for x in batches:
            prepared(x)
    return prepared


@pytest.mark.parametrize("pattern", ["50%", "70%", "2:4"])
def test_one_linear_matches_the_direct_computation(pattern):
    torch.manual_seed(0)
    layer = nn.Linear(256, 48)
    batches = [torch.randn(64, 256) @ torch.randn(256, 256) * 0.1 for _ in range(4)]  # correlated inputs
    kwargs = {"semi_structured_block_size": 4} if pattern == "2:4" else {"sparsity_level": int(pattern[:2]) / 100}
    sparsifier = fxs.SparseGPTSparsifier(block_size=64, **kwargs)
    model = nn.Sequential(layer)
    prepared = calibrated(sparsifier, model, batches)
    observer = prepared.get_submodule("0.weight_input_observer")
    assert isinstance(observer, GramObserver) and int(observer.num_rows) == 256
    sparsifier.step()
    x = torch.cat(batches)
    n, m = (2, 4) if pattern == "2:4" else (0, 0)
    want_w, want_keep = reference_sparsegpt(layer.weight.detach(), x, kwargs.get("sparsity_level", 0.5), n=n, m=m,
                                            block=64)
    mask = prepared.get_buffer("0.weight_mask").bool()
    assert torch.equal(mask, want_keep)
    torch.testing.assert_close(prepared.get_parameter("0.weight") * mask, want_w, rtol=1e-4, atol=1e-5)
    if pattern == "2:4":
        assert (mask.reshape(48, -1, 4).sum(-1) == 2).all()
    else:
        assert (~mask).float().mean().item() == pytest.approx(kwargs["sparsity_level"], abs=1e-3)


def test_reconstruction_error_below_wanda_at_the_same_level():
    torch.manual_seed(1)
    layer = nn.Linear(128, 64)
    batches = [torch.randn(128, 128) @ torch.randn(128, 128) * 0.1 for _ in range(4)]
    x = torch.cat(batches)
    dense = layer(x).detach()
    errors = {}
    for name, sparsifier in (("wanda", fxs.WandaSparsifier(0.6)), ("sparsegpt", fxs.SparseGPTSparsifier(0.6))):
        prepared = calibrated(sparsifier, nn.Sequential(layer), batches)
        sparsifier.step()
        squashed = sparsifier.squash_mask()
        assert not any("observer" in name for name, _ in squashed.named_modules())
        errors[name] = ((squashed(x) - dense).norm() / dense.norm()).item()
    assert errors["sparsegpt"] < 0.97 * errors["wanda"], errors


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def test_same_masks_and_weights_in_every_scope():
    torch.manual_seed(2)
    model = nn.Sequential(Block(), Block())
    batches = [torch.randn(16, 32) for _ in range(3)]
    results = {}
    for scope in ("model", "layers", Block):
        sparsifier = fxs.SparseGPTSparsifier(0.5, block_size=16)
        prepared = calibrated(sparsifier, model, batches, scope=scope)
        sparsifier.step()
        results[scope] = sparsifier.squash_mask().state_dict()
    for scope in ("layers", Block):
        for key, value in results["model"].items():
            torch.testing.assert_close(results[scope][key], value, rtol=0, atol=0, msg=f"{scope} {key}")


def test_step_before_calibration_and_config_errors():
    sparsifier = fxs.SparseGPTSparsifier()
    fxs.prepare_fx_sparse(nn.Sequential(nn.Linear(8, 8)), sparsifier)
    with pytest.raises(RuntimeError, match=r"SparseGPTSparsifier.step\(\) before calibration"):
        sparsifier.step()
    with pytest.raises(fxs.SparsityConfigError, match="sparsity_level must be 0.5"):
        fxs.SparseGPTSparsifier(0.4, semi_structured_block_size=4)
    with pytest.raises(fxs.SparsityConfigError, match="block_size must be a positive int"):
        fxs.SparseGPTSparsifier(block_size=0)
    with pytest.raises(fxs.SparsityConfigError, match="percdamp must be a number > 0"):
        fxs.SparseGPTSparsifier(percdamp=0)
