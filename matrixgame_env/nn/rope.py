"""Rotary position embeddings: the DiT's 3D RoPE and the action module's temporal RoPE.

Angles are computed in float64 for any position (no table length limit), then applied in float32.
Head vectors are read as complex numbers from adjacent pairs (dims 2i, 2i+1 = real, imaginary).
"""

from __future__ import annotations

import torch

from .fusion import rotate_pairs
from .transfer import to_device


def _inverse_frequencies(num_pairs: int, rotary_dim: int, theta: float) -> torch.Tensor:
    """theta^(-2i / rotary_dim) for i < num_pairs, float64."""
    return theta ** (-torch.arange(num_pairs, dtype=torch.float64) * 2 / rotary_dim)


def dit_rope_angles(head_dim: int, frames: range, height: int, width: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles [F * height * width, head_dim / 2] (float64) for tokens in (frame, row, col) order.

    The head_dim/2 complex pairs split into time, row and column groups of c - 2(c//3), c//3 and c//3
    pairs (c = head_dim/2); frame positions are absolute latent frame indices.
    """
    pairs = head_dim // 2
    spatial = pairs // 3
    temporal = pairs - 2 * spatial
    time_freq = _inverse_frequencies(temporal, 2 * temporal, theta)
    space_freq = _inverse_frequencies(spatial, 2 * spatial, theta)
    t = torch.tensor(list(frames), dtype=torch.float64)
    h = torch.arange(height, dtype=torch.float64)
    w = torch.arange(width, dtype=torch.float64)
    num_frames = len(t)
    angles = torch.cat(
        [
            (t[:, None] * time_freq)[:, None, None, :].expand(num_frames, height, width, temporal),
            (h[:, None] * space_freq)[None, :, None, :].expand(num_frames, height, width, spatial),
            (w[:, None] * space_freq)[None, None, :, :].expand(num_frames, height, width, spatial),
        ],
        dim=-1,
    )
    return angles.reshape(num_frames * height * width, pairs)


def action_rope_angles(head_dim: int, rotary_dim: int, frames: range, theta: float = 256.0) -> torch.Tensor:
    """Angles [F, head_dim / 2] of the action module's temporal RoPE (float64).

    Only the first `rotary_dim` dims rotate, with frequencies theta^(-2i/rotary_dim) times the
    frame index; the remaining pairs get angle 0 (the official table's row and column axes have a
    single position 0).
    """
    pairs = head_dim // 2
    freq = torch.zeros(pairs, dtype=torch.float64)
    freq[: rotary_dim // 2] = _inverse_frequencies(rotary_dim // 2, rotary_dim, theta)
    t = torch.tensor(list(frames), dtype=torch.float64)
    return t[:, None] * freq


class Rotation:
    """cos/sin of rotation angles, ready to apply to [..., L, heads, head_dim] tensors."""

    def __init__(self, angles: torch.Tensor, device: torch.device | str | None = None) -> None:
        # angles [L, pairs] -> cos/sin [L, 1, pairs] (broadcast over heads), float32.
        self.cos = to_device(angles.cos(), device, torch.float32)[:, None, :]
        self.sin = to_device(angles.sin(), device, torch.float32)[:, None, :]

    def copy_(self, other: Rotation) -> Rotation:
        """Overwrite this rotation's cos/sin in place with another of the same length (static buffers)."""
        self.cos.copy_(other.cos)
        self.sin.copy_(other.sin)
        return self

    def clone(self) -> Rotation:
        copy = object.__new__(Rotation)
        copy.cos, copy.sin = self.cos.clone(), self.sin.clone()
        return copy

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate adjacent pairs of x [..., L, heads, head_dim] by the angles of its L positions."""
        return rotate_pairs(x.float(), self.cos, self.sin).to(x.dtype)
