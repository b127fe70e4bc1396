"""convert_fx_sparse: sparse Linears lowered to torch.ao's sparse-quantized ops (dynamic and static)."""
import copy
import io
import warnings

import pytest
import torch
import torch.ao.nn.sparse.quantized as ao_sparse
import torch.ao.pruning as ao_pruning
from expecttest import TestCase
from models import cnn, mlp, tied
from torch import nn
from torch.ao.quantization import default_dynamic_qconfig, get_default_qconfig

import fx_sparsity as fxs
from fx_sparsity.nn import (
    SparseQuantizedDynamicLinear,
    block_shape_supported,
    quantized_engine,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*quantize_per_tensor.*:UserWarning",  # torch deprecates quantized tensors; the kernels need them
    "ignore:Please use quant_min and quant_max:UserWarning",
)

DYNAMIC = fxs.get_dynamic_sparse_quantized_mapping()
STATIC = fxs.get_static_sparse_quantized_mapping()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def lowered_modules(gm):
    return {n.target: gm.get_submodule(n.target) for n in gm.graph.nodes if "lowered_to" in n.meta.get("sparsity", {})}


def prepared_mlp(level=0.8, seed=0, **kwargs):
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=level, **kwargs)
    prepared = fxs.prepare_fx_sparse(mlp(seed), sparsifier)
    sparsifier.step()
    return prepared, sparsifier


def encoder(seed=0):
    torch.manual_seed(seed)
    return nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True).eval()


ENCODER_CONFIG = [{"tensor_fqn": "linear1.weight"}, {"tensor_fqn": "linear2.weight"},
                  {"tensor_fqn": "self_attn.out_proj.weight"}]


@pytest.fixture(scope="module")
def prepared_encoder():
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
    prepared = fxs.prepare_fx_sparse(encoder(), sparsifier, ENCODER_CONFIG, tracer="export",
                                     example_inputs=(torch.randn(2, 8, 64),))
    sparsifier.step()
    return prepared


def torch_ao_dynamic(float_linear):
    """torch.ao's own path for one Linear whose weight is already masked: qconfig -> from_float."""
    lin = copy.deepcopy(float_linear)
    lin.qconfig = default_dynamic_qconfig
    with quantized_engine("qnnpack"):
        return ao_sparse.dynamic.Linear.from_float(lin)


def run_qnnpack(module, x):
    with quantized_engine("qnnpack"):
        return module(x)


def inputs_of(gm, example):
    """The input each lowered module sees when ``gm`` runs ``example``."""
    seen, handles = {}, []
    for fqn, module in lowered_modules(gm).items():
        handles.append(module.register_forward_pre_hook(lambda m, args, fqn=fqn: seen.setdefault(fqn, args[0])))
    gm(*example)
    for h in handles:
        h.remove()
    return seen


