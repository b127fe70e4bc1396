"""Differential fuzzing against torch.ao.pruning (hypothesis, derandomized and bounded).

Each case builds the same model twice -- prepared by ``fx_sparsity.prepare_fx_sparse`` and
by ``torch.ao.pruning`` -- drives both identically and requires the same masks and levels.
Where torch.ao raises or returns a mask of the wrong shape, the case must fall under a
deviation documented in ``mask_math.DEVIATIONS`` / the README, and our result is checked
against what torch.ao's own block- and tensor-level primitives give on the padded weight,
cropped to the weight's shape.

The mask math itself is covered exhaustively on a grid by ``test_mask_math.py``; here the
whole path is fuzzed: config merging, prepare, the live mask buffer, ``step()`` feeding
``weight * mask`` back in, schedulers writing levels, across several steps with changing
weights.
"""
from __future__ import annotations

import copy
import os
import warnings
from collections import Counter

import pytest
import torch
import torch.ao.pruning as ao
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fx_sparsity as fxs

pytestmark = pytest.mark.slow  # the quick loop (-m 'not slow') skips it; CI runs it



def fuzz(max_examples: int):
    """Bounded and reproducible: the same cases on every run, no example database."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


PRIMES = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: an OpenMP region costs more than the op (avg_pool2d on 16x8 took 11 ms instead of
    2 us with 2 threads on a busy 2-core machine), and results do not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dim(block: int):
    """A dimension: 1, a prime, smaller than the block, a multiple of it, or anything up to 40."""
    return st.one_of(
        st.just(1), st.sampled_from(PRIMES), st.integers(1, max(1, block - 1)),
        st.integers(1, 5).map(lambda k: k * block), st.integers(1, 40))


def level():
    return st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0, allow_nan=False))


def make_weight(shape, seed: int, kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":  # small ints: many exact ties and exact zeros
        return torch.randint(-2, 3, shape, generator=g).float()
    return torch.randn(shape, generator=g)


def linear_model(weight: torch.Tensor) -> nn.Module:
    h, w = weight.shape
    model = nn.Sequential(nn.Linear(w, h, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(weight)
    return model


def ao_mask(model: nn.Module) -> torch.Tensor:
    return model[0].parametrizations.weight[0].mask


def ao_reference(masked: torch.Tensor, level_, block, zeros, norm) -> torch.Tensor:
    """torch.ao's tensor- and block-level masks on the padded weight, cropped, OR-ed.

    This is the documented result where torch.ao's own ``update_mask`` fails (it ORs a
    cropped mask with a padded one) or keeps the padded shape.
    """
    h, w = masked.shape
    helper = ao.WeightNormSparsifier(sparse_block_shape=block, zeros_per_block=zeros, norm=norm)
    norms = helper.norm_fn(masked)
    keep = helper._make_tensor_mask(data=norms, input_shape=norms.shape, sparsity_level=level_,
                                    sparse_block_shape=block)[:h, :w].bool()
    if zeros < block[0] * block[1]:
        keep = keep | helper._make_block_mask(data=norms, sparse_block_shape=block,
                                              zeros_per_block=zeros)[:h, :w].bool()
    return keep


def documented_deviation(shape, level_, block, zeros) -> bool:
    """The only WeightNorm cases torch.ao gets wrong (mask_math.DEVIATIONS, first two bullets)."""
    divisible = shape[0] % block[0] == 0 and shape[1] % block[1] == 0
    return not divisible and 0 < zeros < block[0] * block[1] and level_ > 0


# -- WeightNormSparsifier ---------------------------------------------------------------------

@st.composite
def weight_norm_cases(draw):
    bh, bw = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    vpb = bh * bw
    return dict(
        block=(bh, bw),
        shape=(draw(dim(bh)), draw(dim(bw))),
        zeros=draw(st.one_of(st.just(vpb), st.just(0), st.integers(0, vpb))),
        levels=draw(st.lists(level(), min_size=1, max_size=4)),
        norm=draw(st.sampled_from([None, 1, 2])),
        kind=draw(st.sampled_from(["randn", "ties"])),
        seed=draw(st.integers(0, 2**16)),
        retrain=draw(st.booleans()),  # new weight values between steps, as training would give
        config_override=draw(st.booleans()),  # settings given per tensor instead of as defaults
    )


@fuzz(1000)
@given(case=weight_norm_cases())
def _fuzz_weight_norm(counts: Counter, case):
    block, shape, zeros, levels, norm = case["block"], case["shape"], case["zeros"], case["levels"], case["norm"]
    weight = make_weight(shape, case["seed"], case["kind"])
    settings_ = dict(sparsity_level=levels[0], sparse_block_shape=block, zeros_per_block=zeros)
    if case["config_override"]:
        ours, theirs = fxs.WeightNormSparsifier(norm=norm), ao.WeightNormSparsifier(norm=norm)
        config = [{"tensor_fqn": "0.weight", **settings_}]
    else:
        ours, theirs = fxs.WeightNormSparsifier(norm=norm, **settings_), ao.WeightNormSparsifier(norm=norm, **settings_)
        config = [{"tensor_fqn": "0.weight"}]
    prepared = fxs.prepare_fx_sparse(linear_model(weight), ours, copy.deepcopy(config))
    ao_model = linear_model(weight)
    theirs.prepare(ao_model, copy.deepcopy(config))
    in_sync = True  # until torch.ao fails on this case
    counts["cases"] += 1
    for step, level_ in enumerate(levels):
        if step and case["retrain"]:
            new = make_weight(shape, case["seed"] + step, case["kind"])
            with torch.no_grad():
                prepared.get_parameter("0.weight").copy_(new)
                ao_model[0].parametrizations.weight.original.copy_(new)
        before = ours.get_mask("0.weight").clone()
        ours.groups[0]["sparsity_level"] = level_
        theirs.groups[0]["sparsity_level"] = level_
        ours.step()
        mask = ours.get_mask("0.weight")
        assert mask.shape == shape and mask.dtype == torch.float32
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        if in_sync:
            try:
                theirs.step()
                theirs_mask = ao_mask(ao_model)
                in_sync = theirs_mask.shape == shape
            except RuntimeError:
                in_sync = False
            if in_sync:
                assert torch.equal(mask.bool(), theirs_mask.bool()), (case, step)
                counts["steps equal to torch.ao"] += 1
                continue
            assert documented_deviation(shape, level_, block, zeros), (case, step)
            counts["cases where torch.ao fails (documented deviation)"] += 1
        expected = ao_reference(prepared.get_parameter("0.weight") * before, level_, block, zeros, norm)
        assert torch.equal(mask.bool(), expected), (case, step)
        counts["steps checked against torch.ao primitives"] += 1
    x = torch.randn(3, shape[1])
    torch.testing.assert_close(prepared(x), F.linear(x, prepared.get_parameter("0.weight") * mask))


def test_weight_norm_fuzz():
    counts = Counter()
    _fuzz_weight_norm(counts)
    print(f"\nWeightNorm fuzz: {dict(counts)}")
    assert counts["cases"] == 1000
    assert counts["steps equal to torch.ao"] > 1500
    assert counts["cases where torch.ao fails (documented deviation)"] > 100


# -- NearlyDiagonalSparsifier -----------------------------------------------------------------

@st.composite
def nearly_diagonal_cases(draw):
    side = st.one_of(st.just(1), st.sampled_from(PRIMES), st.integers(1, 24))
    h, w = draw(side), draw(side)
    fits = 2 * min(h, w) - 1  # the largest odd nearliness the shape admits
    nearliness = draw(st.one_of(
        st.integers(0, (fits - 1) // 2).map(lambda k: 2 * k + 1),  # odd, fits
        st.integers(1, 25).map(lambda k: 2 * k),  # even
        st.integers(fits + 1, fits + 30),  # too large (odd or even)
        st.integers(-3, 0)))  # all-zero mask
    return h, w, nearliness


@fuzz(600)
@given(case=nearly_diagonal_cases(), via_config=st.booleans(), seed=st.integers(0, 2**16))
def _fuzz_nearly_diagonal(counts: Counter, case, via_config, seed):
    h, w, nearliness = case
    counts["cases"] += 1
    weight = make_weight((h, w), seed, "randn")
    ao_model = linear_model(weight)
    theirs = ao.NearlyDiagonalSparsifier(nearliness=nearliness)
    config = [{"tensor_fqn": "0.weight", "nearliness": nearliness}] if via_config else None
    theirs.prepare(ao_model, copy.deepcopy(config) if config else [{"tensor_fqn": "0.weight"}])
    try:
        theirs.step()
        ao_error = None
    except ValueError as e:
        ao_error = e
    if ao_error is None:
        ours = fxs.NearlyDiagonalSparsifier() if via_config else fxs.NearlyDiagonalSparsifier(nearliness)
        fxs.prepare_fx_sparse(linear_model(weight), ours, config or [{"tensor_fqn": "0.weight"}])
        ours.step()
        assert torch.equal(ours.get_mask("0.weight").bool(), ao_mask(ao_model).bool())
        counts["equal to torch.ao" if nearliness > 0 else "equal to torch.ao (nearliness <= 0: all zero)"] += 1
        return
    # torch.ao raises at its first step(); so do we (ValueError), with the value and the fix.
    reason = "odd" if nearliness % 2 == 0 else "too large"
    assert (nearliness % 2 == 0) == ("odd" in str(ao_error))
    ours = fxs.NearlyDiagonalSparsifier() if via_config else fxs.NearlyDiagonalSparsifier(nearliness)
    fxs.prepare_fx_sparse(linear_model(weight), ours, config or [{"tensor_fqn": "0.weight"}])
    with pytest.raises(ValueError, match=f"nearliness.*{reason}|{reason}.*nearliness") as ours_error:
        ours.step()
    assert str(nearliness) in str(ours_error.value)
    counts[f"both raise at step: {'even' if reason == 'odd' else 'oversize'}"] += 1


def test_nearly_diagonal_fuzz():
    counts = Counter()
    _fuzz_nearly_diagonal(counts)
    print(f"\nNearlyDiagonal fuzz: {dict(counts)}")
    assert counts["cases"] == 600
    assert counts["equal to torch.ao"] > 100
    assert counts["both raise at step: even"] > 100
    assert counts["both raise at step: oversize"] > 20


# -- schedulers driving the sparsifiers -------------------------------------------------------

def _pair_models(levels, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    config = [{"tensor_fqn": "0.weight", "sparsity_level": levels[0]},
              {"tensor_fqn": "2.weight", "sparsity_level": levels[1]}]
    ours, theirs = fxs.WeightNormSparsifier(sparse_block_shape=(1, 4)), ao.WeightNormSparsifier(sparse_block_shape=(1, 4))
    ao_model = copy.deepcopy(model)
    prepared = fxs.prepare_fx_sparse(model, ours, copy.deepcopy(config))
    theirs.prepare(ao_model, copy.deepcopy(config))
    return ours, theirs, prepared, ao_model


def _per_group(strategy):
    """A scalar, or a list / tuple with one value per group (the two scheduler argument forms)."""
    return st.one_of(strategy, st.lists(strategy, min_size=2, max_size=2), st.tuples(strategy, strategy))


def _drive(counts, ours, theirs, make_ours, make_theirs, n_steps, prepared, ao_model):
    """Step both pipelines ``n_steps`` times; same levels, same masks, at every step."""
    try:
        ours_sched = make_ours(ours)
    except ValueError as e:
        # CubicSL with delta_t * total_t == 0 for a group: we refuse it up front; torch.ao
        # divides by zero at the first epoch >= init_t (documented deviation).
        assert "delta_t * total_t must be non-zero" in str(e)
        with pytest.raises(ZeroDivisionError), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # stepping the scheduler alone: only its levels matter here
            theirs_sched = make_theirs(theirs)
            for _ in range(100):
                theirs_sched.step()
        counts["zero ramp: torch.ao ZeroDivisionError, we ValueError"] += 1
        return
    theirs_sched = make_theirs(theirs)
    assert ours_sched.get_last_sl() == theirs_sched.get_last_sl()
    for _ in range(n_steps):
        levels = [g["sparsity_level"] for g in theirs.groups]
        if not all(0 <= sl <= 1 for sl in levels):
            counts["steps with a level out of [0, 1] (acts as 0 or 1 in both)"] += 1
        ours.step()
        theirs.step()
        for group in ours.groups:
            fqn = group["tensor_fqn"]
            module_fqn, _, name = fqn.rpartition(".")
            assert torch.equal(ours.get_mask(fqn).bool(),
                               ao_model.get_submodule(module_fqn).parametrizations[name][0].mask.bool())
        ours_sched.step()
        theirs_sched.step()
        assert ours_sched.get_last_sl() == theirs_sched.get_last_sl()
        assert [g["sparsity_level"] for g in ours.groups] == [g["sparsity_level"] for g in theirs.groups]
        counts["steps with equal levels and masks"] += 1
    assert ours_sched.last_epoch == theirs_sched.last_epoch
    counts["cases equal to torch.ao"] += 1


@fuzz(500)
@given(targets=st.tuples(level(), level()), init_sl=_per_group(st.floats(0, 1)),
       init_t=_per_group(st.integers(-5, 20)), delta_t=_per_group(st.integers(-3, 10)),
       total_t=_per_group(st.integers(0, 40)), initially_zero=_per_group(st.booleans()),
       last_epoch=st.one_of(st.just(-1), st.integers(0, 30)), n_steps=st.integers(0, 25),
       seed=st.integers(0, 100))
def _fuzz_cubic(counts: Counter, targets, init_sl, init_t, delta_t, total_t, initially_zero, last_epoch,
                n_steps, seed):
    counts["cases"] += 1
    kwargs = dict(init_sl=init_sl, init_t=init_t, delta_t=delta_t, total_t=total_t,
                  initially_zero=initially_zero, last_epoch=last_epoch)
    ours, theirs, prepared, ao_model = _pair_models(targets, seed)
    _drive(counts, ours, theirs, lambda sp: fxs.CubicSL(sp, **kwargs), lambda sp: ao.CubicSL(sp, **kwargs),
           n_steps, prepared, ao_model)


def test_cubic_sl_fuzz():
    counts = Counter()
    _fuzz_cubic(counts)
    print(f"\nCubicSL fuzz: {dict(counts)}")
    assert counts["cases"] == 500
    assert counts["cases equal to torch.ao"] > 200
    assert counts["zero ramp: torch.ao ZeroDivisionError, we ValueError"] > 0


def _lambda(kind: str, a: float, b: float):
    if kind == "linear":
        return lambda e: a * e + b
    if kind == "clamped":
        return lambda e: min(1.0, max(0.0, a * e + b))
    if kind == "geometric":
        return lambda e: abs(b) ** e
    return lambda e: float(e // max(1, int(a * 10)) % 2)  # square wave: levels jump back and forth


_LAMBDAS = st.builds(_lambda, st.sampled_from(["linear", "clamped", "geometric", "square"]),
                     st.floats(-0.2, 0.2), st.floats(-0.5, 1.5))


@fuzz(400)
@given(targets=st.tuples(level(), level()), fns=st.one_of(_LAMBDAS, st.lists(_LAMBDAS, min_size=2, max_size=2)),
       last_epoch=st.one_of(st.just(-1), st.integers(0, 30)), n_steps=st.integers(0, 25),
       seed=st.integers(0, 100))
def _fuzz_lambda(counts: Counter, targets, fns, last_epoch, n_steps, seed):
    counts["cases"] += 1
    ours, theirs, prepared, ao_model = _pair_models(targets, seed)
    _drive(counts, ours, theirs, lambda sp: fxs.LambdaSL(sp, fns, last_epoch=last_epoch),
           lambda sp: ao.LambdaSL(sp, fns, last_epoch=last_epoch), n_steps, prepared, ao_model)


def test_lambda_sl_fuzz():
    counts = Counter()
    _fuzz_lambda(counts)
    print(f"\nLambdaSL fuzz: {dict(counts)}")
    assert counts["cases"] == 400
    assert counts["cases equal to torch.ao"] > 300
    assert counts["steps with a level out of [0, 1] (acts as 0 or 1 in both)"] > 20



def test_every_documented_deviation_is_in_the_readme():
    from fx_sparsity.sparsifier.mask_math import DEVIATIONS

    migrating = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "migrating.md")
    with open(migrating, encoding="utf-8") as f:
        text = " ".join(f.read().split())
    for deviation in DEVIATIONS:
        assert " ".join(deviation.split()) in text, deviation
