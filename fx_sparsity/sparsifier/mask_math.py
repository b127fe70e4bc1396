"""Pure tensor functions that compute sparsity masks.

Nothing in here knows about modules, parametrizations or graphs: every function
takes tensors / plain Python values and returns a fresh tensor (or fills the
``out=`` tensor it is given).  The masks are
bit-identical to the ones produced by ``torch.ao.pruning``'s
``WeightNormSparsifier.update_mask`` and ``NearlyDiagonalSparsifier.update_mask``
wherever those succeed and return a mask of the weight's shape.  The few places
where torch.ao raises or returns a mask of the wrong shape are listed in
:data:`DEVIATIONS` and in the docstrings below.

Weight-norm algorithm (shared by torch.ao and this module)
---------------------------------------------------------
Let the weight be ``h x w`` and the block ``bh x bw`` (``vpb = bh * bw``
values per block).  Blocks tile the weight starting at index ``(0, 0)``; the
last block row / column may be partial when ``h % bh`` / ``w % bw`` is not zero
(conceptually the weight is padded up to ``H x W = ceil(h/bh)*bh x
ceil(w/bw)*bw``).

1. ``sparsity_level <= 0`` or ``zeros_per_block == 0``: keep everything.
2. ``sparsity_level >= 1`` and ``zeros_per_block == vpb``: drop everything.
3. Otherwise ``norms = norm_fn(weight)`` and

   * *tensor level*: every block gets a score, the mean of ``norms`` over the
     block's **in-bounds** elements (``avg_pool2d`` with ``ceil_mode=True`` and
     no explicit padding divides a partial edge block by the number of real
     elements it covers, not by ``vpb``).  The
     ``clamp(round(sparsity_level * num_blocks), 0, num_blocks - 1)`` blocks
     (Python's ``round``: halves go to the even neighbour)
     with the smallest score are *selected*; with ``sparsity_level >= 1`` every
     block is selected.
   * *block level* (only when ``zeros_per_block < vpb``): inside every block
     the ``zeros_per_block`` elements with the smallest norm are *selected*;
     padding positions count as NaN, which ``topk`` orders after every number,
     so padding is only picked when a partial block has fewer real elements
     than ``zeros_per_block``.
   * an element is dropped (mask 0) iff it is selected at every level that
     applies, i.e. ``mask = tensor_keep | block_keep``.

Ties (equal scores / norms -- the normal case once a mask has been applied,
because masked weights are exactly zero) are broken exactly like torch.ao does,
because the same reduced data is fed to ``torch.topk`` with the same ``k`` and
the same per-slice element order.  What is *not* done is torch.ao's wasteful
bookkeeping: it repeats the pooled scores ``vpb`` times (so ``topk`` runs
``vpb`` times on identical slices) and builds masks by scattering into and
folding large ones-tensors.  ``topk`` on CPU treats every slice independently
(``std::nth_element`` / ``std::partial_sort`` on a fresh copy of the slice), so
one slice gives the same selected set as ``vpb`` identical ones; ``sorted=False``
only skips the final sort of the selected elements.  Bit-identity is tested on
CPU (tests/test_mask_math.py); on CUDA ``topk`` uses other algorithms whose tie
handling has not been checked against torch.ao here.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F

# A ValueError (and an AssertionError, as torch.ao raises for bad configs): one type to catch for every bad config.
from ..errors import SparsityConfigError

__all__ = [
    "DEVIATIONS",
    "check_2d",
    "check_nearliness",
    "check_weight_norm_config",
    "l1_norm",
    "l2_norm",
    "nearly_diagonal_mask",
    "resolve_norm_fn",
    "weight_norm_mask",
]


#: Every intentional difference from torch.ao.pruning (Markdown bullets).
DEVIATIONS: tuple[str, ...] = (
    "WeightNorm, dims not divisible by the block, `0 < zeros_per_block < bh*bw`, "
    "`0 < sparsity_level < 1`: torch.ao raises `RuntimeError` (size mismatch in "
    "`logical_or`) or, when the short dim is 1, silently returns a mask of the padded "
    "shape; we return the same algorithm's mask on the padded weight, cropped to the "
    "weight's shape.",
    "WeightNorm, dims not divisible by the block, `0 < zeros_per_block < bh*bw`, "
    "`sparsity_level >= 1`: torch.ao returns a mask of the padded shape "
    "`(ceil(h/bh)*bh, ceil(w/bw)*bw)` (the module then fails in forward); we return "
    "that mask cropped to the weight's shape.",
    "WeightNorm, weight with 0 rows or 0 columns and a non-trivial config: torch.ao "
    "raises in `avg_pool2d`; we return an empty mask.",
    "WeightNorm, `norm_fn` returning an integer/bool tensor: torch.ao raises "
    "(`fill_(nan)` on an integer tensor) when `zeros_per_block < bh*bw`, and otherwise "
    "ranks blocks by the *truncated* integer mean from `avg_pool2d` (so blocks with "
    "means 1.25 and 1.0 tie); we convert the norms to float64 first (exact means, "
    "same result on every device).",
    "WeightNorm, invalid config (`sparsity_level` NaN or not a real number, block shape "
    "not two positive ints, `zeros_per_block` not an int): torch.ao fails with assorted "
    "errors; we raise `ValueError` naming the value. A level outside [0, 1] acts as 0 or 1 "
    "in both (we warn when it is given); `zeros_per_block` outside [0, bh*bw] raises "
    "`ValueError` at `step()` in both.",
    "WeightNorm, non-2-D weight with a non-trivial config: torch.ao raises a "
    "`RuntimeError` from `avg_pool2d`; we raise `ValueError` naming the shape.",
    "WeightNorm, mask dtype: torch.ao's mask becomes `float32` (or `bool` once "
    "`zeros_per_block < bh*bw`); we return the weight's floating dtype (float32 for "
    "non-floating weights). Values are the same 0/1, also for float16/bfloat16 weights: "
    "torch.ao then ranks blocks on a float32 masked weight from its second step on, and so "
    "do we.",
    "NearlyDiagonal, non-int `nearliness` (e.g. `3.0`) or a non-2-D weight with "
    "`nearliness > 0`: torch.ao raises `TypeError`/`ValueError` from deep inside; we "
    "raise `ValueError` with the value and the fix.",
)


NormFn = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- #
# norms
# --------------------------------------------------------------------------- #
def l1_norm(t: torch.Tensor) -> torch.Tensor:
    """Elementwise L1 'norm' (``|t|``), the same op torch.ao uses for ``norm=1``."""
    return t.abs()


def l2_norm(t: torch.Tensor) -> torch.Tensor:
    """Elementwise squared L2 'norm' (``t * t``), the same op torch.ao uses for ``norm=2``."""
    return t * t


def resolve_norm_fn(norm, *, where: str = "") -> NormFn:
    """Map torch.ao's ``norm`` argument (``None``, ``1``, ``2`` or a callable) to a function."""
    if norm is None:
        return l2_norm
    if callable(norm):
        return norm
    if not isinstance(norm, bool) and isinstance(norm, numbers.Integral):
        if int(norm) == 1:
            return l1_norm
        if int(norm) == 2:
            return l2_norm
    raise SparsityConfigError(
        f"{_prefix(where)}norm must be 1 (L1), 2 (L2), None (L2) or a callable mapping "
        f"the weight to elementwise norms, got {norm!r}"
    )


