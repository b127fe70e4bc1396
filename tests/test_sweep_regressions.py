"""What sweeping real architectures (vision backbones, Hugging Face models) found, each reduced to its pattern."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from models import tied
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import fx_sparsity as fxs


def pruned_equals_masked(model, x, config=None, **kwargs):
    pruner = fxs.SaliencyPruner(0.5)
    masked = fxs.prepare_fx_sparse(model, pruner, config, example_inputs=(x,), **kwargs)
    pruner.step()
    small = pruner.prune().eval()
    torch.testing.assert_close(small(x), masked.eval()(x), rtol=1e-4, atol=1e-5)
    return pruner, small


class FrozenBatchNorm(nn.BatchNorm2d):
    def forward(self, x):  # symbolic tracing records F.batch_norm's weight and bias as keywords
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class KeywordBiasConv(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(x, self.weight, bias=self.bias, stride=self.stride, padding=self.padding)


class LayerNorm2d(nn.LayerNorm):  # torchvision's ConvNeXt: channels last, F.layer_norm, channels first
    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Conv2d(3, 16, 3), FrozenBatchNorm(16), nn.ReLU(), nn.Conv2d(16, 8, 3)),
    lambda: nn.Sequential(KeywordBiasConv(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3)),
], ids=["functional-batch-norm", "conv-bias-by-keyword"])
def test_per_channel_tensors_passed_by_keyword_are_cut_with_their_channels(make):
    torch.manual_seed(0)
    model = make().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1), m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-1, 1)
    pruner, small = pruned_equals_masked(model, torch.randn(2, 3, 16, 16))
    assert small.get_submodule("1" if isinstance(model[1], FrozenBatchNorm) else "0").bias.shape == (8,)


def test_a_channels_last_layer_norm_is_cut_with_its_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 4, 4), LayerNorm2d(16), nn.Conv2d(16, 8, 3)).eval()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the masked LayerNorm averages over the kept channels: exact, no warning
        pruner, small = pruned_equals_masked(model, x, [{"tensor_fqn": "0.weight"}])
    assert small.get_submodule("1").weight.shape == (8,) and small.get_submodule("2").weight.shape[1] == 8


def test_a_parametrized_layer_is_refused_and_named_not_cut_half():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = weight_norm(nn.Conv1d(4, 8, 3, padding=1)), nn.Conv1d(4, 8, 1), nn.Conv1d(8, 5, 1)

        def forward(self, x):
            return self.c(torch.relu(self.a(x) + self.b(x)))

    x = torch.randn(2, 4, 16)
    with pytest.raises(fxs.SparsityConfigError, match=r"'a' \(Conv1d\) computes its weight from a parametrization"):
        fxs.prepare_fx_sparse(Residual(), fxs.SaliencyPruner(), [{"tensor_fqn": "b.weight"}], example_inputs=(x,))

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c = nn.Conv1d(4, 8, 1), weight_norm(nn.Conv1d(8, 5, 1))

        def forward(self, x):
            return self.c(torch.relu(self.a(x)))

    with pytest.raises(fxs.SparsityConfigError, match=r"'c' \(Conv1d\) computes its weight from a parametrization; "
                                                      r"remove it"):
        fxs.prepare_fx_sparse(Chain(), fxs.SaliencyPruner(), [{"tensor_fqn": "a.weight"}], example_inputs=(x,))


class Aliased(nn.Module):
    """A layer registered under two names (TCN's TemporalBlock: self.conv1 and self.net[0])."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.net = nn.Sequential(self.fc, nn.ReLU())

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("scope", ["model", "layers"])
def test_a_layer_under_two_names_is_configured_once_and_masked_where_it_is_called(scope):
    torch.manual_seed(0)
    model, x = Aliased(), torch.randn(4, 8)
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
    prepared = fxs.prepare_fx_sparse(model, sparsifier, scope=scope)
    assert [g["tensor_fqn"] for g in sparsifier.groups] == ["fc.weight"]
    sparsifier.step()
    masked = prepared(x)
    expected = F.relu(F.linear(x, model.fc.weight * sparsifier.get_mask("fc.weight"), model.fc.bias))
    torch.testing.assert_close(masked, expected)
    plain = sparsifier.squash_mask()
    torch.testing.assert_close(plain(x), expected)
    if scope == "layers":
        assert plain.net[0] is plain.fc and type(plain.fc) is nn.Linear


def test_a_transposed_conv_alone_traces_symbolically():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ConvTranspose2d(8, 4, 2, stride=2))
    sparsifier = fxs.GlobalMagnitudeSparsifier(0.5)
    prepared = fxs.prepare_fx_sparse(model, sparsifier, [{"tensor_fqn": "1.weight"}], scope="layers")
    sparsifier.step()
    x = torch.randn(1, 3, 8, 8)
    expected = F.conv_transpose2d(model[0](x), model[1].weight * sparsifier.get_mask("1.weight"), model[1].bias,
                                  stride=2)
    torch.testing.assert_close(prepared(x), expected)


