"""``one_shot_pretrained``: prune a Hugging Face checkpoint block by block, never holding the whole model.

::

    config.json          ──▶ the model built with every parameter on the meta device (buffers real,
                             computed by the constructors: rotary ``inv_freq`` and the like)
    shards (safetensors) ──▶ the tensors outside the blocks read in; written to save_dir as they are
    calibration data     ──▶ the first block's inputs (the model runs up to it and stops); then the
                             tensors outside the blocks go back to meta (no block reads them)
    for each block:          read its tensors · prune it as one_shot does · write them · back to meta

What is held at once: first the tensors outside the blocks (embeddings, final norm, head) and the
calibration activations; then one block, its pruning working set and the activations at one block
boundary. Files are read and written with plain reads and writes into (and from) the tensors' own
memory: no file is mapped and no tensor is copied to bytes, so a checkpoint larger than RAM prunes.

The safetensors format read and written here: 8 bytes (little-endian header length), a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` padded with
spaces to a multiple of 8, then the tensors' bytes back to back.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import math
import mmap
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from tqdm import tqdm

from .errors import FxSparsityError, SparsityConfigError
from .one_shot import block_scope, check_block_config, first_block_calls, prune_block

__all__ = ["one_shot_pretrained", "empty_model", "TensorSlots", "Lazy", "read_tensors", "write_safetensors",
           "checkpoint_index", "copy_side_files", "release_freed_memory", "INDEX_NAME", "CheckpointError"]

INDEX_NAME = "model.safetensors.index.json"
_SINGLE_NAME = "model.safetensors"
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
#: Files of a checkpoint directory that are weights (not copied beside the pruned ones).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


class CheckpointError(FxSparsityError, ValueError):
    """A checkpoint directory that cannot be read as a Hugging Face safetensors checkpoint."""


# -- safetensors, read and written without mapping files or copying tensors to bytes ---------------

def _header(path: Path) -> tuple[dict[str, Any], int]:
    """``(header, offset of the data)`` of a safetensors file."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    flat = tensor.reshape(-1)
    return flat.view(torch.uint8).numpy().data if flat.numel() else memoryview(b"")


