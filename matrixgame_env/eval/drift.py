"""Drift over a long rollout: do the frames keep looking like the game, or collapse (blur, grey, frozen)?

The model streams for minutes of video time (ring caches: memory stays flat) under recorded action
sequences, cycled. Per frame, five statistics are measured and compared with the range (1st to 99th
percentile) of the same statistics over real held-out frames:

    brightness     mean luma (0..255)
    contrast       standard deviation of luma
    colourfulness  Hasler and Suesstrunk's metric on the opponent channels R - G and (R + G) / 2 - B
    sharpness      root mean square of the luma Laplacian (4-neighbour)
    motion         mean absolute difference from the previous frame

A rollout is "collapsed" when, over its final stretch, any statistic is outside the real range for
most frames. Each statistic's `onset` tells a drift from a look the model has from its first
seconds on: "drifted" (in range over the opening stretch, out of it at the end), "from the start"
(out of range over both: a property of the frames, e.g. a blurry decoder, rather than a drift), or
null when the final stretch is in range.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..world.model import WorldModel
from .fidelity import FIRST_BLOCK_FRAMES
from .real_data import ActionSequence, FrameWindows, resize_frames

STATISTICS = ("brightness", "contrast", "colourfulness", "sharpness", "motion")
PERCENTILES = (1.0, 99.0)
FINAL_FRACTION = 0.1  # the final stretch of the rollout that the verdict looks at
OPENING_SECONDS = 10.0  # the opening stretch (at most the final stretch's length) that tells a drift from a look
IN_RANGE_NEEDED = 0.5  # share of the final stretch within the real range, for every statistic
REAL_FRAMES = 4000  # real frames that set the ranges (spread evenly over the held-out episodes)
_LUMA = (0.299, 0.587, 0.114)
_LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))


def frame_statistics(frames: torch.Tensor, previous: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The statistics of uint8 frames [N, T, H, W, 3] -> {name: float32 [N, T]} on the frames' device.

    `previous` uint8 [N, H, W, 3] is the frame before frame 0 (its motion is NaN without it).
    """
    if frames.dim() != 5 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [N, T, H, W, 3], got shape {tuple(frames.shape)}")
    x = frames.float()
    red, green, blue = x.unbind(-1)
    luma = _LUMA[0] * red + _LUMA[1] * green + _LUMA[2] * blue  # [N, T, H, W]
    rg, yb = red - green, 0.5 * (red + green) - blue
    colourfulness = torch.sqrt(_var(rg) + _var(yb)) + 0.3 * torch.sqrt(_mean(rg) ** 2 + _mean(yb) ** 2)
    kernel = torch.tensor(_LAPLACIAN, device=x.device).view(1, 1, 3, 3)
    laplacian = F.conv2d(luma.flatten(0, 1)[:, None], kernel).view(*luma.shape[:2], -1)
    if previous is None:
        motion = torch.full(luma.shape[:2], math.nan, device=x.device)
        motion[:, 1:] = (x[:, 1:] - x[:, :-1]).abs().flatten(2).mean(-1)
    else:
        before = torch.cat([previous[:, None].to(frames.device), frames[:, :-1]], dim=1).float()
        motion = (x - before).abs().flatten(2).mean(-1)
    return {
        "brightness": _mean(luma),
        "contrast": torch.sqrt(_var(luma)),
        "colourfulness": colourfulness,
        "sharpness": laplacian.square().mean(-1).sqrt(),
        "motion": motion,
    }


def real_ranges(
    windows: FrameWindows, size: tuple[int, int], count: int = REAL_FRAMES, device: torch.device | str = "cpu"
) -> dict[str, dict[str, float]]:
    """The 1st and 99th percentile of each statistic over up to `count` real frames (windows of 2
    consecutive frames, spread evenly over the split, at the model's `size`)."""
    if windows.length != 2:
        raise ValueError(f"real ranges need windows of 2 frames (a frame and the next), got {windows.length}")
    values: dict[str, list[np.ndarray]] = {name: [] for name in STATISTICS}
    chosen = windows.evenly_spaced(count)
    for first in range(0, len(chosen), 256):
        frames = windows.stack(chosen[first : first + 256])["frames"]
        frames = resize_frames(frames.to(device), size)
        stats = frame_statistics(frames[:, 1:], previous=frames[:, 0])
        for name in STATISTICS:
            values[name].append(stats[name][:, 0].cpu().numpy())
    ranges = {}
    for name in STATISTICS:
        joined = np.concatenate(values[name]).astype(np.float64)
        low, high = np.percentile(joined, PERCENTILES)
        ranges[name] = {"low": float(low), "high": float(high), "median": float(np.median(joined))}
    return ranges


