"""Fidelity against the real game: generated vs real frames under the same actions from the same start.

For K held-out windows of the recording (a start frame, its real following frames and the recorded
actions), the model generates the same number of frames from the real start frame, with the recorded
action of every video frame. PSNR and SSIM are measured per horizon (video frame i after the start)
for the model, for the copy-last-frame baseline (the start frame held) and for the model's own VAE
reconstruction of the real frames (the best any generation through this VAE can do).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..images import to_uint8_frames
from ..world.model import WorldModel
from ..world.state import WorldState
from .metrics import psnr, ssim

FIRST_BLOCK_FRAMES = 9  # video frames of the first block (1 + 4 (3 - 1)); later blocks add 12
SUMMARY_SECONDS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


def horizon_frames(horizon_s: float, fps: float) -> int:
    """The video frame index `horizon_s` seconds after the start frame (at least 1)."""
    if horizon_s <= 0:
        raise ValueError(f"the horizon must be positive seconds, got {horizon_s}")
    return max(1, math.floor(horizon_s * fps + 0.5))


def clip_frames(world: WorldModel, horizon: int) -> int:
    """Video frames of the fewest whole blocks that reach frame index `horizon` (9, 21, 33, ...)."""
    later = world.frames_per_block
    return FIRST_BLOCK_FRAMES + later * max(0, math.ceil((horizon + 1 - FIRST_BLOCK_FRAMES) / later))


def generate_clips(
    world: WorldModel,
    start_frames: torch.Tensor,
    keyboard: torch.Tensor,
    mouse: torch.Tensor,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """Generate T frames for each of K worlds from its start frame under per-frame actions.

    start_frames uint8 [K, H, W, 3] at the model's size; keyboard [K, T, keys] and mouse [K, T, 2]:
    the action of every video frame (T = 9 + 12 n, whole blocks). Returns uint8 [K, T, H, W, 3] on
    the CPU; world k is seeded with `seed + k`, so a clip does not depend on the batch it is in.
    """
    return roll_out(world, world.step, 1, start_frames, keyboard, mouse, batch_size, seed, progress)


@torch.no_grad()
def roll_out(
    world: WorldModel,
    step: Callable[[WorldState, torch.Tensor, torch.Tensor], torch.Tensor],
    time_dim: int,
    start_frames: torch.Tensor,
    keyboard: torch.Tensor,
    mouse: torch.Tensor,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """What `step(state, keyboard, mouse)` returns for every block of K worlds rolled out as in
    `generate_clips` (the blocks joined along `time_dim`, the clips along dim 0), on the CPU:
    `world.step` gives frames, `world.step_latents` the latents."""
    count, length = keyboard.shape[:2]
    if length < FIRST_BLOCK_FRAMES or (length - FIRST_BLOCK_FRAMES) % world.frames_per_block:
        raise ValueError(f"clips must span whole blocks (9 + {world.frames_per_block} n frames), got {length}")
    blocks = 1 + (length - FIRST_BLOCK_FRAMES) // world.frames_per_block
    clips = []
    with tqdm(total=count * blocks, desc="generate", unit="block", disable=not progress) as bar:
        for first in range(0, count, batch_size):
            chosen = slice(first, min(first + batch_size, count))
            size = chosen.stop - chosen.start
            state = world.start(list(start_frames[chosen].numpy()), seed=[seed + k for k in range(first, chosen.stop)])
            outputs, position = [], 0
            while position < length:
                n = world.sampler.video_frames_for_block(state)
                block_keyboard = keyboard[chosen, position : position + n].to(world.device)
                block_mouse = mouse[chosen, position : position + n].to(world.device)
                outputs.append(step(state, block_keyboard, block_mouse).cpu())
                position += n
                bar.update(size)
            clips.append(torch.cat(outputs, dim=time_dim))
    return torch.cat(clips)


@torch.no_grad()
def reconstruct_clips(world: WorldModel, frames: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """The model's VAE round trip of real clips, uint8 [K, T, H, W, 3] -> uint8 [K, T, H, W, 3] (CPU)."""
    vae = world.vae
    out = []
    for first in range(0, len(frames), batch_size):
        video = frames[first : first + batch_size].to(vae.device).permute(0, 4, 1, 2, 3)  # [B, 3, T, H, W]
        video = (video.float() / 127.5 - 1.0).to(vae.dtype)
        out.append(to_uint8_frames(vae.decode(vae.encode(video))).cpu())
    return torch.cat(out)


