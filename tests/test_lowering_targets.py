"""register_lowering_target: one registry for mapping names, mapping dicts and mapping="auto".

Timings are never asserted: where a test needs auto to pick a target, the timing function
is replaced by one that returns fixed samples.
"""
import pytest
import torch
import torch.nn.functional as F
from models import mlp
from torch import nn

import fx_sparsity as fxs
from fx_sparsity import lowering
from fx_sparsity.lowering import auto

pytestmark = pytest.mark.filterwarnings("ignore:Sparse (CSR|BSR|Compressed) tensor support is in beta state",
                                        "ignore::DeprecationWarning", "ignore:.*quantiz.*:UserWarning")


class CSRCopyLinear(nn.Module):
    """A target of the user's own: the masked weight stored as a CSR tensor (2-D inputs)."""

    def __init__(self, weight, bias):
        super().__init__()
        self.weight = weight.to_sparse_csr()
        self.bias = bias

    def forward(self, x):
        return torch.addmm(self.bias[:, None], self.weight, x.T).T


class FLinearCSR(CSRCopyLinear):
    """The same through F.linear, which torch 2.13 cannot run on a CSR weight in inference mode."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class HalfLinear(nn.Module):
    """Another: a float16 copy of the masked weight (about 1e-3 off)."""

    def __init__(self, weight, bias):
        super().__init__()
        self.weight = weight.half()
        self.bias = bias

    def forward(self, x):
        return F.linear(x, self.weight.float(), self.bias)


def csr_copy(weight, bias, *, mask, sparse_block_shape, example=None):
    return CSRCopyLinear(weight, bias)


def half(weight, bias, *, mask, sparse_block_shape, example=None):
    return HalfLinear(weight, bias)


@pytest.fixture
def register():
    """``register(name, build, **kw)``; every name registered in the test is unregistered after it."""
    names = []

    def _register(name, build, **kwargs):
        target = fxs.register_lowering_target(name, build, **kwargs)
        names.append(name)
        return target

    before = dict(lowering.lowering_targets())
    yield _register
    for name in dict.fromkeys(reversed(names)):
        if name in lowering.targets._USER:
            lowering.unregister_lowering_target(name)
    assert lowering.lowering_targets() == before  # nothing leaks into other tests


@pytest.fixture
def prepared():
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.8)
    model = fxs.prepare_fx_sparse(mlp(), sparsifier)
    sparsifier.step()
    return model


def sparse_nodes(gm):
    return [n for n in gm.graph.nodes if "lowered_to" in n.meta.get("sparsity", {})]


def fixed_times(fast):
    """A stand-in for auto's timer: ``fast`` takes 0.1 ms a call, every other candidate 1 ms."""
    def times(fns, repeat, device):
        return {name: [1e-4 if name == fast else 1e-3] * 3 for name in fns}
    return times


def test_public_name():
    assert fxs.register_lowering_target is lowering.register_lowering_target
    assert "register_lowering_target" in fxs.__all__


def test_convert_by_name_uses_the_registered_target(register, prepared):
    calls = []

    def build(weight, bias, *, mask, sparse_block_shape, example=None):
        calls.append((weight.clone(), mask.clone(), sparse_block_shape, example))
        return CSRCopyLinear(weight, bias)

    register("csr_copy", build)
    lowered = fxs.convert_fx_sparse(prepared, "csr_copy")
    x = torch.randn(4, 16)
    torch.testing.assert_close(lowered(x), prepared(x), rtol=1e-5, atol=1e-5)
    nodes = sparse_nodes(lowered)
    assert [n.target for n in nodes] == ["0", "2", "4"]
    assert all(type(lowered.get_submodule(n.target)) is CSRCopyLinear for n in nodes)
    assert all(n.meta["sparsity"]["lowered_to"] == "CSRCopyLinear" for n in nodes)
    assert len(calls) == 3
    for weight, mask, block, example in calls:
        assert torch.equal(weight, weight * mask) and (weight[mask == 0] == 0).all()  # the masked weight
        assert block == (1, 4) and example is None


