"""Noise drawn ahead (`world.noise`): the same values as drawn when needed, whatever reads the streams;
conditions built ahead (`BlockConditions`): those of the next block, or built again.

On CUDA the sampler draws a block's noise right after queueing the block before; here the same
bookkeeping runs on the CPU (`draw_noise_ahead = True`) and every result must be bit-identical to a
sampler that draws when needed, through snapshots, restores, forks, given noise, merges and a vector
env whose worlds reset at different times."""

import numpy as np
import pytest
import torch
from tiny import tiny_dit
from tiny_model import write_tiny_model

from matrixgame_env.vector import MatrixGameVectorEnv
from matrixgame_env.world.condition import ImageLatents
from matrixgame_env.world.merge import absorb, merge_states
from matrixgame_env.world.model import WorldModel
from matrixgame_env.world.noise import draw_ahead
from matrixgame_env.world.sampler import SamplerConfig, StreamingSampler

LATENT = (4, 8)


@pytest.fixture(scope="module")
def samplers():
    """Two samplers of one model: drawing ahead (True) and drawing when needed (False)."""
    model = tiny_dit()
    pair = {}
    for ahead in (True, False):
        pair[ahead] = StreamingSampler(model, SamplerConfig(), latent_size=LATENT)
        pair[ahead].draw_noise_ahead = ahead
    return pair


def _start(sampler, batch, seed):
    g = torch.Generator().manual_seed(1)
    image = torch.randn(batch, 16, 2, *LATENT, generator=g)
    context = torch.randn(batch, 5, 1280, generator=g)
    return sampler.start(image, context, seed=seed)


def _step(sampler, state, k, **kwargs):
    g = torch.Generator().manual_seed(100 + k)
    frames = sampler.video_frames_for_block(state)
    keyboard = (torch.rand(state.batch_size, frames, 4, generator=g) > 0.5).float()
    mouse = 0.1 * torch.randn(state.batch_size, frames, 2, generator=g)
    return sampler.step(state, keyboard, mouse, **kwargs)


def _script(sampler):
    """Blocks of one sequence of operations that read or bypass the random streams."""
    out = []
    state = _start(sampler, 3, seed=5)
    out += [_step(sampler, state, k) for k in range(3)]
    assert (state.drawn_noise is not None) == bool(sampler.draw_noise_ahead)
    snapshot = state.snapshot()
    out.append(_step(sampler, state, 3))
    given = torch.randn(3, 16, 3, *LATENT, generator=torch.Generator().manual_seed(9))
    out.append(_step(sampler, state, 4, noise=given))  # given noise: the streams stay where they were
    out.append(_step(sampler, state, 5))
    state.restore(snapshot)
    out.append(_step(sampler, state, 6))
    forked = state.fork(2)
    out.append(_step(sampler, forked, 7))
    out.append(_step(sampler, state, 7))
    picked = forked.select([5, 0])
    out.append(_step(sampler, picked, 8))
    out.append(_step(sampler, forked, 8))
    return out


def test_blocks_are_bit_identical_with_and_without_drawing_ahead(samplers):
    ahead, when_needed = _script(samplers[True]), _script(samplers[False])
    for k, (a, b) in enumerate(zip(ahead, when_needed, strict=True)):
        assert torch.equal(a, b), f"block {k} differs"


def test_conditions_built_ahead_are_the_next_blocks_and_are_used_once(samplers, monkeypatch):
    sampler = samplers[True]
    state = _start(sampler, 2, seed=3)
    built = []
    original = sampler._conditions
    monkeypatch.setattr(sampler, "_conditions", lambda s: built.append(s.frame) or original(s))
    for k in range(4):
        _step(sampler, state, k)
        prepared = state.prepared_conditions
        assert prepared.frame == state.frame and prepared.image is state.image
        fresh = original(state)
        assert torch.equal(prepared.cond, fresh.cond)
        pairs = [(prepared.rotations.dit, fresh.rotations.dit), (prepared.rotations.action, fresh.rotations.action)]
        for mine, theirs in pairs:
            assert torch.equal(mine.cos, theirs.cos) and torch.equal(mine.sin, theirs.sin)
    # the first block built its own, then each block built only the next one's
    assert built == [0, 3, 6, 9, 12]
    state.image = ImageLatents(state.image.latents + 1)  # another image condition: built again for the block
    built.clear()
    _step(sampler, state, 4)
    assert built == [12, 15]
    state.restore(state.snapshot())  # the same frame and image: still the block's
    built.clear()
    _step(sampler, state, 5)
    assert built == [18]


