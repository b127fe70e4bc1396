"""Bit-exactness of fx_sparsity's mask math against torch.ao.pruning.

Every mask is compared with ``torch.equal`` against the mask torch.ao's
sparsifier leaves in ``module.parametrizations.weight[0].mask`` after
``step()``.  Where torch.ao fails or returns a mask of the wrong shape the
test asserts that it (still) does, and checks our documented result instead:
torch.ao's own internal tensor-/block-level masks on the padded weight,
cropped to the weight's shape.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn
from torch.ao.pruning import NearlyDiagonalSparsifier as AONearlyDiagonal
from torch.ao.pruning import WeightNormSparsifier as AOWeightNorm

from fx_sparsity.sparsifier import mask_math as mm
from fx_sparsity.sparsifier.mask_math import (
    check_2d,
    check_nearliness,
    check_weight_norm_config,
    nearly_diagonal_mask,
    weight_norm_mask,
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # The tensors here are tiny; intra-op threads only add spin-wait overhead
    # (which explodes on a loaded machine).  Restored after this module.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


BLOCKS = [(1, 1), (1, 4), (4, 1), (2, 2), (4, 4), (8, 1), (3, 5)]
LEVELS = [0, 0.3, 0.5, 0.9, 1.0]


def shifted_norm(t):
    """A user norm under which masked (zero) weights are *not* the smallest."""
    return (t - 1).abs()


NORMS = {
    "l1": (1, mm.l1_norm),
    "l2": (2, mm.l2_norm),
    "callable": (shifted_norm, shifted_norm),
}


# --------------------------------------------------------------------------- #
# torch.ao reference helpers
# --------------------------------------------------------------------------- #
def _linear_holding(weight):
    h, w = weight.shape
    lin = nn.Linear(w, h, bias=False, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return lin


def ao_weight_norm_masks(weight, levels, block, zeros, norm):
    """torch.ao's masks after each ``step()``, one step per entry of ``levels``."""
    lin = _linear_holding(weight)
    sp = AOWeightNorm(sparsity_level=levels[0], sparse_block_shape=block,
                      zeros_per_block=zeros, norm=norm)
    sp.prepare(nn.Sequential(lin), [{"tensor_fqn": "0.weight"}])
    out = []
    for level in levels:
        sp.groups[0]["sparsity_level"] = level
        sp.step()
        out.append(lin.parametrizations.weight[0].mask.clone())
    return out


def ours_weight_norm_masks(weight, levels, block, zeros, norm_fn):
    """Our masks for the same sequence: each step sees ``mask * weight``."""
    mask = torch.ones_like(weight)
    out = []
    for level in levels:
        mask = weight_norm_mask(mask * weight, level, block, zeros, norm_fn)
        out.append(mask)
    return out


def ao_internal_mask(masked_weight, level, block, zeros, norm_fn):
    """torch.ao's own tensor-/block-level masks, cropped, OR-ed (the documented fix)."""
    h, w = masked_weight.shape
    sp = AOWeightNorm(sparsity_level=level, sparse_block_shape=block, zeros_per_block=zeros)
    ww = norm_fn(masked_weight)
    keep = sp._make_tensor_mask(data=ww, input_shape=ww.shape, sparsity_level=level,
                                sparse_block_shape=block)[:h, :w]
    if zeros < block[0] * block[1]:
        block_mask = sp._make_block_mask(data=ww, sparse_block_shape=block, zeros_per_block=zeros)
        keep = torch.logical_or(keep, block_mask[:h, :w])
    return keep.to(masked_weight.dtype)


def ao_fails_or_misshapes(weight, level, block, zeros, norm):
    """True iff torch.ao raises or returns a mask whose shape is not the weight's."""
    try:
        (mask,) = ao_weight_norm_masks(weight, [level], block, zeros, norm)
    except RuntimeError:
        return True
    return mask.shape != weight.shape


def ao_handles(shape, level, block, zeros):
    """Whether torch.ao returns a mask of the right shape for this case."""
    vpb = block[0] * block[1]
    divisible = shape[0] % block[0] == 0 and shape[1] % block[1] == 0
    trivial = level <= 0 or zeros == 0 or (level >= 1 and zeros == vpb)
    return divisible or trivial or zeros == vpb


def shapes_for(block):
    bh, bw = block
    return [
        (2 * bh, 3 * bw),  # divisible
        (4 * bh, bw),  # divisible, a single block column
        (7, 13),  # primes
        (1, 11),  # 1 x N
        (11, 1),  # N x 1
        (max(1, bh - 1), max(1, bw - 1)),  # smaller than the block (or 1x1)
        (2 * bh + 1, 3 * bw + 2),  # partial edge blocks on both sides
    ]


