"""compressed-tensors' sparse checkpoint formats: ``save_compressed`` writes them, ``load_compressed`` reads them.

A pruned Hugging Face model saved with its zeros stored: each compressed ``nn.Linear`` weight
``<module>.weight`` is replaced by the tensors compressed-tensors (≤ 0.14, whose compressors wrote
them) defines for the format, under the module's name:

- ``sparse-bitmask``: ``<module>.compressed`` (the nonzero values, row by row, 1-D),
  ``<module>.bitmask`` (uint8, ``rows × ceil(cols / 8)``, bit ``j % 8`` of byte ``j // 8`` set where
  column ``j`` is nonzero: ``numpy.packbits(..., bitorder="little")``), ``<module>.row_offsets``
  (int64, where each row starts in ``compressed``) and ``<module>.shape`` (int64 ``[rows, cols]``);
- ``sparse-24-bitmask``: ``<module>.compressed`` (``rows × cols / 2``: the two kept values of every
  four), ``<module>.bitmask`` (as above) and ``<module>.shape`` (int64, ``2 × 1``).

``config.json`` gets ``quantization_config = {"quant_method": "compressed-tensors", "version": ...,
"sparsity_config": {format, targets, ignore, global_sparsity, sparsity_structure, ...}}``, the
sparsity config built by compressed-tensors' own config classes (``BitmaskConfig``,
``Sparse24BitMaskConfig``).

compressed-tensors 0.15 and later (and transformers 5, which needs them) dropped the sparse
compressors: they keep the config classes but no longer compress or decompress these formats, and
``from_pretrained`` on such a checkpoint leaves the compressed layers uninitialised.
:func:`load_compressed` reads them (and dense checkpoints, such as llm-compressor's pruned output
today) into the model, dense, with its zeros.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import SparsityConfigError
from .pretrained import (
    INDEX_NAME,
    CheckpointError,
    Lazy,
    TensorSlots,
    checkpoint_index,
    empty_model,
    read_tensors,
    write_safetensors,
)

__all__ = ["save_compressed", "load_compressed", "FORMATS", "pack_bitmask", "unpack_bitmask",
           "compress_weight", "decompress_weight"]

FORMATS = ("sparse-bitmask", "sparse-24-bitmask")
_PARTS = {"sparse-bitmask": ("shape", "compressed", "bitmask", "row_offsets"),
          "sparse-24-bitmask": ("shape", "compressed", "bitmask")}
_BITS = 1 << torch.arange(8, dtype=torch.uint8)


# -- one weight ----------------------------------------------------------------------------------

def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """A 2-D bool mask as uint8 bytes, 8 columns a byte, the first in the lowest bit (``rows × ceil(cols / 8)``)."""
    rows, cols = mask.shape
    padded = torch.zeros(rows, -(-cols // 8) * 8, dtype=torch.uint8)
    padded[:, :cols] = mask
    return (padded.view(rows, -1, 8) * _BITS).sum(-1, dtype=torch.uint8)


def unpack_bitmask(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The bool mask :func:`pack_bitmask` packed."""
    rows, cols = shape
    bits = packed.to(torch.uint8).unsqueeze(-1).bitwise_and(_BITS).ne(0)
    return bits.reshape(rows, -1)[:, :cols]


def _keep_24(weight: torch.Tensor) -> torch.Tensor:
    """Two positions of every four along a row: the two largest magnitudes (compressed-tensors' rule; on a 2:4
    weight, its nonzeros and, where a group has fewer than two, zeros to make up the count)."""
    groups = weight.reshape(-1, 4)
    keep = torch.zeros(groups.shape, dtype=torch.bool)
    keep.scatter_(1, groups.abs().topk(2, dim=1).indices, True)
    return keep.view(weight.shape)


def is_24(weight: torch.Tensor) -> bool:
    """At most two nonzeros in every four consecutive inputs of a 2-D weight (its columns a multiple of 4)."""
    return (weight.dim() == 2 and weight.shape[1] % 4 == 0
            and bool(((weight != 0).view(-1, 4).sum(-1) <= 2).all()))


