"""Structured pruning: channel groups through the graph, masked, then physically cut out."""
import copy
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from models import (
    BasicBlock,
    Bottleneck,
    SmallDenseNet,
    SmallMobileNet,
    SmallResNet,
    SmallResNeXt,
    SmallShuffleNetV2,
    SmallSwin,
    SmallViT,
    resnet50_shaped,
    resnet_like,
)
from torch import nn

import fx_sparsity as fxs
from fx_sparsity.structured import FPGMPruner, SaliencyPruner, find_channel_groups


def params(module):
    return sum(p.numel() for p in module.parameters())


def prune(model, pruner, x, config=None, **kwargs):
    prepared = pruner.prepare(model, config, example_inputs=(x,), **kwargs)
    pruner.step()
    prepared.eval()
    pruned = pruner.prune().eval()
    return prepared, pruned


def seeded(make):
    def build():
        torch.manual_seed(0)
        return make().eval()
    return build


def bottleneck_net():
    return nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(), Bottleneck(16, 8, stride=2),
                         Bottleneck(32, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


class _ViTMLPBlock(nn.Module):
    """A transformer block's feed-forward half: x + fc2(gelu(fc1(norm(x)))), tokens (B, N, C)."""

    def __init__(self, dim=32, hidden=64):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class _Attention(nn.Module):
    """Multi-head self-attention written out (as timm's ViT and many models do): q, k, v, heads, projection."""

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
            out = F.scaled_dot_product_attention(q, k, v)
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


class _UNet(nn.Module):
    """Down, up (transposed convolution) and a skip connection concatenated with the input."""

    def __init__(self):
        super().__init__()
        self.down, self.mid = nn.Conv2d(3, 16, 3, 2, 1), nn.Conv2d(16, 16, 3, 1, 1)
        self.up, self.out = nn.ConvTranspose2d(16, 8, 2, 2), nn.Conv2d(8 + 3, 4, 1)

    def forward(self, x):
        h = torch.relu(self.mid(torch.relu(self.down(x))))
        return self.out(torch.cat([torch.relu(self.up(h)), x], 1))


MODELS = {
    "resnet_basic": (seeded(SmallResNet), (2, 3, 16, 16)),
    "resnet_bottleneck": (seeded(bottleneck_net), (2, 3, 16, 16)),
    "mobilenet_v2": (seeded(SmallMobileNet), (2, 3, 16, 16)),
    "densenet": (seeded(SmallDenseNet), (2, 3, 8, 8)),
    "resnext": (seeded(SmallResNeXt), (2, 3, 8, 8)),
    "shufflenet_v2": (seeded(SmallShuffleNetV2), (2, 3, 32, 32)),
    "vit": (seeded(SmallViT), (2, 3, 16, 16)),
    "vit_matmul_attention": (seeded(lambda: nn.Sequential(_ViTBlock(), _ViTBlock())), (2, 5, 32)),
    "vit_sdpa_attention": (seeded(lambda: nn.Sequential(_ViTBlock(True), _ViTBlock(True))), (2, 5, 32)),
    "swin": (seeded(SmallSwin), (2, 3, 32, 32)),
    "unet": (seeded(_UNet), (2, 3, 8, 8)),
}


@pytest.mark.parametrize("pruner_cls", [SaliencyPruner, FPGMPruner])
@pytest.mark.parametrize("name", list(MODELS))
def test_pruned_model_equals_the_masked_one(name, pruner_cls):
    make, shape = MODELS[name]
    model = make()
    x = torch.randn(*shape)
    pruner = pruner_cls(0.5)
    masked, pruned = prune(model, pruner, x)
    assert pruner.groups, "every model here has prunable groups"
    torch.testing.assert_close(pruned(x), masked(x), rtol=1e-5, atol=1e-5)
    other = torch.randn(3, *shape[1:])  # another batch size
    torch.testing.assert_close(pruned(other), masked(other), rtol=1e-5, atol=1e-5)
    for group in pruner.groups:  # every chosen group lost half its units (channels, heads, shuffled pairs)
        mask = pruner.get_mask(group["tensor_fqn"])
        assert (mask == 0).sum().item() == int(0.5 * mask.numel()) or pruner_cls is FPGMPruner, group["tensor_fqn"]
        fqn, dim = pruner.targets[group["tensor_fqn"]].channel_group.anchor
        kept = sum(n for n, k in zip(pruner.targets[group["tensor_fqn"]].channel_group.channels_per_class, mask.tolist()) if k)
        assert pruned.get_parameter(fqn).shape[dim] == kept + pruner.targets[group["tensor_fqn"]].channel_group.fixed
    assert params(pruned) < 0.75 * params(model)
    assert not [n for n, _ in pruned.named_buffers() if "channel_mask" in n]
    assert torch.equal(model(x), make()(x))  # the user's model is not touched


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_pruned_models_compile_and_export(name):
    make, shape = MODELS[name]
    x = torch.randn(*shape)
    _, pruned = prune(make(), SaliencyPruner(0.5), x)
    torch.testing.assert_close(torch.compile(pruned)(x), pruned(x), rtol=1e-4, atol=1e-4)
    exported = torch.export.export(pruned, (x,)).module()
    torch.testing.assert_close(exported(x), pruned(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet_bottleneck", "mobilenet_v2", "densenet", "resnext", "shufflenet_v2", "vit",
                                  "swin"])
def test_export_traced_models_prune_as_the_symbolic_ones(name):
    make, shape = MODELS[name]
    x = torch.randn(*shape)
    symbolic = SaliencyPruner(0.5)
    _, by_symbolic = prune(make(), symbolic, x)
    exported = SaliencyPruner(0.5)
    masked, by_export = prune(make(), exported, x, tracer="export")
    assert sorted(g["tensor_fqn"] for g in exported.groups) == sorted(g["tensor_fqn"] for g in symbolic.groups)
    torch.testing.assert_close(by_export(x), masked(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(by_export(x), by_symbolic(x), rtol=1e-5, atol=1e-5)
    assert params(by_export) == params(by_symbolic)


def test_masks_and_cuts_match_torch_ao_pruners():
    from torch.ao.pruning._experimental.pruner import FPGMPruner as AoFPGM
    from torch.ao.pruning._experimental.pruner import SaliencyPruner as AoSaliency

    cases = [(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)), torch.randn(4, 16)),
             (nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 8, 3)), torch.randn(4, 3, 8, 8))]
    for (make_ours, make_theirs), (model, x) in itertools.product(
            ((lambda: SaliencyPruner(0.3), lambda: AoSaliency({"sparsity_level": 0.3})),
             (lambda: FPGMPruner(0.3), lambda: AoFPGM(0.3))), cases):
        ours, theirs = make_ours(), make_theirs()
        reference = copy.deepcopy(model)
        theirs.prepare(reference, [{"tensor_fqn": "0.weight"}])
        theirs.step()
        expected = reference[0].parametrizations.weight[0].mask.clone()
        fxs.prepare_fx_sparse(model, ours, [{"tensor_fqn": "0.weight"}], example_inputs=(x,))
        ours.step()
        assert torch.equal(ours.get_mask("0.weight").bool(), expected)
        cut_theirs, cut_ours = theirs.prune(), ours.prune()
        assert cut_ours.get_submodule("0").weight.shape == cut_theirs.get_submodule("0").weight.shape
        torch.testing.assert_close(cut_ours(x), cut_theirs(x))


