"""The DiT's elementwise chains as Triton kernels (GPUs, inference).

Around its matrix products every DiT block runs short chains over its tokens: a LayerNorm in float32
followed by the per-frame modulation, the gated residual add, the affine LayerNorm before the cross
attention and its query norm, and the RMS norm of q and k followed by RoPE (in the action modules
too: the keyboard's queries, the mouse branch's temporal q and k, then their attention over a few
keys, which torch runs as two small products and a softmax). Eagerly each chain is 3 to 15 kernels,
each a pass over all tokens (the RMS norms with RoPE the most: casts, squares, a mean, products, the
rotation's pairs); `torch.compile` fuses them (`fast="compile"`) but compiles again for every new
batch size. These kernels run each chain in one pass, for any shape: a program takes BLOCK_R rows of
values. The same functions as `nn.fusion`'s `norm_modulate`, `gated_add`, `affine_norm`, `rms_norm`,
`rms_norm_rope`, `keyboard_queries`, `mouse_temporal_qkv`, `few_key_attention` and
`temporal_attention` up to float32 rounding (rounded to the model's dtype where those chains round).

Used by a sampler whose `dit_kernels` is on, which the fast path sets on GPUs with Triton
(`world.model.enable_fast_path`), or everywhere once switched on process-wide (`set_enabled`; off by
default). Measured on an H200, 1.26-1.27x the steps/s of doom-small's vector env at 16 and 64 worlds
and 1.39-1.59x the full-size model's end-to-end fps at batch 1 (benchmarks/NOTES.md).
Each function returns None where it does not apply (CPU tensors outside Triton's interpreter, tensors
that need gradients, other dtypes or layouts); `nn.fusion` then runs the eager chain.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator

import torch

from .triton_conv import _cdiv, available, interpreted

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BLOCK_ELEMENTS = 4096  # values a program handles: BLOCK_R rows of D values (D rounded up to a power of 2)
# `rms_norm_rope_rows` keeps a row's pairs and their int64 offsets in registers: with 4096 values over 4
# warps it took 255 registers and spilled at doom-small's widths (64 and 256 values a row; sm_90,
# `cuobjdump -res-usage`), 73 us a call at 64 worlds on an H100. 1024 pairs over 8 warps: 32-72
# registers, no spills, at widths 64, 256 and 1536.
ROPE_PAIRS = 1024
ROPE_WARPS = 8
_enabled = False
_within = threading.local()  # `switched`'s choice for the calling thread, where one is active


@functools.cache
def _kernels():
    """The jitted kernels (`nn.triton_dit_kernels`), imported on first use: Triton loads lazily."""
    from . import triton_dit_kernels as kernels

    return kernels


def set_enabled(enabled: bool = True) -> None:
    """Process-wide switch (as `nn.fusion.enable_fusion`): on, the DiT's chains run these kernels wherever
    they apply (CUDA tensors without gradients, Triton installed); off, the eager chains (the default).
    A sampler's own choice (`StreamingSampler.dit_kernels`, which `fast=True` sets) takes precedence
    within its blocks."""
    global _enabled
    _enabled = bool(enabled)


def enabled() -> bool:
    """Whether the kernels run here: `switched`'s choice where one is active, else the process-wide switch."""
    chosen = getattr(_within, "enabled", None)
    return _enabled if chosen is None else chosen


@contextlib.contextmanager
def switched(enabled: bool | None) -> Iterator[None]:
    """Within the block (and this thread), the kernels on or off as `enabled` says; None leaves the
    process-wide switch in charge."""
    before = getattr(_within, "enabled", None)
    _within.enabled = before if enabled is None else bool(enabled)
    try:
        yield
    finally:
        _within.enabled = before


def _applies(*tensors: torch.Tensor) -> bool:
    """CUDA (or, in the interpreter, any) tensors of a supported dtype that need no gradient, Triton there."""
    if torch.compiler.is_compiling() or not available():
        return False
    grad = torch.is_grad_enabled()
    return all((t.is_cuda or interpreted()) and t.dtype in DTYPES and not (grad and t.requires_grad) for t in tensors)


