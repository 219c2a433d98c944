"""Env resets with and without remembered start encodings, side by side in one run.

A reset of one env (a shipped start picture chosen by the env's RNG) and a vector env's
`reset_worlds` of k worlds, each timed with the start-encoding cache on (once it has seen every
shipped start picture) and off (`start_encodings.capacity = 0`: the VAE encoder and CLIP run
every time).
Settings alternate within one run (--rounds pairs); each row is the median of --repeats resets.

Usage: python benchmarks/bench_reset.py [--model doom-small] [--device cpu] [--worlds 4]
       [--repeats 5] [--rounds 2] [--threads 2] [--out DIR]
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
from matrixgame_env.vector import MatrixGameVectorEnv  # noqa: E402


def time_resets(reset, device: str, repeats: int) -> float:
    """Median seconds of `repeats` calls of `reset` (after one untimed call)."""
    reset()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        reset()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="doom-small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worlds", type=int, default=4, help="worlds of the vector env, all reset together")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="pairs of (cached, uncached) settings, alternating")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    single = MatrixGameEnv(args.model, device=args.device)
    vector = MatrixGameVectorEnv(args.model, num_envs=args.worlds, device=args.device)
    vector.reset(seed=0)
    everyone = np.arange(args.worlds)
    rows = []
    for _ in range(args.rounds):
        for cached in (True, False):
            for env, name, reset in (
                (single, "one env, reset()", lambda: single.reset()),
                (vector, f"vector env, reset_worlds of {args.worlds}", lambda: vector.reset_worlds(everyone)),
            ):
                cache = env.world.start_encodings
                cache.capacity = 32 if cached else 0
                if cached:  # every shipped picture seen once, as after the first episodes of a run
                    env.world.encode_start(env.world.start_image_paths())
                seconds = time_resets(reset, args.device, args.repeats)
                rows.append(
                    {"setting": name, "start_cache": cached, "reset_s": seconds, "cache_hits_so_far": cache.hits}
                )
                print(table(rows[-1:], ["setting", "start_cache", "reset_s"]), flush=True)
    print(table(rows, ["setting", "start_cache", "reset_s"]))
    for name in dict.fromkeys(row["setting"] for row in rows):
        on = statistics.median(r["reset_s"] for r in rows if r["setting"] == name and r["start_cache"])
        off = statistics.median(r["reset_s"] for r in rows if r["setting"] == name and not r["start_cache"])
        print(f"{name}: {off / on:.1f}x faster with the cache ({off * 1e3:.0f} -> {on * 1e3:.0f} ms)")
    settings = {"model": args.model, "device": args.device, "worlds": args.worlds, "repeats": args.repeats}
    settings["threads"] = torch.get_num_threads()
    name = f"reset_{args.device.split(':')[0]}"
    path = write_json(name, {"environment": environment(), "settings": settings, "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
