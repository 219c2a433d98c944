"""A decoder shown each video frame's recent actions (an option of our own, not in the official VAE).

A latent frame packs 4 video frames, so where among them a key was pressed or released is what a
latent keeps least. The world model knows every frame's action when it decodes a block, so a decoder
can be told them: each video frame f gets the actions of frames f - 1, ..., f - lags (action t moves
the game from frame t to frame t + 1; zeros before the clip's first frame), and a small MLP turns them
into a per-channel scale and shift of the decoder's features at that frame (`FrameModulation`, after
the layers where frames map one to one to video frames). The last layer starts at zero, so a decoder
given modulations decodes exactly as before until it is trained.
"""

from __future__ import annotations

import torch
from torch import nn

# Mouse actions are small (model units: 0.1 is 4 degrees of turn); scaled to about unit size.
MOUSE_SCALE = 10.0


def frame_action_features(keyboard: torch.Tensor, mouse: torch.Tensor | None, lags: int) -> torch.Tensor:
    """Per-frame actions, keyboard [B, T, K] and mouse [B, T, M] (or None), -> features [B, T, lags (K + M)]:
    row f holds the actions of frames f - 1, ..., f - lags, zeros where those come before frame 0."""
    if keyboard.dim() != 3:
        raise ValueError(f"keyboard must be [B, T, K], got {tuple(keyboard.shape)}")
    if mouse is not None and (mouse.dim() != 3 or mouse.shape[:2] != keyboard.shape[:2]):
        raise ValueError(f"mouse must be [B, T, M] beside keyboard {tuple(keyboard.shape)}, got {tuple(mouse.shape)}")
    if lags < 1:
        raise ValueError(f"lags must be at least 1, got {lags}")
    actions = keyboard.float() if mouse is None else torch.cat([keyboard.float(), MOUSE_SCALE * mouse.float()], -1)
    batch, frames, width = actions.shape
    padded = torch.cat([actions.new_zeros(batch, lags, width), actions], dim=1)  # frame f at row f + lags
    # Lag l of frame f is padded row f + lags - l.
    return torch.cat([padded[:, lags - lag : lags - lag + frames] for lag in range(1, lags + 1)], dim=-1)


class FrameModulation(nn.Module):
    """Features [B, C, T, H, W] scaled and shifted per channel by each frame's action features."""

    def __init__(self, channels: int, features: int, hidden: int = 64) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(features, hidden), nn.SiLU(), nn.Linear(hidden, 2 * channels))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: torch.Tensor, frame_features: torch.Tensor) -> torch.Tensor:
        """`frame_features` [B, T', F] for at least x's T frames; the last T are x's."""
        frames = x.shape[2]
        if frame_features.dim() != 3 or frame_features.shape[1] < frames or frame_features.shape[0] != x.shape[0]:
            raise ValueError(
                f"frame action features must be [B={x.shape[0]}, T >= {frames}, F], got {tuple(frame_features.shape)}"
            )
        scale, shift = self.mlp(frame_features[:, -frames:].to(x.dtype)).chunk(2, dim=-1)  # [B, T, C] each
        scale = scale.transpose(1, 2)[..., None, None]
        shift = shift.transpose(1, 2)[..., None, None]
        return x * (1.0 + scale) + shift
