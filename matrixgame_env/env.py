"""`MatrixGameEnv`: one dreamed world as a Gymnasium environment.

One `step` generates one block of video (9 frames on the first step, 12 after) with the action
held for the whole block. The observation is the block's last frame (or all its frames with
`observation="block"`); `info["frames"]` holds every frame of the block, unless `info_frames=False`:
with the last frame as the observation the decoder then computes only that frame and what the next
blocks need (the stream goes on exactly the same; doom-small's 64-world step on an H100 took 28.8
instead of 37.3 ms of GPU time). With
`observation="latent"` the VAE decoder does not run: the observation is the block's latent frames
(float32 [C, F, h, w], the space the DiT generates in; after a reset the start picture's latent
frame, repeated) and there are no frames.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from .images import ImageLike, fit_image
from .rewards import NeverTerminate, StepOutcome, ZeroReward, bind_all, check_frames_not_needed, frame_reader
from .spaces import ActionLayout, layout_for
from .world.model import WorldModel, enable_fast_path, to_host
from .world.state import WorldState

DEFAULT_MODEL = "doom-small"


def resolve_world(model: str | os.PathLike | WorldModel, device=None, dtype=None, mode=None) -> WorldModel:
    if isinstance(model, WorldModel):
        return model
    return WorldModel.from_pretrained(model, device=device, dtype=dtype, mode=mode)


def start_picture(world: WorldModel, image: ImageLike | None, np_random: np.random.Generator) -> ImageLike:
    """The given picture, or one of the model's shipped start pictures (chosen by the env's RNG)."""
    if image is not None:
        return image
    shipped = world.start_image_paths()
    if not shipped:
        raise ValueError(
            f"model {world.config.name!r} ships no start image: pass reset(options={{'image': ...}}) "
            "with a path, a PIL image or an HxWx3 uint8 array"
        )
    return shipped[int(np_random.integers(len(shipped)))]


def picture_as_uint8(picture: ImageLike, size: tuple[int, int]) -> np.ndarray:
    """The start picture as the model sees it (centre-cropped, resized), HxWx3 uint8."""
    return ((fit_image(picture, size) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


OBSERVATIONS = ("last", "block", "latent")


def frame_observation_space(video_size: tuple[int, int], observation: str, block_frames: int) -> spaces.Box:
    """One world's observation space of frames: the last frame, or the whole block ("block")."""
    if observation not in ("last", "block"):
        raise ValueError(f"observation must be 'last' or 'block', got {observation!r}")
    shape = (*video_size, 3) if observation == "last" else (block_frames, *video_size, 3)
    return spaces.Box(0, 255, shape, np.uint8)


def observation_space_for(world: WorldModel, observation: str) -> spaces.Box:
    """One world's observation space: frames ("last", "block") or a block's latents ("latent")."""
    if observation not in OBSERVATIONS:
        raise ValueError(f"observation must be one of {OBSERVATIONS}, got {observation!r}")
    if observation == "latent":
        shape = (world.vae.z_dim, world.sampler.config.frames_per_block, *world.config.latent_size)
        return spaces.Box(-np.inf, np.inf, shape, np.float32)
    return frame_observation_space(world.video_size, observation, world.frames_per_block)


def check_latent_observation(observation: str, render_mode: str | None, *plugins: Any) -> None:
    """Refuse what needs frames in an env that decodes none (observation "latent")."""
    if observation != "latent":
        return
    if render_mode is not None:
        raise ValueError(
            f"render_mode={render_mode!r} shows frames, which observation='latent' does not decode; "
            "use render_mode=None, or observation 'last' or 'block'"
        )
    check_frames_not_needed(*plugins, what="observation='latent'")


def decoded_last_frames(observation: str, info_frames: bool, render_mode: str | None, *plugins: Any) -> int | None:
    """How many of a block's last frames an env decodes: 1 where it observes the last frame and keeps
    no frames in info (`info_frames=False`), else None (all). Refuses what would need the others: a
    window that plays every frame, plug-ins that may read every frame (`step.frames`)."""
    if not isinstance(info_frames, bool):
        raise ValueError(f"info_frames must be True or False, got {info_frames!r}")
    if info_frames or observation != "last":
        return None
    if render_mode == "human":
        raise ValueError(
            "render_mode='human' plays every frame of a block, but observation='last' with info_frames=False "
            "decodes only its last frame; use info_frames=True, or render_mode='rgb_array' or None"
        )
    name = frame_reader(*plugins)
    if name is not None:
        raise ValueError(
            f"observation='last' with info_frames=False decodes only each block's last frame, but the "
            f"plug-in {name} may read every frame (step.frames); use info_frames=True, plug-ins that "
            "read only latents and actions, or give this one the attribute reads_frames = False"
        )
    return 1


