"""Widths that pass through LayerNorm, RMSNorm, GroupNorm or a mean (a transformer's residual width) are pruned
exactly: the masked graph normalises over the kept channels only, so the pruned model computes what the masked one
does, also after training with the masks. Small, faithful copies of timm's ViT/DeiT, ConvNeXt, MLP-Mixer and
PoolFormer, RMSNorm variants (nn.RMSNorm, F.rms_norm, Hugging Face's LlamaRMSNorm written out), and the export
regressions (a relative-position index reshaped in the forward, a batch-1 example, attention biases cached
in eval mode as timm's LeViT/EfficientFormer do)."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from models import SmallSwin, WindowAttention
from torch import nn

import fx_sparsity as fxs
from fx_sparsity.passes.channels import MASKED_NORM_META

# -- models


class Mlp(nn.Module):
    def __init__(self, dim, hidden, act=nn.GELU):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), act(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """timm's Attention: fused qkv, reshape, permute, unbind, SDPA (or written out), proj."""

    def __init__(self, dim, heads, fused=True):
        super().__init__()
        self.heads, self.head_dim, self.fused = heads, dim // heads, fused
        self.scale = self.head_dim ** -0.5
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class LayerScale(nn.Module):
    def __init__(self, dim, init=1e-1):
        super().__init__()
        self.gamma = nn.Parameter(init * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4, layer_scale=False, fused=True):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads, fused)
        self.ls1 = LayerScale(dim) if layer_scale else nn.Identity()
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, dim * mlp_ratio)
        self.ls2 = LayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """timm's VisionTransformer / DeiT: conv patch embedding, class (and distillation) token, position embedding,
    pre-norm blocks, final norm, head on the class token (DeiT: averaged with the distillation head)."""

    def __init__(self, image=32, patch=8, dim=64, depth=2, heads=4, classes=10, distilled=False, layer_scale=False,
                 fused=True):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        tokens = (image // patch) ** 2 + (2 if distilled else 1)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.dist_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02) if distilled else None
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, layer_scale=layer_scale, fused=fused) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)
        self.head_dist = nn.Linear(dim, classes) if distilled else None

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.dist_token is not None:
            tokens.append(self.dist_token.expand(x.shape[0], -1, -1))
        x = torch.cat([*tokens, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        if self.head_dist is not None:
            return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2
        return self.head(x[:, 0])


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: a LayerNorm over the channels of an NCHW map (permute, F.layer_norm, permute)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ChannelsFirstLayerNorm(nn.Module):
    """The original ConvNeXt's LayerNorm for channels first, written out: mean, variance, scale, shift."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim)), eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7, channels-last LayerNorm, pointwise MLP (Linear), layer scale, residual."""

    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1, self.act, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(0.1 * torch.ones(dim))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """ConvNeXt: patchify stem + LayerNorm2d, stages of blocks, downsampling (LayerNorm + 2x2 conv), pooled
    LayerNorm head."""

    def __init__(self, dims=(32, 64), depths=(2, 2), classes=10, written_out=False):
        super().__init__()
        norm2d = ChannelsFirstLayerNorm if written_out else LayerNorm2d
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), norm2d(dims[0]))
        stages = []
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            layers = [] if i == 0 else [norm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], dim, 2, 2)]
            stages.append(nn.Sequential(*layers, *[ConvNeXtBlock(dim) for _ in range(depth)]))
        self.stages = nn.Sequential(*stages)
        self.norm, self.head = nn.LayerNorm(dims[-1], eps=1e-6), nn.Linear(dims[-1], classes)

    def forward(self, x):
        return self.head(self.norm(self.stages(self.stem(x)).mean((2, 3))))


class MixerBlock(nn.Module):
    """MLP-Mixer: token mixing (an MLP across the tokens, on the transposed map), channel mixing."""

    def __init__(self, dim, tokens, token_hidden, channel_hidden):
        super().__init__()
        self.norm1, self.mlp_tokens = nn.LayerNorm(dim, eps=1e-6), Mlp(tokens, token_hidden)
        self.norm2, self.mlp_channels = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, channel_hidden)

    def forward(self, x):
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(self.norm2(x))


