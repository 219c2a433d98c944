"""scripts/assemble_model.py: a model folder from the parts of others, checked by a strict reload."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from script_module import load_script
from tiny_training import tiny_model_folder

from matrixgame_env.checkpoints import load_model
from matrixgame_env.model_config import ModelConfig
from matrixgame_env.weights import CheckpointError, read_state_dict, save_safetensors


@pytest.fixture(scope="module")
def assemble_script():
    return load_script("assemble_model")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("trained") / "model"
    shutil.copytree(tiny_model_folder(tmp_path_factory), folder)  # the shared tiny model stays as it is
    config = ModelConfig.load(folder)
    config.extra.setdefault("training", {}).update(dit={"steps": 3}, distill={"steps": 1})
    config.extra["reward_head"] = {"file": "reward_head.safetensors", "config": {"z_dim": 4}}
    config.save(folder / "config.json")
    return folder


def _vae_only(model: Path, folder: Path) -> Path:
    folder.mkdir()
    for name in ("config.json", "vae.safetensors"):
        shutil.copyfile(model / name, folder / name)
    return folder


def test_a_vae_only_folder_and_a_clip_become_a_model_with_a_placeholder_dit(assemble_script, model, tmp_path):
    vae = _vae_only(model, tmp_path / "vae")
    assert assemble_script.main([str(tmp_path / "out"), "--vae", str(vae), "--clip", str(model)]) == 0
    loaded, source = load_model(tmp_path / "out", device="cpu"), load_model(model, device="cpu")
    for part in ("vae", "clip"):
        mine, theirs = getattr(loaded, part).state_dict(), getattr(source, part).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert not all(
        torch.equal(a, b) for a, b in zip(loaded.dit.state_dict().values(), source.dit.state_dict().values())
    )
    records = loaded.config.extra["training"]
    assert "dit" not in records and "distill" not in records  # the DiT is a placeholder now
    assert loaded.config.extra["assembled_from"] == {"vae": str(vae), "clip": str(model), "dit": "fresh"}
    assert loaded.config.vae == source.config.vae  # the latent statistics come with the VAE
    assert "reward_head" not in loaded.config.extra and not (tmp_path / "out" / "reward_head.safetensors").exists()


def test_a_given_dit_keeps_its_training_record(assemble_script, model, tmp_path):
    vae = _vae_only(model, tmp_path / "vae")
    assemble_script.main([str(tmp_path / "out"), "--vae", str(vae), "--dit", str(model)])
    loaded = load_model(tmp_path / "out", device="cpu")
    assert loaded.config.extra["training"]["dit"] == {"steps": 3}
    source = read_state_dict(model / "dit.safetensors")
    assert all(torch.equal(loaded.dit.state_dict()[k], v) for k, v in source.items())


def test_a_part_that_does_not_fit_is_reported_by_its_keys(assemble_script, model, tmp_path):
    clip = tmp_path / "clip"
    clip.mkdir()
    state = read_state_dict(model / "clip.safetensors")
    name = next(iter(state))
    save_safetensors({k: v for k, v in state.items() if k != name}, clip / "clip.safetensors")
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        assemble_script.assemble(tmp_path / "out", _vae_only(model, tmp_path / "vae"), clip=clip)


def test_missing_files_and_a_used_folder_are_refused(assemble_script, model, tmp_path):
    vae = _vae_only(model, tmp_path / "vae")
    with pytest.raises(SystemExit, match="holds no clip.safetensors"):
        assemble_script.assemble(tmp_path / "a", vae, clip=vae)
    (vae / "config.json").unlink()
    with pytest.raises(SystemExit, match="holds no config.json"):
        assemble_script.assemble(tmp_path / "b", vae)
    used = tmp_path / "used"
    used.mkdir()
    (used / "note.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not empty"):
        assemble_script.assemble(used, _vae_only(model, tmp_path / "vae2"))
    assert (used / "note.txt").read_text() == "keep me"


def test_the_next_vae_in_the_repository_assembles_and_reconstructs_the_start_pictures(assemble_script, tmp_path):
    """models/next/vae-e32d16-motion (kept for training the next DiT) beside the shipped image encoder:
    a strict load, and the round trip of the shipped start pictures (real ViZDoom frames) at the
    quality its training reached (22.3 dB on held-out clips; single pictures decode sharper)."""
    import numpy as np
    from PIL import Image

    root = Path(__file__).resolve().parents[1] / "models"
    folder = assemble_script.assemble(tmp_path / "next", root / "next" / "vae-e32d16-motion", clip=root / "doom-small")
    vae = load_model(folder, device="cpu").vae
    assert (vae.config["dim"], vae.decoder_dim) == (32, 16)
    for name in ("start_0.png", "start_1.png"):
        picture = np.asarray(Image.open(root / "doom-small" / name).convert("RGB"), np.float32) / 127.5 - 1
        image = torch.from_numpy(picture).permute(2, 0, 1)[None]
        decoded = vae.decode(vae.encode_image(image))[:, 0].clamp(-1, 1)  # [B, T, 3, H, W] -> first frame
        mse = (decoded - image).pow(2).mean()
        assert float(10 * torch.log10(4 / mse)) > 20.0


def _with_reward_head(model: Path, folder: Path) -> Path:
    """A copy of `model` that ships a trained-looking reward head for its VAE's latents."""
    from matrixgame_env.nn.reward_head import RewardHead

    shutil.copytree(model, folder)
    config = ModelConfig.load(folder)
    torch.manual_seed(3)
    head = RewardHead(z_dim=config.vae["z_dim"], frames=3, width=8, depth=2)
    save_safetensors(head.state_dict(), folder / "reward_head.safetensors")
    config.extra["reward_head"] = {"file": "reward_head.safetensors", "config": head.config, "steps": 7}
    config.save(folder / "config.json")
    return folder


