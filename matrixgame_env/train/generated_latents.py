"""Latents a world model generates, for training its decoder on what the DiT makes.

A decoder trained on the encoder's latents meets other latents in play: the DiT's, which are softer
and drift from the encoder's over a rollout; rendered by an adversarially sharpened decoder they
lose what the judge reads (models/doom-small/README.md). `train vae --decoder-only --generated-from
MODEL` therefore also decodes latents MODEL generates from starts of the recording's train split,
under their recorded actions, and trains the decoder on them with the patch discriminator (unpaired:
there is no true video for them) and an anchor: their decoding, blurred, must stay that of MODEL's
own decoder, the one its video was judged through (so content and motion stay, only detail is
added). The decoder may start elsewhere (`--init`, e.g. an adversarially sharpened one of the same
latent space). The pool is generated once per run and kept in the run's folder, so resumed sessions
decode the same latents.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..eval.fidelity import FIRST_BLOCK_FRAMES, roll_out
from ..eval.real_data import FrameWindows, resize_frames
from ..world.model import WorldModel

POOL_FILE = "generated_latents.pt"
ANCHOR_POOL = 4  # the anchor compares decodings averaged over 4x4 pixels: content, not detail


@torch.no_grad()
def generate_latent_pool(
    model: str | os.PathLike,
    data: str | os.PathLike,
    count: int,
    blocks: int,
    val_fraction: float,
    device: torch.device | str,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """The normalised latents [count, z, 3 * blocks, h, w] (float32, CPU) that `model` generates over
    `blocks` blocks from the first frames of `count` windows spread over the train split of the
    recording `data`, under the windows' recorded actions; and the model's latent statistics."""
    world = WorldModel.from_pretrained(model, device=device)
    length = FIRST_BLOCK_FRAMES + world.frames_per_block * (blocks - 1)
    windows = FrameWindows(data, "train", length, val_fraction, stride=length)
    items = windows.stack(windows.evenly_spaced(count))
    starts = resize_frames(items["frames"][:, :1], world.video_size)[:, 0]
    latents = roll_out(
        world, world.step_latents, 2, starts, items["keyboard"], items["mouse"], batch_size, seed, progress
    )
    statistics = {name: list(world.vae.config[name]) for name in ("latent_mean", "latent_std")}
    return latents.float(), statistics


def save_pool(path: Path, latents: torch.Tensor, statistics: dict[str, list[float]], source: str) -> None:
    """Writes a pool atomically (a half-written pool is never read back)."""
    partial = path.with_name(path.name + ".partial")
    torch.save({"latents": latents.contiguous(), "statistics": statistics, "source": source}, partial)
    os.replace(partial, path)


def load_pool(path: Path) -> tuple[torch.Tensor, dict[str, list[float]], str]:
    """A pool written by `save_pool` (tensors and plain values only: weights_only)."""
    stored = torch.load(path, map_location="cpu", weights_only=True)
    return stored["latents"], stored["statistics"], stored["source"]


def latent_windows(pool: torch.Tensor, count: int, frames: int, generator: torch.Generator) -> torch.Tensor:
    """`count` windows of `frames` consecutive latent frames, each from a random clip of the pool at a
    random position: [count, z, frames, h, w]."""
    clips, _, length = pool.shape[:3]
    if frames > length:
        raise ValueError(f"windows of {frames} latent frames need clips of at least that many, the pool has {length}")
    chosen = torch.randint(clips, (count,), generator=generator)
    starts = torch.randint(length - frames + 1, (count,), generator=generator)
    return torch.stack([pool[c, :, s : s + frames] for c, s in zip(chosen.tolist(), starts.tolist())])


def anchor_loss(decoded: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance of two videos [B, 3, T, H, W] averaged over 4x4 pixels (float32): charges a
    change of content or motion, not added detail."""

    def pooled(video: torch.Tensor) -> torch.Tensor:
        return F.avg_pool3d(video.float(), (1, ANCHOR_POOL, ANCHOR_POOL), ceil_mode=True)

    return (pooled(decoded) - pooled(reference)).abs().mean()
