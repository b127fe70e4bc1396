"""Annotated views of a sparse GraphModule: a per-node table and the generated code.

Works at every stage of the flow:

- prepared: each ``mul(weight, weight_mask)`` node shows its tensor, the configured level
  and block, and the fraction of zeros actually in the mask;
- squashed: the ``get_attr`` of each configured tensor shows the zeros folded into it;
- lowered: each ``call_module`` of a module carrying ``fx_sparsity_info`` shows what it
  was lowered to and the fraction of zeros in its stored weight.

The configured level and block come from ``gm.fx_sparsity_config`` (the sparsifier's
live groups, set by ``prepare_fx_sparse``), so a scheduler's current level is what prints.
"""
from __future__ import annotations

import copy
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import fx, nn
from torch.fx.graph import dtype_abbrs
from torch.fx.node import _get_qualified_name
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from .config import sparsity_config
from .inputs import graph_inputs
from .passes import INFO_ATTR, fetch_attr, find_masked_uses
from .passes.attrs import get_submodule
from .passes.channels import CHANNEL_GROUPS_META, MASKED_NORM_META
from .scoping import capture_inputs, graph_parts

__all__ = ["format_sparse_graph", "print_sparse_graph", "format_sparse_code"]


@dataclass
class _Note:
    """What the table says about one node."""

    tensor_fqn: str
    zeros: float | None  # fraction of zeros actually stored (mask, folded weight or lowered weight)
    stage: str  # "masked", "folded" or "lowered"
    lowered_to: str = ""


@dataclass
class _Tensor:
    """One sparsified tensor, counted once in the footer however many nodes use it."""

    numel: int
    zeros: int
    stage: str


def _zeros(t: torch.Tensor) -> int:
    return t.numel() - int(torch.count_nonzero(t))


def _tensor_bytes(t: torch.Tensor) -> int:
    if t.layout in (torch.sparse_csr, torch.sparse_bsr, torch.sparse_csc, torch.sparse_bsc):
        compressed = t.crow_indices() if t.layout in (torch.sparse_csr, torch.sparse_bsr) else t.ccol_indices()
        plain = t.col_indices() if t.layout in (torch.sparse_csr, torch.sparse_bsr) else t.row_indices()
        return sum(_tensor_bytes(x) for x in (t.values(), compressed, plain))
    if t.layout == torch.sparse_coo:
        t = t.coalesce()
        return _tensor_bytes(t.values()) + _tensor_bytes(t.indices())
    return t.numel() * t.element_size()


def _nbytes(obj: Any, seen: set[int]) -> int:
    """Bytes of the tensors in a state_dict value (quantized packed params are tuples)."""
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return _tensor_bytes(obj)
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(x, seen) for x in obj.values())
    return 0


def _state_bytes(module: nn.Module) -> int:
    seen: set[int] = set()
    # Tied parameters appear under every name in a state_dict; count the storage once.
    ptrs: set[tuple[int, int]] = set()
    total = 0
    for value in module.state_dict().values():
        if isinstance(value, torch.Tensor) and value.layout == torch.strided and not value.is_quantized:
            key = (value.data_ptr(), value.numel())
            if key in ptrs:
                continue
            ptrs.add(key)
        total += _nbytes(value, seen)
    return total


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _target(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(str(node.target))).__name__})"
    if node.op == "call_function":
        target = node.target
        name = getattr(target, "__name__", None)
        if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
            return str(target)
        if name and getattr(F, name, None) is target:
            return f"F.{name}"
        if name and getattr(torch, name, None) is target:
            return f"torch.{name}"
        return _get_qualified_name(target) if callable(target) else str(target)
    if node.op == "output":
        return ""
    return str(node.target)


def _describe_meta(meta: Any) -> str:
    if isinstance(meta, TensorMetadata):
        dtype = dtype_abbrs.get(meta.dtype, str(meta.dtype).removeprefix("torch."))
        return f"{dtype}[{', '.join(str(d) for d in meta.shape)}]"
    if isinstance(meta, (tuple, list)):
        inner = ", ".join(_describe_meta(m) for m in meta)
        return f"({inner},)" if isinstance(meta, tuple) and len(meta) == 1 else f"({inner})"
    if isinstance(meta, dict):
        return "{" + ", ".join(f"{k}: {_describe_meta(v)}" for k, v in meta.items()) + "}"
    return ""


