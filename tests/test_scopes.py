"""Scoped preparation: the user's model kept, each layer (or block) traced alone and put in place."""
import copy

import pytest
import torch
import torch.ao.pruning as ao
from expecttest import TestCase
from models import BasicBlock, mlp, resnet_like, tied
from torch import fx, nn

import fx_sparsity as fxs

SCOPES = ["model", "layers", BasicBlock]
TRACERS = ["symbolic", "export"]


def _ids(value):
    return value.__name__ if isinstance(value, type) else str(value)


def mask_keys(module):
    return sorted(k for k in module.state_dict() if k.endswith("_mask"))


def graph_modules(module):
    return [name for name, m in module.named_modules() if isinstance(m, fx.GraphModule)]


class TestLayersMLP(TestCase):
    def prepare(self, scope, **kwargs):
        sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
        return fxs.prepare_fx_sparse(mlp(), sparsifier, scope=scope, **kwargs), sparsifier

    def test_the_users_model_with_graph_layers(self):
        model = mlp()
        prepared = fxs.prepare_fx_sparse(model, fxs.WeightNormSparsifier(), scope="layers")
        assert type(prepared) is nn.Sequential and prepared is not model
        assert graph_modules(prepared) == ["0", "2", "4"]
        assert all(type(model[i]) is nn.Linear for i in (0, 2, 4))  # the input is left as it was
        self.assertExpectedInline(prepared[0].code.strip(), """\
def forward(self, input : torch.Tensor) -> torch.Tensor:
    input_1 = input
    weight = self.weight
    weight_mask = self.weight_mask
    mul = torch.mul(weight, weight_mask);  weight = weight_mask = None
    bias = self.bias
    linear = torch._C._nn.linear(input_1, mul, bias);  input_1 = mul = bias = None
    return linear""")

    def test_masks_keys_and_outputs_equal_to_scope_model(self):
        (by_model, sp_model), (by_layers, sp_layers) = self.prepare("model"), self.prepare("layers")
        assert mask_keys(by_model) == mask_keys(by_layers) == ["0.weight_mask", "2.weight_mask", "4.weight_mask"]
        opt_a = torch.optim.SGD(by_model.parameters(), lr=0.1)
        opt_b = torch.optim.SGD(by_layers.parameters(), lr=0.1)
        for step in range(3):
            x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step))
            for prepared, opt, sparsifier in ((by_model, opt_a, sp_model), (by_layers, opt_b, sp_layers)):
                loss = prepared(x).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sparsifier.step()
            for key in mask_keys(by_model):
                assert torch.equal(by_model.get_buffer(key), by_layers.get_buffer(key))
            assert torch.allclose(by_model(x), by_layers(x), atol=1e-6)
        assert sp_model.state_dict()["groups"] == sp_layers.state_dict()["groups"]

    def test_squash_puts_the_original_classes_back(self):
        prepared, sparsifier = self.prepare("layers")
        sparsifier.step()
        x = torch.randn(4, 16)
        expected = prepared(x)
        layers_before = [prepared.get_submodule(f) for f in ("0", "2", "4")]
        squashed = sparsifier.squash_mask()
        assert squashed is prepared and graph_modules(squashed) == [] and mask_keys(squashed) == []
        assert all(type(squashed[i]) is nn.Linear for i in (0, 2, 4))
        assert not any(squashed[i] is m for i, m in zip((0, 2, 4), layers_before))
        assert torch.allclose(squashed(x), expected, atol=1e-6)
        assert (squashed[0].weight == 0).float().mean().item() == 0.5
        assert sparsifier.groups[0]["module"] is squashed[0]

    def test_torch_ao_state_dict_interop(self):
        prepared, sparsifier = self.prepare("layers")
        sparsifier.step()
        ao_model = mlp()
        ao_sparsifier = ao.WeightNormSparsifier(sparsity_level=0.5)
        ao_sparsifier.prepare(ao_model, None)
        ao_sparsifier.load_state_dict(copy.deepcopy(sparsifier.state_dict()))
        for group in ao_sparsifier.groups:
            fqn = group["tensor_fqn"]
            ao_mask = group["module"].parametrizations[group["tensor_name"]][0].mask
            assert torch.equal(ao_mask, prepared.get_buffer(fqn + "_mask"))
        stepped = ao.WeightNormSparsifier(sparsity_level=0.5)  # torch.ao's state holds masks it computed
        stepped.prepare(mlp(), None)
        stepped.step()  # same weights, same masks
        again, fresh = self.prepare("layers")
        fresh.load_state_dict(stepped.state_dict())
        assert torch.equal(again.get_buffer("2.weight_mask"), prepared.get_buffer("2.weight_mask"))

    def test_inplace_and_schedulers(self):
        model = mlp()
        sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.9)
        prepared = fxs.prepare_fx_sparse(model, sparsifier, scope="layers", inplace=True)
        assert prepared is model and graph_modules(model) == ["0", "2", "4"]
        scheduler = fxs.CubicSL(sparsifier, init_sl=0.0, init_t=0, delta_t=1, total_t=3)
        for _ in range(4):
            sparsifier.step()
            scheduler.step()
        assert (model.get_buffer("4.weight_mask") == 0).float().mean().item() == pytest.approx(0.9, abs=0.05)

    @pytest.mark.slow
    def test_compiled_no_recompile_after_step(self):
        prepared, sparsifier = self.prepare("layers")
        compiled = torch.compile(prepared)
        x = torch.randn(4, 16)
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled(x)
            for level in (0.3, 0.8):
                for group in sparsifier.groups:
                    group["sparsity_level"] = level
                sparsifier.step()
                assert torch.allclose(compiled(x), prepared(x), atol=1e-6)

    def test_lowering_and_printing(self):
        prepared, sparsifier = self.prepare("layers")
        for group in sparsifier.groups:
            group["sparsity_level"] = 0.9
        sparsifier.step()
        x = torch.randn(8, 16)
        calibration = [(torch.randn(8, 16),) for _ in range(4)]
        for mapping, kwargs, tol in ((fxs.get_sparse_csr_mapping(), {}, 1e-5), (None, {}, 5e-2),
                                     ("auto", {"example_inputs": (x,)}, 1e-5),
                                     ("static", {"calibration_data": calibration}, 1e-1)):
            lowered = fxs.convert_fx_sparse(prepared, mapping, **kwargs)
            assert type(lowered) is nn.Sequential and lowered is not prepared
            assert graph_modules(prepared) == ["0", "2", "4"]  # left as it was
            assert torch.allclose(lowered(x), prepared(x), atol=tol, rtol=tol)
        self.assertExpectedInline(fxs.format_sparse_graph(prepared, example_inputs=(torch.randn(2, 16),)), """\
node         op             target       shape        sparse tensor    level    block    zeros    lowered to
-----------  -------------  -----------  -----------  ---------------  -------  -------  -------  ------------
[0]          graph          Linear
input_1      placeholder    input        f32[2, 16]
weight       get_attr       weight       f32[32, 16]
weight_mask  get_attr       weight_mask  f32[32, 16]
mul          call_function  torch.mul    f32[32, 16]  0.weight         90.0%    1x4      89.8%
bias         get_attr       bias         f32[32]
linear       call_function  F.linear     f32[2, 32]
output       output                      f32[2, 32]
[2]          graph          Linear
input_1      placeholder    input        f32[2, 32]
weight       get_attr       weight       f32[32, 32]
weight_mask  get_attr       weight_mask  f32[32, 32]
mul          call_function  torch.mul    f32[32, 32]  2.weight         90.0%    1x4      89.8%
bias         get_attr       bias         f32[32]
linear       call_function  F.linear     f32[2, 32]
output       output                      f32[2, 32]
[4]          graph          Linear
input_1      placeholder    input        f32[2, 32]
weight       get_attr       weight       f32[10, 32]
weight_mask  get_attr       weight_mask  f32[10, 32]
mul          call_function  torch.mul    f32[10, 32]  4.weight         90.0%    1x4      90.0%
bias         get_attr       bias         f32[10]
linear       call_function  F.linear     f32[2, 10]
output       output                      f32[2, 10]

parameters: 1,930 total, 1,856 in 3 sparsified tensors
zeros: 1,668 = 89.9% of sparsified, 86.4% of all parameters
mask memory: 7.2 KiB in 3 buffers (f32)
model bytes (state_dict): 14.8 KiB including masks""")

    def test_wanda_per_layer_graph_equals_model_scope(self):
        masks = {}
        for scope in ("model", "layers"):
            sparsifier = fxs.WandaSparsifier(sparsity_level=0.5)
            prepared = fxs.prepare_fx_sparse(mlp(), sparsifier, scope=scope)
            with torch.no_grad():
                for seed in range(3):
                    prepared(torch.randn(16, 16, generator=torch.Generator().manual_seed(seed)))
            sparsifier.step()
            masks[scope] = {k: prepared.get_buffer(k).clone() for k in mask_keys(prepared)}
            squashed = sparsifier.squash_mask()
            assert not any("observer" in name for name, _ in squashed.named_modules())
        assert masks["model"].keys() == masks["layers"].keys()
        assert all(torch.equal(masks["model"][k], masks["layers"][k]) for k in masks["model"])


