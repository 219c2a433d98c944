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

from . import triton_dit

_enabled = False
_compiled: dict[Callable, Callable] = {}
_given_up: set[Callable] = set()
Fn = TypeVar("Fn", bound=Callable)


# Compilations allowed per fused function: each world configuration (batch size, resolution, cache
# fill during the first blocks) adds a few shapes; torch's default of 8 is reached by a process that
# runs several configurations, after which the function would run unfused.
RECOMPILE_LIMIT = 64


def enable_fusion(enabled: bool = True) -> None:
    """Route the fusable chains through `torch.compile` (first calls compile: tens of seconds).
    Raises torch's per-function recompilation limit to at least `RECOMPILE_LIMIT`."""
    global _enabled
    _enabled = enabled
    if enabled:
        raise_recompile_limit()


def raise_recompile_limit() -> None:
    """Raise torch's per-function recompilation limit to at least `RECOMPILE_LIMIT`."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the newer name, then the older one
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
            return


def fusion_enabled() -> bool:
    return _enabled


def fusable(fn: Fn | None = None, *, dynamic: bool | None = False, kernel: Callable | None = None) -> Fn:
    """Mark a pure tensor function as a fusion candidate. `dynamic` as for `torch.compile`: False
    compiles once per shape; None compiles shape-generic code once a second shape shows up (for
    functions called at many shapes, such as the decoder's layers at every resolution). `kernel`: the
    same function as a Triton kernel (`nn.triton_dit`), run where compiling is off, the kernels are
    switched on and it applies (it returns None where not)."""

    def decorate(fn: Fn) -> Fn:
        @functools.wraps(fn)
        def call(*args, **kwargs):
            if not _enabled or fn in _given_up:
                if kernel is not None and triton_dit.enabled():
                    out = kernel(*args, **kwargs)
                    if out is not None:
                        return out
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


@fusable(kernel=triton_dit.norm_modulate)
def norm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, num_frames: int, dtype: torch.dtype
) -> torch.Tensor:
    """LayerNorm (float32, no affine) of x [B, F*S, D], then x * (1 + scale) + shift per frame, cast to dtype."""
    batch, tokens, dim = x.shape
    h = F.layer_norm(x.float(), (dim,), None, None, eps).view(batch, num_frames, tokens // num_frames, dim)
    return (h * (1 + scale[:, :, None]) + shift[:, :, None]).view(batch, tokens, dim).to(dtype)


@fusable(kernel=triton_dit.gated_add)
def gated_add(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, num_frames: int) -> torch.Tensor:
    """x + y * gate per frame (x float32 [B, F*S, D], y any dtype, gate [B, F, D])."""
    batch, tokens, dim = x.shape
    update = y.float().view(batch, num_frames, tokens // num_frames, dim) * gate[:, :, None]
    return x + update.view(batch, tokens, dim)


@fusable(kernel=triton_dit.affine_norm)
def affine_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """LayerNorm in float32 with a learned affine, cast to dtype."""
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).to(dtype)


@fusable(kernel=triton_dit.rms_norm_rope)
def rms_norm_rope(
    t: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor, heads: int
) -> torch.Tensor:
    """RMS norm of t [B, L, D] (float32 math, result in t's dtype, times weight), split into heads
    [B, L, heads, D/heads] and rotated by RoPE (cos/sin [L, 1, D/heads/2])."""
    dtype = t.dtype
    normed = (t.float() * torch.rsqrt(t.float().pow(2).mean(dim=-1, keepdim=True) + eps)).to(dtype) * weight
    batch, length, dim = t.shape
    return rotate_pairs(normed.view(batch, length, heads, dim // heads).float(), cos, sin).to(dtype)


@fusable(kernel=triton_dit.rms_norm)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm over the last dim in float32, rounded to x's dtype, times weight (`attention.RMSNorm`)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype) * weight


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE: adjacent pairs of x's last dim (dims 2i, 2i+1 = real, imaginary) rotated by the angles
    whose cos/sin broadcast against x[..., ::2]; in x's dtype (callers pass float32)."""
    pairs = x.unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    return torch.stack((real * cos - imag * sin, imag * cos + real * sin), dim=-1).flatten(-2)


def channel_rms_norm_silu(
    x: torch.Tensor,
    gamma: torch.Tensor,
    scale: float,
    past: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """SiLU of the VAE's RMS norm of a video [B, C, T, H, W] over channels (x / max(|x|, 1e-12) *
    scale * gamma, gamma of C values), in at least float32 math, cast back to x's dtype; keeps x's
    memory layout (standard or channels-last-3d).

    With `past` [B, C, P, H, W] (a causal convolution's cached inputs, already normalised), returns
    cat([past, result], dim=2): on channels-last videos the join is written by the same kernel,
    so the convolution's input is never copied again. `bias` (C values) is added to x first: the
    bias of the convolution that made x, left out of it."""
    # The compiled kernel sees two canonical shapes whatever the resolution, frame count or width:
    # [N, C] rows (channels-last) or [B, C, L] (standard), so it compiles two or three times in all.
    # gamma goes in as a plain tensor: compiled code treats parameters' shapes as fixed.
    gamma = gamma.detach().reshape(-1)
    batch, channels, frames, height, width = x.shape
    channels_last = is_channels_last_video(x)  # adding the bias below keeps the layout
    if channels_last:
        # The channel count stays a constant of the kernel (one compilation per width): a reduction
        # of known length runs in one pass over registers instead of a loop over the channels.
        torch._dynamo.mark_static(gamma, 0)
    if past is not None and channels_last:
        past_rows = past.to(x.dtype).permute(0, 2, 3, 4, 1).contiguous()  # [B, P, H, W, C]
        rows = x.permute(0, 2, 3, 4, 1)  # a view: [B, T, H, W, C]
        for t in (past_rows, rows):
            torch._dynamo.mark_static(t, 4)
        joined = _past_and_rms_norm_silu(past_rows, rows, gamma, float(scale), _detached(bias))
        return joined.permute(0, 4, 1, 2, 3)
    if bias is not None:
        x = x + bias.view(-1, 1, 1, 1)
    if channels_last:
        rows = x.permute(0, 2, 3, 4, 1).reshape(-1, channels)  # a view: C is innermost
        torch._dynamo.mark_static(rows, 1)
        normed = _rms_norm_silu(rows, gamma, float(scale), -1)
        return normed.view(batch, frames, height, width, channels).permute(0, 4, 1, 2, 3)
    normed = _rms_norm_silu(x.contiguous().view(batch, channels, -1), gamma.view(-1, 1), float(scale), 1)
    normed = normed.view(x.shape)
    return normed if past is None else torch.cat([past.to(x.dtype), normed], dim=2)


def is_channels_last_video(x: torch.Tensor) -> bool:
    """True for a [B, C, T, H, W] tensor stored channels-last-3d (and not also standard-contiguous)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


@fusable(dynamic=True)
def _past_and_rms_norm_silu(
    past: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor, scale: float, bias: torch.Tensor | None
) -> torch.Tensor:
    """cat([past, SiLU(RMS norm of (x + bias) over its last dim)], dim=1) for [B, T, H, W, C] rows."""
    return torch.cat([past, _norm_silu(x, gamma, scale, -1, bias)], dim=1)


@fusable(dynamic=True)
def _rms_norm_silu(x: torch.Tensor, gamma: torch.Tensor, scale: float, dim: int) -> torch.Tensor:
    return _norm_silu(x, gamma, scale, dim)


def _norm_silu(
    x: torch.Tensor, gamma: torch.Tensor, scale: float, dim: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """SiLU(RMS norm of (x + bias) over `dim` * scale * gamma) in at least float32, cast to x's dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    if bias is not None:
        xf = xf + bias.to(xf.dtype)
    inverse_norm = xf.square().sum(dim=dim, keepdim=True).clamp_min(1e-24).rsqrt()
    return F.silu(xf * inverse_norm * scale * gamma.to(xf.dtype)).to(x.dtype)


@fusable
def residual_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + y in x's dtype: a branch's output (any dtype) added to the float32 residual stream. A
    narrower y is widened inside the add (one kernel, the same values) rather than copied first."""
    if torch.promote_types(x.dtype, y.dtype) == x.dtype:
        return x + y
    return x + y.to(x.dtype)


@fusable
def mouse_features(x: torch.Tensor, mouse: torch.Tensor, num_frames: int, dtype: torch.dtype) -> torch.Tensor:
    """The mouse MLP's input: tokens x [B, F*S, D] beside their frame's flattened mouse window
    mouse [B, F, M], as [B, F, S, D + M] in dtype."""
    batch, tokens, dim = x.shape
    spatial = tokens // num_frames
    per_token = mouse.to(dtype)[:, :, None, :].expand(batch, num_frames, spatial, mouse.shape[-1])
    return torch.cat([x.to(dtype).view(batch, num_frames, spatial, dim), per_token], dim=-1)


def _normalize_rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm over the last dim (no weight), then RoPE on adjacent pairs; float32 math, t's dtype out."""
    tf = t.float()
    return rotate_pairs(tf * torch.rsqrt(tf.pow(2).mean(dim=-1, keepdim=True) + eps), cos, sin).to(t.dtype)


@fusable(kernel=triton_dit.mouse_temporal_qkv)
def mouse_temporal_qkv(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mouse branch's temporal attention inputs: qkv [B, F, S, 3, heads, hd] -> q, k (RMS-normalised
    per head, rotated by their frame's RoPE, cos/sin [F, 1, hd/2]) and v, each [B*S, F, heads, hd]:
    one time sequence per spatial location."""
    batch, frames, spatial, _, heads, head_dim = qkv.shape
    per_location = qkv.permute(0, 2, 1, 3, 4, 5).reshape(batch * spatial, frames, 3, heads, head_dim)
    q, k, v = per_location.unbind(dim=2)
    return _normalize_rotate(q, cos, sin, eps), _normalize_rotate(k, cos, sin, eps), v.contiguous()


@fusable(kernel=triton_dit.keyboard_queries)
def keyboard_queries(
    q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float, num_frames: int, heads: int
) -> torch.Tensor:
    """The keyboard branch's queries: q [B, F*S, heads*hd] RMS-normalised per head and rotated by
    their frame's RoPE (cos/sin [F, 1, hd/2]) -> [B, F*S, heads, hd]."""
    batch, tokens, width = q.shape
    per_frame = q.view(batch, num_frames, tokens // num_frames, heads, width // heads)
    rotated = _normalize_rotate(per_frame, cos[None, :, None], sin[None, :, None], eps)
    return rotated.view(batch, tokens, heads, width // heads)


def _few_key_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5
    if torch.compiler.is_compiling():
        # Broadcast products and sums: compiled into reductions that read q once, where a batched
        # matrix product with a handful of columns runs far below the chip's rate.
        scores = (q.float()[:, :, None] * k.float()[:, None]).sum(dim=-1) * scale  # [B, Lq, Lk, heads]
        weights = scores.softmax(dim=2)
        return (weights[..., None] * v.float()[:, None]).sum(dim=2).to(q.dtype)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v.float()).to(q.dtype)


@fusable(kernel=triton_dit.few_key_attention)
def few_key_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention of q [B, Lq, heads, hd] over a few keys k, v [B, Lk, heads, hd], in float32
    math. Attention kernels tile keys by 64 or more; with a handful of keys, two small products and
    a softmax do the same work without the padding."""
    return _few_key_attention(q, k, v)


@fusable(kernel=triton_dit.temporal_attention)
def temporal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: int) -> torch.Tensor:
    """The mouse branch's attention over time at each location: q [B*S, F, heads, hd] over k, v
    [B*S, L, heads, hd] -> [B, F*S, heads*hd] with tokens back in (frame, location) order."""
    return tokens_of_locations(_few_key_attention(q, k, v), batch)


def tokens_of_locations(out: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-location sequences [B*S, F, heads, hd] back to tokens [B, F*S, heads*hd] in (frame, location) order."""
    locations, frames, heads, head_dim = out.shape
    spatial = locations // batch
    out = out.reshape(batch, spatial, frames, heads * head_dim).transpose(1, 2)
    return out.reshape(batch, frames * spatial, heads * head_dim)


def channel_bias_add(
    h: torch.Tensor, bias: torch.Tensor | None, skip: torch.Tensor, skip_bias: torch.Tensor | None
) -> torch.Tensor:
    """h + bias + skip + skip_bias for videos [B, C, T, H, W] and per-channel biases (None = none): a
    residual block's output when its convolutions ran without their biases. One pass on channels-last
    videos when fusion is enabled; keeps h's layout."""
    if is_channels_last_video(h) and is_channels_last_video(skip):
        rows = _bias_add_rows(
            h.permute(0, 2, 3, 4, 1), _detached(bias), skip.permute(0, 2, 3, 4, 1), _detached(skip_bias)
        )
        return rows.permute(0, 4, 1, 2, 3)
    for b in (bias, skip_bias):
        if b is not None:
            h = h + b.view(-1, 1, 1, 1)
    return h + skip


@fusable(dynamic=True)
def _bias_add_rows(
    h: torch.Tensor, bias: torch.Tensor | None, skip: torch.Tensor, skip_bias: torch.Tensor | None
) -> torch.Tensor:
    """h + bias + skip + skip_bias on [B, T, H, W, C] rows, in at least float32, cast to h's dtype."""
    wide = torch.promote_types(h.dtype, torch.float32)
    out = h.to(wide) + skip.to(wide)
    for b in (bias, skip_bias):
        if b is not None:
            out = out + b.to(out.dtype)
    return out.to(h.dtype)
