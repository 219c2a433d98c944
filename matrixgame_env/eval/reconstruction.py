"""How a model's VAE round trip (encode, then decode) renders real clips: PSNR and frame statistics.

The decoder sets a ceiling on every generated frame, so its round trip is compared with the real
frames on the statistics the drift check uses (`drift.frame_statistics`), plus a temporal error: the
mean absolute difference between the round trip's and the real frame-to-frame changes, in grey
levels (flicker, or motion lost, raise it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..data.dataset import VideoClipDataset, evenly_spaced
from ..world.model import WorldModel
from .drift import STATISTICS, frame_statistics
from .fidelity import reconstruct_clips


def real_clips(data: str, clip_frames: int, count: int, split: str = "val", val_fraction: float = 0.1,
               size: tuple[int, int] | None = None) -> torch.Tensor:  # fmt: skip
    """`count` clips spread evenly over a split of a recording -> uint8 [K, T, H, W, 3]."""
    clips = VideoClipDataset(data, clip_frames=clip_frames, split=split, val_fraction=val_fraction, size=size)
    video = torch.stack([clips[i]["video"] for i in evenly_spaced(len(clips), count)])  # [K, 3, T, H, W] in [-1, 1]
    return ((video.permute(0, 2, 3, 4, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def frames_report(frames: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    """PSNR against `real`, the mean of each frame statistic and the temporal error of uint8 frames
    [K, T, H, W, 3] of the same shape as `real`."""
    if frames.shape != real.shape:
        raise ValueError(f"frames {tuple(frames.shape)} and real frames {tuple(real.shape)} differ in shape")
    x, r = frames.double(), real.double()
    mse = float((x - r).pow(2).mean())
    report = {"psnr_db": float("inf") if mse == 0 else 10 * float(np.log10(255.0**2 / mse))}
    statistics = frame_statistics(frames)
    for name in STATISTICS:
        report[name] = float(statistics[name].double().nanmean())
    changes, real_changes = x[:, 1:] - x[:, :-1], r[:, 1:] - r[:, :-1]
    report["temporal_error"] = float((changes - real_changes).abs().mean())
    return report


def reconstruction_report(worlds: Sequence[tuple[str, WorldModel]], real: torch.Tensor) -> dict[str, dict]:
    """{"real": ..., name: ...} of `frames_report` for the real clips and each world's round trip."""
    report = {"real": frames_report(real, real)}
    for name, world in worlds:
        with torch.no_grad():
            report[name] = frames_report(reconstruct_clips(world, real), real)
    return report
