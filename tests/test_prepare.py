"""prepare_fx_sparse: the prepared graph, both tracers, tied weights, imports, errors."""
import copy
import re

import pytest
import torch
import torch.ao.pruning as ao
from expecttest import TestCase
from models import cnn, encoder_layer, mlp, tied
from torch import nn

import fx_sparsity as fxs
from fx_sparsity.passes import fetch_attr, find_masked_uses


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()}, [
        (n, type(m)) for n, m in model.named_modules()]


def assert_untouched(model, before):
    state, modules = before
    now_state, now_modules = snapshot(model)
    assert now_modules == modules
    assert now_state.keys() == state.keys()
    for k in state:
        assert torch.equal(state[k], now_state[k]), k


class TestPreparedGraph(TestCase):
    def test_mlp_graph_code(self):
        prepared = fxs.prepare_fx_sparse(mlp(), fxs.WeightNormSparsifier(), [{"tensor_fqn": "2.weight"}])
        self.assertExpectedInline(prepared.code.strip(), """\
def forward(self, input):
    input_1 = input
    _0 = getattr(self, "0")(input_1);  input_1 = None
    _1 = getattr(self, "1")(_0);  _0 = None
    _2_weight = getattr(self, "2").weight
    _2_weight_mask = getattr(self, "2").weight_mask
    mul = torch.mul(_2_weight, _2_weight_mask);  _2_weight = _2_weight_mask = None
    _2_bias = getattr(self, "2").bias
    linear = torch._C._nn.linear(_1, mul, _2_bias);  _1 = mul = _2_bias = None
    _3 = getattr(self, "3")(linear);  linear = None
    _4 = getattr(self, "4")(_3);  _3 = None
    return _4""")

    def test_meta_and_buffers(self):
        model = mlp()
        sparsifier = fxs.WeightNormSparsifier()
        prepared = fxs.prepare_fx_sparse(model, sparsifier)
        uses = find_masked_uses(prepared)
        self.assertEqual([u.mul.meta["sparsity"]["tensor_fqn"] for u in uses], ["0.weight", "2.weight", "4.weight"])
        self.assertEqual(uses[0].mul.meta["sparsity"]["mask_fqn"], "0.weight_mask")
        self.assertIn("2.weight_mask", prepared.state_dict())
        self.assertEqual(prepared.get_buffer("2.weight_mask").dtype, torch.float32)
        self.assertIs(sparsifier.model, prepared)
        self.assertIs(sparsifier.prepare.__self__, sparsifier)

    def test_prepare_method_returns_graph_module(self):
        sparsifier = fxs.WeightNormSparsifier()
        prepared = sparsifier.prepare(mlp(), None)
        self.assertIsInstance(prepared, torch.fx.GraphModule)
        self.assertIs(sparsifier.model, prepared)


def test_default_config_matches_torch_ao_order():
    layer = encoder_layer()
    ours = fxs.WeightNormSparsifier()
    fxs.prepare_fx_sparse(layer, ours, tracer="export", example_inputs=(torch.randn(2, 5, 32),))
    theirs = ao.WeightNormSparsifier()
    theirs.prepare(copy.deepcopy(layer), None)
    assert [g["tensor_fqn"] for g in ours.groups] == [g["tensor_fqn"] for g in theirs.groups]
    assert [g["tensor_fqn"] for g in ours.groups] == ["linear1.weight", "linear2.weight"]


def test_input_model_untouched_and_outputs_equal_before_step():
    for model, x in [(mlp(), torch.randn(4, 16)), (cnn(), torch.randn(2, 3, 8, 8))]:
        before = snapshot(model)
        y = model(x)
        prepared = fxs.prepare_fx_sparse(model, fxs.WeightNormSparsifier(), [{"tensor_fqn": "fc.weight"}]
                                         if isinstance(model, nn.Module) and hasattr(model, "fc") else None)
        assert_untouched(model, before)
        assert not any(n.endswith("_mask") for n, _ in model.named_buffers())
        assert torch.equal(prepared(x), y)  # all-ones masks


