"""The pass library (``fx_sparsity.passes``), one pass at a time, on small graphs.

Each test builds a small GraphModule (``fx.symbolic_trace`` or a tracer with chosen leaf
modules), runs one pass and checks the exact code after it against the before/after
shape the pass module's docstring promises, and that the module computes what it did.
"""
import expecttest
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.ao.nn.quantized import DeQuantize, Quantize
from torch.ao.quantization import MinMaxObserver
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fx_sparsity.passes import (
    INFO_ATTR,
    ChannelNormObserver,
    FoldMasks,
    InlineModules,
    InsertMasks,
    InsertObservers,
    LowerSparseLinears,
    MaskInsertionError,
    MaskSpec,
    Observation,
    ObservedNode,
    QuantizeBoundaries,
    RemoveObservers,
    find_masked_uses,
    find_sparse_linears,
    fold_masks,
    inline_modules,
    insert_masks,
    observe_linear_inputs,
    observe_linears,
    prepare_masks,
    remove_observers,
    run_passes,
)


def ALL(fqn, module):
    """Inline every call_module."""
    return True


def code(gm: fx.GraphModule) -> str:
    return gm.code.strip()


def trace(model: nn.Module, leaves: tuple = ()) -> fx.GraphModule:
    """``symbolic_trace``, with modules of the types in ``leaves`` also kept as call_module."""
    class Tracer(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, leaves) or super().is_leaf_module(m, qualname)

    return fx.GraphModule(model, Tracer().trace(model))


def call_modules(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_module"]


def muls(gm: fx.GraphModule) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.mul]


class Wrap(nn.Module):
    """``forward(x) = layer(x)``: one call_module after ``symbolic_trace``."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


class MLP(nn.Module):
    """fc1 -> relu -> fc2."""

    def __init__(self, relu=True):
        super().__init__()
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, 4)
        self.relu = relu

    def forward(self, x):
        h = self.fc1(x)
        if self.relu:
            h = torch.relu(h)
        return self.fc2(h)


class Tied(nn.Module):
    """An embedding whose weight is also the weight of two linear heads."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head1 = nn.Linear(4, 10, bias=False)
        self.head2 = nn.Linear(4, 10)
        self.head1.weight = self.emb.weight
        self.head2.weight = self.emb.weight

    def forward(self, tokens):
        h = self.emb(tokens)
        return self.head1(h) + self.head2(torch.tanh(h))


def tokens():
    return torch.tensor([[1, 2, 3], [4, 5, 9]])


def inlined(model, *inputs):
    """(traced model with every call_module inlined, the model's output before inlining)."""
    with torch.no_grad():
        ref = model(*inputs)
    gm = inline_modules(fx.symbolic_trace(model), ALL)
    return gm, ref


def assert_same(gm, ref, *inputs):
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), ref, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------- InlineModules


