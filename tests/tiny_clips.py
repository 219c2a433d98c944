"""Synthetic training clips for the tiny world model (video 16x32, latents 2x4, DiT dim 32)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from matrixgame_env.model_config import ModelConfig
from matrixgame_env.nn.vae import WanVAE
from matrixgame_env.train.conditions import ClipBatch
from matrixgame_env.train.encode import LATENT_FORMAT, LATENT_FORMAT_VERSION
from matrixgame_env.weights import save_safetensors


def random_clips(
    config: ModelConfig, batch: int = 2, frames: int = 12, seed: int = 0, image_latents: bool = False
) -> ClipBatch:
    """B clips of `frames` latent frames with video-rate actions and uint8 start pictures (and random
    stand-ins for the precomputed image latents, when asked)."""
    g = torch.Generator().manual_seed(seed)
    (h, w), (height, width) = config.latent_size, config.video_size
    video_frames = 1 + 4 * (frames - 1)
    return ClipBatch(
        latents=torch.randn(batch, 16, frames, h, w, generator=g),
        keyboard=(torch.rand(batch, video_frames, 4, generator=g) > 0.5).float(),
        mouse=0.1 * torch.randn(batch, video_frames, 2, generator=g),
        first_frame=torch.randint(0, 256, (batch, height, width, 3), generator=g, dtype=torch.uint8),
        image_latents=torch.randn(batch, 16, frames, h, w, generator=g) if image_latents else None,
    )


def block_bounds(num_blocks: int) -> list[tuple[int, int]]:
    """Video-frame ranges of the actions of each streamed block: [0, 9), [9, 21), ..."""
    bounds, start = [], 0
    for block in range(num_blocks):
        stop = 9 if block == 0 else start + 12
        bounds.append((start, stop))
        start = stop
    return bounds


def write_latent_dataset(
    root: Path, config: ModelConfig, clips: dict[str, int], frames: int = 6, seed: int = 0
) -> Path:
    """A `train encode` output folder of random clips: {split: number of clips}."""
    splits = {}
    for number, (split, count) in enumerate(clips.items()):
        clip = random_clips(config, count, frames, seed + number, image_latents=True)
        shard = {
            "latents": clip.latents.half(),
            "image_latents": clip.image_latents.half(),
            "first_frame": clip.first_frame,
            "keyboard": clip.keyboard,
            "mouse": clip.mouse,
            "variables": torch.zeros(count, clip.keyboard.shape[1], 1),
        }
        (root / split).mkdir(parents=True, exist_ok=True)
        save_safetensors(shard, root / split / "shard_00000.safetensors")
        splits[split] = {"clips": count, "shards": ["shard_00000.safetensors"]}
    vae = WanVAE.from_config(config.vae).config  # the statistics the model's VAE normalises with
    (h, w), (height, width) = config.latent_size, config.video_size
    index = {
        "format": LATENT_FORMAT,
        "format_version": LATENT_FORMAT_VERSION,
        "complete": True,
        "model": "tiny",
        "latent_frames": frames,
        "video_frames": 1 + 4 * (frames - 1),
        "video_size": [height, width],
        "latent_size": [h, w],
        "z_dim": vae["z_dim"],
        "keyboard": ["forward", "back", "left", "right"],
        "mouse": ["pitch", "yaw"],
        "variables": ["HEALTH"],
        "latent_mean": vae["latent_mean"],
        "latent_std": vae["latent_std"],
        "splits": splits,
    }
    (root / "index.json").write_text(json.dumps(index))
    return root
