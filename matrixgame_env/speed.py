"""`matrixgame-env bench`: how many env steps per second a model runs on this machine.

Each setting (worlds x observation) steps an env with seeded random actions: one world through
`MatrixGameEnv`, more through `MatrixGameVectorEnv` (one forward per step). Steps are timed after a
warm-up (kernels tuned; with CUDA graphs, on until the blocks replay without new captures); the table
gives world-steps per second (a step is one block: 12 video frames), video frames per second, the
median step time and, on a GPU, peak memory.

    matrixgame-env bench --worlds 1 16 --observations last latent --json speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .dtype_names import add_dtype_argument, dtype_from_name

# --observations name -> the envs' observation options ("last_only": info_frames=False, the last frame decoded alone)
OBSERVATIONS = {
    "last": {"observation": "last"},
    "last_only": {"observation": "last", "info_frames": False},
    "latent": {"observation": "latent"},
}
FAST_PATHS = {"eager": False, "fast": True, "compile": "compile"}  # path name -> the envs' `fast`
# Steady state: STEADY_STEPS steps in a row (a ring period: a state's blocks alternate two cache phases, each
# its own graph) that replayed their blocks from CUDA graphs and captured none; warm-ups step on for it at
# most STEADY_LIMIT steps. A capture costs about a step's time, so one among the timed steps skews them.
STEADY_STEPS, STEADY_LIMIT = 2, 32


def graph_counts(world: Any) -> tuple[tuple[int, int], int] | None:
    """((graphs captured by the world's sampler, by its decoder), blocks the sampler replayed) so far;
    None where the sampler has no CUDA graphs."""
    graphs = world.sampler.graphs
    if graphs is None:
        return None
    decoder = world.decoder_graphs
    return (graphs.captures, 0 if decoder is None else decoder.captures), graphs.replays


def warm_to_steady(world: Any, step: Callable[[], Any], limit: int = STEADY_LIMIT) -> int:
    """Calls `step()` (one env step of `world`) until STEADY_STEPS steps in a row replayed their
    blocks and captured no graph, at most `limit` times (not at all without CUDA graphs); returns the
    steps taken."""
    before = graph_counts(world)
    if before is None:
        return 0
    taken = steady = 0
    while steady < STEADY_STEPS and taken < limit:
        step()
        taken += 1
        after = graph_counts(world)
        steady = steady + 1 if after[0] == before[0] and after[1] > before[1] else 0
        before = after
    return taken


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--model", default="doom-small", help="preset name, model folder or hub id")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    add_dtype_argument(parser)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1], help="worlds stepped together, per setting")
    parser.add_argument(
        "--observations",
        nargs="+",
        choices=list(OBSERVATIONS),
        default=["last"],
        help="last: frames (the VAE decoder runs); last_only: the last frame of each block decoded alone "
        "(info_frames=False); latent: the block's latents, no decoding",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    parser.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="untimed steps first (the 9-frame first block, graph captures, tuning); with CUDA graphs more "
        "follow until the blocks replay without captures",
    )
    path = parser.add_mutually_exclusive_group()
    path.add_argument("--eager", action="store_true", help="the eager reference path (default: the fast path)")
    path.add_argument(
        "--compile",
        action="store_true",
        help="the envs' fast='compile' (GPU: fused chains; CPU: the DiT and the decoder compiled); "
        "compiling happens in the warm-up",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the envs and their random actions")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse settings that cannot be measured, saying what is accepted."""
    if any(w < 1 for w in args.worlds):
        raise ValueError(f"--worlds must all be at least 1, got {args.worlds}")
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    if args.warmup < 1:
        raise ValueError(f"--warmup must be at least 1 (the first block is shorter), got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")


def random_actions(space: Any, rng: np.random.Generator, worlds: int | None = None) -> Any:
    """Seeded random actions of a Dict or Discrete space, batched over `worlds` (None: one world)."""
    shape = () if worlds is None else (worlds,)
    if hasattr(space, "spaces"):  # keyboard (keys held with probability 0.3) and mouse
        keys = space["keyboard"]
        action = {"keyboard": (rng.random(shape + keys.shape[-1:]) < 0.3).astype(keys.dtype)}
        if "mouse" in space.spaces:
            mouse = space["mouse"]
            action["mouse"] = rng.uniform(mouse.low, mouse.high, shape + mouse.shape[-1:]).astype(mouse.dtype)
        return action
    return rng.integers(0, space.n, shape) if worlds is not None else int(rng.integers(0, space.n))


def measure(world: Any, worlds: int, observation: str, steps: int, warmup: int, fast: bool | str, seed: int,
            bar: tqdm) -> dict[str, Any]:  # fmt: skip
    """One setting's row: world-steps/s, video fps, median step seconds, peak GPU memory."""
    from .env import MatrixGameEnv
    from .vector import MatrixGameVectorEnv

    cuda = world.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(world.device)
    if worlds == 1:
        env = MatrixGameEnv(world, fast=fast, **OBSERVATIONS[observation])
        space, batch = env.action_space, None
    else:
        env = MatrixGameVectorEnv(world, num_envs=worlds, fast=fast, **OBSERVATIONS[observation])
        space, batch = env.single_action_space, worlds
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    for _ in range(warmup):
        env.step(random_actions(space, rng, batch))
        bar.update()
    warmup += warm_to_steady(world, lambda: env.step(random_actions(space, rng, batch)))
    times = []
    for _ in range(steps):
        action = random_actions(space, rng, batch)
        if cuda:
            torch.cuda.synchronize(world.device)
        started = time.perf_counter()
        env.step(action)
        if cuda:
            torch.cuda.synchronize(world.device)
        times.append(time.perf_counter() - started)
        bar.update()
    env.close()
    total = sum(times)
    return {
        "worlds": worlds,
        "observation": observation,
        "steps_per_s": worlds * len(times) / total,
        "frames_per_s": worlds * len(times) * world.frames_per_block / total,
        "step_s": statistics.median(times),
        "peak_gib": torch.cuda.max_memory_allocated(world.device) / 2**30 if cuda else None,
        "warmup_steps": warmup,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ["worlds", "observation", "steps/s", "video fps", "step (ms)", "peak GiB"]
    lines = [header]
    for row in rows:
        peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
        lines.append([str(row["worlds"]), row["observation"], f"{row['steps_per_s']:.1f}",
                      f"{row['frames_per_s']:.0f}", f"{1e3 * row['step_s']:.1f}", peak])  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines)


def machine(world: Any) -> dict[str, Any]:
    """Where the figures were measured."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    info["device"] = torch.cuda.get_device_name(world.device) if world.device.type == "cuda" else platform.machine()
    return info


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Measure every setting, print the table (and write JSON); returns the rows."""
    from .world.model import WorldModel

    check_arguments(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    world = WorldModel.from_pretrained(args.model, device=args.device, dtype=dtype_from_name(args.dtype))
    settings = [(w, o) for w in args.worlds for o in args.observations]
    path = "eager" if args.eager else "compile" if args.compile else "fast"
    fast = FAST_PATHS[path]
    rows = []
    with tqdm(total=len(settings) * (args.warmup + args.steps), unit="step", disable=args.no_progress) as bar:
        for worlds, observation in settings:
            bar.set_description(f"{worlds} world(s), {observation}")
            rows.append(measure(world, worlds, observation, args.steps, args.warmup, fast, args.seed, bar))
    where = machine(world)
    print(f"{world.config.name} on {where['device']} ({world.device}, {world.vae.dtype}, {path} path)")
    print(format_table(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings_used = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        report = {"model": world.config.name, "machine": where, "path": path, "settings": settings_used, "rows": rows}
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return rows