class MagnitudeAnyShape(fxs.BaseSparsifier):
    """A custom sparsifier over tensors of any rank (conv weights), written as a user would."""

    def __init__(self, sparsity_level=0.5):
        super().__init__({"sparsity_level": sparsity_level})

    def update_mask(self, module, tensor_name, mask, sparsity_level, **kwargs):
        scores = (getattr(module, tensor_name) * mask).abs().flatten()
        k = int(sparsity_level * scores.numel())
        new = torch.ones_like(scores)
        new[scores.argsort()[:k]] = 0
        mask.copy_(new.view_as(mask))


def test_cnn_conv_masks_both_padding_modes():
    model = cnn()
    sparsifier = MagnitudeAnyShape(0.5)
    config = [{"tensor_fqn": "conv1.weight"}, {"tensor_fqn": "conv2.weight"}, {"tensor_fqn": "fc.weight"}]
    prepared = fxs.prepare_fx_sparse(model, sparsifier, config)
    sparsifier.step()
    x = torch.randn(2, 3, 8, 8)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name in ("conv1", "conv2", "fc"):
            getattr(reference, name).weight.mul_(prepared.get_buffer(f"{name}.weight_mask"))
    torch.testing.assert_close(prepared(x), reference(x))
    assert prepared.get_buffer("conv1.weight_mask").mean().item() == 0.5


def test_gradient_is_zero_at_pruned_positions():
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.7)
    prepared = fxs.prepare_fx_sparse(mlp(), sparsifier)
    sparsifier.step()
    prepared(torch.randn(8, 16)).sum().backward()
    for group in sparsifier.groups:
        mask = sparsifier.get_mask(group["tensor_fqn"])
        grad = prepared.get_parameter(group["tensor_fqn"]).grad
        assert (mask == 0).any()
        assert torch.all(grad[mask == 0] == 0)
        assert torch.any(grad[mask == 1] != 0)


@pytest.mark.parametrize("tracer", ["symbolic", "export"])
@pytest.mark.parametrize("fqn", ["embed.weight", "out.weight"])
def test_tied_weights_one_mask_every_use(tracer, fqn):
    model = tied()
    tokens = torch.randint(0, 40, (3, 7))
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4))
    prepared = fxs.prepare_fx_sparse(model, sparsifier, [{"tensor_fqn": fqn}], tracer=tracer,
                                     example_inputs=(tokens,))
    sparsifier.step()
    uses = find_masked_uses(prepared)
    muls = {u.mul for u in uses}
    assert {u.mask_fqn for u in uses} == {fqn + "_mask"}
    weight = prepared.get_parameter("embed.weight")
    reads = [n for n in prepared.graph.nodes if n.op == "get_attr" and fetch_attr(prepared, n.target) is weight]
    assert all(set(n.users) <= muls for n in reads)  # every read goes through the mask
    assert sum(len(m.users) for m in muls) == 2  # the embedding lookup and the output projection
    masks = [n for n, _ in prepared.named_buffers() if n.endswith("_mask")]
    assert masks == [fqn + "_mask"]
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.embed.weight.mul_(prepared.get_buffer(fqn + "_mask"))
    torch.testing.assert_close(prepared(tokens), reference(tokens))
    assert prepared.get_parameter("embed.weight") is prepared.get_parameter("out.weight")


@pytest.mark.slow
def test_transformer_encoder_layer_export_matches_torch_ao():
    layer = encoder_layer()
    x = torch.randn(2, 5, 32)
    config = [{"tensor_fqn": "linear1.weight"}, {"tensor_fqn": "self_attn.in_proj_weight"},
              {"tensor_fqn": "self_attn.out_proj.weight", "sparsity_level": 0.8}]
    ours = fxs.WeightNormSparsifier(sparsity_level=0.6)
    prepared = fxs.prepare_fx_sparse(layer, ours, config, tracer="export", example_inputs=(x,))
    theirs = ao.WeightNormSparsifier(sparsity_level=0.6)
    ao_layer = copy.deepcopy(layer)
    theirs.prepare(ao_layer, config)
    for _ in range(3):
        ours.step()
        theirs.step()
    for entry in config:
        module_fqn, _, name = entry["tensor_fqn"].rpartition(".")
        ao_mask = getattr(ao_layer.get_submodule(module_fqn).parametrizations, name)[0].mask
        assert torch.equal(ours.get_mask(entry["tensor_fqn"]), ao_mask)
    torch.testing.assert_close(prepared(x), ao_layer(x))


