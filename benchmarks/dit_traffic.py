"""Where a steady DiT block of the bundled model writes its memory traffic, by source line (counted,
not timed, on the CPU).

At 64 worlds a doom-small step is bound by memory traffic and kernel count more than by arithmetic, so
this attributes every operator of one steady block (the denoising steps and the context re-run) that
writes a tensor to the innermost line of `matrixgame_env` that called it, and adds up the bytes each
line writes. The DiT's Triton chains are on (as `fast=True` runs them on GPUs) and launched through
Triton's interpreter without running (their outputs are not counted: they are the fused part). An
operator whose inputs include a strided (non-contiguous) tensor is marked `*`. The GPU's bytes scale
with the worlds; the shares do not. Prints a table and writes JSON.

Usage: TRITON_INTERPRET=1 python benchmarks/dit_traffic.py [--worlds 4] [--rows 40] [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, table, write_json  # noqa: E402
from dit_operator_count import CountedLaunches, launches_counted, steady_world  # noqa: E402

# Operators that only make views or allocate: everything else writes memory.
VIEWS = {
    "view", "as_strided", "slice", "transpose", "unsqueeze", "select", "expand", "permute", "_unsafe_view",
    "empty", "empty_like", "empty_strided", "detach", "alias", "t", "unbind", "split", "split_with_sizes",
    "chunk", "squeeze", "unflatten", "flatten", "narrow", "lift_fresh", "_reshape_alias", "set_", "resize_",
}  # fmt: skip


class TrafficByLine(TorchDispatchMode):
    """Bytes written and calls, keyed by (operator, calling line of matrixgame_env, output dtype)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in VIEWS:
            return out
        line = "?"
        for frame in reversed(traceback.extract_stack()):
            if "matrixgame_env" in frame.filename:
                line = f"{frame.filename.split('matrixgame_env/')[-1]}:{frame.lineno} {(frame.line or '').strip()[:60]}"
                break
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        written = first.numel() * first.element_size() if isinstance(first, torch.Tensor) else 0
        strided = any(isinstance(a, torch.Tensor) and a.dim() > 1 and not a.is_contiguous() for a in args)
        key = (name + ("*" if strided else ""), line, str(getattr(first, "dtype", "")).removeprefix("torch."))
        self.bytes[key] += written
        self.calls[key] += 1
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="doom-small")
    parser.add_argument("--worlds", type=int, default=4)
    parser.add_argument("--rows", type=int, default=40, help="lines shown in the table (all are in the JSON)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise SystemExit("run with TRITON_INTERPRET=1: the DiT's Triton chains go through Triton's interpreter here")
    if args.worlds < 1:
        raise SystemExit(f"--worlds must be at least 1, got {args.worlds}")
    torch.set_num_threads(2)
    world, state, keyboard, mouse = steady_world(args.model, args.worlds, torch.bfloat16)
    traffic = TrafficByLine()
    with launches_counted(CountedLaunches()) as counted, traffic:
        world.step_latents(state, keyboard, mouse)
    total = sum(traffic.bytes.values())
    rows = [
        {"operator": op, "line": line, "dtype": dtype, "calls": traffic.calls[op, line, dtype], "mb": written / 1e6,
         "share": written / total if total else 0.0}
        for (op, line, dtype), written in traffic.bytes.most_common()
    ]  # fmt: skip
    print(f"{args.model}, {args.worlds} worlds, one steady block: {sum(traffic.calls.values())} operators writing "
          f"{total / 1e6:.1f} MB, {sum(counted.launches.values())} Triton launches")  # fmt: skip
    print(table(rows[: args.rows], ["mb", "share", "calls", "operator", "dtype", "line"]))
    result = {
        "environment": environment(),
        "model": args.model,
        "worlds": args.worlds,
        "block": "steady, from step_latents, bfloat16, the DiT's Triton chains launched (not run)",
        "total_mb": total / 1e6,
        "triton_launches": dict(counted.launches),
        "rows": rows,
    }
    print(f"wrote {write_json('dit_traffic_cpu', result, args.out)}")


if __name__ == "__main__":
    main()