def _row_launch(width: int, rows: int, elements: int = BLOCK_ELEMENTS) -> tuple[int, int, tuple[int]]:
    """(BLOCK_D, BLOCK_R, grid) for `rows` rows of `width` values, about `elements` values a program."""
    block_d = 1 << max(width - 1, 0).bit_length()
    block_r = max(1, elements // block_d)
    if interpreted():
        block_r = min(block_r, 8)
    return block_d, block_r, (_cdiv(rows, block_r),)


def _per_frame(mod: torch.Tensor, batch: int, num_frames: int, dim: int) -> bool:
    """Whether `mod` is a [B, F, D] tensor of per-frame values whose rows are contiguous."""
    return mod.shape == (batch, num_frames, dim) and mod.stride(2) == 1


def norm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, num_frames: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """`nn.fusion.norm_modulate` in one kernel, or None where it does not apply."""
    if x.dim() != 3 or dtype not in DTYPES or not _applies(x, shift, scale):
        return None
    batch, tokens, dim = x.shape
    if tokens % num_frames or not (
        _per_frame(shift, batch, num_frames, dim) and _per_frame(scale, batch, num_frames, dim)
    ):
        return None
    x = x.contiguous()  # (the DiT's first layer gets its tokens transposed from the patch embedding)
    out = torch.empty(x.shape, device=x.device, dtype=dtype)
    rows = batch * tokens
    if rows == 0:
        return out
    block_d, block_r, grid = _row_launch(dim, rows)
    _kernels().norm_modulate_rows[grid](
        x, shift, scale, out, rows, tokens, tokens // num_frames,
        shift.stride(0), shift.stride(1), scale.stride(0), scale.stride(1), float(eps),
        D=dim, BLOCK_D=block_d, BLOCK_R=block_r,
    )  # fmt: skip
    return out


def gated_add(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, num_frames: int) -> torch.Tensor | None:
    """`nn.fusion.gated_add` in one kernel (a new contiguous tensor in x's dtype), or None where it does not
    apply. Inputs in other layouts are copied first (each kernel writes contiguous tokens)."""
    if x.dim() != 3 or y.shape != x.shape:
        return None
    batch, tokens, dim = x.shape
    if tokens % num_frames or not _per_frame(gate, batch, num_frames, dim) or not _applies(x, y, gate):
        return None
    if torch.promote_types(x.dtype, torch.float32) != x.dtype:  # the eager add promotes x to float32
        return None
    x, y = x.contiguous(), y.contiguous()
    out = torch.empty_like(x)
    rows = batch * tokens
    if rows == 0:
        return out
    block_d, block_r, grid = _row_launch(dim, rows)
    _kernels().gated_add_rows[grid](
        x, y, gate, out, rows, tokens, tokens // num_frames, gate.stride(0), gate.stride(1),
        D=dim, BLOCK_D=block_d, BLOCK_R=block_r,
    )  # fmt: skip
    return out


def affine_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, dtype: torch.dtype
) -> torch.Tensor | None:
    """`nn.fusion.affine_norm` in one kernel, or None where it does not apply."""
    dim = x.shape[-1] if x.dim() else 0
    if dtype not in DTYPES or weight.numel() != dim or bias.numel() != dim or not _applies(x, weight, bias):
        return None
    x = x.contiguous()
    out = torch.empty(x.shape, device=x.device, dtype=dtype)
    rows = x.numel() // dim if dim else 0
    if rows == 0:
        return out
    block_d, block_r, grid = _row_launch(dim, rows)
    _kernels().affine_norm_rows[grid](
        x, weight.detach().reshape(-1).contiguous(), bias.detach().reshape(-1).contiguous(), out, rows, float(eps),
        D=dim, BLOCK_D=block_d, BLOCK_R=block_r,
    )  # fmt: skip
    return out


def _angles_fit(cos: torch.Tensor, sin: torch.Tensor, length: int, pairs: int) -> bool:
    """Whether cos/sin are [length, 1, pairs] float32 with contiguous rows and the same strides."""
    return all(
        a.shape == (length, 1, pairs) and a.dtype == torch.float32 and a.stride(2) == 1 for a in (cos, sin)
    ) and cos.stride(0) == sin.stride(0)


