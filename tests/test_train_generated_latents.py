"""`train vae --decoder-only --generated-from MODEL`: the decoder also learns the latents MODEL generates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_training import VAL_FRACTION, run_cli, tiny_dataset, tiny_model_folder, train

from matrixgame_env.eval.fidelity import generate_clips, roll_out
from matrixgame_env.images import to_uint8_frames
from matrixgame_env.model_config import ModelConfig
from matrixgame_env.train.generated_latents import POOL_FILE, anchor_loss, latent_windows, load_pool
from matrixgame_env.weights import read_state_dict
from matrixgame_env.world.model import WorldModel

CLIP = ["--clip-frames", "9", "--val-fraction", VAL_FRACTION, "--batch-size", "2", "--warmup-steps", "2"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_model_folder(tmp_path_factory)


def _options(dataset: Path, model: Path, *extra: str) -> list[str]:
    return ["--data", str(dataset), "--init", str(model), "--decoder-only", "--generated-from", str(model),
            "--gan-weight", "0.1", "--gan-start", "0", "--disc-width", "8", "--generated-clips", "3",
            "--generated-blocks", "2", "--log-every", "1", "--val-clips", "2", *CLIP, *extra]  # fmt: skip


def test_rolled_out_latents_decode_to_the_frames_the_world_shows(model) -> None:
    world = WorldModel.from_pretrained(model, device="cpu")
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 256, (3, *world.video_size, 3), dtype=torch.uint8, generator=generator)
    keyboard = torch.randint(0, 2, (3, 21, 4), generator=generator).float()
    mouse = (torch.rand(3, 21, 2, generator=generator) - 0.5) * 0.2
    frames = generate_clips(world, starts, keyboard, mouse, batch_size=2, seed=4, progress=False)
    latents = roll_out(world, world.step_latents, 2, starts, keyboard, mouse, batch_size=2, seed=4, progress=False)
    assert latents.shape == (3, 16, 6, *world.config.latent_size)
    decoded = to_uint8_frames(world.vae.decode(latents.to(world.vae.dtype)))
    assert decoded.shape == frames.shape == (3, 21, *world.video_size, 3)
    assert (decoded.int() - frames.int()).abs().max() <= 1  # the streamed decode, all at once


def test_latent_windows_are_slices_of_the_pool_chosen_by_the_generator() -> None:
    pool = torch.randn(5, 16, 6, 2, 4)
    windows = latent_windows(pool, 7, 3, torch.Generator().manual_seed(1))
    again = latent_windows(pool, 7, 3, torch.Generator().manual_seed(1))
    assert windows.shape == (7, 16, 3, 2, 4) and torch.equal(windows, again)
    slices = [pool[c, :, s : s + 3] for c in range(5) for s in range(4)]
    assert all(any(torch.equal(window, piece) for piece in slices) for window in windows)
    with pytest.raises(ValueError, match="windows of 7 latent frames need clips of at least that many"):
        latent_windows(pool, 1, 7, torch.Generator())


def test_anchor_charges_changed_content_not_added_detail() -> None:
    torch.manual_seed(0)
    reference = torch.rand(2, 3, 5, 16, 32) * 2 - 1
    checker = (torch.arange(16)[:, None] + torch.arange(32)[None, :]) % 2 * 2 - 1  # averages to 0 over 4x4
    detailed = reference + 0.3 * checker
    assert float(anchor_loss(detailed, reference)) < 1e-6
    assert float(anchor_loss(reference + 0.3, reference)) == pytest.approx(0.3, rel=1e-5)
    assert float(anchor_loss(reference.roll(4, dims=-1), reference)) > 0.1


def test_decoder_learns_generated_latents_and_resumes_exactly(dataset, model, tmp_path) -> None:
    train("vae", *_options(dataset, model, "--steps", "4", "--anchor-weight", "0.5"), "--out", str(tmp_path / "once"))
    pool_path = tmp_path / "once" / "vae" / POOL_FILE
    pool, statistics, source = load_pool(pool_path)
    world = WorldModel.from_pretrained(model, device="cpu")
    # 3 clips asked; the train split's two 40-frame episodes hold one window of 21 frames each.
    assert pool.shape == (2, 16, 6, *world.config.latent_size) and source == str(model)
    assert statistics["latent_std"] == [float(v) for v in world.vae.config["latent_std"]]

    twice = tmp_path / "twice"
    train("vae", *_options(dataset, model, "--steps", "4", "--anchor-weight", "0.5"), "--out", str(twice),
          "--stop-after-steps", "2")  # fmt: skip
    made = (twice / "vae" / POOL_FILE).stat().st_mtime_ns
    train("vae", *_options(dataset, model, "--steps", "4", "--anchor-weight", "0.5"), "--out", str(twice), "--resume")
    assert (twice / "vae" / POOL_FILE).stat().st_mtime_ns == made  # the resumed session decodes the same pool
    checkpoints = [out / "vae" / "checkpoints" for out in (tmp_path / "once", twice)]
    latest = [root / json.loads((root / "latest").read_text())["dir"] for root in checkpoints]
    for name in ("vae.safetensors", "discriminator.safetensors"):
        a, b = (read_state_dict(folder / name) for folder in latest)
        assert all(torch.equal(a[key], b[key]) for key in a), name

    log = [json.loads(line) for line in (tmp_path / "once" / "vae" / "log.jsonl").read_text().splitlines()]
    steps = [record for record in log if "anchor" in record]
    assert len(steps) == 4 and all("gen_gan" in record and "disc_loss" in record for record in steps)
    assert all(record["anchor"] >= 0 for record in steps) and any(record["anchor"] > 0 for record in steps[1:])
    trained = ModelConfig.load(tmp_path / "once" / "vae" / "model")
    recorded = trained.extra["training"]["vae"]["decoder_only"]
    assert recorded["generated_from"] == str(model) and recorded["anchor_weight"] == 0.5
    assert recorded["generated_clips"] == 2 and recorded["generated_blocks"] == 2


def test_before_the_adversarial_loss_generated_latents_only_feed_the_discriminator(dataset, model, tmp_path) -> None:
    options = _options(dataset, model, "--steps", "3")
    options[options.index("--gan-start") + 1] = "2"
    train("vae", *options, "--disc-start", "0", "--out", str(tmp_path))
    log = [json.loads(line) for line in (tmp_path / "vae" / "log.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in log if "l1" in r}
    assert all("disc_loss" in steps[k] for k in (1, 2, 3))
    assert not any(name in steps[k] for k in (1, 2) for name in ("gan", "gen_gan", "anchor"))
    assert all(name in steps[3] for name in ("gan", "gen_gan", "anchor"))


def test_the_anchor_keeps_the_generating_model_s_own_decoding(dataset, model, tmp_path) -> None:
    """With the discriminator's weight far below the anchor's, the generated latents' decoding stays
    close to that of the generating model's decoder (here also the starting one); with the anchor off
    it moves further."""
    drift = {}
    for anchor in ("0", "50"):
        out = tmp_path / anchor
        train("vae", *_options(dataset, model, "--steps", "6", "--anchor-weight", anchor, "--lr", "3e-3"),
              "--out", str(out))  # fmt: skip
        before = WorldModel.from_pretrained(model, device="cpu").vae
        after = WorldModel.from_pretrained(out / "vae" / "model", device="cpu").vae
        pool, _, _ = load_pool(out / "vae" / POOL_FILE)
        z = before.denormalise(pool[:, :, :3])
        with torch.no_grad():
            drift[anchor] = float(anchor_loss(after.decode_unnormalised(z), before.decode_unnormalised(z)))
    assert drift["50"] < drift["0"]


@pytest.mark.parametrize(
    ("drop", "extra", "message"),
    [
        ("--gan-weight", (), "--generated-from needs --decoder-only"),
        ("--decoder-only", (), "--generated-from needs --decoder-only"),
        (None, ("--anchor-weight", "-1"), "--anchor-weight must be a number >= 0"),
        (None, ("--generated-clips", "0"), "--generated-clips and --generated-blocks must be at least 1"),
        (None, ("--generated-blocks", "1", "--clip-frames", "17"), "raise --generated-blocks"),
    ],
)
def test_bad_generated_options_are_refused(dataset, model, tmp_path, drop, extra, message) -> None:
    options = _options(dataset, model, *extra)
    if drop is not None:
        at = options.index(drop)
        del options[at : at + (2 if drop == "--gan-weight" else 1)]
    status, errors = run_cli("train", "vae", *options, "--out", str(tmp_path), "--device", "cpu", "--no-progress")
    assert status == 2 and message in errors, errors


def test_a_model_of_another_latent_space_is_refused(dataset, model, tmp_path) -> None:
    other = tmp_path / "other"
    shutil.copytree(model, other)
    config = ModelConfig.load(other)
    config.vae["latent_mean"] = [0.5] * 16
    config.save(other / "config.json")
    options = _options(dataset, model)
    options[options.index("--generated-from") + 1] = str(other)
    status, errors = run_cli("train", "vae", *options, "--out", str(tmp_path / "out"), "--device", "cpu",
                             "--no-progress")  # fmt: skip
    assert status == 2 and "works on another latent space than the --init VAE" in errors
    missing = _options(dataset, model)
    missing[missing.index("--generated-from") + 1] = str(tmp_path / "nowhere")
    status, errors = run_cli("train", "vae", *missing, "--out", str(tmp_path / "out2"), "--device", "cpu",
                             "--no-progress")  # fmt: skip
    assert status == 2 and "--generated-from: no model folder at" in errors