def zeros_for(block):
    vpb = block[0] * block[1]
    return sorted({0, 1, vpb // 2, vpb - 1, vpb} - {-1})


def make_weight(shape, seed, kind):
    g = torch.Generator().manual_seed(seed)
    if kind == "int":  # many exact ties, many exact zeros
        return torch.randint(-2, 3, shape, generator=g).float()
    return torch.randn(shape, generator=g)


# --------------------------------------------------------------------------- #
# weight norm: exact equality with torch.ao
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("norm_name", list(NORMS))
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
def test_weight_norm_matches_torch_ao(block, norm_name):
    ao_norm, norm_fn = NORMS[norm_name]
    seed = 0
    checked_equal = checked_deviation = 0
    for shape in shapes_for(block):
        for zeros in zeros_for(block):
            for level in LEVELS:
                seed += 1
                weight = make_weight(shape, seed, "int" if seed % 2 else "randn")
                if ao_handles(shape, level, block, zeros):
                    # three steps: the 2nd and 3rd see the masked weight (ties!)
                    levels = [level] * 3
                    ours = ours_weight_norm_masks(weight, levels, block, zeros, norm_fn)
                    ref = ao_weight_norm_masks(weight, levels, block, zeros, ao_norm)
                    for step, (o, r) in enumerate(zip(ours, ref)):
                        assert o.dtype == weight.dtype
                        assert torch.equal(o, r.to(o.dtype)), (shape, zeros, level, step)
                    checked_equal += 1
                else:
                    assert ao_fails_or_misshapes(weight, level, block, zeros, ao_norm), (
                        "torch.ao now handles this case; update DEVIATIONS", shape, zeros, level)
                    mask = torch.ones_like(weight)
                    for step in range(2):
                        expected = ao_internal_mask(mask * weight, level, block, zeros, norm_fn)
                        mask = weight_norm_mask(mask * weight, level, block, zeros, norm_fn)
                        assert mask.shape == weight.shape
                        assert torch.equal(mask, expected), (shape, zeros, level, step)
                    checked_deviation += 1
    assert checked_equal > 0
    if block != (1, 1):
        assert checked_deviation > 0


@pytest.mark.parametrize("block", [(1, 4), (2, 2), (3, 5)], ids=str)
def test_padded_shape_result_is_cropped(block):
    # level >= 1 with partial blocks: torch.ao returns the *padded* mask; ours is it cropped.
    h, w = 2 * block[0] + 1, 3 * block[1] + 1
    zeros = block[0] * block[1] // 2 or 1
    weight = make_weight((h, w), 7, "randn")
    (ref,) = ao_weight_norm_masks(weight, [1.0], block, zeros, 2)
    assert ref.shape == (-(-h // block[0]) * block[0], -(-w // block[1]) * block[1])
    ours = weight_norm_mask(weight, 1.0, block, zeros, mm.l2_norm)
    assert torch.equal(ours, ref[:h, :w].to(ours.dtype))


def test_short_dim_of_one_gives_padded_shape_in_torch_ao():
    # 1 x 8 weight, (2, 4) blocks: torch.ao broadcasts (1, 8) | (2, 8) into a (2, 8) mask.
    weight = make_weight((1, 8), 3, "randn")
    (ref,) = ao_weight_norm_masks(weight, [0.5], (2, 4), 2, 2)
    assert ref.shape == (2, 8)
    ours = weight_norm_mask(weight, 0.5, (2, 4), 2, mm.l2_norm)
    assert ours.shape == (1, 8)
    assert torch.equal(ours, ao_internal_mask(weight, 0.5, (2, 4), 2, mm.l2_norm))


def test_partial_blocks_padding_and_counts():
    # 1 x 6 weight, (1, 4) blocks, 3 zeros per block: the partial block [a, b] has
    # only two real entries, both dropped (the NaN padding sorts last).
    weight = torch.tensor([[4.0, 1.0, 3.0, 2.0, 5.0, 6.0]])
    ours = weight_norm_mask(weight, 1.0, (1, 4), 3, mm.l1_norm)
    assert ours.tolist() == [[1.0, 0.0, 0.0, 0.0, 0.0, 0.0]]


def test_partial_edge_block_scored_by_mean_of_real_elements():
    # block 0 = [1, 1, 1, 1] (sum 4, mean 1), block 1 = [2] (sum 2, mean 2):
    # avg_pool2d(ceil_mode=True) divides the edge block by 1, so block 0 is dropped.
    weight = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0]])
    (ref,) = ao_weight_norm_masks(weight, [0.5], (1, 4), 4, 1)
    ours = weight_norm_mask(weight, 0.5, (1, 4), 4, mm.l1_norm)
    assert ours.tolist() == [[0.0, 0.0, 0.0, 0.0, 1.0]]
    assert torch.equal(ours, ref.to(ours.dtype))


@pytest.mark.parametrize(
    "num_blocks, level, dropped",
    [(5, 0.5, 2), (5, 0.7, 4), (5, 0.3, 2), (10, 0.99, 9), (10, 0.95, 9), (4, 0.125, 0), (1, 0.9, 0)],
)
def test_block_count_rounding_and_clamp(num_blocks, level, dropped):
    # round() is Python's (half to even), then clamped to [0, num_blocks - 1].
    weight = torch.arange(1.0, 4 * num_blocks + 1).reshape(1, -1)
    ours = weight_norm_mask(weight, level, (1, 4), 4, mm.l1_norm)
    assert int((ours == 0).sum()) == 4 * dropped
    (ref,) = ao_weight_norm_masks(weight, [level], (1, 4), 4, 1)
    assert torch.equal(ours, ref.to(ours.dtype))


@pytest.mark.parametrize(
    "block, zeros, kind",
    [((1, 4), 4, "int"), ((1, 4), 2, "int"), ((4, 4), 2, "randn"), ((2, 2), 3, "int"), ((3, 5), 15, "int")],
)
@pytest.mark.parametrize("norm_name", ["l2", "callable"])
def test_100_repeated_steps(block, zeros, kind, norm_name):
    ao_norm, norm_fn = NORMS[norm_name]
    shape = (4 * block[0], 6 * block[1])
    weight = make_weight(shape, 11, kind)
    weight[0, :] = 0  # natural zeros tie with masked ones
    levels = [0.6] * 100
    ours = ours_weight_norm_masks(weight, levels, block, zeros, norm_fn)
    ref = ao_weight_norm_masks(weight, levels, block, zeros, ao_norm)
    for step, (o, r) in enumerate(zip(ours, ref)):
        assert torch.equal(o, r.to(o.dtype)), step
    # no collapse (pytorch #62807): the number of zeros never exceeds what one step removes
    num_blocks = (shape[0] // block[0]) * (shape[1] // block[1])
    max_zeros = min(num_blocks - 1, round(0.6 * num_blocks)) * zeros
    counts = [int((m == 0).sum()) for m in ours]
    assert max(counts) <= max_zeros
    assert counts[-1] == counts[0]


def test_changing_schedule_follows_torch_ao():
    weight = make_weight((16, 24), 5, "int")
    levels = [0.1, 0.3, 0.5, 0.7, 0.9, 1.0, 0.8, 0.4, 0.0, 0.6]
    for block, zeros in [((1, 4), 4), ((2, 2), 2), ((4, 4), 10)]:
        ours = ours_weight_norm_masks(weight, levels, block, zeros, mm.l1_norm)
        ref = ao_weight_norm_masks(weight, levels, block, zeros, 1)
        for step, (o, r) in enumerate(zip(ours, ref)):
            assert torch.equal(o, r.to(o.dtype)), (block, step)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_float_dtypes(dtype):
    weight = make_weight((8, 12), 2, "randn").to(dtype)
    for block, zeros in [((2, 2), 2), ((1, 4), 4)]:
        (ref,) = ao_weight_norm_masks(weight, [0.5], block, zeros, 2)
        ours = weight_norm_mask(weight, 0.5, block, zeros, mm.l2_norm)
        assert ours.dtype == dtype
        assert torch.equal(ours, ref.to(dtype))


def test_trivial_configs_any_shape_and_dtype():
    w4 = torch.randn(2, 3, 4, 5)
    assert torch.equal(weight_norm_mask(w4, 0.0, (1, 4), 4, mm.l2_norm), torch.ones(2, 3, 4, 5))
    assert torch.equal(weight_norm_mask(w4, 0.7, (1, 4), 0, mm.l2_norm), torch.ones(2, 3, 4, 5))
    assert torch.equal(weight_norm_mask(w4, 1.0, (1, 4), 4, mm.l2_norm), torch.zeros(2, 3, 4, 5))
    wi = torch.ones(3, 4, dtype=torch.int64)
    assert weight_norm_mask(wi, 0.0, (1, 4), 4, mm.l2_norm).dtype == torch.float32


def test_non_2d_weight_rejected():
    with pytest.raises(ValueError, match=r"expected a 2-D tensor, got shape \(2, 3, 4\) \(3-D\)"):
        weight_norm_mask(torch.randn(2, 3, 4), 0.5, (1, 4), 4, mm.l2_norm)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_empty_weight():
    weight = torch.zeros(5, 0)
    with pytest.raises(RuntimeError):
        ao_weight_norm_masks(weight, [0.5], (1, 4), 4, 2)
    ours = weight_norm_mask(weight, 0.5, (1, 4), 4, mm.l2_norm)
    assert ours.shape == (5, 0)


def test_integer_norm_uses_exact_means():
    weight = torch.tensor([[1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0, 1.0]])

    def int_norm(t):
        return t.long()

    # torch.ao's avg_pool2d truncates 1.25 -> 1, ties the blocks and drops block 0
    (ref,) = ao_weight_norm_masks(weight, [0.5], (1, 4), 4, int_norm)
    assert ref.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]]
    ours = weight_norm_mask(weight, 0.5, (1, 4), 4, int_norm)
    assert ours.tolist() == [[1, 1, 1, 1, 0, 0, 0, 0]]
    # block-level with integer norms: torch.ao raises, we compute it
    with pytest.raises(RuntimeError):
        ao_weight_norm_masks(weight, [0.5], (1, 4), 2, int_norm)
    expected = ao_internal_mask(weight, 0.5, (1, 4), 2, mm.l1_norm)
    assert torch.equal(weight_norm_mask(weight, 0.5, (1, 4), 2, int_norm), expected)


