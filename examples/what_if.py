"""What if? Several action plans rolled out side by side from one picture.

    python examples/what_if.py --image start.png --plans "forward,turn_left,turn_right,back" --blocks 4
    python examples/what_if.py --plans "forward*2+turn_left*2, strafe_right+forward" --reward learned
    python examples/what_if.py --plans @plans.txt        # one plan a line, optionally "label: plan"

All plans start from the same world state (the picture's, with one seed) and run in one batch
(`env.imagine`: the state is forked once per plan). A plan is a `+`-joined list of named actions, each
optionally repeated (`forward*3`); a plan shorter than `--blocks` holds its last action. Actions:
idle, forward, back, strafe_left, strafe_right, turn_left, turn_right, forward_left, forward_right,
look_up, look_down.

Writes OUT/what_if.mp4 (a grid, one labelled tile per plan), OUT/what_if.png (a contact sheet: one
row per plan, the start picture then the last frame of every block) and OUT/what_if.json (the plans
and, with `--reward`, the reward of every block).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from matrixgame_env.data.doom_env import TASKS, DoomTask
from matrixgame_env.demo import ScriptedAction, draw_overlay
from matrixgame_env.env import MatrixGameEnv, picture_as_uint8
from matrixgame_env.spaces import ActionLayout
from matrixgame_env.world.model import WorldModel

TURN = 0.1  # model units per video frame: 4 degrees in doom-small
ACTIONS = {
    "idle": ScriptedAction("idle"),
    "forward": ScriptedAction("forward", ("forward",)),
    "back": ScriptedAction("back", ("back",)),
    "strafe_left": ScriptedAction("strafe left", ("left",)),
    "strafe_right": ScriptedAction("strafe right", ("right",)),
    "turn_left": ScriptedAction("turn left", (), (0.0, -TURN)),
    "turn_right": ScriptedAction("turn right", (), (0.0, TURN)),
    "forward_left": ScriptedAction("forward + turn left", ("forward",), (0.0, -TURN)),
    "forward_right": ScriptedAction("forward + turn right", ("forward",), (0.0, TURN)),
    "look_up": ScriptedAction("look up", (), (TURN / 2, 0.0)),
    "look_down": ScriptedAction("look down", (), (-TURN / 2, 0.0)),
}
# A fresh world's first block has 3 video frames fewer than the others; `imagine` front-pads it with
# copies of its first frame, which the video leaves out.
FIRST_BLOCK_PADDING = 3
TILE_HEIGHT = 240  # frames are scaled up by a whole factor to at least this height


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="doom-small", help="preset name or model folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image", help="start picture (default: the model's first shipped start picture)")
    parser.add_argument("--plans", default="forward,turn_left,turn_right,back", help="plans, or @FILE")
    parser.add_argument("--blocks", type=int, default=4, help="blocks per plan (12 video frames each)")
    parser.add_argument("--reward", choices=("none", *TASKS), default="none", help="score every block")
    parser.add_argument("--goal", help="goal picture of clip_goal / pixel_goal")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/what_if")
    args = parser.parse_args(argv)
    if args.blocks < 1:
        parser.error("--blocks must be at least 1")
    try:
        args.plans = read_plans(args.plans, args.blocks)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    return args


def parse_plan(text: str, blocks: int) -> list[ScriptedAction]:
    """ "forward*2+turn_left" -> one action per block, the last one held up to `blocks`."""
    steps: list[ScriptedAction] = []
    for part in text.split("+"):
        name, _, count = part.strip().partition("*")
        if name not in ACTIONS:
            raise ValueError(f"unknown action {name!r} in plan {text!r}; actions: {', '.join(ACTIONS)}")
        if count and not (count.isdigit() and int(count) >= 1):
            raise ValueError(f"repeat count must be a positive whole number, got {count!r} in plan {text!r}")
        steps += [ACTIONS[name]] * int(count or 1)
    if len(steps) > blocks:
        raise ValueError(f"plan {text!r} has {len(steps)} blocks, more than --blocks {blocks}")
    return steps + [steps[-1]] * (blocks - len(steps))


def read_plans(spec: str, blocks: int) -> dict[str, list[ScriptedAction]]:
    """{label: actions} from "plan,plan,..." or "@FILE" (one plan a line, "label: plan" or just the plan)."""
    if spec.startswith("@"):
        lines = [line.strip() for line in Path(spec[1:]).read_text().splitlines()]
        entries = [line for line in lines if line and not line.startswith("#")]
    else:
        entries = [entry.strip() for entry in spec.split(",") if entry.strip()]
    if not entries:
        raise ValueError("no plans given")
    plans = {}
    for entry in entries:
        label, _, plan = entry.rpartition(":")
        label = label.strip() or plan.strip()
        if label in plans:
            raise ValueError(f"two plans are labelled {label!r}")
        plans[label] = parse_plan(plan, blocks)
    return plans


def as_env_action(action: ScriptedAction, layout: ActionLayout) -> dict[str, np.ndarray]:
    keyboard = np.array([int(key in action.keys) for key in layout.keys], np.int8)
    return {
        "keyboard": keyboard,
        "mouse": np.clip(np.array(action.mouse, np.float32), -layout.mouse_limit, layout.mouse_limit),
    }


def grid_video(frames: np.ndarray, plans: dict[str, list[ScriptedAction]], layout: ActionLayout) -> list[np.ndarray]:
    """frames [K, H, T, h, w, 3] -> the grid's video frames, one labelled tile per plan."""
    count, blocks, block_frames = frames.shape[:3]
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    scale = max(1, math.ceil(TILE_HEIGHT / frames.shape[3]))
    video = []
    for block in range(blocks):
        for t in range(block_frames):
            tiles = []
            for k, (label, actions) in enumerate(plans.items()):
                step = actions[block]
                shown = ScriptedAction(f"{label}: {step.label}", step.keys, step.mouse)
                tiles.append(draw_overlay(frames[k, block, t], shown, layout, scale))
            tiles += [np.zeros_like(tiles[0])] * (rows * columns - count)
            video.append(np.concatenate([np.concatenate(tiles[r * columns : (r + 1) * columns], axis=1)
                                         for r in range(rows)], axis=0))  # fmt: skip
    return video


