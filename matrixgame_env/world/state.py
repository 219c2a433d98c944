"""The world state: everything needed to continue a batch of streamed worlds, and nothing else."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..nn.action import ActionCaches
from ..nn.dit import ContextKV, LayerCaches
from ..nn.transfer import to_device
from .cache import RingKVCache
from .condition import BlockConditions, ImageLatents
from .noise import DrawnNoise


@dataclass
class WorldState:
    """Caches, frame index, action history, image condition, random streams (and the VAE decoder
    cache when frames are decoded) of B worlds.

    `snapshot()` returns an independent copy; `restore(snapshot)` puts one back (exact: the same
    actions then give the same latents again); `fork(n)` expands every world into n copies.
    """

    caches: list[LayerCaches]
    context: ContextKV
    image: ImageLatents
    keyboard_history: torch.Tensor | None  # [B, window, K]: video frames just before the next block
    mouse_history: torch.Tensor | None  # [B, window, 2]
    generators: list[torch.Generator]
    frame: int = 0  # latent frames generated so far (= first latent frame of the next block)
    decoder_cache: Any = None  # the VAE decoder's streaming cache, when frames are decoded
    # Per world: latent frames it generated before `frame` counts from (worlds moved back in time
    # by `merge_states`, to step together with younger ones); None: 0 for every world.
    frame_shift: list[int] | None = None
    # The next block's noise, drawn ahead from `generators` (CUDA; see `world.noise`); internal.
    drawn_noise: DrawnNoise | None = field(default=None, repr=False, compare=False)
    # The next block's conditions, built ahead with the noise (`BlockConditions`); internal.
    prepared_conditions: BlockConditions | None = field(default=None, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return len(self.generators)

    @property
    def device(self) -> torch.device:
        return self.image.latents.device

    @property
    def video_frame(self) -> int:
        """Video frames generated so far."""
        return 0 if self.frame == 0 else 1 + 4 * (self.frame - 1)

    def world_frames(self) -> list[int]:
        """Latent frames each world has generated (`frame`, plus the world's `frame_shift`)."""
        return [self.frame + shift for shift in (self.frame_shift or [0] * self.batch_size)]

    def world_video_frames(self) -> list[int]:
        """Video frames each world has generated."""
        return [0 if f == 0 else 1 + 4 * (f - 1) for f in self.world_frames()]

    @property
    def nbytes(self) -> int:
        """Bytes held by the attention caches (the part that scales with model and batch size)."""
        total = 0
        for layer in self.caches:
            total += layer.self_attn.nbytes
            if layer.action is not None:
                total += sum(c.nbytes for c in (layer.action.mouse, layer.action.keyboard) if c is not None)
        return total

    def settle_noise(self) -> None:
        """Hand back noise drawn ahead for the next block: the generators return to where they were
        before it, so that whatever reads them next sees the streams as the blocks so far left them."""
        if self.drawn_noise is not None:
            self.drawn_noise.settle()
            self.drawn_noise = None

    def snapshot(self) -> WorldState:
        self.settle_noise()
        return WorldState(
            caches=[_map_layer(layer, RingKVCache.clone) for layer in self.caches],
            context=self.context,  # never modified after start
            image=self.image,  # never modified after start
            keyboard_history=_clone(self.keyboard_history),
            mouse_history=_clone(self.mouse_history),
            generators=[_clone_generator(g) for g in self.generators],
            frame=self.frame,
            decoder_cache=None if self.decoder_cache is None else self.decoder_cache.clone(),
            frame_shift=_copy_list(self.frame_shift),
        )

    def restore(self, snapshot: WorldState) -> None:
        """Make this state equal to `snapshot` again (in place: no reallocation of caches)."""
        if snapshot.batch_size != self.batch_size or len(snapshot.caches) != len(self.caches):
            raise ValueError(
                f"snapshot has {snapshot.batch_size} worlds and {len(snapshot.caches)} layers; "
                f"this state has {self.batch_size} and {len(self.caches)}"
            )
        self.settle_noise()
        for mine, theirs in zip(self.caches, snapshot.caches):
            mine.self_attn.copy_from(theirs.self_attn)
            if mine.action is not None:
                for a, b in ((mine.action.mouse, theirs.action.mouse), (mine.action.keyboard, theirs.action.keyboard)):
                    if a is not None:
                        a.copy_from(b)
        self.context = snapshot.context
        self.image = snapshot.image
        self.keyboard_history = _clone(snapshot.keyboard_history)
        self.mouse_history = _clone(snapshot.mouse_history)
        for g, s in zip(self.generators, snapshot.generators):
            g.set_state(s.get_state())
        self.frame = snapshot.frame
        self.frame_shift = _copy_list(snapshot.frame_shift)
        self.decoder_cache = None if snapshot.decoder_cache is None else snapshot.decoder_cache.clone()

    def select(self, indices: torch.Tensor | list[int]) -> WorldState:
        """A new state made of the given worlds (in that order; repeats allowed)."""
        indices = torch.as_tensor(indices, dtype=torch.long).cpu()  # checked on the host: no device sync
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.batch_size):
            raise ValueError(f"world indices must lie in 0..{self.batch_size - 1}, got {indices.tolist()}")
        on_device = to_device(indices, self.device)  # one upload for every tensor of the state
        self.settle_noise()
        return WorldState(
            caches=[_map_layer(layer, lambda c: c.select(on_device)) for layer in self.caches],
            context=self.context.select(on_device),
            image=self.image.select(on_device),
            keyboard_history=None if self.keyboard_history is None else self.keyboard_history[on_device],
            mouse_history=None if self.mouse_history is None else self.mouse_history[on_device],
            generators=[_clone_generator(self.generators[i]) for i in indices.tolist()],
            frame=self.frame,
            decoder_cache=None if self.decoder_cache is None else self.decoder_cache.select(indices),
            frame_shift=None if self.frame_shift is None else [self.frame_shift[i] for i in indices.tolist()],
        )

    def fork(self, n: int) -> WorldState:
        """Batch expansion for planners: world b becomes worlds b*n .. b*n + n-1, each an exact copy
        (same caches and same random stream, so equal actions give equal futures)."""
        if n < 1:
            raise ValueError(f"fork needs n >= 1, got {n}")
        return self.select(torch.arange(self.batch_size).repeat_interleave(n))


def _map_layer(layer: LayerCaches, fn) -> LayerCaches:
    action = None
    if layer.action is not None:
        action = ActionCaches(
            fn(layer.action.mouse) if layer.action.mouse is not None else None,
            fn(layer.action.keyboard) if layer.action.keyboard is not None else None,
        )
    return LayerCaches(fn(layer.self_attn), action)


def _copy_list(values: list[int] | None) -> list[int] | None:
    return None if values is None else list(values)


def _clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clone()


def _clone_generator(g: torch.Generator) -> torch.Generator:
    copy = torch.Generator(device=g.device)
    copy.set_state(g.get_state())
    return copy