def test_norm_fn_must_keep_shape():
    with pytest.raises(ValueError, match=r"norm_fn must return a tensor of the weight's shape \(4, 8\), got \(32,\)"):
        weight_norm_mask(torch.randn(4, 8), 0.5, (1, 4), 4, lambda t: t.flatten())


def test_out_argument():
    weight = make_weight((6, 10), 9, "randn")
    buf = torch.full((6, 10), 7.0)
    res = weight_norm_mask(weight, 0.5, (2, 4), 3, mm.l2_norm, out=buf)
    assert res is buf
    assert torch.equal(buf, weight_norm_mask(weight, 0.5, (2, 4), 3, mm.l2_norm))
    assert weight_norm_mask(weight, 0.0, (2, 4), 3, mm.l2_norm, out=buf) is buf
    assert torch.equal(buf, torch.ones(6, 10))
    with pytest.raises(ValueError, match=r"out has shape \(2, 2\) but the mask has shape \(6, 10\)"):
        weight_norm_mask(weight, 0.5, (2, 4), 3, mm.l2_norm, out=torch.empty(2, 2))


def test_non_contiguous_weight():
    weight = make_weight((12, 10), 4, "int")
    for block, zeros in [((2, 4), 8), ((2, 4), 3), ((3, 5), 7)]:
        expected = weight_norm_mask(weight.contiguous(), 0.5, block, zeros, mm.l2_norm)
        t = weight.t().contiguous().t()  # same values, column-major strides
        assert not t.is_contiguous()
        assert torch.equal(weight_norm_mask(t, 0.5, block, zeros, mm.l2_norm), expected)


