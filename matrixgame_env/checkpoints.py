"""Finding and loading world-model weights: our format, the official layout, the hub.

Our format is a folder with `config.json` (`ModelConfig`) and one safetensors file per part:
`dit.safetensors`, `vae.safetensors`, `clip.safetensors` (our parameter names, no prefixes).
The official Hugging Face layout (`Skywork/Matrix-Game-2.0`) holds the DiT as safetensors with a
`model.` prefix, and the VAE and CLIP as torch pickles; these are only ever read with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .model_config import ModelConfig
from .nn.clip import CLIPVisionEncoder, split_visual_state_dict
from .nn.dit import CausalDiT
from .nn.vae import WAN21_LATENT_MEAN, WAN21_LATENT_STD, WanVAE
from .weights import (
    CheckpointError,
    load_into,
    read_state_dict,
    save_safetensors,
    strip_prefix,
    validate_state_dict,
)

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
OFFICIAL_HUB_ID = "Skywork/Matrix-Game-2.0"
OFFICIAL_VAE_FILE = "Wan2.1_VAE.pth"
OFFICIAL_CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
OFFICIAL_DIT_FILES = {
    "universal": "base_distilled_model/base_distill.safetensors",
    "gta_drive": "gta_distilled_model/gta_keyboard2dim.safetensors",
    "templerun": "templerun_distilled_model/templerun_7dim_onlykey.safetensors",
}
PART_FILES = {"dit": "dit.safetensors", "vae": "vae.safetensors", "clip": "clip.safetensors"}


@dataclass
class LoadedModel:
    """The three networks of a world model and its config."""

    config: ModelConfig
    dit: CausalDiT
    vae: WanVAE
    clip: CLIPVisionEncoder
    folder: Path | None = None  # where the weights (and any shipped start images) were read


def available_presets() -> list[str]:
    return sorted(p.parent.name for p in MODELS_DIR.glob("*/config.json"))


def preset_dir(name: str) -> Path:
    folder = MODELS_DIR / name
    if not (folder / "config.json").exists():
        raise ValueError(f"unknown model {name!r}; presets: {available_presets()}, or give a folder or hub id")
    return folder


def is_our_format(folder: Path) -> bool:
    return (folder / "config.json").exists() and all((folder / f).exists() for f in PART_FILES.values())


def is_official_layout(folder: Path) -> bool:
    return (folder / OFFICIAL_VAE_FILE).exists() or any((folder / f).exists() for f in OFFICIAL_DIT_FILES.values())


def build_modules(
    config: ModelConfig, device: torch.device | str = "meta"
) -> tuple[CausalDiT, WanVAE, CLIPVisionEncoder]:
    """The three networks of a config, uninitialised on `device` (meta by default: no memory)."""
    with torch.device(device):
        dit = CausalDiT.from_config(config.dit)
        vae = WanVAE.from_config(config.vae)
        clip = CLIPVisionEncoder.from_config(config.clip)
    return dit, vae, clip


def load_model(
    source: str | os.PathLike,
    *,
    mode: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    download: bool = True,
    config: ModelConfig | None = None,
) -> LoadedModel:
    """Load a world model from a preset name, a folder (ours or the official layout) or a hub id.

    `mode` picks the DiT of an official folder (universal, gta_drive, templerun); `config`
    overrides the preset config of an official folder (for other sizes); `dtype` is the dtype of
    all parts (default bf16 on GPU, float32 on CPU).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    folder, config = _resolve(source, mode, download, config)
    if is_our_format(folder):
        official = None  # our files: read one part at a time, each just before it is loaded
    elif (folder / "config.json").exists() and not is_official_layout(folder):
        missing = sorted(name for name in PART_FILES.values() if not (folder / name).exists())
        raise CheckpointError(
            f"{folder} has a config.json but lacks {missing}; a model folder holds config.json and "
            f"{sorted(PART_FILES.values())} (a `train vae` run's model folder has all three)"
        )
    else:
        official = read_official_parts(folder, config)
    dit, vae, clip = build_modules(config, device="meta")
    modules = {"dit": dit, "vae": vae, "clip": clip}
    for part, module in modules.items():
        # Allocated where they run in their final dtype (no float32 copy of the model in host memory);
        # each stored tensor is cast once and copied in, and a part's file is let go once it is loaded.
        state = read_state_dict(folder / PART_FILES[part]) if official is None else official.pop(part)
        module.to(dtype=dtype).to_empty(device=device)
        load_into(module, state, what=f"{config.name} {part}", source=folder / PART_FILES[part])
        del state  # before the next part's file is read
        _reset_nonpersistent_buffers(module, config, part)
    return LoadedModel(config=config, dit=dit.eval(), vae=vae.eval(), clip=clip.eval(), folder=folder)


def read_official_parts(folder: Path, config: ModelConfig) -> dict[str, dict[str, torch.Tensor]]:
    """State dicts (our names) of an official Matrix-Game-2.0 folder."""
    dit_file = config.dit_file or OFFICIAL_DIT_FILES.get(config.mode)
    needed = {"dit": folder / dit_file, "vae": folder / OFFICIAL_VAE_FILE, "clip": folder / OFFICIAL_CLIP_FILE}
    missing = [str(p.relative_to(folder)) for p in needed.values() if not p.exists()]
    if missing:
        raise CheckpointError(
            f"{folder} is missing {missing} of the official {config.mode} layout "
            f"(expected {[str(p.relative_to(folder)) for p in needed.values()]})"
        )
    dit = strip_prefix(read_state_dict(needed["dit"]), "model.", source=needed["dit"])
    vae = read_state_dict(needed["vae"])
    clip, _dropped = split_visual_state_dict(read_state_dict(needed["clip"]), num_layers=config.clip.get("num_layers"))
    return {"dit": dit, "vae": vae, "clip": clip}