class TestDynamic(TestCase):
    def test_mlp_close_to_float_and_equal_to_torch_ao_pipeline(self):
        # torch.ao's whole flow on the same model: prune -> squash -> qconfig -> convert (from_float).
        config = [{"tensor_fqn": f"{i}.weight"} for i in (0, 2, 4)]
        reference = mlp()
        ao_sparsifier = ao_pruning.WeightNormSparsifier(sparsity_level=0.8)
        ao_sparsifier.prepare(reference, config)
        ao_sparsifier.step()
        ao_sparsifier.squash_mask(params_to_keep=("sparse_block_shape",))
        for i in (0, 2, 4):
            reference[i].qconfig = default_dynamic_qconfig
        with quantized_engine("qnnpack"):
            reference = torch.ao.quantization.convert(reference, mapping=DYNAMIC, inplace=False)

        prepared, _ = prepared_mlp(0.8)
        lowered = fxs.convert_fx_sparse(prepared)
        x = torch.randn(64, 16)
        self.assertLessEqual(rel(lowered(x), prepared(x)), 0.02)
        torch.testing.assert_close(lowered(x), run_qnnpack(reference, x), atol=1e-6, rtol=0)
        self.assertEqual(type(reference[0]), ao_sparse.dynamic.Linear)
        self.assertIsInstance(lowered.get_submodule("0"), ao_sparse.dynamic.Linear)

    def test_mlp_graph_code(self):
        prepared, _ = prepared_mlp()
        lowered = fxs.convert_fx_sparse(prepared)
        self.assertExpectedInline(lowered.code.strip(), """\
def forward(self, input):
    input_1 = input
    _0 = getattr(self, "0")(input_1);  input_1 = None
    _1 = getattr(self, "1")(_0);  _0 = None
    _2 = getattr(self, "2")(_1);  _1 = None
    _3 = getattr(self, "3")(_2);  _2 = None
    _4 = getattr(self, "4")(_3);  _3 = None
    return _4""")
        self.assertEqual(
            [(type(m).__name__) for _, m in lowered.named_children()],
            ["SparseQuantizedDynamicLinear", "ReLU", "SparseQuantizedDynamicLinear", "ReLU",
             "SparseQuantizedDynamicLinear"])

    def test_transformer_encoder_export(self):
        prepared = copy.deepcopy(self.prepared_encoder)
        lowered = fxs.convert_fx_sparse(prepared)
        self.assertEqual(sorted(lowered_modules(lowered)), ["linear1", "linear2", "self_attn.out_proj"])
        x = torch.randn(2, 8, 64)
        self.assertLessEqual(rel(lowered(x), prepared(x)), 0.02)
        # Each lowered layer computes what torch.ao's module built from the same weights computes.
        for fqn, seen in inputs_of(lowered, (x,)).items():
            float_linear = nn.Linear(*reversed(prepared.get_parameter(f"{fqn}.weight").shape))
            with torch.no_grad():
                float_linear.weight.copy_(prepared.get_parameter(f"{fqn}.weight") * prepared.get_buffer(f"{fqn}.weight_mask"))
                float_linear.bias.copy_(prepared.get_parameter(f"{fqn}.bias"))
            torch.testing.assert_close(lowered.get_submodule(fqn)(seen), run_qnnpack(torch_ao_dynamic(float_linear), seen),
                                       atol=1e-6, rtol=0)
        self.assertEqual(lowered(x).shape, (2, 8, 64))  # linear1/2 take 3-D input; out_proj a reshaped 2-D one

    @pytest.fixture(autouse=True)
    def _encoder(self, prepared_encoder):
        self.prepared_encoder = prepared_encoder

    def test_conv_and_linear_model(self):
        sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.7)
        prepared = fxs.prepare_fx_sparse(cnn(), sparsifier, [{"tensor_fqn": "fc.weight"}])
        sparsifier.step()
        lowered = fxs.convert_fx_sparse(prepared)
        x = torch.randn(8, 3, 8, 8)
        self.assertLessEqual(rel(lowered(x), prepared(x)), 0.02)
        self.assertIs(type(lowered.conv1), nn.Conv2d)  # not sparsified: left as it was
        self.assertTrue(torch.equal(lowered.conv2.weight, prepared.conv2.weight))
        self.assertEqual(sorted(lowered_modules(lowered)), ["fc"])

    def test_weight_sparsity_inside_packed_op_and_info(self):
        prepared, _ = prepared_mlp(0.8)
        lowered = fxs.convert_fx_sparse(prepared)
        for node in lowered.graph.nodes:
            if node.op != "call_module" or "sparsity" not in node.meta:
                continue
            module = lowered.get_submodule(node.target)
            stored = (module.weight().int_repr() == 0).float().mean().item()  # weight() unpacks
            mask = prepared.get_buffer(node.meta["sparsity"]["tensor_fqn"] + "_mask")
            self.assertGreaterEqual(stored, (mask == 0).float().mean().item())
            self.assertGreaterEqual(stored, 0.8 - 4 / mask.numel())  # the level, to one 1x4 block
            self.assertEqual(node.meta["sparsity"], module.fx_sparsity_info)
            self.assertEqual(node.meta["sparsity"]["lowered_to"], "SparseQuantizedDynamicLinear")
            self.assertEqual(node.meta["sparsity"]["weight_sparsity"], stored)
            self.assertEqual(module.weight().q_zero_point(), 0)
            self.assertEqual(module._weight_bias()[2:], (1, 4))

    def test_dense_weight_mask_and_bias_are_gone(self):
        prepared, _ = prepared_mlp()
        lowered = fxs.convert_fx_sparse(prepared)
        self.assertEqual(list(lowered.parameters()), [])
        self.assertEqual(list(lowered.buffers()), [])
        self.assertFalse(any(k.endswith(("weight", "weight_mask", "bias")) for k in lowered.state_dict()))
        self.assertFalse(any(n.op == "get_attr" for n in lowered.graph.nodes))

    def test_tied_weight_is_kept_and_said(self):
        sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
        prepared = fxs.prepare_fx_sparse(tied(), sparsifier, [{"tensor_fqn": "out.weight"}, {"tensor_fqn": "hidden.weight"}])
        sparsifier.step()
        with pytest.warns(UserWarning, match=r"'out.weight' is also read by \['embedding'\]"):
            lowered = fxs.convert_fx_sparse(prepared)
        tokens = torch.randint(0, 40, (3, 5))
        self.assertLessEqual(rel(lowered(tokens), prepared(tokens)), 0.02)
        self.assertIn("out.weight_mask", lowered.state_dict())  # the embedding still reads weight * mask
        self.assertTrue(lowered.out.weight_lowered.fx_sparsity_info["dense_weight_kept"])
        self.assertIsInstance(lowered.hidden, SparseQuantizedDynamicLinear)

    def test_weight_used_twice_gets_one_module(self):
        class Twice(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(16, 16)

            def forward(self, x):
                return self.fc(torch.relu(self.fc(x)))

        torch.manual_seed(0)
        sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
        prepared = fxs.prepare_fx_sparse(Twice(), sparsifier)
        sparsifier.step()
        lowered = fxs.convert_fx_sparse(prepared)
        self.assertEqual([n.target for n in lowered.graph.nodes if n.op == "call_module"], ["fc", "fc"])
        x = torch.randn(4, 16)
        self.assertLessEqual(rel(lowered(x), prepared(x)), 0.02)

    def test_squashed_module(self):
        prepared, sparsifier = prepared_mlp()
        x = torch.randn(32, 16)
        expected = fxs.convert_fx_sparse(prepared)(x)
        sparsifier.squash_mask(params_to_keep=("sparse_block_shape",))
        self.assertFalse(any(k.endswith("_mask") for k in prepared.state_dict()))
        lowered = fxs.convert_fx_sparse(prepared)
        self.assertEqual(sorted(lowered_modules(lowered)), ["0", "2", "4"])
        torch.testing.assert_close(lowered(x), expected, atol=0, rtol=0)

    def test_squashed_torch_ao_style_sparse_params_only(self):
        # A module whose sparsity is known only from sparse_params (torch.ao's convention).
        prepared, sparsifier = prepared_mlp()
        sparsifier.squash_mask(params_to_keep_per_layer={"2": ("sparse_block_shape",)})
        del prepared.fx_sparsity_config
        lowered = fxs.convert_fx_sparse(prepared)
        self.assertEqual(sorted(lowered_modules(lowered)), ["2"])
        self.assertIs(type(lowered.get_submodule("0")), nn.Linear)

    def test_observers_in_the_graph_are_dropped(self):
        sparsifier = fxs.WandaSparsifier(sparsity_level=0.5)
        prepared = fxs.prepare_fx_sparse(mlp(), sparsifier)
        x = torch.randn(32, 16)
        prepared(x)  # Wanda's input observers collect statistics
        sparsifier.step()
        lowered = fxs.convert_fx_sparse(prepared)
        self.assertEqual(sorted(lowered_modules(lowered)), ["0", "2", "4"])
        self.assertNotIn("observer", lowered.code)
        self.assertIn("observer", prepared.code)  # the prepared module keeps them
        self.assertLessEqual(rel(lowered(x), prepared(x)), 0.02)

    def test_sparsifier_convert_delegates(self):
        prepared, sparsifier = prepared_mlp()
        lowered = sparsifier.convert(prepared)
        self.assertIsInstance(lowered.get_submodule("0"), SparseQuantizedDynamicLinear)

    def test_inplace(self):
        prepared, _ = prepared_mlp()
        code, state = prepared.code, {k: v.clone() for k, v in prepared.state_dict().items()}
        fxs.convert_fx_sparse(prepared)
        self.assertEqual(prepared.code, code)
        self.assertEqual(prepared.state_dict().keys(), state.keys())
        self.assertTrue(all(torch.equal(prepared.state_dict()[k], v) for k, v in state.items()))
        self.assertIs(fxs.convert_fx_sparse(prepared, inplace=True), prepared)
        self.assertIsInstance(prepared.get_submodule("0"), SparseQuantizedDynamicLinear)

    def test_block_shape_tiled_by_the_kernel_shape(self):
        prepared, _ = prepared_mlp(0.5, sparse_block_shape=(2, 8))
        lowered = fxs.convert_fx_sparse(prepared)
        module = lowered.get_submodule("0")
        self.assertEqual(module.fx_sparsity_info["sparse_block_shape"], (2, 8))  # the group's
        self.assertEqual(module._weight_bias()[2:], (1, 4))  # the kernel's, whose zero blocks tile (2, 8) ones
        self.assertGreaterEqual(module.fx_sparsity_info["weight_sparsity"], 0.5)
        x = torch.randn(8, 16)
        self.assertLessEqual(rel(lowered(x), prepared(x)), 0.02)

    def test_stale_requantization_scales_are_worked_around(self):
        # torch's qnnpack kernel keeps the requantization scales of a previous input when the
        # input scale returns to the first call's; our modules prime the kernel against it.
        prepared, _ = prepared_mlp()
        lowered = fxs.convert_fx_sparse(prepared)
        x, y = torch.randn(8, 16), 10 * torch.randn(8, 16)
        first = lowered(x)
        lowered(y)
        torch.testing.assert_close(lowered(x), first, atol=0, rtol=0)

    def test_one_d_and_other_dtypes(self):
        prepared, _ = prepared_mlp()
        module = fxs.convert_fx_sparse(prepared).get_submodule("0")
        x = torch.randn(3, 16)
        torch.testing.assert_close(module(x[0]), module(x[:1])[0])
        self.assertEqual(module(x.double()).dtype, torch.float64)


class TestStatic(TestCase):
    def calibration(self, shape, n=8, seed=1):
        g = torch.Generator().manual_seed(seed)
        return [(torch.randn(*shape, generator=g),) for _ in range(n)]

    def test_mlp_close_to_float_graph_stays_quantized_between_linears(self):
        prepared, _ = prepared_mlp(0.8)
        lowered = fxs.convert_fx_sparse(prepared, STATIC, calibration_data=self.calibration((64, 16)))
        x = torch.randn(64, 16)
        self.assertLessEqual(rel(lowered(x), prepared(x)), 0.05)
        self.assertExpectedInline(lowered.code.strip(), """\
def forward(self, input):
    input_1 = input
    _0_quantize = getattr(self, "0_quantize")(input_1);  input_1 = None
    _0 = getattr(self, "0")(_0_quantize);  _0_quantize = None
    relu = torch.relu(_0);  _0 = None
    _2 = getattr(self, "2")(relu);  relu = None
    relu_1 = torch.relu(_2);  _2 = None
    _4 = getattr(self, "4")(relu_1);  relu_1 = None
    _4_dequantize = getattr(self, "4_dequantize")(_4);  _4 = None
    return _4_dequantize""")
        self.assertIsInstance(lowered.get_submodule("2"), ao_sparse.Linear)
        self.assertFalse(hasattr(lowered, "1"))  # the float ReLU modules went with the dequantize/quantize pairs
        self.assertEqual(lowered.get_submodule("2").weight().qscheme(), torch.per_channel_affine)

    def test_single_linear_equal_to_torch_ao(self):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 24))
        sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.6)
        prepared = fxs.prepare_fx_sparse(model, sparsifier)
        sparsifier.step()
        calibration = self.calibration((16, 32))
        lowered = fxs.convert_fx_sparse(prepared, STATIC, calibration_data=calibration)

        # torch.ao's path: squashed Linear with qconfig and a calibrated output observer -> from_float;
        # the input is quantized with a calibrated input observer, as a QuantStub would.
        qconfig = get_default_qconfig("fbgemm")
        float_linear = copy.deepcopy(model[0])
        with torch.no_grad():
            float_linear.weight.mul_(prepared.get_buffer("0.weight_mask"))
        float_linear.qconfig = qconfig
        float_linear.sparse_params = {"sparse_block_shape": (1, 4)}
        float_linear.activation_post_process = qconfig.activation()
        input_observer = qconfig.activation()
        with torch.no_grad():
            for (x,) in calibration:
                float_linear.activation_post_process(float_linear(input_observer(x)))
        with quantized_engine("fbgemm"):
            reference = ao_sparse.Linear.from_float(float_linear)
            scale, zero_point = input_observer.calculate_qparams()
            x = torch.randn(16, 32)
            expected = reference(torch.quantize_per_tensor(x, float(scale), int(zero_point), torch.quint8)).dequantize()
        torch.testing.assert_close(lowered(x), expected, atol=1e-6, rtol=0)
        self.assertLessEqual(rel(lowered(x), prepared(x)), 0.05)

    def test_transformer_encoder_export(self):
        prepared = copy.deepcopy(self.prepared_encoder)
        lowered = fxs.convert_fx_sparse(prepared, STATIC, calibration_data=self.calibration((2, 8, 64)))
        x = torch.randn(2, 8, 64)
        self.assertLessEqual(rel(lowered(x), prepared(x)), 0.05)
        # linear1 -> relu -> (identity dropout) -> linear2 stays quantized; out_proj is quantized on its own.
        code = lowered.code
        self.assertIn("linear2 = self.linear2(relu_1)", code)
        self.assertEqual(code.count("_quantize("), 2)
        self.assertEqual(code.count("_dequantize("), 2)

    @pytest.fixture(autouse=True)
    def _encoder(self, prepared_encoder):
        self.prepared_encoder = prepared_encoder

    def test_conv_and_linear_model(self):
        sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.7)
        prepared = fxs.prepare_fx_sparse(cnn(), sparsifier, [{"tensor_fqn": "fc.weight"}])
        sparsifier.step()
        lowered = fxs.convert_fx_sparse(prepared, STATIC, calibration_data=self.calibration((8, 3, 8, 8)))
        x = torch.randn(8, 3, 8, 8)
        self.assertLessEqual(rel(lowered(x), prepared(x)), 0.05)
        self.assertIs(type(lowered.conv2), nn.Conv2d)

    def test_calibration_leaves_prepared_and_modes_alone(self):
        prepared, _ = prepared_mlp()
        prepared.train()
        code = prepared.code
        fxs.convert_fx_sparse(prepared, STATIC, calibration_data=self.calibration((4, 16), n=2))
        self.assertEqual(prepared.code, code)
        self.assertTrue(prepared.training)
        self.assertFalse(any("activation_post_process" in n for n, _ in prepared.named_modules()))

    def test_static_needs_calibration_data(self):
        prepared, _ = prepared_mlp()
        with self.assertRaisesRegex(fxs.SparsityConfigError, "needs calibration_data"):
            fxs.convert_fx_sparse(prepared, STATIC)
        with self.assertRaisesRegex(fxs.SparsityConfigError, "calibration_data is one tensor"):
            fxs.convert_fx_sparse(prepared, STATIC, calibration_data=torch.randn(4, 16))
        code = prepared.code
        with self.assertRaisesRegex(fxs.SparsityConfigError, "calibration_data is empty"):
            fxs.convert_fx_sparse(prepared, STATIC, calibration_data=iter([]), inplace=True)
        self.assertEqual(prepared.code, code)  # observers taken out again
        self.assertFalse(any("activation_post_process" in n for n, _ in prepared.named_modules()))


