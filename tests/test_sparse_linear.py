"""SparseCSRLinear / SparseBSRLinear: numbers, state round trips, mappings, torch.compile."""
import io
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from expecttest import TestCase
from models import encoder_layer
from torch import nn

import fx_sparsity as fxs
from fx_sparsity.nn import SparseBSRLinear, SparseCSRLinear


def _block_mask(rows, cols, block, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    keep = (torch.rand(rows // block[0], cols // block[1], generator=g) < density).float()
    return keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _layer(cls, in_f=64, out_f=32, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    mask = _block_mask(out_f, in_f, (4, 4), 0.3, seed)
    kwargs = {"blocksize": (4, 4)} if cls is SparseBSRLinear else {}
    return linear, mask, cls.from_dense(linear, mask, **kwargs)


@pytest.mark.parametrize("cls", [SparseCSRLinear, SparseBSRLinear])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 64), (2, 5, 64), (1, 64), (64,), (0, 64)])
def test_matches_masked_linear(cls, dtype, bias, shape):
    linear, mask, module = _layer(cls, bias=bias, dtype=dtype)
    assert type(module) is cls and module.weight_values.dtype == dtype
    x = torch.randn(shape, dtype=dtype)
    ref = F.linear(x, linear.weight * mask, linear.bias)
    out = module(x)
    assert out.shape == ref.shape and out.dtype == dtype
    if ref.numel():
        assert _rel(out, ref) <= 1e-5
    assert module.fx_sparsity_info["lowered_to"] == cls.__name__
    assert module.fx_sparsity_info["weight_sparsity"] == pytest.approx((linear.weight * mask == 0).float().mean().item())


def test_weight_is_the_masked_weight_and_memory_drops():
    linear = nn.Linear(256, 256)
    mask = _block_mask(256, 256, (1, 1), 0.1)
    module = SparseCSRLinear.from_dense(linear, mask)
    assert module.weight.layout == torch.sparse_csr
    assert torch.equal(module.weight.to_dense(), linear.weight.detach() * mask)
    stored = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    dense = sum(t.numel() * t.element_size() for t in linear.state_dict().values())
    assert stored < 0.35 * dense  # 90% zeros; each nonzero costs 4 bytes of value + 8 of int64 index
    assert "format=csr" in repr(module) and "weight_sparsity=0.9" in repr(module)


def test_bsr_falls_back_to_csr_and_says_why():
    torch.manual_seed(0)
    weight, bias = torch.randn(32, 64), torch.randn(32)
    mask = _block_mask(32, 64, (1, 4), 0.2)
    module = SparseBSRLinear.from_masked(weight, mask, bias, sparse_block_shape=(1, 4))
    assert type(module) is SparseCSRLinear
    assert module.fx_sparsity_info["format"] == "csr"
    assert module.fx_sparsity_info["requested_block"] == (1, 4)
    assert module.fx_sparsity_info["detail"] == "CPU BSR needs square blocks: (1, 4) stored as CSR"
    assert "does not divide" in SparseBSRLinear.from_masked(weight, mask, bias, sparse_block_shape=(3, 3)
                                                           ).fx_sparsity_info["detail"]
    square = SparseBSRLinear.from_masked(weight, mask, bias, sparse_block_shape=(4, 4))
    assert type(square) is SparseBSRLinear and square.blocksize == (4, 4)  # exact, zeros kept inside blocks
    x = torch.randn(3, 64)
    assert _rel(square(x), F.linear(x, weight * mask, bias)) <= 1e-5


def test_bsr_infers_the_largest_square_block():
    linear = nn.Linear(64, 32)
    assert SparseBSRLinear.from_dense(linear, _block_mask(32, 64, (8, 8), 0.3)).blocksize == (8, 8)
    assert SparseBSRLinear.from_dense(linear, _block_mask(32, 64, (4, 4), 0.3)).blocksize == (4, 4)
    unstructured = SparseBSRLinear.from_dense(linear, _block_mask(32, 64, (1, 1), 0.3))
    assert type(unstructured) is SparseCSRLinear
    assert unstructured.fx_sparsity_info["detail"] == "no square block pattern: stored as CSR"


def test_without_mask_the_weights_own_zeros_count():
    linear = nn.Linear(16, 8)
    with torch.no_grad():
        linear.weight[:, ::2] = 0
    module = SparseCSRLinear.from_dense(linear)
    assert module.weight_sparsity == 0.5 and module.weight_values.numel() == 64


@pytest.mark.parametrize("cls", [SparseCSRLinear, SparseBSRLinear])
def test_state_dict_into_fresh_module(cls):
    _, _, module = _layer(cls)
    sd = module.state_dict()
    assert sorted(sd) == ["bias", "weight_col_indices", "weight_crow_indices", "weight_values"]
    assert all(t.layout == torch.strided for t in sd.values())  # safetensors / weights_only friendly
    fresh = cls(64, 32, **({"blocksize": (4, 4)} if cls is SparseBSRLinear else {}))
    assert fresh.weight_values.shape[0] == 0  # other number of nonzeros than the saved one
    fresh.load_state_dict(sd)
    x = torch.randn(5, 64)
    assert torch.equal(fresh(x), module(x))
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh(x), module(x))