@pytest.mark.parametrize("scope", ["layers", nn.Embedding])
def test_tied_weights_in_a_scoped_model_run_after_squash(scope):
    model = tied()
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
    x = torch.randint(0, 40, (2, 7))
    prepared = fxs.prepare_fx_sparse(model, sparsifier, scope=scope)
    sparsifier.step()
    expected = prepared(x)
    torch.testing.assert_close(copy.deepcopy(prepared)(x), expected)
    lowered = fxs.convert_fx_sparse(prepared, "csr", example_inputs=(x,))  # units lowered on copies
    torch.testing.assert_close(lowered(x), expected, rtol=1e-4, atol=1e-5)
    plain = sparsifier.squash_mask()
    torch.testing.assert_close(plain(x), expected)
    assert not any(m._forward_pre_hooks for m in plain.modules())


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, mask=None, **kwargs):
        return self.fc(x) if mask is None else self.fc(x) * mask


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.b1, self.b2 = Block(), Block()

    def forward(self, x):
        return self.b2(self.b1(x, mask=None), flag=False, position_ids=torch.arange(x.shape[-2]))


def test_an_exported_block_scope_copies_converts_and_stays_dynamic_with_extra_keywords():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
    prepared = fxs.prepare_fx_sparse(Net(), sparsifier, scope=Block, tracer="export", example_inputs=(x,))
    sparsifier.step()
    twin = copy.deepcopy(prepared)  # exported blocks keep their input checks (None keywords dropped)
    other = torch.randn(3, 7, 8)  # batch and sequence stay dynamic, **kwargs inputs too
    torch.testing.assert_close(twin(other), prepared(other))
    lowered = fxs.convert_fx_sparse(prepared, "csr", example_inputs=(x,))
    torch.testing.assert_close(lowered(other), prepared(other), rtol=1e-4, atol=1e-5)
    block = prepared.b1  # keywords it was not exported with: a flag asking for what ran is dropped, others refused
    torch.testing.assert_close(block(x, output_attentions=False), block(x))
    with pytest.raises(fxs.TraceError, match=r"without the keyword inputs \['scale'\]"):
        block(x, scale=torch.ones(8))


class SharedEmbedding(nn.Module):
    """transformers 5's T5: `shared`, never called, holds the weight the called embedding and lm_head tie to."""

    def __init__(self):
        super().__init__()
        self.shared, self.embed = nn.Embedding(20, 8), nn.Embedding(20, 8)
        self.body, self.lm_head = Block(), nn.Linear(8, 20, bias=False)
        self.embed.weight = self.lm_head.weight = self.shared.weight

    def forward(self, ids):
        return self.lm_head(self.body(self.embed(ids)))


def test_a_tied_reader_the_model_never_calls_needs_no_graph():
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
    ids = torch.randint(0, 20, (2, 6))
    prepared = fxs.prepare_fx_sparse(SharedEmbedding(), sparsifier, scope=Block, tracer="export",
                                     example_inputs=(ids,))
    sparsifier.step()
    assert isinstance(prepared.body, torch.fx.GraphModule) and not isinstance(prepared.shared, torch.fx.GraphModule)
    weight = prepared.lm_head.weight * sparsifier.get_mask("lm_head.weight")
    torch.testing.assert_close(prepared(ids), F.linear(prepared.body(F.embedding(ids, weight)), weight))