def test_weight_requiring_grad_is_not_tracked():
    weight = torch.randn(4, 8, requires_grad=True)
    mask = weight_norm_mask(weight, 0.5, (1, 4), 2, mm.l2_norm)
    assert not mask.requires_grad


def test_resolve_norm_fn():
    t = torch.tensor([-2.0, 3.0])
    assert torch.equal(mm.resolve_norm_fn(None)(t), t * t)
    assert torch.equal(mm.resolve_norm_fn(2)(t), t * t)
    assert torch.equal(mm.resolve_norm_fn(1)(t), t.abs())
    assert mm.resolve_norm_fn(shifted_norm) is shifted_norm
    with pytest.raises(ValueError, match=r"norm must be 1 \(L1\), 2 \(L2\), None \(L2\) or a callable.*got 3"):
        mm.resolve_norm_fn(3)


# --------------------------------------------------------------------------- #
# nearly diagonal
# --------------------------------------------------------------------------- #
def ao_nearly_diagonal(shape, nearliness):
    lin = _linear_holding(torch.randn(shape))
    sp = AONearlyDiagonal(nearliness=nearliness)
    sp.prepare(nn.Sequential(lin), [{"tensor_fqn": "0.weight"}])
    sp.step()
    return lin.parametrizations.weight[0].mask.clone()


