"""A DiT's streaming passes through `torch.compile` on the CPU, falling back to the eager module
where compiling fails (no C++ compiler for inductor, an unsupported torch build)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch._inductor.config as inductor_config
from torch._dynamo.exc import TorchDynamoException

from ..nn.dit import CausalDiT
from ..nn.fusion import raise_recompile_limit
from .cache import RingKVCache
from .graphs import layer_ring_caches

# Inductor's options for the passes: the weights frozen into the compiled graph as constants, so
# that its matrix products can be autotuned between oneDNN/MKL and inductor's own C++ GEMM
# kernels (prepacked weights, the elementwise work after each product fused into it). Set around
# each call, not as `torch.compile` options: Dynamo reads `freezing` while it traces.
COMPILE_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}


class CompiledDiT:
    """Calls like the `CausalDiT` it wraps.

    A pass whose ring caches are full once it has written (every block after the first
    `window / block` of a stream) runs as one compiled graph: its cache writes are planned before
    the call (`RingKVCache.plan_write`: checks, bookkeeping, ring slots as a tensor), so the
    traced pass is the same at every position in the ring. The first batch size compiles a graph
    of its own, the second one with the batch size dynamic that every later size runs (a CPU
    vector env's cohorts come in many sizes). The passes of the first blocks, which fill the
    caches, run eagerly: compiling each fill state would cost a whole-graph compile for one or
    two blocks per episode.

    The compiled graph holds the weights as they were when it compiled; a change to them (loading
    other weights in place, an optimiser step) is noticed at the next call, which warns and
    compiles again."""

    def __init__(self, model: CausalDiT) -> None:
        raise_recompile_limit()
        self.model = model
        self.failed = False
        self._compile()

    def _compile(self) -> None:
        self._compiled = torch.compile(self.model, dynamic=None)
        # Listed once: walking the modules each call cost ~0.3 ms. A weight replaced by another
        # tensor object is Dynamo's to notice (its guards hold the weights' identities).
        tensors = (*self.model.parameters(), *self.model.buffers())
        self._tracked = [(t, not t.is_inference()) for t in tensors]
        self._weights = self._weights_fingerprint()

    def _weights_fingerprint(self) -> tuple[tuple[int, int], ...]:
        """Where each weight's data lives and how often it was changed in place (inference tensors,
        made under `torch.inference_mode`, keep no count: their place alone)."""
        return tuple((t.data_ptr(), t._version if counted else 0) for t, counted in self._tracked)

    def __call__(
        self, latents: torch.Tensor, cond: torch.Tensor, timestep: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        if self.failed or torch.is_grad_enabled():
            return self.model(latents, cond, timestep, **kwargs)
        frames = latents.shape[2] // self.model.config.patch_size[0]
        caches = self._plannable_caches(frames, kwargs)
        if caches is None:
            return self.model(latents, cond, timestep, **kwargs)
        if self._weights_fingerprint() != self._weights:
            warnings.warn("the DiT's weights changed since it was compiled; compiling it again", stacklevel=2)
            torch._dynamo.reset()  # the frozen graphs pass Dynamo's guards (same tensors): drop them
            self._compile()
        for cache in caches:
            cache.plan_write(kwargs["start_frame"], frames)
        try:
            try:
                with inductor_config.patch(COMPILE_OPTIONS):
                    return self._compiled(latents, cond, timestep, **kwargs)
            except TorchDynamoException as error:
                self.failed = True
                first_line = (str(error).strip().splitlines() or [""])[0][:300]
                warnings.warn(
                    f"compiling the DiT failed ({type(error).__name__}: {first_line}); it runs eagerly",
                    stacklevel=2,
                )
                # The planned writes stand: the eager pass writes the same slots.
                return self.model(latents, cond, timestep, **kwargs)
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