def _shapes(gm: fx.GraphModule, example_inputs: Any) -> dict[str, str]:
    """``node name -> "f32[8, 32]"``, from ShapeProp run on a copy (the user's graph, RNG and buffers
    stay as they are)."""
    args = graph_inputs(gm, example_inputs)
    with warnings.catch_warnings():
        # torch's own deprecation notices, raised by copying export's pytree specs and quantized weights
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=r"(?s).*(TypedStorage|quantize_per_tensor).*deprecated",
                                category=UserWarning)
        work = copy.deepcopy(gm)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            ShapeProp(work).propagate(*args)
    except Exception as e:
        cause = e.__cause__ or e
        raise RuntimeError(
            f"format_sparse_graph: the example inputs do not run through the graph ({type(cause).__name__}: "
            f"{cause}). Pass example_inputs the module accepts, as a tuple or a dict of keyword inputs (a "
            f"torch.export graph takes other sizes only in its dynamic dims, e.g. batch), or leave them out to "
            f"print without shapes.") from e
    return {node.name: _describe_meta(node.meta.get("tensor_meta")) for node in work.graph.nodes}


def _lowered_info(gm: fx.GraphModule, node: fx.Node) -> dict | None:
    if node.op != "call_module":
        return None
    info = getattr(get_submodule(gm, node), INFO_ATTR, None)
    if info is None:
        meta = node.meta.get("sparsity")
        info = meta if isinstance(meta, dict) and "lowered_to" in meta else None
    return info


def _dense_numel(module: nn.Module) -> tuple[int, int]:
    """(weight, bias) element counts of the float Linear a lowered module replaced."""
    out_f, in_f = getattr(module, "out_features", None), getattr(module, "in_features", None)
    if out_f is None or in_f is None:
        return 0, 0
    bias = getattr(module, "bias", None)
    if callable(bias) and not isinstance(bias, nn.Module):
        bias = bias()
    return out_f * in_f, out_f if isinstance(bias, torch.Tensor) else 0


