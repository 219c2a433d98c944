"""Planners' rollouts (`imagine`) with and without decoding frames, side by side in one run.

K plans of H blocks are rolled out from one env's state in one batch (`MatrixGameEnv.imagine`),
scored by the model's learned reward head, once with frames (the VAE decoder runs on every block)
and once without (`frames=False`: latents and rewards only). Settings alternate within one run
(--rounds pairs); each row is the median of --repeats rollouts after one untimed rollout. The two
settings' rewards are compared too (they must be equal: the frames do not feed the latents).

Usage: python benchmarks/bench_imagine.py [--model doom-small] [--device cpu] [--candidates 16 64]
       [--horizon 3] [--repeats 3] [--rounds 2] [--threads 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, synchronize, table, write_json  # noqa: E402

from matrixgame_env.env import MatrixGameEnv  # noqa: E402
from matrixgame_env.learned_reward import LearnedReward  # noqa: E402


def random_plans(env: MatrixGameEnv, count: int, horizon: int, seed: int) -> list[list[dict]]:
    """`count` plans of `horizon` random actions from the env's action space (seeded)."""
    env.action_space.seed(seed)
    return [[env.action_space.sample() for _ in range(horizon)] for _ in range(count)]


def time_rollouts(env: MatrixGameEnv, plans: list, frames: bool, device: str, repeats: int) -> tuple[float, dict]:
    """(median seconds of `repeats` rollouts of `plans`, the last rollout's result)."""
    result = env.imagine(plans, frames=frames)
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        result = env.imagine(plans, frames=frames)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="doom-small", help="preset or folder; it must ship a reward head")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--candidates", type=int, nargs="+", default=[16, 64], help="K: plans rolled out together")
    parser.add_argument("--horizon", type=int, default=3, help="H: blocks per plan")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="pairs of (with, without frames), alternating")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    env = MatrixGameEnv(args.model, device=args.device, reward=LearnedReward(target="progress"))
    env.reset(seed=0)
    env.step(env.action_space.sample())  # plans start from a state with a full first block behind it
    rows = []
    for count in args.candidates:
        plans = random_plans(env, count, args.horizon, seed=count)
        rewards = {}
        for _ in range(args.rounds):
            for frames in (True, False):
                seconds, result = time_rollouts(env, plans, frames, args.device, args.repeats)
                rewards[frames] = result["rewards"]
                blocks = count * args.horizon
                rows.append(
                    {
                        "candidates": count,
                        "horizon": args.horizon,
                        "frames": frames,
                        "rollout_s": seconds,
                        "blocks_per_s": blocks / seconds,
                    }
                )
                print(table(rows[-1:], list(rows[-1])), flush=True)
        same = bool(np.array_equal(rewards[True], rewards[False]))
        for row in rows:
            if row["candidates"] == count:
                row["rewards_equal"] = same
    columns = ["candidates", "horizon", "frames", "rollout_s", "blocks_per_s", "rewards_equal"]
    print(table(rows, columns))
    for count in args.candidates:
        with_frames = statistics.median(r["rollout_s"] for r in rows if r["candidates"] == count and r["frames"])
        without = statistics.median(r["rollout_s"] for r in rows if r["candidates"] == count and not r["frames"])
        print(f"K={count}, H={args.horizon}: {with_frames / without:.2f}x faster without frames "
              f"({with_frames:.3f} -> {without:.3f} s)")  # fmt: skip
    settings = {"model": args.model, "device": args.device, "horizon": args.horizon, "repeats": args.repeats}
    settings.update(rounds=args.rounds, threads=torch.get_num_threads(), dtype=str(env.world.vae.dtype))
    name = f"imagine_{args.device.split(':')[0]}"
    path = write_json(name, {"environment": environment(), "settings": settings, "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
