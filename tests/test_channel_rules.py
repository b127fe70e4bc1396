"""register_channel_rule: teaching the structured analysis a layer or an op of one's own."""
import os
import re

import pytest
import torch
from torch import nn

import fx_sparsity as fxs
from fx_sparsity.passes.channels import ChannelRule, ChannelRuleError, unregister_channel_rule
from fx_sparsity.passes.channels.registry import restore_user_rules, user_rules
from fx_sparsity.structured import SaliencyPruner, find_channel_groups
from fx_sparsity.tracing import trace


@pytest.fixture(autouse=True)
def no_rule_leaks():
    """Every test starts and ends with the user rules it found."""
    saved = user_rules()
    yield
    restore_user_rules(saved)


class DataScale(nn.Module):
    """A per-channel scale (channels at dim 1) whose forward branches on the data and reads every channel:
    symbolic tracing cannot enter it, and its output depends on all of its input."""

    def __init__(self, channels):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(channels) + 0.5)
        self.channels = channels

    def forward(self, x):
        s = self.scale.view(-1, *([1] * (x.dim() - 2)))
        total = x.sum()
        if total > 0:
            out = x * s
        else:
            out = -x * s
        return out / (1 + total.abs())


@torch.library.custom_op("fxs_test::scale", mutates_args=())
def scale_op(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    s = s.view(-1, *([1] * (x.dim() - 2)))
    return x * s if x.sum() > 0 else x * s * 2  # data-dependent: torch.export sees one opaque op


@scale_op.register_fake
def _(x, s):
    return torch.empty_like(x)


def wrapped_gate(x, s):
    """A function symbolic tracing keeps as one call (torch.fx.wrap), branching on the data."""
    s = s.view(-1, *([1] * (x.dim() - 2)))
    return x * s if x.sum() > 0 else -x * s


torch.fx.wrap("wrapped_gate")


class ConvNet(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.conv1, self.gate, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), layer, nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.conv3(torch.relu(self.conv2(torch.relu(self.gate(self.conv1(x))))))


class OpNet(nn.Module):
    """conv → the custom op with a per-channel parameter → conv."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3)
        self.s = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        return self.conv2(torch.relu(scale_op(self.conv1(x), self.s)))


def pruned_pair(model, x, **kwargs):
    torch.manual_seed(0)
    pruner = SaliencyPruner(0.5)
    prepared = fxs.prepare_fx_sparse(model, pruner, example_inputs=(x,), **kwargs)
    pruner.step()
    return pruner, prepared.eval(), pruner.prune().eval()


def test_a_data_branching_layer_registered_same_is_a_leaf_and_its_per_channel_parameter_is_cut():
    torch.manual_seed(0)
    fxs.register_channel_rule(DataScale, "same", per_channel=("scale",))
    model, x = ConvNet(DataScale(8)).eval(), torch.randn(2, 3, 8, 8)
    pruner, masked, pruned = pruned_pair(model, x)
    assert [g["tensor_fqn"] for g in pruner.groups] == ["conv1.weight", "conv2.weight"]
    assert any(n.op == "call_module" and n.target == "gate" for n in masked.graph.nodes)  # kept whole
    assert pruned.gate.scale.shape == (4,) and pruned.conv1.weight.shape[0] == 4 and pruned.conv2.in_channels == 4
    torch.testing.assert_close(pruned(x), masked(x))
    torch.testing.assert_close(pruned(-x), masked(-x))  # the other branch


def test_a_registered_layer_between_linears():
    torch.manual_seed(0)
    fxs.register_channel_rule(DataScale, "same", per_channel="scale")
    model = nn.Sequential(nn.Linear(6, 16), DataScale(16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(4, 6)
    pruner, masked, pruned = pruned_pair(model, x)
    assert pruned.get_submodule("1").scale.shape == (8,) and pruned.get_submodule("3").in_features == 8
    torch.testing.assert_close(pruned(x), masked(x))


def test_a_layer_registered_fixed_keeps_its_channels_and_the_rest_still_prunes():
    torch.manual_seed(0)
    fxs.register_channel_rule(DataScale, "fixed")
    model, x = ConvNet(DataScale(8)).eval(), torch.randn(2, 3, 8, 8)
    groups = {g.anchor[0]: g for g in find_channel_groups(trace(model), (x,))}
    assert not groups["conv1.weight"].prunable and "registered as \"fixed\"" in groups["conv1.weight"].problem
    assert groups["conv2.weight"].prunable
    pruner, masked, pruned = pruned_pair(model, x)
    assert [g["tensor_fqn"] for g in pruner.groups] == ["conv2.weight"]
    assert pruned.conv1.out_channels == 8 and pruned.gate.scale.shape == (8,) and pruned.conv2.out_channels == 4
    torch.testing.assert_close(pruned(x), masked(x))
    with pytest.raises(fxs.SparsityConfigError, match="registered as \"fixed\""):
        SaliencyPruner().prepare(model, [{"tensor_fqn": "conv1.weight"}], example_inputs=(x,))


@pytest.mark.parametrize("target", [scale_op, torch.ops.fxs_test.scale, torch.ops.fxs_test.scale.default],
                         ids=["custom_op", "packet", "overload"])
def test_a_custom_op_under_export_with_a_per_channel_argument(target):
    torch.manual_seed(0)
    model, x = OpNet().eval(), torch.randn(2, 3, 8, 8)
    with fxs.register_channel_rule(target, "same", per_channel=(1,)):
        pruner, masked, pruned = pruned_pair(model, x, tracer="export")
    assert [g["tensor_fqn"] for g in pruner.groups] == ["conv1.weight"]
    assert pruned.s.shape == (4,) and pruned.conv2.weight.shape[1] == 4
    torch.testing.assert_close(pruned(x), masked(x))
    torch.testing.assert_close(pruned(-x), masked(-x))


class WrappedNet(OpNet):
    def forward(self, x):
        return self.conv2(torch.relu(wrapped_gate(self.conv1(x), self.s)))


def test_a_wrapped_function_under_symbolic_tracing():
    torch.manual_seed(0)
    fxs.register_channel_rule(wrapped_gate, "same", per_channel=(1,))
    model, x = WrappedNet().eval(), torch.randn(2, 3, 8, 8)
    _, masked, pruned = pruned_pair(model, x)
    assert pruned.s.shape == (4,)
    torch.testing.assert_close(pruned(x), masked(x))


def test_an_unregistered_custom_op_refuses_its_group_and_says_how_to_describe_it():
    model, x = OpNet().eval(), torch.randn(2, 3, 8, 8)
    with pytest.raises(fxs.SparsityConfigError, match=r"\(scale\) is not an op whose channel coupling fx_sparsity "
                                                      r"follows; describe it with fx_sparsity.register_channel_rule\("
                                                      r"torch.ops.fxs_test.scale, \"same\"\)"):
        SaliencyPruner().prepare(model, [{"tensor_fqn": "conv1.weight"}], example_inputs=(x,), tracer="export")


def test_an_unregistered_data_branching_layer_is_named_with_register_channel_rule():
    model = ConvNet(DataScale(8))
    with pytest.raises(fxs.TraceError, match=r"inside 'gate' \(DataScale\)(.|\n)*"
                                             r"fx_sparsity.register_channel_rule\(DataScale, \"same\"\)"):
        fxs.prepare_fx_sparse(model, SaliencyPruner(), example_inputs=(torch.randn(2, 3, 8, 8),))


def test_a_leaf_layer_without_a_rule_names_itself_and_register_channel_rule():
    model, x = ConvNet(nn.LocalResponseNorm(2)).eval(), torch.randn(2, 3, 8, 8)
    with pytest.raises(fxs.SparsityConfigError, match=r"\(LocalResponseNorm\) is not an op whose channel coupling "
                                                      r"fx_sparsity follows; describe it with "
                                                      r"fx_sparsity.register_channel_rule\(LocalResponseNorm"):
        SaliencyPruner().prepare(model, [{"tensor_fqn": "conv1.weight"}], example_inputs=(x,))
    fxs.register_channel_rule(nn.LocalResponseNorm, "fixed")  # it mixes neighbouring channels: they stay
    with pytest.raises(fxs.SparsityConfigError, match="registered as \"fixed\""):
        SaliencyPruner().prepare(model, [{"tensor_fqn": "conv1.weight"}], example_inputs=(x,))


def test_registering_again_replaces_the_rule_and_remove_or_unregister_undo_it():
    model, x = ConvNet(DataScale(8)).eval(), torch.randn(2, 3, 8, 8)

    def conv1_prunable():
        groups = find_channel_groups(trace(model), (x,))
        return next(g for g in groups if g.anchor[0] == "conv1.weight").prunable

    same = fxs.register_channel_rule(DataScale, "same", per_channel=("scale",))
    fixed = fxs.register_channel_rule(DataScale, "fixed")
    assert not conv1_prunable()
    fixed.remove()
    assert conv1_prunable()
    same.remove()
    with pytest.raises(fxs.TraceError):
        trace(model)  # traced into again
    fxs.register_channel_rule(DataScale, "same", per_channel=("scale",))
    assert unregister_channel_rule(DataScale) and not unregister_channel_rule(DataScale)
    with pytest.raises(fxs.TraceError, match="register_channel_rule"):
        SaliencyPruner().prepare(model, example_inputs=(x,))


def test_a_registered_layer_stays_a_leaf_for_the_unstructured_sparsifiers_too():
    torch.manual_seed(0)
    fxs.register_channel_rule(DataScale, "same", per_channel=("scale",))
    model = nn.Sequential(nn.Linear(8, 16), DataScale(16), nn.Linear(16, 4))
    prepared = fxs.prepare_fx_sparse(model, fxs.WeightNormSparsifier(), [{"tensor_fqn": "2.weight"}])
    assert any(n.op == "call_module" and n.target == "1" for n in prepared.graph.nodes)


class ScaleRule(ChannelRule):
    """The full form: DataScale's channels at dim 1 flow through, its scale is cut with them, its input is masked,
    and its ``channels`` attribute follows the cut."""

    def follow_module(self, t, node, module):
        x = node.args[0]
        block = t.tensor_block(module.scale, 0, 1, len(t.shape(x)))
        joined = t.join_blocks([*t.value(x), block])
        for blk in joined:
            t.sink(node, 0, x, blk)
        t.values[node] = joined
        return True

    def update_attributes(self, module):
        module.channels = module.scale.shape[0]


def test_a_rule_class_is_the_full_form():
    torch.manual_seed(0)
    fxs.register_channel_rule(DataScale, ScaleRule)
    model, x = ConvNet(DataScale(8)).eval(), torch.randn(2, 3, 8, 8)
    _, masked, pruned = pruned_pair(model, x)
    assert pruned.gate.scale.shape == (4,) and pruned.gate.channels == 4
    torch.testing.assert_close(pruned(x), masked(x))


@pytest.mark.parametrize("call, message", [
    (lambda: fxs.register_channel_rule(DataScale, "elementwise"),
     r"kind='elementwise'\): kind must be \"same\" \(its output channels are its input's\), \"fixed\" \(never "
     r"pruned\) or a ChannelRule subclass"),
    (lambda: fxs.register_channel_rule(DataScale(4), "same"), r"target is a DataScale instance; pass its class"),
    (lambda: fxs.register_channel_rule("fxs_test::scale", "same"), r"pass the layer class, or the op itself"),
    (lambda: fxs.register_channel_rule(int, "same"), r"target int is a class but not an nn.Module subclass"),
    (lambda: fxs.register_channel_rule(DataScale, "same", per_channel=(0,)),
     r"for a layer, per_channel names its parameters or buffers \(such as \"scale\"\), got 0"),
    (lambda: fxs.register_channel_rule(scale_op, "same", per_channel=("s",)),
     r"for an op, per_channel gives argument positions \(such as 1\), got 's'"),
    (lambda: fxs.register_channel_rule(scale_op, "same", per_channel=(2,)),
     r"position 2 is out of range: torch.ops.fxs_test.scale.default takes 2 arguments, counted from 0"),
    (lambda: fxs.register_channel_rule(DataScale, "fixed", per_channel=("scale",)),
     r"per_channel is for kind=\"same\"; a \"fixed\" layer's channels are never cut"),
], ids=["kind", "instance", "name", "not-a-module", "layer-position", "op-name", "position", "fixed-per-channel"])
def test_bad_registrations_say_what_is_wrong_and_the_fix(call, message):
    with pytest.raises(ChannelRuleError, match=message) as raised:
        call()
    assert isinstance(raised.value, (fxs.FxSparsityError, ValueError))
    assert user_rules() == {}  # nothing registered


def test_a_per_channel_name_the_layer_lacks_is_refused_when_the_analysis_meets_it():
    fxs.register_channel_rule(DataScale, "same", per_channel=("gain",))
    with pytest.raises(ChannelRuleError, match=r"per_channel=\('gain',\)\): 'gain' is not a parameter or buffer of "
                                               r"'gate' \(DataScale\), which holds \['scale'\]; name the tensors "
                                               r"indexed by its channels"):
        fxs.prepare_fx_sparse(ConvNet(DataScale(8)), SaliencyPruner(), example_inputs=(torch.randn(2, 3, 8, 8),))


def test_the_snippets_of_docs_structured_md_run_as_written():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "structured.md")
    text = open(path).read()
    section = text[text.index("## Layers and ops of your own"):text.index("## Scopes")]
    first, full_form = re.findall(r"```python\n(.*?)```", section, re.S)
    torch.manual_seed(0)
    namespace = {"torch": torch, "nn": nn, "fxs": fxs}
    exec(compile(first, "docs/structured.md (Layers and ops of your own)", "exec"), namespace)
    smaller, masked = namespace["smaller"], namespace["masked"]
    assert smaller.get_submodule("1").scale.shape == (8,)
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(smaller.eval()(x), masked.eval()(x))
    exec(compile(full_form, "docs/structured.md (the full form)", "exec"), namespace)
    pruner = SaliencyPruner(0.5)
    fxs.prepare_fx_sparse(namespace["model"], pruner, example_inputs=(x,))
    pruner.step()
    assert pruner.prune().get_submodule("1").channels == 8
