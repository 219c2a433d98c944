"""A tiny random-weight world model (DiT + VAE + CLIP) in our format and in the official layout."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny import tiny_dit_config

from matrixgame_env.checkpoints import OFFICIAL_CLIP_FILE, OFFICIAL_DIT_FILES, OFFICIAL_VAE_FILE, build_modules
from matrixgame_env.model_config import ModelConfig
from matrixgame_env.weights import save_safetensors

TINY_CLIP = {"image_size": 28, "patch_size": 14, "dim": 32, "num_heads": 2, "num_layers": 3, "mlp_ratio": 2}
TINY_VAE = {"dim": 8, "z_dim": 16}


def tiny_model_config(mode: str = "universal") -> ModelConfig:
    dit = tiny_dit_config(mode)
    dit["clip_dim"] = TINY_CLIP["dim"]
    return ModelConfig(
        name=f"tiny-{mode}",
        mode=mode,
        dit=dit,
        sampler={"denoising_steps": [1000, 666, 333]},
        vae=dict(TINY_VAE),
        clip=dict(TINY_CLIP),
        video_size=(16, 32),
        fps=25,
    )


def tiny_modules(config: ModelConfig, seed: int = 0):
    """Built on the CPU with random weights at a stable scale."""
    dit, vae, clip = build_modules(config, device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (dit, vae, clip):
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) / max(1, p[0].numel() if p.dim() > 1 else 1) ** 0.5)
    return dit.eval(), vae.eval(), clip.eval()


def write_official_layout(folder: Path, config: ModelConfig, seed: int = 0) -> Path:
    """The official file layout: prefixed DiT safetensors, VAE and whole-CLIP torch pickles."""
    dit, vae, clip = tiny_modules(config, seed)
    dit_path = folder / OFFICIAL_DIT_FILES[config.mode]
    dit_path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors({f"model.{k}": v for k, v in dit.state_dict().items()}, dit_path)
    torch.save(vae.state_dict(), folder / OFFICIAL_VAE_FILE)
    full_clip = {f"visual.{k}": v for k, v in clip.state_dict().items()}
    last = config.clip["num_layers"] - 1
    width = config.clip["dim"]
    hidden = int(width * config.clip["mlp_ratio"])
    for name, shape in [
        ("norm1.weight", (width,)),
        ("norm1.bias", (width,)),
        ("attn.to_qkv.weight", (3 * width, width)),
        ("attn.to_qkv.bias", (3 * width,)),
        ("attn.proj.weight", (width, width)),
        ("attn.proj.bias", (width,)),
        ("norm2.weight", (width,)),
        ("norm2.bias", (width,)),
        ("mlp.0.weight", (hidden, width)),
        ("mlp.0.bias", (hidden,)),
        ("mlp.2.weight", (width, hidden)),
        ("mlp.2.bias", (width,)),
    ]:
        full_clip[f"visual.transformer.{last}.{name}"] = torch.randn(shape)
    full_clip.update(
        {
            "visual.post_norm.weight": torch.ones(width),
            "visual.post_norm.bias": torch.zeros(width),
            "visual.head": torch.randn(width, 16),
            "textual.token_embedding.weight": torch.randn(10, 8),
            "log_scale": torch.tensor(4.6),
        }
    )
    torch.save(full_clip, folder / OFFICIAL_CLIP_FILE)
    return folder


def write_tiny_model(folder: Path, mode: str = "universal", seed: int = 0, images: int = 2) -> Path:
    """A complete tiny model folder in our format, with shipped start pictures."""
    import numpy as np
    from PIL import Image

    from matrixgame_env.checkpoints import save_model

    config = tiny_model_config(mode)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(images):
        picture = rng.integers(0, 256, (48, 96, 3), dtype=np.uint8)
        Image.fromarray(picture).save(folder / f"start_{i}.png")
        config.start_images.append(f"start_{i}.png")
    return save_model(folder, config, *tiny_modules(config, seed))
