"""Streaming speed of the full-size official architecture: our eager path and our fast path side by side.

Conditions of the reference measurement of the official code: distilled universal config, random
weights, bf16 DiT and VAE decoder, 352x640, 3 denoising steps plus the clean-context re-run, blocks
of 3 latent frames (12 video frames), window 6. Per batch size and path: DiT-only fps, end-to-end
fps (DiT + streaming VAE decode + frames to host), action-to-frames latency of a block, peak memory;
each the median over repeats of `--blocks` timed blocks after `--warmup` blocks. Also: the fast path's
agreement with the eager one (same seeds and actions), memory over a long stream, and the time from
a cold start to the first frame.

Paths:
  eager    the reference implementation as written (SDPA attention, no graphs)
  graphs   steady-state blocks replayed from CUDA graphs, cuDNN autotuned decoder convolutions
  fast     what `fast=True` runs (`enable_fast_path`): graphs, the decoder channels-last, the DiT's
           elementwise chains as shape-generic Triton kernels (nn/triton_dit.py)
  fast_decoder_graphs  fast, with the VAE decoder replayed from CUDA graphs too (`fast=True` does that for
           narrow decoders only: is it worth its memory at full size?)
  fast_early  fast through `WorldModel.generate`, which decodes a block between its denoising steps and
           the clean-context re-run: latency to frames on the host without the re-run (timed alone),
           and blocks back to back (the re-run overlaps the host's next step)
  fast_beside  fast_early, with the decode on a stream of its own beside the re-run (`set_decode_beside`)
  overlap  fast, with the decode of block n running on its own stream while the DiT makes block n+1
  fused    graphs, with the DiT's elementwise chains fused by torch.compile (nn/fusion.py)
  fused_cl fused, with the VAE decoder on channels-last activations and weights
(Results written before 2026-12-04 call "fast" what is now "graphs"; that day's "triton" was graphs
with the Triton chains, without the channels-last decoder.)

Usage: python benchmarks/bench_stream.py [--batches 1 4 8] [--blocks 8] [--long-blocks 300] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

T0 = time.perf_counter()

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, profile_tables, random_world, table, write_json  # noqa: E402

from matrixgame_env.model_config import ModelConfig  # noqa: E402
from matrixgame_env.nn.fusion import enable_fusion  # noqa: E402
from matrixgame_env.world.model import WorldModel, enable_fast_path, to_host  # noqa: E402

MODELS = Path(__file__).resolve().parents[1] / "models"
FRAMES_PER_BLOCK = 12


def actions(batch: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A varying action per block (keys cycle, the mouse turns) so that nothing is constant."""
    keys = torch.zeros(batch, 4)
    keys[:, block % 4] = 1
    mouse = torch.tensor([[0.02 * ((block % 3) - 1), 0.1]]).expand(batch, 2).contiguous()
    return keys, mouse


def set_path(world: WorldModel, path: str, batch: int) -> None:
    """Puts `world` (of `batch` worlds) on one of the paths of the module docstring."""
    enable_fusion(False)
    world.set_decode_beside(path == "fast_beside")
    if path in ("fast", "overlap", "fast_decoder_graphs", "fast_early", "fast_beside"):
        enable_fast_path(world, True, batch)
        if path == "fast_decoder_graphs":
            world.enable_decoder_graphs(True)
        return
    enable_fast_path(world, False)
    graphs = path != "eager"
    world.sampler.enable_cuda_graphs(graphs)
    torch.backends.cudnn.benchmark = graphs
    enable_fusion(path in ("fused", "fused_cl"))
    decoder_channels_last(world, path == "fused_cl")


def decoder_channels_last(world: WorldModel, enabled: bool) -> None:
    """The VAE decoder on channels-last activations and weights (cuDNN's native NDHWC kernels) or back."""
    world.vae.set_decoder_channels_last(enabled)


