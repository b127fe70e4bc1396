"""Contractions: Linear, matmul/mm/bmm/addmm, and attention.

A Linear (or a matmul with a weight) joins its input's channels with the weight's input dim (the
*contraction*) and gives its output the weight's output dim: a *producer* of new channels. Its
input is a *sink*: the masked model multiplies it by the masks, so removed channels contribute
nothing, as in the cut model. Attention (``q @ kᵀ``, ``attn @ v``, ``scaled_dot_product_attention``)
joins each head of q, k and v into one unit (everything of one batch index goes together), and a
repeat of the kv heads joins a kv head with its query heads.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from .registry import ChannelRule, channel_rule
from .tracker import Refuse, Tracker, align_shape, arg, op_name
from .values import Block, Value, align, permute

__all__: list[str] = []

_LAYOUT = frozenset("t transpose permute contiguous numpy_T".split())


def _rep(blk: Block, batch: set[int]) -> torch.Tensor:
    """One element per batch index: ``blk`` taken at index 0 along its other dims."""
    ids = blk.ids
    for d in blk.dims:
        if d not in batch:
            ids = ids.narrow(d, 0, 1)
    return ids


def _unalign(blk: Block, ndim: int) -> Block:
    extra = blk.ids.dim() - ndim
    if extra <= 0:
        return blk
    return Block(tuple(d - extra for d in blk.dims), blk.ids.reshape(blk.ids.shape[extra:]))


def _weight_behind(node: object) -> bool:
    """Whether ``node`` is a parameter seen through transposes only (``self.weight.T``)."""
    while isinstance(node, fx.Node) and node.op != "get_attr":
        name = op_name(node) if node.op != "call_module" else ""
        if name == "getattr" and node.args[1] in ("T", "mT"):
            node = node.args[0]
        elif name in _LAYOUT:
            node = node.args[0]
        else:
            return False
    return isinstance(node, fx.Node)


def contract(t: Tracker, node: fx.Node, av: Value, sa: tuple[int, ...], bv: Value, sb: tuple[int, ...],
             sink_a: tuple[int, object] | None = None, sink_b: tuple[int, object] | None = None) -> Value:
    """``a @ b`` (ranks >= 2): joins the contracted dims, and everything of one batch index (an
    attention head) in both operands; the output gets a's row blocks, b's column blocks and the
    batch blocks. ``sink_a``/``sink_b``: ``(arg, node)`` of an operand that is a graph value."""
    nd = max(len(sa), len(sb))
    fa, fb = align_shape(sa, nd), align_shape(sb, nd)
    A = [align(blk, nd) for blk in av]
    B = [align(blk, nd) for blk in bv]
    batch = set(range(nd - 2))
    row, col = nd - 2, nd - 1
    for blk in A + B:
        if set(blk.dims) & batch:
            for d in set(blk.dims) - batch:
                t.union(blk.ids, blk.ids.narrow(d, 0, 1))
    why = f"'{node.name}' multiplies them with a value whose channels are not followed"
    for d in sorted(batch):
        ta = next((blk for blk in A if d in blk.dims), None)
        tb = next((blk for blk in B if d in blk.dims), None)
        if ta is not None and tb is not None:
            t.union(_rep(ta, batch), _rep(tb, batch))
        elif ta is not None and fb[d] > 1:
            t.join_along(ta, d, why)
        elif tb is not None and fa[d] > 1:
            t.join_along(tb, d, why)
    ak = next((blk for blk in A if col in blk.dims), None)
    bk = next((blk for blk in B if row in blk.dims), None)
    if (ak is not None and row in ak.dims and not set(ak.dims) & batch) or (
            bk is not None and col in bk.dims and not set(bk.dims) & batch):
        raise Refuse(f"'{node.name}' multiplies a value whose rows and columns hold the same channels")
    if ak is not None and bk is not None:
        t.union(ak.ids, bk.ids.transpose(-1, -2))
    elif ak is not None and fb[row] > 1:
        t.join_along(ak, col, why)
    elif bk is not None and fa[col] > 1:
        t.join_along(bk, row, why)
    if ak is not None and sink_a is not None:
        t.sink(node, sink_a[0], sink_a[1], _unalign(ak, len(sa)))
    elif bk is not None and sink_b is not None:
        t.sink(node, sink_b[0], sink_b[1], _unalign(bk, len(sb)))
    out = []
    for blk, inner in [(blk, col) for blk in A] + [(blk, row) for blk in B]:
        if inner in blk.dims:
            if not set(blk.dims) - {inner}:
                continue  # contracted away
            blk = Block(tuple(d for d in blk.dims if d != inner), blk.ids.narrow(inner, 0, 1))
        out.append(blk)
    return t.join_blocks(out)


def _add_tensor(t: Tracker, value: Value, tensor: torch.Tensor | None, ndim: int) -> Value:
    """``value`` plus a 1-D tensor (a bias) along the last dim."""
    if tensor is None:
        return value
    blk = t.tensor_block(tensor, 0, ndim - 1, ndim)
    return t.join_blocks([*value, blk]) if blk is not None else value


def linear(t: Tracker, node: fx.Node, x: object, weight: object, bias: object) -> bool:
    """``x @ weightᵀ + bias`` (the weight a parameter, or a slice of one: a packed q/k/v projection)."""
    shape = t.shape(x)
    wshape: tuple[int, ...] | None
    if isinstance(weight, torch.Tensor):
        wshape = tuple(weight.shape)
        wv = tuple(blk for blk in (t.tensor_block(weight, 0, 0, 2), t.tensor_block(weight, 1, 1, 2))
                   if blk is not None)
    else:
        wshape, wv = t.shape(weight), t.value(weight)
    if shape is None or wshape is None or len(wshape) != 2:
        return False
    out = contract(t, node, t.value(x), shape, permute(wv, [1, 0]), (wshape[1], wshape[0]), sink_a=(0, x))
    for blk in wv:
        if 0 in blk.dims:
            t.producers += t.spaces_of(blk.ids)
    ndim = len(t.shape(node) or ())
    if isinstance(bias, torch.Tensor):
        out = _add_tensor(t, out, bias, ndim)
    elif isinstance(bias, fx.Node):
        out = t.join_blocks([*out, *(align(blk, ndim) for blk in t.value(bias))])
    t.values[node] = out
    return True


@channel_rule("linear", modules=(nn.Linear,))
class Linear(ChannelRule):
    makes_channels = True

    def follow(self, t: Tracker, node: fx.Node) -> bool:
        return linear(t, node, node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias"))

    def follow_module(self, t: Tracker, node: fx.Node, module: nn.Module) -> bool:
        assert isinstance(module, nn.Linear)
        return linear(t, node, node.args[0] if node.args else None, module.weight, module.bias)

    def update_attributes(self, module: nn.Module) -> None:
        assert isinstance(module, nn.Linear)
        module.out_features, module.in_features = module.weight.shape


def matmul(t: Tracker, node: fx.Node, a: object, b: object, bias: object = None) -> bool:
    """``a @ b`` (``matmul``, ``mm``, ``bmm``), plus ``bias`` for ``addmm``/``baddbmm`` (HF's Conv1D)."""
    sa, sb = t.shape(a), t.shape(b)
    if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
        return False
    first = 0 if bias is None else 1
    sink_a = (first, a) if t.tensor(a) is None else None
    sink_b = (first + 1, b) if t.tensor(b) is None else None
    out = contract(t, node, t.value(a), sa, t.value(b), sb, sink_a=sink_a, sink_b=sink_b)
    for tensor, dim in ((t.tensor(a), 0), (t.tensor(b), 1)):
        if tensor is not None:  # a weight: its free dim gives the output's channels
            t.producers.append((t.fqn(tensor), dim if tensor.dim() == 2 else tensor.dim() - 2 + dim))
    for operand, value, free in ((a, t.value(a), len(sa) - 2), (b, t.value(b), len(sb) - 1)):
        if t.tensor(operand) is None and _weight_behind(operand):  # x @ self.weight.T (Falcon's linear)
            for blk in value:
                if free in blk.dims:
                    t.producers += t.spaces_of(blk.ids)
    if bias is not None:
        ndim = len(t.shape(node) or ())
        out = t.join_blocks([*out, *(align(blk, ndim) for blk in t.value(bias))])
    t.values[node] = out
    return True


@channel_rule("matmul", "mm", "bmm", "__matmul__")
class MatMul(ChannelRule):
    def follow(self, t: Tracker, node: fx.Node) -> bool:
        return matmul(t, node, node.args[0], node.args[1])


@channel_rule("addmm", "baddbmm")
class AddMM(ChannelRule):
    def follow(self, t: Tracker, node: fx.Node) -> bool:
        return matmul(t, node, node.args[1], node.args[2], bias=node.args[0])


@channel_rule("scaled_dot_product_attention")
class Attention(ChannelRule):
    """``scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)``:
    ``softmax(q @ kᵀ · scale + mask) @ v``, each kv head serving its group of query heads."""

    def follow(self, t: Tracker, node: fx.Node) -> bool:
        q, k, v = node.args[0], node.args[1], node.args[2]
        sq, sk, sv = t.shape(q), t.shape(k), t.shape(v)
        if sq is None or sk is None or sv is None:
            return False
        kv, vv = t.value(k), t.value(v)
        if len(sq) >= 3 and sk[-3] != sq[-3]:  # enable_gqa
            rep, d = sq[-3] // sk[-3], len(sk) - 3
            kv = tuple(Block(b.dims, b.ids.repeat_interleave(rep, d)) if d in b.dims else b for b in kv)
            vv = tuple(Block(b.dims, b.ids.repeat_interleave(rep, d)) if d in b.dims else b for b in vv)
            sk, sv = sk[:-3] + (sq[-3],) + sk[-2:], sv[:-3] + (sq[-3],) + sv[-2:]
        nd = len(sk)
        kt = permute(kv, list(range(nd - 2)) + [nd - 1, nd - 2])
        if arg(node, 6, "scale") is None:  # the default scale 1/sqrt(E) follows the head size
            for blk in t.value(q):
                if len(sq) - 1 in blk.dims:
                    t.join_along(blk, len(sq) - 1, f"'{node.name}' scales by 1/sqrt(head size)")
        scores = contract(t, node, t.value(q), sq, kt, sk[:-2] + (sk[-1], sk[-2]), sink_a=(0, q))
        score_shape = sq[:-1] + (sk[-2],)
        mask = arg(node, 3, "attn_mask")
        mask_shape = t.shape(mask)
        if isinstance(mask, fx.Node) and mask_shape is not None:
            ms = align_shape(mask_shape, len(score_shape))
            added = [align(blk, len(score_shape)) for blk in t.value(mask)]  # a bias per head (T5's position bias)
            held = {d for blk in added for d in blk.dims}
            for blk in scores:
                for d in blk.dims:
                    if ms[d] > 1 and d not in held:
                        t.join_along(blk, d, f"'{node.name}' masks them with a value whose channels are not followed")
            if added:  # added to the scores: its channels are theirs
                scores = t.join_blocks([*scores, *added])
        t.values[node] = contract(t, node, scores, score_shape, vv, sv)
        return True
