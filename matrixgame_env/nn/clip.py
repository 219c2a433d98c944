"""CLIP ViT-H/14 image encoder that turns the start frame into the DiT's `visual_context`.

This is the vision tower of the XLM-RoBERTa CLIP checkpoint used by Matrix-Game-2.0, reduced to
what the world model reads: the token sequence (class token + one token per 14x14 patch) after all
transformer blocks but the last, with no final LayerNorm and no projection head. Parameter names
are those of the checkpoint's `visual.*` keys with the prefix removed, so a checkpoint loads
strictly once `split_visual_state_dict` has set aside the parts that are never run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Frames arrive in [-1, 1]; allow for rounding in whatever produced them (bf16, resampling).
RANGE_TOLERANCE = 1e-3

_CHECKPOINT_PREFIX = "visual."
_BLOCK_KEY = re.compile(r"^visual\.transformer\.(\d+)\.")
# Parts of the full CLIP checkpoint that visual_context never touches (besides the last block).
_UNUSED_KEYS = ("log_scale", "visual.head")
_UNUSED_PREFIXES = ("textual.", "visual.post_norm.", "visual.head.")


class Float32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and returned in the input dtype (bf16 statistics are too coarse)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention with a fused qkv projection laid out (3, heads, head_dim)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.to_qkv(x).view(batch, length, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, L, head_dim]
        attended = F.scaled_dot_product_attention(query, key, value)
        return self.proj(attended.transpose(1, 2).reshape(batch, length, dim))


class MLP(nn.Sequential):
    """Linear -> exact (erf) GELU -> Linear; a Sequential so the checkpoint's `mlp.0` / `mlp.2` names fit."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, dim))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, norm_eps: float) -> None:
        super().__init__()
        self.norm1 = Float32LayerNorm(dim, eps=norm_eps)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = Float32LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CLIPVisionEncoder(nn.Module):
    """Frames in [-1, 1] -> CLIP vision tokens [B, 1 + (image_size / patch_size)^2, dim].

    The defaults are the official ViT-H/14 (257 tokens of width 1280). `num_layers` counts the blocks
    of the checkpoint's tower; only the first `num_layers - 1` are built and run, because the world
    model reads the tokens before the last block.
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 14,
        dim: int = 1280,
        num_heads: int = 16,
        num_layers: int = 32,
        mlp_ratio: float = 4,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be a multiple of num_heads ({num_heads})")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self._config = {
            "image_size": image_size,
            "patch_size": patch_size,
            "dim": dim,
            "num_heads": num_heads,
            "num_layers": num_layers,
            "mlp_ratio": mlp_ratio,
            "norm_eps": norm_eps,
        }
        self.image_size = image_size
        num_patches = (image_size // patch_size) ** 2

        # The checkpoint's patch projection has no bias (the official tower drops it when pre_norm is on).
        self.patch_embedding = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size, bias=False)
        self.cls_embedding = nn.Parameter(torch.randn(1, 1, dim) * dim**-0.5)
        self.pos_embedding = nn.Parameter(torch.randn(1, 1 + num_patches, dim) * dim**-0.5)
        self.pre_norm = Float32LayerNorm(dim, eps=norm_eps)
        self.transformer = nn.ModuleList(
            TransformerBlock(dim, num_heads, mlp_ratio, norm_eps) for _ in range(num_layers - 1)
        )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> CLIPVisionEncoder:
        """Build from a dict of constructor arguments (missing ones take their defaults)."""
        allowed = {"image_size", "patch_size", "dim", "num_heads", "num_layers", "mlp_ratio", "norm_eps"}
        unknown = sorted(set(cfg) - allowed)
        if unknown:
            raise ValueError(f"unknown CLIPVisionEncoder config keys {unknown}; expected a subset of {sorted(allowed)}")
        return cls(**cfg)

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments; `from_config(encoder.config)` rebuilds the same architecture."""
        return dict(self._config)

    @property
    def num_tokens(self) -> int:
        """Length of the output sequence: one class token plus one token per patch."""
        return self.pos_embedding.shape[1]

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames [B, 3, H, W] in [-1, 1] -> CLIP-normalised pixels [B, 3, image_size, image_size], float32.

        The frame is squashed to a square (bicubic, align_corners=False, no antialiasing), not
        cropped, exactly as the official pipeline feeds the 352x640 start image. Computed in float32
        whatever the input dtype, because the normalisation magnifies rounding errors ~4x.
        """
        _check_frames(frames)
        size = (self.image_size, self.image_size)
        pixels = F.interpolate(frames.float(), size=size, mode="bicubic", align_corners=False)
        pixels = pixels * 0.5 + 0.5
        mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames [B, 3, H, W] in [-1, 1] -> tokens [B, num_tokens, dim] in the parameters' dtype."""
        pixels = self.preprocess(frames).to(self.patch_embedding.weight.dtype)
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # [B, num_patches, dim]
        cls_token = self.cls_embedding.expand(patches.shape[0], -1, -1)
        tokens = self.pre_norm(torch.cat([cls_token, patches], dim=1) + self.pos_embedding)
        for block in self.transformer:
            tokens = block(tokens)
        return tokens


