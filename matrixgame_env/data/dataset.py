"""`VideoClipDataset`: random-access training clips from a recorded dataset (see `storage.py`).

The recording entry points (`record`, `add_record_arguments`, `run_record`) live in `recording.py` and
are re-exported here, next to the dataset they produce.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .recording import add_record_arguments, record, run_record
from .storage import ChunkInfo, Manifest, open_chunk, read_manifest

SPLITS = ("train", "val")


def evenly_spaced(length: int, count: int) -> list[int]:
    """Up to `count` distinct indices spread over range(length), first and last included (always the
    same ones: checks and evals measure the same items every time)."""
    return sorted({int(round(i)) for i in np.linspace(0, length - 1, min(count, length))})


__all__ = [
    "SPLITS",
    "VideoClipDataset",
    "add_record_arguments",
    "evenly_spaced",
    "record",
    "run_record",
    "validation_episodes",
]


def validation_episodes(episodes: Iterable[int], val_fraction: float) -> set[int]:
    """The held-out episodes: episode e is held out when floor((e + 1) f) > floor(e f), f = val_fraction.

    This spreads the held-out episodes evenly (f = 0.1: episodes 9, 19, 29, ...), holds out exactly
    floor(n f) of the episodes 0..n-1, and never moves an episode between splits when a recording grows.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    fraction = Fraction(val_fraction).limit_denominator(10_000)
    return {e for e in episodes if math.floor((e + 1) * fraction) > math.floor(e * fraction)}


class VideoClipDataset(Dataset):
    """Clips of `clip_frames` consecutive frames (1 + 4k, as the causal VAE wants) from one chunk each.

    Item: `video` float32 [3, T, H, W] in [-1, 1], `keyboard` float32 [T, 4] (forward, back, left,
    right), `mouse` float32 [T, 2] (pitch, yaw in model units), `variables` float32 [T, V] (names in
    `variable_names`). Clips start every `stride` frames and never span a game restart. Episodes are
    split between "train" and "val" by `validation_episodes`. `size` (height, width) resizes frames
    (antialiased bilinear); None keeps the recorded size. Chunks are memory-mapped, opened lazily in
    each DataLoader worker.
    """

    def __init__(
        self,
        root: str | Path,
        clip_frames: int = 17,
        split: str = "train",
        val_fraction: float = 0.1,
        size: tuple[int, int] | None = None,
        stride: int = 1,
    ) -> None:
        if not isinstance(clip_frames, int) or clip_frames < 1 or (clip_frames - 1) % 4:
            raise ValueError(f"clip_frames must be 1 + 4k (1, 5, 9, 13, 17, ...), got {clip_frames}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if stride < 1:
            raise ValueError(f"stride must be at least 1, got {stride}")
        if size is not None and (len(size) != 2 or min(size) < 1):
            raise ValueError(f"size must be (height, width) or None, got {size}")
        self.root = Path(root)
        self.manifest: Manifest = read_manifest(self.root)
        self.clip_frames = clip_frames
        self.split = split
        self.size = None if size is None else (int(size[0]), int(size[1]))
        held_out = validation_episodes(self.manifest.episodes, val_fraction)
        self.episodes = [e for e in self.manifest.episodes if (e in held_out) == (split == "val")]
        chosen = set(self.episodes)
        self.chunks: list[ChunkInfo] = [chunk for chunk in self.manifest.chunks if chunk.episode in chosen]
        self._restart_column = self.variable_names.index("EPISODE_START")
        self._clips = self._index_clips(stride)  # [N, 2]: position in self.chunks, first frame
        if len(self._clips) == 0:
            raise ValueError(
                f"the {split!r} split of {self.root} has no clips of {clip_frames} frames "
                f"({len(self.episodes)} of {len(self.manifest.episodes)} episodes, val_fraction={val_fraction}); "
                "record more episodes or change val_fraction / clip_frames"
            )
        self._open: dict[int, dict[str, np.ndarray]] = {}

    @property
    def variable_names(self) -> list[str]:
        return self.manifest.variable_names

    def __len__(self) -> int:
        return len(self._clips)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        position, start = (int(value) for value in self._clips[index])
        arrays = self._arrays(position)
        window = slice(start, start + self.clip_frames)
        video = torch.from_numpy(np.array(arrays["frames"][window]))  # [T, H, W, 3] uint8, copied from the map
        video = video.permute(0, 3, 1, 2).float()  # [T, 3, H, W]
        if self.size is not None and tuple(video.shape[-2:]) != self.size:
            video = F.interpolate(video, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        video = (video / 127.5 - 1.0).clamp_(-1.0, 1.0).permute(1, 0, 2, 3).contiguous()  # [3, T, H, W]
        return {
            "video": video,
            "keyboard": torch.from_numpy(np.array(arrays["keyboard"][window], dtype=np.float32)),
            "mouse": torch.from_numpy(np.array(arrays["mouse"][window], dtype=np.float32)),
            "variables": torch.from_numpy(np.array(arrays["variables"][window], dtype=np.float32)),
        }

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps are reopened in each DataLoader worker rather than pickled.
        return {**self.__dict__, "_open": {}}

    def _arrays(self, position: int) -> dict[str, np.ndarray]:
        if position not in self._open:
            self._open[position] = open_chunk(self.root / self.chunks[position].file)
        return self._open[position]

    def _index_clips(self, stride: int) -> np.ndarray:
        clips = []
        for position, chunk in enumerate(self.chunks):
            restarts = np.asarray(open_chunk(self.root / chunk.file)["variables"][:, self._restart_column]) > 0
            # A clip may start at a restart but must not contain one after its first frame.
            restarts_before = np.concatenate([[0], np.cumsum(restarts)])
            starts = np.arange(0, chunk.frames - self.clip_frames + 1, stride)
            inside = restarts_before[starts + self.clip_frames] - restarts_before[starts + 1]
            clips.extend((position, start) for start in starts[inside == 0])
        return np.array(clips, dtype=np.int64).reshape(-1, 2)
