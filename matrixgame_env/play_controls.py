"""Keyboard and mouse input of the play window -> env actions (`Controls`)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
try:
    import pygame
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError("the play window needs pygame-ce: pip install 'matrixgame-env[play]'") from error

from .spaces import CAMERA_KEY_SPEED, CAMERA_KEYS, KEY_MAPS, ActionLayout

# Model units of camera turn per pixel of mouse motion, summed over a block and spread over its
# frames: 300 px during a 12-frame block -> 300 * 0.004 / 12 = 0.1 per frame, a normal turn.
MOUSE_SENSITIVITY = 0.004


def _key_code(name: str) -> int:
    """pygame key code of a key name of the key maps ("w", "space", "up")."""
    return pygame.key.key_code(name)


class Controls:
    """Keyboard and mouse events -> the env action of the next block.

    Held keys are tracked from KEYDOWN/KEYUP (`pygame.key.get_pressed` misses posted events). A
    key pressed and released between two samples still counts for the next block, so quick taps are
    never lost. Mouse motion (`MOUSEMOTION.rel`, only while the pointer is captured) is summed
    between samples; `action(frames)` turns the sum into model units per video frame.

    layout: the env's `ActionLayout`; mode: the name of its key maps in `spaces.KEY_MAPS` (unknown
    modes use the universal keys that fit the layout); sensitivity: camera turn in model units per
    pixel of motion, spread over the block's frames (see `MOUSE_SENSITIVITY`).
    """

    def __init__(
        self,
        layout: ActionLayout,
        mode: str | None = None,
        sensitivity: float = MOUSE_SENSITIVITY,
        invert_pitch: bool = False,
    ) -> None:
        self.layout = layout
        self.mode = mode or layout.name
        names = KEY_MAPS.get(self.mode) or {
            name: index for name, index in KEY_MAPS["universal"].items() if index < layout.keyboard_dim
        }
        camera = CAMERA_KEYS.get(self.mode, CAMERA_KEYS["universal"]) if layout.mouse else {}
        self.key_map: dict[int, int] = {_key_code(name): index for name, index in names.items()}
        self.camera_keys: dict[int, tuple[int, float]] = {_key_code(name): move for name, move in camera.items()}
        self.sensitivity = sensitivity
        self.invert_pitch = invert_pitch
        self.captured = True
        self.last_keys: tuple[int, ...] = ()  # the keys that made the last sampled action
        self._held: set[int] = set()
        self._tapped: set[int] = set()  # pressed since the last sample, maybe released already
        self._order: list[int] = []  # press order: for one-hot layouts the latest key wins
        self._motion = np.zeros(2)  # summed pointer motion in pixels, [up, right]

    def is_game_key(self, key: int) -> bool:
        return key in self.key_map or key in self.camera_keys

    def handle(self, event: pygame.event.Event) -> bool:
        """Update the state from one event; True when the event was game input (consumed)."""
        if event.type == pygame.KEYDOWN:
            # Ctrl+key is left to the window's commands (Ctrl+Q quits even where Q is a game key).
            if not self.is_game_key(event.key) or getattr(event, "mod", 0) & pygame.KMOD_CTRL:
                return False
            self._held.add(event.key)
            self._tapped.add(event.key)
            if event.key in self._order:
                self._order.remove(event.key)
            self._order.append(event.key)
            return True
        if event.type == pygame.KEYUP:
            if event.key not in self._held:
                return False
            self._held.discard(event.key)
            return True
        if event.type == pygame.MOUSEMOTION and self.captured and self.layout.mouse:
            dx, dy = event.rel
            self._motion += (dy if self.invert_pitch else -dy, dx)  # screen y grows downwards; up is +pitch
            return True
        return False

    def held_names(self) -> list[str]:
        """Names of the game keys held now, in press order (for the HUD)."""
        return [pygame.key.name(key).upper() for key in self._order if key in self._held]

    def release_all(self) -> None:
        """Forget held keys (the window lost focus: their KEYUP will never come)."""
        self._held.clear()

    def clear_motion(self) -> None:
        self._motion[:] = 0.0

    def preview(self, frames: int) -> Any:
        """The action `action(frames)` would return now, without consuming input."""
        return self._compose(frames)[0]

    def action(self, frames: int) -> Any:
        """The env action for the next block of `frames` video frames; starts a new mouse sum.

        Multi-hot layouts: {"keyboard": int8 (K,), "mouse": float32 (2,) [pitch, yaw]} (mouse only
        when the layout has one; per video frame, clipped to the layout's mouse_limit). One-hot
        layouts: the index of the latest pressed key, 0 when none.
        """
        action, self.last_keys = self._compose(frames)
        self._tapped.clear()
        self._order = [key for key in self._order if key in self._held]
        self.clear_motion()
        return action

    def _compose(self, frames: int) -> tuple[Any, tuple[int, ...]]:
        active = [key for key in self._order if key in self._held or key in self._tapped]
        mapped = [key for key in active if key in self.key_map]
        if self.layout.one_hot:
            return (self.key_map[mapped[-1]], (mapped[-1],)) if mapped else (0, ())
        keyboard = np.zeros(self.layout.keyboard_dim, np.int8)
        for key in mapped:
            keyboard[self.key_map[key]] = 1
        if not self.layout.mouse:
            return {"keyboard": keyboard}, tuple(mapped)
        mouse = self._motion * self.sensitivity / max(1, frames)
        camera = [key for key in active if key in self.camera_keys]
        for key in camera:
            axis, direction = self.camera_keys[key]
            mouse[axis] += CAMERA_KEY_SPEED * direction
        limit = self.layout.mouse_limit
        mouse = np.clip(mouse, -limit, limit).astype(np.float32)
        return {"keyboard": keyboard, "mouse": mouse}, tuple(mapped + camera)