def compress_weight(weight: torch.Tensor, format: str) -> dict[str, torch.Tensor]:
    """``{part: tensor}`` of a 2-D weight in ``format`` (:data:`FORMATS`); exact (decompresses to ``weight``)."""
    weight = weight.detach().cpu()
    rows, cols = weight.shape
    if format == "sparse-bitmask":
        keep = weight != 0
        counts = keep.sum(-1)
        return {"shape": torch.tensor([rows, cols]), "compressed": weight[keep], "bitmask": pack_bitmask(keep),
                "row_offsets": torch.cumsum(counts, 0) - counts}
    if not is_24(weight):
        raise SparsityConfigError(f"sparse-24-bitmask stores two values of every four: a weight of shape "
                                  f"{tuple(weight.shape)} that is not 2:4 cannot be stored exactly")
    keep = _keep_24(weight)
    return {"shape": torch.tensor([rows, cols]).reshape(-1, 1), "compressed": weight[keep].view(rows, cols // 2),
            "bitmask": pack_bitmask(keep)}


def decompress_weight(parts: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight of ``parts`` (either format: both store ``shape``, ``compressed`` and ``bitmask``)."""
    rows, cols = (int(v) for v in parts["shape"].flatten().tolist())
    values = parts["compressed"].flatten()
    dense = torch.zeros(rows, cols, dtype=dtype or values.dtype)
    dense[unpack_bitmask(parts["bitmask"], (rows, cols))] = values.to(dense.dtype)
    return dense


def _compressed_bytes(weight: torch.Tensor, format: str) -> int:
    rows, cols = weight.shape
    values = int(torch.count_nonzero(weight)) if format == "sparse-bitmask" else rows * cols // 2
    extra = rows * 8 if format == "sparse-bitmask" else 0
    return values * weight.element_size() + rows * (-(-cols // 8)) + extra + 16


def _part_specs(weight: torch.Tensor, format: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    rows, cols = weight.shape
    packed = (rows, -(-cols // 8))
    if format == "sparse-bitmask":
        return {"shape": (torch.int64, (2,)), "compressed": (weight.dtype, (int(torch.count_nonzero(weight)),)),
                "bitmask": (torch.uint8, packed), "row_offsets": (torch.int64, (rows,))}
    return {"shape": (torch.int64, (2, 1)), "compressed": (weight.dtype, (rows, cols // 2)),
            "bitmask": (torch.uint8, packed)}


# -- a model -------------------------------------------------------------------------------------

def _sparsity_config(format: str, ignore: list[str], global_sparsity: float, structure: str) -> dict[str, Any]:
    try:
        from compressed_tensors.config import SparsityCompressionConfig
    except ImportError as e:
        raise ImportError(f"save_compressed(format={format!r}) writes the compressed-tensors format through its "
                          f"package: pip install compressed-tensors (or pip install 'fx-sparsity[compressed]')") from e
    config = SparsityCompressionConfig.load_from_registry(format, targets=["Linear"], ignore=ignore,
                                                          global_sparsity=global_sparsity,
                                                          sparsity_structure=structure)
    return config.model_dump()


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with each tensor once (tied ones under their first name, as save_pretrained keeps)."""
    seen: set[tuple[int, int]] = set()
    state = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset()) if tensor.numel() else (id(tensor), 0)
        if key not in seen:
            seen.add(key)
            state[name] = tensor.detach()
    return state


def save_compressed(model: nn.Module, save_dir: str | Path, format: str = "sparse-bitmask", *,
                    max_shard_size: int = 5 * 2**30) -> Path:
    """Save ``model`` (a Hugging Face model, or any module) to ``save_dir`` in the compressed-tensors ``format``.

    ``"sparse-bitmask"`` stores the nonzeros of every ``nn.Linear`` weight that gets smaller that way,
    ``"sparse-24-bitmask"`` those of every 2:4 ``nn.Linear`` weight (at most two nonzeros in every four
    inputs: ``NMSparsifier(2, 4)``, ``SparseGPTSparsifier(semi_structured_block_size=4)``); the other
    linears are listed in the config's ``ignore`` and stored dense, as is every other tensor. Exact: the
    weights read back are the weights saved. One weight is compressed at a time, written straight to
    the file. Writes ``config.json`` (the model's config with ``quantization_config.sparsity_config``)
    and the generation config when the model has them; returns ``save_dir``. Needs the
    ``compressed-tensors`` package (its config classes define the config written).
    """
    if format not in FORMATS:
        raise SparsityConfigError(f"format must be one of {FORMATS}, got {format!r}")
    state = _unique_state(model)
    owners = {f"{name}.weight": name for name, m in model.named_modules()
              if type(m).__name__ == "Linear" and isinstance(getattr(m, "weight", None), torch.Tensor)}
    compress, ignore = [], []
    for fqn, module_name in owners.items():
        weight = state.get(fqn)
        if weight is None or weight.dim() != 2:  # tied to a tensor saved under another name: stays as that one is
            ignore.append(module_name)
            continue
        fits = (is_24(weight) if format == "sparse-24-bitmask"
                else _compressed_bytes(weight, format) < weight.numel() * weight.element_size())
        if fits:
            compress.append(fqn)
        else:
            ignore.append(module_name)
    if not compress:
        hint = ("no nn.Linear weight is 2:4 (prune with NMSparsifier(2, 4) or SparseGPTSparsifier("
                "semi_structured_block_size=4))" if format == "sparse-24-bitmask"
                else "no nn.Linear weight has enough zeros to get smaller")
        raise SparsityConfigError(f"save_compressed(format={format!r}): {hint}; save_pretrained stores it as well")
    params = {id(p): p for p in model.parameters()}.values()
    zeros = sum(int((p == 0).sum()) for p in params)
    total = sum(p.numel() for p in params)
    structure = "2:4" if all(is_24(state[f]) for f in compress) else "unstructured"
    sparsity_config = _sparsity_config(format, sorted(ignore), zeros / max(total, 1), structure)

    entries: dict[str, torch.Tensor | Lazy] = {}
    for name, tensor in state.items():
        if name not in compress:
            entries[name] = tensor
            continue
        prefix = owners[name]
        made: dict[str, torch.Tensor] = {}

        def part(key: str, weight: torch.Tensor = tensor, made: dict[str, torch.Tensor] = made) -> torch.Tensor:
            if not made:
                made.update(compress_weight(weight, format))
            return made.pop(key)

        for key, (dtype, shape) in _part_specs(tensor, format).items():
            entries[f"{prefix}.{key}"] = Lazy(dtype, shape, functools.partial(part, key))
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    for old in save_dir.glob("model*.safetensors"):
        old.unlink()
    (save_dir / INDEX_NAME).unlink(missing_ok=True)
    _write_shards(save_dir, entries, max_shard_size)
    _write_config(model, save_dir, sparsity_config)
    return save_dir


def _nbytes(entry: torch.Tensor | Lazy) -> int:
    return int(torch.Size(entry.shape).numel()) * torch.empty((), dtype=entry.dtype).element_size()


def _write_shards(save_dir: Path, entries: dict[str, torch.Tensor | Lazy], max_shard_size: int) -> None:
    shards: list[dict[str, torch.Tensor | Lazy]] = [{}]
    size = 0
    for name, entry in entries.items():
        nbytes = _nbytes(entry)
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = entry
        size += nbytes
    if len(shards) == 1:
        write_safetensors(save_dir / "model.safetensors", shards[0])
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(save_dir / file, shard)
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (save_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _write_config(model: nn.Module, save_dir: Path, sparsity_config: dict[str, Any]) -> None:
    import compressed_tensors

    config = getattr(model, "config", None)
    data: dict[str, Any] = {}
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(save_dir)
        data = json.loads((save_dir / "config.json").read_text())
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "save_pretrained"):
        generation.save_pretrained(save_dir)
    data["quantization_config"] = {"quant_method": "compressed-tensors", "version": compressed_tensors.__version__,
                                   "sparsity_config": sparsity_config, "transform_config": {}}
    (save_dir / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _format_of(model_dir: Path) -> str | None:
    config = json.loads((model_dir / "config.json").read_text())
    sparsity = (config.get("quantization_config") or {}).get("sparsity_config") or {}
    format = sparsity.get("format")
    if format not in (None, "dense", *FORMATS):
        raise CheckpointError(f"{model_dir}: sparsity format {format!r} is not one of {FORMATS}")
    return None if format == "dense" else format


def load_compressed(model_dir: str | Path) -> nn.Module:
    """The model saved in ``model_dir``, dense, in eval mode: a compressed-tensors sparse checkpoint
    (:data:`FORMATS`, as :func:`save_compressed` or compressed-tensors ≤ 0.14 / llm-compressor wrote it)
    decompressed, or a dense safetensors checkpoint read as it is.

    The model is built from ``config.json`` with its parameters on the meta device and each tensor read
    (and decompressed) into it once, so memory holds the model and one compressed weight beyond it.
    Tied tensors stay tied. The compression config is dropped from ``model.config`` (its weights are
    dense now): ``save_pretrained`` writes a plain checkpoint, ``save_compressed`` a compressed one.
    """
    model_dir = Path(model_dir)
    format = _format_of(model_dir)
    weight_map = checkpoint_index(model_dir)
    model = empty_model(model_dir)
    slots = TensorSlots(model)
    missing = []
    with torch.no_grad():
        for key, fqns in slots.fqns.items():
            like = slots.current(key)
            dense = next((f for f in fqns if f in weight_map), None)
            if dense is not None:
                (_, tensor), = read_tensors(weight_map[dense], [dense])
            else:
                prefix = next((f[:-len(".weight")] for f in fqns
                               if f.endswith(".weight") and f"{f[:-len('.weight')]}.compressed" in weight_map), None)
                if prefix is None or format is None:
                    if slots.places[key][0][2]:
                        missing.append(fqns[0])
                    continue
                parts = {}
                for part in _PARTS[format]:
                    name = f"{prefix}.{part}"
                    if name in weight_map:
                        (_, parts[part]), = read_tensors(weight_map[name], [name])
                tensor = decompress_weight(parts)
            if tuple(tensor.shape) != tuple(like.shape):
                raise CheckpointError(f"'{fqns[0]}' has shape {tuple(tensor.shape)} in {model_dir}, the model's is "
                                      f"{tuple(like.shape)}")
            slots.put(key, tensor.to(like.dtype))
    if missing:
        raise CheckpointError(f"{len(missing)} parameters of the model are in no form in {model_dir} "
                              f"(e.g. {missing[:4]})")
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    return model
