"""ADMMSparsifier (ALPS-class): exact masks, reconstruction below SparseGPT's, every scope, one_shot, errors."""
import copy

import pytest
import torch
from models import ResidualMLPBlock as Block
from models import calibrated
from torch import nn

import fx_sparsity as fxs
from fx_sparsity.sparsifier.admm_sparsifier import admm_prune, reconstruction_error
from fx_sparsity.sparsifier.sparsegpt_sparsifier import sparsegpt_prune


def correlated_batches(features, seed, count=4, rows=64):
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=generator) * 0.1
    return [torch.randn(rows, features, generator=generator) @ mix for _ in range(count)]


@pytest.mark.parametrize("pattern", ["50%", "70%", "2:4"])
def test_masks_are_exact_and_weights_rewritten(pattern):
    torch.manual_seed(0)
    layer = nn.Linear(128, 48)
    kwargs = {"semi_structured_block_size": 4} if pattern == "2:4" else {"sparsity_level": int(pattern[:2]) / 100}
    sparsifier = fxs.ADMMSparsifier(**kwargs)
    dense = layer.weight.detach().clone()
    prepared = calibrated(sparsifier, nn.Sequential(layer), correlated_batches(128, 1))
    sparsifier.step()
    mask = prepared.get_buffer("0.weight_mask").bool()
    weight = prepared.get_parameter("0.weight")
    if pattern == "2:4":
        assert (mask.reshape(48, -1, 4).sum(-1) == 2).all()
    else:
        assert int((~mask).sum()) == int(kwargs["sparsity_level"] * mask.numel())  # per layer, exactly
    assert not torch.equal(weight[mask], dense[mask])  # the kept weights were refitted
    state = sparsifier.state["0.weight"]
    assert 0 < state["reconstruction_error"] < 1 and state["iterations"] >= 1 and "sparsegpt_error" not in state


def test_reconstruction_error_below_sparsegpt_at_70_percent():
    torch.manual_seed(1)
    layer = nn.Linear(128, 64, bias=False)
    batches = correlated_batches(128, 2)
    x = torch.cat(batches)
    dense = layer(x).detach()
    errors = {}
    for name, sparsifier in (("sparsegpt", fxs.SparseGPTSparsifier(0.7)),
                             ("admm", fxs.ADMMSparsifier(0.7, compare=True))):
        calibrated(sparsifier, nn.Sequential(layer), batches)
        sparsifier.step()
        errors[name] = ((sparsifier.squash_mask()(x) - dense).norm() / dense.norm()).item()
        if name == "admm":
            state = sparsifier.state["0.weight"]
    assert errors["admm"] < 0.9 * errors["sparsegpt"], errors
    # The state reports both layer errors, tr(ΔHΔᵀ)/tr(WHWᵀ), on the calibration inputs: the squared output errors.
    assert state["reconstruction_error"] == pytest.approx(errors["admm"] ** 2, rel=1e-3)
    assert state["sparsegpt_error"] == pytest.approx(errors["sparsegpt"] ** 2, rel=1e-3)
    assert state["relative_to_sparsegpt"] == pytest.approx(state["reconstruction_error"] / state["sparsegpt_error"])
    assert state["relative_to_sparsegpt"] < 0.85 and state["sparsegpt_seconds"] > 0


def test_admm_prune_function_on_a_gram_matrix():
    torch.manual_seed(2)
    x = torch.cat(correlated_batches(64, 3))
    weight, gram = torch.randn(32, 64), x.T @ x
    for n, m, level in ((0, 0, 0.6), (2, 4, 0.5), (2, 4, 0.25)):
        new, keep = admm_prune(weight, gram, level, n=n, m=m, iterations=30)
        assert (new[~keep] == 0).all()
        reference, _ = sparsegpt_prune(weight, gram, level if not n else 0.5, n=n, m=m)
        if m and level == 0.25:  # half of the runs 2:4 (gradual), the others dense
            runs = (~keep).reshape(32, -1, 4).sum(-1)
            assert set(runs.unique().tolist()) == {0, 2} and int((runs == 2).sum()) == round(0.5 * runs.numel())
        else:
            assert int((~keep).sum()) == int(level * weight.numel())
            assert reconstruction_error(weight, new, gram) < reconstruction_error(weight, reference, gram)
    new, keep = admm_prune(weight, gram, 0.0)
    assert keep.all() and torch.equal(new, weight)
    gram[:, 5] = gram[5, :] = 0  # an input never seen: its weights go to zero, the count stays exact
    new, keep = admm_prune(weight, gram, 0.5, iterations=10)
    assert (new[:, 5] == 0).all() and int((~keep).sum()) == weight.numel() // 2


