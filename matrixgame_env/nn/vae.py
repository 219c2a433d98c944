"""Wan 2.1 causal video VAE: 8x spatial and 4x temporal compression to 16 normalised latent channels.

Everything is causal in time. Encoding runs video frame 0 alone and then 4 frames at a time, each
chunk giving one latent frame; decoding runs one latent frame at a time, latent 0 giving one video
frame and every later latent 4. Between chunks each causal layer keeps the last frames it saw in a
`FeatureCache` slot, so a video can be encoded or decoded piece by piece with the same result as all
at once, and a `DecoderCache` is all the state a streaming world needs to turn new latents into frames.

Parameter names and shapes are those of the released `Wan2.1_VAE.pth` (no prefix): `encoder.*`,
`conv1.*` (encoder output -> mean | log-variance), `conv2.*` (first layer of decoding), `decoder.*`.
Hence the `nn.Sequential` index layouts below: they are the checkpoint's, not a choice.

One behaviour of the official decoder is kept on purpose: on the first latent the temporal
upsamplers only mark their slot, so the second latent is upsampled against zero padding rather than
against the first latent (see `Upsample`). Decoded frames differ by up to ~2 without it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import triton_conv, triton_norm
from .causal_conv import (
    CausalConv3d,
    RMSNorm,
    conv3d_form,
    nearest_conv_as_transposed,
    same_layout,
    set_conv3d_mode,
    set_upsample_mode,
    use_transposed_upsampling,
)
from .frame_actions import FrameModulation
from .fusion import channel_bias_add
from .vae_cache import DecoderCache, FeatureCache

# The layers, caches and speed switches live in `causal_conv` and `vae_cache`; they are named here too,
# where the VAE's users find them (`set_conv3d_mode`, `set_upsample_mode`, `DecoderCache`, ...).
__all__ = [
    "WAN21_LATENT_MEAN",
    "WAN21_LATENT_STD",
    "CausalConv3d",
    "DecoderCache",
    "Decoder",
    "Downsample",
    "Encoder",
    "FeatureCache",
    "ImageCondition",
    "RMSNorm",
    "ResidualBlock",
    "Upsample",
    "WanVAE",
    "conv3d_form",
    "nearest_conv_as_transposed",
    "set_conv3d_mode",
    "set_upsample_mode",
]

# Per-channel statistics of Wan 2.1 latents: the model works with (mu - mean) / std.
WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

_CONFIG_KEYS = (
    "dim",
    "z_dim",
    "dim_mult",
    "num_res_blocks",
    "attn_scales",
    "temporal_downsample",
    "latent_mean",
    "latent_std",
    "decoder_dim",
    "decoder_frame_actions",
)
# The official code spells this argument "temperal"; accept its configs as they are.
_OFFICIAL_SPELLINGS = {"temperal_downsample": "temporal_downsample"}


def _per_frame(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Runs a 2D layer on every frame of a video [B, C, T, H, W] -> [B, C', T, H', W']."""
    batch = x.shape[0]
    frames = layer(x.transpose(1, 2).flatten(0, 1))  # [B*T, C', H', W']
    return frames.unflatten(0, (batch, -1)).transpose(1, 2)


class ResidualBlock(nn.Module):
    """x + [RMSNorm, SiLU, 3x3x3 causal conv] twice; the skip is a 1x1x1 conv where the width changes."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        # Checkpoint layout: norms at 0 and 3, convolutions at 2 and 6; 1 and 4 are the SiLUs and
        # 5 was a dropout used only in training.
        self.residual = nn.Sequential(
            RMSNorm(in_channels),
            nn.SiLU(),
            CausalConv3d(in_channels, out_channels, 3),
            RMSNorm(out_channels),
            nn.SiLU(),
            nn.Identity(),
            CausalConv3d(out_channels, out_channels, 3),
        )
        self.shortcut = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, cache: FeatureCache, keep: int | None = None) -> torch.Tensor:
        """`keep`: only the last `keep` output frames, from x's last `input_frames(keep)` frames; x is
        then a whole chunk or a chunk's last frames, at least that many. The cache moves on as without."""
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        inner = None if keep is None else keep + conv2.past_frames  # what conv2's last `keep` outputs read
        if not conv1.takes_fused_input(x):
            h = conv1.forward_normed(x, norm1, cache, keep=inner)
            h = conv2.forward_normed(h, norm2, cache, keep=keep)
            return h + self.shortcut(x[:, :, -h.shape[2] :])
        # Fused: every bias joins the next fused kernel instead of a pass of its own.
        h = conv1.forward_normed(x, norm1, cache, add_bias=False, keep=inner)
        h = conv2.forward_normed(h, norm2, cache, input_bias=conv1.bias, add_bias=False, keep=keep)
        x = x[:, :, -h.shape[2] :]
        if isinstance(self.shortcut, nn.Conv3d):
            skip, skip_bias = F.conv3d(x, self.shortcut.weight), self.shortcut.bias
        else:
            skip, skip_bias = x, None
        if conv2.fuses_with_triton(h) and triton_norm.applies(skip):
            return same_layout(triton_norm.bias_add(h, conv2.bias, skip, skip_bias), x)
        return same_layout(channel_bias_add(h, conv2.bias, skip, skip_bias), x)  # GPUs: already x's layout

    def input_frames(self, keep: int) -> int:
        """How many of a chunk's last input frames the last `keep` output frames depend on."""
        conv1, conv2 = self.residual[2], self.residual[6]
        return keep + conv2.past_frames + conv1.past_frames


