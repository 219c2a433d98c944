"""Ways to run the small decoder's full-resolution causal convolution on a GPU, side by side.

doom-small's decoder spends most of its GPU time in one convolution shape: 16 -> 16 channels, 3x3x3,
at 96x176, for every world at once. cuDNN runs it as an implicit GEMM whose tiles are built for more
channels. This script times the candidate forms of that one convolution (same inputs, same weights)
and checks that each agrees with the current form:

    python benchmarks/bench_small_conv.py [--worlds 64] [--frames 4] [--channels 16]

It prints a table and writes benchmarks/results/small_conv_<gpu>.json (e.g. small_conv_h200.json).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, table, write_json  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from matrixgame_env.nn import triton_conv  # noqa: E402


def time_ms(fn: Callable[[], torch.Tensor], repeats: int = 30, warmup: int = 5) -> float:
    """Median GPU time of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def candidates(joined: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """Each form computes conv3d(joined) with spatial padding 1: [B, C_out, T, H, W]."""
    k = weight.shape[2]
    batch, channels, frames = joined.shape[:3]
    out_frames = frames - k + 1
    last = joined.contiguous(memory_format=torch.channels_last_3d)
    first = joined.contiguous()
    weight_last = weight.contiguous(memory_format=torch.channels_last_3d)
    # stacked taps: frame t of the output reads frames t..t+k-1; their channels side by side
    weight_2d = weight.permute(0, 2, 1, 3, 4).reshape(weight.shape[0], k * channels, *weight.shape[3:])
    weight_2d = weight_2d.contiguous(memory_format=torch.channels_last)

    def stacked_input() -> torch.Tensor:
        x = last.permute(0, 2, 1, 3, 4)  # [B, T, C, H, W] (a view over the channels-last storage)
        taps = torch.cat([x[:, i : i + out_frames] for i in range(k)], dim=2)  # [B, T', k*C, H, W]
        return taps.reshape(batch * out_frames, k * channels, *x.shape[3:]).contiguous(
            memory_format=torch.channels_last
        )

    stacked = stacked_input()
    packed = triton_conv.pack_weight(weight)
    half = last.half()
    weight_half = weight_last.half()
    bias_half = bias.half()
    return {
        "conv3d, channels-last (current)": lambda: F.conv3d(last, weight_last, bias, padding=(0, 1, 1)),
        "conv3d, channels-first": lambda: F.conv3d(first, weight, bias, padding=(0, 1, 1)),
        "conv3d, channels-last, float16": lambda: F.conv3d(half, weight_half, bias_half, padding=(0, 1, 1)),
        "conv2d over stacked taps (stacking included)": lambda: F.conv2d(stacked_input(), weight_2d, bias, padding=1),
        "conv2d over stacked taps (already stacked)": lambda: F.conv2d(stacked, weight_2d, bias, padding=1),
        "conv3d without bias, channels-last": lambda: F.conv3d(last, weight_last, None, padding=(0, 1, 1)),
        "triton kernel, channels-last (nn.triton_conv, autotuned)": lambda: triton_conv.causal_conv3x3x3(
            last, packed, bias
        ),
    }


def as_video(out: torch.Tensor, batch: int) -> torch.Tensor:
    """Outputs of the 2D forms [B*T, C, H, W] back to [B, C, T, H, W]."""
    if out.dim() == 5:
        return out.float()
    return out.float().reshape(batch, -1, *out.shape[1:]).permute(0, 2, 1, 3, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, default=64)
    parser.add_argument("--frames", type=int, default=4, help="frames of the chunk (2 past frames are joined to it)")
    parser.add_argument("--channels", type=int, default=16, help="input channels")
    parser.add_argument("--out-channels", type=int, default=None, help="output channels (default: --channels)")
    parser.add_argument("--size", type=int, nargs=2, default=(96, 176), metavar=("H", "W"))
    parser.add_argument("--out", type=Path, default=None, help="folder of the JSON (default: benchmarks/results)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark times GPU kernels: no CUDA device here")
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    c = args.channels
    joined = torch.randn(args.worlds, c, args.frames + 2, *args.size, device=device, generator=g).bfloat16()
    c_out = args.out_channels or c
    weight = (torch.randn(c_out, c, 3, 3, 3, device=device, generator=g) / (27 * c) ** 0.5).bfloat16()
    bias = torch.randn(c_out, device=device, generator=g).bfloat16() * 0.1
    forms = candidates(joined, weight, bias)
    reference = as_video(next(iter(forms.values()))(), args.worlds)
    flop = 2 * reference.numel() * c * 27
    rows = []
    if not triton_conv.available():
        forms = {name: fn for name, fn in forms.items() if not name.startswith("triton")}
    for name, fn in forms.items():
        out = as_video(fn(), args.worlds)
        if "without bias" in name:
            out = out + bias.float()[:, None, None, None]
        error = ((out - reference).norm() / reference.norm()).item()
        ms = time_ms(fn)
        rows.append({"form": name, "ms": ms, "tflops": flop / ms / 1e9, "relative_l2_vs_current": error})
    for row in rows:
        row["speedup"] = rows[0]["ms"] / row["ms"]
    if triton_conv.available():
        best = triton_conv.tuned_config()
        rows[-1]["triton_config"] = best
        print(f"triton kernel's autotuned config: {best}")
    print(table(rows, ["form", "ms", "tflops", "speedup", "relative_l2_vs_current"]))
    shape = {
        "worlds": args.worlds,
        "frames": args.frames,
        "channels": c,
        "out_channels": c_out,
        "size": list(args.size),
    }
    name = (
        "small_conv_"
        + torch.cuda.get_device_name(0).split()[1].lower()
        + (f"_{c}to{c_out}" if c_out != c or c != 16 else "")
    )
    print(f"wrote {write_json(name, {'environment': environment(), 'shape': shape, 'rows': rows}, args.out)}")


if __name__ == "__main__":
    main()
