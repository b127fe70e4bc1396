"""format_sparse_graph / format_sparse_code: the annotated table and code, at every stage of the flow."""
import copy
import io
import pickle

import torch
from expecttest import TestCase
from models import mlp, tied
from torch import nn

import fx_sparsity as fxs
from fx_sparsity.printing import format_sparse_code


def prepared_mlp(tracer="symbolic", level=0.5):
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=level, sparse_block_shape=(1, 4))
    config = [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight", "sparsity_level": 0.75}]
    prepared = fxs.prepare_fx_sparse(mlp(), sparsifier, config, tracer=tracer,
                                     example_inputs=(torch.randn(2, 16),) if tracer == "export" else None)
    sparsifier.step()
    return prepared, sparsifier


class TestTable(TestCase):
    def test_prepared_mlp(self):
        prepared, _ = prepared_mlp()
        self.assertExpectedInline(fxs.format_sparse_graph(prepared, example_inputs=(torch.randn(8, 16),)), """\
node            op             target         shape        sparse tensor    level    block    zeros    lowered to
--------------  -------------  -------------  -----------  ---------------  -------  -------  -------  ------------
input_1         placeholder    input          f32[8, 16]
_0_weight       get_attr       0.weight       f32[32, 16]
_0_weight_mask  get_attr       0.weight_mask  f32[32, 16]
mul             call_function  torch.mul      f32[32, 16]  0.weight         50.0%    1x4      50.0%
_0_bias         get_attr       0.bias         f32[32]
linear          call_function  F.linear       f32[8, 32]
_1              call_module    1 (ReLU)       f32[8, 32]
_2_weight       get_attr       2.weight       f32[32, 32]
_2_weight_mask  get_attr       2.weight_mask  f32[32, 32]
mul_1           call_function  torch.mul      f32[32, 32]  2.weight         75.0%    1x4      75.0%
_2_bias         get_attr       2.bias         f32[32]
linear_1        call_function  F.linear       f32[8, 32]
_3              call_module    3 (ReLU)       f32[8, 32]
_4              call_module    4 (Linear)     f32[8, 10]
output          output                        f32[8, 10]

parameters: 1,930 total, 1,536 in 2 sparsified tensors
zeros: 1,024 = 66.7% of sparsified, 53.1% of all parameters
mask memory: 6.0 KiB in 2 buffers (f32)
model bytes (state_dict): 13.5 KiB including masks""")

    def test_squashed_mlp(self):
        prepared, sparsifier = prepared_mlp()
        sparsifier.squash_mask()
        self.assertExpectedInline(fxs.format_sparse_graph(prepared), """\
node       op             target      sparse tensor      level    block    zeros    lowered to
---------  -------------  ----------  -----------------  -------  -------  -------  ------------
input_1    placeholder    input
_0_weight  get_attr       0.weight    0.weight (folded)  50.0%    1x4      50.0%
_0_bias    get_attr       0.bias
linear     call_function  F.linear
_1         call_module    1 (ReLU)
_2_weight  get_attr       2.weight    2.weight (folded)  75.0%    1x4      75.0%
_2_bias    get_attr       2.bias
linear_1   call_function  F.linear
_3         call_module    3 (ReLU)
_4         call_module    4 (Linear)
output     output

parameters: 1,930 total, 1,536 in 2 sparsified tensors
zeros: 1,024 = 66.7% of sparsified, 53.1% of all parameters
mask memory: 0 B (masks folded into the weights)
model bytes (state_dict): 7.5 KiB""")

    def test_tied_weights(self):
        sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
        prepared = fxs.prepare_fx_sparse(tied(), sparsifier, [{"tensor_fqn": "embed.weight"}])
        sparsifier.step()
        self.assertExpectedInline(fxs.format_sparse_graph(prepared, example_inputs=(torch.tensor([[1, 2, 3]]),)),
                                  """\
node                 op             target             shape          sparse tensor    level    block    zeros    lowered to
-------------------  -------------  -----------------  -------------  ---------------  -------  -------  -------  ------------
tokens               placeholder    tokens             i64[1, 3]
embed_weight         get_attr       embed.weight       f32[40, 16]
embed_weight_mask    get_attr       embed.weight_mask  f32[40, 16]
mul                  call_function  torch.mul          f32[40, 16]    embed.weight     50.0%    1x4      50.0%
embedding            call_function  F.embedding        f32[1, 3, 16]
hidden               call_module    hidden (Linear)    f32[1, 3, 16]
tanh                 call_function  torch.tanh         f32[1, 3, 16]
out_weight           get_attr       out.weight         f32[40, 16]
embed_weight_mask_1  get_attr       embed.weight_mask  f32[40, 16]
mul_1                call_function  torch.mul          f32[40, 16]    embed.weight     50.0%    1x4      50.0%
linear               call_function  F.linear           f32[1, 3, 40]
output               output                            f32[1, 3, 40]

parameters: 912 total, 640 in 1 sparsified tensor
zeros: 320 = 50.0% of sparsified, 35.1% of all parameters
mask memory: 2.5 KiB in 1 buffer (f32)
model bytes (state_dict): 6.1 KiB including masks""")

    def test_export_traced(self):
        prepared, _ = prepared_mlp(tracer="export")
        self.assertExpectedInline(fxs.format_sparse_graph(prepared, example_inputs=(torch.randn(2, 16),)), """\
node            op             target                 shape          sparse tensor    level    block    zeros    lowered to
--------------  -------------  ---------------------  -------------  ---------------  -------  -------  -------  ------------
_0_weight       get_attr       0.weight               f32[32, 16]
_0_weight_mask  get_attr       0.weight_mask          f32[32, 16]
mul             call_function  torch.mul              f32[32, 16]    0.weight         50.0%    1x4      50.0%
_0_bias         get_attr       0.bias                 f32[32]
_2_weight       get_attr       2.weight               f32[32, 32]
_2_weight_mask  get_attr       2.weight_mask          f32[32, 32]
mul_1           call_function  torch.mul              f32[32, 32]    2.weight         75.0%    1x4      75.0%
_2_bias         get_attr       2.bias                 f32[32]
_4_weight       get_attr       4.weight               f32[10, 32]
_4_bias         get_attr       4.bias                 f32[10]
input_1         placeholder    input                  f32[2, 16]
_guards_fn      call_module    _guards_fn (GuardsFn)
linear          call_function  aten.linear.default    f32[2, 32]
relu            call_function  aten.relu.default      f32[2, 32]
linear_1        call_function  aten.linear.default    f32[2, 32]
relu_1          call_function  aten.relu.default      f32[2, 32]
linear_2        call_function  aten.linear.default    f32[2, 10]
output          output                                (f32[2, 10],)

parameters: 1,930 total, 1,536 in 2 sparsified tensors
zeros: 1,024 = 66.7% of sparsified, 53.1% of all parameters
mask memory: 6.0 KiB in 2 buffers (f32)
model bytes (state_dict): 13.5 KiB including masks""")

    def test_lowered_dynamic(self):
        prepared, _ = prepared_mlp()
        lowered = fxs.convert_fx_sparse(prepared)
        self.assertExpectedInline(fxs.format_sparse_graph(lowered, example_inputs=(torch.randn(8, 16),)), """\
node     op           target                            shape       sparse tensor    level    block    zeros    lowered to
-------  -----------  --------------------------------  ----------  ---------------  -------  -------  -------  ----------------------------
input_1  placeholder  input                             f32[8, 16]
_0       call_module  0 (SparseQuantizedDynamicLinear)  f32[8, 32]  0.weight         50.0%    1x4      50.0%    SparseQuantizedDynamicLinear
_1       call_module  1 (ReLU)                          f32[8, 32]
_2       call_module  2 (SparseQuantizedDynamicLinear)  f32[8, 32]  2.weight         75.0%    1x4      75.1%    SparseQuantizedDynamicLinear
_3       call_module  3 (ReLU)                          f32[8, 32]
_4       call_module  4 (Linear)                        f32[8, 10]
output   output                                         f32[8, 10]

parameters: 1,930 total, 1,536 in 2 sparsified tensors (lowered layers counted as their dense weights)
zeros: 1,025 = 66.7% of sparsified, 53.1% of all parameters
model bytes (state_dict): 7.5 KiB with the 2 lowered layers as dense float32 -> 3.0 KiB lowered (0.40x)""")

    def test_lowered_csr_from_squashed(self):
        prepared, sparsifier = prepared_mlp()
        lowered = fxs.convert_fx_sparse(sparsifier.squash_mask(), fxs.get_sparse_csr_mapping())
        self.assertExpectedInline(fxs.format_sparse_graph(lowered), """\
node     op           target               sparse tensor    level    block    zeros    lowered to
-------  -----------  -------------------  ---------------  -------  -------  -------  ---------------------
input_1  placeholder  input
_0       call_module  0 (SparseCSRLinear)  0.weight         50.0%    1x4      50.0%    SparseCSRLinear (csr)
_1       call_module  1 (ReLU)
_2       call_module  2 (SparseCSRLinear)  2.weight         75.0%    1x4      75.0%    SparseCSRLinear (csr)
_3       call_module  3 (ReLU)
_4       call_module  4 (Linear)
output   output

parameters: 1,930 total, 1,536 in 2 sparsified tensors (lowered layers counted as their dense weights)
zeros: 1,024 = 66.7% of sparsified, 53.1% of all parameters
model bytes (state_dict): 7.5 KiB with the 2 lowered layers as dense float32 -> 8.1 KiB lowered (1.07x)""")


class TestCodeView(TestCase):
    def test_symbolic(self):
        prepared, _ = prepared_mlp()
        self.assertExpectedInline(format_sparse_code(prepared), """\
class Sequential(torch.nn.Module):
    def forward(self, input):
        input_1 = input
        _0_weight = getattr(self, "0").weight
        _0_weight_mask = getattr(self, "0").weight_mask
        mul = torch.mul(_0_weight, _0_weight_mask);  _0_weight = _0_weight_mask = None  # <- mask 0.weight: 50.0% zeros (level 50.0%, 1x4)
        _0_bias = getattr(self, "0").bias
        linear = torch._C._nn.linear(input_1, mul, _0_bias);  input_1 = mul = _0_bias = None
        _1 = getattr(self, "1")(linear);  linear = None
        _2_weight = getattr(self, "2").weight
        _2_weight_mask = getattr(self, "2").weight_mask
        mul_1 = torch.mul(_2_weight, _2_weight_mask);  _2_weight = _2_weight_mask = None  # <- mask 2.weight: 75.0% zeros (level 75.0%, 1x4)
        _2_bias = getattr(self, "2").bias
        linear_1 = torch._C._nn.linear(_1, mul_1, _2_bias);  _1 = mul_1 = _2_bias = None
        _3 = getattr(self, "3")(linear_1);  linear_1 = None
        _4 = getattr(self, "4")(_3);  _3 = None
        return _4
""")

    def test_export(self):
        prepared, _ = prepared_mlp(tracer="export")
        self.assertExpectedInline(format_sparse_code(prepared), """\
class GraphModule(torch.nn.Module):
    def forward(self, input):
        input: "f32[s31, 16]";

        input, = fx_pytree.tree_flatten_spec(([input], {}), self._in_spec)
        _0_weight: "f32[32, 16]" = getattr(self, "0").weight
        _0_weight_mask = getattr(self, "0").weight_mask
        mul = torch.mul(_0_weight, _0_weight_mask);  _0_weight = _0_weight_mask = None  # <- mask 0.weight: 50.0% zeros (level 50.0%, 1x4)
        _0_bias: "f32[32]" = getattr(self, "0").bias
        _2_weight: "f32[32, 32]" = getattr(self, "2").weight
        _2_weight_mask = getattr(self, "2").weight_mask
        mul_1 = torch.mul(_2_weight, _2_weight_mask);  _2_weight = _2_weight_mask = None  # <- mask 2.weight: 75.0% zeros (level 75.0%, 1x4)
        _2_bias: "f32[32]" = getattr(self, "2").bias
        _4_weight: "f32[10, 32]" = getattr(self, "4").weight
        _4_bias: "f32[10]" = getattr(self, "4").bias
        input_1 = input
        _guards_fn = self._guards_fn(input_1);  _guards_fn = None
        linear: "f32[s31, 32]" = torch.ops.aten.linear.default(input_1, mul, _0_bias);  input_1 = mul = _0_bias = None
        relu: "f32[s31, 32]" = torch.ops.aten.relu.default(linear);  linear = None
        linear_1: "f32[s31, 32]" = torch.ops.aten.linear.default(relu, mul_1, _2_bias);  relu = mul_1 = _2_bias = None
        relu_1: "f32[s31, 32]" = torch.ops.aten.relu.default(linear_1);  linear_1 = None
        linear_2: "f32[s31, 10]" = torch.ops.aten.linear.default(relu_1, _4_weight, _4_bias);  relu_1 = _4_weight = _4_bias = None
        return pytree.tree_unflatten((linear_2,), self._out_spec)
""")

    def test_lowered(self):
        prepared, _ = prepared_mlp()
        self.assertExpectedInline(format_sparse_code(fxs.convert_fx_sparse(prepared)), """\
class GraphModule(torch.nn.Module):
    def forward(self, input):
        input_1 = input
        _0 = getattr(self, "0")(input_1);  input_1 = None  # <- lowered to SparseQuantizedDynamicLinear 0.weight: 50.0% zeros (level 50.0%, 1x4)
        _1 = getattr(self, "1")(_0);  _0 = None
        _2 = getattr(self, "2")(_1);  _1 = None  # <- lowered to SparseQuantizedDynamicLinear 2.weight: 75.1% zeros (level 75.0%, 1x4)
        _3 = getattr(self, "3")(_2);  _2 = None
        _4 = getattr(self, "4")(_3);  _3 = None
        return _4
""")


def mask_row(text, node_name):
    return next(line.split() for line in text.splitlines() if line.split()[:1] == [node_name])


class TestBehaviour(TestCase):
    def test_level_is_the_schedulers_live_level(self):
        sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.8)
        prepared = fxs.prepare_fx_sparse(mlp(), sparsifier, [{"tensor_fqn": "2.weight"}])
        scheduler = fxs.CubicSL(sparsifier, total_t=4, delta_t=1)
        levels = []
        for _ in range(3):
            sparsifier.step()
            scheduler.step()
            row = mask_row(fxs.format_sparse_graph(prepared), "mul")
            levels.append(row[4])
            self.assertEqual(row[4], f"{100 * sparsifier.groups[0]['sparsity_level']:.1f}%")
        self.assertEqual(len(set(levels)), 3)
        # After a load_state_dict the printed config follows the loaded groups.
        state = sparsifier.state_dict()
        state["groups"][0]["sparsity_level"] = 0.25
        sparsifier.load_state_dict(state)
        self.assertEqual(mask_row(fxs.format_sparse_graph(prepared), "mul")[4], "25.0%")

    def test_shape_propagation_leaves_the_module_as_it_was(self):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Dropout(0.5), nn.Linear(32, 4))
        sparsifier = fxs.WeightNormSparsifier()
        prepared = fxs.prepare_fx_sparse(model, sparsifier)
        sparsifier.step()
        prepared.train()
        meta_before = [(n.name, sorted(n.meta)) for n in prepared.graph.nodes]
        state_before = {k: v.clone() for k, v in prepared.state_dict().items()}
        x = torch.randn(8, 16)
        rng_before = torch.get_rng_state()  # dropout in train mode would draw from it
        text = fxs.format_sparse_graph(prepared, example_inputs=(x,))
        self.assertIn("f32[8, 32]", text)
        self.assertEqual([(n.name, sorted(n.meta)) for n in prepared.graph.nodes], meta_before)
        for k, v in prepared.state_dict().items():
            self.assertTrue(torch.equal(v, state_before[k]), k)
        self.assertTrue(torch.equal(torch.get_rng_state(), rng_before))
        self.assertTrue(all(m.training for m in prepared.modules()))

    def test_survives_pickle_and_deepcopy(self):
        prepared, _ = prepared_mlp()
        expected = fxs.format_sparse_graph(prepared)
        buffer = io.BytesIO()
        torch.save(prepared, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        self.assertEqual(fxs.format_sparse_graph(loaded), expected)  # node meta is gone; masks found by shape
        self.assertEqual(fxs.format_sparse_graph(copy.deepcopy(prepared)), expected)
        self.assertEqual(fxs.format_sparse_graph(pickle.loads(pickle.dumps(prepared))), expected)

    def test_bool_masks_and_print(self):
        sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
        prepared = fxs.prepare_fx_sparse(mlp(), sparsifier, [{"tensor_fqn": "0.weight", "mask_dtype": torch.bool}])
        sparsifier.step()
        out = io.StringIO()
        fxs.print_sparse_graph(prepared, file=out)
        self.assertIn("mask memory: 512 B in 1 buffer (b8)", out.getvalue())
        self.assertEqual(out.getvalue(), fxs.format_sparse_graph(prepared) + "\n")

    def test_plain_graph_module(self):
        text = fxs.format_sparse_graph(torch.fx.symbolic_trace(mlp()))
        self.assertIn("parameters: 1,930 total, 0 in 0 sparsified tensors", text)
        self.assertIn("model bytes (state_dict): 7.5 KiB", text)

    def test_errors(self):
        with self.assertRaisesRegex(TypeError, r"expects a torch.fx.GraphModule .* got Sequential; prepare the model"):
            fxs.format_sparse_graph(mlp())
        prepared, _ = prepared_mlp(tracer="export")
        with self.assertRaisesRegex(RuntimeError, r"example inputs do not run through the graph .*"
                                                  r"only in its dynamic dims"):
            fxs.format_sparse_graph(prepared, example_inputs=(torch.randn(3, 17),))
        # the batch dim is dynamic: another batch size prints
        assert "f32[3, 32]" in fxs.format_sparse_graph(prepared, example_inputs=(torch.randn(3, 16),))
        # keyword inputs work as well as positional ones
        by_keyword = fxs.format_sparse_graph(prepared, example_inputs={"input": torch.randn(2, 16)})
        assert by_keyword == fxs.format_sparse_graph(prepared, example_inputs=(torch.randn(2, 16),))
        with self.assertRaisesRegex(TypeError, r"the inputs do not match the graph's forward\(input\)"):
            fxs.format_sparse_graph(prepared, example_inputs={"x": torch.randn(2, 16)})
