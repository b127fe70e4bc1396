"""torch.compile of prepared modules: whole-graph capture, in-place mask updates, no recompiles.

Compiles are the slow part (seconds each on a small CPU), so each test compiles once and
checks everything it can against that one compiled module. The real compiler (inductor)
runs where numbers or generated code matter; ``CompileCounter`` (dynamo capture only, no
code generation) counts graphs where only capture and guards matter.
"""
import copy

import pytest
import torch
import torch._dynamo
import torch._inductor.config
from models import cnn, encoder_layer, mlp, tied
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

import fx_sparsity as fxs

pytestmark = pytest.mark.slow  # the quick loop (-m 'not slow') skips it; CI runs it


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Magnitude(fxs.BaseSparsifier):
    """Zero the ``sparsity_level`` fraction of smallest |w·mask| (any shape: conv kernels too)."""

    def __init__(self, sparsity_level=0.5):
        super().__init__({"sparsity_level": sparsity_level})

    def update_mask(self, module, tensor_name, mask, sparsity_level, **kwargs):
        scores = (getattr(module, tensor_name) * mask).abs().flatten()
        keep = torch.ones_like(scores)
        keep[scores.argsort()[: int(sparsity_level * scores.numel())]] = 0
        mask.copy_(keep.view_as(mask))


def _case(name, mask_dtype=None):
    """(prepared, sparsifier, inputs) for each model family of the suite."""
    if name == "mlp":
        model, sparsifier, tracer, inputs = mlp(), fxs.WeightNormSparsifier(0.6), "symbolic", (torch.randn(8, 16),)
        config = [{"tensor_fqn": f"{i}.weight"} for i in (0, 2, 4)]
    elif name == "cnn":
        model, sparsifier, tracer, inputs = cnn(), Magnitude(0.6), "symbolic", (torch.randn(2, 3, 8, 8),)
        config = [{"tensor_fqn": f"{m}.weight"} for m in ("conv1", "conv2", "fc")]
    elif name == "encoder":
        model, sparsifier, tracer, inputs = encoder_layer(), fxs.WeightNormSparsifier(0.6), "export", (
            torch.randn(2, 5, 32),)
        config = [{"tensor_fqn": f} for f in ("self_attn.in_proj_weight", "self_attn.out_proj.weight",
                                               "linear1.weight", "linear2.weight")]
    elif name == "tied":  # the embedding is the output projection: one mask, two uses
        model, sparsifier, tracer, inputs = tied(), fxs.WeightNormSparsifier(0.6), "symbolic", (
            torch.randint(0, 40, (3, 7)),)
        config = [{"tensor_fqn": "out.weight"}, {"tensor_fqn": "hidden.weight"}]
    if mask_dtype is not None:
        config = [{**entry, "mask_dtype": mask_dtype} for entry in config]
    prepared = fxs.prepare_fx_sparse(model, sparsifier, config, tracer=tracer, example_inputs=inputs)
    return prepared, sparsifier, inputs


def _forward_backward(call, prepared, inputs):
    for p in prepared.parameters():
        p.grad = None
    out = call(*inputs)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in prepared.named_parameters(remove_duplicate=False)}


@pytest.mark.parametrize("name", ["mlp", "cnn", "encoder", "tied"])
def test_compiled_forward_backward_follow_every_mask_update(name):
    prepared, sparsifier, inputs = _case(name)
    scheduler = fxs.CubicSL(sparsifier, total_t=3, delta_t=1)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(prepared, backend=counter, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for update in range(4):
            out, grads = _forward_backward(compiled, prepared, inputs)
            eager_out, eager_grads = _forward_backward(prepared, prepared, inputs)
            torch.testing.assert_close(out, eager_out)
            for n in grads:
                torch.testing.assert_close(grads[n], eager_grads[n], msg=f"update {update}, grad of {n}")
            for group in sparsifier.groups:  # a pruned weight gets no gradient through the mask
                pruned = sparsifier.get_mask(group["tensor_fqn"]) == 0
                assert torch.all(grads[group["tensor_fqn"]][pruned] == 0)
            sparsifier.step()
            scheduler.step()
    levels = [sparsifier.get_mask(g["tensor_fqn"]).eq(0).float().mean().item() for g in sparsifier.groups]
    assert all(level > 0.4 for level in levels), levels  # the masks really moved under the compiled module
    assert counter.frame_count == 1


@pytest.mark.parametrize("name,mask_dtype", [("mlp", None), ("mlp", torch.bool), ("encoder", None)])
def test_zero_recompiles_over_a_training_run(name, mask_dtype):
    prepared, sparsifier, inputs = _case(name, mask_dtype)
    scheduler = fxs.CubicSL(sparsifier, total_t=20, delta_t=1)
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.01, momentum=0.9)
    counter = CompileCounter()  # dynamo capture and guards only: that is where recompiles happen
    compiled = torch.compile(prepared, backend=counter, fullgraph=True)
    masks_seen = set()
    storage = {g["tensor_fqn"]: sparsifier.get_mask(g["tensor_fqn"]).data_ptr() for g in sparsifier.groups}
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(30):
            out = compiled(*inputs)
            # A graph that had captured mask values as constants would drift from eager here.
            torch.testing.assert_close(out, prepared(*inputs))
            optimizer.zero_grad()
            out.square().mean().backward()
            optimizer.step()
            sparsifier.step()
            scheduler.step()
            masks_seen.add(int(sparsifier.get_mask(sparsifier.groups[0]["tensor_fqn"]).sum()))
    assert len(masks_seen) > 10
    # Same tensors, new values: nothing dynamo guards on has changed.
    assert storage == {fqn: sparsifier.get_mask(fqn).data_ptr() for fqn in storage}
    assert counter.frame_count == 1
    assert counter.op_count > 0