def lowered_pair(mapping, **kwargs):
    """Two lowered MLPs with different weights, same structure."""
    return [fxs.convert_fx_sparse(prepared_mlp(0.7, seed=seed)[0], mapping, **kwargs) for seed in (0, 1)]


CALIBRATION = [(torch.randn(16, 16),) for _ in range(4)]


@pytest.mark.parametrize("mapping", [DYNAMIC, STATIC], ids=["dynamic", "static"])
def test_state_dict_round_trip_into_a_fresh_lowered_module(mapping):
    source, fresh = lowered_pair(mapping, calibration_data=CALIBRATION)
    x = torch.randn(8, 16)
    assert not torch.equal(source(x), fresh(x))
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))  # weights_only: plain (quantized) tensors, no pickled modules
    torch.testing.assert_close(fresh(x), source(x), atol=0, rtol=0)


@pytest.mark.parametrize("mapping", [DYNAMIC, STATIC], ids=["dynamic", "static"])
@pytest.mark.parametrize("load_engine", ["x86", "fbgemm", "qnnpack"])
def test_save_load_whole_module_under_another_engine(mapping, load_engine):
    lowered = fxs.convert_fx_sparse(prepared_mlp()[0], mapping, calibration_data=CALIBRATION)
    x = torch.randn(8, 16)
    expected = lowered(x)
    buffer = io.BytesIO()
    torch.save(lowered, buffer)
    buffer.seek(0)
    with quantized_engine(load_engine):
        loaded = torch.load(buffer, weights_only=False)
        torch.testing.assert_close(loaded(x), expected, atol=0, rtol=0)
        assert torch.backends.quantized.engine == load_engine
    torch.testing.assert_close(copy.deepcopy(loaded)(x), expected, atol=0, rtol=0)