def test_torch_ao_constructor_forms_state_and_abstract_base():
    """What torch.ao's pruners take and hold: ``SaliencyPruner(defaults)``, ``state[fqn]["mask"]`` (the live mask,
    after ``.to()`` too) and a ``BaseStructuredSparsifier`` that scores nothing refused at construction."""
    from fx_sparsity.structured import BaseStructuredSparsifier

    model, x = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)), torch.randn(4, 16)
    pruner = SaliencyPruner({"sparsity_level": 0.25})
    assert pruner.defaults == {"sparsity_level": 0.25}
    masked = fxs.prepare_fx_sparse(model, pruner, example_inputs=(x,))
    pruner.step()
    assert list(pruner.state) == ["0.weight"]
    assert int((pruner.state["0.weight"]["mask"] == 0).sum()) == 8
    masked.to(torch.float64)
    assert pruner.state["0.weight"]["mask"] is pruner.get_mask("0.weight")
    assert pruner.state["0.weight"]["mask"].dtype == torch.float64
    with pytest.warns(UserWarning, match="patterns are not used"):
        SaliencyPruner({"sparsity_level": 0.5}, patterns={})
    with pytest.raises(fxs.SparsityConfigError, match="sparsity_level must be in"):
        SaliencyPruner({"sparsity_level": 2.0})
    with pytest.raises(TypeError, match="Can't instantiate BaseStructuredSparsifier: it scores no channels"):
        BaseStructuredSparsifier()

    class LargestMagnitude(BaseStructuredSparsifier):
        def filter_scores(self, weight, dim):
            return weight.movedim(dim, 0).flatten(1).abs().amax(1)

    mine = LargestMagnitude({"sparsity_level": 0.5})
    fxs.prepare_fx_sparse(copy.deepcopy(model), mine, example_inputs=(x,))
    mine.step()
    expected = torch.ones(32)
    expected[model[0].weight.abs().amax(1).topk(16, largest=False).indices] = 0
    assert torch.equal(mine.get_mask("0.weight"), expected)


