"""The VAE's narrow causal 3x3x3 convolutions as one Triton kernel (GPUs, channels-last, bf16/fp16).

At doom-small's full resolution the decoder convolves 16 channels into 16, and cuDNN's kernels tile
the output channels by 32 or more, so half of every tile is padding (benchmarks/NOTES.md). This
kernel is an implicit matrix product sized to the layer: each program takes BLOCK_M pixels of one
output frame and sums the 27 taps' [BLOCK_M, C_in] x [C_in, C_out] products in float32, reading the
channels-last input directly (zero padding in height and width; the caller joins the cached past
frames in front, as for torch's conv3d). In its grouped form a program takes up to 4 output frames
of one world and reads each input row once for all the frames it is a tap of. The same function as
`F.conv3d(joined, w, b, padding=(0, 1, 1))` up to float32 summation order.

Triton is optional: `available()` says whether the kernel can run here; with TRITON_INTERPRET=1 it
runs on CPU tensors through Triton's interpreter (slowly: for tests).
"""

from __future__ import annotations

import functools
import os

import torch

WIDTHS = (16, 32, 64)  # input and output channel counts the kernel computes
# The (C_in, C_out) where it beats cuDNN (H200, bf16, 64 worlds at 96x176, bench_small_conv.py): 16 -> 16
# 1.64x; 32 -> 16 0.84x and 32 -> 32 0.76x, so `applies` leaves those to cuDNN.
PAYING_WIDTHS = ((16, 16),)
DTYPES = (torch.bfloat16, torch.float16)


