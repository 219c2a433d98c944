"""CUDA-graph replay of the sampler's steady-state blocks (and of restarted states' young blocks).

Once the ring caches are full, every block runs the same kernels on tensors of the same shapes
and addresses; only the slots it writes in the ring (one pattern per position of the block in the
window) differ. So each (world state, ring phase) is captured once and then replayed: the inputs
(noise, conditions, action windows, RoPE tables) are copied into static buffers, the graph runs,
and the output is copied out. The kernels are the eager path's own, so the results are the same.
A state restarted in place (`StreamingSampler.restart`) runs its first blocks on the same tensors,
shapes and cache bookkeeping as before, so those are captured and replayed too.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..nn.dit import FrameRotations, LayerCaches
from .cache import RingKVCache

if TYPE_CHECKING:
    from .sampler import StreamingSampler
    from .state import WorldState


@dataclass
class BlockInputs:
    """Everything one block's device work reads besides the state: noise and conditions."""

    noise: torch.Tensor  # [B, C, f, h, w]
    renoise: list[torch.Tensor]  # one [B, C, f, h, w] per step after the first
    cond: torch.Tensor  # [B, mask + image channels, f, h, w]
    keyboard_windows: torch.Tensor | None
    mouse_windows: torch.Tensor | None
    rotations: FrameRotations

    def tensors(self) -> list[torch.Tensor]:
        rot = self.rotations
        items = [
            self.noise,
            *self.renoise,
            self.cond,
            self.keyboard_windows,
            self.mouse_windows,
            rot.dit.cos,
            rot.dit.sin,
        ]
        if rot.action is not None:
            items += [rot.action.cos, rot.action.sin]
        return [t for t in items if t is not None]

    def clone(self) -> BlockInputs:
        def copy(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.clone()

        return BlockInputs(
            self.noise.clone(),
            [e.clone() for e in self.renoise],
            self.cond.clone(),
            copy(self.keyboard_windows),
            copy(self.mouse_windows),
            self.rotations.clone(),
        )

    def copy_(self, other: BlockInputs) -> None:
        for mine, theirs in zip(self.tensors(), other.tensors(), strict=True):
            mine.copy_(theirs, non_blocking=True)


def ring_caches(state: WorldState) -> list[RingKVCache]:
    """Every ring cache of a state (self-attention and action caches of all layers)."""
    return layer_ring_caches(state.caches)


def layer_ring_caches(layers: list[LayerCaches]) -> list[RingKVCache]:
    """Every ring cache of a list of layers' caches, in `ring_caches` order."""
    caches = []
    for layer in layers:
        caches.append(layer.self_attn)
        if layer.action is not None:
            caches += [c for c in (layer.action.mouse, layer.action.keyboard) if c is not None]
    return caches


class StreamPools:
    """CUDA-graph memory pools, one per stream that replays graphs. Graphs captured into one pool reuse
    each other's intermediate memory, so they must never run at the same time: graphs replayed on
    different streams (a vector env's young cohorts beside its big one) take pools of their own, and a
    graph replays only on the stream it was captured for (`current_stream` is part of its binding)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pools: dict[int, tuple] = {}

    def current_stream(self) -> int:
        """The handle of the stream that replays now."""
        return torch.cuda.current_stream(self.device).cuda_stream

    def current(self) -> tuple:
        """The pool of the current stream."""
        stream = self.current_stream()
        if stream not in self._pools:
            self._pools[stream] = torch.cuda.graph_pool_handle()
        return self._pools[stream]


class _CapturedBlock:
    """A block as two graphs that replay one after the other: its denoising steps (writing `output`)
    and its caches' refresh (reading it), so that other work can be queued between them."""

    def __init__(
        self,
        steps: torch.cuda.CUDAGraph,
        refresh: torch.cuda.CUDAGraph,
        inputs: BlockInputs,
        output: torch.Tensor,
        binding: tuple,
    ) -> None:
        self.steps, self.refresh, self.inputs, self.output, self.binding = steps, refresh, inputs, output, binding


class BlockGraphs:
    """Captured blocks of one sampler, at most `max_graphs` at a time: steady-state blocks (one per
    world state and ring phase: two per state with doom-small's and the official window) and the
    young blocks of states restarted in place (the blocks before one fills the window: the first
    block with those windows).

    The graphs of a state are dropped when the state is gone. While all `max_graphs` belong to live
    states, further states run eagerly rather than evict one: with more live states than graphs (a
    vector env whose worlds reset at different times runs one state per cohort), evicting would
    re-capture on every block, which costs more than the eager pass it saves. With `capture_after` n,
    a (state, ring phase) runs n steady blocks eagerly before it is captured, so that states which
    live only a block or two (a vector env's cohorts of new worlds before they rejoin) cost no capture.
    A young block is captured the second time the same state runs it at the earliest (after
    `StreamingSampler.restart` or a restore), so one-off states never pay for it; a vector env
    restarts the states of its cohorts of new worlds (`StatePool`), whose first blocks then replay.
    """

    def __init__(self, sampler: StreamingSampler, max_graphs: int = 4) -> None:
        self.sampler = sampler
        self.max_graphs = max_graphs
        self.pools = StreamPools(sampler.model.device)
        self.stream = torch.cuda.Stream(device=sampler.model.device)  # where captures are recorded
        self.graphs: dict[tuple, _CapturedBlock] = {}
        self._states: dict[int, weakref.ref] = {}
        self.captures = 0
        self.replays = 0
        self.eager_blocks = 0  # blocks left eager because every graph was in use
        self.capture_after = 0
        self._sightings: dict[tuple, tuple[weakref.ref, int]] = {}  # eager blocks per key so far

    def eligible(self, state: WorldState) -> bool:
        """True once this block fills the window: from then on every block has the same shapes
        (a steady block; the blocks before are young)."""
        return state.frame + self.sampler.config.frames_per_block >= self.sampler.window_frames

    def _key(self, state: WorldState) -> tuple:
        """(state, ring phase) for steady blocks, (state, "young", frame) before the window is full."""
        if not self.eligible(state):
            return (id(state), "young", state.frame)
        first = state.caches[0].self_attn
        phase = first.slot(state.frame)
        return (id(state), phase)

    def _binding(self, state: WorldState) -> tuple:
        """The addresses a captured graph reads and writes, and the stream it replays on: it may only
        replay on the same ones."""
        tensors = [c.key for c in ring_caches(state)] + [c.value for c in ring_caches(state)]
        tensors += list(state.context.keys) + list(state.context.values)
        return (self.pools.current_stream(), *(t.data_ptr() for t in tensors))

    def run(
        self, state: WorldState, inputs: BlockInputs, before_refresh: Callable[[torch.Tensor], None] | None = None
    ) -> torch.Tensor:
        """x0 of the block, from a replay (or from the eager pass that precedes a capture, or that
        runs where no graph may be captured); `before_refresh(x0)` runs between the denoising steps
        and the caches' refresh (after both in the block that is captured)."""
        key = self._key(state)
        self._drop_dead()
        ref = self._states.get(id(state))
        if ref is not None and ref() is not state:  # a new state at a recycled id: forget the old graphs
            self._drop(id(state))
        captured = self.graphs.get(key)
        if captured is not None and captured.binding != self._binding(state):
            del self.graphs[key]
            captured = None
        if captured is None:
            threshold = max(self.capture_after, 1) if len(key) == 3 else self.capture_after  # young: see above
            if sighting_count(self._sightings, key, state) <= threshold:
                return self.sampler.denoise_block(state, inputs, before_refresh)
            if len(self.graphs) >= self.max_graphs:
                self.eager_blocks += 1
                return self.sampler.denoise_block(state, inputs, before_refresh)
            result = self._capture(state, inputs, key)
            if before_refresh is not None:
                before_refresh(result)
            return result
        start = state.frame
        captured.inputs.copy_(inputs)
        captured.steps.replay()
        x0 = captured.output.clone()  # the next block's replay rewrites the static output
        if before_refresh is not None:
            before_refresh(x0)
        captured.refresh.replay()
        self.replays += 1
        end = start + self.sampler.config.frames_per_block
        for cache in ring_caches(state):  # the Python-side bookkeeping the replay skipped
            cache.end_frame = max(cache.end_frame, end)
            cache.last_write = (start, end)
        return x0

    def _capture(self, state: WorldState, inputs: BlockInputs, key: tuple) -> torch.Tensor:
        """Run the block eagerly on the capture stream (the real result, and the warm-up), then
        capture its denoising steps and its caches' refresh as two graphs in one memory pool (they
        always replay in that order); the capture itself computes nothing, so the caches are left
        as the eager run wrote them."""
        sampler = self.sampler
        static = inputs.clone()
        current = torch.cuda.current_stream(sampler.model.device)
        pool = self.pools.current()
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            result = sampler.denoise_block(state, inputs)
        current.wait_stream(self.stream)
        bookkeeping = [(c.end_frame, c.last_write) for c in ring_caches(state)]
        steps, refresh = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(steps, pool=pool, stream=self.stream):
            output = sampler.denoise_steps(state, static)
        with torch.cuda.graph(refresh, pool=pool, stream=self.stream):
            sampler.refresh_caches(state, static, output)
        for cache, (end, last) in zip(ring_caches(state), bookkeeping):
            cache.end_frame, cache.last_write = end, last
        self.graphs[key] = _CapturedBlock(steps, refresh, static, output, self._binding(state))
        self._states[id(state)] = weakref.ref(state)
        self.captures += 1
        return result

    def _drop_dead(self) -> None:
        """Forget the graphs of states that no longer exist (their memory goes back to the pool)."""
        for state_id in [i for i, ref in self._states.items() if ref() is None]:
            self._drop(state_id)
        for key in [key for key, (ref, _) in self._sightings.items() if ref() is None]:
            del self._sightings[key]

    def _drop(self, state_id: int) -> None:
        for key in [k for k in self.graphs if k[0] == state_id]:
            del self.graphs[key]
        self._states.pop(state_id, None)

    def clear(self) -> None:
        self.graphs.clear()
        self._states.clear()
        self._sightings.clear()


def sighting_count(sightings: dict[tuple, tuple[weakref.ref, int]], key: tuple, owner: object) -> int:
    """Count one more sighting of `key` (whose first element is id(owner)) and return the count; a key
    seen before for another object at a recycled id starts again at 1."""
    ref, count = sightings.get(key, (None, 0))
    if ref is None or ref() is not owner:
        ref, count = weakref.ref(owner), 0
    sightings[key] = (ref, count + 1)
    return count + 1
