"""Sparsity with torch.ao.quantization's own flows (torch.ao's test_composability orders), and hooks kept by scopes."""
import warnings

import pytest
import torch
import torch.ao.quantization as tq
from torch import nn
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import fx_sparsity as fxs

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

BLOCKS = {"sparsity_level": 0.8, "sparse_block_shape": (1, 4), "zeros_per_block": 4}
CONFIG = [{"tensor_fqn": "5.weight", "sparsity_level": 0.7, "sparse_block_shape": (1, 4), "zeros_per_block": 4},
          {"tensor_fqn": "0.weight"}]
QCONFIG = tq.get_default_qconfig("fbgemm")


def quant_model(qconfig=None):
    """torch.ao's composability model: a float part, then QuantStub, a quantized Linear + ReLU, DeQuantStub."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), tq.QuantStub(), nn.Linear(4, 4),
                          nn.ReLU(), tq.DeQuantStub())
    if qconfig is not None:
        model[4].qconfig = model[5].qconfig = qconfig
    return model


def zeros(tensor):
    return float((tensor == 0).float().mean())


@pytest.fixture(autouse=True)
def fbgemm():
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("fbgemm is not available")
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"
    yield
    torch.backends.quantized.engine = before


@pytest.mark.slow
def test_eager_quantization_prepared_first_observes_the_masked_layer_and_converts_it_sparse():
    x = torch.randn(1, 4, 4, 4)
    model = tq.prepare(quant_model(QCONFIG))
    sparsifier = fxs.WeightNormSparsifier(**BLOCKS)
    prepared = fxs.prepare_fx_sparse(model, sparsifier, CONFIG, scope="layers", example_inputs=(x,))
    assert isinstance(prepared[5], torch.fx.GraphModule)
    sparsifier.step()
    observer = prepared[5].activation_post_process
    prepared(x)  # calibrating while masked: the layer's observer sees the masked outputs
    assert observer.max_val.item() == pytest.approx(prepared[5](prepared[:5](x)).max().item())
    plain = sparsifier.squash_mask()
    tq.convert(plain, inplace=True)
    assert isinstance(plain[5], torch.ao.nn.quantized.Linear)
    assert zeros(plain[5]._weight_bias()[0]) >= 0.7
    assert plain(x).shape == (1, 4, 4, 4)


def test_eager_quantization_prepared_while_masked_asks_for_a_second_prepare():
    x = torch.randn(1, 4, 4, 4)
    sparsifier = fxs.WeightNormSparsifier(**BLOCKS)
    prepared = fxs.prepare_fx_sparse(quant_model(QCONFIG), sparsifier, CONFIG, scope="layers", example_inputs=(x,))
    assert repr(prepared[5].qconfig) == repr(QCONFIG)  # the unit carries its layer's qconfig
    tq.prepare(prepared, inplace=True)  # eager quantization swaps and observes by type: not the graph module
    sparsifier.step()
    with pytest.warns(UserWarning, match=r"'5' \(Linear\) has a qconfig but no observer.*prepare again"):
        plain = sparsifier.squash_mask()
    tq.prepare(plain, inplace=True)
    plain(x)
    tq.convert(plain, inplace=True)
    assert isinstance(plain[5], torch.ao.nn.quantized.Linear)
    assert zeros(plain[5]._weight_bias()[0]) >= 0.7


def test_model_scope_refuses_eagerly_observed_layers_and_warns_for_a_qconfig():
    x = torch.randn(1, 4, 4, 4)
    observed = tq.prepare(quant_model(QCONFIG))
    before = {k: v.clone() for k, v in observed.state_dict().items()}
    with pytest.raises(fxs.SparsityConfigError, match=r"'5' \(Linear\) carries an output observer.*scope=\"layers\""):
        fxs.prepare_fx_sparse(observed, fxs.WeightNormSparsifier(**BLOCKS), CONFIG, example_inputs=(x,),
                              inplace=True)
    assert all(torch.equal(before[k], v) for k, v in observed.state_dict().items())
    with pytest.warns(UserWarning, match=r"'5' \(Linear\) has a qconfig for eager-mode"):
        fxs.prepare_fx_sparse(quant_model(QCONFIG), fxs.WeightNormSparsifier(**BLOCKS), CONFIG, example_inputs=(x,))


@pytest.mark.slow
def test_fx_quantization_of_the_prepared_model_folds_the_masks_into_the_quantized_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(256, 16)
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4), zeros_per_block=4)
    prepared = sparsifier.prepare(model, None, example_inputs=(x,))
    sparsifier.step()
    masks = [sparsifier.get_mask(f"{i}.weight").clone() for i in (0, 2, 4)]
    observed = prepare_fx(prepared, tq.get_default_qconfig_mapping("fbgemm"), (x,))
    assert observed.get_buffer("0.weight_mask") is sparsifier.get_mask("0.weight")  # later steps reach it
    observed(x)
    quantized = convert_fx(observed)
    packed = [n.target for n in quantized.graph.nodes if n.op == "get_attr" and "packed_weight" in n.target]
    assert len(packed) == 3
    for name, mask in zip(packed, masks):
        weight, _ = torch.ops.quantized.linear_unpack(getattr(quantized, name))
        assert torch.equal(weight.dequantize() == 0, mask == 0) or bool((weight.dequantize()[mask == 0] == 0).all())
    expected = prepared(x)
    assert (quantized(x) - expected).abs().max() < 0.05 * expected.abs().max()


def test_fx_quantization_first_names_the_fused_module_and_the_order_that_works():
    x = torch.randn(1, 4, 4, 4)
    qconfig_mapping = tq.QConfigMapping().set_module_name("4", QCONFIG).set_module_name("5", QCONFIG)
    observed = prepare_fx(quant_model(), qconfig_mapping, (x,))
    config = [{**CONFIG[0], "tensor_fqn": "5.0.weight"}, {"tensor_fqn": "0.0.weight"}]
    with pytest.raises(Exception, match=r"'0' \(LinearReLU\), a module torch.ao.quantization fused.*Prepare sparsity "
                                        r"first"):
        fxs.prepare_fx_sparse(observed, fxs.WeightNormSparsifier(**BLOCKS), config, example_inputs=(x,))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("scope", ["layers", _Block])
def test_scoped_units_keep_the_users_forward_hooks(scope):
    model = nn.Sequential(_Block(), _Block())
    seen = []
    handle = model[0].fc1.register_forward_hook(lambda m, args, out: seen.append(("fc1", tuple(out.shape))))
    model[0].register_forward_pre_hook(lambda m, args: seen.append(("block", tuple(args[0].shape))))
    x = torch.randn(2, 8)
    sparsifier = fxs.WeightNormSparsifier()
    config = [{"tensor_fqn": "0.fc1.weight"}, {"tensor_fqn": "1.fc2.weight"}]
    if scope == "layers":
        prepared = fxs.prepare_fx_sparse(model, sparsifier, config, scope=scope, inplace=True)
        assert isinstance(prepared[0].fc1, torch.fx.GraphModule)
        prepared(x)
        assert seen == [("block", (2, 8)), ("fc1", (2, 16))]
    else:  # a layer inside a traced block: its hook ran at trace time only, and prepare says so
        with pytest.warns(UserWarning, match=r"forward hooks on \['0.fc1'\] ran once while tracing"):
            prepared = fxs.prepare_fx_sparse(model, sparsifier, config, scope=scope, inplace=True)
        assert isinstance(prepared[0], torch.fx.GraphModule)
        seen.clear()
        prepared(x)
        assert seen == [("block", (2, 8))]
    handle.remove()  # a handle taken before prepare still removes the hook
    later = prepared[1].fc2 if scope == "layers" else prepared[1]
    assert isinstance(later, torch.fx.GraphModule)
    later.register_forward_hook(lambda m, args, out: seen.append(("added", tuple(out.shape))))
    seen.clear()
    prepared(x)
    assert seen == [("block", (2, 8)), ("added", (2, 8))]
    plain = sparsifier.squash_mask()
    assert plain is model and not isinstance(model[1], torch.fx.GraphModule)
    seen.clear()
    plain(x)
    assert seen == [("block", (2, 8)), ("added", (2, 8))]  # the hook added while prepared is on the layer now


def test_model_scope_keeps_the_roots_hooks_and_names_the_inner_ones_it_traced_through():
    model, x, seen = _Block(), torch.randn(2, 8), []
    model.register_forward_hook(lambda m, args, out: seen.append("root"))
    model.fc1.register_forward_hook(lambda m, args, out: seen.append("fc1"))
    with pytest.warns(UserWarning, match=r"forward hooks on \['fc1'\] ran once while tracing.*scope=\"layers\""):
        prepared = fxs.prepare_fx_sparse(model, fxs.WeightNormSparsifier(), example_inputs=(x,))
    seen.clear()
    prepared(x)
    assert seen == ["root"]


def test_a_fused_layer_observed_by_its_fused_parent_needs_no_second_prepare():
    x = torch.randn(1, 4, 4, 4)
    model = quant_model(QCONFIG)
    tq.fuse_modules(model, [["5", "6"]], inplace=True)  # LinearReLU: the observer sits on the fused module
    model[5].qconfig = QCONFIG
    tq.prepare(model, inplace=True)
    sparsifier = fxs.WeightNormSparsifier(**BLOCKS)
    fxs.prepare_fx_sparse(model, sparsifier, [{**CONFIG[0], "tensor_fqn": "5.0.weight"}], scope="layers",
                          example_inputs=(x,), inplace=True)
    sparsifier.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        plain = sparsifier.squash_mask()
    plain(x)
    tq.convert(plain, inplace=True)
    assert isinstance(plain[5], torch.ao.nn.intrinsic.quantized.LinearReLU)
    assert zeros(plain[5]._weight_bias()[0]) >= 0.7
