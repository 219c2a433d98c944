"""Opening the encoded clips (`train encode` output) for the DiT stages, checked against the model."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..data.dataset import evenly_spaced
from ..model_config import ModelConfig
from ..nn.vae import WanVAE
from .common import StageError
from .conditions import ClipBatch
from .encode import LatentClipDataset, read_latent_index


def open_latent_splits(
    root: str | Path, config: ModelConfig, vae: WanVAE, num_frames: int | None, frames_per_block: int
) -> tuple[LatentClipDataset, LatentClipDataset | None]:
    """(train, val or None) clips of `num_frames` latent frames (default: as encoded), checked to fit
    the model: same latent size, encoded with the model's VAE statistics, whole blocks."""
    try:
        index = read_latent_index(root)
    except (FileNotFoundError, ValueError) as error:
        raise StageError(f"{error}") from error
    if tuple(index["latent_size"]) != tuple(config.latent_size) or index["z_dim"] != config.dit["out_dim"]:
        raise StageError(
            f"{root} holds latents {index['z_dim']} x {index['latent_size']}, the model needs "
            f"{config.dit['out_dim']} x {list(config.latent_size)}"
        )
    stats = vae.config["latent_mean"], vae.config["latent_std"]
    if not _close(stats, (index["latent_mean"], index["latent_std"])):
        raise StageError(f"{root} was encoded with another VAE than the model's ({index['model']})")
    frames = num_frames or index["latent_frames"]
    if frames % frames_per_block or not frames_per_block <= frames <= index["latent_frames"]:
        raise StageError(
            f"--frames must be a multiple of {frames_per_block} up to the encoded {index['latent_frames']}, "
            f"got {frames}; encode longer clips (train encode --latent-frames) for more"
        )
    train = LatentClipDataset(root, "train", frames)
    val = (
        LatentClipDataset(root, "val", frames) if "val" in index["splits"] and index["splits"]["val"]["clips"] else None
    )
    return train, val


def fixed_batches(dataset: Dataset, count: int, batch_size: int) -> list[ClipBatch]:
    """Up to `count` clips spread evenly over the dataset, in batches (the same every session)."""
    chosen = evenly_spaced(len(dataset), count)
    batches = []
    for start in range(0, len(chosen), batch_size):
        items = [dataset[i] for i in chosen[start : start + batch_size]]
        batches.append(ClipBatch.from_item({key: torch.stack([item[key] for item in items]) for key in items[0]}))
    return batches


def _close(a: tuple[list[float], list[float]], b: tuple[list[float], list[float]]) -> bool:
    return all(math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-6) for p, q in zip(a, b) for x, y in zip(p, q))