def test_auto_times_a_registered_target_and_picks_it_when_fastest(register, prepared, monkeypatch):
    examples = []

    def build(weight, bias, *, mask, sparse_block_shape, example=None):
        examples.append(example)
        return CSRCopyLinear(weight, bias)

    register("csr_copy", build)
    monkeypatch.setattr(auto, "_time", fixed_times("csr_copy"))
    x = torch.randn(8, 16)
    lowered = fxs.convert_fx_sparse(prepared, "auto", example_inputs=(x,))
    for node in sparse_nodes(lowered):
        info = node.meta["sparsity"]
        assert set(info["candidates_ms"]) >= {"dense", "csr", "csr_copy"}
        assert info["candidates_ms"]["csr_copy"] == 0.1 and info["candidates_ms"]["dense"] == 1.0
        assert info["auto_choice"] == "csr_copy" and info["speedup_vs_dense"] == 10.0
        assert info["lowered_to"] == "CSRCopyLinear" and info["rel_error"] <= 1e-5
        assert type(lowered.get_submodule(node.target)) is CSRCopyLinear
    assert examples and all(isinstance(e, torch.Tensor) and e.shape[0] == 8 for e in examples)
    torch.testing.assert_close(lowered(x), prepared(x), rtol=1e-5, atol=1e-5)


def test_auto_skips_a_target_whose_build_fails(register, prepared):
    register("not_a_module", lambda weight, bias, **_: None)
    register("raises", lambda weight, bias, **_: (_ for _ in ()).throw(RuntimeError("no kernel here\nmore")))
    lowered = fxs.convert_fx_sparse(prepared, "auto", example_inputs=(torch.randn(8, 16),))
    info = sparse_nodes(lowered)[0].meta["sparsity"]
    assert info["not_timed"]["not_a_module"] == ("failed: lowering target 'not_a_module': build(...) returned "
                                                 "NoneType, not an nn.Module")
    assert info["not_timed"]["raises"] == "failed: no kernel here"
    assert not {"not_a_module", "raises"} & set(info["candidates_ms"])


def test_a_target_that_fails_in_inference_mode_is_skipped(register, prepared):
    """auto times under torch.inference_mode: a module that cannot run there is skipped with the reason."""
    register("f_linear_csr", lambda weight, bias, **_: FLinearCSR(weight, bias))
    lowered = fxs.convert_fx_sparse(prepared, "auto", example_inputs=(torch.randn(8, 16),))
    info = sparse_nodes(lowered)[0].meta["sparsity"]
    assert info["not_timed"]["f_linear_csr"] == ("failed in inference mode: Cannot set version_counter for inference "
                                                 "tensor")
    by_name = fxs.convert_fx_sparse(prepared, "f_linear_csr")  # named, it runs (outside inference mode)
    x = torch.randn(4, 16)
    torch.testing.assert_close(by_name(x), prepared(x), rtol=1e-5, atol=1e-5)


def test_timed_target_is_recorded_by_name(register, prepared):
    class Wrapped(nn.Module):
        def __init__(self, weight, bias):
            super().__init__()
            self.inner = nn.Linear(weight.shape[1], weight.shape[0])
            with torch.no_grad():
                self.inner.weight.copy_(weight)
                self.inner.bias.copy_(bias)

        def forward(self, x):
            return self.inner(x)

    register("wrapped", lambda weight, bias, **_: Wrapped(weight, bias))
    lowered = fxs.convert_fx_sparse(prepared, "auto", example_inputs=(torch.randn(8, 16),))
    for node in sparse_nodes(lowered):
        info = node.meta["sparsity"]
        assert "wrapped" in info["candidates_ms"] and "wrapped" not in info.get("not_timed", {})
        assert info["candidates_ms"]["wrapped"] > 0


def test_auto_false_targets_are_not_timed(register, prepared):
    register("csr_copy", csr_copy, auto=False)
    lowered = fxs.convert_fx_sparse(prepared, "auto", example_inputs=(torch.randn(8, 16),))
    for node in sparse_nodes(lowered):
        info = node.meta["sparsity"]
        assert "csr_copy" not in info["candidates_ms"] and "csr_copy" not in info.get("not_timed", {})
    by_name = fxs.convert_fx_sparse(prepared, "csr_copy")  # still there by name
    assert all(n.meta["sparsity"]["lowered_to"] == "CSRCopyLinear" for n in sparse_nodes(by_name))


def test_applies_reason_is_recorded_and_false_is_silent(register, prepared):
    seen = []

    def needs_gpu(weight, mask, *, sparse_block_shape, device):
        seen.append((weight.shape, sparse_block_shape, device))
        return True if device.type == "cuda" else "needs a CUDA device"

    register("gpu_only", csr_copy, applies=needs_gpu)
    register("never", csr_copy, applies=lambda weight, mask, **_: False)
    lowered = fxs.convert_fx_sparse(prepared, "auto", example_inputs=(torch.randn(8, 16),))
    for node in sparse_nodes(lowered):
        info = node.meta["sparsity"]
        assert info["not_timed"]["gpu_only"] == "needs a CUDA device"
        assert "never" not in info["not_timed"] and "never" not in info["candidates_ms"]
        assert "gpu_only" not in info["candidates_ms"]
    assert (torch.Size([32, 16]), (1, 4), torch.device("cpu")) in seen


