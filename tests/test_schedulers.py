"""fx_sparsity.scheduler vs torch.ao.pruning.scheduler, run side by side.

Every behavioural test builds the same model/config twice -- once prepared with
an fx_sparsity sparsifier, once with torch.ao.pruning's -- drives both
schedulers identically and requires identical results: float-exact sparsity
level sequences, the same warnings (text, category and reported line), the
same verbose output and the same state_dict keys.
"""

from __future__ import annotations

import copy
import functools
import io
import pickle
import sys
import warnings

import pytest
import torch
import torch.ao.pruning as ao
from torch import nn

import fx_sparsity
from fx_sparsity.scheduler import BaseScheduler, CubicSL, LambdaSL
from fx_sparsity.sparsifier.base_sparsifier import BaseSparsifier

CONFIG = [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight", "sparsity_level": 0.7}]
N_STEPS = 150


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _ours_sparsifier(config=CONFIG) -> BaseSparsifier:
    sparsifier = fx_sparsity.WeightNormSparsifier()
    fx_sparsity.prepare_fx_sparse(_model(), sparsifier, copy.deepcopy(config))
    return sparsifier


def _ao_sparsifier(config=CONFIG):
    sparsifier = ao.WeightNormSparsifier()
    sparsifier.prepare(_model(), copy.deepcopy(config))
    return sparsifier


def _pair(config=CONFIG):
    ours, theirs = _ours_sparsifier(config), _ao_sparsifier(config)
    levels = [g["sparsity_level"] for g in ours.groups]
    assert levels == [g["sparsity_level"] for g in theirs.groups], "prepare disagrees on levels"
    return ours, theirs


class _Ramp:
    """A callable object with state (its state must survive state_dict)."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, epoch: int) -> float:
        return min(1.0, epoch * self.scale)


def _run(scheduler, sparsifier, n=N_STEPS):
    """Step sparsifier then scheduler ``n`` times; all levels seen, in order."""
    seen = [list(scheduler.get_last_sl())]
    for _ in range(n):
        sparsifier.step()
        scheduler.step()
        seen.append(list(scheduler.get_last_sl()))
        assert [g["sparsity_level"] for g in sparsifier.groups] == seen[-1]
    return seen


# --------------------------------------------------------------- sequences

CUBIC_CASES = {
    "defaults": {},
    "scalars": dict(init_sl=0.1, init_t=5, delta_t=2, total_t=20),
    "lists_per_group": dict(
        init_sl=[0.0, 0.2],
        init_t=[0, 10],
        delta_t=[1, 3],
        total_t=[50, 30],
        initially_zero=[False, True],
    ),
    "tuples_per_group": dict(init_sl=(0.05, 0.1), total_t=(7, 40), delta_t=(2, 1)),
    "initially_zero": dict(init_sl=0.05, init_t=30, delta_t=1, total_t=60, initially_zero=True),
    "last_epoch": dict(last_epoch=25, delta_t=1, total_t=90),
    "last_epoch_initially_zero": dict(last_epoch=3, init_t=10, initially_zero=True, delta_t=2, total_t=40),
    "delta_t_1": dict(delta_t=1),
    "total_t_small": dict(delta_t=1, total_t=3),
    "total_t_1": dict(delta_t=1, total_t=1, init_t=4),
    "init_t_beyond_run": dict(init_t=200, init_sl=0.2, initially_zero=[True, False]),
    "init_sl_above_target": dict(init_sl=0.9, delta_t=1, total_t=50),
}


@pytest.mark.parametrize("kwargs", CUBIC_CASES.values(), ids=CUBIC_CASES.keys())
def test_cubic_matches_torch_ao(kwargs):
    ours_sp, ao_sp = _pair()
    ours = _run(CubicSL(ours_sp, **kwargs), ours_sp)
    theirs = _run(ao.CubicSL(ao_sp, **kwargs), ao_sp)
    assert ours == theirs
    constant = kwargs.get("init_sl") == 0.9 or kwargs.get("init_t") == 200
    assert (len(set(map(tuple, ours))) == 1) == constant


LAMBDA_CASES = {
    "linear": dict(sl_lambda=lambda e: e / 150),
    "geometric": dict(sl_lambda=lambda e: 0.95**e),
    "integer_factor": dict(sl_lambda=lambda e: (e // 30) / 5),
    "list_per_group": dict(sl_lambda=[lambda e: min(1.0, e / 30), lambda e: 1 - 0.99**e]),
    "tuple_per_group": dict(sl_lambda=(lambda e: e / 150, lambda e: (e % 10) / 10)),
    "callable_object": dict(sl_lambda=_Ramp(0.013)),
    "last_epoch": dict(sl_lambda=lambda e: e / 200, last_epoch=10),
}


@pytest.mark.parametrize("kwargs", LAMBDA_CASES.values(), ids=LAMBDA_CASES.keys())
def test_lambda_matches_torch_ao(kwargs):
    ours_sp, ao_sp = _pair()
    ours = _run(LambdaSL(ours_sp, **kwargs), ours_sp)
    theirs = _run(ao.LambdaSL(ao_sp, **kwargs), ao_sp)
    assert ours == theirs


def test_cubic_sparsity_compute_fn_matches_torch_ao():
    args = [
        (s_0, s_f, t, t_0, dt, n, zero)
        for s_0 in (0.0, 0.3, 0.95)
        for s_f in (0.5, 0.9)
        for t in (-5, 0, 1, 7, 49, 50, 51, 400)
        for t_0 in (0, 5)
        for dt, n in ((1, 50), (10, 100), (3, 7))
        for zero in (False, True)
    ]
    for a in args:
        assert CubicSL.sparsity_compute_fn(*a) == ao.CubicSL.sparsity_compute_fn(*a), a


def test_user_subclass_matches_torch_ao():
    def make(base):
        class Halving(base):
            def get_sl(self):
                if self.last_epoch > 0:
                    return [g["sparsity_level"] * 0.5 for g in self.sparsifier.groups]
                return list(self.base_sl)

        return Halving

    ours_sp, ao_sp = _pair()
    ours = _run(make(BaseScheduler)(ours_sp), ours_sp, n=5)
    theirs = _run(make(ao.BaseScheduler)(ao_sp), ao_sp, n=5)
    assert ours == theirs


def test_base_scheduler_get_sl_not_implemented():
    ours_sp, ao_sp = _pair()
    with pytest.raises(NotImplementedError):
        ao.BaseScheduler(ao_sp)
    with pytest.raises(NotImplementedError):
        BaseScheduler(ours_sp)


# ----------------------------------------------------------------- warnings

def _warnings_of(scenario, sparsifier, scheduler_cls):
    """(category, text, line) of every warning ``scenario`` reports in this file."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scenario(sparsifier, scheduler_cls)
    return [
        (w.category, str(w.message), w.lineno)
        for w in caught
        if w.filename == __file__
    ]


def _scheduler_first(sp, cls):
    scheduler = cls(sp)
    scheduler.step()
    sp.step()
    scheduler.step()


def _right_order(sp, cls):
    scheduler = cls(sp)
    for _ in range(3):
        sp.step()
        scheduler.step()


def _overridden(sp, cls):
    scheduler = cls(sp)
    sp.step = functools.partial(type(sp).step, sp)
    sp.step()
    scheduler.step()


def _get_sl_called(sp, cls):
    scheduler = cls(sp)
    scheduler.get_sl()
    sp.step()
    scheduler.step()
    scheduler.get_sl()


def _two_schedulers(sp, cls):
    first = cls(sp)
    second = cls(sp)
    sp.step()
    first.step()
    second.step()


def _scheduler_first_later_steps(sp, cls):
    scheduler = cls(sp)
    sp.step()
    scheduler.step()
    scheduler.step()  # only the first scheduler.step() is checked
    scheduler.step()


SCENARIOS = {
    "scheduler_first": _scheduler_first,
    "right_order": _right_order,
    "overridden": _overridden,
    "get_sl_called": _get_sl_called,
    "two_schedulers": _two_schedulers,
    "later_steps": _scheduler_first_later_steps,
}


EXPECTED_WARNINGS = {"scheduler_first": 1, "overridden": 1, "get_sl_called": 2}


@pytest.mark.parametrize("name", SCENARIOS)
@pytest.mark.parametrize("kind", ["cubic", "lambda"])
def test_warnings_match_torch_ao(name, kind):
    scenario = SCENARIOS[name]
    ours_sp, ao_sp = _pair()
    if kind == "cubic":
        ours_cls, ao_cls = CubicSL, ao.CubicSL
    else:
        ours_cls = functools.partial(LambdaSL, sl_lambda=lambda e: e / 10)
        ao_cls = functools.partial(ao.LambdaSL, sl_lambda=lambda e: e / 10)
    ours = _warnings_of(scenario, ours_sp, ours_cls)
    theirs = _warnings_of(scenario, ao_sp, ao_cls)
    assert ours == theirs
    assert len(ours) == EXPECTED_WARNINGS.get(name, 0)


def test_warning_scheduler_before_sparsifier():
    scheduler = CubicSL(_ours_sparsifier())
    with pytest.warns(UserWarning, match=r"Detected call of `scheduler.step\(\)` before `sparsifier.step\(\)`"):
        scheduler.step()


def test_warning_sparsifier_step_overridden():
    sparsifier = _ours_sparsifier()
    scheduler = LambdaSL(sparsifier, lambda e: 1.0)
    sparsifier.step = functools.partial(type(sparsifier).step, sparsifier)
    sparsifier.step()
    with pytest.warns(UserWarning, match=r"Seems like `sparsifier.step\(\)` has been overridden"):
        scheduler.step()


def test_warning_get_sl_outside_step():
    scheduler = CubicSL(_ours_sparsifier())
    with pytest.warns(UserWarning, match=r"please use `get_last_sl\(\)`") as record:
        levels = scheduler.get_sl()
    assert record[0].filename == __file__
    assert levels == scheduler.get_last_sl()


def test_no_warning_in_right_order():
    sparsifier = _ours_sparsifier()
    scheduler = CubicSL(sparsifier)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            sparsifier.step()
            scheduler.step()


# ------------------------------------------------------------ step wrapper

def test_step_wrapped_once_and_counted():
    sparsifier = _ours_sparsifier()
    first = CubicSL(sparsifier)
    wrapped = sparsifier.step
    assert getattr(wrapped, "_with_counter", False)
    second = LambdaSL(sparsifier, lambda e: 1.0)
    assert sparsifier.step is wrapped
    assert sparsifier._step_count == 0
    sparsifier.step()
    sparsifier.step()
    assert sparsifier._step_count == 2
    assert first._step_count == second._step_count == 1


def test_step_wrapper_holds_no_strong_reference():
    sparsifier = _ours_sparsifier()
    CubicSL(sparsifier)  # wrap once, outside the measurement
    before = sys.getrefcount(sparsifier)
    scheduler = CubicSL(sparsifier)
    assert sys.getrefcount(sparsifier) == before + 1  # scheduler.sparsifier only
    del scheduler
    assert sys.getrefcount(sparsifier) == before

    fresh = _ours_sparsifier()
    before = sys.getrefcount(fresh)
    CubicSL(fresh)  # installs the wrapper on `fresh`; the scheduler is dropped
    assert sys.getrefcount(fresh) == before


def test_step_replaced_by_plain_callable_before_scheduler():
    # torch.ao fails here (it expects a bound method); we count it as well.
    sparsifier = _ours_sparsifier()
    calls = []
    sparsifier.step = lambda: calls.append(1)
    scheduler = CubicSL(sparsifier)
    sparsifier.step()
    assert calls == [1] and sparsifier._step_count == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler.step()


def test_step_enables_mask_update():
    sparsifier = _ours_sparsifier()
    scheduler = CubicSL(sparsifier)
    sparsifier.enable_mask_update = False
    sparsifier.step()
    scheduler.step()
    assert sparsifier.enable_mask_update is True


# ------------------------------------------------------------------ verbose

def _verbose_run(sparsifier, cls, capsys, **kwargs):
    scheduler = cls(sparsifier, verbose=True, **kwargs)
    for _ in range(3):
        sparsifier.step()
        scheduler.step()
    scheduler.step(epoch=7)
    scheduler.print_sl(True, 1, 0.25, epoch=12345)
    scheduler.print_sl(False, 1, 0.25)
    return capsys.readouterr().out


@pytest.mark.parametrize("kind", ["cubic", "lambda"])
def test_verbose_output_matches_torch_ao(kind, capsys):
    ours_sp, ao_sp = _pair()
    if kind == "cubic":
        kw = dict(delta_t=1, total_t=5, init_sl=0.1)
        ours = _verbose_run(ours_sp, CubicSL, capsys, **kw)
        theirs = _verbose_run(ao_sp, ao.CubicSL, capsys, **kw)
    else:
        fn = lambda e: e / 3  # noqa: E731
        ours = _verbose_run(ours_sp, LambdaSL, capsys, sl_lambda=fn)
        theirs = _verbose_run(ao_sp, ao.LambdaSL, capsys, sl_lambda=fn)
    assert ours == theirs
    lines = ours.splitlines()
    assert len(lines) == 2 * 5 + 1
    if kind == "lambda":
        assert lines[0] == "Adjusting sparsity level of group 0 to 0.0000e+00."
        assert lines[3] == "Adjusting sparsity level of group 1 to 2.3333e-01."
        assert lines[8] == "Epoch     7: adjusting sparsity level of group 0 to 6.6667e-01."
    assert lines[-1] == "Epoch 12345: adjusting sparsity level of group 1 to 2.5000e-01."


def test_repr():
    scheduler = CubicSL(_ours_sparsifier())
    text = repr(scheduler)
    assert text.startswith("CubicSL (\nSparsifier ")
    assert text.endswith("    base_sl: [0.5, 0.7]\n)")


# --------------------------------------------------------------- state_dict

def _roundtrip_torch_save(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)  # weights_only: the state is plain data


def test_cubic_state_dict_roundtrip():
    kwargs = dict(init_sl=[0.0, 0.1], init_t=3, delta_t=1, total_t=60, initially_zero=[True, False])
    sparsifier_a = _ours_sparsifier()
    a = CubicSL(sparsifier_a, **kwargs)
    _run(a, sparsifier_a, n=20)
    state = a.state_dict()
    assert "sparsifier" not in state
    ao_sp = _ao_sparsifier()
    assert set(state) == set(ao.CubicSL(ao_sp, **kwargs).state_dict())

    loaded = _roundtrip_torch_save(state)
    sparsifier_b = _ours_sparsifier()
    b = CubicSL(sparsifier_b, **kwargs)
    b.load_state_dict(loaded)
    assert b.last_epoch == a.last_epoch == 20
    assert b.get_last_sl() == a.get_last_sl()
    assert _run(b, sparsifier_b, n=60)[1:] == _run(a, sparsifier_a, n=60)[1:]
    assert b.sparsifier is sparsifier_b


def test_state_dict_is_a_copy():
    sparsifier = _ours_sparsifier()
    scheduler = CubicSL(sparsifier, delta_t=1, total_t=10)
    state = scheduler.state_dict()
    snapshot = copy.deepcopy(state)
    sparsifier.step()
    scheduler.step()
    scheduler.base_sl.append(1.0)
    assert state == snapshot


def test_lambda_state_dict_roundtrip_with_lambdas():
    fns = [lambda e: min(1.0, e / 40), lambda e: 0.97**e]
    sparsifier_a = _ours_sparsifier()
    a = LambdaSL(sparsifier_a, fns)
    _run(a, sparsifier_a, n=15)
    state = a.state_dict()
    assert state["sl_lambdas"] == [None, None]
    loaded = pickle.loads(pickle.dumps(state))
    loaded = _roundtrip_torch_save(loaded)

    sparsifier_b = _ours_sparsifier()
    b = LambdaSL(sparsifier_b, fns)
    b.load_state_dict(loaded)
    assert b.sl_lambdas == fns
    assert _run(b, sparsifier_b, n=40)[1:] == _run(a, sparsifier_a, n=40)[1:]


def test_lambda_state_dict_restores_callable_object_state():
    sparsifier_a = _ours_sparsifier()
    a = LambdaSL(sparsifier_a, [_Ramp(0.01), lambda e: 1.0])
    a.sl_lambdas[0].scale = 0.05  # changed during training
    _run(a, sparsifier_a, n=5)
    state = pickle.loads(pickle.dumps(a.state_dict()))
    assert state["sl_lambdas"] == [{"scale": 0.05}, None]

    sparsifier_b = _ours_sparsifier()
    b = LambdaSL(sparsifier_b, [_Ramp(0.01), lambda e: 1.0])
    b.load_state_dict(state)
    assert b.sl_lambdas[0].scale == 0.05
    assert _run(b, sparsifier_b, n=30)[1:] == _run(a, sparsifier_a, n=30)[1:]


def test_lambda_state_dict_wrong_length():
    a = LambdaSL(_ours_sparsifier(), lambda e: 1.0)
    state = a.state_dict()
    state["sl_lambdas"] = [None]
    with pytest.raises(ValueError, match="1 sl_lambdas entries"):
        LambdaSL(_ours_sparsifier(), lambda e: 1.0).load_state_dict(state)


# ------------------------------------------------------------------- errors

@pytest.mark.parametrize(
    "make",
    [
        lambda sp: BaseScheduler(sp),
        lambda sp: CubicSL(sp),
        lambda sp: CubicSL(sp, init_sl=[0.1, 0.2, 0.3]),
        lambda sp: LambdaSL(sp, lambda e: 1.0),
        lambda sp: LambdaSL(sp, [lambda e: 1.0]),
    ],
    ids=["base", "cubic", "cubic_list", "lambda", "lambda_list"],
)
def test_torch_ao_sparsifier_rejected(make):
    with pytest.raises(TypeError, match=r"WeightNormSparsifier is not an instance of fx_sparsity\.BaseSparsifier.*torch\.ao"):
        make(_ao_sparsifier())
    with pytest.raises(TypeError, match=r"object is not an instance of fx_sparsity\.BaseSparsifier"):
        make(object())


def test_unprepared_sparsifier_rejected():
    for make in (CubicSL, lambda sp: CubicSL(sp, init_sl=[0.1]), lambda sp: LambdaSL(sp, lambda e: 1.0)):
        with pytest.raises(ValueError, match=r"sparsifier is not prepared: call prepare_fx_sparse / sparsifier\.prepare first"):
            make(fx_sparsity.WeightNormSparsifier())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(init_sl=[0.1]),
        dict(init_t=[1, 2, 3]),
        dict(delta_t=(1,)),
        dict(total_t=[]),
        dict(initially_zero=[True, False, True]),
    ],
)
def test_cubic_length_mismatch_same_message(kwargs):
    ours_sp, ao_sp = _pair()
    with pytest.raises(ValueError) as theirs:
        ao.CubicSL(ao_sp, **kwargs)
    with pytest.raises(ValueError) as ours:
        CubicSL(ours_sp, **kwargs)
    assert str(ours.value) == str(theirs.value)
    assert str(ours.value).startswith("Expected variable of length 2, but got ")


@pytest.mark.parametrize("n", [1, 3])
def test_lambda_length_mismatch_same_message(n):
    ours_sp, ao_sp = _pair()
    fns = [lambda e: 1.0] * n
    with pytest.raises(ValueError) as theirs:
        ao.LambdaSL(ao_sp, fns)
    with pytest.raises(ValueError) as ours:
        LambdaSL(ours_sp, fns)
    assert str(ours.value) == str(theirs.value) == f"Expected 2 lr_lambdas, but got {n}"


def test_cubic_zero_ramp_length_rejected():
    # torch.ao divides by zero in the constructor's first step.
    with pytest.raises(ZeroDivisionError):
        ao.CubicSL(_ao_sparsifier(), total_t=0)
    with pytest.raises(ValueError, match=r"delta_t \* total_t must be non-zero"):
        CubicSL(_ours_sparsifier(), total_t=0)