class TestInlineModules(expecttest.TestCase):
    def setUp(self):
        torch.manual_seed(0)

    def test_linear_with_bias(self):
        model, x = Wrap(nn.Linear(4, 3)), torch.randn(2, 4)
        ref = model(x)
        gm = fx.symbolic_trace(model)
        self.assertExpectedInline(code(gm), """\
def forward(self, x):
    layer = self.layer(x);  x = None
    return layer""")
        inlining = InlineModules(ALL)
        self.assertIs(run_passes(gm, inlining), gm)
        self.assertExpectedInline(code(gm), """\
def forward(self, x):
    layer_weight = self.layer.weight
    layer_bias = self.layer.bias
    linear = torch._C._nn.linear(x, layer_weight, layer_bias);  x = layer_weight = layer_bias = None
    return linear""")
        self.assertEqual(inlining.not_inlined, {})
        assert_same(gm, ref, x)

    def test_linear_without_bias(self):
        model, x = Wrap(nn.Linear(4, 3, bias=False)), torch.randn(2, 4)
        ref = model(x)
        gm = inline_modules(fx.symbolic_trace(model), ALL)
        self.assertExpectedInline(code(gm), """\
def forward(self, x):
    layer_weight = self.layer.weight
    linear = torch._C._nn.linear(x, layer_weight, None);  x = layer_weight = None
    return linear""")
        assert_same(gm, ref, x)

    def test_conv2d_zeros(self):
        model, x = Wrap(nn.Conv2d(2, 3, 3, padding=1, padding_mode="zeros")), torch.randn(1, 2, 5, 5)
        gm, ref = inlined(model, x)
        self.assertExpectedInline(code(gm), """\
def forward(self, x):
    layer_weight = self.layer.weight
    layer_bias = self.layer.bias
    conv2d = torch.conv2d(x, layer_weight, layer_bias, (1, 1), (1, 1), (1, 1), 1);  x = layer_weight = layer_bias = None
    return conv2d""")
        assert_same(gm, ref, x)

    def test_conv2d_reflect(self):
        model, x = Wrap(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")), torch.randn(1, 2, 5, 5)
        gm, ref = inlined(model, x)
        self.assertExpectedInline(code(gm), """\
def forward(self, x):
    layer_weight = self.layer.weight
    layer_bias = self.layer.bias
    pad = torch.nn.functional.pad(x, (1, 1, 1, 1), mode = 'reflect', value = None);  x = None
    conv2d = torch.conv2d(pad, layer_weight, layer_bias, (1, 1), (0, 0), (1, 1), 1);  pad = layer_weight = layer_bias = None
    return conv2d""")
        assert_same(gm, ref, x)

    def test_conv2d_circular(self):
        model, x = Wrap(nn.Conv2d(2, 3, (3, 1), padding=(1, 2), padding_mode="circular")), torch.randn(1, 2, 5, 5)
        gm, ref = inlined(model, x)
        self.assertExpectedInline(code(gm), """\
def forward(self, x):
    layer_weight = self.layer.weight
    layer_bias = self.layer.bias
    pad = torch.nn.functional.pad(x, (2, 2, 1, 1), mode = 'circular', value = None);  x = None
    conv2d = torch.conv2d(pad, layer_weight, layer_bias, (1, 1), (0, 0), (1, 1), 1);  pad = layer_weight = layer_bias = None
    return conv2d""")
        assert_same(gm, ref, x)

    def test_embedding_layernorm_bilinear(self):
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = nn.Embedding(10, 4, padding_idx=0)
                self.ln = nn.LayerNorm(4)
                self.bil = nn.Bilinear(4, 4, 3)

            def forward(self, tokens):
                h = self.ln(self.emb(tokens))
                return self.bil(h, torch.tanh(h))

        model = M()
        gm, ref = inlined(model, tokens())
        self.assertExpectedInline(code(gm), """\
def forward(self, tokens):
    emb_weight = self.emb.weight
    embedding = torch.nn.functional.embedding(tokens, emb_weight, padding_idx = 0, max_norm = None, norm_type = 2.0, scale_grad_by_freq = False, sparse = False);  tokens = emb_weight = None
    ln_weight = self.ln.weight
    ln_bias = self.ln.bias
    layer_norm = torch.nn.functional.layer_norm(embedding, (4,), weight = ln_weight, bias = ln_bias, eps = 1e-05);  embedding = ln_weight = ln_bias = None
    tanh = torch.tanh(layer_norm)
    bil_weight = self.bil.weight
    bil_bias = self.bil.bias
    bilinear = torch.bilinear(layer_norm, tanh, bil_weight, bil_bias);  layer_norm = tanh = bil_weight = bil_bias = None
    return bilinear""")
        self.assertEqual(call_modules(gm), [])
        assert_same(gm, ref, tokens())

    def test_custom_module_keeps_its_children(self):
        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.scale = nn.Parameter(torch.randn(4))
                self.inner = nn.Linear(4, 4)

            def forward(self, x, shift=2.0):
                return self.inner(x * self.scale) + shift

        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.block = Block()

            def forward(self, x):
                return torch.relu(self.block(x))

        model, x = M(), torch.randn(3, 4)
        ref = model(x)
        gm = trace(model, leaves=(Block,))
        self.assertExpectedInline(code(gm), """\
def forward(self, x):
    block = self.block(x);  x = None
    relu = torch.relu(block);  block = None
    return relu""")
        inline_modules(gm, lambda fqn, module: isinstance(module, Block))
        # The block's own child stays a call_module, under its full fqn.
        self.assertExpectedInline(code(gm), """\
def forward(self, x):
    block_scale = self.block.scale
    mul = x * block_scale;  x = block_scale = None
    block_inner = self.block.inner(mul);  mul = None
    add = block_inner + 2.0;  block_inner = None
    relu = torch.relu(add);  add = None
    return relu""")
        node = next(n for n in gm.graph.nodes if n.op == "get_attr")
        self.assertEqual(node.meta["inlined_from"], ("block", "Block"))
        assert_same(gm, ref, x)

    def test_module_called_twice(self):
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 4)

            def forward(self, x):
                return self.fc(torch.relu(self.fc(x)))

        model, x = M(), torch.randn(2, 4)
        gm, ref = inlined(model, x)
        self.assertExpectedInline(code(gm), """\
def forward(self, x):
    fc_weight = self.fc.weight
    fc_bias = self.fc.bias
    linear = torch._C._nn.linear(x, fc_weight, fc_bias);  x = fc_weight = fc_bias = None
    relu = torch.relu(linear);  linear = None
    fc_weight_1 = self.fc.weight
    fc_bias_1 = self.fc.bias
    linear_1 = torch._C._nn.linear(relu, fc_weight_1, fc_bias_1);  relu = fc_weight_1 = fc_bias_1 = None
    return linear_1""")
        assert_same(gm, ref, x)

    def test_module_called_with_keyword_argument(self):
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 3)

            def forward(self, x):
                return self.fc(input=x)

        model, x = M(), torch.randn(2, 4)
        gm = fx.symbolic_trace(model)
        self.assertExpectedInline(code(gm), """\
def forward(self, x):
    fc = self.fc(input = x);  x = None
    return fc""")
        ref = model(x)
        inline_modules(gm, ALL)
        self.assertExpectedInline(code(gm), """\
def forward(self, x):
    fc_weight = self.fc.weight
    fc_bias = self.fc.bias
    linear = torch._C._nn.linear(x, fc_weight, fc_bias);  x = fc_weight = fc_bias = None
    return linear""")
        assert_same(gm, ref, x)

    def test_predicate_limits_what_is_inlined(self):
        model, x = MLP(), torch.randn(2, 8)
        ref = model(x)
        seen = []

        def only_fc1(fqn, module):
            seen.append((fqn, type(module).__name__))
            return fqn == "fc1"

        gm = run_passes(fx.symbolic_trace(model), InlineModules(only_fc1))
        self.assertEqual(seen, [("fc1", "Linear"), ("fc2", "Linear")])
        self.assertExpectedInline(code(gm), """\
def forward(self, x):
    fc1_weight = self.fc1.weight
    fc1_bias = self.fc1.bias
    linear = torch._C._nn.linear(x, fc1_weight, fc1_bias);  x = fc1_weight = fc1_bias = None
    relu = torch.relu(linear);  linear = None
    fc2 = self.fc2(relu);  relu = None
    return fc2""")
        assert_same(gm, ref, x)

    def test_untraceable_module_stays_call_module(self):
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.mha = nn.MultiheadAttention(4, 2)
                self.fc = nn.Linear(4, 4)

            def forward(self, x):
                return self.fc(self.mha(x, x, x)[0])

        model, x = M(), torch.randn(3, 2, 4)
        model.eval()
        ref = model(x)
        gm = fx.symbolic_trace(model)
        inlining = InlineModules(ALL)
        run_passes(gm, inlining)
        self.assertExpectedInline(code(gm), """\
def forward(self, x):
    mha = self.mha(x, x, x);  x = None
    getitem = mha[0];  mha = None
    fc_weight = self.fc.weight
    fc_bias = self.fc.bias
    linear = torch._C._nn.linear(getitem, fc_weight, fc_bias);  getitem = fc_weight = fc_bias = None
    return linear""")
        self.assertEqual(list(inlining.not_inlined), ["mha"])
        self.assertExpectedInline(inlining.not_inlined["mha"], """TraceError: symbolically traced variables cannot be used as inputs to control flow""")
        assert_same(gm, ref, x)


