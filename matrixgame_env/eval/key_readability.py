"""How well the movement keys can be read from the motion they cause, in a real recording.

An inverse-dynamics model reads keys from how the view moves. In Doom a held key does not always
move the player (walls, the first tic of a press) and the player keeps sliding for a few frames
after a release, so even a perfect reader of the player's true motion misreads some frames. This
module measures that limit from the game variables: for each key, the best accuracy of a threshold
on the player's displacement along that key's direction (forward for W, backward for S, left for A,
right for D) between frame t and frame t + 1, the transition that action t causes.

    python -m matrixgame_env.eval.key_readability DATA
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Collection
from pathlib import Path

import numpy as np

from ..data.storage import Manifest, open_chunk, read_manifest

# Unit vectors of each universal key in the player's frame: (forward, right) components.
KEY_DIRECTIONS = {"forward": (1.0, 0.0), "back": (-1.0, 0.0), "left": (0.0, -1.0), "right": (0.0, 1.0)}


def displacement_in_view(variables: np.ndarray, names: list[str]) -> np.ndarray:
    """Per-frame game variables [T, V] -> displacement from frame t to t + 1 in the player's frame at
    t, [T - 1, 2] as (forward, right) map units. Doom's ANGLE is in degrees, counter-clockwise from +x."""
    needed = ("POSITION_X", "POSITION_Y", "ANGLE")
    missing = [name for name in needed if name not in names]
    if missing:
        raise ValueError(
            f"reading keys from motion needs the game variables {list(needed)}; missing {missing} of {names}"
        )
    x, y, angle = (variables[:, names.index(name)].astype(np.float64) for name in needed)
    dx, dy = np.diff(x), np.diff(y)
    a = np.deg2rad(angle[:-1])
    forward = dx * np.cos(a) + dy * np.sin(a)
    right = dx * np.sin(a) - dy * np.cos(a)
    return np.stack([forward, right], axis=1)


def best_threshold_accuracy(motion: np.ndarray, pressed: np.ndarray) -> tuple[float, float]:
    """The best accuracy of the rule `pressed == (motion > threshold)` over all thresholds, and that
    threshold (exact: every gap between sorted values is tried, as well as below and above all)."""
    motion, pressed = np.asarray(motion, dtype=np.float64), np.asarray(pressed, dtype=bool)
    if motion.shape != pressed.shape or motion.ndim != 1 or len(motion) == 0:
        raise ValueError(
            f"motion and pressed must be 1-D and of one non-zero length, got {motion.shape}, {pressed.shape}"
        )
    order = np.argsort(motion, kind="stable")
    values, labels = motion[order], pressed[order]
    # With the threshold just below values[i]: frames 0..i-1 predicted released, i.. pressed.
    released_below = np.concatenate([[0], np.cumsum(~labels)])  # correct "released" among the first i
    pressed_above = labels.sum() - np.concatenate([[0], np.cumsum(labels)])  # correct "pressed" from i on
    correct = released_below + pressed_above
    # Only cut between distinct values (equal values must fall on one side).
    cuts = np.concatenate([[True], values[1:] > values[:-1], [True]])
    correct = np.where(cuts, correct, -1)
    best = int(np.argmax(correct))
    if best == 0:
        threshold = values[0] - 1.0
    elif best == len(values):
        threshold = values[-1]
    else:
        threshold = (values[best - 1] + values[best]) / 2
    return float(correct[best] / len(values)), float(threshold)


def key_readability(
    data: str | Path,
    keys: tuple[str, ...] = tuple(KEY_DIRECTIONS),
    episodes: Collection[int] | None = None,
    manifest: Manifest | None = None,
) -> dict[str, dict[str, float]]:
    """For each key of a recording (or of its `episodes`): how often it is held, and the best accuracy
    (with its threshold in map units per frame) of reading it from the true displacement along its
    direction. `manifest`: the recording's, when the caller has read it already."""
    manifest = manifest or read_manifest(data)
    names = manifest.variable_names
    key_names = list(manifest.settings["keyboard"])
    chunks = [chunk for chunk in manifest.chunks if episodes is None or chunk.episode in episodes]
    if not chunks:
        raise ValueError(f"{data}: no chunks of the episodes {sorted(episodes or [])}")
    moves, held = [], []
    for chunk in chunks:
        arrays = open_chunk(Path(data) / chunk.file)
        variables, keyboard = np.asarray(arrays["variables"]), np.asarray(arrays["keyboard"])
        move = displacement_in_view(variables, names)
        keep = variables[1:, names.index("EPISODE_START")] == 0  # no jump to a new episode's start
        moves.append(move[keep])
        held.append(keyboard[:-1][keep] > 0.5)
    move, pressed = np.concatenate(moves), np.concatenate(held)
    report = {}
    for key in keys:
        held_key = pressed[:, key_names.index(key)]
        accuracy, threshold = best_threshold_accuracy(move @ np.asarray(KEY_DIRECTIONS[key]), held_key)
        share = float(held_key.mean())
        report[key] = {
            "held_share": share,
            "chance": max(share, 1 - share),
            "readable": accuracy,
            "threshold": threshold,
        }
    report["mean"] = {
        "chance": float(np.mean([report[k]["chance"] for k in keys])),
        "readable": float(np.mean([report[k]["readable"] for k in keys])),
    }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="How well each movement key can be read from the player's motion.")
    parser.add_argument("data", help="a recording (matrixgame-env record)")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    report = key_readability(args.data)
    print(f"{'key':<8} {'held':>6} {'chance':>7} {'readable':>9}")
    for key, row in report.items():
        held = f"{row['held_share']:.3f}" if "held_share" in row else "-"
        print(f"{key:<8} {held:>6} {row['chance']:>7.3f} {row['readable']:>9.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
