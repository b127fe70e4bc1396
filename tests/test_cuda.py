"""Every flow on CUDA, with float32, float16 and bfloat16 weights (``cuda`` marker: skipped without a GPU)."""
import copy
import io

import models
import pytest
import torch
from torch import nn

import fx_sparsity as fxs

pytestmark = pytest.mark.cuda
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled code is cached per code object: another dtype's earlier compile would count as a recompile."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


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
    scheduler = fxs.CubicSL(sparsifier, init_sl=0.0, delta_t=1, total_t=3)
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
    assert (squashed.get_submodule("0").weight == 0).float().mean().item() == 0.5


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
def test_compile_scope_layers_no_recompile(dtype):
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.3)
    prepared = fxs.prepare_fx_sparse(model(dtype), sparsifier, scope="layers")
    assert type(prepared) is nn.Sequential
    compiled = torch.compile(prepared)
    x = batch(dtype)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(x)
        for group in sparsifier.groups:
            group["sparsity_level"] = 0.7
        sparsifier.step()
        torch.testing.assert_close(compiled(x), prepared(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_export_wanda_sparsegpt_and_nm(dtype):
    wanda = fxs.WandaSparsifier(0.5)
    prepared = fxs.prepare_fx_sparse(model(dtype), wanda, tracer="export", example_inputs=(batch(dtype),))
    with torch.no_grad():
        prepared(batch(dtype, 32))  # another batch size: the batch dim is dynamic
    wanda.step()
    wanda.squash_mask()
    sparsegpt = fxs.SparseGPTSparsifier(0.5)
    prepared = fxs.prepare_fx_sparse(model(dtype), sparsegpt)
    with torch.no_grad():
        prepared(batch(dtype, 64))
    sparsegpt.step()
    weight = sparsegpt.squash_mask().get_submodule("0").weight
    assert weight.device.type == "cuda" and weight.dtype == dtype and bool(torch.isfinite(weight).all())
    assert (weight == 0).float().mean().item() == 0.5
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
    # and back: saved on the CPU, loaded onto the GPU
    buffer = io.BytesIO()
    torch.save({"model": cpu_prepared.state_dict(), "sparsifier": cpu_sparsifier.state_dict()}, buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), map_location="cuda")
    gpu_sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
    gpu_prepared = fxs.prepare_fx_sparse(model(torch.float32), gpu_sparsifier)
    gpu_prepared.load_state_dict(saved["model"])
    gpu_sparsifier.load_state_dict(saved["sparsifier"])
    assert gpu_sparsifier.get_mask("0.weight").device.type == "cuda"
    x = batch(torch.float32)
    torch.testing.assert_close(gpu_prepared(x).cpu(), cpu_prepared(x.cpu()))


def test_ddp_on_the_gpu(tmp_path):
    """NCCL with a GPU per rank where two exist, gloo with both ranks on one GPU otherwise."""
    import _distributed_worker as worker

    ranks = worker.spawn(worker.run_ddp_on_gpus, 2, tmp_path)
    expected_backend = "nccl" if torch.cuda.device_count() >= 2 else "gloo"
    reference = worker.reference(2)  # one process on the CPU, both ranks' batches
    for rank in ranks:
        assert rank["backend"] == expected_backend and all(d.startswith("cuda") for d in rank["mask_devices"])
    for step, (a, b, want) in enumerate(zip(ranks[0]["records"], ranks[1]["records"], reference)):
        for k in a["masks"]:
            assert torch.equal(a["masks"][k], b["masks"][k]), (step, k)
            agree = (a["masks"][k] == want["masks"][k]).float().mean().item()
            assert agree >= 0.99, (step, k, agree)
        for k in a["weights"]:
            assert torch.equal(a["weights"][k], b["weights"][k]), (step, k)
            torch.testing.assert_close(a["weights"][k], want["weights"][k], rtol=1e-4, atol=1e-5)
    assert ranks[0]["records"][-1]["levels"] == [0.75, 0.75, 0.5]


@pytest.mark.parametrize("dtype,tf32", [(torch.float32, True), (torch.float32, False), (torch.float16, True),
                                        (torch.bfloat16, True)], ids=str)
def test_structured_pruning_on_the_gpu(dtype, tf32):
    """CUDA convolutions run float32 in TF32 by default (cudnn.allow_tf32): prune() must not take that for a wrong cut."""
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=tf32):
        _prune_and_compare(dtype, 1e-5 if dtype == torch.float32 and not tf32 else 2e-2)