# --------------------------------------------------------------------------- #
# validation
# --------------------------------------------------------------------------- #
def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _describe(x) -> str:
    return f"{x!r} ({type(x).__name__})"


def check_weight_norm_config(
    sparsity_level, sparse_block_shape, zeros_per_block, *, where: str = "", ranges: bool = True
) -> None:
    """Raise ``ValueError`` unless the three WeightNorm settings are usable.

    * ``sparsity_level``: a real number (not bool, not NaN); outside ``[0, 1]`` it acts as
      the nearest end, as in torch.ao (see :func:`warn_if_clamped`);
    * ``sparse_block_shape``: a tuple or list of two positive ints;
    * ``zeros_per_block``: an int, in ``[0, block_h * block_w]`` when ``ranges``.

    torch.ao checks the range of ``zeros_per_block`` when a mask is computed, not when the
    sparsifier is made or prepared; ``ranges=False`` is that earlier check. ``where``
    (e.g. ``"group 'fc1.weight'"``) is prefixed to the message.
    """
    p = _prefix(where)
    if not _is_real(sparsity_level) or math.isnan(sparsity_level):
        raise SparsityConfigError(
            f"{p}sparsity_level must be a real number, got "
            f"{_describe(sparsity_level)}; pass a float such as 0.5 "
            "(use .item() for a tensor)"
        )
    if (
        not isinstance(sparse_block_shape, (tuple, list))
        or len(sparse_block_shape) != 2
        or not all(_is_int(b) and b > 0 for b in sparse_block_shape)
    ):
        raise SparsityConfigError(
            f"{p}sparse_block_shape must be a tuple or list of two positive ints "
            f"(block_rows, block_cols), got {_describe(sparse_block_shape)}; "
            "pass e.g. (1, 4)"
        )
    bh, bw = (int(b) for b in sparse_block_shape)
    values_per_block = bh * bw
    if not _is_int(zeros_per_block) or (ranges and not 0 <= zeros_per_block <= values_per_block):
        raise SparsityConfigError(
            f"{p}zeros_per_block must be an int in [0, {values_per_block}] (a {bh}x{bw} "
            f"block has {values_per_block} elements), got {_describe(zeros_per_block)}; "
            f"pass {values_per_block} to zero whole blocks or a smaller int for "
            "partial blocks"
        )


