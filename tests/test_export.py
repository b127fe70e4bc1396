"""torch.export of prepared modules, and the tracer="export" front end on models
``torch.fx.symbolic_trace`` cannot trace."""
import copy
import io

import pytest
import torch
from expecttest import TestCase
from models import encoder_layer, mlp, tied
from torch import nn
from torch.export import Dim

import fx_sparsity as fxs


def masked_reference(model, prepared):
    """``model`` with each configured weight multiplied by its mask from ``prepared``."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, mask in prepared.named_buffers():
            if name.endswith("_mask"):
                reference.get_parameter(name[: -len("_mask")]).mul_(mask)
    return reference


def mask_uses(ep):
    """``{mask fqn: [fqn of the tensor each aten.mul of that mask multiplies]}`` in an exported program."""
    sig = ep.graph_signature
    names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    uses = {}
    for node in ep.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.mul.Tensor:
            weight, mask = (names.get(a.name) for a in node.args)
            if mask in sig.buffers and mask.endswith("_mask"):
                uses.setdefault(mask, []).append(weight)
    return uses


class TestExportPrepared(TestCase):
    def test_exported_graph_reads_masks_as_buffers(self):
        sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
        prepared = fxs.prepare_fx_sparse(mlp(), sparsifier, [{"tensor_fqn": "2.weight"}])
        sparsifier.step()
        x = torch.randn(8, 16)
        ep = torch.export.export(prepared, (x,))
        self.assertEqual(list(ep.graph_signature.buffers), ["2.weight_mask"])
        self.assertExpectedInline(str(ep.graph_module.code).strip(), """\
