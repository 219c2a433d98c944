"""`MatrixGameVectorEnv`: N dreamed worlds stepped together, one forward per step.

Worlds that started together share one batched `WorldState` (a cohort) and are generated in one
DiT forward per step. A world that resets leaves its cohort and starts a new one with the other
worlds resetting at the same step, because a fresh world's first block differs from later ones
(9 video frames, the image-frame mask, empty caches). Where the sampler replays CUDA graphs, the
worlds' old rows stay in their cohort's state, computed and ignored, and once the new cohort's caches
are full (two steps with the released window) it is written back into them in place (`absorb`: the
older of the two states is moved back to the younger one's frame index, which changes only the
rounding of its cached keys), so the big state keeps its tensors and graphs. Elsewhere (CPUs), and
for cohorts with no such rows to go back to, cohorts shrink at once and rejoin as one new state
(`merge_states`). Worlds whose episodes end at different times thus cost one forward per
step, plus one for each cohort of the last two steps' resets. A state written back is kept
(`StatePool`) and a later cohort of as many new worlds restarts in it, so that on the GPU the young
cohorts' blocks replay CUDA graphs too, once each state has run them once. With `pad_new_cohorts`
n, a cohort of fewer than n new worlds runs in a state of exactly n rows (the others computed and
ignored): new cohorts then share one size, so a kept state always fits and no new state pays eager
blocks and captures.
Autoreset follows Gymnasium's next-step mode: the step after an episode ends returns the new
episode's first observation, with reward 0 and the action ignored.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from .env import (
    DEFAULT_MODEL,
    check_latent_observation,
    decoded_last_frames,
    decodes_frames,
    imagine_plans,
    observation_space_for,
    pad_block,
    picture_as_uint8,
    resolve_world,
    start_latents,
    start_picture,
    video_frames_in_block,
)
from .images import ImageLike
from .nn.transfer import to_device
from .rewards import NeverTerminate, StepOutcome, ZeroReward, bind_all
from .spaces import layout_for
from .world.merge import absorb, can_merge, merge_states
from .world.model import WorldModel, copied_event, enable_fast_path, queue_to_host
from .world.state import WorldState
from .world.state_pool import StatePool


@dataclass
class _Cohort:
    """Worlds generated in one forward: row j of `state` is world `worlds[j]` while `live[j]`. A row
    whose world restarted stays in the state (stale, computed and ignored) until the world's new
    cohort is written back into it (`absorb`), so the state keeps its tensors and CUDA graphs."""

    worlds: np.ndarray
    live: np.ndarray
    state: WorldState

    @classmethod
    def of(cls, worlds: np.ndarray, state: WorldState) -> _Cohort:
        return cls(np.asarray(worlds), np.ones(len(worlds), bool), state)

    @property
    def live_rows(self) -> np.ndarray:
        return np.flatnonzero(self.live)

    @property
    def live_worlds(self) -> np.ndarray:
        return self.worlds[self.live]

    def compacted(self) -> _Cohort:
        """The cohort without its stale rows (a new state when it had any)."""
        if self.live.all():
            return self
        rows = self.live_rows
        return _Cohort.of(self.worlds[rows], self.state.select(rows.tolist()))


class MatrixGameVectorEnv(VectorEnv):
    """N worlds of one world model (see the module docstring).

    reset(seed=s) seeds world i with s + i, so world i matches `MatrixGameEnv.reset(seed=s + i)`;
    options={"image": picture or list of N pictures}. fast: as for `MatrixGameEnv` (CUDA graphs on a
    GPU by default; "compile" adds fused kernels); action_guidance, keyboard_guidance: as for
    `MatrixGameEnv`. observation: "last" (frame), "block" (frames) or "latent" (the block's latents,
    no decoding; see `MatrixGameEnv`). merge_cohorts: join cohorts of worlds that reset at different
    times once their caches are full (see the module docstring); False keeps each reset's cohort
    apart for good.
    pad_new_cohorts: where stale rows are kept (`keeps_stale_rows`), a cohort of fewer new worlds
    runs in a state of exactly this many rows; 0 (the default) or 1: as many rows as worlds. Padding
    to 8 at 64 worlds (episodes of 20 steps: ~3 restarts a step) left no CUDA-graph capture and one
    new state in 100 timed steps, against 9 and 3, but ran 0.95x and 0.97x the steps/s on an H200
    (benchmarks/NOTES.md): the padded rows cost more than the captures they save.
    young_cohort_stream: on a GPU, the cohorts of fewer than `num_envs` rows (worlds that reset in the
    last two steps) run on a second CUDA stream, beside the whole batch's cohort, so that their small
    kernels can fill what the big cohort leaves of the GPU; the same kernels on the same inputs (each
    stream replays CUDA graphs of its own). No effect on CPUs. Off by default: at 64 worlds on an
    H200 it ran 1.16x and 1.00x the steps/s in two runs, within the spread of the settings' order.
    info_frames: False leaves `info["frames"]` out; with observation "last" only each block's last
    frame is then decoded and copied to the host (see `MatrixGameEnv`).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 25, "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        model: str | os.PathLike | WorldModel = DEFAULT_MODEL,
        num_envs: int = 1,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        mode: str | None = None,
        observation: str = "last",
        reward: Any = None,
        termination: Any = None,
        max_episode_steps: int | None = None,
        render_mode: str | None = None,
        fast: bool | str = True,
        action_guidance: float | None = None,
        keyboard_guidance: float | None = None,
        merge_cohorts: bool = True,
        pad_new_cohorts: int = 0,
        young_cohort_stream: bool = False,
        info_frames: bool = True,
    ) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if not isinstance(young_cohort_stream, bool):
            raise ValueError(f"young_cohort_stream must be True or False, got {young_cohort_stream!r}")
        if isinstance(pad_new_cohorts, bool) or not isinstance(pad_new_cohorts, int) or pad_new_cohorts < 0:
            raise ValueError(f"pad_new_cohorts must be an integer >= 0, got {pad_new_cohorts!r}")
        self.world = resolve_world(model, device, dtype, mode)
        enable_fast_path(self.world, fast, batch=num_envs)
        # States of cohorts that rejoined (and of every cohort at a full reset) start later cohorts of
        # as many worlds again, in place: their tensors, and the CUDA graphs captured on them, stay.
        # Idle states hold at most num_envs worlds' caches together (memory at most doubles).
        self._state_pool = StatePool(max_worlds=num_envs)
        if merge_cohorts:
            for graphs in (self.world.sampler.graphs, self.world.decoder_graphs):
                if graphs is not None:
                    # A cohort of new worlds lives two blocks before it rejoins: capturing it pays only
                    # once its state is restarted, from the second life on.
                    graphs.capture_after = max(graphs.capture_after, 1)
                    # Room for the big cohort's graphs (up to 3) and 2 for each other live state.
                    graphs.max_graphs = max(graphs.max_graphs, 3 + 2 * (self._state_pool.capacity + 2))
        if action_guidance is not None:
            self.world.sampler.set_action_guidance(action_guidance)
        if keyboard_guidance is not None:
            self.world.sampler.set_keyboard_guidance(keyboard_guidance)
        config = self.world.config
        self.layout = layout_for(config.mode, config.actions)
        self.num_envs = num_envs
        self.render_mode = render_mode
        self.observation_mode = observation
        self.max_episode_steps = max_episode_steps
        self.merge_cohorts = merge_cohorts
        self.prefer_in_place: bool | None = None  # None: keep stale rows where CUDA graphs replay
        self.overlap_cohorts = True  # False: wait for each cohort's frames before the next one's work
        self.pad_new_cohorts = pad_new_cohorts
        self.young_cohort_stream = young_cohort_stream
        self._side_stream: torch.cuda.Stream | None = None  # made on first use (young_cohort_stream)
        self.metadata = dict(self.metadata, render_fps=config.fps)
        self.block_frames = self.world.frames_per_block
        self.single_observation_space = observation_space_for(self.world, observation)
        self.single_action_space = self.layout.action_space()
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.reward_fn = reward if reward is not None else ZeroReward()
        self.termination_fn = termination if termination is not None else NeverTerminate()
        check_latent_observation(observation, render_mode, self.reward_fn, self.termination_fn)
        self.info_frames = info_frames
        self._decoded_last = decoded_last_frames(
            observation, info_frames, render_mode, self.reward_fn, self.termination_fn
        )
        bind_all(self.world, self.reward_fn, self.termination_fn)
        self._rngs = [seeding.np_random(None)[0] for _ in range(num_envs)]
        self._cohorts: list[_Cohort] = []
        self._steps = np.zeros(num_envs, np.int64)
        self._needs_reset = np.zeros(num_envs, bool)
        # Each world's last block of frames (its start picture after a reset), or with observation
        # "latent" its last block of latents (its start picture's latent frame, repeated).
        self._last_frames: list[np.ndarray | None] = [None] * num_envs
        self._images: list[ImageLike | None] = [None] * num_envs

    # ------------------------------------------------------------------ gymnasium API
    def reset(self, *, seed: int | Sequence[int] | None = None, options: dict[str, Any] | None = None):
        options = dict(options or {})
        unknown = set(options) - {"image"}
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; accepted: 'image'")
        if seed is not None:
            seeds = [seed + i for i in range(self.num_envs)] if isinstance(seed, int) else list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"got {len(seeds)} seeds for {self.num_envs} worlds")
            self._rngs = [seeding.np_random(s)[0] for s in seeds]
        if "image" in options:
            images = options["image"]
            if isinstance(images, (list, tuple)):
                if len(images) != self.num_envs:
                    raise ValueError(f"got {len(images)} start images for {self.num_envs} worlds")
                self._images = list(images)
            else:
                self._images = [images] * self.num_envs
        for cohort in self._cohorts:
            self._state_pool.give(cohort.state)
        self._cohorts = []
        self._start(np.arange(self.num_envs))
        self._needs_reset[:] = False
        frames = [self._last_frames[i] for i in range(self.num_envs)]
        info = {"frame_index": np.zeros(self.num_envs, np.int64)}
        return self._observations(frames), info

    def step(self, actions: Any):
        if not self._cohorts:
            raise RuntimeError("step() called before reset(): call reset() first")
        keyboard, mouse = self._split_actions(actions)
        resetting = np.flatnonzero(self._needs_reset)
        if len(resetting):
            self._remove(resetting)
            self._start(resetting)
        if self.merge_cohorts:
            self._merge_ready_cohorts()
        rewards = np.zeros(self.num_envs, np.float32)
        terminated = np.zeros(self.num_envs, bool)
        truncated = np.zeros(self.num_envs, bool)
        new_frames = np.zeros(self.num_envs, np.int64)
        frame_index = np.zeros(self.num_envs, np.int64)
        block = None
        latent_mode = self.observation_mode == "latent"
        for cohort, latents, host_block in self._generate_blocks(keyboard, mouse, resetting):
            state, rows, worlds = cohort.state, cohort.live_rows, cohort.live_worlds
            block = host_block.numpy()  # frames, or with observation "latent" the latents on the host
            if len(rows) < state.batch_size:  # stale rows were computed too: keep the live ones
                block, latents = block[rows], latents[to_device(torch.from_numpy(rows), latents.device)]
            self._steps[worlds] += 1
            outcome = StepOutcome(
                None if latent_mode else block,
                latents,
                keyboard[worlds],
                None if mouse is None else mouse[worlds],
                self._steps[worlds],
            )
            rewards[worlds] = np.asarray(self.reward_fn(outcome), np.float32)
            terminated[worlds] = np.asarray(self.termination_fn(outcome), bool)
            if self.max_episode_steps is not None:
                truncated[worlds] = self._steps[worlds] >= self.max_episode_steps
            for j, i in enumerate(worlds):
                self._last_frames[i] = block[j]
            if latent_mode or self._decoded_last:  # a world's first block stands for fewer video frames
                first, later = (video_frames_in_block(f, latents.shape[2]) for f in (True, False))
                new_frames[worlds] = np.where(self._steps[worlds] == 1, first, later)
            else:
                new_frames[worlds] = block.shape[1]
            frame_index[worlds] = np.asarray(state.world_video_frames())[rows] - 1
        self._needs_reset = terminated | truncated
        info = {"frame_index": frame_index, "new_frames": new_frames}
        frames = [self._last_frames[i] for i in range(self.num_envs)]
        if latent_mode:
            return self._observations(frames), rewards, terminated, truncated, info
        whole = self._whole_batch_block(block, resetting)
        if whole is None:
            observations = self._observations(frames)
            if self.info_frames:
                info["frames"] = self._padded_blocks(frames)
        else:
            observations = whole[:, -1].copy() if self.observation_mode == "last" else whole
            if self.info_frames:
                info["frames"] = whole
        return observations, rewards, terminated, truncated, info

    def _generate_blocks(
        self, keyboard: np.ndarray, mouse: np.ndarray | None, resetting: np.ndarray
    ) -> list[tuple[_Cohort, torch.Tensor, torch.Tensor]]:
        """(cohort, latents, frames on the host; with observation "latent" the latents on the host) of
        every cohort but the one this step's resets just started (its worlds show their start
        picture). All cohorts' work is queued before the one wait for their frames, so that on a GPU
        one cohort's launches overlap the previous one's kernels. Each block is decoded and copied to
        the host between its denoising steps and its caches' refresh, and the wait is for the copies
        alone: the refreshes run on while the host hands the frames out and prepares the next step."""
        pending = [cohort for cohort in self._cohorts if not np.isin(cohort.live_worlds, resetting).any()]
        side = self._young_stream()
        beside = [side is not None and cohort.state.batch_size < self.num_envs for cohort in pending]
        main = torch.cuda.current_stream(self.world.device) if any(beside) else None
        if main is not None:
            side.wait_stream(main)  # the starts and joins queued so far
        generated, queued, copies = [], [], {}
        # The whole batch's cohort first, so that its work is queued before the young cohorts'.
        for cohort, aside in sorted(zip(pending, beside), key=lambda pair: pair[1]):

            def to_host(latents: torch.Tensor, state: WorldState = cohort.state) -> None:
                queued.append(self._queue_to_host(state, latents))
                event = copied_event(self.world.device)
                if event is not None:  # the last copy queued on each stream
                    copies[torch.cuda.current_stream(self.world.device)] = event

            with torch.cuda.stream(side) if aside else contextlib.nullcontext():
                latents = self.world.step_latents(
                    cohort.state, *self._cohort_actions(cohort, keyboard, mouse), before_refresh=to_host
                )
            if aside:
                latents.record_stream(main)  # read on the main stream after the wait below
            generated.append((cohort, latents, queued.pop()))
            if not self.overlap_cohorts:
                self._wait_for(copies)
        self._wait_for(copies)
        return generated

    def _queue_to_host(self, state: WorldState, latents: torch.Tensor) -> torch.Tensor:
        """Queue a block's observations' copy to the host: its frames (decoded), or with observation
        "latent" the latents themselves."""
        if self.observation_mode == "latent":
            return queue_to_host(latents.float())
        return queue_to_host(self.world.decode_on_device(state, latents, self._decoded_last))

    def _young_stream(self) -> torch.cuda.Stream | None:
        """The second stream of the young cohorts (`young_cohort_stream`), or None."""
        if not self.young_cohort_stream or self.world.device.type != "cuda":
            return None
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device=self.world.device)
        return self._side_stream

    def _wait_for(self, copies: dict[torch.cuda.Stream, torch.cuda.Event]) -> None:
        """Wait until the copies to the host queued on each stream are done (one wait per stream, not
        for the work queued after them). The main stream is also ordered after the young cohorts'
        stream (no host wait), so that the next step's starts and joins come after everything there."""
        if self._side_stream is not None:
            torch.cuda.current_stream(self.world.device).wait_stream(self._side_stream)
        for event in copies.values():
            event.synchronize()

    def _whole_batch_block(self, block: np.ndarray | None, resetting: np.ndarray) -> np.ndarray | None:
        """The last cohort's block [N, T, H, W, 3] when it already is every world's full block in order
        (one cohort of all worlds, no resets; with `info_frames` False its last frame), so that it need
        not be copied again; else None."""
        decoded = self._decoded_last or self.block_frames
        if block is None or len(self._cohorts) != 1 or len(resetting) or block.shape[1] != decoded:
            return None
        cohort = self._cohorts[0]
        return block if cohort.live.all() and np.array_equal(cohort.worlds, np.arange(self.num_envs)) else None

    def render(self):
        if self.render_mode == "rgb_array" and self._last_frames[0] is not None:
            return np.stack([f[-1] for f in self._last_frames])
        return None

    def close_extras(self, **kwargs: Any) -> None:
        self._cohorts = []
        self._state_pool.clear()

    def reset_worlds(self, indices: Sequence[int]) -> np.ndarray:
        """Start new episodes in the given worlds now (same-step autoreset, as stable-baselines3
        expects); returns their first observations."""
        indices = np.asarray(indices, dtype=np.int64)
        self._remove(indices)
        self._start(indices)
        self._needs_reset[indices] = False
        return self._observations([self._last_frames[i] for i in indices])

    # ------------------------------------------------------------------ planners
    def imagine(self, world_index: int, plans: Any, frames: bool | None = None) -> dict[str, np.ndarray]:
        """Roll K plans of H steps out from world `world_index` in one batch (the worlds are left
        unchanged). Returns {"frames": [K, H, T, h, w, 3], "latents": [K, H, C, F, h', w'],
        "rewards": [K, H]}; frames=False skips the VAE decoder (see `MatrixGameEnv.imagine`)."""
        frames = decodes_frames(self.observation_mode, frames)
        state = self.world_state(world_index)
        steps = int(self._steps[world_index])
        return imagine_plans(self.world, self.layout, state, self.reward_fn, plans, steps, frames=frames)

    def world_state(self, world_index: int) -> WorldState:
        """A copy of one world's state (for planners and debugging)."""
        if not 0 <= world_index < self.num_envs:
            raise ValueError(f"world_index must lie in 0..{self.num_envs - 1}, got {world_index}")
        for cohort in self._cohorts:
            position = np.flatnonzero((cohort.worlds == world_index) & cohort.live)
            if len(position):
                return cohort.state.select([int(position[0])])
        raise RuntimeError("call reset() first")

    @property
    def num_cohorts(self) -> int:
        """How many separate forwards a step costs (1 while all worlds started together)."""
        return len(self._cohorts)

    # ------------------------------------------------------------------ helpers
    def _start(self, indices: np.ndarray) -> None:
        pictures, seeds = [], []
        for i in indices:
            picture = start_picture(self.world, self._images[i], self._rngs[i])
            seeds.append(int(self._rngs[i].integers(2**62)))
            pictures.append(picture)
            if self.observation_mode != "latent":  # else the start latents, below
                self._last_frames[i] = picture_as_uint8(picture, self.world.video_size)[None]
        rows = self._cohort_rows(len(indices))
        filler = rows - len(indices)  # rows computed and ignored: the first world's start again, seed 0
        state = self.world.start(
            pictures + pictures[:1] * filler,
            seed=seeds + [0] * filler,
            into=self._state_pool.take(rows),
            decoded=self.observation_mode != "latent",
        )
        if self.observation_mode == "latent":
            latents = start_latents(state, self.world.sampler.config.frames_per_block)
            for j, i in enumerate(indices):
                self._last_frames[i] = latents[j]
        worlds = np.concatenate([indices, np.full(filler, -1, np.int64)])
        self._cohorts.append(_Cohort(worlds, np.arange(rows) < len(indices), state))
        self._steps[indices] = 0

    def _cohort_rows(self, new_worlds: int) -> int:
        """Rows of the state that starts `new_worlds` worlds (see `pad_new_cohorts`)."""
        padded = self.keeps_stale_rows and new_worlds < self.pad_new_cohorts
        return self.pad_new_cohorts if padded else new_worlds

    def _merge_ready_cohorts(self) -> None:
        """Join the cohorts whose caches are full: into the largest one's stale rows of the same worlds
        in place (it keeps its tensors and CUDA graphs), else into one new state, worlds in order."""
        if len(self._cohorts) < 2:  # the usual step: nothing to join
            return
        ready = [cohort for cohort in self._cohorts if can_merge(cohort.state)]
        if len(ready) < 2:
            return
        host = max(ready, key=lambda cohort: cohort.state.batch_size)
        model = self.world.sampler.model
        joined: list[_Cohort] = []
        for guest in ready:
            if guest is host:
                continue
            rows = [self._stale_row(host, world) for world in guest.live_worlds]
            if all(row is not None for row in rows):
                absorb(model, host.state, rows, guest.compacted().state)
                host.live[rows] = True
                self._state_pool.give(guest.state)  # the host copied what it needed
            else:
                joined.append(guest)
        if joined:
            parts = [cohort.compacted() for cohort in (host, *joined)]
            worlds = np.concatenate([cohort.worlds for cohort in parts])
            state = merge_states(model, [cohort.state for cohort in parts])
            order = np.argsort(worlds, kind="stable")
            if not np.array_equal(order, np.arange(len(order))):
                state, worlds = state.select(order.tolist()), worlds[order]
            host = _Cohort.of(worlds, state)
        young = [cohort for cohort in self._cohorts if not can_merge(cohort.state)]
        waiting = np.concatenate([cohort.live_worlds for cohort in young]) if young else np.array([], np.int64)
        if not np.isin(host.worlds[~host.live], waiting).all():
            host = host.compacted()  # stale rows no young cohort will take back
        self._cohorts = [host, *young]

    @staticmethod
    def _stale_row(cohort: _Cohort, world: int) -> int | None:
        rows = np.flatnonzero((cohort.worlds == world) & ~cohort.live)
        return int(rows[0]) if len(rows) else None

    @property
    def keeps_stale_rows(self) -> bool:
        """Whether restarted worlds' rows stay in their cohort's state until their new cohort comes back
        (`absorb`): where the sampler replays CUDA graphs, which keeping the state's tensors preserves;
        elsewhere the rows would only cost compute, so cohorts shrink and rejoin as new states. Set
        `prefer_in_place` to choose."""
        if self.prefer_in_place is not None:
            return self.merge_cohorts and self.prefer_in_place
        return self.merge_cohorts and self.world.sampler.graphs is not None

    def _remove(self, worlds: np.ndarray) -> None:
        """Take `worlds` out of their cohorts: their rows go stale (`keeps_stale_rows`: the state stays
        as it is, for the worlds' new cohorts to come back to), or the cohorts shrink to the others.
        A cohort left without worlds gives its state to the pool (all worlds ending together restart
        in it)."""
        kept = []
        for cohort in self._cohorts:
            leaving = np.isin(cohort.worlds, worlds) & cohort.live
            if leaving.any():
                cohort = _Cohort(cohort.worlds, cohort.live & ~leaving, cohort.state)
            if cohort.live.any():
                kept.append(cohort if self.keeps_stale_rows else cohort.compacted())
            else:
                self._state_pool.give(cohort.state)
        self._cohorts = kept

    def _cohort_actions(
        self, cohort: _Cohort, keyboard: np.ndarray, mouse: np.ndarray | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The actions of a cohort's rows (no keys and no mouse motion for stale rows)."""
        if cohort.live.all():
            k = keyboard[cohort.worlds]
            m = None if mouse is None else mouse[cohort.worlds]
        else:
            rows, worlds = cohort.live_rows, cohort.live_worlds
            k = np.zeros((len(cohort.worlds), keyboard.shape[1]), keyboard.dtype)
            k[rows] = keyboard[worlds]
            m = None
            if mouse is not None:
                m = np.zeros((len(cohort.worlds), mouse.shape[1]), mouse.dtype)
                m[rows] = mouse[worlds]
        return torch.from_numpy(k), None if m is None else torch.from_numpy(m)

    def _split_actions(self, actions: Any) -> tuple[np.ndarray, np.ndarray | None]:
        if self.layout.one_hot:
            actions = np.asarray(actions)
            if actions.shape != (self.num_envs,):
                raise ValueError(f"actions must be {self.num_envs} integers, got shape {actions.shape}")
        elif not isinstance(actions, dict):
            raise ValueError(f"actions must be a dict of batched arrays, got {type(actions).__name__}")
        else:
            for key, value in actions.items():
                if np.shape(value)[:1] != (self.num_envs,):
                    raise ValueError(f"actions[{key!r}] must have {self.num_envs} rows, got shape {np.shape(value)}")
        whole = self.layout.batch_to_arrays(actions, self.num_envs)
        if whole is not None:
            return whole
        # Some world's action is outside the space: checked world by world, to say which and why.
        per_world = []
        for i in range(self.num_envs):
            single = actions[i] if self.layout.one_hot else {key: np.asarray(v)[i] for key, v in actions.items()}
            try:
                per_world.append(self.layout.to_arrays(single))
            except ValueError as error:
                raise ValueError(f"world {i}: {error}") from None
        keyboard = np.stack([p[0] for p in per_world]).astype(np.float32)
        mouse = np.stack([p[1] for p in per_world]).astype(np.float32) if self.layout.mouse else None
        return keyboard, mouse

    def _padded_blocks(self, frames: list[np.ndarray]) -> np.ndarray:
        return np.stack([pad_block(f, self.block_frames) for f in frames])

    def _observations(self, frames: list[np.ndarray]) -> np.ndarray:
        if self.observation_mode == "last":
            return np.stack([f[-1] for f in frames])
        if self.observation_mode == "latent":
            return np.stack(frames)
        return self._padded_blocks(frames)
