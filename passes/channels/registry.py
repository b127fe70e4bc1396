"""The channel rules and where they are registered: by op name, by op or function, by layer type.

A :class:`ChannelRule` says how channels follow through one kind of op (:meth:`~ChannelRule.follow`
for a function, method or aten op; :meth:`~ChannelRule.follow_module` for a layer called as a
``call_module``) and what changes after a cut (:meth:`~ChannelRule.rewrite` for the node's size
arguments, :meth:`~ChannelRule.update_attributes` for a layer's size attributes). The built-in rules
register with :func:`channel_rule`; a user's rules (``register_channel_rule``) sit on top and
replace a built-in one for the same target.

Lookup of a node: its exact target (an ``OpOverload``, then its packet, then a function such as
``operator.getitem``), else its op name (``op_name``: ``relu``, ``view``, ``conv2d``, ...); a layer:
its class, then its base classes in MRO order.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import ClassVar, TypeVar

import torch
from torch import fx, nn

from ..errors import FxSparsityError
from .groups import Seen, SizeRewriter
from .tracker import Tracker, op_name

__all__ = ["ChannelRule", "ChannelRuleError", "RuleHandle"]


class ChannelRuleError(FxSparsityError, ValueError):
    """A channel rule registered with bad arguments, or one that does not fit the layer it meets."""


class ChannelRule:
    """How channels follow through one kind of op, and what changes about it after a cut.

    ``follow``/``follow_module`` read the values of the node's inputs from the tracker ``t``, join the
    elements that must go together, and set ``t.values[node]``; they return False (or raise
    :class:`~fx_sparsity.passes.channels.tracker.Refuse` with a reason) when the node is not one they
    understand, which refuses the groups of its inputs.
    """

    #: A layer of this rule makes channels even when its input is not followed (a Linear on a model input).
    makes_channels: ClassVar[bool] = False

    def follow(self, t: Tracker, node: fx.Node) -> bool:
        """A ``call_function``/``call_method`` node."""
        return False

    def follow_module(self, t: Tracker, node: fx.Node, module: nn.Module) -> bool:
        """A ``call_module`` node calling ``module``."""
        return False

    def rewrite(self, r: SizeRewriter, node: fx.Node, seen: Seen) -> bool:
        """After a cut: change the node's size arguments (``seen`` is what :meth:`Tracker.record` kept); True if
        it changed."""
        return False

    def update_attributes(self, module: nn.Module) -> None:
        """After a cut: make the layer's size attributes (``in_features``, ...) match its cut tensors."""


_BY_NAME: dict[str, ChannelRule] = {}
_BY_TARGET: dict[object, ChannelRule] = {}
_BY_MODULE: dict[type, ChannelRule] = {}
_USER_TARGET: dict[object, ChannelRule] = {}  # register_channel_rule's, looked up first
_USER_MODULE: dict[object, ChannelRule] = {}

R = TypeVar("R", bound=ChannelRule)


def channel_rule(*names: str, targets: Iterable[object] = (), modules: Iterable[type[nn.Module]] = ()
                 ) -> Callable[[type[R]], type[R]]:
    """Class decorator of the built-in rules: one instance, registered for op ``names``, exact ``targets``
    (functions, ops) and layer types ``modules``."""
    def register(cls: type[R]) -> type[R]:
        rule = cls()
        for name in names:
            _add(_BY_NAME, name, rule)
        for target in targets:
            _add(_BY_TARGET, target, rule)
        for module in modules:
            _add(_BY_MODULE, module, rule)
        return cls
    return register


K = TypeVar("K")


def _add(table: dict[K, ChannelRule], key: K, rule: ChannelRule) -> None:
    if key in table:
        raise AssertionError(f"{type(rule).__name__}: {key!r} already has the rule {type(table[key]).__name__}")
    table[key] = rule


def op_rule(node: fx.Node) -> ChannelRule | None:
    """The rule for a ``call_function``/``call_method`` node."""
    target = node.target
    if node.op == "call_function":
        keys: list[object] = [target]
        if isinstance(target, torch._ops.OpOverload):
            keys.append(target.overloadpacket)
        for table in (_USER_TARGET, _BY_TARGET):
            for key in keys:
                found = table.get(key)
                if found is not None:
                    return found
    return _BY_NAME.get(op_name(node))


def module_rule(module: nn.Module) -> ChannelRule | None:
    """The rule for a layer: its class's, else the nearest base class's (a user's first at each class)."""
    for cls in type(module).__mro__:
        found = _USER_MODULE.get(cls) or _BY_MODULE.get(cls)
        if found is not None:
            return found
    return None


def has_user_rule(module: nn.Module) -> bool:
    """Whether ``register_channel_rule`` describes this layer (tracers then keep it a leaf)."""
    return any(cls in _USER_MODULE for cls in type(module).__mro__)


class RuleHandle:
    """What ``register_channel_rule`` returns: ``remove()`` puts back the rule it replaced (if it is still the
    one registered); also a context manager that removes it on exit."""

    def __init__(self, key: object, rule: ChannelRule, previous: ChannelRule | None):
        self.key, self.rule, self.previous = key, rule, previous

    def remove(self) -> None:
        table = _user_table(self.key)
        if table.get(self.key) is self.rule:
            if self.previous is None:
                del table[self.key]
            else:
                table[self.key] = self.previous

    def __enter__(self) -> RuleHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _user_table(key: object) -> dict[object, ChannelRule]:
    return _USER_MODULE if isinstance(key, type) else _USER_TARGET


def add_user_rule(key: object, rule: ChannelRule) -> RuleHandle:
    """Register ``rule`` for a layer type or an op (already checked), replacing any user rule for it."""
    table = _user_table(key)
    previous = table.get(key)
    table[key] = rule
    return RuleHandle(key, rule, previous)


def remove_user_rule(key: object) -> bool:
    """Forget the user rule for ``key`` (the built-in one, if any, applies again); False if there was none."""
    return _user_table(key).pop(key, None) is not None


def user_rules() -> dict[object, ChannelRule]:
    """A copy of every user rule, by target (to restore with :func:`restore_user_rules`)."""
    return {**_USER_MODULE, **_USER_TARGET}


def restore_user_rules(saved: dict[object, ChannelRule]) -> None:
    _USER_MODULE.clear()
    _USER_TARGET.clear()
    for key, rule in saved.items():
        _user_table(key)[key] = rule