@pytest.mark.slow
def test_one_shot_block_by_block_and_scope_layers():
    torch.manual_seed(3)
    model = nn.Sequential(Block(), Block())
    batches = [torch.randn(32, 32) for _ in range(3)]
    pruned = fxs.one_shot(model, fxs.ADMMSparsifier(0.7, iterations=20), [(x,) for x in batches], scope=Block,
                          progress=False)
    assert type(pruned) is nn.Sequential and pruned is not model
    assert not any(k.endswith("_mask") for k in pruned.state_dict())
    for block in pruned:
        for layer in (block.up, block.down):
            assert int((layer.weight == 0).sum()) >= int(0.7 * layer.weight.numel())
    # scope="layers": the same result per weight as the whole model (same statistics, same solver)
    results = {}
    for scope in ("model", "layers"):
        sparsifier = fxs.ADMMSparsifier(0.5, iterations=20, compare=True)
        calibrated(sparsifier, copy.deepcopy(model), batches, scope=scope)
        sparsifier.step()
        assert set(sparsifier.state) == {"0.up.weight", "0.down.weight", "1.up.weight", "1.down.weight"}
        assert all(s["relative_to_sparsegpt"] < 1 for s in sparsifier.state.values())
        assert "relative_to_sparsegpt" in sparsifier.state_dict()["state"]["0.up.weight"]
        results[scope] = sparsifier.squash_mask()
    assert type(results["layers"]) is nn.Sequential and type(results["layers"][0].up) is nn.Linear
    for key, value in results["model"].state_dict().items():
        torch.testing.assert_close(results["layers"].state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_owl_levels_and_per_group_options():
    torch.manual_seed(4)
    model = nn.Sequential(Block(), Block())
    batches = [torch.randn(32, 32) for _ in range(2)]
    sparsifier = fxs.ADMMSparsifier(0.7, iterations=10)
    config = [{"tensor_fqn": "0.up.weight", "pcg_steps": 0}, {"tensor_fqn": "0.down.weight"},
              {"tensor_fqn": "1.up.weight", "iterations": 5}, {"tensor_fqn": "1.down.weight"}]
    prepared = calibrated(sparsifier, model, batches, config=config)
    levels = fxs.owl_levels(sparsifier, lam=0.05, outlier_threshold=2.0)
    assert len(set(levels.values())) > 1
    sparsifier.step()
    for fqn, level in levels.items():
        mask = sparsifier.get_mask(fqn)
        assert int((mask == 0).sum()) == int(level * mask.numel())
    assert sparsifier.state["1.up.weight"]["iterations"] <= 5
    assert prepared is sparsifier.model


@pytest.mark.parametrize("kwargs, message", [
    ({"iterations": 0}, r"iterations must be an int >= 1 \(ADMM iterations at most"),
    ({"iterations": 2.5}, "iterations must be an int"),
    ({"rho": 0}, r"rho must be a number > 0 \(the initial ADMM penalty"),
    ({"rho": float("nan")}, "rho must be a number > 0"),
    ({"pcg_steps": -1}, r"pcg_steps must be an int >= 0 .*0 skips the refit"),
    ({"compare": "yes"}, "compare must be True or False"),
    ({"percdamp": 0}, r"percdamp must be a number > 0 \(e.g. 0.01\)"),
    ({"sparsity_level": 1.5}, r"sparsity_level must be in \[0, 1\]"),
    ({"sparsity_level": 0.7, "semi_structured_block_size": 4}, "sparsity_level must be 0.5"),
    ({"semi_structured_block_size": 3}, r"semi_structured_block_size must be an even int >= 2 \(4 for 2:4\)"),
])
def test_bad_arguments_name_the_fix(kwargs, message):
    with pytest.raises(fxs.SparsityConfigError, match=message) as info:
        fxs.ADMMSparsifier(**kwargs)
    assert isinstance(info.value, fxs.FxSparsityError) and isinstance(info.value, ValueError)


def test_bad_config_entry_and_step_before_calibration():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(fxs.SparsityConfigError, match=r"group '0.weight': iterations must be an int >= 1"):
        fxs.prepare_fx_sparse(model, fxs.ADMMSparsifier(), [{"tensor_fqn": "0.weight", "iterations": 0}])
    with pytest.raises(fxs.SparsityConfigError, match=r"group '0.weight': percdamp must be a number > 0"):
        fxs.prepare_fx_sparse(model, fxs.ADMMSparsifier(), [{"tensor_fqn": "0.weight", "percdamp": -1}])
    sparsifier = fxs.ADMMSparsifier()
    fxs.prepare_fx_sparse(model, sparsifier)
    with pytest.raises(RuntimeError, match=r"ADMMSparsifier.step\(\) before calibration"):
        sparsifier.step()