@pytest.mark.parametrize("engine", torch.backends.quantized.supported_engines)
def test_right_answer_and_engine_unchanged_whatever_the_global_engine(engine):
    dynamic = fxs.convert_fx_sparse(prepared_mlp()[0])
    static = fxs.convert_fx_sparse(prepared_mlp()[0], STATIC, calibration_data=CALIBRATION)
    x = torch.randn(8, 16)
    expected = dynamic(x), static(x)
    with quantized_engine(engine):
        torch.testing.assert_close((dynamic(x), static(x)), expected, atol=0, rtol=0)
        assert torch.backends.quantized.engine == engine
        with pytest.raises(RuntimeError):
            dynamic(torch.randn(8, 5))  # wrong width: the kernel raises ...
        assert torch.backends.quantized.engine == engine  # ... and the engine is still restored


class TestErrors(TestCase):
    def test_unsupported_block_shape_names_layers_and_working_shapes(self):
        self.assertTrue(block_shape_supported("qnnpack", (1, 4)))
        self.assertTrue(block_shape_supported("fbgemm", (1, 4)))
        self.assertFalse(block_shape_supported("qnnpack", (8, 1)))  # documented by torch, fails on this build
        self.assertFalse(block_shape_supported("fbgemm", (8, 1)))
        sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(8, 1))
        prepared = fxs.prepare_fx_sparse(mlp(), sparsifier, [{"tensor_fqn": "0.weight"},
                                                              {"tensor_fqn": "2.weight", "sparse_block_shape": (1, 4),
                                                               "zeros_per_block": 4}])
        sparsifier.step()
        code = prepared.code
        for mapping in (DYNAMIC, STATIC):
            with self.assertRaisesRegex(fxs.SparsityConfigError,
                                        r"runs only block shapes \[\(1, 4\)\] .*; torch also documents \[\(8, 1\)\], "
                                        r"which fail to run here. Layers with other shapes:\n  '0.weight': "
                                        r"sparse_block_shape=\(8, 1\)\nSparsify them with sparse_block_shape=\(1, 4\)") as ctx:
                fxs.convert_fx_sparse(prepared, mapping, calibration_data=CALIBRATION, inplace=True)
            self.assertNotIn("2.weight", str(ctx.exception))
        self.assertEqual(prepared.code, code)  # refused before anything was modified

    def test_bad_mappings(self):
        prepared, _ = prepared_mlp()
        with self.assertRaisesRegex(fxs.SparsityConfigError, "lowers Linear layers only"):
            fxs.convert_fx_sparse(prepared, {**DYNAMIC, nn.Conv2d: ao_sparse.dynamic.Linear})
        with self.assertRaisesRegex(fxs.SparsityConfigError, "no torch.nn.Linear entry"):
            fxs.convert_fx_sparse(prepared, {})
        with self.assertRaisesRegex(fxs.SparsityConfigError, "cannot lower to torch.nn.modules.linear.Linear"):
            fxs.convert_fx_sparse(prepared, {nn.Linear: nn.Linear})
        with self.assertRaisesRegex(TypeError, "lowers the GraphModule returned by prepare_fx_sparse"):
            fxs.convert_fx_sparse(mlp())

    def test_nothing_sparse_warns(self):
        sparsifier = fxs.WeightNormSparsifier()
        prepared = fxs.prepare_fx_sparse(cnn(), sparsifier, [{"tensor_fqn": "fc.weight"}])
        sparsifier.squash_mask()
        del prepared.fx_sparsity_config
        with pytest.warns(UserWarning, match="no Linear over a sparse weight"):
            lowered = fxs.convert_fx_sparse(prepared)
        self.assertIs(type(lowered.fc), nn.Linear)