def _rms_rope(
    source: torch.Tensor,
    out: torch.Tensor,
    weight: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    eps: float,
    layout: tuple[int, int, int, int, int, int, int],
    angle_div: int,
    angle_mod: int,
    pairs_per_head: int,
    round_normed: bool = False,
) -> None:
    """Launch `rms_norm_rope_rows` over `out`'s rows of W = out.shape[-1] values. layout: (heads, frames,
    locations, and the head, frame, location and batch strides) by which output rows read `source`;
    cos/sin None: no rotation."""
    width = out.shape[-1]
    rows = out.numel() // width
    if rows == 0:
        return
    dtype = source.dtype
    round_product = weight is not None and dtype != torch.float32 and torch.promote_types(dtype, weight.dtype) == dtype
    block_p, block_r, grid = _row_launch(width // 2, rows, ROPE_PAIRS)
    has_weight, has_rope = weight is not None, cos is not None
    weight = weight.detach().reshape(-1).contiguous() if has_weight else source
    cos, sin = (cos, sin) if has_rope else (source, source)  # (not read)
    _kernels().rms_norm_rope_rows[grid](
        source, weight, cos, sin, out, rows, *layout, angle_div, angle_mod, cos.stride(0) if has_rope else 0,
        float(eps), W=width, PAIRS_PER_HEAD=pairs_per_head, BLOCK_P=block_p, BLOCK_R=block_r,
        HAS_WEIGHT=has_weight, ROUND_NORMED=round_normed and dtype != torch.float32,
        ROUND_PRODUCT=round_product, HAS_ROPE=has_rope, num_warps=ROPE_WARPS,
    )  # fmt: skip


def rms_norm_rope(
    t: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor, heads: int
) -> torch.Tensor | None:
    """`nn.fusion.rms_norm_rope` in one kernel ([B, L, heads, D/heads] in t's dtype), or None where it
    does not apply (cos/sin must be [L, 1, D/heads/2] float32 with contiguous rows)."""
    if t.dim() != 3 or not _applies(t, weight, cos, sin):
        return None
    batch, length, dim = t.shape
    if dim % (2 * heads) or weight.numel() != dim or not _angles_fit(cos, sin, length, dim // heads // 2):
        return None
    t = t.contiguous()
    out = torch.empty((batch, length, heads, dim // heads), device=t.device, dtype=t.dtype)
    flat = out.view(batch, length, dim)  # rows of D values, normalised together
    _rms_rope(t, flat, weight, cos, sin, eps, (1, 1, 1, 0, 0, 0, dim), 1, length, dim // heads // 2, True)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """`nn.fusion.rms_norm` (the cross attention's query norm) in one kernel, or None where it does not apply."""
    width = x.shape[-1] if x.dim() else 0
    if width % 2 or weight.numel() != width or not _applies(x, weight):
        return None
    dtype = torch.promote_types(x.dtype, weight.dtype)  # the eager product's
    if dtype not in DTYPES:
        return None
    x = x.contiguous()
    out = torch.empty(x.shape, device=x.device, dtype=dtype)
    _rms_rope(x, out, weight, None, None, eps, (1, 1, 1, 0, 0, 0, width), 1, 1, 1, True)
    return out


def keyboard_queries(
    q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float, num_frames: int, heads: int
) -> torch.Tensor | None:
    """`nn.fusion.keyboard_queries` in one kernel, or None where it does not apply."""
    if q.dim() != 3 or not _applies(q, cos, sin):
        return None
    batch, tokens, width = q.shape
    if tokens % num_frames or width % (2 * heads) or not _angles_fit(cos, sin, num_frames, width // heads // 2):
        return None
    q = q.contiguous()
    head_dim = width // heads
    out = torch.empty((batch, tokens, heads, head_dim), device=q.device, dtype=q.dtype)
    spatial = tokens // num_frames  # rows of one head; a token's frame picks its angles
    _rms_rope(q, out, None, cos, sin, eps, (1, 1, 1, 0, 0, 0, head_dim), heads * spatial, num_frames, head_dim // 2)
    return out


def mouse_temporal_qkv(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """`nn.fusion.mouse_temporal_qkv`: q and k gathered into [B*S, F, heads, hd], normalised and rotated
    in one kernel each, v gathered by one copy; or None where it does not apply."""
    if qkv.dim() != 6 or qkv.shape[3] != 3 or qkv.stride(5) != 1 or not _applies(qkv, cos, sin):
        return None
    batch, frames, spatial, _, heads, head_dim = qkv.shape
    if head_dim % 2 or not _angles_fit(cos, sin, frames, head_dim // 2):
        return None
    strides = qkv.stride()
    layout = (heads, frames, spatial, strides[4], strides[1], strides[2], strides[0])
    results = []
    for which in (0, 1):
        out = torch.empty((batch * spatial, frames, heads, head_dim), device=qkv.device, dtype=qkv.dtype)
        _rms_rope(qkv[:, :, :, which], out, None, cos, sin, eps, layout, heads, frames, head_dim // 2)
        results.append(out)
    v = qkv[:, :, :, 2].permute(0, 2, 1, 3, 4).reshape(batch * spatial, frames, heads, head_dim)
    return results[0], results[1], v.contiguous()


def few_key_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """`nn.fusion.few_key_attention` in one kernel (a contiguous [B, Lq, heads, hd] in q's dtype), or
    None where it does not apply."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or not _applies(q, k, v):
        return None
    batch, queries, heads, head_dim = q.shape
    if k.shape[0] != batch or k.shape[2:] != (heads, head_dim) or k.shape[1] == 0:
        return None
    if q.stride(3) != 1 or k.stride(3) != 1 or v.stride(3) != 1:
        return None
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    rows = batch * queries * heads
    if rows == 0:
        return out
    block_d, block_r, grid = _row_launch(head_dim, rows)
    _kernels().few_key_attention_rows[grid](
        q, k, v, out, rows, heads, queries, q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), head_dim**-0.5,
        KEYS=k.shape[1], HD=head_dim, BLOCK_D=block_d, BLOCK_R=block_r,
    )  # fmt: skip
    return out


def temporal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: int) -> torch.Tensor | None:
    """`nn.fusion.temporal_attention` with its attention in one kernel, or None where it does not apply."""
    from .fusion import tokens_of_locations  # (fusion imports this module)

    out = few_key_attention(q, k, v)  # [B*S, F, heads, hd]
    return None if out is None else tokens_of_locations(out, batch)
