"""GPU check of the streaming engine.

1. The DiT fixture replayed in bfloat16 (and float32) on the GPU against the official float32
   outputs: per-call flow errors and final latent errors.
2. The full-size universal DiT (1.6 B, random weights, bf16, 44x80 latents = 352x640 video)
   streaming N blocks at batch 1 and 4: finite outputs, blocks/s, peak memory.

Usage: python benchmarks/check_engine_gpu.py [--blocks 10] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, random_init_, synchronize, table, write_json  # noqa: E402

from matrixgame_env.nn import CausalDiT  # noqa: E402
from matrixgame_env.reference import (  # noqa: E402
    load_fixture,
    max_relative_error,
    norm_relative_error,
    replay_dit_fixture,
    subsample_strides,
)
from matrixgame_env.world.sampler import SamplerConfig, StreamingSampler  # noqa: E402


def fixture_agreement(device: str) -> list[dict]:
    fixture = load_fixture("dit_universal")
    strides = subsample_strides(fixture.spec["outputs"]["per_call_flow_pred"])
    expected_latents = fixture.io(fixture.spec["outputs"]["output_latents"]["tensor"])
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        replay = replay_dit_fixture(fixture, device=device, dtype=dtype)
        call_errors = []
        for flow, call in zip(replay.flows, fixture.spec["calls"]):
            sub = flow[..., :: strides[0], :: strides[1]]
            call_errors.append(
                (
                    max_relative_error(sub, fixture.io(call["flow_pred_sub"])),
                    norm_relative_error(sub, fixture.io(call["flow_pred_sub"])),
                )
            )
        rows.append(
            {
                "dtype": str(dtype).replace("torch.", ""),
                "calls": len(call_errors),
                "flow_max_abs_err_worst": max(e[0] for e in call_errors),
                "flow_rel_l2_worst": max(e[1] for e in call_errors),
                "flow_rel_l2_first_call": call_errors[0][1],
                "latents_max_abs_err": max_relative_error(replay.latents, expected_latents),
                "latents_rel_l2": norm_relative_error(replay.latents, expected_latents),
            }
        )
    return rows


def full_size_stream(device: str, batch: int, blocks: int, model: CausalDiT) -> dict:
    sampler = StreamingSampler(model, SamplerConfig(), latent_size=(44, 80))
    g = torch.Generator(device="cpu").manual_seed(batch)
    image = torch.randn(batch, 16, 1, 44, 80, generator=g).to(device)
    context = torch.randn(batch, 257, 1280, generator=g).to(device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    state = sampler.start(image, context, seed=0)
    times, finite = [], True
    for _ in range(blocks):
        frames = sampler.video_frames_for_block(state)
        keyboard = (torch.rand(batch, frames, 4, generator=g) > 0.5).float()
        mouse = 0.1 * torch.randn(batch, frames, 2, generator=g)
        synchronize(device)
        t0 = time.perf_counter()
        latents = sampler.step(state, keyboard, mouse)
        synchronize(device)
        times.append(time.perf_counter() - t0)
        finite &= bool(torch.isfinite(latents).all())
    steady = times[2:] if len(times) > 4 else times
    median = statistics.median(steady)
    return {
        "batch": batch,
        "blocks": blocks,
        "finite": finite,
        "first_block_s": times[0],
        "median_block_s": median,
        "blocks_per_s": 1 / median,
        "video_fps": 12 * batch / median,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "state_mem_gib": state.nbytes / 2**30,
        "weights_gib": base / 2**30,
        "latent_std_last": float(latents.float().std()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--config", default=None, help="official config.json (default: models/universal)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = args.device
    result = {"environment": environment()}

    agreement = fixture_agreement(device)
    result["fixture_agreement"] = agreement

    config_path = args.config or Path(__file__).resolve().parents[1] / "models" / "universal" / "config.json"
    config = json.loads(Path(config_path).read_text())
    config = config.get("dit", config)  # our preset format nests the official DiT config
    with torch.device("meta"):
        model = CausalDiT.from_config(config)
    model = model.to_empty(device=device)
    random_init_(model)
    model = model.to(torch.bfloat16).eval()
    result["params"] = sum(p.numel() for p in model.parameters())
    stream = [full_size_stream(device, batch, args.blocks, model) for batch in args.batches]
    result["full_size_stream"] = stream

    path = write_json("engine_gpu", result, args.out)
    print(table(agreement, list(agreement[0])))
    print()
    print(table(stream, list(stream[0])))
    print(f"\nparams {result['params']:,}; wrote {path}")


if __name__ == "__main__":
    main()