TORCH_AO_MODELS = ["SimpleLinear", "LinearBias", "LinearActivation", "LinearActivationFunctional", "SimpleConv2d",
                   "Conv2dBias", "Conv2dActivation", "Conv2dPadBias", "Conv2dPool", "Conv2dPoolFlatten",
                   "Conv2dPoolFlattenFunctional"]


@pytest.mark.parametrize("name", TORCH_AO_MODELS)
def test_torch_ao_test_models_prune_as_torch_ao_does(name):
    """torch.ao's own structured-pruning test models, configured as its tests do (every layer but the last):
    the same masks, the same pruned outputs, and never more parameters (torch.ao keeps padded convs whole)."""
    from torch.ao.pruning._experimental.pruner import SaliencyPruner as AoSaliency
    from torch.testing._internal import common_pruning

    torch.manual_seed(0)
    model = getattr(common_pruning, name)().eval()
    x = torch.randn(2, 7) if "Linear" in name else torch.randn(2, 1, 28, 28)
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    config = [{"tensor_fqn": f"{n}.weight"} for n in layers[:-1]]
    reference = copy.deepcopy(model)
    theirs = AoSaliency({"sparsity_level": 0.5})
    theirs.prepare(reference, config)
    theirs.step()
    ours = SaliencyPruner(0.5)
    masked = ours.prepare(model, config)  # as torch.ao's: no example inputs (made from the first layer)
    ours.step()
    assert len(ours.groups) == len(config)
    for group in ours.groups:
        expected = reference.get_submodule(group["module_fqn"]).parametrizations.weight[0].mask
        assert torch.equal(ours.get_mask(group["tensor_fqn"]).bool(), expected), group["tensor_fqn"]
    torch.testing.assert_close(masked(x), reference(x), rtol=1e-5, atol=1e-6)
    cut_theirs, cut_ours = theirs.prune(), ours.prune()
    torch.testing.assert_close(cut_ours(x), cut_theirs(x), rtol=1e-5, atol=1e-6)
    assert params(cut_ours) <= params(cut_theirs)


def test_resnet_groups_follow_the_residual_adds():
    model = resnet_like().eval()
    groups = find_channel_groups(torch.fx.symbolic_trace(model), (torch.randn(1, 3, 16, 16),))
    shared = next(g for g in groups if ("stem.0.weight", 0) in g.producers)
    assert shared.producers == [("stem.0.weight", 0), ("layer1.0.conv2.weight", 0), ("layer1.1.conv2.weight", 0)]
    assert {"layer1.0.bn2.weight", "stem.1.running_mean", "layer2.0.conv1.weight"} <= {f for f, _ in shared.tensors}
    assert shared.prunable and shared.num_classes == 8
    refused = [g for g in groups if not g.prunable]
    assert [(g.producers, g.problem) for g in refused] == [([("fc.weight", 0)], "its channels are a model output")]


def test_densenet_concat_segments_are_groups_of_their_own():
    model = SmallDenseNet().eval()
    x = torch.randn(2, 3, 8, 8)
    groups = find_channel_groups(torch.fx.symbolic_trace(model), (x,))
    stem = next(g for g in groups if ("stem.weight", 0) in g.producers)
    assert stem.producers == [("stem.weight", 0)]  # the stem's 16 channels: a group apart from the layers' outputs
    # every later norm and conv over the concatenation holds them (at offset 0)
    assert {"layers.0.norm1.weight", "layers.1.conv1.weight", "layers.2.norm1.weight", "norm.weight",
            "fc.weight"} <= {f for f, _ in stem.tensors}
    masked, pruned = prune(model, SaliencyPruner(0.5), x)
    assert pruned.get_submodule("fc").in_features == 20  # 16 + 3 * 8 channels, each group halved
    torch.testing.assert_close(pruned(x), masked(x), rtol=1e-5, atol=1e-5)