def test_symbolic_untraceable_model_suggests_export():
    with pytest.raises(fxs.TraceError, match=r'symbolic_trace cannot trace TransformerEncoderLayer(.|\n)*tracer="export"'):
        fxs.prepare_fx_sparse(encoder_layer(), fxs.WeightNormSparsifier())


def test_export_needs_example_inputs():
    with pytest.raises(ValueError, match="needs example_inputs"):
        fxs.prepare_fx_sparse(mlp(), fxs.WeightNormSparsifier(), tracer="export")


def test_graph_module_is_used_as_is():
    gm = torch.fx.symbolic_trace(mlp())
    prepared = fxs.prepare_fx_sparse(gm, fxs.WeightNormSparsifier(), inplace=True)
    assert prepared is gm
    gm2 = torch.fx.symbolic_trace(mlp())
    code = gm2.code
    prepared2 = fxs.prepare_fx_sparse(gm2, fxs.WeightNormSparsifier())
    assert prepared2 is not gm2 and gm2.code == code


def test_inplace_modifies_the_given_graph_module_only_then():
    model = mlp()
    prepared = fxs.prepare_fx_sparse(model, fxs.WeightNormSparsifier(), inplace=True)
    # symbolic_trace shares submodules with the traced model: in place means in place.
    assert prepared.get_submodule("0") is model[0]
    assert hasattr(model[0], "weight_mask")


def test_import_torch_ao_prepared_model_keeps_original_working():
    model = mlp()
    theirs = ao.WeightNormSparsifier(sparsity_level=0.7)
    theirs.prepare(model, None)
    theirs.step()
    x = torch.randn(4, 16)
    y = model(x)
    ours = fxs.WeightNormSparsifier(sparsity_level=0.7)
    prepared = fxs.prepare_fx_sparse(model, ours)
    assert [g["tensor_fqn"] for g in ours.groups] == ["0.weight", "2.weight", "4.weight"]
    for i in (0, 2, 4):
        assert torch.equal(prepared.get_buffer(f"{i}.weight_mask"), model[i].parametrizations.weight[0].mask)
    torch.testing.assert_close(prepared(x), y)
    # The user's torch.ao model still works and is still parametrized.
    torch.testing.assert_close(model(x), y)
    assert torch.nn.utils.parametrize.is_parametrized(model[0], "weight")
    ours.step()
    theirs.step()
    for i in (0, 2, 4):
        assert torch.equal(prepared.get_buffer(f"{i}.weight_mask"), model[i].parametrizations.weight[0].mask)


