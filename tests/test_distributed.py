"""DDP and FSDP2 over a prepared module: 2 processes, gloo, 127.0.0.1.

One spawn (module fixture) runs every recipe in ``_distributed_worker.py``; the tests
compare what the two ranks held after every step with each other and with a single
process trained on both ranks' batches.
"""
from __future__ import annotations

import _distributed_worker as worker
import pytest
import torch
import torch.distributed as dist

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                                   reason="needs torch.distributed with gloo")]
WORLD = 2


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: with 2 threads on a busy machine an OpenMP region costs milliseconds (see test_fuzz)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return worker.spawn(worker.run, WORLD, tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def single_process():
    return worker.reference(WORLD)


def assert_equal_dicts(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}: {k}"


def assert_close_to_single_process(records, reference) -> None:
    """Same training up to float summation order: weights close, masks (nearly) the same."""
    for step, (got, want) in enumerate(zip(records, reference)):
        for k in want["weights"]:
            torch.testing.assert_close(got["weights"][k], want["weights"][k], rtol=1e-4, atol=1e-5,
                                       msg=f"step {step} {k}")
        for k in want["masks"]:
            agree = (got["masks"][k].float() == want["masks"][k].float()).float().mean().item()
            assert agree >= 0.99, (step, k, agree)


@pytest.mark.parametrize("recipe", ["ddp_every_rank", "ddp_layers", "ddp_bool_broadcast", "fsdp2", "fsdp2_layers",
                                    "fsdp2_sharded_masks"])
def test_masks_and_weights_identical_on_every_rank_at_every_step(ranks, single_process, recipe):
    zero, one = ranks[0][recipe], ranks[1][recipe]
    assert len(zero) == len(one) == worker.STEPS
    for step, (a, b) in enumerate(zip(zero, one)):
        assert_equal_dicts(a["masks"], b["masks"], f"{recipe} step {step} masks")
        assert_equal_dicts(a["weights"], b["weights"], f"{recipe} step {step} weights")
        assert a["levels"] == b["levels"]
    # It did prune, along the schedule, and trained like one process on the whole batch.
    assert zero[-1]["levels"] == [0.75, 0.75, 0.5]
    assert zero[-1]["masks"]["0.weight"].float().mean().item() == 0.25
    assert_close_to_single_process(zero, single_process)


def test_bool_masks_stay_bool_through_buffer_broadcast(ranks):
    for rank in ranks:
        assert rank["ddp_bool_broadcast"][-1]["masks"]["2.weight"].dtype == torch.bool


def test_rank0_only_step_relies_on_broadcast_buffers(ranks, single_process):
    """Only rank 0 steps: the other ranks hold stale masks until the next forward broadcasts them."""
    zero, one = ranks[0]["ddp_rank0_broadcast"], ranks[1]["ddp_rank0_broadcast"]
    seen = [rank["ddp_rank0_broadcast_seen_at_forward"] for rank in ranks]
    stale = 0
    for step in range(worker.STEPS):
        assert_equal_dicts(zero[step]["weights"], one[step]["weights"], f"step {step} weights")
        # What each forward multiplies by: rank 0's masks, on both ranks.
        assert_equal_dicts(seen[0][step + 1], zero[step]["masks"], f"step {step} rank 0 forward")
        assert_equal_dicts(seen[1][step + 1], zero[step]["masks"], f"step {step} rank 1 forward")
        # Between rank 0's step() and the next forward, rank 1 still holds the masks of the last forward.
        assert_equal_dicts(one[step]["masks"], seen[1][step], f"step {step} rank 1 after step")
        stale += not all(torch.equal(zero[step]["masks"][k], one[step]["masks"][k]) for k in zero[step]["masks"])
    assert stale >= 3  # every step that changed a mask (the schedule ramps for 3 steps)
    assert_close_to_single_process(zero, single_process)


def test_fsdp2_findings(ranks):
    for rank in ranks:
        # fully_shard shards parameters into DTensors; masks are buffers and stay whole tensors.
        assert rank["param_types"] == ["DTensor"] and rank["mask_types"] == ["Tensor"]
        # step() on the shards gathers the whole weights itself (and leaves them sharded) ...
        assert rank["sharded_step"] == {"zeros": [0.5, 0.5, 0.5], "param_types": ["DTensor"]}
        # ... and squash_mask() between unshard() and reshard(), which would lose the fold, is refused.
        assert rank["unsharded_squash_error"] == (
            "squash_mask() on an unsharded FSDP2 module: reshard() would drop the folded weights; call "
            "prepared.reshard() first (squash_mask works on the DTensor shards)")
        # fully_shard on an inlined layer: its forward (which would gather the weight) never runs.
        assert rank["per_layer_error"] == ("aten.mul.Tensor got mixed torch.Tensor and DTensor, need to convert "
                                           "all torch.Tensor to DTensor before calling distributed operators!")
        squashed = rank["squashed"]
        assert not squashed["has_masks"]
        assert_equal_dicts(squashed["weights"], squashed["expected"], "squashed shards")
    torch.testing.assert_close(ranks[0]["squashed"]["output"], ranks[1]["squashed"]["output"], rtol=0, atol=0)


def test_fsdp2_per_layer_on_scope_layers(ranks):
    """fully_shard on each layer GraphModule and the root: masks whole on every rank, layers put back by squash."""
    for rank in ranks:
        sizes = rank["fsdp2_layers_bytes"]
        # masks are whole (float32, like the weights); each rank holds half of every weight
        assert sizes["mask"] == 2 * sizes["weight_shard"] == (32 * 16 + 32 * 32 + 10 * 32) * 4
        # sharded layers stay (mask-free) GraphModules: the original Linear cannot run on DTensor shards
        assert rank["fsdp2_layers_squashed"]["classes"] == ["FSDPLinear"] * 3
        assert not rank["fsdp2_layers_squashed"]["has_masks"]
    torch.testing.assert_close(ranks[0]["fsdp2_layers_squashed"]["output"], ranks[1]["fsdp2_layers_squashed"]["output"],
                               rtol=0, atol=0)


def test_fsdp2_masks_sharded_like_the_weights(ranks):
    """masks_as_parameters before fully_shard: each rank holds half of every mask, same training."""
    full = (32 * 16 + 32 * 32 + 10 * 32) * 4
    for rank in ranks:
        assert rank["masks_as_parameters"] == ["0.weight_mask", "2.weight_mask", "4.weight_mask"]
        assert rank["fsdp2_sharded_masks_bytes"] == full // 2  # was `full` on every rank with mask buffers
        assert rank["fsdp2_sharded_masks_keys"] == ["0.weight_mask", "2.weight_mask", "4.weight_mask"]
        assert rank["sharded_masks_squash_error"] == (
            "squash_mask(): ['0.weight_mask', '2.weight_mask', '4.weight_mask'] are masks FSDP2 shards as parameters "
            "(masks_as_parameters)")
    # the same masks and weights as whole masks give, step by step
    for got, want in zip(ranks[0]["fsdp2_sharded_masks"], ranks[0]["fsdp2_layers"]):
        assert_equal_dicts(got["masks"], want["masks"], "sharded vs whole masks")
        for k in want["weights"]:
            torch.testing.assert_close(got["weights"][k], want["weights"][k], rtol=1e-6, atol=1e-7)
