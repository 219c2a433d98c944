"""`WorldModel`: picture in, frames out. DiT + streaming sampler + VAE + CLIP behind one API."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..checkpoints import LoadedModel, load_model
from ..images import ImageLike, fit_images
from ..model_config import ModelConfig
from ..nn import triton_conv
from ..nn.causal_conv import conv3d_form
from ..nn.clip import CLIPVisionEncoder
from ..nn.dit import CausalDiT
from ..nn.fusion import enable_fusion
from ..nn.vae import WanVAE
from ..nn.vae_cache import DecoderCache
from .compiled_decoder import compile_decoder
from .condition import ImageLatents
from .decoder_graphs import DecoderGraphs, decode_to_uint8
from .sampler import SamplerConfig, StreamingSampler
from .start_cache import StartEncodingCache
from .state import WorldState


class WorldModel:
    """An interactive video world model.

    `start(images, seed)` encodes the start pictures (VAE latents of the image followed by zero
    frames, CLIP tokens) into a `WorldState`; every `step(state, keyboard, mouse)` generates one
    block of frames (9 video frames for the first block, 12 after) for every world of the batch.
    """

    def __init__(
        self,
        dit: CausalDiT,
        vae: WanVAE,
        clip: CLIPVisionEncoder,
        config: ModelConfig,
        folder: str | os.PathLike | None = None,
    ) -> None:
        if vae.decoder.shown_actions:
            raise ValueError(
                "this VAE's decoder is shown each frame's actions (vae config decoder_frame_actions), which a world "
                "model does not stream; decode its latents with WanVAE.decode_unnormalised(z, frame_actions)"
            )
        self.dit, self.vae, self.clip, self.config = dit, vae, clip, config
        self.folder = Path(folder) if folder is not None else None
        self.sampler = StreamingSampler(dit, SamplerConfig.from_dict(config.sampler), latent_size=config.latent_size)
        self.decoder_graphs: DecoderGraphs | None = None
        # `generate` on a GPU: decode on a stream of its own, beside the caches' refresh (set_decode_beside).
        self.decode_stream: torch.cuda.Stream | None = None
        # Resets to pictures seen before skip the encoders (`start_encodings.capacity = 0`: always encode).
        self.start_encodings = StartEncodingCache()

    @classmethod
    def from_pretrained(
        cls,
        path_or_name: str | os.PathLike,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        mode: str | None = None,
    ) -> WorldModel:
        """Load a preset name, one of our model folders, an official folder, or a hub id."""
        loaded: LoadedModel = load_model(path_or_name, mode=mode, device=device, dtype=dtype)
        return cls(loaded.dit, loaded.vae, loaded.clip, loaded.config, loaded.folder)

    def start_image_paths(self) -> list[Path]:
        """The start pictures shipped with the model (config `start_images`, relative to its folder)."""
        if self.folder is None:
            return []
        return [self.folder / name for name in self.config.start_images]

    @property
    def device(self) -> torch.device:
        return self.dit.device

    @property
    def video_size(self) -> tuple[int, int]:
        return self.config.video_size

    @property
    def frames_per_block(self) -> int:
        """Video frames per block after the first (12 for the released models)."""
        return 4 * self.sampler.config.frames_per_block

    @torch.no_grad()
    def encode_start(self, images: ImageLike | Sequence[ImageLike]) -> tuple[ImageLatents, torch.Tensor]:
        """Start pictures -> (image-condition latents, CLIP tokens)."""
        pixels = fit_images(images, self.config.video_size)
        weights = [*self.vae.parameters(), *self.clip.parameters()]
        latents, context = self.start_encodings.encode(pixels, self._encode_pictures, weights)
        return ImageLatents(latents), context

    def _encode_pictures(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fitted pictures [B, 3, H, W] -> (condition latents [B, C, K, h, w] float32, CLIP tokens)."""
        pixels = pixels.to(self.device)
        condition = self.vae.encode_image_condition(pixels.to(self.vae.dtype), num_latent_frames=4096)
        context = self.clip(pixels.to(self.clip.patch_embedding.weight.dtype))
        latents = condition.distinct_latents.float()
        # Checked once here, so that starts from remembered encodings need not read them back again.
        for name, encoded in (("VAE encoder's image latents", latents), ("CLIP encoder's tokens", context)):
            if not torch.isfinite(encoded).all():
                raise ValueError(f"the {name} contain NaN or infinite values: are the model's weights finite?")
        return latents, context

    @torch.no_grad()
    def start(
        self,
        images: ImageLike | Sequence[ImageLike],
        seed: int | Sequence[int] | None = None,
        into: WorldState | None = None,
        decoded: bool = True,
    ) -> WorldState:
        """A fresh state for one world per picture (path, PIL image or HxWx3 uint8; any size:
        centre-cropped to the model's aspect and resized). `into`: a state of as many worlds that
        is no longer needed, restarted in place instead (`StreamingSampler.restart`, and
        `FeatureCache.restart` for its decoder cache: the same worlds as a fresh start, on the old
        state's tensors and CUDA graphs). decoded=False: a state whose blocks will not be decoded
        (latents only), without a decoder cache."""
        image_latents, context = self.encode_start(images)
        if not decoded:
            if into is None:
                return self.sampler.start(image_latents, context, seed=seed, finite_checked=True)
            return self.sampler.restart(into, image_latents, context, seed=seed, finite_checked=True)
        if into is None:
            state = self.sampler.start(image_latents, context, seed=seed, finite_checked=True)
            state.decoder_cache = self.vae.new_decoder_cache(state.batch_size)
            return state
        kept = into.decoder_cache  # checked before the restart below changes anything
        reusable = (
            isinstance(kept, DecoderCache)
            and len(kept.slots) == self.vae.decoder.num_cache_slots
            and all(t is None or (t.device == self.vae.device and t.dtype == self.vae.dtype) for t in kept.slots)
        )
        state = self.sampler.restart(into, image_latents, context, seed=seed, finite_checked=True)
        if reusable and kept.batch_size == state.batch_size:
            kept.restart()  # the same tensors, and the decoder's CUDA graphs of its first block
            state.decoder_cache = kept
        else:
            state.decoder_cache = self.vae.new_decoder_cache(state.batch_size)
        return state

    @torch.no_grad()
    def step_latents(
        self,
        state: WorldState,
        keyboard=None,
        mouse=None,
        before_refresh: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """One block of latent frames [B, 16, 3, h, w], without decoding; `before_refresh(latents)` is
        queued between the denoising steps and the caches' refresh (`StreamingSampler.step`)."""
        return self.sampler.step(state, keyboard, mouse, before_refresh=before_refresh)

    @torch.no_grad()
    def decode(self, state: WorldState, latents: torch.Tensor, last_frames: int | None = None) -> torch.Tensor:
        """Stream-decode a block of latents -> frames [B, T, H, W, 3] uint8 on the CPU; `last_frames`:
        only the block's last frames, for less work and the same stream (`WanVAE.decode_stream`)."""
        frames = self.decode_on_device(state, latents, last_frames)
        return to_host(frames)

    @torch.no_grad()
    def decode_on_device(
        self, state: WorldState, latents: torch.Tensor, last_frames: int | None = None
    ) -> torch.Tensor:
        """Like `decode`, but the uint8 frames stay on the model's device (no host sync)."""
        latents = latents.to(self.vae.dtype)
        if self.decoder_graphs is not None:
            return self.decoder_graphs.decode(latents, state.decoder_cache, last_frames)
        return decode_to_uint8(self.vae, latents, state.decoder_cache, last_frames)

    def set_decode_beside(self, enabled: bool = True) -> None:
        """On a GPU, `generate` decodes on a stream of its own, so that the decode and the caches'
        refresh that follows the denoising steps can run at the same time (they share no tensors:
        the decode reads the block's latents and writes the decoder cache, the refresh writes the
        DiT's caches). The same kernels on the same inputs as decoding on the main stream. Each decode
        first waits for the work queued on the main stream, so states may be copied, forked or
        dropped between steps as usual."""
        if enabled and self.device.type != "cuda":
            raise ValueError(f"decoding beside the refresh needs a CUDA device, the model is on {self.device}")
        self.decode_stream = torch.cuda.Stream(device=self.device) if enabled else None

    def enable_decoder_graphs(self, enabled: bool = True, max_graphs: int = 4) -> None:
        """Replay the VAE decoder's steady-state blocks (once a world's decoder cache is full) from
        captured CUDA graphs: the same kernels without the Python and launch overhead. CUDA only."""
        self.decoder_graphs = DecoderGraphs(self.vae, max_graphs) if enabled else None

    @torch.no_grad()
    def step(self, state: WorldState, keyboard=None, mouse=None, last_frames: int | None = None) -> torch.Tensor:
        """Generate the next block for every world -> frames [B, T, H, W, 3] uint8 (CPU).

        keyboard [B, K] / mouse [B, 2] are held for the block, or [B, T, K] / [B, T, 2] give one
        action per new video frame (T = 9 for the first block, 12 after). `last_frames`: only the
        block's last frames (the decoder computes less; the stream goes on the same).
        """
        return self.generate(state, keyboard, mouse, last_frames)[1]

    @torch.no_grad()
    def generate(
        self, state: WorldState, keyboard=None, mouse=None, last_frames: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Like `step`, with the block's latents: (latents on the model's device, frames on the CPU).

        The block is decoded between its denoising steps and the clean-context re-run that refreshes
        the caches (which the frames do not depend on): on a GPU the frames reach the host while the
        re-run still runs, so a caller gets them that much sooner. The same results as
        `decode(state, step_latents(state, ...), last_frames)`.
        """
        queued: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []  # the frames, and their copy's event

        def decode(latents: torch.Tensor) -> None:
            beside = self.decode_stream
            if beside is not None:  # the decode and the refresh may then run at the same time
                beside.wait_stream(torch.cuda.current_stream(self.device))
                latents.record_stream(beside)
            with torch.cuda.stream(beside) if beside is not None else contextlib.nullcontext():
                frames = queue_to_host(self.decode_on_device(state, latents, last_frames))
                queued.append((frames, copied_event(self.device)))

        latents = self.sampler.step(state, keyboard, mouse, before_refresh=decode)
        frames, copied = queued[0]
        if copied is not None:
            copied.synchronize()  # the frames' copy, not the re-run queued after it
        return latents, frames


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of a tensor. From a GPU it goes through page-locked memory (from torch's caching
    host allocator, so each call gets its own buffer and no earlier result is overwritten), which
    copies many times faster than pageable memory."""
    host = queue_to_host(tensor)
    if tensor.device.type == "cuda":
        torch.cuda.current_stream(tensor.device).synchronize()
    return host


def queue_to_host(tensor: torch.Tensor) -> torch.Tensor:
    """Like `to_host`, but without waiting: a GPU tensor's copy is queued on the current stream and
    may be read only after that stream is synchronised (so that several copies cost one wait)."""
    if tensor.device.type != "cuda":
        return tensor.cpu()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


def copied_event(device: torch.device) -> torch.cuda.Event | None:
    """On a GPU, an event recorded on the current stream after what is queued there so far (copies to
    the host by `queue_to_host`): waiting for it waits for them, not for work queued later. None on
    other devices, whose copies are done when queued."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def enable_fast_path(world: WorldModel, fast: bool | str = True, batch: int = 1) -> None:
    """Speed options of a world of `batch` worlds. GPU: True = CUDA graphs of the sampler and, for
    narrow decoders, of the decoder (bit-identical results), autotuned cuDNN convolutions
    (process-wide), where it pays channels-last decoding, and then the Triton kernel for the
    decoder's 16-channel convolutions when Triton is installed (same function, other kernels), and
    with Triton the DiT's elementwise chains as Triton kernels (`nn.triton_dit`, in this world's
    sampler; results within bf16 rounding); "compile" = that plus torch.compile-fused elementwise
    chains in the DiT and the decoder (process-wide); False = eager.
    CPU: True or "compile" = channels-last decoding where the causal convolutions run as oneDNN's
    (the CPU default), and "compile" the DiT's passes and the decoder's chunks through torch.compile
    (`StreamingSampler.compile_dit`: the first full block compiles, a minute or two;
    `compiled_decoder.compile_decoder`: the second latent, 10-30 s); False = the standard layout, eager."""
    if fast not in (True, False, "compile"):
        raise ValueError(f"fast must be True, False or 'compile', got {fast!r}")
    if world.device.type != "cuda":
        world.vae.set_decoder_channels_last(bool(fast) and cpu_decoder_channels_last_pays(world.vae))
        world.sampler.dit_kernels = None if fast else False
        world.sampler.compile_dit(fast == "compile")
        compile_decoder(world.vae, fast == "compile")
        return
    if fast:
        if world.sampler.graphs is None:
            world.sampler.enable_cuda_graphs()
        # The decoder's shapes repeat every block: time cuDNN's candidate kernels once, keep the fastest.
        torch.backends.cudnn.benchmark = True
    else:
        world.sampler.enable_cuda_graphs(False)
    if fast == "compile":
        enable_fusion(True)
    world.vae.set_decoder_channels_last(
        decoder_channels_last_pays(world.vae.decoder_dim, fast, batch, triton_conv.available())
    )
    graphs = decoder_graphs_pay(world.vae.decoder_dim, fast)
    if not graphs or world.decoder_graphs is None:
        world.enable_decoder_graphs(graphs)
    # The Triton kernel: 1.03-1.09x the steps/s of doom-small at 64 worlds (H200, benchmarks/NOTES.md).
    world.vae.set_decoder_triton(bool(fast) and triton_conv.available())
    # The DiT's chains in one kernel each: 1.26-1.27x the steps/s of doom-small at 16 and 64 worlds,
    # 1.39-1.59x the full-size model's end-to-end fps at batch 1 (H200, benchmarks/NOTES.md).
    world.sampler.dit_kernels = bool(fast) and triton_conv.available()


def decoder_graphs_pay(decoder_dim: int, fast: bool | str) -> bool:
    """Whether the VAE decoder replays from CUDA graphs. Measured on an H200 with doom-small's narrow
    decoder, where launches are much of a decode: 2.2-2.4x the env's steps/s at 1-4 worlds, 1.45-1.54x
    at 16, 1.02-1.06x at 64. The full-size decoder's kernels are long (66 ms of GPU time per block at
    batch 1), so graphs would mostly hold a decode's activations in memory for little: left off there."""
    return bool(fast) and decoder_dim < 64


