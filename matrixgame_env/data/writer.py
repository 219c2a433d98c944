"""Record any game into the dataset format that `matrixgame-env train` reads.

`matrixgame-env record` records ViZDoom; `DatasetWriter` takes frames and actions from anything else
(a Gymnasium env, an emulator, screen captures with logged inputs) and writes the same chunks and
manifest (`storage.py`), so every training stage, `eval` and the clip datasets read them unchanged:

    with DatasetWriter("data/mygame", fps=15, frame_size=(88, 160)) as writer:
        for episode in range(10):
            frame = env.reset()
            for t in range(1000):
                keyboard, mouse = my_policy(frame)                  # [W, S, A, D] 0/1, [pitch, yaw]
                writer.add(frame, keyboard, mouse)                   # frame t and the action taken on it
                frame = env.step(keyboard, mouse)
            writer.end_episode()

Actions follow the universal layout of the official model: keyboard [forward, back, left, right]
held (1) or not (0), mouse [pitch, yaw] in the model's units (up and right positive; about 0.1 per
frame is a normal turn). Frame t is the screen before action t is taken (as `record` labels them).
An `EPISODE_START` variable is added for the readers: 1 on each episode's first frame and where
`add(..., restarted=True)` says the game restarted within it. Other per-frame variables (score,
position, ...) are named when the writer is made; `train reward` needs POSITION_X, POSITION_Y and
ANGLE (degrees) among them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .storage import (
    CHUNK_DIR,
    MANIFEST_NAME,
    ChunkInfo,
    Manifest,
    chunk_file,
    read_manifest,
    write_chunk,
    write_manifest,
)

KEYBOARD = ("forward", "back", "left", "right")  # W, S, A, D
MOUSE = ("pitch", "yaw")  # positive: look up, turn right
RESTART = "EPISODE_START"
LABEL_TIMING = (
    "frame t is the screen before action t; action t leads to frame t + 1; variables[t] are read with frame t"
)
# What must match for more episodes to be added to an existing dataset.
_SHARED_SETTINGS = ("fps", "frame_size", "action_layout", "keyboard", "mouse", "variables")


class DatasetWriter:
    """Writes episodes of frames and universal-layout actions as chunks of at most `chunk_frames`
    frames plus a manifest (see the module docstring). Each chunk is written atomically and listed in
    the manifest only once complete, so an interrupted recording keeps every finished chunk; opening a
    folder that already holds a dataset with the same settings adds new episodes after its own."""

    def __init__(
        self,
        root: str | Path,
        fps: float,
        frame_size: tuple[int, int],
        variables: Sequence[str] = (),
        chunk_frames: int = 1000,
        source: str = "custom",
        mouse_units: str = "model units: about 0.1 per frame for a normal turn; pitch up and yaw right positive",
    ) -> None:
        if not (isinstance(fps, int | float) and math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a positive number, got {fps!r}")
        if len(frame_size) != 2 or any(int(n) != n or n < 1 for n in frame_size):
            raise ValueError(f"frame_size must be (height, width) in pixels, got {frame_size!r}")
        names = [str(name) for name in variables]
        if RESTART in names or len(set(names)) != len(names):
            raise ValueError(
                f"variables must be distinct names other than {RESTART!r} (added by the writer), got {names}"
            )
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be at least 1, got {chunk_frames}")
        self.root = Path(root)
        self.frame_size = (int(frame_size[0]), int(frame_size[1]))
        self.variable_names = names
        self.chunk_frames = int(chunk_frames)
        settings = {
            "fps": float(fps),
            "frame_size": list(self.frame_size),
            "action_layout": "universal",
            "keyboard": list(KEYBOARD),
            "mouse": list(MOUSE),
            "mouse_units": {"meaning": mouse_units},
            "label_timing": LABEL_TIMING,
            "variables": [RESTART, *names],
            "recording": {"source": source, "chunk_frames": self.chunk_frames},
        }
        self.manifest = self._open(settings)
        self._next_chunk = max((c.index for c in self.manifest.chunks), default=-1) + 1
        self._episode = max(self.manifest.episodes, default=-1) + 1
        self._part = 0
        self._buffer: dict[str, list[np.ndarray]] = {"frames": [], "keyboard": [], "mouse": [], "variables": []}
        self._closed = False

    def _open(self, settings: dict[str, Any]) -> Manifest:
        if (self.root / MANIFEST_NAME).exists():
            manifest = read_manifest(self.root)
            differ = [key for key in _SHARED_SETTINGS if manifest.settings.get(key) != settings[key]]
            if differ:
                found = {key: manifest.settings.get(key) for key in differ}
                wanted = {key: settings[key] for key in differ}
                raise ValueError(
                    f"{self.root} already holds a dataset recorded with other settings ({found}, "
                    f"this writer: {wanted}); write to another folder"
                )
            return manifest
        if self.root.exists() and any(self.root.iterdir()):
            raise ValueError(f"{self.root} is not empty and holds no dataset manifest; write to a new or empty folder")
        (self.root / CHUNK_DIR).mkdir(parents=True, exist_ok=True)
        manifest = Manifest(settings)
        write_manifest(self.root, manifest)
        return manifest

    @property
    def episode(self) -> int:
        """The id of the episode that `add` writes to."""
        return self._episode

    def add(
        self,
        frame: np.ndarray,
        keyboard: Sequence[float] | np.ndarray,
        mouse: Sequence[float] | np.ndarray,
        variables: Sequence[float] | np.ndarray | None = None,
        restarted: bool = False,
    ) -> None:
        """Add frame t of the current episode with the action taken on it (see the module docstring)
        and its variables (one value per name given to the writer). `restarted`: the game restarted
        (e.g. the player died) since the previous frame, so no clip should span the two."""
        if self._closed:
            raise ValueError("this writer is closed")
        frame = np.asarray(frame)
        expected = (*self.frame_size, 3)
        if frame.dtype != np.uint8 or frame.shape != expected:
            raise ValueError(f"frame must be uint8 {expected} (height, width, RGB), got {frame.dtype} {frame.shape}")
        keys = np.asarray(keyboard, dtype=np.float64).reshape(-1)
        if keys.shape != (len(KEYBOARD),) or not np.isin(keys, (0.0, 1.0)).all():
            raise ValueError(f"keyboard must be 4 values of 0 or 1 ({', '.join(KEYBOARD)}), got {np.asarray(keyboard)}")
        look = np.asarray(mouse, dtype=np.float64).reshape(-1)
        if look.shape != (len(MOUSE),) or not np.isfinite(look).all():
            raise ValueError(f"mouse must be 2 finite numbers (pitch, yaw in model units), got {np.asarray(mouse)}")
        values = np.zeros(0) if variables is None else np.asarray(variables, dtype=np.float64).reshape(-1)
        if values.shape != (len(self.variable_names),) or not np.isfinite(values).all():
            raise ValueError(
                f"variables must be {len(self.variable_names)} finite numbers ({self.variable_names}), "
                f"got {None if variables is None else np.asarray(variables)}"
            )
        first = self._part == 0 and not self._buffer["frames"]
        self._buffer["frames"].append(frame.copy())
        self._buffer["keyboard"].append(keys.astype(np.int8))
        self._buffer["mouse"].append(look.astype(np.float32))
        self._buffer["variables"].append(np.concatenate([[float(first or restarted)], values]).astype(np.float32))
        if len(self._buffer["frames"]) >= self.chunk_frames:
            self._flush()

    def end_episode(self) -> None:
        """Write what is left of the current episode; the next `add` starts a new one."""
        if self._buffer["frames"]:
            self._flush()
        if self._part:
            self._episode += 1
            self._part = 0

    def close(self) -> None:
        """End the current episode and write the manifest."""
        if not self._closed:
            self.end_episode()
            write_manifest(self.root, self.manifest)
            self._closed = True

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _flush(self) -> None:
        arrays = {name: np.stack(values) for name, values in self._buffer.items()}
        index = self._next_chunk
        write_chunk(self.root / chunk_file(index), arrays)
        self.manifest.add(ChunkInfo(index, self._episode, self._part, map="", seed=0, frames=len(arrays["frames"])))
        write_manifest(self.root, self.manifest)  # lists the chunk only once it is complete on disk
        self._next_chunk += 1
        self._part += 1
        self._buffer = {name: [] for name in self._buffer}
