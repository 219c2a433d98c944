"""The Gymnasium env on a tiny random-weight model: API contract, exactness, planners, errors."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from tiny_model import write_tiny_model

import matrixgame_env
from matrixgame_env.env import MatrixGameEnv
from matrixgame_env.rewards import ClipGoalReward, GoalReached, PixelGoalReward
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