def convert(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    mode: str | None = None,
    config: ModelConfig | None = None,
) -> Path:
    """Write a model (official layout, hub id or preset) in our format: config.json + safetensors."""
    folder, config = _resolve(source, mode, True, config)
    parts = (
        read_official_parts(folder, config)
        if not is_our_format(folder)
        else {part: read_state_dict(folder / name) for part, name in PART_FILES.items()}
    )
    dit, vae, clip = build_modules(config)
    for part, module in {"dit": dit, "vae": vae, "clip": clip}.items():
        validate_state_dict(module, parts[part], what=f"{config.name} {part}", source=folder)
    out = Path(destination)
    out.mkdir(parents=True, exist_ok=True)
    for part, name in PART_FILES.items():
        save_safetensors(parts[part], out / name, metadata={"format": "matrixgame-env", "part": part})
    config.save(out / "config.json")
    return out


def _resolve(
    source: str | os.PathLike, mode: str | None, download: bool, config: ModelConfig | None = None
) -> tuple[Path, ModelConfig]:
    """(folder holding the weights, its config) for a preset name, folder or hub id."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "config.json").exists() and not is_official_layout(path):
            return path, config or ModelConfig.load(path)
        if is_official_layout(path):
            return path, config or _official_config(path, mode)
        raise CheckpointError(
            f"{path} is neither our format (config.json + {sorted(PART_FILES.values())}) "
            f"nor the official layout ({OFFICIAL_VAE_FILE}, {OFFICIAL_CLIP_FILE}, a DiT .safetensors)"
        )
    if (MODELS_DIR / text / "config.json").exists():
        folder = MODELS_DIR / text
        config = ModelConfig.load(folder)
        if is_our_format(folder):
            return folder, config
        if config.hub_id is None:
            raise CheckpointError(f"preset {text!r} ships no weights and names no hub id")
        return _download(config.hub_id, config, download), config
    if "/" in text and not path.exists():
        config = config or _official_config(None, mode)
        return _download(text, config, download), config
    raise CheckpointError(
        f"cannot find model {text!r}: not a folder, not a preset ({available_presets()}), not a hub id"
    )


def _official_config(folder: Path | None, mode: str | None) -> ModelConfig:
    if mode is None and folder is not None:
        found = [m for m, f in OFFICIAL_DIT_FILES.items() if (folder / f).exists()]
        if len(found) == 1:
            mode = found[0]
        elif len(found) > 1:
            raise CheckpointError(f"{folder} holds the DiTs of {found}: pass mode= one of them")
    if mode not in OFFICIAL_DIT_FILES:
        raise CheckpointError(f"official models need a mode in {sorted(OFFICIAL_DIT_FILES)}, got {mode!r}")
    return ModelConfig.load(MODELS_DIR / mode)


def _download(hub_id: str, config: ModelConfig, allowed: bool) -> Path:
    """Fetch the files of one mode from the hub into the hub cache, with progress bars."""
    manual = f"huggingface-cli download {hub_id} --local-dir Matrix-Game-2.0, then pass that folder"
    if not allowed:
        raise CheckpointError(f"{config.name} weights are not on this machine; download them with: {manual}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise CheckpointError(
            f"downloading {hub_id} needs huggingface_hub (pip install huggingface_hub), or download by hand: {manual}"
        ) from error
    patterns = [config.dit_file or OFFICIAL_DIT_FILES[config.mode], OFFICIAL_VAE_FILE, OFFICIAL_CLIP_FILE]
    try:
        return Path(snapshot_download(hub_id, allow_patterns=patterns))
    except Exception as error:  # network errors come in many types; all mean the same to the user
        raise CheckpointError(
            f"could not download {hub_id} ({type(error).__name__}: {error}); offline? download by hand: {manual}"
        ) from error


def _reset_nonpersistent_buffers(module: torch.nn.Module, config: ModelConfig, part: str) -> None:
    """`to_empty` leaves non-persistent buffers (the VAE's latent statistics) uninitialised."""
    if part == "vae":
        mean = config.vae.get("latent_mean", WAN21_LATENT_MEAN)
        std = config.vae.get("latent_std", WAN21_LATENT_STD)
        module.latent_mean.copy_(torch.tensor(mean, dtype=torch.float32))  # cast to the buffer's dtype
        module.latent_std.copy_(torch.tensor(std, dtype=torch.float32))


def save_model(
    folder: str | os.PathLike, config: ModelConfig, dit: CausalDiT, vae: WanVAE, clip: CLIPVisionEncoder
) -> Path:
    """Write a model in our format (float32 weights unless the modules hold another dtype)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for part, module in {"dit": dit, "vae": vae, "clip": clip}.items():
        state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        save_safetensors(state, out / PART_FILES[part], metadata={"format": "matrixgame-env", "part": part})
    config.save(out / "config.json")
    return out
