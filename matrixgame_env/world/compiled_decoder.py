"""The VAE decoder's streaming chunks through `torch.compile` on the CPU (`FrozenCompiled`)."""

from __future__ import annotations

import torch

from ..nn.vae import Decoder, WanVAE
from ..nn.vae_cache import FeatureCache
from .frozen_compile import FrozenCompiled


class CompiledDecoder(FrozenCompiled):
    """Calls like the VAE's `Decoder` (one latent frame and its cache).

    A chunk whose cache holds every layer's past frames (every latent of a stream after its first)
    runs as one compiled graph: the convolutions as oneDNN's with their weights prepacked, the norms,
    SiLUs and joins with the cached frames fused around them. A stream's first latent, which takes
    the first-latent path and fills the cache, runs eagerly. Changed weights compile again
    (`FrozenCompiled`)."""

    def __init__(self, decoder: Decoder) -> None:
        super().__init__(decoder, "decoder")

    def __call__(self, x: torch.Tensor, cache: FeatureCache, last_frames: int | None = None) -> torch.Tensor:
        if self.failed or torch.is_grad_enabled() or x.device.type != "cpu" or cache.filling():
            return self.module(x, cache, last_frames)
        return self.run(x, cache, last_frames)


def compile_decoder(vae: WanVAE, enabled: bool = True) -> None:
    """CPU only: decode streams through a `CompiledDecoder` (`WanVAE.set_decoder_runner`): the first
    steady chunk compiles (10-30 s on 2 cores) and the frames equal the eager decoder's to float
    rounding. Where compiling fails it warns and decodes eagerly. `enabled=False` decodes eagerly."""
    if not enabled:
        vae.set_decoder_runner(None)
        return
    if vae.device.type != "cpu":
        raise ValueError(
            f"compile_decoder is for CPU models, this one is on {vae.device}; on GPUs fast='compile' "
            "fuses the decoder's elementwise chains and replays CUDA graphs"
        )
    if not isinstance(vae.decoder_runner, CompiledDecoder):
        vae.set_decoder_runner(CompiledDecoder(vae.decoder))


def decoder_compiled(vae: WanVAE) -> bool:
    """Whether `vae` decodes streams through a working `CompiledDecoder`."""
    return isinstance(vae.decoder_runner, CompiledDecoder) and not vae.decoder_runner.failed
