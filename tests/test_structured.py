"""Structured pruning: channel groups through the graph, masked, then physically cut out."""
import pytest
import torch
from models import Bottleneck, SmallDenseNet, SmallMobileNet, SmallResNeXt, resnet50_shaped, resnet_like
from torch import nn

import fx_sparsity as fxs
from fx_sparsity.structured import FPGMPruner, SaliencyPruner, find_channel_groups


def params(module):
    return sum(p.numel() for p in module.parameters())


def prune(model, pruner, x, config=None):
    prepared = pruner.prepare(model, config, example_inputs=(x,))
    pruner.step()
    prepared.eval()
    pruned = pruner.prune().eval()
    return prepared, pruned


def bottleneck_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(), Bottleneck(16, 8, stride=2),
                         Bottleneck(32, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


MODELS = {
    "resnet_basic": (resnet_like, (2, 3, 16, 16)),
    "resnet_bottleneck": (bottleneck_net, (2, 3, 16, 16)),
    "mobilenet_v2": (lambda: (torch.manual_seed(0), SmallMobileNet())[1], (2, 3, 16, 16)),
    "densenet": (lambda: (torch.manual_seed(0), SmallDenseNet())[1], (2, 3, 8, 8)),
    "resnext": (lambda: (torch.manual_seed(0), SmallResNeXt())[1], (2, 3, 8, 8)),
}


@pytest.mark.parametrize("pruner_cls", [SaliencyPruner, FPGMPruner])
@pytest.mark.parametrize("name", list(MODELS))
def test_pruned_model_equals_the_masked_one(name, pruner_cls):
    make, shape = MODELS[name]
    model = make().eval()
    x = torch.randn(*shape)
    masked, pruned = prune(model, pruner_cls(0.5), x)
    torch.testing.assert_close(pruned(x), masked(x), rtol=1e-5, atol=1e-5)
    assert params(pruned) < 0.6 * params(model)
    assert not any(n.endswith("out_channel_mask") for n, _ in pruned.named_buffers())
    other = torch.randn(3, *shape[1:])
    torch.testing.assert_close(pruned(other), masked(other), rtol=1e-5, atol=1e-5)


def test_resnet_groups_follow_the_residual_adds():
    model = resnet_like().eval()
    groups = find_channel_groups(torch.fx.symbolic_trace(model), (torch.randn(1, 3, 16, 16),))
    by_first = {g.producers[0]: g for g in groups if g.problem is None}
    shared = next(g for g in by_first.values() if "stem.0" in g.producers)
    assert sorted(shared.producers) == ["layer1.0.conv2", "layer1.1.conv2", "stem.0"]  # all added together
    assert sorted(shared.norms) == [("layer1.0.bn2", 0), ("layer1.1.bn2", 0), ("stem.1", 0)]
    refused = [g for g in groups if g.problem]
    assert [(g.producers, g.problem) for g in refused] == [(["fc"], "its channels are a model output")]


def test_densenet_concat_groups_are_cut_at_their_offsets():
    model = SmallDenseNet().eval()
    x = torch.randn(2, 3, 8, 8)
    groups = find_channel_groups(torch.fx.symbolic_trace(model), (x,))
    stem = next(g for g in groups if g.producers == ["stem"])
    # the stem's 16 channels start every concatenation: every layer's norm1 and conv1 read them at offset 0
    assert sorted(stem.norms) == [("layers.0.norm1", 0), ("layers.1.norm1", 0), ("layers.2.norm1", 0), ("norm", 0)]
    second = next(g for g in groups if g.producers == ["layers.1.conv2"])
    assert sorted(second.consumers) == [("fc", 24, 1), ("layers.2.conv1", 24, 1)]  # after 16 + 8 channels
    masked, pruned = prune(model, SaliencyPruner(0.5), x)
    assert pruned.get_submodule("fc").in_features == 20  # 40 channels, each group halved
    torch.testing.assert_close(pruned(x), masked(x), rtol=1e-5, atol=1e-5)


def test_resnext_grouped_convs_lose_the_same_channels_in_every_group():
    model = SmallResNeXt().eval()
    x = torch.randn(2, 3, 8, 8)
    pruner = SaliencyPruner(0.5)
    masked, pruned = prune(model, pruner, x)
    group = next(g for g in pruner.groups if g["module_fqn"] == "blocks.0.conv1")
    assert group["channel_group"].balance == 4 and group["channel_group"].grouped == ["blocks.0.conv2"]
    kept = pruner.get_mask("blocks.0.conv1.weight").reshape(4, 4).sum(1)
    assert kept.tolist() == [2, 2, 2, 2]
    conv = pruned.get_submodule("blocks.0.conv2")
    assert (conv.in_channels, conv.out_channels, conv.groups, tuple(conv.weight.shape[:2])) == (8, 8, 4, (8, 2))
    torch.testing.assert_close(pruned(x), masked(x), rtol=1e-5, atol=1e-5)


def test_compile_and_export_the_pruned_model():
    model = resnet_like().eval()
    x = torch.randn(2, 3, 16, 16)
    _, pruned = prune(model, SaliencyPruner(0.5), x)
    torch.testing.assert_close(torch.compile(pruned)(x), pruned(x), rtol=1e-4, atol=1e-4)
    exported = torch.export.export(pruned, (x,)).module()
    torch.testing.assert_close(exported(x), pruned(x), rtol=1e-5, atol=1e-5)


def test_config_names_a_group_and_refusals_say_why():
    model = resnet_like().eval()
    x = torch.randn(2, 3, 16, 16)
    pruner = SaliencyPruner(0.5)
    prepared = pruner.prepare(model, [{"tensor_fqn": "layer2.0.conv1.weight", "sparsity_level": 0.25}],
                              example_inputs=(x,))
    pruner.step()
    assert [g["module_fqn"] for g in pruner.groups] == ["layer2.0.conv1"]
    assert (pruner.get_mask("layer2.0.conv1.weight") == 0).sum().item() == 4  # 25% of 16
    assert prepared.get_submodule("layer2.0.conv2").in_channels == 16  # masked, not cut yet
    with pytest.raises(fxs.SparsityConfigError, match="the channels of 'fc.weight' cannot be pruned exactly: its "
                                                      "channels are a model output"):
        SaliencyPruner().prepare(model, [{"tensor_fqn": "fc.weight"}], example_inputs=(x,))
    grouped = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.Conv2d(16, 4, 1))
    with pytest.raises(fxs.SparsityConfigError, match=r"grouped convolution '1' \(groups=2\) with in_channels != "
                                                      r"out_channels"):
        SaliencyPruner().prepare(grouped, [{"tensor_fqn": "0.weight"}], example_inputs=(torch.randn(1, 3, 4, 4),))


