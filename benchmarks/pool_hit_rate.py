"""How often a vector env's cohorts of new worlds find a kept state to restart in, by pool policy.

Worlds end their episodes at random (as in `bench_desync.py`); every step's new worlds start a
cohort, which takes an idle state of its size from the env's `StatePool` or, failing that, starts a
new one (on a GPU: eager blocks, then CUDA-graph captures when it is reused). The policy decides
how many such misses remain once the run is warm. The count depends only on the env's bookkeeping,
not on the model's numbers, so this runs the test suite's tiny model on the CPU.

Usage: python benchmarks/pool_hit_rate.py [--worlds 64] [--episode-steps 20] [--warmup 150]
       [--steps 200] [--policies 2,16,64 3,16,64 4,16,64 3,24,128 3,16,64,8] [--out DIR]
(a policy: per_size,capacity,max_worlds[,pad]: pad is the env's `pad_new_cohorts`, 0 if left out)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from bench_desync import RandomEpisodeEnd  # noqa: E402
from common import environment, table, write_json  # noqa: E402
from tiny_model import write_tiny_model  # noqa: E402

from matrixgame_env.speed import random_actions  # noqa: E402
from matrixgame_env.vector import MatrixGameVectorEnv  # noqa: E402
from matrixgame_env.world.model import WorldModel  # noqa: E402
from matrixgame_env.world.state_pool import StatePool  # noqa: E402


def parse_policy(text: str) -> tuple[int, int, int, int]:
    parts = text.split(",")
    if len(parts) not in (3, 4) or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(
            f"a policy is per_size,capacity,max_worlds[,pad] (three or four integers), got {text!r}"
        )
    per_size, capacity, max_worlds, pad = (int(p) for p in [*parts, "0"][:4])
    return per_size, capacity, max_worlds, pad


def run_policy(world: WorldModel, args: argparse.Namespace, policy: tuple[int, int, int, int]) -> dict:
    """Takes answered and missed in the timed steps, with the env keeping stale rows (as on a GPU)."""
    per_size, capacity, max_worlds, pad = policy
    env = MatrixGameVectorEnv(
        model=world,
        num_envs=args.worlds,
        termination=RandomEpisodeEnd(1 / args.episode_steps, seed=1),
        pad_new_cohorts=pad,
    )
    env.prefer_in_place = True  # as where CUDA graphs replay
    env._state_pool = pool = StatePool(capacity, per_size, max_worlds)
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    for _ in range(args.warmup):
        env.step(random_actions(env.single_action_space, rng, args.worlds))
    hits, misses = pool.hits, pool.misses
    big_states = [biggest_state(env)]
    for _ in range(args.steps):
        env.step(random_actions(env.single_action_space, rng, args.worlds))
        big_states.append(biggest_state(env))
    row = {
        "per_size": per_size,
        "capacity": capacity,
        "max_worlds": max_worlds,
        "pad_new_cohorts": pad,
        "cohorts_started": pool.hits - hits + pool.misses - misses,
        "new_states": pool.misses - misses,
        # the largest cohort's state replaced by a new one (on a GPU: eager blocks, then captures)
        "big_state_changes": sum(a is not b for a, b in zip(big_states, big_states[1:])),
        "idle_states_at_end": len(pool),
        "idle_worlds_at_end": pool.worlds,
    }
    env.close()
    return row


def biggest_state(env: MatrixGameVectorEnv) -> object:
    """The state of the env's cohort with the most rows."""
    return max(env._cohorts, key=lambda cohort: cohort.state.batch_size).state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, default=64)
    parser.add_argument("--episode-steps", type=float, default=20.0, help="mean episode length in env steps")
    parser.add_argument("--warmup", type=int, default=150)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument(
        "--policies",
        type=parse_policy,
        nargs="+",
        default=[(2, 16, 64, 0), (3, 16, 64, 0), (4, 16, 64, 0), (3, 24, 128, 0), (3, 16, 64, 8)],
    )
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        world = WorldModel.from_pretrained(write_tiny_model(Path(folder)), device="cpu")
        rows = []
        for policy in args.policies:
            rows.append(run_policy(world, args, policy))
            print(rows[-1], flush=True)
    print(table(rows, list(rows[0])))
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "policies")}
    path = write_json("pool_hit_rate", {"environment": environment(), "settings": settings, "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
