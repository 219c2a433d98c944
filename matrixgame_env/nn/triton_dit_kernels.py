"""The Triton kernels of `nn.triton_dit` (this module imports Triton: load it only where Triton is
installed; `triton_dit` does so on first use). Each program takes BLOCK_R token rows of D values."""

import triton
import triton.language as tl


@triton.jit
def token_tile(rows, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    # Rows pid*BLOCK_R .. of a contiguous [rows, D] tensor: row indices, columns, masks, offsets.
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    column_ok = d < D
    mask = (r < rows)[:, None] & column_ok[None, :]
    return r, d, column_ok, mask, r[:, None] * D + d[None, :]


@triton.jit
def layer_normed_tile(x_ptr, rows, eps, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    # The program's rows of x, LayerNorm-ed without affine (biased variance, as torch's), in float32.
    r, d, column_ok, mask, offsets = token_tile(rows, D, BLOCK_D, BLOCK_R)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    centred = tl.where(mask, x - mean[:, None], 0.0)
    variance = tl.sum(centred * centred, axis=1) / D
    return r, d, column_ok, mask, offsets, centred / tl.sqrt(variance + eps)[:, None]


@triton.jit
def norm_modulate_rows(
    x_ptr,
    shift_ptr,
    scale_ptr,
    y_ptr,
    rows,
    tokens,
    frame_tokens,
    shift_batch_stride,
    shift_frame_stride,
    scale_batch_stride,
    scale_frame_stride,
    eps,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    r, d, column_ok, mask, offsets, h = layer_normed_tile(x_ptr, rows, eps, D, BLOCK_D, BLOCK_R)
    batch = r // tokens
    frame = (r % tokens) // frame_tokens
    at = d[None, :]
    scale = tl.load(scale_ptr + (batch * scale_batch_stride + frame * scale_frame_stride)[:, None] + at, mask=mask)
    shift = tl.load(shift_ptr + (batch * shift_batch_stride + frame * shift_frame_stride)[:, None] + at, mask=mask)
    y = h * (1 + scale.to(tl.float32)) + shift.to(tl.float32)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gated_add_rows(
    x_ptr,
    y_ptr,
    gate_ptr,
    out_ptr,
    rows,
    tokens,
    frame_tokens,
    gate_batch_stride,
    gate_frame_stride,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    r, d, column_ok, mask, offsets = token_tile(rows, D, BLOCK_D, BLOCK_R)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    gate_row = (r // tokens) * gate_batch_stride + ((r % tokens) // frame_tokens) * gate_frame_stride
    gate = tl.load(gate_ptr + gate_row[:, None] + d[None, :], mask=mask).to(tl.float32)
    tl.store(out_ptr + offsets, (x + y * gate).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def affine_norm_rows(
    x_ptr,
    weight_ptr,
    bias_ptr,
    y_ptr,
    rows,
    eps,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    r, d, column_ok, mask, offsets, h = layer_normed_tile(x_ptr, rows, eps, D, BLOCK_D, BLOCK_R)
    weight = tl.load(weight_ptr + d, mask=column_ok, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + d, mask=column_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offsets, (h * weight[None, :] + bias[None, :]).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rms_norm_rope_rows(
    t_ptr,
    weight_ptr,
    cos_ptr,
    sin_ptr,
    y_ptr,
    rows,
    heads,
    frames,
    locations,
    head_stride,
    frame_stride,
    location_stride,
    batch_stride,
    angle_div,
    angle_mod,
    rotation_stride,
    eps,
    W: tl.constexpr,
    PAIRS_PER_HEAD: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    ROUND_NORMED: tl.constexpr,
    ROUND_PRODUCT: tl.constexpr,
    HAS_ROPE: tl.constexpr,
):
    # Output row r (W contiguous values, normalised together) reads input row
    # (r % heads, r // heads % frames, r // (heads * frames) % locations, r // (heads * frames * locations))
    # through the given strides; its values are pairs (2j, 2j+1) = (real, imaginary), rotated by
    # angle row (r // angle_div) % angle_mod, pair j % PAIRS_PER_HEAD.
    # A row's W values are read and written as one contiguous run (vectorised), split into pairs in registers.
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    j = tl.arange(0, BLOCK_P)
    v = tl.arange(0, 2 * BLOCK_P)
    pair_ok = j < W // 2
    row_ok = r < rows
    mask = row_ok[:, None] & pair_ok[None, :]
    value_mask = row_ok[:, None] & (v < W)[None, :]
    per_frame = r // heads
    per_location = per_frame // frames
    source = (
        (r % heads) * head_stride
        + (per_frame % frames) * frame_stride
        + (per_location % locations) * location_stride
        + (per_location // locations) * batch_stride
    )
    values = tl.load(t_ptr + source[:, None] + v[None, :], mask=value_mask, other=0.0).to(tl.float32)
    real, imag = tl.split(tl.reshape(values, (BLOCK_R, BLOCK_P, 2)))
    inverse_rms = 1.0 / tl.sqrt((tl.sum(real * real, axis=1) + tl.sum(imag * imag, axis=1)) / W + eps)
    real = real * inverse_rms[:, None]
    imag = imag * inverse_rms[:, None]
    dtype = t_ptr.dtype.element_ty
    if ROUND_NORMED:  # as the DiT's chain: rounded to t's dtype before the weight
        real = real.to(dtype).to(tl.float32)
        imag = imag.to(dtype).to(tl.float32)
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + v, mask=v < W, other=0.0).to(tl.float32)
        weight_real, weight_imag = tl.split(tl.reshape(weight, (BLOCK_P, 2)))
        real = real * weight_real[None, :]
        imag = imag * weight_imag[None, :]
    if ROUND_PRODUCT:  # the product stays in t's dtype there
        real = real.to(dtype).to(tl.float32)
        imag = imag.to(dtype).to(tl.float32)
    if HAS_ROPE:
        angle = ((r // angle_div) % angle_mod * rotation_stride)[:, None] + (j % PAIRS_PER_HEAD)[None, :]
        cos = tl.load(cos_ptr + angle, mask=mask, other=1.0)
        sin = tl.load(sin_ptr + angle, mask=mask, other=0.0)
        real, imag = real * cos - imag * sin, imag * cos + real * sin
    out = tl.reshape(tl.join(real, imag), (BLOCK_R, 2 * BLOCK_P))
    tl.store(y_ptr + r[:, None] * W + v[None, :], out.to(y_ptr.dtype.element_ty), mask=value_mask)


@triton.jit
def few_key_attention_rows(
    q_ptr,
    k_ptr,
    v_ptr,
    y_ptr,
    rows,
    heads,
    queries,
    q_batch_stride,
    q_query_stride,
    q_head_stride,
    k_batch_stride,
    k_key_stride,
    k_head_stride,
    v_batch_stride,
    v_key_stride,
    v_head_stride,
    scale,
    KEYS: tl.constexpr,
    HD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # Row r = query (b, i, h) of a contiguous [B, Lq, heads, HD] output: softmax over the KEYS keys of
    # (b, h), taken one at a time with a running maximum (float32 throughout). KEYS is a compile-time
    # bound (at most `attention.FEW_KEYS` variants); Triton's interpreter cannot loop to a runtime one
    # under NumPy 2.5.
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    mask = (r < rows)[:, None] & (d < HD)[None, :]
    head = r % heads
    query = (r // heads) % queries
    batch = r // heads // queries
    q = tl.load(q_ptr + (batch * q_batch_stride + query * q_query_stride + head * q_head_stride)[:, None] + d[None, :],
                mask=mask, other=0.0).to(tl.float32)  # fmt: skip
    k_row = batch * k_batch_stride + head * k_head_stride
    v_row = batch * v_batch_stride + head * v_head_stride
    best = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    for j in range(0, KEYS):
        key = tl.load(k_ptr + (k_row + j * k_key_stride)[:, None] + d[None, :], mask=mask, other=0.0)
        score = tl.sum(q * key.to(tl.float32), axis=1) * scale
        new_best = tl.maximum(best, score)
        fade = tl.exp(best - new_best)
        weight = tl.exp(score - new_best)
        value = tl.load(v_ptr + (v_row + j * v_key_stride)[:, None] + d[None, :], mask=mask, other=0.0)
        acc = acc * fade[:, None] + weight[:, None] * value.to(tl.float32)
        total = total * fade + weight
        best = new_best
    out = acc / total[:, None]
    tl.store(y_ptr + r[:, None] * HD + d[None, :], out.to(y_ptr.dtype.element_ty), mask=mask)
