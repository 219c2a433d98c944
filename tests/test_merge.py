"""Joining world states that started at different times (`merge_states`) on a tiny random-weight model."""

import numpy as np
import pytest
import torch
from tiny_model import write_tiny_model

from matrixgame_env.env import MatrixGameEnv
from matrixgame_env.vector import MatrixGameVectorEnv
from matrixgame_env.world.graphs import ring_caches
from matrixgame_env.world.merge import absorb, can_merge, merge_states
from matrixgame_env.world.model import WorldModel


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = write_tiny_model(tmp_path_factory.mktemp("tiny-merge"))
    return WorldModel.from_pretrained(folder, device="cpu")


def _pictures(rng, n):
    return [rng.integers(0, 256, (16, 32, 3), dtype=np.uint8) for _ in range(n)]


def _actions(rng, n):
    keyboard = torch.tensor(rng.integers(0, 2, (n, 4)), dtype=torch.float32)
    mouse = torch.tensor(rng.uniform(-0.2, 0.2, (n, 2)), dtype=torch.float32)
    return keyboard, mouse


def _advance(world, state, rng, blocks):
    for _ in range(blocks):
        world.decode(state, world.step_latents(state, *_actions(rng, state.batch_size)))


def test_a_merged_state_continues_each_world_as_it_would_have_gone_on_alone(world):
    rng = np.random.default_rng(0)
    old = world.start(_pictures(rng, 2), seed=[1, 2])
    young = world.start(_pictures(rng, 1), seed=[3])
    _advance(world, old, rng, 5)  # latent frame 15: its image condition (30 distinct frames) still varies
    _advance(world, young, rng, 2)  # latent frame 6: caches just full
    assert old.image.latents.shape[2] > old.frame
    merged = merge_states(world.sampler.model, [old.snapshot(), young.snapshot()])
    assert merged.frame == 6 and merged.batch_size == 3
    assert merged.world_frames() == [15, 15, 6]
    assert merged.world_video_frames() == [57, 57, 21] == [old.video_frame] * 2 + [young.video_frame]
    for _ in range(4):  # ring phases both ways: the old worlds' slots were rolled by 9 frames in a ring of 6
        keyboard, mouse = _actions(rng, 3)
        alone = [world.step_latents(old, keyboard[:2], mouse[:2]), world.step_latents(young, keyboard[2:], mouse[2:])]
        frames_alone = np.concatenate([world.decode(old, alone[0]).numpy(), world.decode(young, alone[1]).numpy()])
        together = world.step_latents(merged, keyboard, mouse)
        frames_together = world.decode(merged, together).numpy()
        expected = torch.cat(alone)
        assert float((together - expected).norm() / expected.norm()) < 1e-5  # float32 rounding of rotated keys
        assert np.abs(frames_together.astype(int) - frames_alone.astype(int)).max() <= 1
    assert merged.world_frames() == [old.frame, old.frame, young.frame]


def test_merged_states_of_a_channels_last_decoder_keep_their_caches_one_layout(tmp_path):
    """A merged state's decoder cache keeps the merged caches' slot layout (`FeatureCache.channels_last`),
    so its later slots stay in the strides a compiled decoder was traced for."""
    world = WorldModel.from_pretrained(write_tiny_model(tmp_path), device="cpu")
    world.vae.set_decoder_channels_last(True)
    rng = np.random.default_rng(3)
    states = [world.start(_pictures(rng, 1), seed=[seed]) for seed in (4, 5)]
    for state, blocks in zip(states, (3, 2)):
        _advance(world, state, rng, blocks)
    merged = merge_states(world.sampler.model, [state.snapshot() for state in states])
    _advance(world, merged, rng, 1)
    cache = merged.decoder_cache
    assert cache.channels_last and cache.batch_size == 2
    for slot in cache.slots:
        assert slot.stride() == torch.empty(slot.shape, memory_format=torch.channels_last_3d).stride()