def test_a_reward_head_of_the_same_latent_space_comes_along_with_reward(assemble_script, model, tmp_path):
    from matrixgame_env.learned_reward import load_reward_head

    reward = _with_reward_head(model, tmp_path / "rewarded")
    vae = _vae_only(model, tmp_path / "vae")
    assert assemble_script.main([str(tmp_path / "out"), "--vae", str(vae), "--reward", str(reward)]) == 0
    head, settings = load_reward_head(tmp_path / "out")
    source = read_state_dict(reward / "reward_head.safetensors")
    assert all(torch.equal(head.state_dict()[k], v) for k, v in source.items())
    assert settings["steps"] == 7
    assert load_model(tmp_path / "out", device="cpu").config.extra["assembled_from"]["reward_head"] == str(reward)


def test_a_reward_head_of_another_latent_space_or_none_is_refused(assemble_script, model, tmp_path):
    reward = _with_reward_head(model, tmp_path / "rewarded")
    config = ModelConfig.load(reward)
    config.vae["latent_mean"] = [0.5] * config.vae["z_dim"]  # another encoder's statistics
    config.save(reward / "config.json")
    vae = _vae_only(model, tmp_path / "vae")
    with pytest.raises(SystemExit, match="another VAE's latents"):
        assemble_script.assemble(tmp_path / "a", vae, reward=reward)
    with pytest.raises(SystemExit, match="ships no reward head"):
        assemble_script.assemble(tmp_path / "b", vae, reward=vae)  # a folder without a head


def test_the_next_reward_head_in_the_repository_assembles_with_the_next_vae(assemble_script, tmp_path):
    """models/next/reward-e32d16-motion was trained on the next VAE's latents: it comes along, loads
    strictly, and reads a block of that VAE's latents."""
    from matrixgame_env.learned_reward import load_reward_head

    root = Path(__file__).resolve().parents[1] / "models"
    folder = assemble_script.assemble(
        tmp_path / "next", root / "next" / "vae-e32d16-motion", reward=root / "next" / "reward-e32d16-motion"
    )
    head, settings = load_reward_head(folder)
    assert settings["metrics"]["progress_correlation"] > 0.7
    latents = torch.randn(2, 16, 3, 12, 22)
    assert torch.isfinite(head(latents)).all()