def test_resnext_grouped_convs_lose_the_same_number_of_channels_in_every_conv_group():
    model = SmallResNeXt().eval()
    x = torch.randn(2, 3, 8, 8)
    pruner = SaliencyPruner(0.5)
    masked, pruned = prune(model, pruner, x)
    group = next(g for g in pruner.groups if g["module_fqn"] == "blocks.0.conv1")
    assert pruner.targets[group["tensor_fqn"]].channel_group.balance == 4
    assert pruner.get_mask("blocks.0.conv1.weight").reshape(4, 4).sum(1).tolist() == [2, 2, 2, 2]
    assert pruner.get_mask("blocks.0.conv2.weight").reshape(4, 4).sum(1).tolist() == [2, 2, 2, 2]
    conv = pruned.get_submodule("blocks.0.conv2")
    assert (conv.in_channels, conv.out_channels, conv.groups, tuple(conv.weight.shape[:2])) == (8, 8, 4, (8, 2))
    torch.testing.assert_close(pruned(x), masked(x), rtol=1e-5, atol=1e-5)


def test_grouped_conv_with_more_outputs_than_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.ReLU(),
                          nn.Conv2d(16, 4, 1)).eval()
    x = torch.randn(2, 3, 6, 6)
    pruner = SaliencyPruner(0.5)
    masked, pruned = prune(model, pruner, x)
    assert sorted(g["module_fqn"] for g in pruner.groups) == ["0", "2"]
    grouped = pruned.get_submodule("2")
    assert (grouped.in_channels, grouped.out_channels, grouped.groups) == (4, 8, 2)
    assert tuple(grouped.weight.shape[:2]) == (8, 2)
    torch.testing.assert_close(pruned(x), masked(x), rtol=1e-5, atol=1e-5)


def test_shufflenet_split_and_shuffle_pair_channels_across_branches():
    model = SmallShuffleNetV2().eval()
    x = torch.randn(2, 3, 32, 32)
    groups = find_channel_groups(torch.fx.symbolic_trace(model), (x,))
    stage = next(g for g in groups if ("stages.0.0.branch1.2.weight", 0) in g.producers)
    # the shuffle interleaves the two branches: channel j of each goes with channel j of the other, and the
    # next block's untouched half carries them on
    assert stage.producers == [("stages.0.0.branch1.2.weight", 0), ("stages.0.0.branch2.5.weight", 0),
                               ("stages.0.1.branch2.5.weight", 0)]
    assert stage.num_classes == 16 and stage.prunable
    masked, pruned = prune(model, SaliencyPruner(0.5), x)
    splits = [n for n in pruned.graph.nodes if n.target == "split"]
    assert splits and all(n.kwargs["dim"] == 1 for n in splits)  # chunk(2) became split with the new halves
    torch.testing.assert_close(pruned(x), masked(x), rtol=1e-5, atol=1e-5)


def test_attention_heads_are_pruned_whole():
    model = MODELS["vit_matmul_attention"][0]()
    x = torch.randn(2, 5, 32)
    pruner = SaliencyPruner(0.5)
    masked, pruned = prune(model, pruner, x)
    heads = pruner.targets["0.attn.q.weight"].channel_group
    assert heads.producers == [("0.attn.q.weight", 0), ("0.attn.k.weight", 0), ("0.attn.v.weight", 0)]
    assert heads.channels_per_class == [8, 8, 8, 8]  # one class per head: 8 channels of q
    assert pruner.get_mask("0.attn.q.weight").tolist() in ([1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0],
                                                            [0, 1, 0, 1], [0, 0, 1, 1])
    assert pruned.get_submodule("0.attn.q").out_features == 16
    assert pruned.get_submodule("0.attn.proj").in_features == 16
    assert any(n.target == "view" and 2 in n.args for n in pruned.graph.nodes)  # the head count in the graph
    other = torch.randn(3, 7, 32)  # other batch and sequence sizes
    torch.testing.assert_close(pruned(other), masked(other), rtol=1e-5, atol=1e-5)


