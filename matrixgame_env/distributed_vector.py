"""`DistributedVectorEnv`: the worlds of a vector env spread over the GPUs of a machine, one process per GPU.

Run the same script in every process (`torchrun --nproc_per_node=4 script.py`); rank 0 drives the
env, the other processes serve it::

    venv = DistributedVectorEnv("doom-small", num_envs=64)   # every process: 16 worlds on its own GPU
    if venv.is_main:
        obs, info = venv.reset(seed=0)                       # the MatrixGameVectorEnv API over all 64 worlds
        obs, rewards, terminated, truncated, info = venv.step(actions)
        venv.close()                                         # also ends serve() on the other processes
    else:
        venv.serve()

Each process runs an ordinary `MatrixGameVectorEnv` over a consecutive share of the worlds, with its
own engine on its own device. A call on rank 0 broadcasts the command and the actions (gloo: a few
bytes per world), every process steps its share, and the frames come back to rank 0 through
`torch.distributed.gather` (NCCL between GPUs). World i gets the seed it gets in a single
`MatrixGameVectorEnv` (reset(seed=s): s + i), so it streams the same frames. Autoreset, info keys,
spaces and `reset_worlds` / `imagine` behave as in `MatrixGameVectorEnv`; `world_state` is there for
the worlds of rank 0 only (a state lives on its process's GPU). An error in any process is raised
on rank 0, and the env stays usable. Without torchrun it is a plain single-process vector env.
"""

from __future__ import annotations

import atexit
import os
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from gymnasium.vector import VectorEnv
from gymnasium.vector.utils import batch_space

from . import distributed
from .env import DEFAULT_MODEL
from .vector import MatrixGameVectorEnv
from .world.model import WorldModel
from .world.state import WorldState

_RESET, _STEP, _RESET_WORLDS, _IMAGINE, _COHORTS, _CLOSE = range(1, 7)


class _FailedElsewhere(Exception):
    """A command failed in another process; rank 0 raises the error, the others wait for the next command."""


def world_shares(num_envs: int, processes: int) -> list[tuple[int, int]]:
    """Consecutive [start, stop) ranges of worlds per process, as even as possible (earlier ones get the rest)."""
    if num_envs < processes:
        raise ValueError(f"num_envs ({num_envs}) must be at least the number of processes ({processes})")
    size, rest = divmod(num_envs, processes)
    bounds = np.cumsum([0] + [size + (rank < rest) for rank in range(processes)])
    return [(int(bounds[rank]), int(bounds[rank + 1])) for rank in range(processes)]