@pytest.mark.parametrize("nearliness", [1, 3, 5, 0, -1, -2])
@pytest.mark.parametrize("shape", [(5, 5), (4, 7), (7, 4), (3, 3), (3, 10), (12, 6), (1, 1)], ids=str)
def test_nearly_diagonal_matches_torch_ao(shape, nearliness):
    if nearliness // 2 >= min(shape):
        with pytest.raises(ValueError, match="nearliness cannot be larger"):
            ao_nearly_diagonal(shape, nearliness)
        with pytest.raises(ValueError, match=rf"nearliness {nearliness} is too large"):
            nearly_diagonal_mask(shape, nearliness)
        return
    ref = ao_nearly_diagonal(shape, nearliness)
    ours = nearly_diagonal_mask(shape, nearliness)
    assert ours.dtype == torch.float32 and ours.shape == shape
    assert torch.equal(ours, ref)
    i = torch.arange(shape[0])[:, None]
    j = torch.arange(shape[1])[None, :]
    expected = ((i - j).abs() <= nearliness // 2) if nearliness > 0 else torch.zeros(shape, dtype=torch.bool)
    assert torch.equal(ours.bool(), expected)


def test_nearly_diagonal_dtype_device_out():
    m = nearly_diagonal_mask((4, 6), 3, dtype=torch.float64, device="cpu")
    assert m.dtype == torch.float64
    buf = torch.full((4, 6), 9.0)
    assert nearly_diagonal_mask((4, 6), 3, out=buf) is buf
    assert torch.equal(buf, m.float())
    # a non-contiguous out buffer
    buf_t = torch.full((6, 4), 9.0).t()
    nearly_diagonal_mask((4, 6), 3, out=buf_t)
    assert torch.equal(buf_t, m.float())
    # nearliness <= 0 gives zeros for any shape, as torch.ao
    assert torch.equal(nearly_diagonal_mask((2, 3, 4), 0), torch.zeros(2, 3, 4))


def test_nearly_diagonal_torch_ao_rejects_even_and_float():
    with pytest.raises(ValueError, match="odd"):
        ao_nearly_diagonal((5, 5), 2)
    with pytest.raises(ValueError, match=r"nearliness must be odd, got 2; use 1 or 3"):
        nearly_diagonal_mask((5, 5), 2)
    with pytest.raises(TypeError):
        ao_nearly_diagonal((5, 5), 3.0)
    with pytest.raises(ValueError, match=r"nearliness must be an int, got 3.0 \(float\)"):
        nearly_diagonal_mask((5, 5), 3.0)
    with pytest.raises(ValueError, match=r"nearliness needs a 2-D tensor, got shape \(2, 3, 4\)"):
        nearly_diagonal_mask((2, 3, 4), 1)


# --------------------------------------------------------------------------- #
# check_* messages
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "level, pattern",
    [
        (math.nan, r"sparsity_level must be a real number, got nan \(float\)"),
        ("0.5", r"sparsity_level must be a real number, got '0.5' \(str\); pass a float"),
        (True, r"got True \(bool\)"),
        (None, r"got None \(NoneType\)"),
        (torch.tensor(0.5), r"got tensor\(0.5000\) \(Tensor\); pass a float such as 0.5 \(use .item\(\) for a tensor\)"),
    ],
)
def test_check_weight_norm_config_level(level, pattern):
    with pytest.raises(ValueError, match=pattern):
        check_weight_norm_config(level, (1, 4), 4)


@pytest.mark.parametrize(
    "block",
    [(1,), (1, 4, 1), (0, 4), (1, -4), (1.0, 4), (True, 4), "14", None, 4, (1, "4")],
    ids=repr,
)
def test_check_weight_norm_config_block(block):
    msg = ("sparse_block_shape must be a tuple or list of two positive ints (block_rows, block_cols), "
           f"got {block!r} ({type(block).__name__}); pass e.g. (1, 4)")
    with pytest.raises(ValueError, match=re.escape(msg)):
        check_weight_norm_config(0.5, block, 1)


@pytest.mark.parametrize("zeros", [-1, 5, 2.0, None, True])
def test_check_weight_norm_config_zeros(zeros):
    msg = (f"zeros_per_block must be an int in [0, 4] (a 1x4 block has 4 elements), "
           f"got {zeros!r} ({type(zeros).__name__}); pass 4 to zero whole blocks or a smaller int "
           "for partial blocks")
    with pytest.raises(ValueError, match=re.escape(msg)):
        check_weight_norm_config(0.5, (1, 4), zeros)