# --------------------------------------------------------------------------------------- InsertMasks


def random_mask(shape, dtype=torch.float32):
    return (torch.rand(shape) > 0.5).to(dtype)


class TestInsertMasks(expecttest.TestCase):
    def setUp(self):
        torch.manual_seed(0)

    def test_mul_buffer_and_meta(self):
        model, x = Wrap(nn.Linear(4, 3)), torch.randn(2, 4)
        gm, _ = inlined(model, x)
        mask = random_mask((3, 4))
        run_passes(gm, InsertMasks([MaskSpec("layer.weight", mask, meta={"group": 0})]))
        self.assertExpectedInline(code(gm), """\
def forward(self, x):
    layer_weight = self.layer.weight
    layer_weight_mask = self.layer.weight_mask
    mul = torch.mul(layer_weight, layer_weight_mask);  layer_weight = layer_weight_mask = None
    layer_bias = self.layer.bias
    linear = torch._C._nn.linear(x, mul, layer_bias);  x = mul = layer_bias = None
    return linear""")
        self.assertIs(gm.layer.weight_mask, mask)
        self.assertIn("layer.weight_mask", gm.state_dict())
        (mul,) = muls(gm)
        self.assertEqual(mul.meta["sparsity"],
                         {"tensor_fqn": "layer.weight", "mask_fqn": "layer.weight_mask", "group": 0})
        self.assertEqual(mul.args[1].meta["sparsity_mask"], "layer.weight_mask")
        (use,) = find_masked_uses(gm)
        self.assertEqual((use.mul, use.tensor_fqn, use.mask_fqn), (mul, "layer.weight", "layer.weight_mask"))
        with torch.no_grad():
            torch.testing.assert_close(gm(x), F.linear(x, model.layer.weight * mask, model.layer.bias))

    def test_tied_parameter_one_buffer_mul_at_each_use(self):
        model = Tied()
        gm, _ = inlined(model, tokens())
        mask = random_mask((10, 4))
        insert_masks(gm, [MaskSpec("emb.weight", mask)])
        self.assertExpectedInline(code(gm), """\
def forward(self, tokens):
    emb_weight = self.emb.weight
    emb_weight_mask = self.emb.weight_mask
    mul = torch.mul(emb_weight, emb_weight_mask);  emb_weight = emb_weight_mask = None
    embedding = torch.nn.functional.embedding(tokens, mul, padding_idx = None, max_norm = None, norm_type = 2.0, scale_grad_by_freq = False, sparse = False);  tokens = mul = None
    head1_weight = self.head1.weight
    emb_weight_mask_1 = self.emb.weight_mask
    mul_1 = torch.mul(head1_weight, emb_weight_mask_1);  head1_weight = emb_weight_mask_1 = None
    linear = torch._C._nn.linear(embedding, mul_1, None);  mul_1 = None
    tanh = torch.tanh(embedding);  embedding = None
    head2_weight = self.head2.weight
    emb_weight_mask_2 = self.emb.weight_mask
    mul_2 = torch.mul(head2_weight, emb_weight_mask_2);  head2_weight = emb_weight_mask_2 = None
    head2_bias = self.head2.bias
    linear_1 = torch._C._nn.linear(tanh, mul_2, head2_bias);  tanh = mul_2 = head2_bias = None
    add = linear + linear_1;  linear = linear_1 = None
    return add""")
        self.assertEqual([name for name, _ in gm.named_buffers()], ["emb.weight_mask"])
        self.assertEqual([m.meta["sparsity"]["tensor_fqn"] for m in muls(gm)], ["emb.weight"] * 3)
        self.assertEqual({m.args[1].target for m in muls(gm)}, {"emb.weight_mask"})
        w = model.emb.weight * mask
        h = F.embedding(tokens(), w)
        with torch.no_grad():
            torch.testing.assert_close(gm(tokens()), F.linear(h, w) + F.linear(torch.tanh(h), w, model.head2.bias))

    def test_tensor_read_by_no_node(self):
        # torch.export keeps get_attr reads of tied/unused tensors that nothing uses.
        model, x = Wrap(nn.Linear(4, 3)), torch.randn(2, 4)
        model.extra = nn.Linear(4, 4)
        gm, _ = inlined(model, x)
        gm.add_submodule("extra", model.extra)
        with gm.graph.inserting_before(next(iter(gm.graph.nodes)).next):
            gm.graph.get_attr("extra.weight")
        gm.recompile()
        before = code(gm)
        mask = random_mask((4, 4))
        insert_masks(gm, [MaskSpec("extra.weight", mask)])
        self.assertEqual(code(gm), before)
        self.assertEqual(muls(gm), [])
        self.assertIs(gm.extra.weight_mask, mask)

    def test_refuses_tensor_used_inside_leaf_module(self):
        model = Wrap(nn.Linear(4, 3))
        gm = fx.symbolic_trace(model)
        before = code(gm)
        with self.assertRaises(MaskInsertionError) as caught:
            insert_masks(gm, [MaskSpec("layer.weight", torch.ones(3, 4))])
        self.assertExpectedInline(str(caught.exception), """'layer.weight' is used inside the leaf module 'layer' (Linear), which fx_sparsity cannot inline, so no mask can be put in front of that use. Trace with tracer="export" (and example_inputs=...) to see through it.""")
        self.assertEqual(code(gm), before)
        self.assertFalse(hasattr(gm.layer, "weight_mask"))

    def test_refuses_mask_of_wrong_shape(self):
        gm, _ = inlined(Wrap(nn.Linear(4, 3)), torch.randn(2, 4))
        with self.assertRaises(MaskInsertionError) as caught:
            insert_masks(gm, [MaskSpec("layer.weight", torch.ones(4, 3))])
        self.assertExpectedInline(str(caught.exception), """mask for 'layer.weight' has shape (4, 3), the tensor has (3, 4)""")


