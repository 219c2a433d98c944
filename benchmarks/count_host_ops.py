"""Tensor operators the host issues per env step outside the sampler's CUDA graphs (doom-small).

On a GPU every operator is at least one kernel launch from Python, and launches the GPU cannot
overlap leave it idle. This counts the operators (aten dispatches) of one steady-state step:

  sampler prep   what `StreamingSampler.step` does around the block it replays from a CUDA graph
                 (action windows, per-world noise, conditions, rotary tables)
  decoder        one eager `WorldModel.decode` of the block (replayed from graphs only with
                 `WorldModel.enable_decoder_graphs`)

Counted on the CPU, where the decoder runs its CPU forms (stacked taps, transposed upsamplers);
`--decoder-forms gpu` counts the forms GPUs run (torch's conv3d, nearest upsampling), unfused.

Usage: python benchmarks/count_host_ops.py [--worlds 1 4 16] [--decoder-forms cpu|gpu] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, table, write_json  # noqa: E402

from matrixgame_env.nn.vae import set_conv3d_mode, set_upsample_mode  # noqa: E402
from matrixgame_env.world.model import WorldModel  # noqa: E402


class OperatorCount(TorchDispatchMode):
    """Counts aten operators while `counting` is true."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.counting = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.counting:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_step(world: WorldModel, worlds: int, warmup: int = 3) -> dict:
    """Operators of one steady-state step of `worlds` worlds: sampler prep and decoder."""
    state = world.start([str(world.start_image_paths()[0])] * worlds, seed=list(range(worlds)))
    keyboard, mouse = torch.zeros(worlds, 4), torch.zeros(worlds, 2)
    for _ in range(warmup):  # past the first blocks, which take other paths
        world.step(state, keyboard, mouse)
    counter = OperatorCount()
    replayed = world.sampler.denoise_block  # what CUDA graphs replay: not counted

    def uncounted(*args, **kwargs):
        counter.counting = False
        try:
            return replayed(*args, **kwargs)
        finally:
            counter.counting = True

    world.sampler.denoise_block = uncounted
    try:
        with counter:
            latents = world.step_latents(state, keyboard, mouse)
    finally:
        del world.sampler.denoise_block  # back to the class's method
    prep = counter.count
    counter = OperatorCount()
    with counter:
        world.decode(state, latents)
    return {"worlds": worlds, "sampler_prep_ops": prep, "decoder_ops": counter.count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="doom-small")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--decoder-forms", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.decoder_forms == "gpu":
        set_conv3d_mode("native")
        set_upsample_mode("nearest")
    world = WorldModel.from_pretrained(args.model, device="cpu")
    rows = [count_step(world, worlds) for worlds in args.worlds]
    for row in rows:
        row["decoder_forms"] = args.decoder_forms
    print(table(rows, ["worlds", "sampler_prep_ops", "decoder_ops", "decoder_forms"]))
    path = write_json(f"host_ops_{args.decoder_forms}", {"environment": environment(), "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
