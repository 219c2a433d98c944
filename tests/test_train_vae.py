"""VAE training stage and the shared training machinery: loss, exact resume, time budget, model folder."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from tiny_training import VAL_FRACTION, run_cli, tiny_dataset, tiny_training_config, train

from matrixgame_env.checkpoints import load_model
from matrixgame_env.data.dataset import VideoClipDataset
from matrixgame_env.model_config import ModelConfig
from matrixgame_env.nn.reward_head import RewardHead
from matrixgame_env.nn.vae import WanVAE
from matrixgame_env.train.common import StepBatchSampler, TrainRun, warmup_cosine
from matrixgame_env.train.vae import evenly_spaced, vae_losses
from matrixgame_env.weights import read_state_dict, save_safetensors

CLIP = ["--clip-frames", "9", "--val-fraction", VAL_FRACTION, "--batch-size", "2", "--warmup-steps", "2"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory)


@pytest.fixture(scope="module")
def model_config(tmp_path_factory) -> Path:
    return tiny_training_config(tmp_path_factory.mktemp("config"))


@pytest.fixture(scope="module")
def finished_run(dataset, model_config, tmp_path_factory) -> Path:
    """OUT of an uninterrupted 6-step run (EMA on, so its state is part of what must resume)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    train("vae", "--data", str(dataset), "--model-config", str(model_config), "--out", str(out), "--steps", "6",
          "--ema", "0.9", "--stats-clips", "8", "--val-clips", "4", *CLIP)  # fmt: skip
    return out


def _checkpoint(out: Path) -> Path:
    root = out / "vae" / "checkpoints"
    return root / json.loads((root / "latest").read_text())["dir"]


