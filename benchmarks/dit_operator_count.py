"""How many kernel-like operators one DiT block of the bundled model runs, with its elementwise chains
eager and as the Triton kernels of `nn.triton_dit` (counted, not timed, on the CPU).

Under CUDA graphs a block's time is largely its kernel count; this counts torch's operators that
launch work (views, allocations and other bookkeeping left out) in one block (the denoising steps and
the context re-run) under torch's profiler, and, with the kernels, their launches. Triton runs
through its interpreter here, so the kernels are counted but not run (the block's values are then
meaningless; only the counts are kept). Prints a table and writes JSON.

Usage: TRITON_INTERPRET=1 python benchmarks/dit_operator_count.py [--model doom-small] [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, table, write_json  # noqa: E402

from matrixgame_env.nn import triton_dit  # noqa: E402
from matrixgame_env.world.model import WorldModel  # noqa: E402

# Operators that launch no work of their own (views, allocations, dispatch wrappers around others).
BOOKKEEPING = {
    "view", "as_strided", "slice", "transpose", "unsqueeze", "select", "expand", "permute", "reshape",
    "unflatten", "flatten", "squeeze", "narrow", "t", "unbind", "split", "chunk", "alias", "detach",
    "_unsafe_view", "empty", "empty_like", "empty_strided", "lift_fresh", "resolve_conj", "resolve_neg",
    "contiguous", "to", "_to_copy", "linear", "matmul", "dropout", "result_type", "is_nonzero", "item",
    "_local_scalar_dense", "scaled_dot_product_attention", "layer_norm", "einsum", "stack",
    "repeat_interleave", "_reshape_alias", "resize_", "promote_types",
}  # fmt: skip


class CountedLaunches:
    """Stands in for `triton_dit`'s kernels: each launch is counted by kernel name, none runs."""

    def __init__(self) -> None:
        self.launches: collections.Counter = collections.Counter()

    def __getattr__(self, name: str):
        counts = self.launches

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs) -> None:
                    counts[name] += 1

                return launch

        return Launcher()


def steady_world(model: str, worlds: int = 1, dtype: torch.dtype | None = None):
    """(world on the CPU, its state of `worlds` worlds past the young blocks, keyboard, mouse): the next
    `step_latents(state, keyboard, mouse)` is a steady block, as CUDA graphs replay (W held)."""
    world = WorldModel.from_pretrained(model, device="cpu", dtype=dtype)
    state = world.start([str(world.start_image_paths()[0])] * worlds, seed=list(range(1, worlds + 1)))
    keyboard, mouse = torch.zeros(worlds, 4), torch.zeros(worlds, 2)
    keyboard[:, 0] = 1
    for _ in range(3):
        world.step_latents(state, keyboard, mouse)
    return world, state, keyboard, mouse


@contextlib.contextmanager
def launches_counted(counted: CountedLaunches):
    """Within the block, `triton_dit`'s chains on and their kernels launched into `counted` (not run)."""
    real_kernels = triton_dit._kernels
    try:
        triton_dit._kernels = lambda: counted
        triton_dit.set_enabled(True)
        yield counted
    finally:
        triton_dit._kernels = real_kernels
        triton_dit.set_enabled(False)


def count_block(world: WorldModel, state, keyboard: torch.Tensor, mouse: torch.Tensor) -> collections.Counter:
    """Kernel-like operators of one block from `state` (left as it was), by name."""
    saved = state.snapshot()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        world.step_latents(state, keyboard, mouse)
    state.restore(saved)
    counts: collections.Counter = collections.Counter()
    for event in prof.key_averages():
        name = event.key.removeprefix("aten::")
        if event.key.startswith("aten::") and name not in BOOKKEEPING:
            counts[name] += event.count
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="doom-small")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise SystemExit("run with TRITON_INTERPRET=1: the kernels are counted through Triton's interpreter on the CPU")
    torch.set_num_threads(2)
    world, state, keyboard, mouse = steady_world(args.model)
    counted = CountedLaunches()
    rows = []
    with launches_counted(counted):
        for kernels in (False, True):
            triton_dit.set_enabled(kernels)
            operators = count_block(world, state, keyboard, mouse)
            launches = sum(counted.launches.values()) if kernels else 0
            rows.append({
                "chains": "Triton kernels" if kernels else "eager",
                "operators": sum(operators.values()),
                "triton_launches": launches,
                "total": sum(operators.values()) + launches,
                "top_operators": dict(operators.most_common(12)),
                "launches_by_kernel": dict(counted.launches) if kernels else {},
            })  # fmt: skip
    rows[1]["ratio"] = rows[1]["total"] / rows[0]["total"]
    print(table(rows, ["chains", "operators", "triton_launches", "total", "ratio"]))
    result = {"environment": environment(), "model": args.model, "block": "steady, from step_latents", "rows": rows}
    print(f"wrote {write_json('dit_operators_cpu', result, args.out)}")


if __name__ == "__main__":
    main()
