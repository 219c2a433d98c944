"""Vector-env steps per second when worlds end their episodes at different times.

Each world's episode ends at random (probability 1 / --episode-steps per step, the same draws for
every setting), so the worlds reset at different steps, as in RL training. Each reset starts a
cohort of its own; with `merge_cohorts` (the default) a cohort joins the others once its caches
are full, without it every cohort keeps its own forward for good. Settings (--settings): "merged"
(the default env), "merged_padded" (merged, cohorts of new worlds padded to 8 rows:
`pad_new_cohorts=8`), "merged_serial" (merged, but waiting for each cohort's frames before
the next cohort's work is queued, as before `overlap_cohorts`), "merged_waiting_uploads" (merged,
with plain uploads that wait for the GPU: `set_async_uploads(False)`), "merged_channels_last" (merged,
the decoder channels-last with the Triton kernel where it applies, whatever the number of worlds),
"merged_standard_layout" (merged, the decoder in the standard layout, as `fast=True` had it below
"compile" before channels-last paid from 16 worlds up), "merged_young_stream" (merged, the young
cohorts on a second CUDA stream beside the big one: `young_cohort_stream=True`), "merged_eager_norms"
(merged, the decoder's norms and adds eager rather than as Triton kernels beside its Triton
convolutions: `triton_norm.set_enabled(False)`), "merged_eager_dit_chains" (merged, the DiT's
elementwise chains eager rather than as the fast path's Triton kernels: `sampler.dit_kernels = False`),
"merged_fresh_states" (merged, but every cohort of new worlds on a new state rather than one
restarted in place: no CUDA graphs for their first blocks) and "separate" (no merging). They
alternate within one run (--rounds rounds; odd rounds take them in reverse order), and each reports
steps/s of all worlds together and the mean number of forwards (cohorts) a step ran.

With --profile, 20 steps of each setting (--settings) under torch's profiler: wall time against GPU
kernel time per step, the top kernels and host calls.

With --phases, the merged setting alone, each phase of a step timed on its own (synchronised before
and after: starting new worlds, DiT blocks and decodes per cohort size, joining cohorts), to show
where a desynchronised step goes.

Usage: python benchmarks/bench_desync.py [--model doom-small] [--device cuda] [--worlds 16 64]
       [--episode-steps 20] [--steps 100] [--warmup 20] [--rounds 2] [--fast graphs compile]
       [--settings merged merged_padded ...] [--phases | --profile] [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_env import FAST_OPTIONS, graph_captures  # noqa: E402
from common import environment, profile_tables, synchronize, table, write_json  # noqa: E402

import matrixgame_env.vector as vector_module  # noqa: E402
from matrixgame_env.host_waits import count_host_waits  # noqa: E402
from matrixgame_env.nn import triton_conv, triton_norm  # noqa: E402
from matrixgame_env.nn.transfer import set_async_uploads  # noqa: E402
from matrixgame_env.rewards import StepOutcome  # noqa: E402
from matrixgame_env.speed import random_actions  # noqa: E402
from matrixgame_env.vector import MatrixGameVectorEnv  # noqa: E402


class RandomEpisodeEnd:
    """Terminates each world with probability `probability` per step, from its own seeded stream
    (so every setting sees the same episode ends whatever its frames)."""

    def __init__(self, probability: float, seed: int) -> None:
        self.probability = probability
        self.rng = np.random.default_rng(seed)

    def __call__(self, step: StepOutcome) -> np.ndarray:
        return self.rng.random(len(step.frames)) < self.probability


SETTINGS = (
    "merged",
    "merged_padded",
    "merged_serial",
    "merged_waiting_uploads",
    "merged_channels_last",
    "merged_standard_layout",
    "merged_young_stream",
    "merged_eager_norms",
    "merged_eager_dit_chains",
    "merged_fresh_states",
    "separate",
)


def desync_env(args: argparse.Namespace, worlds: int, setting: str, fast: str) -> MatrixGameVectorEnv:
    """A vector env (fast path `fast`, one of SETTINGS) whose worlds end episodes at random, seeded
    alike for every setting."""
    env = MatrixGameVectorEnv(
        args.model,
        num_envs=worlds,
        device=args.device,
        fast=FAST_OPTIONS[fast],
        termination=RandomEpisodeEnd(1 / args.episode_steps, seed=1),
        merge_cohorts=setting != "separate",
        pad_new_cohorts=8 if setting == "merged_padded" else 0,
        young_cohort_stream=setting == "merged_young_stream",
    )
    env.overlap_cohorts = setting != "merged_serial"
    set_async_uploads(setting != "merged_waiting_uploads")  # process-wide: set again by every setting
    triton_norm.set_enabled(setting != "merged_eager_norms")  # process-wide too
    if setting == "merged_eager_dit_chains":
        env.world.sampler.dit_kernels = False
    if setting == "merged_channels_last":
        env.world.vae.set_decoder_channels_last(True)
        env.world.vae.set_decoder_triton(triton_conv.available())
    if setting == "merged_standard_layout":
        env.world.vae.set_decoder_channels_last(False)
    if setting == "merged_fresh_states":
        env._state_pool.capacity = 0  # no state is kept to restart in
    return env


def warm_up(env: MatrixGameVectorEnv, args: argparse.Namespace) -> np.random.Generator:
    """Reset, then `args.warmup` steps of random actions (episodes desynchronise); the action stream."""
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    for _ in range(args.warmup):
        env.step(random_actions(env.single_action_space, rng, env.num_envs))
    return rng


def round_order(settings: list[str], round_index: int) -> list[str]:
    """The settings in the order of one round: as given in even rounds, reversed in odd ones, so that
    a drift along the run (the process's autotuning caches filling, new cohort sizes met first by the
    first setting) weighs on every setting alike over pairs of rounds."""
    return list(settings) if round_index % 2 == 0 else list(reversed(settings))


def run_setting(args: argparse.Namespace, worlds: int, setting: str, fast: str) -> dict:
    """Steps/s and cohorts per step of one vector env (fast path `fast`) after `args.warmup` steps."""
    env = desync_env(args, worlds, setting, fast)
    rng = warm_up(env, args)
    synchronize(args.device)
    captures_before = graph_captures(env)
    captured_sizes = CaptureTally(env)
    pool = env._state_pool
    hits_before, misses_before = pool.hits, pool.misses
    cohorts, ended = [], 0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        _, _, terminated, truncated, _ = env.step(random_actions(env.single_action_space, rng, worlds))
        cohorts.append(env.num_cohorts)
        ended += int((terminated | truncated).sum())
    synchronize(args.device)
    elapsed = time.perf_counter() - t0
    captures_timed = [after - before for after, before in zip(graph_captures(env), captures_before)]
    captured_sizes.stop()
    graphs = env.world.sampler.graphs
    env.close()
    return {
        "fast": fast,
        "worlds": worlds,
        "setting": setting,
        "steps_per_s": worlds * args.steps / elapsed,
        "mean_cohorts": statistics.mean(cohorts),
        "max_cohorts": max(cohorts),
        "episodes_ended": ended,
        "graph_captures": None if graphs is None else graphs.captures,
        "eager_blocks_beyond_graphs": None if graphs is None else graphs.eager_blocks,
        # CUDA graphs captured while timed (DiT blocks, decodes): each costs an eager pass and a capture
        "captures_timed": None if graphs is None else captures_timed,
        # the same by the captured state's number of worlds: {"dit": {rows: n}, "decoder": {rows: n}}
        "captures_timed_by_rows": captured_sizes.counts,
        # cohorts of new worlds started while timed in a kept state, and in a new one
        "restarted_states_timed": pool.hits - hits_before,
        "new_states_timed": pool.misses - misses_before,
    }


class CaptureTally:
    """Counts the env's CUDA-graph captures by the batch size of the captured state until `stop`."""

    def __init__(self, env: MatrixGameVectorEnv) -> None:
        self.counts: dict[str, dict[int, int]] = {"dit": {}, "decoder": {}}
        self._patched = []
        sampler_graphs, decoder_graphs = env.world.sampler.graphs, env.world.decoder_graphs
        if sampler_graphs is not None:
            self._patch(sampler_graphs, "dit", lambda args: args[0].batch_size)
        if decoder_graphs is not None:
            self._patch(decoder_graphs, "decoder", lambda args: args[0].shape[0])

    def _patch(self, graphs, kind: str, rows_of: Callable[[tuple], int]) -> None:
        original = graphs._capture

        def counted(*args, **kwargs):
            rows = int(rows_of(args))
            self.counts[kind][rows] = self.counts[kind].get(rows, 0) + 1
            return original(*args, **kwargs)

        graphs._capture = counted
        self._patched.append(graphs)

    def stop(self) -> None:
        for graphs in self._patched:
            del graphs._capture  # the class's method again
        self._patched = []


