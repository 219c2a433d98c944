"""What the DiT sees for a training clip, built exactly as inference builds it.

A clip of F latent frames covers T = 1 + 4(F - 1) video frames; its video frame 0 is the start
picture. Inference conditions every block on: the first-frame mask, the VAE latents of "start
picture followed by zero frames", the image encoder's tokens of the start picture, and 12-frame
action windows that are front-padded with copies of video frame 0. Training uses the same tensors
for the whole clip, so a block's slice of them is what the streaming sampler passes for that block.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..nn.action import action_windows
from ..nn.clip import CLIPVisionEncoder
from ..nn.config import DiTConfig
from ..nn.vae import WanVAE
from ..world.condition import first_frame_mask


@dataclass
class ClipBatch:
    """B training clips of F latent frames."""

    latents: torch.Tensor  # [B, C, F, h, w] normalised VAE latents
    keyboard: torch.Tensor  # [B, T, K] video-rate key states, T = 1 + 4(F - 1)
    mouse: torch.Tensor  # [B, T, 2] video-rate mouse motion
    first_frame: torch.Tensor  # [B, H, W, 3] uint8: video frame 0 of the clip, the start picture
    image_latents: torch.Tensor | None = None  # [B, C, F, h, w] the image condition, when precomputed

    @classmethod
    def from_item(cls, item: dict[str, torch.Tensor], device: torch.device | str | None = None) -> ClipBatch:
        """From a batch of `LatentClipDataset` items (dict of stacked tensors)."""

        def get(key: str) -> torch.Tensor | None:
            value = item.get(key)
            return None if value is None else value.to(device, non_blocking=True)

        return cls(get("latents").float(), get("keyboard"), get("mouse"), get("first_frame"), get("image_latents"))

    @property
    def num_frames(self) -> int:
        return self.latents.shape[2]

    def clips(self, index: slice) -> ClipBatch:
        """The clips `index` of the batch."""
        tensors = (self.latents, self.keyboard, self.mouse, self.first_frame, self.image_latents)
        return ClipBatch(*(None if t is None else t[index] for t in tensors))

    def to(self, device: torch.device | str) -> ClipBatch:
        tensors = (self.latents, self.keyboard, self.mouse, self.first_frame, self.image_latents)
        return ClipBatch(*(None if t is None else t.to(device, non_blocking=True) for t in tensors))


@dataclass
class ClipConditions:
    """Every DiT input of a clip except the latents and the timesteps."""

    cond: torch.Tensor  # [B, mask + image channels, F, h, w]: first-frame mask, image-condition latents
    visual_context: torch.Tensor  # [B, L, clip_dim] image-encoder tokens of the start picture
    keyboard_windows: torch.Tensor | None  # [B, F, window, K]
    mouse_windows: torch.Tensor | None  # [B, F, window, 2]

    def frames(self, start: int, stop: int) -> ClipConditions:
        """The conditions of latent frames [start, stop) (what streaming passes for one block)."""
        return replace(
            self,
            cond=self.cond[:, :, start:stop],
            keyboard_windows=_slice(self.keyboard_windows, start, stop),
            mouse_windows=_slice(self.mouse_windows, start, stop),
        )

    def clips(self, index: slice) -> ClipConditions:
        """The conditions of the clips `index` of the batch."""
        return ClipConditions(
            self.cond[index],
            self.visual_context[index],
            None if self.keyboard_windows is None else self.keyboard_windows[index],
            None if self.mouse_windows is None else self.mouse_windows[index],
        )

    def model_kwargs(self) -> dict[str, torch.Tensor | None]:
        """Keyword arguments of `CausalDiT.forward` other than latents, cond and timestep."""
        return {
            "context": self.visual_context,
            "mouse_windows": self.mouse_windows,
            "keyboard_windows": self.keyboard_windows,
        }


def start_pixels(first_frame: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1], mapped as `images.fit_image` maps pictures."""
    return (first_frame.permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5


@torch.no_grad()
def image_condition(vae: WanVAE, pixels: torch.Tensor, num_frames: int) -> torch.Tensor:
    """VAE latents of each start picture followed by zero frames: [B, z_dim, F, h, w] (no gradient)."""
    condition = vae.encode_image_condition(pixels.to(vae.dtype), num_latent_frames=num_frames)
    return condition.frames(0, num_frames).float()


def clip_action_windows(
    config: DiTConfig, keyboard: torch.Tensor, mouse: torch.Tensor, num_frames: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(keyboard, mouse) windows [B, F, window, C] of a clip whose actions start at video frame 0.

    Indices before frame 0 read frame 0, which is the front padding the streaming sampler uses.
    """
    action = config.action
    if action is None:
        return None, None
    window, compression = action.window_video_frames, action.vae_time_compression_ratio
    needed = 1 + compression * (num_frames - 1)
    if keyboard.shape[1] < needed or mouse.shape[1] < needed:
        raise ValueError(
            f"a clip of {num_frames} latent frames needs {needed} video frames of actions, "
            f"got keyboard {tuple(keyboard.shape)} and mouse {tuple(mouse.shape)}"
        )
    keyboard_windows = mouse_windows = None
    if action.enable_keyboard:
        keyboard_windows = action_windows(keyboard.float(), 0, 0, num_frames, window, compression)
    if action.enable_mouse:
        mouse_windows = action_windows(mouse.float(), 0, 0, num_frames, window, compression)
    return keyboard_windows, mouse_windows


def drop_actions(conditions: ClipConditions, probability: float, generator: torch.Generator | None = None):
    """Zero the action windows of each clip with `probability` (classifier-free-style dropout)."""
    if probability <= 0:
        return conditions
    windows = conditions.keyboard_windows if conditions.keyboard_windows is not None else conditions.mouse_windows
    if windows is None:
        return conditions
    keep = torch.rand(windows.shape[0], generator=generator, device=generator.device if generator else "cpu")
    keep = (keep >= probability).to(windows.device, windows.dtype)[:, None, None, None]
    return replace(
        conditions,
        keyboard_windows=None if conditions.keyboard_windows is None else conditions.keyboard_windows * keep,
        mouse_windows=None if conditions.mouse_windows is None else conditions.mouse_windows * keep,
    )


def build_conditions(
    batch: ClipBatch,
    config: DiTConfig,
    image_encoder: CLIPVisionEncoder,
    vae: WanVAE | None = None,
) -> ClipConditions:
    """The DiT conditions of a clip batch, as inference would build them from its start pictures.

    The image-condition latents come from `batch.image_latents` when precomputed, else from `vae`
    (frozen, no gradient). The image encoder runs under the caller's grad mode, so it trains
    jointly when the caller lets it.
    """
    latents = batch.latents
    b, _, f, h, w = latents.shape
    pixels = start_pixels(batch.first_frame)
    image_latents = batch.image_latents
    if image_latents is None:
        if vae is None:
            raise ValueError("the clips carry no image latents: pass the VAE to encode the start pictures")
        image_latents = image_condition(vae, pixels, f)
    image_latents = image_latents[:, :, :f].to(latents.device, torch.float32)
    mask = first_frame_mask(b, config.in_dim - config.out_dim - image_latents.shape[1], 0, f, h, w, latents.device)
    cond = torch.cat([mask, image_latents], dim=1)
    visual_context = image_encoder(pixels.to(image_encoder.patch_embedding.weight.dtype))
    keyboard_windows, mouse_windows = clip_action_windows(config, batch.keyboard, batch.mouse, f)
    return ClipConditions(cond, visual_context, keyboard_windows, mouse_windows)


def _slice(t: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    return None if t is None else t[:, start:stop]