def split_visual_state_dict(
    full_state_dict: Mapping[str, torch.Tensor], num_layers: int | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Pick the tensors `CLIPVisionEncoder` holds out of an official CLIP state dict.

    Takes the whole checkpoint (`visual.*`, `textual.*`, `log_scale`) or only its `visual.*` part.
    `num_layers` is the tower's block count; by default it is read from the `visual.transformer.N`
    keys. Returns `(used, unused_names)`: `used` maps names without the `visual.` prefix to the
    checkpoint's tensors (not copied), ready for `load_state_dict(used, strict=True)`; `unused_names`
    lists, in checkpoint order, the keys dropped on purpose (the last block, `post_norm`, `head`, the
    text tower and `log_scale`). Raises ValueError if expected keys are missing or keys are unknown.
    """
    if num_layers is None:
        block_indices = {int(m.group(1)) for key in full_state_dict if (m := _BLOCK_KEY.match(key))}
        if not block_indices:
            raise ValueError(
                "no 'visual.transformer.<N>.*' keys found; expected an official CLIP state dict, "
                f"got keys {_preview(list(full_state_dict))}"
            )
        num_layers = max(block_indices) + 1
    expected = [_CHECKPOINT_PREFIX + name for name in _parameter_names(num_layers)]

    missing = [key for key in expected if key not in full_state_dict]
    if missing:
        raise ValueError(
            f"CLIP state dict lacks {len(missing)} visual key(s) needed for visual_context "
            f"(tower of {num_layers} blocks): {_preview(missing)}"
        )

    expected_set = set(expected)
    last_block = f"{_CHECKPOINT_PREFIX}transformer.{num_layers - 1}."
    used: dict[str, torch.Tensor] = {}
    unused_names: list[str] = []
    unknown: list[str] = []
    for key, tensor in full_state_dict.items():
        if key in expected_set:
            used[key.removeprefix(_CHECKPOINT_PREFIX)] = tensor
        elif key in _UNUSED_KEYS or key.startswith((*_UNUSED_PREFIXES, last_block)):
            unused_names.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"CLIP state dict has {len(unknown)} key(s) that fit no part of a {num_layers}-block "
            f"XLM-RoBERTa CLIP: {_preview(unknown)}"
        )
    return used, unused_names


def _parameter_names(num_layers: int) -> list[str]:
    """State-dict names of an encoder with this block count (widths do not change names)."""
    with torch.device("meta"):
        skeleton = CLIPVisionEncoder(image_size=1, patch_size=1, dim=1, num_heads=1, num_layers=num_layers)
    return list(skeleton.state_dict())


def _preview(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _check_frames(frames: torch.Tensor) -> None:
    """Raise unless frames is a non-empty floating [B, 3, H, W] tensor with values in [-1, 1]."""
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"frames must be a torch.Tensor [B, 3, H, W], got {type(frames).__name__}")
    if frames.ndim != 4:
        raise ValueError(f"frames must be 4-D [B, 3, H, W], got {frames.ndim}-D shape {tuple(frames.shape)}")
    if frames.shape[1] != 3:
        raise ValueError(f"frames must have 3 (RGB) channels in dim 1, got shape {tuple(frames.shape)}")
    if not frames.is_floating_point():
        raise ValueError(f"frames must be a floating-point tensor with values in [-1, 1], got dtype {frames.dtype}")
    if frames.numel() == 0:
        raise ValueError(f"frames must be non-empty, got shape {tuple(frames.shape)}")
    # One device sync: amax propagates NaN, so a NaN anywhere shows up here.
    peak = frames.detach().abs().amax().item()
    if math.isnan(peak):
        raise ValueError("frames must be finite values in [-1, 1], got NaN")
    if peak > 1 + RANGE_TOLERANCE:
        low, high = (v.item() for v in frames.detach().aminmax())
        raise ValueError(f"frames must have values in [-1, 1] (tolerance {RANGE_TOLERANCE}), got range [{low}, {high}]")
