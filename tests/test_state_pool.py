"""Restarting world states in place (`WorldModel.start(into=...)`) and keeping them (`StatePool`)."""

import numpy as np
import pytest
import torch
from tiny_model import write_tiny_model

from matrixgame_env.vector import MatrixGameVectorEnv
from matrixgame_env.world.graphs import ring_caches
from matrixgame_env.world.model import WorldModel
from matrixgame_env.world.state_pool import StatePool


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = write_tiny_model(tmp_path_factory.mktemp("tiny-pool"))
    return WorldModel.from_pretrained(folder, device="cpu")


def _pictures(seed, n):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (16, 32, 3), dtype=np.uint8) for _ in range(n)]


def _vector_actions(rng, n):
    """Random actions of n worlds in the universal layout (keys and mouse)."""
    return {
        "keyboard": rng.integers(0, 2, (n, 4)).astype(np.int8),
        "mouse": rng.uniform(-0.2, 0.2, (n, 2)).astype(np.float32),
    }


def _rollout(world, state, blocks, seed=3):
    rng = np.random.default_rng(seed)
    latents, frames = [], []
    for _ in range(blocks):
        keyboard = torch.tensor(rng.integers(0, 2, (state.batch_size, 4)), dtype=torch.float32)
        mouse = torch.tensor(rng.uniform(-0.2, 0.2, (state.batch_size, 2)), dtype=torch.float32)
        x = world.step_latents(state, keyboard, mouse)
        latents.append(x)
        frames.append(world.decode(state, x))
    return torch.cat(latents, 2), torch.cat(frames, 1)


def test_a_restarted_state_gives_exactly_a_fresh_start_on_its_old_tensors(world):
    old = world.start(_pictures(0, 2), seed=5)
    _rollout(world, old, 4, seed=9)  # caches full of another episode
    tensors = [c.key.data_ptr() for c in ring_caches(old)] + [k.data_ptr() for k in old.context.keys]
    decoder_cache = old.decoder_cache
    pictures = _pictures(1, 2)
    fresh_latents, fresh_frames = _rollout(world, world.start(pictures, seed=7), 4)
    restarted = world.start(pictures, seed=7, into=old)
    assert restarted is old and restarted.decoder_cache is decoder_cache
    assert restarted.frame == 0 and restarted.frame_shift is None and restarted.keyboard_history is None
    assert all(decoder_cache.is_empty(i) and not slot.any() for i, slot in enumerate(decoder_cache.slots))
    assert all(decoder_cache.clone().emptied)  # a snapshot of the restarted cache is empty too
    latents, frames = _rollout(world, restarted, 4)
    assert torch.equal(latents, fresh_latents) and torch.equal(frames, fresh_frames)
    assert [c.key.data_ptr() for c in ring_caches(old)] + [k.data_ptr() for k in old.context.keys] == tensors


def test_a_sampler_restart_leaves_no_old_decoder_cache_behind(world):
    state = world.start(_pictures(0, 1), seed=0)
    _rollout(world, state, 2)
    image_latents, context = world.encode_start(_pictures(1, 1))
    restarted = world.sampler.restart(state, image_latents, context, seed=1)
    assert restarted.decoder_cache is None  # as from `sampler.start`: the old stream's cache is not reused


def test_restart_refuses_a_state_of_another_size_or_model(world):
    state = world.start(_pictures(0, 2), seed=0)
    _rollout(world, state, 1)
    with pytest.raises(ValueError, match="restart needs a state of 3 worlds"):
        world.start(_pictures(1, 3), seed=0, into=state)
    other = WorldModel.from_pretrained(world.folder, device="cpu", dtype=torch.float64)
    with pytest.raises(ValueError, match="differ in shape or dtype"):
        world.start(_pictures(1, 2), seed=0, into=other.start(_pictures(1, 2), seed=0))
    assert state.frame == 3 and all(c.end_frame == 3 for c in ring_caches(state))  # refused: left alone


def test_pool_keeps_at_most_per_size_states_of_one_size(world):
    pool = StatePool(capacity=5, per_size=2)
    ones = [world.start(_pictures(i, 1), seed=i) for i in range(3)]
    two = world.start(_pictures(3, 2), seed=3)
    for state in (ones[0], two, ones[1], ones[2]):  # the third of size 1 pushes out the oldest of its size
        pool.give(state)
    assert len(pool) == 3
    assert pool.take(1) is ones[2] and pool.take(1) is ones[1] and pool.take(1) is None and pool.take(2) is two
    with pytest.raises(ValueError, match="per_size must be an integer >= 0"):
        StatePool(per_size=-1)
    none = StatePool(per_size=0)
    none.give(two)
    assert len(none) == 0


def test_pool_keeps_states_of_at_most_max_worlds_together(world):
    pool = StatePool(max_worlds=3)
    one, two, other_two = (world.start(_pictures(i, n), seed=i) for i, n in enumerate((1, 2, 2)))
    pool.give(one)
    pool.give(two)
    assert pool.worlds == 3
    pool.give(other_two)  # 5 worlds: the oldest go until 3 or fewer remain (one, then two)
    assert pool.worlds == 2 and pool.take(2) is other_two
    with pytest.raises(ValueError, match="max_worlds must be an integer >= 0"):
        StatePool(max_worlds=-2)


def test_pool_hands_back_states_by_size_newest_first_within_its_capacity(world):
    pool = StatePool(capacity=2)
    a, b, c = (world.start(_pictures(i, n), seed=i) for i, n in enumerate((1, 2, 1)))
    pool.give(a)
    pool.give(b)
    pool.give(b)  # given twice: kept once
    assert len(pool) == 2
    pool.give(c)  # the oldest (a) goes
    assert len(pool) == 2
    assert pool.take(1) is c and pool.take(1) is None and pool.take(2) is b and len(pool) == 0
    assert (pool.hits, pool.misses) == (2, 1)
    pool.give(a)
    pool.capacity = 0
    assert len(pool) == 0 and pool.take(1) is None
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="capacity must be an integer >= 0"):
            pool.capacity = bad


