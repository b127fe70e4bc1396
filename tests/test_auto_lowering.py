"""convert_fx_sparse(..., mapping="auto"): the per-layer choice is measured and recorded.

Choices are asserted only where the gap is large (1024², batch 64: CSR at 95% zeros runs
in ~0.2× the dense time, and a 30%-sparse layer never gets a sparse candidate); timings
themselves are never asserted. One intra-op thread while timing: on a shared 2-core
machine two OpenMP threads stall each other (dense 1024² matmul measured 1.5 ms on one
thread, 47 ms on two under load).
"""
import io

import pytest
import torch
import torch.nn.functional as F
from models import encoder_layer
from torch import nn

import fx_sparsity as fxs
from fx_sparsity.lowering import choose_linear_lowering
from fx_sparsity.nn import DenseDynamicInt8Linear

pytestmark = pytest.mark.filterwarnings("ignore:Sparse (CSR|BSR|Compressed) tensor support is in beta state",
                                        "ignore::DeprecationWarning", "ignore:.*quantiz.*:UserWarning")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def big():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024))
    sparsifier = fxs.WeightNormSparsifier(sparse_block_shape=(1, 4))
    prepared = fxs.prepare_fx_sparse(model, sparsifier, [{"tensor_fqn": "0.weight", "sparsity_level": 0.3},
                                                         {"tensor_fqn": "2.weight", "sparsity_level": 0.95}])
    sparsifier.step()
    x = torch.randn(64, 1024)
    with torch.no_grad():
        lowered = fxs.convert_fx_sparse(prepared, "auto", example_inputs=(x,))
    return prepared, lowered, x


def test_auto_keeps_30_percent_dense_and_lowers_95_percent(big):
    prepared, lowered, x = big
    nodes = {n.target: n for n in lowered.graph.nodes if n.op == "call_module"}
    dense, sparse = nodes["0"].meta["sparsity"], nodes["2"].meta["sparsity"]
    assert (dense["auto_choice"], dense["lowered_to"], dense["speedup_vs_dense"]) == ("dense", "Linear", 1.0)
    assert dense["not_timed"]["csr"] == "70% of the weight is nonzero"
    assert type(lowered.get_submodule("0")) is nn.Linear
    assert sparse["auto_choice"] in ("csr", "bsr4x4")  # (1, 4) blocks: 4x4 BSR would store 19% of blocks
    assert sparse["lowered_to"] in ("SparseCSRLinear", "SparseBSRLinear")
    assert sparse["speedup_vs_dense"] >= 1.05 and sparse["timed_rows"] == 64
    assert set(sparse["candidates_ms"]) >= {"dense", "csr"}
    # the record agrees with itself: the speedup is what its own times say
    times = sparse["candidates_ms"]
    assert sparse["speedup_vs_dense"] == pytest.approx(times["dense"] / times[sparse["auto_choice"]], rel=2e-3)
    assert sparse["tensor_fqn"] == "2.weight" and sparse["weight_sparsity"] >= 0.95
    assert lowered.get_submodule("2").fx_sparsity_info == sparse  # survives pickling, unlike meta
    assert "int8" in sparse["not_timed"]  # the default bound admits float kernels only
    assert _rel(lowered(x), prepared(x)) <= 1e-5
    printed = fxs.format_sparse_graph(lowered)
    assert "Linear (dense; speedup 1.00x)" in printed
    assert f"{sparse['lowered_to']} ({sparse['format']}; speedup {sparse['speedup_vs_dense']:.2f}x)" in printed


def test_auto_lowered_module_saves_and_loads(big):
    _, lowered, x = big
    buf = io.BytesIO()
    torch.save(lowered, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(x), lowered(x))
    assert loaded.get_submodule("2").fx_sparsity_info == lowered.get_submodule("2").fx_sparsity_info