def test_check_weight_norm_config_accepts_valid_and_prefixes_where():
    for level in (0, 0.0, 1, 0.5, -1.0, 2):  # outside [0, 1]: acts as 0 or 1, as in torch.ao
        for block, zeros in (((1, 4), 0), ([2, 3], 6), ((1, 1), 1)):
            check_weight_norm_config(level, block, zeros)
    with pytest.raises(ValueError, match=r"^group 'fc1.weight': zeros_per_block must be an int in \[0, 6\]"):
        check_weight_norm_config(0.5, [2, 3], 7, where="group 'fc1.weight'")
    with pytest.raises(ValueError, match=r"^group 'fc1.weight': sparsity_level"):
        check_weight_norm_config(math.nan, (1, 4), 4, where="group 'fc1.weight'")
    check_weight_norm_config(0.5, [2, 3], 7, ranges=False)  # the range is torch.ao's step-time check
    with pytest.raises(ValueError, match=r"^group 'fc1.weight': sparse_block_shape"):
        check_weight_norm_config(0.5, (1, 0), 0, where="group 'fc1.weight'")


def test_weight_norm_mask_validates_config():
    with pytest.raises(ValueError, match=r"zeros_per_block must be an int in \[0, 4\]"):
        weight_norm_mask(torch.randn(4, 8), 0.5, (1, 4), 5, mm.l2_norm)
    torch.testing.assert_close(weight_norm_mask(torch.randn(4, 8), 1.2, (1, 4), 4, mm.l2_norm), torch.zeros(4, 8))
    torch.testing.assert_close(weight_norm_mask(torch.randn(4, 8), -3, (1, 4), 4, mm.l2_norm), torch.ones(4, 8))


@pytest.mark.parametrize(
    "nearliness, shape, pattern",
    [
        (3.0, None, r"nearliness must be an int, got 3.0 \(float\); pass an odd positive int such as 1, 3 or 5"),
        (True, None, r"nearliness must be an int, got True \(bool\)"),
        ("3", (4, 4), r"nearliness must be an int, got '3' \(str\)"),
        (4, None, r"nearliness must be odd, got 4; use 3 or 5"),
        (2, (10, 10), r"nearliness must be odd, got 2; use 1 or 3"),
        (5, (2, 8), r"nearliness 5 is too large for a tensor of shape \(2, 8\): nearliness // 2 = 2 must be "
                    r"smaller than min\(shape\) = 2; use an odd nearliness <= 3"),
        (3, (8, 1), r"nearliness 3 is too large for a tensor of shape \(8, 1\).*<= 1"),
        (3, (2, 3, 4), r"nearliness needs a 2-D tensor, got shape \(2, 3, 4\)"),
    ],
)
def test_check_nearliness_errors(nearliness, shape, pattern):
    with pytest.raises(ValueError, match=pattern):
        check_nearliness(nearliness, shape)


def test_check_nearliness_accepts_and_prefixes_where():
    for n in (1, 3, 5, 0, -1, -2, -4):
        check_nearliness(n)
    check_nearliness(-2, (1, 1))  # <= 0: no further checks, as torch.ao
    check_nearliness(3, (2, 2))
    check_nearliness(3, torch.Size([2, 5]))
    with pytest.raises(ValueError, match=r"^layer 'fc': nearliness must be odd"):
        check_nearliness(6, where="layer 'fc'")
    check_nearliness(6, (4, 4), ranges=False)  # odd and small enough: torch.ao's step-time checks
    check_nearliness(21, (4, 4), ranges=False)


def test_check_2d_messages():
    check_2d(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"^expected a 2-D tensor, got shape \(3,\) \(1-D\); this mask is only "
                                         r"defined for 2-D weights"):
        check_2d(torch.zeros(3))
    with pytest.raises(ValueError, match=r"^group 'conv.weight': expected a 2-D tensor, got shape "
                                         r"\(8, 3, 3, 3\) \(4-D\)"):
        check_2d(torch.zeros(8, 3, 3, 3), where="group 'conv.weight'")
    with pytest.raises(ValueError, match=r"expected a 2-D torch.Tensor, got list"):
        check_2d([[1.0]])


def test_deviations_documented():
    assert len(mm.DEVIATIONS) >= 5
    assert all(isinstance(d, str) and d for d in mm.DEVIATIONS)
