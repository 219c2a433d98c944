"""Reward and termination plug-ins.

A reward is any callable `reward(step) -> np.ndarray [B]` and a termination any callable
`terminated(step) -> np.ndarray[bool] [B]`, where `step` is a `StepOutcome` describing the block
just generated for B worlds. Optional `bind(world)` is called once with the `WorldModel` (for
rewards that need its encoders) and `reset(indices, start_frames)` when worlds restart.

Rollouts that skip the VAE decoder (`imagine(..., frames=False)`) give `step.frames = None`: they
accept only plug-ins whose `reads_frames` attribute is False (a plug-in without it is assumed to
read frames). Every built-in declares it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .images import ImageLike, fit_image


@dataclass
class StepOutcome:
    """What one block produced, for B worlds."""

    frames: np.ndarray | None  # [B, T, H, W, 3] uint8; None where the block was not decoded
    latents: torch.Tensor  # [B, 16, frames_per_block, h, w]
    keyboard: np.ndarray  # [B, K] actions held during the block
    mouse: np.ndarray | None  # [B, 2]
    step_index: np.ndarray  # [B] steps taken in each world's episode, this one included

    @property
    def batch_size(self) -> int:
        """B, the number of worlds in this outcome."""
        return len(self.step_index)


class Reward(Protocol):
    def __call__(self, step: StepOutcome) -> np.ndarray: ...


class ZeroReward:
    """Always 0: for pure exploration or when rewards come from a wrapper."""

    reads_frames = False

    def __call__(self, step: StepOutcome) -> np.ndarray:
        return np.zeros(step.batch_size, np.float32)


class NeverTerminate:
    reads_frames = False

    def __call__(self, step: StepOutcome) -> np.ndarray:
        return np.zeros(step.batch_size, bool)


class PixelGoalReward:
    """Negative mean squared pixel distance (0..1 scale) between the last frame and a goal image.

    The goal is centre-cropped and resized to the frame size, as start images are.
    """

    reads_frames = True

    def __init__(self, goal: ImageLike, size: tuple[int, int] | None = None) -> None:
        self._goal_image = goal
        self._goal: np.ndarray | None = None
        if size is not None:
            self._set_size(size)

    def _set_size(self, size: tuple[int, int]) -> None:
        self._goal = ((fit_image(self._goal_image, size) + 1) / 2).permute(1, 2, 0).numpy()

    def bind(self, world: Any) -> None:
        self._set_size(tuple(world.video_size))

    def distance(self, frames: np.ndarray) -> np.ndarray:
        if self._goal is None:
            self._set_size(frames.shape[2:4])
        last = frames[:, -1].astype(np.float32) / 255.0
        return ((last - self._goal[None]) ** 2).mean(axis=(1, 2, 3))

    def __call__(self, step: StepOutcome) -> np.ndarray:
        return -self.distance(step.frames).astype(np.float32)


class ClipGoalReward:
    """Cosine similarity between CLIP class tokens of the last frame and of a goal image.

    Uses the world model's own image encoder, so it works for any model (the official ViT-H/14
    or the bundled small model's encoder).
    """

    reads_frames = True

    def __init__(self, goal: ImageLike) -> None:
        self._goal_image = goal
        self._world: Any = None
        self._goal_embedding: torch.Tensor | None = None

    def bind(self, world: Any) -> None:
        self._world = world
        pixels = fit_image(self._goal_image, tuple(world.video_size))[None]
        self._goal_embedding = self._embed(pixels)

    @torch.no_grad()
    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        clip = self._world.clip
        tokens = clip(pixels.to(clip.patch_embedding.weight.device, clip.patch_embedding.weight.dtype))
        return F.normalize(tokens[:, 0].float(), dim=-1)

    def __call__(self, step: StepOutcome) -> np.ndarray:
        if self._goal_embedding is None:
            raise RuntimeError("ClipGoalReward needs bind(world) before use (the env does this)")
        last = torch.from_numpy(step.frames[:, -1]).permute(0, 3, 1, 2).float() / 127.5 - 1
        similarity = self._embed(last) @ self._goal_embedding[0]
        return similarity.cpu().numpy().astype(np.float32)


class GoalReached:
    """Terminates when a goal reward (pixel or CLIP) passes a threshold."""

    def __init__(self, reward: Any, threshold: float) -> None:
        self.reward = reward
        self.threshold = threshold

    @property
    def reads_frames(self) -> bool:
        return plugin_reads_frames(self.reward)

    def bind(self, world: Any) -> None:
        if hasattr(self.reward, "bind"):
            self.reward.bind(world)

    def __call__(self, step: StepOutcome) -> np.ndarray:
        return self.reward(step) >= self.threshold


def plugin_reads_frames(plugin: Any) -> bool:
    """Whether a reward or termination plug-in may read `step.frames` (True unless it says otherwise)."""
    return bool(getattr(plugin, "reads_frames", True))


def frame_reader(*plugins: Any) -> str | None:
    """The name of the first plug-in that may read `step.frames` (None: none may; None plug-ins are skipped)."""
    for plugin in plugins:
        if plugin is not None and plugin_reads_frames(plugin):
            return getattr(plugin, "__qualname__", None) or type(plugin).__qualname__
    return None


def check_frames_not_needed(*plugins: Any, what: str) -> None:
    """Refuse plug-ins that may read frames where `what` decodes none, saying how to proceed."""
    name = frame_reader(*plugins)
    if name is not None:
        raise ValueError(
            f"{what} decodes no frames, but the plug-in {name} may read them (step.frames); use "
            "plug-ins that read only latents and actions (e.g. LearnedReward, ZeroReward), ask for "
            "frames, or, if this one never reads step.frames, give it the attribute reads_frames = False"
        )


def bind_all(world: Any, *plugins: Any) -> None:
    for plugin in plugins:
        if hasattr(plugin, "bind"):
            plugin.bind(world)
