"""Diffusion forcing: the batch the DiT is trained on is what streaming inference feeds it, the loss
goes down, and the stage stops on its budget, resumes exactly and writes a checked model folder."""

import argparse
import json
import time

import pytest
import torch
from tiny_clips import block_bounds, random_clips, write_latent_dataset
from tiny_model import tiny_model_config, tiny_modules, write_tiny_model

from matrixgame_env.checkpoints import build_modules
from matrixgame_env.nn.scheduler import FlowMatchScheduler
from matrixgame_env.train import diffusion
from matrixgame_env.train.common import TrainRun
from matrixgame_env.train.conditions import build_conditions, start_pixels
from matrixgame_env.train.forcing import DiffusionForcing, NoiseMix
from matrixgame_env.weights import read_state_dict
from matrixgame_env.world.model import WorldModel
from matrixgame_env.world.sampler import SamplerConfig, StreamingSampler

CONFIG = tiny_model_config()
LATENT = CONFIG.latent_size


def _forcing(mix=None):
    return DiffusionForcing(FlowMatchScheduler(5.0), frames_per_block=3, window_frames=6, mix=mix)


def test_training_batch_of_a_clip_gives_the_streaming_prediction_of_its_last_block():
    """Clean context frames at t=0 and a noisy last block at t=1000: the block-causal training forward
    of the clip's conditions (mask, image latents, image tokens, action windows, per-frame timesteps)
    predicts what the streaming sampler predicts for that block at its first step."""
    dit, vae, clip = tiny_modules(CONFIG)
    sampler = StreamingSampler(dit, SamplerConfig(), latent_size=LATENT)
    batch = random_clips(CONFIG, batch=2, frames=12, seed=1)
    pixels = start_pixels(batch.first_frame)
    with torch.no_grad():
        image = vae.encode_image_condition(pixels, 4096).distinct_latents
        state = sampler.start(image, clip(pixels))
    bounds = block_bounds(4)
    context = [sampler.step(state, batch.keyboard[:, lo:hi], batch.mouse[:, lo:hi]) for lo, hi in bounds[:3]]
    noise = torch.randn(2, 16, 3, *LATENT)
    flows = []
    hook = dit.register_forward_hook(lambda module, inputs, output: flows.append(output))
    lo, hi = bounds[3]
    sampler.step(state, batch.keyboard[:, lo:hi], batch.mouse[:, lo:hi], noise=noise, renoise=[noise, noise])
    hook.remove()

    batch.latents[:, :, :9] = torch.cat(context, dim=2)
    forcing = _forcing()
    clean = (torch.arange(12) < 9).expand(2, 12)
    index = torch.zeros(2, 12, dtype=torch.long)  # table index 0: t = 1000, sigma = 1
    full_noise = torch.cat([torch.randn(2, 16, 9, *LATENT), noise], dim=2)
    with torch.no_grad():
        conditions = build_conditions(batch, dit.config, clip, vae)
        noisy = forcing.noise(batch.latents, full_noise, index, clean)
        flow = dit(
            noisy.x_t, conditions.cond, noisy.timestep, frame_mask=forcing.frame_mask(12), **conditions.model_kwargs()
        )
    torch.testing.assert_close(flow[:, :, 9:], flows[0], rtol=0, atol=1e-4)


def test_precomputed_image_latents_equal_the_online_image_condition():
    dit, vae, clip = tiny_modules(CONFIG)
    batch = random_clips(CONFIG, batch=2, frames=6)
    with torch.no_grad():
        online = build_conditions(batch, dit.config, clip, vae)
        batch.image_latents = vae.encode_image_condition(start_pixels(batch.first_frame), 6).latents(6)
        stored = build_conditions(batch, dit.config, clip)
    assert torch.equal(online.cond, stored.cond)
    assert online.cond[:, :4, 0].eq(1).all() and online.cond[:, :4, 1:].eq(0).all()


def test_block_noise_gives_one_level_per_block():
    index, clean = _forcing(NoiseMix(per_block=1.0, uniform=0.0, clean_context=0.0)).sample_levels(64, 12, "cpu")
    blocks = index.view(64, 4, 3)
    assert torch.equal(blocks, blocks[:, :, :1].expand(64, 4, 3)) and not clean.any()


def test_clean_context_is_a_prefix_of_whole_blocks_that_carries_no_loss():
    forcing = _forcing(NoiseMix(per_block=0.0, uniform=0.0, clean_context=1.0))
    index, clean = forcing.sample_levels(64, 12, "cpu")
    clean_frames = clean.sum(dim=1)
    assert (clean_frames % 3 == 0).all() and clean_frames.min() >= 3 and clean_frames.max() <= 9
    assert torch.equal(clean, torch.arange(12)[None, :] < clean_frames[:, None])
    x0, noise = torch.randn(64, 16, 12, *LATENT), torch.randn(64, 16, 12, *LATENT)
    noisy = forcing.noise(x0, noise, index, clean)
    frames = clean[:, None, :, None, None].expand_as(x0)
    assert torch.equal(noisy.x_t[frames], x0[frames])
    assert noisy.timestep[clean].eq(0).all() and noisy.weight[clean].eq(0).all() and noisy.weight[~clean].gt(0).any()


