"""Stage `vae`: train the causal video VAE of a model config on recorded clips.

    matrixgame-env train vae --data data/doom --out runs/doom --minutes 9 [--resume]

Each step encodes clips of 1 + 4k frames with the causal chunked encoder, samples the posterior,
decodes with the (non-streaming) decoder and minimises L1 + MSE + kl_weight * KL (+ an edge loss and,
with `--gan-weight`, a patch discriminator's adversarial loss: see `adversarial.py`; with `--decoder-only
--generated-from MODEL` the decoder also learns to render MODEL's generated latents: see
`generated_latents.py`). Every session ends
(`--finish-minutes` are kept for it) by measuring the per-channel mean and std of the posterior means on
training clips (with `--decoder-only` the --init model's statistics stay),
stores them as the config's `vae.latent_mean` / `latent_std` (so the DiT sees unit-variance latents),
reports reconstruction PSNR on the val split through the inference path (`encode` -> `decode`), and
writes OUT/vae/model/: the trained VAE, the other parts from `--init` or freshly initialised, and a
few start pictures from the data.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..checkpoints import load_model
from ..data.dataset import VideoClipDataset, evenly_spaced
from ..learned_reward import REWARD_HEAD_KEY
from ..model_config import ModelConfig
from ..nn.vae import WAN21_LATENT_MEAN, WAN21_LATENT_STD, WanVAE
from . import generated_latents
from .action_judge import ActionJudge
from .action_judge import describe as describe_judge
from .adversarial import PatchDiscriminator, discriminator_loss, generator_loss, video_windows, width_problem
from .common import (
    StageError,
    TrainRun,
    adamw,
    add_optimizer_arguments,
    add_session_arguments,
    existing_dir,
    export_model,
    initial_model,
    warmup_cosine,
)
from .diffusion import forget_dit_training

STAGE = "vae"
START_PICTURES = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `matrixgame-env train vae`."""
    # Batch 32 in bf16: about 80 clips (0.4 s) a step on an H100 at 96x176, 1300 steps per 9-minute session.
    add_session_arguments(parser, batch_size=32)
    add_optimizer_arguments(parser, steps=10_000, lr=3e-4)
    parser.add_argument("--clip-frames", type=int, default=17, help="video frames per training clip, 1 + 4k")
    parser.add_argument("--kl-weight", type=float, default=1e-5, help="weight of the mean KL per latent value")
    parser.add_argument("--no-sample", action="store_true", help="decode the posterior mean instead of a sample")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of episodes held out (dataset split)")
    parser.add_argument("--stats-clips", type=int, default=256, help="training clips for the latent statistics")
    parser.add_argument("--val-clips", type=int, default=64, help="val clips for the reconstruction PSNR")
    parser.add_argument(
        "--decoder-only",
        action="store_true",
        help="train only the decoder of the --init model on its frozen encoder's latents; the latent space and "
        "its statistics stay as they are, so a DiT trained on them keeps working",
    )
    parser.add_argument(
        "--latent-noise", type=float, default=0.0,
        help="with --decoder-only: Gaussian noise (in units of each channel's latent std) added to the latents, so "
        "the decoder learns to render imperfect latents such as a DiT's",
    )  # fmt: skip
    parser.add_argument("--edge-weight", type=float, default=0.0, help="weight of an L1 loss on spatial gradients")
    parser.add_argument(
        "--motion-weight", type=float, default=0.0,
        help="weight of an L1 loss on frame-to-frame changes (0: none); as a decoder fine-tune it made turns harder "
        "to read (models/doom-small/README.md)",
    )  # fmt: skip
    parser.add_argument(
        "--gan-weight", type=float, default=0.0,
        help="weight of the adversarial loss of a patch discriminator over frames (0: none; e.g. 0.1 against blur)",
    )  # fmt: skip
    parser.add_argument("--gan-start", type=int, default=500, help="step from which the adversarial loss applies")
    parser.add_argument(
        "--disc-start", type=int, default=None,
        help="step from which the discriminator trains (default: --gan-start); earlier than --gan-start, it learns "
        "real from decoded before its judgement weighs on the decoder",
    )  # fmt: skip
    parser.add_argument("--disc-lr", type=float, default=None, help="discriminator learning rate (default: --lr)")
    parser.add_argument("--disc-width", type=int, default=32, help="channels of the discriminator's first layer")
    parser.add_argument(
        "--disc-frames",
        type=int,
        default=1,
        help="consecutive frames the discriminator judges together (1: each frame alone; 2 or more: their motion too)",
    )
    parser.add_argument(
        "--generated-from", default=None, metavar="MODEL",
        help="with --decoder-only and --gan-weight: a model folder whose DiT works on these latents (e.g. a distilled "
        "student); the decoder also learns to render the latents it generates (see train/generated_latents.py)",
    )  # fmt: skip
    parser.add_argument("--generated-clips", type=int, default=256, help="clips in the pool of generated latents")
    parser.add_argument("--generated-blocks", type=int, default=4, help="blocks generated per clip of the pool")
    parser.add_argument(
        "--anchor-weight", type=float, default=1.0,
        help="with --generated-from: weight of the L1 loss that keeps the generated latents' decoding, averaged over "
        "4x4 pixels, that of MODEL's own decoder",
    )  # fmt: skip
    parser.add_argument(
        "--action-judge", default=None, metavar="IDM",
        help="an inverse-dynamics model saved by `matrixgame-env eval` (--idm-out): frozen, it reads the decoded "
        "clips, and --action-weight times its loss against the recorded actions is added (train/action_judge.py); "
        "use another judge than the one eval scores with",
    )  # fmt: skip
    parser.add_argument("--action-weight", type=float, default=0.0, help="weight of the --action-judge loss")
    parser.add_argument(
        "--reference-weight", type=float, default=0.0,
        help="weight of an L1 loss, on pixels and on their spatial differences (edges), between the decoding and "
        "the --init model's (a frozen copy): with --decoder-only, its decoding of the same latents; otherwise its "
        "own round trip of the same clips. Above 1 (the L1 to the true frames) the loss is least at the starting "
        "model's frames, so a fine-tune (e.g. with --action-judge) changes only what its other losses pay for and "
        "keeps that model's sharpness (0: none)",
    )  # fmt: skip
    parser.add_argument(
        "--finish-minutes", type=float, default=1.0,
        help="minutes of --minutes kept for measuring and writing the model folder, which every session ends "
        "with (default: 1)",
    )  # fmt: skip


