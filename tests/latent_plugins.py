"""Reward plug-ins for tests that read latents only (they declare reads_frames = False)."""

from __future__ import annotations

import numpy as np


class LatentRecorder:
    """Keeps every block's latents (float32, on the host) and rewards nothing."""

    reads_frames = False

    def __init__(self) -> None:
        self.blocks: list[np.ndarray] = []

    def __call__(self, step) -> np.ndarray:
        self.blocks.append(step.latents.float().cpu().numpy().copy())
        return np.zeros(step.batch_size, np.float32)