# --------------------------------------------------------------------------------------- prepare_masks


class TestPrepareMasks(expecttest.TestCase):
    def setUp(self):
        torch.manual_seed(0)

    def test_docstring_before_after(self):
        model, x = Wrap(nn.Linear(4, 3)), torch.randn(2, 4)
        gm = fx.symbolic_trace(model)
        self.assertExpectedInline(code(gm), """\
def forward(self, x):
    layer = self.layer(x);  x = None
    return layer""")
        prepare_masks(gm, [MaskSpec("layer.weight", torch.ones(3, 4))], model)
        self.assertExpectedInline(code(gm), """\
def forward(self, x):
    layer_weight = self.layer.weight
    layer_weight_mask = self.layer.weight_mask
    mul = torch.mul(layer_weight, layer_weight_mask);  layer_weight = layer_weight_mask = None
    layer_bias = self.layer.bias
    linear = torch._C._nn.linear(x, mul, layer_bias);  x = mul = layer_bias = None
    return linear""")
        self.assertExpectedInline(str(gm.graph).strip(), """\
graph():
    %x : [num_users=1] = placeholder[target=x]
    %layer_weight : [num_users=1] = get_attr[target=layer.weight]
    %layer_weight_mask : [num_users=1] = get_attr[target=layer.weight_mask]
    %mul : [num_users=1] = call_function[target=torch.mul](args = (%layer_weight, %layer_weight_mask), kwargs = {})
    %layer_bias : [num_users=1] = get_attr[target=layer.bias]
    %linear : [num_users=1] = call_function[target=torch._C._nn.linear](args = (%x, %mul, %layer_bias), kwargs = {})
    return linear""")
        with torch.no_grad():
            torch.testing.assert_close(gm(x), model(x))

    def test_only_modules_owning_a_masked_tensor_are_inlined(self):
        model, x = MLP(), torch.randn(2, 8)
        gm = fx.symbolic_trace(model)
        mask = random_mask((4, 12))
        prepare_masks(gm, [MaskSpec("fc2.weight", mask)], model)
        self.assertExpectedInline(code(gm), """\
def forward(self, x):
    fc1 = self.fc1(x);  x = None
    relu = torch.relu(fc1);  fc1 = None
    fc2_weight = self.fc2.weight
    fc2_weight_mask = self.fc2.weight_mask
    mul = torch.mul(fc2_weight, fc2_weight_mask);  fc2_weight = fc2_weight_mask = None
    fc2_bias = self.fc2.bias
    linear = torch._C._nn.linear(relu, mul, fc2_bias);  relu = mul = fc2_bias = None
    return linear""")
        with torch.no_grad():
            ref = F.linear(torch.relu(model.fc1(x)), model.fc2.weight * mask, model.fc2.bias)
            torch.testing.assert_close(gm(x), ref)

    def test_tensor_the_graph_module_does_not_hold(self):
        model, x = Wrap(nn.Linear(4, 3)), torch.randn(2, 4)
        model.unused = nn.Linear(4, 4)
        gm = fx.symbolic_trace(model)
        self.assertFalse(hasattr(gm, "unused"))  # GraphModules copy only what the graph reads
        before = code(gm)
        prepare_masks(gm, [MaskSpec("unused.weight", torch.ones(4, 4))], model)
        self.assertIs(gm.unused.weight, model.unused.weight)
        self.assertIn("unused.weight_mask", dict(gm.named_buffers()))
        self.assertEqual(code(gm), before)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), model(x))


# --------------------------------------------------------------------------------------- FoldMasks