def check_nearliness(nearliness, shape=None, *, where: str = "", ranges: bool = True) -> None:
    """Raise ``ValueError`` unless ``nearliness`` is usable (for ``shape`` if given).

    Mirrors torch.ao: ``nearliness <= 0`` is accepted (it gives an all-zero mask
    and is not checked further); a positive value must be odd and satisfy
    ``nearliness // 2 < min(shape)``. torch.ao checks those two when a mask is
    computed; ``ranges=False`` checks only that it is an int (and ``shape`` 2-D).
    """
    p = _prefix(where)
    if not _is_int(nearliness):
        raise SparsityConfigError(
            f"{p}nearliness must be an int, got {_describe(nearliness)}; "
            "pass an odd positive int such as 1, 3 or 5"
        )
    if shape is not None and len(tuple(shape)) != 2:
        raise SparsityConfigError(
            f"{p}nearliness needs a 2-D tensor, got shape {tuple(int(s) for s in shape)}; "
            "apply NearlyDiagonal only to 2-D weights such as nn.Linear.weight"
        )
    if nearliness <= 0 or not ranges:
        return
    if nearliness % 2 == 0:
        raise SparsityConfigError(
            f"{p}nearliness must be odd, got {nearliness}; "
            f"use {nearliness - 1} or {nearliness + 1}"
        )
    if shape is None:
        return
    shape = tuple(int(s) for s in shape)
    dist = nearliness // 2
    smallest = min(shape)
    if dist >= smallest:
        raise SparsityConfigError(
            f"{p}nearliness {nearliness} is too large for a tensor of shape {shape}: "
            f"nearliness // 2 = {dist} must be smaller than min(shape) = {smallest}; "
            f"use an odd nearliness <= {2 * smallest - 1}"
        )