@torch.no_grad()
def rollout_statistics(
    world: WorldModel,
    start_frames: torch.Tensor,
    actions: ActionSequence,
    frames: int,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Stream W worlds for at least `frames` video frames (whole blocks) from uint8 start frames
    [W, H, W, 3]; world w follows the recorded actions from offset w len(actions) / W on, cycled.
    Returns {name: float32 [W, F]} (F: frames generated) without keeping any frame."""
    worlds = len(start_frames)
    blocks = 1 + max(0, math.ceil((frames - FIRST_BLOCK_FRAMES) / world.frames_per_block))
    offsets = [w * len(actions) // worlds for w in range(worlds)]
    state = world.start(list(start_frames.numpy()), seed=seed)
    previous = start_frames.to(world.device)
    collected: dict[str, list[np.ndarray]] = {name: [] for name in STATISTICS}
    position = 0
    for _ in tqdm(range(blocks), desc="drift", unit="block", disable=not progress):
        n = world.sampler.video_frames_for_block(state)
        keyboard, mouse = zip(*(actions.cycled(offset + position, n) for offset in offsets))
        block = world.step(state, torch.from_numpy(np.stack(keyboard)), torch.from_numpy(np.stack(mouse)))
        block = block.to(world.device)
        stats = frame_statistics(block, previous)
        for name in STATISTICS:
            collected[name].append(stats[name].cpu().numpy())
        previous = block[:, -1]
        position += n
    return {name: np.concatenate(parts, axis=1) for name, parts in collected.items()}


def drift_report(
    statistics: dict[str, np.ndarray], ranges: dict[str, dict[str, float]], fps: float
) -> dict[str, object]:
    """Compare rollout statistics {name: [W, F]} with the real ranges: in-range shares (whole rollout
    and final stretch), per-second means and in-range shares over time, and the collapse verdict."""
    frames = next(iter(statistics.values())).shape[1]
    final = max(1, math.ceil(FINAL_FRACTION * frames))
    opening = max(1, min(final, math.ceil(OPENING_SECONDS * fps)))
    seconds = max(1, math.floor(frames / fps))
    # Whole seconds of video; a last partial second joins the one before.
    bins = np.minimum((np.arange(frames) / fps).astype(int), seconds - 1)
    report: dict[str, object] = {"frames": int(frames), "worlds": int(next(iter(statistics.values())).shape[0])}
    per_statistic, collapsed = {}, []
    for name in STATISTICS:
        values = statistics[name].astype(np.float64)
        low, high = ranges[name]["low"], ranges[name]["high"]
        valid = ~np.isnan(values)
        inside = (values >= low) & (values <= high)
        final_share = _share(inside[:, -final:], valid[:, -final:])
        opening_share = _share(inside[:, :opening], valid[:, :opening])
        per_statistic[name] = {
            "real_low": low,
            "real_high": high,
            "in_range_share": _share(inside, valid),
            "final_in_range_share": final_share,
            "final_median": float(np.nanmedian(values[:, -final:])),
            "opening_in_range_share": opening_share,
            "onset": _onset(opening_share, final_share),
            "per_second_mean": [float(np.nanmean(values[:, bins == s])) for s in range(seconds)],
            "per_second_in_range": [_share(inside[:, bins == s], valid[:, bins == s]) for s in range(seconds)],
        }
        if final_share < IN_RANGE_NEEDED:
            collapsed.append(name)
    report.update(
        {
            "seconds": (np.arange(seconds) + 0.5).tolist(),
            "statistics": per_statistic,
            "final_fraction": FINAL_FRACTION,
            "opening_frames": int(opening),
            "in_range_needed": IN_RANGE_NEEDED,
            "collapsed": bool(collapsed),
            "collapsed_statistics": collapsed,
        }
    )
    return report


def _onset(opening_share: float, final_share: float) -> str | None:
    """How a statistic left the real range: None (it did not), "drifted" or "from the start"."""
    if not final_share < IN_RANGE_NEEDED:
        return None
    return "from the start" if opening_share < IN_RANGE_NEEDED else "drifted"


def _share(inside: np.ndarray, valid: np.ndarray) -> float:
    count = int(valid.sum())
    return float((inside & valid).sum() / count) if count else float("nan")


def _mean(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(2).mean(-1)


def _var(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(2).var(-1, unbiased=False)