def test_n_m_runs_along_the_input_dim_of_hugging_face_conv1d():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4,
                                                                 n_positions=32)).eval()
    sparsifier = fxs.NMSparsifier(2, 4)
    fxs.prepare_fx_sparse(model, sparsifier, [{"tensor_fqn": "transformer.h.0.mlp.c_fc.weight"},
                                              {"tensor_fqn": "lm_head.weight"}], scope="layers")
    sparsifier.step()
    conv1d = sparsifier.get_mask("transformer.h.0.mlp.c_fc.weight")  # (in=32, out=128)
    assert bool((conv1d.t().reshape(128, 8, 4).sum(-1) == 2).all())
    linear = sparsifier.get_mask("lm_head.weight")  # (out=64, in=32)
    assert bool((linear.reshape(64, 8, 4).sum(-1) == 2).all())
    assert sparsifier.groups[0]["input_dim"] == 0 and "input_dim" not in sparsifier.groups[1]


class BiasedAttention(nn.Module):
    """T5-style: a learned bias per head (an embedding of relative positions) added to the scores through SDPA's
    attn_mask, so the table's column of a head goes with it."""

    def __init__(self, dim=32, heads=4, buckets=16):
        super().__init__()
        self.heads, self.qkv, self.o = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.relative_bias = nn.Embedding(buckets, heads)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        positions = torch.arange(n)
        buckets = (positions[None, :] - positions[:, None]).clamp(-7, 8) + 7
        bias = self.relative_bias(buckets).permute(2, 0, 1).unsqueeze(0)  # (1, heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.o(out.transpose(1, 2).reshape(b, n, d))


@pytest.mark.slow
def test_a_per_head_attention_bias_is_cut_with_its_heads():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), BiasedAttention(), nn.Linear(32, 2)).eval()
    x = torch.randn(2, 6, 8)
    pruner, small = pruned_equals_masked(model, x, [{"tensor_fqn": "1.qkv.weight"}], tracer="export")
    heads = pruner.targets[pruner.groups[0]["tensor_fqn"]].channel_group
    assert heads.num_classes == 4 and ("1.relative_bias.weight", 1) in heads.tensors
    assert small.get_submodule("1.relative_bias").weight.shape == (16, 2)


class SuperResolution(nn.Module):
    """EDSR/ESPCN-style upsampler (conv to r²·C channels, PixelShuffle, conv) and a PixelUnshuffle branch."""

    def __init__(self):
        super().__init__()
        self.head, self.up = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 64, 3, padding=1)
        self.shuffle, self.tail = nn.PixelShuffle(2), nn.Conv2d(16, 3, 3, padding=1)
        self.down = nn.Conv2d(32, 8, 1)

    def forward(self, x):
        features = torch.relu(self.head(x))
        return self.tail(torch.relu(self.shuffle(self.up(features)))), self.down(F.pixel_unshuffle(features[:, :8], 2))


@pytest.mark.parametrize("tracer", ["symbolic", pytest.param("export", marks=pytest.mark.slow)])
def test_pixel_shuffle_cuts_whole_sub_pixel_groups(tracer):
    torch.manual_seed(0)
    pruner, small = pruned_equals_masked(SuperResolution().eval(), torch.randn(2, 3, 8, 8), tracer=tracer)
    up = pruner.targets["up.weight"].channel_group
    assert up.num_classes == 16 and up.channels_per_class == [4] * 16  # r² = 4 channels per shuffled channel
    assert small.get_submodule("up").weight.shape[0] == 32 and small.get_submodule("tail").weight.shape[1] == 8


class LearnedQueries(nn.Module):
    """DETR builds its decoder queries with a repeat whose count is the batch size, read at run time."""

    def __init__(self):
        super().__init__()
        self.queries = nn.Embedding(6, 16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x):  # x: (batch, 16)
        queries = self.queries.weight.unsqueeze(1).repeat(1, x.shape[0], 1)  # (6, batch, 16)
        return self.fc2(torch.relu(self.fc1(queries + x)))


@pytest.mark.parametrize("tracer", ["symbolic", "export"])
def test_a_repeat_by_a_run_time_count_is_followed(tracer):
    torch.manual_seed(0)
    pruner, small = pruned_equals_masked(LearnedQueries().eval(), torch.randn(3, 16), tracer=tracer)
    assert small.get_submodule("fc1").weight.shape == (16, 16)


class AttentionWeightsUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.fc = nn.MultiheadAttention(16, 4), nn.Linear(16, 16)

    def forward(self, x):  # need_weights left at True, the averaged weights never read (DETR's code)
        return self.fc(self.attn(x, x, x)[0])


@pytest.mark.slow
def test_attention_weights_computed_and_dropped_do_not_block_its_heads():
    x = torch.randn(5, 2, 16)
    for tracer in ("symbolic", "export"):
        pruner = fxs.SaliencyPruner(0.5)
        fxs.prepare_fx_sparse(AttentionWeightsUnused().eval(), pruner, example_inputs=(x,), tracer=tracer)
        assert [g["tensor_fqn"] for g in pruner.groups] == ["attn.in_proj_weight", "attn.out_proj.weight"]
    # alone (scope="layers"), the weights it returns average its heads: over the kept ones in the masked graph
    pruner, small = pruned_equals_masked(AttentionWeightsUnused().eval(), x, scope="layers")
    assert [g["tensor_fqn"] for g in pruner.groups] == ["attn.in_proj_weight"] and small.attn.num_heads == 2
    with pytest.warns(UserWarning, match="called with need_weights=True, and the attention weights it returns "
                                         "average its heads: call it with need_weights=False"):
        fxs.prepare_fx_sparse(AttentionWeightsUnused().eval(), fxs.SaliencyPruner(0.5, prune_normalized=False),
                              scope="layers", example_inputs=(x,))


class ScaledBlock(nn.Module):
    """Gemma's embed_scale, Swin's relative_position_index: a non-persistent buffer of the model's own."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("scale", torch.tensor(2.0), persistent=False)

    def forward(self, x, alibi):  # Falcon: a required argument its caller passes as None
        return self.fc(x) * self.scale if alibi is None else self.fc(x) * self.scale + alibi


class ScaledNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([ScaledBlock(), ScaledBlock()])

    def forward(self, x):
        for block in self.blocks:
            x = block(x, alibi=None)
        return x


def test_exported_blocks_with_their_own_non_persistent_buffers_and_a_required_none_argument():
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
    x = torch.randn(2, 8)
    prepared = fxs.prepare_fx_sparse(ScaledNet(), sparsifier, scope=ScaledBlock, tracer="export",
                                     example_inputs=(x,))
    sparsifier.step()
    expected = x
    for block in prepared.blocks:
        expected = F.linear(expected, block.fc.weight * block.fc.weight_mask, block.fc.bias) * 2
    torch.testing.assert_close(prepared(torch.cat([x, x])), torch.cat([expected, expected]))
    with pytest.raises(fxs.TraceError, match=r"\['alibi'\] was None"):
        prepared.blocks[0](x, alibi=torch.ones(8))


def test_a_weight_norm_elsewhere_in_the_model_does_not_block_prepare():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), weight_norm(nn.Linear(8, 4)))
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
    prepared = fxs.prepare_fx_sparse(model, sparsifier, [{"tensor_fqn": "0.weight"}])
    sparsifier.step()
    x = torch.randn(3, 8)
    torch.testing.assert_close(prepared(x), model[2](F.relu(F.linear(x, model[0].weight * sparsifier.get_mask(
        "0.weight"), model[0].bias))))
    with pytest.raises(fxs.SparsityConfigError, match=r"'2.weight' is computed by the parametrizations "
                                                      r"\['_WeightNorm'\]"):
        fxs.prepare_fx_sparse(model, fxs.WeightNormSparsifier(), [{"tensor_fqn": "2.weight"}])


class ReadsWeight(nn.Module):
    """Mamba's dt_proj: the parent multiplies by the child's weight instead of calling it."""

    def __init__(self):
        super().__init__()
        self.dt = nn.Linear(8, 8)

    def forward(self, x):
        return x @ self.dt.weight.T


def test_a_layer_its_parent_reads_directly_is_named_when_the_example_never_calls_it():
    model = nn.Sequential(ReadsWeight())
    with pytest.warns(UserWarning, match=r"\['0.dt'\] was not called when the model ran on example_inputs. If its "
                                         r"parent reads its tensors directly"):
        fxs.prepare_fx_sparse(model, fxs.WeightNormSparsifier(), [{"tensor_fqn": "0.dt.weight"}], scope="layers",
                              example_inputs=(torch.randn(2, 8),))
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)  # a block scope holding the parent masks it
    prepared = fxs.prepare_fx_sparse(model, sparsifier, [{"tensor_fqn": "0.dt.weight"}], scope=ReadsWeight,
                                     example_inputs=(torch.randn(2, 8),))
    sparsifier.step()
    x = torch.randn(2, 8)
    torch.testing.assert_close(prepared(x), x @ (model[0].dt.weight * sparsifier.get_mask("0.dt.weight")).T)


def test_a_failed_state_dict_load_changes_no_mask_and_numpy_levels_save_weights_only(tmp_path):
    numpy = pytest.importorskip("numpy")
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))
    other = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 12))
    source = fxs.WeightNormSparsifier(sparsity_level=numpy.float64(0.9))  # a level from np.linspace, say
    fxs.prepare_fx_sparse(wide, source)
    source.step()
    target = fxs.WeightNormSparsifier(sparsity_level=0.5)
    fxs.prepare_fx_sparse(other, target)
    target.step()
    before = [target.get_mask(g["tensor_fqn"]).clone() for g in target.groups]
    with pytest.raises(RuntimeError, match="Error loading '2.weight': saved mask has shape"):
        target.load_state_dict(source.state_dict())  # the first layer fits, the second does not
    assert all(torch.equal(target.get_mask(g["tensor_fqn"]), m) for g, m in zip(target.groups, before))
    torch.save(source.state_dict(), tmp_path / "sparsifier.pt")
    saved = torch.load(tmp_path / "sparsifier.pt")  # weights_only: plain numbers
    assert type(saved["groups"][0]["sparsity_level"]) is float


def test_a_config_key_close_to_a_known_one_is_named_as_a_likely_typo():
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
    with pytest.warns(UserWarning, match=r"config\[0\]: unknown key 'sparsity_levl' \(did you mean "
                                         r"'sparsity_level'\?\)"):
        fxs.prepare_fx_sparse(nn.Sequential(nn.Linear(8, 8)), sparsifier,
                              [{"tensor_fqn": "0.weight", "sparsity_levl": 0.9}])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a key of one's own (passed on to update_mask) is not warned
        fxs.prepare_fx_sparse(nn.Sequential(nn.Linear(8, 8)), fxs.WeightNormSparsifier(),
                              [{"tensor_fqn": "0.weight", "owner_note": "attention"}])


class BiasFirst(nn.Module):
    """Hugging Face's Conv1D: `addmm(bias, x, weight)` reads the bias first."""

    def __init__(self, nx=8, nf=16):
        super().__init__()
        self.nf, self.weight, self.bias = nf, nn.Parameter(torch.randn(nx, nf)), nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


