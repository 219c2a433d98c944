"""The causal diffusion transformer of Matrix-Game 2.0 (a Wan-style DiT with action modules).

Parameter names follow the official `CausalWanModel`, so official checkpoints load strictly.
The residual stream is kept in float32; matrix products run in the weights' dtype (bf16 on GPU).

Shapes (universal, 352x640): latents [B, 16, F, 44, 80] + conditions [B, 20, F, 44, 80]
-> patches [B, F*880, 1536] -> 30 blocks -> head [B, F*880, 64] -> flow [B, 16, F, 44, 80].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .action import ActionCaches, ActionModule
from .attention import FloatLayerNorm, KVCache, RMSNorm, attention
from .config import DiTConfig
from .fusion import affine_norm, gated_add, norm_modulate, residual_add, rms_norm_rope
from .rope import Rotation, dit_rope_angles


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [..., dim] in float64: cosines first, then sines, w_k = 10000^(-k/(dim/2))."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=timesteps.device) / half)
    angles = timesteps.double()[..., None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


@dataclass
class LayerCaches:
    """Streaming caches of one DiT block."""

    self_attn: KVCache
    action: ActionCaches | None = None


@dataclass
class FrameRotations:
    """RoPE of the frames of one call: the DiT's 3D rotation and the action modules' temporal one."""

    dit: Rotation
    action: Rotation | None = None

    def copy_(self, other: FrameRotations) -> FrameRotations:
        """Overwrite in place (the static inputs of a captured CUDA graph)."""
        self.dit.copy_(other.dit)
        if self.action is not None and other.action is not None:
            self.action.copy_(other.action)
        return self

    def clone(self) -> FrameRotations:
        return FrameRotations(self.dit.clone(), None if self.action is None else self.action.clone())


@dataclass
class ContextKV:
    """Cross-attention keys/values of the CLIP context, one (k, v) per block: [B, 257, heads, head_dim]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    def select(self, indices: torch.Tensor) -> ContextKV:
        return ContextKV([k[indices] for k in self.keys], [v[indices] for v in self.values])


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def forward(
        self, h: torch.Tensor, rotation: Rotation, start_frame: int, cache: KVCache | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        batch, tokens, dim = h.shape
        shape = (batch, tokens, self.num_heads, dim // self.num_heads)
        heads = self.num_heads
        q = rms_norm_rope(self.q(h), self.norm_q.weight, self.norm_q.eps, rotation.cos, rotation.sin, heads)
        k = rms_norm_rope(self.k(h), self.norm_k.weight, self.norm_k.eps, rotation.cos, rotation.sin, heads)
        v = self.v(h).view(shape)
        if cache is not None:
            k, v = cache.update(start_frame, k, v)
        return self.o(attention(q, k, v, mask).flatten(2))


class CrossAttention(nn.Module):
    """Attention of the tokens to the (cached) CLIP context; no mask, no gate."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length, dim = context.shape
        shape = (batch, length, self.num_heads, dim // self.num_heads)
        return self.norm_k(self.k(context)).view(shape), self.v(context).view(shape)

    def forward(self, h: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = h.shape
        q = self.norm_q(self.q(h)).view(batch, tokens, self.num_heads, dim // self.num_heads)
        return self.o(attention(q, key, value).flatten(2))


class DiTBlock(nn.Module):
    """Self-attention, cross-attention, optional action module, feed-forward; 6-way modulated."""

    def __init__(self, config: DiTConfig, with_action: bool) -> None:
        super().__init__()
        dim, eps = config.dim, config.eps
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.norm1 = FloatLayerNorm(dim, eps=eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, config.num_heads, eps)
        self.norm3 = FloatLayerNorm(dim, eps=eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, config.num_heads, eps)
        self.action_model = ActionModule(config.action, eps) if with_action else None
        self.norm2 = FloatLayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(config.ffn_dim, dim)
        )

    def forward(
        self,
        x: torch.Tensor,
        time_mod: torch.Tensor,
        num_frames: int,
        start_frame: int,
        rotation: Rotation,
        context_key: torch.Tensor,
        context_value: torch.Tensor,
        mouse_windows: torch.Tensor | None,
        keyboard_windows: torch.Tensor | None,
        cache: LayerCaches | None,
        frame_mask: torch.Tensor | None,
        action_rotation: Rotation | None = None,
    ) -> torch.Tensor:
        """x: [B, F*S, dim] float32; time_mod: [B, F, 6, dim] float32 (time_projection output)."""
        batch, tokens, dim = x.shape
        dtype = self.self_attn.q.weight.dtype
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation.float() + time_mod).unbind(dim=2)

        token_mask = None
        if frame_mask is not None:
            spatial = tokens // num_frames
            token_mask = frame_mask.repeat_interleave(spatial, 0).repeat_interleave(spatial, 1)
        h = norm_modulate(x, shift_sa, scale_sa, self.norm1.eps, num_frames, dtype)
        y = self.self_attn(h, rotation, start_frame, cache.self_attn if cache else None, token_mask)
        x = gated_add(x, y, gate_sa, num_frames)

        h = affine_norm(x, self.norm3.weight, self.norm3.bias, self.norm3.eps, dtype)
        x = residual_add(x, self.cross_attn(h, context_key, context_value))

        if self.action_model is not None:
            x = self.action_model(
                x,
                num_frames,
                start_frame,
                mouse_windows,
                keyboard_windows,
                cache.action if cache else None,
                frame_mask,
                rotation=action_rotation,
            )

        h = norm_modulate(x, shift_ff, scale_ff, self.norm2.eps, num_frames, dtype)
        return gated_add(x, self.ffn(h), gate_ff, num_frames)


class Head(nn.Module):
    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float) -> None:
        super().__init__()
        self.norm = FloatLayerNorm(dim, eps=eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_dim * math.prod(patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x [B, F*S, dim], time_emb [B, F, dim] (time_embedding output, not the projection)."""
        batch, tokens, dim = x.shape
        shift, scale = (self.modulation.float()[:, None] + time_emb[:, :, None]).unbind(dim=2)  # [B, F, dim]
        h = self.norm(x).view(batch, num_frames, -1, dim) * (1 + scale[:, :, None]) + shift[:, :, None]
        return self.head(h.view(batch, tokens, dim).to(self.head.weight.dtype))


class ImageEmbedding(nn.Module):
    """Projects CLIP tokens into the DiT width (`img_emb.proj`)."""

    def __init__(self, clip_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            FloatLayerNorm(clip_dim, eps=1e-5),
            nn.Linear(clip_dim, clip_dim),
            nn.GELU(),
            nn.Linear(clip_dim, dim),
            FloatLayerNorm(dim, eps=1e-5),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(tokens)


class CausalDiT(nn.Module):
    """Matrix-Game 2.0's causal DiT; build with `CausalDiT.from_config(official_config_dict)`."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, dim, kernel_size=config.patch_size, stride=config.patch_size)
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(DiTBlock(config, i in config.action_blocks) for i in range(config.num_layers))
        self.head = Head(dim, config.out_dim, config.patch_size, config.eps)
        self.img_emb = ImageEmbedding(config.clip_dim, dim)

    @classmethod
    def from_config(cls, cfg: dict[str, Any] | DiTConfig) -> CausalDiT:
        """Build from the official config.json contents (universal, gta_drive, templerun,
        foundation) or any smaller size of the same form."""
        return cls(cfg if isinstance(cfg, DiTConfig) else DiTConfig.from_dict(cfg))

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def tokens_per_frame(self, latent_height: int, latent_width: int) -> int:
        _, ph, pw = self.config.patch_size
        return (latent_height // ph) * (latent_width // pw)

    def context_kv(self, visual_context: torch.Tensor) -> ContextKV:
        """Cross-attention keys/values of every block for CLIP tokens [B, L, clip_dim]."""
        context = self.img_emb(visual_context.to(self.dtype)).to(self.dtype)
        pairs = [block.cross_attn.context_kv(context) for block in self.blocks]
        return ContextKV([k for k, _ in pairs], [v for _, v in pairs])

    def forward(
        self,
        latents: torch.Tensor,
        cond: torch.Tensor,
        timestep: torch.Tensor,
        context: ContextKV | torch.Tensor,
        mouse_windows: torch.Tensor | None = None,
        keyboard_windows: torch.Tensor | None = None,
        start_frame: int = 0,
        caches: list[LayerCaches] | None = None,
        frame_mask: torch.Tensor | None = None,
        rotations: FrameRotations | None = None,
    ) -> torch.Tensor:
        """Predict the flow (noise - x0) for latent frames [start_frame, start_frame + F).

        latents [B, out_dim, F, H, W]; cond [B, in_dim - out_dim, F, H, W] (mask + image latents);
        timestep [B, F] (or [B], or a scalar) as floats on the 0..1000 scale; context = CLIP tokens
        [B, L, clip_dim] or precomputed `ContextKV`; mouse/keyboard windows [B, F, window, C] (see
        `action_windows`). With `caches`, the frames attend to what the caches hold (streaming);
        without, to each other under `frame_mask` [F, F] (None = full attention). `rotations`
        (from `frame_rotations`) may be passed precomputed.
        Returns flow [B, out_dim, F, H, W] in float32.
        """
        batch, _, num_frames, height, width = latents.shape
        pt, ph, pw = self.config.patch_size
        if isinstance(context, torch.Tensor):
            context = self.context_kv(context)
        x = self.patch_embedding(torch.cat([latents, cond], dim=1).to(self.dtype))
        grid = x.shape[2:]  # (F / pt, H / ph, W / pw)
        x = x.flatten(2).transpose(1, 2).float()  # [B, F*S, dim], tokens in (frame, row, col) order

        timestep = torch.as_tensor(timestep, device=latents.device)
        timestep = timestep.reshape(-1, 1).expand(batch, num_frames) if timestep.dim() < 2 else timestep
        time_emb = self.time_embedding(timestep_embedding(timestep, self.config.freq_dim).to(self.dtype)).float()
        time_mod = self.time_projection(time_emb.to(self.dtype)).float().unflatten(2, (6, self.config.dim))

        if rotations is None:
            rotations = self.frame_rotations(start_frame, grid[0], grid[1], grid[2], x.device)
        for i, block in enumerate(self.blocks):
            x = block(
                x,
                time_mod,
                num_frames,
                start_frame,
                rotations.dit,
                context.keys[i],
                context.values[i],
                mouse_windows,
                keyboard_windows,
                caches[i] if caches is not None else None,
                frame_mask,
                rotations.action,
            )
        out = self.head(x, time_emb, num_frames).float()  # [B, F*S, out_dim * pt * ph * pw]
        return self._unpatchify(out, grid)

    def frame_rotations(
        self, start_frame: int, num_frames: int, height: int, width: int, device: torch.device | str | None = None
    ) -> FrameRotations:
        """RoPE of latent frames [start_frame, start_frame + num_frames) on a height x width token grid."""
        angles = dit_rope_angles(self.config.head_dim, range(start_frame, start_frame + num_frames), height, width)
        action_module = next((b.action_model for b in self.blocks if b.action_model is not None), None)
        action = None if action_module is None else action_module.rotation(start_frame, num_frames, device)
        return FrameRotations(Rotation(angles, device), action)

    def _unpatchify(self, out: torch.Tensor, grid: torch.Size) -> torch.Tensor:
        pt, ph, pw = self.config.patch_size
        f, h, w = grid
        c = self.config.out_dim
        out = out.view(out.shape[0], f, h, w, pt, ph, pw, c)
        return out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(out.shape[0], c, f * pt, h * ph, w * pw)
