"""A DiT's streaming passes through `torch.compile` on the CPU (`FrozenCompiled`): once the ring
caches are full, a whole pass is one compiled graph."""

from __future__ import annotations

from typing import Any

import torch

from ..nn.dit import CausalDiT
from .cache import RingKVCache
from .frozen_compile import FrozenCompiled
from .graphs import layer_ring_caches


class CompiledDiT(FrozenCompiled):
    """Calls like the `CausalDiT` it wraps.

    A pass whose ring caches are full once it has written (every block after the first
    `window / block` of a stream) runs as one compiled graph: its cache writes are planned before
    the call (`RingKVCache.plan_write`: checks, bookkeeping, ring slots as a tensor), so the
    traced pass is the same at every position in the ring. The first batch size compiles a graph
    of its own, the second one with the batch size dynamic that every later size runs (a CPU
    vector env's cohorts come in many sizes). The passes of the first blocks, which fill the
    caches, run eagerly: compiling each fill state would cost a whole-graph compile for one or
    two blocks per episode. Changed weights compile again (`FrozenCompiled`)."""

    def __init__(self, model: CausalDiT) -> None:
        super().__init__(model, "DiT")

    @property
    def model(self) -> CausalDiT:
        """The wrapped DiT (`module`)."""
        return self.module

    def __call__(
        self, latents: torch.Tensor, cond: torch.Tensor, timestep: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        if self.failed or torch.is_grad_enabled():
            return self.model(latents, cond, timestep, **kwargs)
        frames = latents.shape[2] // self.model.config.patch_size[0]
        caches = self._plannable_caches(frames, kwargs)
        if caches is None:
            return self.model(latents, cond, timestep, **kwargs)
        for cache in caches:
            cache.plan_write(kwargs["start_frame"], frames)
        try:
            # Where compiling fails the planned writes stand: the eager pass writes the same slots.
            return self.run(latents, cond, timestep, **kwargs)
        finally:
            for cache in caches:
                cache.clear_plan()

    @staticmethod
    def _plannable_caches(frames: int, kwargs: dict[str, Any]) -> list[RingKVCache] | None:
        """The pass's ring caches if it streams into caches that are full once it has written."""
        if kwargs.get("caches") is None or kwargs.get("rotations") is None:
            return None
        caches = layer_ring_caches(kwargs["caches"])
        start = kwargs.get("start_frame", 0)
        if all(isinstance(c, RingKVCache) and c.full_after(start, frames) for c in caches):
            return caches
        return None
