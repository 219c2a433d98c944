"""The action module: mouse and keyboard conditioning inside the first DiT blocks.

Per latent frame f, both branches read a window of `window_video_frames` (12) video frames of
actions: video frames 4f-12 .. 4f-1, with indices below 0 replaced by frame 0 (see
`action_windows`). The mouse branch mixes each token with its frame's mouse window and attends
over time at each spatial location; the keyboard branch lets every token attend to per-frame
keyboard keys. Both add their output to the token stream.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import FloatLayerNorm, KVCache, attention, rms_normalize
from .config import ActionConfig
from .fusion import keyboard_queries, mouse_features, mouse_temporal_qkv, residual_add, temporal_attention
from .rope import Rotation, action_rope_angles
from .transfer import to_device


def action_windows(
    actions: torch.Tensor, first_video_frame: int, start_frame: int, num_frames: int, window: int, compression: int = 4
) -> torch.Tensor:
    """Gather the action window of latent frames [start_frame, start_frame + num_frames).

    actions: [B, T, C] holding video frames first_video_frame .. first_video_frame + T - 1, or
    first_video_frame < 0 when the sequence is front-padded. Returns [B, num_frames, window, C]
    where row (f, i) is video frame max(0, compression * f - window + i).
    """
    video = [
        [max(0, compression * f - window + i) for i in range(window)]
        for f in range(start_frame, start_frame + num_frames)
    ]
    index = tuple(tuple(v - first_video_frame for v in row) for row in video)
    flat = [i for row in index for i in row]
    if min(flat) < 0 or max(flat) >= actions.shape[1]:
        needed = [v for row in video for v in row]
        raise ValueError(
            f"actions hold video frames {first_video_frame}..{first_video_frame + actions.shape[1] - 1} "
            f"but latent frames {start_frame}..{start_frame + num_frames - 1} "
            f"need {min(needed)}..{max(needed)}"
        )
    return actions[:, _window_index(index, actions.device)]


_WINDOW_INDEX: dict[tuple, torch.Tensor] = {}  # (device, stream, index rows) -> the index there


def _window_index(index: tuple[tuple[int, ...], ...], device: torch.device) -> torch.Tensor:
    """The gather index of `action_windows` on `device`, uploaded once per pattern: a stream's steady
    blocks all gather the same rows, so each block costs no upload. On a GPU each stream keeps its own
    copy, read only on the stream that uploaded it, so no read can overtake the upload and the copy's
    memory is never reused while another stream may still read it."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    key = (device, stream, index)
    cached = _WINDOW_INDEX.get(key)
    if cached is None:
        if len(_WINDOW_INDEX) >= 256:
            _WINDOW_INDEX.clear()
        cached = _WINDOW_INDEX[key] = to_device(torch.tensor(index, dtype=torch.long), device)
    return cached


class ActionCaches:
    """The streaming caches of one action module (mouse: per spatial location; keyboard: per world)."""

    def __init__(self, mouse: KVCache | None, keyboard: KVCache | None) -> None:
        self.mouse = mouse
        self.keyboard = keyboard