@pytest.mark.parametrize("cls", [SparseCSRLinear, SparseBSRLinear])
def test_torch_save_module_and_dtype_moves(cls):
    _, _, module = _layer(cls)
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(4, 64)
    assert torch.equal(loaded(x), module(x)) and loaded.fx_sparsity_info == module.fx_sparsity_info
    double = loaded.double()
    assert double(x.double()).dtype == torch.float64 and double.weight_crow_indices.dtype == torch.int64


def test_bad_state_dict_is_refused_with_reason():
    _, _, module = _layer(SparseCSRLinear)
    sd = module.state_dict()
    sd["weight_col_indices"] = sd["weight_col_indices"] + 64
    fresh = SparseCSRLinear(64, 32)
    with pytest.raises(RuntimeError, match="column indices out of range for in_features=64"):
        fresh.load_state_dict(sd)
    sd = module.state_dict()
    del sd["bias"]
    with pytest.raises(RuntimeError, match='Missing key.*"bias"'):
        fresh.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="do not fit out_features=16"):
        SparseCSRLinear(64, 16).load_state_dict(module.state_dict())
    sd = module.state_dict()
    sd["weight_crow_indices"] = sd["weight_crow_indices"].flip(0)  # right length and ends, wrong order
    sd["weight_crow_indices"][0], sd["weight_crow_indices"][-1] = 0, sd["weight_col_indices"].numel()
    with pytest.raises(RuntimeError, match="the sparse weight in the state dict is not valid for this module"):
        fresh.load_state_dict(sd)


def test_clear_errors():
    _, _, module = _layer(SparseCSRLinear)
    with pytest.raises(ValueError, match="input has 32 features in its last dimension, expected in_features=64"):
        module(torch.randn(2, 32))
    with pytest.raises(TypeError, match="no cpu sparse kernel for torch.bfloat16.*keep the layer dense"):
        SparseCSRLinear.from_dense(nn.Linear(8, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="SparseCSRLinear has no blocks"):
        SparseCSRLinear.from_dense(nn.Linear(8, 8), blocksize=(2, 2))
    with pytest.raises(ValueError, match="square blocksize dividing"):
        SparseBSRLinear(8, 8, blocksize=(1, 4))
    with pytest.raises(ValueError, match="mask shape"):
        SparseCSRLinear.from_masked(torch.randn(8, 8), torch.ones(4, 8), None)


@pytest.mark.parametrize("cls", [SparseCSRLinear, SparseBSRLinear])
def test_input_gradient(cls):
    linear, mask, module = _layer(cls, 16, 8, dtype=torch.float64)
    weight = (module.weight_crow_indices, module.weight_col_indices, module.weight_values)
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    bias = module.bias.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, b: torch.ops.fx_sparsity.sparse_linear(x, *weight, b, 8, 16), (x, bias))
    module(x).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    F.linear(x_ref, linear.weight.detach() * mask, linear.bias.detach()).square().sum().backward()
    assert torch.allclose(x.grad, x_ref.grad)


