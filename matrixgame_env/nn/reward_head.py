"""A small convolutional head that reads game rewards off one block of latent frames."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

_CONFIG_KEYS = ("z_dim", "frames", "width", "depth")


class RewardHead(nn.Module):
    """Latent block [B, z_dim, frames, h, w] (normalised VAE latents) -> [B, 2]: (progress, stuck logit).

    The frames are stacked as channels, so the first convolution sees how the picture changed across
    the block (the motion that progress and being stuck are about). Then `depth - 1` stride-2
    convolutions and a global average: any latent size works.
    """

    OUTPUTS = ("progress", "stuck_logit")

    def __init__(self, z_dim: int = 16, frames: int = 3, width: int = 64, depth: int = 3) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self._config = {"z_dim": int(z_dim), "frames": int(frames), "width": int(width), "depth": int(depth)}
        layers: list[nn.Module] = [nn.Conv2d(z_dim * frames, width, 3, padding=1), nn.GroupNorm(1, width), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Conv2d(width, width, 3, stride=2, padding=1), nn.GroupNorm(1, width), nn.SiLU()]
        self.features = nn.Sequential(*layers)
        self.out = nn.Linear(width, len(self.OUTPUTS))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RewardHead:
        unknown = sorted(set(config) - set(_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"unknown reward head config keys {unknown}; expected some of {list(_CONFIG_KEYS)}")
        return cls(**config)

    @property
    def config(self) -> dict[str, int]:
        return dict(self._config)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        z_dim, frames = self._config["z_dim"], self._config["frames"]
        if latents.ndim != 5 or latents.shape[1:3] != (z_dim, frames):
            raise ValueError(f"expected latents [B, {z_dim}, {frames}, h, w], got {tuple(latents.shape)}")
        x = latents.flatten(1, 2)  # [B, z_dim * frames, h, w]
        features = self.features(x.to(self.out.weight.dtype)).mean(dim=(2, 3))  # [B, width]
        return self.out(features)  # [B, 2]
