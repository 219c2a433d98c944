"""`RealDoomEnv`: the real ViZDoom game behind the same spaces as a dreamed Doom world.

A policy trained inside `MatrixGame/Doom-v0` runs here unchanged: the action space is the model's
(keyboard [W, S, A, D] as MultiBinary(4), mouse [pitch, yaw] as a Box in model units per video frame),
observations are HxWx3 uint8 frames at the model's video size, and one `step` holds the action for one
block of video frames, as a dream step does (8 new frames on the first step, 12 after; each video frame
is `tics_per_frame` game tics). Actions become ViZDoom buttons and frames are rendered exactly as the
recorder that made the model's training data does (`vizdoom_recorder`).

The reward comes from the game variables with the definition the model's reward head is trained on
(`matrixgame_env.train.reward.block_targets`): "progress" is the distance moved in the facing
direction over the block, in units of `progress_scale` map units; "not_stuck" is 1 unless the path
over the block was shorter than `stuck_distance` map units. `stuck_penalty` subtracts that much when
stuck. `LearnedProgressReward` is the dream-side counterpart for the model's learned head.

    env = gymnasium.make("MatrixGame/DoomReal-v0")                     # sized for doom-small
    env = RealDoomEnv(model="path/to/model", reward="progress", stuck_penalty=0.5, max_episode_steps=16)

ViZDoom keeps a cache folder `_vizdoom/` in the current working directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from ..env import frame_observation_space, pad_block
from ..learned_reward import REWARD_HEAD_KEY, LearnedReward
from ..model_config import ModelConfig
from ..rewards import ClipGoalReward, PixelGoalReward, StepOutcome, bind_all
from ..spaces import ActionLayout, layout_for
from ..train.reward import block_targets
from ..world.sampler import SamplerConfig
from .vizdoom_recorder import (
    ANGLE_STEP,
    DEFAULT_MAPS,
    GAME_VARIABLES,
    TICRATE,
    DoomRecorder,
    RecorderConfig,
    _button,
    _steps_per_tic,
)

REAL_REWARDS = ("progress", "not_stuck")
DOOM_KEYS = ("forward", "back", "left", "right")  # the recorder's keyboard buttons, in the universal order
DEFAULT_PROGRESS_SCALE = 64.0  # map units per unit of progress reward (the reward head's default)
DEFAULT_STUCK_DISTANCE = 16.0  # map units: a shorter path over a block counts as stuck
# Standing still this long at reset settles the weapon's bobbing, which the engine carries over from
# the previous episode: the same seed then gives the same frames whatever was played before.
WARMUP_TICS = 35
_POSITION = (GAME_VARIABLES.index("POSITION_X"), GAME_VARIABLES.index("POSITION_Y"))
_ANGLE = GAME_VARIABLES.index("ANGLE")
_PITCH = GAME_VARIABLES.index("PITCH")


def model_config_of(model: Any) -> ModelConfig:
    """The config of a `WorldModel`, a `ModelConfig`, a preset name or a model folder (no weights read)."""
    from ..checkpoints import preset_dir

    if isinstance(model, ModelConfig):
        return model
    config = getattr(model, "config", None)
    if isinstance(config, ModelConfig):
        return config
    path = Path(os.fspath(model)).expanduser()
    return ModelConfig.load(path if path.is_dir() else preset_dir(str(model)))


class LearnedProgressReward(LearnedReward):
    """The dream counterpart of `RealDoomEnv(reward="progress", stuck_penalty=p)`: the reward head's
    predicted progress minus `stuck_penalty` times its predicted probability of being stuck.

    model: the folder holding the head (None: the world's own folder, read when the env binds it).
    """

    def __init__(self, model: str | os.PathLike | None = None, stuck_penalty: float = 0.0) -> None:
        super().__init__(model, target="progress")
        self.stuck_penalty = float(stuck_penalty)

    @torch.no_grad()
    def __call__(self, step: StepOutcome) -> np.ndarray:
        if self.head is None:
            raise RuntimeError("LearnedProgressReward needs a model folder or bind(world) before use")
        weight = self.head.out.weight
        output = self.head(step.latents.to(weight.device, torch.float32)).float()  # [B, 2]
        reward = output[:, 0] - self.stuck_penalty * torch.sigmoid(output[:, 1])
        return reward.cpu().numpy().astype(np.float32)


TASKS = ("learned", "progress", "not_stuck", "clip_goal", "pixel_goal")


@dataclass(frozen=True)
class DoomTask:
    """One task in both worlds: a reward plug-in for the dream and the matching reward of `RealDoomEnv`.

    kind: "learned" (forward progress without getting stuck: the reward head's progress minus
    `stuck_penalty` times its stuck probability; in the real game the same from game variables),
    "progress" (the same without the penalty), "not_stuck", or "clip_goal" / "pixel_goal" (similarity
    of the last frame to `goal`, computed from frames in both worlds: for models without a reward head).
    Build it with `DoomTask.for_model`, which checks that the model can provide the reward.
    """

    kind: str
    stuck_penalty: float = 0.0
    goal: str | None = None  # picture path of the goal tasks

    @classmethod
    def for_model(cls, kind: str, world: Any, *, goal: Any = None, stuck_penalty: float = 0.5) -> DoomTask:
        """The task `kind` for a loaded `WorldModel` (`goal` defaults to its last shipped start picture)."""
        if kind not in TASKS:
            raise ValueError(f"unknown task {kind!r}; accepted: {list(TASKS)}")
        if kind in ("learned", "progress", "not_stuck"):
            if REWARD_HEAD_KEY not in world.config.extra or world.folder is None:
                raise ValueError(
                    f"model {world.config.name!r} ships no reward head, so there is no dream reward for the "
                    f"{kind!r} task. Train one (matrixgame-env train reward --init MODEL ...) and use its "
                    "OUT/reward/model folder as the model, or pick a goal task that works with any model: "
                    "clip_goal or pixel_goal (with a goal picture)"
                )
            return cls(kind, stuck_penalty if kind == "learned" else 0.0)
        if goal is None:
            shipped = world.start_image_paths()
            if not shipped:
                raise ValueError(f"model {world.config.name!r} ships no start picture: give a goal picture")
            goal = shipped[-1]
        if not Path(goal).is_file():
            raise FileNotFoundError(f"goal picture {goal} does not exist")
        return cls(kind, 0.0, str(goal))

    def dream_reward(self) -> Any:
        """A fresh reward plug-in for `MatrixGameEnv` / `MatrixGameVectorEnv` / `DreamVecEnv`."""
        if self.kind in ("learned", "progress"):
            return LearnedProgressReward(stuck_penalty=self.stuck_penalty)
        if self.kind == "not_stuck":
            return LearnedReward(target="not_stuck")
        return self._goal_reward()

    def real_env_kwargs(self) -> dict[str, Any]:
        """`reward` and `stuck_penalty` for `RealDoomEnv` (a fresh plug-in for the goal tasks)."""
        if self.kind in ("learned", "progress"):
            return {"reward": "progress", "stuck_penalty": self.stuck_penalty}
        if self.kind == "not_stuck":
            return {"reward": "not_stuck", "stuck_penalty": 0.0}
        return {"reward": self._goal_reward(), "stuck_penalty": 0.0}

    def _goal_reward(self) -> Any:
        return ClipGoalReward(self.goal) if self.kind == "clip_goal" else PixelGoalReward(self.goal)


class RealDoomEnv(gym.Env):
    """The real game with a dreamed Doom world's spaces and step length (see the module docstring).

    Args:
        model: the world model whose spaces to match: a `WorldModel`, a `ModelConfig`, a preset name or
            a folder. Video size, frame rate, block length, action layout and the reward head's
            `progress_scale` / `stuck_distance` are read from it.
        maps: freedoom2 maps to play; `reset` picks one with the env's RNG (or options={"map": name}).
            Changing the map restarts the engine (about 0.2 s); a single map restarts in ~20 ms.
        reward: "progress", "not_stuck", or a reward plug-in of `matrixgame_env.rewards` that reads
            frames (e.g. `ClipGoalReward`); it is bound to `model` (loaded on the CPU when given by name).
        stuck_penalty: subtracted from the reward on a block where the player was stuck.
        start_turn: at reset the player turns by a random angle in [-start_turn, start_turn] degrees,
            so that episodes of one map start from different views.
        max_episode_steps: truncation after that many steps (None: never).
        observation: "last" (the block's last frame) or "block" (all its frames), as in `MatrixGameEnv`.
        degrees_per_unit: degrees of turn per video frame for a mouse value of 1 (the recorder's
            convention: 40, so 0.1 = 4 degrees).

    `info` holds "frames" (every frame of the block), "frame_index", "block", "map", the player's
    "position" (map units), "angle" and "pitch" (engine degrees: angle counter-clockwise, pitch positive
    looking down) after the block, and after a step "progress" and "path" (map units) and "stuck".
    The episode terminates when the game ends (the player died or left the map).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 17.5}

    def __init__(
        self,
        model: Any = "doom-small",
        *,
        maps: tuple[str, ...] | list[str] = ("MAP01",),
        reward: Any = "progress",
        stuck_penalty: float = 0.0,
        start_turn: float = 180.0,
        max_episode_steps: int | None = None,
        observation: str = "last",
        render_mode: str | None = None,
        degrees_per_unit: float = 40.0,
    ) -> None:
        super().__init__()
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        config = model_config_of(model)
        self.layout: ActionLayout = layout_for(config.mode, config.actions)
        if self.layout.one_hot or not self.layout.mouse or self.layout.keys != DOOM_KEYS:
            raise ValueError(
                f"RealDoomEnv plays with the universal layout (keys {list(DOOM_KEYS)} and a mouse); model "
                f"{config.name!r} has the {self.layout.name} layout with keys {list(self.layout.keys)}"
            )
        unknown = sorted(set(maps) - set(DEFAULT_MAPS))
        if not maps or unknown:
            raise ValueError(f"maps must be some of {list(DEFAULT_MAPS)}, got {list(maps)}")
        if isinstance(reward, str) and reward not in REAL_REWARDS:
            raise ValueError(f"reward must be one of {REAL_REWARDS} or a reward plug-in, got {reward!r}")
        self.config = config
        self.maps = tuple(maps)
        self.reward = reward
        self.stuck_penalty = float(stuck_penalty)
        self.start_turn = float(start_turn)
        self.max_episode_steps = max_episode_steps
        self.render_mode = render_mode
        self.observation_mode = observation
        latent_frames = SamplerConfig.from_dict(config.sampler).frames_per_block
        self.latent_frames_per_block = latent_frames
        self.block_frames = 4 * latent_frames  # video frames of a block after the first
        self.first_block_frames = 4 * (latent_frames - 1) + 1  # the first block's, its start frame included
        self.tics_per_frame = max(1, round(TICRATE / config.fps))
        head = config.extra.get("reward_head", {})
        self.progress_scale = float(head.get("progress_scale", DEFAULT_PROGRESS_SCALE))
        self.stuck_distance = float(head.get("stuck_distance", DEFAULT_STUCK_DISTANCE))
        self.metadata = dict(self.metadata, render_fps=config.fps)
        self.observation_space = frame_observation_space(config.video_size, observation, self.block_frames)
        self.action_space = self.layout.action_space()
        if not isinstance(reward, str):
            bind_all(_world_for_binding(model, reward), reward)
        self.recorder = DoomRecorder(
            RecorderConfig(
                size=config.video_size,
                tics_per_frame=self.tics_per_frame,
                degrees_per_unit=degrees_per_unit,
                maps=self.maps,
                warmup_tics=WARMUP_TICS,
            )
        )
        self._steps = 0
        self._frames: np.ndarray | None = None  # the last block's frames
        self._variables: list[np.ndarray] = []  # game variables of every video frame of the episode
        self._map: str | None = None

    # ------------------------------------------------------------------ gymnasium API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = set(options) - {"map"}
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; accepted: 'map'")
        map_name = options.get("map", self.maps[int(self.np_random.integers(len(self.maps)))])
        if map_name not in self.maps:
            raise ValueError(f"map {map_name!r} is not one of this env's maps {list(self.maps)}")
        self.recorder.start_episode(int(self.np_random.integers(2**31)), map_name)
        self._map = map_name
        turn = float(self.np_random.uniform(-self.start_turn, self.start_turn)) if self.start_turn > 0 else 0.0
        turn_steps = round(turn / ANGLE_STEP)
        if turn_steps:
            self._game.make_action(self._buttons(np.zeros(4), yaw_steps=turn_steps, pitch_steps=0), 1)
        frame, variables = self._read()
        self._steps = 0
        self._variables = [variables]
        self._frames = frame[None]
        info = {"frames": self._frames, "frame_index": 0, "block": 0, "map": map_name, **self._pose(variables)}
        return self._observation(self._frames), info

    def step(self, action: Any):
        if self._frames is None:
            raise RuntimeError("step() called before reset(): call env.reset() first")
        keyboard, mouse = self.layout.to_arrays(action)
        tics = self.tics_per_frame
        yaw_steps = _steps_per_tic(float(mouse[1]) * self.recorder.config.degrees_per_unit, tics)
        pitch_steps = _steps_per_tic(float(mouse[0]) * self.recorder.config.degrees_per_unit, tics)
        buttons = self._buttons(keyboard, yaw_steps, pitch_steps)
        first = self._steps == 0
        new_frames = self.first_block_frames - 1 if first else self.block_frames
        frames = [self._frames[-1]] if first else []
        terminated = False
        for _ in range(new_frames):
            self._game.make_action(buttons, tics)
            if self._game.is_episode_finished():  # the player died or left the map
                terminated = True
                break
            frame, variables = self._read()
            frames.append(frame)
            self._variables.append(variables)
        self._steps += 1
        block = np.stack(frames) if frames else self._frames[-1:]
        self._frames = block
        progress, path = self._block_motion()
        stuck = path < self.stuck_distance
        reward = self._reward(block, keyboard, mouse, progress, stuck)
        truncated = self.max_episode_steps is not None and self._steps >= self.max_episode_steps
        info = {
            "frames": block,
            "frame_index": len(self._variables) - 1,
            "block": self._steps,
            "map": self._map,
            "progress": progress,
            "path": path,
            "stuck": bool(stuck),
            **self._pose(self._variables[-1]),
        }
        return self._observation(block), reward, terminated, truncated, info

    def render(self):
        if self.render_mode == "rgb_array" and self._frames is not None:
            return self._frames[-1].copy()
        return None

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None

    # ------------------------------------------------------------------ helpers
    @property
    def _game(self) -> Any:
        return self.recorder._game

    def _read(self) -> tuple[np.ndarray, np.ndarray]:
        state = self._game.get_state()
        return self.recorder._resize(state.screen_buffer), np.asarray(state.game_variables, np.float64)

    @staticmethod
    def _buttons(keyboard: np.ndarray, yaw_steps: int, pitch_steps: int) -> list[float]:
        # The recorder's buttons: the four movement keys, USE (never pressed: the model has no such key),
        # then turning and looking as whole engine angle steps per tic.
        return [*(float(k) for k in keyboard), 0.0, _button(yaw_steps), _button(pitch_steps)]

    def _block_motion(self) -> tuple[float, float]:
        """(progress, path length) in map units over the last block, by the reward head's definition."""
        history = np.stack(self._variables)[None].astype(np.float32)  # [1, frames so far, V]
        progress, path = block_targets(history, GAME_VARIABLES, self._steps, self.latent_frames_per_block)
        return float(progress[0, -1]), float(path[0, -1])

    def _reward(self, block: np.ndarray, keyboard: np.ndarray, mouse: np.ndarray, progress: float, stuck: bool):
        if self.reward == "progress":
            value = progress / self.progress_scale
        elif self.reward == "not_stuck":
            value = 0.0 if stuck else 1.0
        else:
            outcome = StepOutcome(
                frames=pad_block(block, self.block_frames)[None],
                latents=None,  # the real game has no latents: frame-based plug-ins only
                keyboard=keyboard[None],
                mouse=mouse[None],
                step_index=np.array([self._steps]),
            )
            value = float(np.asarray(self.reward(outcome))[0])
        return float(value - self.stuck_penalty * float(stuck))

    def _pose(self, variables: np.ndarray) -> dict[str, Any]:
        return {
            "position": variables[list(_POSITION)].copy(),
            "angle": float(variables[_ANGLE]),
            "pitch": float(variables[_PITCH]),
        }

    def _observation(self, frames: np.ndarray) -> np.ndarray:
        if self.observation_mode == "last":
            return frames[-1].copy()
        return pad_block(frames, self.block_frames).copy()


def _world_for_binding(model: Any, reward: Any) -> Any:
    """The `WorldModel` a frame-based reward plug-in binds to (loaded on the CPU from a name or folder)."""
    from ..world.model import WorldModel

    if isinstance(reward, LearnedReward):
        raise ValueError(
            "the real game has no latents for a learned reward head: use reward='progress' or 'not_stuck' "
            "(the game-variable targets the head was trained on)"
        )
    if isinstance(model, WorldModel):
        return model
    if isinstance(model, ModelConfig):
        raise ValueError("a reward plug-in needs the world model itself (or its name or folder), not only its config")
    return WorldModel.from_pretrained(model, device="cpu")