def test_bool_mask_dtype():
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
    prepared = fxs.prepare_fx_sparse(mlp(), sparsifier, [{"tensor_fqn": "0.weight", "mask_dtype": torch.bool},
                                                         {"tensor_fqn": "2.weight"}])
    sparsifier.step()
    bool_mask = prepared.get_buffer("0.weight_mask")
    assert bool_mask.dtype == torch.bool and bool_mask.float().mean().item() == 0.5
    reference = fxs.WeightNormSparsifier(sparsity_level=0.5)
    ref_prepared = fxs.prepare_fx_sparse(mlp(), reference, [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight"}])
    reference.step()
    assert torch.equal(bool_mask.float(), ref_prepared.get_buffer("0.weight_mask"))
    x = torch.randn(3, 16)
    torch.testing.assert_close(prepared(x), ref_prepared(x))


def test_step_after_to_dtype_uses_the_new_buffers():
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
    prepared = fxs.prepare_fx_sparse(mlp(), sparsifier).to(torch.float64)
    sparsifier.step()
    mask = prepared.get_buffer("0.weight_mask")
    assert mask.dtype == torch.float64 and mask.mean().item() == 0.5
    assert prepared(torch.randn(2, 16, dtype=torch.float64)).dtype == torch.float64


def test_squash_folds_masks_and_keeps_params():
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
    prepared = fxs.prepare_fx_sparse(mlp(), sparsifier)
    sparsifier.step()
    x = torch.randn(5, 16)
    y = prepared(x)
    masks = {g["tensor_fqn"]: sparsifier.get_mask(g["tensor_fqn"]).clone() for g in sparsifier.groups}
    weight = prepared.get_parameter("0.weight")
    squashed = sparsifier.squash_mask(params_to_keep=("sparsity_level",),
                                      params_to_keep_per_layer={"2": ("sparse_block_shape",)})
    assert squashed is prepared and prepared.get_parameter("0.weight") is weight
    assert not find_masked_uses(prepared) and "torch.mul" not in prepared.code
    assert not [n for n, _ in prepared.named_buffers() if n.endswith("_mask")]
    for fqn, mask in masks.items():
        assert torch.equal(prepared.get_parameter(fqn) == 0, mask == 0) or torch.all(prepared.get_parameter(fqn)[mask == 0] == 0)
    torch.testing.assert_close(prepared(x), y)
    assert prepared.get_submodule("0").sparse_params == {"sparsity_level": 0.5}
    assert prepared.get_submodule("2").sparse_params == {"sparsity_level": 0.5, "sparse_block_shape": (1, 4)}
    with pytest.raises(RuntimeError, match="squash_mask"):
        sparsifier.step()


# -- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("config, message", [
    ([{"tensor_fqn": "2.wieght"}], r"'2.wieght' is not a parameter or buffer of Sequential; nearest real tensor fqns: \['2.weight'"),
    ([{"tensor_fqn": "2"}], r"'2' names a module \(Linear\), not a tensor; name one of its tensors, e\.g\. \['2.weight', '2.bias'\]"),
    ([{"tensor_fqn": "0.weight"}, {"tensor_fqn": "0.weight"}], r"config\[1\]: tensor '0.weight' is configured twice"),
    ([{"sparsity_level": 0.5}], r"config\[0\] has no tensor_fqn: tensor_fqn is a required argument"),
    (["0.weight"], r"config\[0\] is a str; config elements should be dicts"),
    ([{"tensor_fqn": "0.weight", "module_fqn": "2"}], r"config\[0\]: given both `module_fqn`='2' and `tensor_fqn`='0.weight'; they must agree"),
    ([{"tensor_fqn": "0.weight", "sparsity_level": "0.5"}], r"sparsity_level"),
    ([{"tensor_fqn": "0.weight", "sparsity_level": float("nan")}], r"sparsity_level"),
    ([{"tensor_fqn": "0.weight", "sparse_block_shape": (0, 4)}], r"sparse_block_shape"),
    ([{"tensor_fqn": "0.weight", "sparse_block_shape": (2, 2), "zeros_per_block": 5.0}], r"zeros_per_block"),
    ([{"tensor_fqn": "0.bias"}], r"2-D"),
    ([{"tensor_fqn": "0.weight", "mask_dtype": torch.int8}], r"mask_dtype must be torch.bool or a floating dtype"),
])
def test_bad_config_is_rejected_and_model_untouched(config, message):
    model = mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message) as info:
        fxs.prepare_fx_sparse(model, fxs.WeightNormSparsifier(), config)
    if message.startswith(("config", "'2")):  # torch.ao raises AssertionError for the structural ones
        assert isinstance(info.value, AssertionError)
    assert_untouched(model, before)


def test_tied_tensor_configured_under_both_names():
    with pytest.raises(ValueError, match=r"configured as 'embed.weight' and as 'out.weight' \(tied"):
        fxs.prepare_fx_sparse(tied(), fxs.WeightNormSparsifier(), [{"tensor_fqn": "embed.weight"}, {"tensor_fqn": "out.weight"}])


def test_non_float_tensor_rejected():
    model = nn.Sequential(nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"'0.num_batches_tracked' has dtype torch.int64; only floating-point"):
        fxs.prepare_fx_sparse(model, fxs.WeightNormSparsifier(), [{"tensor_fqn": "0.num_batches_tracked"}])