def interpreted() -> bool:
    """Whether Triton kernels run through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _kernels():
    """The jitted kernel and its autotuned form, built on first use (Triton imports lazily)."""
    import triton
    import triton.language as tl

    @triton.jit
    def causal_conv3x3x3(
        x_ptr,
        w_ptr,
        b_ptr,
        y_ptr,
        frames_out,
        height,
        width,
        x_batch_stride,
        x_frame_stride,
        y_batch_stride,
        y_frame_stride,
        C_IN: tl.constexpr,
        C_OUT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        ROW_TAPS: tl.constexpr,
        FRAMES: tl.constexpr,
    ):
        # Program (m, n): pixels m*BLOCK_M .. of output frame n = (batch, frame). Pixel and channel
        # strides are those of channels-last-3d tensors: C_in (resp. C_out) and 1.
        # ROW_TAPS: the three taps along a row read one run of 3 * C_in contiguous values (pixels
        # w - 1 .. w + 1), taken as one [BLOCK_M, 4 * C_in] product with the fourth quarter masked
        # out (9 products of depth 4 * C_in instead of 27 of depth C_in).
        # FRAMES > 1 (with ROW_TAPS): program (m, n) computes output frames n*FRAMES .. of one world
        # (a group within a batch element); each input row run is read once and serves the (up to
        # three) output frames it is a tap of, instead of once per output frame.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        groups = (frames_out + FRAMES - 1) // FRAMES
        batch = pid_n // groups
        frame = (pid_n % groups) * FRAMES
        pixels = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        inside = pixels < height * width
        row = pixels // width
        col = pixels % width
        c_out = tl.arange(0, C_OUT)
        x_frame = x_ptr + batch.to(tl.int64) * x_batch_stride + frame.to(tl.int64) * x_frame_stride
        y_frame = y_ptr + batch.to(tl.int64) * y_batch_stride + frame.to(tl.int64) * y_frame_stride
        out = y_frame + pixels[:, None] * C_OUT + c_out[None, :]
        if ROW_TAPS:
            k = tl.arange(0, 4 * C_IN)
            tap_w = k // C_IN  # 0, 1, 2: columns w - 1, w, w + 1; 3: padding
            c = col[:, None] + tap_w[None, :] - 1
            col_ok = (tap_w[None, :] < 3) & (c >= 0) & (c < width)
            w_mask = (tap_w < 3)[:, None]
        if FRAMES > 1:
            first = row * 0 + frame  # the group's first output frame, per pixel: a tensor for the masks
            bias = tl.zeros((C_OUT,), dtype=tl.float32)
            if HAS_BIAS:
                bias = tl.load(b_ptr + c_out).to(tl.float32)
            acc0 = tl.zeros((BLOCK_M, C_OUT), dtype=tl.float32) + bias[None, :]
            acc1 = tl.zeros((BLOCK_M, C_OUT), dtype=tl.float32) + bias[None, :]
            acc2 = tl.zeros((BLOCK_M, C_OUT), dtype=tl.float32) + bias[None, :]
            acc3 = tl.zeros((BLOCK_M, C_OUT), dtype=tl.float32) + bias[None, :]
            for f in tl.static_range(FRAMES + 2):  # input frames of the group, read once each
                frame_ok = first + f < frames_out + 2
                for dh in tl.static_range(3):
                    r = row + (dh - 1)
                    ok = (inside & (r >= 0) & (r < height) & frame_ok)[:, None] & col_ok
                    offsets = ((r * width + col - 1) * C_IN)[:, None] + k[None, :]
                    a = tl.load(x_frame + f * x_frame_stride + offsets, mask=ok, other=0.0)
                    for dt in tl.static_range(3):  # input frame f is tap dt of output frame f - dt
                        if f - dt >= 0:
                            if f - dt < FRAMES:
                                rows = (dt * 9 + dh * 3) * C_IN + k
                                w = tl.load(w_ptr + rows[:, None] * C_OUT + c_out[None, :], mask=w_mask, other=0.0)
                                if f - dt == 0:
                                    acc0 += tl.dot(a, w)
                                elif f - dt == 1:
                                    acc1 += tl.dot(a, w)
                                elif f - dt == 2:
                                    acc2 += tl.dot(a, w)
                                else:
                                    acc3 += tl.dot(a, w)
            dtype = y_ptr.dtype.element_ty
            tl.store(out, acc0.to(dtype), mask=inside[:, None])
            tl.store(out + y_frame_stride, acc1.to(dtype), mask=(inside & (first + 1 < frames_out))[:, None])
            if FRAMES > 2:
                tl.store(out + 2 * y_frame_stride, acc2.to(dtype), mask=(inside & (first + 2 < frames_out))[:, None])
                tl.store(out + 3 * y_frame_stride, acc3.to(dtype), mask=(inside & (first + 3 < frames_out))[:, None])
        else:
            acc = tl.zeros((BLOCK_M, C_OUT), dtype=tl.float32)
            if ROW_TAPS:
                for dt in tl.static_range(3):
                    for dh in tl.static_range(3):
                        r = row + (dh - 1)
                        ok = (inside & (r >= 0) & (r < height))[:, None] & col_ok
                        offsets = ((r * width + col - 1) * C_IN)[:, None] + k[None, :]
                        a = tl.load(x_frame + dt * x_frame_stride + offsets, mask=ok, other=0.0)
                        rows = (dt * 9 + dh * 3) * C_IN + k  # taps (dt, dh, 0..2) are consecutive rows
                        w = tl.load(w_ptr + rows[:, None] * C_OUT + c_out[None, :], mask=w_mask, other=0.0)
                        acc += tl.dot(a, w)
            else:
                c_in = tl.arange(0, C_IN)
                for dt in tl.static_range(3):
                    for dh in tl.static_range(3):
                        r = row + (dh - 1)
                        row_ok = inside & (r >= 0) & (r < height)
                        for dw in tl.static_range(3):
                            c = col + (dw - 1)
                            ok = row_ok & (c >= 0) & (c < width)
                            offsets = (r * width + c) * C_IN
                            a = tl.load(
                                x_frame + dt * x_frame_stride + offsets[:, None] + c_in[None, :],
                                mask=ok[:, None],
                                other=0.0,
                            )
                            tap = (dt * 9 + dh * 3 + dw) * C_IN
                            w = tl.load(w_ptr + (tap + c_in)[:, None] * C_OUT + c_out[None, :])
                            acc += tl.dot(a, w)
            if HAS_BIAS:
                acc += tl.load(b_ptr + c_out).to(tl.float32)[None, :]
            tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=inside[:, None])

    # A few tiles only: each configuration compiles once per layer shape (about a second each).
    configs = [
        triton.Config({"BLOCK_M": m, "ROW_TAPS": row_taps, "FRAMES": 1}, num_warps=warps)
        for m, warps in ((64, 4), (128, 4), (256, 8))
        for row_taps in (False, True)
    ]
    configs += [
        triton.Config({"BLOCK_M": m, "ROW_TAPS": True, "FRAMES": 4}, num_warps=warps)
        for m, warps in ((64, 4), (128, 4), (128, 8))
    ]
    # Tuned per output frame count too: a stream's first latent decodes 1 frame, later calls 4 per latent,
    # and a tile that suits the first (tuned first) leaves the grouped form unused for the others.
    tuned = triton.autotune(configs, key=["frames_out", "height", "width", "C_IN", "C_OUT"])(causal_conv3x3x3)
    return causal_conv3x3x3, tuned


def available() -> bool:
    """Whether Triton is installed and a kernel can run: on a CUDA GPU, or in the interpreter."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return interpreted() or torch.cuda.is_available()


