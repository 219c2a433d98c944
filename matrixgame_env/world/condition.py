"""The image condition: latents of the start image followed by the zero-frame latents."""

from __future__ import annotations

import torch

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
