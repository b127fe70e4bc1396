"""nn.LSTM / nn.GRU / nn.RNN: their weights masked in the graph (unstructured), their hidden units cut (structured)."""
import copy
import pickle

import pytest
import torch
import torch.ao.pruning as ao
from torch import nn

import fx_sparsity as fxs

RNNS = {
    "lstm": dict(cls=nn.LSTM),
    "gru-2-layers-batch-first": dict(cls=nn.GRU, num_layers=2, batch_first=True),
    "rnn-relu-3-layers": dict(cls=nn.RNN, num_layers=3, nonlinearity="relu"),
    "lstm-bidirectional-2-layers": dict(cls=nn.LSTM, num_layers=2, bidirectional=True),
    "lstm-projections": dict(cls=nn.LSTM, proj_size=4),
    "lstm-no-bias": dict(cls=nn.LSTM, bias=False),
}


class Tagger(nn.Module):
    """Embedding -> Linear -> recurrent layer -> Linear per step: a sequence tagger."""

    def __init__(self, cls=nn.LSTM, hidden=24, **kwargs):
        super().__init__()
        self.emb, self.proj = nn.Embedding(50, 16), nn.Linear(16, 16)
        self.rnn = cls(16, hidden, **kwargs)
        width = kwargs.get("proj_size") or hidden
        self.head = nn.Linear(width * (2 if kwargs.get("bidirectional") else 1), 5)

    def forward(self, tokens):
        states, _ = self.rnn(torch.relu(self.proj(self.emb(tokens))))
        return self.head(states)


def tokens(batch_first, batch=3, steps=7):
    return torch.randint(0, 50, (batch, steps) if batch_first else (steps, batch))


def masked_by_hand(model, sparsifier, config):
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for entry in config:
            reference.get_parameter(entry["tensor_fqn"]).mul_(sparsifier.get_mask(entry["tensor_fqn"]))
    return reference


@pytest.mark.parametrize("name", RNNS)
@pytest.mark.parametrize("scope", ["model", "layers"])
def test_recurrent_weights_are_masked_in_the_graph_as_torch_ao_masks_them(name, scope):
    torch.manual_seed(0)
    model = Tagger(**RNNS[name]).eval()
    config = [{"tensor_fqn": n} for n, _ in model.named_parameters() if n.startswith("rnn.weight")]
    defaults = dict(sparsity_level=0.5, sparse_block_shape=(1, 4), zeros_per_block=4)
    sparsifier = fxs.WeightNormSparsifier(**defaults)
    prepared = fxs.prepare_fx_sparse(model, sparsifier, config, scope=scope)
    sparsifier.step()
    theirs = copy.deepcopy(model)
    reference = ao.WeightNormSparsifier(**defaults)
    reference.prepare(theirs, copy.deepcopy(config))
    reference.step()
    for entry in config:
        expected = getattr(theirs.rnn.parametrizations, entry["tensor_fqn"].split(".")[1])[0].mask
        assert torch.equal(sparsifier.get_mask(entry["tensor_fqn"]).bool(), expected), entry["tensor_fqn"]
    x = tokens(RNNS[name].get("batch_first", False))
    expected = masked_by_hand(model, sparsifier, config)(x)
    torch.testing.assert_close(prepared(x), expected)
    torch.testing.assert_close(theirs(x), expected)
    torch.testing.assert_close(sparsifier.squash_mask()(x), expected)


@pytest.mark.slow
def test_a_prepared_recurrent_graph_trains_copies_pickles_and_compiles():
    torch.manual_seed(0)
    model = Tagger(nn.LSTM, num_layers=2, batch_first=True)
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
    prepared = fxs.prepare_fx_sparse(model, sparsifier, [{"tensor_fqn": "rnn.weight_hh_l1"}])
    sparsifier.step()
    x = tokens(True)
    prepared(x).square().mean().backward()
    mask = sparsifier.get_mask("rnn.weight_hh_l1")
    assert bool((prepared.rnn.weight_hh_l1.grad[mask == 0] == 0).all())  # masked weights get no gradient
    assert prepared.rnn.weight_hh_l0.grad.abs().sum() > 0
    prepared.eval()
    for twin in (pickle.loads(pickle.dumps(prepared)), copy.deepcopy(prepared)):
        torch.testing.assert_close(twin(x), prepared(x))
    compiled = torch.compile(prepared)  # dynamo runs the recurrent layer itself eagerly, as for the model
    torch.testing.assert_close(compiled(x), prepared(x))


@pytest.mark.slow
def test_a_recurrent_layer_with_dropout_between_layers_asks_for_export():
    model = Tagger(nn.LSTM, num_layers=2, dropout=0.1)
    with pytest.raises(fxs.passes.MaskInsertionError, match=r"cannot inline \(RecurrentError: LSTM with "
                                                           r"dropout=0.1 between its layers.*tracer=\"export\""):
        fxs.prepare_fx_sparse(model, fxs.WeightNormSparsifier(), [{"tensor_fqn": "rnn.weight_hh_l0"}])
    x = tokens(False)
    sparsifier = fxs.WeightNormSparsifier()
    prepared = fxs.prepare_fx_sparse(model, sparsifier, [{"tensor_fqn": "rnn.weight_hh_l0"}], tracer="export",
                                     example_inputs=(x,))
    sparsifier.step()
    torch.testing.assert_close(prepared.eval()(x), masked_by_hand(model.eval(), sparsifier,
                                                                 [{"tensor_fqn": "rnn.weight_hh_l0"}])(x))


