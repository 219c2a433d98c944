"""A frozen judge of decoded pixels in the distillation: the student's clips must show their actions.

The latent action reader of `train distill --action-weight` names what it finds of each latent frame's
keys in the latents, and it finds little about where inside a latent frame's 4 video frames a key went
down or up, though the decoder renders that timing (the VAE's round trip reads alike at every phase).
With `--pixel-judge IDM --pixel-judge-weight W` the student's update also decodes part of its streamed
clips with the model's own decoder (frozen, with gradients into the latents) and adds W times a frozen
inverse-dynamics model's loss on those frames against the clips' recorded actions (`ActionJudge`), so
the gradient asks for the frames the judge needs, where it needs them. Use another judge than the one
`eval` scores with: the judge's weights hash is kept in the model's config, and `eval` notes when it is
the same model.

A judge of pixels teaches cues that other judges of the same kind read too, whether or not the frames
get truer (`scripts/judge_transfer_pilot.py`: latents optimised against one judge were read far better
than real frames by another, while moving away from the real frames). With `floor` the loss of each
window counts only above the judge's loss on the same window of the VAE round trip of the clip's
recorded latents (the real frames as the model can show them), the keys' and the turn's parts apart:
the student is asked to show each as readably as the game does, not more.
"""

from __future__ import annotations

import os

import torch

from ..nn.vae import WanVAE
from .action_judge import ActionJudge


class DecodedClipJudge:
    """`ActionJudge`'s loss on the decoding of normalised latents by a frozen VAE decoder."""

    def __init__(self, vae: WanVAE, judge: ActionJudge, clips: int, floor: bool = False) -> None:
        """`clips`: how many of a batch's clips (the first ones) are decoded and judged; `floor`: each
        window's loss counts only above the judge's loss on the round trip of the recorded latents."""
        if clips < 1:
            raise ValueError(f"clips must be at least 1, got {clips}")
        self.vae = vae.eval().requires_grad_(False)
        self.judge, self.clips, self.floor = judge, clips, floor

    @classmethod
    def load(
        cls, vae: WanVAE, path: str | os.PathLike, clips: int, device: torch.device | str, floor: bool = False
    ) -> DecodedClipJudge:
        """The IDM folder `path` as the judge, `vae` moved to `device` as the decoder."""
        return cls(vae.to(device), ActionJudge.load(path, device), clips, floor)

    def loss(
        self,
        latents: torch.Tensor,
        keyboard: torch.Tensor,
        mouse: torch.Tensor,
        recorded: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The judge's loss on the first `clips` of latents [B, C, F, h, w] (normalised, as the DiT makes
        them), decoded to 1 + 4 (F - 1) frames, against keyboard [B, T, K] and mouse [B, T, 2] of those
        frames; differentiable in `latents`. With `floor`, `recorded` (the clips' recorded latents, same
        shape) gives each window's floors: the mean over windows of the sum over the keys' and the
        turn's parts of max(0, loss - the round trip's loss)."""
        count = min(self.clips, latents.shape[0])
        frames = 1 + 4 * (latents.shape[2] - 1)
        if keyboard.shape[1] != frames or mouse.shape[1] != frames:
            raise ValueError(
                f"{latents.shape[2]} latent frames decode to {frames} video frames; the actions cover "
                f"{keyboard.shape[1]} (keyboard) and {mouse.shape[1]} (mouse)"
            )
        keyboard, mouse = keyboard[:count], mouse[:count]
        video = self.decode(latents[:count])  # [n, 3, T, H, W]
        if not self.floor:
            return self.judge.loss(video, keyboard, mouse)
        if recorded is None or recorded.shape != latents.shape:
            raise ValueError(f"a judge with a floor needs the recorded latents, shaped {tuple(latents.shape)}")
        with torch.no_grad():
            floor = self.judge.window_losses(self.decode(recorded[:count]), keyboard, mouse)
        return torch.relu(self.judge.window_losses(video, keyboard, mouse) - floor).sum(1).mean()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, C, F, h, w] -> frames [B, 3, 1 + 4 (F - 1), H, W], unclamped, with gradients."""
        return self.vae.decode_unnormalised(self.vae.denormalise(latents))
