"""Channel analysis for structured pruning: which channels go together, masking them, cutting them out.

Every dim of a parameter (and of the running statistics a batch norm keeps per channel) is a
*space*: one *element* per channel. Every value in the graph carries, for its dims that hold
channels, the elements there (``values``: blocks of element ids). Each op's *rule* joins the
elements that must go together:

- a Linear, Conv or matmul joins its input's channels with the weight's input dim (the
  *contraction*) and gives its output the weight's output dim; an embedding gives its output the
  table's columns; a depthwise conv carries its channels; a grouped one asks for equal numbers
  from each conv-group (``contractions``, ``conv``, ``embedding``);
- elementwise ops join their operands (a residual add, a norm's weight, a gate); cat, split,
  chunk, slices, views, transposes and shuffles move elements about (``elementwise``, ``shapes``,
  ``indexing``);
- attention (``q @ kᵀ``, ``attn @ v``, ``scaled_dot_product_attention``) joins each head of q, k
  and v into one unit, and a repeat of the kv heads joins a kv head with its query heads;
- what cannot shrink is joined to the *fixed* element: channels that reach a model output, are
  added to a value that is not followed (a model input), or are reduced by an op other than a
  sum (``reductions``); a dim of several that cannot shrink (head_dim under rotary embeddings) is
  joined along itself instead, so only the other dims shrink.

``solver`` turns the joins into classes (the units pruning removes) and groups (chosen
together); ``masks`` multiplies each sink by its groups' masks and ``masked_norms`` makes each norm
or mean over masked channels average over the kept ones only; ``cut`` cuts the tensors and has
each node's rule rewrite its sizes. Rules are registered by op name, op and layer type
(``registry``); ``register_channel_rule`` adds a user's (``custom``).

Modules: ``values`` (blocks of ids), ``groups`` (the data types), ``tracker`` (the state rules
share), ``registry``, ``follow`` (the walk over the graph), ``solver``, the rules by family, ``masks``,
``masked_norms``, ``cut``, ``custom``.
"""
from . import contractions, conv, elementwise, embedding, indexing, norms, reductions, shapes  # noqa: F401 - rules
from .custom import register_channel_rule, unregister_channel_rule
from .cut import CutError, CutPlan, RewriteSizes, cut_tensors, plan_cut, update_layer_attributes
from .follow import find_channel_groups
from .groups import FIXED, ChannelAnalysis, ChannelGroup, NormSite, Seen, Sink, Space
from .masked_norms import MaskNorms
from .masks import CHANNEL_GROUPS_META, CHANNEL_MASK_META, MASKED_NORM_META, InsertChannelMasks, RemoveChannelMasks
from .registry import ChannelRule, ChannelRuleError, RuleHandle
from .tracker import Refuse, Tracker
from .values import Block, Many, Value

__all__ = [
    "find_channel_groups", "ChannelAnalysis", "ChannelGroup", "Space", "Sink", "NormSite", "Seen", "FIXED",
    "ChannelRule", "ChannelRuleError", "RuleHandle", "register_channel_rule", "unregister_channel_rule",
    "Tracker", "Refuse", "Block", "Many", "Value",
    "InsertChannelMasks", "MaskNorms", "RemoveChannelMasks", "CHANNEL_MASK_META", "CHANNEL_GROUPS_META",
    "MASKED_NORM_META",
    "CutPlan", "plan_cut", "cut_tensors", "RewriteSizes", "update_layer_attributes", "CutError",
]
