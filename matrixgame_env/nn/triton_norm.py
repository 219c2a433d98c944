"""The VAE decoder's elementwise chains as Triton kernels (GPUs, channels-last videos).

Around every causal convolution the decoder normalises its input over channels (RMS norm), applies
SiLU and joins the cached past frames in front; a residual block then adds two biases and its skip.
Eagerly that is about eight passes over each activation (square, sum, clamp, rsqrt, two products,
SiLU, the join); `torch.compile` fuses them (`fast="compile"`) but compiles again for every new batch
size. These kernels do the same in one pass each, for any shape: a program takes BLOCK_R pixels'
rows of C channels (channels-last: a pixel's channels are contiguous), normalises them in float32
and writes the result where the convolution reads it. The same functions as `nn.fusion`'s
`_past_and_rms_norm_silu`, `_rms_norm_silu` and `_bias_add_rows` up to float32 rounding.

Triton is optional (`nn.triton_conv.available()`); with TRITON_INTERPRET=1 the kernels run on CPU
tensors through Triton's interpreter (slowly: for tests).
"""

from __future__ import annotations

import functools
import math

import torch

from .triton_conv import _cdiv, _channels_last_strides, available, interpreted

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BLOCK_ELEMENTS = 4096  # values a program handles: BLOCK_R rows of C channels (C rounded up to a power of 2)
# On by default: 1.15x / 1.22x the steps/s of 16 / 64 synchronised worlds on an H200 (benchmarks/NOTES.md).
_enabled = True


@functools.cache
def _kernels():
    """The jitted kernels (`nn.triton_norm_kernels`), imported on first use: Triton loads lazily."""
    from . import triton_norm_kernels

    return triton_norm_kernels


def set_enabled(enabled: bool = True) -> None:
    """Process-wide switch: on, decoders that run Triton kernels (`WanVAE.set_decoder_triton`, part of
    `fast=True` on GPUs) fuse their elementwise chains with these kernels too (the default); off, they
    keep the eager chains."""
    global _enabled
    _enabled = enabled


def enabled() -> bool:
    return _enabled


def applies(*videos: torch.Tensor) -> bool:
    """Whether the kernels take these videos [B, C, T, H, W]: bf16 / fp16 / fp32 on a CUDA device (any
    device in the interpreter), channels-last with each batch element's values contiguous, no gradient."""
    return all(
        v.dim() == 5
        and (v.is_cuda or interpreted())
        and v.dtype in DTYPES
        and not v.requires_grad
        and _channels_last_strides(v)
        for v in videos
    )