class AttentionBlock(nn.Module):
    """x + single-head self-attention over the H*W positions of each frame on its own (C is the head size)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = RMSNorm(channels, spatial_dims=2)
        self.to_qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, cache: FeatureCache, keep: int | None = None) -> torch.Tensor:
        """`cache` is unused (nothing crosses frames); it is taken so that every layer of a stack runs
        alike. `keep`: only the last `keep` frames."""
        x = _last_frames(x, keep)
        return x + _per_frame(self._attend, x)

    def input_frames(self, keep: int) -> int:
        """How many of a chunk's last input frames the last `keep` output frames depend on."""
        return keep

    def _attend(self, frames: torch.Tensor) -> torch.Tensor:
        # frames: [N, C, H, W]
        n, c, h, w = frames.shape
        qkv = self.to_qkv(self.norm(frames)).flatten(2).transpose(1, 2)  # [N, H*W, 3C]
        query, key, value = qkv.unsqueeze(1).chunk(3, dim=-1)  # each [N, 1, H*W, C]
        attended = F.scaled_dot_product_attention(query, key, value)  # [N, 1, H*W, C]
        return self.proj(attended.squeeze(1).transpose(1, 2).reshape(n, c, h, w))


class Downsample(nn.Module):
    """Halves H and W; with `temporal`, also halves the frame count.

    Space: one zero row/column at the bottom/right, then a 3x3 stride-2 conv. Time: a 3-tap stride-2
    conv over [the previous chunk's last frame, this chunk]; the first chunk (one frame) has no
    predecessor and passes through unchanged, so 1 frame stays 1 and every later 4 become 2, then 1.
    """

    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(channels, channels, 3, stride=2))
        self.time_conv = nn.Conv3d(channels, channels, (3, 1, 1), stride=(2, 1, 1)) if temporal else None
        self.cache_slot = -1

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        x = _per_frame(self.resample, x)  # [B, C, T, H/2, W/2]
        if self.time_conv is None:
            return x
        previous = cache.slots[self.cache_slot]
        halved = x if previous is None else self.time_conv(torch.cat([previous, x], dim=2))  # [B, C, T/2, H/2, W/2]
        cache.keep(self.cache_slot, x[:, :, -1:])  # after `previous` was read: keep may overwrite it
        return halved


