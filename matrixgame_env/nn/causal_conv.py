"""The VAE's causal 3D convolution and the RMS norm before it, and the forms they can run in.

A causal convolution runs as torch's conv3d, as one 2D convolution over stacked temporal taps, as
oneDNN's 3D kernel (CPUs) or as the Triton kernel of `nn.triton_conv` (narrow layers on GPUs); the
decoder's upsamplers as nearest upsampling then a 3x3 convolution, or as one transposed convolution.
Every form computes the same function; `set_conv3d_mode` and `set_upsample_mode` choose process-wide.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import triton_conv, triton_norm
from .fusion import channel_rms_norm_silu, fusion_enabled, is_channels_last_video
from .vae_cache import FeatureCache


class RMSNorm(nn.Module):
    """Each position's channel vector scaled to unit L2 norm, times sqrt(C) and a learned per-channel gain."""

    def __init__(self, channels: int, spatial_dims: int = 3) -> None:
        super().__init__()
        self.scale = channels**0.5
        # [C, 1, 1, 1] for videos [B, C, T, H, W], [C, 1, 1] for images [B, C, H, W] (checkpoint shapes).
        self.gamma = nn.Parameter(torch.ones(channels, *[1] * spatial_dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float32, torch.float64):
            # x / max(|x|, 1e-12) as F.normalize, in a form that is many times faster on CPUs.
            inverse_norm = x.square().sum(dim=1, keepdim=True).clamp_min(1e-24).rsqrt()
            return x * (inverse_norm * self.scale) * self.gamma
        return F.normalize(x, dim=1) * self.scale * self.gamma

    def silu_of(self, x: torch.Tensor) -> torch.Tensor:
        """SiLU(norm(x)), as one fused kernel on GPUs when fusion is enabled (`nn.fusion`)."""
        if fusion_enabled() and x.is_cuda:
            return channel_rms_norm_silu(x, self.gamma, self.scale)
        return F.silu(self(x))


class _ComputationForm:
    """A process-wide choice among forms of the same computation; "auto" picks one by device type."""

    def __init__(self, what: str, forms: tuple[str, ...], on_cpu: str, elsewhere: str) -> None:
        self.what, self.choices = what, ("auto", *forms)
        self.on_cpu, self.elsewhere = on_cpu, elsewhere
        self.mode = "auto"

    def set(self, mode: str) -> None:
        if mode not in self.choices:
            raise ValueError(f"{self.what} mode must be one of {self.choices}, got {mode!r}")
        self.mode = mode

    def on(self, device: torch.device) -> str:
        if self.mode == "auto":
            return self.on_cpu if device.type == "cpu" else self.elsewhere
        return self.mode


# How causal 3D convolutions run: "native" (torch's conv3d, which on CPUs falls back to a slow
# generic kernel), "stacked" (one 2D convolution over the temporal taps stacked in channels),
# "onednn" (oneDNN's 3D convolution called directly: CPUs, float32 / bfloat16 / float16) or "auto"
# (onednn on CPUs where it applies, else stacked; native elsewhere), "triton" (GPUs: 3x3x3
# convolutions of 16 channels in and out on channels-last bf16/fp16 inputs run as the kernel of
# `nn.triton_conv`, sized to narrow layers; the others as native). All compute the same function.
_CONV3D_FORM = _ComputationForm(
    "conv3d", ("native", "stacked", "onednn", "triton"), on_cpu="onednn", elsewhere="native"
)
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# How the decoder's upsamplers run their 2x nearest upsampling and 3x3 convolution: "nearest" (as
# written: upsample, then convolve the 4x larger picture), "transposed" (one stride-2 transposed
# convolution of the small picture with a 4x4 kernel made of sums of the 3x3 one: the same function,
# 2.25x fewer multiply-adds and no upsampled copy) or "auto" (transposed on CPUs, nearest elsewhere:
# on an H200, cuDNN's transposed kernels were slower at doom-small's widths; benchmarks/NOTES.md).
_UPSAMPLE_FORM = _ComputationForm("upsample", ("nearest", "transposed"), on_cpu="transposed", elsewhere="nearest")


def set_conv3d_mode(mode: str) -> None:
    """Chooses how the VAE's causal 3D convolutions run: "auto", "native", "stacked", "onednn" or
    "triton" (see above)."""
    if mode == "triton" and not triton_conv.available():
        raise ValueError("conv3d mode 'triton' needs Triton and a CUDA GPU (or TRITON_INTERPRET=1)")
    _CONV3D_FORM.set(mode)


def conv3d_form(device: torch.device, dtype: torch.dtype) -> str:
    """How a causal 3D convolution of an input on `device` in `dtype` runs now: "native", "stacked",
    "onednn" or "triton" (which falls back to native for the layers the kernel does not take)."""
    form = _CONV3D_FORM.on(device)
    if form != "onednn" or _onednn_applies(device, dtype):
        return form
    if _CONV3D_FORM.mode == "onednn":
        raise ValueError(
            f"conv3d mode 'onednn' needs a CPU with oneDNN and a float32 input, or a bfloat16 / float16 "
            f"one where this CPU has oneDNN's kernels for it; got a {dtype} input on {device}; "
            f"use 'stacked' or 'auto'"
        )
    return "stacked"


# Whether oneDNN has this CPU's kernels for a dtype, asked once per dtype: the questions are calls
# that torch.compile cannot trace (a compiled decoder would break its graph at each convolution).
_ONEDNN_KERNELS: dict[torch.dtype, bool] = {}


def _onednn_applies(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu" or dtype not in _ONEDNN_DTYPES:
        return False
    if dtype not in _ONEDNN_KERNELS:
        _ONEDNN_KERNELS[dtype] = _onednn_has_kernels(dtype)
    return _ONEDNN_KERNELS[dtype]


@torch.compiler.disable
def _onednn_has_kernels(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    # oneDNN's half-precision kernels need the CPU's own instructions for them (it raises otherwise).
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True


def set_upsample_mode(mode: str) -> None:
    """Chooses how the decoder's spatial upsamplers run: "auto", "nearest" or "transposed" (see above)."""
    _UPSAMPLE_FORM.set(mode)


def use_transposed_upsampling(device: torch.device) -> bool:
    """Whether the decoder's spatial upsamplers on `device` run as transposed convolutions now."""
    return _UPSAMPLE_FORM.on(device) == "transposed"


# Which of the 3x3 kernel's taps (columns) each tap of the 4x4 transposed kernel (rows) sums, along one
# axis. Output pixel 2i reads input i - 1 through tap 0 and input i through taps 1 and 2 of the 3x3
# kernel; output 2i + 1 reads input i through taps 0 and 1 and input i + 1 through tap 2.
_NEAREST_TAPS = ((0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))


def nearest_conv_as_transposed(weight: torch.Tensor) -> torch.Tensor:
    """The kernel [C_in, C_out, 4, 4] of the stride-2, padding-1 transposed convolution that equals a 2x
    nearest upsampling followed by the 3x3, padding-1 convolution `weight` [C_out, C_in, 3, 3].
    Summed in float32 at least, then cast to the weight's dtype."""
    if weight.shape[-2:] != (3, 3):
        raise ValueError(f"expected a 3x3 convolution kernel, got shape {tuple(weight.shape)}")
    work = weight if weight.dtype == torch.float64 else weight.float()
    taps = torch.tensor(_NEAREST_TAPS, dtype=work.dtype, device=work.device)
    return torch.einsum("ak,bl,oikl->ioab", taps, taps, work).to(weight.dtype)


class CausalConv3d(nn.Conv3d):
    """3D convolution that sees only the current and past frames in time, zero-padded in space.

    A temporal kernel of k reads the k - 1 frames before the chunk from its cache slot (zeros before
    the first chunk) and stores the last k - 1 frames it was given for the next chunk.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int]) -> None:
        frames, height, width = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        if frames < 2:
            raise ValueError(f"a causal convolution needs a temporal kernel of at least 2, got {frames}")
        super().__init__(in_channels, out_channels, (frames, height, width), padding=(0, height // 2, width // 2))
        self.past_frames = frames - 1
        self.cache_slot = -1  # set by _assign_cache_slots once the whole network exists
        self.triton_kernel = False  # WanVAE.set_decoder_triton: the Triton kernel under conv3d mode "auto"

    def forward(self, x: torch.Tensor, cache: FeatureCache, keep: int | None = None) -> torch.Tensor:
        """x [B, C, T, H, W] -> [B, C_out, T, H, W]; with `keep`, only the last `keep` output frames,
        computed from the input frames they need alone (`window`). The cache moves on as without it."""
        return self._convolve(*self.window(x, cache, keep), cache)

    def _convolve(self, past: torch.Tensor, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """The convolution (with its bias) of cat([past, x]), in this input's form; keeps its last frames."""
        form = self._form(x)
        if form == "stacked":
            return self._forward_stacked_taps(past, x, cache)
        return self._convolve_joined(torch.cat([same_layout(past, x), x], dim=2), cache, self.bias, form)

    def window(self, x: torch.Tensor, cache: FeatureCache, keep: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(past, part): the frames before the chunk x and the part of x that the last `keep` output
        frames read (all of them for None); the convolution of cat([past, part]) gives exactly those
        outputs. Where x holds `keep` + past_frames frames or more, its own earlier frames stand in for
        the cache's (past is empty, part the last frames of x), else past is the cache's last frames.
        Either way the joined input ends with the frames the cache keeps for the next chunk."""
        frames = x.shape[2]
        if keep is not None and frames >= keep + self.past_frames:
            return x[:, :, :0], x[:, :, frames - keep - self.past_frames :]
        past = self._past(x, cache)
        if keep is not None and keep < frames:
            past = past[:, :, frames - keep :]  # keep + past_frames - frames of the cached frames
        return past, x

    def takes_fused_input(self, x: torch.Tensor) -> bool:
        """Whether `forward_normed` joins, normalises and adds biases in fused kernels for this input:
        with fusion enabled (or the Triton kernels, `fuses_with_triton`), on channels-last videos, when
        the convolution runs on a joined input (torch's conv3d, oneDNN's or Triton's, not stacked taps)."""
        return self._fused_kind(x) is not None

    def _fused_kind(self, x: torch.Tensor) -> str | None:
        """How `forward_normed` joins, normalises and adds biases for this input: "triton"
        (`nn.triton_norm`), "compile" (`nn.fusion`) or None (unfused)."""
        if self.fuses_with_triton(x):
            kind = "triton"
        elif fusion_enabled():
            kind = "compile"
        else:
            return None
        return kind if is_channels_last_video(x) and self._form(x) != "stacked" else None

    def fuses_with_triton(self, x: torch.Tensor) -> bool:
        """Whether the norm, SiLU and join before this convolution run as one Triton kernel
        (`nn.triton_norm`): with `WanVAE.set_decoder_triton`, conv3d mode "auto", torch.compile's
        fusion off (it takes precedence), no gradient, and a video the kernels take."""
        return (
            self.triton_kernel
            and _CONV3D_FORM.mode == "auto"
            and not fusion_enabled()
            and triton_norm.enabled()
            and not torch.is_grad_enabled()
            and triton_norm.applies(x)
        )

    def forward_normed(
        self,
        x: torch.Tensor,
        norm: RMSNorm,
        cache: FeatureCache,
        input_bias: torch.Tensor | None = None,
        add_bias: bool = True,
        keep: int | None = None,
    ) -> torch.Tensor:
        """The convolution of SiLU(norm(x + input_bias)). On fused inputs (`takes_fused_input`) one
        kernel adds the bias, normalises and writes the result after the cached past frames, where
        `forward` would normalise, then copy both into a joined input. `add_bias=False` leaves this
        convolution's own bias out (for the caller to add in its next fused kernel): cuDNN adds it to
        channels-last outputs in a pass of its own. Both work on any input (fused or not) except with
        stacked taps. `keep`: only the last `keep` output frames, as for `forward`; the norm then runs
        on the input frames they need alone."""
        kind = self._fused_kind(x)
        past, x = self.window(x, cache, keep)
        if kind is None and input_bias is None and add_bias:
            return self._convolve(past, norm.silu_of(x), cache)
        form = self._form(x)
        if form == "stacked":
            raise ValueError(
                "input_bias and add_bias=False need a convolution of the joined input "
                "(set_conv3d_mode('native') or 'onednn'), not stacked taps"
            )
        if kind == "triton":
            joined = triton_norm.past_and_norm_silu(past, x, norm.gamma, norm.scale, input_bias)
        else:
            joined = channel_rms_norm_silu(
                x, norm.gamma, norm.scale, past=past if past.shape[2] else None, bias=input_bias
            )
        return self._convolve_joined(joined, cache, self.bias if add_bias else None, form)

    def _form(self, x: torch.Tensor) -> str:
        """`conv3d_form` for this input, or "triton" where `WanVAE.set_decoder_triton` asked for the
        kernel, the mode is "auto" and the input is on a GPU (or Triton interprets)."""
        if self.triton_kernel and _CONV3D_FORM.mode == "auto" and (x.is_cuda or triton_conv.interpreted()):
            return "triton"
        return conv3d_form(x.device, x.dtype)

    def _past(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """The inputs kept from the previous chunk, or zeros before the first: [B, C, past, H, W]."""
        if cache.is_empty(self.cache_slot):
            return x.new_zeros(*x.shape[:2], self.past_frames, *x.shape[3:])
        return cache.slots[self.cache_slot]

    def _convolve_joined(
        self, joined: torch.Tensor, cache: FeatureCache, bias: torch.Tensor | None, form: str
    ) -> torch.Tensor:
        """The convolution of [past frames, this chunk] [B, C, past + T, H, W] in `form` ("native",
        "onednn" or "triton", which takes torch's where its kernel does not apply); keeps its last frames."""
        cache.keep(self.cache_slot, joined[:, :, -self.past_frames :])  # a copy: the join need not stay alive
        if form == "onednn" and torch.compiler.is_compiling():
            # Traced as a convolution, which a compiled graph with frozen weights (`world.frozen_compile`)
            # runs as oneDNN's, prepacked; oneDNN's op itself cannot be traced.
            return self._conv_forward(joined, self.weight, bias)
        if form == "onednn":  # torch's own conv3d would take its slow generic CPU kernel
            return torch.ops.aten.mkldnn_convolution(
                joined, self.weight, bias, self.padding, self.stride, self.dilation, self.groups
            )
        if form == "triton" and triton_conv.applies(joined, self.weight) and not _needs_gradient(joined, self.weight):
            return triton_conv.causal_conv3x3x3(joined, self._packed_weight(), bias)
        return self._conv_forward(joined, self.weight, bias)

    def _packed_weight(self) -> torch.Tensor:
        """The kernel in `triton_conv.pack_weight`'s layout, packed again whenever the weight changes.
        A new packing is waited for (once per weight), so that any CUDA stream may read it at once."""
        weight = self.weight
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        packed = getattr(self, "_packed", None)
        if packed is None or packed[0] != key:
            with torch.no_grad():
                packed = (key, triton_conv.pack_weight(weight.detach()))
            if weight.is_cuda and not torch.cuda.is_current_stream_capturing():
                torch.cuda.current_stream(weight.device).synchronize()
            self._packed = packed
        return packed[1]

    def _forward_stacked_taps(self, past: torch.Tensor, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """The same convolution as one 2D convolution over each output frame's k input frames stacked
        in channels, [B*T', k*C, H, W] with the kernel [C_out, k*C, kh, kw]; equal up to float rounding.
        past may hold any number of frames (`window`): T' = past + T - (k - 1) outputs. The result is a
        frame-major view [B, C_out, T', H, W] of a [B, T', C_out, H, W] tensor."""
        batch, channels, _, height, width = x.shape
        taps = self.past_frames + 1
        sequence = [past[:, :, i] for i in range(past.shape[2])] + [x[:, :, i] for i in range(x.shape[2])]
        frames = len(sequence) - self.past_frames
        windows = torch.stack([sequence[t + j] for t in range(frames) for j in range(taps)], dim=1)
        # Kept after the windows are built: they read the past frames, which keep may overwrite.
        cache.keep(self.cache_slot, torch.stack(sequence[-self.past_frames :], dim=2), owned=True)  # [B, C, past, H, W]
        windows = windows.reshape(batch * frames, taps * channels, height, width)  # [B*T', k*C, H, W]
        weight = self.weight.transpose(1, 2).flatten(1, 2)  # [C_out, k*C, kh, kw]
        y = F.conv2d(windows, weight, self.bias, padding=self.padding[1:])  # [B*T', C_out, H, W]
        return y.unflatten(0, (batch, frames)).transpose(1, 2)


def _needs_gradient(*tensors: torch.Tensor) -> bool:
    """Whether autograd would record an operation on these tensors (the Triton kernel has no backward)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def same_layout(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`tensor` in the memory layout of the video `like` (channels-last-3d or standard)."""
    if is_channels_last_video(like):
        return tensor.contiguous(memory_format=torch.channels_last_3d)
    return tensor
