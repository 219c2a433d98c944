"""Assemble a model folder from the parts of others; parts not given start freshly initialised.

    python scripts/assemble_model.py OUT --vae VAE_FOLDER [--clip FOLDER] [--dit FOLDER] [--reward FOLDER]

The config (with the VAE's latent statistics) is the --vae folder's config.json. A part folder needs
only that part's safetensors file (e.g. config.json + vae.safetensors, the way a trained VAE travels
without its placeholder DiT). A DiT left out is an untrained placeholder, which `train dit`
initialises (the config's records of DiT training and distillation are dropped). The result is
loaded back strictly before the script ends, so a part that does not fit the config is reported
with its mismatched keys. A reward head comes along only with --reward: a model folder whose head
was trained on the latents of the same VAE encoder (checked by the latent statistics in both
configs); otherwise train one on the new model (`train reward`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matrixgame_env.checkpoints import PART_FILES, build_modules, load_model, save_model  # noqa: E402
from matrixgame_env.learned_reward import REWARD_HEAD_KEY, load_reward_head  # noqa: E402
from matrixgame_env.model_config import ModelConfig  # noqa: E402
from matrixgame_env.train.diffusion import forget_dit_training  # noqa: E402


def reward_settings(reward: Path, config: ModelConfig) -> dict:
    """The reward head settings of the model folder `reward`, refused where its head reads the latents
    of another VAE than `config`'s (other latent shape or statistics)."""
    if not (reward / "config.json").is_file():
        raise SystemExit(f"--reward {reward} holds no config.json (a model folder with a reward head)")
    theirs = ModelConfig.load(reward)
    settings = theirs.extra.get(REWARD_HEAD_KEY)
    if settings is None or not (reward / settings["file"]).is_file():
        raise SystemExit(f"--reward {reward} ships no reward head (config extra {REWARD_HEAD_KEY!r} and its file)")
    for key in ("z_dim", "latent_mean", "latent_std"):
        if theirs.vae.get(key) != config.vae.get(key):
            raise SystemExit(
                f"--reward {reward}: its head was trained on another VAE's latents (the configs' vae {key} "
                "differ); train one on the new model instead (matrixgame-env train reward)"
            )
    return settings


def assemble(
    out: Path, vae: Path, clip: Path | None = None, dit: Path | None = None, reward: Path | None = None
) -> Path:
    """Write OUT (config.json + the three part files, and the reward head of `reward`) and return it
    after a strict reload."""
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
    config.extra.pop(REWARD_HEAD_KEY, None)  # a reward head reads one VAE's latents: only --reward's comes along
    head = reward_settings(reward, config) if reward is not None else None
    config.extra["assembled_from"] = {part: str(folder) if folder else "fresh" for part, folder in sources.items()}
    if head is not None:
        config.extra[REWARD_HEAD_KEY] = head
        config.extra["assembled_from"]["reward_head"] = str(reward)
    save_model(out, config, *build_modules(config, device="cpu"))  # the config, and fresh parts where none is given
    for part, folder in sources.items():
        if folder is not None:
            shutil.copyfile(folder / PART_FILES[part], out / PART_FILES[part])
    if head is not None:
        shutil.copyfile(reward / head["file"], out / head["file"])
        load_reward_head(out)  # strict, as the parts below
    load_model(out, device="cpu")  # strict: every key and shape checked against the config
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="new model folder")
    parser.add_argument("--vae", type=Path, required=True, help="folder with config.json and vae.safetensors")
    parser.add_argument("--clip", type=Path, default=None, help="folder with clip.safetensors (default: fresh)")
    parser.add_argument("--dit", type=Path, default=None, help="folder with dit.safetensors (default: placeholder)")
    parser.add_argument(
        "--reward", type=Path, default=None,
        help="model folder whose reward head (trained on the same VAE's latents) comes along (default: none)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    folder = assemble(args.out, args.vae, args.clip, args.dit, args.reward)
    print(
        f"wrote {folder}: vae from {args.vae}, clip from {args.clip or 'fresh'}, dit from {args.dit or 'fresh'}"
        + (f", reward head from {args.reward}" if args.reward else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
