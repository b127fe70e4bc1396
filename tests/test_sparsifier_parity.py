"""Our sparsifiers against torch.ao.pruning's over whole training runs, and state round trips."""
import copy
import io
import pickle

import pytest
import torch
import torch.ao.pruning as ao
from models import mlp, tied
from torch import nn

import fx_sparsity as fxs


def ao_mask(model, fqn):
    module_fqn, _, name = fqn.rpartition(".")
    return getattr(model.get_submodule(module_fqn).parametrizations, name)[0].mask


def train_side_by_side(make_ours, make_theirs, model, config, steps, data, scheduler_kwargs=None):
    """Run the same loop (SGD, sparsifier.step, CubicSL) with both libraries; yield masks each step."""
    ao_model = copy.deepcopy(model)
    ours, theirs = make_ours(), make_theirs()
    prepared = fxs.prepare_fx_sparse(model, ours, config)
    theirs.prepare(ao_model, config)
    opt_ours = torch.optim.SGD(prepared.parameters(), lr=0.05)
    opt_theirs = torch.optim.SGD(ao_model.parameters(), lr=0.05)
    schedulers = ()
    if scheduler_kwargs is not None:
        schedulers = (fxs.CubicSL(ours, **scheduler_kwargs), ao.CubicSL(theirs, **scheduler_kwargs))
    for step in range(steps):
        x = data[step % len(data)]
        for net, opt in ((prepared, opt_ours), (ao_model, opt_theirs)):
            loss = net(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        ours.step()
        theirs.step()
        for s in schedulers:
            s.step()
        yield step, ours, theirs, prepared, ao_model


DIVISIBLE = [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight", "sparsity_level": 0.9}]


@pytest.mark.parametrize("kwargs, config", [
    (dict(sparsity_level=0.8, sparse_block_shape=(1, 4), zeros_per_block=4), None),
    # torch.ao fails on a dim not divisible by the block when zeros_per_block < block size: 32x16 and 32x32 only
    (dict(sparsity_level=0.5, sparse_block_shape=(4, 4), zeros_per_block=2), DIVISIBLE),
    (dict(sparsity_level=0.6, sparse_block_shape=(2, 2), norm=1), None),
    (dict(sparsity_level=0.3, sparse_block_shape=(1, 1)), None),
])
def test_weight_norm_masks_identical_through_training(kwargs, config):
    torch.manual_seed(0)
    data = [torch.randn(16, 16) for _ in range(4)]
    sched = dict(init_sl=0.0, init_t=0, delta_t=2, total_t=5)
    for step, ours, theirs, prepared, ao_model in train_side_by_side(  # noqa: B007 - read after the loop
            lambda: fxs.WeightNormSparsifier(**kwargs), lambda: ao.WeightNormSparsifier(**kwargs),
            mlp(), config, 15, data, sched):
        for group in ours.groups:
            fqn = group["tensor_fqn"]
            assert torch.equal(ours.get_mask(fqn), ao_mask(ao_model, fqn)), (step, fqn)
        assert [g["sparsity_level"] for g in ours.groups] == [g["sparsity_level"] for g in theirs.groups]
    x = data[0]
    torch.testing.assert_close(prepared(x), ao_model(x), rtol=1e-5, atol=1e-6)
    for group in ours.groups:
        fqn = group["tensor_fqn"]
        module_fqn, _, name = fqn.rpartition(".")
        torch.testing.assert_close(prepared.get_parameter(fqn),
                                   ao_model.get_submodule(module_fqn).parametrizations[name].original)


def test_nearly_diagonal_identical_on_square_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 12))
    config = [{"tensor_fqn": "0.weight", "nearliness": 3}, {"tensor_fqn": "2.weight", "nearliness": 5}]
    ours, theirs = fxs.NearlyDiagonalSparsifier(), ao.NearlyDiagonalSparsifier()
    ao_model = copy.deepcopy(model)
    prepared = fxs.prepare_fx_sparse(model, ours, config)
    theirs.prepare(ao_model, config)
    ours.step()
    theirs.step()
    for entry in config:
        assert torch.equal(ours.get_mask(entry["tensor_fqn"]), ao_mask(ao_model, entry["tensor_fqn"]))
    x = torch.randn(3, 12)
    torch.testing.assert_close(prepared(x), ao_model(x))


