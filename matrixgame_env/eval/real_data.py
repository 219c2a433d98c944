"""The real game for evaluation: windows of recorded frames and their actions, from one split.

The split is the one `train encode` uses (`matrixgame_env.data.validation_episodes`, same
`val_fraction`), so the held-out ("val") episodes are episodes the model never saw in training.
Label timing (see `matrixgame_env.data.recording`): frame t is the screen before action t, and the
model is trained with action t aligned to video frame t, so a generated frame i lines up with real
frame i when the recorded actions are passed frame by frame.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..data.dataset import SPLITS, evenly_spaced, validation_episodes
from ..data.storage import ChunkInfo, Manifest, open_chunk, read_manifest

DEFAULT_VAL_FRACTION = 0.1  # as `train encode`


class FrameWindows(Dataset):
    """Windows of `length` consecutive recorded frames of one split, starting every `stride` frames.

    A window lies inside one chunk and never contains a game restart after its first frame. Item:
    `frames` uint8 [L, H, W, 3] (the recorded size), `keyboard` float32 [L, K], `mouse` float32 [L, 2].
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        length: int,
        val_fraction: float = DEFAULT_VAL_FRACTION,
        stride: int = 1,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if length < 1 or stride < 1:
            raise ValueError(f"window length and stride must be at least 1, got {length} and {stride}")
        self.root = Path(root)
        self.manifest: Manifest = read_manifest(self.root)
        self.split, self.length = split, length
        held_out = validation_episodes(self.manifest.episodes, val_fraction)
        self.episodes = [e for e in self.manifest.episodes if (e in held_out) == (split == "val")]
        if not self.episodes:
            raise ValueError(
                f"{self.root} has no {split!r} episodes: {len(self.manifest.episodes)} episodes with "
                f"val_fraction={val_fraction} hold out {len(held_out)}; {_split_hint(split, val_fraction)}"
            )
        chosen = set(self.episodes)
        self.chunks: list[ChunkInfo] = [chunk for chunk in self.manifest.chunks if chunk.episode in chosen]
        self._restart_column = self.manifest.variable_names.index("EPISODE_START")
        self._open: dict[int, dict[str, np.ndarray]] = {}
        self.windows = self._index(stride)  # [N, 2]: position in self.chunks, first frame
        if len(self.windows) == 0:
            raise ValueError(
                f"the {split!r} split of {self.root} has no run of {length} frames without a restart; "
                "record longer episodes or ask for a shorter horizon"
            )

    @property
    def frame_size(self) -> tuple[int, int]:
        return self.manifest.frame_size

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        position, start = (int(value) for value in self.windows[index])
        arrays = self._arrays(position)
        window = slice(start, start + self.length)
        return {
            "frames": torch.from_numpy(np.array(arrays["frames"][window])),
            "keyboard": torch.from_numpy(np.array(arrays["keyboard"][window], dtype=np.float32)),
            "mouse": torch.from_numpy(np.array(arrays["mouse"][window], dtype=np.float32)),
        }

    def source(self, index: int) -> dict[str, int | str]:
        """Where window `index` comes from: chunk file, episode and first frame in the chunk."""
        position, start = (int(value) for value in self.windows[index])
        chunk = self.chunks[position]
        return {"chunk": chunk.file, "episode": chunk.episode, "frame": start}

    def evenly_spaced(self, count: int) -> list[int]:
        """Up to `count` window indices spread evenly over the split (always the same ones)."""
        return evenly_spaced(len(self), count)

    def stack(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The items `indices`, stacked: frames [N, L, H, W, 3], keyboard [N, L, K], mouse [N, L, 2]."""
        items = [self[i] for i in indices]
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}  # memory maps are reopened in each worker

    def _arrays(self, position: int) -> dict[str, np.ndarray]:
        if position not in self._open:
            self._open[position] = open_chunk(self.root / self.chunks[position].file)
        return self._open[position]

    def _index(self, stride: int) -> np.ndarray:
        windows = []
        for position, chunk in enumerate(self.chunks):
            restarts = np.asarray(self._arrays(position)["variables"][:, self._restart_column]) > 0
            restarts_before = np.concatenate([[0], np.cumsum(restarts)])
            starts = np.arange(0, chunk.frames - self.length + 1, stride)
            inside = restarts_before[starts + self.length] - restarts_before[starts + 1]
            windows.extend((position, start) for start in starts[inside == 0])
        self._open.clear()
        return np.array(windows, dtype=np.int64).reshape(-1, 2)


@dataclass
class ActionSequence:
    """Recorded actions one after another: keyboard [N, K] and mouse [N, 2] float32."""

    keyboard: np.ndarray
    mouse: np.ndarray

    def __len__(self) -> int:
        return len(self.keyboard)

    def cycled(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """`count` actions from `start` on, wrapping around at the end."""
        index = (start + np.arange(count)) % len(self)
        return self.keyboard[index], self.mouse[index]


def split_actions(windows: FrameWindows) -> ActionSequence:
    """Every recorded action of a split's chunks, in recording order."""
    keyboard, mouse = [], []
    for chunk in windows.chunks:
        arrays = open_chunk(windows.root / chunk.file)
        keyboard.append(np.asarray(arrays["keyboard"], dtype=np.float32))
        mouse.append(np.asarray(arrays["mouse"], dtype=np.float32))
    return ActionSequence(np.concatenate(keyboard), np.concatenate(mouse))


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 frames [..., H, W, 3] -> uint8 [..., h, w, 3] at `size` (antialiased bilinear, as the
    training dataset resizes); unchanged when already that size."""
    height, width = frames.shape[-3:-1]
    if (height, width) == tuple(size):
        return frames
    leading = frames.shape[:-3]
    pixels = frames.reshape(-1, height, width, 3).permute(0, 3, 1, 2).float()
    pixels = F.interpolate(pixels, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    resized = pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return resized.reshape(*leading, *size, 3)


def check_recording(manifest: Manifest, fps: float, keyboard_dim: int, mouse_dim: int, source: str) -> None:
    """A clear error when a recording cannot be compared with a model frame for frame."""
    if abs(manifest.fps - fps) > 1e-3 * fps:
        raise ValueError(
            f"{source} is recorded at {manifest.fps:g} fps but the model runs at {fps:g} fps: frames would not "
            "line up in time; record at the model's frame rate (`record`: a matching --tics-per-frame, 35 tics/s)"
        )
    keys = manifest.settings.get("keyboard", [])
    if len(keys) != keyboard_dim or (mouse_dim and mouse_dim != 2):
        raise ValueError(
            f"{source} holds {len(keys)} keys and a 2-axis mouse; the model takes {keyboard_dim} keys and "
            f"{mouse_dim} mouse axes (a universal-layout model is needed)"
        )


def _split_hint(split: str, val_fraction: float) -> str:
    if split == "train":
        return "record more episodes or lower --val-fraction"
    if val_fraction <= 0:
        return "--val-fraction 0 holds nothing out: give a positive one"
    count = 1  # the fewest episodes of which `validation_episodes` holds one out
    while not validation_episodes(range(count), val_fraction):
        count += 1
    return f"record at least {count} episodes (see `record --chunks-per-episode`) or raise --val-fraction"