def test_multihead_attention_is_written_out_and_its_heads_pruned():
    model = SmallViT().eval()
    x = torch.randn(2, 3, 16, 16)
    pruner = SaliencyPruner(0.5)
    masked, pruned = prune(model, pruner, x)
    heads = next(g for g in pruner.groups if g["tensor_fqn"] == "layers.0.self_attention.in_proj_weight")
    assert pruner.targets[heads["tensor_fqn"]].channel_group.channels_per_class == [24] * 4  # q, k and v rows of each head
    assert pruned.get_parameter("layers.0.self_attention.in_proj_weight").shape == (48, 16)  # the residual width too
    assert pruned.get_submodule("layers.0.self_attention.out_proj").in_features == 16
    assert not [m for m in pruned.modules() if isinstance(m, nn.MultiheadAttention)]
    torch.testing.assert_close(masked(x), model(x), rtol=1e-5, atol=1e-5) if not pruner.groups else None
    torch.testing.assert_close(pruned(x), masked(x), rtol=1e-5, atol=1e-5)


def test_vit_blocks_keep_their_class_with_fewer_attention_heads(tmp_path):
    from models import ViTEncoderBlock

    model = SmallViT().eval()
    x = torch.randn(2, 3, 16, 16)
    pruner = SaliencyPruner(0.5)
    masked = fxs.prepare_fx_sparse(model, pruner, scope=ViTEncoderBlock, example_inputs=(x,))
    assert len(pruner.groups) == 4  # per block: the heads and the MLP width
    pruner.step()
    pruned = pruner.prune().eval()
    block = pruned.layers[1]
    assert type(block) is ViTEncoderBlock and block.self_attention.num_heads == 2
    assert block.self_attention.in_proj_weight.shape == (48, 32) and block.mlp[0].out_features == 32
    torch.testing.assert_close(pruned(x), masked(x), rtol=1e-5, atol=1e-5)
    torch.save(pruned, tmp_path / "vit.pt")
    reloaded = torch.load(tmp_path / "vit.pt", weights_only=False)
    torch.testing.assert_close(reloaded(x), pruned(x))


def test_written_out_multihead_attention_computes_what_the_module_does():
    from fx_sparsity.nn.attention import multi_head_attention

    torch.manual_seed(0)
    for batch_first in (True, False):
        for kdim in (None, 12):
            m = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim).eval()
            q = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
            kv = torch.randn(2, 7, kdim or 16) if batch_first else torch.randn(7, 2, kdim or 16)
            padding = torch.zeros(2, 7, dtype=torch.bool)
            padding[1, 5:] = True
            mask = torch.triu(torch.ones(5, 7, dtype=torch.bool), 1)
            for need_weights in (True, False):
                ours = multi_head_attention(m, q, kv, kv, key_padding_mask=padding, attn_mask=mask,
                                            need_weights=need_weights)
                theirs = m(q, kv, kv, key_padding_mask=padding, attn_mask=mask, need_weights=need_weights)
                torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
                if need_weights:
                    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-5)


def test_swin_windows_keep_the_relative_position_bias_per_head():
    model = SmallSwin().eval()
    x = torch.randn(2, 3, 32, 32)
    masked, pruned = prune(model, SaliencyPruner(0.5), x)
    table = pruned.get_parameter("blocks.1.attn.relative_position_bias_table")
    assert table.shape[1] == 2  # the bias table keeps the columns of the heads that stay
    assert pruned.get_submodule("blocks.1.attn.qkv").out_features == 48
    torch.testing.assert_close(pruned(x), masked(x), rtol=1e-5, atol=1e-5)


def test_transposed_convolutions_and_a_concatenated_input():
    torch.manual_seed(0)
    model = _UNet().eval()
    x = torch.randn(2, 3, 8, 8)
    pruner = SaliencyPruner(0.5)
    masked, pruned = prune(model, pruner, x)
    assert [g["tensor_fqn"] for g in pruner.groups] == ["down.weight", "mid.weight", "up.weight"]
    assert pruned.up.weight.shape == (8, 4, 2, 2)  # (in, out): the transposed layout
    assert pruned.out.in_channels == 7  # 4 of up's channels, and the 3 input channels, which cannot go
    torch.testing.assert_close(pruned(x), masked(x), rtol=1e-5, atol=1e-5)


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
    with pytest.raises(fxs.SparsityConfigError, match=r"'stem.9.weight' is not a weight whose channels fx_sparsity "
                                                      r"follows to a group; the nearest that name a prunable group: "
                                                      r"\['stem.0.weight', "):
        SaliencyPruner().prepare(model, [{"tensor_fqn": "stem.9.weight"}], example_inputs=(x,))
    with pytest.raises(fxs.SparsityConfigError, match="is in a group an earlier entry already names"):
        SaliencyPruner().prepare(model, [{"tensor_fqn": "stem.0.weight"}, {"tensor_fqn": "layer1.0.conv2.weight"}],
                                 example_inputs=(x,))
    guessed = SaliencyPruner()
    guessed.prepare(model)  # as torch.ao's prepare(model, config): an input is made for the first conv
    assert len(guessed.groups) == 6
    with pytest.raises(fxs.SparsityConfigError, match="needs example_inputs .* and its input does not go straight "
                                                      "into a Linear, Conv or Embedding"):
        SaliencyPruner().prepare(nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 2)))