def start_latents(state: WorldState, frames_per_block: int) -> np.ndarray:
    """The start pictures' latent frame repeated over a block: [B, C, F, h, w] float32 on the host,
    the latent observation after a reset (as a start picture's frame is the frame observation)."""
    first = state.image.frames(0, 1).float()
    return to_host(first.expand(-1, -1, frames_per_block, -1, -1).contiguous()).numpy()


def decodes_frames(observation: str, frames: bool | None) -> bool:
    """Whether `imagine` decodes frames: as asked, by default unless the env observes latents."""
    if frames is None:
        return observation != "latent"
    if frames is True and observation == "latent":
        raise ValueError(
            "imagine(frames=True) needs the VAE decoder to have followed the world, but an env with "
            "observation='latent' decodes nothing; use frames=False (latents and rewards)"
        )
    return frames


def video_frames_in_block(first: bool, latent_frames: int) -> int:
    """Video frames a block of latent frames stands for: 1 + 4 (F - 1) for a world's first, 4 F after."""
    return 4 * latent_frames - (3 if first else 0)


def pad_block(frames: np.ndarray, length: int, axis: int = 0) -> np.ndarray:
    """Front-pad a short block (the 9-frame first block, or a start picture) with its first frame."""
    missing = length - frames.shape[axis]
    if missing <= 0:
        return frames
    first = np.take(frames, [0], axis=axis)
    return np.concatenate([np.repeat(first, missing, axis=axis), frames], axis=axis)


@dataclass
class EnvSnapshot:
    """Everything needed to continue an env exactly: world state, step count, last observation."""

    world_state: WorldState
    steps: int
    last_frames: np.ndarray
    np_random_state: dict