class Upsample(nn.Module):
    """Doubles H and W (nearest, then a 3x3 conv to half the channels); with `temporal`, first doubles time.

    Time: a causal 3-tap conv to twice the channels whose two halves become two consecutive frames.
    The official decoder skips this on the first latent (video frame 0 is not doubled) and leaves
    the slot without that latent: the second latent sees zero padding. Both are reproduced here.
    """

    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=2.0, mode="nearest"),
            nn.Conv2d(channels, channels // 2, 3, padding=1),
        )
        self.time_conv = CausalConv3d(channels, 2 * channels, (3, 1, 1)) if temporal else None
        self.triton_kernel = False  # WanVAE.set_decoder_triton: the nearest upsampling as a Triton kernel

    def forward(self, x: torch.Tensor, cache: FeatureCache, keep: int | None = None) -> torch.Tensor:
        """`keep`: only the last `keep` output frames (spatial upsamplers only: frames map one to one)."""
        if keep is not None:
            if self.time_conv is not None:
                raise ValueError("a temporal upsampler doubles its frames: keep applies to spatial ones only")
            x = _last_frames(x, keep)
        if self.time_conv is not None:
            x = self._double_frames(x, cache)
        if use_transposed_upsampling(x.device):
            return _per_frame(self._upsample_transposed, x)
        if self.triton_kernel and triton_norm.enabled() and not torch.is_grad_enabled():
            return _per_frame(self._upsample_triton, x)
        return _per_frame(self.resample, x)  # [B, C/2, T, 2H, 2W]

    def input_frames(self, keep: int) -> int:
        """How many of a chunk's last input frames the last `keep` output frames depend on (spatial)."""
        return keep

    def _upsample_triton(self, frames: torch.Tensor) -> torch.Tensor:
        """`resample` with the nearest upsampling in one Triton pass where it applies (channels-last frames)."""
        upsampled = triton_norm.upsample_nearest2x(frames)
        return self.resample(frames) if upsampled is None else self.resample[1](upsampled)

    def _upsample_transposed(self, frames: torch.Tensor) -> torch.Tensor:
        """`resample` on frames [N, C, H, W] -> [N, C/2, 2H, 2W] as one transposed convolution."""
        conv = self.resample[1]
        weight = nearest_conv_as_transposed(conv.weight)
        if not (_is_channels_last_picture(frames) or _is_channels_last_picture(conv.weight)):
            return F.conv_transpose2d(frames, weight, conv.bias, stride=2, padding=1)
        # The layout `resample` gives (channels-last when its input or weight is), which CPUs' transposed
        # convolutions do not keep by themselves.
        weight = weight.contiguous(memory_format=torch.channels_last)
        upsampled = F.conv_transpose2d(frames, weight, conv.bias, stride=2, padding=1)
        return upsampled.contiguous(memory_format=torch.channels_last)

    def _double_frames(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        batch, channels, frames, height, width = x.shape
        slot = self.time_conv.cache_slot
        if cache.is_empty(slot):
            cache.keep(slot, x.new_zeros(batch, channels, self.time_conv.past_frames, height, width), owned=True)
            return x
        pairs = self.time_conv(x, cache)  # [B, 2C, T, H, W]
        pairs = pairs.view(batch, 2, channels, frames, height, width).permute(0, 2, 3, 1, 4, 5)
        return same_layout(pairs.reshape(batch, channels, 2 * frames, height, width), x)  # [B, C, 2T, H, W]


def _last_frames(x: torch.Tensor, keep: int | None) -> torch.Tensor:
    """The last `keep` frames of a video [B, C, T, H, W] (all for None), in x's memory layout."""
    if keep is None or keep >= x.shape[2]:
        return x
    return same_layout(x[:, :, -keep:], x)


def _is_channels_last_picture(x: torch.Tensor) -> bool:
    """True for a 4D tensor stored channels-last (and not also standard-contiguous)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _assign_cache_slots(network: nn.Module) -> int:
    """Gives each layer that carries frames between chunks its own cache slot; returns the slot count."""
    count = 0
    for module in network.modules():
        if isinstance(module, CausalConv3d) or (isinstance(module, Downsample) and module.time_conv is not None):
            module.cache_slot = count
            count += 1
    return count


class Encoder(nn.Module):
    """Video chunk [B, 3, T, H, W] -> [B, out_channels, T', H/8, W/8], carrying its past in a FeatureCache."""

    def __init__(
        self,
        dim: int,
        out_channels: int,
        dim_mult: Sequence[int],
        num_res_blocks: int,
        attn_scales: Sequence[float],
        temporal_downsample: Sequence[bool],
    ) -> None:
        super().__init__()
        widths = [dim] + [dim * multiple for multiple in dim_mult]
        self.conv1 = CausalConv3d(3, widths[0], 3)
        layers: list[nn.Module] = []
        scale = 1.0  # resolution relative to the input, for attn_scales
        for stage, (in_width, width) in enumerate(zip(widths[:-1], widths[1:])):
            for _ in range(num_res_blocks):
                layers.append(ResidualBlock(in_width, width))
                if scale in attn_scales:
                    layers.append(AttentionBlock(width))
                in_width = width
            if stage < len(dim_mult) - 1:
                layers.append(Downsample(width, temporal=temporal_downsample[stage]))
                scale /= 2
        self.downsamples = nn.ModuleList(layers)
        self.middle = nn.ModuleList([ResidualBlock(width, width), AttentionBlock(width), ResidualBlock(width, width)])
        self.head = nn.Sequential(RMSNorm(width), nn.SiLU(), CausalConv3d(width, out_channels, 3))
        self.num_cache_slots = _assign_cache_slots(self)

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layer in [*self.downsamples, *self.middle]:
            x = layer(x, cache)
        norm, _, conv = self.head
        return conv.forward_normed(x, norm, cache)


class Decoder(nn.Module):
    """Latent chunk [B, z_dim, t, h, w] -> video [B, 3, T, 8h, 8w], carrying its past in a FeatureCache."""

    def __init__(
        self,
        dim: int,
        z_dim: int,
        dim_mult: Sequence[int],
        num_res_blocks: int,
        attn_scales: Sequence[float],
        temporal_upsample: Sequence[bool],
        frame_action_features: int = 0,
    ) -> None:
        super().__init__()
        widths = [dim * dim_mult[-1]] + [dim * multiple for multiple in reversed(dim_mult)]
        self.conv1 = CausalConv3d(z_dim, widths[0], 3)
        self.middle = nn.ModuleList(
            [ResidualBlock(widths[0], widths[0]), AttentionBlock(widths[0]), ResidualBlock(widths[0], widths[0])]
        )
        layers: list[nn.Module] = []
        scale = 1.0 / 2 ** (len(dim_mult) - 2)  # resolution relative to the output, for attn_scales
        for stage, (in_width, width) in enumerate(zip(widths[:-1], widths[1:])):
            if stage > 0:
                in_width //= 2  # the upsampler before this stage halved the channels
            for _ in range(num_res_blocks + 1):
                layers.append(ResidualBlock(in_width, width))
                if scale in attn_scales:
                    layers.append(AttentionBlock(width))
                in_width = width
            if stage < len(dim_mult) - 1:
                layers.append(Upsample(width, temporal=temporal_upsample[stage]))
                scale *= 2
        self.upsamples = nn.ModuleList(layers)
        self.head = nn.Sequential(RMSNorm(width), nn.SiLU(), CausalConv3d(width, 3, 3))
        self.num_cache_slots = _assign_cache_slots(self)
        # Shown each video frame's recent actions (nn/frame_actions.py): a modulation after every
        # upsampler from the last temporal one on, where frames are video frames. Absent by default.
        self.frame_modulations: nn.ModuleDict | None = None
        if frame_action_features > 0:
            all_layers = [*self.middle, *self.upsamples]
            last_temporal = self._frame_preserving_tail(all_layers) - 1  # -1 without temporal upsamplers
            self.frame_modulations = nn.ModuleDict(
                {
                    str(index): FrameModulation(layer.resample[1].out_channels, frame_action_features)
                    for index, layer in enumerate(all_layers)
                    if isinstance(layer, Upsample) and index >= last_temporal
                }
            )

    def forward(
        self,
        x: torch.Tensor,
        cache: FeatureCache,
        last_frames: int | None = None,
        frame_actions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`last_frames`: only the chunk's last `last_frames` video frames. The layers after the last
        temporal upsampler (frames map one to one there) then compute only the frames those depend
        on; the cache moves on exactly as when decoding every frame. `frame_actions`: for a decoder
        shown the actions, the features [B, T, F] of the chunk's T video frames
        (`frame_action_features`); refused by a decoder without."""
        check_last_frames(last_frames)
        modulations = self._modulations(frame_actions)
        x = self.conv1(x, cache)
        layers = [*self.middle, *self.upsamples]
        first_trimmed = len(layers) if last_frames is None else self._frame_preserving_tail(layers)
        for index, layer in enumerate(layers[:first_trimmed]):
            x = layer(x, cache)
            if index in modulations:
                x = modulations[index](x, frame_actions)
        norm, _, conv = self.head
        if last_frames is None:
            return conv.forward_normed(x, norm, cache)
        keeps = [min(last_frames, x.shape[2])]  # each trimmed layer's output frames, from the head back
        needed = keeps[0] + conv.past_frames
        for layer in reversed(layers[first_trimmed:]):
            keeps.append(min(needed, x.shape[2]))
            needed = layer.input_frames(keeps[-1])
        *tail, head = reversed(keeps)
        for index, (layer, keep) in enumerate(zip(layers[first_trimmed:], tail), start=first_trimmed):
            x = layer(x, cache, keep)
            if index in modulations:
                x = modulations[index](x, frame_actions)
        return conv.forward_normed(x, norm, cache, keep=head)

    @property
    def shown_actions(self) -> bool:
        """Whether this decoder takes each video frame's action features (`frame_actions`)."""
        return self.frame_modulations is not None

    def _modulations(self, frame_actions: torch.Tensor | None) -> dict[int, FrameModulation]:
        if self.frame_modulations is None:
            if frame_actions is not None:
                raise ValueError("this decoder is not shown actions (decoder_frame_actions 0): give no frame_actions")
            return {}
        if frame_actions is None:
            raise ValueError(
                "this decoder is shown each video frame's actions: give frame_actions [B, T, F] "
                "(nn.frame_actions.frame_action_features)"
            )
        return {int(index): module for index, module in self.frame_modulations.items()}

    @staticmethod
    def _frame_preserving_tail(layers: list[nn.Module]) -> int:
        """Index of the first of the last layers that keep the frame count (after the last temporal upsampler)."""
        start = len(layers)
        while start > 0 and not (isinstance(layers[start - 1], Upsample) and layers[start - 1].time_conv is not None):
            start -= 1
        return start


def check_last_frames(last_frames: int | None) -> None:
    """Refuse a `last_frames` that is neither None nor a positive integer."""
    if last_frames is not None and (
        isinstance(last_frames, bool) or not isinstance(last_frames, int) or last_frames < 1
    ):
        raise ValueError(f"last_frames must be a positive integer or None, got {last_frames!r}")


# Runs the decoder on one latent frame [B, z_dim, 1, h, w] with its cache (`WanVAE.set_decoder_runner`);
# `last_frames` as for `Decoder.forward` (passed only where it is asked for).
DecoderRunner = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class ImageCondition:
    """Normalised latents of a start image followed by all-zero video frames (the world model's `img_cond`).

    After the image the encoder only ever sees zeros, so once its caches stop changing every later
    latent frame is the same. `distinct_latents` [B, z_dim, D, h, w] holds the frames up to that
    point; when `reached_fixed_point`, frame D - 1 repeats for ever, otherwise only D frames are known.
    """

    distinct_latents: torch.Tensor
    reached_fixed_point: bool

    @property
    def num_distinct(self) -> int:
        return self.distinct_latents.shape[2]

    def frames(self, start: int, stop: int) -> torch.Tensor:
        """Latent frames start .. stop - 1 as [B, z_dim, stop - start, h, w]."""
        if not 0 <= start <= stop:
            raise ValueError(f"expected 0 <= start <= stop, got start={start}, stop={stop}")
        if not self.reached_fixed_point and stop > self.num_distinct:
            raise ValueError(
                f"only {self.num_distinct} latent frames were encoded (no fixed point was reached), got stop={stop}"
            )
        index = torch.arange(start, stop, device=self.distinct_latents.device).clamp_(max=self.num_distinct - 1)
        return self.distinct_latents.index_select(2, index)

    def latents(self, num_frames: int) -> torch.Tensor:
        """The first `num_frames` latent frames, [B, z_dim, num_frames, h, w]."""
        return self.frames(0, num_frames)


class WanVAE(nn.Module):
    """Wan 2.1 video VAE (encoder, decoder and latent normalisation), official layout at any width.

    Videos are [B, 3, T, H, W] in [-1, 1] with T = 1 + 4k and H, W multiples of 8; latents are
    normalised, [B, z_dim, 1 + k, H/8, W/8]. Decoded videos come back as [B, T, 3, H, W] in [-1, 1].
    The factors 8 and 4 follow from `dim_mult` and `temporal_downsample` (2 per stage, 2 per True).
    `decoder_dim` (default: `dim`) lets the decoder be narrower than the encoder: the encoder runs once
    per start picture in a world model, the decoder on every block. Inputs are cast to the dtype and
    device of the weights.
    """

    def __init__(
        self,
        dim: int = 96,
        z_dim: int = 16,
        dim_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_scales: Sequence[float] = (),
        temporal_downsample: Sequence[bool] = (False, True, True),
        latent_mean: Sequence[float] = WAN21_LATENT_MEAN,
        latent_std: Sequence[float] = WAN21_LATENT_STD,
        decoder_dim: int | None = None,
        decoder_frame_actions: int = 0,
    ) -> None:
        super().__init__()
        decoder_dim = dim if decoder_dim is None else decoder_dim
        if decoder_frame_actions < 0:
            raise ValueError(f"decoder_frame_actions must be 0 (off) or a feature count, got {decoder_frame_actions}")
        if dim < 1 or decoder_dim < 1:
            raise ValueError(f"dim and decoder_dim must be positive, got {dim} and {decoder_dim}")
        if len(temporal_downsample) != len(dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample needs one entry per downsampler ({len(dim_mult) - 1} for dim_mult "
                f"{tuple(dim_mult)}), got {tuple(temporal_downsample)}"
            )
        if len(latent_mean) != z_dim or len(latent_std) != z_dim:
            raise ValueError(
                f"latent_mean and latent_std need z_dim={z_dim} values each, "
                f"got {len(latent_mean)} and {len(latent_std)}"
            )
        self._config = {
            "dim": int(dim),
            "z_dim": int(z_dim),
            "dim_mult": [int(m) for m in dim_mult],
            "num_res_blocks": int(num_res_blocks),
            "attn_scales": [float(s) for s in attn_scales],
            "temporal_downsample": [bool(t) for t in temporal_downsample],
            "latent_mean": [float(m) for m in latent_mean],
            "latent_std": [float(s) for s in latent_std],
        }
        if decoder_dim != dim:  # the official models share one width; only a narrower or wider decoder says so
            self._config["decoder_dim"] = int(decoder_dim)
        if decoder_frame_actions:  # ours only: a decoder shown each frame's actions (nn/frame_actions.py)
            self._config["decoder_frame_actions"] = int(decoder_frame_actions)
        self.z_dim = z_dim
        self._decoder_channels_last = False  # see set_decoder_channels_last
        self._decoder_runner: DecoderRunner | None = None  # see set_decoder_runner
        self._latents_per_decoder_call: int | None = None  # see set_latents_per_decoder_call
        self.spatial_factor = 2 ** (len(dim_mult) - 1)
        self.temporal_factor = 2 ** sum(bool(t) for t in temporal_downsample)

        self.encoder = Encoder(dim, 2 * z_dim, dim_mult, num_res_blocks, attn_scales, temporal_downsample)
        self.conv1 = nn.Conv3d(2 * z_dim, 2 * z_dim, 1)  # encoder output -> mean | log-variance
        self.conv2 = nn.Conv3d(z_dim, z_dim, 1)  # first layer of decoding
        self.decoder = Decoder(
            decoder_dim,
            z_dim,
            dim_mult,
            num_res_blocks,
            attn_scales,
            tuple(reversed(temporal_downsample)),
            decoder_frame_actions,
        )
        # Not in the checkpoint: constants of the latent space, kept with the model.
        self.register_buffer("latent_mean", torch.tensor(latent_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("latent_std", torch.tensor(latent_std, dtype=torch.float32), persistent=False)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> WanVAE:
        """A VAE from a dict with any of the `config` keys (the official `temperal_downsample` is accepted)."""
        settings = dict(config)
        for official, ours in _OFFICIAL_SPELLINGS.items():
            if official in settings:
                if ours in settings:
                    raise ValueError(f"config gives both {official!r} and {ours!r}")
                settings[ours] = settings.pop(official)
        unknown = sorted(set(settings) - set(_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"unknown VAE config keys {unknown}; expected some of {list(_CONFIG_KEYS)}")
        return cls(**settings)

    @property
    def decoder_dim(self) -> int:
        """Base width of the decoder (its full-resolution layers' channels)."""
        return int(self._config.get("decoder_dim", self._config["dim"]))

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments, as plain JSON-able values; `from_config(config)` rebuilds the model."""
        return {key: list(value) if isinstance(value, list) else value for key, value in self._config.items()}

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    # Encoding

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video [B, 3, T, H, W] in [-1, 1], T = 1 + 4k -> normalised latents [B, z_dim, 1 + k, H/8, W/8].

        Frame 0 is encoded alone, then 4 frames per latent, as the official code does; only the
        mean of the posterior is used.
        """
        video = self._checked_pixels(video, "video", "[B, 3, T, H, W]")
        cache = FeatureCache(self.encoder.num_cache_slots, video.shape[0])
        latents = [self._encode_chunk(chunk, cache) for chunk in self._latent_chunks(video)]
        return torch.cat(latents, dim=2)

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Image [B, 3, H, W] in [-1, 1] -> latents [B, z_dim, 1, H/8, W/8].

        The encoder being causal, this is latent frame 0 of any video that starts with the image.
        """
        image = self._checked_pixels(image, "image", "[B, 3, H, W]")
        return self.encode(image.unsqueeze(2))

    @torch.no_grad()
    def encode_image_condition(self, image: torch.Tensor, num_latent_frames: int) -> ImageCondition:
        """The official image condition: `encode` of the image followed by 4 (F - 1) zero frames.

        Instead of encoding every zero frame (about 1,400 of them for 150 latents), zero chunks are
        encoded one at a time until the encoder's whole cache after a chunk is bit-identical to the
        cache before it. From there each chunk repeats the same computation on the same inputs, so
        every later latent equals the last one computed. That takes 29 zero chunks (30 distinct
        latent frames) with the fixture weights (dim 8, 32x48) and also at the official width (dim 96,
        random weights): the count is set by how far back in time the causal layers reach, not by
        the weights. For the official 150 latents that is 29 chunks instead of 149.

        Args:
            image: [B, 3, H, W] in [-1, 1].
            num_latent_frames: F, the number of latent frames wanted; encoding stops there at the latest.
        """
        image = self._checked_pixels(image, "image", "[B, 3, H, W]")
        if num_latent_frames < 1:
            raise ValueError(f"num_latent_frames must be at least 1, got {num_latent_frames}")
        cache = FeatureCache(self.encoder.num_cache_slots, image.shape[0])
        latents = [self._encode_chunk(image.unsqueeze(2), cache)]
        zeros = image.new_zeros(*image.shape[:2], self.temporal_factor, *image.shape[2:])
        while len(latents) < num_latent_frames:
            before = list(cache.slots)  # slots are replaced, never written into, so these stay as they were
            latents.append(self._encode_chunk(zeros, cache))
            if all(old is not None and torch.equal(old, new) for old, new in zip(before, cache.slots)):
                return ImageCondition(torch.cat(latents, dim=2), reached_fixed_point=True)
        return ImageCondition(torch.cat(latents, dim=2), reached_fixed_point=False)

    def _encode_chunk(self, chunk: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        # chunk: [B, 3, 1 or 4, H, W] -> one normalised latent frame [B, z_dim, 1, H/8, W/8]
        moments = self.conv1(self.encoder(chunk, cache))  # [B, 2 z_dim, 1, h, w]: mean | log-variance
        return self._normalise(moments[:, : self.z_dim])

    def _latent_chunks(self, video: torch.Tensor) -> list[torch.Tensor]:
        """The pieces of a video [B, 3, T, H, W] that give one latent frame each: frame 0, then 4 at a time."""
        frames = video.shape[2]
        if (frames - 1) % self.temporal_factor:
            raise ValueError(
                f"video must have 1 + {self.temporal_factor}k frames (1, {1 + self.temporal_factor}, "
                f"{1 + 2 * self.temporal_factor}, ...), got {frames}"
            )
        starts = [0, *range(1, frames, self.temporal_factor)]
        stops = [1, *range(1 + self.temporal_factor, frames + 1, self.temporal_factor)]
        return [video[:, :, start:stop] for start, stop in zip(starts, stops)]

    # Decoding

    @property
    def decoder_channels_last(self) -> bool:
        """Whether the decoder runs on channels-last activations (`set_decoder_channels_last`)."""
        return self._decoder_channels_last

    def set_decoder_channels_last(self, enabled: bool = True) -> None:
        """Runs the decoder on channels-last (NDHWC) activations and weights, the layout of cuDNN's native
        convolution kernels, which spares the layout transposes around every convolution on GPUs.
        Computes the same function; decoder caches made before keep working."""
        self._decoder_channels_last = enabled
        layouts = {4: torch.channels_last, 5: torch.channels_last_3d}
        with torch.no_grad():
            for module in (self.conv2, self.decoder):
                for parameter in module.parameters():
                    if parameter.dim() in layouts:
                        layout = layouts[parameter.dim()] if enabled else torch.contiguous_format
                        parameter.data = parameter.data.contiguous(memory_format=layout)

    def set_decoder_triton(self, enabled: bool = True) -> None:
        """Runs the decoder's 16 -> 16-channel causal convolutions through the Triton kernel of
        `nn.triton_conv` where it applies (CUDA, channels-last, bf16/fp16) while `set_conv3d_mode` is
        "auto"; the other layers keep cuDNN. With `nn.triton_norm.enabled()` (the default), on
        channels-last videos the norms, SiLUs and joins before the convolutions and the residual
        blocks' bias-and-skip adds run as Triton kernels too, unless torch.compile's fusion is on, and
        so does the upsamplers' nearest doubling.
        The same function up to float32 summation order."""
        if enabled and not triton_conv.available():
            raise ValueError("the decoder's Triton convolutions need Triton and a CUDA GPU")
        for module in self.decoder.modules():
            if isinstance(module, (CausalConv3d, Upsample)):
                module.triton_kernel = enabled

    @property
    def decoder_triton(self) -> bool:
        """Whether `set_decoder_triton` is on."""
        return any(getattr(m, "triton_kernel", False) for m in self.decoder.modules())

    @property
    def decoder_runner(self) -> DecoderRunner | None:
        """What `decode_stream` calls in place of `decoder` (`set_decoder_runner`), or None."""
        return self._decoder_runner

    def set_decoder_runner(self, runner: DecoderRunner | None) -> None:
        """Have `decode_stream` call `runner(chunk, cache)` for each latent instead of `decoder` (a
        compiled form of it: `world.compiled_decoder`); None calls the decoder again. Training's
        `decode_unnormalised` always calls the decoder."""
        self._decoder_runner = runner

    def set_latents_per_decoder_call(self, count: int | None = None) -> None:
        """At most `count` latents per decoder call in `decode_stream` (None: every latent after a stream's
        first in one call, the default). Larger calls run fewer, larger kernels and hold the
        activations of more frames at once: the full-size decoder at batch 8 peaked at 42 GiB with 3
        latents a call against 31 GiB with 1 (benchmarks/NOTES.md); 1 is the official decoder's way."""
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise ValueError(f"latents per decoder call must be a positive integer or None, got {count!r}")
        self._latents_per_decoder_call = count

    @property
    def latents_per_decoder_call(self) -> int | None:
        """The cap set by `set_latents_per_decoder_call` (None: none)."""
        return self._latents_per_decoder_call

    def _decoder_input(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv2(z)
        if self._decoder_channels_last:
            return x.contiguous(memory_format=torch.channels_last_3d)
        return x

    def new_decoder_cache(self, batch_size: int) -> DecoderCache:
        """An empty cache for streaming `batch_size` worlds through `decode_stream` from their first latent."""
        return DecoderCache(self.decoder.num_cache_slots, batch_size, channels_last=self._decoder_channels_last)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, z_dim, F, h, w] -> video [B, 1 + 4 (F - 1), 3, 8h, 8w] in [-1, 1]."""
        latents = self._checked_latents(latents)
        return self.decode_stream(latents, self.new_decoder_cache(latents.shape[0]))

    @torch.no_grad()
    def decode_stream(
        self, latents: torch.Tensor, cache: DecoderCache, check_finite: bool = True, last_frames: int | None = None
    ) -> torch.Tensor:
        """Decodes the next n latent frames of a stream; `cache` is updated in place.

        Args:
            latents: [B, z_dim, n, h, w], normalised, the latents that follow those already decoded.
            cache: from `new_decoder_cache(B)` before the first call, then passed back unchanged.
            check_finite: reject NaN/inf latents (a device sync; off for latents the sampler made).
            last_frames: return only the last `last_frames` video frames (None: all). The decoder's
                last layers then compute only what those frames depend on (`Decoder.forward`); the
                cache moves on as when decoding all, so later calls give the same frames.

        Returns:
            Video frames [B, T, 3, 8h, 8w] in [-1, 1]: T = 1 + 4 (n - 1) on the first call, 4n later
            (at most `last_frames`).
        """
        latents = self._checked_latents(latents, check_finite)
        self._check_decoder_cache(cache, latents)
        check_last_frames(last_frames)
        x = self._decoder_input(self._denormalise(latents))  # [B, z_dim, n, h, w]
        # The official decoder takes one latent per call. A stream's first latent must go alone (the
        # layers' first-chunk rules apply to a call); once every layer has kept frames, one call of
        # several latents computes what as many calls of one would (causal convolutions over [kept
        # frames, chunk]; norms, attention and upsampling per frame) in fewer, larger kernels. A
        # decoder runner (`set_decoder_runner`: a compiled decoder, traced for one latent) keeps one, and
        # `set_latents_per_decoder_call` caps the count. With `last_frames` a runner takes the latents
        # in one call too: the trimmed layers then skip most frames, not just the last latent's. A
        # stream's first call (its cache empty) runs the decoder itself throughout: the rest of a
        # first block comes in a chunk size that occurs once a stream, and a runner that saw it
        # would compile a graph for it and then the steady chunks' with the frame count dynamic.
        first_call = cache.filling()
        decode = self.decoder if first_call else (self._decoder_runner or self.decoder)
        one_by_one = self._decoder_runner is not None and last_frames is None
        most = 1 if one_by_one else (self._latents_per_decoder_call or x.shape[2])
        frames, start, total = [], 0, x.shape[2]
        while start < total:
            alone = cache.filling()
            count = 1 if alone else min(most, total - start)
            chunk = x[:, :, start : start + count]
            if last_frames is None or start + count < total:
                frames.append(decode(chunk, cache))  # [B, 3, 1 or 4 * count, H, W]
            else:
                frames.append(decode(chunk, cache, last_frames=last_frames))
            start += count
        video = frames[0] if len(frames) == 1 else torch.cat(frames, dim=2)  # [B, 3, T, H, W]
        if last_frames is not None:
            video = video[:, :, -last_frames:]
        return video.transpose(1, 2).contiguous().clamp_(-1.0, 1.0)  # [B, T, 3, H, W]

    # Training: the same computations with gradients, on unnormalised latents, without clamping.

    def encode_distribution(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Video [B, 3, T, H, W] in [-1, 1], T = 1 + 4k -> the posterior (mu, logvar), unnormalised.

        Both are [B, z_dim, 1 + k, H/8, W/8]: the two halves of `conv1`'s output, chunked as `encode`
        chunks (so `encode(video)` is the normalised `mu`). Runs with gradients; the log-variance is
        clamped to [-30, 20] as the official posterior does, so exp(logvar) stays finite.
        """
        video = self._checked_pixels(video, "video", "[B, 3, T, H, W]")
        cache = FeatureCache(self.encoder.num_cache_slots, video.shape[0])
        moments = torch.cat([self.conv1(self.encoder(chunk, cache)) for chunk in self._latent_chunks(video)], dim=2)
        mu, logvar = moments.chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode_unnormalised(self, z: torch.Tensor, frame_actions: torch.Tensor | None = None) -> torch.Tensor:
        """Unnormalised latents z [B, z_dim, F, h, w] -> video [B, 3, 1 + 4 (F - 1), 8h, 8w], with gradients.

        The decoder of `decode` (one latent per call, same first-latent rule) without normalisation or
        clamping, and in the encoder's [B, C, T, H, W] layout, so that losses see every pixel value.
        `frame_actions` [B, 1 + 4 (F - 1), features]: each video frame's action features, for a decoder
        shown them (`decoder_frame_actions`; see nn/frame_actions.py).
        """
        z = _checked_tensor(z, "z", "[B, z_dim, F, h, w]", channels=self.z_dim).to(device=self.device, dtype=self.dtype)
        x = self._decoder_input(z)
        cache = self.new_decoder_cache(z.shape[0])
        latents, factor = x.shape[2], self.temporal_factor
        if frame_actions is not None and tuple(frame_actions.shape[:2]) != (z.shape[0], 1 + factor * (latents - 1)):
            raise ValueError(
                f"frame_actions must be [B={z.shape[0]}, T={1 + factor * (latents - 1)}, features] for {latents} "
                f"latent frames, got {tuple(frame_actions.shape)}"
            )
        chunks = []
        for i in range(latents):
            frames = None if frame_actions is None else frame_actions[:, max(0, 1 + factor * (i - 1)) : 1 + factor * i]
            chunks.append(self.decoder(x[:, :, i : i + 1], cache, frame_actions=frames))
        return torch.cat(chunks, dim=2)

    def normalise(self, mu: torch.Tensor) -> torch.Tensor:
        """Unnormalised posterior means -> the model's latents, (mu - latent_mean) / latent_std per channel."""
        return self._normalise(mu)

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        """The model's latents -> unnormalised ones (what `decode_unnormalised` takes): the inverse of `normalise`."""
        return self._denormalise(latents)

    def set_latent_statistics(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Replace the per-channel latent mean and std (e.g. measured on a dataset after training)."""
        if len(mean) != self.z_dim or len(std) != self.z_dim:
            raise ValueError(f"need z_dim={self.z_dim} values each, got {len(mean)} and {len(std)}")
        if min(std) <= 0:
            raise ValueError(f"latent_std must be positive, got {list(std)}")
        self.latent_mean.copy_(torch.tensor(list(mean), dtype=torch.float32))
        self.latent_std.copy_(torch.tensor(list(std), dtype=torch.float32))
        self._config["latent_mean"] = [float(m) for m in mean]
        self._config["latent_std"] = [float(s) for s in std]

    # Latent normalisation, written as the official code computes it: 1/std first, in float32.

    def _normalise(self, mu: torch.Tensor) -> torch.Tensor:
        mean, inv_std = self._latent_statistics(mu)
        return (mu - mean) * inv_std

    def _denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        mean, inv_std = self._latent_statistics(latents)
        return latents / inv_std + mean

    def _latent_statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_std = 1.0 / self.latent_std.float()
        shape = (1, self.z_dim, 1, 1, 1)
        return self.latent_mean.to(like.dtype).view(shape), inv_std.to(like.dtype).view(shape)

    # Input checks

    def _checked_pixels(self, pixels: torch.Tensor, name: str, layout: str) -> torch.Tensor:
        """Checks a video [B, 3, T, H, W] or image [B, 3, H, W] and casts it to the weights' dtype and device."""
        pixels = _checked_tensor(pixels, name, layout, channels=3)
        height, width = pixels.shape[-2:]
        if height % self.spatial_factor or width % self.spatial_factor:
            raise ValueError(
                f"{name} height and width must be multiples of {self.spatial_factor}, got {height}x{width}"
            )
        return pixels.to(device=self.device, dtype=self.dtype)

    def _checked_latents(self, latents: torch.Tensor, check_finite: bool = True) -> torch.Tensor:
        latents = _checked_tensor(latents, "latents", "[B, z_dim, F, h, w]", self.z_dim, check_finite)
        return latents.to(device=self.device, dtype=self.dtype)

    def _check_decoder_cache(self, cache: DecoderCache, latents: torch.Tensor) -> None:
        if not isinstance(cache, DecoderCache) or len(cache.slots) != self.decoder.num_cache_slots:
            raise ValueError(f"cache must come from this model's new_decoder_cache(), got {type(cache).__name__}")
        if cache.batch_size != latents.shape[0]:
            raise ValueError(
                f"latents have batch size {latents.shape[0]} but the cache holds {cache.batch_size} worlds"
            )
        past = cache.slots[self.decoder.conv1.cache_slot]
        if past is None:
            return
        if past.shape[-2:] != latents.shape[-2:]:
            raise ValueError(
                f"latents are {tuple(latents.shape[-2:])} (h, w) but the cache was filled at {tuple(past.shape[-2:])}"
            )
        if past.device != self.device or past.dtype != self.dtype:
            raise ValueError(
                f"cache is on {past.device} in {past.dtype} but the model on {self.device} in {self.dtype}; "
                "use cache.to(device, dtype)"
            )


def _checked_tensor(
    tensor: torch.Tensor, name: str, layout: str, channels: int, check_finite: bool = True
) -> torch.Tensor:
    """Checks dimensions, channel count, non-empty sizes and finiteness against `layout` (e.g. "[B, 3, H, W]")."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {layout}, got {type(tensor).__name__}")
    ndim = layout.count(",") + 1
    if tensor.ndim != ndim:
        raise ValueError(f"{name} must be {layout} ({ndim} dims), got shape {tuple(tensor.shape)}")
    if tensor.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels in dim 1 of {layout}, got shape {tuple(tensor.shape)}")
    if tensor.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if check_finite and not torch.isfinite(tensor).all():
        raise ValueError(f"{name} must be finite, got NaN or infinite values")
    return tensor