def _launch_shape(channels: int, rows: int, batch: int) -> tuple[int, int, tuple[int, int]]:
    """(BLOCK_C, BLOCK_R, grid) for rows of `channels` values."""
    block_c = 1 << max(channels - 1, 0).bit_length()
    block_r = max(1, BLOCK_ELEMENTS // block_c)
    if interpreted():
        block_r = min(block_r, 16)
    return block_c, block_r, (_cdiv(rows, block_r), batch)


def past_and_norm_silu(
    past: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor, scale: float, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """cat([past, SiLU(RMS norm of (x + bias) over channels * scale * gamma)], dim=2) for videos
    [B, C, P, H, W] and [B, C, T, H, W] (`applies(x)`; past in any layout, already normalised), as a new
    channels-last video [B, C, P + T, H, W] in x's dtype. P may be 0."""
    batch, channels, frames, height, width = x.shape
    if past.shape[:2] != x.shape[:2] or past.shape[3:] != x.shape[3:]:
        raise ValueError(f"past frames {tuple(past.shape)} do not fit the video {tuple(x.shape)}")
    if gamma.numel() != channels or (bias is not None and bias.numel() != channels):
        raise ValueError(f"gamma and bias need {channels} values, got {gamma.numel()} and "
                         f"{None if bias is None else bias.numel()}")  # fmt: skip
    held = past.shape[2]
    shape = (batch, channels, held + frames, height, width)  # allocated channels-last: no copy to get there
    out = torch.empty(shape, device=x.device, dtype=x.dtype, memory_format=torch.channels_last_3d)
    if held:
        copy_frames(out[:, :, :held], past)
    rows = frames * height * width
    if rows == 0 or batch == 0:
        return out
    block_c, block_r, grid = _launch_shape(channels, rows, batch)
    gamma = gamma.detach().reshape(-1).contiguous()
    bias = None if bias is None else bias.detach().reshape(-1).contiguous()
    _kernels().norm_silu_rows[grid](
        x,
        gamma,
        bias if bias is not None else gamma,
        out,
        rows,
        x.stride(0),
        out.stride(0),
        held * height * width * channels,
        float(scale),
        C=channels,
        BLOCK_C=block_c,
        BLOCK_R=block_r,
        HAS_BIAS=bias is not None,
    )
    return out


def bias_add(
    h: torch.Tensor, bias: torch.Tensor | None, skip: torch.Tensor, skip_bias: torch.Tensor | None
) -> torch.Tensor:
    """h + bias + skip + skip_bias for videos [B, C, T, H, W] (`applies(h, skip)`) and per-channel
    biases (None = none), in float32 math, as a new channels-last video in h's dtype."""
    if h.shape != skip.shape:
        raise ValueError(f"the skip {tuple(skip.shape)} does not fit the video {tuple(h.shape)}")
    batch, channels, frames, height, width = h.shape
    biases = [None if b is None else b.detach().reshape(-1).contiguous() for b in (bias, skip_bias)]
    for b in biases:
        if b is not None and b.numel() != channels:
            raise ValueError(f"a bias needs {channels} values, got {b.numel()}")
    out = torch.empty_like(h, memory_format=torch.channels_last_3d)
    rows = frames * height * width
    if rows == 0 or batch == 0:
        return out
    block_c, block_r, grid = _launch_shape(channels, rows, batch)
    _kernels().bias_add_rows[grid](
        h,
        biases[0] if biases[0] is not None else h,
        skip,
        biases[1] if biases[1] is not None else h,
        out,
        rows,
        h.stride(0),
        skip.stride(0),
        out.stride(0),
        C=channels,
        BLOCK_C=block_c,
        BLOCK_R=block_r,
        HAS_BIAS=biases[0] is not None,
        HAS_SKIP_BIAS=biases[1] is not None,
    )
    return out


COPY_BLOCK = 4096  # values a program of `copy_batch_rows` moves


def copy_frames(destination: torch.Tensor, source: torch.Tensor) -> None:
    """destination.copy_(source) for videos [B, C, T, H, W] of one shape and dtype whose batch elements
    each hold their values contiguously in the same channels-last order (a run of frames of a
    channels-last video: a cache's kept frames, the head of a joined input), in one vectorised pass;
    torch copies such strided views with its generic elementwise kernel, at a fraction of the memory
    bandwidth. Other tensors go through `copy_`."""
    if (
        destination.shape != source.shape
        or destination.dtype != source.dtype
        or destination.device != source.device
        or not applies(destination, source)
        or not available()
    ):
        destination.copy_(source)
        return
    batch, per_batch = destination.shape[0], math.prod(destination.shape[1:])
    if per_batch == 0 or batch == 0:
        return
    block = min(COPY_BLOCK, 64) if interpreted() else COPY_BLOCK
    grid = (_cdiv(per_batch, block), batch)
    strides = (source.stride(0), destination.stride(0))
    _kernels().copy_batch_rows[grid](source, destination, per_batch, *strides, BLOCK=block)


def upsample_nearest2x(frames: torch.Tensor) -> torch.Tensor | None:
    """`F.interpolate(frames, scale_factor=2, mode="nearest")` for pictures [N, C, H, W] stored channels-last
    (each pixel's channels contiguous, rows W * C apart; the image stride is free), as a new
    channels-last [N, C, 2H, 2W] in one pass; torch's channels-last nearest kernel reaches a fraction
    of the memory bandwidth. None where it does not apply (then use torch's)."""
    if frames.dim() != 4 or not available():
        return None
    count, channels, height, width = frames.shape
    if (
        not (frames.is_cuda or interpreted())
        or frames.dtype not in DTYPES
        or frames.requires_grad
        or frames.stride(1) != 1
        or frames.stride(3) != channels
        or frames.stride(2) != width * channels
    ):
        return None
    shape = (count, channels, 2 * height, 2 * width)
    out = torch.empty(shape, device=frames.device, dtype=frames.dtype, memory_format=torch.channels_last)
    pixels = 4 * height * width
    if pixels == 0 or count == 0:
        return out
    block_c, block_r, grid = _launch_shape(channels, pixels, count)
    _kernels().upsample_nearest2x_rows[grid](
        frames,
        out,
        pixels,
        2 * width,
        frames.stride(0),
        frames.stride(2),
        out.stride(0),
        C=channels,
        BLOCK_C=block_c,
        BLOCK_R=block_r,
    )
    return out
