"""What the decoder cache's slot layout does to the compiled CPU decoder: its warm-up and its steady blocks.

Part 1, the warm-up: one MatrixGameEnv on the CPU (`fast="compile"`, bfloat16, the last frame
alone), each of its first `--warm-steps` steps' decode timed, with the number of graphs Dynamo
compiled during it. A stream's first block decodes eagerly; the compiled decoder then compiles once
where every slot it reads keeps one layout from call to call, and again (strides made dynamic) where
the slots the eager first block left differ from those its graph leaves. Run it on two trees to
compare them.

Part 2, the steady blocks: the same compiled decoder streaming random latents into two caches in
alternating rounds, one keeping its slots dense channels-last (`FeatureCache.channels_last`, what
`WanVAE.new_decoder_cache` gives a channels-last decoder) and one keeping whatever layout each
layer's frames came in (the caches before that option). Each round is the median of `--blocks`
blocks of 3 latents with the last frame decoded alone.

Usage: python benchmarks/bench_decoder_slots.py [--threads 2] [--warm-steps 6] [--rounds 12] [--blocks 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, noted_decodes, table, write_json  # noqa: E402

from matrixgame_env.env import MatrixGameEnv  # noqa: E402
from matrixgame_env.nn.vae_cache import DecoderCache  # noqa: E402
from matrixgame_env.speed import random_actions  # noqa: E402


def warm_up(model: str, steps: int) -> list[dict]:
    """Each of an env's first `steps` steps: its decode's seconds and the graphs compiled during it."""
    env = MatrixGameEnv(model, device="cpu", fast="compile", dtype=torch.bfloat16, info_frames=False)
    calls = noted_decodes(env)
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    rows = []
    for step in range(steps):
        before = len(calls)
        env.step(random_actions(env.action_space, rng))
        seconds, graphs = (sum(column) for column in zip(*calls[before:])) if len(calls) > before else (0.0, 0)
        rows.append({"step": step, "decode_s": round(seconds, 3), "decoder_graphs_compiled": graphs})
    env.close()
    return rows


def steady_blocks(model: str, rounds: int, blocks: int) -> dict[str, list[float]]:
    """Milliseconds per steady block of one compiled decoder, rounds alternating the two slot layouts."""
    env = MatrixGameEnv(model, device="cpu", fast="compile", dtype=torch.bfloat16, info_frames=False)
    vae = env.world.vae
    if not vae.decoder_channels_last:
        raise SystemExit("this compares slot layouts of a channels-last decoder; the env's is not")
    generator = torch.Generator().manual_seed(0)
    z_dim = vae.z_dim
    height, width = (side // vae.spatial_factor for side in env.world.video_size)
    latents = torch.randn(1, z_dim, 3 * 40, height, width, generator=generator).to(torch.bfloat16)
    caches = {
        "channels_last": DecoderCache(vae.decoder.num_cache_slots, 1, channels_last=True),
        "as_given": DecoderCache(vae.decoder.num_cache_slots, 1, channels_last=False),
    }
    position = dict.fromkeys(caches, 0)

    def block(name: str) -> float:
        start = position[name]
        position[name] = (start + 3) % latents.shape[2]
        if start == 0:
            caches[name].restart()
        started = time.perf_counter()
        with torch.no_grad():
            vae.decode_stream(latents[:, :, start : start + 3], caches[name], check_finite=False, last_frames=1)
        return time.perf_counter() - started

    for name in caches:  # their compiles, and a steady block each after
        for _ in range(5):
            block(name)
    times: dict[str, list[float]] = {name: [] for name in caches}
    for r in range(rounds):
        for name in list(caches) if r % 2 == 0 else list(caches)[::-1]:
            times[name].append(1000 * statistics.median(block(name) for _ in range(blocks)))
    env.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="doom-small")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warm-steps", type=int, default=6, help="steps of part 1 (0: skip it)")
    parser.add_argument("--rounds", type=int, default=12, help="rounds of part 2, alternating layouts (0: skip it)")
    parser.add_argument("--blocks", type=int, default=8, help="blocks a round")
    parser.add_argument("--tag", default="", help="a name for this run's tree, kept in the JSON")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    payload: dict = {"environment": environment(), "settings": vars(args) | {"out": None}}
    if args.warm_steps:
        rows = warm_up(args.model, args.warm_steps)
        print(table(rows, ["step", "decode_s", "decoder_graphs_compiled"]))
        payload["warm_up"] = rows
        payload["decoder_graphs"] = sum(row["decoder_graphs_compiled"] for row in rows)
        payload["decodes_until_steady_s"] = round(sum(row["decode_s"] for row in rows), 2)
        print(
            f"decoder graphs compiled: {payload['decoder_graphs']}; decodes of the first {args.warm_steps} "
            f"steps: {payload['decodes_until_steady_s']} s"
        )
    if args.rounds:
        times = steady_blocks(args.model, args.rounds, args.blocks)
        rows = [
            {"slots": name, "ms_per_block": round(statistics.median(v), 2), "rounds": ", ".join(f"{x:.1f}" for x in v)}
            for name, v in times.items()
        ]
        print(table(rows, ["slots", "ms_per_block", "rounds"]))
        payload["steady"] = rows
        ratio = statistics.median(times["as_given"]) / statistics.median(times["channels_last"])
        payload["as_given_over_channels_last"] = round(ratio, 3)
        print(f"steady block, slots as given / channels-last: {ratio:.3f}x")
    print("wrote", write_json("decoder_slots_cpu", payload, args.out))


if __name__ == "__main__":
    main()