def test_settling_puts_every_generator_back_where_it_was():
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    before = [g.get_state() for g in generators]
    drawn = draw_ahead(generators, (2, 5), 3, torch.device("cpu"))
    assert len(drawn.tensors) == 3 and drawn.tensors[0].shape == (2, 5)
    assert not torch.equal(generators[0].get_state(), before[0])
    drawn.settle()
    for g, state in zip(generators, before):
        assert torch.equal(g.get_state(), state)
    # and the draws made again are the ones made ahead
    assert torch.equal(torch.randn(5, generator=generators[1]), drawn.tensors[0][1])


def test_drawn_noise_is_refused_for_other_generators_or_shapes(samplers):
    sampler = samplers[True]
    state = _start(sampler, 2, seed=1)
    _step(sampler, state, 0)
    drawn = state.drawn_noise
    assert drawn.matches(state.generators, drawn.shape, None)
    assert not drawn.matches(state.generators, (drawn.shape[0] + 1, *drawn.shape[1:]), None)
    assert not drawn.matches(list(reversed(state.generators)), drawn.shape, None)
    assert not drawn.matches(state.generators[:1], drawn.shape, None)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = write_tiny_model(tmp_path_factory.mktemp("tiny-noise-ahead"))
    return WorldModel.from_pretrained(folder, device="cpu")


def _merges(world):
    """Frames of states merged and absorbed after blocks that drew ahead (or not)."""

    def block(state, keyboard, mouse):
        return world.decode(state, world.step_latents(state, keyboard, mouse))

    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (16, 32, 3), dtype=np.uint8) for _ in range(4)]
    old, young, guest = world.start(pictures[:2], seed=[1, 2]), world.start(pictures[2:3], seed=[3]), None
    out = []
    for k in range(5):
        out.append(block(old, torch.ones(2, 4), torch.zeros(2, 2)))
        if k >= 3:
            out.append(block(young, torch.zeros(1, 4), torch.full((1, 2), 0.1)))
    merged = merge_states(world.sampler.model, [old, young])
    out.append(block(merged, torch.ones(3, 4), torch.zeros(3, 2)))
    guest = world.start(pictures[3:], seed=[4])
    for _ in range(2):
        out.append(block(guest, torch.zeros(1, 4), torch.zeros(1, 2)))
    absorb(world.sampler.model, merged, [1], guest)
    out += [block(merged, torch.ones(3, 4), torch.zeros(3, 2)) for _ in range(2)]
    return out


def _vector_run(world):
    venv = MatrixGameVectorEnv(model=world, num_envs=3, merge_cohorts=True)
    venv.prefer_in_place = True
    venv.reset(seed=20)
    rng = np.random.default_rng(5)
    frames = []
    for step in range(8):
        if step in (2, 3, 6):
            venv.reset_worlds([step % 3])
        keys = rng.integers(0, 2, (3, 4)).astype(np.int8)
        mouse = rng.uniform(-0.2, 0.2, (3, 2)).astype(np.float32)
        frames.append(venv.step({"keyboard": keys, "mouse": mouse})[4]["frames"])
    return frames


@pytest.mark.parametrize("run", [_merges, _vector_run])
def test_merged_states_and_vector_envs_are_bit_identical_with_and_without_drawing_ahead(world, run):
    results = {}
    for ahead in (True, False):
        world.sampler.draw_noise_ahead = ahead
        try:
            results[ahead] = run(world)
        finally:
            world.sampler.draw_noise_ahead = None
    assert len(results[True]) == len(results[False])
    for k, (a, b) in enumerate(zip(results[True], results[False])):
        assert np.array_equal(np.asarray(a), np.asarray(b)), f"result {k} differs"
