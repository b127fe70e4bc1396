"""What a newcomer meets first: trace errors that name the way that works, and warnings where a call would
silently do nothing (or more than asked)."""
import pytest
import torch
from models import mlp, tied
from torch import nn

import fx_sparsity as fxs


class Branchy(nn.Module):
    """A model whose own forward branches on data: no tracer takes the whole of it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = self.fc1(x)
        if h.sum() > 0:
            h = h * 2
        return self.fc2(torch.relu(h))


def test_a_data_dependent_model_is_told_to_use_scope_layers_and_that_works(capfd):
    x = torch.randn(3, 8)
    with pytest.raises(fxs.TraceError) as info:
        fxs.prepare_fx_sparse(Branchy(), fxs.WeightNormSparsifier())
    message = str(info.value)
    first, ways = message.split("\n")[:2]
    assert first.startswith("torch.fx.symbolic_trace cannot trace Branchy: TraceError: ")
    assert "test_front_door.py" in first and "`if h.sum() > 0:`" in first  # where, in the user's code
    assert ways.startswith('Ways that work, in order: scope="layers"')
    with pytest.raises(fxs.TraceError) as info:
        fxs.prepare_fx_sparse(Branchy(), fxs.WeightNormSparsifier(), tracer="export", example_inputs=(x,))
    assert 'Ways that work, in order: scope="layers"' in str(info.value)
    assert len(str(info.value).splitlines()) <= 3  # torch's text is chained, not pasted
    assert "def forward" not in capfd.readouterr().err  # nor its partial graph printed
    model = Branchy()
    sparsifier = fxs.WeightNormSparsifier(0.5)
    prepared = fxs.prepare_fx_sparse(model, sparsifier, scope="layers")
    sparsifier.step()
    torch.testing.assert_close(prepared(x), sparsifier.squash_mask()(x))
    assert (prepared.fc1.weight == 0).float().mean().item() == 0.5


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class BranchyBlocks(nn.Module):
    """Blocks that trace, joined by a forward that branches on data."""

    def __init__(self):
        super().__init__()
        self.first, self.second = Mlp(), Mlp()

    def forward(self, x):
        h = self.first(x)
        if h.sum() > 0:
            h = h * 2
        return self.second(h)


@pytest.mark.parametrize("tracer", ["symbolic", "export"])
def test_structured_pruning_of_a_data_dependent_model_is_told_to_use_a_block_scope(tracer, capfd):
    x = torch.randn(3, 8)
    with pytest.raises(fxs.TraceError) as info:
        fxs.prepare_fx_sparse(BranchyBlocks(), fxs.SaliencyPruner(0.5), tracer=tracer, example_inputs=(x,))
    first, ways = str(info.value).split("\n")[:2]
    assert "cannot trace BranchyBlocks: " in first and "`if h.sum() > 0:`" in first
    assert ways.startswith("Ways that work, in order: scope=<a block class> whose forward ")
    assert ways.endswith('scope="layers" also runs, but cuts only what lies inside one layer.' if tracer == "symbolic"
                         else "(torch's full message is chained below.)")
    assert "def forward" not in capfd.readouterr().err
    pruner = fxs.SaliencyPruner(0.5)
    masked = fxs.prepare_fx_sparse(BranchyBlocks(), pruner, scope=Mlp, tracer=tracer, example_inputs=(x,))
    pruner.step()
    smaller = pruner.prune()
    assert smaller.first.fc1.weight.shape == (16, 8) and smaller.second.fc2.weight.shape == (8, 16)
    # the model's own code reads the width between the blocks (h.sum(), h * 2): it is not cut there, whichever
    # branch the example took (a masked sum over all channels would differ from the pruned one)
    assert smaller.first.fc2.weight.shape == (8, 16) and smaller.second.fc1.weight.shape == (16, 8)
    torch.testing.assert_close(smaller(x), masked(x))
    with pytest.warns(UserWarning, match=r"found no channel group it can cut exactly .* with scope=\"layers\" each "
                                         r"layer is traced alone"):
        fxs.prepare_fx_sparse(BranchyBlocks(), fxs.SaliencyPruner(0.5), scope="layers", example_inputs=(x,))


def test_default_config_names_both_owners_of_a_tied_weight():
    with pytest.warns(UserWarning, match=r"'out.weight' is tied to \['embed.weight'\]"):
        fxs.prepare_fx_sparse(tied(), fxs.WeightNormSparsifier())


def test_prune_that_cuts_nothing_says_why():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    pruner = fxs.SaliencyPruner(0.5)
    fxs.prepare_fx_sparse(model, pruner, example_inputs=(torch.randn(2, 8),))
    with pytest.warns(UserWarning, match=r"prune\(\): every channel is kept \(levels \[0.5\]\).*Call step\(\)"):
        same = pruner.prune()
    assert same.get_submodule("0").weight.shape == (16, 8)
    # a scheduler made before step() starts the level at 0: prune() says so instead of returning the model uncut
    pruner = fxs.SaliencyPruner(0.5)
    fxs.prepare_fx_sparse(model, pruner, example_inputs=(torch.randn(2, 8),))
    fxs.CubicSL(pruner, init_sl=0.0, total_t=10)
    pruner.step()
    with pytest.warns(UserWarning, match=r"levels \[0.0\]"):
        pruner.prune()


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)

    def forward(self, x):
        return torch.relu(self.fc(x))


@pytest.mark.parametrize("scope", ["model", "layers", fxs.BlockScope(Inner)], ids=["model", "layers", "block"])
def test_the_live_config_is_on_the_prepared_model_in_every_scope(scope):
    model = nn.Sequential(Inner(), nn.Linear(8, 2)) if scope != "model" else mlp()
    sparsifier = fxs.WeightNormSparsifier(0.5)
    prepared = fxs.prepare_fx_sparse(model, sparsifier, scope=scope)
    config = prepared.fx_sparsity_config
    assert list(config) == [g["tensor_fqn"] for g in sparsifier.groups]
    sparsifier.groups[0]["sparsity_level"] = 0.25  # the live groups, as a scheduler changes them
    assert config[sparsifier.groups[0]["tensor_fqn"]]["sparsity_level"] == 0.25
    squashed = sparsifier.squash_mask()
    if scope != "model":
        assert not hasattr(squashed, "fx_sparsity_config")  # the user's model as it was


@pytest.mark.slow
def test_a_cache_reaching_an_exported_block_says_use_cache_false():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    ids = torch.randint(0, 96, (2, 8))
    pruner = fxs.SaliencyPruner(0.5)
    masked = fxs.prepare_fx_sparse(model, pruner, scope=LlamaDecoderLayer, tracer="export",
                                   example_inputs={"input_ids": ids, "use_cache": False})
    with pytest.raises(fxs.TraceError, match=r"a Hugging Face cache \(DynamicCache\) reached it: call the masked "
                                             r"model with use_cache=False"):
        masked(ids)  # a decoder in eval mode makes a cache by default
    pruner.step()
    torch.testing.assert_close(pruner.prune()(ids).logits, masked(ids, use_cache=False).logits)
