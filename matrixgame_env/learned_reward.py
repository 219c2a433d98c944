"""`LearnedReward`: the reward head shipped with a model, as a reward plug-in (see `rewards.py`).

A model folder ships a head when its config has `extra["reward_head"]` (written by
`matrixgame-env train reward`):

    {"file": "reward_head.safetensors", "config": {...RewardHead arguments},
     "progress_scale": 64.0, "stuck_distance": 16.0, ...}

    env = gym.make("MatrixGame/Doom-v0", model="runs/doom/reward/model",
                   reward=LearnedReward(target="progress"))
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .model_config import ModelConfig
from .nn.reward_head import RewardHead
from .rewards import StepOutcome
from .weights import load_into, read_state_dict

REWARD_HEAD_KEY = "reward_head"
TARGETS = ("progress", "not_stuck")


def load_reward_head(folder: str | os.PathLike) -> tuple[RewardHead, dict[str, Any]]:
    """(head in eval mode on the CPU, its `extra["reward_head"]` settings) of a model folder."""
    folder = Path(folder)
    config = ModelConfig.load(folder)
    settings = config.extra.get(REWARD_HEAD_KEY)
    if settings is None:
        raise ValueError(
            f"the model in {folder} ships no reward head (config extra has no {REWARD_HEAD_KEY!r}); "
            "train one with: matrixgame-env train reward"
        )
    head = RewardHead.from_config(settings["config"])
    weights = folder / settings["file"]
    load_into(head, read_state_dict(weights), what="reward head", source=weights)
    return head.eval(), settings


class LearnedReward:
    """Reward predicted by the model's reward head from the latents of the block just generated.

    target "progress": distance moved in the facing direction over the block, in units of
    `progress_scale` map units (64 by default, about one floor tile); "not_stuck": 1 - the predicted
    probability that the player moved less than `stuck_distance` map units over the block.

    Args:
        model: model folder holding the head; None reads it from the world's folder in `bind`.
        target: "progress" or "not_stuck".
    """

    reads_frames = False

    def __init__(self, model: str | os.PathLike | None = None, target: str = "progress") -> None:
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        self.target = target
        self.head: RewardHead | None = None
        self.settings: dict[str, Any] = {}
        if model is not None:
            self.head, self.settings = load_reward_head(model)

    def bind(self, world: Any) -> None:
        if self.head is None:
            if world.folder is None:
                raise ValueError("the world model was not loaded from a folder: pass LearnedReward(model=folder)")
            self.head, self.settings = load_reward_head(world.folder)
        self.head.to(world.device)

    @torch.no_grad()
    def __call__(self, step: StepOutcome) -> np.ndarray:
        if self.head is None:
            raise RuntimeError("LearnedReward needs a model folder or bind(world) before use (the env binds it)")
        weight = self.head.out.weight
        output = self.head(step.latents.to(weight.device, torch.float32)).float()  # [B, 2]
        if self.target == "progress":
            reward = output[:, 0]
        else:
            reward = 1.0 - torch.sigmoid(output[:, 1])
        return reward.cpu().numpy().astype(np.float32)
