"""SparseGPT: masks and reconstructed weights against a direct computation of the published algorithm."""
import pytest
import torch
from models import ResidualMLPBlock as Block
from models import calibrated
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
        calibrated(sparsifier, nn.Sequential(layer), batches)
        sparsifier.step()
        squashed = sparsifier.squash_mask()
        assert not any("observer" in name for name, _ in squashed.named_modules())
        errors[name] = ((squashed(x) - dense).norm() / dense.norm()).item()
    assert errors["sparsegpt"] < 0.97 * errors["wanda"], errors


def test_same_masks_and_weights_in_every_scope():
    torch.manual_seed(2)
    model = nn.Sequential(Block(), Block())
    batches = [torch.randn(16, 32) for _ in range(3)]
    results = {}
    for scope in ("model", "layers", Block):
        sparsifier = fxs.SparseGPTSparsifier(0.5, block_size=16)
        calibrated(sparsifier, model, batches, scope=scope)
        sparsifier.step()
        results[scope] = sparsifier.squash_mask().state_dict()
    for scope in ("layers", Block):
        for key, value in results["model"].items():
            torch.testing.assert_close(results[scope][key], value, rtol=0, atol=0, msg=f"{scope} {key}")


@pytest.mark.parametrize("make", [lambda: fxs.SparseGPTSparsifier(0.5, block_size=16),
                                  lambda: fxs.ADMMSparsifier(0.5, iterations=5)], ids=["sparsegpt", "admm"])
def test_free_statistics_frees_each_gram_once_used_and_prunes_the_same(make):
    """one_shot's setting: each Gram matrix let go (and factored in place) once its layer is pruned; the same
    weights as with the statistics kept, and a second step() says they are gone."""
    torch.manual_seed(3)
    model = nn.Sequential(Block(), Block())
    batches = [torch.randn(16, 32) for _ in range(3)]
    results = []
    for free in (False, True):
        sparsifier = make()
        sparsifier.free_statistics = free
        prepared = calibrated(sparsifier, model, batches)
        sparsifier.step()
        grams = [m.gram.numel() for m in prepared.modules() if isinstance(m, GramObserver)]
        assert len(grams) == 4 and all((g == 0) == free for g in grams)
        if free:
            with pytest.raises(RuntimeError, match=r"its Gram matrix was freed by the step\(\) that pruned it"):
                sparsifier.step()
        results.append(sparsifier.squash_mask().state_dict())
    for key, value in results[0].items():
        assert torch.equal(results[1][key], value), key


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


# -- one_shot: block by block --------------------------------------------------------------

def manual_block_by_block(model, make_sparsifier, batches):
    """What one_shot does, written out: each block pruned on the outputs of the pruned blocks before it."""
    inputs = list(batches)
    for block in model:
        sparsifier = make_sparsifier()
        prepared = fxs.prepare_fx_sparse(block, sparsifier, inplace=True, scope="layers")
        with torch.no_grad():
            for x in inputs:
                prepared(x)
            sparsifier.step()
            sparsifier.squash_mask()
            inputs = [block(x) for x in inputs]
    return model


@pytest.mark.parametrize("make", [lambda: fxs.SparseGPTSparsifier(0.5, block_size=16),
                                  lambda: fxs.WandaSparsifier(0.5)], ids=["sparsegpt", "wanda"])