class PhaseTimer:
    """Wall time of each phase of a vector-env step, per cohort size, synchronised around each call."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.seconds: dict[tuple[str, int], float] = collections.defaultdict(float)
        self.calls: collections.Counter = collections.Counter()

    def wrap(self, name: str, fn: Callable, size: Callable[[tuple], int]) -> Callable:
        def timed(*args, **kwargs):
            synchronize(self.device)
            t0 = time.perf_counter()
            result = fn(*args, **kwargs)
            synchronize(self.device)
            key = (name, size(args))
            self.seconds[key] += time.perf_counter() - t0
            self.calls[key] += 1
            return result

        return timed

    def rows(self, steps: int) -> list[dict]:
        keys = sorted(self.seconds, key=lambda key: -self.seconds[key])
        return [
            {
                "phase": name,
                "worlds": size,
                "calls": self.calls[(name, size)],
                "ms_each": self.seconds[(name, size)] / self.calls[(name, size)] * 1e3,
                "ms_per_step": self.seconds[(name, size)] / steps * 1e3,
            }
            for name, size in keys
        ]


def run_phases(args: argparse.Namespace, worlds: int, fast: str) -> tuple[dict, list[dict]]:
    """The merged setting with each phase timed: (its row, the phase rows)."""
    env = desync_env(args, worlds, "merged", fast)
    timer = PhaseTimer(args.device)
    world = env.world
    world.start = timer.wrap("start new worlds", world.start, lambda a: len(a[0]))
    world.step_latents = timer.wrap("DiT block", world.step_latents, lambda a: a[0].batch_size)
    world.decode_on_device = timer.wrap("decode", world.decode_on_device, lambda a: a[0].batch_size)
    saved = vector_module.absorb, vector_module.merge_states
    vector_module.absorb = timer.wrap("absorb", vector_module.absorb, lambda a: len(a[2]))
    vector_module.merge_states = timer.wrap("merge_states", vector_module.merge_states, lambda a: len(a[1]))
    try:
        rng = warm_up(env, args)
        timer.seconds.clear()
        timer.calls.clear()
        synchronize(args.device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            env.step(random_actions(env.single_action_space, rng, worlds))
        synchronize(args.device)
        elapsed = time.perf_counter() - t0
    finally:
        vector_module.absorb, vector_module.merge_states = saved
    env.close()
    row = {"fast": fast, "worlds": worlds, "setting": "merged", "phases_timed": True}
    row.update(steps_per_s=worlds * args.steps / elapsed, ms_per_step=elapsed / args.steps * 1e3)
    return row, timer.rows(args.steps)


def host_waits(env: MatrixGameVectorEnv, rng: np.random.Generator, steps: int) -> dict[str, float]:
    """Operations that made the host wait for the GPU in `steps` env steps, per step, by the package
    line that asked (`count_host_waits`)."""

    def work() -> None:
        for _ in range(steps):
            env.step(random_actions(env.single_action_space, rng, env.num_envs))

    return {site: n / steps for site, n in count_host_waits(work).most_common()}


def run_profile(args: argparse.Namespace, worlds: int, fast: str, setting: str = "merged", steps: int = 20) -> dict:
    """A setting's steps under torch's profiler after the warm-up: wall time against the
    GPU's kernel time per step (how much of a step the GPU idles), the kernels with the most time
    and the host-side calls with the most self time (waits for the GPU included)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    env = desync_env(args, worlds, setting, fast)
    rng = warm_up(env, args)
    waits = host_waits(env, rng, steps)
    synchronize(args.device)
    with torch_profile(
        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
    ) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            env.step(random_actions(env.single_action_space, rng, worlds))
        synchronize(args.device)
        elapsed = time.perf_counter() - t0
    env.close()
    tables = profile_tables(prof, steps, top=15)
    host = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return {
        "fast": fast,
        "worlds": worlds,
        "setting": setting,
        "steps": steps,
        "wall_ms_per_step": elapsed / steps * 1e3,  # with the profiler's own overhead
        "gpu_kernel_ms_per_step": tables["kernels"][0]["ms"],
        "kernels": tables["kernels"],
        "operators": tables["operators"],
        # where the host waits for the GPU (torch's sync debug mode): per step, by the line that waited
        "host_waits_per_step": waits,
        "host": [
            {"name": e.key[:90], "self_cpu_ms": e.self_cpu_time_total / 1e3 / steps, "calls": e.count / steps}
            for e in host
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="doom-small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worlds", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--episode-steps", type=float, default=20.0, help="mean episode length in env steps")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20, help="steps before timing (episodes desynchronise)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the settings, alternating")
    parser.add_argument(
        "--settings", nargs="+", default=["merged", "separate"], choices=SETTINGS, help="vector-env settings"
    )
    parser.add_argument(
        "--fast",
        nargs="+",
        default=["graphs"],
        choices=list(FAST_OPTIONS),
        help="fast paths to measure (each in every setting)",
    )
    parser.add_argument("--phases", action="store_true", help="time each phase of the merged setting instead")
    parser.add_argument(
        "--profile", action="store_true", help="profile 20 steps of each setting instead (GPU idle time)"
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    if args.episode_steps < 1:
        parser.error("--episode-steps must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {
        "model": args.model,
        "device": args.device,
        "episode_steps_mean": args.episode_steps,
        "steps": args.steps,
        "warmup": args.warmup,
        "fast": args.fast,
        "settings": args.settings,
        "threads": torch.get_num_threads(),
    }
    name = f"desync_{args.device.split(':')[0]}"
    if args.profile:
        for fast_name in args.fast:
            for worlds in args.worlds:
                for setting in args.settings:
                    result = run_profile(args, worlds, fast_name, setting)
                    print(
                        f"{fast_name}, {worlds} worlds, {setting}, profiled: {result['wall_ms_per_step']:.1f} ms "
                        f"per step, GPU kernels {result['gpu_kernel_ms_per_step']:.1f} ms"
                    )
                    print(table(result["kernels"], ["name", "ms", "share", "calls"]))
                    print(table(result["host"], ["name", "self_cpu_ms", "calls"]), flush=True)
                    print("host waits per step:", result["host_waits_per_step"], flush=True)
                    payload = {"environment": environment(), "settings": settings, "profile": result}
                    suffix = "" if setting == "merged" else f"_{setting}"
                    path = write_json(f"{name}_profile_{fast_name}_{worlds}{suffix}", payload, args.out)
                    print(f"wrote {path}")
        return
    if args.phases:
        for fast_name in args.fast:
            for worlds in args.worlds:
                row, phases = run_phases(args, worlds, fast_name)
                print(f"{fast_name}, {worlds} worlds, merged: {row['steps_per_s']:.1f} steps/s with phases timed")
                print(table(phases, ["phase", "worlds", "calls", "ms_each", "ms_per_step"]), flush=True)
                payload = {"environment": environment(), "settings": settings, "rows": [row], "phases": phases}
                path = write_json(f"{name}_phases_{fast_name}_{worlds}", payload, args.out)
                print(f"wrote {path}")
        return
    rows: list[dict] = []
    for fast_name in args.fast:
        for worlds in args.worlds:
            for round_index in range(args.rounds):
                for setting in round_order(args.settings, round_index):
                    rows.append(run_setting(args, worlds, setting, fast_name))
                    row = rows[-1]
                    row["round"] = round_index
                    print(
                        f"{fast_name}, {worlds} worlds, {setting}: {row['steps_per_s']:.1f} steps/s, "
                        f"{row['mean_cohorts']:.2f} cohorts per step",
                        flush=True,
                    )
                    # Written after every setting, so a run cut short keeps what it measured.
                    path = write_json(
                        name, {"environment": environment(), "settings": settings, "rows": rows}, args.out
                    )
    print(
        table(
            rows,
            [
                "fast",
                "worlds",
                "round",
                "setting",
                "steps_per_s",
                "mean_cohorts",
                "max_cohorts",
                "episodes_ended",
                "graph_captures",
                "captures_timed",
                "restarted_states_timed",
                "new_states_timed",
            ],
        )
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
