"""A stable-baselines3 `VecEnv` over `MatrixGameVectorEnv`: N worlds in one forward per step.

stable-baselines3 takes no Dict actions, so actions are flat as with `wrappers.FlattenActions`
(`Box(-1, 1, (K + 2,))`: key k pressed when > 0, then the mouse as a fraction of its limit);
one-hot layouts stay `Discrete`. Finished worlds restart at once and report
`info["terminal_observation"]`, as stable-baselines3 expects. stable-baselines3 sees no frames in
infos, so an env built here decodes only each block's last frame (`info_frames=False`) unless a
reward or termination plug-in may read every frame, or `info_frames` is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env.base_vec_env import VecEnv

from .rewards import frame_reader
from .vector import MatrixGameVectorEnv


class DreamVecEnv(VecEnv):
    """Wraps a `MatrixGameVectorEnv` (built here from the same arguments, or given)."""

    def __init__(self, venv: MatrixGameVectorEnv | None = None, **kwargs: Any) -> None:
        if venv is None and "info_frames" not in kwargs:
            kwargs["info_frames"] = frame_reader(kwargs.get("reward"), kwargs.get("termination")) is not None
        self.venv = venv if venv is not None else MatrixGameVectorEnv(**kwargs)
        layout = self.venv.layout
        self.layout = layout
        if layout.one_hot:
            action_space = self.venv.single_action_space
        else:
            action_space = spaces.Box(-1.0, 1.0, (layout.keyboard_dim + (2 if layout.mouse else 0),), np.float32)
        super().__init__(self.venv.num_envs, self.venv.single_observation_space, action_space)
        self._actions: np.ndarray | None = None
        self._seed: int | None = None

    def reset(self) -> np.ndarray:
        obs, _ = self.venv.reset(seed=self._seed)
        self._seed = None
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)

    def step_wait(self):
        actions = self._dict_actions(self._actions)
        obs, rewards, terminated, truncated, info = self.venv.step(actions)
        dones = terminated | truncated
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        finished = np.flatnonzero(dones)
        for i in range(self.num_envs):
            infos[i]["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
        if len(finished):
            for i in finished:
                infos[i]["terminal_observation"] = obs[i].copy()
            obs = obs.copy()
            obs[finished] = self.venv.reset_worlds(finished)
        return obs, rewards.astype(np.float32), dones, infos

    def _dict_actions(self, actions: np.ndarray) -> Any:
        if self.layout.one_hot:
            return actions.astype(np.int64).reshape(self.num_envs)
        flat = actions.astype(np.float32).reshape(self.num_envs, -1)
        k = self.layout.keyboard_dim
        out = {"keyboard": (flat[:, :k] > 0).astype(np.int8)}
        if self.layout.mouse:
            out["mouse"] = (np.clip(flat[:, k:], -1, 1) * self.layout.mouse_limit).astype(np.float32)
        return out

    def close(self) -> None:
        self.venv.close()

    def seed(self, seed: int | None = None) -> list[int | None]:
        self._seed = seed
        return [None if seed is None else seed + i for i in range(self.num_envs)]

    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        return [getattr(self.venv, attr_name)] * len(self._indices(indices))

    def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
        setattr(self.venv, attr_name, value)

    def env_method(self, method_name: str, *args: Any, indices: Any = None, **kwargs: Any) -> list[Any]:
        return [getattr(self.venv, method_name)(*args, **kwargs)] * len(self._indices(indices))

    def env_is_wrapped(self, wrapper_class: type, indices: Any = None) -> list[bool]:
        return [False] * len(self._indices(indices))

    def get_images(self) -> Sequence[np.ndarray]:
        return list(self.venv.render()) if self.venv.render_mode == "rgb_array" else []

    def _indices(self, indices: Any) -> list[int]:
        if indices is None:
            return list(range(self.num_envs))
        return [indices] if isinstance(indices, int) else list(indices)
