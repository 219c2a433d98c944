"""Diffusion forcing: flow matching with a noise level per latent frame, under the block-causal mask.

Each clip gets its noise levels from one of four patterns, so that the causal DiT learns every
situation the streaming sampler and the distillation put it in:
- per frame: an independent level for every latent frame (diffusion forcing proper);
- per block: one level per block of `frames_per_block` frames (what the sampler feeds a block);
- uniform: one level for the whole clip (what the DMD teacher and critic are queried with);
- clean context: the first c blocks are the clean latents at the context timestep, later blocks
  noisy (per block), as in streaming, where the past was re-run clean into the caches.
Clean context frames carry no loss: there is nothing to predict about them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..nn.attention import block_causal_frame_mask
from ..nn.dit import CausalDiT
from ..nn.scheduler import FlowMatchScheduler
from .conditions import ClipConditions


@dataclass(frozen=True)
class NoiseMix:
    """Share of clips drawn with each noise pattern; the rest get one level per frame."""

    per_block: float = 0.3
    uniform: float = 0.1
    clean_context: float = 0.3

    def __post_init__(self) -> None:
        shares = (self.per_block, self.uniform, self.clean_context)
        if min(shares) < 0 or sum(shares) > 1:
            raise ValueError(f"noise pattern shares must be >= 0 and sum to at most 1, got {shares}")


@dataclass
class NoisyClip:
    """A clip noised for flow matching."""

    x_t: torch.Tensor  # [B, C, F, h, w] model input
    timestep: torch.Tensor  # [B, F] float timesteps on the 0..1000 scale
    target: torch.Tensor  # [B, C, F, h, w] velocity noise - x0
    weight: torch.Tensor  # [B, F] loss weight per frame (scheduler weight; 0 for clean context)


@dataclass
class ForcingLoss:
    """The weighted loss to optimise and the plain flow MSE over the noisy frames (for logs)."""

    loss: torch.Tensor
    flow_mse: torch.Tensor


class DiffusionForcing:
    """Noise sampling and the flow-matching loss of a causal DiT trained on clips of whole blocks."""

    def __init__(
        self,
        scheduler: FlowMatchScheduler,
        frames_per_block: int = 3,
        window_frames: int | None = 6,
        mix: NoiseMix | None = None,
        context_timestep: float = 0.0,
    ) -> None:
        self.scheduler = scheduler
        self.frames_per_block = frames_per_block
        self.window_frames = window_frames
        self.mix = mix or NoiseMix()
        self.context_timestep = context_timestep

    def frame_mask(self, num_frames: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The block-causal [F, F] mask with the sampler's attention window."""
        self._check_frames(num_frames)
        return block_causal_frame_mask(num_frames, self.frames_per_block, self.window_frames).to(device)

    def sample_levels(
        self, batch: int, num_frames: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(table index [B, F] long, clean [B, F] bool) drawn with the `NoiseMix` patterns."""
        self._check_frames(num_frames)
        fpb, n = self.frames_per_block, self.scheduler.num_train_timesteps
        blocks = num_frames // fpb

        def draw(*shape: int) -> torch.Tensor:
            return torch.randint(0, n, shape, generator=generator, device=device)

        per_frame = draw(batch, num_frames)
        per_block = draw(batch, blocks).repeat_interleave(fpb, dim=1)
        uniform = draw(batch, 1).expand(batch, num_frames)
        # One pattern per clip: [0, a) per block, [a, b) clean context, [b, c) uniform, the rest per frame.
        a = self.mix.per_block
        b = a + self.mix.clean_context
        c = b + self.mix.uniform
        choice = torch.rand(batch, 1, generator=generator, device=device)
        has_context = (choice >= a) & (choice < b) & (blocks > 1)
        index = torch.where(choice < b, per_block, per_frame)
        index = torch.where((choice >= b) & (choice < c), uniform, index)
        # Clean-context clips: blocks 0 .. k-1 clean, k in 1 .. blocks-1.
        clean_blocks = torch.randint(1, max(blocks, 2), (batch, 1), generator=generator, device=device)
        frame = torch.arange(num_frames, device=device)[None, :]
        clean = has_context & (frame < clean_blocks * fpb)
        return index, clean

    def noise(
        self, x0: torch.Tensor, noise: torch.Tensor, index: torch.Tensor, clean: torch.Tensor | None = None
    ) -> NoisyClip:
        """x_t = (1 - sigma) x0 + sigma noise per frame; clean frames stay x0 at the context timestep."""
        table = self.scheduler
        sigma = table.sigmas.to(x0.device)[index]
        timestep = table.timesteps.to(x0.device)[index]
        weight = table.training_weights.to(x0.device)[index]
        if clean is not None:
            sigma = sigma.masked_fill(clean, 0.0)
            timestep = timestep.masked_fill(clean, self.context_timestep)
            weight = weight.masked_fill(clean, 0.0)
        s = sigma[:, None, :, None, None]
        x_t = (1 - s) * x0.float() + s * noise.float()
        return NoisyClip(x_t, timestep, table.velocity_target(x0.float(), noise.float()), weight)

    def loss(
        self,
        model: CausalDiT,
        x0: torch.Tensor,
        conditions: ClipConditions,
        generator: torch.Generator | None = None,
        noisy: NoisyClip | None = None,
    ) -> ForcingLoss:
        """Diffusion-forcing loss of `model` on clean latents x0 [B, C, F, h, w].

        `noisy` replaces the random noise levels and noise (fixed validation batches).
        """
        batch, _, num_frames = x0.shape[:3]
        if noisy is None:
            index, clean = self.sample_levels(batch, num_frames, x0.device, generator)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device)
            noisy = self.noise(x0, noise, index, clean)
        flow = model(
            noisy.x_t,
            conditions.cond,
            noisy.timestep,
            frame_mask=self.frame_mask(num_frames, x0.device),
            **conditions.model_kwargs(),
        )
        return flow_matching_loss(flow, noisy.target, noisy.weight)

    def _check_frames(self, num_frames: int) -> None:
        if num_frames % self.frames_per_block:
            raise ValueError(f"clips must hold whole blocks of {self.frames_per_block} latent frames, got {num_frames}")


def flow_matching_loss(flow: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> ForcingLoss:
    """Weighted per-frame MSE, averaged over the frames that carry loss (weight > 0 somewhere)."""
    per_frame = (flow.float() - target.float()).pow(2).mean(dim=(1, 3, 4))  # [B, F]
    counted = (weight > 0).float()
    frames = counted.sum().clamp(min=1)
    return ForcingLoss(loss=(per_frame * weight).sum() / frames, flow_mse=(per_frame * counted).sum().detach() / frames)
