"""Record a Gymnasium game for training a world model of it (`matrixgame_env.data.DatasetWriter`).

    python examples/record_gym_game.py --out data/cartpole --episodes 40 --steps 400
    matrixgame-env train vae --data data/cartpole --out runs/cartpole --model-config my_config.json

Any env that renders `rgb_array` frames works once its actions are mapped onto the universal layout
the model takes (keys [W, S, A, D] held or not, mouse [pitch, yaw] per frame): edit `ACTION_MAP` for
another env. The default, CartPole, maps pushing left and right to A and D; a balancing controller,
with random pushes now and then for variety, keeps the pole up for long runs. Frames are resized to
`--size` (the model's video size; 88x160 for a model shaped like doom-small). A fallen pole
restarts the game within the episode (`restarted=True`, so no training clip spans the jump).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gymnasium as gym
import numpy as np
from PIL import Image
from tqdm import tqdm

from matrixgame_env.data import DatasetWriter

# The env's discrete action -> (keyboard [W, S, A, D], mouse [pitch, yaw]).
ACTION_MAP = {
    0: ([0, 0, 1, 0], [0.0, 0.0]),  # push left: A
    1: ([0, 0, 0, 1], [0.0, 0.0]),  # push right: D
}


def balancing_action(observation: np.ndarray, rng: np.random.Generator, explore: float) -> int:
    """Push toward the side the pole falls to, or at random with probability `explore`."""
    if rng.random() < explore:
        return int(rng.integers(2))
    return int(observation[2] + 0.5 * observation[3] > 0)


def record(
    out: Path, env_id: str, episodes: int, steps: int, size: tuple[int, int], fps: float, seed: int, progress: bool
) -> Path:
    env = gym.make(env_id, render_mode="rgb_array")
    rng = np.random.default_rng(seed)
    with DatasetWriter(out, fps=fps, frame_size=size, variables=["REWARD"], source=f"gymnasium:{env_id}") as writer:
        bar = tqdm(total=episodes * steps, desc="recording", unit="frame", disable=not progress)
        for episode in range(episodes):
            observation, _ = env.reset(seed=seed + episode)
            restarted, reward = False, 0.0
            for _ in range(steps):
                frame = np.asarray(Image.fromarray(env.render()).resize(size[::-1], Image.BILINEAR))
                action = balancing_action(observation, rng, explore=0.2)
                keyboard, mouse = ACTION_MAP[action]
                writer.add(frame, keyboard, mouse, [reward], restarted=restarted)
                observation, reward, terminated, truncated, _ = env.step(action)
                restarted = bool(terminated or truncated)
                if restarted:
                    observation, _ = env.reset()
                bar.update()
            writer.end_episode()
        bar.close()
    env.close()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="dataset folder (new, or one this wrote before)")
    parser.add_argument("--env", default="CartPole-v1", help="a Gymnasium env id whose actions ACTION_MAP maps")
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--steps", type=int, default=400, help="frames per episode")
    parser.add_argument("--size", type=int, nargs=2, default=(88, 160), metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--fps", type=float, default=17.5, help="the frame rate the model will run at")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    out = record(args.out, args.env, args.episodes, args.steps, tuple(args.size), args.fps, args.seed,
                 not args.no_progress)  # fmt: skip
    print(f"wrote {args.episodes} episodes of {args.steps} frames to {out}")


if __name__ == "__main__":
    main()
