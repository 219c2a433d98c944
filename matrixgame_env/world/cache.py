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
        self.planned_slots: torch.Tensor | None = None  # ring slots of a planned write (`plan_write`)
        # Tokens attention reads after the planned write, kept at planning: a traced pass that read
        # `end_frame` would be specialised to (and recompiled for) each frame number.
        self.planned_valid_tokens = 0

    @property
    def frame_axis(self) -> int:
        return self.key.dim() - 3

    def slot(self, frame: int) -> int:
        if frame < self.sink:
            return frame
        return self.sink + (frame - self.sink) % (self.capacity - self.sink)

    def update(self, start_frame: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write frames [start_frame, start_frame + n) and return the valid keys/values. After
        `plan_write` the planned slots are written (and `start_frame` is not read)."""
        if self.planned_slots is None:
            return self._write_now(start_frame, key, value)
        axis, per_frame = self.frame_axis, self.tokens_per_frame
        frames = self.planned_slots.shape[0]
        if key.shape[axis] != frames * per_frame:
            raise ValueError(f"a write of {key.shape[axis]} tokens, but {frames} frames were planned")
        for store, new in ((self.key, key), (self.value, value)):
            store.unflatten(axis, (self.capacity, per_frame)).index_copy_(
                axis, self.planned_slots, new.unflatten(axis, (frames, per_frame))
            )
        valid = self.planned_valid_tokens
        return self.key.narrow(axis, 0, valid), self.value.narrow(axis, 0, valid)

    def plan_write(self, start_frame: int, frames: int) -> None:
        """Check and book the write of frames [start_frame, start_frame + frames) that the next
        `update` makes, with its ring slots as a tensor: the update is then the same traceable
        tensor work at every position in the ring, so one compiled DiT pass serves every block
        once the cache is full (`CompiledDiT`). `clear_plan` ends it."""
        self._book(start_frame, frames)
        slots = [self.slot(frame) for frame in range(start_frame, start_frame + frames)]
        self.planned_slots = torch.tensor(slots, dtype=torch.long, device=self.key.device)
        self.planned_valid_tokens = self._valid_tokens()

    def clear_plan(self) -> None:
        self.planned_slots = None

    def full_after(self, start_frame: int, frames: int) -> bool:
        """Whether every slot holds a frame once frames [start_frame, start_frame + frames) are written."""
        return max(self.end_frame, start_frame + frames) >= self.capacity

    def _valid_tokens(self) -> int:
        """How many leading tokens hold frames (all once the cache is full)."""
        return min(self.end_frame, self.capacity) * self.tokens_per_frame

    def _book(self, start_frame: int, frames: int) -> None:
        """Check that frames [start_frame, start_frame + frames) may be written; note the write."""
        end = start_frame + frames
        if frames > self.capacity - self.sink:
            raise ValueError(
                f"a write of {frames} frames does not fit a cache window of {self.capacity - self.sink} frames"
            )
        if end < self.end_frame or start_frame < self.end_frame - (self.capacity - self.sink):
            raise ValueError(
                f"cannot write frames {start_frame}..{end - 1}: the cache already holds frames up to "
                f"{self.end_frame - 1} and only the newest block may be rewritten"
            )
        self.end_frame = max(self.end_frame, end)
        self.last_write = (start_frame, end)

    # Never traced by torch.compile: its Python bookkeeping (frame numbers, ring slots) changes every
    # block and would recompile a traced DiT each time; a compiled pass stops here, runs it eagerly
    # and goes on. `CompiledDiT` plans its writes (`plan_write`) instead.
    @torch.compiler.disable
    def _write_now(self, start_frame: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        axis = self.frame_axis
        tokens = key.shape[axis]
        if tokens % self.tokens_per_frame:
            raise ValueError(f"{tokens} tokens is not a whole number of {self.tokens_per_frame}-token frames")
        n = tokens // self.tokens_per_frame
        end = start_frame + n
        self._book(start_frame, n)
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
        valid = self._valid_tokens()
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
