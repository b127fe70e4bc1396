"""Lowering targets: one registry for mapping names, mapping dicts and ``mapping="auto"``.

A :class:`LoweringTarget` is one way to turn a sparse Linear into a module. Most targets
are a ``build`` function, called once per sparse weight with the masked weight; a few
built-ins (``dynamic``, ``static``, ``semi_structured``, ``auto``) also need the whole
graph (checks before anything changes, calibration, passes afterwards) and carry a
:class:`~fx_sparsity.lowering.strategies.LoweringStrategy` factory instead, or as well.

- ``convert_fx_sparse(gm, name)`` lowers with the target registered under ``name``;
- ``convert_fx_sparse(gm, {nn.Linear: cls})`` with the target that declares
  ``produces=cls`` (torch.ao's sparse-quantized classes and the 2:4 Linear: their
  subclasses too); any other ``cls`` with ``from_masked`` / torch.ao's ``from_dense`` is
  built through that classmethod, as before the registry;
- ``"auto"`` times every target registered with ``auto=True`` whose ``applies`` accepts
  the layer.

Built-in targets are registered here the same way as the user's
(:func:`register_lowering_target`, in ``builtin_targets.py``). Replacing one needs
``replace=True``; ``dense`` (auto's reference) and ``auto`` cannot be replaced.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import SparsityConfigError
from ..passes import SparseLinear
from .strategies import FromDense, FromMasked, LoweringOptions, LoweringStrategy

__all__ = ["LoweringTarget", "TargetStrategy", "register_lowering_target", "unregister_lowering_target",
           "lowering_targets", "register_lowering", "STRATEGIES", "strategy_for", "target_for_class"]

#: ``build(weight, bias, *, mask, sparse_block_shape, example=None) -> nn.Module``
BuildFn = Callable[..., nn.Module]
#: ``applies(weight, mask, *, sparse_block_shape, device) -> True | False | "reason"``
AppliesFn = Callable[..., Any]
StrategyFactory = Callable[[LoweringOptions], LoweringStrategy]

# Names no registration may take over: auto times and checks every candidate against "dense".
_FIXED = {"dense": "it is auto's reference (every candidate is timed and checked against it)",
          "auto": "it is the per-layer chooser itself"}


@dataclass(frozen=True)
class LoweringTarget:
    """One registry entry. ``build`` and/or ``strategy_factory``; see :func:`register_lowering_target`.

    The fields after ``builtin`` are for the built-in targets: ``match_subclasses`` (a
    mapping naming a subclass of ``produces`` finds this target), ``listed`` (named in
    the unknown-mapping message; auto's own candidates are not), ``error_floor`` (the
    relative error the kernel cannot get under: auto skips it when ``max_rel_error`` is
    lower, saying ``floor_reason``).
    """

    name: str
    build: BuildFn | None = None
    applies: AppliesFn | None = None
    auto: bool = True
    produces: type[nn.Module] | None = None
    strategy_factory: StrategyFactory | None = None
    builtin: bool = False
    match_subclasses: bool = False
    listed: bool = True
    error_floor: float = 0.0
    floor_reason: str = ""

    def strategy(self, options: LoweringOptions) -> LoweringStrategy:
        """The strategy ``convert_fx_sparse`` runs when this target is named or mapped."""
        if self.strategy_factory is not None:
            return self.strategy_factory(options)
        return TargetStrategy(options, self)

    def verdict(self, weight: torch.Tensor, mask: torch.Tensor, *, sparse_block_shape: tuple[int, int] | None,
                max_rel_error: float) -> bool | str:
        """Whether auto times this target on a layer: True, False (not a candidate, no record) or the reason."""
        if self.applies is not None:
            answer = self.applies(weight, mask, sparse_block_shape=sparse_block_shape, device=weight.device)
            if isinstance(answer, str):
                return answer or "does not apply"
            if not isinstance(answer, bool):
                raise TypeError(f"lowering target {self.name!r}: applies(...) returned {answer!r}; it must return "
                                f"True, False or a string saying why the target does not apply")
            if not answer:
                return False
        if max_rel_error < self.error_floor:
            return (f"max_rel_error={max_rel_error:g} is below what {self.floor_reason or self.name} "
                    f"reach (~{self.error_floor:g})")
        return True

    def make(self, weight: torch.Tensor, bias: torch.Tensor | None, *, mask: torch.Tensor,
             sparse_block_shape: tuple[int, int] | None, example: torch.Tensor | None = None) -> nn.Module:
        """``build`` called with the masked weight; what it returns must be an ``nn.Module``."""
        if self.build is None:
            raise SparsityConfigError(f"lowering target {self.name!r} has no build function (it lowers whole "
                                      f"graphs only: convert_fx_sparse(gm, {self.name!r}))")
        module = self.build(weight, bias, mask=mask, sparse_block_shape=sparse_block_shape, example=example)
        if not isinstance(module, nn.Module):
            raise TypeError(f"lowering target {self.name!r}: build(...) returned {type(module).__name__}, "
                            f"not an nn.Module")
        return module


class TargetStrategy(LoweringStrategy):
    """Lowering by a target's ``build``: one module per sparse weight, from weight·mask."""

    def __init__(self, options: LoweringOptions, target: LoweringTarget):
        super().__init__(options)
        self.target = target
        self.name = target.name

    def make(self, site: SparseLinear, weight: torch.Tensor, mask: torch.Tensor,
             bias: torch.Tensor | None) -> nn.Module:
        masked = weight * mask.to(weight.dtype)
        return self.target.make(masked, bias, mask=mask, sparse_block_shape=site.block_shape)


