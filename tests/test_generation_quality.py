"""What the bundled model generates, checked against what it is conditioned on.

The first latent frame of a world is conditioned on the start picture's own latent (first-frame mask
on, image-condition latents), so the first generated frame must come back as the VAE's reconstruction
of the start picture. Training must build, from a clip's first frame, exactly the inputs the streaming
sampler builds from the same picture. And the VAE, which bounds every frame's quality, must keep more
of a picture than an 8x-downsampled copy of it does: PSNR alone hides that on dark Doom frames.
And the model must read its actions: turning the mouse right or left turns the view that way.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from matrixgame_env.eval.idm import InverseDynamicsModel, Predictions, clip_windows, load_idm
from matrixgame_env.images import fit_images
from matrixgame_env.nn.vae import WanVAE
from matrixgame_env.train.conditions import ClipBatch, build_conditions
from matrixgame_env.train.forcing import DiffusionForcing
from matrixgame_env.world.condition import ImageLatents, first_frame_mask
from matrixgame_env.world.model import WorldModel
from matrixgame_env.world.state import WorldState

FORWARD = torch.tensor([[1.0, 0.0, 0.0, 0.0]])  # W held for the block
STILL = torch.tensor([[0.0, 0.0]])


@pytest.fixture(scope="module")
def world() -> WorldModel:
    return WorldModel.from_pretrained("doom-small", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def start(world: WorldModel) -> tuple[np.ndarray, ImageLatents, torch.Tensor]:
    """The first shipped start picture, its image-condition latents and its image-encoder tokens
    (encoded once: the image condition takes most of the time on a CPU)."""
    picture = np.asarray(Image.open(world.start_image_paths()[0]).convert("RGB"))
    return (picture, *world.encode_start(picture))


def _state(world: WorldModel, image: ImageLatents, tokens: torch.Tensor) -> WorldState:
    """What `world.start(picture, seed=0)` returns, from the picture's encodings."""
    state = world.sampler.start(image, tokens, seed=0)
    state.decoder_cache = world.vae.new_decoder_cache(1)
    return state


def _psnr(a: torch.Tensor, b: torch.Tensor, peak: float) -> float:
    """PSNR in dB of two tensors of values in a range of `peak`, in float64."""
    return float(10 * torch.log10(peak**2 / (a.double() - b.double()).pow(2).mean()))


def _vae_reconstruction(vae: WanVAE, pixels: torch.Tensor) -> torch.Tensor:
    """Pictures [B, 3, H, W] in [-1, 1] -> decode(encode(picture)) [B, 3, H, W]: the path of latent frame 0."""
    with torch.no_grad():
        return vae.decode(vae.encode_image(pixels))[:, 0]


def test_first_generated_frame_is_the_vae_reconstruction_of_the_start_picture(world, start):
    """Latent frame 0 of the first block reproduces the start picture's latent (up to a tenth of its
    variance), and its decoded video frame is the VAE's own reconstruction of the picture. Wrong mask
    channels, unnormalised image latents, timesteps in sigma units or swapped condition channels each
    push the latent error to 0.15-0.98 and the frame to 30 dB or less (shipped model: 0.0049, 41.4 dB; the
    previous release 0.0023, 44.2 dB)."""
    _, image, tokens = start
    latents = world.step_latents(_state(world, image, tokens), FORWARD, STILL)
    target = image.latents[:, :, 0]
    error = float((latents[:, :, 0] - target).pow(2).mean())
    assert error < 0.1 * float(target.var()), f"latent frame 0 misses the start picture's latent: MSE {error:.4f}"

    # The decoder is causal: video frame 0 depends on latent frame 0 alone.
    generated = world.decode(_state(world, image, tokens), latents[:, :, :1])[:, 0].float()
    reconstruction = world.decode(_state(world, image, tokens), target[:, :, None])[:, 0].float()
    psnr = _psnr(generated, reconstruction, 255.0)
    assert psnr > 36.0, f"generated frame 0 is {psnr:.1f} dB from the VAE reconstruction of the start picture"


