"""Where a GPU vector env's step goes between the host and the GPU (doom-small by default).

Times steps of a warmed `MatrixGameVectorEnv`, then, for a few more, the GPU's busy time (the union of
its kernels' intervals under torch's profiler) against the wall time, and the host's Python hot spots
(cProfile: the functions with the most time of their own, per step). Wall minus busy is time the GPU
waits for the host: preparing the next block, converting actions, drawing noise, handling results.
`--phases` also splits the host's share of a step into phases by timestamps: after the wait for the
GPU (results to numpy), in the caller, in `step()` before the first graph replay (actions, conditions,
inputs), the first replay's launch, and the rest until the wait. Prints tables and writes JSON.

Usage: python benchmarks/profile_vector_host.py [--worlds 64] [--path graphs|compile|eager]
       [--observation last|last_only|latent] [--phases] [--out DIR]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
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


class PhaseClock:
    """Host timestamps of each step's phases: `step()` entered, its first CUDA-graph replay called and
    returned, the (last) wait for the GPU called and returned, `step()` returned. Installed by wrapping
    the env's `step`, `torch.cuda.CUDAGraph.replay` and the streams' and events' `synchronize` while
    `recording()`."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    @contextmanager
    def recording(self, env):
        clock = time.perf_counter
        step, replay = env.step, torch.cuda.CUDAGraph.replay
        waits = {cls: cls.synchronize for cls in (torch.cuda.Stream, torch.cuda.Event)}
        marks: dict[str, float] = {}

        def timed_step(actions):
            marks.clear()
            marks["enter"] = clock()
            result = step(actions)
            marks["leave"] = clock()
            self.steps.append(dict(marks))
            return result

        def timed_replay(graph):
            first = "replay_call" not in marks
            if first:
                marks["replay_call"] = clock()
            replay(graph)
            if first:
                marks["replay_return"] = clock()

        def timed(synchronize):
            def timed_synchronize(stream_or_event):
                marks["wait_call"] = clock()
                synchronize(stream_or_event)
                marks["wait_return"] = clock()

            return timed_synchronize

        env.step, torch.cuda.CUDAGraph.replay = timed_step, timed_replay
        for cls, synchronize in waits.items():
            cls.synchronize = timed(synchronize)
        try:
            yield self
        finally:
            del env.step
            torch.cuda.CUDAGraph.replay = replay
            for cls, synchronize in waits.items():
                cls.synchronize = synchronize

    def phases_ms(self) -> dict[str, float]:
        """Median milliseconds of each phase over the recorded steps (the caller's share from the
        previous step's return to this step's entry)."""
        rows = []
        for previous, marks in zip(self.steps, self.steps[1:]):
            if not {"replay_call", "wait_call"} <= marks.keys():
                raise RuntimeError("a recorded step replayed no CUDA graph or never waited: warm the env up first")
            rows.append(
                {
                    "results_after_wait": previous["leave"] - previous["wait_return"],
                    "caller": marks["enter"] - previous["leave"],
                    "step_before_first_replay": marks["replay_call"] - marks["enter"],
                    "first_replay_launch": marks["replay_return"] - marks["replay_call"],
                    "rest_until_wait": marks["wait_call"] - marks["replay_return"],
                    "wait": marks["wait_return"] - marks["wait_call"],
                }
            )
        return {name: float(np.median([row[name] for row in rows]) * 1e3) for name in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="doom-small")
    parser.add_argument("--worlds", type=int, default=64)
    parser.add_argument("--path", choices=sorted(FAST_OPTIONS), default="graphs")
    parser.add_argument("--observation", choices=["last", "last_only", "latent"], default="last")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (then 5 profiled, 10 under cProfile)")
    parser.add_argument("--phases", action="store_true", help="time the host's phases of 20 more steps")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this profiles a GPU vector env: no CUDA device here")
    from torch.profiler import ProfilerActivity, profile

    fast = FAST_OPTIONS[args.path]
    env, rng, _ = warm_vector_env(args.model, args.worlds, fast, None, None, 8, observation=args.observation)
    actions = [random_actions(env.single_action_space, rng, args.worlds) for _ in range(args.steps + 35)]
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
    for action in actions[args.steps + 5 : args.steps + 15]:
        env.step(action)
    torch.cuda.synchronize()
    profiler.disable()
    phases = None
    if args.phases:
        clock = PhaseClock()
        with clock.recording(env):
            for action in actions[args.steps + 15 :]:
                env.step(action)
        phases = clock.phases_ms()
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
    if phases is not None:
        print("host phases of a step, medians of 19 steps (ms; the first four lie between a wait and the next launch):")
        print(table([phases], list(phases)))
    result = {"environment": environment(), "model": args.model, "summary": summary, "host": host, "phases": phases}
    print(f"wrote {write_json('vector_host_' + args.path + '_' + args.observation, result, args.out)}")


if __name__ == "__main__":
    main()
