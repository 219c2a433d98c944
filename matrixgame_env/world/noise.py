"""A block's random draws, and the next block's drawn ahead while the GPU still runs this one.

Every world has its own generator, so a block draws one tensor per world and per draw (noise, then
one per re-noising): at 64 worlds and 3 steps that is 192 `torch.randn` calls, a few milliseconds of
host time in which the GPU would wait. On CUDA the sampler draws the next block's noise right after
queueing a block, while the GPU is busy with it, from the same generators in the same order: the
values are exactly those the next block would have drawn. Anything else that reads or moves the
generators first hands the draws back (`settle`): each generator returns to the offset it had before
them, as if they never happened.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class DrawnNoise:
    """Draws made ahead for a state's next block, with what they were drawn from."""

    generators: tuple[torch.Generator, ...]
    positions: tuple  # each generator's place in its stream before the draws (`_position`)
    shape: tuple[int, ...]
    stream: torch.cuda.Stream | None  # where the draws were queued (None on the CPU)
    tensors: list[torch.Tensor]  # [B, *shape[1:]] each: the noise, then one per re-noising

    def matches(self, generators: Sequence[torch.Generator], shape: tuple[int, ...], stream) -> bool:
        """True when these draws are the ones `generators` would make next for a block of `shape`."""
        return (
            self.shape == shape
            and self.stream == stream
            and len(self.generators) == len(generators)
            and all(a is b for a, b in zip(self.generators, generators))
        )

    def settle(self) -> None:
        """Give the draws back: every generator returns to its offset before them."""
        for generator, position in zip(self.generators, self.positions):
            if isinstance(position, int):
                generator.set_offset(position)
            else:
                generator.set_state(position)


def draw(generators: Sequence[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """One tensor [B, *shape[1:]], world b's part from generator b."""
    return torch.stack([torch.randn(shape[1:], generator=g, device=device) for g in generators])


def draw_ahead(generators: Sequence[torch.Generator], shape: tuple[int, ...], count: int, device) -> DrawnNoise:
    """`count` draws of `shape` from every generator, in the order a block makes them."""
    positions = tuple(_position(g) for g in generators)
    tensors = [draw(generators, shape, device) for _ in range(count)]
    return DrawnNoise(tuple(generators), positions, shape, current_stream(device), tensors)


def current_stream(device: torch.device) -> torch.cuda.Stream | None:
    """The stream draws on `device` are queued on (None on the CPU)."""
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


def _position(generator: torch.Generator) -> int | torch.Tensor:
    """Where a generator stands: its Philox offset on CUDA (an int, no copy), its full state elsewhere."""
    return generator.get_offset() if generator.device.type == "cuda" else generator.get_state()
