"""A minimal pygame window that shows frames at a given rate (the env's "human" render mode)."""

from __future__ import annotations

import os
import time

import numpy as np


class FrameWindow:
    """Shows blocks of frames [T, H, W, 3] uint8 at `fps`, scaled up for visibility."""

    def __init__(self, title: str = "matrixgame-env", scale: int = 3) -> None:
        os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
        import pygame

        self._pygame = pygame
        pygame.init()
        self.title = title
        self.scale = scale
        self._screen = None
        self._next_time = 0.0

    def show(self, frames: np.ndarray, fps: float) -> None:
        pygame = self._pygame
        height, width = frames.shape[1:3]
        if self._screen is None:
            self._screen = pygame.display.set_mode((width * self.scale, height * self.scale))
            pygame.display.set_caption(self.title)
        for frame in frames:
            pygame.event.pump()
            surface = pygame.surfarray.make_surface(frame.swapaxes(0, 1))
            self._screen.blit(pygame.transform.scale(surface, self._screen.get_size()), (0, 0))
            pygame.display.flip()
            delay = self._next_time - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            self._next_time = max(self._next_time, time.perf_counter()) + 1.0 / fps

    def close(self) -> None:
        self._pygame.display.quit()