def cpu_decoder_channels_last_pays(vae: WanVAE) -> bool:
    """Whether a CPU decoder runs channels-last: where its causal convolutions run as oneDNN's, which
    measured 1.6-2.2x faster on channels-last activations than the stacked-tap form (doom-small, 2
    threads, batch 1-4; benchmarks/NOTES.md); not with stacked taps or torch's conv3d."""
    return conv3d_form(vae.device, vae.dtype) == "onednn"


def decoder_channels_last_pays(decoder_dim: int, fast: bool | str, batch: int, triton: bool = False) -> bool:
    """Whether the VAE decoder runs channels-last on the GPU (`triton`: Triton is installed, so that
    `fast=True` runs a channels-last decoder's norms and 16-channel convolutions as Triton kernels).
    Measured on an H200: wide decoders gain at every batch (full size 1.12-1.17x); narrow ones gain
    with many worlds, where they also skip cuDNN's layout conversions (64 worlds: 1.34x with
    "compile"; with CUDA graphs 1.08x at 16 worlds and 1.05x at 64 synchronised, 1.10x at 64 with
    desynchronised episodes). Below 16 worlds, doom-small with `fast=True` and Triton gained 1.20x at
    1 world and 1.28x at 4 (`env_h200_small_1_4_worlds_options.json`); under "compile" (compiled
    chains instead of the Triton kernels) it lost at batch 1 (0.67x)."""
    if not fast:
        return False
    return decoder_dim >= 64 or batch >= 16 or (fast is True and triton)