def test_applies_must_answer_true_false_or_a_reason(register, prepared):
    register("sloppy", csr_copy, applies=lambda weight, mask, **_: None)
    with pytest.raises(TypeError, match=r"lowering target 'sloppy': applies\(...\) returned None; it must return "
                                        "True, False or a string"):
        fxs.convert_fx_sparse(prepared, "auto", example_inputs=(torch.randn(8, 16),))


def test_registered_targets_are_held_to_max_rel_error(register, prepared):
    register("half", half)
    x = torch.randn(8, 16)
    tight = fxs.convert_fx_sparse(prepared, "auto", example_inputs=(x,))
    reason = sparse_nodes(tight)[0].meta["sparsity"]["not_timed"]["half"]
    assert reason.startswith("relative error ") and reason.endswith(" > 0.0001 (max_rel_error=0.0001)")
    loose = fxs.convert_fx_sparse(prepared, "auto", example_inputs=(x,), max_rel_error=0.05)
    info = sparse_nodes(loose)[0].meta["sparsity"]
    assert "half" in info["candidates_ms"] and "half" not in info.get("not_timed", {})


def test_choose_linear_lowering_sees_registered_targets(register):
    register("csr_copy", csr_copy)
    torch.manual_seed(0)
    weight, bias, x = torch.randn(32, 64), torch.randn(32), torch.randn(8, 64)
    mask = (torch.rand(32, 64) < 0.1).float()
    choice = lowering.choose_linear_lowering(weight, mask, bias, x, repeat=1)
    assert "csr_copy" in choice.timings_ms and choice.rel_errors["csr_copy"] <= 1e-5


def test_mapping_dict_naming_the_produced_class(register, prepared):
    with pytest.raises(fxs.SparsityConfigError, match="cannot lower to .*CSRCopyLinear"):
        fxs.convert_fx_sparse(prepared, {nn.Linear: CSRCopyLinear})
    register("csr_copy", csr_copy, produces=CSRCopyLinear)
    lowered = fxs.convert_fx_sparse(prepared, {nn.Linear: CSRCopyLinear})
    x = torch.randn(4, 16)
    torch.testing.assert_close(lowered(x), prepared(x), rtol=1e-5, atol=1e-5)
    assert all(type(lowered.get_submodule(n.target)) is CSRCopyLinear for n in sparse_nodes(lowered))


def test_builtin_mapping_classes_resolve_through_the_registry():
    targets = lowering.lowering_targets()
    assert lowering.targets.target_for_class(fxs.SparseCSRLinear) is targets["csr"]
    assert lowering.targets.target_for_class(fxs.SparseBSRLinear) is targets["bsr"]
    assert lowering.targets.target_for_class(torch.ao.nn.sparse.quantized.dynamic.Linear) is targets["dynamic"]
    assert lowering.targets.target_for_class(torch.ao.nn.sparse.quantized.Linear) is targets["static"]
    assert lowering.targets.target_for_class(fxs.SemiStructuredSparseLinear) is targets["semi_structured"]
    auto_names = [name for name, target in targets.items() if target.auto]
    assert auto_names == ["dense", "csr", "bsr", "bsr4x4", "bsr8x8", "bsr16x16", "2:4", "int8", "sparse_int8"]


def test_reregistering_replaces(register, prepared):
    register("mine", half)
    register("mine", csr_copy)
    lowered = fxs.convert_fx_sparse(prepared, "mine")
    assert {type(lowered.get_submodule(n.target)) for n in sparse_nodes(lowered)} == {CSRCopyLinear}


def test_replacing_a_builtin_needs_replace_and_unregister_restores_it(register, prepared):
    with pytest.raises(fxs.SparsityConfigError, match=r"'csr' is a built-in lowering target; pass replace=True to "
                                                      r"replace it \(unregister_lowering_target\('csr'\) brings the "
                                                      r"built-in back\)"):
        fxs.register_lowering_target("csr", csr_copy)
    register("csr", csr_copy, replace=True)
    lowered = fxs.convert_fx_sparse(prepared, "csr")
    assert {type(lowered.get_submodule(n.target)) for n in sparse_nodes(lowered)} == {CSRCopyLinear}
    lowering.unregister_lowering_target("csr")
    lowered = fxs.convert_fx_sparse(prepared, "csr")
    assert {type(lowered.get_submodule(n.target)) for n in sparse_nodes(lowered)} == {fxs.SparseCSRLinear}


