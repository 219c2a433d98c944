"""Optional kernel fusion of the DiT's and the VAE decoder's elementwise chains with `torch.compile`.

The DiT spends much of a block in memory-bound elementwise work around its matrix products:
layer norms in float32, the per-frame modulation, gated residual adds, RMS norms and RoPE on q/k.
The VAE decoder does the same around its convolutions (RMS norm over channels, then SiLU).
Each such chain is a small pure function here; `enable_fusion()` swaps them for compiled versions
(one compilation per shape, or a few shape-generic ones, shared by every layer, since the weights
are arguments), which run each chain as one or two fused kernels. Off by default: eager code is the
reference.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F

_enabled = False
_compiled: dict[Callable, Callable] = {}
_given_up: set[Callable] = set()
Fn = TypeVar("Fn", bound=Callable)


def enable_fusion(enabled: bool = True) -> None:
    """Route the fusable chains through `torch.compile` (first calls compile: tens of seconds)."""
    global _enabled
    _enabled = enabled


def fusion_enabled() -> bool:
    return _enabled


def fusable(fn: Fn | None = None, *, dynamic: bool | None = False) -> Fn:
    """Mark a pure tensor function as a fusion candidate. `dynamic` as for `torch.compile`: False
    compiles once per shape; None compiles shape-generic code once a second shape shows up (for
    functions called at many shapes, such as the decoder's layers at every resolution)."""

    def decorate(fn: Fn) -> Fn:
        @functools.wraps(fn)
        def call(*args, **kwargs):
            if not _enabled or fn in _given_up:
                return fn(*args, **kwargs)
            compiled = _compiled.get(fn)
            if compiled is None:
                compiled = _compiled[fn] = torch.compile(fn, fullgraph=True, dynamic=dynamic)
            try:
                return compiled(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - the eager call below re-raises real errors
                # A pure function: running it eagerly gives the result; compilation is only an optimisation.
                _given_up.add(fn)
                first_line = (str(error).strip().splitlines() or [""])[0][:300]
                reason = f"{type(error).__name__}: {first_line}"
                warnings.warn(f"fusion of {fn.__name__} failed ({reason}); it runs unfused", stacklevel=2)
                return fn(*args, **kwargs)

        return call  # type: ignore[return-value]

    return decorate(fn) if fn is not None else decorate  # type: ignore[return-value]


@fusable
def norm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, num_frames: int, dtype: torch.dtype
) -> torch.Tensor:
    """LayerNorm (float32, no affine) of x [B, F*S, D], then x * (1 + scale) + shift per frame, cast to dtype."""
    batch, tokens, dim = x.shape
    h = F.layer_norm(x.float(), (dim,), None, None, eps).view(batch, num_frames, tokens // num_frames, dim)
    return (h * (1 + scale[:, :, None]) + shift[:, :, None]).view(batch, tokens, dim).to(dtype)


@fusable
def gated_add(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, num_frames: int) -> torch.Tensor:
    """x + y * gate per frame (x float32 [B, F*S, D], y any dtype, gate [B, F, D])."""
    batch, tokens, dim = x.shape
    update = y.float().view(batch, num_frames, tokens // num_frames, dim) * gate[:, :, None]
    return x + update.view(batch, tokens, dim)


@fusable
def affine_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """LayerNorm in float32 with a learned affine, cast to dtype."""
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).to(dtype)


@fusable
def rms_norm_rope(
    t: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor, heads: int
) -> torch.Tensor:
    """RMS norm of t [B, L, D] (float32 math, result in t's dtype, times weight), split into heads
    [B, L, heads, D/heads] and rotated by RoPE (cos/sin [L, 1, D/heads/2])."""
    dtype = t.dtype
    normed = (t.float() * torch.rsqrt(t.float().pow(2).mean(dim=-1, keepdim=True) + eps)).to(dtype) * weight
    batch, length, dim = t.shape
    pairs = normed.view(batch, length, heads, dim // heads).float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((real * cos - imag * sin, imag * cos + real * sin), dim=-1)
    return rotated.flatten(-2).to(dtype)


def channel_rms_norm_silu(x: torch.Tensor, gamma: torch.Tensor, scale: float) -> torch.Tensor:
    """SiLU of the VAE's RMS norm of a video [B, C, T, H, W] over channels (x / max(|x|, 1e-12) *
    scale * gamma, gamma of C values), in at least float32 math, cast back to x's dtype; keeps x's
    memory layout (standard or channels-last-3d)."""
    # The compiled kernel sees two canonical shapes whatever the resolution, frame count or width:
    # [N, C] rows (channels-last) or [B, C, L] (standard), so it compiles two or three times in all.
    # gamma goes in as a plain tensor: compiled code treats parameters' shapes as fixed.
    gamma = gamma.detach().reshape(-1)
    batch, channels, frames, height, width = x.shape
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        rows = x.permute(0, 2, 3, 4, 1).reshape(-1, channels)  # a view: C is innermost
        normed = _rms_norm_silu(rows, gamma, float(scale), -1)
        return normed.view(batch, frames, height, width, channels).permute(0, 4, 1, 2, 3)
    normed = _rms_norm_silu(x.contiguous().view(batch, channels, -1), gamma.view(-1, 1), float(scale), 1)
    return normed.view(x.shape)


@fusable(dynamic=True)
def _rms_norm_silu(x: torch.Tensor, gamma: torch.Tensor, scale: float, dim: int) -> torch.Tensor:
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    inverse_norm = xf.square().sum(dim=dim, keepdim=True).clamp_min(1e-24).rsqrt()
    return F.silu(xf * inverse_norm * scale * gamma.to(xf.dtype)).to(x.dtype)