class TestFromMaskedTargets(TestCase):
    def test_target_with_from_masked_is_used(self):
        class DenseMasked(nn.Module):
            def __init__(self, weight, bias):
                super().__init__()
                self.weight, self.bias = nn.Parameter(weight), bias

            @classmethod
            def from_masked(cls, weight, mask, bias, *, sparse_block_shape):
                assert sparse_block_shape == (1, 4)
                return cls(weight * mask, bias)

            def forward(self, x):
                return nn.functional.linear(x, self.weight, self.bias)

        prepared, _ = prepared_mlp()
        lowered = fxs.convert_fx_sparse(prepared, {nn.Linear: DenseMasked})
        x = torch.randn(4, 16)
        torch.testing.assert_close(lowered(x), prepared(x))
        info = lowered.get_submodule("2").fx_sparsity_info
        self.assertEqual(info["lowered_to"], "DenseMasked")
        self.assertAlmostEqual(info["weight_sparsity"], (prepared.get_buffer("2.weight_mask") == 0).float().mean().item())


@pytest.mark.parametrize("mapping", ["dynamic", "static", "csr"])
def test_back_to_back_linears(mapping):
    """Linear feeding Linear directly: each lowered layer reads the one lowered before it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8))
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
    prepared = fxs.prepare_fx_sparse(model, sparsifier)
    sparsifier.step()
    x = torch.randn(8, 16)
    kwargs = {}
    if mapping == "static":
        kwargs["calibration_data"] = [(torch.randn(8, 16),) for _ in range(4)]
    target = {"dynamic": DYNAMIC, "static": STATIC, "csr": fxs.get_sparse_csr_mapping()}[mapping]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowered = fxs.convert_fx_sparse(prepared, target, **kwargs)
        assert len(lowered_modules(lowered)) == 3
        assert rel(lowered(x), prepared(x)) < {"dynamic": 0.02, "static": 0.05, "csr": 1e-5}[mapping]


@torch.fx.wrap
def _hidden_linear(x, weight, bias):
    """A linear the symbolic tracer cannot see into (as torchvision's shifted_window_attention)."""
    return torch.nn.functional.linear(x, weight, bias)


class _HiddenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(16, 16)
        self.outer = nn.Linear(16, 8)

    def forward(self, x):
        return self.outer(_hidden_linear(x, self.inner.weight, self.inner.bias))


@pytest.mark.parametrize("mapping", [None, fxs.get_sparse_csr_mapping()], ids=["dynamic", "csr"])
def test_sparse_tensors_left_unlowered_are_named(mapping):
    torch.manual_seed(0)
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.8)
    prepared = fxs.prepare_fx_sparse(_HiddenLinear(), sparsifier)
    sparsifier.step()
    with pytest.warns(UserWarning, match=r"1 of 2 sparse tensors stay unlowered(.|\n)*'inner.weight' read by "
                                         r"_hidden_linear \(_hidden_linear\)") as record:
        lowered = fxs.convert_fx_sparse(prepared, mapping)
    ours = [w for w in record if "stay unlowered" in str(w.message)]
    assert [w.filename for w in ours] == [__file__]  # one warning, at the user's convert_fx_sparse call
    assert [n.target for n in lowered.graph.nodes if n.op == "call_module"] == ["outer"]
    x = torch.randn(4, 16)
    assert torch.allclose(lowered(x), prepared(x), rtol=0.05, atol=0.05)
