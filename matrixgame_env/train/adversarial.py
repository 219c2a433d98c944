"""An adversarial loss for the VAE's decoder: a patch discriminator over frames, hinge losses.

Pixel losses (L1, MSE) are minimised by the average of every picture an encoding could stand for, which
is a blur; a discriminator that tells real frames from decoded ones, patch by patch, charges the blur
directly. `train vae --gan-weight W` adds W times the generator loss to the VAE's loss from step
`--gan-start` on, and trains the discriminator on the same clips after every VAE step. With
`--disc-frames K` > 1 it judges windows of K consecutive frames stacked on the channels, so that
the motion between frames, not only each frame's look, has to be real (the decoder rebuilds 4
frames from each latent frame, and a per-frame judge lets it share that motion out unevenly).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class PatchDiscriminator(nn.Module):
    """Windows of `frames` consecutive frames [N, 3 * frames, H, W] in [-1, 1] (H, W multiples of 8) ->
    real/fake logits [N, 1, H / 8, W / 8], one per overlapping patch of about 38x38 pixels: three
    stride-2 4x4 convolutions with leaky ReLUs (group norm after the second and third), then a 3x3
    convolution to one logit."""

    def __init__(self, width: int = 32, frames: int = 1) -> None:
        super().__init__()
        problem = width_problem(width)
        if problem:
            raise ValueError(f"the discriminator width {problem}")
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise ValueError(f"the discriminator's frames per window must be an integer >= 1, got {frames!r}")
        self.frames = frames
        layers: list[nn.Module] = [nn.Conv2d(3 * frames, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        channels = width
        for _ in range(2):
            layers += [
                nn.Conv2d(channels, 2 * channels, 4, stride=2, padding=1, bias=False),
                nn.GroupNorm(8, 2 * channels),
                nn.LeakyReLU(0.2),
            ]
            channels *= 2
        layers.append(nn.Conv2d(channels, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.net(frames)


def width_problem(width: int) -> str | None:
    """What is wrong with a discriminator width (its group norms need multiples of 8), or None."""
    return None if width >= 8 and width % 8 == 0 else f"must be a multiple of 8 and at least 8, got {width}"


def video_windows(video: torch.Tensor, frames: int) -> torch.Tensor:
    """Clips [B, 3, T, H, W] -> every window of `frames` consecutive frames, stacked on the channels:
    [B * (T - frames + 1), 3 * frames, H, W] (frames 1: every frame alone)."""
    count = video.shape[2] - frames + 1
    if frames < 1 or count < 1:
        raise ValueError(f"windows of {frames} frames need clips of at least that many, got {video.shape[2]}")
    windows = video.unfold(2, frames, 1)  # [B, 3, count, H, W, frames]
    return windows.permute(0, 2, 5, 1, 3, 4).reshape(video.shape[0] * count, 3 * frames, *video.shape[3:])


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator: mean relu(1 - real) + mean relu(1 + fake), halved."""
    return 0.5 * (F.relu(1.0 - real_logits.float()).mean() + F.relu(1.0 + fake_logits.float()).mean())


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The decoder's adversarial loss: minus the mean logit of its frames."""
    return -fake_logits.float().mean()