def test_training_reduces_the_loss_on_a_fixed_batch(dataset) -> None:
    torch.manual_seed(0)
    clips = VideoClipDataset(dataset, clip_frames=9, val_fraction=0.5)
    video = torch.stack([clips[0]["video"], clips[20]["video"]])
    vae = WanVAE(dim=4, num_res_blocks=1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss = vae_losses(vae, video, kl_weight=1e-5, sample=False)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert sum(losses[-3:]) < 0.6 * sum(losses[:3]), losses


def test_encode_distribution_mean_is_what_encode_normalises() -> None:
    torch.manual_seed(0)
    vae = WanVAE(dim=4, num_res_blocks=1, latent_mean=[0.5] * 16, latent_std=[2.0] * 16).eval()
    video = torch.rand(2, 3, 9, 16, 32) * 2 - 1
    mu, logvar = vae.encode_distribution(video)
    assert mu.shape == logvar.shape == (2, 16, 3, 2, 4)
    torch.testing.assert_close(vae.encode(video), (mu - 0.5) / 2.0, atol=1e-5, rtol=1e-5)


def test_training_decoder_is_the_inference_decoder_without_normalisation_or_clamping() -> None:
    torch.manual_seed(0)
    vae = WanVAE(dim=4, num_res_blocks=1, latent_mean=[0.5] * 16, latent_std=[2.0] * 16).eval()
    latents = torch.randn(1, 16, 3, 2, 4)
    decoded = vae.decode_unnormalised(latents * 2.0 + 0.5)  # [B, 3, T, H, W]
    assert decoded.shape == (1, 3, 9, 16, 32) and decoded.requires_grad
    torch.testing.assert_close(decoded.detach().clamp(-1, 1).transpose(1, 2), vae.decode(latents))


def test_resume_continues_from_the_saved_step_as_if_never_interrupted(
    dataset, model_config, finished_run, tmp_path
) -> None:
    common = ["--data", str(dataset), "--model-config", str(model_config), "--out", str(tmp_path), "--steps", "6",
              "--ema", "0.9", "--stats-clips", "8", "--val-clips", "4", *CLIP]  # fmt: skip
    train("vae", *common, "--stop-after-steps", "3")
    assert _checkpoint(tmp_path).name == "step_00000003"
    partial = json.loads((tmp_path / "vae" / "result.json").read_text())  # every session writes its model folder
    assert partial["step"] == 3 and partial["finished"] is False
    config = json.loads((tmp_path / "vae" / "model" / "config.json").read_text())
    assert config["extra"]["training"]["vae"]["steps"] == 3
    train("vae", *common, "--resume")
    assert json.loads((tmp_path / "vae" / "result.json").read_text())["finished"] is True
    interrupted, uninterrupted = _checkpoint(tmp_path), _checkpoint(finished_run)
    assert interrupted.name == uninterrupted.name == "step_00000006"
    for name in ("vae.safetensors", "vae.ema.safetensors"):
        resumed, straight = read_state_dict(interrupted / name), read_state_dict(uninterrupted / name)
        assert all(torch.equal(resumed[key], straight[key]) for key in straight), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "vae" / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 6


def test_train_state_loads_with_weights_only(finished_run) -> None:
    state = torch.load(_checkpoint(finished_run) / "train_state.pt", weights_only=True)
    assert state["step"] == 6 and set(state["optimizers"]) == {"vae"} and "torch" in state["rng"]


def test_a_run_refuses_to_restart_over_a_checkpoint_without_resume(dataset, model_config, finished_run) -> None:
    status, errors = run_cli("train", "vae", "--data", str(dataset), "--model-config", str(model_config),
                             "--out", str(finished_run), "--device", "cpu", "--no-progress", *CLIP)  # fmt: skip
    assert status == 2 and "--resume" in errors


def test_minutes_budget_stops_the_session_and_saves(dataset, model_config, tmp_path) -> None:
    budget_seconds, finish_seconds = 6.0, 3.0
    started = time.monotonic()
    train("vae", "--data", str(dataset), "--model-config", str(model_config), "--out", str(tmp_path),
          "--steps", "100000", "--minutes", str(budget_seconds / 60), "--finish-minutes", str(finish_seconds / 60),
          "--stats-clips", "4", "--val-clips", "2", *CLIP)  # fmt: skip
    elapsed = time.monotonic() - started
    step = int(_checkpoint(tmp_path).name.removeprefix("step_"))
    assert 0 < step < 100000
    assert elapsed < budget_seconds + 5.0  # imports and dataset indexing come before the clock starts
    result = json.loads((tmp_path / "vae" / "result.json").read_text())
    assert result["step"] == step and result["finished"] is False
    assert (tmp_path / "vae" / "model" / "vae.safetensors").is_file()


def test_a_budget_without_time_to_finish_is_refused(dataset, model_config, tmp_path) -> None:
    status, errors = run_cli("train", "vae", "--data", str(dataset), "--model-config", str(model_config),
                             "--out", str(tmp_path), "--minutes", "1", "--finish-minutes", "1", "--device", "cpu",
                             "--no-progress", *CLIP)  # fmt: skip
    assert status == 2 and "--finish-minutes" in errors
    assert not (tmp_path / "vae").exists()


def test_finished_run_writes_a_model_folder_with_measured_latent_statistics(finished_run, dataset) -> None:
    folder = finished_run / "vae" / "model"
    model = load_model(folder, device="cpu")
    trained = read_state_dict(_checkpoint(finished_run) / "vae.ema.safetensors")
    assert all(torch.equal(model.vae.state_dict()[key], trained[key]) for key in trained)  # the EMA weights
    clips = VideoClipDataset(dataset, clip_frames=9, val_fraction=0.5)
    with torch.no_grad():  # the stage measured its statistics on 8 clips spread evenly over the training split
        video = torch.stack([clips[i]["video"] for i in evenly_spaced(len(clips), 8)])
        mu = model.vae.encode_distribution(video)[0].transpose(0, 1).flatten(1)  # [16, all values]
    torch.testing.assert_close(model.vae.latent_mean, mu.mean(dim=1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.vae.latent_std, mu.std(dim=1, correction=0), atol=1e-4, rtol=1e-4)
    assert model.config.vae["latent_mean"] == pytest.approx(model.vae.latent_mean.tolist())
    assert model.config.extra["training"]["vae"]["steps"] == 6
    assert [name for name in model.config.start_images if (folder / name).is_file()] == model.config.start_images
    result = json.loads((finished_run / "vae" / "result.json").read_text())
    assert result["psnr_split"] == "val" and result["psnr_db"] > 0


def test_step_batch_sampler_resumes_the_same_order() -> None:
    straight = iter(StepBatchSampler(num_items=7, batch_size=3, seed=1))
    batches = [next(straight) for _ in range(6)]
    resumed = iter(StepBatchSampler(num_items=7, batch_size=3, seed=1, start_batch=4))
    assert [next(resumed), next(resumed)] == batches[4:6]
    assert sorted(sum(batches[:7], [])[:7]) == list(range(7))  # the first epoch is a permutation


def test_warmup_then_cosine_learning_rate() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = warmup_cosine(optimizer, warmup_steps=4, total_steps=20, final_fraction=0.1)
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] == pytest.approx(0.2) and rates[4] == pytest.approx(1.0)
    assert rates == sorted(rates[:5]) + sorted(rates[5:], reverse=True)
    assert rates[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(15 / 16 * torch.pi)).item()))


