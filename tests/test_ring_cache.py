"""Ring KV caches: a planned write (`plan_write`, what a compiled DiT pass makes) stores and returns
exactly what the eager write does, wrapping around the ring and beside sink frames."""

from __future__ import annotations

import pytest
import torch

from matrixgame_env.world.cache import RingKVCache


def _pair(batch_shape, capacity, tokens_per_frame, sink):
    return [RingKVCache(batch_shape, capacity, tokens_per_frame, 2, 3, sink=sink) for _ in range(2)]


def _block(batch_shape, frames, tokens_per_frame, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (*batch_shape, frames * tokens_per_frame, 2, 3)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize(
    "batch_shape, capacity, tokens_per_frame, sink, frames",
    [((1,), 6, 4, 0, 3), ((2, 5), 6, 1, 0, 3), ((1,), 7, 2, 1, 3), ((2,), 5, 3, 0, 2)],
)
def test_planned_writes_equal_eager_writes(batch_shape, capacity, tokens_per_frame, sink, frames):
    eager, planned = _pair(batch_shape, capacity, tokens_per_frame, sink)
    for block in range(8):  # fills, then wraps around the ring several times
        start = block * frames
        for rewrite in range(2):  # the denoising steps and the context re-run write the same frames
            key, value = _block(batch_shape, frames, tokens_per_frame, seed=10 * block + rewrite)
            expected = eager.update(start, key, value)
            planned.plan_write(start, frames)
            got = planned.update(start + 1000, key, value)  # a planned write ignores the frame number
            planned.clear_plan()
            assert got[0].shape == expected[0].shape
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
            assert (planned.end_frame, planned.last_write) == (eager.end_frame, eager.last_write)
        assert planned.full_after(start, frames) == (start + frames >= capacity)
    assert torch.equal(planned.key, eager.key) and torch.equal(planned.value, eager.value)


def test_a_planned_write_is_checked_like_an_eager_one():
    cache = RingKVCache((1,), 6, 2, 2, 3)
    key, value = _block((1,), 3, 2, seed=0)
    cache.update(6, key, value)
    with pytest.raises(ValueError, match="cannot write frames 0..2: the cache already holds frames up to 8"):
        cache.plan_write(0, 3)
    with pytest.raises(ValueError, match="a write of 7 frames does not fit a cache window of 6 frames"):
        cache.plan_write(9, 7)
    cache.plan_write(9, 2)
    with pytest.raises(ValueError, match="a write of 6 tokens, but 2 frames were planned"):
        cache.update(9, key, value)
    cache.clear_plan()
    assert cache.planned_slots is None
