"""A tiny random-weight model of the official architecture, for fast behavioural tests."""

from __future__ import annotations

import torch

from matrixgame_env.nn.dit import CausalDiT


def tiny_dit_config(mode: str = "universal", local_attn_size: int = 6) -> dict:
    keyboard = {"universal": 4, "gta_drive": 2, "templerun": 7}[mode]
    action = {
        "blocks": [0, 1],
        "enable_keyboard": True,
        "enable_mouse": mode != "templerun",
        "heads_num": 2,
        "hidden_size": 8,
        "img_hidden_size": 32,
        "keyboard_dim_in": keyboard,
        "keyboard_hidden_dim": 32,
        "mouse_dim_in": 2,
        "mouse_hidden_dim": 32,
        "rope_dim_list": [8, 4, 4],
        "rope_theta": 256,
        "vae_time_compression_ratio": 4,
        "windows_size": 3,
    }
    return {
        "dim": 32,
        "ffn_dim": 64,
        "freq_dim": 256,
        "in_dim": 36,
        "out_dim": 16,
        "num_heads": 2,
        "num_layers": 3,
        "eps": 1e-6,
        "local_attn_size": local_attn_size,
        "sink_size": 0,
        "action_config": action,
    }


def tiny_dit(mode: str = "universal", seed: int = 0, clip_dim: int = 1280, **kwargs) -> CausalDiT:
    torch.manual_seed(seed)
    cfg = tiny_dit_config(mode, **kwargs)
    cfg["clip_dim"] = clip_dim
    model = CausalDiT.from_config(cfg).eval()
    with torch.no_grad():  # default inits leave some weights at exactly 0 or 1; randomise all
        for p in model.parameters():
            p.copy_(torch.randn_like(p) / max(1, p.shape[-1]) ** 0.5)
    return model