Adversary = Callable[[torch.Tensor], torch.Tensor]


def vae_losses(
    vae: WanVAE,
    video: torch.Tensor,
    kl_weight: float,
    sample: bool = True,
    edge_weight: float = 0.0,
    adversary: Adversary | None = None,
    motion_weight: float = 0.0,
    action: Adversary | None = None,
    reference: WanVAE | None = None,
    reference_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Training losses of a batch of clips [B, 3, T, H, W] in [-1, 1].

    Returns "loss" (to minimise) = l1 + mse + kl_weight * kl + edge_weight * edge + motion_weight * motion
    (see `edge_loss`, `motion_loss`), and its parts: "l1", "mse" (pixel means), "kl" (mean KL per latent
    value of the unnormalised posterior against N(0, 1)), "psnr" (dB, 0..1 range) and "motion" when
    weighted, and the detached decoded clips as "reconstruction". With `adversary` (decoded clips ->
    weighted generator loss) its value is added to "loss" and reported as "gan"; likewise `action` (decoded
    clips -> the weighted action judge's loss, see train/action_judge.py) as "action"; with `reference` (a
    frozen VAE), reference_weight * (L1 + edge loss) to its round trip of the clips (its posterior means
    decoded) as "reference".
    """
    with torch.no_grad():
        referenced = reference is not None and reference_weight > 0
        kept = reference.decode_unnormalised(reference.encode_distribution(video)[0]) if referenced else None
    mu, logvar = vae.encode_distribution(video)
    z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if sample else mu
    decoded = vae.decode_unnormalised(z)
    losses = reconstruction_losses(decoded, video, edge_weight, adversary, motion_weight, action)
    _add_reference_term(losses, decoded, kept, reference_weight)
    mu, logvar = mu.float(), logvar.float()
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    losses["loss"] = losses["loss"] + kl_weight * kl
    losses["kl"] = kl.detach()
    return losses


def decoder_losses(
    vae: WanVAE,
    video: torch.Tensor,
    latent_noise: float = 0.0,
    edge_weight: float = 0.0,
    adversary: Adversary | None = None,
    motion_weight: float = 0.0,
    action: Adversary | None = None,
    reference: WanVAE | None = None,
    reference_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Losses of the decoder alone: the frozen encoder's posterior means (plus `latent_noise` times each
    channel's latent std of Gaussian noise) decoded and compared with the clips [B, 3, T, H, W] in [-1, 1].

    Returns "loss" = l1 + mse + edge_weight * edge + motion_weight * motion (+ the adversary's and the
    judge's, + reference_weight * (L1 + edge loss) to `reference`'s decoding of the same latents), and "l1", "mse",
    "psnr" (and "motion", "gan", "action", "reference", "reconstruction") as `vae_losses`.
    """
    with torch.no_grad():
        mu, _ = vae.encode_distribution(video)
        if latent_noise > 0:
            std = torch.as_tensor(vae.config["latent_std"], dtype=mu.dtype, device=mu.device).view(1, -1, 1, 1, 1)
            mu = mu + latent_noise * std * torch.randn_like(mu)
        kept = reference.decode_unnormalised(mu) if reference is not None and reference_weight > 0 else None
    decoded = vae.decode_unnormalised(mu)
    losses = reconstruction_losses(decoded, video, edge_weight, adversary, motion_weight, action)
    _add_reference_term(losses, decoded, kept, reference_weight)
    return losses


def _add_reference_term(
    losses: dict[str, torch.Tensor], decoded: torch.Tensor, kept: torch.Tensor | None, weight: float
) -> None:
    """Adds weight * (L1 + edge loss) between the `decoded` clips and a reference's frames `kept` to
    losses["loss"], and the term as "reference"; nothing when `kept` is None."""
    if kept is None:
        return
    decoded, kept = decoded.float(), kept.float()
    held = (decoded - kept).abs().mean() + edge_loss(decoded, kept)
    losses["loss"] = losses["loss"] + weight * held
    losses["reference"] = held.detach()


def reconstruction_losses(
    reconstruction: torch.Tensor,
    video: torch.Tensor,
    edge_weight: float = 0.0,
    adversary: Adversary | None = None,
    motion_weight: float = 0.0,
    action: Adversary | None = None,
) -> dict[str, torch.Tensor]:
    """ "loss" = l1 + mse + edge_weight * edge + motion_weight * motion (+ adversary(reconstruction)
    + action(reconstruction)) of a decoded video against the clips, and "l1", "mse", "psnr" (detached), all
    in float32; "motion" too when weighted; "gan" with `adversary`, "action" with `action`; the detached
    "reconstruction" (for the discriminator)."""
    reconstruction = reconstruction.float()
    target = video.to(reconstruction)
    error = reconstruction - target
    l1 = error.abs().mean()
    mse = error.pow(2).mean()
    losses = {
        "loss": l1 + mse + edge_weight * edge_loss(reconstruction, target),
        "l1": l1.detach(),
        "mse": mse.detach(),
        "psnr": psnr(reconstruction.detach().clamp(-1, 1), target),
        "reconstruction": reconstruction.detach(),
    }
    if motion_weight > 0:
        motion = motion_loss(reconstruction, target)
        losses["loss"] = losses["loss"] + motion_weight * motion
        losses["motion"] = motion.detach()
    if adversary is not None:
        gan = adversary(reconstruction)
        losses["loss"] = losses["loss"] + gan
        losses["gan"] = gan.detach()
    if action is not None:
        judged = action(reconstruction)
        losses["loss"] = losses["loss"] + judged
        losses["action"] = judged.detach()
    return losses


def edge_loss(video: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L1 difference of the horizontal and vertical pixel differences of two videos [B, C, T, H, W]:
    unlike L1 or MSE alone it charges a blurred edge as much as a moved one."""
    dx = (video.diff(dim=-1) - target.diff(dim=-1)).abs().mean()
    dy = (video.diff(dim=-2) - target.diff(dim=-2)).abs().mean()
    return dx + dy


def motion_loss(video: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L1 difference of the frame-to-frame changes of two videos [B, C, T, H, W]. The decoder makes
    4 frames from each latent frame by two temporal doublings, and L1 or MSE alone let it spread the
    motion between frames of one pair (measured: the judge reads turns there less often); this charges
    a change that is missing as much as a wrong pixel. Measured as a decoder fine-tune it shrinks the
    changes it cannot place, so it is off by default."""
    return (video.diff(dim=2) - target.diff(dim=2)).abs().mean()


def psnr(video: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of videos in [-1, 1], on the 0..1 scale (a range of 2 here)."""
    mse = (video.float() - target.float()).pow(2).mean().clamp(min=1e-12)
    return 10.0 * torch.log10(4.0 / mse)


@torch.no_grad()
def latent_statistics(
    vae: WanVAE, clips: Dataset, indices: Sequence[int], batch_size: int
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior means mu (unnormalised) over the clips `indices`."""
    total = torch.zeros(vae.z_dim, dtype=torch.float64)
    total_sq = torch.zeros(vae.z_dim, dtype=torch.float64)
    count = 0
    for batch in _batches(clips, indices, batch_size):
        mu, _ = vae.encode_distribution(batch.to(vae.device))
        values = mu.double().transpose(0, 1).flatten(1).cpu()  # [z_dim, B * F * h * w]
        total += values.sum(dim=1)
        total_sq += values.pow(2).sum(dim=1)
        count += values.shape[1]
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp(min=1e-12).sqrt()
    return mean.tolist(), std.tolist()


@torch.no_grad()
def reconstruction_psnr(vae: WanVAE, clips: Dataset, indices: Sequence[int], batch_size: int) -> float:
    """Mean PSNR (dB, 0..1 range) of `decode(encode(clip))`, the path the world model uses."""
    values = []
    for batch in _batches(clips, indices, batch_size):
        video = batch.to(vae.device)
        decoded = vae.decode(vae.encode(video)).transpose(1, 2)  # [B, 3, T, H, W]
        values.append(float(psnr(decoded, video.to(decoded))))
    return float(np.mean(values))


def run(args: argparse.Namespace) -> Path:
    """Run (or continue) the stage; every session ends by writing OUT/vae/model from the weights reached."""
    data = existing_dir(args.data, "--data", "record one with: matrixgame-env record --out DIR --minutes N")
    _check_loss_options(args)
    if args.minutes <= args.finish_minutes:
        raise StageError(f"--minutes {args.minutes} leaves no time for training after --finish-minutes")
    training = TrainRun.from_args(args, STAGE, minutes=args.minutes - args.finish_minutes)
    config, dit, vae, clip, source = initial_model(args.init, args.model_config)
    train_clips, val_clips = _open_splits(data, config, args)
    if args.decoder_only:
        _freeze_encoder(vae, args.init)
    reference = _frozen_copy(vae).to(training.device) if args.reference_weight > 0 else None
    vae.to(training.device).train()
    optimizer = adamw(vae.parameters(), args.lr, args.weight_decay)  # adamw skips the frozen encoder
    training.add_module("vae", vae, ema_decay=args.ema)
    training.add_optimizer("vae", optimizer, warmup_cosine(optimizer, args.warmup_steps, args.steps))
    critic = _Critic(training, args) if args.gan_weight > 0 else None
    judge = _action_judge(args, config, train_clips, training.device)
    generated = _Generated(training, args, vae, data) if args.generated_from else None
    training.resume()
    if not training.finished:
        batches = training.batches(train_clips, args.batch_size, args.workers)
        sample = not args.no_sample

        def step(
            video: torch.Tensor, adversary: Adversary | None, latents: torch.Tensor | None, actions: dict | None
        ) -> dict[str, torch.Tensor]:
            action = None if actions is None else _weighted_judge(judge, args.action_weight, actions)
            if not args.decoder_only:
                return vae_losses(vae, video, args.kl_weight, sample, args.edge_weight, adversary, args.motion_weight,
                                  action, reference, args.reference_weight)  # fmt: skip
            losses = decoder_losses(vae, video, args.latent_noise, args.edge_weight, adversary, args.motion_weight,
                                    action, reference, args.reference_weight)  # fmt: skip
            if latents is not None:
                losses = generated.add_losses(losses, latents, adversary)
            return losses

        losses_of = training.data_parallel(step, vae)
        disc_start = args.gan_start if args.disc_start is None else args.disc_start
        while training.keep_going():
            batch = next(batches)
            video = batch["video"].to(training.device, non_blocking=True)
            actions = None if judge is None else {name: batch[name] for name in ("keyboard", "mouse")}
            judged = critic is not None and training.step >= disc_start
            adversary = critic.adversary() if judged and training.step >= args.gan_start else None
            latents = generated.batch(args.batch_size) if generated is not None and judged else None
            with training.autocast():
                losses = losses_of(video, adversary, latents, actions)
            grad_norm = training.optimize(losses.pop("loss"), "vae")
            reconstruction = losses.pop("reconstruction")
            decoded_generated = losses.pop("generated", None)
            if judged:
                fakes = reconstruction if decoded_generated is None else torch.cat([reconstruction, decoded_generated])
                losses["disc_loss"] = critic.train_step(video, fakes)
            training.end_step(**losses, grad_norm=grad_norm)
        training.save()
    folder = training.folder / "model"
    if training.is_main:  # rank 0 measures and writes the model folder
        pool_clips = len(generated.pool) if generated is not None else None
        folder = _finish(training, config, dit, training.weights("vae"), clip, source, train_clips, val_clips, args,
                         pool_clips)  # fmt: skip
    if not training.finished:
        training.message(f"stopped at step {training.step}/{training.total_steps}; continue with --resume")
    training.close()
    return folder


class _Critic:
    """The patch discriminator of `--gan-weight`, registered with the run (so checkpoints and resume
    include it and its optimizer); it is not part of the model folder."""

    def __init__(self, training: TrainRun, args: argparse.Namespace) -> None:
        self.training = training
        self.weight = args.gan_weight
        self.discriminator = PatchDiscriminator(args.disc_width, args.disc_frames).to(training.device).train()
        self.optimizer = adamw(self.discriminator.parameters(), args.disc_lr or args.lr, 0.0, betas=(0.5, 0.9))
        training.add_module("discriminator", self.discriminator)
        training.add_optimizer("discriminator", self.optimizer)
        self._losses_of = training.data_parallel(self._loss, self.discriminator)

    def adversary(self) -> Adversary:
        """Decoded clips -> weighted generator loss; the discriminator's weights get no gradient from it."""

        def weighted_generator_loss(reconstruction: torch.Tensor) -> torch.Tensor:
            self.discriminator.requires_grad_(False)
            try:
                windows = video_windows(reconstruction, self.discriminator.frames)
                return self.weight * generator_loss(self.discriminator(windows))
            finally:
                self.discriminator.requires_grad_(True)

        return weighted_generator_loss

    def train_step(self, video: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
        """One discriminator step on the real clips and the (detached) decoded ones, which may be more
        (reconstructions, then decoded generated latents); returns its loss."""
        with self.training.autocast():
            loss = self._losses_of(video, decoded)
        self.training.optimize(loss, "discriminator")
        return loss.detach()

    def _loss(self, video: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
        clips = torch.cat([video.to(decoded), decoded])
        logits = self.discriminator(video_windows(clips, self.discriminator.frames))
        real, fake = logits.split([len(logits) * len(video) // len(clips), len(logits) * len(decoded) // len(clips)])
        return discriminator_loss(real, fake)


class _Generated:
    """`--generated-from`: the pool of the model's generated latents (made once per run, kept in the run's
    folder), the model's own decoder (frozen) for the anchor, and their losses."""

    def __init__(self, training: TrainRun, args: argparse.Namespace, vae: WanVAE, data: Path) -> None:
        self.training, self.args, self.vae = training, args, vae
        self.frames = (args.clip_frames - 1) // 4 + 1  # latent frames of a training clip
        if self.frames > 3 * args.generated_blocks:
            raise StageError(f"--clip-frames {args.clip_frames} needs {self.frames} latent frames; clips of "
                             f"{args.generated_blocks} blocks have {3 * args.generated_blocks}: raise "
                             "--generated-blocks")  # fmt: skip
        own = _latent_statistics_of(vae.config)
        if _latent_statistics_of(ModelConfig.load(Path(args.generated_from) / "config.json").vae) != own:
            raise StageError(
                f"--generated-from {args.generated_from} works on another latent space than the --init VAE "
                "(their latent statistics differ): give a model whose DiT was trained on these latents"
            )
        path = training.folder / generated_latents.POOL_FILE
        if path.exists():
            self.pool, statistics, _ = generated_latents.load_pool(path)
            if _latent_statistics_of(statistics) != own:
                raise StageError(f"{path} holds latents of another latent space: delete it to generate a new pool")
        else:  # every process makes the same pool (seeded); the main one keeps it
            training.message(f"generating {args.generated_clips} clips of {args.generated_blocks} blocks with "
                             f"{args.generated_from} for the decoder")  # fmt: skip
            self.pool, statistics = generated_latents.generate_latent_pool(
                args.generated_from, data, args.generated_clips, args.generated_blocks, args.val_fraction,
                training.device, seed=args.seed, progress=training.show_progress,
            )  # fmt: skip
            if training.is_main:
                generated_latents.save_pool(path, self.pool, statistics, str(args.generated_from))
            if len(self.pool) < args.generated_clips:
                training.message(f"the train split holds {len(self.pool)} windows of {args.generated_blocks} "
                                 f"blocks: the pool has {len(self.pool)} clips")  # fmt: skip
        # The anchor's reference: the decoder the generating model ships with (the one its video was judged through).
        reference = load_model(args.generated_from, device=training.device, dtype=torch.float32).vae
        self.reference = reference.eval().requires_grad_(False)

    def batch(self, count: int) -> torch.Tensor:
        """This step's windows of generated latents (unnormalised, on the device), different per process."""
        seed = int(
            np.random.SeedSequence([self.args.seed, self.training.step, self.training.rank]).generate_state(1)[0]
        )
        windows = generated_latents.latent_windows(self.pool, count, self.frames, torch.Generator().manual_seed(seed))
        return self.reference.denormalise(windows.to(self.training.device))

    def add_losses(
        self, losses: dict[str, torch.Tensor], latents: torch.Tensor, adversary: Adversary | None
    ) -> dict[str, torch.Tensor]:
        """`losses` plus the adversary's loss on the decoded generated latents ("gen_gan") and the anchor
        ("anchor", weighted by --anchor-weight) in "loss"; the detached decodings as "generated". Without
        an adversary (before --gan-start) the latents are only decoded, for the discriminator."""
        if adversary is None:
            with torch.no_grad():
                return {**losses, "generated": self.vae.decode_unnormalised(latents).float()}
        decoded = self.vae.decode_unnormalised(latents)
        with torch.no_grad():
            reference = self.reference.decode_unnormalised(latents)
        gan = adversary(decoded)
        anchor = generated_latents.anchor_loss(decoded, reference)
        losses["loss"] = losses["loss"] + gan + self.args.anchor_weight * anchor
        return {**losses, "gen_gan": gan.detach(), "anchor": anchor.detach(), "generated": decoded.detach().float()}


def _latent_statistics_of(values: Mapping[str, Any]) -> dict[str, list[float]]:
    """The latent mean and std of a VAE config (Wan 2.1's where it gives none, as `WanVAE` takes them)."""
    defaults = {"latent_mean": WAN21_LATENT_MEAN, "latent_std": WAN21_LATENT_STD}
    return {name: [float(v) for v in values.get(name, default)] for name, default in defaults.items()}


def _check_loss_options(args: argparse.Namespace) -> None:
    for name in ("latent_noise", "edge_weight", "motion_weight", "gan_weight", "anchor_weight", "action_weight",
                 "reference_weight"):  # fmt: skip
        value = getattr(args, name)
        if not value >= 0:  # also catches NaN
            raise StageError(f"--{name.replace('_', '-')} must be a number >= 0, got {value}")
    if args.gan_start < 0:
        raise StageError(f"--gan-start must be a step >= 0, got {args.gan_start}")
    if args.disc_start is not None and not 0 <= args.disc_start <= args.gan_start:
        raise StageError(f"--disc-start must be a step in 0..--gan-start ({args.gan_start}), got {args.disc_start}")
    if args.disc_lr is not None and not args.disc_lr > 0:
        raise StageError(f"--disc-lr must be a positive number, got {args.disc_lr}")
    if problem := width_problem(args.disc_width):
        raise StageError(f"--disc-width {problem}")
    if not 1 <= args.disc_frames <= args.clip_frames:
        raise StageError(f"--disc-frames must lie in 1..--clip-frames ({args.clip_frames}), got {args.disc_frames}")
    if (args.action_weight > 0) != (args.action_judge is not None):
        raise StageError("--action-judge and --action-weight > 0 go together (the judge's loss needs a weight, and "
                         "a weight needs a judge: an IDM folder saved by `matrixgame-env eval --idm-out`)")  # fmt: skip
    if args.reference_weight > 0 and args.init is None:
        raise StageError("--reference-weight needs --init: a trained model whose VAE the run keeps to (its frames "
                         "are the reference)")  # fmt: skip
    if args.latent_noise > 0 and not args.decoder_only:
        raise StageError("--latent-noise applies to --decoder-only training (the full VAE samples its own posterior)")
    if args.generated_from is not None:
        if not (args.decoder_only and args.gan_weight > 0):
            raise StageError(
                "--generated-from needs --decoder-only (the latent space its DiT works on must stay) and --gan-weight "
                "> 0 (the discriminator judges the generated latents' decoding: there is no true video for them)"
            )
        if not Path(args.generated_from).is_dir():
            raise StageError(f"--generated-from: no model folder at {args.generated_from}")
        if args.generated_clips < 1 or args.generated_blocks < 1:
            raise StageError(
                f"--generated-clips and --generated-blocks must be at least 1, got {args.generated_clips} "
                f"and {args.generated_blocks}"
            )


def _weighted_judge(judge: ActionJudge, weight: float, actions: Mapping[str, torch.Tensor]) -> Adversary:
    """Decoded clips -> `weight` times the judge's loss against this batch's recorded actions."""

    def judged(decoded: torch.Tensor) -> torch.Tensor:
        return weight * judge.loss(decoded, actions["keyboard"], actions["mouse"])

    return judged


def _action_judge(
    args: argparse.Namespace, config: ModelConfig, clips: VideoClipDataset, device: torch.device
) -> ActionJudge | None:
    """The frozen IDM of --action-judge, checked against the stage's frames, keys and clip length."""
    if not args.action_weight > 0:
        return None
    try:
        judge = ActionJudge.load(args.action_judge, device)
    except (OSError, ValueError, RuntimeError) as error:  # no IDM there, another format, or mismatched weights
        raise StageError(f"--action-judge {args.action_judge}: {error}") from error
    problem = judge.check(config.video_size, clips[0]["keyboard"].shape[-1], args.clip_frames)
    if problem:
        raise StageError(f"--action-judge {args.action_judge} {problem}")
    return judge


def _frozen_copy(vae: WanVAE) -> WanVAE:
    """The --init VAE as it starts, frozen and in eval mode: the VAE --reference-weight keeps to."""
    reference = copy.deepcopy(vae).eval()
    reference.requires_grad_(False)
    return reference


def _freeze_encoder(vae: WanVAE, init: object) -> None:
    """Stops gradients into the encoder half (encoder, conv1) for --decoder-only; needs a trained --init."""
    if init is None:
        raise StageError("--decoder-only needs --init: a model folder whose trained encoder defines the latents")
    for module in (vae.encoder, vae.conv1):
        module.requires_grad_(False)


def _open_splits(
    data: Path, config: ModelConfig, args: argparse.Namespace
) -> tuple[VideoClipDataset, VideoClipDataset | None]:
    options = {"clip_frames": args.clip_frames, "val_fraction": args.val_fraction, "size": config.video_size}
    try:
        train_clips = VideoClipDataset(data, split="train", **options)
    except (FileNotFoundError, ValueError) as error:
        raise StageError(str(error)) from error
    try:
        val_clips = VideoClipDataset(data, split="val", **options)
    except ValueError:  # the same options worked for "train": the val split is empty
        val_clips = None
    return train_clips, val_clips


def _finish(
    training: TrainRun,
    config: ModelConfig,
    dit: torch.nn.Module,
    vae: WanVAE,
    clip: torch.nn.Module,
    source: Path | None,
    train_clips: VideoClipDataset,
    val_clips: VideoClipDataset | None,
    args: argparse.Namespace,
    pool_clips: int | None = None,
) -> Path:
    """Latent statistics, val PSNR, start pictures, and the model folder (`pool_clips`: the clips of the
    pool of generated latents, with --generated-from)."""
    vae.eval()
    if args.decoder_only:  # the latent space is the --init model's: keep its statistics
        mean, std = list(vae.config["latent_mean"]), list(vae.config["latent_std"])  # also where the config gives none
    else:
        stats_indices = evenly_spaced(len(train_clips), args.stats_clips)
        mean, std = latent_statistics(vae, train_clips, stats_indices, args.batch_size)
        vae.set_latent_statistics(mean, std)
        config.vae.update(latent_mean=mean, latent_std=std)
    measured_on = val_clips if val_clips is not None else train_clips
    psnr_db = reconstruction_psnr(vae, measured_on, evenly_spaced(len(measured_on), args.val_clips), args.batch_size)
    split = "val" if val_clips is not None else "train (no val clips)"
    result = {
        "step": training.step,
        "finished": training.finished,
        "psnr_db": psnr_db,
        "psnr_split": split,
        "latent_mean": mean,
        "latent_std": std,
    }
    training.log(val_psnr=psnr_db)
    pictures = {} if args.decoder_only else _start_pictures(measured_on, START_PICTURES)
    if pictures:
        config.start_images = list(pictures)
    record = {"steps": training.step, "psnr_db": round(psnr_db, 3)}
    if args.gan_weight > 0:
        record.update(gan_weight=args.gan_weight, gan_start=args.gan_start, disc_frames=args.disc_frames)
        if args.disc_start is not None:
            record.update(disc_start=args.disc_start)
    if args.motion_weight > 0:
        record.update(motion_weight=args.motion_weight)
    if args.reference_weight > 0:
        record.update(reference_weight=args.reference_weight)
    if args.action_weight > 0:
        judge_folder, judge_hash = describe_judge(args.action_judge)  # the file read at the start, not loaded again
        record.update(action_weight=args.action_weight, action_judge=judge_folder, action_judge_sha256=judge_hash)
    if args.generated_from is not None:
        record.update(generated_from=str(args.generated_from), generated_clips=pool_clips,
                      generated_blocks=args.generated_blocks, anchor_weight=args.anchor_weight)  # fmt: skip
    previous = config.extra.setdefault("training", {}).get(STAGE)
    if args.decoder_only:
        record = {**(previous or {}), "decoder_only": {**record, "latent_noise": args.latent_noise,
                                                       "edge_weight": args.edge_weight}}  # fmt: skip
    else:
        if previous and args.init is not None:
            record["continued_from"] = previous  # the --init VAE's own training, which these steps add to
        dropped = forget_latent_readers(config)
        if dropped:
            training.message(f"a new latent space: dropped {dropped} of the old one from the model folder")
    config.extra.setdefault("training", {})[STAGE] = record
    folder = export_model(training.folder / "model", config, dit, vae.cpu().float(), clip, source=source,
                          extra_files=pictures)  # fmt: skip
    (training.folder / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    training.message(f"VAE reconstruction PSNR on {split}: {psnr_db:.2f} dB; model written to {folder}")
    return folder


def forget_latent_readers(config: ModelConfig) -> list[str]:
    """Drops from `config` what was trained on another VAE's latents: the records of DiT training and
    distillation (the DiT then counts as a placeholder) and the reward head, whose file is then not
    copied. Returns what was dropped. A decoder-only run keeps the latent space, so it keeps them."""
    records = config.extra.get("training", {})
    dropped = [f"the {stage} training record" for stage in ("dit", "distill") if stage in records]
    forget_dit_training(config)
    if config.extra.pop(REWARD_HEAD_KEY, None) is not None:
        dropped.append("the reward head")
    return dropped


def _start_pictures(clips: VideoClipDataset, count: int) -> dict[str, Callable[[Path], None]]:
    """{file name: writer} of PNGs of the first frames of `count` clips spread over the split."""
    writers = {}
    for number, index in enumerate(evenly_spaced(len(clips), count)):
        frame = clips[index]["video"][:, 0]  # [3, H, W] in [-1, 1], exactly x / 127.5 - 1 of the stored bytes
        picture = ((frame + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        writers[f"start_{number}.png"] = lambda path, picture=picture: Image.fromarray(picture).save(path)
    return writers


def _batches(clips: Dataset, indices: Sequence[int], batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(indices), batch_size):
        yield torch.stack([clips[i]["video"] for i in indices[start : start + batch_size]])
