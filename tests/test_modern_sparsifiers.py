"""GlobalMagnitudeSparsifier, NMSparsifier, WandaSparsifier and the activation-observer pass."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from expecttest import TestCase
from models import cnn, encoder_layer, mlp, tied
from torch import nn
from torch.ao.quantization.observer import _is_activation_post_process
from torch.nn.utils import prune

import fx_sparsity as fxs
from fx_sparsity.passes import ChannelNormObserver, observe_linear_inputs, observer_fqn_for, remove_observers

# -- GlobalMagnitudeSparsifier ------------------------------------------------------------


def _global_unstructured_masks(model, fqns, amount):
    ref = copy.deepcopy(model)
    params = [(ref.get_submodule(f.rpartition(".")[0]), f.rpartition(".")[2]) for f in fqns]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
    return [getattr(m, n + "_mask") for m, n in params]


@pytest.mark.parametrize("level", [0.0, 0.3, 0.6, 0.95, 1.0])
@pytest.mark.parametrize("ties", [False, True])
def test_global_matches_global_unstructured(level, ties):
    model = cnn()  # conv (4-D) and linear weights in one pool
    if ties:  # few distinct magnitudes: most of the work is tie-breaking
        with torch.no_grad():
            for p in model.parameters():
                p.copy_((p * 8).round() / 8)
    fqns = ["conv1.weight", "conv2.weight", "fc.weight"]
    sparsifier = fxs.GlobalMagnitudeSparsifier(level)
    fxs.prepare_fx_sparse(model, sparsifier, [{"tensor_fqn": f} for f in fqns])
    sparsifier.step()
    for fqn, expected in zip(fqns, _global_unstructured_masks(model, fqns, level)):
        assert torch.equal(sparsifier.get_mask(fqn), expected), fqn


def _greedy_capped(scores, level, caps):
    """Reference: walk all scores in ascending order, skip tensors at their cap."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    owner = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(scores)])
    budget = round(level * flat.numel())
    limits = [int(c * s.numel() + 1e-6) if c is not None else s.numel() for c, s in zip(caps, scores)]
    keep, used = torch.ones(flat.numel(), dtype=torch.bool), [0] * len(scores)
    for j in flat.argsort().tolist():
        if budget == 0:
            break
        if used[owner[j]] < limits[owner[j]]:
            keep[j], used[owner[j]], budget = False, used[owner[j]] + 1, budget - 1
    return [part.view(s.shape) for part, s in zip(keep.split([s.numel() for s in scores]), scores)]


@pytest.mark.parametrize("level", [0.5, 0.8, 0.99])
def test_global_per_layer_caps(level):
    model = mlp()
    with torch.no_grad():
        model[4].weight.mul_(0.01)  # the smallest layer would be pruned entirely without a cap
    sparsifier = fxs.GlobalMagnitudeSparsifier(level, max_layer_sparsity=0.9)
    config = [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight", "max_layer_sparsity": 0.6},
              {"tensor_fqn": "4.weight"}]
    fxs.prepare_fx_sparse(model, sparsifier, config)
    sparsifier.step()
    masks = [sparsifier.get_mask(c["tensor_fqn"]) for c in config]
    expected = _greedy_capped([model[i].weight.abs() for i in (0, 2, 4)], level, [0.9, 0.6, 0.9])
    for mask, exp in zip(masks, expected):
        assert torch.equal(mask.bool(), exp)
    sparsities = [1 - m.mean().item() for m in masks]
    assert sparsities[1] <= 0.6 + 1e-9 and sparsities[0] <= 0.9 + 1e-9 and sparsities[2] <= 0.9 + 1e-9
    total = sum(m.numel() for m in masks)
    reachable = min(round(level * total), sum(int(c * m.numel() + 1e-6) for c, m in zip([0.9, 0.6, 0.9], masks)))
    assert sum(int((m == 0).sum()) for m in masks) == reachable