def test_vector_env_restarts_rejoined_cohorts_states_and_steps_as_without_them(world):
    n = 3
    venvs = [MatrixGameVectorEnv(model=world, num_envs=n) for _ in range(2)]
    venvs[1]._state_pool.capacity = 0  # never reuses a state
    for venv in venvs:
        venv.prefer_in_place = True  # as where CUDA graphs replay (where the states' reuse pays)
        venv.reset(seed=30)
    rng = np.random.default_rng(6)
    young_states = []
    for step in range(12):
        actions = _vector_actions(rng, n)
        observations = []
        for venv in venvs:
            if step in (1, 4, 7):
                venv.reset_worlds([step % n])
            observations.append(venv.step(actions)[0])
            if step in (1, 4, 7) and venv is venvs[0]:
                young_states.append(venv._cohorts[-1].state)
        assert np.array_equal(observations[0], observations[1])
    # each one-world cohort rejoined two steps after its start and left its state for the next one
    assert young_states[0] is young_states[1] is young_states[2]
    assert venvs[0].num_cohorts == venvs[1].num_cohorts == 1
    first = venvs[0]._cohorts[0].state
    venvs[0].reset(seed=31)  # a full reset restarts the big cohort's state too
    assert venvs[0]._cohorts[0].state is first
    venvs[0].reset_worlds(np.arange(n))  # and so do all worlds ending at once (fixed-length episodes)
    assert venvs[0].num_cohorts == 1 and venvs[0]._cohorts[0].state is first


def test_vector_env_pads_cohorts_of_new_worlds_to_one_size_and_steps_as_without(world):
    n = 8
    padded, unpadded = (MatrixGameVectorEnv(model=world, num_envs=n, pad_new_cohorts=pad) for pad in (3, 0))
    assert MatrixGameVectorEnv(model=world, num_envs=n).pad_new_cohorts == 0  # off unless asked for
    for venv in (padded, unpadded):
        venv.prefer_in_place = True  # as where CUDA graphs replay (the only place padding applies)
        venv.reset(seed=40)
    resets = {1: [2], 2: [0, 3], 5: [1], 6: [0, 3]}  # cohorts of 1, 2, 1 and 2 new worlds
    rng = np.random.default_rng(7)
    young = []
    for step in range(10):
        actions = _vector_actions(rng, n)
        infos = []
        for venv in (padded, unpadded):
            if step in resets:
                venv.reset_worlds(resets[step])
            observation, _, _, _, info = venv.step(actions)
            infos.append((observation, info))
        (obs_p, info_p), (obs_u, info_u) = infos
        assert np.array_equal(info_p["frame_index"], info_u["frame_index"])
        assert np.array_equal(info_p["new_frames"], info_u["new_frames"])
        difference = np.abs(info_p["frames"].astype(int) - info_u["frames"].astype(int))
        assert difference.max() <= 1 and difference.mean() < 1e-3
        assert obs_p.shape == obs_u.shape == (n, *padded.single_observation_space.shape)
        if step in resets:
            new = padded._cohorts[-1]
            assert new.state.batch_size == 3 and sorted(new.live_worlds) == sorted(resets[step])
            assert np.all(new.worlds[~new.live] == -1)  # filler rows belong to no world
            assert unpadded._cohorts[-1].state.batch_size == len(resets[step])
            young.append(new.state)
    # the cohorts of steps 5 and 6 restarted in the kept states of 3 rows of the first two (of 2
    # and 1 worlds), the most recently given back first
    assert young[0] is not young[1] and young[2] is young[1] and young[3] is young[0]
    assert padded.num_cohorts == unpadded.num_cohorts == 1
    assert padded.world_state(2).batch_size == 1


def test_vector_env_pads_only_where_stale_rows_are_kept_and_checks_the_size(world):
    venv = MatrixGameVectorEnv(model=world, num_envs=3, pad_new_cohorts=3)
    assert not venv.keeps_stale_rows  # on a CPU cohorts shrink and rejoin as new states: no padding
    venv.reset(seed=50)
    venv.reset_worlds([1])
    assert venv._cohorts[-1].state.batch_size == 1
    for bad in (-1, 2.5, True, "8", None):
        with pytest.raises(ValueError, match="pad_new_cohorts must be an integer >= 0"):
            MatrixGameVectorEnv(model=world, num_envs=3, pad_new_cohorts=bad)


def test_young_cohort_stream_is_checked_and_leaves_cpu_envs_as_they_are(world):
    n = 3
    plain, streamed = (MatrixGameVectorEnv(model=world, num_envs=n, young_cohort_stream=on) for on in (False, True))
    assert not plain.young_cohort_stream  # off unless asked for
    for venv in (plain, streamed):
        venv.reset(seed=60)
    rng = np.random.default_rng(8)
    for step in range(4):
        actions = _vector_actions(rng, n)
        outputs = []
        for venv in (plain, streamed):
            if step == 1:
                venv.reset_worlds([2])  # a young cohort beside the others for two steps
            outputs.append(venv.step(actions))
        assert np.array_equal(outputs[0][4]["frames"], outputs[1][4]["frames"])
        assert plain.num_cohorts == streamed.num_cohorts
    assert streamed._side_stream is None  # no second stream on a CPU
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match="young_cohort_stream must be True or False"):
            MatrixGameVectorEnv(model=world, num_envs=n, young_cohort_stream=bad)