def test_wrong_types():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        fxs.prepare_fx_sparse("model", fxs.WeightNormSparsifier())
    with pytest.raises(TypeError, match=r"torch.ao.pruning sparsifier\? use the fx_sparsity class"):
        fxs.prepare_fx_sparse(mlp(), ao.WeightNormSparsifier())
    with pytest.raises(TypeError, match="config must be a list of dicts"):
        fxs.prepare_fx_sparse(mlp(), fxs.WeightNormSparsifier(), {"tensor_fqn": "0.weight"})


def test_sparsifier_used_twice_and_step_before_prepare():
    sparsifier = fxs.WeightNormSparsifier()
    with pytest.raises(RuntimeError, match=re.escape("WeightNormSparsifier.step() called before prepare")):
        sparsifier.step()
    fxs.prepare_fx_sparse(mlp(), sparsifier)
    with pytest.raises(ValueError, match="already prepared"):
        fxs.prepare_fx_sparse(mlp(), sparsifier)


def test_constructor_arguments_checked():
    """Types at construction; the ranges torch.ao checks at step() are checked there (as in torch.ao)."""
    with pytest.raises(ValueError, match="sparsity_level"):
        fxs.WeightNormSparsifier(sparsity_level="0.1")
    with pytest.raises(ValueError, match="sparse_block_shape"):
        fxs.WeightNormSparsifier(sparse_block_shape=(1, 4, 2))
    with pytest.raises(ValueError, match="nearliness"):
        fxs.NearlyDiagonalSparsifier(nearliness=2.0)
    with pytest.warns(UserWarning, match=r"sparsity_level=-0.1 is outside \[0, 1\]; it acts as 0"):
        fxs.WeightNormSparsifier(sparsity_level=-0.1)
    for sparsifier in (fxs.WeightNormSparsifier(sparse_block_shape=(1, 4), zeros_per_block=5),
                       fxs.NearlyDiagonalSparsifier(nearliness=2)):
        fxs.prepare_fx_sparse(mlp(), sparsifier, [{"tensor_fqn": "2.weight"}])
        with pytest.raises(ValueError, match="zeros_per_block|nearliness"):
            sparsifier.step()


@pytest.mark.slow
def test_multihead_attention_weights_are_masked_and_a_mask_input_it_branches_on_is_reported():
    class WithMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x, padding=None):
            return self.attn(x, x, x, key_padding_mask=padding, need_weights=False)[0]

    torch.manual_seed(0)
    model, x = WithMHA().eval(), torch.randn(2, 3, 16)
    config = [{"tensor_fqn": "attn.in_proj_weight"}, {"tensor_fqn": "attn.out_proj.weight"}]
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
    # symbolic tracing makes `padding` a proxy, on which the attention branches: export sees through it
    with pytest.raises(RuntimeError, match=r"used inside the leaf module 'attn' \(MultiheadAttention\)(.|\n)*tracer=\"export\""):
        fxs.prepare_fx_sparse(model, fxs.WeightNormSparsifier(), config)
    prepared = fxs.prepare_fx_sparse(model, sparsifier, config, tracer="export", example_inputs=(x,))
    assert len(find_masked_uses(prepared)) == 2

    class NoMaskInput(WithMHA):
        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    plain = NoMaskInput()
    plain.load_state_dict(model.state_dict())
    symbolic = fxs.WeightNormSparsifier(sparsity_level=0.5)
    written_out = fxs.prepare_fx_sparse(plain, symbolic, config)  # traced into: its written-out form
    sparsifier.step()
    symbolic.step()
    for entry in config:
        assert torch.equal(symbolic.get_mask(entry["tensor_fqn"]), sparsifier.get_mask(entry["tensor_fqn"]))
    torch.testing.assert_close(written_out(x), prepared(x), rtol=1e-5, atol=1e-6)