class TestLowering(TestCase):
    def _prepared(self, block=(1, 4)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
        sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.75, sparse_block_shape=block,
                                              zeros_per_block=block[0] * block[1])
        prepared = fxs.prepare_fx_sparse(model, sparsifier)
        sparsifier.step()
        return prepared

    def test_csr_and_bsr_mappings(self):
        self.assertEqual(fxs.get_sparse_csr_mapping(), {nn.Linear: SparseCSRLinear})
        self.assertEqual(fxs.get_sparse_bsr_mapping(), {nn.Linear: SparseBSRLinear})
        prepared = self._prepared((4, 4))
        x = torch.randn(5, 16)
        for mapping, target in [(fxs.get_sparse_csr_mapping(), SparseCSRLinear),
                                (fxs.get_sparse_bsr_mapping(), SparseBSRLinear)]:
            lowered = fxs.convert_fx_sparse(prepared, mapping)
            self.assertExpectedInline(lowered.code.strip(), """\
def forward(self, input):
    input_1 = input
    _0 = getattr(self, "0")(input_1);  input_1 = None
    _1 = getattr(self, "1")(_0);  _0 = None
    _2 = getattr(self, "2")(_1);  _1 = None
    return _2""")
            self.assertIs(type(lowered.get_submodule("0")), target)
            self.assertLessEqual(_rel(lowered(x), prepared(x)), 1e-5)
            node = next(n for n in lowered.graph.nodes if n.target == "2")
            info = node.meta["sparsity"]
            self.assertEqual((info["tensor_fqn"], info["lowered_to"], info["format"]),
                             ("2.weight", target.__name__, target._format))
            self.assertGreaterEqual(info["weight_sparsity"], 0.75)
            self.assertEqual(lowered.get_submodule("2").fx_sparsity_info, info)

    def test_bsr_mapping_with_1x4_blocks_is_stored_as_csr(self):
        lowered = fxs.convert_fx_sparse(self._prepared((1, 4)), fxs.get_sparse_bsr_mapping())
        module = lowered.get_submodule("0")
        self.assertIs(type(module), SparseCSRLinear)
        self.assertEqual(module.fx_sparsity_info["detail"], "CPU BSR needs square blocks: (1, 4) stored as CSR")
        self.assertExpectedInline(fxs.format_sparse_graph(lowered), """\
node     op           target               sparse tensor    level    block    zeros    lowered to
-------  -----------  -------------------  ---------------  -------  -------  -------  ------------------------------------------------------------------------
input_1  placeholder  input
_0       call_module  0 (SparseCSRLinear)  0.weight         75.0%    1x4      75.0%    SparseCSRLinear (csr; CPU BSR needs square blocks: (1, 4) stored as CSR)
_1       call_module  1 (ReLU)
_2       call_module  2 (SparseCSRLinear)  2.weight         75.0%    1x4      75.0%    SparseCSRLinear (csr; CPU BSR needs square blocks: (1, 4) stored as CSR)
output   output

parameters: 808 total, 768 in 2 sparsified tensors (lowered layers counted as their dense weights)
zeros: 576 = 75.0% of sparsified, 71.3% of all parameters
model bytes (state_dict): 3.2 KiB with the 2 lowered layers as dense float32 -> 2.7 KiB lowered (0.87x)""")

    def test_lowered_state_dict_into_freshly_lowered_module_and_torch_save(self):
        prepared = self._prepared((4, 4))
        lowered = fxs.convert_fx_sparse(prepared, fxs.get_sparse_bsr_mapping())
        other = self._prepared((4, 4))
        with torch.no_grad():
            other.get_buffer("0.weight_mask").fill_(1.0)  # another sparsity: another number of nonzeros
        fresh = fxs.convert_fx_sparse(other, fxs.get_sparse_bsr_mapping())
        fresh.load_state_dict(lowered.state_dict())
        x = torch.randn(4, 16)
        self.assertTrue(torch.equal(fresh(x), lowered(x)))
        buf = io.BytesIO()
        torch.save(lowered, buf)
        buf.seek(0)
        self.assertTrue(torch.equal(torch.load(buf, weights_only=False)(x), lowered(x)))

    @pytest.mark.slow
    def test_encoder_layer_from_export(self):
        layer = encoder_layer()
        x = torch.randn(2, 6, 32)
        sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.8, sparse_block_shape=(4, 4), zeros_per_block=16)
        prepared = fxs.prepare_fx_sparse(layer, sparsifier, tracer="export", example_inputs=(x,))
        sparsifier.step()
        lowered = fxs.convert_fx_sparse(prepared, fxs.get_sparse_bsr_mapping())
        self.assertEqual(sorted(type(m).__name__ for m in lowered.modules() if hasattr(m, "weight_values")),
                         ["SparseBSRLinear", "SparseBSRLinear"])
        self.assertLessEqual(_rel(lowered(x), prepared(x)), 1e-5)

    @pytest.mark.slow
    def test_torch_compile_fullgraph_forward_and_backward(self):
        # dynamo cannot wrap sparse tensors; the modules hand it an opaque custom op instead.
        torch._dynamo.reset()
        prepared = self._prepared((4, 4))
        lowered = fxs.convert_fx_sparse(prepared, fxs.get_sparse_bsr_mapping())
        lowered.add_module("0", SparseCSRLinear.from_dense(prepared.get_submodule("0"),
                                                           prepared.get_buffer("0.weight_mask")))
        x = torch.randn(5, 16)
        with torch.no_grad():  # inductor, inference: the op runs as an extern kernel inside the graph
            self.assertLessEqual(_rel(torch.compile(lowered, fullgraph=True)(x), lowered(x)), 1e-5)
        torch._dynamo.reset()
        compiled = torch.compile(lowered, fullgraph=True, backend="aot_eager")  # autograd through the op
        x = torch.randn(5, 16, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_(True)
        out, ref = compiled(x), lowered(x_ref)
        self.assertLessEqual(_rel(out, ref), 1e-5)
        out.sum().backward()
        ref.sum().backward()
        self.assertTrue(torch.allclose(x.grad, x_ref.grad, atol=1e-5))


def test_torch_export_keeps_the_op_in_the_graph():
    torch.manual_seed(0)
    model = nn.Sequential(SparseCSRLinear.from_dense(nn.Linear(16, 8), _block_mask(8, 16, (1, 1), 0.3)), nn.ReLU(),
                          SparseBSRLinear.from_dense(nn.Linear(8, 8), _block_mask(8, 8, (4, 4), 0.5)))
    x = torch.randn(3, 16)
    program = torch.export.export(model, (x,))
    ops = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.fx_sparsity.sparse_linear.default) == 2
    assert torch.equal(program.module()(x), model(x))


