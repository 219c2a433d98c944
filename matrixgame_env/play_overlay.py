"""What the play window draws over the video: the block's keys on a keyboard and a mouse gauge."""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
try:
    import pygame
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError("the play window needs pygame-ce: pip install 'matrixgame-env[play]'") from error

from .play_controls import Controls

_QWERTY_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_ROW_STAGGER = (0.0, 0.25, 0.75)  # horizontal offset of each keyboard row, in key widths
WHITE, GREY, DARK, ACCENT, RED = (240, 240, 240), (150, 150, 150), (20, 20, 24), (255, 196, 0), (230, 60, 60)


def key_positions(keys: Sequence[int]) -> dict[int, tuple[float, float]]:
    """Where each key sits on a QWERTY keyboard, in key widths (x, row); groups far apart are
    pulled together so W/A/S/D and I/J/K/L draw as two small clusters side by side."""
    placed: dict[int, tuple[float, float]] = {}
    others = []
    for key in keys:
        name = pygame.key.name(key)
        row = next((r for r, letters in enumerate(_QWERTY_ROWS) if len(name) == 1 and name in letters), None)
        if row is None:
            others.append(key)
        else:
            placed[key] = (_QWERTY_ROWS[row].index(name) + _ROW_STAGGER[row], float(row))
    if placed:
        top = min(row for _, row in placed.values())
        placed = {key: (x, row - top) for key, (x, row) in placed.items()}
    positions: dict[int, tuple[float, float]] = {}
    cursor, previous = 0.0, None
    for key, (x, row) in sorted(placed.items(), key=lambda item: item[1][0]):
        if previous is None:
            cursor = -x
        elif x - previous > 2.5:  # a gap of several keys: start a new cluster one key to the right
            cursor -= x - previous - 2.0
        positions[key] = (x + cursor, row)
        previous = x
    rows = 1 + max((row for _, row in positions.values()), default=-1)
    for column, key in enumerate(others):  # keys off the letter rows (space, arrows...): one row below
        positions[key] = (float(column) * 1.6, float(rows))
    return positions


class ActionOverlay:
    """Draws a block's action on the video: key caps (lit when pressed) and a mouse gauge."""

    def __init__(self, controls: Controls, video_height: int) -> None:
        self.controls = controls
        self.cap = max(14, video_height // 16)
        self.font = pygame.font.Font(None, max(12, int(self.cap * 0.8)))
        self.small = pygame.font.Font(None, max(15, int(self.cap * 0.7)))
        self.positions = key_positions(list(controls.key_map) + list(controls.camera_keys))
        self.labels = {key: self.font.render(pygame.key.name(key).upper(), True, WHITE) for key in self.positions}

    def draw(self, surface: pygame.Surface, keys: Collection[int], action: Any) -> None:
        margin, cap = self.cap // 2, self.cap
        width = max((x for x, _ in self.positions.values()), default=-1.0) + 1
        rows = max((row for _, row in self.positions.values()), default=-1.0) + 1
        gauge = cap if self.controls.layout.mouse else 0
        text = self.small.render(self._describe(action), True, WHITE)
        panel_width = max(int(width * cap * 1.1) + 3 * gauge + margin, text.get_width() + margin)
        panel = pygame.Surface((panel_width, int((rows + 0.8) * cap * 1.1)), pygame.SRCALPHA)
        panel.fill((0, 0, 0, 110))
        for key, (x, row) in self.positions.items():
            rect = pygame.Rect(int(x * cap * 1.1) + margin // 2, int((row + 0.8) * cap * 1.1), cap, cap)
            lit = key in keys
            pygame.draw.rect(panel, (*ACCENT, 230) if lit else (60, 60, 60, 200), rect, border_radius=cap // 5)
            label = self.labels[key]
            panel.blit(label, label.get_rect(center=rect.center))
        panel.blit(text, (margin // 2, cap // 8))
        if gauge:
            self._draw_gauge(panel, action, (panel.get_width() - int(1.5 * gauge), panel.get_height() // 2 + cap // 3))
        surface.blit(panel, (margin, surface.get_height() - panel.get_height() - margin))

    def _draw_gauge(self, panel: pygame.Surface, action: Any, center: tuple[int, int]) -> None:
        radius = self.cap
        pitch, yaw = np.asarray(action["mouse"], np.float64) / self.controls.layout.mouse_limit
        pygame.draw.circle(panel, (60, 60, 60, 200), center, radius, width=2)
        tip = (center[0] + int(yaw * radius), center[1] - int(pitch * radius))
        pygame.draw.line(panel, (*ACCENT, 255), center, tip, width=3)
        pygame.draw.circle(panel, (*ACCENT, 255), tip, max(2, radius // 6))

    def _describe(self, action: Any) -> str:
        layout = self.controls.layout
        if layout.one_hot:
            return layout.keys[int(action)]
        names = [name for name, on in zip(layout.keys, action["keyboard"]) if on]
        text = " ".join(names) or "-"
        if layout.mouse:
            pitch, yaw = action["mouse"]
            text += f"  pitch {pitch:+.2f} yaw {yaw:+.2f}"
        return text
