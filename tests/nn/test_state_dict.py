"""state_dict compatibility with torch.nn, both ways, for every case; the same keys and values."""

import io

import pytest
import torch

import normkit as nk
from helpers import CASES, ChannelsLastLayerNorm, make_input


def _torch_side(module):
    return module.norm if isinstance(module, ChannelsLastLayerNorm) else module


@pytest.mark.parametrize("case", CASES, ids=str)
def test_round_trip_both_ways(case):
    ours, theirs = case.build()
    # train ours a little so the buffers hold real values
    ours.train()
    for seed in range(2):
        ours(make_input(case.shape, seed=seed))
    target = _torch_side(case.theirs(*case.args, **case.kwargs))
    assert set(target.state_dict()) == set(ours.state_dict()), "keys differ"
    target.load_state_dict(ours.state_dict())  # normkit -> torch.nn (strict)
    back = case.ours(*case.args, **case.kwargs)
    back.load_state_dict(target.state_dict())  # torch.nn -> normkit (strict)
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
        assert torch.equal(target.state_dict()[key], value), key


def test_old_checkpoint_without_num_batches_tracked_loads():
    """torch's version-1 checkpoints lack num_batches_tracked; the migration is torch's own."""
    state = nk.BatchNorm2d(3).state_dict()
    del state["num_batches_tracked"]
    state._metadata = {"": {"version": 1}}
    layer = nk.BatchNorm2d(3)
    layer.load_state_dict(state)
    assert int(layer.num_batches_tracked) == 0


def test_skip_counter_is_not_in_the_state_dict():
    layer = nk.BatchNorm2d(3)
    assert "num_batches_skipped" not in layer.state_dict()
    assert "num_batches_skipped" in dict(layer.named_buffers())


def test_save_and_load_with_weights_only():
    layer = nk.BatchNorm2d(3, momentum=None)
    layer(make_input((4, 3, 2, 2)))
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    restored = nk.BatchNorm2d(3, momentum=None)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(restored.running_var, layer.running_var)


def test_device_and_dtype_arguments():
    layer = nk.GroupNorm(2, 4, device="cpu", dtype=torch.float64)
    assert layer.weight.dtype == torch.float64 and layer.weight.device.type == "cpu"
    bn = nk.BatchNorm2d(3, dtype=torch.float64)
    assert bn.running_mean.dtype == torch.float64 and bn.num_batches_tracked.dtype == torch.long
    assert bn.num_batches_skipped.dtype == torch.long


def test_module_to_moves_everything():
    bn = nk.BatchNorm2d(3).to(torch.float64)
    assert all(b.dtype in (torch.float64, torch.long) for b in bn.buffers())