class MatrixGameEnv(gym.Env):
    """A world model as a Gymnasium env (see the module docstring).

    model: a `WorldModel`, a preset name (e.g. "doom-small", "universal"), a model folder or a hub
    id. reward / termination: plug-ins from `matrixgame_env.rewards` (or any callable of a
    `StepOutcome`). max_episode_steps: truncation after that many blocks (None: never).
    report_timing: add `info["timing"]` (generation seconds and fps of the block); off by default
    because timings differ between identical runs (the same is always in `env.last_timing`).
    fast: on a GPU, replay steady-state blocks from CUDA graphs (same results, less overhead), run
    wide VAE decoders on channels-last tensors (same function, faster kernels) and, with Triton, the
    DiT's elementwise chains as Triton kernels (within bf16 rounding); "compile" also
    fuses the elementwise chains of the DiT and the decoder with torch.compile (about 15 s of
    compiling on first use, results within bf16 rounding); False: the eager reference path. On a
    CPU: True runs the decoder channels-last; "compile" also compiles the DiT's passes and the
    decoder (one to two minutes on first use in a process on 2 cores, results equal to float
    rounding).
    action_guidance: strengthen what the actions do (`SamplerConfig.action_guidance`: 1 is off, as
    the official sampler; each value above 1 costs one more DiT pass per denoising step); None keeps
    the model's config. It is set on the world model, so envs sharing one `WorldModel` share it.
    keyboard_guidance: a separate scale for the keyboard (`SamplerConfig.keyboard_guidance`, to make
    weakly acting keys count more than the mouse; a value that differs from the action guidance
    costs a third DiT pass per denoising step); None keeps the model's config (by default: the same
    as the action guidance). Set on the world model, as action_guidance.
    info_frames: False leaves `info["frames"]` out; with observation "last" only each block's last
    frame is then decoded (the same frame; the decoder's last layers compute only what it and the
    next blocks depend on). Not with render_mode "human" (it plays every frame) or plug-ins that may
    read every frame.
    """

    metadata = {"render_modes": ["rgb_array", "human"], "render_fps": 25}

    def __init__(
        self,
        model: str | os.PathLike | WorldModel = DEFAULT_MODEL,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        mode: str | None = None,
        render_mode: str | None = None,
        observation: str = "last",
        reward: Any = None,
        termination: Any = None,
        max_episode_steps: int | None = None,
        report_timing: bool = False,
        fast: bool | str = True,
        action_guidance: float | None = None,
        keyboard_guidance: float | None = None,
        info_frames: bool = True,
    ) -> None:
        super().__init__()
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        self.world = resolve_world(model, device, dtype, mode)
        enable_fast_path(self.world, fast)
        if action_guidance is not None:
            self.world.sampler.set_action_guidance(action_guidance)
        if keyboard_guidance is not None:
            self.world.sampler.set_keyboard_guidance(keyboard_guidance)
        config = self.world.config
        if mode is not None and mode != config.mode:
            raise ValueError(f"model {config.name!r} is a {config.mode} model, not {mode}")
        self.layout: ActionLayout = layout_for(config.mode, config.actions)
        self.mode = self.layout.name
        self.render_mode = render_mode
        self.observation_mode = observation
        self.max_episode_steps = max_episode_steps
        self.metadata = dict(self.metadata, render_fps=config.fps)
        self.block_frames = self.world.frames_per_block
        self.observation_space = observation_space_for(self.world, observation)
        self.action_space = self.layout.action_space()
        self.reward_fn = reward if reward is not None else ZeroReward()
        self.termination_fn = termination if termination is not None else NeverTerminate()
        check_latent_observation(observation, render_mode, self.reward_fn, self.termination_fn)
        self.info_frames = info_frames
        self._decoded_last = decoded_last_frames(
            observation, info_frames, render_mode, self.reward_fn, self.termination_fn
        )
        bind_all(self.world, self.reward_fn, self.termination_fn)
        self._state: WorldState | None = None
        self._steps = 0
        self._last_frames: np.ndarray | None = None
        self._display = None
        self.report_timing = report_timing
        self.last_timing: dict[str, float] = {}

    # ------------------------------------------------------------------ gymnasium API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = set(options) - {"image"}
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; accepted: 'image'")
        picture = start_picture(self.world, options.get("image"), self.np_random)
        world_seed = int(self.np_random.integers(2**62))
        self._state = self.world.start(picture, seed=world_seed, decoded=self.observation_mode != "latent")
        self._steps = 0
        if self.observation_mode == "latent":
            self._last_frames = start_latents(self._state, self.world.sampler.config.frames_per_block)[0]
            return self._observation(self._last_frames), {"frame_index": 0, "block": 0}
        self._last_frames = picture_as_uint8(picture, self.world.video_size)[None]
        info = {"frame_index": 0, "block": 0}
        if self.info_frames:
            info["frames"] = self._last_frames
        return self._observation(self._last_frames), info

    def step(self, action: Any):
        if self._state is None:
            raise RuntimeError("step() called before reset(): call env.reset() first")
        keyboard, mouse = self.layout.to_arrays(action)
        started = time.perf_counter()
        keyboard_t = torch.from_numpy(keyboard)[None]
        mouse_t = torch.from_numpy(mouse)[None] if mouse is not None else None
        if self.observation_mode == "latent":  # no decoding: the latents are the observation
            latents, frames = self.world.step_latents(self._state, keyboard_t, mouse_t), None
            observed = to_host(latents[0].float()).numpy()
            shown = video_frames_in_block(self._steps == 0, latents.shape[2])
        else:
            latents, frames_t = self.world.generate(self._state, keyboard_t, mouse_t, self._decoded_last)
            frames = frames_t.numpy()
            observed, shown = frames[0], video_frames_in_block(self._steps == 0, latents.shape[2])
        elapsed = time.perf_counter() - started
        self._steps += 1
        outcome = StepOutcome(
            frames=frames,
            latents=latents,
            keyboard=keyboard[None],
            mouse=None if mouse is None else mouse[None],
            step_index=np.array([self._steps]),
        )
        reward = float(np.asarray(self.reward_fn(outcome))[0])
        terminated = bool(np.asarray(self.termination_fn(outcome))[0])
        truncated = self.max_episode_steps is not None and self._steps >= self.max_episode_steps
        self._last_frames = observed
        self.last_timing = {"generate_s": elapsed, "fps": shown / elapsed}
        info = {"frame_index": self._state.video_frame - 1, "block": self._steps}
        if frames is not None and self.info_frames:
            info["frames"] = frames[0]
        if self.report_timing:
            info["timing"] = dict(self.last_timing)
        if self.render_mode == "human":
            self.render()
        return self._observation(observed), reward, terminated, truncated, info

    def render(self):
        if self._last_frames is None:
            return None
        if self.render_mode == "rgb_array":
            return self._last_frames[-1].copy()
        if self.render_mode == "human":
            from .display import FrameWindow

            if self._display is None:
                self._display = FrameWindow(title=f"matrixgame-env: {self.world.config.name}")
            self._display.show(self._last_frames, fps=self.metadata["render_fps"])
        return None

    def close(self) -> None:
        if self._display is not None:
            self._display.close()
            self._display = None
        self._state = None

    # ------------------------------------------------------------------ world state
    def snapshot(self) -> EnvSnapshot:
        """An exact copy of the episode so far; `restore` it to get the same frames again."""
        if self._state is None:
            raise RuntimeError("snapshot() needs a started episode: call reset() first")
        return EnvSnapshot(
            self._state.snapshot(), self._steps, self._last_frames.copy(), self.np_random.bit_generator.state
        )

    def restore(self, snapshot: EnvSnapshot) -> None:
        if not isinstance(snapshot, EnvSnapshot):
            raise TypeError(f"restore() takes what snapshot() returned, got {type(snapshot).__name__}")
        if self._state is None or self._state.batch_size != snapshot.world_state.batch_size:
            self._state = snapshot.world_state.snapshot()
        else:
            self._state.restore(snapshot.world_state)
        self._steps = snapshot.steps
        self._last_frames = snapshot.last_frames.copy()
        self.np_random.bit_generator.state = snapshot.np_random_state

    def imagine(self, plans: list[list[Any]] | np.ndarray, frames: bool | None = None) -> dict[str, np.ndarray]:
        """Roll K action plans of H steps out from the current state, in one batch (fork), without
        changing the env. Returns {"frames": [K, H, T, h, w, 3] uint8, "latents": [K, H, C, F, h', w']
        float32, "rewards": [K, H]}; T is the block length (a first block of 9 frames is front-padded
        with its first frame), F the latent frames of a block.

        frames=False skips the VAE decoder: no "frames" in the result, the same latents and rewards,
        sooner. It takes reward plug-ins that read only latents and actions (`LearnedReward`,
        `ZeroReward`; see `rewards.py`). None: frames unless the env observes latents (which has
        decoded none, so its decoder cannot continue the world's video)."""
        if self._state is None:
            raise RuntimeError("imagine() needs a started episode: call reset() first")
        frames = decodes_frames(self.observation_mode, frames)
        return imagine_plans(self.world, self.layout, self._state, self.reward_fn, plans, self._steps, frames=frames)

    # ------------------------------------------------------------------ helpers
    def _observation(self, frames: np.ndarray) -> np.ndarray:
        if self.observation_mode == "last":
            return frames[-1].copy()
        if self.observation_mode == "latent":
            return frames.copy()
        return pad_block(frames, self.block_frames).copy()