def test_export_dead_reads_get_no_mask_and_squash_still_folds():
    """torch.export keeps a read of each tied name, unused: no mul there, yet squash folds the mask."""
    model = tied()
    tokens = torch.randint(0, 40, (3, 7))
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
    prepared = fxs.prepare_fx_sparse(model, sparsifier, [{"tensor_fqn": "embed.weight"}], tracer="export",
                                     example_inputs=(tokens,))
    sparsifier.step()
    dead = [n for n in prepared.graph.nodes if n.op == "get_attr" and not n.users]
    assert dead and not any(u.tensor in dead for u in find_masked_uses(prepared))
    expected = prepared.get_parameter("embed.weight") * prepared.get_buffer("embed.weight_mask")
    y = prepared(tokens)
    sparsifier.squash_mask()
    assert not [n for n, _ in prepared.named_buffers() if n.endswith("_mask")]
    assert torch.equal(prepared.get_parameter("embed.weight"), expected)
    torch.testing.assert_close(prepared(tokens), y)


def test_squash_folds_a_mask_no_graph_node_reads():
    """A configured tensor the forward never uses still has its mask folded and removed."""
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(8, 8)
            self.spare = nn.Linear(8, 8)

        def forward(self, x):
            return self.used(x)

    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
    prepared = fxs.prepare_fx_sparse(Unused(), sparsifier, [{"tensor_fqn": "spare.weight"}])
    sparsifier.step()
    expected = prepared.get_parameter("spare.weight") * sparsifier.get_mask("spare.weight")
    sparsifier.squash_mask()
    assert torch.equal(prepared.get_parameter("spare.weight"), expected)
    assert "spare.weight_mask" not in dict(prepared.named_buffers())


class _NoLinear(nn.Module):
    """Like SqueezeNet for the default config: convolutions only."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x).relu()


@pytest.mark.parametrize("config", [None, []], ids=["default", "empty"])
def test_nothing_configured_warns_and_every_step_is_a_no_op(config):
    model = _NoLinear()
    sparsifier = fxs.WeightNormSparsifier()
    expected = "has none" if config is None else "the config is empty"
    with pytest.warns(UserWarning, match=rf"no tensor is configured for sparsity \(.*{expected}\)") as record:
        prepared = fxs.prepare_fx_sparse(model, sparsifier, config)
    assert [w.filename for w in record if "no tensor is configured" in str(w.message)] == [__file__]
    assert sparsifier.groups == [] and sparsifier.model is prepared
    scheduler = fxs.CubicSL(sparsifier, total_t=3)
    x = torch.randn(1, 3, 8, 8)
    for _ in range(3):
        sparsifier.step()
        scheduler.step()
    assert torch.equal(prepared(x), model(x))
    assert sparsifier.squash_mask() is prepared
    assert sparsifier.state_dict() == {"state": {}, "groups": []}


def test_any_layer_whose_forward_traces_is_inlined():
    """Hugging Face's Conv1D (weight (in, out), addmm) has no entry in any table: its forward is traced."""
    class Conv1D(nn.Module):
        def __init__(self, nf, nx):
            super().__init__()
            self.nf = nf
            self.weight = nn.Parameter(torch.randn(nx, nf))
            self.bias = nn.Parameter(torch.zeros(nf))

        def forward(self, x):
            size_out = x.size()[:-1] + (self.nf,)
            x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
            return x.view(size_out)

    class KeepConv1D(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, Conv1D) or super().is_leaf_module(m, qualname)

    model = nn.Sequential(Conv1D(8, 16), nn.ReLU())
    gm = torch.fx.GraphModule(model, KeepConv1D().trace(model))  # a GraphModule passed in is used as is
    assert [n.op for n in gm.graph.nodes].count("call_module") == 2
    sparsifier = fxs.GlobalMagnitudeSparsifier(0.5)
    prepared = fxs.prepare_fx_sparse(gm, sparsifier, [{"tensor_fqn": "0.weight"}])
    assert [n.target for n in prepared.graph.nodes if n.op == "call_module"] == ["1"]
    sparsifier.step()
    x = torch.randn(2, 3, 16)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        masked[0].weight.mul_(prepared.get_buffer("0.weight_mask"))
    assert torch.allclose(prepared(x), masked(x), atol=1e-6)
    assert len(find_masked_uses(prepared)) == 1