def test_a_few_diffusion_forcing_steps_reduce_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    dit, vae, clip = build_modules(CONFIG, device="cpu")
    diffusion.initialise_weights(dit)
    batch = random_clips(CONFIG, batch=4, frames=6, seed=2)
    forcing = _forcing()
    index, clean = forcing.sample_levels(4, 6, "cpu", torch.Generator().manual_seed(3))
    noisy = forcing.noise(batch.latents, torch.randn(batch.latents.shape), index, clean)
    optimizer = torch.optim.Adam([*dit.parameters(), *clip.parameters()], lr=2e-3)
    losses = []
    for _ in range(12):
        conditions = build_conditions(batch, dit.config, clip, vae)
        loss = forcing.loss(dit, batch.latents, conditions, noisy=noisy).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_fresh_initialisation_scales_the_mouse_inputs_and_zeroes_the_action_outputs():
    torch.manual_seed(0)
    dit, _, _ = build_modules(CONFIG, device="cpu")
    diffusion.initialise_weights(dit)
    actions = [block.action_model for block in dit.blocks if block.action_model is not None]
    assert actions
    dim = dit.config.dim
    for action in actions:
        weight = action.mouse_mlp[0].weight
        ratio = weight[:, dim:].abs().max() / weight[:, :dim].abs().max()
        bound = (6 / sum(weight.shape)) ** 0.5  # xavier-uniform bound of the whole layer
        assert weight[:, :dim].abs().max() <= bound
        assert weight[:, dim:].abs().max() <= bound / diffusion.TYPICAL_MOUSE
        assert 5 < ratio < 15, ratio
        assert not action.proj_mouse.weight.any() and not action.proj_keyboard.weight.any()


def test_parameter_groups_put_the_action_modules_at_their_own_rate():
    dit, _, clip = build_modules(CONFIG, device="cpu")
    groups = diffusion.parameter_groups(dit, 1e-4, 5.0, (clip,))
    action_ids = {id(p) for name, p in dit.named_parameters() if ".action_model." in name}
    assert action_ids and [group["lr"] for group in groups] == [1e-4, 5e-4]
    assert {id(p) for p in groups[1]["params"]} == action_ids
    every = [*dit.parameters(), *clip.parameters()]
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in every)
    with pytest.raises(diffusion.StageError, match="action-lr-mult"):
        diffusion.parameter_groups(dit, 1e-4, 0.0)


def test_action_gain_is_zero_for_a_model_whose_action_outputs_are_zero_and_positive_otherwise():
    from matrixgame_env.train.sampling_check import action_gain

    config = tiny_model_config()
    world = WorldModel(*tiny_modules(config), config)
    batch = random_clips(config, batch=4, frames=6, seed=3)
    forcing = _forcing()
    gain = action_gain(world, forcing, [batch])
    assert gain is not None and gain != 0.0
    with torch.no_grad():
        for block in world.dit.blocks:
            if block.action_model is not None:
                block.action_model.proj_mouse.weight.zero_()
    # The mouse is ignored now: swapping only the mouse changes nothing, swapping the keys still does.
    assert action_gain(world, forcing, [batch], parts=("mouse",)) == 0.0
    keyboard_gain = action_gain(world, forcing, [batch], parts=("keyboard",))
    assert keyboard_gain is not None and keyboard_gain != 0.0
    assert action_gain(world, forcing, [batch]) == pytest.approx(keyboard_gain, rel=1e-6)
    with torch.no_grad():
        for block in world.dit.blocks:
            if block.action_model is not None:
                block.action_model.proj_keyboard.weight.zero_()
    assert action_gain(world, forcing, [batch]) == 0.0
    assert action_gain(world, forcing, [random_clips(config, batch=1, frames=6)]) is None