@torch.no_grad()
def imagine_plans(
    world: WorldModel,
    layout: ActionLayout,
    state: WorldState,
    reward_fn: Any,
    plans: Any,
    steps_so_far: int,
    frames: bool = True,
) -> dict[str, np.ndarray]:
    """K plans rolled out from one world's state in one batch; the state itself is left unchanged.
    frames=False: latents and rewards only, without running the VAE decoder."""
    plans = list(plans)
    horizon = len(plans[0]) if plans else 0
    if not plans or horizon == 0 or any(len(p) != horizon for p in plans):
        raise ValueError("plans must be K >= 1 action sequences of the same length H >= 1")
    if state.batch_size != 1:
        raise ValueError(f"imagine starts from one world, this state holds {state.batch_size}")
    if not isinstance(frames, bool):
        raise ValueError(f"frames must be True or False, got {frames!r}")
    if not frames:
        check_frames_not_needed(reward_fn, what="imagine(frames=False)")
    batch = state.fork(len(plans))
    blocks, latent_blocks, rewards = [], [], []
    for t in range(horizon):
        arrays = [layout.to_arrays(plan[t]) for plan in plans]
        keyboard = np.stack([a[0] for a in arrays])
        mouse = np.stack([a[1] for a in arrays]) if layout.mouse else None
        keyboard_t, mouse_t = torch.from_numpy(keyboard), None if mouse is None else torch.from_numpy(mouse)
        if frames:
            latents, frames_t = world.generate(batch, keyboard_t, mouse_t)
            block = frames_t.numpy()
            blocks.append(pad_block(block, world.frames_per_block, axis=1))
        else:
            latents, block = world.step_latents(batch, keyboard_t, mouse_t), None
        outcome = StepOutcome(block, latents, keyboard, mouse, np.full(len(plans), steps_so_far + t + 1))
        rewards.append(np.asarray(reward_fn(outcome), np.float32))
        latent_blocks.append(latents.to(torch.float32, copy=True))  # a graph replay may reuse its buffer
    result = {
        "latents": to_host(torch.stack(latent_blocks, dim=1)).numpy(),
        "rewards": np.stack(rewards, axis=1),
    }
    if frames:
        result["frames"] = np.stack(blocks, axis=1)
    return result
