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
from .fidelity import reconstruct_clips, reconstruct_frames_alone
from .idm import InverseDynamicsModel, judge_clips

Judge = tuple[InverseDynamicsModel, torch.Tensor, torch.Tensor]


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


def reconstruction_report(
    worlds: Sequence[tuple[str, WorldModel]], real: torch.Tensor, judge: Judge | None = None, frames_alone: bool = False
) -> dict[str, dict]:
    """{"real": ..., name: ...} of `frames_report` for the real clips and each world's round trip.

    With `judge` = (inverse-dynamics model, keyboard [K, T, keys], mouse [K, T, 2]) of the clips, each row
    also holds its keyboard and yaw-direction accuracy ("idm_keys", "idm_yaw"): how much of the actions
    a VAE leaves readable, about what a DiT that renders them as the game does can show through it;
    "idm_by_phase" splits them by where the labelled change falls among the 4-frame latent groups
    (`accuracy_by_phase`), "idm_yaw_by_size" the yaw accuracy by the size of the labelled yaw
    (`judge_clips`). With `frames_alone` each world also gets a row "NAME (frames alone)": every
    frame's round trip on its own (`reconstruct_frames_alone`), without the temporal compression.
    """
    report = {"real": _report_row(real, real, judge)}
    with torch.no_grad():
        for name, world in worlds:
            report[name] = _report_row(reconstruct_clips(world, real), real, judge)
            if frames_alone:
                report[f"{name} (frames alone)"] = _report_row(reconstruct_frames_alone(world, real), real, judge)
    return report


def _report_row(frames: torch.Tensor, real: torch.Tensor, judge: Judge | None) -> dict:
    row = frames_report(frames, real)
    if judge is not None:
        idm, keyboard, mouse = judge
        judged, by_phase, by_size = judge_clips(idm, frames, keyboard, mouse)
        row.update(idm_keys=judged["keyboard"], idm_yaw=judged["yaw_direction"], idm_by_phase=by_phase,
                   idm_yaw_by_size=by_size)  # fmt: skip
    return row