# The stage


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny model folder (as `train vae` leaves it) and clips of 6 latent frames encoded by its VAE."""
    root = tmp_path_factory.mktemp("diffusion_inputs")
    model = write_tiny_model(root / "vae_model")
    data = write_latent_dataset(root / "encode", CONFIG, {"train": 6, "val": 2}, frames=6)
    return model, data


def _args(inputs, out, *extra):
    parser = argparse.ArgumentParser()
    diffusion.add_arguments(parser)
    model, data = inputs
    return parser.parse_args(
        ["--data", str(data), "--init", str(model), "--out", str(out), "--device", "cpu", "--workers", "0",
         "--no-progress", "--batch-size", "2", "--log-every", "1", "--check-clips", "2", "--check-blocks", "2",
         "--warmup-steps", "1", *extra]
    )  # fmt: skip


def _log(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def test_stage_resumed_after_two_steps_equals_four_steps_in_one_session(inputs, tmp_path):
    no_check = ("--check-clips", "0")
    diffusion.run(_args(inputs, tmp_path / "once", "--steps", "4", *no_check))
    diffusion.run(_args(inputs, tmp_path / "twice", "--steps", "4", "--stop-after-steps", "2", *no_check))
    diffusion.run(_args(inputs, tmp_path / "twice", "--steps", "4", "--resume", *no_check))
    once, twice = (tmp_path / name / "dit" for name in ("once", "twice"))
    for part in ("dit", "clip"):
        a = read_state_dict(once / "model" / f"{part}.safetensors")
        b = read_state_dict(twice / "model" / f"{part}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), part
    losses = [[r["loss"] for r in _log(folder) if "loss" in r] for folder in (once, twice)]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_stage_writes_a_model_folder_that_streams_and_logs_the_check(inputs, tmp_path):
    folder = diffusion.run(_args(inputs, tmp_path, "--steps", "2"))
    world = WorldModel.from_pretrained(folder, device="cpu")
    assert world.config.extra["training"]["dit"] == {"steps": 2, "finished": True}
    frames = world.step(world.start(world.start_image_paths()[0], seed=0))
    assert frames.shape == (1, 9, *CONFIG.video_size, 3)
    check = [r for r in _log(tmp_path / "dit") if "val_flow_mse" in r][-1]
    assert check["step"] == 2 and len(check["generation_mse_per_block"]) == 2
    assert check["val_flow_mse"] > 0 and check["generation_mse"] > 0
    assert isinstance(check["action_gain"], float)
    assert isinstance(check["keyboard_gain"], float) and isinstance(check["mouse_gain"], float)


def test_a_run_from_a_trained_dit_keeps_its_training_record(inputs, tmp_path):
    first = diffusion.run(_args(inputs, tmp_path / "first", "--steps", "2", "--check-clips", "0"))
    second = diffusion.run(_args((first, inputs[1]), tmp_path / "second", "--steps", "1", "--check-clips", "0"))
    record = WorldModel.from_pretrained(second, device="cpu").config.extra["training"]["dit"]
    assert record == {"steps": 1, "finished": True, "continued_from": {"steps": 2, "finished": True}}


def test_fresh_dit_starts_a_new_dit_on_the_folders_vae_and_forgets_the_old_dits_records(inputs, tmp_path):
    first = diffusion.run(_args(inputs, tmp_path / "first", "--steps", "2", "--check-clips", "0"))
    config = json.loads((first / "config.json").read_text())
    config["extra"]["training"]["distill"] = {"steps": 5}  # as a distilled student's folder has
    config["extra"]["training"]["vae"] = {"steps": 7}
    (first / "config.json").write_text(json.dumps(config))
    second = diffusion.run(
        _args((first, inputs[1]), tmp_path / "second", "--steps", "1", "--lr", "1e-12", "--fresh-dit",
              "--check-clips", "0")
    )  # fmt: skip
    records = WorldModel.from_pretrained(second, device="cpu").config.extra["training"]
    assert records == {"dit": {"steps": 1, "finished": True}, "vae": {"steps": 7}}
    trained, fresh = (read_state_dict(folder / "dit.safetensors") for folder in (first, second))
    assert trained["head.head.weight"].abs().max() > 0  # two steps moved the zero-initialised output
    assert fresh["head.head.weight"].abs().max() < 1e-9  # a new DiT, one step at a negligible rate
    old_vae, new_vae = (read_state_dict(folder / "vae.safetensors") for folder in (first, second))
    assert all(torch.equal(old_vae[k], new_vae[k]) for k in old_vae)


def test_stage_stops_by_itself_within_its_minutes(inputs, tmp_path):
    minutes, finish_minutes = 0.25, 0.1
    started = time.monotonic()
    diffusion.run(_args(inputs, tmp_path, "--steps", "100000", "--minutes", str(minutes),
                        "--finish-minutes", str(finish_minutes), "--check-clips", "0"))  # fmt: skip
    elapsed = time.monotonic() - started
    folder = tmp_path / "dit"
    steps = json.loads((folder / "checkpoints" / "latest").read_text())["step"]
    assert 0 < steps < 100000
    assert elapsed < minutes * 60
    assert _log(folder)[-1]["step"] == steps
    assert (folder / "model" / "dit.safetensors").exists()


def test_compile_warm_up_leaves_the_random_state_and_the_gradients_as_they_were(tmp_path):
    dit, _, clip = build_modules(CONFIG, device="cpu")
    training = TrainRun(tmp_path, total_steps=1, device="cpu", progress=False)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    diffusion.warm_up(training, dit, clip, _forcing(), random_clips(CONFIG, batch=2, frames=6, image_latents=True))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in [*dit.parameters(), *clip.parameters()])