class _Einsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.einsum("bc,bc->bc", self.fc1(x), self.fc1(x))
        return self.fc2(h)


def test_an_op_that_is_not_followed_refuses_its_group_and_names_itself():
    model = _Einsum()
    x = torch.randn(2, 8)
    pruner = SaliencyPruner(0.5)
    pruner.prepare(model, example_inputs=(x,))
    assert pruner.groups == []  # nothing can be cut exactly
    with pytest.raises(fxs.SparsityConfigError, match=r"'einsum' \(einsum\) is not an op whose channel coupling "
                                                      r"fx_sparsity follows"):
        SaliencyPruner().prepare(model, [{"tensor_fqn": "fc1.weight"}], example_inputs=(x,))


def test_normalised_widths_are_pruned_exactly_by_default_and_left_out_on_request():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), _ViTMLPBlock(), _ViTMLPBlock(), nn.Linear(32, 4)).eval()
    x = torch.randn(2, 5, 16)
    pruner = SaliencyPruner(0.5, prune_normalized=False)
    masked, pruned = prune(model, pruner, x)
    assert sorted(g["module_fqn"] for g in pruner.groups) == ["1.fc1", "2.fc1"]  # the hidden widths only
    torch.testing.assert_close(pruned(x), masked(x), rtol=1e-5, atol=1e-5)
    pruner = SaliencyPruner(0.5)  # the residual width too: the masked LayerNorms average over the kept channels
    masked, pruned = prune(model, pruner, x)
    assert sorted(g["module_fqn"] for g in pruner.groups) == ["0", "1.fc1", "2.fc1"]
    assert pruned.get_submodule("1.norm").normalized_shape == (16,)
    torch.testing.assert_close(pruned(x), masked(x), rtol=1e-5, atol=1e-5)
    pruner = SaliencyPruner(0.5, prune_normalized=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named: pruned exactly, no warning
        masked, pruned = prune(model, pruner, x, [{"tensor_fqn": "0.weight"}])
    assert pruned.get_submodule("3").in_features == 16
    torch.testing.assert_close(pruned(x), masked(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compile_and_export_the_pruned_model():
    model = resnet_like().eval()
    x = torch.randn(2, 3, 16, 16)
    _, pruned = prune(model, SaliencyPruner(0.5), x)
    exported = torch.export.export(pruned, (x,)).module()
    torch.testing.assert_close(exported(x), pruned(x), rtol=1e-5, atol=1e-5)


def test_schedulers_drive_structured_pruners():
    model = resnet_like().eval()
    pruner = SaliencyPruner(0.5)
    pruner.prepare(model, example_inputs=(torch.randn(2, 3, 16, 16),))
    scheduler = fxs.CubicSL(pruner, init_sl=0.0, init_t=0, delta_t=1, total_t=3)
    levels = []
    for _ in range(4):
        pruner.step()
        scheduler.step()
        levels.append(pruner.groups[0]["sparsity_level"])
    assert levels[0] < levels[1] < levels[2] == levels[3] == 0.5
    pruner.step()
    mask = pruner.get_mask(pruner.groups[0]["tensor_fqn"])
    assert (mask == 0).float().mean().item() == 0.5


@pytest.mark.slow
def test_training_through_the_masked_model_leaves_pruned_channels_without_gradient():
    model = resnet_like()
    x = torch.randn(4, 3, 16, 16)
    pruner = SaliencyPruner(0.5)
    masked = pruner.prepare(model, [{"tensor_fqn": "layer2.0.conv1.weight"}], example_inputs=(x,))
    pruner.step()
    masked.train()
    masked(x).square().sum().backward()
    mask = pruner.get_mask("layer2.0.conv1.weight").bool()
    grad = masked.get_submodule("layer2.0.conv2").weight.grad
    assert grad[:, ~mask].abs().sum() == 0 and grad[:, mask].abs().sum() > 0


def test_printed_graph_shows_each_groups_channels():
    pruner = SaliencyPruner(0.5)
    prepared = fxs.prepare_fx_sparse(resnet_like(), pruner, example_inputs=(torch.randn(2, 3, 16, 16),))
    pruner.step()
    text = fxs.format_sparse_graph(prepared)
    rows = [line.split() for line in text.splitlines() if "channels of" in line]
    assert len(rows) == 9  # one per value a sink reads (convs reading the same value share it)
    assert rows[5][:9] == ["mul_5", "call_function", "torch.mul", "group", "4,", "channels", "of", "layer2.0.conv1:",
                           "8/16"]
    assert rows[5][-1] == "50.0%"
    assert "channel groups: 6 masked, 36 of their 72 channels kept (50.0% to cut; prune() removes them)" in text


def test_printed_graph_counts_heads_as_units():
    pruner = SaliencyPruner(0.5)
    prepared = fxs.prepare_fx_sparse(SmallViT(), pruner, example_inputs=(torch.randn(1, 3, 16, 16),))
    pruner.step()
    text = fxs.format_sparse_graph(prepared)
    assert "group 1, channels of layers.0.self_attention.in_proj_weight: 48/96 kept, 2/4 units" in text


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
    wrong = SaliencyPruner(0.5)
    fxs.prepare_fx_sparse(SmallMobileNet(), wrong, example_inputs=(x,))
    with pytest.raises(RuntimeError, match="saved mask has 8 entries, this model's group 16"):
        wrong.load_state_dict(torch.load(tmp_path / "pruner.pt"))


def test_a_failed_prepare_leaves_the_model_and_the_pruner_as_they_were():
    model = resnet_like()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = SaliencyPruner(0.5)
    with pytest.raises(fxs.SparsityConfigError):
        pruner.prepare(model, [{"tensor_fqn": "fc.weight"}], example_inputs=(torch.randn(2, 3, 16, 16),),
                       inplace=True)
    assert pruner.model is None and pruner.groups == []
    assert type(model) is SmallResNet and model.state_dict().keys() == before.keys()
    assert not [n for n, _ in model.named_buffers() if "channel_mask" in n]
    pruner.prepare(model, example_inputs=(torch.randn(2, 3, 16, 16),))  # and it can be used again


def test_block_scope_keeps_the_users_model_and_prunes_inside_each_block():
    model = resnet_like().eval()
    x = torch.randn(2, 3, 16, 16)
    pruner = SaliencyPruner(0.5)
    masked = fxs.prepare_fx_sparse(model, pruner, scope=BasicBlock, example_inputs=(x,))
    assert type(masked) is SmallResNet and isinstance(masked.layer1[0], torch.fx.GraphModule)
    # inside each block its conv1 -> conv2 width; across blocks the residual width of layer1, which the model passes
    # from the stem to each block as it is; layer2's reaches the pooling in the model's own code and stays
    assert [g["module_fqn"] for g in pruner.groups] == ["stem.0", "layer1.0.conv1", "layer1.1.conv1",
                                                       "layer2.0.conv1", "layer2.1.conv1"]
    residual = pruner.targets["stem.0.weight"].channel_group
    assert residual.producers == [("stem.0.weight", 0), ("layer1.0.conv2.weight", 0), ("layer1.1.conv2.weight", 0)]
    pruner.step()
    masked.eval()
    text = fxs.format_sparse_graph(masked)  # one table, a section per block
    assert "[layer2.0]" in text and "channels of conv1: 8/16 kept" in text
    assert "channels of stem.0: 4/8 kept" in text  # the residual width's mask, held by the stem's graph
    pruned = pruner.prune().eval()
    assert type(pruned) is SmallResNet and type(pruned.layer2[0]) is BasicBlock  # the blocks' own class back
    assert type(pruned.stem) is nn.Sequential and pruned.stem[0].out_channels == 4  # a layer between blocks too
    assert pruned.get_submodule("layer2.0.conv1").out_channels == 8
    assert pruned.get_submodule("layer1.1.conv2").out_channels == 4
    torch.testing.assert_close(pruned(x), masked(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(fxs.SparsityConfigError, match=r"its channels leave the block 'layer2.0' \(the group crosses "
                                                      r"graphs\): prune it with scope=\"model\""):
        SaliencyPruner().prepare(model, [{"tensor_fqn": "layer2.0.conv2.weight"}], scope=BasicBlock,
                                 example_inputs=(x,))


@pytest.mark.slow
def test_layers_scope_prunes_what_lies_inside_one_layer():
    model = SmallViT().eval()
    x = torch.randn(2, 3, 16, 16)
    pruner = SaliencyPruner(0.5)
    masked = fxs.prepare_fx_sparse(model, pruner, scope="layers", example_inputs=(x,))
    # every layer is a graph: only an nn.MultiheadAttention holds a whole group (its heads)
    assert [g["tensor_fqn"] for g in pruner.groups] == ["layers.0.self_attention.in_proj_weight",
                                                       "layers.1.self_attention.in_proj_weight"]
    pruner.step()
    pruned = pruner.prune()
    assert type(pruned) is SmallViT and type(pruned.layers[0].mlp[0]) is nn.Linear
    attention = pruned.layers[0].self_attention  # nn.MultiheadAttention cannot hold fewer heads than its width
    assert isinstance(attention, nn.MultiheadAttention) and type(attention).__name__ == "PrunedMultiheadAttention"
    assert (attention.embed_dim, attention.num_heads, attention.head_dim) == (32, 2, 8)
    torch.testing.assert_close(pruned(x), masked(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(fxs.SparsityConfigError, match=r"with scope=\"layers\" each layer is a graph of its own, and the "
                                                      r"channels of 'layers.0.mlp.0' \(Linear\) leave it \(the "
                                                      r"group crosses graphs\)"):
        SaliencyPruner().prepare(model, [{"tensor_fqn": "layers.0.mlp.0.weight"}], scope="layers",
                                 example_inputs=(x,))
    with pytest.warns(UserWarning, match="found no channel group it can cut exactly"):
        SaliencyPruner().prepare(resnet_like(), scope="layers", example_inputs=(torch.randn(1, 3, 16, 16),))


class _FixedWidthBlock(nn.Module):
    """A block whose code fixes a width: its own class cannot run once the width is cut."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h.view(h.shape[0], 16))


def test_a_block_whose_code_fixes_a_size_stays_a_pruned_graph_with_a_warning():
    model = nn.Sequential(_FixedWidthBlock(), nn.ReLU(), _FixedWidthBlock())
    x = torch.randn(3, 8)
    pruner = SaliencyPruner(0.5)
    masked = fxs.prepare_fx_sparse(model, pruner, scope=_FixedWidthBlock, example_inputs=(x,))
    pruner.step()
    with pytest.warns(UserWarning, match=r"'0' \(_FixedWidthBlock\) does not run with its smaller layers"):
        pruned = pruner.prune()
    assert isinstance(pruned[0], torch.fx.GraphModule) and pruned[0].fc1.out_features == 8
    torch.testing.assert_close(pruned(x), masked(x))


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


def test_channels_never_empty_a_tensor():
    """A split's half whose channels would all go keeps its best one (its consumer needs an input)."""
    model = SmallShuffleNetV2().eval()
    x = torch.randn(2, 3, 32, 32)
    pruner = SaliencyPruner(0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masked, pruned = prune(model, pruner, x)
    for m in pruned.modules():
        if isinstance(m, nn.Conv2d):
            assert m.in_channels > 0 and m.out_channels > 0
    torch.testing.assert_close(pruned(x), masked(x), rtol=1e-5, atol=1e-5)


def test_the_cut_check_allows_for_tf32_float32_math():
    """On CUDA, float32 convolutions run in TF32 by default; a float16-sized difference is rounding there, not a bad cut."""
    from types import SimpleNamespace

    from fx_sparsity.pipeline.cut import _rtol

    def on(device, dtype=torch.float32):
        return SimpleNamespace(dtype=dtype, device=torch.device(device))  # this machine may have no GPU

    assert _rtol(on("cpu")) == 1e-4 and _rtol(on("cpu", torch.float16)) == 1e-2
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        assert _rtol(on("cuda")) == 1e-2
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        assert _rtol(on("cuda")) == 1e-4
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls where the device has them
        assert _rtol(on("cpu")) == _rtol(on("cuda")) == 1e-2
    finally:
        torch.set_float32_matmul_precision(precision)