def check_2d(tensor, *, where: str = "") -> None:
    """Raise ``ValueError`` (naming the shape) unless ``tensor`` is a 2-D tensor."""
    p = _prefix(where)
    if not isinstance(tensor, torch.Tensor):
        raise SparsityConfigError(f"{p}expected a 2-D torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 2:
        raise SparsityConfigError(
            f"{p}expected a 2-D tensor, got shape {tuple(tensor.shape)} "
            f"({tensor.dim()}-D); this mask is only defined for 2-D weights "
            "(block masks are defined on 2-D weights, as in torch.ao.pruning; for Conv or other N-D weights use "
            "GlobalMagnitudeSparsifier, which takes any shape, or leave the tensor out of the config)"
        )


# --------------------------------------------------------------------------- #
# weight norm
# --------------------------------------------------------------------------- #
def _mask_dtype(weight: torch.Tensor) -> torch.dtype:
    return weight.dtype if weight.is_floating_point() else torch.float32


def _check_out(out, shape) -> None:
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise SparsityConfigError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise SparsityConfigError(
            f"out has shape {tuple(out.shape)} but the mask has shape {tuple(shape)}; "
            "pass a tensor of the weight's shape or out=None"
        )


def _filled(shape, value, dtype, device, out):
    if out is not None:
        return out.fill_(value)
    return torch.full(shape, value, dtype=dtype, device=device)


def _emit(keep_blocks: torch.Tensor, h: int, w: int, dtype: torch.dtype, device, out):
    """Write a ``(nbh, bh, nbw, bw)`` boolean keep-view into an ``h x w`` result.

    ``keep_blocks`` may be an expanded / permuted view; it is converted and
    laid out in a single copy whenever the blocks tile the result exactly.
    """
    nbh, bh, nbw, bw = keep_blocks.shape
    if out is None:
        out = torch.empty((h, w), dtype=dtype, device=device)
    if (nbh * bh, nbw * bw) == (h, w) and out.is_contiguous():
        out.view(nbh, bh, nbw, bw).copy_(keep_blocks)
    else:
        out.copy_(keep_blocks.reshape(nbh * bh, nbw * bw)[:h, :w])
    return out


@torch.no_grad()
def weight_norm_mask(
    weight: torch.Tensor,
    sparsity_level: float,
    sparse_block_shape,
    zeros_per_block: int,
    norm_fn: NormFn,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mask of ``WeightNormSparsifier.update_mask`` for ``weight``.

    Args:
        weight: the 2-D weight *as the sparsifier sees it*, i.e. already
            multiplied by the current mask (``mask * weight``); masked entries
            are then exact zeros, which is what makes repeated steps stable.
        sparsity_level: fraction of blocks to select, in ``[0, 1]``.
        sparse_block_shape: ``(block_rows, block_cols)``.
        zeros_per_block: number of elements to zero inside a selected block.
        norm_fn: elementwise norm (:func:`l1_norm`, :func:`l2_norm` or any
            callable returning a tensor of ``weight``'s shape).
        out: optional tensor of ``weight.shape`` (any dtype/device) to write
            the mask into, e.g. the existing mask buffer; it is only written
            after ``norm_fn(weight)`` has been computed.  Avoids allocating a
            new mask (a fresh multi-MiB CPU tensor costs page faults).

    Returns:
        ``out`` if given, else a new tensor of ``weight.shape`` on
        ``weight.device`` holding exact 0/1 values, of ``weight.dtype``
        (``float32`` if the weight is not floating point).  The result never depends on a previous mask except
        through ``weight`` itself (no accumulation, cf. pytorch PR #62807).

    When a dimension is not a multiple of the block size the mask is the one
    the algorithm gives on the padded weight (padding = NaN norms), cropped to
    ``weight.shape``; torch.ao fails or returns the padded shape in some of
    these cases (see :data:`DEVIATIONS`).
    """
    check_weight_norm_config(sparsity_level, sparse_block_shape, zeros_per_block)
    bh, bw = (int(b) for b in sparse_block_shape)
    zeros_per_block = int(zeros_per_block)
    values_per_block = bh * bw
    if not isinstance(weight, torch.Tensor):
        raise SparsityConfigError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    _check_out(out, weight.shape)
    dtype = _mask_dtype(weight)
    device = weight.device

    if sparsity_level <= 0 or zeros_per_block == 0:
        return _filled(weight.shape, 1, dtype, device, out)
    if sparsity_level >= 1 and zeros_per_block == values_per_block:
        return _filled(weight.shape, 0, dtype, device, out)

    check_2d(weight)
    h, w = weight.shape
    if h == 0 or w == 0:
        return _filled(weight.shape, 1, dtype, device, out)

    norms = norm_fn(weight)
    if not isinstance(norms, torch.Tensor) or norms.shape != weight.shape:
        got = tuple(norms.shape) if isinstance(norms, torch.Tensor) else type(norms).__name__
        raise SparsityConfigError(
            f"norm_fn must return a tensor of the weight's shape {tuple(weight.shape)}, "
            f"got {got}"
        )
    if norms.is_complex():
        raise SparsityConfigError("norm_fn must return real numbers, got a complex tensor")
    if not norms.is_floating_point():
        norms = norms.to(torch.float64)

    nbh = -(-h // bh)  # number of block rows / cols (ceil)
    nbw = -(-w // bw)
    num_blocks = nbh * nbw

    # ---- tensor level: which blocks are selected (False = selected) ----
    if sparsity_level >= 1:
        block_keep = torch.zeros(num_blocks, dtype=torch.bool, device=device)
    else:
        k = round(sparsity_level * num_blocks)
        k = max(0, min(num_blocks - 1, k))
        block_keep = torch.ones(num_blocks, dtype=torch.bool, device=device)
        if k > 0:
            if values_per_block > 1:
                scores = F.avg_pool2d(
                    norms[None, None],
                    kernel_size=(bh, bw),
                    stride=(bh, bw),
                    ceil_mode=True,
                ).reshape(-1)
            else:
                scores = norms.reshape(-1)
            # sorted=False changes only the order of the returned indices,
            # never which ones are returned.
            idx = torch.topk(scores, k, largest=False, sorted=False).indices
            block_keep.index_fill_(0, idx, False)

    if zeros_per_block == values_per_block:
        keep = block_keep.view(nbh, 1, nbw, 1).expand(nbh, bh, nbw, bw)
        return _emit(keep, h, w, dtype, device, out)

    # ---- block level: which elements inside each block are selected ----
    ph, pw = nbh * bh, nbw * bw
    if (ph, pw) != (h, w):
        padded = torch.full((ph, pw), math.nan, dtype=norms.dtype, device=device)
        padded[:h, :w] = norms
    else:
        padded = norms
    # (num_blocks, vpb): row = block (row-major over blocks), column =
    # position inside the block (row-major) -- the element order F.unfold
    # uses, so every topk slice holds the same values in the same order.
    per_block = (
        padded.reshape(nbh, bh, nbw, bw).permute(0, 2, 1, 3).reshape(num_blocks, values_per_block)
    )
    idx = torch.topk(per_block, zeros_per_block, dim=1, largest=False, sorted=False).indices
    keep = torch.ones(num_blocks, values_per_block, dtype=torch.bool, device=device)
    keep.scatter_(1, idx, False)
    keep |= block_keep[:, None]
    return _emit(keep.view(nbh, nbw, bh, bw).permute(0, 2, 1, 3), h, w, dtype, device, out)


# --------------------------------------------------------------------------- #
# nearly diagonal
# --------------------------------------------------------------------------- #
@torch.no_grad()
def nearly_diagonal_mask(
    shape,
    nearliness: int,
    *,
    dtype: torch.dtype = torch.float32,
    device=None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mask of ``NearlyDiagonalSparsifier.update_mask`` for a weight of ``shape``.

    ``mask[i, j] = 1`` iff ``|i - j| <= nearliness // 2``.  ``nearliness <= 0``
    gives an all-zero mask (any shape), as in torch.ao.  Raises ``ValueError``
    (see :func:`check_nearliness`) for a non-int, an even positive value, a
    non-2-D shape, or ``nearliness // 2 >= min(shape)``.

    With ``out`` (a tensor of ``shape``, e.g. the existing mask buffer) the
    mask is written into it and ``out`` is returned; ``dtype``/``device`` are
    then ignored.
    """
    shape = tuple(int(s) for s in shape)
    check_nearliness(nearliness)
    _check_out(out, shape)
    if out is not None:
        mask = out.zero_()
    else:
        mask = torch.zeros(shape, dtype=dtype, device=device)
    if nearliness <= 0:
        return mask
    check_nearliness(nearliness, shape)
    h, w = shape
    dist = nearliness // 2
    # Every in-bounds (i, i + o) with |o| <= dist, computed as flat indices.
    rows = torch.arange(h, device=mask.device).unsqueeze(1)
    cols = rows + torch.arange(-dist, dist + 1, device=mask.device)
    valid = (cols >= 0) & (cols < w)
    if mask.is_contiguous():
        mask.view(-1)[(rows * w + cols)[valid]] = 1
    else:
        mask[rows.expand_as(cols)[valid], cols[valid]] = 1
    return mask
