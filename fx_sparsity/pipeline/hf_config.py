"""Attributes users read, kept true after heads and widths are cut: attention modules' head counts and a
Hugging Face model's ``config`` (so ``save_pretrained`` writes a config ``from_pretrained`` rebuilds).

Attention modules are recognised by their projections (``q_proj``/``query``/``q``, ``k_proj``/
``key``/``k``) and a head size attribute (``head_dim`` or ``attention_head_size``); MLPs by
``up_proj``/``gate_proj``/``fc1``/``dense_h_to_4h``/``wi``/``lin1``/``intermediate.dense``.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, cast

import torch
from torch import nn

from ..errors import warn_user
from ..nn.attention import PrunedMultiheadAttention

__all__ = ["update_attention_attributes", "update_config"]

_Q = ("q_proj", "query", "q", "q_lin")
_K = ("k_proj", "key", "k", "k_lin")
_HEADS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")


def _linear_child(module: nn.Module, names: tuple[str, ...]) -> nn.Linear | None:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Linear):
            return child
    return None


def _head_size(module: nn.Module) -> int | None:
    for name in ("head_dim", "attention_head_size"):
        value = getattr(module, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _fused_width(module: nn.Module) -> int | None:
    """GPT-2's attention: one fused ``c_attn`` (HF ``Conv1D``, ``nf`` outputs) for q, k and v."""
    fused = getattr(module, "c_attn", None)
    nf = getattr(fused, "nf", None)
    return nf // 3 if isinstance(nf, int) and isinstance(getattr(module, "split_size", None), int) else None


def _attention_counts(module: nn.Module) -> tuple[int, int | None] | None:
    """(query heads, kv heads) of an attention module, from its projections' sizes."""
    q, k, size = _linear_child(module, _Q), _linear_child(module, _K), _head_size(module)
    if size is None:
        return None
    width = q.out_features if q is not None else _fused_width(module)
    if width is None or width % size:
        return None
    if q is None:
        return width // size, width // size
    return width // size, (k.out_features // size if k is not None and k.out_features % size == 0 else None)


def _shrink_multihead_attention(m: nn.MultiheadAttention) -> None:
    """An ``nn.MultiheadAttention`` whose tensors were cut: its fields from them, and, when it has fewer heads
    than its width implies, the class that can hold them (``PrunedMultiheadAttention``)."""
    q_rows = m.in_proj_weight.shape[0] // 3 if m._qkv_same_embed_dim else m.q_proj_weight.shape[0]
    m.embed_dim = m.out_proj.out_features
    if not m._qkv_same_embed_dim:
        m.kdim, m.vdim = m.k_proj_weight.shape[1], m.v_proj_weight.shape[1]
    else:
        m.kdim = m.vdim = m.embed_dim
    if q_rows != m.num_heads * m.head_dim:
        m.num_heads = q_rows // m.head_dim
    if m.num_heads * m.head_dim != m.embed_dim:
        m.__class__ = PrunedMultiheadAttention
    else:
        m.head_dim = m.embed_dim // m.num_heads


def update_attention_attributes(root: nn.Module) -> None:
    """Set head-count attributes of attention modules (and ``all_head_size``, ``intermediate_size``) from their
    projections, after a cut; an ``nn.MultiheadAttention`` with fewer heads becomes a ``PrunedMultiheadAttention``."""
    for module in root.modules():
        if isinstance(module, nn.MultiheadAttention):
            _shrink_multihead_attention(module)
    for module in root.modules():
        weight = getattr(module, "weight", None)
        if isinstance(getattr(module, "nf", None), int) and isinstance(weight, torch.Tensor) and weight.dim() == 2:
            cast(Any, module).nf = weight.shape[1]  # HF's Conv1D: a Linear with its weight transposed
    for module in root.modules():
        counts = _attention_counts(module)
        if counts is not None:
            heads, kv = counts
            for name in _HEADS:
                if isinstance(getattr(module, name, None), int):
                    setattr(module, name, heads)
            for name in _KV_HEADS:
                if kv is not None and isinstance(getattr(module, name, None), int):
                    setattr(module, name, kv)
            if _fused_width(module) is not None:
                cast(Any, module).split_size = _fused_width(module)
            if isinstance(getattr(module, "all_head_size", None), int):
                cast(Any, module).all_head_size = heads * (_head_size(module) or 0)
            if kv is not None and isinstance(getattr(module, "num_key_value_groups", None), int) and kv:
                cast(Any, module).num_key_value_groups = heads // kv
        up = _linear_child(module, ("up_proj", "gate_proj", "fc1"))
        if up is not None and isinstance(getattr(module, "intermediate_size", None), int):
            cast(Any, module).intermediate_size = up.out_features


def _intermediate(module: nn.Module, name: str) -> int | None:
    up = _linear_child(module, ("up_proj", "gate_proj", "fc1", "dense_h_to_4h", "wi", "lin1", "fc_in", "c_fc"))
    if up is not None:
        return up.out_features
    fused = _linear_child(module, ("gate_up_proj",))  # Phi-3: gate and up in one projection
    if fused is not None:
        return fused.out_features // 2
    if name.endswith("intermediate"):
        dense = _linear_child(module, ("dense",))
        return dense.out_features if dense is not None else None
    return None