class ActionModule(nn.Module):
    """Mouse + keyboard conditioning; parameter names follow the official `ActionModule`."""

    def __init__(self, config: ActionConfig, eps: float = 1e-6) -> None:
        super().__init__()
        self.config = config
        self.eps = eps
        dim = config.img_hidden_size
        window = config.window_video_frames
        heads_dim = config.keyboard_hidden_dim
        if config.enable_mouse:
            hidden = config.mouse_hidden_dim
            self.mouse_mlp = nn.Sequential(
                nn.Linear(dim + config.mouse_dim_in * window, hidden),
                nn.GELU(approximate="tanh"),
                nn.Linear(hidden, hidden),
                FloatLayerNorm(hidden, eps=1e-5),
            )
            self.t_qkv = nn.Linear(hidden, 3 * hidden, bias=False)
            # Present in the official checkpoints but never applied by the official forward.
            self.img_attn_q_norm = _UnusedNormWeight(config.head_dim)
            self.img_attn_k_norm = _UnusedNormWeight(config.head_dim)
            self.proj_mouse = nn.Linear(hidden, dim, bias=False)
        if config.enable_keyboard:
            self.keyboard_embed = nn.Sequential(
                nn.Linear(config.keyboard_dim_in, config.hidden_size),
                nn.SiLU(),
                nn.Linear(config.hidden_size, config.hidden_size),
            )
            self.key_attn_q_norm = _UnusedNormWeight(config.head_dim)
            self.key_attn_k_norm = _UnusedNormWeight(config.head_dim)
            self.mouse_attn_q = nn.Linear(dim, heads_dim, bias=False)  # keyboard-branch queries (official name)
            self.keyboard_attn_kv = nn.Linear(config.hidden_size * window, 2 * heads_dim, bias=False)
            self.proj_keyboard = nn.Linear(heads_dim, dim, bias=False)

    def rotation(self, start_frame: int, num_frames: int, device: torch.device) -> Rotation:
        c = self.config
        angles = action_rope_angles(
            c.head_dim, c.rope_dim_list[0], range(start_frame, start_frame + num_frames), c.rope_theta
        )
        return Rotation(angles, device)

    def forward(
        self,
        x: torch.Tensor,
        num_frames: int,
        start_frame: int,
        mouse_windows: torch.Tensor | None,
        keyboard_windows: torch.Tensor | None,
        caches: ActionCaches | None = None,
        frame_mask: torch.Tensor | None = None,
        return_branches: bool = False,
        rotation: Rotation | None = None,
    ):
        """x: [B, F*S, dim] tokens (float32 residual stream) -> x + mouse branch + keyboard branch.

        mouse_windows [B, F, window, 2], keyboard_windows [B, F, window, K]. With `caches`, the new
        frames' keys are stored and attention spans the cache; without, `frame_mask` [F, F] (or
        full attention) applies over the given frames. `rotation` (from `self.rotation`) may be
        passed precomputed.
        """
        c = self.config
        batch, tokens, dim = x.shape
        spatial = tokens // num_frames
        weight_dtype = self._weight_dtype()
        if rotation is None:
            rotation = self.rotation(start_frame, num_frames, x.device)
        mouse_out = keyboard_out = None

        if c.enable_mouse:
            heads, head_dim = c.heads_num, c.mouse_hidden_dim // c.heads_num
            hidden = self.mouse_mlp(mouse_features(x, mouse_windows.flatten(2), num_frames, weight_dtype))
            qkv = self.t_qkv(hidden).view(batch, num_frames, spatial, 3, heads, head_dim)
            # One temporal sequence per spatial location: [B*S, F, heads, head_dim].
            q, k, v = mouse_temporal_qkv(qkv, rotation.cos, rotation.sin, self.eps)
            if caches is not None:
                k, v = _update_grouped(caches.mouse, start_frame, k, v, batch, spatial)
                out = temporal_attention(q, k, v, batch)  # [B, F*S, heads*head_dim]
            else:
                out = attention(q, k, v, frame_mask)  # [B*S, F, heads, head_dim]
                out = out.reshape(batch, spatial, num_frames, heads * head_dim).transpose(1, 2)
            mouse_out = self.proj_mouse(out.reshape(batch, tokens, heads * head_dim))
            x = residual_add(x, mouse_out)

        if c.enable_keyboard:
            heads, head_dim = c.heads_num, c.head_dim
            embedded = self.keyboard_embed(keyboard_windows.to(weight_dtype))  # [B, F, window, hidden]
            kv = self.keyboard_attn_kv(embedded.flatten(2)).view(batch, num_frames, 2, heads, head_dim)
            k, v = kv.unbind(dim=2)  # [B, F, heads, head_dim]
            q = self.mouse_attn_q(x.to(weight_dtype))
            q = keyboard_queries(q, rotation.cos, rotation.sin, self.eps, num_frames, heads)  # [B, F*S, heads, hd]
            k = rotation.apply(rms_normalize(k, self.eps))
            if caches is not None:
                k, v = caches.keyboard.update(start_frame, k, v)
                mask = None
            else:
                mask = None if frame_mask is None else frame_mask.repeat_interleave(spatial, dim=0)
            out = attention(q, k, v, mask)
            keyboard_out = self.proj_keyboard(out.reshape(batch, tokens, heads * head_dim))
            x = residual_add(x, keyboard_out)

        if return_branches:
            return x, *(None if branch is None else branch.float() for branch in (mouse_out, keyboard_out))
        return x

    def _weight_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


def _update_grouped(cache: KVCache, start_frame: int, k: torch.Tensor, v: torch.Tensor, batch: int, spatial: int):
    """Store per-location keys in a cache laid out [B, S, frames, heads, dim]; return [B*S, ...] views."""
    k_all, v_all = cache.update(start_frame, k.unflatten(0, (batch, spatial)), v.unflatten(0, (batch, spatial)))
    return k_all.flatten(0, 1), v_all.flatten(0, 1)


class _UnusedNormWeight(nn.Module):
    """Holds a q/k norm weight that the official checkpoints carry but the official forward ignores."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
