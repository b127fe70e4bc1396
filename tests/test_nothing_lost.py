"""Nothing lost: the input model, copies, saves, dtype moves, and checkpoints across processes.

``test_prepare.py`` checks parameter values and module types of the input after a
successful prepare; here the fingerprint is complete (tensor identity and version
counters, grads, hooks, flags, parametrizations, graph code) and also taken after a
failure half-way through, in place or not.
"""
from __future__ import annotations

import copy
import io
import os
import pickle
import subprocess
import sys

import _checkpoint_worker as worker
import pytest
import torch
import torch.ao.pruning as ao
import torch.nn.functional as F
from models import cnn, encoder_layer, mlp, tied
from torch import fx, nn

import fx_sparsity as fxs
from fx_sparsity import passes, tracing
from fx_sparsity.passes import find_masked_uses

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: with 2 threads on a busy machine an OpenMP region costs milliseconds (see test_fuzz)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tensor_print(t: torch.Tensor | None):
    if t is None:
        return None
    return (id(t), t._version, t.dtype, tuple(t.shape), t.requires_grad, t.detach().contiguous().numpy().tobytes())


def fingerprint(model: nn.Module) -> dict:
    """Everything prepare could touch, as plain comparable values (tensors by identity, version and bytes)."""
    out = {}
    for name, m in model.named_modules(remove_duplicate=False):
        out[name] = {
            "module": (id(m), type(m), m.training),
            "attrs": sorted(m.__dict__),
            "params": {k: (tensor_print(p), tensor_print(p.grad) if p is not None else None)
                       for k, p in m._parameters.items()},
            "buffers": {k: tensor_print(b) for k, b in m._buffers.items()},
            "non_persistent": sorted(m._non_persistent_buffers_set),
            "children": {k: id(c) for k, c in m._modules.items()},
            "hooks": {k: [(i, id(fn)) for i, fn in (v.items() if isinstance(v, dict) else enumerate(v))]
                      for k, v in m.__dict__.items() if "hooks" in k},
            "code": m.code if isinstance(m, fx.GraphModule) else None,
        }
    return out


def _hooked_mlp():
    """An MLP in an odd state: hooks of every kind, grads, a frozen tensor, a submodule in eval mode."""
    model = mlp()
    model[0].register_forward_hook(lambda m, i, o: None)
    model[0].register_forward_pre_hook(lambda m, i: None)
    model[2].register_full_backward_hook(lambda m, gi, go: None)
    model.register_state_dict_post_hook(lambda m, sd, prefix, local: None)
    model(torch.randn(3, 16)).sum().backward()
    model[4].bias.requires_grad_(False)
    model[2].eval()
    model.register_buffer("step_count", torch.tensor(7), persistent=False)
    return model


def _ao_prepared_mlp():
    model = mlp()
    sparsifier = ao.WeightNormSparsifier(sparsity_level=0.5)
    sparsifier.prepare(model, None)
    sparsifier.step()
    return model


X_MLP = torch.randn(4, 16)
INPUTS = {
    "hooked_mlp": (_hooked_mlp, {}, X_MLP),
    "cnn": (cnn, {"config": [{"tensor_fqn": "conv2.weight"}, {"tensor_fqn": "fc.weight"}]}, torch.randn(2, 3, 8, 8)),
    "tied": (tied, {"config": [{"tensor_fqn": "out.weight"}]}, torch.randint(0, 40, (2, 5))),
    "torch_ao_prepared": (_ao_prepared_mlp, {}, X_MLP),
    "graph_module": (lambda: fx.symbolic_trace(mlp()), {}, X_MLP),
    "encoder_export": (encoder_layer, {"tracer": "export"}, torch.randn(2, 5, 32)),
}


class MagnitudeAnyShape(fxs.BaseSparsifier):
    """Works on conv weights too (WeightNorm needs 2-D)."""

    def __init__(self):
        super().__init__({"sparsity_level": 0.5})

    def update_mask(self, module, tensor_name, mask, sparsity_level, **kwargs):
        scores = (getattr(module, tensor_name) * mask).abs().flatten()
        keep = torch.ones_like(scores)
        keep[scores.argsort()[: int(sparsity_level * scores.numel())]] = 0
        mask.copy_(keep.view_as(mask))


def _prepare(name, model, sparsifier=None, inplace=False):
    _, kwargs, x = INPUTS[name]
    kwargs = dict(kwargs)
    if kwargs.get("tracer") == "export":
        kwargs["example_inputs"] = (x,)
    sparsifier = sparsifier or MagnitudeAnyShape()
    return fxs.prepare_fx_sparse(model, sparsifier, kwargs.pop("config", None), inplace=inplace, **kwargs), sparsifier