def forward(self, p_0_weight, p_0_bias, p_2_weight, p_2_bias, p_4_weight, p_4_bias, b_2_weight_mask, input):
    input_1 = input
    linear = torch.ops.aten.linear.default(input_1, p_0_weight, p_0_bias);  input_1 = p_0_weight = p_0_bias = None
    relu = torch.ops.aten.relu.default(linear);  linear = None
    mul = torch.ops.aten.mul.Tensor(p_2_weight, b_2_weight_mask);  p_2_weight = b_2_weight_mask = None
    linear_1 = torch.ops.aten.linear.default(relu, mul, p_2_bias);  relu = mul = p_2_bias = None
    relu_1 = torch.ops.aten.relu.default(linear_1);  linear_1 = None
    linear_2 = torch.ops.aten.linear.default(relu_1, p_4_weight, p_4_bias);  relu_1 = p_4_weight = p_4_bias = None
    return (linear_2,)""")
        torch.testing.assert_close(ep.module()(x), prepared(x))
        # The program holds the live mask tensors (no copy): later mask updates reach it too.
        self.assertIs(ep.state_dict["2.weight_mask"], prepared.get_buffer("2.weight_mask"))
        sparsifier.groups[0]["sparsity_level"] = 0.9
        sparsifier.step()
        torch.testing.assert_close(ep.module()(x), prepared(x))


@pytest.mark.parametrize("name", ["mlp", "encoder", "tied"])
def test_export_runs_matches_and_lists_masks(name):
    if name == "mlp":
        model, inputs, tracer, config = mlp(), (torch.randn(8, 16),), "symbolic", None
        expected = {f"{i}.weight_mask": [f"{i}.weight"] for i in (0, 2, 4)}
    elif name == "encoder":  # traced by torch.export already, exported again
        model, inputs, tracer = encoder_layer(), (torch.randn(2, 5, 32),), "export"
        config = [{"tensor_fqn": "self_attn.in_proj_weight"}, {"tensor_fqn": "linear2.weight"}]
        expected = {"self_attn.in_proj_weight_mask": ["self_attn.in_proj_weight"],
                    "linear2.weight_mask": ["linear2.weight"]}
    else:  # one mask for the tied embedding / output projection, applied at both uses
        model, inputs, tracer = tied(), (torch.randint(0, 40, (3, 7)),), "symbolic"
        config = [{"tensor_fqn": "embed.weight"}]
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
    prepared = fxs.prepare_fx_sparse(model, sparsifier, config, tracer=tracer, example_inputs=inputs)
    sparsifier.step()
    ep = torch.export.export(prepared, inputs)
    uses = mask_uses(ep)
    assert sorted(b for b in ep.graph_signature.buffers if b.endswith("_mask")) == sorted(uses)
    if name == "tied":
        assert list(uses) == ["embed.weight_mask"] and len(uses["embed.weight_mask"]) == 2
    else:
        assert uses == expected
    torch.testing.assert_close(ep.module()(*inputs), prepared(*inputs))
    torch.testing.assert_close(ep.module()(*inputs), masked_reference(model, prepared)(*inputs))


def test_export_dynamic_batch_and_save_load_round_trip():
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.7)
    prepared = fxs.prepare_fx_sparse(mlp(), sparsifier)
    sparsifier.step()
    ep = torch.export.export(prepared, (torch.randn(8, 16),), dynamic_shapes=({0: Dim("batch")},))
    buffer = io.BytesIO()
    torch.export.save(ep, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    for fqn in ("0.weight_mask", "2.weight_mask", "4.weight_mask"):
        assert torch.equal(loaded.state_dict[fqn], prepared.get_buffer(fqn))
    for batch in (1, 3, 33):
        x = torch.randn(batch, 16)
        torch.testing.assert_close(loaded.module()(x), prepared(x))


def test_squashed_export_has_no_masks():
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
    prepared = fxs.prepare_fx_sparse(mlp(), sparsifier)
    sparsifier.step()
    x = torch.randn(4, 16)
    expected = prepared(x)
    ep = torch.export.export(sparsifier.squash_mask(), (x,))
    assert list(ep.graph_signature.buffers) == [] and mask_uses(ep) == {}
    torch.testing.assert_close(ep.module()(x), expected)
    assert (ep.state_dict["0.weight"] == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)


class ShapeBranch(nn.Module):
    """Python control flow on a shape: symbolic_trace cannot decide the branch."""

    def __init__(self):
        super().__init__()
        self.wide = nn.Linear(16, 8)
        self.narrow = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.wide(x) if x.shape[-1] == 16 else self.narrow(x)
        return self.head(h.relu())


class DictInput(nn.Module):
    """A dict of features in, one encoder per key: symbolic_trace cannot iterate a Proxy."""

    def __init__(self):
        super().__init__()
        self.enc = nn.ModuleDict({"text": nn.Linear(6, 8), "image": nn.Linear(10, 8)})
        self.head = nn.Linear(8, 3)

    def forward(self, batch):
        h = sum(self.enc[key](value) for key, value in batch.items())
        return self.head(h.tanh())


@pytest.mark.parametrize("make,inputs,error", [
    (ShapeBranch, lambda: (torch.randn(4, 16),), "cannot be used as inputs to control flow"),
    (DictInput, lambda: ({"text": torch.randn(4, 6), "image": torch.randn(4, 10)},), "Proxy object cannot be iterated"),
])
def test_export_tracer_handles_what_symbolic_trace_cannot(make, inputs, error):
    torch.manual_seed(0)
    model, inputs = make(), inputs()
    with pytest.raises(fxs.TraceError, match=rf'{error}(.|\n)*tracer="export"'):
        fxs.prepare_fx_sparse(model, fxs.WeightNormSparsifier())

    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
    prepared = fxs.prepare_fx_sparse(model, sparsifier, tracer="export", example_inputs=inputs)
    scheduler = fxs.LambdaSL(sparsifier, lambda epoch: min(1.0, 0.25 * (epoch + 1)))
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.1)
    for _ in range(4):  # the last step is at the full level: 0.5 * 1.0
        loss = prepared(*inputs).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sparsifier.step()
        scheduler.step()
    assert prepared.get_buffer("head.weight_mask").mean().item() == 0.5
    # The trained weights, masked, in the original (Python) model give the same answer.
    original = copy.deepcopy(model)
    original.load_state_dict({k: v for k, v in prepared.state_dict().items() if not k.endswith("_mask")})
    torch.testing.assert_close(prepared(*inputs), masked_reference(original, prepared)(*inputs))
    ep = torch.export.export(prepared, inputs)
    assert "head.weight_mask" in ep.graph_signature.buffers
    torch.testing.assert_close(ep.module()(*inputs), prepared(*inputs))


def test_export_specialises_control_flow_and_says_so_on_other_inputs():
    """torch.export keeps the branch of the example inputs; another shape fails loudly."""
    sparsifier = fxs.WeightNormSparsifier()
    prepared = fxs.prepare_fx_sparse(ShapeBranch(), sparsifier, tracer="export",
                                     example_inputs=(torch.randn(4, 16),))
    assert "narrow" not in {u.mul.args[1].target.split(".")[0] for u in fxs.passes.find_masked_uses(prepared)
                            if u.mul.users}
    with pytest.raises(AssertionError, match=r"Guard failed: x.size\(\)\[1\] == 16"):
        prepared(torch.randn(4, 4))