_INTERMEDIATE = ("intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "n_inner", "d_ff", "hidden_dim")


_HIDDEN = ("hidden_size", "n_embd", "d_model", "dim", "embed_dim")


def _hidden_width(model: nn.Module, config: Any) -> int | None:
    """The hidden width of a Hugging Face model whose input embeddings were cut (None when it was not)."""
    embeddings = getattr(model, "get_input_embeddings", None)
    try:
        layer = embeddings() if callable(embeddings) else None
    except Exception:  # a model without input embeddings
        return None
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    width = int(weight.shape[1])
    said = [getattr(config, n) for n in _HIDDEN if isinstance(getattr(config, n, None), int)]
    return width if said and width not in said else None


def _rebuilt_mismatches(model: nn.Module, config: Any) -> list[str] | None:
    """The tensors whose shapes a model built from ``config`` (on the meta device) would not have; None when
    the config cannot build one here."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            twin = type(model)(copy.deepcopy(config))
    except Exception:
        return None
    theirs = {k: tuple(v.shape) for k, v in twin.state_dict().items()}
    return [f"{k} {tuple(v.shape)} (from the config: {theirs[k]})" for k, v in model.state_dict().items()
            if k in theirs and tuple(v.shape) != theirs[k]]


def update_config(model: nn.Module) -> None:
    """A Hugging Face model's config after a cut: the hidden size (``hidden_size``, ``n_embd``, ``d_model``: the
    input embeddings' width), ``num_attention_heads``, ``num_key_value_heads`` (with ``head_dim``, so the head size
    stays) and the MLP width (``intermediate_size``, ``ffn_dim``, ...), when every layer has the same new size.
    Each change is kept if a model built from the config (on the meta device) has more of the cut shapes (the
    hidden size with the head counts and size at once); a warning names the tensors the config still cannot
    describe."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    heads, kvs, sizes, inter, head_sizes = set(), set(), set(), set(), set()
    for name, module in model.named_modules():
        counts = _attention_counts(module)
        if counts is not None:
            heads.add(counts[0])
            kvs.add(counts[1])
            sizes.add(_head_size(module))
        width = _intermediate(module, name)
        if width is not None:
            inter.add(width)
        if "Attention" in type(module).__name__ and _head_size(module) is not None:
            head_sizes.add(_head_size(module))
    unsaid: list[str] = []
    changes: list[tuple[dict[str, Any], str]] = []
    if len(heads) == 1 and (h := next(iter(heads))) != getattr(config, "num_attention_heads", h):
        head: dict[str, Any] = {"num_attention_heads": h}
        if hasattr(config, "head_dim") or getattr(config, "hidden_size", 0) // h != next(iter(sizes)):
            head["head_dim"] = next(iter(sizes))
        changes.append((head, f"num_attention_heads={h} (the config derives the head size from hidden_size)"))
    elif len(heads) > 1:
        unsaid.append(f"a different number of heads per layer {sorted(heads)}")
    if len(kvs) == 1 and (kv := next(iter(kvs))) is not None and hasattr(config, "num_key_value_heads"):
        changes.append(({"num_key_value_heads": kv}, f"num_key_value_heads={kv}"))
    if len(inter) == 1:
        width = next(iter(inter))
        names = [n for n in _INTERMEDIATE if hasattr(config, n) and (getattr(config, n) is None or isinstance(
            getattr(config, n), int))] or ["intermediate_size"]  # (GPT-2's n_inner is None: 4 × the width)
        changes.append(({n: width for n in names}, f"an MLP width of {width}"))
    elif len(inter) > 1:
        unsaid.append(f"a different intermediate size per layer {sorted(inter)}")
    hidden = _hidden_width(model, config)
    if hidden is not None:  # with the head counts and size at once: the config may derive one from the others
        geometry: dict[str, Any] = {n: hidden for n in _HIDDEN if isinstance(getattr(config, n, None), int)
                                    and not isinstance(getattr(config, n), bool)}
        for change, _ in changes:
            if "num_attention_heads" in change or "num_key_value_heads" in change:
                geometry.update(change)
        count = geometry.get("num_attention_heads", getattr(config, "num_attention_heads", None))
        if len(head_sizes) == 1 and isinstance(count, int) and count and (
                hasattr(config, "head_dim") or hidden // count != next(iter(head_sizes))):
            geometry["head_dim"] = next(iter(head_sizes))
        changes.insert(0, (geometry, f"a hidden size of {hidden}"))
    left = _rebuilt_mismatches(model, config)
    if left == []:  # the config already builds every cut shape (nothing it says was cut)
        return
    for change, what in changes:
        if all(hasattr(config, k) and getattr(config, k) == v for k, v in change.items()):
            continue  # already said (with the hidden size)
        before = {k: getattr(config, k) for k in change if hasattr(config, k)}
        if any(isinstance(v, (list, tuple)) for v in before.values()):  # a size per stage (SegFormer): not this
            unsaid.append(what)
            continue
        try:
            for k, v in change.items():
                setattr(config, k, v)
            now = _rebuilt_mismatches(model, config) if left is not None else None
            taken = left is None or now is None or len(now) < len(left)
        except Exception:  # a config that validates its fields
            taken, now = False, None
        if taken:
            left = now if now is not None else left
            continue
        for k in change:  # the config does not read it: put back what it said
            if k in before:
                setattr(config, k, before[k])
            elif hasattr(config, k):
                delattr(config, k)
        unsaid.append(what)
    if unsaid or left:
        shapes = f" ({len(left)} tensors, e.g. {left[:2]})" if left else ""
        hint = (" The hidden size was cut too; prune_normalized=False (SaliencyPruner/FPGMPruner) keeps it"
                if hidden is not None else "")
        warn_user(f"prune(): {type(model).__name__}.config cannot describe {'; '.join(unsaid) or 'the cut sizes'}"
                  f"{shapes}: from_pretrained would rebuild the original sizes. Save the pruned model with "
                  f"torch.save(model) (or its state_dict with the code that builds it).{hint}")
