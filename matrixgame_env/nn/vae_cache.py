"""What a causal VAE's layers carry from one chunk of video to the next: `FeatureCache` (one slot of
recent input frames per causal layer) and `DecoderCache`, the whole state of a streaming decode."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from . import triton_norm
from .transfer import to_device

CacheT = TypeVar("CacheT", bound="FeatureCache")


class FeatureCache:
    """The frames every causal layer of an encoder or decoder carries over to its next chunk.

    Slot i belongs to one layer for good. It holds that layer's most recent input frames,
    [B, C, 2, h, w] for a 3-tap causal convolution and [B, C, 1, h, w] for a temporal downsampler,
    or None before the layer has run. Layers replace a slot's tensor instead of writing into it, so
    the set of tensors, and the memory, stays the same however many chunks have gone through.
    With `write_in_place` set they overwrite a slot's tensor when the new frames have its shape, so
    the slots keep their addresses from chunk to chunk (what a captured CUDA graph of the decoder
    reads and writes); every cache made from another (`clone`, `select`, `to`, ...) starts unset.
    `restart` empties a cache for a new stream but keeps its tensors: its slots then count as empty
    (`is_empty`) until their layers write them again.
    With `channels_last` every slot is kept as a dense channels-last tensor of its own, whatever the
    layout of the frames it was given (a slice of a larger join, the output of a compiled graph): a
    compiled decoder, whose guards check its inputs' strides, then meets the same slots from call to
    call and from the eager first chunk to the compiled later ones.
    """

    def __init__(self, num_slots: int, batch_size: int, channels_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.slots: list[torch.Tensor | None] = [None] * num_slots
        self.emptied = [False] * num_slots  # slots that hold a tensor but count as empty (`restart`)
        self.batch_size = batch_size
        self.write_in_place = False
        self.channels_last = channels_last

    def is_empty(self, slot: int) -> bool:
        """Whether the slot's layer has not run yet in this stream (its first chunk comes next)."""
        return self.slots[slot] is None or self.emptied[slot]

    def filling(self) -> bool:
        """Whether some slot's layer has not run yet in this stream (its next chunk is its first)."""
        return any(self.is_empty(slot) for slot in range(len(self.slots)))

    def keep(self, slot: int, frames: torch.Tensor, owned: bool = False) -> None:
        """Stores `frames` in `slot`: overwriting its tensor under `write_in_place`, else as a copy, or
        as they are when `owned` (a tensor nothing else refers to) and already in the slots' layout."""
        held = self.slots[slot]
        if self.write_in_place and held is not None and held.shape == frames.shape and held.dtype == frames.dtype:
            triton_norm.copy_frames(held, frames)
        else:
            self.slots[slot] = self.adopt(frames) if owned else self._copy_of(frames)
        self.emptied[slot] = False

    def restart(self) -> None:
        """Start a new stream from its first chunk, as a new cache would, on the same tensors: the
        slots are zeroed in place and count as empty until written (the addresses a captured CUDA
        graph of a first chunk reads and writes stay the same)."""
        for i, held in enumerate(self.slots):
            if held is not None:
                held.zero_()
                self.emptied[i] = True

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached frames."""
        return sum(slot.nbytes for slot in self.slots if slot is not None)

    def clone(self: CacheT) -> CacheT:
        """An exact snapshot with its own tensors: later decoding with `self` leaves it unchanged."""
        return self._map(torch.Tensor.clone, self.batch_size)

    def select(self: CacheT, indices: Sequence[int] | torch.Tensor) -> CacheT:
        """The cache of the batch elements `indices`, in that order (repeats allowed)."""
        index = torch.as_tensor(indices, dtype=torch.long).flatten().cpu()  # checked on the host: no device sync
        if index.numel() == 0 or index.min() < 0 or index.max() >= self.batch_size:
            raise ValueError(f"indices must be a non-empty list of values in [0, {self.batch_size}), got {indices}")
        uploaded: dict[torch.device, torch.Tensor] = {}  # one upload per device, not one per slot

        def pick(slot: torch.Tensor) -> torch.Tensor:
            if slot.device not in uploaded:
                uploaded[slot.device] = to_device(index, slot.device)
            return slot.index_select(0, uploaded[slot.device])

        return self._map(pick, index.numel())

    def expand_batch(self: CacheT, repeats: int) -> CacheT:
        """Each batch element `repeats` times in a row (element b becomes b*repeats .. b*repeats + repeats - 1)."""
        if repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {repeats}")
        return self._map(lambda slot: slot.repeat_interleave(repeats, dim=0), self.batch_size * repeats)

    def to(self: CacheT, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> CacheT:
        """A copy on another device and/or in another floating-point dtype."""
        return self._map(lambda slot: slot.to(device=device, dtype=dtype, copy=True), self.batch_size)

    def _in_layout(self, frames: torch.Tensor) -> bool:
        """Whether `frames` may be kept as they are: any layout, or under `channels_last` a dense
        channels-last one with the strides a new tensor of that layout has."""
        return not self.channels_last or frames.dim() != 5 or frames.stride() == _channels_last_strides(frames.shape)

    def _copy_of(self, frames: torch.Tensor) -> torch.Tensor:
        """A copy of `frames`: channels-last frames the Triton kernels take are copied by one of them
        (`triton_norm.copy_frames`), others by `clone`, or under `channels_last` into a new
        channels-last tensor."""
        if not ((self.channels_last and frames.dim() == 5) or triton_norm.applies(frames)):
            return frames.clone()
        copy = torch.empty(frames.shape, dtype=frames.dtype, device=frames.device, memory_format=torch.channels_last_3d)
        triton_norm.copy_frames(copy, frames)
        return copy

    def _map(self: CacheT, transform: Callable[[torch.Tensor], torch.Tensor], batch_size: int) -> CacheT:
        result = type(self)(len(self.slots), batch_size, self.channels_last)
        result.slots = [None if slot is None else result.adopt(transform(slot)) for slot in self.slots]
        result.emptied = list(self.emptied)
        return result

    def adopt(self, frames: torch.Tensor) -> torch.Tensor:
        """`frames`, a tensor that will be one of this cache's slots and nothing else's, in the
        slots' layout (copied only where it differs)."""
        return frames if self._in_layout(frames) else self._copy_of(frames)


class DecoderCache(FeatureCache):
    """State of a streaming decode: one slot per causal layer of the decoder, each keeping 2 frames.

    Make one with `WanVAE.new_decoder_cache(batch_size)`; `WanVAE.decode_stream` updates it in place.
    `clone` snapshots a world, `select` / `expand_batch` drop or fork worlds of the batch.
    """


def _channels_last_strides(shape: torch.Size) -> tuple[int, ...]:
    """The strides of a new dense channels-last tensor of `shape` [B, C, T, H, W]."""
    batch, channels, frames, height, width = shape
    return (channels * frames * height * width, 1, height * width * channels, width * channels, channels)