def test_log_lines_after_the_resumed_checkpoint_are_dropped(tmp_path) -> None:
    module = torch.nn.Linear(2, 1)
    first = TrainRun(tmp_path, total_steps=10, progress=False, log_every=1)
    first.add_module("linear", module)
    for _ in range(2):
        first.keep_going()
        first.end_step(loss=1.0)
    first.save()
    first.keep_going()
    first.end_step(loss=1.0)  # logged, never saved: the resumed run redoes step 3
    resumed = TrainRun(tmp_path, total_steps=10, progress=False, resume=True)
    resumed.add_module("linear", module)
    assert resumed.resume() and resumed.step == 2
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_decoder_only_keeps_the_encoder_and_latent_space(finished_run, dataset, tmp_path) -> None:
    start = finished_run / "vae" / "model"
    train("vae", "--data", str(dataset), "--init", str(start), "--out", str(tmp_path), "--steps", "4",
          "--decoder-only", "--latent-noise", "0.1", "--edge-weight", "0.5", "--motion-weight", "1.0",
          "--val-clips", "4", *CLIP)  # fmt: skip
    before = load_model(start, device="cpu")
    after = load_model(tmp_path / "vae" / "model", device="cpu")
    old, new = before.vae.state_dict(), after.vae.state_dict()
    encoder_keys = [key for key in old if key.startswith(("encoder.", "conv1."))]
    decoder_keys = [key for key in old if key.startswith(("decoder.", "conv2."))]
    assert encoder_keys and decoder_keys
    assert all(torch.equal(old[key], new[key]) for key in encoder_keys)
    assert not all(torch.equal(old[key], new[key]) for key in decoder_keys)
    assert after.config.vae["latent_mean"] == before.config.vae["latent_mean"]
    assert after.config.vae["latent_std"] == before.config.vae["latent_std"]
    record = after.config.extra["training"]["vae"]
    assert record["steps"] == 6 and record["decoder_only"]["steps"] == 4
    assert record["decoder_only"]["latent_noise"] == 0.1 and record["decoder_only"]["motion_weight"] == 1.0
    logged = [json.loads(line) for line in (tmp_path / "vae" / "log.jsonl").read_text().splitlines()]
    assert any("motion" in line for line in logged)


def test_decoder_only_needs_a_trained_model(dataset, model_config, tmp_path) -> None:
    status, errors = run_cli("train", "vae", "--data", str(dataset), "--model-config", str(model_config),
                             "--out", str(tmp_path), "--device", "cpu", "--no-progress", "--decoder-only",
                             *CLIP)  # fmt: skip
    assert status == 2 and "--init" in errors


def test_edge_loss_charges_blur_and_ignores_a_brightness_offset() -> None:
    from matrixgame_env.train.vae import edge_loss

    sharp = torch.zeros(1, 3, 1, 8, 8)
    sharp[..., :, 4:] = 1.0  # a vertical edge
    blurred = torch.nn.functional.avg_pool3d(sharp, (1, 3, 3), stride=1, padding=(0, 1, 1), count_include_pad=False)
    assert edge_loss(sharp, sharp) == 0
    assert edge_loss(sharp + 0.25, sharp) == 0  # a constant offset has the same gradients
    # the one-column step of 1 becomes three steps of 1/3: |1/3| + |1/3 - 1| + |1/3| per row, over 7 differences
    assert edge_loss(blurred, sharp) == pytest.approx((1 / 3 + 2 / 3 + 1 / 3) / 7, rel=1e-6)