def _prune_and_compare(dtype, tolerance):
    for make, shape in ((models.resnet_like, (2, 3, 16, 16)), (models.SmallViT, (2, 3, 16, 16))):
        net = make().to("cuda", dtype).eval()
        x = torch.randn(*shape, device="cuda", dtype=dtype)
        pruner = fxs.SaliencyPruner(0.5)
        masked = fxs.prepare_fx_sparse(net, pruner, example_inputs=(x,))
        assert all(pruner.get_mask(g["tensor_fqn"]).device.type == "cuda" for g in pruner.groups)
        pruner.step()
        pruned = pruner.prune()
        torch.testing.assert_close(pruned(x), masked(x), rtol=tolerance, atol=tolerance)
        assert next(pruned.parameters()).device.type == "cuda"


def test_to_cuda_keeps_masks_and_steps_on_device():
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
    prepared = fxs.prepare_fx_sparse(models.mlp(), sparsifier, [{"tensor_fqn": "0.weight", "mask_dtype": torch.bool},
                                                         {"tensor_fqn": "2.weight"}])
    sparsifier.step()
    cpu = copy.deepcopy(prepared)
    prepared.to("cuda")
    for fqn in ("0.weight", "2.weight"):
        assert sparsifier.get_mask(fqn).device.type == "cuda"
        assert torch.equal(sparsifier.get_mask(fqn).cpu(), cpu.get_buffer(fqn + "_mask"))
    assert sparsifier.get_mask("0.weight").dtype == torch.bool
    for group in sparsifier.groups:
        group["sparsity_level"] = 0.75
    sparsifier.step()
    assert sparsifier.get_mask("2.weight").device.type == "cuda"
    assert sparsifier.get_mask("2.weight").mean().item() == 0.25
    x = torch.randn(3, 16)
    torch.testing.assert_close(prepared(x.cuda()).cpu(), prepared.cpu()(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_recurrent_layers_on_the_gpu(dtype):
    """cuDNN runs the written-out LSTM: masks on its weights train; its hidden units are cut exactly."""
    torch.manual_seed(0)
    tagger = nn.Sequential(nn.Embedding(50, 16), nn.LSTM(16, 32, num_layers=2, batch_first=True))

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = tagger, nn.Linear(32, 5)

        def forward(self, tokens):
            return self.head(self.body(tokens)[0])

    model = Tagger().to("cuda", dtype)
    tokens = torch.randint(0, 50, (4, 9), device="cuda")
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
    prepared = fxs.prepare_fx_sparse(model, sparsifier, [{"tensor_fqn": "body.1.weight_hh_l0"}])
    sparsifier.step()
    prepared(tokens).float().square().mean().backward()
    mask = sparsifier.get_mask("body.1.weight_hh_l0")
    assert mask.device.type == "cuda" and bool((prepared.get_parameter("body.1.weight_hh_l0").grad[mask == 0] == 0).all())
    pruner = fxs.SaliencyPruner(0.5)
    masked = fxs.prepare_fx_sparse(model, pruner, [{"tensor_fqn": "body.1.weight_ih_l0"}], example_inputs=(tokens,))
    pruner.step()
    small = pruner.prune().eval()
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(small(tokens), masked.eval()(tokens), rtol=rtol, atol=rtol)
    assert small.get_submodule("body.1").hidden_size == 16