class TestFoldMasks(expecttest.TestCase):
    def setUp(self):
        torch.manual_seed(0)

    def test_fold_restores_code_and_folds_in_place(self):
        model, x = MLP(), torch.randn(2, 8)
        gm, _ = inlined(model, x)
        before = code(gm)
        m1, m2 = random_mask((12, 8)), random_mask((4, 12))
        insert_masks(gm, [MaskSpec("fc1.weight", m1), MaskSpec("fc2.weight", m2)])
        with torch.no_grad():
            masked_out = gm(x)
        w1, w2 = gm.fc1.weight, gm.fc2.weight
        expected1, expected2 = (w1 * m1).detach(), (w2 * m2).detach()
        folding = FoldMasks()
        run_passes(gm, folding)
        self.assertEqual(folding.folded, ["fc1.weight", "fc2.weight"])
        self.assertIs(gm.fc1.weight, w1)
        self.assertIs(gm.fc2.weight, w2)
        self.assertIsInstance(gm.fc1.weight, nn.Parameter)
        torch.testing.assert_close(w1.detach(), expected1, atol=0, rtol=0)
        torch.testing.assert_close(w2.detach(), expected2, atol=0, rtol=0)
        self.assertEqual(list(dict(gm.named_buffers())), [])
        self.assertEqual(muls(gm), [])
        self.assertEqual(code(gm), before)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), masked_out)

    def test_tied_weight_folded_once(self):
        model = Tied()
        gm, _ = inlined(model, tokens())
        before = code(gm)
        mask = torch.full((10, 4), 0.5)  # not 0/1: folding twice would show
        insert_masks(gm, [MaskSpec("emb.weight", mask)])
        w = gm.emb.weight
        expected = (w * 0.5).detach()
        self.assertEqual(fold_masks(gm), ["emb.weight"])
        self.assertIs(gm.head1.weight, w)
        torch.testing.assert_close(w.detach(), expected, atol=0, rtol=0)
        self.assertEqual(code(gm), before)
        self.assertEqual(list(dict(gm.named_buffers())), [])

    def test_tensor_not_read_by_graph_folded_when_named(self):
        model, x = Wrap(nn.Linear(4, 3)), torch.randn(2, 4)
        model.unused = nn.Linear(4, 4)
        gm = fx.symbolic_trace(model)
        mask = random_mask((4, 4))
        prepare_masks(gm, [MaskSpec("unused.weight", mask), MaskSpec("layer.weight", torch.ones(3, 4))], model)
        w = gm.unused.weight
        expected = (w * mask).detach()
        self.assertEqual(fold_masks(gm, ["unused.weight"]), ["layer.weight", "unused.weight"])
        self.assertIs(gm.unused.weight, w)
        torch.testing.assert_close(w.detach(), expected, atol=0, rtol=0)
        self.assertEqual(list(dict(gm.named_buffers())), [])
        with torch.no_grad():
            torch.testing.assert_close(gm(x), model.layer(x))
        self.assertExpectedInline(code(gm), """\
def forward(self, x):
    layer_weight = self.layer.weight
    layer_bias = self.layer.bias
    linear = torch._C._nn.linear(x, layer_weight, layer_bias);  x = layer_weight = layer_bias = None
    return linear""")


# --------------------------------------------------------------------------------------- observers