def test_training_loop_compiled_matches_eager():
    """Optimizer + sparsifier + scheduler on the compiled module: same masks and weights as eager."""
    runs = []
    for compile_it in (False, True):
        torch.manual_seed(0)
        sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.8, sparse_block_shape=(1, 4))
        prepared = fxs.prepare_fx_sparse(mlp(), sparsifier)
        scheduler = fxs.CubicSL(sparsifier, total_t=5, delta_t=1)
        optimizer = torch.optim.SGD(prepared.parameters(), lr=0.05, momentum=0.9)
        counter = CompileCounterWithBackend("inductor")
        module = torch.compile(prepared, backend=counter, fullgraph=True) if compile_it else prepared
        data = torch.Generator().manual_seed(1)
        history = []
        for _ in range(8):
            x, target = torch.randn(8, 16, generator=data), torch.randn(8, 10, generator=data)
            loss = torch.nn.functional.mse_loss(module(x), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            sparsifier.step()
            scheduler.step()
            history.append(({g["tensor_fqn"]: sparsifier.get_mask(g["tensor_fqn"]).clone() for g in sparsifier.groups},
                            {k: v.detach().clone() for k, v in prepared.named_parameters()}, loss.item()))
        runs.append((history, counter.frame_count, sparsifier))
    (eager, _, _), (compiled, frames, sparsifier) = runs
    assert frames == 1
    for step, ((eager_masks, eager_params, eager_loss), (masks, params, loss)) in enumerate(zip(eager, compiled)):
        for fqn in masks:
            assert torch.equal(masks[fqn], eager_masks[fqn]), f"step {step}: mask of {fqn} differs"
        for fqn in params:
            torch.testing.assert_close(params[fqn], eager_params[fqn], rtol=1e-5, atol=1e-6,
                                       msg=f"step {step}: {fqn}")
        assert loss == pytest.approx(eager_loss, rel=1e-5)
    assert sparsifier.get_mask("0.weight").mean().item() == pytest.approx(0.2, abs=0.01)


def test_module_changes_after_compile_are_picked_up():
    """``.double()`` swaps every buffer and ``squash_mask`` rewrites the graph: each costs one
    recompile, never a stale result."""
    prepared, sparsifier, (x,) = _case("mlp")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(prepared, backend=counter, fullgraph=True)
    sparsifier.step()
    torch.testing.assert_close(compiled(x), prepared(x))

    prepared.double()
    sparsifier.groups[0]["sparsity_level"] = 0.9
    sparsifier.step()  # writes the new float64 buffers
    assert prepared.get_buffer("0.weight_mask").dtype == torch.float64
    torch.testing.assert_close(compiled(x.double()), prepared(x.double()))
    assert counter.frame_count == 2

    sparsifier.squash_mask()
    assert not [n for n, _ in prepared.named_buffers() if n.endswith("_mask")]
    torch.testing.assert_close(compiled(x.double()), prepared(x.double()))
    assert counter.frame_count == 3


def test_inductor_freezing_bakes_masks_in_so_squash_before_compiling():
    """Documented pitfall: with ``torch._inductor.config.freezing`` (inference), inductor folds
    buffers into constants, so later mask updates are not seen. Squash first, then compile."""
    prepared, sparsifier, (x,) = _case("mlp")
    sparsifier.step()
    with torch._inductor.config.patch(freezing=True), torch.no_grad():
        frozen = torch.compile(prepared)
        torch.testing.assert_close(frozen(x), prepared(x))
        sparsifier.groups[0]["sparsity_level"] = 0.95
        sparsifier.step()
        assert not torch.allclose(frozen(x), prepared(x))  # stale: the old mask is a constant

        squashed = copy.deepcopy(sparsifier).squash_mask()
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(squashed)(x), prepared(x))


@pytest.mark.parametrize("mapping", ["dynamic", "static"])
def test_lowered_module_compiles_around_the_sparse_kernels(mapping):
    """Lowered Linears call torch.ao's sparse int8 ops on TorchScript packed weights, which
    dynamo cannot put in a graph: ``torch.compile`` runs them eagerly between graphs (same
    answer, nothing gained) and ``fullgraph=True`` refuses. Compile the float module instead."""
    prepared, sparsifier, (x,) = _case("mlp")
    sparsifier.step()
    if mapping == "dynamic":
        lowered = fxs.convert_fx_sparse(prepared)
    else:
        lowered = fxs.convert_fx_sparse(prepared, fxs.get_static_sparse_quantized_mapping(),
                                        calibration_data=[(torch.randn(8, 16),) for _ in range(4)])
    assert sum(hasattr(m, "fx_sparsity_info") for m in lowered.modules()) == 3
    with torch.no_grad():
        expected = lowered(x)
        torch.testing.assert_close(torch.compile(lowered, backend="aot_eager")(x), expected, rtol=0, atol=0)
        torch._dynamo.reset()
        # Dynamic: our kernel modules refuse with a message naming the way out; static stops
        # earlier, at torch.ao's Quantize boundary module.
        match = "compile the prepared or squashed float module" if mapping == "dynamic" else ""
        with pytest.raises(torch._dynamo.exc.TorchDynamoException, match=match):
            torch.compile(lowered, backend="aot_eager", fullgraph=True)(x)
