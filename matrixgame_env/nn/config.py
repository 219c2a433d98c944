"""Typed configs for the causal DiT, read from the official `config.json` contents."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Keys of the official config.json that the official model ignores, or that only diffusers uses.
_IGNORED_KEYS = {
    "_class_name",
    "_diffusers_version",
    "inject_sample_info",
    "model_type",
    "text_len",
    "cross_attn_norm",
    "qk_norm",
    "patch_size",
    "text_dim",
}


@dataclass(frozen=True)
class ActionConfig:
    """The action module's hyper-parameters (`action_config` of the official config)."""

    blocks: tuple[int, ...]
    enable_keyboard: bool = True
    enable_mouse: bool = True
    heads_num: int = 16
    hidden_size: int = 128  # width of the per-frame keyboard embedding
    img_hidden_size: int = 1536  # width of the DiT tokens the module reads and writes
    keyboard_dim_in: int = 4
    keyboard_hidden_dim: int = 1024
    mouse_dim_in: int = 2
    mouse_hidden_dim: int = 1024
    rope_dim_list: tuple[int, ...] = (8, 28, 28)
    rope_theta: float = 256.0
    vae_time_compression_ratio: int = 4
    windows_size: int = 3

    @property
    def window_video_frames(self) -> int:
        """Video frames of action each latent frame looks at (12 for the released models)."""
        return self.windows_size * self.vae_time_compression_ratio

    @property
    def head_dim(self) -> int:
        return self.keyboard_hidden_dim // self.heads_num

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ActionConfig:
        known = {f for f in cls.__dataclass_fields__}
        ignored = {"patch_size", "qk_norm", "qkv_bias", "mouse_qk_dim_list"}
        unknown = set(cfg) - known - ignored
        if unknown:
            raise ValueError(f"unknown action_config keys {sorted(unknown)}; accepted: {sorted(known | ignored)}")
        values = {k: v for k, v in cfg.items() if k in known}
        values["blocks"] = tuple(int(b) for b in cfg.get("blocks", ()))
        if "rope_dim_list" in values:
            values["rope_dim_list"] = tuple(int(d) for d in values["rope_dim_list"])
        return cls(**values)


@dataclass(frozen=True)
class DiTConfig:
    """Hyper-parameters of the causal DiT (the official `CausalWanModel` config)."""

    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    in_dim: int = 36
    out_dim: int = 16
    num_heads: int = 12
    num_layers: int = 30
    eps: float = 1e-6
    local_attn_size: int = 6
    sink_size: int = 0
    patch_size: tuple[int, int, int] = (1, 2, 2)
    clip_dim: int = 1280  # width of the CLIP tokens fed to `img_emb`
    action: ActionConfig | None = field(default=None)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def action_blocks(self) -> tuple[int, ...]:
        return self.action.blocks if self.action is not None else ()

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> DiTConfig:
        """Accept the official config.json contents (or our own saved config)."""
        known = {f for f in cls.__dataclass_fields__} - {"action"}
        unknown = set(cfg) - known - _IGNORED_KEYS - {"action_config"}
        if unknown:
            raise ValueError(
                f"unknown DiT config keys {sorted(unknown)}; accepted: {sorted(known | {'action_config'})}"
            )
        values = {k: cfg[k] for k in known if k in cfg}
        if "patch_size" in values:
            values["patch_size"] = tuple(int(p) for p in values["patch_size"])
        action = cfg.get("action_config")
        config = cls(**values, action=ActionConfig.from_dict(action) if action else None)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        """Our saved form: the official keys, `action_config` included."""
        out = {k: v for k, v in asdict(self).items() if k != "action"}
        out["patch_size"] = list(self.patch_size)
        if self.action is not None:
            action = asdict(self.action)
            action["blocks"] = list(self.action.blocks)
            action["rope_dim_list"] = list(self.action.rope_dim_list)
            out["action_config"] = action
        return out

    def validate(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.in_dim < self.out_dim:
            raise ValueError(f"in_dim {self.in_dim} must hold the {self.out_dim} latent channels plus conditions")
        action = self.action
        if action is None:
            return
        bad = [b for b in action.blocks if not 0 <= b < self.num_layers]
        if bad:
            raise ValueError(f"action_config.blocks {bad} outside 0..{self.num_layers - 1}")
        if action.img_hidden_size != self.dim:
            raise ValueError(f"action_config.img_hidden_size {action.img_hidden_size} must equal dim {self.dim}")
        for name in ("keyboard_hidden_dim", "mouse_hidden_dim"):
            width = getattr(action, name)
            if action.enable_mouse or name == "keyboard_hidden_dim":
                if width % action.heads_num:
                    raise ValueError(f"action_config.{name} {width} not divisible by heads_num {action.heads_num}")
        if action.enable_mouse and action.mouse_hidden_dim != action.keyboard_hidden_dim:
            raise ValueError("mouse_hidden_dim and keyboard_hidden_dim must be equal (they share the head size)")
        if action.rope_dim_list[0] > action.head_dim or action.rope_dim_list[0] % 2:
            raise ValueError(
                f"action rope_dim_list[0] = {action.rope_dim_list[0]} must be even "
                f"and at most the action head size {action.head_dim}"
            )