def test_choice_records_every_candidate_and_error():
    torch.manual_seed(0)
    weight, bias = torch.randn(64, 128), torch.randn(64)
    mask = (torch.rand(8, 16) < 0.1).float().repeat_interleave(8, 0).repeat_interleave(8, 1)  # 8x8 blocks
    x = torch.randn(32, 128)
    choice = choose_linear_lowering(weight, mask, bias, x, sparse_block_shape=(8, 8), repeat=3)
    assert set(choice.timings_ms) == {"dense", "csr", "bsr4x4", "bsr8x8", "bsr16x16"}
    assert set(choice.skipped) == {"int8", "sparse_int8"}
    assert all(error <= 1e-5 for error in choice.rel_errors.values())
    assert choice.choice in choice.timings_ms and choice.rows == 32
    info = choice.module.fx_sparsity_info
    assert info["auto_choice"] == choice.choice and info["lowered_to"] == type(choice.module).__name__
    with torch.no_grad():
        assert _rel(choice.module(x), F.linear(x, weight * mask, bias)) <= 1e-5


def test_int8_candidates_only_when_the_error_bound_admits_them():
    torch.manual_seed(0)
    weight, bias = torch.randn(64, 128), torch.randn(64)
    mask = (torch.rand(64, 32) < 0.2).float().repeat_interleave(4, 1)
    x = torch.randn(16, 128)
    loose = choose_linear_lowering(weight, mask, bias, x, sparse_block_shape=(1, 4), max_rel_error=0.05, repeat=3)
    assert {"int8", "sparse_int8"} <= set(loose.timings_ms)
    assert 1e-4 < loose.rel_errors["int8"] <= 0.05 and 1e-4 < loose.rel_errors["sparse_int8"] <= 0.05
    tight = choose_linear_lowering(weight, mask, bias, x, sparse_block_shape=(1, 4), max_rel_error=5e-3, repeat=3)
    for name in ("int8", "sparse_int8"):  # measured, then refused
        if name not in tight.timings_ms:
            assert tight.skipped[name].startswith("relative error")
    double = choose_linear_lowering(weight.double(), mask.double(), bias.double(), x.double(), max_rel_error=0.05,
                                    repeat=3)
    assert double.skipped["int8"] == "int8 kernels take float32 weights, this one is torch.float64"


class _LinearVia(nn.Module):
    """A stand-in low-precision kernel: the linear computed in float32, rounded to the weight's dtype, then scaled."""

    def __init__(self, masked, bias, scale=1.0):
        super().__init__()
        self.masked, self.bias, self.scale = masked, bias, scale

    def forward(self, x):
        return (F.linear(x.float(), self.masked.float(), self.bias.float()) * self.scale).to(x.dtype)


def test_low_precision_candidates_are_judged_at_their_dtypes_precision(monkeypatch):
    """A bf16 kernel is ~1e-3 off the exact result, as dense bf16 is: max_rel_error=1e-4 must not refuse it for that."""
    from fx_sparsity.lowering import auto

    torch.manual_seed(0)
    weight, bias = torch.randn(64, 128, dtype=torch.bfloat16), torch.randn(64, dtype=torch.bfloat16)
    mask = torch.tensor([1, 1, 0, 0], dtype=torch.bfloat16).repeat(64, 32)
    x = torch.randn(32, 128, dtype=torch.bfloat16)
    masked = weight * mask
    real_candidates = auto._candidates

    def with_stand_ins(*args):
        build, skipped = real_candidates(*args)
        build["rounded"] = lambda: _LinearVia(masked, bias)
        build["two_percent_off"] = lambda: _LinearVia(masked, bias, scale=1.02)
        return build, skipped

    monkeypatch.setattr(auto, "_candidates", with_stand_ins)
    choice = choose_linear_lowering(weight, mask, bias, x, repeat=3)
    dense_error = choice.rel_errors["dense"]
    assert 1e-4 < dense_error < 1e-2  # dense bf16 itself, against the exact masked layer
    assert "rounded" in choice.timings_ms and choice.rel_errors["rounded"] <= 2 * dense_error
    assert choice.skipped["two_percent_off"] == (f"relative error 0.02 > {2 * dense_error:.2g} (max_rel_error=0.0001, "
                                                 f"2x the dense torch.bfloat16 layer's own error)")
    fp32 = choose_linear_lowering(weight.float(), mask.float(), bias.float(), x.float(), repeat=3)
    assert fp32.rel_errors["dense"] < 1e-6  # float32 layers: the bound is max_rel_error, as before
    assert fp32.skipped["two_percent_off"] == "relative error 0.02 > 0.0001 (max_rel_error=0.0001)"


