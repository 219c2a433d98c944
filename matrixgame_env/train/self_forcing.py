"""Self-forcing rollouts: the few-step streaming sampler, run with a gradient on one step per block.

The student generates a clip block by block through the real inference path (`StreamingSampler`'s
timesteps, ring KV caches, x0 conversion, re-noising, clean context re-run), so training sees
exactly the inputs inference produces. Per block, a random exit step ends the denoising early:
the steps before it run without gradient, the exit step runs with gradient and its x0 is the
block's output, and the clean context re-run (no gradient) then refreshes the caches.

The gradient step must not write its keys into the shared caches: the context re-run overwrites
those slots in place, which would invalidate tensors autograd saved. It therefore attends through
a private copy of the caches; since the re-run rewrites the same slots, the caches end up exactly
as inference leaves them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..nn.action import ActionCaches
from ..nn.dit import CausalDiT, LayerCaches
from ..world.cache import RingKVCache
from ..world.sampler import SamplerConfig, StreamingSampler
from .conditions import ClipConditions


class SelfForcingRollout:
    """Generates training clips with a student DiT exactly as `StreamingSampler` streams them."""

    def __init__(self, model: CausalDiT, config: SamplerConfig, latent_size: tuple[int, int]) -> None:
        self.model = model
        self.sampler = StreamingSampler(model, config, latent_size=latent_size)

    @property
    def num_steps(self) -> int:
        return len(self.sampler.timesteps)

    @property
    def frames_per_block(self) -> int:
        return self.sampler.config.frames_per_block

    def random_exit_steps(self, num_blocks: int, generator: torch.Generator | None = None) -> list[int]:
        """One exit step per block, uniform over the denoising steps."""
        device = generator.device if generator is not None else "cpu"
        return torch.randint(0, self.num_steps, (num_blocks,), generator=generator, device=device).tolist()

    def __call__(
        self,
        conditions: ClipConditions,
        noise: torch.Tensor,
        exit_steps: Sequence[int] | None = None,
        renoise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Generate latents [B, C, F, h, w] for clips of F = len(noise frames) latent frames.

        noise [B, C, F, h, w] starts every block; `renoise` [steps - 1, B, C, F, h, w] replaces the
        fresh noise drawn between steps; `exit_steps` (one per block, default random) picks the
        step whose x0 is kept. The exit steps run under the caller's grad mode, all else without.
        """
        model, sampler = self.model, self.sampler
        batch, _, num_frames = noise.shape[:3]
        fpb = self.frames_per_block
        if num_frames % fpb:
            raise ValueError(f"clips must hold whole blocks of {fpb} latent frames, got {num_frames}")
        num_blocks = num_frames // fpb
        exit_steps = list(exit_steps) if exit_steps is not None else self.random_exit_steps(num_blocks, generator)
        if len(exit_steps) != num_blocks or not all(0 <= k < self.num_steps for k in exit_steps):
            raise ValueError(
                f"need one exit step in 0..{self.num_steps - 1} per block ({num_blocks}), got {exit_steps}"
            )
        with_grad = torch.is_grad_enabled()
        with torch.no_grad():  # fresh caches; the image latents of `cond` follow its mask channels
            image = conditions.cond[:, -model.config.out_dim :, :1].float()
            state = sampler.start(image, conditions.visual_context.detach().float(), seed=0)
        context = model.context_kv(conditions.visual_context) if with_grad else state.context

        blocks = []
        timestep = torch.empty(batch, fpb, device=noise.device)
        for block, exit_step in enumerate(exit_steps):
            start = block * fpb
            block_conditions = conditions.frames(start, start + fpb)
            kwargs = dict(
                context=context,
                mouse_windows=block_conditions.mouse_windows,
                keyboard_windows=block_conditions.keyboard_windows,
                start_frame=start,
            )
            x = noise[:, :, start : start + fpb].float()
            for k in range(exit_step + 1):
                exiting = k == exit_step
                caches = private_copy(state.caches) if exiting and with_grad else state.caches
                with torch.set_grad_enabled(exiting and with_grad):
                    flow = model(
                        x, block_conditions.cond, timestep.fill_(sampler.timesteps[k]), caches=caches, **kwargs
                    )
                    x0 = (x.double() - sampler.sigmas[k] * flow.double()).float()
                if not exiting:
                    sigma = sampler.sigmas[k + 1]
                    eps = renoise[k, :, :, start : start + fpb] if renoise is not None else self._draw(x, generator)
                    x = (1 - sigma) * x0 + sigma * eps.float()
            blocks.append(x0)
            with torch.no_grad():  # clean context re-run: leaves the caches as inference does
                model(
                    x0.detach(),
                    block_conditions.cond,
                    timestep.fill_(sampler.config.context_noise),
                    caches=state.caches,
                    **kwargs,
                )
        return torch.cat(blocks, dim=2)

    @staticmethod
    def _draw(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return torch.randn(like.shape, generator=generator, device=like.device)


def private_copy(caches: list[LayerCaches]) -> list[LayerCaches]:
    """Copies of every layer's caches, for a call whose writes must not reach the originals."""

    def copy(cache: RingKVCache | None) -> RingKVCache | None:
        return None if cache is None else cache.clone()

    return [
        LayerCaches(
            copy(layer.self_attn),
            None if layer.action is None else ActionCaches(copy(layer.action.mouse), copy(layer.action.keyboard)),
        )
        for layer in caches
    ]