@pytest.mark.slow
def test_one_shot_prunes_each_block_on_the_pruned_outputs_before_it(make):
    torch.manual_seed(3)
    model = nn.Sequential(Block(), Block(), Block())
    batches = [torch.randn(16, 32) for _ in range(3)]
    import copy

    expected = manual_block_by_block(copy.deepcopy(model), make, batches)
    pruned = fxs.one_shot(model, make(), [(x,) for x in batches], scope=Block, progress=False)
    assert type(pruned) is nn.Sequential and pruned is not model
    assert all(type(b.up) is nn.Linear for b in pruned)  # plain layers, no masks or observers left
    assert not any(k.endswith("_mask") for k in pruned.state_dict())
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(pruned.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert (pruned[2].down.weight == 0).float().mean().item() == 0.5
    # in place, and with a config naming some tensors only
    config = [{"tensor_fqn": "1.up.weight"}]
    same = fxs.one_shot(model, make(), [(x,) for x in batches], scope=Block, config=config, inplace=True,
                        progress=False)
    assert same is model and (model[1].up.weight == 0).float().mean().item() == 0.5
    assert (model[0].up.weight == 0).float().mean().item() == 0.0


@pytest.mark.slow
def test_one_shot_on_a_llama_keeps_the_class_and_saves(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    torch.manual_seed(4)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    calibration = [{"input_ids": torch.randint(3, 64, (2, 12))} for _ in range(3)]
    pruned = fxs.one_shot(model, fxs.SparseGPTSparsifier(0.5, block_size=16), calibration, scope=LlamaDecoderLayer,
                          progress=False)
    assert type(pruned) is LlamaForCausalLM
    linears = [m for m in pruned.model.layers.modules() if type(m) is nn.Linear]
    assert len(linears) == 14 and all((m.weight == 0).float().mean().item() == 0.5 for m in linears)
    assert (pruned.lm_head.weight == 0).float().mean().item() == 0.0  # outside the blocks
    pruned.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, 64, (1, 7))
    torch.testing.assert_close(reloaded(input_ids=ids).logits, pruned(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_one_shot_errors():
    model = nn.Sequential(Block())
    with pytest.raises(fxs.SparsityConfigError, match="pass scope=<block class>"):
        fxs.one_shot(model, fxs.WandaSparsifier(), [(torch.randn(2, 32),)], scope="layers")
    with pytest.raises(fxs.SparsityConfigError, match="calibration_data is empty"):
        fxs.one_shot(model, fxs.WandaSparsifier(), [], scope=Block)
    with pytest.raises(fxs.SparsityConfigError, match=r"\['lm_head.weight'\] lie outside every block"):
        fxs.one_shot(model, fxs.WandaSparsifier(), [(torch.randn(2, 32),)], scope=Block,
                     config=[{"tensor_fqn": "lm_head.weight"}])


# -- OWL levels ------------------------------------------------------------------------------

def test_owl_levels_keep_the_overall_sparsity_and_spare_outlier_layers():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    with torch.no_grad():
        model[2].weight[:, :4] *= 40  # a few huge weights: layer 2 is the outlier layer
    sparsifier = fxs.WandaSparsifier(0.7)
    calibrated(sparsifier, model, [torch.randn(64, 32) for _ in range(2)])
    levels = fxs.owl_levels(sparsifier, lam=0.08)
    sizes = {"0.weight": 32 * 32, "2.weight": 64 * 32, "4.weight": 16 * 64}
    overall = sum(levels[k] * n for k, n in sizes.items()) / sum(sizes.values())
    assert overall == pytest.approx(0.7, abs=1e-9)
    assert levels["2.weight"] == min(levels.values()) and max(levels.values()) - min(levels.values()) == \
        pytest.approx(0.16)
    sparsifier.step()
    zeros = sum(int((sparsifier.get_mask(k) == 0).sum()) for k in sizes) / sum(sizes.values())
    # each row drops int(level * in_features) (truncated, as Wanda's code): at most 1/32 short per row
    assert 0.7 - 1 / 32 <= zeros <= 0.7
    with pytest.raises(fxs.SparsityConfigError, match="one target level"):
        fxs.owl_levels(sparsifier)  # the levels differ now
    nm = fxs.WandaSparsifier(0.5, semi_structured_block_size=4)
    calibrated(nm, nn.Sequential(nn.Linear(8, 8)), [torch.randn(4, 8)])
    with pytest.raises(fxs.SparsityConfigError, match="unstructured"):
        fxs.owl_levels(nm)
