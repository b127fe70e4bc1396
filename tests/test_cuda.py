"""Every flow on CUDA, with float32, float16 and bfloat16 weights (``cuda`` marker: skipped without a GPU)."""
import io

import pytest
import torch
from torch import nn

import fx_sparsity as fxs

pytestmark = pytest.mark.cuda
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def model(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).to("cuda", dtype)


def batch(dtype, rows=16):
    return torch.randn(rows, 64, device="cuda", dtype=dtype)


@pytest.mark.parametrize("scope", ["model", "layers"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prepare_step_schedule_squash_on_the_gpu(dtype, scope):
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
    prepared = fxs.prepare_fx_sparse(model(dtype), sparsifier, scope=scope)
    assert all(sparsifier.get_mask(g["tensor_fqn"]).device.type == "cuda" for g in sparsifier.groups)
    assert all(sparsifier.get_mask(g["tensor_fqn"]).dtype == dtype for g in sparsifier.groups)
    scheduler = fxs.CubicSL(sparsifier, total_t=3)
    opt = torch.optim.SGD(prepared.parameters(), lr=0.01)
    for _ in range(4):
        loss = prepared(batch(dtype)).float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsifier.step()
        scheduler.step()
    x = batch(dtype)
    out = prepared(x)
    squashed = sparsifier.squash_mask()
    torch.testing.assert_close(squashed(x), out)
    assert (squashed[0].weight == 0).float().mean().item() == 0.5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compile_no_recompile_after_steps(dtype):
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.3)
    prepared = fxs.prepare_fx_sparse(model(dtype), sparsifier)
    compiled = torch.compile(prepared)
    x = batch(dtype)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(x)
        for level in (0.5, 0.8):
            for group in sparsifier.groups:
                group["sparsity_level"] = level
            sparsifier.step()
            torch.testing.assert_close(compiled(x), prepared(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_export_wanda_and_nm(dtype):
    wanda = fxs.WandaSparsifier(0.5)
    prepared = fxs.prepare_fx_sparse(model(dtype), wanda, tracer="export", example_inputs=(batch(dtype),))
    with torch.no_grad():
        prepared(batch(dtype, 32))  # another batch size: the batch dim is dynamic
    wanda.step()
    wanda.squash_mask()
    nm = fxs.NMSparsifier(2, 4)
    prepared = fxs.prepare_fx_sparse(model(dtype), nm)
    nm.step()
    mask = nm.get_mask("0.weight")
    assert ((mask != 0).reshape(128, -1, 4).sum(-1) == 2).all()


def test_state_dicts_load_across_devices():
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
    prepared = fxs.prepare_fx_sparse(model(torch.float32), sparsifier)
    sparsifier.step()
    buffer = io.BytesIO()
    torch.save({"model": prepared.state_dict(), "sparsifier": sparsifier.state_dict()}, buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), map_location="cpu")
    cpu_sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
    cpu_prepared = fxs.prepare_fx_sparse(model(torch.float32).cpu(), cpu_sparsifier)
    cpu_prepared.load_state_dict(saved["model"])
    cpu_sparsifier.load_state_dict(saved["sparsifier"])
    assert torch.equal(cpu_sparsifier.get_mask("0.weight"), sparsifier.get_mask("0.weight").cpu())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_structured_pruning_on_the_gpu(dtype):
    from models import SmallViT, resnet_like

    for make, shape in ((resnet_like, (2, 3, 16, 16)), (SmallViT, (2, 3, 16, 16))):
        net = make().to("cuda", dtype).eval()
        x = torch.randn(*shape, device="cuda", dtype=dtype)
        pruner = fxs.SaliencyPruner(0.5)
        masked = fxs.prepare_fx_sparse(net, pruner, example_inputs=(x,))
        assert all(pruner.get_mask(g["tensor_fqn"]).device.type == "cuda" for g in pruner.groups)
        pruner.step()
        pruned = pruner.prune()
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(pruned(x), masked(x), rtol=tolerance, atol=tolerance)
        assert next(pruned.parameters()).device.type == "cuda"