def test_every_timed_sample_waits_for_the_device(monkeypatch):
    """On a GPU a call returns once its kernels are queued: each sample must wait for them, or launches are timed."""
    from fx_sparsity.lowering import auto
    from fx_sparsity.timing import device_synchronizer, interleaved_times_ms

    events = []
    interleaved_times_ms({"a": lambda: events.append("call"), "b": lambda: events.append("call")}, warmup=1,
                         repeat=3, number=2, synchronize=lambda: events.append("sync"))
    assert events == ["call", "call"] + ["sync", "call", "call", "sync"] * 6  # warmup, then 3 rounds of 2
    assert device_synchronizer("cpu") is None and device_synchronizer("meta") is None
    assert callable(device_synchronizer("cuda"))  # made, not called: this machine may have no GPU

    devices = []
    monkeypatch.setattr(auto, "device_synchronizer", lambda device: devices.append(device) or (lambda: None))
    choose_linear_lowering(torch.randn(32, 64), torch.ones(32, 64), None, torch.randn(8, 64), repeat=1)
    assert devices == [torch.device("cpu")]  # auto times on the device of the layer's input


def test_dense_int8_runs_under_any_engine_and_restores_it():
    torch.manual_seed(0)
    weight, bias, x = torch.randn(16, 32), torch.randn(16), torch.randn(4, 32)
    module = DenseDynamicInt8Linear.from_masked(weight, torch.ones_like(weight), bias)
    expected = module(x)
    assert _rel(expected, F.linear(x, weight, bias)) < 0.02
    previous = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "qnnpack"
        assert torch.equal(module(x), expected)
        buf = io.BytesIO()
        torch.save(module, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)  # unpickled, packed again under x86, not qnnpack
        fresh = DenseDynamicInt8Linear(32, 16)
        fresh.load_state_dict(module.state_dict())
        assert torch.backends.quantized.engine == "qnnpack"
        assert torch.equal(loaded(x), expected) and torch.equal(fresh(x), expected)
    finally:
        torch.backends.quantized.engine = previous


@pytest.mark.slow
def test_auto_on_an_exported_encoder_layer_times_the_real_rows():
    layer = encoder_layer()
    x = torch.randn(2, 6, 32)
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.9)
    prepared = fxs.prepare_fx_sparse(layer, sparsifier, tracer="export", example_inputs=(x,))
    sparsifier.step()
    lowered = fxs.convert_fx_sparse(prepared, "auto", example_inputs=(x,))
    infos = [n.meta["sparsity"] for n in lowered.graph.nodes if "auto_choice" in n.meta.get("sparsity", {})]
    assert sorted(i["tensor_fqn"] for i in infos) == ["linear1.weight", "linear2.weight"]
    assert all(i["timed_rows"] == 12 for i in infos)  # batch 2 × sequence 6
    assert _rel(lowered(x), prepared(x)) <= 1e-5


def test_auto_errors():
    torch.manual_seed(0)
    sparsifier = fxs.WeightNormSparsifier()
    prepared = fxs.prepare_fx_sparse(nn.Sequential(nn.Linear(8, 8)), sparsifier)
    with pytest.raises(fxs.SparsityConfigError, match="mapping='auto' times each layer on its real input: pass "
                                                      "example_inputs="):
        fxs.convert_fx_sparse(prepared, "auto")
    with pytest.raises(fxs.SparsityConfigError, match="max_rel_error must be a number >= 0"):
        fxs.convert_fx_sparse(prepared, "auto", example_inputs=(torch.randn(2, 8),), max_rel_error=-1)
    assert "0.weight_mask" in dict(prepared.named_buffers())  # left as it was