def read_tensors(path: Path, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for each of ``names`` in the safetensors file at ``path``, read straight into the tensor."""
    header, start = _header(path)
    with open(path, "rb") as f:
        for name in names:
            entry = header[name]
            begin, end = entry["data_offsets"]
            tensor = torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
            f.seek(start + begin)
            if f.readinto(_bytes_of(tensor)) != end - begin:  # type: ignore[attr-defined]
                raise CheckpointError(f"{path}: '{name}' is truncated")
            yield name, tensor


class Lazy(NamedTuple):
    """A tensor to write, made only when its turn comes (``make()`` must give this dtype and shape)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor | Lazy],
                      metadata: dict[str, str] | None = None) -> int:
    """Write ``tensors`` (CPU tensors, or :class:`Lazy` ones made one at a time) to ``path`` in the safetensors
    format, each straight from its memory; returns the bytes of tensor data."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _NAMES:
            raise CheckpointError(f"'{name}': dtype {tensor.dtype} has no safetensors name")
        size = math.prod(tensor.shape) * _itemsize(tensor.dtype)
        header[name] = {"dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, entry in tensors.items():
            tensor = entry.make() if isinstance(entry, Lazy) else entry
            if tensor.dtype != entry.dtype or tuple(tensor.shape) != tuple(entry.shape):
                raise CheckpointError(f"'{name}': made {tensor.dtype} {tuple(tensor.shape)}, declared "
                                      f"{entry.dtype} {tuple(entry.shape)}")
            f.write(_bytes_of(tensor.detach().cpu().contiguous()))
    return offset


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def checkpoint_index(model_dir: Path) -> dict[str, Path]:
    """``{tensor name: shard file}`` of a safetensors checkpoint (``model.safetensors`` or an index of shards)."""
    index = model_dir / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / _SINGLE_NAME
    if single.is_file():
        return {name: single for name in _header(single)[0]}
    found = sorted(p.name for p in model_dir.iterdir()) if model_dir.is_dir() else []
    raise CheckpointError(f"{model_dir} holds no safetensors checkpoint ({_SINGLE_NAME} or {INDEX_NAME}); found "
                          f"{found[:8]}. Save it with save_pretrained(..., safe_serialization=True)")


def copy_side_files(model_dir: Path, save_dir: Path) -> None:
    """Copy every file of ``model_dir`` that is not a weight (config, generation config, tokenizer) to ``save_dir``."""
    for path in model_dir.iterdir():
        if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES) and path.name != INDEX_NAME:
            shutil.copy2(path, save_dir / path.name)


def _clear_weights(save_dir: Path) -> None:
    """Remove the weight files an earlier save left in ``save_dir`` (as save_pretrained does)."""
    for path in save_dir.glob("model*.safetensors"):
        path.unlink()
    (save_dir / INDEX_NAME).unlink(missing_ok=True)


# -- the model, built without its parameters -------------------------------------------------------

@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device; buffers stay real (their constructors compute
    them). A parameter's CPU storage is allocated but never written, so it costs no memory."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def empty_model(model_dir: str | Path) -> nn.Module:
    """The model of ``model_dir``'s ``config.json`` (its ``architectures`` class, else a causal LM), in eval mode,
    every parameter on the meta device, buffers computed, tied parameters tied."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError("one_shot_pretrained reads Hugging Face checkpoints: pip install transformers") from e
    hf_config = transformers.AutoConfig.from_pretrained(model_dir)
    names = getattr(hf_config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    with _parameters_on_meta():
        if cls is not None and hasattr(cls, "_from_config"):
            model = cls._from_config(hf_config)
        else:
            model = transformers.AutoModelForCausalLM.from_config(hf_config)
    return model.eval()


class TensorSlots:
    """Where each tensor of a model sits: ``(module, attribute, is parameter)`` places and fqns, one entry per
    tensor object (tied parameters are one entry), so a tensor can be swapped in and out at every place."""

    def __init__(self, model: nn.Module):
        self.places: dict[int, list[tuple[nn.Module, str, bool]]] = {}
        self.fqns: dict[int, list[str]] = {}
        self.tensors: dict[int, torch.Tensor] = {}
        for prefix, module in model.named_modules(remove_duplicate=False):
            for store, is_param in ((module._parameters, True), (module._buffers, False)):
                for attr, tensor in store.items():
                    if tensor is None or (not is_param and attr in module._non_persistent_buffers_set):
                        continue
                    key = id(tensor)
                    self.tensors.setdefault(key, tensor)
                    self.places.setdefault(key, []).append((module, attr, is_param))
                    fqn = f"{prefix}.{attr}" if prefix else attr
                    if fqn not in self.fqns.setdefault(key, []):
                        self.fqns[key].append(fqn)

    def current(self, key: int) -> torch.Tensor:
        """The tensor at the first place of ``key`` now (pruning may have put another object there)."""
        module, attr, is_param = self.places[key][0]
        found = (module._parameters if is_param else module._buffers)[attr]
        assert found is not None
        return found

    def put(self, key: int, value: torch.Tensor) -> None:
        """Put ``value`` at every place of ``key``, one object for all (a parameter where a parameter was)."""
        module, attr, is_param = self.places[key][0]
        old = (module._parameters if is_param else module._buffers)[attr]
        if is_param:
            value = nn.Parameter(value, requires_grad=bool(old is not None and old.requires_grad))
        for module, attr, is_param in self.places[key]:
            if is_param:
                module._parameters[attr] = value  # type: ignore[assignment]  # an nn.Parameter (made above)
            else:
                module._buffers[attr] = value

    def free(self, key: int) -> None:
        """Put a meta tensor of the same shape and dtype at every place of ``key``: the memory goes."""
        self.put(key, torch.empty_like(self.current(key), device="meta"))


def _find_keys(slots: TensorSlots, weight_map: dict[str, Path], prefix: str) -> dict[int, str]:
    """``{tensor key: its name in the checkpoint}``; a parameter found under none of its names is an error."""
    keys, missing = {}, []
    for key, fqns in slots.fqns.items():
        candidates = [*fqns, *(f[len(prefix) + 1:] for f in fqns if prefix and f.startswith(prefix + "."))]
        name = next((c for c in candidates if c in weight_map), None)
        if name is not None:
            keys[key] = name
        elif slots.places[key][0][2]:
            missing.append(fqns[0])
    if missing:
        raise CheckpointError(f"{len(missing)} parameters of the model are not in the checkpoint under their names "
                              f"(e.g. {missing[:4]}): one_shot_pretrained reads tensors under the model's own names, "
                              f"as save_pretrained writes them")
    return keys


def load_into(slots: TensorSlots, keys: dict[int, str], weight_map: dict[str, Path], wanted: list[int], *,
              progress: bool = False, desc: str = "", one_buffer: bool = False) -> None:
    """Read the tensors ``wanted`` from their shards (each shard opened once) into the model, in its dtypes.

    ``one_buffer``: all of them in one private anonymous mapping, each a view of it: a block freed goes
    back to the system in one piece. Read into heap tensors of their own, blocks read one after another
    fragmented glibc's heap and RSS grew by about a block per block (peak growth 170 MiB on a 151 MiB
    checkpoint of 8 blocks).
    """
    by_file: dict[Path, list[int]] = {}
    for key in wanted:
        by_file.setdefault(weight_map[keys[key]], []).append(key)
    headers = {path: _header(path) for path in by_file}
    buffer, offset = None, 0
    if one_buffer:
        sizes = [_aligned(_nbytes(headers[path][0][keys[k]])) for path, ks in by_file.items() for k in ks]
        buffer = _mapped_bytes(sum(sizes))
    for path, file_keys in tqdm(by_file.items(), desc=desc, unit="shard", disable=not progress, leave=False):
        header, start = headers[path]
        with open(path, "rb") as f:
            for key in file_keys:
                name = keys[key]
                entry = header[name]
                like = slots.current(key)
                if tuple(entry["shape"]) != tuple(like.shape):
                    raise CheckpointError(f"'{name}' has shape {tuple(entry['shape'])} in {path.name}, the model's "
                                          f"is {tuple(like.shape)}: the checkpoint does not match its config.json")
                size = _nbytes(entry)
                if buffer is None:
                    tensor = torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
                else:
                    tensor = buffer[offset:offset + size].view(_DTYPES[entry["dtype"]]).view(entry["shape"])
                    offset += _aligned(size)
                f.seek(start + entry["data_offsets"][0])
                if f.readinto(_bytes_of(tensor)) != size:  # type: ignore[attr-defined]
                    raise CheckpointError(f"{path}: '{name}' is truncated")
                slots.put(key, tensor.to(like.dtype))


def _mapped_bytes(size: int) -> torch.Tensor:
    """``size`` bytes of private anonymous memory of their own (not from the heap) as a uint8 tensor: unmapped,
    and so given back to the system, when the last tensor viewing it goes."""
    if not size:
        return torch.empty(0, dtype=torch.uint8)
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE) if hasattr(mmap, "MAP_PRIVATE") else mmap.mmap(-1, size)
    return torch.frombuffer(memory, dtype=torch.uint8)


