"""Wrappers: flat actions for stable-baselines3, resized observations, frame stacking."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces
from gymnasium.wrappers import FrameStackObservation

from .spaces import ActionLayout

__all__ = ["FlattenActions", "DiscretizeActions", "ResizeFrames", "FrameStackObservation"]


def _layout(env: gym.Env) -> ActionLayout:
    layout = getattr(env.unwrapped, "layout", None)
    if not isinstance(layout, ActionLayout):
        raise TypeError("this wrapper needs a MatrixGameEnv underneath (an env with an ActionLayout)")
    return layout


class FlattenActions(gym.ActionWrapper):
    """Dict actions -> `Box(-1, 1, (K + 2,))` for algorithms without Dict action spaces (SB3).

    Entry k < K presses key k when > 0; the last two entries are the mouse [pitch, yaw] as a
    fraction of the layout's mouse limit. One-hot layouts are left as `Discrete`.
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.layout = _layout(env)
        if self.layout.one_hot:
            self.action_space = env.action_space
        else:
            width = self.layout.keyboard_dim + (2 if self.layout.mouse else 0)
            self.action_space = spaces.Box(-1.0, 1.0, (width,), np.float32)

    def action(self, action: Any) -> Any:
        if self.layout.one_hot:
            return action
        flat = np.asarray(action, dtype=np.float32).reshape(-1)
        if flat.shape != self.action_space.shape:
            raise ValueError(f"flat actions must have shape {self.action_space.shape}, got {flat.shape}")
        if not np.isfinite(flat).all():
            raise ValueError(f"flat action contains NaN or infinite values: {flat.tolist()}")
        k = self.layout.keyboard_dim
        out: dict[str, np.ndarray] = {"keyboard": (flat[:k] > 0).astype(np.int8)}
        if self.layout.mouse:
            out["mouse"] = (np.clip(flat[k:], -1, 1) * self.layout.mouse_limit).astype(np.float32)
        return out


class DiscretizeActions(gym.ActionWrapper):
    """Dict actions -> `MultiDiscrete([2] * K + [bins, bins])`: keys on/off, each mouse axis in
    `bins` evenly spaced values over [-limit, limit] (bins odd, so the middle bin is 0)."""

    def __init__(self, env: gym.Env, bins: int = 9) -> None:
        super().__init__(env)
        if bins < 3 or bins % 2 == 0:
            raise ValueError(f"bins must be odd and >= 3, got {bins}")
        self.layout = _layout(env)
        self.bins = bins
        if self.layout.one_hot:
            self.action_space = env.action_space
        else:
            nvec = [2] * self.layout.keyboard_dim + ([bins, bins] if self.layout.mouse else [])
            self.action_space = spaces.MultiDiscrete(nvec)
        self._values = np.linspace(-self.layout.mouse_limit, self.layout.mouse_limit, bins, dtype=np.float32)

    def action(self, action: Any) -> Any:
        if self.layout.one_hot:
            return action
        chosen = np.asarray(action).reshape(-1)
        if not self.action_space.contains(chosen.astype(self.action_space.dtype)):
            raise ValueError(f"action {chosen.tolist()} is outside {self.action_space}")
        k = self.layout.keyboard_dim
        out: dict[str, np.ndarray] = {"keyboard": chosen[:k].astype(np.int8)}
        if self.layout.mouse:
            out["mouse"] = self._values[chosen[k:]]
        return out


class ResizeFrames(gym.ObservationWrapper):
    """Resize HxWx3 (or TxHxWx3) uint8 observations to `size` = (height, width), antialiased."""

    def __init__(self, env: gym.Env, size: tuple[int, int]) -> None:
        super().__init__(env)
        self.size = (int(size[0]), int(size[1]))
        old = env.observation_space
        if not isinstance(old, spaces.Box) or old.shape[-1] != 3:
            raise TypeError(f"ResizeFrames needs ...xHxWx3 image observations, got {old}")
        self.observation_space = spaces.Box(0, 255, (*old.shape[:-3], *self.size, 3), np.uint8)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        frames = torch.from_numpy(np.asarray(observation)).reshape(-1, *observation.shape[-3:])
        pixels = frames.permute(0, 3, 1, 2).float()
        resized = F.interpolate(pixels, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        out = resized.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return out.reshape(self.observation_space.shape)
