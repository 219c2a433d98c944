"""`RealDoomEnv`: the real ViZDoom game behind a dreamed world's spaces, with rewards from game variables."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from tiny_model import tiny_model_config, write_tiny_model

import matrixgame_env
from matrixgame_env.env import MatrixGameEnv
from matrixgame_env.rewards import PixelGoalReward, StepOutcome
from matrixgame_env.world.model import WorldModel

pytest.importorskip("vizdoom")
from matrixgame_env.data.doom_env import DoomTask, LearnedProgressReward, RealDoomEnv  # noqa: E402

SCALE = 64.0  # progress_scale of models without a reward head
DEGREES_PER_UNIT = 40.0


def _action(keys=(0, 0, 0, 0), mouse=(0.0, 0.0)):
    return {"keyboard": np.array(keys, np.int8), "mouse": np.array(mouse, np.float32)}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ViZDoom writes a _vizdoom/ folder into the working directory


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return WorldModel.from_pretrained(write_tiny_model(tmp_path_factory.mktemp("tiny-real")), device="cpu")


@pytest.fixture
def doom():
    """The real game as doom-small sees it (its config only: 96x176, 2 tics a frame), start view not turned."""
    env = RealDoomEnv("doom-small", start_turn=0.0)
    yield env
    env.close()


def test_gymnasium_env_checker_passes(world):
    env = RealDoomEnv(world, max_episode_steps=3)
    check_env(env, skip_render_check=True)
    env.close()


def test_same_spaces_and_blocks_as_the_dream_at_the_models_size(world):
    real, dream = RealDoomEnv(world), MatrixGameEnv(model=world)
    assert real.observation_space == dream.observation_space and real.action_space == dream.action_space
    obs, info = real.reset(seed=0)
    assert obs.shape == (16, 32, 3) and obs.dtype == np.uint8 and real.observation_space.contains(obs)
    _, _, _, _, first = real.step(_action((1, 0, 0, 0)))
    _, _, _, _, second = real.step(_action((1, 0, 0, 0)))
    # The dream's blocks (tests/test_env.py): 9 frames, then 12 = dream.block_frames; frame indices 8, 20.
    assert first["frames"].shape == (9, 16, 32, 3) and second["frames"].shape == (dream.block_frames, 16, 32, 3)
    assert (first["frame_index"], second["frame_index"]) == (8, 20)
    assert np.array_equal(first["frames"][0], obs)  # the first block starts from the reset frame, as in the dream
    real.close()


def test_registered_id_matches_doom_small():
    env = gym.make(matrixgame_env.REAL_DOOM_ID)
    assert env.observation_space.shape == (96, 176, 3) and env.unwrapped.tics_per_frame == 2
    assert env.action_space["mouse"].high.tolist() == pytest.approx([0.3, 0.3])
    env.close()


def test_walking_forward_into_open_space_earns_the_distance_walked(doom):
    _, info = doom.reset(seed=0)
    for _ in range(3):
        before = info["position"]
        _, reward, terminated, _, info = doom.step(_action((1, 0, 0, 0)))
        heading = math.radians(info["angle"])  # no turning: the same before and after
        expected = float(np.dot(info["position"] - before, [math.cos(heading), math.sin(heading)]))
        assert not terminated and expected > 10.0
        assert info["progress"] == pytest.approx(expected, abs=1e-3) and reward == pytest.approx(expected / SCALE)
        assert not info["stuck"]


def test_walking_backwards_loses_reward(doom):
    doom.reset(seed=0)
    _, reward, _, _, info = doom.step(_action((0, 1, 0, 0)))
    assert reward < 0 and info["progress"] == pytest.approx(-info["path"], abs=1e-3)


def test_standing_still_is_stuck_and_pays_the_penalty():
    env = RealDoomEnv("doom-small", start_turn=0.0, stuck_penalty=0.5)
    env.reset(seed=0)
    _, reward, _, _, info = env.step(_action())
    assert info["stuck"] and info["path"] == 0.0 and reward == -0.5
    env.close()
    env = RealDoomEnv("doom-small", start_turn=0.0, reward="not_stuck")
    env.reset(seed=0)
    assert env.step(_action())[1] == 0.0 and env.step(_action((1, 0, 0, 0)))[1] == 1.0
    env.close()


def test_mouse_turns_and_looks_by_the_recorders_units(doom):
    _, info = doom.reset(seed=0)
    _, _, _, _, turned = doom.step(_action(mouse=(0.0, 0.1)))  # right: the engine's angle goes down
    first_block = 8 * 0.1 * DEGREES_PER_UNIT  # 8 new frames in the first block
    assert (info["angle"] - turned["angle"]) % 360 == pytest.approx(first_block, abs=0.01)
    _, _, _, _, looked = doom.step(_action(mouse=(0.05, 0.0)))  # up: the engine's pitch goes down
    assert turned["pitch"] - looked["pitch"] == pytest.approx(12 * 0.05 * DEGREES_PER_UNIT, abs=0.01)
    assert looked["angle"] == turned["angle"]


def test_same_seed_same_episode_other_seed_other_start(doom):
    turning = RealDoomEnv("doom-small", maps=("MAP01", "MAP02"))
    episodes = []
    for seed in (3, 4, 3):
        obs, info = turning.reset(seed=seed)
        _, _, _, _, step = turning.step(_action((1, 0, 0, 1), (0.0, 0.05)))
        episodes.append((obs, info["map"], info["angle"], step["frames"]))
    turning.close()
    assert np.array_equal(episodes[0][0], episodes[2][0]) and np.array_equal(episodes[0][3], episodes[2][3])
    assert episodes[0][1:3] == episodes[2][1:3] and episodes[0][1:3] != episodes[1][1:3]


def test_truncates_after_max_episode_steps():
    env = RealDoomEnv("doom-small", max_episode_steps=2)
    env.reset(seed=0)
    assert env.step(_action())[3] is False and env.step(_action())[3] is True
    env.close()


def test_a_frame_reward_plug_in_scores_the_real_frames(world):
    goal = np.full((16, 32, 3), 200, np.uint8)
    env = RealDoomEnv(world, reward=PixelGoalReward(goal), start_turn=0.0)
    env.reset(seed=0)
    obs, reward, *_ = env.step(_action((1, 0, 0, 0)))
    expected = -np.mean((obs.astype(np.float64) / 255 - 200 / 255) ** 2)
    assert reward == pytest.approx(expected, rel=1e-5)
    env.close()


def test_learned_progress_reward_subtracts_the_stuck_probability(tmp_path):
    from matrixgame_env.nn.reward_head import RewardHead

    torch.manual_seed(0)
    head = RewardHead(width=8, depth=2).eval()
    reward = LearnedProgressReward(stuck_penalty=0.5)
    reward.head = head
    latents = torch.randn(3, 16, 3, 2, 4)
    step = StepOutcome(np.zeros((3, 12, 16, 32, 3), np.uint8), latents, np.zeros((3, 4)), np.zeros((3, 2)), np.ones(3))
    with torch.no_grad():
        progress, stuck_logit = head(latents).double().unbind(1)
    expected = progress - 0.5 / (1 + torch.exp(-stuck_logit))
    np.testing.assert_allclose(reward(step), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_bad_arguments_say_what_is_accepted(world):
    with pytest.raises(ValueError, match="progress"):
        RealDoomEnv(world, reward="speed")
    with pytest.raises(ValueError, match="MAP01"):
        RealDoomEnv(world, maps=("E1M1",))
    with pytest.raises(ValueError, match="universal layout"):
        RealDoomEnv(tiny_model_config("templerun"))
    with pytest.raises(ValueError, match="no latents"):
        RealDoomEnv(world, reward=LearnedProgressReward())
    env = RealDoomEnv(world)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(_action())
    env.reset(seed=0)
    with pytest.raises(ValueError, match="mouse values"):
        env.step(_action(mouse=(0.0, 0.9)))
    with pytest.raises(ValueError, match="'map'"):
        env.reset(options={"image": "x.png"})
    env.close()


def test_tasks_without_a_reward_head_point_to_the_goal_tasks(world):
    with pytest.raises(ValueError, match="clip_goal or pixel_goal"):
        DoomTask.for_model("learned", world)
    task = DoomTask.for_model("pixel_goal", world)
    assert task.goal.endswith("start_1.png") and isinstance(task.real_env_kwargs()["reward"], PixelGoalReward)
    with pytest.raises(ValueError, match="unknown task"):
        DoomTask.for_model("speed", world)