class TestTied(TestCase):
    def test_one_mask_at_every_use_and_through_dtype_moves(self):
        model = tied()
        sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
        prepared = fxs.prepare_fx_sparse(model, sparsifier, [{"tensor_fqn": "out.weight"}], scope="layers")
        assert graph_modules(prepared) == ["embed", "out"]  # the embedding reads the tied weight too
        assert mask_keys(prepared) == ["out.weight_mask"]
        tokens = torch.tensor([[1, 2, 3, 4]])

        def reference():
            masked = copy.deepcopy(model).to(prepared.out.weight.dtype)
            with torch.no_grad():
                masked.out.weight.mul_(prepared.get_buffer("out.weight_mask").to(masked.out.weight.dtype))
            return masked(tokens)

        sparsifier.step()
        assert torch.allclose(prepared(tokens), reference(), atol=1e-6)
        prepared.double()  # the two graphs' mask buffers are now two tensors ...
        for group in sparsifier.groups:
            group["sparsity_level"] = 0.75
        sparsifier.step()  # ... and only the owner's is written
        assert torch.allclose(prepared(tokens), reference(), atol=1e-6)  # the reader follows the owner
        assert prepared.embed.weight_mask is prepared.out.weight_mask
        squashed = sparsifier.squash_mask()
        assert squashed.embed.weight is squashed.out.weight
        assert (squashed.out.weight == 0).double().mean().item() == 0.75


