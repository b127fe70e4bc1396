"""Channel groups: which channels of a traced model must be removed together.

Every dim of a parameter (and of the running statistics a batch norm keeps per channel) is a
*space*: one *element* per channel. Every value in the graph carries, for its dims that hold
channels, the elements there (``channel_values``: blocks of element ids). Each op joins the
elements that must go together:

- a Linear, Conv or matmul joins its input's channels with the weight's input dim (the
  *contraction*) and gives its output the weight's output dim; an embedding gives its output the
  table's columns; a depthwise conv carries its channels; a grouped one asks for equal numbers
  from each conv-group;
- elementwise ops join their operands (a residual add, a norm's weight, a gate); cat, split,
  chunk, slices, views, transposes and shuffles move elements about;
- attention (``q @ kᵀ``, ``attn @ v``, ``scaled_dot_product_attention``) joins each head of q, k
  and v into one unit, and a repeat of the kv heads joins a kv head with its query heads;
- what cannot shrink is joined to the *fixed* element: channels that reach a model output, are
  added to a value that is not followed (a model input), or are reduced by an op other than a
  sum; a dim of several that cannot shrink (head_dim under rotary embeddings) is joined along
  itself instead, so only the other dims shrink.

The connected elements are the *classes*, the units pruning removes (a channel, a head, a kv
head with its query heads). A *group* is the set of spaces whose classes are linked through a
shared tensor: its classes are scored and chosen together. A group is refused (``problem``)
when an op touching it is not understood; a group whose channels a mean (LayerNorm, RMSNorm)
normalises together is *normalised*: cutting it changes the function, so it is only pruned when
asked for. Contractions are *sinks*: there the masked model multiplies its input by the group's
mask, so the masked model computes exactly what the cut one will.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.nn.utils import parametrize

from .attrs import fetch_attr
from .channel_values import Block, Many, Value, align, blocks, broadcast_form, permute, reshape, take
from .recurrent import GATES, recurrent

__all__ = ["Space", "ChannelGroup", "ChannelAnalysis", "find_channel_groups", "FIXED"]

FIXED = 0  # the element every channel that cannot be removed is joined to


@dataclass(frozen=True)
class Space:
    """One dim of one tensor: elements ``base .. base + size - 1``."""

    fqn: str
    dim: int
    size: int
    base: int


@dataclass
class ChannelGroup:
    """Channels chosen together: ``num_classes`` units (a channel, a head, ...) that go whole."""

    index: int
    producers: list[tuple[str, int]] = field(default_factory=list)  # (tensor, dim) holding its output channels
    tensors: list[tuple[str, int]] = field(default_factory=list)  # every (tensor, dim) cut with it
    num_classes: int = 0
    channels_per_class: list[int] = field(default_factory=list)  # entries of the first producer in each class
    fixed: int = 0  # entries of the first producer that cannot go
    balance: int = 1  # equal numbers go from each of this many contiguous blocks (grouped convolutions)
    problem: str | None = None  # why it cannot be pruned
    normalized: str | None = None  # why cutting it changes the function (it may still be pruned on request)
    classes_of: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict, repr=False)  # producer -> class
    # of each entry (-1: cannot go)
    keep_one: list[torch.Tensor] = field(default_factory=list, repr=False)  # class sets of which one must stay (a
    # tensor holding only them would be empty)

    @property
    def anchor(self) -> tuple[str, int]:
        return self.producers[0]

    @property
    def prunable(self) -> bool:
        return bool(self.producers) and self.problem is None and self.num_classes > 1


@dataclass
class Sink:
    """Where the masked model multiplies a value by masks: ``node``'s input ``arg`` (the value ``source``)."""

    node: str
    arg: int | str
    source: str
    ids: torch.Tensor


@dataclass
class GroupedConv:
    weight: str
    groups: int
    inputs: torch.Tensor  # element ids of the input channels, in order


@dataclass
class Seen:
    """What a node did to the channels, for rewriting its size arguments after a cut."""

    kind: str
    inputs: Value
    output: Any  # Value or Many
    in_shape: tuple
    out_shape: Any


class ChannelAnalysis:
    """The result of :func:`find_channel_groups`: groups, and where every element sits."""

    def __init__(self, groups: list[ChannelGroup], spaces: list[Space], label: torch.Tensor, group_of: torch.Tensor,
                 class_of: torch.Tensor, sinks: list[Sink], seen: dict[str, Seen], grouped: list[GroupedConv],
                 balances: dict[int, torch.Tensor]):
        self.groups, self.spaces, self.label = groups, spaces, label
        self.group_of, self.class_of = group_of, class_of  # per element: group index / class index (-1: none)
        self.sinks, self.seen, self.grouped, self.balances = sinks, seen, grouped, balances

    def group_of_tensor(self, fqn: str) -> ChannelGroup | None:
        """The group a config entry naming ``fqn`` means: the one it produces channels for, else the first
        group any of its dims is cut with."""
        for group in self.groups:
            if any(p == fqn for p, _ in group.producers):
                return group
        for space in sorted((s for s in self.spaces if s.fqn == fqn), key=lambda s: s.dim):
            index = int(self.group_of[space.base:space.base + space.size].amax())
            if index >= 0:
                return self.groups[index]
        return None

    def keep(self, chosen: dict[int, torch.Tensor]) -> torch.Tensor:
        """Per element: kept? ``chosen`` maps group index -> keep vector over its classes."""
        keep = torch.ones(self.label.numel(), dtype=torch.bool)
        for index, classes in chosen.items():
            mine = self.group_of == index
            keep[mine] = classes.to(torch.bool).cpu()[self.class_of[mine]]
        return keep