def test_enable_mask_update_false_skips_step():
    sparsifier = fxs.WeightNormSparsifier()
    prepared = fxs.prepare_fx_sparse(mlp(), sparsifier)
    sparsifier.enable_mask_update = False
    sparsifier.step()
    assert prepared.get_buffer("0.weight_mask").min().item() == 1.0


def prepared_pair(level=0.6):
    torch.manual_seed(1)
    model = mlp()
    ours = fxs.WeightNormSparsifier(sparsity_level=level)
    prepared = fxs.prepare_fx_sparse(model, ours)
    theirs = ao.WeightNormSparsifier(sparsity_level=level)
    ao_model = copy.deepcopy(model)
    theirs.prepare(ao_model, None)
    return model, ours, prepared, theirs, ao_model


def test_state_dict_format_matches_torch_ao():
    _, ours, _, theirs, _ = prepared_pair()
    ours.step()
    theirs.step()
    a, b = ours.state_dict(), theirs.state_dict()
    assert a["groups"] == b["groups"]
    assert a["state"].keys() == b["state"].keys()
    for fqn in a["state"]:
        assert torch.equal(a["state"][fqn]["mask"], b["state"][fqn]["mask"])


def test_torch_ao_state_dict_loads_into_ours_and_back():
    model, ours, prepared, theirs, ao_model = prepared_pair()
    theirs.step()
    fresh = fxs.WeightNormSparsifier()
    fresh_prepared = fxs.prepare_fx_sparse(model, fresh)
    fresh.load_state_dict(theirs.state_dict())
    assert fresh.groups[0]["sparsity_level"] == 0.6
    for group in fresh.groups:
        fqn = group["tensor_fqn"]
        assert torch.equal(fresh_prepared.get_buffer(fqn + "_mask"), ao_mask(ao_model, fqn))
    # and back: ours -> a freshly prepared torch.ao model
    ours.step()
    ao_fresh_model = copy.deepcopy(model)
    ao_fresh = ao.WeightNormSparsifier()
    ao_fresh.prepare(ao_fresh_model, None)
    ao_fresh.load_state_dict(copy.deepcopy(ours.state_dict()))
    for group in ours.groups:
        assert torch.equal(ao_mask(ao_fresh_model, group["tensor_fqn"]), ours.get_mask(group["tensor_fqn"]))
    # Steps continue identically after the load.
    fresh.step()
    theirs.step()
    for group in fresh.groups:
        assert torch.equal(fresh.get_mask(group["tensor_fqn"]), ao_mask(ao_model, group["tensor_fqn"]))


def test_prepared_state_dict_restores_masks_exactly():
    model, ours, prepared, _, _ = prepared_pair()
    ours.step()
    buffer = io.BytesIO()
    torch.save(prepared.state_dict(), buffer)
    fresh_sparsifier = fxs.WeightNormSparsifier()
    fresh = fxs.prepare_fx_sparse(mlp(seed=5), fresh_sparsifier)
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    for name, tensor in prepared.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    x = torch.randn(2, 16)
    torch.testing.assert_close(fresh(x), prepared(x))
    assert torch.equal(fresh_sparsifier.get_mask("0.weight"), ours.get_mask("0.weight"))


def test_load_state_dict_errors():
    _, ours, _, _, _ = prepared_pair()
    state = ours.state_dict()
    with pytest.raises(RuntimeError, match=r"load_state_dict\(\) called before prepare"):
        fxs.WeightNormSparsifier().load_state_dict(state)
    other = fxs.WeightNormSparsifier()
    fxs.prepare_fx_sparse(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 10)), other)
    with pytest.raises(RuntimeError, match=r"'0.weight': saved mask has shape \(32, 16\), this model's tensor has \(8, 16\)"):
        other.load_state_dict(state)
    partial = fxs.WeightNormSparsifier()
    fxs.prepare_fx_sparse(mlp(), partial, [{"tensor_fqn": "0.weight"}])
    with pytest.raises(RuntimeError, match=r"Error loading '2.weight' into the model: it has no mask"):
        partial.load_state_dict(state)