class Mixer(nn.Module):
    def __init__(self, image=32, patch=8, dim=64, depth=2, token_hidden=32, channel_hidden=256, classes=10):
        super().__init__()
        tokens = (image // patch) ** 2
        self.stem = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.Sequential(*[MixerBlock(dim, tokens, token_hidden, channel_hidden) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(1))


class PoolFormerBlock(nn.Module):
    """PoolFormer: GroupNorm(1, C) (a LayerNorm over C, H, W), pooling as the token mixer, conv MLP, layer scale."""

    def __init__(self, dim, groups=1):
        super().__init__()
        self.norm1, self.pool = nn.GroupNorm(groups, dim), nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.norm2 = nn.GroupNorm(groups, dim)
        self.fc1, self.act, self.fc2 = nn.Conv2d(dim, 4 * dim, 1), nn.GELU(), nn.Conv2d(4 * dim, dim, 1)
        self.scale1 = nn.Parameter(0.1 * torch.ones(dim))
        self.scale2 = nn.Parameter(0.1 * torch.ones(dim))

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.scale1[:, None, None] * (self.pool(y) - y)
        return x + self.scale2[:, None, None] * self.fc2(self.act(self.fc1(self.norm2(x))))


class PoolFormer(nn.Module):
    def __init__(self, dims=(32, 64), classes=10, groups=1):
        super().__init__()
        self.stem = nn.Conv2d(3, dims[0], 4, 4)
        self.stage1 = nn.Sequential(PoolFormerBlock(dims[0], groups), PoolFormerBlock(dims[0], groups))
        self.down = nn.Conv2d(dims[0], dims[1], 3, 2, 1)
        self.stage2 = nn.Sequential(PoolFormerBlock(dims[1], groups), PoolFormerBlock(dims[1], groups))
        self.norm, self.head = nn.GroupNorm(1, dims[1]), nn.Linear(dims[1], classes)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.norm(x).mean((2, 3)))


class LlamaRMSNorm(nn.Module):
    """Hugging Face's LlamaRMSNorm, written as they write it: float32, mean of squares, rsqrt, weight."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * x.to(dtype)


class RMSBlock(nn.Module):
    """A pre-norm SwiGLU MLP block, normalised by nn.RMSNorm, F.rms_norm or a LlamaRMSNorm."""

    def __init__(self, dim, norm="module"):
        super().__init__()
        self.kind = norm
        self.norm = {"module": lambda: nn.RMSNorm(dim, eps=1e-6), "llama": lambda: LlamaRMSNorm(dim),
                     "functional": lambda: nn.RMSNorm(dim, eps=1e-6)}[norm]()
        self.gate, self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        if self.kind == "functional":
            y = F.rms_norm(x, (x.shape[-1],), self.norm.weight)
        else:
            y = self.norm(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class RMSNet(nn.Module):
    def __init__(self, vocab=50, dim=32, depth=2, norm="module"):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.Sequential(*[RMSBlock(dim, norm) for _ in range(depth)])
        self.norm, self.head = LlamaRMSNorm(dim) if norm == "llama" else nn.RMSNorm(dim, eps=1e-6), nn.Linear(dim,
                                                                                                            vocab)

    def forward(self, ids):
        return self.head(self.norm(self.blocks(self.embed(ids))))


class VarNorm(nn.Module):
    """A LayerNorm written with var (unbiased=False) and a std-based one (unbiased)."""

    def __init__(self, dim, std=False):
        super().__init__()
        self.weight, self.std = nn.Parameter(torch.ones(dim)), std

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        if self.std:
            return (x - mean) / (x.std(-1, keepdim=True) + 1e-5) * self.weight
        return (x - mean) * torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-5) * self.weight


class VarNet(nn.Module):
    def __init__(self, dim=32, std=False):
        super().__init__()
        self.fc0, self.norm, self.fc1 = nn.Linear(8, dim), VarNorm(dim, std), nn.Linear(dim, 4)

    def forward(self, x):
        h = self.fc0(x)
        return self.fc1(F.relu(self.norm(h)) + h)


# -- helpers


def params(model):
    return sum(p.numel() for p in model.parameters())


def relative(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def prune(model, x, tracer="symbolic", level=0.5, **kwargs):
    pruner = fxs.SaliencyPruner(level, **kwargs)
    masked = fxs.prepare_fx_sparse(model, pruner, example_inputs=(x,), tracer=tracer)
    pruner.step()
    return pruner, masked, pruner.prune()


def image(batch=2):
    return torch.randn(batch, 3, 32, 32)


def tokens(batch=2):
    return torch.randint(0, 50, (batch, 7))


MODELS = {  # name: (model, input, parameters left at most at 50%)
    "vit": (lambda: ViT(), image, 0.35),
    "vit_matmul_layer_scale": (lambda: ViT(fused=False, layer_scale=True), image, 0.35),
    "deit": (lambda: ViT(distilled=True), image, 0.35),
    "convnext": (lambda: ConvNeXt(), image, 0.35),
    "convnext_written_out": (lambda: ConvNeXt(written_out=True), image, 0.35),
    "mixer": (lambda: Mixer(), image, 0.35),
    "poolformer": (lambda: PoolFormer(), image, 0.35),
    "poolformer_4_groups": (lambda: PoolFormer(groups=4), image, 0.35),
    "swin": (lambda: SmallSwin(), image, 0.35),
    "rms_norm": (lambda: RMSNet(), tokens, 0.35),
    "rms_norm_functional": (lambda: RMSNet(norm="functional"), tokens, 0.35),
    "llama_rms_norm": (lambda: RMSNet(norm="llama"), tokens, 0.35),
    "var": (lambda: VarNet(), lambda batch=2: torch.randn(batch, 5, 8), 0.55),
    "std": (lambda: VarNet(std=True), lambda batch=2: torch.randn(batch, 5, 8), 0.55),
}


def seeded(name):
    torch.manual_seed(0)
    make, example, bound = MODELS[name]
    return make().eval(), example, bound


# -- tests


@pytest.mark.parametrize("tracer", ["symbolic", pytest.param("export", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", list(MODELS))
def test_normalised_widths_are_cut_and_the_pruned_model_equals_the_masked_one(name, tracer):
    model, example, bound = seeded(name)
    x = example()
    pruner, masked, pruned = prune(model, x, tracer)
    assert any(pruner.targets[g["tensor_fqn"]].channel_group.normalized for g in pruner.groups)
    assert params(pruned) <= bound * params(model), params(pruned) / params(model)
    for batch in (2, 3):  # the example's batch and another
        y = example(batch)
        assert relative(masked(y), pruned(y)) <= 1e-4
    assert not [n for n in pruned.graph.nodes if MASKED_NORM_META in n.meta]
    assert not [n for n in pruned.graph.nodes if "masked_" in str(n.target)]


def test_the_residual_width_halves_and_norms_take_their_new_shape():
    model, example, _ = seeded("vit")
    _, _, pruned = prune(model, example())
    assert pruned.get_parameter("patch_embed.weight").shape[0] == 32
    assert pruned.get_parameter("cls_token").shape == (1, 1, 32)
    assert pruned.get_parameter("pos_embed").shape == (1, 17, 32)
    assert pruned.get_submodule("blocks.0.norm1").normalized_shape == (32,)
    assert pruned.get_parameter("blocks.0.attn.qkv.weight").shape == (96, 32)  # 2 heads of 16 (the heads' group)
    assert pruned.get_parameter("head.weight").shape == (10, 32)
    model, example, _ = seeded("poolformer_4_groups")
    _, _, pruned = prune(model, example())
    norm = pruned.get_submodule("stage1.0.norm1")
    assert (norm.num_groups, norm.num_channels) == (4, 16)  # as many channels go from each of its groups


@pytest.mark.parametrize("name", ["vit", "convnext", "mixer", "poolformer", "llama_rms_norm"])
def test_training_with_the_masks_trains_the_model_prune_returns(name):
    model, example, _ = seeded(name)
    x = example(4)
    pruner = fxs.SaliencyPruner(0.5)
    masked = fxs.prepare_fx_sparse(model, pruner, example_inputs=(x,))
    pruner.step()
    masked.train()
    optimizer = torch.optim.AdamW(masked.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        out = masked(x)
        loss = out.float().pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    masked.eval()
    pruned = pruner.prune().eval()
    y = example(3)
    assert relative(masked(y), pruned(y)) <= 1e-4
    assert relative(masked(x), pruned(x)) <= 1e-4


def test_heads_take_a_level_of_their_own():
    model, example, _ = seeded("vit")  # 4 heads of 16; at 0.5, 2 go
    x = example()
    pruner = fxs.SaliencyPruner(0.5)
    masked = fxs.prepare_fx_sparse(model, pruner, example_inputs=(x,))
    for group in pruner.groups:  # torch.ao's per-group level, read by each step()
        if group["tensor_fqn"].endswith("attn.qkv.weight"):
            group["sparsity_level"] = 0.75
    pruner.step()
    pruned = pruner.prune()
    assert pruned.get_parameter("blocks.0.attn.qkv.weight").shape == (48, 32)  # 1 head left, the width halved
    assert pruned.get_parameter("blocks.0.mlp.fc1.weight").shape == (128, 32)
    assert relative(masked(x), pruned(x)) <= 1e-4


def test_prune_normalized_false_leaves_normalised_widths_whole():
    model, example, _ = seeded("vit")
    x = example()
    whole = fxs.SaliencyPruner(0.5, prune_normalized=False)
    fxs.prepare_fx_sparse(model, whole, example_inputs=(x,))
    assert whole.groups and not any(whole.targets[g["tensor_fqn"]].channel_group.normalized for g in whole.groups)
    assert sorted(g["tensor_fqn"] for g in whole.groups) == [
        "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "blocks.1.attn.qkv.weight", "blocks.1.mlp.fc1.weight"]
    every = fxs.FPGMPruner(0.5)
    fxs.prepare_fx_sparse(model, every, example_inputs=(x,))
    assert "patch_embed.weight" in [g["tensor_fqn"] for g in every.groups]
    with pytest.raises(fxs.SparsityConfigError, match="prune_normalized must be True or False"):
        fxs.SaliencyPruner(0.5, prune_normalized="yes")


@pytest.mark.slow
def test_a_group_norm_with_a_group_per_channel_is_cut_as_a_batch_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.GroupNorm(16, 16), nn.ReLU(), nn.Conv2d(16, 8, 3)).eval()
    x = torch.randn(2, 3, 12, 12)
    pruner, masked, pruned = prune(model, x)
    group = pruner.targets["0.weight"].channel_group
    assert group.normalized is None  # nothing is averaged across channels
    norm = pruned.get_submodule("1")
    assert (norm.num_groups, norm.num_channels) == (8, 8)
    assert relative(masked(x), pruned(x)) <= 1e-5
    _, masked, pruned = prune(model, x, "export")  # aten.group_norm: its number of groups rewritten
    assert relative(masked(x), pruned(x)) <= 1e-5


def test_the_printed_graph_notes_each_masked_norm():
    model, example, _ = seeded("rms_norm")
    x = example()
    pruner = fxs.SaliencyPruner(0.5)
    masked = fxs.prepare_fx_sparse(model, pruner, example_inputs=(x,))
    table = fxs.format_sparse_graph(masked)
    assert "masked norm: RMSNorm 'blocks.0.norm' over the kept channels of group 0" in table
    code = fxs.format_sparse_code(masked)
    assert "# <- masked norm: RMSNorm 'norm' over the kept channels of group 0" in code


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit", "convnext", "llama_rms_norm"])
def test_masked_norms_compile_and_export(name):
    model, example, _ = seeded(name)
    x = example()
    pruner = fxs.SaliencyPruner(0.5)
    masked = fxs.prepare_fx_sparse(model, pruner, example_inputs=(x,))
    pruner.step()
    torch.testing.assert_close(torch.compile(masked)(x), masked(x), rtol=1e-4, atol=1e-4)
    exported = torch.export.export(masked, (x,)).module()
    torch.testing.assert_close(exported(x), masked(x), rtol=1e-5, atol=1e-5)


# -- torch.export regressions


class ReshapedIndexAttention(WindowAttention):
    """Swin's window attention with its relative position index kept 2-D and flattened in the forward."""

    def __init__(self, dim, window, heads):
        super().__init__(dim, window, heads)
        index = self.relative_position_index.view(window * window, window * window)
        del self.relative_position_index
        self.register_buffer("relative_position_index", index, persistent=False)

    def forward(self, x, mask=None):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


@pytest.mark.slow
def test_export_follows_a_relative_position_index_reshaped_in_the_forward():
    torch.manual_seed(0)
    model = nn.Sequential(ReshapedIndexAttention(32, 4, 4), nn.GELU(), nn.Linear(32, 8)).eval()
    x = torch.randn(2, 16, 32)
    for tracer in ("symbolic", "export"):
        pruner, masked, pruned = prune(model, x, tracer)
        assert "0.qkv.weight" in [g["tensor_fqn"] for g in pruner.groups], tracer
        assert pruned.get_parameter("0.relative_position_bias_table").shape == (49, 2)
        assert relative(masked(x), pruned(x)) <= 1e-5


@pytest.mark.slow
def test_a_batch_of_one_exports_with_a_dynamic_batch():
    model, example, _ = seeded("vit")
    pruner, masked, pruned = prune(model, example(1), "export")
    for batch in (1, 3):
        y = example(batch)
        assert relative(masked(y), pruned(y)) <= 1e-4


class BatchOnly(nn.Module):
    """A model whose code only runs on a batch of one."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.view(1, 8))))


def test_a_model_that_exports_at_batch_one_only_says_so():
    x = torch.randn(1, 8)
    pruner = fxs.SaliencyPruner(0.5)
    with pytest.warns(UserWarning, match="have a batch of 1, which torch.export fixes: the masked and the pruned "
                                         "model will take batch 1 only"):
        masked = fxs.prepare_fx_sparse(BatchOnly().eval(), pruner, example_inputs=(x,), tracer="export")
    pruner.step()
    assert relative(masked(x), pruner.prune()(x)) <= 1e-5



class CachedBiasAttention(nn.Module):
    """timm's LeViT/EfficientFormer attention: fused qkv split into q, k, v per head, plus a learned bias per head
    and relative offset (``attention_biases[:, attention_bias_idxs]``) that eval mode caches in a dict (cleared by
    ``train()``, which returns None as timm's does)."""

    def __init__(self, dim=32, key_dim=8, num_heads=4, attn_ratio=2, resolution=4):
        super().__init__()
        self.num_heads, self.key_dim, self.val_dim = num_heads, key_dim, attn_ratio * key_dim
        self.scale, self.val_attn_dim = key_dim ** -0.5, attn_ratio * key_dim * num_heads
        self.qkv = nn.Linear(dim, 2 * key_dim * num_heads + self.val_attn_dim)
        self.proj = nn.Linear(self.val_attn_dim, dim)
        pos = torch.stack(torch.meshgrid(torch.arange(resolution), torch.arange(resolution), indexing="ij"))
        offsets = (pos.flatten(1)[..., :, None] - pos.flatten(1)[..., None, :]).abs()
        self.attention_biases = nn.Parameter(torch.randn(num_heads, resolution * resolution))
        self.register_buffer("attention_bias_idxs", offsets[0] * resolution + offsets[1])
        self.attention_bias_cache = {}

    @torch.no_grad()
    def train(self, mode=True):
        super().train(mode)
        if self.attention_bias_cache:
            self.attention_bias_cache = {}

    def get_attention_biases(self, device):
        if torch.jit.is_tracing() or self.training:
            return self.attention_biases[:, self.attention_bias_idxs]
        if str(device) not in self.attention_bias_cache:
            self.attention_bias_cache[str(device)] = self.attention_biases[:, self.attention_bias_idxs]
        return self.attention_bias_cache[str(device)]

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, self.num_heads, -1).permute(0, 2, 1, 3)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.get_attention_biases(x.device)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, self.val_attn_dim))


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["model", "block"])
def test_export_follows_attention_biases_a_layer_caches_in_eval_mode(scope):
    torch.manual_seed(0)
    model = nn.Sequential(CachedBiasAttention(), nn.GELU(), nn.Linear(32, 8))
    model.eval()
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        model(x)  # the cache is filled: torch.export would fold it into the graph as a constant
    cached = model[0].attention_bias_cache["cpu"]
    pruner = fxs.SaliencyPruner(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nor torch.export's "assigned during export"
        if scope == "block":  # the block restored from its class keeps the cut graph (its code fixes a width)
            warnings.filterwarnings("ignore", "prune\\(\\): '0' .* stays a pruned GraphModule")
        masked = fxs.prepare_fx_sparse(model, pruner, example_inputs=(x,), tracer="export",
                                       scope=CachedBiasAttention if scope == "block" else "model")
        pruner.step()
        pruned = pruner.prune()
    assert "0.qkv.weight" in [g["tensor_fqn"] for g in pruner.groups]  # the heads' group
    assert pruned.get_parameter("0.attention_biases").shape == (2, 16)  # 2 of 4 heads, their biases with them
    for batch in (2, 3):
        y = torch.randn(batch, 16, 32)
        assert relative(masked(y), pruned(y)) <= 1e-5
    assert model[0].attention_bias_cache["cpu"] is cached  # the user's layer keeps its cache


def test_each_masked_form_is_the_op_on_the_kept_channels():
    from fx_sparsity.passes.channels import masked_norms as mn

    torch.manual_seed(0)
    x = torch.randn(2, 8, 3, 12)  # channels last (12) for the layer norms, at dim 1 (8) for the group norm
    keep = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 0], dtype=torch.bool)
    m = keep.float().view(1, 1, 1, 12)
    w, b = torch.randn(12), torch.randn(12)
    kept = x[..., keep]
    out = mn.masked_layer_norm(x * m, m, (12,), w, b, 1e-5)
    torch.testing.assert_close(out[..., keep], F.layer_norm(kept, (7,), w[keep], b[keep], 1e-5))
    assert not out[..., ~keep].any()
    y, mean, rstd = mn.masked_layer_norm(x * m, m, (12,), w, b, 1e-5, 3)
    ref = torch.ops.aten.native_layer_norm(kept, [7], w[keep], b[keep], 1e-5)
    for a, r in zip((y[..., keep], mean, rstd), ref):
        torch.testing.assert_close(a, r)
    torch.testing.assert_close(mn.masked_rms_norm(x * m, m, (12,), w)[..., keep], F.rms_norm(kept, (7,), w[keep]))
    y, rstd = mn.masked_rms_norm(x * m, m, (12,), w, 1e-6, 2)
    ref = torch.ops.aten._fused_rms_norm(kept, [7], w[keep], 1e-6)
    torch.testing.assert_close(y[..., keep], ref[0])
    torch.testing.assert_close(rstd, ref[1])
    for dims, keepdim in (((3,), True), ((3,), False), ((2, 3), False)):
        torch.testing.assert_close(mn.masked_mean(x * m, m, dims, keepdim), kept.mean(dims, keepdim=keepdim))
        for kind in ("var", "std", "var_mean", "std_mean"):
            ours = mn.masked_var(x * m, m, dims, 1.0, keepdim, kind)
            theirs = getattr(torch, kind)(kept, dims, correction=1, keepdim=keepdim)
            torch.testing.assert_close(ours, theirs)
    channels = torch.tensor([1, 1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)  # 3 of each group of 4
    m = channels.float().view(1, 8, 1, 1)
    w, b = torch.randn(8), torch.randn(8)
    torch.testing.assert_close(mn.masked_group_norm(x * m, m, 2, w, b)[:, channels],
                               F.group_norm(x[:, channels], 2, w[channels], b[channels]))
    y, mean, rstd = mn.masked_group_norm(x * m, m, 2, w, b, 1e-5, 3)
    ref = torch.ops.aten.native_group_norm(x[:, channels], w[channels], b[channels], 2, 6, 36, 2, 1e-5)
    for a, r in zip((y[:, channels], mean, rstd), ref):
        torch.testing.assert_close(a, r)