def test_schedulers_drive_structured_pruners():
    model = resnet_like().eval()
    pruner = SaliencyPruner(0.5)
    pruner.prepare(model, example_inputs=(torch.randn(2, 3, 16, 16),))
    scheduler = fxs.CubicSL(pruner, init_sl=0.0, init_t=0, delta_t=1, total_t=3)
    for _ in range(4):
        pruner.step()
        scheduler.step()
    mask = pruner.get_mask(pruner.groups[0]["tensor_fqn"])
    assert (mask == 0).float().mean().item() == 0.5


@pytest.mark.slow
def test_resnet50_shaped_at_half_the_channels():
    model = resnet50_shaped(scale=0.25, classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    masked, pruned = prune(model, SaliencyPruner(0.5), x)
    torch.testing.assert_close(pruned(x), masked(x), rtol=1e-4, atol=1e-4)
    assert params(model) / params(pruned) > 3.5


@pytest.mark.slow
def test_digits_cnn_keeps_its_accuracy_at_half_the_channels():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "tools" / "structured_digits.py"
    spec = importlib.util.spec_from_file_location("structured_digits", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    result = tool.run(0, dense_epochs=12, finetune_epochs=6)
    assert result["pruned"] >= result["dense"] - 0.02
    assert result["pruned"] == result["masked"]  # the pruned model computes what the masked one did
    assert result["dense_params"] / result["pruned_params"] > 3.5


def test_printed_graph_shows_each_groups_channels():
    pruner = SaliencyPruner(0.5)
    prepared = fxs.prepare_fx_sparse(resnet_like(), pruner, example_inputs=(torch.randn(2, 3, 16, 16),))
    pruner.step()
    rows = [line.split() for line in fxs.format_sparse_graph(prepared).splitlines() if "channels of" in line]
    assert len(rows) == 10  # one per consumer input (the four convs reading the shared stem group included)
    assert rows[6][:7] == ["mul_6", "call_function", "torch.mul", "channels", "of", "layer2.0.conv1:", "8/16"]
    assert rows[6][-1] == "50.0%"


class _ViTMLPBlock(nn.Module):
    """A transformer block's feed-forward half: x + fc2(gelu(fc1(norm(x)))), tokens (B, N, C)."""

    def __init__(self, dim=32, hidden=64):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


def test_transformer_mlp_hidden_width_is_pruned_and_the_normalised_width_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(_ViTMLPBlock(), _ViTMLPBlock()).eval()
    x = torch.randn(2, 5, 32)
    pruner = SaliencyPruner(0.5)
    masked, pruned = prune(model, pruner, x)
    assert sorted(g["module_fqn"] for g in pruner.groups) == ["0.fc1", "1.fc1"]  # the hidden widths
    assert pruned.get_submodule("0.fc2").in_features == 32
    torch.testing.assert_close(pruned(x), masked(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(fxs.SparsityConfigError, match="cannot be pruned exactly"):
        SaliencyPruner().prepare(model, [{"tensor_fqn": "0.fc2.weight"}], example_inputs=(x,))


class _Attention(nn.Module):
    """Multi-head self-attention written out (as ViT and many models do): q, k, v, heads, projection."""

    def __init__(self, dim=32, heads=4, sdpa=False):
        super().__init__()
        self.heads, self.head_dim, self.sdpa = heads, dim // heads, sdpa
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        B, N, C = x.shape
        q = self.q(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)
        if self.sdpa:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            out = ((q @ k.transpose(-2, -1)) * self.head_dim ** -0.5).softmax(-1) @ v
        return x + self.proj(out.transpose(1, 2).reshape(B, N, C))


class _ViTBlock(nn.Module):
    def __init__(self, sdpa=False):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(32), _Attention(sdpa=sdpa)
        self.mlp = _ViTMLPBlock()

    def forward(self, x):
        return self.mlp(self.attn(self.norm1(x)))


@pytest.mark.parametrize("sdpa", [False, True], ids=["matmul", "sdpa"])
@pytest.mark.parametrize("pruner_cls", [SaliencyPruner, FPGMPruner])
def test_attention_heads_are_pruned_whole(pruner_cls, sdpa):
    torch.manual_seed(0)
    model = nn.Sequential(_ViTBlock(sdpa), _ViTBlock(sdpa)).eval()
    x = torch.randn(2, 5, 32)
    pruner = pruner_cls(0.5)
    masked, pruned = prune(model, pruner, x)
    heads = next(g for g in pruner.groups if g["module_fqn"] in ("0.attn.q", "0.attn.k", "0.attn.v"))
    group = heads["channel_group"]
    assert sorted(group.producers) == ["0.attn.k", "0.attn.q", "0.attn.v"] and group.head_dim == 8
    mask = pruner.get_mask(heads["tensor_fqn"]).reshape(4, 8)
    assert mask.all(1).sum().item() == 2 and (~mask.any(1)).sum().item() == 2  # two whole heads kept
    assert pruned.get_submodule("0.attn.q").out_features == 16
    assert pruned.get_submodule("0.attn.proj").in_features == 16
    torch.testing.assert_close(pruned(x), masked(x), rtol=1e-5, atol=1e-5)
    other = torch.randn(3, 7, 32)  # other batch and sequence sizes: the new head count is in the graph
    torch.testing.assert_close(pruned(other), masked(other), rtol=1e-5, atol=1e-5)


def test_pruner_state_dict_round_trips_through_torch_save(tmp_path):
    x = torch.randn(2, 3, 16, 16)
    pruner = SaliencyPruner(0.5)
    fxs.prepare_fx_sparse(resnet_like(), pruner, example_inputs=(x,))
    pruner.step()
    torch.save(pruner.state_dict(), tmp_path / "pruner.pt")
    fresh = SaliencyPruner(0.5)
    fxs.prepare_fx_sparse(resnet_like(seed=1), fresh, example_inputs=(x,))
    fresh.load_state_dict(torch.load(tmp_path / "pruner.pt"))  # weights_only
    for group in pruner.groups:
        assert torch.equal(fresh.get_mask(group["tensor_fqn"]), pruner.get_mask(group["tensor_fqn"]))


def test_block_scope_keeps_the_users_model_and_prunes_inside_each_block():
    from models import BasicBlock, SmallResNet

    model = resnet_like().eval()
    x = torch.randn(2, 3, 16, 16)
    pruner = SaliencyPruner(0.5)
    masked = fxs.prepare_fx_sparse(model, pruner, scope=BasicBlock, example_inputs=(x,))
    assert type(masked) is SmallResNet and isinstance(masked.layer1[0], torch.fx.GraphModule)
    # inside each block only its conv1 -> conv2 width can go; the residual width leaves the block
    assert [g["module_fqn"] for g in pruner.groups] == ["layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1",
                                                       "layer2.1.conv1"]
    pruner.step()
    masked.eval()
    pruned = pruner.prune().eval()
    assert type(pruned) is SmallResNet and pruned.get_submodule("layer2.0.conv1").out_channels == 8
    torch.testing.assert_close(pruned(x), masked(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(fxs.SparsityConfigError, match=r"its channels leave the block 'layer1.0' \(the group crosses "
                                                      r"graphs\): prune it with scope=\"model\""):
        SaliencyPruner().prepare(model, [{"tensor_fqn": "layer1.0.conv2.weight"}], scope=BasicBlock,
                                 example_inputs=(x,))
    with pytest.raises(fxs.SparsityConfigError, match="scope=\"layers\" puts every layer in its own graph"):
        SaliencyPruner().prepare(model, scope="layers", example_inputs=(x,))
