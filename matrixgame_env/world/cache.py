"""Fixed-size ring KV caches for streaming attention.

A cache holds the keys/values of the latest `capacity` frames (plus `sink` first frames that are
never evicted), laid out [*batch_dims, capacity * tokens_per_frame, heads, head_dim]. Frame f lives
in slot f (sink frames) or sink + (f - sink) mod (capacity - sink); the valid slots always form a
prefix, so attention reads one contiguous view. This keeps exactly the set of frames the official
shifting cache keeps (its `global_end`/`local_end` eviction), without copying on eviction, and
writing a block again at the same position (the denoising steps, then the clean context re-run)
overwrites its own slots. Memory is allocated once and never grows.
"""

from __future__ import annotations

import torch


class RingKVCache:
    """Keys and values of the most recent frames of one attention layer."""

    def __init__(
        self,
        batch_shape: tuple[int, ...],
        capacity: int,
        tokens_per_frame: int,
        heads: int,
        head_dim: int,
        *,
        sink: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if capacity <= sink:
            raise ValueError(f"cache capacity {capacity} frames must exceed the {sink} sink frames")
        self.capacity = capacity
        self.sink = sink
        self.tokens_per_frame = tokens_per_frame
        shape = (*batch_shape, capacity * tokens_per_frame, heads, head_dim)
        self.key = torch.zeros(shape, dtype=dtype, device=device)
        self.value = torch.zeros(shape, dtype=dtype, device=device)
        self.end_frame = 0  # absolute end of the newest frames written
        self.last_write = (0, 0)  # (start, end) of the most recent write

    @property
    def frame_axis(self) -> int:
        return self.key.dim() - 3

    def slot(self, frame: int) -> int:
        if frame < self.sink:
            return frame
        return self.sink + (frame - self.sink) % (self.capacity - self.sink)

    # Never traced by torch.compile (`StreamingSampler.compile_dit`): its Python bookkeeping (frame
    # numbers, ring slots) changes every block and would recompile the DiT each time; compiled DiT
    # passes stop here, run it eagerly and go on.
    @torch.compiler.disable
    def update(self, start_frame: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write frames [start_frame, start_frame + n) and return the valid keys/values."""
        axis = self.frame_axis
        tokens = key.shape[axis]
        if tokens % self.tokens_per_frame:
            raise ValueError(f"{tokens} tokens is not a whole number of {self.tokens_per_frame}-token frames")
        n = tokens // self.tokens_per_frame
        end = start_frame + n
        if n > self.capacity - self.sink:
            raise ValueError(f"a write of {n} frames does not fit a cache window of {self.capacity - self.sink} frames")
        if end < self.end_frame or start_frame < self.end_frame - (self.capacity - self.sink):
            raise ValueError(
                f"cannot write frames {start_frame}..{end - 1}: the cache already holds frames up to "
                f"{self.end_frame - 1} and only the newest block may be rewritten"
            )
        frame = start_frame
        while frame < end:  # at most two contiguous runs (the write may wrap around the ring)
            slot = self.slot(frame)
            run = min(end - frame, self.capacity - slot if frame >= self.sink else self.sink - slot)
            src = slice(
                (frame - start_frame) * self.tokens_per_frame, (frame - start_frame + run) * self.tokens_per_frame
            )
            dst = slice(slot * self.tokens_per_frame, (slot + run) * self.tokens_per_frame)
            self.key.narrow(axis, dst.start, dst.stop - dst.start).copy_(
                key.narrow(axis, src.start, src.stop - src.start)
            )
            self.value.narrow(axis, dst.start, dst.stop - dst.start).copy_(
                value.narrow(axis, src.start, src.stop - src.start)
            )
            frame += run
        self.end_frame = max(self.end_frame, end)
        self.last_write = (start_frame, end)
        valid = min(self.end_frame, self.capacity) * self.tokens_per_frame
        return self.key.narrow(axis, 0, valid), self.value.narrow(axis, 0, valid)

    # --- state handling (snapshot / restore / fork) ---
    def clone(self) -> RingKVCache:
        other = object.__new__(RingKVCache)
        other.__dict__.update(self.__dict__)
        other.key = self.key.clone()
        other.value = self.value.clone()
        return other

    def copy_from(self, other: RingKVCache) -> None:
        """Overwrite this cache's contents with another of the same shape (no reallocation)."""
        if other.key.shape != self.key.shape:
            raise ValueError(f"cache shapes differ: {tuple(other.key.shape)} vs {tuple(self.key.shape)}")
        self.key.copy_(other.key)
        self.value.copy_(other.value)
        self.end_frame = other.end_frame
        self.last_write = other.last_write

    def select(self, indices: torch.Tensor) -> RingKVCache:
        """A new cache holding the given batch entries (first batch dim), e.g. repeated for a fork."""
        other = object.__new__(RingKVCache)
        other.__dict__.update(self.__dict__)
        other.key = self.key.index_select(0, indices.to(self.key.device))
        other.value = self.value.index_select(0, indices.to(self.key.device))
        return other

    @property
    def nbytes(self) -> int:
        return self.key.nbytes + self.value.nbytes