def test_deepcopy_and_pickle_round_trip():
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
    prepared = fxs.prepare_fx_sparse(tied(), sparsifier, [{"tensor_fqn": "embed.weight"}, {"tensor_fqn": "hidden.weight"}])
    sparsifier.step()
    tokens = torch.randint(0, 40, (2, 5))
    for clone in (copy.deepcopy(prepared), pickle.loads(pickle.dumps(prepared))):
        torch.testing.assert_close(clone(tokens), prepared(tokens))
        assert torch.equal(clone.get_buffer("embed.weight_mask"), prepared.get_buffer("embed.weight_mask"))
        assert clone.get_parameter("out.weight") is clone.get_parameter("embed.weight")
    copied = copy.deepcopy(sparsifier)
    assert copied.model is not prepared
    copied.step()
    assert torch.equal(copied.get_mask("hidden.weight"), sparsifier.get_mask("hidden.weight"))


def test_levels_outside_0_1_act_as_torch_ao_s_ends():
    """torch.ao's own test_sparsity_levels: levels -1 and 2 are taken (as 0 and 1); masks identical to torch.ao's."""
    model, config = nn.Sequential(), []
    for i, (level, block, zeros) in enumerate((level, block, zeros) for level in (-1.0, 0.0, 0.5, 1.0, 2.0)
                                              for block in ((1, 1), (1, 4), (2, 2), (4, 1)) for zeros in range(5)
                                              if zeros <= block[0] * block[1]):
        torch.manual_seed(i)
        model.add_module(f"l{i}", nn.Linear(12, 12, bias=False))
        config.append({"tensor_fqn": f"l{i}.weight", "sparsity_level": level, "sparse_block_shape": block,
                       "zeros_per_block": zeros})
    ours, theirs, ao_model = fxs.WeightNormSparsifier(), ao.WeightNormSparsifier(), copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"group 'l0.weight': sparsity_level=-1.0 is outside \[0, 1\]; it acts as 0 "
                                         r"\(every weight kept\), as in torch.ao.pruning"):
        fxs.prepare_fx_sparse(model, ours, config)
    theirs.prepare(ao_model, config)
    ours.step()
    theirs.step()
    for entry in config:
        assert torch.equal(ours.get_mask(entry["tensor_fqn"]).float(), ao_mask(ao_model, entry["tensor_fqn"]).float())
    # a scheduler may push a level past 1 (LambdaSL): every block goes, as in torch.ao
    for group in ours.groups:
        group["sparsity_level"] = 5.0
    ours.step()
    assert not ours.get_mask("l6.weight").any()  # (1, 4) blocks, 4 zeros each


def test_nearliness_is_refused_at_step_as_torch_ao_does():
    """torch.ao's own NearlyDiagonal test_sparsity_levels: prepare takes any int; step() refuses even or too large."""
    for nearliness in range(-1, 40):
        layer = nn.Sequential(nn.Linear(32, 32, bias=False))
        ours, theirs, ao_layer = fxs.NearlyDiagonalSparsifier(1), ao.NearlyDiagonalSparsifier(1), copy.deepcopy(layer)
        config = [{"tensor_fqn": "0.weight", "nearliness": nearliness}]
        fxs.prepare_fx_sparse(layer, ours, config)
        theirs.prepare(ao_layer, config)
        if (nearliness > 0 and nearliness % 2 == 0) or nearliness // 2 >= 32:
            with pytest.raises(ValueError):
                theirs.step()
            with pytest.raises(ValueError, match="nearliness"):
                ours.step()
        else:
            ours.step()
            theirs.step()
            assert torch.equal(ours.get_mask("0.weight"), ao_mask(ao_layer, "0.weight")), nearliness


class CountingSparsifier(fxs.BaseSparsifier):
    """torch.ao's ImplementedSparsifier: zero the first row, count steps in ``state``."""

    def __init__(self, **kwargs):
        super().__init__(defaults=kwargs)

    def update_mask(self, module, tensor_name, mask, **kwargs):
        mask[0] = 0
        state = self.state[f"{kwargs['module_fqn']}.{tensor_name}" if kwargs["module_fqn"] else tensor_name]
        state["step_count"] = state.get("step_count", 0) + 1


def test_state_holds_what_the_sparsifier_keeps_and_round_trips_as_torch_ao_s():
    """torch.ao's own test_state_dict: ``state`` is the sparsifier's (masks live in the model) and loads equal."""
    first = CountingSparsifier(test=3)
    fxs.prepare_fx_sparse(mlp(), first, [{"tensor_fqn": "0.weight"}])
    for _ in range(3):
        first.step()
    saved = first.state_dict()
    assert saved["state"]["0.weight"]["step_count"] == 3 and saved["groups"][0]["test"] == 3
    assert not saved["state"]["0.weight"]["mask"][0].any()  # the state dict carries the masks too
    second = CountingSparsifier()
    fxs.prepare_fx_sparse(mlp(), second, None)
    assert first.state != second.state
    second.load_state_dict(saved)
    assert first.state == second.state == {"0.weight": {"step_count": 3}}
    assert torch.equal(second.get_mask("0.weight"), first.get_mask("0.weight"))