def test_motion_loss_charges_a_change_that_is_missing_and_ignores_a_brightness_offset() -> None:
    from matrixgame_env.train.vae import motion_loss, reconstruction_losses

    moving = torch.zeros(1, 3, 4, 2, 2, dtype=torch.float64)
    moving[:, :, 1:] = 0.5  # one change of 0.5 between frames 0 and 1, then none
    held = torch.zeros_like(moving)
    held[:, :, 2:] = 0.5  # the same change a frame late
    assert motion_loss(moving, moving) == 0
    assert motion_loss(moving + 0.25, moving) == 0
    # differences of held minus moving per frame pair: -0.5, +0.5, 0 -> mean absolute 1/3
    assert motion_loss(held, moving) == pytest.approx(1 / 3, rel=1e-12)
    plain = reconstruction_losses(held, moving)
    weighted = reconstruction_losses(held, moving, motion_weight=2.0)
    assert "motion" not in plain and weighted["motion"] == pytest.approx(1 / 3, rel=1e-6)
    assert weighted["loss"] - plain["loss"] == pytest.approx(2 / 3, rel=1e-6)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--latent-noise", "-0.1", "--decoder-only"], "--latent-noise must be a number >= 0, got -0.1"),
        (["--edge-weight", "nan"], "--edge-weight must be a number >= 0, got nan"),
        (["--motion-weight", "-1"], "--motion-weight must be a number >= 0, got -1.0"),
        (["--latent-noise", "0.1"], "--latent-noise applies to --decoder-only"),
        (["--gan-weight", "-1"], "--gan-weight must be a number >= 0, got -1.0"),
        (["--gan-weight", "0.1", "--disc-width", "12"], "--disc-width must be a multiple of 8"),
        (["--gan-weight", "0.1", "--gan-start", "-5"], "--gan-start must be a step >= 0"),
        (["--gan-weight", "0.1", "--disc-frames", "0"], "--disc-frames must lie in 1..--clip-frames"),
        (["--gan-weight", "0.1", "--disc-frames", "99"], "--disc-frames must lie in 1..--clip-frames"),
    ],
)
def test_bad_loss_options_are_refused(dataset, model_config, tmp_path, options, message) -> None:
    status, errors = run_cli("train", "vae", "--data", str(dataset), "--model-config", str(model_config),
                             "--out", str(tmp_path), "--device", "cpu", "--no-progress", *options,
                             *CLIP)  # fmt: skip
    assert status == 2 and message in errors
    assert not (tmp_path / "vae").exists()


# The adversarial loss


def test_patch_discriminator_gives_one_logit_per_8x8_cell_and_checks_its_width() -> None:
    from matrixgame_env.train.adversarial import PatchDiscriminator

    logits = PatchDiscriminator(16)(torch.zeros(3, 3, 96, 176))
    assert logits.shape == (3, 1, 12, 22)
    with pytest.raises(ValueError, match="multiple of 8"):
        PatchDiscriminator(12)


def test_video_windows_stack_consecutive_frames_on_the_channels() -> None:
    from matrixgame_env.train.adversarial import PatchDiscriminator, video_windows

    video = torch.randn(2, 3, 5, 8, 16, dtype=torch.float64)
    windows = video_windows(video, 2)
    assert windows.shape == (2 * 4, 6, 8, 16)
    for b in range(2):
        for t in range(4):
            expected = torch.cat([video[b, :, t], video[b, :, t + 1]])  # frame t's RGB, then frame t + 1's
            assert torch.equal(windows[b * 4 + t], expected)
    assert torch.equal(video_windows(video, 1), video.transpose(1, 2).flatten(0, 1))
    assert PatchDiscriminator(8, frames=2)(windows.float()).shape == (8, 1, 1, 2)
    with pytest.raises(ValueError, match="need clips of at least that many"):
        video_windows(video, 6)
    with pytest.raises(ValueError, match="frames per window must be an integer >= 1"):
        PatchDiscriminator(8, frames=0)