class TestObservers(expecttest.TestCase):
    def setUp(self):
        torch.manual_seed(0)

    def test_observe_linears_shares_observer_between_linears(self):
        model, x = MLP(), torch.randn(2, 8)
        gm, ref = inlined(model, x)
        before = code(gm)
        observed = observe_linears(gm, ["linear", "linear_1"], MinMaxObserver)
        self.assertExpectedInline(code(gm), """\
def forward(self, x):
    fc1_weight = self.fc1.weight
    fc1_bias = self.fc1.bias
    activation_post_process_0 = self.activation_post_process_0(x);  x = None
    linear = torch._C._nn.linear(activation_post_process_0, fc1_weight, fc1_bias);  activation_post_process_0 = fc1_weight = fc1_bias = None
    relu = torch.relu(linear);  linear = None
    activation_post_process_1 = self.activation_post_process_1(relu);  relu = None
    fc2_weight = self.fc2.weight
    fc2_bias = self.fc2.bias
    linear_1 = torch._C._nn.linear(activation_post_process_1, fc2_weight, fc2_bias);  activation_post_process_1 = fc2_weight = fc2_bias = None
    activation_post_process_2 = self.activation_post_process_2(linear_1);  linear_1 = None
    return activation_post_process_2""")
        self.assertEqual(observed, {
            "linear": ObservedNode("activation_post_process_0", "activation_post_process_1", "relu"),
            "linear_1": ObservedNode("activation_post_process_1", "activation_post_process_2", "linear_1"),
        })
        assert_same(gm, ref, x)
        # The output observer of fc1 sees values after the relu.
        self.assertEqual(float(gm.activation_post_process_1.min_val), 0.0)
        self.assertEqual(float(gm.activation_post_process_0.min_val), float(x.min()))

        removed = remove_observers(gm)
        self.assertEqual(sorted(removed), [f"activation_post_process_{i}" for i in range(3)])
        self.assertEqual(code(gm), before)
        self.assertEqual([name for name, _ in gm.named_children()], ["fc1", "fc2"])

    def test_insert_observers_pass(self):
        model, x = MLP(), torch.randn(2, 8)
        gm, ref = inlined(model, x)
        inserting = InsertObservers([Observation("linear_1", "input", lambda value: MinMaxObserver(), fqn="watch")])
        run_passes(gm, inserting)
        self.assertEqual(inserting.observed, {("linear_1", "input"): "watch"})
        self.assertEqual(inserting.value_of, {("linear_1", "input"): "relu"})
        self.assertExpectedInline(code(gm), """\
def forward(self, x):
    fc1_weight = self.fc1.weight
    fc1_bias = self.fc1.bias
    linear = torch._C._nn.linear(x, fc1_weight, fc1_bias);  x = fc1_weight = fc1_bias = None
    relu = torch.relu(linear);  linear = None
    fc2_weight = self.fc2.weight
    fc2_bias = self.fc2.bias
    watch = self.watch(relu);  relu = None
    linear_1 = torch._C._nn.linear(watch, fc2_weight, fc2_bias);  watch = fc2_weight = fc2_bias = None
    return linear_1""")
        assert_same(gm, ref, x)
        with self.assertRaises(ValueError):
            run_passes(gm, InsertObservers([Observation("nope", "input", lambda value: MinMaxObserver())]))

    def test_observe_linear_inputs_tied_weight(self):
        model = Tied()
        gm, ref = inlined(model, tokens())
        prepare_masks(gm, [MaskSpec("emb.weight", torch.ones(10, 4))], model)
        before = code(gm)
        observed = observe_linear_inputs(gm, ["emb.weight"])
        self.assertEqual(observed, {"emb.weight": "emb.weight_input_observer"})
        self.assertExpectedInline(code(gm), """\
def forward(self, tokens):
    emb_weight = self.emb.weight
    emb_weight_mask = self.emb.weight_mask
    mul = torch.mul(emb_weight, emb_weight_mask);  emb_weight = emb_weight_mask = None
    embedding = torch.nn.functional.embedding(tokens, mul, padding_idx = None, max_norm = None, norm_type = 2.0, scale_grad_by_freq = False, sparse = False);  tokens = mul = None
    head1_weight = self.head1.weight
    emb_weight_mask_1 = self.emb.weight_mask
    mul_1 = torch.mul(head1_weight, emb_weight_mask_1);  head1_weight = emb_weight_mask_1 = None
    emb_weight_input_observer = self.emb.weight_input_observer(embedding)
    linear = torch._C._nn.linear(emb_weight_input_observer, mul_1, None);  emb_weight_input_observer = mul_1 = None
    tanh = torch.tanh(embedding);  embedding = None
    head2_weight = self.head2.weight
    emb_weight_mask_2 = self.emb.weight_mask
    mul_2 = torch.mul(head2_weight, emb_weight_mask_2);  head2_weight = emb_weight_mask_2 = None
    head2_bias = self.head2.bias
    emb_weight_input_observer_1 = self.emb.weight_input_observer(tanh);  tanh = None
    linear_1 = torch._C._nn.linear(emb_weight_input_observer_1, mul_2, head2_bias);  emb_weight_input_observer_1 = mul_2 = head2_bias = None
    add = linear + linear_1;  linear = linear_1 = None
    return add""")
        observers = [name for name, m in gm.named_modules() if isinstance(m, ChannelNormObserver)]
        self.assertEqual(observers, ["emb.weight_input_observer"])
        self.assertEqual(call_modules(gm), ["emb.weight_input_observer"] * 2)
        assert_same(gm, ref, tokens())
        observer = gm.emb.weight_input_observer
        self.assertEqual(int(observer.num_rows), 2 * tokens().numel())  # both linears, not the embedding
        with torch.no_grad():
            h = model.emb(tokens())
            expected = (h.reshape(-1, 4).square().sum(0) + torch.tanh(h).reshape(-1, 4).square().sum(0)).sqrt()
        torch.testing.assert_close(observer.channel_norms(), expected)

        removing = RemoveObservers(ChannelNormObserver)
        run_passes(gm, removing)
        self.assertEqual(removing.removed, ["emb.weight_input_observer"])
        self.assertEqual(code(gm), before)
        self.assertFalse(hasattr(gm.emb, "weight_input_observer"))

    def test_remove_by_type_and_by_fqn(self):
        model, x = MLP(), torch.randn(2, 8)
        gm, ref = inlined(model, x)
        before = code(gm)
        observe_linear_inputs(gm, ["fc1.weight", "fc2.weight"])
        observe_linears(gm, ["linear"], MinMaxObserver)
        self.assertExpectedInline(code(gm), """\
def forward(self, x):
    fc1_weight = self.fc1.weight
    fc1_bias = self.fc1.bias
    fc1_weight_input_observer = self.fc1.weight_input_observer(x);  x = None
    activation_post_process_0 = self.activation_post_process_0(fc1_weight_input_observer);  fc1_weight_input_observer = None
    linear = torch._C._nn.linear(activation_post_process_0, fc1_weight, fc1_bias);  activation_post_process_0 = fc1_weight = fc1_bias = None
    relu = torch.relu(linear);  linear = None
    activation_post_process_1 = self.activation_post_process_1(relu);  relu = None
    fc2_weight = self.fc2.weight
    fc2_bias = self.fc2.bias
    fc2_weight_input_observer = self.fc2.weight_input_observer(activation_post_process_1);  activation_post_process_1 = None
    linear_1 = torch._C._nn.linear(fc2_weight_input_observer, fc2_weight, fc2_bias);  fc2_weight_input_observer = fc2_weight = fc2_bias = None
    return linear_1""")
        assert_same(gm, ref, x)

        self.assertEqual(remove_observers(gm, ChannelNormObserver), ["fc1.weight_input_observer",
                                                                     "fc2.weight_input_observer"])
        self.assertEqual(call_modules(gm), ["activation_post_process_0", "activation_post_process_1"])
        self.assertIsInstance(gm.activation_post_process_0, MinMaxObserver)

        self.assertEqual(remove_observers(gm, fqns=["activation_post_process_1"]), ["activation_post_process_1"])
        self.assertEqual(call_modules(gm), ["activation_post_process_0"])
        self.assertFalse(hasattr(gm, "activation_post_process_1"))
        self.assertExpectedInline(code(gm), """\
def forward(self, x):
    fc1_weight = self.fc1.weight
    fc1_bias = self.fc1.bias
    activation_post_process_0 = self.activation_post_process_0(x);  x = None
    linear = torch._C._nn.linear(activation_post_process_0, fc1_weight, fc1_bias);  activation_post_process_0 = fc1_weight = fc1_bias = None
    relu = torch.relu(linear);  linear = None
    fc2_weight = self.fc2.weight
    fc2_bias = self.fc2.bias
    linear_1 = torch._C._nn.linear(relu, fc2_weight, fc2_bias);  relu = fc2_weight = fc2_bias = None
    return linear_1""")

        remove_observers(gm)
        self.assertEqual(code(gm), before)