def test_training_builds_the_streaming_inputs_of_the_first_block_from_a_start_picture(world, start):
    """From a clip whose first frame is the start picture, the training path (build_conditions, all
    frames noised to t = 1000, block-causal mask) gives the flow the sampler's first step computes:
    the same mask and image-condition latents, the same image-encoder tokens (picture resized for the
    encoder), the same action windows and timesteps, at the real model's sizes."""
    picture, image, tokens = start
    sampler = world.sampler
    frames = sampler.config.frames_per_block
    video_frames = sampler.video_frames_for_block(_state(world, image, tokens))
    keyboard = FORWARD[:, None].expand(1, video_frames, 4).clone()
    keyboard[:, video_frames // 2 :, 3] = 1  # turn right half-way through: actions vary within the block
    mouse = torch.zeros(1, video_frames, 2)
    mouse[:, 2:, 1] = 0.1
    noise = torch.randn(
        1, world.dit.config.out_dim, frames, *world.config.latent_size, generator=torch.Generator().manual_seed(3)
    )

    flows = []
    hook = world.dit.register_forward_hook(lambda module, inputs, output: flows.append(output))
    guidance = sampler.config.action_guidance
    sampler.set_action_guidance(1.0)  # the first DiT pass is then the one with the actions, as in training
    try:
        sampler.step(
            _state(world, image, tokens), keyboard, mouse, noise=noise, renoise=[noise] * (len(sampler.timesteps) - 1)
        )
    finally:
        hook.remove()
        sampler.set_action_guidance(guidance)

    batch = ClipBatch(
        latents=torch.zeros_like(noise),
        keyboard=keyboard,
        mouse=mouse,
        first_frame=torch.from_numpy(picture.copy())[None],
    )
    forcing = DiffusionForcing(sampler.scheduler, frames, sampler.window_frames)
    with torch.no_grad():
        conditions = build_conditions(batch, world.dit.config, world.clip, world.vae)
        mask_channels = conditions.cond.shape[1] - image.latents.shape[1]
        expected_mask = first_frame_mask(1, mask_channels, 0, frames, *world.config.latent_size)
        torch.testing.assert_close(conditions.cond[:, :mask_channels], expected_mask, rtol=0, atol=0)
        # The same encoder on inputs of other lengths: oneDNN picks other kernels (float32 rounding, ~2e-6).
        torch.testing.assert_close(conditions.cond[:, mask_channels:], image.frames(0, frames), rtol=0, atol=1e-5)
        torch.testing.assert_close(conditions.visual_context, tokens, rtol=0, atol=1e-5)
        noisy = forcing.noise(batch.latents, noise, torch.zeros(1, frames, dtype=torch.long))
        assert noisy.timestep.eq(sampler.timesteps[0]).all(), noisy.timestep
        flow = world.dit(
            noisy.x_t,
            conditions.cond,
            noisy.timestep,
            frame_mask=forcing.frame_mask(frames),
            **conditions.model_kwargs(),
        )
    torch.testing.assert_close(flow, flows[0], rtol=0, atol=1e-4)


def _downsampled_copy(pixels: torch.Tensor, factor: int) -> torch.Tensor:
    """Each factor x factor patch replaced by its mean, then bilinear back to full size: a picture
    that keeps 3 numbers per patch, where the VAE latent keeps 16."""
    small = F.avg_pool2d(pixels.double(), factor)
    return F.interpolate(small, size=pixels.shape[-2:], mode="bilinear", align_corners=False)


@pytest.mark.xfail(
    raises=AssertionError,
    strict=True,
    reason="the shipped VAE (encoder 32 wide, 2,803 steps, then a sharpened decoder) reconstructs the start "
    "pictures from 3.8 dB below to 0.02 dB above an 8x-downsampled copy, where 2 dB above is asked (the "
    "previous one, 1,400 steps: 1.1-3.7 dB below); "
    "remove this mark once a VAE that beats it ships",
)
def test_vae_keeps_more_of_each_start_picture_than_an_8x_downsampled_copy(world):
    """decode(encode(picture)) must beat the 8x average-pooled, re-upsampled picture by 2 dB on every
    shipped start picture. Plain PSNR cannot tell: Doom frames are dark, so a blur already scores
    23-33 dB. The VAE compresses 8x in space with 16 latent channels, so a useful one keeps detail
    that a 3-channel 8x downsample loses."""
    pixels = fit_images(world.start_image_paths(), world.video_size)
    reconstruction = _vae_reconstruction(world.vae, pixels)
    baseline = _downsampled_copy(pixels, world.vae.spatial_factor)
    vae_db = [_psnr(reconstruction[i], pixels[i], 2.0) for i in range(len(pixels))]
    blur_db = [_psnr(baseline[i], pixels[i], 2.0) for i in range(len(pixels))]
    report = "; ".join(
        f"picture {i}: VAE {v:.2f} dB, downsampled copy {b:.2f} dB" for i, (v, b) in enumerate(zip(vae_db, blur_db))
    )
    assert min(v - b for v, b in zip(vae_db, blur_db)) > 2.0, report


@pytest.fixture(scope="module")
def judge(world: WorldModel) -> InverseDynamicsModel:
    """The inverse-dynamics model shipped with doom-small (0.90 keys, 0.91 yaw direction on real frames)."""
    return load_idm(world.folder / "eval" / "idm")


def _judged_rollouts(
    world: WorldModel, judge: InverseDynamicsModel, actions: dict[str, tuple[list[float], float]], blocks: int = 3
) -> dict[str, tuple[Predictions, torch.Tensor]]:
    """For each named action (keyboard, yaw), held for `blocks` blocks from every shipped start picture
    with seeds 0 and 1: the judge's reading of every window of frames, and the frames [B, T, H, W, 3].
    (One batch per action: on CPUs that is faster than one batch of all of them.)"""
    paths = world.start_image_paths() * 2
    seeds = [0] * (len(paths) // 2) + [1] * (len(paths) // 2)
    readings = {}
    for name, (keyboard, yaw) in actions.items():
        state = world.start(paths, seed=seeds)
        keys = torch.tensor([keyboard], dtype=torch.float32).expand(len(paths), -1)
        mouse = torch.tensor([[0.0, yaw]]).expand(len(paths), -1)
        frames = torch.cat([world.step(state, keys, mouse) for _ in range(blocks)], dim=1)
        length = frames.shape[1]
        windows, _, _ = clip_windows(
            frames, keys[:, None].expand(-1, length, -1), mouse[:, None].expand(-1, length, -1), judge.config.context
        )
        readings[name] = (judge.predict(windows), frames)
    return readings


def test_the_bundled_model_turns_and_walks_as_told(world, judge):
    """From every shipped start picture, three blocks turning right (yaw +0.1, 4 degrees per frame),
    turning left, walking forward and standing: the shipped inverse-dynamics model reads each turn
    in its own direction on most windows and almost never in the other, and reads walking far more
    often when W is held. The session-5 release read right turns as right on 54 % of the windows,
    session 6 on 78 %, session 7 on 82 %, the release of 2026-12-05 on 99 % (left turns 95 %, W held
    0.96 against 0.56 without), the release of 2026-12-06 on 98 % (left 93 %, W held 0.99 against
    0.64 without), that of 2026-12-06b on 100 % (left 95 %, W held 0.98 against 0.29 without), that of
    2026-12-07 on 100 % (left 97 %, W held 0.96 against 0.29 without)."""
    still = [0.0, 0.0, 0.0, 0.0]
    rollouts = _judged_rollouts(
        world,
        judge,
        {"right": (still, 0.1), "left": (still, -0.1), "walk": ([1.0, 0.0, 0.0, 0.0], 0.0), "stand": (still, 0.0)},
    )
    shares = {}
    for turn in ("right", "left"):
        counts = torch.bincount(rollouts[turn][0].yaw, minlength=3).double() / len(rollouts[turn][0].yaw)
        shares[turn] = dict(zip(("left", "none", "right"), counts.tolist()))
    report = f"yaw read as left / none / right: {shares}"
    for turn, opposite in (("right", "left"), ("left", "right")):
        assert shares[turn][turn] > 0.85, f"a {turn} turn is read as {turn} on too few windows; {report}"
        assert shares[turn][opposite] < 0.05, f"a {turn} turn is read as {opposite}; {report}"
    apart = (rollouts["right"][1][:, -1].double() - rollouts["left"][1][:, -1].double()).abs().mean()
    assert apart > 2.0, f"turning right and left end {apart:.2f} grey levels apart"
    walking, standing = (rollouts[name][0].keys[:, 0].double().mean() for name in ("walk", "stand"))
    assert walking > 0.9 and walking - standing > 0.25, (
        f"forward read on {walking:.2f} of windows with W held, {standing:.2f} without"
    )