def reconstruct_frames_alone(world: WorldModel, frames: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Every frame's VAE round trip on its own, as a clip's first frame (no temporal compression):
    uint8 [K, T, H, W, 3] -> the same shape. Beside `reconstruct_clips` it separates what the VAE loses
    in space from what it loses by packing 4 frames into each later latent frame."""
    single = frames.reshape(-1, 1, *frames.shape[2:])  # [K T, 1, H, W, 3]
    return reconstruct_clips(world, single, batch_size).reshape(frames.shape)


def frame_scores(
    real: torch.Tensor, candidate: torch.Tensor, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """PSNR and SSIM of every frame pair: uint8 [K, T, H, W, 3] twice -> {"psnr", "ssim"} [K, T] (CPU)."""
    scores: dict[str, list[torch.Tensor]] = {"psnr": [], "ssim": []}
    for a, b in zip(real, candidate):  # one clip at a time bounds the memory of the SSIM filters
        a, b = a.to(device), b.to(device)
        scores["psnr"].append(psnr(a, b).cpu())
        scores["ssim"].append(ssim(a, b).cpu())
    return {name: torch.stack(values) for name, values in scores.items()}


def copy_last_frame(real: torch.Tensor) -> torch.Tensor:
    """The baseline prediction: the start frame held for the whole clip, [K, T, H, W, 3]."""
    return real[:, :1].expand_as(real)


def curves(scores: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per-horizon mean and standard deviation over the clips of each score."""
    out = {}
    for name, values in scores.items():
        out[name] = values.double().mean(0).tolist()
        out[f"{name}_std"] = values.double().std(0, unbiased=False).tolist()
    return out


def summary_points(horizon: int, fps: float) -> list[tuple[str, int]]:
    """(label, frame index) of the summary horizons up to frame `horizon`: 0.5 s, 1 s, 2 s, ... and the end."""
    points = [(f"{s:g}s", math.floor(s * fps + 0.5)) for s in SUMMARY_SECONDS if math.floor(s * fps + 0.5) <= horizon]
    if not points or points[-1][1] != horizon:
        points.append((f"{horizon / fps:.3g}s", horizon))
    return points


def summarise(
    methods: dict[str, dict[str, list[float]]],
    horizon: int,
    fps: float,
    per_clip: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict[str, dict]:
    """Scores of each method at the summary horizons: {"1s": {"frame": 18, "model": {"psnr", "ssim"}, ...}}.
    With `per_clip` (each method's `frame_scores`, [K, T]) every method's entry also keeps the clips' own
    scores at that frame ("psnr_clips", "ssim_clips"), which `compare` pairs clip by clip (`intervals`)."""
    summary = {}
    for label, frame in summary_points(horizon, fps):
        entry: dict = {"frame": frame, "time_s": frame / fps}
        for method, values in methods.items():
            entry[method] = {"psnr": values["psnr"][frame], "ssim": values["ssim"][frame]}
            if per_clip is not None:
                for name in ("psnr", "ssim"):
                    entry[method][f"{name}_clips"] = [round(v, 4) for v in per_clip[method][name][:, frame].tolist()]
        summary[label] = entry
    return summary


def evaluate_fidelity(
    world: WorldModel,
    real: torch.Tensor,
    generated: torch.Tensor,
    horizon: int,
    *,
    sources: Sequence[dict] = (),
    batch_size: int = 8,
    reconstruction: bool = True,
    reconstructed: torch.Tensor | None = None,
) -> dict:
    """The fidelity section of the report from real clips and the frames generated from them.

    real / generated uint8 [K, T, H, W, 3] (T = 9 + 12 n: whole blocks); scores are kept up to frame
    `horizon`. With `reconstruction` the VAE round trip of the real clips is scored too (`reconstructed`
    when given, else computed here).
    """
    length = horizon + 1
    device = world.device
    scores = {
        "model": frame_scores(real[:, :length], generated[:, :length], device),
        "copy_last_frame": frame_scores(real[:, :length], copy_last_frame(real[:, :length]), device),
    }
    if reconstruction:
        if reconstructed is None:
            reconstructed = reconstruct_clips(world, real, batch_size)
        scores["vae_reconstruction"] = frame_scores(real[:, :length], reconstructed[:, :length], device)
    methods = {name: curves(values) for name, values in scores.items()}
    fps = world.config.fps
    return {
        "clips": int(real.shape[0]),
        "horizon_frames": horizon,
        "fps": fps,
        "time_s": (np.arange(length) / fps).tolist(),
        "methods": methods,
        "at": summarise(methods, horizon, fps, scores),
        "sources": list(sources),
    }