def test_hinge_losses_against_their_definitions() -> None:
    from matrixgame_env.train.adversarial import discriminator_loss, generator_loss

    real = torch.tensor([2.0, 0.5, -1.0], dtype=torch.float64)
    fake = torch.tensor([-3.0, 0.0, 0.25], dtype=torch.float64)
    # relu(1 - real) = [0, 0.5, 2]; relu(1 + fake) = [0, 1, 1.25]
    assert float(discriminator_loss(real, fake)) == pytest.approx(0.5 * (2.5 / 3 + 2.25 / 3))
    assert float(discriminator_loss(torch.full((4,), 1.0), torch.full((4,), -1.0))) == 0.0
    assert float(generator_loss(fake)) == pytest.approx(-(-3.0 + 0.0 + 0.25) / 3)


def test_the_adversary_trains_the_decoder_and_leaves_the_discriminator_alone(tmp_path) -> None:
    import argparse

    from matrixgame_env.train.vae import _Critic

    torch.manual_seed(0)
    vae = WanVAE(dim=4, num_res_blocks=1).train()
    video = torch.rand(2, 3, 5, 16, 32) * 2 - 1
    training = TrainRun(tmp_path, total_steps=1, device="cpu", progress=False)
    options = dict(gan_weight=0.5, disc_width=8, disc_lr=None, lr=1e-3, disc_frames=2)
    critic = _Critic(training, argparse.Namespace(**options))
    plain = vae_losses(vae, video, kl_weight=0.0, sample=False)
    with_gan = vae_losses(vae, video, kl_weight=0.0, sample=False, adversary=critic.adversary())
    assert set(with_gan) - set(plain) == {"gan"} and "reconstruction" in plain
    assert (
        torch.equal(plain["reconstruction"], with_gan["reconstruction"]) and not plain["reconstruction"].requires_grad
    )
    assert float((with_gan["loss"] - plain["loss"]).detach()) == pytest.approx(float(with_gan["gan"]), rel=1e-5)
    with_gan["loss"].backward()
    assert all(p.grad is None for p in critic.discriminator.parameters())
    assert all(p.requires_grad for p in critic.discriminator.parameters())
    assert vae.decoder.head[-1].weight.grad.abs().sum() > 0

    before = [p.detach().clone() for p in critic.discriminator.parameters()]
    loss = critic.train_step(video, with_gan["reconstruction"])
    assert loss > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, critic.discriminator.parameters()))


