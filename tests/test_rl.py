"""stable-baselines3 trains inside the dream (tiny model, CPU)."""

import numpy as np
import pytest
from tiny_model import write_tiny_model

from matrixgame_env.rewards import PixelGoalReward
from matrixgame_env.world.model import WorldModel


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return WorldModel.from_pretrained(write_tiny_model(tmp_path_factory.mktemp("tiny-rl")), device="cpu")


def test_ppo_trains_a_few_thousand_steps_in_the_vector_env(world):
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecMonitor

    from matrixgame_env.sb3 import DreamVecEnv

    goal = np.full((16, 32, 3), 200, np.uint8)
    venv = DreamVecEnv(model=world, num_envs=8, reward=PixelGoalReward(goal), max_episode_steps=8)
    venv.seed(0)
    venv = VecMonitor(venv)
    model = PPO("MlpPolicy", venv, n_steps=32, batch_size=64, n_epochs=2, seed=0, verbose=0, device="cpu")
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(total_timesteps=2048)
    assert model.num_timesteps >= 2048
    assert any(not np.allclose(a.numpy(), p.detach().numpy()) for a, p in zip(before, model.policy.parameters()))
    episodes = list(model.ep_info_buffer)
    assert episodes and all(e["l"] == 8 for e in episodes)


def test_vec_env_restarts_finished_worlds_and_reports_terminal_observations(world):
    from matrixgame_env.sb3 import DreamVecEnv

    venv = DreamVecEnv(model=world, num_envs=2, max_episode_steps=2)
    venv.seed(3)
    first = venv.reset()
    actions = np.zeros((2, 6), np.float32)
    venv.step(actions)
    obs, rewards, dones, infos = venv.step(actions)
    assert dones.all() and all("terminal_observation" in i for i in infos)
    assert all(i["TimeLimit.truncated"] for i in infos)
    assert obs.shape == first.shape
    assert not venv.venv.info_frames  # infos carry no frames: the last frame alone is decoded
    goal = np.zeros((16, 32, 3), np.uint8)
    assert DreamVecEnv(model=world, num_envs=2, reward=PixelGoalReward(goal)).venv.info_frames  # it may read frames


class LatentMotion:
    """Reward: how much the block's latents change (read from latents alone)."""

    reads_frames = False

    def __call__(self, step):
        latents = step.latents.float()
        return (latents[:, :, -1] - latents[:, :, 0]).abs().mean(dim=(1, 2, 3)).numpy()


def test_ppo_trains_on_latent_observations(world):
    from stable_baselines3 import PPO

    from matrixgame_env.sb3 import DreamVecEnv

    venv = DreamVecEnv(model=world, num_envs=4, observation="latent", reward=LatentMotion(), max_episode_steps=3)
    assert venv.observation_space.shape == (16, 3, 2, 4) and venv.observation_space.dtype == np.float32
    venv.seed(1)
    model = PPO("MlpPolicy", venv, n_steps=8, batch_size=16, n_epochs=2, seed=0, verbose=0, device="cpu")
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(total_timesteps=64)
    assert model.num_timesteps >= 64
    assert any(not np.allclose(a.numpy(), p.detach().numpy()) for a, p in zip(before, model.policy.parameters()))
    obs = venv.reset()
    for _ in range(3):
        obs, rewards, dones, infos = venv.step(np.zeros((4, 6), np.float32))
    assert dones.all() and all(i["terminal_observation"].shape == (16, 3, 2, 4) for i in infos)
    assert np.isfinite(rewards).all() and (rewards > 0).all()