def _components(count: int, edges: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The smallest element id of each element's connected component (vectorised label propagation)."""
    label = torch.arange(count)
    if not edges:
        return label
    a = torch.cat([e[0] for e in edges])
    b = torch.cat([e[1] for e in edges])
    while True:
        low = torch.minimum(label[a], label[b])
        new = label.clone()
        new.scatter_reduce_(0, a, low, "amin")
        new.scatter_reduce_(0, b, low, "amin")
        new = new[new]
        if torch.equal(new, label):
            return label
        label = new


class _Tracker:
    """Follows the channels through one graph: elements, their joins, and what every op did."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.count = 1  # element 0 is FIXED
        self.spaces: list[Space] = []
        self._space: dict[tuple[int, int], Space] = {}
        self.fqn_of: dict[int, str] = {}
        for name, tensor in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
            self.fqn_of.setdefault(id(tensor), name)
        self.edges: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.fix_edges: list[tuple[torch.Tensor, torch.Tensor]] = []  # to FIXED, kept apart to say why
        self.fixed: list[tuple[torch.Tensor, str]] = []
        self.refused: list[tuple[torch.Tensor, str]] = []
        self.soft: list[tuple[torch.Tensor, str]] = []
        self.balances: list[tuple[torch.Tensor, int, str]] = []
        self.grouped: list[GroupedConv] = []
        self.sinks: list[Sink] = []
        self.producers: list[tuple[str, int]] = []
        self.values: dict[fx.Node, Any] = {}
        self.seen: dict[str, Seen] = {}
        self.locks: list[tuple[torch.Tensor, int]] = []  # (ids, dim) joined along dim when solving
        self.links: list[tuple[tuple[str, int], tuple[str, int]]] = []  # producer spaces scored as one group

    # -- elements
    def space(self, tensor: torch.Tensor, dim: int, fqn: str | None = None) -> torch.Tensor:
        """The element ids of ``tensor``'s ``dim`` (one space per tensor and dim, tied names included)."""
        key = (id(tensor), dim)
        space = self._space.get(key)
        if space is None:
            name = self.fqn_of.get(id(tensor), fqn or "?")
            space = Space(name, dim, int(tensor.shape[dim]), self.count)
            self.count += space.size
            self.spaces.append(space)
            self._space[key] = space
        return torch.arange(space.base, space.base + space.size)

    def tensor_block(self, tensor: torch.Tensor, dim: int, at: int, ndim: int) -> Block | None:
        """``tensor``'s ``dim`` standing at dim ``at`` of a value of rank ``ndim`` (None when of size 1)."""
        if tensor.shape[dim] == 1:
            return None
        return Block((at,), broadcast_form(self.space(tensor, dim), at, ndim))

    def spaces_of(self, ids: torch.Tensor) -> list[tuple[str, int]]:
        """The (tensor, dim) spaces the elements ``ids`` belong to (spaces are allocated in order of base)."""
        ids = ids.reshape(-1)
        bases = torch.tensor([s.base for s in self.spaces])
        found = torch.searchsorted(bases, ids[ids > FIXED], right=True).unique() - 1
        return [(self.spaces[i].fqn, self.spaces[i].dim) for i in found.tolist()]

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = torch.broadcast_tensors(a, b)
        self.edges.append((a.reshape(-1), b.reshape(-1)))

    def fix(self, ids: torch.Tensor, why: str) -> None:
        self.fix_edges.append((ids.reshape(-1), torch.full((ids.numel(),), FIXED, dtype=torch.long)))
        self.fixed.append((ids.reshape(-1), why))

    def refuse(self, value: Any, why: str) -> None:
        for block in _flat_blocks(value):
            self.refused.append((block.ids.reshape(-1), why))

    def join_along(self, block: Block, dim: int, why: str) -> None:
        """``block`` cannot shrink along ``dim``: join its elements along it (fix them if it is the only dim)."""
        if [d for d in block.dims if d != dim and block.ids.shape[d] > 1]:
            self.union(block.ids, block.ids.narrow(dim, 0, 1))
        else:
            self.fix(block.ids, why)

    def join_blocks(self, value: list[Block]) -> Value:
        """Blocks of one output that share dims are the same channels: join them, one block per dim set."""
        merged: list[Block] = []
        for block in value:
            for i, other in enumerate(merged):
                if set(other.dims) & set(block.dims):
                    a, b = torch.broadcast_tensors(other.ids, block.ids)
                    self.union(a, b)
                    merged[i] = Block(tuple(sorted(set(other.dims) | set(block.dims))), a.contiguous())
                    break
            else:
                merged.append(block)
        return blocks(merged)

    # -- values
    def value(self, arg: Any) -> Value:
        if not isinstance(arg, fx.Node):
            return ()
        found = self.values.get(arg, ())
        if isinstance(found, torch.Tensor):  # a get_attr: a parameter's dims are followed, a buffer's not
            if not isinstance(found, nn.Parameter):
                return ()
            return tuple(b for b in (self.tensor_block(found, d, d, found.dim()) for d in range(found.dim()))
                         if b is not None)
        return found if not isinstance(found, Many) else ()

    def shape(self, node: Any) -> tuple | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _flat_blocks(value: Any) -> list[Block]:
    if isinstance(value, Block):
        return [value]
    if isinstance(value, (tuple, list)):
        return [b for v in value for b in _flat_blocks(v)]
    return []


def _tensor(t: _Tracker, node: Any) -> torch.Tensor | None:
    """The parameter or buffer a ``get_attr`` node reads (None for anything else)."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        found = t.values.get(node)
        return found if isinstance(found, torch.Tensor) else None
    return None


def _op_name(node: fx.Node) -> str:
    target = node.target
    if node.op == "call_method":
        name = str(target)
    elif isinstance(target, torch._ops.OpOverload):
        name = target._schema.name.split("::")[-1]
    else:
        name = getattr(target, "__name__", str(target))
    if name.endswith("_") and not name.endswith("__") and name not in ("_",):
        name = name[:-1]  # in-place variants
    return name


_UNARY = frozenset("""relu relu6 hardtanh silu gelu sigmoid tanh hardswish hardsigmoid mish elu selu celu leaky_relu
softplus neg abs exp log log1p sqrt rsqrt square sin cos erf clamp clip clamp_min clamp_max dropout alpha_dropout
feature_alpha_dropout dropout1d dropout2d dropout3d feature_dropout contiguous clone detach alias float half bfloat16
double to type _to_copy lift_fresh_copy nan_to_num sign reciprocal floor ceil round trunc logit identity type_as
requires_grad zeros_like ones_like empty_like full_like rand_like randn_like""".split())
_BINARY = frozenset("""add sub rsub mul div truediv true_divide floordiv floor_divide maximum minimum pow where
masked_fill iadd isub imul itruediv __and__ __or__ and_ or_ eq ne lt le gt ge logical_and logical_or addcmul
addcdiv lerp fmod remainder hypot atan2 copysign xlogy __mul__ __add__ __sub__ __truediv__""".split())
_RESHAPE = frozenset("view reshape _unsafe_view view_as reshape_as flatten unflatten squeeze unsqueeze".split())
_EXPAND = frozenset("expand expand_as broadcast_to".split())
_PERMUTE = frozenset("permute transpose swapaxes swapdims t movedim".split())
_SPLIT = frozenset("split split_with_sizes chunk unbind tensor_split unsafe_split unsafe_chunk".split())
_SUM = frozenset("sum".split())
_MEAN = frozenset("mean var std var_mean std_mean norm linalg_vector_norm".split())
_OTHER_REDUCE = frozenset("amax amin max min logsumexp prod all any argmax argmin count_nonzero".split())
_ALONG = frozenset("softmax log_softmax _softmax _log_softmax cumsum cumprod".split())
_MATMUL = frozenset("matmul mm bmm __matmul__".split())
_CONV = frozenset("conv1d conv2d conv3d convolution _convolution conv_transpose1d conv_transpose2d conv_transpose3d"
                  .split())
_BATCH_NORM = frozenset("""batch_norm native_batch_norm _native_batch_norm_legit _native_batch_norm_legit_no_training
_native_batch_norm_legit_functional instance_norm""".split())
_LAYER_NORM = frozenset("layer_norm native_layer_norm rms_norm _fused_rms_norm".split())
_SPATIAL = frozenset("""max_pool1d max_pool2d max_pool3d max_pool2d_with_indices max_pool3d_with_indices avg_pool1d
avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d
adaptive_max_pool2d adaptive_max_pool3d upsample_nearest1d upsample_nearest2d upsample_nearest3d upsample_bilinear2d
upsample_bicubic2d upsample_linear1d interpolate _upsample_nearest_exact2d _upsample_bilinear2d_aa""".split())
_META = frozenset("""size dim numel sym_size sym_numel sym_stride stride getattr _assert_tensor_metadata _assert_async
is_contiguous element_size new_zeros new_ones new_empty new_full _guards_fn""".split())

_MODULE_UNARY = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Hardtanh,
                 nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                 nn.Dropout3d, nn.AlphaDropout, nn.Identity)
_MODULE_SPATIAL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                   nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                   nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
                   nn.UpsamplingBilinear2d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
       nn.InstanceNorm3d)


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _dims(dim: Any, ndim: int) -> list[int]:
    if dim is None:
        return list(range(ndim))
    if isinstance(dim, (list, tuple)):
        return sorted(d % ndim for d in dim) if dim else list(range(ndim))
    return [dim % ndim]


class _Rules:
    """One method per kind of op: read the node's input values, join elements, set its output value."""

    def __init__(self, t: _Tracker):
        self.t = t

    def run(self, node: fx.Node) -> None:
        t = self.t
        if node.op == "placeholder":
            return
        if node.op == "get_attr":
            found = fetch_attr(t.gm, str(node.target))
            if isinstance(found, torch.Tensor):
                t.values[node] = found
            return
        if node.op == "output":  # (a node of several outputs returned whole: each of them)
            returned = [t.values.get(a) if isinstance(t.values.get(a), Many) else t.value(a)
                        for a in _tensor_nodes(node.args)]
            for block in _flat_blocks(returned):
                t.fix(block.ids, "its channels are a model output")
            return
        if not any(_followed(t, a) for a in node.all_input_nodes) and not (
                node.op == "call_module" and _owns_followed(t, node)):  # a layer on an input still makes channels
            return
        why: str | None = None
        try:
            handled = self.dispatch(node)
        except _Refuse as e:
            handled, why = False, str(e)
        if not handled:
            what = (type(t.gm.get_submodule(str(node.target))).__name__ if node.op == "call_module"
                    else _op_name(node))
            t.refuse([t.value(a) for a in node.all_input_nodes],
                     why or f"'{node.name}' ({what}) is not an op whose channel coupling fx_sparsity follows")

    def dispatch(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return self.module(node, self.t.gm.get_submodule(str(node.target)))
        name = _op_name(node)
        if node.target is operator.getitem:
            return self.getitem(node)
        if node.target is recurrent:
            return self.recurrent(node)
        if name in _META:
            if name == "getattr" and node.args[1] in ("T", "mT"):
                return self.transpose_last(node, node.args[0])
            return True
        if name in _UNARY:
            return self.same(node, node.args[0])
        if name in _BINARY:
            return self.elementwise(node, [a for a in _tensor_nodes((node.args, node.kwargs))])
        if name in _RESHAPE:
            return self.reshape(node, node.args[0])
        if name in _EXPAND:
            return self.expand(node, node.args[0])
        if name in _PERMUTE:
            return self.permute(node, name)
        if name == "numpy_T" and len(self.t.shape(node.args[0]) or ()) == 2:  # export's `weight.T`
            return self.transpose_last(node, node.args[0])
        if name == "roll":
            return self.roll(node)
        if name == "index" and isinstance(node.target, torch._ops.OpOverload):  # aten.index(x, [None, idx])
            indices = list(node.args[1])
            given = [k for k, i in enumerate(indices) if i is not None]
            if len(given) == 1:
                return self.gather(node, node.args[0], given[0], indices[given[0]])
            return not self.t.value(node.args[0])
        if name in ("repeat", "repeat_interleave", "flip"):
            return self.tile(node, name)
        if name in ("cat", "concat", "concatenate", "stack"):
            return self.cat(node, name == "stack")
        if name in ("slice", "narrow", "select"):
            return self.slice(node, name)
        if name in _SPLIT:
            return self.split(node, name)
        if name in _SUM | _MEAN | _OTHER_REDUCE:
            return self.reduce(node, name)
        if name in _ALONG:
            return self.along(node, name)
        if name in _MATMUL:
            return self.matmul(node, node.args[0], node.args[1])
        if name == "linear":
            return self.linear(node, node.args[0], _arg(node, 1, "weight"), _arg(node, 2, "bias"))
        if name in ("addmm", "baddbmm"):
            return self.matmul(node, node.args[1], node.args[2], bias=node.args[0])
        if name in _CONV:
            return self.conv_function(node, name)
        if name in _BATCH_NORM:
            return self.batch_norm_function(node, name)
        if name in _LAYER_NORM:
            return self.layer_norm_function(node, name)
        if name in ("group_norm", "native_group_norm"):
            return self.group_norm(node, node.args[0], _arg(node, 1, "num_groups"),
                                   _tensor_of(self.t, node, 2, "weight"), _tensor_of(self.t, node, 3, "bias"))
        if name == "embedding":
            aten = isinstance(node.target, torch._ops.OpOverload)
            table, lookup = (node.args[0], node.args[1]) if aten else (_arg(node, 1, "weight"), node.args[0])
            return self.embedding(node, _tensor(self.t, table), lookup)
        if name == "scaled_dot_product_attention":
            return self.attention(node)
        if name in _SPATIAL:
            return self.spatial(node, node.args[0])
        if name in ("pad", "constant_pad_nd"):
            return self.pad(node)
        if name in ("pixel_shuffle", "pixel_unshuffle"):
            factor = _arg(node, 1, "upscale_factor" if name == "pixel_shuffle" else "downscale_factor")
            return self.pixel_shuffle(node, node.args[0], int(factor), name == "pixel_unshuffle")
        if name == "prelu":
            return self.per_channel(node, node.args[0], [_tensor(self.t, node.args[1])])
        return False

    # -- layers
    def module(self, node: fx.Node, m: nn.Module) -> bool:
        if parametrize.is_parametrized(m):  # (weight_norm, spectral_norm): the weight is made anew at each call
            why = (f"'{node.target}' ({parametrize.type_before_parametrizations(m).__name__}) computes its "
                   f"{', '.join(m.parametrizations)} from a parametrization; remove it "
                   f"(torch.nn.utils.parametrize.remove_parametrizations) to prune these channels")
            plist = next(iter(m.parametrizations.values()))
            original = getattr(plist, "original", getattr(plist, "original0", None))
            shape = self.t.shape(node)
            at = len(shape) - 1 if shape is not None and isinstance(m, nn.Linear) else 1  # its output channels
            if isinstance(original, torch.Tensor) and shape is not None and len(shape) > at \
                    and original.shape[0] == shape[at]:  # refused, with the reason
                self.t.values[node] = (Block((at,), broadcast_form(self.t.space(original, 0), at, len(shape))),)
                self.t.refuse(self.t.values[node], why)
            raise _Refuse(why)
        x = node.args[0] if node.args else None
        if isinstance(m, nn.Linear):
            return self.linear(node, x, m.weight, m.bias)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return self.conv(node, x, m.weight, m.bias, m.groups, transposed=False)
        if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            return self.conv(node, x, m.weight, m.bias, m.groups, transposed=True)
        if isinstance(m, _BN):
            stats = [m.running_mean, m.running_var] if getattr(m, "track_running_stats", False) else []
            return self.per_channel(node, x, [m.weight, m.bias, *stats])
        if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
            return self.normalize(node, x, len(m.normalized_shape), [m.weight, getattr(m, "bias", None)],
                                  type(m).__name__)
        if isinstance(m, nn.GroupNorm):
            return self.group_norm(node, x, m.num_groups, m.weight, m.bias)
        if isinstance(m, nn.Embedding):
            return self.embedding(node, m.weight, x)
        if isinstance(m, nn.PReLU):
            return self.per_channel(node, x, [m.weight])
        if isinstance(m, _MODULE_UNARY):
            return self.same(node, x)
        if isinstance(m, _MODULE_SPATIAL):
            return self.spatial(node, x)
        if isinstance(m, (nn.Flatten, nn.Unflatten)):
            return self.reshape(node, x)
        if isinstance(m, (nn.PixelShuffle, nn.PixelUnshuffle)):
            unshuffle = isinstance(m, nn.PixelUnshuffle)
            return self.pixel_shuffle(node, x, m.downscale_factor if unshuffle else m.upscale_factor, unshuffle)
        if isinstance(m, (nn.Softmax, nn.LogSoftmax)):
            return self.along_dims(node, x, _dims(m.dim, len(self.t.shape(x) or ())), "softmax")
        return False

    def linear(self, node: fx.Node, x: Any, weight: Any, bias: Any) -> bool:
        """``x @ weightᵀ + bias`` (the weight a parameter, or a slice of one: a packed q/k/v projection)."""
        t = self.t
        shape = t.shape(x)
        wshape: tuple | None
        if isinstance(weight, torch.Tensor):
            wshape = tuple(weight.shape)
            wv = tuple(blk for blk in (t.tensor_block(weight, 0, 0, 2), t.tensor_block(weight, 1, 1, 2))
                       if blk is not None)
        else:
            wshape, wv = t.shape(weight), t.value(weight)
        if shape is None or wshape is None or len(wshape) != 2:
            return False
        out = self._matmul(node, t.value(x), shape, permute(wv, [1, 0]), (wshape[1], wshape[0]), sink_a=(0, x))
        for blk in wv:
            if 0 in blk.dims:
                t.producers += t.spaces_of(blk.ids)
        ndim = len(t.shape(node) or ())
        if isinstance(bias, torch.Tensor):
            out = self._add_tensor(out, bias, ndim)
        elif isinstance(bias, fx.Node):
            out = t.join_blocks([*out, *(align(blk, ndim) for blk in t.value(bias))])
        t.values[node] = out
        return True

    def conv(self, node: fx.Node, x: Any, w: torch.Tensor, b: torch.Tensor | None, groups: int,
             transposed: bool) -> bool:
        t = self.t
        shape = t.shape(x)
        assert shape is not None
        ndim = len(shape)
        channels = [blk for blk in t.value(x) if 1 in blk.dims]
        other = [blk for blk in t.value(x) if set(blk.dims) - {1}]
        if other:
            raise _Refuse(f"'{node.name}' convolves over dims that hold channels")
        xb = channels[0] if channels else None
        fqn = t.fqn_of.get(id(w), "")
        if transposed:
            if groups != 1:
                raise _Refuse(f"grouped transposed convolution '{node.name}'")
            if xb is not None:
                t.union(xb.ids.reshape(-1), t.space(w, 0))
                self._sink(node, 0, x, xb)
            out_ids = t.space(w, 1)
            t.producers.append((fqn, 1))
        else:
            out_ids = t.space(w, 0)
            per_group = w.shape[1]
            if groups == 1:
                if xb is not None:
                    t.union(xb.ids.reshape(-1), t.space(w, 1))
                    self._sink(node, 0, x, xb)
                t.producers.append((fqn, 0))
            elif per_group == 1:  # depthwise (times a multiplier): each output follows its one input channel
                if xb is not None:
                    t.union(xb.ids.reshape(groups, 1), out_ids.reshape(groups, -1))
                else:
                    t.fix(out_ids, f"'{node.name}' is a depthwise convolution of channels that are not followed")
            else:
                if xb is not None:
                    t.balances.append((xb.ids.reshape(-1), groups, _split_another_way(node.name)))
                    t.grouped.append(GroupedConv(fqn, groups, xb.ids.reshape(-1)))
                    self._sink(node, 0, x, xb)
                t.balances.append((out_ids, groups, _split_another_way(node.name)))
                t.producers.append((fqn, 0))
        if b is not None:
            t.union(t.space(b, 0), out_ids)
        t.values[node] = (Block((1,), broadcast_form(out_ids, 1, ndim)),)
        if node.op == "call_function" and groups > 1 and w.shape[1] == 1 and not transposed:
            self._seen(node, "depthwise", node.args[0], t.values[node])
        return True

    def recurrent(self, node: fx.Node) -> bool:
        """An LSTM, GRU or RNN written as one call (``passes.recurrent``). Each layer's (and direction's) hidden
        units are classes: a unit is a row of every gate block of ``weight_ih``, ``weight_hh`` and the biases, and
        a column of ``weight_hh`` and of the next layer's ``weight_ih``. Those columns are sinks (masked, a removed
        unit acts on no kept one), as are the input's channels; the output carries the last layer's units (both
        directions, end to end)."""
        t = self.t
        mode, x, hx, has_biases, num_layers, _dropout, _training, bidirectional, _batch_first = node.args[:9]
        weight_nodes = node.args[9:]
        directions, per_direction = (2 if bidirectional else 1), (4 if has_biases else 2)
        if len(weight_nodes) != num_layers * directions * per_direction:
            raise _Refuse(f"'{node.name}' is a {mode} with projections, whose units fx_sparsity does not follow")
        weights = [_tensor(t, w) for w in weight_nodes]
        shape = t.shape(x)
        if shape is None or any(w is None for w in weights):
            return False
        ndim = len(shape)
        inputs = t.space(weights[0], 1)
        for d in range(1, directions):  # every direction of the first layer reads the same input channels
            t.union(t.space(weights[d * per_direction], 1), inputs)
        for blk in t.value(x):
            if blk.dims != (ndim - 1,):
                raise _Refuse(f"'{node.name}' runs over dims that hold channels")
            t.union(blk.ids.reshape(-1), inputs)
            self._sink(node, 1, x, blk)
        hiddens: list[torch.Tensor] = []  # in h_n's row order: layer by layer, forward then reverse
        below: torch.Tensor | None = None  # the previous layer's output channels
        for _layer in range(num_layers):
            outs = []
            for _direction in range(directions):
                first = len(hiddens) * per_direction
                w_ih, w_hh, *biases = weights[first:first + per_direction]
                rows = t.space(w_ih, 0).reshape(GATES[mode], -1)  # gate × unit
                t.union(rows, rows[:1])
                for tensor in (w_hh, *biases):
                    t.union(t.space(tensor, 0).reshape(GATES[mode], -1), rows[:1])
                hidden = rows[0]
                t.union(t.space(w_hh, 1), hidden)
                self._sink(node, 9 + first + 1, weight_nodes[first + 1], Block((1,), broadcast_form(hidden, 1, 2)),
                           weight=True)
                if below is not None:
                    t.union(t.space(w_ih, 1), below)
                    self._sink(node, 9 + first, weight_nodes[first], Block((1,), broadcast_form(below, 1, 2)),
                               weight=True)
                t.producers += [(t.fqn_of.get(id(w_ih), ""), 0), (t.fqn_of.get(id(w_hh), ""), 0)]
                hiddens.append(hidden)
                outs.append(hidden)
            below = torch.cat(outs)
        assert below is not None
        # all layers and directions share hidden_size: one group, an equal count from each
        state_used = any(not (u.target is operator.getitem and (u.args[1] == 0 or not u.users)) for u in node.users)
        blocks_ = len(hiddens)
        if blocks_ > 1:
            first_producer = t.producers[-2 * blocks_]
            t.links += [(first_producer, key) for key in t.producers[-2 * blocks_ + 1:]]
            if not state_used:  # (a final state used whole keeps the same units in every layer instead)
                t.balances.append((torch.cat(hiddens), blocks_,
                                   f"the {blocks_} layers{' and directions' if bidirectional else ''} of "
                                   f"'{node.name}' ({mode}) share one hidden size, and not every one's units can go"))
        if hx is not None:
            for hidden in hiddens:
                t.fix(hidden, f"'{node.name}' ({mode}) is given its initial state")
            for blk in _flat_blocks([t.value(a) for a in _tensor_nodes(hx)]):
                t.fix(blk.ids, f"'{node.name}' ({mode}) is given its initial state")
        out = (Block((ndim - 1,), broadcast_form(below, ndim - 1, ndim)),)
        state: Value = ()
        if state_used:  # a final state holds each layer's (and direction's) units in its own row
            state_ids = torch.stack(hiddens).reshape(blocks_, *([1] * (ndim - 2)), -1)
            state = (Block((0, ndim - 1) if blocks_ > 1 else (ndim - 1,), state_ids),)
        t.values[node] = Many([out, Many([state, state]) if mode == "LSTM" else state])
        return True

    def conv_function(self, node: fx.Node, name: str) -> bool:
        t = self.t
        w = _tensor(t, node.args[1])
        if w is None:
            return False
        b = _tensor_of(t, node, 2, "bias")
        if name in ("convolution", "_convolution"):
            transposed, groups = bool(node.args[6]), int(node.args[8])
        elif name.startswith("conv_transpose"):
            transposed, groups = True, int(_arg(node, 6, "groups", 1))
        else:
            transposed, groups = False, int(_arg(node, 6, "groups", 1))
        return self.conv(node, node.args[0], w, b, groups, transposed)

    def embedding(self, node: fx.Node, w: torch.Tensor | None, indices: Any) -> bool:
        t = self.t
        if w is None or t.value(indices):
            return False
        ndim = len(t.shape(node) or ())
        t.values[node] = (Block((ndim - 1,), broadcast_form(t.space(w, 1), ndim - 1, ndim)),)
        t.producers.append((t.fqn_of.get(id(w), ""), 1))
        return True

    def per_channel(self, node: fx.Node, x: Any, tensors: list) -> bool:
        """Batch norm, instance norm, PReLU: a tensor per channel (dim 1), the channels carried through."""
        t = self.t
        shape = t.shape(x)
        if shape is None or len(shape) < 2:
            return False
        ndim = len(shape)
        value = list(t.value(x))
        extra = [Block((1,), broadcast_form(t.space(tensor, 0), 1, ndim)) for tensor in tensors
                 if isinstance(tensor, torch.Tensor) and tensor.dim() == 1 and tensor.shape[0] > 1]
        if extra and not any(1 in b.dims for b in value):
            for blk in extra:
                t.fix(blk.ids, f"'{node.name}' normalises channels that are not followed (a model input)")
        t.values[node] = t.join_blocks(value + extra)
        return True

    def batch_norm_function(self, node: fx.Node, name: str) -> bool:
        """aten's batch_norm variants and instance_norm take (input, weight, bias, running_mean, running_var),
        F.batch_norm (input, running_mean, running_var, weight, bias): each a tensor per channel."""
        t = self.t
        given = (*node.args[1:5], *(node.kwargs.get(k) for k in ("weight", "bias", "running_mean", "running_var")))
        if not self.per_channel(node, node.args[0], [_tensor(t, a) for a in given]):
            return False
        if t.shape(node) is None:  # native ops: (output, saved statistics...)
            t.values[node] = Many([t.values[node], (), (), (), ()])
        return True

    def normalize(self, node: fx.Node, x: Any, trailing: int, tensors: list, what: str) -> bool:
        """LayerNorm / RMSNorm over the last ``trailing`` dims: a tensor per channel there, and a mean."""
        t = self.t
        shape = t.shape(x)
        assert shape is not None
        ndim = len(shape)
        operands: list[Block] = list(t.value(x))
        followed = len(operands)
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                for d in range(tensor.dim()):
                    blk = t.tensor_block(tensor, d, ndim - tensor.dim() + d, ndim)
                    if blk is not None:
                        operands.append(blk)
        joined = t.join_blocks(operands)
        normalised = list(range(ndim - trailing, ndim))
        for blk in joined:
            if not set(blk.dims) & set(normalised):
                continue
            if followed == 0:
                t.fix(blk.ids, f"'{node.name}' normalises channels that are not followed (a model input)")
            elif set(blk.dims) <= set(normalised):
                t.soft.append((blk.ids.reshape(-1), f"{_module_or_node(node, what)} normalises them together"))
                self._sink(node, 0, x, blk)
            else:
                for d in normalised:
                    if d in blk.dims:
                        t.union(blk.ids, blk.ids.narrow(d, 0, 1))
        t.values[node] = joined
        if t.shape(node) is None:
            t.values[node] = Many([joined, (), ()])
        if node.op == "call_function":
            self._seen(node, _op_name(node), x, t.values[node])
        return True

    def layer_norm_function(self, node: fx.Node, name: str) -> bool:
        t = self.t
        shape = _arg(node, 1, "normalized_shape")
        trailing = len(shape) if isinstance(shape, (list, tuple)) else 1
        tensors = [_tensor_of(t, node, 2, "weight")] + ([_tensor_of(t, node, 3, "bias")] if "layer" in name else [])
        return self.normalize(node, node.args[0], trailing, tensors, "LayerNorm" if "layer" in name else "RMSNorm")

    def group_norm(self, node: fx.Node, x: Any, num_groups: int, w: Any, b: Any) -> bool:
        t = self.t
        if not self.per_channel(node, x, [w, b]):
            return False
        for blk in t.values[node]:
            if 1 in blk.dims:
                if blk.dims != (1,):
                    raise _Refuse(f"'{node.name}' normalises groups of channels held with other dims")
                t.soft.append((blk.ids.reshape(-1), f"{_module_or_node(node, 'GroupNorm')} normalises them in groups"))
                t.balances.append((blk.ids.reshape(-1), int(num_groups), _split_another_way(node.name)))
                self._sink(node, 0, x, blk)
        if t.shape(node) is None:
            t.values[node] = Many([t.values[node], (), ()])
        return True

    # -- elementwise
    def same(self, node: fx.Node, x: Any) -> bool:
        self.t.values[node] = self.t.value(x)
        return True

    def elementwise(self, node: fx.Node, operands: list[fx.Node]) -> bool:
        """Operands broadcast together hold the same channels: their blocks are joined (:meth:`_combine`)."""
        t = self.t
        out_shape = t.shape(node)
        if out_shape is None:
            return False
        ndim = len(out_shape)
        aligned = [(align_shape(t.shape(a) or (), ndim), [align(b, ndim) for b in t.value(a)]) for a in operands]
        t.values[node] = self._combine(aligned, f"'{node.name}' combines them with values whose channels are not "
                                                f"followed (a model input or a constant)")
        return True

    def _combine(self, parts: list[tuple[tuple, list[Block]]], why: str) -> Value:
        """The blocks of values laid over each other (``(shape, blocks)`` each, one rank), joined. Where a value
        that is not followed (an input, a constant) has entries along a block's dims, those cannot be cut: the
        block is fixed, or, when other dims of it are free (heads under a rotary table over head_dim), joined
        along them."""
        t = self.t
        out = []
        for blk in t.join_blocks([b for _, value in parts for b in value]):
            stuck: set[int] = set()
            for shape, value in parts:
                covered = {d for b in value for d in b.dims}
                stuck |= {d for d in blk.dims if d not in covered and shape[d] > 1}
            if stuck and not [d for d in blk.dims if d not in stuck and blk.ids.shape[d] > 1]:
                t.fix(blk.ids, why)
                continue
            for d in stuck:
                t.union(blk.ids, blk.ids.narrow(d, 0, 1))
            out.append(blk)
        return tuple(out)

    def _add_tensor(self, value: Value, tensor: torch.Tensor | None, ndim: int) -> Value:
        """``value`` plus a 1-D tensor (a bias) along the last dim."""
        if tensor is None:
            return value
        blk = self.t.tensor_block(tensor, 0, ndim - 1, ndim)
        return self.t.join_blocks([*value, blk]) if blk is not None else value

    # -- shapes
    def reshape(self, node: fx.Node, x: Any) -> bool:
        t = self.t
        before, after = t.shape(x), t.shape(node)
        if before is None or after is None:
            return False
        out, lost = reshape(t.value(x), before, after)
        for blk in lost:
            t.fix(blk.ids, f"'{node.name}' merges two dims that hold channels")
        t.values[node] = out
        self._seen(node, _op_name(node) if node.op != "call_module" else "module", x, out)
        return True

    def expand(self, node: fx.Node, x: Any) -> bool:
        t = self.t
        after = t.shape(node)
        if after is None:
            return False
        t.values[node] = tuple(align(b, len(after)) for b in t.value(x))
        self._seen(node, _op_name(node), x, t.values[node])
        return True

    def transpose_last(self, node: fx.Node, x: Any) -> bool:
        ndim = len(self.t.shape(x) or ())
        order = list(range(ndim))
        order[-2:] = order[-1], order[-2]
        self.t.values[node] = permute(self.t.value(x), order)
        return True

    def permute(self, node: fx.Node, name: str) -> bool:
        t = self.t
        x = node.args[0]
        ndim = len(t.shape(x) or ())
        order = list(range(ndim))
        if name == "permute":
            dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
            order = [int(d) % ndim for d in dims]  # type: ignore[union-attr]
        elif name == "t":
            order = order[::-1]
        elif name == "movedim":
            src, dst = _dims(node.args[1], ndim), _dims(node.args[2], ndim)
            rest = [d for d in order if d not in src]
            order = [None] * ndim  # type: ignore[list-item]
            for s, d in zip(src, dst):
                order[d] = s
            it = iter(rest)
            order = [o if o is not None else next(it) for o in order]
        else:
            a, b = int(_arg(node, 1, "dim0")) % ndim, int(_arg(node, 2, "dim1")) % ndim
            order[a], order[b] = order[b], order[a]
        t.values[node] = permute(t.value(x), order)
        return True

    def tile(self, node: fx.Node, name: str) -> bool:
        t = self.t
        x, value, out_shape = node.args[0], t.value(node.args[0]), t.shape(node)
        if out_shape is None:
            return False
        ndim = len(out_shape)
        if name == "repeat":
            reps = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
            if not all(isinstance(r, int) for r in reps):  # a count read at run time (DETR's batch size)
                in_shape = t.shape(x)
                if in_shape is None:
                    return False
                reps = [o // i if i else 1 for o, i in zip(out_shape, align_shape(in_shape, ndim))]
            reps = [int(r) for r in reps]
            out = []
            for blk in value:
                blk = align(blk, ndim)
                out.append(Block(blk.dims, blk.ids.repeat([r if d in blk.dims else 1 for d, r in enumerate(reps)])))
            t.values[node] = blocks(out)
            if any(r > 1 and d in b.dims for b in t.values[node] for d, r in enumerate(reps)):
                raise _Refuse(f"'{node.name}' tiles the channels")
            return True
        dims = _dims(_arg(node, 2 if name == "repeat_interleave" else 1, "dim" if name == "repeat_interleave"
                          else "dims"), ndim)
        if name == "flip":
            t.values[node] = tuple(Block(b.dims, b.ids.flip([d for d in dims if d in b.dims]) if set(dims) & set(
                b.dims) else b.ids) for b in value)
            return True
        repeats = _arg(node, 1, "repeats")
        if not isinstance(repeats, int) or _arg(node, 2, "dim") is None:
            return False
        d = dims[0]
        t.values[node] = blocks(Block(b.dims, b.ids.repeat_interleave(repeats, d)) if d in b.dims else b
                                for b in value)
        self._seen(node, "repeat_interleave", x, t.values[node])
        return True

    def cat(self, node: fx.Node, stack: bool) -> bool:
        """Along a dim holding channels the operands' ids go end to end (a value not followed there gives
        fixed ones); along other dims the operands hold the same channels."""
        t = self.t
        tensors = _arg(node, 0, "tensors")
        out_shape = t.shape(node)
        if not isinstance(tensors, (list, tuple)) or out_shape is None:
            return False
        ndim = len(out_shape)
        dim = int(_arg(node, 1, "dim", 0)) % ndim
        parts = []
        for x in tensors:
            shape = t.shape(x)
            if shape is None:
                return False
            value = t.value(x)
            if stack:
                shape = shape[:dim] + (1,) + shape[dim:]
                value = tuple(Block(tuple(d + (d >= dim) for d in b.dims), b.ids.unsqueeze(dim)) for b in value)
            parts.append((shape, value))
        along = [[b for b in v if dim in b.dims] for _, v in parts]
        rest = [b for _, v in parts for b in v if dim not in b.dims]  # along other dims: the same channels
        cat_block = None
        if any(along):
            dims_sets = {b.dims for a in along for b in a}
            if len(dims_sets) != 1 or any(len(a) > 1 for a in along):
                raise _Refuse(f"'{node.name}' concatenates values whose channels lie differently")
            (dims,) = dims_sets
            if any(set(b.dims) & set(dims) for b in rest):
                raise _Refuse(f"'{node.name}' concatenates values whose channels lie differently")
            common = torch.broadcast_shapes(*[_with(a[0].ids.shape, dim, 1) for a in along if a])
            pieces = []
            for (shape, _), a in zip(parts, along):
                size = _with(common, dim, a[0].ids.shape[dim] if a else shape[dim])
                pieces.append(a[0].ids.expand(size) if a else torch.full(size, FIXED, dtype=torch.long))
            cat_block = Block(dims, torch.cat(pieces, dim))
        rest_parts = [(shape, [b for b in value if dim not in b.dims]) for shape, value in parts]
        joined = self._combine(rest_parts, f"'{node.name}' concatenates them with values whose channels are not "
                                           f"followed")
        t.values[node] = blocks([*joined, cat_block])
        return True

    def slice(self, node: fx.Node, name: str) -> bool:
        t = self.t
        x = node.args[0]
        shape = t.shape(x)
        if shape is None:
            return False
        ndim = len(shape)
        dim = int(_arg(node, 1, "dim", 0)) % ndim
        index: int | slice
        if name == "select":
            index = int(_arg(node, 2, "index"))
            t.values[node] = self._index(node, t.value(x), [(dim, index)], ndim)
        else:
            if name == "narrow":
                start = int(_arg(node, 2, "start"))
                index = slice(start, start + int(_arg(node, 3, "length")))
            else:
                start, end, step = _arg(node, 2, "start"), _arg(node, 3, "end"), _arg(node, 4, "step", 1)
                if any(isinstance(v, fx.Node) for v in (start, end, step)):
                    if any(dim in b.dims for b in t.value(x)):
                        raise _Refuse(f"'{node.name}' slices the channels at a size known only when it runs")
                    t.values[node] = t.value(x)
                    return True
                index = slice(start, end, step)
            t.values[node] = self._index(node, t.value(x), [(dim, index)], ndim)
        self._seen(node, name, x, t.values[node])
        return True

    def _index(self, node: fx.Node, value: Value, indices: list[tuple[int, Any]], ndim: int) -> Value:
        """``value`` indexed at ``(dim, int | slice)`` pairs; int-indexed dims are dropped."""
        dropped = [d for d, i in indices if isinstance(i, int)]
        keep = [d for d in range(ndim) if d not in dropped]
        out = []
        for blk in value:
            ids = blk.ids
            for d, index in indices:
                if d in blk.dims:
                    if isinstance(index, slice) and index.step not in (None, 1):
                        raise _Refuse(f"'{node.name}' takes every {index.step}th channel")
                    ids = take(ids, d, index)
            remaining = [d for d in blk.dims if d not in dropped]
            if set(dropped) & set(blk.dims) and not [d for d in remaining if ids.shape[d] > 1]:
                self.t.fix(ids, f"'{node.name}' takes out single channels")
            dims = tuple(keep.index(d) for d in remaining)
            ids = ids.reshape([ids.shape[d] for d in keep])
            out.append(Block(dims, ids) if dims else None)
        return blocks(out)

    def gather(self, node: fx.Node, source: Any, dim: int, index: Any) -> bool:
        """``source[..., index, ...]`` with one index tensor at ``dim``: channels there are taken by the index
        when it is a constant of the graph (a buffer), else fixed; the index's dims replace ``dim``."""
        t = self.t
        shape, after = t.shape(source), t.shape(node)
        if shape is None or after is None:
            return False
        extra = len(after) - len(shape) + 1  # dims the index brings
        constant = _tensor(t, index)
        out = []
        for blk in t.value(source):
            ids = blk.ids
            if dim in blk.dims:
                if constant is None or constant.dtype == torch.bool:
                    raise _Refuse(f"'{node.name}' picks channels with an index computed at run time")
                moved = ids.movedim(dim, 0)
                gathered = moved[constant.long().cpu()]  # (index dims..., rest)
                ids = gathered.movedim(tuple(range(extra)), tuple(range(dim, dim + extra)))
            else:
                ids = ids.reshape(ids.shape[:dim] + (1,) * extra + ids.shape[dim + 1:])
            dims = [d for d in blk.dims if d < dim] + [d + extra - 1 for d in blk.dims if d > dim]
            if dim in blk.dims:
                dims += [dim + e for e in range(extra)]
            out.append(Block(tuple(sorted(dims)), ids))
        t.values[node] = blocks(out)
        return True

    def roll(self, node: fx.Node) -> bool:
        t = self.t
        x = node.args[0]
        ndim = len(t.shape(x) or ())
        dims = _arg(node, 2, "dims")
        rolled = _dims(dims, ndim) if dims is not None and dims != [] else list(range(ndim))
        if any(d in b.dims for b in t.value(x) for d in rolled):
            raise _Refuse(f"'{node.name}' rolls the channels")
        t.values[node] = t.value(x)
        return True

    def getitem(self, node: fx.Node) -> bool:
        t = self.t
        source, index = node.args
        found = t.values.get(source) if isinstance(source, fx.Node) else None
        if isinstance(found, Many):
            t.values[node] = found[index] if isinstance(index, int) and -len(found) <= index < len(found) else ()
            return True
        shape = t.shape(source)
        if shape is None:
            return True  # an int of a size, an item of a tuple that is not followed
        items = index if isinstance(index, tuple) else (index,)
        tensors = [k for k, i in enumerate(items) if isinstance(i, (fx.Node, torch.Tensor, list))]
        if tensors:
            plain = all(i == slice(None) for k, i in enumerate(items) if k not in tensors)
            if len(tensors) == 1 and plain and isinstance(items[tensors[0]], fx.Node):
                return self.gather(node, source, tensors[0], items[tensors[0]])
            return not t.value(source)  # other advanced indexing: only of values without channels
        explicit = sum(1 for i in items if i is not None and i is not Ellipsis)
        pairs, new_dims, d, o = [], [], 0, 0
        for i in items:
            if i is Ellipsis:
                d, o = d + len(shape) - explicit, o + len(shape) - explicit
            elif i is None:
                new_dims.append(o)
                o += 1
            else:
                pairs.append((d, i))
                d, o = d + 1, o + (0 if isinstance(i, int) else 1)
        value = self._index(node, t.value(source), pairs, len(shape))
        after = t.shape(node)
        if after is None:
            return False
        where = [p for p in range(len(after)) if p not in new_dims]
        out = []
        for blk in value:
            sizes = [blk.ids.shape[where.index(p)] if p in where else 1 for p in range(len(after))]
            out.append(Block(tuple(where[e] for e in blk.dims), blk.ids.reshape(sizes)))
        t.values[node] = tuple(out)
        self._seen(node, "getitem", source, t.values[node])
        return True

    def split(self, node: fx.Node, name: str) -> bool:
        t = self.t
        x = node.args[0]
        shape = t.shape(x)
        metas = node.meta.get("tensor_meta")
        if shape is None or not isinstance(metas, (list, tuple)):
            return False
        ndim = len(shape)
        dim = int(_arg(node, 2, "dim", 0) if name != "unbind" else _arg(node, 1, "dim", 0)) % ndim
        value = t.value(x)
        outs, start = [], 0
        for meta in metas:
            size = 1 if name == "unbind" else int(meta.shape[dim])
            index: Any = start if name == "unbind" else slice(start, start + size)
            outs.append(self._index(node, value, [(dim, index)], ndim))
            start += size
        t.values[node] = Many(outs)
        self._seen(node, name, x, t.values[node])
        return True

    # -- reductions
    def reduce(self, node: fx.Node, name: str) -> bool:
        """Sums are sinks (masked before, they add what the cut model adds); means and variances over every
        channel of a block normalise them (``soft``); other reductions fix them. Over some of a block's
        dims (a head's head_dim), the block is joined along them instead: whole heads can still go."""
        t = self.t
        x = node.args[0]
        shape = t.shape(x)
        if shape is None:
            return False
        ndim = len(shape)
        if name in ("max", "min") and isinstance(_arg(node, 1, "dim"), fx.Node):
            return self.elementwise(node, _tensor_nodes(node.args))
        norm = name in ("norm", "linalg_vector_norm")
        dim = _arg(node, 2 if norm else 1, "dim")
        if isinstance(dim, fx.Node):
            return False
        reduced = _dims(dim, ndim)
        keepdim = node.kwargs.get("keepdim")
        if keepdim is None:
            position = 3 if norm or name in ("var", "std", "var_mean", "std_mean") else 2
            keepdim = _arg(node, position, "keepdim", False)
            keepdim = keepdim if isinstance(keepdim, bool) else False
        out = []
        for blk in t.value(x):
            inside = [d for d in blk.dims if d in reduced]
            if inside:
                whole = set(blk.dims) <= set(reduced)
                if whole and name in _SUM:
                    self._sink(node, 0, x, blk)
                elif whole and name in _MEAN:
                    why = f"{_module_or_node(node, name)} normalises them together (a mean over them)"
                    t.soft.append((blk.ids.reshape(-1), why))
                    self._sink(node, 0, x, blk)
                elif whole:
                    t.fix(blk.ids, f"'{node.name}' ({name}) reduces over them")
                else:
                    for d in inside:
                        t.union(blk.ids, blk.ids.narrow(d, 0, 1))
            ids = blk.ids
            for d in inside:
                ids = ids.narrow(d, 0, 1)
            kept = [d for d in range(ndim) if keepdim or d not in reduced]
            ids = ids.reshape([ids.shape[d] for d in kept])
            dims = tuple(kept.index(d) for d in blk.dims if d not in reduced)
            out.append(Block(dims, ids) if dims else None)
        value = blocks(out)
        t.values[node] = Many([value, value]) if t.shape(node) is None else value
        return True

    def along(self, node: fx.Node, name: str) -> bool:
        x = node.args[0]
        ndim = len(self.t.shape(x) or ())
        return self.along_dims(node, x, _dims(_arg(node, 1, "dim"), ndim), name)

    def along_dims(self, node: fx.Node, x: Any, dims: list[int], name: str) -> bool:
        t = self.t
        for blk in t.value(x):
            for d in dims:
                if d in blk.dims:
                    t.join_along(blk, d, f"'{node.name}' ({name}) mixes them")
        t.values[node] = t.value(x)
        return True

    # -- contractions
    def matmul(self, node: fx.Node, a: Any, b: Any, bias: Any = None) -> bool:
        """``a @ b`` (``matmul``, ``mm``, ``bmm``), plus ``bias`` for ``addmm``/``baddbmm`` (HF's Conv1D)."""
        t = self.t
        sa, sb = t.shape(a), t.shape(b)
        if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
            return False
        first = 0 if bias is None else 1
        sink_a = (first, a) if _tensor(t, a) is None else None
        sink_b = (first + 1, b) if _tensor(t, b) is None else None
        out = self._matmul(node, t.value(a), sa, t.value(b), sb, sink_a=sink_a, sink_b=sink_b)
        for tensor, dim in ((_tensor(t, a), 0), (_tensor(t, b), 1)):
            if tensor is not None:  # a weight: its free dim gives the output's channels
                t.producers.append((t.fqn_of.get(id(tensor), ""), dim if tensor.dim() == 2 else tensor.dim() - 2 + dim))
        for operand, value, free in ((a, t.value(a), len(sa) - 2), (b, t.value(b), len(sb) - 1)):
            if _tensor(t, operand) is None and _weight_behind(operand):  # x @ self.weight.T (Falcon's linear)
                for blk in value:
                    if free in blk.dims:
                        t.producers += t.spaces_of(blk.ids)
        if bias is not None:
            ndim = len(t.shape(node) or ())
            out = t.join_blocks([*out, *(align(blk, ndim) for blk in t.value(bias))])
        t.values[node] = out
        return True

    def _matmul(self, node: fx.Node, av: Value, sa: tuple, bv: Value, sb: tuple, sink_a: tuple | None = None,
                sink_b: tuple | None = None) -> Value:
        """``a @ b`` (ranks >= 2): joins the contracted dims, and everything of one batch index (an
        attention head) in both operands; the output gets a's row blocks, b's column blocks and the
        batch blocks. ``sink_a``/``sink_b``: ``(arg, node)`` of an operand that is a graph value."""
        t = self.t
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
            raise _Refuse(f"'{node.name}' multiplies a value whose rows and columns hold the same channels")
        if ak is not None and bk is not None:
            t.union(ak.ids, bk.ids.transpose(-1, -2))
        elif ak is not None and fb[row] > 1:
            t.join_along(ak, col, why)
        elif bk is not None and fa[col] > 1:
            t.join_along(bk, row, why)
        if ak is not None and sink_a is not None:
            self._sink(node, sink_a[0], sink_a[1], _unalign(ak, len(sa)))
        elif bk is not None and sink_b is not None:
            self._sink(node, sink_b[0], sink_b[1], _unalign(bk, len(sb)))
        out = []
        for blk, inner in [(blk, col) for blk in A] + [(blk, row) for blk in B]:
            if inner in blk.dims:
                if not set(blk.dims) - {inner}:
                    continue  # contracted away
                blk = Block(tuple(d for d in blk.dims if d != inner), blk.ids.narrow(inner, 0, 1))
            out.append(blk)
        return t.join_blocks(out)

    def attention(self, node: fx.Node) -> bool:
        """``scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)``:
        ``softmax(q @ kᵀ · scale + mask) @ v``, each kv head serving its group of query heads."""
        t = self.t
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
        if _arg(node, 6, "scale") is None:  # the default scale 1/sqrt(E) follows the head size
            for blk in t.value(q):
                if len(sq) - 1 in blk.dims:
                    t.join_along(blk, len(sq) - 1, f"'{node.name}' scales by 1/sqrt(head size)")
        scores = self._matmul(node, t.value(q), sq, kt, sk[:-2] + (sk[-1], sk[-2]), sink_a=(0, q))
        score_shape = sq[:-1] + (sk[-2],)
        mask = _arg(node, 3, "attn_mask")
        if isinstance(mask, fx.Node) and t.shape(mask) is not None:
            ms = align_shape(t.shape(mask), len(score_shape))
            added = [align(blk, len(score_shape)) for blk in t.value(mask)]  # a bias per head (T5's position bias)
            held = {d for blk in added for d in blk.dims}
            for blk in scores:
                for d in blk.dims:
                    if ms[d] > 1 and d not in held:
                        t.join_along(blk, d, f"'{node.name}' masks them with a value whose channels are not followed")
            if added:  # added to the scores: its channels are theirs
                scores = t.join_blocks([*scores, *added])
        t.values[node] = self._matmul(node, scores, score_shape, vv, sv)
        return True

    def spatial(self, node: fx.Node, x: Any) -> bool:
        t = self.t
        value = t.value(x)
        if any(d >= 2 for b in value for d in b.dims):
            raise _Refuse(f"'{node.name}' pools or resizes dims that hold channels")
        t.values[node] = value
        if t.shape(node) is None:
            t.values[node] = Many([value, ()])
        return True

    def pixel_shuffle(self, node: fx.Node, x: Any, factor: int, unshuffle: bool) -> bool:
        """``pixel_shuffle``: input channels ``c·r² .. c·r² + r² - 1`` become the sub-pixels of output channel
        ``c``, so they go together (one class); ``pixel_unshuffle``: each channel becomes ``r²``."""
        t = self.t
        value = t.value(x)
        if any(d != 1 for b in value for d in b.dims):
            raise _Refuse(f"'{node.name}' moves dims that hold channels into the channel dim")
        out = []
        for blk in value:
            ids = blk.ids.reshape(-1)
            if unshuffle:
                ids = ids.repeat_interleave(factor * factor)
            else:
                ids = ids.reshape(-1, factor * factor)
                t.union(ids, ids[:, :1])
                ids = ids[:, 0]
            out.append(Block((1,), broadcast_form(ids, 1, blk.ids.dim())))
        t.values[node] = tuple(out)
        return True

    def pad(self, node: fx.Node) -> bool:
        t = self.t
        x, pads = node.args[0], _arg(node, 1, "pad")
        ndim = len(t.shape(x) or ())
        padded = [ndim - 1 - i // 2 for i, p in enumerate(pads or []) if p]
        if any(d in b.dims for b in t.value(x) for d in padded):
            raise _Refuse(f"'{node.name}' pads a dim that holds channels")
        t.values[node] = t.value(x)
        return True

    def _sink(self, node: fx.Node, arg: int | str | None, source: Any, blk: Block, weight: bool = False) -> None:
        """``node``'s input ``arg`` (``source``, holding ``blk``) is multiplied by the masks; a parameter only
        when ``weight`` says so (masking a contraction's weight columns instead of its input)."""
        if arg is None or not isinstance(source, fx.Node) or (_tensor(self.t, source) is not None and not weight):
            return
        self.t.sinks.append(Sink(node.name, arg, source.name, blk.ids))

    def _seen(self, node: fx.Node, kind: str, x: Any, out: Any) -> None:
        t = self.t
        t.seen[node.name] = Seen(kind, t.value(x), out, t.shape(x) or (), node.meta.get("tensor_meta"))


class _Refuse(Exception):
    pass


def _with(shape, dim: int, size: int) -> tuple:
    shape = list(shape)
    shape[dim] = size
    return tuple(shape)


def align_shape(shape: tuple, ndim: int) -> tuple:
    return (1,) * (ndim - len(shape)) + tuple(shape)


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


_LAYOUT = frozenset("t transpose permute contiguous numpy_T".split())


def _weight_behind(node: Any) -> bool:
    """Whether ``node`` is a parameter seen through transposes only (``self.weight.T``)."""
    while isinstance(node, fx.Node) and node.op != "get_attr":
        name = _op_name(node) if node.op != "call_module" else ""
        if name == "getattr" and node.args[1] in ("T", "mT"):
            node = node.args[0]
        elif name in _LAYOUT:
            node = node.args[0]
        else:
            return False
    return isinstance(node, fx.Node)


def _tensor_nodes(args: Any) -> list[fx.Node]:
    out: list[fx.Node] = []

    def keep(node: fx.Node) -> fx.Node:
        out.append(node)
        return node

    fx.node.map_arg(args, keep)
    return out


def _followed(t: _Tracker, node: fx.Node) -> bool:
    found = t.values.get(node)
    return isinstance(found, torch.Tensor) or bool(found)


def _tensor_of(t: _Tracker, node: fx.Node, i: int, name: str) -> torch.Tensor | None:
    """The parameter or buffer given as argument ``i`` or keyword ``name``."""
    return _tensor(t, _arg(node, i, name))


def _owns_followed(t: _Tracker, node: fx.Node) -> bool:
    m = t.gm.get_submodule(str(node.target))
    return isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                          nn.ConvTranspose3d, nn.Embedding, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, *_BN))


def _module_or_node(node: fx.Node, what: str) -> str:
    """The layer a node belongs to, for messages: its module (a torch.export graph records it), else the node."""
    stack = node.meta.get("nn_module_stack")
    if node.op != "call_module" and stack:
        path, cls = list(stack.values())[-1]
        name = getattr(cls, "__name__", str(cls).rpartition(".")[2].strip("'>"))
        return f"{name} '{path}'"
    return f"{what} '{node.target}'" if node.op == "call_module" else f"'{node.name}' ({what})"


def find_channel_groups(gm: fx.GraphModule, inputs: list) -> ChannelAnalysis:
    """The channel groups of ``gm``, followed on ``inputs`` (its placeholders' values: ShapeProp runs the
    graph once on them to learn every value's shape; the caller keeps buffers and RNG as they were)."""
    ShapeProp(gm).propagate(*inputs)
    tracker = _Tracker(gm)
    rules = _Rules(tracker)
    for node in gm.graph.nodes:
        rules.run(node)
    return _solve(tracker)


def _values_blocks(t: _Tracker) -> list[Block]:
    out = []
    for value in t.values.values():
        if isinstance(value, torch.Tensor):
            continue
        out += [b for b in _flat_blocks(value) if sum(1 for d in b.dims if b.ids.shape[d] > 1) > 1]
    return out


def _grid_joins(label: torch.Tensor, found: list[Block]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A block over several dims must keep a grid (whole rows or whole columns go) for its reshapes to
    stay valid once cut: where its classes vary along more than one dim, join all but the largest."""
    joins = []
    for blk in found:
        classes = label[blk.ids]
        varying = [d for d in blk.dims if not bool((classes == classes.narrow(d, 0, 1)).all())]
        if len(varying) < 2:
            continue
        keep = max(varying, key=lambda d: (blk.ids.shape[d], -d))
        for d in varying:
            if d != keep:
                a, b = torch.broadcast_tensors(blk.ids, blk.ids.narrow(d, 0, 1))
                joins.append((a.reshape(-1), b.reshape(-1)))
    return joins


def _solve(t: _Tracker) -> ChannelAnalysis:
    label = _components(t.count, t.edges + t.fix_edges)
    multi = _values_blocks(t)
    for _ in range(16):
        joins = _grid_joins(label, multi)
        if not joins:
            break
        t.edges += joins
        label = _components(t.count, t.edges + t.fix_edges)
    fixed = int(label[FIXED])
    count, spaces = t.count, t.spaces
    by_key = {(s.fqn, s.dim): i for i, s in enumerate(spaces)}
    producers: list[int] = []
    for key in t.producers:
        if key in by_key and by_key[key] not in producers:
            producers.append(by_key[key])
    space_of = torch.full((count,), -1, dtype=torch.long)
    for i, s in enumerate(spaces):
        space_of[s.base:s.base + s.size] = i
    # producer spaces sharing a class form one group; a class belongs to the group of its producers
    is_producer = torch.zeros(len(spaces) + 1, dtype=torch.bool)
    is_producer[producers] = True
    in_producer = (label != fixed) & is_producer[space_of]
    first = torch.full((count,), len(spaces), dtype=torch.long)
    first.scatter_reduce_(0, label[in_producer], space_of[in_producer], "amin")
    links = [(torch.tensor([by_key[a]]), torch.tensor([by_key[b]])) for a, b in t.links if a in by_key and b in by_key]
    root = _components(len(spaces), [(space_of[in_producer], first[label[in_producer]]), *links])
    groups: list[ChannelGroup] = []
    index_of_root: dict[int, int] = {}
    for p in producers:
        r = int(root[p])
        if r not in index_of_root:
            index_of_root[r] = len(groups)
            groups.append(ChannelGroup(len(groups)))
        groups[index_of_root[r]].producers.append((spaces[p].fqn, spaces[p].dim))
    label_group = torch.full((count,), -1, dtype=torch.long)
    label_class = torch.full((count,), -1, dtype=torch.long)
    for g, group in enumerate(groups):
        classes: list[int] = []  # in order of first appearance, the first producer's channels first
        known: set[int] = set()
        for key in group.producers:
            s = spaces[by_key[key]]
            for lab in label[s.base:s.base + s.size].tolist():
                if lab != fixed and lab not in known:
                    known.add(lab)
                    classes.append(lab)
        lab = torch.tensor(classes, dtype=torch.long)
        label_group[lab] = g
        label_class[lab] = torch.arange(len(classes))
        group.num_classes = len(classes)
    group_of = label_group[label]
    class_of = label_class[label]
    for group in groups:
        anchor = spaces[by_key[group.anchor]]
        anchor_classes = class_of[anchor.base:anchor.base + anchor.size]
        group.fixed = int((anchor_classes < 0).sum())
        for key in group.producers:
            s = spaces[by_key[key]]
            group.classes_of[key] = class_of[s.base:s.base + s.size]
        group.channels_per_class = torch.bincount(anchor_classes[anchor_classes >= 0],
                                                  minlength=group.num_classes).tolist()
    for s in spaces:
        mine = group_of[s.base:s.base + s.size]
        for g in mine.unique().tolist():
            if g >= 0:
                groups[g].tensors.append((s.fqn, s.dim))
                held = class_of[s.base:s.base + s.size][mine == g].unique()
                if bool((mine == g).all()) and held.numel() < groups[g].num_classes and not any(
                        torch.equal(held, k) for k in groups[g].keep_one):
                    groups[g].keep_one.append(held)
    producer_group = {p: index_of_root[int(root[p])] for p in producers}
    _attach_reasons(t, groups, group_of, space_of, producer_group)
    _attach_fixed_reasons(t, groups, spaces, by_key)
    balances = _balances(t, groups, group_of, class_of)
    return ChannelAnalysis(groups, spaces, label, group_of, class_of, t.sinks, t.seen, t.grouped, balances)


def _attach_reasons(t: _Tracker, groups: list[ChannelGroup], group_of: torch.Tensor, space_of: torch.Tensor,
                    producer_group: dict[int, int]) -> None:
    def groups_of(ids: torch.Tensor) -> list[int]:
        ids = ids[ids > FIXED]
        found = {int(g) for g in group_of[ids].unique().tolist() if g >= 0}
        found |= {producer_group[s] for s in space_of[ids].unique().tolist() if s in producer_group}
        return sorted(found)

    for ids, why in t.refused:
        for g in groups_of(ids):
            groups[g].problem = groups[g].problem or why
    for ids, why in t.soft:
        for g in groups_of(ids):
            groups[g].normalized = groups[g].normalized or why


def _attach_fixed_reasons(t: _Tracker, groups: list[ChannelGroup], spaces: list[Space],
                          by_key: dict[tuple[str, int], int]) -> None:
    """Why a group has no channel left to remove: the first reason joining one of its producers' channels to
    the fixed element (followed through the joins made without it)."""
    free = _components(t.count, t.edges)
    reason = torch.full((t.count,), -1, dtype=torch.long)
    for i, (ids, _) in reversed(list(enumerate(t.fixed))):
        reason[free[ids]] = i
    for group in groups:
        if group.problem is not None or group.num_classes > 1:
            continue
        found = -1
        for key in group.producers:
            s = spaces[by_key[key]]
            hits = reason[free[s.base:s.base + s.size]]
            hits = hits[hits >= 0]
            if hits.numel():
                found = int(hits.min())
                break
        why = t.fixed[found][1] if found >= 0 else None
        if group.num_classes == 0:
            group.problem = why or "none of its channels can be removed"
        else:
            group.problem = f"all its channels go together ({why})" if why else "all its channels go together"


def _split_another_way(name: str) -> str:
    return f"grouped convolution '{name}' splits channels another way"


def _balances(t: _Tracker, groups: list[ChannelGroup], group_of: torch.Tensor,
              class_of: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per group with grouped convolutions (or a multi-layer RNN): the conv-group (layer) of each class."""
    out: dict[int, torch.Tensor] = {}
    for ids, n, why in t.balances:
        gs = [int(g) for g in group_of[ids].unique().tolist() if g >= 0]
        if len(gs) != 1 or ids.numel() % n:
            for g in gs:
                groups[g].problem = groups[g].problem or why
            continue
        (g,) = gs
        group = groups[g]
        block_of = torch.full((group.num_classes,), -1, dtype=torch.long)
        classes = class_of[ids]
        blocks_ = torch.arange(n).repeat_interleave(ids.numel() // n)
        live = classes >= 0
        block_of[classes[live]] = blocks_[live]
        high = torch.zeros(group.num_classes, dtype=torch.long)
        high.scatter_reduce_(0, classes[live], blocks_[live], "amax", include_self=False)
        low = torch.zeros(group.num_classes, dtype=torch.long)
        low.scatter_reduce_(0, classes[live], blocks_[live], "amin", include_self=False)
        counts = torch.bincount(block_of[block_of >= 0], minlength=n)
        uneven = bool((counts != counts[0]).any())  # equal numbers go from each block: each must hold as many
        clash = g in out and not torch.equal(out[g], block_of)
        if bool((block_of < 0).any()) or not torch.equal(high, low) or clash or uneven:
            group.problem = group.problem or why
            continue
        out[g] = block_of
        group.balance = n
    return out
