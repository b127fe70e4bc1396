"""Scopes as objects: ModelScope(), LayersScope(), BlockScope(*types) mean what the shorthands mean."""
import pytest
import torch
from models import BasicBlock, ViTEncoderBlock, mlp, resnet_like, tied
from torch import nn

import fx_sparsity as fxs
from fx_sparsity.scopes import as_scope

torch.manual_seed(0)


@pytest.mark.parametrize("shorthand,obj", [("model", fxs.ModelScope()), ("layers", fxs.LayersScope()),
                                           (BasicBlock, fxs.BlockScope(BasicBlock)),
                                           ((BasicBlock, nn.Linear), fxs.BlockScope(BasicBlock, nn.Linear))],
                         ids=["model", "layers", "block", "blocks"])
def test_each_object_is_what_its_shorthand_decodes_to(shorthand, obj):
    assert as_scope(shorthand) == obj and as_scope(obj) is obj
    assert fxs.BlockScope((BasicBlock, nn.Linear)) == fxs.BlockScope(BasicBlock, nn.Linear)


def _run(model_fn, make, scope, x, config=None, train_steps=2):
    sparsifier = make()
    prepared = fxs.prepare_fx_sparse(model_fn(), sparsifier, config, scope=scope)
    opt = torch.optim.SGD(prepared.parameters(), lr=0.05)
    for _ in range(train_steps):
        loss = prepared(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsifier.step()
    masks = {k: v.clone() for k, v in prepared.state_dict().items() if k.endswith("_mask")}
    kind = "graph" if isinstance(prepared, torch.fx.GraphModule) else type(prepared)
    return masks, prepared(x).detach(), sparsifier.squash_mask()(x).detach(), kind


CASES = {
    "mlp": (mlp, lambda: torch.randn(4, 16), None),
    "cnn-blocks": (resnet_like, lambda: torch.randn(2, 3, 16, 16), BasicBlock),
    "tied": (tied, lambda: torch.randint(0, 32, (2, 5)), None),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["model", "layers", "block"])
def test_same_masks_and_outputs_as_the_shorthand(case, kind):
    model_fn, x_fn, block = CASES[case]
    if kind == "block" and block is None:
        pytest.skip("no block type in this model")
    shorthand = {"model": "model", "layers": "layers", "block": block}[kind]
    obj = {"model": fxs.ModelScope, "layers": fxs.LayersScope, "block": lambda: fxs.BlockScope(block)}[kind]()
    x = x_fn()
    config = [{"tensor_fqn": n} for n, p in model_fn().named_parameters() if p.dim() > 1]
    make = (lambda: fxs.GlobalMagnitudeSparsifier(0.5)) if case == "cnn-blocks" else (
        lambda: fxs.WeightNormSparsifier(0.5))
    expected = _run(model_fn, make, shorthand, x, config)
    got = _run(model_fn, make, obj, x, config)
    assert expected[0].keys() == got[0].keys() and expected[0]
    for key in expected[0]:
        assert torch.equal(expected[0][key], got[0][key]), key
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)
    torch.testing.assert_close(got[2], expected[2], rtol=0, atol=0)
    assert got[3] == expected[3]


def test_structured_pruning_takes_a_block_scope_object():
    from models import SmallViT

    model, x = SmallViT().eval(), torch.randn(2, 3, 16, 16)
    results = []
    for scope in (ViTEncoderBlock, fxs.BlockScope(ViTEncoderBlock)):
        pruner = fxs.SaliencyPruner(0.5)
        masked = fxs.prepare_fx_sparse(model, pruner, scope=scope, example_inputs=(x,))
        pruner.step()
        results.append(({g["tensor_fqn"]: pruner.get_mask(g["tensor_fqn"]).clone() for g in pruner.groups},
                        pruner.prune()(x), masked(x)))
    (masks_a, pruned_a, masked_a), (masks_b, pruned_b, masked_b) = results
    assert masks_a.keys() == masks_b.keys() and masks_a
    assert all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)
    torch.testing.assert_close(pruned_b, pruned_a, rtol=0, atol=0)
    torch.testing.assert_close(pruned_b, masked_b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_one_shot_takes_a_block_scope_object():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x):
            return x + self.down(torch.relu(self.up(x)))

    model = nn.Sequential(Block(), Block())
    batches = [(torch.randn(8, 16),) for _ in range(2)]
    a = fxs.one_shot(model, fxs.WandaSparsifier(0.5), batches, scope=Block, progress=False)
    b = fxs.one_shot(model, fxs.WandaSparsifier(0.5), batches, scope=fxs.BlockScope(Block), progress=False)
    for key, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[key], value), key
    with pytest.raises(fxs.SparsityConfigError, match="pass scope=<block class>"):
        fxs.one_shot(model, fxs.WandaSparsifier(0.5), batches, scope=fxs.LayersScope())


def test_a_scope_object_of_a_new_kind_chooses_its_own_units():
    """A Scope subclass that traces only the first layer: the extension point works without touching the pipeline."""
    class FirstLayerOnly(fxs.Scope):
        block_types = ()

        def units(self, model, owners):
            return owners[:1]

    prepared = fxs.prepare_fx_sparse(mlp(), fxs.WeightNormSparsifier(0.5), [{"tensor_fqn": "0.weight"}],
                                     scope=FirstLayerOnly())
    assert isinstance(prepared[0], torch.fx.GraphModule) and not isinstance(prepared[2], torch.fx.GraphModule)