# --------------------------------------------------------------------------------------- lowering


def build_masked_linear(site, weight, mask, bias):
    """A plain ``nn.Linear`` holding weight * mask (a stand-in for a sparse kernel)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight.copy_(weight * mask)
    if bias is not None:
        linear.bias.copy_(bias)
    return linear


class TestLowerSparseLinears(expecttest.TestCase):
    def setUp(self):
        torch.manual_seed(0)

    def prepared(self, model, masks):
        gm = fx.symbolic_trace(model)
        prepare_masks(gm, [MaskSpec(fqn, mask) for fqn, mask in masks.items()], model)
        return gm

    def test_lowered_to_call_module(self):
        model, x = MLP(), torch.randn(2, 8)
        m1, m2 = random_mask((12, 8)), random_mask((4, 12))
        gm = self.prepared(model, {"fc1.weight": m1, "fc2.weight": m2})
        self.assertExpectedInline(code(gm), """\
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
    linear_1 = torch._C._nn.linear(relu, mul_1, fc2_bias);  relu = mul_1 = fc2_bias = None
    return linear_1""")
        with torch.no_grad():
            masked_out = gm(x)
        masked_w1 = (gm.fc1.weight * m1).detach()
        sites = find_sparse_linears(gm)
        self.assertEqual([(s.node.name, s.tensor_fqn, s.block_shape, s.problem) for s in sites],
                         [("linear", "fc1.weight", (1, 4), None), ("linear_1", "fc2.weight", (1, 4), None)])
        lowering = LowerSparseLinears(build_masked_linear, sites)
        run_passes(gm, lowering)
        self.assertExpectedInline(code(gm), """\
def forward(self, x):
    fc1_1 = self.fc1(x);  x = None
    relu = torch.relu(fc1_1);  fc1_1 = None
    fc2_1 = self.fc2(relu);  relu = None
    return fc2_1""")
        self.assertEqual(lowering.kept_dense, {})
        self.assertEqual([(r.linear_name, r.module_fqn, r.node.target) for r in lowering.lowered],
                         [("linear", "fc1", "fc1"), ("linear_1", "fc2", "fc2")])
        self.assertEqual(list(dict(gm.named_buffers())), [])
        self.assertEqual(sorted(dict(gm.named_parameters())), ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"])
        torch.testing.assert_close(gm.fc1.weight.detach(), masked_w1)
        self.assertIsInstance(gm.fc1, nn.Linear)  # the emptied owner was replaced by the built module
        nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
        info = getattr(gm.fc1, INFO_ATTR)
        self.assertEqual(info, {"tensor_fqn": "fc1.weight", "lowered_to": "Linear",
                                "weight_sparsity": float((m1 == 0).float().mean()),
                                "sparse_block_shape": (1, 4), "dense_weight_kept": False})
        self.assertEqual(nodes["fc1"].meta["sparsity"], info)
        self.assertEqual(nodes["fc2"].meta["sparsity"]["tensor_fqn"], "fc2.weight")
        with torch.no_grad():
            torch.testing.assert_close(gm(x), masked_out)

    def test_back_to_back_linears(self):
        model, x = MLP(relu=False), torch.randn(2, 8)
        m1, m2 = random_mask((12, 8)), random_mask((4, 12))
        gm = self.prepared(model, {"fc1.weight": m1, "fc2.weight": m2})
        with torch.no_grad():
            masked_out = gm(x)
        run_passes(gm, LowerSparseLinears(build_masked_linear, find_sparse_linears(gm)))
        self.assertExpectedInline(code(gm), """\
def forward(self, x):
    fc1_1 = self.fc1(x);  x = None
    fc2_1 = self.fc2(fc1_1);  fc1_1 = None
    return fc2_1""")
        with torch.no_grad():
            torch.testing.assert_close(gm(x), masked_out)

    def test_tied_weight_read_by_embedding_kept_dense(self):
        model = Tied()
        mask = random_mask((10, 4))
        gm = self.prepared(model, {"emb.weight": mask})
        with torch.no_grad():
            masked_out = gm(tokens())
        dense = gm.emb.weight
        sites = find_sparse_linears(gm)
        self.assertEqual([(s.node.name, s.tensor_fqn) for s in sites],
                         [("linear", "emb.weight"), ("linear_1", "emb.weight")])
        lowering = LowerSparseLinears(build_masked_linear, sites)
        run_passes(gm, lowering)
        self.assertExpectedInline(code(gm), """\
