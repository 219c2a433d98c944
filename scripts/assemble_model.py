"""Assemble a model folder from the parts of others; parts not given start freshly initialised.

    python scripts/assemble_model.py OUT --vae VAE_FOLDER [--clip FOLDER] [--dit FOLDER]

The config (with the VAE's latent statistics) is the --vae folder's config.json. A part folder needs
only that part's safetensors file (e.g. config.json + vae.safetensors, the way a trained VAE travels
without its placeholder DiT). A DiT left out is an untrained placeholder, which `train dit`
initialises (the config's records of DiT training and distillation are dropped). The result is
loaded back strictly before the script ends, so a part that does not fit the config is reported
with its mismatched keys. No reward head comes along: train one on the new model (`train reward`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matrixgame_env.checkpoints import PART_FILES, build_modules, load_model, save_model  # noqa: E402
from matrixgame_env.learned_reward import REWARD_HEAD_KEY  # noqa: E402
from matrixgame_env.model_config import ModelConfig  # noqa: E402
from matrixgame_env.train.diffusion import forget_dit_training  # noqa: E402


def assemble(out: Path, vae: Path, clip: Path | None = None, dit: Path | None = None) -> Path:
    """Write OUT (config.json + the three part files) and return it after a strict reload."""
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not empty; give a new folder")
    sources = {"vae": vae, "clip": clip, "dit": dit}
    for part, folder in sources.items():
        if folder is not None and not (folder / PART_FILES[part]).is_file():
            raise SystemExit(f"--{part} {folder} holds no {PART_FILES[part]}")
    if not (vae / "config.json").is_file():
        raise SystemExit(f"--vae {vae} holds no config.json (the config with the VAE's latent statistics)")
    config = ModelConfig.load(vae)
    if dit is None:
        forget_dit_training(config)  # the DiT is a placeholder: no record of its training may remain
    config.extra.pop(REWARD_HEAD_KEY, None)  # no reward head comes along (it reads one VAE's latents)
    config.extra["assembled_from"] = {part: str(folder) if folder else "fresh" for part, folder in sources.items()}
    save_model(out, config, *build_modules(config, device="cpu"))  # the config, and fresh parts where none is given
    for part, folder in sources.items():
        if folder is not None:
            shutil.copyfile(folder / PART_FILES[part], out / PART_FILES[part])
    load_model(out, device="cpu")  # strict: every key and shape checked against the config
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="new model folder")
    parser.add_argument("--vae", type=Path, required=True, help="folder with config.json and vae.safetensors")
    parser.add_argument("--clip", type=Path, default=None, help="folder with clip.safetensors (default: fresh)")
    parser.add_argument("--dit", type=Path, default=None, help="folder with dit.safetensors (default: placeholder)")
    args = parser.parse_args(argv)
    folder = assemble(args.out, args.vae, args.clip, args.dit)
    print(f"wrote {folder}: vae from {args.vae}, clip from {args.clip or 'fresh'}, dit from {args.dit or 'fresh'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
