"""A headless scripted rollout of a world model, written to an mp4 with the actions drawn in.

    matrixgame-env demo --model doom-small --out demo.mp4 --blocks 24

The script walks forward, turns left and right, looks up and down, strafes and backs up, one
segment after another, so one video shows how the model answers every kind of input.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from .images import ImageLike
from .spaces import ActionLayout, layout_for
from .world.model import WorldModel

MIN_VIDEO_HEIGHT = 360  # frames are scaled up by a whole factor to at least this height for the overlay


@dataclass(frozen=True)
class ScriptedAction:
    """One block's action by name: keys held and mouse [pitch, yaw] per frame (model units)."""

    label: str
    keys: tuple[str, ...] = ()
    mouse: tuple[float, float] = (0.0, 0.0)


# (action, blocks): a tour that exercises every input, repeated as long as needed.
TOUR = (
    (ScriptedAction("walk forward", ("forward",)), 4),
    (ScriptedAction("turn left", ("forward",), (0.0, -0.1)), 2),
    (ScriptedAction("walk forward", ("forward",)), 2),
    (ScriptedAction("turn right", ("forward",), (0.0, 0.1)), 2),
    (ScriptedAction("look around", (), (0.0, 0.15)), 2),
    (ScriptedAction("look up", (), (0.05, 0.0)), 1),
    (ScriptedAction("look down", (), (-0.05, 0.0)), 1),
    (ScriptedAction("strafe left", ("left",)), 1),
    (ScriptedAction("strafe right", ("right",)), 1),
    (ScriptedAction("walk back", ("back",)), 1),
)


def scripted_actions(blocks: int) -> list[ScriptedAction]:
    """The first `blocks` actions of the repeated tour."""
    tour = itertools.cycle([action for action, repeats in TOUR for _ in range(repeats)])
    return list(itertools.islice(tour, blocks))


def action_tensors(action: ScriptedAction, layout: ActionLayout) -> tuple[torch.Tensor, torch.Tensor | None]:
    """keyboard [1, K] and mouse [1, 2] (None without a mouse) of a scripted action in a model's layout.

    Keys the layout lacks are dropped; a one-hot layout (templerun) holds its first key ("none")
    unless the action names one of its moves.
    """
    keyboard = torch.tensor([[float(key in action.keys) for key in layout.keys]])
    if layout.one_hot and keyboard.sum() != 1:
        keyboard = torch.zeros(1, layout.keyboard_dim)
        keyboard[0, 0] = 1.0
    mouse = torch.tensor([action.mouse], dtype=torch.float32).clamp(-layout.mouse_limit, layout.mouse_limit)
    return keyboard, mouse if layout.mouse else None


def rollout(
    world: WorldModel, image: ImageLike, blocks: int, seed: int = 0, progress: bool = True
) -> Iterator[tuple[np.ndarray, ScriptedAction]]:
    """Yields (frames [T, H, W, 3] uint8, action) for each of `blocks` scripted blocks of one world."""
    layout = layout_for(world.config.mode, world.config.actions)
    state = world.start(image, seed=seed)
    for action in tqdm(scripted_actions(blocks), desc="demo", unit="block", disable=not progress):
        keyboard, mouse = action_tensors(action, layout)
        frames = world.step(state, keyboard.to(world.device), None if mouse is None else mouse.to(world.device))
        yield frames[0].numpy(), action


def draw_overlay(frame: np.ndarray, action: ScriptedAction, layout: ActionLayout, scale: int) -> np.ndarray:
    """The frame scaled up `scale` times with the held keys, the mouse motion and the label drawn in."""
    height, width = frame.shape[:2]
    picture = Image.fromarray(frame).resize((width * scale, height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(picture)
    unit = max(12, picture.height // 18)
    font = ImageFont.load_default(size=unit)
    draw.text((unit // 2, unit // 2), action.label, fill=(255, 255, 255), font=font, stroke_width=2,
              stroke_fill=(0, 0, 0))  # fmt: skip
    _draw_keys(draw, action, layout, font, unit, picture.height)
    if layout.mouse:
        _draw_mouse(draw, action, layout, unit, picture.size)
    return np.asarray(picture)


def write_demo(
    world: WorldModel,
    out: str | os.PathLike,
    blocks: int,
    image: ImageLike,
    seed: int = 0,
    overlay: bool = True,
    progress: bool = True,
) -> int:
    """Roll the script out and write an mp4 at the model's frame rate; returns the number of frames."""
    import imageio.v2 as imageio

    layout = layout_for(world.config.mode, world.config.actions)
    scale = max(1, math.ceil(MIN_VIDEO_HEIGHT / world.video_size[0])) if overlay else 1
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    writer = imageio.get_writer(out, fps=world.config.fps, codec="libx264", quality=8, macro_block_size=1,
                                ffmpeg_log_level="error")  # fmt: skip
    try:
        for frames, action in rollout(world, image, blocks, seed, progress):
            for frame in frames:
                writer.append_data(draw_overlay(frame, action, layout, scale) if overlay else frame)
                count += 1
    finally:
        writer.close()
    return count


def _draw_keys(
    draw: ImageDraw.ImageDraw,
    action: ScriptedAction,
    layout: ActionLayout,
    font: ImageFont.ImageFont,
    unit: int,
    picture_height: int,
) -> None:
    """A row of key boxes at the bottom left, filled when held."""
    size, gap = int(unit * 1.6), unit // 4
    top = picture_height - size - unit // 2
    for number, key in enumerate(layout.keys):
        left = unit // 2 + number * (size + gap)
        held = key in action.keys
        draw.rectangle((left, top, left + size, top + size), fill=(255, 196, 0) if held else (30, 30, 30),
                       outline=(240, 240, 240), width=2)  # fmt: skip
        draw.text((left + size // 2, top + size // 2), _key_symbol(key), anchor="mm", font=font,
                  fill=(0, 0, 0) if held else (240, 240, 240))  # fmt: skip


def _draw_mouse(
    draw: ImageDraw.ImageDraw, action: ScriptedAction, layout: ActionLayout, unit: int, size: tuple[int, int]
) -> None:
    """A circle at the bottom right with an arrow: right for yaw right, up for pitch up, full length at the limit."""
    radius = int(unit * 1.5)
    centre = (size[0] - radius - unit // 2, size[1] - radius - unit // 2)
    draw.ellipse((centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius),
                 fill=(30, 30, 30), outline=(240, 240, 240), width=2)  # fmt: skip
    pitch, yaw = action.mouse
    tip = (centre[0] + radius * yaw / layout.mouse_limit, centre[1] - radius * pitch / layout.mouse_limit)
    draw.line((*centre, *tip), fill=(255, 196, 0), width=max(2, unit // 5))


def _key_symbol(key: str) -> str:
    return {"forward": "W", "back": "S", "left": "A", "right": "D"}.get(key, key[:1].upper())