def test_default_config_names_a_shared_layer_by_its_first_name():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    ours, theirs = fxs.WeightNormSparsifier(), ao.WeightNormSparsifier()
    fxs.prepare_fx_sparse(model, ours)
    theirs.prepare(copy.deepcopy(model), None)
    assert [g["tensor_fqn"] for g in ours.groups] == [g["tensor_fqn"] for g in theirs.groups] == ["0.weight"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block, zeros", [((1, 4), 4), ((2, 2), 2)])
def test_half_precision_masks_identical_at_every_step(dtype, block, zeros):
    """torch.ao's masked weight turns float32 once its mask is recomputed (bool for partial blocks, so the
    weight's dtype again); its norms, and so its fp16/bf16 masks, follow. Near-equal weights make ties matter."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16, bias=False)).to(dtype)
    ao_model = copy.deepcopy(model)
    ours, theirs = fxs.WeightNormSparsifier(0.25, block, zeros), ao.WeightNormSparsifier(0.25, block, zeros)
    prepared = fxs.prepare_fx_sparse(model, ours)
    theirs.prepare(ao_model, None)
    for level in (0.25, 0.5, 0.0, 0.6, 0.75):
        ours.groups[0]["sparsity_level"] = theirs.groups[0]["sparsity_level"] = level
        with torch.no_grad():
            weight = 1 + 0.01 * torch.randn(16, 32)
            prepared.get_parameter("0.weight").copy_(weight)
            ao_model[0].parametrizations.weight.original.copy_(weight)
        ours.step()
        theirs.step()
        assert torch.equal(ours.get_mask("0.weight").float(), ao_mask(ao_model, "0.weight").float()), level


@pytest.mark.parametrize("fqn, error", [("2.wieght", AttributeError), ("nope.weight", AttributeError), ("2", TypeError)])
def test_a_wrong_tensor_fqn_raises_what_torch_ao_raises(fqn, error):
    with pytest.raises(error):
        ao.WeightNormSparsifier().prepare(mlp(), [{"tensor_fqn": fqn}])
    with pytest.raises(error, match=f"tensor_fqn '{fqn}'"):
        fxs.prepare_fx_sparse(mlp(), fxs.WeightNormSparsifier(), [{"tensor_fqn": fqn}])


class RecordingSparseLinear(nn.Linear):
    """A target in torch.ao's convention: ``from_dense(module)``; it keeps the weight it was given."""

    @classmethod
    def from_dense(cls, mod):
        new = cls(mod.in_features, mod.out_features)
        new.given_weight = mod.weight.detach().clone()
        new.given_block = getattr(mod, "sparse_params", {}).get("sparse_block_shape")
        return new


def test_convert_takes_torch_ao_s_from_dense_targets():
    """torch.ao's test_convert: only the configured Linear is swapped, and from_dense sees the masked weight."""
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    config = [{"tensor_fqn": "0.weight"}]
    ours, theirs, ao_model = fxs.WeightNormSparsifier(0.5), ao.WeightNormSparsifier(0.5), copy.deepcopy(model)
    prepared = fxs.prepare_fx_sparse(model, ours, config)
    theirs.prepare(ao_model, config)
    ours.step()
    theirs.step()
    mapping = {nn.Linear: RecordingSparseLinear}
    lowered, ao_lowered = ours.convert(prepared, mapping=mapping), theirs.convert(ao_model, mapping=mapping)
    assert [type(m) for m in (lowered.get_submodule("0"), lowered.get_submodule("2"))] == \
           [type(m) for m in (ao_lowered[0], ao_lowered[2])] == [RecordingSparseLinear, nn.Linear]
    assert torch.equal(lowered.get_submodule("0").given_weight, ao_lowered[0].given_weight)
    assert lowered.get_submodule("0").given_block == (1, 4)
    assert prepared.get_submodule("0") is not lowered.get_submodule("0")  # inplace=False: the prepared model stays