def contact_sheet(start: np.ndarray, frames: np.ndarray, labels: list[str]) -> Image.Image:
    """One row per plan: the start picture, then the last frame of each block; labels on the left."""
    scale = max(1, math.ceil(96 / start.shape[0]))
    height, width = start.shape[0] * scale, start.shape[1] * scale
    font = ImageFont.load_default(size=max(12, height // 6))
    label_width = max(int(font.getlength(label)) for label in labels) + 16
    blocks = frames.shape[1]
    sheet = Image.new("RGB", (label_width + (blocks + 1) * (width + 4), len(labels) * (height + 4)), (20, 20, 20))
    draw = ImageDraw.Draw(sheet)
    for row, label in enumerate(labels):
        top = row * (height + 4)
        draw.text((8, top + height // 2), label, fill=(240, 240, 240), font=font, anchor="lm")
        for column, picture in enumerate([start, *frames[row, :, -1]]):
            tile = Image.fromarray(picture).resize((width, height), Image.NEAREST)
            sheet.paste(tile, (label_width + column * (width + 4), top))
    return sheet


def write_video(frames: list[np.ndarray], path: Path, fps: float) -> None:
    import imageio.v2 as imageio

    writer = imageio.get_writer(path, fps=fps, codec="libx264", quality=8, macro_block_size=1,
                                ffmpeg_log_level="error")  # fmt: skip
    try:
        for frame in frames:
            writer.append_data(frame)
    finally:
        writer.close()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    world = WorldModel.from_pretrained(args.model, device=args.device)
    reward = None
    if args.reward != "none":
        reward = DoomTask.for_model(args.reward, world, goal=args.goal).dream_reward()
    env = MatrixGameEnv(model=world, reward=reward)
    image = args.image or (world.start_image_paths() or [None])[0]
    if image is None:
        raise SystemExit(f"model {world.config.name!r} ships no start picture: give one with --image")
    env.reset(seed=args.seed, options={"image": image})
    plans = args.plans
    futures = env.imagine([[as_env_action(step, env.layout) for step in actions] for actions in plans.values()])
    frames = futures["frames"]  # [K, H, 12, h, w, 3]

    start = picture_as_uint8(image, world.video_size)
    contact_sheet(start, frames, list(plans)).save(out / "what_if.png")
    video = grid_video(frames, plans, env.layout)[FIRST_BLOCK_PADDING:]
    summary = {
        "model": world.config.name,
        "image": str(image),
        "seed": args.seed,
        "blocks": args.blocks,
        "plans": {label: [step.label for step in actions] for label, actions in plans.items()},
        "video_frames": len(video),
        "reward": args.reward,
    }
    if reward is not None:
        summary["rewards"] = {label: futures["rewards"][k].tolist() for k, label in enumerate(plans)}
        summary["returns"] = {label: float(futures["rewards"][k].sum()) for k, label in enumerate(plans)}
        for label, total in sorted(summary["returns"].items(), key=lambda item: -item[1]):
            print(f"{label:>30}: imagined return {total:.3f}")
    (out / "what_if.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_video(video, out / "what_if.mp4", world.config.fps)
    print(f"wrote {out / 'what_if.mp4'} ({len(video)} frames), {out / 'what_if.png'} and {out / 'what_if.json'}")
    return summary


if __name__ == "__main__":
    main()
