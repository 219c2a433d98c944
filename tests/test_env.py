"""The Gymnasium env on a tiny random-weight model: API contract, exactness, planners, errors."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from latent_plugins import LatentRecorder
from tiny_model import write_tiny_model

import matrixgame_env
from matrixgame_env.env import MatrixGameEnv
from matrixgame_env.rewards import ClipGoalReward, GoalReached, PixelGoalReward
from matrixgame_env.spaces import GTA_DRIVE, TEMPLERUN, UNIVERSAL
from matrixgame_env.vector import MatrixGameVectorEnv
from matrixgame_env.world.model import WorldModel
from matrixgame_env.wrappers import DiscretizeActions, FlattenActions, ResizeFrames


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = write_tiny_model(tmp_path_factory.mktemp("tiny-env"))
    return WorldModel.from_pretrained(folder, device="cpu")


def _action(keys=(1, 0, 0, 0), mouse=(0.0, 0.1)):
    return {"keyboard": np.array(keys, np.int8), "mouse": np.array(mouse, np.float32)}


def test_gymnasium_env_checker_passes(world):
    check_env(MatrixGameEnv(model=world), skip_render_check=True)


def test_stable_baselines3_env_checker_passes_with_flat_actions(world):
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    sb3_check_env(FlattenActions(MatrixGameEnv(model=world)), warn=False)
    sb3_check_env(DiscretizeActions(MatrixGameEnv(model=world)), warn=False)


def test_step_returns_the_last_frame_and_all_frames_in_info(world):
    env = MatrixGameEnv(model=world, report_timing=True)
    obs, info = env.reset(seed=1)
    assert obs.shape == (16, 32, 3) and obs.dtype == np.uint8 and info["frames"].shape == (1, 16, 32, 3)
    obs, reward, terminated, truncated, info = env.step(_action())
    assert info["frames"].shape == (9, 16, 32, 3) and np.array_equal(obs, info["frames"][-1])
    _, _, _, _, info = env.step(_action())
    assert info["frames"].shape == (12, 16, 32, 3) and info["frame_index"] == 20
    assert info["timing"]["generate_s"] > 0


def test_block_observations_hold_twelve_frames(world):
    env = MatrixGameEnv(model=world, observation="block")
    obs, _ = env.reset(seed=0)
    assert obs.shape == (12, 16, 32, 3) and env.observation_space.contains(obs)
    obs, *_ = env.step(_action())
    assert obs.shape == (12, 16, 32, 3)


def test_same_seed_same_frames_different_seed_different_frames(world):
    env = MatrixGameEnv(model=world)
    runs = []
    for seed in (3, 3, 4):
        env.reset(seed=seed)
        runs.append(np.stack([env.step(_action())[0] for _ in range(2)]))
    assert np.array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_restore_reproduces_the_frames(world):
    env = MatrixGameEnv(model=world)
    env.reset(seed=5)
    env.step(_action())
    snapshot = env.snapshot()
    first = [env.step(_action((0, 0, 1, 0)))[4]["frames"] for _ in range(2)]
    env.restore(snapshot)
    second = [env.step(_action((0, 0, 1, 0)))[4]["frames"] for _ in range(2)]
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_imagine_matches_stepping_and_leaves_the_env_unchanged(world):
    env = MatrixGameEnv(model=world)
    env.reset(seed=6)
    env.step(_action())
    plans = [[_action((1, 0, 0, 0)), _action((1, 0, 0, 0))], [_action((0, 1, 0, 0), (0.1, 0)), _action((0, 0, 0, 1))]]
    snapshot = env.snapshot()
    imagined = env.imagine(plans)
    assert imagined["frames"].shape == (2, 2, 12, 16, 32, 3) and imagined["rewards"].shape == (2, 2)
    for k, plan in enumerate(plans):
        env.restore(snapshot)
        stepped = np.stack([env.step(a)[4]["frames"] for a in plan])
        assert np.abs(stepped.astype(int) - imagined["frames"][k].astype(int)).max() <= 1


class LatentMean:
    """A reward from the latents alone, which says so (reads_frames = False)."""

    reads_frames = False

    def __call__(self, step):
        assert step.frames is None or step.frames.dtype == np.uint8
        return step.latents.float().mean(dim=(1, 2, 3, 4)).numpy()


def test_imagine_without_frames_gives_the_same_latents_and_rewards(world):
    env = MatrixGameEnv(model=world, reward=LatentMean())
    env.reset(seed=7)
    env.step(_action())
    plans = [[_action((1, 0, 0, 0)), _action((0, 0, 1, 0), (0.0, -0.2))], [_action((0, 1, 0, 0), (0.1, 0))] * 2]
    with_frames = env.imagine(plans)
    without = env.imagine(plans, frames=False)
    assert "frames" not in without and set(without) == {"latents", "rewards"}
    assert without["latents"].shape == (2, 2, 16, 3, 2, 4) and without["latents"].dtype == np.float32
    assert np.array_equal(without["latents"], with_frames["latents"])
    assert np.array_equal(without["rewards"], with_frames["rewards"])
    assert not np.array_equal(without["rewards"][0], without["rewards"][1])  # other plans, other futures
    # the latents are the blocks that stepping the same plan makes
    env_state = env.snapshot()
    for k, plan in enumerate(plans):
        env.restore(env_state)
        stepped = [float(env.step(action)[1]) for action in plan]
        np.testing.assert_allclose(stepped, without["rewards"][k], rtol=1e-6)


def test_imagine_without_frames_refuses_rewards_that_may_read_frames(world):
    plans = [[_action()]]
    for reward, name in ((PixelGoalReward(np.zeros((16, 32, 3), np.uint8)), "PixelGoalReward"),
                         (lambda step: step.frames[:, -1].mean(axis=(1, 2, 3)), "<lambda>")):  # fmt: skip
        env = MatrixGameEnv(model=world, reward=reward)
        env.reset(seed=0)
        with pytest.raises(ValueError, match=f"{name}.*reads_frames = False"):
            env.imagine(plans, frames=False)
        assert env.imagine(plans)["frames"].shape == (1, 1, 12, 16, 32, 3)  # with frames it still works
    venv = MatrixGameVectorEnv(
        model=world, num_envs=2, reward=GoalReached(PixelGoalReward(np.zeros((16, 32, 3), np.uint8)), 0)
    )
    venv.reset(seed=0)
    with pytest.raises(ValueError, match="GoalReached"):
        venv.imagine(0, plans, frames=False)
    with pytest.raises(ValueError, match="frames must be True or False"):
        venv.imagine(0, plans, frames="no")


def test_vector_imagine_without_frames_matches_the_single_env(world):
    venv = MatrixGameVectorEnv(model=world, num_envs=2)  # ZeroReward reads no frames
    venv.reset(seed=3)
    venv.step({"keyboard": np.array([[1, 0, 0, 0]] * 2, np.int8), "mouse": np.zeros((2, 2), np.float32)})
    plans = [[_action()] * 2, [_action((0, 0, 0, 1))] * 2]
    out = venv.imagine(1, plans, frames=False)
    assert set(out) == {"latents", "rewards"} and not out["rewards"].any()
    assert np.array_equal(out["latents"], venv.imagine(1, plans)["latents"])


def test_vector_env_equals_single_envs_frame_for_frame(world):
    n = 3
    venv = MatrixGameVectorEnv(model=world, num_envs=n)
    obs, _ = venv.reset(seed=10)
    singles = [MatrixGameEnv(model=world) for _ in range(n)]
    single_obs = [env.reset(seed=10 + i)[0] for i, env in enumerate(singles)]
    assert np.array_equal(obs, np.stack(single_obs))
    rng = np.random.default_rng(0)
    for _ in range(3):
        keys = rng.integers(0, 2, (n, 4)).astype(np.int8)
        mouse = rng.uniform(-0.2, 0.2, (n, 2)).astype(np.float32)
        obs, *_, info = venv.step({"keyboard": keys, "mouse": mouse})
        for i, env in enumerate(singles):
            frames = env.step({"keyboard": keys[i], "mouse": mouse[i]})[4]["frames"]
            difference = np.abs(frames.astype(int) - info["frames"][i, -len(frames) :].astype(int))
            assert difference.max() <= 1 and difference.mean() < 1e-3
    assert venv.num_cohorts == 1


def test_latent_observations_are_the_blocks_latents_without_decoding(world):
    recorder = LatentRecorder()
    pixels = MatrixGameEnv(model=world, reward=recorder)
    latent = MatrixGameEnv(model=world, observation="latent")
    assert latent.observation_space.shape == (16, 3, 2, 4) and latent.observation_space.dtype == np.float32
    pixels.reset(seed=4)
    obs, info = latent.reset(seed=4)
    assert obs.dtype == np.float32 and "frames" not in info and latent.observation_space.contains(obs)
    start = latent.unwrapped._state.image.frames(0, 1)[0, :, 0].numpy()
    assert all(np.array_equal(obs[:, f], start) for f in range(3))  # the start picture's latent, repeated
    actions = [_action(), _action((0, 0, 1, 0), (0.0, -0.2)), _action((0, 1, 0, 0), (0.1, 0.0))]
    for t, action in enumerate(actions):
        pixel_info = pixels.step(action)[4]
        obs, reward, terminated, truncated, info = latent.step(action)
        assert np.array_equal(obs, recorder.blocks[t][0])  # the same latents as the decoding env's
        assert "frames" not in info and info["frame_index"] == pixel_info["frame_index"]
        assert latent.observation_space.contains(obs)
    assert latent.last_timing["fps"] > 0
    check_env(MatrixGameEnv(model=world, observation="latent"), skip_render_check=True)


def test_latent_observations_refuse_what_needs_frames(world):
    with pytest.raises(ValueError, match="render_mode='rgb_array' shows frames"):
        MatrixGameEnv(model=world, observation="latent", render_mode="rgb_array")
    with pytest.raises(ValueError, match="PixelGoalReward"):
        MatrixGameVectorEnv(model=world, observation="latent", reward=PixelGoalReward(np.zeros((16, 32, 3), np.uint8)))
    with pytest.raises(ValueError, match="observation must be one of"):
        MatrixGameEnv(model=world, observation="latents")
    env = MatrixGameEnv(model=world, observation="latent")
    env.reset(seed=0)
    plans = [[_action()], [_action((0, 0, 0, 1))]]
    assert set(env.imagine(plans)) == {"latents", "rewards"}  # by default without frames
    with pytest.raises(ValueError, match="decodes nothing"):
        env.imagine(plans, frames=True)
    from matrixgame_env.distributed_vector import DistributedVectorEnv

    with pytest.raises(ValueError, match="accepted here: 'last', 'block'"):
        DistributedVectorEnv(world, 2, observation="latent")


def test_vector_env_with_latent_observations_equals_single_envs(world):
    n = 3
    venv = MatrixGameVectorEnv(model=world, num_envs=n, observation="latent")
    assert venv.observation_space.shape == (n, 16, 3, 2, 4)
    singles = [MatrixGameEnv(model=world, observation="latent") for _ in range(n)]
    obs, info = venv.reset(seed=10)
    assert np.array_equal(obs, np.stack([env.reset(seed=10 + i)[0] for i, env in enumerate(singles)]))
    rng = np.random.default_rng(1)

    def step_all():
        keys = rng.integers(0, 2, (n, 4)).astype(np.int8)
        mouse = rng.uniform(-0.2, 0.2, (n, 2)).astype(np.float32)
        obs, rewards, terminated, truncated, info = venv.step({"keyboard": keys, "mouse": mouse})
        assert "frames" not in info and venv.observation_space.contains(obs)
        for i, env in enumerate(singles):
            np.testing.assert_allclose(obs[i], env.step({"keyboard": keys[i], "mouse": mouse[i]})[0], atol=1e-4)
        return info

    assert step_all()["new_frames"].tolist() == [9] * n
    step_all()
    restarted = venv.reset_worlds([1])  # world 1 alone starts again: two cohorts
    assert np.array_equal(restarted[0], singles[1].reset()[0])
    assert step_all()["new_frames"].tolist() == [12, 9, 12] and venv.num_cohorts == 2
    for _ in range(3):
        step_all()
    assert venv.num_cohorts == 1  # rejoined once world 1's caches were full


def test_without_info_frames_the_last_frame_is_observed_the_same(world):
    every, last = MatrixGameEnv(model=world), MatrixGameEnv(model=world, info_frames=False)
    assert every.reset(seed=3)[0].tobytes() == last.reset(seed=3)[0].tobytes()
    assert "frames" not in last.reset(seed=3)[1]
    every.reset(seed=3)
    actions = [_action(), _action((0, 0, 1, 0), (0.0, -0.2)), _action((0, 1, 0, 0), (0.1, 0.0))]
    for action in actions:
        obs, *_, info = every.step(action)
        trimmed_obs, *_, trimmed_info = last.step(action)
        assert "frames" not in trimmed_info and trimmed_info["frame_index"] == info["frame_index"]
        assert np.abs(trimmed_obs.astype(int) - obs.astype(int)).max() <= 1
    assert last.last_timing["fps"] > 0
    check_env(MatrixGameEnv(model=world, info_frames=False), skip_render_check=True)


def test_a_vector_env_without_info_frames_decodes_one_frame_a_block_through_resets(world, monkeypatch):
    shapes = []
    decode = WorldModel.decode_on_device

    def spy(self, *args, **kwargs):
        frames = decode(self, *args, **kwargs)
        shapes.append(frames.shape[1])
        return frames

    monkeypatch.setattr(WorldModel, "decode_on_device", spy)
    n = 3
    every = MatrixGameVectorEnv(model=world, num_envs=n, max_episode_steps=3)
    last = MatrixGameVectorEnv(model=world, num_envs=n, max_episode_steps=3, info_frames=False, render_mode="rgb_array")
    assert np.array_equal(every.reset(seed=5)[0], last.reset(seed=5)[0])
    rng = np.random.default_rng(2)
    for step in range(7):
        if step == 1:
            assert np.array_equal(every.reset_worlds([1]), last.reset_worlds([1]))  # two cohorts
        actions = {
            "keyboard": rng.integers(0, 2, (n, 4)).astype(np.int8),
            "mouse": rng.uniform(-0.2, 0.2, (n, 2)).astype(np.float32),
        }
        shapes.clear()
        obs, rewards, terminated, truncated, info = every.step(actions)
        assert set(shapes) <= {9, 12}
        shapes.clear()
        trimmed = last.step(actions)
        assert shapes and set(shapes) == {1}
        assert "frames" not in trimmed[4] and last.observation_space.contains(trimmed[0])
        assert np.abs(trimmed[0].astype(int) - obs.astype(int)).max() <= 1
        assert trimmed[4]["new_frames"].tolist() == info["new_frames"].tolist()
        assert trimmed[4]["frame_index"].tolist() == info["frame_index"].tolist()
        assert np.array_equal(trimmed[3], truncated)
    assert np.array_equal(last.render(), trimmed[0])


def test_without_info_frames_what_needs_every_frame_is_refused(world):
    with pytest.raises(ValueError, match="render_mode='human' plays every frame"):
        MatrixGameEnv(model=world, info_frames=False, render_mode="human")
    with pytest.raises(ValueError, match="PixelGoalReward may read every frame"):
        MatrixGameVectorEnv(model=world, info_frames=False, reward=PixelGoalReward(np.zeros((16, 32, 3), np.uint8)))
    with pytest.raises(ValueError, match="info_frames must be True or False"):
        MatrixGameEnv(model=world, info_frames="no")
    block = MatrixGameEnv(model=world, observation="block", info_frames=False)  # every frame is the observation
    obs, _ = block.reset(seed=0)
    obs, *_, info = block.step(_action())
    assert obs.shape == (12, 16, 32, 3) and "frames" not in info
    from matrixgame_env.distributed_vector import DistributedVectorEnv

    with pytest.raises(ValueError, match="info_frames=False is for MatrixGameVectorEnv"):
        DistributedVectorEnv(world, 2, info_frames=False)


def test_an_eager_env_keeps_its_dit_chains_eager_whatever_the_process_wide_switch(world):
    from matrixgame_env.nn import triton_dit

    MatrixGameEnv(model=world, fast=False)
    assert world.sampler.dit_kernels is False  # eager even where the kernels are switched on for the process
    MatrixGameEnv(model=world, fast=True)
    assert world.sampler.dit_kernels is None  # on a CPU: as the process-wide switch says (off by default)
    assert not triton_dit.enabled()


def test_cpu_envs_decode_channels_last_where_onednn_runs_with_the_same_frames(world):
    from matrixgame_env.nn.vae import set_conv3d_mode
    from matrixgame_env.world.model import cpu_decoder_channels_last_pays

    frames = {}
    for fast in (False, True):
        env = MatrixGameEnv(model=world, fast=fast)
        assert world.vae.decoder_channels_last == (fast and torch.backends.mkldnn.is_available())
        env.reset(seed=3)
        frames[fast] = np.concatenate([env.step(_action())[4]["frames"] for _ in range(3)])
    difference = np.abs(frames[True].astype(int) - frames[False].astype(int))
    assert difference.max() <= 1 and difference.mean() < 1e-3  # the same function in another layout
    try:
        set_conv3d_mode("stacked")  # stacked taps gain nothing from channels-last activations
        assert not cpu_decoder_channels_last_pays(world.vae)
    finally:
        set_conv3d_mode("auto")


def test_vector_env_observations_are_the_blocks_last_frames_and_independent_of_them(world):
    venv = MatrixGameVectorEnv(model=world, num_envs=2)
    venv.reset(seed=3)
    action = {"keyboard": np.eye(4, dtype=np.int8)[:2], "mouse": np.zeros((2, 2), np.float32)}
    venv.step(action)  # the first block has 9 new frames (padded), later ones the full 12
    for _ in range(2):
        obs, *_, info = venv.step(action)
        assert info["frames"].shape[:2] == (2, 12) and info["new_frames"].tolist() == [12, 12]
        assert np.array_equal(obs, info["frames"][:, -1])
        kept = info["frames"].copy()
        obs[:] = 0  # an agent writing into its observation leaves the block untouched
        assert np.array_equal(info["frames"], kept)


def test_a_vector_step_decodes_each_block_before_its_caches_refresh(world, monkeypatch):
    """The frames are queued for the host between a block's denoising steps and its caches' refresh,
    so that on a GPU the step waits for them and not for the refresh."""
    venv = MatrixGameVectorEnv(model=world, num_envs=2)
    venv.reset(seed=4)
    action = {"keyboard": np.eye(4, dtype=np.int8)[:2], "mouse": np.zeros((2, 2), np.float32)}
    order = []
    refresh, decode = world.sampler.refresh_caches, WorldModel.decode_on_device
    monkeypatch.setattr(world.sampler, "refresh_caches", lambda *a: (order.append("refresh"), refresh(*a))[1])
    monkeypatch.setattr(WorldModel, "decode_on_device", lambda self, *a: (order.append("decode"), decode(self, *a))[1])
    for _ in range(3):
        venv.step(action)
    venv.reset_worlds([1])  # two cohorts: each block decoded before its own refresh
    order.clear()
    venv.step(action)
    assert order == ["decode", "refresh"] * 2


def test_vector_env_autoresets_on_the_next_step(world):
    venv = MatrixGameVectorEnv(model=world, num_envs=2, max_episode_steps=2)
    first, _ = venv.reset(seed=0, options={"image": np.full((40, 40, 3), 90, np.uint8)})
    action = {"keyboard": np.ones((2, 4), np.int8), "mouse": np.zeros((2, 2), np.float32)}
    venv.step(action)
    _, _, terminated, truncated, _ = venv.step(action)
    assert truncated.all() and not terminated.any()
    obs, rewards, terminated, truncated, info = venv.step(action)
    assert np.array_equal(obs, first) and not rewards.any() and not truncated.any()
    assert info["frame_index"].tolist() == [0, 0]


def test_vector_imagine_evaluates_k_plans_in_one_batch(world):
    venv = MatrixGameVectorEnv(model=world, num_envs=2, reward=PixelGoalReward(np.zeros((16, 32, 3), np.uint8)))
    venv.reset(seed=0)
    plans = [[_action()] * 2 for _ in range(4)]
    out = venv.imagine(1, plans)
    assert out["frames"].shape == (4, 2, 12, 16, 32, 3)
    assert np.allclose(out["rewards"], out["rewards"][0])  # equal plans, equal futures


def test_make_registers_the_ids_and_applies_time_limits(world):
    assert "MatrixGame/Doom-v0" in gym.registry and "MatrixGame/TempleRun-v0" in gym.registry
    env = gym.make("MatrixGame/Universal-v0", model=world, max_episode_steps=2)
    env.reset(seed=0)
    env.step(_action())
    assert env.step(_action())[3] is True


def test_wrong_mode_for_a_checkpoint_is_refused(world):
    with pytest.raises(ValueError, match="universal model, not templerun"):
        MatrixGameEnv(model=world, mode="templerun")


@pytest.mark.parametrize(
    "action, message",
    [
        ({"keyboard": np.array([2, 0, 0, 0])}, "0 or 1"),
        ({"keyboard": np.array([1, 0, 0])}, r"shape \(4,\)"),
        ({"keyboard": np.zeros(4), "mouse": np.array([np.nan, 0.0])}, "NaN"),
        ({"keyboard": np.zeros(4), "mouse": np.array([0.0, 5.0])}, r"\[-0.3, 0.3\]"),
        ({"keyboard": np.zeros(4), "jump": 1}, "unknown action entries"),
        (3, "dicts"),
    ],
)
def test_actions_outside_the_space_are_rejected(world, action, message):
    env = MatrixGameEnv(model=world)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=message):
        env.step(action)


@pytest.mark.parametrize(
    "world_action, message",
    [
        ({"keyboard": np.array([2, 0, 0, 0])}, "world 1: keyboard entries must be 0 or 1"),
        ({"mouse": np.array([np.nan, 0.0])}, "world 1: mouse contains NaN"),
        ({"mouse": np.array([0.0, 5.0])}, r"world 1: mouse values must lie in \[-0.3, 0.3\]"),
    ],
)
def test_vector_actions_outside_the_space_name_the_world(world, world_action, message):
    venv = MatrixGameVectorEnv(model=world, num_envs=3)
    venv.reset(seed=0)
    actions = {"keyboard": np.zeros((3, 4), np.int8), "mouse": np.zeros((3, 2), np.float32)}
    for key, value in world_action.items():
        actions[key] = actions[key].astype(value.dtype)
        actions[key][1] = value
    with pytest.raises(ValueError, match=message):
        venv.step(actions)
    with pytest.raises(ValueError, match=r"actions\['mouse'\] must have 3 rows"):
        venv.step({"keyboard": actions["keyboard"], "mouse": np.zeros((2, 2), np.float32)})


@pytest.mark.parametrize("layout", [UNIVERSAL, GTA_DRIVE, TEMPLERUN])
def test_batched_actions_convert_as_each_world_alone(layout):
    rng = np.random.default_rng(0)
    space = layout.action_space()
    space.seed(0)
    samples = [space.sample() for _ in range(9)]
    if layout.one_hot:
        batch = np.array(samples)
    else:
        batch = {key: np.stack([s[key] for s in samples]) for key in samples[0]}
    keyboard, mouse = layout.batch_to_arrays(batch, 9)
    for i, sample in enumerate(samples):
        alone = layout.to_arrays(sample)
        assert np.array_equal(keyboard[i], alone[0]) and keyboard.dtype == np.float32
        assert (mouse is None) == (alone[1] is None)
        if mouse is not None:
            assert np.array_equal(mouse[i], alone[1]) and mouse.dtype == np.float32
    if not layout.one_hot:  # a value outside the space in any row: no batch result, so each world is checked
        batch["keyboard"][rng.integers(9), 0] = 2
        assert layout.batch_to_arrays(batch, 9) is None
    else:
        assert layout.batch_to_arrays(np.full(9, layout.keyboard_dim), 9) is None


def test_step_before_reset_is_refused(world):
    with pytest.raises(RuntimeError, match="before reset"):
        MatrixGameEnv(model=world).step(_action())


@pytest.mark.parametrize(
    "image, error",
    [(np.zeros((8, 8, 1), np.uint8), ValueError), (np.zeros((8, 8, 3), np.float64), ValueError), ([1, 2], TypeError)],
)
def test_bad_start_images_are_rejected(world, image, error):
    with pytest.raises(error):
        MatrixGameEnv(model=world).reset(options={"image": image})


def test_other_image_sizes_are_centre_cropped_and_resized(world):
    obs, _ = MatrixGameEnv(model=world).reset(options={"image": np.full((300, 200, 3), 77, np.uint8)})
    assert obs.shape == (16, 32, 3) and (obs == 77).all()


def test_pixel_goal_reward_is_zero_at_the_goal_and_terminates(world):
    goal = np.full((16, 32, 3), 128, np.uint8)
    reward = PixelGoalReward(goal)
    env = MatrixGameEnv(model=world, reward=reward, termination=GoalReached(reward, -1e-9))
    env.reset(seed=0)
    _, r, terminated, _, info = env.step(_action())
    expected = -(((info["frames"][-1].astype(np.float32) / 255 - 128 / 255) ** 2).mean())
    assert r == pytest.approx(expected, rel=1e-5) and r < 0 and not terminated


def test_clip_goal_reward_is_one_for_the_goal_itself(world):
    goal = (np.random.default_rng(0).integers(0, 256, (16, 32, 3))).astype(np.uint8)
    reward = ClipGoalReward(goal)
    reward.bind(world)
    from matrixgame_env.rewards import StepOutcome

    outcome = StepOutcome(goal[None, None], torch.zeros(1), np.zeros((1, 4)), np.zeros((1, 2)), np.ones(1))
    assert reward(outcome)[0] == pytest.approx(1.0, abs=1e-3)


def test_resize_and_frame_stack_wrappers(world):
    from matrixgame_env.wrappers import FrameStackObservation

    env = FrameStackObservation(ResizeFrames(MatrixGameEnv(model=world), (8, 8)), 4)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (4, 8, 8, 3) and env.observation_space.contains(obs)
    obs, *_ = env.step(_action())
    assert obs.shape == (4, 8, 8, 3)


def test_flat_actions_map_to_keys_and_scaled_mouse(world):
    env = FlattenActions(MatrixGameEnv(model=world))
    mapped = env.action(np.array([0.5, -0.5, 0.0, 1.0, -1.0, 0.5], np.float32))
    assert mapped["keyboard"].tolist() == [1, 0, 0, 1]
    assert mapped["mouse"].tolist() == pytest.approx([-0.3, 0.15])


def test_package_exports_make_vector(world):
    venv = matrixgame_env.make_vector("MatrixGame/Universal-v0", 2, model=world)
    assert venv.num_envs == 2


def test_action_guidance_option_reaches_the_sampler_and_changes_the_frames(world):
    own = WorldModel.from_pretrained(world.folder, device="cpu")  # the option is set on the world model
    frames = {}
    for scale in (1.0, 3.0):
        env = MatrixGameEnv(model=own, action_guidance=scale)
        assert own.sampler.config.action_guidance == scale
        env.reset(seed=3)
        frames[scale] = env.step(_action())[0]
    assert not np.array_equal(frames[1.0], frames[3.0])
    vector = MatrixGameVectorEnv(own, num_envs=2, action_guidance=1.5)
    assert vector.world.sampler.config.action_guidance == 1.5
    with pytest.raises(ValueError, match="action_guidance must be a finite number >= 1"):
        MatrixGameEnv(model=own, action_guidance=0.0)
