"""The streaming few-step sampler: one block of latent frames per call, caches carried in a state.

Per block (3 latent frames for the released models): start from noise, run the distilled steps
([1000, 666, 333] warped onto the shift-5 schedule), converting each velocity prediction to x0 and
re-noising to the next level, then run the DiT once more on the clean x0 at timestep
`context_noise` so the caches hold clean-frame keys. Actions arrive block by block.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..nn import triton_dit
from ..nn.action import ActionCaches, action_windows
from ..nn.dit import CausalDiT, ContextKV, LayerCaches
from ..nn.scheduler import FlowMatchScheduler
from ..nn.transfer import to_device
from .cache import RingKVCache
from .compiled_dit import CompiledDiT
from .condition import BlockConditions, ImageLatents, first_frame_mask
from .graphs import BlockGraphs, BlockInputs, layer_ring_caches, ring_caches
from .noise import current_stream, draw, draw_ahead
from .state import WorldState


@dataclass(frozen=True)
class SamplerConfig:
    """Few-step sampling settings (the official inference YAML's keys)."""

    denoising_steps: tuple[float, ...] = (1000, 666, 333)
    warp_denoising_step: bool = True
    timestep_shift: float = 5.0
    frames_per_block: int = 3
    context_noise: float = 0.0
    # Classifier-free-style guidance on the actions: each denoising step's flow becomes
    # flow(actions) + (scale - 1) * (flow(actions) - flow(no actions)), one extra DiT pass per step.
    # 1 (the official behaviour) turns it off; above 1 it strengthens what the actions do.
    action_guidance: float = 1.0
    # A separate scale for the keyboard (compositional guidance); None: the same as action_guidance.
    # With g_a = action_guidance and g_k = keyboard_guidance each step's flow becomes
    #   flow(none) + g_a * (flow(mouse) - flow(none)) + g_k * (flow(keyboard + mouse) - flow(mouse)),
    # where flow(mouse) has the keyboard zeroed ("no key pressed") and the mouse given. Equal scales
    # give the two-pass formula above (and run it); different ones cost a third DiT pass per step.
    keyboard_guidance: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.action_guidance) and self.action_guidance >= 1.0):
            raise ValueError(f"action_guidance must be a finite number >= 1 (1: off), got {self.action_guidance}")
        value = self.keyboard_guidance
        if value is not None:
            number = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and value >= 1.0):
                raise ValueError(
                    "keyboard_guidance must be a finite number >= 1 (1: off) or None (the same as "
                    f"action_guidance), got {value!r}"
                )
            object.__setattr__(self, "keyboard_guidance", float(value))

    @property
    def effective_keyboard_guidance(self) -> float:
        """The keyboard's guidance scale: keyboard_guidance, or action_guidance when that is None."""
        return self.action_guidance if self.keyboard_guidance is None else self.keyboard_guidance

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> SamplerConfig:
        """Accept the official inference YAML contents (denoising_step_list, num_frame_per_block,
        context_noise, warp_denoising_step, model_kwargs.timestep_shift) or our own keys."""
        shift = cfg.get("timestep_shift", cfg.get("model_kwargs", {}).get("timestep_shift", 5.0))
        return cls(
            denoising_steps=tuple(cfg.get("denoising_steps", cfg.get("denoising_step_list", cls.denoising_steps))),
            warp_denoising_step=bool(cfg.get("warp_denoising_step", True)),
            timestep_shift=float(shift),
            frames_per_block=int(cfg.get("frames_per_block", cfg.get("num_frame_per_block", 3))),
            context_noise=float(cfg.get("context_noise", 0.0)),
            action_guidance=float(cfg.get("action_guidance", 1.0)),
            keyboard_guidance=cfg.get("keyboard_guidance"),
        )