@pytest.mark.parametrize("args, kwargs, message", [
    ((5, csr_copy), {}, "a lowering target's name must be a non-empty string, got 5"),
    (("", csr_copy), {}, "a lowering target's name must be a non-empty string, got ''"),
    (("mine", "not a function"), {}, "lowering target 'mine': build must be callable, got 'not a function'"),
    (("mine", None), {}, r"lowering target 'mine': give build"),
    (("mine", csr_copy), {"applies": 1}, "lowering target 'mine': applies must be callable, got 1"),
    (("mine", csr_copy), {"auto": "yes"}, "lowering target 'mine': auto must be True or False, got 'yes'"),
    (("mine", csr_copy), {"produces": int}, "lowering target 'mine': produces must be an nn.Module subclass"),
    (("mine", csr_copy), {"produces": fxs.SparseCSRLinear},
     "lowering target 'mine': SparseCSRLinear is already produced by the target 'csr'"),
    (("dense", csr_copy), {"replace": True}, "cannot register a lowering target named 'dense': it is auto's reference"),
    (("auto", csr_copy), {"replace": True}, "cannot register a lowering target named 'auto'"),
    (("int8", csr_copy), {}, "'int8' is a built-in lowering target; pass replace=True"),
])
def test_bad_registrations_are_refused(args, kwargs, message):
    before = lowering.lowering_targets()
    with pytest.raises(fxs.SparsityConfigError, match=message):
        fxs.register_lowering_target(*args, **kwargs)
    assert lowering.lowering_targets() == before


def test_unregister_errors():
    with pytest.raises(fxs.SparsityConfigError, match="no lowering target named 'nope'"):
        lowering.unregister_lowering_target("nope")
    with pytest.raises(fxs.SparsityConfigError, match="'csr' is a built-in lowering target and cannot be "
                                                      "unregistered"):
        lowering.unregister_lowering_target("csr")


def test_build_must_return_a_module(register, prepared):
    register("broken", lambda weight, bias, **_: 3, auto=False)
    with pytest.raises(TypeError, match=r"lowering target 'broken': build\(...\) returned int, not an nn.Module"):
        fxs.convert_fx_sparse(prepared, "broken")


def test_register_lowering_is_an_entry_of_the_same_registry(register, prepared):
    class Strategy(lowering.LoweringStrategy):
        def make(self, site, weight, mask, bias):
            return CSRCopyLinear(weight * mask, bias)

    target = lowering.register_lowering("by_strategy", Strategy)
    try:
        assert lowering.lowering_targets()["by_strategy"] is target and not target.auto
        assert isinstance(lowering.STRATEGIES["by_strategy"](lowering.LoweringOptions()), Strategy)
        lowered = fxs.convert_fx_sparse(prepared, "by_strategy")
        assert {type(lowered.get_submodule(n.target)) for n in sparse_nodes(lowered)} == {CSRCopyLinear}
        with pytest.raises(fxs.SparsityConfigError, match=r"or one of the names \['auto', 'bsr', 'by_strategy', "
                                                          r"'csr', 'dynamic', 'semi_structured', 'static'\]"):
            fxs.convert_fx_sparse(prepared, "fast")
    finally:
        lowering.unregister_lowering_target("by_strategy")
    assert "by_strategy" not in lowering.STRATEGIES


def test_docs_example_runs(capsys):
    """The snippet of docs/lowering.md, "Adding a lowering target", runs as written and leaves nothing behind."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "docs" / "lowering.md").read_text(encoding="utf-8")
    section = text[text.index("## Adding a lowering target"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    before = lowering.lowering_targets()
    namespace = {}
    try:
        exec(compile(block, "docs/lowering.md (Adding a lowering target)", "exec"), namespace)
    finally:
        if "half" in lowering.targets._USER:
            lowering.unregister_lowering_target("half")
    assert lowering.lowering_targets() == before
    half = namespace["HalfLinear"]
    assert all(isinstance(namespace[name].get_submodule("0"), half) for name in ("by_name", "by_class"))
    assert "'half': " in capsys.readouterr().out
