"""CUDA-graph replay of the VAE decoder's steady-state blocks (and of restarted caches' first blocks).

Once every slot of a world's decoder cache holds frames, each block of latents runs the same
kernels on tensors of the same shapes; with the cache writing its slots in place
(`FeatureCache.write_in_place`) the addresses stay the same too. So each (cache, latent shape) is
decoded eagerly once (the real result, and the warm-up that compiles and autotunes), then captured,
and later blocks replay the graph: the latents are copied into a static buffer, the graph runs, and
the uint8 frames are copied out. The kernels are the eager path's own. A cache restarted in place
(`FeatureCache.restart`: its slots zeroed, counted as empty) decodes its first block on the same
tensors every time, so that block is captured too, on its own.
"""

from __future__ import annotations

import weakref

import torch

from ..images import to_uint8_frames
from ..nn.vae import WanVAE
from ..nn.vae_cache import DecoderCache
from .graphs import StreamPools, sighting_count


def decode_to_uint8(
    vae: WanVAE, latents: torch.Tensor, cache: DecoderCache, last_frames: int | None = None
) -> torch.Tensor:
    """Normalised latents [B, z, n, h, w] (the VAE's dtype) -> frames [B, T, H, W, 3] uint8, on the
    device; `last_frames`: only the last ones (`WanVAE.decode_stream`)."""
    return to_uint8_frames(vae.decode_stream(latents, cache, check_finite=False, last_frames=last_frames))


class _CapturedDecode:
    def __init__(self, graph: torch.cuda.CUDAGraph, latents: torch.Tensor, frames: torch.Tensor, cache, binding):
        self.graph, self.latents, self.frames, self.binding = graph, latents, frames, binding
        self.cache = weakref.ref(cache)


class DecoderGraphs:
    """Captured steady-state decodes of one VAE, at most `max_graphs` at a time.

    A graph is dropped when its cache is gone (a world reset, a forked state discarded). While all
    `max_graphs` are held by live caches, further caches decode eagerly rather than evict one: with
    more live caches than graphs (a vector env split into many cohorts, many planning branches),
    evicting would re-capture on every block, which costs more than the eager decode it saves.
    With `capture_after` n, a cache decodes n steady blocks eagerly before it is captured (see
    `BlockGraphs`).
    """

    def __init__(self, vae: WanVAE, max_graphs: int = 4) -> None:
        if vae.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the VAE on a CUDA device, it is on {vae.device}")
        self.vae = vae
        self.max_graphs = max_graphs
        self.pools = StreamPools(vae.device)
        self.stream = torch.cuda.Stream(device=vae.device)  # where captures are recorded
        self.graphs: dict[tuple, _CapturedDecode] = {}
        self.captures = 0
        self.replays = 0
        self.eager_decodes = 0  # steady-state decodes left eager because every graph was in use
        self.capture_after = 0
        self._sightings: dict[tuple, tuple[weakref.ref, int]] = {}

    @staticmethod
    def eligible(cache: DecoderCache) -> bool:
        """True once every slot holds a tensor: from then on a block of latents always runs the same
        kernels (a restarted cache's first block its own ones)."""
        return all(slot is not None for slot in cache.slots)

    def _binding(self, cache: DecoderCache) -> tuple:
        """The addresses a captured graph reads and writes (the cache's slots, the decoder's weights,
        which `WanVAE.set_decoder_channels_last` or a dtype change replace) and the stream it replays
        on: it may only replay on them. The weights' versions count too: kernels that read a repacked
        copy of a weight (the Triton convolution) must not replay after an in-place update of it."""
        vae = self.vae
        weights = [*vae.conv2.parameters(), *vae.decoder.parameters(), vae.latent_mean, vae.latent_std]
        addresses = tuple(t.data_ptr() for t in cache.slots) + tuple((t.data_ptr(), t._version) for t in weights)
        return (self.pools.current_stream(), *addresses)

    def decode(self, latents: torch.Tensor, cache: DecoderCache, last_frames: int | None = None) -> torch.Tensor:
        """Frames [B, T, H, W, 3] uint8 of a block (its last `last_frames`: `WanVAE.decode_stream`), from a
        replay once the cache is `eligible` (eagerly before); `cache` moves on exactly as
        `WanVAE.decode_stream` would move it. Each `last_frames` has graphs of its own."""
        if not self.eligible(cache):
            return decode_to_uint8(self.vae, latents, cache, last_frames)
        first = any(cache.emptied)  # a restarted cache's first block: its own graph
        key = (id(cache), tuple(latents.shape), latents.dtype, first, last_frames)
        self._drop_dead()
        captured = self.graphs.get(key)
        if captured is not None and (captured.cache() is not cache or captured.binding != self._binding(cache)):
            del self.graphs[key]  # a new cache at a recycled id, or one whose slots were replaced
            captured = None
        if captured is None:
            if len(self.graphs) >= self.max_graphs:
                self.eager_decodes += 1
                return decode_to_uint8(self.vae, latents, cache, last_frames)
            if sighting_count(self._sightings, key, cache) <= self.capture_after:
                return decode_to_uint8(self.vae, latents, cache, last_frames)
            return self._capture(latents, cache, key, last_frames)
        captured.latents.copy_(latents)
        captured.graph.replay()
        self.replays += 1
        cache.emptied = [False] * len(cache.slots)  # the Python-side bookkeeping the replay skipped
        return captured.frames.clone()

    def _capture(self, latents: torch.Tensor, cache: DecoderCache, key: tuple, last_frames: int | None) -> torch.Tensor:
        """Decode eagerly on the capture stream (the real result, and the warm-up), then capture the
        same decode; the capture computes nothing, so the cache is left as the eager run wrote it.
        The capture starts from the cache's bookkeeping as the eager run found it (empty slots of a
        restarted cache), so that it records the same path."""
        cache.write_in_place = True  # from here on the slots keep their addresses
        static = latents.clone()
        emptied = list(cache.emptied)
        current = torch.cuda.current_stream(self.vae.device)
        pool = self.pools.current()
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            result = decode_to_uint8(self.vae, static, cache, last_frames)
        current.wait_stream(self.stream)
        cache.emptied = emptied
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=self.stream):
            frames = decode_to_uint8(self.vae, static, cache, last_frames)
        self.graphs[key] = _CapturedDecode(graph, static, frames, cache, self._binding(cache))
        self.captures += 1
        return result

    def _drop_dead(self) -> None:
        """Forget the graphs of caches that no longer exist (their memory goes back to the pool)."""
        for key in [key for key, captured in self.graphs.items() if captured.cache() is None]:
            del self.graphs[key]
        for key in [key for key, (ref, _) in self._sightings.items() if ref() is None]:
            del self._sightings[key]

    def clear(self) -> None:
        self.graphs.clear()
        self._sightings.clear()