def test_global_with_scheduler_is_total_level_and_monotone():
    sparsifier = fxs.GlobalMagnitudeSparsifier(0.8)
    prepared = fxs.prepare_fx_sparse(mlp(), sparsifier)
    scheduler = fxs.CubicSL(sparsifier, init_sl=0.0, total_t=4, delta_t=1)
    total = sum(g["module"].weight.numel() for g in sparsifier.groups)
    previous = None
    for _ in range(6):
        sparsifier.step()
        masks = torch.cat([sparsifier.get_mask(g["tensor_fqn"]).reshape(-1) for g in sparsifier.groups])
        assert int((masks == 0).sum()) == round(sparsifier.groups[0]["sparsity_level"] * total)
        if previous is not None:
            assert not bool((masks.bool() & ~previous).any()), "a pruned weight came back"
        previous = masks.bool()
        scheduler.step()
    assert sparsifier.groups[0]["sparsity_level"] == pytest.approx(0.8)
    x = torch.randn(4, 16)
    expected = prepared(x)
    squashed = sparsifier.squash_mask()
    torch.testing.assert_close(squashed(x), expected)
    assert sum(int((g["module"].weight == 0).sum()) for g in sparsifier.groups) >= round(0.8 * total)


def test_global_rejects_per_group_levels():
    with pytest.raises(ValueError, match=r"group '2.weight': sparsity_level=0.9 differs from the global level "
                                         r"0.5.*max_layer_sparsity"):
        fxs.prepare_fx_sparse(mlp(), fxs.GlobalMagnitudeSparsifier(0.5),
                              [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight", "sparsity_level": 0.9}])
    with pytest.raises(ValueError, match=r"max_layer_sparsity must be in \[0, 1\], got 1.5"):
        fxs.GlobalMagnitudeSparsifier(0.5, max_layer_sparsity=1.5)


# -- NMSparsifier -------------------------------------------------------------------------


def _assert_exact_nm(weight, mask, n, m):
    """Every run of m along dim 1 keeps exactly its n largest |w|."""
    runs = weight.abs().reshape(weight.shape[0], -1, m)
    kept = mask.reshape(weight.shape[0], -1, m).bool()
    assert bool((kept.sum(-1) == n).all()), "a run does not keep exactly n"
    smallest_kept = torch.where(kept, runs, torch.inf).amin(-1)
    largest_dropped = torch.where(kept, -torch.inf, runs).amax(-1)
    assert bool((smallest_kept >= largest_dropped).all()), "a run dropped a larger weight than it kept"


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("tracer", ["symbolic", pytest.param("export", marks=pytest.mark.slow)])
def test_nm_exact_pattern_every_group(n, m, tracer):
    if tracer == "symbolic":
        model, x, kwargs = mlp(), torch.randn(4, 16), {}
    else:
        model, x = encoder_layer(), torch.randn(2, 5, 32)
        kwargs = {"tracer": "export", "example_inputs": (x,)}
    sparsifier = fxs.NMSparsifier(n, m)
    prepared = fxs.prepare_fx_sparse(model, sparsifier, **kwargs)
    sparsifier.step()
    assert all(g["sparsity_level"] == (m - n) / m for g in sparsifier.groups)
    for group in sparsifier.groups:
        weight = prepared.get_parameter(group["tensor_fqn"])
        _assert_exact_nm(weight, sparsifier.get_mask(group["tensor_fqn"]), n, m)
    expected = prepared(x)
    sparsifier.squash_mask()
    torch.testing.assert_close(prepared(x), expected)
    for group in sparsifier.groups:
        weight = prepared.get_parameter(group["tensor_fqn"])
        assert bool(((weight != 0).reshape(weight.shape[0], -1, m).sum(-1) <= n).all())


def test_nm_gradual_with_scheduler():
    model = mlp()
    sparsifier = fxs.NMSparsifier(2, 4)
    fxs.prepare_fx_sparse(model, sparsifier, [{"tensor_fqn": "2.weight"}])
    scheduler = fxs.CubicSL(sparsifier, init_sl=0.0, total_t=3, delta_t=1)
    weight = model[2].weight
    previous = torch.zeros(32, 8, dtype=torch.bool)
    seen = []
    for _ in range(5):
        sparsifier.step()
        mask = sparsifier.get_mask("2.weight").reshape(32, 8, 4)
        kept = mask.sum(-1)
        assert bool(((kept == 4) | (kept == 2)).all()), "a run is neither dense nor 2:4"
        pruned_runs = kept == 2
        assert int(pruned_runs.sum()) == round(sparsifier.groups[0]["sparsity_level"] / 0.5 * pruned_runs.numel())
        assert not bool((previous & ~pruned_runs).any()), "a pruned run became dense again"
        previous = pruned_runs
        seen.append(float(pruned_runs.float().mean()))
        scheduler.step()
    assert seen[0] == 0.0 and seen[-1] == 1.0 and 0 < seen[2] < 1
    _assert_exact_nm(weight, sparsifier.get_mask("2.weight"), 2, 4)


def test_nm_per_group_pattern():
    sparsifier = fxs.NMSparsifier(2, 4)
    model = mlp()
    fxs.prepare_fx_sparse(model, sparsifier, [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight", "n": 1, "m": 8}])
    assert [g["sparsity_level"] for g in sparsifier.groups] == [0.5, 0.875]  # each group's full pattern
    sparsifier.step()
    _assert_exact_nm(model[0].weight, sparsifier.get_mask("0.weight"), 2, 4)
    _assert_exact_nm(model[2].weight, sparsifier.get_mask("2.weight"), 1, 8)


def test_nm_errors():
    with pytest.raises(ValueError, match=r"group '0.weight': 2:4 sparsity needs in_features \(last dim\) divisible by "
                                         r"m=4; shape is \(8, 30\) \(30 % 4 = 2\)"):
        fxs.prepare_fx_sparse(nn.Sequential(nn.Linear(30, 8)), fxs.NMSparsifier(2, 4))
    with pytest.raises(ValueError, match=r"needs a 2-D \(out_features, in_features\) weight, got shape \(8, 3, 3, 3\)"):
        fxs.prepare_fx_sparse(cnn(), fxs.NMSparsifier(2, 4), [{"tensor_fqn": "conv1.weight"}])
    with pytest.raises(ValueError, match=r"need 1 <= n < m"):
        fxs.NMSparsifier(4, 4)
    with pytest.raises(ValueError, match=r"\(2:4\): sparsity_level must be in \[0, 0.5\], got 0.7"):
        fxs.prepare_fx_sparse(mlp(), fxs.NMSparsifier(2, 4), [{"tensor_fqn": "0.weight", "sparsity_level": 0.7}])


# -- activation observers and WandaSparsifier ---------------------------------------------


class TwoLayer(nn.Module):
    """Inputs with very unequal channel scales, so Wanda and magnitude disagree."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(16, 24)
        self.fc2 = nn.Linear(24, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _calibration(seed=1, batches=3):
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-2, 1, 16)
    return [torch.randn(5, 3, 16, generator=g) * scale for _ in range(batches)]


def _wanda_reference(weight, inputs, level=None, m=None):
    """|W_ij| * ||X_j||_2, written out: drop the lowest per row, or the lowest m/2 of each run of m."""
    x = torch.cat([i.reshape(-1, weight.shape[1]) for i in inputs])
    score = weight.abs() * x.pow(2).sum(0).sqrt()
    mask = torch.ones_like(weight)
    if m is None:
        k = int(weight.shape[1] * level)  # the published code truncates: sort_res[1][:, :int(cols * ratio)]
        drop = score.argsort(dim=1)[:, :k]
        mask.scatter_(1, drop, 0)
    else:
        for start in range(0, weight.shape[1], m):
            drop = score[:, start:start + m].argsort(dim=1)[:, : m // 2]
            mask[:, start:start + m].scatter_(1, drop, 0)
    return mask


@pytest.mark.parametrize("tracer", ["symbolic", "export"])
@pytest.mark.parametrize("level,m", [(0.5, None), (0.3, None), (0.5, 4)])
def test_wanda_masks_match_formula(tracer, level, m):
    model, batches = TwoLayer(), _calibration()
    kwargs = {"tracer": "export", "example_inputs": (batches[0],)} if tracer == "export" else {}
    sparsifier = fxs.WandaSparsifier(level, semi_structured_block_size=m)
    prepared = fxs.prepare_fx_sparse(model, sparsifier, [{"tensor_fqn": "fc1.weight"}], **kwargs)
    with torch.no_grad():
        for x in batches:
            prepared(x)
    sparsifier.step()
    mask = sparsifier.get_mask("fc1.weight")
    expected = _wanda_reference(model.fc1.weight.detach(), batches, level, m)
    assert torch.equal(mask, expected)
    magnitude = _wanda_reference(model.fc1.weight.detach(), [torch.ones(1, 16)], level, m)
    assert not torch.equal(mask, magnitude), "activations did not change the choice: the test shows nothing"
    observer = prepared.get_submodule("fc1.weight_input_observer")
    assert int(observer.num_rows) == 3 * 5 * 3


class TestObserverPass(TestCase):
    def test_insert_and_remove_symbolic(self):
        _insert_and_remove(self)


def _insert_and_remove(case):
    model, x = TwoLayer(), torch.randn(4, 16)
    prepared = fxs.prepare_fx_sparse(model, fxs.WeightNormSparsifier())
    before, expected = prepared.code, prepared(x)
    observed = observe_linear_inputs(prepared, ["fc2.weight"])
    assert observed == {"fc2.weight": "fc2.weight_input_observer"}
    case.assertExpectedInline(prepared.code.strip(), """\
def forward(self, x):
    fc1_weight = self.fc1.weight
    fc1_weight_mask = self.fc1.weight_mask
    mul = torch.mul(fc1_weight, fc1_weight_mask);  fc1_weight = fc1_weight_mask = None
    fc1_bias = self.fc1.bias
    linear = torch._C._nn.linear(x, mul, fc1_bias);  x = mul = fc1_bias = None
    relu = torch.relu(linear);  linear = None
    fc2_weight = self.fc2.weight
    fc2_weight_mask = self.fc2.weight_mask
    mul_1 = torch.mul(fc2_weight, fc2_weight_mask);  fc2_weight = fc2_weight_mask = None
    fc2_bias = self.fc2.bias
    fc2_weight_input_observer = self.fc2.weight_input_observer(relu);  relu = None
    linear_1 = torch._C._nn.linear(fc2_weight_input_observer, mul_1, fc2_bias);  fc2_weight_input_observer = mul_1 = fc2_bias = None
    return linear_1""")
    assert torch.equal(prepared(x), expected)
    assert "fc2.weight_input_observer.sum_sq" in prepared.state_dict()
    assert remove_observers(prepared, ChannelNormObserver) == ["fc2.weight_input_observer"]
    assert prepared.code == before
    assert not hasattr(prepared.fc2, "weight_input_observer")
    assert torch.equal(prepared(x), expected)


@pytest.mark.slow
def test_wanda_observers_export_and_squash():
    layer, x = encoder_layer(), torch.randn(2, 5, 32)
    plain = fxs.prepare_fx_sparse(layer, fxs.WeightNormSparsifier(), tracer="export", example_inputs=(x,))
    sparsifier = fxs.WandaSparsifier(0.5)
    config = [{"tensor_fqn": "linear2.weight"}, {"tensor_fqn": "self_attn.in_proj_weight"}]
    prepared = fxs.prepare_fx_sparse(layer, sparsifier, config, tracer="export", example_inputs=(x,))
    observers = [n for n in prepared.graph.nodes if n.op == "call_module" and n.target.endswith("_input_observer")]
    assert [n.target for n in observers] == ["self_attn.in_proj_weight_input_observer",
                                             "linear2.weight_input_observer"]
    for node in observers:  # each feeds exactly the aten.linear of its weight
        (user,) = node.users
        assert user.target is torch.ops.aten.linear.default and user.args[0] is node
    torch.testing.assert_close(prepared(x), plain(x), rtol=0, atol=0)
    with torch.no_grad():
        prepared(x)
    sparsifier.step()
    expected = prepared(x)
    squashed = sparsifier.squash_mask()
    assert not any(n.op == "call_module" and n.target.endswith("_input_observer") for n in squashed.graph.nodes)
    assert not any(isinstance(m, ChannelNormObserver) for m in squashed.modules())
    torch.testing.assert_close(squashed(x), expected)
    assert (prepared.get_parameter("linear2.weight") == 0).float().mean().item() == 0.5
    reference = fxs.WeightNormSparsifier()
    fxs.prepare_fx_sparse(layer, reference, config, tracer="export", example_inputs=(x,))
    assert squashed.code == reference.squash_mask().code  # back to the plain squashed graph


def test_wanda_observes_only_configured_linears_not_embeddings():
    # embed.weight is tied to out.weight: the embedding use must stay unobserved (torchao's ao#1133).
    model, tokens = tied(), torch.randint(0, 40, (3, 7))
    sparsifier = fxs.WandaSparsifier(0.5)
    prepared = fxs.prepare_fx_sparse(model, sparsifier, [{"tensor_fqn": "embed.weight"}])
    observers = [n for n in prepared.graph.nodes if n.op == "call_module" and n.target.endswith("_input_observer")]
    assert [n.target for n in observers] == ["embed.weight_input_observer"]
    (user,) = observers[0].users
    assert user.target is F.linear and user.args[1].meta["sparsity"]["tensor_fqn"] == "embed.weight"
    assert observers[0].args[0].target is torch.tanh  # the out projection's input, not the token ids
    with torch.no_grad():
        prepared(tokens)
    sparsifier.step()
    assert sparsifier.get_mask("embed.weight").mean().item() == 0.5

    sparsifier = fxs.WandaSparsifier(0.5)
    prepared = fxs.prepare_fx_sparse(mlp(), sparsifier, [{"tensor_fqn": "2.weight"}])
    assert [n.target for n in prepared.graph.nodes if n.op == "call_module" and "observer" in n.target] == \
        ["2.weight_input_observer"]


def test_wanda_errors():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 4))
    sparsifier = fxs.WandaSparsifier()
    with pytest.raises(fxs.SparsityConfigError, match=r"\['0.weight'\] is not the weight of any linear .* leave it "
                                                      r"out of the config"):
        fxs.prepare_fx_sparse(model, sparsifier, [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "1.weight"}])
    assert sparsifier.groups == [] and sparsifier.model is None  # usable again
    prepared = fxs.prepare_fx_sparse(model, sparsifier, [{"tensor_fqn": "1.weight"}])
    with pytest.raises(RuntimeError, match=r"step\(\) before calibration: no activations were observed for "
                                           r"\['1.weight'\]\. Run calibration inputs through the prepared module"):
        sparsifier.step()
    with pytest.raises(ValueError, match=r"semi_structured_block_size must be an even int"):
        fxs.WandaSparsifier(0.5, semi_structured_block_size=3)
    with pytest.raises(ValueError, match=r"sparsity_level must be in \[0, 0.5\], got 0.6"):
        fxs.WandaSparsifier(0.6, semi_structured_block_size=4)
    prepared(torch.randint(0, 10, (2, 3)))
    sparsifier.squash_mask()
    with pytest.raises(RuntimeError, match=r"no activation observer for '1.weight'.*squash_mask"):
        sparsifier.step()


def test_wanda_gradual_with_scheduler_and_copies():
    model, batches = TwoLayer(), _calibration()
    sparsifier = fxs.WandaSparsifier(0.75)
    prepared = fxs.prepare_fx_sparse(model, sparsifier)
    with torch.no_grad():
        for x in batches:
            prepared(x)
    clone = pickle.loads(pickle.dumps(copy.deepcopy(prepared)))  # observers and their statistics travel
    assert torch.equal(clone.fc1.weight_input_observer.sum_sq, prepared.fc1.weight_input_observer.sum_sq)
    scheduler = fxs.LambdaSL(sparsifier, sl_lambda=lambda epoch: min(1.0, epoch / 3))
    for _ in range(4):
        sparsifier.step()
        for group in sparsifier.groups:
            mask = sparsifier.get_mask(group["tensor_fqn"])
            per_row = (mask == 0).sum(1)
            assert bool((per_row == round(group["sparsity_level"] * mask.shape[1])).all())
        scheduler.step()
    assert sparsifier.groups[0]["sparsity_level"] == 0.75


def test_channel_norm_observer():
    observer = ChannelNormObserver(6)
    xs = [torch.randn(2, 3, 6), torch.randn(4, 6)]
    for x in xs:
        assert observer(x) is x
    rows = torch.cat([x.reshape(-1, 6) for x in xs])
    torch.testing.assert_close(observer.channel_norms(), rows.norm(dim=0))
    assert int(observer.num_rows) == 10
    assert _is_activation_post_process(observer)  # a torch.ao observer to torch.ao's tools
    with pytest.raises(RuntimeError, match=r"expects 6 input channels .* got input of shape \(2, 5\)"):
        observer(torch.randn(2, 5))
    with pytest.raises(RuntimeError, match=r"not quantization parameters; remove it"):
        observer.calculate_qparams()
    observer.reset()
    assert int(observer.num_rows) == 0 and float(observer.sum_sq.sum()) == 0.0
    assert observer_fqn_for("a.b.weight") == "a.b.weight_input_observer"
