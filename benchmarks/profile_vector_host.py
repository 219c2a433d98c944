"""Where a GPU vector env's step goes between the host and the GPU (doom-small by default).

Times steps of a warmed `MatrixGameVectorEnv`, then, for a few more, the GPU's busy time (the union of
its kernels' intervals under torch's profiler) against the wall time, and the host's Python hot spots
(cProfile: the functions with the most time of their own, per step). Wall minus busy is time the GPU
waits for the host: preparing the next block, converting actions, drawing noise, handling results.
Prints a table and writes JSON.

Usage: python benchmarks/profile_vector_host.py [--worlds 64] [--path graphs|compile|eager]
       [--observation last|last_only|latent] [--out DIR]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_env import FAST_OPTIONS, random_actions, warm_vector_env  # noqa: E402
from common import environment, table, write_json  # noqa: E402


def gpu_busy_ms(prof) -> tuple[float, int]:
    """Milliseconds during which at least one kernel ran, and the number of kernels."""
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
    )
    busy, current = 0.0, None
    for start, end in spans:
        if current is None or start > current[1]:
            if current is not None:
                busy += current[1] - current[0]
            current = [start, end]
        else:
            current[1] = max(current[1], end)
    if current is not None:
        busy += current[1] - current[0]
    return busy / 1e3, len(spans)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="doom-small")
    parser.add_argument("--worlds", type=int, default=64)
    parser.add_argument("--path", choices=sorted(FAST_OPTIONS), default="graphs")
    parser.add_argument("--observation", choices=["last", "last_only", "latent"], default="last")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (then 5 profiled, 10 under cProfile)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this profiles a GPU vector env: no CUDA device here")
    from torch.profiler import ProfilerActivity, profile

    fast = FAST_OPTIONS[args.path]
    env, rng = warm_vector_env(args.model, args.worlds, fast, None, None, 8, observation=args.observation)
    actions = [random_actions(env.single_action_space, rng, args.worlds) for _ in range(args.steps + 15)]
    torch.cuda.synchronize()
    start = time.perf_counter()
    for action in actions[: args.steps]:
        env.step(action)
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) / args.steps * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for action in actions[args.steps : args.steps + 5]:
            env.step(action)
        torch.cuda.synchronize()
    busy_ms, kernels = gpu_busy_ms(prof)
    profiler = cProfile.Profile()
    profiler.enable()
    for action in actions[args.steps + 5 :]:
        env.step(action)
    torch.cuda.synchronize()
    profiler.disable()
    env.close()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, primitive, own s, cumulative s, callers)
    hot = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:15]
    host = [
        {"function": f"{Path(file).name}:{line}({name})", "own_ms": own / 10 * 1e3, "calls": calls / 10}
        for (file, line, name), (calls, _, own, _, _) in hot
    ]
    summary = {
        "worlds": args.worlds,
        "path": args.path,
        "observation": args.observation,
        "wall_ms": wall_ms,
        "steps_per_s": args.worlds / wall_ms * 1e3,
        "gpu_busy_ms": busy_ms / 5,
        "kernels_per_step": kernels / 5,
    }
    print(table([summary], list(summary)))
    print("host functions by own time, per step (cProfile; waits for the GPU included as synchronize):")
    print(table(host, ["function", "own_ms", "calls"]))
    result = {"environment": environment(), "model": args.model, "summary": summary, "host": host}
    print(f"wrote {write_json('vector_host_' + args.path + '_' + args.observation, result, args.out)}")


if __name__ == "__main__":
    main()