@pytest.mark.parametrize("guest_blocks", [2, 7])  # younger than the host (it moves back in place), older
def test_absorb_writes_a_world_into_a_host_row_in_place_and_both_go_on_as_alone(world, guest_blocks):
    rng = np.random.default_rng(5)
    host = world.start(_pictures(rng, 3), seed=[1, 2, 3])
    guest = world.start(_pictures(rng, 1), seed=[4])
    _advance(world, host, rng, 5)  # latent frame 15
    _advance(world, guest, rng, guest_blocks)
    host_alone, guest_alone = host.snapshot(), guest.snapshot()
    addresses = [c.key.data_ptr() for c in ring_caches(host)] + [s.data_ptr() for s in host.decoder_cache.slots]
    absorb(world.sampler.model, host, [1], guest)
    assert [c.key.data_ptr() for c in ring_caches(host)] + [s.data_ptr() for s in host.decoder_cache.slots] == addresses
    assert host.world_frames() == [15, 3 * guest_blocks, 15]
    for _ in range(3):
        keyboard, mouse = _actions(rng, 3)
        together = world.step_latents(host, keyboard, mouse)
        frames = world.decode(host, together).numpy()
        alone = world.step_latents(host_alone, keyboard, mouse)
        frames_alone = world.decode(host_alone, alone).numpy()
        guest_latents = world.step_latents(guest_alone, keyboard[1:2], mouse[1:2])
        guest_frames = world.decode(guest_alone, guest_latents).numpy()
        expected = torch.cat([alone[:1], guest_latents, alone[2:]])
        assert float((together - expected).norm() / expected.norm()) < 1e-5
        expected_frames = np.concatenate([frames_alone[:1], guest_frames, frames_alone[2:]])
        assert np.abs(frames.astype(int) - expected_frames.astype(int)).max() <= 1
    assert host.world_frames() == [host_alone.frame, guest_alone.frame, host_alone.frame]


def test_absorb_checks_its_rows(world):
    rng = np.random.default_rng(6)
    host, guest = world.start(_pictures(rng, 2), seed=[1, 2]), world.start(_pictures(rng, 1), seed=[3])
    _advance(world, host, rng, 2)
    with pytest.raises(ValueError, match="cannot be merged yet"):
        absorb(world.sampler.model, host, [0], guest)
    _advance(world, guest, rng, 2)
    with pytest.raises(ValueError, match="one distinct host row per guest world"):
        absorb(world.sampler.model, host, [0, 1], guest)
    with pytest.raises(ValueError, match="host rows must lie in 0..1"):
        absorb(world.sampler.model, host, [2], guest)


def test_relabelling_the_frames_alone_would_change_the_old_worlds_future(world):
    """The check above can fail: stepping an old world at a younger frame index with its caches
    merely relabelled (keys not rotated, ring not rolled, condition not moved) gives other latents."""
    from matrixgame_env.world.graphs import ring_caches

    rng = np.random.default_rng(1)
    old = world.start(_pictures(rng, 1), seed=[1])
    young = world.start(_pictures(rng, 1), seed=[2])
    _advance(world, old, rng, 5)  # latent frame 15
    _advance(world, young, rng, 2)  # latent frame 6
    relabelled = old.snapshot()
    delta = young.frame - old.frame  # -9: a roll of 3 in a ring of 6
    relabelled.frame += delta
    for cache in ring_caches(relabelled):
        cache.end_frame += delta
        cache.last_write = tuple(f + delta for f in cache.last_write)
    moved = merge_states(world.sampler.model, [old.snapshot(), young]).select([0])
    keyboard, mouse = _actions(rng, 1)
    expected = world.step_latents(old, keyboard, mouse)
    assert float((world.step_latents(moved, keyboard, mouse) - expected).norm() / expected.norm()) < 1e-5
    assert float((world.step_latents(relabelled, keyboard, mouse) - expected).norm() / expected.norm()) > 1e-2


def test_states_merge_only_once_their_caches_are_full(world):
    rng = np.random.default_rng(2)
    state = world.start(_pictures(rng, 1), seed=[0])
    assert not can_merge(state)
    _advance(world, state, rng, 1)
    assert not can_merge(state)  # 3 of 6 frames in the window
    with pytest.raises(ValueError, match="cannot be merged yet"):
        merge_states(world.sampler.model, [state])
    _advance(world, state, rng, 1)
    assert can_merge(state)
    with pytest.raises(ValueError, match="at least one state"):
        merge_states(world.sampler.model, [])