def _nbytes(entry: dict[str, Any]) -> int:
    begin, end = entry["data_offsets"]
    return int(end - begin)


def _aligned(size: int) -> int:
    return -(-size // 64) * 64


def release_freed_memory() -> None:
    """Hand the memory freed so far back to the system (glibc's ``malloc_trim``; nothing elsewhere).

    Freed tensors below glibc's mmap threshold (which rises to the largest chunk freed, up to 32 MiB)
    stay in its heap: trimmed after each block, RSS between blocks is what stays live.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _inside(fqn: str, block: str) -> bool:
    return fqn.startswith(block + ".")


def one_shot_pretrained(model_dir: str | Path, sparsifier: Any, calibration_data: Iterable[Any], *, scope: Any,
                        save_dir: str | Path, config: list[dict] | None = None, progress: bool = True) -> Path:
    """Prune the Hugging Face checkpoint in ``model_dir`` block by block, as :func:`~fx_sparsity.one_shot` does,
    reading and writing one block at a time; returns ``save_dir``.

    ``model_dir`` holds ``config.json`` and safetensors weights (one file or shards with their index).
    The model is built from the config with its parameters on the meta device; the tensors outside the
    blocks of type ``scope`` are read in, the calibration data runs up to the first block, then each
    block is read from the shards, pruned exactly as ``one_shot`` prunes it (same capture, same
    propagation, same numbers), written to ``save_dir`` as a shard of its own, and freed. ``save_dir``
    gets the shards, their index and every other file of ``model_dir`` (config, generation config,
    tokenizer), so ``from_pretrained(save_dir)`` loads the pruned model. Tied tensors stay tied (written
    once, under the name the checkpoint used). Memory: the tensors outside the blocks until the first
    block's inputs are captured (they are freed then), then a block, its pruning working set and the
    calibration activations at one block boundary.

    ``sparsifier``, ``calibration_data``, ``scope`` and ``config`` are :func:`~fx_sparsity.one_shot`'s.
    """
    scope_ = block_scope(scope)
    model_dir, save_dir = Path(model_dir), Path(save_dir)
    if save_dir.resolve() == model_dir.resolve():
        raise SparsityConfigError("save_dir is model_dir: the shards being read would be overwritten; pass another "
                                  "directory")
    batches = list(calibration_data)
    if not batches:
        raise SparsityConfigError("calibration_data is empty: one_shot needs batches to calibrate each block on")
    weight_map = checkpoint_index(model_dir)
    model = empty_model(model_dir)
    blocks = scope_.blocks(model)
    if not blocks:
        raise SparsityConfigError(f"{type(model).__name__} has no submodule of type {scope_.block_types}")
    check_block_config(config, blocks)
    slots = TensorSlots(model)
    keys = _find_keys(slots, weight_map, getattr(model, "base_model_prefix", ""))
    owner = {key: next((b for b in blocks if all(_inside(f, b) for f in fqns)), None)
             for key, fqns in slots.fqns.items()}
    outside = [key for key in keys if owner[key] is None]
    save_dir.mkdir(parents=True, exist_ok=True)
    _clear_weights(save_dir)
    files = [f"model-{i + 1:05d}-of-{len(blocks) + 1:05d}.safetensors" for i in range(len(blocks) + 1)]
    written: dict[str, str] = {}
    total = 0

    def write(file: str, wanted: list[int]) -> None:
        nonlocal total
        tensors = {keys[k]: slots.current(k) for k in wanted}
        total += write_safetensors(save_dir / file, tensors)
        written.update(dict.fromkeys(tensors, file))

    load_into(slots, keys, weight_map, outside, progress=progress, desc="outside the blocks")
    write(files[0], outside)
    calls = first_block_calls(model, blocks, batches, progress=progress)
    for key in outside:  # written, and no block reads them: embeddings, head and final norm go before block 0
        if not any(_inside(f, b) for f in slots.fqns[key] for b in blocks):
            slots.free(key)
    release_freed_memory()
    for i, fqn in enumerate(tqdm(blocks, desc="one_shot_pretrained", unit="block", disable=not progress)):
        mine = [key for key in keys if owner[key] == fqn]
        load_into(slots, keys, weight_map, mine, one_buffer=True)
        calls = prune_block(model.get_submodule(fqn), fqn, sparsifier, config, calls)
        write(files[i + 1], mine)
        for key in mine:
            slots.free(key)
        release_freed_memory()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(written.items()))}
    (save_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    copy_side_files(model_dir, save_dir)
    return save_dir
