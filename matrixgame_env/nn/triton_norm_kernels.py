"""The Triton kernels of `nn.triton_norm` (this module imports Triton: load it only where Triton is
installed; `triton_norm` does so on first use)."""

import triton
import triton.language as tl


@triton.jit
def row_tile(rows, C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    # Program (m, b): rows m*BLOCK_R .. of batch element b; row r holds channels r*C .. r*C + C - 1.
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    channel_ok = c < C
    mask = (r < rows)[:, None] & channel_ok[None, :]
    return tl.program_id(1).to(tl.int64), c, channel_ok, mask, r[:, None].to(tl.int64) * C + c[None, :]


@triton.jit
def norm_silu_rows(
    x_ptr,
    gamma_ptr,
    bias_ptr,
    y_ptr,
    rows,
    x_batch_stride,
    y_batch_stride,
    y_offset,
    scale,
    C: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    batch, c, channel_ok, mask, offsets = row_tile(rows, C, BLOCK_C, BLOCK_R)
    x = tl.load(x_ptr + batch * x_batch_stride + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + c, mask=channel_ok, other=0.0).to(tl.float32)[None, :]
        x = tl.where(mask, x, 0.0)
    # x / max(|x|, 1e-12): the reciprocal square root of the sum of squares clamped at 1e-24
    inverse_norm = 1.0 / tl.sqrt(tl.maximum(tl.sum(x * x, axis=1), 1e-24))
    gamma = tl.load(gamma_ptr + c, mask=channel_ok, other=0.0).to(tl.float32)
    y = x * inverse_norm[:, None] * scale * gamma[None, :]
    y = y * tl.sigmoid(y)
    tl.store(y_ptr + y_offset + batch * y_batch_stride + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bias_add_rows(
    h_ptr,
    bias_ptr,
    skip_ptr,
    skip_bias_ptr,
    y_ptr,
    rows,
    h_batch_stride,
    skip_batch_stride,
    y_batch_stride,
    C: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SKIP_BIAS: tl.constexpr,
):
    batch, c, channel_ok, mask, offsets = row_tile(rows, C, BLOCK_C, BLOCK_R)
    out = tl.load(h_ptr + batch * h_batch_stride + offsets, mask=mask, other=0.0).to(tl.float32)
    out += tl.load(skip_ptr + batch * skip_batch_stride + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        out += tl.load(bias_ptr + c, mask=channel_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SKIP_BIAS:
        out += tl.load(skip_bias_ptr + c, mask=channel_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + batch * y_batch_stride + offsets, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def copy_batch_rows(src_ptr, dst_ptr, n, src_batch_stride, dst_batch_stride, BLOCK: tl.constexpr):
    # Program (m, b): values m*BLOCK .. of batch element b, contiguous in both tensors.
    batch = tl.program_id(1).to(tl.int64)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = i < n
    values = tl.load(src_ptr + batch * src_batch_stride + i, mask=inside)
    tl.store(dst_ptr + batch * dst_batch_stride + i, values, mask=inside)


@triton.jit
def upsample_nearest2x_rows(
    x_ptr,
    y_ptr,
    out_pixels,
    out_width,
    x_image_stride,
    x_row_stride,
    y_image_stride,
    C: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # Program (m, n): output pixels m*BLOCK_R .. of image n, each the input pixel (row // 2, col // 2);
    # channels innermost in both (input pixels C apart, rows x_row_stride apart).
    image, c, channel_ok, mask, _ = row_tile(out_pixels, C, BLOCK_C, BLOCK_R)
    p = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    source = (p // out_width // 2) * x_row_stride + (p % out_width // 2) * C
    values = tl.load(x_ptr + image * x_image_stride + source[:, None] + c[None, :], mask=mask)
    tl.store(y_ptr + image * y_image_stride + p[:, None] * C + c[None, :], values, mask=mask)
