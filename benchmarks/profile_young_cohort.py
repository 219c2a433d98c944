"""Where the first blocks of a new cohort of worlds go (the vector env's young cohorts).

A vector env whose worlds restart at different times runs each step's new worlds as a small cohort of
their own for two blocks, beside the big cohort, before they rejoin it. This script times those two
blocks (DiT and decode, each synchronised) for several cohort sizes, each size several times (the
first time of a shape pays cuDNN's autotuning), with a big cohort stepping in between as in the env:
first on fresh states, then on states restarted in place (`WorldModel.start(..., into=...)`, as the
vector env does with a `StatePool`), whose blocks replay CUDA graphs from their third use on (the
second captures). Then it profiles one fresh young cohort with torch.profiler: the operators by host
time and by device time, and the number of kernels launched.

    python benchmarks/profile_young_cohort.py [--model models/doom-small] [--device cuda]
        [--big 64] [--sizes 1 3 7] [--repeats 3] [--fast graphs|compile|eager] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, profile_tables, synchronize, table, write_json  # noqa: E402

from matrixgame_env.world.model import WorldModel, enable_fast_path  # noqa: E402
from matrixgame_env.world.state_pool import StatePool  # noqa: E402

FAST = {"graphs": True, "compile": "compile", "eager": False}


def random_actions(world: WorldModel, batch: int, frames: int, generator: torch.Generator):
    """Held keys and a small mouse move per world, for one block of `frames` video frames."""
    sampler = world.sampler
    keyboard = mouse = None
    if sampler.keyboard_dim:
        keyboard = (torch.rand(batch, 1, sampler.keyboard_dim, generator=generator) < 0.3).float()
        keyboard = keyboard.expand(batch, frames, sampler.keyboard_dim).contiguous()
    if sampler.mouse_dim:
        mouse = (
            (0.1 * torch.randn(batch, 1, sampler.mouse_dim, generator=generator))
            .expand(batch, frames, sampler.mouse_dim)
            .contiguous()
        )
    return keyboard, mouse


def timed(device: str, fn) -> tuple[float, object]:
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return 1000.0 * (time.perf_counter() - start), result


def block(world: WorldModel, state, generator: torch.Generator) -> dict[str, float]:
    """One block of `state`: DiT and decode timed apart (ms)."""
    frames = world.sampler.video_frames_for_block(state)
    keyboard, mouse = random_actions(world, state.batch_size, frames, generator)
    dit_ms, latents = timed(str(world.device), lambda: world.step_latents(state, keyboard, mouse))
    decode_ms, _ = timed(str(world.device), lambda: world.decode(state, latents))
    return {"dit_ms": dit_ms, "decode_ms": decode_ms}


def profile_block(world: WorldModel, state, generator: torch.Generator, rows: int) -> dict:
    """torch.profiler over one block (DiT + decode): the operators by host time (a table), the
    kernels and operators by device time (`profile_tables`), and how many kernels ran."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if world.device.type == "cuda" else [])
    frames = world.sampler.video_frames_for_block(state)
    keyboard, mouse = random_actions(world, state.batch_size, frames, generator)
    synchronize(str(world.device))
    with profile(activities=activities) as prof:
        latents = world.step_latents(state, keyboard, mouse)
        world.decode(state, latents)
        synchronize(str(world.device))
    averages = prof.key_averages()
    device = profile_tables(prof, repeats=1, top=rows)
    return {
        "kernels": sum(1 for e in prof.events() if e.device_type.name == "CUDA"),
        "device_ms": device["kernels"][0]["ms"],
        "host_ops": sum(e.count for e in averages),
        "by_host": averages.table(sort_by="self_cpu_time_total", row_limit=rows),
        "by_device": device,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/doom-small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--big", type=int, default=64, help="worlds of the big cohort stepping in between")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 3, 7], help="young cohort sizes")
    parser.add_argument("--repeats", type=int, default=4, help="young cohorts per size (>= 3)")
    parser.add_argument("--fast", choices=sorted(FAST), default="graphs")
    parser.add_argument("--profile-size", type=int, default=3, help="young cohort size profiled (0: none)")
    parser.add_argument("--rows", type=int, default=25, help="operators listed per profile table")
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON (default benchmarks/results)")
    args = parser.parse_args()

    world = WorldModel.from_pretrained(args.model, device=args.device)
    enable_fast_path(world, FAST[args.fast], batch=args.big)
    for graphs in (world.sampler.graphs, world.decoder_graphs):  # as in a vector env that merges cohorts
        if graphs is not None:
            graphs.capture_after = max(graphs.capture_after, 1)
    picture = world.start_image_paths()[0]
    generator = torch.Generator().manual_seed(0)
    big = world.start([picture] * args.big, seed=0)
    for _ in range(4):  # the big cohort reaches its steady, captured blocks
        block(world, big, generator)

    pool = StatePool()
    graphs = world.sampler.graphs
    if graphs is not None:  # as a vector env that merges cohorts sets it
        graphs.max_graphs = max(graphs.max_graphs, 3 + 2 * (pool.capacity + 2))
    rows = []
    for reuse in (False, True):
        for size in args.sizes:
            for repeat in range(args.repeats):
                into = pool.take(size) if reuse else None
                pictures, seed = [picture] * size, repeat
                start_ms, young = timed(args.device, lambda: world.start(pictures, seed=seed, into=into))  # noqa: B023
                first = block(world, young, generator)
                big_ms = block(world, big, generator)
                second = block(world, young, generator)
                if reuse:
                    pool.give(young)
                rows.append(
                    {
                        "states": "restarted" if reuse else "fresh",
                        "size": size,
                        "repeat": repeat,
                        "start_ms": round(start_ms, 2),
                        "block1_dit_ms": round(first["dit_ms"], 2),
                        "block1_decode_ms": round(first["decode_ms"], 2),
                        "block2_dit_ms": round(second["dit_ms"], 2),
                        "block2_decode_ms": round(second["decode_ms"], 2),
                        "big_dit_ms": round(big_ms["dit_ms"], 2),
                        "big_decode_ms": round(big_ms["decode_ms"], 2),
                    }
                )
                print(rows[-1], flush=True)
    print(table(rows, list(rows[0])))
    summary = []
    for reuse in ("fresh", "restarted"):
        for size in args.sizes:
            mine = [r for r in rows if r["states"] == reuse and r["size"] == size]
            later = [r for r in mine if r["repeat"] >= 2] or mine  # shapes seen before; restarted: captured
            keys = ("start_ms", "block1_dit_ms", "block1_decode_ms", "block2_dit_ms", "block2_decode_ms")
            summary.append(
                {"states": reuse, "size": size, **{k: round(statistics.median(r[k] for r in later), 2) for k in keys}}
            )
    print("medians of the repeats after the second (restarted states: once their graphs are captured):")
    print(table(summary, list(summary[0])))

    profiles = {}
    if args.profile_size:
        young = world.start([picture] * args.profile_size, seed=99)
        profiles["block1"] = profile_block(world, young, generator, args.rows)
        profiles["block2"] = profile_block(world, young, generator, args.rows)
        for name, prof in profiles.items():
            print(
                f"\n=== young cohort of {args.profile_size}, {name}: {prof['kernels']} kernels, "
                f"{prof['device_ms']:.1f} ms of device time, {prof['host_ops']} host operators"
            )
            print(prof["by_host"])
            if prof["kernels"]:
                print(table(prof["by_device"]["kernels"], ["name", "ms", "share", "calls"]))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    name = f"young_cohort_{args.device.split(':')[0]}_{args.fast}"
    write_json(
        name,
        {"environment": environment(), "settings": settings, "rows": rows, "medians": summary, "profiles": profiles},
        args.out,
    )


if __name__ == "__main__":
    main()