def applies(joined: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel takes this convolution: a channels-last-3d bf16/fp16 input on a CUDA device
    (any device in the interpreter), a 3x3x3 kernel with channel counts in `PAYING_WIDTHS`."""
    c_out, c_in, *kernel = weight.shape
    return (
        joined.dim() == 5
        and (joined.is_cuda or interpreted())
        and joined.dtype in DTYPES
        and weight.dtype == joined.dtype
        and tuple(kernel) == (3, 3, 3)
        and (c_in, c_out) in PAYING_WIDTHS
        and joined.shape[1] == c_in
        and joined.shape[2] >= 3
        and _channels_last_strides(joined)
    )


def _channels_last_strides(x: torch.Tensor) -> bool:
    """Channels innermost, then width, then height (batch and frame strides are free)."""
    _, channels, _, height, width = x.shape
    return (
        x.stride(1) == 1
        and x.stride(4) == channels
        and x.stride(3) == width * channels
        and (x.stride(2) == height * width * channels)
    )


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[C_out, C_in, 3, 3, 3] -> [27 * C_in, C_out]: row (tap, input channel), taps in (t, h, w) order."""
    c_out, c_in = weight.shape[:2]
    return weight.permute(2, 3, 4, 1, 0).reshape(27 * c_in, c_out).contiguous()


def causal_conv3x3x3(
    joined: torch.Tensor,
    packed_weight: torch.Tensor,
    bias: torch.Tensor | None,
    block_m: int | None = None,
    row_taps: bool = False,
    frames_per_program: int = 1,
) -> torch.Tensor:
    """The valid-in-time, same-in-space 3x3x3 convolution of `joined` [B, C_in, T + 2, H, W]
    (channels-last-3d; `applies` must hold) -> [B, C_out, T, H, W] channels-last-3d, with the kernel
    packed by `pack_weight`. `block_m`, `row_taps` and `frames_per_program` (1, 2 or 4; above 1 each
    input row is read once for the output frames it serves, with `row_taps`) fix the kernel's tile
    and form (else autotuned on GPUs; 16 pixels, one frame, interpreted)."""
    batch, c_in, frames_in, height, width = joined.shape
    c_out = packed_weight.shape[1]
    if c_in not in WIDTHS or c_out not in WIDTHS:
        raise ValueError(f"the kernel takes {WIDTHS} channels in and out, got {c_in} -> {c_out}")
    if packed_weight.shape[0] != 27 * c_in:
        raise ValueError(f"packed kernel of shape {tuple(packed_weight.shape)} does not fit {c_in} input channels")
    if frames_per_program not in (1, 2, 4) or (frames_per_program > 1 and not row_taps):
        raise ValueError(f"frames_per_program must be 1, or 2 or 4 with row_taps, got {frames_per_program}")
    if frames_per_program > 1 and c_in > 32:
        # 64 channels: the tile's rows take 327,680 bytes of shared memory on an H100 (232,448 there)
        raise ValueError(f"frames_per_program above 1 takes at most 32 input channels, got {c_in}")
    frames = frames_in - 2
    shape = (batch, c_out, frames, height, width)  # allocated channels-last: no copy to get there
    out = torch.empty(shape, device=joined.device, dtype=joined.dtype, memory_format=torch.channels_last_3d)
    if out.numel() == 0:
        return out
    plain, tuned = _kernels()
    arguments = (
        joined,
        packed_weight,
        bias if bias is not None else packed_weight,
        out,
        frames,
        height,
        width,
        joined.stride(0),
        joined.stride(2),
        out.stride(0),
        out.stride(2),
    )
    constants = {"C_IN": c_in, "C_OUT": c_out, "HAS_BIAS": bias is not None}
    if block_m is None and not interpreted():
        grid = lambda meta: (_cdiv(height * width, meta["BLOCK_M"]), batch * _cdiv(frames, meta["FRAMES"]))  # noqa: E731
        tuned[grid](*arguments, **constants)
    else:
        block_m = block_m or 16
        grid = (_cdiv(height * width, block_m), batch * _cdiv(frames, frames_per_program))
        plain[grid](*arguments, **constants, BLOCK_M=block_m, ROW_TAPS=row_taps, FRAMES=frames_per_program)
    return out


def _cdiv(a: int, b: int) -> int:
    """Ceiling of a / b."""
    return -(-a // b)


def tuned_config() -> dict | None:
    """The autotuner's latest choice (tile and launch settings) for benchmark reports, or None."""
    best = getattr(_kernels()[1], "best_config", None)
    if best is None:
        return None
    return {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}