class DistributedVectorEnv(VectorEnv):
    """`MatrixGameVectorEnv` over all processes of a torchrun launch (see the module docstring).

    `options` are those of `MatrixGameVectorEnv` (dtype, mode, observation, reward, termination,
    max_episode_steps, render_mode, ...); `device` None or "cuda" means each process's own GPU
    (LOCAL_RANK). `model` may be a `WorldModel` already on this process's device. Every process must
    build the env with the same arguments; `reward` and `termination` plug-ins run where their worlds do.
    """

    metadata = MatrixGameVectorEnv.metadata

    def __init__(
        self,
        model: str | os.PathLike | WorldModel = DEFAULT_MODEL,
        num_envs: int = 1,
        *,
        device: str | torch.device | None = None,
        **options: Any,
    ) -> None:
        if options.get("observation", "last") == "latent":
            raise ValueError(
                "DistributedVectorEnv gathers frames: observation='latent' is for MatrixGameVectorEnv and "
                "MatrixGameEnv; accepted here: 'last', 'block'"
            )
        if options.get("info_frames", True) is not True:
            raise ValueError(
                "DistributedVectorEnv gathers every frame of each block: info_frames=False is for "
                "MatrixGameVectorEnv and MatrixGameEnv"
            )
        device = distributed.init(device)
        self.rank, self.processes = distributed.rank(), distributed.world_size()
        self.shares = world_shares(num_envs, self.processes)
        self.counts = [stop - start for start, stop in self.shares]
        self.first_world = self.shares[self.rank][0]
        self.local = MatrixGameVectorEnv(model, self.counts[self.rank], device=device, **options)
        self.world, self.layout = self.local.world, self.local.layout
        self.num_envs = num_envs
        self.render_mode = self.local.render_mode
        self.observation_mode = self.local.observation_mode
        self.max_episode_steps = self.local.max_episode_steps
        self.metadata = self.local.metadata
        self.block_frames = self.local.block_frames
        self.single_observation_space = self.local.single_observation_space
        self.single_action_space = self.local.single_action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._started = False
        self._last_frames: np.ndarray | None = None  # [N, H, W, 3] on rank 0, for render()
        if self.is_main and self.processes > 1:
            atexit.register(_close_at_exit, weakref.ref(self))  # never leave the other processes waiting

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that calls reset/step; the others `serve()`."""
        return self.rank == 0

    # ------------------------------------------------------------------ gymnasium API (rank 0)
    def reset(self, *, seed: int | Sequence[int] | None = None, options: dict[str, Any] | None = None):
        self._check_main("reset")
        options = dict(options or {})
        unknown = set(options) - {"image"}
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; accepted: 'image'")
        seeds = None
        if seed is not None:
            seeds = [seed + i for i in range(self.num_envs)] if isinstance(seed, int) else [int(s) for s in seed]
            if len(seeds) != self.num_envs:
                raise ValueError(f"got {len(seeds)} seeds for {self.num_envs} worlds")
        if isinstance(options.get("image"), (list, tuple)) and len(options["image"]) != self.num_envs:
            raise ValueError(f"got {len(options['image'])} start images for {self.num_envs} worlds")
        self._send(_RESET)
        obs = self._reset_everywhere((seeds, options))
        self._started = True
        self._last_frames = (obs if self.observation_mode == "last" else obs[:, -1]).copy()  # not the caller's
        return obs, {"frame_index": np.zeros(self.num_envs, np.int64)}

    def step(self, actions: Any):
        self._check_main("step")
        if not self._started:
            raise RuntimeError("step() called before reset(): call reset() first")
        # The single-process env's own validation and conversion of all N actions (same errors).
        keyboard, mouse = MatrixGameVectorEnv._split_actions(self, actions)
        packed = keyboard if mouse is None else np.concatenate([keyboard, mouse], axis=1)
        self._send(_STEP)
        frames, numbers = self._step_everywhere(torch.from_numpy(np.ascontiguousarray(packed, np.float32)))
        self._last_frames = frames[:, -1].copy()
        obs = frames[:, -1].copy() if self.observation_mode == "last" else frames.copy()
        info = {
            "frame_index": numbers[:, 0].astype(np.int64),
            "new_frames": numbers[:, 1].astype(np.int64),
            "frames": frames,
        }
        return obs, numbers[:, 2].astype(np.float32), numbers[:, 3] > 0.5, numbers[:, 4] > 0.5, info

    def render(self):
        if self.render_mode == "rgb_array" and self._last_frames is not None:
            return self._last_frames.copy()
        return None

    def close_extras(self, **kwargs: Any) -> None:
        if self.is_main and self.processes > 1:
            self._send(_CLOSE)
        self.local.close()

    def reset_worlds(self, indices: Sequence[int]) -> np.ndarray:
        """Start new episodes in the given worlds now (same-step autoreset, as stable-baselines3
        expects); returns their first observations."""
        self._check_main("reset_worlds")
        if not self._started:
            raise RuntimeError("reset_worlds() called before reset(): call reset() first")
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_envs):
            raise ValueError(f"world indices must lie in 0..{self.num_envs - 1}, got {indices.tolist()}")
        self._send(_RESET_WORLDS)
        obs = self._reset_worlds_everywhere(indices)
        self._last_frames[indices] = obs if self.observation_mode == "last" else obs[:, -1]
        return obs

    # ------------------------------------------------------------------ planners (rank 0)
    def imagine(self, world_index: int, plans: Any) -> dict[str, np.ndarray]:
        """Roll K plans of H steps out from world `world_index`, in one batch on the GPU that holds it
        (the worlds are left unchanged). Returns {"frames": [K, H, T, h, w, 3], "rewards": [K, H]}."""
        self._check_main("imagine")
        self._check_world(world_index)
        self._send(_IMAGINE)
        return self._imagine_everywhere((int(world_index), plans))

    def world_state(self, world_index: int) -> WorldState:
        """A copy of the state of one of rank 0's worlds (a state stays on the GPU of its process)."""
        self._check_main("world_state")
        self._check_world(world_index)
        if world_index >= self.counts[0]:
            raise ValueError(
                f"world {world_index} runs in process {self._owner(world_index)}, on its own device; world_state() "
                f"reaches rank 0's worlds 0..{self.counts[0] - 1} (imagine() works for every world)"
            )
        return self.local.world_state(world_index)

    @property
    def num_cohorts(self) -> int:
        """The most separate forwards a step costs in any process (1 while all worlds started together)."""
        self._check_main("num_cohorts")
        self._send(_COHORTS)
        return self._cohorts_everywhere()

    # ------------------------------------------------------------------ the other processes
    def serve(self) -> None:
        """Run this process's share of every command of rank 0 until rank 0 closes the env (rank > 0 only)."""
        if self.is_main:
            raise RuntimeError("serve() is for the processes of rank > 0; rank 0 calls reset() and step()")
        handlers: dict[int, Callable[[], Any]] = {
            _RESET: lambda: self._reset_everywhere(None),
            _STEP: lambda: self._step_everywhere(None),
            _RESET_WORLDS: lambda: self._reset_worlds_everywhere(None),
            _IMAGINE: lambda: self._imagine_everywhere(None),
            _COHORTS: self._cohorts_everywhere,
        }
        while (command := self._receive()) != _CLOSE:
            try:
                handlers[command]()
            except _FailedElsewhere:
                continue
        self.close()

    # ------------------------------------------------------------------ commands, run by every process
    def _reset_everywhere(self, request: tuple[list[int] | None, dict[str, Any]] | None) -> np.ndarray | None:
        seeds, options = distributed.broadcast_object(request)
        start, stop = self.shares[self.rank]
        if isinstance(options.get("image"), (list, tuple)):
            options["image"] = list(options["image"][start:stop])
        own_seeds = None if seeds is None else seeds[start:stop]
        obs, _ = self._everywhere(lambda: self.local.reset(seed=own_seeds, options=options))
        return distributed.gather_rows(obs, self.counts, on_device=True)

    def _step_everywhere(self, packed: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray] | None:
        width = self.layout.keyboard_dim + (2 if self.layout.mouse else 0)
        if packed is None:
            packed = torch.empty(self.num_envs, width, dtype=torch.float32)
        start, stop = self.shares[self.rank]
        rows = distributed.broadcast_tensor(packed)[start:stop].numpy()
        _, rewards, terminated, truncated, info = self._everywhere(lambda: self.local.step(self._actions(rows)))
        columns = (info["frame_index"], info["new_frames"], rewards, terminated, truncated)
        numbers = np.stack([np.asarray(c, np.float64) for c in columns], axis=1)
        frames = distributed.gather_rows(info["frames"], self.counts, on_device=True)
        numbers = distributed.gather_rows(numbers, self.counts)
        return (frames, numbers) if self.is_main else None

    def _reset_worlds_everywhere(self, indices: np.ndarray | None) -> np.ndarray | None:
        indices = distributed.broadcast_object(indices)
        owners = np.array([self._owner(i) for i in indices], dtype=np.int64)
        own = indices[owners == self.rank] - self.first_world
        empty = np.zeros((0, *self.single_observation_space.shape), np.uint8)
        obs = self._everywhere(lambda: self.local.reset_worlds(own) if len(own) else empty)
        counts = [int((owners == rank).sum()) for rank in range(self.processes)]
        gathered = distributed.gather_rows(obs, counts, on_device=True)
        if not self.is_main:
            return None
        in_rank_order = np.argsort(owners, kind="stable")  # gathered rows come process by process
        result = np.empty_like(gathered)
        result[in_rank_order] = gathered
        return result

    def _imagine_everywhere(self, request: tuple[int, Any] | None) -> dict[str, np.ndarray] | None:
        world_index, plans = distributed.broadcast_object(request)
        owner = self._owner(world_index)
        result = self._everywhere(
            lambda: self.local.imagine(world_index - self.first_world, plans) if self.rank == owner else None
        )
        if owner == 0:
            return result if self.is_main else None
        results = distributed.gather_objects(result)
        return results[owner] if self.is_main else None

    def _cohorts_everywhere(self) -> int | None:
        counts = distributed.gather_objects(self.local.num_cohorts)
        return max(counts) if self.is_main else None

    def _everywhere(self, work: Callable[[], Any]) -> Any:
        """`work()` in this process; when it failed in any process, rank 0 raises the error (its own, or the
        first other one's) and the others raise `_FailedElsewhere`."""
        error: Exception | None = None
        try:
            result = work()
        except Exception as caught:  # reported to rank 0 below, so that no process waits forever
            error, result = caught, None
        if not distributed.any_process(error is not None):
            return result
        messages = distributed.gather_objects(None if error is None else f"{type(error).__name__}: {error}")
        if not self.is_main:
            raise _FailedElsewhere
        if error is not None:
            raise error
        rank, message = next((rank, message) for rank, message in enumerate(messages) if message)
        raise RuntimeError(f"process {rank} of the distributed env failed: {message}")

    # ------------------------------------------------------------------ helpers
    def _send(self, command: int) -> None:
        distributed.broadcast_tensor(torch.tensor([command], dtype=torch.int64))

    def _receive(self) -> int:
        return int(distributed.broadcast_tensor(torch.zeros(1, dtype=torch.int64)).item())

    def _actions(self, rows: np.ndarray) -> Any:
        """This process's actions in the env's own format, from rows of [keyboard, mouse] (exact)."""
        keyboard = rows[:, : self.layout.keyboard_dim]
        if self.layout.one_hot:
            return keyboard.argmax(axis=1)
        actions = {"keyboard": keyboard.astype(np.int8)}
        if self.layout.mouse:
            actions["mouse"] = rows[:, self.layout.keyboard_dim :]
        return actions

    def _owner(self, world_index: int) -> int:
        return next(rank for rank, (start, stop) in enumerate(self.shares) if start <= world_index < stop)

    def _check_world(self, world_index: int) -> None:
        if not 0 <= world_index < self.num_envs:
            raise ValueError(f"world_index must lie in 0..{self.num_envs - 1}, got {world_index}")

    def _check_main(self, method: str) -> None:
        if not self.is_main:
            raise RuntimeError(f"{method}() is called on rank 0; the process of rank {self.rank} runs serve()")


def _close_at_exit(reference: weakref.ref) -> None:
    venv = reference()
    if venv is not None and not venv.closed:
        venv.close()