def test_select_and_snapshot_keep_each_worlds_frame_count(world):
    rng = np.random.default_rng(3)
    old, young = world.start(_pictures(rng, 1), seed=[1]), world.start(_pictures(rng, 1), seed=[2])
    _advance(world, old, rng, 3)
    _advance(world, young, rng, 2)
    merged = merge_states(world.sampler.model, [old, young])
    assert merged.select([1, 0]).world_frames() == [6, 9]
    snapshot = merged.snapshot()
    _advance(world, merged, rng, 1)
    assert merged.world_frames() == [12, 9]
    merged.restore(snapshot)
    assert merged.world_frames() == [9, 6]


def test_vector_env_worlds_reset_at_different_times_step_together_again(world):
    n, seed = 3, 10
    venvs = {merge: MatrixGameVectorEnv(model=world, num_envs=n, merge_cohorts=merge) for merge in (True, False)}
    venvs[True].prefer_in_place = True  # as where CUDA graphs replay (CPUs shrink cohorts instead)
    singles = [MatrixGameEnv(model=world) for _ in range(n)]
    for venv in venvs.values():
        venv.reset(seed=seed)
    for i, env in enumerate(singles):
        env.reset(seed=seed + i)
    rng = np.random.default_rng(4)
    cohorts = []
    host = venvs[True]._cohorts[0].state
    for step in range(7):
        if step == 2:
            for venv in venvs.values():
                venv.reset_worlds([1])
            singles[1].reset()
        keys = rng.integers(0, 2, (n, 4)).astype(np.int8)
        mouse = rng.uniform(-0.2, 0.2, (n, 2)).astype(np.float32)
        infos = {merge: venv.step({"keyboard": keys, "mouse": mouse})[4] for merge, venv in venvs.items()}
        for i, env in enumerate(singles):
            info = env.step({"keyboard": keys[i], "mouse": mouse[i]})[4]
            for merged_info in infos.values():
                assert merged_info["frame_index"][i] == info["frame_index"]
                difference = np.abs(info["frames"].astype(int) - merged_info["frames"][i, -len(info["frames"]) :])
                assert difference.max() <= 1 and difference.mean() < 1e-3
        cohorts.append((venvs[True].num_cohorts, venvs[False].num_cohorts))
    # Reset at step 2: the new cohort fills its caches in steps 2 and 3, then joins the others.
    assert cohorts == [(1, 1), (1, 1), (2, 2), (2, 2), (1, 2), (1, 2), (1, 2)]
    assert venvs[True]._cohorts[0].state is host  # written back into its old row: the same tensors


@pytest.mark.parametrize("in_place", [True, False])
def test_vector_env_worlds_that_reset_again_and_again_match_the_unmerged_env(world, in_place):
    n = 3
    venvs = {merge: MatrixGameVectorEnv(model=world, num_envs=n, merge_cohorts=merge) for merge in (True, False)}
    assert not venvs[True].keeps_stale_rows  # on a CPU: no CUDA graphs to keep
    venvs[True].prefer_in_place = in_place
    for venv in venvs.values():
        venv.reset(seed=20)
    resets = {2: [1], 3: [1, 2], 6: [0], 7: [2]}  # world 1 again before its new cohort rejoined
    rng = np.random.default_rng(5)
    for step in range(11):
        keys = rng.integers(0, 2, (n, 4)).astype(np.int8)
        mouse = rng.uniform(-0.2, 0.2, (n, 2)).astype(np.float32)
        infos = {}
        for merge, venv in venvs.items():
            if step in resets:
                venv.reset_worlds(resets[step])
            infos[merge] = venv.step({"keyboard": keys, "mouse": mouse})[4]
        assert np.array_equal(infos[True]["frame_index"], infos[False]["frame_index"])
        difference = np.abs(infos[True]["frames"].astype(int) - infos[False]["frames"].astype(int))
        assert difference.max() <= 1 and difference.mean() < 1e-3
    assert venvs[True].num_cohorts == 1 and venvs[False].num_cohorts == 3