# torch warns "Sparse CSR/BSR tensor support is in beta state" once per process, at the first
# sparse tensor built: each case runs in a fresh interpreter where that first tensor is ours,
# built by a different entry point, with every warning an error.
_NO_BETA_WARNING = textwrap.dedent("""
    import io, sys, warnings
    import torch
    from torch import nn
    from fx_sparsity.nn import SparseBSRLinear, SparseCSRLinear

    first = sys.argv[1]
    state = torch.load(sys.argv[2], weights_only=True)
    warnings.simplefilter("error")
    x = torch.randn(3, 8, requires_grad=True)
    if first == "load_state_dict":
        csr = SparseCSRLinear(8, 8)
        csr.load_state_dict(state["csr"])
    elif first == "forward":  # buffers set directly: the call builds the first sparse tensor
        csr = SparseCSRLinear(8, 8)
        for name, tensor in state["csr"].items():
            setattr(csr, name, tensor)
        csr(x)
    linear = nn.Linear(8, 8)
    modules = [SparseCSRLinear.from_dense(linear), SparseBSRLinear.from_dense(linear, blocksize=(2, 2)),
               SparseCSRLinear.from_masked(linear.weight, torch.ones(8, 8), linear.bias),
               SparseBSRLinear.from_masked(linear.weight, torch.ones(8, 8), None, sparse_block_shape=(2, 2))]
    for module in modules:
        fresh = type(module)(8, 8, module.bias is not None,
                             **({"blocksize": module.blocksize} if isinstance(module, SparseBSRLinear) else {}))
        fresh.load_state_dict(module.state_dict())
        buffer = io.BytesIO()
        torch.save(fresh, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        loaded(x).sum().backward()
        loaded(x[:1])
        assert loaded.weight.layout in (torch.sparse_csr, torch.sparse_bsr)
    print("ok")
""")


@pytest.mark.slow  # fresh processes
@pytest.mark.parametrize("first", ["from_dense", "load_state_dict", "forward"])
def test_no_beta_warning_leaks(first, tmp_path):
    linear = nn.Linear(8, 8)
    state = {"csr": SparseCSRLinear.from_dense(linear).state_dict()}
    path = tmp_path / "state.pt"
    torch.save(state, path)
    proc = subprocess.run([sys.executable, "-c", _NO_BETA_WARNING, first, str(path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr
    assert "beta state" not in proc.stderr


def test_beta_warning_filter_is_narrow():
    """Only torch's beta-state message is ignored while we build sparse tensors, nothing else."""
    from fx_sparsity.nn import sparse_linear

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with sparse_linear._ignore_beta_warning():
            warnings.warn("Sparse BSR tensor support is in beta state. If you miss...", UserWarning)
            warnings.warn("something else", UserWarning)
            warnings.warn("Sparse CSR tensor support is in beta state.", DeprecationWarning)
        warnings.warn("Sparse CSR tensor support is in beta state.", UserWarning)  # outside: shown
    assert [(w.category, str(w.message)[:20]) for w in caught] == [
        (UserWarning, "something else"), (DeprecationWarning, "Sparse CSR tensor su"),
        (UserWarning, "Sparse CSR tensor su")]