# -- the registry ----------------------------------------------------------------------------

_BUILTIN: dict[str, LoweringTarget] = {}
_USER: dict[str, LoweringTarget] = {}  # registered by the user; a built-in's name here replaces it


def lowering_targets() -> dict[str, LoweringTarget]:
    """The targets in effect, by name: the built-ins in their order (a replaced one in its place), then the user's."""
    targets = {name: _USER.get(name, target) for name, target in _BUILTIN.items()}
    targets.update((name, target) for name, target in _USER.items() if name not in _BUILTIN)
    return targets


def _add(target: LoweringTarget, *, replace: bool) -> LoweringTarget:
    """The one way into the registry, for the built-ins and the user's targets alike."""
    name = target.name
    if not isinstance(name, str) or not name:
        raise SparsityConfigError(f"a lowering target's name must be a non-empty string, got {name!r}")
    if target.build is None and target.strategy_factory is None:
        raise SparsityConfigError(f"lowering target {name!r}: give build (or, with register_lowering, a strategy "
                                  f"factory)")
    for what, fn in (("build", target.build), ("applies", target.applies),
                     ("strategy factory", target.strategy_factory)):
        if fn is not None and not callable(fn):
            raise SparsityConfigError(f"lowering target {name!r}: {what} must be callable, got {fn!r}")
    if not isinstance(target.auto, bool):
        raise SparsityConfigError(f"lowering target {name!r}: auto must be True or False, got {target.auto!r}")
    if target.auto and target.build is None:
        raise SparsityConfigError(f"lowering target {name!r}: auto=True needs a build function to time")
    if target.produces is not None and not (isinstance(target.produces, type)
                                            and issubclass(target.produces, nn.Module)):
        raise SparsityConfigError(f"lowering target {name!r}: produces must be an nn.Module subclass, "
                                  f"got {target.produces!r}")
    if target.builtin:
        _BUILTIN[name] = target
        return target
    if name in _FIXED:
        raise SparsityConfigError(f"cannot register a lowering target named {name!r}: {_FIXED[name]}; "
                                  f"pick another name")
    if name in _BUILTIN and not replace:
        raise SparsityConfigError(f"{name!r} is a built-in lowering target; pass replace=True to replace it "
                                  f"(unregister_lowering_target({name!r}) brings the built-in back)")
    if target.produces is not None:
        for other in lowering_targets().values():
            if other.produces is target.produces and other.name != name:
                raise SparsityConfigError(
                    f"lowering target {name!r}: {target.produces.__qualname__} is already produced by the target "
                    f"{other.name!r} (a mapping dict naming the class must find one target); register under "
                    f"{other.name!r} (replace=True for a built-in) or leave out produces")
    _USER[name] = target
    return target


def register_lowering_target(name: str, build: BuildFn, *, applies: AppliesFn | None = None, auto: bool = True,
                             produces: type[nn.Module] | None = None, replace: bool = False) -> LoweringTarget:
    """Register a lowering target: ``convert_fx_sparse(gm, name)`` uses it, and ``"auto"`` times it.

    - ``build(weight, bias, *, mask, sparse_block_shape, example=None) -> nn.Module`` is
      called once per sparse weight: ``weight`` is the masked dense weight (weight·mask),
      ``bias`` the bias or None, ``mask`` the 0/1 mask (the weight's dtype, or bool), the
      group's ``sparse_block_shape`` (None outside a prepared model), and, when auto is
      timing, ``example``, the input the layer gets from ``example_inputs`` (None otherwise).
      The module takes the linear's input ``(*, in_features)``.
    - ``applies(weight, mask, *, sparse_block_shape, device)`` (same ``weight`` and ``mask``)
      tells auto whether to time the target on a layer: ``True``; ``False`` (not a
      candidate, nothing recorded); or a string, the reason, recorded in the layer's
      ``meta["sparsity"]["not_timed"]``. Naming the target lowers every sparse layer
      with it; ``applies`` is auto's question only.
    - ``auto``: whether ``"auto"`` times it at all. A timed target is also held to
      ``max_rel_error`` and must beat dense by ``MIN_SPEEDUP``, as the built-ins are;
      its time is in ``candidates_ms`` under ``name``.
    - ``produces``: the module class ``build`` returns, so that a mapping dict
      ``{nn.Linear: produces}`` lowers with this target (one target per class).
    - Registering a name again replaces the earlier target. Built-in names need
      ``replace=True``; ``"dense"`` and ``"auto"`` are never replaced.
      :func:`unregister_lowering_target` removes it (a replaced built-in comes back).

    Returns the registered :class:`LoweringTarget`.
    """
    return _add(LoweringTarget(name, build, applies, auto, produces), replace=replace)