@pytest.mark.parametrize("name", ["lstm", "gru-2-layers-batch-first", "rnn-relu-3-layers", "lstm-no-bias",
                                  "lstm-bidirectional-2-layers"])
@pytest.mark.parametrize("pruner_cls", [fxs.SaliencyPruner, fxs.FPGMPruner])
def test_hidden_units_are_cut_and_the_cut_model_equals_the_masked_one(name, pruner_cls):
    torch.manual_seed(0)
    kwargs = RNNS[name]
    model = Tagger(**kwargs)
    batch_first = kwargs.get("batch_first", False)
    pruner = pruner_cls(0.5)
    masked = fxs.prepare_fx_sparse(model, pruner, None, example_inputs=(tokens(batch_first),))
    layers = kwargs.get("num_layers", 1) * (2 if kwargs.get("bidirectional") else 1)
    units = pruner.targets["rnn.weight_ih_l0"].channel_group
    assert units.num_classes == 24 * layers  # every layer's (and direction's) units, one group: one hidden_size
    pruner.step()
    small = pruner.prune().eval()
    masked.eval()
    assert small.rnn.hidden_size == 12 and small.rnn.input_size == 8
    gates = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}[kwargs["cls"]]
    assert all(w.shape == (12 * gates, 12) for n, w in small.rnn.named_parameters() if n.startswith("weight_hh"))
    for x in (tokens(batch_first), tokens(batch_first, batch=1, steps=3)):
        torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-6)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters()) / 3


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.out = nn.GRU(16, 32, batch_first=True), nn.Linear(32, 16)

    def forward(self, x):
        return x + self.out(self.rnn(x)[0])


def test_a_block_holding_a_recurrent_layer_gets_its_class_back_smaller():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), _Block(), _Block(), nn.Linear(16, 2))
    x = torch.randn(4, 6, 8)
    pruner = fxs.SaliencyPruner(0.25)
    masked = fxs.prepare_fx_sparse(model, pruner, None, scope=_Block, example_inputs=(x,))
    pruner.step()
    small = pruner.prune()
    assert isinstance(small[1], _Block) and small[1].rnn.hidden_size == 24
    torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-6)


class _Encoder(nn.Module):
    """Classifies from the final state (h_n[-1]) of a 2-layer LSTM."""

    def __init__(self, initial_state=False):
        super().__init__()
        self.rnn, self.fc = nn.LSTM(8, 16, num_layers=2), nn.Linear(16, 3)
        self.initial_state = initial_state

    def forward(self, x, h0=None, c0=None):
        _, (h, _) = self.rnn(x, (h0, c0)) if self.initial_state else self.rnn(x)
        return self.fc(h[-1])


def test_a_used_final_state_cuts_the_same_units_in_every_layer():
    torch.manual_seed(0)
    model, x = _Encoder(), torch.randn(5, 3, 8)
    pruner = fxs.SaliencyPruner(0.5)
    masked = fxs.prepare_fx_sparse(model, pruner, None, example_inputs=(x,))
    assert pruner.targets[pruner.groups[0]["tensor_fqn"]].channel_group.num_classes == 16  # unit j of both layers is one class
    pruner.step()
    small = pruner.prune()
    assert small.rnn.hidden_size == 8
    torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-6)


def test_refusals_name_the_recurrent_layer_and_why():
    x = tokens(False)
    with pytest.raises(fxs.SparsityConfigError, match=r"'recurrent' is a LSTM with projections"):
        fxs.prepare_fx_sparse(Tagger(nn.LSTM, proj_size=4), fxs.SaliencyPruner(),
                              [{"tensor_fqn": "proj.weight"}], example_inputs=(x,))
    inputs = (torch.randn(5, 3, 8), torch.zeros(2, 3, 16), torch.zeros(2, 3, 16))
    with pytest.raises(fxs.SparsityConfigError, match=r"'recurrent' \(LSTM\) is given its initial state"):
        fxs.prepare_fx_sparse(_Encoder(initial_state=True), fxs.SaliencyPruner(),
                              [{"tensor_fqn": "rnn.weight_ih_l0"}], example_inputs=inputs)
    with pytest.raises(fxs.SparsityConfigError, match="'0.weight_ih_l0' cannot be pruned exactly: its channels are "
                                                      "a model output"):  # the final states, returned
        fxs.prepare_fx_sparse(nn.Sequential(nn.LSTM(8, 16, num_layers=2)), fxs.SaliencyPruner(),
                              [{"tensor_fqn": "0.weight_ih_l0"}], example_inputs=(torch.randn(5, 3, 8),))
    with pytest.raises(fxs.SparsityConfigError, match="the 2 layers of 'recurrent' \\(LSTM\\) share one hidden "
                                                      "size, and not every one's units can go"):
        fxs.prepare_fx_sparse(_Outputs(), fxs.SaliencyPruner(), [{"tensor_fqn": "rnn.weight_ih_l0"}],
                              example_inputs=(torch.randn(5, 3, 8),))


class _Outputs(nn.Module):
    """Returns the last layer's outputs: that layer keeps its units, so the first (same hidden_size) must too."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(8, 16, num_layers=2)

    def forward(self, x):
        return self.rnn(x)[0]