def _collect(gm: fx.GraphModule) -> tuple[dict[fx.Node, _Note], dict[str, _Tensor], dict[str, torch.Tensor]]:
    notes: dict[fx.Node, _Note] = {}
    tensors: dict[str, _Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for use in find_masked_uses(gm):
        mask = masks.setdefault(use.mask_fqn, fetch_attr(gm, use.mask_fqn))
        zeros = _zeros(mask)
        notes[use.mul] = _Note(use.tensor_fqn, zeros / max(mask.numel(), 1), "masked")
        tensors[use.tensor_fqn] = _Tensor(mask.numel(), zeros, "masked")

    # Structured pruners: a sink's input multiplied by channel masks (one entry per class of a group).
    for node in gm.graph.nodes:
        for mask_fqn in node.meta.get("channel_mask") or ():
            mask = fetch_attr(gm, mask_fqn)
            group = (node.meta.get(CHANNEL_GROUPS_META) or {}).get(mask_fqn)
            kept_classes = mask != 0
            owner = mask_fqn.rpartition(".")[0]
            if group is not None and not group.anchor[0].endswith(".weight") and group.anchor[0] != "weight":
                owner = group.anchor[0]
            elif group is not None and not owner:  # a mask another unit holds (a group across the blocks)
                owner = group.anchor[0].rpartition(".")[0]
            counted = _channels_kept(group, mask) if group is not None else None
            if group is not None and counted is not None:
                kept, total = counted
                units = ("" if set(group.channels_per_class) == {1} else
                         f", {int(kept_classes.sum())}/{mask.numel()} units")
                text = f"group {group.index}, channels of {owner}: {kept}/{total} kept{units}"
            else:
                kept, total = int(kept_classes.sum()), mask.numel()
                text = f"channels of {owner}: {kept}/{total} kept"
            previous = notes.get(node)
            notes[node] = _Note(f"{previous.tensor_fqn}; {text}" if previous else text,
                                1 - kept / max(total, 1), "channels")
        masked_norm = node.meta.get(MASKED_NORM_META)
        if masked_norm:  # a norm or mean over masked channels, rewritten to average over the kept ones only
            notes[node] = _Note(f"masked norm: {masked_norm['note']}", None, "channels")

    # Squashed: configured tensors without a mask hold their zeros themselves.
    config = sparsity_config(gm)
    folded: dict[int, str] = {}
    for fqn in config:
        if fqn in tensors:
            continue
        try:
            tensor = fetch_attr(gm, fqn)
        except AttributeError:  # lowered away
            continue
        if isinstance(tensor, torch.Tensor):
            folded[id(tensor)] = fqn
    for node in gm.graph.nodes:
        if node.op == "get_attr" and folded:
            try:
                tensor = fetch_attr(gm, node.target)
            except AttributeError:
                continue
            folded_fqn = folded.get(id(tensor))
            if folded_fqn is not None:
                zeros = _zeros(tensor)
                notes[node] = _Note(folded_fqn, zeros / max(tensor.numel(), 1), "folded")
                tensors[folded_fqn] = _Tensor(tensor.numel(), zeros, "folded")
        info = _lowered_info(gm, node)
        if info is not None:
            fqn = str(info.get("tensor_fqn", node.target))
            lowered_to = str(info.get("lowered_to", ""))
            extras = [str(info["format"])] if info.get("format") else []
            if isinstance(info.get("speedup_vs_dense"), (int, float)):
                extras.append(f"speedup {info['speedup_vs_dense']:.2f}x")
            if info.get("dense_weight_kept"):
                extras.append("dense weight kept: other nodes read it")
            if info.get("detail"):
                extras.append(str(info["detail"]))
            if extras:
                lowered_to += f" ({'; '.join(extras)})"
            sparsity = info.get("weight_sparsity")
            notes[node] = _Note(fqn, sparsity, "lowered", lowered_to)
            numel, _ = _dense_numel(gm.get_submodule(node.target))
            tensors.setdefault(fqn, _Tensor(numel, round((sparsity or 0.0) * numel), "lowered"))
    return notes, tensors, masks


def _level(group: dict | None) -> str:
    if not group or group.get("sparsity_level") is None:
        return ""
    return _pct(float(group["sparsity_level"]))


def _block(group: dict | None) -> str:
    if not group:
        return ""
    if group.get("sparse_block_shape") is not None:
        return "x".join(str(d) for d in group["sparse_block_shape"])
    if group.get("n") is not None and group.get("m") is not None:
        return f"{group['n']}:{group['m']}"
    return ""


def _lowered_modules(gm: fx.GraphModule) -> dict[str, nn.Module]:
    return {str(node.target): gm.get_submodule(str(node.target)) for node in gm.graph.nodes
            if _lowered_info(gm, node) is not None}


def _footer(gm: nn.Module, lowered: dict[str, nn.Module], tensors: dict[str, _Tensor],
            masks: dict[str, torch.Tensor]) -> list[str]:
    # A lowered module may keep float parameters (a dense fallback); count those once, as lowered.
    lowered_ids = {id(p) for m in lowered.values() for p in m.parameters()}
    dense_params = sum(p.numel() for p in gm.parameters() if id(p) not in lowered_ids)
    lowered_numel = [_dense_numel(m) for m in lowered.values()]
    total = dense_params + sum(w + b for w, b in lowered_numel)
    sparsified = sum(t.numel for t in tensors.values())
    zeros = sum(t.zeros for t in tensors.values())
    lines = [f"parameters: {total:,} total, {sparsified:,} in {len(tensors)} sparsified tensor"
             f"{'' if len(tensors) == 1 else 's'}"
             + (" (lowered layers counted as their dense weights)" if lowered else "")]
    if tensors:
        lines.append(f"zeros: {zeros:,} = {_pct(zeros / max(sparsified, 1))} of sparsified, "
                     f"{_pct(zeros / max(total, 1))} of all parameters")
    if masks:
        dtypes = sorted({dtype_abbrs.get(m.dtype, str(m.dtype)) for m in masks.values()})
        mask_bytes = sum(m.numel() * m.element_size() for m in masks.values())
        lines.append(f"mask memory: {_human_bytes(mask_bytes)} in {len(masks)} buffer"
                     f"{'' if len(masks) == 1 else 's'} ({', '.join(dtypes)})")
    elif tensors and not lowered:
        lines.append("mask memory: 0 B (masks folded into the weights)")
    now = _state_bytes(gm)
    if lowered:
        stored = sum(_state_bytes(m) for m in lowered.values())
        dense = sum(4 * (w + b) for w, b in lowered_numel)
        lines.append(f"model bytes (state_dict): {_human_bytes(now - stored + dense)} with the "
                     f"{len(lowered)} lowered layer{'' if len(lowered) == 1 else 's'} as dense float32 -> "
                     f"{_human_bytes(now)} lowered ({now / max(now - stored + dense, 1):.2f}x)")
    else:
        lines.append(f"model bytes (state_dict): {_human_bytes(now)}"
                     + (" including masks" if masks else ""))
    return lines


def format_sparse_graph(gm: nn.Module, *, example_inputs: Any = None) -> str:
    """The annotated graph: a table with one row per node, in graph order, and a footer.

    Columns: node name, op, target, output shape and dtype (only with ``example_inputs``,
    propagated with torch.fx's ``ShapeProp`` on a copy of ``gm``), the sparsified tensor,
    its configured level and block, the fraction of zeros actually stored, and what the
    node was lowered to. The footer counts parameters and zeros (each tensor once, tied
    uses included), mask memory, and ``state_dict`` bytes (before/after for lowered modules).

    For a model prepared with ``scope="layers"`` or a block scope, each of its graph modules
    is a section of the one table (a ``[fqn]`` row, then its nodes, tensors named as in the
    model), and the footer counts the whole model.
    """
    parts = graph_parts(gm)
    if not parts:
        raise TypeError(
            f"format_sparse_graph expects a torch.fx.GraphModule (what prepare_fx_sparse, squash_mask and "
            f"convert_fx_sparse return) or a model prepared with a scope, got {type(gm).__name__}; prepare the "
            f"model first: fx_sparsity.prepare_fx_sparse(model, sparsifier)")
    scoped = parts != [("", gm)]
    if example_inputs is None:
        inputs: dict[str, Any] = {}
    elif scoped:
        inputs = capture_inputs(gm, [fqn for fqn, _ in parts], example_inputs)
    else:
        inputs = {"": example_inputs}
    headers = ["node", "op", "target"] + (["shape"] if example_inputs is not None else []) + [
        "sparse tensor", "level", "block", "zeros", "lowered to"]
    rows: list[list[str]] = []
    tensors: dict[str, _Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    lowered: dict[str, nn.Module] = {}
    for prefix, part in parts:
        if scoped:
            rows.append([f"[{prefix}]", "graph", type(part).__name__] + [""] * (len(headers) - 3))
        shapes = _shapes(part, inputs[prefix]) if example_inputs is not None else None
        notes, part_tensors, part_masks = _collect(part)
        config = sparsity_config(part)

        def model_fqn(fqn: str) -> str:
            group = config.get(fqn)
            return group["tensor_fqn"] if scoped and group else (f"{prefix}.{fqn}" if prefix else fqn)

        tensors.update({model_fqn(fqn): t for fqn, t in part_tensors.items()})
        for fqn, mask in part_masks.items():  # a tied tensor's mask counts once
            if not any(mask is m for m in masks.values()):
                masks[f"{prefix}.{fqn}" if prefix else fqn] = mask
        lowered.update({f"{prefix}.{fqn}" if prefix else fqn: m for fqn, m in _lowered_modules(part).items()})
        for node in part.graph.nodes:
            note = notes.get(node)
            group = config.get(note.tensor_fqn) if note else None
            row = [node.name, node.op, _target(part, node)]
            if shapes is not None:
                row.append(shapes.get(node.name, ""))
            if note is None:
                row += ["", "", "", "", ""]
            else:
                tensor = model_fqn(note.tensor_fqn) + (" (folded)" if note.stage == "folded" else "")
                row += [tensor, _level(group), _block(group), _pct(note.zeros), note.lowered_to]
            rows.append(row)
    table = tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)
    footer = _footer(gm, lowered, tensors, masks) + _channel_footer([part for _, part in parts])
    return table + "\n\n" + "\n".join(footer)


def _channels_kept(group: Any, mask: torch.Tensor) -> tuple[int, int] | None:
    """(kept, total) channels of a channel group's first producer under ``mask`` (one entry per class)."""
    per_class = torch.tensor(group.channels_per_class, dtype=torch.long)
    if per_class.numel() != mask.numel():
        return None
    return int(per_class[(mask != 0).cpu()].sum()) + group.fixed, int(per_class.sum()) + group.fixed


def _channel_footer(parts: list[fx.GraphModule]) -> list[str]:
    """One line for structured pruners: how many channel groups are masked and how many channels they keep."""
    counts: dict[int, tuple[int, int]] = {}
    for part in parts:
        for node in part.graph.nodes:
            for mask_fqn, group in (node.meta.get(CHANNEL_GROUPS_META) or {}).items():
                mask = fetch_attr(part, mask_fqn)
                counted = _channels_kept(group, mask)
                if counted is not None:
                    counts[id(mask)] = counted
    if not counts:
        return []
    kept, total = sum(k for k, _ in counts.values()), sum(t for _, t in counts.values())
    return [f"channel groups: {len(counts)} masked, {kept:,} of their {total:,} channels kept "
            f"({_pct(1 - kept / max(total, 1))} to cut; prune() removes them)"]


def print_sparse_graph(gm: nn.Module, *, example_inputs: Any = None, file: TextIO | None = None) -> None:
    """Print :func:`format_sparse_graph` to ``file`` (default: stdout)."""
    print(format_sparse_graph(gm, example_inputs=example_inputs), file=file or sys.stdout)


_STACK_COMMENT = re.compile(r"^\s*# (File: |No stacktrace found)")


def format_sparse_code(gm: fx.GraphModule, *, stack_traces: bool = False) -> str:
    """``gm.print_readable()`` with each mask, folded-weight and lowered line marked ``# <-``.

    Source-location comments that torch.export adds are dropped unless ``stack_traces``.
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"format_sparse_code expects a torch.fx.GraphModule, got {type(gm).__name__}")
    notes, _, _ = _collect(gm)
    config = sparsity_config(gm)
    marks = {}
    for node, note in notes.items():
        group = config.get(note.tensor_fqn)
        what = {"masked": "mask", "folded": "folded", "lowered": f"lowered to {note.lowered_to}"}.get(note.stage,
                                                                                                  note.stage)
        extra = ", ".join(x for x in (f"level {_level(group)}" if _level(group) else "", _block(group)) if x)
        if note.zeros is None:  # a note only (a masked norm)
            marks[node.name] = f"  # <- {note.tensor_fqn}"
            continue
        marks[node.name] = (f"  # <- {what} {note.tensor_fqn}: {_pct(note.zeros)} zeros"
                            + (f" ({extra})" if extra else ""))
    code = gm.print_readable(print_output=False)
    out: list[str] = []
    for line in code.splitlines():
        line = line.rstrip()
        if not stack_traces and _STACK_COMMENT.match(line):
            if out and not out[-1]:
                out.pop()  # the blank line that separated the comment
            continue
        # Top-level forward statements are indented 8 spaces; nested submodule classes deeper.
        m = re.match(r"^ {8}(\w+)\s*(?::\s*\"[^\"]*\"\s*)?=", line)
        if m and m.group(1) in marks:
            line += marks.pop(m.group(1))
        out.append(line)
    return "\n".join(out).rstrip() + "\n"