@pytest.mark.parametrize("scope", ["model", "layers"])
def test_parameters_keep_their_order_so_optimizer_state_moves_between_scopes(scope):
    model = nn.Sequential(BiasFirst(), nn.ReLU(), nn.Linear(16, 4))
    prepared = fxs.prepare_fx_sparse(model, fxs.WeightNormSparsifier(), [{"tensor_fqn": "0.weight"},
                                                                          {"tensor_fqn": "2.weight"}], scope=scope)
    assert [n for n, _ in prepared.named_parameters()] == [n for n, _ in model.named_parameters()]


class TransposedWeightLinear(nn.Linear):
    """Falcon's FalconLinear: `x @ self.weight.T` instead of F.linear."""

    def forward(self, x):
        out = x @ self.weight.T
        return out if self.bias is None else out + self.bias


@pytest.mark.parametrize("tracer", ["symbolic", "export"])
def test_a_linear_written_as_a_matmul_by_the_transposed_weight_is_a_producer(tracer):
    torch.manual_seed(0)
    model = nn.Sequential(TransposedWeightLinear(8, 16), nn.ReLU(), TransposedWeightLinear(16, 4)).eval()
    pruner, small = pruned_equals_masked(model, torch.randn(2, 8), tracer=tracer)
    assert [g["tensor_fqn"] for g in pruner.groups] == ["0.weight"]
    assert small.get_submodule("0").weight.shape == (8, 8) and small.get_submodule("2").weight.shape == (4, 8)
