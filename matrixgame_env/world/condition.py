"""The image condition: latents of the start image followed by the zero-frame latents; a block's
conditions (the condition channels and the RoPE tables), which can be prepared a block ahead."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..nn.dit import FrameRotations
from ..nn.transfer import to_device


class ImageLatents:
    """Per-world image-condition latents [B, C, K, h, w]; frames at index >= K repeat frame K-1.

    The VAE encoding of "image followed by all-zero frames" becomes constant after a few latent
    frames (the causal encoder's cache reaches a fixed point), so K distinct frames describe the
    whole, unbounded condition sequence.
    """

    def __init__(self, latents: torch.Tensor) -> None:
        if latents.dim() != 5:
            raise ValueError(f"image latents must be [B, C, K, h, w], got shape {tuple(latents.shape)}")
        self.latents = latents

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    def frames(self, start: int, stop: int) -> torch.Tensor:
        """Latent frames [start, stop) -> [B, C, stop - start, h, w]."""
        last = self.latents.shape[2] - 1
        index = to_device(torch.arange(start, stop).clamp(max=last), self.latents.device)
        return self.latents.index_select(2, index)

    def select(self, indices: torch.Tensor) -> ImageLatents:
        return ImageLatents(self.latents.index_select(0, to_device(indices, self.latents.device)))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ImageLatents:
        return ImageLatents(self.latents.to(device=device, dtype=dtype))


def first_frame_mask(
    batch: int,
    channels: int,
    start: int,
    stop: int,
    height: int,
    width: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The mask part of `cond_concat`: 1 on latent frame 0, 0 on every later frame."""
    mask = torch.zeros(batch, channels, stop - start, height, width, device=device, dtype=dtype)
    if start == 0:
        mask[:, :, 0] = 1
    return mask


@dataclass
class BlockConditions:
    """What a block reads besides noise and actions: the condition channels [B, mask + image channels,
    f, h, w] and the RoPE tables of its frames. Both are functions of the block's first latent frame
    and the state's image condition alone, so they can be built while the GPU still runs the block
    before (`StreamingSampler.step` does so where it draws noise ahead); `frame`, `image` and `stream`
    say what they were built for and where they were queued."""

    frame: int
    image: ImageLatents
    stream: torch.cuda.Stream | None
    cond: torch.Tensor
    rotations: FrameRotations

    def matches(self, frame: int, image: ImageLatents, stream: torch.cuda.Stream | None) -> bool:
        """True when these are the conditions of a block starting at `frame` of a state with `image`
        (the same object: image conditions are replaced, never modified), queued on `stream`."""
        return self.frame == frame and self.image is image and self.stream == stream