def forward(self, tokens):
    emb_weight = self.emb.weight
    emb_weight_mask = self.emb.weight_mask
    mul = torch.mul(emb_weight, emb_weight_mask);  emb_weight = emb_weight_mask = None
    embedding = torch.nn.functional.embedding(tokens, mul, padding_idx = None, max_norm = None, norm_type = 2.0, scale_grad_by_freq = False, sparse = False);  tokens = mul = None
    emb_weight_lowered = self.emb.weight_lowered(embedding)
    tanh = torch.tanh(embedding);  embedding = None
    emb_weight_lowered_1 = self.emb.weight_lowered_1(tanh);  tanh = None
    add = emb_weight_lowered + emb_weight_lowered_1;  emb_weight_lowered = emb_weight_lowered_1 = None
    return add""")
        self.assertEqual(lowering.kept_dense, {"emb.weight": ["embedding"]})
        self.assertIs(gm.emb.weight, dense)
        self.assertIs(gm.emb.weight_mask, mask)
        for record in lowering.lowered:
            self.assertTrue(record.info["dense_weight_kept"])
            self.assertTrue(record.node.meta["sparsity"]["dense_weight_kept"])
        with torch.no_grad():
            torch.testing.assert_close(gm(tokens()), masked_out)

    def test_tied_weight_owner_left_a_valid_module(self):
        model = Tied()
        gm = self.prepared(model, {"emb.weight": random_mask((10, 4))})
        run_passes(gm, LowerSparseLinears(build_masked_linear, find_sparse_linears(gm)))
        self.assertIn("head2", repr(gm))  # the kept owner's moved-out bias is None, not missing
        self.assertIsNone(gm.head2.bias)

    def test_one_module_for_two_sites(self):
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 4)

            def forward(self, x):
                return self.fc(torch.relu(self.fc(x)))

        model, x = M(), torch.randn(2, 4)
        gm = self.prepared(model, {"fc.weight": random_mask((4, 4))})
        with torch.no_grad():
            masked_out = gm(x)
        built = {}

        def build_once(site, weight, mask, bias):
            if site.tensor_fqn not in built:
                built[site.tensor_fqn] = build_masked_linear(site, weight, mask, bias)
            return built[site.tensor_fqn]

        lowering = LowerSparseLinears(build_once, find_sparse_linears(gm))
        run_passes(gm, lowering)
        self.assertExpectedInline(code(gm), """\
def forward(self, x):
    fc_2 = self.fc(x);  x = None
    relu = torch.relu(fc_2);  fc_2 = None
    fc_3 = self.fc(relu);  relu = None
    return fc_3""")
        self.assertIs(gm.fc, built["fc.weight"])
        self.assertEqual([r.module_fqn for r in lowering.lowered], ["fc", "fc"])
        with torch.no_grad():
            torch.testing.assert_close(gm(x), masked_out)

    def test_squashed_weight_named_in_sparse_tensors(self):
        model, x = MLP(), torch.randn(2, 8)
        m1 = random_mask((12, 8))
        gm = self.prepared(model, {"fc1.weight": m1})
        fold_masks(gm)
        with torch.no_grad():
            squashed_out = gm(x)
        self.assertEqual(find_sparse_linears(gm), [])
        sites = find_sparse_linears(gm, {"fc1.weight": (2, 2)})
        self.assertEqual([(s.node.name, s.tensor_fqn, s.mask, s.mul, s.block_shape) for s in sites],
                         [("linear", "fc1.weight", None, None, (2, 2))])
        run_passes(gm, LowerSparseLinears(build_masked_linear, sites))
        self.assertExpectedInline(code(gm), """\
def forward(self, x):
    fc1_1 = self.fc1(x);  x = None
    relu = torch.relu(fc1_1);  fc1_1 = None
    fc2 = self.fc2(relu);  relu = None
    return fc2""")
        self.assertEqual(gm.fc1.fx_sparsity_info["sparse_block_shape"], (2, 2))
        with torch.no_grad():
            torch.testing.assert_close(gm(x), squashed_out)

    @pytest.mark.filterwarnings("ignore:.*quantize_per_tensor.*deprecated")
    def test_quantize_boundaries(self):
        model, x = Wrap(nn.ReLU()), torch.randn(2, 4)
        gm = fx.symbolic_trace(model)
        run_passes(gm, QuantizeBoundaries({"layer": (0.1, 0, torch.quint8)}))
        self.assertExpectedInline(code(gm), """\
def forward(self, x):
    layer_quantize = self.layer_quantize(x);  x = None
    layer = self.layer(layer_quantize);  layer_quantize = None
    layer_dequantize = self.layer_dequantize(layer);  layer = None
    return layer_dequantize""")
        self.assertIsInstance(gm.layer_quantize, Quantize)
        self.assertIsInstance(gm.layer_dequantize, DeQuantize)
        self.assertAlmostEqual(float(gm.layer_quantize.scale), 0.1, places=6)
        self.assertEqual((int(gm.layer_quantize.zero_point), gm.layer_quantize.dtype), (0, torch.quint8))
        self.assertIn("layer_quantize.scale", gm.state_dict())
        with torch.no_grad():
            expected = torch.relu(torch.quantize_per_tensor(x, 0.1, 0, torch.quint8).dequantize())
            torch.testing.assert_close(gm(x), expected)
        with self.assertRaises(ValueError):
            run_passes(gm, QuantizeBoundaries({"missing": (0.1, 0, torch.quint8)}))


# --------------------------------------------------------------------------------------- run_passes


class Boom(PassBase):
    def __init__(self, error):
        super().__init__()
        self.error = error

    def call(self, gm):
        raise self.error


class Noop(PassBase):
    def call(self, gm):
        return PassResult(gm, False)


class TestRunPasses(expecttest.TestCase):
    def test_error_in_a_pass_surfaces_as_itself(self):
        gm = fx.symbolic_trace(Wrap(nn.Linear(2, 2)))
        for error in (KeyError("boom"), MaskInsertionError("no mask here"), ValueError("bad value"), Exception("plain")):
            with self.subTest(type(error).__name__):
                with pytest.raises(type(error)) as caught:
                    run_passes(gm, Noop(), Boom(error))
                self.assertIs(caught.type, type(error))
                self.assertIs(caught.value, error)

    def test_error_in_requires_surfaces_as_itself(self):
        gm = fx.symbolic_trace(Wrap(nn.Linear(2, 2)))
        with self.assertRaisesRegex(MaskInsertionError, "inside the leaf module 'layer'"):
            run_passes(gm, InsertMasks([MaskSpec("layer.weight", torch.ones(2, 2))]))

    def test_returns_the_same_module(self):
        gm = fx.symbolic_trace(Wrap(nn.Linear(2, 2)))
        self.assertIs(run_passes(gm, Noop()), gm)
