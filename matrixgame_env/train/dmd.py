"""Distribution matching distillation (DMD): the student's update from two score estimates.

The student's clip x is noised to one random level t; the frozen diffusion-forcing teacher (the
"real" score) and the online critic (the "fake" score, trained on the student's own samples) each
predict x0 from it. Moving x along x0_fake - x0_real lowers the KL divergence from the data
distribution to the student's; dividing by mean |x - x0_real| per clip keeps the step size
independent of the noise level. The loss 0.5 ||x - stopgrad(x - g)||^2 has exactly that gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..nn.dit import CausalDiT
from ..nn.scheduler import FlowMatchScheduler
from .conditions import ClipConditions


@dataclass
class DMDOutput:
    loss: torch.Tensor  # backpropagate into the student
    timestep: torch.Tensor  # [B] the level each clip was scored at


class DistributionMatching:
    """The DMD generator loss with a causal teacher and critic queried under the block-causal mask."""

    def __init__(
        self,
        scheduler: FlowMatchScheduler,
        min_level: float = 0.02,
        max_level: float = 0.98,
        guidance_scale: float = 1.0,
    ) -> None:
        if not 0 <= min_level < max_level <= 1:
            raise ValueError(f"need 0 <= min_level < max_level <= 1, got {min_level}, {max_level}")
        self.scheduler = scheduler
        n = scheduler.num_train_timesteps
        # Levels as fractions of the unshifted schedule (table index i <-> level 1 - i / n).
        self.index_range = (int(round((1 - max_level) * n)), int(round((1 - min_level) * n)))
        self.guidance_scale = guidance_scale

    def sample_index(
        self, batch: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One schedule-table index per clip, [B] long."""
        low, high = self.index_range
        return torch.randint(low, high, (batch,), generator=generator, device=device)

    def loss(
        self,
        sample: torch.Tensor,
        teacher: CausalDiT,
        critic: CausalDiT,
        conditions: ClipConditions,
        frame_mask: torch.Tensor,
        generator: torch.Generator | None = None,
        index: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> DMDOutput:
        """DMD loss of the student's clip `sample` [B, C, F, h, w] (with gradient)."""
        batch, num_frames = sample.shape[0], sample.shape[2]
        if index is None:
            index = self.sample_index(batch, sample.device, generator)
        if noise is None:
            noise = torch.randn(sample.shape, generator=generator, device=sample.device)
        sigma = self.scheduler.sigmas.to(sample.device)[index]
        timestep = self.scheduler.timesteps.to(sample.device)[index][:, None].expand(batch, num_frames)
        with torch.no_grad():
            x = sample.detach().float()
            s = sigma[:, None, None, None, None]
            x_t = (1 - s) * x + s * noise.float()

            def x0(model: CausalDiT, c: ClipConditions) -> torch.Tensor:
                flow = model(x_t, c.cond, timestep, frame_mask=frame_mask, **c.model_kwargs())
                return x_t - s * flow.float()

            x0_real = x0(teacher, conditions)
            if self.guidance_scale != 1.0:
                unconditional = x0(teacher, without_actions(conditions))
                x0_real = unconditional + self.guidance_scale * (x0_real - unconditional)
            x0_fake = x0(critic, conditions)
            normaliser = (x - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
            gradient = torch.nan_to_num((x0_fake - x0_real) / normaliser)
        loss = 0.5 * F.mse_loss(sample.float(), (sample.float() - gradient).detach())
        return DMDOutput(loss=loss, timestep=timestep[:, 0])


def without_actions(conditions: ClipConditions) -> ClipConditions:
    """The same conditions with all actions zeroed (the action-dropout 'unconditional' input)."""

    def zero(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else torch.zeros_like(t)

    return replace(
        conditions, keyboard_windows=zero(conditions.keyboard_windows), mouse_windows=zero(conditions.mouse_windows)
    )
