"""Flow-matching noise schedule (shifted), as used by Matrix-Game 2.0 for training and sampling."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class FlowMatchScheduler:
    """Shifted flow-matching schedule over `num_train_timesteps` levels.

    sigma_i = shift * u_i / (1 + (shift - 1) * u_i) with u_i = linspace(1, 0, N + 1)[i], i < N,
    and timestep t_i = N * sigma_i (float32, descending from N to about 5 for shift 5).
    A noisy sample is x_t = (1 - sigma) x0 + sigma noise; the model predicts the velocity noise - x0.
    """

    def __init__(self, shift: float = 5.0, num_train_timesteps: int = 1000) -> None:
        self.shift = float(shift)
        self.num_train_timesteps = int(num_train_timesteps)
        n = self.num_train_timesteps
        unshifted = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float32)[:-1]
        self.sigmas = self.shift * unshifted / (1 + (self.shift - 1) * unshifted)
        self.timesteps = self.sigmas * n
        # Training weight: a Gaussian bump over the timestep index, normalised to mean 1.
        bump = torch.exp(-2 * ((self.timesteps - n / 2) / n) ** 2)
        shifted = bump - bump.min()
        self.training_weights = shifted * (n / shifted.sum())

    def warp(self, steps: Sequence[float]) -> list[float]:
        """Map a step list such as [1000, 666, 333] onto the shifted schedule.

        Step s becomes the timestep at index N - s of [timesteps..., 0]: [1000, 666, 333] ->
        [1000.0, 908.84, 713.98] for shift 5.
        """
        table = torch.cat([self.timesteps, torch.zeros(1)])
        out = []
        for s in steps:
            index = self.num_train_timesteps - int(s)
            if not 0 <= index <= self.num_train_timesteps:
                raise ValueError(f"denoising step {s} outside 0..{self.num_train_timesteps}")
            out.append(float(table[index]))
        return out

    def index(self, timestep: torch.Tensor | float) -> torch.Tensor:
        """Index of the nearest table timestep (for t = 0 that is the last entry, sigma ~ 0.005)."""
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1, 1)
        return (self.timesteps.to(t.device)[None, :] - t).abs().argmin(dim=1)

    def sigma(self, timestep: torch.Tensor | float) -> torch.Tensor:
        """sigma of the nearest table entry, float32, one per given timestep (flattened)."""
        t = torch.as_tensor(timestep, dtype=torch.float32)
        return self.sigmas.to(t.device)[self.index(t)]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
        """x_t = (1 - sigma) x0 + sigma noise; one timestep per leading index of x0, or a scalar."""
        sigma = _broadcast(self.sigma(timestep).to(x0.device), x0)
        return ((1 - sigma) * x0 + sigma * noise).to(x0.dtype)

    def flow_to_x0(self, flow: torch.Tensor, x_t: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
        """x0 = x_t - sigma flow, computed in float64 and cast back to x_t's dtype."""
        sigma = _broadcast(self.sigma(timestep).to(x_t.device, torch.float64), x_t)
        return (x_t.double() - sigma * flow.double()).to(x_t.dtype)

    def velocity_target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The regression target of flow matching: noise - x0."""
        return noise - x0


def _broadcast(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """One sigma per leading index of `like` (or one for all), shaped to broadcast over the rest."""
    if sigma.numel() == 1:
        return sigma.reshape([1] * like.dim())
    if sigma.numel() != like.shape[0]:
        raise ValueError(f"got {sigma.numel()} timesteps for a tensor of leading size {like.shape[0]}")
    return sigma.reshape([-1] + [1] * (like.dim() - 1))