class StreamingSampler:
    """Streams latent blocks from a `CausalDiT`, for a batch of worlds held in a `WorldState`."""

    def __init__(
        self,
        model: CausalDiT,
        config: SamplerConfig | None = None,
        latent_size: tuple[int, int] = (44, 80),
        window_frames: int | None = None,
    ) -> None:
        self.model = model
        self.config = config or SamplerConfig()
        self.latent_height, self.latent_width = latent_size
        pt, ph, pw = model.config.patch_size
        if self.latent_height % ph or self.latent_width % pw:
            raise ValueError(f"latent size {latent_size} is not divisible by the patch size {(ph, pw)}")
        if pt != 1:
            raise ValueError(f"temporal patch size {pt} is not supported by streaming (the released models use 1)")
        self.tokens_per_frame = model.tokens_per_frame(self.latent_height, self.latent_width)
        window = window_frames if window_frames is not None else model.config.local_attn_size
        if window is None or window <= 0:
            raise ValueError(
                f"streaming needs a finite attention window; the config has local_attn_size={window}: "
                "pass window_frames (e.g. 6)"
            )
        if window < self.config.frames_per_block + model.config.sink_size:
            raise ValueError(f"window of {window} frames cannot hold a block of {self.config.frames_per_block}")
        self.window_frames = window
        self.scheduler = FlowMatchScheduler(self.config.timestep_shift)
        steps = list(self.config.denoising_steps)
        self.timesteps = self.scheduler.warp(steps) if self.config.warp_denoising_step else [float(s) for s in steps]
        # sigma of each step as the float32 table value, looked up once (no per-step device work).
        self.sigmas = [float(self.scheduler.sigma(t)) for t in self.timesteps]
        action = model.config.action
        self.keyboard_dim = action.keyboard_dim_in if action and action.enable_keyboard else 0
        self.mouse_dim = action.mouse_dim_in if action and action.enable_mouse else 0
        self.action_window = action.window_video_frames if action else 0
        self.compression = action.vae_time_compression_ratio if action else 4
        self.condition_channels = model.config.in_dim - model.config.out_dim
        self.graphs: BlockGraphs | None = None
        # The DiT's elementwise chains as Triton kernels in this sampler's blocks (`nn.triton_dit`):
        # True / False whatever the process-wide switch says, None as it says. `fast=True` sets it.
        self.dit_kernels: bool | None = None
        # Draw the next block's noise and build its conditions (`BlockConditions`) right after queueing
        # a block (`world.noise`): the same values, made while the GPU works. None: on CUDA devices,
        # where the host would otherwise hold it up.
        self.draw_noise_ahead: bool | None = None
        # What the blocks call for a DiT pass: the module itself, or its compiled form (`compile_dit`).
        self._dit: Callable[..., torch.Tensor] = model

    # ------------------------------------------------------------------ start
    @torch.no_grad()
    def start(
        self,
        image_latents: torch.Tensor | ImageLatents,
        visual_context: torch.Tensor,
        seed: int | Sequence[int] | None = None,
        *,
        finite_checked: bool = False,
    ) -> WorldState:
        """A fresh state for B worlds.

        image_latents: [B, C, K, h, w] normalised VAE latents of the start image followed by zero
        frames (later frames repeat frame K-1); visual_context: CLIP tokens [B, L, clip_dim];
        seed: one per world (or one int: seed + b), None for random seeds. finite_checked: the
        caller already made sure both are finite (the check reads them back from the device).
        """
        image, context, generators = self._start_parts(image_latents, visual_context, seed, finite_checked)
        return WorldState(
            caches=self._new_caches(len(generators)),
            context=context,
            image=image,
            keyboard_history=None,
            mouse_history=None,
            generators=generators,
            frame=0,
        )

    @torch.no_grad()
    def restart(
        self,
        state: WorldState,
        image_latents: torch.Tensor | ImageLatents,
        visual_context: torch.Tensor,
        seed: int | Sequence[int] | None = None,
        *,
        finite_checked: bool = False,
    ) -> WorldState:
        """`start` into an existing state of as many worlds, in place: its caches and context keep
        their tensors (and so the CUDA graphs captured on them, young blocks included), everything
        else starts afresh. The next blocks are exactly those of a fresh `start` with the same
        arguments: the caches' old contents are never read (attention reads only the frames written
        since). Snapshots of `state` share its context tensors, which this overwrites: take none that
        must outlive it. Returns `state`."""
        image, context, generators = self._start_parts(image_latents, visual_context, seed, finite_checked)
        state.settle_noise()
        caches = ring_caches(state)
        if len(generators) != state.batch_size or len(state.caches) != len(self.model.blocks):
            raise ValueError(
                f"restart needs a state of {len(generators)} worlds from this sampler, got one of "
                f"{state.batch_size} worlds and {len(state.caches)} layers"
            )
        expected = layer_ring_caches(self._new_caches(1, device="meta"))  # one world's shapes, nothing allocated
        for mine, one in zip(caches, expected, strict=True):
            if mine.key.shape[1:] != one.key.shape[1:] or mine.key.dtype != one.key.dtype:
                raise ValueError("the state's caches differ in shape or dtype from this sampler's: not its state?")
        for cache in caches:
            cache.end_frame, cache.last_write = 0, (0, 0)
        for mine, new in zip(state.context.keys + state.context.values, context.keys + context.values, strict=True):
            mine.copy_(new)
        state.image, state.generators = image, generators
        state.keyboard_history = state.mouse_history = None
        state.frame, state.frame_shift = 0, None
        state.decoder_cache = None  # as from `start`: decoding is the caller's (`WorldModel.start` restarts it)
        return state

    def _start_parts(
        self,
        image_latents: torch.Tensor | ImageLatents,
        visual_context: torch.Tensor,
        seed: int | Sequence[int] | None,
        finite_checked: bool = False,
    ) -> tuple[ImageLatents, ContextKV, list[torch.Generator]]:
        """The checked image condition on the device, the context keys/values and the random streams of a start."""
        model = self.model
        device = model.device
        image = image_latents if isinstance(image_latents, ImageLatents) else ImageLatents(image_latents)
        latents = image.latents
        batch = latents.shape[0]
        image_channels = self.condition_channels - self._mask_channels()
        expected = (batch, image_channels, latents.shape[2], self.latent_height, self.latent_width)
        if latents.dim() != 5 or tuple(latents.shape) != expected or latents.shape[2] < 1:
            raise ValueError(
                f"image latents must have shape [B, {image_channels}, K>=1, {self.latent_height}, "
                f"{self.latent_width}], got {tuple(latents.shape)}"
            )
        if not finite_checked:
            _check_finite(latents, "image latents")
        if (
            visual_context.dim() != 3
            or visual_context.shape[0] != batch
            or visual_context.shape[2] != model.config.clip_dim
        ):
            raise ValueError(
                f"visual_context must be [{batch}, L, {model.config.clip_dim}], got {tuple(visual_context.shape)}"
            )
        if not finite_checked:
            _check_finite(visual_context, "visual_context")
        generators = _make_generators(seed, batch, device)
        with triton_dit.switched(self.dit_kernels):  # the context keys' norm, as the blocks' chains
            context = model.context_kv(visual_context.to(device))
        return image.to(device, torch.float32), context, generators

    def _mask_channels(self) -> int:
        return self.condition_channels - self.model.config.out_dim

    def _new_caches(self, batch: int, device: torch.device | str | None = None) -> list[LayerCaches]:
        """Empty ring caches for `batch` worlds, on the model's device unless `device` is given."""
        config, model = self.model.config, self.model
        kwargs = dict(dtype=model.dtype, device=device or model.device)
        caches = []
        for block in model.blocks:
            self_attn = RingKVCache(
                (batch,),
                self.window_frames,
                self.tokens_per_frame,
                config.num_heads,
                config.head_dim,
                sink=config.sink_size,
                **kwargs,
            )
            action = None
            if block.action_model is not None:
                a = config.action
                heads, head_dim = a.heads_num, a.head_dim
                mouse = (
                    RingKVCache((batch, self.tokens_per_frame), self.window_frames, 1, heads, head_dim, **kwargs)
                    if a.enable_mouse
                    else None
                )
                keyboard = (
                    RingKVCache((batch,), self.window_frames, 1, heads, head_dim, **kwargs)
                    if a.enable_keyboard
                    else None
                )
                action = ActionCaches(mouse, keyboard)
            caches.append(LayerCaches(self_attn, action))
        return caches

    # ------------------------------------------------------------------ step
    def video_frames_for_block(self, state: WorldState) -> int:
        """New video frames of action (and of output) the next block covers: 9 first, then 12."""
        f = self.config.frames_per_block
        return 1 + self.compression * (f - 1) if state.frame == 0 else self.compression * f

    @torch.no_grad()
    def step(
        self,
        state: WorldState,
        keyboard: torch.Tensor | None = None,
        mouse: torch.Tensor | None = None,
        *,
        noise: torch.Tensor | None = None,
        renoise: Sequence[torch.Tensor] | None = None,
        before_refresh: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Generate the next block of latent frames for every world: [B, 16, frames_per_block, h, w].

        keyboard [B, T, K] / mouse [B, T, 2] hold the actions of the block's T new video frames
        (`video_frames_for_block`: 9 for the first block, 12 after), or [B, K] / [B, 2] for one
        action held over the block. `noise` [B, 16, f, h, w] and `renoise` (one tensor per step
        after the first) replace the state's random streams, for replaying stored noise.
        `before_refresh(x0)` is called with the block's latents between the denoising steps and the
        clean-context re-run (on a GPU: queued between them), e.g. to decode them first.
        """
        model, cfg = self.model, self.config
        batch, start, fpb = state.batch_size, state.frame, cfg.frames_per_block
        device = model.device
        new_frames = self.video_frames_for_block(state)
        keyboard = self._check_actions(keyboard, "keyboard", self.keyboard_dim, batch, new_frames, device)
        mouse = self._check_actions(mouse, "mouse", self.mouse_dim, batch, new_frames, device)
        keyboard_windows, state.keyboard_history = self._windows(keyboard, state.keyboard_history, start, new_frames)
        mouse_windows, state.mouse_history = self._windows(mouse, state.mouse_history, start, new_frames)

        conditions = self._block_conditions(state)
        shape = (batch, model.config.out_dim, fpb, self.latent_height, self.latent_width)
        x, *eps = self._block_noise(state, shape, noise, renoise)
        inputs = BlockInputs(x, eps, conditions.cond, keyboard_windows, mouse_windows, conditions.rotations)
        if self.graphs is not None:  # replays steady blocks, and young blocks of restarted states
            x0 = self.graphs.run(state, inputs, before_refresh)
        else:
            x0 = self.denoise_block(state, inputs, before_refresh)
        state.frame = start + fpb
        ahead = self.draw_noise_ahead if self.draw_noise_ahead is not None else device.type == "cuda"
        if ahead:  # the next block's draws and conditions, made while the GPU runs this one (`world.noise`)
            if noise is None and renoise is None:
                state.drawn_noise = draw_ahead(state.generators, shape, len(self.timesteps), device)
            state.prepared_conditions = self._conditions(state)
        return x0

    def _block_conditions(self, state: WorldState) -> BlockConditions:
        """The conditions of the state's next block: those prepared ahead where they fit, else built now."""
        prepared, state.prepared_conditions = state.prepared_conditions, None
        if prepared is not None and prepared.matches(state.frame, state.image, current_stream(self.model.device)):
            return prepared
        return self._conditions(state)

    def _conditions(self, state: WorldState) -> BlockConditions:
        """The condition channels and RoPE tables of a block starting at the state's frame."""
        model, device = self.model, self.model.device
        start, stop = state.frame, state.frame + self.config.frames_per_block
        h, w = self.latent_height, self.latent_width
        mask = first_frame_mask(state.batch_size, self._mask_channels(), start, stop, h, w, device)
        cond = torch.cat([mask, state.image.frames(start, stop)], dim=1)
        _, ph, pw = model.config.patch_size
        rotations = model.frame_rotations(start, stop - start, h // ph, w // pw, device)
        return BlockConditions(start, state.image, current_stream(device), cond, rotations)

    def denoise_block(
        self, state: WorldState, inputs: BlockInputs, before_refresh: Callable[[torch.Tensor], None] | None = None
    ) -> torch.Tensor:
        """The device work of one block: the denoising steps (`denoise_steps`), then the clean-context
        re-run that refreshes every cache with the keys of the final frames (`refresh_caches`), with
        `before_refresh(x0)` between them. Pure tensor code on fixed shapes (no host syncs), so each
        part can be captured in a CUDA graph. Returns x0 [B, C, f, h, w]."""
        x0 = self.denoise_steps(state, inputs)
        if before_refresh is not None:
            before_refresh(x0)
        self.refresh_caches(state, inputs, x0)
        return x0

    def denoise_steps(self, state: WorldState, inputs: BlockInputs) -> torch.Tensor:
        """The block's denoising steps: x0 [B, C, f, h, w]. Each pass writes the block's own keys and
        values into the caches (the newest block may be rewritten); `refresh_caches` overwrites them
        with those of the final frames."""
        with triton_dit.switched(self.dit_kernels):
            return self._denoise_steps(state, inputs)

    def refresh_caches(self, state: WorldState, inputs: BlockInputs, x0: torch.Tensor) -> None:
        """The clean-context re-run: the block's final latents x0 through the DiT at the context noise
        level, writing every cache's keys and values of the block's frames."""
        with triton_dit.switched(self.dit_kernels):
            timestep = torch.full(x0.shape[:1] + x0.shape[2:3], float(self.config.context_noise), device=x0.device)
            self._dit(x0, inputs.cond, timestep, **self._block_kwargs(state, inputs))

    @staticmethod
    def _block_kwargs(state: WorldState, inputs: BlockInputs) -> dict[str, Any]:
        return dict(
            context=state.context,
            mouse_windows=inputs.mouse_windows,
            keyboard_windows=inputs.keyboard_windows,
            start_frame=state.frame,
            caches=state.caches,
            rotations=inputs.rotations,
        )

    def _denoise_steps(self, state: WorldState, inputs: BlockInputs) -> torch.Tensor:
        model = self._dit
        kwargs = self._block_kwargs(state, inputs)
        x = inputs.noise
        timestep = torch.empty(x.shape[0], x.shape[2], device=x.device)
        guidance, keyboard_guidance = self.guidance_scales()
        if guidance != 1.0 or keyboard_guidance != 1.0:
            # The same block without actions (and, for a separate keyboard scale, with the keyboard
            # alone zeroed); the extra passes' cache writes are overwritten by the block's own.
            no_actions = dict(kwargs)
            for name in ("mouse_windows", "keyboard_windows"):
                if kwargs[name] is not None:
                    no_actions[name] = torch.zeros_like(kwargs[name])
            mouse_only = dict(kwargs, keyboard_windows=no_actions["keyboard_windows"])
        x0 = x
        for k, (t, sigma) in enumerate(zip(self.timesteps, self.sigmas)):
            timestep.fill_(t)
            if keyboard_guidance != guidance:  # three passes: f_none + g_a (f_mouse - f_none) + g_k (f_full - f_mouse)
                unguided = model(x, inputs.cond, timestep, **no_actions).double()
                mouse_flow = model(x, inputs.cond, timestep, **mouse_only).double()
                flow = model(x, inputs.cond, timestep, **kwargs).double()
                flow = unguided + guidance * (mouse_flow - unguided) + keyboard_guidance * (flow - mouse_flow)
            elif guidance != 1.0:
                unguided = model(x, inputs.cond, timestep, **no_actions).double()
                flow = model(x, inputs.cond, timestep, **kwargs).double()
                flow = flow + (guidance - 1.0) * (flow - unguided)
            else:
                flow = model(x, inputs.cond, timestep, **kwargs)
            x0 = (x.double() - sigma * flow.double()).float()
            if k + 1 < len(self.timesteps):
                next_sigma = self.sigmas[k + 1]
                x = (1 - next_sigma) * x0 + next_sigma * inputs.renoise[k]
        return x0

    def guidance_scales(self) -> tuple[float, float]:
        """The (action, keyboard) guidance scales the denoising steps use. They differ only when
        the model takes both keyboard and mouse and the keyboard has its own scale: without mouse
        the keyboard scale is the only one (no-keyboard and no-actions flows are the same), without
        keyboard the action scale is."""
        guidance = self.config.action_guidance
        keyboard = self.config.effective_keyboard_guidance
        if self.keyboard_dim == 0:
            return guidance, guidance
        if self.mouse_dim == 0:
            return keyboard, keyboard
        return guidance, keyboard

    def set_action_guidance(self, scale: float) -> None:
        """Change `SamplerConfig.action_guidance` (1: off) from the next block on; captured CUDA
        graphs are dropped, since they hold the old number of DiT passes and the old scale."""
        self._reconfigure(action_guidance=float(scale))

    def set_keyboard_guidance(self, scale: float | None) -> None:
        """Change `SamplerConfig.keyboard_guidance` (None: follow action_guidance) from the next
        block on; captured CUDA graphs are dropped, since they hold the old number of DiT passes
        and the old scales."""
        self._reconfigure(keyboard_guidance=scale)

    def _reconfigure(self, **changes: Any) -> None:
        """A new config with `changes` (validated by `SamplerConfig`); captured CUDA graphs, which
        hold the old settings, are dropped."""
        self.config = replace(self.config, **changes)
        if self.graphs is not None:
            self.graphs.clear()

    @property
    def dit_compiled(self) -> bool:
        """Whether the blocks' DiT passes run compiled (`compile_dit`; False again if compiling failed)."""
        return isinstance(self._dit, CompiledDiT) and not self._dit.failed

    def compile_dit(self, enabled: bool = True) -> None:
        """CPU only: run the blocks' DiT passes through `torch.compile` (`CompiledDiT`): once the
        ring caches are full, each pass is one compiled graph with the weights frozen in and its
        matrix products autotuned (oneDNN/MKL or inductor's C++ GEMM kernels, the elementwise work
        fused around them); the first blocks of a stream, which fill the caches, run eagerly. The
        first full block compiles (one to two minutes on 2 cores), and once more for a second batch
        size, after which the batch size is dynamic; the results equal the eager passes' to float
        rounding. Where compiling fails (no C++ compiler) it warns and runs eagerly. On GPUs
        `fast="compile"` fuses the elementwise chains and replays CUDA graphs instead."""
        if not enabled:
            self._dit = self.model
            return
        if self.model.device.type != "cpu":
            raise ValueError(
                f"compile_dit is for CPU models, this one is on {self.model.device}; on GPUs "
                "fast='compile' fuses the DiT's elementwise chains and replays CUDA graphs"
            )
        if not isinstance(self._dit, CompiledDiT):
            self._dit = CompiledDiT(self.model)

    def enable_cuda_graphs(self, enabled: bool = True, max_graphs: int = 4) -> None:
        """Replay steady-state blocks (once the caches are full) from captured CUDA graphs: the
        same kernels on the same inputs, without the Python and launch overhead. CUDA only."""
        if enabled and self.model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, it is on {self.model.device}")
        self.graphs = BlockGraphs(self, max_graphs) if enabled else None

    # ------------------------------------------------------------------ helpers
    def _block_noise(
        self,
        state: WorldState,
        shape: tuple[int, ...],
        noise: torch.Tensor | None,
        renoise: Sequence[torch.Tensor] | None,
    ) -> list[torch.Tensor]:
        """The block's random draws in the order the steps use them: the noise, then one per re-noising;
        from the state's generators (or drawn ahead from them) where not given."""
        drawn = state.drawn_noise
        if noise is None and renoise is None and drawn is not None:
            if drawn.matches(state.generators, shape, current_stream(self.model.device)):
                state.drawn_noise = None
                return drawn.tensors
        state.settle_noise()  # drawn for other generators or shapes; given noise leaves the streams as they are
        steps = range(len(self.timesteps) - 1)
        given = [("noise", noise), *((f"renoise[{k}]", None if renoise is None else renoise[k]) for k in steps)]
        return [self._noise(tensor, shape, state, name) for name, tensor in given]

    def _noise(self, given: torch.Tensor | None, shape: tuple[int, ...], state: WorldState, name: str) -> torch.Tensor:
        device = self.model.device
        if given is not None:
            if tuple(given.shape) != shape:
                raise ValueError(f"{name} must have shape {list(shape)}, got {list(given.shape)}")
            _check_finite(given, name)
            return given.to(device, torch.float32)
        return draw(state.generators, shape, device)

    def _check_actions(
        self, actions: torch.Tensor | None, name: str, width: int, batch: int, frames: int, device: torch.device
    ) -> torch.Tensor | None:
        if width == 0:
            if actions is not None:
                raise ValueError(f"this model takes no {name} input, but {name} actions were given")
            return None
        if actions is None:
            return torch.zeros(batch, frames, width, device=device)
        actions = torch.as_tensor(actions)
        if not actions.is_floating_point() and actions.dtype not in (
            torch.int8,
            torch.int16,
            torch.int32,
            torch.int64,
            torch.uint8,
            torch.bool,
        ):
            raise ValueError(f"{name} actions must be numeric, got dtype {actions.dtype}")
        if actions.dim() == 2:
            actions = actions[:, None, :].expand(actions.shape[0], frames, actions.shape[1])
        if actions.dim() != 3 or tuple(actions.shape) != (batch, frames, width):
            raise ValueError(
                f"{name} actions must be [{batch}, {frames}, {width}] (worlds, new video frames of this "
                f"block, {name} width) or [{batch}, {width}] held for the block; got {list(actions.shape)}"
            )
        _check_finite(actions, f"{name} actions")  # before the copy: actions from the host cost no device sync
        return to_device(actions, device, torch.float32)

    def _windows(self, actions: torch.Tensor | None, history: torch.Tensor | None, start: int, new_frames: int):
        """Action windows of the block's latent frames, and the history to keep for the next block."""
        if actions is None:
            return None, None
        window = self.action_window
        if history is None:  # first block: the sequence is front-padded with copies of video frame 0
            history = actions[:, :1].expand(actions.shape[0], window, actions.shape[2])
        sequence = torch.cat([history, actions], dim=1)
        first_video = (0 if start == 0 else 1 + self.compression * (start - 1)) - window
        windows = action_windows(sequence, first_video, start, self.config.frames_per_block, window, self.compression)
        return windows.to(self.model.dtype), sequence[:, -window:].clone()


def _check_finite(t: torch.Tensor, name: str) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise ValueError(f"{name} contain NaN or infinite values")


def _make_generators(seed: int | Sequence[int] | None, batch: int, device: torch.device) -> list[torch.Generator]:
    if seed is None:
        seeds = [int(s) for s in torch.randint(0, 2**62, (batch,))]
    elif isinstance(seed, int):
        seeds = [seed + b for b in range(batch)]
    else:
        seeds = [int(s) for s in seed]
        if len(seeds) != batch:
            raise ValueError(f"got {len(seeds)} seeds for {batch} worlds")
    generators = []
    for s in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(s)
        generators.append(g)
    return generators
