"""The reward head: its targets from game variables, fitting, the training stage, and `LearnedReward`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_training import run_cli, tiny_latents, tiny_model_folder, train

from matrixgame_env.data.vizdoom_recorder import VARIABLE_NAMES
from matrixgame_env.env import MatrixGameEnv
from matrixgame_env.learned_reward import LearnedReward, load_reward_head
from matrixgame_env.nn.reward_head import RewardHead
from matrixgame_env.rewards import StepOutcome
from matrixgame_env.train.reward import block_targets, reward_losses

NAMES = list(VARIABLE_NAMES)


def _variables(x: np.ndarray, y: np.ndarray, angle_degrees: float) -> np.ndarray:
    """Video-rate variables [1, T, V] of a player at (x[t], y[t]) facing `angle_degrees`."""
    variables = np.zeros((1, len(x), len(NAMES)), np.float32)
    variables[0, :, NAMES.index("POSITION_X")] = x
    variables[0, :, NAMES.index("POSITION_Y")] = y
    variables[0, :, NAMES.index("ANGLE")] = angle_degrees
    return variables


def test_progress_is_the_distance_moved_in_the_facing_direction() -> None:
    x = 10.0 * np.arange(9)  # 10 map units east per frame, over the 8 transitions of block 0
    progress, path = block_targets(_variables(x, np.zeros(9), 0.0), NAMES, num_blocks=1)
    assert progress[0, 0] == pytest.approx(80.0) and path[0, 0] == pytest.approx(80.0)
    progress, path = block_targets(_variables(x, np.zeros(9), 90.0), NAMES, num_blocks=1)  # facing north: strafing
    assert progress[0, 0] == pytest.approx(0.0, abs=1e-3) and path[0, 0] == pytest.approx(80.0)
    progress, _ = block_targets(_variables(-x, np.zeros(9), 0.0), NAMES, num_blocks=1)  # backing up
    assert progress[0, 0] == pytest.approx(-80.0)


def test_later_blocks_start_at_the_last_frame_before_them() -> None:
    frames = np.arange(21)  # 6 latent frames: block 0 = frames 0..8, block 1 = transitions 8 -> 20
    x = 10.0 * np.clip(frames - 8, 0, None)
    progress, path = block_targets(_variables(x, np.zeros(21), 0.0), NAMES, num_blocks=2)
    assert progress[0].tolist() == pytest.approx([0.0, 120.0]) and path[0].tolist() == pytest.approx([0.0, 120.0])


def test_reward_head_fits_a_tiny_synthetic_target() -> None:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(64, 16, 3, 2, 4, generator=generator)
    progress = latents[:, 0, 2].mean(dim=(1, 2)) - latents[:, 0, 0].mean(dim=(1, 2))  # a change across the block
    stuck = (progress.abs() < 0.3).float()
    torch.manual_seed(0)
    head = RewardHead(width=32, depth=2)
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(60):
        losses = reward_losses(head, latents, progress, stuck)
        losses["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses["progress_mse"] < 0.05 * progress.var() and losses["stuck_accuracy"] > 0.95


def test_reward_head_rejects_a_block_of_another_length() -> None:
    with pytest.raises(ValueError, match=r"\[B, 16, 3, h, w\]"):
        RewardHead()(torch.zeros(1, 16, 4, 2, 4))


@pytest.fixture(scope="module")
def rewarded_model(tmp_path_factory) -> Path:
    """OUT/reward/model after a 5-step reward run on the tiny latents."""
    out = tmp_path_factory.mktemp("reward")
    train("reward", "--data", str(tiny_latents(tmp_path_factory)), "--init", str(tiny_model_folder(tmp_path_factory)),
          "--out", str(out), "--steps", "5", "--batch-size", "4", "--warmup-steps", "1", "--width", "16")  # fmt: skip
    return out / "reward" / "model"


def test_reward_stage_ships_the_head_with_the_model(rewarded_model) -> None:
    config = json.loads((rewarded_model / "config.json").read_text())
    settings = config["extra"]["reward_head"]
    assert settings["file"] == "reward_head.safetensors" and settings["config"]["width"] == 16
    assert settings["metrics"]["split"] == "val" and settings["steps"] == 5
    assert all((rewarded_model / name).is_file() for name in config["start_images"])  # copied from --init
    head, _ = load_reward_head(rewarded_model)
    assert isinstance(head, RewardHead)


def test_a_stopped_reward_stage_writes_its_model_and_resumes_to_the_end(tmp_path_factory) -> None:
    out = tmp_path_factory.mktemp("reward_stopped")
    data, init = tiny_latents(tmp_path_factory), tiny_model_folder(tmp_path_factory)
    common = ["--data", str(data), "--init", str(init), "--out", str(out),
              "--steps", "4", "--batch-size", "4", "--warmup-steps", "1", "--width", "16"]  # fmt: skip
    train("reward", *common, "--stop-after-steps", "2")
    result = json.loads((out / "reward" / "result.json").read_text())
    assert result["step"] == 2 and result["finished"] is False
    head, settings = load_reward_head(out / "reward" / "model")  # usable before the stage ends
    assert isinstance(head, RewardHead) and settings["steps"] == 2
    train("reward", *common, "--resume")
    result = json.loads((out / "reward" / "result.json").read_text())
    assert result["step"] == 4 and result["finished"] is True and result["split"] == "val"
    assert load_reward_head(out / "reward" / "model")[1]["steps"] == 4


@pytest.mark.parametrize("target", ["progress", "not_stuck"])
def test_learned_reward_reads_the_block_latents(rewarded_model, target) -> None:
    reward = LearnedReward(rewarded_model, target=target)
    latents = torch.randn(3, 16, 3, 2, 4)
    step = StepOutcome(frames=np.zeros((3, 12, 16, 32, 3), np.uint8), latents=latents,
                       keyboard=np.zeros((3, 4)), mouse=np.zeros((3, 2)), step_index=np.ones(3))  # fmt: skip
    values = reward(step)
    assert values.shape == (3,) and values.dtype == np.float32
    head, settings = load_reward_head(rewarded_model)
    with torch.no_grad():
        output = head(latents)
    expected = output[:, 0] if target == "progress" else 1 - torch.sigmoid(output[:, 1])
    np.testing.assert_allclose(values, expected.numpy(), rtol=1e-6)


def test_learned_reward_in_the_env_binds_to_the_model_folder(rewarded_model) -> None:
    env = MatrixGameEnv(rewarded_model, device="cpu", reward=LearnedReward(target="not_stuck"))
    env.reset(seed=0)
    _, reward, *_ = env.step({"keyboard": np.array([1, 0, 0, 0], np.int8), "mouse": np.zeros(2, np.float32)})
    assert 0.0 <= reward <= 1.0
    env.close()


def test_imagine_without_frames_scores_plans_with_the_learned_reward(rewarded_model) -> None:
    env = MatrixGameEnv(rewarded_model, device="cpu", reward=LearnedReward(target="progress"))
    env.reset(seed=1)
    keys = ((1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0))
    plans = [[{"keyboard": np.array(k, np.int8), "mouse": np.zeros(2, np.float32)}] * 2 for k in keys]
    with_frames, without = env.imagine(plans), env.imagine(plans, frames=False)
    assert "frames" not in without and without["rewards"].shape == (3, 2)
    assert np.array_equal(without["rewards"], with_frames["rewards"])
    assert np.array_equal(without["latents"], with_frames["latents"])
    env.close()


def test_learned_reward_needs_a_model_with_a_head(tmp_path_factory) -> None:
    with pytest.raises(ValueError, match="train reward"):
        LearnedReward(tiny_model_folder(tmp_path_factory))


def test_reward_stage_needs_encoded_latents(tmp_path_factory, tmp_path) -> None:
    model = tiny_model_folder(tmp_path_factory)
    status, errors = run_cli("train", "reward", "--data", str(tmp_path), "--init", str(model), "--out", str(tmp_path))
    assert status == 2 and "train encode" in errors
