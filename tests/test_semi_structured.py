"""2:4 semi-structured lowering: the checks run everywhere; the kernels need a CUDA GPU (``cuda`` marker)."""
import pytest
import torch
from torch import nn

import fx_sparsity as fxs
from fx_sparsity.nn.semi_structured import is_two_four, semi_structured_problem


def two_four_weight(rows=64, cols=128, dtype=torch.float16, device="cpu"):
    torch.manual_seed(0)
    weight = torch.randn(rows, cols, dtype=dtype, device=device)
    keep = torch.tensor([1, 1, 0, 0], dtype=torch.bool, device=device).repeat(rows, cols // 4)
    return weight, keep


def nm_prepared(dtype=torch.float32, device="cpu", width=128):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 64)).to(device=device, dtype=dtype)
    sparsifier = fxs.NMSparsifier(2, 4)
    prepared = fxs.prepare_fx_sparse(model, sparsifier)
    sparsifier.step()
    return prepared


def test_two_four_pattern_check():
    weight, keep = two_four_weight()
    assert is_two_four(weight * keep)
    assert not is_two_four(weight)
    three = keep.clone()
    three[0, 2] = True  # one run keeps 3 of 4
    assert not is_two_four(weight * three)


def test_every_refusal_names_its_reason():
    weight, keep = two_four_weight()
    assert semi_structured_problem((weight * keep).float()).startswith(
        "the 2:4 kernels take float16 or bfloat16 weights, this one is torch.float32")
    assert "is not 2:4 along the input dim" in semi_structured_problem(weight)
    small, small_keep = two_four_weight(16, 128)
    assert semi_structured_problem(small * small_keep) == (
        "the 2:4 kernels need out_features % 32 == 0 and in_features % 64 == 0, the weight is (16, 128)")
    assert semi_structured_problem(weight * keep) == "the 2:4 kernels run on CUDA only, the weight is on cpu"
    with pytest.raises(ValueError, match="SemiStructuredSparseLinear: the 2:4 kernels run on CUDA only"):
        fxs.SemiStructuredSparseLinear.from_masked(weight, keep, None)


def test_lowering_refuses_before_changing_anything():
    prepared = nm_prepared()
    before = prepared.code
    for mapping in (fxs.get_sparse_semi_structured_mapping(), "semi_structured"):
        with pytest.raises(fxs.SparsityConfigError, match=r"cannot be stored 2:4 semi-structured:\n  '0.weight': "
                                                          r"the 2:4 kernels take float16"):
            fxs.convert_fx_sparse(prepared, mapping, inplace=True)
    assert prepared.code == before


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_matches_the_masked_layer_and_round_trips(dtype):
    prepared = nm_prepared(dtype, "cuda")
    x = torch.randn(64, 128, dtype=dtype, device="cuda")
    lowered = fxs.convert_fx_sparse(prepared, "semi_structured")
    assert type(lowered.get_submodule("0")) is fxs.SemiStructuredSparseLinear
    torch.testing.assert_close(lowered(x), prepared(x), rtol=2e-2, atol=2e-2)
    plain = nn.Linear(128, 128).to("cuda", dtype)
    plain.load_state_dict(lowered.get_submodule("0").state_dict())  # saved dense: loads into nn.Linear
    assert is_two_four(plain.weight)
    compiled = torch.compile(lowered)
    torch.testing.assert_close(compiled(x), lowered(x))


@pytest.mark.cuda
def test_cuda_auto_never_slower_than_dense():
    prepared = nm_prepared(torch.float16, "cuda", width=1024)
    x = torch.randn(256, 1024, dtype=torch.float16, device="cuda")
    lowered = fxs.convert_fx_sparse(prepared, "auto", example_inputs=(x,))
    for name in ("0", "2"):
        info = lowered.get_submodule(name).fx_sparsity_info
        assert "2:4" in info["candidates_ms"] or "2:4" in info.get("not_timed", {})
        assert info["auto_choice"] == "dense" or info["speedup_vs_dense"] >= 1.05


def test_a_gpu_without_a_2_4_kernel_is_named(monkeypatch):
    """No cuSPARSELt in the build: CUTLASS's kernels cover sm8x only (pytorch#132928); other GPUs are refused."""
    from fx_sparsity.nn import semi_structured

    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert semi_structured._kernel_problem(torch.device("cuda")) == (
        "this torch build has no cuSPARSELt, and its CUTLASS 2:4 kernels run on sm8x GPUs only; this GPU is sm90 "
        "(install a torch CUDA build that ships cuSPARSELt)")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert semi_structured._kernel_problem(torch.device("cuda")) is None
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert semi_structured._kernel_problem(torch.device("cuda")) is None