def stream(world: WorldModel, batch: int, path: str, warmup: int, blocks: int, repeats: int) -> dict:
    """Times `repeats` runs of `blocks` blocks after `warmup` blocks of one fresh stream."""
    set_path(world, path, batch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    picture = (torch.rand(batch, 352, 640, 3) * 255).to(torch.uint8)
    state = world.start(list(picture), seed=0)
    dit_runs, e2e_runs = [], []
    block = 0
    t_warm = time.perf_counter()
    for _ in range(warmup):
        world.decode(state, world.step_latents(state, *actions(batch, block)))
        block += 1
    warmup_s = time.perf_counter() - t_warm
    latency_runs = []
    for _ in range(repeats):
        dit_s, e2e_s = [], []
        if path == "overlap":
            e2e_s = overlapped_blocks(world, state, batch, block, blocks)
            block += blocks
        elif path in ("fast_early", "fast_beside"):
            latency_s = []
            for _ in range(blocks):  # each block alone: the action to its frames on the host
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                world.generate(state, *actions(batch, block))
                latency_s.append(time.perf_counter() - t0)
                block += 1
            latency_runs.append(statistics.median(latency_s))
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(blocks):  # back to back
                world.generate(state, *actions(batch, block))
                block += 1
            torch.cuda.synchronize()
            e2e_s = [(time.perf_counter() - t0) / blocks]
        else:
            for _ in range(blocks):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                latents = world.step_latents(state, *actions(batch, block))
                torch.cuda.synchronize()
                t1 = time.perf_counter()
                world.decode(state, latents)
                t2 = time.perf_counter()
                dit_s.append(t1 - t0)
                e2e_s.append(t2 - t0)
                block += 1
        if dit_s:
            dit_runs.append(statistics.median(dit_s))
        e2e_runs.append(statistics.median(e2e_s))
    row = {
        "batch": batch,
        "path": path,
        "e2e_block_s": statistics.median(e2e_runs),
        "fps_e2e": batch * FRAMES_PER_BLOCK / statistics.median(e2e_runs),
        "latency_s": statistics.median(latency_runs or e2e_runs),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "warmup_s": warmup_s,
    }
    if dit_runs:
        row["dit_block_s"] = statistics.median(dit_runs)
        row["fps_dit"] = batch * FRAMES_PER_BLOCK / statistics.median(dit_runs)
    graphs = world.sampler.graphs
    row["graph_replays"] = graphs.replays if graphs is not None else 0
    del state
    world.sampler.enable_cuda_graphs(False)
    enable_fusion(False)
    torch.cuda.empty_cache()
    return row


def overlapped_blocks(world: WorldModel, state, batch: int, block: int, blocks: int) -> list[float]:
    """Decode block n on a second stream while the DiT makes block n+1; time per delivered block."""
    decode_stream = torch.cuda.Stream()
    times = []
    pending = None
    torch.cuda.synchronize()
    last = time.perf_counter()
    for i in range(blocks + 1):
        latents = world.step_latents(state, *actions(batch, block + i)) if i < blocks else None
        done = torch.cuda.Event()
        done.record()
        if pending is not None:
            previous, previous_done = pending
            decode_stream.wait_event(previous_done)
            with torch.cuda.stream(decode_stream):
                previous.record_stream(decode_stream)
                frames = world.decode_on_device(state, previous)
                to_host(frames)
            now = time.perf_counter()
            times.append(now - last)
            last = now
        pending = (latents, done) if latents is not None else None
    return times


def agreement(world: WorldModel, batch: int, blocks: int, fast_path: str = "fast", reference: str = "eager") -> dict:
    """A fast path vs `reference` (eager) on the same seeds and actions: latents and frames of every block."""
    results = {}
    picture = (torch.rand(batch, 352, 640, 3, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    for path in (reference, fast_path):
        set_path(world, path, batch)
        state = world.start(list(picture), seed=3)
        latents, frames = [], []
        for b in range(blocks):
            if path in ("fast_early", "fast_beside"):
                x, block_frames = world.generate(state, *actions(batch, b))
            else:
                x = world.step_latents(state, *actions(batch, b))
                block_frames = world.decode(state, x)
            latents.append(x.float().cpu())
            frames.append(block_frames)
        results[path] = (torch.cat(latents, 2), torch.cat(frames, 1))
        world.sampler.enable_cuda_graphs(False)
    (le, fe), (lf, ff) = results[reference], results[fast_path]
    enable_fusion(False)
    return {
        "path": fast_path if reference == "eager" else f"{fast_path} vs {reference}",
        "batch": batch,
        "blocks": blocks,
        "latents_max_abs_diff": float((le - lf).abs().max()),
        "latents_rel_l2": float((le - lf).norm() / le.norm()),
        "latents_bitwise_equal": bool(torch.equal(le, lf)),
        "frames_max_abs_diff": int((fe.int() - ff.int()).abs().max()),
        "frames_mean_abs_diff": float((fe.float() - ff.float()).abs().mean()),
    }


def long_stream(world: WorldModel, blocks: int) -> dict:
    """Allocated memory over a long fast stream at batch 1 (flat = no growth after warm-up)."""
    set_path(world, "fast", 1)
    state = world.start([(torch.rand(352, 640, 3) * 255).to(torch.uint8)], seed=0)
    samples = {}
    t0 = time.perf_counter()
    for b in range(blocks):
        world.decode(state, world.step_latents(state, *actions(1, b)))
        if b in (4, 9, blocks // 2, blocks - 1):
            samples[b + 1] = torch.cuda.memory_allocated() / 2**20
    elapsed = time.perf_counter() - t0
    world.sampler.enable_cuda_graphs(False)
    return {
        "blocks": blocks,
        "allocated_mib_after_blocks": samples,
        "growth_mib_after_block_10": samples[blocks] - samples[10],
        "fps_e2e_over_stream": blocks * FRAMES_PER_BLOCK / elapsed,
    }


def profile(world: WorldModel, path: str, batch: int = 1, blocks: int = 2) -> dict:
    """Where a steady-state block's GPU time goes, the DiT and the decode profiled apart (`profile_tables`,
    per block). CUDA graphs are off while profiling so that every kernel is seen."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    set_path(world, path, batch)
    world.sampler.enable_cuda_graphs(False)
    picture = (torch.rand(batch, 352, 640, 3) * 255).to(torch.uint8)
    state = world.start(list(picture), seed=0)
    for b in range(4):
        world.decode(state, world.step_latents(state, *actions(batch, b)))
    torch.cuda.synchronize()
    latents = world.step_latents(state, *actions(batch, 4))
    parts = {}
    for part in ("dit", "decode"):
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for b in range(blocks):
                if part == "dit":
                    latents = world.step_latents(state, *actions(batch, 5 + b))
                else:
                    world.decode(state, latents)
            torch.cuda.synchronize()
        parts[part] = profile_tables(prof, blocks)
    enable_fusion(False)
    return {"path": path, "batch": batch, "graphs": False, **parts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--paths", nargs="+", default=["eager", "fast", "overlap", "fused"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--long-blocks", type=int, default=300, help="blocks of the memory-flatness stream (0: skip)")
    parser.add_argument("--agreement-blocks", type=int, default=6, help="blocks compared fast vs eager (0: skip)")
    parser.add_argument(
        "--profile",
        nargs="*",
        default=None,
        metavar="PATH",
        help="also profile steady-state blocks of these paths (none named: eager)",
    )
    parser.add_argument("--profile-batch", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_stream.py needs a CUDA GPU")
    device = "cuda"
    config = ModelConfig.load(MODELS / "universal")
    world = random_world(config, device)
    picture = (torch.rand(352, 640, 3) * 255).to(torch.uint8)
    state = world.start(picture, seed=0)
    world.decode(state, world.step_latents(state, *actions(1, 0)))
    cold_start = time.perf_counter() - T0
    del state
    print(f"cold start to first frame (CUDA init, build, random init, start, first block): {cold_start:.1f} s")

    rows = [stream(world, b, p, args.warmup, args.blocks, args.repeats) for b in args.batches for p in args.paths]
    columns = ["batch", "path", "fps_e2e", "fps_dit", "latency_s", "dit_block_s", "peak_gib", "warmup_s"]
    print(table(rows, columns))
    name = "stream_" + torch.cuda.get_device_name(0).split()[1].lower()
    result = {
        "environment": environment(),
        "conditions": "universal config, random weights, bf16, 352x640, 3 steps + context re-run, window 6",
        "cold_start_first_frame_s": cold_start,
        "rows": rows,
    }
    write_json(name, result, args.out)  # kept if a time limit stops the run in the checks below
    fast_paths = [p for p in ("graphs", "fast", "fast_decoder_graphs", "fused", "fused_cl") if p in args.paths]
    agree = []
    if args.agreement_blocks > 0:
        agree = [agreement(world, b, args.agreement_blocks, p) for p in fast_paths for b in (1, 4)]
        for early in ("fast_early", "fast_beside"):  # the same kernels in another order: against fast, bit for bit
            if early in args.paths:
                agree += [agreement(world, b, args.agreement_blocks, early, reference="fast") for b in (1, 4)]
    if agree:
        print(table(agree, list(agree[0])))
    result["fast_vs_eager"] = agree
    if args.profile is not None:
        result["profiles"] = []
        for path in args.profile or ["eager"]:
            found = profile(world, path, args.profile_batch)
            result["profiles"].append(found)
            for part in ("dit", "decode"):
                for view in ("kernels", "operators"):
                    print(f"profile: {path}, batch {args.profile_batch}, {part}, {view} (ms and calls per block)")
                    print(table(found[part][view], ["name", "ms", "share", "calls"]))
    if args.long_blocks:
        write_json(name, result, args.out)  # likewise before the long stream
        result["long_stream"] = long_stream(world, args.long_blocks)
        print(result["long_stream"])
    path = write_json(name, result, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