# -- the input model ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(INPUTS))
def test_input_bit_identical_after_prepare_and_training(name):
    make, _, x = INPUTS[name]
    model = make()
    before = fingerprint(model)
    y = model(x)
    prepared, sparsifier = _prepare(name, model)
    assert fingerprint(model) == before
    # Training and squashing the prepared model must not reach back into the input.
    opt = torch.optim.SGD([p for p in prepared.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        out = prepared(x)
        opt.zero_grad()
        out.float().square().mean().backward()
        opt.step()
        sparsifier.step()
    sparsifier.squash_mask()
    assert fingerprint(model) == before
    assert torch.equal(model(x), y)


_INSERT_MASKS = passes.InsertMasks.call


def _fail_after_first_spec(self, gm):
    """InsertMasks that masks the first tensor, then fails: a really half-modified graph and module."""
    _INSERT_MASKS(passes.InsertMasks(self.specs[:1]), gm)
    raise RuntimeError("injected failure in InsertMasks")


def _fail_inlining(self, gm):
    raise RuntimeError("injected failure in InlineModules")


class RefusingSparsifier(MagnitudeAnyShape):
    fail = True

    def validate_group(self, group, tensor):
        if self.fail and group["tensor_fqn"] not in ("0.weight", "conv2.weight"):
            raise ValueError(f"injected: refusing {group['tensor_fqn']}")


class FailingHookSparsifier(MagnitudeAnyShape):
    fail = True

    def on_prepared(self, gm):
        if self.fail:
            raise RuntimeError("injected failure after the masks are in")


FAILURES = {
    "inline_modules": ("InlineModules", _fail_inlining),
    "insert_masks_half_way": ("InsertMasks", _fail_after_first_spec),
    "validate_group": (None, RefusingSparsifier),
    "on_prepared": (None, FailingHookSparsifier),
}


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.parametrize("name", ["hooked_mlp", "torch_ao_prepared", "graph_module", "cnn"])
def test_failure_half_way_leaves_input_and_sparsifier_untouched(name, failure, inplace, monkeypatch):
    make, _, x = INPUTS[name]
    model = make()
    before = fingerprint(model)
    y = model(x)
    pass_name, injected = FAILURES[failure]
    if pass_name is not None:
        monkeypatch.setattr(getattr(passes, pass_name), "call", injected)
        if pass_name == "InlineModules":  # the tracer inlines first; make it leave the work to the pass
            monkeypatch.setattr(tracing._SeeInside, "trace", _fail_inlining)
        sparsifier = MagnitudeAnyShape()
    else:
        sparsifier = injected()
    with pytest.raises((RuntimeError, ValueError), match="injected"):
        _prepare(name, model, sparsifier, inplace=inplace)
    assert fingerprint(model) == before
    assert torch.equal(model(x), y)
    assert not any(n.endswith("_mask") for n, _ in model.named_buffers())
    # The sparsifier is not left half-prepared: it can be used again.
    assert sparsifier.groups == [] and sparsifier.model is None and not sparsifier.state
    monkeypatch.undo()
    sparsifier.fail = False
    prepared, _ = _prepare(name, model, sparsifier, inplace=inplace)
    sparsifier.step()
    assert (prepared is model) == (inplace and name == "graph_module")
    assert len(find_masked_uses(prepared)) == len(sparsifier.groups)


def test_untraceable_model_in_place_keeps_torch_ao_masks():
    """The realistic failure: tracing fails after the torch.ao parametrizations were taken off."""
    layer = encoder_layer()
    ao_sparsifier = ao.WeightNormSparsifier(sparsity_level=0.5)
    ao_sparsifier.prepare(layer, [{"tensor_fqn": "linear1.weight"}])
    ao_sparsifier.step()
    before = fingerprint(layer)
    with pytest.raises(fxs.TraceError):
        fxs.prepare_fx_sparse(layer, fxs.WeightNormSparsifier(), inplace=True)
    assert fingerprint(layer) == before
    assert torch.nn.utils.parametrize.is_parametrized(layer.linear1, "weight")
    ao_sparsifier.step()  # torch.ao's own sparsifier still works on it


# -- copies and saves --------------------------------------------------------------------------

def _trained(name="tied", steps=3):
    make, _, x = INPUTS[name]
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
    config = ([{"tensor_fqn": "embed.weight"}, {"tensor_fqn": "hidden.weight", "mask_dtype": torch.bool}]
              if name == "tied" else None)
    prepared = fxs.prepare_fx_sparse(make(), sparsifier, config)
    scheduler = fxs.CubicSL(sparsifier, delta_t=1, total_t=5)
    opt = torch.optim.SGD(prepared.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        prepared(x).square().mean().backward()
        opt.step()
        sparsifier.step()
        scheduler.step()
    return prepared, sparsifier, x


def _state_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _save_load(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)


COPIES = {"deepcopy": copy.deepcopy, "pickle": lambda o: pickle.loads(pickle.dumps(o)), "torch.save": _save_load}


@pytest.mark.parametrize("how", list(COPIES))
def test_prepared_module_round_trips_exactly(how):
    prepared, sparsifier, x = _trained()
    clone = COPIES[how](prepared)
    if how == "deepcopy":
        assert clone.code == prepared.code
    # Pickling a GraphModule re-traces its generated code (torch.fx): the text may change (keyword
    # arguments, one get_attr per tied tensor) and node.meta is gone, but every use stays masked.
    _state_equal(clone.state_dict(), prepared.state_dict())
    assert dict(clone.named_buffers()).keys() == dict(prepared.named_buffers()).keys()
    assert clone.get_parameter("out.weight") is clone.get_parameter("embed.weight")  # tie kept
    assert [(u.tensor_fqn, u.mask_fqn) for u in find_masked_uses(clone)] == \
        [(u.tensor_fqn, u.mask_fqn) for u in find_masked_uses(prepared)]
    assert torch.equal(clone(x), prepared(x))
    # The printed config follows the copy, not the original.
    config = clone.fx_sparsity_config
    assert config["hidden.weight"]["module"] is clone.get_submodule("hidden")


@pytest.mark.parametrize("how", list(COPIES))
def test_sparsifier_with_its_model_round_trips_and_continues_identically(how):
    prepared, sparsifier, x = _trained()
    clone = COPIES[how](sparsifier)
    assert clone.model is not prepared and clone.groups[0]["module"] is clone.model.get_submodule("embed")
    assert [{k: v for k, v in g.items() if k != "module"} for g in clone.groups] == \
        [{k: v for k, v in g.items() if k != "module"} for g in sparsifier.groups]
    for run in (sparsifier, clone):
        opt = torch.optim.SGD(run.model.parameters(), lr=0.1)
        for level in (0.6, 0.7):
            opt.zero_grad()
            run.model(x).square().mean().backward()
            opt.step()
            for group in run.groups:
                group["sparsity_level"] = level
            run.step()
    _state_equal(clone.model.state_dict(), sparsifier.model.state_dict())


def test_sparsifier_and_scheduler_state_dicts_load_with_weights_only():
    """A checkpoint of state dicts needs no pickled code: torch.load's default (weights_only=True) reads it."""
    prepared, sparsifier, x = _trained("hooked_mlp")
    scheduler = fxs.CubicSL(sparsifier, total_t=4)
    buffer = io.BytesIO()
    torch.save({"sparsifier": sparsifier.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()))
    assert loaded["sparsifier"]["groups"] == sparsifier.state_dict()["groups"]
    for fqn, state in sparsifier.state_dict()["state"].items():
        assert torch.equal(loaded["sparsifier"]["state"][fqn]["mask"], state["mask"])
    assert loaded["scheduler"] == scheduler.state_dict()


@pytest.mark.slow
def test_deepcopy_after_squash_and_of_export_prepared():
    """pytorch #37322: deepcopy failed after pruning. Also the export-traced module (whose
    pickling torch.export's unlifted module does not support; see the README)."""
    prepared, sparsifier, x = _trained("hooked_mlp")
    sparsifier.squash_mask()
    clone = copy.deepcopy(prepared)
    assert clone.code == prepared.code and torch.equal(clone(x), prepared(x))
    _state_equal(clone.state_dict(), prepared.state_dict())

    layer_x = torch.randn(2, 5, 32)
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
    prepared = fxs.prepare_fx_sparse(encoder_layer(), sparsifier, tracer="export", example_inputs=(layer_x,))
    sparsifier.step()
    clone_sparsifier = copy.deepcopy(sparsifier)
    clone = clone_sparsifier.model
    _state_equal(clone.state_dict(), prepared.state_dict())
    assert torch.equal(clone(layer_x), prepared(layer_x))
    with torch.no_grad():
        for group in sparsifier.groups:
            prepared.get_parameter(group["tensor_fqn"]).mul_(-1.5)
            clone.get_parameter(group["tensor_fqn"]).mul_(-1.5)
    sparsifier.step()
    clone_sparsifier.step()
    _state_equal(clone.state_dict(), prepared.state_dict())


# -- dtype and device moves --------------------------------------------------------------------

@pytest.mark.parametrize("to", [torch.float16, torch.bfloat16, torch.float64, "half", "double"])
def test_dtype_moves_keep_masks_consistent(to):
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
    prepared = fxs.prepare_fx_sparse(mlp(), sparsifier, [{"tensor_fqn": "0.weight", "mask_dtype": torch.bool},
                                                         {"tensor_fqn": "2.weight"}])
    sparsifier.step()
    masks = {fqn: sparsifier.get_mask(fqn).clone() for fqn in ("0.weight", "2.weight")}
    moved = getattr(prepared, to)() if isinstance(to, str) else prepared.to(to)
    dtype = moved.get_parameter("0.weight").dtype
    assert moved is prepared
    assert moved.get_buffer("0.weight_mask").dtype == torch.bool  # bool masks stay bool
    assert moved.get_buffer("2.weight_mask").dtype == dtype  # float masks follow the weights
    for fqn, mask in masks.items():
        live = sparsifier.get_mask(fqn)
        assert live is moved.get_buffer(fqn + "_mask")
        assert torch.equal(live.float(), mask.float())  # 0/1 survive any float dtype exactly
        assert sparsifier.state_dict()["state"][fqn]["mask"] is live
    x = torch.randn(3, 16, dtype=dtype)
    reference = x
    for i in (0, 2, 4):
        weight = moved.get_parameter(f"{i}.weight")
        if i < 4:
            weight = weight * moved.get_buffer(f"{i}.weight_mask")
        reference = F.linear(reference, weight, moved.get_parameter(f"{i}.bias"))
        reference = torch.relu(reference) if i < 4 else reference
    assert torch.equal(moved(x), reference)
    # Steps keep working on the moved buffers, in their dtypes.
    for group in sparsifier.groups:
        group["sparsity_level"] = 0.75
    sparsifier.step()
    assert moved.get_buffer("0.weight_mask").dtype == torch.bool
    assert moved.get_buffer("0.weight_mask").float().mean().item() == 0.25
    assert moved.get_buffer("2.weight_mask").dtype == dtype
    assert moved.get_buffer("2.weight_mask").float().mean().item() == 0.25
    # And back to float32: the 0/1 values come back unchanged, bool stays bool.
    masks = {fqn: sparsifier.get_mask(fqn).clone() for fqn in ("0.weight", "2.weight")}
    moved.float()
    assert moved.get_buffer("0.weight_mask").dtype == torch.bool
    assert moved.get_buffer("2.weight_mask").dtype == torch.float32
    for fqn, mask in masks.items():
        assert torch.equal(sparsifier.get_mask(fqn).float(), mask.float())


def test_to_device_and_meta():
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5)
    prepared = fxs.prepare_fx_sparse(mlp(), sparsifier, [{"tensor_fqn": "0.weight", "mask_dtype": torch.bool}])
    sparsifier.step()
    mask = sparsifier.get_mask("0.weight")
    assert prepared.to("cpu") is prepared and sparsifier.get_mask("0.weight") is mask
    meta = copy.deepcopy(prepared).to("meta")
    assert meta.get_buffer("0.weight_mask").device.type == "meta"
    assert meta.get_buffer("0.weight_mask").dtype == torch.bool
    assert meta(torch.randn(2, 16, device="meta")).shape == (2, 10)


# -- checkpoint, fresh process, continue -------------------------------------------------------

def _assert_same_state(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            _assert_same_state(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.slow
def test_checkpoint_restored_in_fresh_process_continues_bit_identically(tmp_path):
    assert torch.get_num_threads() == 1  # as in the worker: the same kernels, the same float rounding
    torch.manual_seed(7)
    uninterrupted = worker.build(seed=0)
    worker.train(uninterrupted, 0, 10)
    expected = worker.checkpoint(uninterrupted)

    torch.manual_seed(7)
    first_half = worker.build(seed=0)
    worker.train(first_half, 0, 4)
    torch.save(worker.checkpoint(first_half), tmp_path / "ckpt.pt")
    subprocess.run([sys.executable, os.path.join(TESTS, "_checkpoint_worker.py"), str(tmp_path / "ckpt.pt"),
                    str(tmp_path / "final.pt"), "6"], check=True, timeout=120)
    resumed = torch.load(tmp_path / "final.pt")
    _assert_same_state(resumed, expected)
    # The run did prune: levels moved along the schedule and masks are not all ones.
    assert expected["scheduler"]["last_epoch"] == 10
    assert [g["sparsity_level"] for g in expected["sparsifier"]["groups"]] == [0.8, 0.6]
    assert expected["model"]["3.weight_mask"].dtype == torch.bool
    assert expected["model"]["0.weight_mask"].mean().item() == 26 / 128  # round(0.8 * 128) blocks of (1, 4) zeroed