def test_gan_training_resumes_exactly_and_keeps_the_discriminator_out_of_the_model(
    dataset, model_config, tmp_path
) -> None:
    common = ["--data", str(dataset), "--model-config", str(model_config), "--steps", "4", "--gan-weight", "0.1",
              "--gan-start", "2", "--disc-width", "8", "--log-every", "1", "--stats-clips", "4", "--val-clips", "2",
              *CLIP]  # fmt: skip
    train("vae", *common, "--out", str(tmp_path / "once"))
    train("vae", *common, "--out", str(tmp_path / "twice"), "--stop-after-steps", "3")
    train("vae", *common, "--out", str(tmp_path / "twice"), "--resume")
    once, twice = _checkpoint(tmp_path / "once"), _checkpoint(tmp_path / "twice")
    for name in ("vae.safetensors", "discriminator.safetensors"):
        a, b = read_state_dict(once / name), read_state_dict(twice / name)
        assert all(torch.equal(a[key], b[key]) for key in a), name
    state = torch.load(once / "train_state.pt", weights_only=True)
    assert set(state["optimizers"]) == {"vae", "discriminator"}
    log = [json.loads(line) for line in (tmp_path / "once" / "vae" / "log.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in log if "loss" in r or "l1" in r}
    assert "gan" not in steps[2] and "disc_loss" not in steps[2]
    assert "gan" in steps[3] and "disc_loss" in steps[4]
    model = tmp_path / "once" / "vae" / "model"
    assert not any("discriminator" in path.name for path in model.iterdir())
    recorded = json.loads((model / "config.json").read_text())["extra"]["training"]["vae"]
    assert recorded["gan_weight"] == 0.1 and recorded["disc_frames"] == 1


def test_the_discriminator_can_learn_before_it_weighs_on_the_decoder(dataset, model_config, tmp_path) -> None:
    common = ["--data", str(dataset), "--model-config", str(model_config), "--steps", "5", "--gan-weight", "0.1",
              "--gan-start", "3", "--disc-start", "1", "--disc-width", "8", "--log-every", "1", "--stats-clips", "4",
              "--val-clips", "2", *CLIP]  # fmt: skip
    train("vae", *common, "--out", str(tmp_path / "once"))
    train("vae", *common, "--out", str(tmp_path / "twice"), "--stop-after-steps", "2")
    train("vae", *common, "--out", str(tmp_path / "twice"), "--resume")
    for name in ("vae.safetensors", "discriminator.safetensors"):
        a, b = (read_state_dict(_checkpoint(tmp_path / out) / name) for out in ("once", "twice"))
        assert all(torch.equal(a[key], b[key]) for key in a), name
    log = [json.loads(line) for line in (tmp_path / "once" / "vae" / "log.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in log if "l1" in r}
    assert "disc_loss" not in steps[1] and "gan" not in steps[1]  # logged step k ran at training step k - 1
    assert "disc_loss" in steps[2] and "gan" not in steps[2] and "gan" not in steps[3]
    assert "disc_loss" in steps[4] and "gan" in steps[4]
    recorded = ModelConfig.load(tmp_path / "once" / "vae" / "model").extra["training"]["vae"]
    assert recorded["gan_start"] == 3 and recorded["disc_start"] == 1


def test_a_discriminator_start_after_the_adversarial_loss_is_refused(dataset, model_config, tmp_path) -> None:
    status, errors = run_cli("train", "vae", "--data", str(dataset), "--model-config", str(model_config), "--out",
                             str(tmp_path), "--device", "cpu", "--no-progress", "--gan-weight", "0.1", "--gan-start",
                             "2", "--disc-start", "3", *CLIP)  # fmt: skip
    assert status == 2 and "--disc-start must be a step in 0..--gan-start (2), got 3" in errors


def _with_dit_and_reward_head(start: Path, folder: Path) -> Path:
    """A copy of model folder `start` whose config records DiT training and names a reward head file."""
    shutil.copytree(start, folder)
    config = ModelConfig.load(folder)
    config.extra.setdefault("training", {}).update(dit={"steps": 5}, distill={"steps": 2})
    head = RewardHead(z_dim=config.dit.get("out_dim", 16))
    save_safetensors({k: v.detach() for k, v in head.state_dict().items()}, folder / "reward_head.safetensors")
    config.extra["reward_head"] = {"file": "reward_head.safetensors", "config": head.config}
    config.save(folder / "config.json")
    return folder


def test_a_new_latent_space_drops_what_read_the_old_one(finished_run, dataset, tmp_path) -> None:
    start = _with_dit_and_reward_head(finished_run / "vae" / "model", tmp_path / "start")
    train("vae", "--data", str(dataset), "--init", str(start), "--out", str(tmp_path / "whole"), "--steps", "2",
          "--val-clips", "4", "--stats-clips", "4", *CLIP)  # fmt: skip
    whole = tmp_path / "whole" / "vae" / "model"
    config = ModelConfig.load(whole)
    assert "dit" not in config.extra["training"] and "distill" not in config.extra["training"]
    assert "reward_head" not in config.extra and not (whole / "reward_head.safetensors").exists()
    vae_record = config.extra["training"]["vae"]
    assert vae_record["steps"] == 2 and vae_record["continued_from"]["steps"] == 6  # the VAE's lineage stays
    train("vae", "--data", str(dataset), "--init", str(start), "--out", str(tmp_path / "decoder"), "--steps", "2",
          "--decoder-only", "--val-clips", "4", *CLIP)  # fmt: skip
    decoder = tmp_path / "decoder" / "vae" / "model"
    config = ModelConfig.load(decoder)
    assert config.extra["training"]["dit"] == {"steps": 5} and config.extra["training"]["distill"] == {"steps": 2}
    assert config.extra["reward_head"]["file"] == "reward_head.safetensors"
    assert (decoder / "reward_head.safetensors").read_bytes() == (start / "reward_head.safetensors").read_bytes()
