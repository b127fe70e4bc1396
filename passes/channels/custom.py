"""Channel rules a user registers for a layer or an op the analysis cannot see into.

``register_channel_rule(MyScale, "same", per_channel=("scale",))`` says: the channels of the
layer's first tensor input come out of it unchanged, and its ``scale`` is indexed by them (cut with
them). ``"fixed"`` says they never go. A :class:`~.registry.ChannelRule` subclass is the full form.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import cast

import torch
from torch import fx, nn

from .registry import ChannelRule, ChannelRuleError, RuleHandle, add_user_rule, remove_user_rule
from .tracker import Refuse, Tracker, op_name
from .values import Block

__all__ = ["register_channel_rule", "unregister_channel_rule"]

_KINDS = ("same", "fixed")
_HOW = "docs/structured.md, \"Layers and ops of your own\""


def _describe(target: object) -> str:
    if isinstance(target, type):
        return target.__name__
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return f"torch.ops.{target}"
    return getattr(target, "__qualname__", repr(target))


def _what(node: fx.Node) -> str:
    return f"'{node.name}' ({op_name(node)})" if node.op != "call_module" else f"'{node.target}'"


def _first_input(node: fx.Node, t: Tracker, skip: set[fx.Node]) -> tuple[int | str, fx.Node] | None:
    """The first tensor argument of ``node`` (its position or keyword) that is not a per-channel one."""
    named: list[tuple[int | str, object]] = [*enumerate(node.args), *node.kwargs.items()]
    for key, value in named:
        if isinstance(value, fx.Node) and value not in skip and t.shape(value) is not None:
            return key, value
    return None


class SameRule(ChannelRule):
    """``kind="same"``: the output holds the channels of the first tensor input, at the same dims; the tensors
    ``per_channel`` names are indexed by them. The input is a sink: masked, the layer sees zeros where the cut
    one sees nothing, so a forward reading every channel (``if x.sum() > 0``) takes the same branch."""

    def __init__(self, target: object, per_channel: tuple[str | int, ...] = ()):
        self.target, self.per_channel = target, per_channel

    def follow_module(self, t: Tracker, node: fx.Node, module: nn.Module) -> bool:
        tensors = []
        for name in self.per_channel:
            assert isinstance(name, str)
            tensor = _tensor_named(module, name)
            if tensor is _ABSENT:
                held = [n for n, _ in [*module.named_parameters(), *module.named_buffers()]]
                raise ChannelRuleError(
                    f"register_channel_rule({_describe(self.target)}, \"same\", per_channel={self.per_channel}): "
                    f"'{name}' is not a parameter or buffer of '{node.target}' ({type(module).__name__}), which holds "
                    f"{held}; name the tensors indexed by its channels")
            if isinstance(tensor, torch.Tensor):  # (an optional one set to None: nothing to cut)
                tensors.append((repr(name), tensor))
        return self.same(t, node, tensors, set())

    def follow(self, t: Tracker, node: fx.Node) -> bool:
        tensors, skip = [], set()
        for position in self.per_channel:
            assert isinstance(position, int)
            given = _argument(node, position)
            if given is None:
                raise ChannelRuleError(
                    f"register_channel_rule({_describe(self.target)}, \"same\", per_channel={self.per_channel}): "
                    f"'{node.name}' is called with {len(node.args)} arguments and no argument {position}; "
                    f"per_channel counts the op's arguments from 0")
            if not isinstance(given, fx.Node):
                raise Refuse(f"{_what(node)}: its per-channel argument {position} is not a tensor of the graph")
            tensor = t.tensor(given)
            if tensor is None:
                raise Refuse(f"{_what(node)}: its per-channel argument {position} is computed in the graph, not a "
                             f"parameter or buffer; only those are cut with the channels")
            tensors.append((f"argument {position}", tensor))
            skip.add(given)
        return self.same(t, node, tensors, skip)

    def same(self, t: Tracker, node: fx.Node, tensors: list[tuple[str, torch.Tensor]], skip: set[fx.Node]) -> bool:
        first = _first_input(node, t, skip)
        if first is None:
            return False
        key, x = first
        shape, out_shape = t.shape(x), t.shape(node)
        assert shape is not None
        if out_shape != shape:
            raise Refuse(f"{_what(node)} is registered as \"same\", but its output's shape {out_shape} is not its "
                         f"input's {shape}")
        others = [a.name for a in node.all_input_nodes if a is not x and a not in skip and t.value(a)]
        if others:
            raise Refuse(f"{_what(node)} also takes channels in {others}; \"same\" follows its first tensor input "
                         f"only: register a ChannelRule for it ({_HOW})")
        value = list(t.value(x))
        held = sorted({d for b in value for d in b.dims})
        for label, tensor in tensors:
            if not held:
                break  # its input's channels are not followed: nothing of it is cut
            value.append(self._indexed(node, label, tensor, shape, held, t))
        joined = t.join_blocks(value)
        for blk in joined:
            t.sink(node, key, x, blk)
        t.values[node] = joined
        return True

    def _indexed(self, node: fx.Node, label: str, tensor: torch.Tensor, shape: tuple[int, ...], held: list[int],
                 t: Tracker) -> Block:
        """``tensor`` indexed by the channels: along its first dim whose size is that of a channel dim."""
        pairs = [(d, at) for d in range(tensor.dim()) for at in held if tensor.shape[d] == shape[at] > 1]
        if not pairs:
            raise Refuse(f"{_what(node)}: its per-channel tensor {label} of shape {tuple(tensor.shape)} has no dim "
                         f"the size of its input's channel dims {held} (input shape {shape})")
        dim = pairs[0][0]
        ats = [at for d, at in pairs if d == dim]
        if len(ats) > 1:
            raise Refuse(f"{_what(node)}: its per-channel tensor {label} could index dim {ats[0]} or {ats[1]} of its "
                         f"input (the same size): register a ChannelRule that says which ({_HOW})")
        block = t.tensor_block(tensor, dim, ats[0], len(shape))
        assert block is not None
        return block


class FixedRule(ChannelRule):
    """``kind="fixed"``: channels entering the layer or op are never pruned; those leaving it are new ones that
    are not followed (never pruned either)."""

    def __init__(self, target: object):
        self.target = target

    def follow(self, t: Tracker, node: fx.Node) -> bool:
        why = (f"{_what(node)} is registered as \"fixed\" (register_channel_rule({_describe(self.target)}, "
               f"\"fixed\")): its channels are never pruned")
        for a in node.all_input_nodes:
            for blk in t.value(a):
                t.fix(blk.ids, why)
        t.values[node] = ()
        return True

    def follow_module(self, t: Tracker, node: fx.Node, module: nn.Module) -> bool:
        return self.follow(t, node)


class _Absent:
    pass


_ABSENT = _Absent()


def _tensor_named(module: nn.Module, name: str) -> torch.Tensor | None | _Absent:
    """The parameter or buffer ``name`` of ``module`` (dotted for a submodule's); None for one registered as
    None; ``_ABSENT`` when there is none."""
    owner_name, _, leaf = name.rpartition(".")
    try:
        owner = module.get_submodule(owner_name)
    except AttributeError:
        return _ABSENT
    for table in (owner._parameters, owner._buffers):
        if leaf in table:
            return table[leaf]
    return _ABSENT


def _argument(node: fx.Node, position: int) -> object:
    """Argument ``position`` of an op's call, given by position or by its schema's name."""
    if position < len(node.args):
        return node.args[position]
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        arguments = target._schema.arguments
        if position < len(arguments):
            return node.kwargs.get(arguments[position].name)
    return None


def _op_arity(target: object) -> int | None:
    """How many arguments an op takes (None: any number, or unknown)."""
    if isinstance(target, torch._ops.OpOverload):
        return len(target._schema.arguments)
    if isinstance(target, torch._ops.OpOverloadPacket):
        counts = [len(getattr(target, name)._schema.arguments) for name in target.overloads()]
        return max(counts) if counts else None
    try:
        parameters = inspect.signature(cast(Callable[..., object], target)).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return None
    return sum(1 for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _key(target: object) -> object:
    """What a rule is registered under: a layer class, an op (a custom op's overload), or a function."""
    if isinstance(target, type):
        if not issubclass(target, nn.Module):
            raise ChannelRuleError(f"register_channel_rule: target {target.__name__} is a class but not an "
                                   f"nn.Module subclass; pass a layer class or an op (torch.ops.<ns>.<op>)")
        return target
    if isinstance(target, nn.Module):
        raise ChannelRuleError(f"register_channel_rule: target is a {type(target).__name__} instance; pass its "
                               f"class, register_channel_rule({type(target).__name__}, ...)")
    custom = getattr(target, "_opoverload", None)  # a torch.library.custom_op
    if isinstance(custom, torch._ops.OpOverload):
        return custom
    if isinstance(target, str) or not callable(target):
        raise ChannelRuleError(f"register_channel_rule: target {target!r} is neither an nn.Module subclass nor an "
                               f"op; pass the layer class, or the op itself (torch.ops.<ns>.<op>, a "
                               f"torch.library.custom_op), not its name")
    return target


def _check_per_channel(key: object, kind: str, per_channel: Iterable[str | int]) -> tuple[str | int, ...]:
    given = (per_channel,) if isinstance(per_channel, (str, int)) else tuple(per_channel)
    if not given:
        return ()
    head = f"register_channel_rule({_describe(key)}, {kind!r}, per_channel={given})"
    if kind != "same":
        raise ChannelRuleError(f"{head}: per_channel is for kind=\"same\"; a \"fixed\" layer's channels are never cut")
    if isinstance(key, type):
        wrong = [p for p in given if not isinstance(p, str)]
        if wrong:
            raise ChannelRuleError(f"{head}: for a layer, per_channel names its parameters or buffers (such as "
                                   f"\"scale\"), got {wrong[0]!r}")
        return given
    not_int = [p for p in given if isinstance(p, bool) or not isinstance(p, int)]
    if not_int:
        raise ChannelRuleError(f"{head}: for an op, per_channel gives argument positions (such as 1), got "
                               f"{not_int[0]!r}")
    arity = _op_arity(key)
    for position in given:
        assert isinstance(position, int)
        if position < 0 or (arity is not None and position >= arity):
            raise ChannelRuleError(f"{head}: position {position} is out of range: {_describe(key)} takes {arity} "
                                   f"arguments, counted from 0")
    return given


def register_channel_rule(target: type[nn.Module] | object, kind: str | type[ChannelRule] | ChannelRule, *,
                          per_channel: Iterable[str | int] = ()) -> RuleHandle:
    """Teach the structured pruners how channels pass through a layer or an op they cannot see into.

    ``target``: an ``nn.Module`` subclass, which symbolic tracing then keeps a leaf (its forward is
    not traced, so it may branch on data; the analysis treats each call as one op), or an op: an
    ``OpOverload`` or ``OpOverloadPacket`` (``torch.ops.mylib.scale``), a ``torch.library.custom_op``
    (as seen in a ``tracer="export"`` graph), or a function the graph calls.

    ``kind``: ``"same"``: its output holds the channels of its first tensor input, at the same dims
    (an elementwise layer); its input is masked in the masked graph, so pruned == masked even when
    its forward reads every channel. ``"fixed"``: channels entering and leaving it are never pruned.
    A :class:`ChannelRule` subclass (or instance) is the full form (docs/structured.md).

    ``per_channel`` (with ``"same"``): the tensors indexed by the channel, cut with it: parameter or
    buffer names for a layer (checked on each instance the analysis meets), argument positions for
    an op (parameters or buffers passed there). Each is indexed along its first dim whose size is
    that of the input's channel dim: ``(C,)``, ``(C, 1, 1)`` and ``(1, C, 1, 1)`` all work.

    Registering a target again replaces its rule (a built-in one too). Returns a handle:
    ``handle.remove()``, or leaving ``with register_channel_rule(...):``, puts back the rule it replaced.
    """
    key = _key(target)
    if isinstance(kind, str) and kind in _KINDS:
        names = _check_per_channel(key, kind, per_channel)
        rule: ChannelRule = SameRule(key, names) if kind == "same" else FixedRule(key)
    elif isinstance(kind, type) and issubclass(kind, ChannelRule) or isinstance(kind, ChannelRule):
        if tuple(per_channel):
            raise ChannelRuleError(f"register_channel_rule({_describe(key)}, {kind!r}, per_channel=...): per_channel "
                                   f"is for kind=\"same\"; a ChannelRule joins the tensors it cuts itself")
        rule = kind() if isinstance(kind, type) else kind
    else:
        raise ChannelRuleError(f"register_channel_rule({_describe(key)}, kind={kind!r}): kind must be \"same\" (its "
                               f"output channels are its input's), \"fixed\" (never pruned) or a ChannelRule subclass "
                               f"(the full form, {_HOW})")
    return add_user_rule(key, rule)


def unregister_channel_rule(target: type[nn.Module] | object) -> bool:
    """Forget the rule ``register_channel_rule`` gave ``target`` (a built-in one applies again); False if it had
    none."""
    return remove_user_rule(_key(target))
