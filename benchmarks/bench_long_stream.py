"""Memory over a long stream of one world: the state's bytes, the process's resident memory and (on a
GPU) the allocated device memory after chosen block counts. Flat numbers mean no growth with episode
length (fixed-size ring caches, a fixed-size decoder cache).

Usage: python benchmarks/bench_long_stream.py [--model doom-small] [--device cpu] [--blocks 1000] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, table, write_json  # noqa: E402

from matrixgame_env.world.model import WorldModel, enable_fast_path  # noqa: E402


def resident_mib() -> float:
    """The process's resident set size (Linux /proc), in MiB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096 / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="doom-small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--blocks", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    world = WorldModel.from_pretrained(args.model, device=args.device)
    enable_fast_path(world, True)
    state = world.start([str(world.start_image_paths()[0])], seed=0)
    checkpoints = sorted({10, 100, args.blocks // 2, args.blocks} & set(range(1, args.blocks + 1)))
    generator = torch.Generator().manual_seed(0)
    rows = []
    started = time.perf_counter()
    for block in tqdm(range(1, args.blocks + 1), desc="blocks", unit="block"):
        keys = (torch.rand(1, 4, generator=generator) < 0.3).float()
        mouse = (torch.rand(1, 2, generator=generator) - 0.5) * 0.4
        world.step(state, keys, mouse)
        if block in checkpoints:
            decoder_bytes = state.decoder_cache.nbytes if state.decoder_cache is not None else 0
            row = {
                "blocks": block,
                "attention_caches_mib": state.nbytes / 2**20,
                "decoder_cache_mib": decoder_bytes / 2**20,
                "resident_mib": resident_mib(),
            }
            if args.device.startswith("cuda"):
                row["cuda_allocated_mib"] = torch.cuda.memory_allocated() / 2**20
            rows.append(row)
    elapsed = time.perf_counter() - started
    print(table(rows, ["blocks", "attention_caches_mib", "decoder_cache_mib", "resident_mib", "cuda_allocated_mib"]))
    first, last = rows[0], rows[-1]
    summary = {
        "state_growth_mib": (last["attention_caches_mib"] + last["decoder_cache_mib"])
        - (first["attention_caches_mib"] + first["decoder_cache_mib"]),
        "resident_growth_mib_after_block_10": last["resident_mib"] - first["resident_mib"],
        "blocks_per_s": args.blocks / elapsed,
    }
    if "cuda_allocated_mib" in last:
        summary["cuda_growth_mib_after_block_10"] = last["cuda_allocated_mib"] - first["cuda_allocated_mib"]
    print(summary)
    payload = {"environment": environment(), "model": args.model, "device": args.device, "rows": rows, **summary}
    name = f"long_stream_{args.device.split(':')[0]}"
    print(f"wrote {write_json(name, payload, args.out)}")


if __name__ == "__main__":
    main()