@pytest.mark.parametrize("tracer", ["symbolic", pytest.param("export", marks=pytest.mark.slow)])
@pytest.mark.parametrize("scope", SCOPES, ids=_ids)
def test_resnet_like_trains_the_same_in_every_scope(scope, tracer):
    """BatchNorm and dropout in train mode; the same masks, losses and weights as the reference run."""
    config = [{"tensor_fqn": f}
              for f in ("layer1.0.conv1.weight", "layer2.0.conv2.weight", "layer2.0.downsample.0.weight", "fc.weight")]

    def run(scope, tracer):
        sparsifier = fxs.GlobalMagnitudeSparsifier(sparsity_level=0.5)
        kwargs = {"example_inputs": (torch.randn(2, 3, 8, 8),)} if tracer == "export" else {}
        prepared = fxs.prepare_fx_sparse(resnet_like(), sparsifier, config, scope=scope, tracer=tracer, **kwargs)
        if scope != "model":
            assert type(prepared).__name__ == "SmallResNet"
        opt = torch.optim.SGD(prepared.parameters(), lr=0.05, momentum=0.9)
        prepared.train()
        losses = []
        for step in range(3):
            torch.manual_seed(step)
            x = torch.randn(4 + step, 3, 8 + 2 * step, 8 + 2 * step)  # other batch and image sizes each step
            loss = prepared(x).logsumexp(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sparsifier.step()
            losses.append(loss.item())
        prepared.eval()
        x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(9))
        out = prepared(x)
        state = {k: v.clone() for k, v in prepared.state_dict().items()}
        squashed = sparsifier.squash_mask()
        assert torch.allclose(squashed(x), out, atol=1e-5)
        return losses, state, out, squashed

    losses, state, out, squashed = run(scope, tracer)
    ref_losses, ref_state, ref_out, _ = run("model", "symbolic")
    assert losses == pytest.approx(ref_losses, abs=1e-5)
    assert sorted(state) == sorted(ref_state)  # same state-dict keys, masks and running statistics included
    for key in ref_state:
        assert torch.allclose(state[key].double(), ref_state[key].double(), atol=1e-5), key
    assert torch.allclose(out, ref_out, atol=1e-5)
    if scope != "model":
        assert graph_modules(squashed) == [] and mask_keys(squashed) == []
        assert type(squashed.layer1[0]) is BasicBlock and type(squashed.fc) is nn.Linear


def test_block_scope_makes_one_graph_per_outermost_block():
    sparsifier = fxs.GlobalMagnitudeSparsifier(sparsity_level=0.5)
    config = [{"tensor_fqn": "layer1.0.conv1.weight"}, {"tensor_fqn": "fc.weight"}]
    prepared = fxs.prepare_fx_sparse(resnet_like(), sparsifier, config, scope=BasicBlock)
    assert graph_modules(prepared) == ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "fc"]
    assert mask_keys(prepared) == ["fc.weight_mask", "layer1.0.conv1.weight_mask"]
    assert sparsifier.groups[0]["module"] is prepared.get_submodule("layer1.0.conv1")
