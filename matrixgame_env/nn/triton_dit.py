"""The DiT's elementwise chains as Triton kernels (GPUs, inference).

Around its matrix products every DiT block runs short chains over its tokens: a LayerNorm in float32
followed by the per-frame modulation, the gated residual add, the affine LayerNorm before the cross
attention, and the RMS norm of q and k followed by RoPE. Eagerly each chain is 3 to 12 kernels, each a
pass over all tokens (the RMS norm and RoPE of q and k the most: casts, squares, a mean, products,
the rotation's pairs); `torch.compile` fuses them (`fast="compile"`) but compiles again for every new
batch size. These kernels run each chain in one pass, for any shape: a program takes BLOCK_R tokens'
rows of D values. The same functions as `nn.fusion`'s `norm_modulate`, `gated_add`, `affine_norm`
and `rms_norm_rope` up to float32 rounding (rounded to the model's dtype where those chains round).

Off by default (`set_enabled`) until measured on a GPU. Each function returns None where it does not
apply (CPU tensors outside Triton's interpreter, tensors that need gradients, other dtypes or
layouts); `nn.fusion` then runs the eager chain.
"""

from __future__ import annotations

import functools

import torch

from .triton_conv import _cdiv, available, interpreted

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BLOCK_ELEMENTS = 4096  # values a program handles: BLOCK_R rows of D values (D rounded up to a power of 2)
_enabled = False


@functools.cache
def _kernels():
    """The jitted kernels (`nn.triton_dit_kernels`), imported on first use: Triton loads lazily."""
    from . import triton_dit_kernels as kernels

    return kernels


def set_enabled(enabled: bool = True) -> None:
    """Process-wide switch (as `nn.fusion.enable_fusion`): on, the DiT's chains run these kernels wherever
    they apply (CUDA tensors without gradients, Triton installed); off, the eager chains (the default)."""
    global _enabled
    _enabled = bool(enabled)


def enabled() -> bool:
    return _enabled


def _applies(*tensors: torch.Tensor) -> bool:
    """CUDA (or, in the interpreter, any) tensors of a supported dtype that need no gradient, Triton there."""
    if torch.compiler.is_compiling() or not available():
        return False
    grad = torch.is_grad_enabled()
    return all((t.is_cuda or interpreted()) and t.dtype in DTYPES and not (grad and t.requires_grad) for t in tensors)


def _row_launch(width: int, rows: int) -> tuple[int, int, tuple[int]]:
    """(BLOCK_D, BLOCK_R, grid) for `rows` rows of `width` values."""
    block_d = 1 << max(width - 1, 0).bit_length()
    block_r = max(1, BLOCK_ELEMENTS // block_d)
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


def rms_norm_rope(
    t: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor, heads: int
) -> torch.Tensor | None:
    """`nn.fusion.rms_norm_rope` in one kernel ([B, L, heads, D/heads] in t's dtype), or None where it
    does not apply (cos/sin must be [L, 1, D/heads/2] float32 with contiguous rows)."""
    if t.dim() != 3 or not _applies(t, weight, cos, sin):
        return None
    batch, length, dim = t.shape
    if dim % (2 * heads) or weight.numel() != dim:
        return None
    pairs = dim // heads // 2
    for angles in (cos, sin):
        if angles.shape != (length, 1, pairs) or angles.dtype != torch.float32 or angles.stride(2) != 1:
            return None
    if cos.stride(0) != sin.stride(0):
        return None
    t = t.contiguous()
    out = torch.empty((batch, length, heads, dim // heads), device=t.device, dtype=t.dtype)
    rows = batch * length
    if rows == 0:
        return out
    block_p, block_r, grid = _row_launch(dim // 2, rows)
    round_product = t.dtype != torch.float32 and torch.promote_types(t.dtype, weight.dtype) == t.dtype
    _kernels().rms_norm_rope_rows[grid](
        t, weight.detach().reshape(-1).contiguous(), cos, sin, out, rows, length, cos.stride(0), float(eps),
        D=dim, PAIRS_PER_HEAD=pairs, BLOCK_P=block_p, BLOCK_R=block_r, ROUND_PRODUCT=round_product,
    )  # fmt: skip
    return out
