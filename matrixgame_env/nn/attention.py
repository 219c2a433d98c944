"""Attention primitives shared by the DiT, the action module and the encoders."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from .fusion import affine_norm, few_key_attention, rms_norm

# Key counts up to this go through `few_key_attention` (the action modules' streaming attention over
# at most a window of frames); longer ones through SDPA's attention kernels.
FEW_KEYS = 16


class KVCache(Protocol):
    """What an attention layer needs from a streaming cache.

    `update` stores the keys/values of frames [start_frame, start_frame + n) and returns every
    key/value the new queries may attend to, in the layout they were given ([..., L, heads, dim]).
    """

    def update(self, start_frame: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention on [B, L, heads, head_dim] tensors (scale 1/sqrt(head_dim)) through SDPA.

    `mask` is boolean [Lq, Lk] (True = may attend) or None for full attention.
    """
    if mask is None and key.shape[1] <= FEW_KEYS:
        return few_key_attention(query, key, value)
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dim, in x's own dtype."""
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


class RMSNorm(torch.nn.Module):
    """RMS normalisation computed in float32, then scaled by a learned weight (the DiT's q/k norm)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class FloatLayerNorm(torch.nn.LayerNorm):
    """LayerNorm evaluated in float32 whatever the input dtype; output in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and self.bias is not None and len(self.normalized_shape) == 1:
            return affine_norm(x, self.weight, self.bias, self.eps, x.dtype)  # one Triton kernel where it applies
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def block_causal_frame_mask(num_frames: int, frames_per_block: int, window_frames: int | None) -> torch.Tensor:
    """Boolean [F, F] mask of the training path: a frame of block b sees every frame up to the end
    of block b, restricted to the last `window_frames` frames before that end (None = unlimited)."""
    frame = torch.arange(num_frames)
    block_end = (frame // frames_per_block + 1) * frames_per_block
    visible = frame[None, :] < block_end[:, None]
    if window_frames is not None and window_frames > 0:
        visible &= frame[None, :] >= (block_end[:, None] - window_frames)
    return visible