def register_lowering(name: str, factory: StrategyFactory, *, replace: bool = False) -> LoweringTarget:
    """Make ``convert_fx_sparse(gm, mapping=name)`` run ``factory(options)``, a whole-graph strategy.

    The older, larger extension point: a :class:`LoweringStrategy` sees the graph
    (``check``, ``observe``, ``make``, ``finish``). It is an entry of the same registry,
    one that ``"auto"`` does not time; a per-layer target is :func:`register_lowering_target`.
    """
    return _add(LoweringTarget(name, auto=False, strategy_factory=factory), replace=replace)


def unregister_lowering_target(name: str) -> LoweringTarget:
    """Remove a target the user registered (a built-in it replaced comes back); returns it."""
    if name in _USER:
        return _USER.pop(name)
    if name in _BUILTIN:
        raise SparsityConfigError(f"{name!r} is a built-in lowering target and cannot be unregistered "
                                  f"(register_lowering_target({name!r}, ..., replace=True) replaces it)")
    raise SparsityConfigError(f"no lowering target named {name!r}; registered: {sorted(_USER)}")


class _StrategyView(Mapping[str, StrategyFactory]):
    """``STRATEGIES[name](options)``: the strategy of each registered name (read-only, always current)."""

    def __getitem__(self, name: str) -> StrategyFactory:
        return lowering_targets()[name].strategy

    def __iter__(self) -> Iterator[str]:
        return iter(lowering_targets())

    def __len__(self) -> int:
        return len(lowering_targets())


#: Strategy factories by name (a read-only view of the registry, kept for code written before it).
STRATEGIES: Mapping[str, StrategyFactory] = _StrategyView()


# -- choosing a target -----------------------------------------------------------------------

def _target_for_linear(mapping: Any) -> type[nn.Module]:
    if not isinstance(mapping, Mapping):
        raise SparsityConfigError(
            f"mapping must be a dict from float module type to target class (e.g. "
            f"fx_sparsity.get_dynamic_sparse_quantized_mapping()), None, or 'auto'; got {type(mapping).__name__}")
    others = [k for k in mapping if k is not nn.Linear]
    if others:
        names = ", ".join(getattr(k, "__name__", repr(k)) for k in others)
        raise SparsityConfigError(f"mapping has entries for {names}: fx_sparsity lowers Linear layers only; "
                                  f"keep just the torch.nn.Linear entry")
    if nn.Linear not in mapping:
        raise SparsityConfigError("mapping has no torch.nn.Linear entry; nothing to lower to "
                                  "(e.g. fx_sparsity.get_dynamic_sparse_quantized_mapping())")
    target = mapping[nn.Linear]
    if not isinstance(target, type):
        raise SparsityConfigError(f"mapping[torch.nn.Linear] must be a class, got {target!r}")
    return target


def target_for_class(cls: type) -> LoweringTarget:
    """The target a mapping dict ``{nn.Linear: cls}`` lowers with.

    The target registered with ``produces=cls``; else one whose ``produces`` is a base of
    ``cls`` and that takes subclasses (torch.ao's sparse-quantized classes, the 2:4
    Linear); else, unregistered, ``cls.from_masked(weight, mask, bias, *, sparse_block_shape)``
    or torch.ao's ``cls.from_dense(linear)``.
    """
    targets = list(lowering_targets().values())
    for target in targets:
        if target.produces is cls:
            return target
    for target in targets:
        if target.match_subclasses and target.produces is not None and issubclass(cls, target.produces):
            return target
    if callable(getattr(cls, "from_masked", None)):
        return LoweringTarget(cls.__name__, auto=False, produces=cls,
                              strategy_factory=functools.partial(FromMasked, target=cls))
    if callable(getattr(cls, "from_dense", None)):
        return LoweringTarget(cls.__name__, auto=False, produces=cls,
                              strategy_factory=functools.partial(FromDense, target=cls))
    raise SparsityConfigError(
        f"cannot lower to {cls.__module__}.{cls.__qualname__}: the target must be "
        f"torch.ao.nn.sparse.quantized.dynamic.Linear, torch.ao.nn.sparse.quantized.Linear, or a class "
        f"with a classmethod from_masked(weight, mask, bias, *, sparse_block_shape) or (torch.ao's) "
        f"from_dense(linear)")


def strategy_for(mapping: Mapping[type, type] | str | None, options: LoweringOptions) -> LoweringStrategy:
    """The strategy for a registered name, a mapping dict (by its ``nn.Linear`` target), or None (``"dynamic"``)."""
    targets = lowering_targets()
    if isinstance(mapping, str):
        if mapping not in targets:
            names = sorted(name for name, target in targets.items() if target.listed)
            raise SparsityConfigError(
                f"mapping={mapping!r}: use a dict such as get_dynamic_sparse_quantized_mapping(), None (dynamic), "
                f"or one of the names {names}")
        return targets[mapping].strategy(options)
    if mapping is None:
        return targets["dynamic"].strategy(options)
    return target_for_class(_target_for_linear(mapping)).strategy(options)
